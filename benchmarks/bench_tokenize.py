"""Tokenizer training, encoding, packing and data loading, each beside a peer, on the sample corpus.

Corpus: lid-dev.jsonl + neardup-dev.jsonl from ../shared/corpus (6,124 documents, ~13 MB), as one
contract dataset with `lang` and a per-source URL host.

Peers, run in the same process on the same data:
- encode: tiktoken (nanoGPT's tokenizer) loaded with the same BPE ranks and GPT-2 split pattern,
  ``encode_ordinary`` per document on one thread, vs tokenizers ``encode_batch`` on one thread
  (RAYON_NUM_THREADS=1 in a child process).
- pack: nanoGPT's prepare.py recipe (encode_batch, append end-of-text, concatenate, one flat .bin)
  vs pack_datasets (split, mixture, shuffle, windows, shards, lineage index).
- load: nanoGPT's get_batch (random offsets into one flat memmap) vs PackedLoader, one thread.

Usage: .venv/bin/python benchmarks/bench_tokenize.py [--vocab 32000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS = REPO.parent / "shared" / "corpus"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def build_corpus(out_dir: Path) -> Path:
    import pyarrow as pa

    from tasks import dataset as ds

    lid_meta = {}
    for line in (CORPUS / "lid-dev.meta.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        lid_meta[row["id"]] = row["source"]
    nd_meta = json.loads((CORPUS / "neardup-dev.meta.json").read_text(encoding="utf-8"))["documents"]
    rows = []
    for name in ("lid-dev.jsonl", "neardup-dev.jsonl"):
        for line in (CORPUS / name).read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            meta = nd_meta.get(doc["id"], {})
            lang = doc.get("lang") or meta.get("lang")
            source = lid_meta.get(doc["id"]) or meta.get("source")
            rows.append(
                {
                    "doc_id": doc["id"],
                    "text": doc["text"],
                    "url": f"https://{source}.example/{lang}/{doc['id']}.html",
                    "warc_record_id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, doc['id'])}>",
                    "lang": lang,
                }
            )
    schema = ds.DOCUMENT_SCHEMA.append(pa.field("lang", pa.string()))
    shards = [
        ds.write_table(
            ds.rows_to_table(rows[i : i + 1024], schema), out_dir / f"part-{i // 1024:05d}.parquet"
        )
        for i in range(0, len(rows), 1024)
    ]
    ds.write_manifest(
        out_dir, ds.Manifest(stage="bench-corpus", schema=ds.schema_description(schema), shards=shards)
    )
    return out_dir


def tiktoken_from(tokenizer_file: Path):
    """A tiktoken Encoding with the ranks of our byte-level BPE (ids are in merge order)."""
    import tiktoken

    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    # GPT-2's byte <-> printable-char table used by byte-level BPE.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    byte_of = dict(
        zip(map(chr, chars), [*printable, *(b for b in range(256) if b not in printable)], strict=True)
    )
    ranks = {bytes(byte_of[c] for c in token): i for token, i in data["model"]["vocab"].items()}
    special = {t["content"]: t["id"] for t in data["added_tokens"]}
    return tiktoken.Encoding("factory", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def encode_worker(tokenizer_file: str, dataset: str, repeat: int) -> None:
    """Child process (RAYON_NUM_THREADS=1): single-thread encode times, ours and tiktoken's."""
    from tasks import dataset as ds
    from tasks import tokenizer as tk

    texts = [r["text"] for r in ds.iter_rows(dataset, columns=["text"])]
    tokenizer = tk.load_tokenizer(tokenizer_file)
    wall, cpu, tokens = timed(lambda: sum(len(ids) for ids in tk.encode_texts(tokenizer, texts)), repeat)
    result = {"bytes": sum(len(t.encode()) for t in texts), "tokens": tokens, "wall": wall, "cpu": cpu}
    try:
        encoding = tiktoken_from(Path(tokenizer_file))
    except ImportError:
        print(json.dumps(result))
        return
    wall, cpu, peer_tokens = timed(
        lambda: sum(len(encoding.encode_ordinary(unicodedata.normalize("NFC", t))) for t in texts), repeat
    )
    result["peer"] = {"wall": wall, "cpu": cpu, "tokens": peer_tokens}
    print(json.dumps(result))


def nanogpt_prepare(tokenizer_file: Path, dataset: Path, out: Path, eot: int) -> int:
    from tasks import dataset as ds
    from tasks import tokenizer as tk

    tokenizer = tk.load_tokenizer(tokenizer_file)
    texts = [r["text"] for r in ds.iter_rows(dataset, columns=["text"])]
    ids = [np.asarray([*doc, eot], dtype=np.uint16) for doc in tk.encode_texts(tokenizer, texts)]
    flat = np.concatenate(ids)
    flat.tofile(out)
    return len(flat)


