"""Llama 3 / 3.1 / 3.2 / 3.3 in one file: a config, the blocks, the model, a KV cache, official weights, chat.

Grattafiori et al. 2024, "The Llama 3 Herd of Models". Against GPT-2 (gpt2.py), Llama changes every block part:
  - RMSNorm instead of LayerNorm (Zhang & Sennrich 2019): no mean subtraction, no bias, computed in fp32;
  - rotary position embeddings (RoPE, Su et al. 2021) on q and k instead of a learned position table; from 3.1
    on, the low frequencies are stretched by a scale factor so that the context grows from 8K to 128K;
  - grouped-query attention (GQA, Ainslie et al. 2023): n_kv_head key/value heads, each serving
    n_head / n_kv_head consecutive query heads, which shrinks the KV cache by that ratio;
  - a SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)); no biases anywhere;
  - a separate LM head, except in 3.2 1B/3B, which tie it to the token embedding.

Weights come in two official layouts, both read here: Hugging Face's (config.json + sharded safetensors, the
one we also write) and Meta's original one (original/consolidated.NN.pth + params.json). They differ in how
each head's rotary pairs are laid out: Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates
halves (x_i, x_{i + hd/2}). The loader permutes Meta's q and k rows into HF's order once, at load time.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import errors
import hub


# -----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # defaults: a small model that trains on a laptop CPU in a few minutes (byte-level or small-BPE vocab)
    vocab_size: int = 4096
    block_size: int = 256                  # maximum context length (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2                     # GQA: each KV head serves n_head // n_kv_head query heads
    n_embd: int = 128
    head_dim: int | None = None            # None: n_embd // n_head
    intermediate_size: int | None = None   # SwiGLU width; None: Meta's rule (ffn_width) for n_embd
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scale_factor: float | None = None     # Llama 3.1 frequency scaling; None: plain RoPE (Llama 3.0)
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192          # the context the unscaled model was pretrained on
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head} "
                                 f"(or give head_dim)")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dimensions")
        if self.intermediate_size is None:
            self.intermediate_size = ffn_width(self.n_embd)

    @classmethod
    def from_hf(cls, d):
        """From an official config.json dict (LlamaConfig), in the hub's spelling (rope_theta + rope_scaling)
        or transformers 5's (rope_parameters); ValueError naming the key it cannot take."""
        d = {k: v for k, v in d.items() if v is not None}   # null stands for the default, as in transformers
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {d.get('model_type')!r}, expected 'llama': these are weights of "
                             f"another family, load them with that family's model file")
        required = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
        hub.check_keys(d, dict.fromkeys(required + ("max_position_embeddings", "num_key_value_heads", "head_dim"), int)
                       | dict(rms_norm_eps=float, rope_theta=float, attention_dropout="rate", tie_word_embeddings=bool,
                              bos_token_id="ids", eos_token_id="ids"), required)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r:.60} is not Llama's silu (SwiGLU)")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"sets {flag}=true, which llama3.py does not implement")
        key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = d.get(key) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{key} is {rope!r:.60}: expected a JSON object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{key}: rope type {rope_type!r:.60}: llama3.py implements 'default' and 'llama3'")
        max_pos = d.get("max_position_embeddings", 2048)
        scaled = rope_type == "llama3"
        hub.check_keys(rope, dict(factor=float, low_freq_factor=float, high_freq_factor=float, rope_theta=float,
                                  original_max_position_embeddings=int), ["factor"] if scaled else [], key + ".")
        return cls(vocab_size=d["vocab_size"], block_size=max_pos, n_layer=d["num_hidden_layers"],
                   n_head=d["num_attention_heads"], n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"],
                   n_embd=d["hidden_size"], head_dim=d.get("head_dim"), intermediate_size=d["intermediate_size"],
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
                   rope_scale_factor=rope["factor"] if scaled else None,
                   rope_low_freq_factor=rope.get("low_freq_factor", 1.0) if scaled else 1.0,
                   rope_high_freq_factor=rope.get("high_freq_factor", 4.0) if scaled else 4.0,
                   # transformers falls back to max_position_embeddings when the original context is absent
                   rope_original_context=rope.get("original_max_position_embeddings", max_pos) if scaled else 8192,
                   tie_word_embeddings=d.get("tie_word_embeddings", False),
                   dropout=d.get("attention_dropout", 0.0),
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

    def to_hf(self):
        """Back to the hub's config.json schema, so transformers' LlamaForCausalLM loads our checkpoints."""
        rope_scaling = None
        if self.rope_scale_factor is not None:
            rope_scaling = {"rope_type": "llama3", "factor": self.rope_scale_factor,
                            "low_freq_factor": self.rope_low_freq_factor,
                            "high_freq_factor": self.rope_high_freq_factor,
                            "original_max_position_embeddings": self.rope_original_context}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "max_position_embeddings": self.block_size,
            "hidden_size": self.n_embd, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": self.dropout, "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": "float32",
        }


