"""Weight-only int8 (execution.quantize) against bfloat16: resident memory, one step's time, output error.

Full-size models with random weights built from the presets (seeded, so the bfloat16 and the int8
process build the same weights): the SDXL base UNet (one guided step, batch 2), the SD3.5 Medium
transformer (one guided step, batch 2, with 77 + 256 text tokens) and, if the machine has the memory,
the T5-XXL encoder (256 tokens). Each case runs in a fresh process (``nice -n 10``): bfloat16 (its
weights also written to a temporary bfloat16 safetensors file), then int8: the model built with
int8 weights and that file loaded into it, quantized tensor by tensor, as
``from_pretrained(..., quantize="int8")`` loads. Each reports

- ``weights_gib``: the bytes of the model's variables; ``rss_gib``: resident memory after building
  (and loading); ``load_peak_rss_gib``: the process peak (VmHWM) up to then; ``peak_rss_gib``: the
  peak after the calls;
- ``first_call_s`` (tracing included) and ``step_s``: one call in TensorFlow graph mode;
- ``rel_error``: ||int8 - bf16|| / ||bf16|| of the outputs on the same input (``max_abs_error`` too).

Usage:
    nice -n 10 python benchmarks/quantize.py                         # all, 512 (JSON to results/quantize.json)
    python benchmarks/quantize.py --models sdxl-unet --size 1024
    python benchmarks/quantize.py case sdxl-unet bfloat16 512 OUT.npy CKPT   # one case, JSON on stdout
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

from benchmarks._harness import status_gib  # noqa: E402

MODELS = ("sdxl-unet", "sd3.5-medium-transformer", "t5-xxl")
T5_TOKENS = 256
T5_NEEDS_GIB = 13  # bfloat16 weights (9.5 GB) plus activations and the process


def _available_gib() -> float:
    with open("/proc/meminfo") as info:
        return next(int(line.split()[1]) for line in info if line.startswith("MemAvailable:")) / 2**20


def _build(name: str, size: int, mode: str):
    """(model, call arguments as tensors, call function) for a case: weights bfloat16, or int8 (unset)."""
    import numpy as np
    import tensorflow as tf

    from tf_diffusion.execution import quantize
    from tf_diffusion.presets import PRESETS, get_sd3_preset

    def make(constructor):
        return quantize.materialize(quantize.build_model(constructor, "int8" if mode == "int8" else None))

    rng = np.random.default_rng(0)
    h = size // 8
    if name == "sdxl-unet":
        from tf_diffusion.unet import UNetModel

        model = make(lambda: UNetModel(PRESETS["sdxl-base-1.0"].unet, dtype="bfloat16"))
        args = (
            rng.standard_normal((2, h, h, 4), dtype=np.float32),
            np.array([999, 999], np.int32),
            rng.standard_normal((2, 77, 2048), dtype=np.float32),
            rng.standard_normal((2, 1280), dtype=np.float32),
            np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (2, 1)),
        )

        def call(x, t, c, e, i):
            return model(x, t, c, text_embeds=e, time_ids=i)

    elif name == "sd3.5-medium-transformer":
        from tf_diffusion.mmdit import MMDiT

        config = get_sd3_preset("sd3.5-medium").transformer
        model = make(lambda: MMDiT(config, dtype="bfloat16"))
        args = (
            rng.standard_normal((2, h, h, 16), dtype=np.float32),
            np.array([999.0, 999.0], np.float32),
            rng.standard_normal((2, 77 + T5_TOKENS, 4096), dtype=np.float32),
            rng.standard_normal((2, 2048), dtype=np.float32),
        )

        def call(x, t, c, p):
            return model(x, t, c, p)

    elif name == "t5-xxl":
        from tf_diffusion.t5 import T5Encoder

        model = make(lambda: T5Encoder(get_sd3_preset("sd3.5-medium").text_encoder_3, dtype="bfloat16"))
        args = (rng.integers(0, 32000, (1, T5_TOKENS)).astype(np.int32),)

        def call(ids):
            return model(ids)

    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return model, [tf.constant(a) for a in args], call


def _lazy_state_dict(model) -> dict:
    """The model's weights as torch-layout LazyTensors, read one at a time when written."""
    import keras
    import numpy as np

    from tf_diffusion.weights.lazy import LazyTensor
    from tf_diffusion.weights.state_dict import named_parameters, to_torch_layout, torch_shape

    out = {}
    for key, (layer, attr) in named_parameters(model).items():
        variable, kind = getattr(layer, attr), type(layer).LAYOUT[attr]

        def read(variable=variable, kind=kind):
            return np.ascontiguousarray(to_torch_layout(kind, keras.ops.convert_to_numpy(variable)))

        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
        out[key] = LazyTensor(torch_shape(layer, attr), dtype, read, key)
    return out


