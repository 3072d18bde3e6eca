"""Tests for checkpoint_io.py: safetensors checkpoints (round trips, sharding, atomicity), JSON files, bad files."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoint_io
from errors import BadInput


def _state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layers.0.attn.weight": torch.randn(48, 16, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.rand(16, generator=g).half(),
        "layers.0.mlp.weight": torch.randn(32, 16, generator=g).t(),  # non-contiguous on purpose
        "step": torch.tensor([seed, 7], dtype=torch.int64),
    }


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- save / load

def test_unsharded_round_trip(tmp_path):
    sd = _state_dict()
    checkpoint_io.save_safetensors(sd, tmp_path / "ckpt", metadata={"step": "7"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors"]
    _assert_same(checkpoint_io.load_safetensors(tmp_path / "ckpt"), sd)
    # the reference reader agrees, and the file says it holds PyTorch tensors (transformers insists on it)
    _assert_same(load_file(tmp_path / "ckpt" / "model.safetensors"), sd)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}


def test_sharded_round_trip_and_index_format(tmp_path):
    sd = _state_dict()
    checkpoint_io.save_safetensors(sd, tmp_path, max_shard_bytes=3000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) > 2 and set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    # read back with safetensors + the index alone, as transformers does
    loaded = {}
    for shard in shards:
        part = load_file(tmp_path / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        loaded.update(part)
    _assert_same(loaded, sd)
    _assert_same(checkpoint_io.load_safetensors(tmp_path), sd)
    assert checkpoint_io.checkpoint_files(tmp_path) == [tmp_path / s for s in shards]
    # one shard at a time: the keys come grouped by shard, in shard order
    order = [shards.index(index["weight_map"][k]) for k, _ in checkpoint_io.iter_safetensors(tmp_path)]
    assert order == sorted(order)


def test_a_tensor_larger_than_max_shard_bytes_gets_its_own_shard(tmp_path):
    sd = {"small": torch.zeros(2), "big": torch.ones(100), "tail": torch.zeros(3)}
    checkpoint_io.save_safetensors(sd, tmp_path, max_shard_bytes=64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    _assert_same(checkpoint_io.load_safetensors(tmp_path), sd)


def test_transformers_loads_a_sharded_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    # lm_head.weight is tied to wte.weight: passed once, as transformers saves it
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    checkpoint_io.save_safetensors(sd, tmp_path, max_shard_bytes=4000)
    config.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded[k], v), k


def test_tied_weights_must_be_passed_once(tmp_path):
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="'a'.*'b'.*share memory"):
        checkpoint_io.save_safetensors({"a": w, "b": w}, tmp_path)
    assert not list(tmp_path.iterdir())
    # disjoint views of one buffer are distinct tensors, and are fine
    checkpoint_io.save_safetensors({"a": w[:4], "b": w[4:]}, tmp_path)
    _assert_same(checkpoint_io.load_safetensors(tmp_path), {"a": w[:4], "b": w[4:]})
    with pytest.raises(ValueError, match="str: torch.Tensor"):
        checkpoint_io.save_safetensors({"a": [1, 2]}, tmp_path)


def test_checkpoint_files_errors(tmp_path):
    with pytest.raises(BadInput, match="nothere: not a directory"):
        checkpoint_io.checkpoint_files(tmp_path / "nothere")
    with pytest.raises(BadInput, match=f"{tmp_path}.*no weights.*model.safetensors"):
        checkpoint_io.checkpoint_files(tmp_path)
    checkpoint_io.save_safetensors(_state_dict(), tmp_path, max_shard_bytes=3000)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(BadInput, match="model-00002-of-00003.safetensors: missing shard.*index.json"):
        checkpoint_io.checkpoint_files(tmp_path)
    with pytest.raises(BadInput, match="missing shard"):
        checkpoint_io.load_safetensors(tmp_path)


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    with pytest.raises(BadInput, match="model.safetensors: not a readable safetensors file"):
        checkpoint_io.load_safetensors(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match="bad.json: not valid JSON"):
        checkpoint_io.read_json(tmp_path / "bad.json")
    with pytest.raises(BadInput, match="nothere.json: not found"):
        checkpoint_io.read_json(tmp_path / "nothere.json")


def test_write_json_and_atomic_write(tmp_path):
    checkpoint_io.write_json(tmp_path / "sub" / "c.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "sub" / "c.json").read_text()
    assert text == json.dumps({"b": 1, "a": [1, 2]}, indent=2) + "\n"
    assert checkpoint_io.read_json(tmp_path / "sub" / "c.json") == {"b": 1, "a": [1, 2]}
    checkpoint_io.atomic_write(tmp_path / "x.bin", b"\x00\x01")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"


def _crash_on_call(n, real):
    """A stand-in for `real` that raises on its n-th call, as a crash at that point would stop the save."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise OSError("simulated crash")
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("old_shard_bytes", [3000, 2**30], ids=["old-sharded", "old-single"])
@pytest.mark.parametrize("new_shard_bytes", [3000, 2**30], ids=["new-sharded", "new-single"])
@pytest.mark.parametrize("crash", ["write", "rename"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, old_shard_bytes, new_shard_bytes, crash):
    old, new = _state_dict(seed=1), _state_dict(seed=2)
    checkpoint_io.save_safetensors(old, tmp_path, max_shard_bytes=old_shard_bytes)
    (tmp_path / "config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    if crash == "write":  # midway: while writing the second shard, or the only file
        n = 2 if new_shard_bytes < 2**30 else 1
        monkeypatch.setattr(checkpoint_io, "save_file", _crash_on_call(n, checkpoint_io.save_file))
    else:
        monkeypatch.setattr(os, "replace", _crash_on_call(1, os.replace))
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint_io.save_safetensors(new, tmp_path, max_shard_bytes=new_shard_bytes)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files left behind
    _assert_same(checkpoint_io.load_safetensors(tmp_path), old)
    # and a save that runs to the end replaces it, removing the files of the old layout
    checkpoint_io.save_safetensors(new, tmp_path, max_shard_bytes=new_shard_bytes)
    _assert_same(checkpoint_io.load_safetensors(tmp_path), new)
    names = {p.name for p in tmp_path.iterdir()}
    assert "config.json" in names
    assert ("model.safetensors" in names) == (new_shard_bytes == 2**30)
    assert ("model.safetensors.index.json" in names) == (new_shard_bytes < 2**30)
    shards = {n for n in names if n.startswith("model-")}
    assert shards == ({p.name for p in checkpoint_io.checkpoint_files(tmp_path)} if new_shard_bytes < 2**30 else set())
    assert not any(n.endswith(".tmp") for n in names)


def test_crash_during_atomic_write_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    checkpoint_io.write_json(path, {"version": 1})
    monkeypatch.setattr(os, "replace", _crash_on_call(1, os.replace))
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint_io.write_json(path, {"version": 2})
    monkeypatch.undo()
    assert checkpoint_io.read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("weight_map", [None, ["model.safetensors"], {"w": 3}, {"w": "../model.safetensors"},
                                        {"w": "sub/model.safetensors"}, {"w": ".."}, {"w": ""}])
def test_an_index_must_name_shards_in_its_folder(tmp_path, weight_map):
    """An index comes with downloaded repos: it may not send the reader (or the download) elsewhere."""
    checkpoint_io.write_json(tmp_path / checkpoint_io.INDEX, {"weight_map": weight_map})
    with pytest.raises(BadInput, match=f"{checkpoint_io.INDEX}: (no 'weight_map' object|shard name .* is not a file "
                                       f"name in its folder)"):
        checkpoint_io.checkpoint_files(tmp_path)
