"""
Attention, from the equation up, and the variants that change what each query may see or what is cached.

    attention          softmax(q k^T / sqrt(d) + mask) v                      Vaswani et al. 2017
    Attention          MHA / GQA / MQA: n_kv_head key-value heads shared by groups of query heads
    sliding window     query i sees keys i - window < j <= i, with a rolling cache of `window` entries
                                                                            (Beltagy et al. 2020; Mistral 2023)
    dilated window     every `dilation`-th key, `window` of them                Longformer (Beltagy et al. 2020)
    attention sinks    the first n_sink keys plus a window                     StreamingLLM (Xiao et al. 2023)
    ring attention     blockwise online softmax as KV blocks travel a ring      Liu et al. 2023
    sparse attention   a light indexer picks each query's top-k keys           DeepSeek-V3.2-Exp (DSA, 2025)

Multi-head latent attention lives in mla.py, flash attention in flash.py.
Shapes: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs). When Tq < Tk the queries are the last Tq positions (decoding
after a cache), so the causal mask is aligned to the bottom-right corner.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.norms import RMSNorm
from components.positions import apply_rope


def causal_mask(Tq, Tk=None, device=None):
    """
    Bool (Tq, Tk), True where query i may attend key j: j <= i + (Tk - Tq).

    >>> causal_mask(2, 3).int()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    Tk = Tq if Tk is None else Tk
    if Tq > Tk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got Tq={Tq} > Tk={Tk}")
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def attention(q, k, v, mask=None, causal=False, scale=None):
    """
    Scaled dot-product attention from first principles:  softmax(q k^T * scale + mask) v,  scale = 1/sqrt(hs).
    Dividing by sqrt(hs) keeps the logits at unit variance when q and k have unit-variance entries, so the
    softmax does not saturate as the head grows. `mask` is bool (True = may attend) or an additive float bias
    (ALiBi), broadcastable to (B, nh, Tq, Tk). The softmax runs in float32 whatever the input dtype.
    Materializes the (Tq, Tk) score matrix: memory O(T^2). See flash.py for O(T).
    """
    Tq, Tk = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    if causal:
        att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
    att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
    return att @ v  # (B, nh, Tq, hs)


def repeat_kv(x, n_rep):
    """(B, n_kv, T, hs) -> (B, n_kv * n_rep, T, hs): kv head g serves query heads g*n_rep .. g*n_rep + n_rep - 1."""
    if n_rep == 1:
        return x
    B, n_kv, T, hs = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hs).reshape(B, n_kv * n_rep, T, hs)


class Attention(nn.Module):
    """
    Multi-head self-attention with `n_kv_head` key/value heads, each shared by n_head / n_kv_head query heads:
        n_kv_head = n_head      MHA  (Vaswani et al. 2017)
        n_kv_head = 1           MQA  (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need")
        in between              GQA  (Ainslie et al. 2023)
    Fewer KV heads shrink the KV cache, which dominates memory traffic when decoding, by n_head / n_kv_head.
    qk_norm=True applies an RMSNorm over each head's q and k before RoPE (Dehghani et al. 2023; OLMo 2, Qwen3),
    bounding the logits so they cannot grow without limit during training.

    forward(x, rope=(cos, sin), mask=None, causal=True): rope tables from positions.rope_cos_sin for head_dim.
    """

    def __init__(self, n_embd, n_head, n_kv_head=None, head_dim=None, bias=False, qk_norm=False, norm_eps=1e-6):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head if head_dim is None else head_dim
        self.q_proj = nn.Linear(n_embd, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def forward(self, x, rope=None, mask=None, causal=True):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n_rep = self.n_head // self.n_kv_head
        y = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask=mask, causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh * hs)

    def kv_bytes_per_token(self, dtype_bytes=2):
        """Cache per token per layer: one key and one value vector per KV head."""
        return 2 * self.n_kv_head * self.head_dim * dtype_bytes


# -----------------------------------------------------------------------------
# local attention: sliding, dilated, with sinks


