"""The engine's round loop over Flower: a transport that reaches SuperNodes through a Grid.

Partition ids are the engine's client ids: the server samples them exactly as in process
and learns which node holds which partition from the replies (nodes not seen yet get the
round's message with the list of partitions that train; a node whose partition is not in
it answers at once without training). Replies are yielded in partition order (``sorted``:
reproducible, holding only early arrivals) or as they arrive (``arrival``: one reply in
memory). Nodes that fail, time out or send malformed replies become dropped clients with
the reason, as failed clients are in process.
"""
from __future__ import annotations

import logging
import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..federation.config import RunConfig
from ..federation.transport import Reply, RoundTask, Transport
from .arrays import state_to_arrays
from .strategy import (ARRAYS_KEY, CONFIG_KEY, PARTITION_KEY, WEIGHT_KEY, ReplyRejected, reject_ablation,  # noqa: F401
                       reply_info, reply_state, train_config)

log = logging.getLogger("fedsq_fast.flower")

# round-timeout "auto": the first round (and the wait for nodes) gets client_timeout_s + 120 s when
# the config bounds a client, else FIRST_ROUND_S; later rounds 4x the slowest round seen so far
# (at least MIN_ROUND_S), so a live but silent node costs minutes, not the hour it used to.
FIRST_ROUND_S, MIN_ROUND_S = 600.0, 60.0
ORDERS = ("sorted", "arrival")


def first_round_timeout(cfg: RunConfig) -> float:
    """The auto round-timeout before any round has been timed (the nodes also load data and
    build models then): client_timeout_s + 120 s when set, else FIRST_ROUND_S."""
    return cfg.client_timeout_s + 120.0 if cfg.client_timeout_s else FIRST_ROUND_S


def fingerprint(model) -> str | None:
    """The structural copy's fingerprint (DualCopy models), checked by every node."""
    f = getattr(model, "structural_fingerprint", None)
    return f() if callable(f) else None


