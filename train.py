"""One training loop for every model file: CPU, one GPU, or many through torchrun (DDP).

    python train.py --model gpt2                        # small model, default dataset, a few minutes on a CPU
    python train.py --model gpt2 --init_from gpt2 --data data/shakespeare --lr 3e-5   # fine-tune official weights
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --init_from scratch \\
        --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --data data/fineweb ...

Every --flag has a default (see --help). Architecture flags come from the model file's Config dataclass.
--config file.json gives overrides too (flags on the command line win).

Checkpoints go to <out_dir>/ckpt-<step>/ in the model's official Hugging Face layout plus train_state.pt, and
the symlinks <out_dir>/last and <out_dir>/best point at the newest and the lowest-val-loss ones. A symlink is
swapped in one atomic rename, so a crash mid-write leaves the previous checkpoint in place.
"""
import argparse
import dataclasses
import importlib
import io
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hub

# the model files this checkout has (DESIGN.md plans gpt2, llama3, qwen, deepseek)
MODELS = tuple(m for m in ("gpt2", "llama3", "qwen", "deepseek") if (Path(__file__).parent / f"{m}.py").is_file())
# Peak dense bf16 tensor-core FLOP/s, for MFU (vendor datasheets; fp32 runs are quoted against these too).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


class TrainingError(RuntimeError):
    """A problem with the run's inputs or state, reported as one line."""


