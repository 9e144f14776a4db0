"""keras-hub ``StableDiffusion3Backbone`` presets saved on disk -> ``sd3.StableDiffusion3``.

A preset folder (``backbone.save_to_preset(dir)``, or a text-to-image task preset, whose backbone is the
same two files) holds ``config.json`` (the backbone's Keras config, with the VAE, CLIP-L, CLIP-G and
T5 as nested Keras configs) and ``model.weights.h5`` (Keras 3 weights: ``layers/<name>/.../vars/<i>``),
or, when the preset was saved in shards (``save_to_preset(max_shard_size=...)``, keras-hub's default of
10 GB shards SD3.5 Large), ``model.weights.json`` naming for each variable group the
``model_0000N.weights.h5`` files that hold it.
keras-hub names every saved layer by its class in snake case, numbered in the order the backbone's
graph holds them: ``mm_di_t`` (the MMDiT), ``vae_encoder`` / ``vae_decoder``, ``clip_text_encoder``
and ``clip_text_encoder_1`` with their ``clip_projection`` / ``clip_projection_1``. This module reads
both files with json and h5py (keras-hub is never imported), infers an ``SD3Config`` from the
config, and renames the variables to the original checkpoint keys in the PyTorch layout, so the one
walker (``weights.state_dict``) assigns them: a foreign layout, hence the rename tables here.

What keras-hub computes differently from the reference (the weights are the same): its CLIP final
LayerNorm uses epsilon 1e-6 where transformers' CLIP uses 1e-5, and without T5 it pads the context
with 77 zero tokens where diffusers pads with ``max_sequence_length`` (both zeros; the attention sees
them). tf_diffusion runs the reference numerics. Presets with a T5 encoder load with ``load_t5=False``
(T5's weights are not converted yet); the CLIP tokenizers are tf_diffusion's packaged ones.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tf_diffusion.config import (
    CLIPTextConfig,
    MMDiTConfig,
    SchedulerConfig,
    SD3Config,
    TokenizerConfig,
    VAEConfig,
)
from tf_diffusion.fileio import reading
from tf_diffusion.weights.lazy import LazyTensor, derived
from tf_diffusion.weights.state_dict import load_state_dict

BACKBONE_CLASS = "StableDiffusion3Backbone"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARD_INDEX = "model.weights.json"  # a sharded save: Keras's map from variable groups to shard files


# --------------------------------------------------------------------------- layouts (Keras -> PyTorch)


def _dense(kernel: np.ndarray) -> np.ndarray:
    """Dense kernel (in, out) -> nn.Linear weight (out, in)."""
    return kernel.T


def _conv(kernel: np.ndarray) -> np.ndarray:
    """Conv2D kernel (H, W, in, out) -> nn.Conv2d weight (out, in, H, W)."""
    return kernel.transpose(3, 2, 0, 1)


def _heads_in(kernel: np.ndarray) -> np.ndarray:
    """MultiHeadAttention q/k/v kernel (D, heads, head_dim) -> nn.Linear weight (heads * head_dim, D)."""
    return kernel.reshape(kernel.shape[0], -1).T


def _heads_out(kernel: np.ndarray) -> np.ndarray:
    """MultiHeadAttention output kernel (heads, head_dim, D) -> nn.Linear weight (D, heads * head_dim)."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def _flat(value: np.ndarray) -> np.ndarray:
    """A per-head bias (heads, head_dim) -> (heads * head_dim,)."""
    return value.reshape(-1)


def _plain(value: np.ndarray) -> np.ndarray:
    return value


def _pos_embed(value: np.ndarray) -> np.ndarray:
    """The position table (patches, D) -> the original's (1, patches, D) parameter."""
    return value[None]


# One rename entry: (h5 path under the component's group, our key, transform).
Entry = tuple[str, str, Callable[[np.ndarray], np.ndarray]]


def _numbered(name: str, i: int) -> str:
    """Keras' saved name of the i-th layer of one class inside one container: name, name_1, name_2, ..."""
    return name if i == 0 else f"{name}_{i}"


def _linear(h5: str, ours: str, bias: bool = True) -> list[Entry]:
    out = [(f"{h5}/vars/0", f"{ours}.weight", _dense)]
    return out + [(f"{h5}/vars/1", f"{ours}.bias", _plain)] if bias else out


