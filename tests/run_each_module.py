"""Run every test module in a pytest process of its own, then print one total line.

Each module gets a fresh process: its own Prefect test server and no process-wide state (Prefect's
settings and background services, Dask clients, torch threads) left by another module. Modules that
share one process interfere: a pretrain flow run after the Dask and data-refresh modules waited
forever for its training task (open: see the closing note of 2026-11-29). Arguments: module paths
to run (default: every ``tests/test_*.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)\b")


def main(argv: list[str]) -> int:
    modules = argv or [str(p) for p in sorted(Path(__file__).parent.glob("test_*.py"))]
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    broken = []
    for module in modules:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", module],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        print(run.stdout, flush=True)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        for number, kind in COUNT.findall(summary):
            totals["error" if kind.startswith("error") else kind] += int(number)
        if run.returncode not in (0, 5):  # 5: the module has no test to run (all deselected)
            broken.append(module)
    print(f"modules failed: {', '.join(broken)}" if broken else "modules failed: none")
    print(
        f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, {totals['skipped']} skipped"
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
