"""Secure aggregation on the Flower deployment path: Flower's SecAgg+ under the engine's round loop.

With ``secagg = true`` the server never sees one client's update, only the sum over the
clients that survive the round (docs/flower.md, "Secure aggregation (SecAgg+)": what it
protects, against whom, and what it does not). The protocol is Flower's own, unchanged:
the server side runs the four stages of ``flwr.server.workflow.SecAggPlusWorkflow``
(setup, share keys, collect masked vectors, unmask) through :class:`SecAggTransport`, and
the ClientApp wraps its train step in ``flwr.client.mod.secaggplus_mod``
(``fedsq_fast.flower.app.secagg_mod``). The workflow is Flower's "legacy" one (it asks a
legacy Strategy for fit instructions and hands it the aggregate); the stages are driven here
with a small adapter in its place, so the package's Message-API ServerApp/ClientApp keep
running every other round as before and the engine (sampling, seeds, server optimizers,
validation, checkpoints, metrics) is the same.

What is summed: each client's *update* of the payload's floating tensors (the quantitative
copy under FedSQ: the structural copy never leaves a client), ``state - global`` in float64,
clipped and noised first under distributed DP (the client's trainer), then :func:`before_masking`
and a range check (:func:`check_update_range`). Flower's SecAgg+ weights it on the client: the client sends
``q_k`` = round(n_k / max_weight x Q) and the update times ``q_k / Q``; the server divides the
unmasked sum by sum(q_k), so the result is the sample-weighted average of the survivors'
updates (``max_weight`` = the round's largest partition, so no honest weight exceeds 1).
Under distributed DP (``dp = "distributed"``) every update enters the sum with weight exactly
1 instead (:func:`unweighted`: the server announces ``max_weight`` 1, each client sends weight
1, so q_k = Q for all and the unmasked result is the plain average of the survivors' clipped
and noised updates): the DP accountant assumes an unweighted sum, and a weight below 1 would
scale a client's noise down. The server counts that average as K updates (docs/privacy.md).
Integer buffers (BatchNorm's ``num_batches_tracked``) are not summed: they keep the global
model's value. Error bound: :func:`error_bound`.
"""
from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from ..federation.config.checks import SECAGG_MODULUS
from ..federation.transport import Reply, RoundTask, SecureSum
from .strategy import (ARRAYS_KEY, CONFIG_KEY, PARTITION_KEY, ReplyRejected, reply_info, train_config)
from .transport import GridTransport

log = logging.getLogger("fedsq_fast.flower")

SECURE_CID = -1  # the id a round's secure sum is folded under (it is no client's reply)
STAGES = Stage.all()  # setup, share_keys, collect_masked_vectors, unmask


DP_WEIGHT = 1  # under distributed DP: every client's weight and the announced max_weight


# ---------------------------------------------------------------------------- the numbers
def unweighted(cfg) -> bool:
    """Whether SecAgg+ must sum the updates unweighted: distributed DP, whose accounting
    assumes each client's clipped and noised update enters the sum once, as sent."""
    return getattr(cfg, "dp", "none") == "distributed"


def weight_levels(num_samples: float, max_weight: float, quantization_range: int) -> int:
    """The integer weight q_k Flower's SecAgg+ client sends: round(n_k / max_weight x Q)."""
    return round(num_samples / max_weight * quantization_range)


def error_bound(clipping_range: float, quantization_range: int, levels: list, max_update: float) -> float:
    """Bound on |SecAgg+ average - exact sample-weighted average| per value, for the
    surviving clients' weight levels ``levels`` (q_k, :func:`weight_levels`) and their
    largest update value ``max_update`` (max_k max|update_k|), before the result is rounded
    to the tensor's dtype: K (2 c + D) / sum(q_k).

    Each client's weighted value is mapped to (x + c) Q / (2 c) and rounded stochastically
    (error < 1 level = 2c/Q); K such errors, divided by the weight sum sum(q_k)/Q, give
    2 c K / sum(q_k). The weights are q_k/Q instead of n_k/max_weight (each off by <= 1/(2Q)),
    which moves the average by at most K D / sum(q_k). The largest client of a round has
    q_k = Q, so with it among the survivors the bound is at most K (2 c + D) / Q. Unweighted
    (distributed DP: every q_k = Q, the weights exact) it is 2 c / Q: pass ``max_update`` 0."""
    total = sum(levels)
    if total <= 0:
        return math.inf
    return len(levels) * (2.0 * clipping_range + max_update) / total


# ---------------------------------------------------------------------------- client side
def float_keys(state: dict) -> list:
    """The payload keys SecAgg+ sums (floating tensors, in payload order)."""
    return [k for k, t in state.items() if t.dtype.is_floating_point]