def _conv2d(h5: str, ours: str) -> list[Entry]:
    return [(f"{h5}/vars/0", f"{ours}.weight", _conv), (f"{h5}/vars/1", f"{ours}.bias", _plain)]


def _norm(h5: str, ours: str) -> list[Entry]:
    """LayerNormalization / GroupNormalization: gamma, beta."""
    return [(f"{h5}/vars/0", f"{ours}.weight", _plain), (f"{h5}/vars/1", f"{ours}.bias", _plain)]


def mmdit_entries(cfg: MMDiTConfig) -> list[Entry]:
    """keras-hub ``MMDiT`` variables (under ``layers/mm_di_t/layers/``) -> original MMDiT keys."""
    entries: list[Entry] = [
        *_conv2d("patch_embedding/patch_embedding", "x_embedder.proj"),
        ("adjustable_position_embedding/vars/0", "pos_embed", _pos_embed),
        # context_embedding is the first Dense of the graph, output_dense the second.
        *_linear("dense", "context_embedder"),
        *_linear("mlp/dense1", "y_embedder.mlp.0"),
        *_linear("mlp/dense2", "y_embedder.mlp.2"),
        *_linear("timestep_embedding/mlp/dense1", "t_embedder.mlp.0"),
        *_linear("timestep_embedding/mlp/dense2", "t_embedder.mlp.2"),
        *_linear("adaptive_layer_normalization/dense", "final_layer.adaLN_modulation.1"),
        *_linear("dense_1", "final_layer.linear"),
    ]
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        for stream in ("x_block", "context_block"):
            h5 = f"{_numbered('mm_di_t_block', i)}/{stream}"
            ours = f"joint_blocks.{i}.{stream}"
            # The last block's context stream is pre-only: shift and scale, no projection or MLP.
            pre_only = last and stream == "context_block"
            dual = stream == "x_block" and i in cfg.dual_attention_layers
            entries += _linear(f"{h5}/ada_layer_norm/dense", f"{ours}.adaLN_modulation.1")
            attentions = [("", "attn")] + ([("2", "attn2")] if dual else [])
            for suffix, attn in attentions:
                entries += _linear(f"{h5}/attention_qkv{suffix}", f"{ours}.{attn}.qkv")
                if not pre_only:
                    entries += _linear(f"{h5}/attention_proj{suffix}", f"{ours}.{attn}.proj")
                if cfg.qk_norm:
                    entries.append((f"{h5}/q_norm{suffix}/vars/0", f"{ours}.{attn}.ln_q.weight", _plain))
                    entries.append((f"{h5}/k_norm{suffix}/vars/0", f"{ours}.{attn}.ln_k.weight", _plain))
            if not pre_only:
                entries += _linear(f"{h5}/mlp/dense1", f"{ours}.mlp.fc1")
                entries += _linear(f"{h5}/mlp/dense2", f"{ours}.mlp.fc2")
    return entries


def _resnet(h5: str, ours: str, shortcut: bool) -> list[Entry]:
    out = [
        *_norm(f"{h5}/norm1", f"{ours}.norm1"),
        *_conv2d(f"{h5}/conv1", f"{ours}.conv1"),
        *_norm(f"{h5}/norm2", f"{ours}.norm2"),
        *_conv2d(f"{h5}/conv2", f"{ours}.conv2"),
    ]
    return out + _conv2d(f"{h5}/residual_projection", f"{ours}.nin_shortcut") if shortcut else out


def _mid(h5: str, ours: str) -> list[Entry]:
    """keras-hub's mid_block_0, mid_attention, mid_block_1 -> LDM mid.block_1, mid.attn_1, mid.block_2."""
    return [
        *_resnet(f"{h5}/mid_block_0", f"{ours}.mid.block_1", False),
        *_norm(f"{h5}/mid_attention/group_norm", f"{ours}.mid.attn_1.norm"),
        *_conv2d(f"{h5}/mid_attention/query_conv2d", f"{ours}.mid.attn_1.q"),
        *_conv2d(f"{h5}/mid_attention/key_conv2d", f"{ours}.mid.attn_1.k"),
        *_conv2d(f"{h5}/mid_attention/value_conv2d", f"{ours}.mid.attn_1.v"),
        *_conv2d(f"{h5}/mid_attention/output_conv2d", f"{ours}.mid.attn_1.proj_out"),
        *_resnet(f"{h5}/mid_block_1", f"{ours}.mid.block_2", False),
    ]


