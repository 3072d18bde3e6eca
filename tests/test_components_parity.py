"""The model files' inline building blocks equal the components they copy, so the copies cannot drift."""
import pytest
import torch

import gpt2
import llama3
import qwen
from components.attention import Attention
from components.ffn import GLU, MLP
from components.moe import MoE, switch_aux_loss
from components.norms import LayerNorm, PreNormBlock, RMSNorm
from components.positions import apply_rope, rope_cos_sin, rope_inv_freq, rope_llama3_scaled, rope_yarn
from conftest import randomize


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -----------------------------------------------------------------------------
# gpt2.py: LayerNorm, GELU-tanh MLP, causal multi-head attention, pre-norm block


GPT2_CFG = gpt2.Config(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=32)


def gpt2_attention_component(attn):
    """components.attention.Attention carrying gpt2.CausalSelfAttention's weights (c_attn is q, k, v side by side)."""
    ours = Attention(GPT2_CFG.n_embd, GPT2_CFG.n_head, bias=True)
    with torch.no_grad():
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), attn.c_attn.weight.chunk(3),
                              attn.c_attn.bias.chunk(3)):
            proj.weight.copy_(w), proj.bias.copy_(b)
        ours.o_proj.load_state_dict(attn.c_proj.state_dict())
    return ours


def test_gpt2_layernorm_equals_component():
    ln = randomize(gpt2.Block(GPT2_CFG)).ln_1
    ours = LayerNorm(GPT2_CFG.n_embd, eps=GPT2_CFG.layer_norm_epsilon)
    ours.load_state_dict(ln.state_dict())
    x = torch.randn(2, 5, GPT2_CFG.n_embd) * 3
    assert (ln(x) - ours(x)).abs().max() < 1e-5


def test_gpt2_mlp_equals_component():
    mlp = randomize(gpt2.MLP(GPT2_CFG))
    ours = MLP(GPT2_CFG.n_embd, act="gelu_tanh")
    ours.load_state_dict(mlp.state_dict())
    x = torch.randn(2, 5, GPT2_CFG.n_embd)
    assert (mlp(x) - ours(x)).abs().max() < 1e-5


def test_gpt2_attention_equals_component_with_and_without_cache():
    attn = randomize(gpt2.CausalSelfAttention(GPT2_CFG)).eval()
    ours = gpt2_attention_component(attn)
    x = torch.randn(2, 9, GPT2_CFG.n_embd)
    full = ours(x)
    assert (attn(x) - full).abs().max() < 1e-5
    cache = gpt2.KVCache(2, GPT2_CFG.n_head, 16, GPT2_CFG.n_embd // GPT2_CFG.n_head)
    chunks = [attn(x[:, :4], cache, 0), attn(x[:, 4:7], cache, 4), attn(x[:, 7:8], cache, 7), attn(x[:, 8:], cache, 8)]
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


def test_gpt2_block_equals_pre_norm_component_block():
    block = randomize(gpt2.Block(GPT2_CFG)).eval()
    ours = PreNormBlock(gpt2_attention_component(block.attn), MLP(GPT2_CFG.n_embd, act="gelu_tanh"),
                        LayerNorm(GPT2_CFG.n_embd), LayerNorm(GPT2_CFG.n_embd))
    ours.mlp.load_state_dict(block.mlp.state_dict())
    ours.norm1.load_state_dict(block.ln_1.state_dict())
    ours.norm2.load_state_dict(block.ln_2.state_dict())
    x = torch.randn(2, 9, GPT2_CFG.n_embd)
    assert (block(x) - ours(x)).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# llama3.py: RMSNorm, RoPE (plain and Llama 3.1-scaled), GQA attention, SwiGLU, pre-norm block


LLAMA_CFG = llama3.Config(vocab_size=64, block_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64,
                          intermediate_size=96, rope_theta=500000.0)


def llama_attention_component(attn, cfg=LLAMA_CFG):
    ours = Attention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, head_dim=cfg.head_dim)
    ours.load_state_dict(attn.state_dict())
    return ours


def test_llama3_rmsnorm_equals_component():
    norm = randomize(llama3.RMSNorm(64, 1e-5))
    ours = RMSNorm(64, eps=1e-5)
    ours.load_state_dict(norm.state_dict())
    x = torch.randn(2, 5, 64) * 3
    assert (norm(x) - ours(x)).abs().max() < 1e-5


@pytest.mark.parametrize("scaling", [None, dict(rope_scale_factor=8.0), dict(rope_scale_factor=32.0),
                                     dict(rope_scale_factor=4.0, rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                                          rope_original_context=64)])
def test_llama3_rope_frequencies_equal_component(scaling):
    cfg = llama3.Config(n_embd=256, n_head=2, n_kv_head=2, **(scaling or {}))  # head_dim 128, as the real models
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    if scaling:
        inv_freq = rope_llama3_scaled(inv_freq, cfg.rope_scale_factor, cfg.rope_low_freq_factor,
                                      cfg.rope_high_freq_factor, cfg.rope_original_context)
    assert torch.allclose(llama3.rope_frequencies(cfg), inv_freq, rtol=1e-6, atol=0)


def test_llama3_rotary_embedding_equals_component():
    model = llama3.Llama(llama3.Config(vocab_size=64, n_layer=1, n_embd=64, n_head=2, n_kv_head=1,
                                       rope_scale_factor=8.0, rope_original_context=32))
    cos, sin = model.rope(5, 11, torch.float32)  # positions 5..15, (T, hd) in the rotate-half layout
    c, s = rope_cos_sin(model.inv_freq, torch.arange(5, 16))
    x = torch.randn(2, 2, 11, 32)
    assert (llama3.apply_rope(x, cos, sin) - apply_rope(x, c, s)).abs().max() < 1e-5


