"""Write a ComfyUI-style "scaled fp8" SD3 single file with torch, and torch's dequantized weights.

Written to tests/fixtures/float8/:

* ``sd3_scaled_fp8.safetensors``: the tiny SD3 folder's transformer, VAE, CLIP-L and CLIP-G
  (tests/fixtures/sd3/sd3-diffusers) in the original single-file layout, laid out as ComfyUI's scaled
  files are: every 2-D ``weight`` of the transformer and of CLIP-G stored as ``float8_e4m3fn`` divided
  by a per-tensor ``scale_weight`` (float32, its largest magnitude / 448), the ``scaled_fp8`` marker and
  one ``scale_input``; the other tensors in float32. Written by safetensors' torch writer.
* ``sd3_scaled_fp8.npz``: for each scaled weight, torch's dequantization
  ``weight.to(float32) * scale_weight`` (what a loader must produce), keyed by the file's key.

Usage (dev only; needs torch and safetensors):

    PYTHONPATH=. python tools/make_fixtures_scaled_fp8.py
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tf_diffusion import StableDiffusion  # noqa: E402
from tf_diffusion.weights.state_dict import state_dict  # noqa: E402

FOLDER = ROOT / "tests" / "fixtures" / "sd3" / "sd3-diffusers"
OUT = ROOT / "tests" / "fixtures" / "float8"
PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
}
SCALED = ("transformer", "text_encoder_2")  # ComfyUI scales the transformer's (and encoders') linear weights


def main() -> None:
    sd = StableDiffusion.from_pretrained(FOLDER, load_t5=False)
    tensors, expected = {}, {}
    for name, prefix in PREFIXES.items():
        for key, value in state_dict(getattr(sd, name)).items():
            if name == "text_encoder" and key == "text_projection.weight":
                continue  # SD3 files hold none (the identity)
            weight = torch.from_numpy(np.ascontiguousarray(value))
            if name in SCALED and key.endswith(".weight") and weight.ndim == 2:
                scale = (weight.abs().max() / 448.0).to(torch.float32)  # e4m3fn's largest finite value
                stored = (weight / scale).to(torch.float8_e4m3fn)
                tensors[prefix + key] = stored
                tensors[prefix + key[: -len("weight")] + "scale_weight"] = scale.reshape(())
                expected[prefix + key] = (stored.to(torch.float32) * scale).numpy()
            else:
                tensors[prefix + key] = weight
    tensors["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # the marker
    first = next(k for k in expected if k.startswith("model.diffusion_model."))
    tensors[first[: -len("weight")] + "scale_input"] = torch.ones((), dtype=torch.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "sd3_scaled_fp8.safetensors"))
    np.savez_compressed(OUT / "sd3_scaled_fp8.npz", **expected)
    print(f"wrote {len(tensors)} tensors ({len(expected)} scaled) to {OUT}")


if __name__ == "__main__":
    main()
