"""Faster ways to run a built model's blocks on TensorFlow's CPU, applied by block type.

``apply(model)`` gives each layer of a known class a processor (as diffusers swaps attention
processors): the processor reads the execution options at trace time and either runs the
layer's own ``call`` (the reference computation) or an equivalent faster form:

- XLA islands ("islands"): the model is traced in graph mode and each UNet block's dense work
  is its own XLA cluster, with the self-attention core in graph mode between them, a
  cache-sized block of heads and rows at a time, and the rest of a transformer block in token
  blocks;
- Winograd 3x3 convolutions and sub-pixel 2x upsamplings where XLA compiles on a CPU;
- a ResBlock's two convolutions as graph-mode matmuls between three islands, their filters
  optionally transformed once per call (``prepare``);
- JAX's fused attention kernel on a GPU (``ExecutionOptions.attention``).

Every choice between forms is made by measurement on this machine (``autotune``) or forced by
``ExecutionOptions.choose``; benchmarks/README.md has the measurements behind each form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import keras
from keras import ops

from tf_diffusion import layers, unet, vae
from tf_diffusion.execution import autotune, lean
from tf_diffusion.execution.kernels import (
    WINOGRAD_TILES,
    conv3x3_filter,
    conv3x3_operand,
    conv3x3_result,
    fused_attention,
    head_attention,
    merge_heads,
    split_blocks,
    split_heads,
    subpixel_conv3x3,
    winograd_conv3x3,
    winograd_tile_of_filter,
)
from tf_diffusion.execution.options import ExecutionOptions, _scope, current, in_xla, options, prepared_state

# Winograd's transformed input tiles take (m+2)^2 / m^2 times the input's memory; candidates
# whose operand would exceed this many bytes are not tried (the VAE decoder's largest levels).
WINOGRAD_MAX_OPERAND_BYTES = 2**28


def _tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def _float32(*dtypes) -> bool:
    return all(keras.backend.standardize_dtype(d) == "float32" for d in dtypes)


def islands_active() -> bool:
    """Whether blocks are compiled as XLA islands now ("islands" on TensorFlow, outside an island)."""
    return current().compile == "islands" and _tensorflow() and not in_xla()


# ------------------------------------------------------------------ islands


def island(owner, name: str, fn: Callable) -> Callable:
    """``fn`` as its own XLA-compiled function (one per ``owner``, ``name`` and options) under
    "islands", else ``fn`` itself.

    ``fn`` must take every tensor it uses as an argument (it is traced once per input signature
    and reused); closing over ``owner``'s layers is fine.
    """
    if not islands_active():
        return fn
    import tensorflow as tf

    opts = current()
    # Kept on the owner (outside Keras' attribute tracking), so the functions go with the model;
    # keyed by the options too, so a trace under other options never reuses them.
    per_owner = owner.__dict__.get("_xla_islands")
    if per_owner is None:
        per_owner = {}
        object.__setattr__(owner, "_xla_islands", per_owner)
    if (name, opts) not in per_owner:

        def compiled(*args):
            with _scope(opts=opts, in_xla=True):
                return fn(*args)

        per_owner[(name, opts)] = tf.function(compiled, jit_compile=True, autograph=False)
    return per_owner[(name, opts)]


def island_names(layer, opts: ExecutionOptions | None = None) -> set:
    """The names of the islands built for ``layer`` under ``opts`` (None: under any options)."""
    return {name for name, o in layer.__dict__.get("_xla_islands") or {} if opts is None or o == opts}


# ---------------------------------------------------------------- choices


def _decide(op: str, key: tuple, names: list, build: Callable[[str], Callable]) -> str:
    """One of ``names`` for (op, key): forced by ``choose``, measured, or the first (conservative)."""
    opts = current()
    if opts.choose is not None:
        winner = opts.choose(op, key, tuple(names))
        if winner not in names:
            raise ValueError(f"ExecutionOptions.choose returned {winner!r} for {op} {key}; allowed: {names}")
        return winner
    if len(names) == 1:
        return names[0]
    enabled = opts.autotune if opts.autotune is not None else autotune.enabled_by_env()
    if not enabled:
        return names[0]
    tuner = autotune.tuner()
    remembered = tuner.cached(op, key)
    if remembered in names:
        return remembered
    import tensorflow as tf

    # Measured eagerly, also when met in the middle of a trace.
    with tf.init_scope(), _scope(in_xla=False):
        return tuner.choose(op, key, [(name, functools.partial(build, name)) for name in names])


def _random(shape, scale=1.0):
    import tensorflow as tf

    return tf.random.stateless_normal(shape, seed=(0, 0)) * scale


def conv_tile(conv: layers.Conv2d, shape) -> int:
    """The Winograd tile (2 or 4) a 3x3 'same' convolution of an input of ``shape`` takes now,
    else 0 (direct): only with ``winograd`` on, in float32, where XLA compiles on TensorFlow."""
    if not (current().winograd and in_xla() and _tensorflow()):
        return 0
    if tuple(conv.weight.shape[:2]) != (3, 3) or conv.stride != 1 or conv.padding != (1, 1, 1, 1):
        return 0
    b, h, w, cin = shape
    if h is None or w is None or not _float32(conv.compute_dtype):
        return 0
    cout = conv.weight.shape[3]
    names = ["direct"]
    for m in WINOGRAD_TILES:
        operand = (m + 2) ** 2 * (b or 1) * (h // m) * (w // m) * max(cin, cout) * 4
        if h % m == 0 and w % m == 0 and operand <= WINOGRAD_MAX_OPERAND_BYTES:
            names.append(f"f{m}")

    def build(name):
        import tensorflow as tf

        x, weight = _random((b or 1, h, w, cin)), _random((3, 3, cin, cout), 1 / math.sqrt(9 * cin))
        if name == "direct":
            fn = tf.function(lambda x, w: ops.conv(x, w, padding="same"), jit_compile=True, autograph=False)
        else:
            fn = tf.function(
                functools.partial(winograd_conv3x3, m=int(name[1:])), jit_compile=True, autograph=False
            )
        return lambda: fn(x, weight).numpy()

    winner = _decide("conv3x3", (b, h, w, cin, cout, "float32"), names, build)
    return 0 if winner == "direct" else int(winner[1:])


def _subpixel(conv: layers.Conv2d, x, size) -> bool:
    """Whether nearest 2x upsampling of ``x`` then ``conv`` runs in sub-pixel form now."""
    if not (current().winograd and in_xla() and _tensorflow()):
        return False
    b, h, w, cin = x.shape
    if h is None or w is None or not _float32(x.dtype, conv.compute_dtype):
        return False
    if size is not None and tuple(size) != (2 * h, 2 * w):
        return False
    cout = conv.weight.shape[3]

    def build(name):
        import tensorflow as tf

        x, weight = _random((b or 1, h, w, cin)), _random((3, 3, cin, cout), 1 / math.sqrt(9 * cin))
        if name == "nearest":
            fn = tf.function(
                lambda x, w: ops.conv(layers.upsample_nearest(x), w, padding="same"),
                jit_compile=True,
                autograph=False,
            )
        else:
            fn = tf.function(subpixel_conv3x3, jit_compile=True, autograph=False)
        return lambda: fn(x, weight).numpy()

    return _decide("upsample_conv3x3", (b, h, w, cin, cout, "float32"), ["nearest", "subpixel"], build) == (
        "subpixel"
    )


def resblock_plan(block: unet.ResBlock, shape) -> tuple[str, int | None]:
    """How a ResBlock runs on an input of ``shape`` now: ("island", None), or ("graph", m) /
    ("prepared", m) for its convolutions' matmuls in graph mode, m the Winograd tile (0: im2col)."""
    opts = current()
    if not (islands_active() and opts.graph_matmuls):
        return "island", None
    b, h, w, cin = shape
    conv1, conv2 = block.in_layers[2], block.out_layers[3]
    if None in (b, h, w) or not _float32(conv1.compute_dtype, conv2.compute_dtype):
        return "island", None
    cout = conv2.weight.shape[2]
    with _scope(in_xla=True):  # the convolutions would otherwise run inside an island
        m = conv_tile(conv1, shape)
        if conv_tile(conv2, (b, h, w, cout)) != m:
            return "island", None
    # An im2col filter (m = 0) is the weight reshaped: nothing to prepare.
    names = ["island", "graph"] + (["prepared"] if opts.prepared_filters and m else [])
    emb_dim = block.emb_layers[1].weight.shape[0]

    def build(name):
        import tensorflow as tf

        x, emb = _random(shape), _random((b, emb_dim))
        filters = (conv3x3_filter(conv1.weight, m), conv3x3_filter(conv2.weight, m))
        if name == "island":
            fn = tf.function(
                lambda x, emb, f: island(block, "call", _reference(block))(x, emb), autograph=False
            )
        else:
            fn = tf.function(
                lambda x, emb, f: _resblock_split(block, x, emb, m, f if name == "prepared" else None),
                autograph=False,
            )
        traced = functools.partial(fn, x, emb, filters)
        return lambda: traced().numpy()

    return _decide("resblock", (b, h, w, cin, cout, emb_dim, m, "float32"), names, build), m


