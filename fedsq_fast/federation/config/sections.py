"""The section dataclasses and RunConfig, the flat whole they make; the flat key order of
recorded configs; matching a config against a recorded one."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..client import ClientConfig, LocalConfig
from ..data import DATASETS
from ..partition import PARTITIONS
from ..strategy import AGGREGATORS


def _key(default, help_: str, factory=None):
    """A config key: its default and the one-line help the CLI shows."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


# DEFAULTs ours: a small real federation that runs in minutes on 2 CPU cores
@dataclass
class DataConfig:
    """``[data]``: which data, how much of it, and how it is split among the clients."""

    dataset: str = _key("mnist", "dataset: " + ", ".join(DATASETS))
    data_root: str | None = _key(None, "folder holding the dataset's files (torchvision layout)")
    download: bool = _key(False, "fetch the dataset into data_root")
    max_train_samples: int | None = _key(3000, "seeded subset of the training pool; none: all")
    val_size: int = _key(1000, "server validation split, taken from the training pool")
    max_test_samples: int | None = _key(2000, "test subset for the final evaluation; none: all")
    image_size: int | None = _key(None, "resize images to this side; none: the model's input size")
    # auto: an image-folder dataset (cinic10) too big for a quarter of the memory is read per
    # batch (the same numbers); true / false force either. File-array datasets fit: in memory.
    in_memory: str = _key("auto", "image folders: auto (per batch past a quarter of the memory), true, false")
    # per-batch augmentation of the clients' training images (federation/augment.py), seeded from
    # (seed, round, client): none (recorded runs reproduce), flip, crop_flip (pad 4 + crop + flip)
    augment: str = _key("none", "training images, per batch: none, flip, crop_flip (pad 4 + random crop + "
                                "horizontal flip)")
    num_clients: int = _key(10, "number of clients the pool is split among")
    partition: str = _key("dirichlet", "how the pool is split: " + ", ".join(PARTITIONS))
    alpha: float = _key(0.5, "Dirichlet concentration (dirichlet, quantity)")
    min_partition_size: int = _key(10, "smallest client share (dirichlet, quantity)")
    shards_per_client: int = _key(2, "label shards per client (shards)")
    # federated evaluation (federation/evaluation.py): each client's local test split, a seeded share
    # of its partition taken before its training data; 0.0: off (recorded runs reproduce)
    client_test_fraction: float = _key(0.0, "share of each client's partition kept as its local test split "
                                            "(federated evaluation); 0: off")


@dataclass
class ModelConfig:
    """``[model]``: the model and how fedsq methods convert it (docs/models.md)."""

    model: str = _key("svhn_cnn", "zoo model name (fedsq_fast.models.list_models()), tiny_cnn or mlp")
    weights: str | None = _key("default", "default, none, or a weights file")
    quant_bn: str = _key("train", "fedsq conversion: BatchNorm of the quantitative copy, train or frozen")
    allow_ungated: bool = _key(False, "fedsq conversion: leave smooth activations (GELU, SiLU, ...) ungated beside the gated ReLU-like ones")
    mask_cache: bool = _key(True, "FedSQ: cache structural masks per sample (steps aside for augmented or "
                                  "random data)")
    # beyond the paper (binary ReLU-like gates only): fixed soft gates y_q = z_q * g(z_s)
    soft_gates: bool = _key(False, "fedsq conversion: also gate SiLU, GELU, Hardswish, Mish and squeeze-excitation "
                                   "sigmoids with fixed soft gates (beyond the paper; the mask cache steps aside)")


