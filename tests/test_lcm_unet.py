"""LCM-distilled UNets (``time_cond_proj_dim``): the guidance scale as an embedding, equal to diffusers.

diffusers' ``UNet2DConditionModel`` with ``time_cond_proj_dim`` adds ``time_embedding.cond_proj`` of the
guidance embedding (``get_guidance_scale_embedding``) to the timestep sinusoid; a tiny random one is built
here by diffusers, converted by our diffusers-folder converter and compared in float32.
"""

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
    time_cond_proj_dim=16,
)


def _reference_embedding(w, dim):
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(w), embedding_dim=dim
    )


@pytest.mark.parametrize("dim", [16, 256, 7])
def test_guidance_embedding_equals_diffusers(dim):
    from tf_diffusion.unet import guidance_embedding

    w = np.array([0.0, 1.0, 3.5, 7.0], np.float32)  # guidance scales 1 to 8
    ours = np.asarray(guidance_embedding(w, dim))
    want = _reference_embedding(w, dim).numpy()
    assert ours.shape == want.shape
    # 1000 * w puts the sinusoid's argument in the thousands, where one float32 rounding step of the
    # frequency (exp differs by an ulp between libraries) moves it by about 1e-4 rad.
    err = float(np.abs(ours - want).max())
    print(f"guidance embedding, dim {dim}: max abs error {err:.2e}")
    assert err <= 1e-3


def test_lcm_unet_equals_diffusers():
    from diffusers import UNet2DConditionModel

    from tf_diffusion.unet import UNetModel, guidance_embedding
    from tf_diffusion.weights import load_state_dict
    from tf_diffusion.weights.diffusers_unet import (
        convert_diffusers_unet_state_dict,
        unet_config_from_diffusers,
    )

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make the projection matter
        ref.time_embedding.cond_proj.weight.normal_(0, 0.5)
    config = unet_config_from_diffusers(dict(ref.config))
    assert config.time_cond_proj_dim == 16
    ours = UNetModel(config)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    converted = convert_diffusers_unet_state_dict(tensors, config)
    assert "time_cond_proj.weight" in converted
    load_state_dict(ours, converted)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    t = np.array([999, 259], np.int64)
    w = np.array([7.5 - 1, 2.0 - 1], np.float32)
    with torch.no_grad():
        want = (
            ref(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                torch.from_numpy(t),
                torch.from_numpy(ctx),
                timestep_cond=_reference_embedding(w, 16),
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )
    got = np.asarray(ours(x, t, ctx, timestep_cond=guidance_embedding(w, 16)))
    err = float(np.abs(got - want).max())
    print(f"LCM UNet max abs error {err:.2e} (outputs up to {np.abs(want).max():.2f})")
    assert err <= 1e-4
    # the guidance is an input: another scale, another output
    other = np.asarray(ours(x, t, ctx, timestep_cond=guidance_embedding(w + 3.0, 16)))
    assert np.abs(other - got).max() > 1e-3
    with pytest.raises(ValueError, match="LCM-distilled .* pass timestep_cond"):
        ours(x, t, ctx)


def test_generate_with_an_lcm_unet_equals_diffusers(tmp_path):
    """A diffusers folder with an LCM-distilled UNet and LCMScheduler: StableDiffusionPipeline (which turns
    guidance into timestep_cond and drops the unconditional pass) against generate(), every random draw
    the same (the scheduler's re-noising fed from tf_diffusion.noise)."""
    import json

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.schedulers import scheduling_lcm
    from test_pipeline_parity import build

    from tf_diffusion import noise as noise_lib
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.schedulers import get_sampler

    fixtures = pathlib.Path(__file__).parent / "fixtures" / "pipeline"
    folder = build(fixtures, False, "epsilon").save_pretrained(tmp_path / "tiny", format="diffusers")
    base = UNet2DConditionModel.from_pretrained(folder / "unet")
    torch.manual_seed(1)
    lcm = UNet2DConditionModel(**{**dict(base.config), "time_cond_proj_dim": 32})
    missing = lcm.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing == ["time_embedding.cond_proj.weight"]
    with torch.no_grad():
        lcm.time_embedding.cond_proj.weight.normal_(0, 0.3)
    lcm.save_pretrained(folder / "unet")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "LCMScheduler"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))

    sd = StableDiffusion.from_pretrained(folder)
    assert sd.config.unet.time_cond_proj_dim == 32 and sd.config.default_sampler == "lcm"
    size, steps, scale, seed = sd.config.default_size, 4, 6.0, 12
    shape = (
        size // 2 ** (len(sd.config.vae.channel_mult) - 1),
        size // 2 ** (len(sd.config.vae.channel_mult) - 1),
        4,
    )
    seeds = [seed]
    noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
    plan = get_sampler("lcm", sd.config.scheduler).plan(steps)
    per_step = noise_lib.batch_normal(seeds, noise_lib.STEPS, (plan.num_evals, *shape))[0]  # (E, h, w, C)
    ours = sd.generate("a red circle", num_steps=steps, guidance_scale=scale, seed=seed, output_type="float",
                       progress=False, jit_compile=False)  # fmt: skip

    draws = iter(per_step)
    real = scheduling_lcm.randn_tensor

    def our_noise(shape, generator=None, device=None, dtype=None):
        return torch.from_numpy(np.ascontiguousarray(next(draws).transpose(2, 0, 1))[None]).to(dtype)

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    scheduling_lcm.randn_tensor = our_noise
    try:
        want = pipe(
            "a red circle",
            num_inference_steps=steps,
            guidance_scale=scale,
            latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images
    finally:
        scheduling_lcm.randn_tensor = real
    err = float(np.abs(np.asarray(ours) - want).max())
    print(f"LCM pipeline max abs error {err:.2e}")
    assert err <= 1e-3
