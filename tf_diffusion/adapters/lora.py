"""LoRA files for SD 1.x / 2.x / SDXL UNets, Flux transformers and text encoders: read, map, merge.

Formats read:

- kohya / A1111 (sd-scripts ``networks/lora.py``): ``lora_unet_<module>`` and ``lora_te_<module>`` (SDXL:
  ``lora_te1_`` for CLIP-L, ``lora_te2_`` for OpenCLIP bigG), where the module is a path with ``.``
  written as ``_``: the diffusers UNet path (what sd-scripts writes for SD 1.x / 2.x,
  ``lora_unet_down_blocks_0_attentions_0_proj_in``) or the original single-file path (what it writes for
  SDXL, which it trains on its own copy of the original UNet: ``lora_unet_input_blocks_4_1_proj_in``,
  ``lora_unet_label_emb_0_0``), and the transformers text-encoder path; tensors ``.lora_down.weight``,
  ``.lora_up.weight`` and an optional scalar ``.alpha`` (absent: alpha = rank). Conv layers ("LoCon"):
  3x3 and 1x1 downs with 1x1 ups.
- diffusers / PEFT (``save_lora_weights``): ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``,
  ``text_encoder.<transformers path>...`` and (SDXL) ``text_encoder_2.``; alpha, ``rank_pattern``,
  ``alpha_pattern`` and ``use_rslora`` from the ``lora_adapter_metadata`` header (absent: alpha = rank).
- diffusers' older layouts (no alpha: scale 1): attention processors
  (``unet.<...>.attn1.processor.to_q_lora.down.weight``, text encoders ``...self_attn.to_q_lora.up.weight``)
  and ``LoRACompatibleLinear`` (``unet.<...>.to_q.lora.down.weight``, text encoders
  ``...q_proj.lora_linear_layer.down.weight``).

Flux (``FluxTransformer``, whose layers carry the original Black Forest Labs names, with fused projections):

- diffusers / PEFT (``FluxPipeline.save_lora_weights``): ``transformer.<diffusers path>.lora_A.weight``,
  on diffusers' split layers (``transformer_blocks.N.attn.to_q``, ``single_transformer_blocks.N.proj_mlp``,
  ``norm_out.linear``, ...) or on the original ones (``transformer.double_blocks.N.img_attn.qkv``; also
  with ComfyUI's ``diffusion_model.`` prefix); ``text_encoder.`` for CLIP-L.
- XLabs (``double_blocks.N.processor.qkv_lora1.down.weight``: ``qkv_lora1`` / ``qkv_lora2`` the image and
  text ``qkv``, ``proj_lora1`` / ``proj_lora2`` their ``proj``; ``single_blocks.N.processor.qkv_lora``
  the q, k, v rows of ``linear1``, ``proj_lora`` ``linear2``; no alpha: scale 1).
- kohya sd-scripts (``networks/lora_flux.py``): ``lora_unet_<original path>`` (``lora_unet_double_blocks_0_
  img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``; sd-scripts' split-qkv training saves the same
  fused modules, a stacked down and a block-diagonal up) and ``lora_te1_`` for CLIP-L; also kohya-style
  keys on diffusers paths (``lora_transformer_single_transformer_blocks_0_attn_to_q``).

A module on one of diffusers' split layers updates its block of rows of our fused layer: ``to_q`` /
``to_k`` / ``to_v`` the thirds of ``img_attn.qkv`` (``add_*_proj``: ``txt_attn.qkv``), and in a single
block q, k, v then ``proj_mlp`` the rows of ``linear1``; ``norm_out.linear`` the halves of
``final_layer.adaLN_modulation.1`` in swapped order (diffusers stores (scale, shift), the original
(shift, scale)). The "unet" weight scales a Flux transformer's LoRA.

A text-encoder weight (``{"text_encoder": w}``, A1111's ``<lora:name:te:unet>``) covers both SDXL text
encoders; an SDXL refiner has only ``text_encoder_2``.

``.safetensors`` files are read with ``weights.safetensors_io``; ``.pt`` / ``.bin`` / ``.ckpt`` with the
allow-list unpickler ``weights.ckpt.load_ckpt`` (nothing in the file is executed).

How LoRAs act: merged into the weights. Each touched kernel is recomputed as
``base + sum_i weight_i * scale_i * (up_i @ down_i)`` in float32 (scale = alpha / rank) and cast to the
variable's dtype. Why merging: the denoising loop runs at the base model's speed (no extra matmuls per
step) and the compiled loop never changes, because kernels are variables that are assigned, never
rebuilt: a compiled ``generate()`` sees the new values without retracing. Exactness: the base value of
every touched kernel is kept (one copy of those kernels, not of the LoRA deltas), so removing LoRAs
assigns the stored values back, bit for bit. Each change recomputes from the base, so LoRAs switched on
and off many times do not accumulate rounding.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from tf_diffusion.adapters.extra_networks import LORA_SUFFIXES as _LORA_SUFFIXES
from tf_diffusion.layers import CONV, LINEAR
from tf_diffusion.weights.diffusers_unet import (
    RESNET_RENAMES,
    diffusers_key_to_original,
    diffusers_prefix_map,
)
from tf_diffusion.weights.state_dict import named_parameters, to_keras_layout, to_torch_layout, torch_shape

COMPONENTS = ("unet", "text_encoder")  # the parts a weight names
# Model component -> the weight part that scales it (SDXL's second encoder follows the text-encoder weight).
_PART = {
    "unet": "unet",
    "transformer": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
}
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",  # on a Flux model: its transformer (sd-scripts' name)
    "lora_transformer_": "transformer",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_DIFFUSERS_PREFIXES = {
    "unet.": "unet",
    "transformer.": "transformer",
    "diffusion_model.": "transformer",  # ComfyUI's Flux LoRAs on the original names
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
# diffusers' older key layouts: suffix -> (part, what replaces the suffix to give the module path).
_OLD_DIFFUSERS = {
    ".lora.down.weight": ("down", ""),
    ".lora.up.weight": ("up", ""),
    ".lora_linear_layer.down.weight": ("down", ""),
    ".lora_linear_layer.up.weight": ("up", ""),
    **{f".to_{n}_lora.{d}.weight": (d, f".to_{n}") for n in ("q", "k", "v", "out") for d in ("down", "up")},
}
# Attention-processor names -> the layer: UNet attention and transformers' self_attn spellings.
_PROCESSOR_LAYERS = {
    "unet": {".to_out": ".to_out.0"},
    "text": {".to_q": ".q_proj", ".to_k": ".k_proj", ".to_v": ".v_proj", ".to_out": ".out_proj"},
}
# Tensors of formats this module does not compute: key fragment -> what it is.
_UNSUPPORTED = {
    "oft_": "LyCORIS OFT (oft_*)",
    ".on_input": "LyCORIS IA3 (on_input)",
    ".w_norm": "LyCORIS norm layers (w_norm)",
    ".b_norm": "LyCORIS norm layers (b_norm)",
    ".diff": "LyCORIS full weights (diff)",
}
# kohya / LyCORIS tensor suffix -> part name.
_KOHYA_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora",
    **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
# Keys only SDXL files have (its second text encoder, its added embeddings).
_SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "add_embedding", "lora_unet_label_emb")
# Keys only SD 1.x / 2.x files have (kohya's one text encoder).
_SD_MARKERS = ("lora_te_",)
# Keys only Flux LoRAs have (its transformer's original and diffusers block names).
_FLUX_MARKERS = (
    "lora_unet_double_blocks_",
    "lora_unet_single_blocks_",
    "lora_transformer_",
    "double_blocks.",
    "single_blocks.",
    "single_transformer_blocks.",
)
# Keys of UNet LoRAs (SD 1.x / 2.x / SDXL), in kohya's and diffusers' spellings.
_UNET_MARKERS = (
    "lora_unet_down_blocks_",
    "lora_unet_up_blocks_",
    "lora_unet_mid_block_",
    "lora_unet_input_blocks_",
    "lora_unet_output_blocks_",
    "lora_unet_middle_block_",
    "unet.",
    "lora_te_",
    "lora_te2_",
)
# Cross-attention / text widths -> the family they belong to, for messages.
_CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message lists every offending key."""


