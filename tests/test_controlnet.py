"""ControlNet: the model, its file formats and generate() against diffusers.

tools/make_fixtures_controlnet.py ran diffusers' ControlNetModel on tiny random configs (weights
from ``random_state_dict``, redrawn here) and StableDiffusionControlNetPipeline on the tiny SD
components of tools/make_fixtures_pipeline.py; it also wrote original-format single files, whose
key names diffusers' own single-file converter maps back onto every diffusers key.
"""

import functools
import json
import logging
import pathlib

import numpy as np
import pytest

from tf_diffusion.testing import random_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "controlnet"
COMPONENT_TOLERANCE = 1e-4
PIPELINE_TOLERANCE = 1e-3


@functools.lru_cache(maxsize=1)
def cases():
    return json.loads((FIXTURES / "cases.json").read_text())


def diffusers_weights(name):
    meta = cases()[name]
    return random_state_dict({k: tuple(v) for k, v in meta["shapes"].items()}, meta["seed"])


@functools.lru_cache(maxsize=8)
def net(name):
    """Our ControlNet with the fixture's weights, through the diffusers rename."""
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import load_state_dict
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers, convert_diffusers_controlnet

    config = controlnet_config_from_diffusers(cases()[name]["config"])
    model = ControlNet(config)
    load_state_dict(model, convert_diffusers_controlnet(diffusers_weights(name), config))
    return model


def run(model, arrays, scale=0.7, guess=False):
    from tf_diffusion.adapters.controlnet import scaled_residuals

    extra = {}
    if "text_embeds" in arrays:
        extra = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    down, mid = model(arrays["latents"], arrays["timesteps"], arrays["context"], arrays["hint"], **extra)
    down, mid = scaled_residuals(model, down, mid, np.float32(scale), guess)
    return [np.asarray(d) for d in down], np.asarray(mid)


def max_error(ours, arrays, tag):
    down, mid = ours
    count = len([k for k in arrays if k.startswith(f"{tag}.down.")])
    assert len(down) == count
    errors = [float(np.max(np.abs(d - arrays[f"{tag}.down.{i}"]))) for i, d in enumerate(down)]
    errors.append(float(np.max(np.abs(mid - arrays[f"{tag}.mid"]))))
    return max(errors)


@pytest.mark.parametrize("name", ["tiny", "tiny_original", "sdxl"])
@pytest.mark.parametrize("guess", [False, True])
def test_residuals_match_diffusers(name, guess):
    arrays = dict(np.load(FIXTURES / f"{name}.npz"))
    tag = "guess" if guess else "plain"
    err = max_error(run(net(name), arrays, guess=guess), arrays, tag)
    assert err <= COMPONENT_TOLERANCE, f"{name} {tag}: max abs error {err:.2e}"
    # The residuals are not trivially small: a wrong weight would show.
    assert float(np.max(np.abs(arrays[f"{tag}.mid"]))) > 0.05


def test_full_size_sd15_count_and_keys():
    """The full-size SD1.5 ControlNet (control_v11p_sd15_*) has diffusers' keys, shapes and count."""
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import count_parameters, manifest
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers, convert_diffusers_controlnet
    from tf_diffusion.weights.state_dict import build_abstract

    reference = json.loads((FIXTURES / "sd15_manifest.json").read_text())
    config = controlnet_config_from_diffusers(reference["config"])
    model = build_abstract(lambda: ControlNet(config))
    assert count_parameters(model) == 361_279_120
    want = {k: list(v) for k, v in convert_diffusers_controlnet(reference["shapes"], config).items()}
    ours = {k: list(v) for k, v in manifest(model).items()}
    assert sorted(set(want) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}