def ffn_width(dim, multiple_of=256, ffn_dim_multiplier=None):
    """Meta's SwiGLU width: 2/3 of 4*dim (so the three matrices cost what GPT's two do), times an optional
    multiplier, rounded up to a multiple. ffn_width(4096, 1024, 1.3) == 14336 (8B); ffn_width(2048, 256, 1.5)
    == 8192 (3.2 1B); ffn_width(128) == 512 (our default)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000)
_LONG = dict(block_size=131072, rope_scale_factor=8.0)   # 3.1 and later: 128K context
_STOP = [128001, 128008, 128009]   # <|end_of_text|>, <|eom_id|>, <|eot_id|>: where instruct models stop
PRESETS = {
    "llama3-8b": Config(**_LLAMA3, block_size=8192, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                        intermediate_size=14336, tie_word_embeddings=False, eos_token_id=128001),
    "llama3-8b-instruct": Config(**_LLAMA3, block_size=8192, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                                 intermediate_size=14336, tie_word_embeddings=False, eos_token_id=128009),
    "llama3.1-8b": Config(**_LLAMA3, **_LONG, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                          intermediate_size=14336, tie_word_embeddings=False, eos_token_id=128001),
    "llama3.1-8b-instruct": Config(**_LLAMA3, **_LONG, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                                   intermediate_size=14336, tie_word_embeddings=False, eos_token_id=_STOP),
    "llama3.2-1b": Config(**_LLAMA3, **_LONG | dict(rope_scale_factor=32.0), n_layer=16, n_head=32, n_kv_head=8,
                          n_embd=2048, head_dim=64, intermediate_size=8192, eos_token_id=128001),
    "llama3.2-1b-instruct": Config(**_LLAMA3, **_LONG | dict(rope_scale_factor=32.0), n_layer=16, n_head=32,
                                   n_kv_head=8, n_embd=2048, head_dim=64, intermediate_size=8192, eos_token_id=_STOP),
    "llama3.2-3b": Config(**_LLAMA3, **_LONG | dict(rope_scale_factor=32.0), n_layer=28, n_head=24, n_kv_head=8,
                          n_embd=3072, head_dim=128, intermediate_size=8192, eos_token_id=128001),
    "llama3.2-3b-instruct": Config(**_LLAMA3, **_LONG | dict(rope_scale_factor=32.0), n_layer=28, n_head=24,
                                   n_kv_head=8, n_embd=3072, head_dim=128, intermediate_size=8192, eos_token_id=_STOP),
    "llama3.3-70b": Config(**_LLAMA3, **_LONG, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
                           intermediate_size=28672, tie_word_embeddings=False, eos_token_id=_STOP),
}
HUB_IDS = {
    "llama3-8b": "meta-llama/Meta-Llama-3-8B", "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B", "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B", "llama3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B", "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.3-70b": "meta-llama/Llama-3.3-70B-Instruct",   # 3.3 exists only as an instruct model
}


# -----------------------------------------------------------------------------------------------------------
# Building blocks


def rope_frequencies(config):
    """The rotary inverse frequencies theta^(-2i/hd), i = 0..hd/2-1, with Llama 3.1's scaling when configured.

    Llama 3.1 (Meta's apply_scaling; transformers' "llama3" rope type): frequencies whose wavelength exceeds
    original_context / low_freq_factor are divided by the factor (positions look `factor` times closer), those
    shorter than original_context / high_freq_factor are kept, and the band between is blended linearly in
    original_context / wavelength. For the 8B (hd 128, theta 5e5, factor 8): the 1st of 64 frequencies is kept
    (wavelength 6.3 tokens) and the last is divided by 8 (wavelength 2.6M tokens).

    Always fp32: a bf16 frequency (3 significant digits) would put position 100000's angle ~200 radians off.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2).float() / hd))   # (hd/2,)
    if config.rope_scale_factor is None:
        return inv_freq
    factor, low, high = config.rope_scale_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= context / high) & (wavelen <= context / low)   # both ends inclusive, as in Meta's code
    return torch.where(in_band, blended, scaled)


