"""DeepSeek-V2, V2-Lite and V3 (V3.1, R1: V3's layout) in one file: config, blocks, model, latent KV cache, weights.

DeepSeek-AI 2024, "DeepSeek-V2" and "DeepSeek-V3 Technical Report". Against Qwen3-MoE (qwen.py):
  - multi-head latent attention (MLA): every head's k and v expand from one kv_lora_rank latent per token, plus one
    rotary key shared by the heads; decoding caches only those two (576 numbers per token for V3) and folds kv_b_proj
    into the query and the output ("absorbed"); RoPE on interleaved pairs, YaRN, softmax scale times mscale^2;
  - DeepSeekMoE: shared experts plus fine-grained routed ones, the first first_k_dense_replace layers dense; V2 routes
    by softmax, V3 by sigmoid with a correction bias moved by auxiliary-loss-free balancing (Wang et al. 2024);
  - V3's optional sequence-wise balance loss and multi-token prediction module (MTP, depth 1); FP8 weights load.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint_io
import errors
import hub
import lora


# -----------------------------------------------------------------------------------------------------------
# Config

MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
ROUTERS = {"deepseek_v3": ("sigmoid", ("noaux_tc",)), "deepseek_v2": ("softmax", ("greedy", "group_limited_greedy"))}
_HF_KEYS = dict(   # config.json's name: ours; DeepSeek's own keys keep HF's names
    vocab_size="vocab_size", max_position_embeddings="block_size", hidden_size="n_embd", num_hidden_layers="n_layer",
    intermediate_size="intermediate_size", num_attention_heads="n_head", rms_norm_eps="rms_norm_eps",
    rope_theta="rope_theta", attention_dropout="dropout", tie_word_embeddings="tie_word_embeddings",
    bos_token_id="bos_token_id", eos_token_id="eos_token_id", num_experts_per_tok="n_experts_per_tok",
    aux_loss_alpha="router_aux_loss_coef") | {k: k for k in (
        "q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim n_routed_experts n_shared_experts "
        "moe_intermediate_size n_group topk_group routed_scaling_factor first_k_dense_replace norm_topk_prob "
        "scoring_func topk_method bias_update_rate mtp_loss_weight").split()}


@dataclass
class Config:
    # defaults: a small DeepSeek-V3-style model that trains on a laptop CPU in a few minutes
    vocab_size: int = 4096
    block_size: int = 256                  # maximum context length (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 384           # SwiGLU width of the dense feed-forward layers
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scale_factor: float | None = None     # YaRN's context stretch; None: plain RoPE
    rope_original_context: int = 4096          # the context the unscaled model was pretrained on
    rope_beta_fast: float = 32.0               # YaRN: pairs turning more often than this over it keep their frequency,
    rope_beta_slow: float = 1.0                # pairs turning less often are divided by the factor; a ramp between
    rope_attention_factor: float | None = None   # cos/sin scale; None: from mscale and mscale_all_dim (YaRN)
    mscale: float | None = None            # YaRN: cos/sin get g(factor, mscale) / g(factor, mscale_all_dim) ...
    mscale_all_dim: float | None = None    # ... and the softmax scale g(factor, mscale_all_dim)^2, g = 0.1 m ln f + 1
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "deepseek_v3"        # the official schema: deepseek_v2 (V2, V2-Lite) or deepseek_v3
    q_lora_rank: int | None = 64           # the query's latent width; None: a direct q_proj (V2-Lite)
    kv_lora_rank: int = 64                 # the cached latent c per token, from which every head's k and v expand
    qk_nope_head_dim: int = 32             # per head: the part of q and k without RoPE ...
    qk_rope_head_dim: int = 16             # ... and with it (k's is one head, shared: cached beside c)
    v_head_dim: int = 32
    n_routed_experts: int = 8              # routed experts per MoE layer
    n_shared_experts: int = 1              # experts every token runs, as one MLP n_shared_experts times as wide
    n_experts_per_tok: int = 2             # top-k: the routed experts each token runs
    moe_intermediate_size: int = 128       # SwiGLU width of each expert
    n_group: int = 1                       # experts split into n_group groups, of which a token may use ...
    topk_group: int = 1                    # ... the best topk_group (group-limited routing)
    routed_scaling_factor: float = 1.0     # multiplies the routed experts' weights (V3: 2.5)
    first_k_dense_replace: int = 1         # layers 0..k-1 are dense, the rest MoE
    norm_topk_prob: bool = True            # renormalize the top-k weights to sum to 1 (V3; V2: false)
    scoring_func: str = "sigmoid"          # V3: sigmoid; V2: softmax
    topk_method: str = "noaux_tc"          # V3: noaux_tc (correction bias, groups); V2: greedy, group_limited_greedy
    router_aux_loss_coef: float = 0.0      # alpha of the sequence-wise balance loss (V3 report eq. 17-20); 0: none
    bias_update_rate: float = 0.001        # V3's auxiliary-loss-free balancing step (update_expert_bias); 0: off
    mtp_loss_weight: float = 0.0           # weight of the multi-token prediction loss; > 0 builds the MTP module

    def __post_init__(self):
        E, k, G, g = self.n_routed_experts, self.n_experts_per_tok, self.n_group, self.topk_group
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected 'deepseek_v2' or 'deepseek_v3'")
        scoring, methods = ROUTERS[self.model_type]
        if self.scoring_func != scoring or self.topk_method not in methods:
            raise ValueError(f"{self.model_type} routes with scoring_func {scoring!r} and topk_method "
                             f"{' or '.join(map(repr, methods))}, got {self.scoring_func!r}, {self.topk_method!r}")
        if self.model_type == "deepseek_v2" and self.norm_topk_prob:
            raise ValueError("norm_topk_prob=true for deepseek_v2: transformers' DeepseekV2 ignores it (no renorm)")
        if E % G or not 1 <= g <= G:
            raise ValueError(f"n_routed_experts={E} must be a multiple of n_group={G}, topk_group={g} in 1..n_group")
        grouped = self.topk_method != "greedy" and G > 1
        if not 1 <= k <= (g * E // G if grouped else E):
            raise ValueError(f"n_experts_per_tok={k} must be between 1 and the experts of topk_group={g} groups")
        if self.model_type == "deepseek_v3" and grouped and E // G < 2:
            raise ValueError(f"n_group={G}: V3 scores a group by its two best experts, so it needs 2 per group")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates pairs")
        self.q_lora_rank = self.q_lora_rank or None   # 0 and None: no query latent

    @classmethod
    def from_hf(cls, d):
        """From an official config.json dict, hub or transformers 5 spellings (there head_dim is the rotary dim)."""
        q_lora = d.get("q_lora_rank", 1536)   # null (or 0) means none here (V2-Lite), not transformers' default 1536
        if q_lora is not None and (type(q_lora) is not int or q_lora < 0):
            raise ValueError(f"'q_lora_rank' is {q_lora!r:.60}: expected an integer >= 0 or null")
        d = checkpoint_io.hf_config(d, tuple(MODEL_TYPES))
        v3 = d.get("model_type", "deepseek_v3") == "deepseek_v3"
        d = dict(n_routed_experts=d.get("num_local_experts")) | d   # transformers 5's alias
        d = (dict(n_group=8, topk_group=4, first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
                  norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", num_experts_per_tok=8,
                  n_routed_experts=256) if v3 else   # transformers' defaults
             dict(n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
                  norm_topk_prob=False, scoring_func="softmax", topk_method="greedy")) | d
        required = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
                    "n_routed_experts", "num_experts_per_tok")
        optional = dict(max_position_embeddings=int, num_key_value_heads=int, n_group=int, topk_group=int,
                        moe_layer_freq=int, rms_norm_eps=float, rope_theta=float, routed_scaling_factor=float,
                        attention_dropout="rate", aux_loss_alpha="rate", bias_update_rate="rate",
                        tie_word_embeddings=bool, norm_topk_prob=bool, bos_token_id="ids", eos_token_id="ids")
        checkpoint_io.check_keys(d, dict.fromkeys(required, int) | optional, required)
        for key in ("n_shared_experts", "first_k_dense_replace", "mtp_loss_weight"):   # may be 0
            if key in d and (type(d[key]) not in (int, float if key[0] == "m" else int) or not 0 <= d[key] < math.inf):
                raise ValueError(f"{key!r} is {d[key]!r:.60}: expected a number >= 0")
        bad = [(k, v) for k, v in (("hidden_act", "silu"), ("attention_bias", False), ("moe_layer_freq", 1),
                                   ("rope_interleave", True), ("num_key_value_heads", d["num_attention_heads"]))
               if d.get(k, v) != v]
        if bad:
            raise ValueError(f"{bad[0][0]!r} is {bad[0][1]!r:.60}, which deepseek.py does not implement "
                             f"(expected {dict(bad)} to be absent)")
        rope_type, rope = checkpoint_io.read_rope(d, {"default": {}, "yarn": dict(
            factor=float, original_max_position_embeddings=int, beta_fast=float, beta_slow=float, mscale=float,
            mscale_all_dim=float, attention_factor=float)})
        max_pos = d.get("max_position_embeddings", 4096 if v3 else 2048)
        context = rope.get("original_max_position_embeddings") or max_pos   # transformers' fallbacks, as its yarn
        yarn = dict(rope_scale_factor=float(rope.get("factor") or max_pos / context), rope_original_context=context,
                    rope_beta_fast=rope.get("beta_fast") or 32.0, rope_beta_slow=rope.get("beta_slow") or 1.0,
                    rope_attention_factor=rope.get("attention_factor"), mscale=rope.get("mscale"),
                    mscale_all_dim=rope.get("mscale_all_dim")) if rope_type == "yarn" else {}
        d = dict(max_position_embeddings=max_pos, tie_word_embeddings=False, aux_loss_alpha=0.0, bias_update_rate=0.0,
                 mtp_loss_weight=0.0) | d | {"rope_theta": rope["rope_theta"], "q_lora_rank": q_lora}
        return cls(**{ours: d[hf] for hf, ours in _HF_KEYS.items() if hf in d}, **yarn,
                   model_type="deepseek_v3" if v3 else "deepseek_v2")

    def to_hf(self):
        """The official config.json schema (our training extras ride along: transformers keeps them, unused)."""
        yarn = None if self.rope_scale_factor is None else {"type": "yarn", "factor": self.rope_scale_factor,
            "original_max_position_embeddings": self.rope_original_context, "beta_fast": self.rope_beta_fast,
            "beta_slow": self.rope_beta_slow, "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            "attention_factor": self.rope_attention_factor}   # null: the default
        return {"architectures": [MODEL_TYPES[self.model_type]], "model_type": self.model_type,
                **{hf: getattr(self, ours) for hf, ours in _HF_KEYS.items()}, "num_key_value_heads": self.n_head,
                "hidden_act": "silu", "rope_scaling": yarn, "attention_bias": False, "moe_layer_freq": 1,
                "num_nextn_predict_layers": int(self.mtp_loss_weight > 0), "initializer_range": 0.02,
                "torch_dtype": "float32"}


# Official sizes (hub config.json, FORMATS 1.8; the V2 numbers [MEM]). V3.1 and R1 share V3's layout and config
# (V3.1 adds scale_fmt "ue8m0", a matter of how its FP8 scales were made): load them by hub id.
_YARN = dict(rope_scale_factor=40.0, rope_original_context=4096, rope_beta_fast=32.0, rope_beta_slow=1.0)
_V2 = dict(_YARN, model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False, mscale=0.707,
           mscale_all_dim=0.707, vocab_size=102400, bos_token_id=100000, eos_token_id=100001, kv_lora_rank=512,
           qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2, n_experts_per_tok=6,
           first_k_dense_replace=1, block_size=163840, rms_norm_eps=1e-6, rope_theta=10000.0, bias_update_rate=0.0)
_SIZES = {   # name: (repo under deepseek-ai/, its -chat repo or None, config)
    "deepseek-v2-lite": ("DeepSeek-V2-Lite", "DeepSeek-V2-Lite-Chat", dict(_V2, n_layer=27, n_head=16,
        n_embd=2048, intermediate_size=10944, moe_intermediate_size=1408, q_lora_rank=None, n_routed_experts=64,
        topk_method="greedy")),
    "deepseek-v2": ("DeepSeek-V2", "DeepSeek-V2-Chat", dict(_V2, n_layer=60, n_head=128, n_embd=5120,
        intermediate_size=12288, moe_intermediate_size=1536, q_lora_rank=1536, n_routed_experts=160, n_group=8,
        topk_group=3, topk_method="group_limited_greedy", routed_scaling_factor=16.0)),
    "deepseek-v3": ("DeepSeek-V3", None, dict(
        _YARN, mscale=1.0, mscale_all_dim=1.0, vocab_size=129280, block_size=163840, n_layer=61, n_head=128,
        n_embd=7168, intermediate_size=18432, moe_intermediate_size=2048, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        n_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
        bos_token_id=0, eos_token_id=1, bias_update_rate=0.0)),
}
PRESETS = {n + s: Config(**c) for n, (_, chat, c) in _SIZES.items() for s in ("", "-chat")[:1 + bool(chat)]}
HUB_IDS = {n + s: f"deepseek-ai/{r}" for n, (*repos, _) in _SIZES.items() for s, r in zip(("", "-chat"), repos) if r}


# -----------------------------------------------------------------------------------------------------------
# Building blocks


def _yarn_mscale(factor, m=1.0):
    return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_frequencies(config):
    """(inv_freq theta^(-2i/d), i < d/2, attention_factor) over d = qk_rope_head_dim, with YaRN when configured
    (_compute_yarn_parameters: a ramp between pairs that keep their frequency and pairs divided by the factor)."""
    hd = config.qk_rope_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2).float() / hd))   # (hd/2,)
    if config.rope_scale_factor is None:
        return inv_freq, 1.0
    factor, context = config.rope_scale_factor, config.rope_original_context

    def pair(turns):   # the (fractional) index of the pair that turns `turns` times over the original context
        return hd * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(config.rope_theta))
    low, high = max(math.floor(pair(config.rope_beta_fast)), 0), min(math.ceil(pair(config.rope_beta_slow)), hd - 1)
    ramp = ((torch.arange(hd // 2).float() - low) / ((high - low) or 0.001)).clamp(0, 1)   # 0: keep, 1: divide
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    m, m_all = config.mscale, config.mscale_all_dim
    return inv_freq, config.rope_attention_factor or (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all)
                                                      if m and m_all else _yarn_mscale(factor))


def apply_rope(x, cos, sin):
    # x (B, T, ..., d); cos, sin (T, d/2). DeepSeek pairs dimension 2i with 2i+1 (the official view_as_complex)
    cos, sin = (t.view(t.size(0), *[1] * (x.dim() - 3), t.size(1)) for t in (cos, sin))
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), normalized in fp32 and cast back before the gain (as HF and Meta do)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # spelled out: on the CPU this is ~3x faster than F.rms_norm, which makes extra fp32 copies
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """MLA's static cache of the latent c and the roped shared key k_pe, written in place at the position."""

    def __init__(self, batch_size, max_len, kv_lora_rank, rope_dim, device=None, dtype=None):
        self.c = torch.zeros(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype)

    def update(self, pos, c, k_pe):
        # c (B, T, r), k_pe (B, T, d_rope) for positions pos..pos+T-1; returns every cached position so far
        T = c.size(1)
        self.c[:, pos:pos + T], self.k_pe[:, pos:pos + T] = c, k_pe
        return self.c[:, :pos + T], self.k_pe[:, :pos + T]


