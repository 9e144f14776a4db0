"""float8-stored weights ("fp8" Flux / SD3.5 files): read bit-exactly as torch reads them, upcast on load.

Fixtures from tools/make_fixtures_float8.py (torch, safetensors and diffusers wrote them).
"""

import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.mmdit import MMDiT
from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers
from tf_diffusion.weights.lazy import FLOAT8, is_floating
from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors
from tf_diffusion.weights.state_dict import load_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


@pytest.fixture(scope="module")
def codes():
    return dict(np.load(FIXTURES / "float8" / "codes.npz"))


def _same_floats(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(
        np.array_equal(np.isnan(got), np.isnan(want))
        and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    )


@pytest.mark.parametrize("reader", ["safetensors", "ckpt"])
def test_every_code_decodes_as_torch(codes, reader):
    folder = FIXTURES / "float8"
    if reader == "safetensors":
        tensors = load_safetensors(folder / "codes.safetensors")
    else:
        tensors = load_ckpt(folder / "codes.ckpt")
    assert set(tensors) == set(TYPES)
    for name in TYPES:
        value = np.asarray(tensors[name])
        assert value.dtype == FLOAT8[name] and is_floating(value.dtype)
        assert np.array_equal(value.view(np.uint8), codes["bytes"]), name  # the stored bits, untouched
        got = value.astype(np.float32)
        assert _same_floats(got, codes[f"{name}_float"]), name


def test_float8_round_trips_through_our_writer(tmp_path, codes):
    tensors = load_safetensors(FIXTURES / "float8" / "codes.safetensors")
    save_safetensors({k: np.asarray(v) for k, v in tensors.items()}, tmp_path / "again.safetensors")
    again = load_safetensors(tmp_path / "again.safetensors")
    for name in TYPES:
        assert np.asarray(again[name]).dtype == FLOAT8[name]
        assert np.array_equal(np.asarray(again[name]).view(np.uint8), codes["bytes"])
    header = (tmp_path / "again.safetensors").read_bytes()
    assert b'"F8_E4M3"' in header and b'"F8_E5M2FNUZ"' in header  # the format's codes, as safetensors writes


def test_float8_transformer_loads_upcast_and_equals_diffusers():
    sd3 = FIXTURES / "sd3"
    cfg = mmdit_config_from_diffusers(json.loads((sd3 / "transformer_sd3.json").read_text()))
    stored = load_safetensors(FIXTURES / "float8" / "transformer_sd3_e4m3fn.safetensors")
    assert {np.dtype(t.dtype) for t in stored.values()} == {FLOAT8["float8_e4m3fn"]}
    model = MMDiT(cfg)
    load_state_dict(model, convert_diffusers_mmdit(stored, cfg))
    assert {str(w.dtype) for w in model.weights} == {"float32"}
    ref = dict(np.load(sd3 / "reference.npz"))
    want = np.load(FIXTURES / "float8" / "transformer_sd3_e4m3fn.npz")
    out = np.asarray(model(*[ref[f"sd3_{k}"] for k in ("latents", "timesteps", "context", "pooled")]))
    # The float8 rounding moved diffusers' output by want["moved"] (about 0.08); ours follows it to 1e-4.
    assert float(want["moved"]) > 1e-2
    assert np.abs(out - want["out"]).max() < 1e-4


def test_float8_flux_single_file_loads_upcast_and_equals_diffusers():
    # An "fp8" Flux file in the original layout (double_blocks.*, img_in, ...), from tools/make_fixtures_flux_float8.py.
    from tf_diffusion.weights.flux import flux_config_from_diffusers, load_flux_transformer

    folder = FIXTURES / "flux" / "transformer-guidance-2x2"
    cfg = flux_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    path = FIXTURES / "float8" / "transformer_flux_e4m3fn.safetensors"
    assert {np.dtype(t.dtype) for t in load_safetensors(path).values()} == {FLOAT8["float8_e4m3fn"]}
    model = load_flux_transformer(path, axes_dim=cfg.axes_dim)
    assert model.config == cfg and {str(w.dtype) for w in model.weights} == {"float32"}
    with np.load(FIXTURES / "flux" / "transformers.npz") as data:
        x = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("guidance-2x2/")}
    x.pop("out")
    want = np.load(FIXTURES / "float8" / "transformer_flux_e4m3fn.npz")
    out = np.asarray(model(**x))
    # The float8 rounding moved diffusers' output by want["moved"] (0.37); ours follows it to 1e-4.
    assert float(want["moved"]) > 1e-2
    assert np.abs(out - want["out"]).max() < 1e-4
