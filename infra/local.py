"""Start and stop the local platform on loopback: a Prefect server (SQLite), a Prefect process worker
and an MLflow tracking server (SQLite backend, artifacts served from a local directory).

Everything lives under one home directory (default `<repo>/.pretrain-home`, or `$PRETRAIN_HOME`):

    <home>/platform.json     the configuration the running services were started with (no secrets)
    <home>/run/<name>.pid    one JSON record per service: pid (= process group id) and start time
    <home>/logs/<name>.log   stdout+stderr of each service, and deploy.log for `prefect deploy`
    <home>/prefect/          PREFECT_HOME: the server's SQLite database, task result storage
    <home>/mlflow/           MLflow's SQLite stores and the artifact directory

`up` is idempotent: a service whose pid record names a live process that passes its health check is
left alone. `down` stops exactly the process groups `up` recorded, never anything found by name.
Secrets (auth) are only read from the environment; they are passed to the services by environment
and never written to platform.json, the pid records or the command lines.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import yaml

from tasks.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "local-process"  # deployment.yaml's work pool for one machine
WORKER_NAME = "pretrain-local-worker"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
SERVICES = ("prefect-server", "prefect-worker", "mlflow-server")  # start order; `down` stops in reverse


@dataclass(frozen=True)
class Platform:
    """Where the local services listen; what clients (CLI, tests, flows) need to reach them."""

    home: Path
    host: str
    prefect_port: int
    mlflow_port: int
    auth: bool
    # MLflow's stores; None: <home>/mlflow/mlflow.db and <home>/mlflow/artifacts. Another store, e.g.
    # the SQLite database of a `pretrain pipeline` workdir, makes its runs browsable here.
    mlflow_backend_store: str | None = None
    mlflow_artifacts: str | None = None

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def mlflow_stores(self) -> tuple[str, str]:
        """(backend store URI, artifacts directory) of the MLflow server."""
        return (
            self.mlflow_backend_store or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}",
            self.mlflow_artifacts or str(self.home / "mlflow" / "artifacts"),
        )

    def client_env(self) -> dict[str, str]:
        """Environment for a Prefect/MLflow client of this platform. Auth secrets are passed through
        from the current environment, where `up(auth=True)` required them."""
        env = {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # Offline: no usage telemetry from MLflow's server, clients or UI.
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "PRETRAIN_HOME": str(self.home),
        }
        if self.auth:
            env.update({name: os.environ[name] for name in CLIENT_SECRETS if name in os.environ})
        return env


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None  # None: no live process from our pid record
    healthy: bool
    log: Path


# Client-side secrets read from the environment when auth is on. The servers get the same values
# under their own names (see _service_specs).
CLIENT_SECRETS = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SERVER_SECRETS = ("MLFLOW_FLASK_SERVER_SECRET_KEY",)


def default_home() -> Path:
    return Path(os.environ.get("PRETRAIN_HOME", REPO / ".pretrain-home")).resolve()


def up(
    home: Path | None = None,
    *,
    host: str | None = None,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    auth: bool | None = None,
    mlflow_backend_store: str | None = None,
    mlflow_artifacts: str | None = None,
    deploy: bool = True,
    timeout: float = 120.0,
    echo: Callable[[str], None] = print,
) -> Platform:
    """Start whatever is not running yet, apply deployment.yaml (when `deploy`) and print the UI URLs.

    Unset arguments come from the running platform (platform.json), then from the environment
    (PRETRAIN_HOST, PRETRAIN_PREFECT_PORT, PRETRAIN_MLFLOW_PORT, PRETRAIN_AUTH=1,
    PRETRAIN_MLFLOW_BACKEND_STORE, PRETRAIN_MLFLOW_ARTIFACTS), then defaults.
    Asking for a different configuration than the running one is an error: run `down` first.
    """
    home = (home or default_home()).resolve()
    running = any(_live_process(home, name) for name in SERVICES)
    recorded = _read_platform(home) if running else None
    platform = Platform(
        home=home,
        host=host or _setting(recorded, "host", "PRETRAIN_HOST", DEFAULT_HOST),
        prefect_port=int(
            prefect_port or _setting(recorded, "prefect_port", "PRETRAIN_PREFECT_PORT", DEFAULT_PREFECT_PORT)
        ),
        mlflow_port=int(
            mlflow_port or _setting(recorded, "mlflow_port", "PRETRAIN_MLFLOW_PORT", DEFAULT_MLFLOW_PORT)
        ),
        auth=bool(
            auth
            if auth is not None
            else _setting(recorded, "auth", "PRETRAIN_AUTH", "0") in (True, "1", "true")
        ),
        mlflow_backend_store=mlflow_backend_store
        or _setting(recorded, "mlflow_backend_store", "PRETRAIN_MLFLOW_BACKEND_STORE", None),
        mlflow_artifacts=mlflow_artifacts
        or _setting(recorded, "mlflow_artifacts", "PRETRAIN_MLFLOW_ARTIFACTS", None),
    )
    if platform.mlflow_backend_store and urlsplit(platform.mlflow_backend_store).password:
        raise RuntimeError("the MLflow backend store URI holds a password: pass it by environment instead")
    if recorded is not None and recorded != _platform_record(platform):
        raise RuntimeError(
            f"the platform in {home} runs with {recorded}; asked for {_platform_record(platform)}. "
            "Run `pretrain down` first."
        )
    if platform.auth:
        missing = [name for name in (*CLIENT_SECRETS, *SERVER_SECRETS) if not os.environ.get(name)]
        if missing:
            raise RuntimeError(f"auth=True needs these environment variables: {', '.join(missing)}")
        if ":" not in os.environ["PREFECT_API_AUTH_STRING"]:
            raise RuntimeError("PREFECT_API_AUTH_STRING must look like 'user:password'")

    for sub in ("run", "logs", "prefect", "mlflow"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    Path(platform.mlflow_stores[1]).mkdir(parents=True, exist_ok=True)
    atomic_write_json(home / "platform.json", _platform_record(platform))

    specs = _service_specs(platform)
    checks = _health_checks(platform)
    # The servers start side by side; the worker needs the Prefect API.
    for group in (("prefect-server", "mlflow-server"), ("prefect-worker",)):
        starting = {}
        for name in group:
            argv, env, port = specs[name]
            if _live_process(home, name):
                # Ours and alive: maybe still starting, so wait; never kill a slow service on a guess.
                if not _wait_healthy(checks[name], timeout=timeout):
                    raise RuntimeError(
                        f"{name} runs (pid {_read_pid(home, name)['pid']}) but is not healthy; "
                        f"see {_log(home, name)}, or `pretrain down` and up again"
                    )
                echo(f"{name}: already running (pid {_read_pid(home, name)['pid']})")
                continue
            _stop(home, name)  # forget the record of a dead one
            if port is not None and not _port_free(platform.host, port):
                raise RuntimeError(
                    f"{name}: port {platform.host}:{port} is taken by a process this home did not start"
                )
            starting[name] = _spawn(home, name, argv, env)
        for name, pid in starting.items():
            if not _wait_healthy(checks[name], timeout=timeout, pid=pid):
                raise RuntimeError(
                    f"{name} did not become healthy within {timeout:.0f} s; see {_log(home, name)}"
                )
            echo(f"{name}: started (pid {pid}), log {_log(home, name)}")

    if deploy:
        apply_deployments(platform, timeout=3 * timeout)  # imports every flow module (torch and all)
        names = apply_automations(platform.prefect_api_url, auth_headers(platform, "prefect"))
        echo(f"deployments and automations ({', '.join(names)}) applied from deployment.yaml")
    echo(f"Prefect UI: {platform.prefect_ui_url}")
    echo(f"MLflow UI:  {platform.mlflow_url}")
    return platform


def down(
    home: Path | None = None, *, timeout: float = 30.0, echo: Callable[[str], None] = print
) -> list[str]:
    """Stop the services `up` started in `home` (their whole process groups). Returns the names stopped."""
    home = (home or default_home()).resolve()
    stopped = [name for name in reversed(SERVICES) if _stop(home, name, timeout=timeout)]
    for name in stopped:
        echo(f"{name}: stopped")
    return stopped


@contextlib.contextmanager
def running(home: Path | None = None, **up_kwargs: Any) -> Iterator[Platform]:
    """`up(home, **up_kwargs)` for the duration of a with block, then `down`, also when `up` failed
    halfway (tests, scripts)."""
    try:
        yield up(home, **up_kwargs)
    finally:
        down(home, echo=up_kwargs.get("echo", print))


def status(home: Path | None = None) -> dict[str, ServiceStatus]:
    """Liveness (pid record + process) and health (HTTP check) of each service."""
    home = (home or default_home()).resolve()
    recorded = _read_platform(home)
    checks = _health_checks(_platform_from_record(home, recorded)) if recorded else {}
    result = {}
    for name in SERVICES:
        proc = _live_process(home, name)
        healthy = proc is not None and name in checks and _wait_healthy(checks[name], timeout=0)
        result[name] = ServiceStatus(name, proc.pid if proc else None, healthy, _log(home, name))
    return result


def platform(home: Path | None = None) -> Platform | None:
    """The configuration of the platform last started in `home`, or None."""
    home = (home or default_home()).resolve()
    recorded = _read_platform(home)
    return _platform_from_record(home, recorded) if recorded else None


def serving(home: Path | None = None) -> Platform | None:
    """The platform of `home` when its Prefect and MLflow servers are up and healthy, else None."""
    found = platform(home)
    if found is None:
        return None
    checks = _health_checks(found)
    servers = ("prefect-server", "mlflow-server")
    up_and_healthy = all(
        _live_process(found.home, name) and _wait_healthy(checks[name], timeout=0) for name in servers
    )
    return found if up_and_healthy else None


def serve_command(tracking_uri: str) -> str | None:
    """The `pretrain up` line whose MLflow server serves the SQLite store at `tracking_uri` (runs made
    without a platform, e.g. by `pretrain pipeline`), its artifacts directory beside the database as
    `model.tracking.ensure_experiment` places it; None when `tracking_uri` is not a SQLite file."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return f"pretrain up --mlflow-backend-store {tracking_uri} --mlflow-artifacts {database.parent / 'mlartifacts'}"


