"""Crawl input, workdir datasets and the dedup index on an S3-compatible store (moto's server on
loopback): the same digests as a local workdir, publication that a killed writer cannot half-do,
and one error line for an unreachable endpoint or a missing bucket."""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from tasks import dataset as ds
from tasks import storage
from tests.conftest import CRAWL, free_port, snapshot_files

pytestmark = pytest.mark.slow

SNAPSHOT = "CC-MAIN-2026-40"


@pytest.fixture(scope="module")
def s3() -> Iterator[fsspec.AbstractFileSystem]:
    """moto's S3 server on a free loopback port, reached through the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        for bucket in ("crawl", "work"):
            fs.mkdir(bucket)
        yield fs
    server.stop()


@pytest.fixture(scope="module")
def s3_crawl(s3: fsspec.AbstractFileSystem) -> str:
    """A crawl root on the store: the snapshot's listing and its first WARC file."""
    first = snapshot_files(SNAPSHOT)[0]
    rel = first.relative_to(CRAWL).as_posix()
    s3.put_file(str(first), f"crawl/{rel}")
    s3.pipe_file(f"crawl/crawl-data/{SNAPSHOT}/warc.paths.gz", gzip.compress(f"{rel}\n".encode()))
    return "s3://crawl"


def _params(crawl: str, workdir: str, mlflow_db: Path):
    from flows.data_refresh import DataRefreshParams

    return DataRefreshParams.model_validate(
        {
            "crawl": crawl,
            "snapshots": [SNAPSHOT],
            "kinds": ["warc"],
            "workdir": workdir,
            "ingest": {"max_records_per_file": 50},
            "boilerplate": {},  # on, so that its index is on the store too
            "tokenizer": {"vocab_size": 512},
            "pack": {"seq_len": 64},
            "mlflow_tracking_uri": f"sqlite:///{mlflow_db}",  # one store for all runs: one migration
        }
    )


def _digests_on_store(workdir: str, names: list[str]) -> dict[str, str]:
    """Each dataset's digest read from the store alone (a published root: its LATEST version)."""
    out = {}
    fs, root = fsspec.core.url_to_fs(workdir)
    for name in names:
        path = name  # the workdir's layout: "<snapshot>/<stage>", "tokenizer", "packed"
        latest = f"{root}/{path}/{ds.LATEST}"
        if fs.exists(latest):
            path = f"{path}/{ds.VERSIONS}/{fs.cat_file(latest).decode().strip()}"
        out[name] = ds.dataset_digest(f"{workdir}/{path}")
    return out


