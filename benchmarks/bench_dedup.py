"""Near-duplicate detection on neardup-dev: our dedup stage vs plain datasketch, side by side.

Quality is pairwise (two documents of one labelled cluster should share a predicted cluster):
precision, recall, F1 overall and per variant type / edit band, and how many of the labelled
hard-negative pairs were merged. Speed is CPU time (``time.process_time``), so docs/s is per core
even on a shared machine; each timing is the median of ``--repeat`` runs.

Baseline: the usual recipe, datasketch ``MinHash.update`` per shingle (word 5-grams, default hash,
128 permutations) + ``MinHashLSH(threshold=0.8)``, clusters by union-find over query results.

With ``--boilerplate-cases`` (a file from benchmarks/build_boilerplate_cases.py), it measures the
recipes for pages that share a site template instead: dedup alone, boilerplate removal
(tasks/boilerplate.py) then dedup, and dedup with a stricter containment rule, on those cases and
on neardup-dev.

    .venv/bin/python benchmarks/bench_dedup.py [--repeat 3] [--corpus ../shared/corpus]
    .venv/bin/python benchmarks/bench_dedup.py --boilerplate-cases workdir/boilerplate-cases.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

from datasketch import MinHash, MinHashLSH

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import dataset as ds
from tasks import minhash
from tasks.boilerplate import BoilerplateConfig, boilerplate_datasets
from tasks.dedup import DedupConfig, dedup_datasets, sketch_texts

REPO = Path(__file__).resolve().parents[1]
SHARDS = 4
_WORD = re.compile(r"\w+")


def load(corpus: Path) -> tuple[list[dict], dict]:
    with open(corpus / "neardup-dev.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    meta = json.loads((corpus / "neardup-dev.meta.json").read_text(encoding="utf-8"))
    return docs, meta


def write_dataset(docs: list[dict], target: Path) -> Path:
    per_shard = -(-len(docs) // SHARDS)
    infos = []
    for i in range(SHARDS):
        rows = [
            {"doc_id": d["id"], "text": d["text"], "url": d.get("url")}
            for d in docs[i * per_shard : (i + 1) * per_shard]
        ]
        infos.append(
            ds.write_table(ds.rows_to_table(rows, ds.DOCUMENT_SCHEMA), target / f"part-{i:05d}.parquet")
        )
    ds.write_manifest(
        target, ds.Manifest(stage="bench", schema=ds.schema_description(ds.DOCUMENT_SCHEMA), shards=infos)
    )
    return target


def run_ours(dataset: Path, work: Path, config: DedupConfig) -> tuple[dict[str, str], dict]:
    manifest = dedup_datasets(
        [dataset], work / "out", None, config.model_copy(update={"annotate": True}), work
    )
    clusters = {
        row["doc_id"]: row["dup_cluster"] for row in ds.iter_rows(work / "out", ["doc_id", "dup_cluster"])
    }
    return clusters, manifest.extra["dedup"]


def baseline_shingles(text: str) -> list[bytes]:
    words = _WORD.findall(text.lower())
    return [" ".join(words[i : i + 5]).encode() for i in range(max(1, len(words) - 4))]


def run_baseline(docs: list[dict], threshold: float) -> tuple[dict[str, str], float]:
    start = time.process_time()
    signatures = []
    for doc in docs:
        m = MinHash(num_perm=128, seed=1, scheme="affine32")
        for shingle in baseline_shingles(doc["text"]):
            m.update(shingle)
        signatures.append(m)
    sketch_seconds = time.process_time() - start
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    parent = {d["id"]: d["id"] for d in docs}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for doc, m in zip(docs, signatures, strict=True):
        for other in lsh.query(m):
            a, b = find(doc["id"]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
        lsh.insert(doc["id"], m)
    return {d["id"]: find(d["id"]) for d in docs}, sketch_seconds


def bulk_seconds(docs: list[dict]) -> float:
    start = time.process_time()
    MinHash.bulk([baseline_shingles(d["text"]) for d in docs], num_perm=128, seed=1, scheme="affine32")
    return time.process_time() - start


def our_sketch_seconds(docs: list[dict], config: DedupConfig) -> float:
    """The per-document work of the sketch pass: normalize, exact key, shingles, signature, band keys."""
    hasher = minhash.MinHasher(config.num_perm, config.seed)
    bands, rows = config.lsh_bands()
    minhash.shingle_hashes("warm up the code point tables", 2)
    start = time.process_time()
    for first in range(0, len(docs), ds.ROW_GROUP_SIZE):  # batches as the dedup stage reads them
        texts = [d["text"] for d in docs[first : first + ds.ROW_GROUP_SIZE]]
        minhash.band_keys(sketch_texts(texts, config.shingle_size, hasher).signatures, bands, rows)
    return time.process_time() - start


def _scores(true_pairs: set, pred_pairs: set) -> dict[str, float]:
    tp = len(true_pairs & pred_pairs)
    precision = tp / len(pred_pairs) if pred_pairs else 1.0
    recall = tp / len(true_pairs) if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "pairs": len(true_pairs)}


def pair_metrics(
    pred: dict[str, str], truth: dict[str, str], seeds: dict[str, str], kinds: dict[str, str]
) -> dict[str, dict[str, float]]:
    """Pairwise P/R/F1 over all pairs, then per variant type.

    Per type, the true pairs are (variant, its seed) and the predicted ones are the pairs of a
    variant of that type with its seed or with any document of another labelled cluster (an error).
    """
    by_truth, by_pred = defaultdict(list), defaultdict(list)
    for doc, cluster in truth.items():
        by_truth[cluster].append(doc)
        by_pred[pred[doc]].append(doc)
    true_pairs = {p for m in by_truth.values() for p in itertools.combinations(sorted(m), 2)}
    pred_pairs = {p for m in by_pred.values() for p in itertools.combinations(sorted(m), 2)}
    out = {"all pairs": _scores(true_pairs, pred_pairs)}
    for kind in sorted(set(kinds.values()) - {"seed"}):
        variants = [d for d in truth if kinds[d] == kind]
        t = {(v, seeds[v]) for v in variants}
        q = {(v, seeds[v]) for v in variants if pred[v] == pred[seeds[v]]}
        q |= {(v, o) for v in variants for o in by_pred[pred[v]] if truth[o] != truth[v]}
        out[kind] = _scores(t, q)
    return out


def hard_negatives_merged(pred: dict[str, str], meta: dict) -> int:
    return sum(pred[h["a"]] == pred[h["b"]] for h in meta["hard_negative_pairs"])


def run_recipe(
    dataset: Path, work: Path, boilerplate: BoilerplateConfig | None, config: DedupConfig
) -> tuple[dict[str, str], int]:
    """Predicted clusters of (boilerplate removal then) dedup; documents the boilerplate stage drops
    stay alone. Returns the clusters and the number of documents boilerplate removal changed."""
    changed = 0
    if boilerplate is not None:
        manifest = boilerplate_datasets([dataset], work / "boilerplate", None, boilerplate, work)
        dataset, changed = work / "boilerplate", manifest.stats["extra"].get("boilerplate_docs_changed", 0)
    clusters, _ = run_ours(dataset, work, config)
    return clusters, changed


def template_metrics(pred: dict[str, str], cases: list[dict]) -> dict[str, dict[str, float]]:
    """All pairs, header_footer (page + template vs page) and shared_template (distinct pages)."""
    truth = {c["id"]: c["cluster"] for c in cases}
    pred = {i: pred.get(i, i) for i in truth}  # dropped by boilerplate removal: alone
    by_pred = defaultdict(list)
    for doc, cluster in pred.items():
        by_pred[cluster].append(doc)
    by_truth = defaultdict(list)
    for doc, cluster in truth.items():
        by_truth[cluster].append(doc)
    true_pairs = {p for m in by_truth.values() for p in itertools.combinations(sorted(m), 2)}
    pred_pairs = {p for m in by_pred.values() for p in itertools.combinations(sorted(m), 2)}
    out = {"all pairs": _scores(true_pairs, pred_pairs)}
    out["all pairs"]["wrong"] = len(pred_pairs - true_pairs)
    for kind in sorted({c["variant"] for c in cases} - {"seed"}):
        variants = [c for c in cases if c["variant"] == kind]
        t = {(c["id"], c["seed_id"]) for c in variants if c["seed_id"]}
        q = {
            (c["id"], c["seed_id"]) for c in variants if c["seed_id"] and pred[c["id"]] == pred[c["seed_id"]]
        }
        wrong = {
            tuple(sorted((c["id"], o)))
            for c in variants
            for o in by_pred[pred[c["id"]]]
            if truth[o] != c["cluster"]
        }
        out[kind] = {**_scores(t, q | wrong), "wrong": len(wrong)}
        if not t:  # no true pairs: recall is not defined
            out[kind]["recall"] = out[kind]["f1"] = float("nan")
    return out


# Boilerplate thresholds scaled to a set of a few hundred documents (a template on a fifth of a host's
# pages, a block on 10 pages of a host or 20 of the set).
SMALL_SET = BoilerplateConfig(host_min_fraction=0.2, host_min_docs=10, corpus_min_docs=20)


def boilerplate_recipes(cases_path: Path, corpus: Path) -> None:
    with open(cases_path, encoding="utf-8") as f:
        cases = [json.loads(line) for line in f]
    docs, meta = load(corpus)
    truth = {d["id"]: d["cluster"] for d in docs}
    kinds = {d["id"]: meta["documents"][d["id"]]["variant"] for d in docs}
    seeds = {d["id"]: meta["documents"][d["id"]]["seed_id"] for d in docs}
    recipes = {
        "dedup only (default)": (None, DedupConfig()),
        "dedup, containment needs Jaccard >= 0.7": (None, DedupConfig(containment_min_jaccard=0.7)),
        "dedup, containment >= 0.95": (None, DedupConfig(containment_threshold=0.95)),
        "boilerplate removal (default thresholds), then dedup": (BoilerplateConfig(), DedupConfig()),
        # the defaults are for crawl-sized counts; this set has 72 documents per host
        "boilerplate removal (thresholds for this set's size), then dedup": (SMALL_SET, DedupConfig()),
    }
    hosts = sorted({c["host"] for c in cases})
    kinds_here = sorted({c["variant"] for c in cases} - {"seed"})
    print(f"template cases: {len(cases)} documents of {len(hosts)} hosts ({', '.join(hosts)})")
    print("cells: P / R / F1 (pairs with its seed) and, after |, pairs wrongly merged")
    print()
    print(
        f"| recipe | all pairs | {' | '.join(kinds_here)} | docs changed by boilerplate "
        "| dev: all F1 | dev: <=10% F1 | dev: hard negatives merged |"
    )
    print("|---|---|" + "---|" * len(kinds_here) + "---:|---:|---:|---:|")
    for name, (boilerplate, config) in recipes.items():
        with tempfile.TemporaryDirectory() as tmp:
            pred, changed = run_recipe(
                write_dataset(cases, Path(tmp) / "cases"), Path(tmp) / "c", boilerplate, config
            )
            dev_pred, _ = run_recipe(
                write_dataset(docs, Path(tmp) / "dev"), Path(tmp) / "d", boilerplate, config
            )
        m = template_metrics(pred, cases)
        dev_pred = {i: dev_pred.get(i, i) for i in truth}
        dev = pair_metrics(dev_pred, truth, seeds, kinds)
        edits = min(dev[k]["f1"] for k in ("edit_1_5", "edit_5_10", "edit_1_5+boilerplate"))

        def cell(v: dict) -> str:
            return f"{v['precision']:.3f} / {v['recall']:.3f} / {v['f1']:.3f} \\| {v['wrong']}"

        print(
            f"| {name} | {cell(m['all pairs'])} | {' | '.join(cell(m[k]) for k in kinds_here)} | {changed} "
            f"| {dev['all pairs']['f1']:.3f} | {edits:.3f} | {hard_negatives_merged(dev_pred, meta)} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--boilerplate-cases", type=Path, help="Measure the template recipes on these cases.")
    args = parser.parse_args()
    if args.boilerplate_cases:
        boilerplate_recipes(args.boilerplate_cases, args.corpus)
        return
    docs, meta = load(args.corpus)
    truth = {d["id"]: d["cluster"] for d in docs}
    kinds = {d["id"]: meta["documents"][d["id"]]["variant"] for d in docs}
    seeds = {d["id"]: meta["documents"][d["id"]]["seed_id"] for d in docs}
    config = DedupConfig()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_dataset(docs, Path(tmp) / "in")
        ours_total, ours_sketch = [], []
        for i in range(args.repeat):
            start = time.process_time()
            pred, report = run_ours(dataset, Path(tmp) / f"run{i}", config)
            ours_total.append(time.process_time() - start)
            ours_sketch.append(our_sketch_seconds(docs, config))
        tracemalloc.start()  # Python + numpy allocations (pyarrow's own buffers are not traced)
        run_ours(dataset, Path(tmp) / "traced", config)
        ours_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    tracemalloc.start()
    run_baseline(docs, 0.8)
    base_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_total, base_sketch, bulk = [], [], []
    for _ in range(args.repeat):
        start = time.process_time()
        base_pred, seconds = run_baseline(docs, 0.8)
        base_total.append(time.process_time() - start)
        base_sketch.append(seconds)
        bulk.append(bulk_seconds(docs))
    base_05, _ = run_baseline(docs, 0.5)

    n = len(docs)
    ours_m = pair_metrics(pred, truth, seeds, kinds)
    base_m = pair_metrics(base_pred, truth, seeds, kinds)
    base05_m = pair_metrics(base_05, truth, seeds, kinds)
    bands, rows = config.lsh_bands()
    print(
        f"neardup-dev: {n} documents, {len(set(truth.values()))} clusters, {len(meta['hard_negative_pairs'])} hard-negative pairs"
    )
    print(
        f"ours: shingles of {config.shingle_size} tokens, {config.num_perm} perms, LSH {bands}x{rows} "
        f"(threshold {config.lsh_threshold}), verified Jaccard >= {config.jaccard_threshold} "
        f"or containment >= {config.containment_threshold}"
    )
    print()
    print("| pairs | n | ours P | ours R | ours F1 | datasketch 0.8 F1 | datasketch 0.5 F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ours_m:
        o, b, b5 = ours_m[name], base_m[name], base05_m[name]
        print(
            f"| {name} | {o['pairs']} | {o['precision']:.3f} | {o['recall']:.3f} | {o['f1']:.3f} "
            f"| {b['f1']:.3f} | {b5['f1']:.3f} |"
        )
    print()
    edits = {k: v for k, v in ours_m.items() if k in ("edit_1_5", "edit_5_10", "edit_1_5+boilerplate")}
    print(
        f"F1 on variants with <= 10% edits (min over edit_1_5, edit_5_10, edit_1_5+boilerplate): {min(v['f1'] for v in edits.values()):.3f}"
    )
    print(
        f"hard negatives merged: ours {hard_negatives_merged(pred, meta)}, datasketch 0.8 {hard_negatives_merged(base_pred, meta)}, datasketch 0.5 {hard_negatives_merged(base_05, meta)}"
    )
    med = statistics.median
    print()
    print(f"| throughput (CPU s, median of {args.repeat}) | docs/s per core | vs baseline |")
    print("|---|---:|---:|")
    print(
        f"| datasketch MinHash.update per shingle (baseline signatures) | {n / med(base_sketch):.0f} | 1.00x |"
    )
    print(
        f"| datasketch MinHash.bulk (signatures) | {n / med(bulk):.0f} | {med(base_sketch) / med(bulk):.2f}x |"
    )
    print(
        f"| ours: sketch pass (normalize, exact key, shingles, signature, band keys) | {n / med(ours_sketch):.0f} | {med(base_sketch) / med(ours_sketch):.2f}x |"
    )
    print(
        f"| baseline end to end (signatures + MinHashLSH + union-find) | {n / med(base_total):.0f} | 1.00x |"
    )
    print(
        f"| ours end to end (dedup_datasets: sketch, partitions, verify, write) | {n / med(ours_total):.0f} | {med(base_total) / med(ours_total):.2f}x |"
    )
    print()
    print(
        f"peak traced memory (tracemalloc): ours {ours_peak / 2**20:.0f} MiB, baseline {base_peak / 2**20:.0f} MiB; "
        f"largest band partition {report['peak_partition_bytes'] / 2**10:.0f} KiB; "
        f"peak RSS of the whole benchmark process {peak_rss / 2**20:.0f} MiB"
    )
    print(
        f"report: clusters {report['clusters']}, removed exact {report['removed_exact']}, near {report['removed_near']}, candidate pairs {report['candidate_pairs']}, verified {report['verified_pairs']}"
    )


if __name__ == "__main__":
    main()
