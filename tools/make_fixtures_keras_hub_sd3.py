"""Write a tiny keras-hub ``StableDiffusion3Backbone`` preset and its outputs (the Keras anchor of SD3).

Written to tests/fixtures/sd3/keras_hub/:

* ``preset/``: ``backbone.save_to_preset`` of a tiny random backbone (config.json, metadata.json,
  model.weights.h5): a two-block MMDiT (patch 2, width 32, 2 heads, a 16-patch position table, no T5
  so the context is 4096 wide), a four-level 32-filter VAE with one encoder and two decoder ResNet
  blocks per level and a 16-channel latent, and two small CLIP text encoders (quick_gelu as CLIP-L,
  exact gelu as CLIP-G; penultimate outputs). The weights are keras-hub's own random ones (Keras
  initialisers, then every variable redrawn so that biases and norms are not trivially 0 / 1).
* ``preset_sharded/``: the same backbone saved with ``max_shard_size`` of 1 MB: ``config.json``,
  ``model.weights.json`` (Keras's shard map) and ``model_0000N.weights.h5`` shards, as keras-hub saves
  presets larger than its shard size (10 GB by default, so SD3.5 Large's is sharded).
* ``outputs.npz``: fixed inputs and keras-hub's outputs for them: the diffuser (MMDiT) call with
  latents, context, pooled projection and timestep; the VAE decode of the latents and the VAE
  encoder's moments (mean, log-variance) of an image; each CLIP
  encoder's intermediate output and projected pooled output for given token ids.
* ``same_weights.npz``: the same tiny weights in both anchors: the diffusers SD3 and SD3.5
  transformers of tests/fixtures/sd3 (``transformer_sd3.safetensors``, ``sd3-diffusers/transformer``;
  SD3.5's has RMS q/k norm and dual attention) put into keras-hub's ``MMDiT`` (the backbone's
  ``diffuser``) through the inverse of ``weights.keras_hub_sd3``'s rename, run on the inputs of
  tests/fixtures/sd3/reference.npz (``<name>_out``: keras-hub's output). The script checks that it is
  diffusers' output (``reference.npz``) within 1e-4 before writing it.

Usage (dev only; needs keras-hub, which tf_diffusion never imports):
    KERAS_BACKEND=tensorflow python tools/make_fixtures_keras_hub_sd3.py            # everything
    KERAS_BACKEND=tensorflow python tools/make_fixtures_keras_hub_sd3.py --sharded  # preset_sharded/ only
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_hub.models import CLIPTextEncoder, StableDiffusion3Backbone  # noqa: E402
from keras_hub.src.models.stable_diffusion_3.mmdit import MMDiT  # noqa: E402
from keras_hub.src.models.vae.vae_backbone import VAEBackbone  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "sd3" / "keras_hub"
SHARD_GB = 0.001  # 1 MB shards: the tiny backbone's 3 MB of weights in a few files


def build() -> StableDiffusion3Backbone:
    keras.utils.set_random_seed(0)
    vae = VAEBackbone(
        encoder_num_filters=[32, 32, 32, 32],
        encoder_num_blocks=[1, 1, 1, 1],
        decoder_num_filters=[32, 32, 32, 32],
        decoder_num_blocks=[2, 2, 2, 2],
        sample_channels=32,  # mean and log-variance of a 16-channel latent
        dtype="float32",
    )
    clip_l = CLIPTextEncoder(
        vocabulary_size=128, embedding_dim=16, hidden_dim=16, num_layers=2, num_heads=2,
        intermediate_dim=32, intermediate_activation="quick_gelu", intermediate_output_index=-2,
        name="clip_l", dtype="float32",
    )  # fmt: skip
    clip_g = CLIPTextEncoder(
        vocabulary_size=128, embedding_dim=32, hidden_dim=32, num_layers=2, num_heads=2,
        intermediate_dim=64, intermediate_activation="gelu", intermediate_output_index=-2,
        name="clip_g", dtype="float32",
    )  # fmt: skip
    backbone = StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=32, mmdit_num_layers=2, mmdit_num_heads=2,
        mmdit_position_size=16, mmdit_qk_norm=None, mmdit_dual_attention_indices=None,
        vae=vae, clip_l=clip_l, clip_g=clip_g, image_shape=(64, 64, 3), dtype="float32",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        # Redraw everything (Keras zeros biases and sets norms to one): every weight must reach our model.
        value = rng.standard_normal(variable.shape).astype("float32")
        if len(variable.shape) > 1:
            value /= np.sqrt(np.prod(variable.shape[:-1]))
        else:
            value = (1.0 if variable.path.endswith("gamma") else 0.0) + 0.1 * value
        variable.assign(value)
    return backbone


def same_weights() -> dict[str, np.ndarray]:
    """keras-hub's MMDiT with the diffusers fixtures' transformer weights, on reference.npz's inputs."""
    import json
    import sys
    import tempfile

    import h5py

    sys.path.insert(0, str(ROOT))
    from tf_diffusion.weights import keras_hub_sd3 as khsd3
    from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers
    from tf_diffusion.weights.safetensors_io import load_safetensors

    # The inverse of each layout transform of the rename (PyTorch -> Keras).
    inverse = {
        khsd3._dense: lambda w: w.T,
        khsd3._conv: lambda w: w.transpose(2, 3, 1, 0),
        khsd3._pos_embed: lambda w: w[0],
        khsd3._plain: lambda w: w,
    }
    sd3 = ROOT / "tests" / "fixtures" / "sd3"
    ref = np.load(sd3 / "reference.npz")
    files = {
        "sd3": (sd3 / "transformer_sd3.json", sd3 / "transformer_sd3.safetensors"),
        "sd35": (
            sd3 / "sd3-diffusers" / "transformer" / "config.json",
            sd3 / "sd3-diffusers" / "transformer" / "diffusion_pytorch_model.safetensors",
        ),
    }
    out = {}
    for name, (config_file, weights) in files.items():
        cfg = mmdit_config_from_diffusers(json.loads(config_file.read_text()))
        original = convert_diffusers_mmdit(dict(load_safetensors(weights)), cfg)
        latents = ref[f"{name}_latents"]
        model = MMDiT(
            cfg.patch_size, cfg.inner_dim, cfg.num_layers, cfg.num_attention_heads, cfg.pos_embed_max_size,
            latent_shape=latents.shape[1:], context_shape=(None, cfg.joint_attention_dim),
            pooled_projection_shape=(cfg.pooled_projection_dim,), qk_norm=cfg.qk_norm,
            dual_attention_indices=cfg.dual_attention_layers or None, dtype="float32",
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/mmdit.weights.h5"
            model.save_weights(path)
            entries = khsd3.mmdit_entries(cfg)
            assert {ours for _, ours, _ in entries} == set(original), "the rename does not cover the weights"
            with h5py.File(path, "r+") as h5:
                for h5_path, ours, transform in entries:
                    dataset = h5[f"layers/{h5_path}"]
                    value = inverse[transform](np.asarray(original[ours], "float32"))
                    assert dataset.shape == value.shape, (h5_path, dataset.shape, value.shape)
                    dataset[...] = value
            model.load_weights(path)
        velocity = np.asarray(
            model(
                {
                    "latent": latents,
                    "context": ref[f"{name}_context"],
                    "pooled_projection": ref[f"{name}_pooled"],
                    "timestep": ref[f"{name}_timesteps"][:, None],
                }
            )
        )
        error = float(np.abs(velocity - ref[f"{name}_out"]).max())
        print(f"{name}: keras-hub MMDiT with the diffusers weights vs diffusers: max abs {error:.2e}")
        assert error < 1e-4, error
        out[f"{name}_out"] = velocity
    return out


def main() -> None:
    backbone = build()
    if "--sharded" in sys.argv[1:]:
        shutil.rmtree(OUT / "preset_sharded", ignore_errors=True)
        backbone.save_to_preset(str(OUT / "preset_sharded"), max_shard_size=SHARD_GB)
        print("wrote", sorted(p.name for p in (OUT / "preset_sharded").iterdir()))
        return
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    backbone.save_to_preset(str(OUT / "preset"))
    backbone.save_to_preset(str(OUT / "preset_sharded"), max_shard_size=SHARD_GB)

    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 8, 8, 16)).astype("float32")
    context = rng.standard_normal((2, 5, 4096)).astype("float32")
    pooled = rng.standard_normal((2, 48)).astype("float32")
    timestep = np.array([[999.0], [412.5]], "float32")
    velocity = backbone.diffuser(
        {"latent": latents, "context": context, "pooled_projection": pooled, "timestep": timestep}
    )
    decode_latents = (0.5 * rng.standard_normal((1, 4, 6, 16))).astype("float32")
    image = backbone.vae.decode(decode_latents)
    # The encoder's moments (mean and log-variance): keras-hub's encode() draws a sample from them.
    encode_images = rng.uniform(-1, 1, (1, 16, 24, 3)).astype("float32")
    moments = backbone.vae.encoder(encode_images)
    # Token ids whose largest id marks the end of each prompt (keras-hub pools at the argmax, as CLIP).
    token_ids = rng.integers(1, 100, (2, 77)).astype("int32")
    token_ids[0, 7], token_ids[1, 30] = 127, 127
    outputs = {}
    for name, encoder, projection in (
        ("clip_l", backbone.clip_l, backbone.clip_l_projection),
        ("clip_g", backbone.clip_g, backbone.clip_g_projection),
    ):
        out = encoder({"token_ids": token_ids})
        outputs[f"{name}_hidden"] = np.asarray(out["intermediate_output"])
        outputs[f"{name}_pooled"] = np.asarray(projection(out["sequence_output"], token_ids))
    np.savez(
        OUT / "outputs.npz",
        latents=latents, context=context, pooled=pooled, timestep=timestep,
        velocity=np.asarray(velocity), decode_latents=decode_latents, image=np.asarray(image),
        encode_images=encode_images, moments=np.asarray(moments),
        token_ids=token_ids, **outputs,
    )  # fmt: skip
    np.savez(OUT / "same_weights.npz", **same_weights())
    print("wrote", sorted(p.name for p in OUT.rglob("*")))


if __name__ == "__main__":
    main()