@dataclass(frozen=True)
class LoraModule:
    """One layer's update.

    Attributes:
        component: "unet", "text_encoder" or "text_encoder_2".
        path: our layer's attribute path (the original checkpoint key without ``.weight``).
        key: the module's name in the file, for messages.
        kind: "lora" (``down`` / ``up``, optionally ``mid``: LoCon Tucker), "loha" (``hada_*``) or
            "lokr" (``lokr_*``).
        tensors: the factors, float32, torch layout (see ``delta``).
        scale: alpha / rank (alpha / sqrt(rank) for rsLoRA; 1 for a LoKr without low-rank factors).
        dora: the DoRA magnitude (kohya / LyCORIS ``dora_scale``, peft ``lora_magnitude_vector``) in
            torch layout, broadcastable to the weight: (out, 1, ...) normalises each output row,
            (1, in, ...) each input column; None for no DoRA.
        rows: None when the module updates the whole layer; else ((ours, theirs, count), ...): the
            module's output rows ``theirs:theirs+count`` update our rows ``ours:ours+count`` (one of
            diffusers' split Flux layers inside our fused one).
    """

    component: str
    path: str
    key: str
    kind: str
    tensors: dict = field(repr=False)
    scale: float
    dora: np.ndarray | None = field(default=None, repr=False)
    rows: tuple[tuple[int, int, int], ...] | None = None

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        low = t.get("lokr_w1_b", t.get("lokr_w2_b"))
        return 0 if low is None else int(low.shape[0])

    def delta(self, shape: tuple) -> np.ndarray:
        """The unscaled update (out, in[, kh, kw]) in torch layout, as the format defines it."""
        return _delta(self.kind, self.tensors, tuple(shape))


def _rows_shape(rows, shape: tuple) -> tuple:
    """The torch shape of a module that covers ``rows`` of a layer of shape ``shape``."""
    return shape if rows is None else (sum(count for _, _, count in rows), *shape[1:])


def _tucker(core: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # LyCORIS's Tucker rebuild: core (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw).
    return np.einsum("ijkl,jr,ip->prkl", core, b, a)


def _delta(kind: str, t: Mapping, shape: tuple) -> np.ndarray:
    if kind == "lora":
        down, up = t["down"], t["up"]
        if "mid" in t:  # LoCon Tucker: 1x1 down, kxk mid, 1x1 up
            out = np.einsum(
                "or,rskl,si->oikl", up.reshape(up.shape[0], -1), t["mid"], down.reshape(down.shape[0], -1)
            )
        else:
            out = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return out.reshape(shape)
    if kind == "loha":  # Hadamard product of two low-rank products
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2).reshape(shape)
    # LoKr: Kronecker product of two factors, each whole or a low-rank product
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if len(shape) == 4 and w2.ndim == 2:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - w1.ndim))
    return np.kron(w1, w2).reshape(shape)


