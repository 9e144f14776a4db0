"""Trainable LoRA layers on a built pipeline, and saving them as kohya / A1111 and diffusers / PEFT files.

``LoraNetwork.attach(sd, ...)`` adds a low-rank update to chosen ``Linear`` / ``Conv2d`` layers of the UNet
and the text encoder(s) of a built ``StableDiffusion``: each wrapped layer computes
``base(x) + alpha / rank * up(down(x))``, with ``down`` drawn as peft and kohya draw it (kaiming-uniform
with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and ``up`` zero, so the model starts as it was. The
base kernels are not touched (train only ``network.trainable_variables``); model files are not changed:
the wrapper is set on the layer instance, outside Keras' attribute tracking, around whatever call the
layer had (its own or an execution processor), as ``execution.apply`` sets processors. ``detach()``
restores the previous calls. Attaching and detaching drop the pipeline's compiled loops (they hold the
calls they traced), so ``generate()`` during training samples with the LoRA and after ``detach()`` without.

A conv layer's ``down`` is a convolution with the layer's kernel size, stride and padding and ``up`` a 1x1
convolution (kohya's LoCon layout); a 1x1 conv (SD 1.x's ``proj_in`` / ``proj_out``) is a matmul over
channels.

Target modules are matched on names as peft matches ``target_modules``: a layer is wrapped when one of
its names equals a target or ends with ``.`` + target. A layer's names are our path (the original
checkpoint key) and, in the UNet, its diffusers path, so ``to_q``, ``to_out.0``, ``ff.net.2``,
``proj_in`` and diffusers' ``conv1`` all work. Defaults: the attention projections, as diffusers'
``train_text_to_image_lora.py`` (UNet ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and its DreamBooth
script (text encoder ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) choose; ``KOHYA_UNET_TARGETS`` and
``KOHYA_TEXT_TARGETS`` are kohya's ``networks.lora`` defaults (every linear and 1x1 conv in the
transformer blocks; CLIP attention and MLP).

Saving (``save_lora``):

- ``format="kohya"``: sd-scripts' names, which A1111 and diffusers read: ``lora_unet_`` + the module path
  with ``.`` -> ``_`` (the diffusers path for SD 1.x / 2.x, the original path for SDXL, as sd-scripts
  writes each), ``lora_te_`` (SDXL: ``lora_te1_`` / ``lora_te2_``) + the transformers path; tensors
  ``.lora_down.weight``, ``.lora_up.weight`` (torch layout) and a scalar ``.alpha``; metadata
  ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version`` (``sd_v1``,
  ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``), ``modelspec.*``, ``ss_v2``, ``ss_output_name`` and the caller's extra
  ``ss_*`` fields (learning rates, steps, resolution), as sd-scripts writes them, and
  ``sshs_model_hash`` (the SHA-256 of the tensor bytes, what A1111's ``Lora hashes`` read).
- ``format="diffusers"``: ``save_lora_weights``' names (``unet.<diffusers path>.lora_A.weight`` /
  ``lora_B.weight``, ``text_encoder.``, ``text_encoder_2.``), with each component's peft ``LoraConfig``
  (``r``, ``lora_alpha``, ``target_modules``, ...) in the ``lora_adapter_metadata`` header, where
  diffusers keeps alpha.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from tf_diffusion.adapters.lora import _text_names, _unet_names
from tf_diffusion.layers import CONV, LINEAR, Conv2d, Linear
from tf_diffusion.weights.state_dict import named_parameters

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
KOHYA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
KOHYA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SAVE_FORMATS = ("kohya", "diffusers")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA_SDXL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@dataclass
class LoraLayer:
    """One wrapped layer: its component, our path, the file names it is saved under, its factors.

    ``down`` and ``up`` are Keras-layout variables: a linear layer's (in, r) and (r, out); a conv's
    (kh, kw, in, r) and (1, 1, r, out).
    """

    component: str
    path: str
    diffusers_name: str
    layer: keras.layers.Layer
    down: keras.Variable
    up: keras.Variable
    scale: float
    previous_call: object = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    def delta(self, x):
        """scale * up(down(x)) in x's dtype."""
        down = ops.cast(self.down, x.dtype)
        up = ops.cast(self.up, x.dtype)
        if isinstance(self.layer, Linear):
            h = ops.matmul(x, down)
        elif tuple(down.shape[:2]) == (1, 1) and self.layer.stride == 1 and not any(self.layer.padding):
            h = ops.matmul(x, ops.reshape(down, down.shape[2:]))  # a 1x1 conv is a matmul over channels
        else:
            h = _conv_like(self.layer, x, down)
        out = ops.matmul(h, ops.reshape(up, up.shape[-2:]))
        return out * ops.cast(self.scale, x.dtype)

    def torch_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(down, up) in torch layout: (r, in) / (out, r) for linear, (r, in, kh, kw) / (out, r, 1, 1) for conv."""
        down = np.asarray(keras.ops.convert_to_numpy(self.down), np.float32)
        up = np.asarray(keras.ops.convert_to_numpy(self.up), np.float32)
        if isinstance(self.layer, Linear):
            return down.T, up.T
        return np.transpose(down, (3, 2, 0, 1)), np.transpose(up, (3, 2, 0, 1))


def _conv_like(layer: Conv2d, x, kernel):
    """A convolution with ``layer``'s stride and explicit padding and another kernel."""
    top, bottom, left, right = layer.padding
    if any(layer.padding):
        x = ops.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    return ops.conv(x, kernel, strides=layer.stride, padding="valid")


