"""Fixtures for LoRA / textual-inversion saving: files we write, loaded by diffusers, and diffusers' outputs.

On our side (TensorFlow) this builds the tiny pipeline of tools/make_fixtures_pipeline.py (tests/test_lora.py's
``build``), attaches a ``LoraNetwork`` (UNet: kohya's transformer targets plus the 3x3 ResBlock ``conv1``,
LoCon; text encoder: CLIP attention and MLP), gives its factors seeded random values (up is zero after
initialisation, which would prove nothing), and saves it with ``save_lora`` in kohya and in diffusers format;
a ``TextualInversionTrainer``'s two vectors, also seeded, with ``save_embedding``. (The tests take the factors
back from the diffusers file: its tensors are the factors in torch layout.)

On diffusers' side each file is loaded into the tiny diffusers pipeline (the same seeded components) with
``load_lora_weights`` / ``load_textual_inversion``, and its UNet noise prediction, text-encoder hidden states
and ``encode_prompt`` states are recorded. The tests compare our outputs with those, without torch.

Writes tests/fixtures/lora_train/: ``kohya.safetensors``, ``diffusers.safetensors``, ``sq-token.safetensors``,
and ``io.npz``; the same
for the tiny SDXL pipeline (``sdxl_*``: UNet attention and both text encoders, kohya's SDXL names).

Usage (dev only): python tools/make_fixtures_lora_train.py; ``... concept`` trains the concept LoRA of
tests/test_train_lora_concept.py and shows its effect in diffusers (about five minutes; writes nothing).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

OUT = ROOT / "tests" / "fixtures" / "lora_train"
UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RANK, ALPHA = 4, 2.0
TI_TOKEN, TI_VECTORS = "sq-token", 2
PROMPTS = [("a photo of sq-token on grass", "blurry"), ("sq-token", "")]


def ours():
    """Our side: the network, the files, the factors and our own outputs (for the record only)."""
    import keras
    from test_lora import FIXTURES, build

    from tf_diffusion.adapters.lora_training import LoraNetwork, save_lora
    from tf_diffusion.training import TextualInversionTrainer, TrainingConfig

    keras.utils.set_random_seed(0)
    sd = build(FIXTURES)
    network = LoraNetwork.attach(
        sd, RANK, ALPHA, unet_targets=UNET_TARGETS, text_encoder_targets=TEXT_TARGETS, seed=1
    )
    rng = np.random.default_rng(40)
    for entry in network.layers:
        for var in (entry.down, entry.up):
            fan_in = int(np.prod(var.shape[:-1]))
            value = rng.standard_normal(tuple(var.shape)).astype(np.float32) / np.sqrt(fan_in)
            var.assign(value)
    OUT.mkdir(parents=True, exist_ok=True)
    save_lora(network, OUT / "kohya.safetensors", "kohya", overwrite=True)
    save_lora(network, OUT / "diffusers.safetensors", "diffusers", overwrite=True)
    network.detach()

    trainer = TextualInversionTrainer(sd, TI_TOKEN, TI_VECTORS, "square", TrainingConfig(ema_decay=None))
    trainer.vectors.assign(rng.standard_normal(tuple(trainer.vectors.shape)).astype(np.float32) * 0.5)
    (OUT / f"{TI_TOKEN}.safetensors").unlink(missing_ok=True)
    trainer.save_embedding(OUT / f"{TI_TOKEN}.safetensors")


def reference() -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from make_fixtures_pipeline import build_components

    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW
    t = np.array([20, 600], dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, _, unet, _ = build_components(pathlib.Path(tmp))
    context = rng.standard_normal((2, 7, text_encoder.config.hidden_size)).astype(np.float32)
    ids = rng.integers(1, 49406, size=(2, 77)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 49406, 49407
    io = dict(x=x, t=t, context=context, ids=ids)

    def pipeline():
        with tempfile.TemporaryDirectory() as tmp:
            tok, te, _, un, _ = build_components(pathlib.Path(tmp))
        return StableDiffusionPipeline(
            vae=None,
            text_encoder=te,
            tokenizer=tok,
            unet=un,
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def outputs(pipe):
        with torch.no_grad():
            u = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
            e = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        return u, e

    io["unet_base"], io["te_base"] = outputs(pipeline())
    for fmt in ("kohya", "diffusers"):
        pipe = pipeline()
        pipe.load_lora_weights(str(OUT), weight_name=f"{fmt}.safetensors", adapter_name="trained")
        io[f"unet_{fmt}"], io[f"te_{fmt}"] = outputs(pipe)
        moved = float(np.max(np.abs(io[f"unet_{fmt}"] - io["unet_base"])))
        moved_te = float(np.max(np.abs(io[f"te_{fmt}"] - io["te_base"])))
        print(
            f"{fmt}: diffusers' load_lora_weights moves the UNet by {moved:.3f}, the text encoder by {moved_te:.3f}"
        )
        assert moved > 1e-2 and moved_te > 1e-2
    err = float(np.max(np.abs(io["unet_kohya"] - io["unet_diffusers"])))
    print(f"kohya and diffusers files agree in diffusers to {err:.2e}")

    pipe = pipeline()
    pipe.load_textual_inversion(str(OUT / f"{TI_TOKEN}.safetensors"), token=TI_TOKEN)
    with torch.no_grad():
        for i, (prompt, negative) in enumerate(PROMPTS):
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
            io[f"ti_cond_{i}"], io[f"ti_uncond_{i}"] = cond.numpy(), uncond.numpy()
            print(prompt, "->", pipe.maybe_convert_prompt(prompt, pipe.tokenizer))
    np.savez_compressed(OUT / "io.npz", **io)
    (OUT / "cases.json").write_text(
        json.dumps(
            {
                "rank": RANK,
                "alpha": ALPHA,
                "unet_targets": UNET_TARGETS,
                "text_encoder_targets": TEXT_TARGETS,
                "ti_token": TI_TOKEN,
                "ti_prompts": PROMPTS,
            },
            indent=1,
        )
        + "\n"
    )


SDXL_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def sdxl_ours() -> None:
    """The tiny SDXL pipeline (tests/fixtures/sdxl/sdxl-diffusers) with a network on the UNet's attention and
    both text encoders, saved in kohya's SDXL naming (original UNet paths, lora_te1_ / lora_te2_) and diffusers'."""
    from make_fixtures_sdxl_lora import BASE

    from tf_diffusion import StableDiffusion
    from tf_diffusion.adapters.lora_training import LoraNetwork, save_lora

    sd = StableDiffusion.from_pretrained(BASE)
    network = LoraNetwork.attach(sd, 2, 4.0, text_encoder_targets=SDXL_TEXT_TARGETS, seed=2)
    rng = np.random.default_rng(42)
    for entry in network.layers:
        for var in (entry.down, entry.up):
            fan_in = int(np.prod(var.shape[:-1]))
            value = rng.standard_normal(tuple(var.shape)).astype(np.float32) * 0.5 / np.sqrt(fan_in)
            var.assign(value)
    save_lora(network, OUT / "sdxl_kohya.safetensors", "kohya", overwrite=True)
    save_lora(network, OUT / "sdxl_diffusers.safetensors", "diffusers", overwrite=True)
    network.detach()


def sdxl_reference() -> None:
    from make_fixtures_sdxl_lora import inputs, load_base, outputs

    io = {f"{k}_base": v for k, v in outputs(load_base(), inputs()).items()}
    for fmt in ("kohya", "diffusers"):
        pipe = load_base()
        pipe.load_lora_weights(str(OUT), weight_name=f"sdxl_{fmt}.safetensors", adapter_name="trained")
        got = outputs(pipe, inputs())
        for k, v in got.items():
            io[f"{k}_{fmt}"] = v
            print(
                f"SDXL {fmt}: diffusers' load_lora_weights moves {k} by {np.abs(v - io[f'{k}_base']).max():.3f}"
            )
        assert all(np.abs(got[k] - io[f"{k}_base"]).max() > 1e-2 for k in ("unet", "te", "te2"))
    np.savez_compressed(OUT / "sdxl_io.npz", **io)


def concept_in_diffusers() -> None:
    """The concept LoRA of tests/test_train_lora_concept.py, trained here, in diffusers (a check; writes nothing).

    Trains the LoRA as the test does, converts the tiny-shapes model to a diffusers folder
    (``tf-diffusion convert --to diffusers``), loads the kohya file with ``load_lora_weights`` and asks
    diffusers' pipeline (its own scheduler from the folder, the model's default steps and guidance) for the
    test's prompts; the independent checker reads the colours, as the test reads ours.
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from test_train_lora_concept import COLOR, STEPS, WORD, training_images
    from tiny_shapes import checker
    from tiny_shapes import dataset as shapes

    from tf_diffusion.cli import main as cli
    from tf_diffusion.models import DEFAULT_MODEL, resolve_model
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import LoraTrainer, LoraTrainingConfig, TrainingConfig, dataset_from_arrays

    sd = StableDiffusion.from_pretrained(resolve_model(DEFAULT_MODEL))
    images, captions = training_images(48, sd.config.default_size)
    config = TrainingConfig(learning_rate=1e-3, ema_decay=None, caption_dropout=0.0)
    trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=4))
    trainer.fit(dataset_from_arrays(images, captions, sd.tokenizer, 8), STEPS, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        trainer.save_lora(tmp / f"{WORD}.safetensors")
        assert cli(["convert", DEFAULT_MODEL, str(tmp / "model"), "--to", "diffusers"]) == 0
        pipe = StableDiffusionPipeline.from_pretrained(
            str(tmp / "model"), safety_checker=None, requires_safety_checker=False
        )
        prompts = [(f"a {WORD} {s}", s) for s in shapes.SHAPES]

        def read(pipe):
            checks, wanted = [], []
            for seed in (100, 101):
                for prompt, shape in prompts:
                    out = pipe(
                        prompt,
                        num_inference_steps=sd.config.default_steps,
                        guidance_scale=sd.config.default_guidance,
                        generator=torch.Generator().manual_seed(seed),
                        output_type="np",
                    ).images[0]
                    checks.append(checker.check(np.round(out * 255).astype(np.uint8)))
                    wanted.append(shape)
            color = float(np.mean([c["color"] == COLOR for c in checks]))
            shape = float(np.mean([c["shape"] == s for c, s in zip(checks, wanted, strict=True)]))
            return color, shape

        pipe.set_progress_bar_config(disable=True)
        before = read(pipe)
        pipe.load_lora_weights(str(tmp), weight_name=f"{WORD}.safetensors")
        after = read(pipe)
    print(f"diffusers: '{WORD}' -> {COLOR}: colour/shape accuracy before {before}, with the LoRA {after}")


if __name__ == "__main__":
    if sys.argv[1:] == ["concept"]:
        sys.path.insert(0, str(ROOT / "examples"))
        concept_in_diffusers()
    else:
        ours()
        reference()
        sdxl_ours()
        sdxl_reference()
