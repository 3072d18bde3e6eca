"""Sampling speed: tokens/s of sample.generate with the KV cache, without it, and transformers' generate().

    python bench/sample_throughput.py                      # GPT-2 124M shape, batch 1, CPU fp32, greedy, 256 tokens
    python bench/sample_throughput.py --preset gpt2-medium --new_tokens 128 --device cuda
    python bench/sample_throughput.py --model llama3       # a 100M-parameter Llama 3.2 in miniature (LLAMA_100M)
    python bench/sample_throughput.py --model qwen         # a 100M-parameter Qwen3 (QWEN_100M) vs Qwen3ForCausalLM
    python bench/sample_throughput.py --model qwen --moe   # a small Qwen3-MoE (QWEN_MOE) vs Qwen3MoeForCausalLM
    python bench/sample_throughput.py --precisions --new_tokens 128 --ppl_checkpoint out/gpt2/last   # issue 14

--precisions: ours at fp32, bf16, int8 and int4 (quantize.py) against transformers' generate() at fp32 and bf16,
each also against the memory-bandwidth bound of its precision: bytes read a token (every weight once; an
embedding table only where it is also the head) over the bandwidth of a 256 MB copy measured in the same run;
with --ppl_checkpoint, the validation perplexity of that trained checkpoint in each of our precisions.

The weights are random (no download): speed does not depend on their values, and both implementations load
the same checkpoint. Each figure is the median of --repeats runs, interleaved (each round runs every implementation
once, so that all see the same load; the slow no-cache loop runs once); the ratios are measured in the same run.
The MoE model is timed against transformers twice: with the experts implementation it picks by default
(grouped_mm where torch has it, one grouped matmul per projection) and with "eager" (a loop over the hit experts).
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt2  # noqa: E402
import quantize  # noqa: E402
import llama3  # noqa: E402
import qwen  # noqa: E402
import sample  # noqa: E402

# Llama's default shape: 12 layers, d 768, 12 query / 4 KV heads, SwiGLU 2048, a 32768-token vocabulary tied to the
# head, RoPE scaled by 32 as in 3.2; 101M parameters
LLAMA_100M = llama3.Config(vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                           intermediate_size=2048, rope_scale_factor=32.0, rope_original_context=1024,
                           tie_word_embeddings=True)
# Qwen3 at LLAMA_100M's shape: the same plus QK-norm, head_dim 64 and RoPE theta 1e6 without scaling; 101M parameters
QWEN_100M = qwen.Config(vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, head_dim=64,
                        intermediate_size=2048, tie_word_embeddings=True)
# a Qwen3-MoE in miniature on that shape: each layer 64 experts of width 128, top-8 (as Qwen3-30B-A3B, 128 of 768),
# renormalized; 271M parameters, 73M active (the dense layers' 2048 of SwiGLU per token becomes 8 x 128 = 1024)
QWEN_MOE = qwen.Config(**vars(QWEN_100M) | dict(model_type="qwen3_moe", n_experts=64, n_experts_per_tok=8,
                                                moe_intermediate_size=128))
MODELS = {"gpt2": (gpt2, "GPT2LMHeadModel"), "llama3": (llama3, "LlamaForCausalLM"),
          "qwen": (qwen, "Qwen3ForCausalLM")}
DEFAULTS = {"gpt2": ("gpt2", gpt2.PRESETS["gpt2"]), "llama3": ("llama 100M", LLAMA_100M),
            "qwen": ("qwen3 100M", QWEN_100M)}


def timed(fns, repeats):
    """{name: median seconds} of each fn over `repeats` rounds, each round running every fn once, in turn: all see
    the same machine load (a shared machine's load drifts over a minute-long run)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bytes_per_token(model):
    """Bytes decoding reads a token: every parameter and buffer once, an embedding table only if it is the head."""
    head = model.lm_head.weight.data_ptr() if type(model.lm_head) is torch.nn.Linear else None
    lookups = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)} - {head}
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.data_ptr() not in lookups}
    return sum(t.nbytes for t in tensors.values())