def sliding_window_mask(T, window, dilation=1, device=None):
    """
    Bool (T, T): query i sees key j when d = i - j is one of 0, dilation, ..., (window - 1) * dilation.
    dilation=1 is the plain sliding window (the token itself and the window - 1 before it); a larger dilation
    spreads the same `window` keys over a span `dilation` times longer (Longformer's dilated window).

    >>> sliding_window_mask(4, 2).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    i = torch.arange(T, device=device)[:, None]
    d = i - torch.arange(T, device=device)[None, :]
    return (d >= 0) & (d < window * dilation) & (d % dilation == 0)


def sink_mask(T, window, n_sink, device=None):
    """
    Bool (T, T) for StreamingLLM: the first n_sink tokens stay visible to every later query, plus a sliding
    window. Xiao et al. 2023 found softmax parks surplus attention on the first tokens ("attention sinks");
    evicting them from a window cache makes perplexity explode, keeping 4 of them fixes it.
    """
    j = torch.arange(T, device=device)[None, :]
    causal = j <= torch.arange(T, device=device)[:, None]
    return sliding_window_mask(T, window, device=device) | (causal & (j < n_sink))


def dilated_window_attention(q, k, v, window, dilation):
    """
    Dilated sliding-window attention computed without a (T, T) mask: the positions p = t * dilation + r with the
    same residue r only ever see each other, so split the sequence into `dilation` interleaved subsequences and
    run a plain window of `window` on each (memory T^2 / dilation instead of T^2).
    Equals attention(q, k, v, mask=sliding_window_mask(T, window, dilation)).
    """
    B, nh, T, hs = q.shape
    pad = -T % dilation  # padding goes after the real positions, which the causal window keeps out of their view
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (T + pad) // dilation

    def split(t):  # (B, nh, n * dilation, hs) -> (B, nh, dilation, n, hs): row r holds positions r, r + dilation, ...
        return t.view(B, nh, n, dilation, t.size(-1)).transpose(2, 3)

    y = attention(split(q), split(k), split(v), mask=sliding_window_mask(n, window, device=q.device))
    return y.transpose(2, 3).reshape(B, nh, n * dilation, -1)[:, :, :T]


class RollingKVCache:
    """
    Decoding cache for sliding-window (and sink) attention that never grows: n_sink fixed slots for the first
    tokens and `window` slots reused round-robin, position p >= n_sink going to slot n_sink + (p - n_sink) % window.
    Softmax attention does not care about the order of its keys (positions are already inside k via RoPE), so the
    scrambled slot order is harmless. Memory: (n_sink + window) entries however long the stream.

        cache = RollingKVCache(B, n_kv, hs, window=4096)
        for each new token:  y = attention(q, *cache.append(k, v))    # q, k, v (B, n_kv, 1, hs)
    """

    def __init__(self, batch_size, n_kv_head, head_dim, window, n_sink=0, device=None, dtype=None):
        shape = (batch_size, n_kv_head, n_sink + window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.window, self.n_sink, self.n_seen = window, n_sink, 0

    def append(self, k, v):
        """Store one token's k, v (B, n_kv, 1, hs); return the keys and values its query attends to."""
        if k.size(2) != 1:
            raise ValueError(f"RollingKVCache.append takes one token at a time, got {k.size(2)}")
        p = self.n_seen
        slot = p if p < self.n_sink else self.n_sink + (p - self.n_sink) % self.window
        self.k[:, :, slot], self.v[:, :, slot] = k[:, :, 0], v[:, :, 0]
        self.n_seen += 1
        n = min(self.n_seen, self.n_sink + self.window)  # slots fill in order, so the first n are the live ones
        return self.k[:, :, :n], self.v[:, :, :n]


# -----------------------------------------------------------------------------
# ring attention: exact attention, computed block by block as the KV blocks travel around a ring of devices


