"""Exact and near-duplicate removal across every shard of a run, incremental across refreshes.

How a run goes (``dedup_datasets``):

1. Sketch (one pass per input shard, a row group at a time). Per document: the exact key
   (xxh3-128 of the folded text, ``minhash.fold_text``, whitespace runs collapsed), the sorted
   set of 32-bit shingle hashes, the MinHash signature (``minhash.MinHasher``) and one key per
   LSH band. They go to the work dir as one *source* per input shard: ``docs.parquet`` (doc_id, date, length, epoch, shingles),
   ``exact.parquet`` and one ``band-XXX.parquet`` per band, each sorted by key.
2. Candidates. Every band is read in key ranges (*partitions*) over all sources, the persistent
   index's included; the number of ranges comes from ``memory_budget_bytes``, so the largest
   in-memory structure is one partition whatever the corpus size. Documents sharing an exact key
   form exact groups; documents sharing a band key are candidate pairs.
3. Verification. A candidate pair is a near duplicate when the true Jaccard similarity of the two
   shingle sets is at least ``jaccard_threshold``, or the smaller set is contained in the other at
   ``containment_threshold`` (a page that only adds a header or footer). Shingles are loaded for
   one pair of sources at a time.
4. Survivors. Documents are ranked: index documents first (already published, never removed),
   then by epoch (``epoch_field``, the crawl snapshot: the order of refreshes), oldest crawl
   ``date``, longest text, smallest ``doc_id``. An exact group is represented by its best-ranked
   member. Near duplicates are resolved epoch by epoch: the verified edges among an epoch's
   documents are joined by union-find; a cluster with an edge to documents of earlier epochs (or
   the index) joins the best-ranked of their survivors, else its best-ranked member survives.
   Clusters of earlier epochs are never merged with each other and never lose their survivor, so
   an epoch's result does not depend on later epochs: deduplicating snapshots one after the other
   through the index keeps the same documents as deduplicating them all in one run. Every other
   member is dropped with ``duplicate_of`` = its cluster's survivor.
5. Outputs: one shard per input shard in the same order, ``rejects/``, manifest. Only then the
   index is updated: the run's sources become a new index segment (a directory renamed into
   place), then ``index.json`` is replaced atomically. ``index.json`` records which input
   manifests each segment came from; re-running inputs already in the index uses only the
   segments before theirs, so the re-run writes the same bytes and adds nothing. A new version of
   indexed inputs (same slot, ``<snapshot>/dedup``, other content: an upstream stage changed)
   replaces the old version's segment and every later one instead of meeting its old self.

The index keeps every document it saw (kept or dropped, with its survivor), so that a later
document similar only to a dropped one still joins that cluster, as it would in one batch run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, Field

from tasks import dataset as ds
from tasks import minhash
from tasks.atomic import atomic_write_text, remove_unlisted
from tasks.stage import (
    ShardResult,
    StageStats,
    code_version,
    file_doc_id,
    finalize_dataset,
    shard_name,
    write_rejects,
)

STAGE = "dedup"
INDEX_FILE = "index.json"
INDEX_FORMAT = 1
DUP_CLUSTER = pa.field("dup_cluster", pa.string())
_BAND_SCHEMA = pa.schema([("key", pa.uint64()), ("gid", pa.int64())])
_EXACT_SCHEMA = pa.schema([("hi", pa.uint64()), ("lo", pa.uint64()), ("gid", pa.int64())])
_SOURCE_DOCS_SCHEMA = pa.schema(
    [
        ("gid", pa.int64()),
        ("doc_id", pa.string()),
        ("date", pa.string()),
        ("length", pa.int64()),
        ("epoch", pa.string()),
        ("shingles", pa.list_(pa.uint32())),
    ]
)
_INDEX_DOCS_SCHEMA = _SOURCE_DOCS_SCHEMA.append(pa.field("root_gid", pa.int64())).append(
    pa.field("root_doc_id", pa.string())
)
_ROW_BYTES = 16  # a band row in memory: uint64 key + int64 gid
_SORT_OVERHEAD = 3  # argsort indices and the sorted copies next to the partition itself


class DedupConfig(BaseModel):
    """Exact + MinHash-LSH near-duplicate removal. Defaults chosen on neardup-dev (benchmarks/RESULTS.md)."""

    annotate: bool = Field(
        False, description="Keep every document and add `dup_cluster` instead of dropping."
    )
    exact: bool = Field(
        True,
        description="Drop documents whose text equals an earlier one's up to case, width and whitespace.",
    )
    near: bool = Field(
        True, description="Drop near duplicates found by MinHash LSH and verified on shingles."
    )
    shingle_size: int = Field(2, ge=1, description="Tokens per shingle (word, or Han/Kana/Thai character).")
    num_perm: int = Field(128, ge=8, description="MinHash permutations.")
    seed: int = Field(1, description="MinHash permutation seed (datasketch's).")
    hash_scheme: Literal["affine32"] = Field(
        "affine32", description="datasketch MinHash scheme the signatures equal (32-bit shingle hashes)."
    )
    lsh_threshold: float = Field(
        0.5, gt=0, lt=1, description="Estimated Jaccard at which LSH makes a candidate; sets bands x rows."
    )
    jaccard_threshold: float = Field(
        0.70, gt=0, le=1, description="Verified shingle Jaccard for a duplicate."
    )
    containment_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Or: share of the smaller shingle set found in the other (added boilerplate).",
    )
    containment_min_shingles: int = Field(
        30, ge=1, description="Containment only counts when the smaller document has this many shingles."
    )
    containment_min_jaccard: float = Field(
        0.5, ge=0, le=1, description="... and the Jaccard is at least this (added text at most about half)."
    )
    max_bucket_pairs: int = Field(
        200, ge=1, description="A bucket of k > this documents pairs each one with the first this-many only."
    )
    memory_budget_bytes: int = Field(
        2 << 30, ge=1, description="Cap for the largest in-memory structure (one band partition)."
    )
    epoch_field: str | None = Field(
        "snapshot",
        description="Column that orders refreshes (crawl snapshot): a later epoch never removes an earlier "
        "epoch's survivor, which makes incremental runs equal to one batch run. None: one epoch.",
    )
    examples: int = Field(5, ge=0, description="Example pairs (accepted and rejected) in the report.")

    def lsh_bands(self) -> tuple[int, int]:
        return minhash.lsh_params(self.lsh_threshold, self.num_perm)

    def index_fingerprint(self) -> dict[str, Any]:
        """What a persistent index's contents depend on: an index is only reused with the same."""
        bands, rows = self.lsh_bands()
        return {
            "shingle_size": self.shingle_size,
            "num_perm": self.num_perm,
            "seed": self.seed,
            "hash_scheme": self.hash_scheme,
            "bands": bands,
            "rows": rows,
            "normalization_version": minhash.NORMALIZATION_VERSION,
            "index_format": INDEX_FORMAT,
        }


