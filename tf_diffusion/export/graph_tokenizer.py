"""CLIP tokenization as TensorFlow ops, so that a SavedModel takes prompt strings (TF Serving, tf.function).

Built from core TensorFlow ops only (``tf.strings`` with RE2, lookup tables, ``tf.while_loop``): the
graph runs on a stock TF Serving model server and needs no custom-op library such as tensorflow-text.
It reproduces ``tf_diffusion.tokenizer.CLIPTokenizer`` step by step:

1. ftfy, as far as ftfy's fixes are character tables or regular expressions: HTML entities (ftfy's own
   rules, including its "no unescaping from the first line holding a '<'" rule), C1 controls read as
   Windows-1252, Latin ligatures, full- and half-width forms, curly quotes, line breaks, terminal
   escape codes, control characters and NFC normalization, repeated until nothing changes as ftfy does.
   The tables are generated from ftfy and ``unicodedata`` at construction, not copied.
2. ``html.unescape`` twice (named, legacy semicolon-less and numeric references, Python's rules).
3. Whitespace collapsed and stripped, then lowercased (``tf.strings.lower`` with UTF-8 uses ICU's full
   lowercasing, which matches Python's ``str.lower`` including final sigma and dotted I).
4. CLIP's pre-tokenizer regex (RE2 has the same ``\\p{L}`` / ``\\p{N}`` classes) and byte-level BPE by
   merge rank, vectorised over all words of the batch.

Known differences from the Python tokenizer (both measured on tests/fixtures/tokenizer/reference_ids.json
in tests/test_export.py, where only the mojibake string differs):

- ftfy's mojibake repair (``fix_encoding``: "cafÃ©" -> "café") is a statistical heuristic and is not
  reproduced: such text is tokenized as typed.
- NFC is approximated by per-character mappings plus pairwise canonical composition (Hangul included),
  which is exact for text in canonical order; a base letter followed by several combining marks out of
  canonical order is composed differently.
- Characters added to Unicode after the RE2/ICU versions inside TensorFlow may be classified or
  lowercased differently than by Python's ``regex`` module and ``str.lower``.
"""

from __future__ import annotations

import functools
import html
import html.entities
import unicodedata

import tensorflow as tf

from tf_diffusion.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, CLIPTokenizer, bytes_to_unicode

# A byte that never occurs in valid UTF-8 marks regex matches, so splitting on it is unambiguous.
_MARK = b"\xff"
# ftfy's fix_and_explain loop ends when a pass changes nothing; real text needs two or three passes.
_MAX_FTFY_PASSES = 16
_NO_MERGE = 2**31 - 1
_UNKNOWN = "\U0010fffe"  # a noncharacter, never a table value: "no rewrite for this character"

# Python's regex-module \s, exactly (CLIP collapses runs of it to one space).
_WHITESPACE = (
    r"[\t\n\x0b\x0c\r \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
)
# CLIP's pre-tokenizer. Text is lowercased first; (?i) only matters for "'ſ" (long s), which Python's
# IGNORECASE matches as "'s" too. After whitespace collapsing, the only whitespace left is " ".
_PRETOKENIZE = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
# ftfy's remove_terminal_escapes.
_ANSI = r"\x1b\[[0-9;]*[a-zA-Z]"
# ftfy's unescape_html: a name or number of 1 to 24 letters and digits, ended by ";".
_FTFY_ENTITY = r"&#?[0-9A-Za-z]{1,24};"
_FTFY_NUMERIC = r"&#[0-9]+;|&#[xX][0-9a-fA-F]+;"
# Python's html.unescape.
_HTML_ENTITY = r"&#[0-9]+;?|&#[xX][0-9a-fA-F]+;?|&[^\t\n\x0c <&#;]{1,32};?"
# Python's longest-prefix fallback can only find a semicolon-less (legacy) name: 2 to 6 characters.
_LEGACY_LENGTHS = range(6, 1, -1)
# The lines before the first line holding a "<": ftfy unescapes HTML there and not from that line on.
_HEAD_LINES = r"(?s)^((?:[^<\n]*\n)*).*$"
_HEAD_LINES_ONLY = r"^(?:[^<\n]*\n)*"


