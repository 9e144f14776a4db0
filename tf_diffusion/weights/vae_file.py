"""A VAE on its own, to replace a model's: the files people download next to a checkpoint.

What arrives in practice:

- a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``),
  such as stabilityai/sdxl-vae or madebyollin/sdxl-vae-fp16-fix, or a pipeline folder whose ``vae/`` is
  meant; its config's ``scaling_factor`` and ``force_upcast`` then apply, as when diffusers is given
  ``vae=AutoencoderKL.from_pretrained(...)``;
- a single file in the original layout (``encoder.down.0.block.0...``, optionally under
  ``first_stage_model.``), as the web UI's ``models/VAE`` folder holds them (``*.vae.pt``,
  ``*.vae.safetensors``, ``sdxl_vae.safetensors``); the web UI drops the training loss (``loss.*``) and EMA
  bookkeeping keys, and so do we; the model's scaling factor stays, as in the web UI;
- a single file with diffusers' key names (``encoder.down_blocks.0...``), renamed on reading.

Tensors stay lazy; ``read_vae`` only opens and checks names. Shapes are checked against the model's VAE when
loading (``load_state_dict`` assigns all or nothing).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from tf_diffusion.config import VAEConfig
from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.diffusers_configs import vae_config_from_diffusers
from tf_diffusion.weights.diffusers_folder import _open_weights, read_json, select_weight_files
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae
from tf_diffusion.weights.safetensors_io import open_safetensors
from tf_diffusion.weights.single_file import unwrap_checkpoint

# Key prefixes a VAE file may carry: a whole-model file's VAE part, or nothing.
_PREFIXES = ("first_stage_model.", "vae.")
# Not weights of the autoencoder: the LDM training loss (LPIPS, discriminator) and EMA bookkeeping.
_DROPPED = ("loss.", "model_ema.")
# What the architecture is; the rest of a VAEConfig (scaling, upcasting) may differ between two VAEs.
_ARCHITECTURE = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "norm_groups",
)
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


@dataclass
class VAEWeights:
    """A VAE read from ``path``.

    Attributes:
        path: the file or folder read.
        format: "diffusers" (an AutoencoderKL folder), "single-file" (original keys) or
            "single-file-diffusers" (a file with diffusers' key names).
        config: the folder's config (diffusers folders only); None for a file, whose architecture is the
            model's and whose scaling factor the model keeps.
        tensors: original key -> lazy torch-layout tensor.
        dropped: keys that are not autoencoder weights (training loss, EMA bookkeeping), left out.
    """

    path: pathlib.Path
    format: str
    config: VAEConfig | None
    tensors: dict
    dropped: list[str] = field(default_factory=list)
    handles: list = field(default_factory=list, repr=False)

    def config_for(self, model: VAEConfig) -> VAEConfig:
        """The VAE config to run with, in place of ``model``'s.

        Raises:
            ValueError: the folder's VAE has another architecture than the model's.
        """
        if self.config is None:
            return model
        differ = {
            name: (getattr(self.config, name), getattr(model, name))
            for name in _ARCHITECTURE
            if getattr(self.config, name) != getattr(model, name)
        }
        if differ:
            listed = ", ".join(
                f"{name} {ours} (the model's {theirs})" for name, (ours, theirs) in differ.items()
            )
            raise ValueError(f"{self.path}: this VAE does not fit the model's: {listed}")
        return dataclasses.replace(
            model,
            scaling_factor=self.config.scaling_factor,
            shift_factor=self.config.shift_factor,
            force_upcast=self.config.force_upcast,
        )

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        self.handles = []

    def __enter__(self) -> VAEWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_vae(source: str | os.PathLike, model: VAEConfig, *, variant: str | None = None) -> VAEWeights:
    """Open a VAE file or folder (see the module's description) for a model whose VAE is ``model``.

    Args:
        source: a file, an AutoencoderKL folder, a pipeline folder (its ``vae/``) or a hub id.
        model: the VAE config of the model it is for (diffusers' key names are renamed with it).
        variant: a diffusers weight variant ("fp16").

    Raises:
        FileNotFoundError: no such file or folder (and not a hub id).
        ValueError: not a VAE: a folder without an AutoencoderKL config, a file with no VAE keys, or keys
            of another kind, named.
    """
    from tf_diffusion.weights.loading import resolve_source

    path = resolve_source(source, variant=variant)
    if path.is_dir():
        return _read_folder(path, model, variant)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"{path}: a VAE file must end in one of {', '.join(FILE_SUFFIXES)}")
    handles = []
    if path.suffix.lower() == ".safetensors":
        handle = open_safetensors(path)
        handles.append(handle)
        tensors = dict(handle)
    else:
        tensors, _ = unwrap_checkpoint(load_ckpt(path), str(path))
    try:
        weights = _from_tensors(path, tensors, model)
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    weights.handles = handles
    return weights


def _read_folder(path: pathlib.Path, model: VAEConfig, variant: str | None) -> VAEWeights:
    if (path / "model_index.json").is_file() and (path / "vae").is_dir():
        path = path / "vae"  # a pipeline folder: its VAE
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path}: not a VAE folder (no config.json; expected diffusers' AutoencoderKL layout)"
        )
    data = read_json(config_file)
    if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(
            f"{config_file}: _class_name is {data.get('_class_name')!r}, expected 'AutoencoderKL'"
        )
    config = vae_config_from_diffusers(data)
    available = [f"vae/{p.name}" for p in path.iterdir() if p.is_file()]
    relative = select_weight_files(available, "vae", variant).removeprefix("vae/")
    handles = []
    try:
        tensors, _ = _open_weights(path, relative, handles)
        original = convert_diffusers_vae(tensors, dataclasses.replace(model, **_architecture(config)))
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    return VAEWeights(path, "diffusers", config, original, handles=handles)


def _architecture(config: VAEConfig) -> dict:
    return {name: getattr(config, name) for name in _ARCHITECTURE}


def _from_tensors(path: pathlib.Path, tensors: Mapping, model: VAEConfig) -> VAEWeights:
    kept, dropped = {}, []
    for key, value in tensors.items():
        name = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
        if name.startswith(_DROPPED) or key.startswith(_DROPPED):
            dropped.append(key)
        else:
            kept[name] = value
    if not any(k.startswith(("encoder.", "decoder.")) for k in kept):
        sample = ", ".join(sorted(tensors)[:3]) or "none"
        raise ValueError(
            f"{path}: holds no VAE weights (no encoder.* / decoder.* keys; first keys: {sample}); "
            "a VAE file has the autoencoder's keys, optionally under first_stage_model."
        )
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in kept):
        return VAEWeights(path, "single-file-diffusers", None, convert_diffusers_vae(kept, model), dropped)
    return VAEWeights(path, "single-file", None, kept, dropped)


_VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def describe_vae(source: str | os.PathLike) -> dict | None:
    """What ``tf-diffusion info`` says about a stand-alone VAE, or None if ``source`` is not one.

    A folder counts when its ``config.json`` is an AutoencoderKL's; a file when every key (prefix and
    training-loss keys aside) belongs to the autoencoder. Only names, shapes and dtypes are read.
    """
    import math

    import numpy as np

    path = pathlib.Path(source)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file() or (path / "model_index.json").exists():
            return None
        data = read_json(config)
        if data.get("_class_name") != "AutoencoderKL":
            return None
        kind, names = "diffusers AutoencoderKL folder", None
    elif path.is_file() and path.suffix.lower() in FILE_SUFFIXES:
        if path.suffix.lower() == ".safetensors":
            with open_safetensors(path) as handle:
                names = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in handle.items()}
        else:
            tensors, _ = unwrap_checkpoint(load_ckpt(path), str(path))
            names = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in tensors.items()}
        kept = {
            next((k[len(p) :] for p in _PREFIXES if k.startswith(p)), k): v
            for k, v in names.items()
            if not k.startswith(_DROPPED) and not k.removeprefix("first_stage_model.").startswith(_DROPPED)
        }
        if not kept or not all(k.startswith(_VAE_KEYS) for k in kept):
            return None
        diffusers = any(".down_blocks." in k or ".up_blocks." in k for k in kept)
        kind = "single file, " + ("diffusers key names" if diffusers else "original (LDM) key names")
        names = {"kept": kept, "dropped": len(names) - len(kept)}
    else:
        return None
    out = {"path": str(path), "kind": "VAE", "format": kind}
    if names is None:
        cfg = vae_config_from_diffusers(data)
        out.update(
            latent_channels=cfg.latent_channels,
            scaling_factor=cfg.scaling_factor,
            force_upcast=cfg.force_upcast,
            block_out_channels=" ".join(str(cfg.base_channels * m) for m in cfg.channel_mult),
        )
    else:
        kept = names["kept"]
        out["parameters"] = sum(math.prod(shape) for shape, _ in kept.values())
        out["dtypes"] = sorted({dtype for _, dtype in kept.values()})
        out["latent_channels"] = (
            kept["post_quant_conv.weight"][0][0] if "post_quant_conv.weight" in kept else "?"
        )
        if names["dropped"]:
            out["not loaded"] = (
                f"{names['dropped']} keys that are not autoencoder weights (training loss, EMA)"
            )
        out["note"] = "loads with --vae / load_vae; the model's scaling factor stays (a file has no config)"
    return out
