"""Samples a person can read: continuations of fixed validation prompts, rendered as Markdown.

The pieces, in the order a per-checkpoint evaluation uses them:

- ``select_prompts(documents, per_language=3)``: the prompts, from ``(lang, text)`` pairs of validation
  documents in a stable order (the caller's: e.g. sorted by doc id). Per language, the first documents
  whose opening sentences make a prompt of ``min_chars``..``max_chars`` characters; deterministic, so
  every checkpoint of a run continues the same prompts. ``prompts_jsonl`` / ``read_prompts`` keep
  them as JSONL (``tasks/build_eval_tasks.py`` writes ``prompts.jsonl`` beside the capability tasks).
- ``generate(model, prompt_ids, max_new_tokens, temperature=, top_k=, seed=, stop_id=)``: one
  continuation through the KV cache (``Transformer.forward_cached``); temperature 0 is greedy.
  Sampling draws on the CPU from its own seeded generator: the same model and seed give the same text.
  ``generate_batch`` decodes several rows (prompts of one length, each with its ``Decoding``) at once.
- ``generate_samples(model, tokenizer, prompts, ...)`` -> ``[Sample]`` (greedy and sampled continuation
  of each prompt) and ``render_samples(samples, step, ...)`` -> the Markdown of ``samples/step-<N>.md``
  (``samples_artifact_path(step)``). ``samples_markdown`` does both.

``tokenizer`` is a ``tokenizers.Tokenizer`` (the packed data's ``tokenizer.json``); pass the end-of-text
id as ``stop_id``: the prompt is encoded after it, as documents follow it in training, and a
continuation stops there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.model import KVCache, Transformer

# Not cuDNN attention while decoding: it builds a plan per key length (about 50 ms on an H200) and
# decoding meets a new length at every token (64 tokens of a 1B model: 3.3 s cold, 0.6 s without it).
DECODE_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# A sentence ends at . ! ? (and closing quotes/brackets) before whitespace, at CJK full stops, or at a
# line break (titles, list items and man-page lines have no final punctuation), except a line break
# inside wrapped prose: after a letter or comma and before a lowercase letter.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？]+|\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``, whitespace stripped, empty ones dropped."""
    ends = []
    for match in _SENTENCE_END.finditer(text):
        before, after = text[match.start() - 1 : match.start()], text[match.end() : match.end() + 1]
        if match.group() == "\n" and (before.isalnum() or before == ",") and after.islower():
            continue
        ends.append(match.end())
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [*ends, len(text)]:
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            first = start + len(piece) - len(piece.lstrip())
            spans.append((first, first + len(stripped)))
        start = end
    return spans


@dataclass(frozen=True)
class Prompt:
    lang: str
    text: str


def opening(text: str, min_chars: int, max_chars: int) -> str | None:
    """The first sentences of ``text``: as many as fit in ``max_chars`` (a longer first sentence is cut
    at a space), None when fewer than ``min_chars`` characters come out."""
    spans = sentence_spans(text)
    if not spans:
        return None
    start, end = spans[0]
    for _, sentence_end in spans[1:]:
        if end - start >= min_chars or sentence_end - start > max_chars:
            break
        end = sentence_end
    if end - start > max_chars:
        cut = text.rfind(" ", start, start + max_chars)
        end = cut if cut > start + min_chars else start + max_chars
    prompt = text[start:end].strip()
    return prompt if len(prompt) >= min_chars else None


def select_prompts(
    documents: Iterable[tuple[str, str]], per_language: int = 3, min_chars: int = 40, max_chars: int = 240
) -> list[Prompt]:
    """Per language (sorted), the openings of the first ``per_language`` documents that have one.

    ``documents``: ``(lang, text)`` of validation documents, in a stable order (the caller's)."""
    chosen: dict[str, list[Prompt]] = {}
    for lang, text in documents:
        prompts = chosen.setdefault(lang, [])
        if len(prompts) < per_language and (prompt := opening(text, min_chars, max_chars)):
            prompts.append(Prompt(lang, prompt))
    return [prompt for lang in sorted(chosen) for prompt in chosen[lang]]


