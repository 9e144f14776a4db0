"""One guided denoising step with 0, 1 and 2 ControlNets: ours against diffusers, bfloat16, random weights.

A step is what a guided ``generate()`` evaluates once per sampler step: the UNet on a batch of 2 (the
unconditional and conditional halves), after every ControlNet on the same batch with its hint image,
the nets' down and mid residuals scaled and summed into the UNet's skips. The models are full size:
SD1.5 (``--family sd15``, the UNet of runwayml/stable-diffusion-v1-5 and control_v11p_sd15_* nets) or
SDXL (``--family sdxl``, the base UNet and diffusers/controlnet-canny-sdxl-1.0-shaped nets, with the
pooled text embeddings and time ids).

Same weights: diffusers' own random initialisation (``torch.manual_seed``), saved once in bfloat16 as
diffusers ``unet/`` and ``controlnet_<k>/`` folders that every case loads. diffusers initialises the
nets' zero convolutions to zero; they are redrawn (normal, std 0.05) so that the residuals change the
step and the relative error covers them. Each case runs in a fresh process (run the script under
``nice``):

- ``diffusers-<n>``: ``UNet2DConditionModel`` after ``ControlNetModel`` (n = 1) or
  ``MultiControlNetModel`` (n = 2), in bfloat16 under ``torch.inference_mode``, as
  ``StableDiffusionControlNetPipeline`` calls them;
- ``ours-<n>``: ``adapters.controlnet.ControlNetDenoiser`` around the UNet denoiser (n = 0: the UNet
  denoiser alone), compiled by ``execution.compile`` under ``execution.default_options`` of the UNet
  with its filters prepared once, as ``generate()`` runs its step on this CPU.

Each case reports ``rss_gib`` after loading, ``peak_rss_gib`` (VmHWM, loading included),
``first_call_s`` (tracing included), ``step_s`` (best of ``--repeats`` later calls); the report adds
``rel_error`` = ||ours - diffusers|| / ||diffusers|| with the same number of nets, ``per_net_cost``
= (step_n - step_0) / n / step_0, and ``ours_over_diffusers`` = ours step / diffusers step.

Usage:
    nice -n 10 python benchmarks/controlnet_step.py --family sd15 --size 512       # JSON to results/
    python benchmarks/controlnet_step.py case ours-2 FOLDER INPUTS.npz OUT.npy 2    # one case
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks._harness import measure, rel_errors, run_cases, write_report  # noqa: E402
from benchmarks.sdxl_step import SDXL_UNET  # noqa: E402

CASES = ("diffusers-0", "ours-0", "diffusers-1", "ours-1", "diffusers-2", "ours-2")
SCALES = (1.0, 0.7)  # controlnet_conditioning_scale of net 0 and net 1

# runwayml/stable-diffusion-v1-5's unet/config.json (the architecture fields; the rest are defaults).
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
CONTEXT = {"sd15": 768, "sdxl": 2048}


def _write_models(folder: pathlib.Path, family: str) -> None:
    """diffusers' random UNet (seed 0) and two nets made from it (``from_unet``, seeds 1, 2), bfloat16."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    zero_convs = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))
    for k in range(2):
        torch.manual_seed(1 + k)
        # from_unet copies the UNet's encoder; redraw everything so the nets differ from it and each other.
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(zero_convs):
                    p.normal_(0.0, 0.05)
        net.to(torch.bfloat16).save_pretrained(folder / f"controlnet_{k}", safe_serialization=True)
        del net
    unet.to(torch.bfloat16).save_pretrained(folder / "unet", safe_serialization=True)


