"""Full-size Flux.1 [schnell] with int8 weights in one process: encode, one transformer step, decode.

The released sizes (19 double + 38 single blocks, 3072 wide: 11.9 B parameters, 24 GB in bfloat16;
T5-XXL's encoder, 4.8 B; CLIP-L; the 16-channel VAE) with random weights that are created straight
into int8: each model is built with int8 Linear weights that never existed in float
(``execution.quantize.build_model``), then every Linear gets its own seeded float32 draw
(``U(-1/sqrt(in), 1/sqrt(in))``, nn.Linear's initialisation range; the seed is the CRC32 of the
checkpoint key), quantized into it one layer at a time by ``quantize.assign_float``, the path
``from_pretrained(quantize="int8")`` loads through. The float model is never whole in memory.
CLIP-L and T5 are quantized too (``quantize.DEFAULT_COMPONENTS``); the VAE stays float32 (as the
Flux pipeline runs it under a 16-bit policy).

Phases, in the pipeline's order, each with its own peak resident memory (VmHWM, reset between
phases through ``/proc/self/clear_refs``) and wall time:

1. ``build_text_encoders`` (CLIP-L, T5-XXL int8), 2. ``encode`` (77 CLIP tokens, 256 T5 tokens of
random ids, in a TensorFlow graph), 3. ``build_transformer`` (int8), 4. ``transformer_step``: one
call at 1024x1024 (4096 image tokens + 256 text tokens, batch 1, timestep 1), graph mode, the first
call (tracing included), then ``--repeats`` more, 5. ``vae_decode`` of the latents after that one
Euler step (sigma 1 -> 0), 6. ``reference`` (unless ``--no-reference``): the same transformer in
bfloat16, streamed: one bfloat16 double block and one single block are built once and, for each block
in turn, loaded with that block's weights (the same seeded draws, cast to bfloat16, and the int8
model's own norms and biases) and run eagerly on the previous block's output, so the 24 GB model
never exists; its output is compared with the int8 step's (relative L2, max abs), and decoded by the
same VAE for the image error.

Every model stays resident through the decode, as in a pipeline; the text encoders are freed
before the reference. The JSON is rewritten after every phase.

Usage (full size needs the big-memory lock; about 16 GiB resident):
    flock /work/locks/bigmem timeout 3600 nice -n 5 python benchmarks/flux_full.py
    python benchmarks/flux_full.py --depth 1 --single-depth 1 --t5-layers 2 --size 256 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks._harness import status_gib  # noqa: E402


def _reset_peak() -> None:
    """Start a new VmHWM (Linux: writing 5 to clear_refs resets the peak to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def _machine() -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{_cpu_model()}, {os.cpu_count()} cores, {total:.1f} GiB"


def draw(key: str, shape: tuple[int, int]):
    """The float32 (in, out) weight of checkpoint key ``key``: U(-1/sqrt(in), 1/sqrt(in)), seeded by the key."""
    import numpy as np

    rng = np.random.default_rng(zlib.crc32(key.encode()))
    w = rng.random(shape, dtype=np.float32)
    bound = np.float32(1.0 / np.sqrt(shape[0]))
    w *= 2 * bound
    w -= bound
    return w


def _linear_weights(model, prefix: str):
    """(key, Linear) of every Linear weight of ``model``, keys prefixed as in the pipeline's folder."""
    from tf_diffusion import layers
    from tf_diffusion.weights.state_dict import named_parameters

    for key, (layer, attr) in named_parameters(model).items():
        if isinstance(layer, layers.Linear) and attr == "weight":
            yield prefix + key, layer


def build_int8(constructor, prefix: str):
    """``constructor()`` with int8 Linear weights, each filled from its seeded draw, one layer at a time."""
    from tf_diffusion.execution import quantize

    model = quantize.build_model(constructor, "int8")
    for key, layer in _linear_weights(model, prefix):
        quantize.assign_float(layer, draw(key, (layer.in_features, layer.out_features)))
    quantize.return_freed_memory()
    return model


class Report:
    """The JSON report, rewritten after every phase; ``phase`` times a step and records its memory."""

    def __init__(self, path: str, header: dict):
        self.path = pathlib.Path(path)
        self.data = dict(header, phases=[])

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def phase(self, name: str, fn, **extra):
        _reset_peak()
        start = time.perf_counter()
        result = fn()
        row = dict(
            phase=name,
            seconds=round(time.perf_counter() - start, 1),
            rss_gib=round(status_gib("VmRSS"), 2),
            peak_rss_gib=round(status_gib("VmHWM"), 2),
            loadavg_1min=round(os.getloadavg()[0], 2),
            **extra,
        )
        self.data["phases"].append(row)
        self.data["peak_rss_gib"] = max(p["peak_rss_gib"] for p in self.data["phases"])
        self.write()
        print(json.dumps(row), flush=True)
        return result


def _weights_gib(model) -> float:
    import keras
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
               for v in model.weights) / 2**30  # fmt: skip


