"""Averaging client states (the server's aggregation) and their distance.

``weighted_average`` averages K clients in one call per device; ``StreamingAverage``
folds one client at a time (memory for one accumulator; the federation engine's path).
Floating tensors accumulate in float32 (float64 for float64) in client order. Integer
and bool tensors are averaged exactly, by the one rule of _exact.py, so both entry
points give the same integers. ``sq_dist`` is the drift metric over a whole state.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import reference as ref
from . import _exact
from ._checks import check_float_tensor, check_pair, in_layout
from ._registry import OPS, backend

__all__ = ["weighted_average", "StreamingAverage", "sq_dist", "reply_stats"]

def _real(w, arg: str):
    """A weight as a number: a Python int for integers (any size: exact, never rounded to a
    float), else a float. Real numbers only (a str such as "3" or a bool is refused, not
    read as a number)."""
    if isinstance(w, torch.Tensor) and w.numel() == 1 and not w.dtype.is_complex and w.dtype != torch.bool:
        return w.item()
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {w!r}")
    if isinstance(w, numbers.Integral):
        return int(w)
    try:
        return float(w)
    except (OverflowError, ValueError) as e:  # e.g. a Fraction past float's range
        raise ValueError(f"{arg} must be a finite real number, got {w!r} ({e})") from None


def _check_weight(w, arg: str):
    """A weight from _real that is finite and >= 0, or a ValueError naming ``arg``."""
    if isinstance(w, int):
        if w < 0:
            raise ValueError(f"{arg} must be finite and >= 0, got {w}")
    elif not math.isfinite(w) or w < 0:
        raise ValueError(f"{arg} must be finite and >= 0, got {w}")
    return w


def _check_weights(weights, k: int) -> list:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a sequence of {k} numbers, got {weights!r}")
    ws = [_real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(ws) != k:
        raise ValueError(f"weights must have one entry per client ({k}), got {len(ws)}")
    for i, w in enumerate(ws):
        _check_weight(w, f"weights[{i}]")
    if not any(ws):
        raise ValueError("weights must not all be zero (their sum is the divisor)")
    return ws


def _normalised(ws: list) -> list[float]:
    """w_k / sum_k w_k in float64 for finite weights >= 0 (not all zero): floats summed in
    order and divided (the rule of runs recorded before ints were kept exact); integers
    exactly (int / int is correctly rounded); weights whose sum overflows, or Python ints
    past float's range, first scaled by a power of two, which keeps their ratios."""
    if all(isinstance(w, int) for w in ws):
        total = sum(ws)
        return [w / total for w in ws]
    try:
        fs = [float(w) for w in ws]
        total = sum(fs)
    except OverflowError:
        fs, total = None, math.inf
    if math.isinf(total) and fs is not None:  # finite weights whose sum overflows (e.g. 1e308 x 3): same ratios
        top = max(fs)
        fs = [w / top for w in fs]
        total = sum(fs)
    elif math.isinf(total):  # a Python int past float's range
        shift = -_exact.frexp(max(ws))[1]
        fs = [_exact.ldexp(w, shift) for w in ws]
        total = sum(fs)
    return [w / total for w in fs]


