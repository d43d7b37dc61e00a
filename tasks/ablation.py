"""Data ablation: which data-refresh recipe trains the better model, measured the way FineWeb and DCLM
decide (a small proxy model per recipe, the same token budget, the same held-out text).

What makes the comparison fair, and cheap:

- **Shared stages.** Each recipe is the base data-refresh config plus its overrides. ``SharedStages``
  puts every stage's directories under ``<store>/<stage>-<key>/``, ``<key>`` a hash of the recipe's
  config of that stage and of every stage before it (``stage_keys``): recipes that agree up to a
  stage read and write the same datasets and done records there, so the stage runs once (a recipe
  with boilerplate removal reuses the heuristics-only ingest ... pii), and a recipe that differs
  gets its own directories, its own dedup index included, and never overwrites another's.
- **One tokenizer.** The first recipe (the baseline) trains it, or the base config names one; every
  other recipe packs with it. The token budget then means the same amount of text for every proxy.
- **One held-out set** (``build_eval_set``): the baseline's validation documents, minus any whose
  doc_id or URL is in any recipe's training split (a re-crawl of the same URL in another snapshot
  can be a training document of a recipe whose dedup kept the other copy). Every recipe packs with
  the baseline's validation split settings (``check_same_split``), so a held-out document is never
  trained on by any recipe. It is packed once with the shared tokenizer; each proxy is scored on it
  in bits per byte (``model/evaluate.py``), which would stay comparable across tokenizers too.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from model import data as packed
from model.tracking import ensure_experiment, log_batch, metric_name
from tasks import build_eval_tasks, pack, registry
from tasks import dataset as ds
from tasks import prefect_tasks as pt
from tasks import stage as st
from tasks.tracking import code_tags, dataset_input, flat_params

EVAL_STAGE = "ablation-eval"
# Data-refresh fields that change no dataset: left out of the stage keys.
NOT_DATA = {"workdir", "mlflow_tracking_uri", "mlflow_experiment", "lock_wait_s"}
# Fields that only the tokenizer and later stages read.
TOKENIZER_FIELDS = {"build_training_data", "tokenizer_dir"}
# The validation split: the same for every recipe, or held-out documents would be trained on.
SPLIT_FIELDS = ("seed", "validation_fraction")


class Recipe(BaseModel):
    """One data recipe: a name and its data-refresh parameter overrides."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Names its child run and proxy.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Data-refresh parameters that differ from the base, nested as in its form, e.g. "
        "{boilerplate: {}} turns boilerplate removal on with its defaults.",
    )


# ---------------------------------------------------------------------------------------------
# Recipes -> data-refresh parameters, and the stages they share


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def recipe_params(base: BaseModel, recipes: list[Recipe], workdir: Path) -> dict[str, BaseModel]:
    """Each recipe's data-refresh parameters (``base``'s class), in recipe order; ``workdir`` is the
    name under which ``SharedStages`` finds their directories."""
    names = [r.name for r in recipes]
    if len(recipes) < 2 or len(set(names)) != len(names):
        raise ValueError(f"an ablation needs two or more recipes with distinct names, got {names}")
    start = base.model_dump(mode="json")
    out = {
        r.name: type(base).model_validate(merged(start, {**r.overrides, "workdir": str(workdir)}))
        for r in recipes
    }
    check_same_split(out)
    return out


def check_same_split(params: dict[str, BaseModel]) -> None:
    """Every recipe must split validation like the first: else its training data holds eval documents."""
    (first, reference), *others = params.items()
    for name, p in others:
        for field in SPLIT_FIELDS:
            if getattr(p.pack, field) != getattr(reference.pack, field):
                raise ValueError(
                    f"recipe {name} sets pack.{field} = {getattr(p.pack, field)}, recipe {first} "
                    f"{getattr(reference.pack, field)}: the validation split must be the same for every recipe"
                )


def stage_keys(params: BaseModel) -> dict[str, str]:
    """Per stage, a hash of everything its datasets depend on: the crawl selection, its own config
    and code, and the configs and code of every stage before it (registry order). A field the key
    does not know is counted for every stage: two recipes then share less, never a dataset that
    differs. Code counts because of the persistent indexes (dedup, boilerplate): a snapshot redone
    by changed code upstream must not meet its own earlier version in the index."""
    data = {k: v for k, v in params.model_dump(mode="json").items() if k not in NOT_DATA}
    upstream = {k: v for k, v in data.items() if k not in registry.STAGES and k not in TOKENIZER_FIELDS}
    keys = {}
    for name, spec in registry.STAGES.items():
        upstream[name] = {"config": data.get(name), "code": spec.code_version()}
        if name == "tokenizer":
            upstream.update({k: data.get(k) for k in TOKENIZER_FIELDS})
        encoded = json.dumps(upstream, sort_keys=True, separators=(",", ":")).encode()
        keys[name] = hashlib.sha256(encoded).hexdigest()[:12]
    return keys


