"""Write a float8-stored Flux transformer file with torch / safetensors, and diffusers' output for it.

Written to tests/fixtures/float8/:

* ``transformer_flux_e4m3fn.safetensors``: the tiny guidance-distilled Flux transformer of
  tests/fixtures/flux (``transformer-guidance-2x2``, 2 double + 2 single blocks) with every floating
  tensor cast to ``float8_e4m3fn`` by torch, as the "fp8" Flux checkpoints people download are made,
  in the original (Black Forest Labs) single-file layout (``double_blocks.*``, ``img_in``, ...; the
  fusing of q, k, v is a concatenation, exact on float8 values) and written by safetensors' torch writer;
* ``transformer_flux_e4m3fn.npz``: diffusers' ``FluxTransformer2DModel`` output in float32 with the
  weights upcast from the float8 values, for the inputs of tests/fixtures/flux/transformers.npz, and how
  far the rounding moved it from the float32 model's output.

Usage (dev only; needs torch, diffusers, safetensors, ml_dtypes):

    PYTHONPATH=. python tools/make_fixtures_flux_float8.py
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_dtypes
import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"
NAME = "guidance-2x2"

from tf_diffusion.weights.flux import convert_diffusers_flux, flux_config_from_diffusers  # noqa: E402


def main() -> None:
    folder = FIXTURES / "flux" / f"transformer-{NAME}"
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    stored = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}
    # Into the original layout through float8 bytes (NumPy has the type through ml_dtypes).
    as_numpy = {k: v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) for k, v in stored.items()}
    original = convert_diffusers_flux(as_numpy, flux_config_from_diffusers(config))
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v).view(np.uint8)).view(torch.float8_e4m3fn)
        for k, v in original.items()
    }
    save_file(tensors, str(FIXTURES / "float8" / "transformer_flux_e4m3fn.safetensors"))

    model = FluxTransformer2DModel.from_config(config).eval()
    model.load_state_dict({k: v.float() for k, v in stored.items()})
    with np.load(FIXTURES / "flux" / "transformers.npz") as data:
        x = {k.split("/", 1)[1]: torch.from_numpy(data[k]) for k in data.files if k.startswith(f"{NAME}/")}
    with torch.no_grad():
        out = model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        ).sample.numpy()
    moved = float(np.abs(out - x["out"].numpy()).max())
    print(f"float8 weights move the tiny Flux transformer's output by {moved:.3g} (max abs)")
    np.savez(FIXTURES / "float8" / "transformer_flux_e4m3fn.npz", out=out, moved=np.float32(moved))


if __name__ == "__main__":
    main()
