"""The procedural shapes data set and the pixel-level checker that scores generated images (examples/tiny_shapes).

Their speed is measured by benchmarks/shapes_data.py."""

import pathlib
import re
import sys

import numpy as np
import pytest

# The tiny-shapes recipe lives outside the package, in examples/tiny_shapes.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from tiny_shapes import checker  # noqa: E402
from tiny_shapes import dataset as shapes  # noqa: E402


@pytest.fixture(scope="module")
def train_samples():
    return [shapes.ShapesDataset(0, "train")[i][1] for i in range(1500)]


def test_same_seed_same_batch_and_random_access():
    a_images, a_captions, a_attrs = shapes.numpy_batch(3, 8)
    b_images, b_captions, b_attrs = shapes.numpy_batch(3, 8)
    np.testing.assert_array_equal(a_images, b_images)
    assert a_captions == b_captions and a_attrs == b_attrs
    c_images, c_captions, _ = shapes.numpy_batch(4, 8)
    assert c_captions != a_captions and not np.array_equal(c_images, a_images)
    # Item i depends on (seed, split, i) only: a later batch start or indexing gives the same item.
    image, attrs = shapes.ShapesDataset(3)[5]
    np.testing.assert_array_equal(image, a_images[5])
    assert attrs == a_attrs[5]
    tail_images, _, _ = shapes.numpy_batch(3, 3, start=5)
    np.testing.assert_array_equal(tail_images, a_images[5:8])
    np.testing.assert_array_equal(shapes.sample(9)[0], shapes.sample(np.random.default_rng(9))[0])
    assert a_images.dtype == np.uint8 and a_images.shape == (8, 64, 64, 3)


def test_heldout_pairs_only_in_heldout_split(train_samples):
    assert not any(a.heldout for a in train_samples)
    assert not {(a.shape, a.color) for a in train_samples} & set(shapes.HELDOUT_SHAPE_COLOR)
    assert not {(a.shape, a.position) for a in train_samples} & set(shapes.HELDOUT_SHAPE_POSITION)
    heldout = [shapes.ShapesDataset(0, "heldout")[i][1] for i in range(300)]
    assert all(a.heldout for a in heldout)
    assert set(shapes.HELDOUT_SHAPE_COLOR) <= {(a.shape, a.color) for a in heldout}
    assert set(shapes.HELDOUT_SHAPE_POSITION) <= {(a.shape, a.position) for a in heldout}
    for a in heldout:
        if (a.shape, a.color) not in shapes.HELDOUT_SHAPE_COLOR:
            assert "position" in a.mentions  # else the prompt would not ask for the unseen pair


def test_heldout_prompts_ask_for_unseen_combinations():
    prompts = shapes.heldout_prompts(40, seed=1)
    assert prompts == shapes.heldout_prompts(40, seed=1) and len(prompts) == 40
    for p in prompts:
        named_pair = (p.shape, p.color) in shapes.HELDOUT_SHAPE_COLOR
        named_pair |= (p.shape, p.position) in shapes.HELDOUT_SHAPE_POSITION
        assert named_pair and p.color in p.prompt and p.shape in p.prompt


def test_every_attribute_value_is_trained(train_samples):
    assert {a.shape for a in train_samples} == set(shapes.SHAPES)
    assert {a.color for a in train_samples} == set(shapes.COLORS)
    assert {a.size for a in train_samples} == set(shapes.SIZES)
    assert {a.position for a in train_samples} == set(shapes.POSITIONS)
    assert {a.background for a in train_samples} == set(shapes.BACKGROUNDS)
    assert len(shapes.COLORS) >= 8 and len(shapes.SHAPES) >= 5
    # About 10% of the (shape, colour) pairs are held out and each shape keeps most of its colours.
    assert len(shapes.HELDOUT_SHAPE_COLOR) / (len(shapes.SHAPES) * len(shapes.COLORS)) == pytest.approx(0.1)
    for shape in shapes.SHAPES:
        assert len({a.color for a in train_samples if a.shape == shape}) == len(shapes.COLORS) - 1


