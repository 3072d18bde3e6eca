"""The harness's own pieces: the CPU peak-memory meter, the offline data, the tiny model it trains."""
import sys
import types
from dataclasses import replace
from unittest import mock

import pytest
import torch

from components.compare import (ByteData, PeakMemory, TinyConfig, TinyLM, count_flops, main, plot, stdlib_bytes,
                                train_variant)
from errors import BadInput


@pytest.fixture(autouse=True)
def _one_thread():
    # the tiny models here are all small operators; with a second thread each one waits on a thread barrier, which
    # on a busy shared machine makes them ten times slower and on a quiet one gains nothing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_peak_memory_counts_live_storages():
    with PeakMemory() as pm:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # a was freed: still 8000
        d = c.view(10, 100)  # a view allocates nothing
    assert pm.peak == 2 * b.nbytes and d.untyped_storage().nbytes() == c.nbytes


def test_peak_memory_sees_tensors_autograd_keeps_for_backward():
    x = torch.randn(1000, requires_grad=True)
    with PeakMemory() as pm:
        y = (x * 2).exp()  # x * 2 is freed; exp's output is saved for its backward
        s = y.sum()
        del y
        after_forward = pm.current
        s.backward()
    assert after_forward >= x.nbytes  # the saved exp output is still alive, though no Python name holds it
    assert pm.peak >= 2 * x.nbytes  # during backward: the saved output and x.grad at least


def test_count_flops_counts_matmuls():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = k = v = torch.randn(1, 2, 32, 8)
    # F.scaled_dot_product_attention on CPU: two (32 x 8) @ (8 x 32) products per head
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * 2 * (2 * 32 * 32 * 8)


def test_stdlib_data_is_deterministic_and_shifted():
    assert torch.equal(stdlib_bytes(200_000), stdlib_bytes(200_000))
    data = ByteData(200_000)
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 256


CONFIGS = [dict(), dict(n_kv_head=1), dict(attn="mla"), dict(attn="sparse", topk=4), dict(window=4),
           dict(pos="learned"), dict(pos="sinusoidal"), dict(pos="alibi"), dict(pos="none"),
           dict(norm="layer", prenorm=False), dict(qk_norm=True), dict(ffn="gelu"), dict(ffn="reglu"),
           dict(ffn="moe", router="sigmoid", bias_update_rate=1e-3), dict(ffn="moe", router="noisy", n_shared=1),
           dict(ffn="moe", capacity_factor=1.0)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_tiny_model_variants_run(kw):
    torch.manual_seed(0)
    cfg = TinyConfig(n_embd=32, n_head=4, block_size=16, max_len=32, **kw)
    model = TinyLM(cfg)
    logits = model(torch.randint(256, (2, 16)))
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()
    loss = logits.logsumexp(-1).mean() + model.aux_loss()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "w_noise" not in n and "indexer" not in n)


def test_tiny_model_rejects_mla_without_rope_and_learned_beyond_table():
    with pytest.raises(ValueError, match="TinyConfig.pos='rotary': expected one of"):
        TinyLM(TinyConfig(pos="rotary"))
    with pytest.raises(ValueError, match="attn='mla' needs pos='rope'"):
        TinyLM(TinyConfig(attn="mla", pos="alibi"))
    model = TinyLM(TinyConfig(n_embd=32, pos="learned", max_len=8))
    with pytest.raises(ValueError, match="learned table of 8 rows"):
        model(torch.randint(256, (1, 9)))


def test_training_lowers_the_loss_and_moe_reports_balance():
    data = ByteData(200_000)
    cfg = TinyConfig(n_layer=1, n_embd=16, block_size=16, ffn="moe", n_expert=4, top_k=2)
    r = train_variant(cfg, data, steps=15, batch_size=4, lr=2e-2, device="cpu", eval_lengths=[16, 32], eval_batches=2)
    assert r["curve"][-1] < r["curve"][0] - 1.0  # from ln(256) = 5.5 towards the byte entropy
    assert set(r["val"]) == {16, 32} and r["imbalance"] >= 1.0 and r["active"] < r["params"]


def test_cli_errors():
    with pytest.raises(BadInput, match="argument family: invalid choice: 'kernels'"):
        main(["kernels"])
    cfg = replace(TinyConfig(), n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_embd=30 must be n_head=4 times"):
        TinyLM(cfg)


def test_plots_only_with_matplotlib(tmp_path, monkeypatch):
    rows = [dict(name=n, T=T, ms=1.0, mb=2.0) for n in ("a", "b") for T in (128, 512)]
    results = {"a": dict(curve=[3.0, 2.0, 1.0])}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import raises ImportError
    assert plot("attention", str(tmp_path), rows, rows, results) == []
    # a stand-in matplotlib whose savefig writes the file: the plotting code runs end to end
    fig = mock.MagicMock()
    fig.savefig.side_effect = lambda path, **kw: open(path, "wb").close()
    pyplot = types.SimpleNamespace(subplots=lambda *a, **kw: (fig, [mock.MagicMock(), mock.MagicMock()])
                                   if a == (1, 2) else (fig, mock.MagicMock()), close=lambda f: None)
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    written = plot("attention", str(tmp_path), rows, rows, results)
    assert written == ["attention_layers.png", "attention_kernels.png", "attention_training.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
