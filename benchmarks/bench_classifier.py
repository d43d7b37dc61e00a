"""Classifier stage inference vs fastText ``predict`` alone, on the same documents, in CPU seconds.

Three ways over the same documents (model loaded once before, not timed):

- ``stage``: ``ClassifierStage`` through ``run_stage`` (input preparation, predict in batches,
  thresholds, the annotated documents, reject records, counts);
- ``predict, prepared lines``: ``model.predict`` on the lines the stage feeds it, prepared beforehand
  (the fastText share of the stage's work);
- ``predict, raw text``: ``model.predict`` on each text with newlines replaced, nothing else (what a
  script calling fastText directly would do; whole texts, so it scores more words than the stage's
  first ``max_chars`` characters).

docs/s per core = documents / CPU seconds of this process (``time.process_time``), median of
``--repeats``. Also printed: the model's held-out precision/recall (its manifest) and, per source,
for the documents of its held-out split (never trained on), the mean score and the shares at or
above a few thresholds (what a threshold would keep).

    .venv/bin/python benchmarks/bench_classifier.py --model workdir/classifiers/quality \\
        --docs workdir/classifier-sets/negative --docs workdir/classifier-sets/positive
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import dataset as ds
from tasks import stage as st
from tasks.classifier import (
    ClassifierConfig,
    ClassifierStage,
    load_model,
    model_files,
    model_input,
    positive_scores,
)
from tasks.train_classifier import is_heldout

SHARE_THRESHOLDS = (0.1, 0.25, 0.5)


def cpu_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (pretrain classifier train)")
    parser.add_argument(
        "--docs", action="append", required=True, help="datasets with text, lang (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    docs = [row for path in args.docs for row in ds.iter_rows(path)]
    config = ClassifierConfig(models=[{"path": args.model, "threshold": 0.5}], batch_size=args.batch_size)
    spec = config.models[0]
    model = load_model(str(model_files(spec.path)[0]), spec.sha256)
    stage = ClassifierStage(config)
    lines = [model_input(d["text"], d["lang"], spec.language_aware, spec.max_chars) for d in docs]
    raw = [d["text"].replace("\n", " ") for d in docs]

    def run_stage() -> None:
        stats = st.StageStats("classifier")
        for _ in st.run_stage(stage, docs, stats):
            pass

    def predict(texts: list[str]) -> Callable[[], object]:
        return lambda: [
            model.predict(texts[i : i + args.batch_size], k=-1) for i in range(0, len(texts), args.batch_size)
        ]

    runs = {
        "stage": run_stage,
        "predict, prepared lines": predict(lines),
        "predict, raw text": predict(raw),
    }
    rows = []
    for name, run in runs.items():
        seconds = cpu_seconds(run, args.repeats)
        rows.append(
            {"method": name, "cpu_s": round(seconds, 3), "docs_per_s_per_core": round(len(docs) / seconds, 1)}
        )

    # Scores of the documents the model did not train on (its held-out split), per source.
    manifest = model_files(spec.path)[1]
    fraction = manifest.get("config", {}).get("heldout_fraction", 1.0)
    by_source: dict[str, list[float]] = defaultdict(list)
    for doc, line in zip(docs, lines, strict=True):
        if is_heldout(doc["text"], fraction):
            score = positive_scores(model, [line], spec.positive_label)[0]
            by_source[doc.get("source") or "?"].append(score)
    print(
        json.dumps(
            {
                "documents": len(docs),
                "characters": sum(len(d["text"]) for d in docs),
                "model": {"path": str(spec.path), "sha256": spec.sha256, "heldout": manifest.get("heldout")},
                "speed": rows,
                "heldout_scores_by_source": {
                    source: {
                        "docs": len(scores),
                        "mean": round(statistics.fmean(scores), 3),
                        **{
                            f"share_at_or_above_{t}": round(sum(s >= t for s in scores) / len(scores), 3)
                            for t in SHARE_THRESHOLDS
                        },
                    }
                    for source, scores in sorted(by_source.items())
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
