"""Atomic writes and the removal of what a killed writer leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tasks import dataset as ds
from tasks.atomic import TEMP_GLOB, atomic_write_text, remove_stale_temp_files
from tests.conftest import REPO

# A stage's shard writer that stops half way: rows written, the shard not yet in place.
_WRITER = """
import sys, time
from tasks import dataset as ds
with ds.ShardWriter(sys.argv[1], ds.DOCUMENT_SCHEMA, row_group_size=2) as writer:
    for i in range(10):
        writer.write({"doc_id": f"d{i}", "text": "some text " * 50})
    print("writing", flush=True)
    time.sleep(600)
"""


def _kill_writer_mid_shard(target: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_removes_what_sigkilled_writers_left(tmp_path: Path) -> None:
    dataset = tmp_path / "snapshot" / "quality"
    finished = ds.write_table(
        ds.rows_to_table([{"doc_id": "a", "text": "x"}], ds.DOCUMENT_SCHEMA), dataset / "part-00000.parquet"
    )
    atomic_write_text(dataset / "notes.tmp", "a file whose name only ends like ours\n")
    _kill_writer_mid_shard(dataset / "part-00001.parquet")
    _kill_writer_mid_shard(dataset / "rejects" / "part-00001.parquet")
    (dataset / ".partial.tmp").mkdir()  # a copied dir left half way (publish_version across file systems)
    (dataset / ".partial.tmp" / "part-00000.parquet").write_bytes(b"half")

    litter = sorted(p.relative_to(dataset) for p in dataset.rglob(TEMP_GLOB))
    assert len(litter) == 3 and not (dataset / "part-00001.parquet").exists()
    assert remove_stale_temp_files(tmp_path) == 3
    assert list(dataset.rglob(TEMP_GLOB)) == []
    assert ds.sha256_file(dataset / "part-00000.parquet") == finished.sha256
    assert (dataset / "notes.tmp").exists()
    assert remove_stale_temp_files(tmp_path) == 0
    assert remove_stale_temp_files(tmp_path / "missing") == 0