class SharedStages:
    """A data-refresh ``Runner`` that moves each stage's directories (output, scratch, published root)
    from ``workdir/<rel>`` to ``store/<stage>-<key>/<rel>`` (``stage_keys``), then lets ``runner`` run
    or inspect the stage there. With ``PrefectRunner`` the usual cache applies: a stage whose
    directory holds the done record of the same work is not run again."""

    def __init__(self, runner: pt.Runner, params: BaseModel, store: Path):
        self.runner = runner
        self.workdir = Path(params.workdir).resolve()
        self.store = store.resolve()
        self.keys = stage_keys(params)

    def directory(self, stage: str, path: Path) -> Path:
        return self.store / f"{stage}-{self.keys[stage]}" / Path(path).resolve().relative_to(self.workdir)

    def shard_stage(
        self, stage: str, config: BaseModel, source: list[str] | pt.Output, output_dir: Path, snapshot: str
    ) -> pt.Output:
        return self.runner.shard_stage(stage, config, source, self.directory(stage, output_dir), snapshot)

    def dataset_stage(
        self,
        stage: str,
        config: BaseModel,
        inputs: list[pt.Output],
        output_dir: Path,
        snapshot: str | None = None,
        *,
        reads: dict[str, pt.Output] | None = None,
        after: pt.Output | None = None,
        scratch: dict[str, Path] | None = None,
        publish_to: Path | None = None,
    ) -> pt.Output:
        return self.runner.dataset_stage(
            stage,
            config,
            inputs,
            self.directory(stage, output_dir),
            snapshot,
            reads=reads,
            after=after,
            scratch={k: self.directory(stage, v) for k, v in (scratch or {}).items()},
            publish_to=self.directory(stage, publish_to) if publish_to else None,
        )

    def document_count(self, dataset: pt.Output) -> int:
        return self.runner.document_count(dataset)


# ---------------------------------------------------------------------------------------------
# The proxy's budget


def proxy_steps(tokens: int, micro_batch_size: int, grad_accum_steps: int, ranks: int, seq_len: int) -> int:
    """Optimizer steps that train on at least ``tokens`` tokens (the same budget for every recipe)."""
    return max(1, math.ceil(tokens / (micro_batch_size * grad_accum_steps * ranks * seq_len)))


def packed_summary(packed_dir: Path) -> dict[str, int]:
    """Training documents and tokens of a packed dataset, by split."""
    splits = packed.read_packing_info(packed_dir)["splits"]
    return {
        f"{split}_{what}": int(splits.get(split, {}).get(what, 0))
        for split in ("train", "validation")
        for what in ("documents", "tokens")
    }


# ---------------------------------------------------------------------------------------------
# The fixed held-out set


def _packed_documents(packed_dir: Path, split: str, columns: list[str]) -> pa.Table:
    table = pq.read_table(packed_dir / packed.DOCUMENTS_FILE, columns=[*columns, "split"])
    return table.filter(pc.equal(table.column("split"), split)).drop_columns(["split"])


def build_eval_set(baseline_packed: Path, recipes_packed: dict[str, Path], output_dir: Path) -> ds.Manifest:
    """Write the held-out documents (their full rows, text included) as a dataset in ``output_dir``:
    the validation documents of ``baseline_packed`` whose doc_id and URL no recipe trains on."""
    candidates = _packed_documents(baseline_packed, "validation", ["doc_id", "url", "input", "shard", "row"])
    trained_ids: set[str] = set()
    trained_urls: set[str] = set()
    for packed_dir in recipes_packed.values():
        train = _packed_documents(packed_dir, "train", ["doc_id", "url"])
        trained_ids.update(train.column("doc_id").to_pylist())
        trained_urls.update(u for u in train.column("url").to_pylist() if u)
    held_out = [
        row
        for row in candidates.to_pylist()
        if row["doc_id"] not in trained_ids and row["url"] not in trained_urls
    ]
    if not held_out:
        raise ValueError(
            f"no held-out document: every validation document of {baseline_packed} is trained on by "
            "some recipe (raise pack.validation_fraction)"
        )
    inputs = ds.read_manifest(baseline_packed).inputs
    tables = []
    for (source, shard), rows in _by_shard(held_out).items():
        table = pq.read_table(ds.shard_paths(inputs[source].path)[shard])
        picked = table.take(pa.array([r["row"] for r in rows]))
        if picked.column("doc_id").to_pylist() != [r["doc_id"] for r in rows]:
            raise ValueError(f"{inputs[source].path}: the baseline's documents moved since it was packed")
        tables.append(picked)
    documents = pa.concat_tables(tables, promote_options="default")
    documents = documents.take(pc.sort_indices(documents, [("doc_id", "ascending")]))
    output_dir.mkdir(parents=True, exist_ok=True)
    shard = ds.write_table(documents, output_dir / st.shard_name(0))
    manifest = ds.Manifest(
        stage=EVAL_STAGE,
        schema=ds.schema_description(documents.schema),
        shards=[shard],
        config={
            "from": "baseline validation documents",
            "excluded": "doc_id or URL in any recipe's train split",
        },
        code_version=st.code_version(sys.modules[__name__]),
        inputs=[ds.input_ref(baseline_packed), *(ds.input_ref(p) for p in recipes_packed.values())],
        stats={
            "docs_in": candidates.num_rows,
            "kept": documents.num_rows,
            "dropped": {"trained_on_by_a_recipe": candidates.num_rows - documents.num_rows},
        },
    )
    ds.write_manifest(output_dir, manifest)
    return manifest


