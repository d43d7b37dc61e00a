"""Evaluate a checkpoint: validation loss, bits per byte and next-token accuracy, overall, per language,
per source and per slice, on a fixed sample of the packed validation split.

Plain torch + numpy (no Prefect): ``tasks/evaluate.py`` logs what this returns, and the benchmark runs it
directly. The model is built plain (no FSDP, one process) from the run's ``run.json`` and its weights are
read from the DCP checkpoint (DCP reshards whatever world size wrote it); on a GPU it runs in bf16.

What is measured, and why this way:

- **Sample.** Every validation window gets a fixed pseudo-random number (seeded by ``EvalConfig.seed``):
  the windows below a threshold are a uniform sample of about ``max_tokens`` tokens, and each slice
  (language x source) also gets its ``min_windows_per_slice`` lowest-numbered windows, so a small slice
  is still measured. A window is run once, whatever slices it holds.
- **Estimates.** Each slice's evaluated sums are scaled by (its predicted tokens in the split / its
  evaluated tokens): a stratified estimate, so the overall, per-language and per-source numbers weigh
  every slice by its share of the split however densely it was sampled (with every window evaluated
  they are the exact totals).
- **Bits per byte** = summed NLL / (ln 2 x UTF-8 bytes of the text), over the predicted tokens that are
  text. The bytes come from the token ids: byte-level BPE decodes a sequence by concatenating the bytes
  of its tokens, so a table of UTF-8 byte lengths per token id counts them exactly; special tokens
  (end-of-text) are no text: 0 bytes, and their NLL stays out of BPB (it is in ``loss``). The text is
  the one the tokenizer saw: NFC-normalised (web text almost always is already; else bytes may differ).
- **Attribution.** A predicted token belongs to the document whose placement holds it (its
  end-of-text included), and so to that document's language and source (``documents.parquet``).

Where it runs: ``evaluate_checkpoint`` loads a checkpoint in a process of its own (``pretrain evaluate``;
the CPU path); ``TrainingEval`` evaluates the model being trained on its own ranks between steps (the
trainer's hook when its config has an ``eval``; the GPU path): no process start, no checkpoint read, a
compiled scorer reused at every checkpoint, the windows split over the ranks (benchmarks/RESULTS.md).

With ``EvalConfig.tasks_dir`` (a folder as ``python -m tasks.build_eval_tasks`` writes it) the eval also
scores its capability tasks (model/capability.py: ``task/<name>/acc``, ``task/<name>/acc_norm``) and
continues its sample prompts (model/generate.py: ``samples/step-<N>.md``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel, Field
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from model import capability, generate
from model import data as packed
from model.checkpoint import COMPLETE
from model.config import EvalConfig, TrainConfig, load_config
from model.model import Transformer
from model.run_dir import RunDir

LN2 = math.log(2.0)
EMBEDDING_KEY = "model.tok_embeddings.weight"  # in the trainer's DCP checkpoints


class EvalInputError(ValueError):
    """An input an eval cannot use (incomplete checkpoint, missing data, vocabulary mismatch); the
    message is one line naming the cause."""


class Row(BaseModel):
    """One line of the eval table: overall, a language, a source or a slice."""

    kind: Literal["overall", "lang", "source", "slice"]
    name: str
    loss: float
    bpb: float | None = Field(description="None when the evaluated tokens hold no text byte.")
    accuracy: float
    tokens: int = Field(description="Predicted tokens evaluated.")
    tokens_in_split: int = Field(description="Predicted tokens of the split (what the sample stands for).")
    bytes: int = Field(description="UTF-8 bytes of the evaluated tokens.")


class EvalResult(BaseModel):
    checkpoint: str
    step: int
    data_dir: str
    loss: float = Field(description="Mean NLL per predicted token (end-of-text included), all slices.")
    bpb: float
    accuracy: float
    tokens: int
    windows: int
    seconds: float
    device: str
    metrics: dict[str, float] = Field(description="MLflow metrics at the step: val/loss, val/bpb, ...")
    table: list[Row]
    tasks: list[dict[str, Any]] = Field(default_factory=list, description="model.capability.TaskResult's")
    samples_markdown: str | None = Field(None, description="samples/step-<N>.md (model/generate.py).")

    def artifacts(self) -> dict[str, str]:
        """Artifact path -> text: ``eval/step-<N>.json``, ``eval/step-<N>.md`` (+ ``samples/step-<N>.md``)."""
        out = {
            f"eval/step-{self.step}.json": self.model_dump_json(indent=2, exclude={"samples_markdown"})
            + "\n",
            f"eval/step-{self.step}.md": eval_table_markdown(self),
        }
        if self.samples_markdown is not None:
            out[generate.samples_artifact_path(self.step)] = self.samples_markdown
        return out


# ---------------------------------------------------------------------------------------------
# Inputs: checkpoint, run config, data, tokenizer


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step of a complete checkpoint (its COMPLETE marker); EvalInputError for anything else."""
    marker = Path(checkpoint) / COMPLETE
    if not marker.is_file():
        raise EvalInputError(
            f"{checkpoint} is not a complete checkpoint: no {COMPLETE} marker (a save in progress, "
            "killed, or not a checkpoint directory)"
        )
    return int(json.loads(marker.read_text())["step"])


