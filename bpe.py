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

Byte-level BPE (Sennrich et al. 2016; GPT-2, Radford et al. 2019), as in minbpe: a regex (PATTERNS, run by `regex`)
cuts the text into chunks ("Hello", " world", "!") that merges never cross; a chunk starts as its UTF-8 bytes (ids
0..255); training merges the most frequent adjacent pair into a new token until the vocabulary is full.
- One dict holds the merges: merges[(left id, right id)] = the id they make. Encoding merges first the pair that
  makes the lowest id (the leftmost of equals), and a chunk that is a token stays whole, as tiktoken (HF: with
  `ignore_merges`). HF's files give their list of merges, applied by HF in list order: the order of the ids made,
  in every official file (other files are refused). A tiktoken ranks file gives every cut of a token into two.
- tests/test_bpe*.py check each format token for token against tiktoken and HF; `to_tiktoken()` gives the same ids
  at native speed. Training updates pair counts only around each merge: as fast as HF's Rust trainer (bench/bpe.py).
  `save_pretrained()` writes HF's tokenizer.json + tokenizer_config.json too, so that AutoTokenizer loads ours.
- `regex` knows Unicode 17.0, tiktoken and HF 16.0: characters assigned in 2025 may split differently in `encode()`
  than in `to_tiktoken()` or HF. In a pattern of your own, `$` also matches before a final newline, unlike Rust's.
- A SentencePiece tokenizer.model (Llama 2, Mistral, Gemma) loads as sentencepiece_tokenizer.SentencePieceTokenizer.
  Bad files raise errors.BadInput naming the file and the line or key; ValueError and TypeError are for misuse.
"""
import base64
import codecs
import heapq
import json
import unicodedata
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import regex as re
import tiktoken

import checkpoint_io
from errors import BadInput

SAVE_NAME = "tokenizer.bpe"
_BINARY = re.compile(rb"[^\t\n\r -~]")   # a byte that no tiktoken ranks file (base64 text) holds, but protobuf does
TOKENIZER_FILES = ("tokenizer.bpe", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "tokenizer.model")   # prepare_data copies

# -----------------------------------------------------------------------------------------------------------
# Pre-tokenizer patterns, in the official (Rust/Oniguruma) syntax, which `regex` runs as written

PATTERNS = {
    # GPT-2, in tiktoken's form: it splits exactly like encoder.py's 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
    # ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ (and HF ByteLevel's), and backtracks less: 1.5x faster in tiktoken.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    # Llama 3 (meta-llama/llama3 tokenizer.py): digits in groups of up to three.
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # Qwen2 / 2.5 / 3 (transformers tokenization_qwen2.py): one digit per chunk.
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # DeepSeek-V3 (tokenizer.json): three Split steps applied one after the other to each other's pieces.
    "deepseek_v3": (
        r"""\p{N}{1,3}""", r"""[一-龥\u3040-ゟ゠-ヿ]+""",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
}

# tiktoken takes one regex, so DeepSeek-V3's three steps become one. Runs of step 2's set C split as step 3 splits
# them: letters and marks, punctuation and symbols, C's unassigned code points (alternatives 2-4); step 3 then runs
# on the text between digits and C, where its (?!\S) also holds before them (5-10); what it leaves unmatched (a ZWJ
# before no letter) is a piece of its own, as HF keeps it (the last). tests/test_bpe_official.py checks all this.
_C = r"\x{3040}-\x{30FF}\x{4E00}-\x{9FA5}"
_C_OTHER = rf"[[{_C}]--[\p{{L}}\p{{M}}\p{{P}}\p{{S}}]]"   # the unassigned U+3040, U+3097, U+3098
_DEEPSEEK_V3_ONE_REGEX = "|".join([
    r"\p{N}{1,3}",
    rf"{_C_OTHER}?[[\p{{L}}\p{{M}}]&&[{_C}]]+", rf"[[\p{{P}}\p{{S}}]&&[{_C}]]+",
    rf"(?:{_C_OTHER}(?![[\p{{L}}\p{{M}}]&&[{_C}]]))+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""",
    rf"[^\r\n\p{{L}}\p{{P}}\p{{S}}\p{{N}}{_C}]?[[\p{{L}}\p{{M}}]--[{_C}]]+",
    rf" ?[[\p{{P}}\p{{S}}]--[{_C}]]+[\r\n]*",
    r"\s*[\r\n]+", rf"\s+(?![^\s\p{{N}}{_C}])", r"\s+",
    rf"(?:[^\s\p{{L}}\p{{M}}\p{{P}}\p{{S}}\p{{N}}{_C}](?![[\p{{L}}\p{{M}}]--[{_C}]]))+",
])


