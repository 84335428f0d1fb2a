"""FedSQ on Flower's deployment engine: a ServerApp and a ClientApp over the embedded engine.

Nothing of FedSQ or FedAvg is reimplemented here. The server is the engine's
``Federation`` (sampling, seeds, aggregation through ``Strategy.aggregate`` /
``stream_average``, validation, gate stability, checkpoints, metrics files, resume)
with one thing replaced: where the engine trains its clients in process, this one sends
the global payload to the SuperNodes and folds their replies as they come back. The
client runs the engine's local step (``local_train`` on the engine's worker model, seeded
from (seed, round, partition id)), so a run on Flower computes what the embedded engine
computes for the same config.

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
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..federation import adapter
from ..federation.client import LocalConfig
from ..federation.config import RunConfig, from_mapping, load_file, parse_method, validate
from ..federation.partition import partition_table
from ..federation.runner import check_methods_supported, method_slug, partition_tag
from ..federation.server import Federation, prepare_data
from ..plots import plot_partition
from .arrays import arrays_to_state, state_to_arrays
from .strategy import (ARRAYS_KEY, C_FINGERPRINT, C_LOCAL, C_METHOD, C_PARTITIONS, C_ROUND, C_RUN_CONFIG,
                       CONFIG_KEY, METRICS_KEY, PARTITION_KEY, WEIGHT_KEY, ReplyRejected, reply_info,
                       reply_state, train_config)

log = logging.getLogger("fedsq_fast.flower")

# Run-config keys of the Flower app that are not RunConfig keys (name -> default).
FLOWER_KEYS = {"config-file": "", "round-timeout": "auto", "aggregation-order": "sorted", "resume": False}
# round-timeout "auto": the first round (and the wait for nodes) gets client_timeout_s + 120 s when
# the config bounds a client, else FIRST_ROUND_S; later rounds 4x the slowest round seen so far
# (at least MIN_ROUND_S), so a live but silent node costs minutes, not the hour it used to.
FIRST_ROUND_S, MIN_ROUND_S = 600.0, 60.0
ORDERS = ("sorted", "arrival")
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
    over = {k: (None if v == "none" else v) for k, v in rc.items() if v != ""}
    return from_mapping(over, base), {"round_timeout": None if rt == "auto" else float(rt),
                                      "order": opts["aggregation-order"],
                                      "resume": opts["resume"]}


def _fingerprint(model) -> str | None:
    f = getattr(model, "structural_fingerprint", None)
    return f() if callable(f) else None


def _reject_ablation(method: str) -> None:
    if parse_method(method)[2]:
        # A refreshed structural copy would have to travel (or be replayed per client): not supported.
        raise ValueError(f"methods: {method!r}: structural-copy ablations are not supported on Flower")


def first_round_timeout(cfg: RunConfig) -> float:
    """The auto round-timeout before any round has been timed (the nodes also load data and
    build models then): client_timeout_s + 120 s when set, else FIRST_ROUND_S."""
    return cfg.client_timeout_s + 120.0 if cfg.client_timeout_s else FIRST_ROUND_S


# ---------------------------------------------------------------------------- server
class FlowerFederation(Federation):
    """The engine's Federation whose clients are SuperNodes reached through ``grid``.

    Partition ids are the engine's client ids: the server samples them exactly as the
    engine does and learns which node holds which partition from the replies (nodes
    not seen yet get the round's message with the list of partitions that train; a node
    whose partition is not in it answers at once without training).
    """

    def __init__(self, cfg: RunConfig, method: str, data, grid: Grid, *, round_timeout: float | None = None,
                 order: str = "sorted", poll_s: float = 0.5, **kw):
        _reject_ablation(method)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        super().__init__(cfg, method, data, quiet=True, **kw)
        self.grid, self.order, self.poll_s = grid, order, poll_s
        self.round_timeout = None if round_timeout is None else float(round_timeout)  # None: auto
        self._slowest = 0.0  # seconds from sending a round to its last reply, the most seen
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.fingerprint = _fingerprint(self.model)

    def timeout_for_round(self) -> float:
        """Seconds to wait for this round's replies: the configured round-timeout, or (auto)
        :func:`first_round_timeout` until a round has been seen, then 4x the slowest round so far
        (at least MIN_ROUND_S)."""
        if self.round_timeout is not None:
            return self.round_timeout
        if self._slowest == 0.0:
            return first_round_timeout(self.cfg)
        return max(MIN_ROUND_S, 4.0 * self._slowest)

    def _drop(self, rnd, dropped, pid, reason):
        dropped.append((pid, reason))
        log.warning("round %d: client %d dropped: %s", rnd, pid, reason)

    def client_replies(self, rnd, glob, targets, dropped, acc, bar=None):
        """Send the round's message, then yield ``(partition id, state, n)`` as replies come
        back (``sorted``: in increasing partition id, holding only early arrivals)."""
        lcfg = self.local_config(rnd)
        content = RecordDict({ARRAYS_KEY: state_to_arrays(glob, arg="global state"),
                              CONFIG_KEY: train_config(self.cfg, self.method, rnd, lcfg, targets,
                                                       self.fingerprint)})
        online = set(self.grid.get_node_ids())
        held = {p: n for p, n in self.node_of.items() if n in online}
        unknown = online - set(held.values())
        dests = sorted({held[p] for p in targets if p in held} | unknown)
        if not dests:
            for p in targets:
                self._drop(rnd, dropped, p, "no connected node")
            return
        msgs = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(rnd))
                for n in dests]
        ids = list(self.grid.push_messages(msgs))
        node_by_msg = {i: n for i, n in zip(ids, dests) if i is not None}
        acc["sent"] = len(node_by_msg)
        pending = set(node_by_msg)
        wanted, resolved, buffer, arrived = set(targets), set(), {}, []
        queue = sorted(targets)
        t_sent = time.monotonic()
        timeout = self.timeout_for_round()
        deadline = t_sent + timeout
        errors: dict[int, str] = {}  # node id -> error reason (node's partition not known yet)

        def ready():
            nonlocal queue
            if self.order == "arrival":
                out = [p for p in arrived if p in buffer]
                arrived.clear()
                return out
            out = []
            while queue and queue[0] in resolved:
                p = queue.pop(0)
                if p in buffer:
                    out.append(p)
            return out

        while True:
            got = self.grid.pull_messages(list(pending)) if pending else []
            for msg in got:
                mid = msg.metadata.reply_to_message_id
                pending.discard(mid)
                node = node_by_msg.get(mid, msg.metadata.src_node_id)
                pid_known = next((p for p, n in held.items() if n == node), None)
                try:
                    info = reply_info(msg)
                except ReplyRejected as e:
                    if pid_known is not None and pid_known in wanted and pid_known not in resolved:
                        resolved.add(pid_known)
                        self._drop(rnd, dropped, pid_known, str(e))
                    else:
                        errors[node] = str(e)
                        log.warning("round %d: node %d: %s", rnd, node, e)
                    continue
                pid = info.get(PARTITION_KEY)
                if pid is None:
                    log.warning("round %d: node %d replied without %s: ignored", rnd, node, PARTITION_KEY)
                    continue
                prev = self.node_of.get(pid)
                if prev is not None and prev != node and prev in online and pid in resolved:
                    log.warning("round %d: node %d also claims partition %d (held by node %d): ignored",
                                rnd, node, pid, prev)
                    continue
                self.node_of[pid] = node
                if info.get("sampled", 1) == 0:
                    continue
                if pid not in wanted or pid in resolved:
                    log.warning("round %d: unexpected reply for partition %d from node %d: ignored",
                                rnd, pid, node)
                    continue
                resolved.add(pid)
                buffer[pid] = (msg, info)
                arrived.append(pid)
            for pid in ready():
                yield from self._fold(rnd, pid, *buffer.pop(pid), dropped, acc)
            if got:
                self._slowest = max(self._slowest, time.monotonic() - t_sent)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(self.poll_s)
        for p in sorted(wanted - resolved):
            node = held.get(p)
            if node is not None and node in errors:
                reason = errors[node]
            elif pending:
                reason = f"no reply within round-timeout ({timeout:g} s)"
            else:
                reason = "no connected node holds this partition" + (
                    f" (node errors: {sorted(set(errors.values()))})" if errors else "")
            self._drop(rnd, dropped, p, reason)
        for pid in sorted(buffer):
            yield from self._fold(rnd, pid, *buffer.pop(pid), dropped, acc)

    def _fold(self, rnd, pid, msg, info, dropped, acc):
        try:
            state = {k: t.to(self.device) for k, t in reply_state(msg).items()}  # decoded on the CPU
        except ReplyRejected as e:
            self._drop(rnd, dropped, pid, f"update rejected: {e}")
            return
        n = info[WEIGHT_KEY]
        acc["client_s"] += float(info.get("client-seconds", 0.0))
        acc["up"] += adapter.state_bytes(state)
        acc["loss"] += float(info.get("train-loss", float("nan"))) * n
        acc["n"] += n
        yield pid, state, n


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
                   resume: bool = False) -> dict:
    """Every method of ``cfg`` on the nodes behind ``grid``; the same files as ``fedsq-fast run``
    (OUT/partition.txt, partition.png, OUT/<method>/metrics.json, metrics.csv, checkpoint)."""
    validate(cfg, adapter.list_models())
    check_methods_supported(cfg.methods)
    for m in cfg.methods:
        _reject_ablation(m)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = prepare_data(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition.txt").write_text(partition_table(data.counts, data.classes) + "\n")
    plot_partition(data.counts, out / "partition.png", data.classes,
                   f"{cfg.dataset}, {partition_tag(cfg.to_dict())}, seed {cfg.seed}")
    wait_for_nodes(grid, cfg.num_clients, round_timeout or first_round_timeout(cfg))
    results = {}
    for m in cfg.methods:
        fed = FlowerFederation(cfg, m, data, grid, round_timeout=round_timeout, order=order,
                               out_dir=out / method_slug(m))
        results[m] = fed.run(resume=resume)
        s = results[m].summary
        log.info("%s: BVA %.4f at round %s, final %.4f, test %.4f", m, s["bva"], s["rounds_to_best"],
                 s["final_val_acc"], s.get("test_acc", float("nan")))
    return results


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
_RUNTIME: dict = {}  # one (config, method) -> Federation, for processes that serve several messages


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


def client_runtime(cfg: RunConfig, method: str) -> Federation:
    """The engine's Federation on this node: data split and partitioned from the config,
    the initial model (pretrained weights) and, for FedSQ, its structural copy, built here."""
    key = (json.dumps(cfg.to_dict(), sort_keys=True), method)
    if key not in _RUNTIME:
        _RUNTIME.clear()
        _reject_ablation(method)
        check_methods_supported([method])
        _RUNTIME[key] = Federation(cfg, method, prepare_data(cfg), quiet=True)
    return _RUNTIME[key]


def train_partition(fed: Federation, rnd: int, pid: int, glob: dict, local: dict | None,
                    lcfg: LocalConfig) -> tuple[dict, dict]:
    """One client's local step exactly as the engine's round runs it: the engine's own
    Federation.train_client, with this node's local layers (FedBN) from its state."""
    fed.local_states.pop(pid, None)
    if local:
        fed.local_states[pid] = local
    return fed.train_client(rnd, pid, glob, lcfg)


