"""The local platform (infra/local.py) against real servers: start, health, idempotent restart,
crash recovery, clean stop, port conflicts, and authentication with secrets kept out of logs."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from infra import local
from tests.conftest import free_port, migrated_prefect_db


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    proc = psutil.Process(pid)
    return [pid, *(child.pid for child in proc.children(recursive=True))]


@pytest.mark.slow
def test_up_is_idempotent_recovers_and_down_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = {"prefect_port": free_port(), "mlflow_port": free_port()}
    try:
        platform = local.up(home, **ports, deploy=False, timeout=240, echo=lambda _: None)
        assert httpx.get(f"{platform.prefect_api_url}/health", timeout=10).json() is True
        assert httpx.get(f"{platform.mlflow_url}/health", timeout=10).status_code == 200
        first = local.status(home)
        assert all(s.healthy and s.pid for s in first.values()), first
        assert {p.name for p in (home / "logs").glob("*.log")} >= {f"{n}.log" for n in local.SERVICES}
        processes = {pid for s in first.values() for pid in tree(s.pid)}

        # Second `up`: every service is healthy, so nothing is started again.
        started = time.monotonic()
        lines: list[str] = []
        assert local.up(home, deploy=False, echo=lines.append) == platform  # ports come from the running one
        assert time.monotonic() - started < 30
        assert {name: s.pid for name, s in local.status(home).items()} == {n: s.pid for n, s in first.items()}
        assert sum("already running" in line for line in lines) == 3, lines

        # A crashed worker is restarted alone; the servers keep their pids.
        os.killpg(first["prefect-worker"].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not gone(first["prefect-worker"].pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert local.status(home)["prefect-worker"].pid is None
        local.up(home, deploy=False, echo=lambda _: None)
        after = local.status(home)
        assert after["prefect-worker"].healthy and after["prefect-worker"].pid != first["prefect-worker"].pid
        assert after["prefect-server"].pid == first["prefect-server"].pid
        assert after["mlflow-server"].pid == first["mlflow-server"].pid
        processes |= set(tree(after["prefect-worker"].pid))

        # Same home, other ports while running: refused rather than a second platform.
        with pytest.raises(RuntimeError, match="down"):
            local.up(home, prefect_port=free_port(), deploy=False, echo=lambda _: None)
    finally:
        stopped = local.down(home, echo=lambda _: None)

    assert sorted(stopped) == sorted(local.SERVICES)
    leftovers = [pid for pid in processes if not gone(pid)]
    assert not leftovers, [psutil.Process(pid).cmdline() for pid in leftovers]
    assert not list((home / "run").glob("*.pid"))
    for port in ports.values():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # free again
    status = local.status(home)
    assert all(s.pid is None and not s.healthy for s in status.values())
    assert local.down(home, echo=lambda _: None) == []  # nothing left to stop


def test_up_refuses_a_port_taken_by_someone_else(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port 127.0.0.1:{port} is taken"):
            local.up(tmp_path, prefect_port=port, mlflow_port=free_port(), deploy=False, echo=lambda _: None)
    assert local.status(tmp_path)["prefect-server"].pid is None


def test_auth_requires_the_secrets_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (*local.CLIENT_SECRETS, *local.SERVER_SECRETS):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="PREFECT_API_AUTH_STRING"):
        local.up(tmp_path, auth=True, deploy=False, echo=lambda _: None)


def test_mlflow_stores_are_options_and_hold_no_password(tmp_path: Path) -> None:
    """`pretrain up --mlflow-backend-store/--mlflow-artifacts` serves another workdir's stores."""
    stores = {
        "mlflow_backend_store": f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}",
        "mlflow_artifacts": "/w/art",
    }
    platform = local.Platform(
        home=tmp_path, host="127.0.0.1", prefect_port=1, mlflow_port=2, auth=False, **stores
    )
    argv = local._service_specs(platform)["mlflow-server"][0]
    assert argv[argv.index("--backend-store-uri") + 1] == stores["mlflow_backend_store"]
    assert argv[argv.index("--artifacts-destination") + 1] == "/w/art"
    default = local.Platform(home=tmp_path, host="127.0.0.1", prefect_port=1, mlflow_port=2, auth=False)
    assert default.mlflow_stores == (
        f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        str(tmp_path / "mlflow" / "artifacts"),
    )
    with pytest.raises(RuntimeError, match="password"):
        local.up(
            tmp_path, mlflow_backend_store="postgresql://u:pw@db/mlflow", deploy=False, echo=lambda _: None
        )
    assert local.serving(tmp_path) is None  # nothing runs: the pipeline uses its embedded stores


