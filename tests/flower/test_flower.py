"""FedSQ on Flower: array conversion, the strategy adapter's checks, the ServerApp/ClientApp
against the embedded engine (in process, and on a real SuperLink with SuperNodes on loopback)."""
import functools
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config, draw_seed

pytest.importorskip("flwr")

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord,  # noqa: E402
                      RecordDict)

from fedsq_fast.federation import Federation, from_mapping, prepare_data, stream_average  # noqa: E402
from fedsq_fast.federation import checkpoint as ckpt  # noqa: E402
from fedsq_fast.federation.config import KEYS  # noqa: E402
from fedsq_fast.flower import FedSQStrategy, GridTransport, arrays_to_state, state_to_arrays  # noqa: E402
from fedsq_fast.flower import app as A  # noqa: E402
from fedsq_fast.flower import arrays as flower_arrays  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _cfg(**kw):
    return small_config(**{**dict(rounds=2, num_clients=3, methods=['fedsq']), **kw})


def _state(gen):
    return {"w": torch.randn(7, 5, generator=gen), "h": torch.randn(4, generator=gen).bfloat16(),
            "bn.running_mean": torch.randn(5, generator=gen),
            "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=gen)}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower process need a run/node/task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(draw_seed(2**31))


# ---------------------------------------------------------------- arrays
@pytest.mark.parametrize("copy", [True, False])
def test_arrays_round_trip_keeps_dtypes_bf16_and_integers(gen, copy):
    s = {**_state(gen), "e": torch.empty(0, 3, dtype=torch.bfloat16), "f": torch.tensor([True, False]),
         "g": torch.randn(3, 2, generator=gen).half(), "t": torch.randn(4, 6, generator=gen).t()}
    rec = state_to_arrays(s)
    assert rec["h"].stype == "fedsq_fast.torch-raw-le" and rec["w"].stype == "numpy.ndarray"
    back = arrays_to_state(rec, copy=copy)
    assert list(back) == list(s)
    for k in s:
        assert back[k].dtype == s[k].dtype and back[k].shape == s[k].shape and torch.equal(back[k], s[k]), k
    # copy=False: numeric numpy payloads are views of the record's bytes, not copies
    for k in ("w", "h"):  # numpy and bf16 raw payloads alike (raw views on little-endian hosts)
        data = rec[k].data
        lo = np.frombuffer(data, dtype=np.uint8).ctypes.data
        view = not copy and (k == "w" or sys.byteorder == "little")
        assert (lo <= back[k].data_ptr() < lo + len(data)) == view, k
    with pytest.raises(TypeError, match=r"state\['x'\] must be a Tensor"):
        state_to_arrays({"x": 1.0})


def test_arrays_view_falls_back_for_big_endian_fortran_and_0d(gen):
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64).numpy()
    rec = ArrayRecord({"be": Array(x.astype(">f8")), "f": Array(np.asfortranarray(x)),
                       "s": Array(np.array(2.5, dtype=np.float32)), "i": Array(np.arange(6, dtype=">i4"))})
    for copy in (True, False):
        back = arrays_to_state(rec, copy=copy)
        assert torch.equal(back["be"], torch.from_numpy(x)) and torch.equal(back["f"], torch.from_numpy(x))
        assert back["s"].shape == () and back["s"].item() == 2.5
        assert back["i"].tolist() == list(range(6)) and back["i"].dtype == torch.int32


@pytest.mark.parametrize("copy", [True, False])
def test_arrays_malformed_are_refused_with_the_key(copy):
    arrays_to_state = functools.partial(flower_arrays.arrays_to_state, copy=copy)
    bad = ArrayRecord({"h": Array(dtype="bfloat16", shape=(3,), stype="fedsq_fast.torch-raw-le", data=b"\0" * 5)})
    with pytest.raises(ValueError, match=r"arrays\['h'\]: 5 bytes"):
        arrays_to_state(bad)
    bad = ArrayRecord({"x": Array(dtype="float32", shape=(2,), stype="pickle", data=b"")})
    with pytest.raises(ValueError, match=r"arrays\['x'\]: unsupported serialization type"):
        arrays_to_state(bad)
    bad = ArrayRecord({"x": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"garbage")})
    with pytest.raises(ValueError, match=r"arrays\['x'\]: not a readable numpy array"):
        arrays_to_state(bad)
    good = Array(np.arange(4, dtype=np.float32))
    short = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=good.data[:-4])
    with pytest.raises(ValueError, match=r"arrays\['x'\]: 12 data bytes, but the header claims shape \(4,\)"):
        arrays_to_state(ArrayRecord({"x": short}))
    lying = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=good.data)
    with pytest.raises(ValueError, match=r"arrays\['x'\]: data has shape \(4,\), header says \(2, 2\)"):
        arrays_to_state(ArrayRecord({"x": lying}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32,
                                   torch.int16, torch.int8, torch.uint8, torch.bool])
