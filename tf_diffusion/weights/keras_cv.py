"""keras-cv StableDiffusion weights (``.h5``) -> our components, read with h5py (no keras-cv needed).

keras-cv (``keras_cv.models.StableDiffusion`` / ``StableDiffusionV2``) rebuilds the SD 1.x
and SD 2.1-base networks from its own Keras blocks and ships four weight files: the text
encoder (``kcv_encoder.h5``), the diffusion model (``kcv_diffusion_model.h5``), the VAE
decoder (``kcv_decoder.h5``) and the VAE encoder (``vae_encoder.h5``); fine-tuned diffusion
models are saved the same way. Two h5 layouts occur:

* legacy ``save_weights("x.h5")`` (Keras 2, and keras-cv's released files): the root
  attribute ``layer_names`` lists the model's layers, each layer group's ``weight_names``
  its variables in ``layer.weights`` order;
* Keras 3 ``save_weights("x.weights.h5")``: ``layers/<layer name>/<attribute path>/vars/<i>``.

Top-level layers carry default names (``res_block_3``), so their type is the name without
the number. Per type, layers come in data-flow order (legacy: file order, which is what
Keras loads by; Keras 3: creation order, the number), and the k-th ``res_block`` is the
k-th ResBlock of our UNet in running order. One table per keras-cv block type names its
variables, in ``layer.weights`` order and by attribute path, with our key and layout.

keras-cv's blocks differ numerically from the original in two places that do not touch
the weights: GEGLU uses the tanh gelu approximation and some GroupNorm epsilons are 1e-5
instead of 1e-6. tf_diffusion runs the original numerics with the same weights.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np

from tf_diffusion.config import PipelineConfig, UNetConfig, VAEConfig
from tf_diffusion.families import DEFAULT_FAMILY, FAMILIES
from tf_diffusion.layers import CONV, LINEAR, PLAIN
from tf_diffusion.layout import unet_layout, vae_layout
from tf_diffusion.presets import PRESETS
from tf_diffusion.weights.lazy import LazyTensor
from tf_diffusion.weights.state_dict import to_torch_layout

NORM = "norm"  # gamma, beta -> weight, bias
DENSE = "dense"  # kernel, bias
DENSE_NO_BIAS = "dense_no_bias"
EMBEDDING = "embedding"  # embeddings -> weight

# One table per keras-cv block: (attribute path inside the block, our key suffix, kind), in layer.weights order.
_PADDED_CONV = (("conv2d", "", CONV),)
_BLOCKS: dict[str, tuple] = {
    "dense": (("", "", DENSE),),
    "padded_conv2d": _PADDED_CONV,
    "group_normalization": (("", "", NORM),),
    "layer_normalization": (("", "", NORM),),
    "upsample": (("conv/conv2d", "conv", CONV),),
    "res_block": (
        ("entry_flow/group_normalization", "in_layers.0", NORM),
        ("entry_flow/padded_conv2d/conv2d", "in_layers.2", CONV),
        ("embedding_flow/dense", "emb_layers.1", DENSE),
        ("exit_flow/group_normalization", "out_layers.0", NORM),
        ("exit_flow/padded_conv2d/conv2d", "out_layers.3", CONV),
        ("residual_projection/conv2d", "skip_connection", CONV),  # only when the width changes
    ),
    "resnet_block": (
        ("norm1", "norm1", NORM),
        ("conv1/conv2d", "conv1", CONV),
        ("norm2", "norm2", NORM),
        ("conv2/conv2d", "conv2", CONV),
        ("residual_projection/conv2d", "nin_shortcut", CONV),  # only when the width changes
    ),
    "attention_block": (
        ("norm", "norm", NORM),
        ("q/conv2d", "q", CONV),
        ("k/conv2d", "k", CONV),
        ("v/conv2d", "v", CONV),
        ("proj_out/conv2d", "proj_out", CONV),
    ),
    "clip_embedding": (
        ("token_embedding", "token_embedding", EMBEDDING),
        ("position_embedding", "position_embedding", EMBEDDING),
    ),
    "clip_encoder_layer": (
        ("layer_norm1", "layer_norm1", NORM),
        ("clip_attn/q_proj", "self_attn.q_proj", DENSE),
        ("clip_attn/k_proj", "self_attn.k_proj", DENSE),
        ("clip_attn/v_proj", "self_attn.v_proj", DENSE),
        ("clip_attn/out_proj", "self_attn.out_proj", DENSE),
        ("layer_norm2", "layer_norm2", NORM),
        ("fc1", "mlp.fc1", DENSE),
        ("fc2", "mlp.fc2", DENSE),
    ),
}


def _spatial_transformer(linear: bool) -> tuple:
    # SD 2.x (keras-cv's fully_connected=True) projects with Dense layers, SD 1.x with 1x1 convs.
    proj = (
        (("proj1", "proj_in", DENSE), ("proj2", "proj_out", DENSE))
        if linear
        else (
            ("proj1/conv2d", "proj_in", CONV),
            ("proj2/conv2d", "proj_out", CONV),
        )
    )
    block = "transformer_block/"
    ours = "transformer_blocks.0."
    attention = []
    for name in ("attn1", "attn2"):
        attention.append((f"{block}norm{name[-1]}", f"{ours}norm{name[-1]}", NORM))
        for proj_name in ("to_q", "to_k", "to_v"):
            attention.append((f"{block}{name}/{proj_name}", f"{ours}{name}.{proj_name}", DENSE_NO_BIAS))
        attention.append((f"{block}{name}/out_proj", f"{ours}{name}.to_out.0", DENSE))
    return (
        ("norm", "norm", NORM),
        proj[0],
        *attention,
        (f"{block}norm3", f"{ours}norm3", NORM),
        (f"{block}geglu/dense", f"{ours}ff.net.0.proj", DENSE),
        (f"{block}dense", f"{ours}ff.net.2", DENSE),
        proj[1],
    )


# --------------------------------------------------------------------------- our keys in data-flow order


# keras-cv layer type of each layout kind, and the suffix to the module that holds the weights.
_UNET_KINDS = {
    "conv": ("padded_conv2d", ""),
    "res": ("res_block", ""),
    "attn": ("spatial_transformer", ""),
    "down": ("padded_conv2d", ".op"),
    "up": ("upsample", ""),
}
_VAE_KINDS = {
    "conv": ("padded_conv2d", ""),
    "quant": ("padded_conv2d", ""),
    "res": ("resnet_block", ""),
    "attn": ("attention_block", ""),
    "down": ("padded_conv2d", ".conv"),
    "up": ("padded_conv2d", ".conv"),
    "norm": ("group_normalization", ""),
}


def _by_type(blocks, kinds: dict, seq: dict[str, list[str]]) -> dict[str, list[str]]:
    for block in blocks:
        kind, suffix = kinds[block.kind]
        seq.setdefault(kind, []).append(block.path + suffix)
    return seq


def unet_blocks(config: UNetConfig) -> dict[str, list[str]]:
    """keras-cv DiffusionModel block type -> our key prefixes in data-flow order (``layout.unet_layout``)."""
    seq = _by_type(unet_layout(config), _UNET_KINDS, {"dense": ["time_embed.0", "time_embed.2"]})
    seq.setdefault("upsample", [])
    seq["group_normalization"] = ["out.0"]
    seq["padded_conv2d"].append("out.2")
    return seq


def decoder_blocks(config: VAEConfig) -> dict[str, list[str]]:
    """keras-cv Decoder (a Sequential) block type -> our VAE key prefixes in data-flow order."""
    decoder = [b for b in vae_layout(config) if b.section == "decoder" or b.path == "post_quant_conv"]
    return _by_type(decoder, _VAE_KINDS, {})


def encoder_blocks(config: VAEConfig) -> dict[str, list[str]]:
    """keras-cv ImageEncoder (a Sequential) block type -> our VAE key prefixes in data-flow order."""
    encoder = [b for b in vae_layout(config) if b.section == "encoder" or b.path == "quant_conv"]
    return _by_type(encoder, _VAE_KINDS, {})


def text_blocks(num_layers: int) -> dict[str, list[str]]:
    """keras-cv TextEncoder block type -> our CLIP key prefixes."""
    return {
        "clip_embedding": ["text_model.embeddings"],
        "clip_encoder_layer": [f"text_model.encoder.layers.{i}" for i in range(num_layers)],
        "layer_normalization": ["text_model.final_layer_norm"],
    }


# --------------------------------------------------------------------------- reading h5 files


@dataclass
class _Layer:
    name: str
    kind: str  # the layer type: its name without the _N suffix
    weights: list  # legacy: [(name, dataset)] in layer.weights order; Keras 3: None
    group: object  # Keras 3: the h5 group of the layer


_SUFFIX = re.compile(r"^(.*?)(?:_(\d+))?$")


def _kind_and_number(name: str) -> tuple[str, int]:
    match = _SUFFIX.match(name)
    return match.group(1), int(match.group(2) or 0)


def _read_layers(h5, path: str) -> list[_Layer]:
    """Top-level layers with weights, in the order that fixes each type's data-flow order."""
    root = h5["model_weights"] if "model_weights" in h5 else h5
    if "layer_names" in root.attrs:  # legacy
        layers = []
        for raw in root.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            group = root[name]
            names = [
                n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])
            ]
            if names:
                layers.append(_Layer(name, _kind_and_number(name)[0], [(n, group[n]) for n in names], group))
        return layers
    if "layers" in root:  # Keras 3 .weights.h5
        found = []
        for name, group in root["layers"].items():
            if _has_variables(group):
                kind, number = _kind_and_number(name)
                found.append((kind, number, _Layer(name, kind, None, group)))
        return [layer for _, _, layer in sorted(found, key=lambda item: item[:2])]
    raise ValueError(f"{path}: not a Keras weights file (no layer_names attribute and no layers/ group)")