class Attention(nn.Module):
    """MLA as the official inference/model.py: naive (k, v expanded; no cache) or absorbed (with a cache)."""

    def __init__(self, config):
        super().__init__()
        C, nh, self.kv_lora_rank = config.n_embd, config.n_head, config.kv_lora_rank
        self.n_head, self.dn, self.dr, self.dv = nh, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(C, nh * (self.dn + self.dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(C, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)   # eps 1e-6, not rms_norm_eps (HF, official)
            self.q_b_proj = nn.Linear(config.q_lora_rank, nh * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.kv_lora_rank + self.dr, bias=False)   # the latent c and k_pe
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.dn + self.dv), bias=False)   # c -> k_nope, v
        self.o_proj = nn.Linear(nh * self.dv, C, bias=False)
        self.scale, f, m = (self.dn + self.dr) ** -0.5, config.rope_scale_factor, config.mscale_all_dim
        self.scale *= _yarn_mscale(f, m) ** 2 if f is not None and m else 1.0   # YaRN's mscale^2 (FORMATS 1.8)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.size()
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_head, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)                                           # (B, T, nh, dr)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], dim=-1)
        c, k_pe = self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin)                # (B, T, r), (B, T, dr): one head
        c, k_pe = (c, k_pe) if cache is None else cache.update(pos, c, k_pe)      # (B, S, r), (B, S, dr); S: keys
        naive = cache is None or T > 1   # training and prefill: T queries make expanding k and v worth it
        if naive:   # every head's k_nope and v, b s h d / b t h d, as in standard attention
            k_nope, v = self.kv_b_proj(c).view(B, c.size(1), self.n_head, -1).split([self.dn, self.dv], -1)
            scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        else:   # absorbed decoding: q_nope . (W_uk c) = (W_uk^T q_nope) . c, so attention runs on the cached latents
            w = self.kv_b_proj.weight.view(self.n_head, self.dn + self.dv, self.kv_lora_rank)
            q_c = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :self.dn])            # (B, T, nh, r)
            scores = torch.einsum("bshc,btc->bsht", q_c, c) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        scores, S = scores * self.scale, c.size(1)                                  # (B, T, nh, S)
        # query i (at position S-T+i) sees keys 0..S-T+i; one new token sees every cached key (no mask)
        mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        scores = scores if mask is None else scores.masked_fill(~mask[None, :, None], float("-inf"))
        p = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype), self.dropout, self.training)
        if naive:
            y = torch.einsum("bsht,bthd->bshd", p, v)                               # (B, T, nh, dv)
        else:   # sum_t p_t W_uv c_t = W_uv (sum_t p_t c_t): W_uv applied once, after the sum
            y = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", p, c), w[:, self.dn:])
        return F.dropout(self.o_proj(y.flatten(2)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config, width=None):
        super().__init__()
        width = width or config.intermediate_size   # the shared experts: moe_intermediate_size * n_shared_experts
        self.gate_proj = nn.Linear(config.n_embd, width, bias=False)
        self.up_proj = nn.Linear(config.n_embd, width, bias=False)
        self.down_proj = nn.Linear(width, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x):
        # SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): a SiLU-gated linear unit
        return F.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.dropout, self.training)


