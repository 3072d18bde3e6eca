"""
Position information: how a transformer learns where each token is.

Attention by itself is permutation-equivariant: shuffle the keys and values and the output does not change.
Each variant below breaks that symmetry in a different place:

    learned absolute   a trained vector per position, added to the token embedding   (GPT-2)
    sinusoidal         a fixed sin/cos vector per position, added to the embedding  (Vaswani et al. 2017)
    RoPE               q and k rotated by an angle proportional to the position      (Su et al. 2021)
    ALiBi              a penalty -m * (i - j) added to the attention scores         (Press et al. 2021)
    none (NoPE)        nothing; the causal mask alone leaks position              (Kazemnejad et al. 2023)

RoPE is written in both layouts found in released checkpoints (rotate-half: GPT-NeoX, HF Llama/Qwen;
interleaved: GPT-J, Meta's original Llama code, DeepSeek) and with the four ways of stretching it past the
training length: position interpolation, NTK-aware, Llama 3 and YaRN. Each of those changes only the
per-pair frequencies (and, for YaRN, a temperature), so each is a small function of `inv_freq`.
"""
import math

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# absolute positions: added to the token embeddings


class LearnedPositionEmbedding(nn.Module):
    """
    GPT-2's absolute positions: row p of a (max_len, n_embd) table is added to the token at position p.
    Positions never seen in training keep their random initialization, so it cannot extrapolate.

    >>> pe = LearnedPositionEmbedding(16, 8)
    >>> pe(torch.zeros(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, max_len, n_embd):
        super().__init__()
        self.wpe = nn.Embedding(max_len, n_embd)

    def forward(self, x, pos=0):
        T = x.size(1)
        if pos + T > self.wpe.num_embeddings:
            raise ValueError(f"position {pos + T - 1} is beyond the learned table of {self.wpe.num_embeddings} rows")
        return x + self.wpe(torch.arange(pos, pos + T, device=x.device))


def sinusoidal_embedding(T, n_embd, base=10000.0, pos=0):
    """
    Vaswani et al. 2017, section 3.5:  PE[p, 2i] = sin(p / base^(2i/d)),  PE[p, 2i+1] = cos(p / base^(2i/d)).
    Returns (T, n_embd). Each (sin, cos) pair turns at its own frequency, so PE[p + k] is a fixed rotation of PE[p].

    >>> sinusoidal_embedding(2, 4)[1, :2]   # sin(1), cos(1)
    tensor([0.8415, 0.5403])
    """
    inv_freq = 1.0 / base ** (torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)  # (d/2,)
    angle = torch.arange(pos, pos + T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, d/2)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # (T, d/2, 2) -> (T, d), interleaved
    return pe.float()


class SinusoidalPositionEmbedding(nn.Module):
    """The fixed table of `sinusoidal_embedding` added to the input; no parameters, defined at every position."""

    def __init__(self, n_embd, base=10000.0):
        super().__init__()
        self.n_embd, self.base = n_embd, base

    def forward(self, x, pos=0):
        return x + sinusoidal_embedding(x.size(1), self.n_embd, self.base, pos).to(x)


class NoPositionEncoding(nn.Module):
    """
    NoPE (Kazemnejad et al. 2023): add nothing. A causal decoder can still count, since query i sees exactly
    i + 1 keys, and it generalizes past its training length about as well as the encodings above.
    """

    def forward(self, x, pos=0):
        return x


# -----------------------------------------------------------------------------
# RoPE: rotate pairs of q and k dimensions by angle position * inv_freq[pair]


def rope_inv_freq(dim, theta=10000.0):
    """
    Su et al. 2021 (RoFormer): pair i of a head of size `dim` turns at inv_freq[i] = theta^(-2i/dim) radians per
    position. Returns (dim/2,) float32.

    >>> rope_inv_freq(4, theta=100.0)
    tensor([1.0000, 0.1000])
    """
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def rope_cos_sin(inv_freq, positions, attention_factor=1.0):
    """
    cos and sin of the angles positions[t] * inv_freq[i], each (T, dim/2). `attention_factor` is YaRN's
    temperature: scaling both cos and sin by it scales every q.k product of rotated dimensions by its square.
    """
    angle = positions.float()[:, None] * inv_freq[None, :].to(positions.device)  # (T, dim/2)
    return angle.cos() * attention_factor, angle.sin() * attention_factor


def apply_rope(x, cos, sin):
    """
    Rotate-half layout (GPT-NeoX, HF Llama/Qwen): pair i is (x[i], x[i + dim/2]).
    x (..., T, dim); cos, sin (T, dim/2). Each pair is multiplied by the rotation [[cos, -sin], [sin, cos]], so
    <rope(q, m), rope(k, n)> depends on m and n only through m - n.

    >>> c, s = rope_cos_sin(torch.tensor([1.0]), positions=torch.tensor([1]))   # one pair, 1 radian
    >>> apply_rope(torch.tensor([[1.0, 0.0]]), c, s)   # (1, 0) turned by 1 radian: (cos 1, sin 1)
    tensor([[0.5403, 0.8415]])
    """
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_interleaved(x, cos, sin):
    """
    Interleaved layout (GPT-J, Meta's complex-number Llama code, DeepSeek): pair i is (x[2i], x[2i + 1]), i.e.
    x viewed as dim/2 complex numbers, each multiplied by e^(i * angle). The same rotation as `apply_rope` after
    the fixed permutation that moves the even dimensions to the front half:
        apply_rope(x[..., perm], cos, sin) == apply_rope_interleaved(x, cos, sin)[..., perm],
        perm = [0, 2, 4, ..., 1, 3, 5, ...]
    which is why converting Meta checkpoints to HF permutes the rows of wq and wk.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)  # (..., dim/2, 2) -> (..., dim)


