"""Write tiny Flux.1 fixtures with diffusers / transformers (torch), for tests that never import torch.

Regenerate (dev only; needs the reference extra: torch, diffusers, transformers, accelerate):

    PYTHONPATH=. python tools/make_fixtures_flux.py

It replaces tests/fixtures/flux/ and reads tests/fixtures/sd3/sd3-diffusers (its CLIP tokenizer, tiny T5
and SentencePiece model). Every draw is seeded, so a rerun writes the same values. Written:

* ``transformer-diffusers-test/`` and ``transformer-guidance-2x2/``: tiny ``FluxTransformer2DModel``
  folders written by ``save_pretrained`` (diffusers layout, float32): diffusers' own test config (1 double
  + 1 single block, no guidance embedder) and a guidance-distilled one with 2 + 2 blocks, each with its
  q/k norm scales drawn away from ones.
* ``transformers.json``: per model, the original (Black Forest Labs) layout that our rename makes of the
  folder's weights, as a shape and SHA-256 per tensor; diffusers'
  ``convert_flux_transformer_checkpoint_to_diffusers`` took exactly that dict back to the folder's
  tensors (checked here, with its hard-coded 3072-wide split of ``linear1`` scaled to the tiny width),
  and the key names it produced; the ``weight_map`` of ``save_pretrained(max_shard_size="20KB")`` (the
  test cuts the folder's tensors into those shards); the model's config.
* ``transformers.npz``: fixed inputs and diffusers' outputs of both models; ``packing.npz``: latents and
  ``FluxPipeline._pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids`` of them.
* ``full_size.json``: parameter counts of the published FLUX.1-dev / -schnell transformer configs
  (built on the meta device).
* ``flux-dev/``: a tiny ``FluxPipeline`` folder (``save_pretrained``): a [dev]-like transformer (guidance
  embedder, in 64 channels, 8-wide heads), a 16-wide CLIP-L-like ``CLIPTextModel``, the SD3 fixture's tiny ``T5EncoderModel``
  and tokenizers (``tokenizer_2/spiece.model`` as the released repositories ship it; the fast tokenizer's
  ``tokenizer.json``, which ours never reads, is left out), a factor-8 16-channel VAE with Flux's scaling
  and shift, and FLUX.1-dev's scheduler config (dynamic shifting).
* ``flux-schnell/``: only what a [schnell]-like folder changes (``transformer/`` without guidance,
  ``scheduler/`` with a static shift of 1); the tests lay it over a copy of ``flux-dev/``, which keeps the
  fixtures small.
* ``pipeline.npz`` / ``pipeline.json``: for both folders, the prompt embeddings (T5 and pooled CLIP) and
  the float images (``output_type="np"``) of ``FluxPipeline`` from given latents,
  ``FluxImg2ImgPipeline`` and ``FluxInpaintPipeline`` (the latter two run with tf_diffusion.noise's draws
  for the seeds), the image and mask they read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402

from tf_diffusion.weights.flux import convert_diffusers_flux, flux_config_from_diffusers  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "flux"
SD3 = ROOT / "tests" / "fixtures" / "sd3" / "sd3-diffusers"

# diffusers' FluxTransformerTests config, and one with guidance and 2 + 2 blocks (16-wide heads: at 8 its
# mixed-bfloat16 error, diffusers' too, is 0.22 of the output's range).
TRANSFORMERS = {
    "diffusers-test": dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ),
    "guidance-2x2": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ),
}  # fmt: skip

# The published transformer/config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
PUBLISHED = {
    name: dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
               guidance_embeds=guidance, axes_dims_rope=[16, 56, 56])
    for name, guidance in (("flux1-dev", True), ("flux1-schnell", False))
}  # fmt: skip


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def digest(value: np.ndarray) -> list:
    """[shape, dtype, SHA-256 of the C-ordered bytes]: an exact fingerprint of a tensor."""
    value = np.ascontiguousarray(value)
    return [list(value.shape), str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()]


@contextlib.contextmanager
def _scaled_split():
    """diffusers' single-file converter with its full-size (3072) split of ``linear1`` scaled to the tensor.

    That split is the only thing it hard-codes for the released width; the sizes are scaled in the same
    (3 + mlp_ratio) units, which changes nothing else it computes.
    """
    real_split = torch.split

    def split(tensor, sizes, dim=0):
        if isinstance(sizes, (tuple, list)) and sum(sizes) != tensor.shape[dim]:
            unit = tensor.shape[dim] // (sum(sizes) // sizes[0])
            sizes = [s // sizes[0] * unit for s in sizes]
        return real_split(tensor, sizes, dim)

    shim = type("TorchWithScaledSplit", (), {"__getattr__": lambda self, name: getattr(torch, name)})()
    shim.split = split
    saved = single_file_utils.torch
    single_file_utils.torch = shim
    try:
        yield
    finally:
        single_file_utils.torch = saved


def _reference_model(name: str) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TRANSFORMERS[name]).eval()
    with torch.no_grad():
        # The q/k norm scales start at ones; random ones check that each lands on its stream.
        for key, p in model.named_parameters():
            if "norm_" in key:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def _inputs(model: FluxTransformer2DModel, seed: int = 1) -> dict[str, np.ndarray]:
    cfg = model.config
    rng = np.random.default_rng(seed)
    b, t = 2, 5
    img_ids = FluxPipeline._prepare_latent_image_ids(b, 2, 3, "cpu", torch.float32).numpy()
    img_ids[:, 0] = 1.0  # a non-zero first axis, so every rotary axis is exercised
    x = dict(
        img=rng.standard_normal((b, 6, cfg.in_channels)).astype(np.float32),
        img_ids=img_ids,
        txt=rng.standard_normal((b, t, cfg.joint_attention_dim)).astype(np.float32),
        # Text ids are zeros in the pipeline; any ids work.
        txt_ids=rng.integers(0, 4, (t, 3)).astype(np.float32),
        timesteps=np.array([0.3, 0.9], np.float32),
        y=rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32),
    )
    if cfg.guidance_embeds:
        x["guidance"] = np.array([3.5, 1.25], np.float32)
    return x


def _run(model: FluxTransformer2DModel, x: dict[str, np.ndarray], scale: float | None = None) -> np.ndarray:
    """diffusers' transformer on the inputs ``x``; ``scale`` is the LoRA scale (peft adapters attached)."""
    with torch.no_grad():
        return model(
            hidden_states=torch.from_numpy(x["img"]),
            encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["y"]),
            timestep=torch.from_numpy(x["timesteps"]),
            img_ids=torch.from_numpy(x["img_ids"]),
            txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=torch.from_numpy(x["guidance"]) if "guidance" in x else None,
            joint_attention_kwargs=None if scale is None else {"scale": scale},
            return_dict=False,
        )[0].numpy()


