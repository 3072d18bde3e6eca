"""
The comparison harness: one family of variants, side by side.

    python -m components.compare attention|position|norm|ffn|moe [--quick] [--out DIR] [--device cpu|cuda]
    python -m components.compare tokenizer [--quick] [--out DIR] [--tokenizer_dir NAME=DIR ...]

For the family it prints, and writes to DIR/<family>.md (default components/report/) with PNG plots beside it:
1. a layer table: each variant as one layer (for attention, also the bare kernels) at several sequence
   lengths: parameters, FLOPs of forward + backward, KV-cache bytes per token and layer in bf16, forward +
   backward time and peak memory (how each is measured: meters.py);
2. a training table: a tiny byte-level language model per variant (tinylm.py), trained for the same number of
   steps on the same batches of Python's standard library source and scored on held-out bytes.
   It is short: differences smaller than a few hundredths of a nat are noise.
The tokenizer family is a table of its own (see tokenizers.py): tokens per character and word, and bytes per
token, of official and trained tokenizers on one passage in ten languages and in code.
--quick takes under a minute on 2 CPU cores. On a machine busy with other work, OMP_NUM_THREADS=1 gives steadier
times: with two threads, every small operator waits for both, and a descheduled thread stalls it.
"""
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint_io
import errors
from components import tokenizers
from components.attention import (Attention, SparseAttention, attention, dilated_window_attention, ring_attention,
                                  sliding_window_mask, sparse_attention)
from components.ffn import GLU, MLP, glu_hidden
from components.flash import flash_attention
from components.meters import measure
from components.mla import MLA
from components.moe import MoE
from components.plots import write_plots, write_tokenizer_plots
from components.positions import rope_cos_sin, rope_inv_freq
from components.tinylm import ByteData, TinyConfig, TinyLM, make_block, train_variant

FAMILIES = ("attention", "position", "norm", "ffn", "moe", "tokenizer")

# -----------------------------------------------------------------------------
# the tables


@dataclass
class LayerVariant:
    """One row group of a layer table: fn(*make_inputs(T)) runs the forward pass and returns a tensor."""
    name: str
    fn: object
    make_inputs: object
    module: nn.Module = None
    kv_bytes: int = None  # per token and layer, bf16
    max_T: int = None  # skip longer sequences (e.g. a learned table)


def layer_step(v, T):
    """One forward + backward of variant v on fresh inputs of length T, gradients cleared after it."""
    inputs = v.make_inputs(T)

    def step():
        out = v.fn(*inputs)
        out.sum().backward()
        for t in inputs:
            t.grad = None
        if v.module is not None:
            v.module.zero_grad(set_to_none=True)

    return step


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
            flops, peak, seconds = measure(layer_step(v, T), device, reps)
            rows.append(dict(name=v.name, T=T, params=params, flops=flops, kv=v.kv_bytes, ms=seconds * 1e3,
                             mb=peak / 2 ** 20))
            kv = "-" if v.kv_bytes is None else f"{v.kv_bytes:,}"
            line = (f"| {v.name} | {T} | {params:,} | {flops / 1e9:.3f} G | {kv} | {seconds * 1e3:.1f} | "
                    f"{peak / 2 ** 20:.1f} |")
            lines.append(line)
            print(line, flush=True)
    return lines, rows



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


SETTINGS = {  # quick: a smoke run, under a minute on 2 quiet cores; full: enough steps to read the differences
    True: dict(layer_T=[128, 512], kernel_T=[1024, 4096], other_kernels_max_T=1024, reps=1,
               n_layer=2, deep_layers=6, n_embd=64, block_size=64, batch_size=8, steps=60, lr=3e-3,
               data_bytes=1_000_000),
    False: dict(layer_T=[256, 1024, 2048], kernel_T=[256, 1024, 4096], other_kernels_max_T=4096, reps=3,
                n_layer=4, deep_layers=8, n_embd=64, block_size=128, batch_size=16, steps=400, lr=3e-3,
                data_bytes=4_000_000),
}

TOKENIZER_SETTINGS = {  # the corpus the three trained tokenizers learn from, and their vocabulary size
    True: dict(corpus_bytes=300_000, vocab_size=1024),
    False: dict(corpus_bytes=2_000_000, vocab_size=4096),
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
    "tokenizer": "One passage in ten languages (each a translation of the English one) and a Python function "
                 "(components/data/multilingual.json), encoded whole, without BOS, by each tokenizer. A word is a "
                 "run between whitespace, except in Chinese and Japanese, written without spaces, where it is a "
                 "character (a letter or digit). The three trained here learned from the corpus their row names "
                 "(tinyshakespeare when cached, and Python stdlib source), never from the passages.",
}

