"""train.py's memory savers on a ~100M model: peak memory and tokens/s with and without --grad_checkpoint in one
process, and DDP against --fsdp with --nproc processes (torchrun, gloo on the CPU, NCCL on GPUs).

    python bench/train_memory.py                                    # GPT-2 124M shape, CPU, batch 4 x 128
    python bench/train_memory.py --device cuda --dtype bfloat16 --batch_size 8 --seq_len 1024
    python bench/train_memory.py --arch llama-1b --device cuda --dtype bfloat16 --nproc 8 --only fsdp,fsdp+checkpoint

Each configuration is a real `train.py` run in fresh processes on random token data (vocab 50257), so the figures
are those of the loop a user runs, checkpoints left out (--eval_interval past the last step):
  - peak memory: each process's VmHWM (peak RSS) on the CPU, max_memory_allocated on CUDA, the largest over the
    ranks; `base` is what the process held after importing train.py, before any model existed;
  - tokens/s and MFU: train.py's own figures (all processes together), medians over the steps after --warmup.
"""
import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARCHS = {   # (train.py flags, vocabulary)
    "gpt2-124m": (["--model", "gpt2", "--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"],
                  50257),
    "llama-1b": (["--model", "llama3", "--n_layer", "16", "--n_head", "32", "--n_kv_head", "8", "--n_embd", "2048",
                  "--intermediate_size", "8192", "--block_size", "2048"], 128256),   # Llama 3.2 1B's shape
}


def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(train_argv, report):
    """One process of a configuration: run train.main, then append its peak memory to `report` (JSON lines)."""
    sys.path.insert(0, str(ROOT))
    import torch
    import train
    base = vm("VmRSS")

    def write():
        cuda = torch.cuda.is_available() and "cuda" in " ".join(train_argv)
        with open(report, "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "base": base,
                                "peak": torch.cuda.max_memory_allocated() if cuda else vm("VmHWM"),
                                "cuda": cuda}) + "\n")
    atexit.register(write)
    train.main(train_argv)


def make_data(directory, vocab_size, n=400_000):
    directory.mkdir(parents=True, exist_ok=True)
    rng, dtype = np.random.default_rng(0), "uint16" if vocab_size <= 2**16 else "uint32"
    for split, size in (("train", n), ("val", n // 10)):
        rng.integers(0, vocab_size, size).astype(dtype).tofile(directory / f"{split}.bin")
    (directory / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": dtype, "eot_id": None,
                                                     "train_tokens": n, "val_tokens": n // 10}))


def measure(name, n_proc, flags, a, tmp):
    out, report = tmp / name, tmp / f"{name}.jsonl"
    argv = [*ARCHS[a.arch][0], "--data", str(tmp / "data"), "--out_dir", str(out), "--seq_len", str(a.seq_len),
            "--batch_size", str(a.batch_size // n_proc), "--max_steps", str(a.steps), "--eval_interval", "1000000",
            "--log_interval", "1", "--sample_tokens", "0", "--device", a.device, "--dtype", a.dtype,
            "--threads", str(max(1, a.threads // n_proc)), *flags]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}"]
    launcher = [sys.executable] if "--fsdp" not in flags and n_proc == 1 else torchrun
    cmd = [*launcher, __file__, "--child", str(report), "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, a.threads // n_proc))}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > a.warmup]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    mfu = statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None
    mem = [json.loads(line) for line in report.read_text().splitlines()]
    peak = max(m["peak"] for m in mem)
    base = 0 if mem[0]["cuda"] else max(m["base"] for m in mem)
    return {"config": name, "processes": n_proc, "tokens_per_s": tok_s, "mfu": mfu, "peak_gib": peak / 2**30,
            "base_gib": base / 2**30, "above_base_gib": (peak - base) / 2**30}


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[4:], sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="gpt2-124m", choices=list(ARCHS))
    p.add_argument("--nproc", type=int, default=2, help="processes of the ddp and fsdp configurations")
    p.add_argument("--batch_size", type=int, default=4, help="global: split over the processes")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (split over processes)")
    p.add_argument("--only", default=None, help="comma-separated subset of: plain,checkpoint,ddp,fsdp,fsdp+checkpoint")
    a = p.parse_args()
    n = a.nproc
    configs = {"plain": (1, []), "checkpoint": (1, ["--grad_checkpoint"]), "ddp": (n, []), "fsdp": (n, ["--fsdp"]),
               "fsdp+checkpoint": (n, ["--fsdp", "--grad_checkpoint"])}
    chosen = a.only.split(",") if a.only else list(configs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", ARCHS[a.arch][1])
        print(f"{a.arch} shape, {a.device} {a.dtype}, global batch {a.batch_size} x {a.seq_len}, "
              f"{a.steps} steps (median after {a.warmup})")
        print(f"{'config':>16} {'procs':>5} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'above base':>10}")
        for name in chosen:
            r = measure(name, *configs[name], a, tmp)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['config']:>16} {r['processes']:>5} {r['tokens_per_s']:>9,.0f} {mfu:>6} {r['peak_gib']:>9.2f} "
                  f"{r['above_base_gib']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
