"""Language identification with fastText lid.176: tag every document with ``lang`` and ``lang_score``.

Documents whose language is not wanted, or whose top language is not confident enough, are dropped
with their language and score in the reject record. The model is loaded once per process (cached
by path and checksum); the stage itself holds only its config, so it pickles cheaply into Prefect
tasks and workers load the model from disk.

Predictions are made on a bounded sample of each document: up to ``max_chars`` characters from the
first letter on, whitespace collapsed (predict() rejects newlines). On lid-dev, 4000 characters lose
no accuracy against whole documents, and on page-sized documents (26k characters) the stage is 5.7x
faster than predicting the whole text (benchmarks/RESULTS.md, "Language ID"). Documents go to
fastText in batches (one call for many lines); fastText's own work dominates, so that saves little.
Other normalizations were measured and are not done: lowercasing and NFKC change top-1 accuracy by
1 of 2588 passages; stripping digits and punctuation (with lowercasing) raises scores, so more
correct passages pass min_score, but also let 3 more wrong ones through (two Danish as Norwegian);
the per-language thresholds below give the same gain (99.1% of 200+ passages) with none.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

import fasttext
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator, model_validator

from tasks import dataset as ds
from tasks.stage import Document, DocumentStage, StageStats

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / "lid.176.ftz"
DEFAULT_MODEL_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"
MODEL_PATH_ENV = "PRETRAIN_LID_MODEL"

# Languages with a large, useful share of Common Crawl; all are lid.176 labels.
DEFAULT_KEEP_LANGUAGES = [
    "en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk", "cs", "sk", "sv", "da", "no", "nn", "fi",
    "hu", "ro", "bg", "hr", "sr", "sl", "lt", "lv", "et", "el", "tr", "ca", "gl", "eu", "vi", "id", "ms",
    "ja", "zh", "ko", "ar", "fa", "he", "hi", "bn", "th",
]  # fmt: skip

# lid.176 shares probability between close relatives (da/no, id/ms): correct Danish and Indonesian
# passages often score 0.5-0.65. On lid-dev these thresholds keep 99.1% instead of 98.3% of correctly
# identified 200+ character passages, with no more wrong languages kept.
DEFAULT_MIN_SCORE_BY_LANGUAGE = {"da": 0.5, "id": 0.5}

_LABEL_PREFIX = "__label__"
_LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter (word character that is not a digit or _)
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


def default_model_path() -> Path:
    return Path(os.environ.get(MODEL_PATH_ENV) or DEFAULT_MODEL_PATH)


class LangIdConfig(BaseModel):
    model_path: Path = Field(
        default_factory=default_model_path,
        description=(
            "fastText language-ID model file: lid.176.ftz (compressed, bundled in models/) or lid.176.bin "
            f"(larger, slightly more accurate). Default: ${MODEL_PATH_ENV} if set, else the repo's "
            "models/lid.176.ftz. Every worker must see this path."
        ),
    )
    model_sha256: str | None = Field(
        default=None,
        description=(
            "Expected sha256 of the model file, checked when the model is loaded; a mismatch stops the "
            "stage. Left unset with the default model path, the bundled lid.176.ftz checksum is used. "
            "Empty = no check."
        ),
    )
    keep_languages: list[str] = Field(
        default_factory=lambda: list(DEFAULT_KEEP_LANGUAGES),
        description=(
            "lid.176 language codes (ISO 639-1 where there is one, e.g. en, de, zh, ja) of the documents "
            "to keep; documents in other languages are dropped (rule lang_not_kept). Empty = keep all."
        ),
    )
    min_score: float = Field(
        default=0.65,
        ge=0.0,
        le=1.0,
        description=(
            "Minimum fastText probability of the top language; below it a document is dropped "
            "(rule lang_low_score), whatever its language."
        ),
    )
    min_score_by_language: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_MIN_SCORE_BY_LANGUAGE),
        description=(
            "Per-language minimum probability, replacing min_score for documents predicted in that "
            "language (e.g. lower for Danish, which lid.176 confuses with Norwegian)."
        ),
    )
    max_chars: int | None = Field(
        default=4000,
        ge=1,
        description=(
            "Predict on at most this many characters of each document, from its first letter on. "
            "Bounds the cost of huge pages; 4000 loses no accuracy on lid-dev. Empty = whole document."
        ),
    )
    batch_size: int = Field(
        default=512, ge=1, description="Documents per fastText call (speed only; results do not change)."
    )

    @field_validator("keep_languages")
    @classmethod
    def _normalize_codes(cls, codes: list[str]) -> list[str]:
        return list(dict.fromkeys(_language_code(c) for c in codes))

    @field_validator("min_score_by_language")
    @classmethod
    def _check_thresholds(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for code, value in thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"min_score_by_language[{code!r}] = {value} is not between 0 and 1")
        return {_language_code(c): v for c, v in sorted(thresholds.items())}

    @field_validator("model_sha256")
    @classmethod
    def _normalize_sha256(cls, value: str | None) -> str | None:
        if not value:
            return None
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(f"model_sha256 {value!r} is not a sha256 hex digest (64 hex digits)")
        return value

    @model_validator(mode="after")
    def _default_checksum(self) -> LangIdConfig:
        if "model_sha256" not in self.model_fields_set and self.model_path.resolve() == DEFAULT_MODEL_PATH:
            self.model_sha256 = DEFAULT_MODEL_SHA256
        return self

    def threshold(self, lang: str) -> float:
        return self.min_score_by_language.get(lang, self.min_score)


def _language_code(code: str) -> str:
    code = code.strip().lower().removeprefix(_LABEL_PREFIX)
    if not _LANGUAGE_CODE.fullmatch(code):
        raise ValueError(f"{code!r} is not a lid.176 language code (2-3 lowercase letters, e.g. en, zh, als)")
    return code


@functools.cache
def load_fasttext(path: str, sha256: str | None, what: str, fix: str) -> fasttext.FastText._FastText:
    """A fastText model (``what``), loaded once per process, after checking its sha256 if one is
    given; a mismatch is one line ending with ``fix``."""
    if sha256 is not None and (actual := ds.sha256_file(path)) != sha256:
        raise ValueError(f"{what} {path} has sha256 {actual}, but the config expects {sha256}: {fix}")
    return fasttext.load_model(path)


def load_model(path: str, sha256: str | None = None) -> fasttext.FastText._FastText:
    """The language-ID model, checked against ``sha256`` if one is given."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"fastText language-ID model not found at {path}: run infra/setup.sh, or point "
            f"${MODEL_PATH_ENV} or the stage config's model_path at lid.176.ftz / lid.176.bin"
        )
    fix = "wrong or corrupt file (set model_sha256 to the file's checksum, or empty to skip the check)"
    return load_fasttext(path, sha256, "language-ID model", fix)