@dataclass
class StrategyConfig:
    """``[strategy]``: the methods and the server strategies' options. Each strategy reads
    only its own options (``strategy.strategy_options``); every strategy reads
    ``aggregator`` and ``trim_fraction``."""

    # strategy names, "fedsq" (= DualCopy + FedAvg) or "fedsq+<strategy>",
    # optionally ":refresh=R" / ":unfreeze=R" (structural-copy ablations)
    methods: list = _key(None, "fedavg fedprox fedavgm fedadam fedyogi fedbn fedsq fedsq+<strategy>"
                               "[:refresh=R|:unfreeze=R]", factory=lambda: ["fedavg", "fedsq"])
    # "mean" (sample-weighted, streamed); the others unweighted, robust to a minority of
    # hostile clients (federation/robust.py; breakdown points in docs/federation.md)
    aggregator: str = _key("mean", "how the server combines replies: " + ", ".join(AGGREGATORS))
    trim_fraction: float = _key(0.1, "trimmed_mean: share cut at each end")
    krum_f: int | None = _key(None, "multi_krum: Byzantine replies tolerated (a round needs 2 krum_f + 3); "
                                    "none: floor((K - 3) / 2) of the round's K")
    krum_m: int | None = _key(None, "multi_krum: replies averaged (1: Krum); none: K - krum_f")
    clip_radius: float | None = _key(None, "centered_clip: clipping radius tau; none: the median distance")
    # A finite reply is still refused when a value exceeds plausible_scale x (1 + the global
    # model's max |value|) (a BatchNorm variance of 1e8 would overflow the float32 average).
    plausible_scale: float | None = _key(1e6, "refuse replies with values beyond this x (1 + global max |value|); "
                                              "none: off (runs recorded before 2026-12-02)")
    # A reply whose update norm per local batch exceeds norm_bound x the round's median is
    # refused (a boosted or runaway update); on, the server holds the round's valid replies
    # until the median is known (K models, as Flower's strategies do); none: streamed.
    norm_bound: float | None = _key(10.0, "refuse replies whose update norm per local batch exceeds this x "
                                          "the round's median (3+ replies); none: off, replies streamed")
    prox_mu: float = _key(0.01, "fedprox: proximal term mu")
    server_lr: float | None = _key(None, "fedavgm, fedadam, fedyogi: server learning rate; "
                                         "none: 1.0 for fedavgm, 0.01 for fedadam/fedyogi")
    server_momentum: float = _key(0.9, "fedavgm: server momentum")
    beta1: float = _key(0.9, "fedadam, fedyogi: first-moment decay")
    beta2: float = _key(0.99, "fedadam, fedyogi: second-moment decay")
    tau: float = _key(1e-3, "fedadam, fedyogi: adaptivity tau")
    # client-level differential privacy (beyond the paper; docs/privacy.md): DP-FedAvg with an
    # RDP accountant (dp-accounting); none keeps every recorded run as it was
    dp: str = _key("none", "client-level DP: none, central (noise at the server), distributed (noise at the clients)")
    dp_clip: float = _key(1.0, "DP: L2 norm each client's update is clipped to (the initial one when adaptive)")
    dp_noise_multiplier: float | None = _key(None, "DP: noise std / clip on the summed update; none: set from "
                                                    "dp_target_epsilon over the planned rounds")
    dp_target_epsilon: float | None = _key(None, "DP: privacy budget; with dp_noise_multiplier the run stops before "
                                                  "the round that would exceed it")
    dp_delta: float = _key(1e-5, "DP: delta of (epsilon, delta); below 1 / num_clients")
    dp_sampling: str = _key("poisson", "DP: poisson (each client with probability fraction; add/remove adjacency) or "
                                       "fixed (the engine's m of N; replace-one adjacency, sensitivity 2 x clip)")
    dp_adaptive_clip: bool = _key(False, "DP: move the clip toward a quantile of the update norms (Andrew et al. 2021)")
    dp_target_quantile: float = _key(0.5, "DP adaptive clip: share of updates left unclipped")
    dp_clip_lr: float = _key(0.2, "DP adaptive clip: geometric learning rate of the clip")
    dp_clip_count_std: float | None = _key(None, "DP adaptive clip: noise std of the unclipped count; none: expected "
                                                  "cohort / 20")
    # Flower deployment only (fedsq_fast/flower/secagg.py, docs/flower.md "Secure aggregation"):
    # the clients' quantitative updates are summed under Flower's SecAgg+ masks, so the server
    # sees their sum, never one of them. Flower's SecAgg+ defaults for the quantization.
    secagg: bool = _key(False, "Flower deployment: SecAgg+ secure aggregation (the server sees only the sum of "
                               "the updates); the embedded engine refuses it")
    secagg_num_shares: int | None = _key(None, "secagg: shares of each client's keys (>= 3); none: every client "
                                               "of the round")
    secagg_reconstruction_threshold: float = _key(0.67, "secagg: share of a client's shares needed to unmask "
                                                        "(0, 1]; above 0.5 recommended")
    secagg_clipping_range: float = _key(8.0, "secagg: each weighted update value must lie in [-this, this] "
                                             "(checked on the client before masking)")
    secagg_quantization_range: int = _key(4194304, "secagg: integer levels over [-clip, clip] (2^22); "
                                                   "x clients per round must stay below 2^32")


