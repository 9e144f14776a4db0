"""The registry of model families: everything the loaders need to know about each one, in one place.

A family is a backbone architecture with its text encoder and checkpoint conventions (SD 1.x,
SD 2.x, their 9-channel inpainting variants). Each entry declares how single files of the family
are recognised (the text encoder under its prefix, the UNet's input width, the cross-attention
width), the key prefixes of its components in single files, the diffusers pipeline classes
(``_class_name`` in model_index.json) that hold it, the keras-cv model that rebuilds it, its
presets, the function that infers a config from its weights, and its default sampler.

Every detector in the package reads this table (single files, diffusers folders, our folders,
keras-cv weights, configs), so a new family (SDXL, SD3, Flux) is one more entry plus its
builders and renames. SD 2.x's v-prediction models (SD 2.1 at 768) are the ``sd2`` family:
the prediction type is a scheduler setting, not an architecture, and single files cannot show it
(``single_file_prediction_type`` is the diffusers rule used when nothing else tells).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# The components of the SD 1.x / 2.x families, in the order they are loaded, written and reported.
COMPONENTS = ("text_encoder", "unet", "vae")
# Every component any family has (SDXL adds OpenCLIP bigG as text_encoder_2), in the same order.
ALL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")

# Single-file (CompVis / Stability) prefixes shared by the SD families.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
# SDXL single files (Stability's sgm GeneralConditioner): CLIP-L in the transformers layout,
# OpenCLIP bigG in its own layout (fused in_proj, text_projection as x @ P); the refiner has bigG only.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: "sd1", "sd2", "sd1-inpainting", ...; what ``LoadReport.family`` says.
        description: for messages ("SD 1.x (OpenAI CLIP text encoder, 768-wide context)").
        text_encoder: the single-file text encoder kind: "clip" (OpenAI CLIP, transformers layout)
            or "openclip" (OpenCLIP, fused q/k/v; converted on reading).
        context_dim: the UNet's cross-attention width; identifies the family when a single file
            has no text encoder.
        unet_in_channels: the UNet's input channels (4; 9 for inpainting: latents, mask, masked image).
        prefixes: component -> key prefix in single files.
        diffusers_pipelines: model_index.json ``_class_name`` values of diffusers folders of the
            family; the first is the one written.
        keras_cv: the keras-cv model class, or None if keras-cv has none.
        presets: names in ``tf_diffusion.presets.PRESETS``.
        base_preset: the preset an inferred config takes its tokenizer and schedule from.
        single_file_prediction_type: assumed for single files that do not tell (diffusers' rule).
        infer_config: "module:function" building a PipelineConfig from ``SingleFileParts``,
            the family and the prediction type.
        default_sampler: the sampler of the family's presets (diffusers' pipelines default to PNDM).
        default_sizes: prediction type -> default image size of an inferred config, where it
            differs from the base preset's (SD 2.x v-models: 768, as SD 2.1).
        components: the family's networks (SDXL: two text encoders; the refiner only the second).
        inpaint_strength: ``generate()``'s default strength when a mask is given (diffusers' inpainting
            pipelines: 1.0; SDXL's 0.9999, which keeps a trace of the init image's latents).
        backbone: "unet" (SD 1.x / 2.x, SDXL), "mmdit" (SD3 / SD3.5, built from ``presets.SD3_PRESETS``;
            ``context_dim`` is then the joint attention width and ``unet_in_channels`` the transformer's
            input channels) or "flux" (Flux.1; presets: ``flux.FLUX_PRESETS``, the transformer's).
        hooks: "module:class" of the ``family_hooks.FamilyHooks`` through which ``StableDiffusion``
            builds, conditions, samples and loads the family's models.
    """

    name: str
    description: str
    text_encoder: str
    context_dim: int
    unet_in_channels: int
    prefixes: Mapping[str, str]
    diffusers_pipelines: tuple[str, ...]
    keras_cv: str | None
    presets: tuple[str, ...]
    base_preset: str
    single_file_prediction_type: str = "epsilon"
    infer_config: str = "tf_diffusion.weights.single_file:infer_sd_config"
    default_sampler: str = "pndm"
    default_sizes: Mapping[str, int] = field(default_factory=dict)
    components: tuple[str, ...] = COMPONENTS
    inpaint_strength: float = 1.0
    backbone: str = "unet"
    hooks: str = "tf_diffusion.family_hooks:UNetHooks"

    @property
    def is_inpainting(self) -> bool:
        return self.unet_in_channels == 9

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.components

    def family_hooks(self):
        """The family's ``FamilyHooks`` (one shared, stateless instance per class; imported on first use)."""
        return _hooks_instance(self.hooks)

    def config_inference(self) -> Callable:
        """The config inference function (imported on first use: it lives with the file readers)."""
        module, _, name = self.infer_config.partition(":")
        return getattr(importlib.import_module(module), name)


