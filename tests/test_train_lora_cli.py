"""``tf-diffusion train --lora`` / ``--embedding`` / ``--class-data`` end to end on the tiny pipeline, and their usage errors."""

import pytest
from test_lora import FIXTURES, build

pytest.importorskip("tensorflow")

from tf_diffusion.weights.safetensors_io import load_safetensors, open_safetensors  # noqa: E402


@pytest.fixture(scope="module")
def sd():
    model = build(FIXTURES)
    yield model
    model.unload_lora_weights()


@pytest.mark.slow  # two CLI training runs; the trainer tests stay in the default run
def test_cli_trains_a_lora_and_an_embedding(sd, tmp_path, capsys):
    import pathlib

    from tf_diffusion.cli import main
    from tf_diffusion.families import components_of
    from tf_diffusion.testing import write_captioned_images
    from tf_diffusion.weights.folder import write_folder
    from tf_diffusion.weights.state_dict import state_dict

    model = tmp_path / "model"
    model.mkdir()
    components = {name: state_dict(getattr(sd, name)) for name in components_of(sd.config)}
    write_folder(model, components, sd.config, sd.tokenizer)
    data = tmp_path / "data"
    write_captioned_images(data)
    common = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--size", "16"]
    out = tmp_path / "cli_lora.safetensors"
    argv = [*common, "--lora", "--rank", "2", "--train", "unet+text_encoder", "--text-encoder-lr", "1e-4"]
    argv += ["--class-data", str(data), "--prior-loss-weight", "0.5"]  # DreamBooth (the same folder here)
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "c1"), "--out", str(out)]) == 0
    sd.load_lora_weights(out)  # our loader reads it: every key maps onto a layer
    sd.unload_lora_weights()
    with open_safetensors(out) as f:
        assert f.metadata["ss_network_dim"] == "2" and f.metadata["ss_network_train_unet_only"] == "False"
        assert any(k.startswith("lora_te_") for k in f.keys()) and any(
            k.startswith("lora_unet_") for k in f.keys()
        )
    emb = tmp_path / "zq-shape.safetensors"
    argv = [*common, "--embedding", "zq-shape", "--num-vectors", "2", "--init-text", "square"]
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "c2"), "--out", str(emb)]) == 0
    assert load_safetensors(emb)["emb_params"].shape == (2, sd.config.text_encoder.hidden_size)
    # Bad combinations are usage errors before anything is trained.
    capsys.readouterr()
    bad = {
        "--alpha 2": ([*common, "--alpha", "2", "--checkpoint-dir", "c"], "only with --lora"),
        "lora out": ([*common, "--lora", "--checkpoint-dir", "c", "--out", str(out)], "already exists"),
        "lora folder": ([*common, "--lora", "--checkpoint-dir", "c", "--out", "x"], ".safetensors file"),
        "te lr": (
            [*common, "--lora", "--text-encoder-lr", "1e-4", "--checkpoint-dir", "c"],
            "unet+text_encoder",
        ),
        "vae": ([*common, "--lora", "--train", "vae", "--checkpoint-dir", "c"], "--train vae"),
        "vectors": (
            [*common, "--embedding", "w", "--num-vectors", "0", "--checkpoint-dir", "c"],
            "--num-vectors 0",
        ),
    }
    for name, (argv, message) in bad.items():
        assert main(argv) in (1, 2), name
        assert message in capsys.readouterr().err, name
    assert not pathlib.Path("c").exists()
