"""SD3 / SD3.5: the text conditioning and text-to-image, as diffusers' StableDiffusion3Pipeline computes them.

Text (``encode_prompts``): each prompt goes through CLIP-L and CLIP-G (77 tokens, truncated; CLIP-L pads
with EOS, CLIP-G with 0), whose penultimate hidden states (no final norm) are concatenated (768 + 1280),
zero-padded to the transformer's ``joint_attention_dim`` (4096) and followed along the sequence by
T5's ``max_sequence_length`` tokens (all zeros when the model has no T5, as diffusers does); the
pooled embedding is both projected CLIP outputs concatenated (2048). The negative prompt (default
"") is encoded the same way. Sampling: flow matching (``schedulers.flow_match``) over
``denoising.MMDiTDenoiser``, run by the same ``DenoiseProgram`` and executors as the UNet families;
latents are decoded as ``vae.decode(x / scaling_factor + shift_factor)``.

Image-to-image and inpainting follow diffusers' SD3 Img2Img / Inpaint pipelines (the 16-channel
transformer's per-step blend), skip-layer guidance its text-to-image pipeline. Samplers: the flow-matching
ones of the registry, ``flow_euler`` (the default), ``flow_heun``, ``flow_dpmpp_2m`` and ``flow_dpmpp_2m_sde``.
Not here yet (issue 22): keras-hub presets, the CLI, PNG parameters, the SavedModel export, sharded
generation and LoRA for SD3.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from tf_diffusion import noise as noise_lib
from tf_diffusion.clip import CLIPTextEncoder
from tf_diffusion.config import SD3Config, TokenizerConfig
from tf_diffusion.denoising import Conditioning, DenoiseProgram, LocalExecutor, MMDiTDenoiser, guidance_for
from tf_diffusion.mmdit import MMDiT
from tf_diffusion.noise import image_seeds
from tf_diffusion.t5 import T5Encoder, T5Tokenizer
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.vae import AutoencoderKL

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("uint8", "float", "latent")


class StableDiffusion3:
    """An SD3 / SD3.5 model: two CLIP encoders, optional T5, the MMDiT and the 16-channel VAE.

    Attributes:
        config: the SD3Config the components were built from.
        tokenizer, tokenizer_2: CLIP tokenizers (CLIP-L pads with EOS, CLIP-G with 0).
        tokenizer_3: the T5 SentencePiece tokenizer, or None.
        text_encoder, text_encoder_2: CLIPTextEncoders with projections.
        text_encoder_3: T5Encoder, or None (its tokens are then zeros, as diffusers).
        transformer: MMDiT.
        vae: AutoencoderKL without quant convs.

    Example:
        >>> sd = StableDiffusion3.from_pretrained("stable-diffusion-3-medium-diffusers")
        >>> images = sd.generate("a photo of a cat", num_steps=28, seed=0)
    """

    def __init__(
        self,
        config: SD3Config,
        *,
        dtype: str | None = None,
        tokenizer: CLIPTokenizer | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        tokenizer_3: T5Tokenizer | None = None,
    ):
        """Build every component of ``config`` with fresh weights.

        Args:
            config: the model.
            dtype: a Keras dtype policy name for all components (the VAE stays float32 under float16).
            tokenizer, tokenizer_2: CLIP tokenizers; default the packaged vocabulary, padded as the
                config's tokenizer settings say.
            tokenizer_3: the T5 tokenizer (it needs the checkpoint's ``spiece.model``); required
                when the config has ``text_encoder_3`` and prompts are to be encoded.
        """
        if not isinstance(config, SD3Config):
            raise ValueError(f"config must be an SD3Config, got {type(config).__name__}")
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer(config=config.tokenizer)
        self.tokenizer_2 = (
            tokenizer_2
            if tokenizer_2 is not None
            else self.tokenizer.padded_with(config.tokenizer_2.pad_token_id)
        )
        self.tokenizer_3 = tokenizer_3
        self.text_encoder = CLIPTextEncoder(config.text_encoder, dtype=dtype)
        self.text_encoder_2 = CLIPTextEncoder(config.text_encoder_2, dtype=dtype)
        self.text_encoder_3 = (
            None if config.text_encoder_3 is None else T5Encoder(config.text_encoder_3, dtype=dtype)
        )
        self.transformer = MMDiT(config.transformer, dtype=dtype)
        self.vae = AutoencoderKL(config.vae, dtype="float32" if dtype and "float16" in dtype else dtype)
        self.denoiser = MMDiTDenoiser(self.transformer)
        self.executor = LocalExecutor()

    @classmethod
    def from_preset(cls, name: str, *, dtype: str | None = None) -> StableDiffusion3:
        """Build an SD3 preset's architecture ("sd3-medium", "sd3.5-large", ...) with random weights.

        The T5 tokenizer needs a checkpoint's ``spiece.model``: set ``tokenizer_3`` before encoding text.

        Raises:
            ValueError: for an unknown preset, listing the known ones.
        """
        from tf_diffusion.presets import get_sd3_preset

        return cls(get_sd3_preset(name), dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str | None = None,
        load_t5: bool = True,
        quantize: str | None = None,
        quantize_components=None,
    ):
        """Load a diffusers ``StableDiffusion3Pipeline`` folder.

        Args:
            path: the folder (``model_index.json``, ``transformer/``, ``text_encoder[_2|_3]/``, ...).
            dtype: as in the constructor.
            load_t5: False leaves T5 out even when the folder has it (its tokens are then zeros).
            quantize, quantize_components: "int8" stores the transformer's and text encoders' linear
                weights in int8 (``tf_diffusion.execution.quantize.build``).

        Raises:
            ValueError: if the folder is not an SD3 pipeline or a component does not fit its config.
        """
        from tf_diffusion.execution import quantize as quantizing
        from tf_diffusion.weights import sd3_folder

        build = quantizing.builder(cls, quantize, quantize_components)  # quantize= (execution.quantize)
        return sd3_folder.load_sd3_folder(build, pathlib.Path(path), dtype=dtype, load_t5=load_t5)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: SD3Config | str | None = None,
        text_encoders_from: str | os.PathLike | None = None,
        tokenizer_3=None,
        load_t5: bool = True,
        dtype: str | None = None,
        quantize: str | None = None,
        quantize_components=None,
    ):
        """Load an original SD3 / SD3.5 single file (``weights.sd3_single_file`` describes the layout).

        Args:
            path: the ``.safetensors`` (or ``.ckpt``) file.
            config: an SD3Config or SD3 preset name; None: the preset whose transformer the file holds.
            text_encoders_from: a diffusers SD3 folder giving the text encoders (and tokenizers) the
                file lacks.
            tokenizer_3: the T5 ``spiece.model`` (or a ``T5Tokenizer``) for a file with T5 weights.
            load_t5: False runs without T5 even when the file has it.
            dtype: as in the constructor.
            quantize, quantize_components: as in ``from_pretrained``.

        Raises:
            ValueError: for a file that is not SD3's, missing CLIP encoders, or T5 without a tokenizer.
        """
        from tf_diffusion.execution import quantize as quantizing
        from tf_diffusion.presets import get_sd3_preset
        from tf_diffusion.weights import sd3_single_file

        build = quantizing.builder(cls, quantize, quantize_components)  # quantize= (execution.quantize)
        if isinstance(config, str):
            config = get_sd3_preset(config)
        return sd3_single_file.load_sd3_single_file(
            build,
            pathlib.Path(path),
            config=config,
            text_encoders_from=text_encoders_from,
            tokenizer_3=tokenizer_3,
            load_t5=load_t5,
            dtype=dtype,
        )

    def __repr__(self) -> str:
        t5 = "with T5" if self.text_encoder_3 is not None else "without T5"
        return f"StableDiffusion3({self.config.name!r}, {t5})"

    # ---------------------------------------------------------------- text

    def encode_prompts(
        self, prompts: Sequence[str], max_sequence_length: int | None = None, executor=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (context (B, 77 + L, joint_attention_dim), pooled (B, P)), float32.

        Raises:
            ValueError: for a ``max_sequence_length`` outside 1..512, or a T5 model without its tokenizer.
        """
        cfg = self.config
        executor = self.executor if executor is None else executor
        length = cfg.max_sequence_length if max_sequence_length is None else max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 512:
            raise ValueError(f"max_sequence_length={length!r} must be an integer in 1..512")
        hidden, pooled = [], []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = executor.encode_text(
                encoder, tokenizer(list(prompts)), clip_skip=1, final_norm=False, pooled=True
            )
            hidden.append(out[0])
            pooled.append(out[1])
        clip = np.concatenate(hidden, axis=-1)  # (B, 77, 2048)
        width = cfg.transformer.joint_attention_dim
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        if self.text_encoder_3 is None:
            t5 = np.zeros((len(prompts), length, width), np.float32)
        else:
            if self.tokenizer_3 is None:
                raise ValueError(
                    "this model has a T5 encoder but no T5 tokenizer; pass tokenizer_3=T5Tokenizer(spiece.model)"
                )
            long = [p for p in prompts if self.tokenizer_3.truncated(p, length)]
            if long:
                # diffusers warns and truncates likewise.
                logger.warning(
                    "prompts longer than max_sequence_length=%d T5 tokens are truncated: %s", length, long
                )
            t5 = executor.encode_text(self.text_encoder_3, self.tokenizer_3(list(prompts), max_length=length))
        return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)

    # ------------------------------------------------------------- generate

    def check_size(self, height, width) -> tuple[int, int]:
        """The output size: the given one or the default; sides must be multiples of ``config.size_multiple``.

        Raises:
            ValueError: for a side that is not a positive multiple of 16 (SD3: the VAE's 8 times the
                transformer's patch 2).
        """
        multiple = self.config.size_multiple
        height = self.config.default_size if height is None else height
        width = self.config.default_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
            if value % multiple:
                raise ValueError(
                    f"{name}={value} is not a multiple of {multiple} (the VAE's factor "
                    f"{self.config.vae.downsample_factor} times the patch size {self.config.transformer.patch_size}); "
                    f"allowed: positive multiples of {multiple}"
                )
        return int(height), int(width)

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        seed: int | None = None,
        latents=None,
        scheduler=None,
        image=None,
        strength: float | None = None,
        mask=None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        max_sequence_length: int | None = None,
        callback: Callable | None = None,
        progress: bool = True,
        output_type: str = "uint8",
        jit_compile: bool | None = None,
        executor=None,
    ) -> np.ndarray:
        """Text-to-image, image-to-image and inpainting, as diffusers' ``StableDiffusion3Pipeline``,
        ``StableDiffusion3Img2ImgPipeline`` and ``StableDiffusion3InpaintPipeline`` (16-channel transformer).

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: one for all prompts or one per prompt; default "" (encoded, not zeros).
            num_steps: default ``config.default_steps`` (28).
            guidance_scale: classifier-free guidance above 1; default ``config.default_guidance`` (7.0);
                Large Turbo runs with 0 (off) and 4 steps.
            height, width: pixels, multiples of ``config.size_multiple`` (16); default ``config.default_size``.
            num_images: images per prompt.
            seed: the first image's seed (image ``b`` gets ``seed + b``, as ``StableDiffusion.generate``).
            latents: (N, h, w, 16) initial noise instead of the seeded draw (diffusers' ``latents``).
            scheduler: a sampler name or object; default ``config.default_sampler`` ("FlowMatchEulerDiscreteScheduler",
                the same as "flow_euler"); "flow_heun", "flow_dpmpp_2m" and "flow_dpmpp_2m_sde" take the
                model's ``shift`` (diffusers' ``flow_shift``) and, with dynamic shifting, the image's ``mu``
                (which "flow_heun", like diffusers' FlowMatchHeunDiscreteScheduler, does not take).
            image: init image for image-to-image (PIL, or uint8 / float [0, 1] arrays (H, W, C) or
                (N, H, W, C)); its size is the output size. It is encoded (a posterior sample from the
                image's seed), shifted and scaled, and noised to the first kept step.
            strength: image-to-image and inpainting, in (0, 1]; default 0.6 (diffusers'). The first
                ``int(num_steps - num_steps * strength)`` steps are skipped, as diffusers' SD3 counts them;
                inpainting at 1.0 starts from pure noise.
            mask: inpainting mask (white >= 0.5 repaints), the image's size. After every step the kept
                region is the image's latents noised to the next step's level (clean after the last).
            skip_guidance_layers: text-to-image with guidance only: diffusers' skip-layer guidance
                (SD3.5 Medium: ``(7, 8, 9)``): at evaluations ``i`` with ``start * num_steps < i <
                stop * num_steps`` the prediction gains ``scale * (cond - cond without these blocks)``.
            skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop: its scale
                and window, with diffusers' defaults.
            max_sequence_length: T5 tokens, 1..512; default ``config.max_sequence_length`` (256).
            callback: ``callback(step, timestep, latents)`` after every step.
            progress: show a progress bar.
            output_type: "uint8", "float" ([0, 1]) or "latent".
            jit_compile: as ``StableDiffusion.generate``.
            executor: what runs the loop, the decode and the text encoders.

        Returns:
            ``GeneratedImages`` (a NumPy array with ``.info``, as ``StableDiffusion.generate``): (N, H, W, 3)
            images, or the final latents (N, h, w, 16) for "latent".

        Raises:
            ValueError: for any invalid argument, naming the value and what is allowed.
        """
        from tf_diffusion.pipeline import _as_prompt_list, _negatives, _positive_int
        from tf_diffusion.schedulers import get_sampler

        cfg = self.config
        executor = self.executor if executor is None else executor
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _negatives(negative_prompt, len(prompts))
        num_images = _positive_int(num_images, "num_images")
        num_steps = _positive_int(cfg.default_steps if num_steps is None else num_steps, "num_steps")
        guidance_scale = float(cfg.default_guidance if guidance_scale is None else guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not allowed; expected one of {OUTPUT_TYPES}")
        init = mask_px = None
        if mask is not None and image is None:
            raise ValueError("mask needs an image to inpaint; pass image=... as well")
        if image is not None:
            from tf_diffusion import images as image_utils

            init = image_utils.to_rgb(image, "image")  # (k, H, W, 3) in [0, 1]
            ih, iw = init.shape[1:3]
            if (height, width) not in ((None, None), (ih, iw)):
                raise ValueError(
                    f"height x width {height}x{width} differs from the image's {ih}x{iw}; resize the image "
                    f"first (no silent resizing)"
                )
            height, width = ih, iw
            if mask is not None:
                mask_px = image_utils.to_mask(mask, "mask")
                if mask_px.shape[1:3] != (ih, iw):
                    raise ValueError(
                        f"mask size {mask_px.shape[2]}x{mask_px.shape[1]} (WxH) differs from the image size "
                        f"{iw}x{ih}; they must match"
                    )
                mask_px = (mask_px >= 0.5).astype(np.float32)  # diffusers binarises: >= 0.5 repaints
            strength = 0.6 if strength is None else strength
            if (
                isinstance(strength, bool)
                or not isinstance(strength, (int, float))
                or not 0.0 < strength <= 1.0
            ):
                raise ValueError(f"strength={strength!r} must be a number in (0, 1] for image-to-image")
        elif strength is not None:
            raise ValueError(
                "strength applies to image-to-image and inpainting only; pass image=... (or leave strength None)"
            )
        height, width = self.check_size(height, width)
        factor = cfg.vae.downsample_factor
        shape = (height // factor, width // factor, cfg.vae.latent_channels)
        n = len(prompts) * num_images
        if seed is not None and latents is not None:
            raise ValueError("pass either seed or latents, not both: latents replace the seeded noise")
        seeds = image_seeds(seed, n)
        if latents is None:
            x = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
        else:
            x = np.asarray(latents, np.float32)
            if x.shape != (n, *shape):
                raise ValueError(f"latents have shape {x.shape}; expected {(n, *shape)} (N, h, w, C) NHWC")
        if scheduler is not None and hasattr(scheduler, "plan"):
            sampler = scheduler
        else:
            name = cfg.default_sampler if scheduler is None else scheduler
            options = {}
            if cfg.scheduler.use_dynamic_shifting:
                from tf_diffusion.schedulers import flow_shift_mu

                p = cfg.transformer.patch_size
                options["mu"] = flow_shift_mu((shape[0] // p) * (shape[1] // p), cfg.scheduler)
            sampler = get_sampler(name, cfg.scheduler, **options)
        if init is None:
            plan = sampler.plan(num_steps)
        else:
            # diffusers' SD3 get_timesteps: t_start = int(max(n - n * strength, 0)), with the float product
            # (the UNet pipelines take int(n * strength) steps); the plan keeps the last n - t_start.
            kept = num_steps - int(max(num_steps - num_steps * strength, 0))
            plan = sampler.plan(num_steps, strength=1.0 if kept >= num_steps else (kept + 0.5) / num_steps)
        guidance = guidance_for(guidance_scale)
        guided = guidance.copies == 2
        texts = list(negatives) + list(prompts) if guided else list(prompts)
        context, pooled = self.encode_prompts(texts, max_sequence_length, executor=executor)
        context = np.repeat(context, num_images, axis=0)
        pooled = np.repeat(pooled, num_images, axis=0)
        cond = Conditioning(context[-n:], {"pooled_projections": pooled[-n:]})
        rows = {"cond": cond.tree()}
        shared = {"tables": dict(plan.tables), "timesteps": plan.timesteps}
        if guided:
            rows["uncond"] = Conditioning(context[:n], {"pooled_projections": pooled[:n]}).tree()
            shared["guidance_scale"] = np.float32(guidance_scale)
        per_step = {}
        if sampler.needs_noise:
            steps = noise_lib.batch_normal(seeds, noise_lib.STEPS, (plan.num_evals, *shape))
            per_step["noise"] = np.ascontiguousarray(np.swapaxes(steps, 0, 1))
        hooks = ()
        if init is None:
            x = x * np.float32(plan.init_noise_sigma)
        else:
            noise = x
            image_latents = self._encode_image(init * 2.0 - 1.0, seeds, shape)
            if mask_px is not None and strength >= 1.0:
                x = noise * np.float32(plan.init_noise_sigma)
            else:
                x = np.asarray(sampler.add_noise(image_latents, noise, plan), np.float32)
            if mask_px is not None:
                from tf_diffusion.denoising import MaskBlend
                from tf_diffusion.pipeline import _next_noise_scales

                blend = MaskBlend()
                hooks = (blend,)
                mask_latent = _repeat_rows(
                    mask_px[:, ::factor, ::factor, :], n
                )  # nearest, as torch interpolate
                rows[blend.name] = {"mask": mask_latent, "image_latents": image_latents, "noise": noise}
                shared[blend.name] = {"scales": _next_noise_scales(sampler, plan)}
        denoiser = self.denoiser
        if skip_guidance_layers is not None:
            layers = _check_skip_layers(skip_guidance_layers, cfg.transformer.num_layers)
            if init is not None or not guided:
                raise ValueError(
                    "skip_guidance_layers applies to text-to-image with guidance (guidance_scale > 1), as "
                    "diffusers' StableDiffusion3Pipeline"
                )
            evals = np.arange(plan.num_evals)
            window = (evals > num_steps * skip_layer_guidance_start) & (
                evals < num_steps * skip_layer_guidance_stop
            )
            # The term is folded into the conditional rows (SkipLayerDenoiser): CFG then scales it back.
            weight = np.where(window, np.float32(skip_layer_guidance_scale) / np.float32(guidance_scale), 0.0)
            per_step["cond"] = {"extra.slg_weight": np.repeat(weight[:, None], n, axis=1).astype(np.float32)}
            per_step["uncond"] = {"extra.slg_weight": np.zeros((plan.num_evals, n), np.float32)}
            denoiser = SkipLayerDenoiser(self.denoiser, layers)
        program = DenoiseProgram(sampler, denoiser, guidance, hooks)
        x = executor.run(
            program,
            x,
            {"rows": rows, "per_step": per_step, "shared": shared},
            callback=callback,
            progress=progress,
            jit_compile=jit_compile,
        )
        from tf_diffusion.pipeline import GeneratedImages, GenerationInfo

        info = GenerationInfo(
            model=cfg.name,
            mode="txt2img" if init is None else ("inpaint" if mask_px is not None else "img2img"),
            prompts=tuple(p for p in prompts for _ in range(num_images)),
            negative_prompts=tuple(p for p in negatives for _ in range(num_images)),
            seeds=tuple(seeds),
            seeded_latents=latents is None,
            sampler=sampler.name,
            sampler_options=dict(sampler.options()),
            num_steps=num_steps,
            num_evals=plan.num_evals,
            guidance_scale=guidance_scale,
            strength=None if init is None else float(strength),
            mask_blur=None,
            height=height,
            width=width,
            output_type=output_type,
        )
        if output_type == "latent":
            return GeneratedImages.wrap(x, info)
        decoded = self.decode(x, jit_compile, executor)
        if output_type == "float":
            return GeneratedImages.wrap(np.clip(decoded * 0.5 + 0.5, 0.0, 1.0), info)
        from tf_diffusion import images as image_utils

        return GeneratedImages.wrap(image_utils.to_uint8(decoded), info)

    def decode(self, latents, jit_compile: bool | None = None, executor=None) -> np.ndarray:
        """Transformer latents (N, h, w, 16) -> images (N, H, W, 3) in [-1, 1]: ``vae.decode(x / scaling + shift)``."""
        executor = self.executor if executor is None else executor
        vae = self.config.vae
        x = np.asarray(latents, np.float32)
        return executor.decode(
            self.vae, x / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor), jit_compile
        )

    def _encode_image(self, pixels: np.ndarray, seeds, shape) -> np.ndarray:
        """(k, H, W, 3) images in [-1, 1] -> (N, h, w, 16) latents as the transformer sees them.

        A posterior sample per output image from its seed, then ``(z - shift_factor) * scaling_factor``.
        """
        import keras

        dist = self.vae.encode(keras.ops.convert_to_tensor(pixels, "float32"))
        n = len(seeds)
        mean = _repeat_rows(keras.ops.convert_to_numpy(dist.mean), n)
        std = _repeat_rows(keras.ops.convert_to_numpy(dist.std), n)
        z = mean + std * noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, shape)
        vae = self.config.vae
        return ((z - np.float32(vae.shift_factor)) * np.float32(vae.scaling_factor)).astype(np.float32)


class SkipLayerDenoiser:
    """``MMDiTDenoiser`` with diffusers' skip-layer guidance folded into the conditional rows.

    The batch is [uncond, cond] (classifier-free guidance). The conditional rows become
    ``cond + w * (cond - skip)``, with ``skip`` the transformer without ``layers`` on the conditional
    rows and ``w`` the per-step ``slg_weight`` extra (skip-layer scale / guidance scale inside the window,
    0 outside; 0 on the unconditional rows), so that guidance gives diffusers'
    ``uncond + s * (cond - uncond) + scale * (cond - skip)``. The skipped pass runs at every evaluation
    (weight 0 outside the window), one traced program for the whole loop.
    """

    def __init__(self, base: MMDiTDenoiser, layers: tuple[int, ...]):
        self.base, self.layers = base, tuple(layers)
        self.transformer = base.transformer

    @property
    def key(self):
        return ("skip-layer", self.base.key, self.layers)

    def __call__(self, x, t, cond: Conditioning):
        from keras import ops

        extras = dict(cond.extras)
        weight = extras.pop("slg_weight")  # (2N,)
        out = self.base(x, t, Conditioning(cond.context, extras))  # (2N, h, w, C): [uncond, cond]
        n = ops.shape(x)[0] // 2
        x_cond = x[n:]
        t_cond = ops.broadcast_to(t, (ops.shape(x_cond)[0],))
        skip = self.transformer(
            x_cond, t_cond, cond.context[n:], extras["pooled_projections"][n:], skip_layers=self.layers
        )
        w = ops.cast(weight[n:], "float32")[:, None, None, None]
        conditional = out[n:] + w * (out[n:] - ops.cast(skip, "float32"))
        return ops.concatenate([out[:n], conditional], axis=0)


def _check_skip_layers(layers, num_layers: int) -> tuple[int, ...]:
    values = tuple(layers) if not isinstance(layers, (str, bytes)) else ()
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"skip_guidance_layers={layers!r} must be a non-empty list of block indices")
    bad = [int(v) for v in values if not 0 <= v < num_layers]
    if bad:
        raise ValueError(
            f"skip_guidance_layers {bad} are not blocks of this transformer; allowed: 0..{num_layers - 1}"
        )
    return tuple(int(v) for v in values)


def _repeat_rows(array: np.ndarray, n: int) -> np.ndarray:
    """k rows to n (k divides n): each row repeated n / k times, in order."""
    if n % array.shape[0]:
        raise ValueError(f"{array.shape[0]} images for {n} outputs; give one image or one per output")
    return np.repeat(array, n // array.shape[0], axis=0)


def clip_tokenizer_config(tokenizer: CLIPTokenizer) -> TokenizerConfig:
    """The TokenizerConfig of a loaded CLIP tokenizer."""
    return TokenizerConfig(
        max_length=tokenizer.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def read_model_index(folder: pathlib.Path) -> dict:
    """model_index.json of an SD3 folder.

    Raises:
        ValueError: if it is missing or names another pipeline class.
    """
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder} has no model_index.json; it is not a diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    name = index.get("_class_name")
    allowed = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    )
    if name not in allowed:
        raise ValueError(f"{folder} holds a {name!r}; an SD3 folder holds one of {list(allowed)}")
    return index
