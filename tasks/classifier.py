"""Classifier stage: fastText classifiers score every document; per-language thresholds filter.

Each configured model (``ClassifierModel``: quality, toxicity, any label name) adds a column
``<name>_score``, the model's probability of its positive label. A document whose score falls on
the wrong side of its language's threshold is dropped with the rule ``<name>_low_score`` (or
``<name>_high_score`` for a model whose high scores are dropped, e.g. toxicity), its language,
score and threshold in the reject record; drops per language are counted in the stats.

A model is a directory written by ``pretrain classifier train`` (``tasks/train_classifier.py``:
``model.bin`` + ``manifest.json`` naming its label, input settings, training-data digests and
held-out precision/recall), or a bare fastText file of your own. The config holds the model file's
sha256 (filled in from the file when not given): the stage's cache key changes with the model,
and a worker loading other bytes stops.

Input, the same in training and scoring (``model_input``): the first ``max_chars`` characters,
lowercased, whitespace collapsed to single spaces (fastText's predict() rejects newlines), after a
language token ``__lang_<lang>`` when the model is language-aware: one multilingual model learns
per-language word features and a per-language prior; the thresholds per language then set how much
of each language passes. Documents without a ``lang`` column (a plain file) get lid.176's label.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import fasttext
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator, model_validator

from tasks import dataset as ds
from tasks import langid
from tasks.stage import Document, DocumentStage, StageStats

MODEL_FILE = "model.bin"
MODEL_MANIFEST = "manifest.json"
LABEL_PREFIX = "__label__"
UNKNOWN_LANGUAGE = "unk"
DEFAULT_MAX_CHARS = 10_000


class ClassifierModel(BaseModel):
    """One fastText classifier and its thresholds."""

    path: Path = Field(
        description="Model directory written by `pretrain classifier train` (model.bin + manifest.json), "
        "or a fastText .bin/.ftz file. Every worker must see this path."
    )
    sha256: str | None = Field(
        default=None,
        description="sha256 of the model file; filled in from the file when empty (part of the cache "
        "key: another model redoes the stage). A file with other bytes stops the stage.",
    )
    name: str | None = Field(
        default=None,
        description="Label name: the column `<name>_score` and the rules `<name>_low_score`/"
        "`<name>_high_score`. Default: the model manifest's.",
    )
    positive_label: str | None = Field(
        default=None, description="fastText label scored (default: the manifest's, else __label__<name>)."
    )
    language_aware: bool | None = Field(
        default=None, description="Prefix `__lang_<lang>` to the input (default: the manifest's, else no)."
    )
    max_chars: int | None = Field(
        default=None, ge=1, description="Characters scored per document (default: the manifest's)."
    )
    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Score threshold for languages not in `thresholds`."
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-language thresholds (lid.176 codes), replacing `threshold`."
    )
    drop: Literal["below", "above"] = Field(
        default="below",
        description="Drop documents scoring below the threshold (quality) or above it (e.g. toxicity).",
    )

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for lang, value in thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds[{lang!r}] = {value} is not between 0 and 1")
        return dict(sorted(thresholds.items()))

    @model_validator(mode="after")
    def _from_model_files(self) -> ClassifierModel:
        """Fill what the config leaves empty from the model's manifest and file."""
        file, manifest = model_files(self.path)
        if self.sha256 is None:
            self.sha256 = ds.sha256_file(file)
        self.name = self.name or manifest.get("name")
        if not self.name:
            raise ValueError(f"{self.path}: a model without manifest needs a `name`")
        self.positive_label = (
            self.positive_label or manifest.get("positive_label") or f"{LABEL_PREFIX}{self.name}"
        )
        settings = manifest.get("input", {})
        if self.language_aware is None:
            self.language_aware = bool(settings.get("language_aware", False))
        if self.max_chars is None:
            self.max_chars = settings.get("max_chars", DEFAULT_MAX_CHARS)
        return self

    def threshold_for(self, lang: str) -> float:
        return self.thresholds.get(lang, self.threshold)

    @property
    def column(self) -> str:
        return f"{self.name}_score"


class ClassifierConfig(BaseModel):
    """fastText classifiers run on every document (opt-in: the data refresh's `classifier` section)."""

    models: list[ClassifierModel] = Field(
        min_length=1, description="The classifiers, each scoring and filtering in turn."
    )
    batch_size: int = Field(default=512, ge=1, description="Documents per fastText call (speed only).")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ClassifierModel]) -> list[ClassifierModel]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"classifier names must be distinct (their score columns): {names}")
        return models


def load_model(path: str, sha256: str) -> fasttext.FastText._FastText:
    """A classifier model, loaded once per process, after checking its sha256."""
    fix = "the model changed since the config was written (remove sha256 to take the new one)"
    return langid.load_fasttext(path, sha256, "classifier model", fix)