def _compile(pattern, where=None):
    """A pattern as train() takes it -> (as stored, its regexes applied in turn), or ValueError (BadInput if read
    from a file, where): "gpt2" -> (PATTERNS["gpt2"], [its regex]); ["a", "b"] -> (("a", "b"), [two regexes])."""
    pattern = PATTERNS.get(pattern, pattern) if isinstance(pattern, str) else pattern
    pattern = tuple(pattern) if isinstance(pattern, list) else pattern
    try:
        return pattern, [re.compile(p) for p in ((pattern,) if isinstance(pattern, str) else pattern or ())]
    except (re.error, TypeError) as e:
        message = f"pattern {pattern!r} does not compile: {e}"
        raise BadInput(f"{where}: {message}") if where else ValueError(message) from None


def _chunks(regexes, text):
    """Pre-tokenize; each regex splits the pieces of the one before, and what it leaves unmatched stays a piece
    (HF's Split(behavior="isolated")): GPT-2's pattern on "Hello world!" -> ["Hello", " world", "!"]."""
    pieces = [text] if text else []
    for rx in regexes:
        split = []
        for p in pieces:
            found = [] if rx.groups else rx.findall(p)
            if sum(map(len, found)) != len(p):   # gaps, or groups in rx: split() on "(rx)" gives text, match, groups
                found = [c for k, c in enumerate(re.split(f"({rx.pattern})", p)) if c and k % (rx.groups + 2) < 2]
            split += found
        pieces = split
    return pieces


# -----------------------------------------------------------------------------------------------------------
# Training


def train(text, vocab_size, pattern="gpt2", special_tokens=None):
    """Learn a byte-level BPE of vocab_size tokens (256 bytes + merges + special tokens) from text.

    text: a str, or an iterable of str (documents; no chunk spans two documents).
    pattern: a name in PATTERNS, a regex, a sequence of regexes applied in turn, or None (no pre-splitting).
    special_tokens: None, a list of names (ids after the merges), or a dict name -> id using the top ids,
        e.g. {"<|endoftext|>": vocab_size - 1}. Their text is cut out of the training data.
    Ties go to the smallest (left id, right id). If the text runs out of pairs, there are fewer merges (a warning),
    and the special tokens follow the last merge: every id below vocab_size is a token.
    >>> train("aaabdaaabac", 259, pattern=None).merges   # aa (4 times), then ab before (aa)a: both 2
    {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    """
    specials = list(special_tokens or ())
    top = set(range(vocab_size - len(specials), vocab_size))
    if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s for s in specials):
        raise ValueError(f"special_tokens {special_tokens!r}: expected distinct non-empty strings")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 byte tokens + {len(specials)} special token(s)")
    if isinstance(special_tokens, dict) and set(special_tokens.values()) != top:
        raise ValueError(f"special_tokens {special_tokens!r}: their ids must be the top ones, {min(top)}..{max(top)}")
    pattern, regexes = _compile(pattern)
    cut = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None

    # 1. Count the unique chunks once: the stdlib's 20 MB hold ~5M chunks but only ~70k distinct ones.
    counts = Counter()
    for doc in [text] if isinstance(text, str) else text:
        if not isinstance(doc, str):
            raise TypeError(f"train: text must be a str or an iterable of str, got {type(doc).__name__}")
        for part in (cut.split(doc) if cut else (doc,)):
            counts.update(_chunks(regexes, part))

    # 2. Merge the most frequent pair, again and again.
    n_merges = vocab_size - 256 - len(specials)
    merges = _learn_merges(counts, n_merges)
    if len(merges) < n_merges:
        warnings.warn(f"train: the text has only enough pairs for {len(merges)} of {n_merges} merges (fewer tokens)")
    ids = ({s: i - n_merges + len(merges) for s, i in special_tokens.items()} if isinstance(special_tokens, dict)
           else {s: 256 + len(merges) + i for i, s in enumerate(specials)})
    return Tokenizer(merges, pattern, ids)