def model_languages(model: fasttext.FastText._FastText) -> set[str]:
    return {label.removeprefix(_LABEL_PREFIX) for label in model.get_labels()}


def prediction_input(text: str, max_chars: int | None) -> str | None:
    """The single line fastText sees for ``text``, or None if the text has no letter.

    Starts at the first letter (leading numbers and markup say nothing about the language), takes at
    most ``max_chars`` characters, and collapses all whitespace, newlines included, to single spaces
    (fastText's predict() rejects newlines).
    """
    first_letter = _LETTER.search(text)
    if first_letter is None:
        return None
    start = first_letter.start()
    sample = text[start : start + max_chars] if max_chars else text[start:]
    return " ".join(sample.split())


class LangIdStage(DocumentStage):
    name = "langid"
    output_fields: ClassVar[list[pa.Field]] = [
        pa.field("lang", pa.string()),
        pa.field("lang_score", pa.float64()),
    ]

    def __init__(self, config: LangIdConfig | None = None):
        super().__init__(config or LangIdConfig())
        self.config: LangIdConfig

    def model(self) -> fasttext.FastText._FastText:
        model = load_model(str(self.config.model_path), self.config.model_sha256)
        configured = set(self.config.keep_languages) | set(self.config.min_score_by_language)
        unknown = sorted(configured - model_languages(model))
        if unknown:
            # A typo such as "jp" or "cz" would otherwise silently drop a whole language.
            raise ValueError(f"language codes {unknown} are not labels of the model {self.config.model_path}")
        return model

    def process(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        model = self.model()
        keep = frozenset(self.config.keep_languages)
        docs = iter(docs)
        while batch := list(itertools.islice(docs, self.config.batch_size)):
            yield from self._process_batch(model, keep, batch, stats)

    def _process_batch(
        self,
        model: fasttext.FastText._FastText,
        keep: frozenset[str],
        batch: list[Document],
        stats: StageStats,
    ) -> Iterator[Document]:
        to_predict: list[Document] = []
        lines: list[str] = []
        for doc in batch:
            text = doc.get("text")
            if not isinstance(text, str):
                stats.quarantine("text_missing", f"text is {type(text).__name__}, not a string", doc=doc)
            elif not text or text.isspace():
                stats.drop(doc, "empty_text", f"{len(text)} characters, all whitespace")
            elif (line := prediction_input(text, self.config.max_chars)) is None:
                stats.drop(doc, "no_letters", f"{len(text)} characters, none of them a letter")
            else:
                to_predict.append(doc)
                lines.append(line)
        for doc, prediction in zip(to_predict, _predict(model, lines), strict=True):
            if prediction is None:
                # The reject record keeps a repaired copy: Parquet cannot store the bad text either.
                readable = {**doc, "text": doc["text"].encode("utf-8", "replace").decode("utf-8")}
                stats.quarantine(
                    "text_invalid_unicode", "text is not valid Unicode (lone surrogate)", doc=readable
                )
                continue
            lang, score = prediction
            threshold = self.config.threshold(lang)
            if score < threshold:
                stats.drop(doc, "lang_low_score", f"lang={lang} score={score:.3f} < min_score {threshold}")
            elif keep and lang not in keep:
                stats.drop(doc, "lang_not_kept", f"lang={lang} score={score:.3f}")
            else:
                key = f"kept_lang_{lang}"
                stats.extra[key] = stats.extra.get(key, 0) + 1
                yield {**doc, "lang": lang, "lang_score": score}


def _predict(model: fasttext.FastText._FastText, lines: list[str]) -> list[tuple[str, float] | None]:
    """Top language and probability per line; None for a line fastText cannot take (invalid Unicode)."""
    if not lines:
        return []
    try:
        labels, scores = model.predict(lines, k=1)
    except (TypeError, UnicodeError):
        # One bad line fails the whole call: find it line by line.
        if len(lines) == 1:
            return [None]
        return [prediction for line in lines for prediction in _predict(model, [line])]
    # The compressed model's probabilities can exceed 1 by rounding (1.00007).
    return [
        (label[0].removeprefix(_LABEL_PREFIX), min(float(score[0]), 1.0))
        for label, score in zip(labels, scores, strict=True)
    ]