@functools.cache
def _hooks_instance(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def _sd(name, description, text_encoder, context_dim, in_channels, pipelines, keras_cv, presets, base, **kw):
    text_prefix = CLIP_PREFIX if text_encoder == "clip" else OPENCLIP_PREFIX
    prefixes = {"text_encoder": text_prefix, "unet": UNET_PREFIX, "vae": VAE_PREFIX}
    return Family(
        name,
        description,
        text_encoder,
        context_dim,
        in_channels,
        prefixes,
        pipelines,
        keras_cv,
        presets,
        base,
        **kw,
    )


# diffusers' inpainting pipelines also run 4-channel UNets (the legacy one only those).
_SD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInpaintPipelineLegacy",
)
_INPAINT_PIPELINES = ("StableDiffusionInpaintPipeline",)


def _sdxl(name, description, in_channels, pipelines, presets, refiner=False):
    if refiner:
        prefixes = {"text_encoder_2": SDXL_REFINER_OPENCLIP_PREFIX, "unet": UNET_PREFIX, "vae": VAE_PREFIX}
        components = ("text_encoder_2", "unet", "vae")
    else:
        prefixes = {
            "text_encoder": SDXL_CLIP_PREFIX,
            "text_encoder_2": SDXL_OPENCLIP_PREFIX,
            "unet": UNET_PREFIX,
            "vae": VAE_PREFIX,
        }
        components = ALL_COMPONENTS
    return Family(
        name,
        description,
        "openclip-bigg" if refiner else "clip+openclip-bigg",
        1280 if refiner else 2048,
        in_channels,
        prefixes,
        pipelines,
        None,
        presets,
        presets[0],
        infer_config="tf_diffusion.weights.single_file:infer_sdxl_config",
        default_sampler="euler",
        components=components,
        inpaint_strength=0.9999,  # StableDiffusionXLInpaintPipeline's default
    )