def _matches(names: Sequence[str], targets: Sequence[str]) -> bool:
    return any(n == t or n.endswith("." + t) for n in names for t in targets)


def _candidates(sd, component: str) -> dict[str, tuple[keras.layers.Layer, list[str], str]]:
    """our path -> (layer, every name it answers to, its diffusers / transformers name) for one component."""
    model = getattr(sd, component)
    if component == "unet":
        aliases = _unet_names(model, sd.config.unet)
    else:
        aliases = _text_names(model)
    names: dict[str, list[str]] = {}
    for name, path in aliases.items():
        names.setdefault(path, []).append(name)
    out = {}
    for key, (layer, attr) in named_parameters(model).items():
        if attr != "weight" or type(layer).LAYOUT.get(attr) not in (LINEAR, CONV):
            continue
        if not isinstance(layer, (Linear, Conv2d)):
            continue
        path = key[: -len(".weight")]
        all_names = names.get(path, [path])
        if component == "unet":
            others = [n for n in all_names if n != path]
            diffusers = others[0] if len(others) == 1 else path
        else:
            diffusers = path  # transformers' path: our keys are those
        out[path] = (layer, all_names, diffusers)
    return out


class LoraNetwork:
    """Trainable LoRA factors attached to a built pipeline's layers (see the module docstring).

    Attributes:
        layers: the wrapped layers, UNet first, each component in path order.
        rank, alpha: the network's rank and alpha (scale alpha / rank).
        targets: component -> the target module names used.
    """

    def __init__(self, sd, layers: list[LoraLayer], rank: int, alpha: float, targets: dict):
        self.sd = sd
        self.layers = layers
        self.rank, self.alpha = rank, alpha
        self.targets = targets
        self._attached = False

    @classmethod
    def attach(
        cls,
        sd,
        rank: int = 4,
        alpha: float | None = None,
        *,
        unet_targets: Sequence[str] | None = DEFAULT_UNET_TARGETS,
        text_encoder_targets: Sequence[str] | None = None,
        seed: int = 0,
    ) -> LoraNetwork:
        """Wrap the target layers of ``sd`` with fresh LoRA factors (down random, up zero).

        Build it inside ``strategy.scope()`` to train under a ``tf.distribute`` strategy.

        Args:
            sd: a built ``StableDiffusion``.
            rank: the LoRA rank r (>= 1).
            alpha: the LoRA alpha; None: alpha = rank (scale 1), peft's and kohya's default.
            unet_targets: module names in the UNet (see the module docstring); None or () trains no UNet LoRA.
            text_encoder_targets: module names in the text encoder(s) (both for SDXL); None: none.
            seed: seed of the down factors' draw.

        Returns:
            The attached ``LoraNetwork``.

        Raises:
            ValueError: a bad rank or alpha, a rank larger than a target layer's sides, a target name that
                matches no layer, or no target at all; nothing is attached then.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be an integer >= 1")
        alpha = float(rank) if alpha is None else alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"alpha={alpha!r} must be a finite number > 0")
        wanted = {"unet": tuple(unet_targets or ())}
        for c in TEXT_ENCODERS:
            if getattr(sd, c, None) is not None:
                wanted[c] = tuple(text_encoder_targets or ())
        for c, targets in wanted.items():
            bad = [t for t in targets if not isinstance(t, str) or not t]
            if bad:
                raise ValueError(f"{c} target modules must be non-empty strings, got {bad}")
        if not any(wanted.values()):
            raise ValueError("no target modules: give unet_targets and/or text_encoder_targets")
        rng = np.random.default_rng(seed)
        found: list[tuple[str, str, str, keras.layers.Layer]] = []
        for component, targets in wanted.items():
            if not targets:
                continue
            candidates = _candidates(sd, component)
            matched = [(p, v) for p, v in sorted(candidates.items()) if _matches(v[1], targets)]
            used = {t for t in targets if any(_matches(v[1], [t]) for _, v in matched)}
            unused = [t for t in targets if t not in used]
            if unused:
                raise ValueError(
                    f"{component} target modules {unused} match no linear or conv layer; names end in e.g. "
                    f"{sorted({p.rsplit('.', 1)[-1] for p in candidates})[:12]}"
                )
            found += [(component, p, v[2], v[0]) for p, v in matched]
        layers = []
        for component, path, name, layer in found:
            if isinstance(layer, Linear):
                fan_in, out = layer.in_features, layer.out_features
                up_shape = (rank, out)
            else:
                kh, kw, cin, out = (int(d) for d in layer.weight.shape)
                fan_in = kh * kw * cin
                up_shape = (1, 1, rank, out)
            if rank > min(fan_in, out):
                raise ValueError(
                    f"rank={rank} is larger than {component} layer {path} ({fan_in} in, {out} out)"
                )
            # peft / kohya: kaiming_uniform_(a=sqrt(5)) on down, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); up zero.
            bound = 1.0 / math.sqrt(fan_in)
            torch_down = rng.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)  # (r, in*k*k)
            if isinstance(layer, Linear):
                down_value = torch_down.T
            else:
                down_value = np.transpose(torch_down.reshape(rank, cin, kh, kw), (2, 3, 1, 0))
            key = path.replace(".", "_")
            down = keras.Variable(down_value, dtype="float32", name=f"lora_down_{component}_{key}")
            up = keras.Variable(
                np.zeros(up_shape, np.float32), dtype="float32", name=f"lora_up_{component}_{key}"
            )
            layers.append(LoraLayer(component, path, name, layer, down, up, alpha / rank))
        network = cls(sd, layers, rank, float(alpha), {c: t for c, t in wanted.items() if t})
        network._install()
        return network

    # ------------------------------------------------------------------ wrapping

    def _install(self) -> None:
        for entry in self.layers:
            if "_lora_training" in entry.layer.__dict__:
                raise ValueError(f"{entry.component} layer {entry.path} already has a LoRA network attached")
        for entry in self.layers:
            layer = entry.layer
            entry.previous_call = layer.__dict__.get("call")
            base = entry.previous_call or (lambda x, _layer=layer: type(_layer).call(_layer, x))

            def call(x, _base=base, _entry=entry):
                return _base(x) + _entry.delta(x)

            object.__setattr__(layer, "call", call)
            object.__setattr__(layer, "_lora_training", self)
        self._attached = True
        _forget_compiled(self.sd)

    def detach(self) -> None:
        """Give every wrapped layer its previous call back (the model computes as before attaching)."""
        for entry in self.layers:
            layer = entry.layer
            if layer.__dict__.get("_lora_training") is not self:
                continue
            if entry.previous_call is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", entry.previous_call)
            object.__delattr__(layer, "_lora_training")
        self._attached = False
        _forget_compiled(self.sd)

    @property
    def trainable_variables(self) -> list[keras.Variable]:
        return [v for entry in self.layers for v in (entry.down, entry.up)]

    def variables_of(self, part: str) -> list[keras.Variable]:
        """The factors of "unet" or of the text encoders ("text_encoder")."""
        want = ("unet",) if part == "unet" else TEXT_ENCODERS
        return [v for entry in self.layers if entry.component in want for v in (entry.down, entry.up)]

    def named_variables(self) -> list[tuple[str, str, keras.Variable]]:
        """(component, "<path>.lora_down.weight" / ".lora_up.weight", variable), for checkpoints."""
        out = []
        for entry in self.layers:
            out.append((entry.component, f"{entry.path}.lora_down.weight", entry.down))
            out.append((entry.component, f"{entry.path}.lora_up.weight", entry.up))
        return out

    # ------------------------------------------------------------------- saving

    def state_dict(self, format: str = "kohya", dtype: str | None = None) -> dict[str, np.ndarray]:
        """The file's tensors in ``format`` ("kohya" or "diffusers"); ``dtype`` casts them ("float16")."""
        return lora_state_dict(self, format, dtype)


