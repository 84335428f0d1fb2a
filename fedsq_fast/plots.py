"""Every plot fedsq_fast draws (PNG, matplotlib's Agg backend): accuracy vs round as a mean line
with a ±1 std band over seeds, gate stability, rounds-to-best bars, class counts per client.

The plots take what they draw (histories grouped by panel and method, summary rows, counts);
they never import the runners, so the runners can import them at module level.
"""
from __future__ import annotations

import numpy as np

from .outputs import save_figure


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


def group_histories(docs, tag) -> dict:
    """``{(tag(config), method): [history, ...]}`` of metrics.json documents, in document order
    (``tag``: the panel a run belongs to, e.g. its partition tag)."""
    out: dict = {}
    for d in docs:
        out.setdefault((tag(d["config"]), d["method"]), []).append(d["history"])
    return out


def curves(histories, key):
    """``(rounds, values)`` of one per-round key over several runs (rows: runs, cut to the
    shortest run; a missing or None value is NaN), or None without runs."""
    if not histories:
        return None
    n = min(len(h) for h in histories)
    a = np.array([[np.nan if r.get(key) is None else r[key] for r in h[:n]] for h in histories], dtype=float)
    return [r["round"] for r in histories[0][:n]], a


def band(ax, x, a, label, **kw) -> None:
    """Mean over the rows of ``a`` as a line, ±1 sample std as a band (with two or more rows)."""
    mu = np.nanmean(a, 0)
    line, = ax.plot(x, mu, label=f"{label} (n={a.shape[0]})", **kw)
    if a.shape[0] > 1:
        sd = np.nanstd(a, 0, ddof=1)
        ax.fill_between(x, mu - sd, mu + sd, alpha=0.18, color=line.get_color())


def _panels(runs, parts, methods):
    parts = parts if parts is not None else sorted({p for p, _ in runs})
    methods = methods if methods is not None else sorted({m for _, m in runs})
    return [p for p in parts if any((p, m) in runs for m in methods)], methods


