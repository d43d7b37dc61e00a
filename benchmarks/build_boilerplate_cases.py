"""Labelled near-duplicate cases around real site templates, built from the sample crawl.

Each page is extracted twice from its WARC record: the whole page (navigation, headers, footers,
licence notices: the site's template) and its main content (what ingest keeps, ``tasks.extract``).
Per host, distinct pages are chosen (main contents with 2-token shingle Jaccard < 0.5 to every
page chosen before, so untranslated copies of one handbook page in several locales are not two
"distinct" pages), and labelled:

- ``seed``: the main content of a page;
- ``header_footer``: the page's own header + main content + footer (the lines of the whole page
  before and after its main content), in its seed's cluster (a page with an added header/footer:
  must merge with its original);
- ``shared_template``: the same for another distinct page, alone in its cluster (distinct pages
  sharing only the site's template: must not merge with each other or with the above);
- ``..._short``: the same with the main content cut to its first lines of ``--short-words`` tokens
  (short pages, where the template is most of the page);
- ``..._licence``: a short page followed by a long licence text (the main text of the crawl's
  PostgreSQL legal notice, ``--licence-url-suffix``) instead of the site's header and footer:
  distinct pages sharing one long block, the case the similarity rules get wrong.

Pages are sampled by a hash of their URL (deterministic); nothing of the corpus is stored in the
repository: the cases go to ``--out`` (JSONL ``{id, text, cluster, url, host, variant, seed_id}``).

    .venv/bin/python benchmarks/build_boilerplate_cases.py --out workdir/boilerplate-cases.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import xxhash
from resiliparse.extract.html2text import extract_plain_text
from warcio.archiveiterator import ArchiveIterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import extract as ex
from tasks import minhash

REPO = Path(__file__).resolve().parents[1]
SAMPLE_EVERY = 6  # keep the pages whose URL hash is 0 modulo this (about 1,100 of the crawl's 6,800)


def crawl_pages(crawl: Path, licence_suffix: str) -> tuple[list[dict], str]:
    """(url, host, whole page text, main text) of the sampled HTML pages of every snapshot, first
    capture of each URL; and the main text of the first page whose URL ends with ``licence_suffix``."""
    pages, seen, licence = [], set(), ""
    for listing in sorted((crawl / "crawl-data").glob("*/warc.paths.gz")):
        with gzip.open(listing, "rt") as f:
            files = [crawl / line.strip() for line in f if line.strip()]
        for path in files:
            with open(path, "rb") as stream:
                for record in ArchiveIterator(stream):
                    if record.rec_type != "response" or record.http_headers.get_statuscode() != "200":
                        continue
                    content_type = record.http_headers.get_header("Content-Type") or ""
                    url = record.rec_headers.get_header("WARC-Target-URI")
                    is_licence = not licence and url.endswith(licence_suffix)
                    sampled = xxhash.xxh64_intdigest(url.encode()) % SAMPLE_EVERY == 0
                    if "html" not in content_type or url in seen or not (sampled or is_licence):
                        continue
                    seen.add(url)
                    html, _, _ = ex.decode_html(
                        record.content_stream().read(), ex.header_charset(content_type)
                    )
                    if is_licence:
                        licence = ex.extract_text(html)
                    whole = extract_plain_text(html, main_content=False, alt_texts=False, links=False).strip()
                    pages.append(
                        {
                            "url": url,
                            "host": urlsplit(url).hostname,
                            "whole": whole,
                            "main": ex.extract_text(html),
                        }
                    )
    if not licence:
        raise SystemExit(f"no page ending with {licence_suffix!r} in {crawl}")
    return pages, licence


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common) if a.size + b.size else 1.0


def excerpt(text: str, words: int) -> str:
    """The first lines of ``text`` holding at least ``words`` tokens (a short page)."""
    lines, count = [], 0
    for line in text.split("\n"):
        lines.append(line)
        count += len(minhash.tokenize(minhash.fold_text(line)))
        if count >= words:
            break
    return "\n".join(lines).strip()


def template(whole: str, main: str) -> tuple[str, str]:
    """The page's own header and footer: the lines of the whole page before the first and after the
    last line of its main content."""
    lines = whole.split("\n")
    content = {line.strip() for line in main.split("\n") if line.strip()}
    inside = [i for i, line in enumerate(lines) if line.strip() in content]
    if not inside:
        return "", ""
    return "\n".join(lines[: inside[0]]).strip(), "\n".join(lines[inside[-1] + 1 :]).strip()


def distinct_pages(pages: list[dict], per_host: int, short_words: int) -> dict[str, list[dict]]:
    """Per host, up to ``per_host`` pages (URL-hash order) with a header or footer, whose main
    contents and short excerpts are pairwise distinct (2-token shingle Jaccard < 0.5)."""
    chosen: dict[str, list[tuple[dict, np.ndarray, np.ndarray]]] = defaultdict(list)
    for page in sorted(pages, key=lambda p: (p["host"], xxhash.xxh64_intdigest(p["url"].encode(), seed=1))):
        page = {**page, "short": excerpt(page["main"], short_words)}
        page["header"], page["footer"] = template(page["whole"], page["main"])
        full, short = (minhash.shingle_hashes(minhash.fold_text(page[k]), 2) for k in ("main", "short"))
        picked = chosen[page["host"]]
        if len(picked) >= per_host or short.size < short_words or not (page["header"] or page["footer"]):
            continue
        if all(jaccard(full, f) < 0.5 and jaccard(short, s) < 0.5 for _, f, s in picked):
            picked.append((page, full, short))
    return {host: [p for p, _, _ in picked] for host, picked in chosen.items()}


def build_cases(crawl: Path, per_host: int, short_words: int, licence_suffix: str) -> list[dict]:
    """Per host, pages in turn: full page + template (paired with the page), full page alone, short
    page + template (paired), short page alone, short page + licence (paired), short page + licence
    alone (see the module doc)."""
    cases = []
    pages, licence = crawl_pages(crawl, licence_suffix)
    for host, chosen in sorted(distinct_pages(pages, per_host, short_words).items()):
        for i, page in enumerate(chosen):
            cluster, kind = f"{host}/{i}", i % 6 // 2  # 0 full page, 1 short page, 2 short + licence
            body = page["main"] if kind == 0 else page["short"]
            parts = (page["header"], body, page["footer"]) if kind < 2 else (body, licence)
            text = "\n".join(part for part in parts if part)
            suffix = ("", "_short", "_licence")[kind]
            row = {"url": page["url"], "host": host, "cluster": cluster}
            if i % 2 == 0:  # a page and the same page with its template
                cases.append(
                    {**row, "id": f"{cluster}/page", "text": body, "variant": "seed", "seed_id": None}
                )
                cases.append(
                    {
                        **row,
                        "id": f"{cluster}/templated",
                        "text": text,
                        "variant": f"header_footer{suffix}",
                        "seed_id": f"{cluster}/page",
                    }
                )
            else:
                cases.append(
                    {
                        **row,
                        "id": f"{cluster}/templated",
                        "text": text,
                        "variant": f"shared_template{suffix}",
                        "seed_id": None,
                    }
                )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crawl", type=Path, default=REPO.parent / "shared" / "corpus" / "crawl")
    parser.add_argument("--out", type=Path, default=REPO / "workdir" / "boilerplate-cases.jsonl")
    parser.add_argument("--per-host", type=int, default=48, help="Distinct pages per host.")
    parser.add_argument(
        "--licence-url-suffix", default="legalnotice.html", help="The page whose text is the licence block."
    )
    parser.add_argument("--short-words", type=int, default=40, help="Tokens of a short page's content.")
    args = parser.parse_args()
    cases = build_cases(args.crawl, args.per_host, args.short_words, args.licence_url_suffix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case, ensure_ascii=False) + "\n")
    counts = defaultdict(int)
    for case in cases:
        counts[(case["host"], case["variant"])] += 1
    print(f"{len(cases)} cases -> {args.out}")
    for (host, variant), n in sorted(counts.items()):
        print(f"  {host} {variant}: {n}")


if __name__ == "__main__":
    main()
