"""Capability tasks scored by log-likelihood, defined in the lm-evaluation-harness layout.

A task folder holds YAML task definitions and their local data, as lm-eval's ``--include_path``
takes them (HellaSwag, ARC, PIQA, LAMBADA or a domain task, wherever the user has the data)::

    task: next_sentence
    dataset_path: json                      # local JSON Lines (or one JSON array); nothing downloaded
    dataset_kwargs:
      data_files: {validation: next_sentence.jsonl}   # relative to the YAML's folder
    validation_split: validation            # test_split wins when both are given, as in lm-eval
    output_type: multiple_choice            # or loglikelihood (LAMBADA-style: acc = greedy match)
    doc_to_text: "{{context}}"              # a field name, a Jinja template or !function module.fn
    doc_to_choice: choices                  # a field, a template rendering a Python list, a list
    doc_to_target: label                    # an index or the text of the right choice
    target_delimiter: " "                   # default " ", between context and choice
    description: ""                         # optional, prepended to every context
    include: base.yaml                      # optional: the base's keys, overridden by this file's

Templates are rendered like lm-eval's (Jinja, strict undefined, the ``regex_replace`` filter), in a
sandbox. ``!function utils.fn`` loads ``utils.py`` from the YAML's folder (it is the user's code, as
in lm-eval); ``process_docs`` additionally needs the ``datasets`` package. Few-shot contexts and
multiple-input tasks (Winogrande) are not supported: such a task is a one-line ``TaskError``.

Scoring is lm-eval's: each choice is the continuation ``target_delimiter + choice`` of the context
(whitespace at the context's end moves into the continuation); its log-likelihood is the sum of the
continuation tokens' log-probabilities, contexts truncated on the left to ``max_seq_len``.
``acc``: the most likely choice is the right one; ``acc_norm``: the same with log-likelihoods divided
by the choice's length in characters (lm-eval's ``completion_len``; bytes only differ off ASCII).
One deviation: every context starts with ``prefix_id`` when given (our end-of-text: documents follow
it in training), where lm-eval adds a prefix token only to empty contexts.

API (``model/evaluate.py`` uses these; ``tasks/build_eval_tasks.py`` writes our own three tasks):

- ``load_tasks(folder) -> list[Task]``: every ``*.yaml`` below ``folder`` that defines a task (group
  files and include-only bases are skipped), sorted by name.
- ``evaluate_tasks(model, tokenizer, tasks, prefix_id=, batch_tokens=, limit=) -> {name: TaskResult}``.
- ``target_nll(logits, targets)``: per-position NLL and argmax hit without an fp32 copy of the logits
  (the validation scoring uses it too).
- ``task_metrics(results) -> {"task/<name>/acc": ..., "task/<name>/acc_norm": ...}`` for MLflow.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from tokenizers import Tokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.model import KVCache, Transformer

OUTPUT_TYPES = ("multiple_choice", "loglikelihood")


class TaskError(ValueError):
    """A task definition or its data that cannot be used; the message is one line naming the file."""


# -- task definitions -------------------------------------------------------------------------------


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0, ignorecase: bool = False) -> str:
    return re.compile(pattern, flags=re.I if ignorecase else 0).sub(repl, string, count=count)


_JINJA = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = _regex_replace


@dataclass(frozen=True)
class _FunctionRef:
    """``!function module.name`` in a YAML file, resolved against that file's folder."""

    name: str
    folder: Path


