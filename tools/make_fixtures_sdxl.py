"""Write tiny SDXL fixtures and full-size SDXL key manifests with diffusers / transformers.

Written to tests/fixtures/sdxl/:

* ``sdxl-diffusers/``: a tiny ``StableDiffusionXLPipeline`` (CLIP-L-like and bigG-like text
  encoders with a projection, a 3-level UNet with per-level transformer depth (1, 2, 3) and
  ``text_time`` added conditioning, the SD VAE layout with SDXL's scaling 0.13025, Euler with
  SDXL's scheduler config), saved by diffusers' ``save_pretrained`` (safetensors, float32).
* ``unet_diffusers_test.json``: the UNet of diffusers' own SDXL pipeline tests
  (block_out_channels (32, 64), transformer_layers_per_block (1, 2), 8-wide time embeddings, one
  norm group): its config, key shapes and the seed of its ``random_state_dict`` weights.
* ``sdxl.safetensors``: the same weights in the original single-file layout (``conditioner.embedders.0.
  transformer.``, ``conditioner.embedders.1.model.`` with fused ``in_proj`` and un-transposed
  ``text_projection``), written by our writer and checked here with diffusers' ``from_single_file``.
* ``reference.npz``: inputs and the reference outputs: both text encoders (penultimate hidden
  states, bigG's projected pooled output), both UNets with ``added_cond_kwargs``, and whole
  ``StableDiffusionXLPipeline`` runs (``output_type="np"``) from given latents with Euler and
  DPM++ 2M Karras.
* ``manifests/sdxl-base-1.0.json``, ``manifests/sdxl-refiner-1.0.json``: key -> shape of the
  full-size models (diffusers' UNet2DConditionModel and AutoencoderKL from the published configs,
  transformers' CLIPTextModel / CLIPTextModelWithProjection), built on torch's meta device. UNet
  and VAE keys are renamed to the original layout by our renames; the UNet rename is checked
  here against diffusers' own converter (``convert_ldm_unet_checkpoint``, original -> diffusers),
  which must give back diffusers' key set exactly.

* ``tasks.json`` / ``tasks.npz``, ``sdxl-refiner-diffusers/``, ``unet_inpaint.json`` (``--tasks`` writes
  only these, from the existing ``sdxl-diffusers/``): ``StableDiffusionXLImg2ImgPipeline`` (base, and a
  tiny refiner with aesthetic-score time ids and only the bigG-like encoder), micro-conditioning
  values, ``StableDiffusionXLInpaintPipeline`` (4-channel base UNet and a 9-channel UNet) and the
  base-to-refiner hand-off (``denoising_end`` -> latents -> ``denoising_start``) and few-step Turbo
  settings (trailing spacing, 1-2 steps, guidance off), every random draw taken from tf_diffusion.noise
  for the same seeds.

* ``handoff_inpaint.json`` / ``handoff_inpaint.npz`` (``--inpaint-handoff`` writes only these): inpainting
  through the base-to-refiner hand-off, both stages StableDiffusionXLInpaintPipeline.

Usage (dev only; needs torch, diffusers, transformers):
python tools/make_fixtures_sdxl.py [--tasks | --inpaint-handoff]
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from transformers import CLIPTokenizer as TorchCLIPTokenizer  # noqa: E402

from tf_diffusion.config import TokenizerConfig  # noqa: E402
from tf_diffusion.testing import random_state_dict  # noqa: E402
from tf_diffusion.tokenizer import CLIPTokenizer  # noqa: E402
from tf_diffusion.weights.diffusers_unet import (  # noqa: E402
    convert_diffusers_unet_state_dict,
    unet_config_from_diffusers,
)

OUT = ROOT / "tests" / "fixtures" / "sdxl"
MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
SMALL_VOCAB = ROOT / "tests" / "fixtures" / "tokenizer" / "small_sd2"

# The published configs (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json).
UNET_BASE = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
UNET_REFINER = dict(
    UNET_BASE,
    attention_head_dim=[6, 12, 24, 24],
    block_out_channels=[384, 768, 1536, 1536],
    cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
    transformer_layers_per_block=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
VAE_FULL = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
CLIP_L = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
BIGG = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)

# Tiny models. Our own UNet: 3 levels, no attention at level 0 as SDXL, depths (1, 2, 3), 4-wide heads.
UNET_TINY = dict(
    block_out_channels=[8, 16, 32],
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4, 8],
    transformer_layers_per_block=[1, 2, 3],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=72,
    norm_num_groups=4,
)
# diffusers' tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py get_dummy_components().
UNET_DIFFUSERS_TEST = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=[1, 2],
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=1,
)
VAE_TINY = dict(
    block_out_channels=[8, 16],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=1,
    sample_size=16,
    scaling_factor=0.13025,
)
CLIP_TINY = dict(
    vocab_size=1114,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=1112,
    eos_token_id=1113,
    pad_token_id=1113,
)
# Wider than CLIP_TINY: diffusers' single-file loader tells the two encoders apart by their width.
BIGG_TINY = dict(
    CLIP_TINY, hidden_size=40, intermediate_size=48, hidden_act="gelu", projection_dim=32, pad_token_id=0
)
# SDXL base's scheduler/scheduler_config.json.
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    use_karras_sigmas=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False,
)  # fmt: skip
SEEDS = {"text_encoder": 31, "text_encoder_2": 32, "unet": 33, "vae": 34, "unet_test": 35}
PROMPTS = ["a photo of a cat", "a red car on the street at night"]
# Pipeline runs: (name, scheduler, prompt, negative_prompt, height, width, steps, guidance).
RUNS = [
    ("euler", "euler", "a photo of a cat", None, 16, 16, 4, 5.0),
    ("dpmpp_2m_karras", "dpmpp_2m_karras", "a red car on the street at night", "blurry", 16, 24, 5, 6.0),
    ("euler_two", "euler", ["a photo of a cat", "a dog"], ["ugly", ""], 16, 24, 3, 4.0),
]


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if "position_ids" not in k}
    tensors = {k: torch.from_numpy(v) for k, v in random_state_dict(shapes, seed).items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"weights do not fit: {missing} {unexpected}")
    return module.eval()


def our_tokenizer(pad_token_id: int) -> CLIPTokenizer:
    small = CLIPTokenizer.from_pretrained_folder(SMALL_VOCAB)
    config = TokenizerConfig(max_length=77, bos_token_id=1112, eos_token_id=1113, pad_token_id=pad_token_id)
    return CLIPTokenizer(config, vocab=small.vocab, merges=small.merges)


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(p.shape) for k, p in module.named_parameters()}


def text_shapes(module) -> dict[str, list[int]]:
    # transformers 5 drops the `text_model.` level that checkpoints and diffusers folders store.
    return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in shapes(module).items()}  # fmt: skip


def check_unet_rename(diffusers_state: dict, config: dict) -> dict:
    """Our diffusers -> original rename, checked by diffusers' original -> diffusers converter."""
    ours = convert_diffusers_unet_state_dict(diffusers_state, unet_config_from_diffusers(config))
    original = {"model.diffusion_model." + k: v for k, v in ours.items()}
    back = convert_ldm_unet_checkpoint(original, config)
    if set(back) != set(diffusers_state):
        raise RuntimeError(f"rename round trip differs: {sorted(set(back) ^ set(diffusers_state))[:10]}")
    for k, v in back.items():
        if tuple(v.shape) != tuple(diffusers_state[k].shape):
            raise RuntimeError(f"{k}: shape {tuple(v.shape)} != {tuple(diffusers_state[k].shape)}")
    return ours