def run_config(checkpoint: str | Path) -> TrainConfig:
    """The run's TrainConfig (``<run>/run.json`` beside ``checkpoints/``)."""
    path = RunDir.of_checkpoint(checkpoint).config_path
    if not path.is_file():
        raise EvalInputError(f"no {path.name} in {path.parent}: {checkpoint} is not inside a run directory")
    return load_config(path)


def checkpoint_vocab_size(checkpoint: str | Path) -> int:
    """Rows of the checkpoint's embedding table, read from the DCP metadata (no weights loaded)."""
    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    if EMBEDDING_KEY not in meta:
        raise EvalInputError(f"{checkpoint} holds no {EMBEDDING_KEY}: not a checkpoint of this trainer")
    return int(meta[EMBEDDING_KEY].size[0])


def packed_info(data_dir: str | Path, what: str) -> dict[str, Any]:
    """``packing.json`` of the data, with a one-line error naming ``what`` when it is gone."""
    try:
        return packed.read_packing_info(data_dir)
    except FileNotFoundError:
        raise EvalInputError(
            f"{what} {data_dir} no longer exists (or is not packed data); evaluate on another "
            "version with --data"
        ) from None
    except ValueError as exc:  # e.g. packed in another format version
        raise EvalInputError(str(exc)) from None


@dataclass(frozen=True)
class EvalInputs:
    """Everything an eval reads, checked: a bad input fails here, before any weight is loaded."""

    checkpoint: Path
    step: int
    config: TrainConfig
    data_dir: Path
    info: dict[str, Any]
    tokenizer: Tokenizer
    vocab_size: int


