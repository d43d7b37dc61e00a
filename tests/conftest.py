from __future__ import annotations

import gzip
import socket
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


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every test that runs flows: starting one per module
    would spend most of the suite's time on database migrations."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
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
