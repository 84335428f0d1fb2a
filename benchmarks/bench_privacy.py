"""Client-level DP's cost per round (issue 26; fedsq_fast/federation/privacy.py).

A round of the federation benchmark's size (SVHN CNN fine-tuned on MNIST at 32 px, 10
clients, 2000 samples, one local epoch) is timed, then the same round's replies are
aggregated without DP (the streamed sample-weighted mean) and with central DP (clip every
update, sum, Gaussian noise, divide; plus the accountant's epsilon for the round), each
under pytest-benchmark, all in one run. DP's added cost is (DP aggregate - plain aggregate);
the target: at most 5% of the round.

    pytest benchmarks/bench_privacy.py --benchmark-only -s
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")
pytest.importorskip("dp_accounting")

import _bench  # noqa: E402

GROUP = "DP aggregation of one round (10 clients, svhn_cnn)"
STATE: dict = {}


@pytest.fixture(scope="module")
def round_and_replies():
    from fedsq_fast.federation import Federation, from_mapping, prepare_data, validate
    from fedsq_fast.federation.adapter import payload_state

    cfg = validate(from_mapping(dict(dataset="mnist", model="svhn_cnn", num_clients=10, max_train_samples=2000,
                                     val_size=500, max_test_samples=500, partition="dirichlet", alpha=0.5,
                                     rounds=100, methods=["fedsq"], checkpoint=False, fraction=1.0,
                                     dp="central", dp_noise_multiplier=1.0, dp_clip=10.0, dp_delta=1e-5)))
    fed = Federation(cfg, "fedsq", prepare_data(cfg), quiet=True)
    rounds = []
    for r in (1, 2):
        t = time.perf_counter()
        rec = fed.run_round(r)
        rounds.append(time.perf_counter() - t)
        fed.history.append(rec)
    glob = {k: v.clone() for k, v in payload_state(fed.model).items()}
    replies = []
    for cid in range(10):
        st, info = fed.train_client(3, cid, glob)
        replies.append((cid, {k: v.clone() for k, v in st.items()}, info["num_samples"]))
    plain = fed.strategy.__class__()  # the same strategy, no DP, replies streamed (norm_bound off as under DP)
    plain.norm_bound = None
    return fed, glob, replies, plain, min(rounds)


def test_dp_cost_per_round(benchmark, round_and_replies):
    fed, glob, replies, plain, round_s = round_and_replies
    STATE["round_s"] = round_s
    STATE["r"] = 3
    _bench.run(benchmark, GROUP, "plain mean", lambda: plain.aggregate(glob, iter(replies)), rounds=7)


def test_dp_cost_per_round_dp(benchmark, round_and_replies):
    fed, glob, replies, plain, round_s = round_and_replies

    def dp_round():
        STATE["r"] += 1  # a new round each call: its noise and its epsilon are computed afresh
        fed.strategy.aggregate(glob, iter(replies), rnd=STATE["r"])
        fed.strategy.dp.s.epsilon(STATE["r"])

    t = _bench.run(benchmark, GROUP, "central DP", dp_round, rounds=7)
    if t is None:
        return
    base = _bench.RESULTS[(GROUP, "plain mean")]
    share = (t - base) / STATE["round_s"]
    _bench.EXTRA["Differential privacy: cost per round"] = (
        f"round (client training + validation, no checkpoint) {STATE['round_s']:.2f} s; aggregate plain "
        f"{base * 1e3:.1f} ms, central DP {t * 1e3:.1f} ms (minimum of 7); DP's added cost "
        f"{(t - base) * 1e3:.1f} ms = {share * 100:.2f}% of the round (target <= 5%)\n")
    print("\n" + _bench.EXTRA["Differential privacy: cost per round"])
    assert share <= 0.05, share
