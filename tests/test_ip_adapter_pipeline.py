"""IP-Adapter in generate() against diffusers' pipelines after ``load_ip_adapter``.

tools/make_fixtures_ip_adapter.py --pipelines wrote tiny adapters in the published layout (base as a
``.bin``, "plus" as ``.safetensors``), the tiny image encoder as a transformers folder, and the images
of StableDiffusionPipeline / StableDiffusionControlNetPipeline / StableDiffusionXLPipeline with them
loaded, from the same latents; ``--tasks`` their img2img / inpainting (4- and 9-channel UNets)
counterparts with tf_diffusion's noise. No torch here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "ip_adapter"
ENCODER = FIXTURES / "image_encoder"
TOLERANCE = 1e-3  # float images in [0, 1]


@functools.lru_cache(maxsize=1)
def meta():
    return json.loads((FIXTURES / "pipelines.json").read_text())


@functools.lru_cache(maxsize=1)
def arrays():
    return dict(np.load(FIXTURES / "pipelines.npz"))


@functools.lru_cache(maxsize=1)
def tiny_sd():
    from test_controlnet import tiny_sd as controlnet_tiny_sd

    return controlnet_tiny_sd()


def pipeline_meta():
    return json.loads((FIXTURES.parent / "pipeline" / "cases.json").read_text())


def sd15_case(name):
    return next(c for c in meta()["cases"] if c["name"] == name)


def generate_sd15(case, sd=None, **overrides):
    from tf_diffusion.noise import NoiseSource

    pm = pipeline_meta()
    sd = tiny_sd() if sd is None else sd
    pictures = arrays()
    latent = pm["size"] // 2
    images = [[pictures[f"pictures/{i}"] for i in group] for group in case["images"]]
    kwargs = dict(ip_adapter_image=images[0] if len(images) == 1 else images)
    if "controlnet" in case:
        from test_controlnet import control_image, net

        kwargs.update(
            controlnet=net(case["controlnet"]),
            control_image=control_image(case["hint_seed"]),
            controlnet_conditioning_scale=case["control_scale"],
        )
    kwargs.update(overrides)
    if "execution" not in kwargs:
        kwargs["jit_compile"] = False
    return sd.generate(
        pm["prompts"],
        pm["negative_prompts"],
        num_steps=pm["steps"],
        guidance_scale=case["guidance"],
        scheduler=case["sampler"],
        latents=NoiseSource(case["seed"]).normal((len(pm["prompts"]), latent, latent, 4)),
        output_type="float",
        progress=False,
        **kwargs,
    )


def loaded(case):
    sd = tiny_sd()
    if "lora" in case:
        sd.load_lora_weights(FIXTURES.parent / "lora" / case["lora"], weight=case["lora_weight"])
    sd.load_ip_adapter([FIXTURES / f for f in case["files"]], image_encoder=ENCODER)
    sd.set_ip_adapter_scale(case["scale"])
    return sd


def error(got, want):
    assert got.shape == want.shape
    return float(np.max(np.abs(np.asarray(got) - want)))


@pytest.mark.parametrize(
    "name", ["base-bin", "plus-two-images", "two-adapters", "controlnet-base", "lora-plus"]
)
def test_generate_matches_diffusers_with_ip_adapter(name):
    case = sd15_case(name)
    sd = loaded(case)
    try:
        got = generate_sd15(case)
        err = error(got, arrays()[name])
        print(f"IP-Adapter {name}: max abs error {err:.2e}")
        assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"
        # The adapter must matter: at scale 0 the images are far from diffusers' with it.
        far = error(generate_sd15(case, ip_adapter_scale=0.0), arrays()[name])
        assert far > 20 * TOLERANCE, f"{name}: the image tokens changed little ({far:.2e})"
    finally:
        sd.unload_ip_adapter()
        if "lora" in case:
            sd.unload_lora_weights()


@pytest.mark.slow  # XLA on a CPU: islands (the CPU default for larger latents) and one program
@pytest.mark.parametrize("mode", ["islands", "xla"])
def test_compiled_modes_run_the_image_attention(mode):
    """Under "islands" the transformer blocks' fast path defers to the IP-Adapter processor."""
    from tf_diffusion.execution import ExecutionOptions

    case = sd15_case("base-bin")
    sd = loaded(case)
    try:
        got = generate_sd15(case, execution=ExecutionOptions(compile=mode))
    finally:
        sd.unload_ip_adapter()
    assert error(got, arrays()["base-bin"]) <= TOLERANCE


