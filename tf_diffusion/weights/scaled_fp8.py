"""ComfyUI's "scaled fp8" files (``sd3.5_large_fp8_scaled.safetensors``): float8 weights, each with a scale.

Next to a float8 ``<module>.weight`` such a file stores ``<module>.scale_weight``, one float32 number, and
the weight is ``weight.astype(float32) * scale_weight`` (ComfyUI's ``scaled_fp8`` operations dequantize
it so). A ``scaled_fp8`` marker key says the file is one, and ``<module>.scale_input`` keys, where present,
serve only ComfyUI's float8 matrix products (the dequantized computation does not read them). Loading
computes each dequantized weight when its variable is assigned, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tf_diffusion.weights.lazy import LazyTensor

SCALE = "scale_weight"
# Keys that carry no weight of the model: the input scales and the marker.
_DROPPED_SUFFIXES = ("scale_input", "scaled_fp8")


def _is_scale_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == SCALE or last in _DROPPED_SUFFIXES


def is_scaled_fp8(tensors: Mapping) -> bool:
    """Whether a state dict holds scaled-fp8 weights (a ``scale_weight`` key or the ``scaled_fp8`` marker)."""
    return any(_is_scale_key(key) for key in tensors)


def count_scaled(tensors: Mapping) -> int:
    """How many weights of ``tensors`` have a ``scale_weight``."""
    return sum(1 for key in tensors if key.rsplit(".", 1)[-1] == SCALE)


def without_scales(tensors: Mapping) -> dict:
    """``tensors`` without the scale and marker keys, the weights as stored (for ``info``'s counts)."""
    return {key: value for key, value in tensors.items() if not _is_scale_key(key)}


def dequantize_scaled_fp8(tensors: Mapping, source: str = "") -> dict:
    """The state dict with every scaled weight as ``weight.astype(float32) * scale_weight`` (read lazily).

    Args:
        tensors: key -> tensor (arrays or ``LazyTensor``), one component's or a whole file's.
        source: the file, for messages.

    Raises:
        ValueError: for a ``scale_weight`` that is not one number or has no ``weight`` beside it.
    """
    out = {}
    for key, value in tensors.items():
        if _is_scale_key(key):
            if key.endswith("." + SCALE) and key[: -len(SCALE)] + "weight" not in tensors:
                raise ValueError(
                    f"{source}: {key} scales no weight (no {key[: -len(SCALE)]}weight beside it)"
                )
            continue
        scale_key = key[: -len("weight")] + SCALE if key.endswith(".weight") else None
        if scale_key is not None and scale_key in tensors:
            value = _scaled(value, tensors[scale_key], f"{source}:{key}")
        out[key] = value
    return out


def _scaled(weight, scale, where: str) -> LazyTensor:
    size = int(np.prod(tuple(scale.shape)))
    if size != 1:
        raise ValueError(f"{where}: its scale_weight has shape {tuple(scale.shape)}; expected one number")

    def read() -> np.ndarray:
        factor = np.asarray(scale).astype(np.float32).reshape(())
        return np.asarray(weight).astype(np.float32) * factor

    return LazyTensor(tuple(weight.shape), np.float32, read, source=where)