def model_files(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The model file and the manifest beside it ({} for a bare fastText file)."""
    path = Path(path)
    if path.is_dir():
        manifest = path / MODEL_MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"classifier model directory {path} has no {MODEL_MANIFEST}")
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return path / data.get("model_file", MODEL_FILE), data
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier model not found at {path}: train one with `pretrain classifier train`"
        )
    return path, {}


def model_input(text: str, lang: str | None, language_aware: bool, max_chars: int | None) -> str:
    """The one line fastText sees for ``text``, in training and in scoring alike."""
    words = " ".join((text[:max_chars] if max_chars else text).lower().split())
    return f"__lang_{lang or UNKNOWN_LANGUAGE} {words}" if language_aware else words


def detect_languages(texts: list[str]) -> list[str]:
    """lid.176's top language per text (``unk`` where it has no letter): for inputs without ``lang``."""
    config = langid.LangIdConfig()
    model = langid.load_model(str(config.model_path), config.model_sha256)
    lines = [langid.prediction_input(t, config.max_chars) for t in texts]
    present = [line for line in lines if line]
    labels = iter(model.predict(present, k=1)[0] if present else [])
    return [next(labels)[0].removeprefix(LABEL_PREFIX) if line else UNKNOWN_LANGUAGE for line in lines]


def positive_scores(model: fasttext.FastText._FastText, lines: list[str], label: str) -> list[float | None]:
    """P(``label``) per line; None for a line fastText cannot take (invalid Unicode)."""
    if not lines:
        return []
    try:
        labels, probabilities = model.predict(lines, k=-1, threshold=0.0)
    except (TypeError, UnicodeError):
        # One bad line fails the whole call: find it line by line.
        if len(lines) == 1:
            return [None]
        return [score for line in lines for score in positive_scores(model, [line], label)]
    return [
        min(float(dict(zip(names, probs, strict=True)).get(label, 0.0)), 1.0)
        for names, probs in zip(labels, probabilities, strict=True)
    ]


class ClassifierStage(DocumentStage):
    name = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__(config)
        self.config: ClassifierConfig

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        schema = input_schema
        for spec in self.config.models:
            field = pa.field(spec.column, pa.float64())
            index = schema.get_field_index(field.name)
            schema = schema.set(index, field) if index >= 0 else schema.append(field)
        return schema

    def process(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        models = [
            (
                spec,
                load_model(str(model_files(spec.path)[0]), spec.sha256),
            )
            for spec in self.config.models
        ]
        docs = iter(docs)
        while batch := list(itertools.islice(docs, self.config.batch_size)):
            yield from self._process_batch(models, batch, stats)

    def _process_batch(
        self,
        models: list[tuple[ClassifierModel, fasttext.FastText._FastText]],
        batch: list[Document],
        stats: StageStats,
    ) -> Iterator[Document]:
        scorable: list[Document] = []
        for doc in batch:
            text = doc.get("text")
            if not isinstance(text, str):
                stats.quarantine("text_missing", f"text is {type(text).__name__}, not a string", doc=doc)
            elif not text.strip():
                stats.drop(doc, "empty_text", f"{len(text)} characters, all whitespace")
            else:
                scorable.append(doc)
        missing = [i for i, doc in enumerate(scorable) if not doc.get("lang")]
        detected = dict(zip(missing, detect_languages([scorable[i]["text"] for i in missing]), strict=True))
        langs = [detected.get(i) or doc["lang"] for i, doc in enumerate(scorable)]
        scores = [
            positive_scores(
                model,
                [
                    model_input(d["text"], lang, spec.language_aware, spec.max_chars)
                    for d, lang in zip(scorable, langs, strict=True)
                ],
                spec.positive_label,
            )
            for spec, model in models
        ]
        for i, (doc, lang) in enumerate(zip(scorable, langs, strict=True)):
            doc_scores = [s[i] for s in scores]
            if None in doc_scores:
                # The reject record keeps a repaired copy: Parquet cannot store the bad text either.
                readable = {**doc, "text": doc["text"].encode("utf-8", "replace").decode("utf-8")}
                stats.quarantine(
                    "text_invalid_unicode", "text is not valid Unicode (lone surrogate)", doc=readable
                )
                continue
            if (rejected := _rejected(models, doc_scores, lang)) is not None:
                spec, score = rejected
                side = "<" if spec.drop == "below" else ">"
                rule = f"{spec.name}_{'low' if spec.drop == 'below' else 'high'}_score"
                stats.drop(
                    doc, rule, f"lang={lang} score={score:.4f} {side} threshold {spec.threshold_for(lang)}"
                )
                _count(stats, f"{rule}_lang_{lang}")
                continue
            _count(stats, f"kept_lang_{lang}")
            yield {**doc, **{spec.column: s for (spec, _), s in zip(models, doc_scores, strict=True)}}


def _rejected(
    models: list[tuple[ClassifierModel, Any]], scores: list[float], lang: str
) -> tuple[ClassifierModel, float] | None:
    """The first model whose threshold the document fails, with its score; None if it passes all."""
    for (spec, _), score in zip(models, scores, strict=True):
        threshold = spec.threshold_for(lang)
        if (score < threshold) if spec.drop == "below" else (score > threshold):
            return spec, score
    return None


def _count(stats: StageStats, key: str) -> None:
    stats.extra[key] = stats.extra.get(key, 0) + 1