def _by_shard(rows: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["input"], row["shard"]), []).append(row)
    return dict(sorted(groups.items()))


def pack_eval_set(
    documents_dir: Path, tokenizer_dir: Path, config: pack.PackConfig, output_dir: Path
) -> Path:
    """The held-out documents packed with ``tokenizer_dir``, all in the validation split: they are the
    baseline's validation documents, and ``config`` is the baseline's split (same seed and fraction)."""
    if not (output_dir / ds.MANIFEST).is_file():
        pack.pack_datasets([documents_dir], tokenizer_dir, output_dir, config)
    trained = packed_summary(output_dir)["train_documents"]
    if trained:
        raise ValueError(f"{output_dir}: {trained} held-out documents fell in the train split")
    return output_dir


# ---------------------------------------------------------------------------------------------
# The comparison


COLUMNS = {
    "run": "proxy",
    "recipe": "recipe",
    "seed": "seed",
    "documents": "documents kept",
    "train_tokens_available": "train tokens (data)",
    "tokens_trained": "tokens trained",
    "epochs": "epochs",
    "final_train_loss": "final train loss",
    "eval_bpb": "held-out bpb",
    "delta_bpb": "Δ bpb vs baseline",
    "eval_loss": "held-out loss",
}


def comparison_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per proxy, with its bpb difference to the mean of the baseline recipe's proxies."""
    baseline = results[0]["recipe"]
    reference = [r["eval_bpb"] for r in results if r["recipe"] == baseline]
    mean = sum(reference) / len(reference)
    return [{**r, "delta_bpb": r["eval_bpb"] - mean} for r in results]


def noise(rows: list[dict[str, Any]]) -> float | None:
    """The spread (max - min) of the held-out bpb of the baseline's seeds; None with one seed."""
    values = [r["eval_bpb"] for r in rows if r["recipe"] == rows[0]["recipe"]]
    return max(values) - min(values) if len(values) > 1 else None


def _cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if column.startswith("delta") else f"{value:.4f}"
    return str(value)