def _as_client_lists(clients):
    """Normalise to (list of per-client tensor lists, names, rebuild(result_list))."""
    if isinstance(clients, torch.Tensor) or not isinstance(clients, Sequence):
        raise TypeError(
            "clients must be a sequence of K tensors, of K tensor sequences, or of K state dicts"
        )
    if len(clients) == 0:
        raise ValueError("clients must hold at least one client (K >= 1), got none")
    first = clients[0]
    if isinstance(first, torch.Tensor):
        for i, c in enumerate(clients):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"clients[{i}] must be a tensor like clients[0], got {type(c).__name__}")
        return [[c] for c in clients], ["tensor"], lambda res: res[0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        lists = []
        for i, c in enumerate(clients):
            if not isinstance(c, Mapping):
                raise TypeError(f"clients[{i}] must be a mapping like clients[0], got {type(c).__name__}")
            if c.keys() != first.keys():  # compared as sets: the order of the keys does not matter
                missing, extra = sorted(set(keys) - set(c.keys())), sorted(set(c.keys()) - set(keys))
                raise ValueError(f"clients[{i}] must have the keys of clients[0]: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            lists.append([c[k] for k in keys])
        return lists, keys, lambda res: dict(zip(keys, res))
    lists = []
    for i, c in enumerate(clients):
        if isinstance(c, torch.Tensor) or not isinstance(c, Sequence):
            raise TypeError(f"clients[{i}] must be a sequence of tensors, got {type(c).__name__}")
        if len(c) != len(first):
            raise ValueError(f"clients[{i}] has {len(c)} tensors, clients[0] has {len(first)}")
        lists.append(list(c))
    names = [str(j) for j in range(len(first))]
    return lists, names, lambda res: type(first)(res) if isinstance(first, tuple) else list(res)


def _check_clients(lists, names):
    ref_list = lists[0]
    for j, t0 in enumerate(ref_list):
        if not isinstance(t0, torch.Tensor):
            raise TypeError(f"clients[0][{names[j]!r}] must be a tensor, got {type(t0).__name__}")
    for i, lst in enumerate(lists[1:], start=1):
        for j, (t, t0) in enumerate(zip(lst, ref_list)):
            where = f"clients[{i}][{names[j]!r}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(t).__name__}")
            check_pair(f"clients[0][{names[j]!r}]", t0, where, t)






_F32_MAX = float(torch.finfo(torch.float32).max)
_F64_MAX = float(torch.finfo(torch.float64).max)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


def _check_out(out_list, ref_list, names):
    if len(out_list) != len(ref_list):
        raise ValueError(f"out must hold {len(ref_list)} tensors like a client, got {len(out_list)}")
    for j, (o, t0) in enumerate(zip(out_list, ref_list)):
        where = f"out[{names[j]!r}]"
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(o).__name__}")
        if o.shape != t0.shape or o.dtype != t0.dtype or o.device != t0.device:
            raise ValueError(
                f"{where} must match the clients' tensor ({tuple(t0.shape)}, {t0.dtype}, {t0.device}), "
                f"got ({tuple(o.shape)}, {o.dtype}, {o.device})"
            )


def weighted_average(clients, weights, out=None):
    """sum_k w_k x_k / sum_k w_k over K clients in one pass per tensor.

    ``clients``: K tensors of one shape, K sequences of tensors (per-client
    parameter lists) or K state dicts with the same keys. ``weights``: K
    non-negative numbers (e.g. sample counts; need not sum to 1).
    Floating tensors accumulate in float32 (float64 for float64) in client
    order, so the result does not depend on the thread count. Integer and
    bool tensors are averaged exactly in integers (round half to even; for
    bool that is the weighted majority, an exact tie giving False).
    ``out`` (same structure as one client) is written in place and returned.
    """
    lists, names, rebuild = _as_client_lists(clients)
    ws = _check_weights(weights, len(lists))
    _check_clients(lists, names)
    out_list = None
    if out is not None:
        out_list, _, _ = _as_client_lists([out])
        out_list = out_list[0]
        _check_out(out_list, lists[0], names)
    for j, t0 in enumerate(lists[0]):
        if not (t0.dtype.is_floating_point or t0.dtype in _INT_DTYPES):
            raise TypeError(
                f"clients[0][{names[j]!r}] has dtype {t0.dtype}; averaged are floating, "
                "int8/uint8/int16/int32/int64 and bool tensors"
            )
    qs = _exact.integer_weights(ws)  # from the weights as given: StreamingAverage sees those
    norm = _normalised(ws)
    results = [None] * len(lists[0])
    # One call per (kind, device): a state dict may be split across devices,
    # and a launch only ever sees pointers of its own device.
    groups: dict = {}
    copy_back = []
    with torch.no_grad():
        for j in range(len(lists[0])):
            tensors = [lst[j] for lst in lists]
            o = None if out_list is None else out_list[j]
            if o is None:
                o = torch.empty_like(tensors[0])  # dense layouts are kept
            # The kernels walk memory linearly: inputs take the target's layout.
            tgt = o if ref.is_dense(o) else torch.empty_like(o, memory_format=torch.contiguous_format)
            if tgt is not o:
                copy_back.append((tgt, o))
            g = groups.setdefault((tensors[0].dtype.is_floating_point, tgt.device), ([], []))
            g[0].append(tgt)
            g[1].append([in_layout(x, tgt.stride()) for x in tensors])
            results[j] = o
        for (is_float, _), (targets, inputs) in groups.items():
            flat = [xs[k] for k in range(len(ws)) for xs in inputs]  # client-major
            if is_float:
                OPS.weighted_sum_list_out(flat, norm, targets)
            else:
                OPS.int_weighted_sum_list_out(flat, qs, targets)
        for tgt, o in copy_back:
            o.copy_(tgt)
    return rebuild(results)


