"""The README's first command, from start to PNG, against ``python -c "import tensorflow"`` in the same run.

Goal (issue 25): the first image in at most 1.5x the wall time of importing TensorFlow. Each round runs the
import alone, then ``tf-diffusion generate`` as the README gives it (a fresh process each, writing into a
scratch folder), so both see the same load on a shared machine; the ratio is per round, and the medians are
reported. ``--phases`` also times the phases inside one process (import, build + load, the first
generate, a second generate). Prints JSON; nothing is asserted.

    python benchmarks/first_image.py [--rounds 5] [--phases] [--json results/first_image.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a red circle in the center on a white background"

PHASES = """
import json
import time
t0 = time.perf_counter()
import tensorflow
t1 = time.perf_counter()
from tf_diffusion.models import check_source
from tf_diffusion.pipeline import StableDiffusion
sd = StableDiffusion.from_pretrained(check_source("tiny-shapes"))
t2 = time.perf_counter()
sd.generate({prompt!r}, seed=0, progress=False, jit_compile=False)
t3 = time.perf_counter()
sd.generate({prompt!r}, seed=1, progress=False, jit_compile=False)
t4 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_generate_s": t3 - t2, "second_generate_s": t4 - t3}}))
"""


def _wall(command: list[str], env: dict, cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    amx = [f for f in flags if f.startswith("amx")]
    return f"{model}, {os.cpu_count()} CPUs, {'AMX: ' + ' '.join(amx) if amx else 'no AMX'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--phases", action="store_true", help="also time the phases inside one process")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # The README's command is the installed entry point; ``python -m tf_diffusion`` where there is none.
    script = pathlib.Path(sys.executable).with_name("tf-diffusion")
    entry = [str(script)] if script.is_file() else [sys.executable, "-m", "tf_diffusion"]
    cli = [*entry, "generate", PROMPT, "--seed", "0", "-o", "out.png"]
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            load = os.getloadavg()[0]
            imported = _wall([sys.executable, "-c", "import tensorflow"], env, scratch)
            pathlib.Path(scratch, "out.png").unlink(missing_ok=True)
            generated = _wall(cli, env, scratch)
            rounds.append(
                {
                    "import_s": imported,
                    "generate_s": generated,
                    "ratio": generated / imported,
                    "loadavg_1min": load,
                }
            )
            print(json.dumps(rounds[-1]), flush=True)
        phases = None
        if args.phases:
            out = subprocess.run(
                [sys.executable, "-c", PHASES.format(prompt=PROMPT)],
                env=env,
                cwd=scratch,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            phases = json.loads(out.strip().splitlines()[-1])
    report = {
        "machine": _machine(),
        "rounds": rounds,
        "median_import_s": statistics.median(r["import_s"] for r in rounds),
        "median_generate_s": statistics.median(r["generate_s"] for r in rounds),
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "goal_ratio": 1.5,
        "phases": phases,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
