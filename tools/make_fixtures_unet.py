"""Write UNet parity fixtures and full-size key manifests from diffusers' UNet2DConditionModel.

For each tiny preset (SD 1.x-style, SD 2.x-style, 9-channel inpainting), with fixed seeds:
  tests/fixtures/unet/<name>_config.json   the diffusers config.json of the model
  tests/fixtures/unet/<name>_weights.npz   its weights: diffusers keys, torch layout, float32
  tests/fixtures/unet/<name>_io.npz        NHWC latents, context, timesteps and NHWC outputs
For SD 1.5, SD 2.1 and SD 1.5-inpainting at full size (on torch's meta device, no memory):
  tests/fixtures/unet/manifest_<preset>.json   diffusers config, parameter count, original key -> shape

Our diffusers -> original rename is checked here against diffusers' own converter
(``convert_ldm_unet_checkpoint``, original -> diffusers): the round trip must give back the
diffusers state dict exactly, for every tiny and full-size model. Full-size manifests are
also compared with the LDM-derived ones in tests/fixtures/manifests/ when present.

Usage (dev only; needs torch and diffusers):
    python tools/make_fixtures_unet.py
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tf_diffusion.weights.diffusers_unet import (  # noqa: E402
    convert_diffusers_unet_state_dict,
    unet_config_from_diffusers,
)

OUT = ROOT / "tests" / "fixtures" / "unet"
LDM_MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"

DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# Widths are tiny to keep the fixtures near 2 MB in float32; the layout is SD's.
TINY = {
    # Constant head count (attention_head_dim is the head count in diffusers' legacy naming),
    # 1x1-conv projections, two ResBlocks per level as in SD.
    "sd1": dict(
        block_out_channels=(8, 16, 16), layers_per_block=2, down_block_types=DOWN, up_block_types=UP,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ),
    # Per-level head counts giving a constant head width (8), Linear projections, and two
    # transformer blocks per transformer; context width differs from every block width.
    "sd2": dict(
        block_out_channels=(8, 16, 16), layers_per_block=1, down_block_types=DOWN, up_block_types=UP,
        cross_attention_dim=24, attention_head_dim=[1, 2, 2], use_linear_projection=True,
        transformer_layers_per_block=2, norm_num_groups=4,
    ),
    "inpaint": dict(
        in_channels=9, block_out_channels=(8, 16, 16), layers_per_block=1, down_block_types=DOWN,
        up_block_types=UP, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ),
}  # fmt: skip

# unet/config.json of the published models, as on the Hugging Face Hub.
SD15 = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = dict(
    SD15,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)
FULL = {
    "sd-v1-5": SD15,
    "sd-v2-1": SD21,
    "sd-v1-5-inpainting": dict(SD15, in_channels=9),
}
LDM_PREFIX = "model.diffusion_model."


def check_rename(state: dict, config: dict) -> dict:
    """Our diffusers -> original rename, verified by diffusers' original -> diffusers converter."""
    original = convert_diffusers_unet_state_dict(state, unet_config_from_diffusers(config))
    back = convert_ldm_unet_checkpoint({LDM_PREFIX + k: v for k, v in original.items()}, dict(config))
    if set(back) != set(state):
        raise SystemExit(
            f"rename round trip differs: missing {sorted(set(state) - set(back))[:5]}, "
            f"extra {sorted(set(back) - set(state))[:5]}"
        )
    wrong = [k for k in state if back[k] is not state[k]]
    if wrong:
        raise SystemExit(f"rename round trip sends tensors to other keys: {wrong[:5]}")
    return original


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial affine parameters, so a swapped or skipped norm weight shows in the output."""
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            shape = module.weight.shape
            module.weight.data = 1.0 + 0.2 * torch.randn(shape, generator=generator)
            module.bias.data = 0.2 * torch.randn(shape, generator=generator)


def make_tiny(name: str, kwargs: dict, seed: int) -> None:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(sample_size=16, **kwargs).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed))
    config = json.loads(model.to_json_string())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    check_rename(state, config)

    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, 16, 16, config["in_channels"])).astype(np.float32)  # NHWC
    context = rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(np.float32)
    timesteps_int = np.array([999, 17], dtype=np.int64)
    timestep_float = 421.37  # a Python float: diffusers broadcasts it to the batch

    def run(t):
        with torch.no_grad():
            out = model(torch.from_numpy(latents).permute(0, 3, 1, 2), t, torch.from_numpy(context)).sample
        return out.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC

    # Latent sizes that are not multiples of 2 ** (levels - 1): diffusers upsamples to the skip sizes.
    latents_odd = rng.standard_normal((2, 10, 14, config["in_channels"])).astype(np.float32)
    with torch.no_grad():
        out_odd = (
            model(
                torch.from_numpy(latents_odd).permute(0, 3, 1, 2),
                torch.from_numpy(timesteps_int),
                torch.from_numpy(context),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )

    io = dict(
        latents_odd=latents_odd,
        out_odd=out_odd,
        latents=latents,
        context=context,
        timesteps_int=timesteps_int,
        timestep_float=np.float64(timestep_float),
        out_int=run(torch.from_numpy(timesteps_int)),
        out_float=run(timestep_float),
    )
    (OUT / f"{name}_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    np.savez(OUT / f"{name}_weights.npz", **{k: v.numpy().astype(np.float32) for k, v in state.items()})
    np.savez(OUT / f"{name}_io.npz", **io)
    count = sum(v.numel() for v in state.values())
    print(f"{name}: {count} parameters, |out| max {np.abs(io['out_int']).max():.3f}")


def make_manifest(preset: str, config: dict) -> None:
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    state = dict(model.state_dict())
    original = check_rename(state, config)
    shapes = {k: list(v.shape) for k, v in sorted(original.items())}
    count = sum(int(np.prod(s)) for s in shapes.values())
    ldm = LDM_MANIFESTS / f"{preset}.json"
    if ldm.exists() and json.loads(ldm.read_text())["unet"] != shapes:
        raise SystemExit(f"{preset}: renamed diffusers keys differ from the LDM manifest {ldm}")
    data = {"diffusers_config": config, "num_parameters": count, "parameters": shapes}
    (OUT / f"manifest_{preset}.json").write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(
        f"{preset}: {count} parameters, {len(shapes)} keys"
        + (", equals LDM manifest" if ldm.exists() else "")
    )


def main() -> None:
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, kwargs) in enumerate(TINY.items()):
        make_tiny(name, kwargs, seed)
    for preset, config in FULL.items():
        make_manifest(preset, config)


if __name__ == "__main__":
    main()
