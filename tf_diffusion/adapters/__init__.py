"""Adapters that change a built model's weights (LoRA, textual inversion); see docs/architecture.md.

Names are imported on first use (PEP 562): ``adapters.extra_networks`` (the prompt's ``<lora:...>``
tags, LoRA folders and hashes) needs no TensorFlow, so the command line checks them before loading it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoraError": "tf_diffusion.adapters.lora",
    "LoraModule": "tf_diffusion.adapters.lora",
    "LoraWeights": "tf_diffusion.adapters.lora",
    "fuse_lora": "tf_diffusion.adapters.lora",
    "load_lora_weights": "tf_diffusion.adapters.lora",
    "read_lora": "tf_diffusion.adapters.lora",
    "set_adapters": "tf_diffusion.adapters.lora",
    "unfuse_lora": "tf_diffusion.adapters.lora",
    "unload_lora_weights": "tf_diffusion.adapters.lora",
    "load_textual_inversion": "tf_diffusion.adapters.textual_inversion",
    "TextualInversionError": "tf_diffusion.adapters.textual_inversion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tf_diffusion.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
