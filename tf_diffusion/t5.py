"""The T5 encoder SD3 reads its long prompts with, and its SentencePiece tokenizer.

``T5Encoder`` computes what transformers' ``T5EncoderModel`` computes (the v1.1 gated-GELU feed-forward
of T5-XXL, or the original ReLU one), with its state-dict keys as attribute paths
(``encoder.block.3.layer.0.SelfAttention.q``); SD3 single files hold the same keys after
``text_encoders.t5xxl.transformer.``. ``T5Tokenizer`` reads the ``spiece.model`` that ships in a
checkpoint's ``tokenizer_3/`` folder with the ``sentencepiece`` package (the ``[sd3]`` extra).
"""

from __future__ import annotations

import math
import os
import re

import keras
import numpy as np
from keras import ops

from tf_diffusion.config import T5Config
from tf_diffusion.layers import Embedding, Identity, Linear, RMSNorm, dtype_policy_scope


def relative_position_buckets(length, config: T5Config):
    """(length, length) int32 bidirectional relative-position buckets, as transformers' _relative_position_bucket.

    Key position minus query position; half the buckets for positive offsets; exact buckets for
    small offsets, then logarithmic up to ``relative_attention_max_distance`` (float32 log, as torch).
    ``length`` may be a traced scalar (the executors trace text encoders with relaxed shapes).
    """
    pos = ops.arange(length, dtype="int32")
    relative = pos[None, :] - pos[:, None]  # (q, k): memory - context
    buckets = config.relative_attention_num_buckets // 2
    out = ops.cast(relative > 0, "int32") * buckets
    relative = ops.abs(relative)
    max_exact = buckets // 2
    # log(0) for the exact positions is -inf; those entries are replaced by `relative` below.
    scaled = ops.log(ops.cast(relative, "float32") / float(max_exact)) / math.log(
        config.relative_attention_max_distance / max_exact
    )
    large = max_exact + ops.cast(ops.maximum(scaled * float(buckets - max_exact), -1.0), "int32")
    large = ops.minimum(large, buckets - 1)
    return out + ops.where(relative < max_exact, relative, large)


def t5_config_from_transformers(data) -> T5Config:
    """A transformers T5 config.json -> T5Config.

    Raises:
        ValueError: for a decoder-only setting or a feed-forward kind the encoder does not implement.
    """
    defaults = T5Config()
    kwargs = {}
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):  # fmt: skip
        kwargs[name] = int(data.get(name) or getattr(defaults, name))
    kwargs["layer_norm_epsilon"] = float(data.get("layer_norm_epsilon") or defaults.layer_norm_epsilon)
    kwargs["feed_forward_proj"] = data.get("feed_forward_proj") or "relu"  # transformers' default
    return T5Config(**kwargs)


class T5Attention(keras.layers.Layer):
    """``SelfAttention``: q, k, v, o without biases or score scaling; block 0 holds the position bias."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = (
            Embedding(config.relative_attention_num_buckets, config.num_heads)
            if has_relative_attention_bias
            else None
        )
        self.built = True

    def position_bias(self, length: int):  # -> (1, heads, T, T) float32
        values = ops.cast(
            self.relative_attention_bias(relative_position_buckets(length, self.config)), "float32"
        )
        return ops.transpose(values, (2, 0, 1))[None]

    def call(self, x, position_bias):  # x: (B, T, D)
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        h, d = self.config.num_heads, self.config.d_kv

        def heads(y):  # (B, T, h*d) -> (B, h, T, d)
            return ops.transpose(ops.reshape(y, (b, t, h, d)), (0, 2, 1, 3))

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 folds the 1/sqrt(d) into its initialisation: the scores are not scaled.
        # Keras casts the bias to the compute dtype on the way in (a bfloat16 model holds it in bfloat16,
        # as transformers does); the sum and softmax are float32.
        scores = ops.cast(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), "float32") + ops.cast(
            position_bias, "float32"
        )
        out = ops.matmul(ops.cast(ops.softmax(scores, axis=-1), v.dtype), v)  # (B, h, T, d)
        return self.o(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, t, h * d)))


class T5LayerSelfAttention(keras.layers.Layer):
    """``layer.0``: x + SelfAttention(layer_norm(x))."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, **kwargs):
        super().__init__(**kwargs)
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.built = True

    def call(self, x, position_bias):
        return x + self.SelfAttention(ops.cast(self.layer_norm(x), x.dtype), position_bias)


