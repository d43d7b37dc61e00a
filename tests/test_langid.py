from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks import dataset as ds
from tasks.langid import (
    DEFAULT_MODEL_PATH,
    DEFAULT_MODEL_SHA256,
    MODEL_PATH_ENV,
    LangIdConfig,
    LangIdStage,
)
from tasks.stage import StageStats, run_stage, run_stage_on_dataset

ENGLISH = "The quick brown fox jumps over the lazy dog while the farmer is sleeping in the barn."
GERMAN = "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer in der Scheune schläft."
FRENCH = "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier dort."


@pytest.fixture(scope="module", autouse=True)
def model_present() -> None:
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(f"lid.176.ftz not found at {DEFAULT_MODEL_PATH}: run infra/setup.sh")


@pytest.fixture(scope="module")
def lid_dev(corpus: Path) -> list[dict]:
    with open(corpus / "lid-dev.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def docs_of(*texts: str) -> list[dict]:
    return [{"doc_id": f"d{i}", "text": text} for i, text in enumerate(texts)]


def run(config: LangIdConfig, docs: list[dict]) -> tuple[list[dict], StageStats]:
    stats = StageStats("langid")
    kept = list(run_stage(LangIdStage(config), docs, stats))
    stats.check_accounting()
    return kept, stats


def make_dataset(directory: Path, docs: list[dict], shards: int = 2) -> Path:
    """A dataset of ``docs`` (DOCUMENT_SCHEMA columns) split into ``shards`` Parquet shards."""
    infos = []
    for index in range(shards):
        rows = [{"url": None, **doc} for doc in docs[index::shards]]
        infos.append(
            ds.write_table(
                ds.rows_to_table(rows, ds.DOCUMENT_SCHEMA), directory / f"part-{index:05d}.parquet"
            )
        )
    ds.write_manifest(
        directory,
        ds.Manifest(stage="ingest", schema=ds.schema_description(ds.DOCUMENT_SCHEMA), shards=infos),
    )
    return directory


def test_default_config_pins_the_bundled_model_checksum(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    config = LangIdConfig()
    assert config.model_path == DEFAULT_MODEL_PATH
    assert config.model_sha256 == DEFAULT_MODEL_SHA256
    # Another model: no checksum unless one is given; an explicit empty one skips the check.
    assert LangIdConfig(model_path=tmp_path / "lid.176.bin").model_sha256 is None
    assert LangIdConfig(model_sha256="").model_sha256 is None
    monkeypatch.setenv(MODEL_PATH_ENV, str(tmp_path / "lid.176.bin"))
    assert LangIdConfig().model_path == tmp_path / "lid.176.bin"
    assert LangIdConfig().model_sha256 is None
    # The config survives its JSON round trip (the flow's parameters, the manifest).
    assert LangIdConfig.model_validate_json(config.model_dump_json()) == config


def test_checksum_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"sha256 {DEFAULT_MODEL_SHA256}.*expects {wrong}"):
        run(LangIdConfig(model_sha256=wrong), docs_of(ENGLISH))
    with pytest.raises(ValidationError, match="not a sha256"):
        LangIdConfig(model_sha256="abc")
    with pytest.raises(FileNotFoundError, match="model not found"):
        run(LangIdConfig(model_path=tmp_path / "missing.bin"), docs_of(ENGLISH))


def test_model_is_loaded_once_per_process_and_not_pickled() -> None:
    stage = LangIdStage()
    assert stage.model() is LangIdStage(LangIdConfig()).model()
    assert len(pickle.dumps(stage)) < 5000  # the config only, not the 900 KB model


def test_language_codes_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"not a lid\.176 language code"):
        LangIdConfig(keep_languages=["en-US"])
    # Well-formed but unknown to the model: "jp" would silently drop all Japanese.
    with pytest.raises(ValueError, match=r"\['jp'\] are not labels"):
        run(LangIdConfig(keep_languages=["en", "jp"]), docs_of(ENGLISH))
    assert LangIdConfig(keep_languages=["__label__EN", "de", "en"]).keep_languages == ["en", "de"]
    with pytest.raises(ValidationError, match="between 0 and 1"):
        LangIdConfig(min_score_by_language={"en": 1.5})


def test_keep_list_drops_other_languages_with_rule_and_detail() -> None:
    kept, stats = run(LangIdConfig(keep_languages=["en", "fr"]), docs_of(ENGLISH, GERMAN, FRENCH))
    assert [(d["doc_id"], d["lang"]) for d in kept] == [("d0", "en"), ("d2", "fr")]
    assert all(isinstance(d["lang_score"], float) and 0.65 <= d["lang_score"] <= 1.0 for d in kept)
    assert dict(stats.dropped) == {"lang_not_kept": 1}
    (reject,) = stats.rejects
    assert reject["doc_id"] == "d1" and reject["rule"] == "lang_not_kept"
    assert reject["detail"].startswith("lang=de score=0.")
    assert stats.extra == {"kept_lang_en": 1, "kept_lang_fr": 1}
    # An empty keep-list keeps every language.
    kept, _ = run(LangIdConfig(keep_languages=[]), docs_of(ENGLISH, GERMAN, FRENCH))
    assert [d["lang"] for d in kept] == ["en", "de", "fr"]


def test_per_language_threshold_replaces_min_score() -> None:
    (english,), _ = run(LangIdConfig(min_score=0.0), docs_of(ENGLISH))
    score = english["lang_score"]
    docs = docs_of(ENGLISH, GERMAN)

    strict_en = LangIdConfig(min_score=0.0, min_score_by_language={"en": min(score + 0.01, 1.0)})
    kept, stats = run(strict_en, docs)
    assert [d["lang"] for d in kept] == ["de"]  # German still meets the global 0.0
    assert dict(stats.dropped) == {"lang_low_score": 1}
    assert f"lang=en score={score:.3f} < min_score" in stats.rejects[0]["detail"]

    lenient_en = LangIdConfig(min_score=1.0, min_score_by_language={"en": score - 0.01})
    kept, stats = run(lenient_en, docs)
    assert [d["lang"] for d in kept] == ["en"]
    assert stats.rejects[0]["rule"] == "lang_low_score" and "lang=de" in stats.rejects[0]["detail"]