def test_arrays_encode_writes_the_bytes_flower_writes(gen, dtype):
    # state_to_arrays builds the .npy bytes itself (header cached per dtype and shape, data copied
    # once); Flower's Array(ndarray) (np.save) is the oracle, field for field
    shapes = [(), (0,), (1,), (2, 0, 5), (3,) * 11] + [
        tuple(int(d) for d in torch.randint(1, 9, (int(r),), generator=gen)) for r in torch.randint(1, 5, (4,), generator=gen)]
    for shape in shapes:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
        for src in (t, t.t() if t.dim() == 2 else t):  # non-contiguous input: sent in C order
            mine, ref = state_to_arrays({"a": src})["a"], Array(src.contiguous().numpy())
            assert (mine.dtype, mine.shape, mine.stype, mine.data) == (ref.dtype, ref.shape, ref.stype, ref.data), shape
            back = arrays_to_state(ArrayRecord({"a": mine}), copy=False)["a"]
            assert back.dtype == dtype and torch.equal(back, src)


def test_arrays_decode_header_cache_never_hides_a_bad_payload():
    # the parsed headers are cached by their bytes: a payload that reuses a cached header with the
    # wrong data length, or a header numpy refuses (over its 10,000-byte limit), is still refused
    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert arrays_to_state(ArrayRecord({"x": good}), copy=False)["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    for copy in (False, True):
        extra = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=good.data + b"\0" * 4)
        with pytest.raises(ValueError, match=r"arrays\['x'\]: 28 data bytes, but the header claims shape \(2, 3\)"):
            arrays_to_state(ArrayRecord({"x": extra}), copy=copy)
    head = repr({"descr": "<f4", "fortran_order": False, "shape": (2,)}).encode() + b" " * 20_000 + b"\n"
    huge = b"\x93NUMPY\x02\x00" + len(head).to_bytes(4, "little") + head + np.zeros(2, np.float32).tobytes()
    for copy in (False, True):
        with pytest.raises(ValueError, match=r"arrays\['x'\]: not a readable numpy array"):
            arrays_to_state(ArrayRecord({"x": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=huge)}),
                            copy=copy)


def test_arrays_decode_of_damaged_payloads_is_a_value_error_or_the_right_shape():
    # random byte flips, cuts and insertions anywhere in a payload (header included): decoding
    # either refuses with a ValueError or returns the declared shape; no other exception escapes
    # (the header cache and the copying path alike). Values a flip changed are the engine's to
    # screen (finite, plausible, dtype against the global model).
    import random
    import warnings

    rng = random.Random(draw_seed(2**31))
    good = Array(np.arange(12, dtype=np.float32).reshape(3, 4)).data
    for _ in range(1500):
        d = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            j, op = rng.randrange(len(d)), rng.random()
            if op < 0.5:
                d[j] = rng.randrange(256)
            elif op < 0.75:
                del d[j:j + rng.randint(1, 8)]
            else:
                d[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        rec = ArrayRecord({"x": Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=bytes(d))})
        for copy in (False, True):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # numpy's note on Python-2 style headers
                    out = arrays_to_state(rec, copy=copy)["x"]
            except ValueError as e:
                assert str(e).startswith("arrays['x']"), str(e)
            else:
                assert tuple(out.shape) == (3, 4)