def test_full_size_sdxl_count_and_keys():
    """The full-size SDXL ControlNet (diffusers/controlnet-canny-sdxl-1.0) has diffusers' keys, shapes and count."""
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import count_parameters, manifest
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers, convert_diffusers_controlnet
    from tf_diffusion.weights.state_dict import build_abstract

    reference = json.loads((FIXTURES / "sdxl_manifest.json").read_text())
    assert reference["config"]["transformer_layers_per_block"] == [1, 2, 10]
    assert reference["config"]["addition_embed_type"] == "text_time"
    config = controlnet_config_from_diffusers(reference["config"])
    model = build_abstract(lambda: ControlNet(config))
    count = sum(int(np.prod(shape)) for shape in reference["shapes"].values())
    assert count == 1_251_014_160
    assert count_parameters(model) == count
    want = {k: list(v) for k, v in convert_diffusers_controlnet(reference["shapes"], config).items()}
    ours = {k: list(v) for k, v in manifest(model).items()}
    assert sorted(set(want) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}


# ------------------------------------------------------------------ formats


def original_config():
    """The tiny original net's architecture (single files store neither heads nor norm groups)."""
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers

    return controlnet_config_from_diffusers(cases()["tiny_original"]["config"])


def assert_original_outputs(model):
    arrays = dict(np.load(FIXTURES / "tiny_original.npz"))
    err = max_error(run(model, arrays), arrays, "plain")
    assert err <= COMPONENT_TOLERANCE, f"max abs error {err:.2e}"


def test_diffusers_folder(tmp_path):
    """A ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) loads by from_pretrained."""
    import tf_diffusion
    from tf_diffusion.weights.safetensors_io import save_safetensors

    folder = tmp_path / "controlnet"
    folder.mkdir()
    config = dict(cases()["tiny_original"]["config"], _class_name="ControlNetModel")
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(diffusers_weights("tiny_original"), str(folder / "diffusion_pytorch_model.safetensors"))
    assert_original_outputs(tf_diffusion.ControlNet.from_pretrained(folder))


def test_original_safetensors():
    import tf_diffusion

    model = tf_diffusion.ControlNet.from_pretrained(
        FIXTURES / "tiny_original.safetensors", config=original_config()
    )
    assert_original_outputs(model)


def test_original_safetensors_infers_the_architecture():
    """Without a config the blocks, widths, context and hint encoder come from the shapes."""
    import tf_diffusion

    model = tf_diffusion.ControlNet.from_pretrained(FIXTURES / "tiny_original.safetensors")
    want, got = original_config(), model.config
    assert got.hint_channels == want.hint_channels == (16, 32, 96, 256)
    for field in ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "context_dim"):
        assert getattr(got.unet, field) == getattr(want.unet, field), field


def reference_variables(model):
    from tf_diffusion.weights import state_dict

    return state_dict(model)


def test_original_pth_and_whole_sd_file(caplog):
    """.pth through the safe unpickler (float16 copies of the same weights); a control_sd15-style
    file with a whole SD model besides: its control_model part is used, and a warning says so."""
    import tf_diffusion

    base = reference_variables(
        tf_diffusion.ControlNet.from_pretrained(
            FIXTURES / "tiny_original.safetensors", config=original_config()
        )
    )
    pth = tf_diffusion.ControlNet.from_pretrained(FIXTURES / "tiny_original.pth", config=original_config())
    with caplog.at_level(logging.WARNING, logger="tf_diffusion.weights.controlnet"):
        whole = tf_diffusion.ControlNet.from_pretrained(
            FIXTURES / "tiny_control_sd15_whole.pth", config=original_config()
        )
    assert any("whole Stable Diffusion model" in r.getMessage() for r in caplog.records)
    for model in (pth, whole):
        got = reference_variables(model)
        assert sorted(got) == sorted(base)
        for k in base:
            np.testing.assert_allclose(got[k], base[k].astype(np.float16).astype(np.float32), rtol=0, atol=0)


