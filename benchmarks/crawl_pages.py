"""The crawl's HTML pages as the benchmarks' peers read them: warcio, status 200, text/html."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def html_responses(path: str | Path) -> Iterator[tuple[str, str, bytes]]:
    """(WARC-Record-ID, target URL, raw body) of each 200 text/html response in one WARC file."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response" or record.http_headers.get_statuscode() != "200":
                continue
            if "text/html" not in (record.http_headers.get_header("Content-Type") or ""):
                continue
            headers = record.rec_headers
            yield (
                headers.get_header("WARC-Record-ID"),
                headers.get_header("WARC-Target-URI"),
                record.content_stream().read(),
            )