def rotate_half(x):
    # HF's layout: dimension i pairs with i + hd/2; (x1, x2) -> (-x2, x1) is a 90-degree turn of every pair
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x (B, nh, T, hd); cos, sin (T, hd): each pair turned by angle position * frequency
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), normalized in fp32 and cast back before the gain (as HF and Meta do)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # spelled out: on the CPU this is ~3x faster than F.rms_norm, which makes extra fp32 copies
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """A static KV cache (as in gpt-fast): preallocated, written in place at the absolute position. It holds the
    n_kv_head heads only: that is GQA's memory saving (the 8B caches 8 heads, not 32)."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=None):
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, pos, k, v):
        # k, v: (B, nkv, T, hd) for positions pos..pos+T-1; returns every cached position so far
        T = k.size(2)
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, is_causal = None, T > 1
        if cache is not None:
            k, v = cache.update(pos, k, v)                                               # (B, nkv, pos+T, hd)
            if pos > 0 and T > 1:
                # query i sits at absolute position pos+i and may see keys 0..pos+i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                is_causal = False
            elif pos > 0:
                is_causal = False   # one new token sees the whole cache
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


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names follow the HF checkpoint keys (model.layers.N.self_attn.q_proj.weight, ...)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one Parameter, as in 3.2 1B/3B
        # not saved: recomputed from the config (from_pretrained too), kept in fp32 (the loader never casts it)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's init: the projections into the residual stream scaled by 1/sqrt(number of residual layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope(self, pos, T, dtype):
        """cos, sin (T, hd) for absolute positions pos..pos+T-1, computed in fp32 and cast to the activations."""
        positions = torch.arange(pos, pos + T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())          # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (T, hd): halves pair up (rotate_half)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx, targets=None, *, cache=None, pos=0):
        # idx (B, T) int64; targets (B, T) with -100 = ignored; pos: absolute position of idx[:, 0]
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context length block_size="
                             f"{self.config.block_size}")
        x = self.model.embed_tokens(idx)                                 # (B, T, C)
        cos, sin = self.rope(pos, T, torch.get_autocast_dtype(x.device.type)
                             if torch.is_autocast_enabled(x.device.type) else x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache[i] if cache is not None else None, pos)
        logits = self.lm_head(self.model.norm(x))                        # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        """One KVCache per layer, for max_len positions (at most block_size)."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds the context length block_size={c.block_size}")
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        return [KVCache(batch_size, c.n_kv_head, max_len, c.head_dim, device, dtype) for _ in range(c.n_layer)]

    def num_params(self, active=False):
        """Parameters, each counted once (a tied head is the embedding). Dense: active == total."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6N for the matmuls plus 12 L (nh hd) T for attention
        scores and values (Kaplan et al. 2020; PaLM appendix B). N leaves out an untied embedding (a lookup);
        a tied one is counted, as the head's matmul."""
        c = self.config
        n = self.num_params()
        if not c.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # -------------------------------------------------------------------------------------------------------
    # Weights in the official layouts

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None, rope_scale_factor=None):
        """source: a directory in HF's layout (ours or Meta's hub repos), a directory holding Meta's original
        format (consolidated.NN.pth + params.json, or such an original/ folder), a hub repo id, or a PRESETS name.

        rope_scale_factor: Llama 3.1's RoPE scale factor. Meta's params.json does not store it (8 for 3.1 and
        3.3, 32 for 3.2 1B/3B); it is then taken from this argument, else from a config.json beside the weights,
        else from the preset with the same architecture, else loading stops and says so. For an HF checkpoint
        it overrides config.json's factor. dtype: the parameters' dtype (None: float32; the hub files are bf16).
        """
        preset = PRESETS.get(source)
        directory = Path(hub.resolve(HUB_IDS[source] if preset and not Path(source).is_dir() else source))
        dtype = dtype or torch.float32
        meta_dir = _meta_dir(directory)
        if meta_dir is not None and not any((directory / f).exists() for f in ("model.safetensors", hub.INDEX)):
            config, state = _load_meta(meta_dir, directory, dtype, rope_scale_factor)
        else:
            config = hub.read_config(directory / "config.json", Config.from_hf)
            if rope_scale_factor is not None:
                config.rope_scale_factor = float(rope_scale_factor)
            state, expected = {}, _expected_shapes(config)
            for key, tensor in hub.iter_safetensors(directory):
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue   # some exports write the tied head out as well; it is the embedding
                hub.check_tensor(expected, key, tensor.shape, directory, "Llama 3")
                state[key] = tensor.to(dtype=dtype).contiguous()
        hub.check_complete(_expected_shapes(config), state, directory)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_frequencies(config)   # built on the meta device, the buffer has no values yet
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors in HF's layout (a tied head is written once, as the embedding)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items()
                 if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        hub.save_safetensors(state, directory)
        hub.write_json(directory / "config.json", self.config.to_hf())


