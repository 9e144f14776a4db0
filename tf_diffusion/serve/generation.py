"""A1111 requests as ``StableDiffusion.generate()`` calls, and their answers as the web UI gives them.

Seeds follow the web UI: ``seed=-1`` draws one in [0, 2**32 - 1); image ``i`` of the request (batch by
batch, ``n_iter`` batches of ``batch_size``) has seed ``seed + i``, which is what ``generate()`` gives
image ``b`` of a batch started at ``seed + k * batch_size``, so every image is reproduced by
``generate(seed=its seed)``. Each image's PNG carries its parameters (``tf_diffusion.infotext``), and
``info`` is the web UI's JSON (``infotexts``, ``all_seeds``, ``all_prompts``, ...).

Inpainting (``mask``): ``inpainting_fill=1`` ("original": start from the noised image, as
``generate(mask=...)`` does), 0 ("fill": the masked pixels first take the colours around them,
``fill_masked``), 2 and 3 ("latent noise", "latent nothing": the pixels filled as for 0, then the masked
latents replaced by the seed's noise or by zeros, ``generate(masked_content=)``, as the web UI does).
White repaints, ``inpainting_mask_invert=1`` swaps. ``resize_mode`` 0, 1, 2 (just resize, crop and resize,
resize and fill: ``resize_picture``) bring the pictures to width x height; 3 ("just resize (latent
upscale)", without a mask) encodes the picture at its own size and resizes the latents
(``generate(resize_latents=True)``). ``mask_blur`` is the
radius over which the original pixels are pasted back outside the mask (``generate(mask_blur=)``).
``inpaint_full_res`` ("only masked", the web UI's default): the masked area's bounding box, grown by
``inpaint_full_res_padding`` and then to the request's aspect ratio, is cut out, resized to width x height
and inpainted by ``generate()``; the result is resized back into the full picture, blended over the
blurred mask, so the picture keeps its size and every pixel away from the mask is the original's.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import secrets
import struct
import tempfile
import warnings

import numpy as np

from tf_diffusion.serve import preprocessors, schema
from tf_diffusion.serve.jobs import Interrupted, Job, Skipped

# The web UI's scheduler names (its /sdapi/v1/schedulers) -> the schedule types infotext knows.
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
INPAINTING_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# The web UI's resize modes (0-2 work on pixels, 3 on the encoded latents).
RESIZE_MODES = {
    0: "just resize",
    1: "crop and resize",
    2: "resize and fill",
    3: "just resize (latent upscale)",
}
LATENT_RESIZE = 3
# inpainting_fill -> generate(masked_content=)
MASKED_CONTENT = {0: "original", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
# "fill": blurs of the kept pixels at these radii, coarse to fine, each laid over the last `repeats`
# times, so a hole takes the colours around it while every kept pixel stays exact (radius 0 last).
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
MAX_SEED = 2**32 - 1
# SD's 4 latent channels -> RGB, a linear fit of decoded colours (the web UI's "Approx cheap" preview
# uses the same kind of map): good enough to watch a picture form, at no decode cost.
_LATENT_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    np.float32,
)


class ApiError(Exception):
    """An answer other than 200, in the web UI's error shape (see ``app.error_body``)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def decode_image(text, what: str, max_pixels: int):
    """A base64 image (optionally a ``data:image/...;base64,`` URL), its size checked before decoding."""
    from PIL import Image

    from tf_diffusion.images import check_image_size

    if not isinstance(text, str) or not text:
        raise ApiError(422, f"{what}: expected a base64-encoded image")
    if text.startswith(("http://", "https://")):
        raise ApiError(422, f"{what}: image URLs are not fetched; send the image as base64")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ApiError(422, f"{what}: a data URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what}: not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # the header only
                check_image_size(*image.size, what, max_pixels)
                image.load()
                return image.copy()
    except Image.DecompressionBombError:
        declared = ""
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":  # the size a PNG header declares
            declared = " {}x{}".format(*struct.unpack(">II", data[16:24]))
        raise ApiError(
            413,
            f"{what}: the image declares{declared or ' more'} pixels, over the server's limit of "
            f"{max_pixels:,} pixels",
        ) from None
    except ValueError as e:
        if "more than the image limit" in str(e):
            raise ApiError(
                413, str(e).replace("raise it with max_pixels=... or", "the server's limit is")
            ) from None
        raise ApiError(422, f"{what}: cannot read the image: {e}") from None
    except Image.UnidentifiedImageError:
        raise ApiError(422, f"{what}: not an image file the server can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, EOFError, MemoryError) as e:
        raise ApiError(422, f"{what}: cannot read the image ({e or type(e).__name__})") from None


def png_base64(image: np.ndarray, parameters: str | None) -> str:
    """A uint8 (H, W, 3) image as base64 PNG with a ``parameters`` text chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def preview(latents) -> np.ndarray | None:
    """A cheap RGB picture of the first image's latents (h, w, 3) uint8, without the VAE."""
    if latents is None:
        return None
    x = np.asarray(latents, np.float32)[0]  # (h, w, C)
    if x.shape[-1] == 4:
        rgb = x @ _LATENT_RGB
        rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-6)
    else:
        rgb = x[..., :3] if x.shape[-1] >= 3 else np.repeat(x[..., :1], 3, axis=-1)
        rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-6)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