def write_manifests() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_FULL)
        # SDXL's VAE has SD's architecture: the LDM-derived SD 1.5 manifest is its reference, and its
        # parameter count must equal diffusers' AutoencoderKL built from SDXL's config.
        vae_manifest = json.loads((MANIFESTS / "sd-v1-5.json").read_text())["vae"]
        clip_l = text_shapes(CLIPTextModel(CLIP_L))
        bigg = text_shapes(CLIPTextModelWithProjection(BIGG))
        for name, config, encoders in (
            ("sdxl-base-1.0", UNET_BASE, {"text_encoder": clip_l, "text_encoder_2": bigg}),
            ("sdxl-refiner-1.0", UNET_REFINER, {"text_encoder_2": bigg}),
        ):
            unet = UNet2DConditionModel(**config)
            state = dict(unet.state_dict())
            renamed = check_unet_rename(state, dict(unet.config))
            manifest = {
                "unet": {k: list(v.shape) for k, v in renamed.items()},
                "vae": vae_manifest,
                **encoders,
            }
            counts = {part: sum(int(np.prod(s)) for s in keys.values()) for part, keys in manifest.items()}
            reference_counts = {
                "unet": sum(p.numel() for p in unet.parameters()),
                "vae": sum(p.numel() for p in vae.parameters()),
            }
            print(name, counts, "diffusers:", reference_counts)
            manifest["counts"] = counts
            (MANIFESTS / f"{name}.json").write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n")


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.numpy(), (0, 2, 3, 1))


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def scheduler(name: str):
    if name == "euler":
        return EulerDiscreteScheduler.from_config(SCHEDULER)
    return DPMSolverMultistepScheduler.from_config(
        SCHEDULER, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
    )


