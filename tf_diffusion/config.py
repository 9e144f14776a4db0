"""Frozen configuration dataclasses. Components are built from these and never read files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; expected one of {sorted(allowed)}")


def _check_positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer. Defaults: OpenAI ViT-L/14 as SD 1.x uses it."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Width of ``text_projection`` (transformers' CLIPTextModelWithProjection; SDXL's OpenCLIP bigG
    # pools through it); None: no projection (CLIPTextModel).
    projection_dim: int | None = None

    def __post_init__(self):
        if self.projection_dim is not None:
            _check_positive(self, "projection_dim")
        _check_positive(
            self,
            "vocab_size",
            "max_position_embeddings",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        _check_choice("hidden_act", self.hidden_act, {"quick_gelu", "gelu"})
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP vision transformer with its projection (transformers' CLIPVisionModelWithProjection).

    Defaults: OpenCLIP ViT-H/14, the image encoder of IP-Adapter for SD 1.5 and of the SDXL "vit-h"
    adapters (ViT-bigG/14: hidden 1664, intermediate 8192, 48 layers, 16 heads, projection 1280).
    """

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 1024

    def __post_init__(self):
        _check_positive(
            self, "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "projection_dim",
        )  # fmt: skip
        _check_choice("hidden_act", self.hidden_act, {"quick_gelu", "gelu"})
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TokenizerConfig:
    """CLIP BPE tokenizer settings. SD 1.x pads with EOS (49407), SD 2.x (OpenCLIP) with 0."""

    max_length: int = 77
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class UNetConfig:
    """The LDM spatial-transformer UNet. Defaults: SD 1.5.

    Exactly one of ``num_heads`` (SD 1.x: fixed head count) and ``head_dim``
    (SD 2.x, SDXL: fixed head width, 64) is set.

    ``transformer_depth`` is the number of transformer blocks in each SpatialTransformer: one int
    for every level, or one per level (SDXL base: ``(0, 2, 10)``; 0 where a level has no
    attention). As in the original sgm code, the middle block takes the last level's depth and the
    output blocks the depth of their level.

    ``adm_in_channels`` (SDXL: 2816 base, 2560 refiner) adds the original ``label_emb``: an MLP on
    the pooled text embedding concatenated with the sinusoidal embeddings
    (``addition_time_embed_dim`` wide each) of the micro-conditioning time ids, added to the
    time embedding; None for SD 1.x / 2.x.

    ``time_cond_proj_dim`` (LCM-distilled UNets: 256) adds diffusers' ``time_embedding.cond_proj``: a
    bias-free projection of the guidance-scale embedding (``guidance_embedding``) added to the timestep's
    sinusoid, so the guidance scale is an input of the model rather than a second pass; None otherwise.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | None = 8
    head_dim: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    use_linear_projection: bool = False
    norm_groups: int = 32
    resnet_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    adm_in_channels: int | None = None
    addition_time_embed_dim: int = 256
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        _check_positive(
            self,
            "in_channels",
            "out_channels",
            "model_channels",
            "num_res_blocks",
            "context_dim",
            "norm_groups",
            "addition_time_embed_dim",
        )
        if self.adm_in_channels is not None:
            _check_positive(self, "adm_in_channels")
        if self.time_cond_proj_dim is not None:
            _check_positive(self, "time_cond_proj_dim")
        depth = self.transformer_depth
        if isinstance(depth, tuple):
            if len(depth) != len(self.channel_mult):
                raise ValueError(
                    f"transformer_depth={depth!r} has {len(depth)} entries but channel_mult has "
                    f"{len(self.channel_mult)}; give one per level or a single int"
                )
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depth):
                raise ValueError(f"transformer_depth={depth!r} must hold non-negative integers")
        elif isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
            raise ValueError(
                f"UNetConfig.transformer_depth must be a positive integer or a tuple per level, got {depth!r}"
            )
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but channel_mult has "
                f"{len(self.channel_mult)}; give one per level"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"set exactly one of num_heads and head_dim, got num_heads={self.num_heads!r}, "
                f"head_dim={self.head_dim!r}"
            )
        last = len(self.channel_mult) - 1
        for level in range(len(self.channel_mult)):
            # The middle block's transformer takes the last level's depth.
            if (self.attention_levels[level] or level == last) and self.depth_at(level) < 1:
                raise ValueError(
                    f"transformer_depth={depth!r} gives level {level} no transformer block, but "
                    f"{'the middle block' if level == last else 'that level'} has attention"
                )

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at a level (the middle block: the last level)."""
        depth = self.transformer_depth
        return depth[level] if isinstance(depth, tuple) else depth

    def heads_at(self, channels: int) -> int:
        """Attention heads for a block of ``channels`` width."""
        if self.num_heads is not None:
            return self.num_heads
        if channels % self.head_dim:
            raise ValueError(f"channels={channels} is not divisible by head_dim={self.head_dim}")
        return channels // self.head_dim


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (f=8 for four levels). Defaults: the SD 1.x/2.x VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    # diffusers' force_upcast: under float16 the VAE runs in float32 (SD's and SDXL's VAEs overflow in float16);
    # False for VAEs fine-tuned not to (madebyollin/sdxl-vae-fp16-fix), which then run in float16.
    force_upcast: bool = True
    # SD3's VAE: latents are (z - shift_factor) * scaling_factor, and it has no quant_conv /
    # post_quant_conv (diffusers' use_quant_conv=False, use_post_quant_conv=False).
    shift_factor: float = 0.0
    use_quant_conv: bool = True

    def __post_init__(self):
        _check_positive(
            self,
            "in_channels",
            "out_channels",
            "latent_channels",
            "base_channels",
            "num_res_blocks",
            "norm_groups",
        )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class MMDiTConfig:
    """SD3's MMDiT (diffusers' SD3Transformer2DModel), with diffusers' field names. Defaults: SD3 Medium.

    ``dual_attention_layers``: the joint blocks whose image stream has a second self-attention
    (SD3.5 Medium: 0-12); ``qk_norm``: "rms_norm" (SD3.5) or None. The position table holds
    ``pos_embed_max_size`` squared patches and is cropped around its centre to the latent size.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 192
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        _check_positive(
            self, "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
            "pooled_projection_dim", "out_channels", "pos_embed_max_size",
        )  # fmt: skip
        if self.caption_projection_dim != self.inner_dim:
            # The joint blocks add the projected context to a stream of the image tokens' width.
            raise ValueError(
                f"caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim={self.inner_dim}"
            )
        bad = [
            i for i in self.dual_attention_layers if not isinstance(i, int) or not 0 <= i < self.num_layers
        ]
        if bad:
            raise ValueError(
                f"dual_attention_layers {bad} are not block indices; allowed: 0 to {self.num_layers - 1}"
            )
        if self.qk_norm is not None:
            _check_choice("qk_norm", self.qk_norm, {"rms_norm"})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass(frozen=True)
class T5Config:
    """The T5 encoder (transformers' T5EncoderModel), with transformers' field names. Defaults: T5-XXL v1.1."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        _check_positive(
            self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance",
        )  # fmt: skip
        _check_choice(
            "feed_forward_proj", self.feed_forward_proj, {"gated-gelu", "relu", "gated-relu", "gelu"}
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Training noise schedule and sampler options, named as in diffusers' scheduler_config.json.

    Defaults are SD 1.5's scheduler_config.json. A field left None takes the default of the
    diffusers scheduler class that the sampler reproduces (SD 1.5's file has no
    ``timestep_spacing``, so DDIM/PNDM/DDPM space "leading" and Euler/DPM/UniPC "linspace",
    as diffusers does). Each sampler reads only the options its diffusers class takes.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    skip_prk_steps: bool = True
    variance_type: str | None = None
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str | None = None
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = float("-inf")
    disable_corrector: tuple[int, ...] = ()
    original_inference_steps: int = 50  # LCMScheduler: the distillation schedule's steps
    timestep_scaling: float = 10.0  # LCMScheduler: the boundary condition's timestep scale
    # FlowMatchEulerDiscreteScheduler (SD3: shift 3.0; Flux: dynamic shifting from the image size).
    shift: float = 1.0
    # DPMSolverMultistepScheduler's flow form (with prediction_type "flow_prediction" in its file; its
    # flow_shift is ``shift``): the "flow_dpmpp_2m*" samplers.
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def __post_init__(self):
        _check_positive(self, "num_train_timesteps", "solver_order", "original_inference_steps")
        _check_choice("beta_schedule", self.beta_schedule, {"linear", "scaled_linear", "squaredcos_cap_v2"})
        _check_choice("prediction_type", self.prediction_type, {"epsilon", "v_prediction", "sample"})
        # None means "the default of the diffusers class the sampler reproduces".
        optional = {
            "timestep_spacing": {"leading", "trailing", "linspace"},
            "variance_type": {"fixed_small", "fixed_small_log", "fixed_large"},
            "solver_type": {"midpoint", "heun", "logrho", "bh1", "bh2"},
        }
        for name, allowed in optional.items():
            if getattr(self, name) is not None:
                _check_choice(name, getattr(self, name), allowed)
        _check_choice("interpolation_type", self.interpolation_type, {"linear", "log_linear"})
        _check_choice("final_sigmas_type", self.final_sigmas_type, {"zero", "sigma_min"})
        _check_choice("algorithm_type", self.algorithm_type, {"dpmsolver++", "sde-dpmsolver++"})
        if self.solver_order > 3:
            raise ValueError(f"solver_order={self.solver_order} is not allowed; expected 1, 2 or 3")
        if not isinstance(self.shift, (int, float)) or not self.shift > 0:
            raise ValueError(f"shift must be a positive number, got {self.shift!r}")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError(
                f"max_image_seq_len and base_image_seq_len are both {self.base_image_seq_len}; "
                "dynamic shifting interpolates between two different lengths"
            )
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole Stable Diffusion model: its components and default image size.

    SDXL adds a second text encoder (``text_encoder_2``, OpenCLIP bigG with a projection) and its
    tokenizer; the UNet's context is both encoders' hidden states concatenated (CLIP-L first), and
    the pooled embedding comes from ``text_encoder_2``. The SDXL refiner has only the second
    encoder (``text_encoder=None``). ``force_zeros_for_empty_prompt`` (diffusers' model_index.json
    setting) makes an empty negative prompt all-zero embeddings; ``requires_aesthetics_score``
    (the refiner) puts the aesthetic score in the time ids instead of the target size.
    """

    name: str
    text_encoder: CLIPTextConfig | None = field(default_factory=CLIPTextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder_2: CLIPTextConfig | None = None
    tokenizer_2: TokenizerConfig | None = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    default_size: int = 512
    # generate()'s defaults for this model; diffusers' SD pipelines use PNDM, 50 steps, guidance 7.5.
    default_steps: int = 50
    default_guidance: float = 7.5
    default_sampler: str = "pndm"

    def __post_init__(self):
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        if not encoders:
            raise ValueError("a PipelineConfig needs text_encoder, text_encoder_2 or both")
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 come together; set both or neither")
        width = sum(e.hidden_size for e in encoders)
        if self.unet.context_dim != width:
            raise ValueError(
                f"unet.context_dim={self.unet.context_dim} must equal the text encoders' "
                f"hidden_size{' sum' if len(encoders) > 1 else ''}={width}"
            )
        if self.text_encoder_2 is not None:
            if self.text_encoder_2.projection_dim is None:
                raise ValueError(
                    "text_encoder_2 must have a projection (projection_dim) for the pooled embedding"
                )
            if self.unet.adm_in_channels is None:
                raise ValueError("a model with text_encoder_2 (SDXL) needs a UNet with adm_in_channels")
        if self.unet.in_channels not in (self.vae.latent_channels, 2 * self.vae.latent_channels + 1):
            raise ValueError(
                f"unet.in_channels={self.unet.in_channels} must be the VAE's latent_channels "
                f"({self.vae.latent_channels}) or, for inpainting, {2 * self.vae.latent_channels + 1}"
            )

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's added conditioning (pooled text embedding and time ids)."""
        return self.unet.adm_in_channels is not None

    def replace(self, **changes) -> PipelineConfig:
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


def _sd3_vae() -> VAEConfig:
    return VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)


