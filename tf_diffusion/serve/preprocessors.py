"""The ControlNet extension's preprocessor modules that need no downloaded model, as its API names them.

A unit's ``module`` (and ``POST /controlnet/detect``) turns the uploaded picture into the hint: "none" takes
it as it is; "canny" runs OpenCV's Canny edge detector (``tf_diffusion.preprocess.canny``, what the extension
runs) at ``processor_res`` on the short side, with ``threshold_a`` / ``threshold_b`` as the low / high
thresholds; "invert" turns white-background line art into the black-background hints line-art models take.
``-1`` (the extension's "unset") means the module's default. Values outside a slider's range are refused
with the range named, not clamped.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Slider:
    """One of a module's numeric settings, as ``/controlnet/module_list``'s ``module_detail`` lists it."""

    name: str
    value: int
    min: int
    max: int


@dataclasses.dataclass(frozen=True)
class Module:
    """A preprocessor: its sliders in the order ``processor_res``, ``threshold_a``, ``threshold_b``."""

    name: str
    resolution: Slider | None = None
    sliders: tuple[Slider, ...] = ()

    def detail(self) -> dict:
        sliders = [s for s in (self.resolution, *self.sliders) if s is not None]
        return {"model_free": True, "sliders": [dataclasses.asdict(s) for s in sliders]}


_RESOLUTION = Slider("Preprocessor Resolution", 512, 64, 2048)
MODULES = {
    "none": Module("none"),
    "canny": Module(
        "canny",
        _RESOLUTION,
        (Slider("Canny Low Threshold", 100, 1, 255), Slider("Canny High Threshold", 200, 1, 255)),
    ),
    "invert": Module("invert", _RESOLUTION),
}


def lookup(name) -> Module:
    """The module of that name (case-insensitive); ValueError naming the allowed ones."""
    module = MODULES.get(str(name).lower()) if isinstance(name, str) else None
    if module is None:
        raise ValueError(
            f"module={name!r} is not supported; allowed: {sorted(MODULES)} (preprocessors needing a "
            f"downloaded model are not available: send their output with module 'none')"
        )
    return module


def settings(module: Module, processor_res=-1, threshold_a=-1, threshold_b=-1) -> tuple[int | None, ...]:
    """The module's values for the request's ``processor_res``, ``threshold_a``, ``threshold_b`` (-1: default).

    Raises:
        ValueError: a value that is not a number or outside its slider's range (both named).
    """
    sliders = (module.resolution, *(list(module.sliders) + [None, None])[:2])
    given = zip(
        ("processor_res", "threshold_a", "threshold_b"),
        (processor_res, threshold_a, threshold_b),
        sliders,
        strict=True,
    )
    out = []
    for field, value, slider in given:
        if slider is None:
            out.append(None)  # the module has no such setting: the extension ignores it too
            continue
        if value is None or value == -1:
            out.append(slider.value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"{field}={value!r} ({slider.name}): must be a whole number")
        if not slider.min <= value <= slider.max:
            raise ValueError(
                f"{field}={value!r} ({slider.name}) is out of range; allowed: {slider.min} to {slider.max}"
            )
        out.append(int(value))
    return tuple(out)


def _at_resolution(picture, resolution: int):
    """The picture scaled so its short side is ``resolution`` (bicubic up, box-averaged down)."""
    from PIL import Image

    w, h = picture.size
    ratio = resolution / min(w, h)
    size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    if size == (w, h):
        return picture
    return picture.resize(size, Image.BICUBIC if ratio > 1 else Image.BOX)


def run(module: Module, picture, values: tuple[int | None, ...]):
    """The hint the module makes of a PIL picture, as an RGB PIL image (at ``processor_res``)."""
    from PIL import Image

    picture = picture.convert("RGB")
    if module.name == "none":
        return picture
    resolution, low, high = values
    picture = _at_resolution(picture, resolution)
    if module.name == "canny":
        from tf_diffusion.preprocess import canny

        if low > high:
            raise ValueError(f"threshold_a={low} (low) must not exceed threshold_b={high} (high)")
        return Image.fromarray(canny(np.asarray(picture), low, high))
    return Image.fromarray(255 - np.asarray(picture))  # "invert"