_KIND_PARTS = {
    "lora": ({"down", "up"}, {"mid"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
}


def _kind_of(entry: Mapping) -> str | None:
    parts = set(entry) - {"alpha", "dora", "key", "format"}
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    return "lora"


def _parts_problem(kind: str, entry: Mapping) -> str | None:
    """What a module of ``kind`` lacks or has too much of, or None."""
    have = {k for k in entry if k not in ("alpha", "dora", "key", "format")}
    if kind == "lokr":
        w1 = {"lokr_w1"} <= have or {"lokr_w1_a", "lokr_w1_b"} <= have
        w2 = {"lokr_w2"} <= have or {"lokr_w2_a", "lokr_w2_b"} <= have
        return (
            None
            if w1 and w2
            else f"a LoKr module needs lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b); has {sorted(have)}"
        )
    needed, optional = _KIND_PARTS[kind]
    if not needed <= have or have - needed - optional:
        return f"has {sorted(have)}"
    if kind == "loha" and len(have & optional) == 1:
        return f"has {sorted(have)}: hada_t1 and hada_t2 go together"
    return None


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file read and mapped onto a model (not applied).

    Attributes:
        source: the file it was read from.
        format: "kohya", "diffusers" or "xlabs" (several joined by "+").
        modules: one entry per layer it changes.
        metadata: the file's safetensors header metadata (empty for pickles).
    """

    source: str
    format: str
    modules: tuple[LoraModule, ...]
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def components(self) -> set[str]:
        return {m.component for m in self.modules}


# -------------------------------------------------------------------------------------------- reading


def read_lora_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """The tensors and header metadata of a LoRA file.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (``.pt``, ``.bin``, ``.ckpt``, ``.pth``).

    Returns:
        (name -> lazy tensor, metadata str -> str).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file of another kind, a corrupt or truncated file, or a pickle whose top level is
            not a dict of tensors (``UnsafeCheckpointError`` for pickles that name code).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from tf_diffusion.weights.safetensors_io import open_safetensors

        f = open_safetensors(path)
        return dict(f.items()), dict(f.metadata)
    if suffix in _LORA_SUFFIXES:
        from tf_diffusion.weights.ckpt import load_ckpt

        data = load_ckpt(path)
        if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a LoRA pickle must hold a dict of tensors, got {type(data).__name__}")
        return dict(data), {}
    raise ValueError(f"LoRA file {str(path)!r} has suffix {suffix!r}; allowed: {', '.join(_LORA_SUFFIXES)}")


def _unet_names(unet, config) -> dict[str, str]:
    """Every name a file may give a UNet layer -> our layer path.

    Our paths are the single-file keys; diffusers paths come from the existing rename
    (``diffusers_unet``), inverted here and checked by renaming them back.
    """
    prefix_map = diffusers_prefix_map(config)
    inverse = [(ours, theirs) for theirs, ours in prefix_map.items()]
    names = {}
    for key, (layer, attr) in named_parameters(unet).items():
        if attr != "weight" or type(layer).LAYOUT.get(attr) not in (LINEAR, CONV):
            continue
        path = key[: -len(".weight")]
        names[path] = path
        for ours, theirs in inverse:
            if not (path + ".").startswith(ours):
                continue
            rest = path[len(ours) :]
            candidates = [theirs + rest]
            if ".resnets." in theirs:
                candidates += [
                    theirs + d + rest[len(o) :]
                    for d, o in RESNET_RENAMES.items()
                    if (rest + ".").startswith(o + ".")
                ]
            for candidate in candidates:
                candidate = candidate.rstrip(".")
                if diffusers_key_to_original(candidate + ".weight", prefix_map) == key:
                    names[candidate] = path
    return names


def _text_names(text_encoder) -> dict[str, str]:
    """Every name a file may give a text-encoder layer (with or without ``text_model.``) -> our path."""
    names = {}
    for key, (layer, attr) in named_parameters(text_encoder).items():
        if attr != "weight" or type(layer).LAYOUT.get(attr) not in (LINEAR, CONV):
            continue
        path = key[: -len(".weight")]
        names[path] = path
        names[path.removeprefix("text_model.")] = path  # transformers 5 drops the text_model level
    return names


def _flux_names(transformer) -> tuple[dict[str, str], dict[str, tuple]]:
    """Every name a file may give a Flux transformer layer -> our path, and the row blocks of split names.

    Our paths are the original names; diffusers' come from the rename in ``weights.flux``. A diffusers
    layer that is one part of our fused layer (``attn.to_k`` of ``img_attn.qkv``) gets its rows, in the
    order the rename concatenates the parts.
    """
    from tf_diffusion.weights.flux import _SWAPPED, _fused, _plain_pairs

    params = named_parameters(transformer)
    names, rows = {}, {}
    for key, (layer, attr) in params.items():
        if attr == "weight" and type(layer).LAYOUT.get(attr) == LINEAR:
            names[key[: -len(".weight")]] = key[: -len(".weight")]
    cfg = transformer.config
    for theirs, ours in _plain_pairs(cfg):
        if theirs.endswith(".weight") and ours in params:
            names[theirs[: -len(".weight")]] = ours[: -len(".weight")]
    for ours, theirs in _SWAPPED.items():
        if ours.endswith(".weight"):
            path = theirs[: -len(".weight")]
            half = torch_shape(*params[theirs])[0] // 2
            names[ours[: -len(".weight")]] = path
            rows[ours[: -len(".weight")]] = ((half, 0, half), (0, half, half))
    for ours, parts in _fused(cfg).items():
        if not ours.endswith(".weight"):
            continue
        total = torch_shape(*params[ours])[0]
        widths = [cfg.hidden_size] * 3 + [total - 3 * cfg.hidden_size] * (len(parts) - 3)  # q, k, v[, mlp]
        start = 0
        for part, width in zip(parts, widths, strict=True):
            name = part[: -len(".weight")]
            names[name] = ours[: -len(".weight")]
            rows[name] = ((start, 0, width),)
            start += width
    # XLabs' attention-processor LoRAs: one module per fused qkv (in a single block, its q, k, v rows).
    for i in range(cfg.depth):
        for theirs, ours in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                             ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):  # fmt: skip
            names[f"double_blocks.{i}.processor.{theirs}"] = f"double_blocks.{i}.{ours}"
    for i in range(cfg.depth_single_blocks):
        names[f"single_blocks.{i}.processor.qkv_lora"] = f"single_blocks.{i}.linear1"
        rows[f"single_blocks.{i}.processor.qkv_lora"] = ((0, 0, 3 * cfg.hidden_size),)
        names[f"single_blocks.{i}.processor.proj_lora"] = f"single_blocks.{i}.linear2"
    return names, rows


def _is_flux(sd) -> bool:
    from tf_diffusion.flux import FluxTransformer

    return isinstance(getattr(sd, "transformer", None), FluxTransformer)


@dataclass
class _Targets:
    """The layers of one pipeline that a LoRA may name, by every spelling formats use."""

    dotted: dict[str, dict[str, str]]  # component -> file module name (dotted) -> our path
    kohya: dict[str, dict[str, str]]  # component -> kohya module name (no prefix) -> our path
    params: dict[str, dict[str, tuple]]  # component -> our path -> (layer, "weight")
    # component -> file module name (dotted and kohya spellings) -> its rows of our layer, for the
    # names that cover part of a layer (see LoraModule.rows).
    rows: dict[str, dict[str, tuple]] = field(default_factory=dict)

    @classmethod
    def of(cls, sd) -> _Targets:
        rows = {}
        if _is_flux(sd):
            flux, flux_rows = _flux_names(sd.transformer)
            dotted = {"transformer": flux}
            rows["transformer"] = {**flux_rows, **{k.replace(".", "_"): v for k, v in flux_rows.items()}}
            encoders = ("text_encoder",)  # CLIP-L; T5 LoRAs are not read
        elif getattr(sd, "unet", None) is not None:
            dotted = {"unet": _unet_names(sd.unet, sd.config.unet)}
            encoders = ("text_encoder", "text_encoder_2")  # a refiner has no text_encoder, SD 1/2 no second
        else:
            raise LoraError(
                f"LoRAs apply to SD 1.x / 2.x / SDXL UNets and Flux; the model is {_model_family(sd)}"
            )
        for c in encoders:
            if getattr(sd, c, None) is not None:
                dotted[c] = _text_names(getattr(sd, c))
        kohya = {
            c: {name.replace(".", "_"): path for name, path in names.items()} for c, names in dotted.items()
        }
        params = {
            c: {
                k[: -len(".weight")]: v
                for k, v in named_parameters(getattr(sd, c)).items()
                if v[1] == "weight"
            }
            for c in dotted
        }
        return cls(dotted, kohya, params, rows)


def _peft_meta(metadata: Mapping[str, str], component: str) -> dict:
    """The adapter config diffusers stored for one component (``lora_adapter_metadata``), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise LoraError(f"lora_adapter_metadata is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LoraError("lora_adapter_metadata must be a JSON object")
    prefix = component + "."
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


def _pattern_value(patterns: Mapping, module: str, default):
    """peft's rank/alpha pattern lookup: a key matches a module path that ends in it (after a dot)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _float(value, what: str) -> float:
    """A scalar tensor's value (kohya's ``.alpha``), finite."""
    array = np.asarray(value, dtype=np.float32)
    if array.size != 1 or not np.isfinite(array).all():
        raise LoraError(f"{what} must be one finite number, got shape {array.shape}")
    return float(array.reshape(-1)[0])


def parse_lora(
    tensors: Mapping, metadata: Mapping[str, str], sd, *, source: str = "<tensors>"
) -> LoraWeights:
    """Map a LoRA state dict onto ``sd``'s layers and check every shape; nothing is changed.

    Args:
        tensors: the file's tensors (kohya or diffusers names; see the module docstring).
        metadata: its header metadata (``lora_adapter_metadata`` for diffusers files).
        sd: the ``StableDiffusion`` it is for.
        source: the file name, for messages.

    Returns:
        The mapped ``LoraWeights``.

    Raises:
        LoraError: keys that match no layer or that this module does not compute (listed together), a
            module without its down or up tensor, ranks of down and up that differ, or shapes that do not
            fit the model (with the family the LoRA looks made for and the model's family).
    """
    targets = _state(sd).targets(sd)
    # (component, our path, rows) -> {"down", "up", "alpha", "key", ...}
    groups: dict[tuple[str, str, tuple | None], dict] = {}
    unknown, unsupported, formats = [], [], set()
    keys = [k for k in tensors if isinstance(k, str)]
    for key in tensors:
        if not isinstance(key, str):
            unknown.append(repr(key))
            continue
        kind = next((label for frag, label in _UNSUPPORTED.items() if frag in key), None)
        if kind == "LyCORIS full weights (diff)" and not key.endswith((".diff", ".diff_b")):
            kind = None
        if kind is not None:
            unsupported.append(f"{key} ({kind})")
            continue
        found = _kohya_key(key, targets) or _diffusers_key(key, targets) or _xlabs_key(key, targets)
        if found is None:
            unknown.append(key)
            continue
        fmt, component, path, module, part, rows = found
        formats.add(fmt)
        entry = groups.setdefault((component, path, rows), {"key": module, "format": fmt})
        entry[part] = tensors[key]
    if unknown or unsupported:
        lines = [f"LoRA {source}: {len(unknown) + len(unsupported)} keys match no layer of this model:"]
        shown = (unsupported + unknown)[:30]
        lines += [f"  {k}" for k in shown]
        if len(unsupported) + len(unknown) > len(shown):
            lines.append(f"  ... and {len(unsupported) + len(unknown) - len(shown)} more")
        if unsupported:
            lines.append("(LyCORIS OFT, IA3, norm and full-weight modules are not supported)")
        lines += _family_hints(keys, targets, sd)
        raise LoraError("\n".join(lines))
    if not groups:
        raise LoraError(f"LoRA {source} holds no LoRA tensors")

    modules, incomplete, mismatched = [], [], []
    peft = {c: _peft_meta(metadata, c) for c in targets.dotted}
    for (component, path, rows), entry in groups.items():
        kind = _kind_of(entry)
        problem = _parts_problem(kind, entry)
        if problem:
            incomplete.append(f"{entry['key']}: {problem}")
            continue
        tensors = {
            k: np.asarray(v).astype(np.float32)
            for k, v in entry.items()
            if k not in ("alpha", "key", "format")
        }
        dora = tensors.pop("dora", None)
        layer, attr = targets.params[component][path]
        want = _rows_shape(rows, torch_shape(layer, attr))
        if kind == "lora":
            down, up = tensors["down"], tensors["up"]
            problem = _shape_problem(down, up, want, tensors.get("mid"))
            rank = int(down.shape[0])
        else:
            down = tensors.get("hada_w1_b", tensors.get("lokr_w1_b", tensors.get("lokr_w2_b")))
            problem = _factor_problem(kind, tensors, want)
            rank = None if down is None else int(down.shape[0])
        if problem is None and dora is not None:
            if rows is not None:
                unsupported.append(f"{entry['key']} (DoRA on a part of the fused layer {path})")
                continue
            problem = _dora_problem(dora, want)
        if problem:
            mismatched.append((entry["key"], problem, down, want))
            continue
        meta = peft[component] if entry["format"] == "diffusers" else {}
        if rank is None:  # a LoKr of two whole factors: no rank, alpha unused (as the web UI)
            modules.append(LoraModule(component, path, entry["key"], kind, tensors, 1.0, dora, rows))
            continue
        if "alpha" in entry:
            alpha = _float(entry["alpha"], f"{entry['key']}.alpha")
        elif meta.get("lora_alpha") is not None:
            alpha = float(_pattern_value(meta.get("alpha_pattern"), entry["key"], meta["lora_alpha"]))
        else:
            alpha = float(rank)  # kohya and peft both default alpha to the rank
        if meta.get("use_dora") and dora is None:
            unsupported.append(
                f"{entry['key']} (use_dora in lora_adapter_metadata, but no lora_magnitude_vector)"
            )
        scale = alpha / math.sqrt(rank) if meta.get("use_rslora") else alpha / rank
        modules.append(LoraModule(component, path, entry["key"], kind, tensors, scale, dora, rows))
    if incomplete:
        raise LoraError(
            f"LoRA {source}: modules without both down and up tensors:\n  " + "\n  ".join(incomplete)
        )
    if unsupported:
        raise LoraError(f"LoRA {source}: not supported yet:\n  " + "\n  ".join(unsupported))
    if mismatched:
        raise LoraError(
            "\n".join([_mismatch_message(source, mismatched, sd), *_family_hints(keys, targets, sd)])
        )
    return LoraWeights(source, "+".join(sorted(formats)), tuple(modules), dict(metadata))


def _family_hints(keys: Sequence[str], targets: _Targets, sd) -> list[str]:
    """Lines that say which family a LoRA's keys belong to when the model is of another, or lacks a part."""
    sdxl = sd.config.is_sdxl
    hints = []
    if _is_flux(sd):
        if any(k.startswith(_UNET_MARKERS) or ".lora_unet_" in k for k in keys):
            sdxl_keys = [m for m in _SDXL_MARKERS if m != "lora_te1_"] + ["lora_unet_input_blocks_"]
            made = "SDXL" if any(m in k for k in keys for m in sdxl_keys) else "SD 1.x / 2.x (or SDXL)"
            hints.append(
                f"(these are {made} UNet LoRA keys; the model is {_model_family(sd)}, a transformer "
                "without a UNet: use a LoRA made for Flux)"
            )
        if any(k.startswith(("lora_te3_", "text_encoder_2.")) for k in keys):
            hints.append(
                "(keys for the T5 text encoder (lora_te3_ / text_encoder_2.), which LoRAs do not change here: "
                "as in diffusers, Flux LoRAs apply to the transformer and CLIP-L)"
            )
        return hints
    if any(k.startswith(_FLUX_MARKERS) or f".{m}" in k for k in keys for m in _FLUX_MARKERS):
        return [f"(these are Flux LoRA keys; the model is {_model_family(sd)}: use a LoRA made for it)"]
    if any(k.startswith("transformer.") for k in keys):
        return [
            f"(these are transformer LoRA keys, as Flux and SD3 LoRAs have; the model is {_model_family(sd)}, "
            "a UNet)"
        ]
    if not sdxl and any(m in k for k in keys for m in _SDXL_MARKERS):
        hints.append(f"(these are SDXL LoRA keys; the model is {_model_family(sd)})")
    if (
        sdxl
        and any(k.startswith(_SD_MARKERS) for k in keys)
        and not any(m in k for k in keys for m in _SDXL_MARKERS)
    ):
        hints.append(
            f"(this looks like an SD 1.x / 2.x LoRA: kohya's single-text-encoder lora_te_ keys; the model is "
            f"{_model_family(sd)}, with two text encoders)"
        )
    missing = [c for c in ("text_encoder", "text_encoder_2") if c not in targets.dotted]
    if (
        sdxl
        and missing == ["text_encoder"]
        and any(k.startswith(("lora_te1_", "text_encoder.")) for k in keys)
    ):
        hints.append(
            "(keys for text_encoder (CLIP-L), which this model does not have: an SDXL refiner has only "
            "text_encoder_2)"
        )
    return hints


def _kohya_key(key: str, targets: _Targets):
    """("kohya", component, path, module name, part, rows) for a kohya key, or None."""
    module, _, suffix = key.partition(".")
    part = _KOHYA_PARTS.get(suffix)
    if part is None:
        return None
    for prefix, component in _KOHYA_PREFIXES.items():
        if module.startswith(prefix):
            if component == "unet" and "transformer" in targets.kohya:  # sd-scripts' Flux files
                component = "transformer"
            name = module[len(prefix) :]
            path = targets.kohya.get(component, {}).get(name)
            if path is None:
                return None
            return ("kohya", component, path, module, part, targets.rows.get(component, {}).get(name))
    return None


def _diffusers_key(key: str, targets: _Targets):
    """("diffusers", component, path, module name, part, rows) for a diffusers / peft key, or None."""
    suffixes = {
        ".lora_A.weight": "down",
        ".lora_B.weight": "up",
        ".alpha": "alpha",
        ".lora_magnitude_vector.weight": "dora",
        ".lora_magnitude_vector": "dora",
    }
    suffix = next((s for s in suffixes if key.endswith(s)), None)
    old = None
    if suffix is None:
        old = next((s for s in _OLD_DIFFUSERS if key.endswith(s)), None)
        if old is None:
            return None
        part, tail = _OLD_DIFFUSERS[old]
        module = key[: -len(old)] + tail
    else:
        module, part = key[: -len(suffix)], suffixes[suffix]
    for prefix, component in _DIFFUSERS_PREFIXES.items():
        if module.startswith(prefix):
            name = module[len(prefix) :]
            if old is not None:
                name = _old_module_name(name, component)
            path = targets.dotted.get(component, {}).get(name)
            if path is None:
                return None
            return ("diffusers", component, path, name, part, targets.rows.get(component, {}).get(name))
    return None


def _xlabs_key(key: str, targets: _Targets):
    """("xlabs", "transformer", path, module name, part, rows) for an XLabs Flux key, or None."""
    module, _, part = key.rpartition(".")[0].rpartition(".")
    if ".processor." not in key or part not in ("down", "up") or not key.endswith(".weight"):
        return None
    module = module.removeprefix("diffusion_model.")
    path = targets.dotted.get("transformer", {}).get(module)
    if path is None:
        return None
    return ("xlabs", "transformer", path, module, part, targets.rows["transformer"].get(module))


def _old_module_name(name: str, component: str) -> str:
    """An older diffusers module name (attention processors, ``to_q_lora``) -> the layer's path."""
    name = name.replace(".processor.", ".")  # attn1.processor.to_q -> attn1.to_q
    renames = _PROCESSOR_LAYERS["unet" if component == "unet" else "text"]
    for old, new in renames.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _factor_problem(kind: str, tensors: Mapping, want: tuple) -> str | None:
    """Why LoHa / LoKr factors cannot update a kernel of torch shape ``want``, or None."""
    try:
        _delta(kind, tensors, tuple(want))
    except (ValueError, IndexError) as e:
        shapes = ", ".join(f"{k} {v.shape}" for k, v in sorted(tensors.items()))
        return f"{shapes} do not make the layer's {tuple(want)} ({e})"
    return None


def _dora_problem(dora: np.ndarray, want: tuple) -> str | None:
    out, fan_in = want[0], want[1]
    if dora.size == out and dora.shape[0] == out:
        return None
    if dora.size == fan_in and dora.ndim >= 2 and dora.shape[1] == fan_in:
        return None
    return f"DoRA magnitude {dora.shape} fits neither the outputs ({out}) nor the inputs ({fan_in}) of {tuple(want)}"


def _shape_problem(
    down: np.ndarray, up: np.ndarray, want: tuple, mid: np.ndarray | None = None
) -> str | None:
    """Why up @ [mid] @ down cannot update a kernel of torch shape ``want``, or None."""
    if mid is not None:
        if mid.ndim != 4 or down.ndim != 4 or up.ndim != 4 or len(want) != 4:
            return f"Tucker lora_mid {mid.shape} needs 4-D down {down.shape}, up {up.shape} and a conv layer"
        if mid.shape[:2] != (up.shape[1], down.shape[0]) or mid.shape[2:] != tuple(want[2:]):
            return (
                f"lora_mid {mid.shape} does not join up {up.shape} and down {down.shape} into {tuple(want)}"
            )
        if down.shape[1] != want[1] or up.shape[0] != want[0]:
            return f"down {down.shape} / up {up.shape}, layer {tuple(want)}"
        return None
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        return f"down {down.shape} and up {up.shape} must be 2-D (linear) or 4-D (conv)"
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        return f"up {up.shape} must be a 1x1 conv"
    if up.shape[1] != down.shape[0]:
        return f"rank of down {down.shape} ({down.shape[0]}) differs from up {up.shape} ({up.shape[1]})"
    fan_in = int(np.prod(want[1:]))
    if up.shape[0] != want[0] or int(np.prod(down.shape[1:])) != fan_in:
        return f"down {down.shape} / up {up.shape}, layer {tuple(want)}"
    if down.ndim == 4 and len(want) == 4 and down.shape[1:] != tuple(want[1:]):
        return f"down {down.shape} kernel differs from layer {tuple(want)}"
    return None


def _model_family(sd) -> str:
    from tf_diffusion.families import family_of_config

    try:
        return family_of_config(sd.config).description
    except Exception:  # a config no family describes: say its width
        return f"a model with {sd.config.unet.context_dim}-wide cross-attention context"


def _mismatch_message(source: str, mismatched: list, sd) -> str:
    lines = [f"LoRA {source} does not fit this model ({_model_family(sd)}):"]
    widths = {
        int(down.shape[1]) for key, _, down, _ in mismatched if key.endswith(("attn2.to_k", "attn2_to_k"))
    }
    guess = [_CONTEXT_FAMILIES.get(w, f"a {w}-wide context") for w in sorted(widths)]
    if guess:
        lines[0] += f"; its cross-attention reads {sorted(widths)}-wide text, as {' / '.join(guess)} does"
    lines.append(f"  {len(mismatched)} modules with shapes that do not fit:")
    lines += [f"    {key}: {problem}" for key, problem, _, _ in mismatched[:20]]
    if len(mismatched) > 20:
        lines.append(f"    ... and {len(mismatched) - 20} more")
    return "\n".join(lines)


def read_lora(path: str | os.PathLike, sd) -> LoraWeights:
    """Read a LoRA file and map it onto ``sd`` (see ``parse_lora``); the model is not changed.

    Args:
        path: the LoRA file.
        sd: the ``StableDiffusion`` it is for.

    Returns:
        The mapped ``LoraWeights``.

    Raises:
        FileNotFoundError, ValueError, LoraError: see ``read_lora_file`` and ``parse_lora``.
    """
    tensors, metadata = read_lora_file(path)
    return parse_lora(tensors, metadata, sd, source=str(path))


# ------------------------------------------------------------------------------------------- applying


class _LoraState:
    """The LoRAs loaded into one pipeline, their weights, and the base values of the kernels they touch."""

    def __init__(self):
        self.adapters: dict[str, LoraWeights] = {}
        self.active: dict[str, dict[str, float]] = {}  # name -> component -> weight
        self.base: dict[tuple[str, str], np.ndarray] = {}  # (component, path) -> Keras-layout value
        # LoRAs that prompts named: resolved file -> (adapter name, (size, mtime_ns) when read).
        self.prompt_files: dict[str, tuple[str, tuple[int, int]]] = {}
        self.mentions: dict[str, str] = {}  # prompt adapter name -> the name the prompt wrote
        self._targets = None

    def targets(self, sd) -> _Targets:
        if self._targets is None:
            self._targets = _Targets.of(sd)
        return self._targets


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(sd) -> _LoraState:
    if sd not in _STATES:
        _STATES[sd] = _LoraState()
    return _STATES[sd]


def _component_weights(weight, name: str) -> dict[str, float]:
    """A float, or {"unet": w, "text_encoder": w} (a missing part: 1.0) -> component -> weight.

    A "text_encoder_2" entry (diffusers' per-component dicts for SDXL) gives SDXL's second encoder its own
    weight; without one it follows "text_encoder".
    """
    if isinstance(weight, Mapping):
        allowed = [*COMPONENTS, "text_encoder_2"]
        extra = sorted(set(weight) - set(allowed), key=str)
        if extra:
            raise ValueError(f"weight of {name!r} names {extra}; allowed parts: {allowed}")
        values = {c: weight.get(c, 1.0) for c in COMPONENTS}
        if "text_encoder_2" in weight:
            values["text_encoder_2"] = weight["text_encoder_2"]
    else:
        values = {c: weight for c in COMPONENTS}
    for c, w in values.items():
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float, np.floating, np.integer))
            or not math.isfinite(w)
        ):
            raise ValueError(f"weight of {name!r} ({c}) must be a finite number, got {w!r}")
    return {c: float(w) for c, w in values.items()}