def before_masking(update: dict, *, cfg, rnd: int, partition: int, num_samples: int) -> dict:
    """A client-side step on this client's update (float64 tensors, ``state - global`` of the
    floating payload keys), applied before SecAgg+ masks it; returns the update to mask. Under
    distributed DP (``dp = "distributed"``, docs/privacy.md) the update arrives here already
    clipped and noised (the client's trainer applies :func:`~fedsq_fast.federation.privacy.client_privacy`,
    as on every path), so the sum the server unmasks carries the whole noise while no single
    client's update is ever seen; this hook returns it unchanged."""
    return update


def check_update_range(update: dict, ratio: float, clipping_range: float, *, noised: bool = False) -> None:
    """Refuse (ValueError naming the key) an update SecAgg+ would change silently: a NaN/Inf
    value, or a weighted value ``ratio x v`` outside [-clipping_range, clipping_range]
    (Flower's quantizer clips it without a word). The server cannot check either: it never
    sees the update. ``noised``: a distributed-DP update (clipped and noised), for the
    message (validation sizes the range so that this is all but impossible)."""
    for k, t in update.items():
        if not t.numel():
            continue
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"secagg: update of {k} holds NaN or Inf; not sent")
        top = max(-lo, hi) * ratio
        if top > clipping_range:
            fix = ("a noised update: size secagg_clipping_range against dp_clip and the noise as "
                   "docs/privacy.md says" if noised else
                   "raise secagg_clipping_range or bound the updates on the clients (docs/flower.md)")
            raise ValueError(f"secagg: update of {k} reaches {top:.4g} (weighted), beyond secagg_clipping_range "
                             f"{clipping_range:g}, which SecAgg+ would clip silently; not sent ({fix})")


def secagg_fit_reply(msg: Message, context, state: dict, glob: dict, info: dict, pid: int, cfg, rnd: int) -> Message:
    """The train step's answer in the form ``secaggplus_mod`` reads (Flower's legacy FitRes
    records): this client's float64 update of the floating payload keys, after
    :func:`before_masking` and :func:`check_update_range` against the weight and clipping
    range the server announced in the setup stage. Under distributed DP the weight sent is 1
    (:func:`unweighted`), and a server announcing any other ``max_weight`` is refused: weights
    that differ between clients would let it single out one client's update."""
    n = int(info["num_samples"])
    update = {k: state[k].detach().cpu().double() - glob[k].detach().cpu().double() for k in float_keys(glob)}
    update = before_masking(update, cfg=cfg, rnd=rnd, partition=pid, num_samples=n)
    if list(update) != float_keys(glob):
        raise ValueError("secagg: before_masking must return the update's keys, in order")
    sa = context.state.config_records.get(RECORD_KEY_STATE)
    if sa is None:
        raise ValueError("secagg: no SecAgg+ setup before the masked-vector stage")
    q_range, clip, max_w = int(sa["target_range"]), float(sa["clipping_range"]), float(sa["max_weight"])
    dp = unweighted(cfg)
    if dp:
        if max_w != DP_WEIGHT:
            raise ValueError(f"secagg: under dp = 'distributed' every update enters the sum with weight 1, but the "
                             f"server announced max_weight {max_w:g}; refused")
        n = DP_WEIGHT  # secaggplus_mod's weight: n / max_weight x Q = Q for every client
    ratio = weight_levels(n, max_w, q_range) / q_range
    check_update_range(update, ratio, clip, noised=dp)
    arrays = ArrayRecord({str(i): _np_array(t) for i, t in enumerate(update.values())})
    rd = RecordDict({"fitres.parameters": arrays})
    rd.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": n})
    rd.config_records["fitres.metrics"] = ConfigRecord({PARTITION_KEY: int(pid),
                                                        "client-seconds": float(info["seconds"])})
    rd.config_records["fitres.status"] = ConfigRecord({"code": int(Code.OK.value), "message": "ok"})
    return Message(rd, reply_to=msg)


def _np_array(t: torch.Tensor):
    from flwr.app import Array

    return Array(np.ascontiguousarray(t.numpy()))


def check_unmask_request(configs) -> None:
    """A client's own guard in the unmask stage: a server that lists a neighbour both as alive
    (asking for its mask seed's share) and as dropped (asking for its key's share) could unmask
    that neighbour's update; Flower 1.41's client does not check it."""
    if configs.get(Key.STAGE) != Stage.UNMASK:
        return
    both = set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])) & set(configs.get(Key.DEAD_NODE_ID_LIST, []))
    if both:
        raise ValueError(f"secagg: the server lists nodes {sorted(both)} as both alive and dropped; refused")


