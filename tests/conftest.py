"""Shared test settings: where the real data files live, and a skip for clones without ../shared."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The one place tests learn where the project's real data files are (tinyshakespeare, GPT-2 tokenizer).
SHARED_DATA = Path(os.environ.get("NANOLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts):
    """Path to a file under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared/data is only beside the CI checkout, not in a user's clone")
    return path


@pytest.fixture(autouse=True)
def _no_tiktoken_cache(monkeypatch):
    # tiktoken caches files keyed by path, so a rewritten file would be read stale (FORMATS.md 4.5)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
