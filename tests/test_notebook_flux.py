"""examples/colab_flux_tpu.ipynb runs end to end on the CPU (nbclient): Flux [schnell] model-parallel.

The kernel gets ``KERAS_BACKEND=jax`` and eight virtual host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``); the notebook loads diffusers' tiny random Flux
[schnell] pipeline (``tests/fixtures/flux``) with ``ShardedStableDiffusion.from_pretrained`` on a
("batch", "model") mesh of 2 x 4 (the transformer's kernels split over "model", the batch over
"batch"), generates four images, then the same images on one device, and writes both to
``TF_DIFFUSION_NOTEBOOK_OUT``. They must agree within 1e-5 (measured: 1.3e-6 in float32 and with int8
weights; images in [0, 1]), and every split kernel must lie on the eight devices as slices of its
columns or rows.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tests.conftest import run_notebook

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_flux_tpu.ipynb"
TOL = 1e-5


def _execute(tmp_path, monkeypatch, quantize: str) -> tuple[dict, str]:
    pytest.importorskip("jax")
    out = tmp_path / "images.npz"
    _, printed = run_notebook(
        NOTEBOOK,
        tmp_path,
        monkeypatch,
        {
            "TF_DIFFUSION_NOTEBOOK_MODEL": "tiny",
            "TF_DIFFUSION_NOTEBOOK_MESH": "2x4",
            "TF_DIFFUSION_NOTEBOOK_QUANTIZE": quantize,
            "TF_DIFFUSION_NOTEBOOK_OUT": str(out),
            "KERAS_BACKEND": "jax",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        },
    )
    return dict(np.load(out)), printed


def _check(result: dict, printed: str, weight_dtype: str) -> None:
    assert "8 devices (cpu), mesh {'batch': 2, 'model': 4}" in printed
    assert list(result["mesh"]) == [2, 4] and int(result["replicas"]) == 2
    assert len(result["used_devices"]) == 8  # the loop's output lies on every device of the mesh
    assert result["images"].shape == (4, 32, 32, 3) and result["images"].dtype == np.uint8
    single, spread = result["single"], result["spread"]
    assert single.shape == (4, 32, 32, 3) and single.std() > 0.05  # not a blank image
    np.testing.assert_allclose(spread, single, rtol=0, atol=TOL)
    # The uint8 images of the first (sharded) run are the float images' rounding.
    assert np.abs(result["images"].astype(np.float32) / 255 - spread).max() <= 1 / 255 + TOL
    # Every split kernel: on all 8 devices, as 4 distinct slices (columns or rows) of its full shape.
    assert str(result["weight_dtype"]) == weight_dtype
    keys, kinds = list(result["split_keys"]), list(result["split_kinds"])
    assert "double_blocks.0.img_attn.qkv" in keys and "single_blocks.0.linear2" in keys
    assert set(kinds) == {"column", "row"}
    for key, kind, full, shards, devices in zip(
        keys, kinds, result["split_full"], result["split_shards"], result["split_devices"], strict=True
    ):
        rows, cols = full
        want = [rows, cols // 4] if kind == "column" else [rows // 4, cols]
        assert devices == 8 and len(shards) == 8, key
        assert all(list(s) == want for s in shards), (key, kind, full, shards)


@pytest.mark.slow  # about 80 s: a kernel process loads and compiles the tiny pipeline twice
def test_flux_notebook_runs_model_parallel_on_eight_devices(tmp_path, monkeypatch):
    result, printed = _execute(tmp_path, monkeypatch, "none")
    _check(result, printed, "float32")
    assert "max difference, model-parallel vs one device" in printed


@pytest.mark.slow  # the same with int8 weights (transformer and text encoders)
def test_flux_notebook_with_int8_weights(tmp_path, monkeypatch):
    result, printed = _execute(tmp_path, monkeypatch, "int8")
    _check(result, printed, "int8")
