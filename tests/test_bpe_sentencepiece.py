"""SentencePiece models through bpe.load (sentencepiece_tokenizer.py): ids equal sentencepiece's own for a unigram
and a BPE model with byte fallback, trained here; decoding round trips; the interface the drivers use; detection
by content; and prepare_data --tokenizer on a directory with a tokenizer.model, end to end."""
import io
import json

import numpy as np
import pytest
import sentencepiece

import bpe
import hub
import prepare_data
import sample
from components.tokenizers import load_samples
from errors import BadInput
from sentencepiece_tokenizer import SentencePieceTokenizer

ENGLISH = ("The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
           "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n")
TEXTS = [*(s["text"] for s in load_samples()), "", " ", "a", "Hello world", "  two  spaces\t\ttabs\n\nlines  ",
         "1234567890 3.14159 2026-01-31 +49 30 1234", "emoji 😀🎉 family 👩‍👩‍👧 flag 🇩🇪 ✓", "ünïcödé Ωμέγα Ǆ ﬁ ①",
         "<s> </s> <unk> <pad>", "\u2581 already a meta space", "end with spaces   ", "\n leading newline"]
LLAMA2_LIKE = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                   allow_whitespace_only_pieces=True)


def train(model_type, **options):
    corpus = [line for s in load_samples() for line in s["text"].split("\n") if line.strip()] + [ENGLISH] * 20
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=800, model_type=model_type,
        byte_fallback=True, character_coverage=0.98, hard_vocab_limit=False, num_threads=1, minloglevel=2, **options)
    return proto.getvalue()


@pytest.fixture(scope="module")
def models():
    """name -> (protobuf bytes, sentencepiece's own processor): a unigram with sentencepiece's default
    normalization (NFKC, extra whitespace removed), and a BPE with Llama 2's settings (no normalization)."""
    protos = {"unigram": train("unigram"), "bpe": train("bpe", **LLAMA2_LIKE)}
    return {name: (p, sentencepiece.SentencePieceProcessor(model_proto=p)) for name, p in protos.items()}


