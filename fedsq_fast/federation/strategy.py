"""Server strategies as pure state-dict transforms, reusable from a Flower ServerApp.

A strategy sees only state dicts: ``aggregate(global_state, replies)`` folds the
replies (an iterable of ``(state, num_samples)``, consumed one at a time) with
:class:`fedsq_fast.StreamingAverage` and returns the new global state. Server
optimizers (FedAvgM, FedAdam, FedYogi; Reddi et al. 2021) treat
``average - global`` as the pseudo-gradient. FedBN names the BatchNorm keys that
stay on the clients; FedProx's proximal term is a client-side option.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ..ops import StreamingAverage, sq_dist
from .robust import ROBUST_AGGREGATORS, RobustRefusal, aggregate_held

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedbn")
_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_stat_key(key: str) -> bool:
    """BatchNorm statistics: averaged, never moved by a server optimizer."""
    return key.rsplit(".", 1)[-1] in _STAT_SUFFIXES


def norm_layer_keys(state: dict) -> set[str]:
    """Keys of normalisation layers: every key sharing a prefix with a ``running_var``."""
    prefixes = {k[: -len("running_var")] for k in state if k.endswith("running_var")}
    return {k for k in state if any(k.startswith(p) and "." not in k[len(p):] for p in prefixes)}


def check_update(reference: dict, update: dict, finite: bool = True) -> str | None:
    """Why ``update`` must not be averaged (wrong keys, types, layouts, devices, shapes,
    dtypes, NaN/Inf), or None.
    ``finite=False`` skips the NaN/Inf scan (the caller checks it another way)."""
    if not isinstance(update, dict):
        return f"update is a {type(update).__name__}, not a state dict"
    if update.keys() != reference.keys():
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        return f"wrong keys (missing {missing}, unexpected {extra})"
    for k, ref in reference.items():
        t = update[k]
        if not isinstance(t, torch.Tensor):
            return f"{k}: not a tensor ({type(t).__name__})"
        if t.layout != torch.strided:  # sparse: no min/max scan, no fused average
            return f"{k}: layout {t.layout}, expected a dense (strided) tensor"
        if t.device != ref.device:  # a meta tensor has no values; another device cannot be folded
            return f"{k}: on device {t.device}, expected {ref.device}"
        if t.shape != ref.shape:
            return f"{k}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{k}: dtype {t.dtype}, expected {ref.dtype}"
        if finite and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return f"{k}: NaN or Inf"
    return None


@dataclass
class AggregateStats:
    """What one aggregation saw: counts, drift and rejected replies with reasons."""

    num_clients: int = 0
    num_samples: int = 0
    rejected: list = field(default_factory=list)  # (client id, reason)
    client_drift: float = float("nan")  # sqrt(weighted mean ||d_k - d_avg||^2)
    update_norm: float = float("nan")  # ||d_avg||
    rolled_back: str | None = None  # why the aggregate was discarded (the global model kept)
    capped: list = field(default_factory=list)  # [client id, claimed count, the count it was weighted by]
    dp: dict | None = None  # DP rounds: the clip used, the noise std on the average (federation/privacy.py)


# How far one client's values may lie from the global model's, in magnitude: far beyond what
# local training does (BatchNorm statistics move by a few times across domains), far below
# what overflows a float32 accumulator summed over many clients (3.4e38).
PLAUSIBLE_SCALE = 1e6
INT_STEP_MAX = 2**31  # integer buffers (BN's num_batches_tracked) grow by local steps per round


def implausible(reference: dict, update: dict, scale: float = PLAUSIBLE_SCALE) -> str | None:
    """Why a well-formed, finite update is still not a model's (a negative variance, values
    more than ``scale`` x (1 + the global model's max |value|), integer counters out of range),
    or None."""
    with torch.no_grad():
        for k, ref in reference.items():
            t = update[k]
            if not t.numel():
                continue
            if t.dtype.is_floating_point:
                lo, hi = (float(v) for v in torch.aminmax(t))  # no model-sized temporary (unlike abs)
                if k.endswith("running_var") and lo < 0:
                    return f"{k}: negative variance"
                big = max(-lo, hi)
                bound = scale * (1.0 + _max_abs(ref))
                if big > bound:
                    return f"{k}: |value| up to {big:.3g}, implausible against the global model's (bound {bound:.3g})"
            elif t.dtype != torch.bool:
                reason = _int_problem(k, t, int(_max_abs(ref)))
                if reason is not None:
                    return reason
    return None


def _int_problem(k: str, t: torch.Tensor, ref_max: int) -> str | None:
    """Why integer tensor ``t`` (non-empty, not bool) is implausible against a global tensor
    whose max |value| is ``ref_max``, or None."""
    lo, hi = (int(t.item()),) * 2 if t.numel() == 1 else (int(v) for v in torch.aminmax(t))
    span = ref_max + INT_STEP_MAX
    low = 0 if k.endswith("num_batches_tracked") else -span  # a count is never negative
    if lo < low or hi > span:
        return f"{k}: integer values in [{lo}, {hi}], expected in [{low}, {span}]"
    return None


_UNCHECKED = object()  # ReplyScan.scan: no sample count to check


class ReplyScan:
    """Every check of a well-formed reply against one global model, each floating tensor read
    once (:func:`fedsq_fast.ops.reply_stats`: min/max, NaN/Inf count and the squared update in
    one pass, compiled CPU kernel). ``scan(update)`` returns ``||update - global||^2`` over the
    parameters (BatchNorm statistics aside), or the reason the reply must not be averaged,
    with the same rules and reasons as :func:`implausible` followed by :func:`_sq_dist`
    (the squared norm equal to it bit for bit). The global model's max |value| per tensor,
    which the plausibility bound needs, is read once per round, not once per reply. Replies
    on a GPU take the separate checks (the reference of reply_stats would sync per tensor).
    ``plausible_scale`` None: no plausibility check; ``count``: the reply's sample count,
    checked between the plausibility and the NaN/Inf checks as before."""

    def __init__(self, global_state: dict, plausible_scale: float | None, max_abs_each: dict | None = None):
        from ..ops import backend

        self.ref, self.scale = global_state, plausible_scale
        self.floats = [k for k, g in global_state.items() if g.dtype.is_floating_point]
        self.in_total = [not is_stat_key(k) for k in self.floats]
        self._pos = {k: i for i, k in enumerate(self.floats)}
        self.fused = backend() == "compiled" and all(global_state[k].device.type == "cpu" for k in self.floats)
        self._max_abs_each = max_abs_each  # the global model's, when the caller has read it already
        self._bounds = None
        self._int_maxes = None
        self._bound_vec = None

    def _bound(self, k):
        if self._bounds is None:
            m = self._max_abs_each if self._max_abs_each is not None else _max_abs_each(self.ref)
            self._bounds = {k: self.scale * (1.0 + m.get(k, 0)) for k in self.floats}
        return self._bounds[k]

    def _plausible(self, update: dict, st) -> bool:
        """Every plausibility rule holds (one vector test over the floating rows, then the
        integer buffers); False sends :meth:`judge` through its per-key loop for the reason."""
        if self._bound_vec is None:  # per round: the bounds and the variances' rows as tensors
            self._bound_vec = torch.tensor([self._bound(k) for k in self.floats], dtype=torch.float64)
            self._var_rows = torch.tensor([i for i, k in enumerate(self.floats) if k.endswith("running_var")],
                                          dtype=torch.long)
        lo, hi = st[:, 0], st[:, 1]  # an empty tensor's rows are +Inf / -Inf: never out of bounds
        if bool((torch.maximum(-lo, hi) > self._bound_vec).any()) or bool((lo[self._var_rows] < 0).any()):
            return False
        for k, top in self._ints().items():
            t = update[k]
            if t.numel() and _int_problem(k, t, top) is not None:
                return False
        return True

    def _ints(self) -> dict:
        """The global model's integer (not bool) tensors' max |value|, read once per round."""
        if self._int_maxes is None:
            self._int_maxes = {k: int(_max_abs(g)) for k, g in self.ref.items()
                               if not g.dtype.is_floating_point and g.dtype != torch.bool}
        return self._int_maxes

    def scan(self, update: dict, count=_UNCHECKED):
        """The squared update (float) or the reason (str); ``count`` as in :func:`count_problem`."""
        if not self.fused:
            reason = None if self.scale is None else implausible(self.ref, update, self.scale)
            if reason is None and count is not _UNCHECKED:
                reason = count_problem(count)
            return _sq_dist(update, self.ref, check=True) if reason is None else reason
        from ..ops import reply_stats

        keys = self.floats
        st, total = reply_stats([update[k] for k in keys], [self.ref[k] for k in keys], self.in_total)
        return self.judge(update, st, total, count)

    def judge(self, update: dict, st, total: float, count=_UNCHECKED):
        """:meth:`scan`'s verdict from the reply's :func:`fedsq_fast.ops.reply_stats` rows
        against the global model (its floating tensors in the global model's order, ``in_total``
        as :attr:`in_total`), taken by the caller (e.g. with the fold: StreamingAverage.add_many)."""
        keys = self.floats
        if self.scale is not None and not self._plausible(update, st):
            rows = st.tolist()  # something is out of bounds: the first key in the global model's order says what
            for k, g in self.ref.items():
                if not g.dtype.is_floating_point:
                    t = update[k]
                    if t.numel() and t.dtype != torch.bool:
                        reason = _int_problem(k, t, self._ints()[k])
                        if reason is not None:
                            return reason
                    continue
                lo, hi, _, _ = rows[self._pos[k]]
                if not update[k].numel():
                    continue
                if k.endswith("running_var") and lo < 0:
                    return f"{k}: negative variance"
                big, bound = max(-lo, hi), self._bound(k)
                if big > bound:
                    return f"{k}: |value| up to {big:.3g}, implausible against the global model's (bound {bound:.3g})"
        if count is not _UNCHECKED:
            reason = count_problem(count)
            if reason is not None:
                return reason
        if bool(st[:, 2].any()):
            for k, (_, _, bad, _) in zip(keys, st.tolist()):
                if bad:
                    return f"{k}: NaN or Inf"
        if not math.isfinite(total):
            for k, (_, _, _, sq) in zip(keys, st.tolist()):
                if not is_stat_key(k) and not math.isfinite(sq):
                    return f"{k}: NaN or Inf (or an update too large to square)"
            return "NaN or Inf in the update"
        return total


def _max_abs(t: torch.Tensor):
    """max |t| from min and max (NaN propagates): no temporary the size of t."""
    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t)
    return max(-lo.item(), hi.item())


def _max_abs_each(state: dict) -> dict:
    """:func:`_max_abs` of every non-empty floating tensor of ``state`` (NaN where it holds a
    NaN). On CPU with the compiled library one ``reply_stats`` call reads them all (each
    tensor against itself: min, max and NaN/Inf count in one list op) instead of one
    aminmax and two host reads per tensor, which dominated a round's checks (issue 28)."""
    keys = [k for k, t in state.items() if t.dtype.is_floating_point and t.numel()]
    from ..ops import backend, reply_stats

    if not keys or backend() != "compiled" or any(state[k].device.type != "cpu" for k in keys):
        return {k: _max_abs(state[k]) for k in keys}
    with torch.no_grad():
        ts = [state[k] for k in keys]
        rows = reply_stats(ts, ts, [False] * len(ts))[0].tolist()
    out = {}
    for k, (lo, hi, bad, _) in zip(keys, rows):
        m = max(-lo, hi)
        # min/max skip NaN but keep Inf: a NaN is a non-finite count beside finite extremes,
        # or (beside an Inf) the aminmax answer NaN all the same; either way the caller sees
        # a non-finite value, as with aminmax
        out[k] = math.nan if bad and (math.isfinite(m) or math.isnan(_max_abs(state[k]))) else m
    return out


def nonfinite_key(state: dict) -> str | None:
    """The first floating tensor of ``state`` with a NaN or Inf, or None (min and max carry
    a NaN or an Inf, so no model-sized temporary is needed)."""
    for k, m in _max_abs_each(state).items():
        if not math.isfinite(m):
            return k
    return None


def _sq_dist(state: dict, ref: dict, check: bool = False) -> float | str:
    """sum over float parameter tensors of ||state - ref||^2 (fedsq_fast.ops.sq_dist:
    one pass, no temporaries). With ``check``, a non-finite result means a NaN/Inf
    entry: the offending key is found and returned as the reason instead;
    statistics (BN running stats) are scanned with isfinite."""
    keys = []
    with torch.no_grad():
        for k, g in ref.items():
            if not g.dtype.is_floating_point:
                continue
            if is_stat_key(k):
                if check and not bool(torch.isfinite(state[k]).all()):
                    return f"{k}: NaN or Inf"
                continue
            keys.append(k)
        tot = sq_dist([state[k] for k in keys], [ref[k] for k in keys])
        if check and not math.isfinite(tot):
            for k in keys:  # rare path: name the tensor
                if not math.isfinite(sq_dist([state[k]], [ref[k]])):
                    return f"{k}: NaN or Inf (or an update too large to square)"
            return "NaN or Inf in the update"
    return tot


AGGREGATORS = ("mean",) + ROBUST_AGGREGATORS  # robust ones: federation/robust.py


def plain_count(n):
    """A reply's sample count with numpy scalars and one-element real tensors as Python
    numbers (a Python int stays exact at any size); anything else as given."""
    if isinstance(n, np.generic):
        return n.item()
    if isinstance(n, torch.Tensor) and n.numel() == 1 and not n.dtype.is_complex and n.dtype != torch.bool:
        return n.item()
    return n


def count_problem(n) -> str | None:
    """Why ``n`` (after :func:`plain_count`) is not a sample count a reply can be weighted by
    (not an int or float, not finite, not > 0), or None. Size is not judged here (the
    averaging takes any finite count; caps are :func:`cap_counts`')."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return f"num_samples must be an int or a float, got {type(n).__name__} {_short_repr(n)}"
    if isinstance(n, float) and not math.isfinite(n) or not n > 0:
        return f"num_samples must be > 0, got {n!r}"
    return None


def _short_repr(v, limit: int = 60) -> str:
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - a hostile __repr__
        return "(no repr)"
    return r if len(r) <= limit else r[:limit] + "..."


def count_as_float(n) -> float:
    """A count as a float: inf for a Python int past float64's range (no OverflowError)."""
    try:
        return float(n)
    except OverflowError:
        return math.inf


def _valid_replies(global_state: dict, replies: Iterable, stats: AggregateStats,
                   plausible_scale: float | None = PLAUSIBLE_SCALE, maxes: dict | None = None):
    """``(client, state, num_samples, ||update||^2)`` of each valid reply, in arrival order;
    the others land in ``stats.rejected`` with the reason (malformed, NaN/Inf, implausible,
    a non-positive sample count). ``plausible_scale`` None: no plausibility check (finite
    replies are averaged whatever their size: the behaviour of runs recorded before it).
    Counting the accepted ones is the caller's (:func:`_screened`). ``maxes``: see ReplyScan."""
    scan = ReplyScan(global_state, plausible_scale, maxes)
    for cid, state, n in replies:
        reason = check_update(global_state, state, finite=False)
        if reason is None:
            n = plain_count(n)
        sq = scan.scan(state, n) if reason is None else reason
        if isinstance(sq, str):
            stats.rejected.append((cid, sq))
            continue
        yield cid, state, n, sq
        del state  # else this frame keeps the reply alive while the next one is produced


# An update whose norm per local batch exceeds NORM_BOUND x the cohort's median is refused.
# Per local batch, because an honest client's update grows with its local steps: on a
# quantity-skewed split (sizes 10..2362) the raw norms of honest clients reached 37x their
# median, the norms per local batch 3.8x (benchmarks/RESULTS.md, "Cohort norm bound").
NORM_BOUND = 10.0
NORM_BOUND_MIN_COHORT = 3  # a median of one or two replies says nothing about either


def local_batches(num_samples: float, batch_size: int) -> int:
    """The local batches per epoch a client with ``num_samples`` samples runs (>= 1)."""
    return max(1, math.ceil(num_samples / batch_size))


def _screened(global_state: dict, replies: Iterable, stats: AggregateStats,
              plausible_scale: float | None, norm_bound: float | None, batch_size: int,
              hold: bool = False, copy_held: bool = True, with_cid: bool = False, maxes: dict | None = None):
    """The replies to aggregate, as ``(state, num_samples, ||update||^2)``, counted in
    ``stats``: the valid ones (:func:`_valid_replies`), streamed one at a time when
    ``norm_bound`` is None and ``hold`` is False; otherwise held (copied unless ``copy_held``
    is False: an in-process reply aliases the worker model) until the cohort is known, then
    those whose update norm per local batch exceeds ``norm_bound`` x the cohort median are
    rejected with the reason. Fewer than
    NORM_BOUND_MIN_COHORT valid replies, or a zero median: no bound. Arrival order kept, so
    with nothing rejected the aggregate is bit-identical to the unbounded one.
    ``with_cid``: ``(client, state, num_samples, ||update||^2)`` instead; ``maxes``: see ReplyScan."""
    valid = _valid_replies(global_state, replies, stats, plausible_scale, maxes)
    if norm_bound is None and not hold:
        for cid, state, n, sq in valid:
            stats.num_clients += 1
            stats.num_samples += int(n)
            yield (cid, state, n, sq) if with_cid else (state, n, sq)
            del state
        return
    held = []
    for cid, state, n, sq in valid:
        held.append((cid, _held_copy(state) if copy_held else state, n, sq))
        del state
    over = _over_bound(held, norm_bound, batch_size)
    for i, why in enumerate(over):
        (cid, state, n, sq), held[i] = held[i], None  # each reply let go once folded
        if why is not None:
            stats.rejected.append((cid, why))
            continue
        stats.num_clients += 1
        stats.num_samples += int(n)
        yield (cid, state, n, sq) if with_cid else (state, n, sq)
        del state


def _held_copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _over_bound(held: list, norm_bound: float | None, batch_size: int) -> list:
    """Per held ``(client, state, num_samples, ||update||^2)``: why the cohort norm bound
    rejects it, or None. The bound is ``norm_bound`` x the median update norm per local
    batch; fewer than NORM_BOUND_MIN_COHORT replies or a zero median: no bound."""
    per = [math.sqrt(sq) / local_batches(count_as_float(n), batch_size) for _, _, n, sq in held]
    bound = None
    if norm_bound is not None and len(held) >= NORM_BOUND_MIN_COHORT:
        med = statistics.median(per)
        bound = norm_bound * med if med > 0 else None
    return [f"update norm per local batch {p:.3g} is {p / med:.3g}x the cohort median {med:.3g} "
            f"(norm_bound {norm_bound:g})" if bound is not None and p > bound else None for p in per]


def _held_average(global_state: dict, replies: Iterable, stats: AggregateStats, plausible_scale: float | None,
                  norm_bound: float, batch_size: int, copy_held: bool, maxes: dict | None, max_abs: float | None):
    """stream_average under the cohort norm bound: the round's replies are held anyway, so
    every well-formed one (usable count) is read once for both its checks and a speculative
    fold of all of them (StreamingAverage.add_many, tile by tile). When every one is then
    accepted, that fold is the average (the usual case); when some are rejected, the accepted
    ones are folded again. The same verdicts, reasons (in arrival order, then the bound's)
    and bits as screening each reply and then adding the accepted ones one by one.
    Returns ``(StreamingAverage or None, sum_k n_k ||d_k||^2)``."""
    scan = ReplyScan(global_state, plausible_scale, maxes)
    entries = []  # [client, state, count, reason]
    for cid, state, n in replies:
        reason = check_update(global_state, state, finite=False)
        if reason is None:
            n = plain_count(n)
            state = _held_copy(state) if copy_held else state
        entries.append([cid, state if reason is None else None, n, reason])
        del state
    order = list(global_state)
    cand = [e for e in entries if e[3] is None and count_problem(e[2]) is None]
    avg, rows = None, None
    if scan.fused and cand and all(list(e[1]) == order for e in cand):
        avg = StreamingAverage()
        try:
            rows = avg.add_many([e[1] for e in cand], [e[2] for e in cand], max_abs=max_abs,
                                stats_refs=global_state, in_total=scan.in_total)
        except (ValueError, TypeError):  # one of them cannot be folded: one by one below, naming it
            avg, rows = None, None
    rows = iter(rows) if rows is not None else None
    held = []
    for e in entries:
        cid, state, n, reason = e
        e[1] = None
        if reason is None:
            if rows is not None and count_problem(n) is None:
                sq = scan.judge(state, *next(rows), n)
            else:
                sq = scan.scan(state, n)
            if not isinstance(sq, str):
                held.append((cid, state, n, sq))
                continue
            reason = sq
        stats.rejected.append((cid, reason))
    del entries, cand
    over = _over_bound(held, norm_bound, batch_size)
    if avg is not None and len(held) == avg.count and not any(over):
        fold = None  # every reply folded speculatively was accepted: that fold is the average
    else:
        avg, fold = StreamingAverage(), True
    sq_sum = 0.0
    for i, why in enumerate(over):
        (cid, state, n, sq), held[i] = held[i], None
        if why is not None:
            stats.rejected.append((cid, why))
            continue
        if fold:
            try:
                avg.add(state, n, max_abs=max_abs)
            except (ValueError, TypeError) as e:  # refused before it was folded (e.g. an int64 sum past range)
                stats.rejected.append((cid, f"the average cannot take it: {e}"))
                continue
        stats.num_clients += 1
        stats.num_samples += int(n)
        sq_sum += count_as_float(n) * sq
        del state
    return (avg if avg.count else None), sq_sum


def _record_drift(stats: AggregateStats, result: dict, global_state: dict, sq_sum: float) -> None:
    upd = _sq_dist(result, global_state)
    stats.update_norm = math.sqrt(upd)
    d = sq_sum / count_as_float(stats.num_samples) - upd
    stats.client_drift = math.sqrt(d) if d > 0 else (0.0 if d <= 0 else math.nan)  # NaN stays NaN


def _plausible_max_abs(global_state: dict, plausible_scale: float | None, maxes: dict | None = None) -> float | None:
    """The largest |value| a reply that passed :func:`implausible` can hold in a floating
    tensor (its bound over every key), or None (no plausibility check, or a non-finite
    global model): the streaming average then reads each reply's own. ``maxes``: the global
    model's :func:`_max_abs_each` when the caller has it."""
    if plausible_scale is None:
        return None
    top = 0.0
    for m in (maxes if maxes is not None else _max_abs_each(global_state)).values():
        top = max(top, m)
    bound = plausible_scale * (1.0 + top)
    return bound if math.isfinite(bound) else None


def stream_average(global_state: dict, replies: Iterable, stats: AggregateStats | None = None,
                   plausible_scale: float | None = PLAUSIBLE_SCALE, norm_bound: float | None = None,
                   batch_size: int = 64, copy_held: bool = True):
    """Weighted (by sample count) average of the valid replies, one client in memory at a time.

    ``replies`` yields ``(client_id, state, num_samples)``. Invalid replies are
    rejected and recorded in ``stats.rejected``; client drift is accumulated in
    float64 from sum_k w_k ||d_k||^2 and the averaged update. Returns the average
    or None when no reply was valid. ``plausible_scale``: see :func:`implausible` (None: off);
    ``norm_bound``, ``batch_size``: see :func:`_screened` (None: off, one reply in memory at a
    time, checked in one read and folded in a second; on, the round's well-formed replies are
    held in memory until the cohort's median is known and read once for their checks and the
    fold, :func:`_held_average`; ``copy_held`` False: the replies are the caller's to keep, not
    copied).
    """
    stats = stats if stats is not None else AggregateStats()
    # the global model's max |value| per tensor, read once a round: the plausibility bounds and
    # the fold's bound on |values| (else each add reads the reply's own)
    maxes = _max_abs_each(global_state) if plausible_scale is not None else None
    max_abs = _plausible_max_abs(global_state, plausible_scale, maxes)
    if norm_bound is not None:
        avg, sq_sum = _held_average(global_state, replies, stats, plausible_scale, norm_bound, batch_size,
                                    copy_held, maxes, max_abs)
        if avg is None:
            return None
        result = avg.result(consume=True)
        _record_drift(stats, result, global_state, sq_sum)
        return result
    avg = StreamingAverage()
    sq_sum = 0.0
    for cid, state, n, sq in _screened(global_state, replies, stats, plausible_scale, None, batch_size,
                                       with_cid=True, maxes=maxes):
        try:
            avg.add(state, n, max_abs=max_abs)
        except (ValueError, TypeError) as e:  # refused before it was folded (e.g. an int64 sum past range)
            stats.num_clients -= 1
            stats.num_samples -= int(n)
            stats.rejected.append((cid, f"the average cannot take it: {e}"))
            continue
        finally:
            del state  # let the client's tensors go before the next reply is produced
        sq_sum += count_as_float(n) * sq
    if avg.count == 0:
        return None
    result = avg.result(consume=True)  # the accumulator becomes the result: one buffer, not two
    _record_drift(stats, result, global_state, sq_sum)
    return result


def robust_average(global_state: dict, replies: Iterable, stats: AggregateStats | None = None,
                   kind: str = "median", trim_fraction: float = 0.1,
                   plausible_scale: float | None = PLAUSIBLE_SCALE, norm_bound: float | None = None,
                   batch_size: int = 64, copy_held: bool = True, *, krum_f: int | None = None,
                   krum_m: int | None = None, clip_radius: float | None = None):
    """A robust aggregate of the valid replies (:mod:`.robust`): coordinate-wise ``median``
    or ``trimmed_mean`` (Yin et al. 2018), ``multi_krum`` (``krum_f``, ``krum_m``),
    ``geometric_median`` or ``centered_clip`` (``clip_radius``). Unweighted (a client's
    sample count cannot buy influence), robust to a minority of arbitrary updates. Holds all
    K valid replies (memory: K models, not one). Floating tensors are computed in float64 and
    rounded to their dtype; the median of an even count is the mean of the two middle values.
    Integer and bool tensors take the lower median / the trimmed mean rounded half to even.
    ``trim_fraction``: the share cut at each end (floor(trim_fraction K) values). Returns None
    when no reply was valid, or when Multi-Krum has fewer than 2 krum_f + 3 (then
    ``stats.rolled_back`` says so and the global model is kept)."""
    if kind not in ROBUST_AGGREGATORS:
        raise ValueError(f"kind must be one of {', '.join(ROBUST_AGGREGATORS)}, got {kind!r}")
    stats = stats if stats is not None else AggregateStats()
    kept, sq_sum = [], 0.0
    # held copies: an in-process reply aliases the worker model, which the next client retrains
    for state, n, sq in _screened(global_state, replies, stats, plausible_scale, norm_bound, batch_size,
                                  hold=True, copy_held=copy_held):
        kept.append(state)
        sq_sum += count_as_float(n) * sq
    if not kept:
        return None
    try:
        out = aggregate_held(kind, global_state, kept, is_stat=is_stat_key, trim_fraction=trim_fraction,
                             krum_f=krum_f, krum_m=krum_m, clip_radius=clip_radius)
    except RobustRefusal as e:
        stats.rolled_back = str(e)
        return None
    _record_drift(stats, out, global_state, sq_sum)
    return out


class Strategy:
    """FedAvg: the new global state is the sample-weighted average of the replies
    (``aggregator`` other than 'mean': :func:`robust_average` instead, under any strategy)."""

    name = "fedavg"
    aggregator = "mean"
    trim_fraction = 0.1
    krum_f = None  # multi_krum: Byzantine replies tolerated (None: floor((K - 3) / 2))
    krum_m = None  # multi_krum: replies averaged (None: K - krum_f)
    clip_radius = None  # centered_clip: tau (None: the median distance, per iteration)
    plausible_scale = PLAUSIBLE_SCALE
    norm_bound = NORM_BOUND
    batch_size = 64  # the clients' local batch size (the norm bound's local batches); set from the config
    dp = None  # a privacy.DPAggregator: DP-FedAvg replaces the mean (strategy_from_config sets it)

    def __init__(self):
        pass  # FedAvg takes no options of its own (only make_strategy's aggregator, trim_fraction)

    # -- client side -------------------------------------------------------------
    def client_config(self, rnd: int) -> dict:
        """Options sent with the model (Flower: the ConfigRecord)."""
        return {"prox_mu": 0.0}

    def local_keys(self, state: dict) -> set[str]:
        """Keys the clients keep for themselves (FedBN: the BatchNorm layers)."""
        return set()

    # -- server side -------------------------------------------------------------
    def aggregate(self, global_state: dict, replies: Iterable, stats: AggregateStats | None = None, *,
                  copy_held: bool = True, rnd: int | None = None, secure: dict | None = None):
        """The new global state; the global state itself (a copy) when no reply was valid or
        the aggregate is not finite (``stats.rolled_back`` says why; the server optimizer's
        state is restored too), so no round can break the model for the rounds after it.
        ``copy_held``: replies held past the next one (norm bound, robust aggregators) are
        copied, as a reply may alias the client's model; False when they are the caller's.
        ``rnd``: the round (DP draws its noise from (seed, round); required under DP).
        ``secure``: ``{client id: K}`` for a reply that is a secure sum of K clients' updates
        (SecAgg+; filled in by the caller as such a reply arrives, before it is folded). Under
        DP it counts as K updates; without DP it is one reply weighted by its sample count."""
        stats = stats if stats is not None else AggregateStats()
        if self.dp is not None:
            # the same reply checks as without DP (malformed, non-finite, implausible: rejected),
            # streamed; no norm bound (the DP clip bounds every update; docs/privacy.md)
            # (distributed: no plausibility check; a noised reply may hold a negative variance)
            scale = self.plausible_scale if self.dp.s.mode == "central" else None
            sums = secure if secure is not None else {}
            valid = ((state, n, sums.get(cid, 1)) for cid, state, n, _ in _screened(
                global_state, replies, stats, scale, None, self.batch_size, with_cid=True))
            avg = self.dp.aggregate(global_state, valid, stats, rnd)
            stats.update_norm = math.sqrt(_sq_dist(avg, global_state))
        elif self.aggregator == "mean":
            avg = stream_average(global_state, replies, stats, self.plausible_scale, self.norm_bound,
                                 self.batch_size, copy_held)
        else:
            avg = robust_average(global_state, replies, stats, self.aggregator, self.trim_fraction,
                                 self.plausible_scale, self.norm_bound, self.batch_size, copy_held,
                                 krum_f=self.krum_f, krum_m=self.krum_m, clip_radius=self.clip_radius)
        if avg is None:
            return {k: v.clone() for k, v in global_state.items()}
        bad = nonfinite_key(avg)
        if bad is None:
            before = self.state_dict()
            new = self.server_update(global_state, avg)
            bad = None if new is avg else nonfinite_key(new)  # FedAvg's update is the average itself
            if bad is None:
                return new
            self.load_state_dict(before)
            stats.rolled_back = f"the server update of {bad} is not finite"
        else:
            stats.rolled_back = f"the average of {bad} is not finite"
        return {k: v.clone() for k, v in global_state.items()}

    def server_update(self, global_state: dict, avg: dict) -> dict:
        return avg

    def expected_state_keys(self, payload: dict) -> set | None:
        """The keys :meth:`state_dict` holds after a round over ``payload`` (checkpoint
        checks); None: not known."""
        return set()

    def state_dict(self) -> dict:
        """Server optimizer state as tensors (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def dp_state_dict(self) -> dict:
        """The DP aggregator's state (the adaptive clip) as tensors; {} without DP."""
        return self.dp.state_dict() if self.dp is not None else {}

    def load_dp_state_dict(self, state: dict) -> None:
        if self.dp is not None:
            self.dp.load_state_dict(state)


class FedProx(Strategy):
    """FedAvg on the server; clients add (mu/2)||w - w_global||^2 (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, prox_mu: float = 0.01):
        self.prox_mu = float(prox_mu)

    def client_config(self, rnd):
        return {"prox_mu": self.prox_mu}


class FedBN(Strategy):
    """FedAvg except BatchNorm layers, which each client keeps (Li et al. 2021). The
    server's copy of them (used for validation and for clients not yet seen) is
    their average (DEFAULT, ours)."""

    name = "fedbn"

    def local_keys(self, state):
        return norm_layer_keys(state)


class _ServerOpt(Strategy):
    def __init__(self, server_lr: float = 1.0):
        self.server_lr = float(server_lr)
        self._state: dict[str, torch.Tensor] = {}

    def _opt_keys(self, st):
        return [k for k, v in st.items() if v.dtype.is_floating_point and not is_stat_key(k)]

    def server_update(self, global_state, avg):
        new = dict(avg)  # statistics and integer buffers: the plain average
        with torch.no_grad():
            for k in self._opt_keys(global_state):
                g = global_state[k]
                d = avg[k].float() - g.float()
                new[k] = (g.float() + self._step(k, d)).to(g.dtype)
        return new

    def state_dict(self):
        return {k: v.clone() for k, v in self._state.items()}

    _moments = ("m.",)

    def expected_state_keys(self, payload):
        return {p + k for k in self._opt_keys(payload) for p in self._moments}

    def load_state_dict(self, state):
        self._state = {k: v.clone() for k, v in state.items()}


class FedAvgM(_ServerOpt):
    """Server momentum (Hsu et al. 2019): m = beta m + d; x += lr m."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9):
        super().__init__(server_lr)
        self.beta = float(server_momentum)

    def _step(self, k, d):
        m = self._state.get("m." + k)
        m = d.clone() if m is None else m.mul_(self.beta).add_(d)
        self._state["m." + k] = m
        return self.server_lr * m


class FedAdam(_ServerOpt):
    """Adaptive server optimizer (Reddi et al. 2021), no bias correction as in the paper."""

    name = "fedadam"
    _moments = ("m.", "v.")

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        super().__init__(server_lr)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def _second(self, v, d2):
        return v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)

    def _step(self, k, d):
        m = self._state.get("m." + k)
        v = self._state.get("v." + k)
        m = torch.zeros_like(d) if m is None else m
        v = torch.full_like(d, self.tau ** 2) if v is None else v
        m.mul_(self.beta1).add_(d, alpha=1 - self.beta1)
        v = self._second(v, d * d)
        self._state["m." + k], self._state["v." + k] = m, v
        return self.server_lr * m / (v.sqrt() + self.tau)


