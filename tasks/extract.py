"""HTML payload -> main text: decide what is HTML, decode the bytes, extract the main content.

Three small steps, each a function the ingest stage calls in order:

- ``is_html(content_type, payload)``: the HTTP ``Content-Type`` decides; only when it is missing do
  we sniff the first bytes (DataTrove trusts ``WARC-Identified-Payload-Type``/libmagic instead and
  skips most HTML of our sample crawl).
- ``decode_html(payload, header_charset)``: charset from the HTTP header, then the page's
  ``<meta>``, each only if the bytes really decode with it; then detection (uchardet).
- ``extract_text(html, extractor)``: resiliparse (default, measured winner, see
  benchmarks/RESULTS.md "Ingest: HTML extraction") or trafilatura.
"""

from __future__ import annotations

import codecs
import re
from typing import Literal

import trafilatura
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import detect_encoding
from resiliparse.parse.html import HTMLTree

Extractor = Literal["resiliparse", "trafilatura"]
EXTRACTORS: tuple[str, ...] = ("resiliparse", "trafilatura")

HTML_MIME_TYPES = frozenset({"text/html", "application/xhtml+xml"})

# Where <meta charset> must appear (HTML spec: within the first 1024 bytes; real pages are sloppier).
_META_SCAN_BYTES = 4096
_DETECT_BYTES = 65536
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_HTML_SNIFF = re.compile(
    rb"^\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body|title|meta|div|p)\b", re.I | re.S
)
_BINARY_SIGNATURES = (
    b"\x89PNG",
    b"GIF8",
    b"\xff\xd8\xff",
    b"%PDF",
    b"PK\x03\x04",
    b"\x1f\x8b",
    b"RIFF",
    b"\x00\x00\x01\x00",
    b"wOFF",
    b"wOF2",
)


def mime_type(content_type: str | None) -> str | None:
    """``text/html; charset=UTF-8`` -> ``text/html``; None when there is no usable header."""
    if not content_type:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime or None


def header_charset(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a Content-Type header, if any."""
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return None


def sniff_html(payload: bytes) -> bool:
    """Fallback for a response without Content-Type: does the payload start like an HTML document?"""
    head = payload[:1024].lstrip(b"\xef\xbb\xbf")
    return bool(_HTML_SNIFF.match(head))


def is_html(content_type: str | None, payload: bytes) -> bool:
    mime = mime_type(content_type)
    if mime is not None:
        return mime in HTML_MIME_TYPES
    return sniff_html(payload)


def binary_signature(payload: bytes) -> str | None:
    """Why a payload labelled as text is really binary (magic number or NUL bytes), else None."""
    head = payload[:1024]
    for signature in _BINARY_SIGNATURES:
        if head.startswith(signature):
            return f"starts with {signature!r}"
    # UTF-16/32 text holds NUL bytes but starts with a BOM.
    if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "NUL bytes in the first 1 KiB"
    return None


# Elements whose end tag may be omitted (or that have none): they would inflate a depth estimate.
_NO_DEPTH_TAGS = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
        "p",
        "li",
        "dt",
        "dd",
        "tr",
        "td",
        "th",
        "option",
        "optgroup",
        "colgroup",
        "thead",
        "tbody",
        "tfoot",
        "rb",
        "rt",
        "rtc",
        "rp",
        "caption",
    ]
)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)[^>]*?(/?)>")


def nesting_depth(html: str, limit: int) -> int:
    """Estimate of the deepest element nesting, exact enough to refuse pathological pages.

    resiliparse's main-content pass is quadratic in nesting depth (10k nested divs: 3 s, 30k: a
    minute), so deep pages are refused before extraction. Depth cannot exceed the number of tags,
    hence pages with fewer than ``limit`` tags are not scanned at all.
    """
    if html.count("<") <= limit:
        return 0
    depth = deepest = 0
    for closing, name, self_closing in _TAG.findall(html):
        if self_closing or name.lower() in _NO_DEPTH_TAGS:
            continue
        if closing:
            depth = max(depth - 1, 0)
        else:
            depth += 1
            deepest = max(deepest, depth)
    return deepest


def _codec(name: str | None) -> str | None:
    """Python codec name for a charset label, or None if unknown."""
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().lower()).name
    except LookupError:
        return None


def decode_html(payload: bytes, declared: str | None = None) -> tuple[str, str, str]:
    """Decode an HTML payload; returns (text, charset, where the charset came from).

    A declared charset (HTTP header, then ``<meta>``) is used only when the payload decodes with it
    without errors: a page served as UTF-8 that is really Latin-1 goes to detection instead of
    becoming mojibake. Sources: ``bom``, ``header``, ``meta``, ``detected``.

    Detection is uchardet (through resiliparse), not charset-normalizer: on short pages
    charset-normalizer named mac_latin2 for Latin-1 French and shift_jis_2004 for KOI8-R Russian
    (tests/test_extract.py::test_detection_of_undeclared_charsets), uchardet got them right.
    """
    if payload.startswith(codecs.BOM_UTF8):
        return payload[3:].decode("utf-8", errors="replace"), "utf-8", "bom"
    meta = _META_CHARSET.search(payload[:_META_SCAN_BYTES])
    candidates = [(declared, "header"), (meta.group(1).decode("ascii", "replace") if meta else None, "meta")]
    for label, source in candidates:
        codec = _codec(label)
        if codec is None:
            continue
        # Browsers read a declared latin-1/ascii as windows-1252 (WHATWG encoding standard).
        if codec in ("iso8859-1", "ascii"):
            codec = "cp1252"
        try:
            return payload.decode(codec), codec, source
        except (UnicodeDecodeError, LookupError):
            continue
    try:
        return payload.decode("utf-8"), "utf-8", "detected"
    except UnicodeDecodeError:
        pass
    codec = _codec(detect_encoding(payload, max_len=_DETECT_BYTES)) or "cp1252"
    return payload.decode(codec, errors="replace"), codec, "detected"


def _resiliparse(html: str) -> str:
    tree = HTMLTree.parse(html)
    return extract_plain_text(
        tree,
        preserve_formatting=True,
        main_content=True,
        list_bullets=True,
        alt_texts=False,
        links=False,
        form_fields=False,
        noscript=False,
    )


def _trafilatura(html: str) -> str:
    # FineWeb's settings (DataTrove's Trafilatura extractor), without the cross-document dedup cache
    # that would make a document's text depend on which pages came before it in the shard.
    text = trafilatura.extract(html, favor_precision=True, include_comments=False, deduplicate=False)
    return text or ""


_EXTRACT = {"resiliparse": _resiliparse, "trafilatura": _trafilatura}


def extract_text(html: str, extractor: Extractor = "resiliparse") -> str:
    """Main text of an HTML page, stripped; "" when the extractor finds none."""
    return _EXTRACT[extractor](html).strip()
