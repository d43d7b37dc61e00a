"""The stages of the data refresh, each described once, in the order they run.

A ``Stage`` names its module, its pydantic config, how it runs (on one shard, or on whole datasets)
and how it runs on one file for debugging. Its code is its module plus every project module that
module imports, found in their source (``tasks.stage.project_modules``), never listed by hand: the
Prefect cache keys, the manifests' ``code_version``, the flow, the CLI's ``stage`` command and
``pretrain cache`` all read it from here. Stage modules load lazily: fastText loads only where
langid runs.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks import dataset as ds
from tasks import stage as st

Table = list[dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the data refresh.

    ``scope`` "shard": ``run(config, source, output_dir, index, snapshot)`` writes one output shard
    (one Prefect task per shard; the flow then writes the manifest). ``scope`` "dataset":
    ``run(config, inputs, output_dir, **paths)`` writes a whole dataset, manifest included.
    ``run_file(config, input, output)`` runs it on one JSONL/Parquet/crawl file and returns its report.
    ``tables(manifest)`` are the stage's own tables (artifact key -> rows), read from its manifest.
    """

    name: str
    module: str
    config_class: str
    scope: Literal["shard", "dataset"]
    run: Callable[..., Any]
    summary: str
    run_file: Callable[..., dict[str, Any]] | None = None
    tables: Callable[[ds.Manifest], dict[str, Table]] | None = None

    def config_model(self) -> type[BaseModel]:
        return getattr(importlib.import_module(self.module), self.config_class)

    def config(self, data: BaseModel | dict[str, Any] | None = None) -> BaseModel:
        """The stage's config, validated from ``data`` (a config, a dict, or None: the defaults)."""
        data = data.model_dump(mode="json") if isinstance(data, BaseModel) else (data or {})
        return self.config_model().model_validate(data)

    def modules(self) -> list[str]:
        """The project modules this stage's code consists of."""
        return st.project_modules(self.module)

    def module_hashes(self) -> dict[str, str]:
        return st.module_hashes(self.module)

    def code_version(self) -> str:
        """What the cache key and the manifest's ``code_version`` both hold."""
        return st.code_version(self.module)


# ---------------------------------------------------------------------------------------------
# Running each stage: thin adapters from the uniform call to each module's own function.


_document_stages: dict[tuple[str, str], st.DocumentStage] = {}


def document_stage(name: str, config: BaseModel) -> st.DocumentStage:
    """The ``DocumentStage`` object of ``name``, built once per process and config (models load once)."""
    key = (name, config.model_dump_json())
    if key not in _document_stages:
        module = importlib.import_module(STAGES[name].module)
        stage_class = next(
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, st.DocumentStage) and getattr(v, "name", None) == name
        )
        _document_stages[key] = stage_class(config)
    return _document_stages[key]


def _ingest_shard(config: BaseModel, source: str, output_dir: str, index: int, snapshot: str | None):
    from tasks import ingest

    return ingest.ingest_file(source, output_dir, index, config, snapshot)


def _document_shard(name: str) -> Callable[..., st.ShardResult]:
    def run(config: BaseModel, source: str, output_dir: str, index: int, snapshot: str | None):
        return st.run_stage_on_shard(document_stage(name, config), source, output_dir, index)

    return run


def _boilerplate(config: BaseModel, inputs: list[str], output_dir: str, index_dir: str, work_dir: str):
    from tasks import boilerplate

    return boilerplate.boilerplate_datasets(inputs, output_dir, index_dir, config, work_dir)


def _dedup(config: BaseModel, inputs: list[str], output_dir: str, index_dir: str, work_dir: str):
    from tasks import dedup

    return dedup.dedup_datasets(inputs, output_dir, index_dir, config, work_dir)


def _tokenizer(config: BaseModel, inputs: list[str], output_dir: str):
    from tasks import tokenizer

    return tokenizer.train_tokenizer(inputs, output_dir, config)


def _pack(config: BaseModel, inputs: list[str], output_dir: str, tokenizer_dir: str):
    from tasks import pack

    return pack.pack_datasets(inputs, tokenizer_dir, output_dir, config)


# On one file (`pretrain stage NAME --input F --output F`)


def _write_documents(
    stage: str, output: str, run: Callable[[st.StageStats], Iterator[st.Document]]
) -> dict[str, Any]:
    stats = st.StageStats(stage)
    ds.write_file_rows(run(stats), output)
    stats.check_accounting()
    rejects = Path(output).with_suffix(".rejects.jsonl")
    ds.write_file_rows(stats.rejects, rejects)
    return {**stats.to_dict(), "rejects_file": str(rejects)}


