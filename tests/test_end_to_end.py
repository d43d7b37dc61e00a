"""From a crawl file to a registered, exported checkpoint, against real servers on loopback.

A data refresh and a tiny training run with its evals, through a real Prefect server and a real
MLflow server; then, read back through ``MlflowClient`` only: the lineage chain is complete and its
digests equal the manifests', the registry aliases point at the right versions, and the Hugging Face
export of the best checkpoint gives our logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from flows.data_refresh import DataRefreshParams, data_refresh
from flows.pretrain import pretrain
from model.evaluate import load_model, resolve_inputs
from model.export import export_checkpoint
from tasks import dataset as ds
from tasks.lineage import lineage
from tests.conftest import free_port, snapshot_files
from tests.test_pretrain_flow import small_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port over SQLite and a local artifact root."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", str(home / "artifacts"),
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 180 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def pipeline_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> dict:
    """One crawl file (its first 150 records) refreshed into versioned training data, then 20 steps
    trained and evaluated."""
    workdir = tmp_path_factory.mktemp("e2e")
    refreshed = data_refresh(
        DataRefreshParams(
            crawl=str(snapshot_files("CC-MAIN-2026-40", "wet")[0]),
            workdir=str(workdir),
            ingest={"max_records_per_file": 150},
            tokenizer={"vocab_size": 512, "reserved_tokens": 4, "sample_chars": 300_000},
            pack={"seq_len": 32, "validation_fraction": 0.1},
            mlflow_tracking_uri=mlflow_server,
        )
    )
    params = small_run(Path(refreshed["outputs"]["packed"]).parents[1], workdir, "e2e", max_steps=20)
    params = params.model_copy(update={"mlflow_tracking_uri": mlflow_server})
    result = pretrain(params)
    return {"refreshed": refreshed, "result": result, "workdir": workdir}


def test_the_lineage_chain_is_complete_and_its_digests_are_the_manifests(mlflow_server, pipeline_run):
    client = MlflowClient(tracking_uri=mlflow_server)
    checkpoint = pipeline_run["result"].evals[-1].checkpoint
    chain = lineage(client, checkpoint)
    assert not chain.mismatches and not chain.missing, chain.to_dict()
    kinds = {link.kind for link in chain.links}
    assert {
        "crawl",
        "dataset",
        "tokenizer",
        "packed",
        "data-refresh run",
        "training run",
        "checkpoint",
    } <= kinds

    # The training run's inputs carry the digests of the very datasets the refresh published.
    outputs = pipeline_run["refreshed"]["outputs"]
    run = client.get_run(pipeline_run["result"].mlflow_run_id)
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests["packed"] == ds.mlflow_digest(outputs["packed"])
    assert digests["tokenizer"] == ds.mlflow_digest(outputs["tokenizer"])
    assert run.data.tags["pretrain.data_refresh_run_id"] == pipeline_run["refreshed"]["mlflow_run_id"]
    refresh = client.get_run(pipeline_run["refreshed"]["mlflow_run_id"])
    logged = {d.dataset.name: d.dataset.digest for d in refresh.inputs.dataset_inputs}
    assert logged["packed"] == digests["packed"] and logged["tokenizer"] == digests["tokenizer"]


def test_the_registry_aliases_point_at_the_best_and_final_checkpoints(mlflow_server, pipeline_run):
    client = MlflowClient(tracking_uri=mlflow_server)
    evals = pipeline_run["result"].evals
    best = min(evals, key=lambda e: e.metrics["val/bpb"])
    for alias, expected in (("best", best), ("final", evals[-1])):
        version = client.get_model_version_by_alias("e2e", alias)
        assert (
            version.tags["step"] == str(expected.step) or int(version.tags.get("step", -1)) == expected.step
        )
        assert version.tags["packed_digest"] == ds.mlflow_digest(
            pipeline_run["refreshed"]["outputs"]["packed"]
        )


def test_the_export_of_the_best_checkpoint_gives_our_logits(mlflow_server, pipeline_run, tmp_path):
    evals = pipeline_run["result"].evals
    best = min(evals, key=lambda e: e.metrics["val/bpb"])
    out = export_checkpoint(best.checkpoint, tmp_path / "hf")
    ours = load_model(resolve_inputs(best.checkpoint), torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4