def write_model(proto, directory, name="tokenizer.model"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(proto)
    return directory


@pytest.mark.parametrize("name", ["unigram", "bpe"])
def test_ids_equal_sentencepiece(models, tmp_path, name):
    proto, ref = models[name]
    tok = bpe.load(write_model(proto, tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    byte_pieces = 0
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="none")
        assert ids == ref.encode(text), text   # no BOS, no EOS: callers add them
        byte_pieces += sum(ref.is_byte(i) for i in ids)
    assert byte_pieces > 20   # the emojis and the rarer characters went through byte fallback
    assert tok.encode_ordinary_batch(TEXTS) == [ref.encode(t) for t in TEXTS]
    assert tok.encode("a\ud800b", allowed_special="none") == ref.encode("a\ufffdb")   # a lone surrogate, as tiktoken


def test_decode_round_trips(models, tmp_path):
    for name, (proto, ref) in models.items():
        tok = bpe.load(write_model(proto, tmp_path / name))
        for text in TEXTS:
            ids = tok.encode(text, allowed_special="none")
            assert tok.decode(ids) == ref.decode(ids) == tok.decode(np.array(ids, dtype=np.uint16))
            if name == "bpe" and "\u2581" not in text:   # no normalization: the text comes back, spaces and all
                assert tok.decode(ids) == text   # (sentencepiece reads a "\u2581" in the text as a space)
        with pytest.raises(ValueError, match="not all in the vocabulary"):
            tok.decode([tok.vocab_size])


def test_interface_the_drivers_use(models, tmp_path):
    proto, ref = models["bpe"]
    tok = bpe.load(write_model(proto, tmp_path))
    assert tok.vocab_size == ref.get_piece_size() == len(tok.vocab)
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)
    # special-token text: as bpe.Tokenizer, where sentencepiece alone reads "</s>" as characters
    with pytest.raises(ValueError, match="contains the special token '</s>'"):
        tok.encode("Hi</s>")
    assert tok.encode("Hi</s>", allowed_special="all") == ref.encode("Hi") + [2]
    assert tok.encode("Hi</s>x", allowed_special={"</s>"}) == ref.encode("Hi") + [2] + ref.encode("x")
    with pytest.raises(ValueError, match="contains the special token '<s>'"):   # allowed: "</s>" only
        tok.encode("Hi</s><s>", allowed_special={"</s>"})
    assert tok.encode("<s>", allowed_special="none") == ref.encode("<s>") != [1]
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|endoftext|>"})
    # vocab: each id's bytes inside a text; streaming gives decode()'s text after the dummy prefix's space
    text = "Grüße, 世界 😀!"
    ids = ref.encode(text)
    assert tok.decode_bytes(ids).decode("utf-8") == " " + text == tok.decode_bytes(ids).decode() and ids
    d = tok.decoder()
    assert "".join(d.step(i) for i in ids) + d.flush() == " " + text
    assert tok.vocab[ref.piece_to_id("<0x0A>")] == b"\n" and tok.vocab[1] == tok.vocab[2] == b""
    counts = prepare_data.token_byte_counts(tok)
    assert counts[:3].tolist() == [0, 0, 0] and counts[ref.piece_to_id("<0xF0>")] == 1
    # sample.py may pick every id of the tokenizer, but none past it (a model's padded embeddings)
    assert sample.sampleable(tok, tok.vocab_size) is None
    assert sample.sampleable(tok, tok.vocab_size + 8).tolist() == [True] * tok.vocab_size + [False] * 8


def test_loaded_by_content_from_a_file_or_directory(models, tmp_path):
    proto, ref = models["unigram"]
    assert isinstance(bpe.load(write_model(proto, tmp_path / "f", "any-name.bin") / "any-name.bin"),
                      SentencePieceTokenizer)
    assert isinstance(bpe.load(write_model(proto, tmp_path / "meta" / "original").parent), SentencePieceTokenizer)
    # Llama 2's HF layout: tokenizer.json is HF's copy, a byte-fallback BPE that bpe.py refuses; the model wins
    hf = write_model(proto, tmp_path / "hf")
    (hf / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}}))
    (hf / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "</s>"}))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = bpe.load(hf)
    assert isinstance(tok, SentencePieceTokenizer) and not tok.add_bos and tok.eos_ids == [2, 5]
    # save_pretrained: a directory that loads again, with the same facts
    tok.save_pretrained(tmp_path / "saved")
    again = bpe.load(tmp_path / "saved")
    assert (again.add_bos, again.bos_id, again.special_tokens) == (False, 1, tok.special_tokens)
    assert again.encode(TEXTS[0]) == ref.encode(TEXTS[0])
    # a damaged model is one line naming the file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(proto[:len(proto) // 2])
    with pytest.raises(BadInput, match=r"bad/tokenizer.model: a binary file .*not a SentencePiece model"):
        bpe.load(tmp_path / "bad")


def test_prepare_data_with_a_sentencepiece_directory(models, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "cache")
    proto, ref = models["bpe"]
    model_dir = write_model(proto, tmp_path / "model")
    src = tmp_path / "src"
    src.mkdir()
    docs = {f"doc{i}.txt": f"Document {i}: Grüße, 世界 😀\n    indented {i * 7}\n" * (i + 2) for i in range(8)}
    for name, text in docs.items():
        (src / name).write_text(text)
    prepare_data.main(["--input", str(src), "--name", "sp", "--tokenizer", str(model_dir),
                       "--out_dir", str(tmp_path / "data"), "--val_fraction", "0.25"])
    out = tmp_path / "data" / "sp"
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (ref.get_piece_size(), 2, "uint16")
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.model"]
    tok = bpe.load(out / "tokenizer")
    found = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        ends = [k for k, i in enumerate(ids) if i == 2]
        found += [tok.decode(ids[a + 1:b]) for a, b in zip([-1] + ends, ends)]
        assert ends[-1] == len(ids) - 1
    assert sorted(found) == sorted(docs.values())
    assert np.load(out / "token_bytes.npy").tolist() == prepare_data.token_byte_counts(tok).tolist()
