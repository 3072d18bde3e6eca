"""train.py's validation bits per byte: val_bpb equals a hand computation on the checkpoint (nats of the targets
over their UTF-8 bytes, special tokens and ignored targets in neither sum), resumes exactly, falls back to the
tokenizer for older datasets, and a malformed byte-count file is one line naming meta.json and its key."""
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import bpe
import hub
import train
from errors import BadInput
from test_train import ROOT, TINY, evals, make_data, run

EVAL = ["--eval_iters", "4"]


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """A dataset of prepare_data.py: a 300-token BPE of text in 1- to 4-byte characters, so that many tokens are
    part of a character, and short documents, so that <|endoftext|> is often a target."""
    import prepare_data
    root = tmp_path_factory.mktemp("bpe")
    (root / "src").mkdir()
    for i in range(30):
        # common characters become tokens of their own; rare ones (one per document) stay bytes
        rare = f"{chr(0x4E00 + 37 * i)} {chr(0x1F300 + i)}"
        line = f"Doc {i}: héllo wörld {i % 4}, naïve café ☕ 🙂 {rare} {i * 7}\n"
        (root / "src" / f"doc{i:02d}.txt").write_text(line * (3 + i % 4))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "CACHE_DIR", root / "cache")   # never the user's trained-BPE cache
        return prepare_data.prepare(input=str(root / "src"), tokenizer="bpe", vocab_size=300,
                                    out_dir=str(root / "data"), val_fraction=0.3)


def raw_byte_counts(tok):
    """{id: UTF-8 bytes} from tiktoken's copy of the tokenizer, 0 for special tokens: the raw bytes of a token,
    as a token may hold part of a character (its decoded text would be U+FFFD, 3 bytes)."""
    enc = tok.to_tiktoken()
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return {i: 0 if i in specials else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)}


def is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def val_batches(data_dir, seq_len, batch_size, n, vocab_size, meta=None):
    """The (x, y) batches of train.py's evaluation of the val split (one process)."""
    args, _ = train.parse_args(["--data", str(data_dir)])
    data = train.TokenData(data_dir, seq_len, vocab_size, meta)
    return [data.batch("val", train.step_seed(args.seed + 1, -i), batch_size) for i in range(n)]


def test_val_bpb_equals_an_independent_computation(bpe_data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run(TINY + EVAL + ["--data", str(bpe_data), "--out_dir", str(tmp_path), "--max_steps", "6",
                       "--eval_interval", "6", "--lr", "1e-2", "--warmup_steps", "2"])
    row = evals(tmp_path)[-1]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "last").eval()   # another implementation
    tok = bpe.load(bpe_data / "tokenizer")
    n_bytes = raw_byte_counts(tok)
    eot = tok.special_tokens["<|endoftext|>"]
    nats = n = 0.0
    targets, logps = [], []
    for x, y in val_batches(bpe_data, 32, 8, 4, 300):
        with torch.no_grad():
            logp = torch.log_softmax(hf(x).logits.double(), dim=-1)
        for b in range(y.size(0)):
            for t in range(y.size(1)):
                target = int(y[b, t])
                targets.append(target)
                logps.append(logp[b, t, target].item())
                if n_bytes[target]:
                    nats -= logp[b, t, target].item()
                    n += n_bytes[target]
    expected = nats / (math.log(2) * n)
    assert row["val_bpb"] == pytest.approx(expected, rel=1e-5)
    # the eval batches hold what the definition excludes or counts apart: end-of-text separators and tokens that
    # are part of a character; counting either another way gives another number
    assert eot in targets and any(not is_utf8(tok.vocab[t]) for t in targets)
    with_eot = (nats - sum(lp for t, lp in zip(targets, logps) if t == eot)) / (math.log(2) * n)
    decoded = nats / (math.log(2) * sum(len(tok.decode([t]).encode()) for t in targets if t != eot))
    assert abs(with_eot - expected) > 1e-3 * expected and abs(decoded - expected) > 1e-3 * expected
    out = capsys.readouterr().out
    assert re.search(rf"^step +6 \| eval: train \d+\.\d{{4}} val {row['val_loss']:.4f} \| val_bpb "
                     rf"{row['val_bpb']:.4f}( \(best\))?$", out, re.M), out


