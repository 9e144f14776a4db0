"""SDXL LoRA and textual-inversion fixtures, written with peft / diffusers on the tiny SDXL pipeline.

The base model is tests/fixtures/sdxl/sdxl-diffusers (tools/make_fixtures_sdxl.py). On it this attaches
random LoRAs with peft (``unet.add_adapter``; both text encoders through ``peft.inject_adapter_in_model``,
because transformers 5's own LoRA path asks for a newer peft than the index serves) and writes to
tests/fixtures/sdxl_lora/:

- ``lora_diffusers.safetensors``: ``StableDiffusionXLPipeline.save_lora_weights`` with the three adapter
  configs (alpha, rank / alpha patterns in the ``lora_adapter_metadata`` header).
- ``lora_kohya.safetensors``: the same LoRA in kohya's SDXL naming (sd-scripts trains SDXL on its own
  copy of the original sgm UNet, ``sdxl_original_unet.py``, so its module names are the original
  single-file paths): ``lora_unet_`` + the original UNet path with ``.`` -> ``_``
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``..._in_layers_2``,
  ``lora_unet_label_emb_0_0``), ``lora_te1_`` / ``lora_te2_`` + the transformers text-encoder paths,
  ``.lora_down.weight`` / ``.lora_up.weight`` and a scalar ``.alpha`` per module. The diffusers -> original
  module names come from diffusers' own single-file converter (``convert_ldm_unet_checkpoint``, run on
  the original-layout keys and inverted).
- ``lora_old_processor.safetensors`` / ``lora_old_lora_layer.safetensors``: an attention-only LoRA (alpha
  = rank, as those formats had no alpha) in diffusers' two older layouts: the attention-processor keys
  (``...attn1.processor.to_q_lora.down.weight``, text encoders ``...self_attn.to_q_lora.down.weight``),
  written with the inverse of diffusers' own conversion tables, and the ``LoRACompatibleLinear`` keys
  (``...attn1.to_q.lora.down.weight``, text encoders ``...q_proj.lora_linear_layer.down.weight``) from
  diffusers' ``convert_state_dict_to_diffusers``.
- ``lora_io.npz``: the inputs and reference outputs (both text encoders' penultimate hidden states,
  bigG's projected pooled output, the UNet's prediction NHWC with added conditioning) of the base model,
  with the full LoRA at weight 1.0 and 0.5, and with the attention-only LoRA.

Every kohya and old-format file is checked by loading it with diffusers' ``load_lora_weights`` into a
fresh pipeline, which must reproduce the peft outputs.

Textual inversion (``textual_inversion()``): an A1111 / civitai SDXL embedding (``clip_l`` (2, 32) and
``clip_g`` (2, 40): two vectors for each encoder) and a one-vector negative embedding, loaded the diffusers
way (``load_textual_inversion`` twice: ``clip_l`` into ``text_encoder`` / ``tokenizer``, ``clip_g`` into
``text_encoder_2`` / ``tokenizer_2``), and ``StableDiffusionXLPipeline.encode_prompt`` outputs of prompts
using them in ``ti_io.npz``.

Whole pipelines (``pipeline_runs()``): ``StableDiffusionXLPipeline`` with ``lora_diffusers.safetensors`` at 0.5
and ``LCMScheduler`` / ``TCDScheduler`` (eta 0.3), 4 steps, guidance 1.0 (the LCM-LoRA / TCD-LoRA recipe),
every random draw taken from tf_diffusion.noise; images in ``pipeline.npz``, the runs in ``pipeline.json``.

Usage (dev only; needs torch, diffusers, transformers, peft): python tools/make_fixtures_sdxl_lora.py
"""

from __future__ import annotations

