"""The stage registry: one description per stage, code versions computed from real imports, cache
keys that change exactly when a module a stage imports changes, and `pretrain cache` reasons."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import dataset as ds
from tasks import registry
from tasks import stage as st
from tests.conftest import REPO, snapshot_files


def test_every_stage_once_in_run_order_with_computed_modules() -> None:
    assert list(registry.STAGES) == [
        "ingest",
        "langid",
        "quality",
        "classifier",
        "pii",
        "boilerplate",
        "dedup",
        "tokenizer",
        "pack",
    ]
    modules = {name: set(s.modules()) for name, s in registry.STAGES.items()}
    assert "tasks.text" in modules["quality"] and "tasks.text" in modules["tokenizer"]
    assert {"tasks.minhash", "tasks.dedup"} <= modules["dedup"]
    assert {"model.data", "tasks.tokenizer", "tasks.text"} <= modules["pack"]
    assert "tasks.extract" in modules["ingest"]
    for name, found in modules.items():
        assert {"tasks.stage", "tasks.dataset"} <= found, name  # the contract, through real imports
        assert not any(m.startswith("flows") or m == "tasks.prefect_tasks" for m in found), name


def test_lazy_and_relative_imports_count(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "a.py").write_text("def f():\n    from tasks import b\n    return b\n")
    (tmp_path / "tasks" / "b.py").write_text("from . import c\nimport numpy\n")
    (tmp_path / "tasks" / "c.py").write_text("x = 1\n")
    assert st.project_modules("tasks.a", root=tmp_path) == ["tasks", "tasks.a", "tasks.b", "tasks.c"]


# ---------------------------------------------------------------------------------------------
# The manifest's code_version is the key's, for every stage (each stage's own code writes it)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, ds.Manifest]:
    """Every stage run once on a small slice of the real crawl, through the registry's run functions."""
    from tasks.ingest import code_version as ingest_code_version

    work = tmp_path_factory.mktemp("chain")
    manifests: dict[str, ds.Manifest] = {}
    ingest = registry.stage("ingest")
    config = ingest.config({"max_records_per_file": 80})
    result = ingest.run(
        config, str(snapshot_files("CC-MAIN-2026-40", "wet")[0]), str(work / "ingest"), 0, None
    )
    manifests["ingest"] = st.finalize_dataset(
        work / "ingest", "ingest", [result], ds.DOCUMENT_SCHEMA, config, ingest_code_version(), []
    )
    previous = work / "ingest"
    for name in ("langid", "quality", "pii"):
        stage = registry.document_stage(name, registry.stage(name).config())
        manifests[name] = st.run_stage_on_dataset(stage, previous, work / name)
        previous = work / name
    for name, call in (
        ("boilerplate", {"index_dir": str(work / "bp-index"), "work_dir": str(work / "bp-scratch")}),
        ("dedup", {"index_dir": str(work / "index"), "work_dir": str(work / "scratch")}),
        ("tokenizer", {}),
        ("pack", {"tokenizer_dir": str(work / "tokenizer")}),
    ):
        spec = registry.stage(name)
        config = spec.config(
            {"vocab_size": 512} if name == "tokenizer" else {"seq_len": 64} if name == "pack" else {}
        )
        inputs = [str(previous)] if name in ("boilerplate", "dedup") else [str(work / "dedup")]
        manifests[name] = spec.run(config, inputs, str(work / name), **call)
    return manifests


def test_manifest_code_version_is_the_cache_keys(chain: dict[str, ds.Manifest]) -> None:
    assert set(chain) == set(registry.STAGES) - {"classifier"}  # needs a trained model: test_classifier.py
    for name, manifest in chain.items():
        spec = registry.stage(name)
        key = st.CacheKey(stage=name, config={}, modules=spec.module_hashes(), inputs=[])
        assert manifest.code_version == st.code_version_of(key.modules) == spec.code_version(), name


# ---------------------------------------------------------------------------------------------
# Editing a shared helper in a copy of the tree changes the keys of exactly the stages importing it

_KEYS = """
import json
from tasks import registry, stage
print(json.dumps({
    name: stage.CacheKey(stage=name, config={}, modules=spec.module_hashes(), inputs=["same input"]).value
    for name, spec in registry.STAGES.items()
}))
"""