# diffusers' SDXL pipelines: text-to-image, image-to-image and inpainting run the base and the refiner.
_SDXL_PIPELINES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _sd("sd1", "SD 1.x (OpenAI CLIP text encoder, 768-wide context)", "clip", 768, 4,
            _SD_PIPELINES, "StableDiffusion", ("sd-v1-5", "tiny-shapes"), "sd-v1-5"),
        _sd("sd1-inpainting", "SD 1.x (OpenAI CLIP text encoder, 768-wide context) inpainting", "clip", 768, 9,
            _INPAINT_PIPELINES, None, ("sd-v1-5-inpainting",), "sd-v1-5-inpainting"),
        _sd("sd2", "SD 2.x (OpenCLIP text encoder, 1024-wide context)", "openclip", 1024, 4,
            _SD_PIPELINES, "StableDiffusionV2", ("sd-v2-1-base", "sd-v2-1", "sd-turbo"),
            "sd-v2-1-base", single_file_prediction_type="v_prediction", default_sizes={"v_prediction": 768}),
        _sd("sd2-inpainting", "SD 2.x (OpenCLIP text encoder, 1024-wide context) inpainting", "openclip", 1024, 9,
            _INPAINT_PIPELINES, None, ("sd-v2-inpainting",), "sd-v2-inpainting"),
        _sdxl("sdxl", "SDXL (CLIP ViT-L and OpenCLIP ViT-bigG text encoders, 2048-wide context)", 4,
              _SDXL_PIPELINES, ("sdxl-base-1.0", "sdxl-turbo")),
        _sdxl("sdxl-inpainting", "SDXL (CLIP ViT-L and OpenCLIP ViT-bigG text encoders, 2048-wide context) "
              "inpainting", 9, ("StableDiffusionXLInpaintPipeline",), ("sdxl-inpainting-0.1",)),
        _sdxl("sdxl-refiner", "SDXL refiner (OpenCLIP ViT-bigG text encoder, 1280-wide context)", 4,
              ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"), ("sdxl-refiner-1.0",),
              refiner=True),
    )
}  # fmt: skip
# SD3 / SD3.5: the original single files hold the MMDiT under model.diffusion_model. (joint_blocks.N),
# the text encoders under text_encoders.<name>.transformer. (often left out) and the VAE as SD's.
SD3_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
    "transformer": UNET_PREFIX,
    "vae": VAE_PREFIX,
}
SD3_DETECTION_KEY = UNET_PREFIX + "joint_blocks.0."
FAMILIES["sd3"] = Family(
    "sd3",
    "SD3 / SD3.5 (MMDiT; CLIP ViT-L, OpenCLIP ViT-bigG and T5-XXL text encoders, 4096-wide context)",
    "clip+openclip-bigg+t5",
    4096,
    16,
    SD3_PREFIXES,
    ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    None,
    ("sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"),
    "sd3-medium",
    infer_config="tf_diffusion.weights.diffusers_mmdit:mmdit_config_from_checkpoint",
    default_sampler="FlowMatchEulerDiscreteScheduler",
    components=("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"),
    backbone="mmdit",
    hooks="tf_diffusion.family_hooks:SD3Hooks",
)
# Flux.1 [dev] / [schnell] from diffusers folders (tf_diffusion.flux_pipeline); original single files
# hold the transformer alone (weights.flux.load_flux_transformer reads them).
FAMILIES["flux"] = Family(
    "flux",
    "Flux.1 (double- and single-stream transformer; CLIP ViT-L pooled and T5-XXL text encoders)",
    "clip+t5",
    4096,
    64,
    {"transformer": UNET_PREFIX},
    ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    None,
    ("flux1-dev", "flux1-schnell"),
    "flux1-dev",
    infer_config="tf_diffusion.weights.flux:flux_config_from_state_dict",
    default_sampler="FlowMatchEulerDiscreteScheduler",
    components=("text_encoder", "text_encoder_2", "transformer", "vae"),
    backbone="flux",
    hooks="tf_diffusion.flux_pipeline:FluxHooks",
)
# The families StableDiffusion builds (every helper below but is_sd3_single_file reads only these).
_UNET_FAMILIES = [f for f in FAMILIES.values() if f.backbone == "unet"]
# A single file whose family nothing shows (no text encoder, no cross-attention) is taken as this one.
DEFAULT_FAMILY = "sd1"


