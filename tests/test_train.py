"""train.py: the loss falls, --resume continues exactly, DDP equals one process, bad input fails cleanly."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "gpt2", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
        "--seq_len", "32", "--batch_size", "8", "--sample_tokens", "0", "--log_interval", "1", "--threads", "1"]


def make_data(directory, n_train=40_000, n_val=4_000, vocab_size=257, token_bytes=True):
    """Byte-level token shards of real text (this repo's own sources), in prepare_data.py's format; token_bytes:
    with the byte count of each id (1 for the 256 bytes, 0 above), from which train.py reports val_bpb."""
    directory.mkdir(parents=True, exist_ok=True)
    text = b"".join(p.read_bytes() for p in sorted(ROOT.glob("*.py")))
    ids = np.frombuffer((text * (1 + (n_train + n_val) // len(text)))[:n_train + n_val], dtype=np.uint8)
    ids.astype(np.uint16)[:n_train].tofile(directory / "train.bin")
    ids.astype(np.uint16)[n_train:].tofile(directory / "val.bin")
    meta = {"vocab_size": vocab_size, "dtype": "uint16", "eot_id": 256 if vocab_size > 256 else None,
            "train_tokens": n_train, "val_tokens": n_val}
    if token_bytes:
        np.save(directory / "token_bytes.npy", (np.arange(vocab_size) < 256).astype(np.uint32))
        meta["token_bytes"] = "token_bytes.npy"
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def evals(out_dir):
    """The eval rows of metrics.jsonl, without their times: [{"step", "train_loss", "val_loss", "val_bpb"}]."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if "val_loss" in r]


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run(argv):
    args, module = train.parse_args(argv)
    return train.train(args, module)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "bytes")