def prompts_jsonl(prompts: list[Prompt]) -> bytes:
    """The prompts as JSONL (one object per line, keys sorted): what ``read_prompts`` reads."""
    return "".join(json.dumps(asdict(p), ensure_ascii=False, sort_keys=True) + "\n" for p in prompts).encode()


def read_prompts(path: str | Path) -> list[Prompt]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Prompt(**json.loads(line)) for line in lines if line.strip()]


@dataclass(frozen=True)
class Decoding:
    """How one continuation is drawn: temperature 0 is greedy; ``seed`` seeds its own CPU generator."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0


def next_tokens(
    logits: torch.Tensor, decodings: list[Decoding], generators: list[torch.Generator]
) -> list[int]:
    """The next id of every row of ``logits`` [rows, vocabulary]: the argmax at temperature 0, else one
    draw from the softmax of the row's top-k logits at its temperature. The top-k and the softmax run on
    the device for all rows at once; each draw is made on the CPU from the row's own generator."""
    chosen = logits.argmax(-1).tolist()
    groups: dict[tuple[float, int | None], list[int]] = {}
    for row, decoding in enumerate(decodings):
        if decoding.temperature > 0:
            groups.setdefault((decoding.temperature, decoding.top_k), []).append(row)
    for (temperature, top_k), rows in groups.items():
        scaled = logits[rows].float() / temperature
        values, ids = scaled.topk(min(top_k or scaled.shape[-1], scaled.shape[-1]), dim=-1)
        probs, ids = values.softmax(-1).cpu(), ids.cpu()
        for j, row in enumerate(rows):
            chosen[row] = int(ids[j, torch.multinomial(probs[j], 1, generator=generators[row])])
    return chosen


def decoder(model: Transformer, cache: KVCache, rows: int) -> Callable[[list[int]], torch.Tensor]:
    """After a prefill of ``cache``: a function from each row's next id to the logits [rows, vocabulary]
    of the position after it. On a GPU, ``Transformer.decode_step`` is captured once as a CUDA graph
    and replayed at every position: one launch instead of a few hundred small kernels per token, which
    is what a batch of 48 continuations spends its time on (``benchmarks/RESULTS.md``)."""
    device = cache.position.device
    if device.type != "cuda":
        return lambda fed: model.forward_cached(torch.tensor(fed, device=device)[:, None], cache)[:, -1]
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
    cache.position.fill_(cache.pos)
    warmup = torch.cuda.Stream(device)
    warmup.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(warmup):  # lazy initialisations run before the capture, as CUDA graphs need
        model.decode_step(tokens, cache)  # its keys and values are overwritten by the first real step
    torch.cuda.current_stream(device).wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode_step(tokens, cache)[:, -1]

    def step(fed: list[int]) -> torch.Tensor:
        if cache.pos >= cache.max_len:
            raise ValueError(f"{cache.pos + 1} positions exceed the cache ({cache.max_len})")
        tokens.copy_(torch.tensor(fed)[:, None])
        cache.position.fill_(cache.pos)
        graph.replay()
        cache.pos += 1
        return logits

    return step


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts_ids: list[list[int]],
    max_new_tokens: int,
    decodings: list[Decoding],
    stop_id: int | None = None,
) -> list[list[int]]:
    """One continuation per (prompt, decoding) row, all rows decoded together through one KV cache.

    The prompts must have the same number of tokens (a prompt too long for ``max_seq_len`` keeps its
    last tokens); each row is what ``generate`` gives for it alone: up to ``max_new_tokens`` ids, ending
    before ``stop_id``. A row that stopped is fed a placeholder id until every row has stopped."""
    limit = model.cfg.max_seq_len
    if not prompts_ids or not prompts_ids[0] or not 0 < max_new_tokens < limit:
        raise ValueError(f"need non-empty prompts and 0 < max_new_tokens < max_seq_len ({limit})")
    rows = [ids[-(limit - max_new_tokens) :] for ids in prompts_ids]
    if len({len(ids) for ids in rows}) != 1 or len(rows) != len(decodings):
        raise ValueError("generate_batch needs one decoding per prompt and prompts of one length")
    device = model.rope_cos.device
    cache = KVCache(model.cfg.n_layers, len(rows[0]) + max_new_tokens)
    generators = [torch.Generator().manual_seed(d.seed) for d in decodings]
    outs: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    with sdpa_kernel(DECODE_KERNELS):
        logits = model.head(model.hidden_cached(torch.tensor(rows, device=device), cache)[:, -1])
        step = decoder(model, cache, len(rows))
        while True:
            fed = next_tokens(logits, decodings, generators)
            for r, token in enumerate(fed):
                if done[r]:
                    fed[r] = 0  # a row that stopped: any id, its continuation is ignored
                elif token == stop_id:
                    done[r] = True
                else:
                    outs[r].append(token)
                    done[r] = len(outs[r]) == max_new_tokens
            if all(done):
                return outs
            logits = step(fed)