def _learn_merges(counts, n_merges):
    """The BPE training loop on unique chunks, e.g. with 2 merges
    {"ab": 2, "ba": 2} -> {(97, 98): 256, (98, 97): 257} (both pairs occur twice: the smaller goes first).
    Only the chunks that hold the merged pair are touched: (x, a) and (b, y) lose the chunk's frequency, (x, new)
    and (new, y) gain it. Old pairs only lose counts, so their heap entries are fixed lazily when popped."""
    words, freqs = [list(chunk.encode("utf-8")) for chunk in counts], list(counts.values())
    K = 256 + n_merges   # a pair (a, b) is packed as a * K + b: ints hash faster than tuples
    pair_counts, where = Counter(), defaultdict(list)   # where[p]: chunks that had p; a rescan skips repeats
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_counts[a * K + b] += freqs[i]
            where[a * K + b].append(i)
    heapq.heapify(heap := [(-c, p) for p, c in pair_counts.items()])   # ties: smallest (a, b) first
    merges = {}
    while len(merges) < n_merges and heap:
        c, p = heapq.heappop(heap)
        if -c != pair_counts[p]:   # stale: the count went down since this entry was pushed
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            continue
        a, b = divmod(p, K)
        new = merges[(a, b)] = 256 + len(merges)
        grown = set()
        for i in where.pop(p):
            w, f, j, last = words[i], freqs[i], 0, len(words[i]) - 1   # last: where the last pair starts
            while j < last:
                if w[j] == a and w[j + 1] == b:
                    if j > 0:
                        pair_counts[w[j - 1] * K + a] -= f
                        q = w[j - 1] * K + new
                        pair_counts[q] += f
                        where[q].append(i)
                        grown.add(q)
                    if j + 1 < last:
                        pair_counts[b * K + w[j + 2]] -= f
                        q = new * K + w[j + 2]
                        pair_counts[q] += f
                        where[q].append(i)
                        grown.add(q)
                    w[j:j + 2] = [new]
                    last -= 1
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


