"""The one generic walker between Keras models and PyTorch-layout state dicts.

A model's attribute paths equal the original checkpoint keys
(``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``), so loading is
a walk over attributes plus one layout transform per variable kind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import keras
import numpy as np

from tf_diffusion.layers import CONV, LINEAR, PLAIN


class StateDictError(ValueError):
    """A state dict does not fit a model; lists every missing, unexpected and mis-shaped key."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), model_name="model", invalid=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.invalid = list(invalid)
        lines = [f"state dict does not fit {model_name}:"]

        def block(title, items):
            if items:
                shown = items[:20]
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in shown)
                if len(items) > len(shown):
                    lines.append(f"    ... and {len(items) - len(shown)} more")

        block("entries that are not (string key, tensor) pairs", self.invalid)
        block("missing keys", self.missing)
        block("unexpected keys", self.unexpected)
        block(
            "keys with the wrong shape",
            [
                f"{k}: checkpoint {tuple(got)}, model expects {tuple(want)}"
                for k, got, want in self.mismatched
            ],
        )
        super().__init__("\n".join(lines))


def _children(obj):
    """(name, value) pairs of a layer's public attributes that can hold weights."""
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (keras.layers.Layer, keras.Variable, list, tuple)):
            yield name, value


def named_parameters(
    model: keras.layers.Layer, prefix: str = ""
) -> dict[str, tuple[keras.layers.Layer, str]]:
    """Map every checkpoint key of ``model`` to the (layer, attribute) that holds it.

    Lists are walked with their indices, as nn.Sequential / nn.ModuleList are.
    """
    found: dict[str, tuple[keras.layers.Layer, str]] = {}

    def walk(obj, path):
        if isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                # Indices follow nn.Sequential / nn.ModuleList; non-layer items hold no weights.
                if isinstance(item, (keras.layers.Layer, list, tuple)):
                    walk(item, f"{path}{i}.")
            return
        layout = getattr(type(obj), "LAYOUT", {})
        for name, value in _children(obj):
            if isinstance(value, keras.Variable):
                if name in layout:
                    found[f"{path}{name}"] = (obj, name)
            else:
                walk(value, f"{path}{name}.")

    walk(model, prefix)
    return found


def torch_shape(layer: keras.layers.Layer, attr: str) -> tuple[int, ...]:
    """The shape the variable has in a PyTorch checkpoint."""
    shape = tuple(getattr(layer, attr).shape)
    kind = type(layer).LAYOUT[attr]
    if kind == LINEAR:
        return shape[::-1]
    if kind == CONV:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return shape


def to_keras_layout(kind: str, array: np.ndarray) -> np.ndarray:
    """Reorder a torch-layout tensor into our variable layout (the one layout transform)."""
    if kind == LINEAR:
        return array.T
    if kind == CONV:
        return np.transpose(array, (2, 3, 1, 0))
    if kind == PLAIN:
        return array
    raise ValueError(f"unknown layout kind {kind!r}; expected one of plain, linear, conv")


def to_torch_layout(kind: str, array: np.ndarray) -> np.ndarray:
    """Inverse of ``to_keras_layout``."""
    if kind == LINEAR:
        return array.T
    if kind == CONV:
        return np.transpose(array, (3, 2, 0, 1))
    if kind == PLAIN:
        return array
    raise ValueError(f"unknown layout kind {kind!r}; expected one of plain, linear, conv")


def state_dict(model: keras.layers.Layer) -> dict[str, np.ndarray]:
    """Every weight of ``model`` as a torch-layout numpy array, keyed like the checkpoint."""
    return {
        key: to_torch_layout(type(layer).LAYOUT[attr], keras.ops.convert_to_numpy(getattr(layer, attr)))
        for key, (layer, attr) in named_parameters(model).items()
    }


