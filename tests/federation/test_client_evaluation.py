"""Federated evaluation (federation/evaluation.py): each client's test split evaluated on the
global model, on the clients. Oracles: Python/numpy statistics written out here, the
partition without test splits, a plain forward of the run's final model on each client's
split (FedSQ: the DualCopy model's own gates; FedBN: the client's own layers), and the
in-process run for the worker transport (the Flower transport: tests/flower/test_flower.py)."""
import csv
import math

import numpy as np
import pytest
import torch
from conftest import draw_seed, small_config

from fedsq_fast.federation import Federation, adapter, prepare_data
from fedsq_fast.federation import evaluation as E
from fedsq_fast.federation.config import ConfigError, from_mapping, validate
from fedsq_fast.federation.metrics import CSV_FIELDS

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(draw_seed(2**31))


# ---------------------------------------------------------------- statistics
def _oracle(accs, counts, losses):
    """The definitions of docs/federation.md, written out in Python floats."""
    k = len(accs)
    mean = sum(accs) / k
    return {
        "client_acc_weighted": sum(a * n for a, n in zip(accs, counts)) / sum(counts),
        "client_acc_mean": mean,
        "client_acc_worst": min(accs),
        "client_acc_p10": sorted(accs)[math.floor(0.1 * (k - 1))],  # numpy 'lower': an actual client's
        "client_acc_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / k),
        "client_loss": sum(x * n for x, n in zip(losses, counts)) / sum(counts),
        "client_eval_clients": k,
    }


@pytest.mark.parametrize("k", [1, 2, 3, 9, 10, 11, 37, 200])
def test_client_statistics_equal_the_written_out_definitions(rng, k):
    for _ in range(5):
        counts = [int(c) for c in rng.integers(1, 60, k)]
        correct = [int(rng.integers(0, c + 1)) for c in counts]
        accs = [c / n for c, n in zip(correct, counts)]
        if rng.random() < 0.3:  # ties and edge values: all wrong, all right, every client alike
            accs = [float(rng.choice([0.0, 1.0, accs[0]])) for _ in accs]
        losses = [float(x) for x in rng.exponential(2.0, k)]
        got, want = E.client_stats(accs, counts, losses), _oracle(accs, counts, losses)
        assert list(got) == list(E.CSV_KEYS)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
        assert got["client_acc_p10"] in accs and got["client_acc_worst"] in accs


def test_client_statistics_of_no_client_are_nan_and_shapes_are_checked():
    out = E.client_stats([], [])
    assert out["client_eval_clients"] == 0
    assert all(math.isnan(out[k]) for k in E.CSV_KEYS[:-1])
    with pytest.raises(ValueError, match="accs and counts"):
        E.client_stats([0.5, 0.5], [3])


# ---------------------------------------------------------------- the split
@pytest.mark.parametrize("n,f,want", [(0, 0.2, 0), (1, 0.5, 0), (2, 0.01, 1), (2, 0.99, 1), (10, 0.25, 3),
                                      (10, 0.2, 2), (10, 0.0, 0), (7, 0.5, 4), (1000, 0.1, 100), (5, 0.9, 4)])
def test_client_test_size_rule(n, f, want):
    assert E.client_test_size(n, f) == want


