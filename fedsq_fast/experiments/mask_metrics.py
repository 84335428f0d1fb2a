"""The per-round mask-evolution metrics the suite reports need, as an engine callback."""
from __future__ import annotations

import copy
import math
import time

import numpy as np

from ..federation import adapter
from ..federation.callbacks import Callback


def _float_keys(state) -> list:
    # parameters only: BN running statistics are not weights (and move on their own)
    return [k for k, v in state.items() if v.is_floating_point() and "running_" not in k]


def _dist(a: dict, b: dict | None, keys) -> float:
    s = 0.0
    for k in keys:
        t = a[k].double() if b is None else a[k].double() - b[k].double()
        s += float((t * t).sum())
    return math.sqrt(s)


def _snapshot(model):
    cache = getattr(model, "mask_cache", None)
    if cache is not None:
        model.mask_cache = None  # not deep-copied (it belongs to the global model)
    try:
        return copy.deepcopy(model)
    finally:
        if cache is not None:
            model.mask_cache = cache


class MaskMetrics(Callback):
    """Adds to every round's record (after the engine's own keys):

    - ``weight_step_rel``: ||w_r - w_{r-1}|| / ||w_0|| over the payload's parameters;
    - ``weight_dist_rel``: ||w_r - w_0|| / ||w_0||;
    - ``gate_flip_prev``: fraction of gates (probe batch) that changed since the previous
      round's global model (DualCopy: the quantitative copy's own gates); NaN, with
      ``gate_flip_error``, where it cannot be computed (a metric must not stop a suite);
    - ``time_probe_s``: the time these took.

    ``gate_change`` (vs round 0, i.e. the pretrained gates) is the engine's own. The previous
    model is snapshot at round start, before any structural refresh, and compared at round end.
    """

    def on_run_start(self, fed, start_round: int) -> None:
        w0 = adapter.payload_state(fed.initial)
        self._keys = _float_keys(w0)
        self._w0 = {k: w0[k].detach().clone() for k in self._keys}
        self._w0_norm = _dist(self._w0, None, self._keys) or 1.0

    def on_round_start(self, fed, rnd: int) -> None:
        # a full copy every round (small next to a round): after a structural refresh the
        # previous model keeps its own structural copy, so each model is compared by its own gates
        self._prev = _snapshot(fed.model)
        self._prev_w = {k: v.detach().clone() for k, v in adapter.payload_state(self._prev).items()
                        if k in self._keys}

    def on_round_end(self, fed, record) -> None:
        t = time.perf_counter()
        w = adapter.payload_state(fed.model)
        record["weight_step_rel"] = _dist(w, self._prev_w, self._keys) / self._w0_norm
        record["weight_dist_rel"] = _dist(w, self._w0, self._keys) / self._w0_norm
        try:
            g = adapter.gate_change_sites(self._prev, fed.model, fed.data.transform(fed.data.probe))
            record["gate_flip_prev"] = float(np.mean(g)) if g else float("nan")
        except Exception as e:  # a metric must not stop the suite
            record["gate_flip_prev"] = float("nan")
            record["gate_flip_error"] = f"{type(e).__name__}: {e}"
        record["time_probe_s"] = time.perf_counter() - t
        self._prev = self._prev_w = None  # the snapshot is not kept between rounds
