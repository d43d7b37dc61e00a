from __future__ import annotations

import json
from pathlib import Path

import pytest
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from warcio.archiveiterator import ArchiveIterator

from tasks import boilerplate, minhash
from tasks import dataset as ds
from tasks.boilerplate import BoilerplateConfig, boilerplate_datasets
from tests.conftest import snapshot_files
from tests.test_dedup import write_dataset

SNAPSHOTS = ("CC-MAIN-2026-40", "CC-MAIN-2026-44")
PAGES_PER_SNAPSHOT = 160


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def whole_pages(snapshot: str, limit: int) -> list[dict]:
    """The first ``limit`` HTML pages of a snapshot as whole-page text (navigation, footers, licence
    notices kept: the real templates the stage must find)."""
    docs = []
    for path in snapshot_files(snapshot):
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type != "response" or record.http_headers.get_statuscode() != "200":
                    continue
                if "html" not in (record.http_headers.get_header("Content-Type") or ""):
                    continue
                body = record.content_stream().read()
                text = extract_plain_text(bytes_to_str(body, detect_encoding(body)), main_content=False)
                docs.append(
                    {
                        "doc_id": f"{snapshot}/{len(docs)}",
                        "text": text.strip(),
                        "url": record.rec_headers.get_header("WARC-Target-URI"),
                        "snapshot": snapshot,
                    }
                )
                if len(docs) == limit:
                    return docs
    return docs


@pytest.fixture(scope="module")
def snapshot_datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pages")
    out = {}
    for snapshot in SNAPSHOTS:
        docs = whole_pages(snapshot, PAGES_PER_SNAPSHOT)
        half = len(docs) // 2
        out[snapshot] = write_dataset(root / snapshot, [docs[:half], docs[half:]])
    return out


def test_line_keys_ignore_case_spacing_and_punctuation():
    keys, words = minhash.line_keys(
        "© Copyright 2001-2026, Python.\n\n  COPYRIGHT 2001 2026 python  \n}\n東京 都"
    )
    assert keys[0] == keys[2] != 0 and words[0] == words[2] == 4
    assert (keys[1], words[1], keys[3], words[3]) == (0, 0, 0, 0)  # blank and punctuation-only lines
    assert words[4] == 3  # Han characters are tokens of their own
    assert minhash.line_keys("a b")[0][0] != minhash.line_keys("b a")[0][0]  # word order matters
    assert minhash.line_keys("Django 1.9.3")[0][0] != minhash.line_keys("Django 1.7.1")[0][0]


def test_incremental_refresh_equals_one_batch_in_counts_and_outputs(tmp_path, snapshot_datasets):
    old, new = (snapshot_datasets[s] for s in SNAPSHOTS)
    config = BoilerplateConfig(partitions=4)
    batch = boilerplate_datasets(
        [old, new], tmp_path / "batch", tmp_path / "index-batch", config, tmp_path / "w"
    )
    boilerplate_datasets([old], tmp_path / "inc-40", tmp_path / "index", config, tmp_path / "w")
    refresh = boilerplate_datasets([new], tmp_path / "inc-44", tmp_path / "index", config, tmp_path / "w")

    # outputs: batch shard i is the incremental run's shard (shards 0-1: 2026-40, 2-3: 2026-44)
    pairs = [("inc-40", 0, 0), ("inc-40", 1, 1), ("inc-44", 0, 2), ("inc-44", 1, 3)]
    for run, inc, whole in pairs:
        for sub in ("", "rejects/", "audit/"):
            name = f"{sub}part-{{:05d}}.parquet"
            assert (tmp_path / run / name.format(inc)).read_bytes() == (
                tmp_path / "batch" / name.format(whole)
            ).read_bytes(), (run, sub, inc)
    # counts: the index after two refreshes holds the same tables as after one batch run
    generations = json.loads((tmp_path / "index" / boilerplate.INDEX_FILE).read_text())["generations"]
    assert len(generations) == 2
    last = tree_bytes(tmp_path / "index" / "generations" / generations[-1]["name"])
    (only,) = json.loads((tmp_path / "index-batch" / boilerplate.INDEX_FILE).read_text())["generations"]
    assert last == tree_bytes(tmp_path / "index-batch" / "generations" / only["name"])

    # real templates were found and removed, per rule, in stats, audit and the per-host report
    extra = batch.stats["extra"]
    assert extra["boilerplate_lines_host_template"] > 100 and extra["boilerplate_docs_changed"] > 100
    report = batch.extra["boilerplate"]
    assert report["words_removed"] == sum(h["words_removed"] for h in report["hosts"]) > 1000
    audit = list(ds.iter_rows(tmp_path / "batch" / "audit"))
    assert (
        sum(r["lines"] for r in audit if r["rule"] == "host_template")
        == extra["boilerplate_lines_host_template"]
    )
    kept = {r["doc_id"]: r for r in ds.iter_rows(tmp_path / "batch")}
    changed = [r for r in audit if r["doc_id"] in kept]
    assert all(kept[r["doc_id"]]["boilerplate_lines"] >= r["lines"] for r in changed)
    assert all(r["example"] not in kept[r["doc_id"]]["text"].split("\n") for r in changed)
    assert (
        batch.stats["docs_in"] == 2 * PAGES_PER_SNAPSHOT == batch.rows + sum(batch.stats["dropped"].values())
    )
    assert refresh.extra["boilerplate"]["index_already_had_inputs"] is False

    # re-running inputs the index already holds: same bytes, index unchanged
    index_before = tree_bytes(tmp_path / "index")
    again = boilerplate_datasets([new], tmp_path / "again", tmp_path / "index", config, tmp_path / "w")
    assert again.extra["boilerplate"]["index_already_had_inputs"]
    assert tree_bytes(tmp_path / "index") == index_before
    rerun, first = tree_bytes(tmp_path / "again"), tree_bytes(tmp_path / "inc-44")
    assert rerun.pop("manifest.json") != first.pop("manifest.json")  # says the index had the inputs
    assert rerun == first


