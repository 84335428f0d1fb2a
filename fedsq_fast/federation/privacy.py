"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): opt-in, beyond the paper.

Each client's update ``delta = w_k - w_global`` (the floating tensors of its reply: for FedSQ
the quantitative copy, the only copy that travels) is clipped to L2 norm ``C``; the server
sums the clipped updates, adds Gaussian noise of standard deviation ``z C`` to the sum
(``central``) or each client adds ``z C / sqrt(expected cohort)`` before sending
(``distributed``), and divides by a fixed denominator (the expected cohort), never by the
count of replies or by sample counts: both would make the release depend on one client
beyond its clipped update. Clipping is fixed or adaptive (Andrew et al. 2021: ``C`` follows a
target quantile of the update norms through a noised count). The privacy spent is accounted
with dp-accounting's RDP accountant; decisions and the threat model: docs/privacy.md.

Sampling and adjacency, exactly as the accountant assumes them:

* ``poisson``: each client joins a round independently with probability ``q = fraction``
  (:func:`poisson_clients`); add-or-remove-one-client adjacency; the sum's L2 sensitivity
  is ``C``; ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
* ``fixed``: the engine's ``m`` of ``N`` clients without replacement; the accountant has
  this only under replace-one adjacency (``SampledWithoutReplacementDpEvent``), where
  replacing one client moves the sum by up to ``2C``: the event's multiplier is ``z / 2``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import secrets
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..ops import sq_dist
from .config.errors import ConfigError

DP_MODES = ("none", "central", "distributed")
DP_SAMPLINGS = ("poisson", "fixed")
# Calibration's upper end: a multiplier past this buries any update in noise (and the
# accountant's orders stop resolving epsilon there): a target needing more is refused.
MAX_NOISE_MULTIPLIER = 1000.0


class PrivacyError(ConfigError):
    """A DP setting that cannot be accounted for or met (one line, names the key)."""


def dp_keys(state: dict) -> list[str]:
    """The keys of a reply that form the clipped vector: every floating tensor (parameters
    and BatchNorm running statistics alike: all are functions of the client's data).
    Integer buffers (BatchNorm's ``num_batches_tracked``: a client's local step count) are
    not sent under DP: the server keeps the global model's."""
    return [k for k, t in state.items() if t.dtype.is_floating_point]


def clip_update(delta: dict, clip: float) -> tuple[dict, float]:
    """``delta`` scaled by ``min(1, clip / ||delta||)`` (the L2 norm over all its tensors,
    accumulated in float64), and that norm. A zero update stays zero."""
    sq = 0.0
    for t in delta.values():
        sq += float(torch.linalg.vector_norm(t.double()) ** 2) if t.numel() else 0.0
    norm = math.sqrt(sq)
    factor = 1.0 if norm <= clip else clip / norm
    if factor == 1.0:
        return dict(delta), norm
    return {k: (t.double() * factor).to(t.dtype) for k, t in delta.items()}, norm


