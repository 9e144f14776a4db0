"""Checkpoint readers and the key walker."""

from tf_diffusion.weights.state_dict import (
    StateDictError,
    count_parameters,
    load_state_dict,
    manifest,
    named_parameters,
    state_dict,
)

__all__ = [
    "StateDictError",
    "count_parameters",
    "load_state_dict",
    "manifest",
    "named_parameters",
    "state_dict",
]
