"""quantize.py: int8 / int4 weight-only quantization of every family, its kernels, generation and save / load.

Tolerances, derived (not tuned). Rounding to the nearest level errs by at most half a step a weight, uniformly:
  - int8: step s = absmax(row) / 127; for a normal row absmax ~ 3.5 sigma (fan-in 32..64), so the error's RMS is
    s / sqrt(12) ~ 0.008 sigma: each Linear's output moves by ~0.8% of its RMS; the bf16 activations the kernels
    take add 2^-9 ~ 0.2% at the input and the output. A tiny model has ~5-9 Linears in series (2 blocks + head),
    adding in quadrature: ~2-3% of the logits' RMS. We allow 2x that: RMS(d logits) <= 0.06 RMS(logits).
  - int4 (group 32): step = (max - min) / 15 over a group, ~4 sigma / 15, RMS error ~0.077 sigma a weight:
    ~8% a Linear, ~20-25% over the model; allowed 2x: 0.5 RMS(logits).
  - the kernels against F.linear with the dequantized weight: only the bf16 casts differ: 2^-8 relative to the
    output's scale in each of input and output, with the sum's growth: 1% of max |y|.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepseek
import gpt2
import llama3
import qwen
import quantize
import sample

TINY = {   # two layers of width 32; deepseek's with MLA and a mixture of experts in its second layer
    "gpt2": (gpt2, gpt2.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32)),
    "llama3": (llama3, llama3.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                     intermediate_size=64, tie_word_embeddings=True)),
    "qwen": (qwen, qwen.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                               head_dim=16, intermediate_size=64, tie_word_embeddings=True)),
    "deepseek": (deepseek, deepseek.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32,
                                           intermediate_size=64, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                           qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                           moe_intermediate_size=16)),
}
TOL = {"int8": 0.06, "int4": 0.5}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family, seed=0):
    torch.manual_seed(seed)
    module, config = TINY[family]
    return module.Model(config).eval()


def rms(t):
    return t.float().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("mode", quantize.MODES)
@pytest.mark.parametrize("family", TINY)
def test_logits_close_to_fp32(family, mode):
    model = tiny(family)
    idx = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        ref = model(idx)[0]
        q = quantize.quantize(copy.deepcopy(model), mode)
        got = q(idx)[0]
    assert any(isinstance(m, (quantize.Int8Linear, quantize.Int4Linear)) for m in q.modules())
    assert not any(type(m) is nn.Linear for n, m in q.named_modules() if n not in q.quantization["kept"])
    assert rms(got - ref) <= TOL[mode] * rms(ref), (rms(got - ref) / rms(ref))


@pytest.mark.parametrize("shape", [(3072, 768), (96, 64), (257, 32)])
@pytest.mark.parametrize("cls", [quantize.Int8Linear, quantize.Int4Linear])
def test_kernel_matches_dequantized(cls, shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    m = cls(linear) if cls is quantize.Int8Linear else cls(linear, 32)
    x = torch.randn(3, 5, shape[1])
    ref = F.linear(x, m.weight, linear.bias)
    assert (m(x) - ref).abs().max() <= 0.01 * ref.abs().max()
    err = (m.weight - linear.weight).abs()   # the rounding bound: half a step a weight
    step = m.scales[:, None] if cls is quantize.Int8Linear else (
        m.scales_and_zeros[..., 0].t().repeat_interleave(32, dim=1))
    assert (err <= step / 2 * 1.001 + 1e-7).all()


@pytest.mark.parametrize("mode", quantize.MODES)
@pytest.mark.parametrize("family", TINY)
def test_cached_generation_is_greedy_argmax_of_full_forward(family, mode):
    """With the KV cache, the quantized model picks what its own full forward, recomputed each step, picks."""
    q = quantize.quantize(tiny(family), mode)
    idx = torch.randint(0, 257, (1, 8))
    cached = torch.stack(list(sample.generate(q, idx, 16, temperature=0)), 1)
    full = torch.stack(list(sample.generate(q, idx, 16, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("mode", quantize.MODES)
@pytest.mark.parametrize("family", TINY)
def test_save_load_round_trip_exact(family, mode, head, tmp_path):
    q = quantize.quantize(tiny(family), mode, head=head)
    quantize.save_quantized(q, tmp_path)
    back = quantize.load_quantized(TINY[family][0], tmp_path)
    assert [type(m) for m in back.modules()] == [type(m) for m in q.modules()]
    assert back.quantization == q.quantization
    idx = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], q(idx)[0])
    if not head and family != "deepseek":   # the unquantized head is still the embedding, one Parameter
        assert back.lm_head.weight is back.get_submodule("wte" if family == "gpt2" else "model.embed_tokens").weight


def test_leaves_kv_b_proj_and_routers_and_bad_mode():
    q = quantize.quantize(tiny("deepseek"), "int8")
    assert type(q.model.layers[0].self_attn.kv_b_proj) is nn.Linear
    assert isinstance(q.model.layers[1].mlp.experts.gate_proj, nn.Parameter)
    with pytest.raises(Exception, match="int3"):
        quantize.quantize(tiny("gpt2"), "int3")