class TransformerPipelineConfig:
    """What the transformer families' model configs share (``SD3Config``, ``flux_pipeline.FluxPipelineConfig``):
    the UNet families' task flags, all False (the pipeline asks any config), the T5 length check, and
    ``replace``. A mixin without fields; each subclass is a frozen dataclass."""

    is_sdxl = False
    is_inpainting = False
    requires_aesthetics_score = False

    def _check_max_sequence_length(self) -> None:
        value = self.max_sequence_length
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 512:
            raise ValueError(f"max_sequence_length={value!r} must be an integer in 1..512")

    def replace(self, **changes):
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SD3Config(TransformerPipelineConfig):
    """A whole SD3 / SD3.5 model (diffusers' StableDiffusion3Pipeline). Defaults: SD3 Medium.

    The context is CLIP-L's and CLIP-G's penultimate hidden states concatenated (768 + 1280), zero-padded
    to the transformer's ``joint_attention_dim`` and followed along the sequence by T5's
    ``max_sequence_length`` tokens (zeros without T5, ``text_encoder_3=None``); the pooled embedding is
    both CLIP encoders' projected outputs concatenated.
    """

    name: str
    text_encoder: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(projection_dim=768))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder_2: CLIPTextConfig = field(
        default_factory=lambda: CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280,
        )
    )  # fmt: skip
    tokenizer_2: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(pad_token_id=0))
    text_encoder_3: T5Config | None = field(default_factory=T5Config)
    max_sequence_length: int = 256
    transformer: MMDiTConfig = field(default_factory=MMDiTConfig)
    vae: VAEConfig = field(default_factory=_sd3_vae)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(shift=3.0))
    default_size: int = 1024
    # diffusers' StableDiffusion3Pipeline defaults: 28 steps, guidance 7.0.
    default_steps: int = 28
    default_guidance: float = 7.0
    default_sampler: str = "FlowMatchEulerDiscreteScheduler"

    def __post_init__(self):
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self, name).projection_dim is None:
                raise ValueError(f"SD3's {name} needs a projection (projection_dim) for the pooled embedding")
        mm = self.transformer
        clip = self.text_encoder.hidden_size + self.text_encoder_2.hidden_size
        if clip > mm.joint_attention_dim:
            raise ValueError(
                f"the CLIP encoders' widths sum to {clip}, more than transformer.joint_attention_dim="
                f"{mm.joint_attention_dim} (the context is zero-padded, never cut)"
            )
        if self.text_encoder_3 is not None and self.text_encoder_3.d_model != mm.joint_attention_dim:
            raise ValueError(
                f"text_encoder_3.d_model={self.text_encoder_3.d_model} must equal "
                f"transformer.joint_attention_dim={mm.joint_attention_dim}"
            )
        pooled = self.text_encoder.projection_dim + self.text_encoder_2.projection_dim
        if pooled != mm.pooled_projection_dim:
            raise ValueError(
                f"the CLIP projections sum to {pooled}; transformer.pooled_projection_dim is "
                f"{mm.pooled_projection_dim}"
            )
        if mm.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"transformer.in_channels={mm.in_channels} must equal vae.latent_channels={self.vae.latent_channels}"
            )
        self._check_max_sequence_length()

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the patch size (16 for SD3)."""
        return self.vae.downsample_factor * self.transformer.patch_size


def to_dict(cfg) -> dict:
    """A config as plain JSON-ready data (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys raise ValueError."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}")
    kwargs = {}
    nested = {
        "text_encoder": CLIPTextConfig,
        "tokenizer": TokenizerConfig,
        "text_encoder_2": CLIPTextConfig,
        "tokenizer_2": TokenizerConfig,
        "vae": VAEConfig,
        "scheduler": SchedulerConfig,
    }
    # The whole-model configs' component fields (SD3: T5 and the MMDiT in place of the UNet).
    nested = {
        PipelineConfig: {**nested, "unet": UNetConfig},
        SD3Config: {**nested, "text_encoder_3": T5Config, "transformer": MMDiTConfig},
    }.get(cls, {})
    for name, value in data.items():
        sub = nested.get(name)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