_LANCZOS = 1  # PIL.Image.LANCZOS, without importing PIL at module level


def crop_region(mask, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) that "only masked" inpainting cuts out of the picture.

    The bounding box of the mask's non-zero pixels, grown by ``padding`` on every side, then grown (centred,
    within the picture) to the aspect ratio ``width / height`` so that resizing the crop distorts nothing.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        raise ApiError(
            422, "mask: it is empty (all black); with inpaint_full_res there is nothing to inpaint"
        )
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    h_img, w_img = m.shape
    left, right = max(int(cols[0]) - padding, 0), min(int(cols[-1]) + 1 + padding, w_img)
    top, bottom = max(int(rows[0]) - padding, 0), min(int(rows[-1]) + 1 + padding, h_img)
    w, h = right - left, bottom - top
    # grow the short side to the target aspect ratio, centred, then shift back inside the picture
    if w / h < width / height:
        w = min(int(math.ceil(h * width / height)), w_img)
    else:
        h = min(int(math.ceil(w * height / width)), h_img)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(round(cx - w / 2), 0), w_img - w))
    top = int(min(max(round(cy - h / 2), 0), h_img - h))
    return left, top, left + w, top + h


def paste_region(init, mask, picture: np.ndarray, crop, blur: float) -> np.ndarray:
    """Put an "only masked" result back: resized into ``crop`` of ``init``, blended over the blurred mask."""
    from PIL import Image, ImageFilter

    full = np.asarray(init, np.float32).copy()
    left, top, right, bottom = crop
    patch = Image.fromarray(np.asarray(picture, np.uint8)).resize((right - left, bottom - top), _LANCZOS)
    generated = full.copy()
    generated[top:bottom, left:right] = np.asarray(patch, np.float32)
    soft = mask if blur <= 0 else mask.filter(ImageFilter.GaussianBlur(blur))
    soft = np.asarray(soft, np.float32)[..., None] / 255.0
    return np.clip(np.round(soft * generated + (1.0 - soft) * full), 0, 255).astype(np.uint8)


def sampler_for(sd, sampler_name: str | None, sampler_index: str | None, scheduler: str | None):
    """Our sampler object for the web UI's sampler and scheduler names (404 / 422 when unknown)."""
    from tf_diffusion.infotext import sampler_from_a1111
    from tf_diffusion.schedulers import get_sampler

    name = sampler_name or sampler_index or "Euler"
    schedule = None
    if scheduler is not None:
        key = scheduler.strip().lower()
        if key not in SCHEDULES:
            raise ApiError(
                422,
                f"scheduler {scheduler!r} is not supported; allowed: {sorted(SCHEDULES)} (GET /sdapi/v1/schedulers)",
            )
        schedule = SCHEDULES[key]
    try:
        ours, options = sampler_from_a1111(name, schedule)
    except ValueError as e:
        raise ApiError(404, f"Sampler not found: {e}") from None
    config = sd.config.scheduler
    if options:
        config = dataclasses.replace(config, **options)
    return get_sampler(ours, config)


