"""Run configuration in sections, loaded from flags or a TOML/YAML file, validated in full
before any data is loaded or any training starts (errors name the key).

A :class:`RunConfig` is made of five section dataclasses, each key declared once:
``data`` (:class:`DataConfig`: dataset, split, partition), ``model`` (:class:`ModelConfig`),
``client`` (:class:`ClientConfig`: local training, shared with :class:`LocalConfig`),
``strategy`` (:class:`StrategyConfig`: methods and the strategies' options) and ``run``
(:class:`RunSection`: rounds, seed, output, placement). RunConfig inherits their fields, so
the flat interface (``cfg.lr``, ``RunConfig(lr=...)``, ``dataclasses.replace``,
``to_dict()``) is the one every recorded config uses; ``cfg.section("client")`` gives one
section. Config files are flat, a legacy ``[run]`` table of flat keys, or sectioned
(``[data]`` ... ``[run]``): see :func:`flatten` and docs/federation.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .client import OPTIMIZERS, ClientConfig, LocalConfig
from .data import DATASETS
from .partition import PARTITIONS
from .strategy import AGGREGATORS, STRATEGIES, make_strategy, strategy_options


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
    num_clients: int = _key(10, "number of clients the pool is split among")
    partition: str = _key("dirichlet", "how the pool is split: " + ", ".join(PARTITIONS))
    alpha: float = _key(0.5, "Dirichlet concentration (dirichlet, quantity)")
    min_partition_size: int = _key(10, "smallest client share (dirichlet, quantity)")
    shards_per_client: int = _key(2, "label shards per client (shards)")


@dataclass
class ModelConfig:
    """``[model]``: the model and how fedsq methods convert it (docs/models.md)."""

    model: str = _key("svhn_cnn", "zoo model name (fedsq_fast.models.list_models()), tiny_cnn or mlp")
    weights: str | None = _key("default", "default, none, or a weights file")
    quant_bn: str = _key("train", "fedsq conversion: BatchNorm of the quantitative copy, train or frozen")
    allow_ungated: bool = _key(False, "fedsq conversion: accept a model without gate sites")
    mask_cache: bool = _key(True, "FedSQ: cache structural masks per sample (no augmentation here)")


@dataclass
class StrategyConfig:
    """``[strategy]``: the methods and the server strategies' options. Each strategy reads
    only its own options (``strategy.strategy_options``); every strategy reads
    ``aggregator`` and ``trim_fraction``."""

    # strategy names, "fedsq" (= DualCopy + FedAvg) or "fedsq+<strategy>",
    # optionally ":refresh=R" / ":unfreeze=R" (structural-copy ablations)
    methods: list = _key(None, "fedavg fedprox fedavgm fedadam fedyogi fedbn fedsq fedsq+<strategy>"
                               "[:refresh=R|:unfreeze=R]", factory=lambda: ["fedavg", "fedsq"])
    # "mean" (sample-weighted, streamed), "median" or "trimmed_mean" (coordinate-wise,
    # unweighted; robust to a minority of hostile clients)
    aggregator: str = _key("mean", "how the server combines replies: " + ", ".join(AGGREGATORS))
    trim_fraction: float = _key(0.1, "trimmed_mean: share cut at each end")
    prox_mu: float = _key(0.01, "fedprox: proximal term mu")
    server_lr: float | None = _key(None, "fedavgm, fedadam, fedyogi: server learning rate; "
                                         "none: 1.0 for fedavgm, 0.01 for fedadam/fedyogi")
    server_momentum: float = _key(0.9, "fedavgm: server momentum")
    beta1: float = _key(0.9, "fedadam, fedyogi: first-moment decay")
    beta2: float = _key(0.99, "fedadam, fedyogi: second-moment decay")
    tau: float = _key(1e-3, "fedadam, fedyogi: adaptivity tau")


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
    # "auto": the first CUDA GPU when torch sees one, else the CPU; or "cpu", "cuda", "cuda:N".
    # Models, data splits and server aggregation live there; checkpoints are always CPU files.
    device: str = _key("auto", "auto, cpu, cuda or cuda:N")


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
        "checkpoint", "threads", "device")
assert set(KEYS) == set(SECTION_OF) and len(KEYS) == len(SECTION_OF), "KEYS must list every section key once"
# Where and how fast a run computes, not what: ignored when a checkpoint or a finished
# run's metrics are matched against the current config (resume on another machine).
PLACEMENT_KEYS = ("out_dir", "threads", "device")
# Keys some strategies read and others do not (make_strategy refuses them where not read).
STRATEGY_OPTION_KEYS = tuple(k for k in KEYS if any(k in strategy_options(s) for s in STRATEGIES))


def config_differences(mine: RunConfig, theirs: dict, ignore=()) -> list:
    """Keys whose value in ``mine`` differs from a recorded config (a checkpoint's, a finished
    run's). Placement keys and ``ignore`` are skipped; a key the recording code did not have yet
    counts as its default (keys are only added with defaults that keep the old behaviour)."""
    defaults = RunConfig().to_dict()
    return [k for k, v in mine.to_dict().items()
            if k not in PLACEMENT_KEYS + tuple(ignore) and v != theirs.get(k, defaults[k])]


def local_config(cfg: RunConfig, prox_mu: float) -> LocalConfig:
    """The client's training options for one round: the client section of ``cfg`` and
    ``prox_mu`` from the strategy."""
    return LocalConfig(**dataclasses.asdict(cfg.section("client")), prox_mu=prox_mu)


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


ABLATIONS = ("refresh", "unfreeze")


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``methods``, parsed: ``MethodSpec.parse("fedsq+fedprox:refresh=3") ==
    MethodSpec("fedprox", dual=True, ablation="refresh", every=3, text="fedsq+fedprox:refresh=3")``.
    ``dual``: a fedsq method (DualCopy model); ``ablation``/``every``: the structural-copy
    ablation and its period R, or None."""

    strategy: str
    dual: bool = False
    ablation: str | None = None
    every: int | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """Parse a method: a strategy name, ``fedsq``, ``fedsq+<strategy>``, optionally
        ``:refresh=R`` / ``:unfreeze=R`` (fedsq methods, R >= 1); anything else is a
        :class:`ConfigError` on ``methods``."""
        if not isinstance(text, str) or not text:
            _fail("methods", f"each method must be a non-empty string, got {text!r}")
        body, _, ablation = text.partition(":")
        dual = False
        if body == "fedsq":
            body, dual = "fedavg", True
        elif body.startswith("fedsq+"):
            body, dual = body[len("fedsq+"):], True
        if body not in STRATEGIES:
            _fail("methods", f"unknown strategy {body!r} in {text!r}; valid: {', '.join(STRATEGIES)}, "
                             "fedsq, fedsq+<strategy>")
        kind, every = None, None
        if ablation:
            kind, _, val = ablation.partition("=")
            # isascii: str.isdigit also accepts other scripts' digits and superscripts ("²")
            if kind not in ABLATIONS or not (val.isascii() and val.isdigit()) or int(val) < 1:
                _fail("methods", f"ablation in {text!r} must be ':refresh=R' or ':unfreeze=R' with R >= 1")
            if not dual:
                _fail("methods", f"{text!r}: structural-copy ablations need a fedsq method")
            every = int(val)
        return cls(body, dual, kind, every, text)

    def as_tuple(self) -> tuple:
        """``(strategy, dual, ablation, every)``, what :func:`parse_method` returned."""
        return self.strategy, self.dual, self.ablation, self.every


def parse_method(method: str) -> tuple[str, bool, str | None, int | None]:
    """Deprecated: ``MethodSpec.parse(method).as_tuple()``; 'fedsq+fedprox:refresh=3' ->
    ('fedprox', True, 'refresh', 3)."""
    warnings.warn("parse_method is deprecated; use MethodSpec.parse(method) (fields strategy, dual, "
                  "ablation, every)", DeprecationWarning, stacklevel=2)
    return MethodSpec.parse(method).as_tuple()


def strategy_from_config(cfg: RunConfig, method) -> "Strategy":  # noqa: F821
    """The server strategy of ``method`` (a string or :class:`MethodSpec`), given only the
    options it takes from ``cfg`` (plus ``aggregator``, ``trim_fraction``); an option left
    None (``server_lr``) takes the strategy's own default (1.0 for fedavgm, 0.01 for
    fedadam/fedyogi)."""
    spec = method if isinstance(method, MethodSpec) else MethodSpec.parse(method)
    opts = {k: getattr(cfg, k) for k in strategy_options(spec.strategy) if getattr(cfg, k) is not None}
    return make_strategy(spec.strategy, aggregator=cfg.aggregator, trim_fraction=cfg.trim_fraction, **opts)


def _norm_key(k, where=""):
    if not isinstance(k, str):  # YAML allows `1: 2`
        _fail(repr(k), "config keys are names, not " + type(k).__name__)
    k2 = k.replace("-", "_")
    if k2 not in SECTION_OF:
        near = difflib.get_close_matches(k2, KEYS, n=3)
        _fail(k, f"unknown config key{where}" + (f" (did you mean {', '.join(near)}?)" if near else
                                                 f"; valid keys: {', '.join(KEYS)}"))
    return k2


def _line_of(text: str | None, section: str, key: str) -> int | None:
    """The line of ``key`` under ``[section]`` (TOML) or ``section:`` (YAML) in ``text``, or
    None (a plain scan: good enough to point at the key, not a parser)."""
    import re

    if not text:
        return None
    head = re.compile(rf"^\s*(\[\s*{re.escape(section)}\s*\]|{re.escape(section)}\s*:)\s*(#.*)?$")
    other = re.compile(r"^\s*\[|^\S[^:]*:\s*(#.*)?$")
    names = {key, key.replace("_", "-")}
    pat = re.compile(r"^\s*[\"']?(" + "|".join(map(re.escape, names)) + r")[\"']?\s*[=:]")
    inside = False
    for i, ln in enumerate(text.splitlines(), 1):
        if head.match(ln):
            inside = True
        elif inside and other.match(ln):
            inside = False
        elif inside and pat.match(ln):
            return i
    return None


def flatten(d: dict, source=None, text: str | None = None) -> dict:
    """The flat config keys of a mapping in any of the three forms:

    - flat: ``{"lr": 0.1, "rounds": 3}``;
    - legacy ``run`` table, its only table: ``{"run": {"lr": 0.1, "rounds": 3}}``;
    - sectioned: tables named after the sections, each holding its own keys,
      ``{"client": {"lr": 0.1}, "run": {"rounds": 3}}`` (with any table besides ``run``,
      ``run`` holds the run section only).

    Keys beside the tables, a table that is not a section, a key under a section that does
    not read it (naming the section that does, and the line of ``text`` when given) and
    unknown keys are :class:`ConfigError` s naming ``source``."""
    def fail(key, msg):
        raise ConfigError(key, msg, source)

    tables = [k for k, v in d.items() if isinstance(v, dict)]
    if not tables:
        return d
    beside = [str(k) for k in d if k not in tables]
    not_sections = [str(t) for t in tables if t not in SECTIONS]
    if not_sections:
        t = not_sections[0]
        fail(t, f"is a table, but config tables are the sections {', '.join(f'[{s}]' for s in SECTIONS)}")
    if tables == ["run"]:  # the legacy form: every key in [run]
        if beside:  # an error, not a merge: which of the two values was meant is the user's call
            fail("config", f"{', '.join(beside)} {'is' if len(beside) == 1 else 'are'} outside the [run] "
                           "table, where they would be ignored; move them into [run] (or drop the [run] header)")
        return dict(d["run"])
    if beside:
        where = "; ".join(f"{k} -> [{SECTION_OF[k.replace('-', '_')]}]" for k in beside
                          if k.replace("-", "_") in SECTION_OF)
        fail("config", f"{', '.join(beside)} {'is' if len(beside) == 1 else 'are'} outside the sections "
                       f"{', '.join(f'[{t}]' for t in tables)}; in a sectioned file every key goes in its "
                       f"section" + (f" ({where})" if where else ""))
    out = {}
    for sec in tables:
        for k, v in d[sec].items():
            try:
                k2 = _norm_key(k, f" in [{sec}]")
            except ConfigError as e:
                raise e.with_source(source) from None
            home = SECTION_OF[k2]
            if home != sec:
                line = _line_of(text, sec, k2)
                fail(k, f"in [{sec}]{f' (line {line})' if line else ''}, but {k2} is read from the [{home}] "
                        f"section; move it there")
            out[k] = v
    return out


def from_mapping(d: dict, base: RunConfig | None = None, *, recorded: bool | None = None) -> RunConfig:
    """A config from a mapping of config keys (flat, or sectioned: :func:`flatten`) over
    ``base`` (default: the defaults); unknown keys are rejected with the closest valid ones.

    The keys of ``d`` count as set by the user (``explicit_keys``: an option that none of
    the methods reads is then an error in :func:`validate`), unless ``d`` is a recorded
    config: ``recorded=None`` (default) takes a mapping that holds every key (what
    ``to_dict()`` writes: metrics.json, checkpoints, suites) as recorded; True/False force it."""
    if not isinstance(d, dict):
        _fail("config", f"must be a mapping of config keys, got {type(d).__name__}")
    d = flatten(d)
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    names = []
    for k, v in d.items():
        k2 = _norm_key(k)
        setattr(cfg, k2, v)
        names.append(k2)
    if isinstance(cfg.methods, str):
        cfg.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if recorded is None:
        recorded = set(names) == set(KEYS)
    kept = base.explicit_keys if base is not None else frozenset()
    # a recorded value replaces what the user had set for that key
    cfg.__dict__["_explicit"] = kept - set(names) if recorded else kept | set(names)
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
    """The flat config keys of a TOML (.toml) or YAML (.yaml/.yml) file, in any of the forms
    :func:`flatten` reads: flat keys, a legacy ``[run]`` table (YAML: ``run:`` mapping) of
    flat keys, or sections ``[data]``, ``[model]``, ``[client]``, ``[strategy]``, ``[run]``.
    Keys beside the tables are an error (they would be ignored otherwise), and so is a key
    in a section that does not read it (naming the key, the section it belongs to, the
    file and the line). Syntax errors and text that is not UTF-8 name the file and line."""
    p = Path(path)
    if not p.exists():
        _fail("config", f"file not found: {p}")
    if not p.is_file():
        _fail("config", f"{p} is not a file")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        _fail("config", f"{p}: use a .toml, .yaml or .yml file")
    if p.suffix == ".toml":
        d = read_toml(p)
        text = _read_text(p)
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
    return flatten(d, source=p, text=text)


def load_config(path, base: RunConfig | None = None) -> RunConfig:
    """:func:`load_file` + :func:`from_mapping` (the file's keys count as set by the user,
    unless it holds every key: a recorded config); key errors name the file."""
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
    if "trim_fraction" in explicit and cfg.aggregator != "trimmed_mean":
        _fail("trim_fraction", f"set to {cfg.trim_fraction!r}, but aggregator is {cfg.aggregator!r}; only "
                               "aggregator = 'trimmed_mean' reads it")
    return cfg


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
    _num(cfg, "target_accuracy", lo=0, hi=1, lo_open=True, allow_none=True)
    for k in ("num_clients", "rounds", "local_epochs", "batch_size", "min_clients",
              "shards_per_client", "probe_size", "eval_batch_size"):
        _int(cfg, k, lo=1)
    if cfg.aggregator not in AGGREGATORS:
        _fail("aggregator", f"must be one of {', '.join(AGGREGATORS)}; got {cfg.aggregator!r}")
    _num(cfg, "trim_fraction", lo=0, hi=0.5, hi_open=True)
    check_options_used(cfg)
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