def transformer_fixtures() -> None:
    meta, arrays = {}, {}
    for name in TRANSFORMERS:
        model = _reference_model(name)
        model.save_pretrained(OUT / f"transformer-{name}", safe_serialization=True)
        state = _state(model)
        original = convert_diffusers_flux(state, flux_config_from_diffusers(dict(model.config)))
        with _scaled_split():
            checkpoint = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()}
            back = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
        assert sorted(back) == sorted(state), sorted(set(back) ^ set(state))
        for key, value in back.items():
            assert np.array_equal(value.numpy(), state[key]), key
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="20KB")
            index = json.loads(
                (pathlib.Path(tmp) / "diffusion_pytorch_model.safetensors.index.json").read_text()
            )
        assert len(set(index["weight_map"].values())) > 1
        meta[name] = dict(
            config=TRANSFORMERS[name],
            original={k: digest(v) for k, v in sorted(original.items())},
            converter_keys=sorted(back),
            shards=index,
        )
        x = _inputs(model)
        arrays.update({f"{name}/{k}": v for k, v in x.items()})
        arrays[f"{name}/out"] = _run(model, x)
    (OUT / "transformers.json").write_text(json.dumps(meta, indent=0))
    np.savez_compressed(OUT / "transformers.npz", **arrays)


def packing_fixtures() -> None:
    rng = np.random.default_rng(0)
    b, c, h, w = 2, 16, 6, 10
    nchw = rng.standard_normal((b, c, h, w)).astype(np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(nchw), b, c, h, w)
    # diffusers unpacks from the image size: 8x the latent's.
    unpacked = FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8).numpy()
    assert np.array_equal(unpacked, nchw)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.savez_compressed(OUT / "packing.npz", nchw=nchw, packed=packed.numpy(), unpacked=unpacked, ids=ids)


def full_size_fixtures() -> None:
    from accelerate import init_empty_weights

    counts = {}
    for name, config in PUBLISHED.items():
        with init_empty_weights():
            reference = FluxTransformer2DModel(**config)
        counts[name] = dict(config=config, parameters=sum(p.numel() for p in reference.parameters()))
    (OUT / "full_size.json").write_text(json.dumps(counts, indent=1))


# The pipelines: text-to-image from given latents, image-to-image and inpainting from seeds.
HEIGHT, WIDTH, MAX_LEN = 32, 48, 16
PROMPTS = ["a photo of a cat", "a red bicycle by the sea"]
CASES = {
    "txt2img": dict(steps=3, latents_seed=3),
    "img2img": dict(steps=4, strength=0.7, seed=11),
    "inpaint": dict(steps=4, strength=0.8, seed=21),
}
GUIDANCE = {"dev": 3.5, "schnell": 0.0}


def _pipeline(dev: bool, shared: dict) -> FluxPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0 if dev else 1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=16, guidance_embeds=dev,
        axes_dims_rope=[2, 2, 4],
    ).eval()  # fmt: skip
    if dev:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, transformer=transformer, **shared)


