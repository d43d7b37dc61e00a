"""Build our own capability tasks and sample prompts from validation documents (never trained on).

    python -m tasks.build_eval_tasks --packed workdir/packed --output DIR [--max-items 400] [--seed 0]

``--packed`` is a packed dataset (a published root resolves to its current version). ``DIR`` (a
workdir path: it holds corpus text, so never the repository) receives a task folder in the
lm-evaluation-harness layout that ``model.capability.load_tasks`` reads:

- ``next_sentence.yaml`` / ``.jsonl``: a page's text up to a sentence; choose the true next sentence
  among it and three later sentences of the same page.
- ``page_continuation.yaml`` / ``.jsonl``: a page's opening; choose the sentence that follows it among
  it and the sentences that follow the openings of three other pages of the same language.
- ``word_order.yaml`` / ``.jsonl``: a page's text up to a sentence of at least five words; choose that
  sentence among three other orders of its words. The same words in every choice, so only how the
  language orders them tells the true one apart; a small model learns it early (the demo's does), where
  the two tasks above need more of the page's meaning. Pages written without spaces have no items.
- ``prompts.jsonl``: the sample prompts (``model.generate.select_prompts``, ``read_prompts``).
- ``build.json``: the packed dataset's digest, the settings and the items per task and language.

The YAML files are the templates in ``evals/``, copied byte for byte. Every choice is made by ranking
sha256 hashes of (seed, document id, ...), so the same documents and settings give the same bytes;
each task takes its items round-robin over the languages (``--max-items`` in all), and the choices of
an item are all sentences of the same kind (no length or position cue tells the right one apart).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from model import data as packed
from model.generate import prompts_jsonl, select_prompts, sentence_spans
from tasks import dataset as ds
from tasks.atomic import atomic_write_bytes, atomic_write_json

TEMPLATES = Path(__file__).resolve().parent.parent / "evals"
TASKS = ("next_sentence", "page_continuation", "word_order")
CHOICES = 4
MIN_SENTENCE_CHARS, MAX_SENTENCE_CHARS = 20, 300
MAX_CONTEXT_CHARS = 600
MIN_OPENING_CHARS = 150
MIN_ORDER_WORDS = 5


@dataclass(frozen=True)
class Document:
    doc_id: str
    lang: str
    text: str


def read_validation_documents(packed_dir: str | Path) -> list[Document]:
    """The validation documents of a packed dataset with their text (from its input datasets), by doc_id."""
    packed_dir = ds.resolve_version(packed_dir)
    manifest = ds.read_manifest(packed_dir)
    table = pq.read_table(
        packed_dir / packed.DOCUMENTS_FILE, columns=["doc_id", "lang", "input", "shard", "row", "split"]
    )
    table = table.filter(pc.equal(table.column("split"), "validation"))
    wanted: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        wanted[row["input"], row["shard"]].append(row)
    documents = []
    for (source, shard), rows in sorted(wanted.items()):
        input_dir = Path(manifest.inputs[source].path)
        try:
            shard_table = pq.read_table(ds.shard_paths(input_dir)[shard], columns=["doc_id", "text"])
        except (OSError, IndexError):
            raise ValueError(f"{input_dir}: the packed data's input dataset is gone or changed") from None
        ids, texts = shard_table.column("doc_id"), shard_table.column("text")
        for row in rows:
            if row["row"] >= len(ids) or ids[row["row"]].as_py() != row["doc_id"]:
                raise ValueError(
                    f"{input_dir}: document {row['doc_id']} is no longer where it was packed from"
                )
            documents.append(Document(row["doc_id"], row["lang"], texts[row["row"]].as_py()))
    return sorted(documents, key=lambda d: d.doc_id)


def _rank(seed: int, *parts: object) -> bytes:
    """A deterministic pseudo-random sort key."""
    return hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()


def _proper(text: str) -> bool:
    return MIN_SENTENCE_CHARS <= len(text) <= MAX_SENTENCE_CHARS


def _item(doc: Document, context: str, truth: str, distractors: list[str], seed: int, task: str) -> dict:
    """The row of one item: the true choice at a hash-chosen position among the distractors."""
    label = int.from_bytes(_rank(seed, task, doc.doc_id, "label")[:4], "big") % CHOICES
    choices = [*distractors[:label], truth, *distractors[label:]]
    return {"id": doc.doc_id, "lang": doc.lang, "context": context, "choices": choices, "label": label}


def _distinct(candidates: list[str], truth: str, seed: int, *key: object) -> list[str]:
    """Up to CHOICES - 1 distinct candidates other than ``truth``, in hash order."""
    picked: list[str] = []
    for text in sorted(set(candidates) - {truth}, key=lambda t: _rank(seed, *key, t)):
        if len(picked) == CHOICES - 1:
            break
        picked.append(text)
    return picked


def next_sentence_item(doc: Document, seed: int) -> dict | None:
    """Context: the page up to sentence i; choices: sentence i and three proper sentences after it."""
    spans = sentence_spans(doc.text)
    sentences = [doc.text[a:b] for a, b in spans]
    eligible, later = [], set()  # later: the distinct proper sentences after position i
    for i in reversed(range(len(spans))):
        others = len(later) - (sentences[i] in later)
        if i > 0 and _proper(sentences[i]) and others >= CHOICES - 1:
            eligible.append(i)
        if _proper(sentences[i]):
            later.add(sentences[i])
    if not eligible:
        return None
    i = min(eligible, key=lambda k: _rank(seed, "next_sentence", doc.doc_id, k))
    candidates = [s for s in sentences[i + 1 :] if _proper(s)]
    distractors = _distinct(candidates, sentences[i], seed, "next_sentence", doc.doc_id)
    return _item(doc, _context_before(doc.text, spans, i), sentences[i], distractors, seed, "next_sentence")


def _context_before(text: str, spans: list[tuple[int, int]], i: int) -> str:
    """The page before sentence ``i``: as many whole sentences as fit in MAX_CONTEXT_CHARS, at least one,
    with the whitespace that leads to sentence ``i``."""
    first = i - 1
    while first > 0 and spans[i][0] - spans[first - 1][0] <= MAX_CONTEXT_CHARS:
        first -= 1
    return text[spans[first][0] : spans[i][0]]


def _word_orders(sentence: str, seed: int, *key: object) -> list[str]:
    """Up to CHOICES - 1 distinct other orders of the sentence's space-separated words, hash-seeded."""
    words = sentence.split(" ")
    orders: list[str] = []
    for attempt in range(20 * CHOICES):
        if len(orders) == CHOICES - 1:
            break
        shuffled = words[:]
        random.Random(_rank(seed, *key, attempt)).shuffle(shuffled)
        if (order := " ".join(shuffled)) != sentence and order not in orders:
            orders.append(order)
    return orders


