"""Weight-only int8 quantization of a built model's linear layers, applied at load time.

``quantize_model(model, "int8")`` replaces the float ``weight`` of every ``layers.Linear`` in
``model`` by an int8 variable of the same name and shape plus a float32 ``weight_scale`` (one per
output channel), frees the float kernel, and gives the layer a call that dequantizes inside the
matmul. What a layer computes is the reference's ``x @ W + b`` with ``W`` replaced by its
dequantized value; the model files are untouched (quantization is how a model runs).

Loaders do better than quantizing a float model: ``builder(cls, mode, components)`` stands in for the
pipeline class, constructs it with unallocated variables, gives the chosen components' Linears int8
variables (the float weights never exist) and initialises the rest; ``load_state_dict`` then
quantizes each checkpoint tensor as it assigns it (``assign_float``). ``StableDiffusion.from_pretrained``
and ``StableDiffusion3.from_pretrained`` / ``from_single_file`` take ``quantize=`` and
``quantize_components=`` that way.

The quantization (symmetric, per output channel) is Keras' own
``keras.quantizers.abs_max_quantize`` on the float32 weight, the scheme Keras' ``Dense`` uses for
its int8 kernels::

    scale = 127 / (max_i |W[i, j]| + 1e-7)          # (out,), Keras' ``kernel_scale``
    q     = clip(round(W * scale), -127, 127)         # int8, (in, out)
    y     = (x @ cast(q, compute dtype)) / scale + b  # float16: x @ cast(q / scale) + b

Why not ``Dense.quantize("int8")`` itself: Keras quantizes only its own ``Dense`` /
``EinsumDense`` / ``Embedding`` (``type_check`` refuses other classes), names the kernel
``kernel`` where our checkpoint keys say ``weight``, and its default int8 mode also quantizes the
activations per token (a second, input-dependent error) where we want weights only.

Why ``(x @ q) / scale``: the weight is read once per call and cast (exactly: |q| <= 127), with no
float32 pass over it, and the division touches only the outputs; dequantizing the weight first
(``x @ (q / scale)``, three elementwise passes over every weight per call in graph mode) made an SDXL
step 2.6x slower than bfloat16 (benchmarks/README.md, "Quantized weights"). In float32 both forms
equal the reference to float rounding. Under float16 ``x @ q`` can overflow, so there the weight
is dequantized first.

The 1x1 convolutions and the VAE are left in float: they hold little of the weight memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from tf_diffusion import layers
from tf_diffusion.weights.state_dict import allocate_unassigned, set_variable, unallocated_variables

MODES = ("int8",)
# The components a pipeline quantizes by default: the denoiser backbone and the text encoders
# (T5-XXL most of all); never the VAE, whose few weights decide image detail.
DEFAULT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def check_mode(mode) -> str | None:
    """``mode`` if it is None or one of ``MODES``, else a ValueError naming the allowed ones."""
    if mode is None or (isinstance(mode, str) and mode in MODES):
        return mode
    raise ValueError(f"quantize={mode!r} is not a quantization mode; allowed: None or one of {MODES}")


def quantize_weight(weight) -> tuple[np.ndarray, np.ndarray]:
    """Keras' per-output-channel absmax int8 quantization of a (in, out) weight: (q int8, scale float32 (out,))."""
    w = np.asarray(keras.ops.convert_to_numpy(weight), dtype=np.float32)
    q, scale = keras.quantizers.abs_max_quantize(w, axis=0, to_numpy=True)
    return keras.ops.convert_to_numpy(q), keras.ops.convert_to_numpy(scale).reshape(-1)


def is_quantized(layer) -> bool:
    """Whether ``layer`` is a Linear whose weight was quantized by ``quantize_model``."""
    return "_quantization" in layer.__dict__


def _int8_linear(layer: layers.Linear, x):
    dtype = layer.compute_dtype
    if dtype == "float16":
        # x @ q can exceed float16's range: dequantize the weight (in float32) first.
        w = ops.divide(_cast_after(layer.weight, "float32", x), layer.weight_scale)
        y = ops.matmul(x, ops.cast(w, dtype))
    else:
        # One cast of the int8 weight (exact: |q| <= 127 fits bfloat16), the matmul, then each output
        # channel divided by its scale, as Keras' Dense does with its int8 kernel.
        y = ops.divide(
            ops.matmul(x, _cast_after(layer.weight, dtype, x)), ops.cast(layer.weight_scale, dtype)
        )
    return y if layer.bias is None else y + layer.bias


