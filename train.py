"""One training loop for every model file: CPU, one GPU, or many through torchrun (DDP, or FSDP2 with --fsdp).

    python train.py --model gpt2                        # small model, default dataset, a few minutes on a CPU
    python train.py --model gpt2 --init_from gpt2 --data data/shakespeare --lr 3e-5   # fine-tune official weights
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --init_from scratch \\
        --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --data data/fineweb ...
    torchrun --standalone --nproc_per_node=8 train.py --model llama3 --init_from llama3-8b --fsdp --grad_checkpoint

Every --flag has a default (see --help). Architecture flags come from the model file's Config dataclass.
--config file.json gives overrides too (flags on the command line win).

Checkpoints go to <out_dir>/ckpt-<step>/ in the model's official Hugging Face layout plus train_state.pt, and
the symlinks <out_dir>/last and <out_dir>/best point at the newest and the lowest-val-loss ones. A symlink is
swapped in one atomic rename, so a crash mid-write leaves the previous checkpoint in place. Under --fsdp the
resumable state (sharded weights and optimizer) is a torch.distributed.checkpoint directory, ckpt-<step>/dcp/,
beside the weights gathered into the same official layout.
"""
import argparse
import copy
import dataclasses
import errno
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import threading
import time
import types
import typing
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import fcntl   # POSIX: the out_dir lock; Windows runs without it
except ImportError:
    fcntl = None

import bpe
import checkpoint_io
import classifier
import dpo
import errors
import lora
import sample
from errors import BadInput, os_error_line

# Peak dense bf16 tensor-core FLOP/s, for MFU (vendor datasheets; fp32 runs are quoted against these too).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


# Flags that may change between a run and its --resume: how long it goes on, how often it logs, evaluates and
# saves, and where it runs. Everything else (optimization, data order, architecture) must match the checkpoint's
# run, or the resumed run would not be the run it continues; batch_size and grad_accum may trade places as long
# as the global batch (batch_size x grad_accum x processes) stays the same, and --data may move if its tokenizer
# does not change.
# Config fields where 0 is meaningful: no experts (a dense model), no auxiliary loss, layer indices
FROM_ZERO = {"n_experts", "router_aux_loss_coef", "mlp_only_layers", "n_shared_experts", "first_k_dense_replace",
             "bias_update_rate", "mtp_loss_weight", "q_lora_rank"}
RESUMABLE = {"max_steps", "eval_interval", "eval_iters", "log_interval", "sample_tokens", "threads", "device",
             "dtype", "compile", "resume", "config", "out_dir", "data", "batch_size", "grad_accum", "grad_checkpoint"}
# Each file's init scales the projections into the residual stream by 1 / sqrt(2 n_layer) (GPT-2); init_weights too
RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight", "experts.down_proj")