# ---------------------------------------------------------------------------------------------
# Sources: the sketches of one input shard (work dir) or of one shard of an earlier run (index)


@dataclass
class Source:
    path: Path
    gid_start: int
    rows: int
    indexed: bool  # part of the persistent index (documents already decided)


def _source_dir(root: Path, index: int) -> Path:
    return root / f"src-{index:05d}"


def _band_file(source: Path, band: int) -> Path:
    return source / f"band-{band:03d}.parquet"


def _write_sorted(table: pa.Table, sort_key: str, path: Path) -> None:
    ds.write_table(table.sort_by([(sort_key, "ascending"), ("gid", "ascending")]), path)


@dataclass
class Sketches:
    """What dedup keeps of a batch of documents (document i's shingles: offsets[i]:offsets[i + 1])."""

    exact_hi: np.ndarray  # uint64 halves of the xxh3-128 of the folded, whitespace-collapsed text
    exact_lo: np.ndarray
    offsets: np.ndarray
    shingles: np.ndarray  # uint32, sorted unique per document
    signatures: np.ndarray  # uint32[n, num_perm]


def sketch_texts(texts: list[str], shingle_size: int, hasher: minhash.MinHasher) -> Sketches:
    folded = [minhash.fold_text(t) for t in texts]
    digests = [
        xxhash.xxh3_128_intdigest(" ".join(f.split()).encode("utf-8", "surrogatepass")) for f in folded
    ]
    offsets, shingles = minhash.batch_shingle_hashes(folded, shingle_size)
    return Sketches(
        exact_hi=np.array([d >> 64 for d in digests], dtype=np.uint64),
        exact_lo=np.array([d & ((1 << 64) - 1) for d in digests], dtype=np.uint64),
        offsets=offsets,
        shingles=shingles,
        signatures=hasher.signatures(offsets, shingles),
    )