def resolve_inputs(checkpoint: str | Path, data_dir: str | Path | None = None) -> EvalInputs:
    """Check a checkpoint and its data: the run's pinned data version (``run.json``'s ``data_dir``) or
    ``data_dir``. Raises EvalInputError for an incomplete checkpoint, missing data, no validation split,
    or a checkpoint whose vocabulary is not the tokenizer's."""
    checkpoint = Path(checkpoint).resolve()
    step = checkpoint_step(checkpoint)
    config = run_config(checkpoint)
    data = Path(data_dir).resolve() if data_dir else Path(config.data_dir)
    info = packed_info(data, "data directory" if data_dir else "the run's data version (run.json data_dir)")
    if not info["splits"].get("validation", {}).get("sequences"):
        raise EvalInputError(f"{data} has no validation sequences to evaluate on")
    tokenizer = Tokenizer.from_file(info["tokenizer"])
    tokenizer.encode_special_tokens = True  # as the data was encoded: "<|endoftext|>" in text is text
    vocab = checkpoint_vocab_size(checkpoint)
    if vocab != info["vocab_size"] or tokenizer.get_vocab_size() > vocab:
        raise EvalInputError(
            f"vocabulary mismatch: {checkpoint.name} has {vocab} token embeddings, the tokenizer of "
            f"{data} has {tokenizer.get_vocab_size()} tokens (packed vocab_size {info['vocab_size']})"
        )
    return EvalInputs(checkpoint, step, config, data, info, tokenizer, vocab)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_model(inputs: EvalInputs, device: torch.device) -> Transformer:
    """The checkpoint's weights in a plain Transformer on ``device``, in eval mode; bf16 weights on a GPU
    (as the trainer's mixed precision computes; the RoPE tables stay fp32)."""
    cfg = inputs.config.model_config_for(vocab_size=inputs.vocab_size, seq_len=inputs.info["seq_len"])
    with torch.device(device):
        model = Transformer(cfg)
    # The trainer saved get_state_dict(model, ...)["model"]; the same API here gives the same keys.
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=inputs.checkpoint, no_dist=True)
    set_model_state_dict(model, state["model"])
    if device.type == "cuda":
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Bytes per token


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it encodes (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_byte_lengths(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes each token id decodes to (int64, ``size`` entries: ids the tokenizer lacks get 0).

    Special tokens are 0: they are markup, not text. A vocabulary entry made of anything but the
    byte-level alphabet is an error (then decoding would not be plain byte concatenation).
    """
    alphabet = byte_level_alphabet()
    table = np.zeros(size or tokenizer.get_vocab_size(), dtype=np.int64)
    added = tokenizer.get_added_tokens_decoder()
    for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
        if token_id in added or token_id >= len(table):
            continue
        if any(char not in alphabet for char in token):
            raise ValueError(f"token {token_id} ({token!r}) is not byte-level BPE: bytes per token unknown")
        table[token_id] = len(token)
    for token_id, token in added.items():
        if not token.special and token_id < len(table):
            table[token_id] = len(token.content.encode("utf-8"))
    return table


# ---------------------------------------------------------------------------------------------
# Which validation tokens belong to which slice, and which windows are evaluated


@dataclass(frozen=True)
class Slices:
    """The split's documents grouped into slices (language x source)."""

    names: list[tuple[str, str]]  # (lang, source) per slice id
    doc_start: np.ndarray  # stream position of each document (placements order)
    doc_slice: np.ndarray  # slice id of each document
    doc_end: np.ndarray  # one past its end-of-text


def validation_slices(data_dir: Path) -> Slices:
    placements = np.asarray(packed.read_placements(data_dir, "validation"))
    documents = pq.read_table(Path(data_dir) / packed.DOCUMENTS_FILE, columns=["lang", "source"])
    rows = placements[:, 2]
    pairs = list(
        zip(
            np.asarray(documents.column("lang").to_pylist(), dtype=object)[rows],
            np.asarray(documents.column("source").to_pylist(), dtype=object)[rows],
            strict=True,
        )
    )
    names = sorted(set(pairs))
    index = {name: i for i, name in enumerate(names)}
    return Slices(
        names=names,
        doc_start=placements[:, 0],
        doc_slice=np.array([index[p] for p in pairs], dtype=np.int64),
        doc_end=placements[:, 0] + placements[:, 1] + 1,
    )


def slice_of_positions(slices: Slices, positions: np.ndarray) -> np.ndarray:
    """Slice id of each stream position (the document whose placement holds it)."""
    doc = np.searchsorted(slices.doc_start, positions, side="right") - 1
    return slices.doc_slice[np.maximum(doc, 0)]


def predicted_tokens_per_slice(slices: Slices, sequences: int, window: int) -> np.ndarray:
    """Predicted tokens of the split per slice: positions inside the whole windows that are not a
    window's first token (that one is input only)."""
    end = sequences * window
    a = np.minimum(slices.doc_start, end)
    b = np.minimum(slices.doc_end, end)
    firsts = np.where(b > a, (b - 1) // window - (a + window - 1) // window + 1, 0)
    return np.bincount(slices.doc_slice, weights=(b - a) - firsts, minlength=len(slices.names)).astype(
        np.int64
    )


def sample_windows(slices: Slices, sequences: int, window: int, config: EvalConfig) -> np.ndarray:
    """Sorted indices of the windows to evaluate (see the module docstring)."""
    u = np.random.default_rng(config.seed).random(sequences)
    wanted = min(sequences, math.ceil(config.max_tokens / (window - 1)))
    chosen = np.zeros(sequences, dtype=bool)
    chosen[np.argsort(u, kind="stable")[:wanted]] = True
    if config.min_windows_per_slice:
        first = slices.doc_start // window
        last = np.minimum((slices.doc_end - 1) // window, sequences - 1)
        for s in range(len(slices.names)):
            docs = np.flatnonzero((slices.doc_slice == s) & (first < sequences))
            if not len(docs):
                continue
            spans = [np.arange(first[d], last[d] + 1) for d in docs]
            candidates = np.unique(np.concatenate(spans))
            chosen[candidates[np.argsort(u[candidates], kind="stable")[: config.min_windows_per_slice]]] = (
                True
            )
    return np.flatnonzero(chosen)


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class SliceSums:
    """Per slice (tensors of [slices], on the eval's device): what the evaluated tokens add up to."""

    tokens: torch.Tensor
    nll: torch.Tensor  # every predicted token
    correct: torch.Tensor
    text_nll: torch.Tensor  # predicted tokens with at least one byte
    bytes: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> SliceSums:
        return cls(*(torch.zeros(n, dtype=torch.float64, device=device) for _ in range(5)))

    def add(
        self, slice_ids: torch.Tensor, nll: torch.Tensor, correct: torch.Tensor, nbytes: torch.Tensor
    ) -> None:
        ids = slice_ids.flatten()
        self.tokens.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        self.nll.index_add_(0, ids, nll.flatten().double())
        self.correct.index_add_(0, ids, correct.flatten().double())
        self.text_nll.index_add_(0, ids, torch.where(nbytes > 0, nll, 0).flatten().double())
        self.bytes.index_add_(0, ids, nbytes.flatten().double())

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).cpu().numpy() for k in ("tokens", "nll", "correct", "text_nll", "bytes")}


WindowScorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def window_scorer(model: torch.nn.Module, compiled: bool) -> WindowScorer:
    """(inputs, targets) [B, T] -> per-position NLL (fp32) and argmax hit. Compiled, the model and the
    scoring are one graph: the NLL and argmax read the bf16 logits in fused kernels instead of an fp32
    copy per chunk (benchmarks/RESULTS.md)."""

    def score(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return capability.target_nll(model(inputs), targets)

    return torch.compile(score, dynamic=False) if compiled else score


@torch.inference_mode()
def score_windows(
    score: WindowScorer,
    windows: Iterator[tuple[np.ndarray, np.ndarray]],
    byte_lengths: np.ndarray,
    n_slices: int,
    device: torch.device,
    batch: int,
) -> dict[str, np.ndarray]:
    """Sums per slice over ``windows``: batches of (tokens [B, seq_len + 1], slice id of each target
    [B, seq_len]), B <= ``batch``. Every forward has the same shape (a short last batch is padded with
    windows counted in a slice of their own, dropped), so a compiled model or an attention kernel plan
    is built once. NLL in fp32; nothing waits for the device until the end."""
    sums = SliceSums.zeros(n_slices + 1, device)  # the last slice collects the padding
    table = torch.from_numpy(byte_lengths).to(device)
    for tokens_np, slice_np in windows:
        if len(tokens_np) < batch:
            pad = batch - len(tokens_np)
            tokens_np = np.concatenate([tokens_np, np.zeros((pad, tokens_np.shape[1]), tokens_np.dtype)])
            slice_np = np.concatenate([slice_np, np.full((pad, slice_np.shape[1]), n_slices, slice_np.dtype)])
        tokens = torch.from_numpy(tokens_np.astype(np.int64))
        slice_ids = torch.from_numpy(slice_np)
        if device.type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
            slice_ids = slice_ids.pin_memory().to(device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        nll, correct = score(inputs, targets)
        sums.add(slice_ids, nll, correct, table[targets])
    return {name: values[:n_slices] for name, values in sums.numpy().items()}


def window_batches(
    data_dir: Path, info: dict[str, Any], indices: np.ndarray, slices: Slices, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, slice id per target) for the windows ``indices``, ``batch`` windows at a time."""
    window = info["window"]
    shards = packed.open_shards(data_dir, "validation", info)
    shard_starts = np.cumsum([0, *[len(s) for s in shards]])
    for i in range(0, len(indices), batch):
        chunk = indices[i : i + batch]
        shard_of = np.searchsorted(shard_starts, chunk, side="right") - 1
        rows = np.stack([shards[s][w - shard_starts[s]] for s, w in zip(shard_of, chunk, strict=True)])
        positions = chunk[:, None] * window + np.arange(1, window)[None, :]
        yield rows, slice_of_positions(slices, positions)


# ---------------------------------------------------------------------------------------------
# From sums to metrics


def _row(kind: str, name: str, sums: dict[str, float], in_split: int) -> Row:
    tokens = sums["tokens"]
    return Row(
        kind=kind,
        name=name,
        loss=sums["nll"] / tokens,
        bpb=sums["text_nll"] / (LN2 * sums["bytes"]) if sums["bytes"] else None,
        accuracy=sums["correct"] / tokens,
        tokens=round(sums["evaluated"]),
        tokens_in_split=in_split,
        bytes=round(sums["evaluated_bytes"]),
    )


def eval_table(slices: Slices, sums: dict[str, np.ndarray], in_split: np.ndarray) -> list[Row]:
    """Rows per slice (their own sums) and overall / per language / per source (slices' sums scaled
    up to the split: the stratified estimate)."""
    measured = np.flatnonzero(sums["tokens"] > 0)
    scale = np.zeros(len(slices.names))
    scale[measured] = in_split[measured] / sums["tokens"][measured]
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for s in measured.tolist():
        lang, source = slices.names[s]
        groups[("overall", "all")].append(s)
        groups[("lang", lang)].append(s)
        groups[("source", source)].append(s)
        groups[("slice", f"{lang}/{source}")].append(s)

    def total(members: list[int], weights: np.ndarray) -> dict[str, float]:
        out = {k: float((v[members] * weights[members]).sum()) for k, v in sums.items()}
        out["evaluated"] = float(sums["tokens"][members].sum())
        out["evaluated_bytes"] = float(sums["bytes"][members].sum())
        return out

    order = {"overall": 0, "lang": 1, "source": 2, "slice": 3}
    rows = []
    for (kind, name), members in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        weights = np.ones(len(scale)) if kind == "slice" else scale
        rows.append(_row(kind, name, total(members, weights), int(in_split[members].sum())))
    return rows


def metrics_of(table: list[Row]) -> dict[str, float]:
    """The chart keys: overall loss, BPB and accuracy; BPB per language and per source."""
    overall = next(r for r in table if r.kind == "overall")
    metrics = {"val/loss": overall.loss, "val/accuracy": overall.accuracy}
    if overall.bpb is not None:
        metrics["val/bpb"] = overall.bpb
    for row in table:
        if row.bpb is not None and row.kind == "lang":
            metrics[f"val/bpb/{row.name}"] = row.bpb
        elif row.bpb is not None and row.kind == "source":
            metrics[f"val/bpb/source/{row.name}"] = row.bpb
    return metrics


def eval_table_markdown(result: EvalResult) -> str:
    lines = [
        f"# Eval of step {result.step}",
        "",
        f"Checkpoint `{result.checkpoint}`, data `{result.data_dir}`: {result.tokens:,} predicted tokens "
        f"in {result.windows:,} windows, {result.seconds:.1f} s on {result.device}.",
        "",
        "| kind | name | loss | bpb | accuracy | tokens evaluated | tokens in split | bytes evaluated |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.table:
        bpb = f"{r.bpb:.4f}" if r.bpb is not None else "-"
        lines.append(
            f"| {r.kind} | {r.name} | {r.loss:.4f} | {bpb} | {r.accuracy:.4f} | {r.tokens:,} "
            f"| {r.tokens_in_split:,} | {r.bytes:,} |"
        )
    if result.tasks:
        lines += ["", "| task | items | acc | acc_norm | chance |", "|---|---:|---:|---:|---:|"]
        for t in result.tasks:
            cells = [f"{t[k]:.4f}" if t[k] is not None else "-" for k in ("acc", "acc_norm", "chance")]
            lines.append(f"| {t['name']} | {t['items']:,} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The eval


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_checkpoint(
    checkpoint: str | Path, config: EvalConfig | None = None, data_dir: str | Path | None = None
) -> EvalResult:
    """Evaluate ``checkpoint`` on the validation split of its run's pinned data (or ``data_dir``)."""
    config = config or EvalConfig()
    with torch_threads(config.threads):
        started = time.perf_counter()
        inputs = resolve_inputs(checkpoint, data_dir)
        device = pick_device(config.device)
        model = load_model(inputs, device)
        return evaluate_model(model, inputs, config, device, started)


def evaluate_model(
    model: Transformer,
    inputs: EvalInputs,
    config: EvalConfig,
    device: torch.device,
    started: float | None = None,
    *,
    scorer: WindowScorer | None = None,
    rank: int = 0,
    world: int = 1,
) -> EvalResult | None:
    """The metrics of a loaded model (see ``evaluate_checkpoint``), tasks and samples included.

    ``scorer``: what scores the validation windows (``window_scorer``, kept by the caller so a compiled
    one is built once); default the model's, compiled when ``config.compile``. With
    ``world`` > 1 (a process group of ``world`` ranks, each with the whole model), rank ``rank`` scores
    every ``world``-th window and the sums are all-reduced; rank 0 then scores the tasks, continues
    the prompts and returns the result, the other ranks return None at once."""
    started = time.perf_counter() if started is None else started
    info = inputs.info
    window, sequences = info["window"], info["splits"]["validation"]["sequences"]
    slices = validation_slices(inputs.data_dir)
    indices = sample_windows(slices, sequences, window, config)
    batch_tokens = config.batch_tokens or (65536 if device.type == "cuda" else 4096)
    batch = max(1, min(batch_tokens // info["seq_len"], -(-len(indices) // world)))
    sums = score_windows(
        scorer or window_scorer(model, bool(config.compile)),
        window_batches(inputs.data_dir, info, indices[rank::world], slices, batch),
        token_byte_lengths(inputs.tokenizer, inputs.vocab_size),
        len(slices.names),
        device,
        batch,
    )
    if world > 1:
        import torch.distributed as dist

        stacked = torch.from_numpy(np.stack(list(sums.values()))).to(device)
        dist.all_reduce(stacked)
        sums = dict(zip(sums, stacked.cpu().numpy(), strict=True))
        if rank:
            return None
    table = eval_table(slices, sums, predicted_tokens_per_slice(slices, sequences, window))
    overall = table[0]
    metrics = metrics_of(table)
    tasks, samples_markdown = [], None
    if config.tasks_and_samples and config.tasks_dir is not None:
        if not Path(config.tasks_dir).is_dir():
            raise EvalInputError(f"no capability task folder {config.tasks_dir}")
        try:
            tasks_defined = capability.load_tasks(config.tasks_dir)
        except capability.TaskError as exc:
            raise EvalInputError(f"capability tasks: {exc}") from None
        with torch.inference_mode():
            results = capability.evaluate_tasks(
                model, inputs.tokenizer, tasks_defined,
                prefix_id=info["eot_id"], batch_tokens=batch_tokens, limit=config.task_limit,
            )  # fmt: skip
            metrics.update(capability.task_metrics(results))
            tasks = [asdict(r) for r in results.values()]
            prompts = Path(config.tasks_dir) / "prompts.jsonl"
            if prompts.is_file():
                samples_markdown = generate.samples_markdown(
                    model, inputs.tokenizer, generate.read_prompts(prompts), inputs.step,
                    max_new_tokens=config.sample_tokens, stop_id=info["eot_id"],
                )  # fmt: skip
    return EvalResult(
        checkpoint=str(inputs.checkpoint),
        step=inputs.step,
        data_dir=str(inputs.data_dir),
        loss=overall.loss,
        bpb=overall.bpb if overall.bpb is not None else float("nan"),
        accuracy=overall.accuracy,
        tokens=overall.tokens,
        windows=len(indices),
        seconds=time.perf_counter() - started,
        device=str(device),
        metrics=metrics,
        table=table,
        tasks=tasks,
        samples_markdown=samples_markdown,
    )


# ---------------------------------------------------------------------------------------------
# The eval on the training ranks


TRAINING_EVALS = "evals"  # <run>/evals/step-<N>.json: the results of the evals on the training ranks


def training_eval_path(checkpoint: str | Path) -> Path:
    """Where the eval on the training ranks leaves the result of ``<run>/checkpoints/step-N``."""
    checkpoint = Path(checkpoint)
    return RunDir.of_checkpoint(checkpoint).root / TRAINING_EVALS / f"{checkpoint.name}.json"


def read_training_eval(checkpoint: str | Path, timeout_s: float, poll_s: float = 1.0) -> EvalResult:
    """The result the training ranks wrote for ``checkpoint``, waiting up to ``timeout_s`` for it (the
    final checkpoint is complete before its eval is); EvalInputError when none comes."""
    path = training_eval_path(checkpoint)
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise EvalInputError(f"no eval of {checkpoint} from the training ranks after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return EvalResult.model_validate_json(path.read_text())


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """``source``'s parameters into ``target``'s of the same names: FSDP shards (DTensors) gathered one
    parameter at a time, the name parts of activation-checkpoint and compile wrappers dropped."""
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            params[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)


class TrainingEval:
    """Evaluate the model being trained at its checkpoints, on the training ranks between steps.

    No process to start and no checkpoint to read: each rank keeps a plain copy of the model (bf16 on a
    GPU: 2 bytes per parameter, kept between checkpoints so a compiled scorer is built once), gathers
    the sharded weights into it, scores its share of the validation windows; the sums are all-reduced
    and rank 0 scores the tasks, continues the prompts and writes the result to
    ``training_eval_path(checkpoint)``, which the pretrain flow logs (tasks/evaluate.py).
    """

    def __init__(self, config: TrainConfig, rank: int, world: int, device: torch.device) -> None:
        assert config.eval is not None
        self.config, self.rank, self.world, self.device = config.eval, rank, world, device
        info = packed_info(config.data_dir, "the run's data version (data_dir)")
        tokenizer = Tokenizer.from_file(info["tokenizer"])
        tokenizer.encode_special_tokens = True  # as the data was encoded
        self.inputs = EvalInputs(
            config.checkpoint_dir, 0, config, Path(config.data_dir), info, tokenizer, info["vocab_size"]
        )
        shapes = config.model_config_for(vocab_size=info["vocab_size"], seq_len=info["seq_len"])
        with torch.device(device), default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32):
            self.model = Transformer(shapes).eval()  # the RoPE tables are fp32 whatever the default
        compiled = self.config.compile if self.config.compile is not None else device.type == "cuda"
        self.scorer = window_scorer(self.model, compiled)

    def __call__(self, model: torch.nn.Module, step: int) -> EvalResult | None:
        """Evaluate ``model`` (sharded or plain) as the checkpoint of ``step``; the result on rank 0."""
        started = time.perf_counter()
        copy_weights(model, self.model)
        checkpoint = Path(self.inputs.checkpoint) / f"step-{step}"
        inputs = replace(self.inputs, checkpoint=checkpoint, step=step)
        with torch_threads(self.config.threads):
            result = evaluate_model(
                self.model, inputs, self.config, self.device, started,
                scorer=self.scorer, rank=self.rank, world=self.world,
            )  # fmt: skip
        if result is not None:
            path = training_eval_path(checkpoint)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".json.tmp")
            partial.write_text(result.model_dump_json())
            partial.replace(path)  # whole or absent: the flow reads it once it exists
        return result


_training_eval: TrainingEval | None = None


def evaluate_on_training_ranks(
    model: torch.nn.Module, config: TrainConfig, step: int, rank: int, world: int, device: torch.device
) -> EvalResult | None:
    """The trainer's hook: ``TrainingEval`` of this process (made at its first checkpoint) on ``model``."""
    global _training_eval
    if _training_eval is None:
        _training_eval = TrainingEval(config, rank, world, device)
    return _training_eval(model, step)