# ---------------------------------------------------------------- strategy adapter
class _Grid:
    """Node ids only (what configure_train asks for)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def _reply(to: Message, state=None, n=10, pid=None, metrics=None, arrays_key="arrays", src=None):
    m = dict(metrics if metrics is not None else {"num-examples": n})
    if pid is not None:
        m["partition-id"] = pid
    content = RecordDict({"metrics": MetricRecord(m)})
    if state is not None:
        content[arrays_key] = state_to_arrays(state)
    r = Message(content, reply_to=to)
    if src is not None:
        r.metadata.__dict__["_src_node_id"] = src
    return r


def _sent(strat, glob, nodes):
    msgs = list(strat.configure_train(1, state_to_arrays(glob), ConfigRecord(), _Grid(nodes)))
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    return msgs


def test_strategy_rejects_malformed_replies_with_logged_reason(gen, caplog):
    glob = _state(gen)
    strat = FedSQStrategy(_cfg(), "fedsq", min_train_nodes=1, min_available_nodes=1)
    msgs = _sent(strat, glob, range(100, 108))  # node ids apart from partition ids
    good = [_state(gen) for _ in range(2)]
    wrong_keys = {k: v for k, v in _state(gen).items() if k != "w"}
    wrong_shape = {**_state(gen), "w": torch.randn(5, 7)}
    nan = _state(gen)
    nan["bn.running_mean"][1] = float("nan")
    replies = [
        _reply(msgs[0], good[1], n=7, pid=4),
        _reply(msgs[1], wrong_keys, pid=1),
        _reply(msgs[2], wrong_shape, pid=2),
        _reply(msgs[3], nan, pid=3),
        _reply(msgs[4], good[0], n=13, pid=0),
        _reply(msgs[5], _state(gen), pid=5, metrics={"num-examples": float("nan")}),
        _reply(msgs[6], _state(gen), pid=6, arrays_key="weights"),
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[7]),
    ]
    with caplog.at_level(logging.WARNING, logger="fedsq_fast.flower"):
        arrays, metrics = strat.aggregate_train(1, replies)
    reasons = dict(strat.last_stats.rejected)
    assert "wrong keys" in reasons[1] and "shape (5, 7)" in reasons[2] and "NaN" in reasons[3]
    assert "num-examples" in reasons[5] and "'weights'" in reasons[6]
    assert any("client crashed" in r for r in reasons.values())
    assert len(reasons) == 6 and strat.last_stats.num_clients == 2
    for r in reasons.values():  # every reason is logged
        assert r in caplog.text
    ref = stream_average(glob, [(0, good[0], 13), (4, good[1], 7)])  # folded in partition order
    out = arrays_to_state(arrays)
    for k in ref:
        assert out[k].dtype == glob[k].dtype and torch.equal(out[k], ref[k]), k
    assert metrics["num-examples"] == 20 and metrics["clients-ok"] == 2
    # nothing valid: no new model
    assert strat.aggregate_train(1, replies[1:4]) == (None, None)


def test_strategy_caps_counts_at_the_cohort_rule_and_drops_malformed_metrics(gen, caplog):
    """Issue 24: counts of 2**60 and 3.5e38 (accepted as finite numbers) used to end the run
    or take it over; a list as train-loss crashed the fold. Now: capped at count_cap x the
    cohort's median claim (logged, counts-capped), the malformed replies dropped with the
    reason, the model the engine's average of the capped cohort bit for bit."""
    glob = _state(gen)
    strat = FedSQStrategy(_cfg(), "fedsq", min_train_nodes=1, min_available_nodes=1)
    msgs = _sent(strat, glob, range(7))
    states = [_state(gen) for _ in range(7)]
    claims = [10, 12, 2**60, 3.5e38, 11]
    replies = [_reply(m, s, n=n, pid=i) for i, (m, s, n) in enumerate(zip(msgs, states, claims))]
    replies.append(_reply(msgs[5], states[5], pid=5, metrics={"num-examples": 9, "train-loss": [1.0, 2.0]}))
    replies.append(_reply(msgs[6], states[6], pid=6, metrics={"num-examples": [9]}))
    with caplog.at_level(logging.WARNING, logger="fedsq_fast.flower"):
        arrays, metrics = strat.aggregate_train(1, replies)
    cap = 1150  # 100 x the median of the six readable claims (9, 10, 11, 12, 2**60, 3.5e38): 11.5
    assert strat.last_stats.capped == [[2, 2**60, cap], [3, 3.5e38, cap]]
    assert metrics["counts-capped"] == 2 and "claimed 1152921504606846976 samples" in caplog.text
    reasons = dict(strat.last_stats.rejected)
    assert reasons == {5: "malformed reply: loss must be a number, got list",
                       6: "num-examples must be a finite number, got [9]"}
    ref = stream_average(glob, [(i, states[i], n) for i, n in zip(range(5), [10, 12, cap, cap, 11])])
    out = arrays_to_state(arrays)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    # the rule off: no cap, and still no crash: 2**60 and 3.5e38 x the integer buffer (num_batches_tracked,
    # up to 1000) cannot be summed in int64, so those replies are rejected before they are folded
    strat = FedSQStrategy(_cfg(), "fedsq", min_train_nodes=1, min_available_nodes=1, count_cap=None)
    msgs = _sent(strat, glob, range(5))
    arrays, _ = strat.aggregate_train(1, [_reply(m, s, n=n, pid=i) for i, (m, s, n) in
                                          enumerate(zip(msgs, states, claims))])
    assert [c for c, _ in strat.last_stats.rejected] == [2, 3]
    assert all("int64" in r for _, r in strat.last_stats.rejected)
    ref = stream_average(glob, [(i, states[i], claims[i]) for i in (0, 1, 4)])
    out = arrays_to_state(arrays)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert strat.last_stats.capped == [] and arrays is not None
    strat = FedSQStrategy(_cfg(), "fedsq", min_train_nodes=1, min_available_nodes=1, count_cap=None, max_count=20)
    msgs = _sent(strat, glob, range(5))
    strat.aggregate_train(1, [_reply(m, s, n=n, pid=i) for i, (m, s, n) in enumerate(zip(msgs, states, claims))])
    assert strat.last_stats.capped == [[2, 2**60, 20], [3, 3.5e38, 20]] and not strat.last_stats.rejected
    for bad, match in (({"count_cap": 0.5}, "count_cap must be a finite number >= 1 or None, got 0.5"),
                       ({"max_count": 0}, "max_count must be an integer >= 1 or None, got 0")):
        with pytest.raises(ValueError, match=match):
            FedSQStrategy(_cfg(), "fedsq", **bad)


