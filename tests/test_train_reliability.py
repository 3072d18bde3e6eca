"""train.py under bad input and faults: one line `error: ...` naming the flag or file, signals handled at step
boundaries, kill -9 at any moment, one run per out_dir. Every case runs the real CLI in a subprocess."""
import concurrent.futures
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import errors
import gpt2
import train
from test_train import TINY, evals, losses, make_data, run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
SMALL = TINY + ["--max_steps", "4", "--eval_interval", "2", "--eval_iters", "1"]


def _default_sigint():
    # a process started in the background by a non-interactive shell inherits SIGINT as ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(argv, timeout=120):
    res = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=ENV, preexec_fn=_default_sigint)
    return res.returncode, res.stdout + res.stderr


def spawn(code):
    return subprocess.Popen([sys.executable, "-u", "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, preexec_fn=_default_sigint)


def temp_files(out_dir):
    return sorted(p.name for p in Path(out_dir).glob(".*") if p.name != ".lock")


# ---- bad input: a table of CLI cases, run concurrently, each one line naming the flag or file


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, a finished run to resume, and damaged files, built once for the table."""
    root = tmp_path_factory.mktemp("world")
    data = make_data(root / "data")
    for name, edit in {"meta_invalid": lambda d: (d / "meta.json").write_text("{not json"),
                       "meta_list": lambda d: (d / "meta.json").write_text("[1, 2]"),
                       "meta_no_vocab": lambda d: _edit_meta(d, vocab_size=None),
                       "meta_dtype": lambda d: _edit_meta(d, dtype="float64"),
                       "meta_vocab_text": lambda d: _edit_meta(d, vocab_size="many"),
                       "short_shard": lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:4000]),
                       "odd_shard": lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes() + b"x"),
                       "no_val": lambda d: (d / "val.bin").unlink()}.items():
        shutil.copytree(data, root / name)
        edit(root / name)
    make_data(root / "data300", vocab_size=300)
    assert run(TINY + ["--data", str(data), "--out_dir", str(root / "run"), "--max_steps", "2",
                       "--eval_interval", "2", "--eval_iters", "1"])[1] == 0
    shutil.copytree(root / "run", root / "damaged", symlinks=True)
    (root / "damaged" / "last" / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    shutil.copytree(root / "run", root / "empty_state", symlinks=True)
    (root / "empty_state" / "last" / "train_state.pt").write_bytes(b"")
    (root / "afile").write_text("x")
    gpt2.GPT(gpt2.Config(vocab_size=257, block_size=64, n_layer=1, n_head=1, n_embd=8)).save_pretrained(root / "m")
    for name, cfg in {"m_nokeys": {"model_type": "gpt2"}, "m_qwen": {"model_type": "qwen2", "vocab_size": 257}}.items():
        shutil.copytree(root / "m", root / name)
        (root / name / "config.json").write_text(json.dumps(cfg))
    for name, text in {"cfg_wide.json": '{"n_inner": "wide"}', "cfg_bad.json": "{", "cfg_list.json": "[1]",
                       "cfg_unknown.json": '{"n_layers": 2}', "cfg_batch.json": '{"warmup_steps": [8]}'}.items():
        (root / name).write_text(text)
    return root


def _edit_meta(d, **changes):
    meta = json.loads((d / "meta.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (d / "meta.json").write_text(json.dumps(meta))


# (id, argv with {w} for the world folder, a fragment the last line must contain)
CASES = [
    ("batch_size_0", ["--batch_size", "0"], "--batch_size 0"),
    ("grad_accum_0", ["--grad_accum", "0"], "--grad_accum 0"),
    ("eval_interval_0", ["--eval_interval", "0"], "--eval_interval 0"),
    ("log_interval_neg", ["--log_interval", "-5"], "--log_interval -5"),
    ("seq_len_0", ["--seq_len", "0"], "--seq_len 0"),
    ("max_steps_0", ["--max_steps", "0"], "--max_steps 0"),
    ("eval_iters_0", ["--eval_iters", "0"], "--eval_iters 0"),
    ("threads_neg", ["--threads", "-1"], "--threads -1"),
    ("lr_nan", ["--lr", "nan"], "--lr nan"),
    ("min_lr_above_lr", ["--lr", "1e-3", "--min_lr", "1e-2"], "--min_lr"),
    ("beta2_1", ["--beta2", "1"], "--beta2"),
    ("n_layer_text", ["--n_layer", "two"], "--n_layer 'two'"),
    ("n_embd_float", ["--n_embd", "32.5"], "--n_embd 32.5"),
    ("dropout_big", ["--dropout", "1.5"], "--dropout 1.5"),
    ("heads_mismatch", ["--n_head", "3"], "n_head=3"),
    ("eos_outside_vocab", ["--eos_token_id", "5000"], "--eos_token_id 5000"),
    ("seq_len_over_context", ["--seq_len", "65"], "--seq_len 65"),
    ("device_cuda", ["--device", "cuda"], "--device cuda"),
    ("device_unknown", ["--device", "tpu"], "--device 'tpu'"),
    ("dtype_unknown", ["--dtype", "float8"], "--dtype 'float8'"),
    ("model_unknown", ["--model", "gpt5"], "--model 'gpt5'"),
    ("config_wrong_type", ["--config", "{w}/cfg_wide.json"], "--n_inner 'wide'"),
    ("config_batch_text", ["--config", "{w}/cfg_batch.json"], "--warmup_steps [8]"),
    ("config_invalid_json", ["--config", "{w}/cfg_bad.json"], "cfg_bad.json"),
    ("config_not_object", ["--config", "{w}/cfg_list.json"], "cfg_list.json"),
    ("config_unknown_key", ["--config", "{w}/cfg_unknown.json"], "n_layers"),
    ("config_missing", ["--config", "{w}/nope.json"], "nope.json"),
    ("data_missing", ["--data", "{w}/nope"], "{w}/nope"),
    ("meta_invalid", ["--data", "{w}/meta_invalid"], "meta_invalid/meta.json"),
    ("meta_not_object", ["--data", "{w}/meta_list"], "meta_list/meta.json"),
    ("meta_missing_key", ["--data", "{w}/meta_no_vocab"], "vocab_size"),
    ("meta_unknown_dtype", ["--data", "{w}/meta_dtype"], "float64"),
    ("meta_vocab_text", ["--data", "{w}/meta_vocab_text"], "vocab_size"),
    ("shard_shorter_than_meta", ["--data", "{w}/short_shard"], "short_shard/train.bin"),
    ("shard_odd_bytes", ["--data", "{w}/odd_shard"], "odd_shard/val.bin"),
    ("shard_missing", ["--data", "{w}/no_val"], "val.bin"),
    ("out_dir_is_file", ["--out_dir", "{w}/afile"], "--out_dir {w}/afile"),
    ("resume_nothing", ["--resume", "--out_dir", "{w}/nothing_here"], "--resume"),
    ("resume_damaged_state", ["--resume", "--out_dir", "{w}/damaged", "--max_steps", "4"], "is damaged"),
    ("resume_empty_state", ["--resume", "--out_dir", "{w}/empty_state", "--max_steps", "4"], "is damaged"),
    ("resume_changed_arch", ["--resume", "--out_dir", "{run}", "--max_steps", "4", "--n_layer", "3"], "--n_layer 3"),
    ("resume_changed_dropout", ["--resume", "--out_dir", "{run}", "--max_steps", "4", "--dropout", "0.2"],
     "--dropout 0.2"),
    ("resume_changed_lr", ["--resume", "--out_dir", "{run}", "--max_steps", "4", "--lr", "1e-4"], "--lr 0.0001"),
    ("resume_changed_batch", ["--resume", "--out_dir", "{run}", "--max_steps", "4", "--batch_size", "4"],
     "batch_size x grad_accum"),
    ("resume_other_tokenizer", ["--resume", "--out_dir", "{run}", "--max_steps", "4", "--data", "{w}/data300"],
     "--data {w}/data300"),
    ("fresh_run_over_a_run", ["--out_dir", "{run}"], "holds a run"),
    ("init_from_missing_path", ["--init_from", "./no_such_checkpoint_dir"], "no_such_checkpoint_dir"),
    ("init_from_config_lacks_keys", ["--init_from", "{w}/m_nokeys"], "config.json"),
    ("init_from_other_family", ["--init_from", "{w}/m_qwen"], "qwen2"),
    ("init_from_reshape", ["--init_from", "{w}/m", "--n_layer", "3"], "--init_from"),
]


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory):
    outs = tmp_path_factory.mktemp("outs")

    def one(case):
        name, argv, _ = case
        if "{run}" in argv:   # each case resumes its own copy of the finished run: one run per out_dir
            shutil.copytree(world / "run", outs / f"{name}-run", symlinks=True)
        argv = [a.replace("{w}", str(world)).replace("{run}", str(outs / f"{name}-run")) for a in argv]
        base = SMALL + ["--data", str(world / "data"), "--out_dir", str(outs / name)]
        return cli(base + argv)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(zip([c[0] for c in CASES], pool.map(one, CASES)))


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(outcomes, world, name, argv, fragment):
    code, out = outcomes[name]
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert code != 0, out
    assert "Traceback" not in out, out
    assert last.startswith("error: ") and fragment.replace("{w}", str(world)) in last, out
    assert "weights_only" not in out   # torch's advice for a damaged file is never passed on


# ---- signals: a flag acted on at the step boundary


REFERENCE = TINY + ["--max_steps", "30", "--eval_interval", "10", "--eval_iters", "2", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "bytes")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run(REFERENCE + ["--data", str(data), "--out_dir", str(out)])
    return losses(out), evals(out)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_at_a_step_boundary_and_resume_is_exact(data, reference, tmp_path, sig, code):
    args = REFERENCE + ["--data", str(data), "--out_dir", str(tmp_path)]
    rng = random.Random(sig)
    for attempt in range(2):
        at = rng.randrange(2, 12) if attempt == 0 else rng.randrange(saved + 2, 28)
        proc = spawn(f"import errors, train; errors.run(train.main, {args + (['--resume'] if attempt else [])!r})")
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {at:5d}"):
                time.sleep(rng.random() * 0.05)   # anywhere inside the next step
                proc.send_signal(sig)
                break
        out = "".join(lines) + proc.stdout.read()
        assert proc.wait(timeout=60) == code, out
        # saved now, or by the eval of the step it stopped at
        assert ("saved; continue with --resume" in out or "holds this step already" in out) and "Traceback" not in out
        saved = torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["step"]
        assert saved >= at
        assert temp_files(tmp_path) == []
    assert cli(args + ["--resume"])[0] == 0
    curve, eval_rows = reference
    assert losses(tmp_path) == curve   # every step once, each loss exactly as in the uninterrupted run
    assert evals(tmp_path) == eval_rows


def test_signal_before_the_first_step_saves_nothing(data, tmp_path):
    args = REFERENCE + ["--data", str(data), "--out_dir", str(tmp_path)]
    code = f"""
import os, signal, errors, train
start = train.StopRequest.__init__
def start_then_signal(self):
    start(self)
    os.kill(os.getpid(), signal.SIGINT)   # lands before step 1
train.StopRequest.__init__ = start_then_signal
errors.run(train.main, {args!r})
"""
    proc = spawn(code)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "saved" not in out.replace("nothing saved", "") and "nothing saved" in out, out
    assert not (tmp_path / "last").exists()


def test_second_run_on_one_out_dir_names_the_first(data, tmp_path):
    args = TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "100000",
                   "--eval_interval", "100000"]
    first = spawn(f"import errors, train; errors.run(train.main, {args!r})")
    try:
        for line in first.stdout:
            if line.startswith("step"):
                break
        code, out = cli(args)
        assert code != 0 and "Traceback" not in out, out
        assert f"--out_dir {tmp_path}: in use by train.py (process {first.pid}" in out.strip().splitlines()[-1]
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, len(rows) + 1))   # one run's rows, in order


# ---- crashes: kill -9 at random moments, a full disk, leftovers of dead writers


def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(data, reference, tmp_path):
    args = REFERENCE + ["--data", str(data), "--out_dir", str(tmp_path)]
    rng = random.Random(9)
    kills = 0
    for attempt in range(12):
        resume = ["--resume"] if (tmp_path / "last").is_symlink() else []
        seen = []
        proc = spawn(f"import errors, train; errors.run(train.main, {args + resume!r})")
        if kills < 5:
            # half the kills land while an eval and its checkpoint are being written
            trigger = "eval:" if attempt % 2 else "step"
            for line in proc.stdout:
                seen.append(line)
                if trigger in line and rng.random() < 0.5:
                    time.sleep(rng.random() * 0.02)
                    proc.kill()
                    kills += 1
                    break
        out = "".join(seen) + proc.communicate(timeout=120)[0]
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, out
        if (tmp_path / "last").is_symlink():   # whatever moment it died at, `last` is whole
            gpt2.GPT.from_pretrained(str(tmp_path / "last"))
            torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)
    assert proc.returncode == 0 and kills >= 3
    curve, eval_rows = reference
    assert losses(tmp_path) == curve   # metrics.jsonl holds each step once, as in the uninterrupted run
    assert evals(tmp_path) == eval_rows
    assert temp_files(tmp_path) == []


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(data, tmp_path):
    args = SMALL + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "6"]
    code = f"""
import errno, checkpoint_io, errors, train
save, calls = checkpoint_io.save_safetensors, []
def full(state, directory, **kw):
    calls.append(1)
    if len(calls) == 2:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))
    return save(state, directory, **kw)
