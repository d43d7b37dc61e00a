"""Quality filtering: our QualityStage vs DataTrove's filter chain, on the sample crawl.

Documents: the HTML pages (status 200) of both crawl snapshots in ../shared/corpus, main text
extracted with resiliparse, language labelled with fastText lid.176 (the ingest and langid stages
do this in the pipeline; here it is done inline so the benchmark stands alone), a deterministic
sample of --limit pages (ordered by sha1 of the document id). ``--source lid-dev``: the labelled
passages of lid-dev.jsonl of 1000+ characters instead.

Both sides run the Gopher repetition, Gopher quality, C4 and FineWeb rules with their default
thresholds and C4 as in FineWeb's pipeline (filter_no_terminal_punct=False): DataTrove (pip
datatrove 0.10.1; its word tokenizer is spaCy's English one for every document, it has no
per-document language) in FineWeb's order, ours (QualityStage defaults, blocklists included) in
its own order. DataTrove's URL filter is left out (it needs the public-suffix list from the
internet). Speed is documents per
CPU-second of this process (= docs/s per core), median over --repeats runs; keep rates are per
fastText language.

    .venv/bin/python benchmarks/bench_quality.py [--source crawl|lid-dev] [--limit 1500] [--repeats 3]
        [--datatrove-repeats 1]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.crawl_pages import html_responses  # noqa: E402
from tasks.quality import QualityStage  # noqa: E402
from tasks.stage import StageStats, run_stage  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
CRAWL = CORPUS / "crawl"
LID_MODEL = REPO / "models" / "lid.176.ftz"


def crawl_documents() -> list[dict]:
    """Extracted, language-labelled HTML pages of both snapshots."""
    import fasttext
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    fasttext.FastText.eprint = lambda *args, **kwargs: None
    model = fasttext.load_model(str(LID_MODEL))
    docs = []
    for snapshot in ("CC-MAIN-2026-40", "CC-MAIN-2026-44"):
        with gzip.open(CRAWL / "crawl-data" / snapshot / "warc.paths.gz", "rt") as listing:
            paths = [CRAWL / line.strip() for line in listing if line.strip()]
        for path in paths:
            for _, url, payload in html_responses(path):
                html = bytes_to_str(payload, detect_encoding(payload))
                text = extract_plain_text(html, main_content=True)
                if not text.strip():
                    continue
                labels, _ = model.predict(" ".join(text.split())[:5000])
                docs.append(
                    {"doc_id": f"{snapshot}/{len(docs)}", "url": url, "text": text, "lang": labels[0][9:]}
                )
    return docs


def lid_dev_documents(min_chars: int = 1000) -> list[dict]:
    """The labelled passages of lid-dev.jsonl (manual pages, Debian docs, fortunes) of 1000+ chars."""
    with open(CORPUS / "lid-dev.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [
        {"doc_id": r["id"], "url": None, "text": r["text"], "lang": r["lang"]}
        for r in rows
        if len(r["text"]) >= min_chars
    ]


def run_ours(docs: list[dict]) -> dict[str, str]:
    """Doc id -> 'kept' or the rule that dropped it."""
    stats = StageStats("quality")
    kept = {doc["doc_id"] for doc in run_stage(QualityStage(), docs, stats)}
    outcome = {r["doc_id"]: r["rule"] for r in stats.rejects}
    return {doc["doc_id"]: "kept" if doc["doc_id"] in kept else outcome[doc["doc_id"]] for doc in docs}


def datatrove_runner() -> Callable[[list[dict]], dict[str, str]]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    # FineWeb's pipeline (datatrove examples/fineweb.py), without its URL and language filters.
    chain = [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
    ]

    def run(docs: list[dict]) -> dict[str, str]:
        outcome = {}
        for row in docs:
            doc = Document(text=row["text"], id=row["doc_id"], metadata={"url": row["url"]})
            result = "kept"
            for step in chain:  # as BaseFilter.run does, without its stats bookkeeping
                verdict = step.filter(doc)
                if verdict is not True:
                    reason = verdict[1] if isinstance(verdict, tuple) else "dropped"
                    result = f"{type(step).__name__}:{reason}"
                    break
            outcome[row["doc_id"]] = result
        return outcome

    return run


def timed(fn: Callable[[list[dict]], dict[str, str]], docs: list[dict], repeats: int) -> tuple[float, dict]:
    """Median documents per CPU-second over ``repeats`` runs, and the outcome of the last."""
    fn(docs[:20])  # warm-up: DataTrove loads spaCy's tokenizer on first use
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        outcome = fn(docs)
        rates.append(len(docs) / (time.process_time() - start))
    return statistics.median(rates), outcome


def keep_rates(docs: list[dict], outcome: dict[str, str]) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for doc in docs:
        counts[doc["lang"]][0] += 1
        counts[doc["lang"]][1] += outcome[doc["doc_id"]] == "kept"
    return {lang: (n, k) for lang, (n, k) in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=["crawl", "lid-dev"], default="crawl")
    parser.add_argument("--limit", type=int, default=1500, help="pages in the sample (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datatrove-repeats", type=int, default=1)
    parser.add_argument("--min-docs", type=int, default=15, help="languages with fewer pages are pooled")
    args = parser.parse_args()

    start = time.time()
    found = crawl_documents() if args.source == "crawl" else lid_dev_documents()
    docs = sorted(found, key=lambda d: hashlib.sha1(d["doc_id"].encode()).hexdigest())
    total = len(docs)
    docs = docs[: args.limit] if args.limit else docs
    chars = sum(len(d["text"]) for d in docs)
    print(f"{total} documents ({args.source}) read in {time.time() - start:.0f} s; ", end="")
    print(f"sample {len(docs)}, {chars / len(docs):.0f} chars on average\n")

    ours_rate, ours = timed(run_ours, docs, args.repeats)
    try:
        dt_rate, theirs = timed(datatrove_runner(), docs, args.datatrove_repeats)
    except ImportError as e:
        print(
            f"DataTrove not importable ({e}): install it with `pip install datatrove --no-deps spacy loguru`"
        )
        dt_rate, theirs = float("nan"), {d["doc_id"]: "n/a" for d in docs}

    print("| | docs/s per core | ratio |")
    print("|---|---:|---:|")
    print(f"| DataTrove 0.10.1 (Gopher rep + Gopher quality + C4 + FineWeb) | {dt_rate:.1f} | 1.0 |")
    print(
        f"| pretrain-factory QualityStage (same rule groups) | {ours_rate:.1f} | {ours_rate / dt_rate:.1f}x |\n"
    )

    ours_by_lang, theirs_by_lang = keep_rates(docs, ours), keep_rates(docs, theirs)
    print("| lang | pages | DataTrove kept | ours kept |")
    print("|---|---:|---:|---:|")
    pooled = [0, 0, 0]
    for lang, (n, kept) in sorted(ours_by_lang.items(), key=lambda item: -item[1][0]):
        dt_kept = theirs_by_lang[lang][1]
        if n < args.min_docs:
            pooled = [pooled[0] + n, pooled[1] + dt_kept, pooled[2] + kept]
            continue
        print(f"| {lang} | {n} | {dt_kept / n:.0%} | {kept / n:.0%} |")
    if pooled[0]:
        print(
            f"| other (< {args.min_docs} pages each) | {pooled[0]} | {pooled[1] / pooled[0]:.0%} | {pooled[2] / pooled[0]:.0%} |"
        )
    n_kept = sum(v == "kept" for v in ours.values())
    dt_kept = sum(v == "kept" for v in theirs.values())
    print(f"| all | {len(docs)} | {dt_kept / len(docs):.0%} | {n_kept / len(docs):.0%} |\n")

    for name, outcome in (("DataTrove", theirs), ("ours", ours)):
        reasons = Counter(v for v in outcome.values() if v != "kept").most_common(6)
        print(f"top drop reasons, {name}: " + ", ".join(f"{r} {c}" for r, c in reasons))


if __name__ == "__main__":
    main()
