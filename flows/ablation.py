"""Data ablation: build each data recipe, train the same small proxy on each for the same token budget,
score every proxy on the same held-out text, and compare them in MLflow.

Thin orchestration (the logic is in tasks/ablation.py): each recipe's data is a data refresh run as a
subflow whose stages live in a store shared by the recipes (a stage the recipes agree on up to it runs
once, and a re-run finds everything cached); the first recipe is the baseline, its tokenizer is every
recipe's and its validation documents that no recipe trains on are the held-out set; each proxy is the
pretrain flow as a subflow; the comparison is a parent MLflow run (experiment ``ablation``) with one
child run per proxy, the table as its artifacts ``comparison.md``/``comparison.json``, and a Prefect
artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from flows.data_refresh import DataRefreshParams, crawl_files, plan
from flows.pretrain import PretrainParams, pretrain
from model import data as packed
from model.config import TrainSettings
from model.evaluate import EvalConfig
from tasks import ablation as ab
from tasks import dataset as ds
from tasks import evaluate as ev
from tasks import prefect_tasks as pt
from tasks import workdir_lock
from tasks.launchers import LocalLauncher
from tasks.prefect_artifacts import artifact_key
from tasks.run_tracking import TAG_DATA_REFRESH_RUN
from tasks.tracking import flat_params, tracking_uri


class AblationParams(BaseModel):
    """Run form of a data ablation."""

    name: str = Field(
        "ablation",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Names the parent MLflow run and prefixes the proxies' runs.",
    )
    workdir: str = Field(
        "workdir/ablation",
        description="Shared stage datasets, the held-out set, the proxies' run directories.",
    )
    base: DataRefreshParams = Field(
        default_factory=DataRefreshParams,
        description="The data-refresh parameters every recipe starts from (its workdir is not used).",
    )
    recipes: list[ab.Recipe] = Field(
        default_factory=lambda: [
            ab.Recipe(name="heuristics"),
            ab.Recipe(name="boilerplate", overrides={"boilerplate": {}}),
        ],
        min_length=2,
        description="Two or more recipes; the first is the baseline (its tokenizer and validation "
        "documents are every proxy's).",
    )
    tokens: int = Field(1_000_000, ge=1, description="Training tokens per proxy: the same budget for all.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(model="tiny", optim={"lr": 1e-2, "warmup_steps": 20}),
        description="The proxy's trainer settings (max_steps comes from `tokens`; one checkpoint, at the end).",
    )
    baseline_seeds: int = Field(
        2,
        ge=1,
        description="Proxies of the baseline recipe, seeds train.seed, +1, ...: their spread is the noise.",
    )
    eval: EvalConfig = Field(
        default_factory=lambda: EvalConfig(max_tokens=200_000, task_limit=200),
        description="The eval of every proxy on the held-out set (capability tasks built from it too).",
    )
    launcher: LocalLauncher | None = Field(
        None, description="Where proxies train. Empty: every GPU of this machine, else one CPU process."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server. Empty: $MLFLOW_TRACKING_URI, else SQLite in the workdir."
    )
    mlflow_experiment: str = Field("ablation", description="Experiment of the parent and child runs.")
    lock_wait_s: float = Field(
        default=0,
        ge=0,
        description="One ablation writes a workdir at a time: when another holds it, wait up to this many "
        "seconds, then stop with a message naming the holder. 0: stop at once.",
    )


def default_launcher() -> LocalLauncher:
    import torch

    if torch.cuda.is_available():
        return LocalLauncher(device="cuda", nproc_per_node=torch.cuda.device_count())
    return LocalLauncher(device="cpu", nproc_per_node=1)


@flow(name="ablation-recipe-data", log_prints=True, task_runner=pt.default_task_runner())
def recipe_data(params: DataRefreshParams, store: str) -> dict[str, Any]:
    """One recipe's data refresh, its stages' directories in the shared ``store``."""
    report = pt.RefreshReport()
    outputs = plan(
        params, crawl_files(params), ab.SharedStages(pt.PrefectRunner(report), params, Path(store))
    )
    report.publish()
    _, run_id = pt.log_refresh_to_mlflow(params, report)
    print(report.format_table())
    if "packed" not in outputs:
        raise ValueError(f"recipe {params.workdir}: no document left to train on")
    return {"outputs": outputs, "mlflow_run_id": run_id}


def proxies(params: AblationParams) -> list[tuple[str, int]]:
    """(recipe, training seed) of every proxy: the baseline's seeds first."""
    baseline, seed = params.recipes[0].name, params.train.seed
    return [(baseline, seed + k) for k in range(params.baseline_seeds)] + [
        (r.name, seed) for r in params.recipes[1:]
    ]


