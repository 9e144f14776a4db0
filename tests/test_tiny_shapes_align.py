"""examples/tiny_shapes/align_text.py: the text-encoder-only alignment runs and writes a loadable model.

Two small steps from the shipped model: the written folder is the shipped one with a new text encoder whose
weights moved by at most a few optimiser steps (a written matrix in the wrong memory order, the bug that made
the first exported run score at chance, moves them by the size of the weights themselves), and the script's
own check (the reloaded encoder's states equal the trained one's) passed.
"""

import filecmp
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from tiny_shapes import align_text  # noqa: E402


def test_two_steps_write_the_shipped_model_with_a_nearby_text_encoder(tmp_path):
    from tf_diffusion.weights.safetensors_io import load_safetensors

    init = ROOT / "weights" / "tiny-shapes"
    out = tmp_path / "aligned"
    argv = ["--init", str(init), "--out", str(out), "--steps", "2", "--batch", "4", "--lr", "1e-4"]
    assert align_text.main(argv) == 0
    for name in ("unet.safetensors", "vae.safetensors", "config.json"):
        assert filecmp.cmp(init / name, out / name, shallow=False)
    before, after = (load_safetensors(p / "text_encoder.safetensors") for p in (init, out))
    assert before.keys() == after.keys()
    moved = 0.0
    for key in before:
        a, b = (np.asarray(t[key], np.float32) for t in (before, after))
        assert a.shape == b.shape, key
        assert np.max(np.abs(a - b)) < 5e-3, key  # two Adam steps of 1e-4 (and float16 rounding)
        moved = max(moved, float(np.max(np.abs(a - b))))
    assert moved > 0  # it trained

    with pytest.raises(SystemExit, match="exists"):
        align_text.main(argv)  # never writes over a folder
