"""SDXL LoRAs: kohya (lora_te1_ / lora_te2_ / sgm UNet names), diffusers / PEFT and diffusers' older layouts.

tools/make_fixtures_sdxl_lora.py attached random LoRAs with peft to the tiny SDXL pipeline
(tests/fixtures/sdxl/sdxl-diffusers): UNet attention, projections, feed-forward, ResBlock convs, time
and added-conditioning embeddings; both text encoders' attention and MLPs. It saved them with diffusers'
``save_lora_weights``, in kohya's SDXL naming, and (attention only) in diffusers' two older layouts; each
file is read back by diffusers' own ``load_lora_weights`` to the peft outputs there. The reference outputs
are those of diffusers / transformers with the LoRA applied, and of whole ``StableDiffusionXLPipeline`` runs
with the LoRA loaded and the LCM / TCD samplers.
"""

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tf_diffusion.adapters.lora import LoraError, get_active_adapters

FILES = {
    "diffusers": "lora_diffusers.safetensors",
    "kohya": "lora_kohya.safetensors",
}
OLD_FILES = {
    "processor": "lora_old_processor.safetensors",
    "lora_layer": "lora_old_lora_layer.safetensors",
}
# float32 against the reference. With the full LoRA (every layer, alpha / rank 2) the tiny random UNet
# is sensitive to float32 rounding: our merged kernels equal peft's merged ones to ~1e-7 relative, yet
# torch's own float32 runs of the same LoRA (unmerged, or merged into the weights) differ from float64 by
# 5e-4 at weight 1.0 (3.6e-5 at 0.5); the fixture tool measures that spread. So the full-LoRA UNet is
# compared with the float64 answer and must be within 1.5 times torch's float32 spread of it (at least
# 1e-4): as close as the reference's own float32, with room for another CPU's summation order.
TOLERANCE = 1e-4
SPREAD_FACTOR = 1.5


@pytest.fixture(scope="module")
def folder():
    return FIXTURES / "sdxl_lora"


