"""bpe.load on every official format, token for token against tiktoken and HF tokenizers, offline.

- GPT-2: the real encoder.json + vocab.bpe from ../shared/data/gpt2, against tiktoken (its own r50k regex) and
  against HF's BPE + ByteLevel pipeline built from the same files.
- Llama 3: a tiktoken ranks file written here (GPT-2's ranks) against tiktoken with Llama 3's pattern.
- GPT-2 / Llama 3 / Qwen / DeepSeek-V3 tokenizer.json: HF trains a small vocabulary on the corpus with each
  family's normalizer, pre-tokenizer and post-processor; HF's own encode() is the reference.
"""
import base64
import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from conftest import shared_file
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import bpe
from errors import BadInput

CORPUS_DIR = Path(__file__).parent / "data" / "bpe_corpus"
R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""   # tiktoken's gpt2


def corpus():
    return {p.name: p.read_bytes().decode("utf-8") for p in sorted(CORPUS_DIR.glob("*.txt"))}


def slices(n=200, seed=0):
    """Random pieces of the corpus, starting and ending anywhere (mid-word, mid-emoji-sequence, ...)."""
    text, rng = "".join(corpus().values()), random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(len(text))
        out.append(text[a:a + rng.randrange(0, 150)])
    return out


def assert_same(tok, reference, texts, allowed="all"):
    """tok.encode, tok.to_tiktoken() and the reference (text -> ids) agree on every text; decode inverts."""
    enc = tok.to_tiktoken()
    for text in texts:
        want = reference(text)
        assert tok.encode(text, allowed_special=allowed) == want, text[:80]
        assert enc.encode(text, allowed_special=allowed) == want, text[:80]
        normal = text
        for form in tok.normalization:
            normal = unicodedata.normalize(form, normal)
        assert tok.decode(want) == normal


# -----------------------------------------------------------------------------------------------------------
# GPT-2: the official files


@pytest.fixture(scope="module")
def gpt2_dir():
    return shared_file("gpt2", "vocab.bpe").parent


