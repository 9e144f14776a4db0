"""Deployment: a TF Serving SavedModel from prompt string to image, and TFLite models of the components.

SavedModel layout (what TF Serving's model server watches)::

    DIR/<version>/saved_model.pb, variables/, assets.extra/tf_diffusion.json

Signatures (B is the request batch; H x W the image size and h x w x C the latent size fixed at export):

- ``serving_default``: prompt (B,) string, negative_prompt (B,) string, seed (B,) int64,
  guidance_scale (B,) float32 -> images (B, H, W, 3) uint8, png_bytes (B,) string.
- ``generate_from_noise``: as serving_default with noise (B, h, w, C) float32 instead of seed
  (and step_noise (B, E, h, w, C) for samplers that add noise while stepping) -> images, png_bytes, latents.
- ``encode_text``: prompt (B,) -> ids (B, 77) int32, hidden (B, T, D) float32 (T = 77; SD3: 77 +
  max_sequence_length), and for SDXL and SD3 pooled (B, P).
- ``denoise``: noise, context, negative_context, guidance_scale (+ pooled, negative_pooled for SDXL and
  SD3; + step_noise) -> latents (B, h, w, C), the compiled denoising loop (``ops.fori_loop``; XLA when
  exported with ``jit_compile=True``).
- ``decode``: latents (B, h, w, C) -> images, png_bytes.
- ``encode_image``: images (B, H, W, 3) uint8, noise (B, h, w, C) -> latents (posterior sample) and
  mean, both multiplied by the VAE scaling factor (the img2img starting point).
- ``describe``: batch (B,) int32 (any values) -> description (B,) string: the export's metadata and the
  pipeline config as JSON, for clients that reach the model only through TF Serving
  (``tf-diffusion serve --backend tf-serving://...``).

Noise: ``serving_default`` draws row ``b``'s noise from ``seed[b]`` with the project's counter-based
generator as TensorFlow ops (``tf_diffusion.noise.tf_batch_normal``), the same numbers ``generate()``
draws on the host, so a seed gives the image ``generate(seed=...)`` gives, on every call and in any
batch. ``generate_from_noise`` takes noise drawn any other way.

What differs per family (the text encoders in the graph, the pooled inputs, SDXL's time ids, SD3's zero
T5 tokens) comes from ``FamilyHooks.export_text`` (``tf_diffusion.export.text``); the sampler and its
plan are the ones ``generate()`` uses for text-to-image. SD3 / SD3.5 export without T5 only.

Prompts are tokenized in the graph (``tf_diffusion.export.graph_tokenizer``) as plain CLIP text truncated to
75 tokens, like diffusers; the A1111 attention syntax and 75-token chunking of ``generate()`` are not
applied, so a prompt using them encodes differently from ``generate()``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from tf_diffusion import config as config_lib
from tf_diffusion.families import components_of
from tf_diffusion.pipeline import StableDiffusion

EXPORT_DTYPES = ("float32", "bfloat16", "mixed_float16", "mixed_bfloat16")
TFLITE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "decoder")
TFLITE_QUANTIZATIONS = (None, "float16", "dynamic_range")
METADATA_FILE = "tf_diffusion.json"
# The largest flatbuffer TFLite can address with 32-bit offsets.
FLATBUFFER_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What ``export_saved_model`` wrote.

    Attributes:
        path: the version folder, ``DIR/<version>``.
        version: the version number.
        metadata: the content of ``assets.extra/tf_diffusion.json``.
    """

    path: pathlib.Path
    version: int
    metadata: dict


def _tf():
    import tensorflow as tf

    return tf


def _check_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"export needs the TensorFlow Keras backend, but KERAS_BACKEND is {keras.backend.backend()!r}; "
            "run with KERAS_BACKEND=tensorflow"
        )


