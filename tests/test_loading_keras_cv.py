"""keras-cv StableDiffusion .h5 weights load into our components and reproduce keras-cv's outputs.

keras-cv builds its SD models at full size only, so the default tests build miniature
keras-cv models from keras-cv's own blocks (ResBlock, SpatialTransformer, ResnetBlock,
AttentionBlock, CLIPEncoderLayer, ...) in exactly the order its DiffusionModel, Decoder,
ImageEncoder and TextEncoder create them, save them in both h5 layouts (Keras 2 style
``save_weights("x.h5")``, as keras-cv's released files; Keras 3 ``x.weights.h5``), read them
with tf_diffusion (h5py only) and compare outputs with keras-cv's on the same inputs.

Two keras-cv deviations from the original numerics are aligned in the tests, so outputs
can be compared at 1e-4: its GEGLU uses the tanh gelu approximation (patched to the exact
gelu here), and its VAE / transformer GroupNorms use eps 1e-5 (our configs take eps, so the
tiny configs use 1e-5). The full-size models run in ``test_full_size_keras_cv_models``,
which needs ~6 GB of memory and a few minutes: set TF_DIFFUSION_SLOW_TESTS=1.
"""

import os

import numpy as np
import pytest

pytest.importorskip("keras_cv")

import keras  # noqa: E402
from keras_cv.src.models.stable_diffusion import diffusion_model as kcv_unet  # noqa: E402
from keras_cv.src.models.stable_diffusion.attention_block import AttentionBlock  # noqa: E402
from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D  # noqa: E402
from keras_cv.src.models.stable_diffusion.resnet_block import ResnetBlock  # noqa: E402
from keras_cv.src.models.stable_diffusion.text_encoder import (  # noqa: E402
    CLIPEmbedding,
    CLIPEncoderLayer,
    quick_gelu,
)

from tf_diffusion.clip import CLIPTextEncoder  # noqa: E402
from tf_diffusion.config import CLIPTextConfig, UNetConfig, VAEConfig  # noqa: E402
from tf_diffusion.unet import UNetModel, timestep_embedding  # noqa: E402
from tf_diffusion.vae import AutoencoderKL  # noqa: E402
from tf_diffusion.weights import keras_cv as reader  # noqa: E402
from tf_diffusion.weights.state_dict import load_state_dict  # noqa: E402

TOL = 1e-4
SCALE = 0.18215


@pytest.fixture
def exact_geglu(monkeypatch):
    """keras-cv's GEGLU with the exact (erf) gelu of the original, so outputs are comparable."""

    def call(self, inputs):
        x = self.dense(inputs)
        x, gate = x[..., : self.output_dim], x[..., self.output_dim :]
        return x * keras.ops.gelu(gate, approximate=False)

    monkeypatch.setattr(kcv_unet.GEGLU, "call", call)


