"""The federation's round loop: sample, send the task, fold the replies, evaluate, save.

One loop for every runtime. Where clients run is the transport's business
(:mod:`.transport`: in process, or Flower SuperNodes through a Grid); what is recorded
beside the engine's own numbers is the callbacks' (:mod:`.callbacks`). Memory: the global
model and the StreamingAverage accumulator; replies are folded as they arrive, never held.
Every random choice is drawn from a seed derived from (seed, round, client) (:mod:`.seeds`),
so a run resumed from a checkpoint computes the same model, bit for bit.
"""
from __future__ import annotations

import copy
import logging
import operator
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import adapter, checkpoint, evaluation
from .callbacks import GateStability, Progress
from .client import LocalConfig, eval_result, eval_sums, evaluate
from .config import MethodSpec, RunConfig, config_differences, local_config, resolve_device, strategy_from_config
from .lazy import is_random
from .metrics import RoundRecord, drops_text, summarize, write_metrics
from .prepare import (FedData, build_method_model, call_model_fn, place_data,  # noqa: F401 (API)
                      prepare_data, warn_little_data)
from .seeds import client_seed, failure_draws, sample_clients  # noqa: F401 (API)
from .strategy import AggregateStats
from .transport import FoldTotals, InProcessTransport, RoundTask, Transport, cap_counts, fold
from .trainer import new_mask_cache

log = logging.getLogger("fedsq_fast.federation")
DROP_LOG_LINES = 10  # per round: clients dropped beyond these are logged at DEBUG and summarised in one line


@dataclass
class RunResult:
    method: str
    history: list
    summary: dict
    out_dir: Path | None
    model: nn.Module = field(repr=False, default=None)


def make_method_strategy(cfg: RunConfig, method: str):
    """The server strategy of ``method`` with the run's options (shared with the Flower path):
    :func:`config.strategy_from_config`."""
    return strategy_from_config(cfg, method)


