from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks import audit
from tasks import dataset as ds
from tasks.quality import QualityConfig, QualityStage
from tasks.stage import run_stage_on_dataset
from tests.test_thresholds import lid_documents, write_docs

# Stricter than the defaults, so that clean lid-dev passages are dropped by several rules.
STRICT = {"gopher_quality": {"min_doc_words": 120}, "fineweb": {"line_punct_thr": 0.5}}


def filtered(docs: list[dict], target: Path, shards: int) -> Path:
    write_docs(target / "in", docs, shards)
    run_stage_on_dataset(QualityStage(QualityConfig.model_validate(STRICT)), target / "in", target / "out")
    return target / "out"


@pytest.fixture(scope="module")
def docs(corpus: Path) -> list[dict]:
    return lid_documents(corpus, per_lang=40)


@pytest.fixture(scope="module")
def quality(docs: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return filtered(docs, tmp_path_factory.mktemp("a"), shards=2)


def sampled_ids(result: audit.Audit) -> dict:
    cells = {("kept", lang): s for lang, s in result.kept.items()}
    cells.update({("dropped", *cell): s for cell, s in result.dropped.items()})
    return {cell: [r["doc_id"] for r in s.rows()] for cell, s in cells.items()}


def test_every_rule_and_language_with_drops_is_sampled(quality: Path):
    config = audit.AuditConfig(dropped_per_rule=2, kept_per_language=2, max_chars=200)
    result = audit.audit_dataset(quality, config)
    rejects = list(ds.iter_rows(quality / "rejects", columns=["rule", "detail", "doc_id"]))
    expected = {(re.match(r"lang=(\S+)", r["detail"]).group(1), r["rule"]) for r in rejects}
    assert len(expected) >= 6 and set(result.dropped) == expected
    for (lang, rule), sample in result.dropped.items():
        assert sample.total == sum(
            1 for r in rejects if (r["rule"], r["detail"].split()[0]) == (rule, f"lang={lang}")
        )
        assert len(sample.rows()) == min(2, sample.total)
    assert set(result.kept) == {"en", "de", "fr", "ja"}
    assert sum(s.total for s in result.kept.values()) == ds.read_manifest(quality).rows
    markdown = audit.audit_markdown(result, "snap/quality")
    for lang, rule in expected:
        section = markdown.split(f"\n## {lang}\n", 1)[1].split("\n## ", 1)[0]
        kept = result.kept[lang].total
        assert f"### dropped by {rule} ({min(2, result.dropped[lang, rule].total)} of " in section
        assert f"### kept ({min(2, kept)} of {kept})" in section
    # texts are cut readably and say how much was left out
    assert re.search(r"\[… \d+ more characters\]", markdown)
    assert max(len(block) for block in re.findall(r"```text\n(.*?)\n```", markdown, re.S)) < 260


def test_samples_are_deterministic_for_a_dataset(docs: list[dict], quality: Path, tmp_path: Path):
    config = audit.AuditConfig()
    first = sampled_ids(audit.audit_dataset(quality, config))
    assert sampled_ids(audit.audit_dataset(quality, config)) == first
    # the same documents in other shards, in another order: the same samples
    reshuffled = filtered(list(reversed(docs)), tmp_path, shards=3)
    assert sampled_ids(audit.audit_dataset(reshuffled, config)) == first
    assert sampled_ids(audit.audit_dataset(quality, config.model_copy(update={"seed": 1}))) != first


def test_excerpt_and_fences():
    text = "first line\n" + "word " * 100
    cut = audit.excerpt(text, 100)
    assert cut.startswith("first line\n") and cut.endswith("more characters]") and len(cut) < 140
    assert audit.excerpt("short", 100) == "short"
    block = audit._block("a ``` b ```` c")
    assert block[0] == "`````text" and block[-1] == "`````"