# ---------------------------------------------------------------------------- server side
class _Capture:
    """The legacy-Strategy face SecAggPlusWorkflow's stages ask for: the round's nodes in
    ``configure_fit``; the unmasked aggregate handed to ``aggregate_fit`` is kept."""

    def __init__(self, nodes):
        self.nodes, self.results, self.failures = list(nodes), None, None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns

        return [(SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}


class _StageGrid:
    """What the workflow's stages see as the grid: each stage's send_and_receive pushes and
    pulls through the real grid (poll_s, the round timeout), records per node why it left
    the protocol, and screens the masked vectors before the workflow sums them (the server
    can check their form, never their values)."""

    def __init__(self, transport: "SecAggTransport", expect: dict, shapes: list):
        self.t, self.expect, self.shapes = transport, expect, shapes  # expect: node -> partition
        self.why: dict[int, str] = {}
        self.seconds: dict[str, float] = {}  # stage -> seconds from send to the last reply
        self.bytes_up = 0
        self.stage = None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.stage = messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] if messages else None
        t0 = time.monotonic()
        got, missing = self.t.exchange(messages, timeout)
        self.seconds[self.stage] = time.monotonic() - t0
        out = []
        for node, msg in got:
            if msg.has_error():  # its source may be the SuperLink (a node gone): named by the destination
                self.why.setdefault(node, f"SecAgg+ {self.stage}: error reply: {msg.error.reason}")
                out.append(msg)
                continue
            why = self._screen(msg, node) if self.stage == Stage.COLLECT_MASKED_VECTORS else self._form(msg)
            if why is not None:
                self.why.setdefault(node, f"SecAgg+ {self.stage}: {why}")
                continue  # left out: the workflow treats it as dropped (and removes its masks)
            out.append(msg)
        for node in missing:
            self.why.setdefault(node, f"SecAgg+ {self.stage}: no reply within round-timeout ({timeout:g} s)")
        return out

    # what the workflow reads from a reply of each key stage: (key, element type or None for a scalar)
    _FORMS = {Stage.SETUP: ((Key.PUBLIC_KEY_1, None, bytes), (Key.PUBLIC_KEY_2, None, bytes)),
              Stage.SHARE_KEYS: ((Key.DESTINATION_LIST, list, int), (Key.CIPHERTEXT_LIST, list, bytes)),
              Stage.UNMASK: ((Key.NODE_ID_LIST, list, int), (Key.SHARE_LIST, list, bytes))}

    def _form(self, msg) -> str | None:
        """Why a setup, share-keys or unmask reply cannot be read by the workflow (which would
        raise and end the run), or None: its keys, their types, lists of equal length, node
        ids of this round's nodes."""
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if rec is None:
            return f"malformed reply: no ConfigRecord {RECORD_KEY_CONFIGS!r}"
        lens = []
        for key, container, kind in self._FORMS.get(self.stage, ()):
            v = rec.get(key)
            items = v if container is list and isinstance(v, list) else [v] if container is None else None
            if items is None or any(type(x) is not kind for x in items):
                return f"malformed reply: {key} must be {'a list of ' if container else ''}{kind.__name__}"
            if container is list:
                lens.append(len(items))
                if kind is int and any(x not in self.expect for x in items):
                    return f"malformed reply: {key} names nodes outside this round"
        if len(set(lens)) > 1:
            return f"malformed reply: lists of unequal lengths {lens}"
        return None

    def _screen(self, msg, node) -> str | None:
        c = msg.content
        try:
            masked = c.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            n = c.metric_records["fitres.num_examples"]["num_examples"]
            metrics = c.config_records["fitres.metrics"]
            c.config_records["fitres.status"], c.array_records["fitres.parameters"]  # noqa: B018 (present)
        except KeyError as e:
            return f"malformed reply: {e} missing"
        pid = metrics.get(PARTITION_KEY)
        if pid != self.expect.get(node):
            return f"malformed reply: {PARTITION_KEY} {pid!r}, this node holds {self.expect.get(node)}"
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return f"malformed reply: num_examples must be an integer > 0, got {n!r}"
        if unweighted(self.t.fed.cfg):
            if n != DP_WEIGHT:  # its update would enter the sum n times: beyond the DP sensitivity
                return f"weight {n} under dp = 'distributed', where every update enters the sum with weight 1"
            return self._screen_masked(masked)
        cap = self.t.fed.partition_size(pid)
        if cap is not None and n > cap:
            return f"claimed {n} samples, its partition holds {cap}: its weight inside the sum cannot be lowered"
        return self._screen_masked(masked)

    def _screen_masked(self, masked) -> str | None:
        from .arrays import _npy_header

        if not isinstance(masked, list) or len(masked) != len(self.shapes):
            return f"malformed reply: {len(masked) if isinstance(masked, list) else '?'} masked arrays, expected {len(self.shapes)}"
        for i, (b, shape) in enumerate(zip(masked, self.shapes)):
            h = _npy_header(b) if isinstance(b, bytes) else None
            if h is None or tuple(h[0]) != shape or np.dtype(h[2]).kind not in "iu":
                return f"malformed reply: masked array {i} is not an integer array of shape {shape}"
        self.bytes_up += sum(len(b) for b in masked)
        return None


