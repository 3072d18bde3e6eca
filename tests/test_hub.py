"""Tests for hub.py: safetensors checkpoints (round trips, sharding, atomicity) and downloads from a fake hub.

The fake hub is a real HTTP server on 127.0.0.1 shaped like huggingface.co: the listing API
/api/models/<repo>/revision/<rev>?blobs=true, /<repo>/resolve/<rev>/<file>, LFS files redirected to a
"CDN" path with their sha256 in X-Linked-Etag, and Range requests honored.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import errors
import hub

ROOT = Path(__file__).resolve().parent.parent
REPO = "tiny-org/tiny-model"
TOKEN = "hf_fakeTestToken0123456789"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    # never the real hub or the user's cache or token; small retries so failures come fast
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "default-cache")
    monkeypatch.setattr(hub, "RETRIES", 3)
    monkeypatch.setattr(hub, "BACKOFF", 0.01)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    hub.save_safetensors(sd, tmp_path / "ckpt", metadata={"step": "7"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors"]
    _assert_same(hub.load_safetensors(tmp_path / "ckpt"), sd)
    # the reference reader agrees, and the file says it holds PyTorch tensors (transformers insists on it)
    _assert_same(load_file(tmp_path / "ckpt" / "model.safetensors"), sd)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}


def test_sharded_round_trip_and_index_format(tmp_path):
    sd = _state_dict()
    hub.save_safetensors(sd, tmp_path, max_shard_bytes=3000)
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
    _assert_same(hub.load_safetensors(tmp_path), sd)
    assert hub.checkpoint_files(tmp_path) == [tmp_path / s for s in shards]
    # one shard at a time: the keys come grouped by shard, in shard order
    order = [shards.index(index["weight_map"][k]) for k, _ in hub.iter_safetensors(tmp_path)]
    assert order == sorted(order)


def test_a_tensor_larger_than_max_shard_bytes_gets_its_own_shard(tmp_path):
    sd = {"small": torch.zeros(2), "big": torch.ones(100), "tail": torch.zeros(3)}
    hub.save_safetensors(sd, tmp_path, max_shard_bytes=64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    _assert_same(hub.load_safetensors(tmp_path), sd)


def test_transformers_loads_a_sharded_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    # lm_head.weight is tied to wte.weight: passed once, as transformers saves it
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hub.save_safetensors(sd, tmp_path, max_shard_bytes=4000)
    config.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded[k], v), k


def test_tied_weights_must_be_passed_once(tmp_path):
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="'a'.*'b'.*share memory"):
        hub.save_safetensors({"a": w, "b": w}, tmp_path)
    assert not list(tmp_path.iterdir())
    # disjoint views of one buffer are distinct tensors, and are fine
    hub.save_safetensors({"a": w[:4], "b": w[4:]}, tmp_path)
    _assert_same(hub.load_safetensors(tmp_path), {"a": w[:4], "b": w[4:]})
    with pytest.raises(ValueError, match="str: torch.Tensor"):
        hub.save_safetensors({"a": [1, 2]}, tmp_path)


def test_checkpoint_files_errors(tmp_path):
    with pytest.raises(hub.HubError, match="nothere: not a directory"):
        hub.checkpoint_files(tmp_path / "nothere")
    with pytest.raises(hub.HubError, match=f"{tmp_path}.*no weights.*model.safetensors"):
        hub.checkpoint_files(tmp_path)
    hub.save_safetensors(_state_dict(), tmp_path, max_shard_bytes=3000)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(hub.HubError, match="model-00002-of-00003.safetensors: missing shard.*index.json"):
        hub.checkpoint_files(tmp_path)
    with pytest.raises(hub.HubError, match="missing shard"):
        hub.load_safetensors(tmp_path)


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    with pytest.raises(hub.HubError, match="model.safetensors: not a readable safetensors file"):
        hub.load_safetensors(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(hub.HubError, match="bad.json: not valid JSON"):
        hub.read_json(tmp_path / "bad.json")
    with pytest.raises(hub.HubError, match="nothere.json: not found"):
        hub.read_json(tmp_path / "nothere.json")


def test_write_json_and_atomic_write(tmp_path):
    hub.write_json(tmp_path / "sub" / "c.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "sub" / "c.json").read_text()
    assert text == json.dumps({"b": 1, "a": [1, 2]}, indent=2) + "\n"
    assert hub.read_json(tmp_path / "sub" / "c.json") == {"b": 1, "a": [1, 2]}
    hub.atomic_write(tmp_path / "x.bin", b"\x00\x01")
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
    hub.save_safetensors(old, tmp_path, max_shard_bytes=old_shard_bytes)
    (tmp_path / "config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    if crash == "write":  # midway: while writing the second shard, or the only file
        n = 2 if new_shard_bytes < 2**30 else 1
        monkeypatch.setattr(hub, "save_file", _crash_on_call(n, hub.save_file))
    else:
        monkeypatch.setattr(os, "replace", _crash_on_call(1, os.replace))
    with pytest.raises(OSError, match="simulated crash"):
        hub.save_safetensors(new, tmp_path, max_shard_bytes=new_shard_bytes)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files left behind
    _assert_same(hub.load_safetensors(tmp_path), old)
    # and a save that runs to the end replaces it, removing the files of the old layout
    hub.save_safetensors(new, tmp_path, max_shard_bytes=new_shard_bytes)
    _assert_same(hub.load_safetensors(tmp_path), new)
    names = {p.name for p in tmp_path.iterdir()}
    assert "config.json" in names
    assert ("model.safetensors" in names) == (new_shard_bytes == 2**30)
    assert ("model.safetensors.index.json" in names) == (new_shard_bytes < 2**30)
    shards = {n for n in names if n.startswith("model-")}
    assert shards == ({p.name for p in hub.checkpoint_files(tmp_path)} if new_shard_bytes < 2**30 else set())
    assert not any(n.endswith(".tmp") for n in names)


def test_crash_during_atomic_write_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    hub.write_json(path, {"version": 1})
    monkeypatch.setattr(os, "replace", _crash_on_call(1, os.replace))
    with pytest.raises(OSError, match="simulated crash"):
        hub.write_json(path, {"version": 2})
    monkeypatch.undo()
    assert hub.read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


# ----------------------------------------------------------------------------- downloads from a fake hub

class FakeHub:
    """huggingface.co in miniature, serving one repo's files (a dict name -> bytes) at one revision."""

    def __init__(self, files, repo=REPO, revision="main"):
        self.files, self.repo, self.revision = files, repo, revision
        self.lfs = {n for n in files if n.endswith(".safetensors")}
        self.log = []            # (path with query, headers) of every request
        self.drop_once = set()   # files whose next answer stops halfway and closes the connection
        self.fail_once = {}      # file -> HTTP status to answer once before serving it
        self.advertised = {}     # file -> a (wrong) sha256 to announce instead of the real one
        self.token = None        # when set, a request without "Bearer <token>" gets 401
        self.error_code = None   # when set, the X-Error-Code of every error answer
        self.listing_body = None  # when set, the body of the listing answer
        self.ignore_range = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def sha256(self, name):
        return self.advertised.get(name) or hashlib.sha256(self.files[name]).hexdigest()

    def listing(self):
        siblings = []
        for name, data in self.files.items():
            s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name in self.lfs:
                s["lfs"] = {"sha256": self.sha256(name), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {"id": self.repo, "sha": "0123456789abcdef" * 2 + "01234567", "siblings": siblings}

    def requests(self, kind):
        return [(path, headers) for path, headers in self.log if kind in path]

    def _handler(self):
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub_.log.append((self.path, dict(self.headers)))
                path = unquote(urlsplit(self.path).path)
                if hub_.token and self.headers.get("Authorization") != f"Bearer {hub_.token}":
                    return self.answer(401, b"", {"X-Error-Code": "GatedRepo"})
                if path == f"/api/models/{hub_.repo}/revision/{hub_.revision}":
                    body = hub_.listing_body or json.dumps(hub_.listing()).encode()
                    return self.answer(200, body, {"Content-Type": "application/json"})
                prefix = f"/{hub_.repo}/resolve/{hub_.revision}/"
                if path.startswith(prefix):
                    name = path[len(prefix):]
                    if name not in hub_.files:
                        return self.answer(404, b"", {"X-Error-Code": "EntryNotFound"})
                    if name in hub_.fail_once:
                        return self.answer(hub_.fail_once.pop(name), b"")
                    if name in hub_.lfs:  # like the hub: redirect to the CDN, the sha256 in X-Linked-Etag
                        return self.answer(302, b"", {"Location": f"/cdn/{name}", "X-Linked-Size": len(hub_.files[name]),
                                                      "X-Linked-Etag": f'"{hub_.sha256(name)}"'})
                    return self.serve(name)
                if path.startswith("/cdn/") and path[5:] in hub_.files:
                    return self.serve(path[5:])
                return self.answer(404, b"", {"X-Error-Code": "RepoNotFound"})

            def serve(self, name):
                data, start, status = hub_.files[name], 0, 200
                if self.headers.get("Range") and not hub_.ignore_range:
                    start, status = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-")), 206
                body = data[start:]
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if status == 206 else {}
                if name in hub_.drop_once:  # promise the whole body, send half of it, hang up
                    hub_.drop_once.discard(name)
                    self.answer(status, body[: len(body) // 2], headers, length=len(body))
                    self.close_connection = True
                    return
                self.answer(status, body, headers)

            def answer(self, status, body, headers=(), length=None):
                self.send_response(status)
                headers = dict(headers)
                if status >= 400 and hub_.error_code is not None:
                    headers["X-Error-Code"] = hub_.error_code
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def repo_files(tmp_path):
    """config.json, a 3-shard checkpoint with its index, a stray weights file, and a file `allow` skips."""
    src = tmp_path / "src"
    hub.save_safetensors(_state_dict(), src, max_shard_bytes=3000)
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}
    files["config.json"] = json.dumps({"model_type": "llama", "hidden_size": 16}).encode()
    files["consolidated.safetensors"] = b"not named in the index"
    files["original/params.bin"] = b"\x00" * 100
    return files


@pytest.fixture
def fake_hub(repo_files):
    server = FakeHub(repo_files)
    yield server
    server.close()


def _download(fake_hub, tmp_path, *args, **kwargs):
    return hub.download(REPO, *args, endpoint=fake_hub.url, cache_dir=tmp_path / "cache", **kwargs)


def test_download_repo_then_cached(fake_hub, repo_files, tmp_path):
    path = _download(fake_hub, tmp_path)
    assert path == tmp_path / "cache" / "hub" / "tiny-org--tiny-model" / "main"
    wanted = [n for n in repo_files if n.startswith("model") or n == "config.json"]
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == sorted(wanted)
    for name in wanted:
        assert (path / name).read_bytes() == repo_files[name], name
    _assert_same(hub.load_safetensors(path), _state_dict())
    assert [p for p, _ in fake_hub.requests("/api/")] == [f"/api/models/{REPO}/revision/main?blobs=true"]
    assert len(fake_hub.requests("/resolve/")) == len(wanted)
    assert not fake_hub.requests("consolidated") and not fake_hub.requests("params.bin")
    # a second call only lists the repo again: nothing is fetched
    fake_hub.log.clear()
    assert _download(fake_hub, tmp_path) == path
    assert [p for p, _ in fake_hub.log] == [f"/api/models/{REPO}/revision/main?blobs=true"]
    # named files already there need no network at all
    fake_hub.log.clear()
    _download(fake_hub, tmp_path, ["config.json", "model-00001-of-00003.safetensors"])
    assert fake_hub.log == []


def test_dropped_connection_resumes_with_range(fake_hub, repo_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "CHUNK", 64)  # small chunks, so that most of the half sent reaches the disk
    name = "model-00002-of-00003.safetensors"
    fake_hub.drop_once.add(name)
    path = _download(fake_hub, tmp_path, [name])
    assert (path / name).read_bytes() == repo_files[name]
    cdn = fake_hub.requests(f"/cdn/{name}")
    assert len(cdn) == 2 and "Range" not in cdn[0][1]
    resumed_at = int(cdn[1][1]["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(repo_files[name]) // 2
    assert "retrying" in capsys.readouterr().err
    assert not (path / (name + ".incomplete")).exists()


@pytest.mark.parametrize("ignore_range", [False, True], ids=["server-resumes", "server-ignores-range"])
def test_partial_file_from_earlier_run(fake_hub, repo_files, tmp_path, ignore_range):
    name = "model-00001-of-00003.safetensors"
    fake_hub.ignore_range = ignore_range
    part = tmp_path / "cache" / "hub" / "tiny-org--tiny-model" / "main" / (name + ".incomplete")
    part.parent.mkdir(parents=True)
    # a true prefix when the server resumes; garbage when it sends everything, which must then be overwritten
    part.write_bytes(repo_files[name][:100] if not ignore_range else b"x" * 100)
    path = _download(fake_hub, tmp_path)
    assert (path / name).read_bytes() == repo_files[name]
    assert fake_hub.requests(f"/cdn/{name}")[0][1]["Range"] == "bytes=100-"


def test_server_error_is_retried(fake_hub, repo_files, tmp_path):
    fake_hub.fail_once["config.json"] = 503
    path = _download(fake_hub, tmp_path, ["config.json"])
    assert (path / "config.json").read_bytes() == repo_files["config.json"]
    assert len(fake_hub.requests("config.json")) == 2


def test_not_found(fake_hub, tmp_path):
    with pytest.raises(hub.HubError, match=f"{REPO}@main: nope.json: not found .*404"):
        _download(fake_hub, tmp_path, ["nope.json"])
    with pytest.raises(hub.HubError, match="tiny-org/other@main: listing files: not found"):
        hub.download("tiny-org/other", endpoint=fake_hub.url, cache_dir=tmp_path)


def test_unauthorized_names_hf_token_and_never_shows_it(fake_hub, tmp_path, monkeypatch, capsys):
    fake_hub.token = "the-right-token"
    with pytest.raises(hub.HubError, match="HTTP 401.*gated or private.*set HF_TOKEN") as e:
        _download(fake_hub, tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(hub.HubError, match="HF_TOKEN is set but has no access") as e2:
        _download(fake_hub, tmp_path, ["config.json"])
    out = capsys.readouterr()
    for text in (str(e.value), str(e2.value), out.out, out.err):
        assert TOKEN not in text


@pytest.mark.parametrize("env", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_token_is_sent(fake_hub, repo_files, tmp_path, monkeypatch, env):
    fake_hub.token = TOKEN
    monkeypatch.setenv(env, TOKEN)
    path = _download(fake_hub, tmp_path)
    assert (path / "config.json").read_bytes() == repo_files["config.json"]
    assert fake_hub.log and all(h["Authorization"] == f"Bearer {TOKEN}" for _, h in fake_hub.log)


def test_no_token_no_authorization_header(fake_hub, tmp_path):
    _download(fake_hub, tmp_path, ["config.json"])
    assert fake_hub.log and all("Authorization" not in h for _, h in fake_hub.log)


def test_wrong_checksum_leaves_nothing_in_cache(fake_hub, repo_files, tmp_path):
    name = "model-00003-of-00003.safetensors"
    fake_hub.advertised[name] = "0" * 64
    real = hashlib.sha256(repo_files[name]).hexdigest()
    # the hash from the listing, or from X-Linked-Etag when files are named (no listing)
    for filenames in (None, [name]):
        with pytest.raises(hub.HubError, match=f"{name}: sha256 mismatch: expected {'0' * 64}, got {real}"):
            _download(fake_hub, tmp_path, filenames)
        snapshot = tmp_path / "cache" / "hub" / "tiny-org--tiny-model" / "main"
        assert not (snapshot / name).exists() and not (snapshot / (name + ".incomplete")).exists()


def test_no_network(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(hub.HubError, match="no network .*Connection refused.*put the files in .*tiny-org--tiny-model"):
        hub.download(REPO, endpoint=endpoint, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 5
    # with the files put there by hand (or left by an earlier download), the folder is used as is
    snapshot = tmp_path / "hub" / "tiny-org--tiny-model" / "main"
    hub.write_json(snapshot / "config.json", {})
    assert hub.download(REPO, endpoint=endpoint, cache_dir=tmp_path) == snapshot


def test_resolve(fake_hub, tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path)) == tmp_path
    path = hub.resolve(REPO, endpoint=fake_hub.url, cache_dir=tmp_path / "cache")
    assert (path / "config.json").exists()
    with pytest.raises(hub.HubError, match="neither a local directory nor a hub repo id"):
        hub.resolve("not a repo")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(hub.HubError, match="is a file"):
        hub.resolve(tmp_path / "f.json")
    with pytest.raises(hub.HubError, match="no local directory 'tiny-org/other'"):
        hub.resolve("tiny-org/other", endpoint=fake_hub.url, cache_dir=tmp_path / "cache")


def test_environment_variables_set_endpoint_and_cache(fake_hub, repo_files, tmp_path):
    # HF_ENDPOINT and NANOLLM_CACHE are read when hub is imported, so check them in a fresh interpreter
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "NANOLLM_CACHE": str(tmp_path / "envcache")}
    code = "import hub; print(hub.download('%s', ['config.json']))" % REPO
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "envcache" / "hub" / "tiny-org--tiny-model" / "main"
    assert (Path(out.stdout.strip()) / "config.json").read_bytes() == repo_files["config.json"]


def test_hub_error_is_bad_input():
    # the drivers' errors.run prints BadInput as one line: every hub failure is one
    assert issubclass(hub.HubError, errors.BadInput)


def test_error_code_header_is_shown_only_when_it_is_the_hubs_own(fake_hub, tmp_path):
    with pytest.raises(hub.HubError, match=r"not found \(HTTP 404 EntryNotFound\)$"):
        _download(fake_hub, tmp_path, ["nope.json"])
    # a server (a proxy, a mirror) that echoes what it got into the header: neither the value nor a part of it
    for code in (TOKEN, f"Bearer {TOKEN}", "EntryNotFound " + TOKEN, "x" * 41):
        fake_hub.error_code = code
        with pytest.raises(hub.HubError) as e:
            _download(fake_hub, tmp_path, ["nope.json"])
        assert str(e.value).endswith("not found (HTTP 404)")
        fake_hub.error_code = code
        fake_hub.token = "the-right-token"
        with pytest.raises(hub.HubError, match="HTTP 401: tiny-org/tiny-model is gated") as e:
            _download(fake_hub, tmp_path, ["config.json"])
        assert TOKEN not in str(e.value) and "x" * 41 not in str(e.value)
        fake_hub.token = None


def test_endpoint_credentials_are_never_shown(fake_hub, tmp_path, capsys):
    """HF_ENDPOINT may be https://user:password@mirror/?key=...: no message shows a URL, only repo, file, host."""
    secret = "s3cr3tPassw0rd"
    host = fake_hub.url.removeprefix("http://")
    endpoint = f"http://user:{secret}@{host}/prefix;p={secret}?key={secret}#{secret}"
    messages = []
    for endpoint_, files in ((endpoint, ["nope.json"]),                                       # 404
                             (f"http://user:{secret}@127.0.0.1:{_closed_port()}/?k={secret}", None),   # no network
                             (f"ftp://user:{secret}@{host}", None)):                          # not http(s)
        with pytest.raises(hub.HubError) as e:
            hub.download(REPO, files, endpoint=endpoint_, cache_dir=tmp_path)
        messages.append(str(e.value))
    fake_hub.fail_once["config.json"] = 503          # a retry, announced on stderr
    fake_hub.listing_body = b"<html>a login page</html>"   # a server that is no hub
    with pytest.raises(hub.HubError, match=rf"is not a hub listing; is 127.0.0.1 \(HF_ENDPOINT\) a hub") as e:
        hub.download(REPO, endpoint=f"http://user:{secret}@{host}", cache_dir=tmp_path)
    messages.append(str(e.value))
    hub.download(REPO, ["config.json"], endpoint=f"http://user:{secret}@{host}", cache_dir=tmp_path / "c2")
    out = capsys.readouterr()
    assert "retrying" in out.err and len(messages) == 4
    for text in (*messages, out.out, out.err):
        assert secret not in text and "user:" not in text and "prefix" not in text and "key=" not in text, text


def test_fetch_url_sends_no_token_and_shows_no_url(fake_hub, tmp_path, monkeypatch):
    """fetch_url is for datasets on other servers: the hub token stays home, and a signed URL stays unprinted."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    got = hub.fetch_url(f"{fake_hub.url}/cdn/config.json?sig=abc123", tmp_path / "c.json")
    assert got.read_bytes() == fake_hub.files["config.json"]
    assert fake_hub.log and all("Authorization" not in h for _, h in fake_hub.log)
    with pytest.raises(hub.HubError, match=r"^x.txt \(from 127.0.0.1\): not found \(HTTP 404 RepoNotFound\)$"):
        hub.fetch_url(f"{fake_hub.url}/cdn/missing?sig=abc123", tmp_path / "x.txt")


@pytest.mark.parametrize("source", ["./missing_dir", "../missing", "/no/such/dir", "~/no-such-dir", "out/gpt2/last",
                                    "ckpt/", ".hidden"])
def test_a_path_is_never_looked_up_on_the_hub(fake_hub, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(hub, "BACKOFF", 10.0)   # a network attempt would be seen, and would be slow
    with pytest.raises(hub.HubError, match=f"^{re.escape(repr(source))}: no such directory$"):
        hub.resolve(source)
    assert fake_hub.log == []


def test_a_repo_id_is_looked_up_and_a_directory_wins(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "ENDPOINT", fake_hub.url)
    with pytest.raises(hub.HubError, match="tiny-org/missing@main: listing files: not found"):
        hub.resolve("tiny-org/missing", cache_dir=tmp_path / "cache")
    assert len(fake_hub.log) == 1
    (tmp_path / "tiny-org" / "missing").mkdir(parents=True)   # a local folder of the same name is used as is
    assert hub.resolve("tiny-org/missing") == Path("tiny-org/missing")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.resolve("~") == tmp_path / "home"
    with pytest.raises(hub.HubError, match="empty source"):
        hub.resolve("")


@pytest.mark.parametrize("repo_id,ok", [
    ("openai-community/gpt2", True), ("meta-llama/Llama-3.2-1B-Instruct", True), ("Qwen/Qwen2.5-0.5B", True),
    ("a/b", True), ("user_1/model_", True), ("own--er/name", False), ("owner/na..me", False), ("-owner/name", False),
    ("owner/name.", False), ("owner/na me", False), ("owner/näme", False), ("owner/", False), ("owner/a/b", False),
    ("o" * 97 + "/name", False), ("owner/name\n", False)])
def test_repo_id_follows_the_hubs_rule(repo_id, ok):
    assert bool(hub.REPO_ID.fullmatch(repo_id)) == ok


def test_offline_uses_the_cache_or_says_so(fake_hub, repo_files, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "OFFLINE", True)
    with pytest.raises(hub.HubError, match=r"tiny-org/tiny-model@main: HF_HUB_OFFLINE is set and .* no config.json"):
        _download(fake_hub, tmp_path)
    with pytest.raises(hub.HubError, match="has no model-00001-of-00003.safetensors"):
        _download(fake_hub, tmp_path, ["model-00001-of-00003.safetensors"])
    assert fake_hub.log == []
    monkeypatch.setattr(hub, "OFFLINE", False)
    path = _download(fake_hub, tmp_path)
    fake_hub.log.clear()
    monkeypatch.setattr(hub, "OFFLINE", True)
    assert _download(fake_hub, tmp_path) == path and _download(fake_hub, tmp_path, ["config.json"]) == path
    assert fake_hub.log == []
    # read from the environment when hub is imported, with huggingface_hub's spellings (in a fresh interpreter)
    code = ("import importlib, os, hub\nfor v in ('1', 'true', 'ON', '0', 'false', ''):\n"
            "    os.environ['HF_HUB_OFFLINE'] = v\n    print(importlib.reload(hub).OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True"] * 3 + ["False"] * 3, out.stderr


def test_bad_listing_entries_are_one_line(fake_hub, tmp_path):
    for body in (b'{"siblings": [{"size": 3}]}', b'{"siblings": ["config.json"]}', b'{"siblings": 3}', b"[]"):
        fake_hub.listing_body = body
        with pytest.raises(hub.HubError, match="listing files: the answer is not a hub listing"):
            _download(fake_hub, tmp_path)


def test_a_token_with_a_line_break_is_refused_unshown(fake_hub, tmp_path, monkeypatch):
    fake_hub.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", f" {TOKEN}\n")   # pasted with its newline: the token is the rest
    _download(fake_hub, tmp_path, ["config.json"])
    assert fake_hub.log[-1][1]["Authorization"] == f"Bearer {TOKEN}"
    for bad in (f"{TOKEN}\nX-Other: 1", f"{TOKEN} {TOKEN}", f"{TOKEN}é"):
        monkeypatch.setenv("HF_TOKEN", bad)
        with pytest.raises(hub.HubError, match="HF_TOKEN .* holds a space, a line break or a non-ASCII") as e:
            _download(fake_hub, tmp_path, ["model.safetensors.index.json"])
        assert TOKEN not in str(e.value)
