"""Byte-level BPE: train a tokenizer, load the official ones (GPT-2, Llama 3, Qwen, DeepSeek-V3), encode, decode.

    >>> import bpe
    >>> tok = bpe.train("aaabdaaabac", 259, pattern=None)   # the Wikipedia example: aa -> 256, ab -> 257, ...
    >>> tok.encode("aaabdaaabac")
    [258, 100, 258, 97, 99]
    >>> tok.decode([258, 100])
    'aaabd'
    >>> gpt2 = bpe.load("../shared/data/gpt2")               # encoder.json + vocab.bpe
    >>> gpt2.encode("Hello world<|endoftext|>", allowed_special="all")
    [15496, 995, 50256]

How byte-level BPE works (Sennrich et al. 2016; GPT-2, Radford et al. 2019):
1. Pre-tokenize: a regex cuts the text into chunks ("Hello", " world", "!"), so merges never cross a word
   boundary. The named patterns are in PATTERNS; DeepSeek-V3 applies three regexes one after the other.
2. Each chunk becomes its UTF-8 bytes, i.e. tokens 0..255, so any text can be encoded (no unknown token).
3. Training counts every adjacent pair of tokens over all chunks, merges the most frequent pair into a new
   token, and repeats until the vocabulary is full. Encoding replays those merges: repeatedly merge the
   adjacent pair that was learned first.

Two merge rules exist in the wild, and this file implements both, exactly:
- tiktoken's (our own trained tokenizers, tiktoken rank files such as Llama 3's tokenizer.model): a token's
  id is its rank; merge the adjacent pair whose concatenation is the lowest-ranked token; a chunk that is
  itself a token is returned whole.
- Hugging Face's (tokenizer.json, vocab.json + merges.txt, GPT-2's encoder.json + vocab.bpe): merge only the
  pairs listed in the merges file, the earliest listed first; whole-chunk lookup only with `ignore_merges`.
`encode()` follows the file's own rule. For vocabularies made by a BPE trainer the two rules agree, so
`to_tiktoken()` (always tiktoken's rule) gives the same ids; tests/test_bpe*.py check it token for token, and
also show a hand-made vocabulary where the rules differ.

Regexes without the `regex` module. The official patterns use \\p{L}, \\p{N}, ... which Python's `re` lacks,
and `regex` is not a dependency. tiktoken compiles them natively, but does not expose the chunks, which
training and the readable encoder need. So `_translate` rewrites each pattern for `re`: \\p{X} becomes an
explicit character class built from `unicodedata`, \\s becomes Unicode's White_Space set (Python's \\s also
matches \\x1c-\\x1f, Rust's and Oniguruma's do not), `$` becomes \\Z. Python 3.11's `re` has possessive
quantifiers and atomic groups, so tiktoken's patterns translate one to one. Two caveats:
- `re` checks characters above U+FFFF against a class one range at a time, which made splitting 3x slower,
  so each pattern is also compiled without those ranges and that copy is used on text with none of them.
- Python 3.11 knows Unicode 14.0; tiktoken and HF tokenizers use newer tables, so characters assigned after
  it (2022 and later) may be split differently by `encode()` than by `to_tiktoken()` or HF.

Training is fast because it never rescans the text: it counts the distinct chunks once (20 MB of Python
source has ~5M chunks but ~70k distinct ones), then each merge updates the pair counts only around the
chunks that contain the merged pair (see `_learn_merges`). 4096 tokens on tinyshakespeare take about as
long as HF tokenizers' Rust trainer, 32k on 20 MB of the stdlib ~10 s (bench/bpe.py).

File formats read by `load(path)` (a file, or a model directory: see `_load_dir` for the order):
- tokenizer.bpe: ours (SAVE_NAME), written by `save()`: a version line, the pattern, the special tokens,
  and the merges as pairs of ids in order (merge i makes token 256 + i).
- tokenizer.json (HF): BPE model, Split/ByteLevel pre-tokenizers, NFC/NFKC normalizers, added tokens; a
  TemplateProcessing post-processor that starts with a special token means "adds BOS" (`add_bos`).
- vocab.json + merges.txt (HF; Qwen when tokenizer_config.json names a Qwen2 tokenizer), encoder.json +
  vocab.bpe (OpenAI's GPT-2 files). Unlike tiktoken's loader, a vocab.bpe without its final newline keeps
  its last merge.
- tokenizer.model or original/tokenizer.model: a tiktoken ranks file (base64 token, rank) with Llama 3's
  pattern and its 256 special tokens (3.1+ names; 3.0 names when params.json has no use_scaled_rope).
Special tokens follow tiktoken: their text in the input is an error unless allowed (`allowed_special`).
HF's added tokens that are not marked special (Qwen's <think>, <tool_call>) count as special tokens too.
Bad or missing files raise errors.BadInput naming the file and the line or key; ValueError and TypeError
are for misuse of the API (a bad pattern or argument passed to train(), special-token text in encode()).
"""
import base64
import codecs
import functools
import heapq
import json
import re
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import tiktoken

import hub
from errors import BadInput

SAVE_NAME = "tokenizer.bpe"
# The files that make up a tokenizer in a model directory (copied beside checkpoints by prepare_data.py).
TOKENIZER_FILES = ("tokenizer.bpe", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "tokenizer.model")

# -----------------------------------------------------------------------------------------------------------
# Pre-tokenizer patterns, in the official (Rust/Oniguruma) syntax

