"""MLA's compressed KV cache: bytes per token against multi-head attention, and decode speed, absorbed vs naive.

    python bench/mla_cache.py                    # the arithmetic for V2 / V3, the real allocation, decode at 2k
    python bench/mla_cache.py --context 512 --new_tokens 16

1. Cache per token per layer, as the DeepSeek-V2 paper counts it (its Table 1): MHA caches 2 nh dh numbers (k
   and v of every head), MLA caches the latent c (kv_lora_rank) and the shared rotary key (qk_rope_head_dim).
   The real allocation is read off init_cache's tensors.
2. Decoding one token at a position of --context (random weights, a small V3-shaped config, CPU fp32): the absorbed
   path (deepseek.py with a cache: attention over the 576-wide latent) against the naive path, which has no cache
   to read k and v from and recomputes the whole sequence, as MLA without absorption would have to (or else cache
   the expanded k and v, the MHA-sized cache that MLA avoids). Medians of interleaved runs.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import deepseek  # noqa: E402


def per_token(config):
    """(MLA numbers, MHA numbers) cached per token per layer; MHA with the same heads: k (dn + dr) and v (dv)."""
    mla = config.kv_lora_rank + config.qk_rope_head_dim
    mha = config.n_head * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return mla, mha


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new_tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print("cache per token per layer (numbers; bf16 bytes = 2x)")
    for name in ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3"):
        c = deepseek.PRESETS[name]
        mla, mha = per_token(c)
        print(f"  {name:17s} MLA {mla:6,d}   MHA with its {c.n_head} heads {mha:7,d}   ratio {mha / mla:5.1f}x   "
              f"whole model, bf16: {2 * mla * c.n_layer / 1024:6.1f} KiB vs {2 * mha * c.n_layer / 1024:8.1f} KiB")
    torch.manual_seed(0)
    config = deepseek.Config(vocab_size=4096, block_size=a.context + a.new_tokens, n_layer=4, n_head=16, n_embd=512,
                             q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                             v_head_dim=32, intermediate_size=1024, moe_intermediate_size=128, n_routed_experts=8)
    model = deepseek.Model(config).eval()
    cache = model.init_cache(1, config.block_size)
    numbers = sum(t.numel() for layer in cache for t in (layer.c, layer.k_pe)) / config.block_size / config.n_layer
    mla, mha = per_token(config)
    print(f"bench config: allocated {numbers:.0f} numbers per token per layer (expected {mla}; MHA would take {mha})")
    idx = torch.randint(0, config.vocab_size, (1, a.context + a.new_tokens))
    with torch.no_grad():
        model(idx[:, :a.context], cache=cache)   # prefill once; each timed run decodes the same next tokens

        def absorbed():
            for i in range(a.new_tokens):
                model(idx[:, a.context + i:a.context + i + 1], cache=cache, pos=a.context + i, last_only=True)

        def naive():
            for i in range(a.new_tokens):
                model(idx[:, :a.context + i + 1], last_only=True)

        times = {"absorbed, latent cache": [], "naive, full recomputation": []}
        absorbed()
        for _ in range(a.repeats):
            for name, fn in zip(times, (absorbed, naive)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"decode at context {a.context}, {a.new_tokens} tokens, median of {a.repeats} interleaved runs:")
    base = statistics.median(times["naive, full recomputation"])
    for name, t in times.items():
        t = statistics.median(t)
        print(f"  {name:27s} {a.new_tokens / t:8.1f} tokens/s   {base / t:6.1f}x")


if __name__ == "__main__":
    main()