class DenseReluDense(keras.layers.Layer):
    """The feed-forward: ``wo(act(wi_0(x)) * wi_1(x))`` when gated, else ``wo(act(wi(x)))``."""

    def __init__(self, config: T5Config, **kwargs):
        super().__init__(**kwargs)
        self.gated = config.feed_forward_proj.startswith("gated-")
        act = config.feed_forward_proj.split("-")[-1]
        # transformers maps "gated-gelu" to gelu_new (tanh approximation), plain "gelu" to exact gelu.
        self.act = {"relu": ops.relu}.get(act) or (lambda y: ops.gelu(y, approximate=self.gated))
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.dropout = Identity()
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.built = True

    def call(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(keras.layers.Layer):
    """``layer.1``: x + DenseReluDense(layer_norm(x))."""

    def __init__(self, config: T5Config, **kwargs):
        super().__init__(**kwargs)
        self.DenseReluDense = DenseReluDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.built = True

    def call(self, x):
        return x + self.DenseReluDense(ops.cast(self.layer_norm(x), x.dtype))


class T5Block(keras.layers.Layer):
    """``block.N``: self-attention then feed-forward, each pre-normed with a residual."""

    def __init__(self, config: T5Config, index: int, **kwargs):
        super().__init__(**kwargs)
        self.layer = [T5LayerSelfAttention(config, index == 0), T5LayerFF(config)]
        self.built = True

    def call(self, x, position_bias):
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(keras.layers.Layer):
    """``encoder``: the blocks (all sharing block 0's position bias) and the final RMS norm."""

    def __init__(self, config: T5Config, **kwargs):
        super().__init__(**kwargs)
        self.block = [T5Block(config, i) for i in range(config.num_layers)]
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.built = True

    def call(self, x):
        bias = self.block[0].layer[0].SelfAttention.position_bias(ops.shape(x)[1])
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(keras.Model):
    """transformers' ``T5EncoderModel``: token ids (B, T) -> last hidden state (B, T, d_model) float32.

    SD3 calls it without an attention mask (padding tokens are attended), as diffusers does.

    Args:
        config: the encoder's sizes and feed-forward kind.
        **kwargs: passed to ``keras.Model``; ``dtype`` also applies to every sublayer.

    Example:
        >>> t5 = T5Encoder(T5Config())
        >>> tokens = t5(ids)  # (B, 256, 4096)
    """

    # transformers ties encoder.embed_tokens to shared; files may hold either name or both.
    IGNORED_CHECKPOINT_KEYS = ("encoder.embed_tokens.weight",)

    def __init__(self, config: T5Config | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config if config is not None else T5Config()
        with dtype_policy_scope(kwargs.get("dtype")):
            self.shared = Embedding(self.config.vocab_size, self.config.d_model)
            self.encoder = T5Stack(self.config)
        self.built = True

    def call(self, ids):
        if len(ids.shape) != 2:
            raise ValueError(f"token ids must have shape (batch, length), got {ids.shape}")
        x = ops.cast(self.shared(ops.cast(ids, "int32")), self.compute_dtype)
        return ops.cast(self.encoder(x), "float32")


# Unicode White_Space (Rust's char::is_whitespace, which the fast tokenizer's WhitespaceSplit uses).
_WHITESPACE = re.compile("[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


class T5Tokenizer:
    """T5's SentencePiece tokenizer, giving transformers' ``T5TokenizerFast`` ids.

    Text is split on the special tokens it contains (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>``),
    which become their ids; the rest is encoded by the SentencePiece model. Each sequence ends with
    EOS (1) and is padded with 0 or truncated (keeping the EOS) to ``max_length``.

    Args:
        model_file: the ``spiece.model`` file (a diffusers folder's ``tokenizer_3/spiece.model``).
        extra_ids: the sentinel tokens ``<extra_id_0..N-1>`` numbered down from the end (T5: 100).
        max_length: default padded length (diffusers' SD3 ``max_sequence_length``: 256).

    Raises:
        ImportError: without the ``sentencepiece`` package (``pip install tf_diffusion[sd3]``).
        ValueError: if the file cannot be read as a SentencePiece model.
    """

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

    def __init__(self, model_file: str | os.PathLike, extra_ids: int = 100, max_length: int = 256):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - the test extra installs it
            raise ImportError(
                "the T5 tokenizer needs the sentencepiece package: pip install 'tf_diffusion[sd3]'"
            ) from e
        self.model_file = os.fspath(model_file)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.model_file} is not a readable SentencePiece model: {e}") from e
        size = self._sp.GetPieceSize()
        self.max_length = max_length
        self.special = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        self.special.update({f"<extra_id_{i}>": size + extra_ids - 1 - i for i in range(extra_ids)})
        self.vocab_size = size + extra_ids
        self._split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.special, key=len)[::-1]) + ")"
        )

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text`` with the final EOS, unpadded and untruncated."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
        out: list[int] = []
        for part in self._split.split(text):
            if part in self.special:
                out.append(self.special[part])
            else:
                # As the fast tokenizer: whitespace around a special token is dropped, and every Unicode
                # White_Space character (U+0085 and U+2028 too, which SentencePiece alone keeps) splits words.
                part = _WHITESPACE.sub(" ", part).strip(" ")
                if part:
                    out.extend(self._sp.EncodeAsIds(part))
        return out + [self.eos_token_id]

    def __call__(self, texts, max_length: int | None = None) -> np.ndarray:
        """(B, max_length) int32 ids, truncated to keep the EOS and padded with 0.

        Args:
            texts: a string or a list of strings.
            max_length: padded length; None: the tokenizer's ``max_length``.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.max_length if max_length is None else max_length
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"max_length must be a positive integer, got {length!r}")
        rows = np.zeros((len(texts), length), np.int32)
        for i, text in enumerate(texts):
            ids = self.ids(text)
            if len(ids) > length:
                ids = ids[: length - 1] + [self.eos_token_id]
            rows[i, : len(ids)] = ids
        return rows

    def truncated(self, text: str, max_length: int | None = None) -> bool:
        """Whether ``text`` needs more than ``max_length`` tokens (diffusers then warns and truncates)."""
        return len(self.ids(text)) > (self.max_length if max_length is None else max_length)