def test_llama3_gqa_attention_equals_component_with_and_without_cache():
    model = randomize(llama3.Llama(LLAMA_CFG)).eval()
    attn = model.model.layers[0].self_attn
    ours = llama_attention_component(attn)
    x = torch.randn(2, 10, 64)
    cos, sin = model.rope(0, 10, torch.float32)
    full = ours(x, rope=rope_cos_sin(model.inv_freq, torch.arange(10)))
    assert (attn(x, cos, sin) - full).abs().max() < 1e-5
    cache = llama3.KVCache(2, LLAMA_CFG.n_kv_head, 16, LLAMA_CFG.head_dim)
    chunks = []
    for start, end in ((0, 4), (4, 7), (7, 8), (8, 10)):
        c, s = model.rope(start, end - start, torch.float32)
        chunks.append(attn(x[:, start:end], c, s, cache, start))
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


def test_llama3_swiglu_equals_component():
    mlp = randomize(llama3.MLP(LLAMA_CFG))
    ours = GLU(64, 96, act="silu")
    ours.load_state_dict(mlp.state_dict())
    x = torch.randn(2, 5, 64)
    assert (mlp(x) - ours(x)).abs().max() < 1e-5


def test_llama3_block_equals_pre_norm_component_block():
    model = randomize(llama3.Llama(LLAMA_CFG)).eval()
    block = model.model.layers[0]
    ours = PreNormBlock(llama_attention_component(block.self_attn), GLU(64, 96), RMSNorm(64, 1e-5), RMSNorm(64, 1e-5))
    ours.mlp.load_state_dict(block.mlp.state_dict())
    ours.norm1.load_state_dict(block.input_layernorm.state_dict())
    ours.norm2.load_state_dict(block.post_attention_layernorm.state_dict())
    x = torch.randn(2, 9, 64)
    cos, sin = model.rope(0, 9, torch.float32)
    assert (block(x, cos, sin) - ours(x, rope=rope_cos_sin(model.inv_freq, torch.arange(9)))).abs().max() < 1e-5



# -----------------------------------------------------------------------------
# qwen.py: what it adds to llama3.py's blocks (those are compared above): YaRN, QK-norm, the mixture of experts


@pytest.mark.parametrize("yarn", [dict(rope_scale_factor=4.0, rope_original_context=32768),
                                  dict(rope_scale_factor=2.0, rope_original_context=64, rope_beta_fast=8.0,
                                       rope_beta_slow=2.0)])
def test_qwen_yarn_frequencies_equal_component(yarn):
    cfg = qwen.Config(n_embd=256, n_head=2, n_kv_head=2, head_dim=128, rope_theta=1e6, **yarn)
    inv_freq, factor = qwen.rope_frequencies(cfg)
    ref, ref_factor = rope_yarn(128, 1e6, cfg.rope_scale_factor, cfg.rope_original_context, cfg.rope_beta_fast,
                                cfg.rope_beta_slow)
    assert torch.allclose(inv_freq, ref, rtol=1e-6, atol=0) and factor == pytest.approx(ref_factor, rel=1e-12)


def test_qwen_qk_norm_is_the_component_rmsnorm_per_head():
    attn = randomize(qwen.Attention(qwen.Config(n_embd=64, n_head=4, n_kv_head=2, head_dim=16)))
    ours = RMSNorm(16, eps=1e-6)
    ours.load_state_dict(attn.q_norm.state_dict())
    q = torch.randn(2, 5, 4, 16) * 3   # (B, T, nh, hd): normalized over each head's hd
    assert (attn.q_norm(q) - ours(q)).abs().max() < 1e-5


@pytest.mark.parametrize("renormalize", [True, False])
def test_qwen_moe_equals_component(renormalize):
    cfg = qwen.Config(n_embd=32, n_head=2, n_kv_head=1, n_experts=8, n_experts_per_tok=3, moe_intermediate_size=24,
                      norm_topk_prob=renormalize)
    moe = randomize(qwen.MoE(cfg))
    ours = MoE(32, 24, n_expert=8, top_k=3, router="softmax", renormalize=renormalize)
    with torch.no_grad():
        ours.gate.weight.copy_(moe.gate.weight)
        for e, expert in enumerate(ours.experts):   # qwen.py stacks the experts: (E, out, in)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(expert, name).weight.copy_(moe.experts[name][e])
    x = torch.randn(2, 40, 32)
    assert (moe(x) - ours(x)).abs().max() < 1e-5
    assert torch.equal(moe.load, ours.load)


def test_qwen_balancing_loss_is_the_component_switch_loss():
    """Over two MoE layers: E sum_i f_i P_i of all their tokens together (transformers' load_balancing_loss_func)."""
    model = randomize(qwen.Qwen(qwen.Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, n_experts=8,
                                            n_experts_per_tok=3, moe_intermediate_size=24)))
    inputs = []
    for m in model.moe:
        m.register_forward_hook(lambda module, args, out: inputs.append(args[0].flatten(0, 1)))
    model(torch.randint(0, 64, (2, 40)))
    logits = torch.cat([m.gate(x) for m, x in zip(model.moe, inputs)])   # (2 layers * N, E)
    idx = logits.float().softmax(-1).topk(3, dim=-1).indices
    assert model.aux_loss == pytest.approx(switch_aux_loss(logits, idx, 8).item(), rel=1e-5)