@dataclass
class RunSection:
    """``[run]``: rounds and client sampling, seed, metrics, output and placement."""

    rounds: int = _key(6, "federated rounds")
    fraction: float = _key(1.0, "clients sampled per round: max(min_clients, ceil(fraction K))")
    min_clients: int = _key(2, "fewest clients sampled; fewer valid replies keep the global model")
    failure_rate: float = _key(0.0, "simulated probability that a sampled client fails")
    seed: int = _key(0, "everything derives from it")
    target_accuracy: float | None = _key(None, "for rounds/seconds-to-target")
    probe_size: int = _key(64, "gate-stability probe batch (first validation images)")
    eval_batch_size: int = _key(512, "evaluation batch size")
    out_dir: str = _key("runs/default", "output folder")
    checkpoint: bool = _key(True, "checkpoint every round")
    threads: int | None = _key(None, "torch.set_num_threads; none: torch's default")
    # >1: WorkerPoolTransport (federation/workers.py), CPU only; the same results for any N
    workers: int = _key(1, "worker processes training the sampled clients in parallel; 1: in this process")
    # "auto": the first CUDA GPU when torch sees one, else the CPU; or "cpu", "cuda", "cuda:N".
    # Models, data splits and server aggregation live there; checkpoints are always CPU files.
    device: str = _key("auto", "auto, cpu, cuda or cuda:N")
    client_eval_every: int = _key(1, "federated evaluation: every client evaluates the global model on its "
                                     "test split every this many rounds, at round 0 and the last round")


# name in a config file -> section dataclass, in the order files and --help list them
SECTIONS = {"data": DataConfig, "model": ModelConfig, "client": ClientConfig, "strategy": StrategyConfig,
            "run": RunSection}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(init=False)
