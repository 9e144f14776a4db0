"""Write full-size key manifests (checkpoint key -> torch shape) from the reference implementations.

The UNet and VAE come from the original CompVis LDM code (as packaged on PyPI by
``stable-diffusion-sdkit``, "a wrapper around the original repo"), the text
encoders from transformers' CLIPTextModel, which is the layout SD 1.x
checkpoints store under ``cond_stage_model.transformer.`` and the layout
diffusers gives SD 2.x's OpenCLIP encoder. Models are built on torch's meta
device, so nothing is allocated.

Usage (dev only; needs the reference extra plus the original LDM code):
    pip install -e ".[reference]" omegaconf einops
    pip install --no-deps stable-diffusion-sdkit
    python tools/make_manifests.py
"""

from __future__ import annotations

import json
import pathlib

import torch
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from transformers import CLIPTextConfig, CLIPTextModel

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "manifests"

# The original inference yamls (v1-inference.yaml, v2-inference.yaml, v1/v2 inpainting).
UNET_SD1 = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=False,
    legacy=False,
)
UNET_SD2 = dict(
    UNET_SD1, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024
)
VAE = dict(
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)
CLIP_L = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
OPENCLIP_H_PENULTIMATE = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
)


def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(p.shape) for k, p in module.named_parameters()}


def clip_shapes(config: CLIPTextConfig) -> dict[str, list[int]]:
    # transformers 5 names CLIPTextModel parameters without the `text_model.` level that
    # SD checkpoints (and transformers 4) store; checkpoints are the reference here.
    found = shapes(CLIPTextModel(config))
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in found.items()}


def vae_manifest() -> dict[str, list[int]]:
    # ldm.models.autoencoder.AutoencoderKL = Encoder + Decoder + two 1x1 convs; built
    # here from its parts because the wrapper class needs pytorch_lightning.
    z = VAE["z_channels"]
    quant = torch.nn.Conv2d(2 * z, 2 * z, 1)
    post_quant = torch.nn.Conv2d(z, z, 1)
    return {
        **shapes(Encoder(**VAE), "encoder."),
        **shapes(Decoder(**VAE), "decoder."),
        **shapes(quant, "quant_conv."),
        **shapes(post_quant, "post_quant_conv."),
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        vae = vae_manifest()
        clip_l = clip_shapes(CLIP_L)
        clip_h = clip_shapes(OPENCLIP_H_PENULTIMATE)
        presets = {
            "sd-v1-5": (UNET_SD1, clip_l),
            "sd-v1-5-inpainting": (dict(UNET_SD1, in_channels=9), clip_l),
            "sd-v2-1-base": (UNET_SD2, clip_h),
            "sd-v2-1": (UNET_SD2, clip_h),
            "sd-v2-inpainting": (dict(UNET_SD2, in_channels=9), clip_h),
        }
        for name, (unet_kwargs, clip) in presets.items():
            manifest = {"unet": shapes(UNetModel(**unet_kwargs)), "vae": vae, "text_encoder": clip}
            path = OUT / f"{name}.json"
            path.write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n")
            counts = {
                part: sum(int(torch.Size(s).numel()) for s in keys.values())
                for part, keys in manifest.items()
            }
            print(name, counts)


if __name__ == "__main__":
    main()