def test_newlines_and_other_whitespace_are_handled() -> None:
    one_line, _ = run(LangIdConfig(), docs_of(ENGLISH))
    broken = ENGLISH.replace(" the ", "\nthe\r\n").replace(" is ", "\tis\u2028\x0b\x0c")
    assert "\n" in broken
    kept, _ = run(LangIdConfig(), docs_of(broken))
    assert kept[0]["text"] == broken  # the text itself is not changed
    assert kept[0]["lang"] == "en"
    assert kept[0]["lang_score"] == pytest.approx(one_line[0]["lang_score"])


def test_empty_no_letter_and_broken_texts() -> None:
    docs = docs_of(
        "", "  \n\t ", "12 345,00 | 17.5 % -- 2024-01-01", "?! ++ ..", ENGLISH, "Text \ud800 broken", GERMAN
    )
    docs.append({"doc_id": "none", "text": None})
    kept, stats = run(LangIdConfig(), docs)
    assert [d["doc_id"] for d in kept] == ["d4", "d6"]
    assert dict(stats.dropped) == {"empty_text": 2, "no_letters": 2}
    assert dict(stats.quarantined) == {"text_invalid_unicode": 1, "text_missing": 1}
    bad = next(r for r in stats.rejects if r["rule"] == "text_invalid_unicode")
    assert bad["doc_id"] == "d5" and bad["text"].encode("utf-8")  # storable in the rejects shard


def test_prediction_starts_at_the_first_letter() -> None:
    # A long numeric table before the text must neither be judged as "no letters" nor eat the sample.
    table = "  ".join(f"{i:6d} {i * 3.5:10.2f}" for i in range(600))
    config = LangIdConfig(max_chars=200)
    assert len(table) > 10 * config.max_chars
    kept, stats = run(config, docs_of(table + "\n" + GERMAN))
    assert kept[0]["lang"] == "de", stats.rejects


def test_batch_prediction_equals_single_prediction(lid_dev: list[dict]) -> None:
    docs = [{"doc_id": r["id"], "text": r["text"]} for r in lid_dev[:400]]
    config = {"keep_languages": [], "min_score": 0.0, "min_score_by_language": {}}
    batched, _ = run(LangIdConfig(**config, batch_size=128), docs)
    single, _ = run(LangIdConfig(**config, batch_size=1), docs)
    assert len(batched) == len(docs)
    assert [(d["lang"], d["lang_score"]) for d in batched] == [(d["lang"], d["lang_score"]) for d in single]


def test_accuracy_on_lid_dev_passages_of_200_chars_or_more(lid_dev: list[dict]) -> None:
    labelled = [r for r in lid_dev if len(r["text"]) >= 200]
    assert len(labelled) > 2000
    docs = [{"doc_id": r["id"], "text": r["text"]} for r in labelled]
    kept, stats = run(LangIdConfig(keep_languages=[], min_score=0.0, min_score_by_language={}), docs)
    assert stats.kept == len(docs)
    truth = {r["id"]: r["lang"] for r in labelled}
    accuracy = sum(d["lang"] == truth[d["doc_id"]] for d in kept) / len(docs)
    assert accuracy >= 0.98, f"accuracy {accuracy:.4f} on {len(docs)} lid-dev passages of 200+ chars"


def test_run_stage_on_dataset_accounts_for_every_document(lid_dev: list[dict], tmp_path: Path) -> None:
    rows = [r for r in lid_dev[:200] if len(r["text"]) >= 200][:60]
    docs = [{"doc_id": r["id"], "text": r["text"]} for r in rows]
    docs += docs_of("", "0123 4567 89", "    ")
    source = make_dataset(tmp_path / "in", docs)
    config = LangIdConfig(keep_languages=["en", "de", "fr", "es", "ja", "zh"])

    manifest = run_stage_on_dataset(LangIdStage(config), source, tmp_path / "out")

    stats = manifest.stats
    assert stats["docs_in"] == len(docs)
    assert stats["kept"] + sum(stats["dropped"].values()) + sum(stats["quarantined"].values()) == len(docs)
    assert stats["dropped"]["empty_text"] == 2 and stats["dropped"]["no_letters"] == 1
    expected_kept = sum(r["lang"] in config.keep_languages for r in rows)
    assert abs(stats["kept"] - expected_kept) <= 1  # lid-dev accuracy is ~99.9%
    assert sum(v for k, v in stats["extra"].items() if k.startswith("kept_lang_")) == stats["kept"]
    assert manifest.config["keep_languages"] == config.keep_languages

    ds.verify(tmp_path / "out")
    table = pq.read_table(ds.shard_paths(tmp_path / "out"))
    assert table.num_rows == stats["kept"]
    assert str(table.schema.field("lang").type) == "string"
    assert str(table.schema.field("lang_score").type) == "double"
    assert set(table.column("lang").to_pylist()) <= set(config.keep_languages)
    rejects = pq.read_table(ds.shard_paths(tmp_path / "out" / "rejects"))
    assert rejects.num_rows == len(docs) - stats["kept"]
    assert set(rejects.column("rule").to_pylist()) >= {"empty_text", "no_letters", "lang_not_kept"}

    # Deterministic: a re-run writes the same bytes.
    again = run_stage_on_dataset(LangIdStage(config), source, tmp_path / "again")
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