def _yaml_loader(folder: Path) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(
        "!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node), folder)
    )
    return Loader


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file with its ``include`` chain merged (the including file's keys win)."""
    if path in seen:
        raise TaskError(f"{path}: include cycle")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader(path.parent)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TaskError(f"{path}: unreadable YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise TaskError(f"{path}: not a mapping")
    if "include" in config:
        base = _read_yaml(path.parent / config.pop("include"), (*seen, path))
        config = {**base, **config}
    return config


def _resolve_function(ref: _FunctionRef, source: Path) -> Callable[..., Any]:
    module_name, _, attr = ref.name.rpartition(".")
    module_path = ref.folder / f"{module_name.replace('.', '/')}.py"
    if not module_name or not module_path.is_file():
        raise TaskError(f"{source}: !function {ref.name}: no {module_path}")
    key = f"_capability_task_{abs(hash(module_path))}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, module_path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise TaskError(f"{source}: !function {ref.name}: {type(exc).__name__}: {exc}") from None
        sys.modules[key] = module
    if not hasattr(module, attr):
        raise TaskError(f"{source}: !function {ref.name}: {module_path.name} has no {attr}")
    return getattr(module, attr)


def _read_json_docs(path: Path, source: Path) -> list[dict[str, Any]]:
    """JSON Lines, or one JSON array of objects."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"{source}: cannot read data file {path} ({exc.strerror})") from None
    try:
        if text.lstrip().startswith("["):
            docs = json.loads(text)
        else:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise TaskError(f"{source}: {path.name} is not JSON Lines ({exc.msg}, line {exc.lineno})") from None
    if not all(isinstance(doc, dict) for doc in docs):
        raise TaskError(f"{source}: {path.name} holds non-object rows")
    return docs


def _split_files(config: dict[str, Any], source: Path) -> dict[str, list[Path]]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") != "json" or files is None:
        raise TaskError(
            f"{source}: only local data is read: dataset_path json with dataset_kwargs.data_files "
            f"(got dataset_path {config.get('dataset_path')!r})"
        )
    if not isinstance(files, dict):
        files = {"train": files}  # as the datasets json loader names a single split
    return {
        split: [source.parent / p for p in ([paths] if isinstance(paths, str) else paths)]
        for split, paths in files.items()
    }


@dataclass(frozen=True)
class Item:
    """One scored question: the context, the choices (without the delimiter) and the right choice."""

    context: str
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str
    target_delimiter: str
    items: list[Item]
    source: Path


class _Fields:
    """lm-eval's doc_to_text / doc_to_choice / doc_to_target over one task's documents."""

    def __init__(self, config: dict[str, Any], source: Path) -> None:
        self.config, self.source = config, source

    def _value(self, key: str, doc: dict[str, Any]) -> Any:
        spec = self.config.get(key)
        try:
            if isinstance(spec, _FunctionRef):
                return _resolve_function(spec, self.source)(doc)
            if isinstance(spec, str):
                return doc[spec] if spec in doc else _JINJA.from_string(spec).render(**doc)
        except TaskError:
            raise
        except Exception as exc:  # the user's template or function: one line naming the task file
            raise TaskError(
                f"{self.source}: {key}: {type(exc).__name__}: {' '.join(str(exc).split())}"
            ) from None
        return spec

    def text(self, doc: dict[str, Any]) -> str:
        """The context: ``description`` (if any) then ``doc_to_text``."""
        description = self._value("description", doc) or ""
        text = self._value("doc_to_text", doc)
        if not isinstance(text, str) or (text.isdigit() and self.config.get("doc_to_choice") is not None):
            raise TaskError(
                f"{self.source}: doc_to_text must give the context text (multiple-input tasks unsupported)"
            )
        return description + text

    def choices(self, doc: dict[str, Any]) -> list[str]:
        choices = self._value("doc_to_choice", doc)
        if isinstance(choices, str) and isinstance(self.config.get("doc_to_choice"), str):
            try:
                choices = ast.literal_eval(choices)
            except (ValueError, SyntaxError):
                raise TaskError(
                    f"{self.source}: doc_to_choice does not render a list: {choices[:80]!r}"
                ) from None
        if isinstance(choices, dict):
            choices = list(choices.values())
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{self.source}: doc_to_choice must give a non-empty list of strings")
        return choices

    def target(self, doc: dict[str, Any], choices: list[str] | None) -> int | str:
        target = self._value("doc_to_target", doc)
        if isinstance(target, str) and target not in (choices or []) and target.strip().isdigit():
            target = int(target)
        if choices is None:
            if not isinstance(target, str):
                raise TaskError(f"{self.source}: a loglikelihood task's doc_to_target must give text")
            return target
        if isinstance(target, str):
            if target not in choices:
                raise TaskError(f"{self.source}: target {target[:60]!r} is not one of the choices")
            target = choices.index(target)
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise TaskError(f"{self.source}: target {target!r} is not a choice index (of {len(choices)})")
        return target


def load_task(path: str | Path) -> Task:
    """One task from its YAML file (see the module docstring for the keys read)."""
    source = Path(path)
    config = _read_yaml(source)
    name = config.get("task")
    if not isinstance(name, str):
        raise TaskError(f"{source}: no task name (a group file?)")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(
            f"{source}: output_type {output_type!r} is not scored here (only {', '.join(OUTPUT_TYPES)})"
        )
    if config.get("num_fewshot"):
        raise TaskError(
            f"{source}: few-shot contexts are not supported (num_fewshot {config['num_fewshot']})"
        )
    files = _split_files(config, source)
    split = (
        config.get("test_split")
        or config.get("validation_split")
        or (next(iter(files)) if len(files) == 1 else None)
    )
    if split not in files:
        raise TaskError(f"{source}: split {split!r} is not in data_files ({', '.join(files)})")
    docs = [doc for file in files[split] for doc in _read_json_docs(file, source)]
    if isinstance(process := config.get("process_docs"), _FunctionRef):
        try:
            import datasets  # lm-eval's process_docs functions take and return a datasets.Dataset
        except ImportError:
            raise TaskError(
                f"{source}: process_docs needs the datasets package; preprocess the JSONL instead"
            ) from None
        docs = list(_resolve_function(process, source)(datasets.Dataset.from_list(docs)))
    fields = _Fields(config, source)
    items = []
    for doc in docs:
        context = fields.text(doc)
        if output_type == "multiple_choice":
            choices = fields.choices(doc)
            items.append(Item(context, choices, fields.target(doc, choices)))
        else:
            items.append(Item(context, [fields.target(doc, None)], 0))
    if not items:
        raise TaskError(f"{source}: split {split!r} holds no documents")
    return Task(name, output_type, str(config.get("target_delimiter", " ")), items, source)


def load_tasks(folder: str | Path) -> list[Task]:
    """Every task defined by a ``*.yaml`` file below ``folder``, sorted by name; one-line errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskError(f"{folder}: no such task folder")
    tasks = []
    for path in sorted(folder.rglob("*.yaml")):
        if isinstance(_read_yaml(path).get("task"), str):
            tasks.append(load_task(path))
    names = [task.name for task in tasks]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise TaskError(f"{folder}: task names defined twice: {', '.join(duplicates)}")
    return sorted(tasks, key=lambda task: task.name)


# -- scoring ----------------------------------------------------------------------------------------


def encode_requests(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]], prefix_id: int | None
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation), split as lm-eval does: the whole
    string is encoded and the continuation is what follows the context's own encoding."""
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        moved.append((context[: len(context) - spaces], context[len(context) - spaces :] + continuation))
    contexts = tokenizer.encode_batch([c for c, _ in moved], add_special_tokens=False)
    wholes = tokenizer.encode_batch([c + x for c, x in moved], add_special_tokens=False)
    prefix = [] if prefix_id is None else [prefix_id]
    requests = []
    for context, whole in zip(contexts, wholes, strict=True):
        requests.append((prefix + context.ids, whole.ids[len(context.ids) :]))
    return requests


