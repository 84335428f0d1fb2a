"""Run configuration: one flat dataclass, loaded from flags or a TOML/YAML file, validated
in full before any data is loaded or any training starts (errors name the key)."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from .client import OPTIMIZERS
from .data import DATASETS
from .partition import PARTITIONS
from .strategy import STRATEGIES


@dataclass
class RunConfig:
    # data (DEFAULTs ours: a small real federation that runs in minutes on 2 CPU cores)
    dataset: str = "mnist"
    data_root: str | None = None
    download: bool = False
    max_train_samples: int | None = 3000  # subset of the training pool (seeded); None: all
    val_size: int = 1000  # held-out server validation split, taken from the training pool
    max_test_samples: int | None = 2000
    image_size: int | None = None  # None: the model's own input size
    # model
    model: str = "svhn_cnn"
    weights: str | None = "default"
    # how fedsq methods convert a plain model with fedsq_fast.dualcopy (docs/models.md)
    quant_bn: str = "train"
    allow_ungated: bool = False
    # methods: strategy names, "fedsq" (= DualCopy + FedAvg) or "fedsq+<strategy>",
    # optionally ":refresh=R" / ":unfreeze=R" (structural-copy ablations)
    methods: list = field(default_factory=lambda: ["fedavg", "fedsq"])
    # partition
    num_clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    shards_per_client: int = 2
    # rounds
    rounds: int = 6
    fraction: float = 1.0
    min_clients: int = 2
    failure_rate: float = 0.0
    client_timeout_s: float | None = None
    # local training
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    local_epochs: int = 1
    batch_size: int = 64
    # Local batches smaller than this are skipped (the last of an epoch when a client's sample
    # count is not a multiple of batch_size; reshuffled each round, so no sample is lost for
    # good). 2 keeps BatchNorm's training statistics defined; a few more avoid BatchNorm's
    # blow-ups on 2-3 samples over 1x1 feature maps (MobileNetV2 at 32 px; experiments/README.md).
    min_batch_size: int = 2
    prox_mu: float = 0.01
    # server optimizers
    server_lr: float | None = None  # None: 1.0 for fedavgm, 0.01 for fedadam/fedyogi
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    mask_cache: bool = True  # FedSQ: cache structural masks per sample (no augmentation here)
    # metrics, output
    seed: int = 0
    target_accuracy: float | None = None
    probe_size: int = 64
    eval_batch_size: int = 512
    out_dir: str = "runs/default"
    checkpoint: bool = True
    threads: int | None = None
    # "auto": the first CUDA GPU when torch sees one, else the CPU; or "cpu", "cuda", "cuda:N".
    # Models, data splits and server aggregation live there; checkpoints are always CPU files.
    device: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))
# Where and how fast a run computes, not what: ignored when a checkpoint or a finished
# run's metrics are matched against the current config (resume on another machine).
PLACEMENT_KEYS = ("out_dir", "threads", "device")


def config_differences(mine: RunConfig, theirs: dict, ignore=()) -> list:
    """Keys whose value in ``mine`` differs from a recorded config (a checkpoint's, a finished
    run's). Placement keys and ``ignore`` are skipped; a key the recording code did not have yet
    counts as its default (keys are only added with defaults that keep the old behaviour)."""
    defaults = RunConfig().to_dict()
    return [k for k, v in mine.to_dict().items()
            if k not in PLACEMENT_KEYS + tuple(ignore) and v != theirs.get(k, defaults[k])]


def local_config(cfg: RunConfig, prox_mu: float):
    """The client's training options for one round (``prox_mu`` from the strategy)."""
    from .client import LocalConfig

    return LocalConfig(cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.local_epochs, cfg.batch_size,
                       prox_mu, cfg.client_timeout_s, cfg.min_batch_size)


def resolve_device(spec: str | None = "auto"):
    """The torch.device for a config's ``device`` (validated by :func:`validate`)."""
    import torch

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _fail(key, msg):
    raise ValueError(f"{key}: {msg}")


def parse_method(method: str) -> tuple[str, bool, str | None, int | None]:
    """'fedsq+fedprox:refresh=3' -> ('fedprox', True, 'refresh', 3)."""
    if not isinstance(method, str) or not method:
        _fail("methods", f"each method must be a non-empty string, got {method!r}")
    body, _, ablation = method.partition(":")
    dual = False
    if body == "fedsq":
        body, dual = "fedavg", True
    elif body.startswith("fedsq+"):
        body, dual = body[len("fedsq+"):], True
    if body not in STRATEGIES:
        _fail("methods", f"unknown strategy {body!r} in {method!r}; valid: {', '.join(STRATEGIES)}, "
                         "fedsq, fedsq+<strategy>")
    kind, every = None, None
    if ablation:
        kind, _, val = ablation.partition("=")
        if kind not in ("refresh", "unfreeze") or not val.isdigit() or int(val) < 1:
            _fail("methods", f"ablation in {method!r} must be ':refresh=R' or ':unfreeze=R' with R >= 1")
        if not dual:
            _fail("methods", f"{method!r}: structural-copy ablations need a fedsq method")
        every = int(val)
    return body, dual, kind, every


def from_mapping(d: dict, base: RunConfig | None = None) -> RunConfig:
    """A config from a mapping; unknown keys are rejected with the closest valid ones."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for k, v in d.items():
        k2 = k.replace("-", "_")
        if k2 not in KEYS:
            near = difflib.get_close_matches(k2, KEYS, n=3)
            _fail(k, "unknown config key" + (f" (did you mean {', '.join(near)}?)" if near else
                                             f"; valid keys: {', '.join(KEYS)}"))
        setattr(cfg, k2, v)
    if isinstance(cfg.methods, str):
        cfg.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    return cfg


def load_file(path) -> dict:
    """TOML (.toml) or YAML (.yaml/.yml); a [run] table/section is unwrapped if present."""
    p = Path(path)
    if not p.is_file():
        _fail("config", f"file not found: {p}")
    if p.suffix == ".toml":
        import tomllib

        d = tomllib.loads(p.read_text())
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        d = yaml.safe_load(p.read_text()) or {}
    else:
        _fail("config", f"{p}: use a .toml, .yaml or .yml file")
    if not isinstance(d, dict):
        _fail("config", f"{p}: top level must be a table/mapping")
    return d.get("run", d) if isinstance(d.get("run"), dict) else d


def _int(cfg, key, lo=None, allow_none=False):
    v = getattr(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(key, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        _fail(key, f"must be >= {lo}, got {v}")


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


# Keys that name where data and model come from: not used when the caller brings its own
# data (federate(train=...)) and model (model_fn).
DATA_KEYS = ("dataset", "data_root", "download")
MODEL_KEYS = ("model", "weights")


def validate(cfg: RunConfig, model_names=None, *, own_data: bool = False) -> RunConfig:
    """Check every key (names, ranges, ablation support) before any work. ``own_data``:
    the caller brings the data, so ``dataset`` is a free label."""
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
        parse_method(m)
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
    _num(cfg, "target_accuracy", lo=0, hi=1, lo_open=True, allow_none=True)
    for k in ("num_clients", "rounds", "local_epochs", "batch_size", "min_clients",
              "shards_per_client", "probe_size", "eval_batch_size"):
        _int(cfg, k, lo=1)
    if cfg.quant_bn not in ("train", "frozen"):
        _fail("quant_bn", f"must be 'train' or 'frozen', got {cfg.quant_bn!r}")
    for k in ("download", "checkpoint", "mask_cache", "allow_ungated"):
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
    _int(cfg, "image_size", lo=1, allow_none=True)
    _int(cfg, "threads", lo=1, allow_none=True)
    _check_device(cfg.device)
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
    return cfg
