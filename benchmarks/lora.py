"""Applying and removing a LoRA on full-size SD 1.5 and SDXL UNets, and the step cost with it, ours against diffusers.

The LoRA: rank 32 (alpha 32) on every attention and feed-forward linear of the UNet (kohya's targets:
``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``proj_in``, ``proj_out``, ``ff.net.0.proj``, ``ff.net.2``), random
factors, written by our writer (``adapters.lora_training.save_lora``) in kohya format, which diffusers'
``load_lora_weights`` reads too; the same file for both. The weights are random (timings do not depend on them).

Each case is one process (``case ours-sd15`` ...; ``all`` runs them one after the other, ours first, since
ours writes the file):

- ours: ``StableDiffusion.from_preset`` (random weights), the UNet compiled as ``generate()`` compiles it on a
  CPU. ``load_lora_weights`` merges the LoRA into the kernels (adapters/lora.py: the compiled step sees the new
  values without retracing); ``set_adapters([])`` switches it off and back on; ``unload_lora_weights``
  restores the stored base kernels. Steps timed without the LoRA, with it (the first call after applying it
  timed on its own: no retrace), and after removing it.
- diffusers: ``UNet2DConditionModel`` in a pipeline without the other components; ``load_lora_weights``
  (peft layers: the LoRA runs as a side path, unfused), ``disable_lora`` / ``enable_lora`` (switching it off
  and on), ``fuse_lora`` (merged), ``unfuse_lora``,
  ``unload_lora_weights``. Steps timed without, with the LoRA unfused, fused, and after removing it.

Removal is checked bit for bit: a digest of every UNet weight before loading and after removing; and the
step's output after removal against the one before.

    python benchmarks/lora.py all --out benchmarks/results/lora.json            # sd15 float32, sdxl bfloat16
    python benchmarks/lora.py case ours-sdxl --dtype bfloat16 --size 512 --reps 2

Needs torch + diffusers + peft for the diffusers cases (the reference extra).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._harness import run_case, status_gib, write_report  # noqa: E402
from benchmarks.sdxl_step import SDXL_UNET  # noqa: E402

RANK = 32
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
PRESET = {"sd15": "sd-v1-5", "sdxl": "sdxl-base-1.0"}
# runwayml/stable-diffusion-v1-5's unet/config.json differs from UNet2DConditionModel's defaults in these.
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
CONTEXT = {"sd15": 768, "sdxl": 2048}
FOLDER = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "tf_diffusion_lora_bench"


def lora_path(family: str) -> pathlib.Path:
    return FOLDER / f"{family}-rank{RANK}-kohya.safetensors"


def inputs(family: str, size: int) -> dict:
    """One UNet call, batch 1, fixed random latents (NHWC) and context; SDXL's pooled text and time ids."""
    rng = np.random.default_rng(0)
    h = size // 8
    data = dict(
        x=rng.standard_normal((1, h, h, 4), dtype=np.float32),
        context=rng.standard_normal((1, 77, CONTEXT[family]), dtype=np.float32),
    )
    if family == "sdxl":
        data["text_embeds"] = rng.standard_normal((1, 1280), dtype=np.float32)
        data["time_ids"] = np.array([[size, size, 0, 0, size, size]], np.float32)
    return data


def timed(row: dict, name: str, call, reps: int) -> np.ndarray:
    """Time ``call``: ``row[first]`` the first call; ``row[name]`` the best of ``reps`` more in wall seconds and
    ``row[name_cpu]`` that call's CPU seconds (all threads: less sensitive to other work on the machine)."""
    start = time.perf_counter()
    out = call()
    row[f"first_{name}"] = round(time.perf_counter() - start, 2)
    best = None
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        out = call()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        best = min(best or (wall, cpu), (wall, cpu))
    row[name], row[f"{name}_cpu"] = round(best[0], 2), round(best[1], 2)
    return out


def clock(row: dict, name: str, fn) -> None:
    """``row[name]``: wall seconds of ``fn()``; ``row[name_cpu]``: its CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    row[name] = round(time.perf_counter() - start, 3)
    row[f"{name}_cpu"] = round(time.process_time() - cpu, 3)


def digest(arrays) -> str:
    """One digest over every weight's bytes, in order."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_lora(sd, family: str) -> None:
    """A random rank-32 LoRA on the UNet's attention and feed-forward linears, kohya format, our writer."""
    from tf_diffusion.adapters.lora_training import LoraNetwork, save_lora

    path = lora_path(family)
    if path.exists():
        return
    network = LoraNetwork.attach(sd, RANK, float(RANK), unet_targets=TARGETS, seed=0)
    try:
        rng = np.random.default_rng(1)
        for entry in network.layers:
            fan_in = int(np.prod(entry.down.shape[:-1]))
            entry.down.assign(rng.standard_normal(entry.down.shape).astype(np.float32) / np.sqrt(fan_in))
            entry.up.assign(rng.standard_normal(entry.up.shape).astype(np.float32) * 0.02 / np.sqrt(RANK))
        FOLDER.mkdir(parents=True, exist_ok=True)
        save_lora(network, path, "kohya", dtype="float16")
    finally:
        network.detach()


