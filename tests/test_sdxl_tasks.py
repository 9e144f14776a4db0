"""SDXL tasks through generate(): img2img (base and refiner), inpainting, micro-conditioning, the hand-off.

References are diffusers' ``StableDiffusionXLImg2ImgPipeline`` / ``StableDiffusionXLInpaintPipeline`` /
``StableDiffusionXLPipeline`` runs (tools/make_fixtures_sdxl.py --tasks, tests/fixtures/sdxl/tasks.*),
every random draw tf_diffusion.noise's for the same seeds, so ``seed=`` here reproduces them.
"""

import dataclasses
import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tf_diffusion.schedulers import get_sampler

SDXL = FIXTURES / "sdxl"
TOL = 1e-3
META = json.loads((SDXL / "tasks.json").read_text())
RUNS = {r["name"]: r for r in META["runs"]}
HANDOFFS = {r["name"]: r for r in META["handoffs"]}
# The default run keeps one case per feature (aesthetic scores, micro-conditioning, both inpainting
# UNets, the hand-off); the rest (other samplers of the same code paths) run with -m slow.
SLOW = {
    "refiner_img2img_euler",
    "inpaint9_euler_a",
    "inpaint4_dpmpp_strength",
    "base_txt2img_euler_micro",
    "handoff_dpmpp_2m_karras",
    "handoff_euler_a",
    "turbo_euler_2step",
}


def _cases(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(names)]


@pytest.fixture(scope="module")
def reference():
    with np.load(SDXL / "tasks.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def models():
    """The tiny base and refiner (diffusers folders) and the base with the 9-channel inpainting UNet."""
    from tf_diffusion import StableDiffusion
    from tf_diffusion.testing import random_state_dict
    from tf_diffusion.weights.diffusers_unet import (
        convert_diffusers_unet_state_dict,
        unet_config_from_diffusers,
    )
    from tf_diffusion.weights.state_dict import load_state_dict, state_dict

    base = StableDiffusion.from_pretrained(SDXL / "sdxl-diffusers")
    refiner = StableDiffusion.from_pretrained(SDXL / "sdxl-refiner-diffusers")
    spec = json.loads((SDXL / "unet_inpaint.json").read_text())
    unet_cfg = unet_config_from_diffusers(spec["config"])
    inpaint = StableDiffusion(
        base.config.replace(name="tiny-sdxl-inpainting", unet=unet_cfg),
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
    )
    for part in ("text_encoder", "text_encoder_2", "vae"):
        load_state_dict(getattr(inpaint, part), state_dict(getattr(base, part)))
    shapes = {k: tuple(v) for k, v in spec["shapes"].items()}
    load_state_dict(
        inpaint.unet, convert_diffusers_unet_state_dict(random_state_dict(shapes, spec["seed"]), unet_cfg)
    )
    return {"base": base, "refiner": refiner, "inpaint9": inpaint}


def task_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*META["size"], 3), dtype=np.uint8)


def task_mask() -> np.ndarray:
    mask = np.zeros(META["size"], dtype=np.uint8)
    mask[3:11, 5:14] = 255
    return mask


def _max_err(out, want) -> float:
    assert np.shape(out) == want.shape
    return float(np.abs(np.asarray(out) - want).max())