class FedYogi(FedAdam):
    """Yogi's additive second moment: v -= (1 - b2) d^2 sign(v - d^2)."""

    name = "fedyogi"

    def _second(self, v, d2):
        return v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))


_CLASSES = {c.name: c for c in (Strategy, FedProx, FedAvgM, FedAdam, FedYogi, FedBN)}
# Options every strategy takes (how the replies are combined), given to make_strategy.
COMMON_OPTIONS = {"aggregator": "mean", "trim_fraction": 0.1, "plausible_scale": PLAUSIBLE_SCALE,
                  "norm_bound": NORM_BOUND, "krum_f": None, "krum_m": None, "clip_radius": None}


class StrategyOptionError(TypeError, ValueError):
    """An option the named strategy does not take. A TypeError (as for any unexpected
    keyword) and a ValueError (a user mistake: the CLI prints it as one line)."""


def strategy_options(name: str) -> dict:
    """The options strategy ``name`` takes of its own, with their defaults, read from its
    constructor's signature (so they are declared once); :data:`COMMON_OPTIONS` not included.
    ``strategy_options("fedavgm") == {"server_lr": 1.0, "server_momentum": 0.9}``."""
    import inspect

    if name not in _CLASSES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    params = list(inspect.signature(_CLASSES[name].__init__).parameters.values())[1:]
    return {p.name: p.default for p in params}


