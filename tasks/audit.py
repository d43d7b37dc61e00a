"""Audit samples: for every rule and language, a few dropped and a few kept documents to read.

Counts say how much a filter drops, not whether it is right: a person has to read what it dropped
and what it let through. For one stage's dataset (its kept documents and its ``rejects/``), per
language: a random sample of the kept documents, and for every rule that dropped documents of that
language a random sample of them with the rule's detail; each text cut readably. A dropped
document's language is the ``lang=`` its stage wrote first in the detail (langid, quality and the
classifier all do); without one it is "-".

Samples are deterministic for a given dataset: a document is chosen by the hash of (seed, doc_id),
the ``k`` smallest per cell, so neither shard order nor the number of workers changes them, and
memory is bounded by the sample sizes (one streaming pass over the kept documents and the rejects).
The data refresh publishes each audited stage's sample as a Prefect Markdown artifact and as the
MLflow artifact ``audit/<snapshot>/<stage>.md`` of its run.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks import dataset as ds
from tasks.prefect_artifacts import artifact_key

_DETAIL_LANG = re.compile(r"^lang=(\S+)")
_BACKTICKS = re.compile(r"`+")


class AuditConfig(BaseModel):
    """Which stages' decisions are sampled for people to check, and how much of them."""

    stages: list[str] = Field(
        default_factory=lambda: ["langid", "quality", "classifier"],
        description="Stages whose kept and dropped documents are sampled (those that ran). Empty: no audit.",
    )
    dropped_per_rule: int = Field(3, ge=0, description="Dropped documents per rule and language.")
    kept_per_language: int = Field(3, ge=0, description="Kept documents per language.")
    max_chars: int = Field(600, ge=80, description="Characters of each text shown (cut at a line or word).")
    seed: int = Field(0, description="Which documents are drawn; the same seed draws the same ones.")


@dataclass
class Sample:
    """The ``size`` documents of one cell (a language, or a language and a rule) with the smallest
    draws, out of ``total`` offered."""

    size: int
    total: int = 0
    _heap: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # (-draw, order, row)

    def offer(self, draw: int, row: dict[str, Any]) -> None:
        self.total += 1
        entry = (-draw, self.total, row)  # a max-heap of the kept draws: its root is the one to evict
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif self._heap and entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def rows(self) -> list[dict[str, Any]]:
        """The sampled rows, smallest draw first."""
        return [row for *_, row in sorted(self._heap, key=lambda entry: entry[:2], reverse=True)]


def draw(seed: int, doc_id: str) -> int:
    """A document's place in the random order of ``seed``: the same for it in any shard or run."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "big")


@dataclass
class Audit:
    """Samples of one stage's dataset: kept per language, dropped per (language, rule)."""

    stage: str
    dataset: str
    config: AuditConfig
    kept: dict[str, Sample] = field(default_factory=dict)
    dropped: dict[tuple[str, str], Sample] = field(default_factory=dict)

    def languages(self) -> list[str]:
        return sorted({*self.kept, *(lang for lang, _ in self.dropped)})


def audit_dataset(dataset_dir: str | Path, config: AuditConfig | None = None) -> Audit:
    """Sample a stage's dataset: its kept documents and its dropped ones (``rejects/``)."""
    config = config or AuditConfig()
    dataset_dir = Path(dataset_dir)
    manifest = ds.read_manifest(dataset_dir)
    result = Audit(manifest.stage, str(dataset_dir), config)
    columns = {c["name"] for c in manifest.schema_}
    wanted = [c for c in ("doc_id", "url", "lang", "text") if c in columns]
    for row in ds.iter_rows(dataset_dir, columns=wanted):
        lang = row.get("lang") or "-"
        sample = result.kept.setdefault(lang, Sample(config.kept_per_language))
        sample.offer(draw(config.seed, str(row["doc_id"])), row)
    rejects = dataset_dir / "rejects"
    if ds.manifest_path(rejects).is_file():
        for row in ds.iter_rows(rejects, columns=["doc_id", "url", "kind", "rule", "detail", "text"]):
            if row["kind"] != "dropped":
                continue  # quarantined: broken input, not a filter's decision
            found = _DETAIL_LANG.match(row["detail"] or "")
            cell = (found.group(1) if found else "-", row["rule"])
            sample = result.dropped.setdefault(cell, Sample(config.dropped_per_rule))
            sample.offer(draw(config.seed, str(row["doc_id"])), row)
    return result