# -----------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="gpt2")
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.model not in MODELS:
        raise SystemExit(f"error: --model {known.model!r} is not one of {', '.join(MODELS)}")
    try:
        module = importlib.import_module(known.model)
    except ModuleNotFoundError as e:
        raise SystemExit(f"error: --model {known.model}: {known.model}.py is not available ({e})")

    p = argparse.ArgumentParser(description="Train any model file of this repo.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", help=f"model file: {' | '.join(MODELS)}")
    p.add_argument("--config", default=None, help="JSON file of overrides for any flag below")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default="data/stdlib", help="directory with train.bin, val.bin, meta.json "
                   "(the default dataset is prepared automatically when missing)")
    g.add_argument("--out_dir", default=None, help="checkpoints and metrics (default: out/<model>)")
    g.add_argument("--init_from", default="scratch", help="scratch | a preset | a hub id | a checkpoint dir")
    g.add_argument("--resume", action="store_true", help="continue from <out_dir>/last exactly")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=16, help="sequences per micro-step per process")
    g.add_argument("--seq_len", type=int, default=128, help="tokens per training sequence")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--max_steps", type=int, default=600, help="optimizer steps in all")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=None, help="end of cosine decay (default: lr / 10)")
    g.add_argument("--warmup_steps", type=int, default=50, help="linear warmup steps")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay, on matrices only")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=1337, help="seeds the init, dropout and the batches")
    g.add_argument("--eval_interval", type=int, default=200, help="evaluate and checkpoint every N steps")
    g.add_argument("--eval_iters", type=int, default=20, help="batches per evaluation")
    g.add_argument("--log_interval", type=int, default=20, help="log every N steps")
    g.add_argument("--sample_tokens", type=int, default=200, help="tokens sampled at the end (0: none)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    cfg_fields = [f for f in dataclasses.fields(module.Config) if f.name != "vocab_size"]
    g = p.add_argument_group(f"{known.model}.Config (architecture when training from scratch)")
    for f in cfg_fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        g.add_argument(f"--{f.name}", type=_literal, default=argparse.SUPPRESS, help=f"(default: {default!r})")
    if known.config:
        try:
            overrides = json.loads(Path(known.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: --config {known.config}: {e}")
        unknown = set(overrides) - {a.dest for a in p._actions}
        if unknown:
            raise SystemExit(f"error: --config {known.config}: unknown keys {sorted(unknown)}")
        p.set_defaults(**overrides)
    args = p.parse_args(argv)
    args.model_overrides = {f.name: getattr(args, f.name) for f in cfg_fields if hasattr(args, f.name)}
    args.out_dir = args.out_dir or f"out/{args.model}"
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    return args, module


def _literal(s):
    """A flag value as int, float, bool, None or str: '4' -> 4, '1e-3' -> 0.001, 'none' -> None."""
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"none": None, "null": None, "true": True, "false": False}.get(s.lower(), s)


# -----------------------------------------------------------------------------------------------------------
# Data: memory-mapped token shards. A step's global batch is a pure function of (seed, step), so a resumed run
# sees exactly the batches it would have seen; each (micro-step, rank) takes its own slice of that global batch,
# so 8 GPUs x batch 4, 1 GPU x batch 32, or batch 8 x 4 accumulation steps all train on the same sequences.


def read_meta(directory):
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise TrainingError(f"--data {directory}: no meta.json (run prepare_data.py first)")
    return json.loads(path.read_text())


class TokenData:
    def __init__(self, directory, seq_len, vocab_size, meta=None):
        directory = Path(directory)
        self.meta = meta or read_meta(directory)
        if self.meta["vocab_size"] > vocab_size:
            raise TrainingError(f"--data {directory}: tokenizer vocabulary {self.meta['vocab_size']} exceeds the "
                                f"model's vocab_size {vocab_size}")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.paths = {split: directory / f"{split}.bin" for split in ("train", "val")}
        # instruction data: a uint8 mask beside the tokens, 1 where the token is a target (an assistant reply)
        self.masks = {split: directory / f"{split}.mask.bin" for split in self.paths} if self.meta.get("loss_mask") else {}
        for split, path in self.paths.items():
            n = path.stat().st_size // np.dtype(self.meta["dtype"]).itemsize if path.is_file() else 0
            if n <= seq_len + 1:
                raise TrainingError(f"--data {path}: {n} tokens, fewer than --seq_len + 2 = {seq_len + 2}")

    def batch(self, split, seed, batch_size, part=0, parts=1):
        """Slice `part` of `parts` of the global batch drawn with `seed`: (B, T) inputs and targets."""
        # a fresh memmap per batch avoids the slow growth of memory that a long-lived one shows (nanoGPT)
        data = np.memmap(self.paths[split], dtype=self.meta["dtype"], mode="r")
        g = torch.Generator().manual_seed(seed)
        ix = torch.randint(len(data) - self.seq_len - 1, (batch_size * parts,), generator=g)
        ix = ix[part * batch_size:(part + 1) * batch_size]
        chunk = torch.stack([torch.from_numpy(data[i:i + self.seq_len + 1].astype(np.int64)) for i in ix.tolist()])
        if chunk.max() >= self.vocab_size:
            raise TrainingError(f"--data {self.paths[split]}: token id {int(chunk.max())} is beyond the model's "
                                f"vocab_size {self.vocab_size}")
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()   # (B, T) inputs, (B, T) targets
        if self.masks:
            mask = np.memmap(self.masks[split], dtype=np.uint8, mode="r")
            keep = torch.stack([torch.from_numpy(mask[i + 1:i + self.seq_len + 1].astype(np.bool_)) for i in ix.tolist()])
            y = y.masked_fill(~keep, -100)
        return x, y


def step_seed(seed, step):
    return seed * 1_000_003 + step


# -----------------------------------------------------------------------------------------------------------
# Helpers


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32   # CPU/MPS bf16 autocast is usually slower than fp32 for small models
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"error: --dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return dtypes[name]


def lr_at(step, args):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (Loshchilov & Hutter 2017)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model, args, device):
    # weight decay on matrices (linear weights, embeddings) only; never on biases and norm gains
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel is one pass over all parameters; on CPU torch's default per-tensor loop is ~50x slower
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def rng_state(device):
    # torch's generators drive dropout; batches come from their own step-seeded generators (TokenData)
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out_dir, model, optimizer, scaler, step, best_val, args, data_dir, link_names):
    """Write ckpt-<step>/ (official layout + train_state.pt) into a temp dir, rename it, swap the symlinks."""
    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step:07d}"
    last = out_dir / "last"
    if not (last.is_symlink() and os.readlink(last) == final.name):   # else saved already (Ctrl-C after an eval)
        tmp = out_dir / f".tmp-ckpt-{step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok_dir = Path(data_dir) / "tokenizer"
        if tok_dir.is_dir():
            for f in tok_dir.iterdir():
                shutil.copyfile(f, tmp / f.name)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_state(next(model.parameters()).device), "best_val_loss": best_val,
                 "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        hub.atomic_write(tmp / "train_state.pt", buffer.getvalue())
        if final.exists():   # a stale one of this step from an earlier run: move it aside, never delete first
            os.replace(final, out_dir / f".stale-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
        shutil.rmtree(out_dir / f".stale-{final.name}-{os.getpid()}", ignore_errors=True)
    for name in link_names:
        link_tmp = out_dir / f".{name}.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        link_tmp.symlink_to(final.name)
        os.replace(link_tmp, out_dir / name)
    hub.fsync_dir(out_dir)
    # keep only the checkpoints a link points at
    keep = {os.readlink(out_dir / n) for n in ("last", "best") if (out_dir / n).is_symlink()}
    for d in out_dir.glob("ckpt-*"):
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def load_train_state(ckpt_dir):
    path = Path(ckpt_dir) / "train_state.pt"
    if not path.is_file():
        raise TrainingError(f"--resume: {path} not found (nothing to resume in {Path(ckpt_dir).parent})")
    return torch.load(path, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------------------------------------
# The loop


def train(args, module):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    device = pick_device(args.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = pick_dtype(args.dtype, device)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_dir = Path(args.data)
    if not (data_dir / "meta.json").is_file() and args.data == "data/stdlib":
        if master:
            import prepare_data
            prepare_data.prepare("stdlib", out_dir=str(data_dir.parent))
        if ddp:
            dist.barrier()
    meta = read_meta(data_dir)
    out_dir = Path(args.out_dir)

    # the model: resumed, fine-tuned from weights, or new
    state = None
    if args.resume:
        last = out_dir / "last"
        state = load_train_state(last)
        model = module.Model.from_pretrained(str(last.resolve()))
    elif args.init_from != "scratch":
        # under DDP rank 0 downloads first, then the others read its cache (never two writers on one file)
        if ddp and not master:
            dist.barrier()
        model = module.Model.from_pretrained(args.init_from)
        if ddp and master:
            dist.barrier()
        reshaping = set(args.model_overrides) - {"dropout"}
        if reshaping:
            raise TrainingError(f"--init_from {args.init_from}: cannot change {sorted(reshaping)} of pretrained "
                                f"weights (only --dropout)")
        if "dropout" in args.model_overrides:
            _set_dropout(model, args.model_overrides["dropout"])
    else:
        fields = {"vocab_size": meta.get("vocab_size", module.Config.vocab_size)}
        if meta.get("eot_id") is not None and "eos_token_id" in {f.name for f in dataclasses.fields(module.Config)}:
            fields["eos_token_id"] = meta["eot_id"]
        model = module.Model(module.Config(**{**fields, **args.model_overrides}))
    config = model.config
    if args.seq_len > config.block_size:
        raise TrainingError(f"--seq_len {args.seq_len} exceeds the model's context length {config.block_size}")
    data = TokenData(data_dir, args.seq_len, config.vocab_size, meta)
    model.to(device)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    step, best_val = 0, float("inf")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        step, best_val = state["step"], state["best_val_loss"]
        log(f"resumed from {out_dir / 'last'} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = raw_model.num_params()
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    flops_per_token = raw_model.flops_per_token(args.seq_len)
    peak = peak_flops(device)
    log(f"model {args.model}: {n_params / 1e6:.2f}M parameters | device {device} {dtype} | world {world} | "
        f"{tokens_per_step:,} tokens/step | data {data_dir} ({data.meta['train_tokens']:,} train tokens)")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "a") if master else None

    def evaluate():
        model.eval()
        losses = {}
        for split in ("train", "val"):
            total = torch.zeros(2, device=device)   # (sum of batch losses, number of batches)
            for i in range(args.eval_iters):
                x, y = data.batch(split, step_seed(args.seed + 1, -i), args.batch_size, rank, world)
                if (y == -100).all():   # instruction data: a window without any reply has no loss
                    continue
                with torch.no_grad(), autocast:
                    _, loss = model(x.to(device), y.to(device))
                total += torch.stack([loss.float(), torch.ones((), device=device)])
            if ddp:
                dist.all_reduce(total)
            losses[split] = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        model.train()
        return losses

    def checkpoint(links):
        if master:
            save_checkpoint(out_dir, raw_model, optimizer, scaler, step, best_val, args, data_dir, links)
        if ddp:
            dist.barrier()

    def record(entry):
        if master:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

    model.train()
    t_log, tokens_since = time.perf_counter(), 0
    try:
        while step < args.max_steps:
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x, y = data.batch("train", step_seed(args.seed, step), args.batch_size,
                                  part=micro * world + rank, parts=args.grad_accum * world)
                no_targets = data.masks and bool((y == -100).all())
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # DDP: all-reduce the gradients only on the last micro-step
                sync = nullcontext() if (not ddp or micro == args.grad_accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        logits, loss = model(x, y)
                    if no_targets:   # a window of instruction data without any reply: no loss, zero gradients
                        loss = logits.sum() * 0.0
                    scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss.detach().float()
            if ddp:
                dist.all_reduce(loss_sum)
            step_loss = loss_sum.item() / (args.grad_accum * world)
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss is {step_loss} at step {step + 1}: stopped; the last good checkpoint "
                                    f"is {out_dir / 'last'}" + ("" if (out_dir / "last").exists() else " (none yet)"))
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_since += tokens_per_step

            if step % args.log_interval == 0 or step == args.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t_log
                tok_s = tokens_since / dt
                mfu = flops_per_token * tok_s / (peak * world) if peak else None
                log(f"step {step:5d} | loss {step_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                    + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""))
                record({"step": step, "loss": step_loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu,
                        "time": time.time()})
                t_log, tokens_since = time.perf_counter(), 0
            if step % args.eval_interval == 0 or step == args.max_steps:
                losses = evaluate()
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                log(f"step {step:5d} | eval: train {losses['train']:.4f} val {losses['val']:.4f}"
                    + (" (best)" if improved else ""))
                record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "time": time.time()})
                checkpoint(["last", "best"] if improved else ["last"])
                t_log, tokens_since = time.perf_counter(), 0
    except KeyboardInterrupt:
        log(f"\ninterrupted at step {step}: saving {out_dir / 'last'} ...")
        if step > 0:
            checkpoint(["last"])
        log("saved; continue with --resume")
        _shutdown(ddp, metrics)
        return raw_model, 130
    _shutdown(ddp, metrics)
    if master and args.sample_tokens > 0:
        show_sample(raw_model, data, data_dir, args.sample_tokens, device)
    return raw_model, 0


def _set_dropout(model, p):
    model.config.dropout = p
    for m in model.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def _shutdown(ddp, metrics):
    if metrics:
        metrics.close()
    if ddp:
        dist.destroy_process_group()


def show_sample(model, data, data_dir, n_tokens, device):
    """Print a sample continuing a few tokens of validation text, so a learner sees what the model learned."""
    import bpe
    import sample
    tok = bpe.load(Path(data_dir) / "tokenizer")
    val = np.memmap(data.paths["val"], dtype=data.meta["dtype"], mode="r")
    prompt = torch.from_numpy(val[:16].astype(np.int64))[None].to(device)
    n_tokens = min(n_tokens, model.config.block_size - prompt.size(1))
    print("\n--- sample (prompt: first 16 validation tokens) ---")
    print(tok.decode(prompt[0].tolist()), end="", flush=True)
    decoder = tok.decoder()
    gen = torch.Generator(device=device).manual_seed(0)
    # no stop at end-of-text: the sample runs on into the next "document", which shows more of what was learned
    for t in sample.generate(model, prompt, n_tokens, temperature=0.8, top_k=50, generator=gen):
        print(decoder.step(int(t[0])), end="", flush=True)
    print(decoder.flush() + "\n---")


def main(argv=None):
    args, module = parse_args(argv)
    try:
        _, code = train(args, module)
    except (TrainingError, hub.HubError, ValueError) as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(f"error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    main()
