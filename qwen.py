"""Qwen2.5, Qwen3 and Qwen3-MoE in one file: a config, the blocks, the model, a KV cache, the official weights.

Qwen Team 2024, "Qwen2.5 Technical Report"; Yang et al. 2025, "Qwen3 Technical Report". Against Llama 3 (llama3.py):
  - Qwen2.5 adds biases to the q, k and v projections (o_proj has none);
  - Qwen3 drops them and normalizes each head's q and k with an RMSNorm over head_dim (QK-norm) before RoPE;
  - Qwen3-MoE swaps the feed-forward for a mixture of experts (Shazeer et al. 2017): a softmax router picks the top
    n_experts_per_tok of n_experts SwiGLU experts per token; training adds Switch's balancing loss (Fedus et al. 2021);
  - long contexts use YaRN (Peng et al. 2023) instead of Llama 3.1's frequency scaling.
Weights in HF's layout (config.json + safetensors) store each expert apart; in memory a layer's experts are stacked.
"""
import math
from dataclasses import dataclass, field
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

MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_HF_KEYS = dict(   # config.json's name: ours
    vocab_size="vocab_size", max_position_embeddings="block_size", hidden_size="n_embd", num_hidden_layers="n_layer",
    intermediate_size="intermediate_size", num_attention_heads="n_head", num_key_value_heads="n_kv_head",
    head_dim="head_dim", rms_norm_eps="rms_norm_eps", rope_theta="rope_theta", attention_dropout="dropout",
    tie_word_embeddings="tie_word_embeddings", bos_token_id="bos_token_id", eos_token_id="eos_token_id")
_MOE_KEYS = dict(num_experts="n_experts", num_experts_per_tok="n_experts_per_tok", norm_topk_prob="norm_topk_prob",
                 moe_intermediate_size="moe_intermediate_size", decoder_sparse_step="decoder_sparse_step",
                 mlp_only_layers="mlp_only_layers", router_aux_loss_coef="router_aux_loss_coef")


