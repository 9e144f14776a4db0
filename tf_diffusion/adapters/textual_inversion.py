"""Textual-inversion embeddings: new prompt words whose input vectors come from a file.

Formats read:

- AUTOMATIC1111 ``.pt`` (``string_to_param: {"*": (n, D)}``, read by the allow-list unpickler: nothing in
  the file runs) and ``.safetensors`` (``emb_params: (n, D)``); the word is the file's stem, as in the web
  UI (the file's own ``name`` field is ignored, as the web UI ignores it).
- diffusers / the textual-inversion training script: ``learned_embeds.bin`` or ``.safetensors`` with one
  tensor ``{token: (D,) or (n, D)}``; the word is that key. A folder holding one of those files also works.
- SDXL (A1111 / civitai): ``.safetensors`` with ``clip_l`` (n, 768) for ``text_encoder`` and ``clip_g``
  (n, 1280) for ``text_encoder_2``; the word is the file's stem. On an SDXL refiner (only
  ``text_encoder_2``) the ``clip_g`` vectors are used.

diffusers' way for SDXL also works: ``load_textual_inversion(vectors_or_file, token=..., text_encoder=
sd.text_encoder_2, tokenizer=sd.tokenizer_2)`` loads one encoder's vectors (an array, or a file with one
tensor), and a second call the other's. Each encoder knows only the embeddings loaded into it; in the
other, the word stays ordinary text (as in diffusers).

``token=`` overrides the word. An embedding of n vectors stands for n tokens of the prompt.

How the vectors reach the text encoder (the choice the issue asks to state): the token embedding table
is not grown or edited. The tokenizer is wrapped for prompts that use embeddings: each embedding's word
(matched case-insensitively, as the web UI's lower-casing tokenizer does, and as a whole word when it
starts or ends with a letter or digit) becomes n ids past the vocabulary, and attention weights
``(word:1.2)``, ``BREAK`` and 75-token chunking treat them as ordinary tokens. The pipeline then looks up
the ordinary ids in the table, puts the embedding's vectors at the new ids' places, and runs the text
encoder on those input vectors (``CLIPTextEncoder(ids, token_embeds=...)``, the same transformer
``inputs_embeds`` feeds in transformers). So the model's variables, checkpoint keys and shapes stay as
they were: a compiled or exported denoising loop is untouched, a prompt without embeddings is encoded
exactly as before, and removing embeddings is forgetting them. An exported SavedModel's in-graph
tokenizer does not know embeddings.
"""

from __future__ import annotations

import os
import pathlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".ckpt", ".pth")
_DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


class TextualInversionError(ValueError):
    """An embedding file that cannot be used with this model."""


@dataclass(frozen=True)
class Embedding:
    """One embedding: its word in prompts and its (n, D) float32 vectors.

    ``vectors_2`` holds an SDXL file's ``clip_g`` vectors (for ``text_encoder_2``; ``vectors`` are then its
    ``clip_l``); None for single-encoder files and for an embedding loaded into one encoder.
    """

    token: str
    vectors: np.ndarray = field(repr=False)
    source: str
    vectors_2: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])


