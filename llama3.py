"""Llama 3 / 3.1 / 3.2 / 3.3 in one file: a config, the blocks, the model, a KV cache, the official weights, chat.

Grattafiori et al. 2024, "The Llama 3 Herd of Models". Against GPT-2 (gpt2.py), Llama changes every block part:
  - RMSNorm instead of LayerNorm (Zhang & Sennrich 2019): no mean subtraction, no bias, computed in fp32;
  - rotary position embeddings (RoPE, Su et al. 2021) on q and k instead of a learned position table; from 3.1
    on, the low frequencies are stretched by a scale factor so that the context grows from 8K to 128K;
  - grouped-query attention (GQA, Ainslie et al. 2023): n_head / n_kv_head query heads share a KV head;
  - a SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)); no biases anywhere;
  - a separate LM head, except in 3.2 1B/3B, which tie it to the token embedding.

Weights are read in both official layouts: Hugging Face's (config.json + sharded safetensors; we write it too)
and Meta's (original/consolidated.NN.pth + params.json), whose q and k rows pair rotary dims interleaved
(x0, x1), (x2, x3), ... where HF pairs halves (x_i, x_{i + hd/2}): the loader permutes them once, at load time.
"""
import math
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
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head} (or give head_dim)")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of dimensions")
        self.intermediate_size = self.intermediate_size or ffn_width(self.n_embd)

    @classmethod
    def from_hf(cls, d):
        """From an official config.json dict (LlamaConfig); ValueError naming the key it cannot take.
        RoPE comes in the hub's spelling (rope_theta + rope_scaling) or in transformers 5's (rope_parameters)."""
        d = checkpoint_io.hf_config(d, ("llama",))
        required = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
        optional = dict.fromkeys(("max_position_embeddings", "num_key_value_heads", "head_dim"), int) | dict(
            rms_norm_eps=float, rope_theta=float, attention_dropout="rate", tie_word_embeddings=bool,
            bos_token_id="ids", eos_token_id="ids")
        checkpoint_io.check_keys(d, dict.fromkeys(required, int) | optional, required)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r:.60} is not Llama's silu (SwiGLU)")
        if flag := next((f for f in ("attention_bias", "mlp_bias") if d.get(f)), None):
            raise ValueError(f"sets {flag}=true, which llama3.py does not implement")
        rope_type, rope = checkpoint_io.read_rope(d, {"default": {}, "llama3": dict(
            factor=float, low_freq_factor=float, high_freq_factor=float, original_max_position_embeddings=int)},
            {"llama3": ["factor"]})
        max_pos = d.get("max_position_embeddings", 2048)   # also the original context when none is given
        scaling = dict(rope_scale_factor=rope["factor"], rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
                       rope_high_freq_factor=rope.get("high_freq_factor", 4.0), rope_original_context=rope.get(
                           "original_max_position_embeddings", max_pos)) if rope_type == "llama3" else {}
        return cls(vocab_size=d["vocab_size"], block_size=max_pos, n_layer=d["num_hidden_layers"],
                   n_head=d["num_attention_heads"], n_kv_head=d.get("num_key_value_heads", d["num_attention_heads"]),
                   n_embd=d["hidden_size"], head_dim=d.get("head_dim"), intermediate_size=d["intermediate_size"],
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope["rope_theta"], **scaling,
                   tie_word_embeddings=d.get("tie_word_embeddings", False), dropout=d.get("attention_dropout", 0.0),
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

    def to_hf(self):
        """Back to the official config.json schema, so transformers' LlamaForCausalLM loads our checkpoints."""
        rope_scaling = None if self.rope_scale_factor is None else {
            "rope_type": "llama3", "factor": self.rope_scale_factor, "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_context}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "max_position_embeddings": self.block_size, "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling, "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": self.dropout, "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": "float32"}


def ffn_width(dim, multiple_of=256, ffn_dim_multiplier=None):
    """Meta's SwiGLU width: 2/3 of 4*dim (so the three matrices cost what GPT's two do), times an optional
    multiplier, rounded up to a multiple. ffn_width(4096, 1024, 1.3) == 14336 (8B); ffn_width(128) == 512."""
    hidden = int(2 * 4 * dim / 3)
    hidden = hidden if ffn_dim_multiplier is None else int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, n_kv_head=8, bos_token_id=128000)
_STOP = [128001, 128008, 128009]   # <|end_of_text|>, <|eom_id|>, <|eot_id|>: where instruct models stop
_LONG = dict(block_size=131072, rope_scale_factor=8.0)   # 3.1 and later: 128K context
_8B = dict(_LLAMA3, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336, tie_word_embeddings=False)
_1B = dict(_LLAMA3, **_LONG | dict(rope_scale_factor=32.0), n_layer=16, n_head=32, n_embd=2048, head_dim=64,
           intermediate_size=8192)
