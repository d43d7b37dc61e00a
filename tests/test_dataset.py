"""The dataset and stage contracts: atomic, deterministic, accounted."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel

from tasks import dataset as ds
from tasks.stage import DocumentStage, StageStats, cache_key, run_stage_on_dataset


def _docs(n: int) -> list[dict]:
    return [
        {"doc_id": f"d{i}", "text": f"document number {i} " * (i % 5 + 1), "url": f"https://x.example/{i}"}
        for i in range(n)
    ]


def _write_dataset(path: Path, docs: list[dict], shards: int = 2) -> None:
    per = (len(docs) + shards - 1) // shards
    infos = [
        ds.write_table(
            ds.rows_to_table(docs[i * per : (i + 1) * per], ds.DOCUMENT_SCHEMA),
            path / f"part-{i:05d}.parquet",
        )
        for i in range(shards)
    ]
    ds.write_manifest(
        path, ds.Manifest(stage="fixture", schema=ds.schema_description(ds.DOCUMENT_SCHEMA), shards=infos)
    )


class _Config(BaseModel):
    min_words: int = 4


class _ShortDocFilter(DocumentStage):
    name = "short"
    output_fields = [pa.field("n_words", pa.int64())]

    def process(self, docs: Iterable[dict], stats: StageStats) -> Iterator[dict]:
        for doc in docs:
            n = len(doc["text"].split())
            if n < self.config.min_words:
                stats.drop(doc, "too_few_words", f"{n} < {self.config.min_words}")
            else:
                yield {**doc, "n_words": n}


def test_manifest_lists_shards_with_hashes_and_lineage(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "in", _docs(50))
    manifest = run_stage_on_dataset(_ShortDocFilter(_Config()), tmp_path / "in", tmp_path / "out")
    assert manifest.stats["docs_in"] == 50
    assert manifest.stats["kept"] + manifest.stats["dropped"]["too_few_words"] == 50
    assert manifest.inputs[0].manifest_sha256 == ds.manifest_sha256(tmp_path / "in")
    assert ds.verify(tmp_path / "out").rows == manifest.stats["kept"]
    assert {f["name"] for f in manifest.schema_} >= {"doc_id", "text", "n_words"}
    rejects = list(ds.iter_rows(tmp_path / "out" / "rejects"))
    assert len(rejects) == manifest.stats["dropped"]["too_few_words"]
    assert all(r["rule"] == "too_few_words" and r["stage"] == "short" for r in rejects)


def test_rerun_gives_identical_bytes(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "in", _docs(30))
    stage = _ShortDocFilter(_Config())
    run_stage_on_dataset(stage, tmp_path / "in", tmp_path / "a")
    run_stage_on_dataset(stage, tmp_path / "in", tmp_path / "b")
    for name in ("manifest.json", "part-00000.parquet", "part-00001.parquet", "rejects/part-00000.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_killed_writer_leaves_no_partial_shard(tmp_path: Path) -> None:
    target = tmp_path / "part-00000.parquet"
    with pytest.raises(RuntimeError), ds.ShardWriter(target, ds.DOCUMENT_SCHEMA, row_group_size=2) as writer:
        for doc in _docs(10):
            writer.write(doc)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_a_changed_shard(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "d", _docs(10))
    shard = tmp_path / "d" / "part-00000.parquet"
    ds.write_table(ds.rows_to_table(_docs(3), ds.DOCUMENT_SCHEMA), shard)
    with pytest.raises(ValueError, match="does not match"):
        ds.verify(tmp_path / "d")


def test_directory_without_manifest_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        ds.read_manifest(tmp_path)


def test_accounting_violation_is_caught(tmp_path: Path) -> None:
    class _Leaky(_ShortDocFilter):
        def process(self, docs: Iterable[dict], stats: StageStats) -> Iterator[dict]:
            for doc in docs:  # silently loses every other document
                if int(doc["doc_id"][1:]) % 2:
                    yield doc

    _write_dataset(tmp_path / "in", _docs(10))
    with pytest.raises(AssertionError, match="documents in"):
        run_stage_on_dataset(_Leaky(_Config()), tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cache_key_changes_with_config_code_and_input() -> None:
    base = cache_key("s", _Config(), "code1", "input1")
    assert base == cache_key("s", _Config(), "code1", "input1")
    assert base != cache_key("s", _Config(min_words=5), "code1", "input1")
    assert base != cache_key("s", _Config(), "code2", "input1")
    assert base != cache_key("s", _Config(), "code1", "input2")


def test_file_rows_roundtrip_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = _docs(5)
    for name in ("x.jsonl", "x.parquet"):
        ds.write_file_rows(rows, tmp_path / name)
        assert list(ds.iter_file_rows(tmp_path / name)) == rows
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(ds.iter_file_rows(tmp_path / "bad.jsonl"))
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[0])["doc_id"] == "d0"
