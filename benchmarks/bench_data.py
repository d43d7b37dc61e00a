"""Data benchmark: docs/s per core of every stage of the data refresh on the sample crawl, LID
accuracy on lid-dev, and DataTrove's FineWeb-style chain side by side on the same pages.

Each stage runs in this one process over the output of the previous one, timed in CPU seconds
(docs/s per core), so the numbers do not depend on how busy the other core is.

    .venv/bin/python benchmarks/bench_data.py [--max-files N] [--peer-pages 400]

The peer (needs `pip install datatrove spacy`; skipped if absent): warcio records -> DataTrove's
Trafilatura extractor -> fastText lid.176 (the same model file: DataTrove's LanguageFilter would
download it at run time) -> GopherRepetition -> GopherQuality -> C4 -> FineWeb, as FineWeb's recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.crawl_pages import html_responses  # noqa: E402
from tasks import dataset as ds  # noqa: E402
from tasks.dedup import DedupConfig, dedup_datasets  # noqa: E402
from tasks.ingest import IngestConfig, iter_documents, resolve_crawl  # noqa: E402
from tasks.langid import LangIdConfig, LangIdStage, load_model  # noqa: E402
from tasks.pii import PiiStage  # noqa: E402
from tasks.quality import QualityStage  # noqa: E402
from tasks.stage import StageStats, run_stage  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
SNAPSHOTS = ("CC-MAIN-2026-40", "CC-MAIN-2026-44")


def cpu_timed(fn):
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def run_ours(files: list[str], workdir: Path) -> tuple[list[tuple[str, int, int, float]], list[dict]]:
    rows = []
    ingest_stats = StageStats("ingest")
    docs, seconds = cpu_timed(
        lambda: [d for f in files for d in iter_documents(f, IngestConfig(), ingest_stats)]
    )
    rows.append(("ingest + extract", ingest_stats.docs_in, len(docs), seconds))
    for stage in (LangIdStage(), QualityStage(), PiiStage()):
        stats = StageStats(stage.name)
        n_in = len(docs)
        docs, seconds = cpu_timed(
            lambda stage=stage, stats=stats, docs=docs: list(run_stage(stage, docs, stats))
        )
        rows.append((stage.name, n_in, len(docs), seconds))
    clean = workdir / "clean"
    infos = [ds.write_table(ds.rows_to_table(docs, ds.DOCUMENT_SCHEMA), clean / "part-00000.parquet")]
    ds.write_manifest(
        clean, ds.Manifest(stage="pii", schema=ds.schema_description(ds.DOCUMENT_SCHEMA), shards=infos)
    )
    manifest, seconds = cpu_timed(
        lambda: dedup_datasets([clean], workdir / "dedup", workdir / "index", DedupConfig(), workdir / "work")
    )
    rows.append(("dedup", len(docs), manifest.rows, seconds))
    return rows, docs


def lid_accuracy() -> tuple[float, int]:
    with open(CORPUS / "lid-dev.jsonl", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if len(r["text"]) >= 200]
    stage = LangIdStage(LangIdConfig(keep_languages=[], min_score=0.0, min_score_by_language={}))
    stats = StageStats("langid")
    labelled = list(run_stage(stage, ({"doc_id": r["id"], "text": r["text"]} for r in rows), stats))
    truth = {r["id"]: r["lang"] for r in rows}
    return sum(d["lang"] == truth[d["doc_id"]] for d in labelled) / len(rows), len(rows)


def html_pages(files: list[str], limit: int) -> list[dict]:
    """Raw HTML responses (status 200, text/html) as the peer's input, decoded as the peer would."""
    pages = []
    for path in files:
        for record_id, _, body in html_responses(path):
            pages.append({"id": record_id, "html": body})
            if len(pages) >= limit:
                return pages
    return pages


def run_peer(pages: list[dict]) -> tuple[int, float] | None:
    try:
        from datatrove.data import Document
        from datatrove.pipeline.extractors import Trafilatura
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
    except ImportError:
        return None
    model = load_model(str(LangIdConfig().model_path), LangIdConfig().model_sha256)
    extractor = Trafilatura(favour_precision=True)
    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False)]
    chain.append(FineWebQualityFilter())
    for step in chain:  # warm-up: spaCy loads its tokenizer on first use
        step.filter(Document(text="warm up text. " * 20, id="w"))

    def run() -> int:
        kept = 0
        for page in pages:
            html = page["html"].decode("utf-8", errors="replace")
            text = extractor.extract(html)
            if not text:
                continue
            labels, scores = model.predict(text.replace("\n", " "))
            if scores[0] < 0.65:
                continue
            doc = Document(text=text, id=page["id"], metadata={"language": labels[0][9:]})
            if all(step.filter(doc) is True for step in chain):
                kept += 1
        return kept

    return cpu_timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-files", type=int, default=None, help="crawl files per snapshot (default all)")
    parser.add_argument("--peer-pages", type=int, default=400, help="HTML pages the peer chain processes")
    args = parser.parse_args()

    files = []
    for snapshot in SNAPSHOTS:
        listed = resolve_crawl(str(CORPUS / "crawl"), [snapshot], ["warc", "wet"], None)[snapshot]
        files += listed[: args.max_files] if args.max_files else listed
    with tempfile.TemporaryDirectory() as tmp:
        rows, _ = run_ours(files, Path(tmp))
    total_in = rows[0][1]
    total_cpu = sum(r[3] for r in rows)
    print(f"\nOur data refresh, in-process, {len(files)} crawl files ({total_in} records)\n")
    print("| stage | docs in | docs out | CPU s | docs/s per core |\n|---|---:|---:|---:|---:|")
    for name, n_in, n_out, seconds in rows:
        print(f"| {name} | {n_in} | {n_out} | {seconds:.1f} | {n_in / seconds:.0f} |")
    ours_rate = total_in / total_cpu
    print(f"| **whole chain** | {total_in} | {rows[-1][2]} | {total_cpu:.1f} | **{ours_rate:.0f}** |")

    accuracy, n = lid_accuracy()
    print(f"\nLID accuracy on lid-dev, passages of 200+ chars: {accuracy:.4f} ({n} passages)")

    warc_files = [f for f in files if not f.endswith(".wet.gz")]
    peer = run_peer(html_pages(warc_files, args.peer_pages))
    if peer is None:
        print("\nDataTrove not installed: `pip install datatrove spacy` for the side-by-side peer.")
        return
    kept, seconds = peer
    peer_rate = args.peer_pages / seconds
    print("\n| chain (extract + LID + Gopher + C4 + FineWeb) | docs/s per core | ratio |\n|---|---:|---:|")
    print(f"| DataTrove, {args.peer_pages} HTML pages ({kept} kept) | {peer_rate:.1f} | 1.00 |")
    print(f"| ours (whole chain incl. PII and dedup) | {ours_rate:.1f} | {ours_rate / peer_rate:.1f}x |")


if __name__ == "__main__":
    main()
