"""Language-ID accuracy and speed on the labelled lid-dev set (../shared/corpus/lid-dev.jsonl).

Prints markdown tables:
1. accuracy of LangIdStage (top language vs label; keep-all, no threshold) overall, by length bucket
   and per language, and what the default config keeps (correct kept / wrong kept);
2. speed: the stage (batched, 4000-char sample) against the usual per-document call on the whole text
   (``model.predict(text.replace("\\n", " "))``, as DataTrove's LanguageFilter does), in docs/s per
   core (documents / CPU seconds of this single-threaded process; median of --repeats), on the
   passages and on page-sized documents of 20 joined passages;
3. the sample length (max_chars) against accuracy and speed;
4. text normalizations tried before prediction, on the model directly.

    .venv/bin/python benchmarks/bench_langid.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tasks.langid import LangIdConfig, LangIdStage, load_model, prediction_input
from tasks.stage import StageStats, run_stage

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
BUCKETS = [("50-199", 50, 200), ("200-999", 200, 1000), ("1000+", 1000, 1 << 30), ("200+", 200, 1 << 30)]


def bucket_of(n: int) -> list[str]:
    return [name for name, low, high in BUCKETS if low <= n < high]


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run(config: LangIdConfig, rows: list[dict]) -> dict[str, dict]:
    """doc id -> kept document, for the documents the stage kept."""
    docs = [{"doc_id": r["id"], "text": r["text"]} for r in rows]
    stats = StageStats("langid")
    return {d["doc_id"]: d for d in run_stage(LangIdStage(config), docs, stats)}


def keep_all(**overrides: object) -> LangIdConfig:
    return LangIdConfig(keep_languages=[], min_score=0.0, min_score_by_language={}, **overrides)


def cpu_docs_per_s(fn: Callable[[], object], n_docs: int, repeats: int) -> tuple[float, float]:
    """(docs per CPU second, docs per wall second), medians over ``repeats`` runs."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return n_docs / statistics.median(cpu), n_docs / statistics.median(wall)


def accuracy_table(rows: list[dict]) -> None:
    predicted = run(keep_all(), rows)
    default = run(LangIdConfig(keep_languages=[]), rows)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # correct, total, kept correct, kept wrong
    for r in rows:
        doc = predicted[r["id"]]
        kept = default.get(r["id"])
        for key in ["all", *bucket_of(len(r["text"])), f"lang {r['lang']}"]:
            counts = hits[key]
            counts[0] += doc["lang"] == r["lang"]
            counts[1] += 1
            counts[2] += kept is not None and kept["lang"] == r["lang"]
            counts[3] += kept is not None and kept["lang"] != r["lang"]
    print("### Accuracy (lid.176.ftz, max_chars=4000)\n")
    print("| subset | docs | accuracy | default config keeps correct | keeps wrong |")
    print("|---|---:|---:|---:|---:|")
    order = ["all"] + [b[0] for b in BUCKETS] + sorted(k for k in hits if k.startswith("lang "))
    for key in order:
        correct, total, kept_correct, kept_wrong = hits[key]
        print(f"| {key} | {total} | {correct / total:.4f} | {kept_correct / total:.4f} | {kept_wrong} |")
    print()


def long_documents(rows: list[dict], per_doc: int = 20) -> list[dict]:
    """Web-page-sized documents: ``per_doc`` consecutive passages of one language joined."""
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_lang[r["lang"]].append(r)
    joined = []
    for lang, passages in sorted(by_lang.items()):
        for i in range(0, len(passages) - per_doc + 1, per_doc):
            text = "\n\n".join(p["text"] for p in passages[i : i + per_doc])
            joined.append({"id": f"{lang}-{i}", "text": text, "lang": lang})
    return joined


def speed_table(rows: list[dict], repeats: int) -> None:
    model = load_model(str(LangIdConfig().model_path), LangIdConfig().model_sha256)
    print(f"### Speed (median of {repeats}; docs/s per core = documents / CPU seconds)\n")
    print("| documents | method | docs/s per core | docs/s (wall) | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, docs in [("lid-dev passages", rows), ("20 passages joined", long_documents(rows))]:
        texts = [r["text"] for r in docs]

        def per_document_whole_text(texts: list[str] = texts) -> None:
            for text in texts:
                model.predict(text.replace("\n", " "))

        label = f"{name} ({len(docs)}, {sum(map(len, texts)) / len(docs):.0f} chars/doc)"
        peer_cpu, peer_wall = cpu_docs_per_s(per_document_whole_text, len(docs), repeats)
        stage_cpu, stage_wall = cpu_docs_per_s(lambda docs=docs: run(keep_all(), docs), len(docs), repeats)
        print(
            f"| {label} | per-document predict, whole text (peer) | {peer_cpu:.0f} | {peer_wall:.0f} | 1.00 |"
        )
        print(f"| {label} | LangIdStage | {stage_cpu:.0f} | {stage_wall:.0f} | {stage_cpu / peer_cpu:.2f} |")
    print()


def sample_length_table(rows: list[dict], repeats: int) -> None:
    print("### Sample length (max_chars) vs accuracy and speed\n")
    print("| max_chars | accuracy 200+ | accuracy 1000+ | docs/s per core |")
    print("|---:|---:|---:|---:|")
    for max_chars in [None, 4000, 2000, 1000, 500]:
        config = keep_all(max_chars=max_chars)
        predicted = run(config, rows)
        acc = {}
        for name in ("200+", "1000+"):
            subset = [r for r in rows if name in bucket_of(len(r["text"]))]
            acc[name] = sum(predicted[r["id"]]["lang"] == r["lang"] for r in subset) / len(subset)
        cpu, _ = cpu_docs_per_s(lambda config=config: run(config, rows), len(rows), repeats)
        print(f"| {max_chars or 'whole'} | {acc['200+']:.4f} | {acc['1000+']:.4f} | {cpu:.0f} |")
    print()


def normalization_table(rows: list[dict]) -> None:
    model = load_model(str(LangIdConfig().model_path), LangIdConfig().model_sha256)
    non_letters = re.compile(r"[\W\d_]+")
    variants: dict[str, Callable[[str], str]] = {
        "whitespace collapsed (stage)": lambda line: line,
        "+ lowercase": str.lower,
        "+ NFKC + lowercase": lambda line: unicodedata.normalize("NFKC", line).lower(),
        "+ lowercase, digits/punctuation removed": lambda line: " ".join(
            non_letters.sub(" ", line.lower()).split()
        ),
    }
    lines = [prediction_input(r["text"], 4000) or "" for r in rows]
    print("### Text normalization before predict (model directly, max_chars=4000)\n")
    print("| normalization | accuracy 50-199 | accuracy 200+ | correct with score >= 0.65, 200+ |")
    print("|---|---:|---:|---:|")
    for name, normalize in variants.items():
        labels, scores = model.predict([normalize(line) for line in lines], k=1)
        results = defaultdict(lambda: [0, 0, 0])
        for r, label, score in zip(rows, labels, scores, strict=True):
            correct = label[0].removeprefix("__label__") == r["lang"]
            for key in bucket_of(len(r["text"])):
                results[key][0] += correct
                results[key][1] += 1
                results[key][2] += correct and score[0] >= 0.65
        short, long = results["50-199"], results["200+"]
        print(f"| {name} | {short[0] / short[1]:.4f} | {long[0] / long[1]:.4f} | {long[2] / long[1]:.4f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = load(args.corpus / "lid-dev.jsonl")
    accuracy_table(rows)
    speed_table(rows, args.repeats)
    sample_length_table(rows, args.repeats)
    normalization_table(rows)


if __name__ == "__main__":
    main()
