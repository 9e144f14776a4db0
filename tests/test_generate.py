"""generate(): reproducibility, loop modes, input conversion and input errors, on a micro model.

Numerical parity with diffusers lives in test_pipeline_parity.py; these tests check the
driver's contract.
"""

import numpy as np
import pytest

from tf_diffusion import execution
from tf_diffusion import noise as noise_lib
from tf_diffusion.config import CLIPTextConfig, PipelineConfig, UNetConfig, VAEConfig

MICRO = PipelineConfig(
    name="micro",
    text_encoder=CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        attention_levels=(True, False),
        num_heads=4,
        context_dim=32,
        num_res_blocks=1,
    ),
    vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
    default_size=32,
)


@pytest.fixture(scope="module")
def sd():
    import keras

    from tf_diffusion.pipeline import StableDiffusion

    keras.utils.set_random_seed(0)  # the same random weights in every run
    return StableDiffusion(MICRO)


def run(sd, prompt="a red circle", **kwargs):
    kwargs.setdefault("num_steps", 3)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("scheduler", "ddim")
    if "execution" not in kwargs:
        # Graph mode unless a test asks for more: on a CPU an XLA compile of each new program costs
        # seconds; the tests of the default choice pass jit_compile=None.
        kwargs.setdefault("jit_compile", False)
    if "latents" not in kwargs:
        kwargs.setdefault("seed", 0)
    return sd.generate(prompt, **kwargs)


def test_uint8_output_and_batch_layout(sd):
    images = run(sd, ["a", "b"], num_images=2)
    assert images.dtype == np.uint8 and images.shape == (4, 32, 32, 3)
    pil = sd.to_pil(images)
    assert len(pil) == 4 and pil[0].size == (32, 32)


def test_sizes_need_only_be_multiples_of_the_vae_factor(sd):
    # 34 px -> 17 latents, odd for the UNet's downsampling: upsampled back to the skip sizes as diffusers does.
    assert run(sd, height=34, width=30).shape == (1, 34, 30, 3)


def test_same_seed_same_image_other_seed_differs(sd):
    a = run(sd, seed=7, output_type="float")
    b = run(sd, seed=7, output_type="float")
    c = run(sd, seed=8, output_type="float")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_latents_replace_seeded_noise(sd):
    # The VAE of MICRO halves each side: 32 px -> 16 latents, taken from its config.
    noise = noise_lib.batch_normal([5], noise_lib.LATENTS, (16, 16, 4))
    from_latents = run(sd, latents=noise, output_type="float")
    from_seed = run(sd, seed=5, output_type="float")
    np.testing.assert_allclose(from_latents, from_seed, atol=1e-6)
    assert run(sd, seed=5, output_type="latent").shape == (1, 16, 16, 4)


# ddim and heun run in the slow step (the same loop; euler_a and dpmpp_2m_karras cover noise and history).
@pytest.mark.parametrize(
    "scheduler",
    [
        pytest.param("ddim", marks=pytest.mark.slow),
        "euler_a",
        "dpmpp_2m_karras",
        pytest.param("heun", marks=pytest.mark.slow),
    ],
)
def test_fused_loop_equals_stepwise(sd, scheduler):
    stepwise = run(sd, scheduler=scheduler, fused=False, output_type="latent")
    fused = run(sd, scheduler=scheduler, fused=True, output_type="latent")
    # Same math; traces for other batch sizes may pick other float32 kernels (~3e-5 apart).
    np.testing.assert_allclose(fused, stepwise, atol=1e-4)


def test_callback_sees_every_step(sd):
    seen = []
    run(sd, num_steps=4, callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] > seen[-1][1] and seen[0][2] == (1, 16, 16, 4)


def test_guidance_one_ignores_the_negative_prompt(sd):
    a = run(sd, guidance_scale=1.0, negative_prompt="blue", output_type="float")
    b = run(sd, guidance_scale=1.0, negative_prompt="green", output_type="float")
    np.testing.assert_array_equal(a, b)
    c = run(sd, guidance_scale=7.5, negative_prompt="blue", output_type="float")
    d = run(sd, guidance_scale=7.5, negative_prompt="green", output_type="float")
    assert np.abs(c - d).max() > 1e-4