@pytest.mark.parametrize("name", _cases(RUNS))
def test_task_matches_diffusers(name, models, reference):
    run = RUNS[name]
    mode = run["mode"]
    sd = models["inpaint9" if mode == "inpaint9" else run["model"]]
    scheduler = run["sampler"]
    if "spacing" in run:  # the Turbo settings: trailing spacing (the sdxl-turbo preset's scheduler)
        scheduler = get_sampler(
            scheduler, dataclasses.replace(sd.config.scheduler, timestep_spacing=run["spacing"])
        )
    kwargs = dict(
        num_steps=run["steps"],
        guidance_scale=run["guidance"],
        seed=run["seed"],
        scheduler=scheduler,
        sdxl_options=run["options"] or None,
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    if mode == "txt2img":
        kwargs.update(height=META["size"][0], width=META["size"][1])
    else:
        kwargs.update(image=task_image(run["seed"] + 1), strength=run["strength"])
    if mode.startswith("inpaint"):
        kwargs.update(mask=task_mask())
    out = sd.generate(run["prompt"], run["negative"], **kwargs)
    err = _max_err(out, reference[f"{name}/images"])
    print(f"{name}: max abs error {err:.2e}")
    assert err <= TOL
    assert out.info.sdxl_options == {
        k: tuple(v) if isinstance(v, list) else v for k, v in run["options"].items()
    }


@pytest.mark.parametrize("name", _cases(HANDOFFS))
def test_base_to_refiner_handoff_matches_diffusers(name, models, reference):
    run = HANDOFFS[name]
    common = dict(
        num_steps=run["steps"], guidance_scale=run["guidance"], scheduler=run["sampler"], progress=False
    )
    common.update(jit_compile=False)
    latents = models["base"].generate(
        run["prompt"],
        run["negative"],
        height=META["size"][0],
        width=META["size"][1],
        seed=run["seeds"][0],
        denoising_end=run["switch"],
        output_type="latent",
        **common,
    )
    err_latents = _max_err(latents, reference[f"{name}/latents"])
    assert latents.info.denoising_end == run["switch"]
    # The base's result itself is the refiner's image (diffusers' image=latents).
    images = models["refiner"].generate(
        run["prompt"],
        run["negative"],
        image=latents,
        seed=run["seeds"][1],
        denoising_start=run["switch"],
        output_type="float",
        **common,
    )
    err = _max_err(images, reference[f"{name}/images"])
    print(f"{name}: latents {err_latents:.2e}, images {err:.2e}")
    assert err_latents <= TOL and err <= TOL
    assert images.info.denoising_start == run["switch"] and images.info.strength is None


INPAINT_HANDOFFS = {r["name"]: r for r in json.loads((SDXL / "handoff_inpaint.json").read_text())["runs"]}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "euler_a" in n else n
                                  for n in sorted(INPAINT_HANDOFFS)])  # fmt: skip
def test_inpainting_through_the_handoff_matches_diffusers(name, models):
    """The base inpaints to denoising_end; the refiner continues its latents under the same mask
    (StableDiffusionXLInpaintPipeline for both stages, diffusers' "ensemble of experts" for inpainting)."""
    run = INPAINT_HANDOFFS[name]
    with np.load(SDXL / "handoff_inpaint.npz") as data:
        want_latents, want = data[f"{name}/latents"], data[f"{name}/images"]
    common = dict(num_steps=run["steps"], guidance_scale=run["guidance"], scheduler=run["sampler"],
                  progress=False, jit_compile=False, mask=task_mask())  # fmt: skip
    latents = models["base"].generate(
        run["prompt"], run["negative"], image=task_image(run["seeds"][0] + 1), seed=run["seeds"][0],
        denoising_end=run["switch"], output_type="latent", **common,
    )  # fmt: skip
    images = models["refiner"].generate(
        run["prompt"], run["negative"], image=latents, seed=run["seeds"][1], denoising_start=run["switch"],
        output_type="float", **common,
    )  # fmt: skip
    err_latents, err = _max_err(latents, want_latents), _max_err(images, want)
    print(f"{name}: latents {err_latents:.2e}, images {err:.2e}")
    assert err_latents <= TOL and err <= TOL
    assert images.info.mode == "inpaint" and images.info.denoising_start == run["switch"]


def test_inpainting_handoff_refusals(models):
    latents = np.zeros((1, 8, 8, 4), np.float32)
    kwargs = dict(num_steps=2, progress=False, denoising_start=0.5)
    with pytest.raises(ValueError, match="an image in pixels cannot be continued"):
        models["refiner"].generate("a cat", image=task_image(0), mask=task_mask(), **kwargs)
    with pytest.raises(
        ValueError, match=r"mask size 8x8 \(WxH\) differs from the handed-over latents' image size 16x16"
    ):
        models["refiner"].generate("a cat", latents=latents, mask=np.ones((8, 8), np.float32), **kwargs)
    with pytest.raises(
        ValueError, match="9-channel UNet.*handed-over latents can be inpainted by a 4-channel"
    ):
        models["inpaint9"].generate("a cat", latents=latents, mask=task_mask(), **kwargs)


