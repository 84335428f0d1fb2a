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
from ._registry import OPS

__all__ = ["weighted_average", "StreamingAverage", "sq_dist", "reply_stats"]

def _real(w, arg: str) -> float:
    """A weight as a float: real numbers only (a str such as "3" or a bool is refused, not
    read as a number)."""
    if isinstance(w, torch.Tensor) and w.numel() == 1 and not w.dtype.is_complex and w.dtype != torch.bool:
        return float(w)
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {w!r}")
    return float(w)


def _check_weights(weights, k: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a sequence of {k} numbers, got {weights!r}")
    ws = [_real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(ws) != k:
        raise ValueError(f"weights must have one entry per client ({k}), got {len(ws)}")
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] must be finite and >= 0, got {w}")
    if sum(ws) <= 0:
        raise ValueError("weights must not all be zero (their sum is the divisor)")
    return ws


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
_F32_TINY = float(torch.finfo(torch.float32).tiny)
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
    total = sum(ws)
    if not math.isfinite(total):  # finite weights whose sum overflows (e.g. 1e308 x 3): same ratios
        top = max(ws)
        ws = [w / top for w in ws]
        total = sum(ws)
    norm = [w / total for w in ws]
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


class StreamingAverage:
    """Weighted average folded in one client at a time: memory for one
    accumulator (float32 for float16/bfloat16/float32 tensors), not K clients.

    >>> avg = StreamingAverage()
    >>> for state, n in replies: avg.add(state, n)
    >>> global_state = avg.result()

    Clients are folded in the order they are added; the result is
    deterministic for that order. Integer tensors accumulate exactly in int64, with the
    weights of weighted_average (_exact.py): the same integers as one weighted_average
    call; a fold that would wrap int64 is refused, naming the tensor.
    """

    def __init__(self):
        self._names = None
        self._rebuild = None
        self._template = None
        self._acc = None
        self._total = 0.0
        self._fixed = False  # integer weights so far: q = w; else the 2**-30 grid (_exact.py)
        self._int_total = 0  # sum of q
        self._consumed = False
        self.count = 0

    def _check_live(self) -> None:
        if self._consumed:
            raise RuntimeError("this StreamingAverage was consumed by result(consume=True); start a new one")

    def add(self, client, weight) -> None:
        """Fold one client (a tensor, a tensor sequence or a state dict) with its weight."""
        self._check_live()
        lists, names, rebuild = _as_client_lists([client])
        (lst,) = lists
        w = _real(weight, "weight")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {w}")
        if w > _F32_MAX or 0 < w < _F32_TINY:
            # the accumulators fold w in float32: outside its range w becomes Inf or 0
            raise ValueError(f"weight {w:g} is outside float32's range [{_F32_TINY:g}, {_F32_MAX:g}] that "
                             "StreamingAverage folds weights in; scale the weights (only their ratios matter)")
        if self._template is None:
            for j, t in enumerate(lst):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"client[{names[j]!r}] must be a tensor, got {type(t).__name__}")
            self._names, self._rebuild = names, rebuild
            self._template = [(t.shape, t.dtype, t.device) for t in lst]
            self._acc = [
                torch.zeros(
                    t.shape,
                    dtype=(torch.float64 if t.dtype == torch.float64 else torch.float32)
                    if t.dtype.is_floating_point
                    else torch.int64,
                    device=t.device,
                )
                for t in lst
            ]
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
        fixed = self._fixed or not w.is_integer()
        q = _exact.on_grid(w, fixed)  # the rule weighted_average uses (_exact.py)
        rescale = 2**_exact.GRID_BITS if fixed and not self._fixed else 1  # the switch, exact
        int_total = self._int_total * rescale + q
        ints = [(j, a, t) for j, (a, t) in enumerate(zip(self._acc, lst)) if not a.dtype.is_floating_point]
        # int64 accumulation must not wrap: check every tensor, naming it, before changing any
        grid = " (on the 2**-30 grid)" if fixed else ""
        if ints and int_total >= _exact.INT64_LIMIT:
            raise ValueError(f"client #{self.count}: weight {w:g} takes the integer weights' sum to {int_total}{grid}, "
                             "past int64; scale the weights (only their ratios matter)")
        for j, a, t in ints:
            if not t.numel() or (q == 0 and rescale == 1):  # nothing changes: no check (no host sync)
                continue
            lo, hi = (int(v) for v in torch.aminmax(t.to(torch.int64)))
            alo, ahi = (int(v) for v in torch.aminmax(a))
            # every element's new sum a * rescale + t * q (q >= 0) lies within these bounds
            new_lo, new_hi = alo * rescale + lo * q, ahi * rescale + hi * q
            if new_lo < -_exact.INT64_LIMIT or new_hi >= _exact.INT64_LIMIT:
                big = hi if new_hi >= _exact.INT64_LIMIT else lo
                raise ValueError(f"client #{self.count}[{names[j]!r}]: integer values up to {big} x weight {q}{grid} "
                                 "overflow the int64 accumulator")
        with torch.no_grad():
            for j, a, t in ints:
                if rescale != 1:
                    a.mul_(rescale)
                if q:
                    a.add_(t.to(torch.int64), alpha=q)
            accs = [a for a in self._acc if a.dtype.is_floating_point]
            if accs:
                xs = [in_layout(t, a.stride()) for a, t in zip(self._acc, lst) if a.dtype.is_floating_point]
                OPS.accumulate_list_(accs, xs, w)
        self._fixed = fixed
        self._int_total = int_total
        self._total += w
        self.count += 1

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
        res = []
        with torch.no_grad():
            for j, (a, (shape, dtype, device)) in enumerate(zip(self._acc, self._template)):
                o = None if out_list is None else out_list[j]
                if o is not None and (o.shape != shape or o.dtype != dtype):
                    raise ValueError(f"out[{self._names[j]!r}] must be ({tuple(shape)}, {dtype})")
                if a.dtype.is_floating_point:
                    r = a.div_(self._total) if consume and a.dtype == dtype else (a / self._total).to(dtype)
                else:
                    if self._int_total <= 0:
                        raise ValueError(f"{self._names[j]!r}: the weights (sum {self._total:g}) round to zero on "
                                         f"the 2**-{_exact.GRID_BITS} grid integer tensors are averaged on; scale "
                                         "the weights (only their ratios matter) or use weighted_average")
                    r = _exact.round_div(a, self._int_total).to(dtype)
                if o is not None:
                    o.copy_(r)
                    r = o
                res.append(r)
        if consume:
            self._consumed, self._acc = True, None
        return self._rebuild(res)
