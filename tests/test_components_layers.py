"""components/norms.py, ffn.py, moe.py against torch.nn and transformers."""
import math

import pytest
import torch
import torch.nn.functional as F

from components.attention import Attention
from components.ffn import GLU, MLP, glu_hidden
from components.moe import (MoE, capacity_keep, expert_capacity, noisy_topk, sigmoid_topk, softmax_topk,
                            switch_aux_loss)
from components.norms import LayerNorm, PostNormBlock, PreNormBlock, RMSNorm
from conftest import randomize as _randomize


def randomize(module, seed=0):
    return _randomize(module, seed, scale=0.3)


# -----------------------------------------------------------------------------
# norms


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch(bias):
    ours = randomize(LayerNorm(24, eps=1e-5, bias=bias))
    ref = torch.nn.LayerNorm(24, eps=1e-5, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24) * 4 + 2
    assert (ours(x) - ref(x)).abs().max() < 1e-5


def test_rmsnorm_equals_torch():
    ours = randomize(RMSNorm(24, eps=1e-6))
    ref = torch.nn.RMSNorm(24, eps=1e-6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24) * 4 + 2
    assert (ours(x) - ref(x)).abs().max() < 1e-5
    xb, ours_bf16 = x.bfloat16(), ours.bfloat16()  # bf16 weights and input, float32 statistics inside
    y = ours_bf16(xb)
    assert y.dtype == torch.bfloat16 and (y.float() - ref(xb.float())).abs().max() < 0.05


