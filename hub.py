"""
Fetch model files from the Hugging Face hub, and read/write (sharded) safetensors checkpoints atomically.

    >>> path = hub.download("openai-community/gpt2")   # ~/.cache/nanollm/hub/openai-community--gpt2/main
    >>> sd = hub.load_safetensors(path)                 # {"wte.weight": tensor (50257, 768), ...}
    >>> hub.save_safetensors(sd, "out", max_shard_bytes=2**28)
    >>> sorted(p.name for p in hub.checkpoint_files("out"))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']

The hub speaks plain HTTP: GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true lists a repo
("siblings": [{"rfilename", "size", "lfs": {"sha256", "size"}}]), and GET {endpoint}/{repo}/resolve/{rev}/{file}
returns a file. Large (LFS) files answer with a redirect to a CDN that honors Range requests, and the hub
sends their sha256 in the X-Linked-Etag header as well as in the listing.
"""
import fnmatch
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import errors

CACHE_DIR = Path(os.environ.get("NANOLLM_CACHE") or Path.home() / ".cache" / "nanollm")
ENDPOINT = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
# huggingface_hub's switch: only what the cache holds, never the network
OFFLINE = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
RETRIES = 4          # tries per request on connection errors, timeouts and 5xx answers
BACKOFF = 0.5        # seconds before the 2nd try; doubles for each further one (0.5, 1, 2)
TIMEOUT = (10, 60)   # seconds to connect, and to wait for the next bytes of an answer
CHUNK = 2**20        # bytes read at a time; a dropped connection loses at most the chunk in flight
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# the hub's rule for ids: ASCII letters, digits, '_', '-', '.'; each part starts and ends with a letter, digit or
# '_'; no '--' (our cache folders join owner and name with it) and no '..'
REPO_ID = re.compile(r"(?!.*(--|\.\.))\w(?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?", re.ASCII)
# the X-Error-Code values the hub sends; anything else a server puts there is not shown (it may echo a token)
HUB_ERROR_CODES = {"GatedRepo", "RepoNotFound", "EntryNotFound", "RevisionNotFound", "DisabledRepo"}


class HubError(errors.BadInput):
    """Every failure of this module, as one line: which repo or file, what happened, what to do."""


class _NoNetwork(HubError):
    """The endpoint could not be reached at all."""


class _Transient(Exception):
    """A 5xx/429 answer or a body cut short: worth another try."""


# ----------------------------------------------------------------------------- downloading

def _token():
    token = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    if not re.fullmatch(r"[!-~]*", token):
        # else requests refuses the header with an error that quotes it, token and all
        raise HubError("HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) holds a space, a line break or a non-ASCII "
                       "character, which no token has; set it to the token alone (not shown here)")
    return token or None


def _headers(hub_file):
    # identity: Range offsets count the file's own bytes, which a gzip-encoded answer would not
    headers = {"Accept-Encoding": "identity", "User-Agent": "nanollm-hub"}
    if hub_file and _token():   # the token is for the hub, not for every server a dataset comes from
        # requests drops this header when a redirect leaves the host, so the CDN never sees the token
        headers["Authorization"] = f"Bearer {_token()}"
    return headers


def _reason(e):
    """What went wrong, as '[Errno 111] Connection refused' or 'timed out': never the text of a requests error,
    which holds the URL (its query or user:password@ may carry credentials)."""
    if isinstance(e, _Transient):
        return str(e)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
    return m.group(0).strip() if m else "timed out" if isinstance(e, requests.Timeout) else type(e).__name__


def _check(r, what, repo_id):
    """Raise HubError for a 4xx answer and _Transient for a 5xx or 429 one. Neither shows the URL, nor an error
    code other than the hub's own: a server may echo credentials in its headers."""
    if r.status_code < 400:
        return
    code = f"HTTP {r.status_code}" + (f" {r.headers['X-Error-Code']}"
                                      if r.headers.get("X-Error-Code") in HUB_ERROR_CODES else "")
    if r.status_code in (401, 403) and repo_id:
        todo = "HF_TOKEN is set but has no access to it" if _token() else "set HF_TOKEN to an access token"
        raise HubError(f"{what}: {code}: {repo_id} is gated or private (or does not exist); "
                       f"request access on its hub page, and {todo}")
    if r.status_code == 404:
        raise HubError(f"{what}: not found ({code})")
    if r.status_code >= 500 or r.status_code == 429:
        raise _Transient(code)
    raise HubError(f"{what}: {code}")


