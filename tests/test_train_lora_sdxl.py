"""SDXL LoRA saving: kohya's SDXL names (original UNet paths, ``lora_te1_`` / ``lora_te2_``) and diffusers'.

tools/make_fixtures_lora_train.py attached a ``LoraNetwork`` (rank 2, alpha 4) to the tiny SDXL pipeline's UNet
attention and both text encoders' attention, gave it seeded factors, saved it in both formats, and recorded the
outputs of diffusers' ``StableDiffusionXLPipeline`` with each file loaded by ``load_lora_weights``.
"""

import numpy as np
import pytest
from test_train_lora import set_factors

from tests.conftest import FIXTURES
from tf_diffusion.adapters.lora_training import LoraNetwork, base_model_version, lora_state_dict
from tf_diffusion.weights.safetensors_io import load_safetensors, open_safetensors

TOLERANCE = 1e-4
FOLDER = FIXTURES / "lora_train"


@pytest.fixture(scope="module")
def sd(tiny_sdxl):
    return tiny_sdxl  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    with np.load(FOLDER / "sdxl_io.npz") as f:
        out = dict(f)
    with np.load(FIXTURES / "sdxl" / "reference.npz") as ref:
        out.update(
            ids=ref["ids"],
            ids_2=ref["ids_2"],
            x=ref["unet/x"],
            context=ref["unet/context"],
            text_embeds=ref["unet/text_embeds"],
            time_ids=ref["unet/time_ids"],
            t=np.array([10.0, 500.0], np.float32),
        )
    return out


def outputs(sd, data) -> dict:
    te = sd.text_encoder(data["ids"].astype(np.int32), clip_skip=1, final_norm=False)
    te2, pooled = sd.text_encoder_2(
        data["ids_2"].astype(np.int32), clip_skip=1, final_norm=False, pooled=True
    )
    unet = sd.unet(data["x"], data["t"], data["context"], data["text_embeds"], data["time_ids"])
    return {k: np.asarray(v) for k, v in dict(te=te, te2=te2, pooled=pooled, unet=unet).items()}


def check(got, data, tag):
    errs = {k: float(np.abs(v - data[f"{k}_{tag}"]).max()) for k, v in got.items()}
    assert all(e <= TOLERANCE for e in errs.values()), (tag, errs)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_sdxl_files_load_in_our_loader_as_in_diffusers(sd, data, fmt):
    check(outputs(sd, data), data, "base")
    sd.load_lora_weights(FOLDER / f"sdxl_{fmt}.safetensors")
    try:
        check(outputs(sd, data), data, fmt)
    finally:
        sd.unload_lora_weights()


def test_sdxl_training_layers_and_names(sd, data):
    network = LoraNetwork.attach(sd, 2, 4.0, text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    try:
        set_factors(network, FOLDER / "sdxl_diffusers.safetensors")
        assert {e.component for e in network.layers} == {"unet", "text_encoder", "text_encoder_2"}
        check(outputs(sd, data), data, "kohya")
        saved = load_safetensors(FOLDER / "sdxl_kohya.safetensors")
        ours = lora_state_dict(network, "kohya")
        assert sorted(ours) == sorted(saved)
        for key, value in ours.items():
            np.testing.assert_array_equal(value, saved[key], err_msg=key)
    finally:
        network.detach()
    check(outputs(sd, data), data, "base")
    keys = set(saved)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    with open_safetensors(FOLDER / "sdxl_kohya.safetensors") as f:
        assert f.metadata["ss_base_model_version"] == "sdxl_base_v1-0" == base_model_version(sd.config)