@pytest.mark.parametrize("norm_first", [True, False])
def test_pre_and_post_norm_blocks_equal_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=norm_first).eval()
    attn, mlp = Attention(32, 4, bias=True), MLP(32, 64, act="gelu")
    block = (PreNormBlock if norm_first else PostNormBlock)(attn, mlp, LayerNorm(32), LayerNorm(32))
    with torch.no_grad():
        for ours, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), ref.self_attn.in_proj_weight.chunk(3)):
            ours.weight.copy_(w)
        for ours, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), ref.self_attn.in_proj_bias.chunk(3)):
            ours.bias.copy_(b)
        attn.o_proj.load_state_dict(ref.self_attn.out_proj.state_dict())
        mlp.c_fc.load_state_dict(ref.linear1.state_dict())
        mlp.c_proj.load_state_dict(ref.linear2.state_dict())
        block.norm1.load_state_dict(randomize(ref.norm1, 1).state_dict())
        block.norm2.load_state_dict(randomize(ref.norm2, 2).state_dict())
    x = torch.randn(2, 7, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    assert (block(x) - ref(x, src_mask=mask, is_causal=True)).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# feed-forward


def test_gelu_mlp_equals_transformers_gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    cfg = GPT2Config(n_embd=32, activation_function="gelu_new", resid_pdrop=0.0)
    ref = randomize(GPT2MLP(128, cfg)).eval()
    ours = MLP(32, 128, act="gelu_tanh")
    with torch.no_grad():  # GPT-2's Conv1D stores weights as (in, out)
        ours.c_fc.weight.copy_(ref.c_fc.weight.t()), ours.c_fc.bias.copy_(ref.c_fc.bias)
        ours.c_proj.weight.copy_(ref.c_proj.weight.t()), ours.c_proj.bias.copy_(ref.c_proj.bias)
    x = torch.randn(2, 5, 32)
    assert (ours(x) - ref(x)).abs().max() < 1e-5


@pytest.mark.parametrize("act,t5_act", [("silu", "silu"), ("gelu", "gelu"), ("relu", "relu")])
def test_glu_variants_equal_transformers_t5_gated_ffn(act, t5_act):
    # T5's DenseGatedActDense is act(wi_0 x) * wi_1 x -> wo: SwiGLU, GeGLU or ReGLU by its activation
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense
    ref = randomize(T5DenseGatedActDense(T5Config(d_model=32, d_ff=48, dense_act_fn=t5_act, dropout_rate=0.0))).eval()
    ours = GLU(32, 48, act=act)
    with torch.no_grad():
        ours.gate_proj.weight.copy_(ref.wi_0.weight)
        ours.up_proj.weight.copy_(ref.wi_1.weight)
        ours.down_proj.weight.copy_(ref.wo.weight)
    x = torch.randn(2, 5, 32)
    assert (ours(x) - ref(x)).abs().max() < 1e-5


def test_swiglu_equals_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    ref = randomize(LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48)))
    ours = GLU(32, 48, act="silu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 32)
    assert (ours(x) - ref(x)).abs().max() < 1e-5


@pytest.mark.parametrize("n_embd", [64, 96, 768])
def test_glu_hidden_matches_mlp_parameter_count(n_embd):
    mlp = sum(p.numel() for p in MLP(n_embd, bias=False).parameters())
    glu = sum(p.numel() for p in GLU(n_embd, glu_hidden(n_embd)).parameters())
    assert abs(glu - mlp) <= 3 * n_embd * 8 / 2  # equal up to rounding the hidden size to a multiple of 8
    with pytest.raises(ValueError, match="act='swish'"):
        GLU(n_embd, act="swish")


# -----------------------------------------------------------------------------
# mixture of experts


def test_router_with_one_expert_equals_dense_mlp():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    for router in ("softmax", "sigmoid", "noisy"):
        moe = MoE(16, 24, n_expert=1, top_k=1, router=router).eval()
        assert (moe(x) - moe.experts[0](x)).abs().max() < 1e-6, router


def _copy_experts(ours, gate_up, down):
    """Fused HF expert tensors (E, 2I, H) gate rows first, (E, H, I) into our list of GLU experts."""
    with torch.no_grad():
        for e, expert in enumerate(ours.experts):
            gate, up = gate_up[e].chunk(2, dim=0)
            expert.gate_proj.weight.copy_(gate), expert.up_proj.weight.copy_(up), expert.down_proj.weight.copy_(down[e])


def test_softmax_topk_moe_equals_transformers_mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    ref = randomize(MixtralSparseMoeBlock(cfg)).eval()
    ours = MoE(16, 24, n_expert=4, top_k=2, router="softmax")
    ours.gate.weight.data.copy_(ref.gate.weight)
    _copy_experts(ours, ref.experts.gate_up_proj, ref.experts.down_proj)
    x = torch.randn(3, 7, 16)
    assert (ours(x) - ref(x)).abs().max() < 1e-5


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_sigmoid_router_shared_experts_equal_transformers_deepseek_v3(n_group, topk_group):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=16, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3,
                           n_shared_experts=2, n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                           routed_scaling_factor=2.5)
    ref = randomize(DeepseekV3MoE(cfg))
    ref.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    ours = MoE(16, 12, n_expert=8, top_k=3, router="sigmoid", n_shared=2, n_group=n_group, topk_group=topk_group,
               routed_scaling=2.5)
    ours.gate.weight.data.copy_(ref.gate.weight)
    ours.expert_bias.copy_(ref.gate.e_score_correction_bias)
    _copy_experts(ours, ref.experts.gate_up_proj, ref.experts.down_proj)
    ours.shared.load_state_dict(ref.shared_experts.state_dict())
    x = torch.randn(3, 7, 16)
    _, ref_w, ref_idx = ref.gate(x)
    w, idx = sigmoid_topk(ours.gate(x.view(-1, 16)), 3, ours.expert_bias, n_group, topk_group, scaling=2.5)
    order, ref_order = idx.sort(-1), ref_idx.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    assert (w.gather(1, order.indices) - ref_w.gather(1, ref_order.indices)).abs().max() < 1e-6
    assert (ours(x) - ref(x)).abs().max() < 1e-5


def test_bias_steers_choice_not_weights_and_update_balances():
    logits = torch.zeros(4, 3)
    w, idx = sigmoid_topk(logits, 1, bias=torch.tensor([0.0, 1.0, 0.0]))
    assert idx.flatten().tolist() == [1] * 4 and torch.allclose(w, torch.ones(4, 1))
    w, _ = sigmoid_topk(logits + torch.tensor([0.0, 2.0, 0.0]), 2, bias=torch.tensor([5.0, 0.0, 0.0]),
                        renormalize=False)
    assert torch.allclose(w, torch.sigmoid(torch.tensor([[0.0, 2.0]])).expand(4, 2))  # weight is s, not s + b
    moe = MoE(8, 8, n_expert=4, top_k=1, router="sigmoid", bias_update_rate=0.1)
    moe(torch.randn(10, 8))
    load = moe.load.float()
    moe.update_bias()
    assert torch.equal(moe.expert_bias, 0.1 * torch.sign(load.mean() - load))  # overloaded experts go down