def _has_variables(group) -> bool:
    import h5py

    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append(name)

    group.visititems(visit)
    return bool(found)


def _variables(entry_path: str, layer: _Layer, legacy_iter, kind: str, where: str) -> list:
    """The h5 datasets of one table entry: legacy from the ordered iterator, Keras 3 by path."""
    count = 1 if kind in (EMBEDDING, DENSE_NO_BIAS) else 2
    if layer.weights is not None:
        taken = []
        for _ in range(count):
            try:
                taken.append(next(legacy_iter)[1])
            except StopIteration:
                raise ValueError(f"{where}: fewer weights than keras-cv's {layer.kind} has") from None
        return taken
    path = f"{entry_path}/vars" if entry_path else "vars"
    if path not in layer.group:
        return []
    group = layer.group[path]
    return [group[str(i)] for i in range(count)]


def _lazy(dataset, layout: str, source: str) -> LazyTensor:
    shape = tuple(dataset.shape)
    if layout == LINEAR:
        shape = shape[::-1]
    elif layout == CONV:
        kh, kw, cin, cout = shape
        shape = (cout, cin, kh, kw)

    def read():
        return np.ascontiguousarray(to_torch_layout(layout, np.asarray(dataset[()])))

    return LazyTensor(shape, np.dtype(dataset.dtype), read, source)


