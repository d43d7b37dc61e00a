"""The pretrain flow with the real trainer: 2 CPU ranks (gloo) on a tiny model over data packed from
the corpus, through Prefect's test harness: resume after a dead rank, evals of every checkpoint, and
the training run in MLflow (data lineage, config, code, logged models, registered versions)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.pretrain import PretrainParams, logged_params, pinned_data_dir, pretrain
from model.config import TrainConfig, TrainSettings, load_config
from model.model import PRESETS
from model.run_dir import RunDir
from model.tracking import find_or_create_run
from tasks import dataset as ds
from tasks import pack
from tasks import run_tracking as rt
from tasks import tokenizer as tk
from tasks.launchers import LocalLauncher
from tasks.prefect_artifacts import artifact_key
from tasks.tracking import dataset_input
from tests.test_tokenizer import SMALL, build_lid_dataset

REPO = Path(__file__).resolve().parents[1]
CPU2 = LocalLauncher(nproc_per_node=2, device="cpu", stop_grace_s=20)
# Planted in the environment of the training run: no logged value may contain them.
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "hunter2-mlflow-secret", "AWS_SECRET_ACCESS_KEY": "aws-secret-9f8e7d"}


@pytest.fixture(scope="module")
def prefect_api(prefect_harness):
    """The session's one Prefect test server (tests/conftest.py)."""
    return None


