"""Bad checkpoints fail with one clear error, before any model is built."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from tf_diffusion.weights.ckpt import UnsafeCheckpointError
from tf_diffusion.weights.loading import from_pretrained, load_pipeline_weights
from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors
from tf_diffusion.weights.state_dict import StateDictError


class NeverBuilt:
    """Stands in for StableDiffusion: any construction fails the test (errors come first)."""

    def __init__(self, *args, **kwargs):
        pytest.fail("a model was built although the checkpoint is bad")


@pytest.fixture
def root(fixtures_dir):
    return fixtures_dir / "checkpoints"


def load(source, **kwargs):
    return from_pretrained(NeverBuilt, source, **kwargs)


def edited_single_file(root, tmp_path, edit):
    state = load_safetensors(root / "sd1.safetensors")
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_safetensors(state, path)
    return path


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load("no-such-dir/../x.ckpt")


@pytest.mark.parametrize("name", ["sd1.safetensors", "sd1-full.ckpt"])
def test_truncated_file(root, tmp_path, name):
    data = (root / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(ValueError, match="truncated"):
        load(path, config=str(root / "sd1-diffusers"))


def test_corrupt_safetensors_header(root, tmp_path):
    data = bytearray((root / "sd1.safetensors").read_bytes())
    data[8:16] = b"\xff\xfe{bad}\x00"
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header is not valid UTF-8 JSON"):
        load(path)


def test_pickle_with_malicious_reduce_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": Payload()}}, f)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load(path)
    assert not marker.exists()


def test_folder_without_model_index(root, tmp_path):
    folder = tmp_path / "not-a-pipeline"
    shutil.copytree(root / "sd1-diffusers", folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ValueError, match="no model_index.json"):
        load(folder)
    # A folder holding a checkpoint file says which file to pass.
    shutil.copy(root / "sd1.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load(folder)


def test_diffusers_folder_missing_component_or_variant(root, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(root / "sd1-diffusers", folder)
    with pytest.raises(ValueError, match="variants present: \\['fp16'\\]"):
        load(folder, variant="bf16")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match="no vae/ component"):
        load(folder)


def test_unsupported_pipeline_class(root, tmp_path):
    folder = tmp_path / "xl"
    shutil.copytree(root / "sd1-diffusers", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="FluxPipeline.*not supported"):
        load(folder)
    # SD3 folders are pointed to their own loader (tests/test_sd3.py).
    index["_class_name"] = "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="SD3 / SD3.5 folder.*StableDiffusion3.from_pretrained"):
        load(folder)
    # An SDXL pipeline class needs SDXL's second text encoder.
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no text_encoder_2/ component"):
        load(folder)


def test_sd2_weights_forced_into_sd1_preset(root):
    with pytest.raises(ValueError, match="SD 2.x .*sd-v1-5.*sd1 model"):
        load(root / "sd2.safetensors", config="sd-v1-5")
    with pytest.raises(ValueError, match="SD 2.x .*sd1 model"):
        load(root / "sd2-diffusers", config="sd-v1-5")


def test_sd1_weights_into_full_size_preset_list_shape_mismatches(root):
    with pytest.raises(StateDictError) as info:
        load(root / "sd1.safetensors", config="sd-v1-5", tokenizer=str(root / "sd1-diffusers" / "tokenizer"))
    message = str(info.value)
    assert "keys with the wrong shape" in message and "checkpoint (16,), model expects (768,)" in message


def test_missing_and_extra_keys(root, tmp_path):
    def edit(state):
        del state["model.diffusion_model.out.2.weight"]
        state["model.diffusion_model.extra.weight"] = np.zeros(3, np.float16)
        state["first_stage_model.extra.bias"] = np.zeros(3, np.float16)
        state["lora_unet_down.alpha"] = np.zeros(1, np.float16)

    path = edited_single_file(root, tmp_path, edit)
    with pytest.raises(StateDictError) as info:
        load(path, config=str(root / "sd1-diffusers"))
    error = info.value
    assert error.missing == ["unet: out.2.weight"]
    assert set(error.unexpected) == {"(file) lora_unet_down.alpha", "unet: extra.weight", "vae: extra.bias"}
    # info (strict=False) lists the same problems instead of raising.
    with load_pipeline_weights(path, config=str(root / "sd1-diffusers"), strict=False) as weights:
        assert "missing key unet: out.2.weight" in weights.report.problems
        assert weights.report.unexpected_keys == ["lora_unet_down.alpha"]


def test_tensor_of_wrong_shape(root, tmp_path):
    def edit(state):
        state["first_stage_model.encoder.conv_in.weight"] = np.zeros((8, 3, 1, 1), np.float16)

    path = edited_single_file(root, tmp_path, edit)
    with pytest.raises(
        StateDictError,
        match=r"vae: encoder.conv_in.weight: checkpoint \(8, 3, 1, 1\), model expects \(8, 3, 3, 3\)",
    ):
        load(path, config=str(root / "sd1-diffusers"))


def test_single_file_without_vae(root, tmp_path):
    def edit(state):
        for key in [k for k in state if k.startswith("first_stage_model.")]:
            del state[key]

    path = edited_single_file(root, tmp_path, edit)
    with pytest.raises(ValueError, match="no vae weights"):
        load(path)
    with load_pipeline_weights(path, strict=False) as weights:
        assert weights.report.missing_components == ["vae"]


def test_use_ema_without_ema_weights(root):
    with pytest.raises(ValueError, match="no model_ema"):
        load(root / "sd1.safetensors", use_ema=True)
    with pytest.raises(ValueError, match="single-file"):
        load(root / "sd1-diffusers", use_ema=True)


def test_bad_arguments(root):
    with pytest.raises(ValueError, match="prediction_type='v'"):
        load(root / "sd1-diffusers", prediction_type="v")
    with pytest.raises(ValueError, match="neither a preset"):
        load(root / "sd1.safetensors", config="sd-v9")


def test_architecture_unreadable_without_config(root, tmp_path):
    def edit(state):
        del state["model.diffusion_model.out.2.weight"]

    path = edited_single_file(root, tmp_path, edit)
    with pytest.raises(
        ValueError, match="cannot read the architecture from the weights .*out.2.weight.*pass config="
    ):
        load(path)
    with load_pipeline_weights(path, strict=False) as weights:
        assert any("cannot read the architecture" in p for p in weights.report.problems)
