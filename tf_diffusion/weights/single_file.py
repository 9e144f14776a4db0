"""Original single-file Stable Diffusion checkpoints (CompVis / Stability layout) <-> our components.

An original checkpoint holds the whole LatentDiffusion module under fixed prefixes:
``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE), and either
``cond_stage_model.transformer.`` (SD 1.x: a transformers CLIPTextModel, whose keys may
lack the ``text_model.`` level in older files) or ``cond_stage_model.model.`` (SD 2.x:
OpenCLIP ViT-H, whose fused attention projections are split into q/k/v here, and whose
last layer, which SD 2.x never runs, is dropped). Full training files also carry
``model_ema.*``: the EMA copy of the UNet with the dots taken out of every key
(``model_ema.diffusion_modelinput_blocks00weight``), plus schedule buffers that
inference recomputes. Our UNet / VAE / CLIP keys are the original ones, so apart
from OpenCLIP this is prefix bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tf_diffusion.config import CLIPTextConfig, PipelineConfig, UNetConfig, VAEConfig
from tf_diffusion.families import (
    CLIP_PREFIX,
    EMA_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    SDXL_REFINER_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    family_of_config,
    family_of_single_file,
    get_family,
)
from tf_diffusion.layout import unet_layout
from tf_diffusion.presets import PRESETS
from tf_diffusion.weights.diffusers_unet import normalized_depth
from tf_diffusion.weights.lazy import derived, is_floating

# Entries of LatentDiffusion checkpoints that are not weights of the three networks: the DDPM
# schedule (recomputed by our samplers), EMA bookkeeping and position-id buffers.
BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
        "cond_stage_model.model.attn_mask",
    }
)
# SDXL files' buffers: position ids of the CLIP-L encoder.
_SDXL_BUFFERS = frozenset(
    {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.0.transformer.embeddings.position_ids",
    }
)
# OpenCLIP tensors SD 2.x does not use; kept aside so a single file can be written back whole.
_OPENCLIP_UNUSED = ("text_projection", "logit_scale")
# OpenCLIP resblock names -> transformers CLIPEncoderLayer names (after the fused in_proj split).
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


@dataclass
class SingleFileParts:
    """A single-file checkpoint split into our three components (values stay lazy).

    Attributes:
        components: component name -> {our key: tensor}; a component the file lacks is absent.
        text_encoder_kind: "clip" (SD 1.x, OpenAI CLIP), "openclip" (SD 2.x) or None.
        ema: "single" (one UNet weight set, no ``model_ema.*``; pruned files usually hold the EMA
            weights there), "available" (both sets; the non-EMA weights were taken), "used" (both
            sets; the EMA weights were taken) or "none" (no UNet).
        extras: original-layout tensors with no place in our model that a single-file writer
            passes back (OpenCLIP's last layer, text projection and logit scale).
        ignored: buffer keys skipped on purpose (schedule, EMA bookkeeping, position ids).
        unexpected: keys that belong to none of the above.
        openclip_layers: resblocks in the file (SD 2.x: 24, of which 23 are used).
    """

    components: dict[str, dict] = field(default_factory=dict)
    text_encoder_kind: str | None = None
    ema: str = "none"
    extras: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    openclip_layers: int = 0


# Prefixes under which a single file stores weights: a value there must be a tensor.
_WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.", EMA_PREFIX)


def _is_tensor(value) -> bool:
    """A LazyTensor, numpy array or anything array-like with an int shape and a numeric dtype."""
    try:
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    except Exception:  # no shape or dtype, or ones numpy cannot read: not a tensor
        return False
    numeric = dtype.kind in "biuc" or is_floating(dtype)
    return numeric and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_state_dict(tensors: Mapping, source: str = "the checkpoint") -> tuple[dict, dict]:
    """Split a loaded state dict into its tensors and its other entries, refusing what cannot be weights.

    Keys must be strings. A value that is not a tensor is kept as metadata (``global_step``,
    ``epoch``, Lightning's bookkeeping) unless its key is a weight's (a single file's weight
    prefixes, or a schedule buffer), where it is an error.

    Args:
        tensors: the mapping as loaded.
        source: the file, for messages.

    Returns:
        ``(tensors, metadata)``: key -> tensor, and key -> any other value.

    Raises:
        ValueError: non-string keys or non-tensor weights, naming ``source`` and a few of them.
    """
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{source}: the state dict is a {type(tensors).__name__}, not a mapping")
    weights, metadata, bad_keys, bad_values = {}, {}, [], []
    for key, value in tensors.items():
        if not isinstance(key, str):
            bad_keys.append(key)
        elif _is_tensor(value):
            weights[key] = value
        elif key.startswith(_WEIGHT_PREFIXES) and key not in BUFFERS:
            bad_values.append(f"{key[:80]!r} ({type(value).__name__})")
        else:
            metadata[key] = value
    problems = []
    if bad_keys:
        shown = ", ".join(_short(k) for k in bad_keys[:5])
        problems.append(
            f"{len(bad_keys)} keys that are not strings ({shown}{', ...' if len(bad_keys) > 5 else ''})"
        )
    if bad_values:
        shown = ", ".join(bad_values[:5])
        problems.append(
            f"{len(bad_values)} weights that are not tensors ({shown}{', ...' if len(bad_values) > 5 else ''})"
        )
    if problems:
        raise ValueError(f"{source}: not a state dict of tensors: {'; '.join(problems)}")
    return weights, metadata


def unwrap_checkpoint(obj, source: str = "the checkpoint") -> tuple[dict, dict]:
    """The tensors of a loaded .ckpt (``{"state_dict": ...}`` or flat) and its other entries.

    Args:
        obj: what ``load_ckpt`` returned.
        source: the file, for messages.

    Returns:
        ``(tensors, top)``: key -> tensor, and the other top-level entries (``global_step``, ...),
        with non-tensor entries of a flat file among them (see ``check_state_dict``).

    Raises:
        ValueError: the file holds no mapping, or a state dict with non-string keys or non-tensor weights.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj and not isinstance(obj["state_dict"], Mapping):
        raise ValueError(
            f"{source}: the checkpoint's state_dict is a {type(obj['state_dict']).__name__}, not a mapping"
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        top = {k: v for k, v in obj.items() if k != "state_dict"}
        tensors, extra = check_state_dict(obj["state_dict"], source)
        return tensors, {**extra, **top}
    if isinstance(obj, Mapping):
        return check_state_dict(obj, source)
    raise ValueError(f"{source}: checkpoint holds a {type(obj).__name__}, not a state dict")


def ema_key(unet_key: str) -> str:
    """The ``model_ema.*`` key of a UNet key: "model_ema." + the dotted path with its dots removed."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_single_file(tensors: Mapping, *, use_ema: bool | None = None) -> SingleFileParts:
    """Sort an original checkpoint's keys into our components.

    Args:
        tensors: key -> tensor of the whole checkpoint (the ``state_dict`` of a .ckpt).
        use_ema: take the UNet from ``model_ema.*`` (as diffusers' ``extract_ema``). None or
            False take ``model.diffusion_model.*``.

    Returns:
        The parts; nothing is read from the file.

    Raises:
        ValueError: ``use_ema=True`` for a file without EMA weights, EMA weights that do not
            cover the UNet, a key that looks like ours but cannot be placed, or non-string keys
            or non-tensor weights (non-tensor values under other keys are listed as ignored).
    """
    parts = SingleFileParts()
    tensors, metadata = check_state_dict(tensors)
    parts.ignored.extend(metadata)
    unet, vae, clip, openclip, ema = {}, {}, {}, {}, {}
    xl_clip, xl_openclip, xl_refiner = {}, {}, {}
    for key, value in tensors.items():
        if key in BUFFERS or key in _SDXL_BUFFERS:
            parts.ignored.append(key)
        elif key.startswith(SDXL_CLIP_PREFIX):
            xl_clip[key[len(SDXL_CLIP_PREFIX) :]] = value
        elif key.startswith(SDXL_OPENCLIP_PREFIX):
            xl_openclip[key[len(SDXL_OPENCLIP_PREFIX) :]] = value
        elif key.startswith(SDXL_REFINER_OPENCLIP_PREFIX):
            xl_refiner[key[len(SDXL_REFINER_OPENCLIP_PREFIX) :]] = value
        elif key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX) :]] = value
        elif key.startswith(CLIP_PREFIX):
            clip[key[len(CLIP_PREFIX) :]] = value
        elif key.startswith(OPENCLIP_PREFIX):
            openclip[key[len(OPENCLIP_PREFIX) :]] = value
        elif key.startswith(EMA_PREFIX):
            ema[key] = value
        else:
            parts.unexpected.append(key)

    if ema:
        parts.ema = "available"
        if use_ema:
            unet = _ema_unet(unet, ema)
            parts.ema = "used"
    elif use_ema:
        raise ValueError(
            "use_ema=True but the checkpoint has no model_ema.* weights (pruned files usually hold "
            "only the EMA weights already, under model.diffusion_model.); drop use_ema"
        )
    else:
        parts.ema = "single" if unet else "none"

    if (xl_clip or xl_openclip or xl_refiner) and (clip or openclip):
        raise ValueError(
            "the checkpoint holds both SD 1.x / 2.x (cond_stage_model.) and SDXL (conditioner.) text "
            "encoders; expected one kind"
        )
    if xl_refiner and (xl_clip or xl_openclip):
        raise ValueError(
            "the checkpoint holds OpenCLIP under both conditioner.embedders.0.model. (SDXL refiner) and "
            "conditioner.embedders.1.model. / .0.transformer. (SDXL base); expected one layout"
        )
    if xl_clip or xl_openclip or xl_refiner:
        if xl_clip:
            parts.components["text_encoder"] = {
                (k if k.startswith("text_model.") else "text_model." + k): v for k, v in xl_clip.items()
            }
        bigg, prefix = (
            (xl_refiner, SDXL_REFINER_OPENCLIP_PREFIX) if xl_refiner else (xl_openclip, SDXL_OPENCLIP_PREFIX)
        )
        if bigg:
            parts.components["text_encoder_2"], extras, parts.openclip_layers = _from_openclip(
                bigg, prefix, projection=True
            )
            parts.extras.update(extras)
        parts.text_encoder_kind = "openclip-bigg" if xl_refiner else "clip+openclip-bigg"
    elif clip and openclip:
        raise ValueError(
            "the checkpoint holds both an OpenAI CLIP (cond_stage_model.transformer.) and an OpenCLIP "
            "(cond_stage_model.model.) text encoder; expected one"
        )
    if clip:
        parts.text_encoder_kind = "clip"
        # Older SD 1.x files store CLIPTextTransformer directly, without the `text_model.` level.
        parts.components["text_encoder"] = {
            (k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.items()
        }
    elif openclip:
        parts.text_encoder_kind = "openclip"
        parts.components["text_encoder"], parts.extras, parts.openclip_layers = _from_openclip(openclip)
    if unet:
        parts.components["unet"] = unet
    if vae:
        parts.components["vae"] = vae
    return parts


def _ema_unet(unet: dict, ema: dict) -> dict:
    """The UNet's EMA weights, found by flattening each UNet key as LDM's LitEma does."""
    flat: dict[str, str] = {}
    for key in unet:
        flat_key = ema_key(key)
        if flat_key in flat:
            raise ValueError(
                f"UNet keys {flat[flat_key]!r} and {key!r} flatten to the same EMA key {flat_key!r}"
            )
        flat[flat_key] = key
    missing = [k for k in unet if ema_key(k) not in ema]
    if missing:
        raise ValueError(
            f"use_ema=True but model_ema.* lacks {len(missing)} of the {len(unet)} UNet weights, "
            f"e.g. {ema_key(missing[0])!r} for {missing[0]!r}"
        )
    return {key: ema[ema_key(key)] for key in unet}


def _from_openclip(
    tensors: Mapping, prefix: str = OPENCLIP_PREFIX, projection: bool = False
) -> tuple[dict, dict, int]:
    """OpenCLIP text tower keys (without prefix) -> transformers CLIPTextModel keys, extras, layer count.

    SD 2.x (``projection=False``) runs all but the last resblock and no projection: those go to the
    extras. SDXL's bigG (``projection=True``) runs every resblock and pools through
    ``text_projection``, stored as ``x @ P`` (D, P), i.e. transposed from transformers' Linear weight.
    """
    layers: dict[int, dict[str, object]] = {}
    out: dict[str, object] = {}
    extras: dict[str, object] = {}
    for key, value in tensors.items():
        match = _RESBLOCK.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key in ("ln_final.weight", "ln_final.bias"):
            out["text_model.final_layer_norm." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection" and projection:
            if len(value.shape) != 2:
                raise ValueError(
                    f"{prefix}text_projection has shape {tuple(value.shape)}; expected (width, dim)"
                )
            out["text_projection.weight"] = derived(
                value, lambda a: np.ascontiguousarray(np.asarray(a).T), tuple(value.shape[::-1]), value.dtype,
                prefix + key,
            )  # fmt: skip
        elif key in _OPENCLIP_UNUSED:
            extras[prefix + key] = value
        else:
            raise ValueError(f"unknown OpenCLIP key {prefix + key!r}")
    count = len(layers)
    if sorted(layers) != list(range(count)):
        raise ValueError(f"OpenCLIP resblocks are not numbered 0..{count - 1}: found {sorted(layers)}")
    if count < 2:
        raise ValueError(f"an OpenCLIP text encoder needs at least 2 resblocks, found {count}")
    # SD 2.x conditions on the penultimate layer, so the last resblock is never run; SDXL pools
    # from the last one.
    last = count if projection else count - 1
    if not projection:
        for name, value in layers[last].items():
            extras[f"{prefix}transformer.resblocks.{last}.{name}"] = value
    file_prefix = prefix
    for index in range(last):
        prefix = f"text_model.encoder.layers.{index}."
        for name, value in layers[index].items():
            source = f"{file_prefix}transformer.resblocks.{index}.{name}"
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                param = "weight" if name.endswith("weight") else "bias"
                rows = value.shape[0]
                if rows % 3:
                    raise ValueError(
                        f"{source} has {rows} rows; a fused q/k/v projection needs a multiple of 3"
                    )
                width = rows // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{prefix}self_attn.{proj}.{param}"] = derived(
                        value,
                        lambda a, i=i, width=width: np.array(a[i * width : (i + 1) * width]),
                        (width, *value.shape[1:]),
                        value.dtype,
                        source,
                    )
                continue
            module, _, param = name.rpartition(".")
            if module not in _OPENCLIP_LAYER:
                raise ValueError(f"unknown OpenCLIP key {source!r}")
            out[f"{prefix}{_OPENCLIP_LAYER[module]}.{param}"] = value
    return out, extras, count


# --------------------------------------------------------------------------- family and config


def detect_family(parts: SingleFileParts) -> str:
    """The family name ("sd1", "sd2", "sd1-inpainting", ...) of a split single file (``families``)."""
    return family_of_single_file(parts).name


def infer_text_config(tensors: Mapping, kind: str) -> CLIPTextConfig:
    """CLIPTextConfig from shapes; heads are 64 wide in both OpenAI CLIP and OpenCLIP."""
    token = tensors["text_model.embeddings.token_embedding.weight"].shape
    positions = tensors["text_model.embeddings.position_embedding.weight"].shape
    layers = _count(tensors, r"text_model\.encoder\.layers\.(\d+)\.")
    hidden = token[1]
    return CLIPTextConfig(
        vocab_size=token[0],
        max_position_embeddings=positions[0],
        hidden_size=hidden,
        intermediate_size=tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        hidden_act="gelu" if kind == "openclip" else "quick_gelu",
    )


def infer_unet_config(tensors: Mapping) -> UNetConfig:
    """UNetConfig from the block structure and shapes.

    Head and norm-group counts cannot be read from weights: SD 2.x-style UNets (linear
    projections or a 1024-wide context) get 64-wide heads, others SD 1.x's 8 heads; norms get
    SD's 32 groups where the widths allow.
    """
    conv_in = tensors["input_blocks.0.0.weight"].shape  # (C, in, 3, 3)
    model_channels = conv_in[0]
    blocks = _count(tensors, r"input_blocks\.(\d+)\.")
    # Levels: each has num_res_blocks ResBlocks, all but the last a downsample (input_blocks.N.0.op).
    downsamples = sorted(
        int(m.group(1)) for k in tensors if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k))
    )
    levels = len(downsamples) + 1
    num_res_blocks = downsamples[0] - 1 if downsamples else blocks - 1
    # The layout of that level structure, with a transformer wherever one could be, names the blocks.
    probe = UNetConfig(
        model_channels=model_channels,
        channel_mult=(1,) * levels,
        num_res_blocks=max(num_res_blocks, 1),
        attention_levels=(True,) * levels,
        num_heads=1,
    )
    layout = [b for b in unet_layout(probe) if b.section == "input"]
    if num_res_blocks < 1 or blocks != 1 + max(b.index for b in layout):
        raise ValueError(f"cannot read the UNet's level structure from {blocks} input blocks")
    mult, attention, depths = [], [], []
    for level in range(levels):
        first_res, first_attn = (
            next(b for b in layout if b.level == level and b.kind == k) for k in ("res", "attn")
        )
        width = tensors[f"{first_res.path}.out_layers.3.weight"].shape[0]
        mult.append(width // model_channels)
        attention.append(f"{first_attn.path}.norm.weight" in tensors)
        depths.append(_count(tensors, re.escape(first_attn.path) + r"\.transformer_blocks\.(\d+)\."))
    to_k = [v.shape for k, v in tensors.items() if k.endswith("attn2.to_k.weight")]
    context_dim = to_k[0][1] if to_k else 768
    linear = tensors.get("middle_block.1.proj_in.weight")
    use_linear = linear is not None and len(linear.shape) == 2
    depths[-1] = _count(tensors, r"middle_block\.1\.transformer_blocks\.(\d+)\.") or 1
    depth = normalized_depth(depths, attention)
    label = tensors.get("label_emb.0.0.weight")  # SDXL's added conditioning: (emb_dim, adm_in)
    sd2_style = use_linear or context_dim == 1024
    return UNetConfig(
        in_channels=conv_in[1],
        out_channels=tensors["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention),
        # Narrower test models cannot have SD's head sizes; they get the nearest that divides.
        num_heads=None if sd2_style else (8 if model_channels % 8 == 0 else 1),
        head_dim=math.gcd(model_channels, 64) if sd2_style else None,
        transformer_depth=depth,
        context_dim=context_dim,
        adm_in_channels=None if label is None else label.shape[1],
        use_linear_projection=use_linear,
        norm_groups=_groups(model_channels),
    )


def infer_vae_config(tensors: Mapping) -> VAEConfig:
    """VAEConfig from the block structure and shapes (32 norm groups where they divide, SD's scaling factor)."""
    conv_in = tensors["encoder.conv_in.weight"].shape  # (base, in, 3, 3)
    base = conv_in[0]
    levels = _count(tensors, r"encoder\.down\.(\d+)\.")
    blocks = _count(tensors, r"encoder\.down\.0\.block\.(\d+)\.")
    mult = tuple(tensors[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in range(levels))
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=tensors["decoder.conv_out.weight"].shape[0],
        latent_channels=tensors["post_quant_conv.weight"].shape[0],
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        norm_groups=_groups(base),
    )


def _groups(channels: int) -> int:
    # GroupNorm group counts are not stored; SD uses 32, which narrower test models cannot divide.
    return math.gcd(channels, 32)


def _count(tensors: Iterable[str], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in tensors if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def infer_config(
    parts: SingleFileParts, family: str, prediction_type: str, supplied: tuple[str, ...] = ()
) -> PipelineConfig:
    """The PipelineConfig of a single file, by the family's config inference (``families``).

    ``supplied``: components that may be missing from the file because the caller brings them (a VAE file
    given with ``vae=``); a missing VAE is then taken as the family's.

    Raises:
        ValueError: if a component is missing (its architecture cannot be known).
    """
    missing = [c for c in get_family(family).components if c not in parts.components and c not in supplied]
    if missing:
        raise ValueError(
            f"the checkpoint has no {', '.join(missing)} weights, so its architecture is unknown"
        )
    return get_family(family).config_inference()(parts, family, prediction_type)


def infer_sdxl_config(parts: SingleFileParts, family: str, prediction_type: str) -> PipelineConfig:
    """An SDXL base / refiner config: the family's preset when the shapes are one, else inferred from them."""
    entry = get_family(family)
    comps = parts.components
    text = infer_text_config(comps["text_encoder"], "clip") if "text_encoder" in comps else None
    bigg = infer_text_config(comps["text_encoder_2"], "openclip")
    bigg = dataclasses.replace(
        bigg, projection_dim=comps["text_encoder_2"]["text_projection.weight"].shape[0]
    )
    unet = infer_unet_config(comps["unet"])
    base = PRESETS[entry.base_preset]
    vae = base.vae
    if "vae" in comps:
        vae = dataclasses.replace(infer_vae_config(comps["vae"]), scaling_factor=base.vae.scaling_factor)
    for name in entry.presets:
        preset = PRESETS[name]
        if (preset.text_encoder, preset.text_encoder_2, preset.unet, preset.vae) == (text, bigg, unet, vae):
            if preset.scheduler.prediction_type == prediction_type:
                return preset
            return preset.replace(
                name=f"{preset.name} ({prediction_type})",
                scheduler=dataclasses.replace(preset.scheduler, prediction_type=prediction_type),
            )
    return base.replace(
        name=f"{family} (inferred)",
        text_encoder=text,
        text_encoder_2=bigg,
        unet=unet,
        vae=vae,
        scheduler=dataclasses.replace(base.scheduler, prediction_type=prediction_type),
    )


def infer_sd_config(parts: SingleFileParts, family: str, prediction_type: str) -> PipelineConfig:
    """An SD 1.x / 2.x config: the family's preset when the shapes are one, else inferred from them."""
    entry = get_family(family)
    text = infer_text_config(parts.components["text_encoder"], parts.text_encoder_kind)
    unet = infer_unet_config(parts.components["unet"])
    base = PRESETS[entry.base_preset]
    vae = infer_vae_config(parts.components["vae"]) if "vae" in parts.components else base.vae
    same = [p for p in PRESETS.values() if (p.text_encoder, p.unet, p.vae) == (text, unet, vae)]
    for preset in same:
        if preset.scheduler.prediction_type == prediction_type:
            return preset
    for preset in same:
        # A released architecture trained for another prediction type (e.g. an SD 1.5 v-model).
        return preset.replace(
            name=f"{preset.name} ({prediction_type})",
            scheduler=dataclasses.replace(preset.scheduler, prediction_type=prediction_type),
        )
    size = entry.default_sizes.get(prediction_type, base.default_size)
    return PipelineConfig(
        name=f"{family} (inferred)",
        text_encoder=text,
        tokenizer=base.tokenizer,
        unet=unet,
        vae=vae,
        scheduler=dataclasses.replace(base.scheduler, prediction_type=prediction_type),
        default_size=size,
        default_sampler=entry.default_sampler,
    )


# --------------------------------------------------------------------------- writing


def to_single_file(
    components: Mapping[str, Mapping], config: PipelineConfig, extras: Mapping | None = None
) -> dict:
    """Our components -> one original-layout state dict (values stay lazy).

    The text encoder is written in the layout of the config's family (``families``): OpenAI CLIP
    (``cond_stage_model.transformer.``) for SD 1.x, OpenCLIP (``cond_stage_model.model.``) for SD 2.x.
    OpenCLIP's last layer, text projection and logit scale, which our model does not hold, come
    from ``extras`` when the weights were read from a single file; otherwise they are written as
    placeholders SD 2.x never reads (a zero last layer, an identity projection, OpenCLIP's
    initial logit scale), so that the file has the layout other tools expect.

    Args:
        components: "text_encoder" / "unet" / "vae" -> {our key: tensor}.
        config: the pipeline the weights belong to.
        extras: original-layout tensors to pass through (``SingleFileParts.extras``).

    Returns:
        original key -> tensor.
    """
    out: dict[str, object] = {}
    for key, value in components["unet"].items():
        out[UNET_PREFIX + key] = value
    for key, value in components["vae"].items():
        out[VAE_PREFIX + key] = value
    family = family_of_config(config)
    if family.is_sdxl:
        # SDXL: CLIP-L under conditioner.embedders.0.transformer., bigG (every layer, its
        # text_projection as x @ P) under the family's OpenCLIP prefix; logit_scale from extras.
        if "text_encoder" in components:
            for key, value in components["text_encoder"].items():
                out[family.prefixes["text_encoder"] + key] = value
        prefix = family.prefixes["text_encoder_2"]
        out.update(
            _to_openclip(components["text_encoder_2"], config.text_encoder_2, extras or {}, prefix, True)
        )
        return out
    text = components["text_encoder"]
    if family.text_encoder == "openclip":
        out.update(_to_openclip(text, config.text_encoder, extras or {}))
    else:
        for key, value in text.items():
            out[CLIP_PREFIX + key] = value
    return out


def _to_openclip(
    text: Mapping, cfg: CLIPTextConfig, extras: Mapping, base: str = OPENCLIP_PREFIX, projection: bool = False
) -> dict:
    out: dict[str, object] = {
        base + "token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
        base + "positional_embedding": text["text_model.embeddings.position_embedding.weight"],
        base + "ln_final.weight": text["text_model.final_layer_norm.weight"],
        base + "ln_final.bias": text["text_model.final_layer_norm.bias"],
    }
    reverse = {v: k for k, v in _OPENCLIP_LAYER.items()}
    dtype = text["text_model.final_layer_norm.weight"].dtype
    for index in range(cfg.num_hidden_layers):
        prefix = f"text_model.encoder.layers.{index}."
        target = f"{base}transformer.resblocks.{index}."
        for param in ("weight", "bias"):
            parts = [text[f"{prefix}self_attn.{p}.{param}"] for p in ("q_proj", "k_proj", "v_proj")]
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            out[f"{target}attn.in_proj_{param}"] = derived(
                parts[0],
                lambda _, parts=parts: np.concatenate([np.asarray(p) for p in parts]),
                shape,
                parts[0].dtype,
            )
        for ours, theirs in reverse.items():
            for param in ("weight", "bias"):
                out[f"{target}{theirs}.{param}"] = text[f"{prefix}{ours}.{param}"]
    dtype = text["text_model.final_layer_norm.weight"].dtype
    if projection:
        weight = text["text_projection.weight"]  # (P, D) Linear -> OpenCLIP's (D, P)
        out[base + "text_projection"] = derived(
            weight, lambda a: np.ascontiguousarray(np.asarray(a).T), tuple(weight.shape[::-1]), weight.dtype
        )
        key = base + "logit_scale"
        out[key] = extras.get(key, np.array(np.log(1 / 0.07)).astype(dtype))
        return out
    # The unused tail of the OpenCLIP tower.
    last = f"{base}transformer.resblocks.{cfg.num_hidden_layers}."
    d, inner = cfg.hidden_size, cfg.intermediate_size
    placeholders = {
        "attn.in_proj_weight": np.zeros((3 * d, d)),
        "attn.in_proj_bias": np.zeros((3 * d,)),
        "attn.out_proj.weight": np.zeros((d, d)),
        "attn.out_proj.bias": np.zeros((d,)),
        "ln_1.weight": np.ones((d,)),
        "ln_1.bias": np.zeros((d,)),
        "ln_2.weight": np.ones((d,)),
        "ln_2.bias": np.zeros((d,)),
        "mlp.c_fc.weight": np.zeros((inner, d)),
        "mlp.c_fc.bias": np.zeros((inner,)),
        "mlp.c_proj.weight": np.zeros((d, inner)),
        "mlp.c_proj.bias": np.zeros((d,)),
    }
    for name, value in placeholders.items():
        key = last + name
        out[key] = extras.get(key, value.astype(dtype))
    for name, value in (
        ("text_projection", np.eye(d)),
        ("logit_scale", np.array(np.log(1 / 0.07))),
    ):
        key = base + name
        out[key] = extras.get(key, value.astype(dtype))
    return out
