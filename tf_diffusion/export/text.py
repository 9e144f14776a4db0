"""What the SavedModel computes from prompt strings, per family: ``FamilyHooks.export_text`` returns one.

``build_serving_module`` is written once for every family it exports; an ``ExportText`` answers what
differs: which text encoders (and in-graph tokenizers) the SavedModel holds, the context's shape, the
other per-row text outputs (SDXL's and SD3's pooled embedding), what an empty negative prompt becomes,
and how those outputs become the denoiser's ``Conditioning``. Each implementation computes what its
family's ``text_conditioning`` computes on the host, with TensorFlow ops.

- ``CLIPText``: SD 1.x / 2.x: one CLIP encoder's last hidden state.
- ``SDXLText``: both encoders' penultimate states side by side, the second's projected pooled output,
  the default time ids of the exported size, zeros for an empty negative prompt when the model says so.
- ``SD3Text``: CLIP-L and CLIP-G penultimate states side by side, zero-padded to the transformer's width
  and followed by ``max_sequence_length`` zero tokens in place of T5 (diffusers without
  ``text_encoder_3``); the pooled embedding is both projected outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tf_diffusion.denoising import Conditioning


def _tf():
    import tensorflow as tf

    return tf


def _graph_tokenizer(tokenizer):
    from tf_diffusion.export.graph_tokenizer import GraphTokenizer

    return GraphTokenizer(tokenizer)


class ExportText:
    """The contract (the default methods serve a family without extras).

    Attributes:
        encoders: the text encoder models, in the order their variables are saved.
        tokenizers: module attribute name -> ``GraphTokenizer`` (saved with the module).
        context_shape: (tokens, width) of one row's context.
        extras: name -> one row's shape, for each text output besides ``ids`` and ``hidden``
            (``encode_text`` returns it; ``denoise`` takes it and its ``negative_`` twin).
        metadata: what the export's metadata adds for this family.
    """

    encoders: tuple = ()
    tokenizers: Mapping[str, object] = {}
    context_shape: tuple[int, int] = (0, 0)
    extras: Mapping[str, tuple[int, ...]] = {}
    metadata: Mapping[str, object] = {}

    def encode(self, prompt) -> dict:
        """Prompts (B,) string -> {"ids": (B, 77) int32, "hidden": (B, *context_shape), extras...} float32."""
        raise NotImplementedError

    def unconditional(self, negative_prompt, encoded: dict) -> dict:
        """The unconditional rows' outputs from the encoded negative prompts (default: as encoded)."""
        return encoded

    def conditioning(self, context, extras: dict) -> Conditioning:
        """One half's ``Conditioning`` from its context and its ``extras`` outputs."""
        return Conditioning(context)


class CLIPText(ExportText):
    """SD 1.x / 2.x: the text encoder's hidden states."""

    def __init__(self, sd):
        cfg = sd.config
        self.encoders = (sd.text_encoder,)
        self.tokenizers = {"tokenizer": _graph_tokenizer(sd.tokenizer)}
        self.context_shape = (cfg.tokenizer.max_length, cfg.unet.context_dim)
        self._encoder = sd.text_encoder

    def encode(self, prompt):
        tf = _tf()
        ids = self.tokenizers["tokenizer"](prompt)  # (B, 77)
        return {"ids": ids, "hidden": tf.cast(self._encoder(ids), tf.float32)}  # (B, 77, D)


