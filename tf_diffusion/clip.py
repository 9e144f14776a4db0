"""CLIP text transformer: the prompt encoder of Stable Diffusion.

SD 1.x uses OpenAI CLIP ViT-L/14 (12 layers, quick_gelu) and reads the last
hidden state after ``final_layer_norm``. SD 2.x uses OpenCLIP ViT-H/14 but only
its first 23 of 24 layers ("penultimate layer") followed by the final layer
norm (``ln_final``); diffusers' single-file conversion stores that as a
23-layer, exact-gelu CLIPTextModel, and this class runs it the same way.

Attribute paths equal the transformers checkpoint keys as SD checkpoints and
the Hugging Face hub store them (``text_model.encoder.layers.3.self_attn.q_proj.weight``).
transformers >= 5 saves the same keys without the ``text_model.`` prefix.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tf_diffusion.config import CLIPTextConfig
from tf_diffusion.layers import Embedding, LayerNorm, Linear, attention, dtype_policy_scope


def _quick_gelu(x):
    # OpenAI CLIP's activation: x * sigmoid(1.702 x).
    return x * ops.sigmoid(1.702 * x)


def _gelu(x):
    # OpenCLIP (SD 2.x) uses the exact erf gelu.
    return ops.gelu(x, approximate=False)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": _gelu}


class CLIPAttention(keras.layers.Layer):
    """Multi-head self-attention with separate q/k/v/out projections."""

    def __init__(self, config: CLIPTextConfig, **kwargs):
        super().__init__(**kwargs)
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)
        self.built = True

    def call(self, x, causal):  # (B, T, D), causal (T, T) bool or None (the vision tower) -> (B, T, D)
        # The additive mask is made here in float32: Keras casts float arguments to the
        # compute dtype, and float16 cannot hold the float32 minimum. transformers uses that
        # minimum too; it gives masked tokens exactly zero softmax weight.
        mask = None
        if causal is not None:
            mask = ops.where(causal, 0.0, float(np.finfo(np.float32).min))[None, None]  # (1, 1, T, T)
            mask = ops.cast(mask, "float32")
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, mask)
        return self.out_proj(out)


class CLIPMLP(keras.layers.Layer):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: CLIPTextConfig, **kwargs):
        super().__init__(**kwargs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.built = True

    def call(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(keras.layers.Layer):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, **kwargs):
        super().__init__(**kwargs)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(d, eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(d, eps)
        self.built = True

    def call(self, x, causal):  # (B, T, D)
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(keras.layers.Layer):
    """The stack of encoder layers (``text_model.encoder.layers.N``)."""

    def __init__(self, config: CLIPTextConfig, **kwargs):
        super().__init__(**kwargs)
        # Named `layers` to match the checkpoint (nn.ModuleList).
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.built = True

    def call(self, x, causal, num_layers, start=0):
        for layer in self.layers[start:num_layers]:
            x = layer(x, causal)
        return x


class CLIPTextEmbeddings(keras.layers.Layer):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig, **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)
        self.built = True

    def call(self, token_ids, token_embeds=None):  # (B, T) int -> (B, T, D)
        positions = ops.arange(ops.shape(token_ids)[1])
        position = self.position_embedding(positions)[None]
        if token_embeds is not None:  # transformers' inputs_embeds: the token lookup done by the caller
            return ops.cast(token_embeds, position.dtype) + position
        return self.token_embedding(token_ids) + position


class CLIPTextTransformer(keras.layers.Layer):
    """Embeddings, causal encoder and the final layer norm (``text_model``)."""

    def __init__(self, config: CLIPTextConfig, **kwargs):
        super().__init__(**kwargs)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.built = True

    def call(self, token_ids, num_layers, token_embeds=None, final_norm=True):
        t = ops.shape(token_ids)[1]
        x = self.embeddings(token_ids, token_embeds)  # (B, T, D)
        positions = ops.arange(t)
        causal = positions[:, None] >= positions[None, :]  # (T, T): token i sees tokens <= i
        x = self.encoder(x, causal, num_layers=num_layers)
        return self.final_layer_norm(x) if final_norm else x


class CLIPTextEncoder(keras.Model):
    """The CLIP text transformer that turns token ids into SD's text conditioning.

    Weights load with ``tf_diffusion.weights.load_state_dict`` from the
    transformers ``CLIPTextModel`` keys (``text_model.…``); the
    ``text_model.embeddings.position_ids`` buffer found in older checkpoints
    is ignored. Mixed precision follows ``dtype`` or else the global Keras
    dtype policy; the layer norms and the attention softmax stay float32.

    Args:
        config: the text transformer's sizes and activation.
        **kwargs: passed to ``keras.Model``; ``dtype`` (a policy name such as
            "mixed_bfloat16") also applies to every sublayer.

    Example:
        >>> encoder = CLIPTextEncoder(CLIPTextConfig())
        >>> context = encoder(token_ids)  # (B, 77) int -> (B, 77, 768)
    """

    IGNORED_CHECKPOINT_KEYS = ("text_model.embeddings.position_ids",)

    def __init__(self, config: CLIPTextConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config if config is not None else CLIPTextConfig()
        with dtype_policy_scope(kwargs.get("dtype")):
            self.text_model = CLIPTextTransformer(self.config)
            if self.config.projection_dim is not None:
                # CLIPTextModelWithProjection.text_projection: nn.Linear without bias.
                self.text_projection = Linear(self.config.hidden_size, self.config.projection_dim, bias=False)
        self.built = True

    def call(
        self,
        token_ids,
        clip_skip: int = 0,
        token_embeds=None,
        final_norm: bool = True,
        pooled: bool = False,
    ):
        """Encode token ids into the hidden states the UNet cross-attends to.

        Args:
            token_ids: (B, T) integer token ids, 1 <= T <= max_position_embeddings
                (77). Padding is whatever the tokenizer wrote; no attention mask
                is applied beyond the causal one, as in Stable Diffusion.
            clip_skip: how many of the last encoder layers to skip, as diffusers'
                ``clip_skip``: 0 gives ``last_hidden_state``; k gives the hidden
                state after layer ``num_hidden_layers - k``, passed through
                ``final_layer_norm``. Allowed: 0 <= clip_skip < num_hidden_layers.
            token_embeds: optional (B, T, hidden_size) input vectors used instead of looking
                ``token_ids`` up in the token embedding (transformers' ``inputs_embeds``; textual
                inversion puts its vectors there); position embeddings are still added.
            final_norm: pass that hidden state through ``final_layer_norm`` (SD 1.x / 2.x);
                False gives the raw ``hidden_states[-1 - clip_skip]`` of transformers, which
                SDXL reads with ``clip_skip=1`` (the penultimate layer, no final norm).
            pooled: also return transformers' pooled output (``text_embeds`` of
                CLIPTextModelWithProjection): the last layer after ``final_layer_norm`` at each
                sequence's EOS token (the first position of its largest id, as OpenCLIP and
                transformers' legacy rule find it), through ``text_projection``. Needs
                ``projection_dim``.

        Returns:
            (B, T, hidden_size) hidden states, or with ``pooled`` a pair of them and the
            (B, projection_dim) pooled embedding.

        Raises:
            ValueError: for ids that are not a rank-2 integer tensor, a length
                outside [1, max_position_embeddings], a bad ``clip_skip``, or ``pooled``
                without a projection.
        """
        cfg = self.config
        token_ids = ops.convert_to_tensor(token_ids)
        if len(token_ids.shape) != 2:
            raise ValueError(f"token_ids must have shape (batch, tokens), got shape {tuple(token_ids.shape)}")
        dtype = keras.backend.standardize_dtype(token_ids.dtype)
        if "int" not in dtype:
            raise ValueError(f"token_ids must be an integer tensor, got dtype {dtype}")
        length = token_ids.shape[1]
        if length is not None and not 1 <= length <= cfg.max_position_embeddings:
            raise ValueError(f"token_ids has {length} tokens; allowed: 1 to {cfg.max_position_embeddings}")
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)):
            raise ValueError(f"clip_skip must be an int, got {clip_skip!r}")
        if not 0 <= clip_skip < cfg.num_hidden_layers:
            raise ValueError(
                f"clip_skip={clip_skip} is not allowed; expected 0 <= clip_skip < "
                f"{cfg.num_hidden_layers} (num_hidden_layers)"
            )
        if token_embeds is not None:
            token_embeds = ops.convert_to_tensor(token_embeds)
            want = (*token_ids.shape, cfg.hidden_size)
            if tuple(token_embeds.shape) != want:
                raise ValueError(f"token_embeds has shape {tuple(token_embeds.shape)}; expected {want}")
        if pooled and cfg.projection_dim is None:
            raise ValueError("pooled=True needs a text encoder with a projection (projection_dim is None)")
        layers = cfg.num_hidden_layers - int(clip_skip)
        if not pooled:
            return self.text_model(
                token_ids, num_layers=layers, token_embeds=token_embeds, final_norm=final_norm
            )
        model = self.text_model
        positions = ops.arange(ops.shape(token_ids)[1])
        causal = positions[:, None] >= positions[None, :]  # (T, T)
        x = model.embeddings(token_ids, token_embeds)
        x = model.encoder(x, causal, num_layers=layers)
        hidden = model.final_layer_norm(x) if final_norm else x
        last = model.encoder(x, causal, num_layers=cfg.num_hidden_layers, start=layers)
        last = model.final_layer_norm(last)  # (B, T, D)
        eos = ops.argmax(token_ids, axis=-1)  # (B,)
        picked = ops.take_along_axis(last, ops.reshape(eos, (-1, 1, 1)), axis=1)[:, 0]  # (B, D)
        return hidden, self.text_projection(picked)