def sq_dist(xs, refs) -> float:
    """sum_j ||xs[j] - refs[j]||^2 over two equally shaped tensor lists (e.g. a
    client's state and the global one), in one pass without temporaries on CPU.
    NaN/Inf in the inputs give a non-finite result. Tensors pair up by position
    and must match in shape, dtype and device."""
    xs, refs = list(xs), list(refs)
    if len(xs) != len(refs):
        raise ValueError(f"xs and refs must hold the same number of tensors, got {len(xs)} and {len(refs)}")
    for j, (x, r) in enumerate(zip(xs, refs)):
        check_float_tensor(f"xs[{j}]", x)
        check_pair(f"refs[{j}]", r, f"xs[{j}]", x)
    if not xs:
        return 0.0
    by_device: dict = {}  # one call (one sync on a GPU) per device, not per tensor
    with torch.no_grad():
        for x, r in zip(xs, refs):
            if not (x.stride() == r.stride() and ref.is_dense(x)):
                x, r = x.contiguous(), r.contiguous()
            g = by_device.setdefault(x.device, ([], []))
            g[0].append(x)
            g[1].append(r)
        # one float per device, summed in Python in device order (as before the op returned a tensor)
        return sum(float(OPS.sq_dist_list(a, b)) for a, b in by_device.values())


def reply_stats(xs, refs, in_total=None):
    """Every check of a reply in one read (issue 28): ``(stats, total)`` where ``stats`` is a
    (K, 4) float64 CPU tensor whose row j holds, for ``xs[j]``: the min and the max over its
    non-NaN values (+Inf / -Inf when it has none; an Inf counts, as in torch.aminmax), its count of NaN/Inf, and
    ||xs[j] - refs[j]||^2 (NaN/Inf when it has such values); ``total`` is the sum of those
    squares over the tensors with ``in_total[j]`` true (default: all), equal bit for bit to
    :func:`sq_dist` over them. Float tensors only; pairs must match in shape, dtype and
    device. The compiled CPU kernel reads each element once, in fixed tiles (the same
    numbers for any thread count); CUDA tensors run the reference."""
    xs, refs = list(xs), list(refs)
    if len(xs) != len(refs):
        raise ValueError(f"xs and refs must hold the same number of tensors, got {len(xs)} and {len(refs)}")
    flags = [1] * len(xs) if in_total is None else [1 if f else 0 for f in in_total]
    if len(flags) != len(xs):
        raise ValueError(f"in_total must have one entry per tensor ({len(xs)}), got {len(flags)}")
    for j, (x, r) in enumerate(zip(xs, refs)):
        check_float_tensor(f"xs[{j}]", x)
        check_pair(f"refs[{j}]", r, f"xs[{j}]", x)
    if not xs:  # no tensor argument: nothing for the dispatcher to dispatch on
        return torch.zeros(0, 4, dtype=torch.float64), 0.0
    with torch.no_grad():
        pairs = [(x, r) if x.stride() == r.stride() and ref.is_dense(x) else (x.contiguous(), r.contiguous())
                 for x, r in zip(xs, refs)]
        out = OPS.reply_stats_list([p[0] for p in pairs], [p[1] for p in pairs], flags)
    return out[: len(xs)], float(out[len(xs), 3])


