"""Procedural "drawn shapes" data: one coloured shape on a plain background, with a caption.

The data behind the embedded offline model: small RGB images (64x64 by default) of a circle, square,
triangle, star, heart or cross in one of ten colours, three sizes and a 3x3 grid of positions, on one
of five backgrounds, each with a caption from a few templates. Every caption names the colour and the
shape; size, position and background only sometimes. Everything is numpy + Pillow and deterministic
from a seed; ``as_tf_dataset`` imports TensorFlow only when called.

A fixed set of (shape, colour) and (shape, position) combinations is held out: the "train" split never
draws them and the "heldout" split draws only them, so a model can be scored on combinations it never
saw (``heldout_prompts``; ``tiny_shapes.checker`` reads the attributes back from pixels).

Example:
    >>> from tiny_shapes import dataset as shapes
    >>> images, captions, attrs = shapes.numpy_batch(seed=0, batch_size=4)
    >>> images.shape, images.dtype
    ((4, 64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")

# Fixed RGB values, at least 85 apart (RGB distance) so a nearest-palette lookup stays unambiguous.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (250, 215, 0),
    "orange": (250, 130, 0),
    "purple": (135, 45, 175),
    "pink": (255, 120, 190),
    "cyan": (0, 200, 220),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

BACKGROUNDS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "light blue": (165, 205, 240),
    "beige": (225, 205, 160),
}

# A shape colour is drawn only on backgrounds at least this far away (RGB distance): this rules out
# white on white, white on light blue/beige, pink on beige/light blue, green and purple on gray.
MIN_CONTRAST = 140.0

# Nominal bounding-box side as a fraction of the image side; each sample jitters it by up to 6%.
SIZES = {"small": 0.22, "medium": 0.33, "large": 0.46}
SIZE_JITTER = 0.06

# 3x3 grid of positions as (column, row); the name is the key, the caption phrases the values.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_PHRASES = {
    "top left": ("in the top left", "in the top left corner"),
    "top": ("at the top",),
    "top right": ("in the top right", "in the top right corner"),
    "left": ("on the left",),
    "center": ("in the center", "centered"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}

# Caption templates. {a_desc}: "a small red circle" (size optional); {desc}: the same without the
# article; the optional parts come with their separator or as "": {pos} " in the top left",
# {bg} " on a white background", {pos_c} / {bg_c} the same after a comma.
TEMPLATES = (
    "{a_desc}{pos}{bg}",
    "{desc}{pos_c}{bg_c}",
    "a drawing of {a_desc}{pos}{bg}",
    "a picture of {a_desc}{bg}{pos}",
    "{a_desc}{bg}{pos}",
    "an image of {a_desc}{pos_c}{bg_c}",
)
# How often a caption names each attribute. Colour and shape are always named by default; training
# with some captions that leave one of them out ("a small circle", "a purple shape") shows the model
# each word away from the other, which helps it draw (shape, colour) pairs it never saw.
MENTION_PROBABILITY = {"color": 1.0, "shape": 1.0, "size": 0.5, "position": 0.5, "background": 0.35}

# About 10% of the 60 (shape, colour) pairs: one per shape, each colour at most once, so every shape
# and every colour still appears in training.
HELDOUT_SHAPE_COLOR = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "pink"),
    ("star", "cyan"),
    ("heart", "green"),
    ("cross", "yellow"),
)
# Four of the 54 (shape, position) pairs, on different shapes and positions.
HELDOUT_SHAPE_POSITION = (
    ("circle", "top right"),
    ("triangle", "bottom left"),
    ("star", "left"),
    ("heart", "bottom"),
)

SPLITS = ("train", "heldout")
# "template": every caption from TEMPLATES (the stream every earlier model was trained on); "varied": a share
# of them said in other words by ``phrasing.phrase`` (synonyms, word order, punctuation, capitals).
CAPTIONS = ("template", "varied")
SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean anti-aliased edges
MARGIN = 0.03  # fraction of the image side kept free between a shape and the image border


def _rgb_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def allowed_backgrounds(color: str) -> tuple[str, ...]:
    """The backgrounds a shape of ``color`` is drawn on (those at least ``MIN_CONTRAST`` away)."""
    _check_choice("color", color, COLORS)
    return tuple(b for b, rgb in BACKGROUNDS.items() if _rgb_distance(COLORS[color], rgb) >= MIN_CONTRAST)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a prompt asks for: each attribute when the prompt names it, else None."""

    prompt: str
    shape: str | None
    color: str | None
    size: str | None = None
    position: str | None = None
    background: str | None = None


