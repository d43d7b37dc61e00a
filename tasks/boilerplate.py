"""Boilerplate removal: lines repeated across many documents of a host or of the corpus (CCNet-style).

A *line* is one line of a document's text (the extractor writes one paragraph per line). Its key is
a hash of its folded tokens (``minhash.line_keys``): the same footer with other case, spacing or
punctuation is the same line; numbers are kept (without them every "Django 1.9.3 release notes"
title and every line of a directory listing in our crawl became one boilerplate line). Lines without
a word token (``}``, ``...``) are never counted or removed. Words are these tokens.

Counts: per (host, line key), the number of documents of the host holding the line at least once,
plus the number of documents per host. A line is boilerplate for a host when one rule holds
(checked in this order, thresholds in ``BoilerplateConfig``):

- ``host_template``: in at least ``host_min_fraction`` of the host's documents (host with at least
  ``host_min_pages`` documents): navigation bars, page templates, whatever their length;
- ``host_repeated``: in at least ``host_min_docs`` documents of the host and ``min_words`` tokens
  long: banners, disclaimers, licence notices (short headings such as "Note" are not boilerplate);
- ``corpus_repeated``: in at least ``corpus_min_docs`` documents on at least ``corpus_min_hosts``
  hosts, ``min_words`` tokens long: licence texts and notices shared by many sites.

How a run goes (``boilerplate_datasets``), two passes like dedup:

1. Count: every input shard is read once; each document's distinct (host, line, words) keys are
   spilled to the work dir, split by epoch (``epoch_field``, the crawl snapshot) and by partition
   (line key modulo ``partitions``).
2. Epoch by epoch, oldest first, partition by partition: the persistent counts (``index_dir``) plus
   this epoch's keys are the cumulative counts; the rules mark the boilerplate keys of the epoch and
   the counts are written to a new generation of the index. Only one partition of the count table is
   in memory at a time (the per-host document counts and the boilerplate keys, a small part of all
   lines, are held whole).
3. Remove: every shard again, through ``BoilerplateStage`` (the ``DocumentStage`` contract): a
   document's boilerplate lines are those marked for its host in its epoch. A document left
   without a word is dropped (``boilerplate_only``); one with lines removed is kept with
   ``boilerplate_lines``/``boilerplate_words`` set, and one ``audit/`` row per rule that removed
   something (lines, words, bytes and an example line). Words and bytes removed per host are in the
   manifest (``extra["boilerplate"]["hosts"]``).

A document is judged by the counts of every document of its epoch and earlier ones, never later:
refreshing snapshots one after the other through the index gives the same counts and the same
outputs as one run over all of them, and never changes published documents. The index keeps one
generation per run (``index.json`` names them, replaced atomically after the outputs); re-running
inputs the index already holds starts from the generation before theirs and adds nothing.
Thresholds are not part of the index: changing them reuses the counts. As with dedup, refreshes
must come in epoch order (a snapshot older than the index's newest would be judged by later counts).

In the data refresh it is a whole-dataset stage like dedup, run per snapshot just before it (same
call shape as ``dedup.dedup_datasets``; index e.g. ``workdir/boilerplate-index``): near-dedup then
compares pages without their shared templates (benchmarks/RESULTS.md, "Boilerplate removal").
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, Field

from tasks import dataset as ds
from tasks import minhash
from tasks.atomic import atomic_write_text, remove_unlisted
from tasks.stage import (
    Document,
    DocumentStage,
    StageStats,
    code_version,
    file_documents,
    finalize_dataset,
    run_stage_on_shard,
    shard_name,
)

STAGE = "boilerplate"
INDEX_FILE = "index.json"
INDEX_FORMAT = 1
NORMALIZATION_VERSION = 1  # bump when line keys change: an index records it
RULES = ("host_template", "host_repeated", "corpus_repeated")
_COUNT_SCHEMA = pa.schema(
    [("host", pa.uint64()), ("line", pa.uint64()), ("words", pa.int32()), ("docs", pa.int64())]
)
_HOST_SCHEMA = pa.schema([("host", pa.uint64()), ("docs", pa.int64())])
_SPILL_SCHEMA = pa.schema([("host", pa.uint64()), ("line", pa.uint64()), ("words", pa.int32())])
AUDIT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("url", pa.string()),
        ("host", pa.string()),
        ("rule", pa.string()),
        ("lines", pa.int32()),
        ("words", pa.int64()),
        ("bytes", pa.int64()),
        ("example", pa.string()),
    ]
)


class BoilerplateConfig(BaseModel):
    """Line-level boilerplate removal from counts over the corpus (thresholds: see the module doc)."""

    host_min_fraction: float = Field(
        0.5, gt=0, le=1, description="host_template: share of the host's documents holding the line."
    )
    host_min_pages: int = Field(10, ge=1, description="host_template only on hosts with this many documents.")
    host_min_docs: int = Field(
        50,
        ge=2,
        description="host_repeated: documents of the host holding the line (untranslated pages "
        "repeat a paragraph in ~30 locales of one site in our crawl: kept below this).",
    )
    corpus_min_docs: int = Field(100, ge=2, description="corpus_repeated: documents holding the line.")
    corpus_min_hosts: int = Field(3, ge=1, description="corpus_repeated: ... on at least this many hosts.")
    min_words: int = Field(
        6, ge=1, description="host_repeated/corpus_repeated: only lines of at least this many tokens."
    )
    partitions: int = Field(
        16, ge=1, description="Count-table partitions (by line key): one is in memory at a time."
    )
    epoch_field: str | None = Field(
        "snapshot",
        description="Column ordering refreshes: documents are judged by counts up to their epoch. None: one epoch.",
    )
    report_hosts: int = Field(50, ge=0, description="Hosts listed in the report (most words removed first).")

    def index_fingerprint(self) -> dict[str, Any]:
        """What the persistent counts depend on: an index is only reused with the same."""
        return {
            "partitions": self.partitions,
            "normalization_version": NORMALIZATION_VERSION,
            "minhash_normalization_version": minhash.NORMALIZATION_VERSION,
            "index_format": INDEX_FORMAT,
        }


# ---------------------------------------------------------------------------------------------
# Line keys


def _key64(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def host_of(doc: Document) -> str:
    """The URL's host name ("" without a URL: such documents count as one host)."""
    url = doc.get("url")
    try:
        return (urlsplit(url).hostname or "") if url else ""
    except ValueError:
        return ""


