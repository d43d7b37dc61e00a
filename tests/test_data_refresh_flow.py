"""The data refresh flow through Prefect on a slice of the real crawl: provenance, accounting,
per-stage artifacts, MLflow lineage, and cache hits for every task on a re-run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tasks import dataset as ds

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
            **extra,
        }
    )


async def _task_run_states(flow_run_id) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}


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
    assert langid.inputs[0].manifest_sha256 == ds.manifest_sha256(snapshot_dir / "ingest")
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
    assert Path(result["outputs"]["packed"]).joinpath("manifest.json").exists()

    states = asyncio.run(_task_run_states(first.state_details.flow_run_id))
    assert states and all(s == "Completed" for s in states.values()), states

    second = data_refresh(_params(crawl, workdir), return_state=True)
    assert second.is_completed()
    states = asyncio.run(_task_run_states(second.state_details.flow_run_id))
    assert states and all(s == "Cached" for s in states.values()), states

    # Changing one stage's config redoes that stage and what follows, nothing before it.
    third = data_refresh(_params(crawl, workdir, pii={"kinds": ["email", "ip_address"]}), return_state=True)
    assert third.is_completed()
    states = asyncio.run(_task_run_states(third.state_details.flow_run_id))
    assert all(s == "Cached" for n, s in states.items() if n.startswith(("ingest", "langid", "quality"))), (
        states
    )
    assert any(s == "Completed" for n, s in states.items() if n.startswith("pii")), states


def test_mlflow_run_has_stage_metrics_and_dataset_inputs(
    prefect_harness, crawl: Path, tmp_path_factory
) -> None:
    import mlflow

    from flows.data_refresh import data_refresh

    workdir = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"  # explicit: mlflow exports the last URI it was given
    result = data_refresh(
        _params(crawl, workdir, build_training_data=False, max_files=1, mlflow_tracking_uri=uri)
    )
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["CC-MAIN-2026-40.ingest.in"] > 0
    assert run.data.params["langid.min_score"]
    assert any(i.dataset.name.startswith("documents/") for i in run.inputs.dataset_inputs)
