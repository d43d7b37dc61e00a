"""`pretrain lineage`: what data made a model, read from MLflow and checked against the disk.

The chain, oldest first: the crawl files of each snapshot -> every stage's dataset -> the tokenizer
-> the packed data -> the training run -> its checkpoints (LoggedModels) -> their registered
versions. MLflow is the record (the conventions of tasks/tracking.py and tasks/run_tracking.py):
the training run names its packed data and tokenizer by digest and its data-refresh run by a tag;
that run logged the crawl files and every stage's output with their digests. The disk is the
evidence: the packed data's manifest, followed through ``inputs`` down to the crawl files.

Every link is checked both ways and gets a status: ``ok`` (MLflow and the disk agree), ``mismatch``
(they disagree: a digest, a step, a tag; the detail says which two values) or ``missing`` (one side
has nothing to check against, e.g. a checkpoint deleted by ``keep_checkpoints``). Nothing is
dropped from the listing because it failed a check.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from model.checkpoint import COMPLETE
from model.config import load_config
from model.run_dir import RunDir
from tasks import dataset as ds
from tasks.run_tracking import TAG_DATA_REFRESH_RUN, TAG_DATA_VERSION, data_refresh_run_for
from tasks.tokenizer import STAGE as TOKENIZER_STAGE
from tasks.tracking import TAG_CODE_COMMIT, TAG_CODE_DIRTY, crawl_digest

OK, MISMATCH, MISSING = "ok", "mismatch", "missing"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_STEP_MODEL = re.compile(r"^step-(\d+)$")


@dataclass
class Link:
    """One step of the chain: what it is, its identity (a digest, run id, model id) and the check."""

    kind: str  # crawl | dataset | tokenizer | packed | data-refresh run | training run | checkpoint | version
    name: str
    digest: str
    where: str = ""
    status: str = OK
    detail: list[str] = field(default_factory=list)

    def problem(self, status: str, text: str) -> None:
        if self.status != MISMATCH:  # a mismatch outranks a missing side
            self.status = status
        self.detail.append(text)


@dataclass
class Lineage:
    target: str
    links: list[Link]

    @property
    def mismatches(self) -> list[Link]:
        return [link for link in self.links if link.status == MISMATCH]

    @property
    def missing(self) -> list[Link]:
        return [link for link in self.links if link.status == MISSING]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "links": [asdict(link) for link in self.links]}


class LineageError(ValueError):
    """The target cannot be found: a one-line message for the command line."""


# ---------------------------------------------------------------------------------------------
# Where to start


@dataclass(frozen=True)
class Target:
    run_id: str
    model_id: str | None = None  # the one checkpoint asked about, when it is in MLflow
    step: int | None = None  # the checkpoint asked about (by path), found in MLflow or not
    checkpoint: Path | None = None


def run_json_of(path: Path) -> Path | None:
    """run.json of a checkpoint dir or of a run dir, if ``path`` is one."""
    run = RunDir.of_checkpoint(path) if (path / COMPLETE).is_file() else RunDir(path.resolve())
    return run.config_path if run.config_path.is_file() else None


def tracking_uri_of(target: str) -> str | None:
    """The tracking URI the run of a checkpoint or run directory logged to (its run.json)."""
    run_json = run_json_of(Path(target))
    return load_config(run_json).mlflow.tracking_uri if run_json else None


def resolve_target(client: MlflowClient, target: str) -> Target:
    """A checkpoint dir, a run dir, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, or a run id."""
    if target.startswith("models:/"):
        name, sep, ref = target.removeprefix("models:/").rpartition("@")
        if not sep:
            name, _, ref = target.removeprefix("models:/").rpartition("/")
        try:
            version = (
                client.get_model_version_by_alias(name, ref) if sep else client.get_model_version(name, ref)
            )
        except MlflowException as e:
            raise LineageError(f"no registered model version {target}: {e.message}") from None
        return Target(version.run_id, logged_model_id(client, version))
    path = Path(target)
    if path.exists():
        run_json = run_json_of(path)
        if run_json is None:
            raise LineageError(f"{target} is neither a complete checkpoint nor a run directory with run.json")
        run_id = load_config(run_json).mlflow.run_id
        if not run_id:
            raise LineageError(f"{run_json} names no MLflow run (mlflow.run_id): the run was not tracked")
        if not (path / COMPLETE).is_file():
            return Target(run_id)
        step = int(json.loads((path / COMPLETE).read_text())["step"])
        model = _logged_model_of_step(client, run_id, step)
        return Target(run_id, model.model_id if model else None, step, path.resolve())
    if _RUN_ID.match(target):
        return Target(target)
    raise LineageError(f"{target} is not a checkpoint or run directory, a models:/ URI or an MLflow run id")


def logged_model_id(client: MlflowClient, version: ModelVersion) -> str | None:
    """The LoggedModel behind a registered version. MLflow 3's SQL registry does not keep a version's
    ``model_id``, so it is also found by the version's source: ``models:/<model id>`` or the artifact
    location of one of the LoggedModels of the version's run."""
    if version.model_id:
        return version.model_id
    if version.source.startswith("models:/m-"):
        return version.source.removeprefix("models:/")
    if not version.run_id:
        return None
    run = _get_run(client, version.run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{version.run_id}'"
    )
    return next((m.model_id for m in models if m.artifact_location == version.source), None)