# RoPE scaling: a model trained on `original_max_position_embeddings` tokens is run on `factor` times more.
# Each function returns new per-pair frequencies; rope_cos_sin and apply_rope are unchanged.


def rope_linear_scaled(inv_freq, factor):
    """
    Position interpolation (Chen et al. 2023): squeeze positions by `factor` so a longer context maps onto the
    trained range of angles: angle = (p / factor) * inv_freq, i.e. every frequency divided by `factor`.
    """
    return inv_freq / factor


def rope_ntk_aware_theta(theta, dim, alpha):
    """
    NTK-aware scaling (bloc97, 2023): instead of squeezing all pairs equally, raise the base so that the
    fastest pair is untouched and the slowest is interpolated by ~alpha:  theta' = theta * alpha^(dim / (dim - 2)).
    Use with rope_inv_freq(dim, theta').
    """
    return theta * alpha ** (dim / (dim - 2))


def rope_dynamic_ntk_theta(theta, dim, factor, seq_len, original_max_position_embeddings):
    """
    Dynamic NTK (emozilla, 2023): NTK-aware scaling with alpha chosen from the current length, so nothing
    changes up to the trained length:  alpha = factor * L / L_train - (factor - 1),  L = max(seq_len, L_train).
    """
    L = max(seq_len, original_max_position_embeddings)
    alpha = factor * L / original_max_position_embeddings - (factor - 1)
    return rope_ntk_aware_theta(theta, dim, alpha)


def rope_llama3_scaled(inv_freq, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192):
    """
    Llama 3.1 (Meta, 2024): by wavelength lambda = 2 pi / inv_freq, relative to the trained length L:
        lambda < L / high_freq_factor   (turns many times in L)   keep the frequency
        lambda > L / low_freq_factor    (less than a turn in L)   divide it by `factor` (interpolate)
        in between                      blend: (1 - s) * f / factor + s * f,  s = (L / lambda - low) / (high - low)
    """
    L = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > L / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < L / high_freq_factor, inv_freq, out)


def yarn_mscale(factor, mscale=1.0):
    """YaRN's temperature as a function of the stretch: 0.1 * mscale * ln(factor) + 1, and 1 when not stretched."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_yarn(dim, theta, factor, original_max_position_embeddings, beta_fast=32.0, beta_slow=1.0,
              mscale=None, mscale_all_dim=None, truncate=True):
    """
    YaRN (Peng et al. 2023), "NTK-by-parts" interpolation plus an attention temperature.
    Pair i makes r_i = L / lambda_i full turns over the trained length L. Pairs with r > beta_fast keep their
    frequency (extrapolate), pairs with r < beta_slow are divided by `factor` (interpolate), and a linear ramp over
    the pair index blends the two in between. The boundary pair index for r turns is
        d(r) = dim * ln(L / (2 pi r)) / (2 ln theta)
    (floored / ceiled when `truncate`). Returns (inv_freq (dim/2,), attention_factor), the factor being
    0.1 ln(factor) + 1, or DeepSeek's ratio mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    """
    L = original_max_position_embeddings

    def correction_dim(turns):
        return dim * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    # per pair: 0 keeps the frequency (extrapolate), 1 divides it by factor (interpolate), linear in between
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = rope_inv_freq(dim, theta)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


# -----------------------------------------------------------------------------
# ALiBi: no embedding at all, a linear distance penalty on the attention scores


def alibi_slopes(n_head):
    """
    Press et al. 2021: head h (1-based) of n penalizes distance with slope m_h = 2^(-8h/n), a geometric sequence.
    When n is not a power of two, take the slopes of the next lower power of two, then fill up with every
    other slope of twice that many heads (the rule in the paper's reference code).

    >>> alibi_slopes(4)
    tensor([0.2500, 0.0625, 0.0156, 0.0039])
    """
    def power_of_two(n):
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]

    p = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes)


def alibi_bias(n_head, Tq, Tk=None, device=None):
    """
    Additive score bias (n_head, Tq, Tk): -m_h * (i - j) for query i and key j, queries being the last Tq of the
    Tk positions. Future keys (j > i) get a positive value here; the causal mask removes them.
    """
    Tk = Tq if Tk is None else Tk
    i = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return -alibi_slopes(n_head).to(device)[:, None, None] * (i - j)  # (n_head, Tq, Tk)
