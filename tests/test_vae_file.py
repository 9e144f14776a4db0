"""A VAE loaded in place of the checkpoint's (``load_vae``, ``from_pretrained(vae=)``), against diffusers
pipelines given the same VAE (tools/make_fixtures_vae_file.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES

VAE_FILES = FIXTURES / "vae_file"
SDXL = FIXTURES / "sdxl" / "sdxl-diffusers"
SD1 = FIXTURES / "checkpoints" / "sd1-diffusers"
TOL = 1e-3  # float images in [0, 1], as the other pipeline parity tests


@pytest.fixture(scope="module")
def reference():
    with np.load(VAE_FILES / "reference.npz") as data:
        ref = dict(data)
    runs = {r["name"]: r for r in json.loads((VAE_FILES / "meta.json").read_text())["runs"]}
    return ref, runs


def assert_matches(sd, reference, key):
    ref, runs = reference
    run = runs[key]
    out = sd.generate(
        run["prompt"],
        num_steps=run["steps"],
        guidance_scale=run["guidance"],
        height=run["size"],
        width=run["size"],
        latents=ref[f"{key}/latents"],
        scheduler="euler",
        output_type="float",
        progress=False,
        jit_compile=False,  # graph mode: the VAE is the point; an XLA compile per model costs seconds
    )
    err = float(np.abs(np.asarray(out) - ref[f"{key}/images"]).max())
    print(f"{key}: max abs error against diffusers {err:.2e}")
    assert err <= TOL
    return out


def test_a_diffusers_vae_folder_replaces_the_vae_with_its_config(reference):
    from tf_diffusion import StableDiffusion

    sd = StableDiffusion.from_pretrained(SDXL)
    before = sd.config.vae
    sd.load_vae(VAE_FILES / "sdxl-vae-fix")
    # The folder's scaling factor and force_upcast apply, as diffusers' vae= does.
    assert sd.config.vae.scaling_factor == pytest.approx(0.2) and sd.config.vae.force_upcast is False
    assert sd.config.vae.base_channels == before.base_channels
    assert sd.vae_source.endswith("sdxl-vae-fix")
    assert_matches(sd, reference, "sdxl/fix")


def test_an_sdxl_file_without_a_vae_loads_with_a_vae_file(tmp_path, reference):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors

    with open_safetensors(FIXTURES / "sdxl" / "sdxl.safetensors") as whole:
        kept = {k: np.asarray(v) for k, v in whole.items() if not k.startswith("first_stage_model.")}
    novae = tmp_path / "sdxl-novae.safetensors"
    save_safetensors(kept, novae)
    with pytest.raises(ValueError, match="no vae weights"):
        StableDiffusion.from_pretrained(novae, config=SDXL)
    sd = StableDiffusion.from_pretrained(novae, config=SDXL, vae=VAE_FILES / "sdxl_vae.safetensors")
    assert sd.config.vae.scaling_factor == pytest.approx(0.13025)  # a bare file keeps the model's
    assert any("VAE from" in note for note in sd.load_report.notes)
    out = assert_matches(sd, reference, "sdxl/plain")
    # The PNG parameters name it as the web UI does: the file's name and the short SHA-256 of checkpoints.
    import hashlib

    from tf_diffusion.infotext import generation_parameters, parse_parameters

    digest = hashlib.sha256((VAE_FILES / "sdxl_vae.safetensors").read_bytes()).hexdigest()[:10]
    fields = parse_parameters(generation_parameters(out.info, 0, "sdxl-novae"))["extra"]
    assert fields["VAE hash"] == digest and fields["VAE"] == "sdxl_vae.safetensors"


def test_a_web_ui_vae_pt_replaces_an_sd1_vae(reference):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.weights.vae_file import read_vae

    sd = StableDiffusion.from_pretrained(SD1, vae=VAE_FILES / "sd1.vae.pt")
    with read_vae(VAE_FILES / "sd1.vae.pt", sd.config.vae) as weights:
        assert weights.format == "single-file"
        assert sorted(weights.dropped) == [
            "loss.discriminator.main.0.weight",
            "loss.logvar",
            "model_ema.decay",
            "model_ema.num_updates",
        ]
    assert_matches(sd, reference, "sd1/plain")


def test_a_file_with_diffusers_names_reads_as_the_folder(tmp_path):
    from tf_diffusion.config import VAEConfig
    from tf_diffusion.weights.vae_file import read_vae

    model = VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    with read_vae(VAE_FILES / "sdxl-vae-fix", model) as folder:
        want = {k: np.asarray(v) for k, v in folder.tensors.items()}
    single = tmp_path / "vae.safetensors"
    single.write_bytes((VAE_FILES / "sdxl-vae-fix" / "diffusion_pytorch_model.safetensors").read_bytes())
    with read_vae(single, model) as file:
        assert file.format == "single-file-diffusers" and file.config is None
        assert file.tensors.keys() == want.keys()
        assert all(np.array_equal(np.asarray(file.tensors[k]), want[k]) for k in want)


def test_force_upcast_decides_the_vae_precision_under_float16():
    from tf_diffusion import StableDiffusion

    sd = StableDiffusion.from_pretrained(SDXL, dtype="mixed_float16")
    assert sd.vae.compute_dtype == "float32"  # the SDXL VAE overflows in float16 (force_upcast)
    sd.load_vae(VAE_FILES / "sdxl-vae-fix")  # says force_upcast false: fine-tuned not to
    assert sd.vae.compute_dtype == "float16"
    sd.load_vae(VAE_FILES / "sdxl_vae.safetensors")  # a bare file: the checkpoint's own VAE config again
    assert sd.config.vae.force_upcast is True and sd.config.vae.scaling_factor == pytest.approx(0.13025)
    assert sd.vae.compute_dtype == "float32"


def test_bad_vae_sources_are_clear_and_leave_the_model_as_it_was(tmp_path):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors

    sd = StableDiffusion.from_pretrained(SDXL)
    vae, config = sd.vae, sd.config
    with open_safetensors(VAE_FILES / "sdxl_vae.safetensors") as good:
        tensors = {k: np.asarray(v) for k, v in good.items()}
    short = dict(tensors)
    del short["decoder.conv_out.bias"]
    save_safetensors(short, tmp_path / "short.safetensors")
    with pytest.raises(
        ValueError, match=r"(?s)short\.safetensors: this VAE does not fit.*decoder\.conv_out\.bias"
    ):
        sd.load_vae(tmp_path / "short.safetensors")
    save_safetensors(
        {"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32)}, tmp_path / "lora.safetensors"
    )
    with pytest.raises(ValueError, match=r"lora\.safetensors: holds no VAE weights"):
        sd.load_vae(tmp_path / "lora.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a VAE folder"):
        sd.load_vae(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"must end in one of"):
        sd.load_vae(VAE_FILES / "meta.json")
    with pytest.raises(FileNotFoundError):
        sd.load_vae(tmp_path / "nothing.safetensors")
    assert sd.vae is vae and sd.config is config and sd.vae_source is None


# ------------------------------------------------------------------ tiled decode and encode


@pytest.fixture(scope="module")
def tiling():
    with np.load(VAE_FILES / "tiling.npz") as data:
        return dict(data)


def test_tiled_decode_and_encode_match_diffusers_enable_tiling(tiling):
    """16-pixel tiles (8 latents), overlap 0.25, on latents 20x28 and images 40x56: several tiles, uneven edges."""
    from tf_diffusion import StableDiffusion
    from tf_diffusion.vae import DiagonalGaussian

    sd = StableDiffusion.from_pretrained(SD1)
    untiled = sd.decode(tiling["latents"])
    np.testing.assert_allclose(untiled, tiling["untiled/decoded"], atol=1e-4)
    sd.enable_vae_tiling(16)
    tiled = sd.decode(tiling["latents"])
    err = float(np.abs(tiled - tiling["tiled/decoded"]).max())
    print(f"tiled decode: max abs error against diffusers {err:.2e}")
    assert err <= 1e-4
    # Tiling changes the result (so the comparison above tests it), near the seams only.
    assert np.abs(tiled - untiled).max() > 1e-3
    posterior = np.zeros_like(tiling["tiled/mean"])
    latents = sd._encode_image(tiling["images"], posterior)  # pixels in [-1, 1]; zero noise: the mean
    np.testing.assert_allclose(latents, tiling["tiled/mean"], atol=1e-4)
    # The logvar too (the posterior's spread): through the same tiles.
    from tf_diffusion.execution.tiling import tiled_moments

    moments = tiled_moments(
        lambda x: sd.vae.quant_conv(sd.vae.encoder(x)), tiling["images"], sd.vae_tiling, 2
    )
    np.testing.assert_allclose(
        np.asarray(DiagonalGaussian(moments).logvar), tiling["tiled/logvar"], atol=1e-4
    )
    sd.disable_vae_tiling()
    np.testing.assert_array_equal(sd.decode(tiling["latents"]), untiled)


@pytest.mark.slow  # two generate calls through the tiles; the tiled decode/encode parity test stays in the default run
def test_generate_decodes_through_the_tiles():
    from tf_diffusion import StableDiffusion

    sd = StableDiffusion.from_pretrained(SD1)
    sd.enable_vae_tiling(16)
    # Graph mode throughout (XLA compiles of the loop and of each tile shape cost seconds here).
    kw = dict(num_steps=1, height=40, width=56, seed=3, progress=False, jit_compile=False)
    latents = sd.generate("a red circle", output_type="latent", **kw)
    images = sd.generate("a red circle", output_type="float", **kw)
    decoded = sd.decode(np.asarray(latents) / sd.config.vae.scaling_factor, jit_compile=False)
    want = np.clip(decoded / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(images, want, atol=1e-6)


def test_bad_tiling_settings():
    from tf_diffusion import StableDiffusion
    from tf_diffusion.execution.tiling import VAETiling

    sd = StableDiffusion.from_pretrained(SD1)
    with pytest.raises(
        ValueError, match=r"tile_size=17 with overlap=0.25 .* multiples of the VAE's factor 2"
    ):
        sd.enable_vae_tiling(17)
    with pytest.raises(ValueError, match=r"overlap=1.0 must be a fraction in \[0, 1\)"):
        VAETiling(64, 1.0)
    with pytest.raises(ValueError, match="tile_size=4 must be an integer number of pixels >= 8"):
        VAETiling(4)
    assert sd.vae_tiling is None


def test_info_reports_vae_files(capsys):
    from tf_diffusion.cli import main
    from tf_diffusion.weights.safetensors_io import open_safetensors

    # The parameter count of the same architecture as diffusers saved it (tests/fixtures/checkpoints).
    with open_safetensors(SD1 / "vae" / "diffusion_pytorch_model.safetensors") as handle:
        count = sum(int(np.prod(t.shape)) for t in handle.values())
    assert main(["info", str(VAE_FILES / "sd1.vae.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "VAE" and report["parameters"] == count
    assert report["format"] == "single file, original (LDM) key names" and report["dtypes"] == ["float32"]
    assert "4 keys that are not autoencoder weights" in report["not loaded"]
    assert main(["info", str(VAE_FILES / "sdxl-vae-fix")]) == 0
    text = capsys.readouterr().out
    assert "format: diffusers AutoencoderKL folder" in text and "force_upcast: False" in text