def _apply(sd, state: _LoraState, active: dict[str, dict[str, float]]) -> None:
    """Assign every touched kernel its base value plus the active LoRAs' updates; then record ``active``."""
    targets = state.targets(sd)
    contributions: dict[tuple[str, str], list] = {key: [] for key in state.base}
    for name, lora in state.adapters.items():
        for module in lora.modules:
            key = (module.component, module.path)
            contributions.setdefault(key, [])
            weights = active.get(name)
            weight = (
                0.0 if weights is None else weights.get(module.component, weights[_PART[module.component]])
            )
            if weight != 0.0:
                contributions[key].append((module, weight))
    # What could refuse is checked before any kernel changes.
    for key, parts in contributions.items():
        layer, _ = targets.params[key[0]][key[1]]
        # execution.quantize: an int8 weight cannot take a merge.
        if parts and "_quantization" in layer.__dict__:
            raise ValueError(
                f"LoRA needs float weights, but {key[0]}.{key[1]} was quantized to {layer._quantization} "
                "(quantize=); load the model without quantize= to use LoRAs"
            )
    # One kernel at a time: its merged value is computed and assigned before the next one's, so the
    # extra memory is the kept base values plus one kernel (computing all first held a second copy of
    # every touched kernel: 8.8 GiB more on SDXL, benchmarks/README.md). Should a computation fail
    # midway, the previous adapters are merged again from the kept bases.
    try:
        for key, parts in contributions.items():
            layer, attr = targets.params[key[0]][key[1]]
            variable = getattr(layer, attr)
            base = state.base.get(key)
            if base is None:
                base = keras.ops.convert_to_numpy(variable)
                state.base[key] = base
            variable.assign(_merged(layer, attr, base, parts) if parts else base)
    except Exception:
        if active is not state.active:
            _apply(sd, state, state.active)
        raise
    state.active = active


