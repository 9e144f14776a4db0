"""Regenerate the README's pictures from the shipped model: what the README's first command writes
(docs/images/red_circle.png, made by that very command) and seeds 0 to 11 of its prompt
(docs/images/tiny_shapes_seeds.png, 6 x 2 tiles shown at 2x).

Run after anything that changes the images a seed gives (the noise, the sampler defaults):
    python tools/make_readme_images.py
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "a red circle in the center on a white background"


def main() -> None:
    images = ROOT / "docs" / "images"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "red_circle.png"
        # Exactly the README's first command (after its install step).
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tf_diffusion",
                "generate",
                PROMPT,
                "--seed",
                "0",
                "-o",
                str(out),
                "--no-progress",
            ],
            check=True,
            cwd=ROOT,
        )
        out.replace(images / "red_circle.png")

    from tf_diffusion import StableDiffusion, resolve_model

    sd = StableDiffusion.from_pretrained(resolve_model("tiny-shapes"))
    tiles = sd.generate(PROMPT, num_images=12, seed=0, progress=False, jit_compile=False)
    assert tiles.info.seeds == tuple(range(12))
    h, w = tiles.shape[1:3]
    grid = tiles.reshape(2, 6, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(2 * h, 6 * w, 3)
    Image.fromarray(np.asarray(grid)).resize((12 * w, 4 * h), Image.Resampling.LANCZOS).save(
        images / "tiny_shapes_seeds.png"
    )


if __name__ == "__main__":
    main()
