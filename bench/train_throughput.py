"""Training speed: train.py's tokens/s and MFU against a minimal hand-written loop, same model and batch.

    python bench/train_throughput.py                                # the small default GPT-2, CPU
    python bench/train_throughput.py --model gpt2 --preset gpt2 --device cuda --batch_size 16 --seq_len 1024 --compile

Both loops run the same steps on the same random token data (forward, backward, clip, AdamW); train.py adds
everything a real run has (the LR schedule, logging, its data loader). The ratio is measured in the same run;
figures are medians over the timed steps after --warmup steps.
"""
import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sample  # noqa: E402
import train  # noqa: E402


def minimal_loop(model, data, args, device, dtype):
    """The smallest honest loop: sample a batch, forward, backward, clip, step. Returns step times."""
    # the same fused AdamW as train.py, so the ratio measures the loop around it, not the optimizer kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type in ("cuda", "cpu"))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        ix = np.random.randint(0, len(data) - args.seq_len - 1, args.batch_size)
        chunk = torch.from_numpy(np.stack([data[i:i + args.seq_len + 1] for i in ix]).astype(np.int64)).to(device)
        with autocast:
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--preset", default=None, help="an official size from the model file's PRESETS (default: Config())")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of train.py and the minimal loop")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--skip_minimal", action="store_true", help="only train.py (e.g. for the compile comparison)")
    a = p.parse_args()
    module = importlib.import_module(a.model)
    device = sample.pick_device(a.device)
    dtype = sample.pick_dtype(a.dtype, device)
    config = module.PRESETS[a.preset] if a.preset else module.Config()
    tokens_per_step = a.batch_size * a.seq_len

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        rng = np.random.default_rng(0)
        n = max(200_000, 4 * tokens_per_step)
        dt = np.uint16 if config.vocab_size <= 2**16 else np.uint32
        for split in ("train", "val"):
            rng.integers(0, config.vocab_size, n, dtype=np.int64).astype(dt).tofile(data_dir / f"{split}.bin")
        (data_dir / "meta.json").write_text(json.dumps({"vocab_size": config.vocab_size, "dtype": np.dtype(dt).name,
                                                      "eot_id": None, "train_tokens": n, "val_tokens": n}))
        overrides = [f"--{k}={v}" for k, v in vars(config).items() if k != "vocab_size" and v is not None
                     and not isinstance(v, (list, dict))]
        argv = ["--model", a.model, "--data", str(data_dir), "--out_dir", str(Path(tmp) / "out"), *overrides,
                "--batch_size", str(a.batch_size), "--seq_len", str(a.seq_len), "--max_steps", str(a.warmup + a.steps),
                "--log_interval", "1", "--eval_interval", "1000000", "--eval_iters", "1", "--sample_tokens", "0",
                "--device", str(device), "--dtype", a.dtype, "--warmup_steps", "1", "--lr", "1e-4"]
        if a.compile:
            argv.append("--compile")
        # alternate the two loops for --rounds rounds, so both see the same machine load; medians over all steps
        ours, minimal = [], []
        def run_train(r):
            args, _ = train.parse_args(argv[:5] + [str(Path(tmp) / f"out{r}")] + argv[6:])
            model, _ = train.train(args, module)
            rows = [json.loads(line) for line in (Path(tmp) / f"out{r}" / "metrics.jsonl").read_text().splitlines()]
            ours.extend(row["tokens_per_s"] for row in rows if row.get("step", 0) > a.warmup and "tokens_per_s" in row)
            return model

        def run_minimal():
            torch.manual_seed(0)
            fresh = module.Model(module.Config(**vars(config))).to(device)
            if a.compile:
                fresh = torch.compile(fresh)
            data = np.memmap(data_dir / "train.bin", dtype=dt, mode="r")
            minimal.extend(tokens_per_step / t for t in minimal_loop(fresh, data, a, device, dtype))

        for r in range(a.rounds):   # the order alternates too: neither loop always runs on a fresh process
            if r % 2 and not a.skip_minimal:
                run_minimal()
            model = run_train(r)
            if r % 2 == 0 and not a.skip_minimal:
                run_minimal()
        results = {f"train.py{' (compiled)' if a.compile else ''}": statistics.median(ours)}
        if minimal:
            results["minimal loop"] = statistics.median(minimal)

    flops = model.flops_per_token(a.seq_len)
    peak = train.peak_flops(device)
    print(f"{a.model} {a.preset or 'Config()'} ({model.num_params() / 1e6:.1f}M params), batch {a.batch_size} x "
          f"{a.seq_len}, {device} {dtype}, {a.rounds} x {a.steps} timed steps (each after {a.warmup} warm-up), torch threads "
          f"{torch.get_num_threads()}")
    base = results.get("minimal loop")
    for name, tps in results.items():
        mfu = f"{100 * tps * flops / peak:5.1f}%" if peak else "  n/a"
        ratio = f"{tps / base:.3f}x" if base else "-"
        print(f"{name:22s} {tps:12,.0f} tokens/s   MFU {mfu}   vs minimal loop {ratio}")


if __name__ == "__main__":
    main()