def save_both(model, folder, name):
    """The model's weights in the legacy (keras-cv's files) and Keras 3 h5 layouts."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    legacy = folder / f"{name}.h5"
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    modern = folder / f"{name}.weights.h5"
    model.save_weights(modern)
    return {"legacy": legacy, "keras3": modern}


def read_component(path, blocks, linear=False):
    import h5py

    tables = dict(reader._BLOCKS, spatial_transformer=reader._spatial_transformer(linear))
    with h5py.File(path, "r") as f:
        layers = reader._read_layers(f, str(path))
        tensors = reader._convert_model(layers, blocks, tables, str(path))
        return {k: np.asarray(v) for k, v in tensors.items()}


def mini_keras_cv_unet(cfg: UNetConfig, size: int, tokens: int):
    """keras-cv's DiffusionModel construction, at the widths of ``cfg``."""
    mc = cfg.model_channels
    context = keras.Input((tokens, cfg.context_dim))
    t_input = keras.Input((mc,))
    latent = keras.Input((size, size, cfg.in_channels))
    t = keras.layers.Dense(4 * mc)(t_input)
    t = keras.layers.Activation("swish")(t)
    t = keras.layers.Dense(4 * mc)(t)

    def transformer(ch):
        heads = cfg.heads_at(ch)
        return kcv_unet.SpatialTransformer(heads, ch // heads, fully_connected=cfg.use_linear_projection)

    outputs = []
    x = PaddedConv2D(mc, kernel_size=3, padding=1)(latent)
    outputs.append(x)
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            x = kcv_unet.ResBlock(mult * mc)([x, t])
            if cfg.attention_levels[level]:
                x = transformer(mult * mc)([x, context])
            outputs.append(x)
        if level != last:
            x = PaddedConv2D(mult * mc, 3, strides=2, padding=1)(x)
            outputs.append(x)
    top = cfg.channel_mult[-1] * mc
    x = kcv_unet.ResBlock(top)([x, t])
    x = transformer(top)([x, context])
    x = kcv_unet.ResBlock(top)([x, t])
    for level in reversed(range(len(cfg.channel_mult))):
        ch = cfg.channel_mult[level] * mc
        for _ in range(cfg.num_res_blocks + 1):
            x = keras.layers.Concatenate()([x, outputs.pop()])
            x = kcv_unet.ResBlock(ch)([x, t])
            if cfg.attention_levels[level]:
                x = transformer(ch)([x, context])
        if level:
            x = kcv_unet.Upsample(ch)(x)
    x = keras.layers.GroupNormalization(epsilon=1e-5)(x)
    x = keras.layers.Activation("swish")(x)
    output = PaddedConv2D(cfg.out_channels, kernel_size=3, padding=1)(x)
    return keras.Model([latent, t_input, context], output)


def mini_keras_cv_decoder(cfg: VAEConfig, size: int):
    """keras-cv's Decoder (Sequential) at the widths of ``cfg``."""
    top = cfg.base_channels * cfg.channel_mult[-1]
    layers = [
        keras.layers.Input((size, size, cfg.latent_channels)),
        keras.layers.Rescaling(1.0 / SCALE),
        PaddedConv2D(cfg.latent_channels, 1),
        PaddedConv2D(top, 3, padding=1),
        ResnetBlock(top),
        AttentionBlock(top),
        ResnetBlock(top),
    ]
    for level in reversed(range(len(cfg.channel_mult))):
        ch = cfg.base_channels * cfg.channel_mult[level]
        layers += [ResnetBlock(ch) for _ in range(cfg.num_res_blocks + 1)]
        if level:
            layers += [keras.layers.UpSampling2D(2), PaddedConv2D(ch, 3, padding=1)]
    layers += [
        keras.layers.GroupNormalization(epsilon=1e-5),
        keras.layers.Activation("swish"),
        PaddedConv2D(cfg.out_channels, 3, padding=1),
    ]
    return keras.Sequential(layers)


def mini_keras_cv_encoder(cfg: VAEConfig):
    """keras-cv's ImageEncoder (Sequential) at the widths of ``cfg``."""
    layers = [
        keras.layers.Input((None, None, cfg.in_channels)),
        PaddedConv2D(cfg.base_channels, 3, padding=1),
    ]
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.base_channels * mult
        layers += [ResnetBlock(ch) for _ in range(cfg.num_res_blocks)]
        if level != last:
            layers.append(PaddedConv2D(ch, 3, padding=((0, 1), (0, 1)), strides=2))
    top = cfg.base_channels * cfg.channel_mult[-1]
    layers += [
        ResnetBlock(top),
        AttentionBlock(top),
        ResnetBlock(top),
        keras.layers.GroupNormalization(epsilon=1e-5),
        keras.layers.Activation("swish"),
        PaddedConv2D(2 * cfg.latent_channels, 3, padding=1),
        PaddedConv2D(2 * cfg.latent_channels, 1),
        keras.layers.Lambda(lambda x: x[..., : cfg.latent_channels] * SCALE),
    ]
    return keras.Sequential(layers)


def mini_keras_cv_text(cfg: CLIPTextConfig):
    tokens = keras.Input((cfg.max_position_embeddings,), dtype="int32")
    positions = keras.Input((cfg.max_position_embeddings,), dtype="int32")
    x = CLIPEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings)([tokens, positions])
    for _ in range(cfg.num_hidden_layers):
        x = CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, activation=quick_gelu)(x)
    return keras.Model([tokens, positions], keras.layers.LayerNormalization(epsilon=1e-5)(x))