def _forget_early_drops(state) -> None:
    """After the share-keys stage: nodes that left before it completed hold no shares of the
    others and none of theirs, and no mask was made with them, so they are out of the
    protocol, not "dropped". Flower 1.41's workflow keeps them among the sampled nodes and
    neighbours, so its unmask stage asks the others for key shares they never received (the
    clients fail with a KeyError and the round halts) and would remove masks never added."""
    alive = set(state.active_node_ids)
    state.sampled_node_ids = alive
    state.nid_to_neighbours = {n: nb & alive for n, nb in state.nid_to_neighbours.items() if n in alive}


class SecAggTransport(GridTransport):
    """The round's clients reached through ``grid`` under SecAgg+ (``secagg = true``): one
    :class:`~fedsq_fast.federation.transport.Reply` per round for the secure sum (the
    survivors' average, ``secure`` naming them), and one error Reply per client that left
    the protocol, with the stage and the reason. Nodes are mapped to partitions first (a
    message they answer without training), as only the round's clients take part."""

    secure = True

    def __init__(self, grid, *, round_timeout: float | None = None, poll_s: float = 0.5):
        super().__init__(grid, round_timeout=round_timeout, order="sorted", poll_s=poll_s)

    def exchange(self, messages, timeout):
        """Push ``messages``, pull until all are answered or ``timeout`` s pass: ([(node the
        message went to, reply)], nodes that did not answer)."""
        timeout = self.timeout_for_round() if timeout is None else timeout
        dst = {}
        ids = list(self.grid.push_messages(messages))
        for i, m in zip(ids, messages):
            if i is not None:
                dst[i] = m.metadata.dst_node_id
        pending, got = set(dst), []
        t0 = time.monotonic()
        while pending and time.monotonic() - t0 <= timeout:
            for msg in self.grid.pull_messages(list(pending)):
                mid = msg.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    got.append((dst[mid], msg))
            if pending:
                time.sleep(self.poll_s)
        self._slowest = max(self._slowest, time.monotonic() - t0)
        return got, sorted(dst[i] for i in pending)

    def _discover(self, task: RoundTask, online: set) -> None:
        """Learn the partition of every online node not seen yet (it answers at once)."""
        unknown = sorted(online - set(self.node_of.values()))
        if not unknown:
            return
        cfg_rec = train_config(self.fed.cfg, self.fed.method, task.round, task.local_config, [-1], self.fingerprint)
        msgs = [Message(content=RecordDict({CONFIG_KEY: cfg_rec}), message_type=MessageType.TRAIN, dst_node_id=n,
                        group_id=f"{task.round}.discover") for n in unknown]
        got, _ = self.exchange(msgs, None)
        for node, msg in got:
            try:
                info = reply_info(msg)
            except ReplyRejected as e:
                log.warning("round %d: node %d: %s", task.round, node, e)
                continue
            pid = info.get(PARTITION_KEY)
            prev = self.node_of.get(pid)
            if pid is None or prev is not None and prev != node and prev in online:
                log.warning("round %d: node %d: partition %r unknown or held by another node: ignored",
                            task.round, node, pid)
                continue
            self.node_of[pid] = node

    def replies(self, task: RoundTask):
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        cfg, rnd = self.fed.cfg, task.round
        online = set(self.grid.get_node_ids())
        self._discover(task, online)
        nodes = {p: self.node_of[p] for p in task.clients if self.node_of.get(p) in online}
        task.sent = 0
        for p in task.clients:
            if p not in nodes:
                yield Reply(p, error="no connected node holds this partition")
        if len(nodes) < 3:
            for p in nodes:
                yield Reply(p, error=f"SecAgg+ needs at least 3 clients a round, {len(nodes)} reachable")
            return
        glob = task.payload
        keys = float_keys(glob)
        shapes = [(1,)] + [tuple(glob[k].shape) for k in keys]
        dp = unweighted(cfg)
        # distributed DP: weight 1 for every client (q_k = Q), so the result is the plain average
        max_w = float(DP_WEIGHT) if dp else float(max(self.fed.partition_size(p) or 1 for p in nodes))
        wf = SecAggPlusWorkflow(1.0 if cfg.secagg_num_shares is None else int(cfg.secagg_num_shares),
                                float(cfg.secagg_reconstruction_threshold), max_weight=max_w,
                                clipping_range=float(cfg.secagg_clipping_range),
                                quantization_range=int(cfg.secagg_quantization_range),
                                modulus_range=SECAGG_MODULUS, timeout=self.timeout_for_round())
        pid_of = {n: p for p, n in nodes.items()}
        capture = _Capture(sorted(pid_of))
        ctx = SimpleNamespace(
            state=RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(rnd)}),
                              MAIN_PARAMS_RECORD: ArrayRecord()}),
            strategy=capture, client_manager=SimpleNamespace(num_available=lambda: len(online)),
            history=SimpleNamespace(add_metrics_distributed_fit=lambda **kw: None))
        grid = _StageGrid(self, pid_of, shapes)
        state = WorkflowState()
        halted = None
        for stage, step in zip(STAGES, (wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage,
                                        wf.unmask_stage)):
            if stage == Stage.COLLECT_MASKED_VECTORS:  # the round's task, as GridTransport sends it
                from .arrays import state_to_arrays

                arrays = state_to_arrays(glob, arg="global state")
                cfg_rec = train_config(cfg, self.fed.method, rnd, task.local_config, sorted(nodes), self.fingerprint)
                state.nid_to_fitins = {n: RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: cfg_rec})
                                       for n in state.nid_to_fitins}
                task.sent = len(state.nid_to_fitins)
            try:
                ok = step(grid, ctx, state)
            except Exception as e:  # noqa: BLE001 - Flower's protocol code on the replies: the round's loss, not the run's
                log.error("round %d: SecAgg+ stage %s failed: %s: %s", rnd, stage, type(e).__name__, e)
                halted = (stage, f"{type(e).__name__}: {e}")
                break
            if not ok:
                halted = (stage, "fewer than the reconstruction threshold of a client's neighbours left "
                                 f"(secagg_reconstruction_threshold {cfg.secagg_reconstruction_threshold:g})")
                break
            if stage == Stage.SHARE_KEYS:
                _forget_early_drops(state)
        survivors = {}
        if halted is None and capture.results:
            for proxy, fitres in capture.results:
                survivors[pid_of[proxy.node_id]] = fitres
        for p, n in sorted(nodes.items()):
            if p not in survivors:
                why = grid.why.get(n)
                if halted is not None:
                    why = f"SecAgg+ halted at stage {halted[0]}: {halted[1]}" + (f"; this node: {why}" if why else "")
                yield Reply(p, error=why or f"left SecAgg+ at stage {grid.stage}")
        for p, n in sorted(nodes.items()):
            if p in survivors and n in grid.why:  # left after its masked vector was summed: still in the sum
                log.warning("round %d: client %d: %s (its update is in the sum)", rnd, p, grid.why[n])
        if not survivors:
            return
        avg = parameters_to_ndarrays(next(iter(survivors.values())).parameters)
        if len(avg) != len(keys):
            raise RuntimeError(f"SecAgg+ returned {len(avg)} arrays for {len(keys)} floating tensors")
        new = {}
        with torch.no_grad():
            fk = dict(zip(keys, avg))
            for k, g in glob.items():
                if k not in fk:
                    new[k] = g.clone()  # integer buffers are not summed: the global value stays
                    continue
                a = fk[k]
                new[k] = (g.double() + torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(g.shape)
                          .to(g.device)).to(g.dtype)
        # distributed DP: the weights are all 1, the samples the partitions the server made
        total = (sum(self.fed.partition_size(p) or 0 for p in survivors) if dp else
                 sum(int(f.num_examples) for f in survivors.values()))
        secs = sum(float(f.metrics.get("client-seconds", 0.0)) for f in survivors.values())
        log.info("round %d: SecAgg+ sum of %d clients (%s); seconds per stage: %s", rnd, len(survivors),
                 sorted(survivors), ", ".join(f"{k} {v:.1f}" for k, v in grid.seconds.items()))
        yield Reply(SECURE_CID, new, total, secs, math.nan,
                    secure=SecureSum(sorted(survivors), bytes_up=grid.bytes_up))


__all__ = ["SecAggTransport", "before_masking", "check_update_range", "error_bound", "weight_levels", "unweighted",
           "secagg_fit_reply", "float_keys", "check_unmask_request", "SECURE_CID"]
