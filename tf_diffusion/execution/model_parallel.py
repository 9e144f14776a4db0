"""Model parallelism under JAX: Flux's (and SD3's) big kernels sharded over a 2-D device mesh.

A ``keras.distribution.DeviceMesh`` with axes ("batch", "model") holds the devices. The Linear kernels
of the double and single blocks are split over the "model" axis in the Megatron way: the input-side
projections by output columns (``img_attn.qkv`` / ``txt_attn.qkv``, ``img_mlp.0`` / ``txt_mlp.0``,
``linear1``, and the modulation ``lin`` layers, which in Flux.1 hold a quarter of the weights), the
output-side ones by input rows (``img_attn.proj`` / ``txt_attn.proj``, ``img_mlp.2`` / ``txt_mlp.2``,
``linear2``); every other variable (embedders, norms, the final layer) is replicated, and the batch is
split over the "batch" axis. ``jax.jit`` then partitions the program (GSPMD): it inserts the
all-gathers and reductions the layouts need, so the sharded model computes what the single-device one
computes, up to the order of float sums. SD3's MMDiT is split the same way (``MMDIT_STREAM``:
``adaLN_modulation.1``, ``attn.qkv`` / ``attn2.qkv``, ``mlp.fc1`` by columns; ``attn.proj`` /
``attn2.proj``, ``mlp.fc2`` by rows). The fused ``qkv`` / ``linear1`` outputs are split into their
parts after the matmul, which makes XLA move some activations between devices; a per-head permutation
of the columns would avoid that, but would change the weights' layout away from the checkpoint's.

What lives here is only how the model is placed: the model files are unchanged. The layout map is
keyed by the variables' ``path`` (Keras' auto-generated ``linear_12/weight``), found by walking the
model's attribute paths (the checkpoint keys), so it is built from a model that exists; ``build_sharded``
constructs the model with unallocated variables first, so each kernel is created already sharded and
never whole on one device, and later assignments (``load_state_dict``) keep the layout.

TensorFlow: not supported. Keras 3's ``keras.distribution`` is implemented for JAX only: its
TensorFlow ``distribution_lib`` is a prototype marked "DO NOT USE" whose ``distribute_value`` does
nothing, and Keras 3's TensorFlow variables never read a layout. DTensor's Keras integration was for
Keras 2 (``tf_keras``) layers, not Keras 3 variables; ``tf.distribute`` strategies replicate variables
(data parallelism, ``tf_diffusion.distributed``) rather than shard them.

Example (JAX, 8 devices)::

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    model, distribution = build_sharded(lambda: FluxTransformer(cfg), mesh)
    load_state_dict(model, tensors)             # each tensor lands on its shards
    run = sharded_call(model, distribution)
    v = run(img, img_ids, txt, txt_ids, sigmas, pooled)
"""

from __future__ import annotations

import re
from collections.abc import Callable

import keras
import numpy as np

from tf_diffusion import layers
from tf_diffusion.weights.state_dict import unallocated_variables

BATCH_AXIS, MODEL_AXIS = "batch", "model"
COLUMN, ROW = "column", "row"

# Attribute paths inside one block -> how its Linear is split over the model axis.
FLUX_DOUBLE_BLOCK = {
    "img_mod.lin": COLUMN,
    "txt_mod.lin": COLUMN,
    "img_attn.qkv": COLUMN,
    "txt_attn.qkv": COLUMN,
    "img_attn.proj": ROW,
    "txt_attn.proj": ROW,
    "img_mlp.0": COLUMN,
    "txt_mlp.0": COLUMN,
    "img_mlp.2": ROW,
    "txt_mlp.2": ROW,
}
FLUX_SINGLE_BLOCK = {"modulation.lin": COLUMN, "linear1": COLUMN, "linear2": ROW}
# SD3's joint blocks: both streams alike; a stream lacks what it does not have (the last context
# stream's ``attn.proj`` and ``mlp``, ``attn2`` outside SD3.5's dual-attention blocks).
MMDIT_STREAM = {
    "adaLN_modulation.1": COLUMN,
    "attn.qkv": COLUMN,
    "attn.proj": ROW,
    "attn2.qkv": COLUMN,
    "attn2.proj": ROW,
    "mlp.fc1": COLUMN,
    "mlp.fc2": ROW,
}
MMDIT_JOINT_BLOCK = {
    f"{stream}.{k}": v for stream in ("context_block", "x_block") for k, v in MMDIT_STREAM.items()
}


