"""Callbacks: what runs around the round loop without being the round loop.

The engine (:class:`~fedsq_fast.federation.Federation`) calls every callback's hooks in
order; a hook may read the federation (``fed.model``, ``fed.initial``, ``fed.data``,
``fed.cfg``, ``fed.history``) and add keys to the round's record (``record["name"] = v``),
which then reach metrics.json/CSV and checkpoints. Per-round extras (suite diagnostics,
progress, writers) are callbacks, never subclasses of the engine (after pfl-research's
callbacks).
"""
from __future__ import annotations


class Callback:
    """Base class: every hook is optional (a no-op here)."""

    def on_run_start(self, fed, start_round: int) -> None:
        """Before the first round this run executes (``start_round`` > 1 after a resume)."""

    def on_round_start(self, fed, rnd: int) -> None:
        """Before round ``rnd`` (before any structural refresh and client training)."""

    def on_round_end(self, fed, record) -> None:
        """After round ``record["round"]`` is aggregated and evaluated, before it is saved."""

    def on_run_end(self, fed, result) -> None:
        """After the last round (``result``: the RunResult, metrics already computed)."""