@dataclass
class Config:
    # defaults: a small Qwen3-style model that trains on a laptop CPU in a few minutes (llama3.py's size)
    vocab_size: int = 4096
    block_size: int = 256                  # maximum context length (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2                     # GQA: each KV head serves n_head // n_kv_head query heads
    n_embd: int = 128
    head_dim: int | None = None            # None: n_embd // n_head
    intermediate_size: int = 512           # SwiGLU width of the dense feed-forward layers
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scale_factor: float | None = None     # YaRN's context stretch; None: plain RoPE
    rope_original_context: int = 32768         # the context the unscaled model was pretrained on
    rope_beta_fast: float = 32.0               # YaRN: pairs turning more often than this over it keep their frequency,
    rope_beta_slow: float = 1.0                # pairs turning less often are divided by the factor; a ramp between
    rope_attention_factor: float | None = None   # cos/sin scale; None: YaRN's 0.1 ln(factor) + 1
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "qwen3"              # the official schema: qwen2 (Qwen2.5), qwen3 or qwen3_moe
    attention_bias: bool = False           # q/k/v biases (Qwen2.5); o_proj never has one
    qk_norm: bool = True                   # per-head RMSNorm of q and k before RoPE (Qwen3)
    n_experts: int = 0                     # routed experts per MoE layer (HF num_experts); 0: a dense model
    n_experts_per_tok: int = 2             # top-k: the experts each token runs
    moe_intermediate_size: int = 128       # SwiGLU width of each expert
    norm_topk_prob: bool = True            # renormalize the top-k probabilities to sum to 1
    decoder_sparse_step: int = 1           # layer i is MoE when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)   # ... and i is not listed here
    router_aux_loss_coef: float = 0.001    # weight of the load-balancing loss in the training loss

    def __post_init__(self):
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head} (or give head_dim)")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dimensions")
        self.model_type = "qwen3_moe" if self.model_type == "qwen3" and self.n_experts else self.model_type
        qwen2, got = self.model_type == "qwen2", (self.attention_bias, self.qk_norm, self.n_experts > 0)
        if self.model_type not in MODEL_TYPES or got[:2] != (qwen2, not qwen2) or qwen2 and got[2]:   # the schemas
            raise ValueError(f"model_type={self.model_type!r} with (attention_bias, qk_norm, n_experts > 0)={got}: "
                             f"expected 'qwen2' (biases, no experts), 'qwen3' or 'qwen3_moe' (qk_norm)")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok={self.n_experts_per_tok} (num_experts_per_tok) must be between 1 "
                             f"and n_experts={self.n_experts} (num_experts)")

    @classmethod
    def from_hf(cls, d):
        """From an official config.json dict, hub or transformers 5 spellings (rope_parameters, num_local_experts);
        ValueError naming the key it cannot take. Qwen2's q/k/v biases go without saying (no key)."""
        d = checkpoint_io.hf_config(d, tuple(MODEL_TYPES))
        model_type, moe = d.get("model_type", "qwen3"), d.get("model_type") == "qwen3_moe"
        d = dict(num_experts=d.get("num_local_experts"), norm_topk_prob=False, decoder_sparse_step=1,
                 mlp_only_layers=[], router_aux_loss_coef=0.001) | d if moe else d   # transformers' defaults
        required = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size") + (
            ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if moe else ())
        optional = dict(max_position_embeddings=int, num_key_value_heads=int, head_dim=int, decoder_sparse_step=int,
                        rms_norm_eps=float, rope_theta=float, attention_dropout="rate", router_aux_loss_coef="rate",
                        tie_word_embeddings=bool, norm_topk_prob=bool, mlp_only_layers="ids", bos_token_id="ids")
        checkpoint_io.check_keys(d, dict.fromkeys(required, int) | optional | {"eos_token_id": "ids"}, required)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r:.60} is not Qwen's silu (SwiGLU)")
        if flag := next((f for f in ("use_sliding_window", "attention_bias") if d.get(f)), None):
            if not (flag == "attention_bias" and model_type == "qwen2"):   # qwen3's would put one on o_proj too
                raise ValueError(f"sets {flag}=true for model_type {model_type!r}, which qwen.py does not implement")
        rope_type, rope = checkpoint_io.read_rope(d, {"default": {}, "yarn": dict(
            factor=float, original_max_position_embeddings=int, beta_fast=float, beta_slow=float,
            attention_factor=float)})
        max_pos = d.get("max_position_embeddings", 32768)
        context = rope.get("original_max_position_embeddings") or max_pos   # transformers' fallbacks, as its yarn
        yarn = dict(rope_scale_factor=float(rope.get("factor") or max_pos / context), rope_original_context=context,
                    rope_beta_fast=rope.get("beta_fast") or 32.0, rope_beta_slow=rope.get("beta_slow") or 1.0,
                    rope_attention_factor=rope.get("attention_factor")) if rope_type == "yarn" else {}
        d = dict(max_position_embeddings=max_pos, num_key_value_heads=d["num_attention_heads"], head_dim=128 if
                 model_type == "qwen3" else None, tie_word_embeddings=False) | d | {"rope_theta": rope["rope_theta"]}
        return cls(**{ours: d[hf] for hf, ours in (_HF_KEYS | (_MOE_KEYS if moe else {})).items() if hf in d}, **yarn,
                   model_type=model_type, attention_bias=model_type == "qwen2", qk_norm=model_type != "qwen2")

    def to_hf(self):
        """Back to the official config.json schema of model_type, so that transformers loads our checkpoints."""
        yarn = None if self.rope_scale_factor is None else {"rope_type": "yarn", "factor": self.rope_scale_factor,
            "original_max_position_embeddings": self.rope_original_context, "beta_fast": self.rope_beta_fast,
            "beta_slow": self.rope_beta_slow, "attention_factor": self.rope_attention_factor}   # null: the default
        keys = _HF_KEYS | (_MOE_KEYS if self.model_type == "qwen3_moe" else {})
        return {"architectures": [MODEL_TYPES[self.model_type]], "model_type": self.model_type,
                **{hf: getattr(self, ours) for hf, ours in keys.items()}, "hidden_act": "silu", "rope_scaling": yarn,
                "use_sliding_window": False, "initializer_range": 0.02, "torch_dtype": "float32",
                **({} if self.model_type == "qwen2" else {"attention_bias": False})}


