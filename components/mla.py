"""
Multi-head latent attention (MLA), DeepSeek-V2 (2024), section 2.1; used unchanged in DeepSeek-V3.

Keys and values are not cached per head. Each token is compressed to one latent c_kv of kv_lora_rank numbers,
from which every head's key and value are re-expanded:
    c_kv = RMSNorm(W_dkv x)                       (kv_lora_rank,)      <- cached
    k_h = W_uk[h] c_kv,   v_h = W_uv[h] c_kv      (d_nope,), (d_v,)   per head
RoPE cannot go through W_uk (a rotation between W_uk and c_kv would depend on the position), so a small
"decoupled" rotary part is added: one k_rope = RoPE(W_kr x) shared by all heads (cached too) and a per-head
q_rope. The score of head h is
    q_nope_h . k_h + q_rope_h . k_rope,  scaled by 1/sqrt(d_nope + d_rope).
Cache per token: kv_lora_rank + d_rope numbers (576 in DeepSeek-V3) against 2 * n_head * head_dim for MHA
(32768 for 128 heads of 128).

Two equal ways to compute it:
    naive     expand k_h and v_h for every cached token, then ordinary attention
    absorbed  fold W_uk into the query and W_uv into the output (matrix associativity):
                  q_nope_h . (W_uk[h] c) = (W_uk[h]^T q_nope_h) . c
                  sum_s p_s W_uv[h] c_s = W_uv[h] (sum_s p_s c_s)
              so attention runs directly over the cached latents, like MQA with one kv_lora_rank-wide head.
              That is what makes decoding cheap: nothing per head is ever rebuilt from the cache.
Parameter names follow the official checkpoints (q_a_proj, kv_a_proj_with_mqa, kv_b_proj, ...).
RoPE here is the interleaved form, as DeepSeek's weights expect.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.attention import causal_mask
from components.norms import RMSNorm
from components.positions import apply_rope_interleaved


class MLACache:
    """The latent cache: c_kv (B, T, kv_lora_rank) and k_rope (B, T, d_rope), grown one call at a time."""

    def __init__(self):
        self.c_kv, self.k_rope = None, None

    def append(self, c_kv, k_rope):
        if self.c_kv is not None:
            c_kv, k_rope = torch.cat([self.c_kv, c_kv], dim=1), torch.cat([self.k_rope, k_rope], dim=1)
        self.c_kv, self.k_rope = c_kv, k_rope
        return c_kv, k_rope


class MLA(nn.Module):
    """
    forward(x, rope=(cos, sin), absorbed=False, cache=None): rope tables (T, d_rope / 2) for the positions of x;
    with an MLACache, x holds the next tokens and attends to everything cached before them.
    q_lora_rank=None projects the query directly (DeepSeek-V2-Lite); otherwise through its own low-rank latent.
    """

    def __init__(self, n_embd, n_head, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                 q_lora_rank=None, norm_eps=1e-6):
        super().__init__()
        self.n_head, self.kv_lora_rank = n_head, kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(n_embd, n_head * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(n_embd, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_head * qk_head_dim, bias=False)
        self.q_lora_rank = q_lora_rank
        self.kv_a_proj_with_mqa = nn.Linear(n_embd, kv_lora_rank + qk_rope_head_dim, bias=False)  # W_dkv and W_kr
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_head * (qk_nope_head_dim + v_head_dim), bias=False)  # W_uk, W_uv
        self.o_proj = nn.Linear(n_head * v_head_dim, n_embd, bias=False)
        self.scale = 1.0 / math.sqrt(qk_head_dim)

    def forward(self, x, rope, absorbed=False, cache=None):
        B, T, _ = x.shape
        nh = self.n_head
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, nh, self.d_nope + self.d_rope).transpose(1, 2)  # (B, nh, T, d_nope + d_rope)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        q_rope = apply_rope_interleaved(q_rope, *rope)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, kv_lora_rank)
        k_rope = apply_rope_interleaved(k_rope, *rope)  # (B, T, d_rope): one rotary key shared by all heads
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)
        S = c_kv.size(1)  # number of keys: cached + new
        mask = causal_mask(T, S, x.device)
        w_kv = self.kv_b_proj.weight.view(nh, self.d_nope + self.d_v, self.kv_lora_rank)
        w_uk, w_uv = w_kv[:, :self.d_nope], w_kv[:, self.d_nope:]  # (nh, d_nope, r), (nh, d_v, r)
        rope_scores = q_rope @ k_rope[:, None].transpose(-2, -1)  # (B, nh, T, S)
        if absorbed:
            q_latent = q_nope @ w_uk  # (B, nh, T, r): W_uk^T q_nope, per head
            scores = q_latent @ c_kv[:, None].transpose(-2, -1) + rope_scores  # (B, nh, T, S)
            p = F.softmax((scores * self.scale).masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
            o_latent = p.to(x.dtype) @ c_kv[:, None]  # (B, nh, T, r): attention over the latents themselves
            y = o_latent @ w_uv.transpose(-2, -1)  # (B, nh, T, d_v): W_uv applied once, after the sum
        else:
            kv = self.kv_b_proj(c_kv).view(B, S, nh, self.d_nope + self.d_v).transpose(1, 2)  # (B, nh, S, ...)
            k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
            scores = q_nope @ k_nope.transpose(-2, -1) + rope_scores  # (B, nh, T, S)
            p = F.softmax((scores * self.scale).masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
            y = p.to(x.dtype) @ v  # (B, nh, T, d_v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * self.d_v))

    def kv_bytes_per_token(self, dtype_bytes=2, absorbed=True):
        """Absorbed: the latent and the rotary key. Naive: every head's key (nope + rope) and value."""
        if absorbed:
            return (self.kv_lora_rank + self.d_rope) * dtype_bytes
        return self.n_head * (self.d_nope + self.d_rope + self.d_v) * dtype_bytes