# ---------------------------------------------------------------- processors


def _class_call(layer, *args, **kwargs):
    return type(layer).call(layer, *args, **kwargs)


def _reference(layer) -> Callable:
    """``layer``'s own call (its class's, looked up at each call), bypassing its processor."""
    return functools.partial(_class_call, layer)


def _conv2d(layer: layers.Conv2d, call, x):
    m = conv_tile(layer, tuple(x.shape)) if _float32(x.dtype) else 0
    if m:
        return winograd_conv3x3(x, layer.weight, m) + layer.bias
    return call(x)


def _resblock(block: unet.ResBlock, call, x, emb):
    if not islands_active():
        return call(x, emb)
    variant, m = resblock_plan(block, tuple(x.shape))
    if variant == "island":
        return island(block, "call", call)(x, emb)
    return _resblock_split(block, x, emb, m, _prepared_filters(block, m) if variant == "prepared" else None)


def _resblock_split(block, x, emb, m: int, filters=None):
    """A ResBlock as three islands with its convolutions' matmuls in graph mode between them."""
    conv1, conv2 = block.in_layers[2], block.out_layers[3]
    if filters is None:
        filters = conv3x3_filter(conv1.weight, m), conv3x3_filter(conv2.weight, m)
    size = tuple(x.shape[1:3])
    key = f"{m}_{size[0]}x{size[1]}"  # the islands close over m and the size

    def first(x):
        return conv3x3_operand(layers.run_sequential(block.in_layers[:2], x), m)

    def middle(h, emb):
        h = conv3x3_result(h, m, size) + conv1.bias
        h = h + layers.run_sequential(block.emb_layers, emb)[:, None, None, :]
        return conv3x3_operand(layers.run_sequential(block.out_layers[:3], h), m)

    def last(h, x):
        h = conv3x3_result(h, m, size) + conv2.bias
        return h + (x if block.skip_connection is None else block.skip_connection(x))

    h = ops.matmul(island(block, "in_" + key, first)(x), filters[0])
    h = ops.matmul(island(block, "mid_" + key, middle)(h, emb), filters[1])
    return island(block, "out_" + key, last)(h, x)