class Tokenizer:
    """One class for trained and official tokenizers, built by train() or load(). merges: {(left id, right id):
    the id they make}; vocab: {id: bytes} of an official file's ordinary tokens, or None to build it from the
    merges, the bytes being ids 0..255 (train(), tokenizer.bpe: the ones save() takes). Special tokens join it."""

    def __init__(self, merges, pattern, special_tokens=None, *, vocab=None, ignore_merges=True,
                 normalization=(), add_bos=False, bos_id=None, name="bpe"):
        self.merges, self._ours = merges, vocab is None
        if vocab is None:
            vocab = {b: bytes([b]) for b in range(256)}
            for (a, b), i in merges.items():
                vocab[i] = vocab[a] + vocab[b]
        self._ids = {t: i for i, t in vocab.items()}   # bytes -> id: tiktoken's mergeable ranks
        if missing := [b for b in range(256) if bytes([b]) not in self._ids]:
            raise BadInput(f"{name}: byte {missing[0]:#04x} has no token: a byte-level BPE needs all 256")
        self._byte_ids = [self._ids[bytes([b])] for b in range(256)]   # GPT-2's files number bytes otherwise
        self.special_tokens = dict(special_tokens or {})
        self.vocab = vocab | {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self.vocab_size = max(self.vocab) + 1
        self.pattern, self._regexes = _compile(pattern)
        self.ignore_merges, self.normalization, self.name = ignore_merges, tuple(normalization), name
        self.add_bos = add_bos   # does the official pipeline start every text with BOS? Callers add it.
        self.bos_id = bos_id if bos_id is not None else next(
            (self.special_tokens[s] for s in _KNOWN_BOS if s in self.special_tokens), None)
        self.eos_ids = sorted(self.special_tokens[s] for s in _KNOWN_EOS if s in self.special_tokens) or None
        self._cache, self._tiktoken = {}, None

    def encode(self, text, allowed_special="none_raise"):
        """text -> token ids, without BOS/EOS (see add_bos / bos_id). allowed_special, as tiktoken: "none_raise"
        (special-token text is an error), "all", a set of their names, or "none" (it is ordinary text).
        >>> tok = train("", 257, pattern=None, special_tokens=["<|endoftext|>"])   # bytes + one special
        >>> tok.encode("a<|endoftext|>", allowed_special="all")
        [97, 256]
        >>> tok.encode("a<|endoftext|>", allowed_special="none")[:3]   # "a", "<", "|", ...
        [97, 60, 124]
        """
        specials = set(self.special_tokens)
        allowed = (specials if allowed_special == "all" else set() if allowed_special in ("none", "none_raise")
                   else set(allowed_special))
        if allowed - specials:
            raise ValueError(f"allowed_special: {sorted(allowed - specials)} are not special tokens of {self.name}")
        if allowed_special != "none" and (found := [s for s in self.special_tokens if s not in allowed and s in text]):
            raise ValueError(f"the text contains the special token {found[0]!r}; pass allowed_special='all' (or a set "
                             f"with it) to encode it as one token, or 'none' to encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        parts = re.split(f"({'|'.join(map(re.escape, sorted(allowed, key=len, reverse=True)))})", text)
        return [i for k, part in enumerate(parts)   # odd parts are the special tokens
                for i in ([self.special_tokens[part]] if k % 2 else self.encode_ordinary(part))]

    def encode_ordinary(self, text):
        """text -> token ids, special-token text included as ordinary text."""
        if re.search("[\ud800-\udfff]", text):   # as tiktoken: a lone surrogate cannot be UTF-8, it becomes U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids, cache = [], self._cache
        for chunk in _chunks(self._regexes, self._normalize(text)):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._bpe(chunk.encode("utf-8"))
                if len(cache) < 200_000:
                    cache[chunk] = chunk_ids
            ids += chunk_ids
        return ids

    def _normalize(self, text):
        """Unicode normalization, each form in turn: with ("NFC",), "e\\u0301" -> "é"."""
        for form in self.normalization:
            text = unicodedata.normalize(form, text)
        return text

    def _bpe(self, piece):
        """Byte-pair encode one chunk, merging first the pair that makes the lowest id (the module doc's tok):
        b"aaab" -> [97, 97, 97, 98] -> [256, 97, 98] -> [256, 257] -> [258]. O(n^2) in the chunk's length: for a
        megabyte without a split point (pattern=None, a huge run of digits), use to_tiktoken()."""
        if self.ignore_merges and piece in self._ids:
            return [self._ids[piece]]
        ids = [self._byte_ids[b] for b in piece]
        merges, inf = self.merges, float("inf")
        made = [merges.get(pair, inf) for pair in zip(ids, ids[1:])]   # made[i]: what ids i, i + 1 merge into
        while made and (best := min(made)) != inf:
            i = made.index(best)   # ties: the leftmost pair, as in tiktoken
            ids[i:i + 2] = [best]
            del made[i]
            if i > 0:
                made[i - 1] = merges.get((ids[i - 1], best), inf)
            if i < len(made):
                made[i] = merges.get((best, ids[i + 1]), inf)
        return ids

    def decode(self, ids):
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        try:   # ids: a list, or a numpy array or torch tensor
            return b"".join([self.vocab[i] for i in (ids.tolist() if hasattr(ids, "tolist") else ids)])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary of {self.name}") from None

    def decoder(self):
        """A StreamDecoder: .step(id) -> the text complete so far, .flush() -> the rest (a split character waits):
        >>> d = train("", 256, pattern=None).decoder()   # bytes only: "é" is the tokens 195, 169
        >>> d.step(195), d.step(169), d.flush()
        ('', 'é', '')"""
        return StreamDecoder(self.vocab)

    def save(self, path):
        """Write our own text format (atomically); an official tokenizer is kept as its files (TOKENIZER_FILES)."""
        if not self._ours:
            raise ValueError(f"save: {self.name} was loaded from official files; keep those (bpe.TOKENIZER_FILES)")
        lines = ["bpe v1", "pattern " + json.dumps(self.pattern, ensure_ascii=False)]
        lines += [f"special {i} " + json.dumps(s, ensure_ascii=False) for s, i in self.special_tokens.items()]
        lines += [f"merges {len(self.merges)}", *(f"{a} {b}" for a, b in self.merges)]
        checkpoint_io.atomic_write(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))

    def save_pretrained(self, directory):
        """tokenizer.bpe (if ours), and HF's tokenizer.json + tokenizer_config.json (also for GPT-2's official files,
        which AutoTokenizer does not read): b" t" -> "Ġt", the pattern as a Split, the normalization as normalizers."""
        if self._ours:
            self.save(Path(directory) / SAVE_NAME)
        names = {i: s for s, i in self.special_tokens.items()}
        hf = {i: "".join(_BYTE_CHARS[b] for b in t) for i, t in self.vocab.items() if i not in names}
        splits = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                  for p in ((self.pattern,) if isinstance(self.pattern, str) else self.pattern or ())]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        flags = dict.fromkeys(("single_word", "lstrip", "rstrip", "normalized"), False) | {"special": True}
        checkpoint_io.write_json(Path(directory) / "tokenizer.json", {"version": "1.0", "added_tokens": [
            {"id": i, "content": s, **flags} for s, i in self.special_tokens.items()],
            "normalizer": {"type": "Sequence", "normalizers": [{"type": f} for f in self.normalization]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]}, "decoder": byte_level,
            "model": {"type": "BPE", "ignore_merges": self.ignore_merges, "vocab": {s: i for i, s in hf.items()},
                      "merges": [[hf[a], hf[b]] for a, b in self.merges]}})
        ends = {k: names[i] for k, i in (("bos_token", self.bos_id), ("eos_token", (self.eos_ids or [None])[0]))
                if i in names}
        checkpoint_io.write_json(Path(directory) / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **ends})

    def to_tiktoken(self):
        """A tiktoken.Encoding with the same ranks, pattern, special tokens (and normalization): same ids, fast."""
        if self._tiktoken is None:
            if not isinstance(self.pattern, (str, type(None))) and self.pattern != PATTERNS["deepseek_v3"]:
                raise ValueError(f"to_tiktoken: tiktoken takes one regex; {self.name} has {len(self.pattern)}")
            pat = {None: r"[\s\S]+", PATTERNS["deepseek_v3"]: _DEEPSEEK_V3_ONE_REGEX}.get(self.pattern, self.pattern)
            self._tiktoken = (NormalizingEncoding if self.normalization else tiktoken.Encoding)(
                name=self.name, pat_str=pat, mergeable_ranks=self._ids, special_tokens=self.special_tokens)
            self._tiktoken.normalize = self._normalize   # what NormalizingEncoding applies
        return self._tiktoken


