"""Tokenize documents and pack them into fixed-length training sequences, with lineage to the page.

Steps, all deterministic given the inputs and ``seed``:

1. Split by near-duplicate cluster (``split_units``): a document is in validation when the hash of its
   cluster, a uniform number in (0, 1), is below ``validation_fraction``. A fixed threshold on a
   stable unit: a validation document stays in validation when later refreshes add documents, the
   held-out share is ``validation_fraction`` whatever the shape of the slices, and near duplicates are
   never on both sides.
2. Tokenize every kept document, in parallel over input shards (``encode_batch`` inside each worker).
3. Apply the mixture to train documents: a weight ``w`` gives ``floor(w)`` copies plus one more with
   probability ``w - floor(w)`` (decided by hash), so 0.5 halves a slice and 2 doubles it; validation
   keeps the natural distribution.
4. Order: train copies in one seeded global shuffle; validation grouped by slice (each slice one token
   range of the stream, recorded in packing.json), shuffled within. Slices (``slice_by``) decide only
   this order and the token counts: evaluation samples windows and takes a minimum per slice, the
   split itself never looks at slices.
5. Concatenate documents, each followed by end-of-text, cut into windows of ``seq_len + 1`` tokens and
   write ``.bin`` shards (format and writer in model/data.py); the tail after the last whole window is
   dropped and counted.

Every document that is not packed has a recorded reason (mixture weight 0, downsampled, no tokens, fell
in the dropped tail; a null text is quarantined). ``trace`` maps (shard, sequence) back to documents, URLs, WARC record ids and the
character span of each document's text in that sequence.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from model import data as packed
from tasks import dataset as ds
from tasks import stage as st
from tasks import tokenizer as tk
from tasks.atomic import atomic_path, atomic_write_bytes

STAGE = "pack"
WORK_DIR = ".pack-work"


class PackConfig(BaseModel):
    seq_len: int = Field(2048, ge=1, description="Tokens per training example; sequences hold seq_len + 1.")
    seed: int = Field(
        0, description="Seed of the validation split, the mixture draws and the global shuffle."
    )
    validation_fraction: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="Share of the near-duplicate clusters (documents, after dedup's drop mode) held out "
        "for validation, by a fixed hash threshold: later refreshes keep earlier validation documents.",
    )
    slice_by: list[Literal["lang", "source"]] = Field(
        default_factory=lambda: ["lang", "source"],
        description="What defines a slice for the grouping of the validation stream and the token "
        "counts: language, source (URL host) or both. The split does not depend on it.",
    )
    mixture: tk.Mixture = Field(
        default_factory=tk.Mixture,
        description="Up/down-sampling weights of train documents per language/source.",
    )
    tokens_per_shard: int = Field(
        1 << 27, ge=1, description="Approximate tokens per .bin shard (rounded down to whole sequences)."
    )
    num_workers: int = Field(
        1,
        ge=1,
        description="Processes tokenizing input shards in parallel; 1 = in process (encode_batch "
        "still uses every core).",
    )
    encode_batch_docs: int = Field(512, ge=1, description="Documents per encode_batch call.")


# ---------------------------------------------------------------------------------------------
# Tokenizing, in parallel over input shards


def _init_worker(threads: int) -> None:
    # Rayon's pool starts on first use, so this caps encode_batch's threads per worker process.
    os.environ["RAYON_NUM_THREADS"] = str(threads)


def tokenize_shard(
    tokenizer_file: str, parquet_file: str, rows: np.ndarray, out_file: str, dtype: str, batch_docs: int
) -> np.ndarray:
    """Encode the given rows of one input shard; tokens go to ``out_file`` (raw ``dtype``), lengths back."""
    tokenizer = tk.load_tokenizer(tokenizer_file)
    texts = pq.read_table(parquet_file, columns=["text"]).column("text").take(pa.array(rows)).to_pylist()
    lengths = np.zeros(len(texts), dtype=np.int64)
    with atomic_path(out_file) as tmp, open(tmp, "wb") as f:
        for start in range(0, len(texts), batch_docs):
            ids = tk.encode_texts(tokenizer, texts[start : start + batch_docs])
            for k, doc in enumerate(ids):
                lengths[start + k] = len(doc)
                f.write(np.asarray(doc, dtype=dtype).tobytes())
    return lengths


def tokenize_documents(
    input_dirs: list[Path],
    meta: pa.Table,
    selected: np.ndarray,
    tokenizer_file: Path,
    work_dir: Path,
    dtype: str,
    config: PackConfig,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(token array per work file; per document: its work file, token offset in it, token count)."""
    rows = meta.column("row").to_numpy()
    jobs = []
    for (i, j), docs in tk.group_by_shard(meta, selected):
        path = ds.shard_paths(input_dirs[i])[j]
        out = work_dir / f"tokens-{len(jobs):05d}.bin"
        jobs.append(
            (docs, (str(tokenizer_file), str(path), rows[docs], str(out), dtype, config.encode_batch_docs))
        )
    if config.num_workers > 1 and len(jobs) > 1:
        threads = max(1, (os.cpu_count() or 1) // config.num_workers)
        context = multiprocessing.get_context("spawn")  # tokenizers' thread pool does not survive fork
        with ProcessPoolExecutor(
            config.num_workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            lengths = list(pool.map(tokenize_shard, *zip(*(args for _, args in jobs), strict=True)))
    else:
        lengths = [tokenize_shard(*args) for _, args in jobs]
    n_tokens = np.zeros(meta.num_rows, dtype=np.int64)
    file_of = np.full(meta.num_rows, -1, dtype=np.int64)
    offset = np.zeros(meta.num_rows, dtype=np.int64)
    arrays = []
    for k, ((docs, args), doc_lengths) in enumerate(zip(jobs, lengths, strict=True)):
        n_tokens[docs] = doc_lengths
        file_of[docs] = k
        offset[docs] = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
        arrays.append(
            np.memmap(args[3], dtype=dtype, mode="r") if doc_lengths.sum() else np.zeros(0, dtype=dtype)
        )
    return arrays, file_of, offset, n_tokens


# ---------------------------------------------------------------------------------------------
# Split, mixture, order


def slice_names(meta: pa.Table, slice_by: list[str]) -> np.ndarray:
    parts = [meta.column(key).to_numpy(zero_copy_only=False).astype(str) for key in slice_by]
    if not parts:
        return np.full(meta.num_rows, "all", dtype=object)
    names = parts[0].astype(object)
    for part in parts[1:]:
        names = names + "/" + part.astype(object)
    return names


def split_units(input_dirs: list[Path]) -> list[str]:
    """The unit of the validation split per input document (``read_document_meta``'s row order).

    Its near-duplicate cluster: ``dup_cluster`` where dedup ran in annotate mode (the cluster's
    survivor's doc_id, stable across refreshes), else the doc_id (in drop mode every survivor is its
    own cluster, named by its doc_id as annotate mode would name it).
    """
    units: list[str] = []
    for input_dir in input_dirs:
        for path in ds.shard_paths(input_dir):
            file = pq.ParquetFile(path)
            columns = ["doc_id", *(["dup_cluster"] if "dup_cluster" in file.schema_arrow.names else [])]
            table = file.read(columns=columns)
            doc_ids = table.column("doc_id").cast(pa.string())
            if "dup_cluster" in columns:
                doc_ids = pc.coalesce(table.column("dup_cluster").cast(pa.string()), doc_ids)
            units.extend(doc_ids.to_pylist())
    return units


def validation_mask(units: list[str], fraction: float, seed: int) -> np.ndarray:
    """In validation: the unit's hash, uniform in (0, 1), is below ``fraction`` (whatever else is packed)."""
    return tk.doc_units(units, seed, "validation") < fraction


def mixture_copies(doc_ids: list[str], weights: np.ndarray, seed: int) -> np.ndarray:
    """floor(w) copies, plus one with probability w - floor(w) (by hash: deterministic)."""
    whole = np.floor(weights)
    extra = tk.doc_units(doc_ids, seed, "copies") < (weights - whole)
    return (whole + extra).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Packing


def _drop(stats: st.StageStats, meta: pa.Table, rows: np.ndarray, rule: str, detail: str) -> None:
    if not len(rows):
        return
    for doc in meta.select(["doc_id", "url"]).take(pa.array(rows)).to_pylist():
        stats.drop(doc, rule, detail)


def pack_datasets(
    input_dirs: list[str | Path], tokenizer_dir: str | Path, output_dir: str | Path, config: PackConfig
) -> ds.Manifest:
    """Tokenize and pack ``input_dirs`` with the tokenizer in ``tokenizer_dir`` into ``output_dir``."""
    input_dirs = [Path(d) for d in input_dirs]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # A re-run into the same directory: it stops being a dataset until the new manifest is written.
    for stale in (ds.manifest_path(output_dir), output_dir / packed.PACKING_FILE):
        stale.unlink(missing_ok=True)
    tokenizer_manifest = ds.read_manifest(tokenizer_dir)
    tokenizer_file = tk.tokenizer_path(tokenizer_dir)
    vocab_size = tokenizer_manifest.extra["vocab_size"]
    eot_id = tokenizer_manifest.extra["eot_id"]
    dtype = packed.token_dtype(vocab_size).name

    meta = tk.read_document_meta(input_dirs)
    doc_ids = meta.column("doc_id").to_pylist()
    stats = st.StageStats(STAGE, docs_in=meta.num_rows)
    weights = config.mixture.weights(meta.column("lang"), meta.column("source"))
    broken = meta.column("chars").to_numpy() < 0
    for doc in meta.select(["doc_id", "url"]).filter(pa.array(broken)).to_pylist():
        stats.quarantine("null_text", "the document's text is null", doc=doc)
    weights[broken] = 0
    unwanted = np.flatnonzero(~broken & (weights == 0))
    _drop(stats, meta, unwanted, "mixture_weight_zero", "language/source weight is 0")
    slices = slice_names(meta, config.slice_by)
    units = split_units(input_dirs)
    validation = validation_mask(units, config.validation_fraction, config.seed)
    copies = np.where(validation, 1, mixture_copies(doc_ids, weights, config.seed))
    copies[weights == 0] = 0
    downsampled = np.flatnonzero((weights > 0) & (copies == 0))
    _drop(stats, meta, downsampled, "mixture_downsampled", "mixture weight < 1 drew no copy")

    work_dir = output_dir / WORK_DIR
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    try:
        arrays, file_of, offset, n_tokens = tokenize_documents(
            input_dirs, meta, copies > 0, tokenizer_file, work_dir, dtype, config
        )
        empty = np.flatnonzero((copies > 0) & (n_tokens == 0))
        _drop(stats, meta, empty, "no_tokens", "empty text")
        copies[empty] = 0

        rng = np.random.default_rng(config.seed)
        train_docs = np.repeat(np.flatnonzero(~validation & (copies > 0)), copies[~validation & (copies > 0)])
        train_order = train_docs[rng.permutation(len(train_docs))]
        val_docs = np.flatnonzero(validation & (copies > 0))
        val_order = val_docs[np.lexsort((rng.permutation(len(val_docs)), slices[val_docs].astype(str)))]

        window = config.seq_len + 1
        sequences_per_shard = max(1, config.tokens_per_shard // window)
        splits: dict[str, dict[str, Any]] = {}
        placements_of: dict[str, np.ndarray] = {}
        in_tail_only = np.ones(meta.num_rows, dtype=bool)
        eot = np.array([eot_id], dtype=dtype)
        for split, order in (("train", train_order), ("validation", val_order)):
            placements = np.zeros((len(order), 3), dtype=np.int64)
            with packed.PackedShardWriter(
                output_dir, split, config.seq_len, dtype, sequences_per_shard
            ) as writer:
                for k, doc in enumerate(order.tolist()):
                    placements[k] = (writer.tokens_written, n_tokens[doc], doc)
                    start = offset[doc]
                    writer.write(arrays[file_of[doc]][start : start + n_tokens[doc]])
                    writer.write(eot)
            info = writer.info
            packed_tokens = info["tokens"]
            reached = placements[:, 0] < packed_tokens
            in_tail_only[order[reached]] = False
            placements_of[split] = placements[reached]
            info["documents"] = len(np.unique(order[reached]))
            info["slices"] = _slice_counts(slices, order, n_tokens, ranges=split == "validation")
            splits[split] = info
        tail = np.flatnonzero((copies > 0) & in_tail_only)
        _drop(stats, meta, tail, "packing_tail", "all its tokens fell after the last whole sequence")
        # documents.parquet: one row per packed document; placements point into it.
        packed_rows = np.flatnonzero((copies > 0) & ~in_tail_only)
        doc_row = np.full(meta.num_rows, -1, dtype=np.int64)
        doc_row[packed_rows] = np.arange(len(packed_rows))
        for split, placements in placements_of.items():
            placements[:, 2] = doc_row[placements[:, 2]]
            splits[split]["placements"] = packed.placements_file_name(split)
            splits[split]["placements_sha256"] = packed.write_placements(output_dir, split, placements)
        stats.kept = stats.docs_in - stats.n_dropped - stats.n_quarantined
        stats.check_accounting()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    documents = meta.select(["doc_id", *tk.LINEAGE_COLUMNS, "lang", "source", "input", "shard", "row"]).take(
        pa.array(packed_rows)
    )
    documents = documents.append_column("dup_cluster", pa.array(np.array(units, dtype=object)[packed_rows]))
    documents = documents.append_column("slice", pa.array(slices[packed_rows].astype(str)))
    documents = documents.append_column(
        "split", pa.array(np.where(validation[packed_rows], "validation", "train"))
    )
    documents = documents.append_column("copies", pa.array(copies[packed_rows]))
    documents = documents.append_column("tokens", pa.array(n_tokens[packed_rows]))
    documents_info = ds.write_table(documents, output_dir / packed.DOCUMENTS_FILE)
    tokenizer_body = tokenizer_file.read_bytes()
    atomic_write_bytes(output_dir / packed.TOKENIZER_FILE, tokenizer_body)
    rejects = st.write_rejects(stats, output_dir, 0)
    config_data = config.model_dump(mode="json")
    inputs = [ds.input_ref(d) for d in input_dirs]
    code = st.code_version(sys.modules[__name__])
    ds.write_manifest(
        output_dir / "rejects",
        ds.Manifest(
            stage=f"{STAGE}.rejects",
            schema=ds.schema_description(ds.REJECT_SCHEMA),
            shards=[rejects],
            config=config_data,
            code_version=code,
            inputs=inputs,
            stats=stats.to_dict(),
        ),
    )
    info = packed.packing_info(
        seq_len=config.seq_len,
        vocab_size=vocab_size,
        eot_id=eot_id,
        pad_id=tokenizer_manifest.extra["pad_id"],
        tokenizer_sha256=ds.sha256_bytes(tokenizer_body),
        splits=splits,
        extra={"seed": config.seed, "slice_by": config.slice_by},
    )
    packed.write_packing_info(output_dir, info)
    manifest = ds.Manifest(
        stage=STAGE,
        config=config_data,
        code_version=code,
        inputs=[*inputs, ds.input_ref(tokenizer_dir)],
        stats={**stats.to_dict(), "tokens": {s: v["tokens"] for s, v in splits.items()}},
        extra={
            "packing": info,
            "documents": documents_info.model_dump(),
            "packing_sha256": ds.sha256_file(output_dir / packed.PACKING_FILE),
        },
    )
    ds.write_manifest(output_dir, manifest)
    return manifest


def _slice_counts(
    slices: np.ndarray, order: np.ndarray, n_tokens: np.ndarray, ranges: bool
) -> dict[str, dict]:
    """Docs and tokens (with end-of-text, before the tail cut) per slice; stream ranges if grouped."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "tokens": 0})
    position = 0
    for doc in order.tolist():
        entry = counts[slices[doc]]
        if ranges and not entry["docs"]:
            entry["token_start"] = position
        entry["docs"] += 1
        entry["tokens"] += int(n_tokens[doc]) + 1
        position += int(n_tokens[doc]) + 1
        if ranges:
            entry["token_end"] = position
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Lineage


def _read_text(input_dir: Path, shard: int, row: int) -> tuple[str, str]:
    """(doc_id, text) of one row of an input shard, reading only its row group."""
    file = pq.ParquetFile(ds.shard_paths(input_dir)[shard])
    start = 0
    for group in range(file.num_row_groups):
        size = file.metadata.row_group(group).num_rows
        if row < start + size:
            table = file.read_row_group(group, columns=["doc_id", "text"])
            return table.column("doc_id")[row - start].as_py(), table.column("text")[row - start].as_py()
        start += size
    raise IndexError(f"{input_dir}: shard {shard} has no row {row}")


def trace(data_dir: str | Path, shard: int, seq: int, split: str = "train") -> list[dict[str, Any]]:
    """The documents in sequence ``seq`` of ``split`` shard ``shard``, in order, with their text spans.

    Each entry: doc_id, url, warc_record_id, source_file, source_offset (the WARC record), lang,
    source, the token range it fills in the sequence
    (``seq_token_start/end``, end-of-text included), the token range of the document
    (``doc_token_start/end``), the character span of the document's text (``char_start/end``; the
    spans of consecutive sequences partition the text; a character split over two sequences goes to
    the later one), ``ends_document`` (its end-of-text is in this sequence) and the span's ``text``.
    ``data_dir`` is a packed dataset or a published root (its LATEST version is traced).
    """
    data_dir = ds.resolve_version(data_dir)
    info = packed.read_packing_info(data_dir)
    shards = info["splits"][split]["shards"]
    if not 0 <= shard < len(shards) or not 0 <= seq < shards[shard]["sequences"]:
        raise IndexError(f"{split}: no shard {shard} sequence {seq}")
    window = info["window"]
    first = (sum(s["sequences"] for s in shards[:shard]) + seq) * window
    last = first + window
    placements = packed.read_placements(data_dir, split)
    starts = placements[:, 0]
    k = int(np.searchsorted(starts, first, side="right")) - 1
    manifest = ds.read_manifest(data_dir)
    documents = pq.read_table(data_dir / packed.DOCUMENTS_FILE)
    tokenizer = tk.load_tokenizer(info["tokenizer"])
    tokens = packed.open_shards(data_dir, split, info)[shard][seq]
    entries = []
    while k < len(placements) and starts[k] < last:
        start, n, row = (int(v) for v in placements[k])
        doc = documents.slice(row, 1).to_pylist()[0]
        ref = manifest.inputs[doc["input"]]
        if ds.dataset_digest(ref.path) != ref.digest:
            raise ValueError(f"input dataset {ref.path} changed since packing: cannot trace text spans")
        doc_id, text = _read_text(Path(ref.path), doc["shard"], doc["row"])
        encoding = tokenizer.encode(text, add_special_tokens=False)
        if doc_id != doc["doc_id"] or len(encoding.ids) != n:
            raise ValueError(f"document {doc['doc_id']} no longer tokenizes as when packed")
        t0, t1 = max(first - start, 0), min(last - start, n)
        lo, hi = max(start, first) - first, min(start + n + 1, last) - first
        if t1 > t0 and tokens[lo : lo + t1 - t0].tolist() != encoding.ids[t0:t1]:
            raise ValueError(f"shard {shard} sequence {seq} does not hold the tokens of {doc_id}")
        offsets = encoding.offsets
        char_start = len(text) if t0 >= n else offsets[t0][0] if t0 else 0
        char_end = len(text) if t1 >= n else offsets[t1][0]
        entries.append(
            {
                "doc_id": doc_id,
                "url": doc["url"],
                "warc_record_id": doc["warc_record_id"],
                "source_file": doc["source_file"],
                "source_offset": doc["source_offset"],
                "lang": doc["lang"],
                "source": doc["source"],
                "seq_token_start": lo,
                "seq_token_end": hi,
                "doc_token_start": t0,
                "doc_token_end": max(t0, t1),
                "char_start": char_start,
                "char_end": max(char_start, char_end),
                "ends_document": start + n < last,
                "text": text[char_start:char_end],
            }
        )
        k += 1
    return entries
