"""prepare_data.py: shards decode back to the text, GPT-2 ids equal tiktoken's, splits are by file and stable,
a dataset directory is written whole, the vocabulary has no holes, and bad input is one line naming the flag."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

import bpe
import hub
import prepare_data
from conftest import shared_file
from errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "cache")   # never the user's trained-BPE cache


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
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["src"]   # no temporary directory left


GPT2_FILES = ["encoder.json", "tokenizer.json", "tokenizer_config.json", "vocab.bpe"]


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
    # each id's bytes as the official files give them (many are part of a character), <|endoftext|> none
    meta = json.loads((out / "meta.json").read_text())
    counts = np.load(out / meta["token_bytes"], allow_pickle=False)
    assert counts.tolist() == [len(ref.decode_single_token_bytes(i)) for i in range(50256)] + [0]
    # the official pair, and a tokenizer.json that transformers' AutoTokenizer reads (it does not read the pair)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == GPT2_FILES
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    sample = text[cut:cut + 20000] + " héllo\u00a0wörld 12345 \n\n  x<|endoftext|>"
    assert hf(sample)["input_ids"] == ref.encode(sample, allowed_special="all")
    assert hf.eos_token == EOT


def test_stdlib_selection_is_deterministic_and_capped():
    a_train, a_val = prepare_data.stdlib_documents(max_mb=0.5, val_fraction=0.1)
    b_train, b_val = prepare_data.stdlib_documents(max_mb=0.5, val_fraction=0.1)
    assert a_train == b_train and a_val == b_val and a_val
    assert sum(len(prepare_data.text_of(s).encode()) for _, s in a_train + a_val) <= 0.5 * 2**20
    assert not {n for n, _ in a_train} & {n for n, _ in a_val}


def test_bpe_tokenizer_is_cached(tmp_path, capsys):
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


# -----------------------------------------------------------------------------------------------------------
# The dataset directory is written whole


def test_rerun_with_another_tokenizer_leaves_only_the_new_one(tmp_path):
    gpt2_dir = shared_file("gpt2", "encoder.json").parent
    src = make_folder(tmp_path / "src")
    prepare_data.prepare(input=str(src), name="d", tokenizer="bpe", vocab_size=300, out_dir=str(tmp_path / "data"))
    out = prepare_data.prepare(input=str(src), name="d", tokenizer="gpt2", gpt2_dir=str(gpt2_dir),
                               out_dir=str(tmp_path / "data"))
    fresh = prepare_data.prepare(input=str(src), name="d", tokenizer="gpt2", gpt2_dir=str(gpt2_dir),
                                 out_dir=str(tmp_path / "fresh"))
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == GPT2_FILES
    assert bpe.load(out / "tokenizer").vocab_size == 50257
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["d"]


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_a_failed_run_keeps_the_old_dataset(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src")
    out = prepare_data.prepare(input=str(src), name="d", tokenizer="bytes", out_dir=str(tmp_path / "data"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = prepare_data.write_split

    def crash_after_train(docs, encoding, eot, dtype, path):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return real(docs, encoding, eot, dtype, path)

    monkeypatch.setattr(prepare_data, "write_split", crash_after_train)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.prepare(input=str(src), name="d", tokenizer="bpe", vocab_size=300, out_dir=str(tmp_path / "data"))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["d"]


def test_what_dead_writers_left_is_restored_or_removed(tmp_path):
    """A writer killed between moving the old dataset aside and renaming the new one in left .old-<name>-<pid>
    and no <name>: the next run in that --out_dir puts the old dataset back. Its other leftovers are removed;
    a live writer's are not touched."""
    src = make_folder(tmp_path / "src")
    data = tmp_path / "data"
    old = prepare_data.prepare(input=str(src), name="d", tokenizer="bytes", out_dir=str(data))
    meta = (old / "meta.json").read_bytes()
    pid = dead_pid()
    old.rename(data / f".old-d-{pid}")
    make_folder(data / f".tmp-d-{pid}", n=1)            # its half-built new dataset
    make_folder(data / f".tmp-e-{dead_pid()}", n=1)     # another dead writer's
    make_folder(data / f".tmp-f-{os.getppid()}", n=1)   # a live writer's
    prepare_data.prepare(input=str(src), name="other", tokenizer="bytes", out_dir=str(data))
    assert sorted(p.name for p in data.iterdir()) == [f".tmp-f-{os.getppid()}", "d", "other"]
    assert (data / "d" / "meta.json").read_bytes() == meta


