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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tf_diffusion.denoising import Conditioning
from tf_diffusion.prompts import tokenize_weighted

# diffusers' StableDiffusionXLImg2ImgPipeline defaults (the refiner's aesthetic conditioning).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def _encoders(sd) -> list[tuple]:
    """(tokenizer, text encoder, pooled?) of each encoder the model has, in context order."""
    out = []
    if sd.text_encoder is not None:
        out.append((sd.tokenizer, sd.text_encoder, False))
    out.append((sd.tokenizer_2, sd.text_encoder_2, True))
    return out


def encode_prompts(sd, prompts: Sequence[str], executor) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> the SDXL context and pooled embedding.

    Args:
        sd: a ``StableDiffusion`` of an SDXL config (``text_encoder_2`` set).
        prompts: the texts.
        executor: what runs the text encoders (``encode_text``).

    Returns:
        ``(context, pooled)``: (B, 77 * chunks, context_dim) and (B, projection_dim), float32.
    """
    from tf_diffusion.pipeline import _apply_weights  # the one A1111 weighting rule

    encoders = _encoders(sd)
    chunked = [[tokenize_weighted(tok, p) for p in prompts] for tok, _, _ in encoders]
    count = max(c.num_chunks for per in chunked for c in per)
    contexts, pooled = [], None
    for (tok, encoder, with_pooled), per in zip(encoders, chunked, strict=True):
        empty = tokenize_weighted(tok, "")
        per = [c.padded_to(count, empty) for c in per]
        ids = np.concatenate([c.ids for c in per])  # (B*K, 77)
        out = executor.encode_text(encoder, ids, clip_skip=1, final_norm=False, pooled=with_pooled)
        hidden = out[0] if with_pooled else out  # (B*K, 77, D)
        if with_pooled:
            pooled = out[1].reshape(len(prompts), count, -1)[:, 0]  # the first chunk's, (B, P)
        hidden = hidden.reshape(len(prompts), count * ids.shape[1], hidden.shape[-1])
        weights = np.stack([c.weights.reshape(-1) for c in per])  # (B, K*77)
        contexts.append(_apply_weights(hidden, weights))
    return np.concatenate(contexts, axis=-1), pooled


def time_ids(config, height: int, width: int, n: int, aesthetic_score: float | None = None) -> np.ndarray:
    """The micro-conditioning values of ``n`` images: (n, 6) base or (n, 5) refiner, float32.

    original_size = target_size = (height, width) and crop top-left (0, 0), as diffusers' defaults.
    """
    if config.requires_aesthetics_score:
        score = AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score
        values = [height, width, 0, 0, score]
    else:
        values = [height, width, 0, 0, height, width]
    return np.tile(np.asarray(values, np.float32)[None], (n, 1))


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
) -> tuple[Conditioning, Conditioning | None]:
    """The conditional and (with guidance) unconditional bundles of ``len(prompts) * num_images`` images.

    With ``force_zeros_for_empty_prompt`` (SDXL base's model_index.json) and no negative prompt
    given, the unconditional context and pooled embedding are zeros, as diffusers does.
    """
    n = len(prompts) * num_images
    zero_negatives = guided and not negatives_given and sd.config.force_zeros_for_empty_prompt
    texts = list(prompts) if zero_negatives or not guided else list(negatives) + list(prompts)
    context, pooled = encode_prompts(sd, texts, executor)
    context = np.repeat(context, num_images, axis=0)
    pooled = np.repeat(pooled, num_images, axis=0)
    ids = time_ids(sd.config, height, width, n)
    cond = Conditioning(context[-n:], {"text_embeds": pooled[-n:], "time_ids": ids})
    if not guided:
        return cond, None
    if sd.config.requires_aesthetics_score:
        ids = time_ids(sd.config, height, width, n, NEGATIVE_AESTHETIC_SCORE)
    if zero_negatives:
        uncond = Conditioning(
            np.zeros_like(cond.context), {"text_embeds": np.zeros_like(pooled[-n:]), "time_ids": ids}
        )
    else:
        uncond = Conditioning(context[:n], {"text_embeds": pooled[:n], "time_ids": ids})
    return cond, uncond