def _merged(layer, attr: str, base: np.ndarray, parts: list) -> np.ndarray:
    """``base`` (Keras layout) plus each (module, weight) of ``parts``' update, in ``base``'s dtype."""
    kind = type(layer).LAYOUT[attr]
    want = torch_shape(layer, attr)
    total = np.array(base, dtype=np.float32)
    doras = []
    for module, weight in parts:
        if module.dora is not None:
            doras.append((module, weight))
            continue
        scale = np.float32(weight * module.scale)
        if module.rows is None:
            total += scale * to_keras_layout(kind, module.delta(want))
            continue
        # A part of a fused layer: its block of output channels, the last axis of our kernels.
        own = to_keras_layout(kind, module.delta(_rows_shape(module.rows, want)))
        for ours, theirs, count in module.rows:
            total[..., ours : ours + count] += scale * own[..., theirs : theirs + count]
    for module, weight in doras:
        total = to_keras_layout(kind, _dora(to_torch_layout(kind, total), module, weight, want))
    return total.astype(base.dtype)


def _dora(weight: np.ndarray, module: LoraModule, strength: float, want: tuple) -> np.ndarray:
    """DoRA: W + s ΔW, each output row (or input column) rescaled to the stored magnitude.

    With strength w: W_m = W + w s ΔW, then W_m * (w (m / ||W_m|| - 1) + 1): at w = 1 peft's and LyCORIS's
    merge, at w = 0 the base weight.
    """
    merged = weight + np.float32(strength * module.scale) * module.delta(want)
    m = module.dora
    if m.shape[0] == want[0] and m.size == want[0]:  # per output row (peft, LyCORIS wd_on_output)
        norm = np.linalg.norm(merged.reshape(want[0], -1), axis=1).reshape(
            (want[0],) + (1,) * (len(want) - 1)
        )
        m = m.reshape(norm.shape)
    else:  # per input column (the web UI's and older LyCORIS's)
        norm = np.sqrt(
            np.sum(np.square(merged), axis=tuple(i for i in range(len(want)) if i != 1), keepdims=True)
        )
        m = m.reshape(norm.shape)
    norm = norm + np.finfo(np.float32).eps
    return merged * (np.float32(strength) * (m / norm - 1.0) + 1.0)


