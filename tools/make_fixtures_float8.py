"""Write float8-stored weights with torch / safetensors, and what torch reads back from them.

Written to tests/fixtures/float8/:

* ``codes.safetensors`` (safetensors' own writer) and ``codes.ckpt`` (``torch.save``): every one of the 256
  bit patterns of each 8-bit float type torch has (``float8_e4m3fn``, ``float8_e5m2``, ``float8_e4m3fnuz``,
  ``float8_e5m2fnuz``), one tensor per type; ``codes.npz``: torch's ``.float()`` of each (the reference
  decoding, NaNs included) and the raw bytes.
* ``transformer_sd3_e4m3fn.safetensors``: the tiny SD3 transformer of tests/fixtures/sd3
  (``transformer_sd3.safetensors``, diffusers layout) with every floating tensor cast to ``float8_e4m3fn`` by
  torch, as the "fp8" checkpoints people download are made; ``transformer_sd3_e4m3fn.npz``: diffusers'
  ``SD3Transformer2DModel`` output in float32 with the weights upcast from that file, for the inputs of
  tests/fixtures/sd3/reference.npz.

Usage (dev only; needs torch, diffusers, safetensors): python tools/make_fixtures_float8.py
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
OUT = ROOT / "float8"
TYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def codes() -> None:
    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tensors = {name: patterns.view(getattr(torch, name)).reshape(16, 16).clone() for name in TYPES}
    save_file(tensors, str(OUT / "codes.safetensors"))
    torch.save(tensors, OUT / "codes.ckpt")
    reference = {f"{name}_float": t.float().numpy() for name, t in tensors.items()}
    reference["bytes"] = patterns.numpy().reshape(16, 16)
    np.savez(OUT / "codes.npz", **reference)


def transformer() -> None:
    sd3 = ROOT / "sd3"
    config = json.loads((sd3 / "transformer_sd3.json").read_text())
    state = load_file(str(sd3 / "transformer_sd3.safetensors"))
    stored = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}
    save_file(stored, str(OUT / "transformer_sd3_e4m3fn.safetensors"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = SD3Transformer2DModel(**config).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in stored.items()}, strict=True)
    assert not missing and not unexpected
    ref = np.load(sd3 / "reference.npz")
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(ref["sd3_latents"].transpose(0, 3, 1, 2).copy()),
            encoder_hidden_states=torch.from_numpy(ref["sd3_context"]),
            pooled_projections=torch.from_numpy(ref["sd3_pooled"]),
            timestep=torch.from_numpy(ref["sd3_timesteps"]),
        ).sample.numpy()
    # How far the rounding to float8 moved the output: the test's check is far tighter than this.
    moved = float(np.abs(out.transpose(0, 2, 3, 1) - ref["sd3_out"]).max())
    print(f"float8 weights move the tiny transformer's output by {moved:.3g} (max abs)")
    np.savez(OUT / "transformer_sd3_e4m3fn.npz", out=out.transpose(0, 2, 3, 1), moved=np.float32(moved))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    codes()
    transformer()
    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