def gaussian_like(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``t`` (drawn in float32 on the CPU from ``generator``,
    so the draw is the same on every device and transport, then moved to ``t``'s)."""
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    return noise.mul_(std).to(device=t.device, dtype=t.dtype)


def privatize_update(delta: dict, clip: float, noise_std: float, generator: torch.Generator) -> dict:
    """A client's side of distributed DP: ``delta`` (``{key: update tensor}``, floating
    tensors only, e.g. ``w_local - w_global`` over :func:`dp_keys`) clipped to L2 norm
    ``clip`` and then given N(0, ``noise_std``^2) noise per coordinate, keys in the given
    order. ``generator``: a ``torch.Generator`` (CPU); on a real client it must hold
    randomness the server does not know (:func:`private_generator`), else the server can
    subtract the noise. Returns the new delta; ``delta`` is left unchanged."""
    if not (isinstance(clip, (int, float)) and 0 < clip < math.inf):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not (isinstance(noise_std, (int, float)) and 0 <= noise_std < math.inf):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    for k, t in delta.items():
        if not t.dtype.is_floating_point:
            raise ValueError(f"delta[{k!r}] is {t.dtype}: only floating tensors are clipped and noised")
    clipped, _ = clip_update(delta, float(clip))
    return {k: t + gaussian_like(t, noise_std, generator) if noise_std else t for k, t in clipped.items()}


def private_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy (``secrets``): the noise of
    a real client, which nobody else can replay."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from (seed, round, stream, ...): simulation only, reproducible
    for any worker count and transport (and so known to whoever knows the run's seed)."""
    from .client import derive_seed

    return torch.Generator().manual_seed(derive_seed(*parts))


def poisson_clients(seed: int, rnd: int, num_clients: int, rate: float) -> list[int]:
    """Poisson sampling: each of ``num_clients`` joins round ``rnd`` independently with
    probability ``rate``, drawn from (seed, round, SAMPLE); increasing id order. May be empty."""
    from .client import derive_seed
    from .seeds import SAMPLE

    u = np.random.default_rng(derive_seed(seed, rnd, SAMPLE)).random(num_clients)
    return [int(i) for i in np.flatnonzero(u < rate)]


@contextlib.contextmanager
def _quiet_absl():
    # the RDP accountant logs one warning per fractional order it cannot resolve (it then
    # leaves that order out, which only loosens epsilon): not the user's concern
    lg = logging.getLogger("absl")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _dpa():
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - a requirement; the message says which
        raise PrivacyError("dp", "the privacy accountant needs the dp-accounting package "
                           f"(pip install dp-accounting; {e})") from None
    return dp_accounting


@dataclass(frozen=True)
class DPSettings:
    """A run's DP settings, checked (:func:`settings_from_config`).

    ``noise_multiplier`` (z): the noise's standard deviation on the summed update is
    ``z_update * clip`` with ``z_update = z`` under fixed clipping; under adaptive clipping
    z is the multiplier of the two queries together (update and clipped count, Andrew et
    al. 2021, Thm. 1): ``z_update = (z^-2 - (2 count_std)^-2)^-1/2``."""

    mode: str
    clip: float
    noise_multiplier: float
    sampling: str
    num_clients: int
    cohort: int  # fixed: the clients a round samples; poisson: unused (expected_cohort)
    rate: float  # q: poisson's probability, fixed's m / N
    delta: float
    rounds: int
    seed: int
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_std: float = 0.0
    target_epsilon: float | None = None
    calibrated: bool = False  # noise_multiplier set from target_epsilon

    @property
    def expected_cohort(self) -> float:
        """The fixed denominator of the average: q N (poisson), m (fixed)."""
        return self.rate * self.num_clients if self.sampling == "poisson" else float(self.cohort)

    @property
    def sensitivity_factor(self) -> int:
        """The sum's L2 sensitivity in units of ``clip``: 1 (add/remove), 2 (replace-one)."""
        return 1 if self.sampling == "poisson" else 2

    @property
    def update_multiplier(self) -> float:
        if not self.adaptive:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.count_std) ** -2) ** -0.5

    def client_noise_std(self, clip: float | None = None) -> float:
        """Distributed DP: each client's noise, so the sum over the expected cohort has
        standard deviation ``z clip``."""
        c = self.clip if clip is None else clip
        return self.update_multiplier * c / math.sqrt(self.expected_cohort)

    def event(self, noise_multiplier: float | None = None):
        """One round as a dp-accounting event (the multipliers in the sensitivity's units)."""
        dpa = _dpa()
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        s = self.sensitivity_factor
        if self.adaptive:
            zu = (z ** -2 - (2 * self.count_std) ** -2) ** -0.5
            inner = dpa.ComposedDpEvent([dpa.GaussianDpEvent(zu / s), dpa.GaussianDpEvent(2 * self.count_std / s)])
        else:
            inner = dpa.GaussianDpEvent(z / s)
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(self.rate, inner)
        return dpa.SampledWithoutReplacementDpEvent(self.num_clients, self.cohort, inner)

    def accountant(self):
        """A fresh dp-accounting RdpAccountant with the adjacency this sampling needs."""
        dpa = _dpa()
        rel = (dpa.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
               else dpa.NeighboringRelation.REPLACE_ONE)
        return dpa.rdp.RdpAccountant(neighboring_relation=rel)

    def epsilon(self, rounds: int, noise_multiplier: float | None = None) -> float:
        """(epsilon at ``delta``) after ``rounds`` rounds: the library's accountant, composed
        ``rounds`` times (0 rounds: 0)."""
        if rounds <= 0:
            return 0.0
        return _epsilon_curve(self, noise_multiplier)(rounds)


def _epsilon_curve(s: DPSettings, noise_multiplier: float | None):
    """epsilon(rounds) for one setting: the per-round RDP is computed once by the library's
    accountant and composed by multiplication (RDP composes additively), then converted with
    the library's compute_epsilon; identical to composing the accountant ``rounds`` times
    (tests/federation/test_privacy.py checks it against that)."""
    z = s.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
    return _curve(s.sampling, s.rate, s.num_clients, s.cohort, s.adaptive, s.count_std, s.delta, z)


@lru_cache(maxsize=256)
def _curve(sampling, rate, num_clients, cohort, adaptive, count_std, delta, z):
    dpa = _dpa()
    probe = DPSettings("central", 1.0, z, sampling, num_clients, cohort, rate, delta, 1, 0,
                       adaptive=adaptive, count_std=count_std)
    acct = probe.accountant()
    with _quiet_absl():
        acct.compose(probe.event(), 1)
    orders = np.asarray(acct._orders, dtype=float)
    rdp1 = np.asarray(acct._rdp, dtype=float)  # the accountant's own per-round RDP

    @lru_cache(maxsize=None)
    def eps(rounds: int) -> float:
        with _quiet_absl():
            return float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, rdp1 * rounds, delta)[0])

    return eps


