"""The quality classifier's reference sets for our corpus: curated documentation vs random crawl pages.

- **positive** (curated): the seed documents of ``neardup-dev.jsonl``: the main text of hand-picked
  documentation pages (PostgreSQL, Django, Python, rendered manual pages in 20+ languages, Debian
  reference/FAQ/maintainer guide sections), navigation removed, cut at a paragraph boundary,
  pairwise distinct (5-gram Jaccard < 0.5). Fortunes are left out: curated, but not documentation.
  ``lang`` is the source package's language (the meta file).
- **negative** (random crawl): every page of the sample crawl (both snapshots, WARC and WET) that
  passes ingest, langid and quality with their default configs, i.e. the documents the classifier
  stage sees, one per URL (re-crawls dropped), minus the pages whose text is mostly a positive's
  (half or more of their 5-token shingles occur in the positives: the same page cannot be both).

The trainer samples the larger class down per language (``balance``), so each language has as many
random pages as curated ones and the language token carries no label prior. Both sets are written
as our datasets (Parquet + manifest; ``doc_id, text, lang, url, source``), deterministic: the same
corpus gives the same digests. Nothing of the corpus is stored in the repository.

    .venv/bin/python benchmarks/build_classifier_sets.py --out workdir/classifier-sets
    .venv/bin/pretrain classifier train --positive workdir/classifier-sets/positive \\
        --negative workdir/classifier-sets/negative --output workdir/classifiers/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import dataset as ds
from tasks import minhash, registry
from tasks import stage as st
from tasks.ingest import IngestConfig, iter_documents, resolve_crawl

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("lang", pa.string()),
        ("url", pa.string()),
        ("source", pa.string()),
    ]
)
SHINGLE_WORDS = 5
COPY_SHARE = 0.5  # a negative with this share of its 5-grams in the positives is a copy of one


def shingles(text: str) -> set[int]:
    """Dedup's 5-token shingles (``tasks.minhash``: folded text, CJK characters as tokens)."""
    return set(minhash.shingle_hashes(minhash.fold_text(text), SHINGLE_WORDS).tolist())


def positives(corpus: Path) -> list[dict]:
    meta = json.loads((corpus / "neardup-dev.meta.json").read_text())["documents"]
    rows = []
    for line in (corpus / "neardup-dev.jsonl").read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        info = meta[doc["id"]]
        if info["role"] == "seed" and info["source"] != "fortunes":
            rows.append(
                {
                    "doc_id": doc["id"],
                    "text": doc["text"],
                    "lang": info["lang"],
                    "url": None,
                    "source": info["source"],
                }
            )
    return rows


def crawl_pages(crawl: Path, max_files: int | None) -> Iterator[dict]:
    """Crawl pages after ingest, langid and quality (default configs), in crawl order."""
    langid = registry.document_stage("langid", registry.stage("langid").config())
    quality = registry.document_stage("quality", registry.stage("quality").config())
    for files in resolve_crawl(str(crawl), [], ["warc", "wet"], max_files).values():
        for source in files:
            stats = {name: st.StageStats(name) for name in ("ingest", "langid", "quality")}
            docs = iter_documents(source, IngestConfig(), stats["ingest"])
            docs = st.run_stage(langid, docs, stats["langid"])
            yield from st.run_stage(quality, docs, stats["quality"])
            print(
                f"{Path(source).name}: " + ", ".join(f"{k} kept {s.kept}" for k, s in stats.items()),
                flush=True,
            )


def negatives(crawl: Path, positive_rows: list[dict], max_files: int | None) -> tuple[list[dict], Counter]:
    positive_shingles = set().union(*(shingles(r["text"]) for r in positive_rows))
    seen_urls: set[str] = set()
    rows, skipped = [], Counter()
    for doc in crawl_pages(crawl, max_files):
        if doc["url"] in seen_urls:
            skipped["recrawl"] += 1
            continue
        seen_urls.add(doc["url"])
        own = shingles(doc["text"])
        if len(own & positive_shingles) >= COPY_SHARE * len(own):
            skipped["copy_of_positive"] += 1
            continue
        host = doc["url"].split("/")[2] if doc["url"] and "://" in doc["url"] else "wet"
        rows.append(
            {
                "doc_id": doc["doc_id"],
                "text": doc["text"],
                "lang": doc["lang"],
                "url": doc["url"],
                "source": host,
            }
        )
    return rows, skipped


def write_set(rows: list[dict], out: Path, name: str, extra: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    shard = ds.write_table(ds.rows_to_table(rows, SCHEMA), out / st.shard_name(0))
    manifest = ds.Manifest(
        stage=f"classifier-set.{name}",
        schema=ds.schema_description(SCHEMA),
        shards=[shard],
        config={"shingle_words": SHINGLE_WORDS, "copy_share": COPY_SHARE},
        stats={
            "rows": len(rows),
            "lang": dict(sorted(Counter(r["lang"] for r in rows).items())),
            "source": dict(sorted(Counter(r["source"] for r in rows).items())),
        },
        extra=extra,
    )
    ds.write_manifest(out, manifest)
    return ds.dataset_digest(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="writes OUT/positive and OUT/negative")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--max-files", type=int, help="crawl files per snapshot (trial runs)")
    args = parser.parse_args()
    corpus, out = Path(args.corpus), Path(args.out)
    start = time.process_time()
    pos = positives(corpus)
    neg, skipped = negatives(corpus / "crawl", pos, args.max_files)
    summary = {
        "positive": {"rows": len(pos), "digest": write_set(pos, out / "positive", "positive", {})},
        "negative": {
            "rows": len(neg),
            "skipped": dict(skipped),
            "digest": write_set(neg, out / "negative", "negative", {"skipped": dict(skipped)}),
        },
        "cpu_seconds": round(time.process_time() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