class NormalizingEncoding(tiktoken.Encoding):
    """tiktoken.Encoding that applies normalize (the tokenizer's normalization) first; batch methods call these."""

    def encode_ordinary(self, text):
        return super().encode_ordinary(self.normalize(text))

    def encode(self, text, **kwargs):
        return super().encode(self.normalize(text), **kwargs)


class StreamDecoder:
    """Decode tokens one at a time without ever emitting half a UTF-8 character (see Tokenizer.decoder)."""

    def __init__(self, vocab):
        self._vocab, self._utf8 = vocab, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id):
        return self._utf8.decode(self._vocab[token_id])

    def flush(self):
        return self._utf8.decode(b"", final=True)   # which also empties it


def read_text(path):
    """Read a UTF-8 text file; invalid bytes raise BadInput naming the file and the byte offset."""
    try:
        return (data := Path(path).read_bytes()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not valid UTF-8 at byte offset {e.start} ({data[e.start:][:4]!r}...)") from None


# -----------------------------------------------------------------------------------------------------------
# Loading


def load(path):
    """Load a tokenizer: our tokenizer.bpe, an official tokenizer file, or a model directory."""
    path = Path(path)
    if path.is_dir() or path.is_file() and path.name in ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt"):
        return _load_dir(path if path.is_dir() else path.parent)   # a directory, or one file of a pair
    if not path.is_file():
        raise BadInput(f"{path}: no such tokenizer file or model directory")
    head = path.open("rb").read(64)   # else a tokenizer.model: tiktoken's ranks, or a binary SentencePiece model
    return (_load_own if head.startswith(b"bpe v") else _load_tokenizer_json if head.lstrip()[:1] == b"{"
            else _load_tokenizer_model)(path)


def _load_dir(d):
    """A model directory: the first complete set of files in this order wins (ours first: what save_pretrained()
    wrote loads as trained); tokenizer_config.json, generation_config.json and config.json add BOS/EOS facts."""
    config = _read_json(d / "tokenizer_config.json", optional=True)
    pair = next(([d / a, d / b] for a, b in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
                 if (d / a).is_file() or (d / b).is_file()), None)
    ranks_file = next((f for f in (d / "tokenizer.model", d / "original" / "tokenizer.model") if f.is_file()), None)
    if (d / SAVE_NAME).is_file():
        tok = _load_own(d / SAVE_NAME)
    elif ranks_file and _BINARY.search(ranks_file.open("rb").read(1024)):   # SentencePiece's, before HF's copy
        tok = _load_tokenizer_model(ranks_file)
    elif (d / "tokenizer.json").is_file():
        tok = _load_tokenizer_json(d / "tokenizer.json")
    elif pair:
        for missing, there in (pair, pair[::-1]):
            if not missing.is_file():
                raise BadInput(f"{d}: has {there.name} but not {missing.name}; both are needed")
        tok = _load_vocab_merges(*pair, config)
    elif ranks_file:
        params = _read_json(ranks_file.parent / "params.json", optional=True)
        tok = _load_tokenizer_model(ranks_file, llama_30=bool(params) and not params.get("use_scaled_rope"))
    else:
        raise BadInput(f"{d}: no tokenizer found (looked for {SAVE_NAME}, tokenizer.json, vocab.json + "
                       f"merges.txt, encoder.json + vocab.bpe, tokenizer.model, original/tokenizer.model)")
    eos, bos = (tok.special_tokens.get(t.get("content") if isinstance(t, dict) else t)   # "<s>", {"content": "<s>"}
                for t in (config.get("eos_token"), config.get("bos_token")))
    ids = [_read_json(d / f, optional=True).get("eos_token_id") for f in ("generation_config.json", "config.json")]
    ids = {i for x in ids for i in (x if isinstance(x, list) else [x]) if isinstance(i, int) and i in tok.vocab}
    tok.eos_ids = sorted(set(tok.eos_ids or ()) | ids | ({eos} - {None})) or None
    model_bos = _read_json(d / "config.json", optional=True).get("bos_token_id")
    if bos is not None or tok.bos_id is None and isinstance(model_bos, int) and model_bos in tok.vocab:
        tok.bos_id = bos if bos is not None else model_bos
    if isinstance(config.get("add_bos_token"), bool):   # HF rebuilds its post-processor from this flag
        tok.add_bos = config["add_bos_token"]
    return tok


def _read_json(path, optional=False):
    """A JSON file, or BadInput naming the line; optional: a missing file is {}, and it must hold an object."""
    if optional and not path.is_file():
        return {}
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); truncated?") from None
    if optional and not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return obj