def load_lora_weights(sd, path, adapter_name: str | None = None, weight=1.0) -> str:
    """Load a LoRA file into ``sd`` and switch it on with ``weight``, next to the LoRAs already active.

    Args:
        sd: the ``StableDiffusion``.
        path: a kohya / A1111 or diffusers / PEFT LoRA file, or for Flux also XLabs' (``.safetensors``,
            ``.pt``, ``.bin``).
        adapter_name: its name for ``set_adapters``; default ``default_<n>`` as diffusers names them.
        weight: its strength: a number, or ``{"unet": w, "text_encoder": w}`` (A1111's
            ``<lora:name:te:unet>``; a part left out gets 1.0; "unet" also scales a Flux transformer).

    Returns:
        The adapter's name.

    Raises:
        ValueError: a name already loaded or a bad weight; see ``read_lora`` for the file's errors.
            On any error the model is unchanged.
    """
    state = _state(sd)
    if adapter_name is None:
        n = len(state.adapters)
        while f"default_{n}" in state.adapters:
            n += 1
        adapter_name = f"default_{n}"
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in state.adapters:
        raise ValueError(f"adapter_name {adapter_name!r} is already loaded; loaded: {sorted(state.adapters)}")
    weights = _component_weights(weight, adapter_name)
    lora = read_lora(path, sd)
    state.adapters[adapter_name] = lora
    try:
        _apply(sd, state, {**state.active, adapter_name: weights})
    except BaseException:
        del state.adapters[adapter_name]
        raise
    return adapter_name


