from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
CRAWL = CORPUS / "crawl"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.exists():
        pytest.fail(f"test corpus not found at {CORPUS}: ../shared must sit beside the checkout")
    return CORPUS


@pytest.fixture(scope="session")
def crawl(corpus: Path) -> Path:
    return corpus / "crawl"


def snapshot_files(snapshot: str, kind: str = "warc") -> list[Path]:
    """The files a snapshot's <kind>.paths.gz lists, as local paths."""
    listing = CRAWL / "crawl-data" / snapshot / f"{kind}.paths.gz"
    with gzip.open(listing, "rt") as f:
        return [CRAWL / line.strip() for line in f if line.strip()]


def migrated_prefect_db(dest: Path) -> Path:
    """Copy an empty, fully migrated Prefect SQLite database to ``dest``. A fresh database spends
    40% of a server's start-up in Alembic migrations (19 s -> 11 s, measured on the 2-core machine);
    the template is migrated once per machine and Prefect version (under a lock: modules start side
    by side), and each server still gets a database of its own."""
    import prefect

    templates = Path(tempfile.gettempdir()) / "pretrain-tests"
    templates.mkdir(exist_ok=True)
    template = templates / f"prefect-{prefect.__version__}.db"
    with open(templates / "prefect.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            building = templates / f".{template.name}.{os.getpid()}.tmp"
            building.unlink(missing_ok=True)
            env = {
                **os.environ,
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{building}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env, check=True, capture_output=True, timeout=600,
            )  # fmt: skip
            building.rename(template)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return dest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test of the module that runs flows, its
    database a copy of the migrated template (see migrated_prefect_db)."""
    from prefect.testing import utilities

    def premigrated_temp_dir() -> str:
        # prefect_test_harness puts its database at <mkdtemp()>/prefect-test.db
        folder = tempfile.mkdtemp()
        migrated_prefect_db(Path(folder) / "prefect-test.db")
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utilities, "mkdtemp", premigrated_temp_dir)
        with utilities.prefect_test_harness(server_startup_timeout=300):
            yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Prefect server, worker and MLflow started by `infra.local.up` on free ports, for one module."""
    from infra import local

    home = tmp_path_factory.mktemp("platform")
    migrated_prefect_db(home / "prefect" / "prefect.db")  # where `up` keeps the server's database
    with local.running(
        home, prefect_port=free_port(), mlflow_port=free_port(), timeout=240, echo=print
    ) as running:
        yield running


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (no hand-offs), above all on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