def _cast_after(weight, dtype, x):
    """``weight`` cast to ``dtype``, in a TensorFlow graph only once ``x`` exists.

    A cast that depends on nothing but a variable is ready at the start of a graph, and TensorFlow's
    executor runs ready ops early: every layer's float copy would be alive at once (an SDXL step
    peaked 5 GB above its int8 weights). Tied to the layer's input, each copy lives for one matmul.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.cast(weight, dtype)  # XLA (JAX) schedules for memory
    import tensorflow as tf

    with tf.control_dependencies([x]):
        return tf.cast(weight, dtype)


def assign_float(layer: layers.Linear, value) -> None:
    """Quantize a float (in, out) ``value`` into ``layer``'s int8 weight and scale (loading, LoRA-free)."""
    q, scale = quantize_weight(value)
    set_variable(layer.weight, q)  # a weight built unallocated (build, build_model) is created from q
    set_variable(layer.weight_scale, scale)


def materialize(model: keras.layers.Layer) -> keras.layers.Layer:
    """Allocate every variable of ``model`` still unallocated with its start value (int8 weights 0, scales 1).

    For a model from ``build_model`` used without loading (``load_state_dict`` does this itself).
    Returns ``model``.
    """
    allocate_unassigned(model.variables)
    return model


def quantize_linear(layer: layers.Linear, mode: str = "int8") -> None:
    """Replace ``layer``'s float weight by int8 values and per-channel scales; the float kernel is freed."""
    check_mode(mode)
    if is_quantized(layer):
        return
    if not isinstance(layer, layers.Linear):
        raise ValueError(f"quantize_linear takes a layers.Linear, got {type(layer).__name__}")
    _swap(layer, mode, *quantize_weight(layer.weight))


def _swap(layer: layers.Linear, mode: str, q=None, scale=None, allocate: bool = True) -> None:
    """Give ``layer`` an int8 ``weight`` and a float32 ``weight_scale`` (``q`` / ``scale``, else 0 / 1).

    ``allocate=False``: both are made unallocated; the first ``assign_float`` creates them from its
    values (``materialize`` gives the rest 0 / 1).
    """
    old = layer.weight
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        # Untracked and dropped without Layer.__delattr__, which runs gc.collect() per variable;
        # quantize_model collects once at the end.
        layer._untrack_variable(old)
        object.__delattr__(layer, "weight")
        del old
        shape = (layer.in_features, layer.out_features)
        with contextlib.nullcontext() if allocate else unallocated_variables():
            layer.weight = layer.add_weight(
                shape=shape, initializer="zeros", dtype="int8", trainable=False, name="weight"
            )
            # autocast=False: the scale stays float32 inside a mixed-precision call.
            layer.weight_scale = layer.add_weight(
                shape=shape[1:],
                initializer="ones",
                dtype="float32",
                trainable=False,
                autocast=False,
                name="weight_scale",
            )
        if q is not None:
            layer.weight.assign(q)
            layer.weight_scale.assign(scale)
    finally:
        if locked:
            tracker.lock()
    # Set on the instance, outside Keras' attribute tracking, as execution.apply sets processors.
    object.__setattr__(layer, "call", functools.partial(_int8_linear, layer))
    object.__setattr__(layer, "_quantization", mode)


def quantize_model(model: keras.layers.Layer, mode: str | None = "int8") -> keras.layers.Layer:
    """Quantize every ``layers.Linear`` of a built ``model`` in place (weight-only, per output channel).

    Idempotent; ``mode=None`` leaves the model as it is. Each layer's float kernel is freed as soon
    as its int8 copy exists, so the peak is the model plus one layer's float32 weight; but the process
    may keep the freed pages (measured: resident memory did not drop), so to save memory build the
    model with int8 weights instead (``build_model``, or the loaders' ``quantize=``).

    Args:
        model: a built component (UNetModel, MMDiT, CLIPTextEncoder, T5Encoder, ...).
        mode: "int8" or None.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: for a mode not in ``MODES``.

    Example:
        >>> quantize_model(sd.unet, "int8")
    """
    if check_mode(mode) is None:
        return model
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, layers.Linear):
            quantize_linear(layer, mode)
    return_freed_memory()
    return model