def check_request(req: schema._Request, registry, options: dict) -> None:
    """Refuse what the server does not do, naming the field and what is allowed (422)."""
    for field, (allowed, ok) in schema.UNSUPPORTED.items():
        if field in type(req).model_fields and not ok(getattr(req, field)):
            raise ApiError(422, f"{field}={getattr(req, field)!r} is not supported here; allowed: {allowed}")
    for name, script in (req.alwayson_scripts or {}).items():
        args = script.get("args") if isinstance(script, dict) else script
        if name.lower() == "controlnet":
            control_units(req, registry)
        elif args:  # clients send {"ADetailer": {"args": []}} to say "not used"
            raise ApiError(
                422, f"always on script {name!r} not found; allowed: ControlNet (GET /sdapi/v1/scripts)"
            )
    if req.seed < -1:
        raise ApiError(422, f"seed={req.seed}: must be -1 (random) or in [0, {2**63 - 1}]")
    if not math.isfinite(req.cfg_scale):
        raise ApiError(422, f"cfg_scale={req.cfg_scale}: must be a finite number")
    for key, value in (req.override_settings or {}).items():
        if key == "sd_model_checkpoint":
            registry.lookup(value)
        elif key not in options or options[key] != value:
            raise ApiError(
                422,
                f"override_settings[{key!r}]={value!r} is not supported; allowed: sd_model_checkpoint, or an "
                f"option at its current value (GET /sdapi/v1/options)",
            )


def check_img2img(req: schema.Img2ImgRequest, has_mask: bool) -> None:
    """Refuse img2img and inpainting settings the server does not do, naming the field (422)."""
    if has_mask:
        if req.inpainting_fill not in INPAINTING_FILLS:
            raise ApiError(
                422,
                f"inpainting_fill={req.inpainting_fill} is not supported; allowed: "
                + ", ".join(f"{k} ({v})" for k, v in INPAINTING_FILLS.items()),
            )
        if req.resize_mode == LATENT_RESIZE:
            raise ApiError(
                422,
                f"resize_mode={LATENT_RESIZE} ({RESIZE_MODES[LATENT_RESIZE]}) is for img2img without a mask; "
                f"with a mask use 0, 1 or 2",
            )
        if not 0 <= req.inpaint_full_res_padding <= 1024:
            raise ApiError(
                422, f"inpaint_full_res_padding={req.inpaint_full_res_padding}: allowed 0 to 1024 pixels"
            )
        if req.inpainting_mask_invert not in (0, 1):
            raise ApiError(422, f"inpainting_mask_invert={req.inpainting_mask_invert}: allowed 0 or 1")
        if req.mask_blur is not None and not 0 <= req.mask_blur <= 64:
            raise ApiError(422, f"mask_blur={req.mask_blur}: allowed 0 to 64 pixels")
    if not 0.0 <= req.denoising_strength <= 1.0:
        raise ApiError(422, f"denoising_strength={req.denoising_strength}: allowed [0, 1]")
    if req.resize_mode not in RESIZE_MODES:
        raise ApiError(
            422,
            f"resize_mode={req.resize_mode} is not supported; allowed: "
            + ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items()),
        )


def prepare_images(init, mask, req: schema.Img2ImgRequest):
    """Resize to the request's size (``resize_mode``, as the web UI) and make the mask greyscale / inverted.

    With a mask and ``inpaint_full_res`` ("only masked") the pictures keep their size: the masked area is
    cropped and resized by ``crop_region`` in ``run``. With ``inpainting_fill=0`` the masked pixels are
    replaced by the colours around them (``fill_masked``) there, on what ``generate()`` is given.
    """
    from PIL import ImageOps

    size = (req.width, req.height)
    keep = mask is not None and req.inpaint_full_res
    init = init.convert("RGB")
    if mask is not None:
        mask = mask.convert("L")
        if req.inpainting_mask_invert == 1:
            mask = ImageOps.invert(mask)
        if keep and mask.size != init.size:
            raise ApiError(
                422,
                f"mask is {mask.size[0]}x{mask.size[1]} but init_images[0] is {init.size[0]}x{init.size[1]}; "
                f"with inpaint_full_res they must match",
            )
        if not keep and mask.size != size:
            mask = resize_picture(mask, size, req.resize_mode)
    if not keep and init.size != size and req.resize_mode != LATENT_RESIZE:
        init = resize_picture(init, size, req.resize_mode)
    return init, mask