def _streamed_reference(transformer, config, inputs):
    """The bfloat16 transformer's output on ``inputs``, one block's weights in memory at a time.

    A depth-0 bfloat16 shell runs the embedders and the final layer (its Linears from the seeded draws,
    everything else copied from the int8 ``transformer``); its block lists are replaced by callables
    that load block i into one shared bfloat16 block and run it.
    """
    import keras

    from tf_diffusion import layers
    from tf_diffusion.flux import DoubleStreamBlock, FluxTransformer, SingleStreamBlock
    from tf_diffusion.layers import dtype_policy_scope
    from tf_diffusion.weights.state_dict import named_parameters

    def load(target, source, prefix: str) -> None:
        sources = named_parameters(source)  # a superset of the target's keys for the shell
        for key, (layer, attr) in named_parameters(target).items():
            variable = getattr(layer, attr)
            if isinstance(layer, layers.Linear) and attr == "weight":
                value = draw(prefix + key, (layer.in_features, layer.out_features))
            else:
                src_layer, src_attr = sources[key]
                value = keras.ops.convert_to_numpy(getattr(src_layer, src_attr))
            variable.assign(keras.ops.cast(value, variable.dtype))

    shell = FluxTransformer(config.replace(depth=0, depth_single_blocks=0), dtype="bfloat16")
    load(shell, transformer, "transformer.")
    with dtype_policy_scope("bfloat16"):
        double, single = DoubleStreamBlock(config), SingleStreamBlock(config)

    def streamed(shared, blocks, group):
        def run(i):
            def call(*args, **kwargs):
                load(shared, blocks[i], f"transformer.{group}.{i}.")
                return shared(*args, **kwargs)

            return call

        return [run(i) for i in range(len(blocks))]

    object.__setattr__(shell, "double_blocks", streamed(double, transformer.double_blocks, "double_blocks"))
    object.__setattr__(shell, "single_blocks", streamed(single, transformer.single_blocks, "single_blocks"))
    return keras.ops.convert_to_numpy(keras.ops.cast(shell(**inputs, guidance=None), "float32"))


