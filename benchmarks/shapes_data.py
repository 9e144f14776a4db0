"""How fast the tiny-shapes recipe draws training data (examples/tiny_shapes/dataset.py).

The training loop draws every batch on the fly in a background thread, so a batch of 64 must take
well under a training step (goal: < 2 s on one shared CPU core; it was a test assertion before).

    python benchmarks/shapes_data.py [--batch 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

GOAL_S = 2.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from tiny_shapes import dataset

    dataset.numpy_batch(0, 4)  # warm-up: prototype caches, Pillow
    times = []
    for seed in range(1, args.rounds + 1):
        start = time.perf_counter()
        dataset.numpy_batch(seed, args.batch)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    print(json.dumps({"batch": args.batch, "median_s": round(median, 3), "goal_s": GOAL_S, "times_s": times}))
    return 0 if median < GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