def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Up to ``max_new_tokens`` ids continuing ``prompt_ids`` (not included), ending before ``stop_id``.

    A prompt too long for ``max_seq_len`` keeps its last tokens. One forward over the prompt, then one
    position at a time through the KV cache."""
    decoding = Decoding(temperature, top_k, seed)
    return generate_batch(model, [prompt_ids], max_new_tokens, [decoding], stop_id)[0]


@dataclass(frozen=True)
class Sample:
    lang: str
    prompt: str
    greedy: str
    sampled: str


def generate_samples(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[Sample]:
    """A greedy and a sampled continuation of every prompt (sampling seeded by ``seed`` + prompt index).

    All continuations are decoded together (one position of every row per forward: 64 forwards for 64
    tokens, not 64 per continuation). With ``stop_id`` (end-of-text) every prompt follows it, as a
    document follows it in training, and a shorter prompt follows more of them, so all have one length
    (empty documents before it: in training anything may precede a document's first token). Without
    ``stop_id``, the prompts of each length are decoded together."""
    limit = model.cfg.max_seq_len - max_new_tokens
    encoded = [
        tokenizer.encode(prompt.text, add_special_tokens=False).ids[-(limit - 1) :] for prompt in prompts
    ]
    if stop_id is not None:
        width = max(map(len, encoded), default=0) + 1
        encoded = [[stop_id] * (width - len(ids)) + ids for ids in encoded]
    groups: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        groups.setdefault(min(len(ids), limit), []).append(index)
    continuations: dict[tuple[int, bool], list[int]] = {}
    for members in groups.values():
        rows = [(index, sampled) for index in members for sampled in (False, True)]
        decodings = [
            Decoding(temperature, top_k, seed + index) if sampled else Decoding() for index, sampled in rows
        ]
        outs = generate_batch(
            model, [encoded[index] for index, _ in rows], max_new_tokens, decodings, stop_id
        )
        continuations.update(zip(rows, outs, strict=True))
    return [
        Sample(
            prompt.lang,
            prompt.text,
            tokenizer.decode(continuations[index, False]),
            tokenizer.decode(continuations[index, True]),
        )
        for index, prompt in enumerate(prompts)
    ]


def samples_artifact_path(step: int) -> str:
    return f"samples/step-{step}.md"


def _fenced(text: str) -> str:
    """``text`` verbatim in a fenced block (a fence longer than any backtick run inside it)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_samples(
    samples: list[Sample],
    step: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """The Markdown of ``samples/step-<step>.md``: per language, each prompt with its continuations."""
    lines = [
        f"# Samples at step {step}",
        "",
        f"Continuations of at most {max_new_tokens} tokens of the first sentences of validation documents: "
        f"greedy, and sampled at temperature {temperature}, top-k {top_k}, seed {seed}.",
    ]
    lang = None
    for number, sample in enumerate(samples, 1):
        if sample.lang != lang:
            lang = sample.lang
            lines += ["", f"## {lang}"]
        lines += ["", f"### {number}. prompt", "", _fenced(sample.prompt)]
        lines += ["", "greedy:", "", _fenced(sample.greedy), "", "sampled:", "", _fenced(sample.sampled)]
    return "\n".join(lines) + "\n"


def samples_markdown(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    step: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> str:
    """``render_samples(generate_samples(...))``: what a checkpoint evaluation logs as
    ``samples_artifact_path(step)``."""
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    samples = generate_samples(model, tokenizer, prompts, stop_id=stop_id, **settings)
    return render_samples(samples, step, **settings)
