"""The dataset contract every stage reads and writes.

A dataset is a directory holding Parquet shards and a ``manifest.json``. The manifest names each
shard with its row count and sha256, the schema, the stage config and code version that made the
dataset, its statistics, and the manifests it was made from (``inputs``): following ``inputs``
back gives the lineage of any dataset down to the crawl files.

Shards and manifests are written atomically (temporary file in the same directory, then
``os.replace``) and deterministically (no timestamps, fixed Parquet settings), so a killed run
leaves no partial file and a re-run writes the same bytes. A directory without ``manifest.json``
is not a dataset: readers never look at shards the manifest does not list.

A dataset's identity is ``dataset_digest``, a hash of its manifest without locations: the same
bytes in another workdir or on object storage have the same digest. Datasets a training run reads
are published as immutable versions (``publish_version``, ``resolve_version``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from tasks.atomic import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

# Columns every document carries from ingest on; later stages add their own columns.
DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("warc_record_id", pa.string()),
        pa.field("date", pa.string()),  # ISO 8601 WARC-Date
        pa.field("source_file", pa.string()),
        pa.field("source_offset", pa.int64()),  # byte offset of the WARC record in source_file
        pa.field("snapshot", pa.string()),
        pa.field("content_type", pa.string()),
        pa.field("charset", pa.string()),
    ]
)

# One row per document a stage did not pass on, and why. ``text`` is kept so a person can judge
# the rule; ``duplicate_of`` is set by dedup.
REJECT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # "dropped" or "quarantined"
        pa.field("rule", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("source_offset", pa.int64()),
        pa.field("duplicate_of", pa.string()),
        pa.field("text", pa.string()),
    ]
)

_PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3, "write_statistics": True}
ROW_GROUP_SIZE = 2048


class ShardInfo(BaseModel):
    path: str = Field(description="Shard file name, relative to the dataset directory.")
    rows: int
    bytes: int
    sha256: str


class InputRef(BaseModel):
    """What a dataset was made from: another dataset (by its ``dataset_digest``) or a raw file such
    as a crawl WARC (by a fingerprint of its size and modification time or ETag).

    ``path`` says where the input was read from, for a person or a lineage walk on this machine; it
    is no part of the identity: ``dataset_digest`` leaves it out.
    """

    path: str
    digest: str | None = None
    fingerprint: str | None = None


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    stage: str
    schema_: list[dict[str, str]] = Field(alias="schema", default_factory=list)
    shards: list[ShardInfo] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    code_version: str = ""
    inputs: list[InputRef] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    model_config = {"populate_by_name": True}

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> ShardInfo:
    """Write one Parquet shard atomically and return its ShardInfo (name relative to its dir)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, **_PARQUET_OPTIONS)
    return ShardInfo(
        path=target.name, rows=table.num_rows, bytes=target.stat().st_size, sha256=sha256_file(target)
    )


