"""The dataset and stage contracts: atomic, deterministic, accounted."""

from __future__ import annotations

import json
import shutil
import tempfile
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
    assert manifest.inputs[0].digest == ds.dataset_digest(tmp_path / "in")
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


def test_digest_is_content_only(tmp_path: Path) -> None:
    # The same input in two workdirs: the outputs' manifests name different input paths, same digest.
    stage = _ShortDocFilter(_Config())
    for workdir in ("a", "b"):
        _write_dataset(tmp_path / workdir / "in", _docs(30))
        run_stage_on_dataset(stage, tmp_path / workdir / "in", tmp_path / workdir / "out")
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert ds.read_manifest(a).inputs[0].path != ds.read_manifest(b).inputs[0].path
    assert ds.dataset_digest(a) == ds.dataset_digest(b)
    assert len(ds.dataset_digest(a)) == 64 and ds.mlflow_digest(a) == ds.dataset_digest(a)[:32]
    shutil.copytree(a, tmp_path / "elsewhere")
    assert ds.dataset_digest(tmp_path / "elsewhere") == ds.dataset_digest(a)


def test_digest_changes_with_one_shard_byte(tmp_path: Path) -> None:
    docs = _docs(30)
    _write_dataset(tmp_path / "d", docs)
    changed = [dict(d) for d in docs]
    changed[7]["text"] = changed[7]["text"].replace("n", "m", 1)
    _write_dataset(tmp_path / "e", changed)
    assert ds.dataset_digest(tmp_path / "d") != ds.dataset_digest(tmp_path / "e")
    # The digest trusts the manifest's shard hashes; a byte flipped on disk behind it is verify's job.
    shutil.copytree(tmp_path / "d", tmp_path / "f")
    shard = tmp_path / "f" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match"):
        ds.verify(tmp_path / "f")


def test_digest_follows_input_digests(tmp_path: Path) -> None:
    stage = _ShortDocFilter(_Config())
    _write_dataset(tmp_path / "in1", _docs(30))
    _write_dataset(tmp_path / "in2", _docs(31))
    run_stage_on_dataset(stage, tmp_path / "in1", tmp_path / "out1")
    run_stage_on_dataset(stage, tmp_path / "in2", tmp_path / "out2")
    assert ds.read_manifest(tmp_path / "out1").inputs[0].digest == ds.dataset_digest(tmp_path / "in1")
    assert ds.dataset_digest(tmp_path / "out1") != ds.dataset_digest(tmp_path / "out2")


def test_publish_version_and_resolve(tmp_path: Path) -> None:
    root = tmp_path / "packed"
    _write_dataset(tmp_path / "build1", _docs(20))
    digest1 = ds.dataset_digest(tmp_path / "build1")
    v1 = ds.publish_version(tmp_path / "build1", root)
    assert v1 == root / "versions" / digest1[:16]
    assert not (tmp_path / "build1").exists() and ds.verify(v1).rows == 20
    assert (root / "LATEST").read_text() == digest1[:16] + "\n"
    assert ds.resolve_version(root) == v1.resolve() == ds.resolve_version(v1)

    # Idempotent: the same content again moves nothing and removes the redundant build.
    _write_dataset(tmp_path / "build1-again", _docs(20))
    manifest_before = (v1 / "manifest.json").stat().st_mtime_ns
    assert ds.publish_version(tmp_path / "build1-again", root) == v1
    assert not (tmp_path / "build1-again").exists()
    assert (v1 / "manifest.json").stat().st_mtime_ns == manifest_before
    assert ds.publish_version(v1, root) == v1 and ds.verify(v1).rows == 20

    # A new version: LATEST moves, the old version stays whole for the runs pinned to it.
    _write_dataset(tmp_path / "build2", _docs(25))
    v2 = ds.publish_version(tmp_path / "build2", root)
    assert v2 != v1 and ds.resolve_version(root) == v2.resolve()
    assert ds.verify(v1).rows == 20 and sorted(p.name for p in (root / "versions").iterdir()) == sorted(
        [v1.name, v2.name]
    )


def test_publish_killed_before_latest_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "tokenizer"
    _write_dataset(tmp_path / "build1", _docs(20))
    v1 = ds.publish_version(tmp_path / "build1", root)
    _write_dataset(tmp_path / "build2", _docs(25))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ds, "atomic_write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            ds.publish_version(tmp_path / "build2", root)
    assert ds.resolve_version(root) == v1.resolve()  # the new version dir exists, unannounced
    assert not (tmp_path / "build2").exists()
    _write_dataset(tmp_path / "build2", _docs(25))  # the re-run builds the same again
    v2 = ds.publish_version(tmp_path / "build2", root)  # and only has LATEST left to do
    assert not (tmp_path / "build2").exists()
    assert ds.resolve_version(root) == v2.resolve() != v1.resolve()


def test_publish_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp dir")
    built = Path(tempfile.mkdtemp(dir=shm))
    try:
        _write_dataset(built, _docs(20))
        version = ds.publish_version(built, tmp_path / "root")
        assert not built.exists() and ds.verify(version).rows == 20
        assert [p.name for p in (tmp_path / "root" / "versions").iterdir()] == [version.name]
    finally:
        shutil.rmtree(built, ignore_errors=True)


def test_resolve_version_errors_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a published dataset"):
        ds.resolve_version(tmp_path)
    (tmp_path / "LATEST").write_text("0123456789abcdef\n")
    with pytest.raises(FileNotFoundError, match="names version '0123456789abcdef'"):
        ds.resolve_version(tmp_path)