def test_backgrounds_contrast_with_the_shape(train_samples):
    for a in train_samples:
        assert a.background != a.color
        distance = np.linalg.norm(np.subtract(shapes.COLORS[a.color], shapes.BACKGROUNDS[a.background]))
        assert distance >= shapes.MIN_CONTRAST
    assert shapes.allowed_backgrounds("white") == ("black", "gray")


def test_captions_name_colour_shape_and_exactly_the_mentioned_attributes(train_samples):
    for a in train_samples:
        words = set(re.findall(r"[a-z]+", a.caption))
        assert a.color in a.caption and a.shape in words
        assert (a.size in words) == ("size" in a.mentions)
        assert (f"{a.background} background" in a.caption) == ("background" in a.mentions)
        named = any(p in a.caption for p in shapes.POSITION_PHRASES[a.position])
        assert named == ("position" in a.mentions)
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", a.caption), a.caption
    assert len({a.caption for a in train_samples}) > 500
    mentioned = np.mean(
        [[k in a.mentions for k in ("size", "position", "background")] for a in train_samples], 0
    )
    np.testing.assert_allclose(mentioned, [0.5, 0.5, 0.35], atol=0.05)
    assert shapes.make_caption("circle", "red", "small", "top left", "white") == (
        "a small red circle in the top left on a white background"
    )
    assert (
        shapes.make_caption("star", "blue", position="center", template=1, phrase=1) == "blue star, centered"
    )
    assert shapes.make_caption("square", "orange") == "an orange square"


def test_pixels_match_the_attributes():
    images, _, attrs = shapes.numpy_batch(2, 48)
    for image, a in zip(images, attrs, strict=True):
        # Plain background everywhere outside the box; the shape's own colour at its box center.
        np.testing.assert_array_equal(image[0, 0], shapes.BACKGROUNDS[a.background])
        np.testing.assert_array_equal(image[-1, -1], shapes.BACKGROUNDS[a.background])
        cx, cy = (int(v) for v in a.center)
        np.testing.assert_array_equal(image[cy, cx], shapes.COLORS[a.color])
        x0, y0, x1, y1 = a.bbox
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        side = max(x1 - x0, y1 - y0) / 64
        assert abs(side / shapes.SIZES[a.size] - 1) <= shapes.SIZE_JITTER + 1e-6
        column, row = shapes.POSITIONS[a.position]
        assert int(a.center[0] * 3 / 64) == column and int(a.center[1] * 3 / 64) == row
        # Anti-aliased: edge pixels blend the two colours.
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2


def _full_targets(attrs):
    return [
        dict(color=a.color, shape=a.shape, size=a.size, position=a.position, background=a.background)
        for a in attrs
    ]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_checker_reads_clean_and_degraded_images(split):
    images, _, attrs = shapes.numpy_batch(21, 300, split=split)
    for name, batch in [("clean", images), ("degraded", checker.degrade(images, seed=5))]:
        result = checker.score(batch, _full_targets(attrs))
        assert result["counts"]["position"] == 300
        assert result["color"] >= 0.98, (name, result["color"])
        assert result["shape"] >= 0.95, (name, result["shape"])
        assert result["position"] >= 0.95, (name, result["position"])
        assert result["size"] >= 0.95 and result["background"] >= 0.95, name
    # Stronger blur, noise and colour shift than the mild default.
    harsh = checker.degrade(images, seed=6, noise=14.0, blur=1.2, jitter=20.0)
    result = checker.score(harsh, _full_targets(attrs))
    assert min(result[k] for k in checker.ATTRIBUTES) >= 0.95, {k: result[k] for k in checker.ATTRIBUTES}


def test_checker_other_image_sizes():
    for size in (32, 128):
        images, _, attrs = shapes.numpy_batch(8, 60, image_size=size)
        result = checker.score(images, _full_targets(attrs))
        assert min(result[k] for k in checker.ATTRIBUTES) >= 0.95, (size, result)


