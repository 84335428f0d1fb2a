"""Federated evaluation: how the global model serves each client, measured on the clients.

With ``client_test_fraction`` > 0 every client keeps a local test split, a seeded share of
its partition taken before its training data (:func:`client_test_split`). Every
``client_eval_every`` rounds, at round 0 (the initial model) and at the last round, every
client that holds a test split evaluates the global model on it, where it runs (in this
process, in a worker process, on a Flower SuperNode): the same
:meth:`~.trainer.ClientTrainer.evaluate` everywhere, so the numbers are the same on every
transport. A FedSQ client evaluates with its own gates: its DualCopy model's structural copy
gates the global quantitative copy on the client's own inputs (the model a deployed FedSQ
client runs); a FedBN client with its own normalisation layers.

The round's record gets (only on the rounds evaluated; :data:`RECORD_KEYS`):
``client_acc_weighted`` (sample-weighted mean: correct / samples over all clients),
``client_acc_mean`` (unweighted mean over clients), ``client_acc_worst`` (the lowest),
``client_acc_p10`` (10th percentile, numpy's ``method="lower"``: the accuracy of an actual
client, the one at rank floor(0.1 (K - 1)) from the bottom), ``client_acc_std`` (population
standard deviation over clients, ddof = 0), ``client_loss`` (sample-weighted mean
cross-entropy), ``client_eval_clients`` (clients evaluated), and in metrics.json only
``client_acc`` (per client id: its accuracy, None where not evaluated) and
``client_eval_failed`` ([client, reason] for clients whose evaluation failed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# the round record's keys of federated evaluation; the first ones are also metrics.csv columns
CSV_KEYS = ("client_acc_weighted", "client_acc_mean", "client_acc_worst", "client_acc_p10", "client_acc_std",
            "client_loss", "client_eval_clients")
RECORD_KEYS = CSV_KEYS + ("client_acc", "client_eval_failed")
# the final evaluation's numbers in a run's summary (metrics.json "summary"; the suites' verdicts read them)
SUMMARY_KEYS = ("client_acc_weighted", "client_acc_mean", "client_acc_worst", "client_acc_p10", "client_acc_std")
QUANTILE_METHOD = "lower"  # numpy.quantile method of client_acc_p10


def client_test_size(n: int, fraction: float) -> int:
    """Test samples of a client holding ``n``: ``round(fraction * n)`` (halves up), at least 1
    and at most n - 1 (a client keeps a training sample); 0 when fraction is 0 or n < 2 (such
    a client is not evaluated; ``client_eval_clients`` counts those that are)."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(n - 1, max(1, math.floor(fraction * n + 0.5))))


def client_test_split(parts, fraction: float, seed: int) -> tuple[list, list]:
    """(training parts, test parts): each client's sorted index array split into a test share
    (:func:`client_test_size` samples drawn with the seed derived from (seed, CLIENT_TEST, client),
    so a client's split depends only on its own partition) and the rest, its training data.
    Disjoint, together the partition."""
    from .client import derive_seed
    from .seeds import CLIENT_TEST

    train, test = [], []
    for k, p in enumerate(parts):
        p = np.asarray(p, dtype=np.int64)
        t = client_test_size(len(p), fraction)
        pick = np.zeros(len(p), dtype=bool)
        if t:
            pick[np.random.default_rng(derive_seed(seed, CLIENT_TEST, k)).permutation(len(p))[:t]] = True
        train.append(p[~pick])
        test.append(p[pick])
    return train, test


def due(cfg, rnd: int) -> bool:
    """Whether round ``rnd`` (0: the initial model) is a federated-evaluation round."""
    if not cfg.client_test_fraction:
        return False
    return rnd == 0 or rnd == cfg.rounds or rnd % cfg.client_eval_every == 0


@dataclass
class EvalTask:
    """A federated evaluation: ``clients`` evaluate the global ``payload`` on their test splits."""

    round: int
    payload: dict
    clients: list
    batch_size: int = 512
    precision: str = "fp32"


@dataclass
class EvalReply:
    """A client's evaluation: its test samples, mean loss and accuracy, or ``error``."""

    cid: int
    num_samples: int = 0
    loss: float = math.nan
    accuracy: float = math.nan
    error: str | None = None


