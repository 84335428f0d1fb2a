"""The client side of a federation: what a client holds and does, nothing of the server.

A :class:`ClientTrainer` holds the clients' data (the whole pool in process, or one
partition on a Flower SuperNode), one worker model (for FedSQ the DualCopy model: its
frozen structural copy and, with ``mask_cache``, the per-sample gate masks), FedBN's
personal layers, and runs :func:`~fedsq_fast.federation.client.local_train` with the seed
derived from (seed, round, client). The same trainer serves every transport, so a client
computes the same update wherever it runs.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..models import MaskCache
from . import adapter
from .client import LocalConfig, evaluate, local_train
from .config import MethodSpec, resolve_device, strategy_from_config
from .lazy import is_lazy, is_random
from .prepare import build_method_model, prepare_data
from .seeds import client_seed

# RAM for a mask cache's rows; those of samples beyond it spill to a temporary memmap file
# (MaskCache policy 'spill'; removed when the run ends), never an error
MASK_CACHE_BYTES = 1 << 30


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its mask cache (a cache belongs to one model)."""
    cache = getattr(model, "mask_cache", None)
    if cache is not None:
        model.attach_cache(None)
    try:
        return copy.deepcopy(model)
    finally:
        if cache is not None:
            model.attach_cache(cache)


def new_mask_cache(model: nn.Module, num_samples: int):
    """A fresh per-sample mask cache attached to ``model`` when it takes one (DualCopy): rows
    past :data:`MASK_CACHE_BYTES` spill to a temporary file (:meth:`MaskCache.close`
    removes it; the engine closes its caches when a run ends)."""
    if not callable(getattr(model, "attach_cache", None)):
        return None
    old = getattr(model, "mask_cache", None)
    if old is not None:
        old.close()
    cache = engine_mask_cache(num_samples)
    model.attach_cache(cache)
    return cache


def engine_mask_cache(num_samples: int) -> MaskCache:
    """A mask cache as the engine makes them (unattached): rows past :data:`MASK_CACHE_BYTES`
    spill to a temporary file; inputs that change between reads (a random transform the
    load-time check missed) make it step aside (logged) instead of failing the run: masks are
    then computed per batch."""
    return MaskCache(num_samples, max_bytes=MASK_CACHE_BYTES, policy="spill", on_change="step_aside")