@dataclasses.dataclass(frozen=True)
class ShapeSample:
    """Attributes of one drawn image.

    Attributes:
        shape, color, size, position, background: the drawn attributes (keys of the vocab dicts).
        caption: the caption text.
        mentions: which attributes the caption names, a subset of ("color", "shape", "size",
            "position", "background"); colour and shape are named unless the ``mention``
            probabilities say otherwise.
        bbox: the shape's bounding box in pixels (x0, y0, x1, y1), floats, x1/y1 exclusive.
        center: the bounding-box center (x, y) in pixels.
        heldout: True when the sample has a held-out (shape, colour) or (shape, position) pair.
    """

    shape: str
    color: str
    size: str
    position: str
    background: str
    caption: str
    mentions: tuple[str, ...]
    bbox: tuple[float, float, float, float]
    center: tuple[float, float]
    heldout: bool

    @property
    def target(self) -> Target:
        """The caption's demands: attributes it does not name are None."""
        return Target(
            prompt=self.caption,
            shape=self.shape if "shape" in self.mentions else None,
            color=self.color if "color" in self.mentions else None,
            size=self.size if "size" in self.mentions else None,
            position=self.position if "position" in self.mentions else None,
            background=self.background if "background" in self.mentions else None,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_heldout(shape: str, color: str, position: str) -> bool:
    """Whether (shape, colour) or (shape, position) is one of the held-out combinations."""
    return (shape, color) in HELDOUT_SHAPE_COLOR or (shape, position) in HELDOUT_SHAPE_POSITION


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_share(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"varied_share={value!r} must be a number in [0, 1]")


def _check_image_size(image_size) -> None:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 16:
        raise ValueError(f"image_size={image_size!r} must be an int >= 16")


# ----------------------------------------------------------------------------------------------
# Geometry: each outline is a polygon in a unit frame whose bounding box has longest side 1,
# centered at (0, 0), y pointing down (image convention). The circle is drawn as an ellipse.


def _normalized(points: np.ndarray) -> np.ndarray:
    """Center a polygon's bounding box on the origin and scale its longest side to 1."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) / float(np.max(hi - lo))


def _triangle() -> np.ndarray:
    # Equilateral, apex up.
    return _normalized(np.array([[0.0, -math.sqrt(3)], [1.0, 0.0], [-1.0, 0.0]]))


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    # Fatter than the regular star's 0.38 inner radius, so small stars keep visible points.
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _normalized(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _heart(steps: int = 120) -> np.ndarray:
    # The classic parametric heart curve; its y axis points up, so flip it.
    t = np.linspace(0, 2 * math.pi, steps, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return _normalized(np.stack([x, -y], axis=1))


def _cross(arm: float = 0.36) -> np.ndarray:
    a = arm / 2
    return _normalized(
        np.array(
            [[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5], [-a, a]]
            + [[-0.5, a], [-0.5, -a], [-a, -a]]
        )
    )


_OUTLINES = {
    "square": _normalized(np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])),
    "triangle": _triangle(),
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
}


def shape_extent(shape: str) -> tuple[float, float]:
    """(width, height) of a shape's bounding box when its longest side is 1."""
    _check_choice("shape", shape, SHAPES)
    if shape == "circle":
        return 1.0, 1.0
    points = _OUTLINES[shape]
    w, h = points.max(axis=0) - points.min(axis=0)
    return float(w), float(h)


def unit_area(shape: str) -> float:
    """Area of a shape whose bounding box has longest side 1."""
    _check_choice("shape", shape, SHAPES)
    if shape == "circle":
        return math.pi / 4
    x, y = _OUTLINES[shape].T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)  # shoelace


