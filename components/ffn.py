"""
Feed-forward layers: the per-token MLP between attention layers.

    MLP     W2 act(W1 x)                    act = GELU (exact erf, or GPT-2's tanh approximation)
    SwiGLU  W2 (silu(W1 x) * W3 x)          Shazeer 2020, "GLU Variants Improve Transformer" (Llama, Qwen, DeepSeek)
    GeGLU   W2 (gelu(W1 x) * W3 x)          same paper (Gemma uses the tanh GELU)
    ReGLU   W2 (relu(W1 x) * W3 x)          same paper

A gated layer has three matrices instead of two, so at equal parameter count its hidden size is 2/3 of the
MLP's: the usual 4 * n_embd becomes 8/3 * n_embd (`glu_hidden`). That is the comparison the paper makes.
"""
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,
    "relu": F.relu,
}


def glu_hidden(n_embd, mlp_hidden=None, multiple_of=8):
    """
    Hidden size of a gated layer with the parameters of an MLP of hidden size `mlp_hidden` (default 4 * n_embd):
    3 * n_embd * h = 2 * n_embd * mlp_hidden  ->  h = 2/3 * mlp_hidden, rounded to a multiple of `multiple_of`.

    >>> glu_hidden(96)   # 2/3 * 384
    256
    """
    mlp_hidden = 4 * n_embd if mlp_hidden is None else mlp_hidden
    return max(multiple_of, round(2 * mlp_hidden / 3 / multiple_of) * multiple_of)


class MLP(nn.Module):
    """The two-layer MLP of GPT-2 and the original Transformer: c_proj(act(c_fc(x))), hidden 4 * n_embd."""

    def __init__(self, n_embd, hidden=None, act="gelu", bias=True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r}: expected one of {sorted(ACTIVATIONS)}")
        hidden = 4 * n_embd if hidden is None else hidden
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GLU(nn.Module):
    """
    A gated linear unit (Dauphin et al. 2017) as a feed-forward layer: down(act(gate(x)) * up(x)).
    act="silu" is SwiGLU, "gelu" / "gelu_tanh" GeGLU, "relu" ReGLU. Names follow HF Llama (gate_proj = W1,
    up_proj = W3, down_proj = W2 in the paper's notation). hidden defaults to `glu_hidden(n_embd)`.
    """

    def __init__(self, n_embd, hidden=None, act="silu", bias=False):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r}: expected one of {sorted(ACTIVATIONS)}")
        hidden = glu_hidden(n_embd) if hidden is None else hidden
        self.gate_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.up_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
