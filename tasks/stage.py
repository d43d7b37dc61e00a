"""The one small contract every document stage follows: documents in, documents out, stats.

A stage is an object with a ``name``, a pydantic ``config``, the columns it adds
(``output_fields``) and ``process(docs, stats)``, a generator that yields the documents it keeps
and reports each one it does not keep through ``stats.drop`` (a rule said no) or
``stats.quarantine`` (the input was broken). Nothing disappears silently: for every stage and
shard, ``docs_in == kept + dropped + quarantined`` is checked before the shard is accepted.

Stages therefore compose (chain the generators), run on a single file for debugging, and run on a
dataset shard by shard inside a Prefect task, all through the functions below.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from tasks import dataset as ds

Document = dict[str, Any]

# A reject record keeps at most this much text: enough to judge the rule, bounded for 30 MB pages.
REJECT_TEXT_CHARS = 2000


@dataclass
class StageStats:
    """Counts for one stage over one shard (or, merged, over a dataset), plus the reject records."""

    stage: str
    docs_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def drop(self, doc: Document, rule: str, detail: str = "", duplicate_of: str | None = None) -> None:
        self.dropped[rule] += 1
        self.rejects.append(self._record(doc, "dropped", rule, detail, duplicate_of))

    def quarantine(self, rule: str, detail: str = "", doc: Document | None = None, **where: Any) -> None:
        """Record input that could not be processed (corrupt record, undecodable payload, ...).

        ``where`` may give ``url``, ``source_file``, ``source_offset`` when there is no document.
        """
        self.quarantined[rule] += 1
        self.rejects.append(self._record({**where, **(doc or {})}, "quarantined", rule, detail, None))

    def _record(
        self, doc: Document, kind: str, rule: str, detail: str, duplicate_of: str | None
    ) -> dict[str, Any]:
        text = doc.get("text")
        return {
            "doc_id": doc.get("doc_id"),
            "url": doc.get("url"),
            "stage": self.stage,
            "kind": kind,
            "rule": rule,
            "detail": detail[:1000],
            "source_file": doc.get("source_file"),
            "source_offset": doc.get("source_offset"),
            "duplicate_of": duplicate_of,
            "text": text[:REJECT_TEXT_CHARS] if isinstance(text, str) else None,
        }

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    def check_accounting(self) -> None:
        accounted = self.kept + self.n_dropped + self.n_quarantined
        if self.docs_in != accounted:
            raise AssertionError(
                f"stage {self.stage}: {self.docs_in} documents in but {self.kept} kept + "
                f"{self.n_dropped} dropped + {self.n_quarantined} quarantined = {accounted}"
            )

    def merge(self, other: StageStats | dict[str, Any]) -> None:
        other = other if isinstance(other, StageStats) else StageStats.from_dict(other)
        self.docs_in += other.docs_in
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.quarantined.update(other.quarantined)
        for key, value in other.extra.items():
            if isinstance(value, int | float) and isinstance(self.extra.get(key, 0), int | float):
                self.extra[key] = self.extra.get(key, 0) + value
            else:
                self.extra.setdefault(key, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "docs_in": self.docs_in,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "quarantined": dict(sorted(self.quarantined.items())),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageStats:
        return cls(
            stage=data["stage"],
            docs_in=data["docs_in"],
            kept=data["kept"],
            dropped=Counter(data.get("dropped", {})),
            quarantined=Counter(data.get("quarantined", {})),
            extra=dict(data.get("extra", {})),
        )


class DocumentStage(ABC):
    """Base of every document stage. Subclasses set ``name``, ``output_fields`` and ``process``."""

    name: ClassVar[str]
    output_fields: ClassVar[list[pa.Field]] = []

    def __init__(self, config: BaseModel):
        self.config = config

    @abstractmethod
    def process(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        """Yield kept documents; report every other one via ``stats.drop``/``stats.quarantine``."""

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        schema = input_schema
        for f in self.output_fields:
            index = schema.get_field_index(f.name)
            schema = schema.set(index, f) if index >= 0 else schema.append(f)
        return schema

    def code_version(self) -> str:
        return code_version(sys.modules[type(self).__module__])


def counted(docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
    for doc in docs:
        stats.docs_in += 1
        yield doc


def run_stage(stage: DocumentStage, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
    """Run ``stage`` over ``docs``, counting what goes in and what comes out."""
    for doc in stage.process(counted(docs, stats), stats):
        stats.kept += 1
        yield doc


def file_doc_id(row: Document, file_name: str, number: int) -> str:
    """A row's document id in a plain file: its ``doc_id``, else its ``id``, else ``<file name>:<row number>``."""
    if row.get("doc_id"):
        return str(row["doc_id"])
    return str(row["id"]) if row.get("id") is not None else f"{file_name}:{number}"


def file_documents(path: str | Path) -> Iterator[Document]:
    """The rows of a JSONL or Parquet file as documents, each with a ``doc_id`` (``file_doc_id``)."""
    name = Path(path).name
    for number, row in enumerate(ds.iter_file_rows(path), 1):
        yield {**row, "doc_id": file_doc_id(row, name, number)}


# ---------------------------------------------------------------------------------------------
# Code versions and cache keys