PATTERNS = {
    # GPT-2, in tiktoken's form. It splits exactly like encoder.py's (and HF ByteLevel's)
    # 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+  : possessive runs change
    # nothing when nothing follows them, and a whitespace run is taken whole at the end of the text, else all
    # but its last character. It is 1.5x faster, in tiktoken and in Python's re, because it backtracks less.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    # Llama 3 (meta-llama/llama3 tokenizer.py): digits in groups of up to three.
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # Qwen2 / 2.5 / 3 (transformers tokenization_qwen2.py): one digit per chunk.
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # DeepSeek-V3 (tokenizer.json): three Split steps applied one after the other to each other's pieces.
    "deepseek_v3": (
        r"""\p{N}{1,3}""",
        r"""[一-龥\u3040-ゟ゠-ヿ]+""",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
}

# tiktoken takes one regex, so DeepSeek-V3's three steps become one. Let N = \p{N} and C = the CJK/kana set
# of step 2. Step 1 isolates digit groups, step 2 runs of C, and step 3 splits each piece, so:
# - a run of C is split as step 3 splits it: letters (and marks), punctuation/symbols, and C's unassigned
#   code points, which step 3 leaves unmatched unless a letter follows (alternatives 2-4);
# - step 3 sees only the text between N and C: its classes lose N and C, and its (?!\S) also succeeds
#   before N or C, the end of its piece (alternatives 5-10);
# - what step 3 leaves unmatched (e.g. a ZWJ not followed by a letter) HF keeps as a piece of its own,
#   while tiktoken would drop it: the last alternative takes such runs.
# Checked against the three steps and against HF tokenizers in tests/test_bpe*.py.
_C = r"\x{3040}-\x{30FF}\x{4E00}-\x{9FA5}"
_C_OTHER = rf"[[{_C}]--[\p{{L}}\p{{M}}\p{{P}}\p{{S}}]]"   # the unassigned U+3040, U+3097, U+3098
_DEEPSEEK_V3_ONE_REGEX = "|".join([
    r"\p{N}{1,3}",
    rf"{_C_OTHER}?[[\p{{L}}\p{{M}}]&&[{_C}]]+",
    rf"[[\p{{P}}\p{{S}}]&&[{_C}]]+",
    rf"(?:{_C_OTHER}(?![[\p{{L}}\p{{M}}]&&[{_C}]]))+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""",
    rf"[^\r\n\p{{L}}\p{{P}}\p{{S}}\p{{N}}{_C}]?[[\p{{L}}\p{{M}}]--[{_C}]]+",
    rf" ?[[\p{{P}}\p{{S}}]--[{_C}]]+[\r\n]*",
    r"\s*[\r\n]+",
    rf"\s+(?![^\s\p{{N}}{_C}])",
    r"\s+",
    rf"(?:[^\s\p{{L}}\p{{M}}\p{{P}}\p{{S}}\p{{N}}{_C}](?![[\p{{L}}\p{{M}}]--[{_C}]]))+",
])

# -----------------------------------------------------------------------------------------------------------
# Translating a pattern for Python's `re`

# Unicode's White_Space property: what \s means in Rust's regex and in Oniguruma.
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.cache
def _category_table():
    """General category -> list of (first, last) code points, e.g. "Nd" -> [(48, 57), (1632, 1641), ...]."""
    table, start, prev = {}, 0, "Cc"
    for cp in range(0x110000):   # about 0.2 s, once per process
        cat = unicodedata.category(chr(cp))
        if cat != prev:
            table.setdefault(prev, []).append((start, cp - 1))
            start, prev = cp, cat
    table.setdefault(prev, []).append((start, 0x10FFFF))
    return table


def _union(ranges):
    """Sort and merge (first, last) ranges: [(5, 9), (0, 4)] -> [(0, 9)]."""
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges):
    out, nxt = [], 0
    for lo, hi in _union(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= 0x10FFFF:
        out.append((nxt, 0x10FFFF))
    return out


def _property_ranges(name, pattern):
    """\\p{name} for a general category, one letter (L) or two (Lu)."""
    table = _category_table()
    found = [r for cat, rs in table.items() if cat == name or (len(name) == 1 and cat[0] == name) for r in rs]
    if not found:
        raise ValueError(f"pattern {pattern!r}: \\p{{{name}}} is not supported (only general categories: "
                         f"L, Lu, N, Nd, P, S, M, Z, C, ...)")
    return _union(found)


def _class_body(ranges, bmp_only):
    parts = []
    for lo, hi in ranges:
        if bmp_only:
            if lo > 0xFFFF:
                continue
            hi = min(hi, 0xFFFF)
        parts.append(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}")
    return "".join(parts)


def _translate(pattern, bmp_only=False):
    r"""Rewrite a Rust/Oniguruma-style pattern for Python's re: \p{L} -> [\U00000041-\U0000005a...], etc.

    bmp_only leaves out the classes' ranges above U+FFFF: only valid for text without such characters.
    Capturing groups become non-capturing, so that findall returns whole matches.
    """
    out, i, in_class, n = [], 0, False, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 == n:
                raise ValueError(f"pattern {pattern!r} ends with a lone backslash")
            e = pattern[i + 1]
            i += 2
            ranges = None
            if e in "pP":
                if i < n and pattern[i] == "{":
                    end = pattern.find("}", i)
                    if end < 0:
                        raise ValueError(f"pattern {pattern!r}: unclosed \\{e}{{")
                    name, i = pattern[i + 1:end], end + 1
                else:
                    name, i = pattern[i:i + 1], i + 1
                ranges = _property_ranges(name, pattern)
                negate = e == "P"
            elif e in "sS":
                ranges, negate = _WHITE_SPACE, e == "S"
            elif e in "dD":
                ranges, negate = _property_ranges("Nd", pattern), e == "D"
            elif e in "wWbB":
                raise ValueError(f"pattern {pattern!r}: \\{e} differs between Python and Rust regexes; "
                                 f"use \\p{{..}} classes")
            elif e in "xuU" and i < n and pattern[i] == "{":   # \x{1F600} -> \U0001f600
                end = pattern.find("}", i)
                out.append(f"\\U{int(pattern[i + 1:end], 16):08x}")
                i = end + 1
                continue
            else:
                out.append("\\" + e)
                continue
            if in_class:
                out.append(_class_body(_complement(ranges) if negate else ranges, bmp_only))
            else:
                out.append(("[^" if negate else "[") + _class_body(ranges, bmp_only) + "]")
        elif in_class:
            if c == "[" or (c in "&-~" and pattern[i + 1:i + 2] == c):
                raise ValueError(f"pattern {pattern!r}: nested classes and class set operations are not "
                                 f"supported by Python's re")
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
        elif c == "[":
            in_class = True
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            if pattern[j:j + 1] == "]":   # a ']' right after '[' or '[^' is a literal
                j += 1
            out.append(pattern[i:j])
            i = j
        elif c == "$":
            out.append(r"\Z")   # Rust's $ is the end of the text; Python's also matches before a final \n
            i += 1
        elif c == "(" and not pattern.startswith("(?", i):
            out.append("(?:")
            i += 1
        elif pattern.startswith(("(?P<", "(?<"), i) and not pattern.startswith(("(?<=", "(?<!"), i):
            out.append("(?:")
            i = pattern.index(">", i) + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# A cut after "\n" between two non-space characters is safe for every pattern in PATTERNS: no chunk
# contains "\n" followed by a non-space character, and none looks behind. Cutting long texts there keeps
# findall's lists small and limits the slower full-Unicode regex to the blocks that need it.
_SAFE_CUT = re.compile("[^" + _class_body(_WHITE_SPACE, False) + "]\n(?=[^" + _class_body(_WHITE_SPACE, False) + "])")
_BLOCK = 1 << 20


def _isolated(rx, text):
    """Split text by rx, keeping unmatched text as pieces too (HF's Split(behavior="isolated"))."""
    pieces = rx.findall(text)
    if sum(map(len, pieces)) == len(text):   # the usual case: the matches tile the text
        return pieces
    out, pos = [], 0
    for m in rx.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


class _Splitter:
    """The pre-tokenizer: text -> chunks, for a pattern (a name, a regex, a sequence of regexes, or None)."""

    def __init__(self, pattern):
        self.pattern = PATTERNS.get(pattern, pattern) if isinstance(pattern, str) else pattern
        if isinstance(self.pattern, list):
            self.pattern = tuple(self.pattern)
        regexes = () if self.pattern is None else (self.pattern,) if isinstance(self.pattern, str) else self.pattern
        try:
            self._full = [re.compile(_translate(p)) for p in regexes]
            self._bmp = [re.compile(_translate(p, bmp_only=True)) for p in regexes]
        except (re.error, TypeError) as e:
            raise ValueError(f"pattern {self.pattern!r} does not compile: {e}") from None
        self._cut_safe = self.pattern in PATTERNS.values()

    def blocks(self, text):
        """Yield lists of chunks, one list per block of about a megabyte."""
        if self.pattern is None:
            if text:
                yield [text]
            return
        start = 0
        while self._cut_safe and len(text) - start > _BLOCK:
            m = _SAFE_CUT.search(text, start + _BLOCK)
            if m is None:
                break
            yield self._split(text[start:m.end()])
            start = m.end()
        yield self._split(text[start:] if start else text)

    def _split(self, text):
        pieces = [text]
        for rx in (self._full if _ASTRAL.search(text) else self._bmp):
            pieces = [chunk for piece in pieces for chunk in _isolated(rx, piece)]
        return pieces


# -----------------------------------------------------------------------------------------------------------
# Training


def train(text, vocab_size, pattern="gpt2", special_tokens=None):
    """Learn a byte-level BPE of vocab_size tokens (256 bytes + merges + special tokens) from text.

    text: a str, or an iterable of str (documents; no chunk spans two documents).
    pattern: a name in PATTERNS, a regex, a sequence of regexes applied in turn, or None (no pre-splitting).
    special_tokens: None, a list of names (ids after the merges), or a dict name -> id using the top ids,
        e.g. {"<|endoftext|>": vocab_size - 1}. Their text is cut out of the training data.
    Ties between equally frequent pairs go to the smallest (left id, right id), so training is deterministic.
    If the text runs out of pairs first, there are fewer merges (a warning says so), and the special tokens
    move down to follow the last merge: every id below vocab_size is a token.

    >>> train("aaabdaaabac", 259, pattern=None).merge_pairs   # aa (4 times), then ab before (aa)a: both 2
    [(97, 97), (97, 98), (256, 257)]
    """
    specials = _check_specials(special_tokens, vocab_size)
    splitter = _Splitter(pattern)
    docs = [text] if isinstance(text, str) else text
    cut = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None

    # 1. Count the unique chunks once: the stdlib's 20 MB hold ~5M chunks but only ~70k distinct ones.
    counts = Counter()
    for doc in docs:
        if not isinstance(doc, str):
            raise TypeError(f"train: text must be a str or an iterable of str, got {type(doc).__name__}")
        for part in (cut.split(doc) if cut else (doc,)):
            for chunks in splitter.blocks(part):
                counts.update(chunks)

    # 2. Merge the most frequent pair, again and again.
    n_merges = vocab_size - 256 - len(specials)
    merges = _learn_merges(counts, n_merges)
    if len(merges) < n_merges:
        warnings.warn(f"train: the text has only enough pairs for {len(merges)} of {n_merges} merges; "
                      f"the vocabulary is smaller than {vocab_size}")
    vocab = [bytes([b]) for b in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    if isinstance(special_tokens, dict):
        ids = {name: i - (n_merges - len(merges)) for name, i in special_tokens.items()}
    else:
        ids = {name: len(vocab) + i for i, name in enumerate(specials)}
    return Tokenizer({t: i for i, t in enumerate(vocab)}, splitter.pattern, ids, merge_pairs=merges)


def _check_specials(special_tokens, vocab_size):
    specials = list(special_tokens or ())
    if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s for s in specials):
        raise ValueError(f"special_tokens {special_tokens!r}: expected distinct non-empty strings")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 byte tokens + {len(specials)} special "
                         f"token(s)")
    if isinstance(special_tokens, dict):
        top = set(range(vocab_size - len(specials), vocab_size))
        if set(special_tokens.values()) != top:
            raise ValueError(f"special_tokens {special_tokens!r}: with vocab_size {vocab_size} their ids must be "
                             f"the top ones, {min(top)}..{vocab_size - 1}")
    return specials


