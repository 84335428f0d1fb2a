"""Robust aggregation: what the server makes of a round's replies when some clients lie.

Pure functions over the held replies of one round (``states``: the valid replies' state dicts,
in fold order, i.e. increasing client id), called by :func:`.strategy.robust_average` after the
replies were screened (malformed, non-finite, implausible, norm bound). None of them weighs a
reply by its sample count: a count is what a client claims, and a claim must not buy influence.

- ``median`` / ``trimmed_mean``: coordinate-wise (Yin et al. 2018), every tensor.
- ``multi_krum``: Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): each reply is
  scored by the summed squared distances to its K - f - 2 nearest others; the mean of the
  ``m`` best scored (default K - f) is the aggregate (``m = 1``: Krum).
- ``geometric_median``: the point minimising the summed Euclidean distances to the replies,
  by Weiszfeld's iteration with RFA's smoothing (Pillutla et al. 2022), unweighted.
- ``centered_clip``: centered clipping (Karimireddy et al. 2021) of the updates around the
  global model: ``v += mean_k clip_tau(d_k - v)``, ``CLIP_ITERS`` times from ``v = 0``.

The vector methods (Multi-Krum, geometric median, centered clipping) act on the floating-point
parameters as one vector (the quantitative copy of a FedSQ model: its payload). BatchNorm
running statistics and integer buffers (``num_batches_tracked``) are not parameters a client
optimises and take no part in the distances: they take the coordinate-wise median of all the
valid replies (lower median for integers), exactly what ``median`` gives them, so a minority
can move them no further than it can move a median.

Everything is computed on the host in float64 numpy, in a fixed order (clients in fold order,
keys in the global model's order; numpy's reductions are single-threaded), so the result does
not depend on the thread count or the worker count; the result is rounded to each tensor's
dtype and put on its device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ROBUST_AGGREGATORS = ("median", "trimmed_mean", "multi_krum", "geometric_median", "centered_clip")
VECTOR_AGGREGATORS = ("multi_krum", "geometric_median", "centered_clip")

# Weiszfeld: stop when a step moves the estimate by less than GM_TOL x the median distance of
# the replies to it (or after GM_MAX_ITERS steps); distances below GM_NU (RFA's smoothing nu)
# count as GM_NU, so a reply that coincides with the estimate does not divide by zero.
GM_TOL = 1e-10
GM_MAX_ITERS = 500
GM_NU = 1e-12
# Centered clipping: iterations from v = 0 (Karimireddy et al. use 1 with worker momentum; a
# federated round has no momentum on the clients, and 3 lets v recentre on the honest majority).
CLIP_ITERS = 3


class RobustRefusal(ValueError):
    """The round's valid replies cannot be aggregated as configured (too few for Multi-Krum's
    f): the global model is kept and the message says why, naming the key."""


def krum_min_replies(f: int) -> int:
    """The fewest replies Multi-Krum needs to tolerate ``f`` Byzantine ones: 2f + 3
    (Blanchard et al. 2017, n > 2f + 2); f = 0 claims no tolerance and takes any count."""
    return 2 * f + 3 if f > 0 else 1


def krum_auto_f(k: int) -> int:
    """``krum_f = None``: the most Byzantine replies K replies tolerate, floor((K - 3) / 2)."""
    return max(0, (k - 3) // 2)


def _is_vector_key(key: str, t: torch.Tensor, is_stat) -> bool:
    return t.dtype.is_floating_point and not is_stat(key)


def _host64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).reshape(-1).numpy()


def _stack(states: list, key: str) -> np.ndarray:
    """(K, n) float64 of one tensor across the replies, in fold order."""
    return np.stack([_host64(s[key]) for s in states])


def _fixed_sum(rows: np.ndarray, coef=None) -> np.ndarray:
    """sum_k coef_k rows_k, accumulated client by client in index order (elementwise: the
    same bits for any thread count)."""
    acc = np.zeros(rows.shape[1:], dtype=np.float64)
    for i in range(rows.shape[0]):
        acc += rows[i] if coef is None else coef[i] * rows[i]
    return acc


def _norms(rows: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row (numpy's pairwise sum, single-threaded)."""
    return np.sqrt(np.array([np.sum(r * r) for r in rows]))


def pairwise_sq_dists(x: np.ndarray) -> np.ndarray:
    """(K, K) squared Euclidean distances between the rows of ``x`` (float64, each from the
    differences: no Gram-matrix cancellation)."""
    k = x.shape[0]
    d = np.zeros((k, k), dtype=np.float64)
    for i in range(k):
        for j in range(i + 1, k):
            diff = x[i] - x[j]
            d[i, j] = d[j, i] = np.sum(diff * diff)
    return d