@pytest.mark.slow
def test_the_printed_serve_command_serves_the_runs_made_without_a_platform(tmp_path: Path) -> None:
    """What `pretrain pipeline` prints when no platform runs: that command, then the run's page data."""
    from mlflow.tracking import MlflowClient

    from flows import cli
    from model.tracking import find_or_create_run

    (tmp_path / "workdir").mkdir()
    uri = f"sqlite:///{tmp_path / 'workdir' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    _, run_id = find_or_create_run(client, "pretrain", "made-offline")
    client.log_text(run_id, "# samples\n", "samples/step-1.md")
    command = local.serve_command(uri)
    assert command and command.startswith("pretrain up ")
    args = cli.build_parser().parse_args(command.split()[1:])  # the line parses as it is printed
    # A fresh database's migrations are the first test's; here only MLflow's stores matter.
    migrated_prefect_db(tmp_path / "home" / "prefect" / "prefect.db")
    with local.running(
        tmp_path / "home",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        mlflow_backend_store=args.mlflow_backend_store,
        mlflow_artifacts=args.mlflow_artifacts,
        deploy=False,
        timeout=240,
        echo=lambda _: None,
    ) as platform:
        got = httpx.get(
            f"{platform.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30
        )
        assert got.json()["run"]["info"]["run_name"] == "made-offline"
        artifact = httpx.get(
            f"{platform.mlflow_url}/get-artifact",
            params={"path": "samples/step-1.md", "run_uuid": run_id},
            timeout=30,
        )
        assert artifact.text == "# samples\n"
    assert local.serve_command("http://mlflow:5000") is None


# A flow run through the authenticated Prefect API that logs to the authenticated MLflow server.
AUTH_PROBE = textwrap.dedent(
    """
    import mlflow
    from prefect import flow

    @flow(name="auth-probe")
    def probe() -> str:
        mlflow.set_experiment("auth-probe")
        with mlflow.start_run() as run:
            mlflow.log_param("batch_size", 8)
            mlflow.log_metric("loss", 1.5)
        return run.info.run_id

    print("RUN_ID", probe())
    """
)


@pytest.mark.slow
def test_auth_refuses_anonymous_calls_and_keeps_secrets_out_of_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefect_password = secrets.token_urlsafe(16)
    mlflow_password = secrets.token_urlsafe(16)
    flask_key = secrets.token_urlsafe(24)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", f"pf-admin:{prefect_password}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "mlflow-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_password)
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", flask_key)
    home = tmp_path / "home"
    migrated_prefect_db(home / "prefect" / "prefect.db")  # a fresh database's migrations: the first test's
    try:
        platform = local.up(
            home, prefect_port=free_port(), mlflow_port=free_port(), auth=True, deploy=False, timeout=240
        )
        # The worker is healthy only if it reached the API with the auth string.
        assert all(s.healthy for s in local.status(home).values())
        prefect_auth = local.auth_headers(platform, "prefect")
        mlflow_auth = local.auth_headers(platform, "mlflow")
        flows = f"{platform.prefect_api_url}/flows/filter"
        assert httpx.post(flows, json={}, timeout=10).status_code == 401
        assert httpx.post(flows, json={}, auth=("pf-admin", "wrong"), timeout=10).status_code == 401
        assert httpx.post(flows, json={}, headers=prefect_auth, timeout=10).status_code == 200
        experiments = f"{platform.mlflow_url}/api/2.0/mlflow/experiments/search"
        query = {"max_results": 10}
        assert httpx.get(experiments, params=query, timeout=10).status_code == 401
        assert (
            httpx.get(experiments, params=query, auth=("mlflow-admin", "wrong"), timeout=10).status_code
            == 401
        )
        assert httpx.get(experiments, params=query, headers=mlflow_auth, timeout=10).status_code == 200

        # Clients configured only by the environment (client_env + the secrets) work end to end.
        env = {**os.environ, **platform.client_env()}
        result = subprocess.run(
            [sys.executable, "-c", AUTH_PROBE], env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-3000:]
        run_id = result.stdout.split("RUN_ID")[-1].strip()
        run = httpx.get(
            f"{platform.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, headers=mlflow_auth
        ).json()["run"]
        assert run["data"]["metrics"][0]["key"] == "loss"
        flow_runs = httpx.post(
            f"{platform.prefect_api_url}/flow_runs/filter", json={}, headers=prefect_auth, timeout=10
        ).json()
        assert [r["state_type"] for r in flow_runs] == ["COMPLETED"]
        recorded = json.dumps(run) + result.stdout + result.stderr
        recorded += " ".join(" ".join(psutil.Process(s.pid).cmdline()) for s in local.status(home).values())
    finally:
        local.down(home, echo=lambda _: None)

    # No secret in any log, record or MLflow param; none on the services' command lines either.
    written = "".join(
        p.read_text(errors="replace") for p in home.rglob("*") if p.suffix in {".log", ".json", ".pid"}
    )
    assert (home / "logs" / "mlflow-server.log").stat().st_size > 0
    for secret in (prefect_password, mlflow_password, flask_key):
        assert secret not in written
        assert secret not in recorded


