"""Tiled VAE decode and encode: large images through the VAE in overlapping tiles, so memory stays flat.

The same arithmetic as diffusers' ``AutoencoderKL`` with ``enable_tiling()``: tiles of ``tile_size`` pixels
(``tile_size / f`` latents) start every ``(1 - overlap)`` tile, each tile is run on its own, and each tile's
first ``overlap`` part is blended linearly with the tile above it and then the tile to its left (both already
blended), before the tiles are cut to their stride and joined. A tiled result differs from the untiled one
near the seams only, as in diffusers. How a tile runs is the caller's (a compiled decode, the encoder plus
``quant_conv``); this module only cuts, blends and joins NHWC arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VAETiling:
    """Tiling settings, with diffusers' names in mind.

    Attributes:
        tile_size: a tile's side in pixels (diffusers' ``tile_sample_min_size``, by default the VAE's
            ``sample_size``: 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL).
        overlap: the part of a tile shared with its neighbour (diffusers' ``tile_overlap_factor``, 0.25).
    """

    tile_size: int
    overlap: float = 0.25

    def __post_init__(self):
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 8:
            raise ValueError(f"tile_size={self.tile_size!r} must be an integer number of pixels >= 8")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap={self.overlap!r} must be a fraction in [0, 1)")

    def check(self, factor: int) -> None:
        """Raise if tiles of this size do not fall on whole latents of a VAE with downsampling ``factor``."""
        stride = int(self.tile_size * (1 - self.overlap))
        if self.tile_size % factor or stride % factor:
            raise ValueError(
                f"tile_size={self.tile_size} with overlap={self.overlap} gives tiles of {self.tile_size} and a "
                f"stride of {stride} pixels; both must be multiples of the VAE's factor {factor}"
            )

    def latent_size(self, factor: int) -> int:
        return self.tile_size // factor


def _blend(previous: np.ndarray, tile: np.ndarray, extent: int, axis: int) -> None:
    """Blend ``previous``'s last ``extent`` rows (axis 1) or columns (axis 2) into ``tile``'s first, in place."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return
    weight = (np.arange(extent, dtype=np.float64) / extent).astype(np.float32)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weight = weight.reshape(shape)
    head = [slice(None)] * 4
    tail = [slice(None)] * 4
    head[axis], tail[axis] = slice(0, extent), slice(previous.shape[axis] - extent, None)
    tile[tuple(head)] = previous[tuple(tail)] * (1 - weight) + tile[tuple(head)] * weight


def run_tiled(
    fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, out_tile: int, overlap: float
):
    """``fn`` over overlapping ``tile``-sized NHWC tiles of ``x``, blended and joined.

    ``out_tile`` is a full tile's size in ``fn``'s output (``tile * f`` decoding, ``tile / f`` encoding).
    """
    stride = int(tile * (1 - overlap))
    extent = int(out_tile * overlap)
    keep = out_tile - extent
    height, width = x.shape[1:3]
    rows = [
        [np.array(fn(x[:, i : i + tile, j : j + tile]), np.float32) for j in range(0, width, stride)]
        for i in range(0, height, stride)
    ]
    for i, row in enumerate(rows):
        for j, piece in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], piece, extent, axis=1)
            if j > 0:
                _blend(row[j - 1], piece, extent, axis=2)
    return np.concatenate(
        [np.concatenate([piece[:, :keep, :keep] for piece in row], axis=2) for row in rows], axis=1
    )


def tiled_decode(decode: Callable, latents: np.ndarray, tiling: VAETiling, factor: int) -> np.ndarray:
    """Decode (N, h, w, C) latents tile by tile (only when larger than one tile, as diffusers)."""
    tiling.check(factor)
    tile = tiling.latent_size(factor)
    if latents.shape[1] <= tile and latents.shape[2] <= tile:
        return np.asarray(decode(latents), np.float32)
    return run_tiled(decode, latents, tile, tiling.tile_size, tiling.overlap)


def tiled_moments(encode: Callable, images: np.ndarray, tiling: VAETiling, factor: int) -> np.ndarray:
    """The posterior's moments (encoder + quant_conv) of (N, H, W, 3) images tile by tile (when larger)."""
    tiling.check(factor)
    if images.shape[1] <= tiling.tile_size and images.shape[2] <= tiling.tile_size:
        return np.asarray(encode(images), np.float32)
    return run_tiled(encode, images, tiling.tile_size, tiling.latent_size(factor), tiling.overlap)
