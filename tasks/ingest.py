"""Crawl ingestion: Common Crawl WARC/WET files -> documents with provenance (the first stage).

One crawl file becomes one dataset shard (``part-<index>.parquet``) plus its rejects. For every
WARC record that could be a document (response, revisit, resource, WET conversion) exactly one of
three things happens, so ``docs_in == kept + dropped + quarantined`` holds per file:

- kept: an HTML page with status 200 whose main text is not empty, or a WET text record;
- dropped (a rule said no): ``redirect``, ``http_status_<code>``, ``not_html``, ``revisit``,
  ``payload_too_large``, ``empty_text``;
- quarantined (the input is broken): ``corrupt_gzip``, ``corrupt_record``, ``truncated_record``,
  ``record_length_mismatch``, ``bad_http_headers``, ``bad_content_encoding``, ``binary_payload``,
  ``html_too_deep``, ``extract_error``, and for a whole file ``empty_file`` / ``not_warc``.

Request, metadata and warcinfo records are not documents; they are counted in
``stats.extra["records_<type>"]`` only.

Error policy: a file whose *content* is unusable (empty, not WARC, corrupt everywhere) becomes a
quarantine record, so one bad file among thousands does not stop a crawl; a file that cannot be
*opened* (missing, no permission, network down) raises, so the task fails loudly and is retried.
After a corrupt gzip member the reader resyncs at the next member that starts a WARC record (Common
Crawl writes one member per record), so every good record of a damaged file is still read.
Uncompressed ``.warc`` files resync at the next line starting with ``WARC/1.``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import re
import sys
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

import fsspec
import pyarrow as pa
from fsspec.core import url_to_fs
from pydantic import BaseModel, Field
from warcio.bufferedreaders import ChunkedDataReader
from warcio.recordloader import ArcWarcRecordLoader
from warcio.statusandheaders import StatusAndHeaders

from tasks import dataset as ds
from tasks import extract as ex
from tasks import stage as st

STAGE = "ingest"

# Ingest's extra columns, after the contract's DOCUMENT_SCHEMA.
INGEST_SCHEMA = ds.DOCUMENT_SCHEMA.append(
    pa.field("wet_language", pa.string())  # WARC-Identified-Content-Language of WET records
).append(pa.field("charset_source", pa.string()))  # bom / header / meta / detected

CRAWL_FILE_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc.gz")
UNNAMED_SNAPSHOT = "unnamed"  # the snapshot of crawl files whose path names none
DOCUMENT_RECORD_TYPES = frozenset({"response", "revisit", "resource", "conversion"})
_SNAPSHOT = re.compile(r"CC-MAIN-\d{4}-\d{2}(?![0-9])")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_SCAN_BLOCK = 1 << 20
_READ_BLOCK = 1 << 16
_MAX_LINE = 1 << 16


class IngestConfig(BaseModel):
    """Settings of the ingest stage (the run form shows these)."""

    extractor: ex.Extractor = Field(
        "resiliparse",
        description="HTML main-text extractor: resiliparse (default: ~13x faster, same or better F1 on the "
        "sample crawl, see benchmarks/RESULTS.md) or trafilatura (FineWeb's choice).",
    )
    fallback_extractor: ex.Extractor | None = Field(
        "trafilatura",
        description="Run on the pages where the extractor finds no text (resiliparse's main-content "
        "rules drop a few whole pages, e.g. Django's ref/models/relations.html); None: no second try.",
    )
    max_payload_bytes: int = Field(
        10 * 1024 * 1024,
        gt=0,
        description="Larger HTTP payloads (as stored, and again after decompression) are dropped as "
        "payload_too_large without being read into memory.",
    )
    min_text_chars: int = Field(
        1, ge=1, description="Pages whose extracted text is shorter are dropped as empty_text."
    )
    max_records_per_file: int | None = Field(
        None,
        ge=1,
        description="Read at most this many document records of each file (trial runs, tests); empty: all.",
    )
    max_html_depth: int = Field(
        5000,
        gt=0,
        description="Pages nested deeper are quarantined as html_too_deep (main-content extraction "
        "is quadratic in depth: ~0.75 s at 5000, 3 s at 10,000). Pages with fewer tags than this "
        "are not scanned for depth at all.",
    )


def code_version() -> str:
    """Version of the ingest code: this module and every project module it imports (extractor, contract)."""
    return st.code_version(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
# Finding crawl files


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _full_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _read_listing(fs: fsspec.AbstractFileSystem, listing: str, root: str) -> list[str]:
    """Lines of a ``*.paths.gz`` listing, as paths under the crawl ``root``."""
    with fs.open(listing, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [_full_path(fs, f"{root}/{line.strip()}") for line in lines if line.strip()]


class CrawlInputError(ValueError):
    """``--crawl`` names nothing ingest can read; the message is one line for the user."""


def resolve_crawl(
    crawl: str, snapshots: list[str], kinds: list[str], max_files: int | None
) -> dict[str, list[str]]:
    """The crawl files to ingest, per snapshot in processing order (the one resolver of ``--crawl``).

    ``crawl`` is any of, as a local path or an ``http(s)://`` / ``s3://`` URL:

    - a crawl root holding ``crawl-data/<SNAPSHOT>/<kind>.paths.gz``: ``snapshots`` picks them, in
      the order given; empty: every snapshot under ``crawl-data/`` in name order (needs a file
      system that lists directories: local, s3, or an HTTP server with directory pages);
    - a ``*.paths.gz`` listing: one snapshot, the one its path names (below);
    - a glob of crawl files, or a single ``.warc[.gz]`` / ``.wet[.gz]`` / ``.arc.gz`` file: each file
      in the snapshot its path names.

    A path names a snapshot by a ``crawl-data/<SNAPSHOT>/`` segment or a ``CC-MAIN-YYYY-WW`` part
    (``snapshot_of``); files whose path names none are in the snapshot ``UNNAMED_SNAPSHOT``. With a
    listing, glob or file, non-empty ``snapshots`` keeps only those. ``kinds`` (``warc``, ``wet``)
    selects a root's listings and, for the other forms, the files by name. ``max_files`` keeps the
    first files of each snapshot. Raises CrawlInputError when ``crawl`` is none of these, names no
    file, or cannot be read.
    """
    from aiohttp import ClientError as HTTPError  # the errors of fsspec's http and s3 back ends
    from botocore.exceptions import BotoCoreError, NoCredentialsError

    try:
        found = _resolve(crawl, snapshots, kinds)
    except (OSError, UnicodeDecodeError, HTTPError, BotoCoreError) as e:
        hint = " (a public bucket such as s3://commoncrawl: set FSSPEC_S3_ANON=true)"
        raise CrawlInputError(
            f"cannot read crawl {crawl}: {type(e).__name__}: {e}"
            + (hint if isinstance(e, NoCredentialsError) else "")
        ) from e
    if snapshots:
        missing = [s for s in snapshots if not found.get(s)]
        if missing:
            raise CrawlInputError(
                f"{crawl}: no {'/'.join(kinds)} files of snapshot {', '.join(missing)} "
                f"(found: {', '.join(found) or 'none'})"
            )
        found = {s: found[s] for s in snapshots}
    found = {s: files[:max_files] if max_files else files for s, files in found.items() if files}
    if not found:
        raise CrawlInputError(f"{crawl}: no {'/'.join(kinds)} crawl files found")
    return found


def _resolve(crawl: str, snapshots: list[str], kinds: list[str]) -> dict[str, list[str]]:
    fs, root = url_to_fs(crawl)
    root = root.rstrip("/")
    is_url = crawl.startswith(("http://", "https://"))  # "?" starts a query there, not a glob
    if not is_url and glob.has_magic(crawl):
        paths = sorted(p for p in fs.glob(root) if p.endswith(CRAWL_FILE_SUFFIXES) and not fs.isdir(p))
        if not paths:
            raise CrawlInputError(f"no crawl files ({', '.join(CRAWL_FILE_SUFFIXES)}) match {crawl}")
        return _by_snapshot([_full_path(fs, p) for p in paths], kinds)
    if root.endswith(".paths.gz"):
        if not _exists(fs, root):
            raise CrawlInputError(f"crawl listing {crawl} does not exist")
        crawl_root = root.split("/crawl-data/")[0] if "/crawl-data/" in root else root.rsplit("/", 1)[0]
        return {snapshot_of(crawl) or UNNAMED_SNAPSHOT: _of_kinds(_read_listing(fs, root, crawl_root), kinds)}
    if root.endswith(CRAWL_FILE_SUFFIXES):
        if not _exists(fs, root):
            raise CrawlInputError(f"crawl file {crawl} does not exist")
        return _by_snapshot([crawl], kinds)
    if not snapshots:
        if not fs.isdir(f"{root}/crawl-data"):
            raise CrawlInputError(_not_a_crawl(crawl, fs, root))
        snapshots = sorted(Path(p.rstrip("/")).name for p in fs.ls(f"{root}/crawl-data", detail=False))
    elif _is_local(fs) and not fs.isdir(f"{root}/crawl-data"):
        raise CrawlInputError(_not_a_crawl(crawl, fs, root))
    found: dict[str, list[str]] = {}
    for snap in snapshots:
        listings = [f"{root}/crawl-data/{snap}/{kind}.paths.gz" for kind in kinds]
        found[snap] = [
            f for listing in listings if _exists(fs, listing) for f in _read_listing(fs, listing, root)
        ]
    return found


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Like ``fs.exists``, but an unreachable server raises instead of reading as "missing"."""
    try:
        fs.info(path)
    except FileNotFoundError as e:
        # fsspec's http back end reports every failure as FileNotFoundError, the real one as its
        # cause: a connection error or timeout (OSError) is not a missing file.
        if isinstance(e.__cause__, OSError) and not isinstance(e.__cause__, FileNotFoundError):
            raise e.__cause__ from None
        return False
    return True