def _write_inputs(path: pathlib.Path, family: str, size: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    h = size // 8
    arrays = dict(
        x=rng.standard_normal((2, h, h, 4)).astype(np.float32),
        context=rng.standard_normal((2, 77, CONTEXT[family])).astype(np.float32),
        # The hints of a guided step: one image per net, the same for both halves, in [0, 1].
        hint_0=np.repeat(rng.uniform(size=(1, size, size, 3)).astype(np.float32), 2, axis=0),
        hint_1=np.repeat(rng.uniform(size=(1, size, size, 3)).astype(np.float32), 2, axis=0),
    )
    if family == "sdxl":
        arrays["text_embeds"] = rng.standard_normal((2, 1280)).astype(np.float32)
        arrays["time_ids"] = np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (2, 1))
    np.savez(path, **arrays)


T = 999  # the first step's timestep


def _diffusers(folder: pathlib.Path, x: dict, nets: int):
    import numpy as np
    import torch
    from diffusers import ControlNetModel, MultiControlNetModel, UNet2DConditionModel

    bf16 = torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=bf16).eval()
    controls = [
        ControlNetModel.from_pretrained(folder / f"controlnet_{k}", torch_dtype=bf16).eval()
        for k in range(nets)
    ]
    sample = torch.from_numpy(x["x"]).permute(0, 3, 1, 2).contiguous().to(bf16)
    context = torch.from_numpy(x["context"]).to(bf16)
    hints = [torch.from_numpy(x[f"hint_{k}"]).permute(0, 3, 1, 2).contiguous().to(bf16) for k in range(nets)]
    added = {k: torch.from_numpy(x[k]).to(bf16) for k in ("text_embeds", "time_ids") if k in x}
    extra = {"added_cond_kwargs": added} if added else {}
    t = torch.tensor(T)
    if nets == 1:
        control = controls[0]
        kwargs = dict(controlnet_cond=hints[0], conditioning_scale=SCALES[0])
    elif nets == 2:
        control = MultiControlNetModel(controls)
        kwargs = dict(controlnet_cond=hints, conditioning_scale=list(SCALES))

    def call():
        with torch.inference_mode():
            residuals = {}
            if nets:
                down, mid = control(sample, t, context, **kwargs, **extra, return_dict=False)
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = unet(sample, t, context, **residuals, **extra, return_dict=False)[0]
            return out.float().permute(0, 2, 3, 1).numpy()

    weights = sum(p.numel() * p.element_size() for m in (unet, *controls) for p in m.parameters())
    return call, weights, np


def _ours(folder: pathlib.Path, x: dict, nets: int):
    import numpy as np
    import tensorflow as tf

    from tf_diffusion import execution
    from tf_diffusion.adapters.controlnet import IMAGE, SCALE, ControlNetDenoiser
    from tf_diffusion.denoising.conditioning import Conditioning
    from tf_diffusion.denoising.denoiser import UNetDenoiser
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.weights.controlnet import load_controlnet
    from tf_diffusion.weights.diffusers_unet import (
        convert_diffusers_unet_state_dict,
        unet_config_from_diffusers,
    )
    from tf_diffusion.weights.safetensors_io import load_safetensors
    from tf_diffusion.weights.state_dict import load_state_dict

    data = json.loads((folder / "unet" / "config.json").read_text())
    config = unet_config_from_diffusers(data)
    unet = execution.apply(UNetModel(config, dtype="bfloat16"))
    tensors = load_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    load_state_dict(unet, convert_diffusers_unet_state_dict(tensors, config))
    del tensors
    controls = [load_controlnet(folder / f"controlnet_{k}", dtype="bfloat16") for k in range(nets)]
    base = UNetDenoiser(unet)
    denoiser = ControlNetDenoiser(base, controls) if nets else base
    extras = {k: tf.constant(x[k]) for k in ("text_embeds", "time_ids") if k in x}
    if nets:
        extras[SCALE] = tf.constant(np.tile(np.array([SCALES[:nets]], np.float32), (2, 1)))
        extras.update({IMAGE.format(k): tf.constant(x[f"hint_{k}"]) for k in range(nets)})
    sample, context = tf.constant(x["x"]), tf.constant(x["context"])
    t = tf.constant(float(T))
    opts = execution.default_options(unet, tuple(sample.shape))
    state = execution.prepare(unet, tuple(sample.shape), opts)  # once per generate() call, not per step
    step = execution.compile(lambda s, t, c, e: denoiser(s, t, Conditioning(c, e)), opts)

    def call():
        return np.asarray(step(sample, t, context, extras, execution_state=state), np.float32)

    weights = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for m in (unet, *controls) for v in m.weights
    )
    return call, weights, opts.compile