def test_strategy_refuses_an_update_far_outside_the_cohort_as_the_engine_does(gen):
    """The cohort norm bound on the Flower path: a reply boosted 1000x (finite, plausible) is
    refused with the ratio; the new model is the engine's average of the others, bit for bit."""
    glob = _state(gen)
    strat = FedSQStrategy(_cfg(), "fedsq", min_train_nodes=1, min_available_nodes=1)
    msgs = _sent(strat, glob, range(5))
    states = [{k: (v + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.dtype.is_floating_point else v
               for k, v in glob.items()} for _ in range(5)]
    states[2] = {k: (glob[k] + 1000 * (v - glob[k])).to(v.dtype) if v.dtype.is_floating_point and "running" not in k
                 else v for k, v in states[2].items()}
    arrays, metrics = strat.aggregate_train(1, [_reply(m, s, n=10, pid=i) for i, (m, s) in enumerate(zip(msgs, states))])
    reasons = dict(strat.last_stats.rejected)
    assert list(reasons) == [2] and "x the cohort median" in reasons[2]
    ref = stream_average(glob, [(i, states[i], 10) for i in (0, 1, 3, 4)])
    out = arrays_to_state(arrays)
    assert all(torch.equal(out[k], ref[k]) for k in ref) and metrics["clients-ok"] == 4


def test_strategy_composes_with_flower_dp_wrapper_on_float_payloads(gen):
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    glob = {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    inner = FedSQStrategy(_cfg(), "fedsq", min_train_nodes=2, min_available_nodes=2)
    dp = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=1e6,
                                                    num_sampled_clients=2)
    msgs = list(dp.configure_train(1, state_to_arrays(glob), ConfigRecord(), _Grid([1, 2])))
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    cl = [{k: v + torch.randn_like(v) * 0.1 for k, v in glob.items()} for _ in range(2)]
    arrays, _ = dp.aggregate_train(1, [_reply(msgs[i], cl[i], n=5, pid=i) for i in range(2)])
    ref = stream_average(glob, [(0, cl[0], 5), (1, cl[1], 5)])
    out = arrays_to_state(arrays)
    for k in ref:  # no noise, no clipping: the wrapper hands back our average (float64 round trip)
        torch.testing.assert_close(out[k].float(), ref[k], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- ServerApp/ClientApp in process
class InProcessGrid:
    """A Grid whose nodes run the ClientApp function in this process (no Flower runtime):
    tests the server's round logic and the client's step without processes."""

    def __init__(self, num_nodes, run_config=None, dead=(), mangle=None):
        self.nodes = {1000 + 17 * i: {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)}
        self.states = {n: RecordDict() for n in self.nodes}
        self.dead, self.mangle = set(dead), mangle
        self.replies, self.count = {}, itertools.count()

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"msg{next(self.count)}"
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = m.metadata.dst_node_id
            if node in self.dead:
                continue  # never answers
            ctx = Context(1, node, self.nodes[node], self.states[node], {})
            handler = A._client_evaluate if m.metadata.message_type == MessageType.EVALUATE else A._client_train
            rep = handler(m, ctx)
            rep.metadata.__dict__["_src_node_id"] = node
            if self.mangle is not None:
                rep = self.mangle(self.nodes[node]["partition-id"], rep)
            self.replies[mid] = rep
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _same_model(a, b, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fedsq", "fedbn"])
def test_in_process_flower_equals_embedded_engine(tmp_path, method):
    cfg = _cfg(methods=[method], out_dir=str(tmp_path / "flower"))
    data = prepare_data(cfg)
    emb = Federation(cfg, method, data, out_dir=tmp_path / "emb", quiet=True).run()
    fl = Federation(cfg, method, data, out_dir=tmp_path / "fl", quiet=True,
                    transport=GridTransport(InProcessGrid(3), poll_s=0)).run()
    _same_model(emb.model, fl.model)
    # the same rule on Flower: what trained is recorded, a DualCopy model under fedsq
    kind = json.loads((tmp_path / "fl" / "metrics.json").read_text())["summary"]["model"]["kind"]
    assert kind == emb.summary["model"]["kind"] == ("dualcopy" if method == "fedsq" else "plain")
    for h1, h2 in zip(emb.history, fl.history):
        for k in ("val_acc", "val_loss", "clients_ok", "clients_dropped", "samples", "bytes_up", "bytes_down"):
            assert h1[k] == h2[k], k
    for f in ("metrics.json", "metrics.csv", "checkpoint.safetensors"):
        assert (tmp_path / "fl" / f).is_file()


@pytest.mark.parametrize("method", ["fedsq", "fedbn"])
def test_in_process_flower_federated_evaluation_equals_embedded_engine(tmp_path, method):
    """Federated evaluation on the nodes (EVALUATE messages): every client's numbers as in process."""
    from fedsq_fast.federation.evaluation import RECORD_KEYS

    cfg = _cfg(methods=[method], client_test_fraction=0.3, out_dir=str(tmp_path / "flower"))
    data = prepare_data(cfg)
    emb = Federation(cfg, method, data, out_dir=tmp_path / "emb", quiet=True).run()
    fl = Federation(cfg, method, data, out_dir=tmp_path / "fl", quiet=True,
                    transport=GridTransport(InProcessGrid(3), poll_s=0)).run()
    _same_model(emb.model, fl.model)
    for h1, h2 in zip(emb.history, fl.history, strict=True):
        assert {k: h1[k] for k in RECORD_KEYS} == {k: h2[k] for k in RECORD_KEYS}
        assert h2["client_eval_clients"] == 3 and h2["client_eval_failed"] == []
    # a node that never answers: its partition's evaluation fails with the reason, the others count
    dead = Federation(cfg.replace(min_clients=1), method, data, quiet=True,
                      transport=GridTransport(InProcessGrid(3, dead={1000 + 17}), poll_s=0, round_timeout=0.2)).run()
    for h in dead.history:
        assert [c for c, _ in h["client_eval_failed"]] == [1] and "no reply" in h["client_eval_failed"][0][1]
        assert h["client_acc"][1] is None and h["client_eval_clients"] == 2


def test_in_process_dead_node_and_nan_reply_leave_the_others(tmp_path):
    cfg = _cfg(min_clients=1, out_dir=str(tmp_path))
    data = prepare_data(cfg)

    def mangle(pid, rep):  # partition 2 sends NaN
        if pid == 2 and not rep.has_error() and "arrays" in rep.content.array_records:
            s = arrays_to_state(rep.content["arrays"])
            next(t for t in s.values() if t.dtype.is_floating_point).view(-1)[0] = float("nan")
            rep.content["arrays"] = state_to_arrays(s)
        return rep

    grid = InProcessGrid(3, dead=[1000 + 17], mangle=mangle)
    res = Federation(cfg, "fedsq", data, quiet=True,
                     transport=GridTransport(grid, round_timeout=0.2, poll_s=0.05)).run()

    def hook(rnd, cid, state):
        if cid == 1:
            raise RuntimeError("dead")
        if cid == 2:
            raise RuntimeError("nan")
        return state

    emb = Federation(cfg, "fedsq", data, quiet=True, client_hook=hook).run()
    _same_model(emb.model, res.model)
    for h in res.history[1:]:
        reasons = dict(h["clients_dropped"])
        assert h["clients_ok"] == 1 and "NaN" in reasons[2]
        assert "round-timeout" in reasons[1] or "no connected node" in reasons[1]


def test_flower_app_config_covers_every_run_config_key():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    conf = tomllib.loads((ROOT / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    keys = {k.replace("-", "_") for k in conf["config"]} - {k.replace("-", "_") for k in A.FLOWER_KEYS}
    assert keys == set(KEYS)
    assert conf["components"] == {"serverapp": "fedsq_fast.flower.app:server_app",
                                  "clientapp": "fedsq_fast.flower.app:client_app"}
    cfg, opts = A.config_from_run_config(conf["config"])
    assert cfg.dataset == "digits" and cfg.methods == ["fedsq"] and opts["order"] == "sorted"
    # "none" is None only where a key may be None: augment = "none" stays the string
    cfg2, _ = A.config_from_run_config({**conf["config"], "augment": "none", "max-test-samples": "none"})
    assert cfg2.augment == "none" and cfg2.max_test_samples is None
    with pytest.raises(ValueError, match="round-timeout"):
        A.config_from_run_config({**conf["config"], "round-timeout": -1})
    with pytest.raises(ValueError, match="num-partitions"):
        A.node_partition({"partition-id": 0, "num-partitions": 4}, cfg)


# ---------------------------------------------------------------- real deployment on loopback
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict:
    """pid -> parent pid for every process (Linux /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _descendants(pid: int) -> list:
    par = _children()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in par.items() if pp == p]
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_tree(proc, sig=signal.SIGKILL) -> None:
    """Signal a process, its process group and every descendant's group (the SuperLink
    starts its SuperExec in a new session, so one killpg is not enough)."""
    pids = [proc.pid] + _descendants(proc.pid)
    groups = set()
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except OSError:
            pass
    for g in groups:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def make_tls_and_node_keys(d: Path, nodes: int) -> dict:
    """docs/flower.md's TLS and node-authentication material, generated: a CA, a SuperLink
    certificate for 127.0.0.1/localhost signed by it, and one ECDSA key pair per SuperNode
    (OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedsq test CA")).issuer_name(name("fedsq test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    for i in range(nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        (d / f"node{i}").write_bytes(k.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()))
        (d / f"node{i}.pub").write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH))
        os.chmod(d / f"node{i}", 0o600)
    return files


class Deployment:
    """One flower-superlink and N flower-supernode processes (loopback, ports chosen now),
    each in its own process group, logs in ``root``. Insecure by default; with ``tls`` (the
    files of :func:`make_tls_and_node_keys`) every connection is TLS, and with ``auth`` only
    registered SuperNodes may connect."""

    def __init__(self, root: Path, tls: dict | None = None, auth: bool = False):
        self.root, self.tls, self.auth = root, tls, auth
        self.procs, self.logs, self.nodes = [], [], {}
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(root / "flwr-home"),
                        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        OMP_NUM_THREADS="1",  # Flower starts flower-superexec, flwr-serverapp... by name
                        PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))

    def _start(self, name, args):
        log = open(self.root / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                             start_new_session=True)
        self.procs.append(p)
        self.logs.append(self.root / f"{name}.log")
        return p

    def start_superlink(self, timeout=60):
        self.port = _free_port()
        sec = (["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                "--ssl-keyfile", str(self.tls["key"])] if self.tls else ["--insecure"])
        self.superlink = self._start("superlink", [
            str(BIN / "flower-superlink"), *sec, *(["--enable-supernode-auth"] if self.auth else []),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.superlink.poll() is None, self.tail()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise TimeoutError(f"superlink did not listen on {self.port}\n{self.tail()}")
        (self.root / "flwr-home").mkdir(exist_ok=True)
        (self.root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "fedsq-test"\n\n[superlink.fedsq-test]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            + (f'root-certificates = "{self.tls["ca"]}"\n' if self.tls else "insecure = true\n"))

    def start_supernode(self, pid, num, *, secure: bool | None = None, key: Path | None = None, name=None,
                        retries: int | None = None):
        """``secure``: TLS with the CA (default: as the SuperLink); ``key``: node-auth key;
        ``retries``: give up connecting after that many tries (default: Flower's, unlimited)."""
        secure = bool(self.tls) if secure is None else secure
        sec = ["--root-certificates", str(self.tls["ca"])] if secure else ["--insecure"]
        self.nodes[name or pid] = self._start(f"supernode{name or pid}", [
            str(BIN / "flower-supernode"), *sec, *(["--auth-supernode-private-key", str(key)] if key else []),
            "--superlink", f"127.0.0.1:{self.port}",
            *(["--max-retries", str(retries), "--max-wait-time", "30"] if retries is not None else []),
            "--host", "127.0.0.1", "--port", str(_free_port()),
            "--node-config", f"partition-id={pid} num-partitions={num}"])

    def flwr(self, *args, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def flwr_run(self, run_config: dict, timeout: float):
        app = self.root / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text((ROOT / "flower" / "pyproject.toml").read_text())
        toml = self.root / "run.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        p = self._start("flwr-run", [str(BIN / "flwr"), "run", str(app), "fedsq-test", "--run-config",
                                     str(toml), "--stream"])
        return p

    def tail(self, n=3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists())

    def stop(self):
        for p in reversed(self.procs):  # SIGTERM first so they can deregister, then SIGKILL
            if p.poll() is None:
                _kill_tree(p, signal.SIGTERM)
        end = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _kill_tree(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def _run_config(cfg, **extra):
    rc = {k.replace("_", "-"): ("none" if v is None else v) for k, v in cfg.to_dict().items()}
    rc["methods"] = ",".join(cfg.methods)
    rc.update(extra)
    return rc


def _wait(proc, timeout, dep):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {timeout} s\n{dep.tail()}")


def _final_model(fed_like, out: Path):
    groups, meta = ckpt.load(out / "checkpoint.safetensors")
    fed_like.model.load_state_dict(groups["model"])
    return fed_like.model, meta


@pytest.mark.slow
def test_deployment_superlink_and_supernodes_equal_embedded_engine(deployment, tmp_path):
    cfg = _cfg(out_dir=str(tmp_path / "out"), val_size=150, max_test_samples=100)
    data = prepare_data(cfg)
    emb = Federation(cfg, "fedsq", data, quiet=True).run()  # the embedded engine, same seed/partitions
    deployment.start_superlink()
    for i in range(cfg.num_clients):
        deployment.start_supernode(i, cfg.num_clients)
    run = deployment.flwr_run(_run_config(cfg, **{"round-timeout": 150.0}), timeout=170)
    _wait(run, 170, deployment)
    out = tmp_path / "out" / "fedsq"
    assert (out / "metrics.json").is_file(), deployment.tail()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["summary"]["complete"] and len(doc["history"]) == cfg.rounds + 1
    assert (tmp_path / "out" / "partition.txt").is_file() and (out / "metrics.csv").is_file()
    for h in doc["history"][1:]:
        assert h["clients_ok"] == cfg.num_clients and h["clients_dropped"] == [], h
    model, meta = _final_model(Federation(cfg, "fedsq", data, quiet=True), out)
    _same_model(emb.model, model, exact=False)  # other processes: equal to float rounding
    for a, b in zip(emb.history, doc["history"]):  # an argmax may flip on a rounding difference
        assert abs(a["val_acc"] - b["val_acc"]) <= 1.5 / cfg.val_size


@pytest.mark.slow
def test_deployment_supernode_killed_mid_round_the_others_finish(deployment, tmp_path):
    cfg = _cfg(out_dir=str(tmp_path / "out"), val_size=150, max_test_samples=100)
    victim = 1
    deployment.start_superlink()
    for i in range(cfg.num_clients):
        deployment.start_supernode(i, cfg.num_clients)
    run = deployment.flwr_run(_run_config(cfg, **{"round-timeout": 150.0}), timeout=200)
    node = deployment.nodes[victim]
    end = time.monotonic() + 120
    while time.monotonic() < end:  # kill it once its ClientApp for round 1 is running
        if any("flwr-clientapp" in _cmdline(p) for p in _descendants(node.pid)):
            break
        assert run.poll() is None, deployment.tail()
        time.sleep(0.2)
    else:
        pytest.fail("the SuperNode never started a ClientApp\n" + deployment.tail())
    _kill_tree(node, signal.SIGKILL)  # a crash: no goodbye to the SuperLink
    _wait(run, 200, deployment)
    out = tmp_path / "out" / "fedsq"
    assert (out / "metrics.json").is_file(), deployment.tail()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["summary"]["complete"] and len(doc["history"]) == cfg.rounds + 1
    for h in doc["history"][1:]:
        assert h["clients_ok"] == cfg.num_clients - 1, h
        assert [c for c, _ in h["clients_dropped"]] == [victim], h

    def hook(rnd, cid, state):
        if cid == victim:
            raise RuntimeError("killed")
        return state

    data = prepare_data(cfg)
    emb = Federation(cfg, "fedsq", data, quiet=True, client_hook=hook).run()
    model, _ = _final_model(Federation(cfg, "fedsq", data, quiet=True), out)
    _same_model(emb.model, model, exact=False)  # the survivors' updates, none lost


@pytest.mark.slow
def test_deployment_with_tls_and_node_authentication_as_documented(tmp_path):
    """docs/flower.md's TLS + node-authentication setup, run: certificates and node keys
    generated here, keys registered with `flwr supernode register`; the registered nodes train
    over TLS, a plaintext node and an unregistered one never join."""
    cfg = _cfg(out_dir=str(tmp_path / "out"), rounds=1, num_clients=2, val_size=150, max_test_samples=100)
    files = make_tls_and_node_keys(tmp_path, nodes=3)  # node2: a key nobody registered
    dep = Deployment(tmp_path, tls=files, auth=True)
    try:
        dep.start_superlink()
        for i in range(cfg.num_clients):
            r = dep.flwr("supernode", "register", str(tmp_path / f"node{i}.pub"), "fedsq-test")
            assert r.returncode == 0, r.stdout + r.stderr + dep.tail()
        listed = dep.flwr("supernode", "list", "fedsq-test", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        for i in range(cfg.num_clients):
            dep.start_supernode(i, cfg.num_clients, key=tmp_path / f"node{i}")
        dep.start_supernode(0, cfg.num_clients, secure=False, name="plaintext", retries=2)  # no TLS
        dep.start_supernode(1, cfg.num_clients, key=tmp_path / "node2", name="unregistered", retries=2)
        run = dep.flwr_run(_run_config(cfg, **{"round-timeout": 150.0}), timeout=200)
        _wait(run, 200, dep)
        out = tmp_path / "out" / "fedsq"
        assert (out / "metrics.json").is_file(), dep.tail()
        doc = json.loads((out / "metrics.json").read_text())
        assert doc["summary"]["complete"] and doc["history"][1]["clients_ok"] == cfg.num_clients, doc["history"]
        assert doc["history"][1]["clients_dropped"] == []
        # the intruders: they exit (retries spent) without ever having run a ClientApp
        for name in ("plaintext", "unregistered"):
            proc = dep.nodes[name]
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the {name} SuperNode is still running\n{dep.tail()}")
            log = (tmp_path / f"supernode{name}.log").read_text(errors="replace")
            assert proc.returncode != 0 and "flwr-clientapp" not in log, log[-2000:]
            assert "could not establish a connection to the SuperLink" in log, log[-2000:]
    finally:
        dep.stop()
    data = prepare_data(cfg)
    emb = Federation(cfg, "fedsq", data, quiet=True).run()
    model, _ = _final_model(Federation(cfg, "fedsq", data, quiet=True), out)
    _same_model(emb.model, model, exact=False)


def test_a_header_claiming_billions_of_floats_is_refused_before_allocating():
    import io
    import tracemalloc

    from flwr.app import Array, ArrayRecord

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (4_000_000_000,)})
    data = buf.getvalue() + b"\0" * 64
    rec = ArrayRecord({"w": Array(dtype="float32", shape=(4_000_000_000,), stype="numpy.ndarray", data=data)})
    for copy in (True, False):
        tracemalloc.start()
        with pytest.raises(ValueError, match=r"'w'\]: 64 data bytes, but the header claims shape \(4000000000,\)"):
            flower_arrays.arrays_to_state(rec, copy=copy)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 10 << 20  # nothing near the 16 GB the header claims


def test_auto_round_timeout_follows_the_config_then_the_rounds_seen(tmp_path):
    cfg = _cfg(rounds=2, out_dir=str(tmp_path))
    data = prepare_data(cfg)
    t = GridTransport(InProcessGrid(3), poll_s=0)
    Federation(cfg, "fedavg", data, quiet=True, transport=t)
    assert t.round_timeout is None and t.timeout_for_round() == A.FIRST_ROUND_S
    with pytest.warns(DeprecationWarning, match="GridTransport"):  # the old name still runs
        fed = A.FlowerFederation(cfg, "fedavg", data, InProcessGrid(3), poll_s=0)
    fed.run()
    t = fed.transport
    assert 0 < t._slowest < 60 and t.timeout_for_round() == max(A.MIN_ROUND_S, 4 * t._slowest)
    cfg2 = from_mapping(dict(cfg.to_dict(), client_timeout_s=30.0))
    assert A.first_round_timeout(cfg2) == 150.0
    t2 = GridTransport(InProcessGrid(3), round_timeout=7)
    Federation(cfg2, "fedavg", data, quiet=True, transport=t2)
    assert t2.timeout_for_round() == 7
    conf_cfg, opts = A.config_from_run_config({"round-timeout": "auto"})
    assert opts["round_timeout"] is None
    with pytest.raises(ValueError, match="'auto' or a positive number"):
        A.config_from_run_config({"round-timeout": "soon"})


def test_simulate_refuses_bad_configs_before_starting_ray(small_cfg):
    from fedsq_fast.flower.simulation import simulate

    with pytest.raises(ValueError, match="workers: 2 asked for, but Flower's simulation"):
        simulate(small_cfg(workers=2))
    with pytest.raises(ValueError, match="structural-copy ablations are not supported on Flower"):
        simulate(small_cfg(methods=["fedsq:refresh=2"]))
    with pytest.raises(ValueError, match="aggregation-order"):
        simulate(small_cfg(), **{"aggregation-order": "random"})
    with pytest.raises(TypeError, match="cfg must be a RunConfig"):
        simulate({"rounds": 2})