def vae_entries(cfg: VAEConfig) -> list[Entry]:
    """keras-hub ``VAEEncoder`` / ``VAEDecoder`` variables (``layers/vae_encoder``, ``layers/vae_decoder``)
    -> LDM VAE keys (``encoder.down.0.block.1.norm1``, ``decoder.up.3.upsample.conv``)."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    levels, blocks = len(widths), cfg.num_res_blocks
    entries: list[Entry] = _conv2d("vae_encoder/input_projection", "encoder.conv_in")
    previous, k = widths[0], 0
    for level, width in enumerate(widths):
        for j in range(blocks):
            h5 = f"vae_encoder/blocks/{_numbered('res_net_block', k)}"
            entries += _resnet(h5, f"encoder.down.{level}.block.{j}", previous != width)
            previous, k = width, k + 1
        if level < levels - 1:
            # The zero paddings between them hold no variables, so the convs are numbered alone.
            entries += _conv2d(
                f"vae_encoder/downsamples/{_numbered('conv2d', level)}",
                f"encoder.down.{level}.downsample.conv",
            )
    entries += _mid("vae_encoder", "encoder")
    entries += _norm("vae_encoder/output_norm", "encoder.norm_out")
    entries += _conv2d("vae_encoder/output_projection", "encoder.conv_out")

    entries += _conv2d("vae_decoder/input_projection", "decoder.conv_in")
    entries += _mid("vae_decoder", "decoder")
    # keras-hub runs the decoder's levels from the deepest; LDM numbers decoder.up from the shallowest.
    previous, k = widths[-1], 0
    for i, width in enumerate(reversed(widths)):
        level = levels - 1 - i
        for j in range(blocks + 1):
            h5 = f"vae_decoder/blocks/{_numbered('res_net_block', k)}"
            entries += _resnet(h5, f"decoder.up.{level}.block.{j}", previous != width)
            previous, k = width, k + 1
        if i < levels - 1:
            entries += _conv2d(
                f"vae_decoder/upsamples/{_numbered('conv2d', i)}", f"decoder.up.{level}.upsample.conv"
            )
    entries += _norm("vae_decoder/output_norm", "decoder.norm_out")
    entries += _conv2d("vae_decoder/output_projection", "decoder.conv_out")
    return entries


def clip_entries(cfg: CLIPTextConfig, group: str, projection: str) -> list[Entry]:
    """keras-hub ``CLIPTextEncoder`` (``layers/<group>/layers/``) and its ``CLIPProjection`` -> transformers keys."""
    h5 = f"{group}/layers"
    entries: list[Entry] = [
        (f"{h5}/token_and_position_embedding/token_embedding/vars/0", "text_model.embeddings.token_embedding.weight", _plain),
        (f"{h5}/token_and_position_embedding/position_embedding/vars/0", "text_model.embeddings.position_embedding.weight", _plain),
        *_norm(f"{h5}/layer_normalization", "text_model.final_layer_norm"),
        (f"{projection}/dense/vars/0", "text_projection.weight", _dense),
    ]  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        layer, ours = f"{h5}/{_numbered('clip_encoder_layer', i)}", f"text_model.encoder.layers.{i}"
        entries += _norm(f"{layer}/layer_norm_1", f"{ours}.layer_norm1")
        entries += _norm(f"{layer}/layer_norm_2", f"{ours}.layer_norm2")
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            entries.append(
                (f"{layer}/attention/{name}_dense/vars/0", f"{ours}.self_attn.{proj}.weight", _heads_in)
            )
            entries.append((f"{layer}/attention/{name}_dense/vars/1", f"{ours}.self_attn.{proj}.bias", _flat))
        entries.append(
            (f"{layer}/attention/output_dense/vars/0", f"{ours}.self_attn.out_proj.weight", _heads_out)
        )
        entries.append((f"{layer}/attention/output_dense/vars/1", f"{ours}.self_attn.out_proj.bias", _plain))
        entries += _linear(f"{layer}/dense_1", f"{ours}.mlp.fc1")
        entries += _linear(f"{layer}/dense_2", f"{ours}.mlp.fc2")
    return entries


# --------------------------------------------------------------------------- config


def _inner(config: dict, key: str, where: str, expected_class: str | None = None) -> dict | None:
    """The ``config`` of a nested Keras layer config (None when the field is null)."""
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("config"), dict):
        raise ValueError(f"{where}: config.json field {key!r} is not a Keras layer config")
    if expected_class is not None and value.get("class_name") != expected_class:
        raise ValueError(
            f"{where}: config.json field {key!r} is a {value.get('class_name')!r}; expected {expected_class}"
        )
    return value["config"]


def _field(config: dict, key: str, where: str):
    if key not in config:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return config[key]


def _clip_config(config: dict, where: str) -> CLIPTextConfig:
    layers = int(_field(config, "num_layers", where))
    hidden = int(_field(config, "hidden_dim", where))
    if int(_field(config, "embedding_dim", where)) != hidden:
        raise ValueError(
            f"{where}: embedding_dim={config['embedding_dim']} differs from hidden_dim={hidden}; CLIP's text "
            "encoder has one width"
        )
    index = config.get("intermediate_output_index")
    if index is not None and index < 0:
        index += layers
    if index != layers - 2:
        # SD3 reads the penultimate layer; another index would be a different model.
        raise ValueError(
            f"{where}: intermediate_output_index={config.get('intermediate_output_index')!r}; SD3 reads the "
            f"penultimate layer ({layers - 2} or -2)"
        )
    activation = _field(config, "intermediate_activation", where)
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"{where}: intermediate_activation={activation!r}; allowed: 'quick_gelu', 'gelu'")
    return CLIPTextConfig(
        vocab_size=int(_field(config, "vocabulary_size", where)),
        max_position_embeddings=int(config.get("max_sequence_length", 77)),
        hidden_size=hidden,
        intermediate_size=int(_field(config, "intermediate_dim", where)),
        num_hidden_layers=layers,
        num_attention_heads=int(_field(config, "num_heads", where)),
        hidden_act=activation,
        projection_dim=hidden,  # CLIPProjection is a square Dense without bias
    )


def _vae_config(config: dict, latent_channels: int, where: str) -> VAEConfig:
    enc = [int(f) for f in _field(config, "encoder_num_filters", where)]
    dec = [int(f) for f in _field(config, "decoder_num_filters", where)]
    enc_blocks = [int(b) for b in _field(config, "encoder_num_blocks", where)]
    dec_blocks = [int(b) for b in _field(config, "decoder_num_blocks", where)]
    if dec != enc[::-1]:
        raise ValueError(
            f"{where}: decoder_num_filters={dec} is not encoder_num_filters={enc} reversed, as the LDM VAE has it"
        )
    if len(set(enc_blocks)) != 1 or dec_blocks != [enc_blocks[0] + 1] * len(enc):
        raise ValueError(
            f"{where}: encoder_num_blocks={enc_blocks}, decoder_num_blocks={dec_blocks}; the LDM VAE has the "
            "same number per level, one more in the decoder"
        )
    if any(f % enc[0] for f in enc):
        raise ValueError(f"{where}: encoder_num_filters={enc} are not multiples of the first")
    sample = int(config.get("sample_channels", 32))
    if sample != 2 * latent_channels:
        raise ValueError(
            f"{where}: the VAE's sample_channels={sample} is not twice the backbone's latent_channels="
            f"{latent_channels} (mean and log-variance)"
        )
    return VAEConfig(
        in_channels=int(config.get("input_channels", 3)),
        out_channels=int(config.get("output_channels", 3)),
        latent_channels=latent_channels,
        base_channels=enc[0],
        channel_mult=tuple(f // enc[0] for f in enc),
        num_res_blocks=enc_blocks[0],
        scaling_factor=float(config.get("scale", 1.5305)),
        shift_factor=float(config.get("shift", 0.0609)),
        use_quant_conv=False,
    )


def sd3_config_from_keras_hub(config: dict, name: str, where: str = "keras-hub preset") -> SD3Config:
    """An ``SD3Config`` from a keras-hub ``StableDiffusion3Backbone`` config (the ``config`` of config.json).

    Raises:
        ValueError: naming the field for anything the original SD3 architecture has not.
    """
    if config.get("data_format") not in (None, "channels_last"):
        raise ValueError(
            f"{where}: data_format={config.get('data_format')!r}; only channels_last is supported"
        )
    latent = int(config.get("latent_channels", 16))
    hidden = int(_field(config, "mmdit_hidden_dim", where))
    heads = int(_field(config, "mmdit_num_heads", where))
    clip_l = _clip_config(_inner(config, "clip_l", where, "CLIPTextEncoder") or {}, f"{where} (clip_l)")
    clip_g = _clip_config(_inner(config, "clip_g", where, "CLIPTextEncoder") or {}, f"{where} (clip_g)")
    t5 = _inner(config, "t5", where)
    qk_norm = config.get("mmdit_qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"{where}: mmdit_qk_norm={qk_norm!r}; allowed: None, 'rms_norm'")
    image = [int(s) for s in config.get("image_shape", (1024, 1024, 3))]
    vae = _vae_config(_inner(config, "vae", where, "VAEBackbone") or {}, latent, f"{where} (vae)")
    transformer = MMDiTConfig(
        sample_size=image[0] // vae.downsample_factor,
        patch_size=int(_field(config, "mmdit_patch_size", where)),
        in_channels=latent,
        num_layers=int(_field(config, "mmdit_num_layers", where)),
        attention_head_dim=hidden // heads,
        num_attention_heads=heads,
        # Without T5 keras-hub's context is 4096 wide (CLIP's 2048 zero-padded), as SD3's.
        joint_attention_dim=4096 if t5 is None else int(_field(t5, "hidden_dim", f"{where} (t5)")),
        caption_projection_dim=hidden,
        pooled_projection_dim=clip_l.hidden_size + clip_g.hidden_size,
        out_channels=latent,
        pos_embed_max_size=int(_field(config, "mmdit_position_size", where)),
        dual_attention_layers=tuple(int(i) for i in config.get("mmdit_dual_attention_indices") or ()),
        qk_norm=qk_norm,
    )
    return SD3Config(
        name=name,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        # OpenCLIP bigG pads with 0, as diffusers' SD3 tokenizer_2.
        tokenizer_2=TokenizerConfig(pad_token_id=0),
        text_encoder_3=None,
        transformer=transformer,
        vae=vae,
        scheduler=SchedulerConfig(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            shift=float(config.get("shift", 3.0)),
        ),
        default_size=image[0],
    )


# --------------------------------------------------------------------------- reading


def read_preset_config(folder: pathlib.Path) -> dict:
    """The backbone entry of a preset's config.json (``class_name``, ``config``).

    Raises:
        ValueError: for a folder without config.json, or one that is not a StableDiffusion3Backbone's.
    """
    path = pathlib.Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_FILE}; a keras-hub preset folder has one")
    with reading(path, "cannot read the keras-hub preset config"):
        data = json.loads(path.read_text(encoding="utf-8"))
    if (
        not isinstance(data, dict)
        or data.get("class_name") != BACKBONE_CLASS
        or not isinstance(data.get("config"), dict)
    ):
        found = data.get("class_name") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: a {found!r} config, not a keras-hub {BACKBONE_CLASS}")
    return data


def is_keras_hub_sd3_preset(folder: pathlib.Path) -> bool:
    """Whether ``folder`` is a keras-hub StableDiffusion3Backbone preset (by its config.json alone)."""
    try:
        read_preset_config(folder)
    except ValueError:
        return False
    return True


def _pick_clips(h5, config: SD3Config, where: str) -> dict[str, tuple[str, str]]:
    """Which saved CLIP encoder (and projection) is CLIP-L and which CLIP-G, by their widths.

    keras-hub's graph holds CLIP-L first; the widths decide when they differ (768 and 1280 in SD3).
    """
    groups = ("clip_text_encoder", "clip_text_encoder_1")
    projections = ("clip_projection", "clip_projection_1")
    for name in (*groups, *projections):
        if f"layers/{name}" not in h5:
            raise ValueError(f"{where}: no layers/{name} in the weights (the backbone's CLIP encoders)")
    width = {
        g: h5[f"layers/{g}/layers/layer_normalization/vars/0"].shape[0]
        if f"layers/{g}/layers/layer_normalization/vars/0" in h5
        else None
        for g in groups
    }
    proj_width = {
        p: h5[f"layers/{p}/dense/vars/0"].shape[0] if f"layers/{p}/dense/vars/0" in h5 else None
        for p in projections
    }
    l_width, g_width = config.text_encoder.hidden_size, config.text_encoder_2.hidden_size
    order = list(groups)
    if width[groups[0]] == g_width and width[groups[1]] == l_width and l_width != g_width:
        order.reverse()
    porder = list(projections)
    if proj_width[projections[0]] == g_width and proj_width[projections[1]] == l_width and l_width != g_width:
        porder.reverse()
    return {"text_encoder": (order[0], porder[0]), "text_encoder_2": (order[1], porder[1])}


# The PyTorch-layout shape of each transform's result and the rank it takes, from the stored shape alone.
_SHAPES: dict[Callable, tuple[int, Callable[[tuple], tuple]]] = {
    _dense: (2, lambda s: (s[1], s[0])),
    _conv: (4, lambda s: (s[3], s[2], s[0], s[1])),
    _heads_in: (3, lambda s: (s[1] * s[2], s[0])),
    _heads_out: (3, lambda s: (s[2], s[0] * s[1])),
    _flat: (2, lambda s: (s[0] * s[1],)),
    _plain: (None, lambda s: s),
    _pos_embed: (2, lambda s: (1, *s)),
}


def _convert(h5, entries: list[Entry], prefix: str, where: str) -> dict[str, LazyTensor]:
    """Every entry's dataset (under ``prefix``) as a lazy PyTorch-layout tensor; all missing paths in one error.

    Nothing is read here: the walker checks every shape first, so a file whose variables do not fit is
    refused before any of its bytes are loaded.
    """
    import h5py

    missing = [
        f"{prefix}{path}" for path, _, _ in entries if not isinstance(h5.get(f"{prefix}{path}"), h5py.Dataset)
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(
            f"{where}: the weights lack {len(missing)} variable(s) this architecture needs: {shown}"
        )
    out = {}
    for path, ours, transform in entries:
        dataset = h5[f"{prefix}{path}"]
        rank, shape = _SHAPES[transform]
        stored = tuple(int(d) for d in dataset.shape)
        if rank is not None and len(stored) != rank:
            raise ValueError(
                f"{where}: {prefix}{path} has shape {stored}; a rank-{rank} variable is expected there ({ours})"
            )
        if np.dtype(dataset.dtype).kind != "f":
            raise ValueError(f"{where}: {prefix}{path} holds {dataset.dtype}, not floating-point weights")
        out[ours] = derived(dataset, transform, shape(stored), dataset.dtype, f"{where}:{prefix}{path}")
    return out


def weights_path(folder: pathlib.Path) -> pathlib.Path:
    """The preset's ``model.weights.h5``, or its ``model.weights.json`` shard map when it was saved in shards.

    Raises:
        ValueError: for a folder with neither.
    """
    for name in (WEIGHTS_FILE, SHARD_INDEX):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(
        f"{folder}: no {WEIGHTS_FILE} (nor a sharded {SHARD_INDEX}); a keras-hub preset keeps its backbone "
        "weights there"
    )


class ShardedWeights:
    """The shards of a sharded Keras weights save, read as one HDF5 file (``get``, ``in``, ``[]``, ``close``).

    Keras writes ``model.weights.json`` with ``{"weight_map": {"/<layer path>/vars": file or [files]}}``
    (a group's variables may be split over consecutive shards) and each shard with the same group tree.
    A path is looked up in the files its group maps to, then in every shard. Shard names must be plain
    file names in the map's folder, so a hostile map cannot point outside it.

    Raises:
        ValueError: for a map that is not such JSON, a shard name with a folder in it, or a missing shard.
    """

    def __init__(self, index: pathlib.Path):
        import h5py

        index = pathlib.Path(index)
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: not a Keras shard map ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: a Keras shard map has a non-empty 'weight_map' object; this has none")
        self._map: dict[str, list[str]] = {}
        for group, names in weight_map.items():
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{index}: weight_map[{group!r}] must be a file name or a list of them")
            for name in names:
                if pathlib.PurePath(name).name != name or name in ("", ".", ".."):
                    raise ValueError(f"{index}: shard {name!r} is not a plain file name in {index.parent}")
            self._map[str(group).strip("/")] = names
        self._files: dict[str, object] = {}
        try:
            for name in dict.fromkeys(n for names in self._map.values() for n in names):
                shard = index.parent / name
                if not shard.is_file():
                    raise ValueError(f"{index}: names the shard {name}, which is not in {index.parent}")
                try:
                    self._files[name] = h5py.File(shard, "r")
                except OSError as e:
                    raise ValueError(f"{shard}: not a readable HDF5 file ({e})") from None
        except BaseException:
            self.close()
            raise

    def get(self, path: str):
        group = path.strip("/")
        group = group[: group.rindex("/vars") + 5] if "/vars" in group else group
        mapped = [self._files[n] for n in self._map.get(group, ())]
        for h5 in (*mapped, *self._files.values()):
            found = h5.get(path)
            if found is not None:
                return found
        return None

    def __contains__(self, path: str) -> bool:
        return any(path in h5 for h5 in self._files.values())

    def __getitem__(self, path: str):
        found = self.get(path)
        if found is None:
            raise KeyError(f"{path} is in none of the shards")
        return found

    def close(self) -> None:
        for h5 in self._files.values():
            h5.close()


@dataclass
class KerasHubPreset:
    """A keras-hub SD3 preset opened for reading: the config, lazy tensors per component, the open file.

    ``parts`` maps component names (``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``) to
    {original key: lazy PyTorch-layout tensor}; they read from ``handle`` until ``close()``.
    """

    config: SD3Config
    parts: dict[str, dict[str, LazyTensor]]
    backbone: dict
    handle: object = field(repr=False)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> KerasHubPreset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_keras_hub_sd3(folder: pathlib.Path) -> KerasHubPreset:
    """Open a keras-hub SD3 preset: its ``SD3Config`` and every component's weights, read lazily.

    Raises:
        ImportError: h5py is missing.
        ValueError: for a folder that is not such a preset, missing weights (``weights_path``), or a variable
            the config's architecture needs that the file lacks or holds in another rank (named).
    """
    folder = pathlib.Path(folder)
    data = read_preset_config(folder)
    backbone = data["config"]
    config = sd3_config_from_keras_hub(backbone, folder.name, str(folder / CONFIG_FILE))
    path = weights_path(folder)
    try:
        import h5py
    except ImportError:
        raise ImportError("reading keras-hub presets needs h5py (a dependency of tensorflow)") from None
    with reading(path, "cannot read the keras-hub weights"):
        if path.name == SHARD_INDEX:
            h5 = ShardedWeights(path)
        else:
            try:
                h5 = h5py.File(path, "r")
            except OSError as e:
                raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
        try:
            where = str(path)
            parts = {
                "transformer": _convert(
                    h5, mmdit_entries(config.transformer), "layers/mm_di_t/layers/", where
                ),
                "vae": _convert(h5, vae_entries(config.vae), "layers/", where),
            }
            for name, (group, projection) in _pick_clips(h5, config, where).items():
                entries = clip_entries(getattr(config, name), group, projection)
                parts[name] = _convert(h5, entries, "layers/", where)
        except BaseException:
            h5.close()
            raise
    return KerasHubPreset(config, parts, backbone, h5)


def load_keras_hub_sd3(cls, folder: pathlib.Path, *, dtype=None, load_t5: bool = True):
    """Build ``cls`` (``StableDiffusion3``) from a keras-hub SD3 preset folder and load its weights.

    Raises:
        ValueError: as ``read_keras_hub_sd3``, a preset with T5 unless ``load_t5=False`` (its weights are
            not converted yet), or weights that do not fit the config (``StateDictError``, every key named).
    """
    folder = pathlib.Path(folder)
    with read_keras_hub_sd3(folder) as preset:
        if preset.backbone.get("t5") is not None and load_t5:
            raise ValueError(
                f"{folder}: this keras-hub preset has a T5 encoder, whose weights tf_diffusion does not "
                "convert yet; load with load_t5=False to run without T5 (zero T5 tokens)"
            )
        sd = cls(preset.config, dtype=dtype)
        with reading(weights_path(folder), "cannot load the keras-hub weights"):
            for name, tensors in preset.parts.items():
                load_state_dict(getattr(sd, name), tensors)
    return sd


def describe_keras_hub_sd3(folder: pathlib.Path) -> dict:
    """What ``tf-diffusion info`` says of a keras-hub SD3 preset folder, without building the model."""
    folder = pathlib.Path(folder)
    with read_keras_hub_sd3(folder) as preset:
        info: dict = {
            "family": "sd3",
            "format": f"keras-hub preset ({BACKBONE_CLASS})",
            "config": preset.config.name,
        }
        for name, tensors in preset.parts.items():
            dtypes = ", ".join(sorted({str(t.dtype) for t in tensors.values()}))
            info[name] = f"{sum(t.size for t in tensors.values()):,} parameters, {dtypes}"
        t5 = preset.backbone.get("t5") is not None
    notes = ["CLIP tokenizers: tf_diffusion's packaged ones"]
    if t5:
        notes.append("has T5, not converted yet: load with load_t5=False")
    info["notes"] = notes
    return info
