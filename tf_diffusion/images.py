"""Conversions between user images (PIL, uint8/uint16/float arrays) and model tensors."""

from __future__ import annotations

import numpy as np


def _as_array(image) -> np.ndarray:
    """A PIL image or array-like as a numpy array, without changing its values."""
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency; keep arrays usable without it
        Image = None
    if Image is not None and isinstance(image, Image.Image):
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
    array = _unit_range(_as_array(image), what)
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