# -----------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    pre = errors.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    overrides = read_config(known.config) if known.config else {}
    model = known.model or overrides.get("model", "gpt2")
    if model not in sample.MODELS:
        raise BadInput(f"--model {model!r} is not one of {', '.join(sample.MODELS)}")
    module = importlib.import_module(model)

    p = errors.ArgumentParser(description="Train any model file of this repo.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", help=f"model file: {' | '.join(sample.MODELS)}")
    p.add_argument("--config", default=None, help="JSON file of overrides for any flag below")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default="data/stdlib", help="directory with train.bin, val.bin, meta.json "
                   "(the default dataset is prepared automatically when missing)")
    g.add_argument("--out_dir", default=None, help="checkpoints and metrics (default: out/<model>)")
    g.add_argument("--init_from", default="scratch", help="scratch | a preset | a hub id | a checkpoint dir")
    g.add_argument("--resume", action="store_true", help="continue from <out_dir>/last exactly (only "
                   f"{', '.join(sorted(RESUMABLE - {'resume', 'config'}))} may differ from its run)")
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
    g = p.add_argument_group("fine-tuning (with --init_from)")
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA: train rank-r adapters only (0: every weight)")
    g.add_argument("--lora_alpha", type=_literal, default=None, help="LoRA's scale is alpha / rank (default: rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora_targets", default="attention", help="attention | mlp | all | module names (q_proj, "
                   "attn.c_proj, ...), comma-separated")
    g.add_argument("--dpo_beta", type=float, default=0.1, help="DPO's beta, for preference data (prepare_data "
                   "--dpo_jsonl): how far the policy may move from the reference")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad_checkpoint", action="store_true", help="activation checkpointing: recompute each "
                   "block's activations in the backward instead of keeping them (less memory, ~1/3 more compute)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                   "state over the processes (FSDP2) instead of replicating them (DDP)")
    g.add_argument("--seed", type=int, default=1337, help="seeds the init, dropout and the batches")
    g.add_argument("--eval_interval", type=int, default=200, help="evaluate and checkpoint every N steps")
    g.add_argument("--eval_iters", type=int, default=20, help="batches per evaluation")
    g.add_argument("--log_interval", type=int, default=20, help="log every N steps")
    g.add_argument("--sample_tokens", type=int, default=200, help="tokens sampled at the end (0: none)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    cfg_fields = [f for f in dataclasses.fields(module.Config) if f.name != "vocab_size"]
    g = p.add_argument_group(f"{model}.Config (architecture when training from scratch)")
    for f in cfg_fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        g.add_argument(f"--{f.name}", type=_literal, default=argparse.SUPPRESS, help=f"(default: {default!r})")
    unknown = set(overrides) - {a.dest for a in p._actions}
    if unknown:
        raise BadInput(f"--config {known.config}: unknown keys {sorted(unknown)}")
    p.set_defaults(**overrides)
    args = p.parse_args(argv)
    args.model = model
    args.model_overrides = {f.name: getattr(args, f.name) for f in cfg_fields if hasattr(args, f.name)}
    args.out_dir = args.out_dir or f"out/{args.model}"
    validate(args, module)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    return args, module


def read_config(path):
    try:
        overrides = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = os_error_line(e) if isinstance(e, OSError) else f"not valid JSON ({e})"
        raise BadInput(f"--config {path}: {reason}") from None
    if not isinstance(overrides, dict):
        raise BadInput(f"--config {path}: expected a JSON object of flag names and values")
    return overrides


def _literal(s):
    """A flag value as int, float, bool, None, a JSON list or str: '4' -> 4, '1e-3' -> 0.001, 'none' -> None,
    '[0, 3]' -> [0, 3]."""
    if s.lstrip().startswith("["):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a JSON list") from None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"none": None, "null": None, "true": True, "false": False}.get(s.lower(), s)


def validate(args, module):
    """Every flag checked in one place, before any work: BadInput names the flag and what it expects.
    (Values from --config bypass argparse's types, so types are checked here too.)"""
    for name, low in (("batch_size", 1), ("seq_len", 1), ("grad_accum", 1), ("max_steps", 1), ("eval_interval", 1),
                      ("eval_iters", 1), ("log_interval", 1), ("warmup_steps", 0), ("sample_tokens", 0),
                      ("threads", 0), ("seed", 0)):
        value = getattr(args, name)
        if not _is_int(value) or value < low:
            raise BadInput(f"--{name} {value!r}: expected an integer >= {low}")
    for name, low, high in (("lr", 0, math.inf), ("min_lr", 0, math.inf), ("weight_decay", 0, math.inf),
                            ("grad_clip", 0, math.inf), ("beta1", 0, 1), ("beta2", 0, 1)):
        value = getattr(args, name)
        if name == "min_lr" and value is None:
            continue
        if not _is_number(value) or not low <= value < high or (name == "lr" and value == 0):
            bounds = "a number > 0" if name == "lr" else f"a number in [{low}, {high})" if high < math.inf else \
                f"a number >= {low}"
            raise BadInput(f"--{name} {value!r}: expected {bounds}")
    if args.min_lr is not None and args.min_lr > args.lr:
        raise BadInput(f"--min_lr {args.min_lr} is above --lr {args.lr}: the cosine decays from lr down to min_lr")
    if not _is_int(args.lora_rank) or args.lora_rank < 0:
        raise BadInput(f"--lora_rank {args.lora_rank!r}: expected an integer >= 0 (0: no LoRA)")
    if args.lora_rank and args.init_from == "scratch":
        raise BadInput(f"--lora_rank {args.lora_rank}: LoRA adapts pretrained weights; give --init_from (a preset, "
                       f"hub id or checkpoint)")
    if args.lora_alpha is not None and not (_is_number(args.lora_alpha) and args.lora_alpha > 0):
        raise BadInput(f"--lora_alpha {args.lora_alpha!r}: expected a number > 0 (default: the rank)")
    if not (_is_number(args.lora_dropout) and 0 <= args.lora_dropout < 1):
        raise BadInput(f"--lora_dropout {args.lora_dropout!r}: expected a probability in [0, 1)")
    if not (_is_number(args.dpo_beta) and args.dpo_beta > 0):
        raise BadInput(f"--dpo_beta {args.dpo_beta!r}: expected a number > 0")
    for name in ("compile", "resume", "grad_checkpoint", "fsdp"):
        if not isinstance(getattr(args, name), bool):
            raise BadInput(f"--config: {name} {getattr(args, name)!r}: expected true or false")
    if args.fsdp and args.lora_rank:
        raise BadInput(f"--fsdp with --lora_rank {args.lora_rank}: not supported (adapters are small: train them "
                       f"under DDP, without --fsdp)")
    if args.fsdp and args.dtype == "float16":
        raise BadInput("--fsdp with --dtype float16: not supported (its loss scaling needs the unsharded "
                       "gradients); use --dtype bfloat16")
    for name in ("data", "out_dir", "init_from", "device", "dtype", "lora_targets"):
        if not isinstance(getattr(args, name), str) or not getattr(args, name):
            raise BadInput(f"--{name} {getattr(args, name)!r}: expected a non-empty string")
    hints = typing.get_type_hints(module.Config)
    for name, value in args.model_overrides.items():
        if not _fits(value, hints[name]):
            raise BadInput(f"--{name} {value!r}: expected {_type_name(hints[name])}")
        for v in value if isinstance(value, list) else [value]:
            if not _is_number(v):   # None, or a bool of a bool field: its type was checked above
                continue
            if name == "dropout":
                ok, expected = 0 <= v < 1, "a probability in [0, 1)"
            elif name.endswith("_id"):
                ok, expected = v >= 0, "a token id >= 0"
            elif name in FROM_ZERO:
                ok, expected = v >= 0, "a number >= 0"
            else:   # sizes, epsilons, rope factors: all strictly positive
                ok, expected = v > 0, "a number > 0"
            if not ok:
                raise BadInput(f"--{name} {v!r}: expected {expected}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fits(value, hint):
    """Does a flag value match a Config annotation (int, float, int | None, int | list[int] | None, ...)?"""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return _is_number(value)
    if hint is int:
        return _is_int(value)
    return isinstance(value, hint)


def _type_name(hint):
    """int | list[int] | None -> 'int or list[int] or None'."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    names = [h.__name__ if isinstance(h, type) else str(h) for h in (typing.get_args(hint) if union else (hint,))]
    return " or ".join(names).replace("NoneType", "None")


# What prepare_data.py writes besides token shards: labelled texts, and (prompt, chosen, rejected) pairs for DPO
TASKS = {"classification": classifier.ClassData, "preference": dpo.PreferenceData}
TASK_FIGURES = {"classification": ("accuracy",), "preference": ("reward_margin", "reward_accuracy", "chosen_reward",
                                                                 "rejected_reward")}   # logged beside the loss


# -----------------------------------------------------------------------------------------------------------
# Data: memory-mapped token shards. A step's global batch is a pure function of (seed, step), so a resumed run
# sees exactly the batches it would have seen; each (micro-step, rank) takes its own slice of that global batch,
# so 8 GPUs x batch 4, 1 GPU x batch 32, or batch 8 x 4 accumulation steps all train on the same sequences.


def read_meta(directory):
    """data/<name>/meta.json, checked: BadInput naming the file and key when it is not what prepare_data writes."""
    path = Path(directory) / "meta.json"
    if not Path(directory).is_dir():
        found = "is a file" if Path(directory).exists() else "no such directory"
        raise BadInput(f"--data {directory}: {found}; expected a directory of train.bin, val.bin and meta.json "
                       f"(prepare_data.py writes one)")
    if not path.is_file():
        raise BadInput(f"--data {directory}: no meta.json (run prepare_data.py first)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e}); run prepare_data.py again") from None
    if not isinstance(meta, dict):
        raise BadInput(f"{path}: expected a JSON object")
    if meta.get("task") not in (None, *TASKS):
        raise BadInput(f"{path}: task {meta['task']!r}: expected one of {', '.join(TASKS)} (or none: token shards)")
    for key, ok, expected in (
            ("vocab_size", lambda v: _is_int(v) and v > 0, "a positive integer"),
            ("dtype", lambda v: v in ("uint16", "uint32"), "'uint16' or 'uint32'"),
            ("train_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            ("val_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            ("eot_id", lambda v: v is None or _is_int(v) and 0 <= v < meta["vocab_size"], "a token id or null"),
            ("loss_mask", lambda v: isinstance(v, bool), "true or false"),
            ("token_bytes", lambda v: isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v,
             "the name of a file beside meta.json")):
        if meta.get("task") and key != "vocab_size":
            continue   # a task's data class checks its own files and keys
        if key not in meta and key in ("eot_id", "loss_mask", "token_bytes"):   # older datasets lack them
            continue
        if key not in meta:
            raise BadInput(f"{path}: lacks key {key!r} ({expected})")
        if not ok(meta[key]):
            raise BadInput(f"{path}: {key} is {meta[key]!r}, expected {expected}")
    if not meta.get("task") and meta["dtype"] == "uint16" and meta["vocab_size"] > 2**16:
        raise BadInput(f"{path}: dtype uint16 cannot hold the ids of a {meta['vocab_size']}-token vocabulary")
    return meta


def read_token_bytes(directory, meta):
    """Each token id's length in UTF-8 bytes (0: special), which val_bpb divides by: the file meta.json names,
    checked, else counted once from the tokenizer of a dataset prepared before prepare_data wrote it; None when
    neither is there (val_bpb is left out, never an error)."""
    directory = Path(directory)
    if "token_bytes" not in meta:
        try:
            import prepare_data
            counts = prepare_data.token_byte_counts(bpe.load(directory / "tokenizer"))
        except (BadInput, OSError):
            return None
        return counts if len(counts) == meta["vocab_size"] else None   # else not the tokenizer of these ids
    where = f"{directory / 'meta.json'}: token_bytes {meta['token_bytes']!r}"
    try:
        counts = np.load(directory / meta["token_bytes"], allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = os_error_line(e) if isinstance(e, OSError) else f"not a .npy array ({e})"
        raise BadInput(f"{where}: {reason}; run prepare_data.py again") from None
    if not isinstance(counts, np.ndarray):
        problem = "an .npz archive, expected one array"
    elif counts.shape != (meta["vocab_size"],):
        problem = f"shape {counts.shape}, expected ({meta['vocab_size']},): one count per token id"
    elif not np.issubdtype(counts.dtype, np.integer):
        problem = f"dtype {counts.dtype}, expected integer byte counts"
    elif (counts < 0).any():
        problem = f"a negative byte count (token id {int(np.argmax(counts < 0))})"
    else:
        return counts
    raise BadInput(f"{where}: {problem}; run prepare_data.py again")


class TokenData:
    def __init__(self, directory, seq_len, vocab_size, meta=None):
        directory = Path(directory)
        self.meta = meta or read_meta(directory)
        if self.meta["vocab_size"] > vocab_size:
            raise BadInput(f"--data {directory}: tokenizer vocabulary {self.meta['vocab_size']} exceeds the "
                                f"model's vocab_size {vocab_size}")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.paths = {split: directory / f"{split}.bin" for split in ("train", "val")}
        # instruction data: a uint8 mask beside the tokens, 1 where the token is a target (an assistant reply)
        self.masks = {split: directory / f"{split}.mask.bin" for split in self.paths} if self.meta.get("loss_mask") else {}
        itemsize = np.dtype(self.meta["dtype"]).itemsize
        for split, path in self.paths.items():
            if not path.is_file():
                raise BadInput(f"--data {directory}: no {path.name} (run prepare_data.py again)")
            size = path.stat().st_size
            n, expected = size // itemsize, self.meta[f"{split}_tokens"]
            if size % itemsize or n != expected:
                raise BadInput(f"--data {path}: {size:,} bytes, but meta.json says {expected:,} {self.meta['dtype']} "
                               f"tokens ({expected * itemsize:,} bytes): a shard of another run? prepare it again")
            if n <= seq_len + 1:
                raise BadInput(f"--data {path}: {n} tokens, fewer than --seq_len + 2 = {seq_len + 2}")
            if self.masks and (not self.masks[split].is_file() or self.masks[split].stat().st_size != n):
                raise BadInput(f"--data {self.masks[split]}: missing or not one byte per token of {path.name}")

    def batch(self, split, seed, batch_size, part=0, parts=1):
        """Slice `part` of `parts` of the global batch drawn with `seed`: (B, T) inputs and targets."""
        # a fresh memmap per batch avoids the slow growth of memory that a long-lived one shows (nanoGPT)
        data = np.memmap(self.paths[split], dtype=self.meta["dtype"], mode="r")
        g = torch.Generator().manual_seed(seed)
        ix = torch.randint(len(data) - self.seq_len - 1, (batch_size * parts,), generator=g)
        ix = ix[part * batch_size:(part + 1) * batch_size]
        chunk = torch.stack([torch.from_numpy(data[i:i + self.seq_len + 1].astype(np.int64)) for i in ix.tolist()])
        if chunk.max() >= self.vocab_size:
            raise BadInput(f"--data {self.paths[split]}: token id {int(chunk.max())} is beyond the model's "
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


def blocks(model):
    """The transformer blocks, in order: gpt2's h, the others' model.layers (DeepSeek's MTP layer last)."""
    return model.h if hasattr(model, "h") else model.model["layers"]


def checkpoint_blocks(model):
    """Activation checkpointing (Chen et al. 2016): each block keeps only its input in the forward and recomputes
    the rest in the backward (with the same dropout masks: checkpoint restores the RNG state). The block's forward
    is wrapped on the instance, not in a wrapper module, so no state_dict key changes and the checkpoints stay in
    the official layout; without gradients (eval, sampling with a KV cache) the block runs as it is."""
    for block in blocks(model):
        def forward(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        block.forward = forward


@torch.no_grad()
def materialize(model, module, device, init=True):
    """Give a model built on the meta device (plain or sharded by fully_shard) storage on `device`, and with init
    the values its file's __init__ draws: nn.LayerNorm's reset, the file's _init_weights on Linear and Embedding,
    N(0, 0.02) for the other matrices (experts, routers), 1 for the other vectors (RMSNorm gains), the residual
    projections scaled, RoPE's frequencies recomputed and the other buffers (DeepSeek's expert bias) zero. Under
    FSDP each rank allocates and draws only its own shards: a 7B model never exists whole on one device."""
    tied = {}   # the names of each Parameter: to_empty gives a head tied to the embedding storage of its own
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    model.to_empty(device=device)
    for first, *others in tied.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            if model.get_parameter(name) is not model.get_parameter(first):
                setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    if init:
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)):
                m.reset_parameters()   # LayerNorm: 1 and 0; Linear, Embedding: torch's default, redrawn below
                continue
            for p in m.parameters(recurse=False):
                p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
        model.apply(model._init_weights)
        for name, p in model.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                p.normal_(0.0, 0.02 / math.sqrt(2 * model.config.n_layer))
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq"):
            freqs = module.rope_frequencies(model.config)
            buffer.copy_(freqs[0] if isinstance(freqs, tuple) else freqs)   # qwen, deepseek: (inv_freq, factor)
        else:
            buffer.zero_()


def gathered(model, module):
    """Every rank: all-gather an FSDP model's weights; rank 0 gets them in a plain model on the CPU, which writes
    the official layout (save_pretrained), one tensor at a time on the GPUs. The other ranks get None."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = module.Model(copy.copy(model.config))
    plain.load_state_dict(full, assign=True)
    return plain


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
# The output directory (one run at a time) and its checkpoints


def open_out_dir(out_dir, resume):
    """Create out_dir and lock it for this process (the lock goes with the process, even on kill -9), clear the
    temp files of writers that died, and check that it holds a run to resume, or none to overwrite.
    Returns the open lock file: keep it until the run ends."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out_dir {out_dir}: is a file; expected a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(out_dir))
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise BadInput(f"--out_dir {out_dir}: cannot write there ({e.strerror})") from None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise BadInput(f"--out_dir {out_dir}: in use by {holder}; wait for it to end or stop it, or use "
                           f"another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"train.py (process {os.getpid()} on {socket.gethostname()})\n")
    lock.flush()
    # with the lock held, every temp file here is a dead writer's: a kill -9 or a full disk mid-save
    for p in out_dir.glob(".*"):
        if p.name.startswith((".tmp-ckpt-", ".stale-ckpt-")) or p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    last = out_dir / "last"
    if resume != last.is_symlink():
        lock.close()
        raise BadInput(f"--resume: {out_dir} has no checkpoint `last` to resume" if resume else
                       f"--out_dir {out_dir} holds a run (last -> {os.readlink(last)}): continue it with --resume, "
                       f"or train into another --out_dir")
    return lock


def trim_metrics(path, step):
    """Keep the metrics rows up to `step`: after a crash, the resumed run writes the steps past its checkpoint
    again, and each step must appear once. A row cut short by the crash is dropped too."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and _is_number(row.get("step")) and row["step"] <= step:
            rows.append(line + "\n")
    checkpoint_io.atomic_write(path, "".join(rows))


def save_checkpoint(out_dir, model, optimizer, scaler, step, best_val, args, data_dir, link_names, extra=None,
                    save_model=None, sharded=None):
    """Write ckpt-<step>/ (official layout + train_state.pt) into a temp dir, rename it, swap the symlinks.
    save_model(directory) writes the weights (default: model.save_pretrained). Under FSDP every rank calls it with
    sharded, the state dict of its shards ({"model", "optim"}): rank 0 writes the rest, and each rank its part of
    the DCP checkpoint <temp dir>/dcp, before rank 0 renames the whole directory into place."""
    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step:07d}"
    last = out_dir / "last"
    master = sharded is None or dist.get_rank() == 0
    tmp = None
    if master and not (last.is_symlink() and os.readlink(last) == final.name):   # else saved already (Ctrl-C)
        tmp = out_dir / f".tmp-ckpt-{step:07d}-{os.getpid()}"
    if sharded is not None:   # rank 0's temp dir (its pid), or None, for every rank
        names = [tmp]
        dist.broadcast_object_list(names, src=0)
        tmp = names[0]
    if tmp is not None:
        try:
            if master:
                (save_model or model.save_pretrained)(tmp)
                tok_dir = Path(data_dir) / "tokenizer"
                if tok_dir.is_dir():
                    for f in tok_dir.iterdir():
                        shutil.copyfile(f, tmp / f.name)
                flags = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
                # under FSDP the optimizer state is in dcp/; the RNG state is rank 0's, which every rank shares
                # (seeded alike, they draw the same shapes of dropout masks)
                state = {"step": step, "optimizer": None if sharded else optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(next(model.parameters()).device),
                         "best_val_loss": best_val, **(extra or {}), "args": flags}
                buffer = io.BytesIO()
                torch.save(state, buffer)
                checkpoint_io.atomic_write(tmp / "train_state.pt", buffer.getvalue())
            if sharded is not None:
                dist.barrier()   # the directory exists before the others write into it
                dcp.save(sharded, checkpoint_id=tmp / "dcp")
        except OSError as e:   # a full disk, a quota: drop the partial copy, keep the last good checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the last good checkpoint {last} -> {os.readlink(last)} is kept" if last.is_symlink() else \
                "no checkpoint was saved before"
            raise BadInput(f"saving {final}: {os_error_line(e)}; {kept}") from None
        if master:
            stale = out_dir / f".stale-{final.name}-{os.getpid()}"
            if final.exists():   # a stale one of this step from an earlier run: move it aside, never delete first
                os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
    if not master:
        return
    for name in link_names:
        link_tmp = out_dir / f".{name}.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        link_tmp.symlink_to(final.name)
        os.replace(link_tmp, out_dir / name)
    checkpoint_io.fsync_dir(out_dir)
    # keep the checkpoints a link points at, and the one before `last`: a fallback should `last` be damaged
    keep = {os.readlink(out_dir / n) for n in ("last", "best") if (out_dir / n).is_symlink()}
    keep.update(sorted(d.name for d in out_dir.glob("ckpt-*") if d.name < os.readlink(last))[-1:])
    for d in out_dir.glob("ckpt-*"):
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def load_run(module, ckpt_dir, task):
    """A run's checkpoint as it trains: a LoRA run's base with its adapter (unmerged), a classifier with its head."""
    if (ckpt_dir / lora.CONFIG).is_file():
        base = checkpoint_io.read_json(ckpt_dir / lora.CONFIG).get("base_model_name_or_path")
        return lora.load_unmerged(module.Model.from_pretrained(base), ckpt_dir)
    if task == "classification":
        return classifier.from_pretrained(module, ckpt_dir)
    return module.Model.from_pretrained(str(ckpt_dir))


def load_train_state(ckpt_dir):
    """train_state.pt of a checkpoint; a damaged one is BadInput that names the checkpoint to fall back on."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "train_state.pt"
    if not path.is_file():
        raise BadInput(f"--resume: {path} not found (nothing to resume in {ckpt_dir.parent})")
    try:
        with warnings.catch_warnings():   # torch warns about what it finds in a damaged file, before failing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and {"step", "optimizer", "scaler", "rng", "best_val_loss"} <= set(state)
    except (RuntimeError, EOFError, ValueError, TypeError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile):
        ok = False   # torch's own message advises weights_only=False: never for a damaged file
    if not ok:
        target = ckpt_dir.resolve().name
        others = sorted(d.name for d in ckpt_dir.parent.glob("ckpt-*") if d.name != target
                        and (d / "train_state.pt").is_file())
        fallback = (f"the previous checkpoint is {ckpt_dir.parent / others[-1]}: resume from it with "
                    f"`ln -sfn {others[-1]} {ckpt_dir}`" if others else f"no other checkpoint in {ckpt_dir.parent}")
        raise BadInput(f"--resume: {path} is damaged (not a train_state.pt that train.py wrote); {fallback}")
    return state


def tokenizer_identity(data_dir, meta):
    """What makes a token id mean the same text: the tokenizer files' hash, else meta.json's description."""
    h = hashlib.sha256(json.dumps([meta.get("tokenizer"), meta["vocab_size"], meta.get("eot_id")]).encode())
    tok_dir = Path(data_dir) / "tokenizer"
    for f in sorted(tok_dir.iterdir()) if tok_dir.is_dir() else ():
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{meta.get('tokenizer', 'tokenizer')} with {meta['vocab_size']} tokens (sha256 {h.hexdigest()[:12]})"


def check_resume(state, args, config, identity, global_batch, out_dir):
    """Refuse a --resume whose flags or data differ from the checkpoint's run, naming every field that does."""
    saved = state.get("args", {})
    differ = [f"--{k} {v!r} (its run: {saved[k]!r})" for k, v in sorted(vars(args).items())
              if k in saved and k not in RESUMABLE and k not in args.model_overrides and saved[k] != v]
    differ += [f"--{k} {v!r} (the checkpoint: {getattr(config, k)!r})" for k, v in sorted(args.model_overrides.items())
               if getattr(config, k) != v]
    if "global_batch" in state and state["global_batch"] != global_batch:
        differ.append(f"batch_size x grad_accum x processes = {global_batch} (its run: {state['global_batch']})")
    if "tokenizer" in state and state["tokenizer"] != identity:
        differ.append(f"--data {args.data}: {identity} (its run: {state['tokenizer']})")
    if differ:
        raise BadInput(f"--resume: differs from the run in {out_dir}: {'; '.join(differ)}. Only "
                       f"{', '.join(sorted(RESUMABLE - {'resume', 'config', 'batch_size', 'grad_accum'}))} may change")


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill) only set a flag; the loop acts on it at
    the next step boundary, so a checkpoint never holds weights that a step changed without counting it.
    A second signal stops at once (KeyboardInterrupt); the last checkpoint on disk is whole either way."""

    def __init__(self):
        self.signal, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:   # ignored by the parent (nohup): stays ignored
                    self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------------------------------------
# The loop


def train(args, module):
    """Train; returns (model, exit status). Rank 0 holds the out_dir's lock from before any work to the end."""
    master = int(os.environ.get("RANK", "0")) == 0
    lock = open_out_dir(Path(args.out_dir), args.resume) if master else None
    try:
        return _train(args, module, master)
    finally:
        if lock:
            lock.close()


def _train(args, module, master):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    device = sample.pick_device(args.device)
    out_dir = Path(args.out_dir)
    if ddp:
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.fsdp and not ddp:
        raise BadInput("--fsdp: shards the model over the processes of torchrun (torchrun --nproc_per_node=N "
                       "train.py ... --fsdp); one process trains without it")
    log = print if master else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = sample.pick_dtype(args.dtype, device)
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
    task = meta.get("task")   # None: language modeling on token shards
    if task == "preference" and args.init_from == "scratch":
        raise BadInput(f"--data {data_dir}: preference pairs (DPO) tune a pretrained model against itself: give "
                       f"--init_from (the reference is the starting weights)")
    if task is not None and args.fsdp:
        raise BadInput(f"--fsdp with {task} data {data_dir}: not supported (FSDP trains language models on token "
                       f"shards); train without --fsdp")
    if task == "classification" and args.lora_rank:
        raise BadInput(f"--lora_rank {args.lora_rank} with classification data {data_dir}: not supported (the new "
                       f"head would need PEFT's modules_to_save); fine-tune the classifier fully")
    identity = tokenizer_identity(data_dir, meta)
    token_bytes = read_token_bytes(data_dir, meta) if task is None else None
    global_batch = args.batch_size * args.grad_accum * world

    # the model: resumed, fine-tuned from weights, or new. Under FSDP it is built on the meta device (no storage),
    # sharded, and only then given each rank's shards: of the weights drawn, read from dcp/, or sent by rank 0.
    state = pretrained = None
    if args.resume:
        last = out_dir / "last"
        state = load_train_state(last)
        if args.fsdp:
            with torch.device("meta"):
                model = module.Model(checkpoint_io.read_config(last / "config.json", module.Config.from_hf))
        else:
            model = load_run(module, last.resolve(), task)
        check_resume(state, args, model.config, identity, global_batch, out_dir)
        if state["step"] >= args.max_steps:   # a finished run requeued by a scheduler: nothing to do
            log(f"{last} is at step {state['step']} of --max_steps {args.max_steps}: nothing to train "
                f"(raise --max_steps to go on)")
            return model, 0
    elif args.init_from != "scratch" and args.fsdp:
        # rank 0 alone reads the weights, into CPU memory; set_model_state_dict sends each rank its shards below
        pretrained = module.Model.from_pretrained(args.init_from) if master else None
        configs = [pretrained.config if master else None]
        dist.broadcast_object_list(configs, src=0)
        with torch.device("meta"):
            model = module.Model(configs[0])
        reshaping = set(args.model_overrides) - {"dropout"}
        if reshaping:
            raise BadInput(f"--init_from {args.init_from}: cannot change {sorted(reshaping)} of pretrained "
                           f"weights (only --dropout)")
        if "dropout" in args.model_overrides:
            _set_dropout(model, args.model_overrides["dropout"])
    elif args.init_from != "scratch":
        # under DDP rank 0 downloads first, then the others read its cache (never two writers on one file)
        if ddp and not master:
            dist.barrier()
        model = module.Model.from_pretrained(args.init_from)
        if ddp and master:
            dist.barrier()
        reshaping = set(args.model_overrides) - {"dropout"}
        if reshaping:
            raise BadInput(f"--init_from {args.init_from}: cannot change {sorted(reshaping)} of pretrained "
                                f"weights (only --dropout)")
        if "dropout" in args.model_overrides:
            _set_dropout(model, args.model_overrides["dropout"])
    else:
        fields = {"vocab_size": meta["vocab_size"]}
        if meta.get("eot_id") is not None and "eos_token_id" in {f.name for f in dataclasses.fields(module.Config)}:
            fields["eos_token_id"] = meta["eot_id"]
        try:
            config = module.Config(**{**fields, **args.model_overrides})
        except ValueError as e:   # Config's own checks of how the sizes fit together (n_embd % n_head, ...)
            raise BadInput(f"{args.model}.Config: {e}") from None
        # on a GPU or under FSDP: built without storage, then drawn in place on the device (materialize), so a 7B
        # model is never first allocated on the CPU; on the CPU as it always was (the same weights for a seed)
        with torch.device("meta") if (args.fsdp or device.type != "cpu") and task is None else nullcontext():
            model = module.Model(config)
    config = model.config
    data = TASKS[task](data_dir, meta, config.vocab_size) if task else None
    seq_len = data.seq_len if task else args.seq_len   # a task's: its widest example
    if seq_len > config.block_size:
        raise BadInput(f"--seq_len {seq_len} exceeds the model's context length {config.block_size}" if task is None
                       else f"--data {data_dir}: examples of up to {seq_len} tokens exceed the model's context length "
                       f"{config.block_size} (prepare_data --max_len)")
    for name in ("bos_token_id", "eos_token_id"):
        ids = getattr(config, name, None)
        for i in ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]:
            if not 0 <= i < config.vocab_size:
                raise BadInput(f"--{name} {i}: outside the vocabulary of {config.vocab_size} tokens")
    data = data or TokenData(data_dir, seq_len, config.vocab_size, meta)
    base_name = None   # a LoRA run's base, as its adapter_config.json names it for PEFT
    if not args.resume:
        if task == "classification":
            classifier.attach_head(model, len(data.labels))
        if args.lora_rank:
            lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
            base_name = (str(Path(args.init_from).resolve()) if Path(args.init_from).is_dir()
                         else getattr(module, "HUB_IDS", {}).get(args.init_from, args.init_from))
    elif hasattr(model, "lora_config"):
        base_name = checkpoint_io.read_json(out_dir / "last" / lora.CONFIG)["base_model_name_or_path"]
    # DPO's reference, the starting weights: a frozen copy, or with LoRA the base itself with the adapters off
    frozen = None
    if task == "preference" and not args.lora_rank:
        frozen = module.Model.from_pretrained(args.init_from).to(device).eval().requires_grad_(False)

    def reference(ids):
        if frozen is not None:
            return frozen(ids)[0]
        with lora.disabled(raw_model), torch.no_grad():
            raw_model.eval()   # no dropout, as the frozen copy
            try:
                return raw_model(ids)[0]
            finally:
                raw_model.train()
    if token_bytes is not None:   # ids of the model past the tokenizer's are no text: 0 bytes
        token_bytes = torch.from_numpy(np.pad(token_bytes.astype(np.int64), (0, config.vocab_size - len(token_bytes))))
        token_bytes = token_bytes.to(device)
    elif task is None:
        log(f"(no val_bpb: {data_dir} has no token byte counts, nor a tokenizer/ of its {meta['vocab_size']} ids "
            f"to count them from; prepare_data.py writes them)")
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    if args.fsdp:
        # FSDP2 (Zhao et al. 2023): each block's parameters in one group, gathered just before the block runs and
        # freed after; the root's group holds the rest, the embedding and a head tied to it together. On a GPU
        # the gathered weights are bf16 (the autocast dtype) and the gradients reduced in fp32.
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else \
            MixedPrecisionPolicy()
        for block in blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    if next(model.parameters()).is_meta:
        # on the CPU each rank draws its shards from torch's generator: seeded apart, or two shards could repeat each
        # other (on a GPU, DTensor's generator draws each shard as its part of the whole); then alike for dropout
        torch.manual_seed(args.seed + rank)
        materialize(model, module, device, init=state is None and pretrained is None)
        torch.manual_seed(args.seed)
    else:
        model.to(device)
    if args.fsdp and state is None and args.init_from != "scratch":
        # rank 0's full weights, one tensor at a time: each rank keeps its shards (its peak: them + one tensor)
        set_model_state_dict(model, pretrained.state_dict() if master else {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        pretrained = None
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    step, best_val = 0, float("inf")
    if state is not None and args.fsdp:   # every rank reads its own shards of the weights and optimizer state
        sharded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(sharded, checkpoint_id=out_dir / "last" / "dcp")
        set_model_state_dict(model, sharded["model"])
        set_optimizer_state_dict(model, optimizer, sharded["optim"])
    if state is not None:
        if not args.fsdp:
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        step, best_val = state["step"], state["best_val_loss"]
        log(f"resumed from {out_dir / 'last'} at step {step}")
    saved_step = step
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params, n_active = raw_model.num_params(), raw_model.num_params(active=True)
    n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    # a task's steps count its examples at their full padded length (pairs twice): an upper bound on the tokens
    tokens_per_step = args.batch_size * seq_len * args.grad_accum * world * (2 if task == "preference" else 1)
    flops_per_token = raw_model.flops_per_token(seq_len)
    peak = peak_flops(device)
    log(f"model {args.model}: {n_params / 1e6:.2f}M parameters"
        + (f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else "")
        + (f" | LoRA rank {args.lora_rank} on {len(raw_model.lora_config['targets'])} modules: "
           f"{n_trainable / 1e6:.3f}M trainable" if hasattr(raw_model, "lora_config") else "")
        + f" | device {device} {dtype} | world {world}{' (FSDP)' if args.fsdp else ''}"
        + f"{' | activation checkpointing' if args.grad_checkpoint else ''}"
        + f" | {tokens_per_step:,} tokens/step | data {data_dir} ("
        + (f"{data.meta['train_tokens']:,} train tokens)" if task is None else
           f"{task}: {data.n('train'):,} train and {data.n('val'):,} val examples)"))
    metrics = None
    if master:
        trim_metrics(out_dir / "metrics.jsonl", step)   # a new run (step 0) starts an empty file
        metrics = open(out_dir / "metrics.jsonl", "a")

    def task_loss(batch):
        """(loss, {figure: 0-dim tensor}) of one batch of a task's examples, through model (DDP's wrapper too)."""
        if task == "classification":
            return classifier.loss(model, batch, data.pad_id)
        return dpo.loss(model, batch, reference, args.dpo_beta)

    def evaluate_task():
        """Loss and figures (accuracy; DPO's rewards) on eval_iters train batches and on the whole val split."""
        losses, names = {}, TASK_FIGURES[task]
        for split in ("train", "val"):
            if split == "train":
                batches = (data.batch(split, step_seed(args.seed + 1, -i), args.batch_size, rank, world)
                           for i in range(args.eval_iters))
            else:   # each process a stride of the examples; the sums count each example once
                batches = (data.rows(split, range(i, min(i + args.batch_size, data.n(split))))
                           for i in range(rank * args.batch_size, data.n(split), world * args.batch_size))
            total = torch.zeros(2 + len(names), device=device)   # examples, then sums of the loss and each figure
            for batch in batches:
                batch = [t.to(device) for t in batch]
                with torch.no_grad(), autocast:
                    loss, stats = task_loss(batch)
                n = batch[0].size(0) // (2 if task == "preference" else 1)   # examples (pairs) in the batch
                total += torch.stack([torch.tensor(float(n), device=device), *(
                    n * v.float() for v in (loss, *(stats[k] for k in names)))])
            if ddp:
                dist.all_reduce(total)
            means = (total[1:] / total[0]).tolist()
            losses[split] = means[0]
            losses |= {f"val_{k}": v for k, v in zip(names, means[1:])} if split == "val" else {}
        return losses

    def evaluate():
        model.eval()
        if task is not None:
            losses = evaluate_task()
            model.train()
            return losses
        losses = {}
        for split in ("train", "val"):
            # sums of batch losses and of batches, and for val_bpb of the targets' nats and UTF-8 bytes
            total = torch.zeros(4, device=device)
            for i in range(args.eval_iters):
                x, y = data.batch(split, step_seed(args.seed + 1, -i), args.batch_size, rank, world)
                if (y == -100).all():   # instruction data: a window without any reply has no loss
                    continue
                x, y = x.to(device), y.to(device)
                with torch.no_grad(), autocast:
                    logits, _ = model(x)
                # per-token losses, once: their mean is the batch loss, and val_bpb sums them
                nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                         ignore_index=-100, reduction="none")    # (B*T,)
                total[:2] += torch.stack([nats.sum() / (y != -100).sum(), torch.ones((), device=device)])
                if split == "val" and token_bytes is not None:
                    # as nanochat: a target without bytes (a special token, -100 outside a reply) is in neither sum
                    n_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0).flatten()
                    total[2:] += torch.stack([(nats * (n_bytes > 0)).sum(), n_bytes.sum().float()])
            if ddp:
                dist.all_reduce(total)
            losses[split] = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
            if split == "val" and token_bytes is not None:
                losses["val_bpb"] = (total[2] / (math.log(2) * total[3])).item() if total[3] > 0 else float("nan")
        model.train()
        return losses

    def checkpoint(links):
        nonlocal saved_step
        extra = {"global_batch": global_batch, "tokenizer": identity}
        if args.fsdp:   # every rank: the gathered weights for rank 0's official layout, and its own shards
            plain = gathered(raw_model, module)
            sharded = {"model": get_model_state_dict(raw_model),
                       "optim": get_optimizer_state_dict(raw_model, optimizer)}
            save_checkpoint(out_dir, raw_model, optimizer, scaler, step, best_val, args, data_dir, links, extra,
                            plain.save_pretrained if master else None, sharded)
        elif master:
            save_checkpoint(out_dir, raw_model, optimizer, scaler, step, best_val, args, data_dir, links, extra,
                            save_model)
        if ddp:
            dist.barrier()
        saved_step = step

    def save_model(directory):   # the official layout: PEFT's for an adapter, the family's classifier for labels
        if base_name is not None:
            lora.save_adapter(raw_model, directory, base_name)
        elif task == "classification":
            classifier.save_pretrained(raw_model, directory, data.labels, data.pad_id)
        else:
            raw_model.save_pretrained(directory)

    def record(entry):
        if master:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

    def stop_requested():
        requested = stop.signal is not None
        if ddp:   # every rank stops at the same step, or the others would wait in the next all-reduce forever
            flag = torch.tensor([float(requested)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested

    model.train()
    t_log, tokens_since = time.perf_counter(), 0
    expert_tokens = None   # mixture of experts: tokens each expert took since the last log, (MoE layers, experts)
    stop = StopRequest()
    try:
        while step < args.max_steps and not stop_requested():
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros(1 + len(TASK_FIGURES.get(task, ())), device=device)   # the loss, a task's figures
            for micro in range(args.grad_accum):
                batch = data.batch("train", step_seed(args.seed, step), args.batch_size,
                                   part=micro * world + rank, parts=args.grad_accum * world)
                no_targets = task is None and data.masks and bool((batch[1] == -100).all())
                batch = [t.to(device, non_blocking=True) for t in batch]
                # DDP: all-reduce the gradients only on the last micro-step; FSDP: reduce-scatter them only then
                last_micro = micro == args.grad_accum - 1
                sync = nullcontext() if (not ddp or args.fsdp or last_micro) else model.no_sync()
                if args.fsdp:
                    raw_model.set_requires_gradient_sync(last_micro)
                with sync:
                    with autocast:
                        if task is None:
                            (logits, loss), stats = model(*batch), {}
                        else:
                            loss, stats = task_loss(batch)
                    load = raw_model.expert_load() if hasattr(raw_model, "expert_load") else None
                    if load is not None:
                        expert_tokens = load.float() + (0 if expert_tokens is None else expert_tokens)
                    if no_targets:   # a window of instruction data without any reply: no loss, zero gradients
                        loss = logits.sum() * 0.0
                    scaler.scale(loss / args.grad_accum).backward()
                loss_sum += torch.stack([loss.detach().float(), *(stats[k] for k in TASK_FIGURES.get(task, ()))])
            if ddp:
                dist.all_reduce(loss_sum)
            step_loss, *figures = (loss_sum / (args.grad_accum * world)).tolist()
            figures = dict(zip(TASK_FIGURES.get(task, ()), figures))
            if not math.isfinite(step_loss):
                raise BadInput(f"loss is {step_loss} at step {step + 1}: stopped; the last good checkpoint "
                                    f"is {out_dir / 'last'}" + ("" if (out_dir / "last").exists() else " (none yet)"))
            if args.grad_clip > 0:   # under FSDP the norm of sharded (DTensor) gradients is the whole model's
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if getattr(config, "bias_update_rate", 0) > 0:   # DeepSeek-V3's loss-free balancing, after the step
                raw_model.update_expert_bias()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_since += tokens_per_step

            if step % args.log_interval == 0 or step == args.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t_log
                tok_s = tokens_since / dt
                mfu = flops_per_token * tok_s / (peak * world) if peak else None
                moe = figures | moe_metrics(expert_tokens, raw_model, ddp)
                log(f"step {step:5d} | loss {step_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                    + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                    + "".join(f" | {name} {value:.4f}" for name, value in moe.items()))
                record({"step": step, "loss": step_loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu, **moe,
                        "time": time.time()})
                expert_tokens = None
                t_log, tokens_since = time.perf_counter(), 0
            if step % args.eval_interval == 0 or step == args.max_steps:
                losses = evaluate()
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                extra = {k: v for k, v in losses.items() if k not in ("train", "val")}   # val_bpb, val_accuracy, ...
                log(f"step {step:5d} | eval: train {losses['train']:.4f} val {losses['val']:.4f}"
                    + "".join(f" | {k} {v:.4f}" for k, v in extra.items()) + (" (best)" if improved else ""))
                record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"], **extra,
                        "time": time.time()})
                checkpoint(["last", "best"] if improved else ["last"])
                t_log, tokens_since = time.perf_counter(), 0
        if step < args.max_steps:   # stopped by a signal, at a step boundary
            if step > saved_step:
                log(f"\ninterrupted at step {step}: saving {out_dir / 'last'} ...")
                checkpoint(["last"])
                log("saved; continue with --resume")
            else:
                log(f"\ninterrupted at step {step}: " + (f"{out_dir / 'last'} holds this step already; continue with "
                                                         "--resume" if step else "nothing trained, nothing saved"))
            return raw_model, 128 + (stop.signal or signal.SIGINT)
    finally:
        stop.restore()
        if metrics:
            metrics.close()
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
    if master and args.sample_tokens > 0 and task is None:
        if args.fsdp:   # rank 0 alone cannot run a sharded model: the others would have to gather with it
            print(f"(no sample under --fsdp: python sample.py {out_dir / 'last'})")
        else:
            show_sample(raw_model, data, data_dir, args.sample_tokens, device)
    return raw_model, 0


def moe_metrics(expert_tokens, model, ddp):
    """What a mixture of experts adds to the log, {} for a dense model: expert_load_cv, how evenly the experts share
    the tokens (the coefficient of variation, std / mean, of the tokens per expert in each MoE layer, averaged over
    layers; 0 is even, all tokens on k of E experts sqrt(E / k - 1)) and expert_load_cv_max at the worst layer;
    the model's last aux_loss (balancing) and mtp_loss (DeepSeek-V3's multi-token prediction) where it has them."""
    metrics = {}
    if expert_tokens is not None:
        if ddp:
            dist.all_reduce(expert_tokens)
        cv = expert_tokens.std(-1, correction=0) / expert_tokens.mean(-1).clamp(min=1e-9)   # (MoE layers,)
        metrics = {"expert_load_cv": cv.mean().item(), "expert_load_cv_max": cv.max().item()}
    losses = {name: float(getattr(model, name)) for name in ("aux_loss", "mtp_loss")
              if getattr(model, name, None) is not None}
    return metrics | losses


def _set_dropout(model, p):
    model.config.dropout = p
    for m in model.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def show_sample(model, data, data_dir, n_tokens, device):
    """Print a sample continuing a few tokens of validation text, so a learner sees what the model learned."""
    if not (Path(data_dir) / "tokenizer").is_dir():
        print(f"(no sample: {Path(data_dir) / 'tokenizer'} is missing, so the tokens cannot be shown as text)")
        return
    tok = bpe.load(Path(data_dir) / "tokenizer")
    val = np.memmap(data.paths["val"], dtype=data.meta["dtype"], mode="r")
    prompt = torch.from_numpy(val[:16].astype(np.int64))[None].to(device)
    n_tokens = min(n_tokens, model.config.block_size - prompt.size(1))
    print("\n--- sample (prompt: first 16 validation tokens) ---")
    print(tok.decode(prompt[0].tolist()), end="", flush=True)
    decoder = tok.decoder()
    gen = torch.Generator(device=device).manual_seed(0)
    # no stop at end-of-text: the sample runs on into the next "document", which shows more of what was learned
    allowed = sample.sampleable(tok, model.config.vocab_size)   # a model may have more ids than the tokenizer
    for t in sample.generate(model, prompt, n_tokens, temperature=0.8, top_k=50, generator=gen, allowed=allowed):
        print(decoder.step(int(t[0])), end="", flush=True)
    print(decoder.flush() + "\n---")


def main(argv=None):
    args, module = parse_args(argv)
    try:
        _, code = train(args, module)
    finally:   # an error before the loop, under torchrun: leave the process group cleanly
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    errors.run(main)
