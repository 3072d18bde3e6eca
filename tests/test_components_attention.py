"""components/attention.py, mla.py, flash.py against torch's F.scaled_dot_product_attention and transformers."""
import pytest
import torch
import torch.nn.functional as F

from components.attention import (Attention, RollingKVCache, SparseAttention, attention, dilated_window_attention,
                                  repeat_kv, ring_attention, sink_mask, sliding_window_mask, sparse_attention,
                                  topk_mask)
from components.flash import flash_attention
from components.mla import MLA, MLACache
from components.positions import rope_cos_sin, rope_inv_freq


def qkv(B=2, nh=3, T=24, hs=8, Tq=None, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T if Tq is None else Tq, hs, generator=g)
    k, v = torch.randn(B, nh, T, hs, generator=g), torch.randn(B, nh, T, hs, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def loop_mask(T, allowed):
    """A (T, T) bool mask built one entry at a time from a predicate: the reference for the vectorized masks."""
    return torch.tensor([[allowed(i, j) for j in range(T)] for i in range(T)])


def hf_causal_mask(T):
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


# -----------------------------------------------------------------------------
# scaled dot-product attention


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_sdpa(causal):
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (attention(q, k, v, causal=causal) - expected).abs().max() < 1e-6


def test_attention_masks_equal_sdpa():
    q, k, v = qkv(T=16)
    bool_mask = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.7
    bool_mask[..., 0] = True  # every row keeps a key
    bias = torch.randn(3, 16, 16)
    for mask in (bool_mask, bias):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert (attention(q, k, v, mask=mask) - expected).abs().max() < 1e-6


def test_causal_decoding_rows_equal_last_rows_of_full():
    # queries that are the last 5 of 24 positions: bottom-right causal alignment, as decoding after a cache needs
    q, k, v = qkv(T=24)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (attention(q[:, :, -5:], k, v, causal=True) - full[:, :, -5:]).abs().max() < 1e-6
    with pytest.raises(ValueError, match="Tq=24 > Tk=5"):
        attention(q, k[:, :, :5], v[:, :, :5], causal=True)


def _gqa_reference(attn, x):
    """The same projections, attention by F.scaled_dot_product_attention with enable_gqa."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, -1).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, -1).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, -1).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_equals_sdpa_enable_gqa(n_kv_head):
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv_head)
    x = torch.randn(2, 10, 32)
    assert (attn(x) - _gqa_reference(attn, x)).abs().max() < 1e-6


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv_head):
    # MQA (one KV head) and GQA are MHA whose KV heads are copies within each group
    torch.manual_seed(0)
    gqa, mha = Attention(32, 4, n_kv_head), Attention(32, 4, 4)
    rep = 4 // n_kv_head
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(n_kv_head, 1, 8, 32).expand(n_kv_head, rep, 8, 32)
            getattr(mha, name).weight.copy_(w.reshape(32, 32))
    x = torch.randn(2, 10, 32)
    assert (gqa(x) - mha(x)).abs().max() < 1e-6


def test_mha_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = Attention(32, 4, bias=True)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)
    x = torch.randn(2, 10, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    expected = ref(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert (ours(x) - expected).abs().max() < 1e-6


def _copy_projections(ours, ref):
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(ref, name).weight.copy_(getattr(ours, name).weight)


def test_gqa_with_rope_equals_transformers_llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ours, ref = Attention(64, 4, 2), LlamaAttention(cfg, layer_idx=0)
    _copy_projections(ours, ref)
    x, pos = torch.randn(2, 12, 64), torch.arange(3, 15)
    expected = ref(x, LlamaRotaryEmbedding(cfg)(x, pos[None]), hf_causal_mask(12))[0]
    got = ours(x, rope=rope_cos_sin(rope_inv_freq(16, 500000.0), pos))
    assert (got - expected).abs().max() < 1e-5


def test_qk_norm_equals_transformers_qwen3_attention():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding
    cfg = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ours, ref = Attention(64, 4, 2, qk_norm=True), Qwen3Attention(cfg, layer_idx=0)
    _copy_projections(ours, ref)
    with torch.no_grad():
        for norm in ("q_norm", "k_norm"):
            getattr(ours, norm).weight.copy_(torch.rand(16) + 0.5)
            getattr(ref, norm).weight.copy_(getattr(ours, norm).weight)
    x, pos = torch.randn(2, 12, 64), torch.arange(12)
    expected = ref(x, Qwen3RotaryEmbedding(cfg)(x, pos[None]), hf_causal_mask(12))[0]
    got = ours(x, rope=rope_cos_sin(rope_inv_freq(16, cfg.rope_parameters["rope_theta"]), pos))
    assert (got - expected).abs().max() < 1e-5


def test_repeat_kv_equals_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))


# -----------------------------------------------------------------------------
# local windows


def test_window_at_least_T_equals_full_causal():
    q, k, v = qkv(T=20)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for window in (20, 64):
        assert (attention(q, k, v, mask=sliding_window_mask(20, window)) - full).abs().max() < 1e-6


@pytest.mark.parametrize("window,dilation", [(4, 1), (3, 2), (5, 3), (1, 4)])
def test_window_masks_equal_definition(window, dilation):
    expected = loop_mask(19, lambda i, j: 0 <= i - j < window * dilation and (i - j) % dilation == 0)
    assert torch.equal(sliding_window_mask(19, window, dilation), expected)
    expected = loop_mask(19, lambda i, j: j <= i and (j < 2 or i - j < window))
    assert torch.equal(sink_mask(19, window, n_sink=2), expected)


@pytest.mark.parametrize("window,dilation", [(4, 1), (3, 2), (5, 3)])
def test_dilated_window_attention_equals_masked_sdpa(window, dilation):
    q, k, v = qkv(T=19)  # 19: not a multiple of the dilation, exercises the padding
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(19, window, dilation))
    assert (dilated_window_attention(q, k, v, window, dilation) - expected).abs().max() < 1e-6


def test_dilation_one_equals_plain_window():
    q, k, v = qkv(T=20)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=loop_mask(20, lambda i, j: 0 <= i - j < 6))
    assert (dilated_window_attention(q, k, v, 6, 1) - plain).abs().max() < 1e-6


@pytest.mark.parametrize("window,n_sink", [(5, 0), (5, 2), (1, 3), (30, 0)])
def test_rolling_cache_decoding_equals_banded_mask(window, n_sink):
    q, k, v = qkv(B=2, nh=2, T=23, hs=8)
    mask = loop_mask(23, lambda i, j: j <= i and (i - j < window or j < n_sink))
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    cache = RollingKVCache(2, 2, 8, window, n_sink)
    for t in range(23):
        keys, values = cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert keys.size(2) == min(t + 1, window + n_sink)  # the cache never holds more than window + sinks
        step = attention(q[:, :, t:t + 1], keys, values)
        assert (step[:, :, 0] - full[:, :, t]).abs().max() < 1e-6, t


# -----------------------------------------------------------------------------
# ring and flash attention: exact, forward and backward


def _forward_backward(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out, generator=torch.Generator().manual_seed(9)))
    return [out, *grads]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_chunks", [1, 4])
def test_ring_attention_equals_full(causal, n_chunks):
    q, k, v = qkv(T=32, requires_grad=True)
    got = _forward_backward(lambda *a: ring_attention(*a, n_chunks=n_chunks, causal=causal), q, k, v)
    ref = _forward_backward(lambda *a: F.scaled_dot_product_attention(*a, is_causal=causal), q, k, v)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,block", [(64, 16), (50, 16), (7, 32)])
def test_flash_attention_equals_sdpa(causal, T, block):
    q, k, v = qkv(T=T, requires_grad=True)
    got = _forward_backward(lambda *a: flash_attention(*a, causal=causal, block_size=block), q, k, v)
    ref = _forward_backward(lambda *a: F.scaled_dot_product_attention(*a, is_causal=causal), q, k, v)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-5


def test_flash_attention_decoding_alignment():
    # fewer queries than keys: the queries are the last positions, as after a KV cache
    q, k, v = qkv(T=40, Tq=9, requires_grad=True)
    mask = loop_mask(40, lambda i, j: j <= i)[-9:]
    got = _forward_backward(lambda *a: flash_attention(*a, causal=True, block_size=8), q, k, v)
    ref = _forward_backward(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=mask), q, k, v)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-5


def test_flash_attention_rejects_bad_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flash_attention expects"):
        flash_attention(q[0], k[0], v[0])


# -----------------------------------------------------------------------------
# multi-head latent attention


def _mla_pair(q_lora_rank):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                           kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                           rope_interleave=True, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = DeepseekV3Attention(cfg, layer_idx=0)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    ours = MLA(64, 4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
               q_lora_rank=q_lora_rank)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return cfg, ref, ours


@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_mla_naive_equals_transformers_deepseek_v3(q_lora_rank):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    cfg, ref, ours = _mla_pair(q_lora_rank)
    x, pos = torch.randn(2, 11, 64), torch.arange(11)
    expected = ref(x, DeepseekV3RotaryEmbedding(cfg)(x, pos[None]), hf_causal_mask(11))[0]
    rope = rope_cos_sin(rope_inv_freq(8, cfg.rope_parameters["rope_theta"]), pos)
    assert (ours(x, rope) - expected).abs().max() < 1e-5


def test_mla_absorbed_equals_naive_and_decodes_from_latent_cache():
    _, _, mla = _mla_pair(20)
    x, pos = torch.randn(2, 11, 64), torch.arange(11)
    rope = rope_cos_sin(rope_inv_freq(8), pos)
    naive = mla(x, rope)
    assert (mla(x, rope, absorbed=True) - naive).abs().max() < 1e-5
    cache = MLACache()
    first = mla(x[:, :4], rope_cos_sin(rope_inv_freq(8), pos[:4]), absorbed=True, cache=cache)  # prefill
    steps = [mla(x[:, t:t + 1], rope_cos_sin(rope_inv_freq(8), pos[t:t + 1]), absorbed=True, cache=cache)
             for t in range(4, 11)]
    assert (torch.cat([first, *steps], dim=1) - naive).abs().max() < 1e-5
    assert cache.c_kv.shape == (2, 11, 24)  # only the latent and the rotary key are cached
    assert mla.kv_bytes_per_token(2) == (24 + 8) * 2 and mla.kv_bytes_per_token(2, absorbed=False) == 4 * 36 * 2


# -----------------------------------------------------------------------------
# DeepSeek sparse attention


def test_topk_mask_selects_the_topk_past_keys():
    scores = torch.randn(2, 9, 9).masked_fill(~loop_mask(9, lambda i, j: j <= i), float("-inf"))
    mask = topk_mask(scores, 3)[:, 0]
    for b in range(2):
        for t in range(9):
            expected = sorted(range(t + 1), key=lambda s: -scores[b, t, s].item())[:3]
            assert mask[b, t].nonzero().flatten().tolist() == sorted(expected)


def test_sparse_attention_with_topk_at_least_T_equals_causal():
    q, k, v = qkv(T=12)
    scores = torch.randn(2, 12, 12).masked_fill(~loop_mask(12, lambda i, j: j <= i), float("-inf"))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (sparse_attention(q, k, v, scores, topk=12) - full).abs().max() < 1e-6
    assert (sparse_attention(q, k, v, scores, topk=50) - full).abs().max() < 1e-6


def test_sparse_attention_gather_equals_masked_sdpa():
    q, k, v = qkv(T=16)
    scores = torch.randn(2, 16, 16).masked_fill(~loop_mask(16, lambda i, j: j <= i), float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=topk_mask(scores, 5))
    assert (sparse_attention(q, k, v, scores, topk=5) - expected).abs().max() < 1e-6
    k1, v1 = k[:, :1], v[:, :1]  # one KV head shared by all query heads (MQA), as DSA runs it
    expected = F.scaled_dot_product_attention(q, k1, v1, attn_mask=topk_mask(scores, 5), enable_gqa=True)
    assert (sparse_attention(q, k1, v1, scores, topk=5) - expected).abs().max() < 1e-6


def test_sparse_attention_module_trains_its_indexer():
    torch.manual_seed(0)
    dsa = SparseAttention(32, 4, topk=4)
    x = torch.randn(2, 10, 32)
    y = dsa(x)
    assert y.shape == x.shape and torch.isfinite(dsa.indexer_loss) and dsa.indexer_loss >= 0
    (y.square().mean() + dsa.indexer_loss).backward()
    assert dsa.indexer.wq.weight.grad.abs().sum() > 0  # the indexer learns only through its own loss
    dense = SparseAttention(32, 4, topk=10)
    dense.load_state_dict(dsa.state_dict())
    assert (dense(x) - dsa.attn(x)).abs().max() < 1e-6  # top-k >= T is ordinary causal attention