def with_dtype(sd: StableDiffusion, dtype: str | None) -> StableDiffusion:
    """``sd`` itself, or a copy of its weights in another Keras dtype policy.

    Args:
        sd: the model.
        dtype: None (keep), or one of ``EXPORT_DTYPES``.

    Raises:
        ValueError: for an unknown dtype.
    """
    if dtype is None:
        return sd
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; expected one of {EXPORT_DTYPES}")
    current = getattr(sd, sd.hooks.backbone).dtype_policy.name
    if current == dtype:
        return sd
    from tf_diffusion.weights import load_state_dict, state_dict

    tokenizers = {"tokenizer": sd.tokenizer, "tokenizer_2": sd.tokenizer_2}
    if getattr(sd, "tokenizer_3", None) is not None:  # SD3 with T5
        tokenizers["tokenizer_3"] = sd.tokenizer_3
    copy = StableDiffusion(sd.config, dtype=dtype, **tokenizers)
    # Every network the model holds (SDXL: text_encoder_2 too, its refiner no text_encoder; SD3: the
    # transformer, and T5 when loaded).
    for name in (*components_of(sd.config), "text_encoder_3", "transformer"):
        network = getattr(sd, name, None)
        if network is not None:
            load_state_dict(getattr(copy, name), state_dict(network))
    return copy


def _named(fn, names: Sequence[str]):
    """``fn`` called by keyword with positional arguments named ``names``: a traced function's (and so a
    SavedModel signature's) inputs take their names from these parameters."""
    import functools
    import inspect

    @functools.wraps(fn)
    def call(*args):
        return fn(**dict(zip(names, args, strict=True)))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    call.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in names])
    return call


def _variables_module(*models):
    """A ``tf.Module`` tracking the models' ``tf.Variable`` objects, for saving and TFLite conversion.

    The raw variables, not Keras 3's wrappers: saving a wrapper exports a second copy of its variable
    (Keras' ``_export_to_saved_model_graph``) that is the one restored, while the traced functions read
    the first; TF1-style loaders (TF Serving, ``saved_model_cli run``) and the TFLite converter then read
    uninitialised memory.
    """
    tf = _tf()
    module = tf.Module(name="tf_diffusion")
    module.model_variables = [v.value for model in models for v in model.variables]
    return module