def randomize(model, seed):
    """keras-cv initialises norms to 1 / biases to 0; draw everything so a swapped weight shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.1
        value = rng.standard_normal(shape) * scale + (1.0 if variable.name == "gamma" else 0.0)
        variable.assign(value.astype("float32"))


def max_error(a, b):
    return float(np.max(np.abs(np.asarray(keras.ops.convert_to_numpy(a), np.float64) - np.asarray(b))))


@pytest.mark.parametrize("linear", [False, True], ids=["sd1-style", "sd2-style"])
def test_diffusion_model_matches_keras_cv(tmp_path, exact_geglu, linear):
    if linear:
        cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                         num_heads=None, head_dim=16, context_dim=24, use_linear_projection=True,
                         transformer_norm_eps=1e-5)  # fmt: skip
    else:
        cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, True),
                         num_heads=2, context_dim=24, transformer_norm_eps=1e-5)  # fmt: skip
    keras.utils.set_random_seed(0)
    theirs = mini_keras_cv_unet(cfg, size=8, tokens=5)
    randomize(theirs, 1)
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((2, 8, 8, 4)).astype("float32")
    context = rng.standard_normal((2, 5, 24)).astype("float32")
    t = np.array([3.0, 700.0], "float32")
    want = keras.ops.convert_to_numpy(
        theirs([latents, keras.ops.convert_to_numpy(timestep_embedding(t, 32)), context])
    )
    for layout, path in save_both(theirs, tmp_path, "unet").items():
        ours = UNetModel(cfg)
        load_state_dict(ours, read_component(path, reader.unet_blocks(cfg), linear))
        err = max_error(ours(latents, t, context), want)
        assert err <= TOL, (layout, err)


def test_vae_matches_keras_cv(tmp_path):
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_eps=1e-5)
    keras.utils.set_random_seed(0)
    decoder, encoder = mini_keras_cv_decoder(cfg, 4), mini_keras_cv_encoder(cfg)
    randomize(decoder, 3)
    randomize(encoder, 4)
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((1, 4, 4, 4)).astype("float32")
    image = rng.uniform(-1, 1, (1, 8, 8, 3)).astype("float32")
    want_image = keras.ops.convert_to_numpy(decoder(latents))
    want_latents = keras.ops.convert_to_numpy(encoder(image))
    decoder_files = save_both(decoder, tmp_path, "decoder")
    encoder_files = save_both(encoder, tmp_path, "encoder")
    for layout in ("legacy", "keras3"):
        ours = AutoencoderKL(cfg)
        tensors = read_component(decoder_files[layout], reader.decoder_blocks(cfg))
        tensors.update(read_component(encoder_files[layout], reader.encoder_blocks(cfg)))
        load_state_dict(ours, tensors)
        assert max_error(ours.decode(latents / SCALE), want_image) <= TOL, layout
        assert max_error(ours.encode(image).mean * SCALE, want_latents) <= TOL, layout


def test_text_encoder_matches_keras_cv(tmp_path):
    cfg = CLIPTextConfig(vocab_size=100, max_position_embeddings=12, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    keras.utils.set_random_seed(0)
    theirs = mini_keras_cv_text(cfg)
    randomize(theirs, 6)
    ids = np.random.default_rng(7).integers(0, 100, (2, 12)).astype("int32")
    positions = np.tile(np.arange(12, dtype="int32"), (2, 1))
    want = keras.ops.convert_to_numpy(theirs([ids, positions]))
    for layout, path in save_both(theirs, tmp_path, "text").items():
        ours = CLIPTextEncoder(cfg)
        load_state_dict(ours, read_component(path, reader.text_blocks(2)))
        assert max_error(ours(ids), want) <= TOL, layout


def test_folder_detection_and_missing_parts(tmp_path, monkeypatch):
    from tf_diffusion.weights.loading import load_pipeline_weights

    # A one-layer keras-cv text encoder: too short for keras-cv's SD 1.x model ...
    theirs = mini_keras_cv_text(CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=1,
                                               num_attention_heads=12, intermediate_size=3072))  # fmt: skip
    save_both(theirs, tmp_path, "kcv_encoder")
    (tmp_path / "kcv_encoder.weights.h5").unlink()
    with pytest.raises(ValueError, match="1 clip_encoder_layer layers, but keras-cv's model has 12"):
        load_pipeline_weights(tmp_path)
    # ... read as if it were complete, the report names the missing parts and layers.
    real = reader.text_blocks
    monkeypatch.setattr(reader, "text_blocks", lambda n: real(1))
    with load_pipeline_weights(tmp_path, strict=False) as weights:
        assert weights.report.format == "keras-cv"
        assert any(
            "keras-cv parts missing: decoder, diffusion_model, image_encoder" in n
            for n in weights.report.notes
        )
        assert (
            "missing key text_encoder: text_model.encoder.layers.11.mlp.fc2.weight" in weights.report.problems
        )
    with pytest.raises(ValueError, match="the checkpoint has no unet, vae weights"):
        load_pipeline_weights(tmp_path)


@pytest.mark.skipif(
    not os.environ.get("TF_DIFFUSION_SLOW_TESTS"),
    reason="full-size keras-cv models: set TF_DIFFUSION_SLOW_TESTS=1",
)
def test_full_size_keras_cv_models(tmp_path, exact_geglu):
    """keras-cv's own full-size SD 1.x models, random weights, one UNet step at 64x64."""
    import gc

    from keras_cv.models.stable_diffusion import Decoder, DiffusionModel, ImageEncoder, TextEncoder

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights.loading import from_pretrained

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49408, (1, 77)).astype("int32")
    latents = rng.standard_normal((1, 8, 8, 4)).astype("float32")
    image = rng.uniform(-1, 1, (1, 64, 64, 3)).astype("float32")
    t = np.array([500.0], "float32")
    want = {}
    keras.utils.set_random_seed(0)
    model = TextEncoder(77, download_weights=False)
    want["text"] = keras.ops.convert_to_numpy(model([ids, np.arange(77, dtype="int32")[None]]))
    save_both(model, tmp_path, "kcv_encoder")
    del model
    gc.collect()
    model = Decoder(64, 64, download_weights=False)
    want["decoded"] = keras.ops.convert_to_numpy(model(latents))
    save_both(model, tmp_path, "kcv_decoder")
    del model
    model = ImageEncoder(download_weights=False)
    want["encoded"] = keras.ops.convert_to_numpy(model(image))
    save_both(model, tmp_path, "vae_encoder")
    del model
    model = DiffusionModel(64, 64, 77, download_weights=False)
    context = rng.standard_normal((1, 77, 768)).astype("float32")
    want["unet"] = keras.ops.convert_to_numpy(
        model([latents, keras.ops.convert_to_numpy(timestep_embedding(t, 320)), context])
    )
    save_both(model, tmp_path, "kcv_diffusion_model")
    del model
    gc.collect()
    for path in tmp_path.glob("*.weights.h5"):
        path.unlink()  # the legacy layout, as keras-cv ships it
    sd = from_pretrained(StableDiffusion, tmp_path)
    assert sd.load_report.format == "keras-cv"
    errors = {
        "text": max_error(sd.text_encoder(ids), want["text"]),
        # keras-cv's VAE GroupNorms use eps 1e-5, the original 1e-6.
        "decoded": max_error(sd.vae.decode(latents / SCALE), want["decoded"]),
        "encoded": max_error(sd.vae.encode(image).mean * SCALE, want["encoded"]),
        # keras-cv's transformer GroupNorm uses eps 1e-5, the original 1e-6.
        "unet": max_error(sd.unet(latents, t, context), want["unet"]),
    }
    print("full-size keras-cv max abs errors:", errors)
    assert max(errors.values()) <= 1e-3, errors
