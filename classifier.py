"""Sequence classification for every model family here, in the layout of transformers' XForSequenceClassification.

    >>> out = classifier.prepare("reviews.csv", "bytes")   # data/reviews: {train,val}.{ids,labels}.npy, meta.json
    >>> data = classifier.ClassData(out)                     # data.labels ['neg', 'pos'], data.pad_id 256
    >>> model = classifier.attach_head(gpt2.GPT(gpt2.Config(vocab_size=257)), len(data.labels))
    >>> loss, stats = classifier.loss(model, data.batch("train", seed=0, batch_size=16), data.pad_id)
    >>> classifier.save_pretrained(model, "out/cls", data.labels, data.pad_id)   # AutoModelForSequenceClassification

  - the head is transformers' `score`, a Linear without bias from the last hidden state to num_labels, put where the
    model file has its lm_head: the model's own forward gives per-token class logits, unchanged model files;
  - a sequence is read at its last non-pad token (transformers' rule, pad = the end-of-text id): with causal attention
    the right padding after it changes nothing, so batches are padded on the right;
  - prepare() takes CSV or JSONL of (text, label): labels are strings, sorted (numerically when all are integers, so
    labels 0..K-1 keep their ids), from the train split; the last val_fraction of the examples is val;
  - no router balance loss is added for MoE models, as in transformers' classification heads.
"""
import csv
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
import checkpoint_io
import prepare_data
from errors import BadInput

SPLITS = ("train", "val")


# -----------------------------------------------------------------------------------------------------------
# The dataset: {split}.ids.npy (N, L) int32 padded on the right with pad_id, {split}.labels.npy (N,) int64