@torch.no_grad()
def write_single_file(pipe, ref: dict) -> None:
    """``sdxl.safetensors``: the folder's weights in the original SDXL layout, checked by diffusers' loader.

    Written by our reader and writer (diffusers has no single-file writer), without tf_diffusion's
    config metadata, float32; diffusers' ``from_single_file`` (its own original -> diffusers
    conversion, the folder as ``config``) must then reproduce every component's reference output.
    """
    from tf_diffusion.weights.loading import load_pipeline_weights
    from tf_diffusion.weights.safetensors_io import save_safetensors
    from tf_diffusion.weights.single_file import to_single_file

    with load_pipeline_weights(OUT / "sdxl-diffusers") as weights:
        tensors = to_single_file(weights.components, weights.config)
        tensors = {k: np.asarray(v) for k, v in tensors.items()}
    save_safetensors(tensors, OUT / "sdxl.safetensors", {"format": "pt"})
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(OUT / "sdxl.safetensors"), config=str(OUT / "sdxl-diffusers"), local_files_only=True,
        torch_dtype=torch.float32, add_watermarker=False,
    )  # fmt: skip
    out1 = loaded.text_encoder(torch.from_numpy(ref["ids"].astype(np.int64)), output_hidden_states=True)
    out2 = loaded.text_encoder_2(torch.from_numpy(ref["ids_2"].astype(np.int64)), output_hidden_states=True)
    sample = loaded.unet(
        nchw(ref["unet/x"]), torch.tensor([10.0, 500.0]), torch.from_numpy(ref["unet/context"]),
        added_cond_kwargs={"text_embeds": torch.from_numpy(ref["unet/text_embeds"]),
                           "time_ids": torch.from_numpy(ref["unet/time_ids"])},
    ).sample  # fmt: skip
    latents = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32))
    checks = {
        "text_encoder": (out1.hidden_states[-2], ref["text_encoder/penultimate"]),
        "text_encoder_2": (out2.hidden_states[-2], ref["text_encoder_2/penultimate"]),
        "text_embeds": (out2.text_embeds, ref["text_encoder_2/text_embeds"]),
        "unet": (nhwc(sample), ref["unet/out"]),
        "vae": (loaded.vae.decode(latents).sample, pipe.vae.decode(latents).sample),
    }
    for name, (got, want) in checks.items():
        err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
        print(f"  sdxl.safetensors via diffusers from_single_file, {name}: max abs err {err:.1e}")
        if err > 1e-6:
            raise RuntimeError(f"{name}: diffusers' single-file load differs from the reference by {err}")