def _logged_model_of_step(client: MlflowClient, run_id: str, step: int) -> Any:
    run = _get_run(client, run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"name = 'step-{step}' AND source_run_id = '{run_id}'",
        max_results=1,
    )
    return found[0] if found else None


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise LineageError(f"no MLflow run {run_id} at {client.tracking_uri}") from None


# ---------------------------------------------------------------------------------------------
# MLflow side


@dataclass(frozen=True)
class Logged:
    """A dataset entry of a run: name, digest, where it was (its source), context."""

    name: str
    digest: str
    context: str
    source: str
    profile: str


def _source_uri(source: str) -> str:
    try:
        uri = json.loads(source).get("uri", "")
    except (json.JSONDecodeError, AttributeError):
        return ""
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme == "file" else uri


def logged_datasets(run: Run) -> list[Logged]:
    out = []
    for entry in run.inputs.dataset_inputs:
        context = next((t.value for t in entry.tags if t.key == MLFLOW_DATASET_CONTEXT), "")
        d = entry.dataset
        out.append(Logged(d.name, d.digest, context, _source_uri(d.source), d.profile or ""))
    return out


def logged_elsewhere(client: MlflowClient, digest: str) -> tuple[str, str] | None:
    """(run id, dataset name) of the newest data-refresh run that logged ``digest`` as an output."""
    run_id = data_refresh_run_for(client, digest)
    if run_id is None:
        return None
    name = next(d.name for d in logged_datasets(client.get_run(run_id)) if d.digest == digest)
    return run_id, name


def _run_config_data_dir(client: MlflowClient, run_id: str) -> str | None:
    """``data_dir`` of the run's logged config (artifact ``config/run.json``)."""
    try:
        local = client.download_artifacts(run_id, "config/run.json")
    except (MlflowException, OSError):
        return None
    return json.loads(Path(local).read_text(encoding="utf-8")).get("data_dir")


# ---------------------------------------------------------------------------------------------
# Disk side


@dataclass
class OnDisk:
    """A dataset reached from the packed data through manifest ``inputs``."""

    path: Path
    manifest: ds.Manifest
    digest: str  # dataset_digest, 64 hex
    recorded: list[tuple[str, str]] = field(default_factory=list)  # (by which dataset, digest it records)


def walk_manifests(packed_dir: Path) -> tuple[list[OnDisk], list[str]]:
    """The datasets the packed data was made from, inputs before what was made from them, and the
    input paths that are not there any more."""
    order: list[OnDisk] = []
    seen: dict[Path, OnDisk] = {}
    gone: list[str] = []

    def visit(path: Path) -> OnDisk | None:
        path = path.resolve()
        if path in seen:
            return seen[path]
        if not ds.manifest_path(path).is_file():
            gone.append(str(path))
            return None
        node = OnDisk(path, ds.read_manifest(path), ds.dataset_digest(path))
        seen[path] = node
        for ref in node.manifest.inputs:
            if ref.digest is not None:  # a dataset; raw files (crawl) have a fingerprint instead
                child = visit(Path(ref.path))
                if child is not None:
                    child.recorded.append((str(path), ref.digest))
        order.append(node)
        return node

    visit(packed_dir)
    return order, gone


