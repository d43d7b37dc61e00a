"""The classifier stage and its training: bitwise-reproducible models, manifest and MLflow records,
scores and per-language thresholds with every drop counted, the cache key following the model file,
and the stage inside a data refresh."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from tasks import dataset as ds
from tasks import prefect_tasks as pt
from tasks import registry
from tasks import stage as st
from tasks.classifier import ClassifierConfig, ClassifierStage, load_model, model_input, positive_scores
from tasks.train_classifier import TrainClassifierConfig, train

COMMON = [f"w{i}" for i in range(3000)]
GOOD = [f"good{i}" for i in range(300)]
BAD = [f"bad{i}" for i in range(300)]
SMALL = {"dim": 8, "bucket": 20_000, "epoch": 25, "lr": 0.5}  # a small, fast model: the data is easy


def _text(rng: random.Random, marked: list[str], share: float = 0.2, words: int = 80) -> str:
    lines = [
        " ".join(
            rng.choice(marked) if rng.random() < share else rng.choice(COMMON) for _ in range(words // 4)
        )
        for _ in range(4)
    ]
    return "\n".join(lines)  # newlines: predict() rejects them, model_input must fold them


def _write(path: Path, rows: list[dict]) -> Path:
    schema = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("lang", pa.string())])
    path.mkdir(parents=True)
    shard = ds.write_table(ds.rows_to_table(rows, schema), path / st.shard_name(0))
    ds.write_manifest(
        path, ds.Manifest(stage="reference", schema=ds.schema_description(schema), shards=[shard])
    )
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("reference")
    sets = {}
    for name, marked in (("positive", GOOD), ("negative", BAD)):
        rows = [
            {"doc_id": f"{name}-{lang}-{i}", "text": _text(rng, marked), "lang": lang}
            for lang, n in (("en", 240), ("de", 120))
            for i in range(n)
        ]
        sets[name] = _write(root / name, rows)
    return sets


@pytest.fixture(scope="module")
def models(reference, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for key, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        train(
            reference["positive"],
            reference["negative"],
            root / key,
            TrainClassifierConfig(seed=seed, **SMALL),
        )
        out[key] = root / key
    return out


def test_training_is_bitwise_reproducible_and_seeded(models):
    a, again, b = ((models[k] / "model.bin").read_bytes() for k in ("a", "a_again", "b"))
    assert a == again
    assert a != b  # the seed matters: the equality above is not vacuous


def test_manifest_records_data_digests_heldout_pr_and_reuses_same_key(models, reference):
    manifest = json.loads((models["a"] / "manifest.json").read_text())
    assert manifest["model_sha256"] == ds.sha256_file(models["a"] / "model.bin")
    for side in ("positive", "negative"):
        data = manifest["training_data"][side]
        assert data["digest"] == ds.dataset_digest(reference[side])
        assert data["rows"] == 360 and data["heldout"] > 0 and data["train"] + data["heldout"] <= 360
    heldout = manifest["heldout"]
    assert heldout["precision"] > 0.9 and heldout["recall"] > 0.9, heldout
    assert set(heldout["by_language"]) == {"en", "de"}
    assert manifest["input"] == {"language_aware": True, "max_chars": 10_000}

    mtime = (models["a"] / "model.bin").stat().st_mtime_ns
    assert (
        train(reference["positive"], reference["negative"], models["a"], TrainClassifierConfig(**SMALL))
        == manifest
    )
    assert (models["a"] / "model.bin").stat().st_mtime_ns == mtime  # same key: not trained again


def test_stage_scores_and_filters_by_language_threshold_with_counted_drops(models):
    rng = random.Random(11)
    docs = [{"doc_id": f"g{i}", "text": _text(rng, GOOD), "lang": "en"} for i in range(20)]
    docs += [{"doc_id": f"b{i}", "text": _text(rng, BAD), "lang": "en"} for i in range(20)]
    docs += [{"doc_id": f"d{i}", "text": _text(rng, BAD), "lang": "de"} for i in range(10)]  # kept: de at 0.0
    nolang = "Die Funktion gibt eine Liste von Werten zurück, wenn das Argument gültig ist. " * 3
    docs += [{"doc_id": "nolang", "text": nolang}]  # lid.176 labels it German: kept at 0.0
    docs += [
        {"doc_id": "empty", "text": "  \n ", "lang": "en"},
        {"doc_id": "broken", "text": None, "lang": "en"},
    ]
    config = ClassifierConfig(models=[{"path": models["a"], "threshold": 0.5, "thresholds": {"de": 0.0}}])
    stats = st.StageStats("classifier")
    kept = {d["doc_id"]: d for d in st.run_stage(ClassifierStage(config), docs, stats)}
    stats.check_accounting()

    model = load_model(str(models["a"] / "model.bin"), config.models[0].sha256)
    by_id = {d["doc_id"]: d for d in docs}
    for doc_id, doc in kept.items():  # annotated with the model's own probability of the label
        line = model_input(doc["text"], doc.get("lang") or "de", True, 10_000)
        assert doc["quality_score"] == pytest.approx(positive_scores(model, [line], "__label__quality")[0])
        assert doc["text"] == by_id[doc_id]["text"]
    assert all(f"g{i}" in kept for i in range(20))
    assert not any(f"b{i}" in kept for i in range(20))
    assert all(f"d{i}" in kept for i in range(10))  # the German threshold, not the default
    assert "nolang" in kept
    assert "lang" not in kept["nolang"]  # the detected language only picks the input and threshold
    assert stats.dropped == {"quality_low_score": 20, "empty_text": 1}
    assert stats.quarantined == {"text_missing": 1}
    assert stats.extra["quality_low_score_lang_en"] == 20
    assert stats.extra["kept_lang_de"] == 11 and stats.extra["kept_lang_en"] == 20
    rejects = [r for r in stats.rejects if r["rule"] == "quality_low_score"]
    assert len(rejects) == 20 and all(
        "lang=en" in r["detail"] and "< threshold 0.5" in r["detail"] for r in rejects
    )

    # A model whose high scores are dropped (e.g. toxicity): the other side goes.
    inverse = ClassifierConfig(
        models=[{"path": models["a"], "name": "toxicity", "drop": "above", "threshold": 0.5}]
    )
    stats = st.StageStats("classifier")
    kept = {d["doc_id"] for d in st.run_stage(ClassifierStage(inverse), docs[:40], stats)}
    assert kept == {f"b{i}" for i in range(20)} and stats.dropped == {"toxicity_high_score": 20}


def test_cache_key_follows_the_model_file(models, tmp_path):
    sources = pt.Sources(paths=["part-00000.parquet"], identities=[["shard-sha"]], refs=[])

    def key(config: ClassifierConfig) -> str:
        return pt.shard_works("classifier", config, sources, tmp_path / "out", "S")[0].key.value

    model_dir = tmp_path / "model"
    shutil.copytree(models["a"], model_dir)
    first = ClassifierConfig(models=[{"path": model_dir}])
    assert key(first) == key(ClassifierConfig(models=[{"path": model_dir}]))
    assert key(first) != key(ClassifierConfig(models=[{"path": model_dir, "threshold": 0.7}]))

    shutil.copyfile(models["b"] / "model.bin", model_dir / "model.bin")  # retrained in place
    second = ClassifierConfig(models=[{"path": model_dir}])
    assert second.models[0].sha256 != first.models[0].sha256
    assert key(second) != key(first)
    stale = ClassifierStage(ClassifierConfig.model_validate(first.model_dump(mode="json")))
    with pytest.raises(ValueError, match="sha256"):  # a worker never scores with other bytes
        list(
            stale.process([{"doc_id": "x", "text": "some words", "lang": "en"}], st.StageStats("classifier"))
        )


def test_registered_after_quality_and_off_by_default():
    from flows.data_refresh import DataRefreshParams

    names = list(registry.STAGES)
    assert names.index("classifier") == names.index("quality") + 1
    assert DataRefreshParams().classifier is None
    assert "classifier" in registry.file_stages()


@pytest.mark.slow
def test_data_refresh_with_the_classifier(prefect_harness, crawl, models, tmp_path):
    from flows.data_refresh import DataRefreshParams, data_refresh

    params = DataRefreshParams.model_validate(
        {
            "crawl": str(crawl),
            "snapshots": ["CC-MAIN-2026-40"],
            "kinds": ["warc"],
            "workdir": str(tmp_path / "work"),
            "max_files": 1,
            "ingest": {"max_records_per_file": 80},
            "build_training_data": False,
            # English must score 1.0 (never: dropped), every other language passes at 0.0.
            "classifier": {
                "models": [{"path": str(models["a"]), "threshold": 0.0, "thresholds": {"en": 1.0}}]
            },
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        }
    )
    result = data_refresh(params)
    snapshot = tmp_path / "work" / "CC-MAIN-2026-40"
    quality, classified, pii = (ds.verify(snapshot / s) for s in ("quality", "classifier", "pii"))
    assert classified.inputs[0].digest == ds.dataset_digest(snapshot / "quality")
    # The manifest's code version is the one in the stage's cache key (tests/test_registry.py: the rest).
    assert classified.code_version == registry.stage("classifier").code_version()
    assert pii.inputs[0].digest == ds.dataset_digest(snapshot / "classifier")
    stats = classified.stats
    assert stats["docs_in"] == quality.rows
    assert stats["kept"] == classified.rows and stats["kept"] > 0
    assert stats["dropped"]["quality_low_score"] == stats["extra"]["quality_low_score_lang_en"] > 0
    assert ds.read_manifest(snapshot / "classifier" / "rejects").rows == sum(stats["dropped"].values())
    kept = list(ds.iter_rows(snapshot / "classifier", columns=["lang", "quality_score"]))
    assert all(r["lang"] != "en" and 0.0 <= r["quality_score"] <= 1.0 for r in kept)
    assert any(row["stage"] == "classifier" for row in result["stats"])


@pytest.mark.slow
def test_training_flow_logs_model_digests_and_heldout_to_mlflow(prefect_harness, reference, models, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.train_classifier import TrainClassifierParams, train_classifier

    output = tmp_path / "quality"
    shutil.copytree(models["a"], output)  # the same data, config and code: reused, not trained again
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = TrainClassifierParams(
        positive=str(reference["positive"]),
        negative=str(reference["negative"]),
        output=str(output),
        train=TrainClassifierConfig(**SMALL),
        mlflow_tracking_uri=uri,
    )
    result = train_classifier(params)
    manifest = json.loads((output / "manifest.json").read_text())
    assert result["manifest"] == manifest
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.metrics["heldout/precision"] == manifest["heldout"]["precision"]
    assert run.data.metrics["heldout/recall"] == manifest["heldout"]["recall"]
    assert run.data.tags["classifier.model_sha256"] == manifest["model_sha256"]
    inputs = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert inputs == {side: ds.mlflow_digest(reference[side]) for side in ("positive", "negative")}
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/model.bin", "model/manifest.json"}
