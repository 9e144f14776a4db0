"""LyCORIS fixtures: LoHa, LoKr, LoCon with Tucker (``lora_mid``) and DoRA (``dora_scale``) on the tiny pipeline.

Written by the package that defines these formats, ``lycoris-lora`` (``lycoris.kohya.create_network``, the
sd-scripts network module: kohya names ``lora_unet_*`` / ``lora_te_*``), on the tiny pipeline's UNet and
text encoder (tools/make_fixtures_pipeline.py). Each network gets random factors (lycoris zero-initialises
one of them), is applied with multiplier 1, and the UNet and text-encoder outputs on fixed inputs are
recorded; then the network is saved with its own ``save_weights`` as sd-scripts saves it.

Install (dev only, never without --no-deps: it would pull another torch): pip install --no-deps lycoris-lora
Usage: python tools/make_fixtures_lycoris.py
"""

from __future__ import annotations

import pathlib
import sys

import lycoris.kohya
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from lycoris.kohya import create_network
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_fixtures_pipeline import CLIP, UNET, WEIGHT_SEEDS, seeded  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lora"
# name -> create_network keyword arguments (network_dim 4, alpha 2: scale 1/2; convs rank 2, alpha 3).
CASES = {
    "loha": dict(algo="loha"),
    "loha_tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr_full": dict(algo="lokr", factor=4, full_matrix=True),
    "locon_tucker": dict(algo="locon", use_tucker=True),
    "locon_dora": dict(algo="locon", dora_wd=True),
    "loha_dora": dict(algo="loha", dora_wd=True, wd_on_output=False),
}


# SD's modules as sd-scripts targets them (the package's default list also names newer models' blocks).
PRESET = {
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


def main() -> None:
    lycoris.kohya.PRESET["tiny-sd"] = {**lycoris.kohya.PRESET["full"], **PRESET}
    rng = np.random.default_rng(40)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 500], dtype=np.int64)
    context = rng.standard_normal((2, 7, CLIP["hidden_size"])).astype(np.float32)
    ids = rng.integers(1, 49406, size=(2, 77)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 49406, 49407
    io = dict(x=x, t=t, context=context, ids=ids)
    for case, kwargs in CASES.items():
        torch.manual_seed(0)
        unet = seeded(UNet2DConditionModel(**UNET), WEIGHT_SEEDS["unet"])
        text_encoder = seeded(CLIPTextModel(CLIPTextConfig(**CLIP)), WEIGHT_SEEDS["text_encoder"])
        network = create_network(
            1.0, 4, 2.0, None, text_encoder, unet, conv_dim=2, conv_alpha=3.0, preset="tiny-sd", **kwargs
        )
        network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
        draw = np.random.default_rng(50 + list(CASES).index(case))
        with torch.no_grad():
            for name, param in sorted(network.named_parameters()):
                if "dora_scale" in name:
                    param.mul_(
                        torch.from_numpy(draw.uniform(0.8, 1.2, tuple(param.shape)).astype(np.float32))
                    )
                else:
                    fan = int(np.prod(param.shape[1:])) if param.dim() > 1 else 1
                    param.copy_(
                        torch.from_numpy(
                            draw.standard_normal(tuple(param.shape)).astype(np.float32) / np.sqrt(fan)
                        )
                    )
            unet_out = unet(
                torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)
            ).sample.numpy()
            te_out = text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        io[f"{case}_unet"], io[f"{case}_te"] = unet_out, te_out
        network.save_weights(
            str(OUT / f"lycoris_{case}.safetensors"), None, {"ss_network_dim": "4", "ss_network_alpha": "2.0"}
        )
        kinds = sorted(
            {k.split(".")[-2] if k.endswith(".weight") else k.split(".")[-1] for k in network.state_dict()}
        )
        print(case, len(network.state_dict()), "tensors:", kinds)
    np.savez_compressed(OUT / "lycoris_io.npz", **io)


if __name__ == "__main__":
    main()
