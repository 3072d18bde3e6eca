"""How much memory one training process needs, from the config alone: weights, gradients, AdamW's state and the
activations backward keeps, under DDP, FSDP, activation checkpointing and LoRA.

    python memory.py                     # the README's table: gpt2-xl, llama3.2-1b, llama3-8b, 2048 tokens a GPU

  - activations: what autograd saves per token, counted tensor by tensor for each family's block (the test checks
    the counts against the bytes autograd really keeps, through saved_tensors_hooks) plus the loss's logits;
  - activation checkpointing (Chen et al. 2016) keeps each block's input and recomputes one block at a time;
  - FSDP (ZeRO-3, Rajbhandari et al. 2020) divides weights, gradients and optimizer state by the processes, plus
    the blocks it gathers whole; DDP keeps a second copy of the gradients in its all-reduce buckets;
  - LoRA trains and keeps optimizer state for the adapters only;
  - bf16 autocast stores activations in 2 bytes and keeps bf16 copies of the weights through the forward.
"""
import argparse
import dataclasses
import importlib

import torch

import train


def activation_elements(config):
    """(per block, the rest) numbers autograd keeps per token of a training forward, by the tensors saved:
    GPT-2's block saves 16 C + n_head + 4: each LayerNorm's input and output (4 C) and statistics (4), q, k, v (3 C),
    the attention output (C), c_fc's output and GELU's (2 x 4C), SDPA's logsumexp (n_head). A Llama-style block
    saves 6 C + 2 C_q + 2 C_kv + 4 I + n_head + 2: each RMSNorm's input, normalized input and output (6 C), the
    roped q (C_q), k and v (2 C_kv), the attention output (C_q), gate, up, silu(gate) and their product (4 I), the
    logsumexp, the norms' statistics. The rest: the final norm (about 3 C) and the log-softmax of the logits (V)."""
    c = config
    if hasattr(c, "n_kv_head"):   # llama3, qwen (dense): RMSNorm, GQA, SwiGLU
        if getattr(c, "n_experts", 0):
            raise ValueError("memory.py counts dense blocks only (a mixture of experts saves per routed expert)")
        head_dim = getattr(c, "head_dim", None) or c.n_embd // c.n_head
        q, kv = c.n_head * head_dim, c.n_kv_head * head_dim
        block = 6 * c.n_embd + 2 * q + 2 * kv + 4 * c.intermediate_size + c.n_head + 2
        if getattr(c, "qk_norm", False):   # Qwen3: q and k each through an RMSNorm that saves input and result
            block += 2 * q + 2 * kv + c.n_head + c.n_kv_head
        return block, 3 * c.n_embd + c.vocab_size
    if hasattr(c, "n_embd") and not hasattr(c, "kv_lora_rank"):   # gpt2
        return 16 * c.n_embd + c.n_head + 4, 2 * c.n_embd + c.vocab_size
    raise ValueError(f"memory.py has no activation count for {type(c).__module__}'s config")


def widest(config):
    """The widest hidden layer a block's backward works through (the MLP's), per token."""
    return getattr(config, "intermediate_size", None) or 4 * config.n_embd


def training_memory(module, config, tokens, *, world=1, fsdp=False, grad_checkpoint=False, lora_rank=0,
                    bf16=False):
    """{part: bytes} at the peak of a training step of one process, for `tokens` tokens per micro-step (batch x
    sequence length) on each of `world` processes; AdamW (two fp32 states), fp32 master weights and gradients.
    The parts: weights, gradients, optimizer, activations, total. A model of the peak, not a measurement: the test
    compares it with measured peaks on the CPU."""
    with torch.device("meta"):
        model = module.Model(config)
        n_params = sum(p.numel() for p in model.parameters())
        trainable = n_params
        if lora_rank:
            import lora
            lora.add_lora(model, lora_rank, targets=["all"])
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = world if fsdp else 1
    block_params = max(sum(p.numel() for p in b.parameters()) for b in train.blocks(model))
    weights = 4 * n_params / shards
    if fsdp:   # the gathered blocks: the one computing and the next, prefetched, in the compute dtype
        weights += 2 * block_params * (2 if bf16 else 4)
    elif bf16:   # autocast's bf16 copies of the weights, cached through the forward
        weights += 2 * n_params
    gradients = 4 * trainable / shards * (2 if world > 1 and not fsdp else 1)   # DDP's buckets hold a copy
    optimizer = 8 * trainable / shards
    block, rest = activation_elements(config)
    saved = config.n_layer * (config.n_embd if grad_checkpoint else block) + (block if grad_checkpoint else 0)
    act_bytes = 2 if bf16 else 4
    # the loss in fp32: the logits, the log-softmax's gradient and the logits' beside its saved output; a block's
    # backward: 3 of its widest tensors at a time
    transient = 4 * 3 * config.vocab_size + act_bytes * 3 * widest(config)
    activations = tokens * (act_bytes * (saved + rest) + transient)
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    return parts | {"total": sum(parts.values())}


def table(tokens=2048, world=8):
    """The README's table, in GiB per GPU: bf16 autocast, `tokens` tokens per GPU per micro-step."""
    setups = [("DDP", {}), ("DDP + ckpt", dict(grad_checkpoint=True)), (f"FSDP x{world}", dict(fsdp=True)),
              (f"FSDP x{world} + ckpt", dict(fsdp=True, grad_checkpoint=True)), ("LoRA r=16 (all)", dict(lora_rank=16))]
    rows = []
    for family, preset in (("gpt2", "gpt2-xl"), ("llama3", "llama3.2-1b"), ("llama3", "llama3-8b")):
        module = importlib.import_module(family)
        config = dataclasses.replace(module.PRESETS[preset])
        with torch.device("meta"):
            n = sum(p.numel() for p in module.Model(config).parameters())
        block, rest = activation_elements(config)
        per_token = 2 * (config.n_layer * block + rest)
        cells = []
        for _, kwargs in setups:
            m = training_memory(module, config, tokens, world=world, bf16=True, **kwargs)
            cells.append(f"{m['total'] / 2**30:.1f}")
        rows.append(f"| {preset} | {n / 1e9:.2f}B | {per_token / 2**20:.2f} MiB | " + " | ".join(cells) + " |")
    head = "| model | parameters | activations per token | " + " | ".join(name for name, _ in setups) + " |"
    return "\n".join([head, "|" + "---|" * (3 + len(setups)), *rows])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per GPU per micro-step")
    p.add_argument("--world", type=int, default=8, help="GPUs, for FSDP's shards")
    a = p.parse_args()
    print(table(a.tokens, a.world))