def _retry(fn, what, snapshot):
    """fn() with up to RETRIES tries on network errors, waiting BACKOFF, 2*BACKOFF, ... in between."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Transient) as e:
            if attempt + 1 == RETRIES:
                if isinstance(e, requests.ConnectionError):
                    raise _NoNetwork(f"{what}: no network ({_reason(e)}); for offline use put the files in "
                                     f"{snapshot}, or pass a local directory instead of the repo id") from None
                raise HubError(f"{what}: {_reason(e)} after {RETRIES} tries; run again to resume") from None
            wait = BACKOFF * 2**attempt
            print(f"hub: {what}: {_reason(e)}; retrying in {wait:g}s", file=sys.stderr)
            time.sleep(wait)


def _list_repo(repo_id, revision, endpoint, allow, snapshot):
    """{filename: (size, sha256 or None)} of the repo's files that match one of the allow patterns."""
    url = f"{endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
    what = f"{repo_id}@{revision}: listing files"

    def get():
        r = requests.get(url, params={"blobs": "true"}, headers=_headers(True), timeout=TIMEOUT)
        _check(r, what, repo_id)
        try:
            siblings = r.json()["siblings"]
            return [(s["rfilename"], s.get("size"), s.get("lfs") or {}) for s in siblings]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HubError(f"{what}: the answer is not a hub listing; is {urlsplit(endpoint).hostname} "
                           f"(HF_ENDPOINT) a hub?") from None

    files = {}
    for name, size, lfs in _retry(get, what, snapshot):
        if any(fnmatch.fnmatch(name, pattern) for pattern in allow):
            files[name] = (lfs.get("size", size), lfs.get("sha256"))
    return files


def _linked_sha256(r):
    """The sha256 of an LFS file: the hub's X-Linked-Etag header, on the redirect or the final answer."""
    for answer in (*r.history, r):
        etag = answer.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
    return None


def _fetch(url, dest, size, sha256, what, repo_id, snapshot):
    """Download url into dest.incomplete (resuming what is there with a Range request), verify, rename.
    repo_id: the hub repo the file is from (None: a plain URL, fetched without the token)."""
    part = dest.with_name(dest.name + ".incomplete")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def attempt():
        nonlocal sha256
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have >= size:
            if have == size:  # a previous run got every byte but stopped before the rename
                return
            have = 0
        headers = _headers(repo_id is not None) | ({"Range": f"bytes={have}-"} if have else {})
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            if r.status_code == 416:  # "range not satisfiable": the partial file is no prefix of this one
                part.unlink()
                raise _Transient("HTTP 416; starting over")
            _check(r, what, repo_id)
            if r.status_code != 206:
                have = 0  # the server sent the whole file, not the range asked for
            sha256 = sha256 or _linked_sha256(r)
            total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else size
            bar = tqdm(desc=dest.name, total=total, initial=have, unit="B", unit_scale=True, disable=None)
            with open(part, "ab" if have else "wb") as f, bar:
                for chunk in r.iter_content(chunk_size=CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        if size is not None and part.stat().st_size < size:
            raise _Transient(f"got {part.stat().st_size} of {size} bytes")

    _retry(attempt, what, snapshot)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise HubError(f"{what}: got {got} bytes where the hub lists {size}; deleted it, run again")
    if sha256:
        with open(part, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != sha256:
            part.unlink()
            raise HubError(f"{what}: sha256 mismatch: expected {sha256}, got {actual}; deleted it, run again")
    os.replace(part, dest)
    fsync_dir(dest.parent)


def download(repo_id, filenames=None, *, revision="main", cache_dir=None, endpoint=None,
             allow=("*.json", "*.safetensors", "*.txt", "*.model", "*.bpe", "*.tiktoken")):
    """
    Fetch files of a hub model repo into CACHE_DIR/hub/<owner>--<name>/<revision>/ and return that folder.
    filenames=None takes every listed file that matches `allow`, and of the *.safetensors only the shards
    that model.safetensors.index.json names (repos often carry other copies of the weights too).
    Files already in the folder are not fetched again.

        >>> download("openai-community/gpt2", ["config.json"]).joinpath("config.json").exists()
        True
    """
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise HubError(f"{repo_id!r} is not a hub repo id of the form 'owner/name'")
    endpoint = (endpoint or ENDPOINT).rstrip("/")
    if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).hostname:
        raise HubError("HF_ENDPOINT is not an http(s):// URL")   # not shown: it may hold user:password@
    snapshot = Path(cache_dir or CACHE_DIR) / "hub" / repo_id.replace("/", "--") / revision.replace("/", "--")
    if OFFLINE:
        missing = [n for n in filenames or ["config.json"] if not (snapshot / n).exists()]
        if missing:
            raise HubError(f"{repo_id}@{revision}: HF_HUB_OFFLINE is set and {snapshot} has no {missing[0]}; "
                           f"unset it to download")
        return snapshot
    if filenames is None:
        try:
            files = _list_repo(repo_id, revision, endpoint, allow, snapshot)
        except _NoNetwork:
            if not (snapshot / "config.json").exists():
                raise
            print(f"hub: no network; using the files already in {snapshot}", file=sys.stderr)
            return snapshot
    else:
        files = {name: (None, None) for name in filenames}
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise HubError(f"{repo_id}: refusing file name {name!r}, which points outside {snapshot}")

    def get(name):
        size, sha256 = files[name]
        dest = snapshot / name
        if dest.exists() and (size is None or dest.stat().st_size == size):
            return
        url = f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(name)}"
        _fetch(url, dest, size, sha256, f"{repo_id}@{revision}: {name}", repo_id, snapshot)

    if filenames is None and INDEX in files:
        get(INDEX)
        shards = set(read_json(snapshot / INDEX).get("weight_map", {}).values())
        files = {n: meta for n, meta in files.items() if not n.endswith(".safetensors") or n in shards}
    for name in files:
        get(name)
    return snapshot


