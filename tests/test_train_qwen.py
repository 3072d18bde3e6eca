"""train.py with qwen.py: the dense default and a mixture of experts train, the experts' load is logged, and the
checkpoints are what transformers' Qwen3 classes load."""
import json
import math

import pytest
import torch

import train
from test_train import losses, make_data, run

transformers = pytest.importorskip("transformers")
qwen = pytest.importorskip("qwen")

TINY = ["--model", "qwen", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32",
        "--head_dim", "16", "--intermediate_size", "64", "--block_size", "64", "--seq_len", "32", "--batch_size", "8",
        "--sample_tokens", "0", "--log_interval", "5", "--threads", "1", "--lr", "3e-3", "--warmup_steps", "5"]
MOE = ["--n_experts", "4", "--n_experts_per_tok", "2", "--moe_intermediate_size", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "bytes")


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def hf_logits(directory, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    with torch.no_grad():
        return model.eval()(idx).logits


def test_dense_default_trains_and_transformers_loads_it(data, tmp_path):
    model, code = run(TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "30",
                              "--eval_interval", "30", "--eval_iters", "2"])
    curve = losses(tmp_path)
    assert code == 0 and curve[30] < curve[5] - 0.5, curve
    assert model.expert_load() is None and "expert_load_cv" not in rows(tmp_path)[0]
    config = json.loads((tmp_path / "last" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(idx)[0]
    assert (hf_logits(tmp_path / "last", idx) - ours).abs().max() < 1e-4


def test_moe_trains_logs_the_experts_load_and_transformers_loads_it(data, tmp_path, capsys):
    model, code = run(TINY + MOE + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "30",
                                    "--eval_interval", "30", "--eval_iters", "2", "--router_aux_loss_coef", "0.01"])
    out = capsys.readouterr().out
    curve = losses(tmp_path)
    assert code == 0 and curve[30] < curve[5] - 0.5, curve
    assert "active per token" in out and "| expert_load_cv " in out and "| aux_loss " in out
    logged = [r for r in rows(tmp_path) if "loss" in r]
    assert all(0 <= r["expert_load_cv"] <= r["expert_load_cv_max"] <= math.sqrt(4 / 2 - 1) for r in logged)
    assert all(r["aux_loss"] > 0 for r in logged)
    config = json.loads((tmp_path / "last" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(idx)[0]
    assert (hf_logits(tmp_path / "last", idx) - ours).abs().max() < 1e-4


def test_resume_of_a_moe_run_is_exact(data, tmp_path):
    # warmup over all 20 steps: the learning rate of a step then does not depend on --max_steps
    common = TINY + MOE + ["--data", str(data), "--eval_interval", "10", "--eval_iters", "1", "--log_interval", "1",
                           "--warmup_steps", "20"]
    run(common + ["--out_dir", str(tmp_path / "full"), "--max_steps", "20"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "10"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "20", "--resume"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


@pytest.mark.parametrize("tokens,cv,worst", [
    ([[5.0, 5.0, 5.0, 5.0]], 0.0, 0.0),                                # even
    ([[8.0, 0.0, 0.0, 0.0]], math.sqrt(3), math.sqrt(3)),              # all to 1 of 4 experts: sqrt(E / k - 1)
    ([[8.0, 8.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]], 0.5, 1.0),          # layer CVs 1 and 0: mean 0.5, worst 1
])
def test_moe_metrics_are_the_coefficient_of_variation(tokens, cv, worst):
    got = train.moe_metrics(torch.tensor(tokens), object(), ddp=False)
    assert got == {"expert_load_cv": pytest.approx(cv), "expert_load_cv_max": pytest.approx(worst)}
    assert train.moe_metrics(None, object(), ddp=False) == {}


@pytest.mark.parametrize("flags,message", [
    (["--n_experts", "-1"], "--n_experts -1: expected a number >= 0"),
    (["--router_aux_loss_coef", "-0.1"], "--router_aux_loss_coef -0.1: expected a number >= 0"),
    (["--mlp_only_layers", "[0, -1]"], "--mlp_only_layers -1: expected a number >= 0"),
])
def test_moe_flags_are_checked(data, tmp_path, flags, message):
    with pytest.raises(train.BadInput, match=message):
        train.parse_args(TINY + ["--data", str(data), "--out_dir", str(tmp_path)] + flags)


def test_init_from_official_qwen2_weights_fine_tunes_them(data, tmp_path):
    """--init_from a Qwen2.5-layout checkpoint written by transformers: training starts from those weights."""
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path / "base")
    idx = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    base = hf_logits(tmp_path / "base", idx)
    args = ["--model", "qwen", "--init_from", str(tmp_path / "base"), "--data", str(data), "--out_dir",
            str(tmp_path / "out"), "--seq_len", "32", "--batch_size", "8", "--max_steps", "20", "--eval_interval", "20",
            "--eval_iters", "1", "--lr", "3e-3", "--warmup_steps", "2", "--sample_tokens", "0", "--log_interval", "1",
            "--threads", "1"]
    model, code = run(args)
    curve = losses(tmp_path / "out")
    assert code == 0 and curve[20] < curve[1]
    with torch.no_grad():
        start = qwen.Qwen.from_pretrained(str(tmp_path / "base")).eval()(idx)[0]
    assert (start - base).abs().max() < 1e-4   # what training started from is transformers' model
    assert json.loads((tmp_path / "out" / "last" / "config.json").read_text())["model_type"] == "qwen2"
    assert (hf_logits(tmp_path / "out" / "last", idx) - model.eval()(idx)[0].detach()).abs().max() < 1e-4
    with pytest.raises(train.BadInput, match=r"cannot change \['n_layer'\] of pretrained weights"):
        run(args + ["--n_layer", "3", "--out_dir", str(tmp_path / "other")])
