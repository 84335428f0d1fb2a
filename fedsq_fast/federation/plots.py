"""Plots from saved metrics: accuracy vs round (mean line, ±1 std band over seeds) and
rounds-to-best bars."""
from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def round_axis(ax) -> None:
    """An x axis of federation rounds: labelled, whole-number ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def plot_accuracy(docs, path) -> None:
    from .runner import partition_tag

    plt = _plt()
    parts = sorted({partition_tag(d["config"]) for d in docs})
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.3), dpi=110, squeeze=False)
    for ax, part in zip(axes[0], parts):
        methods = sorted({d["method"] for d in docs if partition_tag(d["config"]) == part})
        for m in methods:
            hs = [d["history"] for d in docs if partition_tag(d["config"]) == part and d["method"] == m]
            n = min(len(h) for h in hs)
            acc = np.array([[r["val_acc"] for r in h[:n]] for h in hs], dtype=float)
            x = [r["round"] for r in hs[0][:n]]
            mu = acc.mean(0)
            ax.plot(x, mu, label=f"{m} (n={len(hs)})")
            if len(hs) > 1:
                sd = acc.std(0, ddof=1)
                ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
        ax.set_title(part)
        round_axis(ax)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_rounds_to_best(rows, path) -> None:
    plt = _plt()
    parts = sorted({r["partition"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(parts) * len(methods) / 2 + 2), 3.3), dpi=110)
    w = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys, es = [], [], []
        for i, p in enumerate(parts):
            r = next((r for r in rows if r["partition"] == p and r["method"] == m), None)
            if r is not None:
                xs.append(i + j * w)
                ys.append(r["rounds_to_best"])
                es.append(r["rounds_to_best_std"])
        ax.bar(xs, ys, w, yerr=es, capsize=3, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(parts))])
    ax.set_xticklabels(parts)
    ax.set_ylabel("rounds to best (mean ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