def _not_a_crawl(crawl: str, fs: fsspec.AbstractFileSystem, root: str) -> str:
    if not _exists(fs, root):
        return f"crawl {crawl} does not exist"
    suffixes = ", ".join(CRAWL_FILE_SUFFIXES)
    return (
        f"{crawl} is not a crawl root (no crawl-data/; over HTTP name the snapshots), a *.paths.gz "
        f"listing, a glob or a crawl file ({suffixes})"
    )


def _of_kinds(files: list[str], kinds: list[str]) -> list[str]:
    """The files of ``kinds`` by name: WET files end in ``.wet`` or ``.wet.gz``, WARC/ARC the others."""
    return [f for f in files if ("wet" if f.endswith((".wet", ".wet.gz")) else "warc") in kinds]


def _by_snapshot(files: list[str], kinds: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in _of_kinds(files, kinds):
        found.setdefault(snapshot_of(f) or UNNAMED_SNAPSHOT, []).append(f)
    return dict(sorted(found.items()))


_CRAWL_DATA_SEGMENT = re.compile(r"(?:^|/)crawl-data/([^/]+)/")


def snapshot_of(source: str) -> str | None:
    """The snapshot a path names: its ``crawl-data/<SNAPSHOT>/`` segment, else a ``CC-MAIN-YYYY-WW`` in it."""
    if match := _CRAWL_DATA_SEGMENT.search(source):
        return match.group(1)
    match = _SNAPSHOT.search(source)
    return match.group(0) if match else None


# ---------------------------------------------------------------------------------------------
# Reading WARC records, resyncing after damage
#
# warcio's ArchiveIterator is not used for gzip files: when a member fails to inflate midway it
# prints the zlib error to stderr and reads nothing more, silently losing the rest of the file.
# Here zlib inflates each member directly, in bounded blocks, and warcio's record loader parses
# the record inside; a member that does not inflate is quarantined and reading goes on at the
# next member that starts a WARC record.


@dataclass
class RawRecord:
    """A WARC record as read: headers, the HTTP body as stored (not yet dechunked or decompressed)."""

    rec_type: str
    offset: int
    rec_headers: StatusAndHeaders
    http_headers: StatusAndHeaders | None
    payload: bytes | None  # None: not read (not a document record, or over max_payload_bytes)
    length: int  # the record's Content-Length
    problem: tuple[str, str] | None = None  # (rule, detail) when the record itself is broken


@dataclass
class ReadError:
    """Bytes of the file that could not be read as WARC records, from ``offset`` on."""

    offset: int
    rule: str
    detail: str


class _GzipMember(io.RawIOBase):
    """The inflated bytes of the gzip member that starts at ``start`` in ``f``, in bounded blocks."""

    def __init__(self, f: IO[bytes], start: int):
        f.seek(start)
        self._f = f
        self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self._input = b""
        self._read_to = start  # offset in f up to which compressed bytes have been read
        self.end: int | None = None  # offset just after the member, once it is inflated to its end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.end is None:
            if not self._input:
                self._input = self._f.read(_READ_BLOCK)
                self._read_to += len(self._input)
                if not self._input:
                    return 0  # the file ends inside the member (truncated)
            out = self._inflater.decompress(self._input, len(buffer))
            self._input = self._inflater.unconsumed_tail
            if self._inflater.eof:  # the CRC was checked too
                self.end = self._read_to - len(self._inflater.unused_data)
            if out:
                buffer[: len(out)] = out
                return len(out)
        return 0


@dataclass
class _Cursor:
    offset: int = 0  # where the record being read starts (its gzip member, for gzip files)
    records: int = 0


def _next_line(stream: IO[bytes]) -> bytes:
    """The next non-blank line (the first line of the next record), or b"" at the end."""
    while True:
        line = stream.readline(_MAX_LINE)
        if not line or line.strip():
            return line


def _drain(stream: IO[bytes]) -> None:
    while stream.read(_READ_BLOCK):
        pass


def _read_record(record: Any, offset: int, max_payload_bytes: int) -> RawRecord:
    length = record.rec_headers.get_header("Content-Length")
    if length is None or not length.strip().isdigit():
        raise ValueError(f"WARC record without a valid Content-Length ({length!r})")
    raw = RawRecord(
        rec_type=record.rec_type,
        offset=offset,
        rec_headers=record.rec_headers,
        http_headers=record.http_headers,
        payload=None,
        length=int(length),
    )
    if record.rec_type in DOCUMENT_RECORD_TYPES and raw.length <= max_payload_bytes:
        raw.payload = record.raw_stream.read()
        if record.raw_stream.limit > 0:
            raw.problem = (
                "truncated_record",
                f"Content-Length {raw.length} but the record ends {record.raw_stream.limit} bytes early "
                "(truncated file, or a Content-Length larger than the record)",
            )
    _drain(record.raw_stream)  # skips bodies not read, in blocks
    return raw


def _records(
    stream: IO[bytes], compressed: bool, cursor: _Cursor, max_payload_bytes: int
) -> Generator[RawRecord, None, bool]:
    """Records of one gzip member (usually one) or of an uncompressed file.

    Returns True when the stream was left in the middle of damaged bytes (uncompressed files
    only: the caller resyncs). A record is yielded only once the bytes after it were read, so a
    bad gzip CRC or a wrong Content-Length is known before the record is passed on.
    """
    loader = ArcWarcRecordLoader(verify_http=False, arc2warc=False)
    line = _next_line(stream)
    while line:
        if not compressed:
            cursor.offset = stream.tell() - len(line)
        record = loader.parse_record_stream(stream, statusline=line)
        raw = _read_record(record, cursor.offset, max_payload_bytes)
        line = _next_line(stream)
        cursor.records += 1
        if line and not line.startswith(b"WARC/"):
            raw.problem = raw.problem or (
                "record_length_mismatch",
                f"Content-Length {raw.length} ends before the record does (then {line[:40]!r})",
            )
            if compressed:
                _drain(stream)
            yield raw
            return not compressed
        yield raw
    return False


def _resync_offset(f: IO[bytes], start: int, compressed: bool) -> int | None:
    """Offset of the first gzip member (or uncompressed record) at or after ``start`` that
    begins a WARC record; None if there is none. Candidates are verified by decoding their start,
    since the gzip magic bytes also occur by chance inside compressed data."""
    # Uncompressed records start at a line start; the scan starts past a failed record's start.
    magic = _GZIP_MAGIC if compressed else b"\nWARC/1."
    skip = 0 if compressed else 1
    position = start
    while True:
        f.seek(position)
        block = f.read(_SCAN_BLOCK + len(magic))
        if len(block) < len(magic):
            return None
        index = block.find(magic)
        while index >= 0:
            candidate = position + index + skip
            if not compressed:
                return candidate
            f.seek(candidate)
            try:
                head = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(f.read(4096), 16)
            except zlib.error:
                head = b""
            if head.startswith(b"WARC/"):
                return candidate
            index = block.find(magic, index + 1)
        position += _SCAN_BLOCK


def _only_padding(f: IO[bytes], offset: int) -> bool:
    """Whether the file holds nothing but NUL bytes or white space from ``offset`` to its end."""
    f.seek(offset)
    while block := f.read(_SCAN_BLOCK):
        if block.strip(b"\0 \t\r\n"):
            return False
    return True


def iter_raw_records(f: IO[bytes], max_payload_bytes: int) -> Iterator[RawRecord | ReadError]:
    """Every WARC record of a seekable binary stream, with damaged stretches reported as ReadError.

    Record offsets are those of their gzip member (as in Common Crawl's index) or, uncompressed,
    of the record's first byte.
    """
    head = f.read(3)
    if not head:
        yield ReadError(0, "empty_file", "the file is empty")
        return
    compressed = head.startswith(_GZIP_MAGIC)
    cursor = _Cursor()
    position: int | None = 0
    while position is not None:
        cursor.offset = position
        if compressed:
            member = _GzipMember(f, position)
            stream: IO[bytes] = io.BufferedReader(member, _READ_BLOCK)
        else:
            f.seek(position)
            stream = f
        try:
            damaged = yield from _records(stream, compressed, cursor, max_payload_bytes)
        except Exception as error:
            if cursor.records and _only_padding(f, cursor.offset):
                return
            resync = _resync_offset(f, cursor.offset + 1, compressed)
            if isinstance(error, zlib.error):
                rule = "corrupt_gzip"
            else:
                rule = "not_warc" if cursor.records == 0 and resync is None else "corrupt_record"
            end = f"resynced at byte {resync}" if resync is not None else "no readable record after it"
            yield ReadError(cursor.offset, rule, f"{type(error).__name__}: {str(error)[:200]!r} ({end})")
            position = resync
            continue
        if compressed:
            position = member.end  # None: the file ended inside this member
        else:
            position = _resync_offset(f, cursor.offset + 1, compressed) if damaged else None


# ---------------------------------------------------------------------------------------------
# Records -> documents


def doc_id_of(record_id: str) -> str:
    """Stable id of a document: the same WARC record gives the same id on every run and machine."""
    return hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:32]


