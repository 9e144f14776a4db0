"""SDXL's text conditioning: two text encoders, the pooled embedding and the micro-conditioning time ids.

What diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` compute
(Stability's sgm ``GeneralConditioner`` the same): each prompt is tokenized by both tokenizers (CLIP-L
pads with EOS, OpenCLIP bigG with 0), both encoders' penultimate hidden states (no final layer norm)
are concatenated along the feature axis into the context (CLIP-L first), and bigG's projected pooled
output is the ``text_embeds`` of the UNet's added conditioning. The time ids are
``original_size + crop top-left + target_size`` (base) or ``original_size + crop top-left +
aesthetic score`` (refiner), embedded by the UNet. Long and weighted prompts follow
``tf_diffusion.prompts`` per encoder (each encoder's hidden states weighted and mean-restored on
their own, as the AUTOMATIC1111 web UI does for SDXL); the pooled embedding is the first chunk's.
Textual-inversion words get each encoder's own vectors (``adapters.textual_inversion``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tf_diffusion.denoising import Conditioning
from tf_diffusion.prompts import tokenize_weighted

# diffusers' StableDiffusionXLImg2ImgPipeline defaults (the refiner's aesthetic conditioning).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5

_PAIRS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)
_BASE_ONLY = ("target_size", "negative_target_size")
_REFINER_ONLY = ("aesthetic_score", "negative_aesthetic_score")


@dataclasses.dataclass(frozen=True)
class SDXLOptions:
    """SDXL's micro-conditioning, with diffusers' argument names: ``generate(sdxl_options=...)``.

    Sizes are ``(height, width)`` pairs of positive integers in pixels and crops ``(top, left)`` pairs of
    non-negative integers, as diffusers takes them; None means diffusers' default. A dict with these
    keys is accepted wherever an ``SDXLOptions`` is.

    The values become the UNet's time ids (``original_size + crops_coords_top_left + target_size``; the
    refiner's ``original_size + crops_coords_top_left + aesthetic_score``), as diffusers'
    ``_get_add_time_ids`` builds them:

    * defaults: ``original_size`` and ``target_size`` the output size, crops ``(0, 0)``; the refiner's
      ``aesthetic_score`` 6.0 and ``negative_aesthetic_score`` 2.5.
    * text-to-image (``StableDiffusionXLPipeline``): the unconditional time ids are the positive ones
      unless both ``negative_original_size`` and ``negative_target_size`` are given; then they are
      ``negative_original_size + negative_crops_coords_top_left (default (0, 0)) + negative_target_size``.
    * image-to-image and inpainting (``StableDiffusionXLImg2ImgPipeline`` / ``...InpaintPipeline``): base
      models: ``negative_original_size (default original_size) + crops_coords_top_left +
      negative_target_size (default target_size)``; the refiner: ``negative_original_size +
      negative_crops_coords_top_left (default (0, 0)) + negative_aesthetic_score``.

    Where diffusers would silently ignore a value (a negative crop the task does not read, one
    negative size without the other in text-to-image, a target size on the refiner, an aesthetic
    score on a base model), ``generate()`` raises instead.

    Raises:
        ValueError: for a value that is not a pair of integers of the allowed sign, or a score that
            is not a finite number.
    """

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def __post_init__(self):
        for name in _PAIRS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _pair(value, name, minimum=0 if "crops" in name else 1))
        for name in _REFINER_ONLY:
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.integer, np.floating))
                or not np.isfinite(value)
            ):
                raise ValueError(
                    f"{name}={value!r} must be a finite number (diffusers' default: "
                    f"{AESTHETIC_SCORE if name == 'aesthetic_score' else NEGATIVE_AESTHETIC_SCORE})"
                )
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_value(cls, value) -> SDXLOptions:
        """An ``SDXLOptions``, a dict of its fields, or None (all defaults).

        Raises:
            ValueError: for another type or a key that is not a field.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            fields = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise ValueError(f"sdxl_options has unknown keys {unknown}; allowed: {fields}")
            return cls(**value)
        raise ValueError(f"sdxl_options must be an SDXLOptions, a dict or None, got {type(value).__name__}")

    def given(self) -> list[str]:
        """The names of the fields set (not None)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    allowed = "positive integers" if minimum else "non-negative integers"
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__len__")
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in value)
    ):
        what = "(top, left)" if "crops" in name else "(height, width)"
        raise ValueError(f"{name}={value!r} must be a pair {what} of {allowed}")
    return int(value[0]), int(value[1])


def check_options(config, options: SDXLOptions, image_task: bool) -> None:
    """Refuse micro-conditioning values this model or task would not read (diffusers ignores them).

    Raises:
        ValueError: naming the value, for an SD 1/2 model or a value the task does not use.
    """
    given = options.given()
    if not given:
        return
    if not config.is_sdxl:
        raise ValueError(
            f"sdxl_options {given} apply to SDXL models only; {config.name} is not one (no added conditioning)"
        )
    refiner = config.requires_aesthetics_score
    for name in given:
        if refiner and name in _BASE_ONLY:
            raise ValueError(
                f"{name} does not apply to {config.name}, an SDXL refiner (its time ids hold the aesthetic "
                f"score instead); allowed: original_size, crops_coords_top_left, aesthetic_score and their "
                f"negative_ forms"
            )
        if not refiner and name in _REFINER_ONLY:
            raise ValueError(
                f"{name} applies to SDXL refiners (requires_aesthetics_score) only; {config.name} is a base model"
            )
    if refiner:
        return
    neg_sizes = [options.negative_original_size is not None, options.negative_target_size is not None]
    if not image_task and any(neg_sizes) and not all(neg_sizes):
        raise ValueError(
            "give both negative_original_size and negative_target_size: text-to-image uses negative time "
            "ids only when both are given (diffusers' StableDiffusionXLPipeline)"
        )
    if options.negative_crops_coords_top_left is not None and (image_task or not all(neg_sizes)):
        raise ValueError(
            "negative_crops_coords_top_left is not read here: a base model's image-to-image and inpainting "
            "use crops_coords_top_left for both halves, and text-to-image reads it only with "
            "negative_original_size and negative_target_size (as diffusers)"
        )


def _encoders(sd) -> list[tuple]:
    """(tokenizer, text encoder, pooled?) of each encoder the model has, in context order."""
    out = []
    if sd.text_encoder is not None:
        out.append((sd.tokenizer, sd.text_encoder, False))
    out.append((sd.tokenizer_2, sd.text_encoder_2, True))
    return out


def _encoder_names(sd) -> list[str]:
    """The component names of ``_encoders(sd)``, in the same order."""
    return (["text_encoder"] if sd.text_encoder is not None else []) + ["text_encoder_2"]


def encode_prompts(sd, prompts: Sequence[str], executor) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> the SDXL context and pooled embedding.

    Args:
        sd: a ``StableDiffusion`` of an SDXL config (``text_encoder_2`` set).
        prompts: the texts.
        executor: what runs the text encoders (``encode_text``).

    Returns:
        ``(context, pooled)``: (B, 77 * chunks, context_dim) and (B, projection_dim), float32.
    """
    from tf_diffusion.adapters import textual_inversion
    from tf_diffusion.pipeline import _apply_weights  # the one A1111 weighting rule

    # Each encoder's embedding words become ids past its vocabulary (adapters.textual_inversion).
    encoders = [
        (textual_inversion.tokenizer_for(sd, prompts, name), encoder, with_pooled)
        for name, (_, encoder, with_pooled) in zip(_encoder_names(sd), _encoders(sd), strict=True)
    ]
    chunked = [[tokenize_weighted(tok, p) for p in prompts] for tok, _, _ in encoders]
    count = max(c.num_chunks for per in chunked for c in per)
    contexts, pooled = [], None
    for (tok, encoder, with_pooled), per in zip(encoders, chunked, strict=True):
        empty = tokenize_weighted(tok, "")
        per = [c.padded_to(count, empty) for c in per]
        ids = np.concatenate([c.ids for c in per])  # (B*K, 77)
        options = {}
        if isinstance(tok, textual_inversion.EmbeddingTokenizer):
            options["token_embeds"] = textual_inversion.token_embeddings(encoder, ids, tok)  # (B*K, 77, D)
            ids = textual_inversion.pooling_ids(ids, tok)
        out = executor.encode_text(encoder, ids, clip_skip=1, final_norm=False, pooled=with_pooled, **options)
        hidden = out[0] if with_pooled else out  # (B*K, 77, D)
        if with_pooled:
            pooled = out[1].reshape(len(prompts), count, -1)[:, 0]  # the first chunk's, (B, P)
        hidden = hidden.reshape(len(prompts), count * ids.shape[1], hidden.shape[-1])
        weights = np.stack([c.weights.reshape(-1) for c in per])  # (B, K*77)
        contexts.append(_apply_weights(hidden, weights))
    return np.concatenate(contexts, axis=-1), pooled


