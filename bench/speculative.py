"""Speculative decoding vs plain decoding: tokens/s at batch 1, greedy and sampled, and the acceptance rate.

    python bench/speculative.py                        # trains both models first when --target/--draft are absent
    python bench/speculative.py --target out/t/last --draft out/d/last

The target (gpt2, 6 layers, 384 wide) and the draft (2 layers, 128 wide) are trained with train.py on the
default data (data/stdlib, same tokenizer) unless given. Plain and speculative runs alternate, --repeat rounds;
each figure is the median. Greedy speculative tokens are checked equal to plain greedy's.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402

TRAIN = {"target": ["--n_layer", "6", "--n_head", "6", "--n_embd", "384", "--lr", "2e-3"],
         "draft": ["--n_layer", "2", "--n_head", "2", "--n_embd", "128", "--lr", "3e-3"]}


def train(name, out_dir, steps):
    """One train.py run; -> its last checkpoint."""
    subprocess.run([sys.executable, "train.py", "--model", "gpt2", *TRAIN[name], "--block_size", "256",
                    "--seq_len", "128", "--batch_size", "16", "--max_steps", str(steps), "--eval_interval",
                    str(steps), "--eval_iters", "5", "--sample_tokens", "0", "--out_dir", str(out_dir)],
                   cwd=ROOT, check=True)
    return out_dir / "last"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--out_dir", default="out/bench_speculative", help="where to train the missing models")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--k", default="2,4,6", help="draft tokens per round to try")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    paths = {name: Path(getattr(args, name) or train(name, Path(args.out_dir) / name, args.steps))
             for name in ("target", "draft")}
    _, target, tok = sample.load(str(paths["target"]))
    _, draft, _ = sample.load(str(paths["draft"]))
    prompt = torch.tensor([tok.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")])
    n = args.tokens

    def run(temperature, **kw):
        stats, t0 = {}, time.perf_counter()
        out = [int(t) for t in sample.generate(target, prompt, n, temperature=temperature, top_k=50,
                                               generator=torch.Generator().manual_seed(0), stats=stats, **kw)]
        return time.perf_counter() - t0, out, stats

    print(f"target {target.num_params() / 1e6:.2f}M, draft {draft.num_params() / 1e6:.2f}M parameters; "
          f"{n} new tokens, batch 1, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'mode':8s} {'k':>3s} {'plain tok/s':>12s} {'spec tok/s':>11s} {'speed-up':>9s} {'accepted':>9s}")
    for temperature, mode in ((0, "greedy"), (0.8, "sampled")):
        for k in map(int, args.k.split(",")):
            plain, spec, rates = [], [], []
            for _ in range(args.repeat):   # interleaved: both see the same machine load
                t, ref, _ = run(temperature)
                plain.append(len(ref) / t)
                t, got, stats = run(temperature, draft=draft, draft_tokens=k)
                spec.append(len(got) / t)
                rates.append(stats["accepted"] / max(stats["drafted"], 1))
                assert temperature > 0 or got == ref, "speculative greedy differs from plain greedy"
            a, b = statistics.median(plain), statistics.median(spec)
            print(f"{mode:8s} {k:3d} {a:12.1f} {b:11.1f} {b / a:8.2f}x {statistics.median(rates):9.0%}")


if __name__ == "__main__":
    main()
