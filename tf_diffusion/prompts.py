"""Weighted and long prompts with the attention syntax of the AUTOMATIC1111 web UI.

Attention syntax (read by ``parse_prompt_attention``):
    ``(words)``        multiply the weight of ``words`` by 1.1 (nesting compounds: ``((a))`` = 1.21)
    ``[words]``        divide it by 1.1
    ``(words:1.3)``    multiply it by 1.3 (an explicit weight; ``(words: 1.3 )`` too)
    ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``  literal brackets and backslash; any other backslash is dropped
    ``BREAK``          end the current 75-token chunk here (the upper-case word on its own)
    An unclosed bracket applies to the rest of the prompt; a closing bracket with nothing open is text.

The rules are those the web UI documents and its users rely on; the parser is our own. A bracket group
weighs every piece of text written while it is open, so round and square groups may even cross
(``(a [b) c]``). Two deliberate differences from the web UI, both on inputs it mishandles:
``BREAK`` inside brackets is still a chunk boundary (the web UI turns it into the word "BREAK" with a
negative weight), and a weight that is not a finite number (``(a:1.2.3)``) is text (the web UI fails).
Weight magnitudes are capped at ``MAX_WEIGHT`` so that absurd nesting stays finite in float32.

Long prompts: token ids are cut into chunks of 75 (a chunk that fills up ends instead after its last comma
when that comma is one of its final 20 tokens, so a phrase is not split); each chunk becomes
``[BOS] + 75 ids + [EOS]`` padded to 77 and is encoded on its own, and the chunks' hidden states are
concatenated along the token axis. Per-token weights multiply the hidden states, which are then rescaled
to keep their original mean. A plain prompt of up to 75 tokens therefore gives exactly the CLIP encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
ROUND_UP, ROUND_DOWN = 1.1, 1 / 1.1
MAX_WEIGHT = 1e4
BREAK = ("BREAK", -1.0)

_ESCAPABLE = "()[]\\"
_KEYWORD = "BREAK"


def _is_word(char: str) -> bool:
    # A word character as regular expressions define it (``\w``): BREAK must stand alone.
    return char.isalnum() or char == "_"


def _weight_at(text: str, start: int) -> tuple[float, int] | None:
    """Read ``:<number>)`` at ``text[start] == ':'``: the weight and the index after ``)``, or None."""
    i = start + 1
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    begin = i
    if i < n and text[i] in "+-":
        i += 1
    digits = i
    while i < n and (text[i] == "." or text[i].isdecimal()):
        i += 1
    if i == digits:
        return None
    number = text[begin:i]
    while i < n and text[i].isspace():
        i += 1
    if i == n or text[i] != ")":
        return None
    try:
        weight = float(number)
    except ValueError:  # "1.2.3" or "."
        return None
    if not math.isfinite(weight):  # hundreds of digits
        return None
    return weight, i + 1


class _Group:
    """One bracket group: its kind, and once resolved, its multiplier and when it was applied."""

    __slots__ = ("kind", "multiplier", "order")

    def __init__(self, kind: str):
        self.kind = kind
        self.multiplier = 1.0
        self.order = -1


class _Reader:
    """Scans a prompt once, collecting text pieces with the bracket groups open while each was written."""

    def __init__(self, text: str):
        self.text = text
        self.pieces: list[tuple[str, tuple[_Group, ...]] | None] = []  # None stands for BREAK
        self.open: dict[_Group, None] = {}  # insertion-ordered set of open groups
        self.stacks: dict[str, list[_Group]] = {"(": [], "[": []}
        self.resolved = 0
        self.buffer: list[str] = []
        self.floor = 0  # BREAK swallows whitespace back to here, not across other syntax

    def flush(self) -> None:
        if self.buffer:
            self.pieces.append(("".join(self.buffer), tuple(self.open)))
        self.buffer = []
        self.floor = 0

    def literal(self, chars: str) -> None:
        self.buffer.append(chars)
        self.floor = len(self.buffer)

    def begin(self, kind: str) -> None:
        self.flush()
        group = _Group(kind)
        self.stacks[kind].append(group)
        self.open[group] = None

    def end(self, kind: str, multiplier: float) -> None:
        self.flush()
        group = self.stacks[kind].pop()
        del self.open[group]
        self.resolve(group, multiplier)

    def resolve(self, group: _Group, multiplier: float) -> None:
        group.multiplier = multiplier
        group.order = self.resolved
        self.resolved += 1

    def keyword_break(self) -> None:
        while len(self.buffer) > self.floor and self.buffer[-1].isspace():
            self.buffer.pop()
        self.flush()
        self.pieces.append(None)

    def run(self) -> None:
        text, n, i = self.text, len(self.text), 0
        while i < n:
            char = text[i]
            if char == "\\":
                if i + 1 < n and text[i + 1] in _ESCAPABLE:
                    self.literal(text[i + 1])
                    i += 2
                else:
                    self.floor = len(self.buffer)
                    i += 1
            elif char in "([":
                self.begin(char)
                i += 1
            elif char == ")" and self.stacks["("]:
                self.end("(", ROUND_UP)
                i += 1
            elif char == "]" and self.stacks["["]:
                self.end("[", ROUND_DOWN)
                i += 1
            elif char == ":" and self.stacks["("] and (found := _weight_at(text, i)) is not None:
                weight, i = found
                self.end("(", weight)
            elif (
                char == "B"
                and text.startswith(_KEYWORD, i)
                and (i == 0 or not _is_word(text[i - 1]))
                and (i + len(_KEYWORD) == n or not _is_word(text[i + len(_KEYWORD)]))
            ):
                self.keyword_break()
                i += len(_KEYWORD)
                while i < n and text[i].isspace():
                    i += 1
            else:
                self.buffer.append(char)
                i += 1
        self.flush()
        # Unclosed groups apply to the rest of the prompt: round ones first, then square, each in the
        # order they were opened (the order fixes the last bit of the products, hence which pieces merge).
        for kind, multiplier in (("(", ROUND_UP), ("[", ROUND_DOWN)):
            for group in self.stacks[kind]:
                self.resolve(group, multiplier)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces by the A1111 attention syntax (see the module docstring).

    Args:
        text: the prompt; every string is accepted.

    Returns:
        Pieces with their weights; adjacent pieces of equal weight are merged. ``BREAK`` appears as the
        piece ``("BREAK", -1.0)`` (``prompts.BREAK``); every other weight is finite and at most
        ``MAX_WEIGHT`` in magnitude, and positive unless the prompt writes a weight <= 0 (``(a:-1)``).
        A prompt with no text gives ``[("", 1.0)]``.

    Raises:
        ValueError: if ``text`` is not a string.

    Example:
        >>> parse_prompt_attention("a (red:1.5) [cat]")
        [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}: {text!r}")
    reader = _Reader(text)
    reader.run()

    out: list[tuple[str, float]] = []
    for piece in reader.pieces:
        if piece is None:
            out.append(BREAK)
            continue
        chars, groups = piece
        weight = 1.0
        for group in sorted(groups, key=lambda g: g.order):
            weight *= group.multiplier
        weight = min(max(weight, -MAX_WEIGHT), MAX_WEIGHT)
        if out and out[-1] != BREAK and out[-1][1] == weight:
            out[-1] = (out[-1][0] + chars, weight)
        else:
            out.append((chars, weight))
    return out or [("", 1.0)]


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


def _chunk_ends(ids: list[int], comma_id: int | None) -> list[int]:
    """Where each chunk of one BREAK-free run of ids ends (exclusive indices; the last is ``len(ids)``)."""
    ends: list[int] = []
    start = 0
    while len(ids) - start > CHUNK_TOKENS:
        end = start + CHUNK_TOKENS
        # A full chunk followed by a comma keeps all 75; otherwise it ends after a comma among its last
        # COMMA_BACKTRACK tokens and the words after that comma open the next chunk.
        if ids[end] != comma_id:
            for position in range(end - 1, end - 1 - COMMA_BACKTRACK, -1):
                if ids[position] == comma_id:
                    end = position + 1
                    break
        ends.append(end)
        start = end
    ends.append(len(ids))
    return ends


def tokenize_weighted(tokenizer, text: str) -> PromptChunks:
    """Tokenize a prompt with A1111 weights and chunking (see the module docstring).

    Args:
        tokenizer: a ``CLIPTokenizer`` (``encode`` and ``config`` with bos/eos/pad ids).
        text: the prompt.

    Returns:
        The prompt's chunks; at least one. ``BREAK`` closes a chunk (a leading ``BREAK`` gives an empty
        first chunk, a trailing one adds nothing).

    Raises:
        ValueError: if ``text`` is not a string.
    """
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None
    runs: list[tuple[list[int], list[float]]] = [([], [])]  # one per BREAK-separated run
    for piece, weight in parse_prompt_attention(text):
        if (piece, weight) == BREAK:
            runs.append(([], []))
            continue
        tokens = tokenizer.encode(piece)
        runs[-1][0].extend(tokens)
        runs[-1][1].extend([weight] * len(tokens))
    if len(runs) > 1 and not runs[-1][0]:
        runs.pop()  # nothing after the last BREAK

    cfg = tokenizer.config
    rows_ids: list[list[int]] = []
    rows_weights: list[list[float]] = []
    for ids, weights in runs:
        start = 0
        for end in _chunk_ends(ids, comma_id):
            pad = CHUNK_TOKENS - (end - start)
            rows_ids.append([cfg.bos_token_id, *ids[start:end], *[cfg.eos_token_id] * pad, cfg.eos_token_id])
            rows_weights.append([1.0, *weights[start:end], *[1.0] * pad, 1.0])
            start = end
    out_ids = np.asarray(rows_ids, dtype=np.int32)
    out_weights = np.asarray(rows_weights, dtype=np.float32)
    if cfg.pad_token_id != cfg.eos_token_id:
        # Slots after a chunk's first EOS take the tokenizer's pad id (0 for SD 2.x), as the tokenizer does.
        for row in out_ids:
            first_eos = int(np.argmax(row == cfg.eos_token_id))
            row[first_eos + 1 :] = cfg.pad_token_id
    return PromptChunks(out_ids, out_weights)