def apply_deployments(platform: Platform, *, timeout: float = 120.0) -> None:
    """`prefect deploy --all` of deployment.yaml, run from the repo root so the flows' working
    directory (Prefect's default pull step) is this checkout. Output goes to <home>/logs/deploy.log."""
    env = {**os.environ, **platform.client_env()}
    argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", "deployment.yaml", "--all"]  # fmt: skip
    with open(_log(platform.home, "deploy"), "ab") as log:
        result = subprocess.run(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"prefect deploy failed (exit {result.returncode}); see {_log(platform.home, 'deploy')}"
        )


def apply_automations(
    api_url: str, headers: dict[str, str] | None = None, spec: Path = REPO / "deployment.yaml"
) -> list[str]:
    """Create the automations of `spec`'s `automations:` section, or update those that exist by
    name (so applying twice leaves one of each); their names. `prefect deploy` does not read them."""
    from prefect.events.schemas.automations import AutomationCore

    wanted = [
        AutomationCore.model_validate(a) for a in yaml.safe_load(spec.read_text()).get("automations") or []
    ]
    with httpx.Client(base_url=api_url, headers=headers or {}, timeout=60.0) as client:
        found = _api_call(client, "POST", "/automations/filter", {}).json()
        existing = {a["name"]: a["id"] for a in found}
        for automation in wanted:
            body = automation.model_dump(mode="json", exclude={"owner_resource"})  # not updatable
            if automation.name in existing:
                _api_call(client, "PUT", f"/automations/{existing[automation.name]}", body)
            else:
                _api_call(client, "POST", "/automations/", body)
    return [a.name for a in wanted]