def crawl_files(node: OnDisk) -> list[ds.InputRef]:
    return [ref for ref in node.manifest.inputs if ref.digest is None]


def changed_crawl_files(files: list[ds.InputRef]) -> tuple[list[str], list[str]]:
    """(files whose fingerprint differs now, files that could not be read)."""
    from tasks.prefect_tasks import file_fingerprint

    changed, unreadable = [], []
    for ref in files:
        try:
            if file_fingerprint(ref.path) != ref.fingerprint:
                changed.append(ref.path)
        except OSError:
            unreadable.append(ref.path)
    return changed, unreadable


# ---------------------------------------------------------------------------------------------
# The walk


def lineage(client: MlflowClient, target: str) -> Lineage:
    """The chain behind ``target`` (see ``resolve_target``), every link checked MLflow against disk."""
    start = resolve_target(client, target)
    run = _get_run(client, start.run_id)
    run_inputs = logged_datasets(run)
    packed_in = next((d for d in run_inputs if d.context == "training"), None)
    tokenizer_in = next((d for d in run_inputs if d.context == "tokenizer"), None)
    refresh_id = run.data.tags.get(TAG_DATA_REFRESH_RUN)
    refresh = _get_run(client, refresh_id) if refresh_id else None
    refresh_data = logged_datasets(refresh) if refresh else []
    outputs = [d for d in refresh_data if d.context == "output"]
    crawls = [d for d in refresh_data if d.context == "crawl"]

    links: list[Link] = []
    if refresh is not None:
        links.append(_run_link("data-refresh run", refresh))

    packed_dir = (packed_in.source if packed_in else "") or _run_config_data_dir(client, run.info.run_id)
    on_disk, gone = walk_manifests(Path(packed_dir)) if packed_dir else ([], [])
    matched: set[str] = set()
    for node in on_disk:
        if crawl_files(node):
            links.append(_crawl_link(client, node, crawls))
    for node in on_disk:
        link = _dataset_link(client, node, outputs, Path(packed_dir))
        matched.add(link.digest)
        matched.update(o.digest for o in outputs if o.source and Path(o.source).resolve() == node.path)
        expected = {"packed": packed_in, "tokenizer": tokenizer_in}.get(link.kind)
        if expected is not None and expected.digest != link.digest:
            link.problem(
                MISMATCH,
                f"the training run's {expected.name!r} input has digest {expected.digest}, "
                f"the manifest gives {link.digest}",
            )
        links.append(link)
    for path in gone:
        if packed_dir and path == str(Path(packed_dir).resolve()):
            continue  # the packed data itself: reported below from the run's input
        links.append(
            Link("dataset", Path(path).name, "", path, MISSING, ["an input manifest names it; not on disk"])
        )
    for logged in outputs:  # recorded in MLflow, not reached from the packed data on disk
        if logged.digest not in matched:
            links.append(_unmatched_output(logged))
    on_disk_kinds = {link.kind for link in links}
    for kind, logged in (("packed", packed_in), ("tokenizer", tokenizer_in)):
        if logged is not None and kind not in on_disk_kinds:
            links.append(Link(kind, logged.name, logged.digest, logged.source, MISSING, ["not on disk"]))

    links.append(
        _training_link(run, packed_in, tokenizer_in, refresh, Path(packed_dir) if packed_dir else None)
    )
    links += _checkpoint_links(client, run, start)
    return Lineage(target, links)


def _run_link(kind: str, run: Run) -> Link:
    tags = run.data.tags
    code = tags.get(TAG_CODE_COMMIT, "unknown")[:12] + (
        " (dirty)" if tags.get(TAG_CODE_DIRTY) == "true" else ""
    )
    return Link(
        kind,
        run.info.run_name or "",
        run.info.run_id,
        f"experiment {run.info.experiment_id}",
        OK,
        [f"code {code}"],
    )


