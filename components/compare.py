"""
The comparison harness: one family of variants, side by side.

    python -m components.compare attention|position|norm|ffn|moe [--quick] [--out DIR] [--device cpu|cuda]

For the family it prints, and writes to DIR/<family>.md (default components/report/):
1. a layer table: each variant as one layer (for attention, also the bare kernels) at several sequence
   lengths: parameters, FLOPs of forward + backward (counted by torch.utils.flop_counter, which counts matrix
   products), KV-cache bytes per token and layer in bf16, forward + backward time (the best of a few runs: other
   processes only ever add time) and peak memory;
2. a training table: a tiny byte-level language model per variant, trained for the same number of steps on the
   same batches of Python's standard library source (always there, offline) and scored on held-out bytes.
   It is short: differences smaller than a few hundredths of a nat are noise.
When matplotlib is installed, PNG plots are written beside the report. --quick takes under a minute on 2 CPU cores.
On a machine busy with other work, OMP_NUM_THREADS=1 gives steadier times: with two threads, every small operator
waits for both, and a descheduled thread stalls it.

Peak memory. On CUDA: torch.cuda.max_memory_allocated during the call, minus what was allocated before it.
On CPU PyTorch keeps no allocator statistics, so PeakMemory, a TorchDispatchMode, watches the outputs of every
operator, including those autograd runs in the backward pass: each new tensor storage is added to a running
total with its size and a weak reference to it, storages whose reference has expired (freed; tensors that
autograd saved for backward stay alive until released) are subtracted, and the largest total after any
operator is the peak. It counts what was allocated inside the call (not inputs or parameters that existed
before) and cannot see scratch memory inside a single kernel.
"""
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import errors
import hub
from components.attention import (Attention, SparseAttention, attention, dilated_window_attention, ring_attention,
                                  sliding_window_mask, sparse_attention)
from components.ffn import GLU, MLP, glu_hidden
from components.flash import flash_attention
from components.mla import MLA
from components.moe import MoE
from components.norms import LayerNorm, PostNormBlock, PreNormBlock, RMSNorm
from components.positions import (LearnedPositionEmbedding, NoPositionEncoding, SinusoidalPositionEmbedding,
                                  alibi_bias, rope_cos_sin, rope_inv_freq)

FAMILIES = ("attention", "position", "norm", "ffn", "moe")

# -----------------------------------------------------------------------------
# measuring