class Federation:
    """One method (strategy, DualCopy or not, structural schedule) on one FedData.

    ``model_fn()`` builds the initial model (default: the zoo model ``cfg.model``);
    ``transport`` reaches the clients (default: :class:`~.transport.InProcessTransport`, or
    :class:`~.workers.WorkerPoolTransport` when ``cfg.workers`` > 1, closed when run() ends;
    a transport passed in is the caller's to close);
    ``callbacks`` add per-round records and side effects (:class:`~.callbacks.Callback`);
    gate stability and, unless ``quiet``, progress are installed first.
    ``client_hook(round, client, state) -> state`` (in process) lets tests corrupt a reply.
    """

    def __init__(self, cfg: RunConfig, method: str, data: FedData, model_fn=None,
                 out_dir=None, client_hook=None, quiet: bool = False, callbacks=(),
                 transport: Transport | None = None):
        self.cfg = cfg
        self.method = method
        self.spec = MethodSpec.parse(method)
        self.strategy_name, self.dual, self.ablation, self.every = (self.spec.strategy, self.spec.dual,
                                                                    self.spec.ablation, self.spec.every)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.quiet = quiet
        self.strategy = make_method_strategy(cfg, method)
        self.device = resolve_device(cfg.device)
        self.data = data = place_data(data, self.device)
        # No silent fallback: a fedsq method always trains a DualCopy model (adapter.method_model).
        source = "model_fn" if model_fn is not None else f"model {cfg.model!r}"
        self.model_fn = model_fn  # worker processes build their model with it (workers > 1)
        if model_fn is not None:
            adapter.check_model_fn(model_fn)
        model = call_model_fn(model_fn, cfg.seed) if model_fn is not None else build_method_model(cfg, self.dual, data)
        if model_fn is not None and isinstance(model, nn.Module) and not (self.dual and not adapter.is_dualcopy(model)):
            model = copy.deepcopy(model)  # a model_fn that returns one shared object must not leak training across methods
        model, self.model_info = adapter.method_model(model, method, self.dual, quant_bn=cfg.quant_bn,
                                                      allow_ungated=cfg.allow_ungated, soft_gates=cfg.soft_gates,
                                                      source=source)
        self.model = model.to(self.device)
        adapter.check_model_io(self.model, data.val_x, data.transform, data.num_classes, source)
        if self.ablation and not callable(getattr(self.model, "set_structural_from_quantitative", None)):
            raise ValueError(f"methods: {method!r} needs DualCopyModel.set_structural_from_quantitative(), "
                             "which this model does not have")
        self.initial = copy.deepcopy(self.model)  # gate-stability reference (round 0)
        self._new_val_cache()
        if transport is not None and client_hook is not None:
            raise ValueError("client_hook: only the in-process transport calls it; pass it to that transport")
        if transport is not None and cfg.workers > 1 and not getattr(transport, "parallel_clients", False):
            raise ValueError(f"workers: {cfg.workers} asked for, but the transport given ({type(transport).__name__}) "
                             "reaches the clients; set workers = 1")
        if client_hook is not None and cfg.workers > 1:
            raise ValueError(f"client_hook: it runs in the server process, but workers = {cfg.workers} trains "
                             "the clients in worker processes; use workers = 1")
        if cfg.secagg and not getattr(transport, "secure", False):
            from .config.checks import refuse_secagg_here

            refuse_secagg_here(f"this transport ({type(transport).__name__})" if transport is not None else
                               "the embedded engine (in process or workers)")
        self._owns_transport = transport is None  # a transport made here is closed at the end of run()
        if transport is None:
            if cfg.workers > 1:
                from .workers import WorkerPoolTransport

                transport = WorkerPoolTransport(cfg.workers)
            else:
                transport = InProcessTransport(client_hook)
        self.transport = transport
        self.transport.bind(self)
        evaluation.check_transport(self)  # federated evaluation: before any round
        self.callbacks = [GateStability()] + ([] if quiet else [Progress()]) + list(callbacks)
        self.history: list[RoundRecord] = []
        self.elapsed = 0.0
        self.last_round = cfg.rounds
        self.payload_bytes = adapter.state_bytes(adapter.payload_state(self.model))
        self.full_bytes = adapter.state_bytes(self.model.state_dict())

    # ------------------------------------------------------------------ pieces
    def _new_val_cache(self) -> None:
        """A fresh mask cache over the validation split for the global model (FedSQ): its
        structural copy is fixed, so validation is then one quantitative forward. None for
        validation data that changes between reads (a Dataset with random transforms)."""
        if self.cfg.mask_cache and not is_random(self.data.val_x):
            new_mask_cache(self.model, len(self.data.val_y))

    def close_caches(self) -> None:
        """Empty the mask caches of this process (the global model's validation cache, the
        in-process trainer's) and remove their spill files; called when run() ends, also on
        an error. A later evaluation or round refills them."""
        cache = getattr(self.model, "mask_cache", None)
        if cache is not None:
            cache.close()
        if self.trainer is not None:
            self.trainer.close()

    @property
    def trainer(self):
        """The in-process client trainer (worker model, mask cache, FedBN layers)."""
        return getattr(self.transport, "trainer", None)

    @property
    def worker(self):
        return self.trainer.worker if self.trainer is not None else None

    @property
    def cache(self):
        return self.trainer.cache if self.trainer is not None else None

    @property
    def ckpt_path(self):
        return None if self.out_dir is None else self.out_dir / "checkpoint.safetensors"

    def local_config(self, rnd: int) -> LocalConfig:
        return local_config(self.cfg, self.strategy.client_config(rnd).get("prox_mu", 0.0), rnd)

    def sample_clients(self, rnd: int) -> list[int]:
        return sample_clients(self.cfg, rnd)

    def partition_size(self, cid) -> int | None:
        """The samples client ``cid`` holds as the server partitioned the data (the cap on
        the count its reply may claim: an honest client reports exactly this), or None for
        an id that is not a client of this run."""
        parts = self.data.parts
        try:
            i = operator.index(cid)
        except TypeError:
            return None
        if isinstance(cid, bool) or not 0 <= i < len(parts):
            return None
        return len(parts[i])

    def train_client(self, rnd: int, cid: int, glob: dict, lcfg: LocalConfig | None = None) -> tuple[dict, dict]:
        """One client's local step in this process (tools and tests): (payload state, info)."""
        return self.trainer.train(rnd, cid, glob, lcfg or self.local_config(rnd))

    def _structural_update(self, rnd: int) -> bool:
        """Ablations: replace the structural copy by the global quantitative copy."""
        if not self.ablation:
            return False
        due = (rnd > self.every) if self.ablation == "unfreeze" else (rnd > 1 and (rnd - 1) % self.every == 0)
        if due:
            self.model.set_structural_from_quantitative()
            self._new_val_cache()
            self.transport.refresh()
        return due

    def evaluate(self, x=None, y=None):
        """(loss, accuracy) of the global model on the validation split by default (with the
        FedSQ mask cache), else on (x, y); in this process."""
        if x is None:
            return eval_result(*self.val_sums(), len(self.data.val_y))
        return evaluate(self.model, x, y, self.data.transform, self.cfg.eval_batch_size, None, self.cfg.precision)

    def val_sums(self, start: int = 0, stop: int | None = None) -> tuple[list, int]:
        """Validation samples ``[start, stop)`` evaluated in this process:
        :func:`~.client.eval_sums` (per-batch loss sums, correct count)."""
        d = self.data
        idx = None
        if getattr(self.model, "mask_cache", None) is not None:
            idx = torch.arange(len(d.val_y))[start:stop]
        return eval_sums(self.model, d.val_x, d.val_y, d.transform, self.cfg.eval_batch_size, idx,
                         self.cfg.precision, start, stop)

    def _validate(self, rnd: int) -> tuple[float, float]:
        """Round ``rnd``'s validation: shared out by a transport that can (the worker pool:
        whole batches per worker, combined in batch order: the numbers of :meth:`evaluate`
        bit for bit), else :meth:`evaluate`."""
        split = getattr(self.transport, "validate", None)  # a duck-typed transport may lack it
        sums = split(rnd) if callable(split) else None
        return self.evaluate() if sums is None else eval_result(*sums, len(self.data.val_y))

    # ------------------------------------------------------------------ round
    def run_round(self, rnd: int) -> RoundRecord:
        t0 = time.perf_counter()
        refreshed = self._structural_update(rnd)
        glob = adapter.payload_state(self.model)
        chosen = self.sample_clients(rnd)
        fails = failure_draws(self.cfg.seed, rnd, len(chosen)) < self.cfg.failure_rate
        dropped = [(cid, "simulated failure (failure_rate)") for cid, f in zip(chosen, fails) if f]
        shown, hidden = [0], []  # per-client drop lines logged / levels of those past DROP_LOG_LINES

        def log_drop(level, msg, *args):
            # thousands of clients: a round's first drops get a line each, the rest one summary line
            if shown[0] < DROP_LOG_LINES:
                shown[0] += 1
                log.log(level, msg, *args)
            else:
                hidden.append(level)
                log.debug(msg, *args)

        for cid, _ in dropped:
            log_drop(logging.INFO, "round %d: client %d dropped: simulated failure", rnd, cid)
        task = RoundTask(rnd, glob, [cid for cid, f in zip(chosen, fails) if not f], self.local_config(rnd))
        totals = FoldTotals()

        def drop(r):
            dropped.append((r.cid, r.error))
            log_drop(logging.WARNING, "round %d: client %d dropped: %s", rnd, r.cid, r.error)

        secure = []  # the secure sums of the round (SecAgg+): their clients are counted, not the reply
        sums = {}  # their ids -> how many clients each averages (DP counts them as that many updates)

        def seen(r):
            if r.secure is not None and r.error is None:
                secure.append(r)
                sums[r.cid] = len(r.secure.clients)
            for cb in self.callbacks:
                cb.on_reply(self, r)

        stats = AggregateStats()

        def capped(r, claimed, cap):
            stats.capped.append([int(r.cid), claimed, int(cap)])
            log_drop(logging.WARNING, "round %d: client %d claimed %s samples, its partition holds %d: weighted by %d",
                     rnd, r.cid, claimed, cap, cap)

        replies = cap_counts(self.transport.replies(task), self.partition_size, capped)
        new = self.strategy.aggregate(glob, fold(replies, totals, drop, seen), stats,
                                      copy_held=self.transport.replies_alias, rnd=rnd, secure=sums)
        if secure:
            self._count_secure(secure, stats)
        for cid, reason in stats.rejected:
            dropped.append((cid, f"update rejected: {reason}"))
            log_drop(logging.WARNING, "round %d: client %d update rejected: %s", rnd, cid, reason)
        if hidden:
            log.log(max(hidden), "round %d: %d more clients dropped than logged above; in all %s (every one is in "
                    "metrics.json / metrics.csv, clients_dropped)", rnd, len(hidden), drops_text(sorted(dropped)))
        if stats.rolled_back:
            log.error("round %d: aggregate discarded, global model kept: %s", rnd, stats.rolled_back)
        # under DP every round releases its noised aggregate: skipping on a count of replies would
        # make the release depend on one client's presence (docs/privacy.md)
        skipped = stats.num_clients < self.cfg.min_clients and self.strategy.dp is None
        if skipped:
            log.warning("round %d: %d valid updates < min_clients (%d): global model kept",
                        rnd, stats.num_clients, self.cfg.min_clients)
        else:
            adapter.load_payload(self.model, new)
        t_eval = time.perf_counter()
        vloss, vacc = self._validate(rnd)
        rec = RoundRecord(
            round=rnd, val_loss=vloss, val_acc=vacc,
            train_loss=totals.train_loss,
            clients_sampled=len(chosen), clients_ok=stats.num_clients,
            clients_dropped=[[int(c), r] for c, r in sorted(dropped)], round_skipped=skipped,
            rolled_back=stats.rolled_back, samples=stats.num_samples, client_drift=stats.client_drift,
            update_norm=stats.update_norm, structural_refreshed=refreshed, bytes_up=totals.bytes_up,
            bytes_down=(len(chosen) if task.sent is None else task.sent) * self.payload_bytes,
            time_client_s=totals.client_s)
        if stats.capped:  # a key of its own, only where counts were capped: honest runs' records unchanged
            rec["counts_capped"] = stats.capped
        if self.strategy.dp is not None:  # DP runs only: the privacy spent after this round and how
            self._dp_record(rec, rnd, stats)
        self._client_eval(rec)
        log.info("round %d: val_acc %.4f, %d/%d clients, dropped %s", rnd, vacc, stats.num_clients,
                 len(chosen), drops_text(rec.clients_dropped))
        return self._finish(rec, t0, t_eval)

    def _dp_record(self, rec: RoundRecord, rnd: int, stats: AggregateStats) -> None:
        s = self.strategy.dp.s
        rec["dp_epsilon"] = s.epsilon(rnd)
        rec["dp_delta"] = s.delta
        info = stats.dp or {}
        rec["dp_clip"] = info.get("clip", self.strategy.dp.clip)
        rec["dp_noise_std"] = info.get("noise_std", float("nan"))
        if "unclipped_fraction" in info:
            rec["dp_unclipped_fraction"] = info["unclipped_fraction"]

    def budget_stop(self, rnd: int) -> str | None:
        """Why round ``rnd`` must not run (it would spend more than dp_target_epsilon), or None."""
        dp = self.strategy.dp
        if dp is None or dp.s.target_epsilon is None:
            return None
        eps = dp.s.epsilon(rnd)
        if eps <= dp.s.target_epsilon:
            return None
        return (f"privacy budget spent: round {rnd} would bring epsilon to {eps:.4g} > dp_target_epsilon "
                f"{dp.s.target_epsilon:g} (delta {dp.s.delta:g}); stopped after round {rnd - 1} of {self.cfg.rounds}, "
                f"epsilon {dp.s.epsilon(rnd - 1):.4g}")
    @staticmethod
    def _count_secure(secure: list, stats: AggregateStats) -> None:
        """A secure sum (SecAgg+) counts as the clients it averages: accepted, each of them is
        a valid update (client drift, a spread of single updates, is unknown: NaN); rejected
        (its aggregate not finite or implausible), each of them is rejected with the reason."""
        (r,) = secure  # a SecAgg+ transport yields one secure sum a round
        rejected = dict(stats.rejected)
        if r.cid in rejected:
            why = rejected[r.cid]
            stats.rejected = [(c, w) for c, w in stats.rejected if c != r.cid]
            stats.rejected += [(c, f"the secure sum it is part of: {why}") for c in r.secure.clients]
        elif stats.num_clients:
            stats.num_clients += len(r.secure.clients) - 1
            stats.client_drift = float("nan")

    def _finish(self, rec: RoundRecord, t0: float, t_eval: float, callbacks: bool = True) -> RoundRecord:
        """Best-so-far, the callbacks' additions, timings and elapsed time of a round's record."""
        prev = self.history[-1] if self.history else None
        if prev is None or rec.val_acc > prev["best_val_acc"]:
            rec.best_val_acc, rec.best_round = rec.val_acc, rec.round
        else:
            rec.best_val_acc, rec.best_round = prev["best_val_acc"], prev["best_round"]
        for cb in self.callbacks if callbacks else ():
            cb.on_round_end(self, rec)
        t_end = time.perf_counter()
        rec.time_eval_s = t_end - t_eval  # evaluation and the callbacks' metrics
        rec.time_round_s = t_end - t0
        rec.time_other_s = rec.time_round_s - rec.time_client_s
        rec.time_engine_s = rec.time_other_s - rec.time_eval_s
        self.elapsed += rec.time_round_s
        rec.elapsed_s = self.elapsed
        return rec

    def _round0(self) -> RoundRecord:
        """The initial model's record (no clients; gates unchanged by definition)."""
        t0 = time.perf_counter()
        vloss, vacc = self.evaluate()
        rec = RoundRecord(round=0, val_loss=vloss, val_acc=vacc, gate_change=0.0)
        self._client_eval(rec)
        return self._finish(rec, t0, t0, callbacks=False)

    def _client_eval(self, rec: RoundRecord) -> None:
        """Federated evaluation (:mod:`.evaluation`) on its rounds: the clients evaluate the
        global model on their test splits; keys of their own in the record (off: none)."""
        if evaluation.due(self.cfg, rec.round):
            rec.update(evaluation.evaluate_on_clients(self, rec.round))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, rnd: int) -> None:
        if self.ckpt_path is None or not self.cfg.checkpoint:
            return
        # the file being replaced becomes the fallback only when it is known to be good
        checkpoint.save(self.ckpt_path,
                        {"model": self.model.state_dict(), "server": self.strategy.state_dict(),
                         "local": self.transport.state_dict(),
                         **({"dp": dp} if (dp := self.strategy.dp_state_dict()) else {})},
                        {"round": rnd, "method": self.method, "config": self.cfg.to_dict(),
                         "history": [h.to_dict() for h in self.history], "elapsed": self.elapsed},
                        keep_previous=self._ckpt_good)
        self._ckpt_good = True

    _ckpt_good = False  # is the checkpoint file on disk one this run wrote or verified?
    stopped = None  # why the run stopped before its last round (privacy budget), or None

    def _check_checkpoint(self, path, groups: dict, meta: dict) -> None:
        """What a hash cannot vouch for (a file written by other code, or forged with a new
        hash): the metadata's shape, the model's keys and finiteness, the server state."""
        def bad(what):
            raise checkpoint.CheckpointError(f"checkpoint {path}: {what}")

        rnd, hist = meta.get("round"), meta.get("history")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= self.cfg.rounds:
            bad(f"round {rnd!r} is not a round of this run (0..{self.cfg.rounds})")
        if not isinstance(hist, list) or len(hist) != rnd + 1 or any(
                not isinstance(h, dict) or h.get("round") != i for i, h in enumerate(hist)):
            bad(f"its history does not hold rounds 0..{rnd}")
        if not isinstance(meta.get("elapsed"), (int, float)) or not isinstance(meta.get("config"), dict):
            bad("metadata lacks elapsed/config")
        own = self.model.state_dict()
        model = groups.get("model", {})
        if set(model) != set(own):
            bad(f"model keys differ from this model's (missing {sorted(set(own) - set(model))[:3]}, "
                f"unexpected {sorted(set(model) - set(own))[:3]})")
        for k, t in model.items():
            if t.shape != own[k].shape or t.dtype != own[k].dtype:
                bad(f"model[{k!r}] is {t.dtype} {tuple(t.shape)}, this model has {own[k].dtype} {tuple(own[k].shape)}")
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                bad(f"model[{k!r}] holds NaN or Inf")
        if self.cfg.plausible_scale is not None:  # the bound replies get, against the model the run starts from
            from .strategy import implausible

            sc = self.cfg.plausible_scale  # a variance is a squared scale: its bound squared
            var = {k for k in own if k.endswith("running_var")}
            why = (implausible({k: own[k] for k in own if k not in var}, model, sc)
                   or implausible({k: own[k] for k in var}, model, sc * sc))
            if why is not None:
                bad(f"model {why} (plausible_scale = {self.cfg.plausible_scale:g}); no client update could "
                    "repair it")
        server = groups.get("server", {})
        stepped = any(h.get("clients_ok", 0) > 0 for h in hist[1:])  # a server step ran at least once
        expect = self.strategy.expected_state_keys(adapter.payload_state(self.model)) if stepped else set()
        if expect is not None and set(server) != expect:
            bad(f"the server optimizer state holds {len(server)} tensors, {self.strategy.name} needs {len(expect)} "
                "after its first step")

    def load_checkpoint(self) -> int:
        """Resume from the latest good checkpoint: the current file, else (with a warning)
        the previous one; a damaged checkpoint with no good one is an error naming both."""
        errors = []
        for path in (self.ckpt_path, checkpoint.previous(self.ckpt_path)):
            if not path.exists():
                continue
            try:
                groups, meta = checkpoint.load(path)
                self._check_checkpoint(path, groups, meta)
            except checkpoint.CheckpointError as e:
                errors.append(str(e))
                continue
            if path != self.ckpt_path:
                why = errors[0] if errors else f"{self.ckpt_path} is missing (a save was interrupted?)"
                msg = f"resume: {why}; resuming from the previous checkpoint {path} (round {meta['round']})"
                log.warning(msg)
                warnings.warn(msg, UserWarning, stacklevel=2)
            return self._restore(path, groups, meta)
        raise checkpoint.CheckpointError("resume: no usable checkpoint: " + "; ".join(errors))

    def _restore(self, path, groups, meta) -> int:
        diff = config_differences(self.cfg, meta["config"], ignore=("rounds",))
        if diff or meta.get("method") != self.method:
            raise ValueError(f"resume: the checkpoint {path} was written with other settings "
                             f"(differing keys: {diff or ['method']})")
        self.model.load_state_dict(groups.get("model", {}))
        self._new_val_cache()
        self.transport.refresh()
        self.strategy.load_state_dict({k: t.to(self.device) for k, t in groups.get("server", {}).items()})
        self.transport.load_state_dict(groups.get("local", {}))
        self.strategy.load_dp_state_dict(groups.get("dp", {}))
        self.history = [RoundRecord.from_dict(h) for h in meta["history"]]
        self.elapsed = meta["elapsed"]
        rng_t = {"rng/torch": groups["rng"]["torch"]} if "rng" in groups else {}
        checkpoint.set_rng_state(rng_t, meta.get("rng", {}))
        self._ckpt_good = path == self.ckpt_path  # a damaged latest file is overwritten, never kept
        return int(meta["round"])


    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False, stop_after: int | None = None) -> RunResult:
        """Run all rounds (``stop_after``: stop early, as if interrupted; for tests)."""
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        start = 1
        if self.ckpt_path is not None and self.cfg.checkpoint:  # before round 1, not after it
            checkpoint.check_path(self.ckpt_path)
            checkpoint.signing_key()
        if resume and self.ckpt_path is not None:
            for f in checkpoint.remove_stale_temps(self.ckpt_path):
                log.info("%s: removed %s, left by a save that was killed", self.method, f)
        if resume and self.ckpt_path is not None and (
                self.ckpt_path.exists() or checkpoint.previous(self.ckpt_path).exists()):
            start = self.load_checkpoint() + 1
            log.info("%s: resumed after round %d", self.method, start - 1)
        if not self.history:
            self.history.append(self._round0())
        self.last_round = last = self.cfg.rounds if stop_after is None else min(self.cfg.rounds, stop_after)
        result = None
        self.stopped = None
        for cb in self.callbacks:
            cb.on_run_start(self, start)
        try:
            for rnd in range(start, last + 1):
                self.stopped = self.budget_stop(rnd)
                if self.stopped is not None:
                    log.warning("%s: %s", self.method, self.stopped)
                    self.last_round = last = rnd - 1
                    break
                for cb in self.callbacks:
                    cb.on_round_start(self, rnd)
                rec = self.run_round(rnd)
                self.history.append(rec)
                t = time.perf_counter()
                self.save_checkpoint(rnd)
                rec.time_checkpoint_s = time.perf_counter() - t
            result = self._result(last)
        finally:
            try:
                for cb in self.callbacks:
                    cb.on_run_end(self, result)
            finally:
                self.close_caches()
                if self._owns_transport:
                    self.transport.close()  # worker processes end with the run (error and Ctrl-C too)
        return result

    def _result(self, last: int) -> RunResult:
        summary = summarize(self.history, self.cfg.target_accuracy)
        # a run stopped by its privacy budget is complete: no later round may run
        done = last == self.cfg.rounds or self.stopped is not None
        summary.update(method=self.method, device=str(self.device), payload_bytes=self.payload_bytes,
                       full_model_bytes=self.full_bytes, complete=done,
                       model=self.model_info)
        if self.strategy.dp is not None:
            s = self.strategy.dp.s
            summary.update(dp=s.mode, dp_epsilon=s.epsilon(last), dp_delta=s.delta,
                           dp_noise_multiplier=s.noise_multiplier, dp_sampling=s.sampling,
                           dp_stopped=self.stopped)
        if done:
            _, summary["test_acc"] = self.evaluate(self.data.test_x, self.data.test_y)
        summary.update(evaluation.summary_of(self.history))  # federated evaluation, when on
        if self.out_dir is not None:
            write_metrics(self.out_dir, self.method, self.cfg, self.history, summary)
        return RunResult(self.method, self.history, summary, self.out_dir, self.model)