def word_order_item(doc: Document, seed: int) -> dict | None:
    """Context: the page up to sentence i; choices: sentence i and three other orders of its words
    (a sentence of at least MIN_ORDER_WORDS words, so pages written without spaces have none)."""
    spans = sentence_spans(doc.text)
    eligible = [
        i
        for i, (a, b) in enumerate(spans)
        if i > 0 and _proper(doc.text[a:b]) and len(doc.text[a:b].split(" ")) >= MIN_ORDER_WORDS
    ]
    for i in sorted(eligible, key=lambda k: _rank(seed, "word_order", doc.doc_id, k)):
        sentence = doc.text[spans[i][0] : spans[i][1]]
        orders = _word_orders(sentence, seed, "word_order", doc.doc_id, i)
        if len(orders) == CHOICES - 1:
            return _item(doc, _context_before(doc.text, spans, i), sentence, orders, seed, "word_order")
    return None


def _opening(doc: Document) -> tuple[str, str] | None:
    """(the page's opening up to a sentence start, that sentence): the opening is the first sentences
    up to MIN_OPENING_CHARS..MAX_CONTEXT_CHARS characters, the sentence a proper one."""
    spans = sentence_spans(doc.text)
    for k in range(1, len(spans)):
        length = spans[k][0] - spans[0][0]
        if length > MAX_CONTEXT_CHARS:
            return None
        sentence = doc.text[spans[k][0] : spans[k][1]]
        if length >= MIN_OPENING_CHARS and _proper(sentence):
            return doc.text[spans[0][0] : spans[k][0]], sentence
    return None


