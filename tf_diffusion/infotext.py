"""Generation parameters as the AUTOMATIC1111 web UI writes them into a PNG (the "parameters" text chunk).

The text is the prompt (any number of lines), an optional ``Negative prompt: ...`` line (and the
negative prompt's further lines), then one line of ``Key: value`` fields separated by ", ":

    a red circle, (sharp:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: 6ce0161689, Model: sd15

A value holding a comma, a colon or a line break is written as a JSON string (``"a, b"``), as the web UI
does. ``format_parameters`` writes that text, ``parse_parameters`` reads ours and the web UI's, and
``model_hash`` computes the web UI's short model hash. Sampler names: ``A1111_SAMPLERS`` maps our
sampler registry names (``tf_diffusion.schedulers.SAMPLERS``) to the web UI's (``FLOW_A1111_SAMPLERS``
the flow-matching ones, which share the plain names), ``a1111_sampler`` names any of our samplers (also
by diffusers class and options), ``sampler_from_a1111`` goes back (``flow=True`` for SD3 and Flux).

This module imports nothing heavy (no TensorFlow, no Keras): a command line or a server can read
parameters before loading a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping

# Our registry name of a UNet-family sampler -> the web UI's name for it (the legacy "X Karras" form, which
# every web UI version and the tools that read its images understand).
A1111_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "pndm": "PLMS",  # diffusers' PNDM with skip_prk_steps, SD's default, is the PLMS sampler
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",  # not a stock web UI sampler; the name its forks and extensions use
}
SAMPLERS_FROM_A1111: dict[str, str] = {a1111: ours for ours, a1111 in A1111_SAMPLERS.items()}
# The flow-matching samplers (SD3, Flux): the web UI writes them with the plain names, so they get their own
# map; ``sampler_from_a1111(..., flow=True)`` reads a name back for a flow-matching model.
FLOW_A1111_SAMPLERS: dict[str, str] = {
    "flow_euler": "Euler",
    "flow_heun": "Heun",
    "flow_dpmpp_2m": "DPM++ 2M",
    "flow_dpmpp_2m_sde": "DPM++ 2M SDE",
}
FLOW_SAMPLERS_FROM_A1111: dict[str, str] = {a1111: ours for ours, a1111 in FLOW_A1111_SAMPLERS.items()}

# diffusers scheduler class -> our registry name (DPMSolverMultistep depends on its options).
_DIFFUSERS_CLASSES = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "UniPCMultistepScheduler": "unipc",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "FlowMatchHeunDiscreteScheduler": "flow_heun",
}
# Samplers of ours that take Karras sigmas from their config, and how the web UI names that: a legacy
# "X Karras" sampler name where one exists, otherwise "Schedule type: Karras" (web UI 1.9 and later).
_KARRAS_BY_CONFIG = {"euler": None, "heun": None, "unipc": None, "lms": "LMS Karras"}
# What "Schedule type: Automatic" means per sampler in the web UI (1.9 and later); others: Uniform.
_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential"}
_SCHEDULES = ("Automatic", "Uniform", "Karras")

# Fields with a keyword argument of format_parameters: web UI key -> (our name, type).
_FIELDS = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size": (("width", "height"), "size"),
    "Model hash": ("model_hash", str),
    "Model": ("model_name", str),
}
_KEY = re.compile(r"\w[\w \-/]*")
_INT = re.compile(r"[+-]?[0-9]{1,40}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,4})?")
_SIZE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")
_NEGATIVE = "Negative prompt:"
_MIN_FIELDS = 3  # a last line with fewer "Key: value" fields is part of the prompt, as in the web UI
HASH_CHARS = 10


def a1111_sampler(sampler: str, config=None) -> tuple[str, str | None]:
    """The web UI's name for one of our samplers.

    Args:
        sampler: our registry name ("dpmpp_2m_karras", "flow_heun"), a diffusers scheduler class name
            ("EulerDiscreteScheduler"), or already a web UI name ("Euler a", returned as it is). A
            flow-matching sampler gets the plain name ("flow_euler" is "Euler"), as the web UI writes
            it for SD3 and Flux.
        config: the sampler's options (a ``SchedulerConfig`` or a scheduler_config.json dict); read for
            ``use_karras_sigmas`` and, for DPMSolverMultistepScheduler, ``algorithm_type``,
            ``solver_order`` and ``use_flow_sigmas``. None: the defaults.

    Returns:
        ``(name, schedule_type)``: the web UI's sampler name and, when that name alone does not say it,
        its schedule type ("Karras"), else None.

    Raises:
        ValueError: for a sampler, or options, that the web UI has no name for.
    """
    if not isinstance(sampler, str):
        raise ValueError(f"sampler must be a string, got {type(sampler).__name__}: {sampler!r}")
    if sampler in SAMPLERS_FROM_A1111:
        return sampler, None
    if sampler in FLOW_A1111_SAMPLERS:
        return FLOW_A1111_SAMPLERS[sampler], None
    option = _option_reader(config)
    if sampler in A1111_SAMPLERS:
        ours = sampler
    elif sampler in _DIFFUSERS_CLASSES:
        ours = _DIFFUSERS_CLASSES[sampler]
        if ours == "dpmpp_2m":
            algorithm, order = option("algorithm_type", "dpmsolver++"), option("solver_order", 2)
            names = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}
            if algorithm not in names or order != 2:
                raise ValueError(
                    f"DPMSolverMultistepScheduler with algorithm_type={algorithm!r}, solver_order={order!r} "
                    f"has no web UI name; allowed: algorithm_type in {sorted(names)} with solver_order=2"
                )
            if option("use_flow_sigmas", False):
                return FLOW_A1111_SAMPLERS[f"flow_{names[algorithm]}"], None
            ours = names[algorithm] + ("_karras" if option("use_karras_sigmas", False) else "")
        elif ours in FLOW_A1111_SAMPLERS:
            return FLOW_A1111_SAMPLERS[ours], None
    else:
        raise ValueError(
            f"unknown sampler {sampler!r}; allowed: {sorted(A1111_SAMPLERS) + sorted(FLOW_A1111_SAMPLERS)}, "
            "diffusers classes "
            f"{sorted(_DIFFUSERS_CLASSES)} or web UI names {sorted(SAMPLERS_FROM_A1111)}"
        )
    if ours in _KARRAS_BY_CONFIG and option("use_karras_sigmas", False):
        legacy = _KARRAS_BY_CONFIG[ours]
        return (legacy, None) if legacy else (A1111_SAMPLERS[ours], "Karras")
    return A1111_SAMPLERS[ours], None


def _option_reader(config):
    if config is None:
        return lambda key, default: default
    if isinstance(config, Mapping):
        return lambda key, default: config.get(key, default)
    return lambda key, default: getattr(config, key, default)


def sampler_from_a1111(
    sampler: str, schedule_type: str | None = None, *, flow: bool = False
) -> tuple[str, dict]:
    """Our sampler for a web UI sampler name (and schedule type).

    Args:
        sampler: the web UI's name ("Euler a", "DPM++ 2M Karras", "DPM++ 2M", ...).
        schedule_type: its "Schedule type" field if the parameters have one ("Karras", "Uniform",
            "Automatic"); None for text written before the web UI had that field (the sampler's plain
            schedule, or the one its name says).
        flow: the name is for a flow-matching model (SD3, Flux): "Euler", "Heun", "DPM++ 2M" and
            "DPM++ 2M SDE" then mean "flow_euler", ... (``FLOW_A1111_SAMPLERS``), on their own schedule
            (schedule type None, "Automatic" or "Uniform").

    Returns:
        ``(registry_name, options)``: a name for ``tf_diffusion.schedulers.get_sampler`` and the
        SchedulerConfig fields to set with it (``{"use_karras_sigmas": True}`` for "Euler" with Karras;
        usually empty).

    Raises:
        ValueError: for a name or schedule this project has no sampler for.
    """
    if not isinstance(sampler, str):
        raise ValueError(f"sampler must be a string, got {type(sampler).__name__}: {sampler!r}")
    if schedule_type is not None and not isinstance(schedule_type, str):
        raise ValueError(f"schedule_type must be a string or None, got {schedule_type!r}")
    name = sampler.strip()
    schedule = schedule_type.strip() if schedule_type is not None else None
    if flow:
        return _flow_sampler_from_a1111(sampler, name, schedule), {}
    base = name
    if name.endswith(" Karras"):
        base = name[: -len(" Karras")]
        if schedule not in (None, "Automatic", "Karras"):
            raise ValueError(
                f"sampler {sampler!r} with schedule type {schedule_type!r} contradict each other"
            )
        schedule = "Karras"
    if base not in SAMPLERS_FROM_A1111 or base.endswith(" Karras"):
        raise ValueError(
            f"web UI sampler {sampler!r} has no equivalent here; allowed: {sorted(SAMPLERS_FROM_A1111)}"
        )
    if schedule is None:
        schedule = "Uniform"
    elif schedule == "Automatic":
        schedule = _AUTOMATIC.get(base, "Uniform")
    ours = SAMPLERS_FROM_A1111[base]
    if schedule == "Uniform":
        return ours, {}
    if schedule == "Karras":
        if f"{ours}_karras" in A1111_SAMPLERS:
            return f"{ours}_karras", {}
        if ours in _KARRAS_BY_CONFIG:
            return ours, {"use_karras_sigmas": True}
    supported = [
        s for s in _SCHEDULES if s != "Karras" or ours in _KARRAS_BY_CONFIG or ours.startswith("dpmpp")
    ]
    raise ValueError(
        f"web UI sampler {sampler!r} with schedule type {schedule!r} has no equivalent here; "
        f"allowed schedule types for it: {supported}"
    )


def _flow_sampler_from_a1111(sampler: str, name: str, schedule: str | None) -> str:
    if name not in FLOW_SAMPLERS_FROM_A1111:
        raise ValueError(
            f"web UI sampler {sampler!r} has no flow-matching equivalent here; allowed: "
            f"{sorted(FLOW_SAMPLERS_FROM_A1111)}"
        )
    if schedule not in (None, "Automatic", "Uniform"):
        raise ValueError(
            f"web UI sampler {sampler!r} with schedule type {schedule!r} has no flow-matching equivalent "
            "here; allowed schedule types: ['Automatic', 'Uniform'] (the model's shifted flow schedule)"
        )
    return FLOW_SAMPLERS_FROM_A1111[name]


def model_hash(path: str | os.PathLike) -> str:
    """The web UI's short model hash of a checkpoint file: the first 10 hex digits of its SHA-256.

    Args:
        path: a single checkpoint file (.safetensors, .ckpt).

    Returns:
        Ten lower-case hex digits, as the web UI writes after ``Model hash:``.

    Raises:
        ValueError: if ``path`` is not a file (a folder has no web UI hash).
        OSError: if the file cannot be read.
    """
    if not os.path.isfile(path):
        raise ValueError(f"model hash needs a checkpoint file, got {os.fspath(path)!r} (not a file)")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:HASH_CHARS]


def legacy_model_hash(path: str | os.PathLike) -> str:
    """The web UI's old short hash of a model file, which the ControlNet extension writes after a
    ControlNet's name (``control_v11p_sd15_canny [d14c016b]``): the first 8 hex digits of the SHA-256 of
    the 64 KiB that start 1 MiB into the file (of nothing, for a file shorter than 1 MiB)."""
    if not os.path.isfile(path):
        raise ValueError(f"model hash needs a file, got {os.fspath(path)!r} (not a file)")
    with open(path, "rb") as handle:
        handle.seek(1 << 20)
        return hashlib.sha256(handle.read(1 << 16)).hexdigest()[:8]


def controlnet_unit_text(fields: Mapping[str, object]) -> str:
    """One ControlNet unit as the web UI's ControlNet extension writes it in ``ControlNet N``:
    ``Module: none, Model: name [hash], Weight: 1.0, ...``. Keys and values may hold neither a comma
    nor a colon (the extension's own rule), since the unit is one comma-separated field list."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if any(c in text for c in ",:") or any(c in key for c in ",:"):
            raise ValueError(f"ControlNet unit field {key!r}: {text!r} may hold neither ',' nor ':'")
        parts.append(f"{key}: {text}")
    return ", ".join(parts)


def parse_controlnet_unit(text: str) -> dict[str, str | float | bool]:
    """A ``ControlNet N`` value back into its fields; numbers and True/False typed, the rest strings.

    Raises:
        ValueError: for an item that is not ``Key: value``.
    """
    out: dict[str, str | float | bool] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if not sep or not key:
            raise ValueError(f"ControlNet unit item {item.strip()!r} is not 'Key: value' (in {text!r})")
        if value in ("True", "False"):
            out[key] = value == "True"
            continue
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _value_text(key: str, value) -> str:
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        text = str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    elif isinstance(value, str):
        text = value
    else:
        raise ValueError(f"{key} must be a string or a number, got {type(value).__name__}: {value!r}")
    return _quote(text)


def _quote(text: str) -> str:
    # The web UI quotes values with a comma, colon or line break; we also quote what would otherwise not
    # read back as written (surrounding spaces, a leading quote, an empty value).
    if text and text == text.strip() and not text.startswith('"') and not any(c in text for c in ",:\n\r"):
        return text
    return json.dumps(text, ensure_ascii=False)


def _check_text(name: str, text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} cannot be stored in a PNG (not encodable as UTF-8): {error}") from None
    return text


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}: {value!r}")
    return value