def _shared_components() -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(2)
    clip = CLIPTextModel(
        CLIPTextConfig(bos_token_id=1112, eos_token_id=1113, pad_token_id=1113, hidden_size=16,
                       intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, vocab_size=1114,
                       hidden_act="quick_gelu", projection_dim=16)
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4, 4, 4, 4], layers_per_block=1,
        norm_num_groups=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()  # fmt: skip
    return dict(
        vae=vae,
        text_encoder=clip,
        tokenizer=CLIPTokenizer.from_pretrained(SD3 / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(SD3 / "text_encoder_3").eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(SD3 / "tokenizer_3", extra_ids=100),
    )


def _save(pipe: FluxPipeline, folder: pathlib.Path, parts: tuple[str, ...] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        tmp = pathlib.Path(tmp)
        # The released repositories ship tokenizer_2/spiece.model, which ours reads; tokenizer.json is
        # 10x its size and ours never reads it.
        shutil.copy(SD3 / "tokenizer_3" / "spiece.model", tmp / "tokenizer_2" / "spiece.model")
        (tmp / "tokenizer_2" / "tokenizer.json").unlink(missing_ok=True)
        folder.mkdir(parents=True)
        for part in parts or sorted(p.name for p in tmp.iterdir()):
            source = tmp / part
            if source.is_dir():
                shutil.copytree(source, folder / part)
            else:
                shutil.copy(source, folder / part)


def _image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([yy * 7, xx * 5, (yy + xx) * 3], axis=-1).astype(np.uint8)  # (32, 48, 3)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[8:24, 16:40] = 255  # white repaints
    return image, mask


def _pipeline_references(pipe: FluxPipeline, guidance: float, image, mask) -> dict[str, np.ndarray]:
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
    from make_fixtures_pipeline import NoiseQueues
    from PIL import Image

    from tf_diffusion import noise as noise_lib

    ref = {}
    latent = (HEIGHT // 8, WIDTH // 8, 16)
    common = dict(
        height=HEIGHT, width=WIDTH, guidance_scale=guidance, max_sequence_length=MAX_LEN, output_type="np"
    )
    with torch.no_grad():
        t5, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MAX_LEN)
        ref["prompt_embeds"], ref["pooled"] = t5.numpy(), pooled.numpy()
        case = CASES["txt2img"]
        latents = np.random.default_rng(case["latents_seed"]).standard_normal((len(PROMPTS), *latent))
        latents = latents.astype(np.float32)  # NHWC, as tf_diffusion takes them
        nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
        packed = pipe._pack_latents(nchw, *nchw.shape)
        ref["txt2img_latents"] = latents
        ref["txt2img_images"] = pipe(
            PROMPTS, num_inference_steps=case["steps"], latents=packed, **common
        ).images
        pil_image = [Image.fromarray(image)] * len(PROMPTS)
        for name, runner in (("img2img", FluxImg2ImgPipeline), ("inpaint", FluxInpaintPipeline)):
            case = CASES[name]
            seeds = noise_lib.image_seeds(case["seed"], len(PROMPTS))
            extra = {} if name == "img2img" else {"mask_image": [Image.fromarray(mask)] * len(PROMPTS)}
            with NoiseQueues() as queues:
                queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent))
                if name == "inpaint":
                    # diffusers also encodes the masked image (this transformer does not read it).
                    queues.queues["vae"].append(
                        noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, latent)
                    )
                queues.queues["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
                ref[f"{name}_images"] = runner(**pipe.components)(
                    PROMPTS, image=pil_image, strength=case["strength"], num_inference_steps=case["steps"],
                    **extra, **common,
                ).images  # fmt: skip
    return {k: np.asarray(v, np.float32) for k, v in ref.items()}


def pipeline_fixtures() -> None:
    shared = _shared_components()
    image, mask = _image_and_mask()
    arrays = {"image": image, "mask": mask}
    for variant, guidance in GUIDANCE.items():
        pipe = _pipeline(variant == "dev", shared)
        if variant == "dev":
            _save(pipe, OUT / "flux-dev")
        else:
            _save(pipe, OUT / "flux-schnell", parts=("transformer", "scheduler"))
        ref = _pipeline_references(pipe, guidance, image, mask)
        arrays.update({f"{variant}/{k}": v for k, v in ref.items()})
    np.savez_compressed(OUT / "pipeline.npz", **arrays)
    meta = dict(prompts=PROMPTS, height=HEIGHT, width=WIDTH, max_sequence_length=MAX_LEN, guidance=GUIDANCE)
    (OUT / "pipeline.json").write_text(json.dumps({**meta, "cases": CASES}, indent=1))


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    transformer_fixtures()
    packing_fixtures()
    full_size_fixtures()
    pipeline_fixtures()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