def _case(name: str, folder: str, inputs: str, out: str, repeats: int) -> dict:
    import numpy as np

    framework, nets = name.rsplit("-", 1)
    x = dict(np.load(inputs))
    folder = pathlib.Path(folder)
    call, weights, mode = (_diffusers if framework == "diffusers" else _ours)(folder, x, int(nets))
    result, timing = measure(call, repeats)
    np.save(out, result)
    extra = {} if framework == "diffusers" else {"execution": mode}
    return dict(
        case=name, nets=int(nets), weights_gib=round(weights / 2**30, 3), **extra, **timing,
        loadavg_1min=round(os.getloadavg()[0], 2),
    )  # fmt: skip


def _machine() -> dict:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        "unknown",
    )
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    versions = subprocess.run(
        [sys.executable, "-c", "import tensorflow, keras, torch, diffusers; print(tensorflow.__version__, "
         "keras.__version__, torch.__version__, diffusers.__version__)"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    return dict(
        cpu=model,
        cores=os.cpu_count(),
        amx_flags=sorted(f for f in flags if f.startswith("amx")),
        avx512_bf16="avx512_bf16" in flags,
        python=platform.python_version(),
        versions=dict(zip(("tensorflow", "keras", "torch", "diffusers"), versions, strict=False)),
    )


def _summary(results: list[dict]) -> dict:
    """Per framework: the cost of each net as a fraction of the UNet-only step; ours / diffusers steps."""
    steps = {r["case"]: r["step_s"] for r in results if r.get("step_s")}
    out = {}
    for framework in ("ours", "diffusers"):
        base = steps.get(f"{framework}-0")
        for n in (1, 2):
            step = steps.get(f"{framework}-{n}")
            if base and step:
                out[f"{framework}_per_net_cost_{n}"] = round((step - base) / n / base, 3)
    for n in (0, 1, 2):
        if steps.get(f"ours-{n}") and steps.get(f"diffusers-{n}"):
            out[f"ours_over_diffusers_{n}"] = round(steps[f"ours-{n}"] / steps[f"diffusers-{n}"], 3)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "case":
        _, name, folder, inputs, out, *rest = argv
        print(json.dumps(_case(name, folder, inputs, out, int(rest[0]) if rest else 1)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (sd15: 512, sdxl: 1024)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results" / "controlnet_step.json"),
        help="the report; a run replaces its own family and size in it and keeps the others",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="a folder to keep the random models in (written when it has none); default: a temporary one",
    )
    args = parser.parse_args(argv)
    size = args.size or (512 if args.family == "sd15" else 1024)
    if size % 64 or size <= 0:
        raise SystemExit(f"--size={size} is not allowed: it must be a positive multiple of 64")
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} is not allowed: at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        models = pathlib.Path(args.models) if args.models else tmp
        if not (models / "unet" / "config.json").is_file():
            _write_models(models, args.family)
        _write_inputs(tmp / "inputs.npz", args.family, size)
        inputs = tmp / "inputs.npz"
        results, outputs = run_cases(
            __file__, args.cases, tmp, lambda name, o: [models, inputs, o, args.repeats]
        )
    for n in (0, 1, 2):
        group = [r for r in results if r["nets"] == n]
        rel_errors(group, outputs, f"diffusers-{n}")
    run = dict(
        family=args.family, size=size, dtype="bfloat16", batch=2, timestep=T, scales=list(SCALES),
        machine=_machine(), results=results, summary=_summary(results),
    )  # fmt: skip
    path = pathlib.Path(args.out)
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[f"{args.family}_{size}"] = run
    write_report(str(path), report)


if __name__ == "__main__":
    main()
