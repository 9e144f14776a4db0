"""StableDiffusion: the four components built from one PipelineConfig, and the generate() driver."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from tf_diffusion import execution, sdxl
from tf_diffusion import images as image_utils
from tf_diffusion import noise as noise_lib
from tf_diffusion.config import PipelineConfig, SD3Config
from tf_diffusion.denoising import (
    Conditioning,
    DenoiseProgram,
    LocalExecutor,
    MaskBlend,
)
from tf_diffusion.family_hooks import check_family_options, hooks_for, hooks_for_source
from tf_diffusion.noise import image_seeds
from tf_diffusion.presets import get_any_preset
from tf_diffusion.schedulers.base import check_fraction
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.vae import AutoencoderKL, DiagonalGaussian

OUTPUT_TYPES = ("uint8", "float", "latent")
# generate(masked_content=): what the masked area of the encoded image is before noise is added (the web UI's
# "Masked content" radio, less "fill", which works on pixels before the encode).
MASKED_CONTENTS = ("original", "latent_noise", "latent_nothing")


class StableDiffusion:
    """A Stable Diffusion model: tokenizers, text encoders, denoiser backbone and VAE, of any family.

    The family (SD 1.x / 2.x, SDXL, SD3 / SD3.5) is the config's; what differs between families is
    asked of its ``family_hooks.FamilyHooks`` (``self.hooks``). SD3 models have ``transformer``,
    ``text_encoder_3`` and ``tokenizer_3`` where the UNet families have ``unet``.

    Attributes:
        config: the PipelineConfig (or SD3Config) the components were built from.
        tokenizer: CLIPTokenizer giving (B, 77) int32 token ids.
        text_encoder: CLIPTextEncoder, ids -> (B, 77, D) hidden states as SD consumes them.
        unet: UNetModel, (latents NHWC, timesteps, context) -> noise prediction.
        vae: AutoencoderKL with ``encode`` (images in [-1, 1]) and ``decode`` (unscaled latents).
        lora_dir: the folder that ``<lora:NAME:WEIGHT>`` tags in prompts name (None: tags are an
            error); see ``tf_diffusion.adapters.extra_networks``.

    Example:
        >>> sd = StableDiffusion.from_preset("sd-v1-5")  # random weights, full size
    """

    def __init__(
        self,
        config: PipelineConfig | SD3Config,
        *,
        dtype: str | None = None,
        tokenizer: CLIPTokenizer | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        tokenizer_3=None,
    ):
        """Build every component of ``config`` with freshly initialised weights.

        Args:
            config: the model to build.
            dtype: a Keras dtype policy name ("float32", "mixed_float16",
                "mixed_bfloat16", ...) for all components; None uses the global policy.
            tokenizer: a tokenizer to use instead of the packaged CLIP vocabulary.
            tokenizer_2: SDXL and SD3: the second encoder's tokenizer; default ``tokenizer``'s vocabulary
                padded with ``config.tokenizer_2.pad_token_id``. Flux: the T5 tokenizer.
            tokenizer_3: SD3: the T5 tokenizer (``t5.T5Tokenizer``; it needs the checkpoint's
                ``spiece.model``), needed to encode prompts when the config has ``text_encoder_3``.

        Raises:
            ValueError: for a config that is neither a ``PipelineConfig`` nor an ``SD3Config``.
        """
        self.hooks = hooks_for(config)  # what differs per family (tf_diffusion.family_hooks)
        self.config = config
        tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3}
        self.hooks.build(self, dtype, tokenizers)
        # How loops, decodes and text encodes run (and their compiled functions); see generate(executor=).
        self.executor = LocalExecutor()
        self.lora_dir = None
        self.vae_source = None  # a VAE file loaded in place of the checkpoint's (load_vae)
        self.vae_fields = {}  # its PNG parameters, as the web UI writes them ("VAE hash", "VAE")
        self.vae_tiling = None  # enable_vae_tiling()
        self._checkpoint_vae = config.vae  # what a VAE file without a config runs with
        # IP-Adapter (adapters.ip_adapter): the loaded adapters, their scales and image encoder.
        self.ip_adapters, self.ip_adapter_scale, self.image_encoder = (), (), None

    @classmethod
    def from_preset(cls, name: str, *, dtype: str | None = None) -> StableDiffusion:
        """Build a preset's architecture with random weights.

        Args:
            name: a key of ``tf_diffusion.PRESETS`` ("sd-v1-5", "sd-v2-1", ...) or of
                ``tf_diffusion.SD3_PRESETS`` ("sd3-medium", "sd3.5-large", ...).
            dtype: optional Keras dtype policy name for all components.

        Raises:
            ValueError: for an unknown preset name.
        """
        return cls(get_any_preset(name), dtype=dtype)

    @classmethod
    def from_pretrained(cls, source, *, quantize=None, quantize_components=None, **kwargs) -> StableDiffusion:
        """Load any supported checkpoint: a file, a folder or a hub id, of any family.

        The family whose loaders read ``source`` is asked first (``family_hooks.hooks_for_source``): SD3 /
        SD3.5 diffusers folders and single files go to the SD3 loaders (arguments ``dtype``, ``load_t5``;
        single files also ``config``, ``text_encoders_from``, ``tokenizer_3``: see
        ``StableDiffusion3.from_single_file``); everything else to ``tf_diffusion.weights.loading.from_pretrained``
        (dtype, config, tokenizer, prediction_type, use_ema, variant, revision, vae). ``quantize="int8"``
        stores the denoiser's and text encoders' linear weights in int8 (``quantize_components``: which
        components; see ``tf_diffusion.execution.quantize``).

        Raises:
            ValueError: for arguments the family's loader does not take, and see the loaders.
        """
        from tf_diffusion.execution import quantize as quantizing

        # quantize= (execution.quantize): the chosen components are built with int8 weights.
        build = quantizing.builder(cls, quantize, quantize_components)
        hooks = hooks_for_source(source, revision=kwargs.get("revision"))
        return hooks.load(build, source, **kwargs)

    @classmethod
    def from_single_file(cls, path, **kwargs) -> StableDiffusion:
        """Load an original single file (``.safetensors``, ``.ckpt``), as diffusers' ``from_single_file``:
        ``from_pretrained`` with a file (SD 1.x / 2.x, SDXL, SD3 / SD3.5)."""
        return cls.from_pretrained(path, **kwargs)

    def save_pretrained(self, destination, **kwargs):
        """Write the model ("tf_diffusion" folder by default; "diffusers" or "single-file").

        See ``tf_diffusion.weights.loading.save_pretrained`` for the arguments.
        """
        from tf_diffusion.weights.loading import save_pretrained

        return save_pretrained(self, destination, **kwargs)

    def load_vae(self, source, *, variant: str | None = None) -> None:
        """Replace the VAE with one from ``source``, as the web UI's "SD VAE" setting and diffusers' ``vae=``.

        ``source`` is a diffusers AutoencoderKL folder (or a pipeline folder, or a hub id: its ``vae/``), whose
        ``scaling_factor`` and ``force_upcast`` then apply (the fp16-fix SDXL VAE runs in float16 under
        ``mixed_float16``), or a single file (``.safetensors``, ``.pt``, ``.ckpt``, ``.bin``) with the original
        or diffusers key names, with or without ``first_stage_model.``, which keeps the model's scaling factor.
        The model is unchanged if anything fails: the new VAE is built and filled before it replaces the old.
        ``vae_source`` then names the file or folder, and the PNG parameters carry ``VAE hash`` / ``VAE`` as
        the web UI writes them.

        Raises:
            FileNotFoundError: no such file or folder.
            ValueError: not a VAE, or one of another architecture (names the values), or a bad file.
        """
        from tf_diffusion.fileio import reading
        from tf_diffusion.weights.state_dict import StateDictError, load_state_dict
        from tf_diffusion.weights.vae_file import read_vae

        with reading(source), read_vae(source, self._checkpoint_vae, variant=variant) as weights:
            vae_config = weights.config_for(self._checkpoint_vae)
            # The decoder's first convolution reads the latents (torch layout: out, in, kh, kw).
            conv_in = weights.tensors.get("decoder.conv_in.weight")
            have = self.config.vae.latent_channels
            if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != have:
                raise ValueError(
                    f"{weights.path}: a VAE of {conv_in.shape[1]} latent channels cannot replace the "
                    f"{have}-channel VAE of {self.config.name}; use a VAE made for this model family"
                )
            policy = getattr(self, self.hooks.backbone).dtype_policy.name
            vae = AutoencoderKL(vae_config, dtype=self.hooks.vae_dtype(policy, vae_config))
            try:
                load_state_dict(vae, weights.tensors)
            except StateDictError as error:
                raise ValueError(f"{weights.path}: this VAE does not fit the model's VAE: {error}") from None
        execution.apply(vae)
        self.vae, self.config = vae, self.config.replace(vae=vae_config)
        self.vae_source = str(weights.path)
        # The web UI records a VAE file by its name and the hash it gives checkpoints; a folder by its name.
        self.vae_fields = {"VAE": weights.path.name}
        if weights.path.is_file():
            from tf_diffusion.infotext import model_hash

            self.vae_fields = {"VAE hash": model_hash(weights.path), **self.vae_fields}

    # LoRA, with diffusers' method names; see tf_diffusion.adapters.lora for the arguments.
    def load_lora_weights(self, path, adapter_name: str | None = None, weight=1.0) -> str:
        """Load a kohya / A1111 or diffusers / PEFT LoRA and merge it in (``adapters.lora.load_lora_weights``)."""
        self.hooks.require_adapter(self.config, "lora")
        from tf_diffusion.adapters import lora

        return lora.load_lora_weights(self, path, adapter_name=adapter_name, weight=weight)

    def set_adapters(self, names, adapter_weights=None) -> None:
        """Choose the active LoRAs and their weights (``adapters.lora.set_adapters``)."""
        from tf_diffusion.adapters import lora

        lora.set_adapters(self, names, adapter_weights)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA; the base weights come back bit for bit (``adapters.lora.unload_lora_weights``)."""
        from tf_diffusion.adapters import lora

        lora.unload_lora_weights(self)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """A no-op: LoRAs are always merged into the weights (``adapters.lora.fuse_lora``)."""
        from tf_diffusion.adapters import lora

        lora.fuse_lora(self, lora_scale)

    def unfuse_lora(self) -> None:
        """A no-op, as ``fuse_lora``; use ``unload_lora_weights`` to remove LoRAs."""
        from tf_diffusion.adapters import lora

        lora.unfuse_lora(self)

    def load_textual_inversion(
        self, path, token: str | None = None, text_encoder=None, tokenizer=None
    ) -> str:
        """Load an A1111, SDXL or diffusers embedding; its word then works in prompts.

        ``text_encoder`` / ``tokenizer`` load it into one encoder only, as diffusers does for SDXL's
        ``text_encoder_2`` (``adapters.textual_inversion.load_textual_inversion``).
        """
        self.hooks.require_adapter(self.config, "textual_inversion")
        from tf_diffusion.adapters import textual_inversion

        return textual_inversion.load_textual_inversion(self, path, token, text_encoder, tokenizer)

    def unload_textual_inversion(self, tokens=None) -> None:
        """Forget embeddings: all, or the given words (``adapters.textual_inversion``)."""
        from tf_diffusion.adapters import textual_inversion

        textual_inversion.unload_textual_inversion(self, tokens)

    # IP-Adapter, with diffusers' method names; see tf_diffusion.adapters.ip_adapter.
    def load_ip_adapter(self, path, image_encoder=None) -> None:
        """Load an IP-Adapter file (or a list: several at once) and its image encoder
        (``adapters.ip_adapter.load_ip_adapter``); then ``generate(ip_adapter_image=...)``."""
        self.hooks.require_adapter(self.config, "ip_adapter")
        from tf_diffusion.adapters import ip_adapter

        ip_adapter.load_ip_adapter(self, path, image_encoder=image_encoder)

    def set_ip_adapter_scale(self, scale) -> None:
        """Each IP-Adapter's scale: a number, or one per adapter (``adapters.ip_adapter``)."""
        from tf_diffusion.adapters import ip_adapter

        ip_adapter.set_ip_adapter_scale(self, scale)

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapters and their image encoder (``adapters.ip_adapter.unload_ip_adapter``)."""
        from tf_diffusion.adapters import ip_adapter

        ip_adapter.unload_ip_adapter(self)

    def __repr__(self) -> str:
        return f"StableDiffusion(config={self.config.name!r})"

    # ------------------------------------------------------------------ text

    def encode_prompts(self, prompts: Sequence[str], executor=None, **options):
        """Encode prompts as the family does (``hooks.encode_prompts``).

        SD 1.x / 2.x: A1111 weights and 75-token chunking (see ``tf_diffusion.prompts``); all prompts of
        one call get the same number of chunks (shorter ones are padded with empty chunks), so they can be
        batched. SDXL: both encoders' penultimate states concatenated (``tf_diffusion.sdxl.encode_prompts``
        also gives the pooled embedding). SD3: ``(context, pooled)`` (``tf_diffusion.sd3.encode_prompts``;
        option ``max_sequence_length``).

        Args:
            prompts: the texts.
            executor: what runs the encoders; default this model's.
            options: the family's encoding options.

        Returns:
            (len(prompts), 77 * chunks, D) float32 hidden states for the UNet families.
        """
        return self.hooks.encode_prompts(
            self, prompts, self.executor if executor is None else executor, **options
        )

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
        mask_blur: float | None = None,
        masked_content: str = "original",
        resize_latents: bool = False,
        controlnet=None,
        control_image=None,
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        guess_mode: bool = False,
        ip_adapter_image=None,
        ip_adapter_scale=None,
        sdxl_options=None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        callback: Callable | None = None,
        progress: bool = True,
        output_type: str = "uint8",
        jit_compile: bool | None = None,
        fused: bool | None = None,
        execution: execution.ExecutionOptions | None = None,
        executor=None,
        **family_options,
    ) -> GeneratedImages:
        """Generate images: text-to-image, image-to-image (``image``) or inpainting (``image`` + ``mask``).

        Noise (``tf_diffusion.noise``): image ``b`` of the batch gets the seed ``seed + b`` (images are
        ordered prompt by prompt, ``num_images`` each), and every random draw for that image (initial
        latents, VAE posterior samples, per-step noise) is a function of its seed alone. So an image is
        reproduced alone from its seed, in any batch, on TensorFlow or JAX, sharded, or through the
        exported SavedModel; ``info.seeds`` of the result lists them.

        Args:
            prompt: a prompt or a list of prompts (A1111 weights such as ``(word:1.3)``
                and prompts over 75 tokens are supported). An empty prompt is valid.
                ``<lora:NAME:WEIGHT>`` tags merge LoRAs from ``self.lora_dir`` for this call and stay
                merged while later calls name the same set (``tf_diffusion.adapters.extra_networks``);
                loaded embeddings' words use their vectors.
            negative_prompt: one for all prompts, or a list with one per prompt.
            num_steps: sampler steps (>= 1); default ``config.default_steps`` (50 for SD, as
                diffusers). With ``image``, ``int(num_steps * strength)`` of them run, as in diffusers.
            guidance_scale: classifier-free guidance; <= 1 skips the unconditional half. Default
                ``config.default_guidance`` (7.5 for SD).
            height, width: output size in pixels, multiples of the VAE's downsampling
                factor (8 for SD). Default: the image's size, else the model's default size.
            num_images: images per prompt.
            seed: the first image's seed, an integer in [0, 2**63 - 1]; None draws one (reported in
                ``info.seeds``).
            latents: initial noise (N, h, w, C) NHWC, used instead of the seeded initial latents and
                scaled by the sampler's initial sigma as diffusers scales it (other draws still come
                from fresh seeds); the way to hand diffusers' own noise in.
            scheduler: a sampler name ("ddim", "euler", "dpmpp_2m_karras", ...) or a
                sampler object; default ``config.default_sampler`` (PNDM for SD, as diffusers).
            image: init image for img2img / inpainting: PIL, or uint8 / uint16 / float
                [0, 1] array (H, W), (H, W, C) or (N, H, W, C); RGBA and grayscale are converted.
            strength: how much of the schedule to run from the noised image, in [0, 1];
                default 0.8 for img2img and the family's for inpainting (1.0; 0.9999 for SDXL, whose
                inpaint pipeline starts from the noised image, one step short of the full schedule), as
                diffusers.
            mask: inpainting mask, white (>= 0.5) = repaint; the same size as ``image``.
            mask_blur: inpainting only: paste the init image's pixels back outside the mask after
                decoding, blending across a Gaussian blur of this radius in pixels (0: a hard edge), as the
                AUTOMATIC1111 web UI does (its default is 4; the CLI's too). None (the default) returns
                the decoded image as diffusers does, where the kept area changes a little with the decode.
            masked_content: inpainting with a 4-channel model: what the masked area of the encoded image
                holds before the sampler noises it: "original" (the image, as diffusers), "latent_noise"
                (the image's own seeded initial noise, as the web UI's "latent noise") or
                "latent_nothing" (zeros, its "latent nothing").
            resize_latents: image-to-image without a mask: the image, of any size that is a multiple of
                the VAE factor, is encoded at its own size and its latents resized bilinearly to
                height x width (the web UI's "Just resize (latent upscale)"), instead of requiring the
                image at the output size.
            controlnet: a ``tf_diffusion.ControlNet`` or a list of them (their residuals are summed,
                as diffusers' MultiControlNetModel does); see ``tf_diffusion.adapters.controlnet``.
            control_image: the hint image, or a list with one per net: PIL or uint8 / float [0, 1]
                arrays (H, W, C) or (N, H, W, C) of the output size (one image for all outputs, or
                one per prompt); another size is an error (no silent resizing).
            controlnet_conditioning_scale: a number, or one per net.
            control_guidance_start, control_guidance_end: fractions of the evaluations within which
                each net acts (a number, or one per net), as diffusers computes them.
            guess_mode: diffusers' guess mode: the nets act on the conditional half only, with
                residuals scaled from 0.1 (shallow) to 1 (middle).
            ip_adapter_image: with IP-Adapters loaded (``load_ip_adapter``): the picture (PIL or
                array) or list of pictures for the adapter (all their tokens are attended to, as
                diffusers does); with several adapters a list with one such entry per adapter.
            ip_adapter_scale: a number, or one per adapter; default the ``set_ip_adapter_scale`` value.
            sdxl_options: SDXL only: the micro-conditioning values (original size, crop top-left,
                target size; the refiner's aesthetic scores), a ``tf_diffusion.sdxl.SDXLOptions`` or a
                dict of its fields (diffusers' argument names and defaults); an error for other models.
            denoising_start: SDXL's "ensemble of experts" refiner: the fraction in (0, 1) of the schedule
                already done. With ``latents=`` (the base's ``output_type="latent"`` result, or that
                result passed as ``image``) those latents are continued as they are, from the first
                timestep below the cut-off, as diffusers' ``denoising_start`` (no strength-based cut, no
                added noise; ``seed`` then seeds only the sampler's own noise). With a pixel ``image`` it
                is encoded and continued without added noise, as diffusers does.
            denoising_end: the fraction in (0, 1) of the schedule to run before stopping (the base of
                the hand-off, usually with ``output_type="latent"``), as diffusers' ``denoising_end``.
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
            fused: run the whole loop as one compiled function (``ops.fori_loop``) rather than one
                compiled step per Python iteration; default: fused under XLA on an accelerator without
                a callback. The two give the same result.
            execution: how the denoising loop runs (``tf_diffusion.execution.ExecutionOptions``,
                e.g. ``ExecutionOptions(compile="islands", winograd=True)``), instead of
                ``jit_compile``'s choice; the decode still follows ``jit_compile``.
            executor: what runs the loop, the decode and the text encoder; default this model's
                ``LocalExecutor`` (``tf_diffusion.distributed.ShardedExecutor`` spreads the batch).
            family_options: options only the model's family reads (``hooks.options``); an option given
                to a family without it is an error naming the option and the family. SD3 / SD3.5:
                ``max_sequence_length`` (T5 tokens, 1..512; default the config's), and diffusers'
                skip-layer guidance for text-to-image with guidance: ``skip_guidance_layers`` (block
                indices; SD3.5 Medium: ``(7, 8, 9)``), ``skip_layer_guidance_scale`` (2.8),
                ``skip_layer_guidance_start`` (0.01), ``skip_layer_guidance_stop`` (0.2): at evaluations
                ``i`` with ``start * num_steps < i < stop * num_steps`` the prediction gains ``scale *
                (cond - cond without these blocks)``. SD3 defaults: 28 steps, guidance 7.0, strength 0.6
                (diffusers' SD3 pipelines), whose image-to-image skips ``int(num_steps - num_steps *
                strength)`` steps and takes strength in (0, 1].

        Returns:
            ``GeneratedImages``: the images (or latents) as a NumPy array, with ``.info`` telling what
            was done (seeds, sampler, steps, strength, size, model).

        Raises:
            ValueError: for any invalid argument, naming the value and what is allowed.
        """
        from tf_diffusion.adapters import controlnet as controlnet_adapter
        from tf_diffusion.adapters import extra_networks
        from tf_diffusion.adapters import ip_adapter as ip_adapter_lib

        cfg, hooks = self.config, self.hooks
        family_options = check_family_options(cfg, hooks, family_options)
        executor = self.executor if executor is None else executor
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _negatives(negative_prompt, len(prompts))
        num_images = _positive_int(num_images, "num_images")
        num_steps = _positive_int(cfg.default_steps if num_steps is None else num_steps, "num_steps")
        guidance_scale = float(cfg.default_guidance if guidance_scale is None else guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not allowed; expected one of {OUTPUT_TYPES}")
        if mask_blur is not None:
            if mask is None:
                raise ValueError(
                    "mask_blur applies to inpainting only; pass mask=... (or leave mask_blur None)"
                )
            if (
                isinstance(mask_blur, bool)
                or not isinstance(mask_blur, (int, float, np.integer, np.floating))
                or not 0 <= mask_blur <= 64
            ):
                raise ValueError(f"mask_blur={mask_blur!r} must be a number of pixels in [0, 64], or None")
            if output_type == "latent":
                raise ValueError("mask_blur pastes pixels back, so it needs output_type 'uint8' or 'float'")
        if masked_content not in MASKED_CONTENTS:
            raise ValueError(
                f"masked_content={masked_content!r} is not allowed; expected one of {MASKED_CONTENTS}"
            )
        if masked_content != "original" and (mask is None or image is None):
            raise ValueError(f"masked_content={masked_content!r} applies to inpainting; pass image and mask")
        if not isinstance(resize_latents, bool):
            raise ValueError(f"resize_latents={resize_latents!r} must be True or False")
        if resize_latents and (image is None or mask is not None or denoising_start is not None):
            raise ValueError(
                "resize_latents applies to image-to-image from a pixel image without a mask (no denoising_start)"
            )
        denoising_start = check_fraction(denoising_start, "denoising_start")
        denoising_end = check_fraction(denoising_end, "denoising_end")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(
                f"denoising_start={denoising_start} must be below denoising_end={denoising_end} "
                f"(the part of the schedule to run)"
            )
        image, latents, handoff = _handoff_inputs(image, latents, mask, denoising_start)
        if handoff and mask_blur is not None:
            raise ValueError(
                "mask_blur pastes the init image's pixels back, and handed-over latents have none; leave it "
                "None and paste back yourself (tf_diffusion.images.paste_back), as the CLI's --refiner does"
            )
        if seed is not None and latents is not None and not handoff:
            raise ValueError("pass either seed or latents, not both: latents replace the seeded noise")
        init, mask_px = self._task_images(image, mask, handoff=handoff)
        strength = hooks.check_strength(cfg, strength, init, mask_px)
        image_task = init is not None or handoff
        if sdxl_options is not None and not cfg.is_sdxl:
            raise ValueError(
                f"sdxl_options apply to SDXL models only; {cfg.name} is not one (no added conditioning)"
            )
        options = sdxl.SDXLOptions.from_value(sdxl_options)
        sdxl.check_options(cfg, options, image_task=image_task)
        if handoff:
            height, width = self._handoff_size(latents, height, width)
            if mask_px is not None and mask_px.shape[1:3] != (height, width):
                raise ValueError(
                    f"mask size {mask_px.shape[2]}x{mask_px.shape[1]} (WxH) differs from the handed-over "
                    f"latents' image size {width}x{height}; they must match"
                )
        if resize_latents:
            self.check_size(*init.shape[1:3])  # the image's own size must suit the VAE
            height, width = self.check_size(height, width)
        else:
            height, width = self.check_size(height, width, init)
        if controlnet is not None:
            self.hooks.require_adapter(self.config, "controlnet")
        control = controlnet_adapter.prepare(
            self,
            controlnet,
            control_image,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            guess_mode,
            height=height,
            width=width,
            num_prompts=len(prompts),
            num_images=num_images,
        )
        factor = cfg.vae.downsample_factor
        shape = (height // factor, width // factor, cfg.vae.latent_channels)  # (h, w, C) per image
        n = len(prompts) * num_images
        ip_plan = ip_adapter_lib.prepare(self, ip_adapter_image, ip_adapter_scale, rows=n)
        seeds = image_seeds(seed, n)

        sampler = hooks.sampler(cfg, scheduler, shape)
        if cfg.requires_aesthetics_score and not image_task:
            raise ValueError(
                f"{cfg.name} is an SDXL refiner (image-to-image only); pass image=... to refine, or a base "
                f"model's latents with latents=... and denoising_start=..."
            )
        plan = hooks.plan(sampler, num_steps, strength, init is not None, denoising_start, denoising_end)
        # Flux [dev], LCM UNets: the scale is an input, not two passes (Flux's true_cfg_scale: two passes).
        guidance, cfg_scale = hooks.guidance_rule(
            cfg, guidance_scale, negatives_given=negative_prompt is not None, **family_options
        )

        if latents is None:
            noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
        else:
            noise = np.asarray(latents, dtype=np.float32)
            if noise.shape != (n, *shape):
                raise ValueError(
                    f"latents have shape {noise.shape}; expected {(n, *shape)} (N, h, w, C) NHWC"
                )

        # After every argument check: <lora:...> tags merge their LoRAs and leave the text
        # (adapters.extra_networks).
        prompt_texts, negative_texts, extra_params = extra_networks.prepare(self, prompts, negatives)
        extra_params = {**hooks.infotext(cfg, sampler), **extra_params}
        if self.vae_fields:
            extra_params = {**self.vae_fields, **extra_params}
        if control is not None:
            extra_params = {**extra_params, **control.infotext()}
        if ip_plan is not None:
            extra_params = {
                **extra_params,
                **ip_plan.infotext(first=0 if control is None else len(control.nets)),
            }
        # Text: one bundle per image, prompt by prompt.
        cond, uncond = hooks.text_conditioning(
            self,
            prompt_texts,
            negative_texts,
            negatives_given=negative_prompt is not None,
            guided=guidance.copies == 2,
            guidance_scale=guidance_scale,
            num_images=num_images,
            height=height,
            width=width,
            executor=executor,
            options=options,
            image_task=image_task,
            **family_options,
        )
        if handoff:
            # The base's latents, continued without added noise (diffusers' add_noise=False).
            task = _Task(x=noise)
            if mask_px is not None:
                # Under a mask the kept region follows the handed latents, noised to each next timestep with
                # the seed's own draw, as diffusers' inpaint pipeline blends them.
                blend_noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
                blend = MaskBlend()
                task.hooks = (blend,)
                task.rows[blend.name] = {
                    "mask": self._latent_mask(mask_px, n),
                    "image_latents": noise,
                    "noise": blend_noise,
                }
                task.shared[blend.name] = {"scales": _next_noise_scales(sampler, plan)}
        else:
            task = self._prepare_task(
                sampler,
                plan,
                noise,
                seeds,
                init,
                mask_px,
                strength,
                add_noise=denoising_start is None,
                masked_content=masked_content,
            )
        if control is not None:
            task.extras.update(control.extras())
        if task.extras:
            cond = Conditioning(cond.context, {**cond.extras, **task.extras})
            uncond = (
                None if uncond is None else Conditioning(uncond.context, {**uncond.extras, **task.extras})
            )
        if ip_plan is not None:  # the unconditional rows see the blank image's tokens
            cond = Conditioning(cond.context, {**cond.extras, **ip_plan.extras(n)})
            if uncond is not None:
                uncond = Conditioning(uncond.context, {**uncond.extras, **ip_plan.extras(n, uncond=True)})

        rows = {"cond": cond.tree(), **task.rows}
        if uncond is not None:
            rows["uncond"] = uncond.tree()
        shared = {"tables": dict(plan.tables), "timesteps": plan.timesteps, **task.shared}
        if guidance.copies == 2:
            shared["guidance_scale"] = np.float32(cfg_scale)
        per_step = {}
        if sampler.needs_noise:
            steps = noise_lib.batch_normal(seeds, noise_lib.STEPS, (plan.num_evals, *shape))  # (N, E, ...)
            per_step["noise"] = np.ascontiguousarray(np.swapaxes(steps, 0, 1))  # (E, N, h, w, C)
        if control is not None:
            per_step.update(control.per_step(plan.num_evals, n, guided=guidance.copies == 2))
        # Adapters wrap the UNet denoiser: IP-Adapter's tokens innermost, ControlNet's residuals around.
        denoiser = self.denoiser if ip_plan is None else ip_plan.denoiser(self.denoiser)
        if control is not None:
            denoiser = control.denoiser(denoiser)
        denoiser, family_per_step = hooks.denoiser(
            self,
            denoiser,
            family_options,
            plan=plan,
            n=n,
            guided=guidance.copies == 2,
            image_task=image_task,
            guidance_scale=guidance_scale,
            num_steps=num_steps,
        )
        per_step.update(family_per_step)
        program = self.denoise_program(
            sampler,
            guidance,
            hooks=task.hooks,
            denoiser=None if denoiser is self.denoiser else denoiser,
        )
        x = executor.run(
            program,
            task.x,
            {"rows": rows, "per_step": per_step, "shared": shared},
            callback=callback,
            progress=progress,
            jit_compile=jit_compile,
            fused=fused,
            options=execution,
        )

        info = GenerationInfo(
            model=cfg.name,
            mode="txt2img" if not image_task else ("inpaint" if mask_px is not None else "img2img"),
            prompts=tuple(p for p in prompts for _ in range(num_images)),
            negative_prompts=tuple(p for p in negatives for _ in range(num_images)),
            seeds=tuple(seeds),
            seeded_latents=latents is None or handoff,
            sampler=sampler.name,
            sampler_options=dict(sampler.options()),
            num_steps=num_steps,
            num_evals=plan.num_evals,
            guidance_scale=guidance_scale,
            strength=None if init is None or denoising_start is not None else strength,
            mask_blur=None if mask_blur is None else float(mask_blur),
            height=height,
            width=width,
            output_type=output_type,
            extra_params=extra_params,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            sdxl_options={k: getattr(options, k) for k in options.given()},
        )
        if output_type == "latent":
            return GeneratedImages.wrap(x, info)
        decoded = self.decode_latents(x, jit_compile=jit_compile, executor=executor)
        if mask_blur is not None:
            decoded = image_utils.paste_back(decoded, init * 2.0 - 1.0, mask_px, float(mask_blur))
        if output_type == "float":
            return GeneratedImages.wrap(np.clip(decoded * 0.5 + 0.5, 0.0, 1.0), info)
        return GeneratedImages.wrap(image_utils.to_uint8(decoded), info)

    def denoise_program(self, sampler, guidance, hooks: tuple = (), denoiser=None) -> DenoiseProgram:
        """The sampling computation of this model: ``sampler`` over the UNet denoiser with ``guidance``.

        Executors run it (``LocalExecutor``, ``ShardedExecutor``); the SavedModel export traces its loop.
        ``denoiser``: one that wraps ``self.denoiser`` (an adapter's, e.g. ControlNet's), instead of it.
        """
        # Executors cache compiled functions by DenoiseProgram.key, so a fresh program is cheap.
        return DenoiseProgram(
            sampler, self.denoiser if denoiser is None else denoiser, guidance, tuple(hooks)
        )

    def decode_latents(self, latents, jit_compile: bool | None = None, executor=None) -> np.ndarray:
        """The denoiser's latents (N, h, w, C) -> images (N, H, W, 3) in [-1, 1] as float32.

        Undoes the VAE's latent convention, ``(z - shift_factor) * scaling_factor`` (the shift is 0
        but for SD3's 16-channel VAE), then decodes as ``decode``.
        """
        executor = self.executor if executor is None else executor
        vae = self.config.vae
        z = np.asarray(latents, np.float32) / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor)
        return executor.decode(self.vae, z, jit_compile, tiling=self.vae_tiling)

    def decode(self, latents, jit_compile: bool | None = None, executor=None) -> np.ndarray:
        """Unscaled latents (N, h, w, C) -> images (N, H, W, 3) in [-1, 1] as float32.

        The VAE runs in float32 when the rest of the model is float16, so the
        decode never overflows to NaN or black images (diffusers upcasts likewise).
        ``jit_compile`` as in ``generate``: by default XLA on accelerators, under JAX and
        in float32 on a CPU, graph mode otherwise.
        """
        executor = self.executor if executor is None else executor
        return executor.decode(self.vae, latents, jit_compile, tiling=self.vae_tiling)

    def enable_vae_tiling(self, tile_size: int | None = None, overlap: float = 0.25) -> None:
        """Decode and encode large images in overlapping tiles, so the VAE's memory stays flat, as diffusers'
        ``enable_vae_tiling``: ``tile_size`` pixels (default the model's size: 512 for SD 1.x, 1024 for SDXL),
        ``overlap`` the blended part (0.25). Images no larger than a tile are unchanged; larger ones differ from
        an untiled decode near the seams only, as diffusers' do.

        Raises:
            ValueError: a tile size or stride that is not a multiple of the VAE's factor, or a bad overlap.
        """
        from tf_diffusion.execution.tiling import VAETiling

        tiling = VAETiling(self.config.default_size if tile_size is None else tile_size, overlap)
        tiling.check(self.config.vae.downsample_factor)
        self.vae_tiling = tiling

    def disable_vae_tiling(self) -> None:
        """Decode and encode whole images again."""
        self.vae_tiling = None

    @staticmethod
    def to_pil(images) -> list:
        """uint8 images (N, H, W, 3) from ``generate`` as PIL images."""
        return image_utils.to_pil(images)

    def check_size(self, height, width, init=None) -> tuple[int, int]:
        """The output size in pixels: the given one, the init image's, or the model's default.

        Raises:
            ValueError: for sizes that are not positive multiples of the VAE factor, or that differ
                from the init image's (no silent resizing).
        """
        cfg = self.config
        multiple, reason = self.hooks.size_multiple(cfg)
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
                    f"{name}={value} is not a multiple of {multiple}{reason}; "
                    f"allowed: positive multiples of {multiple}"
                )
        return int(height), int(width)

    # -------------------------------------------------------------- tasks

    def _task_images(self, image, mask, handoff=False):
        """The init image (k, H, W, 3) in [0, 1] and the binarised mask (k, H, W, 1), each or None.

        ``handoff``: the image is handed-over latents, so the mask stands alone (its size is checked later).
        """
        cfg = self.config
        init = None if image is None else image_utils.to_rgb(image, "image")
        mask_px = None
        if mask is not None:
            if init is None and not handoff:
                raise ValueError("mask needs an image to inpaint; pass image=... as well")
            mask_px = image_utils.to_mask(mask, "mask")
            if init is not None and mask_px.shape[1:3] != init.shape[1:3]:
                raise ValueError(
                    f"mask size {mask_px.shape[2]}x{mask_px.shape[1]} (WxH) differs from the image size "
                    f"{init.shape[2]}x{init.shape[1]}; they must match"
                )
            mask_px = (mask_px >= 0.5).astype(np.float32)  # diffusers binarises the mask: >= 0.5 repaints
        if cfg.is_inpainting and mask_px is None:
            raise ValueError(f"{cfg.name} is an inpainting model (9-channel UNet); pass image and mask")
        if cfg.is_inpainting and handoff:
            raise ValueError(
                f"{cfg.name} is an inpainting model (9-channel UNet), which needs the masked image in pixels; "
                "handed-over latents can be inpainted by a 4-channel model (a refiner, as diffusers does)"
            )
        return init, mask_px

    def _handoff_size(self, latents, height, width) -> tuple:
        """The output size of handed-over latents (N, h, w, C): theirs times the VAE factor."""
        shape = np.shape(latents)
        channels = self.config.vae.latent_channels
        if len(shape) != 4 or shape[-1] != channels:
            raise ValueError(
                f"latents have shape {tuple(shape)}; handed-over latents are (N, h, w, {channels}) NHWC"
            )
        factor = self.config.vae.downsample_factor
        size = (int(shape[1]) * factor, int(shape[2]) * factor)
        given = (size[0] if height is None else height, size[1] if width is None else width)
        if given != size:
            raise ValueError(
                f"height x width {given[0]}x{given[1]} differs from the handed-over latents' "
                f"{size[0]}x{size[1]}; leave them out"
            )
        return size

    def _prepare_task(
        self,
        sampler,
        plan,
        noise,
        seeds,
        init,
        mask_px,
        strength,
        *,
        add_noise=True,
        masked_content="original",
    ) -> _Task:
        """Starting latents and task inputs for text-to-image, image-to-image and both inpainting modes.

        ``add_noise=False`` (``denoising_start``): the encoded image is continued as it is. An init image of
        another size than the noise (``resize_latents``) is encoded at its size, its latents resized.
        """
        cfg = self.config
        # Latents are (z - shift) * scale (the shift is 0 but for SD3's VAE, leaving SD's arithmetic exact).
        n, sf, shift = noise.shape[0], np.float32(cfg.vae.scaling_factor), np.float32(cfg.vae.shift_factor)
        shape = noise.shape[1:]
        if init is None:
            return _Task(x=noise * np.float32(plan.init_noise_sigma))
        task = _Task(x=None)
        image_latents = None
        if not (cfg.is_inpainting and strength >= 1.0):  # the 9-channel UNet at full strength never reads it
            factor = cfg.vae.downsample_factor
            own = (init.shape[1] // factor, init.shape[2] // factor, shape[2])
            posterior = noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, own)
            image_latents = (self._encode_image(init * 2.0 - 1.0, posterior) - shift) * sf
            if own != shape:  # resize_latents: bilinear, half-pixel centres, no antialiasing (as torch)
                image_latents = ops.convert_to_numpy(
                    ops.image.resize(image_latents, shape[:2], interpolation="bilinear", antialias=False)
                ).astype(np.float32)
        if mask_px is not None:
            mask_latent = self._latent_mask(mask_px, n)
            if image_latents is not None and masked_content != "original":
                fill = noise if masked_content == "latent_noise" else np.float32(0.0)
                image_latents = image_latents * (1.0 - mask_latent) + fill * mask_latent
            if cfg.is_inpainting:
                masked = (init * 2.0 - 1.0) * (mask_px < 0.5)
                posterior = noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, shape)
                masked_latents = (self._encode_image(masked, posterior) - shift) * sf
                task.extras["concat"] = np.concatenate(
                    [mask_latent, masked_latents], axis=-1
                )  # (N, h, w, 1 + C)
            else:
                blend = MaskBlend()
                task.hooks = (blend,)
                task.rows[blend.name] = {"mask": mask_latent, "image_latents": image_latents, "noise": noise}
                task.shared[blend.name] = {"scales": _next_noise_scales(sampler, plan)}
        if mask_px is not None and strength >= 1.0:
            task.x = noise * np.float32(plan.init_noise_sigma)
        elif not add_noise:
            task.x = image_latents
        else:
            task.x = ops.convert_to_numpy(sampler.add_noise(image_latents, noise, plan))
        return task

    def _latent_mask(self, mask_px: np.ndarray, n: int) -> np.ndarray:
        """The (N, h, w, 1) mask at latent size: nearest sampling, as diffusers' torch interpolate."""
        factor = self.config.vae.downsample_factor
        return _repeat_to(mask_px[:, ::factor, ::factor, :], n)

    def _encode_image(self, pixels: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Posterior samples of (k, H, W, 3) images for N images (k divides N), one noise row each."""
        if self.vae_tiling is None:
            dist = self.vae.encode(ops.convert_to_tensor(pixels, "float32"))
        else:
            from tf_diffusion.execution.tiling import tiled_moments

            def moments(x):
                x = ops.convert_to_tensor(x, "float32")
                h = self.vae.encoder(x)
                if self.vae.quant_conv is not None:  # SD3's VAE has none
                    h = self.vae.quant_conv(h)
                return ops.convert_to_numpy(ops.cast(h, "float32"))

            factor = self.config.vae.downsample_factor
            dist = DiagonalGaussian(
                tiled_moments(moments, np.asarray(pixels, np.float32), self.vae_tiling, factor)
            )
        n = noise.shape[0]
        mean = _repeat_to(ops.convert_to_numpy(dist.mean), n)
        std = _repeat_to(ops.convert_to_numpy(dist.std), n)
        return (mean + std * noise).astype(np.float32)


@dataclasses.dataclass
class _Task:
    """What one task adds to the loop: starting latents, denoiser extras, step hooks and their inputs."""

    x: np.ndarray | None
    extras: dict = dataclasses.field(default_factory=dict)
    hooks: tuple = ()
    rows: dict = dataclasses.field(default_factory=dict)
    shared: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GenerationInfo:
    """What ``generate()`` did, per call; per-image fields have one entry per image.

    Attributes:
        model: the model's name (``config.name``).
        mode: "txt2img", "img2img" or "inpaint".
        prompts, negative_prompts: per image.
        seeds: per image (``seed + b``); with ``latents=`` given, the seeds of the other draws.
        seeded_latents: False when ``latents=`` replaced the seeded initial latents.
        sampler: the sampler's name; sampler_options: its call options (DDIM's eta).
        num_steps: the steps asked for; num_evals: model evaluations run (img2img runs fewer).
        guidance_scale, strength (None for text-to-image), mask_blur (None: no paste-back), height,
        width, output_type.
        extra_params: further PNG parameter fields, as the web UI names them ("Lora hashes",
            "TI hashes").
        denoising_start, denoising_end: the hand-off fractions given (None: the whole schedule).
        sdxl_options: the SDXL micro-conditioning values given (``SDXLOptions`` field -> value).
    """

    model: str
    mode: str
    prompts: tuple
    negative_prompts: tuple
    seeds: tuple
    seeded_latents: bool
    sampler: str
    sampler_options: dict
    num_steps: int
    num_evals: int
    guidance_scale: float
    strength: float | None
    mask_blur: float | None
    height: int
    width: int
    output_type: str
    extra_params: dict = dataclasses.field(default_factory=dict)
    denoising_start: float | None = None
    denoising_end: float | None = None
    sdxl_options: dict = dataclasses.field(default_factory=dict)


class GeneratedImages(np.ndarray):
    """A NumPy array of images (or latents) that also carries ``.info`` (a ``GenerationInfo``).

    It is an ordinary ``np.ndarray`` everywhere else: indexing, arithmetic and ``np.asarray`` work as
    before; ``np.asarray(result)`` gives the plain array.
    """

    info: GenerationInfo | None = None

    @classmethod
    def wrap(cls, array, info: GenerationInfo) -> GeneratedImages:
        out = np.asarray(array).view(cls)
        out.info = info
        return out

    def __array_finalize__(self, obj):
        self.info = getattr(obj, "info", None)

    def __reduce__(self):
        return np.asarray(self).__reduce__()  # pickles as a plain array


def _handoff_inputs(image, latents, mask, denoising_start):
    """``(image, latents, handoff)``: a base's ``output_type="latent"`` result given as ``image`` becomes
    ``latents`` (diffusers' ``image=latents``); ``handoff``: latents continued from ``denoising_start``.

    Raises:
        ValueError: for latents given twice or without ``denoising_start``, ``denoising_start`` with
            nothing to continue or with a mask.
    """
    info = getattr(image, "info", None) if isinstance(image, GeneratedImages) else None
    if info is not None and info.output_type == "latent":
        if latents is not None:
            raise ValueError("pass the handed-over latents once: as image=... or as latents=..., not both")
        if denoising_start is None:
            raise ValueError(
                "image= holds latents (output_type='latent'); continuing them needs denoising_start=..., "
                "the fraction of the schedule already done (the base's denoising_end)"
            )
        image, latents = None, np.asarray(image)
    handoff = denoising_start is not None and latents is not None
    if handoff and image is not None:
        raise ValueError(
            "denoising_start with latents= continues those latents; image=... cannot be used as well"
        )
    if denoising_start is not None and not handoff and image is None:
        raise ValueError(
            f"denoising_start={denoising_start} continues a partly denoised image: pass latents=... (the "
            f"base model's output_type='latent' result) or image=..."
        )
    if denoising_start is not None and mask is not None and not handoff:
        raise ValueError(
            "denoising_start with inpainting (mask=...) continues a base's latents under the mask: pass them "
            "as image=... (output_type='latent') or latents=...; an image in pixels cannot be continued"
        )
    return image, latents, handoff


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


def _vae_dtype(dtype, force_upcast: bool = True):
    """The VAE's policy: float16 overflows in the SD and SDXL decoders, so under float16 the VAE runs in float32
    unless its config says it was fine-tuned not to (diffusers' ``force_upcast``)."""
    name = dtype if dtype is not None else keras.config.dtype_policy().name
    name = str(getattr(name, "name", name))
    return "float32" if force_upcast and "float16" in name and "bfloat16" not in name else dtype


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
