"""Textual-inversion embeddings: new prompt words whose input vectors come from a file.

Formats read:

- AUTOMATIC1111 ``.pt`` (``string_to_param: {"*": (n, D)}``, read by the allow-list unpickler: nothing in
  the file runs) and ``.safetensors`` (``emb_params: (n, D)``); the word is the file's stem, as in the web
  UI (the file's own ``name`` field is ignored, as the web UI ignores it).
- diffusers / the textual-inversion training script: ``learned_embeds.bin`` or ``.safetensors`` with one
  tensor ``{token: (D,) or (n, D)}``; the word is that key. A folder holding one of those files also works.

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
    """One loaded embedding: its word in prompts and its (n, D) float32 vectors."""

    token: str
    vectors: np.ndarray = field(repr=False)
    source: str

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
    if "clip_l" in keys or "clip_g" in keys:
        raise TextualInversionError(
            f"{path}: an SDXL embedding (clip_l + clip_g); this model has one text encoder (SD 1.x / 2.x)"
        )
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
    try:
        vectors = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TextualInversionError(f"{path}: the embedding is not a tensor ({e})") from None
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not np.isfinite(vectors).all():
        raise TextualInversionError(
            f"{path}: embedding vectors must be finite, shaped (D,) or (n, D); got shape {vectors.shape}"
        )
    token = word if token is None else token
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise TextualInversionError(
            f"token must be a non-empty string without surrounding spaces, got {token!r}"
        )
    return Embedding(token, vectors, str(path))


class _State:
    def __init__(self):
        self.embeddings: dict[str, Embedding] = {}  # lower-case token -> embedding


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(sd) -> _State:
    if sd not in _STATES:
        _STATES[sd] = _State()
    return _STATES[sd]


def load_textual_inversion(sd, path, token: str | None = None) -> str:
    """Load an embedding into ``sd``'s prompts; returns its word.

    Args:
        sd: the ``StableDiffusion``.
        path: the embedding file (or a diffusers folder with ``learned_embeds.*``).
        token: its word; default the file's (see ``read_embedding``).

    Raises:
        TextualInversionError: vectors of another width than the text encoder's token embeddings (both
            named), a word already loaded, or a file error (see ``read_embedding``). On any error
            nothing is loaded.
    """
    if sd.config.is_sdxl:
        raise TextualInversionError(
            f"{sd.config.name} is an SDXL model; SDXL embeddings (clip_l and clip_g vectors for its two "
            f"text encoders) are not supported yet: {path}"
        )
    embedding = read_embedding(path, token)
    width = sd.config.text_encoder.hidden_size
    if embedding.vectors.shape[1] != width:
        raise TextualInversionError(
            f"embedding {embedding.token!r} ({path}) has {embedding.vectors.shape[1]}-wide vectors; this "
            f"model's text encoder takes {width}-wide token embeddings (768: SD 1.x, 1024: SD 2.x)"
        )
    state = _state(sd)
    key = embedding.token.lower()
    if key in state.embeddings:
        raise TextualInversionError(
            f"embedding word {embedding.token!r} is already loaded (from {state.embeddings[key].source}); "
            f"pass another token="
        )
    state.embeddings[key] = embedding
    return embedding.token


def unload_textual_inversion(sd, tokens: str | Sequence[str] | None = None) -> None:
    """Forget embeddings (all by default, or the given words).

    Raises:
        ValueError: a word that is not loaded.
    """
    state = _state(sd)
    if tokens is None:
        state.embeddings.clear()
        return
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    missing = [t for t in tokens if t.lower() not in state.embeddings]
    if missing:
        raise ValueError(
            f"embeddings {missing} are not loaded; loaded: {sorted(e.token for e in state.embeddings.values())}"
        )
    for t in tokens:
        del state.embeddings[t.lower()]


def loaded_embeddings(sd) -> dict[str, Embedding]:
    """word -> ``Embedding`` of every embedding loaded into ``sd``."""
    return {e.token: e for e in _state(sd).embeddings.values()}


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


def tokenizer_for(sd, texts: Sequence[str]):
    """``sd.tokenizer``, or an ``EmbeddingTokenizer`` over it when ``texts`` use loaded embeddings."""
    used = [e for e in _state(sd).embeddings.values() if _uses(e, texts)]
    if not used:
        return sd.tokenizer
    return EmbeddingTokenizer(sd.tokenizer, used, sd.config.text_encoder.vocab_size)


def _uses(embedding: Embedding, texts: Sequence[str]) -> bool:
    pattern = _pattern([embedding])
    return any(pattern.search(t) for t in texts)


def used_embeddings(sd, texts: Sequence[str]) -> list[tuple[str, str]]:
    """(word, file) of each loaded embedding that ``texts`` use (for the PNG parameters' ``TI hashes``)."""
    return [(e.token, e.source) for e in _state(sd).embeddings.values() if _uses(e, texts)]


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