def plot_accuracy(runs, path, parts=None, methods=None) -> None:
    """Validation accuracy vs round, mean ± 1 std over seeds, one panel per partition (one
    y scale: partitions are compared by eye). ``runs``: :func:`group_histories`; ``parts`` /
    ``methods``: their order (default: sorted); ablations (a ``:`` in the name) dashed."""
    plt = _plt()
    parts, methods = _panels(runs, parts, methods)
    fig, axes = plt.subplots(1, len(parts), figsize=(4.3 * len(parts), 3.5), dpi=110, squeeze=False,
                             sharey=True)
    for ax, p in zip(axes[0], parts):
        for m in methods:
            c = curves(runs.get((p, m)), "val_acc")
            if c is not None:
                band(ax, *c, m, ls="--" if ":" in m else "-")
        ax.set_title(p)
        round_axis(ax)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_privacy(runs, path, parts=None, methods=None) -> None:
    """Client-level DP (docs/privacy.md): left, epsilon spent (at the run's delta) vs round;
    right, validation accuracy vs epsilon spent, mean ± 1 std over seeds; one line per
    (partition, method) of :func:`group_histories` whose runs record ``dp_epsilon``."""
    plt = _plt()
    parts, methods = _panels(runs, parts, methods)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    for p in parts:
        for m in methods:
            hs = runs.get((p, m))
            eps = curves(hs, "dp_epsilon")
            acc = curves(hs, "val_acc")
            if eps is None or np.isnan(eps[1][:, 1:]).all():
                continue
            label = m if len(parts) == 1 else f"{p} {m}"
            band(a, *eps, label)
            x = np.nan_to_num(np.nanmean(eps[1], 0), nan=0.0)  # round 0: nothing spent
            band(b, x, acc[1], label, marker=".")
    a.set_ylabel("epsilon spent")
    round_axis(a)
    b.set_xlabel("epsilon spent")
    b.set_ylabel("validation accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_gate_stability(runs, path, parts, methods, plain_methods, settle_threshold: float) -> None:
    """Top: % of the pretrained gates flipped vs round, per method; bottom: per-round gate
    flips and weight steps of the ``plain_methods`` relative to round 1 (log scale), with the
    settle threshold."""
    plt = _plt()
    parts, methods = _panels(runs, parts, methods)
    fig, axes = plt.subplots(2, len(parts), figsize=(4.3 * len(parts), 6.4), dpi=110, squeeze=False)
    for j, p in enumerate(parts):
        ax = axes[0][j]
        for m in methods:
            c = curves(runs.get((p, m)), "gate_change")
            if c is not None:
                x, a = c
                band(ax, x, 100 * a, m + (" (own gates)" if m.startswith("fedsq") else ""),
                     ls="--" if m.startswith("fedsq") else "-")
        ax.set_title(f"{p}: gates flipped vs pretrained")
        round_axis(ax)
        ax.set_ylabel("% of gates (probe batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax = axes[1][j]
        for ci, m in enumerate(plain_methods):
            for key, lab, ls in (("gate_flip_prev", "gate flips", "-"), ("weight_step_rel", "weight step", ":")):
                c = curves(runs.get((p, m)), key)
                if c is None:
                    continue
                x, a = c
                x, a = x[1:], a[:, 1:]
                ref = a[:, :1]
                ref[ref == 0] = np.nan
                band(ax, x, a / ref, f"{m} {lab}", ls=ls, color=f"C{ci}")  # one colour per method
        ax.axhline(settle_threshold, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{p}: per-round change / round 1")
        round_axis(ax)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a partial suite may have no FedAvg/FedProx run here yet
            ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_rounds_to_best(rows, path, parts=None, methods=None) -> None:
    """Rounds-to-best bars (mean ± std) per partition and method; ``rows``: dicts with
    ``partition``, ``method``, ``rounds_to_best``, ``rounds_to_best_std``."""
    plt = _plt()
    parts = parts if parts is not None else sorted({r["partition"] for r in rows})
    methods = methods if methods is not None else sorted({r["method"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(parts) * max(1, len(methods)) / 2 + 2), 3.4), dpi=110)
    w = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys, es = [], [], []
        for i, p in enumerate(parts):
            r = next((r for r in rows if r["partition"] == p and r["method"] == m), None)
            if r is not None:
                xs.append(i + j * w)
                ys.append(r["rounds_to_best"])
                es.append(r["rounds_to_best_std"])
        if xs:
            ax.bar(xs, ys, w, yerr=es, capsize=3, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(parts))])
    ax.set_xticklabels(parts)
    ax.set_ylabel("rounds to best (mean ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


PLOT_MAX_CLIENTS = 100  # beyond: histograms over clients (one bar per client would be unreadable)


def plot_partition(counts: np.ndarray, path, classes=None, title: str = "") -> None:
    """Stacked bars of class counts per client (``counts``: clients x classes), written as a PNG;
    beyond :data:`PLOT_MAX_CLIENTS` clients, histograms over clients of their size and label
    skew instead (the figure's width stays fixed)."""
    plt = _plt()
    k, c = counts.shape
    if k > PLOT_MAX_CLIENTS:
        from .federation.partition import client_stats

        st = client_stats(counts)
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
        axes[0].hist(st["size"], bins=min(50, max(1, int(st["size"].max()) + 1)), color="tab:blue")
        axes[0].set_xlabel("samples per client")
        axes[0].set_ylabel("clients")
        axes[1].hist(st["skew"], bins=40, range=(0, 1), color="tab:orange")
        axes[1].set_xlabel("label skew (TV distance to the pool)")
        fig.suptitle((title or "partition") + f" ({k} clients)", fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)
        return
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * k + 2), 3.2), dpi=110)
    bottom = np.zeros(k)
    cmap = plt.get_cmap("tab10" if c <= 10 else "tab20")
    for j in range(c):
        ax.bar(np.arange(k), counts[:, j], bottom=bottom, color=cmap(j % cmap.N),
               label=str(classes[j]) if classes else str(j), width=0.8)
        bottom += counts[:, j]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xticks(np.arange(k))
    ax.set_title(title or "class counts per client")
    ax.legend(fontsize=6, ncol=1, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def client_quantiles(history) -> tuple:
    """``(rounds, rows)`` of a run's federated evaluation (:mod:`fedsq_fast.federation.evaluation`):
    per evaluated round, over the clients evaluated, [worst, 10th percentile (numpy 'lower'),
    median, best, sample-weighted mean]; rounds without it are left out."""
    xs, rows = [], []
    for h in history:
        accs = [a for a in (h.get("client_acc") or []) if a is not None]
        if not accs or h.get("client_acc_weighted") is None:
            continue
        a = np.asarray(accs, dtype=float)
        xs.append(h["round"])
        rows.append([a.min(), np.quantile(a, 0.1, method="lower"), np.median(a), a.max(), h["client_acc_weighted"]])
    return xs, np.asarray(rows, dtype=float).reshape(-1, 5)


def plot_client_accuracy(runs, path, parts=None, methods=None) -> bool:
    """Federated evaluation: the distribution of client accuracy vs round, one panel per
    partition: per method the range over clients (worst to best, band), the 10th percentile
    (dashed), the worst client (dotted) and the sample-weighted mean (solid), each the mean over
    seeds. ``runs``: :func:`group_histories`. Returns False (no file) when no run has it."""
    parts, methods = _panels(runs, parts, methods)
    data = {}
    for key, hs in runs.items():
        qs = [client_quantiles(h) for h in hs]
        qs = [q for q in qs if q[0]]
        if qs:
            n = min(len(x) for x, _ in qs)
            data[key] = (qs[0][0][:n], np.nanmean([r[:n] for _, r in qs], 0), len(qs))
    parts = [p for p in parts if any((p, m) in data for m in methods)]
    if not parts:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(parts), figsize=(4.3 * len(parts), 3.6), dpi=110, squeeze=False, sharey=True)
    for ax, p in zip(axes[0], parts):
        for i, m in enumerate(methods):
            if (p, m) not in data:
                continue
            x, q, n = data[(p, m)]
            c = f"C{i}"
            ax.fill_between(x, q[:, 0], q[:, 3], color=c, alpha=0.12)
            ax.plot(x, q[:, 4], color=c, label=f"{m} weighted mean (n={n})")
            ax.plot(x, q[:, 1], color=c, ls="--", label=f"{m} 10th percentile")
            ax.plot(x, q[:, 0], color=c, ls=":", label=f"{m} worst client")
        ax.set_title(f"{p}: client accuracy")
        round_axis(ax)
        ax.set_ylabel("accuracy on the clients' test splits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True
