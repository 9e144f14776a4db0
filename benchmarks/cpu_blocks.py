"""Single-block CPU timings behind the float32 fast paths (TensorFlow, this machine).

Times, each in its own compiled function with random inputs (median of several calls after a
warm-up, the result copied to numpy):

- 3x3 stride-1 convolutions at the SD 1.5 UNet's and VAE's shapes under XLA: direct, Winograd
  F(2x2, 3x3) and F(4x4, 3x3) (``execution.kernels.winograd_conv3x3``), and the direct one in
  graph mode; ``chosen_tile`` is what the autotuner (``tf_diffusion.execution.autotune``) picks
  for that shape on this machine.
- Nearest 2x upsampling then a 3x3 convolution, against ``execution.kernels.subpixel_conv3x3``.
- The self-attention core of the UNet's 64x64 level (batch 2, 8 heads of 40, 4096 tokens) in graph
  mode: ``layers.attention`` (row blocks over every head at once) against
  ``execution.kernels.head_attention`` (cache-sized blocks per head).

Usage: ``python benchmarks/cpu_blocks.py [--out benchmarks/results/cpu_blocks.json]``. Nothing is
asserted; the JSON holds milliseconds per call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_diffusion import execution, layers  # noqa: E402
from tf_diffusion.execution import cpu, kernels  # noqa: E402
from tf_diffusion.execution.options import _scope  # noqa: E402

CONV_SHAPES = [  # (batch, side, channels): UNet levels at 512 and 256 (batch 2), VAE decoder levels
    (2, 64, 320),
    (2, 32, 640),
    (2, 32, 320),
    (2, 16, 1280),
    (2, 16, 640),
    (2, 8, 1280),
    (1, 64, 512),
    (1, 128, 512),
    (1, 256, 256),
    (1, 512, 128),
]
UPSAMPLE_SHAPES = [(2, 32, 640), (2, 16, 1280), (2, 8, 1280), (1, 64, 512), (1, 256, 256)]


def median_ms(fn, *args, reps: int = 7) -> float:
    np.asarray(fn(*args))  # warm-up and compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.asarray(fn(*args))
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def conv_inputs(rng, b: int, side: int, c: int):
    """Random (b, side, side, c) activations and a (3, 3, c, c) kernel of unit output scale."""
    x = tf.constant(rng.standard_normal((b, side, side, c), dtype=np.float32))
    w = tf.constant(rng.standard_normal((3, 3, c, c), dtype=np.float32) / math.sqrt(9 * c))
    return x, w


def conv_cases(rng) -> list[dict]:
    out = []
    for b, side, c in CONV_SHAPES:
        x, w = conv_inputs(rng, b, side, c)

        def direct(x, w):
            return tf.nn.conv2d(x, w, 1, "SAME")

        row = {"batch": b, "side": side, "channels": c, "tiles_f2": b * (side // 2) ** 2}
        row["xla_direct_ms"] = median_ms(tf.function(direct, jit_compile=True), x, w)
        row["graph_direct_ms"] = median_ms(tf.function(direct), x, w)
        for m in (2, 4):
            fn = tf.function(lambda x, w, m=m: kernels.winograd_conv3x3(x, w, m), jit_compile=True)
            row[f"xla_winograd_f{m}_ms"] = median_ms(fn, x, w)
        conv = layers.Conv2d(c, c, 3, padding=1)
        opts = execution.ExecutionOptions(compile="xla", winograd=True, autotune=True)
        with execution.options(opts), _scope(in_xla=True):
            row["chosen_tile"] = cpu.conv_tile(conv, (b, side, side, c))
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def upsample_cases(rng) -> list[dict]:
    out = []
    for b, side, c in UPSAMPLE_SHAPES:
        x, w = conv_inputs(rng, b, side, c)

        def nearest_then_conv(x, w):
            return tf.nn.conv2d(tf.repeat(tf.repeat(x, 2, 1), 2, 2), w, 1, "SAME")

        row = {"batch": b, "side_in": side, "channels": c}
        row["xla_nearest_conv_ms"] = median_ms(tf.function(nearest_then_conv, jit_compile=True), x, w)
        row["xla_subpixel_ms"] = median_ms(tf.function(kernels.subpixel_conv3x3, jit_compile=True), x, w)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def attention_case(rng) -> dict:
    b, heads, tokens, d = 2, 8, 4096, 40
    q, k, v = (tf.constant(rng.standard_normal((b, tokens, heads * d), dtype=np.float32)) for _ in range(3))

    def split(z):
        return kernels.split_heads(z, heads)

    def per_head(q, k, v):
        scaled = split(q) * (1.0 / math.sqrt(d))
        return kernels.merge_heads(
            kernels.head_attention(scaled, tf.transpose(split(k), (0, 2, 1)), split(v)), heads
        )

    row = {"batch": b, "heads": heads, "tokens": tokens, "head_dim": d}
    row["graph_attention_ms"] = median_ms(
        tf.function(lambda q, k, v: layers.attention(q, k, v, heads)), q, k, v
    )
    row["graph_head_attention_ms"] = median_ms(tf.function(per_head), q, k, v)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_blocks.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result = {
        "tensorflow": tf.__version__,
        "load_avg_start": os.getloadavg()[0],
        "conv3x3": conv_cases(rng),
        "upsample_conv3x3": upsample_cases(rng),
        "self_attention_64x64": attention_case(rng),
        "load_avg_end": os.getloadavg()[0],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
