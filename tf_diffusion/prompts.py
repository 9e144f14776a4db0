"""Weighted and long prompts, following the AUTOMATIC1111 web UI rules.

Attention syntax (parsed by ``parse_prompt_attention``):
    ``(words)``        multiply the weight of ``words`` by 1.1 (nesting compounds: ``((a))`` = 1.21)
    ``[words]``        divide it by 1.1
    ``(words:1.3)``    set an explicit multiplier of 1.3
    ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``  literal brackets and backslash
    ``BREAK``          end the current 75-token chunk here
    An unclosed bracket applies to the rest of the prompt.

Long prompts: token ids are cut into chunks of 75 (breaking at the last comma
when one lies within the final 20 tokens of a chunk, as A1111 does); each chunk
becomes ``[BOS] + 75 ids + [EOS]`` padded to 77, is encoded on its own, and the
chunks' hidden states are concatenated along the token axis. Per-token weights
multiply the hidden states, which are then rescaled to keep their original mean.
A plain prompt of up to 75 tokens therefore gives exactly the plain CLIP encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
ROUND_UP, ROUND_DOWN = 1.1, 1 / 1.1

_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces by the A1111 attention syntax.

    Args:
        text: the prompt.

    Returns:
        Pieces with their weights; adjacent pieces of equal weight are merged.
        ``BREAK`` appears as the piece ``("BREAK", -1.0)``.

    Example:
        >>> parse_prompt_attention("a (red:1.5) [cat]")
        [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}: {text!r}")
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_UP)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), ROUND_DOWN)
        else:
            parts = _BREAK.split(token)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, ROUND_UP)
    for pos in square_brackets:
        multiply_range(pos, ROUND_DOWN)

    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for piece in res[1:]:
        if piece[1] == merged[-1][1] and piece[0] != "BREAK" and merged[-1][0] != "BREAK":
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


@dataclass(frozen=True)
class PromptChunks:
    """A prompt as 77-token chunks: ids (K, 77) int32 and weights (K, 77) float32."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def num_chunks(self) -> int:
        return self.ids.shape[0]

    def padded_to(self, num_chunks: int, empty: PromptChunks) -> PromptChunks:
        """Append copies of an empty chunk until there are ``num_chunks``."""
        extra = num_chunks - self.num_chunks
        if extra <= 0:
            return self
        return PromptChunks(
            np.concatenate([self.ids, np.repeat(empty.ids[:1], extra, axis=0)]),
            np.concatenate([self.weights, np.repeat(empty.weights[:1], extra, axis=0)]),
        )


def tokenize_weighted(tokenizer, text: str) -> PromptChunks:
    """Tokenize a prompt with A1111 weights and chunking (see the module docstring)."""
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal ids, weights, last_comma
        to_add = CHUNK_TOKENS - len(ids)
        if to_add > 0:
            ids = ids + [tokenizer.config.eos_token_id] * to_add
            weights = weights + [1.0] * to_add
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for text_piece, weight in parse_prompt_attention(text):
        if weight == -1.0 and text_piece == "BREAK":
            next_chunk()
            continue
        tokens = tokenizer.encode(text_piece)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_id:
                last_comma = len(ids)
            elif (
                COMMA_BACKTRACK != 0
                and len(ids) == CHUNK_TOKENS
                and last_comma != -1
                and len(ids) - last_comma <= COMMA_BACKTRACK
            ):
                # Break at the last comma so a phrase is not split across chunks.
                break_at = last_comma + 1
                rest_ids, rest_weights = ids[break_at:], weights[break_at:]
                ids, weights = ids[:break_at], weights[:break_at]
                next_chunk()
                ids, weights = rest_ids, rest_weights
            if len(ids) == CHUNK_TOKENS:
                next_chunk()
            ids.append(token)
            weights.append(weight)
            position += 1

    if ids or not chunks:
        next_chunk()

    cfg = tokenizer.config
    out_ids = np.asarray(
        [[cfg.bos_token_id] + chunk_ids + [cfg.eos_token_id] for chunk_ids, _ in chunks], dtype=np.int32
    )
    out_weights = np.asarray([[1.0] + chunk_weights + [1.0] for _, chunk_weights in chunks], dtype=np.float32)
    if cfg.pad_token_id != cfg.eos_token_id:
        # Slots after a chunk's first EOS take the tokenizer's pad id (0 for SD 2.x), as the tokenizer does.
        for row in out_ids:
            first_eos = int(np.argmax(row == cfg.eos_token_id))
            row[first_eos + 1 :] = cfg.pad_token_id
    return PromptChunks(out_ids, out_weights)
