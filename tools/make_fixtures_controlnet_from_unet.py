"""Reference for ``controlnet_from_unet``: diffusers' ``ControlNetModel.from_unet`` on the tiny SD1 UNet.

The UNet is tests/fixtures/unet/sd1 (config.json and weights written by tools/make_fixtures_unet.py).
``ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))`` copies its encoder;
this script records which of the net's tensors diffusers starts at exactly zero, then replaces every
tensor the net does not copy from the UNet (the hint encoder, the zero convs, the middle output
conv) with ``tf_diffusion.testing.random_state_dict(..., seed=SEED)`` (the test redraws them), so the
residuals on a fixed input depend on every copied weight, and stores those residuals (NHWC).

Writes tests/fixtures/controlnet/from_unet.json (the zero-initialised keys, the redrawn keys and
their shapes) and from_unet.npz (inputs, residuals).

Usage (dev only; needs torch and diffusers): python tools/make_fixtures_controlnet_from_unet.py
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tf_diffusion.testing import random_state_dict  # noqa: E402

UNET = ROOT / "tests" / "fixtures" / "unet"
OUT = ROOT / "tests" / "fixtures" / "controlnet"
HINT_CHANNELS = (16, 32)  # hints 2x the latents: small inputs
SEED = 2101
OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def main() -> None:
    config = json.loads((UNET / "sd1_config.json").read_text())
    unet = UNet2DConditionModel.from_config(config).eval()
    with np.load(UNET / "sd1_weights.npz") as weights:
        unet.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS).eval()
    state = net.state_dict()
    zero = sorted(k for k, v in state.items() if not torch.any(v))
    own = {k: list(v.shape) for k, v in state.items() if k.startswith(OWN)}
    drawn = random_state_dict(own, SEED)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in drawn.items()}, strict=False)

    rng = np.random.default_rng(SEED)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    timesteps = np.array([37.0, 801.0], np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    hint = rng.random((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        down, mid = net(
            torch.from_numpy(latents).permute(0, 3, 1, 2),
            torch.from_numpy(timesteps),
            torch.from_numpy(context),
            torch.from_numpy(hint).permute(0, 3, 1, 2).contiguous(),
            return_dict=False,
        )
    arrays = dict(latents=latents, timesteps=timesteps, context=context, hint=hint)
    for i, d in enumerate(down):
        arrays[f"down.{i}"] = d.permute(0, 2, 3, 1).numpy()
    arrays["mid"] = mid.permute(0, 2, 3, 1).numpy()
    np.savez_compressed(OUT / "from_unet.npz", **arrays)
    meta = {
        "unet": "tests/fixtures/unet/sd1",
        "conditioning_embedding_out_channels": list(HINT_CHANNELS),
        "seed": SEED,
        "zero_keys": zero,
        "redrawn": own,
    }
    (OUT / "from_unet.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(zero)} zero tensors, {len(own)} redrawn, {len(down)} down residuals")


if __name__ == "__main__":
    main()
