"""FedSQ on Flower's deployment engine: a ServerApp and a ClientApp over the embedded engine.

Nothing of FedSQ or FedAvg is reimplemented here. The ServerApp runs the engine's driver
and round loop (``run_methods`` / ``Federation``: sampling, seeds, aggregation, validation,
gate stability, checkpoints, metrics files, resume) with a :class:`GridTransport`: the
round's task goes to the SuperNodes and their replies are folded as they come back. The
ClientApp holds only client pieces (a :class:`~fedsq_fast.federation.trainer.ClientTrainer`:
its partition, its model, ``local_train`` seeded from (seed, round, partition id)), so a run
on Flower computes what the embedded engine computes for the same config.

Run config (``[tool.flwr.app.config]`` in flower/pyproject.toml, ``flwr run --run-config``):
every RunConfig key with dashes (``""`` = not set, ``"none"`` = None), plus
``config-file`` (a fedsq TOML/YAML read by the ServerApp), ``round-timeout`` (seconds to
wait for a round's replies), ``aggregation-order`` (``sorted``: fold in partition order,
reproducible; ``arrival``: fold as replies arrive, one reply in memory) and ``resume``.
Node config (``flower-supernode --node-config``): ``partition-id``, ``num-partitions``
(must equal num_clients), optional ``data-root``.
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..federation.client import LocalConfig
from ..federation.config import RunConfig, from_mapping, load_file, validate
from ..federation.config.files import _nullable
from ..federation.prepare import prepare_data
from ..federation.runner import run_methods
from ..federation.server import Federation
from ..federation.trainer import ClientTrainer, client_trainer
from .arrays import arrays_to_state, state_to_arrays
from .secagg import SecAggTransport, check_unmask_request, secagg_fit_reply
from .strategy import (ARRAYS_KEY, C_FINGERPRINT, C_LOCAL, C_METHOD, C_PARTITIONS, C_ROUND, C_RUN_CONFIG,
                       CONFIG_KEY, METRICS_KEY, PARTITION_KEY, WEIGHT_KEY)
from .transport import (FIRST_ROUND_S, MIN_ROUND_S, ORDERS, GridTransport, first_round_timeout,  # noqa: F401 (API)
                        fingerprint, reject_ablation)

log = logging.getLogger("fedsq_fast.flower")

# Run-config keys of the Flower app that are not RunConfig keys (name -> default).
FLOWER_KEYS = {"config-file": "", "round-timeout": "auto", "aggregation-order": "sorted", "resume": False}
LOCAL_STATE_KEY = "fedsq.local"  # Context.state record: a client's own layers (FedBN)


# ---------------------------------------------------------------------------- config
def config_from_run_config(run_config) -> tuple[RunConfig, dict]:
    """(RunConfig, Flower options) from a Flower run config. Precedence: RunConfig
    defaults < ``config-file`` < keys set in the run config ("" leaves a key unset)."""
    rc = dict(run_config)
    opts = {}
    for k, default in FLOWER_KEYS.items():
        v = rc.pop(k, default)
        opts[k] = default if v == "" else v
    rt = opts["round-timeout"]
    if rt != "auto" and (isinstance(rt, bool) or not isinstance(rt, (int, float)) or not rt > 0
                         or not math.isfinite(rt)):
        raise ValueError(f"round-timeout: must be 'auto' or a positive number of seconds, got {rt!r}")
    if opts["aggregation-order"] not in ORDERS:
        raise ValueError(f"aggregation-order: must be one of {', '.join(ORDERS)}, got {opts['aggregation-order']!r}")
    if not isinstance(opts["resume"], bool):
        raise ValueError(f"resume: must be true or false, got {opts['resume']!r}")
    base = from_mapping(load_file(opts["config-file"])) if opts["config-file"] else RunConfig()
    # "none" is None only for keys that may be None (as in config files): augment = "none" is a value
    over = {k: (None if v == "none" and _nullable(k.replace("-", "_")) else v) for k, v in rc.items() if v != ""}
    return from_mapping(over, base), {"round_timeout": None if rt == "auto" else float(rt),
                                      "order": opts["aggregation-order"],
                                      "resume": opts["resume"]}


# ---------------------------------------------------------------------------- server
def FlowerFederation(cfg: RunConfig, method: str, data, grid: Grid, *, round_timeout: float | None = None,
                     order: str = "sorted", poll_s: float = 0.5, **kw) -> Federation:
    """Deprecated: ``Federation(cfg, method, data, transport=GridTransport(grid, ...), quiet=True)``."""
    warnings.warn("FlowerFederation(...) is deprecated: use Federation(cfg, method, data, "
                  "transport=fedsq_fast.flower.GridTransport(grid, ...))", DeprecationWarning, stacklevel=2)
    kw.setdefault("quiet", True)
    return Federation(cfg, method, data, transport=GridTransport(grid, round_timeout=round_timeout, order=order,
                                                                 poll_s=poll_s), **kw)


def wait_for_nodes(grid: Grid, n: int, timeout: float, poll_s: float = 1.0) -> int:
    """Wait (at most ``timeout`` s) until ``n`` nodes are connected, like Flower's
    min_available_nodes; a run then starts with whatever is connected."""
    end = time.monotonic() + timeout
    while (have := len(list(grid.get_node_ids()))) < n and time.monotonic() < end:
        log.info("waiting for nodes: %d of %d connected", have, n)
        time.sleep(poll_s)
    if have < n:
        log.warning("starting with %d of %d nodes connected", have, n)
    return have


def run_federation(grid: Grid, cfg: RunConfig, *, round_timeout: float | None = None, order: str = "sorted",
                   resume: bool = False, poll_s: float = 0.5) -> dict:
    """Every method of ``cfg`` on the nodes behind ``grid``: the engine's driver
    (:func:`~fedsq_fast.federation.runner.run_methods`) with a :class:`GridTransport`, so the
    same files as ``fedsq-fast run`` (OUT/partition.txt, partition.png, OUT/<method>/...).
    ``poll_s``: seconds between pulls of replies (simulation uses Flower's own 0.1 s)."""
    for m in cfg.methods if isinstance(cfg.methods, (list, tuple)) else ():
        reject_ablation(m)
    return run_methods(cfg, resume=resume, echo=log.info, progress=False,
                       transport_fn=lambda method: (
                           SecAggTransport(grid, round_timeout=round_timeout, poll_s=poll_s) if cfg.secagg else
                           GridTransport(grid, round_timeout=round_timeout, order=order, poll_s=poll_s)),
                       before_methods=lambda data: wait_for_nodes(grid, cfg.num_clients,
                                                                  round_timeout or first_round_timeout(cfg)))


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    if not logging.getLogger("fedsq_fast").handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s fedsq: %(message)s"))
        logging.getLogger("fedsq_fast").addHandler(h)
        logging.getLogger("fedsq_fast").setLevel(logging.INFO)
    cfg, opts = config_from_run_config(context.run_config)
    log.info("fedsq run config: %s", json.dumps(cfg.to_dict()))
    run_federation(grid, cfg, **opts)


# ---------------------------------------------------------------------------- client
_RUNTIME: dict = {}  # (config, method, partition) -> ClientTrainer, for processes that serve several messages
# config -> the prepared data (split, partitions), one entry: a process that serves several partitions
# (a simulation actor) builds it once, not per message (MNIST: ~2 s each); a SuperNode's
# per-message ClientApp process never reuses it.
_DATA: dict = {}
# (config, method) -> the method's model (for FedSQ with its structural copy): built once per process,
# reused by the next partition's trainer (each step loads the global payload first; the structural
# copy is the same for every partition), not rebuilt and converted per message
_MODEL: dict = {}


def node_partition(node_config, cfg: RunConfig) -> int:
    """This node's partition id from its node config (checked against the run's num_clients)."""
    nc = dict(node_config)
    for k in ("partition-id", "num-partitions"):
        if k not in nc:
            raise ValueError(f"node config: {k} is missing (flower-supernode --node-config "
                             f"'partition-id=0 num-partitions={cfg.num_clients}')")
        if isinstance(nc[k], bool) or not isinstance(nc[k], int):
            raise ValueError(f"node config: {k} must be an integer, got {nc[k]!r}")
    pid, num = nc["partition-id"], nc["num-partitions"]
    if num != cfg.num_clients:
        raise ValueError(f"node config: num-partitions ({num}) must equal the run's num_clients "
                         f"({cfg.num_clients})")
    if not 0 <= pid < num:
        raise ValueError(f"node config: partition-id must be in [0, {num}), got {pid}")
    return pid


def client_runtime(cfg: RunConfig, method: str, pid: int) -> ClientTrainer:
    """This node's client pieces: its partition, its model (for FedSQ with its structural
    copy), ``local_train`` (:func:`~fedsq_fast.federation.trainer.client_trainer`)."""
    ckey = json.dumps(cfg.to_dict(), sort_keys=True)
    key = (ckey, method, pid)
    if key not in _RUNTIME:
        _RUNTIME.clear()
        reject_ablation(method)
        if ckey not in _DATA:
            _DATA.clear()
            _DATA[ckey] = prepare_data(cfg)
        prev = _MODEL.pop((ckey, method), None)  # the model the last trainer of this run and method used
        _MODEL.clear()
        _RUNTIME[key] = client_trainer(cfg, method, pid, data=_DATA[ckey], model=prev)
        _MODEL[(ckey, method)] = _RUNTIME[key].worker
    return _RUNTIME[key]


def _get(rec: ConfigRecord, key: str, kind):
    if key not in rec:
        raise ValueError(f"message config: {key} is missing")
    v = rec[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise ValueError(f"message config: {key} must be {kind.__name__}, got {v!r}")
    return v


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """The ClientApp's mod for ``secagg = true``: a train message of Flower's SecAgg+ protocol
    (it carries ``secaggplus_configs``) goes through ``flwr.client.mod.secaggplus_mod``, whose
    masked-vector stage trains through :func:`_client_secagg_train`; every other message
    (rounds without SecAgg+, evaluation) goes on unchanged."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    check_unmask_request(msg.content.config_records[RECORD_KEY_CONFIGS])
    return secaggplus_mod(msg, context, _client_secagg_train)


client_app = ClientApp(mods=[secagg_mod])


def _client_secagg_train(msg: Message, context: Context) -> Message:
    """The masked-vector stage's train step: the update in the form secaggplus_mod masks
    (:func:`fedsq_fast.flower.secagg.secagg_fit_reply`)."""
    step = _client_step(msg, context)
    if isinstance(step, Message):
        raise ValueError("secagg: this node's partition is not among the round's, yet it was sent the round's task")
    state, info, glob, pid, cfg, rnd = step
    return secagg_fit_reply(msg, context, state, glob, info, pid, cfg, rnd)


def _client_setup(msg: Message, context: Context):
    """What a train or evaluate message asks of this node: (config record, run config, method,
    round, partition id, trainer, global state), or a ``sampled = 0`` reply Message where
    its partition is not asked for."""
    c = msg.content.config_records.get(CONFIG_KEY)
    if c is None:
        raise ValueError(f"message: no ConfigRecord {CONFIG_KEY!r}")
    cfg = from_mapping(json.loads(_get(c, C_RUN_CONFIG, str)))
    if "data-root" in context.node_config and cfg.dataset != "digits":  # where this node keeps its data
        cfg.data_root = str(context.node_config["data-root"])  # (digits ships with scikit-learn: no root)
    validate(cfg)
    method, rnd = _get(c, C_METHOD, str), _get(c, C_ROUND, int)
    pid = node_partition(context.node_config, cfg)
    if C_PARTITIONS in c and pid not in list(c[C_PARTITIONS]):
        return Message(RecordDict({METRICS_KEY: MetricRecord({PARTITION_KEY: pid, "sampled": 0})}), reply_to=msg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trainer = client_runtime(cfg, method, pid)
    fp = c.get(C_FINGERPRINT)
    if fp and fingerprint(trainer.worker) not in (None, fp):
        raise ValueError("structural copy differs from the server's (other pretrained weights or "
                         f"architecture): fingerprint {fingerprint(trainer.worker)} != {fp}")
    arrays = msg.content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"message: no ArrayRecord {ARRAYS_KEY!r}")
    glob = arrays_to_state(arrays, arg=ARRAYS_KEY)
    stored = context.state.array_records.get(LOCAL_STATE_KEY)
    local = arrays_to_state(stored, arg=LOCAL_STATE_KEY) if stored is not None else None
    trainer.local_states = {pid: local} if local else {}  # FedBN: kept in the node's Context, not here
    return c, cfg, method, rnd, pid, trainer, glob


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation (fedsq_fast.federation.evaluation): this partition's test split
    evaluated on the global model (FedSQ: with this node's gates; FedBN: its own layers)."""
    got = _client_setup(msg, context)
    if isinstance(got, Message):
        return got
    _, cfg, _, _, pid, trainer, glob = got
    n, loss, acc = trainer.evaluate(pid, glob, cfg.eval_batch_size, cfg.precision)
    metrics = MetricRecord({WEIGHT_KEY: int(n), PARTITION_KEY: pid, "eval-loss": float(loss),
                            "eval-accuracy": float(acc)})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _client_step(msg: Message, context: Context):
    """The train step both reply forms share (plain and SecAgg+): a Message (this node's
    partition does not train this round) or (state, info, global state, partition id,
    config, round)."""
    got = _client_setup(msg, context)
    if isinstance(got, Message):
        return got
    c, cfg, method, rnd, pid, trainer, glob = got
    lcfg = LocalConfig(**json.loads(_get(c, C_LOCAL, str)))
    state, info = trainer.train(rnd, pid, glob, lcfg)
    keys = trainer.local_keys(glob)
    if keys:  # FedBN: this node's own layers stay here, across rounds
        context.state[LOCAL_STATE_KEY] = state_to_arrays({k: state[k] for k in keys})
    return state, info, glob, pid, cfg, rnd


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    step = _client_step(msg, context)
    if isinstance(step, Message):
        return step
    state, info, _, pid, _, _ = step
    metrics = MetricRecord({WEIGHT_KEY: int(info["num_samples"]), PARTITION_KEY: pid,
                            "train-loss": float(info["loss"]), "client-seconds": float(info["seconds"])})
    return Message(RecordDict({ARRAYS_KEY: state_to_arrays(state), METRICS_KEY: metrics}), reply_to=msg)


__all__ = ["server_app", "client_app", "GridTransport", "FlowerFederation", "run_federation", "config_from_run_config",
           "client_runtime", "node_partition", "wait_for_nodes"]
