"""Flux.1 through ``StableDiffusion``: text-to-image as diffusers' ``FluxPipeline`` computes it.

``StableDiffusion`` builds and runs Flux models through ``FluxHooks`` (the ``"flux"`` entry of
``families.FAMILIES``). What differs from SD3:

- Text: CLIP-L's pooled output (``CLIPTextModel.pooler_output``: the final-normed hidden state at the
  EOS token, no projection), and T5's last hidden state over ``max_sequence_length`` tokens (512 for
  [dev], 256 for [schnell]) as the context. A negative prompt only with ``true_cfg_scale`` above 1
  (a family option): diffusers' "true CFG", ``neg + true_cfg_scale * (cond - neg)``, the two transformer
  passes of each step batched as one (``ClassifierFreeGuidance``; [dev]'s guidance input in both).
- Guidance: [dev] is guidance-distilled, so ``guidance_scale`` (default 3.5) is the transformer's
  guidance input and the loop runs one pass per step (no classifier-free guidance); [schnell] has no
  guidance input and ignores a scale with a warning, as diffusers ignores it.
- Sampling: ``FluxFlowMatchEuler``, diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline sets it
  (``sigmas = linspace(1, 1/n, n)``, dynamically shifted by ``mu`` from the packed token count),
  over ``denoising.FluxDenoiser``, which packs the 16-channel latents into 2x2-patch tokens.
- The VAE: 16 channels, Flux's scaling 0.3611 and shift 0.1159 (from the folder's config).

Image-to-image and inpainting follow diffusers' FluxImg2ImgPipeline and FluxInpaintPipeline (the
pipeline's shared task preparation and per-step blend, SD3's step-keeping rule, default strength 0.6).
Original single files (``flux1-dev.safetensors``: the transformer alone) load with
``from_pretrained(file, config=diffusers_flux_folder)``, the folder giving CLIP-L, T5, the VAE and the
tokenizers (``weights.flux_single_file``); LoRAs load through ``adapters.lora``. Not here yet: Flux Fill /
Canny / Depth models, ComfyUI all-in-one files.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from dataclasses import dataclass, field

import numpy as np

from tf_diffusion.config import (
    CLIPTextConfig,
    SchedulerConfig,
    TokenizerConfig,
    TransformerPipelineConfig,
    VAEConfig,
)
from tf_diffusion.denoising import Conditioning
from tf_diffusion.family_hooks import FamilyHooks
from tf_diffusion.flux import FluxConfig
from tf_diffusion.schedulers.flow_match import FlowMatchEuler, flow_shift_mu
from tf_diffusion.t5 import T5Config

logger = logging.getLogger(__name__)

# diffusers' FluxPipeline classes whose folders hold a Flux.1 model.
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
F32 = np.float32


def _flux_vae() -> VAEConfig:
    return VAEConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False)


def _flux_scheduler() -> SchedulerConfig:
    # black-forest-labs/FLUX.1-dev scheduler_config.json.
    return SchedulerConfig(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


@dataclass(frozen=True)
class FluxPipelineConfig(TransformerPipelineConfig):
    """A whole Flux.1 model (diffusers' FluxPipeline). Defaults: Flux.1 [dev].

    ``text_encoder`` is CLIP-L without projection (its pooled output is the transformer's ``y``),
    ``text_encoder_2`` T5 (its hidden states the transformer's ``txt``).
    """

    name: str
    text_encoder: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder_2: T5Config = field(default_factory=T5Config)
    max_sequence_length: int = 512
    transformer: FluxConfig = field(default_factory=FluxConfig)
    vae: VAEConfig = field(default_factory=_flux_vae)
    scheduler: SchedulerConfig = field(default_factory=_flux_scheduler)
    default_size: int = 1024
    # diffusers' FluxPipeline defaults: 28 steps, guidance 3.5 (the guidance input of [dev]).
    default_steps: int = 28
    default_guidance: float = 3.5
    default_sampler: str = "FlowMatchEulerDiscreteScheduler"

    def __post_init__(self):
        tf = self.transformer
        if self.text_encoder.hidden_size != tf.vec_in_dim:
            raise ValueError(
                f"text_encoder.hidden_size={self.text_encoder.hidden_size} must equal the transformer's "
                f"vec_in_dim={tf.vec_in_dim} (CLIP's pooled output is its y)"
            )
        if self.text_encoder_2.d_model != tf.context_in_dim:
            raise ValueError(
                f"text_encoder_2.d_model={self.text_encoder_2.d_model} must equal the transformer's "
                f"context_in_dim={tf.context_in_dim}"
            )
        if tf.in_channels != 4 * self.vae.latent_channels:
            raise ValueError(
                f"transformer.in_channels={tf.in_channels} must be 4 * vae.latent_channels="
                f"{4 * self.vae.latent_channels} (2x2 patches of the latent)"
            )
        self._check_max_sequence_length()

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the 2x2 packing (16 for Flux.1)."""
        return self.vae.downsample_factor * 2


def _schnell() -> FluxPipelineConfig:
    from tf_diffusion.flux import FLUX_PRESETS

    # black-forest-labs/FLUX.1-schnell: static shift 1 (no shift), 256 T5 tokens, 4 steps, no guidance input.
    return FluxPipelineConfig(
        name="flux1-schnell",
        max_sequence_length=256,
        transformer=FLUX_PRESETS["flux1-schnell"],
        scheduler=SchedulerConfig(shift=1.0, use_dynamic_shifting=False),
        default_steps=4,
        default_guidance=0.0,
    )


# Whole-model architectures of the released Flux.1 models (random weights; ``families.FAMILIES["flux"].presets``).
FLUX_PIPELINE_PRESETS: dict[str, FluxPipelineConfig] = {
    "flux1-dev": FluxPipelineConfig(name="flux1-dev"),
    "flux1-schnell": _schnell(),
}


class FluxFlowMatchEuler(FlowMatchEuler):
    """FlowMatchEulerDiscreteScheduler with the sigmas FluxPipeline gives it: ``linspace(1, 1/n, n)``
    in float32, then shifted (dynamically by ``mu``, else by ``shift``), ending with 0."""

    def sigmas(self, n: int) -> np.ndarray:
        s = np.linspace(1.0, 1.0 / n, n).astype(F32)
        if self.config.use_dynamic_shifting:
            s = math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1) ** 1.0)
        else:
            s = self._shifted(s)
        return np.concatenate([np.asarray(s, F32), np.zeros(1, F32)])


def encode_prompts(sd, prompts, max_sequence_length: int | None, executor) -> tuple[np.ndarray, np.ndarray]:
    """A Flux model's prompts -> (T5 context (B, L, d_model), CLIP pooled (B, 768)), float32.

    Raises:
        ValueError: for a ``max_sequence_length`` outside 1..512, or no T5 tokenizer.
    """
    length = sd.config.max_sequence_length if max_sequence_length is None else max_sequence_length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 512:
        raise ValueError(f"max_sequence_length={length!r} must be an integer in 1..512")
    if sd.tokenizer_2 is None:
        raise ValueError("this Flux model has no T5 tokenizer; pass tokenizer_2=T5Tokenizer(spiece.model)")
    ids = sd.tokenizer(list(prompts))  # (B, 77), padded with EOS
    hidden = executor.encode_text(sd.text_encoder, ids)  # (B, 77, D) after the final norm
    # CLIPTextModel's pooler_output: the hidden state at the EOS token (the first of the largest id).
    eos = np.argmax(np.asarray(ids), axis=-1)
    pooled = hidden[np.arange(len(prompts)), eos]  # (B, D)
    long = [p for p in prompts if sd.tokenizer_2.truncated(p, length)]
    if long:
        # diffusers warns and truncates likewise.
        logger.warning("prompts longer than max_sequence_length=%d T5 tokens are truncated: %s", length, long)
    context = executor.encode_text(sd.text_encoder_2, sd.tokenizer_2(list(prompts), max_length=length))
    return context, pooled


class FluxHooks(FamilyHooks):
    """Flux.1 [dev] / [schnell]: CLIP-L pooled and T5, the Flux transformer, the 16-channel VAE."""

    name = "flux"
    # max_sequence_length None: config.max_sequence_length. true_cfg_scale: diffusers' true
    # classifier-free guidance, two transformer passes per step when above 1 with a negative prompt.
    options = {"max_sequence_length": None, "true_cfg_scale": 1.0}
    img2img_strength = 0.6  # diffusers' FluxImg2ImgPipeline
    adapters = frozenset({"lora"})  # kohya, diffusers/peft and XLabs Flux LoRAs (adapters.lora)

    def config_types(self):
        return (FluxPipelineConfig,)

    def build(self, sd, dtype, tokenizers):
        from tf_diffusion.clip import CLIPTextEncoder
        from tf_diffusion.denoising import FluxDenoiser
        from tf_diffusion.flux import FluxTransformer
        from tf_diffusion.t5 import T5Encoder
        from tf_diffusion.tokenizer import CLIPTokenizer
        from tf_diffusion.vae import AutoencoderKL

        config = sd.config
        if tokenizers.get("tokenizer_3") is not None:
            raise ValueError("tokenizer_3 applies to SD3 models; Flux's T5 tokenizer is tokenizer_2")
        tokenizer = tokenizers.get("tokenizer")
        sd.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer(config=config.tokenizer)
        sd.tokenizer_2 = tokenizers.get("tokenizer_2")
        sd.text_encoder = CLIPTextEncoder(config.text_encoder, dtype=dtype)
        sd.text_encoder_2 = T5Encoder(config.text_encoder_2, dtype=dtype)
        sd.transformer = FluxTransformer(config.transformer, dtype=dtype)
        sd.vae = AutoencoderKL(config.vae, dtype=self.vae_dtype(dtype, config.vae))
        sd.denoiser = FluxDenoiser(sd.transformer)

    def guidance(self, config, guidance_scale):
        from tf_diffusion.denoising import NoGuidance

        # One pass per step: [dev] reads the scale as an input, [schnell] not at all.
        if not config.transformer.guidance_embed and guidance_scale != 0.0:
            logger.warning(
                "guidance_scale=%g is ignored: %s has no guidance input (Flux.1 [schnell]), as diffusers "
                "ignores it",
                guidance_scale,
                config.name,
            )
        return NoGuidance()

    def guidance_rule(self, config, guidance_scale, *, negatives_given, **family_options):
        from tf_diffusion.denoising import ClassifierFreeGuidance

        true_cfg = family_options.get("true_cfg_scale", 1.0)
        if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float, np.integer, np.floating)):
            raise ValueError(f"true_cfg_scale={true_cfg!r} must be a number (above 1 enables true CFG)")
        true_cfg = float(true_cfg)
        if not np.isfinite(true_cfg):
            raise ValueError(f"true_cfg_scale={true_cfg} must be a finite number")
        rule = self.guidance(config, guidance_scale)  # [schnell]: the warning for a guidance scale
        if true_cfg > 1.0 and negatives_given:
            # FluxPipeline: neg + true_cfg_scale * (cond - neg), the two passes batched as one.
            return ClassifierFreeGuidance(), true_cfg
        if true_cfg > 1.0:
            logger.warning(
                "true_cfg_scale=%g needs a negative_prompt, which was not given: one pass per step, as "
                "diffusers runs it",
                true_cfg,
            )
        return rule, true_cfg

    def size_multiple(self, config):
        factor = config.vae.downsample_factor
        return config.size_multiple, f" (the VAE's factor {factor} times Flux's 2x2 packing)"

    def check_strength(self, config, strength, init, mask_px):
        from tf_diffusion.family_hooks import SD3Hooks

        # diffusers' FluxImg2ImgPipeline and FluxInpaintPipeline: the SD3 pipelines' rule and default (0.6).
        return SD3Hooks.check_strength(self, config, strength, init, mask_px)

    def sampler(self, config, scheduler, latent_shape):
        if hasattr(scheduler, "plan"):
            return scheduler
        allowed = (None, "flow_euler", "FlowMatchEulerDiscreteScheduler")
        if scheduler not in allowed:
            raise ValueError(f"scheduler={scheduler!r} is not available for Flux models; allowed: {allowed}")
        mu = None
        if config.scheduler.use_dynamic_shifting:
            mu = flow_shift_mu((latent_shape[0] // 2) * (latent_shape[1] // 2), config.scheduler)
        return FluxFlowMatchEuler(config.scheduler, name="FlowMatchEulerDiscreteScheduler", mu=mu)

    def plan(self, sampler, num_steps, strength, image_task, denoising_start, denoising_end):
        from tf_diffusion.family_hooks import SD3Hooks

        if denoising_start is not None or denoising_end is not None:
            raise ValueError(
                "denoising_start / denoising_end (the SDXL refiner hand-off) do not apply to Flux"
            )
        # FluxImg2ImgPipeline.get_timesteps keeps the steps as SD3's pipelines do.
        return SD3Hooks.plan(self, sampler, num_steps, strength, image_task, None, None)

    def encode_prompts(self, sd, prompts, executor, max_sequence_length=None):
        return encode_prompts(sd, prompts, max_sequence_length, executor)

    def text_conditioning(self, sd, prompts, negatives, *, guided, num_images, executor, **extra):
        if extra.get("negatives_given") and not guided:
            raise ValueError(
                "negative_prompt is not supported for Flux models unless true_cfg_scale > 1 (diffusers' "
                f"true classifier-free guidance; true_cfg_scale={extra.get('true_cfg_scale')}), as it would "
                "be ignored"
            )
        length = extra.get("max_sequence_length")

        def bundle(texts):
            context, pooled = self.encode_prompts(sd, texts, executor, length)
            context = np.repeat(context, num_images, axis=0)
            pooled = np.repeat(pooled, num_images, axis=0)
            return Conditioning(context, {"pooled_projections": pooled})

        # The negative prompt goes through both encoders, as diffusers' negative_prompt_2 defaults to it.
        return bundle(prompts), (bundle(negatives) if guided else None)

    def denoiser(self, sd, denoiser, options, *, plan, n, guided, image_task, guidance_scale, num_steps):
        if not sd.config.transformer.guidance_embed:
            return denoiser, {}
        # [dev]'s guidance input, the same at every evaluation (diffusers: torch.full([B], guidance_scale)).
        scales = np.full((plan.num_evals, n), guidance_scale, np.float32)
        # Under true CFG the negative pass reads the same guidance (diffusers passes it to both).
        both = ("cond", "uncond") if guided else ("cond",)
        return denoiser, {part: {"extra.guidance": scales} for part in both}

    def claims(self, path):
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from tf_diffusion.weights.flux_single_file import is_flux_single_file
            from tf_diffusion.weights.safetensors_io import open_safetensors

            try:
                with open_safetensors(path) as handle:
                    return is_flux_single_file(handle)
            except Exception:  # noqa: BLE001 - an unreadable file is the UNet loader's to report
                return False
        if not path.is_dir() or not (path / "model_index.json").is_file():
            return False
        try:
            name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (ValueError, OSError, AttributeError):
            return False  # the UNet reader reports what is wrong with it
        return name in FLUX_PIPELINES

    def describe(self, path):
        from tf_diffusion.weights.flux_single_file import describe_flux

        return describe_flux(path)

    def load(self, build, source, **kwargs):
        from tf_diffusion.weights.loading import resolve_source

        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the loader's default
        path = resolve_source(source, revision=kwargs.pop("revision", None))
        if path.is_file():
            from tf_diffusion.weights.flux_single_file import load_flux_single_file

            bad = sorted(set(kwargs) - {"dtype", "config"})
            if bad:
                raise ValueError(
                    f"{path} is an original Flux single file; its loader takes ['config', 'dtype'], not {bad}"
                )
            return load_flux_single_file(build, path, **kwargs)
        bad = sorted(set(kwargs) - {"dtype"})
        if bad:
            raise ValueError(f"{path} is a diffusers Flux folder; its loader takes ['dtype'], not {bad}")
        return load_flux_folder(build, path, **kwargs)


def variant_defaults(transformer: FluxConfig) -> dict:
    """diffusers' settings for the variant a transformer is: [dev] (a guidance input) takes 512 T5 tokens,
    28 steps and guidance 3.5; [schnell] 256 tokens (its model card's setting), 4 steps, no guidance."""
    dev = transformer.guidance_embed
    return dict(
        max_sequence_length=512 if dev else 256,
        default_steps=28 if dev else 4,
        default_guidance=3.5 if dev else 0.0,
    )


def read_flux_config(folder: pathlib.Path):
    """(FluxPipelineConfig, CLIP tokenizer, T5 tokenizer) of a diffusers Flux folder, without weights.

    Raises:
        ValueError: for a folder that is not a Flux pipeline, or one lacking a component.
    """
    from tf_diffusion.sd3 import clip_tokenizer_config
    from tf_diffusion.t5 import T5Tokenizer, t5_config_from_transformers
    from tf_diffusion.tokenizer import CLIPTokenizer
    from tf_diffusion.weights.diffusers_configs import (
        clip_config_from_transformers,
        flow_scheduler_from_folder,
        vae_config_from_diffusers,
    )
    from tf_diffusion.weights.diffusers_folder import read_json
    from tf_diffusion.weights.flux import flux_config_from_diffusers

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder} has no model_index.json; it is not a diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    if index.get("_class_name") not in FLUX_PIPELINES:
        raise ValueError(
            f"{folder} holds a {index.get('_class_name')!r}; a Flux folder holds one of {FLUX_PIPELINES}"
        )
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (folder / name).is_dir():
            raise ValueError(f"{folder}: no {name}/ folder; Flux folders need it")
    spiece = folder / "tokenizer_2" / "spiece.model"
    if not spiece.is_file():
        raise ValueError(f"{folder}: T5 needs tokenizer_2/spiece.model, which is missing")
    tokenizer = CLIPTokenizer.from_pretrained_folder(folder / "tokenizer")
    scheduler, sampler = flow_scheduler_from_folder(folder)
    transformer = flux_config_from_diffusers(read_json(folder / "transformer" / "config.json"))
    config = FluxPipelineConfig(
        name=folder.name,
        text_encoder=clip_config_from_transformers(read_json(folder / "text_encoder" / "config.json")),
        tokenizer=clip_tokenizer_config(tokenizer),
        text_encoder_2=t5_config_from_transformers(read_json(folder / "text_encoder_2" / "config.json")),
        transformer=transformer,
        vae=vae_config_from_diffusers(read_json(folder / "vae" / "config.json")),
        scheduler=scheduler,
        default_sampler=sampler,
        **variant_defaults(transformer),
    )
    return config, tokenizer, T5Tokenizer(spiece, max_length=config.max_sequence_length)


def load_flux_folder(build, folder: pathlib.Path, *, dtype=None):
    """Build a model with ``build`` from a diffusers Flux folder and load every component's weights."""
    from tf_diffusion.weights.diffusers_folder import clip_from_transformers, load_folder_components
    from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae
    from tf_diffusion.weights.flux import convert_diffusers_flux

    config, tokenizer, tokenizer_2 = read_flux_config(folder)
    sd = build(config, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    converters = {
        "text_encoder": clip_from_transformers,
        "text_encoder_2": None,  # transformers' T5EncoderModel keys are our attribute paths
        "transformer": lambda tensors: convert_diffusers_flux(tensors, config.transformer, lazy=True),
        "vae": lambda tensors: convert_diffusers_vae(tensors, config.vae),
    }
    load_folder_components(sd, folder, converters)
    return sd
