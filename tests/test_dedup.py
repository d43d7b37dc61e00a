from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasketch import MinHashLSH
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from warcio.archiveiterator import ArchiveIterator

from tasks import dataset as ds
from tasks import dedup, minhash
from tasks.dedup import DedupConfig, dedup_datasets, dedup_file
from tests.conftest import snapshot_files

# ---------------------------------------------------------------------------------------------
# Helpers


def write_dataset(target: Path, shards: list[list[dict]]) -> Path:
    infos = [
        ds.write_table(ds.rows_to_table(rows, ds.DOCUMENT_SCHEMA), target / f"part-{i:05d}.parquet")
        for i, rows in enumerate(shards)
    ]
    ds.write_manifest(
        target,
        ds.Manifest(stage="test-input", schema=ds.schema_description(ds.DOCUMENT_SCHEMA), shards=infos),
    )
    return target


def doc(doc_id: str, text: str, date: str | None = None, snapshot: str | None = None) -> dict:
    return {
        "doc_id": doc_id,
        "text": text,
        "date": date,
        "snapshot": snapshot,
        "url": f"http://x.example/{doc_id}",
    }


def kept_ids(output: Path) -> list[str]:
    return [r["doc_id"] for r in ds.iter_rows(output, ["doc_id"])]


def rejects(output: Path) -> dict[str, dict]:
    return {r["doc_id"]: r for r in ds.iter_rows(output / "rejects")}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def neardup(corpus: Path) -> tuple[dict[str, str], dict]:
    with open(corpus / "neardup-dev.jsonl", encoding="utf-8") as f:
        texts = {d["id"]: d["text"] for d in map(json.loads, f)}
    meta = json.loads((corpus / "neardup-dev.meta.json").read_text(encoding="utf-8"))
    return texts, meta


def cluster_with(meta: dict, variants: set[str], lang: str | None = None) -> dict[str, str]:
    """A labelled cluster having all the given variant types: variant type -> doc id."""
    clusters: dict[str, dict[str, str]] = {}
    for doc_id, info in sorted(meta["documents"].items()):
        if lang is None or info["lang"] == lang:
            clusters.setdefault(info["cluster"], {}).setdefault(info["variant"], doc_id)
    return next(c for _, c in sorted(clusters.items()) if variants <= set(c))


# ---------------------------------------------------------------------------------------------
# Signatures


def test_signatures_equal_datasketch_minhash(neardup):
    texts, meta = neardup
    hasher = minhash.MinHasher(num_perm=64, seed=7)
    chosen = [i for i in sorted(texts) if meta["documents"][i]["lang"] in ("ja", "zh", "ru", "tr", "en")][
        ::40
    ]
    samples = [texts[i][:600] for i in chosen] + ["İSTANBUL ılık", "one", "", "日本語のテキスト"]
    for text in samples:
        folded = minhash.fold_text(text)
        tokens = minhash.tokenize(folded)
        # the vectorized tokenizer finds exactly the regex's tokens
        assert [int(h) for h in minhash.token_hashes(folded)] == [minhash._token_hash(t) for t in tokens]
        for n in (1, 2, 5):
            ours = hasher.signature(minhash.shingle_hashes(folded, n))
            reference = hasher.reference_minhash(minhash.shingles_as_bytes(tokens, n)).hashvalues
            assert ours.dtype == reference.dtype == np.uint32
            assert np.array_equal(ours, reference), text[:40]
    # the batch path (what the stage runs) gives each document the same shingles and signature
    folded = [minhash.fold_text(t) for t in samples]
    offsets, hashes = minhash.batch_shingle_hashes(folded, 2)
    signatures = hasher.signatures(offsets, hashes, chunk_rows=500)
    for i, text in enumerate(folded):
        assert np.array_equal(hashes[offsets[i] : offsets[i + 1]], minhash.shingle_hashes(text, 2))
        reference = hasher.reference_minhash(minhash.shingles_as_bytes(minhash.tokenize(text), 2))
        assert np.array_equal(signatures[i], reference.hashvalues)


def test_cjk_text_is_shingled_per_character():
    tokens = minhash.tokenize(minhash.fold_text("東京は日本の首都です。ＡＢＣ def"))
    assert tokens[:4] == ["東", "京", "は", "日"]
    assert tokens[-2:] == ["abc", "def"]  # full-width letters folded by NFKC