def get_family(name: str) -> Family:
    """The registry entry of a family.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def text_encoder_prefixes() -> dict[str, str]:
    """Single-file text encoder kind -> prefix, over the SD 1.x / 2.x families ("clip" -> "cond_stage_model.transformer.")."""
    return {f.text_encoder: f.prefixes["text_encoder"] for f in _UNET_FAMILIES if not f.is_sdxl}


def components_of(config) -> tuple[str, ...]:
    """The networks of a ``PipelineConfig``, in ``ALL_COMPONENTS`` order (the SDXL refiner has no ``text_encoder``)."""
    present = {
        "text_encoder": config.text_encoder is not None,
        "text_encoder_2": config.text_encoder_2 is not None,
    }
    return tuple(c for c in ALL_COMPONENTS if present.get(c, True))


def diffusers_pipeline_classes() -> tuple[str, ...]:
    """Every model_index.json ``_class_name`` some UNet family reads, in registry order (SD3's:
    ``FAMILIES["sd3"].diffusers_pipelines``, read by ``weights.sd3_folder``)."""
    return tuple(dict.fromkeys(c for f in _UNET_FAMILIES for c in f.diffusers_pipelines))


def _match(text_encoder: str | None, context_dim: int | None, inpainting: bool) -> Family:
    """The family with this text encoder kind (or, without one, context width), inpainting or not."""
    families = [f for f in _UNET_FAMILIES if not f.is_sdxl]
    if text_encoder is not None:
        candidates = [f for f in families if f.text_encoder == text_encoder]
    else:
        candidates = [f for f in families if f.context_dim == context_dim]
    if not candidates:
        candidates = [f for f in families if f.text_encoder == FAMILIES[DEFAULT_FAMILY].text_encoder]
    return next(f for f in candidates if f.is_inpainting == inpainting)


def family_of_single_file(parts) -> Family:
    """The family of a single file split by ``weights.single_file.split_single_file``.

    Read from the text encoder's prefix ("clip" or "openclip") and the UNet's input width; a file
    without a text encoder is placed by its cross-attention width (768 SD 1.x, 1024 SD 2.x).
    """
    unet = parts.components.get("unet", {})
    conv_in = unet.get("input_blocks.0.0.weight")
    # Other input widths than 9 (a UNet fine-tuned to 8 channels, say) belong to the plain family.
    inpainting = conv_in is not None and conv_in.shape[1] == 9
    if parts.text_encoder_kind in ("clip+openclip-bigg", "openclip-bigg") or "label_emb.0.0.weight" in unet:
        return _sdxl_family(parts, unet)
    context = None
    if parts.text_encoder_kind is None:
        widths = {v.shape[-1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")}
        context = widths.pop() if len(widths) == 1 else None
    return _match(parts.text_encoder_kind, context, inpainting)


def _sdxl_family(parts, unet) -> Family:
    """SDXL base, inpainting (a 9-channel input) or refiner: by the text encoders, else (UNet only) by
    the cross-attention width."""
    if parts.text_encoder_kind is not None:
        refiner = parts.text_encoder_kind == "openclip-bigg"
    else:
        widths = {v.shape[-1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")}
        refiner = widths == {1280}
    conv_in = unet.get("input_blocks.0.0.weight")
    inpainting = conv_in is not None and conv_in.shape[1] == 9
    return FAMILIES["sdxl-refiner" if refiner else ("sdxl-inpainting" if inpainting else "sdxl")]


def is_sd3_single_file(keys) -> bool:
    """Whether an original single file's keys are SD3 / SD3.5's (an MMDiT under model.diffusion_model.)."""
    return any(k.startswith(SD3_DETECTION_KEY) for k in keys)


def family_of_config(config) -> Family:
    """The family of a ``PipelineConfig`` (its text encoder, gelu: OpenCLIP, and whether it inpaints),
    an ``SD3Config`` or a ``flux_pipeline.FluxPipelineConfig``."""
    from tf_diffusion.flux_pipeline import FluxPipelineConfig

    if isinstance(config, FluxPipelineConfig):
        return FAMILIES["flux"]
    if hasattr(config, "transformer"):
        return FAMILIES["sd3"]
    if config.is_sdxl:
        if config.text_encoder is None:
            return FAMILIES["sdxl-refiner"]
        return FAMILIES["sdxl-inpainting" if config.is_inpainting else "sdxl"]
    kind = "openclip" if config.text_encoder.hidden_act == "gelu" else "clip"
    return _match(kind, None, config.is_inpainting)


def family_of_keras_cv(model_class: str) -> Family:
    """The family a keras-cv model class ("StableDiffusion", "StableDiffusionV2") rebuilds.

    Raises:
        ValueError: for a class no family names.
    """
    for family in FAMILIES.values():
        if family.keras_cv == model_class:
            return family
    known = sorted(f.keras_cv for f in FAMILIES.values() if f.keras_cv)
    raise ValueError(f"keras-cv model {model_class!r} is not supported; known: {known}")


def presets_of(family: str) -> list[str]:
    """The preset names of a family, sorted."""
    return sorted(get_family(family).presets)