def test_not_a_controlnet(tmp_path):
    import tf_diffusion
    from tf_diffusion.weights.safetensors_io import save_safetensors

    path = tmp_path / "unet.safetensors"
    save_safetensors({"model.diffusion_model.out.2.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a ControlNet"):
        tf_diffusion.ControlNet.from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        tf_diffusion.ControlNet.from_pretrained(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- generate()


@functools.lru_cache(maxsize=1)
def tiny_sd():
    """The tiny SD pipeline of tests/test_pipeline_parity.py (epsilon prediction)."""
    from test_pipeline_parity import build

    return build(FIXTURES.parent / "pipeline", False, "epsilon")


def pipeline_meta():
    return json.loads((FIXTURES.parent / "pipeline" / "cases.json").read_text())


def control_image(seed):
    size = pipeline_meta()["size"]
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def generate_case(case, **overrides):
    from tf_diffusion.noise import NoiseSource

    meta = pipeline_meta()
    sd = tiny_sd()
    single = len(case["nets"]) == 1
    nets = [net(n) for n in case["nets"]]
    images = [control_image(100 + i) for i in range(len(nets))]
    pick = (lambda v: v[0]) if single else (lambda v: v)
    latent = meta["size"] // 2
    kwargs = dict(
        controlnet=pick(nets),
        control_image=pick(images),
        controlnet_conditioning_scale=pick(case["scale"]),
        control_guidance_start=pick(case["start"]),
        control_guidance_end=pick(case["end"]),
        guess_mode=case["guess"],
    )
    kwargs.update(overrides)
    return sd.generate(
        meta["prompts"],
        meta["negative_prompts"],
        num_steps=meta["steps"],
        guidance_scale=case["guidance"],
        scheduler=case["sampler"],
        latents=NoiseSource(case["seed"]).normal((len(meta["prompts"]), latent, latent, 4)),
        output_type="float",
        progress=False,
        jit_compile=False,
        **kwargs,
    )


def pipeline_case_names():
    return [c["name"] for c in json.loads((FIXTURES / "cases.json").read_text())["pipeline"]["cases"]]


@pytest.mark.parametrize("name", pipeline_case_names())
def test_generate_matches_diffusers_controlnet_pipeline(name):
    case = next(c for c in cases()["pipeline"]["cases"] if c["name"] == name)
    want = np.load(FIXTURES / "pipeline.npz")[name]
    ours = generate_case(case)
    err = float(np.max(np.abs(np.asarray(ours) - want)))
    assert ours.shape == want.shape
    assert err <= PIPELINE_TOLERANCE, f"{name}: max abs error {err:.2e}"
    # The nets change the image well beyond the tolerance, so the comparison can fail.
    plain = generate_case(case, controlnet=None, control_image=None)
    assert float(np.max(np.abs(np.asarray(plain) - want))) > 20 * PIPELINE_TOLERANCE


def task_cases():
    return json.loads((FIXTURES / "tasks.json").read_text())["cases"]


@pytest.mark.parametrize("case", task_cases(), ids=lambda c: c["name"])
def test_image_tasks_match_diffusers_controlnet_pipelines(case):
    """img2img and inpainting (4- and 9-channel UNets) with a net: StableDiffusionControlNetImg2ImgPipeline
    and StableDiffusionControlNetInpaintPipeline, from the same seeded noise."""
    from test_pipeline_parity import build, reference_image, reference_mask

    meta = pipeline_meta()
    sd = build(FIXTURES.parent / "pipeline", case["mode"] == "inpaint9", "epsilon")
    kwargs = dict(image=reference_image(case["seed"] + 1, meta["size"]), strength=case["strength"])
    if case["mode"].startswith("inpaint"):
        kwargs["mask"] = reference_mask(meta["size"])

    def ours(**overrides):
        options = dict(
            controlnet=net(case["net"]),
            control_image=control_image(json.loads((FIXTURES / "tasks.json").read_text())["hint_seed"]),
            controlnet_conditioning_scale=case["scale"],
            control_guidance_start=case.get("start", 0.0),
            control_guidance_end=case.get("end", 1.0),
            **kwargs,
        )
        options.update(overrides)
        return sd.generate(
            meta["prompts"],
            meta["negative_prompts"],
            num_steps=meta["steps"],
            guidance_scale=case["guidance"],
            seed=case["seed"],
            scheduler=case["sampler"],
            output_type="float",
            progress=False,
            jit_compile=False,
            **options,
        )

    want = np.load(FIXTURES / "tasks.npz")[case["name"]]
    got = ours()
    assert got.shape == want.shape
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"ControlNet {case['name']}: max abs error {err:.2e}")
    assert err <= PIPELINE_TOLERANCE, f"{case['name']}: max abs error {err:.2e}"
    plain = ours(controlnet=None, control_image=None)
    assert float(np.max(np.abs(np.asarray(plain) - want))) > 20 * PIPELINE_TOLERANCE


def test_steps_do_not_retrace():
    """Scales, windows and hint images are data: a second call with other values compiles nothing."""
    case = cases()["pipeline"]["cases"][1]
    sd = tiny_sd()
    generate_case(case)
    before = sd.executor.traces
    # Only the guidance window changes: the images must change too (the window is applied).
    other = generate_case(case, control_guidance_end=[0.5, 0.9])
    assert sd.executor.traces == before
    want = np.load(FIXTURES / "pipeline.npz")[case["name"]]
    assert float(np.max(np.abs(np.asarray(other) - want))) > 20 * PIPELINE_TOLERANCE
    generate_case(
        case, controlnet_conditioning_scale=[0.2, 0.4], control_image=[control_image(7), control_image(8)]
    )
    assert sd.executor.traces == before


def test_bad_arguments():
    from tf_diffusion.config import UNetConfig
    from tf_diffusion.controlnet import ControlNet, ControlNetConfig

    case = cases()["pipeline"]["cases"][1]
    size = pipeline_meta()["size"]
    with pytest.raises(ValueError, match="one image per ControlNet"):
        generate_case(case, control_image=[control_image(1)])
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries but there are 2"):
        generate_case(case, controlnet_conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="control_guidance_start 0.8 must be below control_guidance_end 0.5"):
        generate_case(case, control_guidance_start=0.8, control_guidance_end=0.5)
    small = np.zeros((size // 2, size, 3), np.uint8)
    with pytest.raises(ValueError, match=f"{size}x{size // 2} \\(WxH\\) but the output is {size}x{size}"):
        generate_case(case, control_image=[small, small])
    with pytest.raises(ValueError, match="control_image needs controlnet"):
        generate_case(case, controlnet=None)
    # A net for another family: SD 2.x's 1024-wide context against this 32-wide one.
    unet = net("pipe_a").config.unet
    other = ControlNet(
        ControlNetConfig(unet=UNetConfig(**{**unet.__dict__, "context_dim": 1024}), hint_channels=(16, 32))
    )
    with pytest.raises(
        ValueError, match="another model family: it reads 1024-wide text context, .* gives 32"
    ):
        generate_case(case, controlnet=[other, net("pipe_b")])


# ------------------------------------------------------- SDXL


@functools.lru_cache(maxsize=1)
def sdxl_case():
    from tf_diffusion import StableDiffusion
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import load_state_dict
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers, convert_diffusers_controlnet

    meta = json.loads((FIXTURES / "sdxl_pipeline.json").read_text())
    sd = StableDiffusion.from_pretrained(FIXTURES.parent / "sdxl" / "sdxl-diffusers")
    config = controlnet_config_from_diffusers(meta["config"])
    model = ControlNet(config)
    weights = random_state_dict({k: tuple(v) for k, v in meta["shapes"].items()}, meta["seed"])
    load_state_dict(model, convert_diffusers_controlnet(weights, config))
    return meta, sd, model


@pytest.mark.parametrize(
    "name", ["euler", pytest.param("dpmpp_2m_karras-window", marks=pytest.mark.slow)]
)  # the second: the same code with a window and another sampler, in the slow run
def test_sdxl_generate_matches_stable_diffusion_xl_controlnet_pipeline(name):
    meta, sd, model = sdxl_case()
    case = next(c for c in meta["cases"] if c["name"] == name)
    arrays = np.load(FIXTURES / "sdxl_pipeline.npz")

    def ours(**control):
        return sd.generate(
            meta["prompts"],
            meta["negative_prompts"],
            num_steps=meta["steps"],
            guidance_scale=case["guidance"],
            height=meta["height"],
            width=meta["width"],
            latents=arrays[f"{name}/latents"],
            scheduler=case["scheduler"],
            output_type="float",
            progress=False,
            jit_compile=False,
            **control,
        )

    got = ours(
        controlnet=model,
        control_image=arrays["hint"],
        controlnet_conditioning_scale=case["scale"],
        control_guidance_start=case["start"],
        control_guidance_end=case["end"],
        guess_mode=case["guess"],
    )
    want = arrays[f"{name}/images"]
    assert got.shape == want.shape
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"SDXL ControlNet {name}: max abs error {err:.2e}")
    assert err <= PIPELINE_TOLERANCE, f"{name}: max abs error {err:.2e}"
    assert float(np.max(np.abs(np.asarray(ours()) - want))) > 20 * PIPELINE_TOLERANCE


def test_controlnet_with_a_lora_matches_diffusers():
    """A LoRA merged into the UNet and a net on it: StableDiffusionControlNetPipeline after
    diffusers' load_lora_weights / set_adapters, from the same latents."""
    from tf_diffusion.noise import NoiseSource

    case = json.loads((FIXTURES / "lora.json").read_text())
    meta = pipeline_meta()
    sd = tiny_sd()
    latent = meta["size"] // 2

    def run():
        return sd.generate(
            meta["prompts"],
            meta["negative_prompts"],
            num_steps=meta["steps"],
            guidance_scale=case["guidance"],
            scheduler=case["sampler"],
            latents=NoiseSource(case["seed"]).normal((len(meta["prompts"]), latent, latent, 4)),
            controlnet=net(case["net"]),
            control_image=control_image(case["hint_seed"]),
            controlnet_conditioning_scale=case["scale"],
            output_type="float",
            progress=False,
            jit_compile=False,
        )

    want = np.load(FIXTURES / "lora.npz")["images"]
    sd.load_lora_weights(FIXTURES.parent / "lora" / "lora_second.safetensors", weight=case["lora_weight"])
    try:
        got = run()
    finally:
        sd.unload_lora_weights()
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"ControlNet + LoRA: max abs error {err:.2e}")
    assert err <= PIPELINE_TOLERANCE, f"max abs error {err:.2e}"
    assert float(np.max(np.abs(np.asarray(run()) - want))) > 20 * PIPELINE_TOLERANCE  # the LoRA matters


# ---------------------------------------------------------------- SavedModel export


def test_serving_module_with_a_controlnet_equals_generate():
    """One ControlNet in the exported graph: control_image and control_scale inputs, the numbers of
    generate(controlnet=..., control_image=..., controlnet_conditioning_scale=...)."""
    import tensorflow as tf

    from tf_diffusion.export import build_serving_module

    sd, control = tiny_sd(), net("pipe_a")
    size = pipeline_meta()["size"]
    module, signatures = build_serving_module(sd, sampler="ddim", num_steps=3, controlnet=control)
    fn = signatures["generate_from_noise"]
    assert set(fn.function_type.parameters) == {
        "prompt", "negative_prompt", "guidance_scale", "noise", "control_image", "control_scale"
    }  # fmt: skip
    assert module.metadata["controlnet"]["model"] == "controlnet"
    hints = np.stack([control_image(100), control_image(101)])
    noise = np.random.default_rng(4).standard_normal((2, size // 2, size // 2, 4)).astype(np.float32)
    out = fn(
        prompt=tf.constant(["a red circle", "a blue square"]),
        negative_prompt=tf.constant(["", "blurry"]),
        guidance_scale=tf.constant([6.0, 6.0]),
        noise=tf.constant(noise),
        control_image=tf.constant(hints),
        control_scale=tf.constant([0.8, 0.5]),
    )
    for row, (prompt, negative, scale) in enumerate(
        [("a red circle", "", 0.8), ("a blue square", "blurry", 0.5)]
    ):
        want = sd.generate(
            prompt, negative, latents=noise[row : row + 1], scheduler="ddim", num_steps=3, guidance_scale=6.0,
            controlnet=control, control_image=hints[row], controlnet_conditioning_scale=scale,
            output_type="latent", progress=False, jit_compile=False,
        )  # fmt: skip
        err = float(np.abs(out["latents"].numpy()[row] - np.asarray(want)[0]).max())
        print(f"row {row}: latents max abs error against generate() {err:.2e}")
        assert err <= 1e-4
    with pytest.raises(ValueError, match="one ControlNet"):
        build_serving_module(sd, controlnet=[control, control])