@functools.lru_cache(maxsize=1)
def _tables() -> dict:
    """Every rewrite table, generated from ftfy's and Python's own data (once per process)."""
    import ftfy.chardata as chardata
    from ftfy import fixes

    # ftfy's character fixers in ftfy's order; those before remove_terminal_escapes, then the rest.
    pre_fixers = (
        fixes.fix_c1_controls,
        fixes.fix_latin_ligatures,
        fixes.fix_character_width,
        fixes.uncurl_quotes,
        fixes.fix_line_breaks,
    )
    candidates = {
        *range(0x80, 0xA0),
        *chardata.LIGATURES,
        *chardata.WIDTH_MAP,
        0x02BC,
        *range(0x2018, 0x2020),
        0x0D,
        0x2028,
        0x2029,
    }
    pre = {}
    for code in sorted(candidates):
        text = chr(code)
        for _ in range(4):  # the pass as ftfy runs it, until stable (C1 -> curly quote -> straight quote)
            before = text
            for fixer in pre_fixers:
                text = fixer(text)
            if text == before:
                break
        if text != chr(code):
            pre[chr(code)] = text
    post = {chr(code): "" for code in chardata.CONTROL_CHARS}
    # NFC of single characters (singletons such as U+212B ANGSTROM SIGN, and NFC's decompositions).
    compose = {}
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        nfc = unicodedata.normalize("NFC", char)
        if nfc != char and char not in post:
            post[char] = nfc
        decomposition = unicodedata.decomposition(char)
        if decomposition and not decomposition.startswith("<"):
            parts = [int(p, 16) for p in decomposition.split()]
            if len(parts) == 2 and nfc == char:  # a primary composite: NFC composes the pair into it
                compose[(parts[0] << 21) | parts[1]] = code
    # Hangul syllables compose algorithmically: L + V -> LV, LV + T -> LVT.
    for lead in range(19):
        for vowel in range(21):
            lv = 0xAC00 + (lead * 21 + vowel) * 28
            compose[((0x1100 + lead) << 21) | (0x1161 + vowel)] = lv
            for trail in range(1, 28):
                compose[(lv << 21) | (0x11A7 + trail)] = lv + trail

    html5 = html.entities.html5
    return {
        "pre": pre,
        "post": post,
        "compose": compose,
        "ftfy_entities": dict(chardata.HTML_ENTITIES),
        "html_entities": {"&" + name: value for name, value in html5.items()},
        "legacy_entities": {"&" + name: value for name, value in html5.items() if not name.endswith(";")},
        # Numeric references HTML5 repairs (NUL, CR, C1 as Windows-1252) or drops, as Python holds them.
        "charref_repairs": dict(html._invalid_charrefs),
        "dropped": set(html._invalid_codepoints),
    }


def _string_table(mapping: dict[str, str], default: str = _UNKNOWN) -> tf.lookup.StaticHashTable:
    keys = tf.constant(list(mapping), tf.string)
    values = tf.constant(list(mapping.values()), tf.string)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default)


def _int_table(mapping: dict, key_dtype, value_dtype, default) -> tf.lookup.StaticHashTable:
    keys = tf.constant(list(mapping), key_dtype)
    values = tf.constant(list(mapping.values()), value_dtype)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default)


def _positions(ragged: tf.RaggedTensor) -> tf.Tensor:
    """Index of each value within its row."""
    starts = tf.gather(ragged.row_starts(), ragged.value_rowids())
    return tf.range(tf.shape(ragged.flat_values, out_type=tf.int64)[0]) - starts