# ------------------------------------------------------------------ bad input


def test_sdxl_options_on_an_sd1_model_are_refused():
    from tf_diffusion import StableDiffusion
    from tf_diffusion.config import CLIPTextConfig, PipelineConfig, UNetConfig, VAEConfig

    micro = PipelineConfig(
        name="micro-sd1",
        text_encoder=CLIPTextConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        unet=UNetConfig(model_channels=8, channel_mult=(1,), attention_levels=(True,), num_heads=2, context_dim=16,
                        num_res_blocks=1, norm_groups=4),
        vae=VAEConfig(base_channels=8, channel_mult=(1,), num_res_blocks=1, norm_groups=4),
    )  # fmt: skip
    sd = StableDiffusion(micro)
    for options in ({"original_size": (64, 64)}, {}):
        with pytest.raises(ValueError, match="sdxl_options .*SDXL models only; micro-sd1"):
            sd.generate("a cat", num_steps=1, height=8, width=8, sdxl_options=options, progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"original_size": (0, 64)}, r"original_size=\(0, 64\) must be a pair \(height, width\) of positive"),
        ({"target_size": (64.0, 64)}, r"target_size=\(64.0, 64\) must be a pair"),
        ({"original_size": 64}, "original_size=64 must be a pair"),
        ({"crops_coords_top_left": (-1, 0)}, r"crops_coords_top_left=\(-1, 0\) .*non-negative integers"),
        ({"target_size": (True, 8)}, "target_size=.*positive integers"),
        ({"aesthetic_score": 6.0}, "aesthetic_score applies to SDXL refiners"),
        ({"orignal_size": (8, 8)}, r"unknown keys \['orignal_size'\]"),
    ],
)
def test_bad_micro_conditioning_is_named(options, message, models):
    with pytest.raises(ValueError, match=message):
        models["base"].generate(
            "a cat", num_steps=1, height=16, width=16, sdxl_options=options, progress=False
        )


def test_refiner_specific_errors(models):
    refiner = models["refiner"]
    kwargs = dict(num_steps=2, progress=False)
    with pytest.raises(ValueError, match="target_size does not apply to .*refiner"):
        refiner.generate("a cat", image=task_image(0), sdxl_options={"target_size": (8, 8)}, **kwargs)
    # Used as a base: no image and no latents to continue.
    with pytest.raises(ValueError, match="SDXL refiner .*pass image=.*latents=.*denoising_start"):
        refiner.generate("a cat", height=16, width=16, **kwargs)
    with pytest.raises(ValueError, match="denoising_start=0.5 continues a partly denoised image"):
        refiner.generate("a cat", height=16, width=16, denoising_start=0.5, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(denoising_end=1.0), r"denoising_end=1.0 must be a fraction strictly between 0 and 1"),
        (dict(denoising_end=0), "denoising_end=0 must be a fraction"),
        (
            dict(denoising_start=-0.2, latents=np.zeros((1, 2, 2, 4))),
            "denoising_start=-0.2 must be a fraction",
        ),
        (dict(denoising_start="0.5"), "denoising_start='0.5' must be a fraction"),
        (dict(denoising_start=0.8, denoising_end=0.5), "denoising_start=0.8 must be below denoising_end=0.5"),
        (dict(denoising_start=0.8, latents=np.zeros((1, 2, 2, 3))), r"\(N, h, w, 4\) NHWC"),
        (
            dict(denoising_start=0.8, latents=np.zeros((1, 2, 2, 4)), height=24),
            "differs from the handed-over",
        ),
        (dict(denoising_end=0.01), "denoising_end=0.01 with num_steps=2 leaves no denoising step"),
    ],
)
def test_bad_denoising_fractions_are_named(kwargs, message, models):
    with pytest.raises(ValueError, match=message):
        models["base"].generate("a cat", num_steps=2, **{"height": 16, "width": 16, **kwargs}, progress=False)