def manifest(model: keras.layers.Layer) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys and their torch shapes, without reading any values."""
    return {key: torch_shape(layer, attr) for key, (layer, attr) in named_parameters(model).items()}


def load_state_dict(
    model: keras.layers.Layer,
    tensors: Mapping[str, np.ndarray],
    *,
    strict: bool = True,
) -> None:
    """Assign torch-layout arrays to ``model`` by checkpoint key.

    Every key and shape is checked before anything is assigned, so a failed
    load leaves the model as it was. Keys the model lists in
    ``IGNORED_CHECKPOINT_KEYS`` (buffers such as ``position_ids``) are skipped.

    Args:
        model: a tf_diffusion component (CLIPTextEncoder, UNetModel, AutoencoderKL).
        tensors: checkpoint key -> array in the reference (PyTorch) layout.
            Values may be anything ``np.asarray`` accepts, read lazily.
        strict: when False, missing and unexpected keys are allowed (shapes
            are still checked).

    Raises:
        StateDictError: listing every missing, unexpected and mis-shaped key, and every entry
            whose key is not a string or whose value is not a tensor (has no int shape).
    """
    if not isinstance(tensors, Mapping):
        raise ValueError(
            f"tensors must be a mapping of checkpoint key -> array, got {type(tensors).__name__}"
        )
    params = named_parameters(model)
    ignored = set(getattr(model, "IGNORED_CHECKPOINT_KEYS", ()))
    invalid = [_describe_invalid(k, v) for k, v in tensors.items() if not _is_entry(k, v)]
    if invalid:
        raise StateDictError(invalid=invalid, model_name=type(model).__name__)
    keys = [k for k in tensors if k not in ignored]
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in keys if k not in params]
    mismatched = []
    for key in keys:
        if key in params:
            want = torch_shape(*params[key])
            got = tuple(tensors[key].shape)
            if got != want:
                mismatched.append((key, got, want))
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictError(missing, unexpected, mismatched, model_name=type(model).__name__)
    for key in keys:
        if key not in params:
            continue
        layer, attr = params[key]
        variable = getattr(layer, attr)
        value = to_keras_layout(type(layer).LAYOUT[attr], np.asarray(tensors[key]))
        if attr == "weight" and "_quantization" in layer.__dict__:
            # An int8 weight (execution.quantize) takes the checkpoint's value quantized.
            from tf_diffusion.execution.quantize import assign_float

            assign_float(layer, value)
            continue
        set_variable(variable, value.astype(keras.backend.standardize_dtype(variable.dtype)))
    # Variables built unallocated (unallocated_variables, execution.quantize.build) that this load did
    # not assign (a partial load, int8 weights a checkpoint lacks) get their start values.
    allocate_unassigned(model.variables)


def set_variable(variable, value) -> None:
    """``variable.assign(value)``; a variable built unallocated is created from ``value`` instead.

    Assigning into a variable that already holds its start values left about a fifth of the weights'
    size resident after a whole model was loaded (benchmarks/README.md, Flux section); creating each
    variable from its checkpoint tensor does not.
    """
    if variable._value is None:
        variable._initialize(value)
        variable._initializer = None
    else:
        variable.assign(value)


@contextlib.contextmanager
def unallocated_variables():
    """Variables created inside are not allocated (Keras' deferred initialisation); yields a list of them.

    ``load_state_dict`` creates each from its tensor; ``allocate_unassigned`` gives the rest their
    start values. Used by the loaders, whose models are filled from a checkpoint at once.
    """
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key, [], set_to_default=True))
    created = []
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield created
    finally:
        created.extend(global_state.get_global_attribute(key, [])[len(before) :])
        # Keras would allocate every listed variable at the next StatelessScope; these are ours now.
        global_state.set_global_attribute(key, before)


def allocate_unassigned(variables) -> None:
    """Allocate, with their initialisers' values, those of ``variables`` that are still unallocated."""
    for variable in variables:
        if variable._value is None:
            variable._deferred_initialize()


def _is_entry(key, value) -> bool:
    """A string key and a value with a shape of non-negative ints (array, LazyTensor, tf tensor)."""
    if not isinstance(key, str):
        return False
    try:
        shape = tuple(value.shape)
    except Exception:  # no shape, or one that is not a sequence: not a tensor
        return False
    return all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def _describe_invalid(key, value) -> str:
    shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
    if not isinstance(key, str):
        return f"{shown}: key of type {type(key).__name__}, not a string"
    return f"{shown}: a {type(value).__name__}, not a tensor"


def count_parameters(model: keras.layers.Layer) -> int:
    """Number of scalar weights, counted from shapes (exact Python ints: no overflow)."""
    return sum(math.prod(torch_shape(*p)) for p in named_parameters(model).values())


def build_abstract(build):
    """Call ``build()`` so that the Keras models it creates get shapes but no allocated weights.

    Variables made inside ``keras.StatelessScope(initialize_variables=False)`` stay
    uninitialised, but Keras also lists them globally and the next ordinary
    StatelessScope would allocate all of them (gigabytes for full-size models).
    This removes them from that list, so the models are only good for shapes
    (``manifest``, ``count_parameters``), never for computing.
    """
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key, [], set_to_default=True))
    with keras.StatelessScope(initialize_variables=False):
        result = build()
    global_state.set_global_attribute(key, before)
    return result
