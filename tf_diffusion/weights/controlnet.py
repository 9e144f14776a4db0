"""ControlNet files: diffusers ``ControlNetModel`` folders and the original single files.

Original files (``control_v11p_sd15_canny.pth`` / ``.safetensors``, lllyasviel's cldm) store the
net under ``control_model.`` (some without the prefix); the older ``control_sd15_*.pth`` carry a
whole SD model besides it, of which only the ``control_model.`` part is read. Our ``ControlNet``
names its layers with those keys, so original files load by the walker alone. Diffusers folders
group blocks by level; their names go through the UNet's rename (``diffusers_unet``) plus the
ControlNet's own modules (``controlnet_cond_embedding``, ``controlnet_down_blocks``,
``controlnet_mid_block``). ``save_controlnet`` writes a net back as a diffusers folder (the renames
reversed), which is how ``ControlNetTrainer`` saves what it trained.
"""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Mapping

import numpy as np

from tf_diffusion.controlnet import ControlNet, ControlNetConfig
from tf_diffusion.fileio import read_json_object, reading
from tf_diffusion.weights.diffusers_unet import (
    diffusers_key_to_original,
    diffusers_prefix_map,
    unet_config_from_diffusers,
)
from tf_diffusion.weights.state_dict import StateDictError, load_state_dict

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
# Keys of a whole SD model beside the control part in the older control_sd15_*.pth files.
_SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
# config.json fields of ControlNetModel that UNet2DConditionModel does not have.
_CONTROL_FIELDS = (
    "conditioning_channels",
    "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
)
_UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def controlnet_config_from_diffusers(data: Mapping) -> ControlNetConfig:
    """Translate a diffusers ``ControlNetModel`` ``config.json`` dict into a ``ControlNetConfig``.

    The UNet fields go through ``unet_config_from_diffusers`` (which refuses what we cannot
    represent, such as ``mid_block_type="UNetMidBlock2D"``).

    Raises:
        ValueError: for another class, a BGR channel order or a UNet field we do not support.
    """
    class_name = data.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise ValueError(f"_class_name={class_name!r} is not supported; expected 'ControlNetModel'")
    order = data.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(f"controlnet_conditioning_channel_order={order!r} is not supported; expected 'rgb'")
    unet = {k: v for k, v in data.items() if k not in _CONTROL_FIELDS and not k.startswith("_")}
    if unet.get("num_attention_heads") is not None:
        # ControlNetModel reads num_attention_heads or attention_head_dim, both as head counts.
        unet["attention_head_dim"] = unet.pop("num_attention_heads")
    unet.pop("num_attention_heads", None)
    down = list(unet.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    if all(t in _UP_FOR_DOWN for t in down):
        unet["up_block_types"] = [_UP_FOR_DOWN[t] for t in reversed(down)]
    hint = data.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    return ControlNetConfig(
        unet=unet_config_from_diffusers(unet),
        conditioning_channels=int(data.get("conditioning_channels", 3)),
        hint_channels=tuple(hint),
        global_pool_conditions=bool(data.get("global_pool_conditions", False)),
    )


def diffusers_controlnet_prefix_map(config: ControlNetConfig) -> dict[str, str]:
    """Module prefixes of a diffusers ControlNetModel -> the original ones, for this architecture."""
    table = {
        k: v
        for k, v in diffusers_prefix_map(config.unet).items()
        if not v.startswith(("output_blocks.", "out."))
    }
    n = len(config.hint_channels)
    table["controlnet_cond_embedding.conv_in."] = "input_hint_block.0."
    for i in range(2 * (n - 1)):
        table[f"controlnet_cond_embedding.blocks.{i}."] = f"input_hint_block.{2 * i + 2}."
    table["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{4 * (n - 1) + 2}."
    for i in range(config.num_residuals):
        table[f"controlnet_down_blocks.{i}."] = f"zero_convs.{i}.0."
    table["controlnet_mid_block."] = "middle_block_out.0."
    return table


_CONTROL_PREFIX = re.compile(
    r"^(controlnet_cond_embedding\.(?:conv_in|conv_out|blocks\.\d+)\.|controlnet_down_blocks\.\d+\."
    r"|controlnet_mid_block\.)(.+)$"
)


def convert_diffusers_controlnet(tensors: Mapping, config: ControlNetConfig) -> dict:
    """Rename a diffusers ControlNetModel state dict to original keys; values pass through.

    Raises:
        StateDictError: if any key has no counterpart in this architecture.
    """
    table = diffusers_controlnet_prefix_map(config)
    renamed, unknown = {}, []
    for key, value in tensors.items():
        match = _CONTROL_PREFIX.match(key)
        if match is not None:
            prefix, rest = match.groups()
            new = table[prefix] + rest if prefix in table else None
        else:
            new = diffusers_key_to_original(key, table)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    if unknown:
        raise StateDictError(unexpected=unknown, model_name="a diffusers ControlNetModel of this config")
    return renamed


class _Shape:
    """Stands in for a tensor where only a shape is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def control_part(tensors: Mapping, source: str = "the file") -> dict:
    """The ControlNet's tensors of an original file, without ``control_model.``.

    Raises:
        ValueError: if the file holds no ControlNet (no ``input_hint_block``).
    """
    if any(k.startswith(CONTROL_PREFIX) for k in tensors):
        part = {k[len(CONTROL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
        others = [k for k in tensors if not k.startswith(CONTROL_PREFIX)]
        if others:
            whole = any(k.startswith(_SD_PREFIXES) for k in others)
            logger.warning(
                "%s: using the %d control_model.* tensors; the other %d (%s) are not read",
                source,
                len(part),
                len(others),
                "a whole Stable Diffusion model, as control_sd15_*.pth files carry" if whole else others[0],
            )
    else:
        part = dict(tensors)
    if "input_hint_block.0.weight" not in part:
        raise ValueError(
            f"{source}: not a ControlNet (no input_hint_block.0.weight or control_model.input_hint_block.0.weight)"
        )
    return part


def infer_controlnet_config(tensors: Mapping) -> ControlNetConfig:
    """ControlNetConfig from the shapes of an original ControlNet (keys without ``control_model.``).

    Heads and norm groups are not stored; they are chosen as ``single_file.infer_unet_config`` does.
    """
    from tf_diffusion.weights.single_file import infer_unet_config

    cin = tensors["input_blocks.0.0.weight"].shape[1]
    # infer_unet_config reads the output width from out.2; a ControlNet has no output blocks.
    unet = infer_unet_config({**tensors, "out.2.weight": _Shape((cin, 1, 3, 3))})
    convs = sorted(
        int(m.group(1)) for k in tensors if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))
    )
    if len(convs) < 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise ValueError(f"unexpected input_hint_block layout: convs at {convs}")
    # Convs 0, then (same width, stride-2 to the next width) per level, then the output conv.
    hint = [tensors["input_hint_block.0.weight"].shape[0]]
    hint += [tensors[f"input_hint_block.{i}.weight"].shape[0] for i in convs[2:-1:2]]
    return ControlNetConfig(
        unet=unet,
        conditioning_channels=tensors["input_hint_block.0.weight"].shape[1],
        hint_channels=tuple(hint),
    )


def _read_tensors(path: pathlib.Path) -> dict:
    from tf_diffusion.weights.ckpt import load_ckpt
    from tf_diffusion.weights.safetensors_io import open_safetensors
    from tf_diffusion.weights.single_file import unwrap_checkpoint

    if path.suffix.lower() == ".safetensors":
        return dict(open_safetensors(path))
    tensors, _ = unwrap_checkpoint(load_ckpt(path), str(path))
    return tensors


_FAMILY_BY_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def describe_controlnet(source) -> dict | None:
    """What ``tf-diffusion info`` reports for a ControlNet file or folder; None if it holds none.

    Reads safetensors headers only (``.pth`` files go through the safe unpickler whole). The report
    gives the format, the model family the net is for (from its text-context width and added
    conditioning), the parameter count, the dtypes, and what else the file carries.
    """
    path = pathlib.Path(source)
    if not path.exists():
        return None
    with reading(path, "cannot read the ControlNet"):
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                return None
            data = read_json_object(config_file)
            if data.get("_class_name") != "ControlNetModel":
                return None
            weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
            tensors = _read_tensors(weights) if weights is not None else {}
            cfg = controlnet_config_from_diffusers(data)
            fmt, others = "diffusers ControlNetModel folder", 0
        else:
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                return None
            raw = _read_tensors(path)
            if not any(k.endswith("input_hint_block.0.weight") for k in raw):
                return None
            tensors = raw
            if any(k.startswith(CONTROL_PREFIX) for k in raw):
                tensors = {
                    k[len(CONTROL_PREFIX) :]: v for k, v in raw.items() if k.startswith(CONTROL_PREFIX)
                }
            others = len(raw) - len(tensors)
            cfg = infer_controlnet_config(tensors)
            fmt = f"original ControlNet single file ({path.suffix.lower()})"
    unet = cfg.unet
    family = _FAMILY_BY_CONTEXT.get(unet.context_dim, f"unknown ({unet.context_dim}-wide text context)")
    if unet.adm_in_channels is not None and unet.context_dim == 2048:
        family = "SDXL"
    report = {
        "source": str(path),
        "kind": "ControlNet",
        "format": fmt,
        "for family": family,
        "parameters": int(sum(int(np.prod(t.shape)) for t in tensors.values())),
        "dtypes": sorted({str(np.dtype(t.dtype)) for t in tensors.values()}),
        "hint channels": cfg.conditioning_channels,
        "hint size": f"{cfg.hint_factor}x the latents",
    }
    if others:
        report["not read"] = (
            f"{others} other tensors (a whole Stable Diffusion model, as control_sd15_*.pth carry)"
        )
    return report


def load_controlnet(
    source, *, config: ControlNetConfig | None = None, dtype: str | None = None
) -> ControlNet:
    """Build a ``ControlNet`` and load its weights.

    Args:
        source: a diffusers ``ControlNetModel`` folder (``config.json`` and
            ``diffusion_pytorch_model.safetensors`` / ``.bin``), or an original single file
            (``.safetensors``; ``.pth`` / ``.ckpt`` through the safe unpickler).
        config: the architecture, instead of the folder's config.json or the shapes of a single file
            (single files store neither head counts nor norm groups).
        dtype: a Keras dtype policy name for the model.

    Returns:
        The loaded ControlNet.

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        ValueError: for a file that holds no ControlNet, an unsupported config, or weights that
            do not fit (every bad key listed); messages name the file.
    """
    path = pathlib.Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    with reading(path, "cannot read the ControlNet"):
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path}: not a diffusers ControlNetModel folder (no config.json)")
            data = read_json_object(path / "config.json")
            cfg = config if config is not None else controlnet_config_from_diffusers(data)
            weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
            if weights is None:
                raise ValueError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)})")
            tensors = convert_diffusers_controlnet(_read_tensors(weights), cfg)
        else:
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ValueError(
                    f"{path}: unknown ControlNet file type {path.suffix!r}; expected a folder or one of "
                    f"{SINGLE_FILE_SUFFIXES}"
                )
            raw = _read_tensors(path)
            if "controlnet_cond_embedding.conv_in.weight" in raw:
                raise ValueError(
                    f"{path}: diffusers-named weights; pass the folder that holds them with its config.json"
                )
            tensors = control_part(raw, str(path))
            cfg = config if config is not None else infer_controlnet_config(tensors)
        model = ControlNet(cfg, dtype=dtype)
        load_state_dict(model, tensors)
    model.source = str(path)  # PNG parameters name the net by its file (adapters.controlnet.model_title)
    return model


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict:
    """A ``ControlNetConfig`` as diffusers' ``ControlNetModel`` config.json (what
    ``controlnet_config_from_diffusers`` reads back)."""
    from tf_diffusion.weights.diffusers_folder import unet_config_to_diffusers

    unet = unet_config_to_diffusers(config.unet, sample_size=32)
    # ControlNetModel has no decoder half, no output width, no sample size.
    for key in ("up_block_types", "out_channels", "sample_size", "center_input_sample"):
        unet.pop(key, None)
    return {
        **unet,
        "_class_name": "ControlNetModel",
        "conditioning_channels": config.conditioning_channels,
        "conditioning_embedding_out_channels": list(config.hint_channels),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": config.global_pool_conditions,
    }


def controlnet_to_diffusers(tensors: Mapping, config: ControlNetConfig) -> dict:
    """Original ControlNet keys (without ``control_model.``) -> diffusers ``ControlNetModel`` keys.

    Raises:
        ValueError: for a key this architecture does not have.
    """
    from tf_diffusion.weights.diffusers_folder import unet_to_diffusers

    own = {
        original: new
        for new, original in diffusers_controlnet_prefix_map(config).items()
        if new.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))
    }
    out, unet = {}, {}
    for key, value in tensors.items():
        prefix = next((p for p in own if key.startswith(p)), None)
        if prefix is not None:
            out[own[prefix] + key[len(prefix) :]] = value
        elif key.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
            raise ValueError(f"ControlNet key {key!r} has no diffusers name in this architecture")
        else:
            unet[key] = value
    out.update(unet_to_diffusers(unet, config.unet))
    return out


def save_controlnet(
    net: ControlNet, folder, *, dtype: str | None = None, tensors: Mapping | None = None
) -> str:
    """Write ``net`` as a diffusers ``ControlNetModel`` folder (config.json and
    diffusion_pytorch_model.safetensors), which ``ControlNet.from_pretrained(folder)`` and diffusers read.

    Args:
        net: the ControlNet whose architecture (and, without ``tensors``, weights) are written.
        folder: the folder to create or overwrite.
        dtype: cast floating tensors to this numpy dtype ("float16" for release files); None keeps them.
        tensors: original-key weights to write instead of the net's own (a trainer's EMA weights).

    Returns:
        The folder's path.
    """
    import json

    from tf_diffusion.weights.safetensors_io import save_safetensors
    from tf_diffusion.weights.state_dict import state_dict

    path = pathlib.Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tensors) if tensors is not None else state_dict(net)
    if dtype is not None:
        weights = {k: np.asarray(v).astype(dtype) for k, v in weights.items()}
    converted = controlnet_to_diffusers(weights, net.config)
    (path / "config.json").write_text(json.dumps(controlnet_config_to_diffusers(net.config), indent=2) + "\n")
    save_safetensors(converted, str(path / WEIGHT_FILES[0]), overwrite=True)
    return str(path)
