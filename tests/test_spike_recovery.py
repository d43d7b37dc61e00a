"""Spike recovery that recovers (issue 15), on 2 CPU ranks over real packed shards.

The instability: a poisoned range of batches (data steps 12-13, updated at 100x the learning rate,
the ``debug_lr_blowup_*`` hook) wrecks the weights one update before the loss shows it, and the
step-12 checkpoint is saved right after the poisoned update: it holds the damage. Rolling back to the
newest checkpoint (``rollback_min_steps_before: 0``, the old recipe) replays into the same damage,
spikes again at every replay and gives up. PaLM's recipe (a checkpoint at least 4 steps before the
spike, every batch since skipped, the learning rate halved for 10 steps) recovers once and finishes
with a finite, decreasing loss; a run killed after the recovery resumes to the bitwise same end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from model.checkpoint import complete_checkpoints
from model.config import OptimConfig
from model.health import plan_recovery, recoveries_near, rollback_step
from model.trainer import TrainState, lr_at
from tests.test_trainer import (
    assert_bitwise_equal,
    complete_marker,
    config,
    final_state,
    pack_corpus,
    train,
)

pytestmark = pytest.mark.slow

OPTIM = {"lr": 3e-3, "warmup_steps": 4}
POISON = {"debug_lr_blowup_data_steps": [12, 13], "debug_lr_blowup_factor": 100.0, "spike_min_history": 4}
RECIPE = {
    "rollback_min_steps_before": 4,
    "recovery_lr_factor": 0.5,
    "recovery_lr_steps": 10,
    "max_recoveries": 2,
    "recovery_window_steps": 100,
}


def test_the_recovery_plan():
    """Which checkpoint, which batches, which learning rates, which spikes count towards the cap."""
    assert rollback_step([100, 200, 300], spike_step=350, min_steps_before=100) == 200
    assert rollback_step([100, 200, 300], spike_step=350, min_steps_before=0) == 300
    assert rollback_step([300], spike_step=350, min_steps_before=100) is None
    spike = {"spike_step": 350, "spike_data_step": 356, "loss": 9.0, "zscore": 12.0, "checkpoint": "c"}
    cool = {"lr_factor": 0.5, "lr_steps": 20}
    plain = plan_recovery(**spike, to_step=200, to_data_step=204, skip_batches=0, **cool)
    assert (plain.skip_first_data_step, plain.skip_last_data_step, plain.skipped_batches) == (205, 356, 152)
    assert not plain.skips(204) and plain.skips(205) and plain.skips(356) and not plain.skips(357)
    palm = plan_recovery(**spike, to_step=200, to_data_step=204, skip_batches=300, **cool)
    assert (palm.skip_first_data_step, palm.skip_last_data_step) == (205, 504)
    assert [palm.lr_scale(step) for step in (200, 201, 220, 221)] == [1.0, 0.5, 0.5, 1.0]
    # The window counts spikes on either side: after a rollback a new spike can have a smaller step.
    assert recoveries_near([plain, palm], step=300, window=60) == 2
    assert recoveries_near([plain, palm], step=290, window=60) == 0


@pytest.fixture(scope="module")
def packed(corpus: Path, tmp_path_factory) -> Path:
    return pack_corpus(corpus, tmp_path_factory)


def spike_config(packed, run_dir, **health) -> dict:
    # One checkpoint kept, and the one rollback_min_steps_before needs: without it a spike would find
    # only the newest, too recent to roll back to.
    return config(
        packed, run_dir, checkpoint_interval=4, keep_checkpoints=1, optim=OPTIM, health={**POISON, **health}
    )


@pytest.fixture(scope="module")
def recovered(packed, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recovered")
    run = train(spike_config(packed, run_dir, **RECIPE), run_dir)
    assert run.returncode == 0, "\n".join(run.lines[-40:])
    return run, run_dir


def test_a_checkpoint_of_the_trainer_before_recoveries_resumes_with_its_skipped_batches():
    old = {"step": 20, "data_step": 22, "tokens_seen": 5, "skipped_updates": 1, "mlflow_run_id": None}
    state = TrainState.from_saved({**old, "skip_data_steps": [9, 15], "rollbacks": 2})
    assert [d for d in range(1, 23) if any(r.skips(d) for r in state.recoveries)] == [9, 15]
    assert all(r.lr_scale(step) == 1.0 for r in state.recoveries for step in range(30))
    assert (state.step, state.data_step) == (20, 22)


def test_rolling_back_to_the_newest_checkpoint_replays_the_damage_and_gives_up(packed, tmp_path):
    cfg = spike_config(packed, tmp_path, rollback_min_steps_before=0, max_recoveries=3)
    run = train(cfg, tmp_path)
    assert run.returncode != 0
    rollbacks = run.named("rollback")
    # Every replay from the damaged step-12 checkpoint spikes at once, whatever batch it is given.
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(13, 12)] * 3
    assert [(r["skip_first_data_step"], r["skip_last_data_step"]) for r in rollbacks] == [
        (13, 13),
        (13, 14),
        (13, 15),
    ]
    (failed,) = run.named("failed")
    assert "loss spike at step 13 after 3 recoveries within 1000 steps; giving up" in failed["error"]
    assert not run.named("done")


def test_rolling_back_before_the_spike_window_skipping_its_batches_recovers(recovered):
    run, run_dir = recovered
    (rollback,) = run.named("rollback")
    # The spike shows at step 13 (the first loss after the poisoned update of step 12); the newest
    # checkpoint 4 steps before it is step 8; batches 9-13 (those since, the spike's own included) go.
    assert (rollback["step"], rollback["spike_data_step"], rollback["to_step"]) == (13, 13, 8)
    assert rollback["checkpoint"].endswith("step-8")
    assert (rollback["skip_first_data_step"], rollback["skip_last_data_step"]) == (9, 13)
    assert rollback["skipped_batches"] == 5 and rollback["zscore"] > 6
    assert (rollback["lr_factor"], rollback["lr_until_step"]) == (0.5, 18)
    assert (rollback["recoveries"], rollback["recoveries_in_window"]) == (1, 1)
    (skipped,) = run.named("batches_skipped")
    assert (skipped["step"], skipped["first_data_step"], skipped["last_data_step"]) == (8, 9, 13)

    steps = [m["step"] for m in run.metrics]
    assert steps == [*range(1, 14), *range(9, 25)]
    before, after = run.metrics[:13], {m["step"]: m for m in run.metrics[13:]}
    assert before[12]["loss"] > 2 * before[11]["loss"]  # the spike
    # Steps 9-18 after the rollback train at half the schedule's learning rate, then at the schedule.
    for step, m in after.items():
        factor = 0.5 if step <= 18 else 1.0
        assert m["lr"] == pytest.approx(factor * lr_at(step - 1, OptimConfig(**OPTIM), 24), rel=1e-12)
    # Finite and decreasing: every loss after the rollback below the one of step 8 (the checkpoint's
    # step), the last four 0.1 below the first four.
    losses = [m["loss"] for m in after.values()]
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) < before[7]["loss"] and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    # The steps abandoned by the rollback left no checkpoint: those on disk are the recovered run's.
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [20, 24]
    done = run.named("done")[0]
    assert done["step"] == 24 and done["rollbacks"] == 1


def gone_after_the_rollback(cfg: dict) -> Callable[[], bool]:
    """True once the abandoned step-12 checkpoint was deleted by the rollback (before its re-save)."""
    marker, seen = complete_marker(cfg, 12), []

    def gone() -> bool:
        if marker.exists():
            seen.append(True)
        return bool(seen) and not marker.exists()

    return gone


# SIGKILL after the recovery: once the recovered run has written the step-16 checkpoint (the recovery
# is in its trainer state), and between the rollback and the next checkpoint (only the step-8 one is
# on disk: the resume must spike and recover again, the same way).
KILL_POINTS = {
    "checkpoint-after-recovery": (lambda cfg: complete_marker(cfg, 16), 16),
    "before-the-next-checkpoint": (gone_after_the_rollback, 8),
}


@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_killed_after_the_recovery_resumes_to_the_bitwise_same_end(packed, recovered, tmp_path, kill_point):
    """The recovery lives in the checkpoints' trainer state (a resume from step 16 still cools the
    learning rate of steps 17-18), or is made again by a resume from before it."""
    ref, ref_dir = recovered
    cfg = spike_config(packed, tmp_path, **RECIPE)
    stop_when, resume_step = KILL_POINTS[kill_point]
    killed = train(cfg, tmp_path, stop_when=stop_when(cfg))
    assert killed.returncode != 0 and not killed.named("done")
    assert complete_checkpoints(tmp_path / "checkpoints")[-1][0] == resume_step
    resumed = train(cfg, tmp_path)
    assert resumed.returncode == 0, "\n".join(resumed.lines[-40:])
    assert resumed.named("resumed")[0]["step"] == resume_step
    again = [(r["step"], r["to_step"], r["skipped_batches"]) for r in resumed.named("rollback")]
    assert again == ([(13, 8, 5)] if resume_step == 8 else [])
    assert resumed.losses() == {step: ref.losses()[step] for step in range(resume_step + 1, 25)}
    assert_bitwise_equal(final_state(tmp_path), final_state(ref_dir))