def read_examples(path, text_field, label_field):
    """[(line, text, label)] of a CSV (a header row names the columns) or JSONL file, each checked; JSONL ints
    become their str, so that a label reads the same from either format."""
    text, examples = bpe.read_text(path).removeprefix("\ufeff"), []   # spreadsheets start CSV files with a BOM
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            columns = reader.fieldnames or []
            for field in (text_field, label_field):
                if field not in columns:
                    raise BadInput(f"{path}: no column {field!r} (columns: {', '.join(columns) or 'none'})")
            examples = [(reader.line_num, row[text_field], row[label_field]) for row in reader]   # None: a short row
        except csv.Error as e:   # a NUL byte, a field over csv.field_size_limit()
            raise BadInput(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    else:
        for n, obj in prepare_data.jsonl_objects(path, f"a JSON object with {text_field!r} and {label_field!r}", text):
            label = obj.get(label_field)
            label = str(label) if type(label) is int else label
            examples.append((n, obj.get(text_field), label))
    for n, *values in examples:
        for field, value in zip((text_field, label_field), values):
            if not isinstance(value, str) or not value.strip():
                got = "missing" if value is None else "empty" if isinstance(value, str) else type(value).__name__
                raise BadInput(f"{path}:{n}: {field!r} is {got}; expected a non-empty string"
                               f"{' or an integer' if field == label_field else ''}")
    return examples


def sorted_labels(labels):
    """['neg', 'pos'] stays; ['10', '2', '0'] -> ['0', '2', '10']: integer labels by value, so '0'..'K-1' keep ids."""
    numeric = all(re.fullmatch(r"-?\d+", s) for s in labels)
    return sorted(set(labels), key=int if numeric else None)


def prepare(path, tokenizer, text_field="text", label_field="label", name=None, out_dir="data", val_fraction=0.1,
            max_len=256, gpt2_dir=None, vocab_size=4096):
    """Tokenize a CSV or JSONL file of (text, label) into data/<name>/; returns the output directory."""
    prepare_data.check_fraction(val_fraction)
    if not (type(max_len) is int and max_len >= 1):
        raise BadInput(f"--max_len {max_len}: expected an integer >= 1 (tokens per text)")
    if tokenizer == "bpe" and not (type(vocab_size) is int and vocab_size >= 257):
        raise BadInput(f"--vocab_size {vocab_size}: a byte-level BPE needs at least 256 + 1 (end-of-text)")
    prepare_data.check_tokenizer(tokenizer, gpt2_dir)
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".json") or not path.is_file():
        raise BadInput(f"{path}: {'no such file' if not path.exists() else 'not a .csv, .jsonl or .json file'}; "
                       f"expected a CSV with a header row or JSON lines")
    out = prepare_data.check_target(out_dir, name or path.stem)
    examples = read_examples(path, text_field, label_field)
    if len(examples) < 2:
        raise BadInput(f"{path}: {len(examples)} examples; need at least 2 (train and val)")
    n_val = max(1, int(len(examples) * val_fraction))
    splits = dict(train=examples[:-n_val], val=examples[-n_val:])
    labels = sorted_labels([label for _, _, label in splits["train"]])
    if len(labels) < 2:
        raise BadInput(f"{path}: the train split has {len(labels)} label ({labels[0]!r}); need at least 2 to classify")
    ids_of = {label: i for i, label in enumerate(labels)}
    for n, _, label in splits["val"]:
        if label not in ids_of:
            raise BadInput(f"{path}:{n}: val label {label!r} is not in the train split's labels {labels}")
    with prepare_data.building(out) as tmp:
        tok, pad_id = prepare_data.get_tokenizer(tokenizer, [(f"{path}:{n}", t) for n, t, _ in splits["train"]],
                                                 vocab_size, gpt2_dir, tmp / "tokenizer")
        if pad_id is None:
            raise BadInput(f"--tokenizer {tokenizer}: has no end-of-text or end-of-sequence token to pad with")
        try:
            encoding = tok.to_tiktoken()
        except ValueError as e:
            raise BadInput(f"--tokenizer {tokenizer}: {e}") from None
        encoded = {s: encoding.encode_ordinary_batch([t for _, t, _ in ex]) for s, ex in splits.items()}
        truncated = sum(len(ids) > max_len for split in encoded.values() for ids in split)
        width = min(max_len, max(len(ids) for split in encoded.values() for ids in split))
        for split, rows in encoded.items():
            ids = np.full((len(rows), width), pad_id, dtype=np.int32)
            for i, row in enumerate(rows):
                ids[i, :min(len(row), width)] = row[:width]   # the first tokens: a text's start says most of it
            checkpoint_io.save_npy(tmp / f"{split}.ids.npy", ids)
            checkpoint_io.save_npy(tmp / f"{split}.labels.npy",
                                   np.array([ids_of[lb] for _, _, lb in splits[split]], np.int64))
        meta = {"task": "classification", "dataset": str(path), "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
                "labels": labels, "pad_id": pad_id, "max_len": max_len, "seq_len": width, "text_field": text_field,
                "label_field": label_field, "n_train": len(splits["train"]), "n_val": n_val, "truncated": truncated}
        checkpoint_io.write_json(tmp / "meta.json", meta)
    print(f"wrote {out}: {meta['n_train']:,} train and {n_val:,} val examples, {len(labels)} labels, {width} tokens "
          f"wide ({truncated} texts cut to --max_len {max_len})")
    return out



