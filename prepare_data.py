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
and settings; a small corpus may give fewer merges than --vocab_size asks, and meta.json records the real
size), gpt2 (the official encoder.json + vocab.bpe, downloaded once or read from --gpt2_dir), or a model
directory / hub id (that model's own tokenizer, to fine-tune official weights on new text).

Each document ends with the end-of-text token. Ids are stored as uint16 when the vocabulary fits, else uint32.
The tokenizer's files are written to data/<name>/tokenizer/, from where train.py copies them into checkpoints.
token_bytes.npy (named by meta.json's token_bytes) holds each token id's length in UTF-8 bytes, 0 for special
tokens: train.py's validation bits per byte divides by it, so runs with different tokenizers compare.
data/<name>/ is built whole in a temporary directory beside it and then swapped in, so it never mixes two
runs (a stale tokenizer beside new shards) and a crash leaves the old dataset or the new one.
Every flag is checked before any work: bad input is one line `error: ...` naming the flag or file.

Instruction data (--chat_jsonl, one {"messages": [{"role", "content"}, ...]} per line) is tokenized with the
model's own chat format (--model, its encode_chat) and gets a loss mask beside the tokens: train.mask.bin
holds 1 for the tokens of the assistant's replies (their text and end-of-turn token), 0 elsewhere, so
train.py computes the loss on the replies only (targets = -100 elsewhere). A conversation without an
assistant turn has nothing to train on: it is reported and skipped.
"""
import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import bpe
import checkpoint_io
import errors
import hub
import sample
from errors import BadInput

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GPT2_URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}
EOT = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h", ".js", ".ts"}
# the UTF-8 byte count of each token id, for train.py's val_bpb (meta.json names it)
TOKEN_BYTES = "token_bytes.npy"
# what a dataset directory holds (and the .tmp files of older versions): anything else there is not replaced
DATASET_FILES = {"tokenizer", "train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "meta.json", TOKEN_BYTES} | {
    f"{split}.{array}.npy" for split in ("train", "val") for array in (   # classification, preference pairs
        "ids", "labels", "chosen", "rejected", "prompt_len", "chosen_len", "rejected_len")}


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
        raise BadInput(f"--input {folder}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) found")
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
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:   # one from read() (EIO) names no file, unlike one from open()
        raise BadInput(f"{path}: {e.strerror or e}") from None


def text_of(source):
    return _read_text(source) if isinstance(source, Path) else source


def check_fraction(val_fraction):
    if not 0 < val_fraction < 1:
        raise BadInput(f"--val_fraction {val_fraction}: expected a fraction between 0 and 1 (exclusive)")


def check_splits(train_docs, val_docs, where, max_mb):
    """Both splits need some text: an empty one would train on nothing or evaluate to nan."""
    if not train_docs and not val_docs:
        raise BadInput(f"{where}: not even the first file fits in --max_mb {max_mb}")
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if not any(len(s) if isinstance(s, str) else s.stat().st_size for _, s in docs):
            raise BadInput(f"{where}: too little text, the {split} split would be empty ({len(train_docs)} train "
                           f"and {len(val_docs)} val documents)")


# -----------------------------------------------------------------------------------------------------------
# Tokenizers


def check_tokenizer(spec, gpt2_dir):
    """--tokenizer (and --gpt2_dir) before any work: a path that does not exist is not taken for a hub id."""
    if spec == "gpt2" and gpt2_dir is not None:
        missing = [n for n in GPT2_URLS if not (Path(gpt2_dir) / n).is_file()]
        if missing:
            raise BadInput(f"--gpt2_dir {gpt2_dir}: has no {' and no '.join(missing)} (expected encoder.json and "
                           f"vocab.bpe)")
    if spec in ("bytes", "bpe", "gpt2") or Path(spec).is_dir():
        return
    if Path(spec).exists():
        raise BadInput(f"--tokenizer {spec}: is a file; expected a model directory")
    if hub.looks_like_path(spec):
        raise BadInput(f"--tokenizer {spec}: no such directory")
    if not hub.REPO_ID.fullmatch(spec):
        raise BadInput(f"--tokenizer {spec!r}: expected bytes, bpe, gpt2, a model directory or a hub id 'owner/name'")


def get_tokenizer(spec, train_docs, vocab_size, gpt2_dir, tok_dir):
    """Build the tokenizer named by spec and write its files into tok_dir; returns (tokenizer, eot_id)."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    if spec == "bytes":
        tok = bpe.train("", 256 + 1, special_tokens={EOT: 256})
        tok.save_pretrained(tok_dir)   # tokenizer.bpe, and tokenizer.json for transformers' AutoTokenizer
    elif spec == "bpe":
        tok = _trained_bpe(train_docs, vocab_size)
        tok.save_pretrained(tok_dir)
    elif spec == "gpt2":
        src = Path(gpt2_dir) if gpt2_dir else _fetch_gpt2_files()
        for name in GPT2_URLS:
            shutil.copyfile(src / name, tok_dir / name)
        try:   # the copy, as it is what train.py will load; but errors name the files the user gave
            tok = bpe.load(tok_dir)
        except BadInput as e:
            raise BadInput(str(e).replace(str(tok_dir), str(src))) from None
        tok.save_pretrained(tok_dir)   # tokenizer.json too: AutoTokenizer does not read encoder.json + vocab.bpe
    else:
        src = Path(hub.resolve(spec, weights=False))   # a hub id: its tokenizer files, not gigabytes of weights
        tok = bpe.load(src)
        for path in [*src.iterdir(), src / "original" / "tokenizer.model"]:   # Meta's layout keeps it in original/
            if path.name in bpe.TOKENIZER_FILES and path.is_file() and not (tok_dir / path.name).exists():
                shutil.copyfile(path, tok_dir / path.name)
    eot = tok.special_tokens.get(EOT)
    if eot is None:
        eot = tok.eos_ids[0] if tok.eos_ids else None
    return tok, eot


def _trained_bpe(train_docs, vocab_size):
    """Train BPE on the train split, cached by a hash of the corpus and the settings. <|endoftext|> follows the
    last merge, so a corpus with fewer merges than vocab_size asks for gives a smaller vocabulary, not ids
    without a token."""
    texts = [text_of(source) for _, source in train_docs]
    # "eot-last": older entries put <|endoftext|> at vocab_size - 1 even after fewer merges
    h = hashlib.sha256(f"{vocab_size}|gpt2|{EOT}|eot-last".encode())
    for (name, _), text in zip(train_docs, texts):
        h.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace"))
    cached = hub.CACHE_DIR / "bpe" / f"{h.hexdigest()[:16]}-{vocab_size}" / bpe.SAVE_NAME
    if cached.is_file():
        print(f"using cached tokenizer {cached}")
        tok = bpe.load(cached)
    else:
        print(f"training a {vocab_size}-token BPE on {sum(map(len, texts)) / 2**20:.1f} MB ...")
        with warnings.catch_warnings():   # a shortfall is reported below, in the flag's terms, cached or not
            warnings.simplefilter("ignore")
            tok = bpe.train(texts, vocab_size, pattern="gpt2", special_tokens=[EOT])
        cached.parent.mkdir(parents=True, exist_ok=True)
        tok.save(cached)
    if tok.vocab_size < vocab_size:
        print(f"--vocab_size {vocab_size}: the corpus only gave {len(tok.merges)} merges, so the vocabulary "
              f"is {tok.vocab_size} tokens (256 bytes + merges + {EOT})", file=sys.stderr)
    return tok


def _fetch_gpt2_files():
    folder = hub.CACHE_DIR / "gpt2-encoding"
    for name, url in GPT2_URLS.items():
        if not (folder / name).is_file():
            hub.fetch_url(url, folder / name)
    return folder


def token_byte_counts(tok):
    """Each token id's length in UTF-8 bytes of text, 0 for special tokens (and ids without a token): what bits
    per byte divides by, so that runs with different tokenizers compare. The raw token bytes, not the decoded
    text, which turns a token that holds part of a character into the 3 bytes of U+FFFD."""
    counts = np.zeros(tok.vocab_size, dtype=np.uint32)
    specials = set(tok.special_tokens.values())
    for i, token in tok.vocab.items():
        if i not in specials:
            counts[i] = len(token)
    return counts


def write_token_bytes(tok, path):
    # A file beside meta.json rather than a list in it: meta.json is indented, one line per entry, and a 128K
    # vocabulary would bury its few keys under 128K lines; a .npy of 128K counts is 512 KB, loads in a millisecond
    # and carries its own dtype and length, which train.py checks.
    with open(path, "wb") as f:
        np.save(f, token_byte_counts(tok))
        f.flush()
        os.fsync(f.fileno())   # on disk before the rename that publishes the directory


# -----------------------------------------------------------------------------------------------------------
# Writing the shards


def write_split(docs, encoding, eot, dtype, path):
    """Encode documents in bulk (tiktoken speed), each followed by eot; return #tokens. Streamed to the file, so
    the shard never sits whole in memory (the dataset directory as a whole is what is swapped in atomically)."""
    n = 0
    with open(path, "wb") as f:
        for start in range(0, len(docs), 256):
            batch = encoding.encode_ordinary_batch([text_of(source) for _, source in docs[start:start + 256]])
            for ids in batch:
                if eot is not None:
                    ids.append(eot)
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
        f.flush()
        os.fsync(f.fileno())   # on disk before the rename that publishes the directory
    return n


# -----------------------------------------------------------------------------------------------------------
# The dataset directory: checked before any work, built whole beside its place, then swapped in


def check_target(out_dir, name):
    """out_dir/name, checked before any work: a plain name, a writable --out_dir, and nothing there that this
    run's swap would destroy other than a dataset. Returns the directory to write."""
    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise BadInput(f"--name {name!r}: expected a plain directory name (not empty, no '/' or '\\', not "
                       f"starting with '.')")
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"--out_dir {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"--out_dir {out_dir}: {existing} is not writable")
    out = out_dir / name
    if out.is_symlink():   # data/<name> -> a bigger disk: build there, beside the real directory
        out = out.resolve()
    if out.exists() and not (out.is_dir() and all(p.name in DATASET_FILES or p.suffix == ".tmp"
                                                   for p in out.iterdir())):
        raise BadInput(f"--name {name}: {out} exists and is not a dataset of prepare_data.py; not replacing it")
    return out


@contextmanager
def building(out):
    """Yield a temporary directory beside out to build the dataset in, then swap it in: move the old dataset
    aside, rename the new one in, remove the old. A crash at any point leaves the old dataset or the new one;
    the next run restores or removes what the dead writer left (named by its pid)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in out.parent.glob(".*-*-*"):
        kind, _, rest = p.name[1:].partition("-")
        name, _, pid = rest.rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not (out.parent / name).exists():   # it died between the two renames
            os.rename(p, out.parent / name)
        else:
            shutil.rmtree(p, ignore_errors=True)
    tmp, old = (out.with_name(f".{kind}-{out.name}-{os.getpid()}") for kind in ("tmp", "old"))
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        checkpoint_io.fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid):
    if pid == os.getpid():   # then the writer that left it died, and its pid came round again to us
        return False
    if os.name != "posix":   # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        pass
    return True


# -----------------------------------------------------------------------------------------------------------
# Instruction data: chat-formatted tokens and the mask of the assistant's replies


def jsonl_objects(path, expected, text=None):
    """(line number, object) of each non-blank line of a JSONL file (text: its contents, read already); BadInput
    naming file:line for a line that is not valid JSON, or `expected` for one that is not a JSON object."""
    for n, line in enumerate((bpe.read_text(path) if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{path}:{n}: expected {expected}")
        yield n, obj


def read_conversations(path):
    """[(line number, messages)] of a JSONL file, each line checked: {"messages": [{"role", "content"}, ...]}.
    Conversations without an assistant turn are reported and left out: they hold nothing to train on."""
    conversations = []
    for n, obj in jsonl_objects(path, 'a JSON object with a "messages" list'):
        messages = obj.get("messages")
        if not isinstance(messages, list):
            raise BadInput(f'{path}:{n}: expected a JSON object with a "messages" list')
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadInput(f'{path}:{n}: messages[{i}]: expected {{"role": <string>, "content": <string>}}')
        if any(m["role"] == "assistant" for m in messages):
            conversations.append((n, messages))
        else:
            print(f"{path}:{n}: no assistant turn, nothing to train on: skipped", file=sys.stderr)
    if len(conversations) < 2:
        raise BadInput(f"{path}: {len(conversations)} conversations with an assistant turn; need at least 2 "
                       f"(train and val)")
    return conversations


def chat_example(module, tok, messages, where):
    """(ids, mask) of one conversation: mask[i] = 1 where ids[i] belongs to an assistant reply.

    Each reply's span is found by encoding the dialog up to the reply's generation prompt and through the reply:
    what the second adds to the first is the reply (with its end-of-turn token).
    """
    ids = module.encode_chat(tok, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = module.encode_chat(tok, messages[:i], add_generation_prompt=True)
        through = module.encode_chat(tok, messages[:i + 1], add_generation_prompt=False)
        if through[:len(before)] != before or ids[:len(through)] != through:
            raise ValueError(f"{where}: {module.__name__}.encode_chat is not prefix-stable, cannot mask the replies")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def prepare_chat(path, model, tokenizer, name=None, out_dir="data", val_fraction=0.05):
    """Tokenize a JSONL file of conversations for supervised fine-tuning; returns the output directory."""
    check_fraction(val_fraction)
    if model not in sample.MODELS:
        raise BadInput(f"--model {model!r}: expected one of the model files here: {', '.join(sample.MODELS)}")
    module = importlib.import_module(model)
    if not hasattr(module, "encode_chat"):
        raise BadInput(f"--model {model}: {model}.py has no chat format (encode_chat)")
    if tokenizer in ("bpe", "bytes", "gpt2"):
        raise BadInput(f"--tokenizer {tokenizer}: --chat_jsonl needs the model's own tokenizer, with its chat "
                       f"tokens (a model directory or hub id)")
    check_tokenizer(tokenizer, None)
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--chat_jsonl {path}: {'is a directory' if path.is_dir() else 'no such file'}; expected "
                       f"a JSONL file")
    out = check_target(out_dir, name or path.stem)
    conversations = read_conversations(path)
    with building(out) as tmp:
        tok, eot = get_tokenizer(tokenizer, [], 0, None, tmp / "tokenizer")
        try:   # does the tokenizer have the model's chat tokens? (encode_chat names those it lacks)
            module.encode_chat(tok, [], add_generation_prompt=True)
        except (ValueError, BadInput) as e:
            raise BadInput(f"--tokenizer {tokenizer}: {e} (for --model {model})") from None
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        n_val = max(1, int(len(conversations) * val_fraction))
        counts = {}
        for split, part in (("train", conversations[:-n_val]), ("val", conversations[-n_val:])):
            pairs = [chat_example(module, tok, m, f"{path}:{n}") for n, m in part]
            ids = np.asarray([t for p, _ in pairs for t in p], dtype=dtype)
            mask = np.asarray([b for _, m in pairs for b in m], dtype=np.uint8)
            if not mask.any():
                raise BadInput(f"{path}: the {split} split has no assistant token to train on "
                               f"({model}.encode_chat marks no reply)")
            checkpoint_io.atomic_write(tmp / f"{split}.bin", ids.tobytes())
            checkpoint_io.atomic_write(tmp / f"{split}.mask.bin", mask.tobytes())
            counts[split] = len(ids)
        write_token_bytes(tok, tmp / TOKEN_BYTES)
        meta = {"dataset": str(path), "tokenizer": tokenizer, "chat_model": model, "vocab_size": tok.vocab_size,
                "dtype": np.dtype(dtype).name, "eot_id": eot, "loss_mask": True, "token_bytes": TOKEN_BYTES,
                "train_tokens": counts["train"], "val_tokens": counts["val"],
                "train_docs": len(conversations) - n_val, "val_docs": n_val}
        checkpoint_io.write_json(tmp / "meta.json", meta)
    print(f"wrote {out}: {counts['train']:,} train and {counts['val']:,} val tokens of {len(conversations)} "
          f"conversations")
    return out


def prepare(dataset="stdlib", input=None, name=None, tokenizer="bpe", vocab_size=4096, out_dir="data",
            max_mb=8.0, val_fraction=0.05, gpt2_dir=None):
    """Prepare one dataset; returns the output directory. Used by the CLI below and by train.py."""
    check_fraction(val_fraction)
    if not max_mb > 0:
        raise BadInput(f"--max_mb {max_mb}: expected a size in MB > 0")
    if tokenizer == "bpe" and not (isinstance(vocab_size, int) and vocab_size >= 257):
        raise BadInput(f"--vocab_size {vocab_size}: a byte-level BPE needs at least 256 + 1 (end-of-text)")
    check_tokenizer(tokenizer, gpt2_dir)
    if input is not None:
        src = Path(input)
        if not src.exists():
            raise BadInput(f"--input {src}: no such file or directory")
    elif dataset not in ("stdlib", "shakespeare"):
        raise BadInput(f"--dataset {dataset!r}: expected 'stdlib' or 'shakespeare' (or give --input)")
    out = check_target(out_dir, name or (src.resolve().stem if input is not None else dataset))
    if input is not None:
        train_docs, val_docs = (folder_documents(src, max_mb, val_fraction) if src.is_dir()
                                else file_documents(src, val_fraction))
    elif dataset == "stdlib":
        train_docs, val_docs = stdlib_documents(max_mb, val_fraction)
    else:
        cached = hub.CACHE_DIR / "datasets" / "tinyshakespeare.txt"
        if not cached.is_file():
            hub.fetch_url(SHAKESPEARE_URL, cached)
        train_docs, val_docs = file_documents(cached, val_fraction)
    check_splits(train_docs, val_docs, f"--input {input}" if input is not None else f"--dataset {dataset}", max_mb)
    with building(out) as tmp:
        tok, eot = get_tokenizer(tokenizer, train_docs, vocab_size, gpt2_dir, tmp / "tokenizer")
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        try:
            encoding = tok.to_tiktoken()
        except ValueError as e:   # a tokenizer tiktoken cannot run: several regexes in turn, merges out of order
            raise BadInput(f"--tokenizer {tokenizer}: {e}") from None
        n_train = write_split(train_docs, encoding, eot, dtype, tmp / "train.bin")
        n_val = write_split(val_docs, encoding, eot, dtype, tmp / "val.bin")
        write_token_bytes(tok, tmp / TOKEN_BYTES)
        meta = {"dataset": input and str(input) or dataset, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
                "dtype": np.dtype(dtype).name, "eot_id": eot, "token_bytes": TOKEN_BYTES, "train_tokens": n_train,
                "val_tokens": n_val, "train_docs": len(train_docs), "val_docs": len(val_docs)}
        checkpoint_io.write_json(tmp / "meta.json", meta)
    print(f"wrote {out}: {n_train:,} train and {n_val:,} val tokens ({meta['dtype']}, vocab {tok.vocab_size})")
    return out


def main(argv=None):
    p = errors.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="stdlib", help="stdlib | shakespeare (ignored with --input)")
    p.add_argument("--input", default=None, help="a local text file or folder of text files")
    p.add_argument("--chat_jsonl", default=None, help="instruction data: JSONL of {\"messages\": [...]} "
                   "(needs --model and --tokenizer <model dir or hub id>)")
    p.add_argument("--classify", default=None, help="classification data: a CSV (with a header row) or JSONL of "
                   "texts and labels (see --text_field, --label_field)")
    p.add_argument("--dpo_jsonl", default=None, help="preference pairs: JSONL of {\"prompt\" or \"messages\", "
                   "\"chosen\", \"rejected\"} (needs --model and --tokenizer)")
    p.add_argument("--model", default=None, help=f"model file whose chat format --chat_jsonl and --dpo_jsonl use: "
                   f"{' | '.join(sample.MODELS)}")
    p.add_argument("--name", default=None, help="output name under --out_dir (default: dataset or input name)")
    p.add_argument("--tokenizer", default="bpe", help="bytes | bpe | gpt2 | a model directory or hub id")
    p.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size for --tokenizer bpe")
    p.add_argument("--gpt2_dir", default=None, help="folder with the official encoder.json + vocab.bpe")
    p.add_argument("--out_dir", default="data")
    p.add_argument("--max_mb", type=float, default=8.0, help="size cap for folder datasets, in MB of text")
    p.add_argument("--val_fraction", type=float, default=None, help="held-out share (default: 0.05; 0.1 for "
                   "--classify and --dpo_jsonl)")
    p.add_argument("--text_field", default="text", help="--classify: the column or JSON field of the text")
    p.add_argument("--label_field", default="label", help="--classify: the column or JSON field of the label")
    p.add_argument("--max_len", type=int, default=None, help="--classify, --dpo_jsonl: tokens per example, longer "
                   "ones cut (default: 256, 512)")
    a = p.parse_args(argv)
    for flag, value in vars(a).items():
        if isinstance(value, str) and not value.strip():
            raise BadInput(f"--{flag} is empty")
    for flag in ("input", "chat_jsonl", "classify", "dpo_jsonl", "tokenizer", "gpt2_dir", "out_dir"):
        setattr(a, flag, getattr(a, flag) and os.path.expanduser(getattr(a, flag)))   # "--flag=~/x" comes unexpanded
    if a.gpt2_dir is not None and a.tokenizer != "gpt2":
        raise BadInput(f"--gpt2_dir is for --tokenizer gpt2, not {a.tokenizer}")
    given = [f"--{k}" for k in ("chat_jsonl", "classify", "dpo_jsonl", "input") if getattr(a, k) is not None]
    if len(given) > 1:
        raise BadInput(f"{' and '.join(given)}: give one of them")
    if a.model is not None and a.chat_jsonl is None and a.dpo_jsonl is None:
        raise BadInput("--model is for --chat_jsonl and --dpo_jsonl (the chat format of the data)")
    if (a.chat_jsonl or a.dpo_jsonl) and a.model is None:
        raise BadInput(f"{given[0]} needs --model ({' | '.join(sample.MODELS)}) and --tokenizer <model dir or "
                       f"hub id>")
    if a.max_len is not None and not (a.classify or a.dpo_jsonl):
        raise BadInput("--max_len is for --classify and --dpo_jsonl")
    for flag in ("text_field", "label_field"):
        if getattr(a, flag) != p.get_default(flag) and not a.classify:
            raise BadInput(f"--{flag} is for --classify")
    fraction = a.val_fraction if a.val_fraction is not None else 0.1 if a.classify or a.dpo_jsonl else 0.05
    if a.classify:
        import classifier   # it builds on this module
        classifier.prepare(a.classify, a.tokenizer, a.text_field, a.label_field, a.name, a.out_dir, fraction,
                           a.max_len or 256, a.gpt2_dir, a.vocab_size)
    elif a.dpo_jsonl:
        import dpo
        dpo.prepare(a.dpo_jsonl, a.model, a.tokenizer, a.name, a.out_dir, fraction, a.max_len or 512)
    elif a.chat_jsonl:
        prepare_chat(a.chat_jsonl, a.model, a.tokenizer, a.name, a.out_dir, fraction)
    else:
        prepare(a.dataset, a.input, a.name, a.tokenizer, a.vocab_size, a.out_dir, a.max_mb, fraction, a.gpt2_dir)


if __name__ == "__main__":
    errors.run(main)
