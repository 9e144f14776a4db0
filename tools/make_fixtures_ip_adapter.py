"""IP-Adapter parity fixtures (tests/fixtures/ip_adapter/): the image encoder and the projections.

1. transformers' ``CLIPVisionModelWithProjection`` on a tiny config (weights from
   ``tf_diffusion.testing.random_state_dict``, redrawn by the test) run on pictures prepared by
   transformers' ``CLIPImageProcessor`` (two pictures of other sizes and aspect ratios, so resize and
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

Usage (dev only): python tools/make_fixtures_ip_adapter.py [--manifests]
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

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


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if "--manifests" in sys.argv[1:]:
        manifests()
        return
    arrays, meta = {}, {}
    config = CLIPVisionConfig(**VISION)
    model = CLIPVisionModelWithProjection(config).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if "position_ids" not in k}
    tensors = random_state_dict({k: tuple(v) for k, v in shapes.items()}, SEEDS["vision"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
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