def resize_picture(picture, size: tuple[int, int], mode: int):
    """``picture`` at ``size`` (width, height) as the web UI's resize modes make it.

    0 "just resize": stretched. 1 "crop and resize": scaled to cover ``size``, the overflow cut off evenly
    on both sides. 2 "resize and fill": scaled to fit inside ``size``, centred, and the empty bands filled
    by stretching the picture's edge rows (or columns) across them.
    """
    from PIL import Image

    width, height = size
    if mode == 0:
        return picture.resize(size, Image.LANCZOS)
    w, h = picture.size
    ratio = max(width / w, height / h) if mode == 1 else min(width / w, height / h)
    sw, sh = max(1, round(w * ratio)), max(1, round(h * ratio))
    scaled = picture.resize((sw, sh), Image.LANCZOS)
    if mode == 1:
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    x = np.asarray(scaled)
    top, left = (height - sh) // 2, (width - sw) // 2
    pad = ((top, height - sh - top), (left, width - sw - left)) + ((0, 0),) * (x.ndim - 2)
    return Image.fromarray(np.pad(x, pad, mode="edge"), picture.mode)


def _blur(x: np.ndarray, radius: int) -> np.ndarray:
    """About a Gaussian of ``radius`` (sigma) over H and W: three box blurs, zero outside the picture."""
    r = max(1, int(round(radius)))
    for axis in (0, 1):
        for _ in range(3):
            n = x.shape[axis]
            c = np.cumsum(x, axis=axis, dtype=np.float64)
            zero = np.zeros_like(np.take(c, [0], axis=axis))
            c = np.concatenate([zero, c], axis=axis)
            hi = np.take(c, np.minimum(np.arange(n) + r + 1, n), axis=axis)
            lo = np.take(c, np.maximum(np.arange(n) - r, 0), axis=axis)
            x = hi - lo
    return x


def fill_masked(picture, mask):
    """The web UI's ``inpainting_fill=0`` ("fill"): masked pixels take the colours around them.

    ``mask`` (L, white = repaint) weighs each pixel by how much it is kept; each pass lays the blur of
    the kept colours (weighted by the blurred weights, so the hole's own colours count for nothing) over
    the result, from a radius of 256 pixels down to the pixels themselves, where every kept pixel is exact.
    """
    from PIL import Image

    rgb = np.asarray(picture.convert("RGB"), np.float64) / 255.0
    keep = 1.0 - np.asarray(mask.convert("L"), np.float64)[..., None] / 255.0
    premultiplied, coverage = np.zeros_like(rgb), np.zeros_like(keep)
    for radius, repeats in _FILL_PASSES:
        if radius:
            weight = _blur(keep, radius)
            colour = _blur(rgb * keep, radius) / np.maximum(weight, 1e-12)
            alpha = np.clip(weight / _blur(np.ones_like(keep), radius), 0.0, 1.0)  # kept share, edges too
        else:
            colour, alpha = rgb, keep
        for _ in range(repeats):  # "over" compositing, in premultiplied colours
            premultiplied = colour * alpha + premultiplied * (1.0 - alpha)
            coverage = alpha + coverage * (1.0 - alpha)
    out = premultiplied / np.maximum(coverage, 1e-12)
    return Image.fromarray(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8))


# The ControlNet extension's control modes and resize modes, by number and by name.
CONTROL_MODES = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
CONTROL_RESIZE = {
    0: 0,
    1: 1,
    2: 2,
    "just resize": 0,
    "crop and resize": 1,
    "inner fit (scale to fit)": 1,
    "resize and fill": 2,
    "outer fit (shrink to fit)": 2,
}