def bandwidth():
    """Bytes/s of copying 256 MB (read + write), the best of 5."""
    a = torch.empty(2**26, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = min(timed({"": lambda: b.copy_(a)}, 1)[""] for _ in range(5))
    return 2 * a.nbytes / best


def ours_in(model, precision):
    """A copy of the fp32 model in a precision: fp32, bf16, int8 or int4 (quantize.py, head included)."""
    m = copy.deepcopy(model)
    return m.to(torch.bfloat16) if precision == "bf16" else quantize.quantize(m, precision) if precision in (
        "int8", "int4") else m


def perplexity(model, data, block, windows=32):
    """exp(mean next-token loss) over `windows` consecutive windows of `block` tokens of the validation split."""
    ids = torch.from_numpy(data[:windows * block + 1].astype("int64"))
    with torch.inference_mode():
        loss = model(ids[:-1].view(windows, block), ids[1:].view(windows, block))[1]
    return loss.exp().item()


def precisions(a, module, hf_class, config, name):
    """--precisions: the table of issue 14 (see the module docstring)."""
    import numpy as np
    import transformers
    torch.manual_seed(0)
    base = module.Model(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, a.prompt_tokens))
    n, cfg = a.new_tokens, dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                                pad_token_id=0)
    models = {f"ours {p}": ours_in(base, p) for p in ("fp32", "bf16", "int8", "int4")}
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            models[f"transformers {p}"] = getattr(transformers, hf_class).from_pretrained(d, dtype=dt).eval()
    fns = {}
    for k, m in models.items():
        if k.startswith("ours"):
            fns[k] = lambda m=m: list(sample.generate(m, prompt, n, temperature=0))
        else:
            fns[k] = lambda m=m: m.generate(prompt, **cfg)
        with torch.inference_mode():
            fns[k]()   # warm-up (and the int4 kernel's packing)
    bw = bandwidth()
    with torch.inference_mode():
        times = timed(fns, a.repeats)
    ref = n / times["transformers fp32"]
    print(f"{name} ({base.num_params() / 1e6:.0f}M parameters), batch 1, cpu, greedy, {a.prompt_tokens} prompt + {n} "
          f"new tokens, torch threads {torch.get_num_threads()}, median of {a.repeats} interleaved runs; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'':20s} {'tokens/s':>9s} {'vs HF fp32':>11s} {'MB/token':>9s} {'bound tok/s':>12s} {'of bound':>9s}")
    for k, m in models.items():
        size = bytes_per_token(models[k.replace("transformers", "ours")])   # HF's: the same weights read
        tps = n / times[k]
        print(f"{k:20s} {tps:9.1f} {tps / ref:10.2f}x {size / 1e6:9.0f} {bw / size:12.1f} {tps * size / bw:8.0%}")
    if a.ppl_checkpoint:
        trained = module.Model.from_pretrained(a.ppl_checkpoint).eval()
        data = np.memmap(Path(a.ppl_data) / "val.bin", dtype=np.uint16, mode="r")
        block = min(128, trained.config.block_size)
        ppl = {p: perplexity(ours_in(trained, p), data, block) for p in ("fp32", "bf16", "int8", "int4")}
        print(f"validation perplexity of {a.ppl_checkpoint} ({trained.num_params() / 1e6:.1f}M parameters, "
              f"{32 * block} tokens of {a.ppl_data}): " + ", ".join(
                  f"{p} {v:.3f} ({100 * (v / ppl['fp32'] - 1):+.2f}%)" for p, v in ppl.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", help=" | ".join(MODELS))
    p.add_argument("--preset", default=None, help="a PRESETS name of the model file (default: gpt2; for llama3 "
                   "LLAMA_100M; for qwen QWEN_100M, with --moe QWEN_MOE)")
    p.add_argument("--moe", action="store_true", help="--model qwen: the small Qwen3-MoE QWEN_MOE")
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip_hf", action="store_true", help="do not compare with transformers")
    p.add_argument("--precisions", action="store_true", help="ours fp32 / bf16 / int8 / int4 vs transformers "
                   "fp32 / bf16, against the memory-bandwidth bound (issue 14)")
    p.add_argument("--ppl_checkpoint", default=None, help="--precisions: a trained checkpoint of --model whose "
                   "validation perplexity to report in each precision")
    p.add_argument("--ppl_data", default="data/stdlib", help="its data directory (val.bin)")
    a = p.parse_args()
    if a.moe and (a.model != "qwen" or a.preset):
        p.error("--moe is the QWEN_MOE config of --model qwen, without --preset")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    module, hf_class = MODELS[a.model]
    name, config = (a.preset, module.PRESETS[a.preset]) if a.preset else ("qwen3-moe 64/top-8", QWEN_MOE) if a.moe \
        else DEFAULTS[a.model]
    if a.model == "qwen":
        hf_class = qwen.MODEL_TYPES[config.model_type]
    if a.precisions:
        return precisions(a, module, hf_class, config, name)
    model = module.Model(config).to(a.device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, a.prompt_tokens), device=a.device)
    n = a.new_tokens

    def ours(use_cache):
        out = list(sample.generate(model, prompt, n, temperature=0, use_cache=use_cache))
        assert len(out) == n

    ours(True)   # warm-up
    fns, agree = {"sample.generate, KV cache": lambda: ours(True)}, {}
    if not a.skip_hf:
        import transformers
        # MoE: transformers' default experts implementation (None: grouped_mm where it can, else eager), and eager
        impls = [None] + (["eager"] if getattr(config, "n_experts", 0) else [])
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hfs = [getattr(transformers, hf_class).from_pretrained(d, dtype=torch.float32, **(
                {"experts_implementation": i} if i else {})).to(a.device).eval() for i in impls]
        cfg = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        mine = torch.stack(list(sample.generate(model, prompt, n, temperature=0)), dim=1)
        for i, hf in zip(impls, hfs):
            used = hf.config._experts_implementation_internal if len(impls) > 1 else None   # what None resolved to
            row = "transformers generate()" + (f" ({used}{', default' if i is None else ''})" if used else "")
            with torch.inference_mode():
                ref = hf.generate(prompt, **cfg)   # also the warm-up
            agree[row] = (ref[0, a.prompt_tokens:] == mine[0]).float().mean().item()
            fns[row] = lambda hf=hf: hf.generate(prompt, **cfg)
    times = timed(fns, a.repeats)   # interleaved: one call of each per round
    times["sample.generate, no cache"] = timed({"": lambda: ours(False)}, 1)[""]
    rows = {k: n / times[k] for k in ["sample.generate, KV cache", "sample.generate, no cache", *list(fns)[1:]]}
    base = rows[next(iter(agree))] if agree else None   # transformers' default
    active = f", {model.num_params(active=True) / 1e6:.0f}M active" if getattr(config, "n_experts", 0) else ""
    print(f"{name} ({model.num_params() / 1e6:.0f}M parameters{active}), batch 1, {a.device} fp32, greedy, "
          f"{a.prompt_tokens} prompt + {n} new tokens, "
          f"torch threads {torch.get_num_threads()}, median of {a.repeats} interleaved runs")
    w = max(28, *map(len, rows))
    print(f"{'':{w}s} {'tokens/s':>10s} {'vs generate()':>14s} {'vs no cache':>12s}")
    for name, tps in rows.items():
        vs_hf = f"{tps / base:.2f}x" if base else "-"
        print(f"{name:{w}s} {tps:10.1f} {vs_hf:>14s} {tps / rows['sample.generate, no cache']:11.2f}x")
    if base:
        same = ", ".join(f"{100 * v:.1f}%" + (f" {k[24:]}" if len(agree) > 1 else "") for k, v in agree.items())
        print(f"greedy tokens identical to transformers: {same}")


if __name__ == "__main__":
    main()