def sketch_shard(
    shard: Path, target: Path, gid_start: int, config: DedupConfig, hasher: minhash.MinHasher
) -> tuple[int, int]:
    """Write the sketches of one input shard as a source; returns (rows, bytes held in memory)."""
    bands, rows = config.lsh_bands()
    parquet = pq.ParquetFile(shard)
    wanted = ("doc_id", "text", "date", config.epoch_field)
    columns = [c for c in wanted if c in parquet.schema_arrow.names]
    meta: dict[str, list] = {"doc_id": [], "date": [], "length": [], "epoch": []}
    exact_hi, exact_lo, shingle_lists, keys = [], [], [], []
    for batch in parquet.iter_batches(batch_size=ds.ROW_GROUP_SIZE, columns=columns):
        data = batch.to_pydict()
        sketches = sketch_texts(data["text"], config.shingle_size, hasher)
        n = len(data["text"])
        meta["doc_id"] += data["doc_id"]
        meta["date"] += data.get("date", [None] * n)
        meta["epoch"] += data.get(config.epoch_field, [None] * n)
        meta["length"] += [len(t) for t in data["text"]]
        exact_hi.append(sketches.exact_hi)
        exact_lo.append(sketches.exact_lo)
        keys.append(minhash.band_keys(sketches.signatures, bands, rows))
        shingle_lists.append(
            pa.ListArray.from_arrays(pa.array(sketches.offsets.astype(np.int32)), pa.array(sketches.shingles))
        )
    target.mkdir(parents=True, exist_ok=True)
    gids = np.arange(gid_start, gid_start + len(meta["doc_id"]), dtype=np.int64)
    shingles = pa.chunked_array(shingle_lists, pa.list_(pa.uint32()))
    exact = pa.table(
        {"hi": np.concatenate(exact_hi or [[]]), "lo": np.concatenate(exact_lo or [[]]), "gid": gids}
    )
    _write_sorted(exact.cast(_EXACT_SCHEMA), "hi", target / "exact.parquet")
    # a document without tokens has the all-max signature: it would share every bucket
    has_text = pc.list_value_length(shingles).to_numpy(zero_copy_only=False) > 0
    band_keys = np.concatenate(keys) if keys else np.empty((0, bands), dtype=np.uint64)
    for band in range(bands):
        table = pa.table({"key": band_keys[has_text, band], "gid": gids[has_text]}, schema=_BAND_SCHEMA)
        _write_sorted(table, "key", _band_file(target, band))
    docs = pa.table({"gid": gids, **meta, "shingles": shingles}, schema=_SOURCE_DOCS_SCHEMA)
    ds.write_table(docs, target / "docs.parquet")
    held = band_keys.nbytes + shingles.nbytes + gids.nbytes * 3
    return gids.size, held


# ---------------------------------------------------------------------------------------------
# Partitions: one band (or the exact keys) in one key range, over all sources


def _key_ranges(partitions: int) -> list[tuple[int, int]]:
    step = math.ceil((1 << 64) / partitions)
    return [(i * step, min((i + 1) * step, 1 << 64)) for i in range(partitions)]


def _read_partition(files: list[Path], key: str, low: int, high: int) -> pa.Table | None:
    """Rows of the files whose ``key`` is in [low, high); row-group statistics skip the rest."""
    selected = None
    if (low, high) != (0, 1 << 64):
        selected = pc.field(key) >= pa.scalar(low, pa.uint64())
        if high < 1 << 64:
            selected = selected & (pc.field(key) < pa.scalar(high, pa.uint64()))
    tables = [pq.read_table(f, filters=selected) for f in files if f.exists()]
    return pa.concat_tables(tables) if tables else None