def test_refresh_on_s3_gives_the_local_digests(
    s3, s3_crawl: str, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.data_refresh import cache_status, data_refresh

    local = data_refresh(_params(s3_crawl, str(tmp_path / "local"), tmp_path / "mlflow.db"))
    local_digests = {name: ds.dataset_digest(path) for name, path in local["datasets"].items()}
    assert {"tokenizer", "packed", f"{SNAPSHOT}/boilerplate", f"{SNAPSHOT}/dedup"} <= set(local_digests)
    # the crawl files were read from the store: provenance names them by URL
    assert all(
        ref.path.startswith("s3://crawl/")
        for ref in ds.read_manifest(tmp_path / "local" / SNAPSHOT / "ingest").inputs
    )

    workdir = "s3://work/refresh"
    monkeypatch.setenv("PRETRAIN_STAGING", str(tmp_path / "staging-a"))
    data_refresh(_params(s3_crawl, workdir, tmp_path / "mlflow.db"))
    assert _digests_on_store(workdir, list(local_digests)) == local_digests

    # The dedup and boilerplate indexes are on the store: index.json and the generation it names.
    for index, generations in (("dedup-index", "segments"), ("boilerplate-index", "generations")):
        (generation,) = json.loads(s3.cat_file(f"work/refresh/{index}/index.json"))[generations]
        assert s3.find(f"work/refresh/{index}/{generations}/{generation['name']}"), index

    # Another machine (empty staging) sees the store's state: nothing to redo.
    monkeypatch.setenv("PRETRAIN_STAGING", str(tmp_path / "staging-b"))
    status = cache_status(_params(s3_crawl, workdir, tmp_path / "mlflow.db"))
    assert {row.action for row in status.stages} == {"cached"}, status.format_table()

    # A trainer reads a local copy of the published packed data, the same content.
    packed = storage.fetch(f"{workdir}/packed")
    assert packed.parent.name == ds.VERSIONS
    ds.verify(packed)
    assert ds.dataset_digest(packed) == local_digests["packed"]
    # The pretrain flow pins that copy for a run whose data_dir is on the store.
    from flows.pretrain import pinned_data_dir
    from model.run_dir import RunDir

    run_dir = RunDir.of(tmp_path / "runs", "on-s3")
    assert pinned_data_dir(run_dir, f"{workdir}/packed", logging.getLogger("test")) == packed


class Killed(BaseException):
    """Stands for the writer being killed at that point (no handler runs)."""


def _dataset(directory: Path, rows: list[str]) -> None:
    import pyarrow as pa

    shard = ds.write_table(pa.table({"doc_id": rows, "text": rows}), directory / "part-00000.parquet")
    ds.write_manifest(directory, ds.Manifest(stage="test", shards=[shard]))


def _kill_at(monkeypatch: pytest.MonkeyPatch, fs, name: str) -> None:
    """Make the upload of the first object named ``name`` kill the writer."""
    put = fs.put_file

    def put_file(local, remote, *args, **kwargs):
        if remote.endswith("/" + name):
            raise Killed(remote)
        return put(local, remote, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_file)


def test_a_killed_publication_leaves_nothing_readers_take(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "s3://work/killed"
    writer = storage.Mirror(url, tmp_path / "writer")
    writer.pull()

    # A new dataset killed before its manifest: the shard is on the store, no dataset is.
    _dataset(writer.local / "docs", ["a", "b"])
    with monkeypatch.context() as m:
        _kill_at(m, writer.fs, ds.MANIFEST)
        with pytest.raises(Killed):
            writer.push()
    assert s3.exists("work/killed/docs/part-00000.parquet")
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        ds.read_manifest(f"{url}/docs")
    reader = storage.Mirror(url, tmp_path / "reader")
    reader.pull()
    assert not (reader.local / "docs").exists()

    # Published whole, then replaced in place: killed midway, the old manifest is already gone, so
    # no reader pairs it with the new shard.
    writer.push()
    reader.pull()
    assert [r["doc_id"] for r in ds.iter_rows(reader.local / "docs")] == ["a", "b"]
    _dataset(writer.local / "docs", ["c"])
    with monkeypatch.context() as m:
        _kill_at(m, writer.fs, ds.MANIFEST)
        with pytest.raises(Killed):
            writer.push()
    with pytest.raises(FileNotFoundError):
        ds.read_manifest(f"{url}/docs")
    writer.push()
    reader.pull()
    assert [r["doc_id"] for r in ds.iter_rows(reader.local / "docs")] == ["c"]

    # A version published and killed before LATEST: readers still get the previous version.
    root = writer.local / "packed"
    for rows in (["v1"], ["v2"]):
        _dataset(writer.local / ".build.tmp", rows)
        first = ds.publish_version(writer.local / ".build.tmp", root)
        if rows == ["v1"]:
            writer.push()
            v1 = first
    with monkeypatch.context() as m:
        _kill_at(m, writer.fs, ds.LATEST)
        with pytest.raises(Killed):
            writer.push()
    assert ds.dataset_digest(f"{url}/packed/{ds.VERSIONS}/{v1.name}") == ds.dataset_digest(v1)
    fetched = storage.fetch(f"{url}/packed")
    assert fetched.name == v1.name
    assert [r["doc_id"] for r in ds.iter_rows(fetched)] == ["v1"]


def test_unreachable_endpoint_and_missing_bucket_are_one_line(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import flows.data_refresh  # noqa: F401 (imported before the clock starts)
    from flows.cli import main
    from tasks.ingest import CrawlInputError, resolve_crawl

    monkeypatch.setenv("PRETRAIN_STAGING", str(tmp_path / "staging"))
    with pytest.raises(
        FileNotFoundError, match="bucket 'nobucket' of s3://nobucket/wd does not exist at http"
    ):
        storage.Mirror("s3://nobucket/wd").pull()

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    type(s3).clear_instance_cache()  # file systems are cached per options, not per environment
    start = time.monotonic()
    code = main(
        ["cache", "status", "--crawl", str(CRAWL), "--snapshot", SNAPSHOT, "--workdir", "s3://work/wd"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"object store at {dead} for s3://work/wd" in err, err
    with pytest.raises(CrawlInputError, match=r"cannot read crawl s3://crawl: EndpointConnectionError"):
        resolve_crawl("s3://crawl", [SNAPSHOT], ["warc"], None)
    # short connect timeouts and few retries (storage.S3_CLIENT_CONFIG): ~1 s each on an idle machine
    assert time.monotonic() - start < 30
    type(s3).clear_instance_cache()
