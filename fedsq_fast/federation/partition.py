"""Client partitions of a labelled pool: i.i.d., Dirichlet label skew, shards, quantity skew.

Every function returns a list of sorted int64 index arrays, one per client, that
together hold every sample exactly once; all randomness comes from ``seed``.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards", "quantity")


def _check_common(n: int, num_clients: int, min_size: int = 1):
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) must not exceed the number of samples ({n})")
    if min_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_size}")
    if min_size * num_clients > n:
        raise ValueError(f"min_partition_size ({min_size}) x num_clients ({num_clients}) exceeds "
                         f"the number of samples ({n})")


def iid(labels, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random, equal-size (up to one sample) split."""
    n = len(labels)
    _check_common(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels, num_clients: int, alpha: float, min_partition_size: int = 10, seed: int = 0,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: for each class, client shares ~ Dir(alpha) (Hsu et al. 2019).

    Redrawn until every client holds at least ``min_partition_size`` samples (the
    NIID-Bench procedure, with its balancing rule: a client that already holds
    n/K samples gets no more), at most ``max_tries`` times. A config no draw can be
    expected to satisfy is refused early (:data:`HOPELESS_SHORT`), naming the key.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    _check_common(n, num_clients, min_partition_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    shorts: list[int] = []
    for t in range(max_tries):
        # Vectorised NIID-Bench draw (same random numbers, same split as appending each class's
        # chunks to per-client lists): only the chunk sizes are kept until a draw is accepted.
        sizes = np.zeros(num_clients, dtype=np.int64)
        drawn = []
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * (sizes < n / num_clients)
            if p.sum() <= 0:
                p = np.full(num_clients, 1.0 / num_clients)
            p = p / p.sum()
            cuts = np.clip((np.cumsum(p) * len(idx)).astype(int)[:-1], 0, len(idx))  # np.split clips alike
            counts = np.diff(cuts, prepend=0, append=len(idx))
            sizes += counts
            drawn.append((idx, counts))
        short = int((sizes < min_partition_size).sum())
        if short == 0:
            owner = np.concatenate([np.repeat(np.arange(num_clients), c) for _, c in drawn])
            idx = np.concatenate([i for i, _ in drawn]).astype(np.int64)
            order = np.lexsort((idx, owner))  # by client, then sample index: each part sorted
            return np.split(idx[order], np.cumsum(sizes)[:-1])
        shorts.append(short)
        # Success chance per draw is about exp(-mean short clients) (few, nearly independent
        # short clients): past HOPELESS_SHORT the remaining draws would only spend time.
        if len(shorts) >= HOPELESS_AFTER and min(shorts) >= 3 and np.mean(shorts) >= HOPELESS_SHORT:
            raise ValueError(
                f"min_partition_size: no Dirichlet split can be expected with every client >= {min_partition_size} "
                f"samples: each of {len(shorts)} draws left {min(shorts)}-{max(shorts)} of {num_clients} clients "
                f"short (alpha={alpha}, n={n}, {n / num_clients:.1f} samples per client); lower "
                "min_partition_size (0 allows empty clients), raise alpha or lower num_clients")
    raise ValueError(f"min_partition_size: no Dirichlet split with every client >= min_partition_size "
                     f"({min_partition_size}) in {max_tries} draws (alpha={alpha}, "
                     f"num_clients={num_clients}, n={n}); lower min_partition_size or raise alpha")


# Dirichlet redraws give up after HOPELESS_AFTER failed draws whose mean count of short clients
# is at least HOPELESS_SHORT (success chance per draw about exp(-12) = 6e-6: under 1% over 1,000).
HOPELESS_AFTER, HOPELESS_SHORT = 20, 12.0


def shards(labels, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into K*s shards, give each client s at random."""
    labels = np.asarray(labels)
    n = len(labels)
    _check_common(n, num_clients)
    if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be an integer >= 1, got {shards_per_client!r}")
    total = num_clients * shards_per_client
    if total > n:
        raise ValueError(f"num_clients x shards_per_client ({total}) exceeds the number of samples ({n})")
    rng = np.random.default_rng(seed)
    # Stable sort after a shuffle: classes stay contiguous, order inside a class is random.
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    pieces = np.array_split(order, total)
    assign = rng.permutation(total)
    return [np.sort(np.concatenate([pieces[j] for j in assign[k::num_clients]])).astype(np.int64)
            for k in range(num_clients)]


def quantity(labels, num_clients: int, alpha: float, min_partition_size: int = 10,
             seed: int = 0) -> list[np.ndarray]:
    """Quantity skew: client sizes = min size + a Dir(alpha) share of the rest; labels i.i.d."""
    n = len(labels)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    _check_common(n, num_clients, min_partition_size)
    rng = np.random.default_rng(seed)
    rest = n - min_partition_size * num_clients
    sizes = min_partition_size + rng.multinomial(rest, rng.dirichlet(np.full(num_clients, float(alpha))))
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def make_partition(kind: str, labels, num_clients: int, *, alpha: float = 0.5,
                   min_partition_size: int = 10, shards_per_client: int = 2,
                   seed: int = 0) -> list[np.ndarray]:
    """Dispatch by name (unknown names list the valid ones)."""
    if kind == "iid":
        return iid(labels, num_clients, seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, alpha, min_partition_size, seed)
    if kind == "shards":
        return shards(labels, num_clients, shards_per_client, seed)
    if kind == "quantity":
        return quantity(labels, num_clients, alpha, min_partition_size, seed)
    raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}; got {kind!r}")


class ClientRanges(Sequence):
    """The clients of a pool stored client by client: client ``k`` holds rows
    ``bounds[k]:bounds[k + 1]``, and ``ranges[k]`` is that range as an int64 index array,
    made when asked for. One boundary per client instead of one array object per client
    (10,000 clients: 80 kB instead of about 1.3 MB of small arrays, also in what workers
    receive). Behaves as the list of index arrays it replaces (len, indexing, iteration)."""

    def __init__(self, sizes):
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if (sizes < 0).any():
            raise ValueError("ClientRanges: client sizes must be >= 0")
        self.bounds = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = operator.index(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"client {k} out of range ({len(self)} clients)")
        return np.arange(self.bounds[k], self.bounds[k + 1])

    def sizes(self) -> np.ndarray:
        """Samples per client (int64)."""
        return np.diff(self.bounds)

    def __repr__(self) -> str:
        return f"ClientRanges({len(self)} clients, {int(self.bounds[-1])} samples)"


# ---------------------------------------------------------------- report
def class_counts(labels, parts, num_classes: int | None = None) -> np.ndarray:
    """(clients, classes) matrix of sample counts (int64), in one bincount over
    (client, label) pairs: no per-client array, for any number of clients."""
    labels = np.asarray(labels)
    c = int(num_classes or labels.max() + 1)
    k = len(parts)
    sizes = parts.sizes() if isinstance(parts, ClientRanges) else np.fromiter(map(len, parts), np.int64, k)
    idx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if k else np.zeros(0, np.int64)
    lab = labels[idx].astype(np.int64)
    if len(lab) and (lab.min() < 0 or lab.max() >= c):
        raise ValueError(f"num_classes: labels must lie in [0, {c}), got {lab.min()}..{lab.max()}")
    return np.bincount(np.repeat(np.arange(k, dtype=np.int64), sizes) * c + lab, minlength=k * c).reshape(k, c)


def label_skew(labels, parts) -> float:
    """Mean total-variation distance between each client's label distribution and the pool's."""
    counts = class_counts(labels, parts).astype(float)
    glob = counts.sum(0) / counts.sum()
    dist = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(dist - glob).sum(1).mean())


# Beyond this many clients the terminal gets a summary (quantiles), not one row per client;
# partition.txt keeps the full table.
TABLE_MAX_CLIENTS = 50


def partition_table(counts: np.ndarray, classes=None) -> str:
    """Plain-text table: one row per client, one column per class, plus the total."""
    k, c = counts.shape
    names = [str(x) for x in (classes or range(c))]
    names = [n if len(n) <= 6 else n[:6] for n in names]
    w = max(6, max(len(n) for n in names), len(str(int(counts.max(initial=0)))))
    head = "client " + " ".join(f"{n:>{w}}" for n in names) + f" {'total':>7}"
    rows = [head, "-" * len(head)]
    for i in range(k):
        rows.append(f"{i:>6} " + " ".join(f"{int(v):>{w}}" for v in counts[i]) + f" {int(counts[i].sum()):>7}")
    rows.append(f"{'all':>6} " + " ".join(f"{int(v):>{w}}" for v in counts.sum(0)) + f" {int(counts.sum()):>7}")
    return "\n".join(rows)


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def client_stats(counts: np.ndarray) -> dict:
    """Per-client summaries of a (clients, classes) count matrix, each an array over clients:
    ``size`` (samples), ``classes`` (classes present), ``top_share`` (share of the client's
    largest class), ``skew`` (total-variation distance of its label distribution from the
    pool's; 0 for an empty client)."""
    counts = np.asarray(counts, dtype=np.float64)
    size = counts.sum(1)
    glob = counts.sum(0) / max(counts.sum(), 1.0)
    dist = counts / np.maximum(size, 1.0)[:, None]
    skew = np.where(size > 0, 0.5 * np.abs(dist - glob).sum(1), 0.0)
    return {"size": size, "classes": (counts > 0).sum(1).astype(float),
            "top_share": dist.max(1, initial=0.0), "skew": skew}


def partition_summary(counts: np.ndarray, classes=None) -> str:
    """A table of a few lines for any number of clients: quantiles over clients of their size,
    classes present, largest-class share and label skew, then the pool's class totals."""
    k, c = counts.shape
    st = client_stats(counts)
    head = f"{k} clients      " + " ".join(f"{'min' if q == 0 else 'max' if q == 1 else f'{q:.0%}':>7}"
                                          for q in QUANTILES) + f" {'mean':>7}"
    rows = [head, "-" * len(head)]
    for name, key, fmt in (("samples", "size", ".0f"), ("classes", "classes", ".0f"),
                           ("top class", "top_share", ".2f"), ("label skew", "skew", ".2f")):
        v = st[key]
        rows.append(f"{name:<15}" + " ".join(f"{x:>7{fmt}}" for x in np.quantile(v, QUANTILES))
                    + f" {v.mean():>7.2f}")
    names = [str(x) for x in (classes or range(c))]
    tot = counts.sum(0)
    shown = ", ".join(f"{n} {int(v)}" for n, v in list(zip(names, tot))[:20]) + (f", ... ({c} classes)" if c > 20 else "")
    rows.append("pool by class: " + shown
                + f"; total {int(counts.sum())}; empty clients {int((st['size'] == 0).sum())}")
    return "\n".join(rows)


def partition_report(counts: np.ndarray, classes=None, max_clients: int = TABLE_MAX_CLIENTS) -> str:
    """What the terminal shows: the full table up to ``max_clients`` clients, else
    :func:`partition_summary` (a 10,000-row table helps nobody on a terminal)."""
    if len(counts) <= max_clients:
        return partition_table(counts, classes)
    return partition_summary(counts, classes)