RETRIED_STATUS = {429, 502, 503}  # a busy or restarting server, as Prefect's own client retries


def _api_call(client: httpx.Client, method: str, path: str, body: Any, attempts: int = 6) -> httpx.Response:
    """One Prefect API call, retried with backoff (0.5 s doubling, about 15 s in all) while the server
    is busy (a SQLite database under load answers 503) or not answering."""
    for attempt in range(attempts - 1):
        try:
            response = client.request(method, path, json=body)
            if response.status_code not in RETRIED_STATUS:
                return response.raise_for_status()
        except httpx.TransportError:
            pass
        time.sleep(min(0.5 * 2**attempt, 8.0))
    return client.request(method, path, json=body).raise_for_status()  # the last try: its error is raised


# --- services ---------------------------------------------------------------------------------------


# argv, environment, the port it claims (None: none)
ServiceSpec = tuple[list[str], dict[str, str], int | None]


def _service_specs(platform: Platform) -> dict[str, ServiceSpec]:
    home = platform.home
    base = {**os.environ, **platform.client_env(), "PYTHONUNBUFFERED": "1"}
    for name in (*CLIENT_SECRETS, *SERVER_SECRETS, "PREFECT_SERVER_API_AUTH_STRING"):
        base.pop(name, None)  # secrets reach only the processes that need them, and only with auth on
    prefect_client = {}
    mlflow_server = {}
    if platform.auth:
        prefect_client = {name: os.environ[name] for name in CLIENT_SECRETS}
        mlflow_server = {
            "MLFLOW_AUTH_ADMIN_USERNAME": os.environ["MLFLOW_TRACKING_USERNAME"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": os.environ["MLFLOW_TRACKING_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            "MLFLOW_AUTH_CONFIG_PATH": str(_write_mlflow_auth_config(home)),
        }
    prefect_server_env = {
        **base,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
        "PREFECT_UI_API_URL": platform.prefect_api_url,
        # The recent-deployments scheduler picks up a new schedule within seconds; this loop is the backstop.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "30",
        # Concurrency-slot leases on disk: a server restart must not lose a running job's slot.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    }
    if platform.auth:
        prefect_server_env["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"]
    # Client retries that outlast a server restart (the default 5 cover about a minute).
    worker_env = {
        **base,
        **prefect_client,
        "PREFECT_WORKER_QUERY_SECONDS": "3",
        "PREFECT_CLIENT_MAX_RETRIES": "8",
    }
    mlflow_env = {**base, **mlflow_server, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    backend_store, artifacts = platform.mlflow_stores
    mlflow_argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", platform.host, "--port", str(platform.mlflow_port), "--workers", "1",
        "--backend-store-uri", backend_store,
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    if platform.auth:
        mlflow_argv += ["--app-name", "basic-auth"]
    return {
        "prefect-server": (
            [sys.executable, "-m", "prefect", "server", "start",
             "--host", platform.host, "--port", str(platform.prefect_port)],
            prefect_server_env,
            platform.prefect_port,
        ),
        "prefect-worker": (
            [sys.executable, "-m", "prefect", "worker", "start",
             "--pool", WORK_POOL, "--type", "process", "--name", WORKER_NAME],
            worker_env,
            None,
        ),
        "mlflow-server": (mlflow_argv, mlflow_env, platform.mlflow_port),
    }  # fmt: skip


def _health_checks(platform: Platform) -> dict[str, Callable[[], bool]]:
    return {
        "prefect-server": lambda: _http_ok(f"{platform.prefect_api_url}/health", platform, "prefect"),
        "prefect-worker": lambda: _worker_online(platform),
        "mlflow-server": lambda: _http_ok(f"{platform.mlflow_url}/health", platform, "mlflow"),
    }


def _write_mlflow_auth_config(home: Path) -> Path:
    # The shipped basic_auth.ini puts the user database in the working directory; keep it in home.
    # New users get no permission on others' experiments; the admin (our client identity) sees all.
    path = home / "mlflow" / "basic_auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{home / 'mlflow' / 'basic_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    atomic_write_text(path, text)
    return path


def auth_headers(platform: Platform, server: str) -> dict[str, str]:
    """Basic-auth header for `server` ("prefect" or "mlflow") from the environment; {} without auth
    or without the secrets in this environment."""
    if server == "prefect":
        credentials = os.environ.get("PREFECT_API_AUTH_STRING")
    else:
        user, password = (
            os.environ.get("MLFLOW_TRACKING_USERNAME"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD"),
        )
        credentials = f"{user}:{password}" if user and password else None
    if not platform.auth or not credentials:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def _http_ok(url: str, platform: Platform, server: str) -> bool:
    try:
        return httpx.get(url, headers=auth_headers(platform, server), timeout=10.0).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_online(platform: Platform) -> bool:
    try:
        response = httpx.post(
            f"{platform.prefect_api_url}/work_pools/{WORK_POOL}/workers/filter",
            json={},
            headers=auth_headers(platform, "prefect"),
            timeout=10.0,
        )
    except httpx.HTTPError:
        return False
    workers = response.json() if response.status_code == 200 else []
    return any(w["name"] == WORKER_NAME and w["status"] == "ONLINE" for w in workers)


def _wait_healthy(check: Callable[[], bool], *, timeout: float, pid: int | None = None) -> bool:
    """Poll `check` until it passes or `timeout` runs out; give up early if process `pid` died."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline or (pid is not None and not _alive(pid)):
            return False
        time.sleep(0.5)


# --- processes --------------------------------------------------------------------------------------


def _spawn(home: Path, name: str, argv: list[str], env: dict[str, str]) -> int:
    # A new session makes the service its own process group (pgid == pid), so it survives the CLI
    # exiting and `down` can stop it together with every child it forks.
    with open(_log(home, name), "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "argv": argv[:6]}
    atomic_write_json(home / "run" / f"{name}.pid", record)
    return proc.pid


def _live_process(home: Path, name: str) -> psutil.Process | None:
    """The process of `name`'s pid record if it is still that process (pid reuse is checked by start time)."""
    record = _read_pid(home, name)
    if record is None:
        return None
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _stop(home: Path, name: str, timeout: float = 30.0) -> bool:
    """Stop `name`'s recorded process group: SIGTERM, then SIGKILL after `timeout`. True if it was running."""
    pid_file = home / "run" / f"{name}.pid"
    leader = _live_process(home, name)
    if leader is None:
        pid_file.unlink(missing_ok=True)
        return False
    # Children that left the group (own session) are still ours: collect them before signalling.
    members = [leader, *leader.children(recursive=True)]
    pgid = leader.pid
    _signal_all(pgid, members, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive:
        _signal_all(pgid, alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
    pid_file.unlink(missing_ok=True)
    return True


def _signal_all(pgid: int, procs: list[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# --- files ------------------------------------------------------------------------------------------


def _log(home: Path, name: str) -> Path:
    return home / "logs" / f"{name}.log"


def _read_pid(home: Path, name: str) -> dict | None:
    try:
        return json.loads((home / "run" / f"{name}.pid").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _platform_record(platform: Platform) -> dict:
    record = asdict(platform)
    del record["home"]
    return record


def _read_platform(home: Path) -> dict | None:
    try:
        return json.loads((home / "platform.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _platform_from_record(home: Path, record: dict) -> Platform:
    return Platform(home=home, **record)


def _setting(recorded: dict | None, key: str, env_name: str, default: object) -> object:
    """A setting of the running platform, else from the environment, else the default."""
    if recorded is not None and key in recorded:
        return recorded[key]
    return os.environ.get(env_name, default)