@torch.no_grad()
def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    write_manifests()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tmp = OUT / "_tok"
    tok1, tok2 = our_tokenizer(1113), our_tokenizer(0)
    tok1.save(tmp / "t1")
    tok2.save(tmp / "t2")
    pipe = StableDiffusionXLPipeline(
        vae=seeded(AutoencoderKL(**VAE_TINY), SEEDS["vae"]),
        text_encoder=seeded(CLIPTextModel(CLIPTextConfig(**CLIP_TINY)), SEEDS["text_encoder"]),
        text_encoder_2=seeded(
            CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TINY)), SEEDS["text_encoder_2"]
        ),
        tokenizer=TorchCLIPTokenizer.from_pretrained(str(tmp / "t1")),
        tokenizer_2=TorchCLIPTokenizer.from_pretrained(str(tmp / "t2")),
        unet=seeded(UNet2DConditionModel(**UNET_TINY), SEEDS["unet"]),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(OUT / "sdxl-diffusers")
    for sub, tok in (("tokenizer", tok1), ("tokenizer_2", tok2)):
        # transformers 5 writes only tokenizer.json; the hub's SDXL folders hold vocab.json / merges.txt.
        shutil.rmtree(OUT / "sdxl-diffusers" / sub)
        tok.save(OUT / "sdxl-diffusers" / sub)
    shutil.rmtree(tmp)

    ref: dict[str, np.ndarray] = {}
    ids1, ids2 = tok1(PROMPTS), tok2(PROMPTS)
    ref["ids"], ref["ids_2"] = ids1, ids2
    out1 = pipe.text_encoder(torch.from_numpy(ids1.astype(np.int64)), output_hidden_states=True)
    out2 = pipe.text_encoder_2(torch.from_numpy(ids2.astype(np.int64)), output_hidden_states=True)
    ref["text_encoder/penultimate"] = out1.hidden_states[-2].numpy()
    ref["text_encoder/last"] = out1.last_hidden_state.numpy()
    ref["text_encoder_2/penultimate"] = out2.hidden_states[-2].numpy()
    ref["text_encoder_2/text_embeds"] = out2.text_embeds.numpy()

    # UNets with added conditioning: NHWC latents, two timesteps, random context / pooled / time ids.
    for name, unet in (
        ("unet", pipe.unet),
        ("unet_test", seeded(UNet2DConditionModel(**UNET_DIFFUSERS_TEST), SEEDS["unet_test"])),
    ):
        cfg = unet.config
        x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
        context = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        text_embeds = rng.standard_normal((2, pooled_dim)).astype(np.float32)
        time_ids = np.array([[16, 24, 0, 8, 16, 24], [1024, 768, 32, 0, 1024, 1024]], np.float32)
        sample = unet(
            nchw(x), torch.tensor([10.0, 500.0]), torch.from_numpy(context),
            added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)},
        ).sample  # fmt: skip
        ref.update({f"{name}/x": x, f"{name}/context": context, f"{name}/text_embeds": text_embeds,
                    f"{name}/time_ids": time_ids, f"{name}/out": nhwc(sample)})  # fmt: skip
        check_unet_rename(dict(unet.state_dict()), dict(cfg))
        if name == "unet_test":
            # Its weights are random_state_dict(shapes, seed): the test redraws them from the shapes.
            key_shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
            (OUT / "unet_diffusers_test.json").write_text(
                json.dumps({"config": dict(cfg), "shapes": key_shapes, "seed": SEEDS["unet_test"]}, indent=0,
                           default=list) + "\n"
            )  # fmt: skip

    # Whole pipeline runs from given latents.
    for name, sched, prompt, negative, height, width, steps, guidance in RUNS:
        n = len(prompt) if isinstance(prompt, list) else 1
        latents = rng.standard_normal((n, height // 2, width // 2, 4)).astype(np.float32)
        pipe.scheduler = scheduler(sched)
        images = pipe(
            prompt=prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance, latents=nchw(latents), output_type="np",
        ).images  # fmt: skip
        ref[f"run/{name}/latents"] = latents
        ref[f"run/{name}/images"] = np.asarray(images, np.float32)
        print(f"run {name}: images {images.shape} mean {images.mean():.4f}")

    write_single_file(pipe, ref)
    np.savez_compressed(OUT / "reference.npz", **ref)
    meta = dict(
        unet=UNET_TINY, unet_diffusers_test=UNET_DIFFUSERS_TEST, vae=VAE_TINY, clip=CLIP_TINY,
        bigg=BIGG_TINY, scheduler=SCHEDULER, seeds=SEEDS, prompts=PROMPTS,
        runs=[dict(zip(("name", "scheduler", "prompt", "negative_prompt", "height", "width", "steps", "guidance"), r, strict=True))
              for r in RUNS],
    )  # fmt: skip
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


# ------------------------------------------------------------------------------------ tasks

# The refiner: only the bigG-like encoder (context 40 wide), aesthetic-score time ids (5 values).
UNET_REFINER_TINY = dict(UNET_TINY, cross_attention_dim=40, projection_class_embeddings_input_dim=32 + 5 * 8)
TASK_SEEDS = {"refiner_unet": 36, "unet_inpaint": 37}
TASK_SIZE = (16, 16)
TASK_SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
    ),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}