class GridTransport(Transport):
    """Send each round's task to the SuperNodes behind ``grid`` and yield their replies.

    ``round_timeout``: seconds to wait for a round's replies (None: auto, see
    :meth:`timeout_for_round`); ``order``: ``sorted`` or ``arrival``; ``poll_s``: seconds
    between pulls."""

    replies_alias = False  # each reply is decoded from its own message

    def __init__(self, grid: Grid, *, round_timeout: float | None = None, order: str = "sorted",
                 poll_s: float = 0.5):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.grid, self.order, self.poll_s = grid, order, poll_s
        self.round_timeout = None if round_timeout is None else float(round_timeout)
        self._slowest = 0.0  # seconds from sending a round to its last reply, the most seen
        self.node_of: dict[int, int] = {}  # partition id -> node id

    def bind(self, fed) -> None:
        reject_ablation(fed.method)
        super().bind(fed)
        self.fingerprint = fingerprint(fed.model)

    def timeout_for_round(self) -> float:
        """The configured round-timeout, or (auto) :func:`first_round_timeout` until a round
        has been seen, then 4x the slowest round so far (at least MIN_ROUND_S)."""
        if self.round_timeout is not None:
            return self.round_timeout
        if self._slowest == 0.0:
            return first_round_timeout(self.fed.cfg)
        return max(MIN_ROUND_S, 4.0 * self._slowest)

    def replies(self, task: RoundTask):
        rnd, targets = task.round, task.clients
        content = RecordDict({ARRAYS_KEY: state_to_arrays(task.payload, arg="global state"),
                              CONFIG_KEY: train_config(self.fed.cfg, self.fed.method, rnd, task.local_config,
                                                       targets, self.fingerprint)})
        online = set(self.grid.get_node_ids())
        held = {p: n for p, n in self.node_of.items() if n in online}
        unknown = online - set(held.values())
        dests = sorted({held[p] for p in targets if p in held} | unknown)
        if not dests:
            task.sent = 0
            for p in targets:
                yield Reply(p, error="no connected node")
            return
        msgs = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(rnd))
                for n in dests]
        ids = list(self.grid.push_messages(msgs))
        node_by_msg = {i: n for i, n in zip(ids, dests) if i is not None}
        task.sent = len(node_by_msg)
        pending = set(node_by_msg)
        wanted, resolved, buffer, arrived, early = set(targets), set(), {}, [], []
        queue = sorted(targets)
        t_sent = time.monotonic()
        timeout = self.timeout_for_round()
        deadline = t_sent + timeout
        errors: dict[int, str] = {}  # node id -> error reason (node's partition not known yet)

        def ready():
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
                        early.append(Reply(pid_known, error=str(e)))
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
            yield from early
            early.clear()
            for pid in ready():
                yield self._decode(pid, *buffer.pop(pid))
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
            yield Reply(p, error=reason)
        for pid in sorted(buffer):
            yield self._decode(pid, *buffer.pop(pid))

    def client_evaluations(self, task):
        """Federated evaluation (:mod:`fedsq_fast.federation.evaluation`) on the SuperNodes: an
        EVALUATE message (the global arrays, the partitions that evaluate) to every connected
        node; each answers with its partition's samples, loss and accuracy
        (``ClientTrainer.evaluate``, as in process), or ``sampled = 0``. One EvalReply per
        partition, in partition order; a partition no node answered for carries the reason."""
        from ..federation.evaluation import EvalReply
        from .strategy import eval_config

        wanted = [int(c) for c in task.clients]
        if not wanted:
            return
        content = RecordDict({ARRAYS_KEY: state_to_arrays(task.payload, arg="global state"),
                              CONFIG_KEY: eval_config(self.fed.cfg, self.fed.method, task.round, wanted,
                                                      self.fingerprint)})
        dests = sorted(self.grid.get_node_ids())
        msgs = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n,
                        group_id=f"{task.round}-evaluate") for n in dests]
        ids = [i for i in self.grid.push_messages(msgs) if i is not None]
        pending, out, errors = set(ids), {}, []
        timeout = self.timeout_for_round()
        deadline = time.monotonic() + timeout
        while pending:
            for msg in self.grid.pull_messages(list(pending)):
                pending.discard(msg.metadata.reply_to_message_id)
                node = msg.metadata.src_node_id
                try:
                    info = reply_info(msg)
                except ReplyRejected as e:
                    errors.append(f"node {node}: {e}")
                    continue
                pid = info.get(PARTITION_KEY)
                if pid is None or info.get("sampled", 1) == 0:
                    continue
                if pid not in wanted or pid in out:
                    log.warning("round %d: evaluation: unexpected reply for partition %s from node %d: ignored",
                                task.round, pid, node)
                    continue
                self.node_of[pid] = node
                acc, loss = info.get("eval-accuracy"), info.get("eval-loss")
                if not isinstance(acc, float) or not 0.0 <= acc <= 1.0 or not isinstance(loss, float):
                    out[pid] = EvalReply(pid, error=f"malformed evaluation reply: accuracy {acc!r}, loss {loss!r}")
                    continue
                out[pid] = EvalReply(pid, int(info[WEIGHT_KEY]), loss, acc)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(self.poll_s)
        for pid in wanted:
            if pid in out:
                yield out[pid]
            else:
                why = (f"no reply within round-timeout ({timeout:g} s)" if pending else
                       "no connected node evaluated this partition") + (f" (node errors: {errors})" if errors else "")
                yield EvalReply(pid, error=why)

    def _decode(self, pid: int, msg, info) -> Reply:
        try:
            state = {k: t.to(self.fed.device) for k, t in reply_state(msg).items()}  # decoded on the CPU
        except ReplyRejected as e:
            return Reply(pid, error=f"update rejected: {e}")
        # seconds and loss as sent (a list is a MetricRecord value too): fold drops a reply whose are not numbers
        return Reply(pid, state, info[WEIGHT_KEY], info.get("client-seconds", 0.0), info.get("train-loss", float("nan")))