def nanogpt_batches(path: Path, batch: int, block: int, steps: int):
    import torch

    data = np.memmap(path, dtype=np.uint16, mode="r")
    for _ in range(steps):
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        yield x, y


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall seconds, median CPU seconds of this process, result): the machine is shared, so
    CPU seconds are the per-core measure and wall seconds what a user waits."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--encode-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.encode_worker:
        encode_worker(*args.encode_worker, args.repeat)
        return

    import torch

    from model.data import PackedLoader
    from tasks import pack
    from tasks import tokenizer as tk

    torch.set_num_threads(1)
    rows = []

    def row(
        what: str, wall: float, cpu: float, amount: float, unit: str, peer: str = "", ratio: str = ""
    ) -> None:
        rows.append(
            (
                what,
                f"{wall:.2f}",
                f"{cpu:.2f}",
                f"{amount / wall / 1e6:.2f}",
                f"{amount / cpu / 1e6:.2f} {unit}",
                peer,
                ratio,
            )
        )
        print(*rows[-1], sep=" | ", file=sys.stderr, flush=True)  # progress: a full run takes minutes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = build_corpus(tmp / "corpus")
        from tasks import dataset as ds

        chars = sum(len(r["text"]) for r in ds.iter_rows(corpus, columns=["text"]))
        config = tk.TokenizerConfig(vocab_size=args.vocab, sample_chars=chars, heldout_fraction=0.02)
        wall, cpu, manifest = timed(lambda: tk.train_tokenizer([corpus], tmp / "tok", config), args.repeat)
        row("train_tokenizer (2 threads) + fertility", wall, cpu, manifest.stats["train_chars"], "M chars/s")
        tokenizer_file = tk.tokenizer_path(tmp / "tok")

        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--encode-worker",
                str(tokenizer_file),
                str(corpus),
                "--repeat",
                str(args.repeat),
            ],
            env={**os.environ, "RAYON_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        enc = json.loads(child.stdout.strip().splitlines()[-1])
        peer, ratio = "", ""
        if "peer" in enc:
            peer = (
                f"tiktoken encode_ordinary {enc['peer']['tokens'] / enc['peer']['cpu'] / 1e6:.2f} M tok/CPU-s"
            )
            ratio = f"{enc['peer']['cpu'] / enc['cpu']:.2f}x"
        row("encode_batch, 1 thread", enc["wall"], enc["cpu"], enc["tokens"], "M tok/s", peer, ratio)
        rows.append(("  (same, bytes)", "", "", "", f"{enc['bytes'] / enc['cpu'] / 1e6:.2f} MB/s", "", ""))

        eot = manifest.extra["eot_id"]
        peer_wall, peer_cpu, peer_tokens = timed(
            lambda: nanogpt_prepare(tokenizer_file, corpus, tmp / "flat.bin", eot), args.repeat
        )
        peer = f"nanoGPT prepare {peer_tokens / peer_wall / 1e6:.2f} M tok/s wall"
        for workers in (1, 2):
            pconfig = pack.PackConfig(seq_len=args.seq_len, num_workers=workers, tokens_per_shard=1 << 20)
            wall, cpu, packed = timed(
                lambda pconfig=pconfig: pack.pack_datasets([corpus], tmp / "tok", tmp / "packed", pconfig),
                args.repeat,
            )
            tokens = sum(packed.stats["tokens"].values())
            # Worker processes' CPU is not in this process's CPU time: only the wall rate compares.
            row(
                f"pack_datasets, {workers} worker(s)",
                wall,
                cpu,
                tokens,
                "M tok/s",
                peer,
                f"{peer_wall / wall:.2f}x (wall)",
            )

        steps = 3000
        for batch in (8, 32):
            loader = PackedLoader(tmp / "packed", batch_size=batch)

            def run_ours(loader=loader) -> int:
                return sum(x.numel() for (x, _), _ in zip(loader, range(steps), strict=False))

            def run_peer(batch=batch) -> int:
                return sum(
                    x.numel() for x, _ in nanogpt_batches(tmp / "flat.bin", batch, args.seq_len, steps)
                )

            wall, cpu, n = timed(run_ours, args.repeat)
            peer_wall, peer_cpu, _ = timed(run_peer, args.repeat)
            peer = f"nanoGPT get_batch {n / peer_cpu / 1e6:.2f} M tok/CPU-s"
            row(
                f"PackedLoader B={batch} T={args.seq_len}, 1 thread",
                wall,
                cpu,
                n,
                "M tok/s",
                peer,
                f"{peer_cpu / cpu:.2f}x",
            )
            rows.append((f"  ({steps / cpu:.0f} batches/CPU-s)", "", "", "", "", "", ""))

    header = ("what", "wall s", "CPU s", "M/wall-s", "per CPU-second", "peer (same run)", "ours/peer speed")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    print(
        f"\ncorpus: {chars / 1e6:.1f} M chars, {enc['bytes'] / 1e6:.1f} MB; vocab {args.vocab}; "
        f"{enc['tokens']:,} tokens; medians of {args.repeat}; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
