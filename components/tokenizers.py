"""
Tokenizers side by side: how much text each one packs into a token, per language and for code.

    python -m components.compare tokenizer [--quick] [--tokenizer_dir "GPT-2=../shared/data/gpt2"]

- The text: data/multilingual.json, one short passage written for it, in ten languages (each a translation of the
  English one, so that every tokenizer sees the same content in each) and a Python function on the same theme.
- The metrics, per tokenizer and sample (encode() of the whole passage, no BOS):
  tokens per character (Unicode code points), tokens per word, and UTF-8 bytes per token (more: shorter
  sequences for the same text, so more text in a model's context and fewer steps to generate it).
  A word is a run between whitespace (str.split) for scripts written with spaces, Korean and code included, and
  a letter or digit for Chinese and Japanese, which have none: there a "word" is a character.
- The tokenizers: the official ones (GPT-2, Llama 3, Qwen 3, DeepSeek-V3), their tokenizer files fetched through
  hub.py (or a local directory, --tokenizer_dir); one that cannot be had (offline, gated) is a row saying why.
  And three trained here at the same vocabulary size on the same corpus, English prose (tinyshakespeare, when
  prepare_data.py has cached it) and Python's standard library source: our byte-level BPE (bpe.train, GPT-2's
  pattern) and SentencePiece unigram and BPE models with byte fallback (Llama 2's trainer options). The samples
  are not in that corpus: the other languages show what a vocabulary learned from English and code costs them.
"""
import io
import json
import os
import warnings
from pathlib import Path

import regex as re
import sentencepiece

import bpe
import hub
from errors import BadInput
from sentencepiece_tokenizer import SentencePieceTokenizer

SAMPLES = Path(__file__).resolve().parent / "data" / "multilingual.json"
OFFICIAL = {"GPT-2": "openai-community/gpt2", "Llama 3": "meta-llama/Llama-3.2-1B", "Qwen 3": "Qwen/Qwen3-0.6B",
            "DeepSeek-V3": "deepseek-ai/DeepSeek-V3"}
SHAKESPEARE = hub.CACHE_DIR / "datasets" / "tinyshakespeare.txt"   # where prepare_data.py caches it
METRICS = {  # key: (table heading, what it is)
    "bytes_per_token": ("UTF-8 bytes per token", "higher: more text per token"),
    "tokens_per_word": ("tokens per word", "a word: a run between spaces, or a character in Chinese and Japanese"),
    "tokens_per_char": ("tokens per character", "characters: Unicode code points"),
}


def load_samples(path=SAMPLES):
    """[{"name": "English", "words": "spaces" | "characters", "text": ...}, ...] from the data file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["samples"]


def count_words(text, rule):
    """Words by the sample's rule: "spaces" -> runs between whitespace, "characters" -> letters and digits:
    ("Hi there, you", "spaces") -> 3; ("我们。好", "characters") -> 3."""
    if rule == "characters":
        return len(re.findall(r"[\p{L}\p{N}]", text))
    if rule == "spaces":
        return len(text.split())
    raise ValueError(f"word rule {rule!r}: expected 'spaces' or 'characters'")


def metrics(text, n_tokens, rule):
    """The three figures for a text that took n_tokens: "héllo wörld" (11 characters, 13 bytes, 2 words) in 4
    tokens -> tokens_per_char 4/11, tokens_per_word 2.0, bytes_per_token 3.25."""
    words = count_words(text, rule)
    return dict(tokens=n_tokens, chars=len(text), words=words, bytes=len(text.encode("utf-8")),
                tokens_per_char=n_tokens / len(text), tokens_per_word=n_tokens / words,
                bytes_per_token=len(text.encode("utf-8")) / n_tokens)


# -----------------------------------------------------------------------------
# the tokenizers


def load_official(source):
    """A model directory or hub id -> (tokenizer, None), or (None, the reason in one line). hub.resolve with
    weights=False fetches the tokenizer files and the small config files beside them, never the weights."""
    try:
        return bpe.load(hub.resolve(source, weights=False)), None
    except BadInput as e:   # hub.HubError is one: offline, gated, no such repo; or a file bpe.py cannot read
        return None, str(e)


def training_corpus(n_bytes):
    """Documents of about n_bytes in all: half tinyshakespeare (when cached), the rest Python stdlib source files."""
    docs, total = [], 0
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:n_bytes // 2]
        docs, total = [text], len(text)
    root = Path(os.__file__).parent
    for path in sorted(root.glob("*.py")):
        if total >= n_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")[:n_bytes - total]
        docs.append(text)
        total += len(text)
    return docs


def train_sentencepiece(docs, vocab_size, model_type):
    """A SentencePiece model trained in memory with Llama 2's settings: byte fallback, digits split, no
    normalization, whitespace kept (so code's indentation survives). It learns from lines, as sentencepiece does."""
    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, hard_vocab_limit=False, num_threads=2,
        minloglevel=2)
    return SentencePieceTokenizer(proto.getvalue(), f"sentencepiece {model_type}")


