"""Write tiny SD3 / SD3.5 fixtures with diffusers / transformers / sentencepiece.

Written to tests/fixtures/sd3/:

* ``transformer_sd3.safetensors`` + ``.json`` and ``sd3-diffusers/transformer``: tiny random
  ``SD3Transformer2DModel``s in the diffusers layout: ``sd3`` is diffusers' own SD3 pipeline test config (one block, patch 1) with a
  24-patch position table instead of 96 (the 96-patch table alone is 1.2 MB; cropping is exercised
  either way), ``sd35`` has three blocks, patch 2, SD3.5's RMS q/k norm and dual attention in blocks 0
  and 1. Their weights are also renamed to the original single-file layout by our rename, and
  diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` must give the diffusers state dict
  back exactly.
* ``sd3-diffusers/``: a tiny ``StableDiffusion3Pipeline`` saved by diffusers: the ``sd35`` transformer,
  CLIP-L-like and bigG-like ``CLIPTextModelWithProjection``s (the SDXL fixture's tokenizers), a tiny
  random ``T5EncoderModel`` (gated GELU, as T5-XXL v1.1) with the tiny SentencePiece tokenizer, a tiny
  16-channel ``AutoencoderKL`` without quant convs with SD3's scaling and shift factors, and
  ``FlowMatchEulerDiscreteScheduler(shift=3.0)``; ``pipeline.npz`` / ``pipeline.json``: its
  text-to-image runs (``output_type="np"``) from given latents, with and without T5, guided, with a
  negative prompt and a Turbo-like setting (guidance off, 2 steps), and its prompt embeddings.
* ``sd3-diffusers/tokenizer_3/spiece.model``: a tiny SentencePiece unigram model trained here (the tiny test repos' file cannot
  be downloaded), ``tokenizer_ids.json``: transformers' ``T5TokenizerFast`` ids of the tokenizer test
  corpus (tests/fixtures/tokenizer/reference_ids.json) from it.
* a check (nothing written): the tiny pipeline in the original single-file layout (``model.diffusion_model.``
  by our rename, ``first_stage_model.`` by our VAE rename, ``text_encoders.clip_l/clip_g/t5xxl.transformer.``)
  is read by diffusers' ``StableDiffusion3Pipeline.from_single_file`` into the same weights (CLIP-L's
  projection is the identity, which diffusers puts there; the folder's CLIP-L has it too).
* ``reference.npz``: inputs and reference outputs of each component, and
  ``FlowMatchEulerDiscreteScheduler`` trajectories (shift 3.0; dynamic shifting with a given mu).

Usage (dev only; needs torch, diffusers, transformers, sentencepiece): python tools/make_fixtures_sd3.py
"""

from __future__ import annotations

import io
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sentencepiece  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402

from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "sd3"

TRANSFORMERS = {
    # diffusers tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py, smaller table.
    "sd3": dict(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=24,
    ),
    "sd35": dict(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=4,
        num_attention_heads=4, caption_projection_dim=16, joint_attention_dim=48,
        pooled_projection_dim=40, out_channels=16, pos_embed_max_size=12,
        dual_attention_layers=(0, 1), qk_norm="rms_norm",
    ),
}  # fmt: skip
T5 = dict(
    d_model=48, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[4, 8], layers_per_block=1,
    latent_channels=16, norm_num_groups=2, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=1.5305, shift_factor=0.0609,
)  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Every parameter and buffer drawn afresh (diffusers zero-initialises the adaLN and output layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for b in model.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen) * scale)


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def transformers_fixtures(ref: dict) -> SD3Transformer2DModel:
    """Returns the "sd35" model, which the pipeline folder holds (the "sd3" one has its own file)."""
    rng = np.random.default_rng(0)
    for i, (name, cfg) in enumerate(TRANSFORMERS.items()):
        torch.manual_seed(i)
        model = SD3Transformer2DModel(**cfg).eval()
        _randomize(model, 10 + i)
        state = _state(model)
        if name == "sd3":
            save_file(state, str(OUT / f"transformer_{name}.safetensors"))
            (OUT / f"transformer_{name}.json").write_text(
                json.dumps(dict(model.config), indent=1, default=list)
            )
        # Our rename, checked against diffusers' own converter (original -> diffusers).
        original = convert_diffusers_mmdit(state, mmdit_config_from_diffusers(dict(model.config)))
        back = convert_sd3_transformer_checkpoint_to_diffusers(
            {
                f"model.diffusion_model.{k}": torch.from_numpy(np.ascontiguousarray(v))
                for k, v in original.items()
            }
        )
        assert set(back) == set(state), sorted(set(back) ^ set(state))
        for k, v in back.items():
            assert np.array_equal(v.numpy(), state[k]), k
        b, h, w = {"sd3": (2, 8, 6), "sd35": (2, 12, 8)}[name]  # non-square, smaller than the table
        latents = rng.standard_normal((b, cfg["in_channels"], h, w)).astype(np.float32)
        context = rng.standard_normal((b, 7, cfg["joint_attention_dim"])).astype(np.float32)
        pooled = rng.standard_normal((b, cfg["pooled_projection_dim"])).astype(np.float32)
        timesteps = np.array([999.0, 312.5], np.float32)
        with torch.no_grad():
            out = model(
                hidden_states=torch.from_numpy(latents),
                encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(pooled),
                timestep=torch.from_numpy(timesteps),
            ).sample.numpy()
            skip = model(
                hidden_states=torch.from_numpy(latents),
                encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(pooled),
                timestep=torch.from_numpy(timesteps),
                skip_layers=[0],
            ).sample.numpy()
        ref[f"{name}_latents"] = latents.transpose(0, 2, 3, 1)
        ref[f"{name}_context"] = context
        ref[f"{name}_pooled"] = pooled
        ref[f"{name}_timesteps"] = timesteps
        ref[f"{name}_out"] = out.transpose(0, 2, 3, 1)
        ref[f"{name}_out_skip0"] = skip.transpose(0, 2, 3, 1)
    return model


