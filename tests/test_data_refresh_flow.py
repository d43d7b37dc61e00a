"""The data refresh flow through Prefect on a slice of the real crawl: provenance, accounting,
per-stage artifacts, MLflow lineage, and cache hits for every task on a re-run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.data_refresh import cache_status
from tasks import dataset as ds
from tasks import prefect_tasks as pt
from tasks import stage as st

pytestmark = pytest.mark.slow


def _params(crawl: Path, workdir: Path, **extra):
    from flows.data_refresh import DataRefreshParams

    return DataRefreshParams.model_validate(
        {
            "crawl": str(crawl),
            "snapshots": ["CC-MAIN-2026-40"],
            "kinds": ["warc", "wet"],
            "workdir": str(workdir),
            "max_files": 2,
            "ingest": {"max_records_per_file": 150},
            "tokenizer": {"vocab_size": 1024},
            "pack": {"seq_len": 128},
            "mlflow_tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",  # the default, whatever the env
            **extra,
        }
    )


async def _task_run_states(flow_run_id) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}


async def _markdown_artifact(key: str) -> str | None:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0].data if found and found[0].type == "markdown" else None


def test_data_refresh_end_to_end_then_cached(prefect_harness, crawl: Path, tmp_path_factory) -> None:
    from flows.data_refresh import data_refresh

    workdir = tmp_path_factory.mktemp("refresh")
    first = data_refresh(_params(crawl, workdir), return_state=True)
    assert first.is_completed(), first
    result = first.result()

    snapshot_dir = workdir / "CC-MAIN-2026-40"
    for stage in ("ingest", "langid", "quality", "pii", "dedup"):
        manifest = ds.verify(snapshot_dir / stage)
        stats = manifest.stats
        dropped = sum(stats["dropped"].values())
        quarantined = sum(stats["quarantined"].values())
        assert stats["docs_in"] == stats["kept"] + dropped + quarantined, stage
        rejects = ds.read_manifest(snapshot_dir / stage / "rejects")
        assert rejects.rows == dropped + quarantined, stage

    # Each stage's input is the previous stage's output: the lineage chain down to the crawl files.
    langid = ds.read_manifest(snapshot_dir / "langid")
    assert langid.inputs[0].digest == ds.dataset_digest(snapshot_dir / "ingest")
    ingest = ds.read_manifest(snapshot_dir / "ingest")
    assert all(Path(ref.path).exists() and ref.fingerprint for ref in ingest.inputs)

    docs = list(ds.iter_rows(snapshot_dir / "dedup"))
    assert docs, "the slice must keep documents"
    for doc in docs[:50]:
        assert doc["doc_id"] and doc["url"] and doc["warc_record_id"] and doc["date"]
        assert (
            doc["source_file"] and doc["source_offset"] is not None and doc["snapshot"] == "CC-MAIN-2026-40"
        )
        assert doc["lang"] and doc["lang_score"] > 0
    assert len({d["doc_id"] for d in docs}) == len(docs)

    # Every stage is in the stage-count table; training data is published as immutable versions.
    from tasks import registry

    # Every stage that runs by default (boilerplate removal and classifiers are off unless configured).
    run_by_default = [s for s in registry.STAGES if s not in ("boilerplate", "classifier")]
    assert [r["stage"] for r in result["stats"]] == run_by_default
    for name in ("tokenizer", "packed"):
        assert Path(result["outputs"][name]) == ds.resolve_version(workdir / name)
        assert Path(result["outputs"][name]).parent.name == "versions"
    assert not list(workdir.rglob(".build.tmp"))
    # The manifest's code version is the one in the key of the work that wrote it.
    for record in workdir.rglob(".done/*.json"):
        data = json.loads(record.read_text())
        output = record.parent / data["output"]
        if output.name == ds.MANIFEST:
            stage = data["parts"]["stage"]
            code = ds.read_manifest(output.parent).code_version
            assert (
                code == st.code_version_of(data["parts"]["modules"]) == registry.stage(stage).code_version()
            )

    states = asyncio.run(_task_run_states(first.state_details.flow_run_id))
    assert states and all(s == "Completed" for s in states.values()), states
    # Each filtering stage's audit sample is a Markdown artifact a person can read in the UI.
    audit = asyncio.run(_markdown_artifact("audit-cc-main-2026-40-quality"))
    assert audit and "dropped" in audit.lower(), audit
    assert {name.split("-")[0] for name in states} >= set(run_by_default)
    assert [r.action for r in cache_status(_params(crawl, workdir)).stages] == ["cached"] * len(
        run_by_default
    )
    # Its MLflow run, before the runs below change the stages' outputs.
    assert_mlflow_run_has_inputs_outputs_configs_code_and_tables(_params(crawl, workdir), result)

    # A killed writer's temporary file is litter the stage's next run removes.
    litter = snapshot_dir / "quality" / ".part-00000.parquet.x1y2z3.tmp"
    litter.write_bytes(b"half a shard")
    second = data_refresh(_params(crawl, workdir), return_state=True)
    assert second.is_completed()
    states = asyncio.run(_task_run_states(second.state_details.flow_run_id))
    assert states and all(s == "Cached" for s in states.values()), states
    assert not litter.exists()

    # Changing one stage's config redoes that stage and what follows, nothing before it.
    changed = _params(crawl, workdir, pii={"kinds": ["email", "ip_address"]})
    status = {r.stage: r for r in cache_status(changed).stages}
    assert status["quality"].action == "cached" and status["pii"].action == "redo"
    assert all(r.startswith("config: kinds") for r in status["pii"].reasons), status["pii"]
    assert status["dedup"].action == "maybe"
    third = data_refresh(changed, return_state=True)
    assert third.is_completed()
    states = asyncio.run(_task_run_states(third.state_details.flow_run_id))
    assert all(s == "Cached" for n, s in states.items() if n.startswith(("ingest", "langid", "quality"))), (
        states
    )
    assert any(s == "Completed" for n, s in states.items() if n.startswith("pii")), states

    # Invalidating a stage forces it and every later stage, whatever Prefect's cache holds.
    assert pt.invalidate(workdir, "dedup")
    status = {r.stage: r for r in cache_status(changed).stages}
    assert [status[n].action for n in ("pii", "dedup")] == ["cached", "redo"]
    assert status["dedup"].reasons == ["not run yet, or invalidated"]
    fourth = data_refresh(changed, return_state=True)
    states = asyncio.run(_task_run_states(fourth.state_details.flow_run_id))
    assert (
        states["dedup-CC-MAIN-2026-40"] == "Completed" and states["pii-CC-MAIN-2026-40-00000"] == "Cached"
    ), states


def assert_mlflow_run_has_inputs_outputs_configs_code_and_tables(params, result: dict) -> None:
    """The MLflow run of a refresh: checked on the first run of the test above (one refresh fewer)."""
    import mlflow

    workdir = Path(params.workdir)
    client = mlflow.MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.metrics["CC-MAIN-2026-40.ingest.in"] > 0
    assert run.data.params["langid.min_score"] and run.data.params["pii.kinds"]
    assert run.data.tags["pretrain.code_commit"] and run.data.tags["pretrain.code_dirty"] in ("true", "false")

    inputs = {(i.dataset.name, i.tags[0].value): i.dataset for i in run.inputs.dataset_inputs}
    crawl_input = inputs[("crawl/CC-MAIN-2026-40", "crawl")]
    ingest = ds.read_manifest(workdir / "CC-MAIN-2026-40" / "ingest")
    assert json.loads(crawl_input.profile)["fingerprints"] == {r.path: r.fingerprint for r in ingest.inputs}
    expected = {
        f"CC-MAIN-2026-40/{s}": workdir / "CC-MAIN-2026-40" / s
        for s in ("ingest", "langid", "quality", "pii", "dedup")
    }
    expected.update(tokenizer=Path(result["outputs"]["tokenizer"]), packed=Path(result["outputs"]["packed"]))
    for name, path in expected.items():
        assert inputs[(name, "output")].digest == ds.mlflow_digest(path), name

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"stage_counts.json", "stage_counts.md", "tables", "audit"} <= artifacts
    audits = {a.path for a in client.list_artifacts(run.info.run_id, "audit/CC-MAIN-2026-40")}
    assert {"audit/CC-MAIN-2026-40/langid.md", "audit/CC-MAIN-2026-40/quality.md"} <= audits
    counts = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/stage_counts.json")
    assert [r["stage"] for r in counts["stages"]] == [
        "ingest",
        "langid",
        "quality",
        "pii",
        "dedup",
        "tokenizer",
        "pack",
    ]
