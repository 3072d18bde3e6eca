"""components/positions.py against transformers' rope utilities, sinusoidal and ALiBi implementations."""
import pytest
import torch

from components.attention import attention
from components.positions import (LearnedPositionEmbedding, NoPositionEncoding, SinusoidalPositionEmbedding,
                                  alibi_bias, alibi_slopes, apply_rope, apply_rope_interleaved, rope_cos_sin,
                                  rope_dynamic_ntk_theta, rope_inv_freq, rope_linear_scaled, rope_llama3_scaled,
                                  rope_ntk_aware_theta, rope_yarn, sinusoidal_embedding)

HEAD_DIM, THETA, MAX_POS = 64, 10000.0, 256


def hf_rope(rope_parameters, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, seq_len=None):
    """inv_freq and attention factor from transformers' ROPE_INIT_FUNCTIONS for a Llama config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_position_embeddings,
                      rope_parameters={"rope_theta": THETA, **rope_parameters})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)
    return inv_freq, attention_factor


def close(a, b, rtol=1e-6):
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=0)


# -----------------------------------------------------------------------------
# RoPE


def test_rope_equals_transformers_apply_rotary_pos_emb():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, rope_parameters={"rope_type": "default",
                                                                                          "rope_theta": THETA})
    q, k = torch.randn(2, 2, 10, HEAD_DIM), torch.randn(2, 2, 10, HEAD_DIM)
    pos = torch.arange(5, 15)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos[None])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    c, s = rope_cos_sin(rope_inv_freq(HEAD_DIM, THETA), pos)
    assert (apply_rope(q, c, s) - q_ref).abs().max() < 1e-5
    assert (apply_rope(k, c, s) - k_ref).abs().max() < 1e-5


def test_rope_layouts_equal_up_to_the_even_odd_permutation():
    perm = torch.cat([torch.arange(0, HEAD_DIM, 2), torch.arange(1, HEAD_DIM, 2)])
    x = torch.randn(3, 7, HEAD_DIM)
    c, s = rope_cos_sin(rope_inv_freq(HEAD_DIM), torch.arange(7))
    assert (apply_rope(x[..., perm], c, s) - apply_rope_interleaved(x, c, s)[..., perm]).abs().max() < 1e-6
    assert not torch.allclose(apply_rope(x, c, s), apply_rope_interleaved(x, c, s))  # they do differ unpermuted


def test_rope_interleaved_equals_complex_multiplication():
    # Meta's reference: view pairs as complex numbers and multiply by e^(i * angle)
    x = torch.randn(2, 5, HEAD_DIM, dtype=torch.float64)
    pos = torch.arange(5)
    angle = pos[:, None].double() * rope_inv_freq(HEAD_DIM).double()[None]
    rotation = torch.polar(torch.ones_like(angle), angle)  # e^(i * angle)
    expected = torch.view_as_real(torch.view_as_complex(x.view(2, 5, -1, 2)) * rotation)
    c, s = rope_cos_sin(rope_inv_freq(HEAD_DIM).double(), pos)
    assert (apply_rope_interleaved(x, c.double(), s.double()) - expected.flatten(-2)).abs().max() < 1e-6


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
    inv_freq = rope_inv_freq(HEAD_DIM)

    def score(m, n):
        cq, sq = rope_cos_sin(inv_freq, torch.tensor([m]))
        ck, sk = rope_cos_sin(inv_freq, torch.tensor([n]))
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum()

    assert torch.isclose(score(7, 3), score(104, 100), atol=1e-4)


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_position_interpolation_equals_transformers_linear(factor):
    inv_freq, attention_factor = hf_rope({"rope_type": "linear", "factor": factor})
    assert close(rope_linear_scaled(rope_inv_freq(HEAD_DIM, THETA), factor), inv_freq) and attention_factor == 1.0


@pytest.mark.parametrize("seq_len", [100, 256, 600, 2048])
def test_dynamic_ntk_equals_transformers_dynamic(seq_len):
    inv_freq, _ = hf_rope({"rope_type": "dynamic", "factor": 4.0}, seq_len=seq_len)
    theta = rope_dynamic_ntk_theta(THETA, HEAD_DIM, 4.0, seq_len, MAX_POS)
    assert close(rope_inv_freq(HEAD_DIM, theta), inv_freq, rtol=1e-5)


def test_ntk_aware_equals_transformers_dynamic_at_matching_length():
    # dynamic NTK at length L is static NTK-aware scaling with alpha = factor * L / L_train - (factor - 1)
    inv_freq, _ = hf_rope({"rope_type": "dynamic", "factor": 2.0}, seq_len=4 * MAX_POS)  # alpha = 2 * 4 - 1 = 7
    assert close(rope_inv_freq(HEAD_DIM, rope_ntk_aware_theta(THETA, HEAD_DIM, 7.0)), inv_freq, rtol=1e-5)


@pytest.mark.parametrize("params", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 64},
])
def test_llama3_scaling_equals_transformers(params):
    inv_freq, attention_factor = hf_rope({"rope_type": "llama3", **params}, max_position_embeddings=131072)
    ours = rope_llama3_scaled(rope_inv_freq(HEAD_DIM, THETA), **params)
    assert close(ours, inv_freq) and attention_factor == 1.0
    assert not close(ours, rope_inv_freq(HEAD_DIM, THETA))  # the test would notice a no-op


@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 64},
    {"factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707},
    {"factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
])
def test_yarn_equals_transformers(params):
    inv_freq, attention_factor = hf_rope({"rope_type": "yarn", **params}, max_position_embeddings=65536)
    ours, ours_factor = rope_yarn(HEAD_DIM, THETA, **params)
    assert close(ours, inv_freq) and abs(ours_factor - attention_factor) < 1e-12


def test_yarn_attention_factor_scales_cos_sin_like_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    params = {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=256,
                      rope_parameters=params)
    pos = torch.arange(200)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos[None])
    inv_freq, attention_factor = rope_yarn(HEAD_DIM, THETA, 4.0, 64)
    c, s = rope_cos_sin(inv_freq, pos, attention_factor)
    assert (torch.cat([c, c], -1) - cos[0]).abs().max() < 1e-5 and (torch.cat([s, s], -1) - sin[0]).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# absolute positions and ALiBi


def test_sinusoidal_equals_transformers_distilbert():
    from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings
    expected = _create_sinusoidal_embeddings(50, 32, torch.empty(50, 32))
    assert (sinusoidal_embedding(50, 32) - expected).abs().max() < 1e-6
    assert (sinusoidal_embedding(10, 32, pos=40) - expected[40:]).abs().max() < 1e-6


def test_absolute_position_modules():
    x = torch.randn(2, 6, 16)
    pe = LearnedPositionEmbedding(8, 16)
    assert torch.equal(pe(x, pos=2), x + pe.wpe.weight[2:8])
    with pytest.raises(ValueError, match="beyond the learned table of 8 rows"):
        pe(x, pos=3)
    assert (SinusoidalPositionEmbedding(16)(x) - (x + sinusoidal_embedding(6, 16))).abs().max() < 1e-6
    assert NoPositionEncoding()(x) is x


@pytest.mark.parametrize("n_head", [8, 12, 5])
def test_alibi_slopes_equal_transformers_bloom(n_head):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    # bloom's bias is slope * j (j = key position); at key 1 that is the slope itself
    bloom = build_alibi_tensor(torch.ones(1, 2), n_head, torch.float32)[:, 0, 1]
    assert torch.allclose(alibi_slopes(n_head), bloom, rtol=1e-6, atol=0)


def test_alibi_attention_equals_transformers_bloom_bias():
    # bloom adds slope * j; ours adds -slope * (i - j): they differ by slope * i per row, which softmax ignores
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    q, k, v = torch.randn(1, 6, 9, 8), torch.randn(1, 6, 9, 8), torch.randn(1, 6, 9, 8)
    bloom = build_alibi_tensor(torch.ones(1, 9), 6, torch.float32).view(1, 6, 1, 9)
    expected = attention(q, k, v, mask=bloom, causal=True)
    assert (attention(q, k, v, mask=alibi_bias(6, 9), causal=True) - expected).abs().max() < 1e-6
    last_rows = attention(q[:, :, -3:], k, v, mask=alibi_bias(6, 3, 9), causal=True)
    assert (last_rows - expected[:, :, -3:]).abs().max() < 1e-6