def _convert_layer(layer: _Layer, table: tuple, prefix: str, path: str) -> dict:
    """One keras-cv block -> {our key: lazy torch-layout tensor}."""
    out = {}
    legacy = iter(layer.weights) if layer.weights is not None else None
    where = f"{path}: layer {layer.name!r}"
    for entry_path, suffix, kind in table:
        if legacy is not None and entry_path.startswith("residual_projection"):
            remaining = list(legacy)
            if not remaining:
                continue  # the block keeps its width: no projection
            legacy = iter(remaining)
        datasets = _variables(entry_path, layer, legacy, kind, where)
        if not datasets:
            if entry_path.startswith("residual_projection"):
                continue
            raise ValueError(f"{where}: no variables at {entry_path!r}")
        key = f"{prefix}.{suffix}" if suffix else prefix
        if kind == NORM:
            out[f"{key}.weight"] = _lazy(datasets[0], PLAIN, f"{where}/{entry_path}")
            out[f"{key}.bias"] = _lazy(datasets[1], PLAIN, f"{where}/{entry_path}")
        elif kind == EMBEDDING:
            out[f"{key}.weight"] = _lazy(datasets[0], PLAIN, f"{where}/{entry_path}")
        else:
            layout = CONV if kind == CONV else LINEAR
            out[f"{key}.weight"] = _lazy(datasets[0], layout, f"{where}/{entry_path}")
            if kind != DENSE_NO_BIAS:
                out[f"{key}.bias"] = _lazy(datasets[1], PLAIN, f"{where}/{entry_path}")
    if legacy is not None:
        left = list(legacy)
        if left:
            raise ValueError(
                f"{where}: {len(left)} weights more than keras-cv's {layer.kind} has, e.g. {left[0][0]!r}"
            )
    return out