def format_parameters(
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str | None = None,
    model_hash: str | None = None,
    scheduler_config=None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The web UI's "parameters" text for one image.

    Args:
        prompt: the prompt, as typed (may span lines).
        negative_prompt: the negative prompt; its line is left out when empty.
        steps: inference steps.
        sampler: our sampler registry name, a diffusers scheduler class name, or a web UI name
            (see ``a1111_sampler``); written as the web UI names it.
        cfg_scale: the guidance scale.
        seed: this image's own seed.
        width: image width in pixels.
        height: image height in pixels.
        model_name: written as ``Model``; left out when None.
        model_hash: written as ``Model hash`` (``model_hash(path)``); left out when None.
        scheduler_config: the sampler's options, for ``a1111_sampler``.
        extra: further fields in order, keyed as the web UI writes them (``{"Denoising strength": 0.75,
            "Batch size": 2, "Batch pos": 0}``); values are strings or numbers.

    Returns:
        The text, in the web UI's layout (see the module docstring); ``parse_parameters`` reads it back.

    Raises:
        ValueError: for a value of the wrong type, a non-finite number, an unknown sampler, a key that is
            not a web UI key or repeats a standard field, text that a PNG cannot hold, or a prompt line
            starting with "Negative prompt:" (it would read back as the negative prompt).
    """
    prompt = _check_text("prompt", prompt)
    negative_prompt = _check_text("negative_prompt", negative_prompt)
    # The reader strips the whole text first, so the first line counts without its leading whitespace.
    for line in [prompt.lstrip(), *prompt.split("\n")]:
        if line.startswith(_NEGATIVE):
            raise ValueError(
                f"prompt line {line[:60]!r} starts with {_NEGATIVE!r} and would read back as the negative prompt"
            )
    name, schedule_type = a1111_sampler(sampler, scheduler_config)
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
        raise ValueError(f"cfg_scale must be a number, got {type(cfg_scale).__name__}: {cfg_scale!r}")
    fields = [
        ("Steps", _check_int("steps", steps)),
        ("Sampler", name),
        *([("Schedule type", schedule_type)] if schedule_type else []),
        ("CFG scale", float(cfg_scale)),
        ("Seed", _check_int("seed", seed)),
    ]
    size = f"{_check_int('width', width)}x{_check_int('height', height)}"
    fields.append(("Size", size))
    if model_hash is not None:
        fields.append(("Model hash", _check_text("model_hash", model_hash)))
    if model_name is not None:
        fields.append(("Model", _check_text("model_name", model_name)))
    taken = {key for key, _ in fields} | set(_FIELDS)
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key != key.strip():
            raise ValueError(
                f"extra key {key!r} is not a web UI key (a word character, then letters, digits, spaces, '-', '/')"
            )
        if key in taken:
            raise ValueError(f"extra key {key!r} repeats a field that format_parameters writes itself")
        if isinstance(value, str):
            _check_text(f"extra[{key!r}]", value)
        fields.append((key, value))
        taken.add(key)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_value_text(key, value)}" for key, value in fields))
    return "\n".join(lines)


def _read_fields(line: str) -> list[tuple[str, str]]:
    """The ``Key: value`` fields of a parameters line; text that is not a field is skipped."""
    fields = []
    i, n = 0, len(line)
    colon = -1
    while i < n:
        if colon < i:  # searched again only once passed: linear time on hostile lines
            colon = line.find(":", i)
            if colon < 0:
                break
        comma = line.find(",", i, colon)
        if comma >= 0:  # a segment without a key: skip it
            i = comma + 1
            continue
        key = line[i:colon].strip()
        i = colon + 1
        while i < n and line[i] in " \t":
            i += 1
        value, end = None, -1
        if i < n and line[i] == '"':
            end = _closing_quote(line, i)
            if end > 0:
                after = end + 1
                while after < n and line[after] in " \t":
                    after += 1
                if after == n or line[after] == ",":
                    try:
                        value = json.loads(line[i : end + 1])
                    except ValueError:  # a malformed escape: keep the text as written, as the web UI does
                        value = line[i : end + 1]
                    i = after + 1
        if value is None:
            comma = line.find(",", i)
            comma = n if comma < 0 else comma
            value = line[i:comma].strip()
            i = comma + 1
        if _KEY.fullmatch(key):
            fields.append((key, value))
    return fields


def _closing_quote(line: str, start: int) -> int:
    i = start + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == '"':
            return i
        i += 1
    return -1


def _typed(key: str, kind, text: str):
    if kind is str:
        return text
    pattern = {int: _INT, float: _FLOAT, "size": _SIZE}[kind]
    match = pattern.fullmatch(text)
    if match is None:
        what = {int: "an integer", float: "a number", "size": "WIDTHxHEIGHT"}[kind]
        raise ValueError(f"parameters field {key}: {text[:60]!r} is not {what}")
    if kind == "size":
        return int(match.group(1)), int(match.group(2))
    value = kind(text)
    if kind is float and not math.isfinite(value):
        raise ValueError(f"parameters field {key}: {text[:60]!r} is not a finite number")
    return value


def parse_parameters(text: str) -> dict:
    """Read a "parameters" text written by ``format_parameters`` or by the web UI.

    Args:
        text: the text of a PNG's "parameters" chunk.

    Returns:
        A dict with ``prompt`` and ``negative_prompt`` (surrounding whitespace removed; "" when absent),
        the fields ``format_parameters`` takes by name when present (``steps``, ``sampler`` as the web UI
        names it, ``cfg_scale``, ``seed``, ``width``, ``height``, ``model_hash``, ``model_name``), and
        ``extra``: every other field in order, as strings, under the web UI's key ("Schedule type",
        "Denoising strength", "Version", ...). A repeated key keeps its last value. Text whose last line
        has fewer than three fields is all prompt.

    Raises:
        ValueError: if ``text`` is not a string, or a known field's value has the wrong form
            (``Steps: many``, ``Size: big``).

    Example:
        >>> parse_parameters("a cat\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768")["height"]
        768
    """
    if not isinstance(text, str):
        raise ValueError(f"parameters must be a string, got {type(text).__name__}: {text!r}")
    *lines, last = text.strip().split("\n")
    fields = _read_fields(last)
    if len(fields) < _MIN_FIELDS:
        lines.append(last)
        fields = []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if negative_lines or line.startswith(_NEGATIVE):
            negative_lines.append(line[len(_NEGATIVE) :] if not negative_lines else line)
        else:
            prompt_lines.append(line)
    out: dict = {
        "prompt": "\n".join(prompt_lines).strip(),
        "negative_prompt": "\n".join(negative_lines).strip(),
    }
    extra: dict[str, str] = {}
    for key, value in fields:
        if key in _FIELDS:
            name, kind = _FIELDS[key]
            typed = _typed(key, kind, value)
            if kind == "size":
                out["width"], out["height"] = typed
            else:
                out[name] = typed
        else:
            extra.pop(key, None)  # the last of a repeated key, in its own place
            extra[key] = value
    out["extra"] = extra
    return out


# ------------------------------------------------------------------ SDXL fields

# The web UI writes the refiner as "Refiner: TITLE" (its checkpoint title, "name [short hash]") and
# "Refiner switch at: FRACTION" (modules/processing_scripts/refiner.py). It writes no micro-conditioning
# or aesthetic-score fields (those are its settings sdxl_crop_top / sdxl_crop_left and the refiner's
# high / low aesthetic score), so the fields below are ours, written only when a value was given, in the
# web UI's forms: sizes as "WIDTHxHEIGHT" (as "Size"), the crop as its two settings.
_REFINER = re.compile(r"(.*?)(?: \[([0-9a-fA-F]{8,64})\])?")
_SDXL_SIZES = {"original_size": "Original size", "target_size": "Target size"}
_SDXL_SCORES = {"aesthetic_score": "Aesthetic score", "negative_aesthetic_score": "Negative aesthetic score"}
_CROP = ("Crop top", "Crop left")


def sdxl_fields(
    *,
    refiner: str | None = None,
    refiner_hash: str | None = None,
    refiner_switch_at: float | None = None,
    options: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The SDXL fields of a parameters text, for ``format_parameters(extra=...)``.

    Args:
        refiner: the refiner model's name ("Refiner"); with ``refiner_hash`` written "name [hash]" as the
            web UI writes a checkpoint title.
        refiner_hash: the refiner file's short hash (``model_hash``), or None.
        refiner_switch_at: the fraction of the schedule where the refiner took over ("Refiner switch at").
        options: micro-conditioning values given (``SDXLOptions`` field names: ``original_size`` and
            ``target_size`` as (height, width), ``crops_coords_top_left`` as (top, left),
            ``aesthetic_score``, ``negative_aesthetic_score``); other fields (the ``negative_`` sizes and
            crop) have no parameters field and are refused.

    Returns:
        Web UI key -> value, in the order written.

    Raises:
        ValueError: for a switch fraction outside (0, 1), a refiner hash without a refiner, or an option
            that has no field.
    """
    out: dict[str, object] = {}
    if refiner is not None:
        _check_text("refiner", refiner)
        out["Refiner"] = (
            refiner if refiner_hash is None else f"{refiner} [{_check_text('refiner_hash', refiner_hash)}]"
        )
    elif refiner_hash is not None:
        raise ValueError("refiner_hash needs refiner (the refiner model's name)")
    if refiner_switch_at is not None:
        if (
            isinstance(refiner_switch_at, bool)
            or not isinstance(refiner_switch_at, (int, float))
            or not 0.0 < refiner_switch_at < 1.0
        ):
            raise ValueError(
                f"refiner_switch_at={refiner_switch_at!r} must be a fraction strictly between 0 and 1"
            )
        out["Refiner switch at"] = float(refiner_switch_at)
    options = dict(options or {})
    allowed = [*_SDXL_SIZES, "crops_coords_top_left", *_SDXL_SCORES]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"SDXL options {unknown} have no parameters field; allowed: {allowed}")
    for name, key in _SDXL_SIZES.items():
        if options.get(name) is not None:
            height, width = options[name]
            out[key] = f"{_check_int(name, int(width))}x{_check_int(name, int(height))}"
    if options.get("crops_coords_top_left") is not None:
        top, left = options["crops_coords_top_left"]
        out[_CROP[0]], out[_CROP[1]] = int(top), int(left)
    for name, key in _SDXL_SCORES.items():
        if options.get(name) is not None:
            out[key] = float(options[name])
    return out


