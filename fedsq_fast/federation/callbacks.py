"""Callbacks: what runs around the round loop without being the round loop.

The engine (:class:`~fedsq_fast.federation.Federation`) calls every callback's hooks in
order; a hook may read the federation (``fed.model``, ``fed.initial``, ``fed.data``,
``fed.cfg``, ``fed.history``) and add keys to the round's record (``record["name"] = v``),
which then reach metrics.json/CSV and checkpoints. Per-round extras (suite diagnostics,
progress, writers) are callbacks, never subclasses of the engine (after pfl-research's
callbacks).
"""
from __future__ import annotations

import logging
import sys
import time

import numpy as np

from . import adapter

log = logging.getLogger("fedsq_fast.federation")


class Callback:
    """Base class: every hook is optional (a no-op here)."""

    def on_run_start(self, fed, start_round: int) -> None:
        """Before the first round this run executes (``start_round`` > 1 after a resume)."""

    def on_round_start(self, fed, rnd: int) -> None:
        """Before round ``rnd`` (before any structural refresh and client training)."""

    def on_reply(self, fed, reply) -> None:
        """For each client reply as it arrives (a :class:`~.transport.Reply`; ``reply.error``
        set when the client is dropped), before it is folded into the aggregate."""

    def on_round_end(self, fed, record) -> None:
        """After round ``record["round"]`` is aggregated and evaluated, before it is saved."""

    def on_run_end(self, fed, result) -> None:
        """When the run stops: ``result`` is the RunResult (metrics written), or None when
        the run ended with an exception (release resources here)."""


class GateStability(Callback):
    """``gate_change`` (mean over gate sites) and ``gate_change_sites``: the fraction of
    gates on the probe batch that differ from round 0's model (the pretrained gates).
    Installed by default; a failure is logged and leaves the record's NaN (a metric must
    not stop training)."""

    def on_round_end(self, fed, record) -> None:
        try:
            sites = adapter.gate_change_sites(fed.initial, fed.model, fed.data.transform(fed.data.probe))
        except Exception as e:
            log.warning("gate stability failed: %s", e)
            sites = []
        record["gate_change_sites"] = sites
        record["gate_change"] = float(np.mean(sites)) if sites else float("nan")


def _bar(quiet: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=quiet or not sys.stderr.isatty(), **kw)


class Progress(Callback):
    """A bar per run and per round on a terminal; elsewhere (logs, CI, notebooks) one line
    per round on stderr with the accuracy and an ETA. Installed unless ``quiet``."""

    def on_run_start(self, fed, start_round: int) -> None:
        self.rounds = fed.cfg.rounds
        self.bar = _bar(False, total=self.rounds, initial=start_round - 1, desc=fed.method,
                        unit="round", leave=False)
        self.lines = self.bar.disable
        self.t0, self.start, self.cbar = time.perf_counter(), start_round, None

    def on_round_start(self, fed, rnd: int) -> None:
        self.t_round = time.perf_counter()
        self.cbar = _bar(False, total=len(fed.sample_clients(rnd)), desc=f"round {rnd}", unit="client",
                         leave=False)

    def on_reply(self, fed, reply) -> None:
        if self.cbar is not None:
            self.cbar.update(1)

    def on_round_end(self, fed, record) -> None:
        if self.cbar is not None:
            self.cbar.close()
            self.cbar = None
        self.bar.update(1)
        self.bar.set_postfix(acc=f"{record['val_acc']:.3f}",
                             **({"eps": f"{record['dp_epsilon']:.3g}"} if "dp_epsilon" in record else {}))
        if self.lines:
            rnd = record["round"]
            per_round = (time.perf_counter() - self.t0) / (rnd - self.start + 1)
            print(round_line(fed.method, record, self.rounds, fed.last_round - rnd, per_round,
                             time.perf_counter() - self.t_round), file=sys.stderr, flush=True)

    def on_run_end(self, fed, result) -> None:
        if self.cbar is not None:
            self.cbar.close()
        self.bar.close()


def round_line(method: str, rec, rounds: int, rounds_left: int, per_round_s: float, round_s: float) -> str:
    """The per-round progress line written where no bar can be drawn."""
    eta = per_round_s * rounds_left
    dp = f", epsilon {rec['dp_epsilon']:.3g} (delta {rec['dp_delta']:.0e})" if "dp_epsilon" in rec else ""
    return (f"[{method}] round {rec['round']}/{rounds}: val_acc {rec['val_acc']:.4f} (best "
            f"{rec['best_val_acc']:.4f}), {rec['clients_ok']}/{rec['clients_sampled']} clients{dp}, "
            f"{round_s:.1f} s, ETA {eta:.0f} s")