def krum_scores(d: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each reply from the squared distances ``d``: the sum of its
    K - f - 2 smallest distances to the others (all of them when that is K - 1 or more)."""
    k = d.shape[0]
    nb = max(0, min(k - 1, k - f - 2))
    return np.array([np.sort(np.delete(d[i], i))[:nb].sum() for i in range(k)])


def krum_select(x: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Indices (ascending) of the ``m`` replies Multi-Krum keeps (default, and at most, K - f:
    a round with fewer replies than configured keeps fewer): lowest scores first, ties to the
    lower index (the earlier in fold order)."""
    k = x.shape[0]
    m = k - f if m is None else max(1, min(m, k - f))
    scores = krum_scores(pairwise_sq_dists(x), f)
    return np.sort(np.argsort(scores, kind="stable")[:m])


def geometric_median(x: np.ndarray, start: np.ndarray | None = None, tol: float = GM_TOL,
                     max_iters: int = GM_MAX_ITERS, nu: float = GM_NU) -> np.ndarray:
    """argmin_z sum_k ||z - x_k|| over the rows of ``x`` (float64), by Weiszfeld's iteration
    with distances floored at ``nu`` (RFA's smoothed Weiszfeld), from ``start`` (default the
    coordinate-wise median: already within the honest majority's hull)."""
    z = np.median(x, axis=0) if start is None else np.array(start, dtype=np.float64)
    for _ in range(max_iters):
        d = _norms(x - z)
        w = 1.0 / np.maximum(d, nu)
        new = _fixed_sum(x, w) / w.sum()
        step = math.sqrt(float(np.sum((new - z) ** 2)))
        z = new
        if step <= tol * max(float(np.median(d)), nu):
            break
    return z


def centered_clip(x: np.ndarray, center: np.ndarray, radius: float | None = None,
                  iters: int = CLIP_ITERS) -> np.ndarray:
    """Centered clipping (Karimireddy et al. 2021) of the rows of ``x`` around ``center``
    (the global model): v = 0; ``iters`` times v += mean_k (d_k - v) min(1, tau / ||d_k - v||)
    with d_k = x_k - center; returns center + v. ``radius`` tau; None: the median of
    ||d_k - v|| at each iteration (ours: scale-free, set by the majority)."""
    d = x - center
    v = np.zeros_like(center)
    for _ in range(iters):
        r = d - v
        n = _norms(r)
        tau = float(np.median(n)) if radius is None else float(radius)
        c = np.where(n > tau, tau / np.where(n > 0, n, 1.0), 1.0)
        v = v + _fixed_sum(r, c) / len(x)
    return center + v


def _median_rows(x: np.ndarray, floating: bool) -> np.ndarray:
    k = x.shape[0]
    xs = np.sort(x, axis=0)
    if floating:
        return xs[(k - 1) // 2] if k % 2 else (xs[k // 2 - 1] + xs[k // 2]) / 2
    return xs[(k - 1) // 2]  # lower median: stays an integer


def _coordinatewise(kind: str, states: list, global_state: dict, trim_fraction: float) -> dict:
    """Coordinate-wise median / trimmed mean of every tensor, computed in float64 (int64 for
    integers) and rounded to its dtype."""
    k = len(states)
    cut = int(math.floor(trim_fraction * k)) if kind == "trimmed_mean" else 0
    out = {}
    with torch.no_grad():
        for key, g in global_state.items():
            x = torch.stack([s[key].to(g.device) for s in states])
            floating = g.dtype.is_floating_point
            xs = (x.double() if floating else x.long()).sort(dim=0).values
            if kind == "median":
                if floating:
                    v = xs[(k - 1) // 2] if k % 2 else (xs[k // 2 - 1] + xs[k // 2]) / 2
                else:
                    v = xs[(k - 1) // 2]  # lower median: stays an integer
            else:
                mid = xs[cut:k - cut]
                v = mid.mean(0) if floating else torch.round(mid.double().mean(0)).long()
            out[key] = v.to(g.dtype)
    return out


def aggregate_held(kind: str, global_state: dict, states: list, *, is_stat, trim_fraction: float = 0.1,
                   krum_f: int | None = None, krum_m: int | None = None,
                   clip_radius: float | None = None) -> dict:
    """The robust aggregate ``kind`` (one of :data:`ROBUST_AGGREGATORS`) of ``states`` (the
    valid replies, fold order) against ``global_state``. ``is_stat(key)``: BatchNorm
    statistics (coordinate-wise median under the vector methods, as integer buffers).
    Raises :class:`RobustRefusal` when Multi-Krum has fewer than 2 krum_f + 3 replies."""
    if kind in ("median", "trimmed_mean"):
        return _coordinatewise(kind, states, global_state, trim_fraction)
    if kind not in VECTOR_AGGREGATORS:
        raise ValueError(f"aggregator must be one of {', '.join(ROBUST_AGGREGATORS)}; got {kind!r}")
    k = len(states)
    vkeys = [key for key, g in global_state.items() if _is_vector_key(key, g, is_stat)]
    sizes = [global_state[key].numel() for key in vkeys]
    x = np.concatenate([_stack(states, key) for key in vkeys], axis=1) if vkeys else np.zeros((k, 0))
    if kind == "multi_krum":
        f = krum_auto_f(k) if krum_f is None else int(krum_f)
        if k < krum_min_replies(f):
            raise RobustRefusal(f"krum_f = {f} needs at least {krum_min_replies(f)} valid replies "
                                f"(2 krum_f + 3), got {k}: global model kept")
        sel = krum_select(x, f, krum_m)
        vec = _fixed_sum(x[sel]) / len(sel)
    elif kind == "geometric_median":
        vec = geometric_median(x)
    else:
        center = np.concatenate([_host64(global_state[key]) for key in vkeys]) if vkeys else np.zeros(0)
        vec = centered_clip(x, center, clip_radius)
    out, at = {}, 0
    with torch.no_grad():
        for key, g in global_state.items():
            if _is_vector_key(key, g, is_stat):
                n = sizes[vkeys.index(key)]
                v = torch.from_numpy(vec[at:at + n].reshape(tuple(g.shape)).copy())
                at += n
            else:  # statistics, integer and bool buffers: coordinate-wise median of all replies
                floating = g.dtype.is_floating_point
                rows = _stack(states, key) if floating else np.stack(
                    [s[key].detach().cpu().reshape(-1).numpy().astype(np.int64) for s in states])
                v = torch.from_numpy(np.ascontiguousarray(_median_rows(rows, floating)).reshape(tuple(g.shape)))
            out[key] = v.to(device=g.device, dtype=g.dtype)
    return out
