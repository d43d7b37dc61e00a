"""The pretrain and evaluate flows with the real trainer: 2 CPU ranks (gloo) on a tiny model over data
packed from the corpus, through Prefect's test harness."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.evaluate import EvaluateParams, evaluate
from flows.pretrain import ModelPreset, PretrainParams, pretrain
from model import data as packed
from model.config import load_config
from model.model import PRESETS
from tasks import evaluate as ev
from tasks import pack
from tasks import tokenizer as tk
from tasks import train as tr
from tests.test_tokenizer import SMALL, build_lid_dataset

REPO = Path(__file__).resolve().parents[1]
CPU2 = tr.LocalLauncher(nproc_per_node=2, device="cpu", stop_grace_s=20)


@pytest.fixture(scope="module")
def prefect_api(prefect_harness):
    """The session's one Prefect test server (tests/conftest.py)."""
    return None


@pytest.fixture(scope="module")
def packed_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 lid-dev documents, a 512-token BPE, windows of 33 tokens, 10% held out per slice."""
    root = tmp_path_factory.mktemp("pretrain-data")
    documents = build_lid_dataset(corpus, root / "documents", limit=300, shards=1)
    tk.train_tokenizer([documents], root / "tokenizer", SMALL.model_copy(update={"sample_chars": 300_000}))
    config = pack.PackConfig(seq_len=32, tokens_per_shard=33 * 200, validation_fraction=0.1)
    pack.pack_datasets([documents], root / "tokenizer", root / "packed", config)
    return root / "packed"


def small_run(packed_dir: Path, root: Path, name: str, **overrides) -> PretrainParams:
    fields = dict(
        run_name=name,
        data_dir=str(packed_dir),
        runs_root=str(root / "runs"),
        max_steps=40,
        micro_batch_size=4,
        log_interval=2,
        eval_interval=10,
        keep_checkpoints=10,
        eval_max_sequences_per_slice=2,
        eval_threads=1,
        checkpoint_poll_s=0.2,
        optim={"warmup_steps": 2},
        launcher=CPU2,
        retries=1,
        mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
    )
    return PretrainParams(**{**fields, **overrides})


def is_rank(cmdline: list[str]) -> bool:
    """A trainer rank, not the torchrun agent (whose arguments name the trainer too)."""
    return "model.trainer" in cmdline and "torch.distributed.run" not in cmdline


def trainer_ranks(config_path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if is_rank(cmdline) and str(config_path) in cmdline:
            found.append(proc)
    return found


def kill_a_rank_after(checkpoint: Path, config_path: Path, killed: list[str]) -> threading.Thread:
    """SIGKILL one trainer rank once ``checkpoint`` is complete: a node failure mid-run."""

    def watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (checkpoint / "COMPLETE").exists():
            time.sleep(0.02)
        ranks = trainer_ranks(config_path)
        if ranks:
            ranks[-1].kill()
            killed.append(" ".join(ranks[-1].info["cmdline"]))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def pretrained(packed_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_api):
    root = tmp_path_factory.mktemp("pretrain")
    params = small_run(packed_dir, root, "tiny-cpu")
    run_dir = tr.run_dir_for(params.runs_root, params.run_name)
    killed: list[str] = []
    watcher = kill_a_rank_after(run_dir / "checkpoints" / "step-10", run_dir / "run.json", killed)
    result = pretrain(params)
    watcher.join(5)
    return params, result, killed


@pytest.mark.slow
def test_a_rank_dies_and_the_retry_resumes_from_the_last_checkpoint(pretrained):
    params, result, killed = pretrained
    assert killed, "the run ended before a rank could be killed"
    log = (Path(params.runs_root) / params.run_name / "train.log").read_text()
    events = [json.loads(line[6:]) for line in log.splitlines() if line.startswith("EVENT ")]
    starts = [e for e in events if e["event"] in ("start", "resumed")]
    assert [e["event"] for e in starts] == ["start", "resumed"]
    resumed_at = starts[1]["step"]
    assert resumed_at >= 10 and starts[1]["checkpoint"].endswith(f"step-{resumed_at}")
    # The successful attempt went on from there, not from step 0.
    assert result.train.first_step > resumed_at
    assert result.train.last_step == 40 and result.train.done["step"] == 40


@pytest.mark.slow
def test_every_new_checkpoint_is_evaluated_per_slice(pretrained, packed_dir):
    _, result, _ = pretrained
    steps = [e.step for e in result.evals]
    assert steps == sorted(set(steps)) and steps[-1] == 40 and len(steps) >= 2, steps
    info = packed.read_packing_info(packed_dir)
    slice_names = set(info["splits"]["validation"]["slices"])
    final = result.evals[-1]
    assert set(final.slices) <= slice_names and len(final.slices) >= 10
    assert all("/" in name for name in final.slices)  # lang/source
    for m in final.slices.values():
        assert math.isclose(m.perplexity, math.exp(m.loss)) and m.tokens > 0
    # A barely trained model: a bit better than uniform over the 512-token vocabulary, not absurd.
    assert 3.0 < final.loss < math.log(512) + 0.5


@pytest.mark.slow
def test_progress_link_and_mlflow_run(pretrained):
    params, result, _ = pretrained
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    progress = artifacts[tr.artifact_key(params.run_name)]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.startswith("step 40/40, loss ")
    link = artifacts[tr.artifact_key(params.run_name) + "-mlflow"]
    assert link.type == "markdown" and result.mlflow_url in link.data
    assert result.mlflow_url.endswith(f"/runs/{result.mlflow_run_id}")
    assert artifacts[f"eval-{params.run_name}"].type == "table"

    client = MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["max_steps"] == "40" and run.data.params["launcher.kind"] == "local"
    train_loss = client.get_metric_history(run.info.run_id, "loss")
    assert train_loss and max(m.step for m in train_loss) == 40  # from the trainer
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in val] == [e.step for e in result.evals]  # from the evals
    some_slice = next(iter(result.evals[-1].slices))
    assert client.get_metric_history(run.info.run_id, f"val/{some_slice}/perplexity")


@pytest.mark.slow
def test_evaluate_flow_matches_the_pretrain_eval_and_logs_its_own_run(pretrained, tmp_path):
    params, result, _ = pretrained
    checkpoint = Path(result.train.checkpoint_dir) / "step-40"
    out = evaluate(
        EvaluateParams(
            checkpoint=str(checkpoint),
            max_sequences_per_slice=params.eval_max_sequences_per_slice,
            threads=1,
            mlflow_tracking_uri=params.mlflow_tracking_uri,
        )
    )
    final = result.evals[-1]
    assert (
        out.step == 40
        and math.isclose(out.loss, final.loss, rel_tol=1e-6)
        and out.slices.keys() == final.slices.keys()
    )
    mlflow.set_tracking_uri(params.mlflow_tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=["evaluate"], output_format="list")
    assert run.info.run_name == f"eval-{params.run_name}-step-40" and run.info.status == "FINISHED"
    assert run.data.metrics["val/loss"] == pytest.approx(out.loss)


@pytest.mark.slow
def test_eval_over_every_window_is_the_plain_mean_cross_entropy(pretrained, packed_dir):
    """Independent check of the slice bookkeeping: with every window evaluated, the slices' tokens add up
    to every predicted token and their weighted loss is the model's plain mean loss over the split."""
    params, result, _ = pretrained
    checkpoint = Path(result.train.checkpoint_dir) / "step-40"
    info = packed.read_packing_info(packed_dir)
    out = ev.evaluate_checkpoint(checkpoint, max_sequences_per_slice=10**6, threads=1, batch_size=64)
    sequences = info["splits"]["validation"]["sequences"]
    assert out.tokens == sequences * info["seq_len"]
    assert sum(m.tokens for m in out.slices.values()) == out.tokens

    config = load_config(Path(params.runs_root) / params.run_name / "run.json")
    model = ev.load_model(checkpoint, config, info["vocab_size"], info["seq_len"])
    windows = torch.from_numpy(np.concatenate(packed.open_shards(packed_dir, "validation")).astype(np.int64))
    with torch.no_grad():
        plain = float(model(windows[:, :-1], windows[:, 1:]))
    assert out.loss == pytest.approx(plain, rel=1e-4)


