"""Typed configuration (issue 15): RunConfig made of sections, sectioned config files, strategy
options typed per strategy, explicit options no method reads, MethodSpec, LocalConfig.

Oracles are written out here, not read from the code under test: the flat defaults as they
were recorded before the sections existed, which section reads each key, which strategy takes
which option."""
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import yaml

from fedsq_fast import cli
from fedsq_fast.federation import config as C
from fedsq_fast.federation import strategy as S
from fedsq_fast.federation.client import ClientConfig, LocalConfig

from conftest import draw_seed

# RunConfig().to_dict() before the sections (commit 80da58c): values and key order.
OLD_DEFAULTS = {
    'dataset': 'mnist', 'data_root': None, 'download': False, 'max_train_samples': 3000, 'val_size': 1000,
    'max_test_samples': 2000, 'image_size': None, 'model': 'svhn_cnn', 'weights': 'default',
    'quant_bn': 'train', 'allow_ungated': False, 'methods': ['fedavg', 'fedsq'], 'num_clients': 10,
    'partition': 'dirichlet', 'alpha': 0.5, 'min_partition_size': 10, 'shards_per_client': 2, 'rounds': 6,
    'fraction': 1.0, 'min_clients': 2, 'failure_rate': 0.0, 'client_timeout_s': None, 'optimizer': 'sgd',
    'lr': 0.01, 'momentum': 0.9, 'weight_decay': 0.0, 'local_epochs': 1, 'batch_size': 64,
    'min_batch_size': 2, 'prox_mu': 0.01, 'aggregator': 'mean', 'trim_fraction': 0.1, 'server_lr': None,
    'server_momentum': 0.9, 'beta1': 0.9, 'beta2': 0.99, 'tau': 0.001, 'mask_cache': True, 'seed': 0,
    'target_accuracy': None, 'probe_size': 64, 'eval_batch_size': 512, 'out_dir': 'runs/default',
    'checkpoint': True, 'threads': None, 'device': 'auto'}
# keys added since, appended in this order (recorded configs without them: C.LEGACY_VALUES)
ADDED = {'plausible_scale': 1e6, 'workers': 1, 'norm_bound': 10.0, 'in_memory': 'auto',
         'lr_schedule': 'constant', 'warmup_rounds': 0, 'lr_step_rounds': 10, 'lr_gamma': 0.1, 'lr_min': 0.0,
         'clip_grad_norm': None, 'label_smoothing': 0.0, 'precision': 'fp32',
         'augment': 'none', 'soft_gates': False,
         'krum_f': None, 'krum_m': None, 'clip_radius': None,
         'dp': 'none', 'dp_clip': 1.0, 'dp_noise_multiplier': None, 'dp_target_epsilon': None, 'dp_delta': 1e-5,
         'dp_sampling': 'poisson', 'dp_adaptive_clip': False, 'dp_target_quantile': 0.5, 'dp_clip_lr': 0.2,
         'dp_clip_count_std': None,
         'secagg': False, 'secagg_num_shares': None, 'secagg_reconstruction_threshold': 0.67,
         'secagg_clipping_range': 8.0, 'secagg_quantization_range': 4194304,
         'client_test_fraction': 0.0, 'client_eval_every': 1}
FULL = {**OLD_DEFAULTS, **ADDED}

# where each key is read (docs/federation.md, "Configuration keys")
SECTION = {
    **dict.fromkeys(["dataset", "data_root", "download", "max_train_samples", "val_size", "max_test_samples",
                     "image_size", "in_memory", "num_clients", "partition", "alpha", "min_partition_size",
                     "shards_per_client", "augment", "client_test_fraction"], "data"),
    **dict.fromkeys(["model", "weights", "quant_bn", "allow_ungated", "mask_cache", "soft_gates"], "model"),
    **dict.fromkeys(["optimizer", "lr", "momentum", "weight_decay", "local_epochs", "batch_size",
                     "min_batch_size", "client_timeout_s", "lr_schedule", "warmup_rounds", "lr_step_rounds",
                     "lr_gamma", "lr_min", "clip_grad_norm", "label_smoothing", "precision"], "client"),
    **dict.fromkeys(["methods", "aggregator", "trim_fraction", "plausible_scale", "norm_bound", "prox_mu", "server_lr", "server_momentum",
                     "beta1", "beta2", "tau", "krum_f", "krum_m", "clip_radius", "dp", "dp_clip",
                     "dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_sampling", "dp_adaptive_clip",
                     "dp_target_quantile", "dp_clip_lr", "dp_clip_count_std", "secagg", "secagg_num_shares",
                     "secagg_reconstruction_threshold", "secagg_clipping_range", "secagg_quantization_range"],
                    "strategy"),
    **dict.fromkeys(["rounds", "fraction", "min_clients", "failure_rate", "seed", "target_accuracy",
                     "probe_size", "eval_batch_size", "out_dir", "checkpoint", "threads", "device", "workers",
                     "client_eval_every"], "run"),
}

