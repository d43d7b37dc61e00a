from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flows.cli import main
from tasks import dataset as ds
from tasks import registry
from tasks import thresholds as th
from tasks.quality import LanguageRules, Measures, QualityConfig, QualityStage
from tasks.stage import cache_key, run_stage_on_dataset

LANGS = ("en", "de", "fr", "ja")
SCHEMA = ds.DOCUMENT_SCHEMA.append(pa.field("lang", pa.string())).append(
    pa.field("quality_score", pa.float64())
)
MIN_DOCS = 30
MIN_TAIL = 2  # 45 documents a language: tails of 2 (the default, 5, is for real datasets)


def lid_documents(corpus: Path, per_lang: int = 45) -> list[dict]:
    """Real passages of four languages (lid-dev), with a hand-made score column."""
    counts: Counter = Counter()
    docs = []
    with open(corpus / "lid-dev.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["lang"] in LANGS and counts[row["lang"]] < per_lang and len(row["text"]) >= 150:
                counts[row["lang"]] += 1
                docs.append(
                    {
                        "doc_id": row["id"],
                        "text": row["text"],
                        "url": f"http://{row['lang']}.example/{row['id']}",
                        "lang": row["lang"],
                        "quality_score": (len(row["text"]) % 997) / 997,
                    }
                )
    return docs


def write_docs(target: Path, docs: list[dict], shards: int = 2) -> Path:
    size = -(-len(docs) // shards)
    infos = [
        ds.write_table(ds.rows_to_table(docs[i : i + size], SCHEMA), target / f"part-{i // size:05d}.parquet")
        for i in range(0, len(docs), size)
    ]
    ds.write_manifest(target, ds.Manifest(stage="langid", schema=ds.schema_description(SCHEMA), shards=infos))
    return target


@pytest.fixture(scope="module")
def dataset(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_docs(tmp_path_factory.mktemp("langid"), lid_documents(corpus))


@pytest.fixture(scope="module")
def measured(dataset: Path) -> th.Measured:
    return th.measure([dataset], QualityConfig(), [th.ScoreRule("quality_score", 0.3)])


@pytest.fixture(scope="module")
def derived(dataset: Path, measured: th.Measured) -> th.Derived:
    scores = [th.ScoreRule("quality_score", 0.3)]
    return th.derive([dataset], QualityConfig(), "en", MIN_DOCS, scores, min_tail=MIN_TAIL, measured=measured)


def test_quantile_matching_on_a_hand_made_distribution():
    reference = np.arange(100.0)  # 0..99
    values = 2 * np.arange(100.0)  # 0, 2, ..., 198: the same shape, twice the scale
    # below 10 drops 10% of the reference; the 10% point of the language is 20
    assert th.match_quantile(reference, 10, "below", values) == 20
    assert th.drops(values, 20, "below") == 10
    # above 89 drops 10% (90..99); the language's top 10% lie above 178
    assert th.match_quantile(reference, 89, "above", values) == 178
    assert th.drops(values, 178, "above") == 10
    # a language of 50 values: k = round(0.1 * 50) = 5
    assert th.match_quantile(reference, 10, "below", np.arange(50.0) * 3) == 15
    # nothing to match: the reference threshold drops none or all, or too few for a tail
    assert th.match_quantile(reference, -1, "below", values) is None
    assert th.match_quantile(reference, 1000, "below", values) is None
    assert th.match_quantile(reference, 10, "below", values, min_tail=11) is None
    assert th.match_quantile(reference, 10, "below", np.arange(30.0), min_tail=4) is None  # k = 3
    assert th.match_quantile(reference, 10, "below", np.arange(30.0), min_tail=3) == 3
    # ties keep documents: never more than the share is dropped
    tied = np.array([0.0] * 30 + [1.0] * 70)
    value = th.match_quantile(reference, 10, "below", tied)
    assert th.drops(tied, value, "below") <= 10


def _isolated(config: QualityConfig, stat: th.Statistic, threshold: float) -> QualityConfig:
    """Only ``stat``'s threshold active (C4 kept for FineWeb's lines, as in the stage)."""
    group, param, n = stat.key.split(".")[0], stat.key.split(".")[1], stat.key.split(".")[2:]
    data = config.model_dump(mode="json", exclude={"thresholds_sha256"})
    data["blocklist"]["enabled"] = False
    # per-language overrides of thresholds would replace the probe's; keep those of measurements
    data["overrides"] = {
        lang: {k: v for k, v in params.items() if k == "short_line_length"}
        for lang, params in data["overrides"].items()
    }
    for name in ("gopher_quality", "gopher_repetition", "fineweb"):
        section = data[name]
        section["enabled"] = name == group
        for key, value in section.items():
            if key in ("top_n_grams", "dup_n_grams"):
                section[key] = []
            elif key not in ("enabled", "short_line_length", "line_punct_exclude_zero") and not isinstance(
                value, bool
            ):
                section[key] = None
    data["c4"]["enabled"] = group in ("c4", "fineweb")
    data["c4"]["min_num_sentences"] = None
    if n:
        data[group][param] = [{"n": int(n[0]), "max_char_frac": threshold}]
    else:
        data[group][param] = threshold
    return QualityConfig.model_validate(data)


def test_each_statistic_is_what_its_rule_compares(corpus: Path):
    """For every threshold: the documents its statistic puts beyond a threshold are exactly those
    its rule drops when it is the only rule (so derived thresholds mean what the stage does)."""
    docs = lid_documents(corpus, per_lang=12)
    config = QualityConfig()
    nontrivial = 0
    for stat in th.statistics(config):
        probe = _isolated(config, stat, 1)
        values = [
            stat.measure(th.Document(LanguageRules(probe, d["lang"]), Measures(d["text"]))) for d in docs
        ]
        present = sorted({v for v in values if v is not None})
        assert present, stat.key
        threshold = present[len(present) // 2]
        if isinstance(th.current_threshold(config, stat.key), int):
            threshold = int(threshold)
        rules = _isolated(config, stat, threshold)
        dropped = sum(
            1
            for d in docs
            if (r := LanguageRules(rules, d["lang"]).evaluate(d["text"], d["url"]).rejection)
            and r.rule in stat.rules
        )
        expected = th.drops(np.array([v for v in values if v is not None]), threshold, stat.drop)
        assert dropped == expected, stat.key
        nontrivial += expected > 0
    assert nontrivial >= 20  # most thresholds drop some of these documents at their median


def test_derived_thresholds_match_the_reference_share(derived: th.Derived, measured: th.Measured):
    content = derived.content
    assert content["reference"] == "en" and content["method"] == th.METHOD
    assert set(content["thresholds"]) <= {"de", "fr", "ja"} and content["thresholds"]
    assert "en" not in content["thresholds"]
    for row in derived.rows:
        # each derived threshold drops the reference's share of the language, to one document
        values = measured.array(row["lang"], row["threshold"])
        assert row["derived_drops"] == th.drops(values, row["derived"], row["drop"])
        assert row["derived_drops"] <= round(row["reference_share"] * len(values)) + 0.5
        assert (
            row["derived_drops"]
            >= round(row["reference_share"] * len(values)) - (values == row["derived"]).sum()
        )
    score = content["scores"]["quality_score"]
    assert score["drop"] == "below" and score["reference_threshold"] == 0.3
    assert set(score["thresholds"]) == {"de", "fr", "ja"}
    # integer thresholds stay integers; n-gram limits come as their group's whole list
    for params in content["thresholds"].values():
        if "gopher_quality.min_doc_words" in params:
            assert isinstance(params["gopher_quality.min_doc_words"], int)
        for key in ("gopher_repetition.top_n_grams", "gopher_repetition.dup_n_grams"):
            if key in params:
                assert [x["n"] for x in params[key]] == [
                    x.n for x in getattr(QualityConfig().gopher_repetition, key.split(".")[1])
                ]


def test_the_quality_config_reads_the_file_and_its_digest_enters_the_cache_key(
    derived: th.Derived, tmp_path: Path
):
    path = th.write_thresholds(derived, tmp_path / "thresholds.json")
    plain = QualityConfig()
    config = QualityConfig(thresholds_file=path)
    lang, params = next(iter(derived.content["thresholds"].items()))
    rules = config.for_language(lang)
    for key, value in params.items():
        group, param = key.split(".")
        got = getattr(getattr(rules, group), param)
        assert (got == value) if not isinstance(got, list) else [x.model_dump() for x in got] == value
    assert config.for_language("en") == config  # the reference keeps its thresholds
    # the stage's config as the registry rebuilds it from a cache key keeps the file and its digest
    dumped = config.model_dump(mode="json")
    assert dumped["thresholds_sha256"] == ds.sha256_file(path)
    rebuilt = registry.stage("quality").config(dumped)
    assert rebuilt.thresholds_sha256 == config.thresholds_sha256 and rebuilt.for_language(lang) == rules
    key = cache_key("quality", config, "code", "input")
    assert key != cache_key("quality", plain, "code", "input")
    # another content at the same path: another key
    content = json.loads(path.read_text())
    content["thresholds"][lang] = {"gopher_quality.min_doc_words": 7}
    path.write_text(json.dumps(content))
    assert cache_key("quality", QualityConfig(thresholds_file=path), "code", "input") != key
    # a missing or bad file is a one-line validation error
    with pytest.raises(ValueError, match="does not exist"):
        QualityConfig(thresholds_file=tmp_path / "missing.json")
    path.write_text(json.dumps({"thresholds": {"de": {"no_such_param": 1}}}))
    with pytest.raises(ValueError, match="names no rule parameter"):
        QualityConfig(thresholds_file=path)


def test_dry_run_counts_equal_the_stage_drops(dataset: Path, derived: th.Derived, tmp_path: Path):
    path = th.write_thresholds(derived, tmp_path / "thresholds.json")
    config = QualityConfig()
    run = th.dry_run([dataset], config, th.apply(config, derived.content))
    for name, stage_config, counts in (
        ("current", config, run.current),
        ("derived", QualityConfig(thresholds_file=path), run.derived),
    ):
        manifest = run_stage_on_dataset(QualityStage(stage_config), dataset, tmp_path / name)
        by_rule = sum(counts.values(), Counter())
        assert dict(by_rule) == manifest.stats["dropped"], name
        for lang, n in run.documents.items():
            kept = n - sum(counts.get(lang, Counter()).values())
            assert manifest.stats["extra"].get(f"quality_kept_{lang}", 0) == kept, (name, lang)
    assert sum(sum(c.values()) for c in run.derived.values()) != sum(
        sum(c.values()) for c in run.current.values()
    )
    report = th.report_markdown(derived, run)
    assert "| de |" in report and "gopher" in report


def test_cli_derive_writes_the_file_and_dry_run_writes_nothing(
    dataset: Path, derived: th.Derived, tmp_path: Path, capsys
):
    out = tmp_path / "derived.json"
    args = ["thresholds", "derive", "--dataset", str(dataset), "--min-docs", str(MIN_DOCS), "--out", str(out)]
    args += ["--reference", "en", "--score", "quality_score:0.3", "--min-tail", str(MIN_TAIL)]
    assert main([*args, "--dry-run"]) == 0
    assert not out.exists()
    assert "Whole rule chain" in capsys.readouterr().out
    assert main(args) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(derived.content))  # deterministic
    assert "Each threshold alone" in out.with_suffix(".report.md").read_text()
    assert main([*args, "--score", "toxicity_score:0.5:above"]) == 2
    assert "no column toxicity_score" in capsys.readouterr().err
