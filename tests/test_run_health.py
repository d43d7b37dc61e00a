"""Run-health events (tasks/run_health.py): the detectors on their own, then the real trainer (one CPU
rank, tiny model) followed by the ``train`` task in a flow on a real Prefect server, with an injected
NaN, an injected loss spike and a frozen rank: the events arrive in Prefect with the run's resource and
its flow run, and the automation deployment.yaml ships cancels the stalled flow run."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL

from infra import local
from model.checkpoint import COMPLETE
from model.config import TrainConfig
from model.run_dir import RunDir
from tasks import pack
from tasks import run_health as rh
from tasks import tokenizer as tk
from tasks.launchers import LocalLauncher, TrainJob, write_run_config
from tasks.training_job import TrainResult, train
from tests.test_tokenizer import SMALL, build_lid_dataset

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The detectors


def test_trainer_events_map_to_health_events() -> None:
    rollback = {"event": "rollback", "step": 9, "loss": 80.0, "zscore": 40.0, "to_step": 8, "checkpoint": "c"}
    spike, recovery = rh.from_trainer_event(rollback)
    assert (spike.name, spike.step, spike.payload["recovered"]) == ("pretrain.run.loss-spike", 9, True)
    assert (recovery.name, recovery.payload["to_step"]) == ("pretrain.run.recovery", 8)
    [unrecovered] = rh.from_trainer_event({"event": "spike_not_rolled_back", "step": 3, "loss": 9.0})
    assert (unrecovered.kind, unrecovered.payload["recovered"]) == ("loss-spike", False)
    [nan] = rh.from_trainer_event({"event": "nonfinite_skipped", "step": 6, "data_step": 6, "loss": None})
    assert nan.name == "pretrain.run.nonfinite-skipped"
    for quiet in ("start", "checkpoint", "done", "batch_skipped"):
        assert rh.from_trainer_event({"event": quiet, "step": 1}) == []


def test_throughput_drop_fires_once_per_drop() -> None:
    watch = rh.ThroughputWatch(fraction=0.5, window=10, min_reports=3)
    rates = [100, 1, 102, 98, 101, 40, 30, 99, 100, 45]
    fired = [step for step, rate in enumerate(rates) if watch.observe(step, rate)]
    # Nothing during warm-up (step 1's dip), once when it falls below half the median, once again
    # after throughput came back.
    assert fired == [5, 9]


def test_stall_fires_once_until_progress_resumes() -> None:
    now = [0.0]
    watch = rh.StallWatch(after_s=10, clock=lambda: now[0])
    now[0] = 50.0
    assert watch.check() is None  # no output yet: queued, not stalled
    watch.start()
    watch.progress(4)
    now[0] = 59.0
    assert watch.check() is None
    now[0] = 61.0
    event = watch.check()
    assert (event.name, event.step, event.payload["silent_s"]) == ("pretrain.run.stalled", 4, 11.0)
    now[0] = 200.0
    assert watch.check() is None  # one event per stall
    watch.progress(5)
    now[0] = 211.0
    assert watch.check().step == 5
    watch.progress(6)
    watch.stop()  # the job said it is done: shutting down takes a while, and is no stall
    now[0] = 999.0
    assert watch.check() is None


def test_eval_regression_after_k_rises() -> None:
    watch = rh.EvalRegressionWatch(evals=2)
    bpbs = {100: 3.0, 200: 2.8, 300: 2.9, 400: 2.7, 500: 2.75, 600: 2.8, 700: 2.9, 800: 2.6, 900: 2.7}
    fired = {step: watch.observe(step, bpb) for step, bpb in bpbs.items()}
    found = {step: event for step, event in fired.items() if event}
    assert list(found) == [600]  # 2.7 -> 2.75 -> 2.8; one rise (300, 900) is noise, 700 continues the streak
    assert found[600].payload["steps"] == [400, 500, 600]
    assert found[600].payload["values"] == [2.7, 2.75, 2.8]
    assert watch.observe(600, 9.9) is None  # the same checkpoint again


# ---------------------------------------------------------------------------------------------
# On a real Prefect server


@pytest.fixture(scope="module")
def api(prefect_harness) -> str:
    return PREFECT_API_URL.value()


def post(api: str, path: str, body: dict) -> dict | list:
    response = httpx.post(f"{api}/{path}", json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def test_deployment_automations_apply_once(api: str) -> None:
    names = local.apply_automations(api)
    assert local.apply_automations(api) == names  # applied again: updated, not duplicated
    found = post(api, "automations/filter", {})
    assert sorted(a["name"] for a in found if a["name"] in names) == sorted(names)
    by_name = {a["name"]: a for a in found}
    stalled = by_name["pretrain-cancel-stalled-run"]
    assert stalled["enabled"] and stalled["trigger"]["expect"] == ["pretrain.run.stalled"]
    assert [a["type"] for a in stalled["actions"]] == ["cancel-flow-run"]
    assert "pretrain-eval-regression" in names


def tiny_packed(corpus: Path, root: Path) -> Path:
    """200 lid-dev documents, a 512-token BPE, windows of 33 tokens (tests/test_server_faults.py too)."""
    documents = build_lid_dataset(corpus, root / "documents", limit=200, shards=1)
    tk.train_tokenizer([documents], root / "tokenizer", SMALL.model_copy(update={"sample_chars": 200_000}))
    config = pack.PackConfig(seq_len=32, tokens_per_shard=33 * 200, validation_fraction=0.1)
    pack.pack_datasets([documents], root / "tokenizer", root / "packed", config)
    return root / "packed"


@pytest.fixture(scope="module")
def packed(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_packed(corpus, tmp_path_factory.mktemp("health-data"))


def rank_of(config_path: Path) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (
            "model.trainer" in cmdline
            and "torch.distributed.run" not in cmdline
            and str(config_path) in cmdline
        ):
            return proc
    return None


def flow_run_states(api: str, flow_run_id: str) -> list[dict]:
    response = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": flow_run_id}, timeout=60)
    response.raise_for_status()
    return response.json()


def freeze_rank_after(marker: Path, config_path: Path, api: str, seen: dict) -> threading.Thread:
    """SIGSTOP the trainer rank once ``marker`` exists (a hung collective, a dead NFS mount), until the
    stall automation has cancelled the flow run (or 60 s), then SIGCONT."""

    def freeze() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        rank = rank_of(config_path)
        if rank is None:
            return
        rank.send_signal(signal.SIGSTOP)
        seen["frozen_at"] = time.monotonic()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "flow_run_id" in seen:
                names = [s["name"] for s in flow_run_states(api, seen["flow_run_id"])]
                if "Cancelling" in names:
                    seen["cancelled_after_s"] = time.monotonic() - seen["frozen_at"]
                    break
                time.sleep(0.2)
        finally:
            rank.send_signal(signal.SIGCONT)

    thread = threading.Thread(target=freeze, daemon=True)
    thread.start()
    return thread


def test_training_health_events_reach_prefect_and_the_stall_cancels(
    api: str, packed: Path, tmp_path: Path
) -> None:
    local.apply_automations(api)
    name = f"health-{uuid.uuid4().hex[:8]}"
    run_dir = RunDir.of(tmp_path / "runs", name)
    job = TrainJob(run_dir=run_dir, total_steps=30)
    config = TrainConfig(
        model="tiny",
        data_dir=packed,
        checkpoint_dir=run_dir.checkpoint_dir,
        micro_batch_size=4,
        max_steps=30,
        log_interval=1,
        checkpoint_interval=4,
        keep_checkpoints=10,
        checkpoint_async=False,
        optim={"warmup_steps": 2},
        # A NaN at data step 6, a 20x loss at 10: skipped, then rolled back to step 8's checkpoint.
        health={
            "spike_min_history": 3,
            "rollback_min_steps_before": 2,
            "debug_inject_nan_at_step": 6,
            "debug_inject_spike_at_step": 10,
        },
    )
    write_run_config(job, config.model_dump(mode="json"))
    health = rh.RunHealthConfig(stall_after_s=2.0, throughput_min_reports=3)
    seen: dict = {}
    froze = freeze_rank_after(run_dir.checkpoint_dir / "step-20" / COMPLETE, run_dir.config_path, api, seen)

    @flow(name="follow-training")
    def watched() -> TrainResult:
        from prefect.runtime import flow_run

        seen["flow_run_id"] = flow_run.id
        return train(job, LocalLauncher(nproc_per_node=1, device="cpu"), health)

    state = watched(return_state=True)
    froze.join(timeout=90)
    flow_run_id = seen["flow_run_id"]
    assert "cancelled_after_s" in seen, "the stall automation did not cancel the flow run"
    assert 2.0 <= seen["cancelled_after_s"] < 30
    cancelling = [s for s in flow_run_states(api, flow_run_id) if s["name"] == "Cancelling"]
    assert "Automation" in cancelling[0]["message"]
    # No worker here to stop the process (under a worker the cancel stops the job), so the job
    # carried on to its end; the flow run stays cancelled.
    assert state.is_cancelling() or state.is_cancelled(), state

    query = {"filter": {"resource": {"id": [f"pretrain.run.{name}"]}, "order": "ASC"}, "limit": 50}
    deadline = time.monotonic() + 30  # events are persisted asynchronously
    kinds: list[str] = []
    while time.monotonic() < deadline:
        events = post(api, "events/filter", query)["events"]
        kinds = [e["event"] for e in events]
        if {"pretrain.run.stalled", "pretrain.run.throughput-drop"} <= set(kinds):
            break
        time.sleep(0.5)
    by_kind = {e["event"]: e for e in events}
    assert {
        "pretrain.run.nonfinite-skipped",
        "pretrain.run.loss-spike",
        "pretrain.run.recovery",
        "pretrain.run.stalled",
        "pretrain.run.throughput-drop",
    } <= set(kinds), kinds
    assert by_kind["pretrain.run.nonfinite-skipped"]["payload"]["step"] == 6
    assert by_kind["pretrain.run.recovery"]["payload"]["to_step"] == 8
    assert by_kind["pretrain.run.stalled"]["payload"]["step"] >= 20
    for event in events:
        assert event["resource"]["prefect.resource.name"] == name
        related = {r["prefect.resource.id"]: r for r in event["related"]}
        assert related[f"prefect.flow-run.{flow_run_id}"]["prefect.resource.role"] == "flow-run"
        assert any(r.startswith("prefect.task-run.") for r in related)  # Prefect added the task run
    # The automation's own record of acting on the stall (persisted asynchronously too).
    own_record = {
        "filter": {
            "event": {"prefix": ["prefect.automation."]},
            "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        }
    }
    deadline = time.monotonic() + 30
    triggered = post(api, "events/filter", own_record)["events"]
    while time.monotonic() < deadline and not any(
        e["event"] == "prefect.automation.action.executed" for e in triggered
    ):
        time.sleep(0.5)
        triggered = post(api, "events/filter", own_record)["events"]
    assert any(e["event"] == "prefect.automation.action.executed" for e in triggered), json.dumps(triggered)[
        :2000
    ]
