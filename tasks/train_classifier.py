"""Training a fastText classifier from a positive and a negative dataset (the classifier stage's models).

Users bring reference data as our datasets (a directory with ``manifest.json``) or as Parquet/JSONL
files with a ``text`` column (``lang`` optional: lid.176 labels rows without one). ``train`` writes
a model directory: ``model.bin`` and ``manifest.json`` with the label, the input settings the stage
must use, the training data's digests (``tasks.dataset.dataset_digest``; sha256 for plain files),
the held-out precision/recall, the config and the code version.

Reproducible: the held-out split is by a hash of each text (the same text is always on the same
side, whatever else the data holds); training lines are ordered by that hash then shuffled with
the seed; fastText runs on one thread with the seed. The same data, config and code give a
bitwise-equal ``model.bin`` (tests/test_classifier.py), so the manifest's ``key`` (data digests +
config + code) names the model: training again with the same key reuses the directory.

Multilingual, one model: each line starts with the document's language token (``model_input``), and
``balance`` samples the larger class down per language, so the language token carries no label
prior and the model learns from the words; per-language thresholds in the stage do the rest.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import fasttext
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, Field

from tasks import dataset as ds
from tasks.atomic import atomic_path, atomic_write_json
from tasks.classifier import (
    DEFAULT_MAX_CHARS,
    LABEL_PREFIX,
    MODEL_FILE,
    MODEL_MANIFEST,
    detect_languages,
    model_input,
    positive_scores,
)
from tasks.stage import code_version


class TrainClassifierConfig(BaseModel):
    """What a classifier is trained with (every field is part of the model's key)."""

    name: str = Field(
        default="quality",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Label name: the stage's column `<name>_score`, the fastText labels __label__<name> "
        "and __label__not_<name>.",
    )
    seed: int = Field(default=0, description="Seed of the shuffle, the balance sample and fastText.")
    heldout_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Share of each dataset held out (by text hash) for P/R."
    )
    balance: bool = Field(
        default=True, description="Sample the larger class down to the smaller one's count per language."
    )
    language_aware: bool = Field(default=True, description="Prefix each line with `__lang_<lang>`.")
    max_chars: int = Field(default=DEFAULT_MAX_CHARS, ge=1, description="Characters of each text used.")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Threshold of the held-out P/R.")
    # A few thousand examples: fastText's defaults (5 epochs, lr 0.1) barely move from the prior (held-out
    # F1 0.38 on our reference sets); 10 epochs at lr 0.5 give 0.78, 25 epochs no better (RESULTS.md).
    epoch: int = Field(default=10, ge=1)
    lr: float = Field(default=0.5, gt=0.0)
    dim: int = Field(default=32, ge=1, description="Vector size (small: a few thousand examples).")
    word_ngrams: int = Field(default=2, ge=1)
    min_count: int = Field(default=2, ge=1)
    bucket: int = Field(
        default=262_144, ge=1, description="Hash buckets for n-grams: model size ~ bucket x dim."
    )

    @property
    def positive_label(self) -> str:
        return f"{LABEL_PREFIX}{self.name}"

    @property
    def negative_label(self) -> str:
        return f"{LABEL_PREFIX}not_{self.name}"


class Example(BaseModel):
    text: str
    lang: str
    positive: bool


def data_digest(path: str | Path) -> str:
    """A dataset's ``dataset_digest``, a plain file's sha256."""
    path = Path(path)
    return ds.dataset_digest(path) if ds.manifest_path(path).is_file() else ds.sha256_file(path)


def read_texts(path: str | Path) -> list[tuple[str, str | None]]:
    """(text, lang or None) of every row with a non-empty text, from a dataset, Parquet or JSONL file."""
    path = Path(path)
    if ds.manifest_path(path).is_file():
        names = {f["name"] for f in ds.read_manifest(path).schema_}
        rows = ds.iter_rows(path, columns=[c for c in ("text", "lang") if c in names])
    elif path.suffix == ".parquet":
        columns = [c for c in ("text", "lang") if c in pq.read_schema(path).names]
        rows = (r for batch in pq.ParquetFile(path).iter_batches(columns=columns) for r in batch.to_pylist())
    elif path.is_file():
        rows = ds.iter_file_rows(path)
    else:
        raise FileNotFoundError(f"{path} is not a dataset (no manifest.json), a Parquet or a JSONL file")
    out = [
        (r["text"], r.get("lang") or None)
        for r in rows
        if isinstance(r.get("text"), str) and r["text"].strip()
    ]
    if not out:
        raise ValueError(f"{path} holds no row with a non-empty `text`")
    return out


def _examples(path: str | Path, positive: bool) -> list[Example]:
    texts = read_texts(path)
    missing = [t for t, lang in texts if lang is None]
    detected = iter(detect_languages(missing))
    return [Example(text=t, lang=lang or next(detected), positive=positive) for t, lang in texts]


