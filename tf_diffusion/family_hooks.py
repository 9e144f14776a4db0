"""What differs per backbone family, behind one contract that ``StableDiffusion`` calls.

``StableDiffusion.__init__`` and ``generate()`` are written once; each family's registry entry
(``families.Family.hooks``) names a ``FamilyHooks`` that answers the questions whose answers differ:
which components to build from a config, how prompts become a ``Conditioning``, which denoiser runs,
the size multiple, the sampler and its plan, the image-to-image strength rule, and the options only that
family's ``generate()`` reads (``generate(**family_options)``). ``UNetHooks`` serves SD 1.x / 2.x and
SDXL (their inpainting models and the SDXL refiner), ``SD3Hooks`` SD3 / SD3.5, ``flux_pipeline.FluxHooks``
Flux.1.

What is the same everywhere stays in the pipeline: the argument checks, the per-image noise
(``noise.py``), the task inputs (image-to-image, both inpainting modes), the ``DenoiseProgram`` and the
executor call, the decode. The VAE's latent convention is data, not a hook: latents are
``(z - vae.shift_factor) * vae.scaling_factor`` for every family (the shift is 0 for SD's 4-channel VAEs,
whose arithmetic it then leaves bit for bit unchanged).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from tf_diffusion.denoising import Conditioning

# What a family's pipeline may take, as named in messages.
ADAPTERS = {
    "controlnet": "ControlNets",
    "ip_adapter": "IP-Adapters",
    "lora": "LoRAs",
    "textual_inversion": "textual-inversion embeddings",
}


class FamilyHooks:
    """The contract: one instance per family kind, stateless (the model is passed in).

    Attributes:
        name: "unet", "mmdit" or "flux" (``families.Family.backbone``).
        options: the family's own ``generate()`` keyword arguments and their defaults.
        img2img_strength: ``generate()``'s default strength with an image and no mask.
        backbone: the ``StableDiffusion`` attribute holding the denoising network ("unet", "transformer").
        adapters: which of ``ADAPTERS`` the family's pipeline takes.
    """

    name = ""
    options: Mapping[str, object] = {}
    img2img_strength = 0.8
    backbone = "transformer"
    adapters: frozenset[str] = frozenset()

    def vae_dtype(self, dtype, vae_config):
        """The VAE's dtype policy under the model's ``dtype``: the 16-channel VAEs run in float32 under any
        16-bit policy."""
        return "float32" if dtype and "float16" in str(dtype) else dtype

    def require_adapter(self, config, adapter: str) -> None:
        """Raise a ValueError naming the family if its pipeline cannot take ``adapter`` (a key of ADAPTERS)."""
        if adapter not in self.adapters:
            takes = ", ".join(ADAPTERS[a] for a in sorted(self.adapters)) or "no adapters"
            raise ValueError(
                f"{ADAPTERS[adapter]} are not supported for {config.name} ({self.name} family, which takes "
                f"{takes}); they work with SD 1.x / 2.x and SDXL models"
            )

    def config_types(self) -> tuple[type, ...]:
        """The config classes this family's models are built from."""
        raise NotImplementedError

    def build(self, sd, dtype, tokenizers: Mapping[str, object]) -> None:
        """Set ``sd``'s tokenizers, networks and ``denoiser`` from ``sd.config`` with fresh weights."""
        raise NotImplementedError

    def guidance(self, config, guidance_scale: float):
        """The guidance rule for a scale: classifier-free above 1, none otherwise (``guidance_for``)."""
        from tf_diffusion.denoising import guidance_for

        return guidance_for(guidance_scale)

    def guidance_rule(self, config, guidance_scale: float, *, negatives_given: bool, **family_options):
        """(the guidance rule of one ``generate()`` call, the scale its combination reads).

        Default: ``guidance(config, guidance_scale)`` with ``guidance_scale``. A family whose
        classifier-free scale is another option (Flux's ``true_cfg_scale``) returns that one.
        """
        del negatives_given, family_options
        return self.guidance(config, guidance_scale), guidance_scale

    def size_multiple(self, config) -> tuple[int, str]:
        """(the multiple image sides must be, why: the words after "is not a multiple of N")."""
        factor = config.vae.downsample_factor
        return factor, ", the VAE's downsampling factor"

    def check_strength(self, config, strength, init, mask_px) -> float:
        """``generate()``'s strength: the given one checked, or the family's default for the task."""
        raise NotImplementedError

    def sampler(self, config, scheduler, latent_shape):
        """The sampler: ``scheduler`` if it is one, else the named one (default the config's)."""
        from tf_diffusion.schedulers import get_sampler

        if hasattr(scheduler, "plan"):
            return scheduler
        return get_sampler(config.default_sampler if scheduler is None else scheduler, config.scheduler)

    def plan(
        self, sampler, num_steps: int, strength: float, image_task: bool, denoising_start, denoising_end
    ):
        """The sampler's plan for the call (steps kept by strength, the hand-off window)."""
        return sampler.plan(
            num_steps,
            strength=strength if image_task else 1.0,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
        )

    def encode_prompts(self, sd, prompts: Sequence[str], executor, **options):
        """``StableDiffusion.encode_prompts`` for this family."""
        raise NotImplementedError

    def text_conditioning(
        self, sd, prompts, negatives, *, guided: bool, num_images: int, executor, **context
    ):
        """(cond, uncond or None) ``Conditioning`` bundles, one row per image, prompt by prompt.

        ``context`` holds what generate() knows of the call (``guidance_scale``, ``negatives_given``, the
        size, the family options); a family reads what it needs.
        """
        raise NotImplementedError

    def denoiser(self, sd, denoiser, options: Mapping, *, plan, n: int, guided: bool, image_task: bool,
                 guidance_scale: float, num_steps: int):  # fmt: skip
        """(the denoiser to run, per-step inputs it adds): the family's options may wrap ``denoiser``."""
        return denoiser, {}

    def infotext(self, config, sampler) -> dict:
        """PNG parameter fields the family adds (web UI key -> value)."""
        return {}

    def export_text(self, sd, *, height: int, width: int, options: Mapping):
        """The SavedModel's in-graph text encoding (an ``export.text.ExportText``) for text-to-image at
        ``height`` x ``width`` with the family ``options`` (``check_family_options``) fixed at export.

        Raises:
            ValueError: if the family (or this model of it) has no SavedModel export.
        """
        raise ValueError(
            f"{sd.config.name} ({self.name} family) has no SavedModel export; tf_diffusion.export writes "
            "SD 1.x / 2.x, SDXL and SD3 / SD3.5 (without T5) models"
        )

    def claims(self, path: pathlib.Path) -> bool:
        """Whether a local checkpoint file or folder is this family's (its loaders read it)."""
        return False

    def describe(self, path: pathlib.Path) -> dict | None:
        """What ``tf-diffusion info`` prints of a file or folder this family claims; None: the UNet report."""
        return None

    def load(self, build, source, **kwargs):
        """Build a model with ``build`` (the class, or ``execution.quantize``'s builder) and load ``source``."""
        raise NotImplementedError


