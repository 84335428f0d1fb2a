"""Hostile and malformed replies (issue 24, findings 2 and 3): a reply of any type, count,
container or value is that client's drop with the reason, never the run's end; a claimed
sample count the server can check (in simulation: the client's partition) is capped, logged
and recorded. Oracles: the same run with that client honest (a capped claim weighs exactly
what the honest count weighs) or failing (a dropped reply), bit for bit."""
import logging
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_state, draw_seed, small_config

from fedsq_fast.federation import Federation, make_strategy, prepare_data
from fedsq_fast.federation.strategy import AggregateStats, stream_average
from fedsq_fast.federation.transport import InProcessTransport

torch.set_num_threads(1)
VICTIM = 2  # the client that misbehaves, in every round


class ChangesVictim:
    """Mixin for a transport: client VICTIM's reply is changed by ``self.change(reply)``."""

    change = None

    def replies(self, task):
        for r in super().replies(task):
            if r.cid == VICTIM and r.error is None:
                self.change(r)
            yield r


class Hostile(ChangesVictim, InProcessTransport):
    """The in-process clients, client VICTIM's reply changed by ``change``."""

    def __init__(self, change):
        super().__init__()
        self.change = change


def _failing(rnd, cid, state):
    if cid == VICTIM:
        raise RuntimeError("down")
    return state


@pytest.fixture(scope="module")
def setup(bundle):
    cfg = small_config(rounds=2, num_clients=5, checkpoint=False, lr=0.1, min_partition_size=5)
    data = prepare_data(cfg, bundle)
    clean = Federation(cfg, "fedavg", data, quiet=True).run()
    without = Federation(cfg, "fedavg", data, quiet=True, client_hook=_failing).run()
    return cfg, data, clean, without


def _run(setup, change, caplog=None):
    cfg, data, _, _ = setup
    fed = Federation(cfg, "fedavg", data, quiet=True, transport=Hostile(change))
    return fed, fed.run()


def _set(**kw):
    def change(r):
        for k, v in kw.items():
            setattr(r, k, v)
    return change


@pytest.mark.parametrize("count", [2**63, 10**400, 1e40, 3.5e38, 2e38, np.int64(2**62), np.float32(1e30),
                                   torch.tensor(10**12)])
def test_a_huge_claimed_count_is_capped_at_the_partition_and_recorded(setup, count, caplog):
    """The cap is what the honest client reports, so the run is the clean run bit for bit."""
    cfg, data, clean, _ = setup
    with caplog.at_level(logging.WARNING, logger="fedsq_fast.federation"):
        fed, res = _run(setup, _set(num_samples=count))
    assert_same_state(res.model.state_dict(), clean.model.state_dict())
    size = len(data.parts[VICTIM])
    for h, c in zip(res.history[1:], clean.history[1:]):
        assert h["counts_capped"] == [[VICTIM, count.item() if hasattr(count, "item") else count, size]]
        assert h["clients_ok"] == c["clients_ok"] and h["samples"] == c["samples"] and not h["clients_dropped"]
        assert h["train_loss"] == c["train_loss"] and h["client_drift"] == c["client_drift"]
    assert "counts_capped" not in clean.history[1]  # honest runs: the key is absent, the record unchanged
    assert f"client {VICTIM} claimed" in caplog.text and f"its partition holds {size}" in caplog.text


@pytest.mark.parametrize("change, reason", [
    (_set(num_samples="12"), "num_samples must be an int or a float, got str '12'"),
    (_set(num_samples=np.array([5, 6])), "num_samples must be an int or a float, got ndarray array([5, 6])"),
    (_set(num_samples=None), "num_samples must be an int or a float, got NoneType None"),
    (_set(num_samples=[5]), "num_samples must be an int or a float, got list [5]"),
    (_set(num_samples=True), "num_samples must be an int or a float, got bool True"),
    (_set(num_samples=1j), "num_samples must be an int or a float, got complex 1j"),
    (_set(num_samples=float("nan")), "num_samples must be > 0, got nan"),
    (_set(num_samples=float("inf")), "num_samples must be > 0, got inf"),
    (_set(num_samples=-3), "num_samples must be > 0, got -3"),
    (_set(num_samples=0), "num_samples must be > 0, got 0"),
    (_set(loss="low"), "loss must be a number, got str"),
    (_set(seconds=[1.0]), "seconds must be a number, got list"),
])
def test_a_malformed_count_loss_or_time_drops_that_client(setup, change, reason, caplog):
    _, _, _, without = setup
    with caplog.at_level(logging.WARNING, logger="fedsq_fast.federation"):
        _, res = _run(setup, change)
    assert_same_state(res.model.state_dict(), without.model.state_dict())
    for h, w in zip(res.history[1:], without.history[1:]):
        assert h["clients_dropped"] == [[VICTIM, "malformed reply: " + reason]]
        assert h["clients_ok"] == w["clients_ok"] and h["train_loss"] == w["train_loss"]
    assert "malformed reply: " + reason in caplog.text


def _numpy_state(r):
    r.state = {k: v.numpy() for k, v in r.state.items()}


def _first_numpy(r):
    k = next(iter(r.state))
    r.state = {**r.state, k: r.state[k].numpy()}