def test_a_reprocessed_snapshot_replaces_its_counts_instead_of_adding_them_again(tmp_path, snapshot_datasets):
    """An upstream stage changed one snapshot's documents: its counts replace its old generation (and
    the later ones, whose keys chain it), so no line is counted twice."""
    old, new = (snapshot_datasets[s] for s in SNAPSHOTS)
    config = BoilerplateConfig(partitions=4)
    rows = list(ds.iter_rows(old))
    changed = write_dataset(tmp_path / "changed", [rows[: len(rows) - 3]])  # three pages filtered out
    fresh = boilerplate_datasets(
        [changed], tmp_path / "a" / "s40", tmp_path / "fresh", config, tmp_path / "w"
    )

    index = tmp_path / "index"
    boilerplate_datasets([old], tmp_path / "s40", index, config, tmp_path / "w")
    boilerplate_datasets([new], tmp_path / "s44", index, config, tmp_path / "w")
    again = boilerplate_datasets([changed], tmp_path / "s40", index, config, tmp_path / "w")

    assert again.rows == fresh.rows and not again.extra["boilerplate"]["index_already_had_inputs"]
    assert list(ds.iter_rows(tmp_path / "s40")) == list(ds.iter_rows(tmp_path / "a" / "s40"))
    (generation,) = json.loads((index / boilerplate.INDEX_FILE).read_text())["generations"]
    (fresh_generation,) = json.loads((tmp_path / "fresh" / boilerplate.INDEX_FILE).read_text())["generations"]
    assert tree_bytes(index / "generations" / generation["name"]) == tree_bytes(
        tmp_path / "fresh" / "generations" / fresh_generation["name"]
    )
    assert [p.name for p in (index / "generations").iterdir()] == [generation["name"]]


def page(doc_id: str, host: str, *lines: str) -> dict:
    return {"doc_id": doc_id, "text": "\n".join(lines), "url": f"https://{host}/{doc_id}", "snapshot": "s1"}