# zlib window bits per Content-Encoding: gzip, or zlib-wrapped deflate (raw deflate is retried below).
_CONTENT_ENCODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}


def _inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Decompress a Content-Encoding, stopping after ``max_bytes + 1`` bytes (gzip bombs).

    zlib directly: warcio's decompressing reader prints a mid-stream error and returns what it
    has, which would pass a cut page on as if whole. A body that merely ends early (a truncated
    capture) gives what it holds.
    """
    try:
        return zlib.decompressobj(_CONTENT_ENCODINGS[encoding]).decompress(body, max_bytes + 1)
    except zlib.error:
        if encoding != "deflate":
            raise
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, max_bytes + 1)  # raw deflate


def _decode_body(raw: RawRecord, max_bytes: int) -> bytes:
    """The HTTP body as the server meant it: dechunked and decompressed, at most ``max_bytes + 1``."""
    headers = raw.http_headers
    body = raw.payload or b""
    if headers is None:
        return body
    if (headers.get_header("Transfer-Encoding") or "").strip().lower() == "chunked":
        # warcio dechunks only through record.content_stream(); payloads are read raw here
        body = ChunkedDataReader(io.BytesIO(body)).read()
    encoding = (headers.get_header("Content-Encoding") or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _CONTENT_ENCODINGS:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    return _inflate(body, encoding, max_bytes)


def _text_document(raw: RawRecord, text: str, source: str, snapshot: str | None, **columns: Any) -> dict:
    record_id = raw.rec_headers.get_header("WARC-Record-ID") or f"{source}@{raw.offset}"
    return {
        "doc_id": doc_id_of(record_id),
        "text": text,
        "url": raw.rec_headers.get_header("WARC-Target-URI"),
        "warc_record_id": record_id,
        "date": raw.rec_headers.get_header("WARC-Date"),
        "source_file": source,
        "source_offset": raw.offset,
        "snapshot": snapshot,
        "wet_language": None,
        **columns,
    }


class _Reject(Exception):
    """A record that does not become a document: ``kind`` is "dropped" or "quarantined"."""

    def __init__(self, kind: str, rule: str, detail: str = ""):
        super().__init__(rule)
        self.kind, self.rule, self.detail = kind, rule, detail


def _drop(rule: str, detail: str = "") -> _Reject:
    return _Reject("dropped", rule, detail)


def _quarantine(rule: str, detail: str = "") -> _Reject:
    return _Reject("quarantined", rule, detail)


def _extract(html: str, extractor: ex.Extractor) -> str:
    try:
        return ex.extract_text(html, extractor)
    except Exception as error:  # a parser bug on one page must not stop the file
        raise _quarantine("extract_error", f"{extractor}: {type(error).__name__}: {error}") from error


def main_text(html: str, config: IngestConfig, stats: st.StageStats | None = None) -> str:
    """The page's main text by ``config.extractor``, or by the fallback extractor when too short."""
    text = _extract(html, config.extractor)
    fallback = config.fallback_extractor
    if len(text) < config.min_text_chars and fallback not in (None, config.extractor):
        if stats is not None:
            stats.extra["extract_fallback"] = stats.extra.get("extract_fallback", 0) + 1
        text = _extract(html, fallback)
    return text


