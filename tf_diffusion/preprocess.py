"""Control-image preprocessors that need no downloaded model: Canny edges (through OpenCV).

    >>> from tf_diffusion.preprocess import canny
    >>> hint = canny(image, low_threshold=100, high_threshold=200)   # (H, W, 3) uint8, white edges

Hints the user makes elsewhere (depth, pose, scribble maps) go to ``generate(control_image=...)``
as they are. OpenCV is an optional dependency: ``pip install "tf-diffusion[controlnet]"``
(``opencv-python-headless``, the build without GUI libraries).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PREPROCESSORS", "canny"]

# The thresholds diffusers' ControlNet examples and the web UI's ControlNet extension default to.
DEFAULT_LOW, DEFAULT_HIGH = 100, 200


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "Canny edges need OpenCV: pip install 'tf-diffusion[controlnet]' (opencv-python-headless)"
        ) from e
    return cv2


def _threshold(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
        raise ValueError(f"{name}={value!r} must be an integer in [0, 255] (a pixel-gradient threshold)")
    return int(value)


def canny(image, low_threshold: int = DEFAULT_LOW, high_threshold: int = DEFAULT_HIGH) -> np.ndarray:
    """Canny edges of an image as a 3-channel hint, as ControlNet's canny models were trained on.

    Args:
        image: PIL image or array (H, W), (H, W, C) uint8 / uint16 / float in [0, 1], read as
            8-bit RGB (alpha composited onto white).
        low_threshold, high_threshold: OpenCV's hysteresis thresholds, integers in [0, 255] with
            low <= high.

    Returns:
        (H, W, 3) uint8: 255 on edges, 0 elsewhere, the same in every channel.

    Raises:
        ValueError: thresholds out of range or in the wrong order; a batch of images.
        ImportError: OpenCV is not installed.
    """
    from tf_diffusion.images import to_rgb

    low = _threshold(low_threshold, "low_threshold")
    high = _threshold(high_threshold, "high_threshold")
    if low > high:
        raise ValueError(f"low_threshold={low} must not exceed high_threshold={high}")
    rgb = to_rgb(image, "image")
    if rgb.shape[0] != 1:
        raise ValueError(f"canny takes one image, got a batch of {rgb.shape[0]}")
    cv2 = _cv2()
    pixels = np.ascontiguousarray(np.clip(np.rint(rgb[0] * 255.0), 0, 255).astype(np.uint8))
    # On the colour image, as diffusers' ControlNet examples and the web UI's extension run it
    # (OpenCV takes the strongest gradient over the channels).
    edges = cv2.Canny(pixels, low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


PREPROCESSORS = {"canny": canny}