def test_lsh_params_match_datasketch():
    for threshold in (0.5, 0.8):
        lsh = MinHashLSH(threshold=threshold, num_perm=128)
        assert minhash.lsh_params(threshold, 128) == (lsh.b, lsh.r)


# ---------------------------------------------------------------------------------------------
# Batch dedup


def test_exact_and_near_duplicates_across_shards_with_rule_survivors(tmp_path, neardup):
    texts, meta = neardup
    c = cluster_with(meta, {"seed", "exact", "edit_1_5", "boilerplate"})
    negative = meta["hard_negative_pairs"][0]
    shards = [
        [doc("copy", texts[c["exact"]], "2026-01-02"), doc("neg-a", texts[negative["a"]], "2026-01-01")],
        [
            doc("edited", texts[c["edit_1_5"]], "2026-01-01"),
            doc("padded", texts[c["boilerplate"]], "2026-01-05"),
        ],
        [doc("seed", texts[c["seed"]], "2026-01-03"), doc("neg-b", texts[negative["b"]], "2026-01-01")],
        # same text and date twice: the smaller doc_id survives
        [doc("tie-b", "A small distinct note about tie breaking " * 20, "2026-01-01")],
        [doc("tie-a", "A small distinct note about tie breaking " * 20, "2026-01-01")],
    ]
    manifest = dedup_datasets(
        [write_dataset(tmp_path / "in", shards)], tmp_path / "out", None, DedupConfig(), tmp_path
    )

    assert kept_ids(tmp_path / "out") == ["neg-a", "edited", "neg-b", "tie-a"]
    dropped = rejects(tmp_path / "out")
    # the exact group {copy, seed} is represented by copy (older); copy is a near duplicate of the
    # oldest member "edited", so both follow it
    assert dropped["copy"]["rule"] == "near_duplicate"
    assert dropped["seed"]["rule"] == "exact_duplicate"
    assert dropped["padded"]["rule"] == "near_duplicate"
    assert {dropped[i]["duplicate_of"] for i in ("copy", "seed", "padded")} == {"edited"}
    assert dropped["tie-b"]["duplicate_of"] == "tie-a"
    assert "jaccard=" in dropped["padded"]["detail"]
    assert [s.rows for s in manifest.shards] == [1, 1, 1, 0, 1]  # one output shard per input shard
    report = manifest.extra["dedup"]
    assert (report["removed_exact"], report["removed_near"]) == (2, 2)
    assert report["clusters"] == 2 and report["cluster_size_histogram"] == {"2": 1, "4": 1}
    assert report["example_pairs"] and all(p["jaccard"] > 0 for p in report["example_pairs"])
    assert manifest.stats["dropped"] == {"exact_duplicate": 2, "near_duplicate": 2}


def test_survivors_do_not_depend_on_shard_order_and_reruns_are_identical(tmp_path, neardup):
    texts, meta = neardup
    ids = sorted(texts)[:300]
    rows = [doc(i, texts[i], f"2026-01-{1 + k % 5:02d}") for k, i in enumerate(ids)]
    forward = write_dataset(tmp_path / "fwd", [rows[:100], rows[100:200], rows[200:]])
    backward = write_dataset(tmp_path / "bwd", [rows[200:], rows[100:200], rows[:100]])
    config = DedupConfig()
    dedup_datasets([forward], tmp_path / "out1", None, config, tmp_path / "w1")
    dedup_datasets([forward], tmp_path / "out2", None, config, tmp_path / "w2")
    dedup_datasets([backward], tmp_path / "out3", None, config, tmp_path / "w3")
    assert tree_bytes(tmp_path / "out1") == tree_bytes(tmp_path / "out2")
    assert sorted(kept_ids(tmp_path / "out1")) == sorted(kept_ids(tmp_path / "out3"))
    assert len(kept_ids(tmp_path / "out1")) < 300
    truth = {i: meta["documents"][i]["cluster"] for i in ids}
    for reject in rejects(tmp_path / "out1").values():  # every drop points to a labelled duplicate
        assert truth[reject["doc_id"]] == truth[reject["duplicate_of"]]


