"""Write tiny Stable Diffusion checkpoints in every format we read, with the reference libraries.

Three tiny model families (SD 1.x-like, SD 2.x-like with an OpenCLIP-style text encoder,
9-channel inpainting) get random weights from ``tf_diffusion.testing.random_state_dict``,
rounded so every value is exact in float16 *and* bfloat16: the float32, float16 and bfloat16
files below then hold identical numbers, and one set of reference outputs serves them all.

Written to tests/fixtures/checkpoints/:

* ``sd1-diffusers/``: diffusers ``save_pretrained`` (safetensors, float32) plus the fp16
  variant (``*.fp16.safetensors``) in the same folder, tokenizer and PNDM scheduler.
* ``sd2-diffusers/``: the SD 2.x-like pipeline as diffusers ``save_pretrained(safe_serialization=False)``
  writes it (torch pickles ``diffusion_pytorch_model.bin``; ``text_encoder/pytorch_model.bin``
  as transformers 4 wrote it), float16, v-prediction scheduler.
* ``sd1.safetensors``: original single-file layout (float16, EMA-only "pruned" style,
  with the position-id buffer real SD 1.x files carry).
* ``sd1-full.ckpt``: ``torch.save`` of an LDM training checkpoint: ``{"state_dict", "global_step",
  "epoch"}`` (float16, to stay small) with both UNet weight sets (``model_ema.*`` flattened keys holding the
  EMA UNet) and schedule buffers.
* ``sd1-inpainting.safetensors``: original layout, 9-channel UNet, float16.
* ``sd2.safetensors``: original layout with the OpenCLIP text tower (fused ``in_proj``,
  ``ln_1``/``mlp.c_fc``..., one extra last layer that SD 2.x does not run, ``text_projection``,
  ``logit_scale``), bfloat16.
* ``reference.npz``: inputs and the reference (diffusers / transformers, float32) outputs.

Each single file is checked here by loading it back with diffusers' own single-file loader
(``from_single_file`` with the matching diffusers folder as ``config``; the EMA weights with
diffusers' ``extract_ema`` conversion) and comparing its outputs with the reference.

Usage (dev only): pip install -e ".[reference]" && python tools/make_fixtures_checkpoints.py
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile

import ml_dtypes
import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402
from transformers import CLIPTokenizer as TorchCLIPTokenizer  # noqa: E402

from tf_diffusion.config import TokenizerConfig  # noqa: E402
from tf_diffusion.testing import random_state_dict  # noqa: E402
from tf_diffusion.tokenizer import CLIPTokenizer  # noqa: E402
from tf_diffusion.weights.diffusers_configs import vae_config_from_diffusers  # noqa: E402
from tf_diffusion.weights.diffusers_unet import (  # noqa: E402
    convert_diffusers_unet_state_dict,
    unet_config_from_diffusers,
)
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae  # noqa: E402
from tf_diffusion.weights.safetensors_io import save_safetensors  # noqa: E402
from tf_diffusion.weights.single_file import ema_key, to_single_file  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "checkpoints"
SMALL_VOCAB = ROOT / "tests" / "fixtures" / "tokenizer" / "small_sd2"

UNET1 = dict(
    block_out_channels=[8, 16],
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)
# SD 2.x style: linear projections, 4-wide heads (2 and 4 per level), 24-wide context.
UNET2 = dict(UNET1, cross_attention_dim=24, attention_head_dim=[2, 4], use_linear_projection=True)
VAE = dict(
    block_out_channels=[8, 16],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=1,
    sample_size=16,
)
CLIP1 = dict(
    vocab_size=1114,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=1112,
    eos_token_id=1113,
    pad_token_id=1113,
)
CLIP2 = dict(CLIP1, hidden_size=24, intermediate_size=32, num_attention_heads=3, hidden_act="gelu")
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    skip_prk_steps=True,
)
SEEDS = {
    "sd1/text_encoder": 11,
    "sd1/unet": 12,
    "sd1/vae": 13,
    "sd1/unet_ema": 14,
    "sd1/unet_inpaint": 15,
    "sd2/text_encoder": 21,
    "sd2/unet": 22,
    "sd2/vae": 23,
    "sd2/openclip_last": 24,
}
PROMPTS = ["a photo of a cat", "a red car on the street at night"]
TIMESTEPS = [10.0, 500.0]


def dual_exact(array: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and flush values below float16's normal range: then exact in float16 too."""
    out = array.astype(ml_dtypes.bfloat16).astype(np.float32)
    out[np.abs(out) < 2.0**-14] = 0.0
    if not np.array_equal(out.astype(np.float16).astype(np.float32), out):
        raise RuntimeError("a value is not exact in float16")
    return out


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if "position_ids" not in k}
    tensors = {k: torch.from_numpy(dual_exact(v)) for k, v in random_state_dict(shapes, seed).items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"weights do not fit: {missing} {unexpected}")
    return module.eval()