def test_score_counts_only_named_attributes_and_can_fail():
    image = shapes.draw("circle", "red", "white", (10.0, 10.0), 20.0)  # a red circle, top left
    reading = checker.check(image)
    assert (reading["shape"], reading["color"], reading["position"], reading["background"]) == (
        "circle",
        "red",
        "top left",
        "white",
    )
    targets = [
        shapes.Target("a red circle", "circle", "red"),
        shapes.Target("a blue square on the right", "square", "blue", position="right"),
    ]
    result = checker.score(np.stack([image, image]), targets)
    assert result["color"] == 0.5 and result["shape"] == 0.5 and result["position"] == 0.0
    assert result["counts"] == dict(color=2, shape=2, size=0, position=1, background=0)
    assert result["size"] is None and result["all"] == 0.5
    assert result["items"][1]["correct"] == dict(shape=False, color=False, position=False)
    # A ShapeSample counts what its caption names.
    _, attrs = shapes.sample(4)
    assert set(checker.score([shapes.sample(4)[0]], [attrs])["items"][0]["correct"]) == {
        "shape",
        "color",
        *attrs.mentions,
    }
    blank = checker.check(np.full((64, 64, 3), 255, np.uint8))
    assert blank["shape"] is None and blank["color"] is None and blank["background"] == "white"


def test_two_shapes_report_the_larger_and_count_components():
    image = shapes.draw("square", "blue", "white", (48.0, 48.0), 26.0)
    small = shapes.draw("star", "blue", "white", (12.0, 12.0), 14.0)
    image = np.minimum(image, small)  # both on one white background
    reading = checker.check(image)
    assert (
        reading["shape"] == "square" and reading["position"] == "bottom right" and reading["components"] == 2
    )


def test_mention_overrides_change_captions_not_images():
    plain = shapes.ShapesDataset(5, "train")
    often = shapes.ShapesDataset(5, "train", mention={"position": 0.9})
    never = shapes.ShapesDataset(5, "train", mention={"position": 0.0, "size": 1.0})
    items = [(plain[i], often[i], never[i]) for i in range(400)]
    for (a, x), (b, y), (c, z) in items:
        np.testing.assert_array_equal(a, b)  # the draw does not depend on the probabilities
        np.testing.assert_array_equal(a, c)
        assert (x.shape, x.color, x.position, x.size) == (y.shape, y.color, y.position, y.size)
        assert (x.shape, x.color, x.position, x.size) == (z.shape, z.color, z.position, z.size)
    rate = np.mean(
        [[("position" in y.mentions), ("position" in z.mentions)] for _, (_, y), (_, z) in items], 0
    )
    assert 0.85 < rate[0] < 0.95 and rate[1] == 0.0
    assert all("size" in z.mentions for _, _, (_, z) in items)
    with pytest.raises(ValueError, match="mention attribute='outline' is not allowed"):
        shapes.ShapesDataset(0, mention={"outline": 0.5})
    with pytest.raises(ValueError, match=r"position=1.5 must be a number in \[0, 1\]"):
        shapes.sample(0, mention={"position": 1.5})


def test_captions_can_leave_out_colour_or_shape():
    plain = shapes.ShapesDataset(8, "train")
    partial = shapes.ShapesDataset(8, "train", mention={"color": 0.7, "shape": 0.7})
    named = []
    for i in range(400):
        (a, x), (b, y) = plain[i], partial[i]
        np.testing.assert_array_equal(a, b)  # same image and attributes, only the caption differs
        assert (x.shape, x.color, x.position, x.size, x.background) == (
            y.shape,
            y.color,
            y.position,
            y.size,
            y.background,
        )
        assert set(x.mentions) - {"color", "shape"} == set(y.mentions) - {"color", "shape"}
        words = set(re.findall(r"[a-z]+", y.caption.replace(f"{y.background} background", "")))
        assert (y.color in words) == ("color" in y.mentions), y.caption
        assert (y.shape in words) == ("shape" in y.mentions), y.caption
        assert ("shape" in words) == ("shape" not in y.mentions), y.caption
        target = y.target
        assert target.color == (y.color if "color" in y.mentions else None)
        assert target.shape == (y.shape if "shape" in y.mentions else None)
        named.append(["color" in y.mentions, "shape" in y.mentions])
    np.testing.assert_allclose(np.mean(named, 0), [0.7, 0.7], atol=0.07)
    assert shapes.make_caption(None, "purple", "small") == "a small purple shape"
    assert shapes.make_caption("circle", None, position="top", template=1) == "circle, at the top"
    assert shapes.make_caption(None, None) == "a shape"
    # A held-out prompt still names both, or it would not ask for the unseen pair.
    held = shapes.ShapesDataset(8, "heldout", mention={"color": 0.0, "shape": 0.0})
    assert all({"color", "shape"} <= set(held[i][1].mentions) for i in range(50))
    # Scoring skips what a target leaves out.
    image, attrs = partial[0]
    loose = shapes.Target("a shape", None, None)
    assert checker.score([image], [loose])["counts"]["shape"] == 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesDataset(0, split="val")
    with pytest.raises(ValueError, match="shape"):
        shapes.make_caption("hexagon", "red")
    with pytest.raises(ValueError, match="rng"):
        shapes.sample(-1)
    with pytest.raises(ValueError, match="uint8"):
        checker.check(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="targets"):
        checker.score(np.zeros((2, 64, 64, 3), np.uint8), [shapes.Target("a red circle", "circle", "red")])