def parse_sdxl_fields(extra: Mapping[str, str]) -> dict:
    """The SDXL fields of ``parse_parameters(text)["extra"]``, typed; the inverse of ``sdxl_fields``.

    Returns:
        A dict with whichever are present: ``refiner`` (the name), ``refiner_hash``, ``refiner_switch_at``
        and ``options`` (``SDXLOptions`` field -> value: sizes as (height, width), the crop as (top, left),
        scores as floats; ``{}`` when none).

    Raises:
        ValueError: naming the field, for a value of the wrong form (``Target size: big``), a switch
            fraction outside (0, 1), or only one of "Crop top" / "Crop left".
    """
    out: dict = {}
    if "Refiner" in extra:
        match = _REFINER.fullmatch(extra["Refiner"].strip())
        out["refiner"] = match.group(1)
        if match.group(2) is not None:
            out["refiner_hash"] = match.group(2)
    if "Refiner switch at" in extra:
        value = _typed("Refiner switch at", float, extra["Refiner switch at"])
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"parameters field Refiner switch at: {value!r} is not a fraction strictly between 0 and 1"
            )
        out["refiner_switch_at"] = value
    options: dict = {}
    for name, key in _SDXL_SIZES.items():
        if key in extra:
            width, height = _typed(key, "size", extra[key])
            options[name] = (height, width)
    crop = [key in extra for key in _CROP]
    if any(crop):
        if not all(crop):
            raise ValueError('parameters fields "Crop top" and "Crop left" come together; only one was found')
        options["crops_coords_top_left"] = tuple(_typed(key, int, extra[key]) for key in _CROP)
    for name, key in _SDXL_SCORES.items():
        if key in extra:
            options[name] = _typed(key, float, extra[key])
    out["options"] = options
    return out