INFRA = Path(local.__file__).resolve().parent


def documented_variables() -> set[str]:
    """The variables of the one configuration table in infra/README.md."""
    readme = (INFRA / "README.md").read_text()
    table = readme.split("## Configuration (every variable)")[1].split("\n## ")[0]
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, flags=re.M))


def test_compose_file_is_complete_and_keeps_secrets_in_the_environment() -> None:
    text = (INFRA / "docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"prefect-server", "prefect-db", "worker", "mlflow", "mlflow-db", "minio", "deploy"} <= set(
        services
    )
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "--app-name basic-auth" in mlflow_command and "s3://" in mlflow_command
    assert "postgresql://" in mlflow_command
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
    # Every secret is a required variable, never a literal, and every variable is documented.
    for secret in (
        "PREFECT_DB_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "PREFECT_API_AUTH_STRING",
    ):
        assert f"${{{secret}:?" in text
    config = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", config))
    assert used <= documented_variables(), used - documented_variables()


def test_k8s_manifests_reference_only_documented_secrets_and_variables() -> None:
    folder = INFRA / "k8s" / "platform"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents = [
        doc for path in kustomization["resources"] for doc in yaml.safe_load_all((folder / path).read_text())
    ]
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    for deployment in ("prefect-server", "prefect-worker", "mlflow"):
        assert ("Deployment", deployment) in kinds
    assert {("StatefulSet", "prefect-db"), ("StatefulSet", "mlflow-db"), ("StatefulSet", "minio")} <= kinds
    secret_keys, env_names = set(), set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                secret_keys.add(node["secretKeyRef"]["key"])
            if "name" in node and ("value" in node or "valueFrom" in node):
                env_names.add(node["name"])
                assert "valueFrom" in node or "PASSWORD" not in node["name"], node  # no literal secret
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(documents)
    config = next(
        doc
        for doc in documents
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "pretrain-platform"
    )
    documented = documented_variables()
    assert secret_keys <= documented, secret_keys - documented
    assert (env_names | set(config["data"])) - {
        "POD_NAME",
        "PGDATA",
        "POSTGRES_USER",
        "POSTGRES_DB",
        "POSTGRES_PASSWORD",
    } <= documented
    assert "PREFECT_API_AUTH_STRING" in secret_keys and "MLFLOW_TRACKING_PASSWORD" in secret_keys


def test_api_calls_outlast_a_busy_server_and_then_fail_loudly() -> None:
    """apply_automations' calls: a 503 (SQLite under load) or a dropped connection is retried; a
    client error is not, and a server that stays busy ends in the HTTP error."""
    answers = iter([httpx.ConnectError("refused"), httpx.Response(503), httpx.Response(200, json=[])])
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        reply = next(answers)
        if isinstance(reply, Exception):
            raise reply
        return reply

    with httpx.Client(base_url="http://prefect", transport=httpx.MockTransport(answer)) as client:
        assert local._api_call(client, "POST", "/automations/filter", {}).json() == []
    assert seen == ["POST"] * 3

    def status(code: int) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: httpx.Response(code))

    for code, attempts in ((422, 6), (503, 2)):
        client = httpx.Client(base_url="http://prefect", transport=status(code))
        with client, pytest.raises(httpx.HTTPStatusError, match=str(code)):
            local._api_call(client, "PUT", "/automations/x", {}, attempts=attempts)
