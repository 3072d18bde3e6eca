"""train.py's fine-tuning methods end to end: LoRA (PEFT's files, exact resume), classification (transformers'
sequence-classification layout), DPO (with and without LoRA); prepare_data.py --classify / --dpo_jsonl feed them."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt2
import prepare_data
from test_train import ROOT, TINY, losses, make_data, run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from errors import BadInput   # noqa: E402

BASE_FLAGS = ["--model", "gpt2", "--batch_size", "8", "--sample_tokens", "0", "--log_interval", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "bytes")


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    """A tiny GPT-2 over bytes, pretrained for 30 steps here: what the fine-tuning runs start from."""
    out = tmp_path_factory.mktemp("base")
    run(TINY + ["--data", str(data), "--out_dir", str(out), "--max_steps", "30", "--eval_interval", "30",
                "--eval_iters", "1", "--lr", "1e-2", "--warmup_steps", "5"])
    return (out / "last").resolve()


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny fine-tuning set the base has not seen: one sentence over and over, in byte-level shards."""
    directory = tmp_path_factory.mktemp("sft")
    ids = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 400, dtype=np.uint8).astype(np.uint16)
    ids[:16_000].tofile(directory / "train.bin")
    ids[16_000:].tofile(directory / "val.bin")
    (directory / "meta.json").write_text(json.dumps({"vocab_size": 257, "dtype": "uint16", "eot_id": 256,
                                                     "train_tokens": 16_000, "val_tokens": len(ids) - 16_000}))
    return directory


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---- LoRA


def test_lora_run_saves_peft_adapters_that_peft_and_from_pretrained_load(sft, base, tmp_path, capsys):
    model, code = run(BASE_FLAGS + ["--init_from", str(base), "--data", str(sft), "--out_dir", str(tmp_path),
                                    "--seq_len", "32", "--max_steps", "30", "--eval_interval", "30", "--eval_iters", "1",
                                    "--lr", "3e-2", "--warmup_steps", "5", "--lora_rank", "8", "--lora_targets", "all"])
    assert code == 0 and "LoRA rank 8 on 8 modules" in capsys.readouterr().out
    last = (tmp_path / "last").resolve()
    # the loss on the fine-tuning text falls, here 3.57 -> 3.47: the base's frozen tied head, near its random init
    # after 30 steps, bounds how far (the same adapters with that head trainable reach 0.49 on this text)
    val = torch.from_numpy(np.fromfile(sft / "val.bin", dtype=np.uint16).astype(np.int64))[None, :65]
    with torch.no_grad():
        before = gpt2.GPT.from_pretrained(str(base))(val[:, :-1], val[:, 1:])[1]
        after = gpt2.GPT.from_pretrained(str(last))(val[:, :-1], val[:, 1:])[1]
    assert after < before - 0.05, (before, after)
    assert {p.name for p in last.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "train_state.pt"}
    assert not (last / "model.safetensors").exists()   # the adapter, not a copy of the base
    config = json.loads((last / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["fan_in_fan_out"] and config["r"] == 8
    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(idx)[0]
        merged = gpt2.GPT.from_pretrained(str(last)).eval()(idx)[0]
        hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                            str(last)).eval()(idx).logits
        untouched = gpt2.GPT.from_pretrained(str(base)).eval()(idx)[0]
    assert (merged - ours).abs().max() < 1e-5 and (hf - ours).abs().max() < 1e-4
    assert (untouched - ours).abs().max() > 1e-3   # the adapters did change the model


def test_lora_resume_is_exact(data, base, tmp_path):
    # warmup over all 12 steps: the learning rate of a step then does not depend on --max_steps
    common = BASE_FLAGS + ["--init_from", str(base), "--data", str(data), "--seq_len", "32", "--eval_interval", "6",
                           "--eval_iters", "1", "--warmup_steps", "12", "--lora_rank", "4", "--lora_dropout", "0.1"]
    run(common + ["--out_dir", str(tmp_path / "full"), "--max_steps", "12"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "6"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "12", "--resume"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "4"], "--lora_rank 4: LoRA adapts pretrained weights; give --init_from"),
    (["--lora_rank", "-1"], r"--lora_rank -1: expected an integer >= 0"),
    (["--lora_rank", "4", "--init_from", "BASE", "--lora_alpha", "0"], "--lora_alpha 0: expected a number > 0"),
    (["--lora_rank", "4", "--init_from", "BASE", "--lora_dropout", "1"], r"--lora_dropout 1.0: expected"),
    (["--lora_rank", "4", "--init_from", "BASE", "--lora_targets", "wq"],
     r"--lora_targets 'wq': matches no module; the Linear modules are: .*attn.c_attn"),
])
def test_bad_lora_flags(data, base, tmp_path, flags, message):
    flags = [str(base) if f == "BASE" else f for f in flags]
    with pytest.raises(BadInput, match=message):
        run(BASE_FLAGS + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "1", "--seq_len", "32",
                          *flags])


# ---- classification