# Official sizes (hub config.json). Qwen3's plain repos (Qwen/Qwen3-8B) are the post-trained models, -Base the
# pretrained. Unconfirmed: the Qwen2.5-1.5B base context (131072), the Qwen3 -Base repos' (32768, eos 151643).
_QWEN = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643)
_Q25, _Q3 = dict(_QWEN, model_type="qwen2", attention_bias=True, qk_norm=False), dict(_QWEN, head_dim=128)
_DIMS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
_SIZES = {   # name: (base repo, post-trained repo under Qwen/, their contexts, config: _DIMS, then the rest)
    "qwen2.5-0.5b": ("Qwen2.5-0.5B", "Qwen2.5-0.5B-Instruct", (32768, 32768), (24, 14, 2, 896, 4864), _Q25),
    "qwen2.5-1.5b": ("Qwen2.5-1.5B", "Qwen2.5-1.5B-Instruct", (131072, 32768), (28, 12, 2, 1536, 8960), _Q25),
    "qwen2.5-7b": ("Qwen2.5-7B", "Qwen2.5-7B-Instruct", (131072, 32768), (28, 28, 4, 3584, 18944),
                   dict(_Q25, vocab_size=152064, tie_word_embeddings=False)),
    "qwen3-0.6b": ("Qwen3-0.6B-Base", "Qwen3-0.6B", (32768, 40960), (28, 16, 8, 1024, 3072), _Q3),
    "qwen3-1.7b": ("Qwen3-1.7B-Base", "Qwen3-1.7B", (32768, 40960), (28, 16, 8, 2048, 6144), _Q3),
    "qwen3-8b": ("Qwen3-8B-Base", "Qwen3-8B", (32768, 40960), (36, 32, 8, 4096, 12288),
                 dict(_Q3, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3-30B-A3B-Base", "Qwen3-30B-A3B", (32768, 40960), (48, 32, 4, 2048, 6144), dict(
        _Q3, tie_word_embeddings=False, n_experts=128, n_experts_per_tok=8, moe_intermediate_size=768)),
}
_VARIANTS = {"": (0, 151643), "-instruct": (1, [151645, 151643])}   # (repo and context index, <|im_end|> <|endoftext|>)
PRESETS = {name + suffix: Config(**dict(zip(_DIMS, dims)), **rest, block_size=contexts[i], eos_token_id=eos)
           for name, (*_, contexts, dims, rest) in _SIZES.items() for suffix, (i, eos) in _VARIANTS.items()}
HUB_IDS = {name + s: f"Qwen/{repo[i]}" for name, (*repo, _, _, _) in _SIZES.items() for s, (i, _) in _VARIANTS.items()}


# -----------------------------------------------------------------------------------------------------------
# Building blocks


