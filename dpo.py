"""Preference tuning with DPO: pairs of replies to one prompt, the better one raised against the worse.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model":
  - the policy's implicit reward of a reply y to a prompt x is r = beta * (log pi(y|x) - log pi_ref(y|x)), with
    pi_ref the frozen starting model; no reward model and no sampling, only two forwards per pair;
  - loss = -log sigmoid(r_chosen - r_rejected), the Bradley-Terry likelihood of the human preference;
  - log pi(y|x) sums the log-probabilities of the reply's tokens only: the prompt is given, not generated.

Data: a JSONL file, one pair a line, {"prompt": <text>, "chosen": <reply>, "rejected": <reply>} or, with a chat
model, {"messages": [<the conversation before the reply>], "chosen": ..., "rejected": ...}. A reply is text or
one message {"role": "assistant", "content": <text>}. A chat model (one with encode_chat) frames a "prompt" text
as one user turn; the reply spans its text and end-of-turn token. gpt2.py has no chat format: the prompt text,
then the reply text, then <|endoftext|>. Rows longer than max_len lose the end of their reply.

    out = dpo.prepare("pairs.jsonl", "llama3", "out/sft/last")     # with the tokenizer of the model to tune
    data = dpo.PreferenceData(out, json.loads((out / "meta.json").read_text()), model.config.vocab_size)
    loss, stats = dpo.loss(model, data.batch("train", seed, 8), lambda ids: reference(ids)[0], beta=0.1)
"""
import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint_io
import prepare_data
import sample
from errors import BadInput

SPLITS = ("train", "val")
ARRAYS = ("chosen", "rejected", "prompt_len", "chosen_len", "rejected_len")   # {split}.{name}.npy
# what a preference dataset directory holds: prepare_data.check_target's test that a rerun may replace it
FILES = {"tokenizer", "meta.json"} | {f"{s}.{a}.npy" for s in SPLITS for a in ARRAYS}


# -----------------------------------------------------------------------------------------------------------
# Reading and tokenizing the pairs


def read_pairs(path, module):
    """[(where, prompt, chosen, rejected)] of a JSONL file, each line checked; where is "file:line", prompt a
    list of messages (for a chat model: encode_chat checks each) or a text, chosen and rejected texts."""
    pairs, chat = [], hasattr(module, "encode_chat")
    expected = 'a JSON object with "prompt" or "messages" (one of them), "chosen" and "rejected"'
    for n, obj in prepare_data.jsonl_objects(path, expected):
        where = f"{path}:{n}"
        if ("prompt" in obj) == ("messages" in obj):
            raise BadInput(f"{where}: expected {expected}")
        if "messages" in obj and not chat:
            raise BadInput(f'{where}: "messages" needs a chat format, and {module.__name__}.py has none: give '
                           f'"prompt" text')
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"]:
                raise BadInput(f'{where}: "prompt": expected a non-empty string')
            prompt = [{"role": "user", "content": obj["prompt"]}] if chat else obj["prompt"]
        else:
            prompt = obj["messages"]
            if not isinstance(prompt, list):
                raise BadInput(f'{where}: "messages": expected a list of {{"role": <string>, "content": <string>}}')
        replies = [_reply_text(obj, key, where) for key in ("chosen", "rejected")]
        if replies[0] == replies[1]:
            raise BadInput(f"{where}: chosen and rejected are the same text: nothing to prefer")
        pairs.append((where, prompt, *replies))
    if len(pairs) < 2:
        raise BadInput(f"{path}: {len(pairs)} preference pairs; need at least 2 (train and val)")
    return pairs


def _reply_text(obj, key, where):
    reply = obj.get(key)
    if isinstance(reply, dict) and reply.get("role") == "assistant" and set(reply) == {"role", "content"}:
        reply = reply["content"]
    if not isinstance(reply, str) or not reply:
        raise BadInput(f'{where}: "{key}": expected a non-empty string or {{"role": "assistant", "content": '
                       f'<string>}}')
    return reply