def _html_document(
    raw: RawRecord, source: str, snapshot: str | None, config: IngestConfig, stats: st.StageStats
) -> dict:
    if raw.rec_type == "response" and raw.http_headers is None:
        raise _quarantine("bad_http_headers", "response record without HTTP headers")
    if raw.http_headers is not None:
        status = raw.http_headers.get_statuscode() or ""
        if not status.isdigit():
            raise _quarantine("bad_http_headers", f"HTTP status line {raw.http_headers.statusline!r}")
        code = int(status)
        if 300 <= code < 400:
            target = urljoin(
                raw.rec_headers.get_header("WARC-Target-URI") or "",
                raw.http_headers.get_header("Location") or "",
            )
            raise _drop("redirect", f"{code} -> {target}")
        if code != 200:
            raise _drop(f"http_status_{code}")
        content_type = raw.http_headers.get_header("Content-Type")
    else:  # resource record: the WARC header describes the payload
        content_type = raw.rec_headers.get_header("Content-Type")
    mime = ex.mime_type(content_type)
    if mime is not None and mime not in ex.HTML_MIME_TYPES:
        raise _drop("not_html", f"Content-Type {content_type}")
    if raw.payload is None:
        raise _drop("payload_too_large", f"record of {raw.length} bytes > {config.max_payload_bytes}")
    try:
        body = _decode_body(raw, config.max_payload_bytes)
    except Exception as error:
        raise _quarantine("bad_content_encoding", f"{type(error).__name__}: {error}") from error
    if len(body) > config.max_payload_bytes:
        raise _drop("payload_too_large", f"decoded body > {config.max_payload_bytes} bytes")
    if mime is None and not ex.sniff_html(body):
        raise _drop("not_html", "no Content-Type and the payload does not look like HTML")
    binary = ex.binary_signature(body)
    if binary:
        raise _quarantine("binary_payload", f"Content-Type {content_type} but the payload {binary}")
    html, charset, charset_source = ex.decode_html(body, ex.header_charset(content_type))
    stats.extra[f"charset_{charset_source}"] = stats.extra.get(f"charset_{charset_source}", 0) + 1
    depth = ex.nesting_depth(html, config.max_html_depth)
    if depth > config.max_html_depth:
        raise _quarantine("html_too_deep", f"elements nested {depth} deep > {config.max_html_depth}")
    text = main_text(html, config, stats)
    if len(text) < config.min_text_chars:
        raise _drop("empty_text", f"{len(text)} characters of main text")
    return _text_document(
        raw,
        text,
        source,
        snapshot,
        content_type=mime or "text/html",
        charset=charset,
        charset_source=charset_source,
    )