def _convert_model(
    layers: list[_Layer], blocks: dict[str, list[str]], tables: dict[str, tuple], path: str
) -> dict:
    by_kind: dict[str, list[_Layer]] = {}
    for layer in layers:
        by_kind.setdefault(layer.kind, []).append(layer)
    unknown = sorted(set(by_kind) - set(blocks))
    if unknown:
        raise ValueError(f"{path}: layers of types {unknown} are not part of this keras-cv model")
    out = {}
    for kind, prefixes in blocks.items():
        found = by_kind.get(kind, [])
        if len(found) != len(prefixes):
            raise ValueError(f"{path}: {len(found)} {kind} layers, but keras-cv's model has {len(prefixes)}")
        for layer, prefix in zip(found, prefixes, strict=True):
            out.update(_convert_layer(layer, tables[kind], prefix, path))
    return out


# --------------------------------------------------------------------------- files and the pipeline


@dataclass
class KerasCVWeights:
    """keras-cv weights read lazily; close ``handles`` when done."""

    config: PipelineConfig
    components: dict[str, dict]
    files: list[str]
    notes: list[str] = field(default_factory=list)
    handles: list = field(default_factory=list)


def _classify(layers: list[_Layer], path: str) -> str:
    kinds = {layer.kind for layer in layers}
    if "clip_embedding" in kinds:
        return "text_encoder"
    if "spatial_transformer" in kinds:
        return "diffusion_model"
    if "resnet_block" in kinds:
        first = next(layer for layer in layers if layer.kind == "padded_conv2d")
        cin = _first_kernel(first).shape[2]
        return "image_encoder" if cin == 3 else "decoder"
    raise ValueError(f"{path}: not a keras-cv Stable Diffusion model (layer types {sorted(kinds)})")


def _first_kernel(layer: _Layer):
    if layer.weights is not None:
        return layer.weights[0][1]
    return layer.group["conv2d/vars/0"]


