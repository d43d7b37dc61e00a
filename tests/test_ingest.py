"""Ingest stage on slices of the real sample crawl, and on damaged files built from its records."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import random
import threading
import tracemalloc
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks import dataset as ds
from tasks import extract as ex
from tasks import ingest
from tasks import stage as st
from tests.conftest import snapshot_files

SNAPSHOT = "CC-MAIN-2026-44"


@dataclass
class Member:
    """One gzip member (= one WARC record) of a real crawl file."""

    offset: int
    length: int
    rec_type: str
    url: str | None
    record_id: str
    status: str | None
    content_type: str | None
    headers: StatusAndHeaders | None


def index_members(path: Path) -> list[Member]:
    members = []
    with open(path, "rb") as f:
        iterator = ArchiveIterator(f)
        for record in iterator:
            http = record.http_headers
            members.append(
                Member(
                    offset=iterator.get_record_offset(),
                    length=iterator.get_record_length(),
                    rec_type=record.rec_type,
                    url=record.rec_headers.get_header("WARC-Target-URI"),
                    record_id=record.rec_headers.get_header("WARC-Record-ID"),
                    status=http.get_statuscode() if http and record.rec_type == "response" else None,
                    content_type=http.get_header("Content-Type") if http else None,
                    headers=http,
                )
            )
    return members


@pytest.fixture(scope="session")
def warc_path(crawl: Path) -> Path:
    return snapshot_files(SNAPSHOT)[0]


@pytest.fixture(scope="session")
def members(warc_path: Path) -> list[Member]:
    return index_members(warc_path)


@pytest.fixture(scope="session")
def warc_bytes(warc_path: Path) -> bytes:
    return warc_path.read_bytes()


def member_bytes(data: bytes, member: Member) -> bytes:
    return data[member.offset : member.offset + member.length]


def captures(members: list[Member], pick) -> list[Member]:
    """Each response chosen by ``pick`` with its request and metadata record (a whole capture)."""
    chosen = []
    for i, member in enumerate(members):
        if member.rec_type == "response" and pick(member):
            chosen.extend(
                m for m in members[i - 1 : i + 2] if m.rec_type in ("request", "response", "metadata")
            )
    return chosen


def first_response(members: list[Member], pick) -> Member:
    return next(m for m in members if m.rec_type == "response" and pick(m))


def write_file(path: Path, data: bytes, parts: list[Member] | None = None) -> str:
    path.write_bytes(b"".join(member_bytes(data, m) for m in parts) if parts is not None else data)
    return str(path)


def response_member(
    template: Member, body: bytes, http_headers: list[tuple[str, str]], status: str = "200 OK"
) -> bytes:
    """A gzip member holding a response record with the URL of a real record and a new payload."""
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=True)
    record = writer.create_warc_record(
        template.url,
        "response",
        payload=io.BytesIO(body),
        http_headers=StatusAndHeaders(status, http_headers, protocol="HTTP/1.1"),
        warc_headers_dict={"WARC-Date": "2026-10-26T03:00:00Z"},
    )
    writer.write_record(record)
    return out.getvalue()


def regzip_member(member: bytes, edit) -> bytes:
    """Decompress one member, apply ``edit`` to its bytes, compress it again as one member."""
    return gzip.compress(edit(gzip.decompress(member)), mtime=0)


def run_ingest(source: str, tmp_path: Path, config: ingest.IngestConfig | None = None, index: int = 0):
    out = tmp_path / "out"
    result = ingest.ingest_file(source, out, index, config or ingest.IngestConfig(), snapshot=SNAPSHOT)
    docs = pq.read_table(out / st.shard_name(index)).to_pylist()
    rejects = pq.read_table(out / "rejects" / st.shard_name(index)).to_pylist()
    return result, docs, rejects


def accounted(result: st.ShardResult) -> None:
    stats = result.stats
    assert stats["docs_in"] == stats["kept"] + sum(stats["dropped"].values()) + sum(
        stats["quarantined"].values()
    )


# ---------------------------------------------------------------------------------------------
# Good input


@pytest.fixture(scope="session")
def head_slice(members: list[Member]) -> list[Member]:
    """The first 150 records of a real WARC file (warcinfo + 50 captures, all five sites)."""
    return members[:151]


def test_provenance_and_accounting(tmp_path, warc_bytes, head_slice):
    source = write_file(tmp_path / "slice.warc.gz", warc_bytes, head_slice)
    result, docs, rejects = run_ingest(source, tmp_path)
    responses = [m for m in head_slice if m.rec_type == "response"]
    stats = result.stats
    # request/metadata/warcinfo records are not documents
    assert stats["docs_in"] == len(responses) == 50
    assert stats["extra"]["records_request"] == 50 and stats["extra"]["records_warcinfo"] == 1
    accounted(result)
    assert stats["kept"] == len(docs) > 40
    assert len(rejects) == stats["docs_in"] - stats["kept"]

    by_offset = {m.offset: m for m in responses}
    raw = Path(source).read_bytes()
    for doc in docs:
        member = by_offset[doc["source_offset"]]  # the offset is that of the response's gzip member
        assert gzip.decompress(raw[member.offset : member.offset + member.length]).startswith(b"WARC/1.0")
        assert doc["warc_record_id"] == member.record_id
        assert doc["doc_id"] == hashlib.sha256(member.record_id.encode()).hexdigest()[:32]
        assert doc["url"] == member.url
        assert doc["date"].startswith("2026-10-2") and doc["date"].endswith("Z")
        assert doc["source_file"] == source
        assert doc["snapshot"] == SNAPSHOT
        assert doc["content_type"] == "text/html"
        assert doc["charset"] and doc["text"].strip()
        assert doc["wet_language"] is None
    assert len({d["doc_id"] for d in docs}) == len(docs)


def test_rerun_is_byte_identical(tmp_path, warc_bytes, head_slice):
    source = write_file(tmp_path / "slice.warc.gz", warc_bytes, head_slice[:40])
    first = ingest.ingest_file(source, tmp_path / "a", 3, snapshot=SNAPSHOT)
    second = ingest.ingest_file(source, tmp_path / "b", 3, snapshot=SNAPSHOT)
    assert first.shard.sha256 == second.shard.sha256 and first.rejects.sha256 == second.rejects.sha256
    assert (tmp_path / "a" / "part-00003.parquet").exists()


def test_snapshot_from_path(warc_path):
    assert ingest.snapshot_of(str(warc_path)) == SNAPSHOT
    assert ingest.snapshot_of("/data/CC-MAIN-20261026024137-20261026054137-00000.warc.gz") is None


def test_redirect_404_and_non_html_are_dropped_with_reasons(tmp_path, warc_bytes, members):
    parts = members[:1] + captures(
        members, lambda m: m.status in ("301", "404") or m.content_type == "image/png"
    )
    source = write_file(tmp_path / "rejects.warc.gz", warc_bytes, parts)
    result, docs, rejects = run_ingest(source, tmp_path)
    assert docs == []
    dropped = result.stats["dropped"]
    n_responses = sum(m.rec_type == "response" for m in parts)
    assert dropped == {
        "redirect": sum(m.status == "301" for m in parts),
        "http_status_404": sum(m.status == "404" for m in parts),
        "not_html": sum(m.content_type == "image/png" for m in parts),
    }
    assert sum(dropped.values()) == n_responses == result.stats["docs_in"]
    redirect = next(r for r in rejects if r["rule"] == "redirect")
    assert (
        redirect["kind"] == "dropped"
        and "-> http" in redirect["detail"]
        and redirect["url"].startswith("http")
    )
    not_html = next(r for r in rejects if r["rule"] == "not_html")
    assert "image/png" in not_html["detail"] and not_html["source_offset"] > 0


def _dechunk(body: bytes) -> bytes:
    """Independent HTTP/1.1 chunked decoder for the check below."""
    out, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2 :]


def _http_body(data: bytes, member: Member) -> bytes:
    record = gzip.decompress(member_bytes(data, member))
    return record.split(b"\r\n\r\n", 2)[2][: -len(b"\r\n\r\n")]


def test_chunked_transfer_encoding_is_dechunked(tmp_path, warc_bytes, members):
    member = first_response(members, lambda m: m.headers.get_header("Transfer-Encoding") == "chunked")
    source = write_file(tmp_path / "pg.warc.gz", warc_bytes, [member])
    _, docs, _ = run_ingest(source, tmp_path)
    raw_body = _http_body(warc_bytes, member)
    assert raw_body.split(b"\r\n", 1)[0].strip().isalnum()  # stored chunked, as sent
    html = _dechunk(raw_body).decode("utf-8")
    assert docs[0]["text"] == ex.extract_text(html)
    assert docs[0]["charset_source"] == "meta"  # the PostgreSQL site sends bare text/html


def test_gzip_content_encoding_is_decompressed(tmp_path, warc_bytes, members):
    member = first_response(members, lambda m: m.headers.get_header("Content-Encoding") == "gzip")
    source = write_file(tmp_path / "django.warc.gz", warc_bytes, [member])
    _, docs, _ = run_ingest(source, tmp_path)
    html = gzip.decompress(_http_body(warc_bytes, member)).decode("utf-8")
    assert docs[0]["text"] == ex.extract_text(html) and "Django" in docs[0]["text"]
    assert (docs[0]["charset"], docs[0]["charset_source"]) == ("utf-8", "header")


def test_corrupt_gzip_content_encoding_is_quarantined(tmp_path, warc_bytes, members):
    """A body whose gzip breaks midway is not passed on cut short (warcio's reader would)."""
    template = first_response(members, lambda m: m.headers.get_header("Content-Encoding") == "gzip")
    body = bytearray(
        gzip.compress(("<html><body>" + "<p>a paragraph of text</p>" * 3000 + "</body></html>").encode())
    )
    body[len(body) // 2 : len(body) // 2 + 64] = bytes(64)
    headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip")]
    source = write_file(tmp_path / "badgzip.warc.gz", response_member(template, bytes(body), headers))
    result, docs, rejects = run_ingest(source, tmp_path)
    assert docs == [] and result.stats["quarantined"] == {"bad_content_encoding": 1}
    assert rejects[0]["doc_id"] and rejects[0]["url"] == template.url
    assert rejects[0]["detail"].startswith("error: Error -3 while decompressing data")


def test_charset_from_meta_when_header_has_none(tmp_path, members):
    template = first_response(members, lambda m: m.status == "200")
    page = (
        '<html><head><meta charset="windows-1252"></head><body><p>Le café était déjà prêt.</p></body></html>'
    )
    member = response_member(template, page.encode("cp1252"), [("Content-Type", "text/html")])
    source = write_file(tmp_path / "meta.warc.gz", member)
    _, docs, _ = run_ingest(source, tmp_path)
    assert docs[0]["text"] == "Le café était déjà prêt."
    assert (docs[0]["charset"], docs[0]["charset_source"]) == ("cp1252", "meta")


def test_missing_content_type_is_sniffed(tmp_path, members):
    template = first_response(members, lambda m: m.status == "200")
    html = response_member(
        template, b"<!DOCTYPE html><html><body><p>Sniffed page text.</p></body></html>", []
    )
    text = response_member(template, b"just some plain text, no markup", [])
    source = write_file(tmp_path / "sniff.warc.gz", html + text)
    _, docs, rejects = run_ingest(source, tmp_path)
    assert [d["text"] for d in docs] == ["Sniffed page text."]
    assert [(r["rule"], r["detail"]) for r in rejects] == [
        ("not_html", "no Content-Type and the payload does not look like HTML")
    ]


def test_fallback_extractor_takes_pages_resiliparse_finds_empty(tmp_path, warc_bytes, members):
    """resiliparse's main-content rules drop some whole Django index pages; trafilatura gets their text."""
    django = [m for m in members if m.rec_type == "response" and m.status == "200" and "django" in m.url]
    source = write_file(tmp_path / "django.warc.gz", warc_bytes, django)
    config = ingest.IngestConfig(fallback_extractor=None)
    alone, alone_docs, alone_rejects = run_ingest(source, tmp_path / "alone", config)
    default, docs, rejects = run_ingest(source, tmp_path / "default")
    empty_alone = {r["url"] for r in alone_rejects if r["rule"] == "empty_text"}
    empty = {r["url"] for r in rejects if r["rule"] == "empty_text"}
    assert len(empty_alone) == default.stats["extra"]["extract_fallback"] >= 3
    assert empty < empty_alone  # an index page of links only stays empty for both
    rescued = [d for d in docs if d["url"] in empty_alone]
    assert len(rescued) == len(empty_alone) - len(empty) and all(len(d["text"]) > 40 for d in rescued)
    assert len(docs) == len(alone_docs) + len(rescued) and "extract_fallback" not in alone.stats["extra"]


def test_wet_records(tmp_path, crawl):
    wet = snapshot_files("CC-MAIN-2026-40", "wet")[0]
    members = index_members(wet)[:21]  # warcinfo + 20 conversion records
    source = write_file(tmp_path / "slice.warc.wet.gz", wet.read_bytes(), members)
    result, docs, _ = run_ingest(source, tmp_path)
    assert result.stats["docs_in"] == result.stats["kept"] == 20 == len(docs)
    with gzip.open(source, "rb") as f:
        languages = [
            line.split(b":", 1)[1].strip().decode()
            for line in f
            if line.startswith(b"WARC-Identified-Content-Language")
        ]
    assert [d["wet_language"] for d in docs] == languages
    assert all(d["content_type"] == "text/plain" and d["charset"] == "utf-8" for d in docs)
    assert all(d["url"] and d["text"] and d["warc_record_id"] for d in docs)


@pytest.mark.slow
def test_whole_snapshot_file_accounting(warc_path, tmp_path):
    """One full real WARC file: every response accounted for, nothing quarantined."""
    stats = st.StageStats(ingest.STAGE)
    docs = list(ingest.iter_documents(str(warc_path), ingest.IngestConfig(), stats))
    stats.check_accounting()
    assert stats.docs_in == stats.extra["records_response"] == 1157
    assert not stats.quarantined
    assert len(docs) == stats.kept > 1100


# ---------------------------------------------------------------------------------------------
# Bad input: each kind gives a clear reason, and the other records of the file still come through


@pytest.fixture(scope="session")
def clean_doc_ids(warc_bytes, head_slice, tmp_path_factory) -> dict[int, str]:
    """source_offset -> doc_id of the 150-record slice, read without damage."""
    tmp = tmp_path_factory.mktemp("clean")
    source = write_file(tmp / "clean.warc.gz", warc_bytes, head_slice)
    _, docs, _ = run_ingest(source, tmp)
    return {d["source_offset"]: d["doc_id"] for d in docs}


def _splice(warc_bytes: bytes, parts: list[Member], index: int, replacement: bytes) -> bytes:
    return b"".join(replacement if i == index else member_bytes(warc_bytes, m) for i, m in enumerate(parts))


@pytest.mark.parametrize("where", ["headers", "payload"])
def test_corrupt_gzip_member_resyncs_to_next_member(tmp_path, warc_bytes, head_slice, clean_doc_ids, where):
    """Zeros in the deflate stream: near the start (fails at once) or deep in the payload (only the
    CRC at the member's end notices; warcio's ArchiveIterator would silently stop reading there)."""
    target = next(
        i for i, m in enumerate(head_slice) if m.rec_type == "response" and i > 60 and m.length > 5000
    )
    member = bytearray(member_bytes(warc_bytes, head_slice[target]))
    at = 40 if where == "headers" else len(member) - 2000
    member[at : at + 40] = bytes(40)
    source = write_file(tmp_path / "corrupt.warc.gz", _splice(warc_bytes, head_slice, target, bytes(member)))
    result, docs, rejects = run_ingest(source, tmp_path)
    accounted(result)
    quarantined = [r for r in rejects if r["kind"] == "quarantined"]
    assert [r["rule"] for r in quarantined] == ["corrupt_gzip"]
    assert (
        quarantined[0]["source_offset"] == head_slice[target].offset
        and "resynced" in quarantined[0]["detail"]
    )
    # every other document of the file is still there, at its original offset
    expected = {o: d for o, d in clean_doc_ids.items() if o != head_slice[target].offset}
    assert {d["source_offset"]: d["doc_id"] for d in docs} == expected


def test_garbage_between_members_is_skipped(tmp_path, warc_bytes, head_slice, clean_doc_ids):
    data = b"".join(member_bytes(warc_bytes, m) for m in head_slice[:11])
    data += b"\x00garbage\x1f\x8b\x08 not a member" * 100
    source = write_file(
        tmp_path / "garbage.warc.gz", data + b"".join(member_bytes(warc_bytes, m) for m in head_slice[11:])
    )
    result, docs, rejects = run_ingest(source, tmp_path)
    accounted(result)
    assert [r["rule"] for r in rejects if r["kind"] == "quarantined"] == ["corrupt_gzip"]
    assert sorted(d["doc_id"] for d in docs) == sorted(clean_doc_ids.values())


def test_padding_after_the_last_member_is_not_an_error(tmp_path, warc_bytes, head_slice, clean_doc_ids):
    source = write_file(
        tmp_path / "padded.warc.gz", b"".join(member_bytes(warc_bytes, m) for m in head_slice) + bytes(512)
    )
    result, docs, _ = run_ingest(source, tmp_path)
    assert not result.stats["quarantined"] and len(docs) == len(clean_doc_ids)


def test_truncated_file(tmp_path, warc_bytes, head_slice, clean_doc_ids):
    last = max(i for i, m in enumerate(head_slice) if m.rec_type == "response")
    data = b"".join(member_bytes(warc_bytes, m) for m in head_slice[: last + 1])
    cut = head_slice[last].offset + head_slice[last].length // 2
    source = write_file(tmp_path / "truncated.warc.gz", data[:cut])
    result, docs, rejects = run_ingest(source, tmp_path)
    accounted(result)
    assert [r["rule"] for r in rejects if r["kind"] == "quarantined"] == ["truncated_record"]
    assert {d["source_offset"] for d in docs} == set(clean_doc_ids) - {head_slice[last].offset}


@pytest.mark.parametrize("delta", [+500, -300])
def test_wrong_content_length(tmp_path, warc_bytes, head_slice, clean_doc_ids, delta):
    target = next(
        i for i, m in enumerate(head_slice) if m.rec_type == "response" and m.status == "200" and i > 30
    )

    def edit(record: bytes) -> bytes:
        head, sep, rest = record.partition(b"\r\n\r\n")
        lines = [
            b"Content-Length: %d" % (int(line.split(b":")[1]) + delta)
            if line.startswith(b"Content-Length:")
            else line
            for line in head.split(b"\r\n")
        ]
        return b"\r\n".join(lines) + sep + rest

    bad = regzip_member(member_bytes(warc_bytes, head_slice[target]), edit)
    source = write_file(tmp_path / "length.warc.gz", _splice(warc_bytes, head_slice, target, bad))
    result, docs, rejects = run_ingest(source, tmp_path)
    accounted(result)
    quarantined = [r for r in rejects if r["kind"] == "quarantined"]
    expected_rule = "truncated_record" if delta > 0 else "record_length_mismatch"
    assert [(r["rule"], r["url"]) for r in quarantined] == [(expected_rule, head_slice[target].url)]
    # offsets move after the re-compressed member; the documents themselves are all there
    assert sorted(d["doc_id"] for d in docs) == sorted(
        d for o, d in clean_doc_ids.items() if o != head_slice[target].offset
    )


def test_latin1_bytes_declared_utf8(tmp_path, members):
    template = first_response(members, lambda m: m.status == "200")
    page = "<html><body><p>Le café était déjà prêt, à côté de la fenêtre où l'été brûlait.</p></body></html>"
    member = response_member(template, page.encode("latin-1"), [("Content-Type", "text/html; charset=utf-8")])
    source = write_file(tmp_path / "latin1.warc.gz", member)
    _, docs, _ = run_ingest(source, tmp_path)
    assert docs[0]["text"] == "Le café était déjà prêt, à côté de la fenêtre où l'été brûlait."
    assert docs[0]["charset_source"] == "detected" and docs[0]["charset"] != "utf-8"


def test_binary_payload_declared_html(tmp_path, warc_bytes, members):
    png = first_response(members, lambda m: m.content_type == "image/png")
    payload = _http_body(warc_bytes, png)
    assert payload.startswith(b"\x89PNG")
    member = response_member(png, payload, [("Content-Type", "text/html; charset=utf-8")])
    good = member_bytes(warc_bytes, first_response(members, lambda m: m.status == "200"))
    source = write_file(tmp_path / "binary.warc.gz", member + good)
    result, docs, rejects = run_ingest(source, tmp_path)
    assert result.stats["quarantined"] == {"binary_payload": 1} and len(docs) == 1
    assert "PNG" in rejects[0]["detail"]


def test_huge_page_is_dropped_without_reading_it_into_memory(tmp_path, members, warc_bytes):
    template = first_response(members, lambda m: m.status == "200")
    # Text that compresses like real HTML (~2x), not a run of one line that inflates 1000x per block.
    filler = base64.b64encode(random.Random(0).randbytes(23 * 1024 * 1024))
    body = b"<html><body><p>" + filler + b"</p></body></html>"
    assert len(body) > 30 * 1024 * 1024
    huge = response_member(template, body, [("Content-Type", "text/html; charset=utf-8")])
    del body
    good = member_bytes(warc_bytes, first_response(members, lambda m: m.status == "200"))
    source = write_file(tmp_path / "huge.warc.gz", huge + good)
    del huge
    tracemalloc.start()
    try:
        result, docs, rejects = run_ingest(source, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stats["dropped"] == {"payload_too_large": 1} and len(docs) == 1
    assert rejects[0]["rule"] == "payload_too_large" and rejects[0]["url"] == template.url
    assert peak < 8 * 1024 * 1024, f"peak Python memory {peak} bytes while skipping a 30 MB page"


def test_gzip_bomb_content_encoding(tmp_path, members):
    template = first_response(members, lambda m: m.status == "200")
    bomb = gzip.compress(b"<html><body>" + b" " * (40 * 1024 * 1024) + b"</body></html>", compresslevel=9)
    assert len(bomb) < 100_000
    member = response_member(template, bomb, [("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    source = write_file(tmp_path / "bomb.warc.gz", member)
    _, docs, rejects = run_ingest(source, tmp_path, ingest.IngestConfig(max_payload_bytes=1024 * 1024))
    assert docs == [] and rejects[0]["rule"] == "payload_too_large" and "decoded" in rejects[0]["detail"]


@pytest.mark.parametrize("extractor", ex.EXTRACTORS)
def test_deeply_nested_html(tmp_path, members, warc_bytes, extractor):
    template = first_response(members, lambda m: m.status == "200")
    page = b"<html><body>" + b"<div>" * 10_000 + b"<p>deep</p>" + b"</div>" * 10_000 + b"</body></html>"
    deep = response_member(template, page, [("Content-Type", "text/html; charset=utf-8")])
    good = member_bytes(warc_bytes, first_response(members, lambda m: m.status == "200"))
    source = write_file(tmp_path / "deep.warc.gz", deep + good)
    result, docs, rejects = run_ingest(source, tmp_path, ingest.IngestConfig(extractor=extractor))
    assert result.stats["quarantined"] == {"html_too_deep": 1} and len(docs) == 1
    assert "10002 deep" in rejects[0]["detail"]


def test_empty_file_is_quarantined(tmp_path):
    source = write_file(tmp_path / "empty.warc.gz", b"")
    result, docs, rejects = run_ingest(source, tmp_path)
    assert docs == [] and result.stats["quarantined"] == {"empty_file": 1} and result.stats["docs_in"] == 1
    assert rejects[0]["source_file"] == source


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.warc", b"These are my notes.\nNot a WARC file at all.\n" * 50),
        ("notes.warc.gz", gzip.compress(b"These are my notes.\nNot a WARC file at all.\n" * 50)),
        ("zeros.warc.gz", bytes(4096)),
    ],
)
def test_file_that_is_not_warc_is_quarantined(tmp_path, name, content):
    source = write_file(tmp_path / name, content)
    result, docs, rejects = run_ingest(source, tmp_path)
    assert docs == [] and result.stats["quarantined"] == {"not_warc": 1}
    assert "Unknown archive format" in rejects[0]["detail"]


def test_unopenable_file_raises_and_leaves_no_shard(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        ingest.ingest_file(str(tmp_path / "missing.warc.gz"), out, 0)
    assert not out.exists() or list(out.rglob("*")) == []  # not even a temporary file


def test_uncompressed_warc(tmp_path, warc_bytes, head_slice):
    data = b"".join(gzip.decompress(member_bytes(warc_bytes, m)) for m in head_slice[:31])
    source = write_file(tmp_path / "plain.warc", data)
    result, docs, _ = run_ingest(source, tmp_path)
    accounted(result)
    assert result.stats["docs_in"] == 10 and len(docs) >= 8 and not result.stats["quarantined"]
    assert all(data[d["source_offset"] :].startswith(b"WARC/1.0") for d in docs)


def test_uncompressed_warc_with_a_short_content_length_resyncs(tmp_path, warc_bytes, head_slice):
    records = [gzip.decompress(member_bytes(warc_bytes, m)) for m in head_slice[:31]]
    clean = write_file(tmp_path / "clean.warc", b"".join(records))
    _, clean_docs, _ = run_ingest(clean, tmp_path / "clean")
    target = next(i for i, m in enumerate(head_slice[:31]) if m.rec_type == "response" and m.status == "200")
    head, sep, rest = records[target].partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    records[target] = (
        head.replace(b"Content-Length: %d" % length, b"Content-Length: %d" % (length - 700)) + sep + rest
    )
    source = write_file(tmp_path / "short.warc", b"".join(records))
    result, docs, rejects = run_ingest(source, tmp_path)
    accounted(result)
    assert [r["rule"] for r in rejects if r["kind"] == "quarantined"] == ["record_length_mismatch"]
    assert [d["doc_id"] for d in docs] == [
        d["doc_id"] for d in clean_docs if d["url"] != head_slice[target].url
    ]


# ---------------------------------------------------------------------------------------------
# Finding crawl files; the dataset a flow finalizes


def _local(*snapshots_and_kinds: tuple[str, str]) -> list[str]:
    return [str(p) for snapshot, kind in snapshots_and_kinds for p in snapshot_files(snapshot, kind)]


def test_resolve_crawl_root(crawl):
    root = str(crawl)
    assert ingest.resolve_crawl(root, ["CC-MAIN-2026-40"], ["warc"], None) == {
        "CC-MAIN-2026-40": _local(("CC-MAIN-2026-40", "warc"))
    }
    everything = ingest.resolve_crawl(root, [], ["warc", "wet"], None)
    assert everything == {
        "CC-MAIN-2026-40": _local(("CC-MAIN-2026-40", "warc"), ("CC-MAIN-2026-40", "wet")),
        "CC-MAIN-2026-44": _local(("CC-MAIN-2026-44", "warc")),
    }
    assert sum(map(len, everything.values())) == 7 + 3
    # Snapshots in the order given (oldest first is the caller's call); max_files per snapshot.
    picked = ingest.resolve_crawl(root + "/", ["CC-MAIN-2026-44", "CC-MAIN-2026-40"], ["warc", "wet"], 2)
    assert list(picked) == ["CC-MAIN-2026-44", "CC-MAIN-2026-40"]
    assert (
        picked["CC-MAIN-2026-40"] == everything["CC-MAIN-2026-40"][:2] and len(picked["CC-MAIN-2026-44"]) == 2
    )
    # A snapshot without files of the kinds asked for is left out, unless it was asked for.
    assert list(ingest.resolve_crawl(root, [], ["wet"], None)) == ["CC-MAIN-2026-40"]
    with pytest.raises(ingest.CrawlInputError, match="no wet files of snapshot CC-MAIN-2026-44"):
        ingest.resolve_crawl(root, ["CC-MAIN-2026-44"], ["wet"], None)
    with pytest.raises(ingest.CrawlInputError, match="snapshot CC-MAIN-1999-01"):
        ingest.resolve_crawl(root, ["CC-MAIN-1999-01"], ["warc", "wet"], None)


def test_resolve_crawl_listing_glob_and_file(crawl):
    root = str(crawl)
    listing = f"{root}/crawl-data/{SNAPSHOT}/warc.paths.gz"
    assert ingest.resolve_crawl(listing, [], ["warc", "wet"], None) == {SNAPSHOT: _local((SNAPSHOT, "warc"))}
    assert ingest.resolve_crawl(listing, [], ["warc"], 1) == {SNAPSHOT: _local((SNAPSHOT, "warc"))[:1]}

    every_file = f"{root}/crawl-data/*/segments/*/*/*.gz"
    assert ingest.resolve_crawl(every_file, [], ["warc", "wet"], None) == {
        "CC-MAIN-2026-40": sorted(_local(("CC-MAIN-2026-40", "warc"), ("CC-MAIN-2026-40", "wet"))),
        "CC-MAIN-2026-44": sorted(_local(("CC-MAIN-2026-44", "warc"))),
    }
    assert ingest.resolve_crawl(every_file, ["CC-MAIN-2026-40"], ["wet"], None) == {
        "CC-MAIN-2026-40": sorted(_local(("CC-MAIN-2026-40", "wet")))
    }

    single = _local((SNAPSHOT, "warc"))[0]
    assert ingest.resolve_crawl(single, [], ["warc", "wet"], None) == {SNAPSHOT: [single]}
    with pytest.raises(ingest.CrawlInputError, match="no wet crawl files found"):
        ingest.resolve_crawl(single, [], ["wet"], None)


def test_resolve_crawl_files_outside_a_crawl_layout(crawl, tmp_path):
    # Copies under names that carry no snapshot: one snapshot, UNNAMED_SNAPSHOT, whatever the form.
    sources = _local((SNAPSHOT, "warc"))[:2]
    for i, source in enumerate(sources):
        (tmp_path / f"pages-{i}.warc.gz").write_bytes(Path(source).read_bytes())
    (tmp_path / "notes.txt").write_text("not a crawl file\n")
    copies = [str(tmp_path / "pages-0.warc.gz"), str(tmp_path / "pages-1.warc.gz")]
    assert ingest.resolve_crawl(copies[0], [], ["warc", "wet"], None) == {ingest.UNNAMED_SNAPSHOT: copies[:1]}
    assert ingest.resolve_crawl(f"{tmp_path}/*", [], ["warc", "wet"], None) == {
        ingest.UNNAMED_SNAPSHOT: copies
    }
    # A snapshot directory without crawl-data/ above it still names its snapshot.
    (tmp_path / "CC-MAIN-2026-52").mkdir()
    (tmp_path / "CC-MAIN-2026-52" / "x.warc.gz").write_bytes(Path(sources[0]).read_bytes())
    assert ingest.resolve_crawl(f"{tmp_path}/*/*.warc.gz", [], ["warc"], None) == {
        "CC-MAIN-2026-52": [str(tmp_path / "CC-MAIN-2026-52" / "x.warc.gz")]
    }


@pytest.mark.parametrize(
    ("crawl", "message"),
    [
        ("{tmp}/missing", r"^crawl .*/missing does not exist$"),
        ("{tmp}/missing.warc.gz", r"^crawl file .*/missing\.warc\.gz does not exist$"),
        ("{tmp}/crawl-data/X/warc.paths.gz", r"^crawl listing .* does not exist$"),
        ("{tmp}/nothing-*.warc.gz", r"^no crawl files \(.*\) match .*nothing-\*\.warc\.gz$"),
        (
            "{tmp}",
            r"^.* is not a crawl root \(no crawl-data/.*a \*\.paths\.gz listing, a glob or a crawl file",
        ),
        ("{tmp}/notes.txt", r"is not a crawl root"),
        ("{tmp}/bad.paths.gz", r"^cannot read crawl .*bad\.paths\.gz: BadGzipFile: "),
    ],
)
def test_resolve_crawl_errors_in_one_line(tmp_path, crawl, message):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "bad.paths.gz").write_bytes(b"not gzip")
    with pytest.raises(ingest.CrawlInputError, match=message) as error:
        ingest.resolve_crawl(crawl.format(tmp=tmp_path), [], ["warc", "wet"], None)
    assert "\n" not in str(error.value)


def test_resolve_crawl_unreachable_url_in_one_line():
    with pytest.raises(
        ingest.CrawlInputError, match=r"^cannot read crawl http://127\.0\.0\.1:9/a\.warc\.gz: "
    ):
        ingest.resolve_crawl(f"http://127.0.0.1:{9}/a.warc.gz", [], ["warc"], None)


def test_snapshot_of():
    assert ingest.snapshot_of("s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/1/warc/a.warc.gz") == (
        "CC-MAIN-2024-10"
    )
    assert ingest.snapshot_of("crawl-data/my-crawl/warc.paths.gz") == "my-crawl"
    assert ingest.snapshot_of("/mirror/CC-MAIN-2024-10/a.warc.gz") == "CC-MAIN-2024-10"
    assert ingest.snapshot_of("/data/CC-MAIN-20261026024137-20261026054137-00000.warc.gz") is None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_url_is_streamed(tmp_path, warc_bytes, head_slice):
    write_file(tmp_path / "slice.warc.gz", warc_bytes, head_slice[:31])
    handler = partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/slice.warc.gz"
        assert ingest.resolve_crawl(url, [], ["warc"], None) == {ingest.UNNAMED_SNAPSHOT: [url]}
        stats = st.StageStats(ingest.STAGE)
        remote = list(ingest.iter_documents(url, ingest.IngestConfig(), stats, snapshot=SNAPSHOT))
    finally:
        server.shutdown()
    local = list(
        ingest.iter_documents(str(tmp_path / "slice.warc.gz"), ingest.IngestConfig(), st.StageStats("x"))
    )
    assert [d["doc_id"] for d in remote] == [d["doc_id"] for d in local] and len(remote) >= 8
    assert remote[0]["source_file"] == url


def test_crawl_root_over_http(crawl):
    handler = partial(QuietHandler, directory=str(crawl))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = f"http://127.0.0.1:{server.server_port}"
        urls = ingest.resolve_crawl(root, ["CC-MAIN-2026-40"], ["wet"], None)["CC-MAIN-2026-40"]
        everything = ingest.resolve_crawl(root, [], ["warc", "wet"], None)  # http.server lists directories
        listing = ingest.resolve_crawl(f"{root}/crawl-data/CC-MAIN-2026-40/wet.paths.gz", [], ["wet"], None)
        with pytest.raises(ingest.CrawlInputError, match="no warc/wet files of snapshot CC-MAIN-1999-01"):
            ingest.resolve_crawl(root, ["CC-MAIN-1999-01"], ["warc", "wet"], None)
        with pytest.raises(
            ingest.CrawlInputError, match=r"^crawl file http.*/missing\.warc\.gz does not exist$"
        ):
            ingest.resolve_crawl(f"{root}/missing.warc.gz", [], ["warc"], None)
    finally:
        server.shutdown()
    local = snapshot_files("CC-MAIN-2026-40", "wet")
    assert urls == [f"{root}/{p.relative_to(crawl)}" for p in local]
    assert listing == {"CC-MAIN-2026-40": urls}
    assert list(everything) == ["CC-MAIN-2026-40", "CC-MAIN-2026-44"]
    assert sum(map(len, everything.values())) == 10 and set(urls) < set(everything["CC-MAIN-2026-40"])


def test_finalized_dataset(tmp_path, warc_bytes, head_slice):
    sources = [
        write_file(tmp_path / "a.warc.gz", warc_bytes, head_slice[:61]),
        write_file(tmp_path / "b.warc.gz", b"not a warc"),
    ]
    out = tmp_path / "ingested"
    config = ingest.IngestConfig()
    results = [ingest.ingest_file(s, out, i, config, snapshot=SNAPSHOT) for i, s in enumerate(sources)]
    manifest = st.finalize_dataset(
        out, ingest.STAGE, results, ingest.INGEST_SCHEMA, config, ingest.code_version(), []
    )
    assert ds.verify(out).rows == manifest.rows == results[0].stats["kept"]
    assert manifest.stats["quarantined"] == {"not_warc": 1}
    assert manifest.stats["docs_in"] == 21
    assert [f["name"] for f in manifest.schema_][-2:] == ["wet_language", "charset_source"]
    assert len(ingest.code_version()) == 16


def test_zlib_resync_ignores_magic_bytes_inside_compressed_data():
    """A false gzip magic inside a member is not taken as the start of a record."""
    fake = b"\x1f\x8b\x08" + zlib.compress(b"garbage")
    real = gzip.compress(b"WARC/1.0\r\n")
    data = b"xx" + fake + real
    assert ingest._resync_offset(io.BytesIO(data), 1, compressed=True) == 2 + len(fake)