def _require_jax() -> None:
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"model parallelism needs the JAX backend (KERAS_BACKEND=jax); this is {keras.backend.backend()!r}: "
            "Keras 3's keras.distribution is implemented for JAX only"
        )


def _resolve(obj, path: str):
    """The layer at a dotted attribute path (list indices as numbers, as the checkpoint keys), or None."""
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def sharded_linears(model) -> dict[str, tuple[layers.Linear, str]]:
    """Checkpoint key of each split Linear of a ``FluxTransformer`` or an ``MMDiT`` -> (layer, COLUMN or ROW).

    Raises:
        ValueError: for any other model.
    """
    from tf_diffusion.flux import FluxTransformer
    from tf_diffusion.mmdit import MMDiT

    if isinstance(model, FluxTransformer):
        groups = (("double_blocks", FLUX_DOUBLE_BLOCK), ("single_blocks", FLUX_SINGLE_BLOCK))
    elif isinstance(model, MMDiT):
        groups = (("joint_blocks", MMDIT_JOINT_BLOCK),)
    else:
        raise ValueError(f"expected a flux.FluxTransformer or an mmdit.MMDiT, got {type(model).__name__}")
    found = {}
    for group, rules in groups:
        for i in range(len(getattr(model, group))):
            for inner, kind in rules.items():
                key = f"{group}.{i}.{inner}"
                linear = _resolve(model, key)
                if linear is not None:
                    found[key] = (linear, kind)
    return found


def _check_mesh(device_mesh) -> int:
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(f"device_mesh must be a keras.distribution.DeviceMesh, got {device_mesh!r}")
    names = tuple(device_mesh.axis_names)
    if names != (BATCH_AXIS, MODEL_AXIS):
        raise ValueError(f"the device mesh's axes must be {(BATCH_AXIS, MODEL_AXIS)}, got {names}")
    return int(device_mesh.shape[1])


def layout_map(model, device_mesh) -> keras.distribution.LayoutMap:
    """A LayoutMap placing a built ``FluxTransformer``'s or ``MMDiT``'s variables on a ("batch", "model") mesh.

    Column-split Linears: weight ``(None, "model")``, bias ``("model",)``; row-split: weight
    ``("model", None)``, bias replicated (it is added once, after the partial sums are reduced). Keys
    are the variables' exact paths (escaped); anything not listed is replicated.

    Args:
        model: the built transformer (its variables may be unallocated: only paths and shapes are read).
        device_mesh: a ``keras.distribution.DeviceMesh`` with axis names ("batch", "model").

    Returns:
        the ``keras.distribution.LayoutMap``.

    Raises:
        ValueError: for another model, a mesh with other axes, or a split width the model axis
            does not divide (the error names the layer and its width).
    """
    parts = _check_mesh(device_mesh)
    layouts = keras.distribution.LayoutMap(device_mesh)
    for key, (linear, kind) in sharded_linears(model).items():
        width = linear.out_features if kind == COLUMN else linear.in_features
        if width % parts:
            raise ValueError(
                f"{key} is split by {'output' if kind == COLUMN else 'input'} features ({width}), which the "
                f"model axis of size {parts} does not divide; pick a mesh whose model axis divides it"
            )
        spec = (None, MODEL_AXIS) if kind == COLUMN else (MODEL_AXIS, None)
        layouts[re.escape(linear.weight.path)] = spec
        per_output = (MODEL_AXIS,) if kind == COLUMN else (None,)
        if linear.bias is not None:
            layouts[re.escape(linear.bias.path)] = per_output
        # An int8 weight's per-output scale (execution.quantize) follows the output columns. It is
        # made by the same layer as the weight, so its path is the weight's with the scale's name;
        # listed whether or not it exists yet, so that build_sharded can create it sharded.
        scale_path = linear.weight.path.rsplit("/", 1)[0] + "/weight_scale"
        layouts[re.escape(scale_path)] = per_output
    return layouts


