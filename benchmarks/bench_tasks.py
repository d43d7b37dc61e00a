"""Capability-task scoring on the CPU: our ``capability.loglikelihoods`` (each context once, its choices
after it in the KV cache, logits only at scored positions) against scoring every (context, choice) as
its own row, as lm-evaluation-harness does (rows sorted by length, right-padded, one forward per batch).

Both score the same requests in one run: ``bench_eval.py``'s synthetic tasks (the shipped tasks' YAML,
contexts of 40-150 tokens, choices of 5-75) on a randomly initialised preset, one torch thread. Reported:
CPU seconds, positions run through the model (padding included), logits made, and the largest
difference between the two log-likelihoods (they must agree).

    python benchmarks/bench_tasks.py                       # tiny, 8,192-token vocabulary, 64 items/task
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eval import LANGS, byte_tokenizer, synthetic_tasks

from model import capability
from model.model import Transformer, model_config


@torch.no_grad()
def per_request(
    model: Transformer, requests: list[tuple[list[int], list[int]]], batch_tokens: int
) -> list[float]:
    """The log-likelihood of every request scored as its own row (lm-eval's way)."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    scores = [0.0] * len(requests)
    start = 0
    while start < len(order):
        width = len(requests[order[start]][0]) + len(requests[order[start]][1]) - 1
        batch = order[start : start + max(1, batch_tokens // width)]
        tokens = torch.zeros(len(batch), width + 1, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        for j, i in enumerate(batch):
            ids = requests[i][0] + requests[i][1]
            tokens[j, : len(ids)] = torch.tensor(ids)
            scored[j, len(requests[i][0]) - 1 : len(ids) - 1] = True
        nll, _ = capability.target_nll(model(tokens[:, :-1]), tokens[:, 1:])
        for i, ll in zip(batch, (-(nll * scored).sum(-1)).tolist(), strict=True):
            scores[i] = ll
        start += len(batch)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--items", type=int, default=64, help="items per task (the eval's task_limit)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    synthetic_tasks(root / "tasks", len(LANGS))
    byte_tokenizer(root / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    model = Transformer(model_config(args.preset, vocab_size=args.vocab, max_seq_len=512)).eval()
    model.init_weights(seed=0)
    pairs = [
        (item.context, task.target_delimiter + choice)
        for task in capability.load_tasks(root / "tasks")
        for item in task.items[: args.items]
        for choice in item.choices
    ]
    requests = capability.encode_requests(tokenizer, pairs, prefix_id=0)

    counts = {"positions": 0, "logits": 0}
    model.tok_embeddings.register_forward_hook(
        lambda m, i, o: counts.__setitem__("positions", counts["positions"] + i[0].numel())
    )
    model.output.register_forward_hook(
        lambda m, i, o: counts.__setitem__("logits", counts["logits"] + o[..., 0].numel())
    )

    results = {}
    for name, score in (
        ("per request (lm-eval)", lambda: per_request(model, requests, args.batch_tokens)),
        ("ours: one pass per context", lambda: [ll for ll, _ in capability.loglikelihoods(model, requests, args.batch_tokens)]),
    ):  # fmt: skip
        counts.update(positions=0, logits=0)
        started = time.process_time()
        lls = score()
        results[name] = (time.process_time() - started, dict(counts), lls)
    (peer_s, _, peer), (ours_s, _, ours) = results.values()
    print(
        f"{len(requests)} requests ({len(pairs) // 4} items x 4 choices), {args.preset}, vocabulary {args.vocab:,}, 1 thread"
    )
    print(f"{'':<28} {'CPU s':>7} {'positions':>10} {'logits':>8}")
    for name, (seconds, seen, _) in results.items():
        print(f"{name:<28} {seconds:>7.2f} {seen['positions']:>10,} {seen['logits']:>8,}")
    print(f"ratio (per request / ours): {peer_s / ours_s:.2f}x CPU s")
    print(
        f"largest log-likelihood difference: {max(abs(a - b) for a, b in zip(peer, ours, strict=True)):.2e}"
    )


if __name__ == "__main__":
    main()
