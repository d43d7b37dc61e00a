"""deployment.yaml applied by `infra.local.up` to a real Prefect server: the four deployments with
their work pool and run forms, the nightly schedule producing runs at 02:00 UTC, and the run-health
automations (tests/test_run_health.py shows them firing)."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from infra import local

REPO = Path(__file__).resolve().parents[1]


def api(platform: local.Platform, path: str, body: dict | None = None) -> list | dict:
    url = f"{platform.prefect_api_url}/{path}"
    response = httpx.post(url, json=body, timeout=120) if body is not None else httpx.get(url, timeout=120)
    response.raise_for_status()
    return response.json()


def deployments(platform: local.Platform) -> dict[str, dict]:
    return {d["name"]: d for d in api(platform, "deployments/filter", {})}


def test_deployment_file_names_real_flows_and_pools() -> None:
    spec = yaml.safe_load((REPO / "deployment.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"data-refresh", "pretrain", "evaluate", "ablation"}
    for deployment in by_name.values():
        path, _, function = deployment["entrypoint"].partition(":")
        assert f"def {function}(" in (REPO / path).read_text()
        assert deployment["work_pool"]["name"] == local.WORK_POOL
    assert spec["definitions"]["work_pools"]["gpu"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"]
    # Every automation trigger expects events tasks/run_health.py emits.
    from tasks.run_health import EVENT_PREFIX

    kinds = ("loss-spike", "recovery", "nonfinite-skipped", "throughput-drop", "stalled", "eval-regression")
    for automation in spec["automations"]:
        assert set(automation["trigger"]["expect"]) <= {f"{EVENT_PREFIX}.{kind}" for kind in kinds}


@pytest.mark.slow
def test_up_applies_the_deployments(platform: local.Platform) -> None:
    # A deployment turns READY once the worker started by `up` has polled its pool (every ~10 s).
    deadline = time.monotonic() + 90
    applied = deployments(platform)
    while any(d["status"] != "READY" for d in applied.values()) and time.monotonic() < deadline:
        time.sleep(2)
        applied = deployments(platform)
    assert set(applied) == {"data-refresh", "pretrain", "evaluate", "ablation"}
    for deployment in applied.values():
        assert deployment["work_pool_name"] == local.WORK_POOL
        assert deployment["status"] == "READY"  # the worker started by `up` polls the pool
        # The run form: the flow's pydantic parameter model, with its sections as definitions.
        schema = deployment["parameter_openapi_schema"]
        assert schema["properties"], deployment["name"]
        assert schema.get("definitions"), deployment["name"]
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
    nightly = applied["data-refresh"]
    assert [s["schedule"] for s in nightly["schedules"]] == [
        {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    ]
    assert nightly["schedules"][0]["active"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert applied["pretrain"]["schedules"] == [] and applied["evaluate"]["schedules"] == []
    # The run-health automations (deployment.yaml's `automations:`), for the UI's Automations page.
    automations = {a["name"]: a for a in api(platform, "automations/filter", {})}
    shipped = [a["name"] for a in yaml.safe_load((REPO / "deployment.yaml").read_text())["automations"]]
    assert sorted(automations) == sorted(shipped)
    assert all(a["enabled"] for a in automations.values())
    assert automations["pretrain-cancel-stalled-run"]["actions"][0]["type"] == "cancel-flow-run"


@pytest.mark.slow
def test_nightly_schedule_creates_runs_at_two_utc(platform: local.Platform) -> None:
    nightly = deployments(platform)["data-refresh"]
    query = {
        "deployments": {"id": {"any_": [nightly["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    deadline = time.monotonic() + 90  # the scheduler service picks up new deployments within seconds
    runs: list = []
    while time.monotonic() < deadline:
        runs = api(platform, "flow_runs/filter", query)
        if len(runs) >= 3:
            break
        time.sleep(2)
    assert len(runs) >= 3, f"the scheduler created {len(runs)} runs for data-refresh"
    starts = [datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")) for r in runs]
    now = datetime.now(UTC)
    for start in starts:
        assert (start.hour, start.minute, start.second) == (2, 0, 0), start
        assert start > now
    assert starts[0] - now <= timedelta(days=1)  # the next night, not some later one
    assert all(b - a == timedelta(days=1) for a, b in itertools.pairwise(starts))
    assert all(r["auto_scheduled"] for r in runs)
    # No run of the on-demand deployments was scheduled.
    others = [deployments(platform)[name]["id"] for name in ("pretrain", "evaluate")]
    assert api(platform, "flow_runs/filter", {"deployments": {"id": {"any_": others}}}) == []
