"""CLIP byte-level BPE tokenizer, as OpenAI CLIP's SimpleTokenizer; the vocabulary ships as package data."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import ftfy
import numpy as np
import regex

from tf_diffusion.config import TokenizerConfig

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

_DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of its BPE file, so that 256 byte symbols, 256 byte
# symbols with </w>, the merges and the two special tokens make a 49408-entry vocabulary.
_NUM_MERGES = 49152 - 256 - 2
_MERGES_HEADER = "#version: 0.2"
# The exact CLIP pre-tokenizer: special tokens, English contractions, runs of letters, single
# digits, runs of other non-space characters.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_UNRANKED = float("inf")
# Distinct words remembered per tokenizer; cleared when full so a long-running server stays bounded.
_CACHE_SIZE = 1 << 16
# transformers writes int(1e30) as model_max_length when a tokenizer has no length limit.
_MAX_CONTEXT = 1 << 20


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space,
    a few Latin-1 gaps) map to U+0100 onwards in byte order, so BPE never sees whitespace.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed, lowercase."""
    text = ftfy.fix_text(text)
    # Twice, as CLIP does, so doubly escaped entities (&amp;amp;) come out as plain characters.
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The CLIP vocabulary for a merge list: bytes, bytes + </w>, merged pairs, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = [
        *symbols,
        *(s + END_OF_WORD for s in symbols),
        *("".join(m) for m in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merge list produces the same token twice; it is not a CLIP BPE merge list")
    return vocab


@functools.lru_cache(maxsize=1)
def _package_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocab and merges built from the shipped BPE file, once per process."""
    with gzip.open(_DATA_DIR / _BPE_FILE, "rt", encoding="utf-8") as f:
        text = f.read()
    # Line 0 is a header; only the first _NUM_MERGES merges are used (maxsplit avoids splitting the rest).
    lines = text.split("\n", _NUM_MERGES + 1)[1 : _NUM_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    return vocab_from_merges(merges), merges


def _read_merges(path: pathlib.Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        # transformers writes a "#version: 0.2" header; blank lines end files.
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path} line {number}: expected two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_tokenizer_json(path: pathlib.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges of a Hugging Face ``tokenizer.json`` holding a BPE model."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path}: expected a BPE model in tokenizer.json, got {type(model).__name__}")
    vocab, raw = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(raw, list):
        raise ValueError(f"{path}: tokenizer.json lacks model.vocab or model.merges")
    merges = []
    for entry in raw:
        pair = entry.split(" ") if isinstance(entry, str) else entry
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{path}: bad merge entry {entry!r}; expected 'a b' or [a, b]")
        merges.append((str(pair[0]), str(pair[1])))
    for entry in data.get("added_tokens") or []:
        if isinstance(entry, dict) and "content" in entry and "id" in entry:
            vocab.setdefault(entry["content"], int(entry["id"]))
    return {str(k): int(v) for k, v in vocab.items()}, merges


def _token_content(value) -> str | None:
    """A special token as transformers stores it: a string or {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}; expected a string or {{'content': str}}")


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer giving the (B, 77) token ids Stable Diffusion's text encoder reads.

    Follows OpenAI CLIP's ``SimpleTokenizer`` exactly (ftfy, HTML unescaping, whitespace collapse,
    lowercase, the CLIP pre-tokenization regex, BPE with ``</w>`` word ends). Each prompt becomes
    ``[BOS, tokens..., EOS, pad...]``; a prompt longer than ``max_length - 2`` tokens is cut so the
    row still ends in EOS. SD 1.x pads with EOS (49407); SD 2.x (OpenCLIP) pads with 0 (the token
    "!"), and ``pad_token_id`` changes nothing but the padding. The slow transformers 4.x
    ``CLIPTokenizer`` gives the same ids except that it leaves HTML entities escaped in text
    containing "<", and, with pad_token "!", splits every "!" out as id 0 (open_clip, which SD 2.x
    was trained with, does not); tests/test_tokenizer.py lists where transformers 5.x differs.

    Args:
        config: max_length and the BOS/EOS/pad ids. None: 77 positions and padding with EOS,
            with BOS/EOS ids read from the vocabulary.
        pad_token_id: overrides ``config.pad_token_id`` (0 for SD 2.x, 49407 for SD 1.x).
        vocab: token -> id. Together with ``merges``; both None loads the shipped CLIP vocabulary.
        merges: BPE merges in priority order, as (left, right) symbol pairs.

    Raises:
        ValueError: for a config whose ids disagree with the vocabulary, or an inconsistent
            vocab/merges pair.

    Example:
        >>> tok = CLIPTokenizer()
        >>> tok.encode("A photo of a cat")
        [320, 1125, 539, 320, 2368]
        >>> tok(["A photo of a cat"])[0, :7].tolist()
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """

    def __init__(
        self,
        config: TokenizerConfig | None = None,
        *,
        pad_token_id: int | None = None,
        vocab: Mapping[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
    ):
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither to use the shipped CLIP vocabulary")
        if vocab is None:
            vocab, merges = _package_vocabulary()
        else:
            vocab, merges = self._checked_vocabulary(vocab, merges)
        if config is not None and not isinstance(config, TokenizerConfig):
            raise ValueError(f"config must be a TokenizerConfig or None, got {type(config).__name__}")
        for name in (BOS_TOKEN, EOS_TOKEN):
            if name not in vocab:
                raise ValueError(f"the vocabulary has no {name!r} token, which CLIP needs")
        if config is None:
            eos = vocab[EOS_TOKEN]
            config = TokenizerConfig(bos_token_id=vocab[BOS_TOKEN], eos_token_id=eos, pad_token_id=eos)
        if pad_token_id is not None:
            config = dataclasses.replace(config, pad_token_id=pad_token_id)

        self.vocab: dict[str, int] = dict(vocab)
        self.merges: list[tuple[str, str]] = [tuple(m) for m in merges]
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._check_config(config)
        self.config = config
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._byte_to_unicode = bytes_to_unicode()
        self._unicode_to_byte = {c: b for b, c in self._byte_to_unicode.items()}
        # CLIP maps the special tokens straight to their ids instead of running BPE on them.
        self._special = {BOS_TOKEN: (self.vocab[BOS_TOKEN],), EOS_TOKEN: (self.vocab[EOS_TOKEN],)}
        self._cache: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _checked_vocabulary(vocab, merges) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """Vocab and merges validated so that encoding can never meet an unknown symbol."""
        if not isinstance(vocab, Mapping):
            raise ValueError(f"vocab must map token strings to ids, got {type(vocab).__name__}")
        for token, index in vocab.items():
            if (
                not isinstance(token, str)
                or not isinstance(index, int)
                or isinstance(index, bool)
                or index < 0
            ):
                raise ValueError(f"vocab entry {token!r}: {index!r} is not a string mapped to an id >= 0")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError("vocab gives the same id to two tokens")
        checked = []
        for merge in merges:
            if len(merge) != 2 or not all(isinstance(s, str) and s for s in merge):
                raise ValueError(f"merge {merge!r} is not a pair of non-empty symbols")
            checked.append((merge[0], merge[1]))
        symbols = list(bytes_to_unicode().values())
        needed = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in checked)]
        missing = [t for t in needed if t not in vocab]
        if missing:
            raise ValueError(
                f"vocab lacks {len(missing)} byte symbols or merge results, e.g. {missing[:5]}; "
                "vocab.json and merges.txt do not belong together"
            )
        return dict(vocab), checked

    def _check_config(self, config: TokenizerConfig) -> None:
        for name in ("max_length", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TokenizerConfig.{name} must be an int, got {value!r}")
        if not 2 <= config.max_length <= _MAX_CONTEXT:
            raise ValueError(
                f"max_length={config.max_length} is not a usable context length; "
                f"expected 2 to {_MAX_CONTEXT} (CLIP uses 77)"
            )
        for name, token in (("bos_token_id", BOS_TOKEN), ("eos_token_id", EOS_TOKEN)):
            if getattr(config, name) != self.vocab[token]:
                raise ValueError(
                    f"{name}={getattr(config, name)} but the vocabulary has {token} at id {self.vocab[token]}"
                )
        if config.pad_token_id not in self._id_to_token:
            raise ValueError(
                f"pad_token_id={config.pad_token_id} is not in the vocabulary (ids 0 to {len(self.vocab) - 1}); "
                f"use {self.vocab[EOS_TOKEN]} (EOS, SD 1.x) or 0 (SD 2.x)"
            )

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def bos_token_id(self) -> int:
        return self.config.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.config.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def padded_with(self, pad_token_id: int) -> CLIPTokenizer:
        """This vocabulary and these merges, padding with ``pad_token_id`` (SDXL's second tokenizer)."""
        config = dataclasses.replace(self.config, pad_token_id=pad_token_id)
        return CLIPTokenizer(config, vocab=self.vocab, merges=self.merges)

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"pad_token_id={self.pad_token_id})"
        )

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece: its UTF-8 bytes as symbols, merged by BPE rank."""
        special = self._special.get(piece)
        if special is not None:
            return special
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        chars = "".join(self._byte_to_unicode[b] for b in piece.encode("utf-8"))
        word = [*chars[:-1], chars[-1] + END_OF_WORD]  # the last symbol carries the word end
        ranks = self._ranks
        while len(word) > 1:
            # The adjacent pair merged earliest in training goes first; stop when no pair is a merge.
            pair = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, _UNRANKED))
            if pair not in ranks:
                break
            first, second = pair
            merged = []
            i = 0
            while i < len(word):
                # Every occurrence, left to right, without overlap ("a a a" -> "aa a").
                if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = tuple(self.vocab[symbol] for symbol in word)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS, padding or truncation.

        Args:
            text: the prompt.

        Returns:
            The ids, as many as the text needs (for long-prompt chunking and prompt weighting).

        Raises:
            ValueError: if ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__} {_describe(text)}")
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            ids.extend(self._bpe(piece))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Fixed-length rows of token ids for the text encoder.

        Args:
            texts: a prompt or a list/tuple of prompts.

        Returns:
            int32 array (B, max_length): ``[BOS, ids..., EOS, pad...]`` per prompt; ids beyond
            ``max_length - 2`` are dropped so every row keeps its EOS.

        Raises:
            ValueError: if ``texts`` is not a str or a non-empty list/tuple of str.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise ValueError(
                f"texts must be a str or a list/tuple of str, got {type(texts).__name__} {_describe(texts)}"
            )
        if not texts:
            raise ValueError("texts is empty; give at least one prompt")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__} {_describe(text)}")
        length = self.max_length
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int32)  # (B, L)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id, *self.encode(text)[: length - 2], self.eos_token_id]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (lowercased and cleaned, as the tokenizer saw it).

        Args:
            ids: 1-D ids, e.g. one row of ``tokenizer(texts)`` or ``encode`` output.
            skip_special_tokens: drop BOS, and stop at the first EOS so padding (EOS or 0) is dropped too.

        Returns:
            The text as CLIP decodes it: a space after each word-final token, so "cat," gives "cat ,".

        Raises:
            ValueError: for an id outside the vocabulary or input that is not 1-D integers.
        """
        array = np.asarray(ids)
        if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of integers, got {_describe(ids)}")
        tokens = []
        for index in array.tolist():
            if skip_special_tokens and index == self.eos_token_id:
                break
            if skip_special_tokens and index == self.bos_token_id:
                continue
            if index not in self._id_to_token:
                raise ValueError(f"id {index} is not in the vocabulary (ids 0 to {len(self.vocab) - 1})")
            tokens.append(self._id_to_token[index])
        data = bytearray()
        for char in "".join(tokens).replace(END_OF_WORD, " "):
            byte = self._unicode_to_byte.get(char)
            # Only a hand-made vocabulary can hold characters outside the byte map; keep them as they are.
            data.extend(char.encode("utf-8") if byte is None else (byte,))
        return data.decode("utf-8", errors="replace").strip()

    @classmethod
    def from_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        config: TokenizerConfig | None = None,
        *,
        pad_token_id: int | None = None,
    ) -> CLIPTokenizer:
        """Load a vocab.json + merges.txt pair, e.g. from a diffusers ``tokenizer/`` folder.

        Args:
            vocab_json: path of vocab.json (token -> id).
            merges_txt: path of merges.txt (optional "#version" header, then one "left right" merge a line).
            config: as for the constructor; None reads BOS/EOS ids from the vocabulary and pads with EOS.
            pad_token_id: overrides the config's pad id.

        Raises:
            ValueError: for missing or malformed files.
        """
        vocab_path, merges_path = pathlib.Path(vocab_json), pathlib.Path(merges_txt)
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise ValueError(f"tokenizer file {str(path)!r} does not exist")
        return cls(
            config, pad_token_id=pad_token_id, vocab=_read_json(vocab_path), merges=_read_merges(merges_path)
        )

    @classmethod
    def from_pretrained_folder(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Load a diffusers/transformers CLIP tokenizer folder.

        Reads vocab.json and merges.txt, and the pad token and ``model_max_length`` from
        tokenizer_config.json and special_tokens_map.json when present (the latter wins, as in
        transformers). A pipeline folder holding a ``tokenizer/`` subfolder is accepted too.

        Args:
            path: the folder.

        Returns:
            The tokenizer, e.g. padding with EOS for SD 1.x folders and with 0 ("!") for SD 2.x ones.

        Raises:
            ValueError: if the folder lacks the files or they name tokens the vocabulary lacks.
        """
        folder = pathlib.Path(path)

        def has_files(f: pathlib.Path) -> bool:
            return ((f / "vocab.json").is_file() and (f / "merges.txt").is_file()) or (
                f / "tokenizer.json"
            ).is_file()

        if not has_files(folder) and has_files(folder / "tokenizer"):
            folder = folder / "tokenizer"
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            # transformers 5 saves only the `tokenizers` file, which holds the same BPE model.
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise ValueError(
                f"{str(folder)!r} is not a tokenizer folder: it needs vocab.json and merges.txt (or tokenizer.json)"
            )

        settings: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update(_read_json(folder / name))
        # Newer transformers files list special tokens that are not in vocab.json under added_tokens_decoder.
        added = {}
        added_tokens = settings.get("added_tokens_decoder") or {}
        if not isinstance(added_tokens, dict):
            raise ValueError(f"{folder}: added_tokens_decoder must be a JSON object, got {added_tokens!r}")
        for index, entry in added_tokens.items():
            content = _token_content(entry)
            if content is not None:
                added[content] = int(index)
        for key, expected in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
            named = _token_content(settings.get(key))
            if named is not None and named != expected:
                raise ValueError(f"{folder}: {key} is {named!r}; a CLIP tokenizer uses {expected!r}")

        bos, eos = vocab.get(BOS_TOKEN), vocab.get(EOS_TOKEN)
        pad_name = _token_content(settings.get("pad_token")) or EOS_TOKEN
        pad = vocab.get(pad_name, added.get(pad_name))
        if pad is None:
            raise ValueError(
                f"{folder}: pad_token {pad_name!r} is in neither vocab.json nor added_tokens_decoder"
            )
        max_length = settings.get("model_max_length", 77)
        if not isinstance(max_length, int) or not 2 <= max_length <= _MAX_CONTEXT:
            raise ValueError(
                f"{folder}: model_max_length={max_length!r} is not a usable context length (CLIP uses 77)"
            )
        if bos is None or eos is None:
            raise ValueError(f"{folder}: vocab.json lacks {BOS_TOKEN!r} or {EOS_TOKEN!r}")
        config = TokenizerConfig(max_length=max_length, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        return cls(config, vocab=vocab, merges=merges)

    def save(self, folder: str | os.PathLike) -> None:
        """Write a tokenizer folder that this class, diffusers and transformers can load.

        Writes vocab.json, merges.txt, and tokenizer_config.json / special_tokens_map.json
        carrying the pad token and ``max_length``.

        Args:
            folder: created if missing; existing files of these names are replaced.
        """
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ordered = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
        lines = [_MERGES_HEADER, *(f"{a} {b}" for a, b in self.merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        special = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": self._id_to_token[self.pad_token_id],
        }
        tokenizer_config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "do_lower_case": True,
            "errors": "replace",
            **special,
        }
        for name, data in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special)):
            (folder / name).write_text(
                json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
