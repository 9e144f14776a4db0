"""Configurations of the released Stable Diffusion models (data only)."""

from __future__ import annotations

import dataclasses

from tf_diffusion.config import (
    CLIPTextConfig,
    MMDiTConfig,
    PipelineConfig,
    SchedulerConfig,
    SD3Config,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
)

# OpenCLIP ViT-H/14 as SD 2.x uses it: 24 layers minus the last (SD 2 reads the
# penultimate layer), in the transformers CLIPTextModel layout diffusers uses.
_OPENCLIP_VIT_H = CLIPTextConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
)
# SD 2.x: 64-wide heads, linear projections in and out of the transformers, 1024-wide context.
_SD2_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)
# OpenCLIP pads with token 0 ("!"), not with EOS.
_SD2_TOKENIZER = TokenizerConfig(pad_token_id=0)

# The embedded offline model (weights/tiny-shapes, trained by examples/tiny_shapes/train.py): 64x64
# drawn shapes. A factor-4 VAE (16x16x4 latents), a 3-layer 128-wide CLIP text encoder with the
# full CLIP vocabulary (the tokenizer is CLIP's), and a UNet of three levels sized so one guided
# 64x64 image takes well under 2 s on two CPU cores. scaling_factor is 1 / std of the trained
# VAE's latents over the training data, as for SD's 0.18215.
_TINY_SHAPES = PipelineConfig(
    name="tiny-shapes",
    text_encoder=CLIPTextConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4
    ),
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(False, True, True),
        num_heads=4,
        context_dim=128,
        norm_groups=32,
    ),
    vae=VAEConfig(
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=16, scaling_factor=0.2824
    ),
    # Zero terminal SNR with v-prediction (Lin et al. 2023; diffusers' rescale_betas_zero_snr): with
    # only 16x16 latents, SD's schedule leaves 6.8% of the image in x_T, as large as the mean of the
    # 256 noise values, so an epsilon model learned to read background and position from that mean
    # (random at sampling time) instead of from the prompt.
    scheduler=SchedulerConfig(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    ),
    default_size=64,
    # The settings its model card measures quality and speed at.
    default_steps=20,
    default_guidance=4.0,
    default_sampler="dpmpp_2m",
)

# SDXL (Stability's sd_xl_base.yaml / sd_xl_refiner.yaml; diffusers' stabilityai folders): CLIP ViT-L
# and OpenCLIP ViT-bigG/14 (32 layers, 1280 wide, projected pooled output), both read at the
# penultimate layer and concatenated to a 2048-wide context; a 3-level UNet with transformer depths
# (0, 2, 10), 64-wide heads, linear projections and label_emb on pooled text + 6 time ids.
_OPENCLIP_BIGG = CLIPTextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
_SDXL_UNET = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    attention_levels=(False, True, True),
    num_heads=None,
    head_dim=64,
    transformer_depth=(0, 2, 10),
    context_dim=2048,
    use_linear_projection=True,
    adm_in_channels=2816,  # 1280 pooled + 6 * 256
)
# The refiner: bigG only (1280-wide context), 4 levels at 384 channels, depth 4 everywhere,
# time ids (original size, crop, aesthetic score): 1280 + 5 * 256.
_SDXL_REFINER_UNET = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    attention_levels=(False, True, True, False),
    num_heads=None,
    head_dim=64,
    transformer_depth=4,
    context_dim=1280,
    use_linear_projection=True,
    adm_in_channels=2560,
)
_SDXL_VAE = VAEConfig(scaling_factor=0.13025)
# SDXL's scheduler_config.json: EulerDiscreteScheduler, leading spacing, steps_offset 1.
_SDXL_SCHEDULER = SchedulerConfig(timestep_spacing="leading")
_SDXL = PipelineConfig(
    name="sdxl-base-1.0",
    tokenizer=TokenizerConfig(),  # CLIP-L pads with EOS
    text_encoder_2=_OPENCLIP_BIGG,
    tokenizer_2=TokenizerConfig(pad_token_id=0),  # OpenCLIP pads with 0
    unet=_SDXL_UNET,
    vae=_SDXL_VAE,
    scheduler=_SDXL_SCHEDULER,
    force_zeros_for_empty_prompt=True,
    default_size=1024,
    default_guidance=5.0,  # diffusers' StableDiffusionXLPipeline default
    default_sampler="euler",
)

