"""Client partitions of a labelled pool: i.i.d., Dirichlet label skew, shards, quantity skew.

Every function returns a list of sorted int64 index arrays, one per client, that
together hold every sample exactly once; all randomness comes from ``seed``.
"""
from __future__ import annotations

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
    n/K samples gets no more), at most ``max_tries`` times.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    _check_common(n, num_clients, min_partition_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            sizes = np.array([len(q) for q in parts])
            p = p * (sizes < n / num_clients)
            if p.sum() <= 0:
                p = np.full(num_clients, 1.0 / num_clients)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_partition_size:
            return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]
    raise ValueError(f"no Dirichlet split with every client >= min_partition_size "
                     f"({min_partition_size}) in {max_tries} draws (alpha={alpha}, "
                     f"num_clients={num_clients}, n={n}); lower min_partition_size or raise alpha")


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


# ---------------------------------------------------------------- report
def class_counts(labels, parts, num_classes: int | None = None) -> np.ndarray:
    """(clients, classes) matrix of sample counts."""
    labels = np.asarray(labels)
    c = int(num_classes or labels.max() + 1)
    return np.stack([np.bincount(labels[p], minlength=c) for p in parts])


def label_skew(labels, parts) -> float:
    """Mean total-variation distance between each client's label distribution and the pool's."""
    counts = class_counts(labels, parts).astype(float)
    glob = counts.sum(0) / counts.sum()
    dist = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(dist - glob).sum(1).mean())


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


def __getattr__(name):
    if name == "plot_partition":  # moved: every plot is in fedsq_fast.plots
        import warnings

        from ..plots import plot_partition

        warnings.warn("fedsq_fast.federation.partition.plot_partition moved to fedsq_fast.plots.plot_partition",
                      DeprecationWarning, stacklevel=2)
        return plot_partition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
