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


def randomize(module, seed=0, scale=0.1):
    """Random weights of a realistic scale in place: matrices ~ N(0, scale), vectors (norm gains) ~ 1 + N(0, scale)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 else 0.0))
    return module


def official_state(model):
    """The official keys: no tied head; transformers 5's fused in-memory experts (gate_up_proj [E, 2I, H], gate rows
    first; down_proj [E, H, I]) written per expert as mlp.experts.{e}.{gate,up,down}_proj.weight (FORMATS 0.1)."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    for key in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:
        head = key.removesuffix("gate_up_proj")
        gate_up, down = sd.pop(key), sd.pop(head + "down_proj")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(gate_up.size(0)):
            sd |= {f"{head}{e}.gate_proj.weight": gate[e].clone(), f"{head}{e}.up_proj.weight": up[e].clone(),
                   f"{head}{e}.down_proj.weight": down[e].clone()}
    return sd



@pytest.fixture(autouse=True)
def _no_tiktoken_cache(monkeypatch):
    # tiktoken caches files keyed by path, so a rewritten file would be read stale (docs/FORMATS.md 4.5)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