def labelled(path, n=240, seed=0):
    """A JSONL of texts labelled by whether they end in a vowel: learnable at the last token in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    letters = "bcdfghjklmnpqrstvwxzaeiou"
    lines = []
    for _ in range(n):
        text = "".join(letters[i] for i in torch.randint(0, len(letters), (int(torch.randint(3, 12, ())),),
                                                         generator=g))
        lines.append(json.dumps({"text": text, "label": "vowel" if text[-1] in "aeiou" else "consonant"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_classification_trains_reports_val_accuracy_and_transformers_loads_it(tmp_path):
    src = labelled(tmp_path / "texts.jsonl")
    prepare_data.main(["--classify", str(src), "--tokenizer", "bytes", "--out_dir", str(tmp_path), "--name", "cls"])
    flags = BASE_FLAGS + ["--data", str(tmp_path / "cls"), "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                          "--block_size", "64", "--lr", "1e-2", "--warmup_steps", "5", "--eval_iters", "2"]
    model, code = run(flags + ["--out_dir", str(tmp_path / "out"), "--max_steps", "60", "--eval_interval", "30"])
    assert code == 0
    evals = [r for r in rows(tmp_path / "out") if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[-1]["val_accuracy"] >= 0.9, evals
    last = (tmp_path / "out" / "last").resolve()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(last)).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.id2label == {0: "consonant",
                                                                                           1: "vowel"}
    ids = torch.tensor([[98, 99, 97, 256, 256], [100, 101, 102, 103, 111]])   # right-padded with the pad id 256
    import classifier
    with torch.no_grad():
        ours = classifier.pooled_logits(model.eval(), ids, 256)
        assert (hf(ids).logits - ours).abs().max() < 1e-4
    # --resume continues from the classifier's checkpoint (its head included)
    _, code = run(flags + ["--out_dir", str(tmp_path / "out"), "--max_steps", "62", "--eval_interval", "31",
                           "--resume"])
    assert code == 0 and losses(tmp_path / "out")[62] < math.log(2)


def test_classification_with_lora_is_refused(tmp_path, base):
    src = labelled(tmp_path / "texts.jsonl", n=20)
    prepare_data.main(["--classify", str(src), "--tokenizer", "bytes", "--out_dir", str(tmp_path), "--name", "cls"])
    with pytest.raises(BadInput, match="--lora_rank 4 with classification data .*: not supported"):
        run(BASE_FLAGS + ["--data", str(tmp_path / "cls"), "--out_dir", str(tmp_path / "o"), "--init_from",
                          str(base), "--lora_rank", "4", "--max_steps", "1"])


# ---- DPO


def preference_pairs(path, n=48):
    lines = [json.dumps({"prompt": f"item {i}:", "chosen": f" good {i % 7}", "rejected": f" bad {i % 5}"})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lora_rank", ["0", "4"])
def test_dpo_raises_the_reward_margin_and_resumes_exactly(base, tmp_path, lora_rank):
    src = preference_pairs(tmp_path / "pairs.jsonl")
    prepare_data.main(["--dpo_jsonl", str(src), "--model", "gpt2", "--tokenizer", "bytes", "--out_dir",
                       str(tmp_path), "--name", "pairs"])
    common = BASE_FLAGS + ["--init_from", str(base), "--data", str(tmp_path / "pairs"), "--lora_rank", lora_rank,
                           "--lr", "1e-2", "--warmup_steps", "16", "--eval_interval", "8", "--eval_iters", "1",
                           "--dpo_beta", "0.5"]
    run(common + ["--out_dir", str(tmp_path / "full"), "--max_steps", "16"])
    logged = [r for r in rows(tmp_path / "full") if "loss" in r]
    # step 1 runs the policy as the reference: the loss is log 2 and every reward 0 (a frozen copy, or the adapters
    # at B = 0)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and logged[0]["reward_margin"] == 0
    assert logged[-1]["reward_margin"] > 0.05 and logged[-1]["loss"] < math.log(2) - 0.03, logged[-1]
    val = [r for r in rows(tmp_path / "full") if "val_reward_margin" in r]
    assert val[-1]["val_reward_margin"] > val[0]["val_reward_margin"] > 0
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "8"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "16", "--resume"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_dpo_from_scratch_is_refused(tmp_path):
    src = preference_pairs(tmp_path / "pairs.jsonl", n=8)
    prepare_data.main(["--dpo_jsonl", str(src), "--model", "gpt2", "--tokenizer", "bytes", "--out_dir",
                       str(tmp_path), "--name", "pairs"])
    with pytest.raises(BadInput, match="preference pairs .* give --init_from"):
        run(TINY + ["--data", str(tmp_path / "pairs"), "--out_dir", str(tmp_path / "o"), "--max_steps", "1"])


def test_dpo_with_lora_under_torchrun_two_processes_equal_one(base, tmp_path):
    """The same 8 pairs a step, 8 on one process or 4 + 4 on two: equal losses and val figures (the val split's
    sums gathered over both processes' strides)."""
    src = preference_pairs(tmp_path / "pairs.jsonl", n=30)
    prepare_data.main(["--dpo_jsonl", str(src), "--model", "gpt2", "--tokenizer", "bytes", "--out_dir",
                       str(tmp_path), "--name", "pairs"])

    def torchrun(n, batch, out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
               *BASE_FLAGS, "--batch_size", str(batch), "--init_from", str(base), "--data", str(tmp_path / "pairs"),
               "--lora_rank", "4", "--out_dir", str(out), "--max_steps", "4", "--eval_interval", "4",
               "--eval_iters", "1", "--lr", "1e-2", "--device", "cpu"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return losses(out), [r for r in rows(out) if "val_loss" in r][-1]
    (one, one_eval), (two, two_eval) = torchrun(1, 8, tmp_path / "one"), torchrun(2, 4, tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5, atol=1e-7)
    for key in ("val_loss", "val_reward_margin", "val_reward_accuracy"):
        assert two_eval[key] == pytest.approx(one_eval[key], rel=1e-5, abs=1e-7), key