def model_parallel(model, device_mesh) -> keras.distribution.ModelParallel:
    """``keras.distribution.ModelParallel`` of ``layout_map``, the batch split over the "batch" axis.

    Raises:
        ValueError: as ``layout_map``, or on a backend other than JAX.
    """
    _require_jax()
    return keras.distribution.ModelParallel(
        layout_map=layout_map(model, device_mesh), batch_dim_name=BATCH_AXIS
    )


def build_sharded(constructor: Callable[[], keras.layers.Layer], device_mesh, quantize: str | None = None):
    """``constructor()`` (a ``FluxTransformer`` or an ``MMDiT``) with every variable created on its shards.

    The model is constructed with unallocated variables (only paths and shapes), its layout map made,
    and each variable then initialised under the ``ModelParallel`` scope, so a sharded kernel exists
    only as its shards. Load the weights afterwards (``load_state_dict``): assignments keep the layout.

    Args:
        constructor: makes the model, e.g. ``lambda: FluxTransformer(config)``.
        device_mesh: a ``keras.distribution.DeviceMesh`` with axes ("batch", "model").
        quantize: "int8": every Linear gets int8 weights and float32 scales instead of float weights
            (``execution.quantize.build_model``), created sharded as the float ones would be; None: float.

    Returns:
        (model, distribution): the model and its ``keras.distribution.ModelParallel``.

    Raises:
        ValueError: as ``model_parallel``, or for a ``quantize`` mode that does not exist.
    """
    from tf_diffusion.execution import quantize as quantizing

    _require_jax()
    quantizing.check_mode(quantize)
    with unallocated_variables() as created:
        model = constructor()
    distribution = model_parallel(model, device_mesh)
    with distribution.scope():
        if quantize is not None:
            quantizing._materialize([model], created, quantize, allocate=True)
        else:
            for variable in created:
                if variable._value is None:
                    variable._deferred_initialize()
    return model, distribution


def shard_model(model, distribution: keras.distribution.ModelParallel):
    """Move the variables of an existing ``model`` onto the layouts of ``distribution``, in place.

    For a model built and loaded without ``build_sharded`` (each sharded kernel exists whole once, on
    its current device, until it is moved). Returns ``model``.
    """
    _require_jax()
    for variable in model.variables:
        layout = distribution.get_variable_layout(variable)
        # The layout stays on the variable: later assignments are placed the same way (Keras' JAX
        # variables distribute every assigned value by it).
        variable._layout = layout
        variable._direct_assign(variable.value)
    return model


def build_sharded_pipeline(cls, device_mesh, quantize: str | None, components, *args, **kwargs):
    """``cls(*args, **kwargs)`` (a pipeline with a ``transformer``) whose transformer is created on its shards.

    What a loader calls in place of ``cls`` (bind the first four arguments): the pipeline is constructed
    with unallocated variables, the transformer's layout map made from it, and the transformer's
    variables initialised under the ``ModelParallel`` scope (each split kernel only ever as its shards);
    every other component's variables are initialised as usual, on the default device. ``quantize``
    ("int8") gives the chosen ``components`` (``execution.quantize.check_components``: default the
    transformer and the text encoders) int8 weights from the start, the transformer's created sharded.
    The pipeline keeps the distribution as ``model_parallel``.

    Raises:
        ValueError: for a pipeline without a transformer, and as ``model_parallel`` and
            ``execution.quantize.check_components``.
    """
    from tf_diffusion.execution import quantize as quantizing

    _require_jax()
    quantizing.check_mode(quantize)
    with unallocated_variables() as created:
        pipeline = cls(*args, **kwargs)
    transformer = getattr(pipeline, "transformer", None)
    if transformer is None:
        raise ValueError(
            "model parallelism shards a transformer backbone (Flux, SD3); this model has none "
            "(a UNet model runs data-parallel: keras.distribution.DataParallel)"
        )
    distribution = model_parallel(transformer, device_mesh)
    names = quantizing.check_components(pipeline, components) if quantize is not None else ()
    own = {id(v) for v in transformer.variables}
    sharded = [v for v in created if id(v) in own]
    rest = [v for v in created if id(v) not in own]
    with distribution.scope():
        if "transformer" in names:
            quantizing._materialize([transformer], sharded, quantize, allocate=True)
        else:
            for variable in sharded:
                if variable._value is None:
                    variable._deferred_initialize()
    others = [getattr(pipeline, n) for n in names if n != "transformer"]
    if others:
        quantizing._materialize(others, rest, quantize, allocate=True)
    else:
        for variable in rest:
            if variable._value is None:
                variable._deferred_initialize()
    if quantize is not None:
        pipeline.quantization = (quantize, names)
    pipeline.model_parallel = distribution
    return pipeline