def filter_key(conv: layers.Conv2d) -> str:
    """The key of ``conv``'s transformed filter in ``prepare``'s state."""
    return f"conv_{id(conv)}"


def _prepared_filters(block, m: int):
    """The block's two filters from the bound ``prepare`` state if they were transformed for tile m."""
    state = prepared_state() or {}
    f1, f2 = (state.get(filter_key(conv)) for conv in (block.in_layers[2], block.out_layers[3]))
    if f1 is None or f2 is None or winograd_tile_of_filter(f1) != m:
        return None
    return f1, f2


def _transformer_block(block: unet.BasicTransformerBlock, call, x, context):
    # A cross-attention with an IP-Adapter processor (adapters.ip_adapter) runs as its processor says.
    if not islands_active() or "_ip_adapter_previous" in block.attn2.__dict__:
        return call(x, context)
    opts = current()
    attn1 = block.attn1

    def heads(x):  # scaled queries (B*h, N, d), transposed keys (B*h, d, N), values (B*h, N, d)
        h = block.norm1(x)
        q, k, v = (split_heads(proj(h), attn1.heads) for proj in (attn1.to_q, attn1.to_k, attn1.to_v))
        return q * (1.0 / math.sqrt(q.shape[-1])), ops.transpose(k, (0, 2, 1)), v

    def rest(x, o, context, kv):
        x = x + layers.run_sequential(attn1.to_out, o)
        attn2 = block.attn2
        k, v = kv
        x = x + layers.run_sequential(
            attn2.to_out, layers.attention(attn2.to_q(block.norm2(x)), k, v, attn2.heads)
        )
        return x + block.ff(block.norm3(x))

    def post(x, o, context):
        # Everything after the self-attention core is per token: in token blocks the
        # feed-forward's hidden activations stay in the cache.
        kv = block.attn2.to_k(context), block.attn2.to_v(context)
        tokens = opts.post_attention_tokens
        if x.shape[1] is None or tokens is None or x.shape[1] <= tokens:
            return rest(x, merge_heads(o, attn1.heads), context, kv)
        parts = [
            rest(x_part, merge_heads(o_part, attn1.heads), context, kv)
            for x_part, o_part in zip(split_blocks(x, tokens, 1), split_blocks(o, tokens, 1), strict=True)
        ]
        return ops.concatenate(parts, axis=1)

    q, k_t, v = island(block, "pre", heads)(x)
    o = head_attention(q, k_t, v, opts.head_attention_elements)
    return island(block, "post", post)(x, o, context)