def test_annotate_keeps_every_document_and_names_the_survivor(tmp_path, neardup):
    texts, meta = neardup
    c = cluster_with(meta, {"seed", "reorder", "whitespace_case"})
    rows = [
        doc("seed", texts[c["seed"]], "2026-01-02"),
        doc("reordered", texts[c["reorder"]], "2026-01-01"),
        doc("recased", texts[c["whitespace_case"]], "2026-01-03"),
        doc("other", texts[meta["hard_negative_pairs"][1]["a"]], "2026-01-01"),
    ]
    config = DedupConfig(annotate=True)
    manifest = dedup_datasets(
        [write_dataset(tmp_path / "in", [rows])], tmp_path / "out", None, config, tmp_path
    )
    out = {r["doc_id"]: r["dup_cluster"] for r in ds.iter_rows(tmp_path / "out")}
    assert out == {"seed": "reordered", "reordered": "reordered", "recased": "reordered", "other": "other"}
    assert manifest.stats["kept"] == 4 and not manifest.stats["dropped"]
    assert manifest.schema_[-1] == {"name": "dup_cluster", "type": "string"}
    assert manifest.extra["dedup"]["clusters"] == 1


def test_input_without_text_column_is_a_clear_error(tmp_path):
    table = ds.rows_to_table([{"doc_id": "a", "body": "x"}], ds.DOCUMENT_SCHEMA.remove(1))
    shard = ds.write_table(table, tmp_path / "in" / "part-00000.parquet")
    ds.write_manifest(tmp_path / "in", ds.Manifest(stage="test-input", shards=[shard]))
    with pytest.raises(ValueError, match="no 'text' column"):
        dedup_datasets([tmp_path / "in"], tmp_path / "out", None, DedupConfig(), tmp_path)
    assert not ds.manifest_path(tmp_path / "out").exists()