class PeakMemory(TorchDispatchMode):
    """
    Peak bytes of tensor storage alive at once among those allocated inside the `with` block (see module doc).

    >>> with PeakMemory() as pm:
    ...     a = torch.ones(1000); b = a * 2; del a; c = b + 1
    >>> pm.peak   # two float32 vectors of 1000 alive at once
    8000
    """

    def __enter__(self):
        self.live, self.current, self.peak = {}, 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()  # views and in-place results share their base's storage: counted once
                if storage.nbytes() and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn, device):
    """Peak bytes allocated while fn() runs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakMemory() as pm:
        fn()
    return pm.peak


# F.scaled_dot_product_attention's CPU kernel is missing from FlopCounterMode's table; count it like the GPU ones
_aten = torch.ops.aten
SDPA_CPU_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda go, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(go, q, k, v),
}


def count_flops(fn):
    with flop_counter.FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class LayerVariant:
    """One row group of a layer table: fn(*make_inputs(T)) runs the forward pass and returns a tensor."""
    name: str
    fn: object
    make_inputs: object
    module: nn.Module = None
    kv_bytes: int = None  # per token and layer, bf16
    max_T: int = None  # skip longer sequences (e.g. a learned table)


def measure_layer(v, T, device, reps):
    """FLOPs, peak bytes and best-of-reps seconds of forward + backward of variant v at length T."""
    inputs = v.make_inputs(T)

    def step():
        out = v.fn(*inputs)
        out.sum().backward()
        for t in inputs:
            t.grad = None
        if v.module is not None:
            v.module.zero_grad(set_to_none=True)

    flops = count_flops(step)  # doubles as the warmup run
    peak = peak_memory(step, device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return flops, peak, min(times)


def layer_table(variants, Ts, device, reps):
    """Measure every variant at every length; returns (markdown lines, rows as dicts)."""
    lines = ["| variant | T | params | FLOPs fwd+bwd | KV bytes/token | time ms | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines))
    rows = []
    for v in variants:
        params = sum(p.numel() for p in v.module.parameters()) if v.module is not None else 0
        for T in Ts:
            if v.max_T is not None and T > v.max_T:
                continue
            flops, peak, seconds = measure_layer(v, T, device, reps)
            rows.append(dict(name=v.name, T=T, params=params, flops=flops, kv=v.kv_bytes, ms=seconds * 1e3,
                             mb=peak / 2 ** 20))
            kv = "-" if v.kv_bytes is None else f"{v.kv_bytes:,}"
            line = (f"| {v.name} | {T} | {params:,} | {flops / 1e9:.3f} G | {kv} | {seconds * 1e3:.1f} | "
                    f"{peak / 2 ** 20:.1f} |")
            lines.append(line)
            print(line, flush=True)
    return lines, rows


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


def training_table(variants, data, settings, device, eval_lengths=None):
    """variants: list of (name, TinyConfig). Returns (markdown lines, results by name)."""
    eval_lengths = eval_lengths or [settings["block_size"]]
    cols = " | ".join(f"val loss T={T}" for T in eval_lengths)
    lines = [f"| variant | params | active params | {cols} | load max/mean | train s |",
             "|---|---:|---:|" + "---:|" * len(eval_lengths) + "---:|---:|"]
    print("\n".join(lines))
    results = {}
    for name, cfg in variants:
        r = train_variant(cfg, data, settings["steps"], settings["batch_size"], settings["lr"], device, eval_lengths)
        results[name] = r
        vals = " | ".join(f"{r['val'][T]:.3f}" for T in eval_lengths)
        imb = "-" if r["imbalance"] is None else f"{r['imbalance']:.2f}"
        line = f"| {name} | {r['params']:,} | {r['active']:,} | {vals} | {imb} | {r['seconds']:.1f} |"
        lines.append(line)
        print(line, flush=True)
    return lines, results


# -----------------------------------------------------------------------------
# the families


def randn(*shape, device):
    return torch.randn(*shape, device=device, requires_grad=True)


def module_variant(name, module, n_embd, device, batch_size, fn=None, **kwargs):
    """A LayerVariant that runs fn (default: the module itself) on a random (B, T, n_embd) input."""
    module = module.to(device)
    return LayerVariant(name, fn or module, lambda T: [randn(batch_size, T, n_embd, device=device)], module=module,
                        **kwargs)


class Tables:
    """Rotary tables and masks by length, built on first use (the warmup run) rather than in the measured calls."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def rope(self, dim, T):
        if ("rope", dim, T) not in self.cache:
            self.cache["rope", dim, T] = rope_cos_sin(rope_inv_freq(dim), torch.arange(T, device=self.device))
        return self.cache["rope", dim, T]

    def window(self, T, window):
        if ("window", T, window) not in self.cache:
            self.cache["window", T, window] = sliding_window_mask(T, window, device=self.device)
        return self.cache["window", T, window]

    def index_scores(self, T):
        """Random causal index scores, standing in for the indexer in the bare sparse kernel."""
        if ("index", T) not in self.cache:
            causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            self.cache["index", T] = torch.randn(1, T, T, device=self.device).masked_fill(~causal, float("-inf"))
        return self.cache["index", T]