def draw(
    shape: str,
    color: str | tuple[int, int, int],
    background: str | tuple[int, int, int],
    center: tuple[float, float],
    extent: float | tuple[float, float],
    image_size: int | tuple[int, int] = 64,
) -> np.ndarray:
    """Draw one anti-aliased shape.

    Args:
        shape: one of ``SHAPES``.
        color, background: a palette name (``COLORS`` / ``BACKGROUNDS``) or an RGB tuple.
        center: bounding-box center (x, y) in pixels.
        extent: the bounding box's longest side in pixels (aspect kept), or (width, height) to
            stretch the shape into exactly that box.
        image_size: side, or (width, height), of the image in pixels.

    Returns:
        uint8 array (H, W, 3).
    """
    _check_choice("shape", shape, SHAPES)
    fill = COLORS[color] if isinstance(color, str) else tuple(int(c) for c in color)
    back = BACKGROUNDS[background] if isinstance(background, str) else tuple(int(c) for c in background)
    width, height = (image_size, image_size) if np.isscalar(image_size) else image_size
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (width * s, height * s), back)
    pen = ImageDraw.Draw(canvas)
    w, h = shape_extent(shape)
    if np.isscalar(extent):
        scale = np.array([extent, extent], dtype=np.float64)
    else:
        scale = np.array([extent[0] / w, extent[1] / h], dtype=np.float64)
    cx, cy = center
    if shape == "circle":
        rx, ry = scale * np.array([w, h]) / 2
        # Image pixel i covers [i, i+1); PIL's ellipse box is inclusive, hence the -1 on the far side.
        box = [(cx - rx) * s, (cy - ry) * s, (cx + rx) * s - 1, (cy + ry) * s - 1]
        pen.ellipse(box, fill=fill)
    else:
        # PIL puts pixel centers on integers: -0.5 maps our pixel-corner coordinates onto its grid.
        # Its fill includes the edge, so a shape may come out up to 1/SUPERSAMPLE px wider.
        points = (_OUTLINES[shape] * scale + np.array([cx, cy])) * s - 0.5
        pen.polygon([tuple(p) for p in points.tolist()], fill=fill)
    return np.asarray(canvas.reduce(s))


# ----------------------------------------------------------------------------------------------
# Sampling.


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(
    shape: str | None,
    color: str | None,
    size: str | None = None,
    position: str | None = None,
    background: str | None = None,
    template: int = 0,
    phrase: int = 0,
) -> str:
    """A caption from ``TEMPLATES[template]``; attributes given as None are left out.

    Args:
        shape: the shape; None says "shape" instead ("a purple shape").
        color: the colour; None leaves it out ("a small circle").
        size, position, background: named when not None.
        template: index into ``TEMPLATES``.
        phrase: index into ``POSITION_PHRASES[position]`` (wraps around).

    Example:
        >>> make_caption("circle", "red", "small", "top left", "white")
        'a small red circle in the top left on a white background'
        >>> make_caption(None, "red", position="top")
        'a red shape at the top'
    """
    if shape is not None:
        _check_choice("shape", shape, SHAPES)
    if color is not None:
        _check_choice("color", color, COLORS)
    if size is not None:
        _check_choice("size", size, SIZES)
    if position is not None:
        _check_choice("position", position, POSITIONS)
    if background is not None:
        _check_choice("background", background, BACKGROUNDS)
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template={template!r} must be in [0, {len(TEMPLATES)})")
    desc = " ".join(word for word in (size, color, shape or "shape") if word)
    pos = POSITION_PHRASES[position][phrase % len(POSITION_PHRASES[position])] if position else ""
    bg = f"on {_article(background)} {background} background" if background else ""
    return TEMPLATES[template].format(
        a_desc=f"{_article(desc)} {desc}",
        desc=desc,
        pos=f" {pos}" if pos else "",
        bg=f" {bg}" if bg else "",
        pos_c=f", {pos}" if pos else "",
        bg_c=f", {bg}" if bg else "",
    )


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _attributes(rng: np.random.Generator, split: str) -> tuple[str, str, str, bool]:
    """(shape, colour, position, position_must_be_named) for one sample of ``split``."""
    if split == "train":
        while True:  # rejection keeps the draw simple; held-out pairs are about 17% of all triples
            shape, color, position = (
                _choice(rng, SHAPES),
                _choice(rng, list(COLORS)),
                _choice(rng, list(POSITIONS)),
            )
            if not is_heldout(shape, color, position):
                return shape, color, position, False
    # Held-out: half the samples a held-out colour pair, half a held-out position pair; the position
    # must then be named, or the prompt would not ask for the unseen combination.
    if rng.random() < 0.5:
        shape, color = _choice(rng, HELDOUT_SHAPE_COLOR)
        return shape, color, _choice(rng, list(POSITIONS)), False
    shape, position = _choice(rng, HELDOUT_SHAPE_POSITION)
    return shape, _choice(rng, list(COLORS)), position, True


