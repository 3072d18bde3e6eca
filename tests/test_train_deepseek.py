"""train.py with deepseek.py: the MoE default trains with V3's loss-free balancing and the MTP objective, the
load and the MTP loss are logged, and the checkpoint is what transformers' DeepseekV3ForCausalLM loads."""
import json

import pytest
import torch

from test_train import losses, make_data, run
from test_train_qwen import hf_logits, rows

transformers = pytest.importorskip("transformers")
deepseek = pytest.importorskip("deepseek")

TINY = ["--model", "deepseek", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--q_lora_rank", "16",
        "--kv_lora_rank", "16", "--qk_nope_head_dim", "8", "--qk_rope_head_dim", "8", "--v_head_dim", "8",
        "--intermediate_size", "64", "--moe_intermediate_size", "16", "--n_routed_experts", "4",
        "--n_experts_per_tok", "2", "--block_size", "64", "--seq_len", "32", "--batch_size", "8",
        "--sample_tokens", "0", "--log_interval", "5", "--threads", "1", "--lr", "3e-3", "--warmup_steps", "5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "bytes")


def test_moe_with_mtp_trains_and_transformers_loads_it(data, tmp_path, capsys):
    model, code = run(TINY + ["--data", str(data), "--out_dir", str(tmp_path), "--max_steps", "30",
                              "--eval_interval", "30", "--eval_iters", "2", "--mtp_loss_weight", "0.3",
                              "--bias_update_rate", "0.01"])
    out = capsys.readouterr().out
    curve = losses(tmp_path)
    assert code == 0 and curve[30] < curve[5] - 0.5, curve
    assert "| expert_load_cv " in out and "| mtp_loss " in out
    logged = [r for r in rows(tmp_path) if "loss" in r]
    assert logged[-1]["mtp_loss"] < logged[0]["mtp_loss"]
    bias = [b.mlp.gate.e_score_correction_bias for b in model.model.layers if hasattr(b.mlp, "experts")]
    assert bias and all(b.abs().max() > 0 for b in bias)   # the balancing step moved it
    assert json.loads((tmp_path / "last" / "config.json").read_text())["model_type"] == "deepseek_v3"
    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(idx)[0]
    assert (hf_logits(tmp_path / "last", idx) - ours).abs().max() < 1e-4


def test_resume_with_the_balancing_bias_is_exact(data, tmp_path):
    common = TINY + ["--data", str(data), "--eval_interval", "10", "--eval_iters", "1", "--log_interval", "1",
                     "--warmup_steps", "20", "--bias_update_rate", "0.01"]
    run(common + ["--out_dir", str(tmp_path / "full"), "--max_steps", "20"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "10"])
    run(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "20", "--resume"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
