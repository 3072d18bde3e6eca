"""Tests for hub.py: downloads through huggingface_hub from a fake hub, the standard cache used as is, one-line errors.

The fake hub is a real HTTP server on 127.0.0.1 answering what huggingface_hub 2.4 asks of huggingface.co:
GET /api/models/<repo>/revision/<rev> (the commit), GET /api/models/<repo>/tree/<commit> (the files), and HEAD/GET
/<repo>/resolve/<rev>/<file> (X-Repo-Commit, ETag; large files redirected to a "CDN" on another port with their
sha256 in X-Linked-Etag). huggingface_hub reads HF_* variables when it is imported, so in this process the tests set
the constants it reads at call time (the `hf` fixture), and in subprocesses they set the environment.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants

import bpe
import checkpoint_io
import errors
import gpt2
import hub

ROOT = Path(__file__).resolve().parent.parent
REPO = "tiny-org/tiny-model"
COMMIT = "0123456789abcdef" * 2 + "01234567"
TOKEN = "hf_fakeTestToken0123456789"


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _etag(name, data):
    """The hub's ETag: the sha256 of an LFS file, the git blob sha1 of any other."""
    if name.endswith((".safetensors", ".pth", ".bin")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """huggingface.co in miniature: one model repo (files: name -> bytes) at one commit, and a CDN for its LFS files.
    gated: /resolve/ answers 401 GatedRepo without `token`; private: everything answers 401 RepoNotFound without it."""

    def __init__(self, files, repo=REPO, revision="main", commit=COMMIT):
        self.files, self.repo, self.revision, self.commit = files, repo, revision, commit
        self.log = []            # (server, method, path with query, headers in lower case) of every request
        self.token = None
        self.gated = self.private = False
        self.login_page = False  # every answer of the hub is an HTML page (a proxy that wants a login, say)
        self.drop_once = set()   # files whose next body stops halfway and closes the connection
        self.hub, self.cdn = self._server("hub"), self._server("cdn")
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def requests(self, server=None, method=None):
        return [(m, p, h) for s, m, p, h in self.log if server in (None, s) and method in (None, m)]

    def fetched(self):
        """The files whose bytes were sent (GET), from the hub or the CDN."""
        names = {_etag(n, d): n for n, d in self.files.items()}
        got = []
        for _, path, _ in self.requests(method="GET"):
            path = unquote(urlsplit(path).path)
            if path.startswith(f"/{self.repo}/resolve/"):
                got.append(path.split("/", 5)[5])
            elif path.startswith("/cdn/"):
                got.append(names[path[5:]])
        return sorted(got)

    def tree(self):
        entries = [{"type": "directory", "path": d, "oid": "f" * 40}
                   for d in sorted({n.rsplit("/", 1)[0] for n in self.files if "/" in n})]
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if self._lfs(name):
                entry["lfs"] = {"oid": _etag(name, data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _lfs(self, name):
        return name.endswith((".safetensors", ".pth", ".bin"))

    def _server(self, role):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.handle_request(body=False)

            def do_GET(self):
                self.handle_request(body=True)

            def handle_request(self, body):
                fake.log.append((role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                self.body = body
                path = unquote(urlsplit(self.path).path)
                authorized = fake.token is not None and self.headers.get("Authorization") == f"Bearer {fake.token}"
                if role == "cdn":
                    name = next((n for n, d in fake.files.items() if path == f"/cdn/{_etag(n, d)}"), None)
                    return self.serve(name) if name else self.answer(404)
                if fake.login_page:
                    return self.answer(200, {"Content-Type": "text/html"}, b"<html>please log in</html>")
                commit = {"X-Repo-Commit": fake.commit}
                api, resolve = f"/api/models/{fake.repo}/", f"/{fake.repo}/resolve/"
                if not path.startswith((api, resolve)):   # another repo: the hub says the same of a private one
                    return self.answer(401, {"X-Error-Code": "RepoNotFound"})
                if fake.private and not authorized:
                    return self.answer(401, {"X-Error-Code": "RepoNotFound"})
                if path.startswith(api):
                    rev = path[len(api):].split("/", 1)[1]
                    if path == f"{api}revision/{fake.revision}" or path == f"{api}revision/{fake.commit}":
                        siblings = [{"rfilename": n} for n in fake.files]
                        return self.json({"id": fake.repo, "sha": fake.commit, "siblings": siblings})
                    if path == f"{api}tree/{fake.commit}":
                        return self.json(fake.tree())
                    return self.answer(404, {"X-Error-Code": "RevisionNotFound"}) if rev else self.answer(404)
                rev, _, name = path[len(resolve):].partition("/")
                if rev not in (fake.revision, fake.commit):
                    return self.answer(404, {"X-Error-Code": "RevisionNotFound"})
                if fake.gated and not authorized:
                    return self.answer(401, {"X-Error-Code": "GatedRepo"} | commit)
                if name not in fake.files:
                    return self.answer(404, {"X-Error-Code": "EntryNotFound"} | commit)
                data = fake.files[name]
                if fake._lfs(name):   # like the hub: a redirect to a signed CDN URL, with the file's facts
                    return self.answer(302, commit | {
                        "Location": f"{fake.cdn_url}/cdn/{_etag(name, data)}?Signature=cdn-secret",
                        "X-Linked-Etag": f'"{_etag(name, data)}"', "X-Linked-Size": str(len(data)),
                        "ETag": '"some-pointer-etag"'})
                return self.serve(name, commit | {"ETag": f'"{_etag(name, data)}"'})

            def serve(self, name, headers=None):
                data, start, status = fake.files[name], 0, 200
                headers = dict(headers or {})
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if self.body and name in fake.drop_once:   # promise the whole body, send half, hang up
                    fake.drop_once.discard(name)
                    self.answer(status, headers, body[: len(body) // 2], length=len(body))
                    self.close_connection = True
                    return
                self.answer(status, headers, body)

            def json(self, obj):
                self.answer(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

            def answer(self, status, headers=None, body=b"", length=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.body:
                    self.wfile.write(body)
                    self.wfile.flush()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return server

    def close(self):
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


def tiny_checkpoint(directory, max_shard_bytes=2**30):
    """A tiny GPT-2 in the official layout with our tokenizer: (directory, model)."""
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.Config(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=16, eos_token_id=256))
    model.save_pretrained(directory)
    if max_shard_bytes < 2**30:
        checkpoint_io.save_safetensors(checkpoint_io.load_safetensors(directory), directory,
                                       max_shard_bytes=max_shard_bytes)
    bpe.train("", 257, special_tokens={"<|endoftext|>": 256}).save(Path(directory) / bpe.SAVE_NAME)
    return Path(directory), model


def repo_files(tmp_path, max_shard_bytes=20_000):
    """What a hub repo carries: the checkpoint (sharded), and copies a loader must not fetch."""
    src, _ = tiny_checkpoint(tmp_path / "src", max_shard_bytes)
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}
    files |= {"pytorch_model.bin": b"pickled duplicate", "model-00009-of-00009.safetensors": b"not in the index",
              "README.md": b"# tiny", "original/params.json": b'{"dim": 16}', "original/consolidated.00.pth": b"x" * 99,
              "original/tokenizer.model": b"ranks"}
    return files


def put_in_cache(cache, repo, files, commit=COMMIT, revision="main"):
    """Lay files out as huggingface_hub does: blobs/<etag>, snapshots/<commit>/<name> -> ../../blobs/<etag>,
    refs/<revision> holding the commit. Returns the snapshot folder."""
    folder = Path(cache) / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / _etag(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


def use_hub(monkeypatch, url, cache):
    """Point huggingface_hub in this process at the hub url and the cache folder: the constants it read from
    HF_ENDPOINT and HF_HOME when it was imported."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(autouse=True)
def hf(monkeypatch, tmp_path):
    """A private hub cache and token file, online, and an endpoint where nothing answers: never the user's."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Hf:
        cache = tmp_path / "hf" / "hub"

        @staticmethod
        def endpoint(url):
            use_hub(monkeypatch, url, Hf.cache)

        @staticmethod
        def offline():
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    Hf.endpoint(f"http://127.0.0.1:{_closed_port()}")
    return Hf


@pytest.fixture
def fake_hub(tmp_path, hf):
    server = FakeHub(repo_files(tmp_path))
    hf.endpoint(server.url)
    yield server
    server.close()


def _wanted(files):
    index = json.loads(files[checkpoint_io.INDEX])
    return sorted({"config.json", bpe.SAVE_NAME, checkpoint_io.INDEX, *index["weight_map"].values()})


# ----------------------------------------------------------------------------- downloads

def test_download_takes_only_what_the_model_reads(fake_hub, hf, tmp_path):
    path = hub.download(REPO)
    assert path == hf.cache / "models--tiny-org--tiny-model" / "snapshots" / COMMIT
    wanted = _wanted(fake_hub.files)
    assert len([n for n in wanted if n.startswith("model-")]) >= 2   # sharded, so the index decides
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == wanted
    assert fake_hub.fetched() == wanted   # no .bin, no stray shard, no README, no original/
    for name in wanted:
        assert (path / name).read_bytes() == fake_hub.files[name], name
    # the cache as huggingface_hub keeps it (and as put_in_cache lays it out for the offline tests)
    assert (path.parent.parent / "refs" / "main").read_text() == COMMIT
    config = path / "config.json"
    assert config.is_symlink() and config.resolve().parent == path.parent.parent / "blobs"
    # and load through the model file as the checkpoint the repo was made from does
    loaded = gpt2.GPT.from_pretrained(REPO).state_dict()
    original = gpt2.GPT.from_pretrained(tmp_path / "src").state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in loaded)


def test_a_second_download_fetches_nothing(fake_hub):
    path = hub.download(REPO)
    fake_hub.log.clear()
    assert hub.download(REPO) == path
    assert fake_hub.fetched() == [] and not fake_hub.requests("cdn")


def test_unsharded_repo_and_no_weights(tmp_path, hf):
    src, _ = tiny_checkpoint(tmp_path / "src")
    server = FakeHub({p.name: p.read_bytes() for p in src.iterdir()} | {"pytorch_model.bin": b"x"})
    hf.endpoint(server.url)
    try:
        path = hub.download(REPO)
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", bpe.SAVE_NAME]
        del server.files["model.safetensors"]
        server.commit = "f" * 40   # a new commit, whose listing the library fetches anew
        with pytest.raises(hub.HubError, match=rf"^{REPO}@main: the repo has no file model.safetensors; only "
                                               rf"safetensors weights are read"):
            hub.download(REPO)
        # a tokenizer alone needs no weights
        assert (hub.download(REPO, weights=False) / bpe.SAVE_NAME).is_file()
    finally:
        server.close()


def test_original_only_when_asked_for(fake_hub):
    path = hub.download(REPO, original=True)
    assert {n for n in fake_hub.fetched() if n.startswith("original/")} == {
        "original/params.json", "original/consolidated.00.pth", "original/tokenizer.model"}
    assert (path / "original" / "consolidated.00.pth").read_bytes() == fake_hub.files["original/consolidated.00.pth"]


def test_tokenizer_only(fake_hub):
    path = hub.download(REPO, weights=False)
    assert fake_hub.fetched() == ["config.json", bpe.SAVE_NAME]
    assert bpe.load(path).vocab_size == 257


def test_dropped_connection_resumes_and_the_warning_shows_no_url(fake_hub, monkeypatch, caplog):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)   # so that part of the half sent reaches the disk
    shard = next(n for n in _wanted(fake_hub.files) if n.startswith("model-"))
    fake_hub.drop_once.add(shard)
    path = hub.download(REPO)
    assert (path / shard).read_bytes() == fake_hub.files[shard]
    cdn = [h for _, p, h in fake_hub.requests("cdn", "GET") if _etag(shard, fake_hub.files[shard]) in p]
    assert len(cdn) == 2 and "range" not in cdn[0] and cdn[1]["range"].startswith("bytes=")
    # huggingface_hub's warning names the signed CDN URL it retries: shown with the host alone (the record as its
    # own stderr handler passes it on to the root logger's, here pytest's)
    assert "Error while downloading from 127.0.0.1 " in caplog.text
    assert "cdn-secret" not in caplog.text and "/cdn/" not in caplog.text and "http" not in caplog.text


def test_token_goes_to_the_hub_and_not_to_the_cdn(fake_hub, monkeypatch, capsys):
    fake_hub.token = TOKEN
    fake_hub.private = True
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.download(REPO)
    assert fake_hub.requests("hub") and all(h.get("authorization") == f"Bearer {TOKEN}"
                                            for _, _, h in fake_hub.requests("hub"))
    assert fake_hub.requests("cdn") and all("authorization" not in h for _, _, h in fake_hub.requests("cdn"))
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_the_login_token_is_used(fake_hub, hf):
    """`hf auth login` saves the token under HF_HOME: no HF_TOKEN needed."""
    fake_hub.token = TOKEN
    fake_hub.gated = True
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    hub.download(REPO)
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in fake_hub.requests("hub"))


# ----------------------------------------------------------------------------- the cache, offline

@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no-network"])
def test_a_model_in_the_cache_loads_with_no_network(tmp_path, hf, how):
    """Put there by transformers, vLLM or `hf download`: used as is. Offline, not even a hub that answers is asked."""
    src, model = tiny_checkpoint(tmp_path / "src", max_shard_bytes=20_000)
    snapshot = put_in_cache(hf.cache, REPO, {p.name: p.read_bytes() for p in src.iterdir()})
    server = FakeHub(repo_files(tmp_path / "other"))
    if how == "HF_HUB_OFFLINE":
        hf.offline()
        hf.endpoint(server.url)
    try:
        assert hub.resolve(REPO) == snapshot
        loaded = gpt2.GPT.from_pretrained(REPO)
    finally:
        server.close()
    assert server.log == []
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_offline_a_cache_without_an_optional_file_still_loads(fake_hub, hf):
    """The library's listing of an earlier download names generation_config.json; a cache that lacks it (deleted,
    or fetched by a tool that skipped it) is still complete for the model."""
    fake_hub.files["generation_config.json"] = b'{"eos_token_id": 256}'
    path = hub.download(REPO)
    (path / "generation_config.json").unlink()
    hf.offline()
    assert hub.download(REPO) == path
    assert gpt2.GPT.from_pretrained(REPO).config.vocab_size == 257


def test_offline_and_not_cached_is_one_line(tmp_path, hf):
    hf.offline()
    with pytest.raises(hub.HubError, match=rf"^{REPO}@main: HF_HUB_OFFLINE is set and the hub cache "
                                           rf"\({re.escape(str(hf.cache))}\) lacks its files; unset"):
        hub.download(REPO)
    # a cache that has the config but lacks a shard names the shard
    src, _ = tiny_checkpoint(tmp_path / "src", max_shard_bytes=20_000)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    missing = sorted(n for n in files if n.startswith("model-"))[-1]
    put_in_cache(hf.cache, REPO, {n: d for n, d in files.items() if n != missing})
    with pytest.raises(hub.HubError, match=rf"HF_HUB_OFFLINE is set and .* lacks {missing}; unset HF_HUB_OFFLINE"):
        hub.download(REPO)


# ----------------------------------------------------------------------------- errors: one line, no token

@pytest.fixture
def error_of(monkeypatch, capsys, caplog):
    """error_of(fn): the HubError fn raises with HF_TOKEN set to a recognisable secret, which neither the message nor
    any output (ours, or the library's log) shows."""
    def error_of(fn):
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with pytest.raises(hub.HubError) as e:
            fn()
        out = capsys.readouterr()
        message = str(e.value)
        assert "\n" not in message and "http" not in message
        for text in (message, out.out, out.err, caplog.text):
            assert TOKEN not in text
        return message
    return error_of


def test_gated_repo_says_how_to_log_in(fake_hub, error_of):
    fake_hub.gated = True
    fake_hub.token = "the-right-token"
    with pytest.raises(hub.HubError, match=rf"^{REPO}@main: a gated repo; request access on its hub page, then log "
                                           r"in with `hf auth login` \(or set HF_TOKEN\)$"):
        hub.download(REPO)
    message = error_of(lambda: hub.download(REPO))
    assert message == f"{REPO}@main: a gated repo; the token in use has no access to it: request access on its hub " \
                      f"page, or log in as another user"


def test_no_such_repo_revision_or_file(fake_hub, error_of):
    message = error_of(lambda: hub.download("tiny-org/other"))
    assert message.startswith("tiny-org/other@main: no such repo on the hub (127.0.0.1), or a private one")
    message = error_of(lambda: hub.download(REPO, revision="v9"))
    assert message == f"{REPO}@v9: the repo has no such revision"
    shard = [n for n in _wanted(fake_hub.files) if n.startswith("model-")][1]
    del fake_hub.files[shard]   # named in the index, not in the repo
    message = error_of(lambda: hub.download(REPO))
    assert message == f"{REPO}@main: the repo has no file {shard}"


def test_no_network_is_one_line(hf, error_of):
    message = error_of(lambda: hub.download(REPO))
    assert message == (f"{REPO}@main: no network ([Errno 111] Connection refused), and the hub cache ({hf.cache}) "
                       f"lacks its files; connect once to download, or pass a local directory")


def test_an_endpoint_that_is_no_hub_is_one_line(fake_hub, error_of):
    fake_hub.login_page = True
    assert error_of(lambda: hub.download(REPO)) == \
        f"{REPO}@main: 127.0.0.1 (HF_ENDPOINT) does not answer as a hub"


def test_a_token_with_a_line_break_is_refused_unshown(fake_hub, monkeypatch):
    for bad in (f"{TOKEN}\nX-Other: 1", f"{TOKEN} {TOKEN}", f"{TOKEN}é"):
        monkeypatch.setenv("HF_TOKEN", bad)
        with pytest.raises(hub.HubError, match="holds a space, a line break or a non-ASCII character") as e:
            hub.download(REPO)
        assert TOKEN not in str(e.value)
    assert fake_hub.log == []


def test_hub_error_is_bad_input():
    # the drivers' errors.run prints BadInput as one line: every hub failure is one
    assert issubclass(hub.HubError, errors.BadInput)


# ----------------------------------------------------------------------------- sources: a path or a repo id

def test_resolve(fake_hub, tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path)) == tmp_path
    assert (hub.resolve(REPO) / "config.json").exists()
    with pytest.raises(hub.HubError, match="neither a local directory nor a hub repo id"):
        hub.resolve("not a repo")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(hub.HubError, match="is a file"):
        hub.resolve(tmp_path / "f.json")
    with pytest.raises(hub.HubError, match=r"no such repo.* \(and there is no local directory 'tiny-org/other'\)$"):
        hub.resolve("tiny-org/other")


@pytest.mark.parametrize("source", ["./missing_dir", "../missing", "/no/such/dir", "~/no-such-dir", "out/gpt2/last",
                                    "ckpt/", ".hidden"])
def test_a_path_is_never_looked_up_on_the_hub(fake_hub, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(hub.HubError, match=f"^{re.escape(repr(source))}: no such directory$"):
        hub.resolve(source)
    assert fake_hub.log == []


def test_a_local_directory_wins_over_a_repo_id(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "tiny-model").mkdir(parents=True)
    assert hub.resolve(REPO) == Path(REPO)
    assert fake_hub.log == []
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


# ----------------------------------------------------------------------------- plain URLs (not the hub)

def test_fetch_url_sends_no_token_and_shows_no_url(fake_hub, tmp_path, monkeypatch):
    """fetch_url is for datasets on other servers: the hub token stays home, and a signed URL stays unprinted."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    name = "config.json"
    got = hub.fetch_url(f"{fake_hub.url}/{REPO}/resolve/main/{name}?sig=abc123", tmp_path / "c.json")
    assert got.read_bytes() == fake_hub.files[name]
    assert fake_hub.log and all("authorization" not in h for _, _, h in fake_hub.requests())
    with pytest.raises(hub.HubError, match=r"^x.txt \(from 127.0.0.1\): HTTP 404$"):
        hub.fetch_url(f"{fake_hub.url}/{REPO}/resolve/main/missing?sig=abc123", tmp_path / "x.txt")
    with pytest.raises(hub.HubError, match=r"^x.txt \(from 127.0.0.1\): \[Errno 111\] Connection refused; check"):
        hub.fetch_url(f"http://127.0.0.1:{_closed_port()}/x?sig=abc123", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


# ----------------------------------------------------------------------------- the environment, in subprocesses

def _env(tmp_path, **hf):
    """An explicit environment: HF_HOME in tmp_path, no token, no progress bars, no telemetry, plus hf."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HOME": str(tmp_path / "home"), "NANOLLM_CACHE": str(tmp_path / "nanollm"), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}
    return env | hf


def _run(args, env, timeout=120):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def test_environment_variables_reach_the_library(tmp_path):
    """HF_HOME, HF_ENDPOINT and HF_TOKEN, as huggingface_hub reads them when it is imported."""
    server = FakeHub(repo_files(tmp_path))
    server.token, server.private = TOKEN, True
    try:
        env = _env(tmp_path, HF_ENDPOINT=server.url, HF_TOKEN=TOKEN)
        rc, out = _run(["-c", f"import hub; print(hub.download({REPO!r}))"], env)
    finally:
        server.close()
    assert rc == 0, out
    assert Path(out.strip().splitlines()[-1]) == tmp_path / "hf" / "hub" / "models--tiny-org--tiny-model" / \
        "snapshots" / COMMIT
    assert server.fetched() == _wanted(server.files) and TOKEN not in out


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """sample.py <hub id> in subprocesses: {case: (exit status, output)}, two or more at a time."""
    from concurrent.futures import ThreadPoolExecutor
    tmp = tmp_path_factory.mktemp("cli")
    src, _ = tiny_checkpoint(tmp / "src")
    put_in_cache(tmp / "cached" / "hf" / "hub", REPO, {p.name: p.read_bytes() for p in src.iterdir()})
    server = FakeHub(repo_files(tmp))
    gated = FakeHub(repo_files(tmp), repo="tiny-org/gated")
    gated.gated, gated.token = True, "the-right-token"
    closed = f"http://127.0.0.1:{_closed_port()}"
    sample = ["sample.py", REPO, "--prompt", "hi", "--max_new_tokens", "4", "--temperature", "0"]
    cases = {   # case: (argv, HF_HOME's parent, extra environment)
        "cached-offline": (sample, tmp / "cached", {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": closed}),
        "download": (sample, tmp / "download", {"HF_ENDPOINT": server.url}),
        "offline-not-cached": (sample, tmp / "empty", {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": server.url}),
        "no-network": (sample, tmp / "empty", {"HF_ENDPOINT": closed}),
        "gated": (["sample.py", "tiny-org/gated"], tmp / "empty", {"HF_ENDPOINT": gated.url}),
        "no-such-repo": (["sample.py", "tiny-org/nope"], tmp / "empty", {"HF_ENDPOINT": server.url}),
    }

    def run(case):
        argv, home, extra = case
        return _run(argv, _env(home, HF_TOKEN=TOKEN, **extra), timeout=300)

    try:
        with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
            return dict(zip(cases, pool.map(run, cases.values()))), server
    finally:
        server.close()
        gated.close()


@pytest.mark.parametrize("case", ["cached-offline", "download"])
def test_cli_samples_a_hub_id(cli_runs, case):
    runs, _ = cli_runs
    rc, out = runs[case]
    assert rc == 0 and out.startswith("hi") and TOKEN not in out, out


@pytest.mark.parametrize("case, message", [
    ("offline-not-cached", f"error: {REPO}@main: HF_HUB_OFFLINE is set and the hub cache"),
    ("no-network", f"error: {REPO}@main: no network ([Errno 111] Connection refused), and the hub cache"),
    ("gated", "error: tiny-org/gated@main: a gated repo; the token in use has no access to it"),
    ("no-such-repo", "error: tiny-org/nope@main: no such repo on the hub (127.0.0.1), or a private one"),
])
def test_cli_hub_failures_are_one_line(cli_runs, case, message):
    rc, out = cli_runs[0][case]
    assert rc == 1 and "Traceback" not in out and TOKEN not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(message) and "(and there is no local directory" in last, out