def test_scale_is_data_and_unload_restores():
    """Another scale or picture compiles nothing new; after unload the UNet computes as before."""
    case = sd15_case("base-bin")
    sd = tiny_sd()
    before = generate_sd15(case, ip_adapter_image=None)
    sd = loaded(case)
    try:
        generate_sd15(case, ip_adapter_scale=0.3)
        traces = sd.executor.traces
        got = generate_sd15(case)
        other = generate_sd15(case, ip_adapter_image=arrays()["pictures/1"])
        assert sd.executor.traces == traces, "another scale or picture traced the loop again"
        assert error(got, arrays()["base-bin"]) <= TOLERANCE
        assert error(other, arrays()["base-bin"]) > 20 * TOLERANCE
        unit = got.info.extra_params["ControlNet 0"]
        digest = hashlib.sha256((FIXTURES / "tiny_sd15.bin").read_bytes()[1 << 20 : (1 << 20) + (1 << 16)])
        assert unit == f"Module: ip-adapter_clip, Model: tiny_sd15 [{digest.hexdigest()[:8]}], Weight: 0.8"
    finally:
        sd.unload_ip_adapter()
    assert np.array_equal(np.asarray(generate_sd15(case, ip_adapter_image=None)), np.asarray(before))


# ------------------------------------------------------------------- SDXL


@functools.lru_cache(maxsize=1)
def tiny_sdxl():
    from tf_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(FIXTURES.parent / "sdxl" / "sdxl-diffusers")


@pytest.mark.parametrize("name", ["sdxl-base", pytest.param("sdxl-plus", marks=pytest.mark.slow)])
def test_sdxl_generate_matches_diffusers_with_ip_adapter(name):
    case = next(c for c in meta()["sdxl_cases"] if c["name"] == name)
    sd = tiny_sdxl()
    sd.load_ip_adapter([FIXTURES / f for f in case["files"]], image_encoder=ENCODER)
    sd.set_ip_adapter_scale(case["scale"])
    pictures = arrays()
    try:
        got = sd.generate(
            case["prompts"],
            case["negative_prompts"],
            num_steps=case["steps"],
            guidance_scale=case["guidance"],
            height=case["height"],
            width=case["width"],
            latents=pictures[f"{name}/latents"],
            scheduler=case["sampler"],
            ip_adapter_image=[pictures[f"pictures/{i}"] for i in case["images"][0]],
            output_type="float",
            progress=False,
            jit_compile=False,
        )
        err = error(got, pictures[name])
        print(f"SDXL IP-Adapter {name}: max abs error {err:.2e}")
        assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"
    finally:
        sd.unload_ip_adapter()


# ------------------------------------------------------- full-size counts


@pytest.mark.parametrize(
    "name", ["ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter_sdxl", "ip-adapter-plus_sdxl_vit-h"]
)
def test_full_size_parameter_counts_equal_diffusers(name):
    """The published adapters on the full-size UNets: diffusers' counts (its IPAdapterAttnProcessor2_0
    on every cross-attention layer plus the image projection; tools/make_fixtures_ip_adapter.py --counts)."""
    from tf_diffusion.adapters.ip_adapter import IPAdapter, cross_attention_layers
    from tf_diffusion.ip_adapter import ImageProjConfig, ImageProjModel, Resampler, ResamplerConfig
    from tf_diffusion.presets import get_preset
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.weights import count_parameters
    from tf_diffusion.weights.state_dict import build_abstract

    want = json.loads((FIXTURES / "full_size_counts.json").read_text())["adapters"][name]
    proj_meta = json.loads((FIXTURES / "full_size.json").read_text())["adapters"][name]
    preset = "sd-v1-5" if want["family"] == "sd15" else "sdxl-base-1.0"

    def build():
        unet = UNetModel(get_preset(preset).unet)
        layers = cross_attention_layers(unet)
        widths = [(a.to_k.out_features, a.to_k.in_features) for a in layers]
        config = proj_meta["config"]
        proj = (
            ImageProjModel(ImageProjConfig(**config))
            if proj_meta["kind"] == "image_proj"
            else Resampler(ResamplerConfig(**config))
        )
        return IPAdapter(proj, widths), len(layers)

    adapter, layers = build_abstract(build)
    assert layers == want["cross_attention_layers"]
    assert count_parameters(adapter) == want["parameters"]