def _groups(sorted_keys: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of equal values of length > 1."""
    if sorted_keys.size < 2:
        return
    change = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [sorted_keys.size]])
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
        yield int(start), int(end)


def _bucket_pairs(keys: np.ndarray, gids: np.ndarray, cap: int, first_new: int) -> np.ndarray:
    """Candidate pairs (lower gid, higher gid) of the documents sharing a key, vectorized.

    Within a bucket each document is paired with every other, except that only the first ``cap``
    (by gid) are paired with the rest of a larger bucket. Pairs of two index documents are left out.
    """
    order = np.lexsort((gids, keys))
    keys, gids = keys[order], gids[order]
    distinct = np.concatenate([keys[:1] == keys[:1], (keys[1:] != keys[:-1]) | (gids[1:] != gids[:-1])])
    keys, gids = keys[distinct], gids[distinct]
    rows = np.arange(keys.size)
    bucket_start = np.maximum.accumulate(np.where(np.concatenate([[True], keys[1:] != keys[:-1]]), rows, 0))
    left = rows[rows - bucket_start < cap]
    pairs = []
    distance = 1
    while left.size:  # pair each row with the one `distance` further on while still in its bucket
        left = left[left + distance < keys.size]
        left = left[keys[left + distance] == keys[left]]
        pair = np.stack([gids[left], gids[left + distance]], axis=1)
        pairs.append(pair[pair[:, 1] >= first_new])
        distance += 1
    return np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Plan:
    docs: int
    partitions_per_band: int
    memory_bytes: int
    disk_bytes: int


def _plan(total_docs: int, new_input_bytes: int, config: DedupConfig) -> _Plan:
    bands, _ = config.lsh_bands()
    per_band = total_docs * _ROW_BYTES * _SORT_OVERHEAD
    partitions = max(1, math.ceil(per_band / config.memory_budget_bytes))
    # Shingles take about as many bytes as the (compressed) text; bands 16 bytes per doc each.
    disk = total_docs * (bands + 2) * _ROW_BYTES + new_input_bytes
    return _Plan(total_docs, partitions, math.ceil(per_band / partitions), disk)


def _rank(meta: dict[int, dict[str, Any]], first_new: int) -> dict[int, int]:
    """Survivor order of the documents involved in duplicates (smaller = kept first)."""

    def order(gid: int) -> tuple:
        doc = meta[gid]
        if gid < first_new:  # index documents: already published, before anything new
            return (0, "", gid, "", 0, "")
        date = doc["date"] or "\uffff"  # undated last
        return (1, doc["epoch"] or "", 0, date, -doc["length"], doc["doc_id"] or "")

    return {gid: r for r, gid in enumerate(sorted(meta, key=order))}


def _owners(sources: list[Source], gids: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array([s.gid_start for s in sources], dtype=np.int64), gids, side="right") - 1


def _read_docs(source: Source, gids: np.ndarray, columns: list[str]) -> pa.Table:
    # docs.parquet is in gid order: row-group statistics skip most of it
    return pq.read_table(
        source.path / "docs.parquet", columns=columns, filters=[("gid", "in", gids.tolist())]
    )


def _load_meta(sources: list[Source], gids: np.ndarray) -> dict[int, dict[str, Any]]:
    """Per gid: doc_id, date, length, epoch (and the survivor, for index documents)."""
    meta: dict[int, dict[str, Any]] = {}
    gids = np.unique(gids)
    owner = _owners(sources, gids)
    for index in np.unique(owner):
        source = sources[index]
        columns = ["gid", "doc_id", "date", "length", "epoch"]
        if source.indexed:
            columns += ["root_gid", "root_doc_id"]
        meta.update(
            (row["gid"], row) for row in _read_docs(source, gids[owner == index], columns).to_pylist()
        )
    return meta


def _load_shingles(sources: list[Source], gids: np.ndarray) -> dict[int, np.ndarray]:
    """Per gid: its sorted unique shingle hashes (views into one array per source)."""
    shingles: dict[int, np.ndarray] = {}
    gids = np.unique(gids)
    owner = _owners(sources, gids)
    for index in np.unique(owner):
        table = _read_docs(sources[index], gids[owner == index], ["gid", "shingles"])
        lists = table["shingles"].combine_chunks()
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy()
        for i, gid in enumerate(table["gid"].to_pylist()):
            shingles[gid] = values[offsets[i] : offsets[i + 1]]
    return shingles


def _similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Jaccard, containment of the smaller set in the larger) of two sorted unique hash arrays."""
    if a.size == 0 or b.size == 0:
        return 0.0, 0.0
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common), common / min(a.size, b.size)


def _is_duplicate(jaccard: float, containment: float, smaller: int, config: DedupConfig) -> bool:
    return jaccard >= config.jaccard_threshold or (
        containment >= config.containment_threshold
        and smaller >= config.containment_min_shingles
        and jaccard >= config.containment_min_jaccard
    )