def excerpt(text: str | None, max_chars: int) -> str:
    """The start of ``text``, cut at a line end or else a space near ``max_chars``, saying what was left out."""
    if not text:
        return "(no text)"
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", max_chars // 2, max_chars)
    if cut < 0:
        cut = text.rfind(" ", max_chars // 2, max_chars)
    cut = cut if cut > 0 else max_chars
    return f"{text[:cut].rstrip()}\n[… {len(text) - cut} more characters]"


def _block(text: str) -> list[str]:
    """A fenced block that no run of backticks inside the text can close."""
    fence = "`" * max(3, 1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    return [f"{fence}text", text, fence]


def _heading_line(row: dict[str, Any]) -> str:
    parts = [f"`{row.get('doc_id')}`"]
    if row.get("url"):
        parts.append(f"<{row['url']}>")
    if row.get("detail"):
        parts.append(f"— {row['detail']}")
    return " ".join(parts)


def audit_markdown(audit: Audit, title: str) -> str:
    """The audit as Markdown: a summary table, then per language its kept and dropped samples."""
    config = audit.config
    lines = [
        f"# Audit: {title}",
        "",
        f"Dataset `{audit.dataset}`. Random samples (seed {config.seed}): up to {config.kept_per_language} "
        f"kept documents per language and {config.dropped_per_rule} dropped per rule and language; texts "
        f"cut at about {config.max_chars} characters (the rejects keep the first 2,000).",
        "",
        "| language | kept | dropped | dropped by rule |",
        "|---|---:|---:|---|",
    ]
    for lang in audit.languages():
        rules = Counter(
            {rule: s.total for (cell_lang, rule), s in audit.dropped.items() if cell_lang == lang}
        )
        kept = audit.kept[lang].total if lang in audit.kept else 0
        by_rule = ", ".join(
            f"{rule} {n}" for rule, n in sorted(rules.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        lines.append(f"| {lang} | {kept} | {rules.total()} | {by_rule} |")
    for lang in audit.languages():
        lines += ["", f"## {lang}"]
        cells = [("kept", audit.kept.get(lang))]
        cells += [
            (f"dropped by {rule}", sample)
            for (cell_lang, rule), sample in sorted(audit.dropped.items())
            if cell_lang == lang
        ]
        for name, sample in cells:
            if sample is None or not sample.total:
                continue
            rows = sample.rows()
            lines += ["", f"### {name} ({len(rows)} of {sample.total})"]
            for row in rows:
                lines += ["", _heading_line(row), "", *_block(excerpt(row.get("text"), config.max_chars))]
    return "\n".join(lines) + "\n"


def audited(datasets: dict[str, str], config: AuditConfig) -> dict[str, Path]:
    """Of a refresh's datasets (MLflow name ``<snapshot>/<stage>`` -> directory), those to audit."""
    return {
        name: Path(path)
        for name, path in datasets.items()
        if "/" in name and name.rsplit("/", 1)[1] in config.stages
    }


def publish_audits(
    datasets: dict[str, str], config: AuditConfig, mlflow_uri: str | None, run_id: str | None
) -> dict[str, str]:
    """Audit every filtering stage of a refresh: a Prefect Markdown artifact each and, with a run,
    the MLflow artifact ``audit/<snapshot>/<stage>.md``. Returns name -> Markdown."""
    from prefect.artifacts import create_markdown_artifact

    written = {}
    for name, path in audited(datasets, config).items():
        markdown = audit_markdown(audit_dataset(path, config), name)
        create_markdown_artifact(
            key=artifact_key("audit", name),
            markdown=markdown,
            description=f"Sampled kept and dropped documents of {name}, per rule and language.",
        )
        if run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(mlflow_uri).log_text(run_id, markdown, f"audit/{name}.md")
        written[name] = markdown
    return written