def _expected_shapes(config):
    """{HF key: shape} for a config, without building the model."""
    c, hd = config, config.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.n_embd), "model.norm.weight": (c.n_embd,)}
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (c.n_embd,), p + "post_attention_layernorm.weight": (c.n_embd,),
                   p + "self_attn.q_proj.weight": (c.n_head * hd, c.n_embd),
                   p + "self_attn.k_proj.weight": (c.n_kv_head * hd, c.n_embd),
                   p + "self_attn.v_proj.weight": (c.n_kv_head * hd, c.n_embd),
                   p + "self_attn.o_proj.weight": (c.n_embd, c.n_head * hd),
                   p + "mlp.gate_proj.weight": (c.intermediate_size, c.n_embd),
                   p + "mlp.up_proj.weight": (c.intermediate_size, c.n_embd),
                   p + "mlp.down_proj.weight": (c.n_embd, c.intermediate_size)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.n_embd)
    return shapes


# -----------------------------------------------------------------------------------------------------------
# Meta's original format: consolidated.NN.pth (one per model-parallel rank) + params.json + tokenizer.model

_META_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def meta_key_to_hf(key):
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for unknown keys."""
    if key in _META_TOP_KEYS:
        return _META_TOP_KEYS[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _META_LAYER_KEYS:
        return f"model.layers.{parts[1]}.{_META_LAYER_KEYS[parts[2]]}"
    return None


def meta_to_hf_rows(w, n_heads):
    """Reorder the rows of a Meta wq/wk (interleaved rotary pairs) into HF's order (pairs split in halves).

    Per head, Meta's rows are (p0a, p0b, p1a, p1b, ...) and HF's are (p0a, p1a, ..., p0b, p1b, ...): with hd=4,
    rows [0 1 2 3] become [0 2 1 3]. (Shape-preserving: (n_heads * hd, dim) -> same.)
    """
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)   # (nh, 2, hd/2, dim) flattened


def _meta_dir(directory):
    """The folder with Meta's files: directory/original or directory itself; None when neither has them."""
    for d in (directory / "original", directory):
        if d.is_dir() and (any(d.glob("consolidated.*.pth")) or (d / "params.json").exists()):
            return d
    return None


