"""Peak memory of StableDiffusion.from_pretrained on a full-size SD 1.5 single file.

Writes an SD 1.5 checkpoint of random weights in the original single-file layout to a
temporary folder (never committed), then, in a fresh process per case, loads it with
``from_pretrained`` and reports the peak resident memory (VmHWM) against the file size.
The goal: loading needs no more than about twice the file's size, because tensors are
read one at a time from the memory-mapped file straight into the model's variables.

Usage:
    python benchmarks/load_memory.py                   # float16 file -> float16 model, float32 -> float32
    python benchmarks/load_memory.py --cases float16   # one case
    python benchmarks/load_memory.py --keep /tmp/sd15  # keep the files for later runs
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def write_checkpoint(path: pathlib.Path, dtype: str) -> None:
    """A random full-size SD 1.5 single file, written tensor by tensor (never all in memory)."""
    import numpy as np

    from tf_diffusion.presets import PRESETS
    from tf_diffusion.weights.lazy import LazyTensor
    from tf_diffusion.weights.loading import expected_shapes
    from tf_diffusion.weights.safetensors_io import save_safetensors
    from tf_diffusion.weights.single_file import to_single_file

    config = PRESETS["sd-v1-5"]
    target = np.dtype(dtype)

    def random(shape, seed):
        def read():
            rng = np.random.default_rng(seed)
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(target)

        return LazyTensor(shape, target, read)

    components = {
        name: {key: random(shape, i) for i, (key, shape) in enumerate(sorted(shapes.items()))}
        for name, shapes in expected_shapes(config).items()
    }
    save_safetensors(to_single_file(components, config), path)


def measure(path: str, dtype: str) -> dict:
    """Load in this process and return peak and baseline resident memory (bytes)."""

    def status(field: str) -> int:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    import keras  # noqa: F401  (imported before the baseline, like any user program)

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights.loading import from_pretrained

    baseline = status("VmRSS")
    start = time.perf_counter()
    model = from_pretrained(StableDiffusion, path, dtype=dtype)
    seconds = time.perf_counter() - start
    return {
        "baseline_rss": baseline,
        "peak_rss": status("VmHWM"),
        "final_rss": status("VmRSS"),
        "rss_file": status("RssFile"),
        "seconds": seconds,
        "config": model.config.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    parser.add_argument("--keep", help="folder to write (and reuse) the checkpoints in")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    folder = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="sd15-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for dtype in args.cases:
            path = folder / f"sd15-random-{dtype}.safetensors"
            if not path.exists():
                start = time.perf_counter()
                write_checkpoint(path, dtype)
                print(
                    f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s"
                )
            result = subprocess.run(
                [sys.executable, __file__, "--measure", str(path), dtype],
                capture_output=True,
                text=True,
                check=True,
            )
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            size = path.stat().st_size
            gib = 2**30
            print(
                f"{dtype}: file {size / gib:.2f} GiB, loaded as {stats['config']} in {stats['seconds']:.0f} s; "
                f"peak RSS {stats['peak_rss'] / gib:.2f} GiB ({stats['peak_rss'] / size:.2f}x the file), "
                f"of which {(stats['peak_rss'] - stats['baseline_rss']) / gib:.2f} GiB for loading "
                f"({(stats['peak_rss'] - stats['baseline_rss']) / size:.2f}x); after loading "
                f"{stats['final_rss'] / gib:.2f} GiB"
            )
    finally:
        if not args.keep:
            for path in folder.glob("*.safetensors"):
                path.unlink()
            folder.rmdir()


if __name__ == "__main__":
    main()
