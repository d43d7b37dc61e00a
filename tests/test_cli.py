"""The per-stage debugging CLI: `pretrain stage NAME --input F --output F` on real documents."""

from __future__ import annotations

import json
from pathlib import Path

from flows.cli import main
from tests.conftest import snapshot_files


def _lid_dev_slice(corpus: Path, path: Path, n: int = 40) -> list[dict]:
    with open(corpus / "lid-dev.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows))
    return rows


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_langid_adds_lang_and_score(corpus: Path, tmp_path: Path, capsys) -> None:
    rows = _lid_dev_slice(corpus, tmp_path / "docs.jsonl")
    assert (
        main(
            [
                "stage",
                "langid",
                "--input",
                str(tmp_path / "docs.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    out = _read(tmp_path / "out.jsonl")
    rejects = _read(tmp_path / "out.rejects.jsonl")
    assert len(out) + len(rejects) == len(rows)
    truth = {r["id"]: r["lang"] for r in rows}
    assert sum(d["lang"] == truth[d["id"]] for d in out) >= 0.9 * len(out)
    assert all(0 < d["lang_score"] <= 1.0 for d in out)
    stats = json.loads(capsys.readouterr().out)
    assert stats["docs_in"] == len(rows)


def test_stage_dedup_annotate_keeps_everything(corpus: Path, tmp_path: Path) -> None:
    rows = _lid_dev_slice(corpus, tmp_path / "docs.jsonl", 20)
    with open(tmp_path / "docs.jsonl", "a") as f:  # an exact copy of the first document
        f.write(json.dumps({"id": "copy", "text": rows[0]["text"]}) + "\n")
    args = ["stage", "dedup", "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    assert main([*args, "--annotate"]) == 0
    out = _read(tmp_path / "o.jsonl")
    assert len(out) == 21
    clusters = {d["doc_id"]: d["dup_cluster"] for d in out}
    assert clusters["copy"] == clusters[rows[0]["id"]]


def test_stage_ingest_reads_a_warc_file(tmp_path: Path) -> None:
    warc = snapshot_files("CC-MAIN-2026-40", "wet")[0]
    config = tmp_path / "ingest.yaml"
    config.write_text("max_records_per_file: 25\n")
    args = [
        "stage",
        "ingest",
        "--input",
        str(warc),
        "--output",
        str(tmp_path / "docs.jsonl"),
        "--config",
        str(config),
    ]
    assert main(args) == 0
    docs = _read(tmp_path / "docs.jsonl")
    assert 0 < len(docs) <= 25
    assert all(d["warc_record_id"] and d["source_file"] == str(warc) for d in docs)