def test_tf_dataset_gives_scaled_images_and_token_ids():
    pytest.importorskip("tensorflow")
    from tf_diffusion.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    dataset = shapes.as_tf_dataset(3, 4, tokenizer)
    batches = list(dataset.take(2).as_numpy_iterator())
    images, captions, _ = shapes.numpy_batch(3, 8)
    for k, (pixels, ids) in enumerate(batches):
        assert pixels.dtype == np.float32 and pixels.shape == (4, 64, 64, 3) and ids.shape == (4, 77)
        np.testing.assert_allclose(pixels, images[4 * k : 4 * k + 4] / 127.5 - 1.0, atol=1e-6)
        np.testing.assert_array_equal(ids, tokenizer(captions[4 * k : 4 * k + 4]))


def test_varied_captions_name_the_same_attributes_in_other_words():
    from tiny_shapes import phrasing

    plain = shapes.ShapesDataset(3, "train")
    varied = shapes.ShapesDataset(3, "train", captions="varied", varied_share=0.5)
    reworded = 0
    for i in range(400):
        image_a, a = plain[i]
        image_b, b = varied[i]
        np.testing.assert_array_equal(image_a, image_b)  # the wording changes, never the picture
        assert (a.shape, a.color, a.position, a.mentions) == (b.shape, b.color, b.position, b.mentions)
        if a.caption == b.caption:
            continue
        reworded += 1
        text = b.caption.lower()
        if "shape" in b.mentions:
            assert any(re.search(rf"\b{re.escape(w)}\b", text) for w in phrasing.SHAPE_WORDS[b.shape]), text
        if "color" in b.mentions:
            assert re.search(rf"\b{b.color}\b", text), text
        if "position" in b.mentions:
            assert any(p in text for p in phrasing.POSITION_WORDS[b.position]), text
        if "background" in b.mentions:
            assert b.background in text, text
        for frame in phrasing.HELDOUT_FRAMES:  # held-out sentence shapes never reach training
            assert (
                not text.startswith(frame.split("{")[0].strip() + " ") or not frame.split("{")[0].strip()
            ), text
    assert 150 <= reworded <= 250  # about half
    with pytest.raises(ValueError, match="captions='fancy'"):
        shapes.ShapesDataset(0, captions="fancy")
    with pytest.raises(ValueError, match="varied_share=1.5"):
        shapes.ShapesDataset(0, captions="varied", varied_share=1.5)


def test_heldout_phrasings_ask_for_the_heldout_combinations():
    from tiny_shapes import phrasing

    base = shapes.heldout_prompts(50, seed=7)
    reworded = phrasing.heldout_phrasing_prompts(50, seed=7)
    starts = {f.split("{")[0].strip() for f in phrasing.HELDOUT_FRAMES} - {""}
    for t, r in zip(base, reworded, strict=True):
        assert (t.shape, t.color, t.size, t.position, t.background) == (
            r.shape,
            r.color,
            r.size,
            r.position,
            r.background,
        )
        assert r.prompt != t.prompt
    assert sum(any(r.prompt.lower().startswith(s) for s in starts) for r in reworded) >= 25
    assert reworded == phrasing.heldout_phrasing_prompts(50, seed=7)  # deterministic