def _config_from_params(params, meta_dir, directory, rope_scale_factor):
    """A Config from params.json, with what params.json does not store taken from elsewhere (see from_pretrained)."""
    params = {k: v for k, v in params.items() if v is not None}   # null stands for the default, as in from_hf
    required = ("dim", "n_layers", "n_heads", "vocab_size")
    hub.check_keys(params, dict.fromkeys(required + ("n_kv_heads", "multiple_of"), int) | dict(
        ffn_dim_multiplier=float, norm_eps=float, rope_theta=float, use_scaled_rope=bool), required)
    dim, n_heads = params["dim"], params["n_heads"]
    config = Config(vocab_size=params["vocab_size"], n_layer=params["n_layers"], n_head=n_heads,
                    n_kv_head=params.get("n_kv_heads", n_heads), n_embd=dim,
                    intermediate_size=ffn_width(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
                    rms_norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 500000.0),
                    tie_word_embeddings=False, block_size=8192)
    # a config.json beside the weights (HF's hub repos carry both layouts) knows the factor and the context;
    # failing that, an official size with these dimensions does
    hf_json = next((p / "config.json" for p in (directory, meta_dir.parent) if (p / "config.json").exists()), None)
    hf = hub.read_config(hf_json, Config.from_hf) if hf_json else None

    def arch(c):
        return c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.intermediate_size

    official = next((p for p in PRESETS.values() if arch(p) == arch(config) and p.rope_scale_factor), None)
    known = next((c for c in (hf, official) if c is not None and c.rope_scale_factor), None)
    if params.get("use_scaled_rope"):
        factor = rope_scale_factor or (known.rope_scale_factor if known else None)
        if factor is None:
            raise ValueError("sets use_scaled_rope, but Meta's format does not store the RoPE scale factor (8 for "
                             "Llama 3.1/3.3, 32 for 3.2 1B/3B), no config.json is beside it and no official size has "
                             "these dimensions: pass it, e.g. Llama.from_pretrained(path, rope_scale_factor=32)")
        config.rope_scale_factor = float(factor)
        config.block_size = 131072   # Llama 3.1 and later: 128K
        if known:
            config.block_size, config.rope_original_context = known.block_size, known.rope_original_context
            config.rope_low_freq_factor, config.rope_high_freq_factor = (known.rope_low_freq_factor,
                                                                         known.rope_high_freq_factor)
    elif rope_scale_factor is not None:
        config.rope_scale_factor = float(rope_scale_factor)
    if hf:
        config.bos_token_id, config.eos_token_id = hf.bos_token_id, hf.eos_token_id
    elif config.vocab_size == 128256:   # Llama 3's tokenizer: stop wherever an instruct model may stop
        config.bos_token_id, config.eos_token_id = 128000, list(_STOP)
    return config


