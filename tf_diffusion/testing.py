"""Deterministic random weights for tiny test models, shared by the fixture tools and the tests (and a
tiny captioned training folder for the trainer's command-line tests).

Weights are drawn with NumPy from a seed, in sorted key order, so a tool that
loads them into a PyTorch reference model and a test that loads them into ours
get identical values without storing them.
"""

from __future__ import annotations

import numpy as np


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random float32 tensors for every key, scaled so activations stay O(1).

    Norm scales are drawn around 1 and biases around 0 (not left at 1 / 0) so a
    test fails if an affine parameter is ignored. Weight matrices and kernels
    get a 1/sqrt(fan_in) scale.

    Args:
        shapes: checkpoint key -> torch-layout shape.
        seed: the NumPy seed.

    Returns:
        key -> float32 array of that shape.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        draw = rng.standard_normal(shape).astype(np.float32)
        name = key.rsplit(".", 1)[-1]
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            if key.endswith(("token_embedding.weight", "position_embedding.weight")):
                fan_in = 1  # embedding tables are looked up, not multiplied: keep O(1) entries
            out[key] = draw / np.float32(np.sqrt(fan_in))
        elif name == "weight":
            out[key] = np.float32(1.0) + np.float32(0.1) * draw  # a norm's scale
        else:
            out[key] = np.float32(0.1) * draw
    return out


def toy_phase(shape: tuple[int, ...]) -> np.ndarray:
    """(shape) float64 fixed phase field that ``toy_velocity`` reads: 0.37 times each element's flat index."""
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 0.37


def toy_velocity(x, t: float, phase: np.ndarray) -> np.ndarray:
    """A smooth elementwise stand-in for a flow transformer: the velocity at latents ``x`` and timestep ``t``.

    It pulls ``x`` toward a phase-dependent target faster as ``t`` (0 to 1000) falls, with a small
    nonlinear and time-varying part, so a sampler that misplaces a step or a sigma drifts off the
    reference trajectory. Computed in float64 and returned as float32, as a model's output would be.
    """
    x = np.asarray(x, np.float64)
    s = t / 1000.0
    target = 0.5 * np.sin(phase)
    v = (x - target) / max(1.0 - 0.9 * s, 0.1) * 0.8 + 0.1 * np.tanh(x) + 0.05 * np.cos(t / 97.0 + phase)
    return v.astype(np.float32)


def write_captioned_images(folder, count: int = 2, size: int = 16, seed: int = 0) -> None:
    """``count`` random ``size`` x ``size`` PNGs in ``folder`` (created), each with a ``.txt`` caption
    ("a zq-shape number i"): the layout ``tf-diffusion train --data`` reads."""
    import pathlib

    from PIL import Image

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a zq-shape number {i}")