def test_loss_falls_and_checkpoint_is_official(data, tmp_path):
    model, code = run(TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "40",
                              "--eval_interval", "20", "--lr", "1e-2", "--warmup_steps", "5"])
    assert code == 0
    curve = losses(tmp_path)
    assert np.mean([curve[s] for s in range(36, 41)]) < np.mean([curve[s] for s in range(1, 6)]) - 1.0
    last = tmp_path / "last"
    assert last.is_symlink() and (last / "config.json").is_file() and (last / "train_state.pt").is_file()
    reloaded = gpt2.GPT.from_pretrained(str(last))
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    common = TINY + ["--data", str(data), "--eval_interval", "6", "--eval_iters", "2", "--dropout", "0.1"]
    run(common + ["--out_dir", str(tmp_path / "a"), "--max_steps", "12"])
    run(common + ["--out_dir", str(tmp_path / "b"), "--max_steps", "6"])
    run(common + ["--out_dir", str(tmp_path / "b"), "--max_steps", "12", "--resume"])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 13))
    assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]   # exact, not approximate
    assert evals(tmp_path / "a") == evals(tmp_path / "b") and evals(tmp_path / "a")[-1]["val_bpb"] > 0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_equal_one(data, tmp_path):
    def torchrun(n, batch, out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
               *TINY, "--batch_size", str(batch), "--data", str(data), "--out_dir", str(out), "--max_steps", "6",
               "--eval_interval", "6", "--eval_iters", "2", "--device", "cpu"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return losses(out), evals(out)[-1]
    (one, one_eval), (two, two_eval) = torchrun(1, 8, tmp_path / "one"), torchrun(2, 4, tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    # the same 8 sequences per step, split 4 + 4: equal up to float summation order
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5, atol=0)
    # and the eval: val_bpb from the summed nats and bytes of both processes, not one's own ratio
    for key in ("val_loss", "val_bpb"):
        assert two_eval[key] == pytest.approx(one_eval[key], rel=1e-5)


def test_grad_accum_equals_bigger_batch(data, tmp_path):
    common = TINY + ["--data", str(data), "--max_steps", "4", "--eval_interval", "4", "--eval_iters", "1"]
    run(common + ["--out_dir", str(tmp_path / "big")])
    run(common + ["--out_dir", str(tmp_path / "acc"), "--batch_size", "2", "--grad_accum", "4"])
    big, acc = losses(tmp_path / "big"), losses(tmp_path / "acc")
    # the same 8 sequences per step, as 1 x 8 or 4 micro-steps x 2: equal up to float summation order
    np.testing.assert_allclose([acc[s] for s in big], [big[s] for s in big], rtol=1e-5, atol=0)


# ---- bad input and interruptions


def test_unknown_model():
    with pytest.raises(train.BadInput, match="--model .gpt5. is not one of"):
        train.parse_args(["--model", "gpt5"])


def test_dataset_shorter_than_block(tmp_path):
    d = make_data(tmp_path / "d", n_train=20, n_val=200)
    with pytest.raises(train.BadInput, match=r"train.bin: 20 tokens, fewer than --seq_len \+ 2 = 34"):
        run(TINY + ["--data", str(d), "--out_dir", str(tmp_path / "o")])


def test_token_ids_beyond_vocabulary(tmp_path):
    d = make_data(tmp_path / "d", vocab_size=100)   # bytes above 99 occur in the data
    with pytest.raises(train.BadInput, match="is beyond the model's vocab_size 100"):
        run(TINY + ["--data", str(d), "--out_dir", str(tmp_path / "o"), "--max_steps", "2"])


def test_tokenizer_larger_than_model(data, tmp_path):
    gpt2.GPT(gpt2.Config(vocab_size=200, block_size=64, n_layer=1, n_head=1, n_embd=8)).save_pretrained(tmp_path / "m")
    with pytest.raises(train.BadInput, match="tokenizer vocabulary 257 exceeds the model's vocab_size 200"):
        run(TINY[:2] + ["--data", str(data), "--init_from", str(tmp_path / "m"), "--out_dir", str(tmp_path / "o"),
                        "--seq_len", "32"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    forward, calls = gpt2.GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 7:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(gpt2.GPT, "forward", poisoned)
    with pytest.raises(train.BadInput, match="loss is nan at step 7: stopped; the last good checkpoint"):
        run(TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "20", "--eval_interval", "5",
                    "--eval_iters", "1"])
    state = torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 5
    model = gpt2.GPT.from_pretrained(str(tmp_path / "last"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _spawn(code, cwd=ROOT):
    return subprocess.Popen([sys.executable, "-u", "-c", code], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ctrl_c_saves_and_exits_cleanly(data, tmp_path):
    args = TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "100000", "--eval_interval", "100000"]
    proc = _spawn(f"import train; train.main({args!r})")
    for line in proc.stdout:
        if line.startswith("step    10"):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, out
    assert "saved; continue with --resume" in out
    step = torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["step"]
    assert step >= 10
    gpt2.GPT.from_pretrained(str(tmp_path / "last"))


def test_kill_9_during_checkpoint_write_keeps_previous(data, tmp_path):
    args = TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "10", "--eval_interval", "5",
                   "--eval_iters", "1"]
    # the second checkpoint dies (SIGKILL, no cleanup) after half of its weights file is on disk
    code = f"""
import os, signal, checkpoint_io, train
save = checkpoint_io.save_safetensors
calls = []
def dying(state, directory, **kw):
    calls.append(1)
    if len(calls) == 2:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_bytes(b"partial" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return save(state, directory, **kw)
checkpoint_io.save_safetensors = dying
train.main({args!r})
"""
    proc = _spawn(code)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == -signal.SIGKILL, out
    assert torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["step"] == 5
    gpt2.GPT.from_pretrained(str(tmp_path / "last"))
    # and training resumes from it
    run(TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "10", "--eval_interval", "5",
                "--eval_iters", "1", "--resume"])
    assert torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["step"] == 10


def test_init_from_official_weights_starts_at_their_loss(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_gpt2 import HF_CONFIG, write_official
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**HF_CONFIG, "vocab_size": 257})).eval()
    ckpt = write_official(hf, tmp_path / "official")
    (ckpt / "config.json").write_text(json.dumps({**HF_CONFIG, "vocab_size": 257}))
    run(["--model", "gpt2", "--init_from", str(ckpt), "--data", str(data), "--out_dir", str(tmp_path / "ft"),
         "--seq_len", "32", "--batch_size", "8", "--max_steps", "2", "--eval_interval", "2", "--eval_iters", "1",
         "--log_interval", "1", "--sample_tokens", "0"])
    args, _ = train.parse_args(["--data", str(data)])
    x, y = train.TokenData(data, 32, 257).batch("train", train.step_seed(args.seed, 0), 8)
    with torch.no_grad():
        ref = hf(x, labels=None).logits
    expected = torch.nn.functional.cross_entropy(ref.flatten(0, 1), y.flatten()).item()
    assert abs(losses(tmp_path / "ft")[1] - expected) < 1e-5
    # the fine-tuned checkpoint is in the official layout again and loads in transformers
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ft" / "last")


def test_saving_the_same_step_again_never_removes_the_checkpoint(data, tmp_path, monkeypatch):
    """Ctrl-C right after an eval saves the step `last` already holds: that must relink, not rewrite it."""
    args, module = train.parse_args(TINY + ["--data", str(data), "--out_dir", str(tmp_path)])
    model = gpt2.GPT(gpt2.Config(vocab_size=257, block_size=64, n_layer=1, n_head=1, n_embd=8))
    opt = train.make_optimizer(model, args, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.save_checkpoint(tmp_path, model, opt, scaler, 5, 1.0, args, data, ["last", "best"])
    monkeypatch.setattr(gpt2.GPT, "save_pretrained", lambda *a: pytest.fail("rewrote the checkpoint `last` holds"))
    train.save_checkpoint(tmp_path, model, opt, scaler, 5, 1.0, args, data, ["last"])
    assert os.readlink(tmp_path / "last") == os.readlink(tmp_path / "best") == "ckpt-0000005"
    monkeypatch.undo()
    gpt2.GPT.from_pretrained(str(tmp_path / "last"))