def make_strategy(name: str, *, aggregator: str = "mean", trim_fraction: float = 0.1,
                  plausible_scale: float | None = PLAUSIBLE_SCALE, norm_bound: float | None = NORM_BOUND,
                  batch_size: int = 64, krum_f: int | None = None, krum_m: int | None = None,
                  clip_radius: float | None = None, **options) -> Strategy:
    """Build a strategy by name with its own options (:func:`strategy_options`); an option
    it does not take is a :class:`StrategyOptionError` naming it, never ignored.
    ``aggregator``: how the replies are combined ('mean': sample-weighted, streamed;
    'median', 'trimmed_mean' with ``trim_fraction``, 'multi_krum' with ``krum_f`` (Byzantine
    replies tolerated; None: floor((K - 3) / 2)) and ``krum_m`` (replies averaged; None:
    K - krum_f), 'geometric_median', 'centered_clip' with ``clip_radius`` (None: the median
    distance): :func:`robust_average`);
    ``plausible_scale``: :func:`implausible`; ``norm_bound``: a reply whose update norm per
    local batch (of ``batch_size``, the clients' local batch size) exceeds this x the round's
    median is rejected (:func:`_screened`); None: off, replies streamed."""
    if name not in _CLASSES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    takes = strategy_options(name)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        own = ", ".join(takes) if takes else "none of its own"
        raise StrategyOptionError(
            f"strategy {name!r} does not take {', '.join(unknown)}; it takes {own} "
            f"(and, as every strategy, {', '.join(COMMON_OPTIONS)})")
    if aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}; got {aggregator!r}")
    if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float)) or not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
    if plausible_scale is not None and (isinstance(plausible_scale, bool) or not isinstance(plausible_scale, (int, float))
                                        or not 0 < plausible_scale < math.inf):
        raise ValueError(f"plausible_scale must be a positive finite number or None, got {plausible_scale!r}")
    if norm_bound is not None and (isinstance(norm_bound, bool) or not isinstance(norm_bound, (int, float))
                                   or not 1 <= norm_bound < math.inf):
        raise ValueError(f"norm_bound must be a finite number >= 1 or None, got {norm_bound!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for key, v, lo in (("krum_f", krum_f, 0), ("krum_m", krum_m, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"{key} must be an integer >= {lo} or None, got {v!r}")
    if clip_radius is not None and (isinstance(clip_radius, bool) or not isinstance(clip_radius, (int, float))
                                    or not 0 < clip_radius < math.inf):
        raise ValueError(f"clip_radius must be a positive finite number or None, got {clip_radius!r}")
    strat = _CLASSES[name](**options)
    strat.aggregator, strat.trim_fraction = aggregator, float(trim_fraction)
    strat.plausible_scale = None if plausible_scale is None else float(plausible_scale)
    strat.norm_bound = None if norm_bound is None else float(norm_bound)
    strat.batch_size = batch_size
    strat.krum_f, strat.krum_m = krum_f, krum_m
    strat.clip_radius = None if clip_radius is None else float(clip_radius)
    return strat
