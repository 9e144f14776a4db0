"""One guided SDXL base UNet step at 1024x1024 (batch 2: the unconditional and conditional halves),
ours against diffusers, float32 and bfloat16, random weights (timings do not depend on them). Ours runs
bfloat16 twice: "bfloat16" keeps the weights in bfloat16 (as diffusers' ``.to(torch.bfloat16)``), and
"mixed_bfloat16" keeps float32 weights and casts them where they are used.

Each (framework, dtype) runs in a fresh process; the script prints one JSON line per process: build
time, the first call (tracing, compilation), the timed calls and their median, and the process's peak
resident memory. Ours runs in graph mode, as ``tf-diffusion generate`` runs on a CPU; diffusers as
``StableDiffusionXLPipeline`` calls its UNet (torch, SDPA attention, no compile).

    python benchmarks/sdxl_step.py --all            # the five processes, one after the other
    python benchmarks/sdxl_step.py --framework ours --dtype bfloat16 --size 1024

Needs torch + diffusers for the diffusers rows (the reference extra).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._harness import status_gib  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the architecture fields).
SDXL_UNET = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)  # fmt: skip


def inputs(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    h = size // 8
    return dict(
        x=rng.standard_normal((2, h, h, 4), dtype=np.float32),
        context=rng.standard_normal((2, 77, 2048), dtype=np.float32),
        text_embeds=rng.standard_normal((2, 1280), dtype=np.float32),
        time_ids=np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (2, 1)),
    )


def ours(size: int, dtype: str):
    import keras
    import tensorflow as tf

    from tf_diffusion import execution
    from tf_diffusion.presets import PRESETS
    from tf_diffusion.unet import UNetModel

    keras.utils.set_random_seed(0)
    data = inputs(size)
    policy = None if dtype == "float32" else dtype
    start = time.perf_counter()
    model = execution.apply(UNetModel(PRESETS["sdxl-base-1.0"].unet, dtype=policy))
    opts = execution.ExecutionOptions(compile="graph")
    fn = execution.compile(lambda x, t, c, e, i: model(x, t, c, text_embeds=e, time_ids=i), opts)
    args = [tf.constant(data[k]) for k in ("x",)] + [tf.constant([999, 999], tf.int32)]
    args += [tf.constant(data[k]) for k in ("context", "text_embeds", "time_ids")]
    build = time.perf_counter() - start
    return (lambda: fn(*args).numpy()), build


def reference(size: int, dtype: str):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    data = inputs(size)
    start = time.perf_counter()
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model = UNet2DConditionModel(**SDXL_UNET).to(torch_dtype).eval()
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous().to(torch_dtype)
    context = torch.from_numpy(data["context"]).to(torch_dtype)
    added = {k: torch.from_numpy(data[k]).to(torch_dtype) for k in ("text_embeds", "time_ids")}
    t = torch.tensor([999, 999])
    build = time.perf_counter() - start

    def call():
        with torch.no_grad():
            return model(x, t, context, added_cond_kwargs=added).sample.float().numpy()

    return call, build


def run_one(framework: str, dtype: str, size: int, reps: int) -> dict:
    call, build = (ours if framework == "ours" else reference)(size, dtype)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {
        "framework": framework, "dtype": dtype, "size": size, "build_s": round(build, 1),
        "first_call_s": round(first, 1), "times_s": [round(s, 2) for s in times],
        "median_s": round(statistics.median(times), 2), "peak_rss_gib": round(status_gib("VmHWM"), 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("ours", "diffusers"), default="ours")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "mixed_bfloat16"), default="float32")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--all", action="store_true", help="every framework and dtype, fresh processes")
    args = parser.parse_args()
    if not args.all:
        if args.framework == "diffusers" and args.dtype == "mixed_bfloat16":
            parser.error(
                "--dtype mixed_bfloat16 is ours only (diffusers casts the weights: --dtype bfloat16)"
            )
        print(json.dumps(run_one(args.framework, args.dtype, args.size, args.reps)), flush=True)
        return
    runs = [("ours", "float32"), ("diffusers", "float32"), ("ours", "bfloat16"), ("ours", "mixed_bfloat16"),
            ("diffusers", "bfloat16")]  # fmt: skip
    for framework, dtype in runs:
        argv = [sys.executable, __file__, "--framework", framework, "--dtype", dtype, "--size", str(args.size),
                "--reps", str(args.reps)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True)
        line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
        print(
            line or json.dumps({"framework": framework, "dtype": dtype, "error": done.stderr[-500:]}),
            flush=True,
        )


if __name__ == "__main__":
    main()