def control_units(req: schema._Request, registry) -> list[dict]:
    """The enabled units of ``alwayson_scripts["ControlNet"]``, checked (no image decoded, no net loaded).

    A unit as the ControlNet extension's API takes it: ``image`` (base64, or ``{"image": ...}``; also
    ``input_image``), ``model`` (a name in the ControlNet folder), ``module``, ``weight``, ``guidance_start``, ``guidance_end``, ``control_mode`` (0 "Balanced" or
    2 "ControlNet is more important", which is guess mode, the same for every unit), ``resize_mode``
    (how the hint is brought to the output size; "Crop and Resize" by default, as the extension).
    ``module`` is a preprocessor of ``preprocessors.MODULES`` ("none": the image is the hint as it is;
    "canny", "invert") with ``processor_res``, ``threshold_a`` / ``threshold_b`` and ``pixel_perfect``;
    ``low_vram`` and ``hr_option`` only matter to memory or hires fix and are accepted without effect.
    """
    script = next((v for k, v in (req.alwayson_scripts or {}).items() if k.lower() == "controlnet"), None)
    if script is None:
        return []
    args = script.get("args") if isinstance(script, dict) else script
    if not isinstance(args, list):
        raise ApiError(422, 'alwayson_scripts["ControlNet"]: expected {"args": [unit, ...]}')
    units = []
    for k, unit in enumerate(args):
        what = f'alwayson_scripts["ControlNet"].args[{k}]'
        if not isinstance(unit, dict):
            raise ApiError(422, f"{what}: expected a unit object, got {type(unit).__name__}")
        if unit.get("enabled", True) is False:
            continue
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):
            if image.get("mask"):
                raise ApiError(422, f"{what}.image.mask: unit masks are not supported; allowed: none")
            image = image.get("image")
        if not image:
            raise ApiError(422, f"{what}.image: the hint image (base64) is missing")
        if unit.get("mask"):
            raise ApiError(422, f"{what}.mask: unit masks are not supported; allowed: null")
        try:
            module = preprocessors.lookup(unit.get("module") or "none")
            values = preprocessors.settings(
                module, *(unit.get(k, -1) for k in ("processor_res", "threshold_a", "threshold_b"))
            )
        except ValueError as e:
            raise ApiError(422, f"{what}.{e}") from None
        model = unit.get("model")
        if not model or str(model).lower() == "none":
            raise ApiError(422, f"{what}.model: name a ControlNet model (GET /controlnet/model_list)")
        try:
            registry.controlnet_path(model)
        except ValueError as e:
            raise ApiError(422, f"{what}.model: {e}") from None
        mode = unit.get("control_mode", 0)
        mode = next((n for n, name in CONTROL_MODES.items() if mode in (n, name)), mode)
        if mode not in (0, 2):
            raise ApiError(
                422,
                f"{what}.control_mode={unit.get('control_mode')!r} is not supported; allowed: 0 "
                f"'Balanced', 2 'ControlNet is more important'",
            )
        resize = unit.get("resize_mode", "Crop and Resize")
        resize_key = resize.lower() if isinstance(resize, str) else resize
        if resize_key not in CONTROL_RESIZE:
            raise ApiError(
                422,
                f"{what}.resize_mode={resize!r} is not supported; allowed: 'Just Resize', 'Crop and Resize', "
                f"'Resize and Fill' (or 0, 1, 2)",
            )
        numbers = {}
        for field, default in (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0)):
            value = unit.get(field, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ApiError(422, f"{what}.{field}={value!r}: must be a finite number")
            numbers[field] = float(value)
        units.append(
            {
                "image": image,
                "model": model,
                "guess": mode == 2,
                "resize": CONTROL_RESIZE[resize_key],
                "module": module,
                "values": values,
                "pixel_perfect": unit.get("pixel_perfect") is True,
                **numbers,
            }
        )
    if len({u["guess"] for u in units}) > 1:
        raise ApiError(
            422,
            "ControlNet units: control_mode must be the same for every unit (guess mode is per generation)",
        )
    return units


def control_arguments(units: list[dict], state, width: int, height: int) -> dict:
    """``generate()``'s ControlNet arguments for checked units: nets loaded, hints decoded and resized."""
    if not units:
        return {}
    nets, hints = [], []
    for k, unit in enumerate(units):
        hint = decode_image(
            unit["image"], f'alwayson_scripts["ControlNet"].args[{k}].image', state.max_image_pixels
        )
        hint = hint.convert("RGB")
        if unit["module"].resolution is not None:
            values = unit["values"]
            if unit["pixel_perfect"]:  # the short side the hint has once fitted to the output
                values = (_fitted_short_side(hint.size, (width, height), unit["resize"]), *values[1:])
            try:
                hint = preprocessors.run(unit["module"], hint, values)
            except ValueError as e:
                raise ApiError(422, f'alwayson_scripts["ControlNet"].args[{k}]: {e}') from None
        if hint.size != (width, height):
            hint = resize_picture(hint, (width, height), unit["resize"])
        nets.append(state.registry.controlnet(unit["model"]))
        hints.append(hint)
    single = len(units) == 1
    return {
        "controlnet": nets[0] if single else nets,
        "control_image": hints[0] if single else hints,
        "controlnet_conditioning_scale": units[0]["weight"] if single else [u["weight"] for u in units],
        "control_guidance_start": units[0]["guidance_start"]
        if single
        else [u["guidance_start"] for u in units],
        "control_guidance_end": units[0]["guidance_end"] if single else [u["guidance_end"] for u in units],
        "guess_mode": units[0]["guess"],
    }


def _fitted_short_side(size: tuple[int, int], target: tuple[int, int], mode: int) -> int:
    """``pixel_perfect``: the preprocessor resolution at which the hint needs no further scaling once
    brought to ``target`` by resize ``mode`` (0 and 1 cover the output, 2 fits inside it)."""
    (w, h), (width, height) = size, target
    ratio = min(width / w, height / h) if mode == 2 else max(width / w, height / h)
    return max(1, round(min(w, h) * ratio))


def unit_infotext(text: str, unit: dict) -> str:
    """A ``ControlNet N`` parameter written by generate() (hint as given) with the unit's preprocessor."""
    module = unit["module"]
    if module.name == "none":
        return text
    resolution, a, b = unit["values"]
    extra = {"Processor Res": resolution, "Threshold A": a, "Threshold B": b}
    tail = "".join(f", {k}: {v}" for k, v in extra.items() if v is not None)
    return text.replace("Module: none", f"Module: {module.name}", 1) + tail


def check_size(sd, width: int, height: int, batch_size: int, max_pixels: int) -> None:
    factor = sd.config.vae.downsample_factor
    for name, value in (("width", width), ("height", height)):
        if value % factor:
            raise ApiError(
                422,
                f"{name}={value} is not a multiple of {factor}, the model's VAE factor; allowed: "
                f"positive multiples of {factor}",
            )
    if width * height * batch_size > max_pixels:
        raise ApiError(
            422,
            f"width x height x batch_size = {width}x{height}x{batch_size} is more than the server's "
            f"limit of {max_pixels:,} output pixels per batch",
        )


def _infotext(images_info, index: int, model_title: str, model_hash: str | None) -> str:
    from tf_diffusion.infotext import generation_parameters

    return generation_parameters(images_info, index, model_title, model_hash)


def run(job: Job, state, req: schema._Request, init=None, mask=None) -> dict:
    """The generation of one request on the worker; returns the web UI's response dict."""
    registry = state.registry
    override = (req.override_settings or {}).get("sd_model_checkpoint")
    previous = registry.current
    if override is not None:
        registry.load(registry.lookup(override))
    try:
        return _generate(job, state, req, init, mask)
    finally:
        if override is not None and req.override_settings_restore_afterwards and previous is not None:
            registry.load(previous)


def _generate(job: Job, state, req, init, mask) -> dict:
    registry = state.registry
    sd = registry.sd
    is_img2img = isinstance(req, schema.Img2ImgRequest)
    check_size(sd, req.width, req.height, req.batch_size, state.max_output_pixels)
    sampler = sampler_for(sd, req.sampler_name, req.sampler_index, req.scheduler)
    seed = secrets.randbelow(MAX_SEED) if req.seed == -1 else req.seed
    kwargs = {}
    mask_blur = None
    crop = None
    if is_img2img:
        kwargs.update(image=init, strength=float(req.denoising_strength))
        if mask is not None:
            mask_blur = float(req.mask_blur if req.mask_blur is not None else req.mask_blur_x)
            kwargs.update(mask=mask, mask_blur=mask_blur)
            if req.inpaint_full_res:
                crop = crop_region(mask, req.inpaint_full_res_padding, req.width, req.height)
                size = (req.width, req.height)
                kwargs.update(
                    image=init.crop(crop).resize(size, _LANCZOS), mask=mask.crop(crop).resize(size, _LANCZOS)
                )
            if req.inpainting_fill != 1:  # on the picture generate() starts from, as the web UI
                kwargs["image"] = fill_masked(kwargs["image"], kwargs["mask"])
            if MASKED_CONTENT[req.inpainting_fill] != "original":
                kwargs["masked_content"] = MASKED_CONTENT[req.inpainting_fill]
        elif req.resize_mode == LATENT_RESIZE and init.size != (req.width, req.height):
            kwargs["resize_latents"] = True
    units = control_units(req, registry)
    kwargs.update(control_arguments(units, state, req.width, req.height))
    progress = job.progress
    progress.job_count = req.n_iter
    progress.sampling_steps = req.steps if not is_img2img else max(1, int(req.steps * req.denoising_strength))

    def callback(step, timestep, latents):
        progress.sampling_step = step + 1
        progress.latents = latents
        job.check()

    entry = registry.current
    model_hash = registry.short_hash(entry)
    images, infotexts, seeds, prompts, negatives = [], [], [], [], []
    for k in range(req.n_iter):
        progress.job_no = k
        progress.sampling_step = 0
        try:
            result = sd.generate(
                req.prompt,
                req.negative_prompt or None,
                num_steps=req.steps,
                guidance_scale=float(req.cfg_scale),
                height=req.height,
                width=req.width,
                num_images=req.batch_size,
                seed=seed + k * req.batch_size,
                scheduler=sampler,
                callback=callback,
                progress=False,
                jit_compile=state.jit_compile,
                **kwargs,
            )
        except Skipped:
            continue
        except Interrupted:
            break
        except ValueError as e:  # generate() names the bad argument
            raise ApiError(422, str(e)) from None
        info_k = result.info
        if any(u["module"].name != "none" for u in units):
            params = dict(info_k.extra_params)
            for n, unit in enumerate(units):
                if f"ControlNet {n}" in params:
                    params[f"ControlNet {n}"] = unit_infotext(params[f"ControlNet {n}"], unit)
            info_k = dataclasses.replace(info_k, extra_params=params)
        if crop is not None:
            extra = {"Inpaint area": "Only masked", "Masked area padding": req.inpaint_full_res_padding}
            info_k = dataclasses.replace(info_k, extra_params={**info_k.extra_params, **extra})
        for i, picture in enumerate(result):
            text = _infotext(info_k, i, entry.model_name, model_hash)
            if crop is not None:
                picture = paste_region(init, mask, np.asarray(picture), crop, mask_blur)
            images.append(np.asarray(picture))
            infotexts.append(text)
            seeds.append(result.info.seeds[i])
            prompts.append(result.info.prompts[i])
            negatives.append(result.info.negative_prompts[i])
        progress.job_no = k + 1
    if job.cancelled:
        raise Interrupted(job.id)
    saved = []
    if req.save_images and images:
        folder = state.output_folder("img2img-images" if is_img2img else "txt2img-images")
        saved = [
            save_numbered(folder, image, text, s)
            for image, text, s in zip(images, infotexts, seeds, strict=True)
        ]
    info = {
        "prompt": req.prompt,
        "all_prompts": prompts,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": negatives,
        "seed": seed,
        "all_seeds": seeds,
        "subseed": seed if req.subseed == -1 else req.subseed,
        "all_subseeds": [(seed if req.subseed == -1 else req.subseed) + i for i in range(len(seeds))],
        "subseed_strength": req.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": req.sampler_name or req.sampler_index,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": entry.model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if is_img2img else None,
        "extra_generation_params": ({} if mask_blur is None else {"Mask blur": mask_blur})
        | (
            {}
            if crop is None
            else {"Inpaint area": "Only masked", "Masked area padding": req.inpaint_full_res_padding}
        ),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": datetime.datetime.fromtimestamp(job.started or job.submitted).strftime(
            "%Y%m%d%H%M%S"
        ),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": bool(mask is not None and sd.config.unet.in_channels == 9),
        "version": "tf_diffusion",
        "interrupted": job.interrupted,
        "skipped": job.skipped,
        "saved_images": saved,
        "task_id": job.id,
    }
    parameters = req.model_dump()
    if is_img2img and not req.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    parameters["seed"] = req.seed
    return {
        "images": [png_base64(image, text) for image, text in zip(images, infotexts, strict=True)]
        if req.send_images
        else [],
        "parameters": parameters,
        "info": json.dumps(info),
    }


def save_numbered(folder: pathlib.Path, image: np.ndarray, parameters: str, seed: int) -> str:
    """Save as the web UI names outputs, ``NNNNN-SEED.png`` with the next free number; never overwrite."""
    from PIL import Image, PngImagePlugin

    from tf_diffusion.fileio import publish

    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=".tf_diffusion-", suffix=".png.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(image).save(handle, format="PNG", pnginfo=info)
        for _ in range(1000):
            number = _next_number(folder)
            path = folder / f"{number:05d}-{seed}.png"
            try:
                publish(tmp, path, overwrite=False)
            except FileExistsError:
                continue  # another writer took the number: take the next
            return str(path)
        raise OSError(f"{folder}: no free output number found")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _next_number(folder: pathlib.Path) -> int:
    highest = -1
    for p in folder.iterdir():
        head = p.name.split("-", 1)[0]
        if head.isdigit():
            highest = max(highest, int(head))
    return highest + 1
