"""Full fine-tuning against LoRA on a ~100M model: peak memory, tokens/s, trainable parameters, checkpoint size.

    python bench/finetune_memory.py                                   # GPT-2 124M, fp32, CPU, batch 1 x 256
    python bench/finetune_memory.py --model llama3 --device cuda --batch_size 8 --seq_len 1024

Each configuration runs in a fresh process (so one's allocations cannot hide the other's): build the model with
random weights, for LoRA add adapters (lora.add_lora, rank 8 on attention + MLP by default), then the steps of a real
loop (forward, backward, clip, AdamW over the trainable parameters). Then each saves what it would ship: the whole
model.safetensors, or adapter_model.safetensors.
  - peak memory: what the process added from before the model was built to the end of the last step: VmHWM (peak
    RSS) on the CPU, max_memory_allocated on CUDA. Full fine-tuning holds weights + gradients + AdamW's two moments
    (4x the weights) + activations; LoRA the frozen weights + activations, its own gradients and moments are small;
  - tokens/s: wall clock, median over the timed steps; per CPU-s: over the process's CPU time instead, the steadier
    figure on a machine shared with other jobs.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {   # ~100M parameters
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),   # the 124M preset
    "llama3": dict(vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                   intermediate_size=2048, tie_word_embeddings=True),   # as bench/llama_load_memory.py
}


def rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def child(a):
    """One configuration, in this process: prints a JSON line of its figures."""
    import importlib
    import torch
    sys.path.insert(0, str(ROOT))
    import lora
    module, device = importlib.import_module(a.model), torch.device(a.device)
    torch.manual_seed(0)
    torch.zeros(8, device=device).sum()   # warm-up: the allocator and kernels, not the model
    start = rss()["VmRSS"]
    model = module.Model(module.Config(**CONFIGS[a.model])).to(device).train()
    if a.child == "lora":
        lora.add_lora(model, a.rank, targets=a.targets)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    idx = torch.randint(0, model.config.vocab_size, (a.batch_size, a.seq_len + 1), device=device)
    times, cpu_times = [], []
    for _ in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss()["VmHWM"] - start
    with tempfile.TemporaryDirectory() as d:
        if a.child == "lora":
            lora.save_adapter(model, d, "base")
            size = (Path(d) / lora.WEIGHTS).stat().st_size
        else:
            model.save_pretrained(d)
            size = (Path(d) / "model.safetensors").stat().st_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": peak, "weights": weights, "trainable": sum(p.numel() for p in params),
                      "total": model.num_params(), "file": size, "tokens_per_s": a.batch_size * a.seq_len /
                      statistics.median(times[a.warmup:]), "tokens_per_cpu_s": a.batch_size * a.seq_len /
                      statistics.median(cpu_times[a.warmup:])}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median), each configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="all", help="lora.add_lora targets: attention, mlp, all, or suffixes")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)   # full | lora: run one, in this process
    a = p.parse_args()
    if a.child:
        return child(a)
    rows = {}
    for name in ("full", "lora"):
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", name], capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    full, lo, gb, mb = rows["full"], rows["lora"], 2**30, 2**20
    print(f"{a.model} {full['total'] / 1e6:.0f}M parameters ({full['weights'] / gb:.2f} GiB fp32), batch "
          f"{a.batch_size} x {a.seq_len}, {a.device}, AdamW, median of {a.steps} steps after {a.warmup}; LoRA rank "
          f"{a.rank} on {a.targets}")
    print(f"{'':17s} {'trainable':>17s} {'peak memory':>21s} {'tokens/s':>9s} {'per CPU-s':>9s}  saved file")
    for name, m in rows.items():
        label, file = ("full fine-tuning", "model") if name == "full" else (f"LoRA r={a.rank}", "adapter_model")
        print(f"{label:17s} {m['trainable'] / 1e6:7.2f}M ({100 * m['trainable'] / m['total']:5.1f}%) "
              f"{m['peak'] / gb:6.2f} GiB ({m['peak'] / m['weights']:.2f}x W) {m['tokens_per_s']:9.0f} "
              f"{m['tokens_per_cpu_s']:9.0f}  {file}.safetensors {m['file'] / mb:.2f} MiB")
    ratio = {k: lo[k] / full[k] for k in ("peak", "tokens_per_s", "tokens_per_cpu_s", "file")}
    print(f"LoRA / full: peak memory {ratio['peak']:.2f}x, tokens/s {ratio['tokens_per_s']:.2f}x (per CPU-s "
          f"{ratio['tokens_per_cpu_s']:.2f}x), file {ratio['file']:.4f}x")

if __name__ == "__main__":
    main()
