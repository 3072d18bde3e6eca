"""
Model files from the Hugging Face hub, through huggingface_hub, so that everything works as in every other tool:
the standard cache (HF_HOME, HF_HUB_CACHE) that transformers, vLLM and `hf download` share, the token of
`hf auth login` (or HF_TOKEN), offline mode (HF_HUB_OFFLINE=1), HF_ENDPOINT, Xet storage, resume and progress bars.
What is ours: which files a model needs, and failures as one line that names the repo and says what to do.

    >>> hub.resolve("openai-community/gpt2")   # <HF_HUB_CACHE>/models--openai-community--gpt2/snapshots/<commit>
    >>> hub.resolve("out/gpt2/last")           # a path: used as is, never looked up on the hub

Also here: CACHE_DIR for our own caches (datasets, trained tokenizers) and fetch_url for the two files that live on
other servers (tinyshakespeare, GPT-2's original encoder files).
"""
import contextlib
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import requests
from huggingface_hub import constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import (DisabledRepoError, FileMetadataError, GatedRepoError, HfHubHTTPError,
                                    IncompleteSnapshotError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

import checkpoint_io
import errors

CACHE_DIR = Path(os.environ.get("NANOLLM_CACHE") or Path.home() / ".cache" / "nanollm")
# the hub's rule for ids: ASCII letters, digits, '_', '-', '.'; each part starts and ends with a letter, digit or
# '_'; no '--' (the cache's folder names join owner and name with it) and no '..'
REPO_ID = re.compile(r"(?!.*(--|\.\.))\w(?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?", re.ASCII)
# what a model file reads besides the weights (tokenizer.bpe: bpe.py's own, in checkpoints trained here); exact
# names, because the library's patterns match across folders
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer.bpe")
# Meta's own format, which Meta's repos carry beside the HF one: as large again, so only when asked for
ORIGINAL = ("original/params.json", "original/consolidated.*.pth", "original/tokenizer.model")
TIMEOUT = (10, 60)   # fetch_url: seconds to connect, and to wait for the next bytes


class HubError(errors.BadInput):
    """Every failure of this module, as one line: which repo or file, what happened, what to do."""


def _host(url):
    return urlsplit(url).hostname or "?"


def _hide_urls(record):
    """huggingface_hub's warnings name the URL they retry; a signed CDN URL, or an HF_ENDPOINT with user:password@,
    carries credentials, so its records show the host alone."""
    record.msg = re.sub(r"\b[a-zA-Z][\w+.-]*://[^\s'\"<>]+", lambda m: _host(m.group()), record.getMessage())
    record.args = ()
    return True


for _handler in logging.getLogger("huggingface_hub").handlers:
    _handler.addFilter(_hide_urls)


def _reason(e):
    """What went wrong on the network, as '[Errno 111] Connection refused' or 'ReadTimeout': never the text of an
    HTTP client's error, which may hold the URL."""
    m = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
    return m.group(0).strip() if m else type(e).__name__


def _token():
    """The token the library will send (HF_TOKEN, else the one `hf auth login` saved), or None. One with a space or a
    line break is refused here: the HTTP client would refuse the header with an error that quotes it."""
    token = get_token()
    if token is not None and not re.fullmatch(r"[!-~]+", token):
        raise HubError("the hub token (HF_TOKEN, or the one `hf auth login` saved) holds a space, a line break or a "
                       "non-ASCII character, which no token has; set it to the token alone (not shown here)")
    return token


def _login_hint():
    if _token():
        return "the token in use has no access to it: request access on its hub page, or log in as another user"
    return "request access on its hub page, then log in with `hf auth login` (or set HF_TOKEN)"


@contextlib.contextmanager
def _one_line(what, file=None):
    """huggingface_hub's exceptions as one HubError line about `what` ('owner/name@main') and `file`. The library's
    own messages are not passed on: they hold URLs."""
    thing = file or "its files"
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{what}: a gated repo; {_login_hint()}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such repo on the hub ({_host(constants.ENDPOINT)}), or a private one; check the "
                       f"id, or {_login_hint()}") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: the repo has no such revision") from None
    except RemoteEntryNotFoundError:
        only = "; only safetensors weights are read, and it has no model.safetensors.index.json either" \
            if file == "model.safetensors" else ""
        raise HubError(f"{what}: the repo has no file {file}{only}") from None
    except DisabledRepoError:
        raise HubError(f"{what}: the repo is disabled on the hub") from None
    except LocalEntryNotFoundError as e:   # not in the cache, and the hub could not be asked
        where = f"the hub cache ({constants.HF_HUB_CACHE}) lacks {thing}"
        cause = e.__cause__
        if constants.is_offline_mode():
            raise HubError(f"{what}: HF_HUB_OFFLINE is set and {where}; unset HF_HUB_OFFLINE to download, or pass "
                           f"a local directory") from None
        if isinstance(cause, FileMetadataError):
            raise HubError(f"{what}: {_host(constants.ENDPOINT)} (HF_ENDPOINT) does not answer as a hub, and "
                           f"{where}") from None
        if isinstance(cause, HfHubHTTPError):
            raise HubError(f"{what}: the hub answered HTTP {cause.response.status_code}, and {where}; try again "
                           f"later") from None
        raise HubError(f"{what}: no network ({_reason(cause)}), and {where}; connect once to download, or pass a "
                       f"local directory") from None
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise HubError(f"{what}: {thing}: HTTP {status}; {_login_hint()}") from None
        raise HubError(f"{what}: {thing}: the hub answered HTTP {status}; run again later to resume") from None
    except httpx2.TransportError as e:   # the connection failed in the middle of a download, after the retries
        raise HubError(f"{what}: {thing}: {_reason(e)}; run again to resume") from None
    except json.JSONDecodeError:   # a login page of a proxy, say, where the hub's API answers JSON
        raise HubError(f"{what}: {_host(constants.ENDPOINT)} (HF_ENDPOINT) does not answer as a hub") from None


