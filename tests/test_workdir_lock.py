"""One writer per workdir, with real processes: a second refresh (CLI or flow run) stops with one line
naming the holder or waits for it (bounded), and the lock of a SIGKILLed holder is taken over."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import workdir_lock
from tasks.workdir_lock import LOCK_FILE, WorkdirBusy

PRETRAIN = Path(sys.executable).with_name("pretrain")


def _holder(workdir: Path, seconds: float = 60) -> subprocess.Popen:
    """Another process that takes the workdir's lock, says so, and keeps it for ``seconds``."""
    code = (
        "import sys, time; from tasks import workdir_lock as w; "
        "w.acquire(sys.argv[1]); print('held', flush=True); time.sleep(float(sys.argv[2])); w.release(sys.argv[1])"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_second_writer_stops_with_the_holder_named_or_waits(tmp_path: Path) -> None:
    holder = _holder(tmp_path, seconds=1.5)
    start = time.monotonic()
    with pytest.raises(WorkdirBusy) as busy:
        workdir_lock.acquire(tmp_path, wait_s=0.5)
    assert time.monotonic() - start >= 0.5
    message = str(busy.value)
    assert "\n" not in message and f"pid {holder.pid} on " in message and "waited 0.5 s" in message
    assert "-c" in message and "since 20" in message  # its command and when it took the lock

    with workdir_lock.hold(tmp_path, wait_s=30):  # the holder releases after 1.5 s
        assert workdir_lock.read_holder(tmp_path)["pid"] == os.getpid()
        with workdir_lock.hold(tmp_path, flow_run="run-1"):  # re-entrant: the CLI, then its flow
            assert workdir_lock.read_holder(tmp_path)["flow_run"] == "run-1"
        assert (tmp_path / LOCK_FILE).exists()
    assert holder.wait(10) == 0
    assert not (tmp_path / LOCK_FILE).exists()  # a clean release leaves nothing


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path: Path, caplog) -> None:
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert workdir_lock.read_holder(tmp_path)["pid"] == holder.pid  # its record stays behind
    with workdir_lock.hold(tmp_path):
        assert workdir_lock.read_holder(tmp_path)["pid"] == os.getpid()
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_processes_a_killed_holder_left_running_are_stopped_before_the_takeover(tmp_path: Path) -> None:
    """A flow killed alone leaves its pool workers running (and perhaps writing): they carry its token."""
    code = (
        "import subprocess, sys, time; from tasks import workdir_lock as w; w.acquire(sys.argv[1]); "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(child.pid, flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    worker = int(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    os.kill(worker, 0)  # the orphan still runs
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with workdir_lock.hold(tmp_path):
            assert not workdir_lock._alive(worker)
            assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


@pytest.mark.slow
def test_two_refreshes_on_one_workdir(prefect_harness, tmp_path: Path, crawl: Path) -> None:
    """CLI against CLI, a flow run (as a deployment runs it) against the CLI, then a SIGKILLed CLI's
    lock taken over."""
    from prefect.settings import PREFECT_API_URL

    from flows.data_refresh import DataRefreshParams, data_refresh

    workdir = tmp_path / "workdir"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    args = [
        "--crawl",
        str(crawl),
        "--snapshot",
        "CC-MAIN-2026-40",
        "--max-files",
        "2",  # long enough to be running throughout
        "--workdir",
        str(workdir),
    ]
    first = subprocess.Popen(
        [str(PRETRAIN), "data-refresh", *args], env=env, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (workdir_lock.read_holder(workdir) or {}).get("flow_run"):  # the flow runs, holding it
            assert first.poll() is None and time.monotonic() < deadline, "the first refresh did not start"
            time.sleep(0.5)
        record = workdir_lock.read_holder(workdir)
        assert record["pid"] == first.pid and "data-refresh" in record["command"]

        start = time.monotonic()
        second = subprocess.run(
            [str(PRETRAIN), "data-refresh", *args, "--lock-wait", "2"], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2 and time.monotonic() - start >= 2
        line = second.stderr.strip()
        assert "\n" not in line and line.startswith("pretrain data-refresh: workdir ")
        assert f"pid {first.pid} on " in line and f"flow run {record['flow_run']}" in line
        assert "waited 2 s" in line

        invalidate = subprocess.run(
            [str(PRETRAIN), "cache", "invalidate", "--stage", "dedup", "--workdir", str(workdir)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert invalidate.returncode == 2 and f"pid {first.pid} on " in invalidate.stderr

        params = DataRefreshParams(crawl=str(crawl), snapshots=["CC-MAIN-2026-40"], workdir=str(workdir))
        state = data_refresh(params, return_state=True)  # what a deployment's flow run does
        assert state.is_failed() and f"pid {first.pid} on " in state.message

        # The flow process alone is killed: its task workers run on, and the next holder stops them.
        workers = workdir_lock.writer_processes(record["token"])
        assert workers and first.pid not in workers
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert workdir_lock.writer_processes(record["token"]) == workers
        assert workdir_lock.read_holder(workdir)["pid"] == first.pid  # the dead holder's record
        taken = subprocess.run(
            [str(PRETRAIN), "cache", "invalidate", "--stage", "dedup", "--workdir", str(workdir)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert taken.returncode == 0, taken.stderr
        assert f"stopped the processes it left running: {workers}" in taken.stderr
        assert not workdir_lock.writer_processes(record["token"])
        assert not (workdir / LOCK_FILE).exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
