"""Turn text into token shards: data/<name>/train.bin, val.bin (flat token ids) and meta.json.

    python prepare_data.py                                   # default: Python's own stdlib sources, BPE 4096
    python prepare_data.py --dataset shakespeare --tokenizer gpt2
    python prepare_data.py --input notes/ --name notes --tokenizer bytes
    python prepare_data.py --input book.txt --tokenizer openai-community/gpt2   # a model's own tokenizer

Datasets:
  stdlib       the .py files of the running Python's standard library: needs nothing but the machine.
               Files are taken in sorted order up to --max_mb; each file goes to val or train by a hash of
               its relative path, so the split is by file and the same on every run.
  shakespeare  tinyshakespeare (downloaded once into the cache); the last --val_fraction is val.
  --input      any local text file (split by position) or folder of text files (split by file).

Tokenizers: bytes (256 byte ids + <|endoftext|>), bpe (trained here on the train split, cached by corpus
and settings), gpt2 (the official encoder.json + vocab.bpe, downloaded once or read from --gpt2_dir), or a
model directory / hub id (that model's own tokenizer, to fine-tune official weights on new text).

Each document ends with the end-of-text token. Ids are stored as uint16 when the vocabulary fits, else uint32.
The tokenizer's files are written to data/<name>/tokenizer/, from where train.py copies them into checkpoints.

Instruction data (--chat_jsonl, one {"messages": [{"role", "content"}, ...]} per line) is tokenized with the
model's own chat format (--model, its encode_chat) and gets a loss mask beside the tokens: train.mask.bin
holds 1 for the tokens of the assistant's replies (their text and end-of-turn token), 0 elsewhere, so
train.py computes the loss on the replies only (targets = -100 elsewhere).
"""
import argparse
import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

import bpe
import hub

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}
EOT = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h", ".js", ".ts"}


# -----------------------------------------------------------------------------------------------------------
# Documents: each dataset is a list of (name, source) for train and for val, where source is the text itself or
# the Path of a file read only when it is encoded, so a folder larger than memory streams through in batches


