"""The data refresh killed with SIGKILL at several points, then run again: every output byte equals an
uninterrupted run's, and no temporary file or lock is left. The crawl is a slice of a real WARC file
beside hostile files (truncated, binary, empty, non-UTF-8, one huge line): each is quarantined or
read, and the rest goes on.

Kill points are deterministic: ``$PRETRAIN_TEST_KILL_AT`` (``tasks/atomic.py``) SIGKILLs the refresh's
process group (the CLI, its flow and its task workers) when the first write whose target matches the
glob has its bytes in the temporary file, before the rename. One refresh is killed at each point in
turn, each run going on from what the killed ones left; the last run is not killed.
"""

from __future__ import annotations

import fnmatch
import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks import dataset as ds
from tasks.atomic import KILL_AT_ENV, TEMP_GLOB
from tasks.workdir_lock import LOCK_FILE

pytestmark = pytest.mark.slow

SNAPSHOT = "CC-MAIN-2026-52"
PRETRAIN = Path(sys.executable).with_name("pretrain")

# (where, the glob of the write the refresh is killed at), in the order a refresh reaches them. These
# three run in CI (each killed run costs a refresh's start); PRETRAIN_ALL_KILL_POINTS=1 adds the rest.
KILL_POINTS = [
    ("ingest shards", f"*/{SNAPSHOT}/ingest/part-00003.parquet"),
    ("dedup index update (segment in place, index.json not yet)", "*/dedup-index/index.json"),
    ("publication of the packed data (version in place, LATEST not yet)", "*/packed/LATEST"),
]
MORE_KILL_POINTS = [
    ("a shard's done record", f"*/{SNAPSHOT}/quality/.done/part-00001.parquet.json"),
    ("dedup index: copying the new segment", "*/dedup-index/segments/.tmp-*/docs.parquet"),
    ("tokenizer", "*/tokenizer/.build.tmp/*"),
    ("tokenizer publication", "*/tokenizer/LATEST"),
    ("pack", "*/packed/.build.tmp/*"),
]


def kill_points() -> list[tuple[str, str]]:
    if not os.environ.get("PRETRAIN_ALL_KILL_POINTS"):
        return KILL_POINTS
    ingest, dedup_index, publication = KILL_POINTS
    done, segment, tokenizer, tokenizer_latest, pack = MORE_KILL_POINTS
    return [ingest, done, segment, dedup_index, tokenizer, tokenizer_latest, pack, publication]


def _response(url: str, body: bytes, content_type: str) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = io.BytesIO()
    writer = WARCWriter(out, gzip=True)
    headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
    record = writer.create_warc_record(
        url, "response", payload=io.BytesIO(body), http_headers=headers,
        warc_headers_dict={"WARC-Date": "2026-12-01T00:00:00Z"},
    )  # fmt: skip
    writer.write_record(record)
    return out.getvalue()


# file name -> what ingest must report for it: (quarantine reasons, documents kept; None: some)
HOSTILE = {
    "b-truncated.warc.gz": ({"truncated_record": 1}, None),
    "c-binary.warc.gz": ({"not_warc": 1}, 0),
    "d-empty.warc.gz": ({"empty_file": 1}, 0),
    "e-odd-pages.warc.gz": ({}, 3),  # Latin-1 declared UTF-8, invalid UTF-8 bytes, a 3.3 MB line
}


@pytest.fixture(scope="module")
def crawl_glob(tmp_path_factory, crawl: Path) -> str:
    """40 pages of a real WARC file and the hostile files, as one snapshot."""
    from tests.conftest import snapshot_files

    real = snapshot_files("CC-MAIN-2026-40")[0]
    root = tmp_path_factory.mktemp("crawl") / SNAPSHOT
    root.mkdir()
    (root / "a-good.warc.gz").symlink_to(real)
    (root / "b-truncated.warc.gz").write_bytes(real.read_bytes()[:200_001])  # inside a response
    (root / "c-binary.warc.gz").write_bytes(random.Random(0).randbytes(65536))
    (root / "d-empty.warc.gz").write_bytes(b"")
    french = "<html><body><p>" + "Une page en français, écrite en Latin-1 : été, côté, déjà. " * 30 + "</p>"
    broken = b"<html><body><p>" + b"caf\xe9 \xff\xfe invalid \xc3\x28 UTF-8 bytes, " * 100 + b"</p>"
    line = " ".join(f"word{i % 5000} alpha beta gamma." for i in range(120_000))  # 3.3 MB, one line
    (root / "e-odd-pages.warc.gz").write_bytes(
        _response("http://latin.example/fr", french.encode("latin-1"), "text/html; charset=utf-8")
        + _response("http://latin.example/bytes", broken, "text/html; charset=utf-8")
        + _response("http://huge.example/line", f"<html><body><p>{line}</p>".encode(), "text/html")
    )
    return f"{root.parent}/*/*.warc.gz"