def ours(family: str, dtype: str, size: int, reps: int) -> dict:
    import keras
    import tensorflow as tf

    from tf_diffusion import StableDiffusion, execution

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    sd = StableDiffusion.from_preset(PRESET[family], dtype=None if dtype == "float32" else dtype)
    build = time.perf_counter() - start
    write_lora(sd, family)
    # The LoRA is UNet-only: without the text encoders and the VAE (1.8 GB in bfloat16 for SDXL), ours
    # holds what diffusers' row holds, and SDXL fits the shared machine.
    sd.text_encoder = sd.text_encoder_2 = sd.vae = None
    gc.collect()
    unet = execution.apply(sd.unet)
    data = inputs(family, size)
    args = [tf.constant(data["x"]), tf.constant([999], tf.int32), tf.constant(data["context"])]
    if family == "sdxl":
        args += [tf.constant(data["text_embeds"]), tf.constant(data["time_ids"])]
    # As generate() compiles the UNet on a CPU: XLA for float32, graph mode for bfloat16.
    mode = "xla" if dtype == "float32" else "graph"
    fn = execution.compile(lambda *a: unet(*a), execution.ExecutionOptions(compile=mode))

    def step():
        return np.asarray(fn(*args), np.float32)

    row = dict(build_s=round(build, 1), compile=mode)
    base = timed(row, "step_s", step, reps)
    before = digest(v.numpy() for v in sd.unet.weights)
    row["rss_before_lora_gib"] = round(status_gib("VmRSS"), 2)
    clock(row, "apply_s", lambda: sd.load_lora_weights(lora_path(family), adapter_name="bench"))
    row["rss_with_lora_gib"] = round(status_gib("VmRSS"), 2)
    with_lora = timed(row, "step_lora_s", step, reps)
    clock(row, "switch_off_s", lambda: sd.set_adapters([]))
    clock(row, "switch_on_s", lambda: sd.set_adapters(["bench"]))
    clock(row, "remove_s", sd.unload_lora_weights)
    after = timed(row, "step_after_s", step, reps)
    row["lora_moves_output"] = float(np.abs(with_lora - base).max())
    row["removal_bit_exact"] = digest(v.numpy() for v in sd.unet.weights) == before
    row["output_after_removal_max_abs"] = float(np.abs(after - base).max())
    return row


def reference(family: str, dtype: str, size: int, reps: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    start = time.perf_counter()
    unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET)).to(torch_dtype).eval()
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
            scheduler=None,
        )  # fmt: skip
    else:
        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    build = time.perf_counter() - start
    data = inputs(family, size)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous().to(torch_dtype)
    context = torch.from_numpy(data["context"]).to(torch_dtype)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {
            k: torch.from_numpy(data[k]).to(torch_dtype) for k in ("text_embeds", "time_ids")
        }
    t = torch.tensor([999])

    def step():
        with torch.no_grad():
            return unet(x, t, context, **extra).sample.float().permute(0, 2, 3, 1).numpy()

    def weights():
        # bfloat16 has no NumPy dtype: digest the raw 16-bit patterns.
        for p in unet.state_dict().values():
            p = p.detach().contiguous()
            yield (p.view(torch.int16) if p.dtype == torch.bfloat16 else p).numpy()

    row = dict(build_s=round(build, 1))
    base = timed(row, "step_s", step, reps)
    before = digest(weights())
    row["rss_before_lora_gib"] = round(status_gib("VmRSS"), 2)
    path = lora_path(family)
    clock(
        row,
        "apply_s",
        lambda: pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="bench"),
    )
    row["rss_with_lora_gib"] = round(status_gib("VmRSS"), 2)
    with_lora = timed(row, "step_lora_s", step, reps)
    clock(row, "switch_off_s", pipe.disable_lora)  # its set_adapters refuses an empty list
    clock(row, "switch_on_s", pipe.enable_lora)
    clock(row, "fuse_s", pipe.fuse_lora)
    fused = timed(row, "step_fused_s", step, reps)
    clock(row, "unfuse_s", pipe.unfuse_lora)
    clock(row, "remove_s", pipe.unload_lora_weights)
    after = timed(row, "step_after_s", step, reps)
    row["lora_moves_output"] = float(np.abs(with_lora - base).max())
    row["fused_vs_unfused_max_abs"] = float(np.abs(fused - with_lora).max())
    row["removal_bit_exact"] = digest(weights()) == before
    row["output_after_removal_max_abs"] = float(np.abs(after - base).max())
    return row


def run(name: str, dtype: str, size: int, reps: int) -> dict:
    framework, family = name.split("-")
    row = (ours if framework == "ours" else reference)(family, dtype, size, reps)
    return {
        "case": name, "framework": framework, "family": family, "dtype": dtype, "size": size, "batch": 1,
        **row, "peak_rss_gib": round(status_gib("VmHWM"), 2), "loadavg_1min": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def machine() -> str:
    info = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    amx = "amx" if " amx_" in flags else "no AMX"
    bf16 = "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16"
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {amx}, {bf16}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    case = sub.add_parser("case")
    case.add_argument("name", choices=[f"{f}-{m}" for f in ("ours", "diffusers") for m in PRESET])
    case.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    case.add_argument("--size", type=int, default=512)
    case.add_argument("--reps", type=int, default=2)
    every = sub.add_parser("all")
    every.add_argument("--out", default="benchmarks/results/lora.json")
    every.add_argument("--families", nargs="+", choices=tuple(PRESET), default=list(PRESET))
    every.add_argument("--size", type=int, default=512)
    every.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    if args.command == "case":
        print(json.dumps(run(args.name, args.dtype, args.size, args.reps)), flush=True)
        return
    rows = []
    for family in args.families:
        dtype = "bfloat16" if family == "sdxl" else "float32"  # SDXL in float32 is ~10 GB per framework
        for framework in ("ours", "diffusers"):  # ours first: it writes the LoRA file
            rows.append(run_case(__file__, f"{framework}-{family}", ["--dtype", dtype, "--size", args.size,
                                                                       "--reps", args.reps]))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    write_report(args.out, {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "what": f"rank-{RANK} kohya LoRA on every UNet attention / feed-forward linear; one UNet call, batch 1, "
                f"{args.size}x{args.size}; fresh process per row",
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
