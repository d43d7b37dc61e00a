"""Packed token shards: the on-disk format (written by tasks/pack.py, read here) and the training loader.

A packed data directory holds, per split (``train``, ``validation``):

- ``<split>-00000.bin``, ... : raw token ids, ``dtype`` (uint16 when the vocabulary fits, else uint32),
  C order, shape ``[sequences, seq_len + 1]``. A sequence is one training example: inputs are its first
  ``seq_len`` tokens, targets the last ``seq_len``. Read with ``numpy.memmap``.
- ``placements-<split>.npy``: int64 ``[documents, 3]`` = (first token in the split's token stream,
  tokens of the document without its end-of-text, row in ``documents.parquet``). The stream is the
  concatenation of all sequences of the split in shard order; each document is followed by one
  end-of-text token, so placements partition the stream (the tokens after the last whole window are
  dropped and counted in ``tail_tokens_dropped``).
- ``documents.parquet`` (written by tasks/pack.py): one row per packed document with its url, WARC record
  id, ``lang``, ``source`` (URL host), ``dup_cluster`` (its near-duplicate cluster: the unit of the
  split), ``slice``, ``split``, ``copies``, ``tokens`` and where its text lives in the input dataset:
  the lineage of every token.
- ``tokenizer.json``: a copy of the tokenizer the ids come from.
- ``packing.json``: what the loader needs (seq_len, dtype, vocab size, special ids, shards per split with
  sequences and sha256, token counts). Written last but for the manifest.

The language and source of a validation token: the placement holding its stream position (the
document's end-of-text included) names its row in ``documents.parquet``. Validation is grouped by slice
(``slice_by`` of packing.json: language x source by default): ``splits.validation.slices[name]`` has the
slice's ``docs``, ``tokens`` and its stream range ``token_start``/``token_end``, so a slice's first
windows hold mostly its own tokens. Which documents are validation does not depend on slices (a hash
threshold of the near-duplicate cluster, see tasks/pack.py).

``FORMAT_VERSION`` changes with the format; readers refuse another version with a one-line error.
Version 2: the hash-threshold split and ``documents.parquet``'s ``dup_cluster``.

This module may not import tasks/flows/prefect (it runs under torchrun): it owns the format, and
tasks/pack.py writes through ``PackedShardWriter`` and ``write_packing_info``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PACKING_FILE = "packing.json"
DOCUMENTS_FILE = "documents.parquet"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 2
SPLITS = ("train", "validation")


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def placements_file_name(split: str) -> str:
    return f"placements-{split}.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, then one rename (the tasks side uses tasks.dataset for the same)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# ---------------------------------------------------------------------------------------------
# Writing


class PackedShardWriter:
    """Cut one split's token stream into windows of ``seq_len + 1`` and write them as ``.bin`` shards.

    ``write(tokens)`` appends to the stream; ``tokens_written`` is the stream position of the next token
    (what a placement records). Shards are written to a temporary name and renamed when full, so a
    killed run leaves no partial shard. Use as a context manager; ``info`` holds the split's entry for
    ``packing.json`` after a clean exit.
    """

    def __init__(
        self, data_dir: str | Path, split: str, seq_len: int, dtype: np.dtype, sequences_per_shard: int
    ):
        if sequences_per_shard < 1:
            raise ValueError("sequences_per_shard must be >= 1")
        self.data_dir = Path(data_dir)
        self.split = split
        self.window = seq_len + 1
        self.dtype = np.dtype(dtype)
        self.sequences_per_shard = sequences_per_shard
        self.tokens_written = 0
        self.shards: list[dict[str, Any]] = []
        self.info: dict[str, Any] | None = None
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._file = None
        self._tmp: Path | None = None
        self._digest = hashlib.sha256()
        self._shard_sequences = 0

    def __enter__(self) -> PackedShardWriter:
        return self

    def write(self, tokens: np.ndarray) -> None:
        self._pending.append(np.asarray(tokens, dtype=self.dtype))
        self._pending_tokens += len(tokens)
        self.tokens_written += len(tokens)
        # Flush in chunks of many windows: concatenating per document would be quadratic-ish in calls.
        if self._pending_tokens >= 64 * self.window:
            self._flush()

    def _flush(self) -> None:
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        whole = (len(stream) // self.window) * self.window
        windows = stream[:whole].reshape(-1, self.window)
        rest = stream[whole:]
        self._pending = [rest] if len(rest) else []
        self._pending_tokens = len(rest)
        start = 0
        while start < len(windows):
            if self._file is None:
                self._open_shard()
            take = min(len(windows) - start, self.sequences_per_shard - self._shard_sequences)
            data = windows[start : start + take].tobytes()
            self._file.write(data)
            self._digest.update(data)
            self._shard_sequences += take
            start += take
            if self._shard_sequences == self.sequences_per_shard:
                self._close_shard()

    def _open_shard(self) -> None:
        target = self.data_dir / shard_file_name(self.split, len(self.shards))
        self._tmp = target.with_name(f".{target.name}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in _close_shard / __exit__)
        self._digest = hashlib.sha256()
        self._shard_sequences = 0

    def _close_shard(self) -> None:
        self._file.close()
        name = shard_file_name(self.split, len(self.shards))
        os.replace(self._tmp, self.data_dir / name)
        self.shards.append(
            {"path": name, "sequences": self._shard_sequences, "sha256": self._digest.hexdigest()}
        )
        self._file = None
        self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._pending:
                self._flush()
            if self._file is not None:
                self._close_shard()
            sequences = sum(s["sequences"] for s in self.shards)
            self.info = {
                "sequences": sequences,
                "tokens": sequences * self.window,
                "tail_tokens_dropped": self.tokens_written - sequences * self.window,
                "shards": self.shards,
            }
        elif self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()


def write_placements(data_dir: str | Path, split: str, placements: np.ndarray) -> str:
    """Write a split's placements ([documents, 3] int64) atomically; returns the file's sha256."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(placements, dtype=np.int64).reshape(-1, 3), allow_pickle=False)
    _write_atomic(Path(data_dir) / placements_file_name(split), buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def packing_info(
    *,
    seq_len: int,
    vocab_size: int,
    eot_id: int,
    pad_id: int,
    tokenizer_sha256: str,
    splits: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``packing.json``; ``splits`` are the writers' ``info`` (plus what the packer adds)."""
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "window": seq_len + 1,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "pad_id": pad_id,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tokenizer_sha256,
        "documents": DOCUMENTS_FILE,
        "splits": splits,
        "tokens": {split: entry["tokens"] for split, entry in splits.items()},
        **(extra or {}),
    }


def write_packing_info(data_dir: str | Path, info: dict[str, Any]) -> Path:
    path = Path(data_dir) / PACKING_FILE
    _write_atomic(path, (json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
    return path


# ---------------------------------------------------------------------------------------------
# Reading


def read_packing_info(data_dir: str | Path) -> dict[str, Any]:
    """``packing.json`` of a packed directory, with ``tokenizer`` made an absolute path.

    Keys: seq_len, window, dtype, vocab_size (a multiple of 128: the model's embedding size), eot_id,
    pad_id, tokenizer, splits (per split: sequences, tokens, documents, shards, token counts per slice).
    """
    path = Path(data_dir) / PACKING_FILE
    if not path.exists():
        raise FileNotFoundError(f"{data_dir} is not a packed data directory: no {PACKING_FILE}")
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{data_dir} is packed in format {info.get('format_version')}, this code reads format "
            f"{FORMAT_VERSION}: pack the data again"
        )
    info["tokenizer"] = str((Path(data_dir) / info["tokenizer"]).resolve())
    return info


def open_shards(data_dir: str | Path, split: str, info: dict[str, Any] | None = None) -> list[np.memmap]:
    """The split's shards as read-only memmaps of shape [sequences, seq_len + 1]."""
    info = info or read_packing_info(data_dir)
    if split not in info["splits"]:
        raise KeyError(f"{data_dir}: no split {split!r} (have {sorted(info['splits'])})")
    shards = []
    for shard in info["splits"][split]["shards"]:
        path = Path(data_dir) / shard["path"]
        expected = shard["sequences"] * info["window"] * np.dtype(info["dtype"]).itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise ValueError(f"{path}: missing or not {expected} bytes as packing.json says")
        shards.append(
            np.memmap(path, dtype=info["dtype"], mode="r", shape=(shard["sequences"], info["window"]))
        )
    return shards


def read_placements(data_dir: str | Path, split: str) -> np.ndarray:
    return np.load(Path(data_dir) / placements_file_name(split), mmap_mode="r", allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Loader


class PackedLoader:
    """Stream batches of packed sequences, sharded by data-parallel rank, resumable exactly.

    Order: each epoch visits the shards in a seeded random order and the sequences of each shard in a
    seeded random order (packing already shuffled documents globally, so shards are alike). This gives
    one global stream of sequences that does not depend on the number of ranks; global batch ``s`` is
    stream positions ``[s * G, (s + 1) * G)`` with ``G = batch_size * world_size``, and rank ``r`` takes
    the ``r``-th slice of ``batch_size``. The state is the number of sequences consumed globally plus
    the seed (the permutations are derived from them), so a checkpoint resumes to the identical next
    batch, also with another world size as long as the global batch is the same.

    ``loop=True`` runs forever, crossing epochs inside a batch if needed. ``loop=False`` yields one
    epoch: the last global batch may be short, and a rank past the end of the data gets no batch.
    ``shuffle=False`` (evaluation) keeps the stream order, so global sequence ``i`` covers tokens
    ``[i * (seq_len + 1), (i + 1) * (seq_len + 1))`` of the split, which the placements map to
    documents and so to languages and sources.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        loop: bool = True,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.loop = loop
        self.shuffle = shuffle
        info = read_packing_info(data_dir)
        self.seq_len: int = info["seq_len"]
        self.vocab_size: int = info["vocab_size"]
        self.eot_id: int = info["eot_id"]
        self._shards = open_shards(data_dir, split, info)
        self._sizes = np.array([len(s) for s in self._shards], dtype=np.int64)
        self.num_sequences = int(self._sizes.sum())
        if self.num_sequences == 0:
            raise ValueError(f"{data_dir}: split {split!r} has no sequences")
        self.position = 0  # sequences consumed globally (all ranks)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._row_cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sequence counts in that order) for ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.arange(len(self._shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self._shards))
            self._epoch_cache = (epoch, order, np.cumsum(self._sizes[order]))
            self._row_cache = {}
        return self._epoch_cache[1], self._epoch_cache[2]

    def _rows(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._row_cache:
            rows = np.arange(int(self._sizes[shard]))
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch, shard + 1]).permutation(rows)
            self._row_cache[key] = rows
        return self._row_cache[key]

    def _sequences(self, positions: np.ndarray) -> np.ndarray:
        """Token windows [len(positions), seq_len + 1] at global stream positions."""
        out = np.empty((len(positions), self.seq_len + 1), dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        for i, (epoch, offset) in enumerate(zip(epochs.tolist(), offsets.tolist(), strict=True)):
            order, ends = self._epoch_order(epoch)
            k = int(np.searchsorted(ends, offset, side="right"))
            shard = int(order[k])
            within = offset - (int(ends[k - 1]) if k else 0)
            out[i] = self._shards[shard][self._rows(epoch, shard)[within]]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch  # here, not at the top: the packing workers use this module without torch

        while True:
            start = self.position + self.rank * self.batch_size
            stop = start + self.batch_size
            if not self.loop:
                if self.position >= self.num_sequences:
                    return
                stop = min(stop, self.num_sequences)
            # Advance before yielding: a state saved after receiving a batch resumes at the next one.
            self.position += self.global_batch
            if stop <= start:
                continue
            windows = torch.from_numpy(self._sequences(np.arange(start, stop, dtype=np.int64)))
            yield windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "position": self.position,
            "global_batch": self.global_batch,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        identity = {
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_sequences": self.num_sequences,
        }
        for key, mine in identity.items():
            if state.get(key, mine) != mine:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {mine!r}")
        if state["position"] % self.global_batch:
            raise ValueError(
                f"loader state stopped at sequence {state['position']} (global batch {state['global_batch']}), "
                f"not a multiple of this loader's global batch {self.global_batch}"
            )
        self.position = int(state["position"])