# Task runs: name -> dict(pipeline, sampler, prompt, negative, steps, guidance, seed, strength, options...).
TASK_RUNS = [
    dict(
        name="refiner_img2img_euler",
        model="refiner",
        mode="img2img",
        sampler="euler",
        steps=5,
        strength=0.6,
        guidance=5.0,
        seed=11,
        prompt=["a photo of a cat", "a dog"],
        negative=None,
        options={},
    ),
    dict(
        name="refiner_img2img_euler_a_scores",
        model="refiner",
        mode="img2img",
        sampler="euler_a",
        steps=4,
        strength=0.75,
        guidance=4.0,
        seed=12,
        prompt="a red car",
        negative="blurry",
        options=dict(
            aesthetic_score=7.0,
            negative_aesthetic_score=2.0,
            original_size=(32, 48),
            crops_coords_top_left=(4, 2),
            negative_original_size=(8, 8),
            negative_crops_coords_top_left=(2, 0),
        ),
    ),
    dict(
        name="base_img2img_dpmpp_micro",
        model="base",
        mode="img2img",
        sampler="dpmpp_2m_karras",
        steps=5,
        strength=0.7,
        guidance=6.0,
        seed=13,
        prompt="a red car on the street",
        negative="ugly",
        options=dict(
            original_size=(32, 48),
            crops_coords_top_left=(4, 2),
            target_size=(24, 16),
            negative_original_size=(8, 16),
            negative_target_size=(16, 8),
        ),
    ),
    dict(
        name="base_txt2img_euler_micro",
        model="base",
        mode="txt2img",
        sampler="euler",
        steps=4,
        guidance=5.0,
        seed=14,
        prompt="a photo of a cat",
        negative="blurry",
        options=dict(
            original_size=(32, 48),
            crops_coords_top_left=(4, 2),
            target_size=(24, 16),
            negative_original_size=(8, 16),
            negative_crops_coords_top_left=(0, 6),
            negative_target_size=(16, 8),
        ),
    ),
    dict(
        name="inpaint4_euler",
        model="base",
        mode="inpaint4",
        sampler="euler",
        steps=5,
        strength=1.0,
        guidance=5.0,
        seed=15,
        prompt=["a photo of a cat", "a dog"],
        negative=None,
        options={},
    ),
    dict(
        name="inpaint4_dpmpp_strength",
        model="base",
        mode="inpaint4",
        sampler="dpmpp_2m_karras",
        steps=5,
        strength=0.75,
        guidance=5.0,
        seed=16,
        prompt="a red car",
        negative="blurry",
        options={},
    ),
    dict(
        name="inpaint9_euler_a",
        model="base",
        mode="inpaint9",
        sampler="euler_a",
        steps=4,
        strength=1.0,
        guidance=5.0,
        seed=17,
        prompt="a photo of a cat",
        negative="",
        options={},
    ),
    dict(
        name="inpaint9_euler_strength",
        model="base",
        mode="inpaint9",
        sampler="euler",
        steps=5,
        strength=0.6,
        guidance=5.0,
        seed=18,
        prompt="a red car",
        negative="blurry",
        options={},
    ),
    # Few-step Turbo settings (sdxl-turbo's model card): trailing spacing, guidance off.
    dict(
        name="turbo_euler_a_1step",
        model="base",
        mode="txt2img",
        sampler="euler_a",
        spacing="trailing",
        steps=1,
        guidance=0.0,
        seed=19,
        prompt=["a photo of a cat", "a dog"],
        negative=None,
        options={},
    ),
    dict(
        name="turbo_euler_2step",
        model="base",
        mode="txt2img",
        sampler="euler",
        spacing="trailing",
        steps=2,
        guidance=0.0,
        seed=20,
        prompt="a red car",
        negative=None,
        options={},
    ),
]
# Ensemble of experts: base txt2img to denoising_end (latents), refiner from denoising_start.
HANDOFFS = [
    dict(
        name="handoff_euler",
        sampler="euler",
        steps=6,
        switch=0.8,
        guidance=5.0,
        seeds=(21, 31),
        prompt="a photo of a cat",
        negative=None,
    ),
    dict(
        name="handoff_dpmpp_2m_karras",
        sampler="dpmpp_2m_karras",
        steps=7,
        switch=0.7,
        guidance=6.0,
        seeds=(22, 32),
        prompt=["a red car", "a dog"],
        negative=["blurry", ""],
    ),
    dict(
        name="handoff_euler_a",
        sampler="euler_a",
        steps=5,
        switch=0.6,
        guidance=4.0,
        seeds=(23, 33),
        prompt="a photo of a cat",
        negative="ugly",
    ),
]


