"""StableDiffusion: the four components built from one PipelineConfig, and the generate() driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from tf_diffusion import execution
from tf_diffusion import images as image_utils
from tf_diffusion.clip import CLIPTextEncoder
from tf_diffusion.config import PipelineConfig
from tf_diffusion.noise import NoiseSource
from tf_diffusion.presets import get_preset
from tf_diffusion.prompts import tokenize_weighted
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.unet import UNetModel
from tf_diffusion.vae import AutoencoderKL

OUTPUT_TYPES = ("uint8", "float", "latent")


class StableDiffusion:
    """A Stable Diffusion model: tokenizer, CLIP text encoder, UNet and VAE.

    Attributes:
        config: the PipelineConfig the components were built from.
        tokenizer: CLIPTokenizer giving (B, 77) int32 token ids.
        text_encoder: CLIPTextEncoder, ids -> (B, 77, D) hidden states as SD consumes them.
        unet: UNetModel, (latents NHWC, timesteps, context) -> noise prediction.
        vae: AutoencoderKL with ``encode`` (images in [-1, 1]) and ``decode`` (unscaled latents).

    Example:
        >>> sd = StableDiffusion.from_preset("sd-v1-5")  # random weights, full size
    """

    def __init__(
        self, config: PipelineConfig, *, dtype: str | None = None, tokenizer: CLIPTokenizer | None = None
    ):
        """Build every component of ``config`` with freshly initialised weights.

        Args:
            config: the model to build.
            dtype: a Keras dtype policy name ("float32", "mixed_float16",
                "mixed_bfloat16", ...) for all components; None uses the global policy.
            tokenizer: a tokenizer to use instead of the packaged CLIP vocabulary.
        """
        if not isinstance(config, PipelineConfig):
            raise ValueError(f"config must be a PipelineConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer(config=config.tokenizer)
        self.text_encoder = CLIPTextEncoder(config.text_encoder, dtype=dtype)
        self.unet = UNetModel(config.unet, dtype=dtype)
        self.vae = AutoencoderKL(config.vae, dtype=_vae_dtype(dtype))
        # Fast paths by block type (tf_diffusion.execution); they compute the same numbers.
        execution.apply(self.unet)
        execution.apply(self.vae)
        self._compiled: dict = {}

    @classmethod
    def from_preset(cls, name: str, *, dtype: str | None = None) -> StableDiffusion:
        """Build a preset's architecture with random weights.

        Args:
            name: a key of ``tf_diffusion.PRESETS`` ("sd-v1-5", "sd-v2-1", ...).
            dtype: optional Keras dtype policy name for all components.

        Raises:
            ValueError: for an unknown preset name.
        """
        return cls(get_preset(name), dtype=dtype)

    @classmethod
    def from_pretrained(cls, source, **kwargs) -> StableDiffusion:
        """Load any supported checkpoint: a file, a folder or a hub id.

        See ``tf_diffusion.weights.loading.from_pretrained`` for the arguments
        (dtype, config, tokenizer, prediction_type, use_ema, variant, revision).
        """
        from tf_diffusion.weights.loading import from_pretrained

        return from_pretrained(cls, source, **kwargs)

    def save_pretrained(self, destination, **kwargs):
        """Write the model ("tf_diffusion" folder by default; "diffusers" or "single-file").

        See ``tf_diffusion.weights.loading.save_pretrained`` for the arguments.
        """
        from tf_diffusion.weights.loading import save_pretrained

        return save_pretrained(self, destination, **kwargs)

    def __repr__(self) -> str:
        return f"StableDiffusion(config={self.config.name!r})"

    # ------------------------------------------------------------------ text

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Encode prompts with A1111 weights and 75-token chunking (see ``tf_diffusion.prompts``).

        All prompts of one call get the same number of chunks (shorter ones are
        padded with empty chunks), so they can be batched.

        Args:
            prompts: the texts.

        Returns:
            (len(prompts), 77 * chunks, D) float32 hidden states.
        """
        chunked = [tokenize_weighted(self.tokenizer, p) for p in prompts]
        count = max(c.num_chunks for c in chunked)
        empty = tokenize_weighted(self.tokenizer, "")
        chunked = [c.padded_to(count, empty) for c in chunked]
        ids = np.concatenate([c.ids for c in chunked])  # (B*K, 77)
        encode = self._get_compiled(
            "text", lambda: execution.compile(self.text_encoder, execution.ExecutionOptions(compile="graph"))
        )
        hidden = ops.convert_to_numpy(ops.cast(encode(ids), "float32"))  # (B*K, 77, D)
        hidden = hidden.reshape(len(prompts), count * ids.shape[1], hidden.shape[-1])
        weights = np.stack([c.weights.reshape(-1) for c in chunked])  # (B, K*77)
        return _apply_weights(hidden, weights)

    # ------------------------------------------------------------- generate

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
        callback: Callable | None = None,
        progress: bool = True,
        output_type: str = "uint8",
        jit_compile: bool | None = None,
        fused: bool | None = None,
        execution: execution.ExecutionOptions | None = None,
    ) -> np.ndarray:
        """Generate images: text-to-image, image-to-image (``image``) or inpainting (``image`` + ``mask``).

        Random draws all come from ``np.random.default_rng(seed)`` (NHWC, float32), in
        this order: the initial latents (N, h, w, C); the VAE posterior sample of the
        given images (when ``image`` is given); that of the masked images (when
        ``mask`` is given); then, for samplers that add noise while stepping, one
        (N, h, w, C) draw per model evaluation, stacked. The same seed therefore
        gives the same image on every run and every backend, and the same arrays
        can be handed to diffusers.

        Args:
            prompt: a prompt or a list of prompts (A1111 weights such as ``(word:1.3)``
                and prompts over 75 tokens are supported). An empty prompt is valid.
            negative_prompt: one for all prompts, or a list with one per prompt.
            num_steps: sampler steps (>= 1); default ``config.default_steps`` (50 for SD, as
                diffusers). With ``image``, ``int(num_steps * strength)`` of them run, as in diffusers.
            guidance_scale: classifier-free guidance; <= 1 skips the unconditional half. Default
                ``config.default_guidance`` (7.5 for SD).
            height, width: output size in pixels, multiples of the VAE's downsampling
                factor (8 for SD). Default: the image's size, else the model's default size.
            num_images: images per prompt.
            seed: a non-negative integer for reproducible noise; None draws one.
            latents: initial noise (N, h, w, C) NHWC, used instead of drawn noise and
                scaled by the sampler's initial sigma as diffusers scales it.
            scheduler: a sampler name ("ddim", "euler", "dpmpp_2m_karras", ...) or a
                sampler object; default ``config.default_sampler`` (PNDM for SD, as diffusers).
            image: init image for img2img / inpainting: PIL, or uint8 / uint16 / float
                [0, 1] array (H, W), (H, W, C) or (N, H, W, C); RGBA and grayscale are converted.
            strength: how much of the schedule to run from the noised image, in [0, 1];
                default 0.8 for img2img and 1.0 for inpainting, as diffusers.
            mask: inpainting mask, white (>= 0.5) = repaint; the same size as ``image``.
            callback: called as ``callback(step, timestep, latents)`` after every step.
            progress: show a progress bar over the steps.
            output_type: "uint8" (N, H, W, 3) in [0, 255], "float" in [0, 1], or
                "latent" (the final scaled latents, NHWC).
            jit_compile: compile the denoising loop and the decode with XLA (True) or not (False);
                None chooses as ``tf_diffusion.execution.default_options`` does: XLA with an
                accelerator, under JAX and for a float32 model on a CPU (where Winograd
                convolutions and sub-pixel upsamplings run where measured faster), graph mode for a
                bfloat16 / float16 model on a CPU, and for float32 on TensorFlow's CPU with latents
                above 32x32 graph mode with each UNet block its own XLA island.
            execution: how the denoising loop runs (``tf_diffusion.execution.ExecutionOptions``,
                e.g. ``ExecutionOptions(compile="islands", winograd=True)``), instead of
                ``jit_compile``'s choice; the decode still follows ``jit_compile``.
            fused: run the whole loop as one compiled function (``ops.fori_loop``) rather
                than one compiled step per Python iteration; default: fused under XLA
                without a callback, and on a CPU only without a progress bar (so the bar moves
                per step). The two give the same result.

        Returns:
            The images (or latents) as a NumPy array.

        Raises:
            ValueError: for any invalid argument, naming the value and what is allowed.
        """
        from tf_diffusion.schedulers import get_sampler

        cfg = self.config
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _negatives(negative_prompt, len(prompts))
        num_images = _positive_int(num_images, "num_images")
        num_steps = _positive_int(cfg.default_steps if num_steps is None else num_steps, "num_steps")
        guidance_scale = cfg.default_guidance if guidance_scale is None else guidance_scale
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not allowed; expected one of {OUTPUT_TYPES}")
        guidance_scale = float(guidance_scale)
        guided = guidance_scale > 1.0
        if seed is not None and latents is not None:
            raise ValueError("pass either seed or latents, not both: latents replace the seeded noise")

        init = None if image is None else image_utils.to_rgb(image, "image")
        mask_px = None
        if mask is not None:
            if init is None:
                raise ValueError("mask needs an image to inpaint; pass image=... as well")
            mask_px = image_utils.to_mask(mask, "mask")
            if mask_px.shape[1:3] != init.shape[1:3]:
                raise ValueError(
                    f"mask size {mask_px.shape[2]}x{mask_px.shape[1]} (WxH) differs from the image size "
                    f"{init.shape[2]}x{init.shape[1]}; they must match"
                )
            # diffusers binarises the mask: >= 0.5 repaints.
            mask_px = (mask_px >= 0.5).astype(np.float32)
        if cfg.is_inpainting and mask_px is None:
            raise ValueError(f"{cfg.name} is an inpainting model (9-channel UNet); pass image and mask")

        if strength is None:
            strength = 1.0 if mask_px is not None else 0.8
        strength = float(strength)
        if init is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} is outside the allowed range [0, 1]")

        height, width = self._check_size(height, width, init)
        factor = cfg.vae.downsample_factor
        h, w, c = height // factor, width // factor, cfg.vae.latent_channels
        n = len(prompts) * num_images

        sampler = (
            scheduler
            if hasattr(scheduler, "plan")
            else get_sampler(scheduler if scheduler is not None else cfg.default_sampler, cfg.scheduler)
        )
        plan = sampler.plan(num_steps, strength=strength if init is not None else 1.0)

        # Text: conditional (and unconditional) contexts, repeated per image.
        texts = negatives + prompts if guided else prompts
        context = self.encode_prompts(texts)
        per_prompt = context.shape[0] // (2 if guided else 1)
        context = np.repeat(context.reshape((-1, per_prompt) + context.shape[1:]), num_images, axis=1)
        context = context.reshape((-1,) + context.shape[2:])  # [uncond..., cond...], each [p0, p0, p1, ...]

        # Noise, in the documented order.
        source = NoiseSource(seed if latents is None else None)
        if latents is None:
            noise = source.normal((n, h, w, c))
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != (n, h, w, c):
                raise ValueError(
                    f"latents have shape {noise.shape}; expected {(n, h, w, c)} (N, h, w, C) NHWC"
                )
        image_noise = source.normal((init.shape[0], h, w, c)) if init is not None else None
        masked_noise = source.normal((init.shape[0], h, w, c)) if mask_px is not None else None
        step_noise = source.normal((plan.num_evals, n, h, w, c)) if sampler.needs_noise else None

        sf = np.float32(cfg.vae.scaling_factor)
        image_latents = masked_latents = mask_latent = None
        if init is not None:
            image_latents = self._encode_image(init * 2.0 - 1.0, image_noise, n) * sf
        if mask_px is not None:
            masked = (init * 2.0 - 1.0) * (mask_px < 0.5)
            masked_latents = self._encode_image(masked, masked_noise, n) * sf
            mask_latent = _repeat_to(mask_px[:, ::factor, ::factor, :], n)  # nearest, as torch interpolate

        if init is None or (mask_px is not None and strength >= 1.0):
            x = noise * np.float32(plan.init_noise_sigma)
        else:
            x = ops.convert_to_numpy(sampler.add_noise(image_latents, noise, plan))

        extra = None
        if cfg.is_inpainting:
            extra = np.concatenate([mask_latent, masked_latents], axis=-1)  # (N, h, w, 1 + C)
        blend = None
        if mask_px is not None and not cfg.is_inpainting:
            blend = (mask_latent, image_latents, noise, _next_noise_scales(sampler, plan))

        x = self._denoise(
            sampler,
            plan,
            x,
            context,
            guidance_scale if guided else None,
            extra,
            blend,
            step_noise,
            callback=callback,
            progress=progress,
            jit_compile=jit_compile,
            fused=fused,
            execution_options=execution,
        )
        if output_type == "latent":
            return x
        decoded = self.decode(x / sf, jit_compile=jit_compile)
        if output_type == "float":
            return np.clip(decoded * 0.5 + 0.5, 0.0, 1.0)
        return image_utils.to_uint8(decoded)

    def decode(self, latents, jit_compile: bool | None = None) -> np.ndarray:
        """Unscaled latents (N, h, w, C) -> images (N, H, W, 3) in [-1, 1] as float32.

        The VAE runs in float32 when the rest of the model is float16, so the
        decode never overflows to NaN or black images (diffusers upcasts likewise).
        ``jit_compile`` as in ``generate``: by default XLA on accelerators, under JAX and
        in float32 on a CPU, graph mode otherwise.
        """
        opts = execution.default_options(
            self.vae, jit_compile=None if jit_compile is None else bool(jit_compile)
        )
        fn = self._get_compiled(("decode", opts), lambda: execution.compile(self.vae.decode, opts))
        return ops.convert_to_numpy(ops.cast(fn(ops.convert_to_tensor(latents, "float32")), "float32"))

    @staticmethod
    def to_pil(images) -> list:
        """uint8 images (N, H, W, 3) from ``generate`` as PIL images."""
        return image_utils.to_pil(images)

    # -------------------------------------------------------------- helpers

    def _check_size(self, height, width, init) -> tuple[int, int]:
        cfg = self.config
        multiple = cfg.vae.downsample_factor
        if init is not None:
            ih, iw = init.shape[1:3]
            height = ih if height is None else height
            width = iw if width is None else width
            if (height, width) != (ih, iw):
                raise ValueError(
                    f"height x width {height}x{width} differs from the image's {ih}x{iw}; "
                    f"resize the image first (no silent resizing)"
                )
        height = cfg.default_size if height is None else height
        width = cfg.default_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
            if value % multiple:
                raise ValueError(
                    f"{name}={value} is not a multiple of {multiple}, the VAE's downsampling factor; "
                    f"allowed: positive multiples of {multiple}"
                )
        return int(height), int(width)

    def _denoise(
        self,
        sampler,
        plan,
        x,
        context,
        guidance,
        extra,
        blend,
        step_noise,
        *,
        callback,
        progress,
        jit_compile,
        fused,
        execution_options=None,
    ) -> np.ndarray:
        """Run every model evaluation of ``plan`` with one compiled step function.

        The step's inputs (plan tables included) are tensors, so one trace serves
        every step count and prompt; the compiled function is cached per sampler
        and feature set.
        """
        accelerator = has_accelerator()
        if execution_options is not None and jit_compile is not None:
            raise ValueError("pass either jit_compile or execution, not both: execution replaces jit_compile")
        opts = execution_options or execution.default_options(
            self.unet, x.shape, jit_compile=jit_compile, accelerator=accelerator
        )
        key = (
            sampler.name,
            sampler.config,
            getattr(sampler, "eta", None),
            guidance is not None,
            extra is not None,
            blend is not None,
        )

        tables = {k: ops.convert_to_tensor(v) for k, v in plan.tables.items()}
        timesteps = ops.convert_to_tensor(plan.timesteps)
        args = dict(
            context=ops.convert_to_tensor(context),
            guidance=None if guidance is None else ops.convert_to_tensor(np.float32(guidance)),
            extra=None if extra is None else ops.convert_to_tensor(extra),
            blend=None
            if blend is None
            else tuple(ops.convert_to_tensor(np.asarray(b, np.float32)) for b in blend),
        )
        x = ops.convert_to_tensor(x, "float32")
        # What the fast paths need computed once per call (tf_diffusion.execution.prepare).
        unet_batch = x.shape[0] * (2 if guidance is not None else 1)
        extra_channels = 0 if extra is None else extra.shape[-1]
        prepared = execution.prepare(
            self.unet, (unet_batch,) + tuple(x.shape[1:-1]) + (x.shape[-1] + extra_channels,), opts
        )
        state = sampler.init_state(x)
        if fused is None:
            # One program for the loop under XLA, except on a CPU with a progress bar: there a
            # step takes seconds at full size, so the bar advances per step.
            fused = opts.compile in ("xla", "islands") and callback is None and (accelerator or not progress)
        if fused:
            if callback is not None:
                raise ValueError("callback needs the step-by-step loop; pass fused=False (or no callback)")
            loop = self._get_compiled(
                key + (opts, "fused"), lambda: execution.compile(self._make_loop(sampler), opts)
            )
            noise_all = None if step_noise is None else ops.convert_to_tensor(step_noise)
            bar = _progress(1, progress)
            x, _ = loop(x, state, noise_all, tables, timesteps, **args, execution_state=prepared)
            bar.update(1)
            bar.close()
            return ops.convert_to_numpy(x)
        bar = _progress(plan.num_evals, progress)
        compiled = self._get_compiled(
            key + (opts, "step"), lambda: execution.compile(self._make_step(sampler), opts)
        )
        for i in range(plan.num_evals):
            noise_i = None if step_noise is None else ops.convert_to_tensor(step_noise[i])
            index = ops.convert_to_tensor(i, "int32")
            x, state = compiled(index, x, state, noise_i, tables, timesteps, **args, execution_state=prepared)
            if callback is not None:
                callback(i, float(plan.timesteps[i]), ops.convert_to_numpy(x))
            bar.update(1)
        bar.close()
        return ops.convert_to_numpy(x)

    def _make_loop(self, sampler) -> Callable:
        """The whole denoising loop as one function (``ops.fori_loop``), for one XLA program."""
        step = self._make_step(sampler)

        def loop(x, state, step_noise, tables, timesteps, context, guidance, extra, blend):
            def body(i, carry):
                x, state = carry
                noise_i = None if step_noise is None else ops.take(step_noise, i, axis=0)
                return step(i, x, state, noise_i, tables, timesteps, context, guidance, extra, blend)

            return ops.fori_loop(0, ops.shape(timesteps)[0], body, (x, state))

        return loop

    def _make_step(self, sampler) -> Callable:
        """The function for one model evaluation: UNet (guided), sampler step, optional inpaint blend."""
        unet = self.unet

        def step(i, x, state, noise_i, tables, timesteps, context, guidance, extra, blend):
            plan = _TablePlan(tables)
            model_in = sampler.scale_model_input(x, i, plan)
            if extra is not None:
                model_in = ops.concatenate([model_in, extra], axis=-1)
            n = ops.shape(x)[0]
            if guidance is not None:
                model_in = ops.concatenate([model_in, model_in], axis=0)  # [uncond, cond] halves
            t = ops.take(timesteps, i)
            t_batch = ops.broadcast_to(t, (ops.shape(model_in)[0],))
            out = ops.cast(unet(model_in, t_batch, context), "float32")
            if guidance is not None:
                uncond, cond = out[:n], out[n:]
                out = uncond + guidance * (cond - uncond)
            x, state = sampler.step(out, i, x, state, plan, noise=noise_i)
            if blend is not None:
                # 4-channel inpainting: the known region, noised to the next evaluation's level (clean after
                # the last one), replaces the unmasked latents, as diffusers' inpaint pipeline does.
                mask_latent, image_latents, noise, scales = blend
                a, b = scales[i, 0], scales[i, 1]
                proper = image_latents * a + noise * b
                x = (1.0 - mask_latent) * proper + mask_latent * x
            return x, state

        return step

    def _encode_image(self, pixels: np.ndarray, noise: np.ndarray, n: int) -> np.ndarray:
        """Sample the VAE posterior of (k, H, W, 3) images with given noise and repeat it to n."""
        dist = self.vae.encode(ops.convert_to_tensor(pixels, "float32"))
        sample = ops.convert_to_numpy(ops.cast(dist.sample(noise=noise), "float32"))
        return _repeat_to(sample, n)

    def _get_compiled(self, key, make: Callable):
        if key not in self._compiled:
            self._compiled[key] = make()
        return self._compiled[key]