PRESETS: dict[str, PipelineConfig] = {
    "sd-v1-5": PipelineConfig(name="sd-v1-5"),
    "sd-v1-5-inpainting": PipelineConfig(name="sd-v1-5-inpainting", unet=UNetConfig(in_channels=9)),
    "sd-v2-1-base": PipelineConfig(
        name="sd-v2-1-base", text_encoder=_OPENCLIP_VIT_H, tokenizer=_SD2_TOKENIZER, unet=_SD2_UNET
    ),
    "sd-v2-1": PipelineConfig(
        name="sd-v2-1",
        text_encoder=_OPENCLIP_VIT_H,
        tokenizer=_SD2_TOKENIZER,
        unet=_SD2_UNET,
        scheduler=SchedulerConfig(prediction_type="v_prediction"),
        default_size=768,
    ),
    "sd-v2-inpainting": PipelineConfig(
        name="sd-v2-inpainting",
        text_encoder=_OPENCLIP_VIT_H,
        tokenizer=_SD2_TOKENIZER,
        unet=UNetConfig(
            in_channels=9, num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True
        ),
    ),
    "tiny-shapes": _TINY_SHAPES,
    "sdxl-base-1.0": _SDXL,
    "sdxl-refiner-1.0": _SDXL.replace(
        name="sdxl-refiner-1.0",
        text_encoder=None,
        unet=_SDXL_REFINER_UNET,
        force_zeros_for_empty_prompt=False,
        requires_aesthetics_score=True,
    ),
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base architecture with a 9-channel UNet input
    # (latents, mask, masked-image latents); generate()'s SDXL inpainting default strength is diffusers'
    # 0.9999.
    "sdxl-inpainting-0.1": _SDXL.replace(
        name="sdxl-inpainting-0.1", unet=dataclasses.replace(_SDXL_UNET, in_channels=9)
    ),
    # SDXL-Turbo: the base architecture, distilled for 1-4 steps without guidance (its model card:
    # trailing spacing, guidance 0; the released scheduler is Euler ancestral), 512 px.
    "sdxl-turbo": _SDXL.replace(
        name="sdxl-turbo",
        scheduler=SchedulerConfig(timestep_spacing="trailing"),
        default_size=512,
        default_steps=1,
        default_guidance=0.0,
        default_sampler="euler_a",
    ),
    # SD-Turbo (stabilityai/sd-turbo): SD 2.1's 512-px architecture (epsilon prediction), distilled like
    # SDXL-Turbo: Euler with trailing spacing, 1-4 steps, guidance off.
    "sd-turbo": PipelineConfig(
        name="sd-turbo",
        text_encoder=_OPENCLIP_VIT_H,
        tokenizer=_SD2_TOKENIZER,
        unet=_SD2_UNET,
        scheduler=SchedulerConfig(timestep_spacing="trailing"),
        default_steps=1,
        default_guidance=0.0,
        default_sampler="euler",
    ),
}


def get_preset(name: str) -> PipelineConfig:
    """The PipelineConfig of a named preset.

    Raises:
        ValueError: if ``name`` is not a preset, listing the ones that exist.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name]


# SD3 / SD3.5 (diffusers' stabilityai folders; architecture only): CLIP-L and OpenCLIP bigG, both with
# projections, T5-XXL v1.1, the 16-channel VAE and FlowMatchEuler with shift 3.0. Head width 64 and as
# many heads as blocks. SD3.5 adds RMS q/k norm; SD3.5 Medium a second image attention in blocks 0-12
# and a 384-patch position table. Steps and guidance: each model card's.
_SD3 = SD3Config(name="sd3-medium")
_SD35_LARGE = MMDiTConfig(
    num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
)
SD3_PRESETS: dict[str, SD3Config] = {
    "sd3-medium": _SD3,
    "sd3.5-medium": _SD3.replace(
        name="sd3.5-medium",
        transformer=MMDiTConfig(
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"
        ),
        default_steps=40,
        default_guidance=4.5,
    ),
    "sd3.5-large": _SD3.replace(
        name="sd3.5-large", transformer=_SD35_LARGE, default_steps=28, default_guidance=3.5
    ),
    # Distilled for 4 steps without guidance.
    "sd3.5-large-turbo": _SD3.replace(
        name="sd3.5-large-turbo", transformer=_SD35_LARGE, default_steps=4, default_guidance=0.0
    ),
}


def get_sd3_preset(name: str) -> SD3Config:
    """The SD3Config of a named SD3 / SD3.5 preset.

    Raises:
        ValueError: if ``name`` is not one, listing the ones that exist.
    """
    if name not in SD3_PRESETS:
        raise ValueError(f"unknown SD3 preset {name!r}; available: {sorted(SD3_PRESETS)}")
    return SD3_PRESETS[name]


def get_any_preset(name: str) -> PipelineConfig | SD3Config:
    """The config of a named preset of any family (``PRESETS``, ``SD3_PRESETS``, then
    ``flux_pipeline.FLUX_PIPELINE_PRESETS``).

    Raises:
        ValueError: if ``name`` is in neither, listing the ones that exist.
    """
    if name in PRESETS:
        return PRESETS[name]
    if name in SD3_PRESETS:
        return SD3_PRESETS[name]
    from tf_diffusion.flux_pipeline import (
        FLUX_PIPELINE_PRESETS,
    )  # imported here: it imports the pipeline's hooks

    if name in FLUX_PIPELINE_PRESETS:
        return FLUX_PIPELINE_PRESETS[name]
    known = sorted(PRESETS) + sorted(SD3_PRESETS) + sorted(FLUX_PIPELINE_PRESETS)
    raise ValueError(f"unknown preset {name!r}; available presets: {known}")