class SDXLText(ExportText):
    """SDXL (``sdxl.encode_prompts`` and ``sdxl.text_conditioning`` for text-to-image)."""

    def __init__(self, sd, height: int, width: int):
        from tf_diffusion import sdxl

        cfg = sd.config
        self.encoders = (sd.text_encoder, sd.text_encoder_2)
        self.tokenizers = {
            "tokenizer": _graph_tokenizer(sd.tokenizer),
            "tokenizer_2": _graph_tokenizer(sd.tokenizer_2),
        }
        self.context_shape = (cfg.tokenizer.max_length, cfg.unet.context_dim)
        pooled_dim = cfg.text_encoder_2.projection_dim
        self.extras = {"pooled": (pooled_dim,)}
        self._zeros_for_empty = cfg.force_zeros_for_empty_prompt
        # Text to image at the exported size: diffusers' default micro-conditioning (original and
        # target size = the output size, no crop), the same for both halves.
        self._time_ids = sdxl.time_ids(cfg, height, width, 1)[0][0].astype(np.float32)  # (6,)
        self.metadata = {
            "pooled_shape": [pooled_dim],
            "time_ids": [float(v) for v in self._time_ids],
            "empty_negative_prompt": (
                "zeros for the unconditional half (force_zeros_for_empty_prompt), as generate() without one"
                if self._zeros_for_empty
                else "encoded like any other text"
            ),
        }
        self._first, self._second = sd.text_encoder, sd.text_encoder_2

    def encode(self, prompt):
        tf = _tf()
        ids, ids_2 = self.tokenizers["tokenizer"](prompt), self.tokenizers["tokenizer_2"](prompt)
        first = self._first(ids, clip_skip=1, final_norm=False)
        second, pooled = self._second(ids_2, clip_skip=1, final_norm=False, pooled=True)
        context = tf.concat([tf.cast(first, tf.float32), tf.cast(second, tf.float32)], axis=-1)
        return {"ids": ids, "hidden": context, "pooled": tf.cast(pooled, tf.float32)}

    def unconditional(self, negative_prompt, encoded):
        if not self._zeros_for_empty:
            return encoded
        tf = _tf()
        # generate() without a negative prompt: zeros for the unconditional half, as diffusers.
        empty = tf.equal(negative_prompt, "")
        hidden, pooled = encoded["hidden"], encoded["pooled"]
        return {
            **encoded,
            "hidden": tf.where(empty[:, None, None], tf.zeros_like(hidden), hidden),
            "pooled": tf.where(empty[:, None], tf.zeros_like(pooled), pooled),
        }

    def conditioning(self, context, extras):
        tf = _tf()
        time_ids = tf.tile(tf.constant(self._time_ids)[None], [tf.shape(context)[0], 1])  # (B, 6)
        return Conditioning(context, {"text_embeds": extras["pooled"], "time_ids": time_ids})


class SD3Text(ExportText):
    """SD3 / SD3.5 without T5 (``sd3.encode_prompts`` with ``text_encoder_3=None``)."""

    def __init__(self, sd, max_sequence_length: int):
        cfg = sd.config
        self.encoders = (sd.text_encoder, sd.text_encoder_2)
        self.tokenizers = {
            "tokenizer": _graph_tokenizer(sd.tokenizer),
            "tokenizer_2": _graph_tokenizer(sd.tokenizer_2),
        }
        self._length, self._width = int(max_sequence_length), cfg.transformer.joint_attention_dim
        self.context_shape = (cfg.tokenizer.max_length + self._length, self._width)
        pooled_dim = cfg.transformer.pooled_projection_dim
        self.extras = {"pooled": (pooled_dim,)}
        self.metadata = {
            "pooled_shape": [pooled_dim],
            "max_sequence_length": self._length,
            "text_encoder_3": "left out: its max_sequence_length tokens are zeros, as diffusers without T5",
            "empty_negative_prompt": "encoded like any other text",
        }
        self._first, self._second = sd.text_encoder, sd.text_encoder_2

    def encode(self, prompt):
        tf = _tf()
        ids, ids_2 = self.tokenizers["tokenizer"](prompt), self.tokenizers["tokenizer_2"](prompt)
        first, pooled = self._first(ids, clip_skip=1, final_norm=False, pooled=True)
        second, pooled_2 = self._second(ids_2, clip_skip=1, final_norm=False, pooled=True)
        clip = tf.concat([tf.cast(first, tf.float32), tf.cast(second, tf.float32)], axis=-1)  # (B, 77, 2048)
        clip = tf.pad(clip, [[0, 0], [0, 0], [0, self._width - clip.shape[-1]]])  # (B, 77, 4096)
        t5 = tf.zeros([tf.shape(clip)[0], self._length, self._width], tf.float32)  # no T5: zeros
        pooled = tf.concat([tf.cast(pooled, tf.float32), tf.cast(pooled_2, tf.float32)], axis=-1)
        return {"ids": ids, "hidden": tf.concat([clip, t5], axis=1), "pooled": pooled}

    def conditioning(self, context, extras):
        return Conditioning(context, {"pooled_projections": extras["pooled"]})