def test_latents_result_as_image_needs_denoising_start(models):
    import types

    from tf_diffusion.pipeline import GeneratedImages

    latents = GeneratedImages.wrap(
        np.zeros((1, 2, 2, 4), np.float32), types.SimpleNamespace(output_type="latent")
    )
    with pytest.raises(ValueError, match="image= holds latents .*needs denoising_start"):
        models["refiner"].generate("a cat", image=latents, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="as image=... or as latents=..., not both"):
        models["refiner"].generate(
            "a cat", image=latents, latents=latents, denoising_start=0.5, progress=False
        )


# ------------------------------------------------------------------ presets


def test_inpainting_and_turbo_presets():
    from tf_diffusion import PRESETS
    from tf_diffusion.families import family_of_config
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.weights import count_parameters
    from tf_diffusion.weights.state_dict import build_abstract

    inpaint, base = PRESETS["sdxl-inpainting-0.1"], PRESETS["sdxl-base-1.0"]
    assert inpaint.is_inpainting and inpaint.is_sdxl and family_of_config(inpaint).name == "sdxl-inpainting"
    assert inpaint.replace(name=base.name, unet=base.unet) == base
    # diffusers' UNet2DConditionModel of diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (in_channels 9):
    # the base's 2,567,463,684 and five more conv_in input channels (320 * 5 * 3 * 3).
    assert count_parameters(build_abstract(lambda: UNetModel(inpaint.unet))) == 2_567_463_684 + 320 * 5 * 9
    turbo = PRESETS["sd-turbo"]
    assert family_of_config(turbo).name == "sd2" and turbo.unet == PRESETS["sd-v2-1-base"].unet
    assert (turbo.scheduler.timestep_spacing, turbo.scheduler.prediction_type) == ("trailing", "epsilon")
    assert (turbo.default_steps, turbo.default_guidance, turbo.default_size) == (1, 0.0, 512)
    assert PRESETS["sdxl-turbo"].scheduler.timestep_spacing == "trailing"


def test_sdxl_inpainting_defaults_to_diffusers_strength(models, monkeypatch):
    """diffusers' StableDiffusionXLInpaintPipeline defaults to strength 0.9999 (one step short, from the
    noised image); SD 1/2 inpainting keeps 1.0 (tests/test_generate.py)."""
    from tf_diffusion.schedulers.base import Sampler

    seen = {}

    class Planned(Exception):
        pass

    def spy(self, num_steps, strength=1.0, **kw):
        seen["strength"] = strength
        raise Planned  # what the strength is, not the run, is what is tested here

    monkeypatch.setattr(Sampler, "plan", spy)
    for model in ("inpaint9", "base"):
        with pytest.raises(Planned):
            models[model].generate(
                "a cat", image=task_image(0), mask=task_mask(), num_steps=2, progress=False
            )
        assert seen.pop("strength") == 0.9999
    with pytest.raises(Planned):
        models["base"].generate("a cat", image=task_image(0), num_steps=2, progress=False)
    assert seen.pop("strength") == 0.8


# ------------------------------------------------------------------ PNG parameters and the CLI


