"""MoE speed: qwen.MoE forward + backward against a dense SwiGLU MLP with the same active parameters.

    python bench/moe_throughput.py                               # 2048 tokens, d 256, 64 experts of width 64, top-8
    python bench/moe_throughput.py --tokens 4096 --n_embd 512 --expert_width 128 --repeats 30
    python bench/moe_throughput.py --skip_small --skip_naive     # only the 64/top-8 layer against dense

Each token runs top_k of the n_experts SwiGLU experts, so the MoE layer does the matmul work of a dense qwen.MLP of
width top_k * expert_width (the same active parameters; the router's n_embd x n_experts is extra), which is the
dense row. The MoE row is qwen.MoE as the model runs it (route, sort the assignments by expert, one grouped matmul
per projection, scatter back); the naive loop is the baseline readers know: for each expert, pick the tokens routed
to it, run it, add the weighted result (same weights, same router). A second layer, --small_experts/--small_top_k
(8/top-2), shows a coarser MoE against its own dense equivalent.

One timing is a forward and a backward (gradients for the input and every weight) on the same random tokens;
the implementations run interleaved, one call each in turn for --repeats rounds after --warmup, so all see the same
machine load; each figure is the median, in ms. The ratio is to the dense MLP of the same configuration; the target
is MoE within 2x of it. Before timing, the MoE output is checked against the naive loop (max |diff| < 1e-5), so the
timed layer is a correct one. Random weights: speed depends on the routing only through the experts' load, printed.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qwen  # noqa: E402


def naive_moe(moe, x):
    """The same routing as qwen.MoE, then a Python loop over experts: each runs on its tokens (a mask), weighted."""
    shape, x = x.shape, x.flatten(0, 1)
    probs = F.softmax(moe.gate(x), dim=-1, dtype=torch.float32)
    weights, idx = probs.topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True) if moe.norm_topk_prob else weights
    w, y = moe.experts, torch.zeros_like(x)
    for e in range(moe.n_experts):
        token, slot = (idx == e).nonzero(as_tuple=True)   # the tokens routed to expert e, and where in their top-k
        if token.numel() == 0:
            continue
        xe = x[token]
        h = F.silu(F.linear(xe, w.gate_proj[e])) * F.linear(xe, w.up_proj[e])
        y = y.index_add(0, token, F.linear(h, w.down_proj[e]) * weights[token, slot, None].to(x.dtype))
    return y.view(shape)


def fwd_bwd(layer, x, grad):
    """One forward and backward; gradients reset first, so that each call does the same work."""
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).backward(grad)


def timed_interleaved(fns, repeats, warmup, sync):
    """{name: median seconds} over `repeats` rounds, each running every fn once, in turn (after `warmup` rounds)."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class Naive(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return naive_moe(self.moe, x)


def bench_config(a, n_experts, top_k, device, dtype, sync):
    torch.manual_seed(0)
    config = qwen.Config(n_embd=a.n_embd, n_head=1, n_kv_head=1, head_dim=2, n_experts=n_experts,
                         n_experts_per_tok=top_k, moe_intermediate_size=a.expert_width,
                         intermediate_size=top_k * a.expert_width)
    moe = qwen.MoE(config).to(device, dtype)
    dense = qwen.MLP(config).to(device, dtype)
    x = torch.randn(1, a.tokens, a.n_embd, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        diff = (moe(x) - naive_moe(moe, x)).abs().max().item()
    if diff >= 1e-5:
        raise SystemExit(f"qwen.MoE differs from the naive loop by {diff:.2e} (>= 1e-5): not timing a wrong layer")
    load = moe.load.float()
    layers = {"dense MLP (same active)": dense, "qwen.MoE": moe}
    if not a.skip_naive:
        layers["naive loop over experts"] = Naive(moe)
    fns = {name: (lambda layer=layer: fwd_bwd(layer, x, grad)) for name, layer in layers.items()}
    t = timed_interleaved(fns, a.repeats, a.warmup, sync)
    active = sum(p.numel() for p in dense.parameters())
    return dict(E=n_experts, k=top_k, diff=diff, times=t, active=active, router=n_experts * a.n_embd,
                total=sum(p.numel() for p in moe.parameters()), imbalance=(load.max() / load.mean()).item())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (batch x sequence, flattened)")
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--expert_width", type=int, default=64, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=64, help="n_experts")
    p.add_argument("--top_k", type=int, default=8, help="n_experts_per_tok")
    p.add_argument("--small_experts", type=int, default=8, help="the second, coarser MoE layer")
    p.add_argument("--small_top_k", type=int, default=2)
    p.add_argument("--skip_small", action="store_true", help="only the --experts / --top_k layer")
    p.add_argument("--skip_naive", action="store_true", help="do not time the naive loop")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    configs = [(a.experts, a.top_k)] + ([] if a.skip_small else [(a.small_experts, a.small_top_k)])
    results = [bench_config(a, E, k, device, dtype, sync) for E, k in configs]

    print(f"MoE layer forward + backward, {a.tokens} tokens, n_embd {a.n_embd}, expert width {a.expert_width}, "
          f"{device} {a.dtype}, torch threads {torch.get_num_threads()}, "
          f"median of {a.repeats} interleaved runs (after {a.warmup})")
    print(f"{'':34s} {'ms':>8s} {'vs dense':>9s}")
    for r in results:
        print(f"E={r['E']}, top-{r['k']}: {r['active'] / 1e3:.0f}K active parameters (+{r['router'] / 1e3:.0f}K "
              f"router) of {r['total'] / 1e6:.2f}M; dense width {r['k'] * a.expert_width}; expert load max/mean "
              f"{r['imbalance']:.2f}; MoE vs naive loop max |diff| {r['diff']:.1e}")
        base = r["times"]["dense MLP (same active)"]
        for name, s in r["times"].items():
            print(f"  {name:32s} {1e3 * s:8.2f} {s / base:8.2f}x")
    main_ratio = results[0]["times"]["qwen.MoE"] / results[0]["times"]["dense MLP (same active)"]
    print(f"MoE within 2x of dense with the same active parameters: {'met' if main_ratio <= 2 else 'not met'} "
          f"({main_ratio:.2f}x at E={results[0]['E']}, top-{results[0]['k']})")


if __name__ == "__main__":
    main()
