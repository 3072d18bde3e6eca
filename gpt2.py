"""GPT-2 in one file: a config, the blocks, the model, a KV cache, and the official weights.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners". GPT-2 is the original decoder-only
Transformer with three twists that every later model file in this repo changes again:
  - learned absolute position embeddings (wpe), added to the token embeddings (wte);
  - pre-LN blocks: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)); and a final ln_f;
  - the tanh approximation of GELU; and the LM head is the token embedding itself (tied weights).

The official checkpoints (openai-community/gpt2, -medium, -large, -xl) store the projections as TF-style
"Conv1D" weights of shape [in, out]; we keep plain nn.Linear ([out, in]) and transpose at the file boundary.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint_io
import hub
import lora


# -----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # defaults: a small model that trains on a laptop CPU in a few minutes (byte-level or small-BPE vocab)
    vocab_size: int = 4096
    block_size: int = 256                  # maximum context length (n_positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_inner: int | None = None             # MLP width; None: 4 * n_embd, as in every official size
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")

    @classmethod
    def from_hf(cls, d):
        """From an official config.json dict (GPT2Config); ValueError naming the key it cannot take."""
        d = checkpoint_io.hf_config(d, ("gpt2",))
        required = ("vocab_size", "n_layer", "n_head", "n_embd")
        optional = dict.fromkeys(("n_positions", "n_ctx", "n_inner"), int) | dict(
            layer_norm_epsilon=float, resid_pdrop="rate", bos_token_id="ids", eos_token_id="ids")
        checkpoint_io.check_keys(d, dict.fromkeys(required, int) | optional, required)
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {d['activation_function']!r:.60} is not GPT-2's tanh GELU")
        flags = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")
        if flag := next((f for f in flags if d.get(f)), None):
            raise ValueError(f"sets {flag}=true, which gpt2.py does not implement")
        if d.get("scale_attn_weights") is False:
            raise ValueError("sets scale_attn_weights=false, which gpt2.py does not implement")
        return cls(vocab_size=d["vocab_size"], block_size=d.get("n_positions", d.get("n_ctx", 1024)),
                   n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"], n_inner=d.get("n_inner"),
                   layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), dropout=d.get("resid_pdrop", 0.0),
                   bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

    def to_hf(self):
        """Back to the official config.json schema, so transformers' GPT2LMHeadModel loads our checkpoints."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.vocab_size, "n_positions": self.block_size, "n_ctx": self.block_size,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": self.n_inner,
            "activation_function": "gelu_new", "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": "float32",
        }


_GPT2 = dict(vocab_size=50257, block_size=1024, bos_token_id=50256, eos_token_id=50256)
PRESETS = {
    "gpt2": Config(**_GPT2, n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": Config(**_GPT2, n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": Config(**_GPT2, n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": Config(**_GPT2, n_layer=48, n_head=25, n_embd=1600),      # 1558M
}
HUB_IDS = {name: f"openai-community/{name}" for name in PRESETS}


# -----------------------------------------------------------------------------------------------------------
# Building blocks


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)   # q, k, v side by side
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hd)
        mask, is_causal = None, True
        if cache is not None:
            k, v = cache.update(pos, k, v)                                  # (B, nh, pos+T, hd)
            if pos > 0:
                # SDPA's is_causal puts its triangle at the top left, where query i (at position pos+i) would
                # see keys 0..i only: one new token sees every cached key (no mask), a chunk keys 0..pos+i
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)   # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                    # (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x):
        # GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel 2016)
        x = F.gelu(self.c_fc(x), approximate="tanh")
        return F.dropout(self.c_proj(x), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight   # tied: one Parameter, as in the official checkpoints
        self.apply(self._init_weights)
        # GPT-2's init: each projection into the residual stream gets std 0.02 / sqrt(number of residual adds)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, *, cache=None, pos=0, last_only=False):
        # idx (B, T) int64; targets (B, T) with -100 = ignored; pos: absolute position of idx[:, 0]
        # last_only: the logits of the last position only, (B, 1, V): all that sampling reads
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context length block_size="
                             f"{self.config.block_size}")
        positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))                # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache is not None else None, pos)
        x = x[:, -1:] if last_only else x                                   # (B, 1, C) or (B, T, C)
        logits = self.lm_head(self.ln_f(x))                                 # (B, 1, V) or (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1),
                                                             ignore_index=-100)
        return logits, loss

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        """One KVCache per layer, for max_len positions (at most block_size)."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds the context length block_size={c.block_size}")
        device, dtype = device or self.lm_head.weight.device, dtype or self.lm_head.weight.dtype
        return [KVCache(batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype) for _ in range(c.n_layer)]

    def num_params(self, active=False):
        """Parameters, each counted once (a tied head is the embedding). Dense: active == total."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6N for the matmuls plus 12 L (nh hd) T for attention
        scores and values (Kaplan et al. 2020; PaLM appendix B). N leaves out lookups: the position table."""
        c = self.config
        n = self.num_params() - self.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len

    # -------------------------------------------------------------------------------------------------------
    # Weights in the official layout

    @classmethod
    def from_pretrained(cls, source, *, dtype=None, device=None):
        """source: a directory in the official layout (ours or OpenAI's), a hub repo id, or a PRESETS name.
        dtype: the parameters' dtype (None: float32, whatever the files hold)."""
        directory = Path(hub.resolve(source if Path(source).is_dir() else HUB_IDS.get(source, source)))
        if (directory / lora.CONFIG).is_file():   # a LoRA run's adapter (PEFT's layout): its base, merged
            return lora.from_pretrained(cls, directory, dtype=dtype, device=device)
        dtype = dtype or torch.float32
        config, state = _load_hf(directory, dtype)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.wte.weight   # assign=True replaced the embedding: tie again
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors in the official layout (a tied head once, as the embedding;
        the projections as Conv1D [in, out])."""
        keys = _expected_shapes(self.config)
        checkpoint_io.save_safetensors({k: v.t() if k.endswith(_CONV1D) else v for k, v in self.state_dict().items()
                                        if k in keys}, directory)
        checkpoint_io.write_json(Path(directory) / "config.json", self.config.to_hf())


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _expected_shapes(config):
    """{key: shape} of the official files for a config, read off the model built on the meta device."""
    with torch.device("meta"):
        state = GPT(config).state_dict()
    return {k: v.shape[::-1] if k.endswith(_CONV1D) else v.shape for k, v in state.items() if k != "lm_head.weight"}


def _load_hf(directory, dtype):
    """(config, state dict) from config.json + safetensors; a bad file stops at its first wrong tensor."""
    config = checkpoint_io.read_config(directory / "config.json", Config.from_hf)
    state, expected = {}, _expected_shapes(config)
    for key, tensor in checkpoint_io.iter_safetensors(directory):
        key = key.removeprefix("transformer.")   # transformers' own save adds it
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue   # legacy causal-mask buffers; the head is the tied embedding
        checkpoint_io.check_tensor(expected, key, tensor.shape, directory, "GPT-2")
        state[key] = (tensor.t() if key.endswith(_CONV1D) else tensor).to(dtype=dtype).contiguous()
    checkpoint_io.check_complete(expected, state, directory)
    return config, state


Model = GPT