def test_rules_thresholds_rejects_and_audit(tmp_path):
    nav = "Home | Docs | Blog"
    disclaimer = "The views expressed on this page are the author's own and not those of the employer"
    licence = "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance"
    nav_words, disclaimer_words = (int(minhash.line_keys(t)[1][0]) for t in (nav, disclaimer))
    assert (nav_words, disclaimer_words) == (3, 17)
    # host a: 21 pages, nav on all (template), disclaimer on 9 (repeated), "Note" on 8 (too short)
    docs = [
        page(f"a{i}", "a.example", nav, f"Article body {'x' * (i + 1)} and {'y' * (i + 1)}",
             *(["Note", disclaimer] if i < 8 else []))
        for i in range(20)
    ]  # fmt: skip
    docs += [page("a-empty", "a.example", nav, disclaimer, "", "...")]  # nothing but boilerplate
    # hosts b and c: too few pages for host rules; the licence on 6 documents of 2 hosts
    docs += [page(f"b{i}", "b.example", f"Unique body {'z' * (i + 1)}", licence) for i in range(3)]
    docs += [page(f"c{i}", "c.example", f"Another body {'w' * (i + 1)}", licence) for i in range(3)]
    docs += [page("b-short", "b.example", "Note")]
    dataset = write_dataset(tmp_path / "in", [docs[:10], docs[10:]])
    config = BoilerplateConfig(host_min_pages=10, host_min_docs=8, corpus_min_docs=6, corpus_min_hosts=2)
    manifest = boilerplate_datasets([dataset], tmp_path / "out", None, config, tmp_path / "w")

    out = {r["doc_id"]: r for r in ds.iter_rows(tmp_path / "out")}
    assert out["a0"]["text"] == "Article body x and y\nNote"
    assert (out["a0"]["boilerplate_lines"], out["a0"]["boilerplate_words"]) == (
        2,
        nav_words + disclaimer_words,
    )
    assert (out["a12"]["boilerplate_lines"], out["a12"]["text"]) == (
        1,
        "Article body " + "x" * 13 + " and " + "y" * 13,
    )
    assert out["b1"]["text"] == "Unique body zz"
    assert out["b-short"]["text"] == "Note" and out["b-short"]["boilerplate_lines"] == 0
    (reject,) = ds.iter_rows(tmp_path / "out" / "rejects")
    assert (reject["doc_id"], reject["rule"]) == ("a-empty", "boilerplate_only")
    assert reject["detail"] == "host_repeated: 1 lines, 17 words, host_template: 1 lines, 3 words"
    assert manifest.stats["dropped"] == {"boilerplate_only": 1}
    extra = manifest.stats["extra"]
    assert (extra["boilerplate_lines_host_template"], extra["boilerplate_lines_host_repeated"]) == (21, 9)
    assert extra["boilerplate_lines_corpus_repeated"] == 6 and extra["boilerplate_docs_changed"] == 26
    audit = list(ds.iter_rows(tmp_path / "out" / "audit"))
    assert {(r["doc_id"], r["rule"]) for r in audit if r["doc_id"] in ("a1", "a12", "c2")} == {
        ("a1", "host_repeated"),
        ("a1", "host_template"),
        ("a12", "host_template"),
        ("c2", "corpus_repeated"),
    }
    assert next(r for r in audit if r["rule"] == "corpus_repeated")["example"] == licence
    hosts = {h["host"]: h for h in manifest.extra["boilerplate"]["hosts"]}
    assert hosts["a.example"]["words_removed"] == 21 * nav_words + 9 * disclaimer_words
    assert hosts["a.example"]["docs_changed"] == 21 and hosts["b.example"]["docs_changed"] == 3
    assert [f["name"] for f in manifest.schema_[-2:]] == ["boilerplate_lines", "boilerplate_words"]

    # a higher threshold removes less: the licence on 6 documents is not corpus boilerplate at 7
    strict = config.model_copy(update={"corpus_min_docs": 7})
    again = boilerplate_datasets([dataset], tmp_path / "strict", None, strict, tmp_path / "w")
    assert "boilerplate_lines_corpus_repeated" not in again.stats["extra"]


def test_index_with_other_partitions_is_refused(tmp_path):
    dataset = write_dataset(tmp_path / "in", [[page("x", "x.example", "some text here")]])
    boilerplate_datasets([dataset], tmp_path / "o1", tmp_path / "index", BoilerplateConfig(), tmp_path / "w")
    with pytest.raises(ValueError, match="use a new index directory"):
        boilerplate_datasets(
            [dataset], tmp_path / "o2", tmp_path / "index", BoilerplateConfig(partitions=3), tmp_path / "w"
        )


def test_boilerplate_file_for_the_stage_command(tmp_path):
    footer = "Copyright the example project, all rights reserved, see the licence page"
    rows = [
        {"id": i, "text": f"Body {'q' * (i + 1)}\n{footer}", "url": f"https://e.example/{i}"}
        for i in range(4)
    ]
    rows.append({"text": footer, "url": "https://e.example/only-footer"})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = BoilerplateConfig(host_min_pages=2)
    report = boilerplate.boilerplate_file(source, tmp_path / "out.jsonl", config)
    out = list(ds.iter_file_rows(tmp_path / "out.jsonl"))
    assert [(r["doc_id"], r["text"], r["boilerplate_lines"]) for r in out] == [
        (str(i), f"Body {'q' * (i + 1)}", 1) for i in range(4)
    ]
    assert report["rejects"] == [
        {"doc_id": "in.jsonl:5", "rule": "boilerplate_only", "detail": "host_template: 1 lines, 11 words"}
    ]
    assert report["boilerplate"]["hosts"][0]["docs_changed"] == 5
