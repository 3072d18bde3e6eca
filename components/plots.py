"""
The harness's plots: PNGs beside the report, drawn by matplotlib's Agg renderer (no window, no pyplot state).

- cost: time or peak memory of each variant against the sequence length, both axes logarithmic, so that a cost
  growing as T^k is a straight line of slope k; the legend gives each variant's k and the title their range.
- training: each variant's train loss minus the first variant's. Every variant sees the same batches, so the
  batch-to-batch swings they share cancel and what is left is which one learns faster.
- lengths: held-out loss at each evaluation length, the training length marked (position schemes).
- tokenizer: UTF-8 bytes per token of each sample (a group of bars per language), a bar per tokenizer.
Legends sit right of the axes, never over the data.
"""
import math
import os

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

QUANTITIES = {"ms": ("time", "forward + backward time (ms)"), "mb": ("peak memory", "peak memory (MB)")}
MARKERS = "osD^vP*Xh"  # hollow and distinct, so that variants whose lines coincide still show one marker each


def growth(rows, key):
    """Exponent k of row[key] ~ T^k from the shortest to the longest T: costs 1 ms at 128, 16 ms at 512 -> 2.0."""
    first, last = rows[0], rows[-1]
    return math.log(last[key] / first[key]) / math.log(last["T"] / first["T"])


def new_axes(figsize=(8, 4.5)):
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def lengths_axis(ax, lengths, labels=None):
    """A log-2 x axis of sequence lengths, ticked at the measured ones and labelled 128, not 2^7."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, labels or [str(T) for T in lengths])
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def plain_log_y(ax):
    """A log y axis labelled 5, 10, 20, 50 rather than 5 x 10^0, 10^1, 2 x 10^1; every integer within a decade."""
    ax.set_yscale("log")
    bottom, top = ax.get_ylim()
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=range(2, 10) if top < 10 * bottom else (2, 5)))
    ax.yaxis.set_minor_formatter(plain)


def legend_outside(ax):
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)


def cost_figure(rows, key, subject):
    """rows[key] (ms or mb) of each variant against T, log-log. rows: dicts with name, T and key, as measured."""
    what, label = QUANTITIES[key]
    fig, ax = new_axes()
    ks = {}
    for i, name in enumerate(dict.fromkeys(r["name"] for r in rows)):
        rs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["T"])
        if len(rs) > 1:
            ks[name] = growth(rs, key)
        ax.plot([r["T"] for r in rs], [r[key] for r in rs], marker=MARKERS[i % len(MARKERS)], fillstyle="none",
                label=name + (rf"  $\sim T^{{{ks[name]:.1f}}}$" if name in ks else "  (one length)"))
    lo, hi = min(ks, key=ks.get), max(ks, key=ks.get)
    longest = [r[key] for r in rows if r["T"] == max(r["T"] for r in rows)]
    if max(longest) <= 1.02 * min(longest):
        message = rf"the same for every variant (the lines coincide), growing as $T^{{{ks[hi]:.1f}}}$"
    elif f"{ks[lo]:.1f}" == f"{ks[hi]:.1f}":
        message = rf"grows as $T^{{{ks[hi]:.1f}}}$ for every variant"
    else:
        message = rf"grows as $T^{{{ks[lo]:.1f}}}$ for {lo}, up to $T^{{{ks[hi]:.1f}}}$ for {hi}"
    ax.set_title(f"{subject}: {what}\n{message}", fontsize=10)
    lengths_axis(ax, sorted({r["T"] for r in rows}))
    plain_log_y(ax)
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    return fig


def training_figure(results):
    """Train loss of each variant minus the first's, a moving mean over a twentieth of the steps."""
    names = list(results)
    base = results[names[0]]["curve"]
    k = max(1, len(base) // 20)
    fig, ax = new_axes()
    for name in names:
        gap = [a - b for a, b in zip(results[name]["curve"], base)]
        ax.plot(range(k, len(gap) + 1), [sum(gap[i - k:i]) / k for i in range(k, len(gap) + 1)],
                label=name + (" (baseline)" if name == names[0] else ""))
    ax.set_title(f"Train loss relative to the baseline, {names[0]}, on the same batches: below 0 learns faster\n"
                 f"(mean over {k} steps; held-out losses are in the table)", fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel("train loss - baseline's (nats/byte)")
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return fig


def lengths_figure(results, train_T):
    """Held-out loss of each variant at each evaluation length (results[name]["val"]: {T: loss})."""
    fig, ax = new_axes()
    lengths = sorted(next(iter(results.values()))["val"])
    for i, (name, r) in enumerate(results.items()):
        ax.plot(lengths, [r["val"][T] for T in lengths], marker=MARKERS[i % len(MARKERS)], fillstyle="none",
                label=name)
    ax.set_title(f"Held-out loss at and beyond the training length of {train_T} tokens", fontsize=10)
    lengths_axis(ax, lengths, [f"{T}\n(training)" if T == train_T else f"{T}\n({T / train_T:g}x)" for T in lengths])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return fig


def write_plots(family, out_dir, tables, results, train_T):
    """
    The family's PNGs in out_dir; returns their file names. tables: (tag, subject, rows) per measured table,
    plotted when it has more than one length; results: the training results by variant name.
    """
    figures = {}
    for tag, subject, rows in tables:
        if len({r["T"] for r in rows}) > 1:
            figures[f"{family}_{tag}_time.png"] = cost_figure(rows, "ms", subject)
            figures[f"{family}_{tag}_memory.png"] = cost_figure(rows, "mb", subject)
    figures[f"{family}_training.png"] = training_figure(results)
    if len(next(iter(results.values()))["val"]) > 1:
        figures[f"{family}_lengths.png"] = lengths_figure(results, train_T)
    for name, fig in figures.items():
        fig.savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")  # bbox: keep the outside legend
    return list(figures)


def tokenizer_figure(rows):
    """Bytes per token: a group of bars per sample, one bar per tokenizer (rows: components.tokenizers.measure's,
    those of unavailable tokenizers left out); the title names the tokenizers with the most and least on average."""
    rows = [r for r in rows if "reason" not in r]
    names, samples = (list(dict.fromkeys(r[k] for r in rows)) for k in ("tokenizer", "sample"))
    by = {(r["tokenizer"], r["sample"]): r["bytes_per_token"] for r in rows}
    mean = {t: sum(by[t, s] for s in samples) / len(samples) for t in names}
    best, worst = max(mean, key=mean.get), min(mean, key=mean.get)
    fig, ax = new_axes(figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(samples))], [by[name, s] for s in samples],
               width, label=f"{name}  (mean {mean[name]:.2f})", color=f"C{i % 10}")
    ax.set_xticks(range(len(samples)), samples, rotation=20, ha="right")
    ax.set_title(f"Text per token, by language: higher means shorter sequences for the same text\n"
                 f"most on average: {best} ({mean[best]:.2f} bytes per token); least: {worst} ({mean[worst]:.2f})",
                 fontsize=10)
    ax.set_xlabel("sample (the same passage in each language, and Python code)")
    ax.set_ylabel("UTF-8 bytes per token")
    ax.grid(True, axis="y", alpha=0.3)
    legend_outside(ax)
    return fig


def write_tokenizer_plots(out_dir, rows):
    """The tokenizer family's PNG in out_dir; returns its file name in a list, as write_plots does."""
    name = "tokenizer_bytes_per_token.png"
    tokenizer_figure(rows).savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")
    return [name]