def test_sdxl_parameters_round_trip_and_read_the_web_uis():
    from tf_diffusion.infotext import format_parameters, parse_parameters, parse_sdxl_fields, sdxl_fields

    options = {
        "original_size": (1024, 768),
        "crops_coords_top_left": (4, 0),
        "target_size": (512, 640),
        "aesthetic_score": 6.5,
        "negative_aesthetic_score": 2.0,
    }
    extra = sdxl_fields(
        refiner="sd_xl_refiner_1.0", refiner_hash="7440042bbd", refiner_switch_at=0.8, options=options
    )
    assert extra == {
        "Refiner": "sd_xl_refiner_1.0 [7440042bbd]",
        "Refiner switch at": 0.8,
        "Original size": "768x1024",
        "Target size": "640x512",
        "Crop top": 4,
        "Crop left": 0,
        "Aesthetic score": 6.5,
        "Negative aesthetic score": 2.0,
    }
    text = format_parameters(
        "a cat", steps=20, sampler="euler", cfg_scale=5, seed=1, width=16, height=16, extra=extra
    )
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Original size: 768x1024" in text
    back = parse_sdxl_fields(parse_parameters(text)["extra"])
    assert back == {
        "refiner": "sd_xl_refiner_1.0",
        "refiner_hash": "7440042bbd",
        "refiner_switch_at": 0.8,
        "options": options,
    }
    # As the web UI writes a refiner (its extra_generation_params), and no SDXL fields at all.
    webui = (
        "a cat\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 1024x1024, "
    )
    webui += "Model: sd_xl_base_1.0, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1"
    assert parse_sdxl_fields(parse_parameters(webui)["extra"]) == {
        "refiner": "sd_xl_refiner_1.0",
        "refiner_hash": "7440042bbd",
        "refiner_switch_at": 0.8,
        "options": {},
    }
    assert parse_sdxl_fields({}) == {"options": {}}
    for bad, message in [
        ({"Refiner switch at": "1.5"}, "Refiner switch at: 1.5 is not a fraction"),
        ({"Target size": "big"}, "Target size: 'big' is not WIDTHxHEIGHT"),
        ({"Crop top": "4"}, "come together"),
        ({"Aesthetic score": "high"}, "Aesthetic score: 'high' is not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sdxl_fields(bad)
    with pytest.raises(ValueError, match="refiner_switch_at=1.0 must be a fraction"):
        sdxl_fields(refiner="r", refiner_switch_at=1.0)
    with pytest.raises(ValueError, match=r"\['negative_target_size'\] have no parameters field"):
        sdxl_fields(options={"negative_target_size": (8, 8)})


@pytest.fixture
def cli_models(models, monkeypatch):
    """The CLI reads the fixture folders as the already-built models (loading is tested elsewhere)."""
    from tf_diffusion import StableDiffusion

    by_path = {
        str(SDXL / "sdxl-diffusers"): models["base"],
        str(SDXL / "sdxl-refiner-diffusers"): models["refiner"],
    }
    original = StableDiffusion.from_pretrained.__func__

    def cached(cls, source, **kwargs):
        return by_path[str(source)] if str(source) in by_path else original(cls, source, **kwargs)

    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(cached))
    return models


def test_cli_refiner_inpaints_through_the_hand_off(cli_models, tmp_path, monkeypatch):
    """--refiner with --mask: both stages inpaint under the mask, then the init pixels are pasted back
    outside it (--mask-blur, 4 by default), as generate(mask_blur=...) does."""
    from PIL import Image

    from tf_diffusion import StableDiffusion, cli
    from tf_diffusion.infotext import parse_parameters

    calls = []
    original = StableDiffusion.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "generate", spy)
    init, mask = task_image(3), task_mask()
    Image.fromarray(init).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "--model", str(SDXL / "sdxl-diffusers"), "--refiner"]
    argv += [
        str(SDXL / "sdxl-refiner-diffusers"),
        "--steps",
        "3",
        "--seed",
        "5",
        "--image",
        str(tmp_path / "in.png"),
    ]
    argv += ["--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--no-progress", "-o", str(out)]
    assert cli.main(argv) == 0
    base_kw, refiner_kw = calls
    assert base_kw["mask_blur"] is None and base_kw["output_type"] == "latent"
    assert refiner_kw["mask"] is not None and refiner_kw["denoising_start"] == 0.8
    with Image.open(out) as image:
        pixels, text = np.asarray(image), image.text["parameters"]
    kept = mask < 128  # a hard edge (blur 0): the init image's own pixels outside the mask
    np.testing.assert_array_equal(pixels[kept], init[kept])
    assert np.abs(pixels[~kept].astype(int) - init[~kept]).mean() > 5
    assert parse_parameters(text)["extra"]["Mask blur"] == "0"