def test_memory_budget_bounds_the_largest_structure(tmp_path, neardup):
    texts, _ = neardup
    ids = sorted(texts)[:800]
    dataset = write_dataset(
        tmp_path / "in", [[doc(i, texts[i]) for i in ids[:400]], [doc(i, texts[i]) for i in ids[400:]]]
    )
    budget = 8 << 10
    small = DedupConfig(memory_budget_bytes=budget)
    bands, _ = small.lsh_bands()
    assert len(ids) * bands * dedup._ROW_BYTES > 20 * budget  # the band data is far larger than the cap
    tight = dedup_datasets([dataset], tmp_path / "tight", None, small, tmp_path / "w1").extra["dedup"]
    roomy = dedup_datasets([dataset], tmp_path / "roomy", None, DedupConfig(), tmp_path / "w2").extra["dedup"]
    assert roomy["partitions_per_band"] == 1 and tight["partitions_per_band"] >= 4
    assert 0 < tight["peak_partition_bytes"] <= budget < roomy["peak_partition_bytes"]
    assert tight["estimated_memory_bytes"] <= budget
    # same decisions whatever the partitioning
    for name in ("part-00000.parquet", "part-00001.parquet"):
        assert (tmp_path / "tight" / name).read_bytes() == (tmp_path / "roomy" / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Crash safety and the index


def _three_shards(tmp_path: Path, texts: dict[str, str]) -> Path:
    ids = sorted(texts)[:240]
    rows = [doc(i, texts[i], "2026-01-01") for i in ids]
    return write_dataset(tmp_path / "in", [rows[:80], rows[80:160], rows[160:]])


def test_crash_while_writing_outputs_then_rerun_gives_identical_bytes(tmp_path, neardup, monkeypatch):
    dataset = _three_shards(tmp_path, neardup[0])
    config = DedupConfig()
    # The index names each segment's slot (<snapshot>/dedup): both runs write the same slot.
    clean, out = tmp_path / "clean" / "snap" / "dedup", tmp_path / "snap" / "dedup"
    dedup_datasets([dataset], clean, tmp_path / "index-clean", config, tmp_path / "w0")

    calls = {"n": 0}
    real = dedup.write_rejects

    def crash_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(dedup, "write_rejects", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        dedup_datasets([dataset], out, tmp_path / "index", config, tmp_path / "w1")
    assert (out / "part-00001.parquet").exists()  # part of the output was written
    assert not ds.manifest_path(out).exists()
    assert not (tmp_path / "index" / dedup.INDEX_FILE).exists()  # index untouched
    monkeypatch.setattr(dedup, "write_rejects", real)

    dedup_datasets([dataset], out, tmp_path / "index", config, tmp_path / "w1")
    assert tree_bytes(out) == tree_bytes(clean)
    assert tree_bytes(tmp_path / "index") == tree_bytes(tmp_path / "index-clean")


def test_crash_before_index_commit_and_reruns_against_a_full_index(tmp_path, neardup, monkeypatch):
    dataset = _three_shards(tmp_path, neardup[0])
    config = DedupConfig()
    clean = dedup_datasets([dataset], tmp_path / "clean", None, config, tmp_path / "w0")

    def killed(*args, **kwargs):
        raise RuntimeError("killed before index.json")

    monkeypatch.setattr(dedup, "_write_index", killed)
    with pytest.raises(RuntimeError):
        dedup_datasets([dataset], tmp_path / "out", tmp_path / "index", config, tmp_path / "w1")
    assert (
        ds.manifest_path(tmp_path / "out").exists() and not (tmp_path / "index" / dedup.INDEX_FILE).exists()
    )
    monkeypatch.undo()

    first = dedup_datasets([dataset], tmp_path / "out", tmp_path / "index", config, tmp_path / "w1")
    index_after_first = tree_bytes(tmp_path / "index")
    assert len(json.loads((tmp_path / "index" / dedup.INDEX_FILE).read_text())["segments"]) == 1
    # The same input again, against an index that already holds it: same result, index unchanged.
    again = dedup_datasets([dataset], tmp_path / "again", tmp_path / "index", config, tmp_path / "w2")
    assert again.extra["dedup"]["index_already_had_inputs"]
    assert tree_bytes(tmp_path / "index") == index_after_first
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in clean.shards]


def test_a_new_version_of_indexed_inputs_replaces_its_old_version_instead_of_meeting_it(tmp_path, neardup):
    """An upstream stage changed (one page edited): the snapshot's new version replaces its segment
    and every later one; none of its documents is a duplicate of its own old copy."""
    texts = neardup[0]
    ids = sorted(texts)[:160]
    old = write_dataset(tmp_path / "old", [[doc(i, texts[i], "2026-01-01") for i in ids[:120]]])
    later = write_dataset(tmp_path / "later", [[doc(i, texts[i], "2026-02-01") for i in ids[120:]]])
    edited = {**{i: texts[i] for i in ids[:120]}, ids[0]: texts[ids[0]] + " An edited last sentence."}
    new = write_dataset(tmp_path / "new", [[doc(i, edited[i], "2026-01-01") for i in ids[:120]]])
    index, config = tmp_path / "index", DedupConfig()
    alone = dedup_datasets([new], tmp_path / "alone" / "dedup", None, config, tmp_path / "w")

    dedup_datasets([old], tmp_path / "snap-1" / "dedup", index, config, tmp_path / "w")
    dedup_datasets([later], tmp_path / "snap-2" / "dedup", index, config, tmp_path / "w")
    again = dedup_datasets([new], tmp_path / "snap-1" / "dedup", index, config, tmp_path / "w")

    assert again.extra["dedup"]["index_replaced_earlier_version"]
    assert kept_ids(tmp_path / "snap-1" / "dedup") == kept_ids(tmp_path / "alone" / "dedup")
    assert again.rows == alone.rows > 100
    segments = json.loads((index / dedup.INDEX_FILE).read_text())["segments"]
    assert [s["slot"] for s in segments] == ["snap-1/dedup"]  # snap-2 redoes after it (its key chains)
    assert sorted(p.name for p in (index / "segments").iterdir()) == [segments[0]["name"]]


def test_index_built_with_other_parameters_is_refused(tmp_path, neardup):
    dataset = _three_shards(tmp_path, neardup[0])
    dedup_datasets([dataset], tmp_path / "out", tmp_path / "index", DedupConfig(), tmp_path)
    with pytest.raises(ValueError, match="use a new index directory"):
        dedup_datasets(
            [dataset], tmp_path / "out2", tmp_path / "index", DedupConfig(shingle_size=3), tmp_path
        )


# ---------------------------------------------------------------------------------------------
# Incremental == batch on the two crawl snapshots (slice)

SNAPSHOTS = ("CC-MAIN-2026-40", "CC-MAIN-2026-44")
PAGES_PER_SNAPSHOT = 400
RECRAWLED = 200


def crawl_documents(crawl: Path, snapshot: str, extra_urls: set[str]) -> list[dict]:
    """HTML pages of a snapshot: the first PAGES_PER_SNAPSHOT plus those in ``extra_urls``."""
    docs = []
    for path in snapshot_files(snapshot):
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                if record.rec_type != "response" or record.http_headers.get_statuscode() != "200":
                    continue
                if "html" not in (record.http_headers.get_header("Content-Type") or ""):
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                if len(docs) >= PAGES_PER_SNAPSHOT and url not in extra_urls:
                    continue
                body = record.content_stream().read()  # warcio undoes chunked and gzip encodings
                text = extract_plain_text(bytes_to_str(body, detect_encoding(body)), main_content=True)
                record_id = record.rec_headers.get_header("WARC-Record-ID")
                docs.append(
                    {
                        "doc_id": record_id.strip("<>").removeprefix("urn:uuid:"),
                        "text": text,
                        "url": url,
                        "warc_record_id": record_id,
                        "date": record.rec_headers.get_header("WARC-Date"),
                        "source_file": str(path.relative_to(crawl)),
                        "snapshot": snapshot,
                        "content_type": "text/html",
                    }
                )
    return docs


@pytest.fixture(scope="session")
def snapshot_datasets(crawl: Path, tmp_path_factory) -> dict[str, Path]:
    recrawl = json.loads((crawl / "recrawl-CC-MAIN-2026-44.json").read_text(encoding="utf-8"))
    urls = {p["url"] for p in recrawl["pages"][:RECRAWLED]}
    root = tmp_path_factory.mktemp("snapshots")
    out = {}
    for snapshot in SNAPSHOTS:
        docs = crawl_documents(crawl, snapshot, urls)
        half = len(docs) // 2
        out[snapshot] = write_dataset(root / snapshot, [docs[:half], docs[half:]])
    return out


@pytest.mark.slow
def test_incremental_refresh_keeps_the_same_documents_as_one_batch(tmp_path, snapshot_datasets):
    old, new = (snapshot_datasets[s] for s in SNAPSHOTS)
    config = DedupConfig()
    batch = dedup_datasets([old, new], tmp_path / "batch", None, config, tmp_path / "w")
    dedup_datasets([old], tmp_path / "inc-40", tmp_path / "index", config, tmp_path / "w")
    refresh = dedup_datasets([new], tmp_path / "inc-44", tmp_path / "index", config, tmp_path / "w")

    incremental = set(kept_ids(tmp_path / "inc-40")) | set(kept_ids(tmp_path / "inc-44"))
    assert set(kept_ids(tmp_path / "batch")) == incremental
    assert batch.rows == len(incremental)
    # real cross-snapshot duplicates were removed, pointing at documents of the first snapshot
    old_ids = {r["doc_id"] for r in ds.iter_rows(old, ["doc_id"])}
    cross = [r for r in rejects(tmp_path / "inc-44").values() if r["duplicate_of"] in old_ids]
    assert len(cross) > 50
    assert {r["rule"] for r in cross} == {"exact_duplicate", "near_duplicate"}
    assert refresh.extra["dedup"]["indexed_documents"] == sum(1 for _ in ds.iter_rows(old, ["doc_id"]))
    # an earlier-kept document is never removed by the refresh
    assert set(kept_ids(tmp_path / "inc-40")) <= set(kept_ids(tmp_path / "batch"))


# ---------------------------------------------------------------------------------------------
# Single-file CLI entry


def test_dedup_file_jsonl_and_parquet(tmp_path, neardup):
    texts, meta = neardup
    c = cluster_with(meta, {"seed", "edit_5_10"})
    rows = [
        {"id": 1, "text": texts[c["seed"]]},
        {"id": 2, "text": texts[c["edit_5_10"]]},
        {"text": "lonely " * 40},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    report = dedup_file(source, tmp_path / "out.jsonl")
    out = list(ds.iter_file_rows(tmp_path / "out.jsonl"))
    longer = "1" if len(texts[c["seed"]]) >= len(texts[c["edit_5_10"]]) else "2"
    assert [r["doc_id"] for r in out] == sorted([longer, "in.jsonl:3"])
    assert report["removed_near"] == 1 and report["rejects"][0]["duplicate_of"] == longer

    dedup_file(source, tmp_path / "out.parquet", annotate=True)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table["dup_cluster"].to_pylist() == [longer, longer, "in.jsonl:3"]


def test_random_shingle_sets_similarity_matches_python_sets():
    rng = random.Random(3)
    for _ in range(50):
        a = np.unique(np.array(rng.sample(range(1000), 80), dtype=np.uint32))
        b = np.unique(np.array(rng.sample(range(1000), 60), dtype=np.uint32))
        jaccard, containment = dedup._similarity(a, b)
        common = len(set(a.tolist()) & set(b.tolist()))
        assert jaccard == pytest.approx(common / len(set(a.tolist()) | set(b.tolist())))
        assert containment == pytest.approx(common / 60)


# ---------------------------------------------------------------------------------------------
# Pages sharing boilerplate (benchmarks/build_boilerplate_cases.py builds the full labelled set)


def template_pages(crawl: Path) -> tuple[list[dict], str]:
    """Django pages of one 2026-44 WARC (whole page and main text) up to the crawl's PostgreSQL
    legal notice, and that notice's text (a real licence block)."""
    path = snapshot_files("CC-MAIN-2026-44")[2]
    pages = []
    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response" or record.http_headers.get_statuscode() != "200":
                continue
            url = record.rec_headers.get_header("WARC-Target-URI")
            if "legalnotice" not in url and "djangoproject" not in url:
                continue
            body = record.content_stream().read()
            html = bytes_to_str(body, detect_encoding(body))
            main = extract_plain_text(html, main_content=True).strip()
            if "legalnotice" in url:
                return pages, main
            whole = extract_plain_text(html, main_content=False).strip()
            pages.append({"url": url, "whole": whole, "main": main})
    raise AssertionError(f"no legal notice in {path}")


def test_pages_sharing_boilerplate_stay_apart_and_templated_copies_merge(tmp_path, crawl):
    from benchmarks.build_boilerplate_cases import excerpt, template
    from tasks.boilerplate import BoilerplateConfig, boilerplate_datasets

    pages, licence = template_pages(crawl)
    rows, seeds = [], {}
    for i, page in enumerate(pages[:24]):
        url = page["url"]
        if i % 2:  # a short page followed by the licence: 12 distinct pages
            rows.append(
                {"doc_id": f"licence-{i}", "text": excerpt(page["main"], 40) + "\n" + licence, "url": url}
            )
        else:  # a page, and the same page with the site's header and footer
            header, footer = template(page["whole"], page["main"])
            rows.append({"doc_id": f"page-{i}", "text": page["main"], "url": url})
            rows.append(
                {"doc_id": f"templated-{i}", "text": f"{header}\n{page['main']}\n{footer}", "url": url}
            )
            seeds[f"templated-{i}"] = f"page-{i}"
    dataset = write_dataset(tmp_path / "in", [rows])
    annotate = DedupConfig(annotate=True)

    def clusters(source: Path, out: str) -> dict[str, str]:
        dedup_datasets([source], tmp_path / out, None, annotate, tmp_path / "w")
        return {r["doc_id"]: r["dup_cluster"] for r in ds.iter_rows(tmp_path / out)}

    # dedup alone: the licence makes distinct pages near duplicates (the failure being fixed)
    alone = clusters(dataset, "alone")
    licence_ids = [r["doc_id"] for r in rows if r["doc_id"].startswith("licence")]
    assert len({alone[i] for i in licence_ids}) < len(licence_ids)

    # boilerplate removal first (thresholds for a set of 36 documents of one host), then dedup
    config = BoilerplateConfig(host_min_fraction=0.2, host_min_docs=8)
    cleaned = boilerplate_datasets([dataset], tmp_path / "clean", None, config, tmp_path / "w")
    removed = {k: v for k, v in cleaned.stats["extra"].items() if k.startswith("boilerplate_lines_")}
    assert sum(removed.values()) >= 12 * licence.count("\n")  # at least the licence's lines
    after = clusters(tmp_path / "clean", "after")
    assert len({after[i] for i in licence_ids}) == len(licence_ids)
    assert all(after[i] == i for i in licence_ids)  # merged with nothing
    assert all(after[copy] == after[seed] for copy, seed in seeds.items())
    assert len(set(after.values())) == len(licence_ids) + len(seeds)
