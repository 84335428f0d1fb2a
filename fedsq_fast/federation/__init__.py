"""Federation API: data, partitions, local training, strategies, the simulation engine.

One implementation of clients, server and strategies: strategies are pure
state-dict transforms (a Flower ServerApp can call ``Strategy.aggregate``), local
training is a pure function (a Flower ClientApp can call ``local_train``), and
FedSQ is the DualCopy model under any strategy (see :mod:`.adapter`).
"""
from .adapter import build_model, gate_change_sites, list_models, load_payload, payload_state  # noqa: F401
from .callbacks import Callback, GateStability, Progress  # noqa: F401
from .client import LocalConfig, derive_seed, evaluate, local_train  # noqa: F401
from .config import RunConfig, from_mapping, load_file, parse_method, validate  # noqa: F401
from .config import (ClientConfig, DataConfig, MethodSpec, ModelConfig, RunSection, StrategyConfig,  # noqa: F401
                     load_config, strategy_from_config)
from .data import DATASETS, DataBundle, InMemoryDataset, InputSpec, input_spec_of, load_dataset, make_bundle  # noqa: F401
from .lazy import LazyImages  # noqa: F401
from .runner import federate  # noqa: F401
from .partition import PARTITIONS, class_counts, make_partition  # noqa: F401
from .metrics import RoundRecord, summarize  # noqa: F401
from .prepare import FedData, prepare_data  # noqa: F401
from .server import Federation, RunResult  # noqa: F401
from .transport import InProcessTransport, Reply, RoundTask, Transport  # noqa: F401
from .workers import WorkerPoolTransport  # noqa: F401
from .trainer import ClientTrainer  # noqa: F401
from .strategy import STRATEGIES, AggregateStats, Strategy, check_update, make_strategy, stream_average  # noqa: F401
from .strategy import StrategyOptionError, strategy_options  # noqa: F401


def __getattr__(name):
    if name == "gate_stability":  # renamed: fedsq_fast.models.gate_stability (a dict) keeps the name
        import warnings

        warnings.warn("fedsq_fast.federation.gate_stability is deprecated: use gate_change_sites (a list "
                      "per site) or fedsq_fast.models.gate_stability (a dict)", DeprecationWarning, stacklevel=2)
        return gate_change_sites
    if name == "TensorDataset":  # renamed: it shadowed torch.utils.data.TensorDataset
        from . import data

        return data.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