SUBJECTS = {  # what the layer table's plots compare, for their titles
    "attention": "Attention layers (n_embd=256, 8 heads)",
    "position": "One block (n_embd=256) per position scheme",
    "norm": "One block (n_embd=256) per norm and placement",
    "ffn": "Feed-forward layers (n_embd=256)",
    "moe": "Dense and MoE feed-forward layers (n_embd=256)",
}


def tokenizer_run(quick, out_dir, dirs=None):
    """The tokenizer family: the official tokenizers (dirs: {name: local directory or hub id} in place of, or
    besides, tokenizers.OFFICIAL) and three trained here; writes DIR/tokenizer.md and its plot."""
    s, t0 = TOKENIZER_SETTINGS[quick], time.perf_counter()
    toks = {}
    for name, source in (tokenizers.OFFICIAL | (dirs or {})).items():
        tok, reason = tokenizers.load_official(source)
        toks[name] = (tok, source, reason)
    docs = tokenizers.training_corpus(s["corpus_bytes"])
    corpus = (f"trained here on {sum(map(len, docs)):,} characters of "
              + ("tinyshakespeare and " if tokenizers.SHAKESPEARE.is_file() else "") + "Python stdlib source")
    for name, tok in tokenizers.trained_tokenizers(docs, s["vocab_size"]).items():
        toks[name] = (tok, corpus, None)
    rows = tokenizers.measure(toks, tokenizers.load_samples())
    report = [f"# components: tokenizer ({'quick' if quick else 'full'})", "", INTRO["tokenizer"], "",
              *tokenizers.tables(rows), ""]
    print("\n".join(report))
    os.makedirs(out_dir, exist_ok=True)
    pngs = write_tokenizer_plots(out_dir, rows)
    report += [f"![{p}]({p})" for p in pngs] + ["", f"Total harness time: {time.perf_counter() - t0:.0f} s."]
    path = os.path.join(out_dir, "tokenizer.md")
    checkpoint_io.atomic_write(path, "\n".join(report) + "\n")
    print(f"\nwrote {path} and {', '.join(pngs)}")
    return rows


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
    tables = [("layers", SUBJECTS[family], layer_rows)]
    if "kernels" in spec:
        report += ["## Attention kernels", ""]
        print("## Attention kernels")
        lines, kernel_rows = layer_table(spec["kernels"], spec["kernel_T"], device, s["reps"])
        report += lines + [""]
        tables.append(("kernels", "Attention kernels on q, k, v of (1, 4, T, 64)", kernel_rows))
        by = {(r["name"], r["T"]): r for r in kernel_rows}
        T = max(spec["kernel_T"])
        naive, sdpa = by["naive softmax(QK^T)V", T], by["F.scaled_dot_product_attention", T]
        flash = by["flash (plain PyTorch, tile 256)", T]
        ratio = flash["mb"] / naive["mb"]
        check = [f"- flash attention peak memory at T={T}: {flash['mb']:.1f} MB against naive {naive['mb']:.1f} MB, "
                 f"ratio {ratio:.3f} (required <= 0.125): {'PASS' if ratio <= 0.125 else 'FAIL'}",
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
    pngs = write_plots(family, out_dir, tables, results, s["block_size"])
    report += [f"![{p}]({p})" for p in pngs]
    report += ["", f"Total harness time: {time.perf_counter() - t0:.0f} s."]
    path = os.path.join(out_dir, f"{family}.md")
    checkpoint_io.atomic_write(path, "\n".join(report) + "\n")
    print(f"\nwrote {path} and {', '.join(pngs)}")


def main(argv=None):
    parser = errors.ArgumentParser(description="Compare one family of components side by side.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("--quick", action="store_true", help="a short run: under a minute on 2 CPU cores")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "report"),
                        help="directory for <family>.md and the plots (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: %(default)s")
    parser.add_argument("--tokenizer_dir", action="append", default=[], metavar="NAME=DIR",
                        help="tokenizer family: load NAME (e.g. GPT-2) from DIR, a model directory or hub id, in "
                             "place of its hub id; a new NAME adds a tokenizer (repeatable)")
    args = parser.parse_args(argv)
    if args.tokenizer_dir and args.family != "tokenizer":
        raise errors.BadInput(f"--tokenizer_dir is for the tokenizer family, not {args.family}")
    if bad := [d for d in args.tokenizer_dir if "=" not in d]:
        raise errors.BadInput(f"--tokenizer_dir {bad[0]}: expected NAME=DIR")
    if args.family == "tokenizer":
        tokenizer_run(args.quick, args.out, dict(d.split("=", 1) for d in args.tokenizer_dir))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise errors.BadInput("--device cuda: no CUDA device is available")
    run(args.family, args.quick, args.out, torch.device(args.device))


if __name__ == "__main__":
    errors.run(main)