def grouped_linear(x, w, counts):
    """x (N, in), its rows sorted by expert, counts[e] of them for expert e; w (E, out, in): each row times its
    expert's w[e].T, (N, out). One torch.grouped_mm on the CPU (checked there; on CUDA not yet), else a loop."""
    if hasattr(F, "grouped_mm") and x.device.type == "cpu" and x.dtype == w.dtype in (torch.float32, torch.bfloat16):
        return F.grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([F.linear(xe, we) for xe, we in zip(x.split(counts.tolist()), w)])


class Router(nn.Module):
    """The gate, in fp32. V3 (the official Gate): chosen by sigmoid s + bias in the best groups (by their two best),
    weighed by s; V2: softmax p, greedy or by the groups' maxima, weighed by p. Then norm_topk_prob, the scale."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.n_embd).normal_(0.0, 0.02))
        if config.topk_method == "noaux_tc":   # steers the choice only; moved by update_expert_bias, not AdamW
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        self.sigmoid, self.top_k, self.norm, self.scaling = (config.scoring_func == "sigmoid", config.n_experts_per_tok,
                                                             config.norm_topk_prob, config.routed_scaling_factor)
        self.n_group, self.topk_group = config.n_group if config.topk_method != "greedy" else 1, config.topk_group

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float() if self.sigmoid else scores
        if self.n_group > 1:   # group-limited: only the experts of the best topk_group groups stay eligible
            groups = choice.view(x.size(0), self.n_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1) if self.sigmoid else groups.amax(-1)   # (N, n_group)
            keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(self.topk_group, -1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(groups.size(-1), dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        return (weights / (weights.sum(-1, keepdim=True) + 1e-20) if self.norm else weights) * self.scaling, idx, scores


class MoE(nn.Module):
    """DeepSeekMoE: shared + routed experts (stacked); leaves load (E,) and balance (the seq-wise loss)."""

    def __init__(self, config):
        super().__init__()
        E, C, I = config.n_routed_experts, config.n_embd, config.moe_intermediate_size
        self.n_experts, self.top_k = E, config.n_experts_per_tok
        self.gate = Router(config)
        self.experts = nn.ParameterDict({name: nn.Parameter(torch.empty(E, *shape).normal_(0.0, 0.02)) for name, shape
                                         in (("gate_proj", (I, C)), ("up_proj", (I, C)), ("down_proj", (C, I)))})
        self.shared_experts = MLP(config, I * config.n_shared_experts) if config.n_shared_experts else None
        self.dropout = config.dropout
        self.load = self.balance = self.load_sum = None

    def forward(self, x):
        shape, x = x.shape, x.flatten(0, 1)                                 # (N, C): routing is per token
        weights, idx, scores = self.gate(x)                                 # (N, k), (N, k), (N, E)
        order = idx.flatten().argsort(stable=True)   # (N * k,) assignments grouped by expert, each a contiguous block
        token = order // self.top_k                                          # the token of each sorted assignment
        counts = torch.bincount(idx.flatten(), minlength=self.n_experts)     # (E,)
        xs, w = x.index_select(0, token), self.experts                       # (N * k, C)
        gate, up = grouped_linear(xs, torch.cat((w.gate_proj, w.up_proj), 1), counts).chunk(2, dim=-1)   # one call
        h = F.silu(gate) * up * weights.flatten()[order, None].to(x.dtype)   # weighed here: down_proj is linear
        y = grouped_linear(h, w.down_proj, counts)
        self.load = counts.detach()
        if self.training:   # the balancing update reads the load of every training forward since the last one
            self.load_sum = self.load if self.load_sum is None else self.load_sum + self.load
        # V3 eq. 17-20 per sequence: f_i = E / (k T) * (tokens choosing i), P_i = mean_t of s_i / sum_j s_j
        B, T, E = shape[0], shape[1], self.n_experts
        f, prob = F.one_hot(idx.view(B, -1), E).sum(1).float(), (scores / scores.sum(-1, keepdim=True)).view(B, T, E)
        self.balance = (f * E / (self.top_k * T) * prob.mean(1)).sum(-1).mean()     # 1 when uniform
        y = torch.zeros_like(x).index_add_(0, token, y)                      # each token: the sum over its k experts
        y = y if self.shared_experts is None else y + self.shared_experts(x)
        return F.dropout(y.view(shape), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config, i):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MoE(config) if i >= config.first_k_dense_replace else MLP(config)   # DeepseekV3DecoderLayer's rule

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(Block):
    """V3's MTP module (depth 1), model.layers.{n_layer}: h_t and emb(t+1) predict token t+2 through eh_proj(cat(
    enorm(emb), hnorm(h))), a block, shared_head.norm, the lm_head (shared, as the embedding; files hold copies)."""

    def __init__(self, config):
        super().__init__(config, config.n_layer)
        self.enorm, self.hnorm = (RMSNorm(config.n_embd, config.rms_norm_eps) for _ in range(2))
        self.eh_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.shared_head = nn.ModuleDict(dict(norm=RMSNorm(config.n_embd, config.rms_norm_eps)))

    def forward(self, h, emb, cos, sin):
        x = super().forward(self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1)), cos, sin)
        return self.shared_head.norm(x)


# -----------------------------------------------------------------------------------------------------------
# The model


class DeepSeek(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names follow the HF checkpoint keys (model.layers.N.self_attn.kv_b_proj.weight, ...)
        mtp = [MTPLayer(config)] if config.mtp_loss_weight > 0 else []   # model.layers.{n_layer}, as in the files
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config, i) for i in range(config.n_layer)] + mtp),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # not saved: recomputed from the config (from_pretrained too), kept in fp32 (the loader never casts it)
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.moe = [b.mlp for b in self.model.layers[:config.n_layer] if isinstance(b.mlp, MoE)]   # not the MTP's
        self.aux_loss = self.mtp_loss = None   # the last forward's (detached), for logging; None when not configured
        self.apply(self._init_weights)
        # GPT-2's init: each projection into the residual stream gets std 0.02 / sqrt(number of residual adds)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def expert_load(self):
        """(n_moe_layers, E): the tokens each expert of each MoE layer got in the last forward; None when dense."""
        return torch.stack([m.load for m in self.moe]) if self.moe and self.moe[0].load is not None else None

    @torch.no_grad()
    def update_expert_bias(self, rate=None):
        """V3's loss-free balancing, after each optimizer step: bias += rate * sign(mean load - load), the load of the
        training forwards since the last call (summed over processes). rate: None is config.bias_update_rate."""
        rate = self.config.bias_update_rate if rate is None else rate
        for m in [b.mlp for b in self.model.layers if isinstance(b.mlp, MoE)]:
            load, m.load_sum = m.load_sum, None
            if load is None or not hasattr(m.gate, "e_score_correction_bias"):
                continue
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)
            m.gate.e_score_correction_bias += rate * torch.sign(load.float().mean() - load)

    def rope(self, pos, T, dtype):
        """cos, sin (T, d_rope/2) for absolute positions pos..pos+T-1, computed in fp32 and cast to the activations."""
        positions = torch.arange(pos, pos + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())          # (T, d_rope/2): one angle per pair
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def forward(self, idx, targets=None, *, cache=None, pos=0, last_only=False):
        # idx (B, T) int64; targets (B, T) with -100 = ignored; pos: absolute position of idx[:, 0]
        # last_only: the logits of the last position only, (B, 1, V): all that sampling reads
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context length block_size="
                             f"{self.config.block_size}")
        c, x = self.config, self.model.embed_tokens(idx)                   # (B, T, C)
        cos, sin = self.rope(pos, T, torch.get_autocast_dtype(x.device.type)
                             if torch.is_autocast_enabled(x.device.type) else x.dtype)
        for i, block in enumerate(self.model.layers[:c.n_layer]):
            x = block(x, cos, sin, cache[i] if cache is not None else None, pos)
        h, x = x, x[:, -1:] if last_only else x                             # (B, 1, C) or (B, T, C)
        logits = self.lm_head(self.model.norm(x))                           # (B, 1, V) or (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                                             ignore_index=-100)
        if self.moe and c.router_aux_loss_coef > 0:   # the sequence-wise balance loss, summed over the MoE layers
            aux = torch.stack([m.balance for m in self.moe]).sum()
            self.aux_loss = aux.detach()
            loss = loss + c.router_aux_loss_coef * aux if self.training and loss is not None else loss
        if c.mtp_loss_weight > 0 and targets is not None and cache is None and T > 1:
            # position t: h_t and the embedding of token t+1 predict token t+2 (= targets[t+1])
            mtp = self.model.layers[c.n_layer](h[:, :-1], self.model.embed_tokens(idx[:, 1:]), cos[:-1], sin[:-1])
            mtp_loss = F.cross_entropy(self.lm_head(mtp).float().flatten(0, 1), targets[:, 1:].reshape(-1),
                                       ignore_index=-100)
            self.mtp_loss = mtp_loss.detach()
            loss = loss + c.mtp_loss_weight * mtp_loss if self.training else loss
        return logits, loss

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        """One latent KVCache per layer (max_len <= block_size): kv_lora_rank + qk_rope_head_dim per token."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds the context length block_size={c.block_size}")
        device, dtype = device or self.lm_head.weight.device, dtype or self.lm_head.weight.dtype
        return [KVCache(batch_size, max_len, c.kv_lora_rank, c.qk_rope_head_dim, device, dtype)
                for _ in range(c.n_layer)]

    def num_params(self, active=False):
        """Parameters, each counted once, less the MTP module; active: less the routed experts a token skips."""
        skipped = sum((m.n_experts - m.top_k) * sum(p[0].numel() for p in m.experts.values()) for m in self.moe)
        mtp = sum(p.numel() for p in self.model.layers[self.config.n_layer:].parameters())
        return sum(p.numel() for p in self.parameters()) - mtp - (skipped if active else 0)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N (active, less the lookup) + 6 L nh (dn + dr + dv) T (naive MLA attention)."""
        c = self.config
        n = self.num_params(active=True) - (0 if c.tie_word_embeddings else self.model.embed_tokens.weight.numel())
        return 6 * n + 6 * c.n_layer * c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len

    # -------------------------------------------------------------------------------------------------------
    # Weights in the official layout

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None):
        """source: a directory, hub id or PRESETS name; dtype None: float32 (FP8 weights dequantized to it)."""
        directory = Path(hub.resolve(source if Path(source).is_dir() else HUB_IDS.get(source, source)))
        if (directory / lora.CONFIG).is_file():   # a LoRA run's adapter (PEFT's layout): its base, merged
            return lora.from_pretrained(cls, directory, dtype=dtype, device=device)
        config, state = _load_hf(directory, dtype or torch.float32)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight   # assign=True replaced the embedding: tie again
        model.inv_freq, model.attention_factor = rope_frequencies(config)   # the meta buffer has no values yet
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors in the official layout (a tied head once, as the embedding)."""
        keys = _expected_shapes(self.config)
        checkpoint_io.save_safetensors({k: v for k, v in _official(self.state_dict(), self.config).items()
                                        if k in keys}, directory)
        checkpoint_io.write_json(Path(directory) / "config.json", self.config.to_hf())