_3B = _1B | dict(n_layer=28, n_head=24, n_embd=3072, head_dim=128)
_70B = dict(_LLAMA3, **_LONG, n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672, tie_word_embeddings=False)
_SIZES = {   # name: (its repo on the hub under meta-llama/, config)
    "llama3-8b": ("Meta-Llama-3-8B", Config(**_8B, block_size=8192, eos_token_id=128001)),
    "llama3-8b-instruct": ("Meta-Llama-3-8B-Instruct", Config(**_8B, block_size=8192, eos_token_id=128009)),
    "llama3.1-8b": ("Llama-3.1-8B", Config(**_8B, **_LONG, eos_token_id=128001)),
    "llama3.1-8b-instruct": ("Llama-3.1-8B-Instruct", Config(**_8B, **_LONG, eos_token_id=_STOP)),
    "llama3.2-1b": ("Llama-3.2-1B", Config(**_1B, eos_token_id=128001)),
    "llama3.2-1b-instruct": ("Llama-3.2-1B-Instruct", Config(**_1B, eos_token_id=_STOP)),
    "llama3.2-3b": ("Llama-3.2-3B", Config(**_3B, eos_token_id=128001)),
    "llama3.2-3b-instruct": ("Llama-3.2-3B-Instruct", Config(**_3B, eos_token_id=_STOP)),
    "llama3.3-70b": ("Llama-3.3-70B-Instruct", Config(**_70B, eos_token_id=_STOP)),   # 3.3 is instruct only
}
PRESETS = {name: config for name, (_, config) in _SIZES.items()}
HUB_IDS = {name: f"meta-llama/{repo}" for name, (repo, _) in _SIZES.items()}


# -----------------------------------------------------------------------------------------------------------
# Building blocks