def encode_pair(module, tok, eot, pair, max_len):
    """(prompt length, chosen row, rejected row): each row the prompt's ids then the reply's, cut to max_len."""
    where, prompt, *replies = pair
    try:
        if hasattr(module, "encode_chat"):
            # as prepare_data.chat_example: the reply is what encoding through it adds to the generation prompt
            before = module.encode_chat(tok, prompt, add_generation_prompt=True)
            rows = [module.encode_chat(tok, prompt + [{"role": "assistant", "content": r}],
                                       add_generation_prompt=False) for r in replies]
        else:
            # prompt and reply encoded apart, as sampling sees them: a merge across the seam would move it
            before = tok.encode(prompt, allowed_special="none")
            rows = [before + tok.encode(r, allowed_special="none") + [eot] for r in replies]
    except ValueError as e:   # encode_chat's refusal of a message (a role it has no turn for, a late system)
        raise BadInput(f"{where}: {e}") from None
    if any(row[:len(before)] != before for row in rows):
        raise ValueError(f"{where}: {module.__name__}.encode_chat is not prefix-stable, cannot find the replies")
    if len(before) >= max_len:
        raise BadInput(f"{where}: the prompt alone is {len(before)} tokens, leaving no room for a reply in "
                       f"max_len {max_len}")
    chosen, rejected = (row[:max_len] for row in rows)
    if chosen == rejected:   # a chat format may strip the texts apart; truncation may cut where they differ
        cut = f" after truncation to max_len {max_len}" if rows[0] != rows[1] else ""
        raise BadInput(f"{where}: chosen and rejected are the same tokens{cut}: nothing to prefer")
    return len(before), chosen, rejected



def prepare(path, model, tokenizer, name=None, out_dir="data", val_fraction=0.1, max_len=512):
    """Tokenize a JSONL file of preference pairs into out_dir/name; returns the output directory."""
    prepare_data.check_fraction(val_fraction)
    if model not in sample.MODELS:
        raise BadInput(f"--model {model!r}: expected one of the model files here: {', '.join(sample.MODELS)}")
    if not (isinstance(max_len, int) and max_len >= 2):
        raise BadInput(f"--max_len {max_len}: expected an integer >= 2 (a prompt token and a reply token)")
    if tokenizer == "bpe":
        raise BadInput("--tokenizer bpe: preference tuning continues a trained model; give its tokenizer (bytes, "
                       "gpt2, or a model directory or hub id)")
    prepare_data.check_tokenizer(tokenizer, None)
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--dpo_jsonl {path}: {'is a directory' if path.is_dir() else 'no such file'}; expected a "
                       f"JSONL file")
    module = importlib.import_module(model)
    chat = hasattr(module, "encode_chat")
    out = prepare_data.check_target(out_dir, name or path.stem)
    pairs = read_pairs(path, module)
    with prepare_data.building(out) as tmp:
        tok, eot = prepare_data.get_tokenizer(tokenizer, [], 0, None, tmp / "tokenizer")
        if chat:
            try:   # does the tokenizer have the model's chat tokens? (encode_chat names those it lacks)
                module.encode_chat(tok, [], add_generation_prompt=True)
            except (ValueError, BadInput) as e:
                raise BadInput(f"--tokenizer {tokenizer}: {e} (for --model {model})") from None
        if not chat and eot is None:
            raise BadInput(f"--tokenizer {tokenizer}: has no end-of-text token to end a reply with")
        n_val = max(1, int(len(pairs) * val_fraction))
        for split, part in (("train", pairs[:-n_val]), ("val", pairs[-n_val:])):
            prompt_len, *replies = zip(*(encode_pair(module, tok, eot, pair, max_len) for pair in part))
            checkpoint_io.save_npy(tmp / f"{split}.prompt_len.npy", np.array(prompt_len, dtype=np.int64))
            width = max(map(len, replies[0] + replies[1]))
            for key, rows in zip(("chosen", "rejected"), replies):
                # right-padded with 0: causal attention keeps a pad from every real position before it, and the
                # mask keeps it out of the loss
                padded = np.zeros((len(rows), width), dtype=np.int32)
                for r, row in enumerate(rows):
                    padded[r, :len(row)] = row
                checkpoint_io.save_npy(tmp / f"{split}.{key}.npy", padded)
                checkpoint_io.save_npy(tmp / f"{split}.{key}_len.npy",
                                       np.array([len(row) for row in rows], dtype=np.int64))
        meta = {"task": "preference", "dataset": str(path), "tokenizer": tokenizer, "chat_model": model if chat
                else None, "vocab_size": tok.vocab_size, "eot_id": eot, "max_len": max_len,
                "n_train": len(pairs) - n_val, "n_val": n_val}
        checkpoint_io.write_json(tmp / "meta.json", meta)
    print(f"wrote {out}: {len(pairs) - n_val:,} train and {n_val:,} val preference pairs")
    return out


# -----------------------------------------------------------------------------------------------------------
# Batches