class ClientTrainer:
    """Local training for the clients whose data it holds.

    ``model``: the method's initial model (copied unless ``own_model``); ``x``, ``y``: the
    clients' samples stored client by client; ``parts``: client id -> contiguous index range
    into x (a list indexed by id in process, a one-entry dict on a SuperNode); ``seed``: the
    run's seed; ``local_keys(state)``: the payload keys a client keeps (FedBN's layers).
    ``transform.augment`` (the run's augmentation, or None) is applied to every training
    batch. The mask cache steps aside (``cache`` None, ``cache_off`` says why) where training
    batches change between reads: augmentation, or data read through random transforms.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, parts, transform, *,
                 seed: int, mask_cache: bool = True, local_keys=None, own_model: bool = False, privacy=None,
                 test=None):
        self.privacy = privacy  # distributed DP: (rnd, cid, glob, state) -> clipped and noised state
        self.x, self.y, self.parts, self.transform, self.seed = x, y, parts, transform, seed
        self.test = test  # (x, y, parts) of the clients' test splits (federated evaluation), or None
        self.augment = getattr(transform, "augment", None)
        self.cache_off = (f"augment {self.augment.name!r}" if self.augment is not None
                          else "random training data" if is_random(x) else None) if mask_cache else None
        self.use_cache = mask_cache and self.cache_off is None
        self.local_keys = local_keys or (lambda state: set())
        self.local_states: dict[int, dict] = {}
        self.reset(model, own_model)

    def reset(self, model: nn.Module, own_model: bool = False) -> None:
        """Train from ``model``'s structural copy from now on (a refreshed structural copy
        invalidates every cached mask)."""
        if getattr(self, "cache", None) is not None:
            self.cache.close()  # its spill file goes now, not when the old model is collected
        self.worker = model if own_model else detached_copy(model)
        self.cache = new_mask_cache(self.worker, len(self.y)) if self.use_cache else None

    def close(self) -> None:
        """Empty the mask cache and remove its spill file (it refills if training goes on)."""
        if self.cache is not None:
            self.cache.close()

    def train(self, rnd: int, cid: int, glob: dict, lcfg: LocalConfig) -> tuple[dict, dict]:
        """Client ``cid``'s local step from the global payload ``glob`` (with its own layers,
        FedBN): returns (payload state, local_train info); under distributed DP the state
        is the clipped and noised one (:func:`.privacy.client_privacy`)."""
        start = glob if cid not in self.local_states else {**glob, **self.local_states[cid]}
        adapter.load_payload(self.worker, start)
        part = self.parts[cid]
        sl = slice(int(part[0]), int(part[-1]) + 1) if len(part) else slice(0, 0)
        idx = torch.from_numpy(np.asarray(part)) if self.cache is not None else None
        info = local_train(self.worker, self.x[sl], self.y[sl], lcfg, client_seed(self.seed, rnd, cid),
                           self.transform, idx, augment=self.augment)
        state = adapter.payload_state(self.worker)
        if self.privacy is not None:
            state = self.privacy(rnd, cid, glob, state)
        return state, info

    def evaluate(self, cid: int, glob: dict, batch_size: int = 512, precision: str = "fp32") -> tuple:
        """Client ``cid``'s evaluation of the global payload ``glob`` (with its own layers,
        FedBN) on its test split: (samples, mean loss, accuracy). A DualCopy worker gates the
        global quantitative copy with its structural copy on the client's inputs (no mask
        cache: the cache holds the training samples' masks). Federated evaluation
        (:mod:`.evaluation`); every transport calls this."""
        if self.test is None:
            raise ValueError(f"client {cid} holds no test split (client_test_fraction = 0)")
        tx, ty, tparts = self.test
        start = glob if cid not in self.local_states else {**glob, **self.local_states[cid]}
        adapter.load_payload(self.worker, start)
        part = tparts[cid]
        sl = slice(int(part[0]), int(part[-1]) + 1) if len(part) else slice(0, 0)
        y = ty[sl]
        loss, acc = evaluate(self.worker, tx[sl], y, self.transform, batch_size, None, precision)
        return int(y.numel()), loss, acc

    def keep_local(self, cid: int, glob: dict, state) -> None:
        """Store client ``cid``'s own layers (FedBN: the payload's normalisation layers) from
        the state it sent (a state without them keeps the previous ones)."""
        keys = self.local_keys(glob)
        if keys and isinstance(state, dict) and all(k in state for k in keys):
            self.local_states[cid] = {k: state[k].detach().clone() for k in keys}


def client_trainer(cfg, method: str, cid: int, data=None, model: nn.Module | None = None) -> ClientTrainer:
    """The trainer of one client, built from the run's config alone (a Flower SuperNode): the
    data split and partitioned as the server does it (same seeds), then only this client's
    samples kept; the method's initial model (pretrained weights; for FedSQ its DualCopy
    model and structural copy) built once and trained in place. ``model``: that model, built
    by an earlier call with the same config and method (a process serving several partitions
    reuses it: every step loads the global payload first, and the structural copy is fixed)."""
    dual = MethodSpec.parse(method).dual
    data = prepare_data(cfg) if data is None else data
    if not 0 <= cid < len(data.parts):
        raise ValueError(f"client {cid} is not a client of this run (num_clients {len(data.parts)})")
    part = data.parts[cid]
    sl = slice(int(part[0]), int(part[-1]) + 1) if len(part) else slice(0, 0)
    x, y = data.x[sl], data.y[sl].clone()  # the pool itself is dropped with ``data``
    x = x if is_lazy(x) else x.clone()  # a lazy view holds its index map, not the pool's images
    if model is None:
        model = build_method_model(cfg, dual, data)
        model, _ = adapter.method_model(model, method, dual, quant_bn=cfg.quant_bn,
                                        allow_ungated=cfg.allow_ungated, soft_gates=cfg.soft_gates,
                                        source=f"model {cfg.model!r}")
    device = resolve_device(cfg.device)
    from .privacy import client_privacy

    test = None
    if getattr(data, "ctest_parts", None) is not None:  # federated evaluation: this client's test split
        tp = data.ctest_parts[cid]
        tsl = slice(int(tp[0]), int(tp[-1]) + 1) if len(tp) else slice(0, 0)
        tx = data.ctest_x[tsl]
        tx = tx if is_lazy(tx) else tx.clone().to(device)
        test = (tx, data.ctest_y[tsl].clone().to(device), {cid: np.arange(len(tp))})
    # a real client (a SuperNode): its DP noise from OS entropy, which the server cannot replay
    return ClientTrainer(model.to(device), x.to(device), y.to(device), {cid: np.arange(len(y))}, data.transform.to(device),
                         seed=cfg.seed, mask_cache=cfg.mask_cache,
                         local_keys=strategy_from_config(cfg, method).local_keys, own_model=True, test=test,
                         privacy=client_privacy(cfg, seeded=False))