def page_continuation_items(documents: list[Document], seed: int) -> list[dict]:
    """Per document with an opening, its continuation among those of three other same-language pages:
    the next distinct ones from a hash-chosen start in the language's continuations in hash order."""
    openings = {doc.doc_id: opening for doc in documents if (opening := _opening(doc))}
    pools: dict[str, set[str]] = defaultdict(set)
    for doc in documents:
        if doc.doc_id in openings:
            pools[doc.lang].add(openings[doc.doc_id][1])
    ordered = {
        lang: sorted(pool, key=lambda t, lang=lang: _rank(seed, "page_continuation", lang, t))
        for lang, pool in pools.items()
    }
    items = []
    for doc in documents:
        if doc.doc_id not in openings or len(ordered[doc.lang]) < CHOICES:
            continue
        context, truth = openings[doc.doc_id]
        pool = ordered[doc.lang]
        start = int.from_bytes(_rank(seed, "page_continuation", doc.doc_id)[:4], "big")
        distractors: list[str] = []
        for step in range(len(pool)):
            if len(distractors) == CHOICES - 1:
                break
            if (text := pool[(start + step) % len(pool)]) != truth:
                distractors.append(text)
        items.append(_item(doc, context, truth, distractors, seed, "page_continuation"))
    return items


def round_robin(items: list[dict], seed: int, task: str, max_items: int) -> list[dict]:
    """At most ``max_items`` items taken in turn from each language (sorted), each in hash order."""
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for item in sorted(items, key=lambda it: _rank(seed, task, "order", it["id"])):
        by_lang[item["lang"]].append(item)
    queues = [by_lang[lang] for lang in sorted(by_lang)]
    chosen: list[dict] = []
    for turn in range(max(map(len, queues), default=0)):
        chosen += [queue[turn] for queue in queues if turn < len(queue)]
    return chosen[:max_items]


def build_tasks(documents: list[Document], seed: int = 0, max_items: int = 400) -> dict[str, list[dict]]:
    """The items of every task from ``documents`` (validation documents, in doc_id order)."""
    next_sentence = [item for doc in documents if (item := next_sentence_item(doc, seed))]
    word_order = [item for doc in documents if (item := word_order_item(doc, seed))]
    return {
        "next_sentence": round_robin(next_sentence, seed, "next_sentence", max_items),
        "page_continuation": round_robin(
            page_continuation_items(documents, seed), seed, "page_continuation", max_items
        ),
        "word_order": round_robin(word_order, seed, "word_order", max_items),
    }


def write_task_folder(
    documents: list[Document],
    output: str | Path,
    *,
    seed: int = 0,
    max_items: int = 400,
    prompts_per_language: int = 3,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the tasks (YAML + JSONL), ``prompts.jsonl`` and ``build.json`` into ``output``; returns
    the build info. ``source`` describes where the documents came from (recorded in build.json)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tasks = build_tasks(documents, seed, max_items)
    info: dict[str, Any] = {"source": source or {}, "seed": seed, "max_items": max_items, "tasks": {}}
    for name, items in tasks.items():
        # Too few validation pages for this task: recorded, not written (an empty task cannot be scored).
        if not items:
            info["tasks"][name] = {"items": 0, "skipped": "no items could be built from the validation pages"}
            continue
        body = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
        atomic_write_bytes(output / f"{name}.jsonl", body.encode())
        atomic_write_bytes(output / f"{name}.yaml", (TEMPLATES / f"{name}.yaml").read_bytes())
        per_lang: dict[str, int] = defaultdict(int)
        for item in items:
            per_lang[item["lang"]] += 1
        info["tasks"][name] = {"items": len(items), "languages": dict(sorted(per_lang.items()))}
    prompts = select_prompts([(doc.lang, doc.text) for doc in documents], per_language=prompts_per_language)
    atomic_write_bytes(output / "prompts.jsonl", prompts_jsonl(prompts))
    info["prompts"] = len(prompts)
    atomic_write_json(output / "build.json", info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packed", required=True, help="packed dataset (or its published root)")
    parser.add_argument("--output", required=True, help="task folder to write (in a workdir, not the repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-items", type=int, default=400, help="items per task")
    parser.add_argument("--prompts-per-language", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        packed_dir = ds.resolve_version(args.packed)
        documents = read_validation_documents(packed_dir)
        source = {"packed_digest": ds.dataset_digest(packed_dir)}  # content only: same bytes anywhere
        info = write_task_folder(
            documents,
            args.output,
            seed=args.seed,
            max_items=args.max_items,
            prompts_per_language=args.prompts_per_language,
            source=source,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"build_eval_tasks: {exc}") from None
    counts = ", ".join(f"{name} {task['items']} items" for name, task in info["tasks"].items())
    print(f"{args.output}: {counts}, {info['prompts']} prompts from {len(documents)} validation documents")


if __name__ == "__main__":
    main()