import copy
import json
import pathlib
import tempfile

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils.state_dict_utils import (
    DIFFUSERS_OLD_TO_PEFT,
    UNET_TO_DIFFUSERS,
    convert_state_dict_to_diffusers,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ROOT / "tests" / "fixtures" / "sdxl" / "sdxl-diffusers"
SINGLE_FILE = ROOT / "tests" / "fixtures" / "sdxl" / "sdxl.safetensors"
OUT = ROOT / "tests" / "fixtures" / "sdxl_lora"

UNET_LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=[
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "time_emb_proj",
        "linear_1",
        "linear_2",
    ],  # fmt: skip
    rank_pattern={"conv1": 2},
    alpha_pattern={"conv1": 3.0},
    init_lora_weights=False,
)
TE_LORA = dict(
    r=4,
    lora_alpha=2,
    target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    init_lora_weights=False,
)
TE2_LORA = dict(TE_LORA, r=3, lora_alpha=6)
# The older diffusers layouts knew attention only, and no alpha (scale 1).
OLD_UNET_LORA = dict(
    r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
)
OLD_TE_LORA = dict(
    r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
)
PARTS = ("unet", "text_encoder", "text_encoder_2")


def randomise_lora(module: torch.nn.Module, seed: int) -> None:
    """Give every lora_A / lora_B weight a seeded draw large enough to move the outputs."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                fan_in = int(np.prod(param.shape[1:]))
                draw = rng.standard_normal(tuple(param.shape)).astype(np.float32) / np.sqrt(fan_in)
                param.copy_(torch.from_numpy(draw))


def set_lora_scale(modules, weight: float | None) -> None:
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                if weight is None:
                    layer.unscale_layer()
                else:
                    layer.scale_layer(weight)


def load_base() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(
        str(BASE), torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
    )


def inputs() -> dict:
    with np.load(ROOT / "tests" / "fixtures" / "sdxl" / "reference.npz") as ref:
        return {
            "ids": ref["ids"],
            "ids_2": ref["ids_2"],
            "x": ref["unet/x"],
            "context": ref["unet/context"],
            "text_embeds": ref["unet/text_embeds"],
            "time_ids": ref["unet/time_ids"],
            "t": np.array([10.0, 500.0], np.float32),
        }


@torch.no_grad()
def outputs(pipe, io: dict) -> dict:
    """Penultimate hidden states of both encoders, bigG's pooled projection, the UNet's NHWC output."""
    out1 = pipe.text_encoder(torch.from_numpy(io["ids"].astype(np.int64)), output_hidden_states=True)
    out2 = pipe.text_encoder_2(torch.from_numpy(io["ids_2"].astype(np.int64)), output_hidden_states=True)
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(io["x"], (0, 3, 1, 2))))
    sample = pipe.unet(
        x,
        torch.from_numpy(io["t"]),
        torch.from_numpy(io["context"]),
        added_cond_kwargs={
            "text_embeds": torch.from_numpy(io["text_embeds"]),
            "time_ids": torch.from_numpy(io["time_ids"]),
        },
    ).sample
    return {
        "te": out1.hidden_states[-2].numpy(),
        "te2": out2.hidden_states[-2].numpy(),
        "pooled": out2.text_embeds.numpy(),
        "unet": np.transpose(sample.numpy(), (0, 2, 3, 1)),
    }


@torch.no_grad()
def unet_float64(pipe, io: dict) -> dict:
    """The LoRA UNet's output in float64 (the exact answer the float32 runs approximate) at 1.0 and 0.5,
    and how far torch's own float32 runs (LoRA unmerged, and merged into the weights) are from it.

    A random LoRA on every layer of this tiny random UNet makes it sensitive to float32 rounding: the
    same maths in another order (merged or not) moves the output by a few 1e-4, so the test bounds our
    float32 output by the reference's own float32 spread around float64, not by a fixed 1e-4.
    """
    out = {}
    for weight, tag in ((None, "1.0"), (0.5, "0.5")):
        unet = copy.deepcopy(pipe.unet)
        set_lora_scale([unet], weight)
        f32 = run_unet(unet, io)
        unet.double()
        exact = run_unet(
            unet, {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in io.items()}
        )
        merged = copy.deepcopy(pipe.unet)
        set_lora_scale([merged], weight)
        for layer in merged.modules():
            if isinstance(layer, LoraLayer):
                layer.merge()
        spread = max(float(np.abs(f32 - exact).max()), float(np.abs(run_unet(merged, io) - exact).max()))
        print(f"UNet LoRA {tag}: torch float32 (unmerged, merged) within {spread:.2e} of float64")
        out[f"unet_lora_{tag}_float64"] = exact.astype(np.float32)
        out[f"unet_lora_{tag}_float32_spread"] = np.float32(spread)
    return out


def run_unet(unet, io: dict) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(io["x"], (0, 3, 1, 2))))
    sample = unet(
        x,
        torch.from_numpy(io["t"]),
        torch.from_numpy(io["context"]),
        added_cond_kwargs={
            "text_embeds": torch.from_numpy(io["text_embeds"]),
            "time_ids": torch.from_numpy(io["time_ids"]),
        },
    ).sample
    return np.transpose(sample.numpy(), (0, 2, 3, 1)).astype(np.float64)


def attach(pipe, configs: dict, seed: int, name: str = "default") -> dict:
    """peft adapters on the three components; their state dicts (text encoders with ``text_model.``)."""
    states = {}
    for i, part in enumerate(PARTS):
        module = getattr(pipe, part)
        config = LoraConfig(**configs[part])
        if part == "unet":
            module.add_adapter(config, adapter_name=name)
        else:
            inject_adapter_in_model(config, module, adapter_name=name)
        randomise_lora(module, seed + i)
        state = get_peft_model_state_dict(module, adapter_name=name)
        if part != "unet":
            # transformers 5 drops the text_model level; files (and diffusers' loader) keep it.
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        states[part] = state
    return states


def original_module_names() -> dict[str, str]:
    """diffusers UNet module path -> original (sgm) path, from diffusers' own single-file converter."""
    original = [k for k in load_numpy(str(SINGLE_FILE)) if k.startswith("model.diffusion_model.")]
    marked = {k: torch.tensor([float(i)]) for i, k in enumerate(original)}
    converted = convert_ldm_unet_checkpoint(marked, dict(load_base().unet.config))
    names = {}
    for key, value in converted.items():
        source = original[int(value.item())][len("model.diffusion_model.") :]
        if key.endswith(".weight"):
            names[key[: -len(".weight")]] = source[: -len(".weight")]
    return names