def set_adapters(sd, names: str | Sequence[str], adapter_weights=None) -> None:
    """Make exactly ``names`` the active LoRAs, with their weights (others stay loaded, switched off).

    Args:
        sd: the ``StableDiffusion``.
        names: one adapter name or a list of them (``[]`` switches every LoRA off).
        adapter_weights: None (1.0 each, as diffusers), one weight for all, or one per name; a weight is
            a number or ``{"unet": w, "text_encoder": w}``.

    Raises:
        ValueError: a name that is not loaded, or weights that do not match the names.
    """
    state = _state(sd)
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in state.adapters]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded: {sorted(state.adapters)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names {names} repeat an adapter")
    if adapter_weights is None or isinstance(adapter_weights, (int, float, Mapping)):
        adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
    adapter_weights = list(adapter_weights)
    if len(adapter_weights) != len(names):
        raise ValueError(f"{len(adapter_weights)} adapter_weights for {len(names)} names {names}")
    _apply(sd, state, {n: _component_weights(w, n) for n, w in zip(names, adapter_weights, strict=True)})


def get_active_adapters(sd) -> dict[str, dict[str, float]]:
    """The active adapters and their per-component weights."""
    return {n: dict(w) for n, w in _state(sd).active.items()}


def unload_lora_weights(sd) -> None:
    """Remove every LoRA: touched kernels get their stored base values back, bit for bit."""
    state = _state(sd)
    targets = state.targets(sd)
    for (component, path), base in state.base.items():
        layer, attr = targets.params[component][path]
        getattr(layer, attr).assign(base)
    state.adapters.clear()
    state.active = {}
    state.base.clear()
    state.prompt_files.clear()
    state.mentions.clear()


def fuse_lora(sd, lora_scale: float = 1.0) -> None:
    """diffusers' ``fuse_lora``: a no-op here, because LoRAs are always merged into the weights.

    Raises:
        ValueError: for a ``lora_scale`` other than 1.0 (use ``set_adapters`` weights instead).
    """
    if lora_scale != 1.0:
        raise ValueError(
            f"lora_scale={lora_scale!r}: LoRAs are merged with their set_adapters weights; use those"
        )


def unfuse_lora(sd) -> None:
    """diffusers' ``unfuse_lora``: a no-op (outputs are the same fused or not); ``unload_lora_weights`` removes."""


# ------------------------------------------------------------------------------- LoRAs named in prompts


def has_prompt_loras(sd) -> bool:
    """Whether LoRAs named by earlier prompts are loaded into ``sd``."""
    return bool(_state(sd).prompt_files)


def use_prompt_loras(sd, resolved) -> None:
    """Make the LoRAs a prompt names (``(LoraTag, file)`` pairs) the active prompt LoRAs, with their weights.

    Prompt LoRAs are adapters named ``<lora:STEM>``, kept loaded (a file is read again when its size or
    modification time changed); adapters loaded with ``load_lora_weights`` keep their state. When the
    active set and weights are those already merged, nothing is recomputed.

    Raises:
        LoraError, ValueError: a file that cannot be read or applied; the model is then unchanged.
    """
    state = _state(sd)
    prompt_names = {name for name, _ in state.prompt_files.values()}
    wanted, mentions, added, replaced = {}, {}, [], {}
    try:
        for tag, path in resolved:
            path = pathlib.Path(path)
            key = str(path.resolve())
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            known = state.prompt_files.get(key)
            if known is None or known[1] != stamp:
                lora = read_lora(path, sd)
                if known is None:
                    name, n = f"<lora:{path.stem}>", 1
                    while name in state.adapters:
                        n += 1
                        name = f"<lora:{path.stem}#{n}>"
                    added.append(name)
                else:
                    name = known[0]
                    replaced[name] = (state.adapters[name], known)
                state.adapters[name] = lora
                state.prompt_files[key] = (name, stamp)
                prompt_names.add(name)
            name = state.prompt_files[key][0]
            wanted[name] = _component_weights(tag.weights, f"<lora:{tag.name}>")
            mentions[name] = tag.name
        active = {n: w for n, w in state.active.items() if n not in prompt_names}
        active.update(wanted)
        if active != state.active or added or replaced:
            _apply(sd, state, active)
    except BaseException:
        for name in added:
            del state.adapters[name]
        for name, (lora, _) in replaced.items():
            state.adapters[name] = lora
        state.prompt_files = {k: v for k, v in state.prompt_files.items() if v[0] not in added}
        for key, (name, _) in list(state.prompt_files.items()):
            if name in replaced:
                state.prompt_files[key] = replaced[name][1]
        raise
    state.mentions = mentions


def active_sources(sd) -> list[tuple[str, str]]:
    """(name, file) of every active LoRA with a non-zero weight: prompt LoRAs by the name the prompt wrote,
    others by file stem (what the PNG parameters' ``Lora hashes`` list)."""
    state = _state(sd)
    out = []
    for name, weights in state.active.items():
        lora = state.adapters.get(name)
        if lora is None or not any(weights.values()) or not os.path.isfile(lora.source):
            continue
        out.append((state.mentions.get(name, pathlib.Path(lora.source).stem), lora.source))
    return out
