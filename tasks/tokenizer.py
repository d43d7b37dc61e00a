"""Train the byte-level BPE tokenizer on a language/source mixture of the corpus and report its fertility.

Input: datasets per the contract with ``text``, ``lang`` (from language ID) and ``url``; the source of a
document is its URL host. A sample is drawn deterministically: every document gets a hash of
``(seed, doc_id)``; a fixed fraction is held out for evaluation, and the training sample is a weighted
sample without replacement (Efraimidis-Spirakis keys ``log(u) / weight``, largest first) until
``sample_chars`` characters, so a language or source with weight 2 is sampled about twice as much as
its natural share and weight 0 leaves it out.

Output: a directory with ``tokenizer-<sha256[:16]>.json`` (byte-level BPE, NFC, special tokens first,
padded with reserved tokens to a multiple of ``pad_to_multiple`` so the vocabulary is the model's
embedding size) and a manifest whose ``extra.fertility`` has per language bytes per token and tokens
per word on held-out documents; a language much worse than the median is flagged.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, Field
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tasks import dataset as ds
from tasks import stage as st
from tasks import text as text_words
from tasks.atomic import atomic_write_text

log = logging.getLogger(__name__)

STAGE = "tokenizer"
EOT = "<|endoftext|>"
PAD = "<|pad|>"
UNKNOWN = "und"


def reserved_token(index: int) -> str:
    return f"<|reserved_{index}|>"


class Mixture(BaseModel):
    """Sampling weights per language and per source (URL host): 1 keeps the natural share, 0 leaves out."""

    lang_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per language code (as in the `lang` column, e.g. 'en', 'zh'); "
        "languages not listed get default_lang_weight.",
    )
    source_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per source = URL host (e.g. 'docs.python.example'); hosts not listed get "
        "default_source_weight.",
    )
    default_lang_weight: float = Field(1.0, ge=0, description="Weight of languages not in lang_weights.")
    default_source_weight: float = Field(1.0, ge=0, description="Weight of sources not in source_weights.")

    def weights(self, langs: pa.Array, sources: pa.Array) -> np.ndarray:
        """Per-document weight = language weight x source weight."""
        return _lookup(langs, self.lang_weights, self.default_lang_weight) * _lookup(
            sources, self.source_weights, self.default_source_weight
        )


def _lookup(values: pa.Array, table: dict[str, float], default: float) -> np.ndarray:
    out = np.full(len(values), default, dtype=np.float64)
    for key, weight in table.items():
        if weight < 0:
            raise ValueError(f"mixture weight for {key!r} is negative: {weight}")
        out[pc.equal(values, key).to_numpy(zero_copy_only=False)] = weight
    return out


class TokenizerConfig(BaseModel):
    vocab_size: int = Field(
        32_000, ge=300, description="BPE vocabulary size to train (including the special tokens)."
    )
    pad_to_multiple: int = Field(
        128,
        ge=1,
        description="Pad the vocabulary with reserved tokens to a multiple of this (the model's embedding size).",
    )
    reserved_tokens: int = Field(
        16, ge=0, description="Reserved special-token slots after end-of-text and padding, for later use."
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")
    sample_chars: int = Field(
        200_000_000, ge=1, description="Characters of text in the training sample (drawn by the mixture)."
    )
    mixture: Mixture = Field(default_factory=Mixture, description="Language/source sampling weights.")
    heldout_fraction: float = Field(
        0.02, ge=0, lt=1, description="Fraction of documents held out of training for the fertility report."
    )
    eval_docs_per_lang: int = Field(
        200, ge=1, description="At most this many held-out documents per language are evaluated."
    )
    fertility_flag_ratio: float = Field(
        2.0, gt=1, description="Flag a language whose tokens per word exceed this times the median."
    )
    seed: int = Field(0, description="Seed of the sample and held-out selection.")


# ---------------------------------------------------------------------------------------------
# Document metadata shared with tasks/pack.py


def doc_units(doc_ids: Iterable[str], seed: int, salt: str) -> np.ndarray:
    """A deterministic uniform number in (0, 1) per document, independent for each ``salt``."""
    prefix = f"{seed}\0{salt}\0"
    hashes = np.fromiter(
        (xxhash.xxh64_intdigest((prefix + d).encode("utf-8")) for d in doc_ids), dtype=np.uint64
    )
    return ((hashes >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def url_hosts(urls: pa.Array) -> pa.Array:
    """Lower-cased URL host per document (the "source"); ``und`` where there is no URL."""
    match = pc.extract_regex(
        pc.fill_null(urls, ""), r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>[^:/?#]*)"
    )
    hosts = pc.utf8_lower(pc.struct_field(match, [0]))
    return pc.if_else(pc.or_kleene(pc.is_null(hosts), pc.equal(hosts, "")), UNKNOWN, hosts)


# Lineage columns carried from the input when present (null otherwise).
LINEAGE_COLUMNS = ["url", "warc_record_id", "source_file", "source_offset"]
META_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("warc_record_id", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("source_offset", pa.int64()),
        pa.field("lang", pa.string()),
        pa.field("source", pa.string()),
        pa.field("chars", pa.int64()),  # -1: the text is null (broken input)
        pa.field("input", pa.int32()),
        pa.field("shard", pa.int32()),
        pa.field("row", pa.int64()),
    ]
)


def read_document_meta(input_dirs: list[str | Path]) -> pa.Table:
    """One row per input document (META_SCHEMA): ids, lineage, language, source, length, location.

    (``input``, ``shard``, ``row``) locate the document: the input dataset, its shard, the row in it.
    """
    tables = [META_SCHEMA.empty_table()]
    for i, input_dir in enumerate(input_dirs):
        for j, path in enumerate(ds.shard_paths(input_dir)):
            file = pq.ParquetFile(path)
            names = set(file.schema_arrow.names)
            if "text" not in names or "doc_id" not in names:
                raise ValueError(f"{path}: needs `doc_id` and `text` columns, has {sorted(names)}")
            wanted = ["doc_id", "text", "lang", *LINEAGE_COLUMNS]
            table = file.read(columns=[c for c in wanted if c in names])
            n = table.num_rows

            def column(name: str, table=table, names=names, n=n) -> pa.Array:
                kind = META_SCHEMA.field(name).type
                return table.column(name).cast(kind) if name in names else pa.nulls(n, kind)

            columns = {name: column(name) for name in ["doc_id", *LINEAGE_COLUMNS]}
            columns["lang"] = pc.fill_null(column("lang"), UNKNOWN)
            columns["source"] = url_hosts(columns["url"])
            columns["chars"] = pc.fill_null(pc.utf8_length(table.column("text")).cast(pa.int64()), -1)
            columns["input"] = pa.array(np.full(n, i, dtype=np.int32))
            columns["shard"] = pa.array(np.full(n, j, dtype=np.int32))
            columns["row"] = pa.array(np.arange(n, dtype=np.int64))
            tables.append(pa.table(columns).select(META_SCHEMA.names).cast(META_SCHEMA))
    meta = pa.concat_tables(tables).combine_chunks()
    duplicates = meta.num_rows - pc.count_distinct(meta.column("doc_id")).as_py()
    if duplicates:
        raise ValueError(
            f"{duplicates} duplicate doc_id values across the inputs: document ids must be unique"
        )
    return meta


def group_by_shard(meta: pa.Table, selected: np.ndarray) -> list[tuple[tuple[int, int], np.ndarray]]:
    """((input, shard), selected meta rows in it, ascending) per input shard holding any."""
    chosen = np.flatnonzero(selected)
    if not len(chosen):
        return []
    keys = (
        meta.column("input").to_numpy()[chosen].astype(np.int64) << 32
        | meta.column("shard").to_numpy()[chosen]
    )
    order = np.argsort(keys, kind="stable")
    unique, starts = np.unique(keys[order], return_index=True)
    groups = np.split(chosen[order], starts[1:])
    return [((int(k >> 32), int(k & 0xFFFFFFFF)), g) for k, g in zip(unique.tolist(), groups, strict=True)]


def iter_texts(
    input_dirs: list[str | Path], meta: pa.Table, selected: np.ndarray
) -> Iterator[tuple[int, str]]:
    """(meta row, text) of the selected documents, reading each input shard once, in input order."""
    rows = meta.column("row").to_numpy()
    for (i, j), here in group_by_shard(meta, selected):
        path = ds.shard_paths(input_dirs[i])[j]
        texts = pq.read_table(path, columns=["text"]).column("text").take(pa.array(rows[here]))
        yield from zip(here.tolist(), texts.to_pylist(), strict=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file; special-token strings in document text are encoded as plain text.

    Without ``encode_special_tokens`` a page containing "<|endoftext|>" would inject a real document
    boundary; the flag is not stored in tokenizer.json, so it is set on every load.
    """
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize_text(text: str) -> str:
    """Replace lone surrogates (possible in a Python str, not in UTF-8 data) by U+FFFD, one for one.

    One for one keeps character offsets valid for lineage spans.
    """
    return _SURROGATE.sub("\ufffd", text)


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text (parallel ``encode_batch``); lone surrogates become U+FFFD (see sanitize_text)."""
    try:
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    except TypeError:  # tokenizers rejects str that is not valid Unicode scalar values
        encodings = tokenizer.encode_batch([sanitize_text(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encodings]


def new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.encode_special_tokens = True
    return tokenizer


def tokenizer_path(tokenizer_dir: str | Path) -> Path:
    """The tokenizer file a tokenizer directory's manifest names."""
    manifest = ds.read_manifest(tokenizer_dir)
    if manifest.stage != STAGE:
        raise ValueError(f"{tokenizer_dir} holds a {manifest.stage!r} dataset, not a tokenizer")
    return Path(tokenizer_dir) / manifest.extra["tokenizer_file"]


