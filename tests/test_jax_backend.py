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


@pytest.mark.slow  # 1-2 minutes: a JAX process compiles and runs every task
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
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("step", "fused"):
        jax_images = np.load(tmp_path / f"{name}.npy")
        assert np.abs(jax_images - ours).max() < 1e-4, name


FUSED_SCRIPT = """
import jax
import numpy as np
import keras
from tf_diffusion import execution, layers
from tf_diffusion.config import UNetConfig
from tf_diffusion.execution import cpu, kernels
from tf_diffusion.unet import CrossAttention
assert keras.backend.backend() == "jax"
jax.default_backend = lambda: "gpu"  # take the GPU branch on CPU; "xla" runs there, "cudnn" would not
rng = np.random.default_rng(0)
worst = 0.0
fused_calls = []
original = cpu.fused_attention
cpu.fused_attention = lambda *a: fused_calls.append(a[-1]) or original(*a)
for (b, tq, tk, c, heads) in ((2, 64, 64, 64, 4), (2, 64, 77, 64, 8), (1, 16, 16, 32, 1)):
    q, k, v = (rng.standard_normal((b, t, c)).astype(np.float32) for t in (tq, tk, tk))
    want = np.asarray(layers.attention(q, k, v, heads), dtype=np.float32)
    q16, k16, v16 = (jax.numpy.asarray(a, dtype="bfloat16") for a in (q, k, v))
    assert kernels.fused_attention(q16, k16, v16, heads, "xla") is not None
    assert kernels.fused_attention(q, k, v, heads, "xla") is None  # float32 keeps the explicit form
    assert kernels.fused_attention(q16, k16, v16, heads, "off") is None
    got = np.asarray(kernels.fused_attention(q16, k16, v16, heads, "xla"), dtype=np.float32)
    worst = max(worst, float(np.abs(got - want).max()))
    # Through a bfloat16 CrossAttention with its processor: the option picks the kernel.
    with layers.dtype_policy_scope("bfloat16"):
        attn = execution.apply(CrossAttention(c, c, heads))
    x = q[:, :tq]
    with execution.options(execution.ExecutionOptions(attention="off")):
        explicit = np.asarray(attn(x), dtype=np.float32)
    assert fused_calls == []
    with execution.options(execution.ExecutionOptions(attention="xla")):
        fused = np.asarray(attn(x), dtype=np.float32)
    assert fused_calls == ["xla"], fused_calls
    fused_calls.clear()
    worst = max(worst, float(np.abs(fused - explicit).max()))
try:
    execution.ExecutionOptions(attention="bogus")
except ValueError as error:
    assert "attention" in str(error)
else:
    raise AssertionError("bogus mode accepted")
print(worst)
"""


def test_fused_jax_attention_matches_explicit_form():
    """The GPU path (jax.nn.dot_product_attention, (B, T, heads, d) layout) equals our explicit form."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", FUSED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    worst = float(done.stdout.strip().splitlines()[-1])
    assert worst < 0.05, worst  # bfloat16 inputs against the float32 explicit form


SDXL_SCRIPT = """
import json, sys
import numpy as np
import keras
from tf_diffusion import StableDiffusion
assert keras.backend.backend() == "jax", keras.backend.backend()
folder = {folder!r}
sd = StableDiffusion.from_pretrained(folder + "/sdxl-diffusers")
ref = np.load(folder + "/reference.npz")
case = json.load(open(folder + "/meta.json"))["runs"][0]
out = sd.generate(case["prompt"], case["negative_prompt"], num_steps=case["steps"], guidance_scale=case["guidance"],
                  height=case["height"], width=case["width"], latents=ref["run/" + case["name"] + "/latents"],
                  scheduler=case["scheduler"], output_type="float", progress=False)
print(json.dumps({{"error": float(np.abs(np.asarray(out) - ref["run/" + case["name"] + "/images"]).max())}}))
"""


@pytest.mark.slow  # a JAX process loads and runs the tiny SDXL pipeline
def test_sdxl_under_jax_matches_diffusers():
    """SDXL (two encoders, pooled embedding, time ids) under KERAS_BACKEND=jax equals
    StableDiffusionXLPipeline on the tiny SDXL folder from the same latents."""
    import json

    script = SDXL_SCRIPT.format(folder=str(ROOT / "tests" / "fixtures" / "sdxl"))
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["error"] <= 1e-3


TRANSFORMER_SCRIPT = """
import json
import numpy as np
import keras
from tf_diffusion.pipeline import StableDiffusion
assert keras.backend.backend() == "jax", keras.backend.backend()
fixtures = {fixtures!r}
errors = {{}}
# SD3 (tests/test_sd3_pipeline.py's "t5_negative" case: T5, a negative prompt, guidance 7, 3 steps)
arrays = dict(np.load(fixtures + "/sd3/pipeline.npz"))
prompts, negatives, guidance, steps, _ = json.load(open(fixtures + "/sd3/pipeline.json"))["t5_negative"]
sd = StableDiffusion.from_pretrained(fixtures + "/sd3/sd3-diffusers")
images = sd.generate(prompts, negatives, num_steps=steps, guidance_scale=guidance, height=12, width=8,
                     latents=arrays["t5_negative_latents"], max_sequence_length=12, output_type="float",
                     progress=False)
errors["sd3"] = float(np.abs(np.asarray(images) - arrays["t5_negative_images"]).max())
# Flux.1 [dev] (tests/test_flux_pipeline.py's text-to-image case: the guidance input, dynamic shifting)
meta = json.load(open(fixtures + "/flux/pipeline.json"))
arrays = dict(np.load(fixtures + "/flux/pipeline.npz"))
sd = StableDiffusion.from_pretrained(fixtures + "/flux/flux-dev")
images = sd.generate(meta["prompts"], num_steps=meta["cases"]["txt2img"]["steps"],
                     guidance_scale=meta["guidance"]["dev"], height=meta["height"], width=meta["width"],
                     latents=arrays["dev/txt2img_latents"], max_sequence_length=meta["max_sequence_length"],
                     output_type="float", progress=False)
errors["flux"] = float(np.abs(np.asarray(images) - arrays["dev/txt2img_images"]).max())
print(json.dumps(errors))
"""


@pytest.mark.slow  # a JAX process loads and compiles both tiny pipelines (about a minute)
def test_sd3_and_flux_under_jax_match_diffusers():
    """The transformer families under KERAS_BACKEND=jax (XLA-compiled loop, the default there) equal
    diffusers' StableDiffusion3Pipeline and FluxPipeline images on the tiny folders from the same latents."""
    import json

    script = TRANSFORMER_SCRIPT.format(fixtures=str(ROOT / "tests" / "fixtures"))
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors["sd3"] < 1e-3, errors  # the SD3 pipeline tests' tolerance
    assert errors["flux"] < 1e-4, errors  # the Flux pipeline tests' tolerance