def _placement(rng: np.random.Generator, position: str, extent: tuple[float, float], n: int) -> np.ndarray:
    """Bounding-box center (x, y) in the position's grid cell, with the whole shape inside the image."""
    cell = np.array(POSITIONS[position], dtype=np.float64)
    half = np.array(extent) / 2
    center = (cell + 0.5) * n / 3 + rng.uniform(-0.06, 0.06, size=2) * n
    # Keep the shape inside the image, and its center at least 0.06 n inside its cell so the
    # checker's 3x3 reading stays unambiguous.
    lo = np.maximum(half + MARGIN * n, cell * n / 3 + 0.06 * n)
    hi = np.minimum(n - half - MARGIN * n, (cell + 1) * n / 3 - 0.06 * n)
    return np.clip(center, lo, np.maximum(lo, hi))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng={rng!r} must be a numpy Generator or a non-negative int seed")


def mention_probabilities(overrides: dict[str, float] | None = None) -> dict[str, float]:
    """``MENTION_PROBABILITY`` with some entries replaced, checked: keys color, shape, size, position,
    background.

    Raises:
        ValueError: for an unknown attribute or a probability outside [0, 1].
    """
    merged = dict(MENTION_PROBABILITY)
    for key, value in (overrides or {}).items():
        _check_choice("mention attribute", key, MENTION_PROBABILITY)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"mention probability for {key}={value!r} must be a number in [0, 1]")
        merged[key] = float(value)
    return merged


def sample(
    rng: np.random.Generator | int,
    split: str = "train",
    image_size: int = 64,
    mention: dict[str, float] | None = None,
    captions: str = "template",
    varied_share: float = 0.5,
) -> tuple[np.ndarray, ShapeSample]:
    """Draw one random image and its attributes.

    Args:
        rng: a numpy Generator (advanced in place) or a non-negative int seed.
        split: "train" (never a held-out combination) or "heldout" (always one).
        image_size: image side in pixels (>= 16).
        mention: overrides of ``MENTION_PROBABILITY``, e.g. ``{"position": 0.8}`` to name the
            position in more captions, or ``{"color": 0.85}`` to leave the colour out of 15%; the
            image draw is the same whatever the probabilities. The "heldout" split always names
            colour and shape.
        captions: "template" or "varied" (``CAPTIONS``): with "varied", ``varied_share`` of the train
            split's captions name the same attributes in words and frames from ``phrasing`` instead
            (the image and the attributes are the same either way).
        varied_share: that share, in [0, 1].

    Returns:
        (image uint8 (image_size, image_size, 3), ShapeSample).

    Raises:
        ValueError: for an unknown split, a bad seed, image size or mention probability.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("captions", captions, CAPTIONS)
    _check_share(varied_share)
    _check_image_size(image_size)
    probability = mention_probabilities(mention)
    rng = _as_rng(rng)
    n = int(image_size)
    shape, color, position, name_position = _attributes(rng, split)
    size = _choice(rng, list(SIZES))
    background = _choice(rng, allowed_backgrounds(color))
    side = SIZES[size] * n * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    w, h = shape_extent(shape)
    extent = (side * w, side * h)
    cx, cy = _placement(rng, position, extent, n)
    optional = tuple(
        k
        for k in ("size", "position", "background")
        if rng.random() < probability[k] or (k == "position" and name_position)
    )
    template, phrase = int(rng.integers(len(TEMPLATES))), int(rng.integers(2))
    # Colour and shape draw only when their probability is below 1, so the default stream (and
    # every seeded dataset made before they could be left out) is unchanged. A held-out prompt
    # names both, or it would not ask for the unseen combination.
    core = tuple(
        k
        for k in ("color", "shape")
        if probability[k] >= 1.0 or split == "heldout" or rng.random() < probability[k]
    )
    mentions = core + optional
    caption = make_caption(
        shape if "shape" in mentions else None,
        color if "color" in mentions else None,
        size if "size" in mentions else None,
        position if "position" in mentions else None,
        background if "background" in mentions else None,
        template=template,
        phrase=phrase,
    )
    # Drawn after everything the image depends on, so "varied" changes captions only.
    if captions == "varied" and split == "train" and rng.random() < varied_share:
        from tiny_shapes import phrasing

        caption = phrasing.phrase(
            rng,
            shape if "shape" in mentions else None,
            color if "color" in mentions else None,
            size if "size" in mentions else None,
            position if "position" in mentions else None,
            background if "background" in mentions else None,
        )
    image = draw(shape, color, background, (cx, cy), side, n)
    attrs = ShapeSample(
        shape=shape,
        color=color,
        size=size,
        position=position,
        background=background,
        caption=caption,
        mentions=mentions,
        bbox=(cx - extent[0] / 2, cy - extent[1] / 2, cx + extent[0] / 2, cy + extent[1] / 2),
        center=(float(cx), float(cy)),
        heldout=is_heldout(shape, color, position),
    )
    return image, attrs


class ShapesDataset:
    """Random-access, deterministic stream of samples: item ``i`` depends only on (seed, split, i).

    Args:
        seed: non-negative int.
        split: "train" or "heldout".
        image_size: image side in pixels.
        length: number of items for ``len()`` and iteration; None iterates forever.
        mention: overrides of ``MENTION_PROBABILITY`` (see ``sample``).
        captions, varied_share: caption wording (see ``sample``).

    Example:
        >>> ds = ShapesDataset(seed=0, split="heldout", length=2)
        >>> [attrs.heldout for _, attrs in ds]
        [True, True]
    """

    def __init__(
        self,
        seed: int,
        split: str = "train",
        image_size: int = 64,
        length: int | None = None,
        mention: dict[str, float] | None = None,
        captions: str = "template",
        varied_share: float = 0.5,
    ):
        _as_rng(seed)
        self.mention = mention_probabilities(mention)
        _check_choice("captions", captions, CAPTIONS)
        _check_share(varied_share)
        self.captions, self.varied_share = captions, float(varied_share)
        _check_choice("split", split, SPLITS)
        _check_image_size(image_size)
        if length is not None and (not isinstance(length, (int, np.integer)) or length < 0):
            raise ValueError(f"length={length!r} must be a non-negative int or None")
        self.seed, self.split, self.image_size, self.length = int(seed), split, int(image_size), length

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this ShapesDataset is unbounded (length=None)")
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, ShapeSample]:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"index {index!r} must be a non-negative int")
        if self.length is not None and index >= self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        return sample(rng, self.split, self.image_size, self.mention, self.captions, self.varied_share)

    def __iter__(self) -> Iterator[tuple[np.ndarray, ShapeSample]]:
        index = 0
        while self.length is None or index < self.length:
            yield self[index]
            index += 1

    def batch(self, start: int, batch_size: int) -> tuple[np.ndarray, list[str], list[ShapeSample]]:
        """Items ``start .. start + batch_size - 1`` as (images (B, H, W, 3) uint8, captions, attributes)."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        items = [self[i] for i in range(start, start + batch_size)]
        images = np.stack([image for image, _ in items])  # (B, H, W, 3)
        attrs = [a for _, a in items]
        return images, [a.caption for a in attrs], attrs