def rope_frequencies(config):
    """(inv_freq theta^(-2i/hd), i < hd/2, attention_factor), with YaRN when configured (_compute_yarn_parameters):
    pairs turning over beta_fast times in the original context keep their frequency, under beta_slow times are divided
    by the factor, a ramp blends between; cos, sin get multiplied by attention_factor. fp32 (bf16: ~200 rad off)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2).float() / hd))   # (hd/2,)
    if config.rope_scale_factor is None:
        return inv_freq, 1.0
    factor, context = config.rope_scale_factor, config.rope_original_context

    def pair(turns):   # the (fractional) index of the pair that turns `turns` times over the original context
        return hd * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(config.rope_theta))
    low, high = max(math.floor(pair(config.rope_beta_fast)), 0), min(math.ceil(pair(config.rope_beta_slow)), hd - 1)
    ramp = ((torch.arange(hd // 2).float() - low) / ((high - low) or 0.001)).clamp(0, 1)   # 0: keep, 1: divide
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, config.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)   # YaRN


def apply_rope(x, cos, sin):
    # x (B, nh, T, hd); cos, sin (T, hd). HF's layout pairs dimension i with i + hd/2, so rotate_half,
    # (x1, x2) -> (-x2, x1), turns every pair by 90 degrees: each pair ends up turned by position * frequency
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
    """A static KV cache (as in gpt-fast): n_head heads of keys and values for max_len positions, preallocated
    and written in place at the absolute position."""

    def __init__(self, batch_size, n_head, max_len, head_dim, device=None, dtype=None):
        self.k = torch.zeros(batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, pos, k, v):
        # k, v: (B, nh, T, hd) for positions pos..pos+T-1; returns every cached position so far
        T = k.size(2)
        self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k, v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)   # Qwen2.5: no bias here
        norm = (lambda: RMSNorm(config.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity   # Qwen3:
        self.q_norm, self.k_norm = norm(), norm()   # over head_dim, one for q, one for k, each shared by the heads
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.size()
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)      # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, is_causal = None, True
        if cache is not None:
            k, v = cache.update(pos, k, v)                                               # (B, nkv, pos+T, hd)
            if pos > 0:
                # SDPA's is_causal puts its triangle at the top left, where query i (at position pos+i) would
                # see keys 0..i only: one new token sees every cached key (no mask), a chunk keys 0..pos+i
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        # enable_gqa: query head h reads KV head h // (nh / nkv), HF's repeat_kv order, without copying k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)       # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)      # (B, T, nh*hd)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
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


class MoE(nn.Module):
    """Qwen3-MoE's sparse feed-forward (Qwen3MoeSparseMoeBlock), experts stacked (E, out, in). A forward leaves
    load (E,), the tokens routed to each expert, and mean_prob (E,), their mean router probability."""

    def __init__(self, config):
        super().__init__()
        E, C, I = config.n_experts, config.n_embd, config.moe_intermediate_size
        self.n_experts, self.top_k, self.norm_topk_prob = E, config.n_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(C, E, bias=False)   # the router: a logit per expert
        self.experts = nn.ParameterDict({name: nn.Parameter(torch.empty(E, *shape).normal_(0.0, 0.02)) for name, shape
                                         in (("gate_proj", (I, C)), ("up_proj", (I, C)), ("down_proj", (C, I)))})
        self.dropout = config.dropout
        self.load = self.mean_prob = None

    def forward(self, x):
        shape, x = x.shape, x.flatten(0, 1)                                 # (N, C): routing is per token
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)        # (N, E), over all experts, in fp32
        weights, idx = probs.topk(self.top_k, dim=-1)                        # (N, k)
        weights = weights / weights.sum(-1, keepdim=True) if self.norm_topk_prob else weights
        order = idx.flatten().argsort(stable=True)   # (N * k,) assignments grouped by expert, each a contiguous block
        token = order // self.top_k                                          # the token of each sorted assignment
        counts = torch.bincount(idx.flatten(), minlength=self.n_experts)     # (E,)
        xs, w = x.index_select(0, token), self.experts                       # (N * k, C)
        gate, up = grouped_linear(xs, torch.cat((w.gate_proj, w.up_proj), 1), counts).chunk(2, dim=-1)   # one call
        h = F.silu(gate) * up * weights.flatten()[order, None].to(x.dtype)   # weighed here: down_proj is linear
        self.load, self.mean_prob = counts.detach(), probs.mean(0)
        y = torch.zeros_like(x).index_add_(0, token, grouped_linear(h, w.down_proj, counts))   # sum over its k experts
        return F.dropout(y.view(shape), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config, i):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        moe = config.n_experts and i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0
        self.mlp = MoE(config) if moe else MLP(config)   # Qwen3MoeDecoderLayer's rule

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------------------
# The model


class Qwen(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names follow the HF checkpoint keys (model.layers.N.self_attn.q_proj.weight, ...)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one Parameter, as in the small Qwen models
        # not saved: recomputed from the config (from_pretrained too), kept in fp32 (the loader never casts it)
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.moe = [block.mlp for block in self.model.layers if isinstance(block.mlp, MoE)]   # (not registered twice)
        self.aux_loss = None   # the last forward's load-balancing loss (detached), for logging; None when dense
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

    def rope(self, pos, T, dtype):
        """cos, sin (T, hd) for absolute positions pos..pos+T-1, computed in fp32 and cast to the activations."""
        positions = torch.arange(pos, pos + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())          # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (T, hd): halves pair up (rotate_half)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)   # YaRN

    def forward(self, idx, targets=None, *, cache=None, pos=0, last_only=False):
        # idx (B, T) int64; targets (B, T) with -100 = ignored; pos: absolute position of idx[:, 0]
        # last_only: the logits of the last position only, (B, 1, V): all that sampling reads
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context length block_size="
                             f"{self.config.block_size}")
        x = self.model.embed_tokens(idx)                                    # (B, T, C)
        cos, sin = self.rope(pos, T, torch.get_autocast_dtype(x.device.type)
                             if torch.is_autocast_enabled(x.device.type) else x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache[i] if cache is not None else None, pos)
        x = x[:, -1:] if last_only else x                                   # (B, 1, C) or (B, T, C)
        logits = self.lm_head(self.model.norm(x))                           # (B, 1, V) or (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                                             ignore_index=-100)
        if self.moe:   # Switch's E sum_i f_i P_i over all MoE layers' tokens (transformers' load_balancing_loss_func)
            load, prob = torch.stack([m.load for m in self.moe]).float(), torch.stack([m.mean_prob for m in self.moe])
            # f_i: the routed slots expert i got per token (they sum to k); P_i: its mean probability. Uniform: k
            aux = load.size(1) * (load.mean(0) / (B * T) * prob.mean(0)).sum()
            self.aux_loss, coef = aux.detach(), self.config.router_aux_loss_coef
            loss = loss + coef * aux if self.training and loss is not None and coef > 0 else loss
        return logits, loss

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        """One KVCache per layer, for max_len positions (at most block_size)."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds the context length block_size={c.block_size}")
        device, dtype = device or self.lm_head.weight.device, dtype or self.lm_head.weight.dtype
        # only the n_kv_head heads are cached: that is GQA's memory saving (Qwen3-8B caches 8 heads, not 32)
        return [KVCache(batch_size, c.n_kv_head, max_len, c.head_dim, device, dtype) for _ in range(c.n_layer)]

    def num_params(self, active=False):
        """Parameters, each counted once (a tied head is the embedding); active: less the experts a token skips."""
        skipped = sum((m.n_experts - m.top_k) * sum(p[0].numel() for p in m.experts.values()) for m in self.moe)
        return sum(p.numel() for p in self.parameters()) - (skipped if active else 0)

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6N for the matmuls plus 12 L (nh hd) T for attention scores
        and values (Kaplan et al. 2020; PaLM appendix B). N: the active parameters, less lookups (untied embedding)."""
        c = self.config
        n = self.num_params(active=True) - (0 if c.tie_word_embeddings else self.model.embed_tokens.weight.numel())
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # -------------------------------------------------------------------------------------------------------
    # Weights in the official layout

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None):
        """source: an official-layout directory, a hub repo id, or a PRESETS name; dtype: None is float32."""
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
        checkpoint_io.save_safetensors({k: v for k, v in _official(self.state_dict()).items() if k in keys}, directory)
        checkpoint_io.write_json(Path(directory) / "config.json", self.config.to_hf())


def _official(state):
    """A state dict under the official keys: each stacked (E, out, in) expert tensor split into E per-expert ones."""
    return {k: v for key, value in state.items() for k, v in ([(key.replace(".experts.", f".experts.{e}.") + ".weight",
            w) for e, w in enumerate(value)] if ".mlp.experts." in key else [(key, value)])}


def _expected_shapes(config):
    """{key: shape} of the official files for a config, read off the model built on the meta device."""
    with torch.device("meta"):
        state = _official(Qwen(config).state_dict())
    return {k: v.shape for k, v in state.items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def _load_hf(directory, dtype):
    """(config, state dict) from config.json + safetensors; a bad file stops at its first wrong tensor."""
    config = checkpoint_io.read_config(directory / "config.json", Config.from_hf)
    state, expected = {}, _expected_shapes(config)
    family = f"Qwen3-MoE (num_experts={config.n_experts})" if config.n_experts else "Qwen"   # 'not a ... checkpoint'
    for key, tensor in checkpoint_io.iter_safetensors(directory):
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue   # some exports write the tied head out as well; it is the embedding
        checkpoint_io.check_tensor(expected, key, tensor.shape, directory, family)
        state[key] = tensor.to(dtype=dtype).contiguous()
    checkpoint_io.check_complete(expected, state, directory)
    for key in [k for k in state if ".mlp.experts.0." in k]:   # per-expert tensors -> the stacked (E, out, in)
        state[key.replace(".experts.0.", ".experts.").removesuffix(".weight")] = torch.stack(
            [state.pop(key.replace(".experts.0.", f".experts.{e}.")) for e in range(config.n_experts)])
    return config, state


# -----------------------------------------------------------------------------------------------------------
# Chat format (Qwen2.5 / Qwen3 instruct: ChatML)


def encode_chat(tok, messages, add_generation_prompt=True, enable_thinking=None):
    """Token ids of a dialog in Qwen's ChatML (the HF repos' chat templates, tests/data/qwen*.jinja), no line breaks:
        <|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n
        <|im_start|>user\\nHi!<|im_end|>\\n<|im_start|>assistant\\n          <- the generation prompt
    tok: a bpe.py tokenizer with Qwen's special tokens, Qwen3's if it has <think> and </think>. Qwen2.5 adds the system
    message above when there is none; Qwen3 drops a reply's reasoning (up to </think>) and, with enable_thinking=False,
    ends the generation prompt with <think>\\n\\n</think>\\n\\n. Content is not stripped (as in the templates), and
    special-token text in it stays text, so a user cannot forge a turn. Prompts are the templates' ids; unlike Qwen3's
    template (a think block on replies after the last user turn) this is prefix-stable: a reply is encoded as once a
    user turn follows it, apart from "assistant\\n". The model answers until <|im_end|>."""
    roles, names = ("system", "user", "assistant"), ("<|im_start|>", "<|im_end|>")
    if absent := [n for n in names if n not in tok.special_tokens]:
        raise errors.BadInput(f"the tokenizer lacks {', '.join(absent)}: not a Qwen tokenizer")
    start, end, think, unthink = (tok.special_tokens.get(n) for n in (*names, "<think>", "</think>"))
    qwen3 = think is not None and unthink is not None

    def text(s):   # the text between two special tokens is tokenized whole, as HF does
        return tok.encode(s, allowed_special="none")

    def turn(role, content):
        body = text(f"{role}\n") + text(content) if role == "assistant" else text(f"{role}\n{content}")
        return [start] + body + [end] + text("\n")

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with 'role' system, user or assistant and a string "
                             f"'content', got {m!r}")
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."   # Qwen2.5's default
    ids = [] if qwen3 or messages and messages[0]["role"] == "system" else turn("system", system)
    for m in messages:
        reply = qwen3 and m["role"] == "assistant" and "</think>" in m["content"]
        ids += turn(m["role"], m["content"].split("</think>")[-1].lstrip("\n") if reply else m["content"])
    empty_think = [think] + text("\n\n") + [unthink] + text("\n\n") if qwen3 and enable_thinking is False else []
    return ids + [start] + text("assistant\n") + empty_think if add_generation_prompt else ids


Model = Qwen