def diffusers_quanto(args, report) -> None:
    """diffusers' ``FluxTransformer2DModel`` with optimum-quanto qint8 weights, one 1024 step (timing, memory).

    Built on the meta device, then one top-level module at a time: allocated, initialised
    (``reset_parameters``; norm weights ones), cast to bfloat16, quantized (``quantize(weights=qint8)``)
    and frozen into int8, so its bfloat16 model is never whole either. Its weights are its own random
    ones (other keys, other draws): time and memory only, no error against ours.
    """
    import numpy as np
    import torch
    from diffusers import FluxTransformer2DModel
    from optimum.quanto import freeze, qint8, quantize

    torch.manual_seed(0)

    def build():
        with torch.device("meta"):
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=args.depth, num_single_layers=args.single_depth,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
            )  # fmt: skip
        parts = [
            m
            for name, m in model.named_children()
            if name not in ("transformer_blocks", "single_transformer_blocks")
        ]
        for part in (*parts, *model.transformer_blocks, *model.single_transformer_blocks):
            part.to_empty(device="cpu")
            for module in part.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                elif getattr(module, "weight", None) is not None and module.weight.ndim == 1:
                    torch.nn.init.ones_(module.weight)
            part.to(torch.bfloat16)
            if not isinstance(part, torch.nn.Linear):  # quanto replaces a module's children
                quantize(part, weights=qint8)
                freeze(part)
        top = [name for name, m in model.named_children() if isinstance(m, torch.nn.Linear)]
        quantize(model, weights=qint8, include=top)
        freeze(model)
        return model.eval()

    model = report.phase("diffusers_quanto_build", build)
    weights = sum(
        (p.numel() * p.element_size()) for p in model.state_dict().values() if isinstance(p, torch.Tensor)
    )
    report.data["weights_gib"] = {"diffusers_quanto_transformer": round(weights / 2**30, 3)}
    grid = args.size // 16
    rng = np.random.default_rng(0)
    x = dict(
        hidden_states=torch.from_numpy(rng.standard_normal((1, grid * grid, 64), np.float32)).bfloat16(),
        encoder_hidden_states=torch.from_numpy(rng.standard_normal((1, args.tokens, 4096), np.float32)).bfloat16(),
        pooled_projections=torch.from_numpy(rng.standard_normal((1, 768), np.float32)).bfloat16(),
        timestep=torch.tensor([1.0]).bfloat16(), img_ids=torch.zeros(grid * grid, 3), txt_ids=torch.zeros(args.tokens, 3),
        guidance=None, return_dict=False,
    )  # fmt: skip

    def call():
        with torch.inference_mode():
            return model(**x)[0].float().numpy()

    report.phase("diffusers_quanto_step", call, note="first call")
    for i in range(args.repeats):
        report.phase("diffusers_quanto_step", call, note=f"call {i + 2}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=19, help="double blocks (released: 19)")
    parser.add_argument("--single-depth", type=int, default=38, help="single blocks (released: 38)")
    parser.add_argument("--t5-layers", type=int, default=24, help="T5 encoder layers (T5-XXL: 24)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--tokens", type=int, default=256, help="T5 tokens ([schnell]: 256)")
    parser.add_argument("--repeats", type=int, default=0, help="transformer calls after the first")
    parser.add_argument(
        "--reference-size", type=int, default=None,
        help="image side of the error comparison (default --size; smaller is cheaper: the same weights)",
    )  # fmt: skip
    parser.add_argument(
        "--reference-first", action="store_true",
        help="run the comparison after building, before the --size step (text encoders still resident)",
    )  # fmt: skip
    parser.add_argument("--no-reference", action="store_true", help="skip the streamed bfloat16 reference")
    parser.add_argument(
        "--diffusers-quanto", action="store_true",
        help="instead: diffusers' transformer with optimum-quanto qint8 weights (one step; needs optimum-quanto)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flux_full.json"))
    args = parser.parse_args(argv)
    for flag, side in (("--size", args.size), ("--reference-size", args.reference_size)):
        if side is not None and (side % 16 or side <= 0):
            raise SystemExit(f"{flag}={side} is not allowed: it must be a positive multiple of 16")
    for name in ("depth", "single_depth", "t5_layers", "repeats"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be non-negative")

    if args.diffusers_quanto:
        import diffusers
        import torch

        report = Report(args.out, dict(
            what="diffusers FluxTransformer2DModel, optimum-quanto qint8 weights, bfloat16 compute, random weights",
            machine=_machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            versions=f"torch {torch.__version__} / diffusers {diffusers.__version__}",
            depth=args.depth, single_depth=args.single_depth, size=args.size,
            image_tokens=(args.size // 16) ** 2, text_tokens=args.tokens,
        ))  # fmt: skip
        diffusers_quanto(args, report)
        return

    import keras
    import numpy as np
    import tensorflow as tf

    from tf_diffusion import execution
    from tf_diffusion.clip import CLIPTextEncoder
    from tf_diffusion.execution import quantize
    from tf_diffusion.flux import FluxTransformer, latent_image_ids, text_ids, unpack_latents
    from tf_diffusion.flux_pipeline import FLUX_PIPELINE_PRESETS
    from tf_diffusion.t5 import T5Encoder
    from tf_diffusion.vae import AutoencoderKL

    keras.utils.set_random_seed(0)
    preset = FLUX_PIPELINE_PRESETS["flux1-schnell"]
    config = preset.transformer.replace(depth=args.depth, depth_single_blocks=args.single_depth)
    t5_config = preset.text_encoder_2.__class__(
        **{**preset.text_encoder_2.__dict__, "num_layers": args.t5_layers}
    )
    grid = args.size // 16
    report = Report(
        args.out,
        dict(
            what="Flux.1 [schnell] int8 weights (random, created straight into int8), one process, "
            "TensorFlow graph mode; the pipeline's order",
            machine=_machine(),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            versions=f"TensorFlow {tf.__version__} / Keras {keras.__version__}",
            depth=args.depth,
            single_depth=args.single_depth,
            t5_layers=args.t5_layers,
            size=args.size,
            image_tokens=grid * grid,
            text_tokens=args.tokens,
        ),  # fmt: skip
    )
    graph = execution.ExecutionOptions(compile="graph")
    rng = np.random.default_rng(0)

    def text_encoders():
        clip = build_int8(lambda: CLIPTextEncoder(preset.text_encoder, dtype="bfloat16"), "text_encoder.")
        t5 = build_int8(lambda: T5Encoder(t5_config, dtype="bfloat16"), "text_encoder_2.")
        return clip, t5

    clip, t5 = report.phase("build_text_encoders", text_encoders)
    report.data["weights_gib"] = {"clip_l": round(_weights_gib(clip), 3), "t5": round(_weights_gib(t5), 3)}

    def encode():
        clip_ids = rng.integers(1, 49407, (1, 77)).astype(np.int32)
        clip_ids[0, 20] = 49407  # an EOS: the pooled output is the hidden state there
        t5_ids = rng.integers(0, 32000, (1, args.tokens)).astype(np.int32)
        hidden = execution.compile(lambda ids: clip(ids), graph)(tf.constant(clip_ids))
        context = execution.compile(lambda ids: t5(ids), graph)(tf.constant(t5_ids))
        pooled = keras.ops.convert_to_numpy(keras.ops.cast(hidden, "float32"))[:, 20]
        return keras.ops.convert_to_numpy(context), pooled

    context, pooled = report.phase("encode", encode)

    transformer = report.phase(
        "build_transformer",
        lambda: build_int8(lambda: FluxTransformer(config, dtype="bfloat16"), "transformer."),
    )
    report.data["weights_gib"]["transformer"] = round(_weights_gib(transformer), 3)
    report.write()

    def make_inputs(side: int):
        g = side // 16
        x = np.random.default_rng(side).standard_normal((1, g * g, 64)).astype(np.float32)  # seeded by size
        return x, g, dict(
            img=tf.constant(x), img_ids=tf.constant(latent_image_ids(g, g)), txt=tf.constant(context),
            txt_ids=tf.constant(text_ids(args.tokens)), timesteps=tf.constant([1.0]), y=tf.constant(pooled),
        )  # fmt: skip

    step = execution.compile(lambda a: transformer(**a, guidance=None), graph)

    def call(a):
        return keras.ops.convert_to_numpy(keras.ops.cast(step(a), "float32"))

    vae = AutoencoderKL(preset.vae, dtype="float32")
    vae_config = preset.vae
    decode = execution.compile(lambda z: vae.decode(z), graph)

    def image(latents, grid, velocity):
        x = latents - velocity  # one Euler step from sigma 1 to 0
        z = (
            unpack_latents(tf.constant(x), 2 * grid, 2 * grid) / vae_config.scaling_factor
            + vae_config.shift_factor
        )
        return keras.ops.convert_to_numpy(decode(z))

    def compare(side: int, out=None, picture=None) -> None:
        """The int8 step (``out``, else run here) against the streamed bfloat16 one at ``side``; images too."""
        report.data["reference_size"] = side
        latents, grid, inputs = make_inputs(side)
        if out is None:
            out = report.phase(
                "transformer_step_reference_size", lambda: call(inputs), note=f"int8 at {side}"
            )
            picture = image(latents, grid, out)
        ref = report.phase("reference", lambda: _streamed_reference(transformer, config, inputs),
                           note=f"bfloat16 at {side}, streamed block by block, eager")  # fmt: skip
        quantize.return_freed_memory()
        np.save(pathlib.Path(args.out).with_suffix(".bf16.npy"), ref)
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        report.data["transformer_error"] = dict(
            rel_l2=float(np.linalg.norm(out64 - ref64) / np.linalg.norm(ref64)),
            max_abs=float(np.abs(out64 - ref64).max()),
            ref_max_abs=float(np.abs(ref64).max()),
        )
        report.write()
        ref_picture = report.phase("vae_decode_reference", lambda: image(latents, grid, ref))
        a, b = picture.astype(np.float64), ref_picture.astype(np.float64)
        report.data["image_error"] = dict(
            rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            max_abs=float(np.abs(a - b).max()),
            ref_max_abs=float(np.abs(b).max()),
            note="images roughly in [-1, 1], not clipped",
        )
        report.write()

    side = args.reference_size or args.size
    if args.reference_first and not args.no_reference:
        compare(side)

    latents, grid, inputs = make_inputs(args.size)
    out = report.phase("transformer_step", lambda: call(inputs), note="first call, tracing included")
    for i in range(args.repeats):
        out = report.phase("transformer_step", lambda: call(inputs), note=f"call {i + 2}")
    np.save(pathlib.Path(args.out).with_suffix(".int8.npy"), out)
    picture = report.phase("vae_decode", lambda: image(latents, grid, out), note="first call at --size")

    if not args.reference_first and not args.no_reference:
        # The text encoders are done with (their output is in the inputs): freed for the reference's
        # bfloat16 blocks, so the phases the pipeline runs are the ones measured with everything resident.
        del clip, t5
        quantize.return_freed_memory()
        compare(side, *((out, picture) if side == args.size else ()))
    print(json.dumps({k: v for k, v in report.data.items() if k != "phases"}), flush=True)


if __name__ == "__main__":
    main()
