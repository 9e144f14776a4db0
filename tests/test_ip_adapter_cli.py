"""IP-Adapter on the command line: ``generate --ip-adapter --ip-image --ip-scale``, the PNG parameters
(a ``ControlNet N`` unit, as the web UI's ControlNet extension records IP-Adapter) and ``info``."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "ip_adapter"


def test_info_reports_ip_adapter_files(capsys):
    from tf_diffusion.cli import main

    assert main(["info", str(FIXTURES / "tiny_sd15.bin"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "IP-Adapter (base)" and report["format"] == "IP-Adapter (torch.save)"
    assert report["tokens_per_image"] == 4 and report["cross_attention_layers"] == 4
    # image_proj: 16 -> 4 x 32 plus its LayerNorm; to_k_ip / to_v_ip: 32-wide tokens to the layers'
    # widths (three at 32: the down block's and the up block's two; the middle block's at 64).
    assert report["parameters"] == 16 * 128 + 128 + 2 * 32 + 2 * 32 * (3 * 32 + 64)
    assert main(["info", str(FIXTURES / "tiny_plus_sd15.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "kind: IP-Adapter (plus)" in text and "tokens_per_image: 8" in text


def tiny_shapes_adapter(tmp_path) -> pathlib.Path:
    """A base adapter shaped for the embedded tiny-shapes UNet, reading the fixture encoder's 16-wide embeds."""
    from tf_diffusion.adapters.ip_adapter import IPAdapter, cross_attention_layers
    from tf_diffusion.ip_adapter import ImageProjConfig, ImageProjModel
    from tf_diffusion.models import folder_config, resolve_model
    from tf_diffusion.testing import random_state_dict
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.weights import manifest
    from tf_diffusion.weights.safetensors_io import save_safetensors

    unet = UNetModel(folder_config(resolve_model("tiny-shapes")).unet)
    widths = [(a.to_k.out_features, a.to_k.in_features) for a in cross_attention_layers(unet)]
    adapter = IPAdapter(ImageProjModel(ImageProjConfig(16, unet.config.context_dim, 4)), widths)
    path = tmp_path / "ip-adapter_tiny.safetensors"
    save_safetensors(random_state_dict(manifest(adapter), 5), path)
    return path


@pytest.mark.slow  # the whole CLI with an image encoder; the IP-Adapter pipeline parity tests stay in the default run
def test_generate_command_with_ip_adapter(tmp_path, capsys):
    from tf_diffusion.cli import main

    adapter = tiny_shapes_adapter(tmp_path)
    picture = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(picture)
    argv = ["generate", "a red circle", "--steps", "2", "--seed", "3", "--no-progress"]
    ip = ["--ip-adapter", str(adapter), "--ip-image-encoder", str(FIXTURES / "image_encoder")]
    out = tmp_path / "ip.png"
    assert main([*argv, *ip, "--ip-image", str(picture), "--ip-scale", "0.6", "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    # The web UI's old short file hash, as the ControlNet extension titles models.
    digest = hashlib.sha256(adapter.read_bytes()[1 << 20 : (1 << 20) + (1 << 16)]).hexdigest()[:8]
    assert f'ControlNet 0: "Module: ip-adapter_clip, Model: ip-adapter_tiny [{digest}], Weight: 0.6"' in text
    plain = tmp_path / "plain.png"
    assert main([*argv, "-o", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    capsys.readouterr()
    # Checked before TensorFlow: a picture without an adapter, scales of another count, no encoder.
    assert main([*argv, "--ip-image", str(picture), "-o", str(tmp_path / "a.png")]) == 2
    assert "--ip-image needs --ip-adapter PATH" in capsys.readouterr().err
    bad = [*ip, "--ip-image", str(picture), "--ip-scale", "0.5", "--ip-scale", "0.7"]
    assert main([*argv, *bad, "-o", str(tmp_path / "b.png")]) == 2
    assert "--ip-scale given 2 times; give it once, or once per --ip-adapter (1)" in capsys.readouterr().err
    assert main(
        [*argv, "--ip-adapter", str(adapter), "--ip-image", str(picture), "-o", str(tmp_path / "c.png")]
    )
    assert "no image_encoder folder beside it; pass --ip-image-encoder FOLDER" in capsys.readouterr().err
    assert not any((tmp_path / f"{n}.png").exists() for n in "abc")
