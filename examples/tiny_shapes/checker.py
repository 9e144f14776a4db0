"""Reads the attributes of a "drawn shapes" image back from its pixels, to score generated images.

Independent of any generative model: plain geometry on one image at a time.

- background: nearest ``shapes.BACKGROUNDS`` colour to the median of the image's border;
- foreground: each pixel's position on the line from the background colour to the foreground colour
  (the median of the pixels farthest from the background); above halfway is foreground, and the
  largest 8-connected blob is the shape;
- color: nearest ``shapes.COLORS`` entry to the median of the blob's inner pixels;
- position: the 3x3 cell of the blob's bounding-box center (the dataset places shapes by that center;
  a triangle's centroid sits well below it);
- shape: the blob's soft silhouette, stretched to fill a 12x12 grid, matched to the nearest
  prototype: mean silhouettes of procedurally drawn shapes of each shape, size and degradation
  (clean, mildly and strongly blurred and noised), fitted once per process; no generated image is
  ever used;
- size: the side the shape would have given its soft area (blur moves no mass), against the
  geometric midpoints between ``shapes.SIZES``.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from . import dataset as shapes

GRID = 12  # silhouette resolution for the shape templates
MIN_CONTRAST = 40.0  # RGB distance from the background below which nothing counts as drawn
MIN_AREA = 6  # pixels; a smaller blob is treated as no shape at all
ATTRIBUTES = ("color", "shape", "size", "position", "background")

_COLOR_NAMES = tuple(shapes.COLORS)
_COLOR_RGB = np.array([shapes.COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # (10, 3)
_BG_NAMES = tuple(shapes.BACKGROUNDS)
_BG_RGB = np.array([shapes.BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)  # (5, 3)
_SIZE_NAMES = tuple(shapes.SIZES)
# Geometric midpoints between neighbouring nominal sizes, as fractions of the image side.
_SIZE_VALUES = list(shapes.SIZES.values())
_SIZE_EDGES = [math.sqrt(_SIZE_VALUES[i] * _SIZE_VALUES[i + 1]) for i in range(len(_SIZE_VALUES) - 1)]
_POSITION_BY_CELL = {cell: name for name, cell in shapes.POSITIONS.items()}


def _nearest(rgb: np.ndarray, names: Sequence[str], palette: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def _check_image(image) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 8:
        raise ValueError(
            f"image must be a uint8 array (H, W, 3) with H, W >= 8, got {array.dtype} {array.shape}"
        )
    return array


def _largest_blob(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(the largest 8-connected component of ``mask`` as a bool mask, number of components >= 10% of it)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    sizes = [0]
    for y0, x0 in np.argwhere(mask):
        if labels[y0, x0]:
            continue
        label = len(sizes)
        labels[y0, x0] = label
        queue, count = collections.deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = label
                        queue.append((yy, xx))
        sizes.append(count)
    sizes = np.array(sizes)
    if len(sizes) == 1:
        return np.zeros_like(mask), 0
    best = int(np.argmax(sizes))
    return labels == best, int(np.sum(sizes >= 0.1 * sizes[best]))


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _silhouette(alpha: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """The soft mask inside ``bbox`` (x0, y0, x1, y1) resampled to (GRID, GRID)."""
    image = Image.fromarray(alpha.astype(np.float32), mode="F")
    return np.asarray(image.resize((GRID, GRID), Image.Resampling.BILINEAR, box=bbox), dtype=np.float32)


def measure(image) -> dict:
    """Geometry of the one shape in ``image``: colours, blob, bounding box and silhouette.

    Returns a dict with background_rgb, foreground_rgb, area (blob pixels), soft_area (sum of the soft
    mask around the blob), bbox (x0, y0, x1, y1; x1/y1 exclusive), center (x, y) of the bbox,
    components (blobs >= 10% of the largest) and silhouette (GRID, GRID); the blob fields are None
    or 0 when nothing stands out from the background.
    """
    array = _check_image(image).astype(np.float32)  # (H, W, 3)
    h, w, _ = array.shape
    ring = max(1, min(h, w) // 32)
    border = np.concatenate(
        [array[:ring].reshape(-1, 3), array[-ring:].reshape(-1, 3), array[:, :ring].reshape(-1, 3)]
        + [array[:, -ring:].reshape(-1, 3)]
    )
    bg = np.median(border, axis=0)  # (3,)
    result = dict(background_rgb=bg, foreground_rgb=None, area=0, soft_area=0.0, bbox=None, center=None)
    result.update(components=0, silhouette=None)
    distance = np.linalg.norm(array - bg, axis=-1)  # (H, W)
    # A robust maximum: the 10th largest distance (per 64x64) ignores a few stray pixels.
    k = max(3, h * w // 400)
    peak = float(np.partition(distance.ravel(), -k)[-k])
    if peak < MIN_CONTRAST:
        return result
    fg = np.median(array[distance >= 0.6 * peak], axis=0)  # (3,)
    direction = fg - bg
    alpha = np.clip((array - bg) @ direction / float(direction @ direction), 0.0, 1.0)  # (H, W)
    blob, components = _largest_blob(alpha > 0.5)
    area = int(blob.sum())
    if area < MIN_AREA:
        return result
    inner = blob & (alpha > 0.75)
    fg = np.median(array[inner if inner.sum() >= MIN_AREA else blob], axis=0)
    near = _dilate(blob)
    ys, xs = np.nonzero(blob)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    result.update(
        foreground_rgb=fg,
        area=area,
        # Blur moves no mass: the soft mask's sum stays the drawn area where the hard blob shrinks.
        soft_area=float(np.sum(alpha * _dilate(near))),
        bbox=bbox,
        center=((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2),
        components=components,
        # Other blobs would leak into the crop; keep the soft edge one pixel around this one.
        silhouette=_silhouette(alpha * near, bbox),
    )
    return result


def degrade(images, seed: int = 0, noise: float = 8.0, blur: float = 0.7, jitter: float = 12.0) -> np.ndarray:
    """Make procedural images look more like generated ones: colour jitter, gaussian blur and noise.

    Args:
        images: uint8 (B, H, W, 3) or (H, W, 3).
        seed: seed for the random jitter and noise.
        noise: std of per-pixel gaussian noise, in 0..255 units.
        blur: gaussian blur radius in pixels (0: none).
        jitter: each image's colours shift by a uniform per-channel offset in [-jitter, jitter].

    Returns:
        uint8 array of the input's shape.
    """
    array = np.asarray(images)
    single = array.ndim == 3
    batch = array[None] if single else array
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3) or (H, W, 3), got {array.dtype} {array.shape}")
    rng = np.random.default_rng(seed)
    out = []
    for image in batch:
        if blur > 0:
            image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
        shifted = image + rng.uniform(-jitter, jitter, size=3) + rng.normal(0.0, noise, size=image.shape)
        out.append(np.clip(np.round(shifted), 0, 255).astype(np.uint8))
    out = np.stack(out)
    return out[0] if single else out


# Degradations the templates are fitted on: none, mild and strong (generated images are blurrier
# than drawn ones, and blur rounds a small star's points off).
_TEMPLATE_DEGRADATIONS = (
    None,
    dict(noise=8.0, blur=0.7, jitter=12.0),
    dict(noise=12.0, blur=1.2, jitter=20.0),
)


@functools.lru_cache(maxsize=1)
def shape_templates() -> tuple[tuple[str, ...], np.ndarray]:
    """Prototype silhouettes: (shape name per prototype, silhouettes (P, GRID, GRID)).

    One prototype per (shape, size, degradation): the mean silhouette of four procedurally drawn
    shapes. Deterministic; fitted once per process (about 0.3 s).
    """
    rng = np.random.default_rng(1234)
    names, templates = [], []
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            for degradation in _TEMPLATE_DEGRADATIONS:
                silhouettes = []
                for _ in range(4):
                    side = (
                        shapes.SIZES[size] * 64 * (1 + rng.uniform(-shapes.SIZE_JITTER, shapes.SIZE_JITTER))
                    )
                    image = shapes.draw(shape, "white", "black", tuple(rng.uniform(24, 40, size=2)), side, 64)
                    if degradation is not None:
                        image = degrade(image, seed=int(rng.integers(2**31)), **degradation)
                    silhouettes.append(measure(image)["silhouette"])
                names.append(shape)
                templates.append(np.mean(silhouettes, axis=0))
    return tuple(names), np.stack(templates)


def check(image) -> dict:
    """Attributes of the one drawn shape in ``image``.

    Args:
        image: uint8 array (H, W, 3).

    Returns:
        dict with color, shape, size, position, background (names from ``tiny_shapes.dataset``; all but
        background are None when no shape stands out), plus the measurements: bbox, center, area,
        soft_area, components (blobs at least 10% of the largest; 1 for a clean image), foreground_rgb,
        background_rgb, shape_distance (silhouette distance to the chosen template).

    Raises:
        ValueError: if ``image`` is not uint8 (H, W, 3).
    """
    m = measure(image)
    h, w = np.asarray(image).shape[:2]
    result = dict(
        color=None,
        shape=None,
        size=None,
        position=None,
        background=_nearest(m["background_rgb"], _BG_NAMES, _BG_RGB),
        bbox=m["bbox"],
        center=m["center"],
        area=m["area"],
        soft_area=m["soft_area"],
        components=m["components"],
        foreground_rgb=None if m["foreground_rgb"] is None else tuple(float(v) for v in m["foreground_rgb"]),
        background_rgb=tuple(float(v) for v in m["background_rgb"]),
        shape_distance=None,
    )
    if m["bbox"] is None:
        return result
    names, templates = shape_templates()
    distances = np.sqrt(np.mean((templates - m["silhouette"]) ** 2, axis=(1, 2)))  # (S,)
    cx, cy = m["center"]
    cell = (min(int(cx * 3 / w), 2), min(int(cy * 3 / h), 2))
    shape = names[int(np.argmin(distances))]
    # Size from the soft area, which blur leaves alone, rather than from the bbox, which blur shrinks
    # where a shape narrows to a point.
    side = math.sqrt(m["soft_area"] / shapes.unit_area(shape)) / min(h, w)
    result.update(
        color=_nearest(m["foreground_rgb"], _COLOR_NAMES, _COLOR_RGB),
        shape=shape,
        size=_SIZE_NAMES[int(np.searchsorted(_SIZE_EDGES, side))],
        position=_POSITION_BY_CELL[cell],
        shape_distance=float(distances.min()),
    )
    return result


def _target_fields(target) -> dict:
    if isinstance(target, shapes.ShapeSample):
        target = target.target
    if isinstance(target, dict):
        return {k: target.get(k) for k in ATTRIBUTES}
    if isinstance(target, shapes.Target):
        return {k: getattr(target, k) for k in ATTRIBUTES}
    raise ValueError(
        f"a target must be a shapes.Target, shapes.ShapeSample or dict, got {type(target).__name__}"
    )


def score(images, targets: Sequence) -> dict:
    """Accuracy of generated images against what their prompts asked for.

    Each attribute is scored only over the targets that name it: color and shape always, size,
    position and background only when the prompt names them (None in a ``shapes.Target``; a
    ``ShapeSample`` counts what its caption names).

    Args:
        images: uint8 (B, H, W, 3) or a sequence of uint8 (H, W, 3).
        targets: B ``shapes.Target`` / ``shapes.ShapeSample`` / dicts with the attribute names.

    Returns:
        dict: ``color``, ``shape``, ``size``, ``position``, ``background`` accuracies (None when no
        target names the attribute), ``all`` (fraction of images with every named attribute right),
        ``counts`` (targets naming each attribute) and ``items`` (per image: prompt, target, the
        checker's reading, and ``correct`` per named attribute).

    Raises:
        ValueError: if the numbers of images and targets differ, or for a bad image or target.
    """
    images = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    hits = {k: 0 for k in ATTRIBUTES}
    counts = {k: 0 for k in ATTRIBUTES}
    items, all_right = [], 0
    for image, target in zip(images, targets, strict=True):
        wanted = _target_fields(target)
        reading = check(image)
        correct = {k: reading[k] == v for k, v in wanted.items() if v is not None}
        for k, ok in correct.items():
            counts[k] += 1
            hits[k] += int(ok)
        all_right += int(all(correct.values()))
        prompt = getattr(target, "prompt", getattr(target, "caption", None))
        if isinstance(target, dict):
            prompt = target.get("prompt", target.get("caption"))
        items.append(dict(prompt=prompt, target=wanted, reading=reading, correct=correct))
    result = {k: (hits[k] / counts[k] if counts[k] else None) for k in ATTRIBUTES}
    result.update(all=all_right / len(items) if items else None, counts=counts, items=items)
    return result
