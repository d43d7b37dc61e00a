"""The training run's configuration: pydantic models, read from JSON or YAML.

``TrainConfig`` is what ``python -m model.trainer --config run.json`` reads: ``TrainSettings`` (what a
person chooses, the pretrain flow's run form nests it) plus where the run reads and writes, which
the flow sets. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.model import PRESETS, ModelConfig, model_config
from model.parallelize import ReshardPolicy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(_Strict):
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="applied to matrices only")
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = Field(1.0, gt=0)


class HealthConfig(_Strict):
    spike_window: int = Field(50, ge=2, description="losses in the z-score window")
    spike_min_history: int = Field(10, ge=2, description="no spike check before this many losses")
    spike_zscore: float = Field(6.0, gt=0, description="loss above mean + z * std is a spike")
    rollback_min_steps_before: int = Field(
        100,
        ge=0,
        description="a spike rolls back to the newest checkpoint at least this many steps before it "
        "(one saved inside the spike window can hold the damage); retention always keeps one",
    )
    skip_batches: int = Field(
        0,
        ge=0,
        description="batches skipped after the checkpoint rolled back to; at least all of them up to "
        "and including the spike's",
    )
    recovery_lr_factor: float = Field(
        1.0, gt=0, le=1, description="after a rollback, train recovery_lr_steps steps at lr times this"
    )
    recovery_lr_steps: int = Field(0, ge=0, description="steps of lowered lr after a rollback; 0: none")
    max_recoveries: int = Field(
        3,
        ge=0,
        description="give up (fail the run) on a spike when this many rollbacks were for spikes "
        "within recovery_window_steps steps of it",
    )
    recovery_window_steps: int = Field(1000, ge=1, description="the window max_recoveries counts in")
    debug_inject_nan_at_step: int | None = Field(None, description="test hook: that step's loss becomes NaN")
    debug_inject_spike_at_step: int | None = Field(None, description="test hook: that step's loss is scaled")
    debug_spike_factor: float = Field(20.0, description="test hook: the scale of the injected spike")
    debug_lr_blowup_data_steps: tuple[int, int] | None = Field(
        None,
        description="test hook: batches with these data steps (first, last) are poisoned: their "
        "updates use lr times debug_lr_blowup_factor, and the loss spikes on the steps after",
    )
    debug_lr_blowup_factor: float = Field(100.0, gt=0, description="test hook: the poisoned lr factor")


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="no URI: no MLflow logging")
    experiment: str = "pretrain"
    run_name: str | None = None
    run_id: str | None = Field(None, description="log into this existing run (e.g. made by the flow)")
    system_metrics_s: float | None = Field(
        10.0, gt=0, description="seconds between samples of CPU, memory and GPU use; None: off"
    )


# The form offers exactly the model's own presets (model/model.py).
ModelPreset = Literal[tuple(PRESETS)]


class TrainSettings(_Strict):
    """What a person chooses about a training run; the pretrain flow's run form shows these fields."""

    model: ModelPreset = Field("tiny", description="model size preset (model/model.py PRESETS)")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields to replace")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro-step")
    grad_accum_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps of the whole run")
    seed: int = Field(0, description="model init and data order")
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="AdamW and the learning-rate schedule"
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig, description="loss-spike detection and recovery"
    )
    log_interval: int = Field(10, ge=1, description="steps between host syncs of the metrics")
    checkpoint_interval: int = Field(
        500, ge=1, description="steps between checkpoints; the pretrain flow evaluates each new one"
    )
    keep_checkpoints: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    checkpoint_async: bool = Field(
        True,
        description="write checkpoints in the background; training waits only for the copy to host memory",
    )
    compile: bool = Field(False, description="torch.compile each transformer block")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    fsdp_reshard_after_forward: ReshardPolicy = Field(
        "auto", description="free gathered block weights after forward; auto: only for big models"
    )
    fsdp_prefetch: int = Field(1, ge=1, description="blocks gathered ahead of the one computing")
    mixed_precision: bool = Field(True, description="bf16 params/activations, fp32 reduce; GPU only")
    float8: bool = Field(False, description="blocks' linears in float8 (torchao; Hopper+, else emulated)")
    attention_kernel: Literal["default", "cudnn", "flash"] = Field(
        "default", description="SDPA kernel tried first on GPU (benchmarks/bench_train.py --sdpa)"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        model_config(name)  # one error for an unknown preset, from the model's own table
        return name

    @model_validator(mode="after")
    def _check_model(self) -> TrainSettings:
        self.model_config_for(vocab_size=PRESETS[self.model].vocab_size)
        return self

    def model_config_for(self, vocab_size: int, seq_len: int | None = None) -> ModelConfig:
        """The model's shapes: preset, then the data's vocabulary and sequence length, then overrides."""
        fields: dict[str, Any] = {"vocab_size": vocab_size}
        if seq_len is not None:
            fields["max_seq_len"] = max(seq_len, PRESETS[self.model].max_seq_len)
        unknown = set(self.model_overrides) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model_overrides: {sorted(unknown)}")
        return model_config(self.model, **{**fields, **self.model_overrides})


class EvalConfig(BaseModel):
    """How much of the validation split an eval reads, and where it runs (model/evaluate.py)."""

    max_tokens: int = Field(
        1_000_000, ge=1, description="Predicted tokens of the uniform validation sample (all if fewer)."
    )
    min_windows_per_slice: int = Field(
        2,
        ge=0,
        description="Windows every language x source slice gets at least, so small ones are measured.",
    )
    seed: int = Field(0, description="Seed of the window sample: the same data gives the same sample.")
    batch_tokens: int = Field(
        0, ge=0, description="Tokens per forward pass; 0: 65536 on GPU (fills an H100/H200), 4096 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when there is one.")
    threads: int | None = Field(None, ge=1, description="CPU threads (an eval beside a training job).")
    on_training_ranks: bool | None = Field(
        None,
        description="Evaluate each checkpoint of a training run on the training ranks between steps (the "
        "weights in memory: no process start, no load) instead of in a process of its own beside the "
        "job; empty: on the ranks when they are GPUs (benchmarks/RESULTS.md).",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the forward over validation windows (one fixed shape, built once per "
        "process: 10-30 s); empty: on the training ranks on a GPU, where it is reused at every checkpoint.",
    )
    tasks_and_samples: bool = Field(True, description="Score capability tasks and continue sample prompts.")
    tasks_dir: Path | None = Field(
        None,
        description="Capability tasks in the lm-evaluation-harness layout and the sample prompts "
        "(prompts.jsonl), as `python -m tasks.build_eval_tasks` writes them; empty: the flows build "
        "them from the data's validation documents.",
    )
    task_limit: int | None = Field(
        64,
        ge=1,
        description="Items scored per task at most (each task's first items: every language in turn); "
        "empty: all. 64 keeps a 1B eval under 5% of training time on one GPU at the default interval.",
    )
    sample_tokens: int = Field(64, ge=1, description="Tokens per sample continuation.")


class TrainConfig(TrainSettings):
    """The trainer's whole config: the settings plus where it reads and writes (set by the flow)."""

    data_dir: Path = Field(description="packed data: one immutable version, resolved by the flow")
    checkpoint_dir: Path
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    eval: EvalConfig | None = Field(
        None, description="set when each checkpoint is evaluated on the training ranks (on_training_ranks)"
    )


def load_config(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from a .json, .yaml or .yml file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return TrainConfig.model_validate(data)