def _ingest_file(config: BaseModel, input: str, output: str) -> dict[str, Any]:
    from tasks import ingest

    return _write_documents("ingest", output, lambda stats: ingest.iter_documents(input, config, stats))


def _document_file(name: str) -> Callable[..., dict[str, Any]]:
    def run(config: BaseModel, input: str, output: str) -> dict[str, Any]:
        stage = document_stage(name, config)
        return _write_documents(
            name, output, lambda stats: st.run_stage(stage, st.file_documents(input), stats)
        )

    return run


def _boilerplate_file(config: BaseModel, input: str, output: str) -> dict[str, Any]:
    from tasks import boilerplate

    return boilerplate.boilerplate_file(input, output, config)


def _dedup_file(config: BaseModel, input: str, output: str) -> dict[str, Any]:
    from tasks import dedup

    return dedup.dedup_file(input, output, config, config.annotate)


# The stage's own tables, from its manifest


def _flat_scalars(data: dict[str, Any]) -> dict[str, Any]:
    """Scalars of a report for one table row; nested parts as compact JSON."""
    return {k: v if isinstance(v, int | float | str) else json.dumps(v)[:300] for k, v in data.items()}


def _boilerplate_tables(manifest: ds.Manifest) -> dict[str, Table]:
    return {"boilerplate-hosts": manifest.extra.get("boilerplate", {}).get("hosts", [])}


def _dedup_tables(manifest: ds.Manifest) -> dict[str, Table]:
    return {"dedup-clusters": [_flat_scalars(manifest.extra.get("dedup", {}))]}


def _tokenizer_tables(manifest: ds.Manifest) -> dict[str, Table]:
    return {"tokenizer-fertility": manifest.extra.get("fertility", [])}


def _pack_tables(manifest: ds.Manifest) -> dict[str, Table]:
    splits = manifest.extra.get("packing", {}).get("splits", {})
    return {
        "pack-splits": [
            {"split": name, **{k: v for k, v in split.items() if isinstance(v, int | float)}}
            for name, split in splits.items()
        ]
    }


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "ingest",
            "tasks.ingest",
            "IngestConfig",
            "shard",
            _ingest_shard,
            "WARC/WET -> documents with provenance; bad input quarantined",
            run_file=_ingest_file,
        ),
        Stage(
            "langid",
            "tasks.langid",
            "LangIdConfig",
            "shard",
            _document_shard("langid"),
            "fastText language ID, keep-list, per-language thresholds",
            run_file=_document_file("langid"),
        ),
        Stage(
            "quality",
            "tasks.quality",
            "QualityConfig",
            "shard",
            _document_shard("quality"),
            "Gopher, C4, FineWeb rules and blocklists, language-aware",
            run_file=_document_file("quality"),
        ),
        Stage(
            "classifier",
            "tasks.classifier",
            "ClassifierConfig",
            "shard",
            _document_shard("classifier"),
            "fastText classifiers (quality, toxicity, ...): scores, per-language thresholds (opt-in)",
            run_file=_document_file("classifier"),
        ),
        Stage(
            "pii",
            "tasks.pii",
            "PiiConfig",
            "shard",
            _document_shard("pii"),
            "emails, IP addresses, phones -> placeholders",
            run_file=_document_file("pii"),
        ),
        Stage(
            "boilerplate",
            "tasks.boilerplate",
            "BoilerplateConfig",
            "dataset",
            _boilerplate,
            "lines repeated across a host's or the corpus's pages removed; counts kept across refreshes",
            run_file=_boilerplate_file,
            tables=_boilerplate_tables,
        ),
        Stage(
            "dedup",
            "tasks.dedup",
            "DedupConfig",
            "dataset",
            _dedup,
            "exact + verified MinHash LSH against a persistent index",
            run_file=_dedup_file,
            tables=_dedup_tables,
        ),
        Stage(
            "tokenizer",
            "tasks.tokenizer",
            "TokenizerConfig",
            "dataset",
            _tokenizer,
            "byte-level BPE on a mixture sample; fertility per language",
            tables=_tokenizer_tables,
        ),
        Stage(
            "pack",
            "tasks.pack",
            "PackConfig",
            "dataset",
            _pack,
            "tokenize, shuffle and pack seq_len+1 windows; train/validation split",
            tables=_pack_tables,
        ),
    )
}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; one of: {', '.join(STAGES)}")
    return STAGES[name]


def stages_from(name: str) -> list[str]:
    """``name`` and every stage that runs after it (what depends on its output)."""
    names = list(STAGES)
    return names[names.index(stage(name).name) :]


def file_stages() -> list[str]:
    """The stages that run on a single file (`pretrain stage NAME`)."""
    return [s.name for s in STAGES.values() if s.run_file is not None]