@pytest.fixture(scope="module")
def gpt2_tiktoken(gpt2_dir):
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=R50K, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def test_gpt2_matches_tiktoken(gpt2_dir, gpt2_tiktoken):
    tok = bpe.load(gpt2_dir)
    assert tok.vocab_size == 50257 and tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.eos_ids == [50256] and tok.add_bos is False
    shakespeare = shared_file("tinyshakespeare.txt").read_text()[:200_000]
    texts = [*corpus().values(), *slices(), shakespeare]
    assert_same(tok, lambda t: gpt2_tiktoken.encode(t, allowed_special="all"), texts)
    assert tok.encode("Hello world") == [15496, 995]


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_dir):
    hf = Tokenizer(models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    return hf


def hf_reference(hf):
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def test_gpt2_hf_file_sets(gpt2_dir, gpt2_hf, tmp_path):
    """The same vocabulary as HF's tokenizer.json and as vocab.json + merges.txt (+ tokenizer_config.json)."""
    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    texts = [*corpus().values(), *slices(100)]
    assert_same(bpe.load(tmp_path / "tokenizer.json"), hf_reference(gpt2_hf), texts)
    pair = tmp_path / "pair"
    pair.mkdir()
    shutil.copy(gpt2_dir / "encoder.json", pair / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", pair / "merges.txt")
    (pair / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    tok = bpe.load(pair)
    assert tok.bos_id == 50256 and tok.eos_ids == [50256] and not tok.add_bos
    assert_same(tok, hf_reference(gpt2_hf), texts)


def test_gpt2_vocab_bpe_without_final_newline_keeps_its_last_merge(gpt2_dir, gpt2_tiktoken, tmp_path):
    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "encoder.json")
    data = (gpt2_dir / "vocab.bpe").read_bytes()
    assert data.endswith(b"\n")
    (tmp_path / "vocab.bpe").write_bytes(data.rstrip(b"\n"))
    tok = bpe.load(tmp_path)
    last = data.rstrip(b"\n").split(b"\n")[-1].decode().replace(" ", "").replace("Ġ", " ")
    assert tok.encode(last) == gpt2_tiktoken.encode(last) and len(tok.encode(last)) == 1


def test_gpt2_truncated_or_corrupted_files(gpt2_dir, tmp_path):
    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "encoder.json")
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    (tmp_path / "vocab.bpe").write_text("\n".join(lines[:-300]) + "\n", encoding="utf-8")
    with pytest.raises(BadInput, match=r"encoder.json: token .* is neither .* truncated merges file"):
        bpe.load(tmp_path)
    bad = lines[:10] + ["Ġ t h"] + lines[11:]
    (tmp_path / "vocab.bpe").write_text("\n".join(bad), encoding="utf-8")
    with pytest.raises(BadInput, match=r"vocab.bpe, line 11: expected a merge"):
        bpe.load(tmp_path)
    bad = lines[:10] + ["Ġ zzzzq"] + lines[11:]
    (tmp_path / "vocab.bpe").write_text("\n".join(bad), encoding="utf-8")
    with pytest.raises(BadInput, match=r"vocab.bpe, line 11: merge 'Ġ' 'zzzzq' uses 'zzzzq'"):
        bpe.load(tmp_path)
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    data = (gpt2_dir / "encoder.json").read_bytes()
    (tmp_path / "encoder.json").write_bytes(data[:len(data) // 2])
    with pytest.raises(BadInput, match=r"encoder.json: not valid JSON at line 1 column \d+.*truncated"):
        bpe.load(tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(BadInput, match="has vocab.bpe but not encoder.json"):
        bpe.load(tmp_path)


# -----------------------------------------------------------------------------------------------------------
# Llama 3: a tiktoken ranks file (tokenizer.model)


def write_ranks(ranks, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])))


def test_llama3_ranks_file_matches_tiktoken(gpt2_tiktoken, tmp_path):
    ranks = gpt2_tiktoken._mergeable_ranks
    write_ranks(ranks, tmp_path / "tokenizer.model")
    tok = bpe.load(tmp_path / "tokenizer.model")
    n = len(ranks)
    assert tok.vocab_size == n + 256 and tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.special_tokens["<|finetune_right_pad_id|>"] == n + 4 and tok.special_tokens["<|eom_id|>"] == n + 8
    assert tok.add_bos and tok.bos_id == n and tok.eos_ids == [n + 1, n + 8, n + 9]
    specials = dict(tok.special_tokens)
    ref = tiktoken.Encoding("llama3", pat_str=bpe.PATTERNS["llama3"], mergeable_ranks=ranks, special_tokens=specials)
    assert_same(tok, lambda t: ref.encode(t, allowed_special="all"), [*corpus().values(), *slices()])

    meta = tmp_path / "meta"   # Meta's layout, Llama 3.0: original/tokenizer.model, params.json without use_scaled_rope
    write_ranks(ranks, meta / "original" / "tokenizer.model")
    (meta / "original" / "params.json").write_text(json.dumps({"dim": 4096, "rope_theta": 500000.0}))
    tok30 = bpe.load(meta)
    assert tok30.special_tokens["<|reserved_special_token_2|>"] == n + 4 and "<|eom_id|>" not in tok30.special_tokens
    assert tok30.eos_ids == [n + 1, n + 9]


def test_bad_ranks_files(tmp_path):
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    (tmp_path / "a.model").write_bytes(b"\n".join(lines[:100] + [b"QUJD"] + lines[100:]))
    with pytest.raises(BadInput, match=r"a.model, line 101: expected 'base64-token rank'"):
        bpe.load(tmp_path / "a.model")
    (tmp_path / "b.model").write_bytes(b"\n".join(lines[:100] + lines[101:]))
    with pytest.raises(BadInput, match=r"b.model: ranks are not 0..254 without gaps"):
        bpe.load(tmp_path / "b.model")
    (tmp_path / "c.model").write_bytes(b"\n\x08\x00\x12\x04<unk>\x15\x00\x00\x00\x00")   # SentencePiece-like
    with pytest.raises(BadInput, match="c.model: a binary file.*SentencePiece"):
        bpe.load(tmp_path / "c.model")


# -----------------------------------------------------------------------------------------------------------
# tokenizer.json of each family, built and trained by HF tokenizers


def split(pattern):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
FAMILIES = {
    "gpt2": dict(pre=pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), specials=["<|endoftext|>"]),
    "llama3": dict(pre=pre_tokenizers.Sequence([split(bpe.PATTERNS["llama3"]), BYTE_LEVEL]), ignore_merges=True,
                   added=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], bos="<|begin_of_text|>"),
    "qwen2": dict(pre=pre_tokenizers.Sequence([split(bpe.PATTERNS["qwen2"]), BYTE_LEVEL]), normalizer=normalizers.NFC(),
                  added=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["<think>", "</think>"]),
    "deepseek_v3": dict(pre=pre_tokenizers.Sequence([*map(split, bpe.PATTERNS["deepseek_v3"]), BYTE_LEVEL]),
                        specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"],
                        bos="<｜begin▁of▁sentence｜>"),
}


