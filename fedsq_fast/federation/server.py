"""The simulation engine: rounds of sampled clients trained in process, one at a time.

Memory: the global model, one worker model (the client being trained) and the
StreamingAverage accumulator; replies are folded as they arrive, never held.
Every random choice is drawn from a seed derived from (seed, round, client), so
a run resumed from a checkpoint computes the same model, bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import adapter, checkpoint
from .client import ClientTimeout, LocalConfig, derive_seed, evaluate, local_train
from .config import RunConfig, config_differences, local_config, parse_method, resolve_device
from .data import DataBundle, InputSpec, InputTransform, input_transform_for, load_dataset
from .partition import class_counts, make_partition
from .metrics import CSV_FIELDS, jsonable, summarize, write_metrics  # noqa: F401
from .strategy import AggregateStats, make_strategy

log = logging.getLogger("fedsq_fast.federation")

# Stream ids for derive_seed: one independent stream per kind of random choice.
_SPLIT, _PART, _MODEL, _SAMPLE, _FAIL, _CLIENT = 1, 2, 3, 4, 5, 6


@dataclass
class FedData:
    """Everything data-related that all methods of one (dataset, seed, partition) share."""

    x: torch.Tensor  # client pool, resized
    y: torch.Tensor
    parts: list  # per client: contiguous index ranges into x, y (the pool is stored client by client)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    probe: torch.Tensor  # fixed batch for gate stability
    transform: InputTransform
    num_classes: int
    classes: tuple = ()
    counts: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return self.x.device

    _TENSORS = ("x", "y", "val_x", "val_y", "test_x", "test_y", "probe")

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self._TENSORS)

    def to(self, device) -> "FedData":
        """A copy with every tensor on ``device`` (the same object when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        mv = {f: getattr(self, f).to(device) for f in self._TENSORS}
        return dataclasses.replace(self, **mv, transform=copy.deepcopy(self.transform).to(device))


def place_data(data: FedData, device) -> FedData:
    """``data`` on ``device`` when it takes at most half the GPU's free memory; otherwise
    the splits stay in host memory and each batch is copied as it is used (only the probe
    batch moves)."""
    device = torch.device(device)
    if data.device == device or data.probe.device == device:
        return data
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if data.nbytes > free // 2:
            log.warning("data (%.1f GB) kept in host memory: more than half of %s's free %.1f GB; "
                        "batches are copied as used", data.nbytes / 1e9, device, free / 1e9)
            return dataclasses.replace(data, probe=data.probe.to(device))
    return data.to(device)


def prepare_data(cfg: RunConfig, bundle: DataBundle | None = None, model_name: str | None = None,
                 *, input_spec: InputSpec | None = None, model=None) -> FedData:
    """Load, split (server validation / client pool), subsample, resize and partition;
    the tensors end on ``cfg.device`` when they fit (:func:`place_data`), which saves a
    host-to-device copy per batch.

    The model's input spec (channels, size, normalisation) is, in order: ``input_spec``,
    what ``model`` states (:func:`~fedsq_fast.federation.data.input_spec_of`), the zoo spec
    of ``model_name`` or ``cfg.model``. ``bundle``: your own data (:func:`make_bundle`);
    default: ``cfg.dataset`` loaded from its source."""
    bundle = bundle if bundle is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    tr = bundle.train
    n = len(tr)
    if cfg.val_size >= n:
        raise ValueError(f"val_size ({cfg.val_size}) must be smaller than the training data ({n} samples)")
    perm = np.random.default_rng(derive_seed(cfg.seed, _SPLIT)).permutation(n)
    val_idx = perm[:cfg.val_size]
    pool_idx = perm[cfg.val_size:]
    if cfg.max_train_samples is not None:
        pool_idx = pool_idx[:cfg.max_train_samples]
    need = cfg.num_clients * max(1, cfg.min_partition_size if cfg.partition in ("dirichlet", "quantity") else 1)
    if need > len(pool_idx):
        raise ValueError(f"num_clients: {cfg.num_clients} clients need at least {need} samples in the client pool, "
                         f"which holds {len(pool_idx)} ({n} training samples - val_size {cfg.val_size}"
                         + (f", capped by max_train_samples {cfg.max_train_samples}" if cfg.max_train_samples else "")
                         + "); lower num_clients, min_partition_size or val_size")
    te = bundle.test
    te_idx = np.random.default_rng(derive_seed(cfg.seed, _SPLIT, 1)).permutation(len(te))
    if cfg.max_test_samples is not None:
        te_idx = te_idx[:cfg.max_test_samples]
    tf = input_transform_for(model_name or cfg.model, model=model, image_size=cfg.image_size,
                             data_channels=tr.x.shape[1], spec=input_spec)
    pool, val, test = tr.subset(pool_idx), tr.subset(val_idx), te.subset(te_idx)
    parts = make_partition(cfg.partition, pool.y.numpy(), cfg.num_clients, alpha=cfg.alpha,
                           min_partition_size=cfg.min_partition_size,
                           shards_per_client=cfg.shards_per_client,
                           seed=derive_seed(cfg.seed, _PART))
    warn_little_data(cfg, n, [len(p) for p in parts])
    counts = class_counts(pool.y.numpy(), parts, tr.num_classes)
    # Store the pool client by client: a client's data is then a view (no gather per round).
    order = torch.from_numpy(np.concatenate(parts))
    ends = np.cumsum([len(p) for p in parts])
    parts = [np.arange(e - len(p), e) for p, e in zip(parts, ends)]
    vx = tf.resize(val.x)
    data = FedData(tf.resize(pool.x[order]), pool.y[order], parts, vx, val.y, tf.resize(test.x), test.y,
                   vx[:cfg.probe_size], tf, tr.num_classes, tr.classes, counts)
    return place_data(data, resolve_device(cfg.device))


def warn_little_data(cfg: RunConfig, n_train: int, sizes: list) -> list[str]:
    """Warn (and return the messages) when the config leaves clients too little to learn
    from: the median client gets less than one batch per round, or the server's validation
    split takes most of the training data. Training still runs: small federations are
    legitimate, silent ones that cannot learn are not."""
    msgs = []
    med = float(np.median(sizes)) if len(sizes) else 0.0
    if med * cfg.local_epochs < cfg.batch_size:
        msgs.append(f"the median client holds {med:g} samples: with batch_size={cfg.batch_size} and "
                    f"local_epochs={cfg.local_epochs} that is about one optimizer step per client per round, "
                    "too few to learn; lower batch_size or num_clients, raise local_epochs, or give the "
                    "clients more data (val_size takes the server's validation split first)")
    if cfg.val_size > n_train // 2:
        msgs.append(f"val_size={cfg.val_size} takes {100 * cfg.val_size / n_train:.0f}% of the {n_train} training "
                    "samples for the server's validation split; lower it so the clients keep most of the data")
    for m in msgs:
        warnings.warn(m, UserWarning, stacklevel=3)
    return msgs


def call_model_fn(model_fn, seed: int):
    """``model_fn()`` with torch's RNG seeded from the run's seed: every method (and a resumed
    run) starts from the same initial model even when model_fn draws a random init."""
    torch.manual_seed(derive_seed(seed, _MODEL))
    return model_fn()


def build_method_model(cfg: RunConfig, dual: bool, data: FedData) -> nn.Module:
    """The zoo model of ``cfg.model``, the same initial model (same head init) for every
    method; :func:`adapter.method_model` then converts it for fedsq methods."""
    torch.manual_seed(derive_seed(cfg.seed, _MODEL))
    return adapter.build_model(cfg.model, data.num_classes, cfg.weights,
                               in_channels=data.transform.channels,
                               image_size=int(data.x.shape[-1]))


def _progress(iterable=None, **kw):
    """A tqdm bar on a terminal; disabled (no output) when quiet or when stderr is not a
    terminal (there one line per round is logged instead: :meth:`Federation.run`)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=kw.pop("quiet", False) or not sys.stderr.isatty(), **kw)


def _round_line(method: str, rec: dict, rounds: int, rounds_left: int, per_round_s: float) -> str:
    """The per-round progress line written where no bar can be drawn (logs, CI, notebooks)."""
    eta = per_round_s * rounds_left
    return (f"[{method}] round {rec['round']}/{rounds}: val_acc {rec['val_acc']:.4f} (best "
            f"{rec['best_val_acc']:.4f}), {rec['clients_ok']}/{rec['clients_sampled']} clients, "
            f"{rec['time_round_s']:.1f} s, ETA {eta:.0f} s")


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
    from .config import strategy_from_config

    return strategy_from_config(cfg, method)


def client_seed(seed: int, rnd: int, cid: int) -> int:
    """Seed of client ``cid``'s local training in round ``rnd`` (same on every runtime)."""
    return derive_seed(seed, rnd, _CLIENT, cid)


def failure_draws(seed: int, rnd: int, n: int) -> np.ndarray:
    """Uniform draws deciding the simulated failures of a round's n sampled clients."""
    return np.random.default_rng(derive_seed(seed, rnd, _FAIL)).random(n)


class Federation:
    """One method (strategy, DualCopy or not, structural schedule) on one FedData.

    ``model_fn()`` builds the initial model (default: :func:`build_method_model`);
    ``client_hook(round, client, state) -> state`` lets tests corrupt a reply.
    """

    def __init__(self, cfg: RunConfig, method: str, data: FedData, model_fn=None,
                 out_dir=None, client_hook=None, quiet: bool = False, callbacks=()):
        self.callbacks = list(callbacks)
        self.cfg = cfg
        self.method = method
        self.strategy_name, self.dual, self.ablation, self.every = parse_method(method)
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.client_hook = client_hook
        self.quiet = quiet
        self.strategy = make_method_strategy(cfg, method)
        self.device = resolve_device(cfg.device)
        self.data = data = place_data(data, self.device)
        # No silent fallback: a fedsq method always trains a DualCopy model (adapter.method_model).
        source = "model_fn" if model_fn is not None else f"model {cfg.model!r}"
        if model_fn is not None:
            adapter.check_model_fn(model_fn)
        model = call_model_fn(model_fn, cfg.seed) if model_fn is not None else build_method_model(cfg, self.dual, data)
        if model_fn is not None and isinstance(model, nn.Module) and not (self.dual and not adapter.is_dualcopy(model)):
            model = copy.deepcopy(model)  # a model_fn that returns one shared object must not leak training across methods
        model, self.model_info = adapter.method_model(model, method, self.dual, quant_bn=cfg.quant_bn,
                                                      allow_ungated=cfg.allow_ungated, source=source)
        self.model = model.to(self.device)
        adapter.check_model_io(self.model, data.val_x, data.transform, data.num_classes, source)
        if self.ablation and not callable(getattr(self.model, "set_structural_from_quantitative", None)):
            raise ValueError(f"methods: {method!r} needs DualCopyModel.set_structural_from_quantitative(), "
                             "which this model does not have")
        self.initial = copy.deepcopy(self.model)  # gate-stability reference (round 0)
        self._new_worker()
        self.local_states: dict[int, dict] = {}
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.payload_bytes = adapter.state_bytes(adapter.payload_state(self.model))
        self.full_bytes = adapter.state_bytes(self.model.state_dict())

    # ------------------------------------------------------------------ pieces
    def _new_worker(self) -> None:
        """The model clients train in, and fresh mask caches (FedSQ) for the current
        structural copy: one over the client pool (worker), one over the validation
        split (global model; validation is then one quantitative forward)."""
        if getattr(self.model, "mask_cache", None) is not None:
            self.model.attach_cache(None)  # not deep-copied into the worker
        self.worker = copy.deepcopy(self.model)
        self.cache = None
        if self.cfg.mask_cache and callable(getattr(self.worker, "attach_cache", None)):
            mm = adapter.models_module()
            # 'partial': samples beyond the 1 GiB budget are recomputed, never an error
            self.cache = mm.MaskCache(len(self.data.y), max_bytes=1 << 30, policy="partial")
            self.worker.attach_cache(self.cache)
            self.model.attach_cache(mm.MaskCache(len(self.data.val_y), max_bytes=1 << 30, policy="partial"))

    @property
    def ckpt_path(self):
        return None if self.out_dir is None else self.out_dir / "checkpoint.safetensors"

    def local_config(self, rnd: int) -> LocalConfig:
        return local_config(self.cfg, self.strategy.client_config(rnd).get("prox_mu", 0.0))

    def sample_clients(self, rnd: int) -> list[int]:
        k = self.cfg.num_clients
        m = min(k, max(self.cfg.min_clients, math.ceil(self.cfg.fraction * k - 1e-9)))
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, _SAMPLE))
        return sorted(int(i) for i in rng.choice(k, m, replace=False))  # fixed client order

    def _structural_update(self, rnd: int) -> bool:
        """Ablations: replace the structural copy by the global quantitative copy."""
        if not self.ablation:
            return False
        due = (rnd > self.every) if self.ablation == "unfreeze" else (rnd > 1 and (rnd - 1) % self.every == 0)
        if due:
            self.model.set_structural_from_quantitative()
            self._new_worker()
        return due

    def evaluate(self, x=None, y=None):
        """Validation split by default (with the FedSQ mask cache), else (x, y)."""
        idx = None
        if x is None:
            x, y = self.data.val_x, self.data.val_y
            if getattr(self.model, "mask_cache", None) is not None:
                idx = torch.arange(len(y))
        return evaluate(self.model, x, y, self.data.transform, self.cfg.eval_batch_size, idx)

    def _gates(self) -> list[float]:
        try:
            return adapter.gate_stability(self.initial, self.model, self.data.transform(self.data.probe))
        except Exception as e:  # a metric must not stop training
            log.warning("gate stability failed: %s", e)
            return []

    # ------------------------------------------------------------------ round
    def train_client(self, rnd: int, cid: int, glob: dict, lcfg: LocalConfig | None = None) -> tuple[dict, dict]:
        """One client's local step (worker model, mask cache, data slice, seed derived
        from (seed, round, client)): returns (payload state, local_train info).
        ``lcfg``: the local options (default: this round's, from the run config)."""
        start = glob if cid not in self.local_states else {**glob, **self.local_states[cid]}
        adapter.load_payload(self.worker, start)
        part = self.data.parts[cid]
        idx = torch.from_numpy(part)
        sl = slice(int(part[0]), int(part[-1]) + 1) if len(part) else slice(0, 0)
        info = local_train(self.worker, self.data.x[sl], self.data.y[sl], lcfg or self.local_config(rnd),
                           client_seed(self.cfg.seed, rnd, cid), self.data.transform,
                           idx if self.cache is not None else None)
        return adapter.payload_state(self.worker), info

    def client_replies(self, rnd: int, glob: dict, targets: list, dropped: list, acc: dict, bar=None):
        """Yield ``(client id, state, num_samples)`` for the round's clients: here by
        training them in process; the Flower path overrides this to ask SuperNodes.
        Failures go to ``dropped`` with the reason; ``acc`` collects compute time,
        bytes and losses."""
        local_keys = self.strategy.local_keys(glob)
        for cid in targets:
            try:
                state, info = self.train_client(rnd, cid, glob)
                if self.client_hook is not None:  # tests: a client that crashes or corrupts
                    state = self.client_hook(rnd, cid, state)
            except ClientTimeout as e:
                dropped.append((cid, str(e)))
                log.info("round %d: client %d dropped: %s", rnd, cid, e)
                continue
            except Exception as e:  # a failing client leaves the round, not the run
                dropped.append((cid, f"error: {type(e).__name__}: {e}"))
                log.warning("round %d: client %d dropped: %r", rnd, cid, e)
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            acc["client_s"] += info["seconds"]
            acc["up"] += adapter.state_bytes(state) if isinstance(state, dict) else 0
            acc["loss"] += info["loss"] * info["num_samples"]
            acc["n"] += info["num_samples"]
            if local_keys:
                self.local_states[cid] = {k: state[k].detach().clone() for k in local_keys}
            yield cid, state, info["num_samples"]

    def run_round(self, rnd: int, bar=None) -> dict:
        t0 = time.perf_counter()
        refreshed = self._structural_update(rnd)
        glob = adapter.payload_state(self.model)
        chosen = self.sample_clients(rnd)
        fails = failure_draws(self.cfg.seed, rnd, len(chosen)) < self.cfg.failure_rate
        dropped, targets = [], []
        for cid, fail in zip(chosen, fails):
            if fail:
                dropped.append((cid, "simulated failure (failure_rate)"))
                log.info("round %d: client %d dropped: simulated failure", rnd, cid)
            else:
                targets.append(cid)
        acc = {"client_s": 0.0, "up": 0, "loss": 0.0, "n": 0, "sent": len(chosen)}
        stats = AggregateStats()
        new = self.strategy.aggregate(glob, self.client_replies(rnd, glob, targets, dropped, acc, bar), stats)
        for cid, reason in stats.rejected:
            dropped.append((cid, f"update rejected: {reason}"))
            log.warning("round %d: client %d update rejected: %s", rnd, cid, reason)
        if stats.rolled_back:
            log.error("round %d: aggregate discarded, global model kept: %s", rnd, stats.rolled_back)
        skipped = stats.num_clients < self.cfg.min_clients
        if skipped:
            log.warning("round %d: %d valid updates < min_clients (%d): global model kept",
                        rnd, stats.num_clients, self.cfg.min_clients)
        else:
            adapter.load_payload(self.model, new)
        t_eval = time.perf_counter()
        vloss, vacc = self.evaluate()
        gates = self._gates()
        t_end = time.perf_counter()
        rec = {
            "round": rnd, "val_loss": vloss, "val_acc": vacc,
            "train_loss": acc["loss"] / acc["n"] if acc["n"] else float("nan"),
            "clients_sampled": len(chosen), "clients_ok": stats.num_clients,
            "clients_dropped": [[int(c), r] for c, r in sorted(dropped)], "round_skipped": skipped,
            "rolled_back": stats.rolled_back,
            "samples": stats.num_samples, "client_drift": stats.client_drift,
            "update_norm": stats.update_norm,
            "gate_change": float(np.mean(gates)) if gates else float("nan"),
            "gate_change_sites": gates, "structural_refreshed": refreshed,
            "bytes_up": acc["up"], "bytes_down": acc["sent"] * self.payload_bytes,
            "time_client_s": acc["client_s"], "time_eval_s": t_end - t_eval,
            "time_round_s": t_end - t0,
        }
        rec["time_other_s"] = rec["time_round_s"] - rec["time_client_s"]
        rec["time_engine_s"] = rec["time_other_s"] - rec["time_eval_s"]
        log.info("round %d: val_acc %.4f, %d/%d clients, dropped %s", rnd, vacc, stats.num_clients,
                 len(chosen), rec["clients_dropped"])
        return rec

    # ------------------------------------------------------------------ run
    def _round0(self) -> dict:
        t0 = time.perf_counter()
        vloss, vacc = self.evaluate()
        return {"round": 0, "val_loss": vloss, "val_acc": vacc, "train_loss": float("nan"),
                "clients_sampled": 0, "clients_ok": 0, "clients_dropped": [], "round_skipped": False,
                "rolled_back": None,
                "samples": 0, "client_drift": float("nan"), "update_norm": float("nan"),
                "gate_change": 0.0, "gate_change_sites": [], "structural_refreshed": False,
                "bytes_up": 0, "bytes_down": 0, "time_client_s": 0.0,
                "time_eval_s": time.perf_counter() - t0, "time_round_s": time.perf_counter() - t0,
                "time_other_s": time.perf_counter() - t0, "time_engine_s": 0.0}

    def _annotate(self, rec):
        prev = self.history[-1] if self.history else None
        best = prev["best_val_acc"] if prev else -1.0
        if rec["val_acc"] > best:
            rec["best_val_acc"], rec["best_round"] = rec["val_acc"], rec["round"]
        else:
            rec["best_val_acc"], rec["best_round"] = best, prev["best_round"]
        self.elapsed += rec["time_round_s"]
        rec["elapsed_s"] = self.elapsed

    def save_checkpoint(self, rnd: int) -> None:
        if self.ckpt_path is None or not self.cfg.checkpoint:
            return
        local = {f"{cid}/{k}": t for cid, d in self.local_states.items() for k, t in d.items()}
        # the file being replaced becomes the fallback only when it is known to be good
        checkpoint.save(self.ckpt_path,
                        {"model": self.model.state_dict(), "server": self.strategy.state_dict(),
                         "local": local},
                        {"round": rnd, "method": self.method, "config": self.cfg.to_dict(),
                         "history": self.history, "elapsed": self.elapsed},
                        keep_previous=self._ckpt_good)
        self._ckpt_good = True

    _ckpt_good = False  # is the checkpoint file on disk one this run wrote or verified?

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
        self._new_worker()
        self.strategy.load_state_dict({k: t.to(self.device) for k, t in groups.get("server", {}).items()})
        self.local_states = {}
        for k, t in groups.get("local", {}).items():
            cid, _, key = k.partition("/")
            self.local_states.setdefault(int(cid), {})[key] = t.to(self.device)
        self.history = meta["history"]
        self.elapsed = meta["elapsed"]
        rng_t = {"rng/torch": groups["rng"]["torch"]} if "rng" in groups else {}
        checkpoint.set_rng_state(rng_t, meta.get("rng", {}))
        self._ckpt_good = path == self.ckpt_path  # a damaged latest file is overwritten, never kept
        return int(meta["round"])

    def run(self, resume: bool = False, stop_after: int | None = None) -> RunResult:
        """Run all rounds (``stop_after``: stop early, as if interrupted; for tests)."""
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        start = 1
        if resume and self.ckpt_path is not None and (
                self.ckpt_path.exists() or checkpoint.previous(self.ckpt_path).exists()):
            start = self.load_checkpoint() + 1
            log.info("%s: resumed after round %d", self.method, start - 1)
        if not self.history:
            rec = self._round0()
            self._annotate(rec)
            self.history.append(rec)
        last = self.cfg.rounds if stop_after is None else min(self.cfg.rounds, stop_after)
        rbar = _progress(total=self.cfg.rounds, initial=start - 1, desc=self.method, unit="round",
                         quiet=self.quiet, leave=False)
        lines = not self.quiet and rbar.disable  # no bar drawn: one line per round instead
        t_start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_run_start(self, start)
        try:
            for rnd in range(start, last + 1):
                for cb in self.callbacks:
                    cb.on_round_start(self, rnd)
                with _progress(total=len(self.sample_clients(rnd)), desc=f"round {rnd}", unit="client",
                               quiet=self.quiet, leave=False) as cbar:
                    rec = self.run_round(rnd, cbar)
                self._annotate(rec)
                for cb in self.callbacks:
                    cb.on_round_end(self, rec)
                self.history.append(rec)
                t = time.perf_counter()
                self.save_checkpoint(rnd)
                rec["time_checkpoint_s"] = time.perf_counter() - t
                rbar.update(1)
                rbar.set_postfix(acc=f"{rec['val_acc']:.3f}")
                if lines:
                    per_round = (time.perf_counter() - t_start) / (rnd - start + 1)
                    print(_round_line(self.method, rec, self.cfg.rounds, last - rnd, per_round),
                          file=sys.stderr, flush=True)
        finally:
            rbar.close()
        summary = summarize(self.history, self.cfg.target_accuracy)
        summary.update(method=self.method, device=str(self.device), payload_bytes=self.payload_bytes,
                       full_model_bytes=self.full_bytes, complete=last == self.cfg.rounds,
                       model=self.model_info)
        if last == self.cfg.rounds:
            _, summary["test_acc"] = self.evaluate(self.data.test_x, self.data.test_y)
        if self.out_dir is not None:
            write_metrics(self.out_dir, self.method, self.cfg, self.history, summary)
        result = RunResult(self.method, self.history, summary, self.out_dir, self.model)
        for cb in self.callbacks:
            cb.on_run_end(self, result)
        return result
