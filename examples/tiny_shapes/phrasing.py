"""Captions said in many ways: synonyms, word order, articles, adjectives after the noun, punctuation, capitals.

The templates of ``dataset.TEMPLATES`` say every attribute one way, so a model trained on them alone learns
those sentences rather than the words ("a red box in the upper left corner" was drawn as the right shape
83% of the time against 95.5% for the template wording). ``phrase`` says the same attributes in a random
way from word and frame pools; a share of training captions comes from it (``dataset.sample(captions=
"varied")``).

Two frame pools: ``TRAIN_FRAMES`` for training and ``HELDOUT_FRAMES`` for evaluation only, so adherence
can be measured on sentence shapes the model never saw (``heldout_phrasing_prompts``). The words
(synonyms) are shared: the text encoder is trained from scratch, so a word it never saw means nothing to
it; what is held out is how the words are put together.
"""

from __future__ import annotations

import numpy as np

# Each attribute value -> the ways to say it. The first is the dataset's own word.
SHAPE_WORDS = {
    "circle": ("circle", "ring", "disc", "dot", "round shape"),
    "square": ("square", "box", "block", "square shape"),
    "triangle": ("triangle", "triangular shape", "triangle shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "heart": ("heart", "love heart", "heart shape"),
    "cross": ("cross", "plus sign", "plus", "cross shape"),
}
SIZE_WORDS = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
POSITION_WORDS = {
    "top left": (
        "in the top left",
        "in the upper left corner",
        "top-left",
        "at the top left",
        "in the upper left",
    ),
    "top": ("at the top", "near the top", "at the top of the image", "up top"),
    "top right": (
        "in the top right",
        "in the upper right corner",
        "top-right",
        "at the top right",
        "in the upper right",
    ),
    "left": ("on the left", "on the left side", "to the left", "at the left"),
    "center": ("in the center", "in the middle", "centered", "in the centre"),
    "right": ("on the right", "on the right side", "to the right", "at the right"),
    "bottom left": ("in the bottom left", "in the lower left corner", "bottom-left", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image", "down low"),
    "bottom right": (
        "in the bottom right",
        "in the lower right corner",
        "bottom-right",
        "at the bottom right",
    ),
}
BACKGROUND_FORMS = (
    "on a {} background",
    "against a {} background",
    "with a {} background",
    "on {}",
    "{} background",
)
ARTICLES = ("a", "one", "the", "")

# Frames: {obj} the object phrase ("a small red box", "a box, red"); {pos} / {bg} the position and
# background phrases, empty when the caption does not name them (the frame's separators are cleaned).
TRAIN_FRAMES = (
    "{obj} {pos} {bg}",
    "{obj} {bg} {pos}",
    "{pos}, {obj} {bg}",
    "{obj}, {pos}, {bg}",
    "a drawing of {obj} {pos} {bg}",
    "a picture of {obj} {bg} {pos}",
    "an image of {obj}, {pos}, {bg}",
    "draw {obj} {pos} {bg}",
    "{bg}: {obj} {pos}",
    "a photo of {obj} {pos} {bg}",
)
HELDOUT_FRAMES = (
    "there is {obj} {pos} {bg}",
    "please make {obj} {pos}, {bg}",
    "show me {obj} {bg} {pos}",
    "{pos} there is {obj} {bg}",
    "i want {obj} {pos} {bg}",
    "{obj} sitting {pos} {bg}",
    "can you paint {obj} {pos} {bg}",
)
# Object phrases: {a} article, {size}, {color}, {shape}; adjectives before or after the noun.
OBJECT_FORMS = (
    "{a} {size} {color} {shape}",
    "{a} {color} {size} {shape}",
    "{a} {size} {shape} in {color}",
    "{a} {size} {shape} that is {color}",
    "{a} {size} {shape}, {color}",
    "{a} {size} {color}-colored {shape}",
    "{a} {size} {shape} colored {color}",
)
CASES = ("lower", "lower", "lower", "capitalized", "upper")
ENDINGS = ("", "", "", ".", "!")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str, article: str) -> str:
    if article == "a" and word[:1] in "aeiou":
        return "an"
    return article


def _tidy(text: str) -> str:
    """Collapse the gaps an empty part leaves: double spaces, a comma or colon with nothing before it."""
    words = " ".join(text.split())
    for junk in (" ,", ", ,", ",,", " :"):
        while junk in words:
            words = words.replace(junk, "," if junk != " :" else ":")
    words = words.strip(" ,:")
    return " ".join(words.replace(",", ", ").split()).replace(" ,", ",")


def phrase(
    rng: np.random.Generator,
    shape: str | None,
    color: str | None,
    size: str | None = None,
    position: str | None = None,
    background: str | None = None,
    frames=TRAIN_FRAMES,
) -> str:
    """One random way of saying these attributes (None: not named; a None shape is "shape").

    Example:
        >>> phrase(np.random.default_rng(0), "square", "red", position="top left")  # doctest: +SKIP
        'a red box in the upper left corner'
    """
    shape_word = _pick(rng, SHAPE_WORDS[shape]) if shape else "shape"
    size_word = _pick(rng, SIZE_WORDS[size]) if size else ""
    form = _pick(rng, OBJECT_FORMS) if color else "{size} {shape}"
    words = " ".join(
        form.replace("{a} ", "").format(size=size_word, color=color or "", shape=shape_word).split()
    )
    article = _article(words, _pick(rng, ARTICLES))
    obj = f"{article} {words}".strip()
    pos = _pick(rng, POSITION_WORDS[position]) if position else ""
    bg = _pick(rng, BACKGROUND_FORMS).format(background) if background else ""
    text = _tidy(_pick(rng, frames).format(obj=obj, pos=pos, bg=bg))
    case = _pick(rng, CASES)
    if case == "capitalized":
        text = text[:1].upper() + text[1:]
    elif case == "upper":
        text = text.upper()
    return text + _pick(rng, ENDINGS)


def heldout_phrasing_prompts(n: int, seed: int = 0):
    """``heldout_prompts(n, seed)`` said in frames that training never uses (``HELDOUT_FRAMES``).

    The same attributes as ``dataset.heldout_prompts(n, seed)`` (held-out combinations), so the two rows of
    the model card differ only in wording. Deterministic in (n, seed).
    """
    import dataclasses

    from tiny_shapes import dataset as shapes

    rng = np.random.default_rng([int(seed), 97])
    targets = []
    for t in shapes.heldout_prompts(n, seed=seed):
        text = phrase(rng, t.shape, t.color, t.size, t.position, t.background, frames=HELDOUT_FRAMES)
        targets.append(dataclasses.replace(t, prompt=text))
    return targets