def task_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*TASK_SIZE, 3), dtype=np.uint8)


def task_mask() -> np.ndarray:
    mask = np.zeros(TASK_SIZE, dtype=np.uint8)
    mask[3:11, 5:14] = 255
    return mask


def task_scheduler(name: str, spacing: str | None = None):
    from diffusers import EulerAncestralDiscreteScheduler

    cls, extra = TASK_SAMPLERS[name]
    cls = EulerAncestralDiscreteScheduler if cls == "EulerAncestralDiscreteScheduler" else cls
    return cls.from_config(
        {**SCHEDULER, **extra, **({} if spacing is None else {"timestep_spacing": spacing})}
    )


def cutoff_evals(sched, steps: int, start: float | None, end: float | None, strength: float | None) -> int:
    """How many evaluations diffusers runs (get_timesteps and the denoising_end cut-off)."""
    probe = type(sched).from_config(sched.config)
    probe.set_timesteps(steps)
    ts = probe.timesteps.numpy()
    n_train = probe.config.num_train_timesteps
    if start is not None:
        cut = int(round(n_train - start * n_train))
        k = int((ts < cut).sum())
        if probe.order == 2 and k % 2 == 0:
            k += 1
        ts = ts[len(ts) - k :]
    elif strength is not None:
        init = min(int(steps * strength), steps)
        ts = ts[max(steps - init, 0) * probe.order :]
    if end is not None:
        cut = int(round(n_train - end * n_train))
        ts = ts[ts >= cut]
    return len(ts)


