"""Sampling speed: tokens/s of sample.generate with the KV cache, without it, and transformers' generate().

    python bench/sample_throughput.py                      # GPT-2 124M shape, batch 1, CPU fp32, greedy, 256 tokens
    python bench/sample_throughput.py --preset gpt2-medium --new_tokens 128 --device cuda
    python bench/sample_throughput.py --model llama3       # a 100M-parameter Llama 3.2 in miniature (LLAMA_100M)
    python bench/sample_throughput.py --model qwen         # a 100M-parameter Qwen3 (QWEN_100M) vs Qwen3ForCausalLM
    python bench/sample_throughput.py --model qwen --moe   # a small Qwen3-MoE (QWEN_MOE) vs Qwen3MoeForCausalLM

The weights are random (no download): speed does not depend on their values, and both implementations load
the same checkpoint. Each figure is the median of --repeats runs, interleaved (each round runs every implementation
once, so that all see the same load; the slow no-cache loop runs once); the ratios are measured in the same run.
The MoE model is timed against transformers twice: with the experts implementation it picks by default
(grouped_mm where torch has it, one grouped matmul per projection) and with "eager" (a loop over the hit experts).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt2  # noqa: E402
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
