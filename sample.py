"""Sample from any model of this repo: a checkpoint directory, a hub id, or a preset name.

    python sample.py out/gpt2/last --prompt "def fibonacci(n):"
    python sample.py gpt2-xl --prompt_file story.txt --num_samples 3 --max_new_tokens 100 --top_p 0.9
    python sample.py meta-llama/Llama-3.2-1B-Instruct --chat          # instruct checkpoints: multi-turn chat

Tokens are streamed as they come; generation stops at the model's end-of-sequence token(s). The KV cache makes
each new token cost one position of compute; --no_cache recomputes the whole sequence every step (the
baseline the cache is measured against). A prompt longer than the context keeps only its last tokens (a
warning says how many were dropped), so that the prompt plus --max_new_tokens fits in the context.
Only ids the tokenizer can decode are sampled: a model's vocab_size may exceed its tokenizer's.

    python sample.py out/gpt2/last --draft out/gpt2_small/last --draft_tokens 4   # speculative decoding
    python sample.py out/gpt2/last --compile --quantize int8

  - --draft: speculative decoding (Leviathan et al. 2023), batch 1: greedy gives plain greedy's tokens, sampling
    the target's distribution exactly; the acceptance rate goes to stderr.
  - --compile: the one-token decode step torch.compiled (prefill stays eager).
  - generate_batch: prompts of different lengths in one batch, each with its own stop tokens, exactly as alone.
"""
import argparse
import functools
import importlib
import inspect
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import bpe
import checkpoint_io
import errors
import hub