def _wet_document(raw: RawRecord, source: str, snapshot: str | None, config: IngestConfig) -> dict:
    if raw.payload is None:
        raise _drop("payload_too_large", f"record of {raw.length} bytes > {config.max_payload_bytes}")
    content_type = raw.rec_headers.get_header("Content-Type")
    text, charset, charset_source = ex.decode_html(raw.payload, ex.header_charset(content_type))
    text = text.strip()
    if len(text) < config.min_text_chars:
        raise _drop("empty_text", f"{len(text)} characters of text")
    document = _text_document(
        raw,
        text,
        source,
        snapshot,
        content_type=ex.mime_type(content_type) or "text/plain",
        charset=charset,
        charset_source=charset_source,
    )
    document["wet_language"] = raw.rec_headers.get_header("WARC-Identified-Content-Language")
    return document


def _document(
    raw: RawRecord, source: str, snapshot: str | None, config: IngestConfig, stats: st.StageStats
) -> dict:
    if raw.problem is not None:
        raise _quarantine(*raw.problem)
    if raw.rec_type == "revisit":
        raise _drop("revisit", "revisit records carry no payload")
    if raw.rec_type == "conversion":
        return _wet_document(raw, source, snapshot, config)
    return _html_document(raw, source, snapshot, config, stats)


