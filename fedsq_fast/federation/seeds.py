"""Every random choice of a run, drawn from a seed derived from (seed, stream, ...).

One independent stream per kind of choice, so a run resumed from a checkpoint, a run on
Flower and a run in process draw the same numbers: the same split, partition, initial
model, sampled clients, simulated failures and client shuffles.
"""
from __future__ import annotations

import math

import numpy as np

from .client import derive_seed

# Stream ids (recorded runs depend on them: never renumber)
SPLIT, PART, MODEL, SAMPLE, FAIL, CLIENT = 1, 2, 3, 4, 5, 6
CLIENT_TEST = 7  # each client's local test split (federated evaluation)
DP_NOISE, DP_COUNT, DP_CLIENT = 10, 11, 12  # DP (federation/privacy.py): server noise, clipped-count noise, client noise


def client_seed(seed: int, rnd: int, cid: int) -> int:
    """Seed of client ``cid``'s local training in round ``rnd`` (same on every runtime)."""
    return derive_seed(seed, rnd, CLIENT, cid)


def failure_draws(seed: int, rnd: int, n: int) -> np.ndarray:
    """Uniform draws deciding the simulated failures of a round's n sampled clients."""
    return np.random.default_rng(derive_seed(seed, rnd, FAIL)).random(n)


def sample_size(cfg) -> int:
    """How many clients a round samples: ``fraction`` of ``num_clients``, at least
    ``min_clients``, at most all."""
    k = cfg.num_clients
    return min(k, max(cfg.min_clients, math.ceil(cfg.fraction * k - 1e-9)))


def sample_clients(cfg, rnd: int) -> list[int]:
    """The clients of round ``rnd``: ``fraction`` of ``num_clients`` (at least ``min_clients``),
    in increasing id order (the order replies are folded in). Under DP with
    ``dp_sampling = 'poisson'``: each client independently with probability ``fraction``
    (:func:`.privacy.poisson_clients`; a round may sample none)."""
    if getattr(cfg, "dp", "none") != "none" and cfg.dp_sampling == "poisson":
        from .privacy import poisson_clients

        return poisson_clients(cfg.seed, rnd, cfg.num_clients, cfg.fraction)
    k = cfg.num_clients
    m = sample_size(cfg)
    rng = np.random.default_rng(derive_seed(cfg.seed, rnd, SAMPLE))
    return sorted(int(i) for i in rng.choice(k, m, replace=False))