def trained_tokenizers(docs, vocab_size):
    """{name: tokenizer}: ours and SentencePiece's two algorithms, each at vocab_size tokens, on the same docs."""
    with warnings.catch_warnings():   # a small corpus may give fewer merges: the table shows the real vocabulary
        warnings.simplefilter("ignore")
        ours = bpe.train(docs, vocab_size, pattern="gpt2", special_tokens=["<|endoftext|>"])
    return {f"bpe.py BPE {vocab_size}": ours,
            f"SentencePiece unigram {vocab_size}": train_sentencepiece(docs, vocab_size, "unigram"),
            f"SentencePiece BPE {vocab_size}": train_sentencepiece(docs, vocab_size, "bpe")}


# -----------------------------------------------------------------------------
# the tables


def measure(tokenizers, samples):
    """tokenizers: {name: (tokenizer or None, where it is from, reason when None)} -> rows: one per available
    tokenizer and sample (name, sample, and metrics()), and one per unavailable tokenizer (name, reason)."""
    rows = []
    for name, (tok, source, reason) in tokenizers.items():
        if tok is None:
            rows.append(dict(tokenizer=name, source=source, reason=reason))
            continue
        for s in samples:
            n = len(tok.encode(s["text"], allowed_special="none"))
            rows.append(dict(tokenizer=name, source=source, vocab=tok.vocab_size, sample=s["name"], rule=s["words"],
                             **metrics(s["text"], n, s["words"])))
    return rows


def tables(rows):
    """Markdown lines: the tokenizers (vocabulary, or why one is missing), then one table per metric with a row
    per sample and a column per available tokenizer."""
    names = list(dict.fromkeys(r["tokenizer"] for r in rows))
    first = {name: next(r for r in rows if r["tokenizer"] == name) for name in names}
    lines = ["| tokenizer | from | vocabulary |", "|---|---|---:|"]
    for name, r in first.items():
        lines.append(f"| {name} | {r['source']} | " + (f"{r['vocab']:,} |" if "reason" not in r
                                                        else f"unavailable: {r['reason']} |"))
    have = [name for name in names if "reason" not in first[name]]
    by = {(r["tokenizer"], r["sample"]): r for r in rows if "reason" not in r}
    samples = list(dict.fromkeys(r["sample"] for r in rows if "reason" not in r))
    for key, (heading, note) in METRICS.items():
        lines += ["", f"**{heading}** ({note})", "", "| sample | words | " + " | ".join(have) + " |",
                  "|---|---:|" + "---:|" * len(have)]
        for s in samples:
            r0 = by[have[0], s]
            unit = " (chars)" if r0["rule"] == "characters" else ""
            lines.append(f"| {s} | {r0['words']}{unit} | " + " | ".join(f"{by[t, s][key]:.2f}" for t in have) + " |")
    return lines