def _crawl_link(client: MlflowClient, node: OnDisk, crawls: list[Logged]) -> Link:
    files = crawl_files(node)
    digest = crawl_digest(files)
    logged = next((c for c in crawls if c.digest == digest), None)
    name = logged.name if logged else f"crawl files of {node.path.name}"
    where = os.path.commonprefix([ref.path for ref in files]).rpartition("/")[0]  # noqa: RUF071 (URLs too)
    link = Link("crawl", name, digest, where, OK, [f"{len(files)} files, read by {node.path}"])
    elsewhere = logged_elsewhere(client, digest) if logged is None else None
    if elsewhere is not None:
        link.name = elsewhere[1]
        link.detail.append(f"logged by data-refresh run {elsewhere[0]}")
    elif logged is None:
        logged_digests = ", ".join(f"{c.name} {c.digest}" for c in crawls) or "none"
        link.problem(
            MISMATCH if crawls else MISSING,
            f"no data-refresh run logged these crawl files (this run's crawl inputs: {logged_digests})",
        )
    changed, unreadable = changed_crawl_files(files)
    if changed:
        link.problem(MISMATCH, f"{len(changed)} crawl files changed since they were read, e.g. {changed[0]}")
    if unreadable:
        link.problem(MISSING, f"{len(unreadable)} crawl files cannot be read now, e.g. {unreadable[0]}")
    return link


def _dataset_link(client: MlflowClient, node: OnDisk, outputs: list[Logged], packed_dir: Path) -> Link:
    digest = node.digest[:32]  # = ds.mlflow_digest
    kind = (
        "packed"
        if node.path == packed_dir.resolve()
        else "tokenizer"
        if node.manifest.stage == TOKENIZER_STAGE
        else "dataset"
    )
    logged = next((o for o in outputs if o.digest == digest), None)
    name = logged.name if logged else node.manifest.stage
    link = Link(
        kind,
        name,
        digest,
        str(node.path),
        OK,
        [f"stage {node.manifest.stage}" + (f", {node.manifest.rows} rows" if node.manifest.shards else "")],
    )
    for made, recorded in node.recorded:
        if recorded != node.digest:
            link.problem(MISMATCH, f"{made} records it as {recorded[:32]}, its manifest now gives {digest}")
    if logged is None:
        same_place = next((o for o in outputs if o.source and Path(o.source).resolve() == node.path), None)
        elsewhere = logged_elsewhere(client, digest) if same_place is None else None
        if same_place is not None:
            link.name = same_place.name
            link.problem(
                MISMATCH,
                f"MLflow logged {same_place.name} here with digest {same_place.digest}, the manifest gives {digest}",
            )
        elif elsewhere is not None:
            link.name = elsewhere[1]
            link.detail.append(f"logged by data-refresh run {elsewhere[0]}")
        else:
            link.problem(MISSING, "no data-refresh run logged this dataset")
    return link


def _unmatched_output(logged: Logged) -> Link:
    link = Link("dataset", logged.name, logged.digest, logged.source)
    path = Path(logged.source) if logged.source else None
    if path is None or not ds.manifest_path(path).is_file():
        link.problem(MISSING, "logged by the data-refresh run; not on disk")
    elif ds.mlflow_digest(path) != logged.digest:
        link.problem(
            MISMATCH, f"logged with digest {logged.digest}, the manifest there gives {ds.mlflow_digest(path)}"
        )
    else:
        link.detail.append("on disk; not an input of this packed data")
    return link


