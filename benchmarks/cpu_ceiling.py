"""How fast can this CPU go? The compute ceiling that bounds a UNet step, measured.

The speed goals in issue 7 are ratios against keras-cv. This script measures what the hardware
allows, so a goal can be checked against physics and not only against a peer:

- the floating-point operations of one guided SD 1.5 UNet step (batch 2), counted by TensorFlow's
  graph profiler on our model's graph (a multiply-add counts as 2);
- the best throughput TensorFlow reaches on this machine for the operations that dominate that
  step: one large matrix multiplication and the UNet's own 3x3 convolution at 64x64x320, in float32
  and bfloat16 (median of several runs after a warm-up, graph mode, all cores).

From them: the fastest a step could possibly be (FLOPs / best throughput), and what a target time
would demand. Writes JSON (default ``benchmarks/results/cpu_ceiling.json``).

Usage:
    python benchmarks/cpu_ceiling.py                 # size 512
    python benchmarks/cpu_ceiling.py --reps 7 --out /tmp/ceiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: tracing and primitive creation
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_flops(size: int) -> int:
    """Floating-point operations of one SD 1.5 UNet call at batch 2 (TensorFlow's profiler count)."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    from tf_diffusion.presets import PRESETS
    from tf_diffusion.unet import UNetModel

    model = UNetModel(PRESETS["sd-v1-5"].unet, dtype="float32")
    spec = (
        tf.TensorSpec((2, size // 8, size // 8, 4), tf.float32),
        tf.TensorSpec((2,), tf.int32),
        tf.TensorSpec((2, 77, 768), tf.float32),
    )
    graph = tf.function(lambda x, t, c: model(x, t, c)).get_concrete_function(*spec).graph
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(model_analyzer.profile(graph, options=options).total_float_ops)


def throughput(dtype: str, reps: int) -> dict:
    """GFLOP/s of a 4096^3 matmul and of the UNet's 3x3 convolution (2, 64, 64, 320) -> 320."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    tf_dtype = tf.as_dtype(dtype)
    n = 4096
    a = tf.constant(rng.standard_normal((n, n), dtype=np.float32), dtype=tf_dtype)
    b = tf.constant(rng.standard_normal((n, n), dtype=np.float32), dtype=tf_dtype)
    matmul = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    x = tf.constant(rng.standard_normal((2, 64, 64, 320), dtype=np.float32), dtype=tf_dtype)
    w = tf.constant(rng.standard_normal((3, 3, 320, 320), dtype=np.float32) * 0.02, dtype=tf_dtype)
    conv = tf.function(
        lambda: tf.reduce_sum(tf.cast(tf.nn.conv2d(x, w, 1, "SAME")[:1, :1, :1, :1], tf.float32))
    )
    matmul_s = _median_seconds(matmul, reps)
    conv_s = _median_seconds(conv, reps)
    return {
        "matmul_4096_s": round(matmul_s, 4),
        "matmul_4096_gflops": round(2 * n**3 / matmul_s / 1e9, 1),
        "conv3x3_64x64x320_b2_s": round(conv_s, 4),
        "conv3x3_64x64x320_b2_gflops": round(2 * 2 * 64 * 64 * 9 * 320 * 320 / conv_s / 1e9, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_ceiling.json"))
    args = parser.parse_args(argv)

    import tensorflow as tf

    flops = unet_flops(args.size)
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
        },
        "size": args.size,
        "unet_step_flops": flops,
        "unet_step_tflop": round(flops / 1e12, 3),
    }
    for dtype in ("float32", "bfloat16"):
        rates = throughput(dtype, args.reps)
        best = max(rates["matmul_4096_gflops"], rates["conv3x3_64x64x320_b2_gflops"])
        rates["best_gflops"] = best
        # No step can beat its FLOPs at the best rate TensorFlow reaches for its dominant operations.
        rates["unet_step_floor_s"] = round(flops / (best * 1e9), 3)
        result[dtype] = rates
    result["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
