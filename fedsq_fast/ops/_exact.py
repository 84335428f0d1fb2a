"""Exact integer averaging: the one rule both entry points use.

``weighted_average`` (one call over K clients) and ``StreamingAverage`` (one client at
a time, for the federation engine) must give the same integers for the same clients
and weights, so both put the weights on one grid here and divide with one rounding:

    q_k = w_k                       when every weight is an integer (sample counts)
    q_k = round(w_k * 2**GRID_BITS) otherwise (an absolute grid: a running sum
                                    cannot know the total a relative grid needs)
    out = round_half_even(sum_k q_k x_k / sum_k q_k)

A stream can switch from the first rule to the second exactly (every earlier q_k is
multiplied by 2**GRID_BITS), so the order in which weights arrive does not matter.
The C++ kernels (csrc/int_average.h) compute the division in 128-bit integers; the
helpers below are its reference, bit for bit.
"""
from __future__ import annotations

import math

import torch

GRID_BITS = 30
INT64_LIMIT = 2**63  # sums of q_k must stay below this (the kernels' contract)


def is_integral(w) -> bool:
    """An integer weight: a Python int (any size, exact) or an integer-valued float."""
    return isinstance(w, int) or w.is_integer()


def frexp(w) -> tuple[float, int]:
    """``w = m * 2**e`` with m in [0.5, 1) (0 for w = 0), for a float or a Python int of any
    size (an int past float's range has no float, but its exponent is its bit length)."""
    if isinstance(w, int):
        if w == 0:
            return 0.0, 0
        e = w.bit_length()
        m, e2 = math.frexp(w / (1 << e))  # int / int is correctly rounded (and may round up to 1.0)
        return m, e + e2
    return math.frexp(w)


def ldexp(w, k: int) -> float:
    """``w * 2**k`` as a float for a float or a Python int of any size (the int is rounded once,
    correctly, when it has more than 53 bits); 0 or OverflowError as math.ldexp."""
    if isinstance(w, int):
        m, e = frexp(w)
        return math.ldexp(m, e + k)
    return math.ldexp(w, k)


def round_ldexp(w, k: int) -> int:
    """round_half_even(w * 2**k) exactly, for a float or an int of any size and any k."""
    num, den = w.as_integer_ratio() if isinstance(w, float) else (w, 1)
    if k >= 0:
        num <<= k
    else:
        den <<= -k
    return round_div_int(num, den)


def on_grid(w, fixed: bool) -> int:
    """One weight as an exact integer: itself (``fixed=False``, w an integer: a Python int of
    any size stays exact) or round_half_even(w * 2**GRID_BITS) (a power-of-two scaling, then
    one rounding, computed exactly: no float overflow for any finite w)."""
    if not fixed:
        return int(w)
    return round_ldexp(w, GRID_BITS)


def integer_weights(ws: list) -> list[int]:
    """The q_k of the module rule for a whole weight list (floats or Python ints; finite,
    >= 0, not all zero).

    Weights the grid cannot hold (their q_k sum to 0 or to 2**63 or more) are first
    scaled by a power of two, exactly, which keeps their ratios; StreamingAverage
    refuses such weights instead, so the two entry points agree wherever both answer.
    """
    fixed = not all(is_integral(w) for w in ws)
    top = max(ws)
    if not fixed or top < math.ldexp(1.0, 63 - GRID_BITS):  # else w * 2**30 alone is too big
        qs = [on_grid(w, fixed) for w in ws]
        if 0 < sum(qs) < INT64_LIMIT:
            return qs
    shift = -frexp(top)[1]  # the largest weight becomes [0.5, 1): q <= 2**GRID_BITS
    return [round_ldexp(w, shift + GRID_BITS) for w in ws]


def round_div_int(s: int, q: int) -> int:
    """round_half_even(s / q) for Python ints, q > 0."""
    quot, rem = divmod(s, q)
    return quot + (2 * rem > q or (2 * rem == q and quot % 2 == 1))


def round_div(s: torch.Tensor, q: int) -> torch.Tensor:
    """round_half_even(s / q) for an int64 tensor and 0 < q < 2**63, exactly and without
    wrapping (floor division and a non-negative remainder; ``rem > q - rem`` is 2 rem > q)."""
    quot = torch.div(s, q, rounding_mode="floor")
    rem = torch.remainder(s, q)
    half = q - rem
    up = (rem > half) | ((rem == half) & (quot % 2 == 1))
    return quot + up.to(quot.dtype)


def int_weighted_sum(tensors: list[torch.Tensor], qs: list[int]) -> torch.Tensor:
    """round_half_even(sum_k q_k x_k / sum_k q_k) as int64 for integer/bool tensors
    (the reference of the int_weighted_sum_list_out kernel)."""
    total = sum(qs)
    xs = [t.to(torch.int64) for t in tensors]
    big = 0  # the largest |x| as a Python int (abs() of int64's minimum would wrap)
    for t in xs:
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))
            big = max(big, -lo, hi)
    if big * total < INT64_LIMIT:  # every partial sum fits int64: tensor arithmetic
        s = torch.zeros(xs[0].shape, dtype=torch.int64, device=xs[0].device)
        for q, t in zip(qs, xs):
            if q:
                s.add_(t, alpha=q)
        return round_div(s, total)
    cols = [t.reshape(-1).tolist() for t in xs]  # Python integers: slow, never wrong
    vals = [round_div_int(sum(q * c[i] for q, c in zip(qs, cols)), total) for i in range(xs[0].numel())]
    return torch.tensor(vals, dtype=torch.int64, device=xs[0].device).reshape(xs[0].shape)