# StreamingAverage's power-of-two scale (see the class): weights are folded unscaled while the
# largest is >= 1 and their sum < 2**_TOTAL_BITS (sample counts: today's bits); a float32
# accumulator is kept below 2**_ACC32_BITS, a float64 one below 2**_ACC64_BITS (float32's
# largest value is about 2**128, float64's 2**1024; each add checks the bound again); at or past 2**_DIV_BITS in magnitude
# the float32 result is divided in float64 (a float32 division could round past float32's max).
_TOTAL_BITS = 64
_TOTAL_HEADROOM = 32  # a rescale for the total leaves it at 2**(_TOTAL_BITS - this)
_ACC32_BITS, _ACC64_BITS, _DIV_BITS = 124, 1020, 120
_RESCALE_STEP = 100  # multiply by at most 2**-100 at a time: each step exact for normal results


def _sum_exp(terms) -> int:
    """The binary exponent e (sum in [2**(e-1), 2**e)) of sum(x * 2**k for x, k in terms),
    for floats x >= 0 or Python ints of any size, without overflow; -10**9 for a zero sum."""
    nz = [(x, k) for x, k in terms if x]
    if not nz:
        return -10**9
    top = max(_exact.frexp(x)[1] + k for x, k in nz)
    return _exact.frexp(math.fsum(_exact.ldexp(x, k - top) for x, k in nz))[1] + top