def case(name: str, mode: str, size: int, out: str, checkpoint: str) -> dict:
    """bfloat16: build (seeded random weights) and write them to ``checkpoint``; int8: build with int8
    weights and load ``checkpoint`` into them (as ``from_pretrained(quantize="int8")`` does). Then
    call once to trace and once timed, and save the output to ``out``."""
    import keras
    import numpy as np

    from tf_diffusion import execution
    from tf_diffusion.execution import quantize
    from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors
    from tf_diffusion.weights.state_dict import load_state_dict

    keras.utils.set_random_seed(0)
    base = status_gib("VmRSS")
    start = time.perf_counter()
    model, args, call = _build(name, size, mode)
    if mode == "int8":
        with open_safetensors(checkpoint) as tensors:
            load_state_dict(model, tensors)
    build = time.perf_counter() - start
    quantize.return_freed_memory()
    rss = status_gib("VmRSS") - base
    peak = status_gib("VmHWM")
    if mode == "bfloat16":
        save_safetensors(_lazy_state_dict(model), checkpoint)
    weights = sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
                  for v in model.weights) / 2**30  # fmt: skip
    fn = execution.compile(call, execution.ExecutionOptions(compile="graph"))
    start = time.perf_counter()
    fn(*args)
    first = time.perf_counter() - start
    start = time.perf_counter()
    y = keras.ops.convert_to_numpy(keras.ops.cast(fn(*args), "float32"))
    step = time.perf_counter() - start
    np.save(out, y)
    return {
        "model": name, "mode": mode, "size": size, "build_load_s": round(build, 1),
        "weights_gib": round(weights, 2), "rss_gib": round(rss, 2), "load_peak_rss_gib": round(peak, 2),
        "peak_rss_gib": round(status_gib("VmHWM"), 2), "first_call_s": round(first, 1), "step_s": round(step, 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def run_case(name: str, mode: str, size: int, out: pathlib.Path, checkpoint: pathlib.Path) -> dict:
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        __file__,
        "case",
        name,
        mode,
        str(size),
        str(out),
        str(checkpoint),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"model": name, "mode": mode, "size": size, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize.json"))
    args = parser.parse_args()
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "t5-xxl" and _available_gib() < T5_NEEDS_GIB:
                rows.append({"model": name, "skipped": f"{_available_gib():.1f} GiB available"})
                continue
            outs = {mode: pathlib.Path(tmp) / f"{name}_{mode}.npy" for mode in ("bfloat16", "int8")}
            checkpoint = pathlib.Path(tmp) / f"{name}.safetensors"
            pair = {mode: run_case(name, mode, args.size, path, checkpoint) for mode, path in outs.items()}
            checkpoint.unlink(missing_ok=True)
            row = {"model": name, "size": args.size, "bfloat16": pair["bfloat16"], "int8": pair["int8"]}
            if all("error" not in r for r in pair.values()):
                ref, got = (np.load(outs[m]).astype(np.float64) for m in ("bfloat16", "int8"))
                row["rel_error"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                row["max_abs_error"] = float(np.abs(got - ref).max())
                row["ref_max_abs"] = float(np.abs(ref).max())
                row["weights_ratio"] = round(pair["int8"]["weights_gib"] / pair["bfloat16"]["weights_gib"], 3)
                row["rss_ratio"] = round(pair["int8"]["rss_gib"] / pair["bfloat16"]["rss_gib"], 3)
                row["load_peak_ratio"] = round(
                    pair["int8"]["load_peak_rss_gib"] / pair["bfloat16"]["load_peak_rss_gib"], 3
                )
                row["step_ratio"] = round(pair["int8"]["step_s"] / pair["bfloat16"]["step_s"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "machine": "AMD EPYC, 2 cores, no AMX, 24 GiB shared; TensorFlow 2.21 / Keras 3.15",
        "date": time.strftime("%Y-%m-%d"),
        "what": "weight-only int8 (execution.quantize) vs bfloat16 weights, random weights from the presets, "
        "TensorFlow graph mode, fresh process per row",
        "rows": rows,
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "case":
        print(json.dumps(case(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])))
    else:
        main()
