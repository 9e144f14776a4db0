"""IP-Adapter files and their image encoders, read into tf_diffusion's models.

- Adapters in the published layout (h94/IP-Adapter's ``ip-adapter_sd15.bin`` / ``.safetensors``):
  a ``torch.save`` of ``{"image_proj": {...}, "ip_adapter": {...}}`` (read through the allow-list
  unpickler, never torch) or a safetensors file with the same keys flattened (``image_proj.proj.weight``,
  ``ip_adapter.1.to_k_ip.weight``).
- Image encoders as transformers ``CLIPVisionModelWithProjection`` folders (``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``), whose keys are ``CLIPVisionEncoder``'s attribute paths.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

PARTS = ("image_proj", "ip_adapter")


def read_ip_adapter(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The two parts of an IP-Adapter file: ``{"image_proj": {...}, "ip_adapter": {...}}``, float32.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file without both parts (a LoRA, a whole model, FaceID's extra parts named).
    """
    parts = _lazy_parts(path)
    return {p: {k: np.asarray(v, np.float32) for k, v in parts[p].items()} for p in PARTS}


def _lazy_parts(path: str | os.PathLike) -> dict:
    """The file's parts with tensors still in the file (shapes at once, values on ``np.asarray``)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IP-Adapter file {str(path)!r} does not exist")
    if path.suffix.lower() == ".safetensors":
        from tf_diffusion.weights.safetensors_io import open_safetensors

        nested: dict = {}
        for key, value in open_safetensors(path).items():
            part, _, rest = key.partition(".")
            nested.setdefault(part, {})[rest] = value
    else:
        from tf_diffusion.weights.ckpt import load_ckpt

        nested = load_ckpt(path)
        if not isinstance(nested, dict):
            raise ValueError(f"{path}: holds a {type(nested).__name__}, not an IP-Adapter's dict of parts")
    missing = [p for p in PARTS if not isinstance(nested.get(p), dict) or not nested[p]]
    extra = sorted(set(nested) - set(PARTS))
    if missing or extra:
        raise ValueError(
            f"{path} is not an IP-Adapter in the published layout: it needs the parts {list(PARTS)} "
            f"(keys 'image_proj.*' and 'ip_adapter.<n>.to_k_ip / to_v_ip.*'); "
            f"missing {missing}, other parts {extra[:6]}"
        )
    return nested


def describe_ip_adapter(path: str | os.PathLike) -> dict:
    """What ``tf-diffusion info`` reports: the kind, token count, widths and layer count."""
    from tf_diffusion.ip_adapter import ImageProjConfig, image_proj_config

    parts = _lazy_parts(path)  # shapes only: nothing is read into memory
    c = image_proj_config(parts["image_proj"])
    layers = sorted({int(k.split(".")[0]) for k in parts["ip_adapter"]})
    if isinstance(c, ImageProjConfig):
        kind, tokens, reads, width = (
            "base",
            c.num_tokens,
            f"image_embeds ({c.image_embed_dim})",
            c.cross_attention_dim,
        )
    else:
        kind, tokens, reads, width = "plus", c.num_queries, f"hidden states ({c.embed_dim})", c.output_dim
    return {
        "kind": f"IP-Adapter ({kind})",
        "format": "IP-Adapter (.safetensors)"
        if pathlib.Path(path).suffix.lower() == ".safetensors"
        else "IP-Adapter (torch.save)",
        "tokens_per_image": tokens,
        "reads": reads,
        "cross_attention_dim": width,
        "family": {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width, "unknown (a custom model)"),
        "cross_attention_layers": len(layers),
        "parameters": int(sum(np.prod(v.shape) for p in PARTS for v in parts[p].values())),
    }


def is_ip_adapter_file(path: str | os.PathLike) -> bool:
    """Whether a file holds an IP-Adapter's two parts (safetensors: the header's keys; ``.bin``:
    the pickle's top level, read lazily through the allow-list unpickler)."""
    path = pathlib.Path(path)
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".bin", ".pt", ".pth"):
        return False
    try:
        if path.suffix.lower() == ".safetensors":
            from tf_diffusion.weights.safetensors_io import open_safetensors

            parts = {k.partition(".")[0] for k in open_safetensors(path).keys()}
        else:
            from tf_diffusion.weights.ckpt import load_ckpt

            top = load_ckpt(path)
            parts = set(top) if isinstance(top, dict) else set()
    except (OSError, ValueError):
        return False
    return parts == set(PARTS)


def load_image_encoder(source, dtype: str | None = None):
    """A ``CLIPVisionEncoder`` from a transformers ``CLIPVisionModelWithProjection`` folder.

    Raises:
        FileNotFoundError: no folder, or no config.json / weights in it.
        ValueError: a config of another model type.
    """
    from tf_diffusion.clip_vision import CLIPVisionEncoder
    from tf_diffusion.config import CLIPVisionConfig
    from tf_diffusion.weights import load_state_dict

    folder = pathlib.Path(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"image encoder {str(folder)!r}: no config.json; expected a transformers "
            "CLIPVisionModelWithProjection folder (config.json, model.safetensors)"
        )
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") == "clip":  # a whole CLIPModel's config: its vision part
        raw = raw.get("vision_config", {})
    if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(
            f"image encoder {str(folder)!r} is a {raw.get('model_type')!r} model; expected clip_vision_model"
        )
    fields = CLIPVisionConfig.__dataclass_fields__
    config = CLIPVisionConfig(**{k: v for k, v in raw.items() if k in fields})
    weights = None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            weights = folder / name
            break
    if weights is None:
        raise FileNotFoundError(f"image encoder {str(folder)!r}: no model.safetensors or pytorch_model.bin")
    if weights.suffix == ".safetensors":
        from tf_diffusion.weights.safetensors_io import open_safetensors

        tensors = dict(open_safetensors(weights))
    else:
        from tf_diffusion.weights.ckpt import load_ckpt

        tensors = load_ckpt(weights)
    model = CLIPVisionEncoder(config, dtype=dtype)
    load_state_dict(model, tensors)
    model.source = str(folder)
    return model


__all__ = ["describe_ip_adapter", "is_ip_adapter_file", "load_image_encoder", "read_ip_adapter"]