CORPUS_FILE = ROOT / "tests" / "fixtures" / "tokenizer" / "reference_ids.json"


def _corpus() -> list[str]:
    data = json.loads(CORPUS_FILE.read_text())
    return [c["text"] for c in data["cases"]]


def tokenizer_fixtures() -> None:
    corpus = _corpus()
    words = (
        "a photo of an astronaut riding a horse on the moon, highly detailed, sharp focus, oil painting "
        "of a castle in the mountains at sunset, trending on artstation, portrait of a cat wearing a hat, "
        "the quick brown fox jumps over the lazy dog, digital art, 4k, 8k, unreal engine, cinematic lighting"
    )
    sentences = [words] * 20 + corpus * 3
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=300,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
    )
    path = OUT / "spiece.model"
    path.write_bytes(model.getvalue())
    with tempfile.TemporaryDirectory() as folder:
        # From a folder, as a checkpoint's tokenizer_3/ is read: transformers 5 converts spiece.model
        # there (T5TokenizerFast(vocab_file=...) would not read it).
        shutil.copy(path, folder)
        tok = T5TokenizerFast.from_pretrained(folder, extra_ids=100)
    rows = []
    for text in corpus:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        padded = tok(text, padding="max_length", max_length=24, truncation=True, add_special_tokens=True)
        rows.append({"text": text, "ids": ids, "padded_24": padded["input_ids"]})
    (OUT / "tokenizer_ids.json").write_text(
        json.dumps({"vocab_size": len(tok), "cases": rows}, ensure_ascii=False, indent=0)
    )


def t5_fixtures(ref: dict) -> T5EncoderModel:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(OUT / "spiece.model"))
    vocab = sp.GetPieceSize() + 100
    torch.manual_seed(3)
    model = T5EncoderModel(T5Config(vocab_size=vocab, **T5)).eval()
    _randomize(model, 30)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, vocab, (2, 40)).astype(np.int64)  # 40 > max_distance: logarithmic buckets
    with torch.no_grad():
        ref["t5_ids"] = ids.astype(np.int32)
        ref["t5_out"] = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    return model


def vae_fixtures(ref: dict) -> AutoencoderKL:
    torch.manual_seed(4)
    vae = AutoencoderKL(**VAE).eval()
    _randomize(vae, 40)
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((1, 16, 4, 4)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(images)).latent_dist.mean.numpy()
        decoded = vae.decode(torch.from_numpy(latents)).sample.numpy()
    ref["vae_images"] = images.transpose(0, 2, 3, 1)
    ref["vae_mean"] = mean.transpose(0, 2, 3, 1)
    ref["vae_latents"] = latents.transpose(0, 2, 3, 1)
    ref["vae_decoded"] = decoded.transpose(0, 2, 3, 1)
    return vae


SCHEDULES = {
    "shift3": ({"shift": 3.0}, {}, 8),
    "shift1": ({}, {}, 5),
    "dynamic": ({"use_dynamic_shifting": True}, {"mu": 0.73}, 6),
}


