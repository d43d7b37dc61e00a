"""HTML detection, charset decoding and main-text extraction, on real pages of the sample crawl."""

from __future__ import annotations

import codecs
import time

import charset_normalizer
import pytest
from warcio.archiveiterator import ArchiveIterator

from tasks import extract as ex
from tests.conftest import snapshot_files


@pytest.fixture(scope="session")
def pages(crawl) -> dict[str, str]:
    """The first status-200 HTML page of each site in the first 2026-44 WARC file, decoded."""
    found: dict[str, str] = {}
    with open(snapshot_files("CC-MAIN-2026-44")[0], "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response" or record.http_headers.get_statuscode() != "200":
                continue
            content_type = record.http_headers.get_header("Content-Type")
            host = record.rec_headers.get_header("WARC-Target-URI").split("/")[2]
            if ex.mime_type(content_type) == "text/html" and host not in found:
                html, _, _ = ex.decode_html(record.content_stream().read(), ex.header_charset(content_type))
                found[host] = html
            if len(found) == 5:
                return found
    raise AssertionError(f"only found pages of {sorted(found)}")


def test_mime_type_and_charset_parameters():
    assert ex.mime_type("Text/HTML; charset=UTF-8") == "text/html"
    assert ex.mime_type("") is None and ex.mime_type(None) is None
    assert ex.header_charset('text/html; charset="ISO-8859-1"') == "ISO-8859-1"
    assert ex.header_charset("text/html;charset=utf-8") == "utf-8"
    assert ex.header_charset("text/html") is None


def test_content_type_decides_and_sniffing_is_only_a_fallback():
    html = b"<!DOCTYPE html><html><body>x</body></html>"
    assert ex.is_html("text/html", b"plain words")  # the header is trusted
    assert ex.is_html("application/xhtml+xml", html)
    assert not ex.is_html("image/png", html)
    assert not ex.is_html("text/plain", html)
    assert ex.is_html(None, html)
    assert ex.is_html(None, b"\xef\xbb\xbf  <!-- generator --> <html lang=en>")
    assert not ex.is_html(None, b"%PDF-1.7 ...")
    assert not ex.is_html("", b"just text")


def test_binary_signature():
    assert "PNG" in ex.binary_signature(b"\x89PNG\r\n\x1a\n....")
    assert ex.binary_signature(b"<html>\x00\x00</html>") == "NUL bytes in the first 1 KiB"
    assert ex.binary_signature("<html>é</html>".encode("utf-16")) is None  # BOM + NULs: text
    assert ex.binary_signature(b"<html><body>fine</body></html>") is None


@pytest.mark.parametrize(
    ("payload", "declared", "expected"),
    [
        ("<p>naïve café</p>".encode(), "utf-8", ("<p>naïve café</p>", "utf-8", "header")),
        ("<p>naïve café</p>".encode("latin-1"), "ISO-8859-1", ("<p>naïve café</p>", "cp1252", "header")),
        (codecs.BOM_UTF8 + "<p>é</p>".encode(), "latin-1", ("<p>é</p>", "utf-8", "bom")),
        (
            '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r"><p>Привет</p>'.encode(
                "koi8-r"
            ),
            None,
            (
                '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r"><p>Привет</p>',
                "koi8-r",
                "meta",
            ),
        ),
        (
            "<p>plain ascii and ünïcödé</p>".encode(),
            "no-such-charset",
            ("<p>plain ascii and ünïcödé</p>", "utf-8", "detected"),
        ),
    ],
)
def test_decode_html(payload, declared, expected):
    assert ex.decode_html(payload, declared) == expected


def test_wrong_declared_charset_falls_through_to_meta_then_detection():
    page = '<meta charset="utf-8"><p>Größe und Maße, schön: Ärger über Öl</p>'
    text, charset, source = ex.decode_html(page.encode("cp1252"), "utf-8")
    assert (text, source) == (page, "detected") and charset == "cp1252"


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        (
            "<html><body><p>Le café était déjà prêt, à côté de la fenêtre où l'été brûlait.</p></body></html>",
            "latin-1",
        ),
        ("<html><body><p>Привет, как дела? Это тестовая страница.</p></body></html>", "koi8-r"),
        ("<html><body><p>Привет, как дела? Это тестовая страница.</p></body></html>", "cp1251"),
        ("<html><body><p>これは日本語のテストページです。文字コードの検出。</p></body></html>", "shift_jis"),
        ("<html><body><p>这是一个中文测试页面，用于检测字符编码。</p></body></html>", "gb18030"),
    ],
)
def test_detection_of_undeclared_charsets(text, encoding):
    """Why detection is uchardet: charset-normalizer misreads two of these short pages."""
    payload = text.encode(encoding)
    assert ex.decode_html(payload)[0] == text
    if encoding in ("latin-1", "koi8-r"):
        assert str(charset_normalizer.from_bytes(payload).best()) != text


def test_nesting_depth():
    assert ex.nesting_depth("<div>" * 50, limit=100) == 0  # too few tags to be deep: not scanned
    deep = "<html><body>" + "<div><span>" * 3000 + "x" + "</span></div>" * 3000 + "</body></html>"
    assert ex.nesting_depth(deep, limit=1000) == 6002
    # elements without (or with optional) end tags do not count
    flat = "<body>" + "<p>para<br><img src=x><li>item" * 2000 + "</body>"
    assert ex.nesting_depth(flat, limit=1000) == 1


@pytest.mark.parametrize("extractor", ex.EXTRACTORS)
def test_extract_main_text_of_real_pages(pages, extractor):
    python = ex.extract_text(pages["docs.python.example"], extractor)
    assert "distutils" in python.lower()
    assert "Theme" not in python and "Quick search" not in python  # Sphinx sidebar/header controls
    django = ex.extract_text(pages["docs.djangoproject.example"], extractor)
    assert "Django 1.11.23 fixes security issues in 1.11.22." in django
    assert "Django 3.2 documentation" not in django.splitlines()[0]
    for host, html in pages.items():
        text = ex.extract_text(html, extractor)
        assert text == text.strip() and len(text) > 100, host
        assert "<div" not in text and "</p>" not in text, host


@pytest.mark.parametrize("extractor", ex.EXTRACTORS)
def test_moderately_deep_html_is_extracted(extractor):
    """Below max_html_depth both extractors finish quickly and do not crash."""
    page = (
        "<html><body>"
        + "<div>" * 1500
        + "<p>"
        + "deep text " * 20
        + "</p>"
        + "</div>" * 1500
        + "</body></html>"
    )
    start = time.perf_counter()
    text = ex.extract_text(page, extractor)
    assert time.perf_counter() - start < 10
    assert text in ("", ("deep text " * 20).strip())  # trafilatura's lxml gives up on very deep trees


def test_empty_and_script_only_pages_give_empty_text():
    for extractor in ex.EXTRACTORS:
        assert ex.extract_text("<html><body></body></html>", extractor) == ""
        assert (
            ex.extract_text("<html><head><script>var a = 1;</script></head><body> </body></html>", extractor)
            == ""
        )