def _load_meta(meta_dir, directory, dtype, rope_scale_factor):
    """(config, HF-keyed state dict) from consolidated.NN.pth shards, concatenated and permuted as HF's
    convert_llama_weights_to_hf.py does."""
    paths = sorted(meta_dir.glob("consolidated.*.pth"))
    if not (meta_dir / "params.json").exists():
        raise errors.BadInput(f"{meta_dir}: Meta checkpoint without params.json (the architecture: dim, "
                              f"n_layers, n_heads, ...); copy it from the release beside consolidated.00.pth")
    if not paths:
        raise errors.BadInput(f"{meta_dir}: params.json but no consolidated.NN.pth weights")
    config = hub.read_config(meta_dir / "params.json",
                             lambda params: _config_from_params(params, meta_dir, directory, rope_scale_factor))
    shards = []
    for p in paths:
        try:
            # weights_only: a pickle may otherwise run code; mmap: shards stay on disk until each tensor is copied
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise errors.BadInput(f"{p}: not a readable weights-only torch checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
    # Model-parallel shards split each matrix along the dimension its rank owns: output rows (dim 0) for wq,
    # wk, wv, w1, w3, output and (in Llama 3) tok_embeddings; input columns (dim 1) for wo and w2. Norms are
    # replicated.
    for p, s in zip(paths[1:], shards[1:]):
        if s.keys() != shards[0].keys():
            odd = sorted(s.keys() ^ shards[0].keys())[0]
            raise errors.BadInput(f"{meta_dir}: {paths[0].name} and {p.name} hold different keys (e.g. {odd!r}); "
                                  f"all model-parallel shards of one checkpoint hold the same keys")
    expected = _expected_shapes(config) | {"lm_head.weight": (config.vocab_size, config.n_embd)}
    state, output = {}, None
    for key in shards[0]:
        if key == "rope.freqs":
            continue   # a Llama 2-era buffer of plain RoPE frequencies, recomputed here
        hf_key = meta_key_to_hf(key)
        if hf_key is None:
            raise errors.BadInput(f"{paths[0]}: unexpected key {key!r}: not a Llama 3 checkpoint in Meta's format")
        parts = [s[key] for s in shards]
        if len(parts) == 1:
            tensor = parts[0]   # still the mapped file: no copy unless a permutation or a dtype needs one
        elif key.endswith("norm.weight"):
            tensor = parts[0].clone()   # a copy, or this small tensor would keep shard 0's whole map alive
        else:
            tensor = torch.cat(parts, dim=1 if key.endswith(("wo.weight", "w2.weight")) else 0)
        hub.check_tensor(expected, hf_key, tensor.shape, meta_dir, "Llama 3", "params.json", shown_key=key)
        if key.endswith("wq.weight"):
            tensor = meta_to_hf_rows(tensor, config.n_head)
        elif key.endswith("wk.weight"):
            tensor = meta_to_hf_rows(tensor, config.n_kv_head)
        tensor = tensor.to(dtype=dtype).contiguous()
        if hf_key == "lm_head.weight":
            output = tensor   # tied or not: decided below, once the embedding is known
        else:
            state[hf_key] = tensor
    # 3.2 1B/3B tie the head to the embedding; Meta's files may still carry it as `output` (an equal copy)
    embed = state.get("model.embed_tokens.weight")
    if output is None or (embed is not None and torch.equal(output, embed)):
        config.tie_word_embeddings = True
    else:
        state["lm_head.weight"] = output
    return config, state


# -----------------------------------------------------------------------------------------------------------
# Chat format (Llama 3 instruct)


def encode_chat(tok, messages, add_generation_prompt=True):
    """Token ids of a dialog in Llama 3's chat format (Meta's ChatFormat; the jinja template of the HF repos):

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi!<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n          <- the generation prompt

    (no line breaks between the pieces). tok: a bpe.py tokenizer with Llama 3's special tokens. messages: dicts
    with "role" and "content"; content is stripped, and special-token text inside it stays plain text (as in
    Meta's encode), so a user cannot forge a header. The model answers until <|eot_id|>.
    """
    special = tok.special_tokens
    names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    absent = [n for n in names if n not in special]
    if absent:
        raise errors.BadInput(f"the tokenizer lacks {', '.join(absent)}: not a Llama 3 tokenizer")
    bos, start, end, eot = (special[n] for n in names)

    def header(role):
        return [start] + tok.encode(role, allowed_special="none") + [end] + tok.encode("\n\n", allowed_special="none")

    ids = [bos]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        ids += header(m["role"]) + tok.encode(m["content"].strip(), allowed_special="none") + [eot]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


Model = Llama