# GPT-2's bytes_to_unicode: the printable bytes stand for themselves, the 68 others for chr(256 + n), so
# " " is "Ġ" and "\n" is "Ċ": HF's files write each token's bytes as such a string.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_OTHERS = [b for b in range(256) if b not in _PRINTABLE]
_BYTE_CHARS = {b: chr(b) for b in _PRINTABLE} | {b: chr(256 + n) for n, b in enumerate(_OTHERS)}
_UNBYTE = str.maketrans({c: chr(b) for b, c in _BYTE_CHARS.items()} | dict.fromkeys(map(chr, _OTHERS)))


def _unbyte(token):
    """A byte-level token string -> its bytes, or None if it is not one: "Ġhello" -> b" hello"."""
    latin1 = token.translate(_UNBYTE)   # C speed: ~150k tokens in a few tens of ms
    return None if len(latin1) != len(token) or latin1 and max(latin1) > "\xff" else latin1.encode("latin-1")


def _load_own(path):
    """tokenizer.bpe (see save()): its merges as pairs of ids, merge k making 256 + k."""
    lines = read_text(path).split("\n")
    if lines[0] != "bpe v1":
        raise BadInput(f"{path}, line 1: expected 'bpe v1', got {lines[0][:40]!r}")
    try:
        pattern = json.loads(re.fullmatch(r"pattern (.*)", lines[1] if len(lines) > 1 else "")[1])
    except (TypeError, ValueError):   # no such line, or not JSON
        raise BadInput(f"{path}, line 2: expected 'pattern <JSON string or list>'") from None
    _compile(pattern, f"{path}, line 2")
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
    body = lines[n + 1:]
    if len(body) != int(declared[1]) + 1 or body[-1] != "":
        raise BadInput(f"{path}: declares {declared[1]} merges but has {sum(map(bool, body))} (truncated?)")
    merges = {}
    for new, line in enumerate(body[:-1], 256):
        pair = tuple(map(int, m.groups())) if (m := re.fullmatch(r"(\d+) (\d+)", line)) else (new, new)
        if max(pair) >= new or pair in merges:
            raise BadInput(f"{path}, line {n + new - 254}: expected two ids below {new} not merged before: {line!r}")
        merges[pair] = new
    for s, i in specials.items():
        if not isinstance(s, str) or i < 256 + len(merges):
            raise BadInput(f"{path}: special token {s!r} has id {i}: expected a string, with an id after the merges")
    return Tokenizer(merges, pattern, specials, name=str(path))