def _forget_compiled(sd) -> None:
    """Drop the pipeline executor's compiled loops: a trace holds the layers' calls of its time, so a loop
    compiled before attaching (or detaching) would keep computing without (or with) the LoRA. Merged LoRAs
    (``load_lora_weights``) only assign variables and need no retrace; training wrappers change calls."""
    clear = getattr(getattr(sd, "executor", None), "clear", None)
    if callable(clear):
        clear()


def _kohya_names(sd) -> dict[str, str]:
    return _KOHYA_SDXL_PREFIX if sd.config.is_sdxl else _KOHYA_PREFIX


def base_model_version(config) -> str:
    """sd-scripts' ``ss_base_model_version`` for a pipeline config: sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0
    (and sd_v1_v for a v-prediction SD 1.x model, as sd-scripts' rule gives)."""
    if config.is_sdxl:
        return "sdxl_base_v1-0"
    v2 = config.text_encoder.hidden_size == 1024
    version = "sd_v2" if v2 else "sd_v1"
    return version + ("_v" if config.scheduler.prediction_type == "v_prediction" else "")


def lora_state_dict(network: LoraNetwork, format: str = "kohya", dtype: str | None = None) -> dict:
    """Tensors of a LoRA file in ``format`` (see the module docstring), torch layout."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r} is not allowed; expected one of {SAVE_FORMATS}")
    out = {}
    prefixes = _kohya_names(network.sd)
    sdxl = network.sd.config.is_sdxl
    cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: a)
    for entry in network.layers:
        down, up = entry.torch_factors()
        if format == "kohya":
            # sd-scripts trains SD 1.x / 2.x on the diffusers UNet and SDXL on its original-layout copy.
            module = entry.path if (entry.component == "unet" and sdxl) else entry.diffusers_name
            name = prefixes[entry.component] + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = cast(down)
            out[f"{name}.lora_up.weight"] = cast(up)
            out[f"{name}.alpha"] = cast(np.asarray(entry.scale * entry.rank, np.float32))
        else:
            name = f"{entry.component}.{entry.diffusers_name}"
            out[f"{name}.lora_A.weight"] = cast(down)
            out[f"{name}.lora_B.weight"] = cast(up)
    return out


def _peft_config(network: LoraNetwork, component: str) -> dict:
    # peft matches a target as the module's name or a "."-suffix of it; without "text_model." the text
    # encoders' names match both transformers 4 (which has that level) and 5 (which drops it).
    modules = sorted(
        e.diffusers_name.removeprefix("text_model.") for e in network.layers if e.component == component
    )
    return {
        "r": network.rank,
        "lora_alpha": network.alpha,
        "target_modules": modules,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "peft_type": "LORA",
    }


def lora_metadata(
    network: LoraNetwork, format: str, extra: Mapping[str, str] | None = None, name: str = ""
) -> dict:
    """The header metadata of a saved LoRA (without the hash, which needs the tensors' bytes)."""
    if format == "diffusers":
        data = {
            f"{c}.{k}": v
            for c in sorted({e.component for e in network.layers})
            for k, v in _peft_config(network, c).items()
        }
        return {"lora_adapter_metadata": json.dumps(data, indent=2, sort_keys=True), "format": "pt"}
    config = network.sd.config
    version = base_model_version(config)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": _number(network.alpha),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_output_name": name,
        "ss_training_finished_at": str(datetime.datetime.now(datetime.timezone.utc).timestamp()),
        "ss_network_args": json.dumps({"targets": {c: list(t) for c, t in network.targets.items()}}),
        "modelspec.architecture": _ARCHITECTURES.get(version, _ARCHITECTURES[version.removesuffix("_v")]),
        "modelspec.prediction_type": "v" if version.endswith("_v") else "epsilon",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": name,
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must be str -> str, got {key!r}: {value!r}")
        meta[key] = value
    return meta


# Stability's model spec (what sd-scripts writes as ``modelspec.architecture``) by base version.
_ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1/lora",
    "sd_v2": "stable-diffusion-v2-512/lora",
    "sd_v2_v": "stable-diffusion-v2-768-v/lora",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora",
}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def save_lora(
    network: LoraNetwork,
    path: str | os.PathLike,
    format: str = "kohya",
    *,
    dtype: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``network`` as a ``.safetensors`` LoRA file, atomically.

    Args:
        network: the trained ``LoraNetwork``.
        path: the destination, ending in ``.safetensors``.
        format: "kohya" (A1111 / kohya names, ``.alpha`` tensors, ``ss_*`` metadata) or "diffusers"
            (PEFT names, alpha in ``lora_adapter_metadata``).
        dtype: cast the tensors ("float16", "bfloat16" needs ml_dtypes); None keeps float32.
        metadata: extra str -> str header fields (kohya: ``ss_learning_rate``, ``ss_steps``, ...).
        overwrite: replace an existing file; otherwise an existing path is an error.

    Returns:
        The path written.

    Raises:
        ValueError: a bad format, a path not ending in ``.safetensors``, or bad metadata.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from tf_diffusion.weights.safetensors_io import save_safetensors

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"LoRA path {path!r} must end in .safetensors")
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r} is not allowed; expected one of {SAVE_FORMATS}")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    tensors = lora_state_dict(network, format, dtype)
    name = os.path.splitext(os.path.basename(path))[0]
    meta = lora_metadata(network, format, metadata, name)
    if format == "kohya":
        meta["sshs_model_hash"] = _data_hash(tensors, os.path.dirname(os.path.abspath(path)))
    save_safetensors(tensors, path, metadata=meta, overwrite=overwrite)
    return path


def _data_hash(tensors: Mapping[str, np.ndarray], folder: str) -> str:
    """sd-scripts' ``sshs_model_hash``: the SHA-256 of the file's bytes after its header (A1111's ``Lora hashes``).

    The header does not change the data bytes, so they are written once without it to a temporary file
    next to the destination (our writer's layout is the one place that decides their order) and hashed.
    """
    import tempfile

    from tf_diffusion.weights.safetensors_io import save_safetensors

    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-hash-") as tmp:
        probe = os.path.join(tmp, "probe.safetensors")
        save_safetensors(tensors, probe)
        with open(probe, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