def _spatial_transformer(block: unet.SpatialTransformer, call, x, context):
    if not islands_active():
        return call(x, context)

    def project_in(x):  # (B, H, W, C) -> (B, H*W, C)
        b, h, w, c = ops.shape(x)
        return ops.reshape(block.proj_in(block.norm(x)), (b, h * w, c))

    def project_out(x, y):
        return x + block.proj_out(ops.reshape(y, ops.shape(x)))

    y = island(block, "in", project_in)(x)
    for layer in block.transformer_blocks:
        y = layer(y, context)
    return island(block, "out", project_out)(x, y)


def _downsample(layer: unet.Downsample, call, x):
    return island(layer, "call", call)(x)


def _unet_upsample(layer: unet.Upsample, call, x, size=None):
    def forward(x, size):
        if _subpixel(layer.conv, x, size):
            return subpixel_conv3x3(x, layer.conv.weight) + layer.conv.bias
        return call(x, size)

    return island(layer, "call", forward)(x, size)


def _vae_upsample(layer: vae.Upsample, call, x):
    if _subpixel(layer.conv, x, None):
        return subpixel_conv3x3(x, layer.conv.weight) + layer.conv.bias
    return call(x)


def _cross_attention(layer: unet.CrossAttention, call, x, context=None):
    mode = current().attention
    if mode == "off" or keras.backend.backend() != "jax":
        return call(x, context)
    source = x if context is None else context
    q, k, v = layer.to_q(x), layer.to_k(source), layer.to_v(source)
    out = fused_attention(q, k, v, layer.heads, mode)
    if out is None:
        out = layers.attention(q, k, v, layer.heads)
    return layers.run_sequential(layer.to_out, out)


def _vae_attention(layer: vae.AttnBlock, call, x):
    mode = current().attention
    if mode == "off" or keras.backend.backend() != "jax":
        return call(x)
    shape = ops.shape(x)
    h = layer.norm(x)

    def tokens(t):  # (B, H, W, C) -> (B, H*W, C)
        return ops.reshape(t, (shape[0], -1, shape[3]))

    q, k, v = tokens(layer.q(h)), tokens(layer.k(h)), tokens(layer.v(h))
    out = fused_attention(q, k, v, 1, mode)
    if out is None:
        out = layers.attention(q, k, v, 1)
    return x + layer.proj_out(ops.reshape(out, shape))


def _vae_resblock(block: vae.ResnetBlock, call, x):
    rows = None if in_xla() or not _tensorflow() else lean.norm_rows(tuple(x.shape))
    if rows is None:
        return call(x)
    h = block.conv1(lean.group_norm_silu(block.norm1, x, rows, block.conv1.compute_dtype))
    h = block.conv2(lean.group_norm_silu(block.norm2, h, lean.norm_rows(tuple(h.shape)) or rows, h.dtype))
    if block.nin_shortcut is not None:
        x = block.nin_shortcut(x)
    return x + h


