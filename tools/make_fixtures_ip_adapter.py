"""IP-Adapter parity fixtures (tests/fixtures/ip_adapter/): the image encoder and the projections.

1. transformers' ``CLIPVisionModelWithProjection`` on a tiny config (weights from
   ``tf_diffusion.testing.random_state_dict``, redrawn by the test) run on pictures prepared by
   transformers' ``CLIPImageProcessorPil`` (two pictures of other sizes and aspect ratios, so resize and
   centre crop are exercised): the processed pixels (NHWC), ``image_embeds``, ``hidden_states[-2]``
   and ``last_hidden_state``.
2. diffusers' ``ImageProjection`` and ``IPAdapterPlusImageProjection`` loaded from state dicts in the
   published layout through diffusers' own converter (``_convert_ip_adapter_image_proj_to_diffusers``),
   so the original key names are the reference's; their outputs on random inputs.

3. ``--manifests``: full-size key manifests and parameter counts (full_size.json): the ViT-H/14 and
   ViT-bigG/14 image encoders from transformers on the meta device, and the published adapters'
   projections (``ip-adapter_sd15``, ``ip-adapter-plus_sd15``, ``ip-adapter_sdxl``,
   ``ip-adapter-plus_sdxl_vit-h``) built by diffusers' converter from state dicts of our key names
   (it loads them with strict=True, so every key and shape is checked).

4. ``--pipelines``: IP-Adapter files in the published layout for the tiny SD pipeline of
   tools/make_fixtures_pipeline.py and the tiny SDXL folder of tools/make_fixtures_sdxl.py (base:
   ``.bin`` through torch.save, plus: ``.safetensors`` with flat ``image_proj.*`` / ``ip_adapter.*``
   keys; ``ip_adapter.{1, 3, ...}`` in diffusers' attention-processor order), the tiny image encoder as
   a transformers ``CLIPVisionModelWithProjection`` folder, and diffusers' pipelines after
   ``load_ip_adapter`` on them from the same latents (pipelines.json, pipelines.npz), with a
   ControlNet at once (the ``pipe_a`` net of tools/make_fixtures_controlnet.py) too.

   A LoRA (tests/fixtures/lora/lora_second.safetensors, diffusers' load_lora_weights / set_adapters)
   with an adapter, too.
5. ``--counts``: the full-size adapters' parameter counts (full_size_counts.json): diffusers'
   ``IPAdapterAttnProcessor2_0`` on every cross-attention layer of the SD 1.5 and SDXL UNets (meta
   device) plus the projections' counts of full_size.json.

6. ``--tasks``: image-to-image and inpainting (the 4- and the 9-channel UNet) with the adapters of
   ``--pipelines``: diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline after
   ``load_ip_adapter``, with tf_diffusion's noise (tasks.json, tasks.npz).

Usage (dev only): python tools/make_fixtures_ip_adapter.py [--manifests | --pipelines | --counts | --tasks]
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tf_diffusion.ip_adapter import ImageProjConfig, ImageProjModel, Resampler, ResamplerConfig  # noqa: E402
from tf_diffusion.testing import random_state_dict  # noqa: E402
from tf_diffusion.weights import manifest  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ip_adapter"
VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=30,
    patch_size=6, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5,
)  # fmt: skip
SEEDS = {"vision": 41, "image_proj": 42, "resampler": 43}
IMAGE_PROJ = dict(image_embed_dim=16, cross_attention_dim=24, num_tokens=4)
RESAMPLER = dict(
    embed_dim=32, hidden_dim=32, output_dim=24, depth=4, dim_head=64, heads=2, num_queries=8, ff_mult=4
)


def image_processor() -> CLIPImageProcessorPil:
    """transformers' Pillow CLIPImageProcessor, named explicitly: without torchvision the plain name falls
    back to it, with torchvision it is another backend whose resize rounds sizes otherwise (a 71x33
    picture: up to 0.21 apart after normalising), so the fixtures must not depend on what is installed."""
    return CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})


def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((40, 52, 3), (71, 33, 3))]


def projection_case(name: str, ours, seed: int, inputs: np.ndarray, arrays: dict) -> dict:
    shapes = {k: list(v) for k, v in manifest(ours).items()}
    tensors = random_state_dict({k: tuple(v) for k, v in shapes.items()}, seed)
    module = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, {k: torch.from_numpy(v) for k, v in tensors.items()}, low_cpu_mem_usage=False
    )
    with torch.no_grad():
        out = module(torch.from_numpy(inputs)).numpy()
    arrays[f"{name}/input"], arrays[f"{name}/output"] = inputs, out
    print(name, type(module).__name__, out.shape)
    return {"shapes": shapes, "seed": seed, "diffusers_class": type(module).__name__}


# The published configurations (h94/IP-Adapter's image_encoder folders and the adapters' projections).
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
VIT_BIGG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
ADAPTERS = {
    "ip-adapter_sd15": ("image_proj", dict(image_embed_dim=1024, cross_attention_dim=768, num_tokens=4)),
    "ip-adapter-plus_sd15": ("resampler", dict(embed_dim=1280, hidden_dim=768, output_dim=768, depth=4,
                                               dim_head=64, heads=12, num_queries=16, ff_mult=4)),
    "ip-adapter_sdxl": ("image_proj", dict(image_embed_dim=1280, cross_attention_dim=2048, num_tokens=4)),
    "ip-adapter-plus_sdxl_vit-h": ("resampler", dict(embed_dim=1280, hidden_dim=1280, output_dim=2048, depth=4,
                                                     dim_head=64, heads=20, num_queries=16, ff_mult=4)),
}  # fmt: skip


def manifests() -> None:
    out = {"encoders": {}, "adapters": {}}
    for name, config in (("vit-h", VIT_H), ("vit-bigg", VIT_BIGG)):
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        shapes = {k: list(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}
        count = sum(int(np.prod(v)) for v in shapes.values())
        out["encoders"][name] = {"config": config, "shapes": shapes, "parameters": count}
        print(name, count)
    for name, (kind, config) in ADAPTERS.items():
        ours = (ImageProjModel(ImageProjConfig(**config)) if kind == "image_proj"
                else Resampler(ResamplerConfig(**config)))  # fmt: skip
        shapes = {k: list(v) for k, v in manifest(ours).items()}
        module = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
            None, {k: torch.zeros(v) for k, v in shapes.items()}, low_cpu_mem_usage=False
        )
        count = sum(p.numel() for p in module.parameters())
        out["adapters"][name] = {"kind": kind, "config": config, "shapes": shapes, "parameters": count,
                                 "diffusers_class": type(module).__name__}  # fmt: skip
        print(name, type(module).__name__, count)
    (OUT / "full_size.json").write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")


def write_encoder() -> CLIPVisionModelWithProjection:
    """The tiny image encoder (weights of seed SEEDS["vision"]) as a transformers folder."""
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}
    tensors = random_state_dict(shapes, SEEDS["vision"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    model.save_pretrained(OUT / "image_encoder")
    return model


def adapter_tensors(unet, kind: str, seed: int) -> dict:
    """An adapter in the published layout ({"image_proj": ..., "ip_adapter": ...}) for ``unet``."""
    cross = unet.config.cross_attention_dim
    if kind == "base":
        ours = ImageProjModel(ImageProjConfig(VISION["projection_dim"], cross, 4))
    else:
        ours = Resampler(
            ResamplerConfig(VISION["hidden_size"], 32, cross, 4, 64, 1, 8, 4)
        )  # diffusers assumes depth 4
    shapes = {f"image_proj.{k}": tuple(v) for k, v in manifest(ours).items()}
    key_id = 1  # diffusers' numbering: attn1 / attn2 alternate, the cross-attention layers are odd
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            inner = attn.to_k.out_features
            shapes[f"ip_adapter.{key_id}.to_k_ip.weight"] = (inner, cross)
            shapes[f"ip_adapter.{key_id}.to_v_ip.weight"] = (inner, cross)
            key_id += 2
    return random_state_dict(shapes, seed)


def save_adapter(tensors: dict, name: str) -> str:
    if name.endswith(".bin"):
        nested = {"image_proj": {}, "ip_adapter": {}}
        for k, v in tensors.items():
            part, rest = k.split(".", 1)
            nested[part][rest] = torch.from_numpy(v)
        torch.save(nested, OUT / name)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(OUT / name))
    return name


def ip_pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((36, 30, 3), (30, 44, 3))]


def pipelines() -> None:
    import tempfile

    import make_fixtures_controlnet as cnfix
    import make_fixtures_pipeline as sdfix
    import make_fixtures_sdxl as sdxlfix
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from tf_diffusion.noise import NoiseSource

    encoder = write_encoder()
    processor = image_processor()
    images = ip_pictures()
    arrays = {"pictures/0": images[0], "pictures/1": images[1]}
    meta = {"cases": [], "sdxl_cases": []}
    samplers = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    # name, adapter files, scale(s), images per adapter (indices into ip_pictures), sampler, guidance, seed
    cases = [
        dict(name="base-bin", files=["tiny_sd15.bin"], scale=0.8, images=[[0]], sampler="ddim",
             guidance=6.0, seed=21),
        dict(name="plus-two-images", files=["tiny_plus_sd15.safetensors"], scale=0.6, images=[[0, 1]],
             sampler="euler", guidance=5.0, seed=22),
        dict(name="two-adapters", files=["tiny_sd15.bin", "tiny_plus_sd15.safetensors"], scale=[0.5, 0.9],
             images=[[1], [0]], sampler="ddim", guidance=6.0, seed=23),
        dict(name="controlnet-base", files=["tiny_sd15.bin"], scale=0.7, images=[[1]], sampler="ddim",
             guidance=6.0, seed=24, controlnet="pipe_a", control_scale=0.9, hint_seed=103),
        dict(name="lora-plus", files=["tiny_plus_sd15.safetensors"], scale=0.9, images=[[0]], sampler="euler",
             guidance=6.0, seed=25, lora="lora_second.safetensors", lora_weight=0.6),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet, _ = sdfix.build_components(pathlib.Path(tmp))
        save_adapter(adapter_tensors(unet, "base", 51), "tiny_sd15.bin")
        save_adapter(adapter_tensors(unet, "plus", 52), "tiny_plus_sd15.safetensors")
        for case in cases:
            common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=samplers[case["sampler"]].from_config(sdfix.SCHEDULER), safety_checker=None,
                          feature_extractor=processor, image_encoder=encoder, requires_safety_checker=False)  # fmt: skip
            extra = {}
            if "controlnet" in case:
                net = cnfix.build(*cnfix.COMPONENTS[case["controlnet"]])[0]
                pipe = StableDiffusionControlNetPipeline(controlnet=net, **common)
                extra = dict(image=Image.fromarray(cnfix.control_image(case["hint_seed"])),
                             controlnet_conditioning_scale=case["control_scale"])  # fmt: skip
            else:
                pipe = StableDiffusionPipeline(**common)
            pipe.set_progress_bar_config(disable=True)
            if "lora" in case:
                pipe.load_lora_weights(str(OUT.parent / "lora" / case["lora"]), adapter_name="second")
                pipe.set_adapters(["second"], [case["lora_weight"]])
            pipe.load_ip_adapter(
                str(OUT),
                subfolder="",
                weight_name=case["files"],
                image_encoder_folder=None,
                low_cpu_mem_usage=False,
            )
            pipe.set_ip_adapter_scale(case["scale"])
            latents = NoiseSource(case["seed"]).normal(
                (len(sdfix.PROMPTS), sdfix.SIZE // 2, sdfix.SIZE // 2, 4)
            )
            ip_images = [[Image.fromarray(images[i]) for i in group] for group in case["images"]]
            with torch.no_grad():
                out = pipe(
                    prompt=sdfix.PROMPTS, negative_prompt=sdfix.NEGATIVE, ip_adapter_image=ip_images,
                    num_inference_steps=sdfix.STEPS, guidance_scale=case["guidance"], height=sdfix.SIZE,
                    width=sdfix.SIZE, latents=cnfix.nchw(latents), output_type="np", **extra,
                ).images  # fmt: skip
            pipe.unload_ip_adapter()
            if "lora" in case:
                pipe.unload_lora_weights()
            arrays[case["name"]] = np.asarray(out, np.float32)
            meta["cases"].append(case)
            print(case["name"], out.shape, float(out.mean()))

    # SDXL: the tiny folder (cross-attention width 72), a base and a plus adapter.
    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxlfix.OUT / "sdxl-diffusers", image_encoder=encoder, feature_extractor=processor
    )
    pipe.set_progress_bar_config(disable=True)
    save_adapter(adapter_tensors(pipe.unet, "base", 53), "tiny_sdxl.safetensors")
    save_adapter(adapter_tensors(pipe.unet, "plus", 54), "tiny_plus_sdxl.bin")
    height, width, steps = 16, 24, 4
    rng = np.random.default_rng(8)
    for case in [
        dict(name="sdxl-base", files=["tiny_sdxl.safetensors"], scale=0.8, images=[[0]], guidance=5.0),
        dict(name="sdxl-plus", files=["tiny_plus_sdxl.bin"], scale=0.7, images=[[1]], guidance=5.0),
    ]:
        pipe.load_ip_adapter(
            str(OUT),
            subfolder="",
            weight_name=case["files"],
            image_encoder_folder=None,
            low_cpu_mem_usage=False,
        )
        pipe.set_ip_adapter_scale(case["scale"])
        pipe.scheduler = sdxlfix.scheduler("euler")
        latents = rng.standard_normal((len(sdxlfix.PROMPTS), height // 2, width // 2, 4)).astype(np.float32)
        ip_images = [[Image.fromarray(images[i]) for i in group] for group in case["images"]]
        with torch.no_grad():
            out = pipe(
                prompt=sdxlfix.PROMPTS, negative_prompt=["blurry", ""], ip_adapter_image=ip_images,
                height=height, width=width, num_inference_steps=steps, guidance_scale=case["guidance"],
                latents=cnfix.nchw(latents), output_type="np",
            ).images  # fmt: skip
        pipe.unload_ip_adapter()  # also drops the image encoder: given back for the next case
        pipe.image_encoder, pipe.feature_extractor = encoder, processor
        arrays[f"{case['name']}/latents"] = latents
        arrays[case["name"]] = np.asarray(out, np.float32)
        meta["sdxl_cases"].append(dict(case, sampler="euler", height=height, width=width, steps=steps,
                                       prompts=sdxlfix.PROMPTS, negative_prompts=["blurry", ""]))  # fmt: skip
        print(case["name"], out.shape, float(out.mean()))
    np.savez_compressed(OUT / "pipelines.npz", **arrays)
    (OUT / "pipelines.json").write_text(json.dumps(meta, indent=0, sort_keys=True) + "\n")


# img2img and inpainting (4- and 9-channel UNets) with an adapter: name, mode, adapter file, scale, picture
# indices, sampler, guidance, seed, strength.
TASKS = [
    dict(name="img2img-base", mode="img2img", files=["tiny_sd15.bin"], scale=0.8, images=[0], sampler="ddim",
         guidance=6.0, seed=31, strength=0.75),
    dict(name="inpaint4-plus", mode="inpaint4", files=["tiny_plus_sd15.safetensors"], scale=0.7, images=[1],
         sampler="euler", guidance=5.0, seed=32, strength=1.0),
    dict(name="inpaint9-base", mode="inpaint9", files=["tiny_sd15.bin"], scale=0.9, images=[1], sampler="ddim",
         guidance=6.0, seed=33, strength=0.8),
]  # fmt: skip


def tasks() -> None:
    """diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline with the adapters of
    --pipelines loaded (tasks.json, tasks.npz), through make_fixtures_pipeline.run_case, so the image
    noise is tf_diffusion's."""
    import tempfile

    import make_fixtures_pipeline as sdfix

    encoder = CLIPVisionModelWithProjection.from_pretrained(OUT / "image_encoder").eval()
    processor = image_processor()
    pictures = ip_pictures()
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        components = sdfix.build_components(pathlib.Path(tmp))
        for case in TASKS:

            def setup(pipe, case=case):
                pipe.image_encoder, pipe.feature_extractor = encoder, processor
                pipe.load_ip_adapter(str(OUT), subfolder="", weight_name=case["files"],
                                     image_encoder_folder=None, low_cpu_mem_usage=False)  # fmt: skip
                pipe.set_ip_adapter_scale(case["scale"])

            images = sdfix.run_case(
                components, case["mode"], case["sampler"], "epsilon", case["seed"], case["guidance"],
                case["strength"], setup=setup,
                options=dict(ip_adapter_image=[[Image.fromarray(pictures[i]) for i in case["images"]]]),
            )  # fmt: skip
            arrays[case["name"]] = images
            print(case["name"], images.shape, float(images.mean()))
    np.savez_compressed(OUT / "tasks.npz", **arrays)
    (OUT / "tasks.json").write_text(json.dumps({"cases": TASKS}, indent=0, sort_keys=True) + "\n")


# SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_UNET = dict(
    block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    in_channels=4, out_channels=4, sample_size=128,
)  # fmt: skip


def counts() -> None:
    """Full-size adapters' parameter counts as diffusers builds them: its IPAdapterAttnProcessor2_0
    on every cross-attention layer of the full-size UNet (meta device) plus the image projection."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    full = json.loads((OUT / "full_size.json").read_text())["adapters"]
    unets = {"sd15": {"cross_attention_dim": 768}, "sdxl": SDXL_UNET}  # SD 1.5: defaults, 768-wide text
    out = {"sdxl_unet": SDXL_UNET, "adapters": {}}
    for name, family in (("ip-adapter_sd15", "sd15"), ("ip-adapter-plus_sd15", "sd15"),
                         ("ip-adapter_sdxl", "sdxl"), ("ip-adapter-plus_sdxl_vit-h", "sdxl")):  # fmt: skip
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unets[family])
        tokens = 16 if "plus" in name else 4
        layers = ip_count = 0
        for proc_name in unet.attn_processors:
            if not proc_name.endswith("attn2.processor"):
                continue
            attn = unet.get_submodule(proc_name[: -len(".processor")])
            with torch.device("meta"):
                proc = IPAdapterAttnProcessor2_0(
                    attn.to_k.out_features, attn.to_k.in_features, num_tokens=(tokens,), scale=1.0
                )
            ip_count += sum(p.numel() for p in proc.parameters())
            layers += 1
        total = ip_count + full[name]["parameters"]
        out["adapters"][name] = {"family": family, "cross_attention_layers": layers, "ip_adapter": ip_count,
                                 "image_proj": full[name]["parameters"], "parameters": total}  # fmt: skip
        print(name, layers, ip_count, total)
    (OUT / "full_size_counts.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if "--manifests" in sys.argv[1:]:
        manifests()
        return
    if "--counts" in sys.argv[1:]:
        counts()
        return
    if "--tasks" in sys.argv[1:]:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        tasks()
        return
    if "--pipelines" in sys.argv[1:]:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        pipelines()
        return
    arrays, meta = {}, {}
    config = CLIPVisionConfig(**VISION)
    model = CLIPVisionModelWithProjection(config).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}
    tensors = random_state_dict({k: tuple(v) for k, v in shapes.items()}, SEEDS["vision"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    processor = image_processor()
    images = pictures()
    pixels = processor(images=[Image.fromarray(p) for p in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    arrays["pictures/0"], arrays["pictures/1"] = images
    arrays["vision/pixels"] = np.transpose(pixels.numpy(), (0, 2, 3, 1))
    arrays["vision/image_embeds"] = out.image_embeds.numpy()
    arrays["vision/penultimate"] = out.hidden_states[-2].numpy()
    arrays["vision/last_hidden_state"] = out.last_hidden_state.numpy()
    meta["vision"] = {"config": VISION, "shapes": shapes, "seed": SEEDS["vision"]}

    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((2, IMAGE_PROJ["image_embed_dim"])).astype(np.float32)
    meta["image_proj"] = projection_case(
        "image_proj", ImageProjModel(ImageProjConfig(**IMAGE_PROJ)), SEEDS["image_proj"], embeds, arrays
    )
    meta["image_proj"]["config"] = IMAGE_PROJ
    features = rng.standard_normal((2, 26, RESAMPLER["embed_dim"])).astype(np.float32)
    meta["resampler"] = projection_case(
        "resampler", Resampler(ResamplerConfig(**RESAMPLER)), SEEDS["resampler"], features, arrays
    )
    meta["resampler"]["config"] = RESAMPLER
    np.savez_compressed(OUT / "reference.npz", **arrays)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
