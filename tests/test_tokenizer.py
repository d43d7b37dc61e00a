"""Tokenizer training: byte-exact round trips, determinism, mixture sampling, fertility report."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from tasks import dataset as ds
from tasks import tokenizer as tk

LID_SCHEMA = ds.DOCUMENT_SCHEMA.append(pa.field("lang", pa.string()))


def build_lid_dataset(corpus: Path, out_dir: Path, limit: int | None = None, shards: int = 2) -> Path:
    """A contract dataset from lid-dev.jsonl: the source package becomes the URL host, ids are derived.

    Stands in for the ingest+langid output, which is written concurrently with this stage.
    """
    meta = {}
    for line in (corpus / "lid-dev.meta.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        meta[row["id"]] = row["source"]
    rows = []
    for line in (corpus / "lid-dev.jsonl").read_text(encoding="utf-8").splitlines()[:limit]:
        doc = json.loads(line)
        rows.append(
            {
                "doc_id": doc["id"],
                "text": doc["text"],
                "url": f"https://{meta[doc['id']]}.example/{doc['lang']}/{doc['id']}.html",
                "warc_record_id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, doc['id'])}>",
                "lang": doc["lang"],
            }
        )
    per_shard = -(-len(rows) // shards)
    infos = [
        ds.write_table(
            ds.rows_to_table(rows[i : i + per_shard], LID_SCHEMA), out_dir / f"part-{k:05d}.parquet"
        )
        for k, i in enumerate(range(0, len(rows), per_shard))
    ]
    ds.write_manifest(
        out_dir, ds.Manifest(stage="lid-dev-fixture", schema=ds.schema_description(LID_SCHEMA), shards=infos)
    )
    return out_dir


SMALL = tk.TokenizerConfig(
    vocab_size=512, reserved_tokens=4, sample_chars=1_500_000, eval_docs_per_lang=40, heldout_fraction=0.1
)


@pytest.fixture(scope="session")
def lid_dataset(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lid_dataset(corpus, tmp_path_factory.mktemp("lid"))


@pytest.fixture(scope="session")
def tokenizer_dir(lid_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tk.train_tokenizer([lid_dataset], out, SMALL)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return tk.load_tokenizer(tk.tokenizer_path(tokenizer_dir))


def test_vocab_is_padded_with_special_tokens_first(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    manifest = ds.read_manifest(tokenizer_dir)
    assert manifest.extra["vocab_size"] == tokenizer.get_vocab_size() == 512  # already a multiple of 128
    assert manifest.extra["eot_id"] == tokenizer.token_to_id(tk.EOT) == 0
    assert manifest.extra["pad_id"] == tokenizer.token_to_id(tk.PAD) == 1
    assert [tokenizer.token_to_id(tk.reserved_token(i)) for i in range(4)] == [2, 3, 4, 5]
    name = manifest.extra["tokenizer_file"]
    assert name == f"tokenizer-{ds.sha256_file(tokenizer_dir / name)[:16]}.json"
    assert manifest.inputs and manifest.inputs[0].digest


def test_vocab_padding_to_multiple(lid_dataset: Path, tmp_path: Path) -> None:
    config = SMALL.model_copy(update={"vocab_size": 300, "sample_chars": 200_000, "eval_docs_per_lang": 2})
    manifest = tk.train_tokenizer([lid_dataset], tmp_path, config)
    assert manifest.extra["trained_vocab_size"] == 300
    assert manifest.extra["vocab_size"] == 384
    tokenizer = tk.load_tokenizer(tk.tokenizer_path(tmp_path))
    assert tokenizer.get_vocab_size() == 384
    assert tokenizer.id_to_token(383) == tk.reserved_token(4 + 83)


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii, with  double spaces\tand tabs\n\nand newlines\r\n",
        "emoji 😀👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇯🇵",
        "中文测试，日本語のテキスト、한국어 텍스트",
        "mixed Ünïcödé ß ﬁ ½ \u200b zero-width and \x00 NUL and \x7f DEL",
        "   leading and trailing spaces   ",
        "",
    ],
)
def test_round_trip_is_byte_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tk.encode_texts(tokenizer, [text])[0]
    assert tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8") == text.encode("utf-8")


def test_round_trip_applies_nfc(tokenizer: Tokenizer) -> None:
    decomposed = "Cafe\u0301 n\u0303"  # e + combining acute, n + combining tilde
    ids = tk.encode_texts(tokenizer, [decomposed])[0]
    assert tokenizer.decode(ids) == "Café ñ"


def test_lone_surrogates_become_replacement_characters(tokenizer: Tokenizer) -> None:
    with pytest.raises(TypeError):  # what tokenizers itself does
        tokenizer.encode("a\ud800b")
    ids = tk.encode_texts(tokenizer, ["ok", "a\ud800b\udfffc"])
    assert tokenizer.decode(ids[0]) == "ok"
    assert tokenizer.decode(ids[1]) == "a\ufffdb\ufffdc"
    assert len(tk.sanitize_text("a\ud800b")) == 3  # one for one: char offsets stay valid


def test_special_token_text_in_a_document_is_not_a_boundary(tokenizer: Tokenizer) -> None:
    ids = tk.encode_texts(tokenizer, [f"before {tk.EOT} after {tk.PAD}"])[0]
    assert tokenizer.token_to_id(tk.EOT) not in ids
    assert tokenizer.token_to_id(tk.PAD) not in ids
    assert tokenizer.decode(ids) == f"before {tk.EOT} after {tk.PAD}"


def test_training_is_deterministic(lid_dataset: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    again = tk.train_tokenizer([lid_dataset], tmp_path, SMALL)
    first = ds.read_manifest(tokenizer_dir)
    assert again.extra["tokenizer_file"] == first.extra["tokenizer_file"]
    assert (tmp_path / "manifest.json").read_bytes().replace(str(tmp_path).encode(), b"") == (
        tokenizer_dir / "manifest.json"
    ).read_bytes().replace(str(tokenizer_dir).encode(), b"")


def test_fertility_report(tokenizer_dir: Path) -> None:
    manifest = ds.read_manifest(tokenizer_dir)
    rows = tk.fertility_rows(manifest)
    by_lang = {r["lang"]: r for r in rows}
    assert {"en", "ja", "zh", "ru", "de"} <= set(by_lang)
    for row in rows:
        assert row["docs"] <= SMALL.eval_docs_per_lang
        assert row["bytes_per_token"] == pytest.approx(row["bytes"] / row["tokens"], abs=1e-3)
    # Greek has 10 documents in lid-dev (6 in the sample): a 512-token vocabulary barely covers it.
    assert by_lang["el"]["flagged"] and not by_lang["en"]["flagged"]
    assert by_lang["el"]["tokens_per_word"] > 2 * by_lang["en"]["tokens_per_word"]
    assert by_lang["el"]["train_docs"] < by_lang["en"]["train_docs"] / 5  # why: it saw little Greek
    assert manifest.extra["flagged_languages"] == [r["lang"] for r in rows if r["flagged"]]


def test_fertility_flags_a_language_much_worse_than_the_median(tokenizer: Tokenizer) -> None:
    texts = {
        "en": ["the system file and the package of the system"] * 3,
        "de": ["die Datei und das Paket der Datei"] * 3,
        "fr": ["le fichier et le paquet du système"] * 3,
        "el": ["το αρχείο και το πακέτο του συστήματος"] * 3,  # 2-byte script, barely in the sample
    }
    rows = {r["lang"]: r for r in tk.fertility(tokenizer, texts, flag_ratio=2.0)}
    assert rows["el"]["flagged"], rows
    assert not rows["en"]["flagged"]


def test_mixture_weights_shape_the_sample(lid_dataset: Path) -> None:
    meta = tk.read_document_meta([lid_dataset])
    base = tk.TokenizerConfig(sample_chars=1_000_000, heldout_fraction=0.1)
    train, heldout = tk.select_sample(meta, base)
    assert not (train & heldout).any()
    langs = meta.column("lang").to_numpy(zero_copy_only=False)
    no_ja = base.model_copy(update={"mixture": tk.Mixture(lang_weights={"ja": 0.0})})
    train_no_ja, heldout_no_ja = tk.select_sample(meta, no_ja)
    assert (train[langs == "ja"]).any() and not (train_no_ja[langs == "ja"]).any()
    assert not heldout_no_ja[langs == "ja"].any()
    more_ru = base.model_copy(update={"mixture": tk.Mixture(lang_weights={"ru": 5.0})})
    assert (tk.select_sample(meta, more_ru)[0][langs == "ru"]).sum() > 1.5 * train[langs == "ru"].sum()
    sources = meta.column("source").to_numpy(zero_copy_only=False)
    only_faq = base.model_copy(
        update={"mixture": tk.Mixture(default_source_weight=0.0, source_weights={"debian-faq.example": 1.0})}
    )
    assert set(sources[tk.select_sample(meta, only_faq)[0]]) == {"debian-faq.example"}


def test_url_hosts() -> None:
    urls = pa.array(["https://User@Docs.Python.example:8080/a?b", "http://x.org", None, "not a url", ""])
    assert tk.url_hosts(urls).to_pylist() == ["docs.python.example", "x.org", "und", "und", "und"]


def test_bad_input_is_a_clear_error(lid_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        tk.train_tokenizer([tmp_path / "missing"], tmp_path / "out", SMALL)
    everything_out = SMALL.model_copy(update={"mixture": tk.Mixture(default_lang_weight=0.0)})
    with pytest.raises(ValueError, match="training sample is empty"):
        tk.train_tokenizer([lid_dataset], tmp_path / "out", everything_out)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="duplicate doc_id"):
        tk.read_document_meta([lid_dataset, lid_dataset])
