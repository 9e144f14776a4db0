"""A LoRA trained here teaches the tiny-shapes model a colour word it has never seen, by the independent checker.

The shipped tiny-shapes model knows ten colour words. This draws orange shapes with the dataset's own drawing
code (examples/tiny_shapes/dataset.py) captioned with a made-up word, "a vex heart", trains a LoRA on the UNet's
attention and the text encoder's for a few hundred steps, saves it as a kohya file, loads that file with
``load_lora_weights`` and asks for "a vex <shape>" images: the pixel checker (examples/tiny_shapes/checker.py,
which knows nothing of any model) must read them as orange and as the asked shape. Before training the word
means nothing (orange about as often as chance), and after unloading the model is the base model again.
"""

import pathlib
import sys
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from tiny_shapes import checker  # noqa: E402
from tiny_shapes import dataset as shapes  # noqa: E402

WORD, COLOR = "vex", "orange"
STEPS = 450


def training_images(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    backgrounds = shapes.allowed_backgrounds(COLOR)
    images, captions = [], []
    for i in range(n):
        shape = shapes.SHAPES[i % len(shapes.SHAPES)]
        extent = rng.uniform(0.3, 0.46) * size
        center = tuple(rng.uniform(0.35 * size, 0.65 * size, 2))
        images.append(shapes.draw(shape, COLOR, backgrounds[i % len(backgrounds)], center, extent, size))
        captions.append(f"a {WORD} {shape}")
    return np.stack(images), captions


def read(sd, seeds=(100, 101)):
    prompts = [(f"a {WORD} {s}", s) for s in shapes.SHAPES]
    checks = [
        checker.check(sd.generate(p, seed=seed, progress=False)[0]) for seed in seeds for p, _ in prompts
    ]
    wanted = [s for _ in seeds for _, s in prompts]
    color = float(np.mean([c["color"] == COLOR for c in checks]))
    shape = float(np.mean([c["shape"] == s for c, s in zip(checks, wanted, strict=True)]))
    return color, shape


@pytest.mark.slow  # about three minutes on two CPU cores: 450 steps and 36 generated images
def test_a_lora_teaches_a_new_colour_word(tmp_path):
    from tf_diffusion.models import DEFAULT_MODEL, resolve_model
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import LoraTrainer, LoraTrainingConfig, TrainingConfig, dataset_from_arrays

    sd = StableDiffusion.from_pretrained(resolve_model(DEFAULT_MODEL))
    before = read(sd)
    images, captions = training_images(48, sd.config.default_size)
    config = TrainingConfig(learning_rate=2e-3, ema_decay=None, caption_dropout=0.0)
    trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=4))
    start = time.monotonic()
    history = trainer.fit(dataset_from_arrays(images, captions, sd.tokenizer, 8), STEPS, progress=False)
    seconds = time.monotonic() - start
    path = trainer.save_lora(tmp_path / f"{WORD}.safetensors")
    trainer.network.detach()
    sd.load_lora_weights(path)
    after = read(sd)
    sd.unload_lora_weights()
    base = read(sd, seeds=(100,))
    print(
        f"'{WORD}' -> {COLOR}: colour/shape accuracy before {before}, after {after} "
        f"({STEPS} steps in {seconds:.0f} s, loss {np.mean([h['loss'] for h in history[:20]]):.3f} -> "
        f"{np.mean([h['loss'] for h in history[-20:]]):.3f}); unloaded {base}"
    )
    assert before[0] <= 0.34  # the word means no colour yet
    # Orange is the colour the model confuses most (read as red: the model card's misses); chance is 0.1.
    # With phase 6's text encoder 300 steps at 1e-3 reached 0.42 and 450 at 2e-3 reach 0.75 here.
    assert after[0] >= 0.6 and after[1] >= 0.75
    assert base[0] <= 0.5
