"""examples/colab_tpu.ipynb runs end to end on the CPU (nbclient), spreading a batch over two logical CPUs.

Locally the notebook picks the tensorflow backend and a MirroredStrategy over two logical CPU devices;
the model is the trained tiny-shapes folder when it is present and loads, else the micro random model.
The notebook writes its images to ``TF_DIFFUSION_NOTEBOOK_OUT``; the spread-over-devices images must
equal the single-device ones (measured difference 0).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tests.conftest import run_notebook

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_tpu.ipynb"


def _local_model() -> str:
    folder = ROOT / "weights" / "tiny-shapes"
    if folder.is_dir():
        try:
            from tf_diffusion.pipeline import StableDiffusion

            StableDiffusion.from_pretrained(str(folder))
            return str(folder)
        except (OSError, ValueError):
            pass
    return "micro"


@pytest.mark.slow  # about a minute: a kernel process runs the whole notebook
def test_colab_notebook_runs_locally(tmp_path, monkeypatch):
    model = _local_model()
    out = tmp_path / "images.npz"
    # The sharded and single runs see other batch sizes, so the autotuner is off (run_notebook), as
    # in tests/test_distributed.py: what is compared is the sharding alone.
    _, printed = run_notebook(
        NOTEBOOK,
        tmp_path,
        monkeypatch,
        {
            "TF_DIFFUSION_NOTEBOOK_MODEL": model,
            "TF_DIFFUSION_NOTEBOOK_BACKEND": "tensorflow",
            "TF_DIFFUSION_NOTEBOOK_STEPS": "3",
            "TF_DIFFUSION_NOTEBOOK_OUT": str(out),
        },
    )

    result = np.load(out)
    assert int(result["replicas"]) == 2
    size = 32 if model == "micro" else 64
    assert result["images"].shape == (4, size, size, 3) and result["images"].dtype == np.uint8
    np.testing.assert_allclose(result["spread"], result["single"], atol=1e-5)
    assert "2 devices" in printed and "backend: tensorflow" in printed
