"""The same seed gives the same image under TensorFlow and under JAX (KERAS_BACKEND=jax, in a subprocess)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tf_diffusion.weights import state_dict

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_generate import MICRO
from tf_diffusion.pipeline import StableDiffusion
from tf_diffusion.weights import load_state_dict
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
sd = StableDiffusion(MICRO)
w = np.load({weights!r})
for name, comp in (("te", sd.text_encoder), ("unet", sd.unet), ("vae", sd.vae)):
    load_state_dict(comp, {{k[len(name) + 1:]: w[k] for k in w.files if k.startswith(name + "/")}})
kw = dict(seed=3, num_steps=3, scheduler="euler_a", output_type="float", progress=False)
np.save({out_step!r}, sd.generate("a red circle", fused=False, jit_compile=False, **kw))
np.save({out_fused!r}, sd.generate("a red circle", fused=True, jit_compile=True, **kw))
"""


def test_same_seed_same_image_under_jax(tmp_path):
    from test_generate import MICRO

    from tf_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion(MICRO)
    weights = {}
    for name, comp in (("te", sd.text_encoder), ("unet", sd.unet), ("vae", sd.vae)):
        weights.update({f"{name}/{k}": v for k, v in state_dict(comp).items()})
    np.savez(tmp_path / "w.npz", **weights)
    ours = sd.generate(
        "a red circle", seed=3, num_steps=3, scheduler="euler_a", output_type="float", progress=False
    )

    script = SCRIPT.format(
        tests=str(ROOT / "tests"),
        weights=str(tmp_path / "w.npz"),
        out_step=str(tmp_path / "step.npy"),
        out_fused=str(tmp_path / "fused.npy"),
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("step", "fused"):
        jax_images = np.load(tmp_path / f"{name}.npy")
        assert np.abs(jax_images - ours).max() < 1e-4, name