def ring_attention(q, k, v, n_chunks, causal=True):
    """
    Ring attention (Liu, Zaharia & Abbeel 2023) simulated on one device. The sequence is cut into n_chunks blocks;
    "device" r keeps query block r and, at step s, holds KV block (r - s) mod n, which it then passes to its
    neighbour. No device ever sees all of K and V, yet each ends with exact attention, thanks to the online
    softmax (Milakov & Gimelshein 2018): keep per row the running max m, the running denominator l and the
    unnormalized output acc, and when a block with scores S arrives,
        m' = max(m, rowmax S),  l' = l e^(m - m') + rowsum e^(S - m'),  acc' = acc e^(m - m') + e^(S - m') V
    finally out = acc / l. Under a causal mask, blocks entirely in a device's future are skipped.
    """
    B, nh, T, hs = q.shape
    if T % n_chunks:
        raise ValueError(f"sequence length {T} is not divisible by n_chunks={n_chunks}")
    scale = 1.0 / math.sqrt(hs)
    qs, ks, vs = q.chunk(n_chunks, dim=2), k.chunk(n_chunks, dim=2), v.chunk(n_chunks, dim=2)
    outs = []
    for r in range(n_chunks):
        m = torch.full((B, nh, T // n_chunks, 1), float("-inf"), device=q.device, dtype=torch.float32)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, nh, T // n_chunks, v.size(-1), device=q.device, dtype=torch.float32)
        for step in range(n_chunks):
            src = (r - step) % n_chunks  # the KV block that has reached device r at this step
            if causal and src > r:
                continue
            s = (qs[r] @ ks[src].transpose(-2, -1)).float() * scale  # (B, nh, T/n, T/n)
            if causal and src == r:
                s = s.masked_fill(~causal_mask(s.size(-2), device=q.device), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            correction = torch.exp(m - m_new)
            l = l * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + p @ vs[src].float()
            m = m_new
        outs.append((acc / l).to(q.dtype))
    return torch.cat(outs, dim=2)


# -----------------------------------------------------------------------------
# DeepSeek sparse attention: a cheap indexer chooses which keys each query gets


class LightningIndexer(nn.Module):
    """
    DeepSeek-V3.2-Exp's "lightning indexer": a few small heads with ReLU instead of softmax score every past token,
        I[t, s] = sum_j w[t, j] * relu(qI[t, j] . kI[s])
    (qI: n_head small query heads, kI: one shared key, w: per-query head weights, all from the hidden state).
    It is O(T^2) like attention but with tiny heads (in the real model, also FP8), and only its top-k choice
    reaches the main attention. Returns (B, T, T) with -inf on future keys.
    """

    def __init__(self, n_embd, n_head=4, head_dim=16):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.wq = nn.Linear(n_embd, n_head * head_dim, bias=False)
        self.wk = nn.Linear(n_embd, head_dim, bias=False)
        self.weights = nn.Linear(n_embd, n_head, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)  # (B, T, nI, hI)
        k = self.wk(x)  # (B, T, hI)
        s = F.relu(torch.einsum("bthd,bsd->bths", q, k)) * self.head_dim ** -0.5  # (B, T, nI, T)
        scores = torch.einsum("bths,bth->bts", s, self.weights(x) * self.n_head ** -0.5)  # (B, T, T)
        return scores.masked_fill(~causal_mask(T, device=x.device), float("-inf"))


def topk_mask(index_scores, topk):
    """Bool (B, 1, T, T): True at each query's top-k past keys by index score (fewer for the first queries)."""
    top, idx = index_scores.topk(min(topk, index_scores.size(-1)), dim=-1)
    mask = torch.zeros_like(index_scores, dtype=torch.bool).scatter(-1, idx, top > float("-inf"))
    return mask[:, None]


def sparse_attention(q, k, v, index_scores, topk):
    """
    Attention of each query over only its top-k keys by index score, gathering them instead of masking a
    (T, T) matrix: memory O(T * topk * hs). Equals attention(q, k, v, mask=topk_mask(index_scores, topk)).
    q (B, nh, T, hs); k and v (B, n_kv, T, hs) with n_kv dividing nh, e.g. 1 as in DeepSeek-V3.2, whose sparse
    attention runs MLA in its MQA form so that each query gathers its keys once for all heads;
    index_scores (B, T, T) with -inf on future keys.
    """
    B, nh, T, hs = q.shape
    n_kv = k.size(1)
    top, idx = index_scores.topk(min(topk, T), dim=-1)  # (B, T, k)
    b = torch.arange(B, device=q.device)[:, None, None, None]
    h = torch.arange(n_kv, device=q.device)[None, :, None, None]
    k_sel, v_sel = k[b, h, idx[:, None]], v[b, h, idx[:, None]]  # (B, n_kv, T, k, hs): each query's own keys
    q = q.reshape(B, n_kv, nh // n_kv, T, hs).transpose(2, 3)  # (B, n_kv, T, g, hs): the g query heads per KV head
    att = (q @ k_sel.transpose(-2, -1)) / math.sqrt(hs)  # (B, n_kv, T, g, k)
    att = att.masked_fill(~(top > float("-inf"))[:, None, :, None], float("-inf"))  # early queries have < k keys
    att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
    return (att @ v_sel).transpose(2, 3).reshape(B, nh, T, v.size(-1))  # (B, nh, T, hs)


class SparseAttention(nn.Module):
    """
    DeepSeek sparse attention (DSA) around multi-head attention: the indexer picks `topk` keys per query and the
    heads attend only to those. top-k is not differentiable, so the indexer learns from its own loss: the KL
    divergence from the (detached) dense attention distribution, summed over heads, to softmax(I) on the
    selected keys, as in DeepSeek-V3.2-Exp's sparse training stage. forward stores it in self.indexer_loss.
    """

    def __init__(self, n_embd, n_head, topk, index_n_head=4, index_head_dim=16):
        super().__init__()
        self.attn = Attention(n_embd, n_head)
        self.indexer = LightningIndexer(n_embd, index_n_head, index_head_dim)
        self.topk = topk
        self.indexer_loss = None

    def forward(self, x, rope=None):
        scores = self.indexer(x)  # (B, T, T)
        mask = topk_mask(scores.detach(), self.topk)  # (B, 1, T, T)
        y = self.attn(x, rope=rope, mask=mask)
        with torch.no_grad():  # the target: the dense causal attention distribution, summed over heads
            B, T, _ = x.shape
            a = self.attn
            q = a.q_proj(x).view(B, T, a.n_head, a.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(B, T, a.n_head, a.head_dim).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(a.head_dim)
            p = F.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).sum(1)  # (B, T, T) on the selected keys
            p = p / p.sum(-1, keepdim=True)
        log_q = F.log_softmax(scores.masked_fill(~mask[:, 0], float("-inf")), dim=-1)
        self.indexer_loss = (p * (p.clamp_min(1e-12).log() - log_q.masked_fill(~mask[:, 0], 0.0))).sum(-1).mean()
        return y