def _get(rec: ConfigRecord, key: str, kind):
    if key not in rec:
        raise ValueError(f"message config: {key} is missing")
    v = rec[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise ValueError(f"message config: {key} must be {kind.__name__}, got {v!r}")
    return v


client_app = ClientApp()


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
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
    fed = client_runtime(cfg, method)
    fp = c.get(C_FINGERPRINT)
    if fp and _fingerprint(fed.model) not in (None, fp):
        raise ValueError("structural copy differs from the server's (other pretrained weights or "
                         f"architecture): fingerprint {_fingerprint(fed.model)} != {fp}")
    arrays = msg.content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"message: no ArrayRecord {ARRAYS_KEY!r}")
    glob = arrays_to_state(arrays, arg=ARRAYS_KEY)
    stored = context.state.array_records.get(LOCAL_STATE_KEY)
    local = arrays_to_state(stored, arg=LOCAL_STATE_KEY) if stored is not None else None
    lcfg = LocalConfig(**json.loads(_get(c, C_LOCAL, str)))
    state, info = train_partition(fed, rnd, pid, glob, local, lcfg)
    keys = fed.strategy.local_keys(glob)
    if keys:  # FedBN: this node's own layers stay here, across rounds
        context.state[LOCAL_STATE_KEY] = state_to_arrays({k: state[k] for k in keys})
    metrics = MetricRecord({WEIGHT_KEY: int(info["num_samples"]), PARTITION_KEY: pid,
                            "train-loss": float(info["loss"]), "client-seconds": float(info["seconds"])})
    return Message(RecordDict({ARRAYS_KEY: state_to_arrays(state), METRICS_KEY: metrics}), reply_to=msg)


__all__ = ["server_app", "client_app", "FlowerFederation", "run_federation", "config_from_run_config",
           "client_runtime", "train_partition", "node_partition", "wait_for_nodes"]
