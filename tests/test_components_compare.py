"""
The harness's own pieces: the CPU peak-memory meter, the offline data, the tiny model it trains, the plots, the
CLI end to end, and the acceptance check its attention report states (flash attention's peak memory).
"""
from dataclasses import replace

import matplotlib.image
import pytest
import torch

from components import compare
from components.compare import SETTINGS, attention_family, layer_step, main
from components.meters import PeakMemory, count_flops, peak_memory
from components.plots import cost_figure, growth, lengths_figure, training_figure
from components.tinylm import ByteData, TinyConfig, TinyLM, stdlib_bytes, train_variant
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


def test_flash_attention_peak_memory_is_an_eighth_of_naive_at_the_longest_kernel_length():
    # the acceptance check of the attention report's kernel table, on the harness's own kernels and inputs: the
    # tiled kernel never holds the (T, T) scores that the naive one keeps for its backward pass
    cpu = torch.device("cpu")
    kernels = {v.name: v for v in attention_family(SETTINGS[True], cpu)["kernels"]}
    T = max(SETTINGS[True]["kernel_T"])
    naive = peak_memory(layer_step(kernels["naive softmax(QK^T)V"], T), cpu)
    flash = peak_memory(layer_step(kernels["flash (plain PyTorch, tile 256)"], T), cpu)
    assert naive >= 3 * 4 * T * T * 4  # at least three float32 (1, 4, T, T) score-sized tensors at once
    assert flash <= naive / 8


def test_cli_writes_the_report_and_its_plots(tmp_path, monkeypatch):
    # every part of the attention family at toy sizes; at these lengths flash saves little memory (one tile is a
    # quarter of the scores), and the report says FAIL rather than the CLI failing
    tiny = dict(layer_T=[128, 256], kernel_T=[256, 512], other_kernels_max_T=256, reps=1, n_layer=1, deep_layers=1,
                n_embd=16, block_size=16, batch_size=2, steps=3, lr=1e-2, data_bytes=200_000)
    monkeypatch.setitem(compare.SETTINGS, True, tiny)
    assert main(["attention", "--quick", "--out", str(tmp_path)]) is None
    report = (tmp_path / "attention.md").read_text()
    assert "| naive softmax(QK^T)V | 512 |" in report and "| DSA top-4 |" in report
    assert "(required <= 0.125): FAIL" in report
    pngs = ["attention_layers_time.png", "attention_layers_memory.png", "attention_kernels_time.png",
            "attention_kernels_memory.png", "attention_training.png"]
    assert [line for line in report.splitlines() if line.startswith("![")] == [f"![{p}]({p})" for p in pngs]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(pngs + ["attention.md"])
    for p in pngs:
        height, width, _ = matplotlib.image.imread(tmp_path / p).shape
        assert width > 600 and height > 300


def test_growth_is_the_slope_on_log_log_axes():
    assert growth([dict(T=128, ms=1.0), dict(T=512, ms=16.0)], "ms") == pytest.approx(2.0)
    assert growth([dict(T=256, mb=3.0), dict(T=1024, mb=3.0), dict(T=4096, mb=3.0)], "mb") == 0.0


def outside(fig, ax):
    """True when the axes' legend lies wholly beside the plotting area, covering none of it."""
    fig.canvas.draw()
    return not ax.get_window_extent().overlaps(ax.get_legend().get_window_extent())


def test_cost_plot_is_log_log_with_units_and_says_how_each_variant_grows():
    Ts = (128, 512, 2048)
    rows = ([dict(name="quadratic", T=T, ms=(T / 128) ** 2, mb=1.0) for T in Ts] +
            [dict(name="linear", T=T, ms=T / 128, mb=1.0) for T in Ts] + [dict(name="short", T=128, ms=3.0, mb=1.0)])
    fig = cost_figure(rows, "ms", "Layers")
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_xlabel() == "sequence length T (tokens)" and ax.get_ylabel().endswith("(ms)")
    assert outside(fig, ax)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["128", "512", "2048"]
    assert {t.get_text() for t in ax.get_yticklabels()} >= {"1", "10", "100"}  # not 10^0, 10^1, 10^2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [r"quadratic  $\sim T^{2.0}$", r"linear  $\sim T^{1.0}$", "short  (one length)"]
    assert ax.get_title() == "Layers: time\n" + r"grows as $T^{1.0}$ for linear, up to $T^{2.0}$ for quadratic"
    memory = cost_figure(rows, "mb", "Layers").axes[0]
    assert memory.get_ylabel().endswith("(MB)") and "the lines coincide" in memory.get_title()


def test_training_plot_shows_each_variant_against_the_baseline():
    base = [5.0 - 0.1 * i for i in range(40)]
    fig = training_figure({"dense": dict(curve=base), "moe": dict(curve=[x - 0.2 for x in base])})
    ax = fig.axes[0]
    dense, moe = ax.get_lines()
    assert list(dense.get_xdata()) == list(range(2, 41))  # a moving mean over 40 // 20 = 2 steps, by step number
    assert all(y == 0 for y in dense.get_ydata()) and all(y == pytest.approx(-0.2) for y in moe.get_ydata())
    assert "baseline, dense" in ax.get_title() and "nats/byte" in ax.get_ylabel() and outside(fig, ax)


def test_lengths_plot_marks_the_training_length():
    results = {"RoPE": dict(val={64: 2.9, 128: 2.7, 256: 2.8}), "learned": dict(val={64: 3.0, 128: 2.9, 256: 3.1})}
    fig = lengths_figure(results, 64)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64\n(training)", "128\n(2x)", "256\n(4x)"]
    assert list(ax.get_lines()[1].get_ydata()) == [3.0, 2.9, 3.1] and outside(fig, ax)