def generation_parameters(
    info,
    index: int,
    model: str,
    model_hash: str | None = None,
    *,
    refiner: str | None = None,
    refiner_hash: str | None = None,
    sdxl_options: dict | None = None,
    strength: float | None = None,
) -> str:
    """Image ``index``'s generation parameters as AUTOMATIC1111 writes them, from what generate() did.

    The command line and the server write their PNGs with this.

    Args:
        info: the ``GenerationInfo`` that ``generate()`` returned with the images (with a refiner, the
            refiner's: its ``denoising_start`` is the "Refiner switch at").
        index: the image's position in the batch.
        model: the model as the user named it.
        model_hash: the web UI's short hash of a single checkpoint file, or None.
        refiner: the refiner as the user named it ("Refiner"), or None; refiner_hash: its file's hash.
        sdxl_options: the micro-conditioning values given (both stages'); default ``info.sdxl_options``.
        strength: the base's img2img strength when a refiner ran (the refiner's info has none).
    """
    extra = {}
    strength = info.strength if strength is None else strength
    if strength is not None:
        extra["Denoising strength"] = strength
    if info.mask_blur is not None:
        extra["Mask blur"] = info.mask_blur
    if len(info.seeds) > 1:
        extra.update({"Batch size": len(info.seeds), "Batch pos": index})
    extra.update(info.extra_params)  # "Lora hashes", "TI hashes"
    extra.update(
        sdxl_fields(
            refiner=refiner,
            refiner_hash=refiner_hash,
            refiner_switch_at=info.denoising_start if refiner is not None else None,
            options=info.sdxl_options if sdxl_options is None else sdxl_options,
        )
    )
    return format_parameters(
        info.prompts[index],
        info.negative_prompts[index],
        steps=info.num_steps,
        sampler=info.sampler,
        cfg_scale=info.guidance_scale,
        seed=info.seeds[index],
        width=info.width,
        height=info.height,
        model_name=model,
        model_hash=model_hash,
        scheduler_config=info.sampler_options or None,
        extra=extra,
    )
