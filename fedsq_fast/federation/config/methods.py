"""Methods (``fedsq+fedprox:refresh=3``) parsed once into :class:`MethodSpec`, and each
method's server strategy built from a config with only the options it takes."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..strategy import STRATEGIES, make_strategy, strategy_options
from .errors import _fail
from .sections import KEYS, RunConfig

# Keys some strategies read and others do not (make_strategy refuses them where not read).
STRATEGY_OPTION_KEYS = tuple(k for k in KEYS if any(k in strategy_options(s) for s in STRATEGIES))


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
    strat = make_strategy(spec.strategy, aggregator=cfg.aggregator, trim_fraction=cfg.trim_fraction,
                          plausible_scale=cfg.plausible_scale, norm_bound=cfg.norm_bound,
                          batch_size=cfg.batch_size, krum_f=cfg.krum_f, krum_m=cfg.krum_m,
                          clip_radius=cfg.clip_radius, **opts)
    if getattr(cfg, "dp", "none") != "none":  # DP-FedAvg's aggregation (federation/privacy.py)
        from ..privacy import DPAggregator, settings_from_config

        strat.dp = DPAggregator(settings_from_config(cfg))
    return strat
