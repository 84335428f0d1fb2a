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
from .strategy import AGGREGATORS, STRATEGIES


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
    # how the server combines the replies: "mean" (sample-weighted, streamed), "median" or
    # "trimmed_mean" (coordinate-wise, unweighted; robust to a minority of hostile clients)
    aggregator: str = "mean"
    trim_fraction: float = 0.1  # trimmed_mean: share cut at each end
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


class ConfigError(ValueError):
    """A user mistake in a config key, a config file or a path it names (a ValueError, so
    ``except ValueError`` keeps working). ``key``: the config key (or ``config`` for the file
    itself); ``source``: the file the value came from, when it came from one. The CLI prints
    these as one line (exit 2), never with a traceback."""

    def __init__(self, key, msg, source=None):
        self.key, self.msg, self.source = key, msg, source
        super().__init__((f"{source}: " if source else "") + f"{key}: {msg}")

    def with_source(self, source) -> "ConfigError":
        """The same error, naming the file the offending value was read from."""
        return ConfigError(self.key, self.msg, source)


def _fail(key, msg):
    raise ConfigError(key, msg)


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
    if not isinstance(d, dict):
        _fail("config", f"must be a mapping of config keys, got {type(d).__name__}")
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for k, v in d.items():
        if not isinstance(k, str):  # YAML allows `1: 2`
            _fail(repr(k), "config keys are names, not " + type(k).__name__)
        k2 = k.replace("-", "_")
        if k2 not in KEYS:
            near = difflib.get_close_matches(k2, KEYS, n=3)
            _fail(k, "unknown config key" + (f" (did you mean {', '.join(near)}?)" if near else
                                             f"; valid keys: {', '.join(KEYS)}"))
        setattr(cfg, k2, v)
    if isinstance(cfg.methods, str):
        cfg.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    return cfg


def _read_text(p: Path, key: str = "config") -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        _fail(key, f"{p}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                   "save the file as UTF-8")


def read_toml(path, key: str = "config") -> dict:
    """A TOML file as a dict; text that is not UTF-8 and syntax errors are a
    :class:`ConfigError` naming ``key``, the file and the line."""
    import re
    import tomllib

    p = Path(path)
    text = _read_text(p, key)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        # python 3.11 reports an unterminated value "at end of document": the last line
        where = f"line {m.group(1)}, column {m.group(2)}" if m else f"line {max(1, len(text.splitlines()))}"
        msg = re.sub(r"\s*\(at [^)]*\)$", "", str(e))
        _fail(key, f"{p}: {where}: TOML syntax error: {msg}")


def load_file(path) -> dict:
    """The config keys of a TOML (.toml) or YAML (.yaml/.yml) file. A ``[run]`` table (YAML:
    ``run:`` mapping) holds them when present; keys beside it are an error (they would be
    ignored otherwise). Syntax errors and text that is not UTF-8 name the file and line."""
    p = Path(path)
    if not p.exists():
        _fail("config", f"file not found: {p}")
    if not p.is_file():
        _fail("config", f"{p} is not a file")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        _fail("config", f"{p}: use a .toml, .yaml or .yml file")
    if p.suffix == ".toml":
        d = read_toml(p)
    else:
        import yaml

        text = _read_text(p)
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            _fail("config", f"{p}: {where}YAML syntax error: {what}")
        d = {} if d is None else d
    if not isinstance(d, dict):
        _fail("config", f"{p}: top level must be a table/mapping of config keys, got {type(d).__name__}")
    if "run" in d and isinstance(d["run"], dict):
        beside = [str(k) for k in d if k != "run"]
        if beside:  # an error, not a merge: which of the two values was meant is the user's call
            _fail("config", f"{p}: {', '.join(beside)} {'is' if len(beside) == 1 else 'are'} outside the [run] "
                            "table, where they would be ignored; move them into [run] (or drop the [run] header)")
        return d["run"]
    return d


def load_config(path, base: RunConfig | None = None) -> RunConfig:
    """:func:`load_file` + :func:`from_mapping`; key errors name the file."""
    d = load_file(path)
    try:
        return from_mapping(d, base)
    except ConfigError as e:
        raise e.with_source(path) from None


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
    if cfg.aggregator not in AGGREGATORS:
        _fail("aggregator", f"must be one of {', '.join(AGGREGATORS)}; got {cfg.aggregator!r}")
    _num(cfg, "trim_fraction", lo=0, hi=0.5, hi_open=True)
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
    _int(cfg, "image_size", lo=IMAGE_SIZE_RANGE[0], hi=IMAGE_SIZE_RANGE[1], allow_none=True,
         why="image side in pixels; the data is resized to it in memory")
    _int(cfg, "threads", lo=1, hi=MAX_THREADS, allow_none=True)
    _int(cfg, "num_clients", lo=1, hi=MAX_CLIENTS, why="every client is simulated in this process")
    _int(cfg, "shards_per_client", lo=1, hi=MAX_SHARDS_PER_CLIENT)
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
    # what the config says about data and weights (a key the dataset or model would ignore);
    # whether the files are on this machine is check_sources' job
    _check_sources(cfg, model_names, own_data, check_files=False)
    return cfg


def _check_sources(cfg, model_names, own_data, check_files):
    if not own_data:
        from .data import data_source_problem

        problem = data_source_problem(cfg.dataset, cfg.data_root, cfg.download, check_files=check_files)
        if problem is not None:
            _fail(*problem)
    if model_names is not None:
        from .adapter import weights_problem

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