def alpha_of(config: dict, module: str) -> float:
    leaf = module.rsplit(".", 1)[-1]
    for pattern, value in config.get("alpha_pattern", {}).items():
        if module.endswith(pattern) or leaf == pattern:
            return float(value)
    return float(config["lora_alpha"])


def kohya_sgm(states: dict, configs: dict, unet_names: dict) -> dict:
    """kohya SDXL names: lora_unet_ + original UNet paths, lora_te1_ / lora_te2_ + transformers paths."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    out = {}
    for part, state in states.items():
        for key, value in state.items():
            module, _, kind = key.rpartition(".lora_")
            path = unet_names[module] if part == "unet" else module
            name = prefixes[part] + path.replace(".", "_")
            out[f"{name}.{ {'A.weight': 'lora_down.weight', 'B.weight': 'lora_up.weight'}[kind] }"] = (
                value.detach().contiguous()
            )
            out[f"{name}.alpha"] = torch.tensor(alpha_of(configs[part], module))
    return out


def old_processor_layout(states: dict) -> dict:
    """Attention LoRAs in diffusers' attention-processor keys (the inverse of diffusers' own tables)."""
    unet_back = {v: k for k, v in UNET_TO_DIFFUSERS.items() if "_lora." in k}
    te_back = {v: k for k, v in DIFFUSERS_OLD_TO_PEFT.items() if "_lora." in k}
    out = {}
    for part, state in states.items():
        for key, value in state.items():
            table = unet_back if part == "unet" else te_back
            new = next(key.replace(p, old) for p, old in table.items() if p in key)
            if part == "unet":
                new = new.replace(".attn1.", ".attn1.processor.").replace(".attn2.", ".attn2.processor.")
            out[f"{part}.{new}"] = value.contiguous()
    return out


def old_lora_layer_layout(states: dict) -> dict:
    """Attention LoRAs in the LoRACompatibleLinear / lora_linear_layer keys (diffusers' converter)."""
    out = {}
    for part, state in states.items():
        for key, value in convert_state_dict_to_diffusers(state).items():
            out[f"{part}.{key}"] = value.contiguous()
    return out


def check_with_diffusers(path: pathlib.Path, want: dict, what: str) -> None:
    pipe = load_base()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="check")
    got = outputs(pipe, inputs())
    for k, v in want.items():
        err = float(np.abs(got[k] - v).max())
        print(f"  diffusers load_lora_weights of {path.name}: {k} max abs error {err:.1e}")
        if err > 1e-5:
            raise RuntimeError(f"{what}: diffusers reads {path.name} to {k} differing by {err}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    io = inputs()
    pipe = load_base()
    ref = {f"{k}_base": v for k, v in outputs(pipe, io).items()}
    configs = {"unet": UNET_LORA, "text_encoder": TE_LORA, "text_encoder_2": TE2_LORA}
    states = attach(pipe, configs, 40)
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    for weight, tag in ((None, "1.0"), (0.5, "0.5")):
        set_lora_scale(modules, weight)
        ref.update({f"{k}_lora_{tag}": v for k, v in outputs(pipe, io).items()})
        set_lora_scale(modules, None)
    ref.update(unet_float64(pipe, io))
    for k in ("te", "te2", "pooled", "unet"):
        moved = float(np.abs(ref[f"{k}_lora_1.0"] - ref[f"{k}_base"]).max())
        scale = float(np.abs(ref[f"{k}_base"]).max())
        print(f"LoRA moves {k} by {moved:.3f} (base output max |x| {scale:.3f})")
        assert moved > 1e-2
    StableDiffusionXLPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=states["unet"],
        text_encoder_lora_layers=states["text_encoder"],
        text_encoder_2_lora_layers=states["text_encoder_2"],
        unet_lora_adapter_metadata=LoraConfig(**UNET_LORA).to_dict(),
        text_encoder_lora_adapter_metadata=LoraConfig(**TE_LORA).to_dict(),
        text_encoder_2_lora_adapter_metadata=LoraConfig(**TE2_LORA).to_dict(),
        weight_name="lora_diffusers.safetensors",
    )
    want = {k: ref[f"{k}_lora_1.0"] for k in ("te", "te2", "pooled", "unet")}
    check_with_diffusers(OUT / "lora_diffusers.safetensors", want, "diffusers format")
    meta = {"ss_network_dim": "4", "ss_network_alpha": "8", "ss_base_model_version": "sdxl_base_v1-0"}
    save_file(kohya_sgm(states, configs, original_module_names()), OUT / "lora_kohya.safetensors", meta)
    check_with_diffusers(OUT / "lora_kohya.safetensors", want, "kohya sgm names")

    old = load_base()
    old_configs = {"unet": OLD_UNET_LORA, "text_encoder": OLD_TE_LORA, "text_encoder_2": OLD_TE_LORA}
    old_states = attach(old, old_configs, 50)
    ref.update({f"{k}_old": v for k, v in outputs(old, io).items()})
    want_old = {k: ref[f"{k}_old"] for k in ("te", "te2", "pooled", "unet")}
    save_file(old_processor_layout(old_states), OUT / "lora_old_processor.safetensors")
    check_with_diffusers(OUT / "lora_old_processor.safetensors", want_old, "old processor keys")
    save_file(old_lora_layer_layout(old_states), OUT / "lora_old_lora_layer.safetensors")
    check_with_diffusers(OUT / "lora_old_lora_layer.safetensors", want_old, "old lora layer keys")

    np.savez_compressed(OUT / "lora_io.npz", **io, **ref)
    (OUT / "lora_configs.json").write_text(json.dumps({**configs, "old": old_configs}, indent=1) + "\n")