# the options each strategy takes of its own, with the defaults of the paper's forms
TAKES = {"fedavg": {}, "fedbn": {}, "fedprox": {"prox_mu": 0.01},
         "fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
         "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
         "fedyogi": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}}
OPTIONS = sorted({k for t in TAKES.values() for k in t})
# strategy attribute holding each option
ATTR = {"prox_mu": "prox_mu", "server_lr": "server_lr", "server_momentum": "beta", "beta1": "beta1",
        "beta2": "beta2", "tau": "tau"}


def random_flat(rng) -> dict:
    """A full flat config of random values that validate() accepts (no model list, no files)."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    maybe_none = lambda v: None if rng.random() < 0.3 else v  # noqa: E731
    batch = int(rng.integers(2, 200))
    clients = int(rng.integers(2, 30))
    strategies = list(TAKES)
    methods = list(dict.fromkeys(pick(["", "fedsq+"]) + pick(strategies) for _ in range(int(rng.integers(1, 4)))))
    device = pick(["auto", "cpu"])
    agg = pick(["mean", "median", "trimmed_mean", "multi_krum", "geometric_median", "centered_clip"])
    return {
        "dataset": "digits", "data_root": None, "download": False,
        "max_train_samples": pick([None, int(rng.integers(clients * 20, 5000))]),
        "val_size": int(rng.integers(1, 500)), "max_test_samples": maybe_none(int(rng.integers(1, 5000))),
        "image_size": maybe_none(int(rng.integers(8, 1025))), "model": pick(["tiny_cnn", "mlp", "svhn_cnn"]),
        "weights": pick(["default", None]), "quant_bn": pick(["train", "frozen"]),
        "allow_ungated": bool(rng.integers(2)), "soft_gates": bool(rng.integers(2)),
        "methods": methods, "num_clients": clients,
        "partition": pick(["iid", "dirichlet", "shards", "quantity"]), "alpha": float(rng.uniform(0.01, 10)),
        "min_partition_size": int(rng.integers(0, 10)), "shards_per_client": int(rng.integers(1, 10)),
        "rounds": int(rng.integers(1, 100)), "fraction": float(rng.uniform(0.01, 1.0)),
        "min_clients": int(rng.integers(1, clients + 1)), "failure_rate": float(rng.uniform(0, 0.99)),
        "client_timeout_s": maybe_none(float(rng.uniform(0.1, 100))), "optimizer": pick(["sgd", "adam", "adamw"]),
        "lr": float(rng.uniform(1e-4, 1)), "momentum": float(rng.uniform(0, 0.99)),
        "weight_decay": float(rng.uniform(0, 0.1)), "local_epochs": int(rng.integers(1, 5)),
        "batch_size": batch, "min_batch_size": int(rng.integers(1, batch + 1)),
        "prox_mu": float(rng.uniform(0, 1)), "aggregator": agg,
        "trim_fraction": float(rng.uniform(0, 0.49)), "server_lr": maybe_none(float(rng.uniform(1e-3, 2))),
        "server_momentum": float(rng.uniform(0, 0.99)), "beta1": float(rng.uniform(0, 0.99)),
        "beta2": float(rng.uniform(0, 0.99)), "tau": float(rng.uniform(1e-6, 1)),
        "mask_cache": bool(rng.integers(2)), "seed": int(rng.integers(0, 2**31)),
        "target_accuracy": maybe_none(float(rng.uniform(0.01, 1))), "probe_size": int(rng.integers(1, 128)),
        "eval_batch_size": int(rng.integers(1, 2048)), "out_dir": f"runs/r{int(rng.integers(1000))}",
        "checkpoint": bool(rng.integers(2)), "threads": maybe_none(int(rng.integers(1, 16))),
        "plausible_scale": maybe_none(float(rng.uniform(1.0, 1e7))),
        "norm_bound": maybe_none(float(rng.uniform(1.0, 100))),
        "in_memory": pick(["auto", True, False]),
        "krum_f": None, "krum_m": None,  # valid only with multi_krum and a cohort (test_robust_aggregators.py)
        "clip_radius": maybe_none(float(rng.uniform(1e-3, 10))) if agg == "centered_clip" else None,
        "device": device,
        "workers": int(rng.integers(1, 9)),
        "client_test_fraction": pick([0.0, float(rng.uniform(0, 0.9))]),
        "client_eval_every": int(rng.integers(1, 20)),
        **_random_knobs(rng, pick, maybe_none),
        "augment": pick(["none", "flip", "crop_flip"]),
        # DP keys at their defaults: dp on needs aggregator mean and no explicit norm_bound (test_privacy.py)
        "dp": "none", "dp_clip": 1.0, "dp_noise_multiplier": None, "dp_target_epsilon": None, "dp_delta": 1e-5,
        "dp_sampling": "poisson", "dp_adaptive_clip": False, "dp_target_quantile": 0.5, "dp_clip_lr": 0.2,
        "dp_clip_count_std": None,
        # secagg = true refuses norm_bound and robust aggregators (tests/flower/test_secagg.py): off here
        "secagg": False, "secagg_num_shares": maybe_none(int(rng.integers(3, 50))),
        "secagg_reconstruction_threshold": float(rng.uniform(0.01, 1.0)),
        "secagg_clipping_range": float(rng.uniform(1e-3, 100)),
        "secagg_quantization_range": int(rng.integers(2, 2**31)),
    }


def cpu_has_bf16():
    from fedsq_fast.federation.config.checks import cpu_has_bf16 as has

    return has()


def _random_knobs(rng, pick, maybe_none):
    """Values for the fine-tuning keys (lr_schedule ... label_smoothing)."""
    return {"lr_schedule": pick(["constant", "step", "cosine"]), "warmup_rounds": 0,
            "lr_step_rounds": int(rng.integers(1, 50)), "lr_gamma": float(rng.uniform(0.01, 1.0)),
            "lr_min": float(rng.uniform(0, 1e-4)), "clip_grad_norm": maybe_none(float(rng.uniform(0.01, 100))),
            "label_smoothing": float(rng.uniform(0, 0.5)), "precision": pick(["fp32", "bf16"] if cpu_has_bf16() else ["fp32"])}


@pytest.fixture
def rng():
    return np.random.default_rng(draw_seed(2**31))


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)  # ints and floats (repr round-trips a float exactly)


def toml_text(d: dict, sectioned: bool = False, legacy: bool = False) -> str:
    """TOML of a flat config (None values left out: TOML has no null)."""
    d = {k: v for k, v in d.items() if v is not None}
    if not sectioned:
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items()]
        return ("[run]\n" if legacy else "") + "\n".join(lines) + "\n"
    out = []
    for sec in ("data", "model", "client", "strategy", "run"):
        out.append(f"[{sec}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in d.items() if SECTION[k] == sec]
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ sections and the flat view
def test_flat_dict_is_what_it_was():
    now = {**OLD_DEFAULTS, **ADDED}
    assert C.RunConfig().to_dict() == now
    assert list(C.RunConfig().to_dict()) == list(now)  # same order in metrics.json, new keys last
    assert {f.name for f in dataclasses.fields(C.RunConfig)} == set(now)
    assert C.KEYS == tuple(now)


def test_a_recording_without_a_newer_key_reproduces_with_its_legacy_value():
    rec = {k: v for k, v in C.RunConfig().to_dict().items() if k not in C.LEGACY_VALUES}
    assert set(C.LEGACY_VALUES) <= set(ADDED)
    cfg = C.from_mapping(rec, recorded=True)
    assert all(getattr(cfg, k) == v for k, v in C.LEGACY_VALUES.items())
    assert C.from_mapping(rec).plausible_scale is None  # every key recordings always held: a recording
    assert C.from_mapping(rec, recorded=False).plausible_scale == ADDED["plausible_scale"]  # not: defaults
    few = {k: rec[k] for k in list(rec)[:10]}
    assert C.from_mapping(few).plausible_scale == ADDED["plausible_scale"]
    # resuming such a recording under today's default is refused (it would compute something else)
    assert C.config_differences(C.RunConfig(), rec) == ["plausible_scale", "norm_bound"]
    assert C.config_differences(cfg, rec) == []
    assert C.config_differences(C.from_mapping({"plausible_scale": 1e6}), {**rec, "plausible_scale": 1e6}) == ["norm_bound"]
    assert C.config_differences(C.RunConfig(), {**rec, **ADDED}) == []


def test_every_key_in_one_section():
    assert set(SECTION) == set(OLD_DEFAULTS) | set(ADDED)
    for name, cls in C.SECTIONS.items():
        assert {f.name for f in dataclasses.fields(cls)} == {k for k, s in SECTION.items() if s == name}, name
    assert C.SECTIONS["client"] is ClientConfig


def test_round_trip_defaults_and_random(rng):
    for d in [FULL] + [random_flat(rng) for _ in range(20)]:
        cfg = C.from_mapping(d)
        assert cfg.to_dict() == d and list(cfg.to_dict()) == list(FULL)
        if d is not FULL:
            C.validate(cfg)  # the random values are valid, and a full dict sets no option "explicitly"
        # the same config through the sections: as objects, and as a sectioned mapping
        assert C.RunConfig.from_sections(*(cfg.section(n) for n in C.SECTIONS)) == cfg
        assert C.from_mapping(cfg.to_sections()).to_dict() == d
        assert C.RunConfig(**d) == cfg  # keyword construction
        assert json.loads(json.dumps(cfg.to_dict())) == d
        for name in C.SECTIONS:
            sec = cfg.section(name)
            assert dataclasses.asdict(sec) == {k: v for k, v in d.items() if SECTION[k] == name}


def test_flat_attributes_and_replace(rng):
    d = random_flat(rng)
    cfg = C.from_mapping(d)
    cfg.rounds = 3
    cfg.lr = 0.5
    assert cfg.to_dict() == dict(d, rounds=3, lr=0.5)
    c2 = dataclasses.replace(cfg, seed=7)
    assert c2.seed == 7 and c2.to_dict() == dict(d, rounds=3, lr=0.5, seed=7)
    c2.methods.append("x")  # as before the sections, replace copies values by reference: documented
    sec = cfg.section("client")
    sec.lr = 9.0
    assert cfg.lr == 0.5  # a section is a copy


def test_from_sections_refuses_what_is_not_a_section():
    with pytest.raises(TypeError, match="LocalConfig"):
        C.RunConfig.from_sections(LocalConfig())
    with pytest.raises(TypeError, match="two DataConfig"):
        C.RunConfig.from_sections(C.DataConfig(), C.DataConfig())


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_sectioned_file_equals_flat_file(tmp_path, rng, fmt):
    for i in range(5):
        d = random_flat(rng)
        if fmt == "toml":
            flat, sec, leg = (toml_text(d), toml_text(d, sectioned=True), toml_text(d, legacy=True))
        else:
            flat = yaml.safe_dump(d)
            sec = yaml.safe_dump({n: {k: v for k, v in d.items() if SECTION[k] == n} for n in C.SECTIONS})
            leg = yaml.safe_dump({"run": d})
        paths = []
        for name, text in (("flat", flat), ("sec", sec), ("legacy", leg)):
            p = tmp_path / f"{name}{i}.{fmt}"
            p.write_text(text)
            paths.append(p)
        cfgs = [C.load_config(p) for p in paths]
        expect = {k: (FULL[k] if v is None and fmt == "toml" else v) for k, v in d.items()}
        for c in cfgs:
            assert c.to_dict() == expect
            assert c.explicit_keys == cfgs[0].explicit_keys
        assert C.load_file(paths[0]) == C.load_file(paths[1]) == C.load_file(paths[2])


def test_misplaced_key_names_key_section_file_and_line(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[data]\ndataset = "digits"\n\n[run]\nrounds = 2\n# the learning rate\nlr = 0.1\n')
    with pytest.raises(C.ConfigError) as e:
        C.load_file(p)
    msg = str(e.value)
    assert e.value.key == "lr" and str(p) in msg and "[run]" in msg and "[client]" in msg and "line 7" in msg
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  dataset: digits\nstrategy:\n  methods: [fedavg]\n  batch-size: 8\nrun:\n  rounds: 2\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(y)
    msg = str(e.value)
    assert e.value.key == "batch-size" and str(y) in msg and "[strategy]" in msg and "[client]" in msg
    assert "line 5" in msg


def test_misplaced_key_on_the_command_line(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text('[model]\nmodel = "tiny_cnn"\nprox_mu = 0.1\n')
    assert cli.main(["run", "--config", str(p), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(s in err[0] for s in (str(p), "prox_mu", "[model]", "[strategy]", "line 3"))


@pytest.mark.parametrize("text, needles", [
    ('lr = 0.5\n\n[client]\nbatch_size = 8\n', ["lr", "[client]", "outside the sections"]),
    ('rounds = 2\n[data]\ndataset = "digits"\n[run]\nseed = 1\n', ["rounds", "[run]", "outside the sections"]),
    ('lr = 0.5\nrounds = 7\n\n[run]\nseed = 1\n', ["lr", "rounds", "[run]"]),  # the legacy form
    ('[training]\nlr = 0.5\n', ["training", "[data]", "[strategy]"]),
    ('[client]\nlearning_rate = 0.5\n', ["learning_rate", "[client]", "lr"]),
])
def test_mixed_or_unknown_forms_refused(tmp_path, text, needles):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(C.ConfigError) as e:
        C.load_file(p)
    assert str(p) in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_mapping_forms_in_python():
    a = C.from_mapping({"client": {"lr": 0.2}, "run": {"rounds": 2}})
    b = C.from_mapping({"lr": 0.2, "rounds": 2})
    assert a == b and a.explicit_keys == b.explicit_keys == {"lr", "rounds"}
    with pytest.raises(C.ConfigError, match="lr.*\\[run\\].*\\[client\\]"):
        C.from_mapping({"data": {}, "run": {"lr": 0.2}})


# ------------------------------------------------------------------ strategies and their options
def test_strategy_options_declared():
    for name, takes in TAKES.items():
        assert S.strategy_options(name) == takes
    assert set(C.STRATEGY_OPTION_KEYS) == set(OPTIONS)


def test_make_strategy_refuses_options_it_does_not_take(rng):
    for name, takes in TAKES.items():
        for opt in OPTIONS:
            v = float(rng.uniform(0.01, 0.9))
            if opt in takes:
                s = S.make_strategy(name, **{opt: v})
                assert getattr(s, ATTR[opt]) == v
                continue
            with pytest.raises(S.StrategyOptionError) as e:
                S.make_strategy(name, **{opt: v})
            msg = str(e.value)
            assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
            assert opt in msg and repr(name) in msg and all(t in msg for t in takes), msg
    with pytest.raises(TypeError):
        S.make_strategy("fedprox", not_an_option=1)
    with pytest.raises(TypeError):  # the constructors take only their own options too
        S.FedProx(server_lr=1.0)
    with pytest.raises(TypeError):
        S.FedBN(prox_mu=0.1)


def test_strategy_from_config_passes_only_its_options(rng):
    from fedsq_fast.federation.server import make_method_strategy

    for _ in range(10):
        cfg = C.from_mapping(random_flat(rng))
        for name, takes in TAKES.items():
            for method in (name, "fedsq+" + name):
                for s in (C.strategy_from_config(cfg, method), make_method_strategy(cfg, method),
                          C.strategy_from_config(cfg, C.MethodSpec.parse(method))):
                    assert s.name == name and s.aggregator == cfg.aggregator
                    assert s.trim_fraction == cfg.trim_fraction
                    for opt, default in takes.items():
                        want = getattr(cfg, opt) if getattr(cfg, opt) is not None else default
                        assert getattr(s, ATTR[opt]) == want, (method, opt)


# ------------------------------------------------------------------ options no method reads
def test_explicit_option_no_method_reads(rng):
    for opt in OPTIONS:
        takers = [s for s, t in TAKES.items() if opt in t]
        others = [s for s in TAKES if s not in takers]
        methods = list(rng.choice(others, size=int(rng.integers(1, len(others) + 1)), replace=False))
        methods = [("fedsq+" + m if rng.random() < 0.5 else m) for m in methods]
        cfg = C.from_mapping({opt: 0.5, "methods": methods})
        with pytest.raises(C.ConfigError) as e:
            C.validate(cfg)
        assert e.value.key == opt and all(t in str(e.value) for t in takers)
        # a method that reads it makes it fine; so does the default (not set) and a recording
        C.validate(C.from_mapping({opt: 0.5, "methods": methods + ["fedsq+" + takers[0]]}))
        C.validate(C.from_mapping({"methods": methods}))
        C.validate(C.from_mapping(cfg.to_dict()))
        C.validate(C.from_mapping({opt: 0.5, "methods": methods}, recorded=True))
    with pytest.raises(C.ConfigError, match="trim_fraction.*trimmed_mean"):
        C.validate(C.from_mapping({"trim_fraction": 0.2, "aggregator": "median"}))
    C.validate(C.from_mapping({"trim_fraction": 0.2, "aggregator": "trimmed_mean"}))


def test_explicit_keys_follow_the_user(rng):
    base = C.from_mapping({"prox_mu": 0.2})
    c = C.from_mapping({"rounds": 2}, base)
    assert c.explicit_keys == {"prox_mu", "rounds"}
    assert C.from_mapping(random_flat(rng), c).explicit_keys == frozenset()  # a recording replaces all
    assert dataclasses.replace(c, seed=1).explicit_keys == frozenset()
    assert c.replace(seed=1, prox_mu=0.3).explicit_keys == {"rounds"}


def test_recorded_configs_never_raise(tmp_path, rng):
    """metrics.json / checkpoint / suite configs hold every key (to_dict()), prox_mu among them
    whatever the methods: rebuilding them must not count those keys as set by a user."""
    for _ in range(10):
        d = random_flat(rng)
        d["methods"] = ["fedavg"]
        d["aggregator"] = "mean"
        p = tmp_path / "metrics.json"
        p.write_text(json.dumps({"config": d}))
        cfg = C.from_mapping(json.loads(p.read_text())["config"])
        assert C.validate(cfg).explicit_keys == frozenset()
        assert C.config_differences(cfg, d) == []
        y = tmp_path / "recorded.yaml"
        y.write_text(yaml.safe_dump(d))
        C.validate(C.load_config(y))


def test_suites_still_load():
    """The evidence suites set prox_mu in [run] and run fedavg cells: still valid."""
    from pathlib import Path

    from fedsq_fast.experiments import load_suite

    root = Path(__file__).resolve().parents[2] / "experiments"
    for p in sorted(root.glob("*.toml")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            load_suite(p)


def test_cli_refuses_unused_option(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text('[strategy]\nmethods = ["fedavg", "fedsq"]\nprox_mu = 0.1\n')
    out = ["--out-dir", str(tmp_path / "o"), "--dataset", "digits", "--model", "tiny_cnn"]
    assert cli.main(["run", "--config", str(p), *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(p) in err[0] and "prox_mu" in err[0] and "fedprox" in err[0]
    assert cli.main(["run", "--methods", "fedavg", "--server-momentum", "0.5", *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "server_momentum" in err[0] and "fedavgm" in err[0]
    assert not (tmp_path / "o").exists()


def test_help_grouped_by_section(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    heads = [text.index(f"{n} section ([{n}]") for n in C.SECTIONS]
    assert heads == sorted(heads)
    for k, sec in SECTION.items():
        i = text.index("--" + k.replace("_", "-") + " ")
        j = list(C.SECTIONS).index(sec)
        assert heads[j] < i and (j + 1 == len(heads) or i < heads[j + 1]), k


# ------------------------------------------------------------------ methods
def test_method_spec_every_valid_form(rng):
    r = int(rng.integers(1, 1000))
    cases = {"fedsq": ("fedavg", True, None, None), f"fedsq:refresh={r}": ("fedavg", True, "refresh", r),
             f"fedsq:unfreeze={r}": ("fedavg", True, "unfreeze", r)}
    for s in TAKES:
        cases[s] = (s, False, None, None)
        cases["fedsq+" + s] = (s, True, None, None)
        cases[f"fedsq+{s}:refresh={r}"] = (s, True, "refresh", r)
        cases[f"fedsq+{s}:unfreeze={r}"] = (s, True, "unfreeze", r)
    for text, (strat, dual, abl, every) in cases.items():
        m = C.MethodSpec.parse(text)
        assert (m.strategy, m.dual, m.ablation, m.every, m.text) == (strat, dual, abl, every, text)
        with pytest.warns(DeprecationWarning, match="MethodSpec"):
            assert C.parse_method(text) == (strat, dual, abl, every)


@pytest.mark.parametrize("bad", ["", None, 3, "fedsgd", "FEDAVG", "fedsq+", "fedsq+fedsgd", "fedavg:refresh=2",
                                 "fedsq:refresh=0", "fedsq:refresh=-1", "fedsq:refresh=x", "fedsq:refresh",
                                 "fedsq:refresh=\u00b2", "fedsq:shuffle=2", "fedsq+fedsq"])
def test_method_spec_refusals(bad):
    with pytest.raises(C.ConfigError) as e:
        C.MethodSpec.parse(bad)
    assert e.value.key == "methods"
    with pytest.raises(C.ConfigError):
        C.validate(C.from_mapping({"methods": ["fedavg", bad]}))


# ------------------------------------------------------------------ the client's options
def test_local_config_is_the_client_section(rng):
    client_keys = [k for k, s in SECTION.items() if s == "client"]
    assert [f.name for f in dataclasses.fields(LocalConfig)] == \
        [f.name for f in dataclasses.fields(ClientConfig)] + ["prox_mu"]
    assert set(client_keys) == {f.name for f in dataclasses.fields(ClientConfig)}
    for _ in range(5):
        d = random_flat(rng)
        cfg = C.from_mapping(d)
        mu = float(rng.uniform(0, 1))
        lc = C.local_config(cfg, mu)
        assert dataclasses.asdict(lc) == {**{k: d[k] for k in client_keys}, "prox_mu": mu}
        assert LocalConfig(**json.loads(json.dumps(dataclasses.asdict(lc)))) == lc  # the Flower path
    with pytest.warns(DeprecationWarning, match="client_timeout_s"):
        old = LocalConfig(timeout_s=2.5)
    assert old.client_timeout_s == 2.5 and old.timeout_s == 2.5 and not math.isnan(old.lr)


def test_old_positional_call_forms(rng):
    """Positional arguments mean what they meant before the sections: RunConfig in the old
    flat order, LocalConfig as (optimizer, lr, momentum, weight_decay, local_epochs,
    batch_size, prox_mu, timeout_s)."""
    d = random_flat(rng)
    assert C.RunConfig(*(d[k] for k in OLD_DEFAULTS)).to_dict() == {**d, **ADDED}  # newer keys: defaults
    assert C.RunConfig(*(d[k] for k in FULL)).to_dict() == d
    with pytest.raises(TypeError, match="multiple values"):
        C.RunConfig("digits", dataset="mnist")
    with pytest.raises(TypeError, match="learning_rate"):
        C.RunConfig(learning_rate=0.1)
    args = ("adam", 0.3, 0.5, 0.01, 2, 16, 0.25)
    lc = LocalConfig(*args)
    assert (lc.optimizer, lc.lr, lc.momentum, lc.weight_decay, lc.local_epochs, lc.batch_size, lc.prox_mu) == args
    with pytest.warns(DeprecationWarning):
        assert LocalConfig(*args, 4.0).client_timeout_s == 4.0
    with pytest.raises(TypeError):
        LocalConfig(*args, None, 3)  # min_batch_size was never positional-safe: keyword-only now