def test_bad_inputs_fail_clearly(packed_dir, tmp_path, prefect_api):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ev.evaluate_checkpoint(tmp_path)
    (tmp_path / "run" / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-5" / "COMPLETE").write_text('{"step": 5, "world_size": 1}')
    with pytest.raises(FileNotFoundError, match=r"no run\.json"):
        ev.evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "step-5")
    with pytest.raises(FileNotFoundError, match="is not a dataset"):
        pretrain(small_run(tmp_path / "nowhere", tmp_path, "bad-data"))
    with pytest.raises(ValueError, match="run_name"):
        small_run(packed_dir, tmp_path, "../escape")


def test_form_presets_match_the_model_and_launcher_is_a_tagged_union():
    assert set(ModelPreset.__args__) == set(PRESETS)
    schema = PretrainParams.model_json_schema()
    launcher = schema["properties"]["launcher"]
    assert launcher["discriminator"]["propertyName"] == "kind"
    assert schema["properties"]["model"]["enum"] == list(ModelPreset.__args__)


CANCEL_SCRIPT = """
import sys
from flows.pretrain import PretrainParams, pretrain
pretrain(PretrainParams.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
def test_terminating_the_flow_run_stops_the_whole_process_group(packed_dir, tmp_path, prefect_api):
    """A cancelled flow run's process gets SIGTERM (from its worker/runner): no rank, no torchrun survives."""
    params = small_run(packed_dir, tmp_path, "cancel-me", max_steps=100_000, eval_interval=1000)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    flow_process = subprocess.Popen(
        [sys.executable, "-c", CANCEL_SCRIPT, params.model_dump_json()],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = Path(params.runs_root) / params.run_name / "train.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.exists() and "METRIC" in log.read_text()):
        assert flow_process.poll() is None, "the flow process ended early"
        time.sleep(0.2)
    job = psutil.Process(flow_process.pid).children(recursive=True)
    ranks = [p for p in job if is_rank(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in job]

    flow_process.send_signal(signal.SIGTERM)
    flow_process.wait(timeout=90)
    time.sleep(0.5)
    survivors = [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, [p.cmdline() for p in survivors]