@torch.no_grad()
def tasks() -> None:
    """``tasks.json`` / ``tasks.npz``: img2img, inpainting and base-to-refiner runs of diffusers' SDXL pipelines.

    Every random draw is tf_diffusion's for the same seeds (tools/make_fixtures_pipeline.py's
    ``NoiseQueues``); ``sdxl-refiner-diffusers/`` is a tiny refiner saved by diffusers (bigG-like encoder
    only, aesthetic-score time ids); the 9-channel inpainting UNet's weights are
    ``random_state_dict(shapes, seed)`` of ``unet_inpaint.json``.
    """
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    from make_fixtures_pipeline import NoiseQueues

    from tf_diffusion import noise as noise_lib

    base = StableDiffusionXLPipeline.from_pretrained(str(OUT / "sdxl-diffusers"), torch_dtype=torch.float32)
    refiner_dir = OUT / "sdxl-refiner-diffusers"
    if refiner_dir.exists():
        shutil.rmtree(refiner_dir)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=seeded(UNet2DConditionModel(**UNET_REFINER_TINY), TASK_SEEDS["refiner_unet"]),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    refiner.save_pretrained(refiner_dir)
    shutil.rmtree(refiner_dir / "tokenizer_2")
    our_tokenizer(0).save(refiner_dir / "tokenizer_2")
    unet9 = UNet2DConditionModel(**dict(UNET_TINY, in_channels=9))
    unet9 = seeded(unet9, TASK_SEEDS["unet_inpaint"])
    (OUT / "unet_inpaint.json").write_text(
        json.dumps({"config": dict(unet9.config), "shapes": {k: list(v.shape) for k, v in unet9.state_dict().items()},
                    "seed": TASK_SEEDS["unet_inpaint"]}, indent=0, default=list) + "\n"
    )  # fmt: skip
    parts = {
        k: getattr(base, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    }
    latent = (TASK_SIZE[0] // 2, TASK_SIZE[1] // 2, 4)
    ref: dict[str, np.ndarray] = {}

    def draws(seeds, evals, sched_name):
        return {
            "latents": noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent),
            "image": noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent),
            "masked": noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, latent),
            "steps": (
                list(np.swapaxes(noise_lib.batch_normal(seeds, noise_lib.STEPS, (evals, *latent)), 0, 1))
                if sched_name == "euler_a"
                else []
            ),
        }

    for run in TASK_RUNS:
        sched = task_scheduler(run["sampler"], run.get("spacing"))
        prompts = run["prompt"] if isinstance(run["prompt"], list) else [run["prompt"]]
        n = len(prompts)
        seeds = noise_lib.image_seeds(run["seed"], n)
        mode = run["mode"]
        strength = run.get("strength")
        evals = cutoff_evals(sched, run["steps"], None, None, None if mode == "txt2img" else strength)
        d = draws(seeds, evals, run["sampler"])
        call = dict(prompt=run["prompt"], negative_prompt=run["negative"], num_inference_steps=run["steps"],
                    guidance_scale=run["guidance"], output_type="np", **run["options"])  # fmt: skip
        with NoiseQueues() as queues:
            q = queues.queues
            if run["model"] == "refiner":
                pipe = refiner
                pipe.scheduler = sched
                call.update(image=[Image.fromarray(task_image(run["seed"] + 1))] * n, strength=strength)
                q["vae"].append(d["image"])
                q["pipeline"].append(d["latents"])
            elif mode == "txt2img":
                pipe = StableDiffusionXLPipeline(
                    unet=base.unet,
                    scheduler=sched,
                    **parts,
                    force_zeros_for_empty_prompt=True,
                    add_watermarker=False,
                )
                call.update(height=TASK_SIZE[0], width=TASK_SIZE[1])
                q["pipeline"].append(d["latents"])
            elif mode == "img2img":
                pipe = StableDiffusionXLImg2ImgPipeline(
                    unet=base.unet,
                    scheduler=sched,
                    **parts,
                    force_zeros_for_empty_prompt=True,
                    add_watermarker=False,
                )
                call.update(image=[Image.fromarray(task_image(run["seed"] + 1))] * n, strength=strength)
                q["vae"].append(d["image"])
                q["pipeline"].append(d["latents"])
            else:
                pipe = StableDiffusionXLInpaintPipeline(
                    unet=unet9 if mode == "inpaint9" else base.unet, scheduler=sched, **parts,
                    force_zeros_for_empty_prompt=True, add_watermarker=False)  # fmt: skip
                call.update(image=[Image.fromarray(task_image(run["seed"] + 1))] * n,
                            mask_image=[Image.fromarray(task_mask())] * n, strength=strength,
                            height=TASK_SIZE[0], width=TASK_SIZE[1])  # fmt: skip
                if mode == "inpaint4" or strength < 1.0:
                    q["vae"].append(d["image"])
                q["pipeline"].append(d["latents"])
                q["vae"].append(d["masked"])
            q["scheduler"].extend(d["steps"])
            pipe.set_progress_bar_config(disable=True)
            images = pipe(**call).images
        ref[f"{run['name']}/images"] = np.asarray(images, np.float32)
        print(f"task {run['name']}: {images.shape} mean {images.mean():.4f}")

    for run in HANDOFFS:
        prompts = run["prompt"] if isinstance(run["prompt"], list) else [run["prompt"]]
        n = len(prompts)
        call = dict(prompt=run["prompt"], negative_prompt=run["negative"], num_inference_steps=run["steps"],
                    guidance_scale=run["guidance"])  # fmt: skip
        sched = task_scheduler(run["sampler"])
        seeds = noise_lib.image_seeds(run["seeds"][0], n)
        d = draws(seeds, cutoff_evals(sched, run["steps"], None, run["switch"], None), run["sampler"])
        pipe = StableDiffusionXLPipeline(
            unet=base.unet, scheduler=sched, **parts, force_zeros_for_empty_prompt=True, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        with NoiseQueues() as queues:
            queues.queues["pipeline"].append(d["latents"])
            queues.queues["scheduler"].extend(d["steps"])
            latents = pipe(**call, height=TASK_SIZE[0], width=TASK_SIZE[1], denoising_end=run["switch"],
                           output_type="latent").images  # fmt: skip
        sched = task_scheduler(run["sampler"])
        seeds = noise_lib.image_seeds(run["seeds"][1], n)
        d = draws(seeds, cutoff_evals(sched, run["steps"], run["switch"], None, None), run["sampler"])
        refiner.scheduler = sched
        with NoiseQueues() as queues:
            queues.queues["scheduler"].extend(d["steps"])
            images = refiner(**call, image=latents, denoising_start=run["switch"], output_type="np").images
        ref[f"{run['name']}/latents"] = nhwc(latents)
        ref[f"{run['name']}/images"] = np.asarray(images, np.float32)
        print(f"handoff {run['name']}: {images.shape} mean {images.mean():.4f}")

    np.savez_compressed(OUT / "tasks.npz", **ref)
    meta = dict(size=TASK_SIZE, scheduler=SCHEDULER, runs=TASK_RUNS, handoffs=HANDOFFS)
    (OUT / "tasks.json").write_text(json.dumps(meta, indent=1) + "\n")


# Inpainting through the hand-off: the base's inpaint pipeline stops at `switch` (latents out), the refiner's
# inpaint pipeline continues them under the same mask (diffusers' "ensemble of experts" for inpainting).
INPAINT_HANDOFFS = [
    dict(name="inpaint_handoff_euler", sampler="euler", steps=6, switch=0.7, guidance=5.0, seeds=(24, 34),
         prompt="a photo of a cat", negative=None),
    dict(name="inpaint_handoff_euler_a", sampler="euler_a", steps=5, switch=0.6, guidance=4.0, seeds=(25, 35),
         prompt=["a red car", "a dog"], negative=["blurry", ""]),
]  # fmt: skip


def inpaint_handoffs() -> None:
    """``handoff_inpaint.json`` / ``.npz``: StableDiffusionXLInpaintPipeline (base, 4-channel UNet) with
    ``denoising_end`` and ``output_type="latent"``, then the same pipeline class on the refiner with
    ``image=latents``, the mask and ``denoising_start``; noise from tf_diffusion.noise as in ``tasks``."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    from make_fixtures_pipeline import NoiseQueues

    from tf_diffusion import noise as noise_lib

    base = StableDiffusionXLPipeline.from_pretrained(str(OUT / "sdxl-diffusers"), torch_dtype=torch.float32)
    refiner = StableDiffusionXLInpaintPipeline.from_pretrained(
        str(OUT / "sdxl-refiner-diffusers"), torch_dtype=torch.float32
    )
    parts = {
        k: getattr(base, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    }
    latent = (TASK_SIZE[0] // 2, TASK_SIZE[1] // 2, 4)
    ref: dict[str, np.ndarray] = {}
    for run in INPAINT_HANDOFFS:
        prompts = run["prompt"] if isinstance(run["prompt"], list) else [run["prompt"]]
        n = len(prompts)
        image = [Image.fromarray(task_image(run["seeds"][0] + 1))] * n
        mask = [Image.fromarray(task_mask())] * n
        call = dict(prompt=run["prompt"], negative_prompt=run["negative"], num_inference_steps=run["steps"],
                    guidance_scale=run["guidance"], mask_image=mask, height=TASK_SIZE[0], width=TASK_SIZE[1])  # fmt: skip
        for stage, pipe, seed in (("base", None, run["seeds"][0]), ("refiner", refiner, run["seeds"][1])):
            sched = task_scheduler(run["sampler"])
            seeds = noise_lib.image_seeds(seed, n)
            start, end = (None, run["switch"]) if stage == "base" else (run["switch"], None)
            evals = cutoff_evals(sched, run["steps"], start, end, 0.9999 if stage == "base" else None)
            if stage == "base":
                pipe = StableDiffusionXLInpaintPipeline(unet=base.unet, scheduler=sched, **parts,
                                                        force_zeros_for_empty_prompt=True, add_watermarker=False)  # fmt: skip
            pipe.scheduler = sched
            pipe.set_progress_bar_config(disable=True)
            with NoiseQueues() as queues:
                q = queues.queues
                if stage == "base":
                    q["vae"].append(noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent))
                    q["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
                    q["vae"].append(noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, latent))
                else:  # the latents continue as they are; this draw is the blend's noise only
                    q["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
                if run["sampler"] == "euler_a":
                    steps = noise_lib.batch_normal(seeds, noise_lib.STEPS, (evals, *latent))
                    q["scheduler"].extend(list(np.swapaxes(steps, 0, 1)))
                if stage == "base":
                    out = pipe(**call, image=image, denoising_end=end, output_type="latent").images
                    ref[f"{run['name']}/latents"] = nhwc(out)
                else:
                    images = pipe(**call, image=out, denoising_start=start, output_type="np").images
        ref[f"{run['name']}/images"] = np.asarray(images, np.float32)
        print(f"inpaint handoff {run['name']}: {images.shape} mean {images.mean():.4f}")
    np.savez_compressed(OUT / "handoff_inpaint.npz", **ref)
    (OUT / "handoff_inpaint.json").write_text(json.dumps({"runs": INPAINT_HANDOFFS}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--tasks"]:
        tasks()
    elif sys.argv[1:] == ["--inpaint-handoff"]:
        inpaint_handoffs()
    else:
        main()
        tasks()