@pytest.fixture(scope="module")
def data(folder):
    with np.load(folder / "lora_io.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def sd():
    from tf_diffusion import StableDiffusion

    model = StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-diffusers")
    yield model
    model.unload_lora_weights()


@pytest.fixture(autouse=True)
def clean(sd):
    sd.unload_lora_weights()
    yield
    sd.unload_lora_weights()


def outputs(sd, data) -> dict:
    te = sd.text_encoder(data["ids"].astype(np.int32), clip_skip=1, final_norm=False)
    te2, pooled = sd.text_encoder_2(
        data["ids_2"].astype(np.int32), clip_skip=1, final_norm=False, pooled=True
    )
    unet = sd.unet(data["x"], data["t"], data["context"], data["text_embeds"], data["time_ids"])
    return {k: np.asarray(v) for k, v in dict(te=te, te2=te2, pooled=pooled, unet=unet).items()}


def check(got: dict, data: dict, tag: str, what: str) -> None:
    errs = {k: float(np.abs(got[k] - data[f"{k}_{tag}"]).max()) for k in got}
    bound = {k: TOLERANCE for k in errs}
    if f"unet_{tag}_float64" in data:
        errs["unet"] = float(np.abs(got["unet"] - data[f"unet_{tag}_float64"]).max())
        bound["unet"] = max(TOLERANCE, SPREAD_FACTOR * float(data[f"unet_{tag}_float32_spread"]))
    print(f"{what}: " + ", ".join(f"{k} {v:.2e} (bound {bound[k]:.1e})" for k, v in errs.items()))
    for k, err in errs.items():
        assert err <= bound[k], f"{what}: {k} differs by {err:.2e}"


def test_base_matches_reference(sd, data):
    check(outputs(sd, data), data, "base", "base")


@pytest.mark.parametrize("fmt", sorted(FILES))
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_lora_matches_peft(sd, data, folder, fmt, weight):
    sd.load_lora_weights(folder / FILES[fmt], weight=weight)
    components = {m.component for lora in _adapters(sd) for m in lora.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    check(outputs(sd, data), data, f"lora_{weight:.1f}", f"{fmt} at {weight}")


@pytest.mark.parametrize("fmt", sorted(OLD_FILES))
def test_older_diffusers_layouts(sd, data, folder, fmt):
    sd.load_lora_weights(folder / OLD_FILES[fmt])
    check(outputs(sd, data), data, "old", f"old diffusers layout {fmt}")


def test_kohya_sgm_names_are_what_the_file_holds(folder):
    from tf_diffusion.adapters.lora import read_lora_file

    keys = set(read_lora_file(folder / FILES["kohya"])[0])
    # kohya's SDXL spelling: original UNet paths, both text encoders by number.
    for key in (
        "lora_unet_input_blocks_5_1_transformer_blocks_2_attn1_to_q.lora_down.weight",
        "lora_unet_input_blocks_3_0_skip_connection.lora_down.weight",
        "lora_unet_middle_block_0_in_layers_2.lora_up.weight",
        "lora_unet_output_blocks_2_0_out_layers_3.alpha",
        "lora_unet_label_emb_0_0.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_2_mlp_fc2.alpha",
    ):
        assert key in keys, key


def test_text_encoder_weight_covers_both_encoders(sd, data, folder):
    """A1111's <lora:name:unet:te>: the te weight scales CLIP-L and bigG, the UNet keeps its own."""
    sd.load_lora_weights(folder / FILES["kohya"], adapter_name="k", weight={"unet": 1.0, "text_encoder": 0.5})
    got = outputs(sd, data)
    assert float(np.abs(got["te"] - data["te_lora_0.5"]).max()) <= TOLERANCE
    assert float(np.abs(got["te2"] - data["te2_lora_0.5"]).max()) <= TOLERANCE
    assert float(np.abs(got["pooled"] - data["pooled_lora_0.5"]).max()) <= TOLERANCE
    bound = max(TOLERANCE, SPREAD_FACTOR * float(data["unet_lora_1.0_float32_spread"]))
    assert float(np.abs(got["unet"] - data["unet_lora_1.0_float64"]).max()) <= bound
    assert get_active_adapters(sd) == {"k": {"unet": 1.0, "text_encoder": 0.5}}


def test_unload_restores_base_bit_for_bit(sd, data, folder):
    from tf_diffusion.weights.state_dict import state_dict

    before = {c: state_dict(getattr(sd, c)) for c in ("unet", "text_encoder", "text_encoder_2")}
    sd.load_lora_weights(folder / FILES["diffusers"])
    sd.load_lora_weights(folder / OLD_FILES["processor"], weight=0.3)
    sd.unload_lora_weights()
    for c, values in before.items():
        after = state_dict(getattr(sd, c))
        assert [k for k in values if not np.array_equal(values[k], after[k])] == [], c


def _adapters(sd):
    from tf_diffusion.adapters.lora import _state

    return list(_state(sd).adapters.values())


# ------------------------------------------------------------------------------------ mismatches


def test_sdxl_lora_on_sd1_model_names_both(fixtures_dir, folder):
    from tests.test_lora import build

    sd1 = build(fixtures_dir)
    for name in FILES.values():
        with pytest.raises(LoraError, match="SDXL LoRA keys") as info:
            sd1.load_lora_weights(folder / name)
        assert "SD 1" in str(info.value) or "sd" in str(info.value).lower()
    assert get_active_adapters(sd1) == {}


def test_sd1_lora_on_sdxl_model_names_both(sd, fixtures_dir):
    from tf_diffusion.weights.state_dict import state_dict

    before = state_dict(sd.unet)
    with pytest.raises(LoraError, match=r"SD 1\.x / 2\.x LoRA.*SDXL|SDXL.*SD 1") as info:
        sd.load_lora_weights(fixtures_dir / "lora" / "lora_kohya.safetensors")
    assert "two text encoders" in str(info.value)
    after = state_dict(sd.unet)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert get_active_adapters(sd) == {}


def test_refiner_refuses_clip_l_keys_clearly(fixtures_dir, folder, tmp_path):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.adapters.lora import read_lora_file
    from tf_diffusion.weights.safetensors_io import save_safetensors

    refiner = StableDiffusion.from_pretrained(fixtures_dir / "sdxl" / "sdxl-refiner-diffusers")
    tensors, _ = read_lora_file(folder / FILES["kohya"])
    # The bigG encoder's LoRA alone is a valid refiner LoRA (same bigG shapes in these fixtures).
    te2 = {k: np.asarray(v) for k, v in tensors.items() if k.startswith("lora_te2_")}
    save_safetensors(te2, tmp_path / "te2.safetensors")
    refiner.load_lora_weights(tmp_path / "te2.safetensors")
    assert {m.component for lora in _adapters(refiner) for m in lora.modules} == {"text_encoder_2"}
    refiner.unload_lora_weights()
    te1 = {k: np.asarray(v) for k, v in tensors.items() if k.startswith("lora_te1_")}
    save_safetensors(te1, tmp_path / "te1.safetensors")
    with pytest.raises(LoraError, match="refiner has only text_encoder_2"):
        refiner.load_lora_weights(tmp_path / "te1.safetensors")


def test_fixture_configs_are_what_the_tool_wrote(folder):
    configs = json.loads((folder / "lora_configs.json").read_text())
    assert configs["text_encoder_2"]["r"] == 3 and configs["unet"]["rank_pattern"] == {"conv1": 2}


def test_prompt_tags_on_an_sdxl_model(sd, data, folder, tmp_path):
    """<lora:NAME:TE:UNET> on SDXL: the te weight scales both encoders; the tag leaves the text."""
    import shutil

    from tf_diffusion.adapters import extra_networks as xn

    shutil.copy(folder / FILES["kohya"], tmp_path / "sdxl-style.safetensors")
    sd.lora_dir = str(tmp_path)
    try:
        texts, negatives, params = xn.prepare(sd, ["a cat <lora:sdxl-style:0.5:1>"], [""])
        assert texts[0].strip() == "a cat"
        assert get_active_adapters(sd) == {"<lora:sdxl-style>": {"unet": 1.0, "text_encoder": 0.5}}
        got = outputs(sd, data)
        for k in ("te", "te2", "pooled"):
            assert float(np.abs(got[k] - data[f"{k}_lora_0.5"]).max()) <= TOLERANCE, k
        bound = max(TOLERANCE, SPREAD_FACTOR * float(data["unet_lora_1.0_float32_spread"]))
        assert float(np.abs(got["unet"] - data["unet_lora_1.0_float64"]).max()) <= bound
        assert params["Lora hashes"].startswith("sdxl-style: ")
        xn.prepare(sd, ["a cat"], [""])
        assert get_active_adapters(sd) == {}
        check(outputs(sd, data), data, "base", "tags removed")
    finally:
        sd.lora_dir = None


def test_diffusers_per_component_weights(sd, data, folder):
    """set_adapters with diffusers' {"text_encoder_2": w}: bigG gets its own weight, CLIP-L keeps its."""
    sd.load_lora_weights(folder / FILES["diffusers"], adapter_name="d")
    sd.set_adapters("d", {"unet": 0.5, "text_encoder": 1.0, "text_encoder_2": 0.5})
    got = outputs(sd, data)
    assert float(np.abs(got["te"] - data["te_lora_1.0"]).max()) <= TOLERANCE
    assert float(np.abs(got["te2"] - data["te2_lora_0.5"]).max()) <= TOLERANCE
    assert float(np.abs(got["pooled"] - data["pooled_lora_0.5"]).max()) <= TOLERANCE
    assert float(np.abs(got["unet"] - data["unet_lora_0.5_float64"]).max()) <= TOLERANCE
    with pytest.raises(ValueError, match=r"names \['text_encoder_3'\]; allowed parts"):
        sd.set_adapters("d", {"text_encoder_3": 1.0})


@pytest.mark.parametrize("run", ["lcm", "tcd"])
def test_pipeline_with_lora_matches_diffusers(sd, folder, run):
    """The LCM-LoRA / TCD-LoRA recipe end to end: StableDiffusionXLPipeline with the LoRA at 0.5, 4 steps,
    guidance 1.0, its noise drawn from tf_diffusion.noise (tools/make_fixtures_sdxl_lora.py)."""
    from tf_diffusion.execution import ExecutionOptions
    from tf_diffusion.schedulers import get_sampler

    meta = json.loads((folder / "pipeline.json").read_text())
    name, cls_name, steps, eta, seed = next(r for r in meta["runs"] if r[0] == run)
    with np.load(folder / "pipeline.npz") as f:
        want = f[f"{run}/images"]
    sd.load_lora_weights(folder / FILES["diffusers"], weight=meta["weight"])
    sampler = get_sampler(cls_name, sd.config.scheduler, **({} if eta is None else {"eta": eta}))
    out = sd.generate(
        meta["prompt"], num_steps=steps, guidance_scale=1.0, seed=seed, height=16, width=16, scheduler=sampler,
        output_type="float", progress=False, execution=ExecutionOptions(compile="eager"),
    )  # fmt: skip
    err = float(np.abs(np.asarray(out) - want).max())
    print(f"{run} pipeline with LoRA: max abs error {err:.2e}")
    assert err <= 1e-3
