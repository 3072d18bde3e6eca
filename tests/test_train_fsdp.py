"""train.py's memory savers: activation checkpointing gives the gradients of a plain backward, a model built on the
meta device and drawn in place has the weights' distribution of a normal build, and FSDP2 (torchrun, gloo, two CPU
processes) trains as DDP does, resumes exactly, and writes a checkpoint that one process and transformers read."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import deepseek
import gpt2
import llama3
import qwen
import train
from test_train import ROOT, evals, losses, make_data, run

CONFIGS = {   # tiny, with each family's special parts: tied heads, MoE (experts, routers, DeepSeek's bias), MTP
    gpt2: gpt2.Config(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.1),
    llama3: llama3.Config(vocab_size=300, block_size=32, n_layer=2, dropout=0.1),
    qwen: qwen.Config(vocab_size=300, block_size=32, n_layer=2, n_experts=4, model_type="qwen3_moe", dropout=0.1),
    deepseek: deepseek.Config(vocab_size=300, block_size=32, n_layer=2, mtp_loss_weight=0.3, dropout=0.1),
}
FAMILIES = pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__)
TINY = ["--model", "gpt2", "--seq_len", "32", "--sample_tokens", "0", "--log_interval", "1", "--device", "cpu",
        "--eval_iters", "2", "--threads", "1"]


@FAMILIES
def test_activation_checkpointing_gives_the_same_gradients(module):
    torch.manual_seed(0)
    plain = module.Model(CONFIGS[module]).train()
    checkpointed = copy.deepcopy(plain)
    train.checkpoint_blocks(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())   # the official key names, unchanged
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        torch.manual_seed(2)   # the same dropout masks: checkpoint replays them in the recomputation
        model(idx, idx)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():   # no gradients: the blocks run as they are (eval, the KV cache)
        plain.eval(), checkpointed.eval()
        torch.testing.assert_close(checkpointed(idx)[0], plain(idx)[0], rtol=0, atol=0)


@FAMILIES
def test_meta_init_draws_the_distribution_of_a_normal_init(module):
    torch.manual_seed(0)
    normal = module.Model(CONFIGS[module])
    with torch.device("meta"):
        model = module.Model(CONFIGS[module])
    train.materialize(model, module, torch.device("cpu"))
    head, emb = model.lm_head.weight, (model.wte if module is gpt2 else model.model.embed_tokens).weight
    assert (head is emb) == bool(getattr(CONFIGS[module], "tie_word_embeddings", True))   # tied stays tied
    ours = dict(model.named_parameters())
    for name, a in normal.named_parameters():
        b = ours[name]
        assert b.shape == a.shape and not b.is_meta, name
        if a.std() == 0:   # gains, biases: the constant itself
            assert torch.equal(a, b), name
            continue
        assert abs(b.std().item() / a.std().item() - 1) < 0.1, name
        assert abs(b.mean().item() - a.mean().item()) < 5 * a.std().item() / a.numel() ** 0.5, name
    buffers = dict(model.named_buffers())
    for name, a in normal.named_buffers():   # RoPE's frequencies, DeepSeek's expert bias: equal
        assert torch.equal(buffers[name], a), name


# ---- FSDP under torchrun: two processes, gloo, on the CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "bytes")


def torchrun(flags, out, n=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
           *TINY, *flags, "--out_dir", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """An FSDP run from scratch with activation checkpointing and dropout, 6 steps, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("fsdp") / "a"
    flags = ["--data", str(data), "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
             "--batch_size", "2", "--grad_accum", "2", "--max_steps", "6", "--eval_interval", "3", "--dropout", "0.1",
             "--lr", "1e-2", "--warmup_steps", "2", "--fsdp", "--grad_checkpoint"]
    stdout = torchrun(flags, out)
    return out, flags, stdout


def test_fsdp_equals_ddp_with_the_same_global_batch(data, tmp_path):
    # the same starting weights for both (a from-scratch FSDP init draws per shard): an official-layout checkpoint
    torch.manual_seed(0)
    gpt2.GPT(gpt2.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32)).save_pretrained(tmp_path / "w")
    common = ["--data", str(data), "--init_from", str(tmp_path / "w"), "--batch_size", "2", "--grad_accum", "2",
              "--max_steps", "5", "--eval_interval", "5", "--dropout", "0.1", "--lr", "1e-2", "--warmup_steps", "2"]
    torchrun(common, tmp_path / "ddp")
    torchrun(common + ["--fsdp"], tmp_path / "fsdp")
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == list(range(1, 6))
    np.testing.assert_allclose([fsdp[s] for s in ddp], [ddp[s] for s in ddp], rtol=1e-4, atol=0)
    assert evals(tmp_path / "fsdp")[-1]["val_loss"] == pytest.approx(evals(tmp_path / "ddp")[-1]["val_loss"], rel=1e-4)
    a = gpt2.GPT.from_pretrained(str(tmp_path / "ddp" / "last")).state_dict()
    b = gpt2.GPT.from_pretrained(str(tmp_path / "fsdp" / "last")).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)


def test_fsdp_resume_continues_exactly(fsdp_run, tmp_path):
    out, flags, stdout = fsdp_run
    assert "world 2 (FSDP) | activation checkpointing" in stdout
    # the run's own step-3 checkpoint (kept as the one before `last`), as a crash at step 3 would have left it
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(out / "ckpt-0000003", resumed / "ckpt-0000003")
    shutil.copyfile(out / "metrics.jsonl", resumed / "metrics.jsonl")
    (resumed / "last").symlink_to("ckpt-0000003")
    assert (resumed / "last" / "dcp" / ".metadata").is_file()
    torchrun(flags + ["--resume"], resumed)
    a, b = losses(out), losses(resumed)
    assert sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]   # exact, not approximate
    assert evals(out) == evals(resumed)


def test_fsdp_checkpoint_loads_in_one_process_and_in_transformers(fsdp_run):
    transformers = pytest.importorskip("transformers")
    import torch.distributed.checkpoint as dcp
    out = fsdp_run[0] / "last"
    ours = gpt2.GPT.from_pretrained(str(out)).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-5)
    # the gathered weights are the sharded ones: DCP reads the shards back into one process
    with torch.device("meta"):
        shell = gpt2.GPT(ours.config)
    state = {k: torch.empty_like(v, device="cpu") for k, v in shell.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=out / "dcp")
    for k, v in ours.state_dict().items():
        assert torch.equal(state[k], v), k
    assert torch.load(out / "train_state.pt", weights_only=True)["optimizer"] is None   # it is in dcp/


def test_fsdp_refuses_what_it_cannot_do(data, tmp_path):
    with pytest.raises(train.BadInput, match="--fsdp: shards the model over the processes of torchrun"):
        run(TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--fsdp"])
    with pytest.raises(train.BadInput, match="--fsdp with --dtype float16"):
        train.parse_args(TINY + ["--fsdp", "--dtype", "float16"])
    with pytest.raises(train.BadInput, match="--fsdp with --lora_rank 4"):
        train.parse_args(TINY + ["--fsdp", "--lora_rank", "4", "--init_from", "gpt2"])
    with pytest.raises(train.BadInput, match="--config: grad_checkpoint 'yes': expected true or false"):
        (tmp_path / "c.json").write_text(json.dumps({"grad_checkpoint": "yes"}))
        train.parse_args(TINY + ["--config", str(tmp_path / "c.json")])