def scheduler_fixtures(ref: dict) -> None:
    rng = np.random.default_rng(5)
    for name, (cfg, kwargs, steps) in SCHEDULES.items():
        sched = FlowMatchEulerDiscreteScheduler(**cfg)
        sched.set_timesteps(steps, **kwargs)
        x = torch.from_numpy(rng.standard_normal((1, 4, 3, 3)).astype(np.float32))
        outs = rng.standard_normal((steps, 1, 4, 3, 3)).astype(np.float32)
        ref[f"flow_{name}_x0"] = x.numpy().transpose(0, 2, 3, 1)
        ref[f"flow_{name}_outputs"] = outs.transpose(0, 1, 3, 4, 2)
        ref[f"flow_{name}_timesteps"] = sched.timesteps.numpy()
        traj = []
        for i, t in enumerate(sched.timesteps):
            x = sched.step(torch.from_numpy(outs[i]), t, x).prev_sample
            traj.append(x.numpy().transpose(0, 2, 3, 1))
        ref[f"flow_{name}_trajectory"] = np.stack(traj)
        # img2img's start (scale_noise at the first kept step of strength 0.6).
        sched.set_timesteps(steps, **kwargs)
        start = steps - min(int(steps * 0.6), steps)
        sched.set_begin_index(start)
        x0 = torch.from_numpy(rng.standard_normal((1, 4, 3, 3)).astype(np.float32))
        noise = torch.from_numpy(rng.standard_normal((1, 4, 3, 3)).astype(np.float32))
        noised = sched.scale_noise(x0, sched.timesteps[start : start + 1], noise)
        ref[f"flow_{name}_img2img"] = np.stack([t.numpy().transpose(0, 2, 3, 1) for t in (x0, noise, noised)])
    (OUT / "schedules.json").write_text(
        json.dumps({k: {"config": c, "kwargs": kw, "steps": s} for k, (c, kw, s) in SCHEDULES.items()})
    )


SDXL_FOLDER = ROOT / "tests" / "fixtures" / "sdxl" / "sdxl-diffusers"
CLIPS = {
    # CLIP-L-like (quick_gelu, pads with EOS) and bigG-like (gelu, pads with 0), both with projections
    # (SD3 pools through both); 16 + 24 = 40 wide, padded to T5's 48 in the context.
    "text_encoder": dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         projection_dim=16, hidden_act="quick_gelu"),
    "text_encoder_2": dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           projection_dim=24, hidden_act="gelu"),
}  # fmt: skip
PIPELINE_CASES = {
    # name: (prompt, negative prompt, guidance, steps, with T5)
    "t5": (["a photo of an astronaut", "oil painting of a castle"], None, 5.0, 4, True),
    "t5_negative": (["a cat wearing a hat"], ["blurry"], 7.0, 3, True),
    "no_t5": (["a photo of an astronaut", "oil painting of a castle"], None, 5.0, 4, False),
    "turbo": (["a cat wearing a hat"], None, 0.0, 2, True),
}