@lru_cache(maxsize=64)
def calibrate_noise(s: DPSettings, target_epsilon: float, rounds: int, rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``, rounded up) whose epsilon after
    ``rounds`` rounds is at most ``target_epsilon``: bisection on the library's accountant.
    A target that needs more than :data:`MAX_NOISE_MULTIPLIER` (or, under adaptive clipping,
    more than the count query's 2 count_std allows) is a :class:`PrivacyError`."""
    top = MAX_NOISE_MULTIPLIER
    if s.adaptive:
        top = min(top, 2 * s.count_std * (1 - 1e-9))
    if s.epsilon(rounds, top) > target_epsilon:
        why = (f"adaptive clipping caps the noise multiplier below 2 x dp_clip_count_std = {2 * s.count_std:g}"
               if s.adaptive and top < MAX_NOISE_MULTIPLIER else
               f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon {s.epsilon(rounds, top):.4g}")
        raise PrivacyError("dp_target_epsilon", f"{target_epsilon:g} cannot be met over {rounds} rounds "
                           f"(delta {s.delta:g}, {s.sampling} sampling, rate {s.rate:.4g}): {why}")
    lo, hi = 0.0, 1.0
    while hi < top and s.epsilon(rounds, hi) > target_epsilon:
        lo, hi = hi, min(top, hi * 2)
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if mid > 0 and s.epsilon(rounds, mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def settings_from_config(cfg) -> DPSettings | None:
    """The checked DP settings of a RunConfig (None when ``dp`` is 'none'). Every refusal is
    a :class:`PrivacyError` naming the key, raised before any work: an unsupported pairing
    (a robust aggregator, an explicitly set norm_bound, adaptive clipping with distributed
    noise), a delta of 1 / num_clients or more, a target epsilon that no round can meet."""
    from .seeds import sample_size

    if cfg.dp == "none":
        return None
    n = cfg.num_clients
    sampling = cfg.dp_sampling
    m = sample_size(cfg)
    rate = float(cfg.fraction) if sampling == "poisson" else m / n
    if sampling == "poisson" and rate * n < 1:
        raise PrivacyError("fraction", f"{cfg.fraction} x num_clients {n} < 1 client expected per round; "
                           "poisson sampling divides by the expected cohort")
    if cfg.dp_delta >= 1.0 / n:
        raise PrivacyError("dp_delta", f"{cfg.dp_delta:g} must be below 1 / num_clients = {1.0 / n:.3g} "
                           "(a larger delta allows releasing one client's update outright)")
    count_std = 0.0
    if cfg.dp_adaptive_clip:
        count_std = (float(cfg.dp_clip_count_std) if cfg.dp_clip_count_std is not None
                     else (rate * n) / 20.0)  # Andrew et al. 2021: expected cohort / 20
    base = DPSettings(cfg.dp, float(cfg.dp_clip), 1.0, sampling, n, m, rate, float(cfg.dp_delta), cfg.rounds,
                      cfg.seed, adaptive=bool(cfg.dp_adaptive_clip), target_quantile=float(cfg.dp_target_quantile),
                      clip_lr=float(cfg.dp_clip_lr), count_std=count_std, target_epsilon=cfg.dp_target_epsilon)
    z = cfg.dp_noise_multiplier
    if z is None:
        z = calibrate_noise(base, cfg.dp_target_epsilon, cfg.rounds)
        calibrated = True
    else:
        z, calibrated = float(z), False
        if base.adaptive and z >= 2 * count_std:
            raise PrivacyError("dp_noise_multiplier", f"{z:g} must be below 2 x dp_clip_count_std = {2 * count_std:g} "
                               "under adaptive clipping (the count query takes the rest of the noise)")
        if cfg.dp_target_epsilon is not None:
            first = base.epsilon(1, z)
            if first > cfg.dp_target_epsilon:
                raise PrivacyError("dp_target_epsilon", f"{cfg.dp_target_epsilon:g} is spent by the first round "
                                   f"already (epsilon {first:.4g} with dp_noise_multiplier {z:g}); no round can run")
    return DPSettings(**{**base.__dict__, "noise_multiplier": z, "calibrated": calibrated})


class DPAggregator:
    """The server's side of DP-FedAvg, shared by every runtime (``Strategy.aggregate``).

    ``aggregate`` folds the valid replies (malformed and non-finite ones rejected first, as
    without DP) into ``global + (sum_k clip(delta_k) + noise) / expected cohort``; under
    ``distributed`` the replies are the clients' already clipped and noised updates and
    are summed as sent, and a secure sum (SecAgg+: the unweighted average of K clients'
    noised updates, which is all the server sees) counts as those K updates. Noise is drawn
    from (seed, round): the same for any worker count.
    ``clip``: the current clipping norm (adaptive clipping moves it after every round)."""

    def __init__(self, settings: DPSettings):
        self.s = settings
        self.clip = settings.clip

    def state_dict(self) -> dict:
        return {"dp.clip": torch.tensor(self.clip, dtype=torch.float64)} if self.s.adaptive else {}

    def load_state_dict(self, state: dict) -> None:
        if self.s.adaptive and "dp.clip" in state:
            self.clip = float(state["dp.clip"])

    def aggregate(self, global_state: dict, valid, stats, rnd: int) -> dict:
        """The new global state from ``valid`` (``(state, num_samples)`` or ``(state,
        num_samples, clients)`` of the replies that passed the checks, counted by the
        caller; ``clients``: how many clients' updates ``state`` averages without weights,
        1 for a client's own reply, K for a secure sum of K clients, distributed mode only);
        records ``stats.dp``."""
        from .seeds import DP_COUNT, DP_NOISE

        if rnd is None:
            raise ValueError("a DP aggregation needs the round number (its noise is drawn from (seed, round))")
        s, clip = self.s, self.clip
        keys = dp_keys(global_state)
        acc = {k: torch.zeros(global_state[k].shape, dtype=torch.float64, device=global_state[k].device)
               for k in keys}
        unclipped = 0.0  # sum over replies of (1[norm <= clip] - 1/2)
        folded, weight = 0, 0.0
        gl = [global_state[k] for k in keys]
        for state, _n, *many in valid:
            # sum_k f_k (w_k - w) = sum_k f_k w_k - (sum_k f_k) w: each reply folded straight into
            # the float64 accumulator (no model-sized temporary), its norm in one compiled pass
            clients = int(many[0]) if many else 1
            if clients < 1 or clients != 1 and s.mode != "distributed":
                raise ValueError(f"a reply standing for {clients} clients under dp = {s.mode!r}: only "
                                 "distributed DP sums clients' updates before the server (SecAgg+)")
            # a secure sum of K clients is their unweighted average: K x (average - w) is their sum
            f = float(clients)
            if s.mode == "central":
                norm = math.sqrt(sq_dist([state[k] for k in keys], gl))
                f = 1.0 if norm <= clip else clip / norm
                unclipped += (1.0 if norm <= clip else 0.0) - 0.5
            for k in keys:
                acc[k].add_(state[k], alpha=f)
            weight += f
            folded += clients
            del state
        for k, g in zip(keys, gl):
            acc[k].add_(g, alpha=-weight)
        zu = s.update_multiplier
        if s.mode == "central":
            std = zu * clip
            added = std
        else:
            # the clients' noise sums to zu C over the m sampled; a reply that did not arrive (a
            # failure, a rejected reply) took its share with it: the server adds that share back
            missing = max(0, s.cohort - folded)
            added = zu * clip * math.sqrt(missing / s.cohort)
            std = zu * clip
        if added > 0:
            g = seeded_generator(s.seed, rnd, DP_NOISE)
            for k in keys:  # the draw of gaussian_like (float32, CPU), added in place
                acc[k].add_(torch.randn(acc[k].shape, generator=g, dtype=torch.float32).to(acc[k].device),
                            alpha=added)
        denom = s.expected_cohort
        new = {}
        for k, t in global_state.items():
            if k in acc:
                v = acc[k].div_(denom).add_(t)
                if k.endswith("running_var"):
                    v.clamp_(min=0.0)  # post-processing: a noised variance can dip below zero
                new[k] = v.to(t.dtype)
            else:
                new[k] = t.clone()  # integer buffers: the global model's, never a client's
        info = {"clip": clip, "noise_std": std / denom}
        if s.adaptive:
            gc = seeded_generator(s.seed, rnd, DP_COUNT)
            noised = (unclipped + float(torch.randn((), generator=gc, dtype=torch.float64)) * s.count_std) / denom + 0.5
            self.clip = clip * math.exp(-s.clip_lr * (noised - s.target_quantile))
            info["unclipped_fraction"] = noised
        stats.dp = info
        return new


def client_privacy(cfg, seeded: bool = True):
    """What a client does to its update before sending it under distributed DP: a
    function ``(rnd, cid, glob, state) -> state`` (clip + noise of the floating tensors'
    update against ``glob``; integer buffers reset to ``glob``'s), or None when the run
    has no distributed DP. ``seeded``: noise from (seed, round, client) (simulation,
    reproducible); False: from OS entropy (:func:`private_generator`, a real client)."""
    if getattr(cfg, "dp", "none") != "distributed":
        return None
    s = settings_from_config(cfg)
    std = s.client_noise_std()

    def apply(rnd: int, cid: int, glob: dict, state: dict) -> dict:
        from .seeds import DP_CLIENT

        keys = dp_keys(glob)
        gen = seeded_generator(s.seed, rnd, DP_CLIENT, cid) if seeded else private_generator()
        with torch.no_grad():
            delta = {k: state[k].detach().double() - glob[k].double() for k in keys}
            out = privatize_update(delta, s.clip, std, gen)
            return {k: ((glob[k].double() + out[k]).to(glob[k].dtype) if k in out else glob[k].clone())
                    for k in state}

    return apply