class _TablePlan:
    """A plan view whose tables are tensors (arguments of the compiled step)."""

    def __init__(self, tables):
        self.tables = tables


def _next_noise_scales(sampler, plan) -> np.ndarray:
    """(E, 2) scales (a, b) of diffusers' add_noise as the inpaint pipeline calls it after evaluation i.

    After the last evaluation the known region is used clean: (1, 0).
    """
    scales = np.zeros((plan.num_evals, 2), np.float32)
    scales[-1] = (1.0, 0.0)
    for i in range(plan.num_evals - 1):
        scales[i] = sampler.noise_scales_at(plan, i + 1)
    return scales


# ----------------------------------------------------------------- helpers


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


class _TextBar:
    """A minimal progress bar on stderr when tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def update(self, n):
        import sys

        self.done += n
        sys.stderr.write(f"\rdenoising {self.done}/{self.total}")
        sys.stderr.flush()

    def close(self):
        import sys

        sys.stderr.write("\n")


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total)
    return tqdm(total=total, desc="denoising", leave=False)


def _vae_dtype(dtype):
    """The VAE's policy: float16 overflows in the SD decoder, so it is upcast to float32 (diffusers' force_upcast)."""
    name = dtype if dtype is not None else keras.config.dtype_policy().name
    name = getattr(name, "name", name)
    return "float32" if "float16" in str(name) and "bfloat16" not in str(name) else dtype


def _default_jit_compile(model, accelerator: bool) -> bool:
    """Whether ``execution.default_options`` compiles ``model`` (not the UNet loop) with XLA."""
    return execution.default_options(model, accelerator=accelerator).compile == "xla"


# Re-exported: callers import it from here.
has_accelerator = execution.has_accelerator


def _as_prompt_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _negatives(value, count: int) -> list[str]:
    if value is None:
        return [""] * count
    if isinstance(value, str):
        return [value] * count
    negatives = _as_prompt_list(value, "negative_prompt")
    if len(negatives) != count:
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {count}; give one per prompt "
            f"or a single string"
        )
    return negatives


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


def _repeat_to(array: np.ndarray, n: int) -> np.ndarray:
    """Repeat a (k, ...) batch to n rows, as diffusers does when n is a multiple of k."""
    k = array.shape[0]
    if k == n:
        return array
    if n % k:
        raise ValueError(f"{k} images were given for a batch of {n}; the batch must be a multiple of them")
    return np.concatenate([array] * (n // k))


def _apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Scale hidden states by token weights, then restore each prompt's mean (A1111)."""
    out = hidden.copy()
    for b in range(hidden.shape[0]):
        if np.all(weights[b] == 1.0):
            continue  # a plain prompt keeps exactly the plain CLIP encoding
        original_mean = hidden[b].mean()
        scaled = hidden[b] * weights[b][:, None]
        out[b] = scaled * (original_mean / scaled.mean())
    return out
