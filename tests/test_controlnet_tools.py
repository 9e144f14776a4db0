"""ControlNet around the model: Canny hints, ``tf-diffusion preprocess``, ``generate --control``,
``info`` on ControlNet files and the PNG parameters the web UI's ControlNet extension writes.

Canny's reference is OpenCV on the RGB image, as diffusers' ControlNet examples and the extension run
it; the unit text follows the extension's ``ControlNet N`` field (``Key: value`` items, comma-separated)
and its model title ``stem [hash]`` with the web UI's old short file hash.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "controlnet"


def shapes_image(size=64) -> np.ndarray:
    image = np.full((size, size, 3), 255, np.uint8)
    image[10:40, 12:30] = (200, 30, 30)  # a red box
    yy, xx = np.mgrid[:size, :size]
    image[(yy - 44) ** 2 + (xx - 44) ** 2 < 120] = (20, 20, 220)  # a blue disc
    return image


def test_canny_is_opencv_on_the_rgb_image():
    from tf_diffusion.preprocess import canny

    image = shapes_image()
    for low, high in ((100, 200), (30, 90)):
        want = cv2.Canny(image, low, high)
        got = canny(Image.fromarray(image), low_threshold=low, high_threshold=high)
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        assert all(np.array_equal(got[..., c], want) for c in range(3))
        assert 0 < np.count_nonzero(want) < want.size // 4  # edges, not noise or nothing
    # Float input in [0, 1] reads as the same 8-bit image.
    assert np.array_equal(canny(image.astype(np.float32) / 255.0), canny(image))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(low_threshold=-1), "low_threshold=-1 must be an integer in [0, 255]"),
        (dict(high_threshold=256), "high_threshold=256"),
        (dict(low_threshold=150, high_threshold=100), "low_threshold=150 must not exceed high_threshold=100"),
        (dict(low_threshold=1.5), "low_threshold=1.5"),
    ],
)
def test_canny_refuses_bad_thresholds(kwargs, message):
    from tf_diffusion.preprocess import canny

    with pytest.raises(ValueError) as e:
        canny(shapes_image(), **kwargs)
    assert message in str(e.value)


def test_preprocess_command(tmp_path, capsys):
    from tf_diffusion.cli import main
    from tf_diffusion.preprocess import canny

    source = tmp_path / "photo.png"
    Image.fromarray(shapes_image()).save(source)
    out = tmp_path / "edges.png"
    assert main(["preprocess", "canny", str(source), str(out), "--low", "50", "--high", "150"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), canny(shapes_image(), 50, 150))
    # Nothing is overwritten unless asked; bad thresholds are usage errors.
    before = out.read_bytes()
    assert main(["preprocess", "canny", str(source), str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["preprocess", "canny", str(source), str(tmp_path / "x.png"), "--low", "300"]) == 2
    assert "--low 300 is outside [0, 255]" in capsys.readouterr().err
    assert main(["preprocess", "canny", str(tmp_path / "none.png"), str(tmp_path / "y.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def old_short_hash(path: pathlib.Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[1 << 20 : (1 << 20) + (1 << 16)]).hexdigest()[:8]


def test_infotext_names_nets_as_the_controlnet_extension_does():
    import tf_diffusion
    from tf_diffusion.adapters.controlnet import ControlPlan
    from tf_diffusion.infotext import format_parameters, parse_controlnet_unit, parse_parameters

    path = FIXTURES / "tiny_original.safetensors"
    net = tf_diffusion.ControlNet.from_pretrained(path)
    plan = ControlPlan((net, net), (None, None), (0.8, 1.25), (0.0, 0.2), (1.0, 0.75), False)
    fields = plan.infotext()
    title = f"tiny_original [{old_short_hash(path)}]"
    assert fields == {
        "ControlNet 0": f"Module: none, Model: {title}, Weight: 0.8, Guidance Start: 0.0, "
        "Guidance End: 1.0, Control Mode: Balanced",
        "ControlNet 1": f"Module: none, Model: {title}, Weight: 1.25, Guidance Start: 0.2, "
        "Guidance End: 0.75, Control Mode: Balanced",
    }
    guess = ControlPlan((net,), (None,), (1.0,), (0.0,), (1.0,), True).infotext()["ControlNet 0"]
    assert guess.endswith("Control Mode: ControlNet is more important")
    # Through the PNG parameters and back.
    text = format_parameters("a cat", "", steps=4, sampler="euler", cfg_scale=7.0, seed=1, width=64,
                             height=64, extra=fields)  # fmt: skip
    assert f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.8,' in text
    back = parse_parameters(text)
    unit = parse_controlnet_unit(back["extra"]["ControlNet 1"])
    assert unit == {"Module": "none", "Model": title, "Weight": 1.25, "Guidance Start": 0.2,
                    "Guidance End": 0.75, "Control Mode": "Balanced"}  # fmt: skip
    with pytest.raises(ValueError, match="is not 'Key: value'"):
        parse_controlnet_unit("Module none")


def test_info_reports_controlnet_files(capsys):
    from tf_diffusion.cli import main

    meta = json.loads((FIXTURES / "cases.json").read_text())["tiny_original"]
    count = sum(int(np.prod(s)) for s in meta["shapes"].values())
    assert main(["info", str(FIXTURES / "tiny_original.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "ControlNet" and report["parameters"] == count
    assert report["format"] == "original ControlNet single file (.safetensors)"
    assert report["dtypes"] == ["float32"] and report["hint channels"] == 3
    assert main(["info", str(FIXTURES / "tiny_control_sd15_whole.pth")]) == 0
    text = capsys.readouterr().out
    assert f"parameters: {count}" in text and "dtypes: float16" in text
    assert "not read: 3 other tensors (a whole Stable Diffusion model" in text


def test_generate_command_with_control(tmp_path, capsys):
    """--control on the embedded model: a net shaped for its UNet, saved in the original layout."""
    from tf_diffusion.cli import main
    from tf_diffusion.controlnet import ControlNet, ControlNetConfig
    from tf_diffusion.models import folder_config, resolve_model
    from tf_diffusion.testing import random_state_dict
    from tf_diffusion.weights import load_state_dict, manifest
    from tf_diffusion.weights.safetensors_io import save_safetensors

    unet = folder_config(resolve_model("tiny-shapes")).unet
    net = ControlNet(ControlNetConfig(unet=unet, hint_channels=(16, 32, 64)))  # the VAE scales by 4
    weights = random_state_dict(manifest(net), 3)
    load_state_dict(net, weights)
    model = tmp_path / "control_tiny.safetensors"
    save_safetensors({f"control_model.{k}": v for k, v in weights.items()}, model)
    hint = tmp_path / "hint.png"
    Image.fromarray(shapes_image()).save(hint)
    argv = ["generate", "a red circle", "--steps", "2", "--seed", "3", "--no-progress"]
    out = tmp_path / "ctrl.png"
    assert main([*argv, "--control", f"{model}:{hint}:0.7", "-o", str(out)]) == 0
    # The unit text comes from the plan generate() ran with (its effect on the image is checked
    # against diffusers in test_controlnet.py).
    text = Image.open(out).info["parameters"]
    assert f'ControlNet 0: "Module: none, Model: control_tiny [{old_short_hash(model)}], Weight: 0.7,' in text
    capsys.readouterr()
    # A hint of another size is refused in the command line's words.
    Image.fromarray(shapes_image(32)).save(tmp_path / "small.png")
    assert main([*argv, "--control", f"{model}:{tmp_path / 'small.png'}", "-o", str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err
    assert (
        f"--control {model}:{tmp_path / 'small.png'}: the hint image is 32x32 (WxH) but the output is 64x64"
        in err
    )
    assert not (tmp_path / "s.png").exists()
