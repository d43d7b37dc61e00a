"""Ingest + HTML extraction: resiliparse vs trafilatura, speed and quality, side by side.

Speed: the whole ingest stage (``tasks.ingest.iter_documents``: WARC parsing, decoding, charset,
extraction) over one WARC file of each snapshot of the sample crawl, single process, so the
number is documents per second per core. Median of ``--repeats`` runs.

Quality: on a fixed sample of HTML pages (every ``--every``-th status-200 HTML page of every WARC
file of both snapshots) the extracted text is compared with the known main content of these
documentation sites: the page's <body> without its navigation containers (Sphinx ``related``,
``sphinxsidebar``, ``footer``; DocBook ``navheader``/``navfooter``/``toc``; the handbook's
``#banner``, ``#title`` and ``ul.docnav``; Django's ``#hd``/``#ft``/``#sidebar``; ``nav``,
``[role=navigation|search]``), scripts and styles.
Both texts are cut into tokens (words; each CJK character one token) and compared as multisets:
precision, recall and F1 per page, macro-averaged. Boilerplate leakage is the share of extracted
tokens that are not main content but navigation text (extracted minus main, within navigation-only).

Three configurations: each extractor alone, and the stage's default (resiliparse, with
trafilatura only on pages where resiliparse finds no text).

    .venv/bin/python benchmarks/bench_extract.py [--repeats 3] [--every 10]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import lxml.html

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import extract as ex  # noqa: E402
from tasks import ingest  # noqa: E402
from tasks.stage import StageStats  # noqa: E402

CRAWL = REPO.parent / "shared" / "corpus" / "crawl"
SPEED_FILES = {  # one WARC file per snapshot: 2026-40 (handbook, reference, Python), 2026-44 (all 5 sites)
    "CC-MAIN-2026-40": -1,
    "CC-MAIN-2026-44": 0,
}

_CLASSES = (
    "navheader",
    "navfooter",
    "docnav",
    "toc",
    "related",
    "sphinxsidebar",
    "footer",
    "mobile-nav",
    "nav",
)
_IDS = ("banner", "title", "hd", "ft", "sidebar", "global-nav", "searchbox")
BOILERPLATE_XPATH = " | ".join(
    [f"//*[contains(concat(' ', normalize-space(@class), ' '), ' {c} ')]" for c in _CLASSES]
    + [f"//*[@id='{i}']" for i in _IDS]
    + ["//nav", "//header", "//footer", "//*[@role='navigation']", "//*[@role='search']"]
)
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*>")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")  # a CJK character, or a run of other word characters


def tokens(text: str) -> Counter:
    return Counter(t.lower() for t in _TOKEN.findall(text))


def reference(html: str) -> tuple[Counter, Counter]:
    """(main-content tokens, navigation-only tokens) of a page."""
    root = lxml.html.document_fromstring(_XML_DECLARATION.sub("", html, count=1))
    for node in root.xpath("//script | //style | //noscript | //head"):
        node.drop_tree()
    boilerplate: Counter = Counter()
    for node in root.xpath(BOILERPLATE_XPATH):
        if node.getparent() is not None:  # not already removed with an enclosing container
            boilerplate += tokens(" ".join(node.itertext()))
            node.drop_tree()
    main = tokens(" ".join(root.itertext()))  # spaces: adjacent blocks are separate words
    return main, boilerplate - main


def score(extracted: Counter, main: Counter, boilerplate_only: Counter) -> dict[str, float]:
    n_ext, n_ref = sum(extracted.values()), sum(main.values())
    overlap = sum((extracted & main).values())
    precision = overlap / n_ext if n_ext else 0.0
    recall = overlap / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    leak = sum(((extracted - main) & boilerplate_only).values()) / n_ext if n_ext else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "leak": leak, "empty": float(n_ext == 0)}


def sample_pages(every: int) -> list[tuple[str, str]]:
    """(host, html) of every ``every``-th HTML page with status 200 in both snapshots."""
    pages, seen = [], 0
    config = ingest.IngestConfig()
    for snapshot in sorted(SPEED_FILES):
        for source in ingest.resolve_crawl(str(CRAWL), [snapshot], ["warc"], None)[snapshot]:
            with open(source, "rb") as f:
                for raw in ingest.iter_raw_records(f, config.max_payload_bytes):
                    if not isinstance(raw, ingest.RawRecord) or raw.rec_type != "response":
                        continue
                    headers = raw.http_headers
                    if (
                        headers.get_statuscode() != "200"
                        or ex.mime_type(headers.get_header("Content-Type")) != "text/html"
                    ):
                        continue
                    seen += 1
                    if seen % every:
                        continue
                    body = ingest._decode_body(raw, config.max_payload_bytes)
                    html, _, _ = ex.decode_html(body, ex.header_charset(headers.get_header("Content-Type")))
                    pages.append((raw.rec_headers.get_header("WARC-Target-URI").split("/")[2], html))
    return pages


# The extractor alone, each way, and the stage's default (resiliparse, trafilatura where it finds nothing).
VARIANTS = {
    "resiliparse": ingest.IngestConfig(extractor="resiliparse", fallback_extractor=None),
    "trafilatura": ingest.IngestConfig(extractor="trafilatura", fallback_extractor=None),
    "default": ingest.IngestConfig(),
}


def quality(pages: list[tuple[str, str]], config: ingest.IngestConfig) -> dict[str, dict[str, float]]:
    """Mean scores per host and over all pages."""
    per_host: dict[str, list[dict[str, float]]] = defaultdict(list)
    for host, html in pages:
        main, boilerplate_only = reference(html)
        per_host[host].append(score(tokens(ingest.main_text(html, config)), main, boilerplate_only))
    per_host["all pages"] = [s for scores in list(per_host.values()) for s in scores]
    return {
        host: {k: statistics.fmean(s[k] for s in scores) for k in scores[0]}
        for host, scores in per_host.items()
    }


def speed(config: ingest.IngestConfig, repeats: int) -> tuple[float, int, list[float]]:
    """Median documents/s of the ingest stage over the speed files, in this one process."""
    sources = [ingest.resolve_crawl(str(CRAWL), [s], ["warc"], None)[s][i] for s, i in SPEED_FILES.items()]
    rates, docs_in = [], 0
    for _ in range(repeats):
        stats = StageStats(ingest.STAGE)
        start = time.process_time()  # CPU time of this process: fair on a shared machine
        for source in sources:
            for _doc in ingest.iter_documents(source, config, stats):
                pass
        rates.append(stats.docs_in / (time.process_time() - start))
        docs_in = stats.docs_in
    return statistics.median(rates), docs_in, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="quality sample: every n-th HTML page")
    args = parser.parse_args()

    pages = sample_pages(args.every)
    results = {}
    for name, config in VARIANTS.items():
        rate, docs, rates = speed(config, args.repeats)
        results[name] = {"rate": rate, "docs": docs, "quality": quality(pages, config)}
        print(f"{name}: {docs} docs/run, runs {[round(r, 1) for r in rates]} docs/s", file=sys.stderr)

    print(
        f"machine: {os.cpu_count()} cores; speed = CPU seconds of one process (docs/s/core), median of {args.repeats}"
    )
    print(f"speed files: {results['default']['docs']} documents in per run (1 WARC file per snapshot)")
    print(f"quality sample: {len(pages)} HTML pages (every {args.every}th of both snapshots)")
    print("default = resiliparse, trafilatura on pages where resiliparse finds no text\n")
    names = list(VARIANTS)
    print("| metric | " + " | ".join(names) + " | ratio default/trafilatura |")
    print("|---|" + "---:|" * (len(names) + 1))

    def row(label: str, values: list[float], digits: int) -> None:
        ratio = f"{values[-1] / values[1]:.2f}" if values[1] else "-"
        print(f"| {label} | " + " | ".join(f"{v:.{digits}f}" for v in values) + f" | {ratio} |")

    row("ingest+extract docs/s/core", [results[n]["rate"] for n in names], 1)
    for host in results["default"]["quality"]:
        for metric in ("f1", "precision", "recall", "leak", "empty"):
            if host == "all pages" or metric in ("f1", "leak"):
                row(f"{metric} {host}", [results[n]["quality"][host][metric] for n in names], 3)


if __name__ == "__main__":
    main()