def _load_vocab_merges(vocab_path, merges_path, config):
    """GPT-2's encoder.json + vocab.bpe, or HF's vocab.json + merges.txt (Qwen when tokenizer_config.json names
    a Qwen2 tokenizer). Unlike tiktoken's loader, a vocab.bpe without its final newline keeps its last merge."""
    lines = read_text(merges_path).split("\n")
    merges = [(line, f"{merges_path}, line {n}") for n, line in enumerate(lines, 1)
              if not line.startswith("#version") and (line or n < len(lines))]   # the header; the final newline
    added = {t["content"] if isinstance(t, dict) else t: int(i)
             for i, t in (config.get("added_tokens_decoder") or {}).items()}
    qwen = str(config.get("tokenizer_class", "")).startswith("Qwen2")
    return _build_hf(_read_json(vocab_path), merges, added, str(vocab_path), pattern="qwen2" if qwen else "gpt2",
                     normalization=("NFC",) if qwen else (), ignore_merges=False)


def _build_hf(vocab, merges, added, where, pattern, normalization, ignore_merges, add_bos=False, bos_id=None):
    """The HF loaders' vocab {byte-level string: id}, merges [("left right" or [left, right], where)] and added
    tokens {name: id} -> a Tokenizer: {"a": 64, "b": 65, "ab": 397} and ["a b"] -> merges {(64, 65): 397}."""
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise BadInput(f"{where}: the vocabulary must be a JSON object {{token: id}}")
    tokens = {i: _unbyte(s) for s, i in vocab.items() if s not in added}   # None: not a byte-level string
    pairs, last = {}, -1
    for m, line in merges:
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise BadInput(f"{line}: expected a merge 'left right' or [left, right], got {str(m)[:60]!r}")
        left, right = parts
        a, b, made = (vocab.get(s) for s in (left, right, left + right))
        if s := next((s for i, s in ((a, left), (b, right), (made, left + right)) if tokens.get(i) is None), None):
            raise BadInput(f"{line}: merge {left!r} {right!r} uses {s!r}, which is not in the vocabulary")
        if made < last and (a, b) not in pairs:   # HF keeps the first of duplicates
            raise BadInput(f"{line}: merge {left!r} {right!r} makes id {made}, below the id {last} an earlier "
                           f"merge makes; HF applies the list in order, bpe.py by the ids made (not supported)")
        last = max(last, pairs.setdefault((a, b), made))
    made = set(pairs.values()) | {i for i, t in tokens.items() if t is not None and len(t) == 1}
    specials = dict(added)
    for s, i in vocab.items():   # entries that no merge makes: special tokens, or a truncated merges file
        if s not in added and i not in made:
            if not re.fullmatch(r"<\|[^|]+\|>|<｜.+｜>", s):
                raise BadInput(f"{where}: token {s!r} (id {i}) is neither a byte, the result of a merge, nor an "
                               f"added token ({len(merges)} merges read): truncated merges file?")
            del tokens[i]
            specials[s] = i
    return Tokenizer(pairs, pattern, specials, vocab=tokens, ignore_merges=ignore_merges, name=where,
                     normalization=normalization, add_bos=add_bos, bos_id=bos_id)


def _load_tokenizer_json(path):
    """HF's tokenizer.json: BPE model, Split/ByteLevel pre-tokenizers, NFC/NFKC normalizers, added tokens; a
    TemplateProcessing post-processor that starts with a special token means "adds BOS" (`add_bos`)."""
    tj = _read_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise BadInput(f"{path}: key 'model' must be a BPE model with 'vocab' and 'merges'")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise BadInput(f"{path}: model.{key} = {model[key]!r} is not supported (byte-level BPE only)")
    added = {}
    for k, t in enumerate(tj.get("added_tokens") or []):
        if not isinstance(t, dict) or "content" not in t or "id" not in t:
            raise BadInput(f"{path}: added_tokens[{k}] must have 'id' and 'content'")
        added[t["content"]] = t["id"]
    merges = [(m, f"{path}: model.merges[{k}]") for k, m in enumerate(model.get("merges") or [])]
    pattern = _compile(_pretokenizer_patterns(tj.get("pre_tokenizer"), path), path)[0]
    return _build_hf(model["vocab"], merges, added, str(path), pattern, _normalizer_forms(tj.get("normalizer"), path),
                     bool(model.get("ignore_merges")), *_template_bos(tj.get("post_processor"), added))


def _normalizer_forms(norm, path):
    """{"type": "Sequence", "normalizers": [{"type": "NFC"}]} -> ("NFC",); None -> ()."""
    kind = norm.get("type") if norm is not None else "Sequence"
    if kind == "Sequence":
        return tuple(f for n in (norm or {}).get("normalizers", []) for f in _normalizer_forms(n, path))
    if kind not in ("NFC", "NFD", "NFKC", "NFKD"):
        raise BadInput(f"{path}: normalizer {kind!r} is not supported (only NFC, NFD, NFKC, NFKD and Sequence)")
    return (kind,)


