"""End-to-end parity fixtures: diffusers' Stable Diffusion pipelines on tiny random components.

For txt2img, img2img and inpainting (4- and 9-channel UNets), four samplers and
both prediction types, this runs diffusers' pipelines with weights drawn by
``tf_diffusion.testing.random_state_dict`` (so the test rebuilds the same
weights without storing them) and with every random draw replaced by the arrays
tf_diffusion's noise gives for the same seed (``tf_diffusion.noise``: image b has
seed + b and a stream per use; see ``StableDiffusion.generate``). The init image
and mask are handed over once per output image, so diffusers samples each image's
VAE posterior with that image's own noise, as tf_diffusion does. It writes the float images diffusers
returns (output_type="np", values in [0, 1]) to tests/fixtures/pipeline/.

With ``--folders`` it writes only the folder-scheduler fixtures: the txt2img pipeline saved with
diffusers' ``save_pretrained`` under each of a few schedulers, loaded back with
``StableDiffusionPipeline.from_pretrained(folder)`` (so diffusers picks the scheduler from the
folder, as a user's call does) and run on given latents; the scheduler_config.json and
model_index.json scheduler entry diffusers wrote are stored with the images
(tests/fixtures/pipeline/folder_schedulers.json / .npz, read by tests/test_folder_scheduler.py).

With ``--resize`` it writes only tests/fixtures/pipeline/resize_latents.npz (read by
tests/test_masked_content.py): the web UI's "Just resize (latent upscale)" reference, random NHWC
latents and ``torch.nn.functional.interpolate(mode="bilinear")`` of them to a larger and a smaller size.

Usage (dev only): pip install -e ".[reference]" && python tools/make_fixtures_pipeline.py [--folders | --resize]
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tf_diffusion import noise as noise_lib
from tf_diffusion.noise import NoiseSource
from tf_diffusion.testing import random_state_dict
from tf_diffusion.tokenizer import CLIPTokenizer as OurTokenizer

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pipeline"

UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)
VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
    norm_num_groups=32,
    layers_per_block=1,
)
CLIP = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
)
# Stable Diffusion 1.5's scheduler_config.json, which diffusers users build every sampler from.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    skip_prk_steps=True,
    timestep_spacing="leading",
)
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
    ),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
}
STOCHASTIC = {"euler_a"}
WEIGHT_SEEDS = {"text_encoder": 1, "vae": 2, "unet": 3, "unet_inpaint": 4}
SIZE, STEPS = 32, 4
PROMPTS = ["a red circle", "a blue star on a white background"]
NEGATIVE = ["", "blurry"]


SHAPES: dict[int, dict[str, list[int]]] = {}


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if "position_ids" not in k}
    SHAPES[seed] = {k: list(v) for k, v in shapes.items()}
    tensors = random_state_dict(shapes, seed)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    return module.eval()


def test_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def test_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[6:22, 10:28] = 255
    return mask


class NoiseQueues:
    """Replaces diffusers' randn_tensor, per calling module, by queued NumPy draws (NHWC -> NCHW)."""

    def __init__(self):
        self.queues: dict[str, list[np.ndarray]] = {"pipeline": [], "vae": [], "scheduler": []}
        self.patched = []

    def _fake(self, kind):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            queue = self.queues[kind]
            if not queue:
                raise RuntimeError(f"diffusers drew more {kind} noise than tf_diffusion does")
            array = queue.pop(0)
            tensor = torch.from_numpy(np.ascontiguousarray(np.transpose(array, (0, 3, 1, 2))))
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{kind} noise shape {tuple(tensor.shape)} != diffusers' {tuple(shape)}")
            return tensor.to(dtype=dtype or torch.float32)

        return randn_tensor

    def __enter__(self):
        for name, module in list(sys.modules.items()):
            if not name.startswith("diffusers.") or not hasattr(module, "randn_tensor"):
                continue
            if ".pipelines." in name:
                kind = "pipeline"
            elif ".autoencoders." in name:
                kind = "vae"
            elif ".schedulers." in name:
                kind = "scheduler"
            else:
                continue
            self.patched.append((module, module.randn_tensor))
            module.randn_tensor = self._fake(kind)
        return self

    def __exit__(self, *exc):
        for module, original in self.patched:
            module.randn_tensor = original
        leftover = {k: len(v) for k, v in self.queues.items() if v}
        if leftover and exc[0] is None:
            raise RuntimeError(f"tf_diffusion draws noise that diffusers did not use: {leftover}")


