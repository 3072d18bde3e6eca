"""Sampling speed: tokens/s of sample.generate with the KV cache, without it, and transformers' generate().

    python bench/sample_throughput.py                      # GPT-2 124M shape, batch 1, CPU fp32, greedy, 256 tokens
    python bench/sample_throughput.py --preset gpt2-medium --new_tokens 128 --device cuda
    python bench/sample_throughput.py --model llama3       # a 100M-parameter Llama 3.2 in miniature (LLAMA_100M)

The weights are random (no download): speed does not depend on their values, and both implementations load
the same checkpoint. Each figure is the median of --repeats runs; the ratios are measured in the same run.
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
import sample  # noqa: E402

# Llama's default shape: 12 layers, d 768, 12 query / 4 KV heads, SwiGLU 2048, a 32768-token vocabulary tied to the
# head, RoPE scaled by 32 as in 3.2; 101M parameters
LLAMA_100M = llama3.Config(vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                           intermediate_size=2048, rope_scale_factor=32.0, rope_original_context=1024,
                           tie_word_embeddings=True)
MODELS = {"gpt2": (gpt2, "GPT2LMHeadModel"), "llama3": (llama3, "LlamaForCausalLM")}


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", help=" | ".join(MODELS))
    p.add_argument("--preset", default=None, help="a PRESETS name of the model file (default: gpt2; for llama3 "
                   "LLAMA_100M)")
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip_hf", action="store_true", help="do not compare with transformers")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    module, hf_class = MODELS[a.model]
    name = a.preset or ("gpt2" if a.model == "gpt2" else "llama 100M")
    config = module.PRESETS[a.preset] if a.preset else gpt2.PRESETS["gpt2"] if a.model == "gpt2" else LLAMA_100M
    model = module.Model(config).to(a.device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, a.prompt_tokens), device=a.device)
    n = a.new_tokens

    def ours(use_cache):
        out = list(sample.generate(model, prompt, n, temperature=0, use_cache=use_cache))
        assert len(out) == n

    rows = {}
    ours(True)   # warm-up
    rows["sample.generate, KV cache"] = n / timed(lambda: ours(True), a.repeats)
    rows["sample.generate, no cache"] = n / timed(lambda: ours(False), 1)
    if not a.skip_hf:
        import transformers
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = getattr(transformers, hf_class).from_pretrained(d, dtype=torch.float32).to(a.device).eval()
        cfg = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            ref = hf.generate(prompt, **cfg)
            mine = torch.stack(list(sample.generate(model, prompt, n, temperature=0)), dim=1)
            agree = (ref[0, a.prompt_tokens:] == mine[0]).float().mean().item()
            rows["transformers generate()"] = n / timed(lambda: hf.generate(prompt, **cfg), a.repeats)
    base = rows.get("transformers generate()")
    print(f"{name} ({model.num_params() / 1e6:.0f}M parameters), batch 1, {a.device} fp32, greedy, "
          f"{a.prompt_tokens} prompt + {n} new tokens, "
          f"torch threads {torch.get_num_threads()}, median of {a.repeats}")
    print(f"{'':28s} {'tokens/s':>10s} {'vs generate()':>14s} {'vs no cache':>12s}")
    for name, tps in rows.items():
        vs_hf = f"{tps / base:.2f}x" if base else "-"
        print(f"{name:28s} {tps:10.1f} {vs_hf:>14s} {tps / rows['sample.generate, no cache']:11.2f}x")
    if base:
        print(f"greedy tokens identical to transformers: {100 * agree:.1f}%")


if __name__ == "__main__":
    main()