class _Run:
    def __init__(self, sources: list[Source], first_new: int, config: DedupConfig, plan: _Plan):
        self.sources = sources
        self.first_new = first_new
        self.config = config
        self.plan = plan
        self.peak_partition_bytes = 0

    def _partitions(
        self, file_name: str, key: str, extra: str | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(keys, gids, extra column) of each key range, sorted by key then gid."""
        files = [s.path / file_name for s in self.sources]
        for low, high in _key_ranges(self.plan.partitions_per_band):
            table = _read_partition(files, key, low, high)
            if table is None or table.num_rows == 0:
                continue
            keys = table[key].to_numpy()
            gids = table["gid"].to_numpy()
            values = table[extra].to_numpy() if extra else None
            order = np.lexsort((gids, keys))
            held = keys.nbytes + gids.nbytes + order.nbytes + (values.nbytes if extra else 0)
            self.peak_partition_bytes = max(self.peak_partition_bytes, held)
            yield keys[order], gids[order], values[order] if extra else None

    def exact_groups(self) -> list[np.ndarray]:
        groups = []
        for hi, gids, lo in self._partitions("exact.parquet", "hi", "lo"):
            for start, end in _groups(hi):
                # equal high halves: split on the low half too
                sub_lo, sub_gids = lo[start:end], gids[start:end]
                order = np.lexsort((sub_gids, sub_lo))
                for s, e in _groups(sub_lo[order]):
                    members = sub_gids[order][s:e]
                    if members.max() >= self.first_new:
                        groups.append(members)
        return groups

    def candidate_pairs(self, bands: int, exact_groups: list[np.ndarray]) -> np.ndarray:
        """Pairs sharing a band key, each exact copy replaced by its group's first gid.

        Exact copies have the same shingles, so one of them stands for all: a page copied a
        thousand times makes one candidate, not a thousand squared.
        """
        copies = np.concatenate([g[1:] for g in exact_groups]) if exact_groups else np.empty(0, np.int64)
        firsts = np.concatenate([np.full(g.size - 1, g[0]) for g in exact_groups]) if exact_groups else copies
        order = np.argsort(copies)
        copies, firsts = copies[order], firsts[order]

        def canonical(gids: np.ndarray) -> np.ndarray:
            if copies.size == 0:
                return gids
            at = np.minimum(np.searchsorted(copies, gids), copies.size - 1)
            return np.where(copies[at] == gids, firsts[at], gids)

        found = np.empty((0, 2), dtype=np.int64)
        for band in range(bands):
            chunks = [found]
            for keys, gids, _ in self._partitions(_band_file(Path(), band).name, "key"):
                chunks.append(
                    _bucket_pairs(keys, canonical(gids), self.config.max_bucket_pairs, self.first_new)
                )
            found = np.unique(np.concatenate(chunks), axis=0)
        return found

    def verify(self, pairs: np.ndarray) -> tuple[list[tuple[int, int, float, float]], list[tuple]]:
        """Verified duplicate edges (a, b, jaccard, containment) and the rejected candidates."""
        owners = _owners(self.sources, pairs)
        accepted, rejected = [], []
        blocks = np.unique(owners, axis=0) if pairs.size else np.empty((0, 2), dtype=np.int64)
        for owner_a, owner_b in blocks:
            block = pairs[(owners[:, 0] == owner_a) & (owners[:, 1] == owner_b)]
            shingles = _load_shingles(self.sources, block.ravel())
            for a, b in block.tolist():
                sa, sb = shingles[a], shingles[b]
                jaccard, containment = _similarity(sa, sb)
                edge = (a, b, jaccard, containment)
                if _is_duplicate(jaccard, containment, min(sa.size, sb.size), self.config):
                    accepted.append(edge)
                else:
                    rejected.append(edge)
        return accepted, rejected


@dataclass
class _Decision:
    root: int  # gid of the survivor (== the doc's own gid when kept)
    rule: str = ""  # "exact_duplicate" / "near_duplicate" when root != gid
    detail: str = ""


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        while self.parent.setdefault(x, x) != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)

    def sets(self) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for x in self.parent:
            groups.setdefault(self.find(x), []).append(x)
        return list(groups.values())


def _decide(
    exact_groups: list[np.ndarray], edges: list[tuple[int, int, float, float]], meta: dict, first_new: int
) -> dict[int, _Decision]:
    """Survivor of every new document involved in a duplicate group or edge (see the module doc)."""
    rank = _rank(meta, first_new)

    def epoch(gid: int) -> tuple[int, str]:
        return (0, "") if gid < first_new else (1, meta[gid]["epoch"] or "")

    # Exact: the best-ranked member represents the group; the others follow its fate.
    exact_rep: dict[int, int] = {}
    for members in exact_groups:
        rep = min(members.tolist(), key=rank.__getitem__)
        exact_rep.update({gid: rep for gid in members.tolist() if gid != rep and gid >= first_new})
    # Near: edges between representatives, each filed under the epoch of its later end.
    by_epoch: dict[tuple[int, str], list[tuple[int, int, float, float]]] = {}
    for a, b, jaccard, containment in edges:
        a, b = exact_rep.get(a, a), exact_rep.get(b, b)
        if a == b or (a < first_new and b < first_new):
            continue
        if rank[a] > rank[b]:
            a, b = b, a
        by_epoch.setdefault(epoch(b), []).append((a, b, jaccard, containment))

    decisions: dict[int, _Decision] = {}

    def root_of(gid: int) -> int:
        if gid < first_new:
            return meta[gid]["root_gid"]
        return decisions[gid].root if gid in decisions else gid

    for current in sorted(by_epoch):
        components = _UnionFind()
        inside = [e for e in by_epoch[current] if epoch(e[0]) == current]
        for a, b, _, _ in inside:
            components.union(a, b)
        # per document: the edge to its best-ranked neighbour (for the reject's detail)
        links: dict[int, tuple[int, float, float]] = {}
        earlier_roots: dict[int, set[int]] = {}
        for a, b, jaccard, containment in sorted(by_epoch[current], key=lambda e: (rank[e[0]], rank[e[1]])):
            components.find(b)
            links.setdefault(b, (a, jaccard, containment))
            links.setdefault(a, (b, jaccard, containment))
            if epoch(a) != current:
                earlier_roots.setdefault(b, set()).add(root_of(a))
        for members in components.sets():
            roots = set().union(*(earlier_roots.get(gid, ()) for gid in members))
            # a cluster of earlier epochs (or the index) keeps its survivor; else the best member
            root = min(roots or members, key=rank.__getitem__)
            for gid in members:
                if gid != root:
                    neighbour, jaccard, containment = links[gid]
                    detail = f"jaccard={jaccard:.3f} containment={containment:.3f} with {meta[neighbour]['doc_id']}"
                    decisions[gid] = _Decision(root, "near_duplicate", detail)
    for gid, rep in exact_rep.items():
        decisions[gid] = _Decision(
            root_of(rep), "exact_duplicate", f"normalized text equal to {meta[rep]['doc_id']}"
        )
    return decisions


# ---------------------------------------------------------------------------------------------
# Persistent index


def _read_index(index_dir: Path | None) -> dict[str, Any]:
    if index_dir is None or not (index_dir / INDEX_FILE).exists():
        return {"format": INDEX_FORMAT, "fingerprint": None, "segments": []}
    return json.loads((index_dir / INDEX_FILE).read_text(encoding="utf-8"))


def _batch_key(input_dirs: list[Path]) -> str:
    return hashlib.sha256("\n".join(ds.dataset_digest(d) for d in input_dirs).encode()).hexdigest()


def _index_sources(index_dir: Path, segments: list[dict[str, Any]]) -> list[Source]:
    sources = []
    for segment in segments:
        for entry in segment["sources"]:
            path = index_dir / "segments" / segment["name"] / entry["name"]
            sources.append(Source(path, entry["gid_start"], entry["rows"], indexed=True))
    return sources


def _add_segment(
    index_dir: Path,
    index: dict[str, Any],
    slot: str,
    batch_key: str,
    sources: list[Source],
    decisions: dict[int, _Decision],
    root_ids: dict[int, str],
    fingerprint: dict[str, Any],
) -> None:
    """Copy this run's sources into a new segment (rename into place), then replace index.json."""
    name = f"seg-{len(index['segments']):05d}-{batch_key[:12]}"
    final = index_dir / "segments" / name
    tmp = index_dir / "segments" / f".{name}.tmp"
    committed = {s["name"] for s in _read_index(index_dir)["segments"]}  # what readers may still use
    remove_unlisted(index_dir / "segments", committed)
    entries = []
    for source in sources:
        target = tmp / source.path.name
        shutil.copytree(source.path, target)
        docs = pq.read_table(source.path / "docs.parquet")
        gids = docs["gid"].to_pylist()
        roots = [decisions[g].root if g in decisions else g for g in gids]
        own_ids = docs["doc_id"].to_pylist()
        root_doc_ids = [
            root_ids[r] if g in decisions else own for g, r, own in zip(gids, roots, own_ids, strict=True)
        ]
        docs = docs.append_column("root_gid", pa.array(roots, pa.int64()))
        docs = docs.append_column("root_doc_id", pa.array(root_doc_ids, pa.string()))
        ds.write_table(docs.cast(_INDEX_DOCS_SCHEMA), target / "docs.parquet")
        entries.append({"name": source.path.name, "gid_start": source.gid_start, "rows": source.rows})
    tmp.rename(final)
    updated = {
        "format": INDEX_FORMAT,
        "fingerprint": fingerprint,
        "segments": [
            *index["segments"],
            {"name": name, "slot": slot, "batch_key": batch_key, "sources": entries},
        ],
    }
    _write_index(index_dir, updated)
    remove_unlisted(index_dir / "segments", {s["name"] for s in updated["segments"]})  # replaced ones


def _write_index(index_dir: Path, index: dict[str, Any]) -> None:
    """Replace index.json in one rename: the moment the new segment becomes part of the index."""
    atomic_write_text(index_dir / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Public API


def dedup_datasets(
    input_dirs: list[str | Path],
    output_dir: str | Path,
    index_dir: str | Path | None,
    config: DedupConfig,
    work_dir: str | Path,
) -> ds.Manifest:
    """Deduplicate the input datasets together (and against ``index_dir`` when given).

    Writes one output shard per input shard (same order), ``rejects/`` with ``duplicate_of``, the
    manifest (report in ``extra["dedup"]``), and then adds the inputs to the index.
    """
    input_dirs = [Path(d) for d in input_dirs]
    output_dir, work = Path(output_dir), Path(work_dir) / "dedup-sketches"
    index_path = Path(index_dir) if index_dir is not None else None
    fingerprint = config.index_fingerprint()
    index = _read_index(index_path)
    if index["fingerprint"] not in (None, fingerprint):
        raise ValueError(
            f"index {index_path} was built with {index['fingerprint']}, this config needs {fingerprint}: "
            "use a new index directory"
        )
    batch_key = _batch_key(input_dirs)
    slot = f"{output_dir.parent.name}/{output_dir.name}"  # e.g. <snapshot>/dedup: what the inputs are
    position, indexed = ds.index_position(index["segments"], batch_key, slot)
    replaced = not indexed and position < len(index["segments"])
    segments = index["segments"][:position]
    if not indexed:
        index = {**index, "segments": segments}
    sources = _index_sources(index_path, segments) if index_path else []
    first_new = sum(s.rows for s in sources)

    shards = [p for d in input_dirs for p in ds.shard_paths(d)]
    for shard in shards:
        names = pq.read_schema(shard).names
        missing = [c for c in ("doc_id", "text") if c not in names]
        if missing:
            raise ValueError(f"{shard}: no {', '.join(map(repr, missing))} column: not a document dataset")
    manifests = [ds.read_manifest(d) for d in input_dirs]
    new_rows = sum(m.rows for m in manifests)
    plan = _plan(first_new + new_rows, sum(s.bytes for m in manifests for s in m.shards), config)
    bands, rows = config.lsh_bands()
    print(
        f"dedup: {new_rows} new + {first_new} indexed documents, LSH {bands} bands x {rows} rows, "
        f"{plan.partitions_per_band} partition(s) per band; estimated peak memory "
        f"{plan.memory_bytes / 2**20:.1f} MiB (largest structure: one band partition), "
        f"work disk {plan.disk_bytes / 2**20:.1f} MiB",
        flush=True,
    )
    shutil.rmtree(work, ignore_errors=True)  # sketches are redone: a re-run never trusts a dead run's
    hasher = minhash.MinHasher(config.num_perm, config.seed)
    gid = first_new
    peak_sketch = 0
    for i, shard in enumerate(shards):
        count, held = sketch_shard(shard, _source_dir(work, i), gid, config, hasher)
        sources.append(Source(_source_dir(work, i), gid, count, indexed=False))
        gid += count
        peak_sketch = max(peak_sketch, held)

    run = _Run(sources, first_new, config, plan)
    exact_groups = run.exact_groups() if config.exact else []
    pairs = run.candidate_pairs(bands, exact_groups) if config.near else np.empty((0, 2), dtype=np.int64)
    edges, rejected = run.verify(pairs)
    involved = np.concatenate([*exact_groups, np.array([e[:2] for e in edges], dtype=np.int64).ravel()])
    meta = _load_meta(sources, involved)
    # index survivors that only the documents pointing to them brought in
    roots = {m["root_gid"] for m in meta.values() if "root_gid" in m and m["root_gid"] not in meta}
    meta.update(_load_meta(sources, np.array(sorted(roots), dtype=np.int64)))
    decisions = _decide(exact_groups, edges, meta, first_new)
    root_ids = {d.root: meta[d.root]["doc_id"] for d in decisions.values()}
    examples = sorted(rejected, key=lambda e: (-e[2], e[:2]))[: config.examples]
    meta.update(_load_meta(sources, np.array([e[:2] for e in examples], dtype=np.int64).ravel()))

    results = _write_outputs(
        shards, output_dir, sources[len(sources) - len(shards) :], decisions, root_ids, config
    )
    report = _report(decisions, edges, rejected, meta, config)
    report.update(
        {
            "candidate_pairs": len(pairs),
            "bands": bands,
            "rows": rows,
            "partitions_per_band": plan.partitions_per_band,
            "estimated_memory_bytes": plan.memory_bytes,
            "estimated_disk_bytes": plan.disk_bytes,
            "peak_partition_bytes": run.peak_partition_bytes,
            "peak_sketch_shard_bytes": peak_sketch,
            "indexed_documents": first_new,
            "index_already_had_inputs": indexed,
            "index_replaced_earlier_version": replaced,
        }
    )
    schema = pq.read_schema(shards[0]) if shards else ds.DOCUMENT_SCHEMA
    if config.annotate:
        schema = schema.append(DUP_CLUSTER)
    manifest = finalize_dataset(
        output_dir,
        STAGE,
        results,
        schema,
        config,
        code_version(sys.modules[__name__]),
        [ds.input_ref(d) for d in input_dirs],
        extra={"dedup": report},
    )
    if index_path is not None and not indexed:
        new_sources = sources[len(sources) - len(shards) :]
        _add_segment(index_path, index, slot, batch_key, new_sources, decisions, root_ids, fingerprint)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _write_outputs(
    shards: list[Path],
    output_dir: Path,
    sources: list[Source],
    decisions: dict[int, _Decision],
    root_ids: dict[int, str],
    config: DedupConfig,
) -> list[ShardResult]:
    results = []
    for index, (shard, source) in enumerate(zip(shards, sources, strict=True)):
        stats = StageStats(STAGE)
        parquet = pq.ParquetFile(shard)
        schema = parquet.schema_arrow.append(DUP_CLUSTER) if config.annotate else parquet.schema_arrow
        gid = source.gid_start
        with ds.ShardWriter(output_dir / shard_name(index), schema) as writer:
            for batch in parquet.iter_batches(batch_size=ds.ROW_GROUP_SIZE):
                for doc in batch.to_pylist():
                    stats.docs_in += 1
                    decision = decisions.get(gid)
                    gid += 1
                    if config.annotate:
                        writer.write(
                            {**doc, "dup_cluster": root_ids[decision.root] if decision else doc["doc_id"]}
                        )
                    elif decision:
                        stats.drop(doc, decision.rule, decision.detail, duplicate_of=root_ids[decision.root])
                        continue
                    else:
                        writer.write(doc)
                    stats.kept += 1
        stats.check_accounting()
        results.append(
            ShardResult(
                shard=writer.info, rejects=write_rejects(stats, output_dir, index), stats=stats.to_dict()
            )
        )
    return results


def _report(
    decisions: dict[int, _Decision],
    edges: list[tuple[int, int, float, float]],
    rejected: list[tuple[int, int, float, float]],
    meta: dict[int, dict[str, Any]],
    config: DedupConfig,
) -> dict[str, Any]:
    """Clusters, their sizes, removals by kind and example pairs (for the manifest and the UI)."""
    cluster_sizes = Counter(d.root for d in decisions.values())
    histogram = Counter(size + 1 for size in cluster_sizes.values())  # + the survivor

    def example(edge: tuple[int, int, float, float]) -> dict[str, Any]:
        a, b, jaccard, containment = edge
        return {
            "a": meta[a]["doc_id"],
            "b": meta[b]["doc_id"],
            "jaccard": round(jaccard, 4),
            "containment": round(containment, 4),
        }

    by_rule = Counter(d.rule for d in decisions.values())
    return {
        "clusters": len(cluster_sizes),
        "cluster_size_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "removed_exact": by_rule["exact_duplicate"],
        "removed_near": by_rule["near_duplicate"],
        "annotated_only": config.annotate,
        "verified_pairs": len(edges),
        "rejected_candidates": len(rejected),
        # the closest calls on both sides of the verification rule
        "example_pairs": [example(e) for e in sorted(edges, key=lambda e: (e[2], e[:2]))[: config.examples]],
        "example_rejected": [
            example(e) for e in sorted(rejected, key=lambda e: (-e[2], e[:2]))[: config.examples]
        ],
    }


def dedup_file(
    input_path: str | Path, output_path: str | Path, config: DedupConfig | None = None, annotate: bool = False
) -> dict[str, Any]:
    """Deduplicate one JSONL or Parquet file with a ``text`` column (the per-stage debugging CLI).

    Rows without ``doc_id`` get their ``id`` field, else ``<file name>:<row number>``. Writes the kept
    rows (all rows with ``dup_cluster`` when ``annotate``) and returns the report, with the rejects.
    """
    input_path = Path(input_path)
    config = (config or DedupConfig()).model_copy(update={"annotate": annotate})
    rows = []
    for number, row in enumerate(ds.iter_file_rows(input_path), 1):
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{input_path}: row {number} has no text field")
        rows.append({**row, "doc_id": file_doc_id(row, input_path.name, number)})
    with tempfile.TemporaryDirectory(prefix="dedup-file-") as tmp:
        dataset = Path(tmp) / "input"
        table = pa.table({"doc_id": [r["doc_id"] for r in rows], "text": [r["text"] for r in rows]})
        shard = ds.write_table(table, dataset / shard_name(0))
        ds.write_manifest(
            dataset, ds.Manifest(stage="file", schema=ds.schema_description(table.schema), shards=[shard])
        )
        manifest = dedup_datasets([dataset], Path(tmp) / "output", None, config, Path(tmp) / "work")
        kept = {r["doc_id"]: r.get("dup_cluster") for r in ds.iter_rows(Path(tmp) / "output")}
        rejects = list(ds.iter_rows(Path(tmp) / "output" / "rejects"))
    if annotate:
        out = [{**r, "dup_cluster": kept[r["doc_id"]]} for r in rows]
    else:
        out = [r for r in rows if r["doc_id"] in kept]
    ds.write_file_rows(out, output_path)
    report = dict(manifest.extra["dedup"])
    report["rejects"] = [{k: r[k] for k in ("doc_id", "rule", "detail", "duplicate_of")} for r in rejects]
    return report