def rope_frequencies(config):
    """The rotary inverse frequencies theta^(-2i/hd), i = 0..hd/2-1, with Llama 3.1's scaling when configured
    (Meta's apply_scaling): wavelengths over original_context / low_freq_factor are stretched by the factor, those
    under original_context / high_freq_factor kept, the band between blended (8B: the 1st of 64 kept, wavelength
    6.3 tokens; the last divided by 8, 2.6M tokens). Always fp32: bf16 would put position 100000 ~200 rad off."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2).float() / hd))   # (hd/2,)
    if config.rope_scale_factor is None:
        return inv_freq
    factor, low, high, context = (config.rope_scale_factor, config.rope_low_freq_factor,
                                  config.rope_high_freq_factor, config.rope_original_context)
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)   # 0 at the band's long end, 1 at its short end
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, blended)
    return torch.where(wavelen < context / high, inv_freq, scaled)   # the band's ends inclusive, as in Meta's code


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
            norm=RMSNorm(config.n_embd, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one Parameter, as in 3.2 1B/3B
        # not saved: recomputed from the config (from_pretrained too), kept in fp32 (the loader never casts it)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's init: each projection into the residual stream gets std 0.02 / sqrt(number of residual adds)
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
        return logits, loss

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        """One KVCache per layer, for max_len positions (at most block_size)."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds the context length block_size={c.block_size}")
        device, dtype = device or self.lm_head.weight.device, dtype or self.lm_head.weight.dtype
        # only the n_kv_head heads are cached: that is GQA's memory saving (the 8B caches 8 heads, not 32)
        return [KVCache(batch_size, c.n_kv_head, max_len, c.head_dim, device, dtype) for _ in range(c.n_layer)]

    def num_params(self, active=False):
        """Parameters, each counted once (a tied head is the embedding). Dense: active == total."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6N for the matmuls plus 12 L (nh hd) T for attention
        scores and values (Kaplan et al. 2020; PaLM appendix B). N leaves out lookups: an untied embedding."""
        c = self.config
        n = self.num_params() - (0 if c.tie_word_embeddings else self.model.embed_tokens.weight.numel())
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # -------------------------------------------------------------------------------------------------------
    # Weights in the official layout

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None, rope_scale_factor=None):
        """source: a directory in the official layout (HF's, as ours, or Meta's original, in it or in original/),
        a hub repo id, or a PRESETS name. dtype: the parameters' dtype (None: float32, whatever the files hold).
        rope_scale_factor: Llama 3.1's RoPE scale factor, over the checkpoint's; Meta's params.json lacks it."""
        directory = Path(hub.resolve(source if Path(source).is_dir() else HUB_IDS.get(source, source)))
        if (directory / lora.CONFIG).is_file():   # a LoRA run's adapter (PEFT's layout): its base, merged
            return lora.from_pretrained(cls, directory, dtype=dtype, device=device)
        dtype = dtype or torch.float32
        meta_dir = _meta_dir(directory)
        config, state = (_load_hf(directory, dtype) if meta_dir is None
                         else _load_meta(meta_dir, directory, dtype, rope_scale_factor))
        config.rope_scale_factor = config.rope_scale_factor if rope_scale_factor is None else float(rope_scale_factor)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight   # assign=True replaced the embedding: tie again
        model.inv_freq = rope_frequencies(config)   # built on the meta device, the buffer has no values yet
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors in the official layout (a tied head once, as the embedding)."""
        keys = _expected_shapes(self.config)
        checkpoint_io.save_safetensors({k: v for k, v in self.state_dict().items() if k in keys}, directory)
        checkpoint_io.write_json(Path(directory) / "config.json", self.config.to_hf())


def _expected_shapes(config):
    """{key: shape} of the official files for a config, read off the model built on the meta device."""
    with torch.device("meta"):
        state = Llama(config).state_dict()
    return {k: v.shape for k, v in state.items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def _load_hf(directory, dtype):
    """(config, state dict) from config.json + safetensors; a bad file stops at its first wrong tensor."""
    config = checkpoint_io.read_config(directory / "config.json", Config.from_hf)
    state, expected = {}, _expected_shapes(config)
    for key, tensor in checkpoint_io.iter_safetensors(directory):
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue   # some exports write the tied head out as well; it is the embedding
        checkpoint_io.check_tensor(expected, key, tensor.shape, directory, "Llama 3")
        state[key] = tensor.to(dtype=dtype).contiguous()
    checkpoint_io.check_complete(expected, state, directory)
    return config, state


# -----------------------------------------------------------------------------------------------------------
# Meta's original format: consolidated.NN.pth (one per model-parallel rank) + params.json + tokenizer.model

_META_LAYER_KEYS = {f"{meta}.weight": f"{hf}.weight" for meta, hf in (   # Meta's name in a layer -> HF's
    ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"), ("feed_forward.w3", "mlp.up_proj"),
    ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))}
_META_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def meta_to_hf_rows(w, n_heads):
    """Meta's wq/wk rows (interleaved rotary pairs) in HF's order (halves): a head of 4, [0 1 2 3] -> [0 2 1 3]."""
    return w.view(n_heads, -1, 2, w.size(1)).transpose(1, 2).reshape(w.shape)   # (nh, hd/2, 2, C) -> (nh, 2, hd/2, C)


def _meta_dir(directory):
    """directory/original or directory itself, whichever has Meta's files; None if neither, or if HF's are here."""
    if any((directory / f).exists() for f in ("model.safetensors", checkpoint_io.INDEX)):
        return None
    return next((d for d in (directory / "original", directory)
                 if d.is_dir() and (any(d.glob("consolidated.*.pth")) or (d / "params.json").exists())), None)


def _config_from_params(params, rope_scale_factor):
    """A Config from params.json, which lacks the stop tokens (Llama 3's are taken) and, from 3.1 on, the RoPE
    scale factor (taken from the argument, else from the official size with these dimensions)."""
    params = {k: v for k, v in params.items() if v is not None}   # null stands for the default, as in from_hf
    required = ("dim", "n_layers", "n_heads", "vocab_size")
    checkpoint_io.check_keys(params, dict.fromkeys(required + ("n_kv_heads", "multiple_of"), int) | dict(
        ffn_dim_multiplier=float, norm_eps=float, rope_theta=float, use_scaled_rope=bool), required)
    dim, n_heads = params["dim"], params["n_heads"]
    config = Config(vocab_size=params["vocab_size"], block_size=8192, n_layer=params["n_layers"], n_head=n_heads,
                    n_kv_head=params.get("n_kv_heads", n_heads), n_embd=dim,
                    intermediate_size=ffn_width(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
                    rms_norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 500000.0))
    if config.vocab_size == 128256:   # Llama 3's tokenizer: stop wherever an instruct model may stop
        config.bos_token_id, config.eos_token_id = 128000, list(_STOP)
    if params.get("use_scaled_rope"):
        dims = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
        official = [p.rope_scale_factor for p in PRESETS.values()
                    if p.rope_scale_factor and all(getattr(p, f) == getattr(config, f) for f in dims)]
        if rope_scale_factor is None and not official:
            raise ValueError("sets use_scaled_rope, but Meta's format does not store the RoPE scale factor (8 for 3.1/"
                             "3.3, 32 for 3.2 1B/3B), no config.json is beside it and no official size has these "
                             "dimensions: pass it, e.g. Llama.from_pretrained(path, rope_scale_factor=32)")
        config.block_size, config.rope_scale_factor = 131072, float(rope_scale_factor or official[0])   # 128K
    return config


def _load_meta(meta_dir, directory, dtype, rope_scale_factor):
    """(config, HF-keyed state dict) from consolidated.NN.pth shards, concatenated and permuted as HF's
    convert_llama_weights_to_hf.py does. A config.json beside them (as in HF's hub repos) is the config."""
    paths = sorted(meta_dir.glob("consolidated.*.pth"))
    beside = [p / "config.json" for p in (directory, meta_dir.parent) if (p / "config.json").exists()]
    config_path = beside[0] if beside else meta_dir / "params.json"
    if not config_path.exists() or not paths:
        raise errors.BadInput(f"{meta_dir}: " + ("params.json but no consolidated.NN.pth weights" if not paths else
                                                 "Meta checkpoint without params.json (dim, n_layers, n_heads, ...)"))
    config = checkpoint_io.read_config(config_path, Config.from_hf if beside else
                                       lambda params: _config_from_params(params, rope_scale_factor))
    config.tie_word_embeddings = False   # until the weights show an output.weight equal to the embedding
    shards, names = checkpoint_io.load_pth_shards(paths), _META_TOP_KEYS | {
        f"layers.{i}.{meta}": f"model.layers.{i}.{hf}" for i in range(config.n_layer)
        for meta, hf in _META_LAYER_KEYS.items()}
    state, expected = {}, _expected_shapes(config)
    for key in shards[0]:
        if key == "rope.freqs":
            continue   # a Llama 2-era buffer of plain RoPE frequencies, recomputed here
        if key not in names:
            raise errors.BadInput(f"{paths[0]}: unexpected key {key!r}: not a Llama 3 checkpoint in Meta's format "
                                  f"with the {config_path.name} beside it")
        # Model-parallel shards split wo and w2 by input columns, the other matrices by output rows; norms are
        # replicated, and copied (a view would keep shard 0's map alive). A single shard stays mapped, uncopied.
        parts = [s[key] for s in shards]
        tensor = (parts[0] if len(parts) == 1 else parts[0].clone() if key.endswith("norm.weight")
                  else torch.cat(parts, dim=1 if key.endswith(("wo.weight", "w2.weight")) else 0))
        checkpoint_io.check_tensor(expected, names[key], tensor.shape, meta_dir, "Llama 3", config_path.name, key)
        if key.endswith(("wq.weight", "wk.weight")):
            tensor = meta_to_hf_rows(tensor, config.n_head if key.endswith("wq.weight") else config.n_kv_head)
        state[names[key]] = tensor.to(dtype=dtype).contiguous()
    # 3.2 1B/3B tie the head to the embedding; Meta's files may still carry it as `output` (an equal copy)
    output, embed = state.pop("lm_head.weight", None), state.get("model.embed_tokens.weight")
    config.tie_word_embeddings = output is None or (embed is not None and torch.equal(output, embed))
    state |= {} if config.tie_word_embeddings else {"lm_head.weight": output}
    checkpoint_io.check_complete(_expected_shapes(config), state, meta_dir)
    return config, state


# -----------------------------------------------------------------------------------------------------------
# Chat format (Llama 3 instruct)


def encode_chat(tok, messages, add_generation_prompt=True):
    """Token ids of a dialog in Llama 3's chat format (Meta's ChatFormat; the HF repos' template), no line breaks:
        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi!<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n          <- the generation prompt
    tok: a bpe.py tokenizer with Llama 3's special tokens. messages: dicts with "role" and "content"; content is
    stripped, and special-token text inside it stays plain text (as in Meta's encode), so a user cannot forge a
    header. The model answers until <|eot_id|>."""
    names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    if absent := [n for n in names if n not in tok.special_tokens]:
        raise errors.BadInput(f"the tokenizer lacks {', '.join(absent)}: not a Llama 3 tokenizer")
    bos, start, end, eot = (tok.special_tokens[n] for n in names)

    def header(role):
        return [start] + tok.encode(role, allowed_special="none") + [end] + tok.encode("\n\n", allowed_special="none")

    ids = [bos]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        ids += header(m["role"]) + tok.encode(m["content"].strip(), allowed_special="none") + [eot]
    return ids + header("assistant") if add_generation_prompt else ids


Model = Llama