checkpoint_io.save_safetensors = full
errors.run(train.main, {args!r})
"""
    proc = spawn(code)
    out = proc.communicate(timeout=120)[0]
    last = out.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert last.startswith("error: saving") and "No space left on device" in last and "ckpt-0000002 is kept" in last
    assert temp_files(tmp_path) == []
    assert torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["step"] == 2


def test_leftovers_of_dead_writers_are_removed_on_start(data, tmp_path):
    assert run(SMALL + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "2"])[1] == 0
    (tmp_path / ".tmp-ckpt-0000004-999999").mkdir()
    (tmp_path / ".tmp-ckpt-0000004-999999" / "model.safetensors").write_bytes(b"\0" * 10_000)
    (tmp_path / ".stale-ckpt-0000002-999999").mkdir()
    (tmp_path / ".last.tmp").symlink_to("ckpt-0000004")
    assert run(SMALL + ["--data", str(data), "--out_dir", str(tmp_path), "--resume"])[1] == 0
    assert temp_files(tmp_path) == []


def test_resume_may_change_the_run_length_and_intervals(data, tmp_path):
    moved = shutil.copytree(data, tmp_path / "moved-data")   # the same tokens elsewhere: the same tokenizer
    out = ["--out_dir", str(tmp_path / "out")]
    assert run(TINY + out + ["--data", str(data), "--max_steps", "2", "--eval_interval", "2",
                             "--eval_iters", "1"])[1] == 0
    assert run(TINY + out + ["--data", str(moved), "--max_steps", "4", "--eval_interval", "4", "--eval_iters", "2",
                             "--log_interval", "2", "--resume"])[1] == 0
    # batch 8 x 1 == batch 4 x 2 accumulation steps: the same global batch
    assert run(TINY + out + ["--data", str(data), "--max_steps", "6", "--eval_interval", "6", "--batch_size", "4",
                             "--grad_accum", "2", "--resume"])[1] == 0
    assert torch.load(tmp_path / "out" / "last" / "train_state.pt", weights_only=True)["step"] == 6
    # a finished run resumed again (a scheduler's requeue) has nothing to do
    code, out = cli(TINY + out + ["--data", str(data), "--max_steps", "6", "--eval_interval", "6", "--resume"])
    assert code == 0 and "nothing to train" in out, out


def test_config_file_values_are_checked_like_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"n_layer": 2, "lr": 0.01, "model": "gpt2"}))
    args, _ = train.parse_args(["--config", str(tmp_path / "c.json")])
    assert args.model_overrides["n_layer"] == 2 and args.lr == 0.01
    with pytest.raises(errors.BadInput, match="--dropout -0.1"):
        train.parse_args(["--config", str(tmp_path / "c.json"), "--dropout", "-0.1"])


def test_os_errors_read_as_path_and_reason(tmp_path):
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert errors.os_error_line(e) == f"{tmp_path / 'x'}: No space left on device"


def test_a_damaged_last_names_the_previous_checkpoint_which_resumes(data, tmp_path):
    common = SMALL + ["--data", str(data), "--out_dir", str(tmp_path)]
    assert run(common + ["--max_steps", "6"])[1] == 0
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000004", "ckpt-0000006"]
    (tmp_path / "last" / "train_state.pt").write_bytes(b"\x80\x04 bit rot")
    code, out = cli(common + ["--max_steps", "8", "--resume"])
    assert code == 1 and "Traceback" not in out and "weights_only" not in out, out
    assert f"previous checkpoint is {tmp_path / 'ckpt-0000004'}" in out.strip().splitlines()[-1]
    os.remove(tmp_path / "last")
    os.symlink("ckpt-0000004", tmp_path / "last")   # what the message says to do
    assert run(common + ["--max_steps", "8", "--resume"])[1] == 0
    assert torch.load(tmp_path / "last" / "train_state.pt", weights_only=True)["step"] == 8
