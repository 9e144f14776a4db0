"""SD3 / SD3.5: what the family computes apart from the shared pipeline, as diffusers' StableDiffusion3Pipeline.

``StableDiffusion`` builds and runs SD3 models through ``family_hooks.SD3Hooks``, which calls the
functions here; ``StableDiffusion3`` is ``StableDiffusion`` with the earlier SD3 entry points.

Text (``encode_prompts``): each prompt goes through CLIP-L and CLIP-G (77 tokens, truncated; CLIP-L pads
with EOS, CLIP-G with 0), whose penultimate hidden states (no final norm) are concatenated (768 + 1280),
zero-padded to the transformer's ``joint_attention_dim`` (4096) and followed along the sequence by
T5's ``max_sequence_length`` tokens (all zeros when the model has no T5, as diffusers does); the
pooled embedding is both projected CLIP outputs concatenated (2048). The negative prompt (default
"") is encoded the same way. Sampling: flow matching (``schedulers.flow_match``) over
``denoising.MMDiTDenoiser``, run by the same ``DenoiseProgram`` and executors as the UNet families;
latents are decoded as ``vae.decode(x / scaling_factor + shift_factor)``.

Image-to-image and inpainting follow diffusers' SD3 Img2Img / Inpaint pipelines (the 16-channel
transformer's per-step blend, the pipeline's shared task preparation), skip-layer guidance
(``generate(skip_guidance_layers=...)``) its text-to-image pipeline. The SavedModel export runs SD3
without T5 (``export.text.SD3Text``). Not here yet: LoRA for SD3.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from tf_diffusion.config import SD3Config, TokenizerConfig
from tf_diffusion.denoising import Conditioning, MMDiTDenoiser
from tf_diffusion.pipeline import StableDiffusion
from tf_diffusion.t5 import T5Tokenizer
from tf_diffusion.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)


class StableDiffusion3(StableDiffusion):
    """``StableDiffusion`` restricted to SD3 / SD3.5 configs, with the SD3 loaders' signatures.

    ``StableDiffusion`` itself builds, loads and runs SD3 models (``family_hooks.SD3Hooks``); this
    subclass keeps the earlier entry points: ``from_pretrained(folder, load_t5=...)``,
    ``from_single_file``, ``from_preset`` over ``presets.SD3_PRESETS``, ``encode_prompts(prompts,
    max_sequence_length)`` and ``decode`` taking the transformer's latents.

    Attributes:
        config: the SD3Config the components were built from.
        tokenizer, tokenizer_2: CLIP tokenizers (CLIP-L pads with EOS, CLIP-G with 0).
        tokenizer_3: the T5 SentencePiece tokenizer, or None.
        text_encoder, text_encoder_2: CLIPTextEncoders with projections.
        text_encoder_3: T5Encoder, or None (its tokens are then zeros, as diffusers).
        transformer: MMDiT.
        vae: AutoencoderKL without quant convs.

    Example:
        >>> sd = StableDiffusion3.from_pretrained("stable-diffusion-3-medium-diffusers")
        >>> images = sd.generate("a photo of a cat", num_steps=28, seed=0)
    """

    def __init__(
        self,
        config: SD3Config,
        *,
        dtype: str | None = None,
        tokenizer: CLIPTokenizer | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        tokenizer_3: T5Tokenizer | None = None,
    ):
        """Build every component of ``config`` with fresh weights.

        Args:
            config: the model.
            dtype: a Keras dtype policy name for all components (the VAE stays float32 under float16).
            tokenizer, tokenizer_2: CLIP tokenizers; default the packaged vocabulary, padded as the
                config's tokenizer settings say.
            tokenizer_3: the T5 tokenizer (it needs the checkpoint's ``spiece.model``); required
                when the config has ``text_encoder_3`` and prompts are to be encoded.
        """
        if not isinstance(config, SD3Config):
            raise ValueError(f"config must be an SD3Config, got {type(config).__name__}")
        super().__init__(
            config, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3
        )

    @classmethod
    def from_preset(cls, name: str, *, dtype: str | None = None) -> StableDiffusion3:
        """Build an SD3 preset's architecture ("sd3-medium", "sd3.5-large", ...) with random weights.

        The T5 tokenizer needs a checkpoint's ``spiece.model``: set ``tokenizer_3`` before encoding text.

        Raises:
            ValueError: for an unknown preset, listing the known ones.
        """
        from tf_diffusion.presets import get_sd3_preset

        return cls(get_sd3_preset(name), dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str | None = None,
        load_t5: bool = True,
        quantize: str | None = None,
        quantize_components=None,
    ):
        """Load a diffusers ``StableDiffusion3Pipeline`` folder or a keras-hub ``StableDiffusion3Backbone``
        preset folder (``weights.keras_hub_sd3``); ``StableDiffusion.from_pretrained`` reads both as well.

        Args:
            path: the folder (``model_index.json``, ``transformer/``, ``text_encoder[_2|_3]/``, ...; or a
                keras-hub preset's ``config.json`` and ``model.weights.h5``).
            dtype: as in the constructor.
            load_t5: False leaves T5 out even when the folder has it (its tokens are then zeros).
            quantize, quantize_components: "int8" stores the transformer's and text encoders' linear
                weights in int8 (``tf_diffusion.execution.quantize.build``).

        Raises:
            ValueError: if the folder is not an SD3 pipeline or a component does not fit its config.
        """
        from tf_diffusion.execution import quantize as quantizing

        build = quantizing.builder(cls, quantize, quantize_components)  # quantize= (execution.quantize)
        return _sd3_hooks().load(build, pathlib.Path(path), dtype=dtype, load_t5=load_t5)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: SD3Config | str | None = None,
        text_encoders_from: str | os.PathLike | None = None,
        tokenizer_3=None,
        load_t5: bool = True,
        dtype: str | None = None,
        quantize: str | None = None,
        quantize_components=None,
    ):
        """Load an original SD3 / SD3.5 single file (``weights.sd3_single_file`` describes the layout).

        Args:
            path: the ``.safetensors`` (or ``.ckpt``) file.
            config: an SD3Config or SD3 preset name; None: the preset whose transformer the file holds.
            text_encoders_from: a diffusers SD3 folder giving the text encoders (and tokenizers) the
                file lacks.
            tokenizer_3: the T5 ``spiece.model`` (or a ``T5Tokenizer``) for a file with T5 weights.
            load_t5: False runs without T5 even when the file has it.
            dtype: as in the constructor.
            quantize, quantize_components: as in ``from_pretrained``.

        Raises:
            ValueError: for a file that is not SD3's, missing CLIP encoders, or T5 without a tokenizer.
        """
        from tf_diffusion.execution import quantize as quantizing

        build = quantizing.builder(cls, quantize, quantize_components)  # quantize= (execution.quantize)
        return _sd3_hooks().load(
            build,
            pathlib.Path(path),
            config=config,
            text_encoders_from=text_encoders_from,
            tokenizer_3=tokenizer_3,
            load_t5=load_t5,
            dtype=dtype,
        )

    def __repr__(self) -> str:
        t5 = "with T5" if self.text_encoder_3 is not None else "without T5"
        return f"StableDiffusion3({self.config.name!r}, {t5})"

    def encode_prompts(
        self, prompts: Sequence[str], max_sequence_length: int | None = None, executor=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (context (B, 77 + L, joint_attention_dim), pooled (B, P)), float32 (``encode_prompts``)."""
        return encode_prompts(
            self, prompts, max_sequence_length, self.executor if executor is None else executor
        )

    def decode(self, latents, jit_compile: bool | None = None, executor=None) -> np.ndarray:
        """Transformer latents (N, h, w, 16) -> images (N, H, W, 3) in [-1, 1] (``decode_latents``)."""
        return self.decode_latents(latents, jit_compile, executor)


def _sd3_hooks():
    from tf_diffusion.families import FAMILIES

    return FAMILIES["sd3"].family_hooks()


def encode_prompts(
    sd, prompts: Sequence[str], max_sequence_length: int | None, executor
) -> tuple[np.ndarray, np.ndarray]:
    """An SD3 model's prompts -> (context (B, 77 + L, joint_attention_dim), pooled (B, P)), float32.

    Raises:
        ValueError: for a ``max_sequence_length`` outside 1..512, or a T5 model without its tokenizer.
    """
    cfg = sd.config
    length = cfg.max_sequence_length if max_sequence_length is None else max_sequence_length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 512:
        raise ValueError(f"max_sequence_length={length!r} must be an integer in 1..512")
    hidden, pooled = [], []
    for tokenizer, encoder in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
        out = executor.encode_text(
            encoder, tokenizer(list(prompts)), clip_skip=1, final_norm=False, pooled=True
        )
        hidden.append(out[0])
        pooled.append(out[1])
    clip = np.concatenate(hidden, axis=-1)  # (B, 77, 2048)
    width = cfg.transformer.joint_attention_dim
    clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    if sd.text_encoder_3 is None:
        t5 = np.zeros((len(prompts), length, width), np.float32)
    else:
        if sd.tokenizer_3 is None:
            raise ValueError(
                "this model has a T5 encoder but no T5 tokenizer; pass tokenizer_3=T5Tokenizer(spiece.model)"
            )
        long = [p for p in prompts if sd.tokenizer_3.truncated(p, length)]
        if long:
            # diffusers warns and truncates likewise.
            logger.warning(
                "prompts longer than max_sequence_length=%d T5 tokens are truncated: %s", length, long
            )
        t5 = executor.encode_text(sd.text_encoder_3, sd.tokenizer_3(list(prompts), max_length=length))
    return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)


def skip_layer_guidance(
    denoiser, layers, num_layers: int, *, scale, start, stop, guidance_scale, num_steps, num_evals, n
) -> tuple[SkipLayerDenoiser, dict]:
    """diffusers' skip-layer guidance as a denoiser wrapper and its per-step weights.

    At evaluations ``i`` with ``start * num_steps < i < stop * num_steps`` the prediction gains
    ``scale * (cond - cond without these blocks)``.

    Returns:
        (``SkipLayerDenoiser``, per-step inputs: the ``slg_weight`` extra of both bundles).
    """
    layers = _check_skip_layers(layers, num_layers)
    evals = np.arange(num_evals)
    window = (evals > num_steps * start) & (evals < num_steps * stop)
    # The term is folded into the conditional rows (SkipLayerDenoiser): CFG then scales it back.
    weight = np.where(window, np.float32(scale) / np.float32(guidance_scale), 0.0)
    per_step = {
        "cond": {"extra.slg_weight": np.repeat(weight[:, None], n, axis=1).astype(np.float32)},
        "uncond": {"extra.slg_weight": np.zeros((num_evals, n), np.float32)},
    }
    return SkipLayerDenoiser(denoiser, layers), per_step


class SkipLayerDenoiser:
    """``MMDiTDenoiser`` with diffusers' skip-layer guidance folded into the conditional rows.

    The batch is [uncond, cond] (classifier-free guidance). The conditional rows become
    ``cond + w * (cond - skip)``, with ``skip`` the transformer without ``layers`` on the conditional
    rows and ``w`` the per-step ``slg_weight`` extra (skip-layer scale / guidance scale inside the window,
    0 outside; 0 on the unconditional rows), so that guidance gives diffusers'
    ``uncond + s * (cond - uncond) + scale * (cond - skip)``. The skipped pass runs at every evaluation
    (weight 0 outside the window), one traced program for the whole loop.
    """

    def __init__(self, base: MMDiTDenoiser, layers: tuple[int, ...]):
        self.base, self.layers = base, tuple(layers)
        self.transformer = base.transformer

    @property
    def backbone(self):
        return self.transformer

    @property
    def key(self):
        return ("skip-layer", self.base.key, self.layers)

    def __call__(self, x, t, cond: Conditioning):
        from keras import ops

        extras = dict(cond.extras)
        weight = extras.pop("slg_weight")  # (2N,)
        out = self.base(x, t, Conditioning(cond.context, extras))  # (2N, h, w, C): [uncond, cond]
        n = ops.shape(x)[0] // 2
        x_cond = x[n:]
        t_cond = ops.broadcast_to(t, (ops.shape(x_cond)[0],))
        skip = self.transformer(
            x_cond, t_cond, cond.context[n:], extras["pooled_projections"][n:], skip_layers=self.layers
        )
        w = ops.cast(weight[n:], "float32")[:, None, None, None]
        conditional = out[n:] + w * (out[n:] - ops.cast(skip, "float32"))
        return ops.concatenate([out[:n], conditional], axis=0)


def _check_skip_layers(layers, num_layers: int) -> tuple[int, ...]:
    values = tuple(layers) if not isinstance(layers, (str, bytes)) else ()
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"skip_guidance_layers={layers!r} must be a non-empty list of block indices")
    bad = [int(v) for v in values if not 0 <= v < num_layers]
    if bad:
        raise ValueError(
            f"skip_guidance_layers {bad} are not blocks of this transformer; allowed: 0..{num_layers - 1}"
        )
    return tuple(int(v) for v in values)


def clip_tokenizer_config(tokenizer: CLIPTokenizer) -> TokenizerConfig:
    """The TokenizerConfig of a loaded CLIP tokenizer."""
    return TokenizerConfig(
        max_length=tokenizer.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def read_model_index(folder: pathlib.Path) -> dict:
    """model_index.json of an SD3 folder.

    Raises:
        ValueError: if it is missing or names another pipeline class.
    """
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder} has no model_index.json; it is not a diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    name = index.get("_class_name")
    allowed = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    )
    if name not in allowed:
        raise ValueError(f"{folder} holds a {name!r}; an SD3 folder holds one of {list(allowed)}")
    return index