def time_ids(
    config, height: int, width: int, n: int, options: SDXLOptions | None = None, image_task: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The micro-conditioning values of ``n`` images, conditional and unconditional.

    Args:
        config: the model's PipelineConfig (``requires_aesthetics_score``: the refiner's time ids).
        height, width: the output size in pixels (the default original and target size).
        n: images.
        options: the micro-conditioning values (``SDXLOptions``; None: diffusers' defaults).
        image_task: image-to-image or inpainting (diffusers' Img2Img / Inpaint pipelines build the
            unconditional ids differently from text-to-image; see ``SDXLOptions``).

    Returns:
        ``(cond, uncond)``: (n, 6) base or (n, 5) refiner, float32.
    """
    o = SDXLOptions() if options is None else options
    original = o.original_size or (height, width)
    target = o.target_size or (height, width)
    crops = o.crops_coords_top_left or (0, 0)
    neg_crops = o.negative_crops_coords_top_left or (0, 0)
    if config.requires_aesthetics_score:
        score = AESTHETIC_SCORE if o.aesthetic_score is None else o.aesthetic_score
        neg_score = (
            NEGATIVE_AESTHETIC_SCORE if o.negative_aesthetic_score is None else o.negative_aesthetic_score
        )
        cond = [*original, *crops, score]
        uncond = [*(o.negative_original_size or original), *neg_crops, neg_score]
    else:
        cond = [*original, *crops, *target]
        if image_task:
            uncond = [*(o.negative_original_size or original), *crops, *(o.negative_target_size or target)]
        elif o.negative_original_size is not None and o.negative_target_size is not None:
            uncond = [*o.negative_original_size, *neg_crops, *o.negative_target_size]
        else:
            uncond = cond
    return tuple(np.tile(np.asarray(v, np.float32)[None], (n, 1)) for v in (cond, uncond))


def text_conditioning(
    sd,
    prompts: Sequence[str],
    negatives: Sequence[str],
    *,
    negatives_given: bool,
    guided: bool,
    num_images: int,
    height: int,
    width: int,
    executor,
    options: SDXLOptions | None = None,
    image_task: bool = False,
) -> tuple[Conditioning, Conditioning | None]:
    """The conditional and (with guidance) unconditional bundles of ``len(prompts) * num_images`` images.

    With ``force_zeros_for_empty_prompt`` (SDXL base's model_index.json) and no negative prompt
    given, the unconditional context and pooled embedding are zeros, as diffusers does. ``options``
    and ``image_task`` choose the time ids (``time_ids``).
    """
    n = len(prompts) * num_images
    zero_negatives = guided and not negatives_given and sd.config.force_zeros_for_empty_prompt
    texts = list(prompts) if zero_negatives or not guided else list(negatives) + list(prompts)
    context, pooled = encode_prompts(sd, texts, executor)
    context = np.repeat(context, num_images, axis=0)
    pooled = np.repeat(pooled, num_images, axis=0)
    ids, neg_ids = time_ids(sd.config, height, width, n, options, image_task)
    cond = Conditioning(context[-n:], {"text_embeds": pooled[-n:], "time_ids": ids})
    if not guided:
        return cond, None
    ids = neg_ids
    if zero_negatives:
        uncond = Conditioning(
            np.zeros_like(cond.context), {"text_embeds": np.zeros_like(pooled[-n:]), "time_ids": ids}
        )
    else:
        uncond = Conditioning(context[:n], {"text_embeds": pooled[:n], "time_ids": ids})
    return cond, uncond