def attention_family(s, device):
    C, nh, B = 256, 8, 1
    hs = C // nh
    tables = Tables(device)
    mha, gqa, mqa = Attention(C, nh), Attention(C, nh, 2), Attention(C, nh, 1)
    mla = MLA(C, nh, kv_lora_rank=64, qk_nope_head_dim=hs, qk_rope_head_dim=hs // 2, v_head_dim=hs)
    dsa = SparseAttention(C, nh, topk=128)
    layers = [
        module_variant(f"MHA ({nh} kv heads)", mha, C, device, B, kv_bytes=mha.kv_bytes_per_token(),
                       fn=lambda x: mha(x, rope=tables.rope(hs, x.size(1)))),
        module_variant("GQA (2 kv heads)", gqa, C, device, B, kv_bytes=gqa.kv_bytes_per_token(),
                       fn=lambda x: gqa(x, rope=tables.rope(hs, x.size(1)))),
        module_variant("MQA (1 kv head)", mqa, C, device, B, kv_bytes=mqa.kv_bytes_per_token(),
                       fn=lambda x: mqa(x, rope=tables.rope(hs, x.size(1)))),
        module_variant("MLA naive", mla, C, device, B, kv_bytes=mla.kv_bytes_per_token(absorbed=False),
                       fn=lambda x: mla(x, tables.rope(hs // 2, x.size(1)))),
        module_variant("MLA absorbed", mla, C, device, B, kv_bytes=mla.kv_bytes_per_token(),
                       fn=lambda x: mla(x, tables.rope(hs // 2, x.size(1)), absorbed=True)),
        module_variant("sliding window 128 (masked)", mha, C, device, B, kv_bytes=mha.kv_bytes_per_token(),
                       fn=lambda x: mha(x, rope=tables.rope(hs, x.size(1)), mask=tables.window(x.size(1), 128))),
        module_variant("DSA top-128 (masked)", dsa, C, device, B, kv_bytes=mha.kv_bytes_per_token(),
                       fn=lambda x: dsa(x, rope=tables.rope(hs, x.size(1)))),
    ]

    # the bare kernels on (B, nh, T, hs) q, k, v: where the O(T^2) memory is
    def qkv(T):
        return [randn(1, 4, T, 64, device=device) for _ in range(3)]

    def sparse(q, k, v):  # one KV head shared by all query heads (MQA), as DSA runs
        return sparse_attention(q, k[:, :1], v[:, :1], tables.index_scores(q.size(2)), topk=128)

    kernels = [
        LayerVariant("naive softmax(QK^T)V", lambda q, k, v: attention(q, k, v, causal=True), qkv),
        LayerVariant("F.scaled_dot_product_attention",
                     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), qkv),
        LayerVariant("flash (plain PyTorch, tile 256)",
                     lambda q, k, v: flash_attention(q, k, v, causal=True, block_size=256), qkv),
        LayerVariant("ring (4 chunks, simulated)", lambda q, k, v: ring_attention(q, k, v, 4), qkv,
                     max_T=s["other_kernels_max_T"]),
        LayerVariant("dilated window 128 x2 (split)", lambda q, k, v: dilated_window_attention(q, k, v, 128, 2), qkv,
                     max_T=s["other_kernels_max_T"]),
        LayerVariant("sparse top-128 (gather, MQA)", sparse, qkv, max_T=s["other_kernels_max_T"]),
    ]

    base = TinyConfig(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4, block_size=s["block_size"])
    T = s["block_size"]
    training = [
        ("MHA", base),
        ("GQA (2 kv heads)", replace(base, n_kv_head=2)),
        ("MQA (1 kv head)", replace(base, n_kv_head=1)),
        ("MLA", replace(base, attn="mla")),
        (f"sliding window {T // 4}", replace(base, window=T // 4)),
        (f"DSA top-{T // 4}", replace(base, attn="sparse", topk=T // 4)),
    ]
    return dict(layers=layers, kernels=kernels, kernel_T=s["kernel_T"], training=training)


def position_family(s, device):
    T_train = s["block_size"]
    base = TinyConfig(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4, block_size=T_train, max_len=4 * T_train)
    names = {"rope": "RoPE", "learned": "learned absolute", "sinusoidal": "sinusoidal", "alibi": "ALiBi",
             "none": "none (NoPE)"}
    configs = [(names[p], replace(base, pos=p)) for p in names]
    layers = []
    for name, cfg in configs:  # one-block model on random bytes: what the scheme costs around one layer
        model = TinyLM(replace(cfg, n_layer=1, n_embd=256, n_head=8, max_len=max(s["layer_T"]))).to(device)
        layers.append(LayerVariant(name, model, lambda T: [torch.randint(256, (1, T), device=device)], module=model,
                                   kv_bytes=model.blocks[0].attn.kv_bytes_per_token()))
    return dict(layers=layers, training=configs, eval_lengths=[T_train, 2 * T_train, 4 * T_train])


def norm_family(s, device):
    C, nh, B = 256, 8, 1
    variants = [("pre-norm LayerNorm", dict(norm="layer")), ("post-norm LayerNorm", dict(norm="layer", prenorm=False)),
                ("pre-norm RMSNorm", dict()), ("post-norm RMSNorm", dict(prenorm=False)),
                ("pre-norm RMSNorm + QK-norm", dict(qk_norm=True))]
    tables, layers = Tables(device), []
    for name, kw in variants:
        block = make_block(TinyConfig(n_embd=C, n_head=nh, **kw))
        layers.append(module_variant(name, block, C, device, B,
                                     fn=lambda x, block=block: block(x, rope=tables.rope(C // nh, x.size(1)))))
    base = TinyConfig(n_layer=s["deep_layers"], n_embd=s["n_embd"], n_head=4, block_size=s["block_size"])
    training = [(f"{name}, {s['deep_layers']} layers", replace(base, **kw)) for name, kw in variants]
    return dict(layers=layers, training=training)


def ffn_family(s, device):
    C, B = 256, 1
    h = glu_hidden(C)
    layers = [module_variant(f"GELU MLP (hidden {4 * C})", MLP(C, 4 * C, bias=False), C, device, B)]
    layers += [module_variant(f"{name} (hidden {h})", GLU(C, h, act), C, device, B)
               for name, act in (("SwiGLU", "silu"), ("GeGLU", "gelu"), ("ReGLU", "relu"))]
    base = TinyConfig(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4, block_size=s["block_size"])
    training = [("GELU MLP", replace(base, ffn="gelu")), ("SwiGLU", base), ("GeGLU", replace(base, ffn="geglu")),
                ("ReGLU", replace(base, ffn="reglu"))]
    return dict(layers=layers, training=training)


def moe_family(s, device):
    C, B = 256, 1
    h = glu_hidden(C)
    # every MoE here has the active parameters of the dense layer: top-1 of experts the dense layer's size,
    # or top-2 of experts half its size
    mods = [("dense SwiGLU", GLU(C, h)),
            ("MoE 8 experts top-1, softmax", MoE(C, h, 8, 1, renormalize=False)),
            ("MoE 8 experts top-2 (half size), softmax", MoE(C, h // 2, 8, 2)),
            ("MoE 8 top-1, sigmoid + bias", MoE(C, h, 8, 1, router="sigmoid", renormalize=False)),
            ("MoE 8 top-1 (half) + 1 shared (half)", MoE(C, h // 2, 8, 1, n_shared=1, renormalize=False)),
            ("MoE 8 top-1, capacity 1.0", MoE(C, h, 8, 1, capacity_factor=1.0, renormalize=False))]
    layers = [module_variant(name, m, C, device, B) for name, m in mods]
    ch = glu_hidden(s["n_embd"])
    base = TinyConfig(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=4, block_size=s["block_size"])
    moe = replace(base, ffn="moe", n_expert=4, top_k=1, ffn_hidden=ch)
    training = [("dense SwiGLU", base),
                ("MoE 4x top-1, softmax + Switch loss", moe),
                ("MoE 4x top-1, no balancing", replace(moe, aux_coef=0.0)),
                ("MoE 4x top-2 (half), renormalized + Switch loss", replace(moe, top_k=2, ffn_hidden=ch // 2)),
                ("MoE 4x top-2 (half), noisy top-k + Switch loss",
                 replace(moe, top_k=2, ffn_hidden=ch // 2, router="noisy")),
                ("MoE 4x top-1, sigmoid + loss-free bias", replace(moe, router="sigmoid", bias_update_rate=1e-3)),
                ("MoE 4x top-1 (half) + shared (half)", replace(moe, ffn_hidden=ch // 2, n_shared=1)),
                ("MoE 4x top-1, capacity 1.0 (drops)", replace(moe, capacity_factor=1.0))]
    return dict(layers=layers, training=training)


# -----------------------------------------------------------------------------
# report


def plot(family, out_dir, layer_rows, kernel_rows, results):
    """PNG plots beside the report, only when matplotlib is installed. Returns the file names written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for tag, rows in (("layers", layer_rows), ("kernels", kernel_rows)):
        if not rows or len({r["T"] for r in rows}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r["name"] for r in rows):
            rs = [r for r in rows if r["name"] == name]
            axes[0].plot([r["T"] for r in rs], [r["ms"] for r in rs], marker="o", label=name)
            axes[1].plot([r["T"] for r in rs], [r["mb"] for r in rs], marker="o", label=name)
        for ax, label in zip(axes, ("forward+backward ms", "peak MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7)
        written.append(f"{family}_{tag}.png")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, written[-1]), dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    k = max(1, max(len(r["curve"]) for r in results.values()) // 50)  # smooth the losses over windows of k steps
    for name, r in results.items():
        ax.plot([sum(r["curve"][i:i + k]) / k for i in range(0, len(r["curve"]) - k + 1, k)], label=name)
    ax.set_xlabel(f"step / {k}")
    ax.set_ylabel("train loss (nats/byte)")
    ax.legend(fontsize=7)
    written.append(f"{family}_training.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, written[-1]), dpi=100)
    plt.close(fig)
    return written


SETTINGS = {  # quick: a smoke run, under a minute on 2 quiet cores; full: enough steps to read the differences
    True: dict(layer_T=[128, 512], kernel_T=[1024, 4096], other_kernels_max_T=1024, reps=1,
               n_layer=2, deep_layers=6, n_embd=64, block_size=64, batch_size=8, steps=60, lr=3e-3,
               data_bytes=1_000_000),
    False: dict(layer_T=[256, 1024, 2048], kernel_T=[256, 1024, 4096], other_kernels_max_T=4096, reps=3,
                n_layer=4, deep_layers=8, n_embd=64, block_size=128, batch_size=16, steps=400, lr=3e-3,
                data_bytes=4_000_000),
}

INTRO = {
    "attention": "Attention layers at n_embd=256, 8 heads (RoPE); kernels on q, k, v of (1, 4, T, 64), causal. "
                 "Peak memory covers forward and backward, parameter gradients included. The masked variants "
                 "still build (T, T) scores; the split dilated window does not, and the gathered sparse kernel "
                 "holds each query's top-k keys and values instead, O(T * k * hs), which only beats the dense "
                 "O(T^2 * heads) at long T (a fused kernel would not materialize them). MLA absorbed costs more "
                 "FLOPs than naive over a whole sequence; it pays off when decoding, where nothing per head is "
                 "rebuilt from the latent cache. Training: which keys each query may see, and what is cached, at "
                 "equal width.",
    "position": "A one-block model (n_embd=256) around each position scheme. Training at T = block size, evaluated "
                "also at 2x and 4x: the learned table's rows beyond the training length were never trained.",
    "norm": "One block (n_embd=256, 8 heads) per placement and norm. Training: a deeper stack, where post-norm "
            "is known to struggle (Xiong et al. 2020).",
    "ffn": "Feed-forward layers at n_embd=256 with parameters matched: the gated layers' hidden size is 2/3 of "
           "the MLP's.",
    "moe": "Layers at n_embd=256 with the active parameters of the dense SwiGLU. Training: dense against MoE at "
           "equal active parameters; load max/mean is 1.0 when balanced.",
}


def run(family, quick, out_dir, device):
    s = SETTINGS[quick]
    torch.manual_seed(0)
    spec = {"attention": attention_family, "position": position_family, "norm": norm_family, "ffn": ffn_family,
            "moe": moe_family}[family](s, device)
    t0 = time.perf_counter()
    mode = "quick" if quick else "full"
    report = [f"# components: {family} ({mode}, {device.type}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__})", "", INTRO[family], "",
              "CPU times move with whatever else runs on the machine, kernels made of many small operators "
              "(flash, ring) the most; FLOPs and peak memory do not.", ""]
    print("\n".join(report))

    report += ["## Layers", ""]
    print("## Layers")
    lines, layer_rows = layer_table(spec["layers"], s["layer_T"], device, s["reps"])
    report += lines + [""]
    kernel_rows, verdict = [], True
    if "kernels" in spec:
        report += ["## Attention kernels", ""]
        print("## Attention kernels")
        lines, kernel_rows = layer_table(spec["kernels"], spec["kernel_T"], device, s["reps"])
        report += lines + [""]
        by = {(r["name"], r["T"]): r for r in kernel_rows}
        T = max(spec["kernel_T"])
        naive, sdpa = by["naive softmax(QK^T)V", T], by["F.scaled_dot_product_attention", T]
        flash = by["flash (plain PyTorch, tile 256)", T]
        ratio = flash["mb"] / naive["mb"]
        verdict = ratio <= 1 / 8
        check = [f"- flash attention peak memory at T={T}: {flash['mb']:.1f} MB against naive {naive['mb']:.1f} MB, "
                 f"ratio {ratio:.3f} (required <= 0.125): {'PASS' if verdict else 'FAIL'}",
                 f"- flash attention forward+backward at T={T}: {flash['ms']:.0f} ms, "
                 f"{flash['ms'] / sdpa['ms']:.1f}x the time of F.scaled_dot_product_attention "
                 f"({sdpa['ms']:.0f} ms), "
                 f"{flash['ms'] / naive['ms']:.2f}x naive ({naive['ms']:.0f} ms)"]
        report += check + [""]
        print("\n".join(check))

    header = (f"## Training: {s['steps']} steps, batch {s['batch_size']} x {s['block_size']} bytes, "
              f"AdamW lr {s['lr']}, Python stdlib source ({s['data_bytes']:,} bytes, last 10% held out)")
    report += [header, ""]
    print(header)
    data = ByteData(s["data_bytes"])
    settings = dict(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], block_size=s["block_size"])
    lines, results = training_table(spec["training"], data, settings, device, spec.get("eval_lengths"))
    report += lines + [""]

    os.makedirs(out_dir, exist_ok=True)
    pngs = plot(family, out_dir, layer_rows, kernel_rows, results)
    report += [f"![{p}]({p})" for p in pngs]
    report += ["", f"Total harness time: {time.perf_counter() - t0:.0f} s."]
    path = os.path.join(out_dir, f"{family}.md")
    hub.atomic_write(path, "\n".join(report) + "\n")
    print(f"\nwrote {path}" + (f" and {', '.join(pngs)}" if pngs else " (no plots: matplotlib is not installed)"))
    return verdict


def main(argv=None):
    parser = errors.ArgumentParser(description="Compare one family of components side by side.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--quick", action="store_true", help="a short run: under a minute on 2 CPU cores")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "report"),
                        help="directory for <family>.md and the plots (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise errors.BadInput("--device cuda: no CUDA device is available")
    ok = run(args.family, args.quick, args.out, torch.device(args.device))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(errors.run(main))