def document_keys(text: str) -> list[tuple[int, int]]:
    """(key, words) of each line of ``text``, in order ((0, 0) for lines without words)."""
    keys, words = minhash.line_keys(text)
    return list(zip(keys.tolist(), words.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# Pass 2: the document stage


class BoilerplateStage(DocumentStage):
    """Removes the lines marked boilerplate for each document's host and epoch.

    ``marked``: epoch -> {(host key, line key): rule}, from the count pass. The stage collects the
    ``audit`` rows and per-host totals of what it processed (the dataset function writes them).
    """

    name = STAGE
    output_fields: ClassVar[list[pa.Field]] = [
        pa.field("boilerplate_lines", pa.int32()),
        pa.field("boilerplate_words", pa.int32()),
    ]

    def __init__(self, config: BoilerplateConfig, marked: dict[str | None, dict[tuple[int, int], str]]):
        super().__init__(config)
        self.config: BoilerplateConfig
        self.marked = marked
        self.audit: list[dict[str, Any]] = []
        self.hosts: dict[str, Counter] = {}

    def process(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        for doc in docs:
            text = doc.get("text")
            if not isinstance(text, str):
                stats.quarantine("text_missing", f"text is {type(text).__name__}, not a string", doc=doc)
                continue
            host = host_of(doc)
            marked = self.marked.get(
                doc.get(self.config.epoch_field) if self.config.epoch_field else None, {}
            )
            host_key = _key64(host)
            kept, kept_words, removed = [], 0, {}  # rule -> [lines, words, bytes, example]
            lines = document_keys(text)
            for line, (key, words) in zip(text.split("\n"), lines, strict=True):
                rule = marked.get((host_key, key)) if key else None
                if rule is None:
                    kept.append(line)
                    kept_words += words
                    continue
                entry = removed.setdefault(rule, [0, 0, 0, line.strip()])
                entry[0] += 1
                entry[1] += words
                entry[2] += len(line.encode("utf-8", "surrogatepass")) + 1
            totals = self.hosts.setdefault(host, Counter())
            totals["docs"] += 1
            totals["words"] += sum(words for _, words in lines)
            totals["bytes"] += len(text.encode("utf-8", "surrogatepass"))
            if not removed:
                yield {**doc, "boilerplate_lines": 0, "boilerplate_words": 0}
                continue
            totals["docs_changed"] += 1
            for rule, (lines, words, size, example) in sorted(removed.items()):
                stats.extra[f"boilerplate_lines_{rule}"] = (
                    stats.extra.get(f"boilerplate_lines_{rule}", 0) + lines
                )
                stats.extra[f"boilerplate_words_{rule}"] = (
                    stats.extra.get(f"boilerplate_words_{rule}", 0) + words
                )
                totals["words_removed"] += words
                totals["bytes_removed"] += size
                self.audit.append(
                    {
                        "doc_id": doc.get("doc_id"),
                        "url": doc.get("url"),
                        "host": host,
                        "rule": rule,
                        "lines": lines,
                        "words": words,
                        "bytes": size,
                        "example": example[:300],
                    }
                )
            detail = ", ".join(f"{rule}: {v[0]} lines, {v[1]} words" for rule, v in sorted(removed.items()))
            if not kept_words:
                stats.drop(doc, "boilerplate_only", detail)
                continue
            stats.extra["boilerplate_docs_changed"] = stats.extra.get("boilerplate_docs_changed", 0) + 1
            yield {
                **doc,
                "text": "\n".join(kept).strip(),
                "boilerplate_lines": sum(v[0] for v in removed.values()),
                "boilerplate_words": sum(v[1] for v in removed.values()),
            }


# ---------------------------------------------------------------------------------------------
# Pass 1: counting


def _epochs_of(shards: list[Path], epoch_field: str | None) -> list[str | None]:
    """The epochs of the inputs, oldest first (None sorts first: undated documents)."""
    found: set[str | None] = set()
    for shard in shards:
        if epoch_field and epoch_field in pq.read_schema(shard).names:
            found.update(pq.read_table(shard, columns=[epoch_field])[epoch_field].unique().to_pylist())
        else:
            found.add(None)
    return sorted(found, key=lambda e: (e is not None, e or ""))


def _spill_shard(
    shard: Path, index: int, work: Path, epochs: list[str | None], config: BoilerplateConfig
) -> dict[tuple[int, int], int]:
    """Write this shard's distinct (host, line, words) per document to work/e<epoch>/p<part>/; returns
    the documents per (epoch index, host key)."""
    parquet = pq.ParquetFile(shard)
    wanted = [c for c in ("text", "url", config.epoch_field) if c and c in parquet.schema_arrow.names]
    rows: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    host_docs: Counter = Counter()
    for batch in parquet.iter_batches(batch_size=ds.ROW_GROUP_SIZE, columns=wanted):
        for doc in batch.to_pylist():
            if not isinstance(doc.get("text"), str):
                continue  # quarantined by the stage
            epoch = epochs.index(doc.get(config.epoch_field) if config.epoch_field else None)
            host = _key64(host_of(doc))
            host_docs[(epoch, host)] += 1
            for key, words in set(document_keys(doc["text"])):
                if key:
                    rows.setdefault((epoch, key % config.partitions), []).append((host, key, words))
    for (epoch, part), items in rows.items():
        host, line, words = zip(*items, strict=True)
        table = pa.table(
            {"host": np.array(host, np.uint64), "line": np.array(line, np.uint64), "words": words},
            schema=_SPILL_SCHEMA,
        )
        ds.write_table(table, work / f"e{epoch:04d}" / f"p{part:04d}" / shard_name(index))
    return dict(host_docs)


def _aggregate(host: np.ndarray, line: np.ndarray, words: np.ndarray, docs: np.ndarray) -> pa.Table:
    """Rows summed per (host, line), sorted by line then host."""
    order = np.lexsort((host, line))
    host, line, words, docs = host[order], line[order], words[order], docs[order]
    if host.size == 0:
        return _COUNT_SCHEMA.empty_table()
    starts = np.flatnonzero(np.concatenate([[True], (line[1:] != line[:-1]) | (host[1:] != host[:-1])]))
    return pa.table(
        {
            "host": host[starts],
            "line": line[starts],
            "words": words[starts],
            "docs": np.add.reduceat(docs, starts),
        },
        schema=_COUNT_SCHEMA,
    )


def _mark(
    counts: pa.Table, host_docs: dict[int, int], config: BoilerplateConfig
) -> dict[tuple[int, int], str]:
    """The boilerplate (host, line) keys of one partition of cumulative counts, with their rule."""
    if counts.num_rows == 0:
        return {}
    host = counts["host"].to_numpy()
    line = counts["line"].to_numpy()
    words = counts["words"].to_numpy()
    docs = counts["docs"].to_numpy()
    pages = np.array([host_docs.get(h, 0) for h in host.tolist()], dtype=np.int64)
    # per line over all hosts (rows are sorted by line): documents and hosts
    starts = np.flatnonzero(np.concatenate([[True], line[1:] != line[:-1]]))
    sizes = np.diff(np.append(starts, line.size))
    corpus_docs = np.repeat(np.add.reduceat(docs, starts), sizes)
    corpus_hosts = np.repeat(sizes, sizes)
    long_enough = words >= config.min_words
    rules = [
        (pages >= config.host_min_pages) & (docs >= config.host_min_fraction * pages),
        long_enough & (docs >= config.host_min_docs),
        long_enough & (corpus_docs >= config.corpus_min_docs) & (corpus_hosts >= config.corpus_min_hosts),
    ]
    marked: dict[tuple[int, int], str] = {}
    for name, hit in zip(RULES, rules, strict=True):
        for h, k in zip(host[hit].tolist(), line[hit].tolist(), strict=True):
            marked.setdefault((h, k), name)
    return marked


# ---------------------------------------------------------------------------------------------
# The persistent counts


def _read_index(index_dir: Path | None) -> dict[str, Any]:
    if index_dir is None or not (index_dir / INDEX_FILE).exists():
        return {"format": INDEX_FORMAT, "fingerprint": None, "generations": []}
    return json.loads((index_dir / INDEX_FILE).read_text(encoding="utf-8"))


def _count_file(generation: Path, part: int) -> Path:
    return generation / f"part-{part:04d}.parquet"


def _read_counts(generation: Path | None, part: int) -> pa.Table:
    path = _count_file(generation, part) if generation else None
    return pq.read_table(path) if path and path.exists() else _COUNT_SCHEMA.empty_table()


def _read_hosts(generation: Path | None) -> dict[int, int]:
    path = generation / "hosts.parquet" if generation else None
    if not path or not path.exists():
        return {}
    table = pq.read_table(path)
    return dict(zip(table["host"].to_pylist(), table["docs"].to_pylist(), strict=True))


def _count_epochs(
    base: Path | None,
    spill: Path,
    epochs: list[str | None],
    host_docs: dict[tuple[int, int], int],
    target: Path,
    config: BoilerplateConfig,
) -> tuple[dict[str | None, dict[tuple[int, int], str]], dict[str, int]]:
    """Add each epoch's keys to the counts (from generation ``base``), mark its boilerplate; the
    final counts go to ``target``. Returns epoch -> marked keys, and sizes for the report."""
    hosts = _read_hosts(base)
    marked: dict[str | None, dict[tuple[int, int], str]] = {}
    current = base
    sizes = {"count_rows": 0, "peak_partition_rows": 0}
    for e, epoch in enumerate(epochs):
        for (ei, host), n in host_docs.items():
            if ei == e:
                hosts[host] = hosts.get(host, 0) + n
        step = target if e == len(epochs) - 1 else spill / f"gen-e{e:04d}"
        marked[epoch] = {}
        sizes["count_rows"] = 0
        for part in range(config.partitions):
            tables = [_read_counts(current, part)]
            files = sorted((spill / f"e{e:04d}" / f"p{part:04d}").glob("*.parquet"))
            for new in (pq.read_table(f) for f in files):
                tables.append(new.append_column("docs", pa.array(np.ones(new.num_rows, np.int64))))
            table = pa.concat_tables(tables)
            counts = _aggregate(*(table[c].to_numpy() for c in _COUNT_SCHEMA.names))
            sizes["count_rows"] += counts.num_rows
            sizes["peak_partition_rows"] = max(sizes["peak_partition_rows"], table.num_rows)
            marked[epoch].update(_mark(counts, hosts, config))
            ds.write_table(counts, _count_file(step, part))
        ordered = sorted(hosts.items())
        ds.write_table(
            pa.table({"host": [h for h, _ in ordered], "docs": [n for _, n in ordered]}, schema=_HOST_SCHEMA),
            step / "hosts.parquet",
        )
        current = step
    return marked, sizes


def _batch_key(input_dirs: list[Path]) -> str:
    return hashlib.sha256("\n".join(ds.dataset_digest(d) for d in input_dirs).encode()).hexdigest()


def _commit(
    index_dir: Path, index: dict[str, Any], built: Path, slot: str, batch_key: str, fingerprint: dict
) -> None:
    """Rename the new generation into place, then replace index.json (the moment it counts)."""
    name = f"gen-{len(index['generations']):05d}-{batch_key[:12]}"
    final = index_dir / "generations" / name
    tmp = index_dir / "generations" / f".{name}.tmp"
    committed = {g["name"] for g in _read_index(index_dir)["generations"]}  # what readers may still use
    remove_unlisted(final.parent, committed)  # a killed run's leftovers
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built, tmp, dirs_exist_ok=False)
    tmp.rename(final)
    updated = {
        "format": INDEX_FORMAT,
        "fingerprint": fingerprint,
        "generations": [*index["generations"], {"name": name, "slot": slot, "batch_key": batch_key}],
    }
    atomic_write_text(index_dir / INDEX_FILE, json.dumps(updated, indent=2, sort_keys=True) + "\n")
    remove_unlisted(final.parent, {g["name"] for g in updated["generations"]})  # replaced ones


# ---------------------------------------------------------------------------------------------
# Public API


def boilerplate_datasets(
    input_dirs: list[str | Path],
    output_dir: str | Path,
    index_dir: str | Path | None,
    config: BoilerplateConfig,
    work_dir: str | Path,
) -> ds.Manifest:
    """Remove boilerplate lines from the input datasets, with counts from them and ``index_dir``.

    Writes one output shard per input shard (same order), ``rejects/`` (``boilerplate_only``),
    ``audit/`` (one row per document and rule that removed lines), the manifest (report in
    ``extra["boilerplate"]``), and then adds the inputs' counts to the index.
    """
    input_dirs = [Path(d) for d in input_dirs]
    output_dir, work = Path(output_dir), Path(work_dir) / "boilerplate-counts"
    index_path = Path(index_dir) if index_dir is not None else None
    fingerprint = config.index_fingerprint()
    index = _read_index(index_path)
    if index["fingerprint"] not in (None, fingerprint):
        raise ValueError(
            f"boilerplate index {index_path} was built with {index['fingerprint']}, this config needs "
            f"{fingerprint}: use a new index directory"
        )
    shards = [p for d in input_dirs for p in ds.shard_paths(d)]
    for shard in shards:
        if "text" not in pq.read_schema(shard).names:
            raise ValueError(f"{shard}: no 'text' column: not a document dataset")
    batch_key = _batch_key(input_dirs)
    slot = f"{output_dir.parent.name}/{output_dir.name}"  # e.g. <snapshot>/boilerplate
    # Counts from the generation before these inputs' place (tasks/dataset.py index_position).
    position, indexed = ds.index_position(index["generations"], batch_key, slot)
    if not indexed:  # a re-processed snapshot replaces its old generation and every later one
        index = {**index, "generations": index["generations"][:position]}
    base = index_path / "generations" / index["generations"][position - 1]["name"] if position else None

    shutil.rmtree(work, ignore_errors=True)  # a re-run never trusts a dead run's spill
    epochs = _epochs_of(shards, config.epoch_field)
    host_docs: Counter = Counter()
    for i, shard in enumerate(shards):
        host_docs.update(_spill_shard(shard, i, work / "spill", epochs, config))
    marked, sizes = _count_epochs(base, work / "spill", epochs, dict(host_docs), work / "counts", config)

    stage = BoilerplateStage(config, marked)
    results, audit_shards = [], []
    for i, shard in enumerate(shards):
        audit_from = len(stage.audit)
        results.append(run_stage_on_shard(stage, shard, output_dir, i))
        audit = ds.rows_to_table(stage.audit[audit_from:], AUDIT_SCHEMA)
        audit_shards.append(ds.write_table(audit, output_dir / "audit" / shard_name(i)))
    report = _report(stage, marked, sizes, config)
    report["index_already_had_inputs"] = indexed
    schema = stage.output_schema(pq.read_schema(shards[0]) if shards else ds.DOCUMENT_SCHEMA)
    code, inputs = code_version(sys.modules[__name__]), [ds.input_ref(d) for d in input_dirs]
    ds.write_manifest(
        output_dir / "audit",
        ds.Manifest(
            stage=f"{STAGE}.audit",
            schema=ds.schema_description(AUDIT_SCHEMA),
            shards=audit_shards,
            config=json.loads(config.model_dump_json()),
            code_version=code,
            inputs=inputs,
        ),
    )
    manifest = finalize_dataset(
        output_dir, STAGE, results, schema, config, code, inputs, extra={"boilerplate": report}
    )
    if index_path is not None and not indexed and shards:
        _commit(index_path, index, work / "counts", slot, batch_key, fingerprint)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _report(
    stage: BoilerplateStage,
    marked: dict[str | None, dict[tuple[int, int], str]],
    sizes: dict[str, int],
    config: BoilerplateConfig,
) -> dict[str, Any]:
    """Marked lines per rule, and words/bytes removed per host (most words removed first)."""
    hosts = [
        {
            "host": host,
            "docs": t["docs"],
            "docs_changed": t["docs_changed"],
            "words": t["words"],
            "words_removed": t["words_removed"],
            "bytes_removed": t["bytes_removed"],
            "share_words_removed": round(t["words_removed"] / t["words"], 4) if t["words"] else 0.0,
        }
        for host, t in stage.hosts.items()
    ]
    hosts.sort(key=lambda h: (-h["words_removed"], h["host"]))
    last = marked[list(marked)[-1]] if marked else {}
    return {
        "marked_lines_by_rule": dict(sorted(Counter(last.values()).items())),
        "count_rows": sizes.get("count_rows", 0),
        "peak_partition_rows": sizes.get("peak_partition_rows", 0),
        "words_removed": sum(h["words_removed"] for h in hosts),
        "bytes_removed": sum(h["bytes_removed"] for h in hosts),
        "hosts": hosts[: config.report_hosts],
    }


def boilerplate_file(
    input_path: str | Path, output_path: str | Path, config: BoilerplateConfig | None = None
) -> dict[str, Any]:
    """Remove boilerplate from one JSONL or Parquet file, counting over that file only (the
    per-stage debugging CLI). Writes the kept rows; returns the stats and report, with the rejects."""
    config = config or BoilerplateConfig()
    rows = list(file_documents(input_path))
    with tempfile.TemporaryDirectory(prefix="boilerplate-file-") as tmp:
        dataset = Path(tmp) / "input"
        shard = ds.write_table(ds.rows_to_table(rows, ds.DOCUMENT_SCHEMA), dataset / shard_name(0))
        ds.write_manifest(
            dataset,
            ds.Manifest(stage="file", schema=ds.schema_description(ds.DOCUMENT_SCHEMA), shards=[shard]),
        )
        manifest = boilerplate_datasets([dataset], Path(tmp) / "output", None, config, Path(tmp) / "work")
        cleaned = {r["doc_id"]: r for r in ds.iter_rows(Path(tmp) / "output")}
        rejects = list(ds.iter_rows(Path(tmp) / "output" / "rejects"))
    fields = [f.name for f in BoilerplateStage.output_fields]
    ds.write_file_rows(
        (
            {**r, **{k: cleaned[r["doc_id"]][k] for k in ("text", *fields)}}
            for r in rows
            if r["doc_id"] in cleaned
        ),
        output_path,
    )
    return {
        **manifest.stats,
        **manifest.extra,
        "rejects": [{k: r[k] for k in ("doc_id", "rule", "detail")} for r in rejects],
    }