class GraphTokenizer(tf.Module):
    """CLIP tokenization in TensorFlow ops, equal to a ``CLIPTokenizer`` except where the module doc says.

    Args:
        tokenizer: the Python tokenizer whose vocabulary, merges, length and special ids to use.

    Example:
        >>> tok = GraphTokenizer(CLIPTokenizer())
        >>> tok(tf.constant(["A photo of a cat"]))[0, :7].numpy().tolist()
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """

    def __init__(self, tokenizer: CLIPTokenizer, name: str | None = None):
        super().__init__(name=name)
        if not isinstance(tokenizer, CLIPTokenizer):
            raise ValueError(f"tokenizer must be a CLIPTokenizer, got {type(tokenizer).__name__}")
        cfg = tokenizer.config
        self.max_length = int(cfg.max_length)
        self.bos_token_id, self.eos_token_id = int(cfg.bos_token_id), int(cfg.eos_token_id)
        self.pad_token_id = int(cfg.pad_token_id)
        tables = _tables()
        self._pre = _string_table(tables["pre"])
        self._post = _string_table(tables["post"])
        self._compose = _int_table(tables["compose"], tf.int64, tf.int32, -1)
        self._ftfy_entities = _string_table(tables["ftfy_entities"])
        self._html_entities = _string_table(tables["html_entities"])
        self._legacy_entities = _string_table(tables["legacy_entities"])
        self._charref_repairs = _int_table(tables["charref_repairs"], tf.int64, tf.string, _UNKNOWN)
        dropped = sorted(tables["dropped"])
        self._dropped = _int_table(dict.fromkeys(dropped, 1), tf.int64, tf.int32, 0)
        byte_map = bytes_to_unicode()
        self._bytes = _string_table({bytes([b]): c for b, c in byte_map.items()})
        merges = [f"{a} {b}" for a, b in tokenizer.merges]
        self._ranks = _int_table(
            dict(zip(merges, range(len(merges)), strict=True)), tf.string, tf.int32, _NO_MERGE
        )
        self._vocab = _int_table(tokenizer.vocab, tf.string, tf.int32, -1)

    # ------------------------------------------------------------------ public

    def __call__(self, texts) -> tf.Tensor:
        """(B,) strings -> (B, max_length) int32 rows ``[BOS, ids..., EOS, pad...]``, as ``CLIPTokenizer``."""
        ids = self.encode(texts, max_tokens=self.max_length - 2)
        ids = ids[:, : self.max_length - 2]
        batch = ids.nrows()
        bos = tf.fill([batch, 1], self.bos_token_id)
        eos = tf.fill([batch, 1], self.eos_token_id)
        rows = tf.concat([bos, ids, eos], axis=1)
        return rows.to_tensor(default_value=self.pad_token_id, shape=[None, self.max_length])

    def encode(self, texts, max_tokens: int | None = None) -> tf.RaggedTensor:
        """(B,) strings -> (B, None) int32 token ids without BOS/EOS, as ``CLIPTokenizer.encode``.

        Args:
            texts: a 1-D string tensor.
            max_tokens: when set, only words that can contribute to the first ``max_tokens`` ids are
                tokenized (every word gives at least one id), which bounds the work for long prompts.
        """
        pieces = self.pretokenize(texts)
        if max_tokens is not None:
            pieces = pieces[:, :max_tokens]
        flat = pieces.flat_values
        unique, index = tf.unique(flat)
        ids = tf.gather(self._bpe(unique), index)  # (words, None)
        ids = tf.RaggedTensor.from_row_splits(ids, pieces.row_splits)  # (B, words, None)
        return ids.merge_dims(1, 2)

    def pretokenize(self, texts) -> tf.RaggedTensor:
        """(B,) strings -> (B, None) words of CLIP's pre-tokenizer regex on the cleaned text."""
        return self._split(self.clean(texts), _PRETOKENIZE, keep="matches")

    def clean(self, texts) -> tf.Tensor:
        """CLIP's text cleaning (ftfy, HTML unescaping twice, whitespace, lowercase) on (B,) strings."""
        texts = tf.convert_to_tensor(texts, tf.string)
        texts = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace")
        texts = self._ftfy(texts)
        texts = self._html_unescape(self._html_unescape(texts))
        texts = tf.strings.regex_replace(texts, _WHITESPACE + "+", " ")
        texts = tf.strings.regex_replace(texts, "^ | $", "")
        return tf.strings.lower(texts, encoding="utf-8")

    # --------------------------------------------------------------- cleaning

    def _ftfy(self, texts: tf.Tensor) -> tf.Tensor:
        """ftfy.fix_text's reproducible fixes, repeated until a pass changes nothing."""
        has_lt = tf.strings.regex_full_match(texts, "(?s).*<.*")
        head = tf.where(has_lt, tf.strings.regex_replace(texts, _HEAD_LINES, r"\1"), texts)
        tail = tf.where(has_lt, tf.strings.regex_replace(texts, _HEAD_LINES_ONLY, ""), "")
        parts = tf.concat([head, tail], axis=0)
        unescape = tf.concat([tf.ones_like(has_lt), tf.zeros_like(has_lt)], axis=0)

        def one_pass(x):
            x = tf.where(unescape, self._ftfy_unescape(x), x)
            x = self._translate(x, self._pre)
            x = tf.strings.regex_replace(x, _ANSI, "")
            x = self._translate(x, self._post)
            return self._compose_pairs(x)

        def body(i, x, changed):
            y = one_pass(x)
            return i + 1, y, tf.reduce_any(tf.not_equal(x, y))

        _, parts, _ = tf.while_loop(
            lambda i, x, changed: changed & (i < _MAX_FTFY_PASSES),
            body,
            (tf.constant(0), parts, tf.constant(True)),
        )
        count = tf.shape(texts)[0]
        return tf.strings.join([parts[:count], parts[count:]])

    def _ftfy_unescape(self, texts: tf.Tensor) -> tf.Tensor:
        """ftfy's unescape_html: known names ending in ";" (and their upper-case forms), numbers."""
        parts = self._split(texts, _FTFY_ENTITY, keep="all")
        refs = parts.flat_values
        named = self._ftfy_entities.lookup(refs)
        replaced = tf.where(
            tf.strings.regex_full_match(refs, _FTFY_NUMERIC), self._decode_charrefs(refs), named
        )
        return self._join_replaced(parts, replaced)

    def _html_unescape(self, texts: tf.Tensor) -> tf.Tensor:
        """Python's html.unescape."""
        parts = self._split(texts, _HTML_ENTITY, keep="all")
        refs = parts.flat_values
        replaced = self._html_entities.lookup(refs)
        # Not a name: the longest legacy name that is a proper prefix, followed by the rest, as Python does.
        length = tf.strings.length(refs, unit="UTF8_CHAR")
        for size in _LEGACY_LENGTHS:
            prefix = tf.strings.substr(refs, 0, size + 1, unit="UTF8_CHAR")
            value = self._legacy_entities.lookup(prefix)
            rest = tf.strings.substr(refs, tf.minimum(length, size + 1), length, unit="UTF8_CHAR")
            found = tf.equal(replaced, _UNKNOWN) & tf.not_equal(value, _UNKNOWN) & (length > size + 1)
            replaced = tf.where(found, tf.strings.join([value, rest]), replaced)
        numeric = tf.strings.regex_full_match(refs, "&#.*")
        replaced = tf.where(numeric, self._decode_charrefs(refs), replaced)
        return self._join_replaced(parts, replaced)

    @staticmethod
    def _join_replaced(parts: tf.RaggedTensor, replaced: tf.Tensor) -> tf.Tensor:
        """Put each match's replacement (unless _UNKNOWN) back between the text around the matches."""
        values = parts.flat_values
        is_match = tf.equal(_positions(parts) % 2, 1)  # split parts alternate: text, match, text, ...
        values = tf.where(is_match & tf.not_equal(replaced, _UNKNOWN), replaced, values)
        return tf.strings.reduce_join(parts.with_flat_values(values), axis=1)

    def _translate(self, texts: tf.Tensor, table: tf.lookup.StaticHashTable) -> tf.Tensor:
        """Rewrite single characters through ``table`` (str.translate)."""
        chars = tf.strings.unicode_split(texts, "UTF-8")
        values = chars.flat_values
        mapped = table.lookup(values)
        values = tf.where(tf.equal(mapped, _UNKNOWN), values, mapped)
        return tf.strings.reduce_join(chars.with_flat_values(values), axis=1)

    def _compose_pairs(self, texts: tf.Tensor) -> tf.Tensor:
        """NFC's canonical composition of adjacent pairs, left to right, until none is left."""
        codes = tf.strings.unicode_decode(texts, "UTF-8")
        dense = codes.to_tensor(default_value=0)

        def body(x, active):
            keys = tf.bitwise.left_shift(tf.cast(x[:, :-1], tf.int64), 21) | tf.cast(x[:, 1:], tf.int64)
            composite = self._compose.lookup(keys)
            match = composite >= 0
            taken = _first_of_runs(match)
            merged = tf.concat([tf.where(taken, composite, x[:, :-1]), x[:, -1:]], axis=1)
            removed = tf.concat([tf.zeros_like(taken[:, :1]), taken], axis=1)
            kept = tf.ragged.boolean_mask(merged, ~removed)
            return kept.to_tensor(default_value=0, shape=tf.shape(x)), tf.reduce_any(taken)

        dense, _ = tf.while_loop(
            lambda x, active: active,
            body,
            (dense, tf.shape(dense)[1] > 1),
            shape_invariants=(tf.TensorShape([None, None]), tf.TensorShape([])),
        )
        ragged = tf.RaggedTensor.from_tensor(dense, padding=0)
        return tf.strings.unicode_encode(ragged, "UTF-8")

    def _decode_charrefs(self, refs: tf.Tensor) -> tf.Tensor:
        """ "&#65;" / "&#x41" -> the character, with Python's html repairs; other strings give junk."""
        body = tf.strings.regex_replace(refs, r"^&#|;$", "")
        is_hex = tf.strings.regex_full_match(body, "[xX].*")
        digits = tf.strings.regex_replace(tf.strings.regex_replace(body, "^[xX]", ""), "^0+", "")
        digits = tf.where(tf.strings.regex_full_match(digits, "[0-9a-fA-F]*"), digits, "")
        length = tf.strings.length(digits)
        # Beyond 7 significant digits the value exceeds U+10FFFF in either base: HTML's U+FFFD.
        too_long = length > 7
        chars = tf.strings.bytes_split(tf.where(too_long, "", digits))
        values = _hex_values(chars.flat_values)
        base = tf.where(is_hex, tf.constant(16, tf.int64), tf.constant(10, tf.int64))
        row_base = tf.gather(base, chars.value_rowids())
        exponent = tf.gather(chars.row_lengths(), chars.value_rowids()) - 1 - _positions(chars)
        code = tf.math.unsorted_segment_sum(values * row_base**exponent, chars.value_rowids(), chars.nrows())
        code = tf.where(too_long, tf.constant(0x110000, tf.int64), code)
        invalid = (code > 0x10FFFF) | ((code >= 0xD800) & (code <= 0xDFFF))
        code = tf.where(invalid, tf.constant(0xFFFD, tf.int64), code)
        text = tf.strings.unicode_encode(tf.cast(code[:, None], tf.int32), "UTF-8")
        # Python's order: repairs (NUL, CR, C1 as Windows-1252) first, then dropped code points.
        text = tf.where(tf.equal(self._dropped.lookup(code), 1) & ~invalid, "", text)
        repaired = self._charref_repairs.lookup(code)
        return tf.where(tf.equal(repaired, _UNKNOWN), text, repaired)

    # -------------------------------------------------------------------- BPE

    def _split(self, texts, pattern: str, keep: str) -> tf.RaggedTensor:
        """Cut texts around every regex match; ``keep`` "all" parts (text, match, text, ...) or the "matches"."""
        marked = tf.strings.regex_replace(texts, pattern, _MARK + rb"\0" + _MARK)
        parts = tf.strings.split(marked, sep=_MARK)
        if keep == "all":
            return parts
        # The text between CLIP's matches is whitespace only (the pattern matches everything else).
        return tf.ragged.boolean_mask(parts, parts.with_flat_values(tf.equal(_positions(parts) % 2, 1)))

    def _bpe(self, words: tf.Tensor) -> tf.RaggedTensor:
        """(W,) distinct words -> (W, None) ids: UTF-8 bytes as CLIP symbols, merged by rank."""
        chars = tf.strings.bytes_split(words)
        symbols = self._bytes.lookup(chars.flat_values)
        last = chars.row_limits() - 1  # every word is non-empty; its last symbol carries the word end
        symbols = tf.tensor_scatter_nd_update(
            symbols, last[:, None], tf.strings.join([tf.gather(symbols, last), END_OF_WORD])
        )
        dense = chars.with_flat_values(symbols).to_tensor(default_value="")  # (W, L)
        dense = tf.concat([dense, tf.fill([tf.shape(words)[0], 1], "")], axis=1)  # L >= 1 even with no words
        # CLIP maps the special tokens straight to their ids.
        special = tf.equal(words, BOS_TOKEN) | tf.equal(words, EOS_TOKEN)
        dense = tf.concat(
            [tf.where(special, words, dense[:, 0])[:, None], tf.where(special[:, None], "", dense[:, 1:])],
            axis=1,
        )

        def body(x, active):
            left, right = x[:, :-1], x[:, 1:]
            ranks = self._ranks.lookup(tf.strings.join([left, right], separator=" "))
            ranks = tf.where(tf.equal(left, "") | tf.equal(right, ""), _NO_MERGE, ranks)
            best = tf.reduce_min(ranks, axis=1, keepdims=True)
            # Every occurrence of the best pair, left to right without overlap ("a a a" -> "aa a").
            taken = _first_of_runs(tf.equal(ranks, best) & (best < _NO_MERGE))
            merged = tf.concat([tf.where(taken, tf.strings.join([left, right]), left), x[:, -1:]], axis=1)
            removed = tf.concat([tf.zeros_like(taken[:, :1]), taken], axis=1)
            kept = tf.ragged.boolean_mask(merged, ~removed)
            return kept.to_tensor(default_value="", shape=tf.shape(x)), tf.reduce_any(taken)

        dense, _ = tf.while_loop(
            lambda x, active: active,
            body,
            (dense, tf.shape(dense)[1] > 1),
            shape_invariants=(tf.TensorShape([None, None]), tf.TensorShape([])),
        )
        tokens = tf.ragged.boolean_mask(dense, tf.not_equal(dense, ""))
        return tokens.with_flat_values(self._vocab.lookup(tokens.flat_values))


def _first_of_runs(match: tf.Tensor) -> tf.Tensor:
    """Of each run of consecutive True values in a (N, M) mask, the 1st, 3rd, 5th, ... positions.

    A pair equal to its neighbour ("a a a") can be merged only once per two positions, left first.
    """
    n, m = tf.shape(match)[0], tf.shape(match)[1]
    run = tf.cumsum(1 - tf.cast(match, tf.int32), axis=1)  # a run shares the id of the False before it
    segment = run + tf.range(n)[:, None] * (m + 1)
    position = tf.broadcast_to(tf.range(m)[None, :], tf.shape(match))
    first = tf.math.unsorted_segment_min(tf.where(match, position, m), segment, n * (m + 1))
    return match & tf.equal((position - tf.gather(first, segment)) % 2, 0)


def _hex_values(digits: tf.Tensor) -> tf.Tensor:
    """Single hexadecimal (or decimal) digit strings -> int64 values."""
    codes = tf.cast(tf.strings.unicode_decode(digits, "UTF-8").flat_values, tf.int64)
    return tf.where(codes <= ord("9"), codes - ord("0"), (codes | 0x20) - ord("a") + 10)
