"""
Mixture of experts: many feed-forward "experts", of which a router picks top_k per token. Parameters grow with
the number of experts; compute per token grows only with top_k.

routers (logits = x W_gate^T, one per expert)
    softmax top-k    p = softmax(logits); keep the k largest; optionally renormalize them to sum to 1
                     Shazeer et al. 2017; Switch (k=1, Fedus et al. 2021); Mixtral and Qwen3-MoE (k=2/8, renormalized)
    noisy top-k      logits + N(0, 1) * softplus(x W_noise) while training, then keep the k largest and softmax
                     over them (Shazeer et al. 2017): the noise spreads the load early in training
    sigmoid          s = sigmoid(logits), independent per expert; choose the top-k of s + b, weigh by s
                     normalized over the chosen (DeepSeek-V3), optionally within the best `topk_group` groups
balancing
    Switch loss      aux = E * sum_i f_i P_i: f_i the fraction of routed slots sent to expert i, P_i its mean router
                     probability (Fedus et al. 2021, eq. 4-6); minimal when both are uniform
    loss-free bias   after each step b_i += rate * sign(mean load - load_i): the bias only steers the choice, never
                     the weights (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"; DeepSeek-V3)
    capacity         each expert takes at most C = ceil(capacity_factor * N * k / E) assignments; the rest are
                     dropped and those tokens pass through the residual only (GShard, Lepikhin et al. 2020; Switch)
shared experts       always-on experts added to every token's output (DeepSeekMoE, Dai et al. 2024)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.ffn import GLU


def softmax_topk(logits, k, renormalize=True):
    """
    logits (N, E) -> weights (N, k), indices (N, k). Softmax over all experts, then the k largest.

    >>> w, i = softmax_topk(torch.tensor([[0.0, 1.0, 2.0]]), 2); i
    tensor([[2, 1]])
    """
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, idx


def noisy_logits(x, w_gate, w_noise, training=True):
    """Shazeer et al. 2017, eq. 4: H(x) = x Wg + StandardNormal() * softplus(x Wnoise), noise only in training."""
    logits = x @ w_gate.t()
    if training:
        logits = logits + torch.randn_like(logits) * F.softplus(x @ w_noise.t())
    return logits


def noisy_topk(logits, k):
    """Shazeer et al. 2017, eq. 3-5: KeepTopK sets all but the k largest logits to -inf, then softmax."""
    top, idx = logits.topk(k, dim=-1)
    return F.softmax(top, dim=-1, dtype=torch.float32), idx


def sigmoid_topk(logits, k, bias=None, n_group=1, topk_group=1, renormalize=True, scaling=1.0):
    """
    DeepSeek-V3's router. s = sigmoid(logits) (N, E); choice scores s + bias. With n_group > 1, the experts are
    split into n_group groups, each group scored by the sum of its two best choice scores, and only the best
    `topk_group` groups stay eligible (this bounds how many devices a token's experts live on). The k experts
    with the highest choice scores are chosen, weighted by their s (not s + bias), normalized to sum to 1, then
    multiplied by `scaling` (routed_scaling_factor).
    """
    N, E = logits.shape
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        group_scores = choice.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # (N, n_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, idx)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, idx


def switch_aux_loss(logits, idx, n_expert):
    """
    Switch Transformer load-balancing loss E * sum_i f_i * P_i for logits (N, E) and chosen indices (N, k):
    f_i = (assignments to expert i) / N, P_i = mean over tokens of softmax(logits)_i. With k > 1, f sums to k,
    as in the HF Mixtral implementation. Equals k when routing is perfectly uniform.
    """
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    f = torch.bincount(idx.flatten(), minlength=n_expert).float() / logits.size(0)
    return n_expert * (f * probs.mean(0)).sum()


def capacity_keep(idx, n_expert, capacity):
    """
    Which assignments (N, k) fit in the experts' capacity. Assignments are served in GShard's priority order:
    every token's first choice (in token order) before any token's second choice. The first `capacity` in that
    order for each expert are kept, the rest dropped.

    >>> capacity_keep(torch.tensor([[0], [0], [1], [0]]), 2, capacity=2).flatten()
    tensor([ True,  True,  True, False])
    """
    N, k = idx.shape
    order = idx.t().flatten()  # (k * N,): slot-major, i.e. all first choices, then all second choices
    one_hot = F.one_hot(order, n_expert)  # (k * N, E)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place of each assignment in its expert's queue
    return (position < capacity).view(k, N).t()


def expert_capacity(n_tokens, n_expert, top_k, capacity_factor):
    """C = ceil(capacity_factor * tokens * k / E): capacity_factor 1 is exactly the uniform share."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_expert)


class MoE(nn.Module):
    """
    A mixture-of-experts feed-forward layer of SwiGLU experts (ffn.GLU).
        router="softmax"   softmax top-k (renormalize: Mixtral / Qwen3-MoE style)
        router="noisy"     noisy top-k (Shazeer et al. 2017)
        router="sigmoid"   DeepSeek-V3: sigmoid scores, bias-steered choice, n_group / topk_group limits
    renormalize: scale the chosen weights to sum to 1 (Mixtral, DeepSeek-V3). Not with top_k=1: every weight
    would be 1 and the router would get no gradient from the model's loss (Switch keeps the raw probability).
    noisy: softmax over the kept logits, likewise constant for top_k=1, so use top_k >= 2 as Shazeer et al. did.
    n_shared: shared experts of the same size (DeepSeekMoE), applied to every token.
    capacity_factor: if set, drop assignments over capacity (GShard / Switch).
    bias_update_rate: if > 0 (sigmoid router), call update_bias() after each optimizer step for
    auxiliary-loss-free balancing; the statistic is the load of the last forward.
    After forward: self.aux_loss (the Switch loss for the softmax-based routers) and self.load (assignments per
    expert). Experts run as a loop over experts, each on the tokens routed to it.
    """

    def __init__(self, n_embd, hidden, n_expert, top_k, router="softmax", n_shared=0, renormalize=True,
                 capacity_factor=None, n_group=1, topk_group=1, routed_scaling=1.0, bias_update_rate=0.0):
        super().__init__()
        if router not in ("softmax", "noisy", "sigmoid"):
            raise ValueError(f"router={router!r}: expected 'softmax', 'noisy' or 'sigmoid'")
        if not 1 <= top_k <= n_expert:
            raise ValueError(f"top_k={top_k} must be between 1 and n_expert={n_expert}")
        if n_expert % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"n_group={n_group} must divide n_expert={n_expert}, and topk_group={topk_group} "
                             f"be between 1 and n_group")
        self.n_expert, self.top_k, self.router = n_expert, top_k, router
        self.renormalize, self.capacity_factor = renormalize, capacity_factor
        self.n_group, self.topk_group, self.routed_scaling = n_group, topk_group, routed_scaling
        self.bias_update_rate = bias_update_rate
        self.gate = nn.Linear(n_embd, n_expert, bias=False)
        if router == "noisy":
            self.w_noise = nn.Parameter(torch.zeros(n_expert, n_embd))
        self.register_buffer("expert_bias", torch.zeros(n_expert))  # aux-loss-free balancing; not a parameter
        self.experts = nn.ModuleList(GLU(n_embd, hidden) for _ in range(n_expert))
        self.shared = GLU(n_embd, hidden * n_shared) if n_shared else None
        self.aux_loss, self.load = None, None

    def route(self, x):
        """x (N, C) -> weights (N, k), indices (N, k), logits (N, E)."""
        if self.router == "noisy":
            logits = noisy_logits(x, self.gate.weight, self.w_noise, self.training)
            weights, idx = noisy_topk(logits, self.top_k)
        elif self.router == "sigmoid":
            logits = self.gate(x)
            weights, idx = sigmoid_topk(logits, self.top_k, self.expert_bias, self.n_group, self.topk_group,
                                        self.renormalize, self.routed_scaling)
        else:
            logits = self.gate(x)
            weights, idx = softmax_topk(logits, self.top_k, self.renormalize)
        return weights, idx, logits

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C): routing is per token
        weights, idx, logits = self.route(x)
        keep = torch.ones_like(idx, dtype=torch.bool)
        if self.capacity_factor is not None:
            capacity = expert_capacity(x.size(0), self.n_expert, self.top_k, self.capacity_factor)
            keep = capacity_keep(idx, self.n_expert, capacity)
            weights = weights * keep  # a dropped assignment weighs 0: the token keeps only its residual
        self.load = torch.bincount(idx[keep], minlength=self.n_expert)
        self.aux_loss = switch_aux_loss(logits, idx, self.n_expert) if self.router != "sigmoid" else None
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)  # the tokens routed to expert e, and in which of their k slots
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)

    @torch.no_grad()
    def update_bias(self):
        """DeepSeek-V3's balancing step: raise the bias of underloaded experts, lower it for overloaded ones."""
        load = self.load.float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def num_params(self, active=False):
        """All parameters, or only those one token touches: the router, top_k routed experts and the shared ones."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return total - (self.n_expert - self.top_k) * per_expert
