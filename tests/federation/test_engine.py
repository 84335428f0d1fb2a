"""The round loop's contracts: transports, callbacks, the round record, the client pieces."""
import ast
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import small_config

from fedsq_fast.federation import (Callback, Federation, InProcessTransport, Reply, RoundRecord, Transport,
                                   prepare_data)
from fedsq_fast.federation.trainer import client_trainer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, fed, start_round):
        self.events.append(("run_start", start_round))

    def on_round_start(self, fed, rnd):
        self.events.append(("round_start", rnd))

    def on_reply(self, fed, reply):
        self.events.append(("reply", reply.cid, reply.error is None))

    def on_round_end(self, fed, record):
        record["seen_replies"] = sum(1 for e in self.events if e[0] == "reply")
        self.events.append(("round_end", record["round"]))

    def on_run_end(self, fed, result):
        self.events.append(("run_end", result is not None))


class Relay(Transport):
    """A transport in front of the in-process one: reorders, drops and counts (any runtime)."""

    def __init__(self, reverse=False, drop=()):
        self.inner, self.reverse, self.drop, self.tasks = InProcessTransport(), reverse, set(drop), []

    def bind(self, fed):
        super().bind(fed)
        self.inner.bind(fed)

    def replies(self, task):
        self.tasks.append((task.round, list(task.clients)))
        # a reply's state may alias the worker model until the next reply is asked for: copy to buffer
        got = [Reply(r.cid, {k: t.clone() for k, t in r.state.items()} if r.state else None, r.num_samples,
                     r.seconds, r.loss, r.error) for r in self.inner.replies(task)]
        for r in reversed(got) if self.reverse else got:
            yield Reply(r.cid, error="unreachable (test)") if r.cid in self.drop else r

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@pytest.mark.parametrize("method", ["fedsq", "fedbn"])
def test_a_relayed_transport_reaches_the_in_process_model(bundle, method):
    cfg = small_config(methods=[method], rounds=2, checkpoint=False)
    data = prepare_data(cfg, bundle)
    ref = Federation(cfg, method, data, quiet=True).run()
    relay = Relay()
    got = Federation(cfg, method, data, quiet=True, transport=relay).run()
    _equal_models(ref.model, got.model)
    assert [h.to_dict() | {"elapsed_s": 0} for h in ref.history] != []  # records exist
    for a, b in zip(ref.history, got.history):
        assert (a.val_acc, a.samples, a.clients_dropped) == (b.val_acc, b.samples, b.clients_dropped)
    assert [t[0] for t in relay.tasks] == [1, 2]


def test_transport_errors_drop_clients_with_the_reason_and_the_round_completes(bundle):
    cfg = small_config(rounds=2, min_clients=1, checkpoint=False)
    data = prepare_data(cfg, bundle)
    res = Federation(cfg, "fedavg", data, quiet=True, transport=Relay(drop={1, 3})).run()
    for h in res.history[1:]:
        assert [c for c, _ in h.clients_dropped] == [1, 3]
        assert all(r == "unreachable (test)" for _, r in h.clients_dropped)
        assert h.clients_ok == h.clients_sampled - 2


def test_fold_order_is_the_transports(bundle):
    """Replies are folded in the order yielded: reversed order gives a float32 sum in another
    order, still the same average to rounding (and the same integer buffers exactly)."""
    cfg = small_config(rounds=1, checkpoint=False)
    data = prepare_data(cfg, bundle)
    a = Federation(cfg, "fedavg", data, quiet=True).run().model.state_dict()
    b = Federation(cfg, "fedavg", data, quiet=True, transport=Relay(reverse=True)).run().model.state_dict()
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k])


