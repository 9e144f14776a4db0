"""Reading user images safely, and conversions between them (PIL, uint8/uint16/float arrays) and model tensors.

Image files are size-checked from their header before any pixel is decoded: a small file can declare
an enormous picture (a "decompression bomb"). The limit is ``DEFAULT_MAX_PIXELS`` (4096 x 4096), raised
or lowered with ``$TF_DIFFUSION_MAX_IMAGE_PIXELS`` or the ``max_pixels`` argument.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_PIXELS_ENV = "TF_DIFFUSION_MAX_IMAGE_PIXELS"


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``$TF_DIFFUSION_MAX_IMAGE_PIXELS``, else the default.

    Raises:
        ValueError: the limit is not a positive integer.
    """
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(text)
        except ValueError:
            raise ValueError(f"${MAX_PIXELS_ENV}={text!r} must be a positive integer (pixels)") from None
        what = f"${MAX_PIXELS_ENV}={text!r}"
    else:
        what = f"max_pixels={max_pixels!r}"
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"{what} must be a positive integer (pixels)")
    return int(max_pixels)


def check_image_size(width: int, height: int, what: str, max_pixels: int | None = None) -> None:
    """Refuse a picture of more than the allowed number of pixels, before it is decoded.

    Args:
        width: pixels across, as the header declares.
        height: pixels down.
        what: how to name the image in the error (its path, or "image").
        max_pixels: the limit; None reads it as ``max_image_pixels`` does.

    Raises:
        ValueError: the picture has more pixels than allowed.
    """
    limit = max_image_pixels(max_pixels)
    if width * height > limit:
        side = int(round(limit**0.5))
        allowed = f"{limit / 1e6:.1f} MP" if limit >= 100_000 else f"{limit:,} pixels"
        if side * side == limit and limit >= 100_000:
            allowed += f" ({side}x{side})"
        declared = f"{width}x{height} pixels"
        if width * height >= 100_000:
            declared += f" ({width * height / 1e6:.1f} MP)"
        raise ValueError(
            f"{what}: {declared} is more than the image limit of {allowed}; "
            f"raise it with max_pixels=... or ${MAX_PIXELS_ENV}"
        )


