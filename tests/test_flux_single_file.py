"""Flux.1 original single files (the transformer alone, ``flux1-dev.safetensors`` keys) through
``StableDiffusion.from_pretrained(file, config=folder)``, against diffusers' FluxPipeline images.

The file is the fixture folder's transformer in the original layout (the conversion is the one
tests/test_flux.py checks key by key against diffusers'); the images it gives with the folder's other
components must equal diffusers' images of the folder (tests/fixtures/flux/pipeline.npz).
"""

import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.pipeline import StableDiffusion

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "flux"
META = json.loads((FIXTURES / "pipeline.json").read_text())
IMAGE_TOL = 1e-4


def _original_file(tmp_path, prefix: str = "") -> pathlib.Path:
    from safetensors.numpy import save_file

    from tf_diffusion.weights.diffusers_folder import read_json
    from tf_diffusion.weights.flux import convert_diffusers_flux, flux_config_from_diffusers
    from tf_diffusion.weights.safetensors_io import open_safetensors

    folder = FIXTURES / "flux-dev" / "transformer"
    cfg = flux_config_from_diffusers(read_json(folder / "config.json"))
    with open_safetensors(folder / "diffusion_pytorch_model.safetensors") as handle:
        tensors = convert_diffusers_flux(handle, cfg)
        tensors = {prefix + k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    path = tmp_path / "flux1-tiny-dev.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_file_with_config_folder_matches_diffusers(tmp_path, prefix):
    path = _original_file(tmp_path, prefix)
    sd = StableDiffusion.from_pretrained(path, config=FIXTURES / "flux-dev")
    assert type(sd.hooks).__name__ == "FluxHooks"
    assert sd.config.transformer.guidance_embed  # guidance_in is in the file: [dev]
    ref = {
        k.split("/", 1)[1]: v for k, v in np.load(FIXTURES / "pipeline.npz").items() if k.startswith("dev/")
    }
    images = sd.generate(META["prompts"], num_steps=META["cases"]["txt2img"]["steps"],
                         guidance_scale=META["guidance"]["dev"], height=META["height"], width=META["width"],
                         latents=ref["txt2img_latents"], max_sequence_length=META["max_sequence_length"],
                         output_type="float", progress=False, jit_compile=False)  # fmt: skip
    err = np.abs(images - ref["txt2img_images"]).max()
    assert err < IMAGE_TOL, err


def test_original_file_needs_a_config_folder(tmp_path):
    path = _original_file(tmp_path)
    with pytest.raises(ValueError, match="config="):
        StableDiffusion.from_pretrained(path)
    with pytest.raises(ValueError, match="not a folder"):
        StableDiffusion.from_pretrained(path, config=tmp_path / "missing")
    with pytest.raises(ValueError, match="takes \\['config', 'dtype'\\]"):
        StableDiffusion.from_pretrained(path, config=FIXTURES / "flux-dev", use_ema=True)


def test_info_describes_folders_and_single_files(tmp_path, capsys):
    from safetensors.numpy import load_file

    from tf_diffusion import cli

    path = _original_file(tmp_path)
    assert cli.main(["info", str(FIXTURES / "flux-dev")]) == 0
    folder = capsys.readouterr().out
    assert (
        "family: flux" in folder and "format: diffusers (FluxPipeline)" in folder and "variant: dev" in folder
    )
    for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        assert f"\n{name}: " in folder
    # The count is diffusers' own file's; the original layout fuses tensors but keeps every parameter.
    stored = load_file(FIXTURES / "flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors")
    count = f"transformer: {sum(v.size for v in stored.values()):,} parameters, float32"
    assert count in folder
    assert cli.main(["info", str(path)]) == 0
    single = capsys.readouterr().out
    assert "family: flux" in single and "variant: dev" in single and count in single
    assert "missing: text_encoder, text_encoder_2, vae" in single


def test_cli_generates_from_a_single_file(tmp_path):
    from tf_diffusion import cli

    path = _original_file(tmp_path)
    out = tmp_path / "flux.png"
    args = ["generate", "a cat", "--model", str(path), "--config", str(FIXTURES / "flux-dev"), "-o", str(out),
            "--steps", "2", "--height", str(META["height"]), "--width", str(META["width"]), "--no-progress",
            "--max-sequence-length", str(META["max_sequence_length"]), "--seed", "3"]  # fmt: skip
    assert cli.main(args) == 0
    assert out.is_file()