def proxy(
    params: AblationParams,
    root: Path,
    uri: str,
    client: MlflowClient,
    parent: str,
    launcher: LocalLauncher,
    recipe: ab.Recipe,
    seed: int,
    data: dict[str, Any],
    held_out: ab.HeldOutSet,
) -> dict[str, Any]:
    """Train the proxy of ``recipe`` (the pretrain flow), score it on the held-out set into its child
    run; returns its row of the comparison."""
    label = recipe.name if seed == params.train.seed else f"{recipe.name}-seed{seed}"
    packed_dir = Path(data["outputs"]["packed"])
    seq_len = packed.read_packing_info(packed_dir)["seq_len"]
    train = params.train
    steps = ab.proxy_steps(
        params.tokens, train.micro_batch_size, train.grad_accum_steps, launcher.nproc_per_node, seq_len
    )
    trained = pretrain.with_options(flow_run_name=f"{params.name}-{label}")(
        PretrainParams(
            run_name=f"{params.name}-{label}",
            data_dir=str(packed_dir),
            runs_root=str(root / "runs"),
            train=train.model_copy(update={"seed": seed, "max_steps": steps, "checkpoint_interval": steps}),
            # on its own validation split (another per recipe): a look only; the comparison is below
            eval=params.eval.model_copy(update={"tasks_and_samples": False}),
            launcher=launcher,
            mlflow_tracking_uri=uri,
        )
    )
    child = ab.start_child_run(client, parent, label, recipe, seed, held_out)
    final = ev.evaluate(
        str(trained.train.checkpoint_dir / f"step-{steps}"),
        params.eval.model_copy(update={"tasks_dir": held_out.tasks_dir}),
        str(held_out.packed_dir),
        tracking_uri=uri,
        mlflow_run_id=child,
    )
    training = client.get_run(trained.mlflow_run_id).data.metrics
    available = ab.packed_summary(packed_dir)["train_tokens"]
    row = {
        "run": label,
        "recipe": recipe.name,
        "seed": seed,
        "documents": sum(ds.read_manifest(p).rows for p in data["outputs"]["documents"]),
        "train_tokens_available": available,
        "tokens_trained": int(training.get("tokens_seen", 0)),
        "epochs": training.get("tokens_seen", 0) / max(available, 1),
        "final_train_loss": training.get("loss"),
        "eval_bpb": final.bpb,
        "eval_loss": final.loss,
        **{k: v for k, v in final.metrics.items() if k.startswith("task/") and k.endswith("/acc")},
    }
    tags = {ab.TAG_TRAINING_RUN: trained.mlflow_run_id, TAG_DATA_REFRESH_RUN: data["mlflow_run_id"]}
    ab.log_proxy(client, child, row, packed_dir, held_out, tags)
    return row


@flow(name="ablation", log_prints=True)
def ablation(params: AblationParams = AblationParams()) -> list[dict[str, Any]]:  # noqa: B008 (the UI form's defaults)
    """Build each recipe's data, train and score a proxy on each; returns the comparison rows."""
    from prefect.runtime import flow_run

    root = Path(params.workdir).resolve()
    # The recipes share its stage store, held-out set and run directories: one ablation at a time.
    with workdir_lock.hold(root, params.lock_wait_s, flow_run=flow_run.id):
        return run_ablation(params, root)


def run_ablation(params: AblationParams, root: Path) -> list[dict[str, Any]]:
    logger = get_run_logger()
    uri = tracking_uri(params.mlflow_tracking_uri, root)
    recipes = {r.name: r for r in params.recipes}
    refresh = ab.recipe_params(params.base, params.recipes, root / "data")

    data: dict[str, dict[str, Any]] = {}
    tokenizer = params.base.tokenizer_dir
    for name, recipe_refresh in refresh.items():
        update = {"mlflow_tracking_uri": uri, **({"tokenizer_dir": tokenizer} if tokenizer else {})}
        run = recipe_data.with_options(flow_run_name=f"{params.name}-{name}-data")
        data[name] = run(recipe_refresh.model_copy(update=update), str(root / "stages"))
        tokenizer = tokenizer or data[name]["outputs"]["tokenizer"]
    packed_dirs = {name: Path(d["outputs"]["packed"]) for name, d in data.items()}
    baseline = params.recipes[0].name
    held_out = ab.held_out_set(
        packed_dirs[baseline],
        packed_dirs,
        ds.resolve_version(tokenizer),
        refresh[baseline].pack,
        root / "eval",
        params.eval.tasks_and_samples,
    )
    logger.info(
        "held-out set %s: %d of the baseline's %d validation documents (the others are trained on)",
        held_out.digest[:16],
        held_out.documents,
        held_out.candidates,
    )

    client = MlflowClient(tracking_uri=uri)
    launcher = params.launcher or default_launcher()
    parent = ab.start_parent_run(
        client,
        params.mlflow_experiment,
        params.name,
        {
            "recipes": ", ".join(recipes),
            "tokens": str(params.tokens),
            "baseline_seeds": str(params.baseline_seeds),
            "eval_set": held_out.digest,
            **flat_params(params.train, "train."),
            **flat_params({r.name: r.overrides for r in params.recipes}, "recipe."),
        },
    )
    try:
        results = [
            proxy(params, root, uri, client, parent, launcher, recipes[recipe], seed, data[recipe], held_out)
            for recipe, seed in proxies(params)
        ]
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise

    rows = ab.comparison_rows(results)
    about = {
        "name": params.name,
        "proxy": f"{params.train.model}, {params.tokens:,} tokens each, "
        f"{launcher.nproc_per_node} {launcher.device} rank(s)",
        "held-out set": f"{held_out.documents} documents (digest {held_out.digest[:16]}), "
        f"the baseline's validation documents that no recipe trains on ({held_out.candidates} before)",
        "tokenizer": str(tokenizer),
    }
    markdown = ab.comparison_markdown(rows, about)
    ab.log_comparison(client, parent, rows, markdown)
    create_markdown_artifact(markdown, key=artifact_key("ablation", params.name), description="Data ablation")
    create_table_artifact(rows, key=artifact_key("ablation", params.name, "table"))
    print(markdown)
    return rows