def _training_link(
    run: Run,
    packed_in: Logged | None,
    tokenizer_in: Logged | None,
    refresh: Run | None,
    packed_dir: Path | None,
) -> Link:
    link = _run_link("training run", run)
    if packed_in is None or tokenizer_in is None:
        link.problem(MISSING, "the run has no 'packed' (training) and 'tokenizer' dataset inputs")
    if refresh is None:
        link.problem(MISSING, f"no {TAG_DATA_REFRESH_RUN} tag: the data-refresh run is unknown")
    else:
        made = {o.digest for o in logged_datasets(refresh) if o.context == "output"}
        for logged in (packed_in, tokenizer_in):
            if logged is not None and logged.digest not in made:
                link.problem(
                    MISMATCH,
                    f"its {logged.name!r} input {logged.digest} is not an output of data-refresh run {refresh.info.run_id}",
                )
    version = run.data.tags.get(TAG_DATA_VERSION)
    if version and packed_dir is not None and ds.manifest_path(packed_dir).is_file():
        actual = ds.dataset_digest(packed_dir)[: ds.VERSION_CHARS]
        if version != actual:
            link.problem(
                MISMATCH, f"tag {TAG_DATA_VERSION}={version}, the packed data on disk is version {actual}"
            )
    return link


def _checkpoint_links(client: MlflowClient, run: Run, start: Target) -> list[Link]:
    """The run's checkpoints in MLflow (or just the one asked about) and their registered versions."""
    run_id = run.info.run_id
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if start.model_id is not None or start.step is not None:
        models = [m for m in models if m.model_id == start.model_id]
    models.sort(key=lambda m: int(m.params.get("step", "0")))
    links: list[Link] = []
    if start.step is not None and not models:
        links.append(
            Link(
                "checkpoint",
                f"step-{start.step}",
                "",
                str(start.checkpoint),
                MISSING,
                ["not a LoggedModel of the run"],
            )
        )
    inputs = {d.context: d.digest for d in logged_datasets(run)}
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    for model in models:
        links.append(_checkpoint_link(model))
        for version in sorted(versions, key=lambda v: int(v.version)):
            if logged_model_id(client, version) == model.model_id:
                refresh_id = run.data.tags.get(TAG_DATA_REFRESH_RUN)
                links.append(_version_link(client, version, model.model_id, inputs, refresh_id))
    return links


def _checkpoint_link(model: Any) -> Link:
    where = model.params.get("checkpoint", "")
    link = Link("checkpoint", model.name, model.model_id, where)
    bpb = [m.value for m in model.metrics or [] if m.key == "val/bpb"]
    if bpb:
        link.detail.append(f"val/bpb {bpb[-1]:.4f}")
    marker = Path(where) / COMPLETE if where else None
    if marker is None or not marker.is_file():
        link.problem(MISSING, "not on disk (deleted by keep_checkpoints, or moved)")
        return link
    step = json.loads(marker.read_text())["step"]
    logged_step = model.params.get("step")
    match = _STEP_MODEL.match(model.name)
    if str(step) != logged_step or (match and int(match.group(1)) != step):
        link.problem(MISMATCH, f"logged as step {logged_step}, the checkpoint on disk is step {step}")
    return link


def _version_link(
    client: MlflowClient, version: ModelVersion, model_id: str, inputs: dict[str, str], refresh_id: str | None
) -> Link:
    version = client.get_model_version(version.name, version.version)  # search results carry no aliases
    link = Link(
        "version",
        f"{version.name} v{version.version}",
        model_id,
        f"models:/{version.name}/{version.version}",
    )
    if version.aliases:
        link.detail.append("aliases " + ", ".join(sorted(version.aliases)))
    expected = {
        "packed_digest": inputs.get("training"),
        "tokenizer_digest": inputs.get("tokenizer"),
        "data_refresh_run_id": refresh_id,
    }
    for tag, value in expected.items():
        if version.tags.get(tag, "") != (value or ""):
            link.problem(MISMATCH, f"tag {tag}={version.tags.get(tag)!r}, the training run says {value!r}")
    return link


# ---------------------------------------------------------------------------------------------
# Printing


def format_lineage(result: Lineage) -> str:
    """One line per link (status, kind, name, digest, where), its details indented, a summary."""
    lines = [f"lineage of {result.target}"]
    for link in result.links:
        lines.append(
            f"  [{link.status:>8}] {link.kind:<16} {link.name:<28} {link.digest or '-':<32}  {link.where}"
        )
        lines += [f"{'':14}{text}" for text in link.detail]
    lines.append(
        f"{len(result.links)} links: {len(result.mismatches)} mismatches, {len(result.missing)} missing"
    )
    return "\n".join(lines)