class ClassData:
    """The examples of a prepared dataset, checked on opening; batches are drawn as train.py's TokenData draws."""

    def __init__(self, directory, meta=None, vocab_size=None):
        directory = Path(directory)
        where = directory / "meta.json"
        self.meta = meta = meta or checkpoint_io.read_json(where)
        if not isinstance(meta, dict) or meta.get("task") != "classification":
            raise BadInput(f"{where}: not a classification dataset (no \"task\": \"classification\")")
        positive = lambda v: type(v) is int and v >= 1
        for key, ok, expected in (
                ("labels", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(s, str) for s in v),
                 "a list of at least 2 strings"), ("vocab_size", positive, "an integer >= 1"),
                ("pad_id", lambda v: type(v) is int and 0 <= v < meta["vocab_size"], "a token id"),
                ("n_train", positive, "an integer >= 1"), ("n_val", positive, "an integer >= 1")):
            if not ok(meta.get(key)):
                raise BadInput(f"{where}: {key} is {meta.get(key)!r:.60}, expected {expected}")
        if vocab_size is not None and meta["vocab_size"] > vocab_size:
            raise BadInput(f"--data {directory}: tokenizer vocabulary {meta['vocab_size']} exceeds the model's "
                           f"vocab_size {vocab_size}")
        self.labels, self.pad_id, self.ids, self.targets = meta["labels"], meta["pad_id"], {}, {}
        for split in SPLITS:
            ids, targets = (load_npy(directory / f"{split}.{kind}.npy") for kind in ("ids", "labels"))
            n = meta[f"n_{split}"]
            if ids.dtype != np.int32 or ids.ndim != 2 or len(ids) != n or ids.shape[1] < 1:
                raise BadInput(f"{directory / f'{split}.ids.npy'}: {ids.dtype} {ids.shape}, meta.json says ({n}, L) "
                               f"int32: a file of another run? prepare it again")
            if targets.dtype != np.int64 or targets.shape != (n,):
                raise BadInput(f"{directory / f'{split}.labels.npy'}: {targets.dtype} {targets.shape}, meta.json "
                               f"says ({n},) int64: a file of another run? prepare it again")
            if not (0 <= ids.min() and ids.max() < (vocab_size or meta["vocab_size"])):
                raise BadInput(f"{directory / f'{split}.ids.npy'}: token id {ids.max()} beyond the vocabulary")
            if not (0 <= targets.min() and targets.max() < len(self.labels)):
                raise BadInput(f"{directory / f'{split}.labels.npy'}: class {targets.max()} beyond the "
                               f"{len(self.labels)} labels of meta.json")
            self.ids[split], self.targets[split] = torch.from_numpy(ids), torch.from_numpy(targets)
        self.seq_len = max(ids.size(1) for ids in self.ids.values())   # the widest example

    def n(self, split):
        return len(self.targets[split])

    def batch(self, split, seed, batch_size, part=0, parts=1):
        """Slice `part` of `parts` of the global batch drawn with `seed`: (B, L) ids and (B,) labels, int64."""
        g = torch.Generator().manual_seed(seed)
        ix = torch.randint(self.n(split), (batch_size * parts,), generator=g)[part * batch_size:(part + 1) * batch_size]
        return self.rows(split, ix)

    def rows(self, split, ix):
        """The examples at indices ix (train.py's evaluation walks the whole val split with it)."""
        ix = torch.as_tensor(ix, dtype=torch.long)
        return self.ids[split][ix].long(), self.targets[split][ix]


def load_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput(f"{path}: not found (run prepare_data.py again)") from None
    except (OSError, ValueError) as e:   # a truncated file, a pickle, a foreign header
        raise BadInput(f"{path}: not a readable .npy array ({e})") from None


# -----------------------------------------------------------------------------------------------------------
# The head, the pooling and the loss


