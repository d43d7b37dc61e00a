"""``pretrain lineage``: the chain crawl files -> stage datasets -> tokenizer -> packed data -> training
run -> checkpoint -> registered version, read from a real MLflow store (SQLite) that the producers'
own functions filled (tasks/tracking.py for the data refresh, tasks/run_tracking.py for the training
run, its LoggedModels and the registry), cross-checked against real manifests on disk. A tampered
manifest, a changed crawl file, a wrong version tag and a deleted checkpoint are reported."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from model.checkpoint import COMPLETE
from model.tracking import ensure_experiment
from tasks import dataset as ds
from tasks import pack
from tasks import tokenizer as tk
from tasks.lineage import MISMATCH, MISSING, OK, Lineage, format_lineage, lineage
from tasks.prefect_tasks import file_fingerprint
from tasks.run_tracking import TrainingData, describe_training_run, register_checkpoint
from tasks.tracking import crawl_digest, log_data_refresh
from tests.conftest import snapshot_files
from tests.test_tokenizer import SMALL, build_lid_dataset

SNAPSHOT = "CC-MAIN-2026-40"
MODEL = "tiny-lineage"


@dataclass
class World:
    uri: str
    client: MlflowClient
    crawl: list[ds.InputRef]
    dirs: dict[str, Path]  # MLflow dataset name -> directory
    refresh_run: str
    run_id: str
    run_dir: Path

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step-{step}"


def build_world(root: Path, corpus: Path) -> World:
    """crawl files -> ingest -> langid -> tokenizer -> packed on disk; a data-refresh run, a training
    run with checkpoints step-4 (best: v1) and step-8 (best and final: v2) in MLflow."""
    crawl_dir = root / "crawl"
    crawl_dir.mkdir()
    files = [Path(shutil.copy(f, crawl_dir)) for f in snapshot_files(SNAPSHOT)[:2]]  # copies: touched later
    crawl = [ds.InputRef(path=str(f), fingerprint=file_fingerprint(str(f))) for f in files]
    ingest = build_lid_dataset(corpus, root / "ingest", limit=400, shards=1)
    manifest = ds.read_manifest(ingest)
    ds.write_manifest(ingest, manifest.model_copy(update={"stage": "ingest", "inputs": crawl}))
    langid = root / "langid"
    langid.mkdir()
    for shard in manifest.shards:
        shutil.copy(ingest / shard.path, langid / shard.path)
    ds.write_manifest(
        langid, manifest.model_copy(update={"stage": "langid", "inputs": [ds.input_ref(ingest)]})
    )
    tokenizer = root / "tokenizer"
    tk.train_tokenizer([langid], tokenizer, SMALL)
    packed = root / "packed"
    pack.pack_datasets([langid], tokenizer, packed, pack.PackConfig(seq_len=64, validation_fraction=0.05))
    dirs = {
        f"{SNAPSHOT}/ingest": ingest,
        f"{SNAPSHOT}/langid": langid,
        "tokenizer": tokenizer,
        "packed": packed,
    }

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    refresh_run = log_data_refresh(
        uri, "data-refresh", "refresh", SMALL, [], {}, {k: str(v) for k, v in dirs.items()}, {SNAPSHOT: crawl}
    )
    run_id = client.create_run(ensure_experiment(client, "pretrain"), run_name="tiny").info.run_id
    run_dir = root / "runs" / "tiny"
    run_config = {
        "model": "tiny",
        "data_dir": str(packed),
        "checkpoint_dir": str(run_dir / "checkpoints"),
        "mlflow": {"tracking_uri": uri, "run_id": run_id},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(run_config))
    data = TrainingData.of(packed)
    assert describe_training_run(client, run_id, data, run_config, "the tiny preset") == refresh_run
    for step, bpb in ((4, 3.0), (8, 2.5)):
        checkpoint = run_dir / "checkpoints" / f"step-{step}"
        checkpoint.mkdir(parents=True)  # lineage reads the marker, not the weights
        (checkpoint / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2}))
        register_checkpoint(
            client, run_id, step, checkpoint, {"val/bpb": bpb},
            data=data, data_refresh_run_id=refresh_run, model_name=MODEL, final=step == 8,
        )  # fmt: skip
    return World(uri, client, crawl, dirs, refresh_run, run_id, run_dir)


@pytest.fixture(scope="module")
def world(corpus: Path, tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"), corpus)


def kinds(result: Lineage) -> list[str]:
    return [link.kind for link in result.links]


def test_checkpoint_lineage_is_complete_and_matches_the_manifests(world: World):
    result = lineage(world.client, str(world.checkpoint(8)))
    assert not result.mismatches and not result.missing, format_lineage(result)
    assert kinds(result) == [
        "data-refresh run", "crawl", "dataset", "dataset", "tokenizer", "packed",
        "training run", "checkpoint", "version",
    ]  # fmt: skip
    links = result.links
    assert links[0].digest == world.refresh_run and links[6].digest == world.run_id
    assert (links[1].name, links[1].digest) == (f"crawl/{SNAPSHOT}", crawl_digest(world.crawl))
    for link, (name, path) in zip(links[2:6], world.dirs.items(), strict=True):
        assert (link.name, link.digest, link.where, link.status) == (
            name,
            ds.mlflow_digest(path),
            str(path),
            OK,
        )
    assert links[7].name == "step-8" and links[7].where == str(world.checkpoint(8))
    assert "val/bpb 2.5000" in links[7].detail
    assert links[8].name == f"{MODEL} v2" and "aliases best, final" in links[8].detail


@pytest.mark.parametrize("how", ["models:/{m}@best", "models:/{m}/2", "{run_id}", "{run_dir}"])
def test_other_starting_points_give_the_same_chain(world: World, how: str):
    target = how.format(m=MODEL, run_id=world.run_id, run_dir=world.run_dir)
    result = lineage(world.client, target)
    assert not result.mismatches and not result.missing, format_lineage(result)
    checkpoints = [link.name for link in result.links if link.kind == "checkpoint"]
    versions = [link.name for link in result.links if link.kind == "version"]
    if how.startswith("models:/"):
        assert (checkpoints, versions) == (["step-8"], [f"{MODEL} v2"])
    else:  # the whole run: every checkpoint and its version
        assert (checkpoints, versions) == (["step-4", "step-8"], [f"{MODEL} v1", f"{MODEL} v2"])


def test_cli_prints_the_chain_with_digests(world: World, tmp_path, capsys):
    assert main(["lineage", str(world.checkpoint(8))]) == 0  # the tracking URI comes from run.json
    out = capsys.readouterr().out
    for path in world.dirs.values():
        assert ds.mlflow_digest(path) in out
    assert crawl_digest(world.crawl) in out and world.run_id in out and "0 mismatches, 0 missing" in out
    assert main(["lineage", world.run_id, "--tracking-uri", world.uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == world.run_id
    # bad targets: one line, exit 2
    for target in (str(tmp_path), f"models:/{MODEL}/99", "not-a-run"):
        assert main(["lineage", target, "--tracking-uri", world.uri]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_mismatches_and_gaps_are_reported_not_hidden(corpus: Path, tmp_path, capsys):
    world = build_world(tmp_path, corpus)
    # a stage's dataset rewritten after the refresh logged it (and after the tokenizer read it)
    langid = world.dirs[f"{SNAPSHOT}/langid"]
    logged_digest = ds.mlflow_digest(langid)
    manifest = ds.read_manifest(langid)
    ds.write_manifest(langid, manifest.model_copy(update={"stats": {"rewritten": True}}))
    # a crawl file changed since it was read; a registered version tagged with other data
    os.utime(world.crawl[0].path, (1, 1))
    world.client.set_model_version_tag(MODEL, "2", "packed_digest", "0" * 32)
    # a checkpoint deleted (keep_checkpoints)
    shutil.rmtree(world.checkpoint(4))

    result = lineage(world.client, str(world.run_dir))
    by_name = {link.name: link for link in result.links}
    assert by_name[f"{SNAPSHOT}/langid"].status == MISMATCH
    text = " ".join(by_name[f"{SNAPSHOT}/langid"].detail)
    assert logged_digest in text and ds.mlflow_digest(langid) in text  # both values shown
    assert str(world.dirs["tokenizer"]) in text  # the tokenizer's manifest records the old content
    assert by_name[f"crawl/{SNAPSHOT}"].status == MISMATCH
    assert "1 crawl files changed" in " ".join(by_name[f"crawl/{SNAPSHOT}"].detail)
    assert by_name[f"{MODEL} v2"].status == MISMATCH and by_name[f"{MODEL} v1"].status == OK
    assert by_name["step-4"].status == MISSING and by_name["step-8"].status == OK
    for name in (f"{SNAPSHOT}/ingest", "tokenizer", "packed"):
        assert by_name[name].status == OK, format_lineage(result)

    assert main(["lineage", str(world.run_dir)]) == 1
    out = capsys.readouterr().out
    assert "[mismatch]" in out and "3 mismatches, 1 missing" in out