def _text_hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def is_heldout(text: str, fraction: float) -> bool:
    return _text_hash(text) < fraction * 2**64


def balanced(examples: list[Example], seed: int) -> list[Example]:
    """Per language, the larger class sampled down (seeded) to the smaller one's count."""
    by_key: dict[tuple[str, bool], list[Example]] = {}
    for e in sorted(examples, key=lambda e: _text_hash(e.text)):
        by_key.setdefault((e.lang, e.positive), []).append(e)
    rng = random.Random(seed)
    out: list[Example] = []
    for lang in sorted({lang for lang, _ in by_key}):
        pos, neg = by_key.get((lang, True), []), by_key.get((lang, False), [])
        n = min(len(pos), len(neg))
        out += rng.sample(pos, n) + rng.sample(neg, n)
    return out


def training_key(config: TrainClassifierConfig, digests: dict[str, str]) -> str:
    """What names a model: its data, config and code (the same key gives the same model.bin)."""
    payload = json.dumps(
        {"config": config.model_dump(mode="json"), "data": digests, "code": code_version(__name__)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def precision_recall(scores: list[float], labels: list[bool], threshold: float) -> dict[str, float | int]:
    """Precision, recall, F1 and accuracy of ``score >= threshold`` as the positive prediction."""
    predicted = [s >= threshold for s in scores]
    tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    fn = sum(not p and y for p, y in zip(predicted, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
        "accuracy": round(
            sum(p == y for p, y in zip(predicted, labels, strict=True)) / max(len(labels), 1), 4
        ),
        "positives": sum(labels),
        "negatives": len(labels) - sum(labels),
    }


def evaluate(
    model: fasttext.FastText._FastText, examples: list[Example], config: TrainClassifierConfig
) -> dict[str, Any]:
    """Held-out P/R overall and per language (languages with both classes)."""
    lines = [model_input(e.text, e.lang, config.language_aware, config.max_chars) for e in examples]
    scores = positive_scores(model, lines, config.positive_label)
    scored = [(s, e) for s, e in zip(scores, examples, strict=True) if s is not None]
    out: dict[str, Any] = precision_recall(
        [s for s, _ in scored], [e.positive for _, e in scored], config.threshold
    )
    out["threshold"] = config.threshold
    per_language = {}
    for lang in sorted({e.lang for _, e in scored}):
        pairs = [(s, e.positive) for s, e in scored if e.lang == lang]
        if any(y for _, y in pairs) and not all(y for _, y in pairs):
            per_language[lang] = precision_recall(
                [s for s, _ in pairs], [y for _, y in pairs], config.threshold
            )
    out["by_language"] = per_language
    return out


def train(
    positive: str | Path, negative: str | Path, output_dir: str | Path, config: TrainClassifierConfig
) -> dict[str, Any]:
    """Train a classifier into ``output_dir`` (model.bin + manifest.json); returns the manifest.

    A directory whose manifest already has this key (same data, config, code) is reused as it is.
    """
    output_dir = Path(output_dir)
    digests = {"positive": data_digest(positive), "negative": data_digest(negative)}
    key = training_key(config, digests)
    existing = output_dir / MODEL_MANIFEST
    if existing.is_file():
        manifest = json.loads(existing.read_text(encoding="utf-8"))
        model_file = output_dir / manifest["model_file"]
        if (
            manifest.get("key") == key
            and model_file.is_file()
            and ds.sha256_file(model_file) == manifest["model_sha256"]
        ):
            return manifest

    examples = {"positive": _examples(positive, True), "negative": _examples(negative, False)}
    train_set = [
        e for part in examples.values() for e in part if not is_heldout(e.text, config.heldout_fraction)
    ]
    heldout = [e for part in examples.values() for e in part if is_heldout(e.text, config.heldout_fraction)]
    if config.balance:
        train_set = balanced(train_set, config.seed)
    train_set.sort(key=lambda e: _text_hash(e.text))
    random.Random(config.seed).shuffle(train_set)
    if not any(e.positive for e in train_set) or all(e.positive for e in train_set):
        raise ValueError(
            "training needs positive and negative examples (of a shared language when balance is on)"
        )

    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, atomic_path(output_dir / MODEL_FILE) as tmp_model:
        lines = Path(tmp) / "train.txt"
        lines.write_text(
            "".join(
                f"{config.positive_label if e.positive else config.negative_label} "
                f"{model_input(e.text, e.lang, config.language_aware, config.max_chars)}\n"
                for e in train_set
            ),
            encoding="utf-8",
        )
        fit(lines, tmp_model, config)
    model = fasttext.load_model(str(output_dir / MODEL_FILE))
    counts = Counter((e.positive, e.lang) for e in train_set)
    manifest = {
        "kind": "fasttext-classifier",
        "name": config.name,
        "positive_label": config.positive_label,
        "negative_label": config.negative_label,
        "model_file": MODEL_FILE,
        "model_sha256": ds.sha256_file(output_dir / MODEL_FILE),
        "model_bytes": (output_dir / MODEL_FILE).stat().st_size,
        "input": {"language_aware": config.language_aware, "max_chars": config.max_chars},
        "training_data": {
            side: {
                "path": str(Path(path).resolve()),
                "digest": digests[side],
                "rows": len(examples[side]),
                "train": sum(n for (pos, _), n in counts.items() if pos == (side == "positive")),
                "heldout": sum(1 for e in heldout if e.positive == (side == "positive")),
            }
            for side, path in (("positive", positive), ("negative", negative))
        },
        "train_languages": {
            lang: {"positive": counts[(True, lang)], "negative": counts[(False, lang)]}
            for lang in sorted({lang for _, lang in counts})
        },
        "heldout": evaluate(model, heldout, config),
        "config": config.model_dump(mode="json"),
        "code_version": code_version(__name__),
        "fasttext": "fasttext-numpy2 " + _fasttext_version(),
        "key": key,
    }
    atomic_write_json(existing, manifest)  # last: the directory is a model from now on
    return manifest


# fastText's training is reproducible only as the first one of a process: later trainings in the
# same process gave other weights or "Encountered NaN" (measured with fasttext-numpy2 0.10.4, same
# file, thread=1, seed 0). So each training runs in a fresh interpreter.
_FIT = "import fasttext, json, sys; a = json.loads(sys.argv[1]); fasttext.train_supervised(**a['args']).save_model(a['out'])"


def fit(lines: Path, model_path: Path, config: TrainClassifierConfig) -> None:
    """Train on the labelled ``lines`` file into ``model_path``, in a child process (see above)."""
    args = {
        "input": str(lines),
        "thread": 1,  # one thread: the same seed gives the same model, bit for bit
        "seed": config.seed,
        "epoch": config.epoch,
        "lr": config.lr,
        "dim": config.dim,
        "wordNgrams": config.word_ngrams,
        "minCount": config.min_count,
        "bucket": config.bucket,
        "verbose": 0,
    }
    done = subprocess.run(
        [sys.executable, "-c", _FIT, json.dumps({"args": args, "out": str(model_path)})],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        hint = " (training diverged: lower lr or epoch)" if "NaN" in error else ""
        raise RuntimeError(f"fastText training failed: {error}{hint}")


def _fasttext_version() -> str:
    from importlib.metadata import version

    return version("fasttext-numpy2")


def log_to_mlflow(uri: str, experiment: str, output_dir: str | Path, manifest: dict[str, Any]) -> str:
    """One MLflow run per trained model: config as params, held-out P/R as metrics, the training
    data as dataset inputs (contexts "positive"/"negative", digests as the stages log them), the
    model file and its manifest as artifacts. Returns the run id."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from model.tracking import ensure_experiment, log_batch, metric_name
    from tasks import tracking

    client = MlflowClient(uri)
    tags = {
        **tracking.code_tags(),
        "classifier.name": manifest["name"],
        "classifier.model_sha256": manifest["model_sha256"],
    }
    run_id = client.create_run(
        ensure_experiment(client, experiment),
        run_name=f"{manifest['name']}-{manifest['model_sha256'][:12]}",
        tags=tags,
    ).info.run_id
    heldout = manifest["heldout"]
    metrics = {f"heldout/{k}": float(heldout[k]) for k in ("precision", "recall", "f1", "accuracy")}
    for lang, row in heldout["by_language"].items():
        metrics.update({metric_name("heldout", k, lang): float(row[k]) for k in ("precision", "recall")})
    log_batch(client, run_id, metrics=metrics, params=tracking.flat_params(manifest["config"]))
    inputs = []
    for side, data in manifest["training_data"].items():
        if ds.manifest_path(data["path"]).is_file():
            dataset = tracking.dataset_input(
                data["path"], f"classifier/{manifest['name']}/{side}"
            )._to_mlflow_entity()
        else:
            dataset = Dataset(
                name=f"classifier/{manifest['name']}/{side}",
                digest=data["digest"][:32],
                source_type="local",
                source=json.dumps({"uri": data["path"]}),
            )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, side)]))
    client.log_inputs(run_id, datasets=inputs)
    output_dir = Path(output_dir)
    client.log_artifact(run_id, str(output_dir / manifest["model_file"]), "model")
    client.log_artifact(run_id, str(output_dir / MODEL_MANIFEST), "model")
    client.set_terminated(run_id)
    return run_id