def _learn_merges(counts, n_merges):
    """The BPE training loop on unique chunks; returns [(left id, right id), ...], merge i making 256 + i.

    Only the chunks that contain the merged pair are touched, and only the pair counts next to each merge
    change: (x, a) and (b, y) lose the chunk's frequency, (x, new) and (new, y) gain it.
    A heap gives the most frequent pair. Old pairs only lose counts, so their heap entries are fixed lazily
    when popped; the only pairs that gain are the new token's, pushed once per merge.
    """
    words, freqs = [], []
    for chunk, f in counts.items():
        w = list(chunk.encode("utf-8"))
        if len(w) > 1:
            words.append(w)
            freqs.append(f)
    K = 256 + n_merges   # a pair (a, b) is packed as a * K + b: ints hash faster than tuples
    pair_counts, where = Counter(), {}
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_counts[a * K + b] += freqs[i]
            where.setdefault(a * K + b, set()).add(i)
    heap = [(-c, p) for p, c in pair_counts.items()]   # ties: smallest (a, b) first
    heapq.heapify(heap)

    merges = []
    while len(merges) < n_merges and heap:
        c, p = heapq.heappop(heap)
        if -c != pair_counts[p]:   # stale: the count went down since this entry was pushed
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            continue
        a, b = divmod(p, K)
        new = 256 + len(merges)
        merges.append((a, b))
        grown = set()
        for i in where.pop(p):
            w, f, j = words[i], freqs[i], 0
            while j < len(w) - 1:
                if w[j] == a and w[j + 1] == b:
                    if j > 0:
                        pair_counts[w[j - 1] * K + a] -= f
                        q = w[j - 1] * K + new
                        pair_counts[q] += f
                        where.setdefault(q, set()).add(i)
                        grown.add(q)
                    if j + 2 < len(w):
                        pair_counts[b * K + w[j + 2]] -= f
                        q = new * K + w[j + 2]
                        pair_counts[q] += f
                        where.setdefault(q, set()).add(i)
                        grown.add(q)
                    w[j:j + 2] = [new]
                j += 1
        del pair_counts[p]
        for q in grown:
            if pair_counts[q] > 0:
                heapq.heappush(heap, (-pair_counts[q], q))
    return merges