def iter_documents(
    source: str, config: IngestConfig, stats: st.StageStats, snapshot: str | None = None
) -> Iterator[dict]:
    """Documents of one crawl file, with ``stats`` counting every record that could be one.

    ``snapshot`` defaults to the one the file's path names (``snapshot_of``).
    """
    snapshot = snapshot or snapshot_of(source)
    with fsspec.open(source, "rb") as f:
        for item in iter_raw_records(f, config.max_payload_bytes):
            if config.max_records_per_file is not None and stats.docs_in >= config.max_records_per_file:
                break
            if isinstance(item, ReadError):
                stats.docs_in += 1
                stats.quarantine(item.rule, item.detail, source_file=source, source_offset=item.offset)
                continue
            key = f"records_{item.rec_type}"
            stats.extra[key] = stats.extra.get(key, 0) + 1
            if item.rec_type not in DOCUMENT_RECORD_TYPES:
                continue
            stats.docs_in += 1
            try:
                document = _document(item, source, snapshot, config, stats)
            except _Reject as reject:
                record_id = item.rec_headers.get_header("WARC-Record-ID")
                where = {
                    "doc_id": doc_id_of(record_id) if record_id else None,
                    "url": item.rec_headers.get_header("WARC-Target-URI"),
                    "source_file": source,
                    "source_offset": item.offset,
                }
                if reject.kind == "dropped":
                    stats.drop(where, reject.rule, reject.detail)
                else:
                    stats.quarantine(reject.rule, reject.detail, **where)
                continue
            stats.kept += 1
            yield document


def ingest_file(
    source: str,
    output_dir: str | Path,
    index: int,
    config: IngestConfig | None = None,
    snapshot: str | None = None,
) -> st.ShardResult:
    """Ingest one crawl file into ``output_dir/part-<index>.parquet`` and ``rejects/``."""
    config = config or IngestConfig()
    output_dir = Path(output_dir)
    stats = st.StageStats(STAGE)
    with ds.ShardWriter(output_dir / st.shard_name(index), INGEST_SCHEMA) as writer:
        for document in iter_documents(source, config, stats, snapshot):
            writer.write(document)
    stats.check_accounting()
    rejects = st.write_rejects(stats, output_dir, index)
    return st.ShardResult(shard=writer.info, rejects=rejects, stats=stats.to_dict())
