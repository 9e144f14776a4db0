"""A/B timing of one float32 SD 1.5 UNet step (batch 2, one guided step) as generate() compiles it.

Runs whichever ``tf_diffusion`` is first on ``PYTHONPATH`` with random weights (timings do not
depend on the weights), so two checkouts can be compared in the same session without the
keras-cv weight files ``speed.py`` needs:

    for i in 1 2 3; do
        PYTHONPATH=/path/to/old python benchmarks/unet_step_ab.py --size 512 --label old
        PYTHONPATH=$PWD python benchmarks/unet_step_ab.py --size 512 --label new
    done

Prints one JSON line: the first call (tracing, compilation, autotuning where the code has it),
the timed calls and their median. Works with the code before ``tf_diffusion.execution`` existed
(the ``pipeline._compile`` API) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(size: int):
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_diffusion
    from tf_diffusion.presets import PRESETS
    from tf_diffusion.unet import UNetModel

    keras.utils.set_random_seed(0)
    config = PRESETS["sd-v1-5"].unet
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((2, size // 8, size // 8, 4), dtype=np.float32))
    t = tf.constant([999, 999], tf.int32)
    ctx = tf.constant(rng.standard_normal((2, 77, config.context_dim), dtype=np.float32))
    start = time.perf_counter()
    if hasattr(tf_diffusion, "execution") or _has_execution():
        from tf_diffusion import execution

        model = execution.apply(UNetModel(config))
        opts = execution.default_options(model, (1,) + tuple(x.shape[1:]))
        state = execution.prepare(model, x.shape, opts)
        fn = execution.compile(lambda x, t, c: model(x, t, c), opts)
        mode = opts.compile

        def call():
            return fn(x, t, ctx, execution_state=state).numpy()
    else:
        from tf_diffusion import layers
        from tf_diffusion.pipeline import ISLANDS, _compile, _default_loop_compile, has_accelerator

        model = UNetModel(config)
        mode = _default_loop_compile(model, has_accelerator(), (1,) + tuple(x.shape[1:]))
        filters = model.prepare_filters(x.shape) if mode == ISLANDS else None

        def traced(x, t, c, filters):
            with layers.prepared_filters(filters):
                return model(x, t, c)

        fn = _compile(traced, mode)

        def call():
            return fn(x, t, ctx, filters).numpy()

    return call, str(mode), time.perf_counter() - start


def _has_execution() -> bool:
    import importlib.util

    return importlib.util.find_spec("tf_diffusion.execution") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    call, mode, build_s = build(args.size)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "label": args.label,
                "size": args.size,
                "mode": mode,
                "build_and_prepare_s": round(build_s, 2),
                "first_call_s": round(first, 2),
                "times_s": [round(s, 3) for s in times],
                "median_s": round(statistics.median(times), 3),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