def test_a_dataset_behind_a_symlink_is_rebuilt_where_it_is(tmp_path):
    src = make_folder(tmp_path / "src")
    real = prepare_data.prepare(input=str(src), name="d", tokenizer="bytes", out_dir=str(tmp_path / "big_disk"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d").symlink_to(real)
    prepare_data.prepare(input=str(src), name="d", tokenizer="bpe", vocab_size=300, out_dir=str(tmp_path / "data"))
    assert (tmp_path / "data" / "d").is_symlink()
    assert json.loads((real / "meta.json").read_text())["tokenizer"] == "bpe"
    assert sorted(p.name for p in (tmp_path / "big_disk").iterdir()) == ["d"]


def test_an_existing_directory_that_is_not_a_dataset_is_not_replaced(tmp_path):
    (tmp_path / "data" / "notes").mkdir(parents=True)
    (tmp_path / "data" / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(BadInput, match="notes exists and is not a dataset"):
        prepare_data.prepare(input=str(make_folder(tmp_path / "notes")), tokenizer="bytes",
                             out_dir=str(tmp_path / "data"))
    assert (tmp_path / "data" / "notes" / "todo.txt").read_text() == "keep me"


# -----------------------------------------------------------------------------------------------------------
# A corpus that gives fewer merges than --vocab_size asks for


def test_small_corpus_gives_a_dense_smaller_vocabulary(tmp_path, capsys, recwarn):
    text = "the cat sat on the mat; the dog sat on the log.\n" * 40
    (tmp_path / "small.txt").write_text(text)
    lines, shards = [], []
    for _ in range(2):   # trained, then from the cache
        out = prepare_data.prepare(input=str(tmp_path / "small.txt"), tokenizer="bpe", vocab_size=4096,
                                   out_dir=str(tmp_path / "data"))
        captured = capsys.readouterr()
        lines += captured.err.splitlines()
        shards.append((out / "train.bin").read_bytes())
    assert "using cached tokenizer" in captured.out and shards[0] == shards[1]
    meta = json.loads((out / "meta.json").read_text())
    tok = bpe.load(out / "tokenizer")
    n = len(tok.merges)
    assert 0 < n < 4096 - 257 and meta["vocab_size"] == tok.vocab_size == 256 + n + 1
    assert meta["eot_id"] == tok.special_tokens[EOT] == 256 + n
    assert lines == [f"--vocab_size 4096: the corpus only gave {n} merges, so the vocabulary is {256 + n + 1} "
                     f"tokens (256 bytes + merges + {EOT})"] * 2
    assert not [w for w in recwarn.list if "merges" in str(w.message)]   # not also as a Python warning
    decoder = tok.decoder()
    for i in range(meta["vocab_size"]):   # every id the model can sample has a token
        assert tok.decode_bytes([i])
        decoder.step(i)
    ids = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    assert ids.max() == meta["eot_id"] and tok.decode(ids[:-1]) == text[:int(len(text) * 0.95)]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_token_bytes_are_each_ids_utf8_length_and_specials_none(tmp_path, tokenizer):
    src = make_folder(tmp_path / "src")
    out = prepare_data.prepare(input=str(src), tokenizer=tokenizer, vocab_size=300, out_dir=str(tmp_path / "data"),
                               val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["token_bytes"] == "token_bytes.npy"
    counts = np.load(out / meta["token_bytes"], allow_pickle=False)
    tok = bpe.load(out / "tokenizer")
    enc = tok.to_tiktoken()
    assert counts.tolist() == [0 if i == meta["eot_id"] else len(enc.decode_single_token_bytes(i))
                               for i in range(meta["vocab_size"])]
    # and apart from any tokenizer: a split's counts add up to the UTF-8 bytes of its documents' text (a token
    # that is part of "é" or "☕" counts its own bytes, not the 3 of the U+FFFD its decoding alone would give)
    originals = {p.read_text() for p in src.iterdir()}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        docs = read_docs(out, split, tok)
        assert set(docs) <= originals
        assert counts[ids].sum() == sum(len(d.encode("utf-8")) for d in docs)
    if tokenizer == "bytes":   # every "é" is two tokens here, each part of a character
        assert any(not _is_utf8(enc.decode_single_token_bytes(int(i))) for i in ids if i != meta["eot_id"])


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -----------------------------------------------------------------------------------------------------------
# Instruction data


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama_tokenizer_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    bpe.train("user assistant system hello there, how are you? fine thanks\n\n" * 20, 300,
              special_tokens=LLAMA_SPECIALS).save(path / bpe.SAVE_NAME)
    return path


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_chat_jsonl_masks_exactly_the_replies(tmp_path):
    import llama3
    import train
    tok_dir = llama_tokenizer_dir(tmp_path / "tok")
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}"},
              {"role": "assistant", "content": f"fine {i}"}, {"role": "user", "content": "how are you?"},
              {"role": "assistant", "content": "fine thanks"}] for i in range(6)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", convs)
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


def test_chat_dataset_token_bytes_give_the_chat_tokens_none(tmp_path):
    tok_dir = llama_tokenizer_dir(tmp_path / "tok")
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [[{"role": "user", "content": "hello"},
                                                   {"role": "assistant", "content": "fine, merci ☕"}]] * 3)
    out = prepare_data.prepare_chat(jsonl, "llama3", str(tok_dir), out_dir=str(tmp_path / "data"), val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    counts = np.load(out / meta["token_bytes"], allow_pickle=False)
    enc = bpe.load(tok_dir).to_tiktoken()
    specials = {enc.encode_single_token(s) for s in LLAMA_SPECIALS}
    assert len(specials) == 5 and counts.size == meta["vocab_size"] == enc.n_vocab
    assert counts.tolist() == [0 if i in specials else len(enc.decode_single_token_bytes(i))
                               for i in range(enc.n_vocab)]
    assert counts[:256].tolist() == [1] * 256 and counts.max() > 1


def test_chat_conversation_without_assistant_turn_is_reported_and_skipped(tmp_path, capsys):
    import llama3
    tok_dir = llama_tokenizer_dir(tmp_path / "tok")
    with_reply = [[{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "fine"}] for i in range(4)]
    without = [[{"role": "user", "content": "hello"}], []]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [with_reply[0], without[0], *with_reply[1:3], without[1], with_reply[3]])
    out = prepare_data.prepare_chat(jsonl, "llama3", str(tok_dir), out_dir=str(tmp_path / "data"), val_fraction=0.25)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{jsonl}:{n}: no assistant turn, nothing to train on: skipped" for n in (2, 5)]
    tok = bpe.load(out / "tokenizer")
    for split, convs in (("train", with_reply[:3]), ("val", with_reply[3:])):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert ids == [t for c in convs for t in llama3.encode_chat(tok, c, add_generation_prompt=False)]
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_docs"], meta["val_docs"]) == (3, 1)


def test_chat_split_without_any_target_token_is_an_error(tmp_path, monkeypatch):
    """A chat format that gives a reply no tokens of its own leaves nothing to train on: an error, not a run
    with loss 0 and eval nan."""
    import llama3
    real = llama3.encode_chat
    monkeypatch.setattr(llama3, "encode_chat", lambda tok, messages, add_generation_prompt=True: real(
        tok, [m for m in messages if m["role"] != "assistant"], add_generation_prompt=False))
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [[{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "fine"}]] * 3)
    with pytest.raises(BadInput, match=r"chat.jsonl: the train split has no assistant token to train on"):
        prepare_data.prepare_chat(jsonl, "llama3", str(llama_tokenizer_dir(tmp_path / "tok")),
                                  out_dir=str(tmp_path / "data"))
    assert not any((tmp_path / "data").iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_out_dir(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(BadInput, match="--out_dir .*ro.* is not writable"):
        prepare_data.prepare(input=str(make_folder(tmp_path / "src")), tokenizer="bytes", out_dir=str(tmp_path / "ro"))


# -----------------------------------------------------------------------------------------------------------
# Bad input from the command line: one line `error: ...` naming the flag or file, exit status 1, no traceback


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs the bad-input cases refer to, as {name: path}."""
    d = tmp_path_factory.mktemp("inputs")
    make_folder(d / "src")
    (d / "one").mkdir()
    (d / "one" / "only.txt").write_text("a single file cannot be split by file\n" * 10)
    (d / "empty").mkdir()
    (d / "empty" / "data.bin").write_bytes(b"\0\1")
    (d / "x.txt").write_text("x")
    (d / "blank.txt").write_text("")
    (d / "notes" / "keep").mkdir(parents=True)
    (d / "notes" / "keep" / "todo.txt").write_text("not a dataset")
    llama_tokenizer_dir(d / "tok_llama")
    (d / "tok_bytes").mkdir()
    bpe.train("", 257, special_tokens=[EOT]).save(d / "tok_bytes" / bpe.SAVE_NAME)
    (d / "tok_bad").mkdir()
    (d / "tok_bad" / bpe.SAVE_NAME).write_text("bpe v7\n")
    (d / "tok_none").mkdir()
    (d / "gpt2_bad").mkdir()
    (d / "gpt2_bad" / "encoder.json").write_text('{"!": 0, "\\"": ')
    (d / "gpt2_bad" / "vocab.bpe").write_text("#version: 0.2\n")
    good = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]] * 3
    write_jsonl(d / "good.jsonl", good)
    (d / "bad_json.jsonl").write_text(json.dumps({"messages": good[0]}) + "\n{oops\n")
    (d / "not_object.jsonl").write_text("[1, 2]\n")
    (d / "no_messages.jsonl").write_text('{"conversation": []}\n')
    (d / "no_content.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    (d / "content_list.jsonl").write_text('{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}\n')
    (d / "latin1.jsonl").write_bytes('{"messages": [{"role": "user", "content": "café"}]}\n'.encode("latin-1"))
    write_jsonl(d / "no_assistant.jsonl", [[{"role": "user", "content": "hello"}]] * 3)
    write_jsonl(d / "one_assistant.jsonl", [good[0], [{"role": "user", "content": "hello"}]])
    return {p.name: p for p in d.iterdir()}


CHAT = ["--model", "llama3", "--tokenizer", "{tok_llama}", "--chat_jsonl"]
# (case, arguments ({x_txt} is the path of files()["x.txt"], {home} $HOME), what the error line names).
# Each of these runs `python prepare_data.py` in a process of its own: the entry point turns them into one line.
CLI_CASES = [
    ("val_fraction_0", ["--input", "{src}", "--val_fraction", "0"], "--val_fraction 0.0: expected a fraction"),
    ("name_absolute", ["--input", "{src}", "--name", "/tmp/x"], "--name '/tmp/x': expected a plain directory name"),
    ("name_dotdot", ["--input", "{src}", "--name", ".."], "--name '..'"),
    ("name_empty", ["--input", "{src}", "--name", ""], "--name is empty"),
    ("vocab_size_small", ["--input", "{src}", "--vocab_size", "256"], "--vocab_size 256: a byte-level BPE needs"),
    ("vocab_size_not_a_number", ["--input", "{src}", "--vocab_size", "4k"],
     "argument --vocab_size: invalid int value: '4k'"),
    ("max_mb_zero", ["--input", "{src}", "--max_mb", "0"], "--max_mb 0.0: expected a size in MB > 0"),
    ("input_missing", ["--input", "{src}/nope.txt"], "--input {src}/nope.txt: no such file or directory"),
    ("input_no_text_files", ["--input", "{empty}"], "--input {empty}: no text files"),
    ("input_one_char", ["--input", "{x_txt}"], "--input {x_txt}: too little text, the train split would be empty"),
    ("dataset_unknown", ["--dataset", "wikipedia"], "--dataset 'wikipedia': expected 'stdlib' or 'shakespeare'"),
    ("tokenizer_missing_dir", ["--input", "{src}", "--tokenizer", "./no/such/model"],
     "--tokenizer ./no/such/model: no such directory"),
    ("tokenizer_corrupt", ["--input", "{src}", "--tokenizer", "{tok_bad}"],
     "{tok_bad}/tokenizer.bpe, line 1: expected 'bpe v1'"),
    ("gpt2_dir_missing_files", ["--input", "{src}", "--tokenizer", "gpt2", "--gpt2_dir", "{empty}"],
     "--gpt2_dir {empty}: has no encoder.json and no vocab.bpe"),
    ("out_dir_is_a_file", ["--input", "{src}", "--out_dir", "{x_txt}"], "--out_dir {x_txt}: {x_txt} is a file"),
    ("chat_missing", [*CHAT, "{src}/nope.jsonl"], "--chat_jsonl {src}/nope.jsonl: no such file"),
    ("chat_directory", [*CHAT, "{src}"], "--chat_jsonl {src}: is a directory"),
    ("chat_not_utf8", [*CHAT, "{latin1_jsonl}"], "{latin1_jsonl}: not valid UTF-8 at byte offset 46"),
    ("chat_bad_json", [*CHAT, "{bad_json_jsonl}"], "{bad_json_jsonl}:2: not valid JSON"),
    ("chat_no_content", [*CHAT, "{no_content_jsonl}"], '{no_content_jsonl}:1: messages[0]: expected {{"role"'),
    ("chat_no_assistant", [*CHAT, "{no_assistant_jsonl}"], "{no_assistant_jsonl}: 0 conversations with an assistant"),
    ("chat_unknown_model", ["--model", "mistral", "--tokenizer", "{tok_llama}", "--chat_jsonl", "{good_jsonl}"],
     "--model 'mistral': expected one of the model files here: gpt2, llama3, qwen, deepseek"),
    ("chat_model_without_format", ["--model", "gpt2", "--tokenizer", "{tok_llama}", "--chat_jsonl", "{good_jsonl}"],
     "--model gpt2: gpt2.py has no chat format"),
]
if Path("/proc/self/mem").exists():   # a file that even root cannot read: read() fails with EIO
    CLI_CASES.append(("input_unreadable", ["--input", "/proc/self/mem"], "/proc/self/mem: Input/output error"))
# More of the same classes, through main() in this process (a process each would cost seconds of imports)
MORE_CASES = [
    ("val_fraction_1", ["--input", "{src}", "--val_fraction", "1"], "--val_fraction 1.0"),
    ("val_fraction_nan", ["--input", "{src}", "--val_fraction", "nan"], "--val_fraction nan"),
    ("name_slash", ["--input", "{src}", "--name", "a/b"], "--name 'a/b'"),
    ("name_hidden", ["--input", "{src}", "--name", ".tmp-x-1"], "--name '.tmp-x-1'"),
    ("name_from_input_root", ["--input", "/"], "--name '': expected a plain directory name"),
    ("name_not_a_dataset", ["--input", "{src}", "--name", "keep", "--out_dir", "{notes}"],
     "--name keep: {notes}/keep exists and is not a dataset"),
    ("vocab_size_negative", ["--input", "{src}", "--vocab_size", "-1"], "--vocab_size -1"),
    ("max_mb_nan", ["--input", "{src}", "--max_mb", "nan"], "--max_mb nan"),
    ("max_mb_too_small", ["--max_mb", "1e-6"], "--dataset stdlib: not even the first file fits in --max_mb 1e-06"),
    ("input_empty_file", ["--input", "{blank_txt}"], "--input {blank_txt}: too little text"),
    ("input_one_file_folder", ["--input", "{one}"], "--input {one}: too little text"),
    ("input_empty_string", ["--input", ""], "--input is empty"),
    ("tokenizer_missing_nested", ["--input", "{src}", "--tokenizer", "models/gpt2/v1"],
     "--tokenizer models/gpt2/v1: no such directory"),
    ("tokenizer_missing_home", ["--input", "{src}", "--tokenizer=~/model"], "--tokenizer {home}/model: no such directory"),
    ("tokenizer_unknown_word", ["--input", "{src}", "--tokenizer", "gtp2"], "--tokenizer 'gtp2': expected bytes, bpe"),
    ("tokenizer_is_a_file", ["--input", "{src}", "--tokenizer", "{x_txt}"], "--tokenizer {x_txt}: is a file"),
    ("tokenizer_no_files", ["--input", "{src}", "--tokenizer", "{tok_none}"], "{tok_none}: no tokenizer found"),
    ("gpt2_dir_corrupt", ["--input", "{src}", "--tokenizer", "gpt2", "--gpt2_dir", "{gpt2_bad}"],
     "{gpt2_bad}/encoder.json: not valid JSON"),
    ("gpt2_dir_without_gpt2", ["--input", "{src}", "--gpt2_dir", "{gpt2_bad}"], "--gpt2_dir is for --tokenizer gpt2"),
    ("out_dir_below_a_file", ["--input", "{src}", "--out_dir", "{x_txt}/data"], "--out_dir {x_txt}/data"),
    ("chat_not_object", [*CHAT, "{not_object_jsonl}"], '{not_object_jsonl}:1: expected a JSON object with a "messages"'),
    ("chat_no_messages", [*CHAT, "{no_messages_jsonl}"], "{no_messages_jsonl}:1: expected a JSON object"),
    ("chat_content_list", [*CHAT, "{content_list_jsonl}"], "{content_list_jsonl}:1: messages[0]"),
    ("chat_one_assistant", [*CHAT, "{one_assistant_jsonl}"], "{one_assistant_jsonl}: 1 conversations"),
    ("chat_without_model", ["--tokenizer", "{tok_llama}", "--chat_jsonl", "{good_jsonl}"], "--chat_jsonl needs --model"),
    ("chat_trained_tokenizer", ["--model", "llama3", "--chat_jsonl", "{good_jsonl}"],
     "--tokenizer bpe: --chat_jsonl needs the model's own tokenizer"),
    ("chat_tokenizer_without_chat_tokens", ["--model", "llama3", "--tokenizer", "{tok_bytes}", "--chat_jsonl",
                                            "{good_jsonl}"], "--tokenizer {tok_bytes}: the tokenizer lacks"),
    ("chat_and_input", [*CHAT, "{good_jsonl}", "--input", "{src}"], "--chat_jsonl and --input"),
    ("model_without_chat", ["--input", "{src}", "--model", "llama3"], "--model is for --chat_jsonl"),
    ("unknown_flag", ["--input", "{src}", "--tokeniser", "gpt2"], "unrecognized arguments: --tokeniser gpt2"),
]


def case_argv(args, paths, out):
    return [a.format(**paths) for a in args] + ([] if "--out_dir" in args else ["--out_dir", str(out)])


def file_paths(files, home):
    return {**{name.replace(".", "_"): str(p) for name, p in files.items()}, "home": str(home)}


def run_cli(args, home):
    """`python prepare_data.py args` with a private HOME and cache, and a hub endpoint that refuses at once."""
    env = dict(os.environ, HOME=str(home), NANOLLM_CACHE=str(home / "cache"), HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_one_error_line(r, names):
    output = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in output, output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, output


@pytest.fixture(scope="module")
def cli_runs(files, tmp_path_factory):
    """Every CLI case in its own process, side by side: most of each run is importing torch (through hub.py)."""
    home = tmp_path_factory.mktemp("home")
    paths = file_paths(files, home)

    def run(case):
        name, args, _ = case
        out = tmp_path_factory.mktemp(name) / "data"
        return name, (run_cli(case_argv(args, paths, out), home), out, paths)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(pool.map(run, CLI_CASES))


@pytest.mark.parametrize("name, args, names", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_naming_the_flag_or_file(cli_runs, name, args, names):
    r, out, paths = cli_runs[name]
    assert_one_error_line(r, names.format(**paths))
    assert not out.exists() or not any(out.iterdir())   # nothing half-written left behind


@pytest.mark.parametrize("name, args, names", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_more_bad_input_names_the_flag_or_file(files, tmp_path, monkeypatch, name, args, names):
    monkeypatch.setenv("HOME", str(tmp_path))
    paths = file_paths(files, tmp_path)
    with pytest.raises(BadInput) as e:
        prepare_data.main(case_argv(args, paths, tmp_path / "data"))
    assert names.format(**paths) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.skipif(not issubclass(hub.HubError, BadInput), reason="hub.HubError is not a BadInput yet (hub.py)")
def test_unreachable_hub_id_is_one_line(tmp_path):
    src = make_folder(tmp_path / "src")
    r = run_cli(["--input", str(src), "--tokenizer", "nosuch-org/nosuch-model", "--out_dir", str(tmp_path / "d")],
                tmp_path)
    assert_one_error_line(r, "nosuch-org/nosuch-model")