def test_callback_hooks_fire_in_order_and_their_keys_reach_files_and_checkpoints(tmp_path, bundle):
    cfg = small_config(rounds=3, failure_rate=0.2)
    data = prepare_data(cfg, bundle)
    rec = Recorder()
    fed = Federation(cfg, "fedavg", data, out_dir=tmp_path, quiet=True, callbacks=[rec])
    res = fed.run()
    ev = rec.events
    assert ev[0] == ("run_start", 1) and ev[-1] == ("run_end", True)
    for rnd in (1, 2, 3):
        i, j = ev.index(("round_start", rnd)), ev.index(("round_end", rnd))
        replies = [e for e in ev[i:j] if e[0] == "reply"]
        h = res.history[rnd]
        failed = sum(1 for _, r in h.clients_dropped if r.startswith("simulated"))
        assert len(replies) == h.clients_sampled - failed  # simulated failures never reach a transport
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert [h.get("seen_replies") for h in doc["history"]] == [None] + [h["seen_replies"] for h in res.history[1:]]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 4 and "seen_replies" not in rows[0]  # CSV: the declared columns only
    assert [float(r["val_acc"]) for r in rows] == [h.val_acc for h in res.history]
    # resume from the checkpoint of round 2: the callback's key survives in the history
    fed2 = Federation(cfg, "fedavg", data, out_dir=tmp_path / "b", quiet=True, callbacks=[Recorder()])
    fed2.run(stop_after=2)
    fed3 = Federation(cfg, "fedavg", data, out_dir=tmp_path / "b", quiet=True, callbacks=[Recorder()])
    res3 = fed3.run(resume=True)
    assert res3.history[2]["seen_replies"] == fed2.history[2]["seen_replies"]
    _equal_models(res.model, res3.model)


def test_on_run_end_runs_when_a_round_raises(bundle):
    cfg = small_config(rounds=2, checkpoint=False)
    data = prepare_data(cfg, bundle)

    class Boom(Callback):
        def on_round_end(self, fed, record):
            raise RuntimeError("boom")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        Federation(cfg, "fedavg", data, quiet=True, callbacks=[rec, Boom()]).run()
    assert rec.events[-1] == ("run_end", False)


def test_round_record_serializer_round_trips():
    r = RoundRecord(round=3, val_acc=0.5, clients_dropped=[[2, "x"]])
    r["extra_metric"] = 1.25
    d = r.to_dict()
    assert list(d)[:3] == ["round", "val_loss", "val_acc"] and d["extra_metric"] == 1.25
    assert "time_checkpoint_s" not in d  # only once set
    back = RoundRecord.from_dict(json.loads(json.dumps(d, default=str)) | {"val_loss": None})
    assert back.extra == {"extra_metric": 1.25} and back.clients_dropped == [[2, "x"]]
    assert RoundRecord.from_dict(d) == r and dict(r) == d
    row = r.csv_row()
    assert row["clients_dropped"] == '[[2, "x"]]' and "extra_metric" not in row
    with pytest.raises(KeyError):
        del r["val_acc"]


@pytest.mark.parametrize("method", ["fedsq", "fedavg"])
def test_one_clients_trainer_from_the_config_equals_the_in_process_one(bundle, method):
    """What a Flower SuperNode builds (its partition only, its own model) trains the same
    update as the engine's in-process trainer."""
    cfg = small_config(methods=[method], rounds=1, checkpoint=False)
    data = prepare_data(cfg, bundle)
    fed = Federation(cfg, method, data, quiet=True)
    from fedsq_fast.federation import adapter

    glob = adapter.payload_state(fed.model)
    cid = 3
    a, ia = fed.train_client(1, cid, glob)
    t = client_trainer(cfg, method, cid, data=data)
    assert len(t.y) == len(data.parts[cid]) and len(t.y) < len(data.y)
    b, ib = t.train(1, cid, glob, fed.local_config(1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ia["num_samples"] == ib["num_samples"] and ia["loss"] == ib["loss"]
    with pytest.raises(ValueError, match="not a client of this run"):
        client_trainer(cfg, method, cfg.num_clients, data=data)


def test_no_subclass_of_the_engine_in_the_package():
    offenders = []
    for p in (ROOT / "fedsq_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b.split(".")[-1] == "Federation" for b in bases):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert offenders == [], offenders
