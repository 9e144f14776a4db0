"""IP-Adapter as an adapter: image tokens through a decoupled cross-attention beside the text's.

``sd.load_ip_adapter(path, image_encoder=...)`` builds an ``IPAdapter`` per file (its ``image_proj``
model and the ``to_k_ip`` / ``to_v_ip`` layers, named as the published files: ``ip_adapter.1``,
``ip_adapter.3``, ... are the UNet's cross-attention layers in diffusers' attention-processor order:
the down blocks, then the up blocks, then the middle block, ``attn1`` / ``attn2`` alternating) and
gives each cross-attention layer of the UNet a processor, as diffusers swaps in
``IPAdapterAttnProcessor2_0``: the text attention plus, per adapter,
``scale * attention(q, to_k_ip(tokens), to_v_ip(tokens))``, before ``to_out``.

``generate(ip_adapter_image=...)`` encodes the pictures once (``prepare``): the image tokens are the
``Conditioning`` extras ``ip_tokens_<k>`` (B, tokens, D) of the conditional and unconditional bundles
(the unconditional ones from zero image embeds for the base adapters and from a zero image for the
"plus" ones, as diffusers' ``encode_image``), and each adapter's scale is the extra ``ip_scale``
(B, K): data, so another scale or picture compiles nothing new. ``IPAdapterDenoiser`` binds them for
the processors while the wrapped denoiser runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from tf_diffusion.denoising.conditioning import Conditioning
from tf_diffusion.ip_adapter import Resampler, infer_image_proj
from tf_diffusion.layers import Linear, attention, dtype_policy_scope, run_sequential

TOKENS = "ip_tokens_{}"
SCALE = "ip_scale"

# The image tokens and scales the processors read while an IPAdapterDenoiser runs its base.
_BOUND: contextvars.ContextVar = contextvars.ContextVar("ip_adapter_inputs", default=None)


class IPAttention(keras.layers.Layer):
    """``ip_adapter.<n>``: the image tokens' key and value projections of one cross-attention layer."""

    def __init__(self, context_dim: int, inner_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.to_k_ip = Linear(context_dim, inner_dim, bias=False)
        self.to_v_ip = Linear(context_dim, inner_dim, bias=False)
        self.built = True


class IPAdapter(keras.Model):
    """One IP-Adapter file: ``image_proj`` and ``ip_adapter.<2i+1>`` for cross-attention layer i.

    Args:
        image_proj: an ``ImageProjModel`` (base) or ``Resampler`` ("plus").
        widths: (inner width, context width) of each cross-attention layer, in diffusers' order.
    """

    def __init__(self, image_proj, widths: Sequence[tuple[int, int]], **kwargs):
        super().__init__(**kwargs)
        self.image_proj = image_proj
        # Even indices are the self-attention layers, which carry no weights: placeholders keep
        # the cross-attention layers at the published odd numbers.
        self.ip_adapter = [
            None if i % 2 == 0 else IPAttention(widths[i // 2][1], widths[i // 2][0])
            for i in range(2 * len(widths))
        ]
        self.built = True

    @property
    def plus(self) -> bool:
        """Whether it reads the image encoder's penultimate hidden states (a Resampler)."""
        return isinstance(self.image_proj, Resampler)

    @property
    def num_tokens(self) -> int:
        c = self.image_proj.config
        return c.num_queries if self.plus else c.num_tokens

    @property
    def encoder_width(self) -> int:
        """The width it reads: the encoder's projection (base) or hidden size ("plus")."""
        c = self.image_proj.config
        return c.embed_dim if self.plus else c.image_embed_dim

    @property
    def context_dim(self) -> int:
        c = self.image_proj.config
        return c.output_dim if self.plus else c.cross_attention_dim

    def layer(self, i: int) -> IPAttention:
        return self.ip_adapter[2 * i + 1]


def cross_attention_layers(unet) -> list:
    """The UNet's cross-attention layers (``attn2``) in diffusers' attention-processor order."""
    from tf_diffusion.unet import SpatialTransformer

    out = []
    for section in (unet.input_blocks, unet.output_blocks, [unet.middle_block]):
        for block in section:
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    out.extend(b.attn2 for b in layer.transformer_blocks)
    return out


def _ip_call(layer, entries, previous, x, context=None):
    """diffusers' IPAdapterAttnProcessor2_0 on one cross-attention layer (``entries``: (k, IPAttention))."""
    bound = _BOUND.get()
    if bound is None or context is None:
        return previous(x, context)
    tokens, scales = bound
    q = layer.to_q(x)
    out = attention(q, layer.to_k(context), layer.to_v(context), layer.heads)
    for k, ip in entries:
        t = ops.cast(tokens[k], q.dtype)
        image = attention(q, ip.to_k_ip(t), ip.to_v_ip(t), layer.heads)
        out = out + image * ops.cast(scales[:, k], image.dtype)[:, None, None]
    return run_sequential(layer.to_out, out)


def attach(unet, adapters: Sequence[IPAdapter]) -> None:
    """Give every cross-attention layer of ``unet`` the processor of ``adapters`` (replacing any)."""
    detach(unet)
    for i, layer in enumerate(cross_attention_layers(unet)):
        previous = layer.__dict__.get("call", functools.partial(type(layer).call, layer))
        entries = tuple((k, a.layer(i)) for k, a in enumerate(adapters))
        object.__setattr__(layer, "_ip_adapter_previous", previous)
        # Set on the instance, as execution.apply sets its processors (outside Keras' tracking, so
        # the adapter's weights never become the UNet's).
        object.__setattr__(layer, "call", functools.partial(_ip_call, layer, entries, previous))


def detach(unet) -> None:
    """Give the cross-attention layers back the processors they had before ``attach``."""
    for layer in cross_attention_layers(unet):
        previous = layer.__dict__.pop("_ip_adapter_previous", None)
        if previous is not None:
            object.__setattr__(layer, "call", previous)


def has_ip_adapter(layer) -> bool:
    """Whether an attention layer runs an IP-Adapter processor (execution's fast paths defer to it)."""
    return "_ip_adapter_previous" in layer.__dict__


class IPAdapterDenoiser:
    """A denoiser that binds the image tokens and scales for the UNet's IP-Adapter processors.

    Reads ``cond.extras["ip_tokens_<k>"]`` (B, T_k, D) and ``cond.extras["ip_scale"]`` (B, K) and
    passes every other leaf to the wrapped denoiser.
    """

    def __init__(self, base, adapters: Sequence[IPAdapter]):
        self.base, self.adapters = base, tuple(adapters)
        self.known_extras = (
            *base.known_extras,
            SCALE,
            *(TOKENS.format(k) for k in range(len(self.adapters))),
        )

    @property
    def backbone(self):
        return self.base.backbone

    @property
    def unet(self):
        return self.base.unet

    @property
    def key(self):
        return ("ip_adapter", self.base.key, tuple(id(a) for a in self.adapters))

    def __call__(self, x, t, cond: Conditioning, **kwargs):
        extras = dict(cond.extras)
        if SCALE not in extras:
            raise ValueError(
                f"the IP-Adapter denoiser needs conditioning {SCALE!r} (B, {len(self.adapters)})"
            )
        scales = ops.cast(extras.pop(SCALE), "float32")
        tokens = [extras.pop(TOKENS.format(k)) for k in range(len(self.adapters))]
        token = _BOUND.set((tokens, scales))
        try:
            return self.base(x, t, Conditioning(cond.context, extras), **kwargs)
        finally:
            _BOUND.reset(token)


# ---------------------------------------------------------------- loading


def build_adapter(parts: dict, unet, where: str = "IP-Adapter") -> IPAdapter:
    """An ``IPAdapter`` for ``unet`` from a file's parts (``weights.ip_adapter.read_ip_adapter``).

    Raises:
        ValueError: an adapter for another model family (token width, layer count or widths).
    """
    from tf_diffusion.weights import load_state_dict

    # Built under the UNet's policy (Keras does not pass a model's dtype on to its sublayers).
    with dtype_policy_scope(unet.dtype_policy):
        proj = infer_image_proj(parts["image_proj"])
    layers = cross_attention_layers(unet)
    context_dim = unet.config.context_dim
    width = proj.config.output_dim if isinstance(proj, Resampler) else proj.config.cross_attention_dim
    if width != context_dim:
        raise ValueError(
            f"{where} is for another model family: its image tokens are {width} wide, this UNet's "
            f"cross-attention takes {context_dim} (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)"
        )
    numbers = sorted({int(k.split(".")[0]) for k in parts["ip_adapter"]})
    expected = [2 * i + 1 for i in range(len(layers))]
    if numbers != expected:
        raise ValueError(
            f"{where} has ip_adapter layers {numbers[:4]}{'...' if len(numbers) > 4 else ''} ({len(numbers)}); "
            f"this UNet has {len(layers)} cross-attention layers (1, 3, ..., {2 * len(layers) - 1}): "
            "an adapter for another model"
        )
    widths = [(layer.to_k.out_features, layer.to_k.in_features) for layer in layers]
    for i, (inner, ctx) in enumerate(widths):
        got = tuple(parts["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"].shape)
        if got != (inner, ctx):
            raise ValueError(
                f"{where}: ip_adapter.{2 * i + 1}.to_k_ip.weight is {got}; this UNet's cross-attention "
                f"layer {i} needs {(inner, ctx)}: an adapter for another model"
            )
    with dtype_policy_scope(unet.dtype_policy):
        adapter = IPAdapter(proj, widths, dtype=unet.dtype_policy)
    tensors = {f"image_proj.{k}": v for k, v in parts["image_proj"].items()}
    tensors.update({f"ip_adapter.{k}": v for k, v in parts["ip_adapter"].items()})
    load_state_dict(adapter, tensors)
    return adapter


def check_encoder(encoder, adapter: IPAdapter, where: str) -> None:
    """The image encoder must give the width the adapter's projection reads."""
    cfg = encoder.config
    given, what = (cfg.hidden_size, "hidden size") if adapter.plus else (cfg.projection_dim, "projection_dim")
    if given != adapter.encoder_width:
        kind = "penultimate hidden states" if adapter.plus else "image_embeds"
        raise ValueError(
            f"{where} reads {adapter.encoder_width}-wide {kind}, but the image encoder's {what} is {given} "
            "(ViT-H/14: projection 1024, hidden 1280; ViT-bigG/14: projection 1280, hidden 1664); "
            "pass the image encoder the adapter was trained with"
        )


def load_ip_adapter(sd, path, image_encoder=None) -> None:
    """Load one IP-Adapter file or a list of them (several at once), replacing any loaded before.

    Args:
        sd: the StableDiffusion model.
        path: an IP-Adapter file (``.bin`` or ``.safetensors``, the published layout) or a list.
        image_encoder: a transformers ``CLIPVisionModelWithProjection`` folder or a
            ``CLIPVisionEncoder``; default the one already loaded, else ``image_encoder`` beside
            the (first) file.

    Raises:
        FileNotFoundError: a missing file or image encoder folder.
        ValueError: a file that is not an IP-Adapter, one for another model family, or an image
            encoder whose width does not match.
    """
    from tf_diffusion.clip_vision import CLIPVisionEncoder
    from tf_diffusion.weights.ip_adapter import load_image_encoder, read_ip_adapter

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not paths:
        raise ValueError("path is an empty list; give an IP-Adapter file or a list of them")
    adapters = []
    for p in paths:
        adapter = build_adapter(read_ip_adapter(p), sd.unet, f"IP-Adapter {pathlib.Path(p).name!r}")
        adapter.source = str(p)
        adapters.append(adapter)
    if isinstance(image_encoder, CLIPVisionEncoder):
        encoder = image_encoder
    elif image_encoder is not None:
        encoder = load_image_encoder(image_encoder)
    elif getattr(sd, "image_encoder", None) is not None:
        encoder = sd.image_encoder
    else:
        beside = pathlib.Path(paths[0]).parent / "image_encoder"
        if not beside.is_dir():
            raise FileNotFoundError(
                f"no image encoder for the IP-Adapter: pass image_encoder=... (a transformers "
                f"CLIPVisionModelWithProjection folder); none loaded and no {str(beside)!r}"
            )
        encoder = load_image_encoder(beside)
    for p, adapter in zip(paths, adapters, strict=True):
        check_encoder(encoder, adapter, f"IP-Adapter {pathlib.Path(p).name!r}")
    attach(sd.unet, adapters)
    sd.image_encoder = encoder
    sd.ip_adapters = tuple(adapters)
    sd.ip_adapter_scale = (1.0,) * len(adapters)  # diffusers' default after loading


def unload_ip_adapter(sd) -> None:
    """Remove the IP-Adapters and their image encoder; the UNet computes as before."""
    detach(sd.unet)
    sd.ip_adapters = ()
    sd.ip_adapter_scale = ()
    sd.image_encoder = None


def check_scales(scale, count: int) -> tuple:
    """A number for every adapter, or a list with one per adapter (one entry serves all)."""
    if isinstance(scale, dict) or (
        isinstance(scale, (list, tuple)) and any(isinstance(s, dict) for s in scale)
    ):
        raise ValueError("per-block IP-Adapter scales (dicts) are not supported; give a number per adapter")
    values = list(scale) if isinstance(scale, (list, tuple)) else [scale]
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(
            f"ip_adapter_scale has {len(values)} entries but {count} IP-Adapters are loaded; "
            "give one number, or one per adapter"
        )
    for v in values:
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not np.isfinite(v)
        ):
            raise ValueError(f"ip_adapter_scale={scale!r} must be a finite number or a list of them")
    return tuple(float(v) for v in values)


def set_ip_adapter_scale(sd, scale) -> None:
    """Each adapter's scale (a number for all, or one per adapter), as diffusers' method."""
    adapters = getattr(sd, "ip_adapters", ())
    if not adapters:
        raise ValueError("no IP-Adapter is loaded; call load_ip_adapter(path) first")
    sd.ip_adapter_scale = check_scales(scale, len(adapters))


# ---------------------------------------------------------------- generate()


@dataclasses.dataclass(frozen=True)
class IPAdapterPlan:
    """The checked IP-Adapter arguments of one ``generate()`` call: the tokens and scales."""

    adapters: tuple
    cond_tokens: tuple  # per adapter (N, T_k, D)
    uncond_tokens: tuple
    scales: tuple
    module: str = "ip-adapter_clip"

    def extras(self, rows: int, uncond: bool = False) -> dict:
        tokens = self.uncond_tokens if uncond else self.cond_tokens
        out = {TOKENS.format(k): t for k, t in enumerate(tokens)}
        out[SCALE] = np.tile(np.asarray(self.scales, np.float32)[None], (rows, 1))  # (N, K)
        return out

    def denoiser(self, base) -> IPAdapterDenoiser:
        return IPAdapterDenoiser(base, self.adapters)

    def infotext(self, first: int = 0) -> dict[str, str]:
        """PNG parameters: each adapter a ``ControlNet N`` unit (numbered from ``first``, after any
        ControlNets), as the web UI's ControlNet extension records IP-Adapter: the module
        ``ip-adapter_clip_h`` / ``ip-adapter_clip_g`` by the image encoder, the file as the model."""
        from tf_diffusion.adapters.controlnet import model_title
        from tf_diffusion.infotext import controlnet_unit_text

        return {
            # The extension lists adapter files as it lists ControlNets: ``stem [short hash]``.
            f"ControlNet {first + k}": controlnet_unit_text(
                {"Module": self.module, "Model": model_title(adapter), "Weight": scale}
            )
            for k, (adapter, scale) in enumerate(zip(self.adapters, self.scales, strict=True))
        }


def _encode(encoder, adapter: IPAdapter, pixels: np.ndarray, executor=None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, unconditional tokens) (1, n * T, D) for n prepared pictures, as diffusers encodes them."""
    if adapter.plus:
        features = ops.convert_to_numpy(encoder(pixels, output="penultimate"))
        blank = ops.convert_to_numpy(encoder(np.zeros_like(pixels), output="penultimate"))
    else:
        features = ops.convert_to_numpy(encoder(pixels))
        blank = np.zeros_like(features)
    tokens = ops.convert_to_numpy(ops.cast(adapter.image_proj(features), "float32"))  # (n, T, D)
    blank_tokens = ops.convert_to_numpy(ops.cast(adapter.image_proj(blank), "float32"))
    n, t, d = tokens.shape
    # diffusers projects (B, n, ...) image embeds per picture and attends to all n * T tokens.
    return tokens.reshape(1, n * t, d).astype(np.float32), blank_tokens.reshape(1, n * t, d).astype(
        np.float32
    )


def prepare(sd, image, scale, *, rows: int) -> IPAdapterPlan | None:
    """Check ``generate()``'s IP-Adapter arguments and encode the pictures; None without an image.

    ``image``: for one adapter a picture or a list of pictures (their tokens side by side, as
    diffusers attends to all of them); for several, a list with one entry (a picture or a list) per
    adapter.

    Raises:
        ValueError: an image without a loaded adapter, an adapter loaded and no image, a list of
            another length than the adapters, or a bad scale.
    """
    from tf_diffusion.clip_vision import image_inputs

    adapters = tuple(getattr(sd, "ip_adapters", ()) or ())
    if image is None:
        if scale is not None:
            raise ValueError("ip_adapter_scale needs ip_adapter_image=...")
        if adapters:
            raise ValueError(
                f"{len(adapters)} IP-Adapter(s) are loaded: pass ip_adapter_image=... (as diffusers needs), "
                "or call unload_ip_adapter() first"
            )
        return None
    if not adapters:
        raise ValueError("ip_adapter_image needs an IP-Adapter: call sd.load_ip_adapter(path) first")
    if len(adapters) == 1:
        groups = [image]
    else:
        if not isinstance(image, (list, tuple)) or len(image) != len(adapters):
            got = len(image) if isinstance(image, (list, tuple)) else "not a list"
            raise ValueError(
                f"ip_adapter_image must be a list with one entry (a picture or a list of them) per "
                f"IP-Adapter ({len(adapters)}), got {got}"
            )
        groups = list(image)
    scales = check_scales(sd.ip_adapter_scale if scale is None else scale, len(adapters))
    encoder = sd.image_encoder
    cond, uncond = [], []
    for adapter, group in zip(adapters, groups, strict=True):
        pixels = image_inputs(group, size=encoder.config.image_size)
        tokens, blank = _encode(encoder, adapter, pixels)
        cond.append(np.repeat(tokens, rows, axis=0))
        uncond.append(np.repeat(blank, rows, axis=0))
    # The ControlNet extension's preprocessor names: clip_h for ViT-H/14, clip_g for ViT-bigG/14.
    module = {1280: "ip-adapter_clip_h", 1664: "ip-adapter_clip_g"}.get(
        encoder.config.hidden_size, "ip-adapter_clip"
    )
    return IPAdapterPlan(adapters, tuple(cond), tuple(uncond), scales, module)


@contextlib.contextmanager
def bound(tokens, scales):
    """The IP-Adapter inputs bound for direct UNet calls: ``with bound([tokens], scales): unet(...)``."""
    token = _BOUND.set((list(tokens), ops.convert_to_tensor(np.asarray(scales, np.float32))))
    try:
        yield
    finally:
        _BOUND.reset(token)


__all__ = [
    "IPAdapter",
    "IPAdapterDenoiser",
    "IPAdapterPlan",
    "IPAttention",
    "attach",
    "bound",
    "build_adapter",
    "cross_attention_layers",
    "detach",
    "load_ip_adapter",
    "prepare",
    "set_ip_adapter_scale",
    "unload_ip_adapter",
]