# ---------------------------------------------------------------------------------------------
# Fertility


def fertility(
    tokenizer: Tokenizer, texts_by_lang: dict[str, list[str]], flag_ratio: float
) -> list[dict[str, Any]]:
    """Per language: bytes per token and tokens per word; ``flagged`` when fertility > ratio x median.

    Words as tasks.text counts them (whitespace tokens; Chinese/Japanese cut into short script runs).
    """
    rows = []
    for lang in sorted(texts_by_lang):
        texts = texts_by_lang[lang]
        tokens = sum(len(ids) for ids in encode_texts(tokenizer, texts))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        words = sum(len(text_words.split_words(t)) for t in texts)
        rows.append(
            {
                "lang": lang,
                "docs": len(texts),
                "bytes": n_bytes,
                "words": words,
                "tokens": tokens,
                "bytes_per_token": round(n_bytes / tokens, 4) if tokens else None,
                "tokens_per_word": round(tokens / words, 4) if words else None,
            }
        )
    values = [r["tokens_per_word"] for r in rows if r["tokens_per_word"] is not None]
    median = float(np.median(values)) if values else 0.0
    for row in rows:
        row["flagged"] = row["tokens_per_word"] is not None and row["tokens_per_word"] > flag_ratio * median
    return rows


def fertility_rows(manifest: ds.Manifest) -> list[dict[str, Any]]:
    """Rows for a table artifact: one per evaluated language."""
    return manifest.extra["fertility"]