# Arguments shared by the whole batch when they are 2-D: Flux's (L, 3) position ids.
SHARED_ARGUMENTS = ("img_ids", "txt_ids")


def sharded_call(model, distribution: keras.distribution.ModelParallel) -> Callable:
    """A jitted call of ``model`` over the mesh, its batch split over the "batch" axis.

    The returned function takes the model's own arguments (``FluxTransformer``: ``img, img_ids,
    txt, txt_ids, timesteps, y, guidance=None``; ``MMDiT``: ``latents, timesteps, context, pooled,
    skip_layers=()``) and returns a NumPy array. Array arguments are batch-major and placed with the
    distribution's data layout, except 2-D position ids (``SHARED_ARGUMENTS``), which are
    replicated; other values (``skip_layers``) are fixed at trace time, one compiled program each.
    The variables are passed in as arguments (``stateless_call``), not captured as constants, so
    the compiled program reads them where they lie.

    Raises:
        ValueError: when a batch-major argument's batch is not divisible by the "batch" axis size.
    """
    import inspect

    import jax

    _require_jax()
    batch_parts = int(distribution.device_mesh.shape[0])
    mesh = distribution.device_mesh
    signature = inspect.signature(model.call)
    compiled: dict = {}

    def place(name, value):
        value = np.asarray(value)
        if (name in SHARED_ARGUMENTS and value.ndim == 2) or value.ndim == 0:
            layout = keras.distribution.TensorLayout([None] * value.ndim, mesh)
        else:
            if value.shape[0] % batch_parts:
                raise ValueError(
                    f"{name} has a batch of {value.shape[0]}, which does not split over the mesh's batch "
                    f"axis of size {batch_parts}; use a batch divisible by it"
                )
            layout = distribution.get_data_layout(value.shape)
        return keras.distribution.distribute_tensor(value, layout)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        arrays = {k: place(k, v) for k, v in bound.items() if isinstance(v, (np.ndarray, jax.Array))}
        # Lists (skip_layers=[3]) as tuples, so that the values can key the compiled programs.
        static = tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in bound.items() if k not in arrays
        )
        if static not in compiled:

            def run(trainable, non_trainable, arrays, static=static):
                out, _ = model.stateless_call(trainable, non_trainable, **arrays, **dict(static))
                return out

            compiled[static] = jax.jit(run)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return np.asarray(compiled[static](trainable, non_trainable, arrays))

    return call


__all__ = [
    "BATCH_AXIS",
    "COLUMN",
    "FLUX_DOUBLE_BLOCK",
    "FLUX_SINGLE_BLOCK",
    "MODEL_AXIS",
    "ROW",
    "SHARED_ARGUMENTS",
    "build_sharded",
    "build_sharded_pipeline",
    "layout_map",
    "sharded_linears",
    "MMDIT_JOINT_BLOCK",
    "MMDIT_STREAM",
    "model_parallel",
    "shard_model",
    "sharded_call",
]
