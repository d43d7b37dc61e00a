"""Tokenizing and packing: determinism, exact document accounting, split hygiene, mixture, lineage."""

from __future__ import annotations

import collections
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from model import data as packed
from tasks import dataset as ds
from tasks import pack
from tasks import tokenizer as tk
from tasks.dedup import DedupConfig, dedup_datasets
from tests.test_tokenizer import SMALL, build_lid_dataset

CONFIG = pack.PackConfig(seq_len=64, tokens_per_shard=65 * 500, validation_fraction=0.05)
DOCS = 1000  # first rows of lid-dev: every language, ~1.7 MB of text


@pytest.fixture(scope="module")
def pack_input(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lid_dataset(corpus, tmp_path_factory.mktemp("pack-input"), limit=DOCS, shards=3)


@pytest.fixture(scope="module")
def tok_dir(pack_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tk.train_tokenizer([pack_input], out, SMALL)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return tk.load_tokenizer(tk.tokenizer_path(tok_dir))


@pytest.fixture(scope="module")
def packed_dir(pack_input: Path, tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    pack.pack_datasets([pack_input], tok_dir, out, CONFIG)
    return out


@pytest.fixture(scope="module")
def texts(pack_input: Path) -> dict[str, str]:
    return {r["doc_id"]: r["text"] for r in ds.iter_rows(pack_input, columns=["doc_id", "text"])}


def stream(data_dir: Path, split: str) -> np.ndarray:
    return np.concatenate([s.reshape(-1) for s in packed.open_shards(data_dir, split)])


def output_bytes(data_dir: Path) -> dict[str, bytes]:
    names = [p for p in data_dir.rglob("*") if p.is_file() and p.name != "manifest.json"]
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in names}


def test_layout_and_dtype(packed_dir: Path) -> None:
    info = packed.read_packing_info(packed_dir)
    assert info["seq_len"] == 64 and info["window"] == 65 and info["dtype"] == "uint16"
    assert info["vocab_size"] == 512 and info["eot_id"] == 0
    train = info["splits"]["train"]
    assert len(train["shards"]) > 1 and train["shards"][0]["sequences"] == 500
    assert train["tokens"] == train["sequences"] * 65
    for shard in train["shards"]:
        assert ds.sha256_file(packed_dir / shard["path"]) == shard["sha256"]
    assert not (packed_dir / pack.WORK_DIR).exists()
    assert not list(packed_dir.glob(".*.tmp"))
    assert packed.token_dtype(65536) == np.uint16 and packed.token_dtype(65537) == np.uint32


@pytest.mark.slow
def test_same_seed_same_bytes_different_seed_different_order(
    pack_input: Path, tok_dir: Path, packed_dir: Path, tmp_path: Path
) -> None:
    # Two worker processes must give the bytes of the in-process run.
    pack.pack_datasets(
        [pack_input], tok_dir, tmp_path / "again", CONFIG.model_copy(update={"num_workers": 2})
    )
    assert output_bytes(tmp_path / "again") == output_bytes(packed_dir)
    pack.pack_datasets([pack_input], tok_dir, tmp_path / "seed1", CONFIG.model_copy(update={"seed": 1}))
    assert (tmp_path / "seed1" / "train-00000.bin").read_bytes() != (
        packed_dir / "train-00000.bin"
    ).read_bytes()


def test_every_token_comes_from_exactly_one_document(
    packed_dir: Path, texts: dict[str, str], tok: Tokenizer
) -> None:
    documents = pq.read_table(packed_dir / packed.DOCUMENTS_FILE).to_pylist()
    referenced = {
        row for split in packed.SPLITS for row in packed.read_placements(packed_dir, split)[:, 2].tolist()
    }
    assert referenced == set(range(len(documents)))  # documents.parquet lists exactly the packed documents
    for split in packed.SPLITS:
        tokens = stream(packed_dir, split)
        placements = np.asarray(packed.read_placements(packed_dir, split))
        starts, lengths, _ = placements.T
        # Placements tile the stream: each document then its end-of-text, no gaps, no overlaps.
        assert starts[0] == 0
        assert np.array_equal(starts[1:], starts[:-1] + lengths[:-1] + 1)
        assert starts[-1] < len(tokens) <= starts[-1] + lengths[-1] + 1
        for start, n, row in placements.tolist():
            doc = documents[row]
            assert doc["split"] == split
            expected = tk.encode_texts(tok, [texts[doc["doc_id"]]])[0] + [0]
            got = tokens[start : start + n + 1].tolist()
            assert got == expected[: len(got)], doc["doc_id"]
        # End-of-text appears only as the separator (document text never injects one).
        separators = starts + lengths
        assert np.flatnonzero(tokens == 0).tolist() == separators[separators < len(tokens)].tolist()


def test_validation_documents_never_appear_in_train(packed_dir: Path, pack_input: Path) -> None:
    documents = pq.read_table(packed_dir / packed.DOCUMENTS_FILE)
    split_of = dict(
        zip(documents.column("doc_id").to_pylist(), documents.column("split").to_pylist(), strict=True)
    )
    ids = documents.column("doc_id").to_pylist()
    placed = {
        split: {ids[row] for row in packed.read_placements(packed_dir, split)[:, 2].tolist()}
        for split in packed.SPLITS
    }
    assert placed["train"] and placed["validation"]
    assert not placed["train"] & placed["validation"]
    assert all(split_of[d] == "validation" for d in placed["validation"])
    # Membership is the hash threshold of the unit (the doc id: this input has no dup_cluster).
    held_out = pack.validation_mask(ids, CONFIG.validation_fraction, CONFIG.seed)
    assert [split_of[d] == "validation" for d in ids] == held_out.tolist()
    assert documents.column("dup_cluster").to_pylist() == ids
    # Validation is grouped by slice: each slice is one contiguous range of the stream.
    slices = packed.read_packing_info(packed_dir)["splits"]["validation"]["slices"]
    ranges = sorted((v["token_start"], v["token_end"]) for v in slices.values())
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_accounting_and_manifest(packed_dir: Path, pack_input: Path, tok_dir: Path) -> None:
    manifest = ds.read_manifest(packed_dir)
    stats = manifest.stats
    assert stats["docs_in"] == DOCS
    assert stats["docs_in"] == stats["kept"] + sum(stats["dropped"].values())
    rejects = ds.read_manifest(packed_dir / "rejects")
    assert rejects.rows == sum(stats["dropped"].values())
    assert [Path(r.path) for r in manifest.inputs] == [pack_input.resolve(), tok_dir.resolve()]
    assert manifest.extra["packing_sha256"] == ds.sha256_file(packed_dir / packed.PACKING_FILE)
    info = packed.read_packing_info(packed_dir)
    for split in packed.SPLITS:
        slice_tokens = sum(v["tokens"] for v in info["splits"][split]["slices"].values())
        assert slice_tokens == info["splits"][split]["tokens"] + info["splits"][split]["tail_tokens_dropped"]


def test_mixture_weights(pack_input: Path, tok_dir: Path, packed_dir: Path, tmp_path: Path) -> None:
    mixture = tk.Mixture(lang_weights={"ja": 0.0, "ru": 2.0, "de": 0.5})
    config = CONFIG.model_copy(update={"mixture": mixture, "slice_by": ["lang"]})
    manifest = pack.pack_datasets([pack_input], tok_dir, tmp_path, config)
    documents = pq.read_table(tmp_path / packed.DOCUMENTS_FILE).to_pylist()
    by_lang: dict[str, list[dict]] = {}
    for doc in documents:
        by_lang.setdefault(doc["lang"], []).append(doc)
    langs = tk.read_document_meta([pack_input]).column("lang").to_pylist()
    assert "ja" not in by_lang
    assert manifest.stats["dropped"]["mixture_weight_zero"] == langs.count("ja") > 0
    assert {d["copies"] for d in by_lang["ru"] if d["split"] == "train"} == {2}
    assert {d["copies"] for d in by_lang["de"]} == {1}  # copies 0 are dropped, not listed
    de_validation = sum(d["split"] == "validation" for d in by_lang["de"])
    de_train = len(by_lang["de"]) - de_validation
    assert 0.3 < de_train / (langs.count("de") - de_validation) < 0.7  # about half
    assert manifest.stats["dropped"]["mixture_downsampled"] == langs.count("de") - len(by_lang["de"])
    train_slices = json.loads((tmp_path / packed.PACKING_FILE).read_text())["splits"]["train"]["slices"]
    ru_train = [d for d in by_lang["ru"] if d["split"] == "train"]
    assert train_slices["ru"]["docs"] == 2 * len(ru_train)
    assert train_slices["ru"]["tokens"] == 2 * sum(d["tokens"] + 1 for d in ru_train)
    # Validation keeps the natural distribution: every held-out de document, once.
    tail = {r["doc_id"] for r in ds.iter_rows(tmp_path / "rejects") if r["rule"] == "packing_tail"}
    meta = tk.read_document_meta([pack_input])
    de_ids = [d for d, lang in zip(meta.column("doc_id").to_pylist(), langs, strict=True) if lang == "de"]
    de_held_out = pack.validation_mask(de_ids, config.validation_fraction, config.seed)
    assert de_validation == len({d for d, v in zip(de_ids, de_held_out, strict=True) if v} - tail) > 0


def test_trace_returns_the_documents_of_a_sequence(
    packed_dir: Path, texts: dict[str, str], tok: Tokenizer
) -> None:
    info = packed.read_packing_info(packed_dir)
    shard = 1
    # A sequence holding a document boundary and ending inside a document.
    traced = ((seq, pack.trace(packed_dir, shard, seq)) for seq in range(200))
    seq, entries = next((s, e) for s, e in traced if len(e) >= 2 and not e[-1]["ends_document"])
    window = packed.open_shards(packed_dir, "train")[shard][seq]
    # Entries tile the sequence, in order.
    assert entries[0]["seq_token_start"] == 0 and entries[-1]["seq_token_end"] == info["window"]
    assert all(a["seq_token_end"] == b["seq_token_start"] for a, b in itertools.pairwise(entries))
    for entry in entries:
        doc_id = entry["doc_id"]
        lang = entry["lang"]
        assert entry["url"].endswith(f"/{lang}/{doc_id}.html")
        assert entry["warc_record_id"].startswith("<urn:uuid:")
        text = texts[doc_id]
        assert entry["text"] == text[entry["char_start"] : entry["char_end"]]
        ids = tk.encode_texts(tok, [text])[0]
        lo, n = entry["seq_token_start"], entry["doc_token_end"] - entry["doc_token_start"]
        assert window[lo : lo + n].tolist() == ids[entry["doc_token_start"] : entry["doc_token_end"]]
        # The span's own tokens re-encode to the same ids when it starts at a token boundary.
        if entry["doc_token_start"] == 0 and entry["ends_document"]:
            assert entry["text"] == text
    # A document cut by the window boundary continues at the same character in the next sequence.
    following = pack.trace(packed_dir, shard, seq + 1)
    assert following[0]["doc_id"] == entries[-1]["doc_id"]
    assert following[0]["char_start"] == entries[-1]["char_end"]
    assert following[0]["doc_token_start"] == entries[-1]["doc_token_end"]


def test_loader_reads_the_packed_output(packed_dir: Path) -> None:
    info = packed.read_packing_info(packed_dir)
    for split in packed.SPLITS:
        loader = packed.PackedLoader(packed_dir, split=split, batch_size=16, loop=False)
        batches = list(loader)
        assert sum(len(b[0]) for b in batches) == info["splits"][split]["sequences"]
        assert all(int(b[0].max()) < loader.vocab_size for b in batches)


def test_trace_validation_split_and_errors(packed_dir: Path, tmp_path: Path) -> None:
    entries = pack.trace(packed_dir, 0, 0, split="validation")
    assert entries[0]["char_start"] == 0 and entries[0]["doc_token_start"] == 0
    # A published root traces its LATEST version.
    shutil.copytree(packed_dir, tmp_path / "built")
    ds.publish_version(tmp_path / "built", tmp_path / "packed")
    assert pack.trace(tmp_path / "packed", 0, 0, split="validation") == entries
    with pytest.raises(IndexError):
        pack.trace(packed_dir, 0, 10**6)
    with pytest.raises(IndexError):
        pack.trace(packed_dir, 10**4, 0)


def test_trace_refuses_a_changed_input(pack_input: Path, tok_dir: Path, corpus: Path, tmp_path: Path) -> None:
    source = build_lid_dataset(corpus, tmp_path / "lid", limit=200)
    out = tmp_path / "packed"
    pack.pack_datasets([source], tok_dir, out, CONFIG.model_copy(update={"seq_len": 16}))
    assert pack.trace(out, 0, 0)
    build_lid_dataset(corpus, source, limit=150)  # rewritten in place: another manifest
    with pytest.raises(ValueError, match="changed since packing"):
        pack.trace(out, 0, 0)


def test_bad_inputs(pack_input: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        pack.pack_datasets([pack_input], tmp_path / "no-tokenizer", tmp_path / "out", CONFIG)
    with pytest.raises(ValueError, match="not a tokenizer"):
        pack.pack_datasets([pack_input], pack_input, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_null_and_empty_texts_are_accounted_for(tok_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"doc_id": "a", "text": "hello world, hello pack", "url": "https://x.example/a", "lang": "en"},
        {"doc_id": "b", "text": None, "url": "https://x.example/b", "lang": "en"},
        {"doc_id": "c", "text": "", "url": "https://x.example/c", "lang": "en"},
    ]
    source = tmp_path / "input"
    # Written by something other than ShardWriter: the contract says text is never null, input may not.
    shard = ds.write_table(pa.Table.from_pylist(rows), source / "part-00000.parquet")
    ds.write_manifest(source, ds.Manifest(stage="fixture", shards=[shard]))
    config = CONFIG.model_copy(update={"seq_len": 2, "validation_fraction": 0.0})
    manifest = pack.pack_datasets([source], tok_dir, tmp_path / "out", config)
    assert manifest.stats["quarantined"] == {"null_text": 1}
    assert manifest.stats["dropped"] == {"no_tokens": 1}
    assert manifest.stats["kept"] == 1
    rejects = {r["doc_id"]: r["rule"] for r in ds.iter_rows(tmp_path / "out" / "rejects")}
    assert rejects == {"b": "null_text", "c": "no_tokens"}
    entries = pack.trace(tmp_path / "out", 0, 0)
    assert [e["doc_id"] for e in entries] == ["a"]
    assert entries[0]["text"] == "hello world, hello pack"[: entries[0]["char_end"]]


# ---------------------------------------------------------------------------------------------
# The validation split: stable, the configured share, whole clusters; what evaluation reads


def write_documents(target: Path, rows: list[dict]) -> Path:
    shard = ds.write_table(pa.Table.from_pylist(rows), target / "part-00000.parquet")
    ds.write_manifest(target, ds.Manifest(stage="fixture", shards=[shard]))
    return target


def zipf_rows(docs: int, hosts: int = 500, seed: int = 0) -> list[dict]:
    """Short English pages over ``hosts`` hosts with Zipf-like sizes: a few big hosts, a long tail."""
    weights = 1.0 / np.arange(1, hosts + 1) ** 1.3
    host = np.random.default_rng(seed).choice(hosts, size=docs, p=weights / weights.sum())
    return [
        {
            "doc_id": f"d{i:06d}",
            "text": f"page {i} of host {h}",
            "url": f"https://h{h}.example/{i}",
            "lang": "en",
        }
        for i, h in enumerate(host.tolist())
    ]


def splits_of(packed_dir: Path) -> dict[str, str]:
    documents = pq.read_table(packed_dir / packed.DOCUMENTS_FILE, columns=["doc_id", "split"])
    return dict(zip(*(documents.column(c).to_pylist() for c in ("doc_id", "split")), strict=True))


def test_held_out_share_is_the_fraction_on_a_long_tailed_host_distribution(
    tok_dir: Path, tmp_path: Path
) -> None:
    docs, fraction = 20_000, 0.02
    rows = zipf_rows(docs)
    sizes = np.bincount([int(r["url"].split("/")[2][1:].split(".")[0]) for r in rows])
    # Long-tailed: over 100 hosts of 1-2 pages (where at least one page a host would hold out 3.6%).
    assert (sizes <= 2).sum() > 100 and sizes.max() > 1000
    config = CONFIG.model_copy(update={"seq_len": 8, "validation_fraction": fraction})
    pack.pack_datasets([write_documents(tmp_path / "in", rows)], tok_dir, tmp_path / "out", config)
    splits = splits_of(tmp_path / "out")
    assert len(splits) >= docs - 2  # at most the documents of one partial window are cut
    held_out = sum(split == "validation" for split in splits.values())
    sigma = (docs * fraction * (1 - fraction)) ** 0.5
    assert abs(held_out - docs * fraction) <= 3 * sigma, (held_out, docs * fraction, sigma)


def test_validation_documents_stay_in_validation_when_documents_are_added(
    tok_dir: Path, tmp_path: Path
) -> None:
    rows = zipf_rows(2_200, hosts=200)
    config = CONFIG.model_copy(update={"seq_len": 8, "validation_fraction": 0.1})
    pack.pack_datasets([write_documents(tmp_path / "a", rows[:2_000])], tok_dir, tmp_path / "pa", config)
    pack.pack_datasets([write_documents(tmp_path / "b", rows)], tok_dir, tmp_path / "pb", config)
    before, after = splits_of(tmp_path / "pa"), splits_of(tmp_path / "pb")
    both = before.keys() & after.keys()
    assert len(both) >= 1_990 and sum(before[d] == "validation" for d in both) > 150
    assert [d for d in both if before[d] != after[d]] == []  # no document moved, either way


def neardup_documents(corpus: Path, target: Path, clusters: int) -> Path:
    """The documents of the first ``clusters`` labelled near-duplicate clusters of 3+ documents."""
    meta = json.loads((corpus / "neardup-dev.meta.json").read_text(encoding="utf-8"))
    members: dict[str, list[str]] = {}
    for doc_id, doc in sorted(meta["documents"].items()):
        members.setdefault(doc["cluster"], []).append(doc_id)
    chosen = {
        d for ids in [ids for _, ids in sorted(members.items()) if len(ids) >= 3][:clusters] for d in ids
    }
    with open(corpus / "neardup-dev.jsonl", encoding="utf-8") as f:
        rows = [
            {
                "doc_id": d["id"],
                "text": d["text"],
                "url": f"https://{meta['documents'][d['id']]['source']}.example/{d['id']}",
            }
            for d in map(json.loads, f)
            if d["id"] in chosen
        ]
    return write_documents(target, rows)


def test_a_near_duplicate_cluster_never_straddles_train_and_validation(
    corpus: Path, tok_dir: Path, tmp_path: Path
) -> None:
    docs = neardup_documents(corpus, tmp_path / "docs", clusters=60)
    config = CONFIG.model_copy(update={"seq_len": 16, "validation_fraction": 0.5})
    for mode in ("annotate", "drop"):
        dedup = DedupConfig(annotate=mode == "annotate")
        dedup_datasets([docs], tmp_path / mode, None, dedup, tmp_path / f"work-{mode}")
        pack.pack_datasets([tmp_path / mode], tok_dir, tmp_path / f"packed-{mode}", config)
    documents = pq.read_table(tmp_path / "packed-annotate" / packed.DOCUMENTS_FILE).to_pylist()
    sides: dict[str, set[str]] = {}
    for doc in documents:
        sides.setdefault(doc["dup_cluster"], set()).add(doc["split"])
    sizes = collections.Counter(doc["dup_cluster"] for doc in documents)
    multi = [c for c, n in sizes.items() if n > 1]
    assert len(multi) >= 30  # dedup found the clusters
    assert {s for c in multi for s in sides[c]} == {"train", "validation"}
    assert [c for c, s in sides.items() if len(s) > 1] == []
    # Splitting by doc id instead would have cut clusters: the test can tell.
    by_doc = pack.validation_mask([d["doc_id"] for d in documents], 0.5, config.seed)
    doc_sides: dict[str, set[bool]] = {}
    for doc, held_out in zip(documents, by_doc.tolist(), strict=True):
        doc_sides.setdefault(doc["dup_cluster"], set()).add(held_out)
    assert any(len(s) > 1 for s in doc_sides.values())
    # Drop mode keeps each cluster's survivor, named as annotate mode names the cluster: same side.
    survivors = splits_of(tmp_path / "packed-drop")
    assert set(survivors) <= set(sizes) and len(survivors) >= len(sizes) - 2  # (the packing tail)
    assert all(survivors[c] == next(iter(sides[c])) for c in survivors)


def test_slicing_never_changes_the_split(tok_dir: Path, tmp_path: Path) -> None:
    # Slices lay out the validation stream, and evals take a minimum per slice: neither decides who is in it.
    source = write_documents(tmp_path / "in", zipf_rows(3_000, hosts=100))
    base = CONFIG.model_copy(update={"seq_len": 8, "validation_fraction": 0.1})
    splits = []
    for slice_by in (["lang", "source"], ["source"], []):
        out = tmp_path / "-".join(slice_by or ["none"])
        pack.pack_datasets([source], tok_dir, out, base.model_copy(update={"slice_by": slice_by}))
        splits.append(splits_of(out))
        names = set(packed.read_packing_info(out)["splits"]["validation"]["slices"])
        assert len(names) > 10 if slice_by else names == {"all"}
    assert splits[0] == splits[1] == splits[2]
    assert sum(s == "validation" for s in splits[0].values()) > 200