def test_a_dataset_without_byte_counts(bpe_data, tmp_path, capsys):
    """Prepared before prepare_data wrote token_bytes: counted once from its tokenizer/, the same val_bpb; with no
    tokenizer of its ids, val_bpb is left out and the run goes on."""
    old = tmp_path / "old"
    shutil.copytree(bpe_data, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / meta.pop("token_bytes")).unlink()
    (old / "meta.json").write_text(json.dumps(meta))
    common = TINY + ["--max_steps", "2", "--eval_interval", "2", "--eval_iters", "2"]
    run(common + ["--data", str(bpe_data), "--out_dir", str(tmp_path / "run_new")])
    run(common + ["--data", str(old), "--out_dir", str(tmp_path / "run_old")])
    new, fallback = evals(tmp_path / "run_new")[0], evals(tmp_path / "run_old")[0]
    assert math.isfinite(new["val_bpb"]) and fallback["val_bpb"] == new["val_bpb"]

    other = tmp_path / "other"   # its tokenizer/ is not the one of its ids (257 tokens, not 300)
    shutil.copytree(old, other)
    shutil.rmtree(other / "tokenizer")
    (other / "tokenizer").mkdir()
    bpe.train("", 257, special_tokens=["<|endoftext|>"]).save(other / "tokenizer" / bpe.SAVE_NAME)
    bytes_only = make_data(tmp_path / "bytes", token_bytes=False)   # no tokenizer/ at all
    for d in (other, bytes_only):
        capsys.readouterr()
        assert run(common + ["--data", str(d), "--out_dir", str(tmp_path / f"run_{d.name}")])[1] == 0
        row = evals(tmp_path / f"run_{d.name}")[0]
        assert "val_bpb" not in row and math.isfinite(row["val_loss"])
        out = capsys.readouterr().out
        assert f"(no val_bpb: {d} has no token byte counts" in out and "| val_bpb" not in out


def _bad_file(content):
    def write(d, meta):
        if isinstance(content, bytes):
            (d / "tb.npy").write_bytes(content)
        elif isinstance(content, dict):
            np.savez(d / "tb.npy", **content)
            (d / "tb.npy.npz").rename(d / "tb.npy")
        else:
            np.save(d / "tb.npy", content)
        meta["token_bytes"] = "tb.npy"
    return write


def _cut_short(d, meta):
    np.save(d / "tb.npy", np.ones(257, dtype=np.uint32))
    (d / "tb.npy").write_bytes((d / "tb.npy").read_bytes()[:-10])
    meta["token_bytes"] = "tb.npy"


def _negative_at_3(d, meta):
    counts = np.ones(257, dtype=np.int32)
    counts[3] = -1
    _bad_file(counts)(d, meta)


# (case, how it damages the dataset, what the one line says after "<dir>/meta.json: token_bytes")
BAD_TOKEN_BYTES = [
    ("a_number", lambda d, meta: meta.update(token_bytes=5), " is 5, expected the name of a file beside meta.json"),
    ("a_path", lambda d, meta: meta.update(token_bytes="../token_bytes.npy"), " is '../token_bytes.npy', expected"),
    ("empty", lambda d, meta: meta.update(token_bytes=""), " is '', expected the name of a file"),
    ("missing_file", lambda d, meta: meta.update(token_bytes="nope.npy"), " 'nope.npy': {d}/nope.npy: No such file"),
    ("a_directory", lambda d, meta: (d / "sub").mkdir() or meta.update(token_bytes="sub"), " 'sub': {d}/sub: Is a dir"),
    ("not_npy", _bad_file(b"3 1 1 2\n"), " 'tb.npy': not a .npy array"),
    ("cut_short", _cut_short, " 'tb.npy': not a .npy array"),
    ("npz", _bad_file({"a": np.ones(257, dtype=np.uint32)}), " 'tb.npy': an .npz archive, expected one array"),
    ("too_few", _bad_file(np.ones(10, dtype=np.uint32)), " 'tb.npy': shape (10,), expected (257,)"),
    ("two_d", _bad_file(np.ones((257, 1), dtype=np.uint32)), " 'tb.npy': shape (257, 1), expected (257,)"),
    ("floats", _bad_file(np.ones(257)), " 'tb.npy': dtype float64, expected integer byte counts"),
    ("negative", _negative_at_3, " 'tb.npy': a negative byte count (token id 3)"),
]


