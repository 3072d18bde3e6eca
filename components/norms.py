"""
Normalization: keep the residual stream's activations at a scale the next layer can use.

    LayerNorm   y = (x - mean(x)) / sqrt(var(x) + eps) * g + b        Ba et al. 2016   (GPT-2)
    RMSNorm     y = x / sqrt(mean(x^2) + eps) * g                     Zhang & Sennrich 2019 (Llama, Qwen, DeepSeek)
    pre-norm    x = x + f(norm(x))      the residual path is an identity: trains deep stacks without warmup tricks
    post-norm   x = norm(x + f(x))      the original Transformer; each sublayer's output is renormalized
    QK-norm     normalize q and k per head before the dot product (see attention.Attention(qk_norm=True))

RMSNorm drops the mean subtraction and the bias: cheaper, and in practice just as good.
"""
import torch
import torch.nn as nn


class LayerNorm(nn.Module):
    """
    LayerNorm over the last dimension, written out. var is the biased variance (divide by n), as in
    torch.nn.LayerNorm. bias=False gives the bias-free variant some models use.

    >>> LayerNorm(2)(torch.tensor([[1.0, 3.0]]))   # mean 2, var 1 -> (-1, 1) up to eps
    tensor([[-1.0000,  1.0000]], grad_fn=<AddBackward0>)
    """

    def __init__(self, n_embd, eps=1e-5, bias=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """
    RMSNorm over the last dimension: no centering, no bias. Computed in float32 whatever the input dtype, as the
    reference implementations do, because mean(x^2) in bf16 loses the small components.

    >>> RMSNorm(2, eps=0.0)(torch.tensor([[3.0, 4.0]]))   # rms = sqrt(12.5)
    tensor([[0.8485, 1.1314]], grad_fn=<MulBackward0>)
    """

    def __init__(self, n_embd, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class PreNormBlock(nn.Module):
    """
    The GPT-2 / Llama block: normalize the input of each sublayer and add its output to an untouched residual.
        x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    The model then needs one final norm before the output head. `attn` and `mlp` are any modules mapping
    (B, T, C) -> (B, T, C); keyword arguments of forward go to `attn` (rotary tables, masks).
    """

    def __init__(self, attn, mlp, norm1, norm2):
        super().__init__()
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2

    def forward(self, x, **attn_kwargs):
        x = x + self.attn(self.norm1(x), **attn_kwargs)
        return x + self.mlp(self.norm2(x))


class PostNormBlock(nn.Module):
    """
    The original Transformer block (Vaswani et al. 2017): normalize after each residual addition.
        x = norm1(x + attn(x));  x = norm2(x + mlp(x))
    Gradients reaching early layers pass through every norm, which is why deep post-norm stacks need learning
    rate warmup (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture").
    """

    def __init__(self, attn, mlp, norm1, norm2):
        super().__init__()
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2

    def forward(self, x, **attn_kwargs):
        x = self.norm1(x + self.attn(x, **attn_kwargs))
        return self.norm2(x + self.mlp(x))