def _pretokenizer_patterns(pre, path):
    """-> a pattern, a tuple of them applied in turn or None: Sequence[Split(p), ByteLevel] -> p (Digits: a Split)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    patterns = []
    for step in steps:
        kind, pat = step.get("type"), step.get("pattern", {})
        if kind == "ByteLevel" and step.get("add_prefix_space"):
            raise BadInput(f"{path}: pre_tokenizer ByteLevel(add_prefix_space=true) is not supported")
        patterns += [PATTERNS["gpt2"]] * (kind == "ByteLevel" and step.get("use_regex", True))
        patterns += [r"\p{N}" if step.get("individual_digits") else r"\p{N}+"] * (kind == "Digits")   # DeepSeek-V2
        if kind == "Split":
            if step.get("invert") or str(step.get("behavior", "")).lower() != "isolated":
                raise BadInput(f"{path}: pre_tokenizer Split must have behavior 'Isolated' and invert false")
            patterns.append(pat["Regex"] if "Regex" in pat else re.escape(pat.get("String", "")))
        elif kind not in ("ByteLevel", "Digits"):
            raise BadInput(f"{path}: pre_tokenizer {kind!r} is not supported (ByteLevel, Split, Digits, Sequence)")
    if not any(s.get("type") == "ByteLevel" for s in steps):
        raise BadInput(f"{path}: no ByteLevel pre_tokenizer: only byte-level BPE is supported")
    return patterns[0] if len(patterns) == 1 else tuple(patterns) or None


def _template_bos(post, added):
    """Does the post-processor put a special token before the text? -> (add_bos, its id):
    TemplateProcessing(single="<|begin_of_text|> $A") -> (True, 128000); None -> (False, None)."""
    for p in (post or {}).get("processors", [post] if post else []):
        if p.get("type") == "TemplateProcessing" and (single := p.get("single")) and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            return True, ((p.get("special_tokens", {}).get(name) or {}).get("ids") or [added.get(name)])[0]
    return False, None


# Llama 3's 256 special tokens at ids num_base_tokens + i: these named, the others reserved_special_token_0, 1, ...
_LLAMA3_30 = {0: "begin_of_text", 1: "end_of_text", 6: "start_header_id", 7: "end_header_id", 9: "eot_id"}
_LLAMA3_31 = _LLAMA3_30 | {4: "finetune_right_pad_id", 5: "step_id", 8: "eom_id", 10: "python_tag", 11: "image"}


def _load_tokenizer_model(path, llama_30=False):
    """A tiktoken ranks file (Llama 3's tokenizer.model): one 'base64(token) rank' per line, Llama 3's pattern and
    its 256 special tokens (3.1+ names; 3.0 names when params.json has no use_scaled_rope); or a SentencePiece one."""
    data = path.read_bytes()
    if _BINARY.search(data[:1024]):   # SentencePiece's protobuf (Llama 2, Mistral, Gemma), run by sentencepiece
        import sentencepiece_tokenizer   # (which imports this module)
        return sentencepiece_tokenizer.SentencePieceTokenizer(data, str(path))
    ranks = {}
    for n, line in enumerate(data.split(b"\n"), 1):
        try:
            token, rank = line.split(b" ")
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:
            if not line:
                continue
            raise BadInput(f"{path}, line {n}: expected 'base64-token rank', got {line[:60]!r} (truncated?)") from None
        if token in ranks:
            raise BadInput(f"{path}, line {n}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise BadInput(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps (truncated or corrupted?)")
    vocab, merges = {i: t for t, i in ranks.items()}, {}
    for i in range(len(vocab)):   # tiktoken's rule as merges: every cut into two tokens ("abc" = ab + c = a + bc)
        for k in range(1, len(vocab[i])):
            a, b = ranks.get(vocab[i][:k]), ranks.get(vocab[i][k:])
            if a is not None and b is not None:
                merges[(a, b)] = i
    named, reserved = _LLAMA3_30 if llama_30 else _LLAMA3_31, iter(range(256))
    specials = {f"<|{named[i]}|>" if i in named else f"<|reserved_special_token_{next(reserved)}|>": len(ranks) + i
                for i in range(256)}
    return Tokenizer(merges, "llama3", specials, vocab=vocab, add_bos=True, name=str(path))