@pytest.mark.parametrize("name, damage, says", BAD_TOKEN_BYTES, ids=[c[0] for c in BAD_TOKEN_BYTES])
def test_malformed_byte_counts_are_one_line_naming_meta_json_and_key(tmp_path, name, damage, says):
    d = make_data(tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    damage(d, meta)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput) as e:
        run(TINY + ["--data", str(d), "--out_dir", str(tmp_path / "o"), "--max_steps", "2"])
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{d / 'meta.json'}: token_bytes{says.format(d=d)}"), line
    assert not (tmp_path / "o" / "metrics.jsonl").exists()   # refused before any work


def test_malformed_byte_counts_on_the_command_line(tmp_path):
    d = make_data(tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    _bad_file(np.ones(10, dtype=np.uint32))(d, meta)
    (d / "meta.json").write_text(json.dumps(meta))
    res = subprocess.run([sys.executable, "train.py", *TINY, "--data", str(d), "--out_dir", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode != 0 and "Traceback" not in out, out
    assert out.splitlines()[-1] == (f"error: {d / 'meta.json'}: token_bytes 'tb.npy': shape (10,), expected (257,): "
                                    f"one count per token id; run prepare_data.py again"), out


def test_val_bpb_of_chat_data_counts_only_the_replies(tmp_path):
    import llama3
    import prepare_data
    from test_prepare_data import llama_tokenizer_dir, write_jsonl
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}, ça va? ☕"},
              {"role": "assistant", "content": f"fine {i}, très bien 🙂"},
              {"role": "user", "content": "how are you?"},
              {"role": "assistant", "content": "fine thanks, merci ☕"}] for i in range(10)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", convs)
    out = prepare_data.prepare_chat(jsonl, "llama3", str(llama_tokenizer_dir(tmp_path / "tok")),
                                    out_dir=str(tmp_path / "data"), val_fraction=0.2)
    run(["--model", "llama3", "--data", str(out), "--out_dir", str(tmp_path / "o"), "--n_layer", "1", "--n_head",
         "2", "--n_kv_head", "1", "--n_embd", "16", "--seq_len", "8", "--batch_size", "4", "--max_steps", "4",
         "--eval_interval", "4", "--eval_iters", "3", "--sample_tokens", "0", "--threads", "1", "--lr", "1e-2"])
    row = evals(tmp_path / "o")[-1]
    model = llama3.Model.from_pretrained(str(tmp_path / "o" / "last")).eval()
    tok = bpe.load(out / "tokenizer")
    n_bytes = raw_byte_counts(tok)
    meta = json.loads((out / "meta.json").read_text())
    unmasked = val_batches(out, 8, 4, 3, tok.vocab_size, {**meta, "loss_mask": False})
    nats = n = all_nats = all_n = 0.0
    kinds = set()
    for (x, y), (_, raw) in zip(val_batches(out, 8, 4, 3, tok.vocab_size), unmasked):
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0].double(), dim=-1)
        for b in range(y.size(0)):
            for t in range(y.size(1)):
                target, lp = int(raw[b, t]), logp[b, t, int(raw[b, t])].item()
                kinds.add((int(y[b, t]) == -100, n_bytes[target] > 0))
                all_nats, all_n = all_nats - lp * (n_bytes[target] > 0), all_n + n_bytes[target]
                if int(y[b, t]) != -100 and n_bytes[target]:
                    assert int(y[b, t]) == target
                    nats, n = nats - lp, n + n_bytes[target]
    expected = nats / (math.log(2) * n)
    assert row["val_bpb"] == pytest.approx(expected, rel=1e-5)
    # the windows hold masked text, reply text and special tokens inside the replies (<|eot_id|>): with the
    # masked text counted too, the number is another
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    assert abs(all_nats / (math.log(2) * all_n) - expected) > 1e-3 * expected