def _tensors(path: pathlib.Path) -> Mapping:
    if path.suffix.lower() == ".safetensors":
        from tf_diffusion.weights.safetensors_io import open_safetensors

        return open_safetensors(path)
    from tf_diffusion.weights.ckpt import load_ckpt

    data = load_ckpt(path)
    if not isinstance(data, Mapping):
        raise TextualInversionError(f"{path}: an embedding file must hold a dict, got {type(data).__name__}")
    return data


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """Read an embedding file (see the module docstring for the formats).

    Args:
        path: the file, or a folder with ``learned_embeds.safetensors`` / ``learned_embeds.bin``.
        token: its word in prompts; default the file's (stem for A1111 files, key for diffusers files).

    Returns:
        The ``Embedding``.

    Raises:
        FileNotFoundError: no such file.
        TextualInversionError: a file of another kind, several or no tensors where one is expected, or
            vectors that are not (D,) / (n, D) finite numbers; SDXL embeddings (``clip_l`` + ``clip_g``).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in _DIFFUSERS_NAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"embedding folder {str(path)!r} holds none of {', '.join(_DIFFUSERS_NAMES)}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise TextualInversionError(
            f"embedding file {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(EMBEDDING_SUFFIXES)}"
        )
    data = _tensors(path)
    keys = list(data.keys())
    if "clip_l" in keys or "clip_g" in keys:  # SDXL
        missing = [k for k in ("clip_l", "clip_g") if k not in keys]
        if missing:
            raise TextualInversionError(
                f"{path}: an SDXL embedding needs clip_l and clip_g; {missing} missing"
            )
        clip_l = _vectors(data["clip_l"], f"{path} clip_l")
        clip_g = _vectors(data["clip_g"], f"{path} clip_g")
        if clip_l.shape[0] != clip_g.shape[0]:
            raise TextualInversionError(
                f"{path}: clip_l has {clip_l.shape[0]} vectors and clip_g {clip_g.shape[0]}; they must agree"
            )
        return Embedding(_token(path.stem if token is None else token), clip_l, str(path), clip_g)
    if "string_to_param" in keys:  # A1111 .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise TextualInversionError(f"{path}: string_to_param must hold one tensor")
        vectors, word = next(iter(params.values())), path.stem
    elif "emb_params" in keys:  # A1111 .safetensors
        vectors, word = data["emb_params"], path.stem
    else:
        tensors = [k for k in keys if isinstance(k, str)]
        if len(tensors) != 1:
            raise TextualInversionError(
                f"{path}: expected string_to_param, emb_params or one token -> vector entry; found keys "
                f"{sorted(map(str, keys))[:10]}"
            )
        vectors, word = data[tensors[0]], tensors[0]
    return Embedding(_token(word if token is None else token), _vectors(vectors, str(path)), str(path))


def _vectors(value, what: str) -> np.ndarray:
    """(D,) or (n, D) finite numbers -> (n, D) float32."""
    try:
        vectors = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TextualInversionError(f"{what}: the embedding is not a tensor ({e})") from None
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not np.isfinite(vectors).all():
        raise TextualInversionError(
            f"{what}: embedding vectors must be finite, shaped (D,) or (n, D); got shape {vectors.shape}"
        )
    return vectors


def _token(token) -> str:
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise TextualInversionError(
            f"token must be a non-empty string without surrounding spaces, got {token!r}"
        )
    return token


ENCODERS = ("text_encoder", "text_encoder_2")
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class _State:
    def __init__(self):
        # encoder ("text_encoder" / "text_encoder_2") -> lower-case token -> embedding (that encoder's vectors)
        self.embeddings: dict[str, dict[str, Embedding]] = {e: {} for e in ENCODERS}


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(sd) -> _State:
    if sd not in _STATES:
        _STATES[sd] = _State()
    return _STATES[sd]


def _encoders(sd) -> list[str]:
    return [e for e in ENCODERS if getattr(sd, e, None) is not None]


def _target(sd, text_encoder, tokenizer) -> str | None:
    """The encoder diffusers-style ``text_encoder=`` / ``tokenizer=`` arguments name, or None for all."""
    if text_encoder is None and tokenizer is None:
        return None
    names = _encoders(sd)
    enc = next((e for e in names if getattr(sd, e) is text_encoder), None)
    tok = next((e for e in names if getattr(sd, _TOKENIZERS[e]) is tokenizer), None)
    if text_encoder is not None and enc is None:
        raise TextualInversionError(
            f"text_encoder= must be one of this pipeline's encoders ({', '.join(names)})"
        )
    if tokenizer is not None and tok is None:
        raise TextualInversionError(
            f"tokenizer= must be one of this pipeline's tokenizers ({', '.join(_TOKENIZERS[e] for e in names)})"
        )
    if enc is not None and tok is not None and enc != tok:
        raise TextualInversionError(
            f"text_encoder= is {enc} but tokenizer= is {_TOKENIZERS[tok]}; pass a matching pair"
        )
    return enc or tok


def load_textual_inversion(sd, path, token: str | None = None, text_encoder=None, tokenizer=None) -> str:
    """Load an embedding into ``sd``'s prompts; returns its word.

    Args:
        sd: the ``StableDiffusion``.
        path: the embedding file (or a diffusers folder with ``learned_embeds.*``), or (with ``token``) an
            array of (D,) / (n, D) vectors.
        token: its word; default the file's (see ``read_embedding``).
        text_encoder, tokenizer: as diffusers: load into this encoder only (``sd.text_encoder_2`` /
            ``sd.tokenizer_2`` for SDXL's bigG); default every encoder, which for an SDXL model needs an
            SDXL file (``clip_l`` + ``clip_g``).

    Raises:
        TextualInversionError: vectors of another width than the encoder's token embeddings (both
            named), a single-encoder file on an SDXL model without ``text_encoder=``, an SDXL file on an
            SD 1.x / 2.x model, a word already loaded into that encoder, or a file error (see
            ``read_embedding``). On any error nothing is loaded.
    """
    if isinstance(path, (str, os.PathLike)):
        embedding = read_embedding(path, token)
    else:
        if token is None:
            raise TextualInversionError("token= is needed for embedding vectors given as an array")
        embedding = Embedding(_token(token), _vectors(path, f"vectors for {token!r}"), "<array>")
    target = _target(sd, text_encoder, tokenizer)
    sdxl = embedding.vectors_2 is not None
    if target is not None:
        vectors = {
            target: (embedding.vectors_2 if sdxl and target == "text_encoder_2" else embedding.vectors)
        }
    elif sdxl:
        if sd.config.text_encoder_2 is None:
            raise TextualInversionError(
                f"{path}: an SDXL embedding (clip_l + clip_g); this model has one text encoder (SD 1.x / 2.x)"
            )
        vectors = {"text_encoder": embedding.vectors, "text_encoder_2": embedding.vectors_2}
        vectors = {e: v for e, v in vectors.items() if e in _encoders(sd)}  # a refiner: clip_g only
    elif sd.config.text_encoder_2 is not None:
        raise TextualInversionError(
            f"embedding {embedding.token!r} ({path}) has one set of {embedding.vectors.shape[1]}-wide vectors "
            f"(an SD 1.x / 2.x embedding); {sd.config.name} is an SDXL model with two text encoders: give an "
            f"SDXL file (clip_l + clip_g) or load the vectors into one encoder with text_encoder= and tokenizer="
        )
    else:
        vectors = {"text_encoder": embedding.vectors}
    state = _state(sd)
    key = embedding.token.lower()
    for enc, v in vectors.items():
        width = getattr(sd.config, enc).hidden_size
        if v.shape[1] != width:
            part = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}[enc] if sdxl else "its vectors"
            raise TextualInversionError(
                f"embedding {embedding.token!r} ({path}): {part} are {v.shape[1]}-wide vectors; this model's "
                f"{enc} takes {width}-wide token embeddings (768: SD 1.x / SDXL CLIP-L, 1024: SD 2.x, "
                f"1280: SDXL bigG)"
            )
        if key in state.embeddings[enc]:
            raise TextualInversionError(
                f"embedding word {embedding.token!r} is already loaded into {enc} (from "
                f"{state.embeddings[enc][key].source}); pass another token="
            )
    for enc, v in vectors.items():
        state.embeddings[enc][key] = Embedding(embedding.token, v, embedding.source)
    return embedding.token


def unload_textual_inversion(sd, tokens: str | Sequence[str] | None = None) -> None:
    """Forget embeddings (all by default, or the given words), from every encoder.

    Raises:
        ValueError: a word that is not loaded.
    """
    state = _state(sd)
    if tokens is None:
        for loaded in state.embeddings.values():
            loaded.clear()
        return
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    known = {k for loaded in state.embeddings.values() for k in loaded}
    missing = [t for t in tokens if t.lower() not in known]
    if missing:
        raise ValueError(f"embeddings {missing} are not loaded; loaded: {sorted(loaded_embeddings(sd))}")
    for t in tokens:
        for loaded in state.embeddings.values():
            loaded.pop(t.lower(), None)


def loaded_embeddings(sd) -> dict[str, Embedding]:
    """word -> ``Embedding`` of every embedding loaded into ``sd`` (``vectors``: the first encoder's that has
    it; ``vectors_2``: ``text_encoder_2``'s when both encoders have it)."""
    state = _state(sd)
    first, second = state.embeddings["text_encoder"], state.embeddings["text_encoder_2"]
    out = {}
    for key in [*first, *(k for k in second if k not in first)]:
        a, b = first.get(key), second.get(key)
        if a is not None and b is not None:
            out[a.token] = Embedding(a.token, a.vectors, a.source, b.vectors)
        else:
            out[(a or b).token] = a or b
    return out


def _pattern(embeddings: Sequence[Embedding]) -> re.Pattern:
    parts = []
    for e in sorted(embeddings, key=lambda e: -len(e.token)):  # longest first: "neg" inside "negXL"
        start = r"(?<!\w)" if re.match(r"\w", e.token[0]) else ""
        end = r"(?!\w)" if re.match(r"\w", e.token[-1]) else ""
        parts.append(start + re.escape(e.token) + end)
    return re.compile("|".join(parts), re.IGNORECASE)


class EmbeddingTokenizer:
    """A tokenizer whose ``encode`` also gives each embedding word's ids (past the vocabulary).

    Attributes:
        config: the wrapped tokenizer's config (ids of BOS / EOS / pad).
        vectors: (K, D) float32, the vectors of the new ids ``first_id .. first_id + K - 1``.
        first_id: the first new id (the text encoder's vocabulary size).
    """

    def __init__(self, tokenizer, embeddings: Sequence[Embedding], first_id: int):
        self._tokenizer = tokenizer
        self.config = tokenizer.config
        self.first_id = int(first_id)
        self._ids, offset = {}, self.first_id
        for e in embeddings:
            self._ids[e.token.lower()] = list(range(offset, offset + e.num_vectors))
            offset += e.num_vectors
        self.vectors = np.concatenate([e.vectors for e in embeddings]) if embeddings else None
        self._pattern = _pattern(embeddings) if embeddings else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, each embedding word as its vectors' ids."""
        if self._pattern is None:
            return self._tokenizer.encode(text)
        ids, start = [], 0
        for match in self._pattern.finditer(text):
            ids += self._tokenizer.encode(text[start : match.start()])
            ids += self._ids[match.group(0).lower()]
            start = match.end()
        return ids + self._tokenizer.encode(text[start:])


def tokenizer_for(sd, texts: Sequence[str], encoder: str = "text_encoder"):
    """``encoder``'s tokenizer, or an ``EmbeddingTokenizer`` over it when ``texts`` use embeddings loaded into it."""
    tokenizer = getattr(sd, _TOKENIZERS[encoder])
    used = [e for e in _state(sd).embeddings[encoder].values() if _uses(e, texts)]
    if not used:
        return tokenizer
    return EmbeddingTokenizer(tokenizer, used, getattr(sd.config, encoder).vocab_size)


def _uses(embedding: Embedding, texts: Sequence[str]) -> bool:
    pattern = _pattern([embedding])
    return any(pattern.search(t) for t in texts)


def used_embeddings(sd, texts: Sequence[str]) -> list[tuple[str, str]]:
    """(word, file) of each loaded embedding that ``texts`` use (for the PNG parameters' ``TI hashes``)."""
    return [(e.token, e.source) for e in loaded_embeddings(sd).values() if _uses(e, texts)]


def token_embeddings(text_encoder, ids: np.ndarray, tokenizer: EmbeddingTokenizer) -> np.ndarray:
    """(B, T, D) input vectors for ``ids``: table rows for vocabulary ids, embedding vectors past it."""
    from keras import ops

    ids = np.asarray(ids)
    extra = ids >= tokenizer.first_id
    table = text_encoder.text_model.embeddings.token_embedding.weight
    rows = ops.convert_to_numpy(ops.take(table, np.where(extra, 0, ids).astype(np.int32), axis=0))
    rows = rows.astype(np.float32)
    rows[extra] = tokenizer.vectors[ids[extra] - tokenizer.first_id]
    return rows


def pooling_ids(ids: np.ndarray, tokenizer: EmbeddingTokenizer) -> np.ndarray:
    """``ids`` with the embeddings' ids (past the vocabulary) set to 0, for the pooled output's EOS search.

    The text encoder takes its pooled output at the largest id (the EOS token), so ids past the
    vocabulary must not take part: the pooled output stays at the EOS token, as in the web UI (which
    writes 0 at embedding positions) and transformers' CLIP with its corrected ``eos_token_id``. (diffusers
    on configs with the legacy ``eos_token_id=2``, such as SDXL's published ``text_encoder_2``, pools at
    the embedding id that is largest instead; transformers notes that such configs do not work with added tokens.)
    """
    ids = np.asarray(ids)
    return np.where(ids >= tokenizer.first_id, 0, ids)