@pytest.mark.parametrize("change, reason", [
    (_numpy_state, ": not a tensor (ndarray)"),  # was AttributeError ... numel from transport.fold
    (_first_numpy, ": not a tensor (ndarray)"),
    (_set(state=[1, 2, 3]), "update is a list, not a state dict"),
    (_set(state=None), "update is a NoneType, not a state dict"),
    (_set(state="weights"), "update is a str, not a state dict"),
    (lambda r: setattr(r, "state", {**r.state, "extra": torch.ones(1)}), "wrong keys"),
    (lambda r: setattr(r, "state", {**r.state, next(iter(r.state)): object()}), "not a tensor (object)"),
])
def test_a_reply_of_any_type_is_rejected_with_its_reason(setup, change, reason):
    _, _, _, without = setup
    _, res = _run(setup, change)
    assert_same_state(res.model.state_dict(), without.model.state_dict())
    for h in res.history[1:]:
        (cid, why), = h["clients_dropped"]
        assert cid == VICTIM and why.startswith("update rejected: ") and reason in why, why


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean"])
def test_a_count_the_average_cannot_take_rejects_that_reply_only(aggregator):
    """2**63 with an integer buffer (BatchNorm's num_batches_tracked): the int64 sum would wrap,
    so StreamingAverage refuses it before folding; that reply is rejected with the reason and
    the round is the average of the others (robust aggregators take any count: unweighted)."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = {"w": torch.randn(6, 3, generator=gen), "bn.num_batches_tracked": torch.tensor(40)}
    states = [{"w": g["w"] + 0.01 * torch.randn(6, 3, generator=gen), "bn.num_batches_tracked": torch.tensor(41)}
              for _ in range(4)]
    counts = [10, 2**63, 7, 30]
    stats = AggregateStats()
    out = make_strategy("fedavg", aggregator=aggregator).aggregate(g, list(zip(range(4), states, counts)), stats)
    if aggregator != "mean":
        assert not stats.rejected and stats.num_clients == 4
        return
    assert [c for c, _ in stats.rejected] == [1] and "past int64" in stats.rejected[0][1]
    assert stats.num_clients == 3 and stats.num_samples == 47
    ref = make_strategy("fedavg").aggregate(g, [(i, states[i], counts[i]) for i in (0, 2, 3)])
    assert_same_state(out, ref)
    # without integer buffers the same count is just a weight: the float64 average of the cohort
    fl = [{"w": s["w"]} for s in states]
    got = stream_average({"w": g["w"]}, list(zip(range(4), fl, counts)), plausible_scale=None)
    want = sum(s["w"].double() * n for s, n in zip(fl, counts)) / sum(counts)
    torch.testing.assert_close(got["w"].double(), want, rtol=2**-20, atol=1e-7)


def test_the_issue_two_clients_at_2e38_no_longer_zero_the_model(setup):
    """Finding 1 at the engine: without the partition cap (a transport that cannot know the
    partitions), two of ten clients claiming 2e38 made every tensor 0 while the round reported
    10/10 ok; now their average is the global model, finite, never zeros."""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = {"w": torch.randn(30, generator=gen), "b": torch.randn(4, generator=gen)}
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in range(10)]
    counts = [50] * 8 + [2e38, 2e38]
    stats = AggregateStats()
    out = make_strategy("fedavg", norm_bound=None).aggregate(g, list(zip(range(10), states, counts)), stats)
    assert stats.rolled_back is None and stats.num_clients == 10
    for k in g:
        want = (states[8][k].double() + states[9][k].double()) / 2  # the others weigh 2e-36 of it
        torch.testing.assert_close(out[k].double(), want, rtol=2**-20, atol=1e-7)
        assert torch.count_nonzero(out[k]) == out[k].numel()
    assert math.isfinite(stats.client_drift) and math.isfinite(stats.update_norm)


@pytest.mark.slow
def test_workers_drop_and_cap_as_in_process(setup):
    """The worker pool: a huge count capped, a numpy reply rejected, the same records as in
    process (threads 1 per client everywhere)."""
    from fedsq_fast.federation.workers import WorkerPoolTransport

    cfg, data, clean, without = setup

    class HostilePool(ChangesVictim, WorkerPoolTransport):
        def __init__(self, change):
            super().__init__(2, threads=1)
            self.change = change

    for change, ref, key in ((_set(num_samples=2**63), clean, "counts_capped"),
                             (_numpy_state, without, "clients_dropped")):
        pool = HostilePool(change)
        try:
            res = Federation(cfg, "fedavg", data, quiet=True, transport=pool).run()
        finally:
            pool.close()
        assert_same_state(res.model.state_dict(), ref.model.state_dict())
        assert all(h[key] and h[key][0][0] == VICTIM for h in res.history[1:])


def test_the_servers_numbers_do_not_depend_on_the_thread_count():
    """Issue 24 finding 4, server side: the average, client_drift and update_norm of a round
    are the same bits under 1 and 2 torch threads (tile-ordered float64 partial sums in the
    kernels, Python sums in client order); states large enough to be split across threads.
    (What differs between workers = 1 and 2 with threads unset is the clients' training:
    torch's own CPU kernels round differently per thread count; set threads.)"""
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    g = {"a": torch.randn(300_000, generator=gen), "b": torch.randn(70_001, generator=gen),
         "bn.running_var": torch.rand(64, generator=gen) + 0.5, "bn.num_batches_tracked": torch.tensor(9)}
    cohort = [(i, {k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.dtype.is_floating_point else v + 1
                   for k, v in g.items()}, 17 + 5 * i) for i in range(6)]
    before = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = AggregateStats()
            out = make_strategy("fedavg").aggregate(g, cohort, stats)
            got[threads] = (out, stats.client_drift, stats.update_norm)
    finally:
        torch.set_num_threads(before)
    assert_same_state(got[1][0], got[2][0])
    assert got[1][1:] == got[2][1:] and all(math.isfinite(v) for v in got[1][1:])