def _official(state, config):
    """Official keys: per-expert tensors; the MTP layer with copies of the embedding and the head."""
    state = {k: v for key, value in state.items() for k, v in ([(key.replace(".experts.", f".experts.{e}.") +
             ".weight", w) for e, w in enumerate(value)] if ".mlp.experts." in key else [(key, value)])}
    head, mtp = state.get("lm_head.weight", state["model.embed_tokens.weight"]), f"model.layers.{config.n_layer}."
    return state | ({mtp + "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                     mtp + "shared_head.head.weight": head.clone()} if config.mtp_loss_weight > 0 else {})


def _expected_shapes(config):
    """{key: shape} of the official files for a config, read off the model built on the meta device."""
    with torch.device("meta"):
        state = _official(DeepSeek(config).state_dict(), config)
    return {k: v.shape for k, v in state.items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def dequantize_fp8(weight, scale_inv, dtype, key="weight"):
    """F8_E4M3 weight (M, N) * scale_inv per 128x128 block on the ceil-div grid (edge blocks partial), in dtype."""
    M, N = weight.shape
    if scale_inv.dim() != 2 or tuple(scale_inv.shape) != (-(-M // 128), -(-N // 128)):
        raise errors.BadInput(f"scale {key + '_scale_inv'!r} has shape {tuple(scale_inv.shape)}, but its FP8 weight "
                              f"{key!r} of shape {(M, N)} needs the 128x128-block grid {(-(-M // 128), -(-N // 128))}")
    out = torch.empty(M, N, dtype=dtype)
    for i in range(0, M, 128):   # a block row at a time: the fp32 temporaries stay 128 rows small
        out[i:i + 128] = weight[i:i + 128].float() * scale_inv[i // 128].float().repeat_interleave(128)[:N]
    return out


def _load_hf(directory, dtype):
    """(config, state dict); FP8 weights wait for their _scale_inv (or it for them), then dequantize as they come."""
    config = checkpoint_io.read_config(directory / "config.json", Config.from_hf)
    state, expected, fp8, scales = {}, _expected_shapes(config), {}, {}
    nextn = checkpoint_io.read_json(directory / "config.json").get("num_nextn_predict_layers") or 0
    mtp = f"model.layers.{config.n_layer}."
    copies = (mtp + "embed_tokens.weight", mtp + "shared_head.head.weight")   # our MTP layer shares the main ones
    for key, tensor in checkpoint_io.iter_safetensors(directory):
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        if (layer and config.n_layer <= int(layer[1]) < config.n_layer + nextn and not (
                config.mtp_loss_weight > 0 and key.startswith(mtp)) or key in copies
                or key == "lm_head.weight" and config.tie_word_embeddings):
            continue   # the MTP layers unless used (V3: layers.61), their copies of the embedding and head, a tied head
        weight_key = key.removesuffix("_scale_inv")
        shape = expected.get(weight_key, ()) if key != weight_key else tensor.shape   # a scale: checked on dequantizing
        checkpoint_io.check_tensor(expected, weight_key, shape, directory, "DeepSeek", shown_key=key)
        if key != weight_key or tensor.dtype == torch.float8_e4m3fn:
            (fp8 if key == weight_key else scales)[weight_key] = tensor
        else:   # the router stays in fp32, as in transformers (_keep_in_fp32_modules_strict)
            state[key] = tensor.to(dtype=torch.float32 if ".mlp.gate." in key else dtype).contiguous()
        if weight_key in fp8 and weight_key in scales:   # both halves here: dequantize
            state[weight_key] = dequantize_fp8(fp8.pop(weight_key), scales.pop(weight_key), dtype, weight_key)
    if fp8 or scales:
        k = next(iter(fp8 or scales))
        raise errors.BadInput(f"{directory}: FP8 weight {k!r} has no scale {k + '_scale_inv'!r}" if fp8 else
                              f"{directory}: scale {k + '_scale_inv'!r} has no FP8 weight {k!r}")
    checkpoint_io.check_complete({k: v for k, v in expected.items() if k not in copies}, state, directory)
    for key in [k for k in state if ".mlp.experts.0." in k]:   # per-expert tensors -> the stacked (E, out, in)
        state[key.replace(".experts.0.", ".experts.").removesuffix(".weight")] = torch.stack(
            [state.pop(key.replace(".experts.0.", f".experts.{e}.")) for e in range(config.n_routed_experts)])
    return config, state


# -----------------------------------------------------------------------------------------------------------
# Chat format


def encode_chat(tok, messages, add_generation_prompt=True):
    """Token ids of a dialog in DeepSeek's chat format (the HF repos' templates, tests/data/deepseek_v*.jinja), V3's:
        <｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜>
        <｜User｜>Who are you?<｜Assistant｜>          <- the generation prompt
    and for a tokenizer without <｜User｜> (V2 and V2-Lite Chat) V2's: "<｜begin▁of▁sentence｜>You are terse.\n\nUser:
    Hi!\n\nAssistant: Hello.<｜end▁of▁sentence｜>User: Who are you?\n\nAssistant:". V3's system messages (joined by a
    blank line) must come first: its template moves a later one to the front, not prefix-stable, so that is refused.
    Content is not stripped, a reply's reasoning (up to </think>) is kept (R1's template drops it), special-token text
    in it stays text (no forged turns); otherwise the ids are the template's, prefix-stable. Replies end with EOS."""
    names = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    if absent := [n for n in names if n not in tok.special_tokens]:
        raise errors.BadInput(f"the tokenizer lacks {', '.join(absent)}: not a DeepSeek tokenizer")
    bos, eos, user, assistant = (tok.special_tokens.get(n) for n in (*names, "<｜User｜>", "<｜Assistant｜>"))

    def text(s):   # the text between two special tokens is tokenized whole, as HF does
        return tok.encode(s, allowed_special="none")

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with 'role' system, user or assistant and a string "
                             f"'content', got {m!r}")
        if m["role"] == "system" and i and messages[i - 1]["role"] != "system" and user is not None:
            raise ValueError(f"messages[{i}]: a system message after the first user or assistant turn (DeepSeek-V3's "
                             f"template moves it to the start); put the system messages first")
    if user is None:   # V2: the roles are text, and the text from one reply's EOS to the next is tokenized whole
        ids, run = [bos], ""
        for m in messages:
            run += {"system": "{}\n\n", "user": "User: {}\n\n"}.get(m["role"], "Assistant: {}").format(m["content"])
            ids, run = (ids + text(run) + [eos], "") if m["role"] == "assistant" else (ids, run)
        return ids + text(run + "Assistant:" * add_generation_prompt)
    n = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    ids = [bos] + text("\n\n".join(m["content"] for m in messages[:n]))
    for m in messages[n:]:
        ids += [user] + text(m["content"]) if m["role"] == "user" else [assistant] + text(m["content"]) + [eos]
    return ids + [assistant] if add_generation_prompt else ids


Model = DeepSeek
