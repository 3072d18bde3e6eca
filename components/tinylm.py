"""
The tiny byte-level language model every training comparison of the harness uses, and its data.

- Data: bytes of Python's own standard library source, present wherever Python is (offline), the last 10% held
  out; batches drawn from a seeded generator, so every variant sees the same batches in the same order.
- TinyLM: embedding, a position scheme, n_layer blocks built from the catalogue's parts by TinyConfig's names
  (attention, position, norm and placement, FFN or MoE), a final norm when pre-norm, a linear head.
- train_variant: AdamW with warmup and cosine decay; returns the loss curve, held-out loss at each evaluation
  length, parameter counts (active ones for MoE) and the experts' load imbalance.
"""
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.attention import Attention, SparseAttention, sliding_window_mask
from components.ffn import GLU, MLP, glu_hidden
from components.mla import MLA
from components.moe import MoE
from components.norms import LayerNorm, PostNormBlock, PreNormBlock, RMSNorm
from components.positions import (LearnedPositionEmbedding, NoPositionEncoding, SinusoidalPositionEmbedding,
                                  alibi_bias, rope_cos_sin, rope_inv_freq)

# -----------------------------------------------------------------------------
# data: bytes of Python's own standard library, present wherever Python is


def stdlib_bytes(max_bytes):
    """The first max_bytes of the standard library's top-level .py files, in sorted file-name order."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                chunks.append(f.read())
            total += len(chunks[-1])
            if total >= max_bytes:
                break
    data = b"\n".join(chunks)[:max_bytes]
    if len(data) < 100_000:
        raise FileNotFoundError(f"found only {len(data)} bytes of .py files under {root}; need at least 100000")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ByteData:
    """Byte-level train/validation split (the last 10% is validation) with seeded random batches."""

    def __init__(self, max_bytes):
        data = stdlib_bytes(max_bytes)
        n = int(0.9 * len(data))
        self.train, self.val = data[:n], data[n:]

    def batch(self, split, batch_size, T, generator, device):
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - T - 1, (batch_size,), generator=generator)
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
        return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# the tiny model every training comparison uses


@dataclass
class TinyConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64  # training length
    max_len: int = 256  # rows of a learned position table: the longest evaluation length
    attn: str = "mha"  # mha (with n_kv_head: GQA / MQA) | mla | sparse
    n_kv_head: int = None
    window: int = None  # sliding-window attention
    topk: int = 16  # sparse attention
    pos: str = "rope"  # rope | learned | sinusoidal | alibi | none
    norm: str = "rms"  # rms | layer
    prenorm: bool = True
    qk_norm: bool = False
    ffn: str = "swiglu"  # gelu | swiglu | geglu | reglu | moe
    ffn_hidden: int = None  # default 4 * n_embd for gelu, glu_hidden(n_embd) for the gated ones
    n_expert: int = 4
    top_k: int = 1
    router: str = "softmax"
    n_shared: int = 0
    capacity_factor: float = None
    bias_update_rate: float = 0.0
    aux_coef: float = 0.01


def make_attention(cfg):
    if cfg.attn == "mla":
        hs = cfg.n_embd // cfg.n_head
        return MLA(cfg.n_embd, cfg.n_head, kv_lora_rank=cfg.n_embd // 2, qk_nope_head_dim=hs,
                   qk_rope_head_dim=hs // 2, v_head_dim=hs)
    if cfg.attn == "sparse":
        return SparseAttention(cfg.n_embd, cfg.n_head, cfg.topk)
    return Attention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, qk_norm=cfg.qk_norm)


def make_ffn(cfg):
    acts = {"gelu": "gelu", "swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
    if cfg.ffn == "gelu":
        return MLP(cfg.n_embd, cfg.ffn_hidden or 4 * cfg.n_embd, bias=False)
    if cfg.ffn == "moe":  # renormalized top-1 weights would all be 1, leaving the router without a gradient
        return MoE(cfg.n_embd, cfg.ffn_hidden or glu_hidden(cfg.n_embd), cfg.n_expert, cfg.top_k, cfg.router,
                   cfg.n_shared, renormalize=cfg.top_k > 1, capacity_factor=cfg.capacity_factor,
                   bias_update_rate=cfg.bias_update_rate)
    return GLU(cfg.n_embd, cfg.ffn_hidden or glu_hidden(cfg.n_embd), act=acts[cfg.ffn])


def make_norm(cfg):
    return RMSNorm(cfg.n_embd) if cfg.norm == "rms" else LayerNorm(cfg.n_embd)


def make_block(cfg):
    block = PreNormBlock if cfg.prenorm else PostNormBlock
    return block(make_attention(cfg), make_ffn(cfg), make_norm(cfg), make_norm(cfg))


class TinyLM(nn.Module):
    """Byte-level decoder: embedding, position scheme, n_layer blocks, (final norm when pre-norm), linear head."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 4:
            raise ValueError(f"n_embd={cfg.n_embd} must be n_head={cfg.n_head} times a multiple of 4 (RoPE pairs, "
                             f"and MLA's rotary half of a head)")
        choices = dict(attn=("mha", "mla", "sparse"), pos=("rope", "learned", "sinusoidal", "alibi", "none"),
                       norm=("rms", "layer"), ffn=("gelu", "swiglu", "geglu", "reglu", "moe"))
        for field, allowed in choices.items():
            if getattr(cfg, field) not in allowed:
                raise ValueError(f"TinyConfig.{field}={getattr(cfg, field)!r}: expected one of {allowed}")
        if cfg.attn == "mla" and cfg.pos != "rope":
            raise ValueError(f"attn='mla' needs pos='rope' (its decoupled rotary key), got pos={cfg.pos!r}")
        self.cfg = cfg
        self.wte = nn.Embedding(256, cfg.n_embd)
        self.pos = {"learned": lambda: LearnedPositionEmbedding(cfg.max_len, cfg.n_embd),
                    "sinusoidal": lambda: SinusoidalPositionEmbedding(cfg.n_embd)}.get(cfg.pos, NoPositionEncoding)()
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.prenorm else None  # a post-norm stack ends normalized already
        self.lm_head = nn.Linear(cfg.n_embd, 256, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        # the fixed sinusoids have unit amplitude; embeddings of std 0.02 would drown under them, so, as in
        # Vaswani et al. (section 3.4), token embeddings start at std 1/sqrt(d) and are multiplied by sqrt(d)
        self.emb_scale = math.sqrt(cfg.n_embd) if cfg.pos == "sinusoidal" else 1.0
        if cfg.pos == "sinusoidal":
            nn.init.normal_(self.wte.weight, std=cfg.n_embd ** -0.5)

    def attn_kwargs(self, T, device):
        cfg, kwargs = self.cfg, {}
        if cfg.pos == "rope":
            rope_dim = cfg.n_embd // cfg.n_head // (2 if cfg.attn == "mla" else 1)
            kwargs["rope"] = rope_cos_sin(rope_inv_freq(rope_dim), torch.arange(T, device=device))
        if cfg.attn == "mha" and cfg.pos == "alibi":
            kwargs["mask"] = alibi_bias(cfg.n_head, T, device=device)
        if cfg.attn == "mha" and cfg.window is not None:
            kwargs["mask"] = sliding_window_mask(T, cfg.window, device=device)
        return kwargs

    def forward(self, idx):
        x = self.pos(self.wte(idx) * self.emb_scale)
        kwargs = self.attn_kwargs(idx.size(1), idx.device)
        for block in self.blocks:
            x = block(x, **kwargs)
        if self.norm_f is not None:
            x = self.norm_f(x)
        return self.lm_head(x)

    def aux_loss(self):
        """Balancing losses of MoE layers and the sparse-attention indexer loss, where present."""
        total = 0.0
        for m in self.modules():
            if isinstance(m, MoE) and m.aux_loss is not None:
                total = total + self.cfg.aux_coef * m.aux_loss
            if isinstance(m, SparseAttention):
                total = total + m.indexer_loss
        return total

    def load_imbalance(self):
        """max load / mean load over experts, averaged over MoE layers (1.0 is perfect balance); None if dense."""
        loads = [m.load.float() for m in self.modules() if isinstance(m, MoE)]
        return None if not loads else sum((l.max() / l.mean()).item() for l in loads) / len(loads)


def train_variant(cfg, data, steps, batch_size, lr, device, eval_lengths, seed=0, eval_batches=8):
    """Train a TinyLM; returns dict(params, active params, val loss per eval length, curve, seconds, imbalance)."""
    torch.manual_seed(seed)
    model = TinyLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))  # warmup, then cosine down to 10%
    g = torch.Generator().manual_seed(seed)  # every variant sees the same batches in the same order
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        x, y = data.batch("train", batch_size, cfg.block_size, g, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (loss + model.aux_loss()).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        for m in model.modules():
            if isinstance(m, MoE) and m.bias_update_rate:
                m.update_bias()
        curve.append(loss.item())
    seconds = time.perf_counter() - t0
    imbalance = model.load_imbalance()
    model.eval()
    val = {}
    with torch.no_grad():
        for T in eval_lengths:
            ge = torch.Generator().manual_seed(1234)
            losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                      for x, y in (data.batch("val", batch_size, T, ge, device) for _ in range(eval_batches))]
            val[T] = sum(losses) / len(losses)
    active = sum(p.numel() for p in model.parameters()) - sum(
        m.num_params() - m.num_params(active=True) for m in model.modules() if isinstance(m, MoE))
    return dict(params=sum(p.numel() for p in model.parameters()), active=active, val=val, curve=curve,
                seconds=seconds, imbalance=imbalance)