class ShardWriter:
    """Stream rows into one Parquet shard, a row group at a time, replacing ``path`` atomically on close.

    Memory stays at one row group whatever the shard's size. Used as a context manager: leaving the
    block by an exception removes the temporary file and leaves no shard.
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema, row_group_size: int = ROW_GROUP_SIZE):
        self.path = Path(path)
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._atomic = atomic_path(self.path)
        self.info: ShardInfo | None = None

    def __enter__(self) -> ShardWriter:
        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema, **_PARQUET_OPTIONS)
        return self

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(rows_to_table(self._buffer, self.schema).select(self.schema.names))
            self.rows += len(self._buffer)
            self._buffer = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
            self._writer.close()
        finally:
            self._atomic.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.info = ShardInfo(
                path=self.path.name,
                rows=self.rows,
                bytes=self.path.stat().st_size,
                sha256=sha256_file(self.path),
            )


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) to a table with exactly ``schema`` first and any extra columns after, inferred."""
    if not rows:
        return schema.empty_table()
    arrays = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    fields = list(schema)
    for name in (k for k in rows[0] if schema.get_field_index(k) < 0):
        arrays.append(pa.array([r.get(name) for r in rows]))
        fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def schema_description(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def manifest_path(dataset_dir: str | os.PathLike[str]) -> Path:
    return Path(dataset_dir) / MANIFEST


def write_manifest(dataset_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write the manifest last, atomically: from then on the dataset exists."""
    target = manifest_path(dataset_dir)
    atomic_write_text(target, manifest.to_json())
    return target


def read_manifest(dataset_dir: str | os.PathLike[str]) -> Manifest:
    """The manifest of a dataset dir, local or a URL (``s3://...``: read through fsspec)."""
    location = os.fspath(dataset_dir)
    try:
        if "://" in location:
            with fsspec.open(f"{location.rstrip('/')}/{MANIFEST}", "rb") as f:
                text = f.read().decode("utf-8")
        else:
            text = manifest_path(location).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{dataset_dir} is not a dataset: no {MANIFEST} (incomplete or never written)"
        ) from None
    return Manifest.model_validate_json(text)


def dataset_digest(dataset_dir: str | os.PathLike[str]) -> str:
    """Content-only identity of a dataset (64 hex): the same bytes anywhere give the same digest.

    It hashes the manifest, which names every shard by its sha256, minus the location of each input
    (inputs count by their own digests). It trusts the recorded shard hashes and reads no shard:
    ``verify`` is what checks the shards against them.
    """
    content = read_manifest(dataset_dir).model_dump(by_alias=True)
    for ref in content["inputs"]:
        del ref["path"]
    return sha256_bytes(
        json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


def mlflow_digest(dataset_dir: str | os.PathLike[str]) -> str:
    """The digest MLflow dataset entries carry (MLflow keeps 36 characters at most)."""
    return dataset_digest(dataset_dir)[:32]


def index_position(entries: list[dict[str, Any]], batch_key: str, slot: str) -> tuple[int, bool]:
    """Where a batch of inputs stands in a persistent index (entries with ``batch_key`` and ``slot``,
    oldest first): (how many entries it is checked against, whether it is in the index already).

    Inputs already indexed are checked against the entries before theirs. A new version of indexed
    inputs (same slot, e.g. ``<snapshot>/dedup``, another batch key: an upstream stage changed)
    replaces its old entry and every later one, never meeting its old self; the later snapshots'
    cache keys chain this one's, so they redo and come back. Other inputs go last."""
    keys = [e["batch_key"] for e in entries]
    if batch_key in keys:
        return keys.index(batch_key), True
    slots = [e.get("slot") for e in entries]
    return (slots.index(slot) if slot in slots else len(entries)), False


def input_ref(dataset_dir: str | os.PathLike[str]) -> InputRef:
    return InputRef(path=str(Path(dataset_dir).resolve()), digest=dataset_digest(dataset_dir))


# ---------------------------------------------------------------------------------------------
# Versioned publication: a dataset a run may read (tokenizer, packed data) is never rewritten. Its
# root holds immutable ``versions/<v>/`` (``<v>`` = the first 16 hex of its digest) and a
# ``LATEST`` file naming the newest; a run pins the version dir it started with.

VERSIONS = "versions"
LATEST = "LATEST"
VERSION_CHARS = 16


def publish_version(built_dir: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """Move the finished dataset ``built_dir`` to ``root/versions/<v>/`` and point ``root/LATEST`` at it.

    The version dir appears by one rename and LATEST changes by one rename, so a publish killed at
    any point leaves the old LATEST or the new one, each naming a whole version. Publishing content
    that is already a version moves nothing (``built_dir``, a copy of it, is removed) and only points
    LATEST at it. Returns the version dir.
    """
    built, root = Path(built_dir), Path(root)
    version = dataset_digest(built)[:VERSION_CHARS]
    target = root / VERSIONS / version
    target.parent.mkdir(parents=True, exist_ok=True)
    if built.resolve() != target.resolve():
        if (target / MANIFEST).is_file():  # already published: this copy of it is litter
            shutil.rmtree(built)
        else:
            _move_into_place(built, target)
    atomic_write_text(root / LATEST, version + "\n")
    return target


def _move_into_place(built: Path, target: Path) -> None:
    """Rename ``built`` to ``target``; across file systems, copy beside ``target`` first, then rename.

    Losing the race to a concurrent publisher of the same version is fine: its dir holds the same
    content. ``built`` is gone afterwards either way.
    """
    staged = built
    if os.stat(built).st_dev != os.stat(target.parent).st_dev:
        # A temporary name (TEMP_GLOB) so that a killed copy is removed as litter, never published.
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        shutil.copytree(built, staged, dirs_exist_ok=True)
    try:
        os.rename(staged, target)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (target / MANIFEST).is_file():
            raise
        shutil.rmtree(staged)
    if built.exists():
        shutil.rmtree(built)


def resolve_version(path: str | os.PathLike[str]) -> Path:
    """The dataset dir a reader should use: a published root's LATEST version, else ``path`` itself.

    A version dir or a plain dataset resolves to itself; anything else raises FileNotFoundError with
    a one-line message.
    """
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        version = latest.read_text(encoding="utf-8").strip()
        target = path / VERSIONS / version
        if not (target / MANIFEST).is_file():
            raise FileNotFoundError(f"{latest} names version {version!r}, but {target} is not a dataset")
        return target.resolve()
    if (path / MANIFEST).is_file():
        return path.resolve()
    raise FileNotFoundError(
        f"{path} is neither a published dataset (no {LATEST}) nor a dataset (no {MANIFEST})"
    )


def shard_paths(dataset_dir: str | os.PathLike[str], manifest: Manifest | None = None) -> list[Path]:
    manifest = manifest or read_manifest(dataset_dir)
    return [Path(dataset_dir) / s.path for s in manifest.shards]


def verify(dataset_dir: str | os.PathLike[str]) -> Manifest:
    """Check that every shard listed in the manifest exists with its recorded sha256."""
    manifest = read_manifest(dataset_dir)
    for shard in manifest.shards:
        path = Path(dataset_dir) / shard.path
        if not path.exists():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != shard.sha256:
            raise ValueError(f"shard {path}: sha256 {actual} does not match the manifest's {shard.sha256}")
    return manifest


def iter_batches(
    dataset_dir: str | os.PathLike[str], columns: list[str] | None = None, batch_size: int = ROW_GROUP_SIZE
) -> Iterator[pa.RecordBatch]:
    for path in shard_paths(dataset_dir):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def iter_rows(
    dataset_dir: str | os.PathLike[str], columns: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    for batch in iter_batches(dataset_dir, columns=columns):
        yield from batch.to_pylist()


def iter_file_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a single JSONL or Parquet file (the per-stage debugging CLI's input)."""
    path = Path(path)
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_SIZE):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e


def write_file_rows(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write rows to one JSONL or Parquet file atomically; returns the row count."""
    path = Path(path)
    rows = list(rows)
    if path.suffix == ".parquet":
        table = pa.Table.from_pylist(rows) if rows else pa.table({})
        write_table(table, path)
    else:
        body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        atomic_write_text(path, body)
    return len(rows)