@pytest.fixture(scope="module")
def run_refresh(prefect_harness, tmp_path_factory, crawl_glob: str):
    """`pretrain data-refresh` in a process group of its own, against the module's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    home = tmp_path_factory.mktemp("refresh-home")
    config = home / "params.yaml"
    params = {
        "crawl": crawl_glob,
        "kinds": ["warc"],
        "ingest": {"max_records_per_file": 40},
        "tokenizer": {"vocab_size": 400},
        "pack": {"seq_len": 64, "validation_fraction": 0.1},
    }
    config.write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect-results"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",  # outside the compared workdir
    }
    env.pop(KILL_AT_ENV, None)

    def run(workdir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(PRETRAIN), "data-refresh", "--config", str(config), "--workdir", str(workdir)],
            cwd=home, env={**env, KILL_AT_ENV: kill_at} if kill_at else env,
            capture_output=True, text=True, timeout=300, start_new_session=True,
        )  # fmt: skip

    return run


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _litter(root: Path) -> list[str]:
    """Temporary files and directories a killed writer leaves, and a lock nobody holds."""
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if fnmatch.fnmatch(p.name, TEMP_GLOB) or p.name.startswith(".tmp-") or p.name == LOCK_FILE
    ]


def _killed_writing(root: Path, glob: str) -> bool:
    """A temporary file (``.<name>.<random>.tmp``) of a target matching ``glob`` is left."""
    return any(
        fnmatch.fnmatch(str(p.parent / p.name[1:].rsplit(".", 2)[0]), glob) for p in root.rglob(TEMP_GLOB)
    )


def test_killed_at_every_point_then_rerun_gives_the_same_bytes(run_refresh, tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"  # every run at this path: manifests name their inputs by path
    clean = run_refresh(workdir)
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = _tree(workdir)
    workdir.rename(tmp_path / "reference")

    # What the hostile files gave: a quarantine record or documents, and the rest went on.
    ingest = ds.read_manifest(tmp_path / "reference" / SNAPSHOT / "ingest")
    rejects = list(ds.iter_rows(tmp_path / "reference" / SNAPSHOT / "ingest" / "rejects"))
    docs = list(ds.iter_rows(tmp_path / "reference" / SNAPSHOT / "ingest", columns=["source_file"]))
    for name, (reasons, kept) in HOSTILE.items():
        quarantined = [
            r["rule"] for r in rejects if r["source_file"].endswith(name) and r["kind"] == "quarantined"
        ]
        assert {r: quarantined.count(r) for r in quarantined} == reasons, name
        from_file = sum(d["source_file"].endswith(name) for d in docs)
        assert from_file == kept if kept is not None else from_file > 0, name
    assert all("\n" not in r["detail"] for r in rejects)
    stats = ingest.stats
    assert stats["docs_in"] == stats["kept"] + sum(stats["dropped"].values()) + sum(
        stats["quarantined"].values()
    )
    # No document disappears silently: each ingested page is in the deduplicated output or in exactly
    # one stage's rejects.
    snapshot = tmp_path / "reference" / SNAPSHOT
    ingested = [d["doc_id"] for d in ds.iter_rows(snapshot / "ingest", columns=["doc_id"])]
    rejected = [
        r["doc_id"]
        for stage in ("langid", "quality", "pii", "dedup")
        for r in ds.iter_rows(snapshot / stage / "rejects")
    ]
    kept = [d["doc_id"] for d in ds.iter_rows(snapshot / "dedup", columns=["doc_id"])]
    assert sorted(ingested) == sorted(rejected + kept)
    packed = ds.read_manifest(ds.resolve_version(tmp_path / "reference" / "packed"))
    assert packed.extra["packing"]["splits"]["train"]["sequences"] > 0

    runs = []
    for where, glob in kill_points():
        killed = run_refresh(workdir, kill_at=glob)
        assert killed.returncode == -signal.SIGKILL, f"{where}: not killed ({killed.returncode})"
        assert _killed_writing(workdir, glob), where  # the target's new bytes sit in a temporary file
        runs.append(killed)
    final = run_refresh(workdir)
    assert final.returncode == 0, final.stderr[-3000:]
    runs.append(final)
    assert all("taking over the lock of pid" in run.stderr for run in runs[1:])  # the killed run's

    assert not _litter(workdir)
    after = _tree(workdir)
    assert sorted(after) == sorted(reference)
    differ = [name for name in reference if after[name] != reference[name]]
    assert not differ, differ
