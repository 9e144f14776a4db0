"""ControlNet parity fixtures from diffusers (tests/fixtures/controlnet/).

1. Components: diffusers ``ControlNetModel`` on tiny random configs (diffusers' own pipeline-test
   config, an SDXL-style one with added conditioning, and two that fit the tiny SD pipeline of
   tools/make_fixtures_pipeline.py), weights from ``tf_diffusion.testing.random_state_dict`` (the
   test redraws them), inputs drawn with NumPy; the down and mid residuals are stored NHWC.
2. Original single files of the tiny net: diffusers' own single-file converter
   (``convert_controlnet_checkpoint``) is run on our original key names; it must give back every
   diffusers key exactly once, so the original names are the reference's. The files are written
   as the originals come: ``.safetensors`` with ``control_model.``, ``.pth`` without it, and a
   ``control_sd15``-style ``.pth`` that also carries SD model keys.
3. Pipelines: ``StableDiffusionControlNetPipeline`` on the tiny SD components with one net, two
   nets with two scales and a guidance window, guess mode, and no guidance, from given latents;
   the float images diffusers returns.
4. The full-size SD1.5 ControlNet's diffusers key manifest (meta device), and (also alone with
   ``--manifests``) the full-size SDXL one: diffusers/controlnet-canny-sdxl-1.0's config, checked
   against ``ControlNetModel.from_unet`` of the SDXL base UNet (sdxl_manifest.json).
5. ``--tasks``: ``StableDiffusionControlNetImg2ImgPipeline`` and ``StableDiffusionControlNetInpaintPipeline``
   (4- and 9-channel UNets) on the same tiny components, with tf_diffusion's seeded noise handed to
   diffusers as tools/make_fixtures_pipeline.py does (tasks.json, tasks.npz).
6. ``--sdxl``: ``StableDiffusionXLControlNetPipeline`` on the tiny SDXL folder of
   tools/make_fixtures_sdxl.py with a ControlNet shaped for its UNet, from given latents
   (sdxl_pipeline.json, sdxl_pipeline.npz).

7. ``--lora``: ``StableDiffusionControlNetPipeline`` with the UNet LoRA of tests/fixtures/lora
   (``lora_second.safetensors``, loaded by diffusers' ``load_lora_weights`` at weight 0.6) and one net
   (lora.json, lora.npz).

Usage (dev only): python tools/make_fixtures_controlnet.py [--tasks | --sdxl | --lora | --manifests]
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
)
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import make_fixtures_pipeline as sdfix  # noqa: E402

from tf_diffusion.noise import NoiseSource  # noqa: E402
from tf_diffusion.testing import random_state_dict  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "controlnet"

# diffusers' tests/pipelines/controlnet/test_controlnet.py tiny ControlNet.
TINY = dict(
    block_out_channels=[4, 8],
    layers_per_block=2,
    in_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    cross_attention_dim=32,
    conditioning_embedding_out_channels=[16, 32],
    norm_num_groups=1,
)
# diffusers' tests/pipelines/controlnet/test_controlnet_sdxl.py tiny ControlNet.
SDXL = dict(
    block_out_channels=[32, 64],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    conditioning_embedding_out_channels=[16, 32],
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=[1, 2],
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
)
# Fits tools/make_fixtures_pipeline.py's tiny UNet (its VAE halves the size, so does the hint block).
PIPE = dict(
    block_out_channels=sdfix.UNET["block_out_channels"],
    layers_per_block=sdfix.UNET["layers_per_block"],
    in_channels=4,
    down_block_types=sdfix.UNET["down_block_types"],
    cross_attention_dim=sdfix.UNET["cross_attention_dim"],
    attention_head_dim=sdfix.UNET["attention_head_dim"],
    norm_num_groups=sdfix.UNET["norm_num_groups"],
    conditioning_embedding_out_channels=[16, 32],
)
# The original single-file layout always has the 4-level hint encoder (diffusers' default).
TINY_ORIGINAL = {k: v for k, v in TINY.items() if k != "conditioning_embedding_out_channels"}
COMPONENTS = {
    "tiny": (TINY, 11),
    "tiny_original": (TINY_ORIGINAL, 15),
    "sdxl": (SDXL, 12),
    "pipe_a": (PIPE, 13),
    "pipe_b": (PIPE, 14),
}
LATENT = 8  # latent size of the component cases (hint: LATENT * 2)
BATCH = 2


def build(config: dict, seed: int):
    model = ControlNetModel(**config).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    tensors = random_state_dict(shapes, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    return model, shapes, tensors


def nchw(array):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(array, (0, 3, 1, 2))))


def nhwc(tensor):
    return np.ascontiguousarray(np.transpose(tensor.detach().numpy(), (0, 2, 3, 1)))


def component_case(name, model, config, rng):
    factor = 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    arrays = {
        "latents": rng.standard_normal((BATCH, LATENT, LATENT, 4)).astype(np.float32),
        "timesteps": np.array([37.0, 801.0], np.float32),
        "context": rng.standard_normal((BATCH, 7, config["cross_attention_dim"])).astype(np.float32),
        "hint": rng.random((BATCH, LATENT * factor, LATENT * factor, 3)).astype(np.float32),
    }
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = 80 - 6 * config["addition_time_embed_dim"]
        arrays["text_embeds"] = rng.standard_normal((BATCH, pooled)).astype(np.float32)
        arrays["time_ids"] = np.array([[32, 32, 0, 0, 32, 32], [64, 48, 4, 2, 32, 32]], np.float32)
        added = {
            "text_embeds": torch.from_numpy(arrays["text_embeds"]),
            "time_ids": torch.from_numpy(arrays["time_ids"]),
        }
    with torch.no_grad():
        for guess in (False, True):
            down, mid = model(
                nchw(arrays["latents"]),
                torch.from_numpy(arrays["timesteps"]),
                torch.from_numpy(arrays["context"]),
                nchw(arrays["hint"]),
                conditioning_scale=0.7,
                added_cond_kwargs=added,
                guess_mode=guess,
                return_dict=False,
            )
            tag = "guess" if guess else "plain"
            for i, d in enumerate(down):
                arrays[f"{tag}.down.{i}"] = nhwc(d)
            arrays[f"{tag}.mid"] = nhwc(mid)
    np.savez_compressed(OUT / f"{name}.npz", **arrays)


def single_files(model, shapes, tensors) -> dict:
    """Original-format files of ``model``; returns original key -> diffusers key (the reference's)."""
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import manifest
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers

    ours = manifest(ControlNet(controlnet_config_from_diffusers(dict(model.config))))
    probes = {k: torch.full(tuple(v), float(i)) for i, (k, v) in enumerate(sorted(ours.items()))}
    converted = convert_controlnet_checkpoint(
        {f"control_model.{k}": v for k, v in probes.items()}, dict(model.config)
    )
    by_id = {id(v): k for k, v in probes.items()}
    mapping = {by_id[id(v)]: dk for dk, v in converted.items()}
    if sorted(mapping.values()) != sorted(shapes) or len(mapping) != len(ours):
        missing = sorted(set(shapes) - set(mapping.values()))
        unmapped = sorted(set(ours) - set(mapping))
        raise SystemExit(f"original names disagree with diffusers' converter: {missing[:5]} {unmapped[:5]}")
    for orig, dk in mapping.items():
        if list(ours[orig]) != shapes[dk]:
            raise SystemExit(f"{orig} -> {dk}: shape {ours[orig]} vs diffusers {shapes[dk]}")
    original = {k: torch.from_numpy(tensors[dk]) for k, dk in mapping.items()}
    save_file({f"control_model.{k}": v for k, v in original.items()}, OUT / "tiny_original.safetensors")
    # The .pth files in float16 (half the size; the test compares them with the float32 file).
    half = {k: v.half() for k, v in original.items()}
    torch.save(half, OUT / "tiny_original.pth")
    # control_sd15_*.pth: the whole SD model plus the control part, in a Lightning state_dict.
    whole = {f"control_model.{k}": v for k, v in half.items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    whole["first_stage_model.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    whole["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    torch.save({"state_dict": whole, "global_step": 1}, OUT / "tiny_control_sd15_whole.pth")
    return mapping


PIPE_CASES = [
    # name, nets, scales, start, end, guess, guidance, sampler
    dict(name="single-ddim", nets=["pipe_a"], scale=[0.8], start=[0.0], end=[1.0], guess=False, guidance=6.0, sampler="ddim", seed=5),
    dict(name="multi-window-euler", nets=["pipe_a", "pipe_b"], scale=[0.7, 1.3], start=[0.0, 0.25], end=[0.75, 1.0], guess=False, guidance=6.0, sampler="euler", seed=6),
    dict(name="guess-ddim", nets=["pipe_a"], scale=[1.0], start=[0.0], end=[1.0], guess=True, guidance=5.0, sampler="ddim", seed=7),
    dict(name="noguidance-euler", nets=["pipe_b"], scale=[1.2], start=[0.1], end=[0.6], guess=False, guidance=1.0, sampler="euler", seed=8),
]  # fmt: skip
SAMPLERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def control_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(sdfix.SIZE, sdfix.SIZE, 3), dtype=np.uint8)


def pipelines(nets: dict) -> None:
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet, _ = sdfix.build_components(pathlib.Path(tmp))
        for case in PIPE_CASES:
            scheduler = SAMPLERS[case["sampler"]].from_config(sdfix.SCHEDULER)
            single = len(case["nets"]) == 1
            controlnet = nets[case["nets"][0]] if single else [nets[n] for n in case["nets"]]
            pipe = StableDiffusionControlNetPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            images = [Image.fromarray(control_image(100 + i)) for i in range(len(case["nets"]))]
            latent = sdfix.SIZE // 2
            latents = NoiseSource(case["seed"]).normal((len(sdfix.PROMPTS), latent, latent, 4))
            pick = (lambda v: v[0]) if single else (lambda v: v)
            with torch.no_grad():
                out = pipe(
                    prompt=sdfix.PROMPTS,
                    negative_prompt=sdfix.NEGATIVE,
                    image=pick(images),
                    num_inference_steps=sdfix.STEPS,
                    guidance_scale=case["guidance"],
                    controlnet_conditioning_scale=pick(case["scale"]),
                    control_guidance_start=pick(case["start"]),
                    control_guidance_end=pick(case["end"]),
                    guess_mode=case["guess"],
                    height=sdfix.SIZE,
                    width=sdfix.SIZE,
                    latents=nchw(latents),
                    output_type="np",
                ).images
            arrays[case["name"]] = np.asarray(out, np.float32)
            print(case["name"], arrays[case["name"]].shape, float(arrays[case["name"]].mean()))
    np.savez_compressed(OUT / "pipeline.npz", **arrays)


def full_size_manifest() -> dict:
    # control_v11p_sd15_*'s config.json: ControlNetModel defaults with SD1's 768-wide context.
    with torch.device("meta"):
        model = ControlNetModel(cross_attention_dim=768)
    shapes = {k: list(p.shape) for k, p in model.named_parameters()}
    print("sd15 controlnet parameters", sum(int(np.prod(s)) for s in shapes.values()))
    return {
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "shapes": shapes,
    }


# diffusers/controlnet-canny-sdxl-1.0's config.json (the architecture fields): the down and mid half of
# stabilityai/stable-diffusion-xl-base-1.0's UNet, with the hint encoder of the SD1.5 nets.
SDXL_CONTROLNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    class_embed_type=None, conditioning_channels=3, conditioning_embedding_out_channels=[16, 32, 96, 256],
    controlnet_conditioning_channel_order="rgb", cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    global_pool_conditions=False, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05,
    norm_num_groups=32, num_attention_heads=None, num_class_embeds=None, only_cross_attention=False,
    projection_class_embeddings_input_dim=2816, resnet_time_scale_shift="default",
    transformer_layers_per_block=[1, 2, 10], upcast_attention=None, use_linear_projection=True,
)  # fmt: skip
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the architecture fields).
SDXL_UNET = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)  # fmt: skip


