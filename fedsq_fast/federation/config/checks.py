"""Validation of a whole config before any work: every key's type and range, the options
the methods read, the files the config names."""
from __future__ import annotations

import math

from ..client import LR_SCHEDULES, OPTIMIZERS, PRECISIONS
from ..data import DATASETS
from ..lazy import in_memory_choice
from ..partition import PARTITIONS
from ..robust import krum_auto_f, krum_min_replies
from ..seeds import sample_size
from ..strategy import AGGREGATORS, STRATEGIES, strategy_options
from .errors import _fail
from .methods import STRATEGY_OPTION_KEYS, MethodSpec
from .sections import RunConfig


def resolve_device(spec: str | None = "auto"):
    """The torch.device for a config's ``device`` (validated by :func:`validate`)."""
    import torch

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _int(cfg, key, lo=None, allow_none=False, hi=None, why=""):
    v = getattr(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(key, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        _fail(key, f"must be >= {lo}, got {v}" + (f" ({why})" if why and hi is not None else ""))
    if hi is not None and v > hi:
        _fail(key, f"must be <= {hi}, got {v}" + (f" ({why})" if why else ""))


# Size limits: beyond them a value is a typo, and would allocate absurd memory before any
# useful error (the whole pool is resized once at load time: 3000 images at 20000 px are
# 4.8 TB). 8 px is the smallest dataset's own size (digits, 8x8); below it an image has too
# few pixels to classify. 1024 px is above any common training resolution (ImageNet models
# train at 224-600) and already 12 GB for the default 3000 grey images.
IMAGE_SIZE_RANGE = (8, 1024)
# One process simulates every client (an index array and a row of the partition table each);
# cross-device federations above 10^5 clients are out of this engine's scope.
MAX_CLIENTS = 100_000
MAX_SHARDS_PER_CLIENT = 10_000  # shards are sorted-label slices of at least one sample
MAX_THREADS = 1024  # torch.set_num_threads would start that many threads
MAX_WORKERS = 256  # each worker is a process holding a model (and imports torch at start)
# Run length: a value past these cannot finish in any reasonable time (the tiniest round, 8x8
# digits on one client, takes ~10 ms, so 10^5 rounds are already hours at the default sizes and
# days for a real model; 10^4 local epochs of one client are as many passes over its data
# per round). A typo such as rounds = 9223372036854775807 would otherwise run until killed.
# FEDSQ_FAST_NO_LIMITS=1 in the environment lifts these two (not the memory bounds above).
MAX_ROUNDS = 100_000
MAX_LOCAL_EPOCHS = 10_000
NO_LIMITS_ENV = "FEDSQ_FAST_NO_LIMITS"


def limits_lifted() -> bool:
    """Whether ``FEDSQ_FAST_NO_LIMITS`` (1/true/yes/on) lifts the run-length bounds
    :data:`MAX_ROUNDS` and :data:`MAX_LOCAL_EPOCHS`."""
    import os

    return os.environ.get(NO_LIMITS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _run_length(cfg, key, bound) -> None:
    v = getattr(cfg, key)
    if isinstance(v, int) and not isinstance(v, bool) and v > bound and not limits_lifted():
        _fail(key, f"must be <= {bound}, got {v}: a run that long does not finish in any reasonable time "
                   f"(set {NO_LIMITS_ENV}=1 in the environment to lift this bound)")


def _num(cfg, key, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    v = getattr(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(key, f"must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(key, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        _fail(key, f"must be {'<' if hi_open else '<='} {hi}, got {v}")


def _check_device(spec) -> None:
    import torch

    if not isinstance(spec, str) or not spec:
        _fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if spec == "auto":
        return
    try:
        d = torch.device(spec)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        _fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            _fail("device", f"{spec!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                            f"(built with CUDA {torch.version.cuda}); use 'auto' or 'cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            _fail("device", f"{spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _check_precision(precision, device) -> None:
    if precision not in PRECISIONS:
        _fail("precision", f"must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return
    import torch

    dev = resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
        _fail("precision", f"'fp16' needs a CUDA GPU (device resolves to {dev.type}): its gradient scaler and "
                           "speed are GPU features; use 'bf16' or 'fp32' here")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        _fail("precision", f"'bf16' is not supported by {torch.cuda.get_device_name(dev)}; use 'fp16' or 'fp32'")
    if precision == "bf16" and dev.type == "cpu" and not cpu_has_bf16():
        _fail("precision", "'bf16' on a CPU without native bf16 (AVX-512 BF16 or AMX) is emulated: a ResNet-18 "
                           "training step took 46x as long as in fp32 (12.3 s vs 0.27 s, AMD EPYC AVX2, 2026-12-07); "
                           "use 'fp32'")


# Keys that name where data and model come from: not used when the caller brings its own
# data (federate(train=...)) and model (model_fn).
DATA_KEYS = ("dataset", "data_root", "download")
MODEL_KEYS = ("model", "weights")


def check_options_used(cfg: RunConfig) -> RunConfig:
    """A strategy option the user set (``cfg.explicit_keys``) that none of ``cfg.methods``
    reads, e.g. ``prox_mu`` with methods fedavg and fedsq, is a :class:`ConfigError` naming
    it and the strategies that read it; so is ``trim_fraction`` set with an aggregator other
    than trimmed_mean. Defaults and recorded configs (no explicit keys) always pass."""
    explicit = cfg.explicit_keys
    used = {MethodSpec.parse(m).strategy for m in cfg.methods}
    for k in STRATEGY_OPTION_KEYS:
        if k in explicit and not any(k in strategy_options(s) for s in used):
            takers = [s for s in STRATEGIES if k in strategy_options(s)]
            _fail(k, f"set to {getattr(cfg, k)!r}, but none of the methods ({', '.join(cfg.methods)}) reads it: "
                     f"it is an option of {', '.join(takers)} (e.g. methods {takers[0]} or fedsq+{takers[0]}); "
                     "remove it or add such a method")
    for key, schedules in (("lr_step_rounds", ("step",)), ("lr_gamma", ("step",)), ("lr_min", ("cosine",))):
        if key in explicit and cfg.lr_schedule not in schedules:
            _fail(key, f"is read only by lr_schedule = {schedules[0]!r}, and lr_schedule is {cfg.lr_schedule!r}")
    for key, reader in AGGREGATOR_OPTIONS.items():
        if key in explicit and cfg.aggregator != reader:
            _fail(key, f"set to {getattr(cfg, key)!r}, but aggregator is {cfg.aggregator!r}; only "
                       f"aggregator = {reader!r} reads it")
    return cfg


# Keys only one aggregator reads: setting one under another aggregator is a mistake.
AGGREGATOR_OPTIONS = {"trim_fraction": "trimmed_mean", "krum_f": "multi_krum", "krum_m": "multi_krum",
                      "clip_radius": "centered_clip"}


def _check_krum(cfg: RunConfig) -> None:
    """Multi-Krum's f and m against the clients a round samples (every one of them replying):
    f needs 2f + 3 replies (Blanchard et al. 2017), m at most K - f. A round that gets fewer
    valid replies than sampled keeps the global model (robust.RobustRefusal)."""
    _int(cfg, "krum_f", lo=0, allow_none=True)
    _int(cfg, "krum_m", lo=1, allow_none=True)
    if cfg.aggregator != "multi_krum":
        return
    k = sample_size(cfg)
    f = krum_auto_f(k) if cfg.krum_f is None else cfg.krum_f
    if cfg.krum_f is not None and k < krum_min_replies(f):
        _fail("krum_f", f"{f} Byzantine clients need at least {krum_min_replies(f)} replies a round (2 krum_f + 3), "
                        f"but a round samples {k} (num_clients {cfg.num_clients}, fraction {cfg.fraction}, "
                        f"min_clients {cfg.min_clients}); lower krum_f to at most {krum_auto_f(k)}")
    if cfg.krum_m is not None and cfg.krum_m > k - f:
        _fail("krum_m", f"({cfg.krum_m}) exceeds the replies a round samples less krum_f ({k} - {f} = {k - f})")


# SecAgg+ (fedsq_fast/flower/secagg.py): Flower's modulus for the masked sums (2^32, its
# default and largest), and what a refusal under secagg offers instead of a server-side check.
SECAGG_MODULUS = 2**32
SECAGG_INSTEAD = ('bound and noise each update on its client instead (client-side clipping and noise: '
                  'dp = "distributed" with dp_sampling = "fixed", docs/privacy.md)')
# Under distributed DP a client's noised update value is at most dp_clip + this many of its noise
# standard deviations from 0 unless a (per value) 1.2e-15 chance event happens; validation asks
# secagg_clipping_range to cover that, so SecAgg+'s range check on a client all but never fires
SECAGG_DP_SIGMAS = 8
SECAGG_OPTIONS = ("secagg_num_shares", "secagg_reconstruction_threshold", "secagg_clipping_range",
                  "secagg_quantization_range")


def refuse_secagg_here(where: str) -> None:
    """The one-line refusal of ``secagg = true`` on a runtime without SecAgg+ (``where``: the
    runtime that would hand the server each client's update)."""
    _fail("secagg", "true asks for SecAgg+, which runs only on the Flower deployment path (the ServerApp of "
                    f"fedsq_fast.flower with flower-supernode nodes, docs/flower.md); {where} hands the server each "
                    "client's update; set secagg = false")


def _check_secagg(cfg: RunConfig) -> None:
    """The SecAgg+ keys' types and ranges; under ``secagg = true``, every option that needs
    one client's update refused with the reason (the server sees only their sum)."""
    if not isinstance(cfg.secagg, bool):
        _fail("secagg", f"must be true or false, got {cfg.secagg!r}")
    _int(cfg, "secagg_num_shares", lo=3, allow_none=True)
    _num(cfg, "secagg_reconstruction_threshold", lo=0, hi=1, lo_open=True)
    _num(cfg, "secagg_clipping_range", lo=0, lo_open=True)
    # Flower's stochastic rounding casts the levels to int32
    _int(cfg, "secagg_quantization_range", lo=2, hi=2**31 - 1)
    if not cfg.secagg:
        for k in SECAGG_OPTIONS:
            if k in cfg.explicit_keys:
                _fail(k, f"set to {getattr(cfg, k)!r}, but secagg is false; only secagg = true reads it")
        return
    k = sample_size(cfg)
    if k < 3:
        _fail("secagg", f"needs at least 3 clients a round (the sum of 2 tells each the other's update), but a round "
                        f"samples {k} (num_clients {cfg.num_clients}, fraction {cfg.fraction}, "
                        f"min_clients {cfg.min_clients})")
    if cfg.secagg_num_shares is not None and cfg.secagg_num_shares > k:
        _fail("secagg_num_shares", f"({cfg.secagg_num_shares}) exceeds the clients a round samples ({k})")
    if cfg.secagg_quantization_range * k >= SECAGG_MODULUS:
        _fail("secagg_quantization_range", f"({cfg.secagg_quantization_range}) x the clients a round samples ({k}) "
                                           f"must stay below the SecAgg+ modulus 2^32 (the masked sum would wrap "
                                           f"around); use at most {(SECAGG_MODULUS - 1) // k}")
    if cfg.norm_bound is not None:
        _fail("norm_bound", f"is {cfg.norm_bound:g}, but it compares each client's update with the round's median, "
                            f"and under secagg = true the server sees only their sum; set norm_bound = none and "
                            f"{SECAGG_INSTEAD}")
    if cfg.aggregator != "mean":
        _fail("aggregator", f"{cfg.aggregator!r} needs each client's update, and under secagg = true the server sees "
                            f"only their sum; use aggregator = 'mean' and {SECAGG_INSTEAD}")
    if cfg.dp == "central":
        _fail("dp", "'central' clips each client's update on the server, and under secagg = true the server sees "
                    "only their sum; use dp = 'distributed' with dp_sampling = 'fixed' (each client clips and adds "
                    "its share of the noise)")
    if cfg.dp == "distributed":
        from ..privacy import settings_from_config

        s = settings_from_config(cfg)
        std = s.client_noise_std()
        need = s.clip + SECAGG_DP_SIGMAS * std
        if cfg.secagg_clipping_range < need:
            _fail("secagg_clipping_range", f"({cfg.secagg_clipping_range:g}) must be at least dp_clip + "
                                           f"{SECAGG_DP_SIGMAS} x each client's noise std = {s.clip:g} + "
                                           f"{SECAGG_DP_SIGMAS} x {std:.4g} = {need:.4g} under dp = 'distributed': "
                                           "a noised update value beyond it is not sent (docs/privacy.md)")


def validate(cfg: RunConfig, model_names=None, *, own_data: bool = False) -> RunConfig:
    """Check every key (names, ranges, ablation support, strategy options the methods do
    not read: :func:`check_options_used`) before any work. ``own_data``: the caller brings
    the data, so ``dataset`` is a free label."""
    if not own_data and cfg.dataset not in DATASETS:
        _fail("dataset", f"must be one of {', '.join(DATASETS)}; got {cfg.dataset!r}")
    if model_names is not None and cfg.model not in model_names:
        _fail("model", f"must be one of {', '.join(model_names)}; got {cfg.model!r}")
    if cfg.partition not in PARTITIONS:
        _fail("partition", f"must be one of {', '.join(PARTITIONS)}; got {cfg.partition!r}")
    if cfg.optimizer not in OPTIMIZERS:
        _fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}; got {cfg.optimizer!r}")
    if not isinstance(cfg.methods, (list, tuple)) or not cfg.methods:
        _fail("methods", f"must be a non-empty list, got {cfg.methods!r}")
    for m in cfg.methods:
        MethodSpec.parse(m)
    if len(set(cfg.methods)) != len(cfg.methods):
        _fail("methods", f"duplicate entries in {cfg.methods}")
    _num(cfg, "alpha", lo=0, lo_open=True)
    _num(cfg, "fraction", lo=0, hi=1, lo_open=True)
    _num(cfg, "failure_rate", lo=0, hi=1, hi_open=True)
    _num(cfg, "lr", lo=0, lo_open=True)
    _num(cfg, "momentum", lo=0, hi=1, hi_open=True)
    _num(cfg, "weight_decay", lo=0)
    _num(cfg, "prox_mu", lo=0)
    _num(cfg, "server_lr", lo=0, lo_open=True, allow_none=True)
    _num(cfg, "server_momentum", lo=0, hi=1, hi_open=True)
    _num(cfg, "beta1", lo=0, hi=1, hi_open=True)
    _num(cfg, "beta2", lo=0, hi=1, hi_open=True)
    _num(cfg, "tau", lo=0, lo_open=True)
    _num(cfg, "client_timeout_s", lo=0, lo_open=True, allow_none=True)
    if cfg.lr_schedule not in LR_SCHEDULES:
        _fail("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}; got {cfg.lr_schedule!r}")
    _int(cfg, "warmup_rounds", lo=0)
    if cfg.warmup_rounds >= cfg.rounds and cfg.warmup_rounds:
        _fail("warmup_rounds", f"({cfg.warmup_rounds}) must be below rounds ({cfg.rounds}): no round would "
                               "train at the full lr")
    _int(cfg, "lr_step_rounds", lo=1)
    _num(cfg, "lr_gamma", lo=0, hi=1, lo_open=True)
    _num(cfg, "lr_min", lo=0)
    if cfg.lr_min > cfg.lr:
        _fail("lr_min", f"({cfg.lr_min}) must not exceed lr ({cfg.lr})")
    _num(cfg, "clip_grad_norm", lo=0, lo_open=True, allow_none=True)
    _num(cfg, "label_smoothing", lo=0, hi=1, hi_open=True)
    _num(cfg, "target_accuracy", lo=0, hi=1, lo_open=True, allow_none=True)
    for k in ("num_clients", "rounds", "local_epochs", "batch_size", "min_clients",
              "shards_per_client", "probe_size", "eval_batch_size"):
        _int(cfg, k, lo=1)
    _run_length(cfg, "rounds", MAX_ROUNDS)
    _run_length(cfg, "local_epochs", MAX_LOCAL_EPOCHS)
    if cfg.aggregator not in AGGREGATORS:
        _fail("aggregator", f"must be one of {', '.join(AGGREGATORS)}; got {cfg.aggregator!r}")
    _num(cfg, "trim_fraction", lo=0, hi=0.5, hi_open=True)
    _check_krum(cfg)
    _num(cfg, "clip_radius", lo=0, lo_open=True, allow_none=True)
    _num(cfg, "plausible_scale", lo=0, lo_open=True, allow_none=True)
    _num(cfg, "norm_bound", lo=1, allow_none=True)
    check_options_used(cfg)
    _check_dp(cfg)
    _check_secagg(cfg)
    try:
        in_memory_choice(cfg.in_memory)
    except ValueError as e:
        _fail("in_memory", str(e).removeprefix("in_memory: "))
    _check_augment(cfg.augment, own_data)
    if cfg.quant_bn not in ("train", "frozen"):
        _fail("quant_bn", f"must be 'train' or 'frozen', got {cfg.quant_bn!r}")
    for k in ("download", "checkpoint", "mask_cache", "allow_ungated", "soft_gates"):
        if not isinstance(getattr(cfg, k), bool):
            _fail(k, f"must be true or false, got {getattr(cfg, k)!r}")
    for k in ("data_root", "weights"):
        if getattr(cfg, k) is not None and not isinstance(getattr(cfg, k), str):
            _fail(k, f"must be a string or none, got {getattr(cfg, k)!r}")
    if not isinstance(cfg.out_dir, str) or not cfg.out_dir:
        _fail("out_dir", f"must be a non-empty path, got {cfg.out_dir!r}")
    _int(cfg, "min_partition_size", lo=0)
    _int(cfg, "seed", lo=0)
    _int(cfg, "val_size", lo=1)
    _int(cfg, "max_train_samples", lo=1, allow_none=True)
    _int(cfg, "max_test_samples", lo=1, allow_none=True)
    _int(cfg, "image_size", lo=IMAGE_SIZE_RANGE[0], hi=IMAGE_SIZE_RANGE[1], allow_none=True,
         why="image side in pixels; the data is resized to it in memory")
    _int(cfg, "threads", lo=1, hi=MAX_THREADS, allow_none=True)
    _int(cfg, "num_clients", lo=1, hi=MAX_CLIENTS, why="every client is simulated in this process")
    _int(cfg, "shards_per_client", lo=1, hi=MAX_SHARDS_PER_CLIENT)
    _check_device(cfg.device)
    _check_precision(cfg.precision, cfg.device)
    _int(cfg, "workers", lo=1, hi=MAX_WORKERS)
    _num(cfg, "client_test_fraction", lo=0, hi=1, hi_open=True)
    _int(cfg, "client_eval_every", lo=1)
    _int(cfg, "min_batch_size", lo=1)
    if cfg.min_batch_size > cfg.batch_size:
        _fail("min_batch_size", f"({cfg.min_batch_size}) must not exceed batch_size ({cfg.batch_size})")
    if cfg.min_clients > cfg.num_clients:
        _fail("min_clients", f"({cfg.min_clients}) must not exceed num_clients ({cfg.num_clients})")
    if cfg.max_train_samples is not None and cfg.num_clients > cfg.max_train_samples:
        _fail("num_clients", f"({cfg.num_clients}) exceeds the samples available "
                             f"(max_train_samples={cfg.max_train_samples})")
    if cfg.partition in ("dirichlet", "quantity") and cfg.max_train_samples is not None and \
            cfg.min_partition_size * cfg.num_clients > cfg.max_train_samples:
        _fail("min_partition_size", f"x num_clients exceeds max_train_samples ({cfg.max_train_samples})")
    # what the config says about data and weights (a key the dataset or model would ignore);
    # whether the files are on this machine is check_sources' job
    _check_sources(cfg, model_names, own_data, check_files=False)
    return cfg


# DP keys read only when dp is on, and the adaptive-clip keys only with dp_adaptive_clip.
DP_KEYS = ("dp_clip", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_sampling", "dp_adaptive_clip",
           "dp_target_quantile", "dp_clip_lr", "dp_clip_count_std")
DP_ADAPTIVE_KEYS = ("dp_target_quantile", "dp_clip_lr", "dp_clip_count_std")


def _check_dp(cfg: RunConfig) -> None:
    """Client-level DP (federation/privacy.py, docs/privacy.md): ranges, the pairings it cannot
    account for, and the accountant's verdict (a target no round can meet), before any work."""
    from ..privacy import DP_MODES, DP_SAMPLINGS, settings_from_config

    if cfg.dp not in DP_MODES:
        _fail("dp", f"must be one of {', '.join(DP_MODES)}; got {cfg.dp!r}")
    _num(cfg, "dp_clip", lo=0, lo_open=True)
    _num(cfg, "dp_noise_multiplier", lo=0, lo_open=True, allow_none=True)
    _num(cfg, "dp_target_epsilon", lo=0, lo_open=True, allow_none=True)
    _num(cfg, "dp_delta", lo=0, hi=1, lo_open=True, hi_open=True)
    if cfg.dp_sampling not in DP_SAMPLINGS:
        _fail("dp_sampling", f"must be one of {', '.join(DP_SAMPLINGS)}; got {cfg.dp_sampling!r}")
    if not isinstance(cfg.dp_adaptive_clip, bool):
        _fail("dp_adaptive_clip", f"must be true or false, got {cfg.dp_adaptive_clip!r}")
    _num(cfg, "dp_target_quantile", lo=0, hi=1, lo_open=True, hi_open=True)
    _num(cfg, "dp_clip_lr", lo=0, lo_open=True)
    _num(cfg, "dp_clip_count_std", lo=0, lo_open=True, allow_none=True)
    explicit = cfg.explicit_keys
    if cfg.dp == "none":
        for k in DP_KEYS:
            if k in explicit:
                _fail(k, f"set to {getattr(cfg, k)!r}, but dp is 'none'; set dp = 'central' or 'distributed'")
        return
    if not cfg.dp_adaptive_clip:
        for k in DP_ADAPTIVE_KEYS:
            if k in explicit:
                _fail(k, f"set to {getattr(cfg, k)!r}, but dp_adaptive_clip is false; only adaptive clipping reads it")
    if cfg.aggregator != "mean":
        _fail("aggregator", f"{cfg.aggregator!r} cannot run under dp: the accountant covers the noised sum of clipped "
                            "updates (aggregator = 'mean'), not a robust statistic of them")
    if "norm_bound" in explicit and cfg.norm_bound is not None:
        _fail("norm_bound", "cannot run under dp: rejecting replies against the cohort's median makes one client's "
                            "presence change what others contribute; the DP clip bounds every update instead "
                            "(set norm_bound = none, or leave it unset)")
    if cfg.dp_sampling == "poisson" and "min_clients" in explicit:
        _fail("min_clients", "is not read under dp with poisson sampling (each client joins with probability "
                             "fraction, and no DP round is skipped for few replies); remove it, or use "
                             "dp_sampling = 'fixed', where it is the floor of the sample")
    if cfg.dp == "distributed" and cfg.dp_sampling != "fixed":
        _fail("dp_sampling", "dp = 'distributed' needs dp_sampling = 'fixed': each client adds its share of the noise "
                             "for a known cohort of m clients (under poisson the cohort, and so the noise, varies)")
    if cfg.dp == "distributed" and cfg.dp_adaptive_clip:
        _fail("dp_adaptive_clip", "needs the server to see which updates were clipped: central DP only "
                                  "(dp = 'central')")
    if cfg.dp_noise_multiplier is None and cfg.dp_target_epsilon is None:
        _fail("dp_noise_multiplier", "dp needs dp_noise_multiplier or dp_target_epsilon (or both: then the "
                                     "run stops before the round that would exceed the target)")
    settings_from_config(cfg)


def _check_augment(value, own_data: bool) -> None:
    from ..augment import AUGMENTS, CALLABLE_PREFIX

    if isinstance(value, str) and value.startswith(CALLABLE_PREFIX) and len(value) > len(CALLABLE_PREFIX):
        if not own_data:
            _fail("augment", f"{value!r} names a Python callable, which only the Python API can pass: "
                             f"federate(..., augment=fn); here use one of {', '.join(AUGMENTS)}")
        return
    if value not in AUGMENTS:
        _fail("augment", f"must be one of {', '.join(AUGMENTS)} (a callable: federate(augment=fn)); got {value!r}")


def _check_sources(cfg, model_names, own_data, check_files):
    if not own_data:
        from ..data import data_source_problem

        problem = data_source_problem(cfg.dataset, cfg.data_root, cfg.download, check_files=check_files)
        if problem is not None:
            _fail(*problem)
    if model_names is not None:
        from ..adapter import weights_problem

        problem = weights_problem(cfg.model, cfg.weights, check_files=check_files)
        if problem is not None:
            _fail("weights", problem)


def check_sources(cfg: RunConfig, model_names=None, *, own_data: bool = False) -> RunConfig:
    """The files a validated config will read, checked before anything is loaded (stats and
    file headers only): ``data_root`` holds the dataset's files (an explicit one is never
    replaced by another copy), a ``weights`` path is a readable state-dict file. Separate
    from :func:`validate`, which checks the config itself (a suite file is valid on a
    machine without its data)."""
    _check_sources(cfg, model_names, own_data, check_files=True)
    return cfg
