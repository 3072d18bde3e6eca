"""
Checkpoint files: (sharded) safetensors, config files, and atomic writes.

    >>> checkpoint_io.save_safetensors(sd, "out", max_shard_bytes=2**28)
    >>> sorted(p.name for p in checkpoint_io.checkpoint_files("out"))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> sd = checkpoint_io.load_safetensors("out")       # {"wte.weight": tensor (50257, 768), ...}

Every write goes to a temporary name in the same directory, is fsynced, and is renamed over the target, so a reader
(or a crash) sees the old file or the new one, never a mix. A damaged or missing file is errors.BadInput naming it.
"""
import io
import json
import math
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from errors import BadInput

INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ----------------------------------------------------------------------------- safetensors checkpoints

def shard_names(index):
    """The shard files an index (a model.safetensors.index.json path) names, sorted: plain names in its folder."""
    d = read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadInput(f"{index}: no 'weight_map' object of key -> shard file name")
    names = sorted(set(weight_map.values()))
    for name in names:
        # an index is downloaded data: it must not point the reader (or the download) outside its folder
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise BadInput(f"{index}: shard name {name!r:.80} is not a file name in its folder")
    return names


def checkpoint_files(directory):
    """The safetensors files of a checkpoint: model.safetensors, else the shards its index names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInput(f"{directory}: not a directory; expected a checkpoint directory")
    if (directory / "model.safetensors").exists():  # transformers looks for this one first too
        return [directory / "model.safetensors"]
    if (directory / INDEX).exists():
        files = [directory / name for name in shard_names(directory / INDEX)]
        for f in files:
            if not f.exists():
                raise BadInput(f"{f}: missing shard, named in {directory / INDEX}")
        return files
    raise BadInput(f"{directory}: no weights; expected model.safetensors or {INDEX} with its shards")


def iter_safetensors(directory, device="cpu"):
    """Yield (key, tensor) one shard at a time, so that peak memory stays about one shard."""
    for path in checkpoint_files(directory):
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise BadInput(f"{path}: not a readable safetensors file ({e})") from None


def load_safetensors(directory, device="cpu"):
    """All tensors of a checkpoint directory: {key: tensor}."""
    return dict(iter_safetensors(directory, device))


def save_safetensors(state_dict, directory, *, max_shard_bytes=5 * 2**30, metadata=None):
    """
    Write model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when the
    tensors take more than max_shard_bytes. All files are written under temporary names first and renamed
    after (the index last), so a crash while writing leaves the previous checkpoint as it was. (Only a crash
    between two of those renames, microseconds apart, could mix shards of two saves with the same names.)
    Tied weights must be passed once: tensors that share memory are an error.

        >>> save_safetensors({"w": torch.zeros(4, 4)}, "out")   # -> out/model.safetensors
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, t in state_dict.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"save_safetensors: expected {{str: torch.Tensor}}, got {k!r}: {type(t).__name__}")
        tensors[k] = t.detach().contiguous()
    spans = sorted((str(t.device), t.data_ptr(), t.data_ptr() + t.nbytes, k) for k, t in tensors.items() if t.nbytes)
    for (dev0, _, end0, k0), (dev1, start1, _, k1) in zip(spans, spans[1:]):
        if dev0 == dev1 and start1 < end0:
            raise ValueError(f"save_safetensors: {k0!r} and {k1!r} share memory (tied weights? pass only one)")

    # greedy split in key order: a new shard starts when the next tensor would overflow the current one
    shards, size = [{}], 0
    for k, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    metadata = {"format": "pt", **(metadata or {})}  # transformers refuses files whose format is not "pt"
    temps = []
    try:
        for name, shard in zip(names, shards):
            temps.append(_temp_name(directory / name))
            save_file(shard, temps[-1], metadata=metadata)
            with open(temps[-1], "r+b") as f:
                os.fsync(f.fileno())
        if n > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            names.append(INDEX)
            temps.append(_temp_name(directory / INDEX))
            _write_synced(temps[-1], (json.dumps(index, indent=2) + "\n").encode())
        for tmp, name in zip(temps, names):
            os.replace(tmp, directory / name)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    # only now that the new checkpoint is complete: drop the files of a previous save with another layout
    for p in directory.iterdir():
        if (p.name in ("model.safetensors", INDEX) or SHARD.fullmatch(p.name)) and p.name not in names:
            p.unlink()


def check_tensor(expected, key, shape, where, family, config_name="config.json", shown_key=None):
    """BadInput for a weight the model has no place for, or whose shape contradicts config_name, so that a wrong
    file fails at its first bad tensor. expected: {key: shape} of the model; family: 'GPT-2', 'Llama 3', ..."""
    shown = shown_key or key
    if key not in expected:
        raise BadInput(f"{where}: unexpected key {shown!r} in the weights: not a {family} checkpoint, or a variant "
                       f"its model file does not implement")
    if tuple(shape) != tuple(expected[key]):
        raise BadInput(f"{where}: key {shown!r} has shape {tuple(shape)}, {config_name} implies "
                       f"{tuple(expected[key])}")