def test_split_is_disjoint_whole_seeded_and_per_client(rng):
    for _ in range(20):
        k = int(rng.integers(1, 30))
        perm = rng.permutation(int(rng.integers(k, 2000)))
        cuts = np.sort(rng.choice(np.arange(1, len(perm)), k - 1, replace=False)) if k > 1 else []
        parts = [np.sort(p) for p in np.split(perm, cuts)]
        f, seed = float(rng.uniform(0.01, 0.9)), int(rng.integers(2**31))
        train, test = E.client_test_split(parts, f, seed)
        for p, tr, te in zip(parts, train, test):
            assert len(np.intersect1d(tr, te)) == 0
            assert np.array_equal(np.sort(np.concatenate([tr, te])), p)
            assert len(te) == E.client_test_size(len(p), f)
            assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
        again = E.client_test_split(parts, f, seed)
        assert all(np.array_equal(a, b) for a, b in zip(test, again[1]))
        if k > 1:  # another client's partition changes nothing of client 0's split
            other = [parts[0]] + [p[: max(1, len(p) // 2)] for p in parts[1:]]
            assert np.array_equal(E.client_test_split(other, f, seed)[1][0], test[0])
        if len(parts[0]) > 20:  # the draw follows the seed (one other seed may draw the same few
            # samples by chance: 1 in 21 for one test sample of 21; eight all doing so, ~1e-11)
            assert any(not np.array_equal(E.client_test_split(parts, f, seed + d)[1][0], test[0])
                       for d in range(1, 9))


def _rows(x):
    return sorted(map(bytes, x.reshape(len(x), -1).numpy().astype(np.float32)))


def test_prepare_data_takes_the_test_split_from_each_client_before_its_training_data():
    seed = draw_seed()
    off = prepare_data(small_config(seed=seed))
    on = prepare_data(small_config(seed=seed, client_test_fraction=0.3))
    assert off.ctest_parts is None and off.ctest_x is None
    for a in ("val_x", "val_y", "test_x", "test_y", "probe"):  # the server's splits do not move
        assert torch.equal(getattr(off, a), getattr(on, a)), a
    sizes = on.ctest_parts.sizes()
    assert (sizes == [E.client_test_size(int(n), 0.3) for n in off.parts.sizes()]).all()
    assert (on.parts.sizes() + sizes == off.parts.sizes()).all()
    for k in range(len(off.parts)):
        p, t, q = off.parts[k], on.ctest_parts[k], on.parts[k]
        full = _rows(off.x[p[0]:p[-1] + 1])
        # train + test is the client's partition (multisets of samples): disjoint, nothing lost or added
        assert sorted(_rows(on.x[q[0]:q[-1] + 1]) + _rows(on.ctest_x[t[0]:t[-1] + 1])) == full
        assert sorted(on.y[q[0]:q[-1] + 1].tolist() + on.ctest_y[t[0]:t[-1] + 1].tolist()) == \
            sorted(off.y[p[0]:p[-1] + 1].tolist())
    assert (on.counts.sum(1) == on.parts.sizes()).all()  # the partition table counts what trains


# ---------------------------------------------------------------- the engine
def _cfg(method, **kw):
    return small_config(**{**dict(methods=[method], rounds=2, num_clients=5, checkpoint=False, lr=0.1,
                                  client_test_fraction=0.25), **kw})


def _client_numbers(history):
    keys = E.RECORD_KEYS
    return [{k: h[k] for k in keys if k in h} for h in history]


def _forward_oracle(model, x, y, transform):
    """Accuracy and mean loss of one plain forward over the whole split, in eval mode, float64 loss."""
    model.eval()
    with torch.no_grad():
        out = model(transform(x)).double()
    return float((out.argmax(1) == y).double().mean()), float(torch.nn.functional.cross_entropy(out, y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """method -> (config, data, in-process run, its FedBN layers): the oracle of the transports."""
    out = {}
    for m in ("fedavg", "fedsq", "fedbn"):
        cfg = _cfg(m, seed=draw_seed())
        data = prepare_data(cfg)
        fed = Federation(cfg, m, data, quiet=True, out_dir=tmp_path_factory.mktemp(m))
        out[m] = (cfg, data, fed.run(), fed.transport.state_dict())
    return out


@pytest.mark.parametrize("method", ["fedavg", "fedsq", "fedbn"])
def test_each_client_evaluates_the_final_global_model_on_its_own_split(runs, method):
    cfg, data, res, local = runs[method]
    model = res.model
    assert adapter.is_dualcopy(model) == (method == "fedsq")  # FedSQ: its gates from its structural copy
    last = res.history[-1]
    assert last["client_eval_clients"] == int((data.ctest_parts.sizes() > 0).sum()) and not last["client_eval_failed"]
    for k in range(len(data.parts)):
        t = data.ctest_parts[k]
        m = model
        if method == "fedbn":  # the client's own normalisation layers, as a deployed FedBN client runs
            import copy

            m = copy.deepcopy(model)
            own = {key.split("/", 1)[1]: v for key, v in local.items() if key.startswith(f"{k}/")}
            assert own, "fedbn keeps each client's layers"
            adapter.load_payload(m, {**adapter.payload_state(model), **own})
        acc, loss = _forward_oracle(m, data.ctest_x[t[0]:t[-1] + 1], data.ctest_y[t[0]:t[-1] + 1], data.transform)
        assert last["client_acc"][k] == pytest.approx(acc, abs=1e-12), k
    accs = last["client_acc"]
    want = E.client_stats(accs, data.ctest_parts.sizes())
    for key in ("client_acc_weighted", "client_acc_mean", "client_acc_worst", "client_acc_p10", "client_acc_std"):
        assert last[key] == want[key] and res.summary[key] == want[key], key
    assert res.summary["client_eval_round"] == cfg.rounds


def test_metrics_files_hold_the_numbers_only_when_on(runs, tmp_path):
    cfg, data, res, _ = runs["fedsq"]
    with open(res.out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS + E.CSV_KEYS
    for row, h in zip(rows, res.history):
        assert float(row["client_acc_worst"]) == h["client_acc_worst"]
        assert int(row["client_eval_clients"]) == h["client_eval_clients"]
    off = Federation(cfg.replace(client_test_fraction=0.0), "fedsq", prepare_data(cfg.replace(client_test_fraction=0.0)),
                     quiet=True, out_dir=tmp_path).run()
    assert not any(k in h for h in off.history for k in E.RECORD_KEYS)
    assert not any(k in off.summary for k in E.SUMMARY_KEYS)
    with open(tmp_path / "metrics.csv") as f:
        assert tuple(next(csv.reader(f))) == CSV_FIELDS  # runs without it keep their columns


def test_evaluated_rounds_are_zero_every_nth_and_the_last():
    cfg = small_config(rounds=5, num_clients=4, checkpoint=False, client_test_fraction=0.2, client_eval_every=2)
    res = Federation(cfg, "fedavg", prepare_data(cfg), quiet=True).run()
    assert [h["round"] for h in res.history if "client_acc_weighted" in h] == [0, 2, 4, 5]
    assert not any(E.due(cfg.replace(client_test_fraction=0.0), r) for r in range(6))


def test_a_client_whose_evaluation_fails_is_listed_and_left_out(monkeypatch):
    from fedsq_fast.federation.trainer import ClientTrainer

    cfg = _cfg("fedavg", rounds=1)
    real = ClientTrainer.evaluate

    def flaky(self, cid, *a, **kw):
        if cid == 2:
            raise RuntimeError("disk gone")
        return real(self, cid, *a, **kw)

    monkeypatch.setattr(ClientTrainer, "evaluate", flaky)
    data = prepare_data(cfg)
    res = Federation(cfg, "fedavg", data, quiet=True).run()
    for h in res.history:
        assert h["client_eval_failed"] == [[2, "RuntimeError: disk gone"]]
        assert h["client_acc"][2] is None and h["client_eval_clients"] == len(data.parts) - 1
        others = [a for a in h["client_acc"] if a is not None]
        assert h["client_acc_worst"] == min(others)


@pytest.mark.parametrize("key,value,msg", [("client_test_fraction", 1.0, "client_test_fraction"),
                                           ("client_test_fraction", -0.1, "client_test_fraction"),
                                           ("client_test_fraction", "x", "client_test_fraction"),
                                           ("client_eval_every", 0, "client_eval_every"),
                                           ("client_eval_every", 1.5, "client_eval_every")])
def test_bad_keys_are_refused_in_one_line(key, value, msg):
    with pytest.raises((ConfigError, ValueError)) as e:
        validate(from_mapping({key: value}))
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_a_transport_that_cannot_evaluate_is_refused_before_any_round():
    from fedsq_fast.federation.transport import Transport

    cfg = _cfg("fedavg")
    with pytest.raises(ValueError, match="^client_test_fraction: the transport Transport cannot evaluate"):
        Federation(cfg, "fedavg", prepare_data(cfg), quiet=True, transport=Transport())


# ---------------------------------------------------------------- worker processes
def test_worker_processes_evaluate_exactly_as_in_process(runs):
    from fedsq_fast.federation import WorkerPoolTransport

    pool = WorkerPoolTransport(2)  # one pool for both methods: the workers start once
    try:
        for method in ("fedsq", "fedbn"):  # FedSQ's gates, FedBN's own layers kept by the server
            cfg, data, res, _ = runs[method]
            w2 = Federation(cfg.replace(workers=2), method, data, quiet=True, transport=pool).run()
            assert _client_numbers(w2.history) == _client_numbers(res.history), method
            assert all(h["client_eval_clients"] > 0 for h in w2.history)
    finally:
        pool.close()


def test_a_worker_killed_while_evaluating_costs_its_remaining_clients_only(runs):
    from fedsq_fast.federation import WorkerPoolTransport
    from fedsq_fast.federation.workers import deal

    cfg, data, res, _ = runs["fedavg"]
    sizes = data.ctest_parts.sizes()
    clients = [int(c) for c in range(len(sizes)) if sizes[c] > 0]
    dealt = deal(clients, [int(sizes[c]) for c in clients], 2)
    owed = next(d for d in dealt if d)
    victim = owed[len(owed) // 2]  # its clients before it answered, it and those after it did not
    lost = owed[owed.index(victim):]  # the clients that worker had not answered for yet
    pool = WorkerPoolTransport(2)
    pool._test_fault = {("evaluate", 1, victim): "kill"}
    try:
        out = Federation(cfg.replace(workers=2), "fedavg", data, quiet=True, transport=pool).run()
    finally:
        pool.close()
    ref = _client_numbers(res.history)
    got = _client_numbers(out.history)
    assert got[0] == ref[0] and got[2] == ref[2]  # round 0; the last round: a fresh worker took its place
    r1 = got[1]
    assert [c for c, _ in r1["client_eval_failed"]] == sorted(lost)
    assert all(why.startswith("worker died: killed by SIGKILL") for _, why in r1["client_eval_failed"])
    for c in clients:
        assert r1["client_acc"][c] == (None if c in lost else ref[1]["client_acc"][c])
    assert r1["client_eval_clients"] == len(clients) - len(lost)
    assert [h["val_acc"] for h in out.history] == [h["val_acc"] for h in res.history]  # training untouched
