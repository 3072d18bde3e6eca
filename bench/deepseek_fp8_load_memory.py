"""Peak memory while loading an FP8 DeepSeek-V3 checkpoint (dequantized on load), against the loaded model's size.

    python bench/deepseek_fp8_load_memory.py                       # ~150M parameters, 4 shards, loaded as bfloat16
    python bench/deepseek_fp8_load_memory.py --load_dtype float32 --shard_mb 50

A random checkpoint is written in the FP8 release's layout first: every Linear weight of the attention and of the
MLPs and experts as float8_e4m3fn with its weight_scale_inv on the 128x128 block grid, the rest in bf16. Then a fresh
process loads it with DeepSeek.from_pretrained (bench/llama_load_memory.py's measuring child) and reports the
peak of its anonymous memory (what it allocated itself, sampled every 2 ms) and of its RSS (also counting mapped
pages of the files). A loader that dequantized
the whole file before building the model, or kept the FP8 tensors beside the result, would show well over 1x.
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from llama_load_memory import CHILD  # noqa: E402  (the same measuring child process, given the model file)



def quantize(w):
    """128x128-block E4M3 with a float32 scale per block (scale = amax / 448), partial edge blocks included."""
    import torch
    M, N = w.shape
    padded = torch.zeros(math.ceil(M / 128) * 128, math.ceil(N / 128) * 128)
    padded[:M, :N] = w.float()
    blocks = padded.view(padded.size(0) // 128, 128, padded.size(1) // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0                  # (M/128, N/128)
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:M, :N].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load_dtype", default="bfloat16", help="bfloat16 | float32")
    p.add_argument("--shard_mb", type=int, default=40)
    a = p.parse_args()
    import torch
    sys.path.insert(0, str(ROOT))
    import checkpoint_io
    import deepseek
    config = deepseek.Config(vocab_size=32768, block_size=2048, n_layer=6, n_head=16, n_embd=1024, q_lora_rank=384,
                             kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                             intermediate_size=2816, moe_intermediate_size=352, n_routed_experts=16,
                             n_experts_per_tok=2)   # 352, 2816: not multiples of 128, so edge blocks are partial
    torch.manual_seed(0)
    state = {}
    for key, shape in deepseek._expected_shapes(config).items():   # the official keys and shapes
        w = torch.randn(shape) * 0.02
        if w.dim() == 2 and (".self_attn." in key or ".mlp." in key) and not key.endswith("mlp.gate.weight"):
            state[key], state[key + "_scale_inv"] = quantize(w)
        else:
            state[key] = w.float() if "e_score_correction_bias" in key else w.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        checkpoint_io.save_safetensors(state, d, max_shard_bytes=a.shard_mb * 2**20)
        hf = config.to_hf() | {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                       "quant_method": "fp8", "weight_block_size": [128, 128]}}
        (Path(d) / "config.json").write_text(json.dumps(hf))
        files = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        n_files = len(list(Path(d).glob("*.safetensors")))
        del state
        r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), d, a.load_dtype, "deepseek"],
                           capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mb, size = 2**20, m["weights"]
    print(f"FP8 checkpoint: {files / mb:.0f} MiB in {n_files} shards; loaded as {a.load_dtype}: {size / mb:.0f} MiB "
          f"({m['seconds']:.1f} s)")
    for name, value in (("peak anonymous memory added while loading", m["peak_anon"] - m["base_anon"]),
                        ("anonymous memory held at the end", m["end_anon"] - m["base_anon"]),
                        ("peak RSS added (with mapped file pages)", m["peak_rss"] - m["base_rss"])):
        print(f"  {name:44s} {value / mb:7.0f} MiB = {value / size:.2f}x the loaded model")


if __name__ == "__main__":
    main()
