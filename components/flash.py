"""
Flash attention in plain PyTorch: the algorithm of Dao et al. 2022 ("FlashAttention: Fast and Memory-Efficient
Exact Attention with IO-Awareness") and its FlashAttention-2 loop order (Dao 2023), without a custom kernel.

Naive attention materializes the (T, T) score and probability matrices and autograd keeps them for the
backward pass: O(T^2) memory. Here the queries and keys are processed in tiles:

forward, for each query tile Qi, over the key tiles Kj, Vj (online softmax, as in attention.ring_attention):
    S = Qi Kj^T * scale;  m' = max(m, rowmax S);  P = e^(S - m')
    l = l e^(m - m') + rowsum P;  acc = acc e^(m - m') + P Vj;  m = m'
    O_i = acc / l,  and keep only the log-sum-exp L_i = m + log l  (one number per row)

backward, for each key tile Kj, Vj, over the query tiles, recomputing the probabilities from L instead of storing
them:   P = e^(Qi Kj^T * scale - L_i)
    dVj += P^T dO_i;  dP = dO_i Vj^T;  dS = P * (dP - D_i),  D_i = rowsum(dO_i * O_i)
    dQi += dS Kj * scale;  dKj += dS^T Qi * scale
(D_i = rowsum(P * dP) is the softmax Jacobian's correction term, computed cheaply from O and dO.)

Saved for backward: q, k, v, O and L, all O(T). Live temporaries: a few (tile x tile) blocks. On a GPU the real
kernel wins by keeping tiles in on-chip SRAM; in PyTorch each tile is a separate launch, so this version is
slower than F.scaled_dot_product_attention and is here for its memory behaviour and as a readable reference.
"""
import math

import torch


def _tile_scores(q, k, i0, j0, scale, causal, offset):
    """Scores of query tile starting at row i0 against key tile starting at column j0, causally masked."""
    s = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, bq, bk)
    if causal and j0 + k.size(-2) - 1 > i0 + offset:  # the tile reaches past the diagonal
        i = torch.arange(i0, i0 + q.size(-2), device=q.device)[:, None]
        j = torch.arange(j0, j0 + k.size(-2), device=q.device)[None, :]
        s = s.masked_fill(j > i + offset, float("-inf"))
    return s


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled exact attention with O(T) memory; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx, q, k, v, causal, block_size):
        B, nh, Tq, hs = q.shape
        Tk = k.size(-2)
        offset = Tk - Tq  # queries are the last Tq positions: query i sees keys j <= i + offset
        if causal and Tq > Tk:
            raise ValueError(f"causal attention needs at least as many keys as queries, got Tq={Tq} > Tk={Tk}")
        scale = 1.0 / math.sqrt(hs)
        o = torch.empty(B, nh, Tq, v.size(-1), device=q.device, dtype=q.dtype)
        lse = torch.empty(B, nh, Tq, device=q.device, dtype=torch.float32)
        for i0 in range(0, Tq, block_size):
            qi = q[:, :, i0:i0 + block_size]
            m = torch.full(qi.shape[:-1] + (1,), float("-inf"), device=q.device)  # (B, nh, bq, 1)
            l = torch.zeros_like(m)
            acc = torch.zeros(qi.shape[:-1] + (v.size(-1),), device=q.device)  # (B, nh, bq, hs)
            j_end = min(Tk, i0 + qi.size(-2) + offset) if causal else Tk  # no tile lies wholly in the future
            for j0 in range(0, j_end, block_size):
                s = _tile_scores(qi, k[:, :, j0:j0 + block_size], i0, j0, scale, causal, offset)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                p = torch.exp(s - m_new)
                correction = torch.exp(m - m_new)
                l = l * correction + p.sum(-1, keepdim=True)
                acc = acc * correction + p @ v[:, :, j0:j0 + block_size].float()
                m = m_new
            o[:, :, i0:i0 + block_size] = (acc / l).to(q.dtype)
            lse[:, :, i0:i0 + block_size] = (m + l.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.block_size, ctx.offset, ctx.scale = causal, block_size, offset, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, bs, offset, scale = ctx.causal, ctx.block_size, ctx.offset, ctx.scale
        Tq, Tk = q.size(-2), k.size(-2)
        D = (do.float() * o.float()).sum(-1)  # (B, nh, Tq)
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        for j0 in range(0, Tk, bs):
            kj, vj = k[:, :, j0:j0 + bs], v[:, :, j0:j0 + bs]
            i_start = max(0, (j0 - offset) // bs * bs) if causal else 0  # earlier query tiles cannot see this tile
            for i0 in range(i_start, Tq, bs):
                qi, doi = q[:, :, i0:i0 + bs], do[:, :, i0:i0 + bs].float()
                s = _tile_scores(qi, kj, i0, j0, scale, causal, offset)
                p = torch.exp(s - lse[:, :, i0:i0 + bs, None])  # (B, nh, bq, bk), recomputed, never stored
                dv[:, :, j0:j0 + bs] += p.transpose(-2, -1) @ doi
                dp = doi @ vj.float().transpose(-2, -1)
                ds = p * (dp - D[:, :, i0:i0 + bs, None])
                dq[:, :, i0:i0 + bs] += ds @ kj.float() * scale
                dk[:, :, j0:j0 + bs] += ds.transpose(-2, -1) @ qi.float() * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def flash_attention(q, k, v, causal=False, block_size=128):
    """
    Exact softmax(q k^T / sqrt(hs)) v, tiled: same result and gradients as attention.attention, O(T) memory.
    q (B, nh, Tq, hs), k and v (B, nh, Tk, hs); with causal=True the queries are the last Tq positions.
    """
    shapes_ok = q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] and k.shape[:-1] == v.shape[:-1]
    if not shapes_ok or q.size(-1) != k.size(-1):
        raise ValueError(f"flash_attention expects q, k, v of shape (B, nh, T, hs), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return FlashAttentionFunction.apply(q, k, v, causal, block_size)