def test_empty_long_and_weighted_prompts(sd):
    assert run(sd, "").shape == (1, 32, 32, 3)
    long = " ".join(["cat"] * 120)
    assert run(sd, long).shape == (1, 32, 32, 3)
    # Latents: decoded pixels of random weights may clip to the same values.
    plain = run(sd, "a red circle", output_type="latent")
    weighted = run(sd, "a (red:1.6) circle", output_type="latent")
    assert np.abs(plain - weighted).max() > 1e-4


def test_plain_prompt_encoding_is_plain_clip(sd):
    ids = sd.tokenizer(["a red circle"])
    direct = np.asarray(sd.text_encoder(ids))
    np.testing.assert_array_equal(sd.encode_prompts(["a red circle"]), direct)


def test_img2img_converts_rgba_gray_and_16_bit(sd):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    base = run(sd, image=rgb, strength=0.7, output_type="float")
    np.testing.assert_allclose(run(sd, image=rgba, strength=0.7, output_type="float"), base, atol=1e-6)
    rgb16 = rgb.astype(np.uint16) * 257  # the same picture in 16 bits
    np.testing.assert_allclose(run(sd, image=rgb16, strength=0.7, output_type="float"), base, atol=1e-5)
    gray = rgb[..., 0]
    assert run(sd, image=gray, strength=0.7).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_inpainting_keeps_the_unmasked_latents(sd, scheduler):
    """The unmasked latents end exactly at the image's own (diffusers' blend); the masked ones follow the prompt."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255  # repaint the right half: latent columns 8 and up (VAE factor 2)
    common = dict(image=image, mask=mask, output_type="latent", scheduler=scheduler, seed=3)
    a = run(sd, "a red circle", **common)
    b = run(sd, "a blue star on the left", **common)
    assert a.shape == (1, 16, 16, 4)
    np.testing.assert_allclose(a[:, :, :8], b[:, :, :8], atol=1e-5)  # the image's posterior sample
    assert np.abs(a[:, :, 8:] - b[:, :, 8:]).mean() > 1e-3  # repainted from each prompt
    pixels = run(sd, "a red circle", image=image, mask=mask, output_type="float", scheduler=scheduler, seed=3)
    assert pixels.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=33), "height=33"),
        (dict(width=31), "width=31"),
        (dict(num_steps=0), "num_steps"),
        (dict(image=np.zeros((32, 32, 3), np.uint8), strength=1.5), "strength"),
        (dict(image=np.zeros((32, 32, 3), np.uint8), mask=np.zeros((16, 16), np.uint8)), "mask size"),
        (dict(latents=np.zeros((1, 16, 16, 4), np.float32)), "seed or latents|not both"),
        (dict(negative_prompt=["x", "y"]), "negative_prompt"),
        (dict(scheduler="nope"), "unknown sampler"),
        (dict(output_type="png"), "output_type"),
        (dict(num_images=0), "num_images"),
        (dict(image=np.zeros((32, 32, 3), np.uint8), height=64), "differs from the image"),
    ],
)
def test_bad_input_raises_value_error(sd, kwargs, match):
    kwargs = dict(kwargs)
    seed = 0 if "latents" in kwargs else kwargs.pop("seed", 0)
    with pytest.raises(ValueError, match=match):
        sd.generate("a", seed=seed, num_steps=kwargs.pop("num_steps", 2), progress=False, **kwargs)


def test_prompt_must_be_text(sd):
    with pytest.raises(ValueError, match="prompt"):
        sd.generate(42, seed=0, num_steps=2, progress=False)


def test_mixed_bfloat16_generates_close_to_float32(sd):
    import keras

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights import load_state_dict, state_dict

    mixed = StableDiffusion(MICRO, dtype="mixed_bfloat16")
    for ours, theirs in ((mixed.text_encoder, sd.text_encoder), (mixed.unet, sd.unet), (mixed.vae, sd.vae)):
        load_state_dict(ours, state_dict(theirs))
    assert mixed.unet.input_blocks[1][0].in_layers[2].compute_dtype == "bfloat16"
    assert mixed.unet.input_blocks[1][0].in_layers[0].compute_dtype == "float32"  # GroupNorm
    full = run(sd, output_type="float")
    low = run(mixed, output_type="float")
    assert np.isfinite(low).all()
    assert np.abs(low - full).max() < 0.25
    del keras


def test_bfloat16_weights_generate_what_mixed_bfloat16_generates(sd):
    """dtype="bfloat16" stores the weights in bfloat16 (half of float32's memory) and computes what
    "mixed_bfloat16" computes, which keeps float32 weights and casts each one to bfloat16 where it is used."""
    from tf_diffusion.layers import GroupNorm, LayerNorm
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights import load_state_dict, named_parameters, state_dict

    images = {}
    for policy in ("mixed_bfloat16", "bfloat16"):
        model = StableDiffusion(MICRO, dtype=policy)
        for ours, theirs in (
            (model.text_encoder, sd.text_encoder),
            (model.unet, sd.unet),
            (model.vae, sd.vae),
        ):
            load_state_dict(ours, state_dict(theirs))
        images[policy] = run(model, output_type="float")
    for component in (model.text_encoder, model.unet, model.vae):
        for key, (layer, attribute) in named_parameters(component).items():
            norm = isinstance(layer, (GroupNorm, LayerNorm))
            assert getattr(layer, attribute).dtype == ("float32" if norm else "bfloat16"), key
    assert np.isfinite(images["bfloat16"]).all()
    np.testing.assert_array_equal(images["bfloat16"], images["mixed_bfloat16"])


def test_float16_vae_decode_never_overflows():
    from tf_diffusion.pipeline import StableDiffusion

    half = StableDiffusion(MICRO, dtype="mixed_float16")
    assert half.unet.input_blocks[1][0].in_layers[2].compute_dtype == "float16"
    # As diffusers' force_upcast: the VAE stays float32 when the rest is float16.
    assert half.vae.decoder.conv_in.compute_dtype == "float32"
    # Latents far outside the usual range push float16 activations past 65504.
    latents = np.full((1, 16, 16, 4), 3000.0, np.float32)
    decoded = half.decode(latents)
    assert np.isfinite(decoded).all()


def test_xla_fused_loop_matches_graph_mode(sd):
    # One XLA program for the whole loop (tf.function(jit_compile=True) over ops.fori_loop).
    xla = run(sd, scheduler="dpmpp_2m_karras", fused=True, jit_compile=True, output_type="latent")
    graph = run(sd, scheduler="dpmpp_2m_karras", fused=False, jit_compile=False, output_type="latent")
    # XLA fuses and reorders float32 arithmetic; measured ~2e-4 on latents of scale ~1.
    np.testing.assert_allclose(xla, graph, atol=1e-3)


def test_default_compilation_on_cpu(monkeypatch):
    """float32 on a CPU runs under XLA (faster there), step by step whatever the progress bar, so
    switching the bar compiles nothing new; a bfloat16 model on a CPU stays in graph mode."""
    from tf_diffusion.execution import compiling
    from tf_diffusion.pipeline import StableDiffusion

    # The choice as a fresh process makes it (late in a long suite the mapping headroom is used up).
    monkeypatch.setattr(compiling, "_mapping_share", lambda: 0.0)

    sd = StableDiffusion(MICRO)
    run(sd, scheduler="euler", jit_compile=None)
    assert sd.executor.last_run == {"compile": "xla", "fused": False}
    traces = sd.executor.traces
    run(sd, scheduler="euler", progress=True, jit_compile=None)
    assert sd.executor.last_run == {"compile": "xla", "fused": False}
    assert sd.executor.traces == traces  # same shapes, bar on: the same compiled step

    # Above 32x32 latents (this micro model: images above 64x64), graph mode with XLA islands
    # (run end to end in the slow test below).
    assert execution.default_options(sd.unet, (1, 36, 36, 4)).compile == "islands"
    assert execution.default_options(sd.unet, (1, 32, 32, 4)).compile == "xla"

    half = StableDiffusion(MICRO, dtype="bfloat16")
    run(half, scheduler="euler", jit_compile=None)
    assert half.executor.last_run == {"compile": "graph", "fused": False}


@pytest.mark.slow
def test_default_compilation_above_32x32_latents_runs_islands():
    from tf_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion(MICRO)
    big = run(sd, scheduler="euler", height=72, width=72, output_type="latent", jit_compile=None)
    assert sd.executor.last_run["compile"] == "islands"
    graph = run(sd, scheduler="euler", height=72, width=72, output_type="latent", jit_compile=False)
    np.testing.assert_allclose(big, graph, atol=1e-3)  # XLA rounding, as in the test above


# txt2img in the slow step: img2img and inpaint run the same loop with more inputs.
@pytest.mark.parametrize("mode", [pytest.param("txt2img", marks=pytest.mark.slow), "img2img", "inpaint"])
def test_one_trace_per_shape(sd, mode):
    """The first call of each task traces its step once (not once per step); the next call with other
    prompts, seeds and guidance none; another step count at most once more (then for any count)."""
    from tf_diffusion.pipeline import StableDiffusion

    fresh = StableDiffusion(MICRO)
    rng = np.random.default_rng(0)
    kwargs = {}
    if mode != "txt2img":
        kwargs["image"] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    if mode == "inpaint":
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        kwargs["mask"] = mask
    run(fresh, scheduler="euler_a", num_steps=4, progress=True, **kwargs)
    assert fresh.executor.traces == 1
    run(fresh, "another prompt", scheduler="euler_a", num_steps=4, guidance_scale=3.0, seed=9, **kwargs)
    assert fresh.executor.traces == 1
    run(fresh, scheduler="euler_a", num_steps=6, **kwargs)
    run(fresh, scheduler="euler_a", num_steps=5, **kwargs)
    assert fresh.executor.traces <= 2


# txt2img in the slow step: inpainting is the task that once recompiled per step.
@pytest.mark.parametrize("mode", [pytest.param("txt2img", marks=pytest.mark.slow), "inpaint"])
def test_xla_compiles_one_program_for_every_step(sd, monkeypatch, mode):
    """Under XLA the step index is data: evaluations 0 and 2 are the same compiled program. (An op that
    needs the index as a constant, a slice at the index, would make XLA compile once per step.)"""
    import tensorflow as tf

    from tf_diffusion import execution

    calls = []
    real = execution.compile

    def spy(fn, options):
        compiled = real(fn, options)

        def wrapper(*args, **kwargs):
            calls.append((compiled, args, kwargs))
            return compiled(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(execution, "compile", spy)
    kwargs = {}
    if mode == "inpaint":
        kwargs["image"] = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        kwargs["mask"] = np.zeros((32, 32), np.uint8)
        kwargs["mask"][8:24, 8:24] = 255
    fresh = type(sd)(MICRO)
    run(fresh, scheduler="euler_a", num_steps=3, jit_compile=True, **kwargs)
    steps = [c for c in calls if len(c[1]) == 4 and tuple(c[1][0].shape) == ()]  # step(i, x, state, inputs)
    assert len(steps) == 3
    step, args, extra = steps[0]

    def hlo(i):
        text = step.experimental_get_compiler_ir(tf.constant(i, tf.int32), *args[1:], **extra)(stage="hlo")
        return text.split("\n", 1)[1]  # past the module name

    assert hlo(0) == hlo(2)


def test_each_image_is_reproduced_alone_from_its_seed(sd):
    """Image b of a batch with seed s is the image of seed s + b generated alone (as A1111 numbers them)."""
    batch = run(
        sd, ["a red circle", "a blue star"], num_images=2, seed=40, output_type="float", scheduler="euler_a"
    )
    assert batch.info.seeds == (40, 41, 42, 43)
    assert batch.info.prompts == ("a red circle", "a red circle", "a blue star", "a blue star")
    for b, (prompt, seed) in enumerate(zip(batch.info.prompts, batch.info.seeds, strict=True)):
        alone = run(sd, prompt, seed=seed, output_type="float", scheduler="euler_a")
        np.testing.assert_allclose(alone[0], batch[b], atol=2e-5)


def test_generate_reports_what_it_did(sd):
    image = np.zeros((32, 32, 3), np.uint8)
    out = run(sd, "a red circle", image=image, strength=0.5, num_steps=4, scheduler="ddim", seed=3)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (1, 32, 32, 3)
    info = out.info
    assert (info.mode, info.seeds, info.sampler, info.num_steps, info.num_evals) == (
        "img2img",
        (3,),
        "ddim",
        4,
        2,
    )
    assert (info.strength, info.height, info.width, info.model) == (0.5, 32, 32, "micro")
    assert info.sampler_options == {"eta": 0.0}
    drawn = run(sd, "a red circle", seed=None)
    assert len(drawn.info.seeds) == 1 and 0 <= drawn.info.seeds[0] < 2**32
    again = run(sd, "a red circle", seed=drawn.info.seeds[0])
    np.testing.assert_array_equal(again, drawn)
    assert type(np.asarray(out)) is np.ndarray


@pytest.mark.parametrize("progress", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_islands_with_prepared_filters_match_graph_mode(monkeypatch, progress):
    # generate() transforms the filters once per call (execution.prepare) and passes them to the
    # compiled loop (fused) or step (progress bar); forced onto this micro model's 36x36 level.
    from tf_diffusion import execution
    from tf_diffusion.pipeline import StableDiffusion

    def choose(op, key, names):  # F(4) where the sizes allow; its ResBlocks with prepared filters
        if op == "conv3x3":
            return "f4" if "f4" in names else "direct"
        if op == "resblock":
            return "prepared" if key[6] == 4 else "island"
        return names[-1]

    opts = execution.ExecutionOptions(
        compile="islands", winograd=True, graph_matmuls=True, prepared_filters=True, choose=choose
    )
    sd = StableDiffusion(MICRO)
    prepared = []
    original = execution.prepare
    monkeypatch.setattr(execution, "prepare", lambda *args: prepared.append(original(*args)) or prepared[-1])
    kwargs = dict(scheduler="dpmpp_2m_karras", height=72, width=72, output_type="latent")
    islands = run(sd, progress=progress, execution=opts, **kwargs)
    assert prepared and prepared[-1]
    assert any(
        name.startswith("mid_4_36x36") for name in execution.island_names(sd.unet.input_blocks[1][0], opts)
    )
    graph = run(sd, jit_compile=False, **kwargs)
    np.testing.assert_allclose(islands, graph, atol=1e-3)
    with pytest.raises(ValueError, match="either jit_compile or execution"):
        run(sd, jit_compile=True, execution=opts, **kwargs)
    with pytest.raises(ValueError, match=r"jit_compile='islands' must be True, False or None"):
        run(sd, jit_compile="islands", **kwargs)


def test_mask_blur_keeps_the_unmasked_pixels(sd):
    """With mask_blur (A1111's paste-back) the area far from the mask is the init image exactly; without
    it (diffusers' behaviour) the decode changes it."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[10:22, 10:22] = 255
    kwargs = dict(image=image, mask=mask, scheduler="euler", seed=2)
    pasted = run(sd, mask_blur=2, **kwargs)
    plain = run(sd, **kwargs)
    far = np.ones((32, 32), bool)
    far[4:28, 4:28] = False  # more than 3 blur radii from the mask's edge
    assert np.abs(pasted[0][far].astype(int) - image[far]).max() <= 1
    assert np.abs(plain[0][far].astype(int) - image[far]).mean() > 5
    inside = np.zeros((32, 32), bool)
    inside[15:17, 15:17] = True  # where the blurred mask is still 255
    np.testing.assert_array_equal(pasted[0][inside], plain[0][inside])
    assert pasted.info.mask_blur == 2.0
    with pytest.raises(ValueError, match="mask_blur"):
        run(sd, mask_blur=2)
    with pytest.raises(ValueError, match="mask_blur"):
        run(sd, mask_blur=-1, **kwargs)