def _scale_down(accs, d: int) -> None:
    """Multiply every accumulator by 2**-d (d > 0): exact for results in the normal range;
    past 3 steps every finite value is 0 anyway (|acc| < 2**1000), Inf/NaN stay."""
    for _ in range(min(3, -(-d // _RESCALE_STEP))):
        step = min(d, _RESCALE_STEP)
        for a in accs:
            a.mul_(math.ldexp(1.0, -step))
        d -= step


class _NotFused(Exception):
    """add_many cannot fold its clients in one pass (a rescale between them): one by one instead."""


class StreamingAverage:
    """Weighted average folded in one client at a time: memory for one
    accumulator (float32 for float16/bfloat16/float32 tensors), not K clients.

    >>> avg = StreamingAverage()
    >>> for state, n in replies: avg.add(state, n)
    >>> global_state = avg.result()

    Clients are folded in the order they are added; the result is
    deterministic for that order. Any finite weight >= 0 (a float, or a Python int of any
    size, kept exact) gives the average: floating tensors fold ``w * 2**-E`` where the
    power of two ``2**E`` is 1 for ordinary weights (largest >= 1, sum < 2**64: the bits of
    the plain float32 fold) and otherwise follows the largest weight and the total, and
    shrinks further when a client's values times its weight would take the accumulator near
    float32's range; a change of E rescales the accumulator by an exact power of two. So no
    weight makes the divisor 0 or Inf and no finite value overflows the accumulator (each
    add reads the client's largest |value|: one pass, no copy). Integer tensors accumulate
    exactly in int64, with the weights of weighted_average (_exact.py): the same integers
    as one weighted_average call; a fold that would wrap int64 is refused, naming the
    tensor, before anything is folded (the average so far stays as it was).
    """

    def __init__(self):
        self._names = None
        self._rebuild = None
        self._template = None
        self._acc = None
        self._scale = None  # E: floating accumulators hold sum_k fl(w_k 2**-E) x_k (None: no weight > 0 yet)
        self._total = 0.0  # sum of w_k 2**-E, in float64, in add order
        self._top = 0  # the largest weight so far
        self._bound = [0.0, 0.0]  # upper bounds on |float32 acc|, |float64 acc| (scaled)
        self._big = 0.0  # the largest |value| folded into a float32 accumulator (unscaled)
        self._fixed = False  # integer weights so far: q = w; else the 2**-30 grid (_exact.py)
        self._int_total = 0  # sum of q
        self._consumed = False
        self.count = 0
        self._defer = None  # add_many: the floating folds planned but not yet done, [(xs, ws, read in place)]

    def _check_live(self) -> None:
        if self._consumed:
            raise RuntimeError("this StreamingAverage was consumed by result(consume=True); start a new one")

    def _target_scale(self, top, total_unscaled_exp: int | None) -> int:
        """E for the weights alone: 0 for ordinary weights; else the largest weight in [1, 2)
        (all weights < 1) or the total at 2**(_TOTAL_BITS - _TOTAL_HEADROOM)."""
        if top < 1:
            return _exact.frexp(top)[1] - 1
        if total_unscaled_exp is not None and total_unscaled_exp > _TOTAL_BITS:
            return total_unscaled_exp - (_TOTAL_BITS - _TOTAL_HEADROOM)
        return 0

    def add(self, client, weight, *, max_abs: float | None = None) -> None:
        """Fold one client (a tensor, a tensor sequence or a state dict) with its weight: a
        finite real number >= 0 (a Python int of any size is kept exact). Refused with a
        ValueError/TypeError before anything is folded: a malformed client, a weight that is
        not finite and >= 0, an integer fold that would wrap int64.

        ``max_abs``: a bound on the client's largest |value| in its floating tensors that
        the caller already knows (the federation's plausibility bound); None: read from the
        client (one pass over its floating tensors, no copy). A bound that is too small
        voids the overflow guarantee (the result may hold Inf), nothing else."""
        self._check_live()
        lists, names, rebuild = _as_client_lists([client])
        (lst,) = lists
        w = _check_weight(_real(weight, "weight"), "weight")
        if max_abs is not None:
            max_abs = float(min(_check_weight(_real(max_abs, "max_abs"), "max_abs"), _F64_MAX))
        if self._template is None:
            for j, t in enumerate(lst):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"client[{names[j]!r}] must be a tensor, got {type(t).__name__}")
                if not (t.dtype.is_floating_point or t.dtype in _INT_DTYPES):
                    raise TypeError(f"client[{names[j]!r}] has dtype {t.dtype}; averaged are floating, "
                                    "int8/uint8/int16/int32/int64 and bool tensors")
        else:
            if names != self._names:
                raise ValueError(
                    f"client #{self.count} has tensors {names[:3]}..., expected {self._names[:3]}..."
                )
            for j, (t, (shape, dtype, device)) in enumerate(zip(lst, self._template)):
                where = f"client #{self.count}[{names[j]!r}]"
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{where} must be a tensor, got {type(t).__name__}")
                if t.shape != shape or t.dtype != dtype or t.device != device:
                    raise ValueError(
                        f"{where} is ({tuple(t.shape)}, {t.dtype}, {t.device}), "
                        f"expected ({tuple(shape)}, {dtype}, {device})"
                    )
        floats = [j for j, t in enumerate(lst) if t.dtype.is_floating_point]
        ints = [j for j, t in enumerate(lst) if not t.dtype.is_floating_point]
        # -- integer tensors: exact, checked (naming the tensor) before anything changes
        fixed = self._fixed or not _exact.is_integral(w)
        q = _exact.on_grid(w, fixed) if ints else 0  # the rule weighted_average uses (_exact.py)
        rescale = 2**_exact.GRID_BITS if fixed and not self._fixed else 1  # the switch, exact
        int_total = self._int_total * rescale + q
        grid = " (on the 2**-30 grid)" if fixed else ""
        if ints and int_total >= _exact.INT64_LIMIT:
            raise ValueError(f"client #{self.count}: weight {w:g} takes the integer weights' sum to {int_total}{grid}, "
                             "past int64; scale the weights (only their ratios matter)")
        for j, t in zip(ints, (lst[j] for j in ints)):
            if not t.numel() or (q == 0 and rescale == 1):  # nothing changes: no check (no host sync)
                continue
            if t.numel() == 1:  # a counter (num_batches_tracked): no reduction kernels for one value
                lo = hi = int(t.item())
                alo = ahi = int(self._acc[j].item()) if self._acc is not None else 0
            else:
                lo, hi = (int(v) for v in torch.aminmax(t.to(torch.int64)))
                alo, ahi = (int(v) for v in torch.aminmax(self._acc[j])) if self._acc is not None else (0, 0)
            # every element's new sum a * rescale + t * q (q >= 0) lies within these bounds
            new_lo, new_hi = alo * rescale + lo * q, ahi * rescale + hi * q
            if new_lo < -_exact.INT64_LIMIT or new_hi >= _exact.INT64_LIMIT:
                big = hi if new_hi >= _exact.INT64_LIMIT else lo
                raise ValueError(f"client #{self.count}[{names[j]!r}]: integer values up to {big} x weight {q}{grid} "
                                 "overflow the int64 accumulator")
        # -- floating tensors: the scale E for this weight and these values (nothing changes yet)
        scale, total, bound, big = self._scale, self._total, list(self._bound), self._big
        top = w if w > self._top else self._top
        amax = [0.0, 0.0]  # this client's largest finite |value| in float32 / float64 accumulators
        if floats and w and max_abs is not None:
            for j in floats:
                amax[1 if lst[j].dtype == torch.float64 else 0] = max_abs
        elif floats and w:
            with torch.no_grad():
                for j in floats:
                    t = lst[j]
                    if t.numel():
                        lo, hi = torch.aminmax(t)  # no model-sized temporary (unlike abs)
                        m = max(-float(lo), float(hi))
                        k = 1 if t.dtype == torch.float64 else 0
                        if math.isfinite(m):  # NaN/Inf propagate to the result as they would anyway
                            amax[k] = max(amax[k], m)
        if w:
            ref = 0 if scale is None else scale
            # the exponent of the total after this fold, unscaled (it may lie past float64's range)
            t_exp = _sum_exp([(total, ref), (w, 0)])
            new_scale = self._target_scale(top, t_exp)
            if scale is not None:
                new_scale = max(new_scale, scale)
            # the accumulators' bounds after this fold at the new scale: shrink further if near their range
            for k, limit in ((0, _ACC32_BITS), (1, _ACC64_BITS)):
                if amax[k]:
                    m, e = _exact.frexp(amax[k])
                    mw, ew = _exact.frexp(w)
                    # + 1: a binade of margin for the rounding of the float32 weight and of the sums
                    b_exp = _sum_exp([(bound[k], ref - new_scale), (m * mw, e + ew - new_scale)]) + 1
                    if b_exp > limit:
                        new_scale += b_exp - limit
        if self._defer is not None and w and scale is not None and new_scale > scale:
            raise _NotFused  # rescaling the accumulator between planned folds: not one pass
        # -- fold: nothing above raised
        with torch.no_grad():
            if self._template is None:
                self._names, self._rebuild = names, rebuild
                self._template = [(t.shape, t.dtype, t.device) for t in lst]
                # add_many zeroes the floating ones in its pass
                self._acc = [
                    (torch.empty if self._defer is not None and t.dtype.is_floating_point else torch.zeros)(
                        t.shape,
                        dtype=(torch.float64 if t.dtype == torch.float64 else torch.float32)
                        if t.dtype.is_floating_point
                        else torch.int64,
                        device=t.device,
                    )
                    for t in lst
                ]
            for j in ints:
                a = self._acc[j]
                if rescale != 1:
                    a.mul_(rescale)
                if q:
                    a.add_(lst[j].to(torch.int64), alpha=q)
            if w:
                if scale is not None and new_scale > scale:
                    d = new_scale - scale
                    _scale_down([self._acc[j] for j in floats], d)
                    total = math.ldexp(total, -d)
                    bound = [math.ldexp(b, -d) for b in bound]
                scale = new_scale
            ws = _exact.ldexp(w, -scale) if w else 0.0
            if floats:
                accs = [self._acc[j] for j in floats]
                xs = [in_layout(lst[j], a.stride()) for j, a in zip(floats, accs)]
                if self._defer is not None:  # and whether each tensor was read in place (not copied to acc's layout)
                    self._defer.append((xs, ws, all(x is lst[j] for x, j in zip(xs, floats))))
                else:
                    OPS.accumulate_list_(accs, xs, ws)
            for k in (0, 1):
                bound[k] += ws * amax[k] * (1 + 2.0**-20)
        self._scale, self._total, self._bound = scale, total + ws, bound
        self._big = max(big, amax[0])
        self._top = top
        self._fixed = fixed
        self._int_total = int_total
        self.count += 1

    def add_many(self, clients, weights, *, max_abs: float | None = None, stats_refs=None, in_total=None):
        """Fold ``clients`` with ``weights`` in order: the same bits as :meth:`add` of each in
        turn, but on the CPU with the compiled library the floating tensors of all of them are
        folded in one pass, tile by tile (each client read once, the accumulator kept in
        cache), which is what a server holding a round's replies wants. ``max_abs`` as in
        :meth:`add`, for every client. Refused as :meth:`add` refuses, the error naming the
        client by its position; then nothing is folded.

        ``stats_refs``: a reference with a client's structure (the global model): also returns,
        per client, :func:`reply_stats` of its floating tensors against the reference's (in the
        client's order; ``in_total``: one flag per floating tensor, default all) as
        ``(stats, total)``, from the same read. Without it, returns None."""
        self._check_live()
        if self._defer is not None:
            raise RuntimeError("add_many is already running on this StreamingAverage")
        if isinstance(clients, (torch.Tensor, Mapping)) or not isinstance(clients, Iterable):
            raise TypeError(f"clients must be a sequence of clients, got {type(clients).__name__}")
        clients = list(clients)
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().reshape(-1).tolist()
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
            raise TypeError(f"weights must be a sequence of {len(clients)} numbers, got {weights!r}")
        weights = list(weights)
        if len(weights) != len(clients):
            raise ValueError(f"weights must have one entry per client ({len(clients)}), got {len(weights)}")
        if not clients:
            return None if stats_refs is None else []
        flags = None
        if stats_refs is not None:
            first, _, _ = _as_client_lists([clients[0]])
            nf = sum(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in first[0])
            flags = [1] * nf if in_total is None else [1 if f else 0 for f in in_total]
            if len(flags) != nf:
                raise ValueError(f"in_total must have one entry per floating tensor of a client ({nf}), "
                                 f"got {len(flags)}")
        fresh = self._template is None
        restore = self._snapshot(floats=False)  # the floating accumulators change only in the op below
        self._defer = []  # add() plans each floating fold instead of doing it
        try:
            self._add_all(clients, weights, max_abs)
            planned, self._defer = self._defer, None
            accs = [a for a in self._acc if a.is_floating_point()]
            refs = []
            if stats_refs is not None and accs:
                rs = self._refs_like(stats_refs)
                refs = [in_layout(r, a.stride()) for r, a in zip(rs, accs)]
                # the statistics' sums follow memory order: the one pass gives reply_stats' numbers
                # only where the clients and the reference are already in the accumulators' layout
                if not all(in_place for _, _, in_place in planned) or any(a is not b for a, b in zip(refs, rs)):
                    raise _NotFused
            if backend() != "compiled" or any(a.device.type != "cpu" for a in accs):
                raise _NotFused
        except _NotFused:
            restore()
            return self._add_each(clients, weights, max_abs, stats_refs, flags)
        except BaseException:
            restore()
            raise
        try:  # the op checks every tensor before it writes
            with torch.no_grad():
                st = OPS.fold_stats_list_(accs, [x for xs, _, _ in planned for x in xs], [ws for _, ws, _ in planned],
                                          fresh, refs, flags if refs else [])
        except BaseException:
            restore()
            raise
        if stats_refs is None:
            return None
        n = len(accs)
        if not n:
            return [(torch.zeros(0, 4, dtype=torch.float64), 0.0) for _ in clients]
        return [(st[k, :n], float(st[k, n, 3])) for k in range(len(clients))]

    def _refs_like(self, stats_refs) -> list:
        """The floating tensors of ``stats_refs``, which must name and shape them as the clients do."""
        rl, names, _ = _as_client_lists([stats_refs])
        if names != self._names:
            raise ValueError(f"stats_refs must hold the clients' tensors in their order ({self._names[:3]}...), "
                             f"got {names[:3]}...")
        for (shape, dtype, _), t, name in zip(self._template, rl[0], names):
            if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dtype:
                raise ValueError(f"stats_refs[{name!r}] must be a tensor of shape {tuple(shape)} and dtype {dtype}")
        return [t for t in rl[0] if t.dtype.is_floating_point]

    def _add_each(self, clients, weights, max_abs, stats_refs, flags):
        """add_many one client at a time (a rescale between them, another device, the reference
        backend): the same results; on a refusal everything is put back as it was."""
        restore = self._snapshot(floats=True)
        try:
            self._add_all(clients, weights, max_abs)
            if stats_refs is None:
                return None
            rs = self._refs_like(stats_refs)
            out = []
            for c in clients:
                cl, _, _ = _as_client_lists([c])
                out.append(reply_stats([t for t in cl[0] if t.dtype.is_floating_point], rs, flags))
            return out
        except BaseException:
            restore()
            raise

    def _snapshot(self, floats: bool):
        """A function that puts this average back as it is now: its fields and integer
        accumulators, and its floating ones too if ``floats``."""
        saved = dict(self.__dict__)
        kept = [(a, a.clone()) for a in (self._acc or []) if floats or not a.is_floating_point()]

        def restore():
            self.__dict__.clear()
            self.__dict__.update(saved)
            for a, c in kept:
                a.copy_(c)
        return restore

    def _add_all(self, clients, weights, max_abs) -> None:
        for i, (c, w) in enumerate(zip(clients, weights)):
            try:
                self.add(c, w, max_abs=max_abs)
            except (ValueError, TypeError) as e:
                raise type(e)(f"clients[{i}]: {e}") from None

    def result(self, out=None, *, consume: bool = False):
        """The average so far (``out``: same structure as a client, written in place).

        ``consume=True`` divides the accumulators in place and returns them where their
        dtype is the client's (float32/float64 tensors): no second model-sized buffer
        (fresh memory is slow to first touch), but no more add() or result() after it.
        """
        self._check_live()
        if consume and out is not None:
            raise ValueError("out and consume=True exclude each other")
        if self.count == 0:
            raise ValueError("no client was added: call add(client, weight) first")
        if self._total <= 0:
            raise ValueError("the weights added so far sum to zero")
        out_list = None
        if out is not None:
            if isinstance(out, (str, bytes)) or not isinstance(out, (torch.Tensor, Sequence, Mapping)):
                raise TypeError(f"out must have the structure of a client (tensor, tensor sequence or state "
                                f"dict), got {type(out).__name__}")
            out_lists, _, _ = _as_client_lists([out])
            out_list = out_lists[0]
            fake_ref = [torch.empty(s, dtype=d, device="meta") for s, d, _ in self._template]
            if len(out_list) != len(fake_ref):
                raise ValueError(f"out must hold {len(fake_ref)} tensors, got {len(out_list)}")
        careful = self._big >= math.ldexp(1.0, _DIV_BITS)  # a float32 quotient could round past float32's max
        res = []
        with torch.no_grad():
            for j, (a, (shape, dtype, device)) in enumerate(zip(self._acc, self._template)):
                o = None if out_list is None else out_list[j]
                if o is not None and (o.shape != shape or o.dtype != dtype):
                    raise ValueError(f"out[{self._names[j]!r}] must be ({tuple(shape)}, {dtype})")
                if a.dtype == torch.float32 and careful:
                    r = a.double() / self._total
                    r = torch.where(torch.isinf(a), r, r.clamp(-_F32_MAX, _F32_MAX)).to(dtype)
                elif a.dtype.is_floating_point:
                    r = a.div_(self._total) if consume and a.dtype == dtype else (a / self._total).to(dtype)
                else:
                    if self._int_total <= 0:
                        raise ValueError(f"{self._names[j]!r}: the weights round to zero on the 2**-{_exact.GRID_BITS} "
                                         "grid integer tensors are averaged on; scale the weights (only their ratios "
                                         "matter) or use weighted_average")
                    r = _exact.round_div(a, self._int_total).to(dtype)
                if o is not None:
                    o.copy_(r)
                    r = o
                res.append(r)
        if consume:
            self._consumed, self._acc = True, None
        return self._rebuild(res)
