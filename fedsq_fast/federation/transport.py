"""How a round's task reaches the sampled clients and their replies come back.

The round loop (:class:`~fedsq_fast.federation.Federation`) never knows where clients run:
it hands a :class:`RoundTask` to a :class:`Transport` and folds the :class:`Reply` objects it
yields, in the order yielded. :class:`InProcessTransport` trains the clients one after
another in this process; ``fedsq_fast.flower.GridTransport`` sends the task to Flower
SuperNodes through a Grid (simulation is just another transport, as in Flower).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .client import ClientTimeout, LocalConfig
from .strategy import count_as_float, count_problem, plain_count
from .trainer import ClientTrainer


@dataclass
class RoundTask:
    """One round's work: train ``clients`` from ``payload`` with ``local_config``."""

    round: int
    payload: dict
    clients: list
    local_config: LocalConfig
    sent: int | None = None  # copies of the payload sent (set by the transport; default len(clients))


@dataclass
class Reply:
    """A client's answer: its state and sample count, or ``error`` (why it is dropped).

    ``state`` may alias the client's model (in process: the worker's tensors), so it is valid
    until the next reply is asked for; code that holds replies longer must copy them."""

    cid: int
    state: dict | None = field(default=None, repr=False)
    num_samples: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    error: str | None = None
    # a secure sum (SecAgg+): ``state`` is the average of these clients' updates, not one
    # client's (fedsq_fast/flower/secagg.py); the round counts them, not one reply
    secure: "SecureSum | None" = field(default=None, repr=False)


@dataclass
class SecureSum:
    """What a secure-sum Reply stands for: the clients whose updates it averages and the
    bytes they sent (masked vectors), as the server never sees one of them."""

    clients: list
    bytes_up: int = 0


@dataclass
class FoldTotals:
    """What the folded replies add up to: compute seconds, bytes up, sample-weighted loss."""

    client_s: float = 0.0
    bytes_up: int = 0
    loss_sum: float = 0.0
    samples: int = 0

    @property
    def train_loss(self) -> float:
        return self.loss_sum / count_as_float(self.samples) if self.samples else math.nan


def _reply_bytes(state) -> int:
    """The bytes of a reply's tensors (anything else in it counts 0: the strategy rejects it)."""
    if not isinstance(state, dict):
        return 0
    return int(sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor)))


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def malformed(r: "Reply") -> str | None:
    """Why reply ``r`` (no ``error``) cannot be counted at all, or None: its sample count is
    not a finite number > 0 (``count_problem``), its loss or seconds are not real numbers.
    ``r.num_samples`` is made a plain Python number on the way. The state itself is the
    strategy's to check (``check_update``: keys, tensors, shapes, dtypes, values)."""
    r.num_samples = plain_count(r.num_samples)
    why = count_problem(r.num_samples)
    if why is not None:
        return why
    for name in ("loss", "seconds"):
        v = plain_count(getattr(r, name))
        if not _real(v):
            return f"{name} must be a number, got {type(v).__name__}"
        setattr(r, name, float(v))
    return None


def fold(replies, totals: FoldTotals, on_error, on_reply=None):
    """``(client, state, n)`` for a strategy's aggregation from Reply objects, one in memory
    at a time; a reply with ``error`` goes to ``on_error(reply)`` instead, and so does a
    reply that cannot be counted (:func:`malformed`: its ``error`` then says why), so no
    reply can end the round. Every runtime's replies are counted here (the engine's round
    loop and Flower's own strategy loop)."""
    for r in replies:
        if on_reply is not None:
            on_reply(r)
        if r.error is None:
            try:
                why = malformed(r)
            except Exception as e:  # noqa: BLE001 - a hostile object: that client's drop, not the run's end
                why = f"{type(e).__name__}: {e}"
            if why is not None:
                r.error, r.state = f"malformed reply: {why}", None
        if r.error is not None:
            on_error(r)
            continue
        totals.client_s += r.seconds
        totals.bytes_up += _reply_bytes(r.state) if r.secure is None else r.secure.bytes_up
        totals.loss_sum += r.loss * count_as_float(r.num_samples)  # a NaN loss makes the round's NaN, as it should
        totals.samples += r.num_samples
        yield r.cid, r.state, r.num_samples
        r.state = None  # released before the next reply is decoded


