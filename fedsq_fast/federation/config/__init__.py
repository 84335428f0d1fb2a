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

The package: :mod:`.sections` (the dataclasses), :mod:`.files` (mappings and files),
:mod:`.methods` (MethodSpec, strategies from a config), :mod:`.checks` (validate), and
:mod:`.errors`; everything public is importable from here.
"""
from .checks import (DATA_KEYS, IMAGE_SIZE_RANGE, MAX_CLIENTS, MAX_LOCAL_EPOCHS, MAX_ROUNDS,  # noqa: F401
                     MAX_SHARDS_PER_CLIENT, MAX_THREADS, NO_LIMITS_ENV, limits_lifted,
                     MODEL_KEYS, check_options_used, check_sources, resolve_device, validate)
from .errors import ConfigError, _fail  # noqa: F401
from .files import flatten, from_mapping, load_config, load_file, read_json, read_toml  # noqa: F401
from .methods import ABLATIONS, STRATEGY_OPTION_KEYS, MethodSpec, parse_method, strategy_from_config  # noqa: F401
from .sections import (KEYS, LEGACY_VALUES, PLACEMENT_KEYS, SECTION_OF, SECTIONS, ClientConfig, DataConfig,  # noqa: F401
                       LocalConfig, ModelConfig, RunConfig, RunSection, StrategyConfig, config_differences,
                       local_config)