class UNetHooks(FamilyHooks):
    """SD 1.x / 2.x and SDXL (with their inpainting models and the SDXL refiner): today's behaviour."""

    name = "unet"
    img2img_strength = 0.8  # diffusers' StableDiffusionImg2ImgPipeline
    backbone = "unet"
    adapters = frozenset(ADAPTERS)

    def vae_dtype(self, dtype, vae_config):
        from tf_diffusion.pipeline import _vae_dtype

        return _vae_dtype(dtype, vae_config.force_upcast)

    def config_types(self):
        from tf_diffusion.config import PipelineConfig

        return (PipelineConfig,)

    def build(self, sd, dtype, tokenizers):
        from tf_diffusion import execution
        from tf_diffusion.clip import CLIPTextEncoder
        from tf_diffusion.denoising import UNetDenoiser
        from tf_diffusion.tokenizer import CLIPTokenizer
        from tf_diffusion.unet import UNetModel
        from tf_diffusion.vae import AutoencoderKL

        config = sd.config
        if tokenizers.get("tokenizer_3") is not None:
            raise ValueError(
                f"tokenizer_3 (T5) applies to SD3 models; {config.name} has no third text encoder"
            )
        tokenizer, tokenizer_2 = tokenizers.get("tokenizer"), tokenizers.get("tokenizer_2")
        sd.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer(config=config.tokenizer)
        # The SDXL refiner has only the second (OpenCLIP bigG) encoder.
        sd.text_encoder = (
            None if config.text_encoder is None else CLIPTextEncoder(config.text_encoder, dtype=dtype)
        )
        # SDXL: OpenCLIP bigG with its projection, and its tokenizer (same vocabulary, pads with 0).
        sd.text_encoder_2 = sd.tokenizer_2 = None
        if config.text_encoder_2 is not None:
            sd.text_encoder_2 = CLIPTextEncoder(config.text_encoder_2, dtype=dtype)
            if tokenizer_2 is None:  # the same vocabulary, padded as config.tokenizer_2 says
                tokenizer_2 = sd.tokenizer.padded_with(config.tokenizer_2.pad_token_id)
            sd.tokenizer_2 = tokenizer_2
        sd.unet = UNetModel(config.unet, dtype=dtype)
        sd.vae = AutoencoderKL(config.vae, dtype=self.vae_dtype(dtype, config.vae))
        # Fast paths by block type (tf_diffusion.execution); they compute the same numbers.
        execution.apply(sd.unet)
        execution.apply(sd.vae)
        sd.denoiser = UNetDenoiser(sd.unet)

    def guidance(self, config, guidance_scale):
        from tf_diffusion.denoising import guidance_for

        # An LCM-distilled UNet takes the scale as an input (diffusers: w = scale - 1 embedded as the UNet's
        # timestep_cond, which generate() adds) and runs without an unconditional pass.
        if config.unet.time_cond_proj_dim is not None:
            return guidance_for(1.0)
        return guidance_for(guidance_scale)

    def check_strength(self, config, strength, init, mask_px):
        from tf_diffusion.families import family_of_config

        if strength is None:
            # diffusers' defaults: img2img 0.8, inpainting the family's (1.0; SDXL's inpaint pipeline 0.9999).
            strength = (
                family_of_config(config).inpaint_strength if mask_px is not None else self.img2img_strength
            )
        strength = float(strength)
        if init is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} is outside the allowed range [0, 1]")
        return strength

    def encode_prompts(self, sd, prompts, executor, **options):
        from tf_diffusion import sdxl
        from tf_diffusion.adapters import textual_inversion
        from tf_diffusion.pipeline import _apply_weights
        from tf_diffusion.prompts import tokenize_weighted

        if options:
            raise ValueError(f"encode_prompts takes no {sorted(options)} for {sd.config.name}")
        if sd.config.is_sdxl:
            return sdxl.encode_prompts(sd, prompts, executor)[0]
        # Embedding words become ids past the vocabulary (adapters.textual_inversion).
        tokenizer = textual_inversion.tokenizer_for(sd, prompts)
        chunked = [tokenize_weighted(tokenizer, p) for p in prompts]
        count = max(c.num_chunks for c in chunked)
        empty = tokenize_weighted(tokenizer, "")
        chunked = [c.padded_to(count, empty) for c in chunked]
        ids = np.concatenate([c.ids for c in chunked])  # (B*K, 77)
        embeds = None
        if tokenizer is not sd.tokenizer:
            embeds = textual_inversion.token_embeddings(sd.text_encoder, ids, tokenizer)  # (B*K, 77, D)
        hidden = executor.encode_text(
            sd.text_encoder, ids, **({} if embeds is None else {"token_embeds": embeds})
        )  # (B*K, 77, D)
        hidden = hidden.reshape(len(prompts), count * ids.shape[1], hidden.shape[-1])
        weights = np.stack([c.weights.reshape(-1) for c in chunked])  # (B, K*77)
        return _apply_weights(hidden, weights)

    def text_conditioning(
        self, sd, prompts, negatives, *, guided, num_images, executor, guidance_scale=None, **context
    ):
        from tf_diffusion import sdxl
        from tf_diffusion.unet import guidance_embedding

        n = len(prompts) * num_images
        if sd.config.is_sdxl:
            cond, uncond = sdxl.text_conditioning(
                sd, prompts, negatives, guided=guided, num_images=num_images, executor=executor, **context
            )
        else:
            texts = negatives + prompts if guided else prompts
            hidden = np.repeat(self.encode_prompts(sd, texts, executor), num_images, axis=0)
            cond, uncond = Conditioning(hidden[-n:]), (Conditioning(hidden[:n]) if guided else None)
        dim = sd.config.unet.time_cond_proj_dim
        # LCM-distilled: the embedding of w = scale - 1 is the UNet's timestep_cond.
        if dim is not None:
            w = np.full((n,), guidance_scale - 1.0, np.float32)
            cond = Conditioning(
                cond.context, {**cond.extras, "timestep_cond": np.asarray(guidance_embedding(w, dim))}
            )
        return cond, uncond

    def export_text(self, sd, *, height, width, options):
        from tf_diffusion.export import text

        return text.SDXLText(sd, height, width) if sd.config.is_sdxl else text.CLIPText(sd)

    def load(self, build, source, **kwargs):
        import inspect

        from tf_diffusion.weights.loading import from_pretrained

        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the loader's default
        allowed = [k for k in inspect.signature(from_pretrained).parameters if k not in ("cls", "source")]
        bad = sorted(set(kwargs) - set(allowed))
        if bad:
            raise ValueError(
                f"{source} is read by the SD 1.x / 2.x / SDXL loader, which takes {allowed}, not {bad}"
            )
        return from_pretrained(build, source, **kwargs)