def pipeline_fixtures(models: dict) -> None:
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = OUT / "sd3-diffusers"
    encoders = {}
    for i, (name, cfg) in enumerate(CLIPS.items()):
        ref_cfg = json.loads((SDXL_FOLDER / name / "config.json").read_text())
        ids = {k: ref_cfg[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        torch.manual_seed(50 + i)
        encoders[name] = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **cfg)).eval()
    with torch.no_grad():
        # As SD3's CLIP-L: its projection is the identity (diffusers puts one there when it reads a single
        # file, which has none), so the folder and the single-file layout hold the same model.
        encoders["text_encoder"].text_projection.weight.copy_(torch.eye(16))
    tokenizers = {
        "tokenizer": CLIPTokenizer.from_pretrained(SDXL_FOLDER / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(SDXL_FOLDER / "tokenizer_2"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(OUT / "spiece.model", tmp)
        tokenizer_3 = T5TokenizerFast.from_pretrained(tmp, extra_ids=100)
    pipe = StableDiffusion3Pipeline(
        transformer=models["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=models["vae"],
        text_encoder=encoders["text_encoder"],
        tokenizer=tokenizers["tokenizer"],
        text_encoder_2=encoders["text_encoder_2"],
        tokenizer_2=tokenizers["tokenizer_2"],
        text_encoder_3=models["t5"],
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # Our reader takes the SentencePiece model from the folder, as the published repositories ship it.
    shutil.move(OUT / "spiece.model", folder / "tokenizer_3" / "spiece.model")
    for extra in (folder / "tokenizer_3").iterdir():
        if extra.name == "tokenizer.json":
            extra.unlink()  # 10x the spiece.model; ours never reads it
    ref = {}
    rng = np.random.default_rng(6)
    for name, (prompts, negatives, guidance, steps, with_t5) in PIPELINE_CASES.items():
        latents = rng.standard_normal((len(prompts), 16, 6, 4)).astype(np.float32)  # 12x8 pixels
        run = (
            pipe
            if with_t5
            else StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        )
        images = run(
            prompt=prompts,
            negative_prompt=negatives,
            guidance_scale=guidance,
            num_inference_steps=steps,
            height=12,
            width=8,
            latents=torch.from_numpy(latents),
            max_sequence_length=12,
            output_type="np",
        ).images
        ref[f"{name}_latents"] = latents.transpose(0, 2, 3, 1)
        ref[f"{name}_images"] = images.astype(np.float32)
        with torch.no_grad():
            embeds = run.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=12)  # fmt: skip
        ref[f"{name}_prompt_embeds"] = embeds[0].numpy()
        ref[f"{name}_pooled"] = embeds[2].numpy()
    # Skip-layer guidance (SD3.5 Medium's option) on the tiny transformer's middle block.
    latents = rng.standard_normal((1, 16, 6, 4)).astype(np.float32)
    images = pipe(prompt=["a cat wearing a hat"], guidance_scale=4.0, num_inference_steps=6, height=12, width=8,
                  latents=torch.from_numpy(latents), max_sequence_length=12, output_type="np",
                  skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1,
                  skip_layer_guidance_stop=0.7).images  # fmt: skip
    ref["slg_latents"] = latents.transpose(0, 2, 3, 1)
    ref["slg_images"] = images.astype(np.float32)
    check_single_file_layout(pipe, folder)
    img2img_fixtures(pipe, ref)
    inpaint_fixtures(pipe, ref)
    np.savez_compressed(OUT / "pipeline.npz", **ref)
    (OUT / "pipeline.json").write_text(
        json.dumps({**PIPELINE_CASES, **IMG2IMG_CASES, **INPAINT_CASES}, indent=1)
    )


def check_single_file_layout(pipe, folder: pathlib.Path) -> None:
    """The original single-file layout tests/test_sd3_pipeline.py writes (our renames, the prefixes of
    weights/sd3_single_file.py) is read back by diffusers' from_single_file into the same weights."""
    from diffusers import StableDiffusion3Pipeline

    from tf_diffusion.config import VAEConfig
    from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae

    vae_cfg = pipe.vae.config
    ours_vae = VAEConfig(
        latent_channels=vae_cfg.latent_channels, base_channels=vae_cfg.block_out_channels[0],
        channel_mult=tuple(c // vae_cfg.block_out_channels[0] for c in vae_cfg.block_out_channels),
        num_res_blocks=vae_cfg.layers_per_block, norm_groups=vae_cfg.norm_num_groups, use_quant_conv=False,
    )  # fmt: skip
    tensors = {}
    mm = convert_diffusers_mmdit(
        _state(pipe.transformer), mmdit_config_from_diffusers(dict(pipe.transformer.config))
    )
    tensors.update({f"model.diffusion_model.{k}": v for k, v in mm.items()})
    vae = convert_diffusers_vae(_state(pipe.vae), ours_vae)
    tensors.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    for name, prefix in (
        ("text_encoder", "clip_l"),
        ("text_encoder_2", "clip_g"),
        ("text_encoder_3", "t5xxl"),
    ):
        for k, v in _state(getattr(pipe, name)).items():
            # Single files hold no CLIP-L projection (the identity) and no tied T5 embedding copy.
            if k not in ("encoder.embed_tokens.weight", "text_projection.weight") or name == "text_encoder_2":
                tensors[f"text_encoders.{prefix}.transformer.{k}"] = v
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "sd3_tiny.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        loaded = StableDiffusion3Pipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True
        )
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        # diffusers leaves T5's tied embed_tokens copy unloaded (on the meta device); shared is compared.
        skip = {"encoder.embed_tokens.weight"}
        want = {k: v for k, v in _state(getattr(pipe, name)).items() if k not in skip}
        got = {k: v.detach().numpy() for k, v in getattr(loaded, name).state_dict().items() if k not in skip}
        assert set(want) == set(got), (name, sorted(set(want) ^ set(got))[:5])
        for k in want:
            assert np.array_equal(want[k], got[k]), (name, k)


IMG2IMG_CASES = {
    # name: (prompt, negative prompt, guidance, steps, with T5, strength, seed)
    "img2img": (["a photo of an astronaut", "oil painting of a castle"], None, 5.0, 5, True, 0.7, 11),
    "img2img_no_t5": (["a cat wearing a hat"], ["blurry"], 4.0, 4, False, 0.6, 3),
}


def img2img_fixtures(pipe, ref: dict) -> None:
    """StableDiffusion3Img2ImgPipeline with tf_diffusion's noise (posterior and latents) for the seeds."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    from make_fixtures_pipeline import NoiseQueues

    from tf_diffusion import noise as noise_lib

    yy, xx = np.mgrid[0:12, 0:8]
    image = np.stack([yy * 20, xx * 30, (yy + xx) * 12], axis=-1).astype(np.uint8)  # (12, 8, 3)
    ref["img2img_image"] = image
    for name, (prompts, negatives, guidance, steps, with_t5, strength, seed) in IMG2IMG_CASES.items():
        components = dict(pipe.components)
        if not with_t5:
            components.update(text_encoder_3=None, tokenizer_3=None)
        run = StableDiffusion3Img2ImgPipeline(**components)
        seeds = noise_lib.image_seeds(seed, len(prompts))
        latent = (6, 4, 16)
        with NoiseQueues() as queues:
            queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent))
            queues.queues["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
            images = run(
                prompt=prompts,
                negative_prompt=negatives,
                image=[Image.fromarray(image)] * len(prompts),
                height=12,
                width=8,
                strength=strength,
                guidance_scale=guidance,
                num_inference_steps=steps,
                max_sequence_length=12,
                output_type="np",
            ).images
        ref[f"{name}_images"] = images.astype(np.float32)


INPAINT_CASES = {
    # name: (prompt, negative prompt, guidance, steps, with T5, strength, seed)
    "inpaint": (["a photo of an astronaut", "oil painting of a castle"], None, 5.0, 5, True, 0.6, 21),
    "inpaint_full": (["a cat wearing a hat"], ["blurry"], 4.0, 3, False, 1.0, 4),
}


def inpaint_fixtures(pipe, ref: dict) -> None:
    """StableDiffusion3InpaintPipeline (16-channel transformer: the per-step blend) with tf_diffusion's noise."""
    from diffusers import StableDiffusion3InpaintPipeline
    from make_fixtures_pipeline import NoiseQueues  # tools/ is on sys.path (img2img_fixtures)
    from PIL import Image

    from tf_diffusion import noise as noise_lib

    mask = np.zeros((12, 8), np.uint8)
    mask[2:9, 1:6] = 255  # white repaints
    ref["inpaint_mask"] = mask
    for name, (prompts, negatives, guidance, steps, with_t5, strength, seed) in INPAINT_CASES.items():
        components = dict(pipe.components)
        if not with_t5:
            components.update(text_encoder_3=None, tokenizer_3=None)
        run = StableDiffusion3InpaintPipeline(**components)
        seeds = noise_lib.image_seeds(seed, len(prompts))
        latent = (6, 4, 16)
        with NoiseQueues() as queues:
            # The image's posterior, then the masked image's (diffusers encodes it; the 16-channel
            # transformer does not read it), and the latents' noise.
            queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent))
            queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, latent))
            queues.queues["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
            images = run(
                prompt=prompts,
                negative_prompt=negatives,
                image=[Image.fromarray(ref["img2img_image"])] * len(prompts),
                mask_image=[Image.fromarray(mask)] * len(prompts),
                height=12,
                width=8,
                strength=strength,
                guidance_scale=guidance,
                num_inference_steps=steps,
                max_sequence_length=12,
                output_type="latent",
            ).images
        # diffusers' SD3 inpaint pipeline decodes latents / scaling_factor without adding shift_factor
        # (its text-to-image and image-to-image pipelines add it); the latents are its loop's result, and
        # the images are decoded here as the other two SD3 pipelines decode.
        vae = run.vae
        with torch.no_grad():
            decoded = vae.decode(images / vae.config.scaling_factor + vae.config.shift_factor).sample
        ref[f"{name}_latents_out"] = images.numpy().transpose(0, 2, 3, 1)
        ref[f"{name}_images"] = run.image_processor.postprocess(decoded, output_type="np").astype(np.float32)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    ref: dict[str, np.ndarray] = {}
    models = {"transformer": transformers_fixtures(ref)}
    tokenizer_fixtures()
    models["t5"] = t5_fixtures(ref)
    models["vae"] = vae_fixtures(ref)
    scheduler_fixtures(ref)
    np.savez_compressed(OUT / "reference.npz", **ref)
    pipeline_fixtures(models)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