def _vae_decoder(decoder: vae.Decoder, call, z):
    if in_xla() or not _tensorflow():
        return call(z)
    x = decoder.mid(decoder.conv_in(z))
    for level in reversed(decoder.up):
        x = level(x)
    rows = lean.norm_rows(tuple(x.shape))
    if rows is None:
        return decoder.conv_out(ops.silu(decoder.norm_out(x)))
    return decoder.conv_out(lean.group_norm_silu(decoder.norm_out, x, rows, decoder.conv_out.compute_dtype))


# Processors by layer class: processor(layer, reference_call, *args, **kwargs).
PROCESSORS: dict[type, Callable] = {
    layers.Conv2d: _conv2d,
    unet.ResBlock: _resblock,
    unet.BasicTransformerBlock: _transformer_block,
    unet.SpatialTransformer: _spatial_transformer,
    unet.Downsample: _downsample,
    unet.Upsample: _unet_upsample,
    unet.CrossAttention: _cross_attention,
    vae.Upsample: _vae_upsample,
    vae.AttnBlock: _vae_attention,
    vae.ResnetBlock: _vae_resblock,
    vae.Decoder: _vae_decoder,
}


def apply(model: keras.layers.Layer) -> keras.layers.Layer:
    """Give every layer of ``model`` whose class has a processor (``PROCESSORS``) that processor.

    Idempotent. Outside an ``execution.options`` context that asks for a fast path every
    processor runs the layer's own ``call``, so the model computes as before (eagerly, in
    training, in an export).

    Returns:
        ``model``, for chaining.
    """
    for layer in model._flatten_layers(include_self=True, recursive=True):
        processor = PROCESSORS.get(type(layer))
        if processor is None or layer.__dict__.get("_execution_processor") is processor:
            continue
        # Set on the instance, outside Keras' attribute tracking: Layer.__call__ calls self.call.
        object.__setattr__(layer, "call", functools.partial(processor, layer, _reference(layer)))
        object.__setattr__(layer, "_execution_processor", processor)
    return model


def resblock_input_sizes(model: unet.UNetModel, height: int, width: int) -> list:
    """(ResBlock, (h, w)) for every ResBlock of a call on height x width latents, in call order."""
    sizes, skips = [], []
    h, w = height, width
    for block in model.input_blocks:
        for layer in block:
            if isinstance(layer, unet.ResBlock):
                sizes.append((layer, (h, w)))
            elif isinstance(layer, unet.Downsample):
                h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, padding 1
        skips.append((h, w))
    sizes += [(layer, (h, w)) for layer in model.middle_block if isinstance(layer, unet.ResBlock)]
    for block in model.output_blocks:
        skips.pop()
        for layer in block:
            if isinstance(layer, unet.ResBlock):
                sizes.append((layer, (h, w)))
            elif isinstance(layer, unet.Upsample):
                h, w = skips[-1] if skips else (2 * h, 2 * w)
    return sizes


def prepare(model, model_input_shape, opts: ExecutionOptions) -> dict:
    """What a call of ``model`` on inputs of ``model_input_shape`` needs computed once: the
    transformed filters of the UNet's ResBlocks that run as "prepared" (``resblock_plan``).

    Args:
        model: a UNetModel (other models need nothing: an empty state).
        model_input_shape: (B, H, W, C) of the UNet's input, the guidance batch included.
        opts: the options the call is traced under.

    Returns:
        A dict of tensors (possibly empty) for the compiled function's ``execution_state``.
    """
    apply(model)
    if not isinstance(model, unet.UNetModel) or opts.compile != "islands" or not opts.prepared_filters:
        return {}
    if not _tensorflow():
        return {}
    b, height, width = model_input_shape[:3]
    filters = {}
    with options(opts):
        for block, (h, w) in resblock_input_sizes(model, height, width):
            conv1, conv2 = block.in_layers[2], block.out_layers[3]
            variant, m = resblock_plan(block, (b, h, w, conv1.weight.shape[2]))
            if variant == "prepared":
                for conv in (conv1, conv2):
                    filters[filter_key(conv)] = conv3x3_filter(conv.weight, m)
    return filters


__all__ = [
    "PROCESSORS",
    "apply",
    "conv_tile",
    "filter_key",
    "island",
    "island_names",
    "islands_active",
    "prepare",
    "resblock_input_sizes",
    "resblock_plan",
]