def _keys(root: Path) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _KEYS],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(root)},
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_editing_a_helper_changes_the_keys_of_its_importers_only(tmp_path: Path) -> None:
    for package in ("flows", "tasks", "model"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _keys(tmp_path)
    assert before == _keys(tmp_path)  # deterministic
    for helper, must_change, must_not in (
        ("tasks/text.py", {"quality", "tokenizer", "pack"}, {"ingest", "langid"}),
        ("tasks/minhash.py", {"boilerplate", "dedup"}, set(registry.STAGES) - {"boilerplate", "dedup"}),
        ("model/data.py", {"pack"}, set(registry.STAGES) - {"pack"}),
    ):
        with open(tmp_path / helper, "a") as f:
            f.write("\n# an edit\n")
        after = _keys(tmp_path)
        changed = {name for name in before if before[name] != after[name]}
        importers = {
            name
            for name, spec in registry.STAGES.items()
            if helper.removesuffix(".py").replace("/", ".") in spec.modules()
        }
        assert changed == importers, helper
        assert must_change <= changed and not (must_not & changed), (helper, changed)
        before = after


# ---------------------------------------------------------------------------------------------
# Done records explain a changed key; invalidation forgets a stage and what follows


def _work(tmp_path: Path, stage: str, config: dict, modules: dict, inputs: list[str]):
    from tasks import prefect_tasks as pt

    output = tmp_path / stage / "part-00000.parquet"
    return pt.Work(
        key=st.CacheKey(stage=stage, config=config, modules=modules, inputs=inputs),
        label=stage,
        call={},
        record=str(pt.record_path(output)),
        output=str(output),
    )


def test_why_redo_names_config_code_and_input(tmp_path: Path) -> None:
    from tasks import prefect_tasks as pt

    work = _work(
        tmp_path, "pii", {"kinds": ["email"], "x": 1}, {"tasks.pii": "a", "tasks.text": "b"}, ["sha1"]
    )
    assert pt.why_redo(work) == ["not run yet, or invalidated"]
    Path(work.output).parent.mkdir(parents=True)
    Path(work.output).write_bytes(b"shard")
    pt.mark_done(work.record, work.key, work.output, ds.ShardInfo(path="p", rows=1, bytes=1, sha256="s"))
    assert pt.is_done(work) and pt.why_redo(work) == []

    changed = _work(
        tmp_path, "pii", {"kinds": ["email", "ip"], "x": 1}, {"tasks.pii": "a", "tasks.text": "c"}, ["sha2"]
    )
    assert pt.why_redo(changed) == ["config: kinds", "code: tasks.text", "input changed"]
    Path(work.output).unlink()
    assert pt.why_redo(work) == ["output missing"]


def test_invalidate_forgets_the_stage_and_every_later_one(tmp_path: Path) -> None:
    from tasks import prefect_tasks as pt

    works = {name: _work(tmp_path, name, {}, {}, []) for name in registry.STAGES}
    for work in works.values():
        Path(work.output).parent.mkdir(parents=True)
        Path(work.output).write_bytes(b"x")
        pt.mark_done(work.record, work.key, work.output, ds.ShardInfo(path="p", rows=1, bytes=1, sha256="s"))
    removed = pt.invalidate(tmp_path, "dedup")
    assert len(removed) == 3
    assert {name for name, w in works.items() if not pt.is_done(w)} == {"dedup", "tokenizer", "pack"}


def test_readme_stage_table_is_the_registry() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## What runs where", 1)[1].split("```")[1]
    rows = [line.split() for line in block.splitlines() if line.strip().startswith("->")]
    documented = [r[1] for r in rows if r[1] in registry.STAGES]
    assert documented == list(registry.STAGES)
    for row in rows:
        if row[1] in registry.STAGES:
            spec = registry.stage(row[1])
            files = [w.rstrip(",") for w in row[2:] if w.rstrip(",").endswith(".py")]
            assert files[0] == spec.module.replace(".", "/") + ".py", row
            assert {f.removesuffix(".py").replace("/", ".") for f in files} <= set(spec.modules()), row
