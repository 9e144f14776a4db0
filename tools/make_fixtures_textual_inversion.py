"""Textual-inversion fixtures: embeddings in the A1111 and diffusers formats, and diffusers' prompt encodings.

On the tiny pipeline's tokenizer and text encoder (tools/make_fixtures_pipeline.py, weights from
``random_state_dict`` with its seeds) this writes four embeddings of the tiny text encoder's width:

- ``inkwash.pt``: A1111's ``torch.save`` layout (``string_to_param: {"*": (3, D)}``, ``name``,
  ``string_to_token``, ``step``), three vectors; its word is the file stem;
- ``easyneg.safetensors``: A1111's safetensors layout (``emb_params: (2, D)``);
- ``cat-toy/learned_embeds.safetensors``: diffusers' training script's layout (``{"<cat-toy>": (D,)}``);
- ``learned_embeds.bin``: the same layout pickled (``{"<blob>": (1, D)}``);
- ``bad/wide.safetensors``: a 48-wide embedding (the wrong width, for the error).

Each is loaded with diffusers' ``StableDiffusionPipeline.load_textual_inversion`` (the A1111 files with
``token=`` their stem, as the web UI names them), and ``encode_prompt`` (which expands multi-vector words
as diffusers does) gives the reference hidden states of every case in ``ti_cases.json`` (prompt and
negative prompt), stored in ``ti_io.npz``.

Usage (dev only): pip install -e ".[reference]" && python tools/make_fixtures_textual_inversion.py
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_fixtures_pipeline import CLIP, build_components  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "textual_inversion"
WIDTH = CLIP["hidden_size"]
FILLER = " ".join(["red"] * 75)  # exactly one 75-token chunk
CASES = [
    ("plain", "a photo of inkwash style", ""),
    ("negative", "a cat on a table", "easyneg, blurry"),
    ("diffusers", "<cat-toy> on a table", ""),
    ("bin", "a <blob> near inkwash", "easyneg"),
    ("two", "inkwash and <cat-toy>", ""),
    ("second_chunk", "inkwash style", ""),  # the second chunk of FILLER + " inkwash style"
    ("filler", FILLER, ""),
]


def vectors(seed: int, n: int, width: int = WIDTH) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, width)).astype(np.float32) * 0.5)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors(1, 3)},
            "name": "inkwash-as-trained",
            "step": 100,
        },
        OUT / "inkwash.pt",
    )
    save_file({"emb_params": vectors(2, 2)}, OUT / "easyneg.safetensors")
    (OUT / "cat-toy").mkdir(exist_ok=True)
    save_file({"<cat-toy>": vectors(3, 1)[0]}, OUT / "cat-toy" / "learned_embeds.safetensors")
    torch.save({"<blob>": vectors(4, 1)}, OUT / "learned_embeds.bin")
    (OUT / "bad").mkdir(exist_ok=True)
    save_file({"emb_params": vectors(5, 1, 48)}, OUT / "bad" / "wide.safetensors")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, _, _, _ = build_components(pathlib.Path(tmp))
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    io = {}
    with torch.no_grad():
        for name, prompt, negative in CASES:
            io[f"{name}_base"] = pipe.encode_prompt(prompt, "cpu", 1, True, negative)[0].numpy()
        pipe.load_textual_inversion(str(OUT / "inkwash.pt"), token="inkwash")
        pipe.load_textual_inversion(str(OUT / "easyneg.safetensors"), token="easyneg")
        pipe.load_textual_inversion(str(OUT / "cat-toy"))
        pipe.load_textual_inversion(str(OUT / "learned_embeds.bin"))
        for name, prompt, negative in CASES:
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
            io[f"{name}_cond"], io[f"{name}_uncond"] = cond.numpy(), uncond.numpy()
            print(
                name,
                pipe.maybe_convert_prompt(prompt, tokenizer),
                "|",
                pipe.maybe_convert_prompt(negative, tokenizer),
            )
    moved = float(np.abs(io["plain_cond"] - io["plain_base"]).max())
    print(f"the embedding moves the encoding by {moved:.3f}")
    assert moved > 1e-2
    np.savez_compressed(OUT / "ti_io.npz", **io)
    (OUT / "ti_cases.json").write_text(json.dumps({"cases": CASES, "filler": FILLER}, indent=1) + "\n")


if __name__ == "__main__":
    main()
