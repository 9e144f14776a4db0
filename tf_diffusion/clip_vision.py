"""CLIP vision transformer with projection: the image encoder of IP-Adapter.

Computes what transformers' ``CLIPVisionModelWithProjection`` computes: patch embedding (a
bias-free convolution with the patch size as stride), a class token, learned position embeddings,
``pre_layrnorm`` (transformers' spelling, kept because it is the checkpoint key), the encoder layers
of CLIP (as the text tower, without the causal mask), ``post_layernorm`` on the class token, and
``visual_projection``. Attribute paths equal the transformers keys
(``vision_model.encoder.layers.3.self_attn.q_proj.weight``, ``visual_projection.weight``).

IP-Adapter reads two outputs: ``image_embeds`` (the projected class token; the base adapters) and
the penultimate layer's hidden states (``hidden_states[-2]``; the "plus" adapters).
``image_inputs`` prepares pictures as transformers' ``CLIPImageProcessor`` does.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tf_diffusion.clip import CLIPEncoder
from tf_diffusion.config import CLIPVisionConfig
from tf_diffusion.layers import CONV, PLAIN, Embedding, LayerNorm, Linear, dtype_policy_scope

# CLIPImageProcessor's defaults (OpenAI's normalisation, used by every CLIP image encoder here).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class PatchEmbedding(keras.layers.Layer):
    """nn.Conv2d(C, D, kernel=patch, stride=patch, bias=False) on NHWC images."""

    LAYOUT = {"weight": CONV}

    def __init__(self, in_channels: int, dim: int, patch: int, **kwargs):
        super().__init__(**kwargs)
        self.patch = patch
        self.weight = self.add_weight(
            shape=(patch, patch, in_channels, dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="weight",
        )
        self.built = True

    def call(self, x):  # (B, H, W, C) -> (B, H / patch, W / patch, D)
        return ops.conv(x, ops.cast(self.weight, x.dtype), strides=self.patch, padding="valid")


class CLIPVisionEmbeddings(keras.layers.Layer):
    """Patches, the class token in front, plus learned position embeddings."""

    LAYOUT = {"class_embedding": PLAIN}

    def __init__(self, config: CLIPVisionConfig, **kwargs):
        super().__init__(**kwargs)
        d = config.hidden_size
        self.class_embedding = self.add_weight(
            shape=(d,), initializer=keras.initializers.RandomNormal(stddev=0.02), name="class_embedding"
        )
        self.patch_embedding = PatchEmbedding(config.num_channels, d, config.patch_size)
        self.position_embedding = Embedding(config.num_positions, d)
        self.built = True

    def call(self, pixels):  # (B, S, S, C) -> (B, 1 + (S / patch)**2, D)
        patches = self.patch_embedding(pixels)
        b, d = ops.shape(patches)[0], patches.shape[-1]
        patches = ops.reshape(patches, (b, -1, d))  # row-major, as torch's flatten(2) of NCHW
        cls = ops.broadcast_to(ops.cast(self.class_embedding, patches.dtype)[None, None], (b, 1, d))
        x = ops.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(ops.arange(ops.shape(x)[1]))[None]


class CLIPVisionTransformer(keras.layers.Layer):
    """``vision_model``: embeddings, pre-norm, encoder; ``post_layernorm`` is applied by the caller."""

    def __init__(self, config: CLIPVisionConfig, **kwargs):
        super().__init__(**kwargs)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.built = True


class CLIPVisionEncoder(keras.Model):
    """CLIP's image tower with its projection (transformers' ``CLIPVisionModelWithProjection``).

    Args:
        config: the sizes; the default is OpenCLIP ViT-H/14.
        **kwargs: passed to ``keras.Model``; ``dtype`` (a policy name) applies to every sublayer.

    Example:
        >>> encoder = CLIPVisionEncoder(CLIPVisionConfig())
        >>> embeds = encoder(image_inputs(pictures))                   # (B, 1024)
        >>> hidden = encoder(image_inputs(pictures), output="penultimate")  # (B, 257, 1280)
    """

    IGNORED_CHECKPOINT_KEYS = ("vision_model.embeddings.position_ids",)
    OUTPUTS = ("image_embeds", "penultimate", "last_hidden_state")

    def __init__(self, config: CLIPVisionConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config if config is not None else CLIPVisionConfig()
        with dtype_policy_scope(kwargs.get("dtype")):
            self.vision_model = CLIPVisionTransformer(self.config)
            self.visual_projection = Linear(self.config.hidden_size, self.config.projection_dim, bias=False)
        self.built = True

    def call(self, pixels, output: str = "image_embeds"):
        """Encode preprocessed images.

        Args:
            pixels: (B, S, S, C) NHWC, normalised as ``image_inputs`` makes them, S = image_size.
            output: "image_embeds" (B, projection_dim): the class token after ``post_layernorm`` and
                ``visual_projection``; "penultimate" (B, T, hidden): the hidden states after all but
                the last encoder layer (transformers' ``hidden_states[-2]``); "last_hidden_state".
        """
        if output not in self.OUTPUTS:
            raise ValueError(f"output={output!r} is not allowed; expected one of {self.OUTPUTS}")
        cfg, vm = self.config, self.vision_model
        size = tuple(pixels.shape[1:])
        if size != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixels have shape {size} per image; this encoder takes "
                f"{(cfg.image_size, cfg.image_size, cfg.num_channels)} (H, W, C): prepare them with image_inputs"
            )
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        last = cfg.num_hidden_layers
        x = vm.encoder(x, None, num_layers=last - 1)
        if output == "penultimate":
            return x
        x = vm.encoder(x, None, num_layers=last, start=last - 1)
        if output == "last_hidden_state":
            return x
        return self.visual_projection(vm.post_layernorm(x[:, 0]))


def image_inputs(images, size: int = 224) -> np.ndarray:
    """Pictures as a CLIP image encoder takes them, as transformers' ``CLIPImageProcessor`` makes them.

    Each picture's shorter side is resized to ``size`` (bicubic, through Pillow), the centre
    ``size`` x ``size`` is cropped, and the result is scaled to [0, 1] and normalised by CLIP's mean
    and standard deviation.

    Args:
        images: a PIL image or array (H, W, C) / (H, W) (uint8, or float in [0, 1]), or a list of them.
        size: the encoder's image size.

    Returns:
        (N, size, size, 3) float32, NHWC.
    """
    from PIL import Image

    from tf_diffusion.images import to_rgb

    items = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("images is empty; give at least one picture")
    out = []
    for k, item in enumerate(items):
        for rgb in to_rgb(item, f"images[{k}]"):
            picture = Image.fromarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))
            w, h = picture.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(size * long / short)
            new_w, new_h = (size, new_long) if w <= h else (new_long, size)
            picture = picture.resize((new_w, new_h), Image.Resampling.BICUBIC)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            array = np.asarray(picture, np.float32)[top : top + size, left : left + size] / 255.0
            out.append((array - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32))
    return np.stack(out).astype(np.float32)
