"""prepare_data.py: shards decode back to the text, GPT-2 ids equal tiktoken's, splits are by file and stable."""
import json

import numpy as np
import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

import bpe
import prepare_data
from conftest import shared_file

EOT = "<|endoftext|>"


def make_folder(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}: héllo wörld, naïve café ☕ {i * 7}\n" * (i + 3))
    return root


def read_docs(out, split, tok):
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
    docs, cur = [], []
    for t in ids:
        if t == meta["eot_id"]:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "every document ends with the end-of-text token"
    return docs


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_folder_round_trip_and_split_by_file(tmp_path, tokenizer):
    src = make_folder(tmp_path / "src")
    out = prepare_data.prepare(input=str(src), tokenizer=tokenizer, vocab_size=300, out_dir=str(tmp_path / "data"),
                               val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == (257 if tokenizer == "bytes" else 300)
    tok = bpe.load(out / "tokenizer")
    train, val = read_docs(out, "train", tok), read_docs(out, "val", tok)
    originals = {p.read_text() for p in src.iterdir()}
    assert set(train) | set(val) == originals and not set(train) & set(val)
    assert val and meta["train_tokens"] + meta["val_tokens"] == sum(
        np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]).size for s in ("train", "val"))


def test_gpt2_ids_equal_tiktoken(tmp_path):
    gpt2_dir = shared_file("gpt2", "encoder.json").parent
    text_file = shared_file("tinyshakespeare.txt")
    out = prepare_data.prepare(input=str(text_file), tokenizer="gpt2", gpt2_dir=str(gpt2_dir),
                               out_dir=str(tmp_path / "data"), val_fraction=0.1)
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    ref = tiktoken.Encoding("gpt2-ref", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
                            mergeable_ranks=ranks, special_tokens={EOT: 50256})
    text = text_file.read_text()
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert ids == ref.encode_ordinary(part) + [50256]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["encoder.json", "vocab.bpe"]


def test_stdlib_selection_is_deterministic_and_capped():
    a_train, a_val = prepare_data.stdlib_documents(max_mb=0.5, val_fraction=0.1)
    b_train, b_val = prepare_data.stdlib_documents(max_mb=0.5, val_fraction=0.1)
    assert a_train == b_train and a_val == b_val and a_val
    assert sum(len(prepare_data.text_of(s).encode()) for _, s in a_train + a_val) <= 0.5 * 2**20
    assert not {n for n, _ in a_train} & {n for n, _ in a_val}


def test_bpe_tokenizer_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare_data.hub, "CACHE_DIR", tmp_path / "cache")
    src = make_folder(tmp_path / "src")
    for _ in range(2):
        prepare_data.prepare(input=str(src), tokenizer="bpe", vocab_size=280, out_dir=str(tmp_path / "data"))
    assert "using cached tokenizer" in capsys.readouterr().out


def test_model_directory_tokenizer(tmp_path):
    gpt2_dir = shared_file("gpt2", "encoder.json").parent
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (model_dir / name).write_bytes((gpt2_dir / name).read_bytes())
    src = make_folder(tmp_path / "src")
    out = prepare_data.prepare(input=str(src), tokenizer=str(model_dir), out_dir=str(tmp_path / "data"))
    assert json.loads((out / "meta.json").read_text())["eot_id"] == 50256


def test_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        prepare_data.prepare(input=str(tmp_path / "nope.txt"))
    with pytest.raises(SystemExit, match="no text files"):
        prepare_data.prepare(input=str(tmp_path))
    with pytest.raises(SystemExit, match="--vocab_size 100"):
        prepare_data.prepare(input=str(make_folder(tmp_path / "s")), vocab_size=100, out_dir=str(tmp_path / "d"))


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_chat_jsonl_masks_exactly_the_replies(tmp_path):
    import llama3
    import train
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    bpe.train("user assistant system hello there, how are you? fine thanks\n\n" * 20, 300,
              special_tokens=LLAMA_SPECIALS).save(tok_dir / bpe.SAVE_NAME)
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}"},
              {"role": "assistant", "content": f"fine {i}"}, {"role": "user", "content": "how are you?"},
              {"role": "assistant", "content": "fine thanks"}] for i in range(6)]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = prepare_data.prepare_chat(jsonl, "llama3", str(tok_dir), out_dir=str(tmp_path / "data"), val_fraction=0.2)
    tok = bpe.load(out / "tokenizer")
    ids = np.fromfile(out / "train.bin", dtype=np.uint16)
    mask = np.fromfile(out / "train.mask.bin", dtype=np.uint8)
    assert ids.tolist() == [t for c in convs[:5] for t in llama3.encode_chat(tok, c, add_generation_prompt=False)]
    eot = tok.special_tokens["<|eot_id|>"]
    # the masked tokens are exactly each reply's text followed by <|eot_id|>
    replies, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
            if t == eot:
                replies.append(tok.decode(cur[:-1]))
                cur = []
    assert replies == [r for c in convs[:5] for r in (c[2]["content"], c[4]["content"])]
    # train.py turns the mask into ignored targets
    data = train.TokenData(out, 16, tok.vocab_size)
    x, y = data.batch("train", 0, 4)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = next(i for i in range(len(ids)) if ids[i:i + 16].tolist() == row_x)
        expect = [t if mask[start + 1 + j] else -100 for j, t in enumerate(ids[start + 1:start + 17].tolist())]
        assert row_y == expect
    # and fine-tuning on it runs: windows without any reply give zero loss, never NaN
    args, module = train.parse_args(["--model", "llama3", "--data", str(out), "--out_dir", str(tmp_path / "o"),
                                     "--n_layer", "1", "--n_head", "2", "--n_kv_head", "1", "--n_embd", "16",
                                     "--seq_len", "8", "--batch_size", "1", "--max_steps", "12",
                                     "--eval_interval", "12", "--eval_iters", "1", "--sample_tokens", "0"])
    assert train.train(args, module)[1] == 0


def test_chat_jsonl_bad_line(tmp_path):
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text('{"messages": []}\n{"oops": 1}\n')
    with pytest.raises(SystemExit, match=r"chat.jsonl:2: not a JSON object with a \"messages\" list"):
        prepare_data.prepare_chat(jsonl, "llama3", str(tmp_path), out_dir=str(tmp_path / "d"))