def build_components(tmp: pathlib.Path):
    OurTokenizer().save(tmp / "tokenizer")
    tokenizer = CLIPTokenizer(
        str(tmp / "tokenizer" / "vocab.json"),
        str(tmp / "tokenizer" / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    text_encoder = seeded(CLIPTextModel(CLIPTextConfig(**CLIP)), WEIGHT_SEEDS["text_encoder"])
    vae = seeded(AutoencoderKL(**VAE), WEIGHT_SEEDS["vae"])
    unet = seeded(UNet2DConditionModel(**UNET), WEIGHT_SEEDS["unet"])
    unet9 = seeded(UNet2DConditionModel(**dict(UNET, in_channels=9)), WEIGHT_SEEDS["unet_inpaint"])
    return tokenizer, text_encoder, vae, unet, unet9


def run_case(components, mode, sampler, prediction_type, seed, guidance, strength, control=None, setup=None,
             options=None):  # fmt: skip
    """One pipeline run with tf_diffusion's noise; ``control`` (a dict of the ControlNet pipelines'
    ``controlnet``, ``control_image`` and call options) runs diffusers' ControlNet variant of the task.
    ``setup(pipe)`` runs on the built pipeline before the call (an IP-Adapter loads there) and
    ``options`` are further call arguments (``ip_adapter_image``)."""
    tokenizer, text_encoder, vae, unet, unet9 = components
    cls, extra = SAMPLERS[sampler]
    scheduler = cls.from_config({**SCHEDULER, **extra, "prediction_type": prediction_type})
    kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    if control is None:
        pipeline_cls = {
            "txt2img": StableDiffusionPipeline,
            "img2img": StableDiffusionImg2ImgPipeline,
            "inpaint4": StableDiffusionInpaintPipeline,
            "inpaint9": StableDiffusionInpaintPipeline,
        }[mode]
    else:
        from diffusers import (
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionControlNetInpaintPipeline,
            StableDiffusionControlNetPipeline,
        )

        pipeline_cls = {
            "txt2img": StableDiffusionControlNetPipeline,
            "img2img": StableDiffusionControlNetImg2ImgPipeline,
            "inpaint4": StableDiffusionControlNetInpaintPipeline,
            "inpaint9": StableDiffusionControlNetInpaintPipeline,
        }[mode]
        control = dict(control)
        shared["controlnet"] = control.pop("controlnet")
    pipe = pipeline_cls(unet=unet9 if mode == "inpaint9" else unet, **shared, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if setup is not None:
        setup(pipe)

    # tf_diffusion's noise: image b has seed + b, and one stream per use of randomness.
    batch = len(PROMPTS)
    latent = (SIZE // 2, SIZE // 2, 4)
    seeds = noise_lib.image_seeds(seed, batch)
    latents_noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent)
    image_noise = noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent)
    masked_noise = noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, latent)

    call = dict(
        prompt=PROMPTS,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        output_type="np",
    )
    call.update(height=SIZE, width=SIZE)
    if mode != "txt2img":
        call.update(image=[Image.fromarray(test_image(seed + 1))] * batch, strength=strength)
    if mode.startswith("inpaint"):
        call.update(mask_image=[Image.fromarray(test_mask())] * batch)
    if control is not None:
        # The txt2img ControlNet pipeline takes the hint as `image`, the others as `control_image`.
        hint = control.pop("control_image")
        call.update({"image" if mode == "txt2img" else "control_image": hint}, **control)
    call.update(options or {})

    scheduler_probe = cls.from_config(scheduler.config)
    scheduler_probe.set_timesteps(STEPS)
    evaluations = len(scheduler_probe.timesteps)
    if mode != "txt2img":
        evaluations = min(int(STEPS * strength), STEPS) * scheduler_probe.order
    step_noise = None
    if sampler in STOCHASTIC:
        step_noise = np.swapaxes(noise_lib.batch_normal(seeds, noise_lib.STEPS, (evaluations, *latent)), 0, 1)

    with NoiseQueues() as queues:
        queues.queues["pipeline"].append(latents_noise)
        encodes_image = mode in ("img2img", "inpaint4") or (mode == "inpaint9" and strength < 1.0)
        if encodes_image:
            queues.queues["vae"].append(image_noise)
        if mode.startswith("inpaint"):
            # diffusers encodes the masked image for 4-channel UNets too, and ignores it.
            queues.queues["vae"].append(masked_noise)
        if step_noise is not None:
            queues.queues["scheduler"].extend(list(step_noise))
        with torch.no_grad():
            images = pipe(**call).images
    return np.asarray(images, dtype=np.float32)


# Folder-scheduler cases: name -> (scheduler class, options, prediction type); deterministic samplers,
# so the initial latents are the only noise.
FOLDER_CASES = {
    "ddim": (DDIMScheduler, {}, "epsilon"),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
        "v_prediction",
    ),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}, "epsilon"),
}
FOLDER_SEED, FOLDER_GUIDANCE = 7, 5.0


