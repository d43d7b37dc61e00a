"""Run every test module in a pytest process of its own, then print one total line.

Each module gets a fresh process: its own Prefect test server and no process-wide state (Prefect's
settings and background services, Dask clients, torch threads) left by another module. Modules that
share one process interfere: a pretrain flow run after the Dask and data-refresh modules waited
forever for its training task (open: see the closing note of 2026-11-29).

Arguments: module paths to run (default: every ``tests/test_*.py``); ``--jobs N`` runs N modules at
once (default 2: most modules wait on servers and subprocesses, so two share two cores well). The
slowest modules start first, by the durations the last run wrote to ``test-output/durations.json``,
else by ``tests/module_seconds.json`` (a CI run's, kept in the repository so a fresh checkout does not
start its slowest module last).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)\b")
REPO = Path(__file__).resolve().parents[1]
DURATIONS = REPO / "test-output" / "durations.json"
KNOWN_DURATIONS = REPO / "tests" / "module_seconds.json"


def run_module(module: str) -> tuple[str, int, str, float]:
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", module],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return module, run.returncode, run.stdout, time.monotonic() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    modules = args.modules or [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py"))]
    known = json.loads((DURATIONS if DURATIONS.exists() else KNOWN_DURATIONS).read_text())
    modules.sort(key=lambda m: -known.get(m, float("inf")))  # unknown first, then the slowest
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    broken, durations = [], {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for module, returncode, output, seconds in pool.map(run_module, modules):
            print(output, flush=True)
            print(f"[{module}: {seconds:.0f} s]", flush=True)
            durations[module] = round(seconds, 1)
            summary = output.strip().splitlines()[-1] if output.strip() else ""
            for number, kind in COUNT.findall(summary):
                totals["error" if kind.startswith("error") else kind] += int(number)
            if returncode not in (0, 5):  # 5: the module has no test to run (all deselected)
                broken.append(module)
    DURATIONS.parent.mkdir(exist_ok=True)
    DURATIONS.write_text(json.dumps({**known, **durations}, indent=1, sort_keys=True))
    print(
        "slowest modules: "
        + ", ".join(f"{m} {s:.0f} s" for m, s in sorted(durations.items(), key=lambda x: -x[1])[:8])
    )
    print(f"modules failed: {', '.join(broken)}" if broken else "modules failed: none")
    print(
        f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, {totals['skipped']} skipped"
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