# -----------------------------------------------------------------------------------------------------------
# The tokenizer

_KNOWN_BOS = ("<|begin_of_text|>", "<｜begin▁of▁sentence｜>")
_KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<｜end▁of▁sentence｜>")
_NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


class Tokenizer:
    """One class for trained and official tokenizers. Build with train() or load(), not directly.

    ranks: token bytes -> id for the merge-able tokens (ids of special tokens are in special_tokens).
    merges: None for tiktoken's merge rule, or {(left bytes, right bytes): priority} for HF's (module doc).
    """

    def __init__(self, ranks, pattern, special_tokens=None, *, merges=None, ignore_merges=True,
                 normalization=(), add_bos=False, bos_id=None, eos_ids=None, merge_pairs=None, name="bpe"):
        self.ranks = ranks
        self.merges = merges
        self.ignore_merges = ignore_merges
        self.special_tokens = dict(special_tokens or {})
        self.normalization = tuple(normalization)
        self.merge_pairs = merge_pairs   # [(left id, right id)] of a tokenizer made by train(), for save()
        self.name = name
        self._splitter = _Splitter(pattern)
        self.pattern = self._splitter.pattern
        self.vocab = {i: t for t, i in ranks.items()}   # id -> bytes, for decoding
        self.vocab.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self.vocab_size = max(self.vocab) + 1
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise BadInput(f"{name}: byte {missing[0]:#04x} has no token: a byte-level BPE needs all 256")
        self.add_bos = add_bos   # does the official pipeline start every text with BOS? Callers add it.
        self.bos_id = bos_id if bos_id is not None else next(
            (self.special_tokens[s] for s in _KNOWN_BOS if s in self.special_tokens), None)
        known = [self.special_tokens[s] for s in _KNOWN_EOS if s in self.special_tokens]
        self.eos_ids = sorted(set(eos_ids or ()) | set(known)) or None
        self._cache = {}
        self._tiktoken = None

    def __repr__(self):
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)}, "
                f"rule={'tiktoken' if self.merges is None else 'hf'})")

    # --- encoding -------------------------------------------------------------------------------------------

    def encode(self, text, allowed_special="none_raise"):
        """text -> token ids. No BOS/EOS is added (see add_bos / bos_id).

        allowed_special (as tiktoken): "none_raise" (special-token text in the input is an error), "all",
        a set of special token names, or "none" (special-token text is encoded as ordinary text).
        >>> tok = train("", 257, pattern=None, special_tokens=["<|endoftext|>"])   # bytes + one special
        >>> tok.encode("a<|endoftext|>", allowed_special="all")
        [97, 256]
        >>> tok.encode("a<|endoftext|>", allowed_special="none")[:3]   # "a", "<", "|", ...
        [97, 60, 124]
        """
        if allowed_special == "none":
            return self.encode_ordinary(text)
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special == "none_raise":
            allowed = set()
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special: {sorted(unknown)} are not special tokens of {self.name}")
        for s in self.special_tokens:
            if s not in allowed and s in text:
                raise ValueError(f"the text contains the special token {s!r}; pass allowed_special='all' (or a set "
                                 f"with it) to encode it as one token, or 'none' to encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        ids, pos = [], 0
        for m in re.finditer("|".join(map(re.escape, sorted(allowed, key=len, reverse=True))), text):
            ids += self.encode_ordinary(text[pos:m.start()])
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        return ids + self.encode_ordinary(text[pos:])

    def encode_ordinary(self, text):
        """text -> token ids, special-token text included as ordinary text."""
        if _SURROGATE.search(text):   # as tiktoken: a lone surrogate cannot be UTF-8, it becomes U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        for form in self.normalization:
            text = unicodedata.normalize(form, text)
        ids, cache = [], self._cache
        for chunks in self._splitter.blocks(text):
            for chunk in chunks:
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = self._bpe(chunk.encode("utf-8"))
                    if len(cache) < 200_000:
                        cache[chunk] = chunk_ids
                ids += chunk_ids
        return ids

    def _bpe(self, piece):
        """Byte-pair encode one chunk: b"hello" -> [b"h", b"e", b"l", b"l", b"o"] -> ... -> [b"hello"] -> ids.

        Each step scans all pairs, so a chunk of n bytes costs O(n^2): fine for words, slow for a megabyte
        without a split point (pattern=None, or a huge run of digits with GPT-2's pattern): use to_tiktoken().
        """
        if self.ignore_merges and piece in self.ranks:
            return [self.ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        inf = float("inf")
        rank = self._pair_rank
        ranks = [rank(parts[i], parts[i + 1], inf) for i in range(len(parts) - 1)]   # ranks[i]: parts i, i+1
        while ranks:
            best = min(ranks)
            if best == inf:
                break
            i = ranks.index(best)   # ties: the leftmost pair, as in tiktoken and HF
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank(parts[i - 1], parts[i], inf)
            if i < len(ranks):
                ranks[i] = rank(parts[i], parts[i + 1], inf)
        return [self.ranks[p] for p in parts]

    def _pair_rank(self, left, right, default):
        if self.merges is None:
            return self.ranks.get(left + right, default)   # tiktoken: any pair that makes a token
        return self.merges.get((left, right), default)     # HF: only the listed merges

    # --- decoding -------------------------------------------------------------------------------------------

    def decode(self, ids):
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        if hasattr(ids, "tolist"):   # a numpy array or a torch tensor
            ids = ids.tolist()
        try:
            return b"".join([self.vocab[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if i not in self.vocab)
            raise ValueError(f"token id {bad!r} is not in the vocabulary of {self.name} "
                             f"(size {self.vocab_size})") from None

    def decoder(self):
        """A streaming decoder: .step(id) -> the text that is complete so far, .flush() -> the rest.

        A character split across tokens is held back until its last byte arrives:
        >>> d = train("", 256, pattern=None).decoder()   # bytes only: "é" is the tokens 195, 169
        >>> d.step(195), d.step(169), d.flush()
        ('', 'é', '')
        """
        return StreamDecoder(self.vocab)

    # --- files ------------------------------------------------------------------------------------------------

    def save(self, path):
        """Write our own text format (atomically). Only for tokenizers made by train(): an official tokenizer
        is kept as its original files (TOKENIZER_FILES)."""
        if self.merge_pairs is None:
            raise ValueError(f"save: {self.name} was loaded from official files; keep those files instead "
                             f"(bpe.TOKENIZER_FILES)")
        lines = ["bpe v1", "pattern " + json.dumps(self.pattern, ensure_ascii=False)]
        lines += [f"special {i} " + json.dumps(s, ensure_ascii=False) for s, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merge_pairs)}")
        lines += [f"{a} {b}" for a, b in self.merge_pairs]
        hub.atomic_write(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))

    def to_tiktoken(self):
        """A tiktoken.Encoding with the same ranks, pattern and special tokens: identical ids, native speed.

        A tokenizer with a normalizer (Qwen: NFC) gets a subclass that normalizes before encoding.
        """
        if self._tiktoken is not None:
            return self._tiktoken
        if self.merges is not None:   # tiktoken ranks merges by the id of the token they make
            order = [self.ranks[a + b] for a, b in self.merges]
            if any(x >= y for x, y in zip(order, order[1:])):
                raise ValueError(f"to_tiktoken: the merges of {self.name} are not in the order of their token "
                                 f"ids, which tiktoken needs; use encode()")
        if self.pattern is None:
            pat = r"[\s\S]+"
        elif isinstance(self.pattern, str):
            pat = self.pattern
        elif self.pattern == PATTERNS["deepseek_v3"]:
            pat = _DEEPSEEK_V3_ONE_REGEX
        else:
            raise ValueError(f"to_tiktoken: tiktoken takes one regex; {self.name} splits with "
                             f"{len(self.pattern)} in turn")
        kwargs = dict(name=self.name, pat_str=pat, mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        self._tiktoken = (NormalizingEncoding(self.normalization, **kwargs) if self.normalization
                          else tiktoken.Encoding(**kwargs))
        return self._tiktoken


class StreamDecoder:
    """Decode tokens one at a time without ever emitting half a UTF-8 character (see Tokenizer.decoder)."""

    def __init__(self, vocab):
        self._vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id):
        return self._utf8.decode(self._vocab[token_id])

    def flush(self):
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class NormalizingEncoding(tiktoken.Encoding):
    """tiktoken.Encoding that applies the tokenizer's Unicode normalization first (batch methods call these)."""

    def __init__(self, forms, **kwargs):
        super().__init__(**kwargs)
        self.forms = forms

    def _normalize(self, text):
        for form in self.forms:
            text = unicodedata.normalize(form, text)
        return text

    def encode_ordinary(self, text):
        return super().encode_ordinary(self._normalize(text))

    def encode(self, text, **kwargs):
        return super().encode(self._normalize(text), **kwargs)


def read_text(path):
    """Read a UTF-8 text file; invalid bytes raise BadInput naming the file and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not valid UTF-8 at byte offset {e.start} "
                       f"({data[e.start:e.start + 4]!r}...)") from None


# -----------------------------------------------------------------------------------------------------------
# Loading


def load(path):
    """Load a tokenizer: our tokenizer.bpe, an official tokenizer file, or a model directory."""
    path = Path(path)
    if path.is_dir():
        return _load_dir(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such tokenizer file or model directory")
    if path.name in ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt"):   # one of a pair
        return _load_dir(path.parent)
    head = path.open("rb").read(64)
    if head.startswith(b"bpe v"):
        return _load_own(path)
    if head.lstrip()[:1] == b"{":
        return _load_tokenizer_json(path)
    return _load_tiktoken_ranks(path)


def _load_dir(d):
    """A model directory: the first complete file set in this order wins, then its side files add BOS/EOS
    facts (tokenizer_config.json, generation_config.json, config.json)."""
    config = _read_json_if(d / "tokenizer_config.json")
    if (d / SAVE_NAME).is_file():
        tok = _load_own(d / SAVE_NAME)
    elif (d / "tokenizer.json").is_file():
        tok = _load_tokenizer_json(d / "tokenizer.json")
    elif (d / "vocab.json").is_file() or (d / "merges.txt").is_file():
        _need_pair(d, "vocab.json", "merges.txt")
        tok = _load_vocab_merges(d / "vocab.json", d / "merges.txt", config)
    elif (d / "encoder.json").is_file() or (d / "vocab.bpe").is_file():
        _need_pair(d, "encoder.json", "vocab.bpe")
        tok = _load_vocab_merges(d / "encoder.json", d / "vocab.bpe", config)
    elif (d / "tokenizer.model").is_file() or (d / "original" / "tokenizer.model").is_file():
        ranks_file = d / "tokenizer.model" if (d / "tokenizer.model").is_file() else d / "original" / "tokenizer.model"
        params = _read_json_if(ranks_file.parent / "params.json")
        tok = _load_tiktoken_ranks(ranks_file, llama_30=bool(params) and not params.get("use_scaled_rope"))
    else:
        raise BadInput(f"{d}: no tokenizer found (looked for {SAVE_NAME}, tokenizer.json, vocab.json + "
                       f"merges.txt, encoder.json + vocab.bpe, tokenizer.model, original/tokenizer.model)")
    eos = set(tok.eos_ids or ())
    for f in ("generation_config.json", "config.json"):
        ids = _read_json_if(d / f).get("eos_token_id")
        eos |= {i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int) and i in tok.vocab}
    eos_name = _token_content(config.get("eos_token"))
    if eos_name in tok.special_tokens:
        eos.add(tok.special_tokens[eos_name])
    tok.eos_ids = sorted(eos) or None
    bos_name = _token_content(config.get("bos_token"))
    model_bos = _read_json_if(d / "config.json").get("bos_token_id")
    if bos_name in tok.special_tokens:
        tok.bos_id = tok.special_tokens[bos_name]
    elif tok.bos_id is None and isinstance(model_bos, int) and model_bos in tok.vocab:
        tok.bos_id = model_bos
    if isinstance(config.get("add_bos_token"), bool):   # HF rebuilds its post-processor from this flag
        tok.add_bos = config["add_bos_token"]
    return tok


def _need_pair(d, a, b):
    for name in (a, b):
        if not (d / name).is_file():
            raise BadInput(f"{d}: has {a if name == b else b} but not {name}; both are needed")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                       f"truncated or corrupted?") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not valid UTF-8 at byte offset {e.start}; corrupted?") from None


def _check_pattern(pattern, where):
    """A pattern read from a file: one that Python's re cannot run is the file's fault, not the caller's."""
    try:
        _Splitter(pattern)
    except ValueError as e:
        raise BadInput(f"{where}: {e}") from None
    return pattern


def _read_json_if(path):
    if not path.is_file():
        return {}
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return obj


def _token_content(t):
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    return t.get("content") if isinstance(t, dict) else t


@functools.cache
def _byte_alphabet():
    """GPT-2's bytes_to_unicode: byte -> printable char; the 68 others map to chr(256 + n), so " " -> "Ġ"."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars, {c: b for b, c in chars.items()}


@functools.cache
def _unbyte_table():
    """str.translate table: each alphabet char -> the char whose code is its byte; other chars below 256 -> deleted."""
    table = dict.fromkeys(range(256))
    table.update({ord(c): b for b, c in _byte_alphabet()[0].items()})
    return table


def _unbyte(token):
    """A byte-level token string ("Ġhello") -> its bytes (b" hello"), or None if it is not one."""
    latin1 = token.translate(_unbyte_table())   # C speed: ~150k tokens in a few tens of ms
    if len(latin1) != len(token) or latin1 and max(latin1) > "\xff":
        return None
    return latin1.encode("latin-1")


def _load_own(path):
    lines = read_text(path).split("\n")
    if lines[0] != "bpe v1":
        raise BadInput(f"{path}, line 1: expected 'bpe v1', got {lines[0][:40]!r}")
    try:
        key, value = lines[1].split(" ", 1)
        if key != "pattern":
            raise ValueError
        pattern = json.loads(value)
    except (ValueError, IndexError):
        raise BadInput(f"{path}, line 2: expected 'pattern <JSON string or list>'") from None
    _check_pattern(pattern, f"{path}, line 2")
    specials, n = {}, 2
    while n < len(lines) and lines[n].startswith("special "):
        try:
            _, i, name = lines[n].split(" ", 2)
            specials[json.loads(name)] = int(i)
        except ValueError:
            raise BadInput(f"{path}, line {n + 1}: expected 'special <id> <JSON string>'") from None
        n += 1
    declared = re.fullmatch(r"merges (\d+)", lines[n]) if n < len(lines) else None
    if not declared:
        raise BadInput(f"{path}, line {n + 1}: expected 'merges <count>'")
    count = int(declared[1])
    body = lines[n + 1:]
    if len(body) != count + 1 or body[-1] != "":
        raise BadInput(f"{path}: declares {count} merges but has {len([b for b in body if b])} lines of them "
                       f"(truncated?)")
    vocab, pairs = [bytes([b]) for b in range(256)], []
    for k, line in enumerate(body[:-1]):
        try:
            a, b = map(int, line.split(" "))
            vocab.append(vocab[a] + vocab[b])
        except (ValueError, IndexError):
            raise BadInput(f"{path}, line {n + 2 + k}: expected two ids below {len(vocab)}, got {line!r}") from None
        pairs.append((a, b))
    for s, i in specials.items():
        if not isinstance(s, str) or i < len(vocab):
            raise BadInput(f"{path}: special token {s!r} has id {i}: expected a string, with an id after the merges")
    return Tokenizer({t: i for i, t in enumerate(vocab)}, pattern, specials, merge_pairs=pairs, name=str(path))


def _load_vocab_merges(vocab_path, merges_path, config=None):
    """GPT-2's encoder.json + vocab.bpe, or HF's vocab.json + merges.txt (GPT-2, Qwen): HF's merge rule."""
    config = config or {}
    encoder = _read_json(vocab_path)
    lines = read_text(merges_path).split("\n")
    merges = []
    for n, line in enumerate(lines, 1):
        if line.startswith("#version") or (not line and n == len(lines)):   # header; the final newline
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise BadInput(f"{merges_path}, line {n}: expected a merge 'left right', got {line[:60]!r}")
        merges.append((parts, f"{merges_path}, line {n}"))
    added = {_token_content(t["content"] if isinstance(t, dict) else t): int(i)
             for i, t in (config.get("added_tokens_decoder") or {}).items()}
    qwen = str(config.get("tokenizer_class", "")).startswith("Qwen2")
    return _build_hf(encoder, merges, added, str(vocab_path), pattern="qwen2" if qwen else "gpt2",
                     normalization=("NFC",) if qwen else (), ignore_merges=False)


def _build_hf(vocab, merges, added, where, pattern, normalization, ignore_merges, add_bos=False, bos_id=None):
    """Shared by the HF loaders: vocab {byte-level string: id}, merges [((left, right), where)], added tokens."""
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise BadInput(f"{where}: the vocabulary must be a JSON object {{token: id}}")
    decoded = {s: _unbyte(s) for s in vocab if s not in added}
    ids = {t: vocab[s] for s, t in decoded.items() if t is not None}
    priority = {}
    for rank, ((left, right), line) in enumerate(merges):
        a, b = _unbyte(left), _unbyte(right)
        for part, s in ((a, left), (b, right), (a + b if a and b else None, left + right)):
            if part not in ids:
                raise BadInput(f"{line}: merge {left!r} {right!r} uses {s!r}, which is not in the vocabulary")
        priority.setdefault((a, b), rank)
    made = {bytes([b]) for b in range(256)} | {a + b for a, b in priority}
    specials = dict(added)
    for s, t in decoded.items():   # vocab entries that no merge makes: special tokens, or a truncated merges file
        i = vocab[s]
        if t is None or t not in made:
            if not re.fullmatch(r"<\|[^|]+\|>|<｜.+｜>", s):
                raise BadInput(f"{where}: token {s!r} (id {i}) is neither a byte, the result of a merge, nor an "
                               f"added token ({len(merges)} merges read): truncated merges file?")
            ids.pop(t, None)
            specials[s] = i
    return Tokenizer(ids, pattern, specials, merges=priority, ignore_merges=ignore_merges, name=where,
                     normalization=normalization, add_bos=add_bos, bos_id=bos_id)


def _load_tokenizer_json(path):
    tj = _read_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise BadInput(f"{path}: key 'model' must be a BPE model with 'vocab' and 'merges'")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise BadInput(f"{path}: model.{key} = {model[key]!r} is not supported (byte-level BPE only)")
    if model.get("byte_fallback"):
        raise BadInput(f"{path}: model.byte_fallback is for SentencePiece-style BPE, not supported")
    merges = []
    for k, m in enumerate(model.get("merges") or []):
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2:
            raise BadInput(f"{path}: model.merges[{k}] = {m!r}: expected 'left right' or [left, right]")
        merges.append((parts, f"{path}: model.merges[{k}]"))
    added = {}
    for k, t in enumerate(tj.get("added_tokens") or []):
        if not isinstance(t, dict) or "content" not in t or "id" not in t:
            raise BadInput(f"{path}: added_tokens[{k}] must have 'id' and 'content'")
        added[t["content"]] = t["id"]
    normalization = _normalizer_forms(tj.get("normalizer"), path)
    pattern = _check_pattern(_pretokenizer_patterns(tj.get("pre_tokenizer"), path), path)
    add_bos, bos_id = _template_bos(tj.get("post_processor"), added)
    return _build_hf(model["vocab"], merges, added, str(path), pattern, normalization,
                     bool(model.get("ignore_merges")), add_bos=add_bos, bos_id=bos_id)


def _normalizer_forms(norm, path):
    if norm is None:
        return ()
    kind = norm.get("type")
    if kind == "Sequence":
        return tuple(f for n in norm.get("normalizers", []) for f in _normalizer_forms(n, path))
    if kind in _NORMAL_FORMS:
        return (kind,)
    raise BadInput(f"{path}: normalizer {kind!r} is not supported (only NFC, NFD, NFKC, NFKD and Sequence)")


def _pretokenizer_patterns(pre, path):
    """-> a pattern (str) or a tuple of patterns applied in turn."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    patterns = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise BadInput(f"{path}: pre_tokenizer ByteLevel(add_prefix_space=true) is not supported")
            if step.get("use_regex", True):
                patterns.append(PATTERNS["gpt2"])
        elif kind == "Split":
            pat = step.get("pattern", {})
            if step.get("invert") or str(step.get("behavior", "")).lower() != "isolated":
                raise BadInput(f"{path}: pre_tokenizer Split must have behavior 'Isolated' and invert false")
            patterns.append(pat["Regex"] if "Regex" in pat else re.escape(pat.get("String", "")))
        else:
            raise BadInput(f"{path}: pre_tokenizer {kind!r} is not supported (ByteLevel, Split, Sequence)")
    if not any(s.get("type") == "ByteLevel" for s in steps):
        raise BadInput(f"{path}: no ByteLevel pre_tokenizer: only byte-level BPE is supported")
    return patterns[0] if len(patterns) == 1 else tuple(patterns) if patterns else None


def _template_bos(post, added):
    """Does the post-processor put a special token before the text? -> (add_bos, its id)."""
    if not post:
        return False, None
    if post.get("type") == "Sequence":
        for p in post.get("processors", []):
            found = _template_bos(p, added)
            if found[0]:
                return found
        return False, None
    single = post.get("single") or []
    if post.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
        name = single[0]["SpecialToken"]["id"]
        ids = (post.get("special_tokens", {}).get(name) or {}).get("ids") or [added.get(name)]
        return True, ids[0]
    return False, None


# Llama 3's 256 special tokens, at ids num_base_tokens + i (docs/FORMATS.md 4.2).
_LLAMA3_SPECIALS_31 = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                       "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                       "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                       "<|image|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]
_LLAMA3_SPECIALS_30 = (["<|begin_of_text|>", "<|end_of_text|>"]
                       + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                       + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                       + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])


def _load_tiktoken_ranks(path, llama_30=False):
    """A tiktoken ranks file (Llama 3's tokenizer.model): one 'base64(token) rank' per line."""
    data = path.read_bytes()
    if b"\x00" in data[:1024]:
        raise BadInput(f"{path}: a binary file, not a tiktoken ranks file (a SentencePiece model? not supported)")
    ranks = {}
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line:
            continue
        try:
            token, rank = line.split(b" ")
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:
            raise BadInput(f"{path}, line {n}: expected 'base64-token rank', got {line[:60]!r} "
                           f"(truncated or not a tiktoken ranks file?)") from None
        if token in ranks:
            raise BadInput(f"{path}, line {n}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise BadInput(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps (truncated or corrupted?)")
    names = _LLAMA3_SPECIALS_30 if llama_30 else _LLAMA3_SPECIALS_31
    specials = {s: len(ranks) + i for i, s in enumerate(names)}
    return Tokenizer(ranks, "llama3", specials, add_bos=True, name=str(path))
