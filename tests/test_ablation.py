"""A tiny data ablation on CPU through Prefect: two recipes (heuristics only, + boilerplate removal) on a
slice of the crawl, a tiny proxy each, one held-out set; the stages the recipes share run once, and
MLflow holds a parent run with a child per recipe and the comparison table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

from model import data as packed
from tasks import ablation as ab
from tasks import dataset as ds
from tasks.launchers import LocalLauncher

pytestmark = pytest.mark.slow


def _params(crawl: Path, workdir: Path):
    from flows.ablation import AblationParams

    return AblationParams.model_validate(
        {
            "name": "tiny",
            "workdir": str(workdir),
            "base": {
                "crawl": str(crawl),
                "snapshots": ["CC-MAIN-2026-40"],
                "kinds": ["warc"],
                "max_files": 1,
                "ingest": {"max_records_per_file": 120},
                "tokenizer": {"vocab_size": 512, "sample_chars": 300_000},
                "pack": {"seq_len": 32, "validation_fraction": 0.25},
            },
            "recipes": [
                {"name": "heuristics"},
                {
                    "name": "boilerplate",
                    "overrides": {
                        "boilerplate": {"host_min_docs": 3, "host_min_fraction": 0.2, "partitions": 2}
                    },
                },
            ],
            "tokens": 32 * 4 * 12,
            "train": {"micro_batch_size": 4, "log_interval": 2, "optim": {"warmup_steps": 2}},
            "baseline_seeds": 1,
            "eval": {"max_tokens": 3000, "min_windows_per_slice": 1, "task_limit": 8, "threads": 1},
            "launcher": LocalLauncher(device="cpu", nproc_per_node=1, stop_grace_s=10),
            "mlflow_tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        }
    )


async def _task_states(flow_run_name: str) -> dict[str, str]:
    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name]))
        )
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {t.name: t.state.name for t in tasks}


def test_tiny_ablation_compares_two_recipes_in_mlflow(
    prefect_harness, crawl: Path, tmp_path_factory, monkeypatch
) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows import ablation as flow

    # Stage tasks in threads: a process pool per recipe would start (and import everything) twice.
    threads = flow.recipe_data.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    monkeypatch.setattr(flow, "recipe_data", threads)
    workdir = tmp_path_factory.mktemp("ablation")
    params = _params(crawl, workdir)
    rows = flow.ablation(params)
    assert [r["run"] for r in rows] == ["heuristics", "boilerplate"]

    # The second recipe reused the first one's ingest ... pii and ran only what differs.
    states = asyncio.run(_task_states("tiny-boilerplate-data"))
    shared = {n: s for n, s in states.items() if n.startswith(("ingest", "langid", "quality", "pii"))}
    assert shared and set(shared.values()) == {"Cached"}, states
    assert states["boilerplate-CC-MAIN-2026-40"] == states["dedup-CC-MAIN-2026-40"] == "Completed", states
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (workdir / "stages").iterdir())
    assert stages == [
        "boilerplate",
        "dedup",
        "dedup",
        "ingest",
        "langid",
        "pack",
        "pack",
        "pii",
        "quality",
        "tokenizer",
    ]

    # MLflow: a parent run, one child per recipe, the same held-out set, the table.
    client = mlflow.MlflowClient(tracking_uri=params.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("ablation")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId IS NULL")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["boilerplate", "heuristics"]
    digests = {c.data.tags[ab.TAG_EVAL_SET] for c in children}
    assert len(digests) == 1 and digests == {parent.data.params["eval_set"]}
    for child in children:
        metrics = child.data.metrics
        assert (
            metrics["val/bpb"] > 0 and metrics["train/loss_final"] > 0 and metrics["data/documents_kept"] > 0
        )
        assert metrics["train/tokens"] >= params.tokens
        assert any(k.startswith("task/") for k in metrics), metrics
        assert child.info.status == "FINISHED"
    boilerplate = next(c for c in children if c.info.run_name == "boilerplate")
    assert boilerplate.data.params["overrides.boilerplate.host_min_docs"] == "3"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.json"} <= artifacts
    table = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/comparison.md")
    assert "| heuristics |" in table and "| boilerplate |" in table and "held-out bpb" in table
    assert mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/comparison.json") == rows

    # The held-out set: baseline validation documents, in no recipe's training split.
    (eval_dir,) = (workdir / "eval").iterdir()
    held_out = set(pq.read_table(eval_dir / "documents" / "part-00000.parquet").column("doc_id").to_pylist())
    assert held_out and ds.dataset_digest(eval_dir / "documents") == digests.pop()
    for packed_root in (workdir / "stages").glob("pack-*/packed"):
        version = ds.resolve_version(packed_root)
        documents = pq.read_table(version / packed.DOCUMENTS_FILE, columns=["doc_id", "split"]).to_pylist()
        assert not held_out & {d["doc_id"] for d in documents if d["split"] == "train"}
