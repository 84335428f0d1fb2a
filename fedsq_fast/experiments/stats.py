"""Statistics of the reports: mean ± sample std over seeds, 95% Student-t intervals of paired
differences (quantiles from scipy.stats), and per-run round measures."""
from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95  # the intervals' confidence level


def mean_std(vals) -> tuple:
    """(mean, sample std, n) of the finite values (None and NaN left out); (nan, nan, 0) if none."""
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0), len(v)


def paired_ci(diffs) -> dict:
    """Mean of paired differences with a 95% Student-t interval: ``{n, mean, lo, hi}`` (None
    bounds when n < 2)."""
    mu, sd, n = mean_std(diffs)
    if n < 2:
        return {"n": n, "mean": mu, "lo": None, "hi": None}
    from scipy import stats as _st  # here, not at import: scipy.stats costs ~0.7 s of every `fedsq-fast run`

    h = float(_st.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mu, "lo": mu - h, "hi": mu + h}


def first_round_at(history, target) -> int | None:
    """First round whose validation accuracy reaches ``target``; None if none does."""
    return next((h["round"] for h in history if h["val_acc"] is not None and h["val_acc"] >= target), None)


def settle_round(values, threshold) -> int | None:
    """First round r >= 1 after which the per-round change stays <= threshold x its round-1
    value; None if it never does within the run (or round 1 changed nothing)."""
    v = [(r, x) for r, x in values if r >= 1 and x is not None and math.isfinite(x)]
    if not v or v[0][1] <= 0:
        return None
    ref = v[0][1]
    ok = None
    for r, x in reversed(v):
        if x <= threshold * ref:
            ok = r
        else:
            break
    return ok