def test_switch_loss_equals_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits = torch.randn(40, 6)
    for k in (1, 2):
        _, idx = softmax_topk(logits, k)
        expected = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
        assert torch.isclose(switch_aux_loss(logits, idx, 6), expected, rtol=1e-6)


def test_noisy_topk_keeps_k_and_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoE(8, 8, n_expert=5, top_k=2, router="noisy")
    with torch.no_grad():
        moe.w_noise.normal_()
    x = torch.randn(30, 8)
    moe.eval()
    w, idx, logits = moe.route(x)
    assert torch.equal(logits, moe.gate(x))  # eval: no noise
    ref_w = F.softmax(logits.gather(1, idx), dim=-1)  # softmax over the kept logits only
    assert torch.allclose(w, ref_w) and torch.equal(idx, logits.topk(2).indices)
    moe.train()
    assert not torch.equal(moe.route(x)[2], moe.gate(x))
    w, idx = noisy_topk(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    assert idx.tolist() == [[1, 2]] and torch.allclose(w, F.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_capacity_drops_exactly_the_assignments_over_capacity():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(25)])  # (25, 2): distinct experts per token
    capacity = expert_capacity(25, 4, 2, capacity_factor=1.0)  # ceil(25 * 2 / 4) = 13
    keep = capacity_keep(idx, 4, capacity)
    # reference: walk first choices in token order, then second choices, filling each expert up to capacity
    used, expected = [0] * 4, torch.zeros_like(keep)
    for slot in range(2):
        for t in range(25):
            e = idx[t, slot].item()
            expected[t, slot] = used[e] < capacity
            used[e] += 1
    assert torch.equal(keep, expected) and (~keep).any()
    kept_per_expert = torch.bincount(idx[keep], minlength=4)
    assert torch.equal(kept_per_expert, torch.bincount(idx.flatten(), minlength=4).clamp(max=capacity))


def test_moe_with_capacity_zeroes_exactly_the_dropped_tokens():
    torch.manual_seed(0)
    moe = MoE(8, 8, n_expert=2, top_k=1, capacity_factor=0.5)  # capacity = ceil(0.5 * 12 / 2) = 3 per expert
    x = torch.randn(12, 8)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 1.0  # route by the sign of x[:, 0]
    _, idx, _ = moe.route(x)
    keep = capacity_keep(idx, 2, 3).flatten()
    dense = MoE(8, 8, n_expert=2, top_k=1)
    dense.load_state_dict(moe.state_dict())
    y, y_dense = moe(x), dense(x)
    assert (~keep).sum() == 12 - 6 and torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    assert (y[keep] - y_dense[keep]).abs().max() < 1e-6
    assert moe.load.tolist() == [3, 3]


def test_moe_active_parameters():
    moe = MoE(16, 24, n_expert=8, top_k=2, n_shared=1)
    per_expert = 3 * 16 * 24
    assert moe.num_params() == 16 * 8 + 9 * per_expert
    assert moe.num_params(active=True) == 16 * 8 + 3 * per_expert
    with pytest.raises(ValueError, match="top_k=9"):
        MoE(16, 24, n_expert=8, top_k=9)
    with pytest.raises(ValueError, match="n_group=3 must divide n_expert=8"):
        MoE(16, 24, n_expert=8, top_k=2, router="sigmoid", n_group=3)
    assert math.isclose(switch_aux_loss(torch.zeros(8, 4), torch.arange(8).remainder(4)[:, None], 4).item(), 1.0)


def test_top1_router_learns_only_without_renormalization():
    # renormalized top-1 weights are all exactly 1: the model's loss then never reaches the router (Switch keeps p)
    x = torch.randn(20, 8)
    grad = {}
    for renormalize in (False, True):
        torch.manual_seed(0)
        moe = MoE(8, 8, n_expert=4, top_k=1, renormalize=renormalize)
        moe(x).square().sum().backward()
        grad[renormalize] = moe.gate.weight.grad.abs().sum().item()
    assert grad[False] > 1e-3 and grad[True] < 1e-5 * grad[False]  # w / w is 1 up to rounding
