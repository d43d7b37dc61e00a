"""The per-stage debugging CLI: `pretrain stage NAME --input F --output F` on real documents."""

from __future__ import annotations

import json
from pathlib import Path

from flows import cli
from flows.cli import main
from tests.conftest import snapshot_files
from tests.test_workdir_lock import _holder


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


def test_stage_help_and_choices_come_from_the_registry(capsys) -> None:
    import pytest

    from tasks import registry

    with pytest.raises(SystemExit) as exit_help:
        main(["stage", "--help"])
    assert exit_help.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for name in registry.file_stages():
        assert "".join(f"{name}: {registry.stage(name).summary}".split()) in text
    with pytest.raises(SystemExit) as unknown:
        main(["stage", "nonsense", "--input", "a", "--output", "b"])
    assert unknown.value.code == 2


def test_stage_gives_rows_without_ids_the_doc_ids_dedup_gives(corpus: Path, tmp_path: Path) -> None:
    rows = _lid_dev_slice(corpus, tmp_path / "with_ids.jsonl", 6)
    plain = tmp_path / "docs.jsonl"
    plain.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    assert main(["stage", "pii", "--input", str(plain), "--output", str(tmp_path / "pii.jsonl")]) == 0
    assert (
        main(["stage", "dedup", "--input", str(plain), "--output", str(tmp_path / "d.jsonl"), "--annotate"])
        == 0
    )
    expected = [f"docs.jsonl:{n}" for n in range(1, len(rows) + 1)]
    assert [d["doc_id"] for d in _read(tmp_path / "pii.jsonl")] == expected
    assert [d["doc_id"] for d in _read(tmp_path / "d.jsonl")] == expected


def test_bad_crawl_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    for command in ("data-refresh", "cache status"):
        args = [*command.split(), "--crawl", str(tmp_path / "missing.warc.gz"), "--workdir", str(tmp_path)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "missing.warc.gz" in err, err


def test_cache_status_of_a_fresh_workdir_redoes_ingest_first(tmp_path: Path, capsys) -> None:
    from tasks import registry

    warc = snapshot_files("CC-MAIN-2026-40", "wet")[0]
    assert main(["cache", "status", "--crawl", str(warc), "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[1] for line in lines] == [
        s for s in registry.STAGES if s not in ("boilerplate", "classifier")
    ]
    assert lines[0].split()[2] == "redo" and "not run yet" in lines[0]
    assert all(line.split()[2] == "maybe" for line in lines[1:]), lines
    assert main(["cache", "invalidate", "--stage", "quality", "--workdir", str(tmp_path)]) == 0
    assert "quality, classifier, pii, boilerplate, dedup, tokenizer, pack" in capsys.readouterr().out


def test_an_ablation_on_a_busy_workdir_is_one_line_before_any_server(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The recipes share the ablation workdir's stage store and runs: a second ablation there stops
    with the holder named (exit 2), before a Prefect server starts."""

    def no_server() -> None:
        raise AssertionError("a Prefect server was started for a busy workdir")

    monkeypatch.setattr(cli, "prefect_api", no_server)
    holder = _holder(tmp_path, seconds=60)
    try:
        code = main(["ablation", "--workdir", str(tmp_path), "--recipe", "a", "--recipe", "b"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("pretrain ablation: ") and f"pid {holder.pid} on " in err