def cap_counts(replies, cap_of, on_cap):
    """The replies with each claimed sample count above what the server knows the client
    holds lowered to that (``cap_of(client)``: the cap, or None for none); each capped reply
    goes to ``on_cap(reply, claimed, cap)`` first. Counts that are not finite numbers > 0
    pass unchanged (:func:`fold` drops them)."""
    for r in replies:
        if r.error is None and r.secure is None:  # a secure sum: its transport checked each client's count
            n = plain_count(r.num_samples)
            if count_problem(n) is None:
                cap = cap_of(r.cid)
                if cap is not None and n > cap:
                    on_cap(r, n, cap)
                    r.num_samples = cap
        yield r


class Transport:
    """Base class. ``bind(fed)`` once before the first round; ``replies(task)`` per round
    yields one Reply per client of the task (those that cannot be reached as errors).
    ``replies_alias``: a reply's state may share memory with the next one's (a reused worker
    model), so the server copies the replies it holds; False where each reply owns its state."""

    replies_alias = True

    def bind(self, fed) -> None:
        self.fed = fed

    def replies(self, task: RoundTask) -> Iterator[Reply]:
        raise NotImplementedError

    def refresh(self) -> None:
        """The global model's structural copy was replaced (ablations)."""

    def validate(self, rnd: int):
        """Round ``rnd``'s validation of the server's global model shared out by the clients'
        processes: (per-batch loss sums in batch order, correct count) as
        :func:`~.client.eval_sums` gives for the whole validation split, or None, and the server
        evaluates it itself (here: always; the worker pool shares it out)."""
        return None

    def state_dict(self) -> dict:
        """Client state the server keeps for resume (FedBN layers in process); flat tensors."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class InProcessTransport(Transport):
    """The sampled clients trained one after another in this process, on one worker model.

    ``client_hook(round, client, state) -> state`` replaces a reply (tests: a client that
    crashes or corrupts its update). A client that raises is dropped with the error."""

    def __init__(self, client_hook=None):
        self.client_hook = client_hook

    def bind(self, fed) -> None:
        super().bind(fed)
        d = fed.data
        from .privacy import client_privacy

        test = None if getattr(d, "ctest_parts", None) is None else (d.ctest_x, d.ctest_y, d.ctest_parts)
        # simulated clients: distributed-DP noise from (seed, round, client), as in worker processes
        self.trainer = ClientTrainer(fed.model, d.x, d.y, d.parts, d.transform, seed=fed.cfg.seed,
                                     mask_cache=fed.cfg.mask_cache, local_keys=fed.strategy.local_keys,
                                     privacy=client_privacy(fed.cfg), test=test)

    def replies(self, task: RoundTask) -> Iterator[Reply]:
        for cid in task.clients:
            try:
                state, info = self.trainer.train(task.round, cid, task.payload, task.local_config)
                if self.client_hook is not None:
                    state = self.client_hook(task.round, cid, state)
            except ClientTimeout as e:
                yield Reply(cid, error=str(e))
                continue
            except Exception as e:  # a failing client leaves the round, not the run
                yield Reply(cid, error=f"error: {type(e).__name__}: {e}")
                continue
            try:
                self.trainer.keep_local(cid, task.payload, state)
            except Exception as e:  # noqa: BLE001 - FedBN layers that are not tensors: a malformed reply
                yield Reply(cid, error=f"malformed reply: its own layers cannot be kept: {type(e).__name__}: {e}")
                continue
            yield Reply(cid, state, info["num_samples"], info["seconds"], info["loss"])

    def client_evaluations(self, task):
        """Federated evaluation (:mod:`.evaluation`): one EvalReply per client, in client order."""
        from .evaluation import evaluate_reply

        for cid in task.clients:
            yield evaluate_reply(self.trainer, task, cid)

    def refresh(self) -> None:
        self.trainer.reset(self.fed.model)

    def close(self) -> None:
        self.trainer.close()  # the mask cache's spill file

    def state_dict(self) -> dict:
        return {f"{cid}/{k}": t for cid, d in self.trainer.local_states.items() for k, t in d.items()}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.local_states = {}
        for k, t in state.items():
            cid, _, key = k.partition("/")
            self.trainer.local_states.setdefault(int(cid), {})[key] = t.to(self.fed.device)