def fetch_url(url, dest):
    """Fetch one plain file (a dataset, the GPT-2 encoder files) to dest, with the same resume, retries and
    atomic rename as hub files; a file already at dest is kept. Returns dest."""
    dest = Path(dest)
    if not dest.exists():
        # named by the file and the server alone: a URL's path or query may carry a key
        _fetch(url, dest, None, None, f"{dest.name} (from {urlsplit(url).hostname})", None, dest)
    return dest


def _looks_like_path(source):
    """Whether source can only be meant as a path ('./ckpt', '../x', '/x', '~/x', 'out/gpt2/last', 'ckpt/'), so
    that a missing directory is reported at once instead of being looked up on the hub."""
    return (not isinstance(source, str) or source.startswith(("/", ".", "~")) or source.endswith("/")
            or source.count("/") > 1 or os.sep != "/" and os.sep in source)


def resolve(source, **download_kwargs):
    """A local checkpoint directory as is, else a hub repo id fetched with download(): 'out' or 'owner/name'."""
    if source == "":
        raise HubError("empty source: expected a checkpoint directory or a hub repo id 'owner/name'")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{source}: is a file; expected a checkpoint directory or a hub repo id 'owner/name'")
    if _looks_like_path(source):
        raise HubError(f"{str(source)!r}: no such directory")
    if REPO_ID.fullmatch(source):
        try:
            return download(source, **download_kwargs)
        except HubError as e:
            raise HubError(f"{e} (and there is no local directory {source!r})") from None
    raise HubError(f"{source!r}: neither a local directory nor a hub repo id 'owner/name'")


# ----------------------------------------------------------------------------- safetensors checkpoints

def checkpoint_files(directory):
    """The safetensors files of a checkpoint: model.safetensors, else the shards its index names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HubError(f"{directory}: not a directory; expected a checkpoint directory")
    if (directory / "model.safetensors").exists():  # transformers looks for this one first too
        return [directory / "model.safetensors"]
    if (directory / INDEX).exists():
        weight_map = read_json(directory / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HubError(f"{directory / INDEX}: no 'weight_map' object")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise HubError(f"{f}: missing shard, named in {directory / INDEX}")
        return files
    raise HubError(f"{directory}: no weights; expected model.safetensors or {INDEX} with its shards")


def iter_safetensors(directory, device="cpu"):
    """Yield (key, tensor) one shard at a time, so that peak memory stays about one shard."""
    for path in checkpoint_files(directory):
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise HubError(f"{path}: not a readable safetensors file ({e})") from None


def check_tensor(expected, key, shape, where, family, config_name="config.json", shown_key=None):
    """HubError for a weight the model has no place for, or whose shape contradicts config_name, so that a wrong
    file fails at its first bad tensor. expected: {key: shape} of the model; family: 'GPT-2', 'Llama 3', ..."""
    shown = shown_key or key
    if key not in expected:
        raise HubError(f"{where}: unexpected key {shown!r} in the weights: not a {family} checkpoint, or a variant "
                       f"its model file does not implement")
    if tuple(shape) != tuple(expected[key]):
        raise HubError(f"{where}: key {shown!r} has shape {tuple(shape)}, {config_name} implies "
                       f"{tuple(expected[key])}")


def check_complete(expected, state, where):
    """HubError naming the first key of expected ({key: shape}) that the loaded weights (state) lack."""
    for key in expected:
        if key not in state:
            raise HubError(f"{where}: weights lack key {key!r} (expected shape {tuple(expected[key])})")


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
    """The JSON value in path; HubError naming the file when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HubError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{path}: not valid JSON ({e})") from None


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


def read_config(path, parse):
    """parse(the JSON object in path), for a model's config.json or params.json: HubError naming the file when it
    holds no JSON object, or when parse raises ValueError (a key missing or out of range, a config the model
    rejects). ValueError is the model files' word for a config they cannot build, so it is the file's fault here."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise HubError(f"{path}: expected a JSON object, got {type(d).__name__}")
    try:
        return parse(d)
    except ValueError as e:
        raise HubError(f"{path}: {e}") from None