def read_keras_cv(path: str | os.PathLike) -> KerasCVWeights:
    """Read keras-cv StableDiffusion weights: a folder of .h5 files, or one .h5 file.

    Raises:
        ImportError: h5py is missing.
        ValueError: for files that are not keras-cv SD models, two files for one part, or
            parts of different families (SD 1.x and SD 2.x) mixed.
    """
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading keras-cv .h5 weights needs h5py (pip install tf_diffusion[keras-cv])"
        ) from None
    path = pathlib.Path(path)
    files = sorted(path.glob("*.h5")) + sorted(path.glob("*.hdf5")) if path.is_dir() else [path]
    handles, parts, versions = [], {}, {}
    try:
        for file in files:
            try:
                h5 = h5py.File(file, "r")
            except OSError as e:
                raise ValueError(f"{file}: not a readable HDF5 file ({e})") from None
            handles.append(h5)
            layers = _read_layers(h5, str(file))
            part = _classify(layers, str(file))
            if part in parts:
                raise ValueError(f"{path}: two keras-cv {part} files: {parts[part][0].name} and {file.name}")
            parts[part] = (file, layers)
            versions[part] = _version(part, layers)
        found = set(versions.values()) - {"any"}
        if len(found) > 1:
            raise ValueError(f"{path}: parts of different keras-cv models are mixed: {versions}")
        family = FAMILIES[found.pop() if found else DEFAULT_FAMILY]
        config = PRESETS[family.base_preset].replace(name=f"keras-cv {family.keras_cv}")
        components: dict[str, dict] = {}
        for part, (file, layers) in parts.items():
            tables = dict(
                _BLOCKS, spatial_transformer=_spatial_transformer(config.unet.use_linear_projection)
            )
            if part == "text_encoder":
                blocks = text_blocks(config.text_encoder.num_hidden_layers)
                components["text_encoder"] = _convert_model(layers, blocks, tables, str(file))
            elif part == "diffusion_model":
                components["unet"] = _convert_model(layers, unet_blocks(config.unet), tables, str(file))
            else:
                blocks = decoder_blocks(config.vae) if part == "decoder" else encoder_blocks(config.vae)
                components.setdefault("vae", {}).update(_convert_model(layers, blocks, tables, str(file)))
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    notes = []
    missing = sorted({"text_encoder", "diffusion_model", "decoder", "image_encoder"} - set(parts))
    if missing:
        notes.append(
            f"keras-cv parts missing: {', '.join(missing)} (keras-cv ships kcv_encoder.h5, kcv_diffusion_model.h5, "
            "kcv_decoder.h5 and vae_encoder.h5; put them in one folder)"
        )
        if "vae" in components and ("decoder" in missing or "image_encoder" in missing):
            del components["vae"]  # half a VAE cannot be loaded
    if config.tokenizer.pad_token_id != config.tokenizer.eos_token_id:
        notes.append("keras-cv pads SD 2.x prompts with 49407; tf_diffusion pads with 0 as OpenCLIP does")
    return KerasCVWeights(config, components, [str(parts[p][0]) for p in sorted(parts)], notes, handles)


def _version(part: str, layers: list[_Layer]) -> str:
    """The family a part belongs to (``families``: its base preset's text width or UNet projections), or "any"."""
    keras_cv = [f for f in FAMILIES.values() if f.keras_cv]
    if part == "text_encoder":
        embedding = next(layer for layer in layers if layer.kind == "clip_embedding")
        data = (
            embedding.weights[0][1]
            if embedding.weights is not None
            else embedding.group["token_embedding/vars/0"]
        )
        width = data.shape[1]
        match = [f for f in keras_cv if PRESETS[f.base_preset].text_encoder.hidden_size == width]
    elif part == "diffusion_model":
        transformer = next(layer for layer in layers if layer.kind == "spatial_transformer")
        if transformer.weights is not None:
            proj = transformer.weights[2][1]  # after the norm's gamma and beta
        else:
            proj = (
                transformer.group["proj1/vars/0"]
                if "proj1/vars/0" in transformer.group
                else transformer.group["proj1/conv2d/vars/0"]
            )
        linear = len(proj.shape) == 2  # SD 2.x projects with Dense layers, SD 1.x with 1x1 convs
        match = [f for f in keras_cv if PRESETS[f.base_preset].unet.use_linear_projection == linear]
    else:
        return "any"
    return match[0].name if match else DEFAULT_FAMILY