def tokenizer(pad_token_id: int) -> CLIPTokenizer:
    small = CLIPTokenizer.from_pretrained_folder(SMALL_VOCAB)
    config = TokenizerConfig(max_length=77, bos_token_id=1112, eos_token_id=1113, pad_token_id=pad_token_id)
    return CLIPTokenizer(config, vocab=small.vocab, merges=small.merges)


def torch_tokenizer(folder: pathlib.Path) -> TorchCLIPTokenizer:
    return TorchCLIPTokenizer.from_pretrained(str(folder))


def build_family(family: str, unet_cfg: dict, clip_cfg: dict, pad: int, tmp: pathlib.Path):
    """(pipeline, our tokenizer) with seeded weights."""
    text_encoder = seeded(CLIPTextModel(CLIPTextConfig(**clip_cfg)), SEEDS[f"{family}/text_encoder"])
    unet = seeded(UNet2DConditionModel(**unet_cfg), SEEDS[f"{family}/unet"])
    vae = seeded(AutoencoderKL(**VAE), SEEDS[f"{family}/vae"])
    ours = tokenizer(pad)
    ours.save(tmp / f"{family}-tokenizer")
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=torch_tokenizer(tmp / f"{family}-tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_config({**SCHEDULER, "prediction_type": prediction}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, ours


@torch.no_grad()
def outputs(
    pipe, ids: np.ndarray, x: np.ndarray, context_seed: int, image: np.ndarray, latents: np.ndarray
) -> dict:
    """Reference outputs of every component (NHWC where spatial)."""
    text = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    rng = np.random.default_rng(context_seed)
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    unet = pipe.unet(
        torch.from_numpy(np.transpose(x, (0, 3, 1, 2))), torch.tensor(TIMESTEPS), torch.from_numpy(context)
    ).sample.numpy()
    posterior = pipe.vae.encode(torch.from_numpy(np.transpose(image, (0, 3, 1, 2)))).latent_dist
    decoded = pipe.vae.decode(torch.from_numpy(np.transpose(latents, (0, 3, 1, 2)))).sample.numpy()
    return {
        "text": text,
        "context": context,
        "unet": np.transpose(unet, (0, 2, 3, 1)),
        "vae_mean": np.transpose(posterior.mean.numpy(), (0, 2, 3, 1)),
        "vae_decoded": np.transpose(decoded, (0, 2, 3, 1)),
    }


def original_layout(pipe, config) -> dict:
    """The pipeline as an original single-file state dict (numpy), through our writer."""
    unet_cfg = unet_config_from_diffusers(dict(pipe.unet.config))
    vae_cfg = vae_config_from_diffusers(dict(pipe.vae.config))
    np_state = {
        name: {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()} for name in ("unet", "vae")
    }
    text = {
        ("text_model." + k if not k.startswith("text_model.") else k): v.numpy()
        for k, v in pipe.text_encoder.state_dict().items()
        if "position_ids" not in k
    }
    components = {
        "text_encoder": text,
        "unet": convert_diffusers_unet_state_dict(np_state["unet"], unet_cfg),
        "vae": {k: np.asarray(v) for k, v in convert_diffusers_vae(np_state["vae"], vae_cfg).items()},
    }
    return to_single_file(components, config)


def check_close(name: str, got: np.ndarray, want: np.ndarray, tol: float = 1e-6) -> None:
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    print(f"  {name}: max abs err {err:.1e}")
    if err > tol:
        raise RuntimeError(f"{name}: diffusers' single-file load differs from the reference by {err}")


def verify_single_file(
    path: pathlib.Path, config_folder: pathlib.Path, want: dict, inputs: dict, cls
) -> None:
    """Load a single file with diffusers' own loader and compare every component with the reference."""
    pipe = cls.from_single_file(
        str(path),
        config=str(config_folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    got = outputs(
        pipe, inputs["ids"], inputs["x"], inputs["context_seed"], inputs["image"], inputs["latents"]
    )
    for key in ("text", "unet", "vae_mean", "vae_decoded"):
        check_close(f"{path.name} {key}", got[key], want[key])


def verify_folder(folder: pathlib.Path, want: dict, inputs: dict, variant: str | None = None) -> None:
    """Load a diffusers folder with diffusers itself and compare every component with the reference."""
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), variant=variant, torch_dtype=torch.float32, local_files_only=True
    )
    got = outputs(
        pipe, inputs["ids"], inputs["x"], inputs["context_seed"], inputs["image"], inputs["latents"]
    )
    for key in ("text", "unet", "vae_mean", "vae_decoded"):
        check_close(f"{folder.name} ({variant or 'main'}) {key}", got[key], want[key])


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    reference: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        sd1, tok1 = build_family("sd1", UNET1, CLIP1, 1113, tmp)
        sd2, tok2 = build_family("sd2", UNET2, CLIP2, 0, tmp)
        ids = tok1(PROMPTS)
        inputs = {
            "ids": ids,
            "x": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
            "x9": rng.standard_normal((2, 8, 8, 9)).astype(np.float32),
            "image": rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32),
            "latents": rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
            "context_seed": 7,
        }
        reference.update({k: np.asarray(v) for k, v in inputs.items()})
        reference["ids_sd2"] = tok2(PROMPTS)
        for family, pipe in (("sd1", sd1), ("sd2", sd2)):
            family_ids = reference["ids_sd2"] if family == "sd2" else ids
            ref = outputs(pipe, family_ids, inputs["x"], 7, inputs["image"], inputs["latents"])
            reference.update({f"{family}/{k}": v for k, v in ref.items()})

        # diffusers folders, written by diffusers itself.
        sd1.save_pretrained(OUT / "sd1-diffusers")
        sd1.to(torch.float16).save_pretrained(OUT / "sd1-diffusers", variant="fp16")
        sd1.to(torch.float32)
        sd2.to(torch.float16).save_pretrained(OUT / "sd2-diffusers", safe_serialization=False)
        # transformers 5 writes model.safetensors regardless; write the pytorch_model.bin that
        # transformers 4 wrote (and the hub's SD repositories hold), keys under `text_model.`.
        text_state = {
            "text_model." + k.removeprefix("text_model."): v for k, v in sd2.text_encoder.state_dict().items()
        }
        (OUT / "sd2-diffusers" / "text_encoder" / "model.safetensors").unlink()
        torch.save(text_state, OUT / "sd2-diffusers" / "text_encoder" / "pytorch_model.bin")
        sd2.to(torch.float32)
        for folder in ("sd1-diffusers", "sd2-diffusers"):
            # transformers 5 saves only the fast tokenizer's tokenizer.json (50 kB); write the
            # vocab.json / merges.txt pair that the hub's SD repositories hold instead.
            shutil.rmtree(OUT / folder / "tokenizer")
            (tok2 if folder.startswith("sd2") else tok1).save(OUT / folder / "tokenizer")

        from tf_diffusion.weights.diffusers_folder import read_diffusers_config

        config1 = read_diffusers_config(OUT / "sd1-diffusers")[0]
        config2 = read_diffusers_config(OUT / "sd2-diffusers")[0]

        # SD 1.x single file, EMA-only style, float16, with the position-id buffer.
        state1 = original_layout(sd1, config1)
        pruned = {k: np.asarray(v).astype(np.float16) for k, v in state1.items()}
        pruned["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(
            77, dtype=np.int64
        )[None]
        save_safetensors(pruned, OUT / "sd1.safetensors", {"format": "pt"})

        # SD 1.x full training checkpoint: torch.save, both UNets, schedule buffers; float16 to keep
        # the fixture small (float32 pickles are covered by sd1-diffusers-bin).
        ema_unet = seeded(UNet2DConditionModel(**UNET1), SEEDS["sd1/unet_ema"])
        ema_pipe = StableDiffusionPipeline(**{**sd1.components, "unet": ema_unet})
        ema_ref = outputs(ema_pipe, ids, inputs["x"], 7, inputs["image"], inputs["latents"])
        reference["sd1/unet_ema"] = ema_ref["unet"]
        ema_state = original_layout(ema_pipe, config1)
        full = {k: torch.from_numpy(np.array(np.asarray(v), dtype=np.float16)) for k, v in state1.items()}
        for key in [k for k in state1 if k.startswith("model.diffusion_model.")]:
            unet_key = key[len("model.diffusion_model.") :]
            full[ema_key(unet_key)] = torch.from_numpy(np.array(ema_state[key], dtype=np.float16))
        full["model_ema.decay"] = torch.tensor(0.9999)
        full["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        full["betas"] = betas.half()
        full["alphas_cumprod"] = torch.cumprod(1 - betas, 0).half()
        torch.save({"state_dict": full, "global_step": 1000, "epoch": 3}, OUT / "sd1-full.ckpt")

        # Inpainting: 9-channel UNet, SD 1.x text encoder and VAE.
        unet9 = seeded(UNet2DConditionModel(**dict(UNET1, in_channels=9)), SEEDS["sd1/unet_inpaint"])
        inpaint = StableDiffusionInpaintPipeline(**{**sd1.components, "unet": unet9})
        inputs9 = dict(inputs, x=inputs["x9"])
        reference["sd1-inpainting/unet"] = outputs(
            inpaint, ids, inputs["x9"], 7, inputs["image"], inputs["latents"]
        )["unet"]
        config9 = config1.replace(unet=unet_config_from_diffusers(dict(unet9.config)))
        state9 = {k: np.asarray(v).astype(np.float16) for k, v in original_layout(inpaint, config9).items()}
        save_safetensors(state9, OUT / "sd1-inpainting.safetensors", {"format": "pt"})

        # SD 2.x: OpenCLIP layout with an extra (unused) last layer, bfloat16.
        state2 = dict(original_layout(sd2, config2))
        last = f"cond_stage_model.model.transformer.resblocks.{CLIP2['num_hidden_layers']}."
        tail_shapes = {k: np.asarray(v).shape for k, v in state2.items() if k.startswith(last)}
        tail = random_state_dict(tail_shapes, SEEDS["sd2/openclip_last"])
        state2.update({k: dual_exact(v) for k, v in tail.items()})
        proj = "cond_stage_model.model.text_projection"
        state2[proj] = dual_exact(random_state_dict({proj: (24, 24)}, 25)[proj])
        state2 = {k: np.asarray(v, dtype=np.float32).astype(ml_dtypes.bfloat16) for k, v in state2.items()}
        save_safetensors(state2, OUT / "sd2.safetensors", {"format": "pt"})

        # Check every single file with diffusers' own single-file loader.
        print("diffusers from_single_file:")
        want1 = {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith("sd1/")}
        verify_single_file(
            OUT / "sd1.safetensors", OUT / "sd1-diffusers", want1, inputs, StableDiffusionPipeline
        )
        verify_single_file(
            OUT / "sd1-full.ckpt", OUT / "sd1-diffusers", want1, inputs, StableDiffusionPipeline
        )
        inpaint.save_pretrained(tmp / "inpaint-config")
        tok1.save(tmp / "inpaint-config" / "tokenizer")
        want9 = dict(want1, unet=reference["sd1-inpainting/unet"])
        verify_single_file(
            OUT / "sd1-inpainting.safetensors",
            tmp / "inpaint-config",
            want9,
            inputs9,
            StableDiffusionInpaintPipeline,
        )
        want2 = {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith("sd2/")}
        verify_single_file(
            OUT / "sd2.safetensors",
            OUT / "sd2-diffusers",
            want2,
            dict(inputs, ids=reference["ids_sd2"]),
            StableDiffusionPipeline,
        )
        print("diffusers from_pretrained:")
        verify_folder(OUT / "sd1-diffusers", want1, inputs)
        verify_folder(OUT / "sd1-diffusers", want1, inputs, variant="fp16")
        verify_folder(OUT / "sd2-diffusers", want2, dict(inputs, ids=reference["ids_sd2"]))
        # The EMA UNet, extracted by diffusers' own conversion.
        full_state = torch.load(OUT / "sd1-full.ckpt", weights_only=True)["state_dict"]
        converted = convert_ldm_unet_checkpoint(full_state, dict(ema_unet.config), extract_ema=True)
        check_unet = UNet2DConditionModel(**UNET1)
        check_unet.load_state_dict(converted)
        ema_check = StableDiffusionPipeline(**{**sd1.components, "unet": check_unet.eval()})
        got = outputs(ema_check, ids, inputs["x"], 7, inputs["image"], inputs["latents"])["unet"]
        check_close("sd1-full.ckpt EMA unet (extract_ema)", got, reference["sd1/unet_ema"])

        # tf_diffusion's writers: diffusers must load what they write.
        from tf_diffusion.weights.loading import load_pipeline_weights, save

        print("tf_diffusion writers, read back by diffusers:")
        cases = [
            ("sd1.safetensors", OUT / "sd1-diffusers", want1, inputs),
            ("sd2.safetensors", OUT / "sd2-diffusers", want2, dict(inputs, ids=reference["ids_sd2"])),
        ]
        for name, config_folder, want, family_inputs in cases:
            with load_pipeline_weights(OUT / name, config=str(config_folder)) as weights:
                save(weights, tmp / f"ours-{name}-diffusers", format="diffusers")
                save(weights, tmp / f"ours-{name}", format="single-file")
            verify_folder(tmp / f"ours-{name}-diffusers", want, family_inputs)
            verify_single_file(
                tmp / f"ours-{name}", config_folder, want, family_inputs, StableDiffusionPipeline
            )
        with load_pipeline_weights(OUT / "sd2-diffusers") as weights:
            # From a diffusers folder the OpenCLIP tail is written as placeholders.
            save(weights, tmp / "ours-sd2-from-diffusers.safetensors", format="single-file")
        verify_single_file(
            tmp / "ours-sd2-from-diffusers.safetensors",
            OUT / "sd2-diffusers",
            want2,
            dict(inputs, ids=reference["ids_sd2"]),
            StableDiffusionPipeline,
        )

    meta = dict(
        unet_sd1=UNET1,
        unet_sd2=UNET2,
        vae=VAE,
        clip_sd1=CLIP1,
        clip_sd2=CLIP2,
        seeds=SEEDS,
        prompts=PROMPTS,
        timesteps=TIMESTEPS,
    )
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(OUT / "reference.npz", **reference)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