def check_complete(expected, state, where):
    """BadInput naming the first key of expected ({key: shape}) that the loaded weights (state) lack."""
    for key in expected:
        if key not in state:
            raise BadInput(f"{where}: weights lack key {key!r} (expected shape {tuple(expected[key])})")


def load_pth_shards(paths):
    """The state dicts of model-parallel torch shards (Meta's consolidated.NN.pth), which hold the same keys:
    weights_only, since a pickle may otherwise run code; mmap, so each stays on disk until its tensors are copied.

        >>> [sorted(s) for s in load_pth_shards([d / "consolidated.00.pth", d / "consolidated.01.pth"])]
        [['layers.0.attention.wq.weight', ...], ['layers.0.attention.wq.weight', ...]]
    """
    shards = []
    for p in paths:
        try:
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:   # a damaged or foreign file fails in many ways (zip, pickle, EOF, weights_only)
            raise BadInput(f"{p}: not a readable weights-only torch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    for p, s in zip(paths[1:], shards[1:]):
        if s.keys() != shards[0].keys():
            raise BadInput(f"{p.parent}: {paths[0].name} and {p.name} hold different keys (e.g. "
                           f"{sorted(s.keys() ^ shards[0].keys())[0]!r}); model-parallel shards hold the same")
    return shards


# ----------------------------------------------------------------------------- atomic files

def _temp_name(path):
    """A fresh hidden name beside path: same directory, so the rename that follows is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_synced(path, data):
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory):
    # makes the renames in a directory durable; Windows cannot open a directory, and needs no such step
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_npy(path, array):
    """An array as a .npy file (no pickled objects), written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())


def atomic_write(path, data):
    """Replace path with data (bytes or str) so that a reader sees the old file or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        _write_synced(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json(path, obj):
    """Atomic JSON file, indent=2, keys in the given order, trailing newline."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path):
    """The JSON value in path; BadInput naming the file when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- model config files

# what a value in config.json or params.json must be, and how an error says so
_KINDS = {int: ("an integer >= 1", lambda v: type(v) is int and v >= 1),
          float: ("a finite number > 0", lambda v: type(v) in (int, float) and 0 < v < math.inf),
          "rate": ("a number in [0, 1)", lambda v: type(v) in (int, float) and 0 <= v < 1),
          bool: ("true or false", lambda v: type(v) is bool),
          "ids": ("a token id or a list of them", lambda v: all(type(i) is int and i >= 0
                                                                 for i in (v if type(v) is list else [v])))}


def check_keys(d, kinds, required=(), prefix=""):
    """ValueError naming the first key of the JSON object d that is required but absent (or null), or whose value is
    not of its kind in kinds ({key: int | float | "rate" | bool | "ids"}); prefix: where d is ('rope_scaling.')."""
    for key in required:
        if d.get(key) is None:
            raise ValueError(f"lacks key {prefix + key!r}")
    for key, kind in kinds.items():
        if d.get(key) is not None and not _KINDS[kind][1](d[key]):
            raise ValueError(f"{prefix + key!r} is {d[key]!r:.60}: expected {_KINDS[kind][0]}")


def hf_config(d, model_types):
    """A config.json dict without its nulls (null stands for the default, as in transformers), once its model_type
    (absent: the first) is one of model_types: {"model_type": "llama", "head_dim": None} -> {"model_type": "llama"}."""
    if d.get("model_type", model_types[0]) not in model_types:
        raise ValueError(f"model_type {d.get('model_type')!r}, expected {' or '.join(map(repr, model_types))}: these "
                         f"are weights of another family, load them with that family's model file")
    return {k: v for k, v in d.items() if v is not None}


def read_rope(d, kinds, required=None):
    """The RoPE block of a config.json dict d, in the hub's spelling (rope_scaling, rope_theta beside it) or
    transformers 5's (rope_parameters, rope_theta inside): (rope type, the block with rope_theta), keys checked.
    kinds: {rope type: {key: kind}} for the types the model implements; required: {rope type: required keys}.
    {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}} -> ("yarn", {..., "rope_theta": 1e6})"""
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = d.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{key} is {rope!r:.60}: expected a JSON object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in kinds:
        raise ValueError(f"{key}: rope type {rope_type!r:.60} is not one of the implemented "
                         f"{', '.join(map(repr, kinds))}")
    check_keys(rope, kinds[rope_type] | {"rope_theta": float}, (required or {}).get(rope_type, ()), key + ".")
    return rope_type, {"rope_theta": d.get("rope_theta", 10000.0)} | rope


def read_config(path, parse):
    """parse(the JSON object in path), for a model's config.json or params.json: BadInput naming the file when it
    holds no JSON object, or when parse raises ValueError (a key missing or out of range, a config the model
    rejects). ValueError is the model files' word for a config they cannot build, so it is the file's fault here."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(d).__name__}")
    try:
        return parse(d)
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None
