"""Flower messages <-> the engine's strategies: one FedSQ/FedAvg implementation.

The aggregation is the engine's: ``Strategy.aggregate`` (``stream_average``, i.e.
:class:`fedsq_fast.StreamingAverage`: exact integer buffers, float32 accumulation, any
server optimizer on top). This module only turns Flower messages into
``(client_id, state_dict, num_samples)`` triples, one at a time, and rejects replies
that are malformed before they reach the kernel (the kernel's own check then rejects
wrong keys, shapes, dtypes and NaN/Inf). :class:`FedSQStrategy` is a
``flwr.serverapp.strategy.Strategy`` for Flower's own round loop (``strategy.start``)
and its wrappers; the ServerApp in :mod:`.app` drives the engine's round loop instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy as FlowerStrategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..federation.server import make_method_strategy
from ..federation.client import LocalConfig
from ..federation.config import MethodSpec, RunConfig, local_config
from ..federation.strategy import AggregateStats, Strategy
from ..federation.transport import FoldTotals, Reply, fold
from .arrays import arrays_to_state, state_to_arrays

log = logging.getLogger("fedsq_fast.flower")

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"  # Flower's convention, so its FedAvg can read our replies too
PARTITION_KEY = "partition-id"
# ConfigRecord keys the ClientApp reads
C_ROUND = "server-round"
C_RUN_CONFIG = "fedsq.run-config"  # JSON of RunConfig.to_dict(): the server's config is the only one
C_METHOD = "fedsq.method"
C_LOCAL = "fedsq.local-config"  # JSON of LocalConfig (Strategy.client_config folded in)
C_PARTITIONS = "fedsq.partitions"  # partition ids that train this round (absent: every receiver)
C_FINGERPRINT = "fedsq.structural-fingerprint"


def reject_ablation(method: str) -> None:
    """Structural-copy ablations cannot run on Flower: a refreshed structural copy would have
    to travel (or be replayed per client)."""
    if MethodSpec.parse(method).ablation:
        raise ValueError(f"methods: {method!r}: structural-copy ablations are not supported on Flower")


class ReplyRejected(ValueError):
    """A reply that must not be averaged; the message is the reason."""


def engine_strategy(cfg: RunConfig, method: str) -> Strategy:
    """The engine strategy for ``method`` with the options Federation uses."""
    return make_method_strategy(cfg, method)


def train_config(cfg: RunConfig, method: str, rnd: int, lcfg: LocalConfig, partitions=None,
                 fingerprint: str | None = None) -> ConfigRecord:
    """What goes with the global arrays: the run config, the method, the local options."""
    c = ConfigRecord({C_ROUND: int(rnd), C_RUN_CONFIG: json.dumps(cfg.to_dict()), C_METHOD: method,
                      C_LOCAL: json.dumps(dataclasses.asdict(lcfg))})
    if partitions is not None:
        c[C_PARTITIONS] = [int(p) for p in partitions]
    if fingerprint:
        c[C_FINGERPRINT] = fingerprint
    return c


def eval_config(cfg: RunConfig, method: str, rnd: int, partitions, fingerprint: str | None = None) -> ConfigRecord:
    """What goes with the global arrays of a federated evaluation (EVALUATE messages): the run
    config, the method, the round, the partitions that evaluate."""
    c = ConfigRecord({C_ROUND: int(rnd), C_RUN_CONFIG: json.dumps(cfg.to_dict()), C_METHOD: method,
                      C_PARTITIONS: [int(p) for p in partitions]})
    if fingerprint:
        c[C_FINGERPRINT] = fingerprint
    return c


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ReplyRejected(f"{what} must be a finite number, got {v!r}")
    return v


def reply_info(msg: Message, metrics_key: str = METRICS_KEY) -> dict:
    """The reply's metrics (``partition-id``, ``num-examples``, ...) or ReplyRejected."""
    if msg.has_error():
        raise ReplyRejected(f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    mrec = content.metric_records.get(metrics_key)
    if mrec is None:
        raise ReplyRejected(f"no MetricRecord {metrics_key!r} (got {sorted(content.metric_records)})")
    info = dict(mrec)
    if PARTITION_KEY in info:
        p = info[PARTITION_KEY]
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ReplyRejected(f"{PARTITION_KEY} must be an integer >= 0, got {p!r}")
    if info.get("sampled", 1) == 0:  # a node that holds a partition not chosen this round
        return info
    n = _number(info.get(WEIGHT_KEY), WEIGHT_KEY)
    if n <= 0:
        raise ReplyRejected(f"{WEIGHT_KEY} must be > 0, got {n!r}")
    return info


def reply_state(msg: Message, arrays_key: str = ARRAYS_KEY) -> dict:
    """The reply's state dict (dtypes restored) or ReplyRejected with the reason."""
    recs = msg.content.array_records
    if arrays_key not in recs or len(recs) != 1:
        raise ReplyRejected(f"expected exactly one ArrayRecord {arrays_key!r}, got {sorted(recs)}")
    try:
        # views of the message's bytes: the aggregation only reads a reply, while it holds it
        return arrays_to_state(recs[arrays_key], arg=arrays_key, copy=False)
    except (ValueError, TypeError) as e:
        raise ReplyRejected(str(e)) from None


def client_label(info: dict, node_id: int):
    """The id a reply is folded and reported under: its partition id, else its node id."""
    return info.get(PARTITION_KEY, node_id)


def message_label(msg: Message, metrics_key: str = METRICS_KEY):
    """client_label of a reply that may be malformed (for reporting why it was rejected)."""
    if not msg.has_error():
        p = dict(msg.content.metric_records.get(metrics_key) or {}).get(PARTITION_KEY)
        if isinstance(p, int) and not isinstance(p, bool) and p >= 0:
            return p
    return msg.metadata.src_node_id


def log_rejected(rnd: int, stats: AggregateStats) -> None:
    for cid, reason in stats.rejected:
        log.warning("round %d: client %s update rejected: %s", rnd, cid, reason)


# Flower's own round loop (FedSQStrategy) has no data on the server, so it cannot know what a
# node holds: a claimed num-examples above COUNT_CAP x the cohort's median claim (cohorts of
# COUNT_CAP_MIN_COHORT or more) is weighted by that instead, and by max_count when one is set.
# Honest cohorts are far inside it (a quantity-skewed split's largest client held 12x the median);
# it bounds one liar's share of a round of K clients to COUNT_CAP / (COUNT_CAP + K - 1), no more:
# the engine's round loop (the ServerApp, simulation) caps by the partition sizes instead.
COUNT_CAP = 100.0
COUNT_CAP_MIN_COHORT = 3


def cohort_capped(claims: list, count_cap: float | None, max_count: int | None, stats: AggregateStats,
                  rnd: int) -> list:
    """The counts of ``claims`` (``(client, num-examples)``, already checked to be finite
    numbers > 0) that replies are weighted by: each claim capped at ``count_cap`` x the
    cohort's median claim (cohorts of COUNT_CAP_MIN_COHORT or more) and at ``max_count``;
    each capping logged and recorded in ``stats.capped``."""
    ns = [n for _, n in claims]
    cap = None
    if count_cap is not None and len(ns) >= COUNT_CAP_MIN_COHORT:
        cap = count_cap * statistics.median(float(n) for n in ns)
    if max_count is not None:
        cap = max_count if cap is None else min(cap, max_count)
    out = []
    for cid, n in claims:
        if cap is not None and n > cap:
            lim = max(1, math.floor(cap))
            stats.capped.append([cid, n, lim])
            log.warning("round %d: client %s claimed %s samples, above the cap %d (count_cap %s x the cohort "
                        "median, max_count %s): weighted by %d", rnd, cid, n, lim, count_cap, max_count, lim)
            n = lim
        out.append(n)
    return out


class FedSQStrategy(FlowerStrategy):
    """A Flower strategy whose aggregation is the engine's (FedSQ = the DualCopy payload
    under any engine strategy), for Flower's own ``start()`` loop and wrappers.

    ``cfg``/``method`` are sent to the ClientApp (it builds its model, structural copy
    and partition from them). Replies are validated, then folded one at a time in
    increasing partition-id order (node id when a reply has none), so the result does
    not depend on arrival order. ``last_stats`` keeps the last round's AggregateStats
    (rejected replies with reasons, drift, update norm).
    """

    def __init__(self, cfg: RunConfig, method: str = "fedsq", *, strategy: Strategy | None = None,
                 fraction_train: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 arrayrecord_key: str = ARRAYS_KEY, metrics_key: str = METRICS_KEY,
                 fingerprint: str | None = None, count_cap: float | None = COUNT_CAP,
                 max_count: int | None = None) -> None:
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
        if count_cap is not None and (isinstance(count_cap, bool) or not isinstance(count_cap, (int, float))
                                      or not 1 <= count_cap < math.inf):
            raise ValueError(f"count_cap must be a finite number >= 1 or None, got {count_cap!r}")
        if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1):
            raise ValueError(f"max_count must be an integer >= 1 or None, got {max_count!r}")
        self.count_cap, self.max_count = count_cap, max_count
        if getattr(cfg, "secagg", False):
            raise ValueError("secagg: true, but FedSQStrategy aggregates each node's reply in aggregate_train; SecAgg+ "
                             "runs through the package's ServerApp (fedsq_fast.flower.app:server_app, docs/flower.md "
                             "\"Secure aggregation (SecAgg+)\"); set secagg = false here")
        reject_ablation(method)
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train!r}")
        if getattr(cfg, "dp", "none") != "none":
            raise ValueError("dp: Flower's own round loop samples nodes with sample_nodes, not as the privacy "
                             "accountant assumes (poisson, or m of num_clients from the run's seed); run the "
                             "ServerApp (fedsq_fast.flower.app), whose round loop is the engine's")
        self.cfg, self.method = cfg, method
        self.engine = strategy if strategy is not None else engine_strategy(cfg, method)
        self.fraction_train = fraction_train
        self.min_train_nodes, self.min_available_nodes = int(min_train_nodes), int(min_available_nodes)
        self.arrayrecord_key, self.metrics_key = arrayrecord_key, metrics_key
        self.fingerprint = fingerprint
        self._reference: dict | None = None
        self.last_stats: AggregateStats | None = None

    def summary(self) -> None:
        log.info("FedSQStrategy: method %s, engine strategy %s, fraction_train %.2f, min nodes %d",
                 self.method, self.engine.name, self.fraction_train, self.min_train_nodes)

    def local_config(self, rnd: int) -> LocalConfig:
        return local_config(self.cfg, self.engine.client_config(rnd).get("prox_mu", 0.0), rnd)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid
                        ) -> Iterable[Message]:
        self._reference = arrays_to_state(arrays, arg="arrays")  # what replies are checked against
        n = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, n)
        cfg_rec = train_config(self.cfg, self.method, server_round, self.local_config(server_round),
                               fingerprint=self.fingerprint)
        for k, v in config.items():  # the caller's extra keys travel too
            cfg_rec.setdefault(k, v)
        content = RecordDict({self.arrayrecord_key: arrays, CONFIG_KEY: cfg_rec})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid) for nid in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._reference is None:
            raise RuntimeError("aggregate_train before configure_train: no global state to check replies against")
        stats = AggregateStats()
        self.last_stats = stats
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                info = reply_info(msg, self.metrics_key)
            except ReplyRejected as e:
                stats.rejected.append((message_label(msg, self.metrics_key), str(e)))
                continue
            if info.get("sampled", 1) == 0:
                continue
            valid.append((client_label(info, node), node, msg, info))
        valid.sort(key=lambda v: (v[0], v[1]))
        counts = cohort_capped([(cid, info[WEIGHT_KEY]) for cid, _, _, info in valid], self.count_cap,
                               self.max_count, stats, server_round)

        def decoded():
            for (cid, _, msg, info), n in zip(valid, counts):
                try:
                    state = reply_state(msg, self.arrayrecord_key)
                except ReplyRejected as e:
                    yield Reply(cid, error=str(e))
                    continue
                # the loss as sent: fold drops a reply whose loss is not a number (a list is a MetricRecord value)
                yield Reply(cid, state, n, loss=info.get("train-loss", math.nan))
                del state  # before the next reply is decoded: one client in memory, not two

        totals = FoldTotals()
        # the decoded replies are views of Flower's own messages, held by Flower anyway: not copied
        new = self.engine.aggregate(self._reference, fold(decoded(), totals,
                                                          lambda r: stats.rejected.append((r.cid, r.error))), stats,
                                    copy_held=False, rnd=server_round)
        log_rejected(server_round, stats)
        if stats.num_clients == 0:
            log.warning("round %d: no valid update: global model kept", server_round)
            return None, None
        metrics = {WEIGHT_KEY: int(min(stats.num_samples, 2**63 - 1)), "clients-ok": stats.num_clients,
                   "clients-rejected": len(stats.rejected)}
        if stats.capped:  # only where counts were capped: an honest round's metrics unchanged
            metrics["counts-capped"] = len(stats.capped)
        for k, v in (("train-loss", totals.train_loss),
                     ("client-drift", stats.client_drift), ("update-norm", stats.update_norm)):
            if math.isfinite(v):
                metrics[k] = float(v)
        return state_to_arrays(new, keep_input=False), MetricRecord(metrics)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # FedSQ validates the global model on the server (ServerApp evaluate_fn)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None