def comparison_markdown(rows: list[dict[str, Any]], about: dict[str, Any]) -> str:
    """The comparison table and what it was measured on, as Markdown."""
    task_columns = sorted({k for r in rows for k in r if k.startswith("task/")})
    columns = [*COLUMNS, *task_columns]
    lines = [
        f"# Data ablation {about['name']}",
        "",
        *(f"- {key}: {value}" for key, value in about.items() if key != "name"),
        "",
        "| " + " | ".join(COLUMNS.get(c, c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c, "")) for c in columns) + " |")
    spread = noise(rows)
    lines += [
        "",
        f"Noise: the baseline's seeds differ by {spread:.4f} bpb; smaller differences between recipes "
        "are not evidence."
        if spread is not None
        else "Noise: one seed per recipe; run the baseline with more seeds (`baseline_seeds`) to see it.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Prefect tasks and MLflow


class HeldOutSet(BaseModel):
    """The fixed eval set of an ablation: documents, packed with the shared tokenizer, task folder."""

    documents_dir: Path
    packed_dir: Path
    tasks_dir: Path | None
    digest: str = Field(description="dataset_digest of the held-out documents (the same for every proxy).")
    candidates: int = Field(description="Validation documents of the baseline.")
    documents: int = Field(description="Of those, trained on by no recipe: the eval set.")


@task(name="held-out-set", cache_policy=NO_CACHE)
def held_out_set(
    baseline_packed: Path,
    recipes_packed: dict[str, Path],
    tokenizer_dir: Path,
    config: pack.PackConfig,
    root: Path,
    with_tasks: bool,
) -> HeldOutSet:
    """Build (once per set of inputs: a re-run finds it) the held-out set under ``root/<key>/``."""
    parts = [ds.dataset_digest(p) for p in [baseline_packed, *recipes_packed.values(), tokenizer_dir]]
    key = hashlib.sha256(json.dumps([parts, config.model_dump(mode="json")]).encode()).hexdigest()[:16]
    folder = root / key
    documents_dir = folder / "documents"
    if not ds.manifest_path(documents_dir).is_file():
        build_eval_set(baseline_packed, recipes_packed, documents_dir)
    packed_dir = pack_eval_set(documents_dir, tokenizer_dir, config, folder / "packed")
    tasks_dir = folder / "tasks"
    if with_tasks and not (tasks_dir / "build.json").is_file():
        source = {"packed": str(packed_dir), "packed_digest": ds.dataset_digest(packed_dir)}
        build_eval_tasks.write_task_folder(
            build_eval_tasks.read_validation_documents(packed_dir), tasks_dir, source=source
        )
    manifest = ds.read_manifest(documents_dir)
    return HeldOutSet(
        documents_dir=documents_dir,
        packed_dir=packed_dir,
        tasks_dir=tasks_dir if with_tasks else None,
        digest=ds.dataset_digest(documents_dir),
        candidates=manifest.stats["docs_in"],
        documents=manifest.rows,
    )


PARENT_TAG = "mlflow.parentRunId"
TAG_EVAL_SET = "ablation.eval_set_digest"
TAG_TRAINING_RUN = "ablation.training_run_id"


def start_parent_run(client: MlflowClient, experiment: str, name: str, params: dict[str, str]) -> str:
    """A new parent run (one per ablation run: a re-run logs again, from the cached data and proxies)."""
    run_id = client.create_run(
        ensure_experiment(client, experiment), run_name=name, tags=code_tags()
    ).info.run_id
    log_batch(client, run_id, params=params)
    return run_id


def start_child_run(
    client: MlflowClient, parent_id: str, label: str, recipe: Recipe, seed: int, held_out: HeldOutSet
) -> str:
    """A child run of ``parent_id`` for one proxy: params = the recipe's overrides and the seed."""
    parent = client.get_run(parent_id)
    run_id = client.create_run(
        parent.info.experiment_id,
        run_name=label,
        tags={
            PARENT_TAG: parent_id,
            TAG_EVAL_SET: held_out.digest,
            "ablation.recipe": recipe.name,
            **code_tags(),
        },
    ).info.run_id
    params = {"recipe": recipe.name, "seed": str(seed), **flat_params(recipe.overrides, "overrides.")}
    if not recipe.overrides:
        params["overrides"] = "{} (the base config)"
    log_batch(client, run_id, params=params)
    return run_id


def log_proxy(
    client: MlflowClient,
    run_id: str,
    row: dict[str, Any],
    packed_dir: Path,
    held_out: HeldOutSet,
    tags: dict[str, str],
) -> None:
    """A proxy's data and training figures (the eval is logged by tasks.evaluate), its datasets and links."""
    metrics = {
        "train/loss_final": row["final_train_loss"],
        "train/tokens": row["tokens_trained"],
        "train/epochs": row["epochs"],
        "data/documents_kept": row["documents"],
        "data/train_tokens": row["train_tokens_available"],
        "eval_set/documents": held_out.documents,
    }
    log_batch(client, run_id, metrics={k: v for k, v in metrics.items() if v is not None}, tags=tags)
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(dataset_input(packed_dir, "packed")._to_mlflow_entity(), [_context("training")]),
            DatasetInput(
                dataset_input(held_out.documents_dir, "eval-set")._to_mlflow_entity(),
                [_context("evaluation")],
            ),
        ],
    )
    client.set_terminated(run_id)


def _context(value: str) -> InputTag:
    return InputTag(MLFLOW_DATASET_CONTEXT, value)


def log_comparison(client: MlflowClient, parent_id: str, rows: list[dict[str, Any]], markdown: str) -> None:
    """The comparison table on the parent run (Markdown + JSON) and each proxy's bpb as a metric."""
    client.log_text(parent_id, markdown, "comparison.md")
    client.log_dict(parent_id, rows, "comparison.json")
    metrics = {metric_name("eval_bpb", r["run"]): r["eval_bpb"] for r in rows}
    if (spread := noise(rows)) is not None:
        metrics["noise/baseline_bpb_spread"] = spread
    log_batch(client, parent_id, metrics=metrics)
    client.set_terminated(parent_id)