# The project's own packages: imports of these are followed, everything else is library code.
PROJECT_PACKAGES = ("flows", "tasks", "model")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of project module ``name`` (``tasks.text`` -> tasks/text.py), None if none."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(module: str, path: Path) -> set[str]:
    """Modules named by every import in ``path`` (top level, inside functions, under TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from tasks import text`
    return names


def project_modules(*modules: str, root: Path = PROJECT_ROOT) -> list[str]:
    """``modules`` and every project module they import, transitively, read from their source."""
    seen: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        path = module_file(name, root)
        if path is None or name in seen:
            continue
        seen[name] = path
        pending.extend(_imported_names(name, path))
    return sorted(seen)


def module_hashes(*modules: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """sha256 of the source of ``modules`` and of every project module they import."""
    return {
        name: hashlib.sha256(module_file(name, root).read_bytes()).hexdigest()  # type: ignore[union-attr]
        for name in project_modules(*modules, root=root)
    }


def code_version(*modules: ModuleType | str) -> str:
    """Hash of the source of ``modules`` and of every project module they import, transitively:
    edit a stage or any helper it uses, and its work is redone."""
    names = [m if isinstance(m, str) else m.__name__ for m in modules]
    return code_version_of(module_hashes(*names))


def code_version_of(hashes: dict[str, str]) -> str:
    """The code version from per-module source hashes (as ``module_hashes`` returns them)."""
    digest = hashlib.sha256()
    for name, sha in sorted(hashes.items()):
        digest.update(f"{name}\0{sha}\0".encode())
    return digest.hexdigest()[:16]


def config_json(config: BaseModel | dict[str, Any]) -> str:
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def cache_key(stage: str, config: BaseModel | dict[str, Any], code: str, *inputs: str) -> str:
    """Key of a stage's work: stage name + config + code version + fingerprints of its inputs."""
    digest = hashlib.sha256()
    for part in (stage, config_json(config), code, *inputs):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{stage}-{digest.hexdigest()[:24]}"


class CacheKey(BaseModel):
    """What one unit of a stage's work depends on. The key is a hash of these; the done record keeps
    them, so that a changed key can be explained (config, code module, input)."""

    stage: str
    step: Literal["run", "finalize"] = "run"
    config: dict[str, Any]
    modules: dict[str, str]  # project module -> sha256 of its source
    inputs: list[str]  # what identifies the inputs (digests, fingerprints, an earlier key)

    @property
    def value(self) -> str:
        name = self.stage if self.step == "run" else f"{self.stage}-finalize"
        return cache_key(name, self.config, code_version_of(self.modules), *self.inputs)


# ---------------------------------------------------------------------------------------------
# Running a stage on a dataset, shard by shard


class ShardResult(BaseModel):
    """What a per-shard task returns to the flow: small, JSON-able, no documents."""

    shard: ds.ShardInfo
    rejects: ds.ShardInfo
    stats: dict[str, Any]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def run_stage_on_shard(
    stage: DocumentStage, input_shard: str | Path, output_dir: str | Path, index: int
) -> ShardResult:
    """Stream one input shard through ``stage`` into ``output_dir`` (kept docs) and its rejects/."""
    output_dir = Path(output_dir)
    input_file = pq.ParquetFile(input_shard)
    stats = StageStats(stage.name)

    def docs() -> Iterator[Document]:
        for batch in input_file.iter_batches(batch_size=ds.ROW_GROUP_SIZE):
            yield from batch.to_pylist()

    schema = stage.output_schema(input_file.schema_arrow)
    with ds.ShardWriter(output_dir / shard_name(index), schema) as writer:
        for doc in run_stage(stage, docs(), stats):
            writer.write(doc)
    stats.check_accounting()
    rejects = write_rejects(stats, output_dir, index)
    return ShardResult(shard=writer.info, rejects=rejects, stats=stats.to_dict())


def write_rejects(stats: StageStats, output_dir: str | Path, index: int) -> ds.ShardInfo:
    table = ds.rows_to_table(stats.rejects, ds.REJECT_SCHEMA)
    return ds.write_table(table, Path(output_dir) / "rejects" / shard_name(index))


def finalize_dataset(
    output_dir: str | Path,
    stage: str,
    results: list[ShardResult],
    schema: pa.Schema,
    config: BaseModel | dict[str, Any],
    code: str,
    inputs: list[ds.InputRef],
    extra: dict[str, Any] | None = None,
) -> ds.Manifest:
    """Write the rejects manifest, then the dataset's manifest (last: it makes the dataset exist)."""
    output_dir = Path(output_dir)
    totals = StageStats(stage)
    for result in results:
        totals.merge(result.stats)
    totals.check_accounting()
    config_data = json.loads(config_json(config))
    ds.write_manifest(
        output_dir / "rejects",
        ds.Manifest(
            stage=f"{stage}.rejects",
            schema=ds.schema_description(ds.REJECT_SCHEMA),
            shards=[r.rejects for r in results],
            config=config_data,
            code_version=code,
            inputs=inputs,
            stats=totals.to_dict(),
        ),
    )
    manifest = ds.Manifest(
        stage=stage,
        schema=ds.schema_description(schema),
        shards=[r.shard for r in results],
        config=config_data,
        code_version=code,
        inputs=inputs,
        stats=totals.to_dict(),
        extra=extra or {},
    )
    ds.write_manifest(output_dir, manifest)
    return manifest


def run_stage_on_dataset(stage: DocumentStage, input_dir: str | Path, output_dir: str | Path) -> ds.Manifest:
    """Run a stage over every shard of a dataset in this process (tests, CLI, small runs)."""
    inputs = ds.read_manifest(input_dir)
    paths = ds.shard_paths(input_dir, inputs)
    results = [run_stage_on_shard(stage, path, output_dir, i) for i, path in enumerate(paths)]
    schema = (
        stage.output_schema(pq.read_schema(paths[0])) if paths else stage.output_schema(ds.DOCUMENT_SCHEMA)
    )
    return finalize_dataset(
        output_dir, stage.name, results, schema, stage.config, stage.code_version(), [ds.input_ref(input_dir)]
    )