def attach_head(model, num_labels):
    """model.lm_head := score, Linear(n_embd, num_labels, bias=False) ~ N(0, 0.02) as transformers initializes it.
    A head tied to the embedding (GPT-2, small Llama/Qwen) is untied by the new module; the embedding stays."""
    if getattr(model.config, "mtp_loss_weight", 0) > 0:
        raise ValueError("a DeepSeek model with multi-token prediction (mtp_loss_weight > 0): a classifier has no "
                         "next tokens to predict; build it with mtp_loss_weight=0")
    weight = model.lm_head.weight
    model.lm_head = nn.Linear(model.config.n_embd, num_labels, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(model.lm_head.weight, mean=0.0, std=0.02)
    model.num_labels = num_labels
    return model


def last_token(ids, pad_id):
    """transformers' rule: the rightmost position whose id is not pad_id (0 when all are). [[5, 7, P, P]] -> [1]"""
    positions = torch.arange(ids.size(1), device=ids.device)
    return (positions * (ids != pad_id)).argmax(-1)


def pooled_logits(model, ids, pad_id):
    """(B, num_labels) class logits of ids (B, T), read at each row's last non-pad token."""
    logits, _ = model(ids)                                                  # (B, T, num_labels)
    return logits[torch.arange(ids.size(0), device=ids.device), last_token(ids, pad_id)]


def loss(model, batch, pad_id):
    """(cross-entropy, {"accuracy"}) of a batch (ids, labels); one call of model, which may be a DDP wrapper."""
    ids, labels = batch
    logits = pooled_logits(model, ids, pad_id).float()
    return F.cross_entropy(logits, labels), {"accuracy": (logits.argmax(-1) == labels).float().mean().detach()}


# -----------------------------------------------------------------------------------------------------------
# Checkpoints in transformers' layout: the body as the model file writes it, score.weight, a classifier config


def save_pretrained(model, directory, labels, pad_id):
    """The model file's save, then its weights again without the LM head and with score.weight, under the key
    prefix of transformers' class (GPT-2's body is `transformer.`); config.json gets the classifier's keys."""
    directory = Path(directory)
    model.save_pretrained(directory)
    hf = checkpoint_io.read_json(directory / "config.json")
    prefix = "transformer." if hf["model_type"] == "gpt2" else ""   # the others' keys already start with model.
    state = {prefix + k: v for k, v in checkpoint_io.load_safetensors(directory).items()
             if k != "lm_head.weight"}   # an untied head was written with the score's shape: it is the score
    checkpoint_io.save_safetensors(state | {"score.weight": model.lm_head.weight.detach().cpu()}, directory)
    architecture = re.sub(r"(LMHeadModel|ForCausalLM)$", "ForSequenceClassification", hf["architectures"][0])
    checkpoint_io.write_json(directory / "config.json", hf | {
        "architectures": [architecture], "num_labels": len(labels), "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)}, "pad_token_id": pad_id})


def from_pretrained(module, directory, *, dtype=None, device=None):
    """Our model (module: gpt2, llama3, qwen or deepseek) with its head, from a save_pretrained directory or one that
    transformers' XForSequenceClassification.save_pretrained wrote."""
    directory = Path(directory)
    hf = checkpoint_io.read_json(directory / "config.json")
    state = checkpoint_io.load_safetensors(directory)
    score = state.pop("score.weight", None)
    if score is None:
        raise BadInput(f"{directory}: weights lack key 'score.weight' (not a sequence classifier checkpoint)")
    num_labels = hf.get("num_labels", len(hf.get("id2label") or {}))
    if score.dim() != 2 or score.size(0) != num_labels:
        raise BadInput(f"{directory / 'config.json'}: num_labels {num_labels} disagrees with the weights' "
                       f"'score.weight' of shape {tuple(score.shape)}")
    # the model files refuse a key they do not know (score.weight) and an untied head the file lacks: they read a
    # body-only copy, with the head declared tied (it is replaced next)
    with tempfile.TemporaryDirectory(prefix="classifier-") as body:
        checkpoint_io.save_safetensors(state, body)
        checkpoint_io.write_json(Path(body) / "config.json", hf | {"tie_word_embeddings": True})
        model = module.Model.from_pretrained(body, dtype=dtype)
    if hasattr(model.config, "tie_word_embeddings"):   # as the file says (the default of from_hf), for the next save
        model.config.tie_word_embeddings = hf.get("tie_word_embeddings", False)
    attach_head(model, num_labels)
    with torch.no_grad():
        model.lm_head.weight.copy_(score)
    return model.to(device) if device is not None else model
