"""Training data as ``tf.data`` pipelines: from arrays, from a batch generator, from a folder of captioned images."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf


def dataset_from_arrays(
    images,
    captions: Sequence[str],
    tokenizer,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    repeat: bool = True,
    hints=None,
) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of (images float32 [-1, 1], token ids int32) batches from in-memory data.

    With ``hints`` the batches are (images, token ids, hints float32 [0, 1]), what ``ControlNetTrainer``
    reads.

    Args:
        images: (N, H, W, 3) uint8 array (all one size; resize beforehand, see ``load_image_folder``).
        captions: N strings.
        tokenizer: callable list[str] -> (N, L) ids, e.g. ``StableDiffusion.tokenizer``, or a trainer's
            ``tokenize`` ((N, 2, L) for SDXL).
        batch_size: global batch size; the last partial batch is dropped.
        shuffle, seed: shuffle every epoch with this seed.
        repeat: loop forever.
        hints: None, or (N, H, W, C) uint8 hint images (ControlNet conditioning), one per image.

    Raises:
        ValueError: for mismatched lengths, a non-uint8 or non-NHWC array, or a batch larger than the data.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 array (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; give one caption per image")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= len(images):
        raise ValueError(
            f"batch_size={batch_size!r} must be an int in [1, {len(images)}] (the number of images)"
        )
    ids = np.asarray(tokenizer(list(captions)), dtype=np.int32)
    columns = (images, ids)
    if hints is not None:
        hints = np.asarray(hints)
        if hints.ndim != 4 or hints.dtype != np.uint8 or len(hints) != len(images):
            raise ValueError(
                f"hints must be a uint8 array (N={len(images)}, H, W, C), got {hints.dtype} {hints.shape}"
            )
        columns = (images, ids, hints)
    ds = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        ds = ds.shuffle(min(len(images), 10_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)

    def scale(x, y, *hint):
        x = tf.cast(x, tf.float32) / 127.5 - 1.0
        return (x, y, tf.cast(hint[0], tf.float32) / 255.0) if hint else (x, y)

    ds = ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def dataset_from_generator(
    make_batch: Callable[[int], tuple[np.ndarray, Sequence[str]]],
    tokenizer,
    batch_size: int,
    image_size: int,
    start: int = 0,
) -> tf.data.Dataset:
    """An endless ``tf.data`` pipeline from ``make_batch(k) -> (uint8 images (B, H, W, 3), captions)``.

    Batch ``k`` for k = start, start + 1, ... is drawn on the fly in a background thread, so a
    resumed run passes ``start=step`` to continue the stream.
    """

    def batches():
        k = start
        while True:
            images, captions = make_batch(k)
            k += 1
            ids = np.asarray(tokenizer(list(captions)), dtype=np.int32)
            yield images, ids

    per_caption = tuple(int(d) for d in np.asarray(tokenizer([""])).shape[1:])  # (L,), SDXL (2, L)
    signature = (
        tf.TensorSpec((batch_size, image_size, image_size, 3), tf.uint8),
        tf.TensorSpec((batch_size, *per_caption), tf.int32),
    )
    ds = tf.data.Dataset.from_generator(batches, output_signature=signature)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, y))
    return ds.prefetch(4)


def load_image_folder(folder: str | os.PathLike, size: int) -> tuple[np.ndarray, list[str]]:
    """Images and captions from a folder of ``name.png|jpg|jpeg|webp`` + ``name.txt`` pairs.

    Each image is centre-cropped to a square and resized to ``size`` x ``size`` (Lanczos;
    ``_square_image`` is the one place training data and hints are resized).

    Returns:
        (uint8 images (N, size, size, 3), captions).

    Raises:
        ValueError: when an image has no caption file, the folder holds no images, or an image is
            unreadable or larger than ``tf_diffusion.images.max_image_pixels()``.
    """
    paths = _image_paths(folder)
    if not paths:
        raise ValueError(f"{folder}: no .png/.jpg/.jpeg/.webp images found")
    images, captions = [], []
    for path in paths:
        caption_path = os.path.splitext(path)[0] + ".txt"
        if not os.path.exists(caption_path):
            raise ValueError(f"{path}: no caption file {caption_path}")
        with open(caption_path, encoding="utf-8") as f:
            captions.append(f.read().strip())
        images.append(_square_image(path, size))
    return np.stack(images), captions


def _image_paths(folder) -> list[str]:
    return sorted(
        p
        for p in glob.glob(os.path.join(os.fspath(folder), "*"))
        if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
    )


def _square_image(path: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image centre-cropped to a square and resized (Lanczos)."""
    from PIL import Image

    from tf_diffusion.images import open_image

    with open_image(path) as im:  # size-checked from the header before decoding
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def load_hint_folder(data: str | os.PathLike, hints: str | os.PathLike, size: int) -> np.ndarray:
    """ControlNet hint images for the images of ``load_image_folder(data, size)``, in the same order.

    Each image ``name.png`` (any of its extensions) in ``data`` needs a hint ``name.*`` in ``hints``,
    which is cropped and resized exactly as the image, so the two stay aligned.

    Returns:
        uint8 hints (N, size, size, 3).

    Raises:
        ValueError: when an image has no hint, or a hint is unreadable.
    """
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in _image_paths(hints)}
    out = []
    for path in _image_paths(data):
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem not in by_stem:
            raise ValueError(f"{path}: no hint image {stem}.png|jpg|jpeg|webp in {hints}")
        out.append(_square_image(by_stem[stem], size))
    if not out:
        raise ValueError(f"{data}: no .png/.jpg/.jpeg/.webp images found")
    return np.stack(out)


def dataset_with_prior(instance: tf.data.Dataset, prior: tf.data.Dataset) -> tf.data.Dataset:
    """DreamBooth batches: (images, ids) of the instance data and (class_images, class_ids) of the class data.

    Both pipelines must repeat (``dataset_from_arrays`` does by default); the class batch size may differ.
    Train with ``TrainingConfig(prior_loss_weight=...)``.
    """
    return tf.data.Dataset.zip((instance, prior)).map(lambda a, b: (a[0], a[1], b[0], b[1]))
