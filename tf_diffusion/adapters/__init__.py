"""Adapters that change a built model's weights (LoRA); see docs/architecture.md, "Adding an adapter"."""

from tf_diffusion.adapters.lora import (
    LoraError,
    LoraModule,
    LoraWeights,
    fuse_lora,
    load_lora_weights,
    read_lora,
    set_adapters,
    unfuse_lora,
    unload_lora_weights,
)

__all__ = [
    "LoraError",
    "LoraModule",
    "LoraWeights",
    "fuse_lora",
    "load_lora_weights",
    "read_lora",
    "set_adapters",
    "unfuse_lora",
    "unload_lora_weights",
]