def evaluate_reply(trainer, task: EvalTask, cid: int) -> EvalReply:
    """Client ``cid``'s evaluation by ``trainer`` (any exception: the reply's error)."""
    try:
        n, loss, acc = trainer.evaluate(cid, task.payload, task.batch_size, task.precision)
    except Exception as e:  # noqa: BLE001 - one client's failure, not the run's
        return EvalReply(cid, error=f"{type(e).__name__}: {e}")
    return EvalReply(cid, n, loss, acc)


def client_stats(accs, counts, losses=None) -> dict:
    """The per-round numbers of federated evaluation from per-client accuracies and test
    sample counts (and mean losses): see the module docstring for each definition. Empty
    input: NaN for every number and 0 clients."""
    a = np.asarray(accs, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if a.shape != n.shape or a.ndim != 1:
        raise ValueError(f"accs and counts must be 1-D of one length, got {a.shape} and {n.shape}")
    out = {"client_eval_clients": int(a.size)}
    if a.size == 0:
        return {**{k: math.nan for k in CSV_KEYS[:-1]}, **out}
    out.update(
        client_acc_weighted=float((a * n).sum() / n.sum()),
        client_acc_mean=float(a.mean()),
        client_acc_worst=float(a.min()),
        client_acc_p10=float(np.quantile(a, 0.1, method=QUANTILE_METHOD)),
        client_acc_std=float(a.std()),
        client_loss=(float((np.asarray(losses, dtype=np.float64) * n).sum() / n.sum())
                     if losses is not None else math.nan))
    return {k: out[k] for k in CSV_KEYS}


def evaluate_on_clients(fed, rnd: int) -> dict:
    """Run the federated evaluation of round ``rnd`` through ``fed``'s transport; returns the
    record's keys (:data:`RECORD_KEYS`)."""
    from . import adapter

    d = fed.data
    sizes = d.ctest_parts.sizes()
    clients = [int(c) for c in np.flatnonzero(sizes > 0)]
    task = EvalTask(rnd, adapter.payload_state(fed.model), clients, fed.cfg.eval_batch_size, fed.cfg.precision)
    evaluate = getattr(fed.transport, "client_evaluations", None)
    if evaluate is None:
        raise ValueError(f"client_test_fraction: the transport {type(fed.transport).__name__} cannot evaluate "
                         "on the clients; set client_test_fraction = 0")
    per = [None] * len(sizes)
    accs, counts, losses, failed = [], [], [], []
    for r in evaluate(task):
        if r.error is None and r.num_samples != int(sizes[r.cid]):
            r.error = f"evaluated {r.num_samples} samples, its test split holds {int(sizes[r.cid])}"
        if r.error is not None:
            failed.append([int(r.cid), str(r.error)])
            continue
        per[r.cid] = float(r.accuracy)
        accs.append(float(r.accuracy))
        counts.append(int(r.num_samples))
        losses.append(float(r.loss))
    out = client_stats(accs, counts, losses)
    out["client_acc"] = per
    out["client_eval_failed"] = sorted(failed)
    return out


def check_transport(fed) -> None:
    """Refuse, before any round, federated evaluation on a transport that cannot do it."""
    if fed.cfg.client_test_fraction and getattr(fed.transport, "client_evaluations", None) is None:
        raise ValueError(f"client_test_fraction: the transport {type(fed.transport).__name__} cannot evaluate on "
                         "the clients; set client_test_fraction = 0")
    if fed.cfg.client_test_fraction and getattr(fed.data, "ctest_parts", None) is None:
        raise ValueError("client_test_fraction: the data has no client test splits (prepare_data with this "
                         "config makes them)")


def summary_of(history) -> dict:
    """The last evaluated round's numbers (:data:`SUMMARY_KEYS`, and ``client_eval_round``) for
    a run's summary; {} when no round was evaluated."""
    last = next((h for h in reversed(history) if "client_acc_weighted" in h), None)
    if last is None:
        return {}
    return {**{k: last[k] for k in SUMMARY_KEYS}, "client_eval_round": last["round"]}