def open_image(path: str | os.PathLike, what: str | None = None, max_pixels: int | None = None):
    """Read an image file completely after checking its declared size, with errors that name the file.

    Args:
        path: the image file (PNG, JPEG, WebP, ... anything Pillow reads).
        what: how to name it in errors (default: the path).
        max_pixels: the pixel limit; None reads it as ``max_image_pixels`` does.

    Returns:
        A loaded ``PIL.Image.Image`` that no longer refers to the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image, a truncated or corrupt one, or more pixels than allowed.
    """
    from PIL import Image

    name = what or os.fspath(path)
    if not os.path.isfile(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no such file")
        raise ValueError(f"{name}: not a file")
    limit = max_image_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's warning below its hard limit would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                check_image_size(*image.size, name, limit)
                image.load()
                return image.copy()
    except Image.DecompressionBombError as e:
        size = _declared_size(path)
        if size is not None:
            check_image_size(*size, name, limit)  # our limit, in our words, when it is the lower one
        raise ValueError(
            f"{name}: Pillow refuses it as a possible decompression bomb ({e}); that limit is "
            f"PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, EOFError, ValueError, MemoryError) as e:
        if isinstance(e, ValueError) and str(e).startswith(f"{name}:"):
            raise
        text = str(e) or type(e).__name__
        raise ValueError(f"{name}: cannot read the image: {text}") from None


def _declared_size(path) -> tuple[int, int] | None:
    """The size an image file's header declares, read by Pillow's format plugins without its bomb check.

    ``Image.open`` raises before it returns the image when the size exceeds twice its own limit; the
    plugins registered in ``Image.OPEN`` read the header alone (what ``Image.open`` does first).
    """
    from PIL import Image

    Image.init()
    with open(path, "rb") as handle:
        prefix = handle.read(16)
        for format_id in Image.ID:
            factory, accept = Image.OPEN[format_id]
            try:
                handle.seek(0)
                if accept and not accept(prefix):
                    continue
                image = factory(handle, os.fspath(path))
                return image.size
            except Exception:  # noqa: BLE001 - not this format (as Image.open tries the next one)
                continue
    return None


def _as_array(image, what: str = "image") -> np.ndarray:
    """A PIL image or array-like as a numpy array, without changing its values."""
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency; keep arrays usable without it
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        # A lazily opened file has its size but not its pixels yet: refuse a bomb before decoding it.
        check_image_size(*image.size, getattr(image, "filename", "") or what)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(image).astype(np.uint16 if image.mode.startswith("I;16") else np.int32)
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        return np.asarray(image)
    return np.asarray(image)


def _unit_range(array: np.ndarray, what: str) -> np.ndarray:
    """Scale an integer or float array to float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} has integer dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        lo, hi = float(np.min(array)), float(np.max(array))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{what} has float values in [{lo:.3g}, {hi:.3g}]; expected values in [0, 1]")
        return array
    raise ValueError(f"{what} has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")


def to_rgb(image, what: str = "image") -> np.ndarray:
    """Any image (H, W), (H, W, 1|2|3|4) or a batch (N, H, W, C) as float32 RGB in [0, 1], shape (N, H, W, 3).

    Grayscale is repeated to three channels; alpha is composited onto white, as a
    viewer shows it. 16-bit images are scaled by 65535.
    """
    array = _unit_range(_as_array(image, what), what)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{what} has shape {array.shape}; expected (H, W), (H, W, C) or (N, H, W, C) with C in 1..4"
        )
    channels = array.shape[-1]
    if channels in (2, 4):
        color, alpha = array[..., :-1], array[..., -1:]
        array = color * alpha + (1.0 - alpha)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array, dtype=np.float32)


def to_mask(mask, what: str = "mask") -> np.ndarray:
    """A mask (white = repaint) as float32 (N, H, W, 1) in [0, 1]; color masks use their luminance."""
    array = to_rgb(mask, what)
    gray = array @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return gray[..., None]


def to_uint8(images) -> np.ndarray:
    """Model output in [-1, 1] (N, H, W, 3) as uint8 [0, 255], rounding to nearest."""
    array = np.asarray(images, dtype=np.float32)
    array = np.clip((array + 1.0) * 0.5, 0.0, 1.0)
    return np.round(array * 255.0).astype(np.uint8)


def to_pil(images) -> list:
    """uint8 (N, H, W, 3) arrays as a list of PIL images."""
    from PIL import Image

    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"to_pil expects uint8 images, got dtype {array.dtype}; use to_uint8 first")
    if array.ndim == 3:
        array = array[None]
    return [Image.fromarray(a) for a in array]


def paste_back(decoded: np.ndarray, original: np.ndarray, mask: np.ndarray, blur: float) -> np.ndarray:
    """Inpainting's finish as the AUTOMATIC1111 web UI does it: the original pixels outside the mask.

    Args:
        decoded: (N, H, W, 3) generated images in [-1, 1].
        original: (k, H, W, 3) init images in [-1, 1], k dividing N.
        mask: (k, H, W, 1) binary mask, 1 = repainted.
        blur: Gaussian blur radius in pixels for the blend's edge (0: a hard edge).

    Returns:
        (N, H, W, 3): ``soft * decoded + (1 - soft) * original`` with ``soft`` the blurred mask.
    """
    from PIL import Image, ImageFilter

    soft = []
    for m in np.asarray(mask, np.float32)[..., 0]:
        image = Image.fromarray(np.round(m * 255.0).astype(np.uint8), mode="L")
        if blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        soft.append(np.asarray(image, np.float32)[..., None] / 255.0)
    soft = np.stack(soft)
    n, k = decoded.shape[0], soft.shape[0]
    reps = n // k
    soft, original = np.concatenate([soft] * reps), np.concatenate([np.asarray(original, np.float32)] * reps)
    return (soft * decoded + (1.0 - soft) * original).astype(np.float32)