def build_hf(family):
    """Train a 1500-token byte-level BPE with HF on the corpus, in the family's pipeline."""
    f = FAMILIES[family]
    hf = Tokenizer(models.BPE())
    if "normalizer" in f:
        hf.normalizer = f["normalizer"]
    hf.pre_tokenizer = f["pre"]
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=f.get("specials", []), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(list(corpus().values()), trainer)
    if f.get("ignore_merges"):
        spec = json.loads(hf.to_str())
        spec["model"]["ignore_merges"] = True
        hf = Tokenizer.from_str(json.dumps(spec))
    hf.add_special_tokens(f.get("added", []))
    hf.add_tokens(f.get("plain", []))
    if "bos" in f:
        bos = hf.token_to_id(f["bos"])
        hf.post_processor = processors.TemplateProcessing(single=f"{f['bos']} $A", pair=f"{f['bos']} $A $B",
                                                          special_tokens=[(f["bos"], bos)])
    return hf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizer_json_matches_hf(family, tmp_path):
    hf = build_hf(family)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = bpe.load(tmp_path / "tokenizer.json")
    assert tok.pattern == bpe.PATTERNS[family]
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.special_tokens == {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
    assert_same(tok, hf_reference(hf), [*corpus().values(), *slices()])
    with_bos = hf.encode("hi").ids
    assert tok.add_bos == (family in ("llama3", "deepseek_v3"))
    assert with_bos[:1] == [tok.bos_id] if tok.add_bos else with_bos == tok.encode("hi")


def test_deepseek_one_regex_equals_its_three_steps():
    """to_tiktoken joins DeepSeek-V3's three patterns into one; both splits agree on every corpus slice."""
    tok = bpe.train(list(corpus().values()), 800, pattern="deepseek_v3")
    enc = tok.to_tiktoken()
    for text in [*corpus().values(), *slices(400, seed=3), "12345你好ア・イ\u3097\u3098ア\u200d😀\x00x"]:
        assert tok.encode(text) == enc.encode_ordinary(text), text[:80]


def test_qwen_model_directory_with_vocab_and_merges(tmp_path):
    """Qwen without tokenizer.json: vocab.json + merges.txt + tokenizer_config.json (class, added tokens)."""
    hf = build_hf("qwen2")
    hf.model.save(str(tmp_path))
    added = {str(i): {"content": t.content, "special": t.special} for i, t in hf.get_added_tokens_decoder().items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.token_to_id("<|endoftext|>")]}))
    tok = bpe.load(tmp_path)
    assert tok.pattern == bpe.PATTERNS["qwen2"] and tok.normalization == ("NFC",)
    assert tok.eos_ids == sorted([hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|im_end|>")])
    assert "<think>" in tok.special_tokens   # an added token that is not "special" still is one token
    assert_same(tok, hf_reference(hf), [*corpus().values(), *slices(100)])
    decomposed = "Cafe\u0301 A\u030a"
    assert tok.to_tiktoken().encode_ordinary_batch([decomposed]) == [hf_reference(hf)(decomposed)]


def test_deepseek_model_directory_adds_bos_from_tokenizer_config(tmp_path):
    hf = build_hf("deepseek_v3")
    hf.post_processor = None   # here only tokenizer_config.json says that BOS is added
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": {"content": "<｜begin▁of▁sentence｜>"},
         "eos_token": {"content": "<｜end▁of▁sentence｜>"}}))
    tok = bpe.load(tmp_path)
    assert tok.add_bos and tok.bos_id == 0 and tok.eos_ids == [1]
    assert tok.encode(corpus()["cjk.txt"]) == hf_reference(hf)(corpus()["cjk.txt"])


def test_unsupported_or_broken_tokenizer_json(tmp_path):
    hf = build_hf("gpt2")
    spec = json.loads(hf.to_str())
    merges = spec["model"]["merges"]
    cases = [
        (dict(spec, pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer 'Whitespace' is not supported"),
        (dict(spec, normalizer={"type": "Lowercase"}), "normalizer 'Lowercase' is not supported"),
        (dict(spec, model={"type": "Unigram", "vocab": []}), "key 'model' must be a BPE model"),
        (dict(spec, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "add_prefix_space"),
        (dict(spec, model=dict(spec["model"], merges=spec["model"]["merges"][:5] + [["Ġ", "q", "x"]])),
         r"model.merges\[5\]"),
        (dict(spec, model=dict(spec["model"], vocab=["a", "b"])), "the vocabulary must be a JSON object"),
        (dict(spec, model=dict(spec["model"], merges=[merges[1], merges[0], *merges[2:]])),   # HF: list order
         r"model.merges\[1\]: merge .* makes id \d+, below the id \d+ an earlier merge makes"),
        (dict(spec, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(x"}, "behavior": "Isolated"}, {"type": "ByteLevel"}]}),
         r"pattern \('\(x'.* does not compile"),
    ]
    for broken, message in cases:
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(BadInput, match=f"tokenizer.json: .*{message}"):
            bpe.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("[]")   # in a model directory: not told apart by its first byte
    with pytest.raises(BadInput, match="tokenizer.json: key 'model' must be a BPE model"):
        bpe.load(tmp_path)
    text = hf.to_str()
    (tmp_path / "tokenizer.json").write_text(text[:len(text) // 3])
    with pytest.raises(BadInput, match="tokenizer.json: not valid JSON at line .*truncated"):
        bpe.load(tmp_path)


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_hf_merge_rule_and_ignore_merges(ignore_merges, tmp_path):
    """A vocabulary where the rules differ: 'abc' is made by (a, bc), but (a, b) is merged first.

    HF: "abc" -> [ab, c] (no merge (ab, c) is listed), or [abc] with ignore_merges (the chunk is a token).
    tiktoken's rule would give [abc] either way, since ab + c makes a token.
    """
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {"ab": 256, "bc": 257, "abc": 258}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c"), ("a", "bc")], ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = bpe.load(tmp_path / "tokenizer.json")
    for text in ["abc", "abcabc xabc", *corpus().values()]:
        assert tok.encode(text) == hf.encode(text).ids
    assert tok.encode("abc") == ([258] if ignore_merges else [256, vocab["c"]])