def test_cli_refiner_writes_the_hand_off_and_its_parameters(cli_models, tmp_path, monkeypatch):
    from PIL import Image

    from tf_diffusion import StableDiffusion, cli
    from tf_diffusion.infotext import parse_parameters, parse_sdxl_fields

    calls = []
    original = StableDiffusion.generate

    def spy(self, *args, **kwargs):
        calls.append((self, kwargs))
        out = original(self, *args, **kwargs)
        calls[-1] += (out,)
        return out

    monkeypatch.setattr(StableDiffusion, "generate", spy)
    base_dir, refiner_dir = str(SDXL / "sdxl-diffusers"), str(SDXL / "sdxl-refiner-diffusers")
    out = tmp_path / "x.png"
    argv = ["generate", "a cat", "--model", base_dir, "--refiner", refiner_dir, "--steps", "3", "--seed", "5"]
    argv += [
        "--height",
        "16",
        "--width",
        "16",
        "--original-size",
        "48,32",
        "--crop",
        "4,2",
        "--target-size",
        "16,24",
    ]
    argv += ["--aesthetic-score", "7", "--no-progress", "-o", str(out)]
    assert cli.main(argv) == 0
    with Image.open(out) as image:
        pixels, text = np.asarray(image), image.text["parameters"]
    # The base to the switch, its latents to the refiner, each with the micro-conditioning it reads.
    (base, base_kw, latents), (refiner, refiner_kw, images) = calls
    assert base is cli_models["base"] and refiner is cli_models["refiner"]
    assert (base_kw["denoising_end"], base_kw["output_type"], base_kw["seed"]) == (0.8, "latent", 5)
    crop = {"original_size": (32, 48), "crops_coords_top_left": (4, 2)}
    assert base_kw["sdxl_options"] == {**crop, "target_size": (24, 16)}
    assert refiner_kw["image"] is latents and refiner_kw["denoising_start"] == 0.8
    assert refiner_kw["sdxl_options"] == {**crop, "aesthetic_score": 7.0}
    assert (refiner_kw["seed"], refiner_kw["num_steps"], refiner_kw["scheduler"]) == (5, 3, "euler")
    np.testing.assert_array_equal(pixels, images[0])
    parsed = parse_parameters(text)
    fields = parse_sdxl_fields(parsed["extra"])
    assert fields == {
        "refiner": refiner_dir,
        "refiner_switch_at": 0.8,
        "options": {**crop, "target_size": (24, 16), "aesthetic_score": 7.0},
    }
    assert (parsed["seed"], parsed["steps"], parsed["sampler"], parsed["cfg_scale"]) == (5, 3, "Euler", 5.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--original-size", "0,64"], "--original-size 0,64: must be W,H, two positive integers"),
        (["--crop", "4"], "--crop 4: must be TOP,LEFT, two non-negative integers"),
        (["--target-size", "8x8"], "--target-size 8x8: must be W,H"),
        (["--denoising-end", "0.8"], "--denoising-end applies with --refiner"),
        (["--refiner", "REFINER", "--denoising-end", "1.5"], "--denoising-end 1.5: must be a fraction"),
        (["--aesthetic-score", "6"], "--aesthetic-score applies to an SDXL refiner only"),
        (
            ["--model", "REFINER", "--image", "IMAGE", "--target-size", "8,8"],
            "--target-size does not apply to an SDXL",
        ),
        (["--model", "REFINER", "--refiner", "REFINER"], "--refiner needs an SDXL base as --model"),
    ],
)
def test_cli_sdxl_errors_name_the_option(extra, message, cli_models, tmp_path, capsys):
    from PIL import Image

    from tf_diffusion import cli

    Image.fromarray(task_image(0)).save(tmp_path / "in.png")
    names = {"REFINER": str(SDXL / "sdxl-refiner-diffusers"), "IMAGE": str(tmp_path / "in.png")}
    extra = [names.get(a, a) for a in extra]
    argv = ["generate", "a cat", "--model", str(SDXL / "sdxl-diffusers"), "--steps", "2", "--height", "16"]
    argv += ["--width", "16", "--no-progress", "-o", str(tmp_path / "o.png"), *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_sdxl_options_on_an_sd1_model(tmp_path, capsys):
    from tf_diffusion import cli

    argv = ["generate", "a cat", "--original-size", "64,64", "--steps", "1", "-o", str(tmp_path / "o.png")]
    assert cli.main(argv) == 2
    assert (
        "--original-size applies to SDXL models only; --model tiny-shapes is not one"
        in capsys.readouterr().err
    )