@pytest.mark.slow
def test_sdxl_mixed_bfloat16_runs_the_adapter_under_the_unet_policy():
    """The adapter's layers follow the UNet's policy (bfloat16 queries meet bfloat16 image keys)."""
    from tf_diffusion import StableDiffusion

    case = next(c for c in meta()["sdxl_cases"] if c["name"] == "sdxl-base")
    sd = StableDiffusion.from_pretrained(FIXTURES.parent / "sdxl" / "sdxl-diffusers", dtype="mixed_bfloat16")
    sd.load_ip_adapter(FIXTURES / case["files"][0], image_encoder=ENCODER)
    sd.set_ip_adapter_scale(case["scale"])
    pictures = arrays()
    got = sd.generate(
        case["prompts"],
        case["negative_prompts"],
        num_steps=case["steps"],
        guidance_scale=case["guidance"],
        height=case["height"],
        width=case["width"],
        latents=pictures["sdxl-base/latents"],
        scheduler=case["sampler"],
        ip_adapter_image=pictures["pictures/0"],
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    assert error(got, pictures["sdxl-base"]) <= 0.05  # bfloat16's rounding through four steps


# -------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(tmp_path):
    from tf_diffusion.clip_vision import CLIPVisionEncoder
    from tf_diffusion.config import CLIPVisionConfig

    sd = tiny_sd()
    with pytest.raises(ValueError, match="ip_adapter_image needs an IP-Adapter"):
        generate_sd15(sd15_case("base-bin"))
    # The image encoder's width must be the one the adapter reads.
    other = CLIPVisionEncoder(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
            projection_dim=20,
        )  # fmt: skip
    )
    with pytest.raises(
        ValueError, match="reads 16-wide image_embeds, but the image encoder's projection_dim is 20"
    ):
        sd.load_ip_adapter(FIXTURES / "tiny_sd15.bin", image_encoder=other)
    assert not sd.ip_adapters
    # An adapter for another family (the SDXL one on the SD pipeline).
    with pytest.raises(ValueError, match="another model family: its image tokens are 72 wide.* takes 32"):
        sd.load_ip_adapter(FIXTURES / "tiny_sdxl.safetensors", image_encoder=ENCODER)
    sd.load_ip_adapter(
        [FIXTURES / "tiny_sd15.bin", FIXTURES / "tiny_plus_sd15.safetensors"], image_encoder=ENCODER
    )
    try:
        with pytest.raises(ValueError, match="ip_adapter_scale has 3 entries but 2 IP-Adapters are loaded"):
            sd.set_ip_adapter_scale([0.1, 0.2, 0.3])
        picture = arrays()["pictures/0"]
        with pytest.raises(ValueError, match="one entry .* per IP-Adapter \\(2\\), got 3"):
            generate_sd15(sd15_case("two-adapters"), ip_adapter_image=[picture] * 3)
        with pytest.raises(ValueError, match="are loaded: pass ip_adapter_image"):
            generate_sd15(sd15_case("two-adapters"), ip_adapter_image=None)
    finally:
        sd.unload_ip_adapter()
    not_adapter = tmp_path / "lora.safetensors"
    from tf_diffusion.weights.safetensors_io import save_safetensors

    save_safetensors({"lora_unet_x.lora_up.weight": np.zeros((2, 2), np.float32)}, not_adapter)
    with pytest.raises(ValueError, match="not an IP-Adapter in the published layout"):
        sd.load_ip_adapter(not_adapter, image_encoder=ENCODER)


def test_export_refuses_a_loaded_ip_adapter():
    """The SavedModel has no image-prompt input: exporting with an adapter loaded is an error, not a
    silent export without it."""
    pytest.importorskip("tensorflow")
    from tf_diffusion.export import build_serving_module

    case = sd15_case("base-bin")
    sd = loaded(case)
    try:
        with pytest.raises(
            ValueError, match="1 IP-Adapter\\(s\\) are loaded; the export has no image-prompt"
        ):
            build_serving_module(sd, num_steps=2)
    finally:
        sd.unload_ip_adapter()


def task_cases():
    return json.loads((FIXTURES / "tasks.json").read_text())["cases"]


@pytest.mark.parametrize("case", task_cases(), ids=lambda c: c["name"])
def test_image_tasks_match_diffusers_with_ip_adapter(case):
    """img2img and inpainting (4- and 9-channel UNets) with an adapter: diffusers'
    StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline after load_ip_adapter, same noise."""
    from test_pipeline_parity import build, reference_image, reference_mask

    sd = build(FIXTURES.parent / "pipeline", case["mode"] == "inpaint9", "epsilon")  # shared (cached)
    sd.load_ip_adapter([FIXTURES / f for f in case["files"]], image_encoder=ENCODER)
    try:
        _check_task(sd, case, reference_image, reference_mask)
    finally:
        sd.unload_ip_adapter()  # the cached pipeline goes back to test_pipeline_parity as it was


def _check_task(sd, case, reference_image, reference_mask):
    pm = pipeline_meta()
    sd.set_ip_adapter_scale(case["scale"])
    kwargs = dict(image=reference_image(case["seed"] + 1, pm["size"]), strength=case["strength"])
    if case["mode"].startswith("inpaint"):
        kwargs["mask"] = reference_mask(pm["size"])
    pictures = arrays()

    def ours(**overrides):
        options = dict(ip_adapter_image=[pictures[f"pictures/{i}"] for i in case["images"]], **kwargs)
        options.update(overrides)
        return sd.generate(
            pm["prompts"],
            pm["negative_prompts"],
            num_steps=pm["steps"],
            guidance_scale=case["guidance"],
            seed=case["seed"],
            scheduler=case["sampler"],
            output_type="float",
            progress=False,
            jit_compile=False,
            **options,
        )

    want = np.load(FIXTURES / "tasks.npz")[case["name"]]
    err = error(ours(), want)
    print(f"IP-Adapter {case['name']}: max abs error {err:.2e}")
    assert err <= TOLERANCE, f"{case['name']}: max abs error {err:.2e}"
    far = error(ours(ip_adapter_scale=0.0), want)
    assert far > 20 * TOLERANCE, f"{case['name']}: the image tokens changed little ({far:.2e})"