# Textual inversion: an A1111 SDXL embedding with two vectors per encoder and a one-vector negative.
TI_PROMPTS = ["a photo of inkxl on a table", "inkxl, inkxl and a dog"]
TI_NEGATIVES = ["blurry, negxl", "negxl"]


@torch.no_grad()
def textual_inversion() -> None:
    rng = np.random.default_rng(60)
    pipe = load_base()
    widths = {
        "clip_l": pipe.text_encoder.config.hidden_size,
        "clip_g": pipe.text_encoder_2.config.hidden_size,
    }
    files = {}
    for word, n in (("inkxl", 2), ("negxl", 1)):
        tensors = {
            k: torch.from_numpy(rng.standard_normal((n, w)).astype(np.float32) * 0.3)
            for k, w in widths.items()
        }
        save_file(tensors, OUT / f"{word}.safetensors")
        files[word] = tensors
        pipe.load_textual_inversion(
            tensors["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            tensors["clip_g"], token=word, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        TI_PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=TI_NEGATIVES,
    )  # fmt: skip
    ids = {
        "ids": pipe.tokenizer(TI_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids,
        "ids_2": pipe.tokenizer_2(TI_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids,
    }
    base = load_base()
    plain, _, plain_pooled, _ = base.encode_prompt(
        TI_PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    moved = float(np.abs(plain.numpy() - embeds.numpy()).max())
    print(f"embeddings move the SDXL context by {moved:.3f}, the pooled output by "
          f"{float(np.abs(plain_pooled.numpy() - pooled.numpy()).max()):.3f}")  # fmt: skip
    assert moved > 1e-2
    np.savez_compressed(
        OUT / "ti_io.npz",
        context=embeds.numpy(),
        negative_context=negative.numpy(),
        pooled=pooled.numpy(),
        negative_pooled=negative_pooled.numpy(),
        **{k: np.asarray(v, np.int64) for k, v in ids.items()},
    )
    (OUT / "ti_cases.json").write_text(
        json.dumps({"prompts": TI_PROMPTS, "negatives": TI_NEGATIVES, "files": sorted(files)}, indent=1)
        + "\n"
    )


# Whole StableDiffusionXLPipeline runs with the diffusers-format LoRA at 0.5 and the few-step samplers
# LCM-LoRA / TCD-LoRA users pick: (name, scheduler class, steps, eta, seed), 16x16, guidance 1.0 (no
# unconditional half), every random draw taken from tf_diffusion.noise.
PIPELINE_RUNS = [("lcm", "LCMScheduler", 4, None, 7), ("tcd", "TCDScheduler", 4, 0.3, 8)]
PIPELINE_PROMPT = "a photo of a cat"


@torch.no_grad()
def pipeline_runs() -> None:
    import sys

    import diffusers

    sys.path.insert(0, str(ROOT / "tools"))
    from make_fixtures_pipeline import NoiseQueues

    from tf_diffusion import noise as noise_lib

    out = {}
    for name, cls_name, steps, eta, seed in PIPELINE_RUNS:
        pipe = load_base()
        pipe.load_lora_weights(str(OUT), weight_name="lora_diffusers.safetensors", adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.5])
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config)
        seeds = noise_lib.image_seeds(seed, 1)
        latent = (8, 8, 4)
        with NoiseQueues() as queues:
            queues.queues["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
            step_noise = noise_lib.batch_normal(seeds, noise_lib.STEPS, (steps, *latent))  # (1, E, h, w, C)
            queues.queues["scheduler"] += [step_noise[:, i] for i in range(steps - 1)]  # none after the last
            kwargs = {} if eta is None else {"eta": eta}
            images = pipe(
                PIPELINE_PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=1.0,
                output_type="np", **kwargs,
            ).images  # fmt: skip
        out[f"{name}/images"] = np.asarray(images, np.float32)
        print(f"pipeline {name}: images {images.shape} mean {images.mean():.4f}")
    np.savez_compressed(OUT / "pipeline.npz", **out)
    (OUT / "pipeline.json").write_text(
        json.dumps({"prompt": PIPELINE_PROMPT, "runs": PIPELINE_RUNS, "weight": 0.5}, indent=1) + "\n"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
    textual_inversion()
    pipeline_runs()
    for path in OUT.iterdir():  # safetensors writes owner-only files; fixtures are read by everyone
        path.chmod(0o644)