def folder_cases() -> None:
    """The txt2img pipeline saved and reloaded by diffusers under each FOLDER_CASES scheduler."""
    cases, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        tokenizer, text_encoder, vae, unet, _ = build_components(tmp)
        for name, (cls, extra, prediction_type) in FOLDER_CASES.items():
            scheduler = cls.from_config({**SCHEDULER, **extra, "prediction_type": prediction_type})
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            folder = tmp / name
            pipe.save_pretrained(folder)
            loaded = StableDiffusionPipeline.from_pretrained(folder)
            loaded.set_progress_bar_config(disable=True)
            assert type(loaded.scheduler) is cls, type(loaded.scheduler)
            latents = NoiseSource(FOLDER_SEED).normal((len(PROMPTS), SIZE // 2, SIZE // 2, 4))
            with torch.no_grad():
                images = loaded(
                    prompt=PROMPTS,
                    negative_prompt=NEGATIVE,
                    num_inference_steps=STEPS,
                    guidance_scale=FOLDER_GUIDANCE,
                    height=SIZE,
                    width=SIZE,
                    latents=torch.from_numpy(np.ascontiguousarray(np.transpose(latents, (0, 3, 1, 2)))),
                    output_type="np",
                ).images
            arrays[name] = np.asarray(images, dtype=np.float32)
            index = json.loads((folder / "model_index.json").read_text())
            cases.append(
                dict(
                    name=name,
                    scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
                    model_index_scheduler=index["scheduler"],
                )
            )
            print(name, arrays[name].shape, float(arrays[name].mean()))
    meta = dict(seed=FOLDER_SEED, guidance_scale=FOLDER_GUIDANCE, cases=cases)
    (OUT / "folder_schedulers.json").write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(OUT / "folder_schedulers.npz", **arrays)


def resize_latents() -> None:
    """torch's bilinear resize (half-pixel centres, no antialiasing) of 12x12 latents to 20x20 and 8x8."""
    latents = np.random.default_rng(21).standard_normal((1, 12, 12, 4)).astype(np.float32)
    arrays = {"latents": latents}
    for size in (20, 8):
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(latents).permute(0, 3, 1, 2), size=(size, size), mode="bilinear"
        )
        arrays[f"resized_{size}"] = resized.permute(0, 2, 3, 1).numpy()
    np.savez_compressed(OUT / "resize_latents.npz", **arrays)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if "--folders" in sys.argv[1:]:
        folder_cases()
        return
    if "--resize" in sys.argv[1:]:
        resize_latents()
        return
    torch.manual_seed(0)
    cases, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        components = build_components(pathlib.Path(tmp))
        index = 0
        for mode in ("txt2img", "img2img", "inpaint4", "inpaint9"):
            for sampler in SAMPLERS:
                for prediction_type in ("epsilon", "v_prediction"):
                    strength = {"txt2img": 1.0, "img2img": 0.75, "inpaint4": 1.0, "inpaint9": 1.0}[mode]
                    guidance = 1.0 if (index % 5 == 4) else 6.0
                    seed = 100 + index
                    images = run_case(components, mode, sampler, prediction_type, seed, guidance, strength)
                    name = f"{mode}-{sampler}-{prediction_type}"
                    arrays[name] = images
                    cases.append(
                        dict(
                            name=name,
                            mode=mode,
                            sampler=sampler,
                            prediction_type=prediction_type,
                            seed=seed,
                            guidance_scale=guidance,
                            strength=strength,
                        )
                    )
                    print(name, images.shape, float(images.mean()))
                    index += 1
    meta = dict(
        unet=UNET,
        vae=VAE,
        text_encoder=CLIP,
        scheduler=SCHEDULER,
        weight_seeds=WEIGHT_SEEDS,
        size=SIZE,
        steps=STEPS,
        prompts=PROMPTS,
        negative_prompts=NEGATIVE,
        cases=cases,
    )
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    # The reference's state-dict keys and shapes, so the test can draw the same weights.
    shapes = {name: SHAPES[seed] for name, seed in WEIGHT_SEEDS.items()}
    (OUT / "shapes.json").write_text(json.dumps(shapes, sort_keys=True) + "\n")
    np.savez_compressed(OUT / "images.npz", **arrays)


if __name__ == "__main__":
    main()