class RunConfig(RunSection, StrategyConfig, ClientConfig, ModelConfig, DataConfig):
    """A whole run's config: the fields of every section (data, model, client, strategy,
    run), flat. ``explicit_keys``: the keys a user set (see :func:`from_mapping`); the
    strategy-option check of :func:`validate` reads it."""

    def __init__(self, *args, **kw):
        """Keywords as before the sections (``RunConfig(lr=0.1)``); positional arguments in
        the flat order of :data:`KEYS`, as the single flat dataclass took them (the sections'
        field order differs, so the generated ``__init__`` would misplace them)."""
        if len(args) > len(KEYS):
            raise TypeError(f"RunConfig() takes at most {len(KEYS)} positional arguments ({len(args)} given)")
        for k, v in zip(KEYS, args):
            if k in kw:
                raise TypeError(f"RunConfig() got multiple values for argument {k!r}")
            kw[k] = v
        for f in dataclasses.fields(self):
            if f.name in kw:
                v = kw.pop(f.name)
            elif f.default_factory is not dataclasses.MISSING:
                v = f.default_factory()
            else:
                v = f.default
            setattr(self, f.name, v)
        if kw:
            raise TypeError(f"RunConfig() got an unexpected keyword argument {next(iter(kw))!r}")

    def to_dict(self) -> dict:
        """The flat dict of every key, in the order recorded configs have always had."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in KEYS}

    def section(self, name: str):
        """A copy of section ``name`` (``data``, ``model``, ``client``, ``strategy``, ``run``)."""
        if name not in SECTIONS:
            raise ValueError(f"section must be one of {', '.join(SECTIONS)}; got {name!r}")
        cls = SECTIONS[name]
        d = dataclasses.asdict(self)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def to_sections(self) -> dict:
        """``{section: {key: value}}``, the sectioned form (as a sectioned config file)."""
        d = self.to_dict()
        return {name: {f.name: d[f.name] for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}

    @classmethod
    def from_sections(cls, *sections) -> "RunConfig":
        """A config from section objects (defaults for the sections not given); e.g.
        ``RunConfig.from_sections(DataConfig(dataset="digits"), ClientConfig(lr=0.1))``."""
        kw = {}
        for sec in sections:
            name = next((n for n, c in SECTIONS.items() if type(sec) is c), None)
            if name is None:
                raise TypeError(f"from_sections takes {', '.join(c.__name__ for c in SECTIONS.values())}, "
                                f"got {type(sec).__name__}")
            if any(k in kw for k in (f.name for f in dataclasses.fields(sec))):
                raise TypeError(f"from_sections: two {type(sec).__name__} given")
            kw.update(dataclasses.asdict(sec))
        return cls(**kw)

    def replace(self, **changes) -> "RunConfig":
        """``dataclasses.replace`` that keeps :attr:`explicit_keys` (minus the changed keys,
        which the calling code set, not the user); ``dataclasses.replace`` forgets them all."""
        new = dataclasses.replace(self, **changes)
        new.__dict__["_explicit"] = self.explicit_keys - set(changes)
        return new

    @property
    def explicit_keys(self) -> frozenset:
        """Keys a user set (a file, flags, a mapping given to :func:`from_mapping`), as
        opposed to defaults or a recorded config; ``dataclasses.replace`` forgets them."""
        return self.__dict__.get("_explicit", frozenset())


# The flat order of recorded configs (metrics.json, checkpoints, suites), kept as it was
# before the sections existed.
KEYS = ("dataset", "data_root", "download", "max_train_samples", "val_size", "max_test_samples", "image_size",
        "model", "weights", "quant_bn", "allow_ungated", "methods", "num_clients", "partition", "alpha",
        "min_partition_size", "shards_per_client", "rounds", "fraction", "min_clients", "failure_rate",
        "client_timeout_s", "optimizer", "lr", "momentum", "weight_decay", "local_epochs", "batch_size",
        "min_batch_size", "prox_mu", "aggregator", "trim_fraction", "server_lr", "server_momentum", "beta1",
        "beta2", "tau", "mask_cache", "seed", "target_accuracy", "probe_size", "eval_batch_size", "out_dir",
        "checkpoint", "threads", "device", "plausible_scale", "workers", "norm_bound", "in_memory",
        "lr_schedule", "warmup_rounds", "lr_step_rounds", "lr_gamma", "lr_min", "clip_grad_norm", "label_smoothing",
        "precision", "augment", "soft_gates",
        "krum_f", "krum_m", "clip_radius",
        "dp", "dp_clip", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_sampling", "dp_adaptive_clip",
        "dp_target_quantile", "dp_clip_lr", "dp_clip_count_std",
        "secagg", "secagg_num_shares", "secagg_reconstruction_threshold", "secagg_clipping_range",
        "secagg_quantization_range",
        "client_test_fraction", "client_eval_every")
# What a key added after runs were recorded meant before it existed: a recorded config without
# the key reproduces its run with this value (config_differences, from_mapping(recorded=True)).
# plausible_scale, norm_bound: the reply checks of 2026-12-02/03 changed what such runs average.
# (augment needs no entry: its default, "none", is what runs recorded before it did.)
LEGACY_VALUES = {"plausible_scale": None, "norm_bound": None}
# The keys every recorded config has held since the first recordings (2026-11-22): a mapping
# holding all of them is a recording (from_mapping), even when it lacks keys added since.
RECORDED_CORE = frozenset((
    "alpha", "batch_size", "beta1", "beta2", "checkpoint", "client_timeout_s", "data_root", "dataset", "download",
    "eval_batch_size", "failure_rate", "fraction", "image_size", "local_epochs", "lr", "mask_cache",
    "max_test_samples", "max_train_samples", "methods", "min_clients", "min_partition_size", "model", "momentum",
    "num_clients", "optimizer", "out_dir", "partition", "probe_size", "prox_mu", "rounds", "seed", "server_lr",
    "server_momentum", "shards_per_client", "target_accuracy", "tau", "threads", "val_size", "weight_decay",
    "weights"))
assert set(KEYS) == set(SECTION_OF) and len(KEYS) == len(SECTION_OF), "KEYS must list every section key once"
# Where and how fast a run computes, not what: ignored when a checkpoint or a finished
# run's metrics are matched against the current config (resume on another machine).
PLACEMENT_KEYS = ("out_dir", "threads", "device", "workers", "in_memory")


def config_differences(mine: RunConfig, theirs: dict, ignore=()) -> list:
    """Keys whose value in ``mine`` differs from a recorded config (a checkpoint's, a finished
    run's). Placement keys and ``ignore`` are skipped; a key the recording code did not have yet
    counts as its default, or as its :data:`LEGACY_VALUES` entry where the default changed what
    such runs compute."""
    defaults = {**RunConfig().to_dict(), **LEGACY_VALUES}
    return [k for k, v in mine.to_dict().items()
            if k not in PLACEMENT_KEYS + tuple(ignore) and v != theirs.get(k, defaults[k])]


def local_config(cfg: RunConfig, prox_mu: float, rnd: int | None = None) -> LocalConfig:
    """The client's training options for round ``rnd``: the client section of ``cfg`` with
    that round's learning rate (``round_lr``: warm-up and schedule) and ``prox_mu`` from
    the strategy."""
    from ..client import round_lr

    client = cfg.section("client")
    if rnd is not None:
        client.lr = round_lr(client, rnd, cfg.rounds)
    return LocalConfig(**dataclasses.asdict(client), prox_mu=prox_mu)