def numpy_batch(
    seed: int, batch_size: int, split: str = "train", image_size: int = 64, start: int = 0
) -> tuple[np.ndarray, list[str], list[ShapeSample]]:
    """A batch of items ``start ..`` of ``ShapesDataset(seed, split, image_size)``.

    Returns:
        (images uint8 (B, image_size, image_size, 3), captions list[str], attributes list[ShapeSample]).
    """
    return ShapesDataset(seed, split, image_size).batch(start, batch_size)


def heldout_prompts(n: int, seed: int = 0) -> list[Target]:
    """``n`` evaluation prompts that each ask for a held-out combination, with what they ask for.

    A held-out (shape, position) prompt always names the position. Deterministic in (n, seed).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    data = ShapesDataset(seed, "heldout")
    return [data[i][1].target for i in range(n)]


def as_tf_dataset(seed: int, batch_size: int, tokenizer, split: str = "train", image_size: int = 64):
    """An endless ``tf.data.Dataset`` of (images float32 (B, H, W, 3) in [-1, 1], token ids int32 (B, L)).

    Batch ``k`` holds items ``k * batch_size ..`` of ``ShapesDataset(seed, split, image_size)``, drawn
    on the fly. Imports TensorFlow only when called.

    Args:
        seed, split, image_size: as for ``ShapesDataset``.
        batch_size: images per batch.
        tokenizer: callable list[str] -> int array (B, L), e.g. ``tf_diffusion.tokenizer.CLIPTokenizer()``.
    """
    import tensorflow as tf

    data = ShapesDataset(seed, split, image_size)
    length = int(np.asarray(tokenizer(["a red circle"])).shape[-1])

    def batches():
        start = 0
        while True:
            images, captions, _ = data.batch(start, batch_size)
            start += batch_size
            ids = np.asarray(tokenizer(captions), dtype=np.int32)  # (B, L)
            yield images.astype(np.float32) / 127.5 - 1.0, ids

    signature = (
        tf.TensorSpec((batch_size, image_size, image_size, 3), tf.float32),
        tf.TensorSpec((batch_size, length), tf.int32),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)
