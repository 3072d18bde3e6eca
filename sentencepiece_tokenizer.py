"""A SentencePiece model (tokenizer.model of Llama 2, Mistral, Gemma) behind bpe.Tokenizer's interface, run by the
sentencepiece package; bpe.load() returns one for such a file, or a directory that holds it.

    >>> tok = bpe.load("Mistral-7B-v0.1")   # its tokenizer.model (tokenizer.json is HF's copy of the same model)
    >>> tok.encode("Hi</s>", allowed_special="all")[-1] == tok.eos_ids[0]   # "</s>" as text is an error by default
    True

- encode_ordinary() is sentencepiece's own encode() (BPE or unigram, byte fallback, its normalization), without the
  BOS/EOS that callers add (add_bos says whether the model expects BOS: True when it has one).
- special_tokens: the control pieces and <unk> (<s>, </s>, <pad>), which sentencepiece never makes from text: it
  reads "<s>" as three characters. Their text follows allowed_special as in bpe.Tokenizer; the parts between them
  are encoded apart, each with the model's dummy-prefix space, as Meta's Llama 2 code encodes a dialog. User-defined
  pieces are ordinary tokens: sentencepiece makes them from their text.
- vocab[id]: the bytes the id stands for inside a text ("▁the" -> b" the", "<0x0A>" -> b"\\n", control pieces b"",
  <unk> " ⁇ "), which token byte counts and streaming read; decode() is sentencepiece's, which also drops the
  space that the dummy prefix put at the start.
- No tiktoken.Encoding can run it: to_tiktoken() returns the tokenizer itself, whose encode_ordinary_batch() is what
  prepare_data.py encodes shards with, in sentencepiece's threads.
"""
from pathlib import Path

import regex as re
import sentencepiece

import bpe
import checkpoint_io
from errors import BadInput


class SentencePieceTokenizer:
    """proto: the bytes of a tokenizer.model; name: where they came from, for messages."""
    # The special-token handling and the byte views are bpe.Tokenizer's, over special_tokens, vocab and name.
    encode, decode_bytes, decoder = bpe.Tokenizer.encode, bpe.Tokenizer.decode_bytes, bpe.Tokenizer.decoder

    def __init__(self, proto, name="tokenizer.model"):
        try:
            self.sp = sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError:   # its message is a line of C++ source
            raise BadInput(f"{name}: a binary file (so not tiktoken's base64 ranks), and not a SentencePiece model "
                           f"that sentencepiece can read (truncated?)") from None
        self.proto, self.name, self.vocab_size = proto, name, sp.get_piece_size()
        pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.special_tokens = {p: i for i, p in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i)}
        self.vocab = {i: bytes([int(p[3:5], 16)]) if sp.is_byte(i) else b"" if sp.is_control(i)
                      else (" \u2047 " if sp.is_unknown(i) else p.replace("\u2581", " ")).encode()
                      for i, p in enumerate(pieces)}
        self.bos_id, eos = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id()))
        self.eos_ids, self.add_bos = [eos] if eos is not None else None, self.bos_id is not None

    def encode_ordinary(self, text):
        """text -> ids, special-token text included as ordinary text (as sentencepiece reads it)."""
        return self.sp.encode(_utf8able(text))

    def encode_ordinary_batch(self, texts):
        """A list of texts -> a list of id lists, encoded in sentencepiece's threads."""
        return self.sp.encode([_utf8able(t) for t in texts])

    def decode(self, ids):
        """Token ids -> text, as sentencepiece decodes them; byte pieces that are not valid UTF-8 become U+FFFD."""
        try:
            return self.sp.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))
        except IndexError:
            raise ValueError(f"token ids {ids!r}: not all in the vocabulary of {self.name}") from None

    def to_tiktoken(self):
        return self

    def save(self, path):
        """The model's protobuf as read (tokenizer.model), written atomically."""
        checkpoint_io.atomic_write(Path(path), self.proto)

    def save_pretrained(self, directory):
        """tokenizer.model, and tokenizer_config.json naming BOS and EOS and whether BOS is added, as HF's do."""
        self.save(Path(directory) / "tokenizer.model")
        names = {i: s for s, i in self.special_tokens.items()}
        config = {"add_bos_token": self.add_bos} | {key: names[i] for key, i in (
            ("bos_token", self.bos_id), ("eos_token", (self.eos_ids or [None])[0])) if i in names}
        checkpoint_io.write_json(Path(directory) / "tokenizer_config.json", config)


def _utf8able(text):
    """As bpe.Tokenizer and tiktoken: a lone surrogate, which is no UTF-8, becomes U+FFFD ("a\\ud800" -> "a\\ufffd")."""
    if not re.search("[\ud800-\udfff]", text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