# config.json "model_type" -> model file
FAMILIES = {"gpt2": "gpt2", "llama": "llama3", "qwen2": "qwen", "qwen3": "qwen", "qwen3_moe": "qwen",
            "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}
# the model files this checkout has, of those docs/DESIGN.md plans: every driver's --model takes one of these
MODELS = tuple(m for m in ("gpt2", "llama3", "qwen", "deepseek") if (Path(__file__).parent / f"{m}.py").is_file())


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


def probabilities(logits, temperature=1.0, top_k=None, top_p=None, allowed=None):
    """The distribution sampling draws from, (B, V), for logits (B, V) at temperature > 0."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, allowed=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else top-k / nucleus (top-p) sampling.
    allowed: bool (V,), the only ids that may be picked (see sampleable); None: every id."""
    if temperature == 0:
        return (logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))).argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p, allowed)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampleable(tok, vocab_size, eos_ids=()):
    """Bool (vocab_size,) of the ids sampling may pick: those the tokenizer can decode, and the stop tokens; None
    when that is every id. A model's vocab may be larger than its tokenizer's (embeddings padded to a round size,
    a BPE that learned fewer merges than asked for), and an id without text would end the stream with an error."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[[i for i in (*tok.vocab, *eos_ids) if i < vocab_size]] = True
    return None if bool(allowed.all()) else allowed


def check_finite(logits):
    if not bool(torch.isfinite(logits).all()):
        # else multinomial fails with a cryptic message (a device-side assert on CUDA), and argmax picks junk
        raise errors.BadInput("the model's logits are NaN or infinite: its weights hold NaN or inf (a diverged "
                              "or damaged checkpoint), or float16 overflows (try --dtype float32)")


def prefill(model, idx, cache, pos=0):
    """Tokens idx (B, T) into the cache at positions pos..pos+T-1 in one forward; -> the last logits (B, V)."""
    return model(idx, cache=cache, pos=pos, last_only=True)[0][:, -1]


def decode_one_token(model, tok, cache, pos):
    """One token per row, tok (B,), at absolute position pos; -> the next logits (B, V). --compile compiles this
    step alone: its shapes stay fixed from step to step, but for the cached keys it attends to (pos + 1 of them)."""
    return model(tok[:, None], cache=cache, pos=pos, last_only=True)[0][:, -1]


@functools.cache
def compiled_decode(device_type):
    """decode_one_token compiled: CUDA graphs on CUDA ("reduce-overhead", one per cache length), inductor's
    default elsewhere. pos is a Python int that changes every step: dynamo recompiles once, on the second
    position, with pos symbolic (automatic dynamic shapes), and never again."""
    return torch.compile(decode_one_token, mode="reduce-overhead" if device_type == "cuda" else None)


def activation_dtype(model):
    """The dtype the cache holds: the first floating parameter's (a quantized head's .weight would be dequantized);
    None, the model's own choice, for a model without one."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_ids=(),
             generator=None, use_cache=True, allowed=None, compile=False, draft=None, draft_tokens=4, stats=None):
    """Yield next tokens (B,) one step at a time for prompt idx (B, T); stops early once every row hit an eos.

    With the cache the prompt is fed once (prefill), then one token per step at its absolute position.
    Only the last position goes through the LM head (last_only): a 4096-token prompt at Llama 3's 128K
    vocabulary would otherwise be 2 GB of fp32 logits, all but one row of them unused.
    allowed: the only ids that may be sampled (bool (V,), see sampleable); None: every id.
    compile: the one-token step torch.compiled (compiled_decode); the tokens are those of the eager step.
    draft: a smaller model of the same tokenizer that proposes draft_tokens tokens per target forward
    (speculative decoding, see speculate); batch 1 only. stats: a dict, filled in with its acceptance counts.
    """
    B, T = idx.shape
    if draft is not None:
        if B != 1 or not use_cache:
            raise errors.BadInput(f"speculative decoding (a draft model) takes one prompt with the cache, not "
                                  f"{'--no_cache' if not use_cache else f'a batch of {B}'}")
        yield from speculate(model, draft, idx, max_new_tokens, draft_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_ids=eos_ids, generator=generator, allowed=allowed,
                             compile=compile, stats=stats)
        return
    eos = torch.tensor(sorted(eos_ids), device=idx.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    allowed = allowed.to(idx.device) if allowed is not None else None
    step = compiled_decode(idx.device.type) if compile else decode_one_token
    if use_cache:
        cache = model.init_cache(B, T + max_new_tokens, device=idx.device, dtype=activation_dtype(model))
        logits = prefill(model, idx, cache)   # (B, V)
    else:
        seq = idx
        logits = model(seq, last_only=True)[0][:, -1]
    for i in range(max_new_tokens):
        check_finite(logits)
        nxt = sample_next(logits, temperature, top_k, top_p, generator, allowed)   # (B,)
        yield nxt
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        if use_cache:
            logits = step(model, nxt, cache, T + i)
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = model(seq, last_only=True)[0][:, -1]


def speculate(model, draft, idx, max_new_tokens, k, *, temperature=1.0, top_k=None, top_p=None, eos_ids=(),
              generator=None, allowed=None, compile=False, stats=None):
    """Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) of prompt idx (1, T): yields tokens (1,).

    Each round the draft proposes k tokens, one forward each, and the target scores all of them in one forward
    of k + 1 positions. Greedy: the drafted tokens are kept while they equal the target's argmax, then the
    target's own token follows: exactly plain greedy decoding. Sampling: drafted token x is kept with
    probability min(1, p(x) / q(x)) (p, q: the target's and the draft's distributions, same temperature and
    filters); the first one refused is replaced by a sample of norm(max(p - q, 0)); when all k are kept, a
    bonus token comes from p. The tokens then follow the target's distribution exactly, whatever the draft.
    The caches are static: what a refused token wrote is simply overwritten by the next round.
    stats: {"rounds", "drafted", "accepted"}, filled in; accepted / drafted is the acceptance rate.
    """
    T, V, device = idx.size(1), model.config.vocab_size, idx.device
    if draft.config.block_size < T + max_new_tokens:
        raise errors.BadInput(f"the draft's context ({draft.config.block_size} tokens) is shorter than the prompt "
                              f"plus the new tokens ({T + max_new_tokens})")
    stats = {} if stats is None else stats
    stats.update(rounds=0, drafted=0, accepted=0)
    if max_new_tokens == 0:
        return
    eos = set(eos_ids)
    allowed = allowed.to(device) if allowed is not None else None
    step = compiled_decode(device.type) if compile else decode_one_token

    def fit(logits):   # the draft's logits over the target's vocabulary (a padded embedding may differ in size)
        return logits[..., :V] if logits.size(-1) >= V else F.pad(logits, (0, V - logits.size(-1)), value=-math.inf)

    def dist(logits):   # (n, V) -> the distributions tokens are drawn from; one-hot of the argmax when greedy
        if temperature > 0:
            return probabilities(logits, temperature, top_k, top_p, allowed)
        return F.one_hot(sample_next(logits, 0, allowed=allowed), V).float()

    cache = model.init_cache(1, T + max_new_tokens, device=device, dtype=activation_dtype(model))
    draft_cache = draft.init_cache(1, T + max_new_tokens, device=device, dtype=activation_dtype(draft))
    logits = prefill(model, idx, cache)
    check_finite(logits)
    last = sample_next(logits, temperature, top_k, top_p, generator, allowed)   # (1,): known, not yet in any cache
    prefill(draft, idx, draft_cache)
    # draft_new: the tokens the draft's cache lacks (the last one, after a round that kept every drafted token)
    n, draft_new = 1, last[None]
    while True:
        yield last
        if int(last) in eos or n == max_new_tokens:
            return
        L = T + n   # tokens so far; the target's cache holds the first L - 1
        kr = min(k, max_new_tokens - n - 1)   # the round emits at most kr + 1 tokens
        drafted, q = [], []
        for i in range(kr):
            pos = L - 1 + i
            if i == 0 and draft_new.size(1) > 1:
                d_logits = prefill(draft, draft_new, draft_cache, pos - draft_new.size(1) + 1)
            else:
                d_logits = step(draft, draft_new[:, -1], draft_cache, pos)
            q.append(dist(fit(d_logits))[0])
            x = torch.multinomial(q[-1], 1, generator=generator) if temperature > 0 else q[-1].argmax()[None]
            drafted.append(x)
            draft_new = x[None]
        proposal = torch.cat([last, *drafted])[None]   # (1, kr + 1) at positions L - 1 ..
        t_logits = model(proposal, cache=cache, pos=L - 1)[0][0]   # (kr + 1, V)
        check_finite(t_logits)
        p = dist(t_logits)
        kept = kr
        if kr:
            x, q = proposal[0, 1:], torch.stack(q)
            if temperature > 0:
                ratio = p[:-1].gather(1, x[:, None])[:, 0] / q.gather(1, x[:, None])[:, 0]
                ok = torch.rand(kr, device=device, generator=generator) < ratio
            else:
                ok = p[:-1].argmax(-1) == x
            kept = int(ok.long().cumprod(0).sum())
        if kept < kr and temperature > 0:
            residual = (p[kept] - q[kept]).clamp(min=0)
            # p == q up to rounding leaves no mass; a refusal is then (almost) impossible, and p is the fallback
            residual = residual if float(residual.sum()) > 0 else p[kept]
            fix = torch.multinomial(residual, 1, generator=generator)
        else:   # greedy: the target's argmax; all kept: the bonus token from p
            fix = torch.multinomial(p[kept], 1, generator=generator) if temperature > 0 else p[kept].argmax()[None]
        stats["rounds"] += 1
        stats["drafted"] += kr
        stats["accepted"] += kept
        for tok in proposal[0, 1:kept + 1]:
            yield tok[None]
            n += 1
            if int(tok) in eos:
                return
        # the draft's cache holds proposal[:kr] (pos L - 1 .. L + kr - 2): all kept lacks the last drafted one
        draft_new = torch.cat([proposal[:, kr:], fix[None]], 1) if kept == kr and kr else fix[None]
        n, last = n + 1, fix


@torch.inference_mode()
def generate_batch(model, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_ids=(),
                   generator=None, allowed=None, compile=False):
    """Generate for several prompts (lists of ids) of any lengths in one batch; -> a list of new ids per prompt,
    each what generate yields for that prompt alone (greedy: the same ids): up to and with its first stop token,
    else max_new_tokens of them. eos_ids: the stop tokens of every prompt, or a list of one collection per prompt.

    No padding: the model files take one position for the whole batch and no mask over the keys, so a left-padded
    row would attend to its pad keys (and GPT-2's learned positions would be shifted). Instead every row stands
    at the same position at every step: the shortest prompt's length is prefilled at once, then each row feeds its
    next prompt token while it has one (its logits unused, as in a prefill), and its last sampled token after that.
    The price is that the longer prompts' tails go one token a step.
    """
    B, lens = len(prompts), [len(p) for p in prompts]
    if not B or min(lens) == 0:
        raise errors.BadInput("generate_batch: expected one or more prompts, none of them empty")
    per_row = isinstance(eos_ids, (list, tuple)) and len(eos_ids) == B and not any(isinstance(e, int) for e in eos_ids)
    stops = [set(e) for e in eos_ids] if per_row else [set(eos_ids)] * B
    device = next(model.parameters()).device
    out, done = [[] for _ in range(B)], [max_new_tokens == 0] * B
    grid = torch.tensor([p + [0] * (max(lens) - len(p)) for p in prompts], device=device)   # (B, longest)
    in_prompt = torch.tensor(lens, device=device)
    allowed = allowed.to(device) if allowed is not None else None
    step = compiled_decode(device.type) if compile else decode_one_token
    cache = model.init_cache(B, max(lens) + max_new_tokens, device=device, dtype=activation_dtype(model))
    pos = min(lens)
    logits = prefill(model, grid[:, :pos], cache)   # (B, V): every row's logits for position pos
    while not all(done):
        check_finite(logits)
        nxt = sample_next(logits, temperature, top_k, top_p, generator, allowed)   # (B,)
        for i, t in enumerate(nxt.tolist()):
            if pos >= lens[i] and not done[i]:
                out[i].append(t)
                done[i] = t in stops[i] or len(out[i]) == max_new_tokens
        if all(done):
            break
        feed = torch.where(pos < in_prompt, grid[:, min(pos, max(lens) - 1)], nxt)
        logits = step(model, feed, cache, pos)
        pos += 1
    return out


# -----------------------------------------------------------------------------------------------------------
# Loading any model


def pick_device(name):
    """--device: auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps; BadInput when this machine lacks it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise errors.BadInput(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.BadInput(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); "
                              f"use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise errors.BadInput(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise errors.BadInput(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise errors.BadInput(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(name, device):
    """--dtype: auto is bf16 autocast on CUDA GPUs that have it (else fp16), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32   # CPU/MPS bf16 autocast is usually slower than fp32 for small models
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise errors.BadInput(f"--dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return dtypes[name]


def resolve_source(source, family=None):
    """A checkpoint directory, hub id or preset -> (model module, local directory). family: a model file name
    (--model), for a checkpoint whose config.json does not name its model_type (Meta's original format)."""
    if family is not None and family not in MODELS:
        raise errors.BadInput(f"--model {family!r}: expected one of {', '.join(MODELS)} (the model files here)")
    if not Path(source).is_dir():
        for name in [family] if family else MODELS:
            module = importlib.import_module(name)
            if source in module.PRESETS:
                return module, hub.resolve(module.HUB_IDS[source])
    directory = hub.resolve(source)
    adapter = Path(directory) / "adapter_config.json"
    if family is None and adapter.is_file():   # a LoRA adapter (a LoRA run's checkpoint): the family of its base
        return resolve_source(str(checkpoint_io.read_json(adapter).get("base_model_name_or_path")))[0], directory
    if family is None:
        family = FAMILIES[_model_type(Path(directory) / "config.json")]
    return importlib.import_module(family), directory


def _model_type(path):
    """config.json's model_type, when a model file here implements it; else BadInput naming the file and the key."""
    supported = sorted(t for t, m in FAMILIES.items() if m in MODELS)
    hint = f"pass --model {' or '.join(MODELS)}"
    if not path.is_file():
        raise errors.BadInput(f"{path}: not found (it names the model_type); for a checkpoint without one, such as "
                              f"Meta's original format, {hint}")
    config = checkpoint_io.read_json(path)
    if not isinstance(config, dict):
        raise errors.BadInput(f"{path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise errors.BadInput(f"{path}: lacks key 'model_type' (one of {', '.join(supported)}), or {hint}")
    if model_type not in supported:
        planned = (f", which needs {FAMILIES[model_type]}.py (not in this checkout yet)"
                   if isinstance(model_type, str) and model_type in FAMILIES else "")
        raise errors.BadInput(f"{path}: model_type {model_type!r:.60}{planned}; the model files here implement "
                              f"{', '.join(supported)}")
    return model_type


def load(source, *, family=None, device="cpu", dtype=None, chat=False, no_thinking=False, **load_kwargs):
    """-> (module, model, tokenizer) for a checkpoint directory, hub id or preset; load_kwargs go to the
    model file's from_pretrained (e.g. rope_scale_factor for a Meta-format Llama). The cheap checks come before the
    weights: chat=True refuses a model file without a chat format, and the tokenizer is loaded first."""
    module, directory = resolve_source(source, family)
    if chat and not hasattr(module, "encode_chat"):
        raise errors.BadInput(f"--chat: {module.__name__}.py has no chat format (encode_chat); chat with an "
                              f"instruct checkpoint of a family that has one")
    if no_thinking and "enable_thinking" not in inspect.signature(module.encode_chat).parameters:
        raise errors.BadInput(f"--no_thinking: {module.__name__}.py's chat format has no thinking to switch off")
    unknown = sorted(load_kwargs.keys() - inspect.signature(module.Model.from_pretrained).parameters.keys())
    if unknown:
        raise errors.BadInput(f"--{unknown[0]} does not apply to {module.__name__}.py checkpoints")
    tok = bpe.load(directory)
    model = module.Model.from_pretrained(str(directory), dtype=dtype, device=device, **load_kwargs)
    model.eval()
    return module, model, tok


def quantize(model, mode):
    """Weight-only quantization in place ("int8" | "int4", quantize.py); -> the model."""
    return importlib.import_module("quantize").quantize(model, mode)   # imported when asked for: a heavy module


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


def stream(model, tok, ids, args, generator, out=None, draft=None):
    """Generate from ids, printing text as it comes; returns the new token ids, without the stop token.
    draft: the --draft model; its acceptance rate goes to stderr at the end."""
    out = out or sys.stdout
    ids, max_new = fit_prompt(ids, args.max_new_tokens, model.config.block_size)
    device = next(model.parameters()).device
    decoder = tok.decoder()
    eos = eos_ids_of(model, tok)
    new, stats = [], {}
    for t in generate(model, torch.tensor([ids], device=device), max_new, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, eos_ids=eos, generator=generator,
                      use_cache=not args.no_cache, allowed=sampleable(tok, model.config.vocab_size, eos),
                      compile=getattr(args, "compile", False), draft=draft,
                      draft_tokens=getattr(args, "draft_tokens", 4), stats=stats):
        t = int(t[0])
        if t in eos:
            break
        new.append(t)
        out.write(decoder.step(t))
        out.flush()
    out.write(decoder.flush())
    out.flush()
    if draft is not None and stats["drafted"]:
        print(f"\n[speculative: {stats['accepted']}/{stats['drafted']} drafted tokens accepted "
              f"({stats['accepted'] / stats['drafted']:.0%}), {len(new)} tokens in {stats['rounds'] + 1} target "
              f"forwards]", file=sys.stderr)
    return new


def chat(module, model, tok, args, generator, draft=None):
    """Interactive multi-turn chat with an instruct checkpoint; history is trimmed to fit the context."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    switch = {"enable_thinking": False} if args.no_thinking else {}   # Qwen3: the empty think block, then the answer
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("\n> ")
        except EOFError:
            return
        if not user.strip():
            return
        messages.append({"role": "user", "content": user})
        ids = module.encode_chat(tok, messages, **switch)
        budget = model.config.block_size - args.max_new_tokens
        while len(ids) > budget and len(messages) > 1 + bool(args.system):
            del messages[bool(args.system)]   # drop the oldest turn, keep the system prompt
            ids = module.encode_chat(tok, messages, **switch)
        reply = stream(model, tok, ids, args, generator, draft=draft)
        messages.append({"role": "assistant", "content": tok.decode(reply).strip()})


def parse_args(argv=None):
    p = errors.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="checkpoint directory, hub id (owner/name) or preset (e.g. gpt2-medium)")
    p.add_argument("--model", default=None, help=f"model file to use: {', '.join(MODELS)} (default: from "
                   f"config.json's model_type)")
    p.add_argument("--prompt", default=None, help="prompt text (none: start from the end-of-text token)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this UTF-8 file")
    p.add_argument("--chat", action="store_true", help="interactive chat (instruct checkpoints)")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--no_thinking", action="store_true", help="--chat with Qwen3: answer without thinking first")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--no_cache", action="store_true", help="recompute the full sequence each step")
    p.add_argument("--draft", default=None, help="speculative decoding: a smaller model of the same tokenizer "
                   "(checkpoint directory, hub id or preset) proposes tokens the model checks in one forward")
    p.add_argument("--draft_tokens", type=int, default=4, help="tokens the --draft proposes per round")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--quantize", default=None, help="int8 | int4: weight-only quantization after loading")
    p.add_argument("--rope_scale_factor", type=float, default=None,
                   help="Llama 3.1+ RoPE scale factor for Meta-format checkpoints of unofficial sizes")
    args = p.parse_args(argv)
    validate(args)
    args.top_k = args.top_k or None
    return args


def validate(args):
    """Every flag checked in one place, before anything loads: BadInput names the flag and what it expects."""
    for name, ok, expected in (
            ("temperature", 0 <= args.temperature < math.inf, "a finite number >= 0 (0: greedy)"),
            ("top_p", 0 < args.top_p <= 1, "a number in (0, 1] (1: off)"),
            ("top_k", args.top_k >= 0, "an integer >= 0 (0: off)"),
            ("max_new_tokens", args.max_new_tokens >= 0, "an integer >= 0"),
            ("num_samples", args.num_samples >= 1, "an integer >= 1"),
            ("seed", 0 <= args.seed < 2**64, "an integer in [0, 2**64)"),
            ("draft_tokens", args.draft_tokens >= 1, "an integer >= 1"),
            ("quantize", args.quantize in (None, "int8", "int4"), "int8 or int4"),
            ("rope_scale_factor", args.rope_scale_factor is None or 0 < args.rope_scale_factor < math.inf,
             "a finite number > 0")):
        if not ok:
            raise errors.BadInput(f"--{name} {getattr(args, name)}: expected {expected}")
    if not args.source:
        raise errors.BadInput("the source is empty: expected a checkpoint directory, hub id or preset")
    if args.prompt is not None and args.prompt_file is not None:
        raise errors.BadInput("--prompt and --prompt_file both given: pass one of them")
    if args.chat and (args.prompt is not None or args.prompt_file is not None):
        raise errors.BadInput(f"--{'prompt' if args.prompt is not None else 'prompt_file'} with --chat: the chat "
                              f"reads each turn from the terminal")
    if args.system is not None and not args.chat:
        raise errors.BadInput("--system is the system prompt of --chat: add --chat, or put it in --prompt")
    if args.no_thinking and not args.chat:
        raise errors.BadInput("--no_thinking switches off a chat model's thinking: add --chat")
    for flag in ("draft", "compile"):
        if getattr(args, flag) and args.no_cache:
            raise errors.BadInput(f"--{flag} with --no_cache: it works on the KV cache; drop --no_cache")


def read_prompt(args):
    """The prompt text of --prompt or --prompt_file ('' for none), read before the model loads."""
    if args.prompt_file is None:
        text, flag = args.prompt or "", "--prompt"
    else:
        flag = f"--prompt_file {args.prompt_file}"
        try:
            text = Path(args.prompt_file).read_bytes().decode("utf-8")
        except OSError as e:
            raise errors.BadInput(f"{flag}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise errors.BadInput(f"{flag}: not UTF-8 text (at byte {e.start})") from None
    try:
        text.encode("utf-8")   # argv bytes that are no UTF-8 arrive as lone surrogates, which nothing can encode
    except UnicodeEncodeError:
        raise errors.BadInput(f"{flag}: not valid UTF-8 text (is the terminal's encoding UTF-8?)") from None
    return text


def main(argv=None):
    args = parse_args(argv)
    text = read_prompt(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    extra = {"rope_scale_factor": args.rope_scale_factor} if args.rope_scale_factor is not None else {}
    module, model, tok = load(args.source, family=args.model, device=device, dtype=dtype, chat=args.chat,
                              no_thinking=args.no_thinking, **extra)
    draft = None
    if args.draft is not None:
        _, draft, draft_tok = load(args.draft, device=device, dtype=dtype)
        if draft_tok.vocab != tok.vocab:
            raise errors.BadInput(f"--draft {args.draft}: its tokenizer is not the model's (speculative decoding "
                                  f"needs the same token ids)")
    if args.quantize:
        for m in (model, draft) if draft is not None else (model,):
            quantize(m, args.quantize)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.chat:
        return chat(module, model, tok, args, generator, draft)
    ids = tok.encode(text, allowed_special="all") if text else []
    if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id] + ids
    if not ids:
        start = tok.bos_id if tok.bos_id is not None else next(iter(sorted(eos_ids_of(model, tok))), None)
        if start is None:
            raise errors.BadInput("the prompt is empty and the tokenizer has no BOS or end-of-text token to start "
                                  "from: pass --prompt")
        ids = [start]
    if max(ids) >= model.config.vocab_size:
        raise errors.BadInput(f"prompt token id {max(ids)} is beyond the model's vocab_size "
                              f"{model.config.vocab_size}: the tokenizer beside the weights is not the model's")
    for i in range(args.num_samples):
        if i:
            print("\n---------------")
        sys.stdout.write(text)
        stream(model, tok, ids, args, generator, draft=draft)
    print()


if __name__ == "__main__":
    errors.run(main)