def sdxl_full_size_manifest() -> dict:
    """The SDXL canny ControlNet on the meta device; it must equal ``from_unet`` of the SDXL base UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = ControlNetModel(**SDXL_CONTROLNET)
        from_unet = ControlNetModel.from_unet(UNet2DConditionModel(**SDXL_UNET))
    shapes = {k: list(p.shape) for k, p in model.named_parameters()}
    if shapes != {k: list(p.shape) for k, p in from_unet.named_parameters()}:
        raise SystemExit("the canny-sdxl config and from_unet(SDXL base UNet) give different parameters")
    print("sdxl controlnet parameters", sum(int(np.prod(s)) for s in shapes.values()))
    return {
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "shapes": shapes,
    }


def write_manifests() -> None:
    for name, manifest in (("sd15", full_size_manifest()), ("sdxl", sdxl_full_size_manifest())):
        (OUT / f"{name}_manifest.json").write_text(
            json.dumps(manifest, indent=0, sort_keys=True, default=list) + "\n"
        )


TASK_CASES = [
    dict(name="img2img-ddim", mode="img2img", net="pipe_a", scale=0.8, strength=0.75, guidance=6.0, sampler="ddim", seed=21),
    dict(name="img2img-euler-window", mode="img2img", net="pipe_b", scale=1.1, strength=0.6, guidance=5.0, sampler="euler", seed=22, start=0.0, end=0.6),
    dict(name="inpaint4-euler", mode="inpaint4", net="pipe_a", scale=1.0, strength=1.0, guidance=6.0, sampler="euler", seed=23),
    dict(name="inpaint9-ddim", mode="inpaint9", net="pipe_b", scale=0.9, strength=1.0, guidance=6.0, sampler="ddim", seed=24),
]  # fmt: skip
TASK_HINT_SEED = 102


def tasks() -> None:
    nets = {name: build(*COMPONENTS[name])[0] for name in ("pipe_a", "pipe_b")}
    hint = Image.fromarray(control_image(TASK_HINT_SEED))
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        components = sdfix.build_components(pathlib.Path(tmp))
        for case in TASK_CASES:
            control = dict(
                controlnet=nets[case["net"]],
                control_image=[hint] * len(sdfix.PROMPTS),
                controlnet_conditioning_scale=case["scale"],
                control_guidance_start=case.get("start", 0.0),
                control_guidance_end=case.get("end", 1.0),
            )
            images = sdfix.run_case(
                components, case["mode"], case["sampler"], "epsilon", case["seed"], case["guidance"],
                case["strength"], control=control,
            )  # fmt: skip
            arrays[case["name"]] = images
            print(case["name"], images.shape, float(images.mean()))
    np.savez_compressed(OUT / "tasks.npz", **arrays)
    meta = {"cases": TASK_CASES, "hint_seed": TASK_HINT_SEED}
    (OUT / "tasks.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def sdxl_pipeline() -> None:
    import make_fixtures_sdxl as sdxlfix
    from diffusers import StableDiffusionXLControlNetPipeline

    unet = sdxlfix.UNET_TINY
    config = dict(
        {k: unet[k] for k in ("block_out_channels", "layers_per_block", "in_channels", "down_block_types",
                              "attention_head_dim", "transformer_layers_per_block", "use_linear_projection",
                              "addition_embed_type", "addition_time_embed_dim",
                              "projection_class_embeddings_input_dim", "cross_attention_dim", "norm_num_groups")},
        conditioning_embedding_out_channels=[8, 16],  # the tiny SDXL VAE halves the size, so does the hint
    )  # fmt: skip
    seed = 16
    net, shapes, _ = build(config, seed)
    folder = sdxlfix.OUT / "sdxl-diffusers"
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(folder, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(5)
    cases = [
        dict(name="euler", scheduler="euler", scale=0.9, guess=False, guidance=5.0, start=0.0, end=1.0),
        dict(name="dpmpp_2m_karras-window", scheduler="dpmpp_2m_karras", scale=1.2, guess=False, guidance=6.0,
             start=0.0, end=0.6),
    ]  # fmt: skip
    height, width, steps = 16, 24, 4
    hint = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    arrays = {"hint": hint}
    for case in cases:
        latents = rng.standard_normal((len(sdxlfix.PROMPTS), height // 2, width // 2, 4)).astype(np.float32)
        pipe.scheduler = sdxlfix.scheduler(case["scheduler"])
        with torch.no_grad():
            images = pipe(
                prompt=sdxlfix.PROMPTS, negative_prompt=["blurry", ""], image=Image.fromarray(hint),
                height=height, width=width, num_inference_steps=steps, guidance_scale=case["guidance"],
                controlnet_conditioning_scale=case["scale"], control_guidance_start=case["start"],
                control_guidance_end=case["end"], guess_mode=case["guess"], latents=nchw(latents),
                output_type="np",
            ).images  # fmt: skip
        arrays[f"{case['name']}/latents"] = latents
        arrays[f"{case['name']}/images"] = np.asarray(images, np.float32)
        print("sdxl", case["name"], images.shape, float(images.mean()))
    np.savez_compressed(OUT / "sdxl_pipeline.npz", **arrays)
    meta = dict(config=config, seed=seed, shapes=shapes, cases=cases, prompts=sdxlfix.PROMPTS,
                negative_prompts=["blurry", ""], height=height, width=width, steps=steps)  # fmt: skip
    (OUT / "sdxl_pipeline.json").write_text(json.dumps(meta, indent=0, sort_keys=True) + "\n")


def with_lora() -> None:
    net = build(*COMPONENTS["pipe_a"])[0]
    lora_file = OUT.parent / "lora" / "lora_second.safetensors"
    case = dict(
        name="lora-ddim", net="pipe_a", scale=0.9, guidance=6.0, sampler="ddim", seed=31, lora_weight=0.6
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet, _ = sdfix.build_components(pathlib.Path(tmp))
        pipe = StableDiffusionControlNetPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=net,
            scheduler=SAMPLERS[case["sampler"]].from_config(sdfix.SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(lora_file), adapter_name="second")
        pipe.set_adapters(["second"], [case["lora_weight"]])
        latents = NoiseSource(case["seed"]).normal((len(sdfix.PROMPTS), sdfix.SIZE // 2, sdfix.SIZE // 2, 4))
        with torch.no_grad():
            images = pipe(
                prompt=sdfix.PROMPTS, negative_prompt=sdfix.NEGATIVE, image=Image.fromarray(control_image(103)),
                num_inference_steps=sdfix.STEPS, guidance_scale=case["guidance"],
                controlnet_conditioning_scale=case["scale"], height=sdfix.SIZE, width=sdfix.SIZE,
                latents=nchw(latents), output_type="np",
            ).images  # fmt: skip
    np.savez_compressed(OUT / "lora.npz", images=np.asarray(images, np.float32))
    (OUT / "lora.json").write_text(json.dumps(dict(case, hint_seed=103), indent=1, sort_keys=True) + "\n")
    print(case["name"], images.shape, float(images.mean()))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if "--lora" in sys.argv[1:]:
        with_lora()
        return
    if "--tasks" in sys.argv[1:]:
        tasks()
        return
    if "--sdxl" in sys.argv[1:]:
        sdxl_pipeline()
        return
    if "--manifests" in sys.argv[1:]:
        write_manifests()
        return
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    meta, nets = {}, {}
    for name, (config, seed) in COMPONENTS.items():
        model, shapes, tensors = build(config, seed)
        nets[name] = model
        meta[name] = {
            "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
            "seed": seed,
            "shapes": shapes,
        }
        if name in ("tiny", "tiny_original", "sdxl"):
            component_case(name, model, config, rng)
        if name == "tiny_original":
            meta[name]["original_to_diffusers"] = single_files(model, shapes, tensors)
    meta["pipeline"] = {"cases": PIPE_CASES, "control_image_seeds": [100, 101]}
    pipelines(nets)
    (OUT / "cases.json").write_text(json.dumps(meta, indent=0, sort_keys=True, default=list) + "\n")
    write_manifests()


if __name__ == "__main__":
    main()
