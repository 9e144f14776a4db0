"""What the per-case benchmarks share: one case per fresh process, its memory read from /proc, its timing.

A benchmark script names its cases and a ``case`` entry point (``script.py case NAME ARGS...``) that
builds one model, calls ``measure``, saves its output and prints one JSON line; ``run_case`` starts
that process and reads the line back, ``rel_errors`` compares every case's saved output with a
reference case's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np


def status_gib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) of this process in GiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 2**20


def measure(call, repeats: int) -> tuple[np.ndarray, dict]:
    """Run ``call`` once (tracing included) and ``repeats`` more times; (last output, timings and memory)."""
    rss = status_gib("VmRSS")
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return result, dict(
        rss_gib=round(rss, 3),
        peak_rss_gib=round(status_gib("VmHWM"), 3),
        first_call_s=round(first, 2),
        step_s=round(min(times), 2) if times else None,
    )


def run_case(script: str, name: str, args: list[str]) -> dict:
    """Run ``script case name *args`` in a fresh process and return the JSON line it printed."""
    done = subprocess.run(
        [sys.executable, script, "case", name, *map(str, args)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cases(
    script: str, names, folder: pathlib.Path, make_args
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Run each named case in its own process (``run_case``) with ``make_args(name, out)``, ``out`` the
    ``.npy`` under ``folder`` where the case saves its output; (results, {name: output}), printed as they come."""
    results, outputs = [], {}
    for name in names:
        out = folder / f"{name}.npy"
        results.append(run_case(script, name, make_args(name, out)))
        outputs[name] = np.load(out)
        print(json.dumps(results[-1]), flush=True)
    return results, outputs


def rel_errors(results: list[dict], outputs: dict[str, np.ndarray], reference: str) -> None:
    """Add ``rel_error`` = ||out - ref|| / ||ref|| against case ``reference`` to each result, in place."""
    if reference not in outputs:
        return
    ref = outputs[reference].astype(np.float64)
    for result in results:
        got = outputs[result["case"]].astype(np.float64)
        result["rel_error"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def write_report(path: str, report: dict) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
