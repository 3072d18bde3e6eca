"""Sample from any model of this repo: a checkpoint directory, a hub id, or a preset name.

    python sample.py out/gpt2/last --prompt "def fibonacci(n):"
    python sample.py gpt2-xl --prompt_file story.txt --num_samples 3 --max_new_tokens 100 --top_p 0.9
    python sample.py meta-llama/Llama-3.2-1B-Instruct --chat          # instruct checkpoints: multi-turn chat

Tokens are streamed as they come; generation stops at the model's end-of-sequence token(s). The KV cache makes
each new token cost one position of compute; --no_cache recomputes the whole sequence every step (the
baseline the cache is measured against). A prompt longer than the context keeps only its last tokens (a
warning says how many were dropped), so that the prompt plus --max_new_tokens fits in the context.
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch

import bpe
import hub

# config.json "model_type" -> model file
FAMILIES = {"gpt2": "gpt2", "llama": "llama3", "qwen2": "qwen", "qwen3": "qwen", "qwen3_moe": "qwen",
            "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}


# -----------------------------------------------------------------------------------------------------------
# Generation


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top_k and outside the top_p nucleus. logits: (B, V) float."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose probability >= top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p   # the mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else top-k / nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_ids=(),
             generator=None, use_cache=True):
    """Yield next tokens (B,) one step at a time for prompt idx (B, T); stops early once every row hit an eos.

    With the cache the prompt is fed once (prefill), then one token per step at its absolute position.
    """
    B, T = idx.shape
    eos = torch.tensor(sorted(eos_ids), device=idx.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    if use_cache:
        cache = model.init_cache(B, T + max_new_tokens, device=idx.device)
        logits, _ = model(idx, cache=cache, pos=0)
    else:
        seq = idx
        logits, _ = model(seq)
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)   # (B,)
        yield nxt
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        if use_cache:
            logits, _ = model(nxt[:, None], cache=cache, pos=T + i)
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits, _ = model(seq)


# -----------------------------------------------------------------------------------------------------------
# Loading any model


def resolve_source(source, family=None):
    """A checkpoint directory, hub id or preset -> (model module, local directory)."""
    if not Path(source).is_dir() and family is None:
        for name in set(FAMILIES.values()):
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError:
                continue
            if source in module.PRESETS:
                return module, hub.resolve(module.HUB_IDS[source])
    directory = hub.resolve(source)
    if family is None:
        model_type = hub.read_json(Path(directory) / "config.json").get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{directory}/config.json: model_type {model_type!r} is not one of "
                             f"{sorted(FAMILIES)}")
        family = FAMILIES[model_type]
    return importlib.import_module(family), directory


def load(source, *, family=None, device="cpu", dtype=None, **load_kwargs):
    """-> (module, model, tokenizer) for a checkpoint directory, hub id or preset; load_kwargs go to the
    model file's from_pretrained (e.g. rope_scale_factor for a Meta-format Llama)."""
    module, directory = resolve_source(source, family)
    model = module.Model.from_pretrained(str(directory), dtype=dtype, device=device, **load_kwargs)
    model.eval()
    return module, model, bpe.load(directory)


def eos_ids_of(model, tok):
    ids = model.config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    return ids | set(tok.eos_ids or [])


def fit_prompt(ids, max_new_tokens, context):
    """Left-truncate the prompt so prompt + new tokens fit the context; warn on stderr when cutting."""
    max_new_tokens = min(max_new_tokens, context - 1)
    keep = context - max_new_tokens
    if len(ids) > keep:
        print(f"warning: the prompt has {len(ids)} tokens; with --max_new_tokens {max_new_tokens} and a context of "
              f"{context}, only its last {keep} are kept", file=sys.stderr)
        ids = ids[-keep:]
    return ids, max_new_tokens


def stream(model, tok, ids, args, generator, out=None):
    """Generate from ids, printing text as it comes; returns the new token ids."""
    out = out or sys.stdout
    ids, max_new = fit_prompt(ids, args.max_new_tokens, model.config.block_size)
    device = next(model.parameters()).device
    decoder = tok.decoder()
    eos = eos_ids_of(model, tok)
    new = []
    for t in generate(model, torch.tensor([ids], device=device), max_new, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, eos_ids=eos, generator=generator,
                      use_cache=not args.no_cache):
        t = int(t[0])
        new.append(t)
        if t in eos:
            break
        out.write(decoder.step(t))
        out.flush()
    out.write(decoder.flush())
    out.flush()
    return new


def chat(module, model, tok, args, generator):
    """Interactive multi-turn chat with an instruct checkpoint; history is trimmed to fit the context."""
    if not hasattr(module, "encode_chat"):
        raise ValueError(f"{module.__name__}.py has no chat format (encode_chat)")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("\n> ")
        except EOFError:
            return
        if not user.strip():
            return
        messages.append({"role": "user", "content": user})
        ids = module.encode_chat(tok, messages)
        budget = model.config.block_size - args.max_new_tokens
        while len(ids) > budget and len(messages) > 1 + bool(args.system):
            del messages[bool(args.system)]   # drop the oldest turn, keep the system prompt
            ids = module.encode_chat(tok, messages)
        reply = stream(model, tok, ids, args, generator)
        messages.append({"role": "assistant", "content": tok.decode(reply).strip()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="checkpoint directory, hub id (owner/name) or preset (e.g. gpt2-medium)")
    p.add_argument("--model", default=None, help="model file to use (default: from config.json's model_type)")
    p.add_argument("--prompt", default="", help="prompt text (empty: start from the end-of-text token)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="interactive chat (instruct checkpoints)")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--no_cache", action="store_true", help="recompute the full sequence each step")
    p.add_argument("--rope_scale_factor", type=float, default=None,
                   help="Llama 3.1+ RoPE scale factor for Meta-format checkpoints of unofficial sizes")
    args = p.parse_args(argv)
    args.top_k = args.top_k or None

    from train import pick_device, pick_dtype
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        extra = {"rope_scale_factor": args.rope_scale_factor} if args.rope_scale_factor else {}
        module, model, tok = load(args.source, family=args.model, device=device, dtype=dtype, **extra)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        if args.chat:
            return chat(module, model, tok, args, generator)
        text = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
        ids = tok.encode(text, allowed_special="all") if text else []
        if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id] + ids
        if not ids:
            start = tok.bos_id if tok.bos_id is not None else next(iter(sorted(eos_ids_of(model, tok))), None)
            if start is None:
                raise ValueError("the prompt is empty and the tokenizer has no BOS or end-of-text token to start from")
            ids = [start]
        if max(ids) >= model.config.vocab_size:
            raise ValueError(f"prompt token id {max(ids)} is beyond the model's vocab_size {model.config.vocab_size}")
        for i in range(args.num_samples):
            if i:
                print("\n---------------")
            sys.stdout.write(text)
            stream(model, tok, ids, args, generator)
        print()
    except (hub.HubError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