class PreferenceData:
    """The arrays prepare() wrote, checked; batches of chosen rows over rejected rows with their reply masks."""

    def __init__(self, directory, meta, vocab_size):
        directory = Path(directory)
        for key in ("n_train", "n_val", "max_len", "vocab_size"):
            if not (isinstance(meta.get(key), int) and meta[key] >= 1):
                raise BadInput(f"{directory / 'meta.json'}: {key} is {meta.get(key)!r}, expected a positive integer")
        if meta["vocab_size"] > vocab_size:
            raise BadInput(f"--data {directory}: tokenizer vocabulary {meta['vocab_size']} exceeds the model's "
                           f"vocab_size {vocab_size}")
        self.arrays = {split: {a: self._load(directory / f"{split}.{a}.npy", meta[f"n_{split}"], meta)
                               for a in ARRAYS} for split in SPLITS}
        self.seq_len = max(d[k].shape[1] for d in self.arrays.values() for k in ("chosen", "rejected"))   # widest
        for split, d in self.arrays.items():
            for key in ("chosen", "rejected"):
                n = d[f"{key}_len"]
                if not ((d["prompt_len"] >= 1) & (d["prompt_len"] < n) & (n <= d[key].shape[1])).all():
                    raise BadInput(f"--data {directory / f'{split}.{key}_len.npy'}: a row whose lengths do not "
                                   f"hold 1 <= prompt_len < {key}_len <= its width; prepare it again")
                if d[key].size and not 0 <= d[key].min() <= d[key].max() < meta["vocab_size"]:
                    raise BadInput(f"--data {directory / f'{split}.{key}.npy'}: a token id outside the vocabulary "
                                   f"of {meta['vocab_size']}")

    @staticmethod
    def _load(path, n, meta):
        ids = not path.name.endswith("_len.npy")
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BadInput(f"--data {path}: {'missing' if not path.is_file() else e}; run prepare_data.py "
                           f"again") from None
        dtype, ndim, shape = (np.int32, 2, f"({n}, <= max_len {meta['max_len']})") if ids else (np.int64, 1, f"({n},)")
        if a.dtype != dtype or a.ndim != ndim or a.shape[0] != n or ids and a.shape[1] > meta["max_len"]:
            raise BadInput(f"--data {path}: {a.dtype} {a.shape}, but meta.json says {np.dtype(dtype)} {shape}: a "
                           f"file of another run? prepare it again")
        return a

    def n(self, split):
        return len(self.arrays[split]["prompt_len"])

    def batch(self, split, seed, batch_size, part=0, parts=1):
        """Slice `part` of `parts` of the global batch of pairs drawn with `seed`, as train.TokenData draws:
        ids (2B, L) int64, the B chosen rows then their B rejected rows, and mask (2B, L) bool, True where ids
        holds a reply token (so never at position 0: every reply follows its prompt). L: the longest row here."""
        g = torch.Generator().manual_seed(seed)
        ix = torch.randint(self.n(split), (batch_size * parts,), generator=g).numpy()
        return self.rows(split, ix[part * batch_size:(part + 1) * batch_size])   # the same pairs for any parts

    def rows(self, split, ix):
        """The batch of the pairs at indices ix (train.py's evaluation walks the whole val split with it)."""
        d, ix = self.arrays[split], np.asarray(ix)
        ends = np.concatenate([d["chosen_len"][ix], d["rejected_len"][ix]])                    # (2B,)
        starts = np.concatenate([d["prompt_len"][ix]] * 2)                                     # (2B,)
        width = int(ends.max())
        ids = np.concatenate([d["chosen"][ix, :width], d["rejected"][ix, :width]])            # (2B, L)
        t = np.arange(width)
        mask = (t >= starts[:, None]) & (t < ends[:, None])                                   # (2B, L)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)


# -----------------------------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits, ids, mask):
    """(R,) summed log-probabilities of the tokens where mask is True, each predicted from the one before it."""
    # logits (R, L, V): position t predicts ids[:, t + 1]; ids, mask (R, L). fp32: bf16 logits lose the small
    # differences between policy and reference that the rewards are made of
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)                # (R, L-1, V)
    token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)               # (R, L-1)
    return torch.where(mask[:, 1:], token, 0.0).sum(-1)                 # (R,)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO's loss from (B,) sequence log-probabilities, and its statistics (detached 0-dim tensors)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)                 # (B,) the implicit rewards
    rejected_reward = beta * (policy_rejected - ref_rejected)           # (B,)
    margin = chosen_reward - rejected_reward
    stats = {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean(),
             "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
    return -F.logsigmoid(margin).mean(), {k: v.detach() for k, v in stats.items()}


def loss(model, batch, reference, beta):
    """DPO loss of a batch from PreferenceData.batch. model(ids) -> (logits, loss) is called once on all 2B rows
    (one forward per backward, as DDP needs); reference(ids) -> logits, the frozen starting model."""
    ids, mask = batch
    B = ids.size(0) // 2
    with torch.no_grad():   # first: its logits are reduced to (2B,) before the policy's graph takes memory
        ref = sequence_logps(reference(ids), ids, mask)
    logps = sequence_logps(model(ids)[0], ids, mask)
    return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta)