def build_serving_module(
    sd: StableDiffusion,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    jit_compile: bool = False,
    controlnet=None,
    **family_options,
):
    """The ``tf.Module`` that ``export_saved_model`` saves, usable directly in Python.

    Args:
        sd: the model (TensorFlow backend).
        sampler: a sampler name (see ``tf_diffusion.schedulers.SAMPLERS``), fixed in the graph; default the
            model's ``config.default_sampler``.
        num_steps: sampler steps, fixed in the graph; default ``config.default_steps``.
        height, width: image size in pixels, multiples of the VAE factor; default: the model's size.
        jit_compile: compile the denoising loop with XLA. TF Serving runs XLA on GPU/TPU; on CPU its model
            server needs ``--xla_cpu_compilation_enabled=true``.
        controlnet: one ``tf_diffusion.ControlNet`` in the graph: ``serving_default``,
            ``generate_from_noise`` and ``denoise`` then also take ``control_image`` (B, H, W, 3) uint8 and
            ``control_scale`` (B,) float32 (``controlnet_conditioning_scale``, over the whole schedule),
            as ``generate(controlnet=..., control_image=...)`` runs it.
        family_options: ``generate()``'s options of the model's family, fixed at export (SD3:
            ``max_sequence_length``, the number of zero tokens standing for T5).

    Returns:
        ``(module, signatures)``: the module and a dict signature name -> concrete function.

    Raises:
        ValueError: for an invalid option, an inpainting model, a ControlNet of another family, a family
            without an export (Flux) or an SD3 model loaded with T5.
    """
    _check_backend()
    tf = _tf()
    from tf_diffusion import noise as noise_lib
    from tf_diffusion.denoising import ClassifierFreeGuidance, Conditioning
    from tf_diffusion.family_hooks import check_family_options

    cfg, hooks = sd.config, sd.hooks
    family_options = check_family_options(cfg, hooks, family_options)
    sampler = cfg.default_sampler if sampler is None else sampler
    num_steps = cfg.default_steps if num_steps is None else num_steps
    if cfg.is_inpainting:
        raise ValueError(f"{cfg.name} is an inpainting model; export supports text-to-image models only")
    if cfg.requires_aesthetics_score:
        raise ValueError(
            f"{cfg.name} is an SDXL refiner (image-to-image only); export supports text-to-image models"
        )
    if getattr(sd, "ip_adapters", ()):
        raise ValueError(
            f"{len(sd.ip_adapters)} IP-Adapter(s) are loaded; the export has no image-prompt input: "
            "call sd.unload_ip_adapter() first"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    height, width = sd.check_size(height, width)
    factor, channels = cfg.vae.downsample_factor, cfg.vae.latent_channels
    h, w = height // factor, width // factor
    # The sampler and plan generate() uses for text-to-image (SD3: flow matching with the model's shift).
    sampler_obj = hooks.sampler(cfg, sampler, (h, w, channels))
    plan = hooks.plan(sampler_obj, int(num_steps), 1.0, False, None, None)
    # What differs per family: the text encoders and tokenizers in the graph, the extras (pooled).
    text = hooks.export_text(sd, height=height, width=width, options=family_options)
    length, hidden = text.context_shape
    extra_names = list(text.extras)
    evals = plan.num_evals
    needs_noise = sampler_obj.needs_noise
    # Latents are (z - shift) * scaling for every family (the shift is 0 but for SD3's VAE).
    scaling, shift = float(cfg.vae.scaling_factor), float(cfg.vae.shift_factor)

    from tf_diffusion.adapters import controlnet as controlnet_adapter

    nets = []
    if controlnet is not None:
        if isinstance(controlnet, (list, tuple)):
            raise ValueError("export takes one ControlNet (controlnet=net), not a list")
        hooks.require_adapter(cfg, "controlnet")
        controlnet_adapter.check_net(sd, controlnet, 0)
        nets = [controlnet]
    backbone = getattr(sd, hooks.backbone)
    module = _variables_module(*text.encoders, backbone, sd.vae, *nets)
    for name, tokenizer in text.tokenizers.items():
        setattr(module, name, tokenizer)
    denoiser = controlnet_adapter.ControlNetDenoiser(sd.denoiser, nets) if nets else None
    program = sd.denoise_program(sampler_obj, ClassifierFreeGuidance(), denoiser=denoiser)
    loop = tf.function(program.loop, jit_compile=bool(jit_compile), autograph=False)

    strings = tf.TensorSpec([None], tf.string)
    latent_spec = tf.TensorSpec([None, h, w, channels], tf.float32)
    context_spec = tf.TensorSpec([None, length, hidden], tf.float32)
    guidance_spec = tf.TensorSpec([None], tf.float32)
    step_spec = [tf.TensorSpec([None, evals, h, w, channels], tf.float32)] if needs_noise else []
    control_spec = (
        [tf.TensorSpec([None, height, width, 3], tf.uint8), tf.TensorSpec([None], tf.float32)] if nets else []
    )

    def function(fn, *specs):
        return tf.function(fn, input_signature=list(specs), autograph=False)

    # The parts, each traced once; the signatures below call them.
    def encode_text(prompt):
        return text.encode(prompt)  # {"ids", "hidden", *extra_names}

    def bundle(context, extras, hint):
        cond = text.conditioning(context, extras)
        if hint is not None:
            cond = Conditioning(cond.context, {**cond.extras, controlnet_adapter.IMAGE.format(0): hint})
        return cond.tree()

    def denoise(noise, context, negative_context, guidance_scale, *rest):
        rest = list(rest)
        # The family's extras, each with its negative twin after it (SDXL, SD3: pooled).
        extras, negative_extras = {}, {}
        for name in extra_names:
            extras[name], negative_extras[name] = rest.pop(0), rest.pop(0)
        step_noise = rest.pop(0) if needs_noise else None
        hint = scale = None
        if nets:
            hint, scale = tf.cast(rest[0], tf.float32) / 255.0, rest[1]  # the hint in [0, 1], as generate()
        x = noise * np.float32(plan.init_noise_sigma)
        # generate() uses the conditional prediction alone when guidance <= 1; uncond + 1 * (cond - uncond).
        guidance = tf.where(guidance_scale > 1.0, guidance_scale, 1.0)[:, None, None, None]
        per_step = (
            {} if step_noise is None else {"noise": tf.transpose(step_noise, [1, 0, 2, 3, 4])}
        )  # (E, B, ...)
        if nets:
            # The net's scale at every evaluation, the same for both halves (no guidance window, no guess mode).
            scales = tf.tile(scale[None, :, None], [evals, 1, 1])  # (E, B, 1)
            leaf = {f"extra.{controlnet_adapter.SCALE}": scales}
            per_step.update(cond=leaf, uncond=dict(leaf))
        inputs = {
            "rows": {
                "cond": bundle(context, extras, hint),
                "uncond": bundle(negative_context, negative_extras, hint),
            },
            "per_step": per_step,
            "shared": {
                "tables": {k: tf.constant(v) for k, v in plan.tables.items()},
                "timesteps": tf.constant(plan.timesteps),
                "guidance_scale": guidance,
            },
        }
        x, _ = loop(x, sampler_obj.init_state(x), inputs)
        return x

    def decode(latents):
        pixels = tf.cast(sd.vae.decode(latents / scaling + shift), tf.float32)
        images = tf.cast(tf.round(tf.clip_by_value((pixels + 1.0) * 0.5, 0.0, 1.0) * 255.0), tf.uint8)
        return images, tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.string)

    extra_specs = [
        tf.TensorSpec([None, *text.extras[name]], tf.float32) for name in extra_names for _ in range(2)
    ]
    encode_text = function(encode_text, strings)
    denoise = function(
        denoise,
        latent_spec,
        context_spec,
        context_spec,
        guidance_spec,
        *extra_specs,
        *step_spec,
        *control_spec,
    )
    decode = function(decode, latent_spec)

    def seeded_noise(seed, shape, stream):
        return noise_lib.tf_batch_normal(seed, stream, shape)  # (B, *shape), as generate() draws

    # Signature inputs are named after the function's parameters; these depend on the model and the
    # sampler, so the signature functions take them by name.
    step_names = ["step_noise"] if needs_noise else []
    control_names = ["control_image", "control_scale"] if nets else []

    def generate(prompt, negative_prompt, guidance_scale, noise, step_noise=None, control=()):
        # One text batch [negatives..., prompts...], as generate() encodes it.
        encoded = encode_text(tf.concat([negative_prompt, prompt], axis=0))
        halves = {name: tf.split(encoded[name], 2, axis=0) for name in ["hidden", *extra_names]}
        # SDXL: zeros for an empty negative prompt when the model says so (text.unconditional).
        negative = text.unconditional(negative_prompt, {name: pair[0] for name, pair in halves.items()})
        extras = [t for name in extra_names for t in (halves[name][1], negative[name])]
        steps = [] if step_noise is None else [step_noise]
        latents = denoise(
            noise, halves["hidden"][1], negative["hidden"], guidance_scale, *extras, *steps, *control
        )
        images, png = decode(latents)
        return {"images": images, "png_bytes": png, "latents": latents}

    def serving_default(prompt, negative_prompt, seed, guidance_scale, **control):
        noise = seeded_noise(seed, [h, w, channels], noise_lib.LATENTS)
        steps = seeded_noise(seed, [evals, h, w, channels], noise_lib.STEPS) if needs_noise else None
        out = generate(prompt, negative_prompt, guidance_scale, noise, steps, _control(control))
        return {"images": out["images"], "png_bytes": out["png_bytes"]}

    def _control(kwargs):
        return tuple(kwargs[name] for name in control_names)

    def from_noise(prompt, negative_prompt, guidance_scale, noise, step_noise=None, **control):
        return generate(prompt, negative_prompt, guidance_scale, noise, step_noise, _control(control))

    extra_input_names = [n for name in extra_names for n in (name, f"negative_{name}")]

    def denoise_sig(noise, context, negative_context, guidance_scale, **rest):
        names = extra_input_names + step_names + control_names
        return {
            "latents": denoise(noise, context, negative_context, guidance_scale, *(rest[n] for n in names))
        }

    def text_sig(prompt):
        return dict(encode_text(prompt))

    def decode_sig(latents):
        images, png = decode(latents)
        return {"images": images, "png_bytes": png}

    def encode_image_sig(images, noise):
        pixels = tf.cast(images, tf.float32) / 255.0 * 2.0 - 1.0
        dist = sd.vae.encode(pixels)
        latents, mean = dist.sample(noise=noise), dist.mean
        return {"latents": (latents - shift) * scaling, "mean": (mean - shift) * scaling}

    seed_spec = tf.TensorSpec([None], tf.int64)
    functions = {
        "serving_default": function(
            _named(serving_default, ["prompt", "negative_prompt", "seed", "guidance_scale", *control_names]),
            strings,
            strings,
            seed_spec,
            guidance_spec,
            *control_spec,
        ),
        "generate_from_noise": function(
            _named(
                from_noise,
                ["prompt", "negative_prompt", "guidance_scale", "noise", *step_names, *control_names],
            ),
            strings,
            strings,
            guidance_spec,
            latent_spec,
            *step_spec,
            *control_spec,
        ),
        "encode_text": function(text_sig, strings),
        "denoise": function(
            _named(
                denoise_sig,
                [
                    "noise",
                    "context",
                    "negative_context",
                    "guidance_scale",
                    *extra_input_names,
                    *step_names,
                    *control_names,
                ],
            ),
            latent_spec,
            context_spec,
            context_spec,
            guidance_spec,
            *extra_specs,
            *step_spec,
            *control_spec,
        ),
        "decode": function(decode_sig, latent_spec),
        "encode_image": function(
            encode_image_sig, tf.TensorSpec([None, height, width, 3], tf.uint8), latent_spec
        ),
    }
    module.metadata = {
        "model": cfg.name,
        "sampler": sampler,
        "num_steps": int(num_steps),
        "num_evals": evals,
        "sampler_adds_noise": needs_noise,
        "height": height,
        "width": width,
        "latent_shape": [h, w, channels],
        "context_shape": [length, hidden],
        "dtype": backbone.dtype_policy.name,
        "jit_compile": bool(jit_compile),
        "vae_scaling_factor": scaling,
        "noise": "row b from seed[b]: tf_diffusion.noise streams 0 (latents) and 3 (steps), as generate()",
        "tokenizer": "in-graph CLIP BPE (tf_diffusion.export.graph_tokenizer), plain text truncated to 75 tokens",
    }
    if nets:
        module.metadata["controlnet"] = {
            "model": controlnet_adapter.model_title(controlnet),
            "inputs": "control_image (B, H, W, 3) uint8 taken as given (no preprocessing), control_scale (B,)",
            "guidance_window": "the whole schedule; no guess mode",
        }
    module.metadata.update(text.metadata)
    if shift:
        module.metadata["vae_shift_factor"] = shift
    # What a remote client needs to know before its first request (tf_diffusion.serve.tf_serving): the
    # export's choices and the pipeline config, as JSON, one copy per row of a dummy batch (TF Serving's
    # REST API runs a signature only on inputs).
    description = json.dumps({**_plain(module.metadata), "config": config_lib.to_dict(cfg)})

    def describe(batch):
        return {"description": tf.fill(tf.shape(batch), tf.constant(description))}

    functions["describe"] = function(describe, tf.TensorSpec([None], tf.int32))
    # Only the signatures are saved (not restorable tf.function attributes): saving stays quick and small.
    signatures = {name: fn.get_concrete_function() for name, fn in functions.items()}
    return module, signatures