# ---------------------------------------------------------------------------------------------
# Training


def select_sample(meta: pa.Table, config: TokenizerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training mask, held-out mask) over the rows of ``meta``."""
    doc_ids = meta.column("doc_id").to_pylist()
    weights = config.mixture.weights(meta.column("lang"), meta.column("source"))
    usable = (meta.column("chars").to_numpy() >= 0) & (weights > 0)
    heldout = doc_units(doc_ids, config.seed, "heldout") < config.heldout_fraction
    candidates = ~heldout & usable
    keys = np.full(len(doc_ids), -np.inf)
    keys[candidates] = np.log(doc_units(doc_ids, config.seed, "sample")[candidates]) / weights[candidates]
    order = np.argsort(-keys, kind="stable")
    order = order[candidates[order]]
    chars = meta.column("chars").to_numpy()[order]
    # Take whole documents while the running total is below the budget (the last one crosses it).
    take = np.searchsorted(np.cumsum(chars), config.sample_chars, side="left") + 1
    train = np.zeros(len(doc_ids), dtype=bool)
    train[order[:take]] = True
    # Evaluate only languages that are kept in the mixture.
    return train, heldout & usable


def _lang_counts(meta: pa.Table, mask: np.ndarray) -> dict[str, dict[str, int]]:
    langs = np.asarray(meta.column("lang").to_pylist(), dtype=object)[mask]
    chars = meta.column("chars").to_numpy()[mask]
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "chars": 0})
    for lang, n in zip(langs.tolist(), chars.tolist(), strict=True):
        out[lang]["docs"] += 1
        out[lang]["chars"] += n
    return dict(sorted(out.items()))


def train_tokenizer(
    input_dirs: list[str | Path], output_dir: str | Path, config: TokenizerConfig
) -> ds.Manifest:
    """Train the tokenizer on a mixture sample of ``input_dirs``, evaluate it, write it and its manifest."""
    output_dir = Path(output_dir)
    input_dirs = [Path(d) for d in input_dirs]
    ds.manifest_path(output_dir).unlink(missing_ok=True)  # a re-run: no dataset until the new manifest
    meta = read_document_meta(input_dirs)
    train_mask, heldout_mask = select_sample(meta, config)
    if not train_mask.any():
        raise ValueError("the training sample is empty: no input documents, or every mixture weight is 0")

    special = [EOT, PAD] + [reserved_token(i) for i in range(config.reserved_tokens)]
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer = new_tokenizer()
    texts = (text for _, text in iter_texts(input_dirs, meta, train_mask))
    tokenizer.train_from_iterator(texts, trainer, length=int(train_mask.sum()))
    trained_size = tokenizer.get_vocab_size()
    padded_size = math.ceil(trained_size / config.pad_to_multiple) * config.pad_to_multiple
    padding = [
        reserved_token(i)
        for i in range(config.reserved_tokens, config.reserved_tokens + padded_size - trained_size)
    ]
    tokenizer.add_special_tokens(padding)
    assert tokenizer.get_vocab_size() == padded_size, (tokenizer.get_vocab_size(), padded_size)

    # Held-out documents per language, lowest hash first (deterministic, bounded).
    heldout_rows = np.flatnonzero(heldout_mask)
    eval_order = heldout_rows[
        np.argsort(doc_units(meta.column("doc_id").take(heldout_rows).to_pylist(), config.seed, "eval"))
    ]
    langs = meta.column("lang").to_pylist()
    eval_mask = np.zeros(meta.num_rows, dtype=bool)
    per_lang: dict[str, int] = defaultdict(int)
    for row in eval_order.tolist():
        if per_lang[langs[row]] < config.eval_docs_per_lang:
            per_lang[langs[row]] += 1
            eval_mask[row] = True
    texts_by_lang: dict[str, list[str]] = defaultdict(list)
    for row, text in iter_texts(input_dirs, meta, eval_mask):
        texts_by_lang[langs[row]].append(text)
    fertility_table = fertility(tokenizer, texts_by_lang, config.fertility_flag_ratio)
    sample_by_lang = _lang_counts(meta, train_mask)
    for row in fertility_table:  # beside each language's fertility, how much of it the BPE saw
        sample = sample_by_lang.get(row["lang"], {"docs": 0, "chars": 0})
        row["train_docs"], row["train_chars"] = sample["docs"], sample["chars"]
    flagged = [r["lang"] for r in fertility_table if r["flagged"]]
    if flagged:
        log.warning("tokenizer fertility > %.1fx median for %s", config.fertility_flag_ratio, flagged)

    body = tokenizer.to_str(pretty=True)
    digest = ds.sha256_bytes(body.encode("utf-8"))
    name = f"tokenizer-{digest[:16]}.json"
    atomic_write_text(output_dir / name, body)
    manifest = ds.Manifest(
        stage=STAGE,
        config=config.model_dump(mode="json"),
        code_version=st.code_version(sys.modules[__name__]),
        inputs=[ds.input_ref(d) for d in input_dirs],
        stats={
            "docs_in": meta.num_rows,
            "train_docs": int(train_mask.sum()),
            "train_chars": int(meta.column("chars").to_numpy()[train_mask].sum()),
            "heldout_docs": int(heldout_mask.sum()),
            "null_text_docs": int((meta.column("chars").to_numpy() < 0).sum()),
            "train_sample_by_lang": sample_by_lang,
        },
        extra={
            "tokenizer_file": name,
            "tokenizer_sha256": digest,
            "vocab_size": padded_size,
            "trained_vocab_size": trained_size,
            "special_tokens": {t: tokenizer.token_to_id(t) for t in special + padding},
            "eot_id": tokenizer.token_to_id(EOT),
            "pad_id": tokenizer.token_to_id(PAD),
            "fertility": fertility_table,
            "flagged_languages": flagged,
        },
    )
    ds.write_manifest(output_dir, manifest)
    return manifest