@pytest.fixture(scope="module")
def packed_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 lid-dev documents, a 512-token BPE, windows of 33 tokens, 10% held out per slice; the
    packed data published as a version under ``packed/`` (its LATEST), as the data refresh does."""
    root = tmp_path_factory.mktemp("pretrain-data")
    documents = build_lid_dataset(corpus, root / "documents", limit=300, shards=1)
    tk.train_tokenizer([documents], root / "tokenizer", SMALL.model_copy(update={"sample_chars": 300_000}))
    config = pack.PackConfig(seq_len=32, tokens_per_shard=33 * 200, validation_fraction=0.1)
    pack.pack_datasets([documents], root / "tokenizer", root / "packed-build", config)
    ds.publish_version(root / "packed-build", root / "packed")
    return root / "packed"


def small_run(packed_dir: Path, root: Path, name: str, **train) -> PretrainParams:
    settings = dict(
        max_steps=40,
        micro_batch_size=4,
        log_interval=2,
        checkpoint_interval=10,
        keep_checkpoints=10,
        optim={"warmup_steps": 2},
    )
    return PretrainParams(
        run_name=name,
        data_dir=str(packed_dir),
        runs_root=str(root / "runs"),
        train={**settings, **train},
        eval={"max_tokens": 2000, "min_windows_per_slice": 1, "threads": 1},
        checkpoint_poll_s=0.2,
        launcher=CPU2,
        retries=1,
        mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        mlflow_system_metrics_s=0.5,  # an attempt lasts seconds: sample often enough to see it
    )


def log_data_refresh_run(uri: str, packed_dir: Path) -> str:
    """A data-refresh run that logged this packed data as an output, as flows/data_refresh.py does."""
    client = MlflowClient(tracking_uri=uri)
    _, run_id = find_or_create_run(client, rt.DATA_REFRESH_EXPERIMENT, "refresh")
    packed = dataset_input(ds.resolve_version(packed_dir), "packed")._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(packed, [InputTag(MLFLOW_DATASET_CONTEXT, "output")])])
    return run_id


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
    refresh_run = log_data_refresh_run(params.mlflow_tracking_uri, packed_dir)
    run_dir = RunDir.of(params.runs_root, params.run_name)
    killed: list[str] = []
    watcher = kill_a_rank_after(run_dir.checkpoint_dir / "step-10", run_dir.config_path, killed)
    with pytest.MonkeyPatch.context() as env:
        for name, value in SECRETS.items():
            env.setenv(name, value)
        result = pretrain(params)
    watcher.join(5)
    return params, result, killed, refresh_run


@pytest.mark.slow
def test_a_rank_dies_and_the_retry_resumes_from_the_last_checkpoint(pretrained):
    params, result, killed, _ = pretrained
    assert killed, "the run ended before a rank could be killed"
    log = RunDir.of(params.runs_root, params.run_name).log_path.read_text()
    events = [json.loads(line[6:]) for line in log.splitlines() if line.startswith("EVENT ")]
    starts = [e for e in events if e["event"] in ("start", "resumed")]
    assert [e["event"] for e in starts] == ["start", "resumed"]
    resumed_at = starts[1]["step"]
    assert resumed_at >= 10 and starts[1]["checkpoint"].endswith(f"step-{resumed_at}")
    # The successful attempt went on from there, not from step 0.
    assert result.train.first_step > resumed_at
    assert result.train.last_step == 40 and result.train.done["step"] == 40


@pytest.mark.slow
def test_every_new_checkpoint_is_evaluated_into_the_training_run(pretrained):
    params, result, _, _ = pretrained
    steps = [e.step for e in result.evals]
    assert steps == sorted(set(steps)) and steps[-1] == 40 and len(steps) >= 2, steps
    client = MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    history = client.get_metric_history(result.mlflow_run_id, "val/bpb")
    assert [m.step for m in history] == steps  # one point per eval, none doubled by the model links
    assert [m.value for m in history] == [e.metrics["val/bpb"] for e in result.evals]
    assert client.get_metric_history(result.mlflow_run_id, "loss")  # the trainer's own, same run


@pytest.mark.slow
def test_the_run_pins_its_data_version(pretrained, packed_dir):
    params, result, _, _ = pretrained
    version = ds.resolve_version(packed_dir)
    assert version.parent.name == "versions" and Path(result.data_dir) == version
    assert load_config(RunDir.of(params.runs_root, params.run_name).config_path).data_dir == version
    run = MlflowClient(tracking_uri=params.mlflow_tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags[rt.TAG_DATA_VERSION] == version.name


def test_a_resumed_run_keeps_its_data_version_when_latest_moves(packed_dir, tmp_path):
    root = tmp_path / "packed"
    first = ds.publish_version(_copy_dataset(ds.resolve_version(packed_dir), tmp_path / "a"), root)
    run = RunDir.of(tmp_path / "runs", "pinned")
    log = logging.getLogger("test")
    assert pinned_data_dir(run, root, log) == first  # first start: LATEST
    run.root.mkdir(parents=True)
    run.config_path.write_text(
        TrainConfig(data_dir=first, checkpoint_dir=run.checkpoint_dir).model_dump_json()
    )
    changed = _copy_dataset(first, tmp_path / "b")
    manifest = json.loads((changed / ds.MANIFEST).read_text())
    manifest["config"]["note"] = "another refresh"
    (changed / ds.MANIFEST).write_text(json.dumps(manifest))
    second = ds.publish_version(changed, root)
    assert second != first and ds.resolve_version(root) == second
    assert pinned_data_dir(run, root, log) == first  # resumed: the version it started on


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_progress_and_link_artifacts(pretrained):
    params, result, _, _ = pretrained
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    progress = artifacts[artifact_key("train", params.run_name)]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.startswith("step 40/40, loss ")
    link = artifacts[artifact_key("train", params.run_name, "mlflow")]
    assert link.type == "markdown" and result.mlflow_url in link.data
    assert result.mlflow_url.endswith(f"/runs/{result.mlflow_run_id}")


@pytest.mark.slow
def test_the_training_run_names_its_data_config_and_code(pretrained, packed_dir):
    params, result, _, refresh_run = pretrained
    client = MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["train.max_steps"] == "40" and run.data.params["launcher.kind"] == "local"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    data = rt.TrainingData.of(ds.resolve_version(packed_dir))
    inputs = {
        (i.dataset.name, i.dataset.digest, next(t.value for t in i.tags if t.key == MLFLOW_DATASET_CONTEXT))
        for i in run.inputs.dataset_inputs
    }
    assert inputs == {
        ("packed", ds.mlflow_digest(data.packed_dir), "training"),
        ("tokenizer", ds.mlflow_digest(packed_dir.parent / "tokenizer"), "tokenizer"),
    }
    tags = run.data.tags
    assert tags[rt.TAG_DATA_REFRESH_RUN] == refresh_run
    assert len(tags["pretrain.code_commit"]) == 40 and tags["pretrain.code_dirty"] in ("true", "false")
    note = tags["mlflow.note.content"]
    assert "tiny" in note and data.packed_digest in note and refresh_run in note

    logged = Path(client.download_artifacts(run.info.run_id, "config/run.json"))
    config = TrainConfig.model_validate_json(logged.read_text())
    assert (
        config.data_dir == data.packed_dir
        and config.max_steps == 40
        and config.mlflow.run_id == run.info.run_id
    )
    # Events read as named metrics and tags, never as raw JSON; the whole log is events.jsonl.
    assert not any(value.lstrip().startswith("{") for value in tags.values())
    events = Path(client.download_artifacts(run.info.run_id, "events.jsonl")).read_text().splitlines()
    assert [json.loads(e)["event"] for e in events].count("resumed") == 1
    assert client.get_metric_history(run.info.run_id, "checkpoint/total_s")
    assert any(key.startswith("system/") for key in run.data.metrics)  # MLflow system metrics


@pytest.mark.slow
def test_checkpoints_are_logged_models_and_the_best_and_final_are_registered(pretrained, packed_dir):
    params, result, _, refresh_run = pretrained
    client = MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    models = {
        m.name: m
        for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
        if m.source_run_id == run.info.run_id
    }
    assert set(models) == {f"step-{e.step}" for e in result.evals}
    for evaluated in result.evals:
        model = models[f"step-{evaluated.step}"]
        assert model.params == {"step": str(evaluated.step), "checkpoint": evaluated.checkpoint}
        linked = {m.key: m.value for m in model.metrics if m.step == evaluated.step}
        assert linked["val/bpb"] == evaluated.metrics["val/bpb"]

    name = params.run_name
    best_eval = min(result.evals, key=lambda e: e.metrics["val/bpb"])
    best = client.get_model_version_by_alias(name, "best")
    final = client.get_model_version_by_alias(name, "final")
    assert best.tags["step"] == str(best_eval.step) and final.tags["step"] == "40"
    for version, model in ((best, models[f"step-{best_eval.step}"]), (final, models["step-40"])):
        assert version.source == model.artifact_location and version.run_id == run.info.run_id
        linked = json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"])
        assert {"name": name, "version": version.version} in linked
    newest = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert newest.version == final.version  # models:/<name>/latest is the final checkpoint
    data = rt.TrainingData.of(ds.resolve_version(packed_dir))
    for version in (best, final):
        assert version.tags["packed_digest"] == data.packed_digest
        assert version.tags["tokenizer_digest"] == data.tokenizer_digest
        assert version.tags["data_refresh_run_id"] == refresh_run


@pytest.mark.slow
def test_no_credential_reaches_mlflow(pretrained, tmp_path):
    """The run had secrets in its environment: no param, tag, metric name, artifact, logged model or
    model version holds one."""
    params, result, _, _ = pretrained
    client = MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    logged = [json.dumps(run.data.params), json.dumps(run.data.tags), " ".join(run.data.metrics)]
    pending = [""]
    while pending:
        for item in client.list_artifacts(run.info.run_id, pending.pop() or None):
            if item.is_dir:
                pending.append(item.path)
            else:
                path = client.download_artifacts(run.info.run_id, item.path, str(tmp_path))
                logged.append(Path(path).read_text(errors="replace"))
    for model in client.search_logged_models(experiment_ids=[run.info.experiment_id]):
        logged += [json.dumps(model.params), json.dumps(model.tags)]
    for version in client.search_model_versions(f"name = '{params.run_name}'"):
        logged.append(json.dumps(version.tags))
    assert len(logged) > 5
    for secret in SECRETS.values():
        assert not any(secret in text for text in logged), secret


def test_a_tracking_uri_with_credentials_is_logged_and_linked_without_them():
    params = PretrainParams(
        run_name="r", data_dir="d", mlflow_tracking_uri="https://u:pw-123@mlflow.example:5000"
    )
    logged = logged_params(params)
    assert logged["mlflow_tracking_uri"] == "https://mlflow.example:5000"
    assert "pw-123" not in json.dumps(logged)
    assert (
        rt.run_url(None, params.mlflow_tracking_uri, "1", "x")
        == "https://mlflow.example:5000/#/experiments/1/runs/x"
    )


def test_bad_inputs_fail_clearly(packed_dir, tmp_path, prefect_api):
    with pytest.raises(FileNotFoundError, match="is neither a published dataset"):
        pretrain(small_run(tmp_path / "nowhere", tmp_path, "bad-data"))
    with pytest.raises(ValueError, match="run_name"):
        small_run(packed_dir, tmp_path, "../escape")
    with pytest.raises(ValueError, match="model"):
        small_run(packed_dir, tmp_path, "bad-model", model="9B")


# The fields the flow sets itself: where the run reads and writes, its MLflow run, the on-rank eval.
FLOW_SET = {"data_dir", "checkpoint_dir", "mlflow", "eval"}


def test_the_form_nests_every_trainer_setting_with_its_one_description():
    trainer_fields = TrainConfig.model_fields
    form = PretrainParams.model_fields["train"].annotation
    assert form is TrainSettings and not FLOW_SET & set(form.model_fields)
    assert set(form.model_fields) == set(trainer_fields) - FLOW_SET
    for name, field in form.model_fields.items():
        assert field.description and field.description == trainer_fields[name].description, name
        assert field.default == trainer_fields[name].default, name
    schema = PretrainParams.model_json_schema()
    settings = schema["$defs"]["TrainSettings"]["properties"]
    for name in ("fsdp_prefetch", "attention_kernel", "health", "checkpoint_async"):
        assert name in settings, name
    assert settings["model"]["enum"] == list(PRESETS)  # presets from the model's own table
    # data_dir: the data to pin; eval: the flow's eval settings, passed to the ranks when they evaluate
    assert not FLOW_SET & set(schema["properties"]) - {"data_dir", "eval"}
    assert schema["properties"]["launcher"]["discriminator"]["propertyName"] == "kind"


CANCEL_SCRIPT = """
import sys
from flows.pretrain import PretrainParams, pretrain
pretrain(PretrainParams.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
def test_terminating_the_flow_run_stops_the_whole_process_group(packed_dir, tmp_path, prefect_api):
    """A cancelled flow run's process gets SIGTERM (from its worker/runner): no rank, no torchrun survives."""
    params = small_run(packed_dir, tmp_path, "cancel-me", max_steps=100_000, checkpoint_interval=1000)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    flow_process = subprocess.Popen(
        [sys.executable, "-c", CANCEL_SCRIPT, params.model_dump_json()],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = RunDir.of(params.runs_root, params.run_name).log_path
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