def download(repo_id, *, revision="main", weights=True, original=False):
    """
    Fetch what a model file reads from a hub model repo into the hub cache, and return the snapshot folder:
    config.json, generation_config.json and the tokenizer files; with weights, the safetensors weights, which are
    model.safetensors or only the shards model.safetensors.index.json names (never the .bin/.pth copies many repos
    carry too); with original, Meta's original/ folder (params.json, consolidated.*.pth, tokenizer.model).
    Files in the cache are not fetched again; with HF_HUB_OFFLINE=1 nothing is, and no request is made.
    """
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise HubError(f"{repo_id!r} is not a hub repo id of the form 'owner/name'")
    what = f"{repo_id}@{revision}"
    _token()
    patterns = list(MODEL_FILES) + ([checkpoint_io.INDEX] if weights else []) + (list(ORIGINAL) if original else [])
    with _one_line(what):
        try:
            snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except IncompleteSnapshotError as e:
            # offline, and an earlier download skipped some of the patterns' files; what is needed is checked below
            snapshot = Path(e.snapshot_path)
    if weights:
        index = snapshot / checkpoint_io.INDEX
        for name in checkpoint_io.shard_names(index) if index.exists() else ["model.safetensors"]:
            with _one_line(what, name):
                # by commit: a file in the cache needs no request at all
                hf_hub_download(repo_id, name, revision=snapshot.name)
    return snapshot


def fetch_url(url, dest):
    """Fetch one small file from a server that is not the hub (a dataset, GPT-2's encoder files) to dest, written
    atomically; a file already at dest is kept. The hub's token is not sent. Returns dest."""
    dest = Path(dest)
    if dest.exists():
        return dest
    what = f"{dest.name} (from {_host(url)})"   # not the URL: its path or query may carry a key
    try:
        r = requests.get(url, timeout=TIMEOUT)
    except requests.RequestException as e:
        raise HubError(f"{what}: {_reason(e)}; check the network and run again") from None
    if r.status_code >= 400:
        raise HubError(f"{what}: HTTP {r.status_code}")
    checkpoint_io.atomic_write(dest, r.content)
    return dest


def looks_like_path(source):
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
    if looks_like_path(source):
        raise HubError(f"{str(source)!r}: no such directory")
    if REPO_ID.fullmatch(source):
        try:
            return download(source, **download_kwargs)
        except HubError as e:
            raise HubError(f"{e} (and there is no local directory {source!r})") from None
    raise HubError(f"{source!r}: neither a local directory nor a hub repo id 'owner/name'")