NLL_CHUNK_TOKENS = 8192  # positions whose logits are upcast to fp32 at a time
WIDTH_STEP = 8  # widths are rounded up to a multiple of this (tensor cores); eager kernels take any shape
# Not cuDNN attention for the tasks' many widths: it builds a plan per shape (tens of ms each on an H200).
TASK_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: the fp32 negative log-likelihood of the target and whether it is the argmax.

    The logits stay in the model's dtype (bf16 on a GPU); each chunk of ``NLL_CHUNK_TOKENS`` positions is
    upcast on its own, so no fp32 copy of the whole [positions, vocabulary] tensor (8.6 GB for 64k
    tokens of a 32k vocabulary) is ever made, and only the target's log-probability is kept.
    """
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    nll = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
    correct = torch.empty(flat_targets.shape, dtype=torch.bool, device=logits.device)
    for a in range(0, len(flat_targets), NLL_CHUNK_TOKENS):
        chunk, wanted = flat[a : a + NLL_CHUNK_TOKENS].float(), flat_targets[a : a + NLL_CHUNK_TOKENS]
        nll[a : a + len(wanted)] = chunk.logsumexp(-1) - chunk.gather(-1, wanted[:, None]).squeeze(-1)
        correct[a : a + len(wanted)] = chunk.argmax(-1) == wanted
    return nll.view(targets.shape), correct.view(targets.shape)


def _round_up(n: int) -> int:
    return -(-n // WIDTH_STEP) * WIDTH_STEP


@torch.no_grad()
def loglikelihoods(
    model: Transformer, requests: list[tuple[list[int], list[int]]], batch_tokens: int = 16384
) -> list[tuple[float, bool]]:
    """Per (context, continuation) ids: the summed log-probability of the continuation and whether it
    is the greedy continuation.

    The requests of one context (a multiple-choice item's choices) share one pass over it: a batch's
    contexts are left-padded to one width and run through a KV cache (``Transformer.hidden_cached``;
    padding slots masked), then the continuations run after their own context's cached keys and
    values, in runs of similar length (each run padded to its own longest), and logits are made only
    at the scored positions. A batch holds about ``batch_tokens`` positions; the host waits for the
    device once, at the end. A context longer than the model's window keeps its last tokens, as many
    as the longest continuation of that context leaves room for (lm-eval cuts per continuation)."""
    max_len = model.cfg.max_seq_len
    contexts: dict[tuple[int, ...], list[int]] = {}  # context ids -> the requests that continue it
    for i, (context, continuation) in enumerate(requests):
        if not continuation or not context:
            raise ValueError("a request needs a non-empty context (or prefix_id) and continuation")
        contexts.setdefault(tuple(context), []).append(i)
    continuations = [continuation[-max_len:] for _, continuation in requests]
    groups = []  # (context ids kept, request ids), the longest contexts first
    for context, members in contexts.items():
        room = max_len + 1 - max(len(continuations[i]) for i in members)
        groups.append((list(context[-room:]), members))
    groups.sort(key=lambda group: -len(group[0]))
    scores, greedy, order = [], [], []
    with sdpa_kernel(TASK_KERNELS):
        start = 0
        while start < len(groups):
            longest = len(groups[start][0])  # the groups are sorted: the batch's longest context
            end, positions, steps = start, 0, 0
            while end < len(groups):  # a group alone always fits; more while the batch fits
                members = groups[end][1]
                more = _round_up(longest) + sum(len(continuations[i]) - 1 for i in members)
                longest_steps = max(steps, *(len(continuations[i]) - 1 for i in members))
                if end > start and (positions + more > batch_tokens or longest + longest_steps > max_len):
                    break
                positions, steps, end = positions + more, longest_steps, end + 1
            batch = groups[start:end]
            ll, hit = _score_batch(model, batch, continuations)
            scores.append(ll)
            greedy.append(hit)
            order += [i for _, members in batch for i in members]
            start = end
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    if order:
        ordered = zip(order, torch.cat(scores).tolist(), torch.cat(greedy).tolist(), strict=True)
        for i, ll, hit in ordered:
            results[i] = (ll, hit)
    return results


def _runs_by_length(lengths: list[int]) -> list[list[int]]:
    """The indices of the non-zero ``lengths``, longest first, in runs whose lengths stay above 2/3 of
    the run's first: each run is padded to its own longest, so short continuations do not pay for long
    ones."""
    runs: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if not lengths[r]:
            break
        if runs and 3 * lengths[r] >= 2 * lengths[runs[-1][0]]:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _score_batch(
    model: Transformer, groups: list[tuple[list[int], list[int]]], continuations: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-likelihood, greedy) of each request of ``groups``, in their order, on the device."""
    device, max_len = model.rope_cos.device, model.cfg.max_seq_len
    members = [i for _, m in groups for i in m]
    # The rest of each continuation after its first token: fed its tokens but the last.
    step_lens = [len(continuations[i]) - 1 for i in members]
    longest_context = max(len(context) for context, _ in groups)
    step_width = min(_round_up(max(step_lens)), max_len - longest_context)
    context_width = min(_round_up(longest_context), max_len - step_width)
    contexts = torch.zeros(len(groups), context_width, dtype=torch.long)
    key_valid = torch.ones(len(groups), context_width + step_width, dtype=torch.bool)
    for g, (context, _) in enumerate(groups):
        contexts[g, context_width - len(context) :] = torch.tensor(context)
        key_valid[g, : context_width - len(context)] = False
    context_of = torch.tensor([g for g, (_, m) in enumerate(groups) for _ in m])
    firsts = torch.tensor([continuations[i][0] for i in members])

    cache = KVCache(model.cfg.n_layers, context_width + step_width, key_valid.to(device))
    last = model.head(model.hidden_cached(contexts.to(device), cache)[:, -1])
    nll, correct = target_nll(last.index_select(0, context_of.to(device)), firsts.to(device))
    misses = torch.zeros(len(members), device=device)
    for run in _runs_by_length(step_lens):
        width = min(_round_up(step_lens[run[0]]), step_width)
        steps = torch.zeros(len(run), width, dtype=torch.long)
        scored_at, targets, row_of = [], [], []  # flat positions, made here: the device is never asked
        for j, r in enumerate(run):
            continuation = continuations[members[r]]
            steps[j, : step_lens[r]] = torch.tensor(continuation[:-1])
            scored_at += range(j * width, j * width + step_lens[r])
            targets += continuation[1:]
            row_of += [r] * step_lens[r]
        run_cache = cache.rows(context_of[run].to(device))
        hidden = model.hidden_cached(steps.to(device), run_cache).flatten(0, 1)
        picked = hidden.index_select(0, torch.tensor(scored_at, device=device))
        step_nll, step_correct = target_nll(model.head(picked), torch.tensor(targets, device=device))
        rows = torch.tensor(row_of, device=device)
        nll = nll.index_add(0, rows, step_nll)
        misses = misses.index_add(0, rows, (~step_correct).float())
    return -nll, correct & (misses == 0)


@dataclass(frozen=True)
class TaskResult:
    """``acc`` (and, for multiple choice, ``acc_norm`` and ``chance``: the mean of 1 / choices);
    ``perplexity`` of the targets for loglikelihood tasks."""

    name: str
    items: int
    acc: float
    acc_norm: float | None = None
    chance: float | None = None
    perplexity: float | None = None

    def metrics(self) -> dict[str, float]:
        values = {"acc": self.acc, "acc_norm": self.acc_norm, "perplexity": self.perplexity}
        return {f"task/{self.name}/{key}": value for key, value in values.items() if value is not None}


def task_result(task: Task, items: list[Item], scores: list[list[tuple[float, bool]]]) -> TaskResult:
    """The task's metrics from each item's (log-likelihood, is greedy) per choice."""
    n = len(items)
    if task.output_type == "loglikelihood":
        hits = sum(choice_scores[0][1] for choice_scores in scores)
        mean_ll = sum(choice_scores[0][0] for choice_scores in scores) / n
        return TaskResult(task.name, n, hits / n, perplexity=math.exp(-mean_ll))
    hits = hits_norm = 0
    for item, choice_scores in zip(items, scores, strict=True):
        lls = [ll for ll, _ in choice_scores]
        normed = [ll / max(len(choice), 1) for ll, choice in zip(lls, item.choices, strict=True)]
        hits += lls.index(max(lls)) == item.gold  # first of equal maxima, as numpy's argmax
        hits_norm += normed.index(max(normed)) == item.gold
    chance = sum(1 / len(item.choices) for item in items) / n
    return TaskResult(task.name, n, hits / n, hits_norm / n, chance)


def evaluate_tasks(
    model: Transformer,
    tokenizer: Tokenizer,
    tasks: list[Task],
    *,
    prefix_id: int | None = None,
    batch_tokens: int = 16384,
    limit: int | None = None,
) -> dict[str, TaskResult]:
    """Score every task (its first ``limit`` items if given) with one batched pass over all requests.

    Run the model as it should be evaluated (``eval()``, device, autocast): this only calls it."""
    pairs = [
        (item.context, task.target_delimiter + choice)
        for task in tasks
        for item in task.items[:limit]
        for choice in item.choices
    ]
    scores = iter(loglikelihoods(model, encode_requests(tokenizer, pairs, prefix_id), batch_tokens))
    results = {}
    for task in tasks:
        items = task.items[:limit]
        per_item = [[next(scores) for _ in item.choices] for item in items]
        results[task.name] = task_result(task, items, per_item)
    return results


def task_metrics(results: dict[str, TaskResult]) -> dict[str, float]:
    """``task/<name>/acc`` and ``task/<name>/acc_norm`` (``task/<name>/perplexity``) of every task."""
    return {key: value for result in results.values() for key, value in result.metrics().items()}