class SD3Hooks(FamilyHooks):
    """SD3 / SD3.5: CLIP-L, CLIP-G and optional T5, the MMDiT, the 16-channel VAE, flow matching."""

    name = "mmdit"
    # diffusers' StableDiffusion3Pipeline arguments that the UNet families do not have, with its defaults.
    options = {
        "max_sequence_length": None,  # None: config.max_sequence_length
        "skip_guidance_layers": None,
        "skip_layer_guidance_scale": 2.8,
        "skip_layer_guidance_start": 0.01,
        "skip_layer_guidance_stop": 0.2,
    }
    img2img_strength = 0.6  # diffusers' StableDiffusion3Img2ImgPipeline

    def config_types(self):
        from tf_diffusion.config import SD3Config

        return (SD3Config,)

    def build(self, sd, dtype, tokenizers):
        from tf_diffusion.clip import CLIPTextEncoder
        from tf_diffusion.denoising import MMDiTDenoiser
        from tf_diffusion.mmdit import MMDiT
        from tf_diffusion.t5 import T5Encoder
        from tf_diffusion.tokenizer import CLIPTokenizer
        from tf_diffusion.vae import AutoencoderKL

        config = sd.config
        tokenizer, tokenizer_2 = tokenizers.get("tokenizer"), tokenizers.get("tokenizer_2")
        sd.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer(config=config.tokenizer)
        sd.tokenizer_2 = (
            tokenizer_2
            if tokenizer_2 is not None
            else sd.tokenizer.padded_with(config.tokenizer_2.pad_token_id)
        )
        sd.tokenizer_3 = tokenizers.get("tokenizer_3")
        sd.text_encoder = CLIPTextEncoder(config.text_encoder, dtype=dtype)
        sd.text_encoder_2 = CLIPTextEncoder(config.text_encoder_2, dtype=dtype)
        sd.text_encoder_3 = (
            None if config.text_encoder_3 is None else T5Encoder(config.text_encoder_3, dtype=dtype)
        )
        sd.transformer = MMDiT(config.transformer, dtype=dtype)
        sd.vae = AutoencoderKL(config.vae, dtype=self.vae_dtype(dtype, config.vae))
        sd.denoiser = MMDiTDenoiser(sd.transformer)

    def size_multiple(self, config):
        factor, patch = config.vae.downsample_factor, config.transformer.patch_size
        return config.size_multiple, f" (the VAE's factor {factor} times the patch size {patch})"

    def check_strength(self, config, strength, init, mask_px):
        if init is None:
            if strength is not None:
                raise ValueError(
                    "strength applies to image-to-image and inpainting only; pass image=... (or leave strength None)"
                )
            return 1.0
        strength = self.img2img_strength if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be a number in (0, 1] for image-to-image")
        return float(strength)

    def sampler(self, config, scheduler, latent_shape):
        from tf_diffusion.schedulers import flow_shift_mu, get_sampler

        if hasattr(scheduler, "plan"):
            return scheduler
        options = {}
        if config.scheduler.use_dynamic_shifting:
            p = config.transformer.patch_size
            options["mu"] = flow_shift_mu((latent_shape[0] // p) * (latent_shape[1] // p), config.scheduler)
        return get_sampler(
            config.default_sampler if scheduler is None else scheduler, config.scheduler, **options
        )

    def plan(self, sampler, num_steps, strength, image_task, denoising_start, denoising_end):
        if denoising_start is not None or denoising_end is not None:
            raise ValueError(
                "denoising_start / denoising_end (the SDXL refiner hand-off) do not apply to SD3 models"
            )
        if not image_task:
            return sampler.plan(num_steps)
        # diffusers' SD3 get_timesteps: t_start = int(max(n - n * strength, 0)), with the float product
        # (the UNet pipelines take int(n * strength) steps); the plan keeps the last n - t_start.
        kept = num_steps - int(max(num_steps - num_steps * strength, 0))
        return sampler.plan(num_steps, strength=1.0 if kept >= num_steps else (kept + 0.5) / num_steps)

    def encode_prompts(self, sd, prompts, executor, max_sequence_length=None):
        from tf_diffusion.sd3 import encode_prompts

        return encode_prompts(sd, prompts, max_sequence_length, executor)

    def text_conditioning(self, sd, prompts, negatives, *, guided, num_images, executor, **extra):
        n = len(prompts) * num_images
        texts = negatives + prompts if guided else prompts
        context, pooled = self.encode_prompts(sd, texts, executor, extra.get("max_sequence_length"))
        context = np.repeat(context, num_images, axis=0)
        pooled = np.repeat(pooled, num_images, axis=0)
        cond = Conditioning(context[-n:], {"pooled_projections": pooled[-n:]})
        uncond = Conditioning(context[:n], {"pooled_projections": pooled[:n]}) if guided else None
        return cond, uncond

    def denoiser(self, sd, denoiser, options, *, plan, n, guided, image_task, guidance_scale, num_steps):
        from tf_diffusion.sd3 import skip_layer_guidance

        if options["skip_guidance_layers"] is None:
            return denoiser, {}
        if image_task or not guided:
            raise ValueError(
                "skip_guidance_layers applies to text-to-image with guidance (guidance_scale > 1), as "
                "diffusers' StableDiffusion3Pipeline"
            )
        return skip_layer_guidance(
            denoiser,
            options["skip_guidance_layers"],
            sd.config.transformer.num_layers,
            scale=options["skip_layer_guidance_scale"],
            start=options["skip_layer_guidance_start"],
            stop=options["skip_layer_guidance_stop"],
            guidance_scale=guidance_scale,
            num_steps=num_steps,
            num_evals=plan.num_evals,
            n=n,
        )

    def infotext(self, config, sampler):
        # The flow shift, as Forge writes it for SD3 ("Shift: 3"); from the image size when dynamic.
        scheduler = getattr(sampler, "config", config.scheduler)
        if getattr(scheduler, "use_dynamic_shifting", False):
            return {}
        return {"Shift": f"{scheduler.shift:g}"}

    def export_text(self, sd, *, height, width, options):
        from tf_diffusion.export import text

        if sd.text_encoder_3 is not None:
            # No in-graph SentencePiece tokenizer yet; dropping T5 silently would export other images.
            raise ValueError(
                f"{sd.config.name} is loaded with T5 (text_encoder_3), which the SavedModel export leaves "
                "out (no in-graph T5 tokenizer); load it without T5 to export it (load_t5=False; "
                "tf-diffusion export --no-t5): its images are then generate()'s without T5"
            )
        if options.get("skip_guidance_layers") is not None:
            raise ValueError("skip_guidance_layers is not part of the SavedModel export; leave it None")
        length = options.get("max_sequence_length")
        length = sd.config.max_sequence_length if length is None else length
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 1 <= length <= 512:
            raise ValueError(f"max_sequence_length={length!r} must be an integer in 1..512")
        return text.SD3Text(sd, int(length))

    def claims(self, path):
        import json

        from tf_diffusion.families import FAMILIES, is_sd3_single_file

        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                from tf_diffusion.weights.keras_hub_sd3 import is_keras_hub_sd3_preset

                return is_keras_hub_sd3_preset(path)
            try:
                name = json.loads(index.read_text()).get("_class_name")
            except (ValueError, OSError, AttributeError):
                return False  # the UNet reader reports what is wrong with it
            return name in FAMILIES["sd3"].diffusers_pipelines
        if path.suffix.lower() != ".safetensors":
            return False  # .ckpt files are only read whole; the UNet loader names SD3 ones
        from tf_diffusion.weights.safetensors_io import open_safetensors

        try:
            with open_safetensors(path) as handle:
                return is_sd3_single_file(handle)
        except Exception:  # noqa: BLE001 - an unreadable file is the UNet loader's to report
            return False

    def describe(self, path):
        from tf_diffusion.weights.keras_hub_sd3 import describe_keras_hub_sd3, is_keras_hub_sd3_preset
        from tf_diffusion.weights.sd3_folder import describe_sd3

        if path.is_dir() and is_keras_hub_sd3_preset(path):
            return describe_keras_hub_sd3(path)
        return describe_sd3(path)

    def load(self, build, source, **kwargs):
        from tf_diffusion.presets import get_sd3_preset
        from tf_diffusion.weights import sd3_folder, sd3_single_file
        from tf_diffusion.weights.loading import resolve_source

        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the loader's default
        path = resolve_source(source, revision=kwargs.pop("revision", None))  # a hub id: its snapshot
        folder_args = {"dtype", "load_t5"}
        file_args = folder_args | {"config", "text_encoders_from", "tokenizer_3"}
        allowed = folder_args if path.is_dir() else file_args
        bad = sorted(set(kwargs) - allowed)
        if bad:
            raise ValueError(
                f"{path} is an SD3 / SD3.5 {'folder' if path.is_dir() else 'single file'}; its loader takes "
                f"{sorted(allowed)}, not {bad}"
            )
        if path.is_dir():
            from tf_diffusion.weights.keras_hub_sd3 import is_keras_hub_sd3_preset, load_keras_hub_sd3

            if is_keras_hub_sd3_preset(path):
                return load_keras_hub_sd3(build, path, **kwargs)
            return sd3_folder.load_sd3_folder(build, path, **kwargs)
        config = kwargs.pop("config", None)
        if isinstance(config, str):
            _refuse_other_family_preset(path, config)
            config = get_sd3_preset(config)
        return sd3_single_file.load_sd3_single_file(build, path, config=config, **kwargs)


def _refuse_other_family_preset(path, name: str) -> None:
    """An SD3 file forced into another family's preset (SDXL's, say): an error naming both."""
    from tf_diffusion.families import family_of_config
    from tf_diffusion.presets import SD3_PRESETS, get_any_preset

    if name in SD3_PRESETS:
        return
    try:
        other = get_any_preset(name)
    except ValueError:
        return  # not a preset at all: get_sd3_preset lists the SD3 ones
    raise ValueError(
        f"{path} holds SD3 / SD3.5 (MMDiT) weights, but preset {name!r} describes a "
        f"{family_of_config(other).name} model; pass one of the SD3 presets {sorted(SD3_PRESETS)} or none"
    )


def hooks_for(config) -> FamilyHooks:
    """The hooks of the family a config belongs to (``families.Family.hooks``).

    Raises:
        ValueError: for something that is no model config, naming the allowed classes.
    """
    from tf_diffusion.families import family_of_config

    allowed = tuple(t for hooks in all_hooks() for t in hooks.config_types())
    if not isinstance(config, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ValueError(f"config must be a {names}, got {type(config).__name__}")
    return family_of_config(config).family_hooks()


def all_hooks() -> list[FamilyHooks]:
    """Every family's hooks, once each, in registry order."""
    from tf_diffusion.families import FAMILIES

    seen: dict[str, FamilyHooks] = {}
    for family in FAMILIES.values():
        seen.setdefault(family.hooks, family.family_hooks())
    return list(seen.values())


def hooks_for_source(source, revision: str | None = None) -> FamilyHooks:
    """The hooks whose loaders read ``source`` (a local file or folder, or a hub id): the first family
    that claims it, else the UNet families' (whose loader detects and reports everything else)."""
    from tf_diffusion.weights.loading import resolve_source

    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a path or hub id, got {type(source).__name__}")
    path = pathlib.Path(source).expanduser()
    hooks = all_hooks()
    if not path.exists():
        try:
            path = resolve_source(source, revision=revision)
        except Exception:  # noqa: BLE001 - the UNet loader raises the same error with its context
            return hooks[0]
    for candidate in hooks[1:]:
        if candidate.claims(path):
            return candidate
    return hooks[0]


def describe_source(source, revision: str | None = None) -> dict | None:
    """``FamilyHooks.describe`` of the family that claims ``source``; None for the UNet families' files."""
    from tf_diffusion.weights.loading import resolve_source

    hooks = hooks_for_source(source, revision=revision)
    if hooks is all_hooks()[0]:
        return None
    return hooks.describe(resolve_source(source, revision=revision))


def check_family_options(config, hooks: FamilyHooks, given: Mapping[str, object]) -> dict:
    """The family's options for one call: the defaults with ``given`` applied.

    Raises:
        ValueError: for an option this family does not take, naming the family that does (if any).
    """
    from tf_diffusion.families import FAMILIES, family_of_config

    unknown = [k for k in given if k not in hooks.options]
    if unknown:
        name = unknown[0]
        owners = sorted({f.name for f in FAMILIES.values() if name in f.family_hooks().options})
        family = family_of_config(config).name
        own = sorted(hooks.options) or "none"
        where = f"an option of the {', '.join(owners)} family" if owners else "not an option of any family"
        raise ValueError(
            f"generate() got {name}={given[name]!r}, {where}; {config.name} is a {family} model, whose "
            f"family options are: {own}"
        )
    return {**hooks.options, **given}