def check_components(pipeline, components: Sequence[str] | None) -> tuple[str, ...]:
    """The component names of ``pipeline`` to quantize: ``components`` checked, or the defaults it has."""
    if components is None:
        return tuple(n for n in DEFAULT_COMPONENTS if getattr(pipeline, n, None) is not None)
    if isinstance(components, str):
        components = (components,)
    names = tuple(components)
    allowed = [n for n in (*DEFAULT_COMPONENTS, "vae") if getattr(pipeline, n, None) is not None]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"quantize_components={list(names)} names {bad}; this model has {allowed}")
    return names


def quantize_pipeline(pipeline, mode: str | None, components: Sequence[str] | None = None):
    """Quantize a loaded pipeline's components (default: the denoiser and the text encoders) in place.

    Args:
        pipeline: a StableDiffusion or StableDiffusion3, before its first generate().
        mode: "int8" or None (nothing done).
        components: component attribute names; None: ``DEFAULT_COMPONENTS`` the pipeline has.

    Returns:
        ``pipeline``.

    Raises:
        ValueError: for a bad mode or a component the pipeline does not have.
    """
    if check_mode(mode) is None:
        return pipeline
    for name in check_components(pipeline, components):
        quantize_model(getattr(pipeline, name), mode)
    pipeline.quantization = (mode, check_components(pipeline, components))
    return pipeline


def _materialize(models, created, mode: str, allocate: bool = False) -> None:
    """Int8 weights and scales for every Linear of ``models``; every other new variable initialised.

    The int8 variables stay unallocated until loading assigns them (``assign_float``), unless
    ``allocate`` (zeros and unit scales now: a sharded build, whose layouts apply at creation).
    """
    dropped = set()
    for model in models:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, layers.Linear) and not is_quantized(layer):
                dropped.add(id(layer.weight))
                _swap(layer, mode, allocate=allocate)
    for variable in created:
        if id(variable) not in dropped and variable._value is None:
            variable._deferred_initialize()


def build_model(constructor, mode: str | None = "int8"):
    """``constructor()`` (a model) with every Linear weight int8 and never float.

    Load the weights with ``load_state_dict``, which quantizes each tensor as it assigns it; the int8
    variables are allocated then, from those values. A model used without loading needs
    ``materialize(model)`` first (zeros, unit scales). ``mode=None``: plain ``constructor()``.
    """
    if check_mode(mode) is None:
        return constructor()
    with unallocated_variables() as created:
        model = constructor()
    _materialize([model], created, mode)
    return model


def build(cls, mode: str | None, components: Sequence[str] | None, *args, **kwargs):
    """``cls(*args, **kwargs)`` (a pipeline) with the chosen components' Linear weights int8 from the start.

    For loaders: the pipeline is constructed with its variables left unallocated (Keras'
    ``StatelessScope(initialize_variables=False)``); then each chosen Linear gets unallocated int8 weight
    and scale variables in place of its float weight, which never exists, and every other variable is
    initialised.
    ``load_state_dict`` then quantizes each checkpoint tensor as it assigns it (``assign_float``), which
    allocates the int8 variable from it, so loading peaks near the quantized model's size plus one
    tensor, not the float model's.
    ``mode=None``: plain ``cls(*args, **kwargs)``.
    """
    if check_mode(mode) is None:
        return cls(*args, **kwargs)
    with unallocated_variables() as created:
        pipeline = cls(*args, **kwargs)
    names = check_components(pipeline, components)
    _materialize([getattr(pipeline, name) for name in names], created, mode)
    pipeline.quantization = (mode, names)
    return pipeline


def builder(cls, mode: str | None, components: Sequence[str] | None = None):
    """What a loader calls in place of ``cls``: ``cls`` itself for ``mode=None``, else ``build`` bound to it."""
    if check_mode(mode) is None:
        return cls
    return functools.partial(build, cls, mode, components)


def check_unquantized(model, what: str) -> None:
    """ValueError if any Linear of ``model`` is quantized: ``what`` needs the float weights."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if is_quantized(layer):
            raise ValueError(
                f"{what} needs float weights, but {type(model).__name__} was quantized to "
                f"{layer._quantization} (quantize=); load the model without quantize= to use it"
            )


def return_freed_memory() -> None:
    """Collect, and hand freed heap back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


__all__ = [
    "DEFAULT_COMPONENTS",
    "MODES",
    "assign_float",
    "build",
    "build_model",
    "materialize",
    "builder",
    "check_components",
    "check_mode",
    "check_unquantized",
    "is_quantized",
    "quantize_linear",
    "quantize_model",
    "quantize_pipeline",
    "quantize_weight",
    "return_freed_memory",
]