def _plain(value):
    """The metadata as plain dicts and lists: a tf.Module wraps what is assigned to it (a nested dict
    becomes a tracking wrapper that json cannot write)."""
    if isinstance(value, collections.abc.Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (
        isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes))
    ):
        return [_plain(v) for v in value]
    return value


def export_saved_model(
    sd: StableDiffusion,
    directory: str | os.PathLike,
    *,
    version: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str | None = None,
    jit_compile: bool = False,
    overwrite: bool = False,
    controlnet=None,
    **family_options,
) -> ExportInfo:
    """Write a TF Serving SavedModel: ``directory/<version>/`` with the signatures in the module doc.

    The export is written to a temporary folder inside ``directory`` and renamed into place, so a model
    server watching ``directory`` never sees a half-written version.

    Args:
        sd: the model (TensorFlow backend).
        directory: the model's base folder (TF Serving's ``--model_base_path``).
        version: the version folder's number; default one above the highest existing version (1 at first).
        sampler: sampler name, fixed at export; default the model's ``config.default_sampler``.
        num_steps: sampler steps, fixed at export; default ``config.default_steps``.
        height, width: image size in pixels; default the model's size.
        dtype: "float32", "bfloat16", "mixed_float16" or "mixed_bfloat16"; None keeps the model's policy. The VAE stays
            float32 under float16, as in ``generate()``.
        jit_compile: compile the denoising loop with XLA (GPU/TPU servers; CPU needs
            ``--xla_cpu_compilation_enabled=true`` on the model server).
        overwrite: allow a non-empty ``directory``; an existing ``directory/<version>`` is then replaced.
        controlnet: one ControlNet in the graph (``build_serving_module``); it keeps its own precision.
        family_options: the model family's ``generate()`` options fixed at export (``build_serving_module``).

    Returns:
        An ``ExportInfo`` with the version folder and the metadata written.

    Raises:
        FileExistsError: if ``directory`` is not empty and ``overwrite`` is False.
        ValueError: for invalid options.
    """
    _check_backend()
    tf = _tf()
    base = pathlib.Path(directory)
    if base.exists() and not base.is_dir():
        raise ValueError(f"{str(base)!r} is a file; give a folder for the SavedModel versions")
    existing = [p for p in base.iterdir() if not p.name.startswith(".tmp-")] if base.exists() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(base)!r} is not empty; pass overwrite=True (--overwrite) to add or replace a version"
        )
    numbers = [int(p.name) for p in existing if p.is_dir() and p.name.isdigit()]
    if version is None:
        version = max(numbers, default=0) + 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(f"version={version!r} must be a non-negative integer")
    version = int(version)

    model = with_dtype(sd, dtype)
    module, signatures = build_serving_module(
        model,
        sampler=sampler,
        num_steps=num_steps,
        height=height,
        width=width,
        jit_compile=jit_compile,
        controlnet=controlnet,
        **family_options,
    )
    import tf_diffusion

    metadata = dict(_plain(module.metadata), version=version, tensorflow=tf.__version__)
    metadata["tf_diffusion"] = tf_diffusion.__version__
    metadata["signatures"] = {
        name: {
            "inputs": {
                p.name: _spec_json(spec)
                for p, spec in zip(
                    fn.function_type.parameters.values(), fn.structured_input_signature[0], strict=True
                )
            },
            "outputs": {k: _spec_json(v) for k, v in fn.structured_outputs.items()},
        }
        for name, fn in signatures.items()
    }

    base.mkdir(parents=True, exist_ok=True)
    final = base / str(version)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))
    try:
        tf.saved_model.save(module, str(staging), signatures=signatures)
        extra = staging / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            # Swap in two renames; the old version disappears only once the new one is in place.
            retired = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-old-{version}-", dir=base))
            os.rename(final, retired / "old")
            os.rename(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportInfo(path=final, version=version, metadata=metadata)


def _spec_json(spec) -> dict:
    return {"dtype": spec.dtype.name, "shape": [None if d is None else int(d) for d in spec.shape]}


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``tf_diffusion.json`` of an exported version folder (``DIR/<version>``)."""
    file = pathlib.Path(path) / "assets.extra" / METADATA_FILE
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a tf_diffusion SavedModel version folder (no {file.name})")
    return json.loads(file.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- TFLite


def tflite_components(config) -> tuple[str, ...]:
    """The TFLite components a model of ``config`` has, in ``TFLITE_COMPONENTS`` order.

    SD 1.x / 2.x: text_encoder, unet, decoder; SDXL base: both text encoders too; the SDXL refiner
    has no ``text_encoder`` (CLIP-L).
    """
    present = components_of(config)
    return tuple(c for c in TFLITE_COMPONENTS if c in ("unet", "decoder") or c in present)


def tflite_function(
    sd: StableDiffusion,
    component: str,
    *,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
):
    """A concrete function of one component with fixed input shapes, as the TFLite converter needs.

    Args:
        sd: the model.
        component: one of ``tflite_components(sd.config)``:

            - "text_encoder": ids (batch, 77) int32 -> hidden (batch, 77, D); for SDXL the states
              ``generate()`` reads (the penultimate layer's, without the final norm);
            - "text_encoder_2" (SDXL): the same ids -> hidden (penultimate states) and pooled (the
              projected pooled output, the UNet's ``text_embeds``);
            - "unet": latents (batch, h, w, C), timestep (batch,) float32, context (batch, 77, D)
              -> prediction; SDXL UNets also take text_embeds (batch, P) and time_ids (batch, K)
              (``tf_diffusion.sdxl.time_ids``);
            - "decoder": unscaled latents (batch, h, w, C) -> images (batch, H, W, 3) in [-1, 1].
        height, width: image size in pixels; default the model's size.
        batch: the fixed batch size.

    Returns:
        The concrete function.

    Raises:
        ValueError: for a component not in ``TFLITE_COMPONENTS`` or one this model does not have,
            or a transformer family.
    """
    _check_backend()
    tf = _tf()
    if component not in TFLITE_COMPONENTS:
        raise ValueError(f"component={component!r} is not allowed; expected one of {TFLITE_COMPONENTS}")
    cfg = sd.config
    if sd.hooks.backbone != "unet":
        raise ValueError(
            f"TFLite export converts the UNet families' components; {cfg.name} has a {sd.hooks.backbone} "
            "(use the SavedModel export)"
        )
    available = tflite_components(cfg)
    if component not in available:
        raise ValueError(f"{cfg.name} has no {component}; its TFLite components are {available}")
    height, width = sd.check_size(height, width)
    factor, channels = cfg.vae.downsample_factor, cfg.vae.latent_channels
    latent = tf.TensorSpec([batch, height // factor, width // factor, channels], tf.float32)
    ids_spec = tf.TensorSpec([batch, cfg.tokenizer.max_length], tf.int32)
    # SDXL reads both encoders' penultimate states (sdxl.encode_prompts); SD 1.x / 2.x the last ones.
    penultimate = {"clip_skip": 1, "final_norm": False} if cfg.is_sdxl else {}
    if component == "text_encoder":
        spec = [ids_spec]

        def fn(ids):
            return {"hidden": tf.cast(sd.text_encoder(ids, **penultimate), tf.float32)}

    elif component == "text_encoder_2":
        spec = [ids_spec]

        def fn(ids):
            hidden, pooled = sd.text_encoder_2(ids, **penultimate, pooled=True)
            return {"hidden": tf.cast(hidden, tf.float32), "pooled": tf.cast(pooled, tf.float32)}

    elif component == "unet":
        context = tf.TensorSpec([batch, cfg.tokenizer.max_length, cfg.unet.context_dim], tf.float32)
        spec = [latent, tf.TensorSpec([batch], tf.float32), context]
        if cfg.unet.adm_in_channels:
            pooled_dim = cfg.text_encoder_2.projection_dim
            id_count = (cfg.unet.adm_in_channels - pooled_dim) // cfg.unet.addition_time_embed_dim
            spec += [
                tf.TensorSpec([batch, pooled_dim], tf.float32),
                tf.TensorSpec([batch, id_count], tf.float32),
            ]

            def fn(latents, timestep, context, text_embeds, time_ids):
                out = sd.unet(latents, timestep, context, text_embeds=text_embeds, time_ids=time_ids)
                return {"prediction": tf.cast(out, tf.float32)}

        else:

            def fn(latents, timestep, context):
                return {"prediction": tf.cast(sd.unet(latents, timestep, context), tf.float32)}

    else:
        spec = [latent]

        def fn(latents):
            return {"images": tf.cast(sd.vae.decode(latents), tf.float32)}

    return tf.function(fn, input_signature=spec, autograph=False).get_concrete_function()


def convert_tflite(
    sd: StableDiffusion,
    component: str,
    *,
    quantization: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    allow_large: bool = True,
) -> bytes:
    """Convert one component to a TFLite flatbuffer (builtin ops only).

    Args:
        sd: the model.
        component: one of ``tflite_components(sd.config)`` (see ``tflite_function`` for the inputs).
        quantization: None (float32), "float16" (weights stored as float16) or "dynamic_range" (int8
            weights, float activations).
        height, width: image size in pixels; default the model's size.
        batch: the fixed batch size.
        allow_large: models over 2 GiB (a full-size float32 SD UNet holds 3.20 GiB) are written with their
            weights after the flatbuffer (TFLite's buffer-offset format, which ``tf.lite.Interpreter``
            reads). False raises ValueError instead; float16 or dynamic-range quantization stay under the
            limit. Conversion needs about 7 times the float32 weights in RAM (measured), ~21 GB for that UNet.

    Returns:
        The ``.tflite`` bytes.

    Raises:
        ValueError: for an invalid option, or a float32 model over 2 GiB with ``allow_large=False``.
    """
    tf = _tf()
    if quantization not in TFLITE_QUANTIZATIONS:
        raise ValueError(
            f"quantization={quantization!r} is not allowed; expected one of {TFLITE_QUANTIZATIONS}"
        )
    fn = tflite_function(sd, component, height=height, width=width, batch=batch)
    model = getattr(sd, "vae" if component == "decoder" else component)
    weights = model.decoder.weights if component == "decoder" else model.weights
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in weights)
    per_weight = {None: 1.0, "float16": 0.5, "dynamic_range": 0.25}[quantization]
    large = weight_bytes * per_weight >= FLATBUFFER_LIMIT - (64 << 20)
    if large and not allow_large:
        raise ValueError(
            f"the {component} holds {weight_bytes / 2**30:.2f} GiB of float32 weights, over TFLite's 2 GiB "
            f"flatbuffer limit; use quantization='float16' or 'dynamic_range', or allow_large=True"
        )
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], _variables_module(model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if large:
        # Constant buffers after the flatbuffer, addressed by 64-bit offsets (no 2 GiB limit). TF 2.21's
        # converter switches to this by itself past 2 GiB (measured, same bytes); the flag makes it explicit.
        converter._experimental_use_buffer_offset = True
    return converter.convert()


def run_tflite(model: bytes | str | os.PathLike, inputs: dict, num_threads: int | None = None) -> dict:
    """Run a TFLite model in ``tf.lite.Interpreter``.

    Args:
        model: the ``.tflite`` bytes or path.
        inputs: input name (as in ``tflite_function``: ids; latents, timestep, context; latents) -> array.
        num_threads: interpreter threads; None lets TFLite choose.

    Returns:
        Output name -> array.
    """
    tf = _tf()
    if isinstance(model, (bytes, bytearray)):
        interpreter = tf.lite.Interpreter(model_content=bytes(model), num_threads=num_threads)
    else:
        interpreter = tf.lite.Interpreter(model_path=str(model), num_threads=num_threads)
    return interpreter.get_signature_runner()(**inputs)


def export_tflite(
    sd: StableDiffusion,
    directory: str | os.PathLike,
    *,
    components: Sequence[str] = TFLITE_COMPONENTS,
    quantization: str | None = None,
    height: int | None = None,
    width: int | None = None,
    overwrite: bool = False,
) -> dict[str, pathlib.Path]:
    """Write ``<component>.tflite`` files into ``directory`` (each written to a temporary name, then renamed).

    Args:
        components: which to convert; default every one the model has (``tflite_components``).

    Raises:
        FileExistsError: if a target file exists and ``overwrite`` is False.
        ValueError: for a component the model does not have (before anything is written).
    """
    available = tflite_components(sd.config)
    components = available if components is None else tuple(components)
    missing = [c for c in components if c not in available]
    if missing:
        raise ValueError(f"{sd.config.name} has no {missing}; its TFLite components are {available}")
    base = pathlib.Path(directory)
    targets = {c: base / f"{c}.tflite" for c in components}
    clash = [str(p) for p in targets.values() if p.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash} exist; pass overwrite=True (--overwrite) to replace them")
    base.mkdir(parents=True, exist_ok=True)
    for component, target in targets.items():
        data = convert_tflite(sd, component, quantization=quantization, height=height, width=width)
        staging = target.with_name(f".tmp-{target.name}")
        staging.write_bytes(data)
        os.replace(staging, target)
    return targets