def stdlib_documents(max_mb, val_fraction):
    root = Path(os.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    return _split_files(files, root, max_mb, val_fraction)


def folder_documents(folder, max_mb, val_fraction):
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise SystemExit(f"error: --input {folder}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) found")
    return _split_files(files, Path(folder), max_mb, val_fraction)


def _split_files(files, root, max_mb, val_fraction):
    train, val, total = [], [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_mb * 2**20:
            break
        total += size
        rel = path.relative_to(root).as_posix()
        bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 2**32
        (val if bucket < val_fraction else train).append((rel, path))
    if not val and len(train) > 1:   # a tiny folder: keep at least one file for validation
        val.append(train.pop())
    return train, val


def file_documents(path, val_fraction):
    text = _read_text(Path(path))
    cut = int(len(text) * (1 - val_fraction))
    return [(str(path), text[:cut])], [(str(path), text[cut:])]


def _read_text(path):
    """Read UTF-8 text; undecodable bytes become U+FFFD (stdlib and user folders hold a few latin-1 files)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def text_of(source):
    return _read_text(source) if isinstance(source, Path) else source


# -----------------------------------------------------------------------------------------------------------
# Tokenizers


def get_tokenizer(spec, train_docs, vocab_size, gpt2_dir, tok_dir):
    """Build the tokenizer named by spec and write its files into tok_dir; returns (tokenizer, eot_id)."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    if spec == "bytes":
        tok = bpe.train("", 256 + 1, special_tokens={EOT: 256})
        tok.save(tok_dir / bpe.SAVE_NAME)
    elif spec == "bpe":
        tok = _trained_bpe(train_docs, vocab_size)
        tok.save(tok_dir / bpe.SAVE_NAME)
    elif spec == "gpt2":
        src = Path(gpt2_dir) if gpt2_dir else _fetch_gpt2_files()
        for name in GPT2_URLS:
            if not (src / name).is_file():
                raise SystemExit(f"error: --gpt2_dir {src} has no {name} (expected encoder.json and vocab.bpe)")
            shutil.copyfile(src / name, tok_dir / name)
        tok = bpe.load(tok_dir)
    else:
        src = Path(hub.resolve(spec))
        tok = bpe.load(src)
        for path in [*src.iterdir(), src / "original" / "tokenizer.model"]:   # Meta's layout keeps it in original/
            if path.name in bpe.TOKENIZER_FILES and path.is_file() and not (tok_dir / path.name).exists():
                shutil.copyfile(path, tok_dir / path.name)
    eot = tok.special_tokens.get(EOT)
    if eot is None:
        eot = tok.eos_ids[0] if tok.eos_ids else None
    return tok, eot


def _trained_bpe(train_docs, vocab_size):
    """Train BPE on the train split, cached by a hash of the corpus and the settings."""
    texts = [text_of(source) for _, source in train_docs]
    h = hashlib.sha256(f"{vocab_size}|gpt2|{EOT}".encode())
    for (name, _), text in zip(train_docs, texts):
        h.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace"))
    cached = hub.CACHE_DIR / "bpe" / f"{h.hexdigest()[:16]}-{vocab_size}" / bpe.SAVE_NAME
    if cached.is_file():
        print(f"using cached tokenizer {cached}")
        return bpe.load(cached)
    print(f"training a {vocab_size}-token BPE on {sum(map(len, texts)) / 2**20:.1f} MB ...")
    tok = bpe.train(texts, vocab_size, pattern="gpt2", special_tokens={EOT: vocab_size - 1})
    cached.parent.mkdir(parents=True, exist_ok=True)
    tok.save(cached)
    return tok


def _fetch_gpt2_files():
    folder = hub.CACHE_DIR / "gpt2-encoding"
    for name, url in GPT2_URLS.items():
        if not (folder / name).is_file():
            hub.fetch_url(url, folder / name)
    return folder


# -----------------------------------------------------------------------------------------------------------
# Writing the shards


def write_split(docs, encoding, eot, dtype, path):
    """Encode documents in bulk (tiktoken speed), each followed by eot; write atomically; return #tokens.
    (Streamed to a temp file rather than through hub.atomic_write, so the shard never sits whole in memory.)"""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for start in range(0, len(docs), 256):
            batch = encoding.encode_ordinary_batch([text_of(source) for _, source in docs[start:start + 256]])
            for ids in batch:
                if eot is not None:
                    ids.append(eot)
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


# -----------------------------------------------------------------------------------------------------------
# Instruction data: chat-formatted tokens and the mask of the assistant's replies


def chat_example(module, tok, messages, where):
    """(ids, mask) of one conversation: mask[i] = 1 where ids[i] belongs to an assistant reply.

    Each reply's span is found by encoding the dialog up to the reply's generation prompt and through the reply:
    what the second adds to the first is the reply (with its end-of-turn token).
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
    ids = module.encode_chat(tok, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = module.encode_chat(tok, messages[:i], add_generation_prompt=True)
        through = module.encode_chat(tok, messages[:i + 1], add_generation_prompt=False)
        if through[:len(before)] != before or ids[:len(through)] != through:
            raise ValueError(f"{where}: {module.__name__}.encode_chat is not prefix-stable, cannot mask the replies")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def prepare_chat(path, model, tokenizer, name=None, out_dir="data", val_fraction=0.05):
    """Tokenize a JSONL file of conversations for supervised fine-tuning; returns the output directory."""
    module = importlib.import_module(model)
    if not hasattr(module, "encode_chat"):
        raise SystemExit(f"error: --model {model}: {model}.py has no chat format (encode_chat)")
    path = Path(path)
    examples = []
    for n, line in enumerate(bpe.read_text(path).splitlines(), 1):
        if line.strip():
            try:
                examples.append(json.loads(line)["messages"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"error: {path}:{n}: not a JSON object with a \"messages\" list ({e})")
    if len(examples) < 2:
        raise SystemExit(f"error: {path}: {len(examples)} conversations; need at least 2 (train and val)")
    out = Path(out_dir) / (name or path.stem)
    out.mkdir(parents=True, exist_ok=True)
    tok, eot = get_tokenizer(tokenizer, [], 0, None, out / "tokenizer")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    n_val = max(1, int(len(examples) * val_fraction))
    counts = {}
    for split, part, first in (("train", examples[:-n_val], 1), ("val", examples[-n_val:], len(examples) - n_val + 1)):
        pairs = [chat_example(module, tok, m, f"{path}:{first + i}") for i, m in enumerate(part)]
        ids = np.asarray([t for p, _ in pairs for t in p], dtype=dtype)
        hub.atomic_write(out / f"{split}.bin", ids.tobytes())
        hub.atomic_write(out / f"{split}.mask.bin", np.asarray([b for _, m in pairs for b in m], dtype=np.uint8).tobytes())
        counts[split] = len(ids)
    meta = {"dataset": str(path), "tokenizer": tokenizer, "chat_model": model, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "eot_id": eot, "loss_mask": True, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "train_docs": len(examples) - n_val, "val_docs": n_val}
    hub.write_json(out / "meta.json", meta)
    print(f"wrote {out}: {counts['train']:,} train and {counts['val']:,} val tokens of {len(examples)} conversations")
    return out


def prepare(dataset="stdlib", input=None, name=None, tokenizer="bpe", vocab_size=4096, out_dir="data",
            max_mb=8.0, val_fraction=0.05, gpt2_dir=None):
    """Prepare one dataset; returns the output directory. Used by the CLI below and by train.py."""
    if input is not None:
        src = Path(input)
        if not src.exists():
            raise SystemExit(f"error: --input {src} does not exist")
        train_docs, val_docs = (folder_documents(src, max_mb, val_fraction) if src.is_dir()
                                else file_documents(src, val_fraction))
        name = name or src.stem
    elif dataset == "stdlib":
        train_docs, val_docs = stdlib_documents(max_mb, val_fraction)
    elif dataset == "shakespeare":
        cached = hub.CACHE_DIR / "datasets" / "tinyshakespeare.txt"
        if not cached.is_file():
            hub.fetch_url(SHAKESPEARE_URL, cached)
        train_docs, val_docs = file_documents(cached, val_fraction=0.1)
    else:
        raise SystemExit(f"error: --dataset {dataset!r}: expected 'stdlib' or 'shakespeare' (or give --input)")
    out = Path(out_dir) / (name or dataset)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe" and vocab_size < 257:
        raise SystemExit(f"error: --vocab_size {vocab_size}: a byte-level BPE needs at least 256 + 1 (end-of-text)")
    tok, eot = get_tokenizer(tokenizer, train_docs, vocab_size, gpt2_dir, out / "tokenizer")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    encoding = tok.to_tiktoken()
    n_train = write_split(train_docs, encoding, eot, dtype, out / "train.bin")
    n_val = write_split(val_docs, encoding, eot, dtype, out / "val.bin")
    meta = {"dataset": input and str(input) or dataset, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "eot_id": eot, "train_tokens": n_train, "val_tokens": n_val,
            "train_docs": len(train_docs), "val_docs": len(val_docs)}
    hub.write_json(out / "meta.json", meta)
    print(f"wrote {out}: {n_train:,} train and {n_val:,} val tokens ({meta['dtype']}, vocab {tok.vocab_size})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="stdlib", help="stdlib | shakespeare (ignored with --input)")
    p.add_argument("--input", default=None, help="a local text file or folder of text files")
    p.add_argument("--chat_jsonl", default=None, help="instruction data: JSONL of {\"messages\": [...]} "
                   "(needs --model and --tokenizer <model dir or hub id>)")
    p.add_argument("--model", default=None, help="model file whose chat format --chat_jsonl uses (e.g. llama3)")
    p.add_argument("--name", default=None, help="output name under --out_dir (default: dataset or input name)")
    p.add_argument("--tokenizer", default="bpe", help="bytes | bpe | gpt2 | a model directory or hub id")
    p.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size for --tokenizer bpe")
    p.add_argument("--gpt2_dir", default=None, help="folder with the official encoder.json + vocab.bpe")
    p.add_argument("--out_dir", default="data")
    p.add_argument("--max_mb", type=float, default=8.0, help="size cap for folder datasets, in MB of text")
    p.add_argument("--val_fraction", type=float, default=0.05)
    a = p.parse_args(argv)
    try:
        if a.chat_jsonl:
            if not a.model or a.tokenizer in ("bpe", "bytes", "gpt2"):
                raise SystemExit("error: --chat_jsonl needs --model (e.g. llama3) and --tokenizer <model dir or hub id>")
            prepare_chat(a.chat_jsonl, a.model, a.tokenizer, a.name, a.out_dir, a.val_fraction)
            return
        prepare(a.dataset, a.input, a.name, a.tokenizer, a.vocab_size, a.out_dir, a.max_mb, a.val_fraction,
                a.gpt2_dir)
    except (hub.HubError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
