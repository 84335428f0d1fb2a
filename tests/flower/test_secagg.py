"""SecAgg+ on the Flower deployment path (secagg = true): the refusals, the quantization bound,
Flower's protocol run in process with a node dropping at each stage, and a real SuperLink with
SuperNodes on loopback where one SuperNode is killed mid-round.

Oracle throughout: the same clients' updates averaged without SecAgg+ (the embedded engine, or
float64 numpy), within :func:`fedsq_fast.flower.secagg.error_bound`."""
import copy
import itertools
import json
import math
import re
import signal
import time

import numpy as np
import pytest
import torch
from conftest import draw_seed, small_config

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402

from fedsq_fast.federation import Federation, adapter, from_mapping, prepare_data, validate  # noqa: E402
from fedsq_fast.federation.config import ConfigError  # noqa: E402
from fedsq_fast.federation.config.checks import SECAGG_MODULUS  # noqa: E402
from fedsq_fast.flower import FedSQStrategy, GridTransport  # noqa: E402
from fedsq_fast.flower import app as A  # noqa: E402
from fedsq_fast.flower import secagg as S  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _secagg(**kw):
    return dict(secagg=True, norm_bound=None, **kw)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("agg", ["median", "trimmed_mean", "multi_krum", "geometric_median", "centered_clip"])
def test_robust_aggregators_refused_under_secagg_with_the_reason(agg):
    with pytest.raises(ConfigError) as e:
        validate(from_mapping({**_secagg(), "aggregator": agg, "num_clients": 10}))
    msg = str(e.value)
    assert msg.startswith("aggregator:") and "\n" not in msg and "only their sum" in msg
    assert 'dp = "distributed"' in msg and "docs/privacy.md" in msg


def test_norm_bound_refused_under_secagg_even_at_its_default():
    for nb in (None, 10.0, 1.0):  # None: left at the default (10)
        d = {"secagg": True, **({} if nb is None else {"norm_bound": nb})}
        with pytest.raises(ConfigError, match=r"^norm_bound: is .*median.*only their sum.*norm_bound = none"):
            validate(from_mapping(d))
    validate(from_mapping(_secagg()))  # norm_bound = none: accepted


def test_secagg_ranges_and_cohort_checks():
    bad = [({"secagg_num_shares": 2}, "secagg_num_shares: must be >= 3"),
           ({"secagg_num_shares": 11}, "exceeds the clients a round samples (10)"),
           ({"secagg_reconstruction_threshold": 0.0}, "secagg_reconstruction_threshold: must be >"),
           ({"secagg_reconstruction_threshold": 1.5}, "secagg_reconstruction_threshold: must be <="),
           ({"secagg_clipping_range": -1.0}, "secagg_clipping_range: must be >"),
           ({"secagg_clipping_range": float("inf")}, "secagg_clipping_range: must be a finite number"),
           ({"secagg_quantization_range": 1}, "secagg_quantization_range: must be >= 2"),
           ({"secagg_quantization_range": 2**31}, "secagg_quantization_range: must be <="),
           ({"secagg_quantization_range": 2**30}, "below the SecAgg+ modulus 2^32"),
           ({"secagg": "yes"}, "secagg: must be true or false"),
           ({"num_clients": 2, "min_clients": 2}, "secagg: needs at least 3 clients a round"),
           ({"fraction": 0.2, "min_clients": 2}, "but a round samples 2")]
    for over, match in bad:
        with pytest.raises(ConfigError, match=re.escape(match)):
            validate(from_mapping({**_secagg(num_clients=10), **over}))
    # the largest range that fits: Q x K < 2^32 (Python integers)
    k = 10
    ok = (SECAGG_MODULUS - 1) // k
    validate(from_mapping({**_secagg(num_clients=k), "secagg_quantization_range": ok}))
    assert ok * k < SECAGG_MODULUS <= (ok + 1) * k
    # secagg options without secagg are a mistake, not ignored
    with pytest.raises(ConfigError, match="secagg_num_shares: set to 3, but secagg is false"):
        validate(from_mapping({"secagg_num_shares": 3}))


def test_secagg_refused_off_the_flower_path_and_by_fedsq_strategy(tmp_path):
    cfg = small_config(**_secagg(methods=["fedsq"], rounds=1))
    data = prepare_data(cfg)
    with pytest.raises(ConfigError, match=r"^secagg: true asks for SecAgg\+, which runs only on the Flower"):
        Federation(cfg, "fedsq", data, quiet=True)
    with pytest.raises(ConfigError, match="GridTransport"):
        Federation(cfg, "fedsq", data, quiet=True, transport=GridTransport(object()))
    with pytest.raises(ValueError, match="FedSQStrategy aggregates each node's reply"):
        FedSQStrategy(cfg)
    from fedsq_fast.federation.runner import run_methods

    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"^secagg: .*the embedded engine \(in process or workers\)"):
        run_methods(cfg.replace(out_dir=str(out)), quiet=True)
    assert not out.exists()  # refused before any data loads or file is written


# ---------------------------------------------------------------- the quantization bound
def _secagg_sum(updates, counts, clip, q_range):
    """Flower's own client quantization and server dequantization (the masks cancel exactly
    mod 2^32: left out), as SecAggPlusWorkflow and secaggplus_mod compute them."""
    max_w = max(counts)
    total = None
    for upd, n in zip(updates, counts):
        q = S.weight_levels(n, max_w, q_range)
        vec = factor_combine(q, quantize([u * (q / q_range) for u in upd], clip, q_range))
        vec = [v.astype(np.int64) for v in vec]  # as the int64 masks make them
        total = vec if total is None else [a + b for a, b in zip(total, vec)]
    total = [t % SECAGG_MODULUS for t in total]
    qt, rest = factor_extract(total)
    out = dequantize(rest, clip, q_range)
    return [(v - (len(updates) - 1) * clip) * (q_range / qt) for v in out]


@pytest.mark.parametrize("trial", range(6))
def test_quantization_error_within_the_stated_bound_and_the_bound_is_tight(trial):
    rng = np.random.default_rng(draw_seed(2**31))
    k = int(rng.integers(3, 9))
    clip = float(rng.choice([0.05, 1.0, 8.0, 100.0]))
    q_range = int(rng.choice([2**10, 2**16, 2**22]))
    counts = [int(c) for c in rng.integers(1, 500, size=k)]
    shapes = [(int(rng.integers(1, 40)), 3), (), (0,), (int(rng.integers(1, 300)),)]
    updates = []
    for n in counts:
        w = S.weight_levels(n, max(counts), q_range) / q_range
        lim = clip / max(w, 1e-12)
        upd = [rng.uniform(-lim, lim, s) * rng.uniform(0.0, 1.0) for s in shapes]
        upd[0].flat[0] = 0.0
        upd[-1].flat[0] = -0.0
        upd[-1].flat[-1] = lim  # the edge of the range: quantized to the last level, not clipped
        updates.append(upd)
    got = _secagg_sum(updates, counts, clip, q_range)
    tot = float(sum(counts))
    levels = [S.weight_levels(n, max(counts), q_range) for n in counts]
    D = max(float(np.max(np.abs(a))) for u in updates for a in u if a.size)
    bound = S.error_bound(clip, q_range, levels, D)
    worst = 0.0
    for i in range(len(shapes)):
        exact = sum(u[i].astype(np.float64) * n for u, n in zip(updates, counts)) / tot  # float64 oracle
        assert got[i].shape == np.shape(exact)
        if np.size(exact):
            worst = max(worst, float(np.max(np.abs(got[i] - exact))))
    assert worst <= bound, (worst, bound)
    # not vacuous: the rounding error reaches the scale of the bound's quantization part
    assert worst > S.error_bound(clip, q_range, levels, 0.0) / 200, (worst, bound)


def test_error_bound_formula_edges():
    assert S.error_bound(8.0, 2**22, [2**22, 2**22, 2**22], 0.0) == pytest.approx(3 * 16 / 2**22 / 3)
    assert S.error_bound(1.0, 2**22, [], 0.0) == float("inf")
    assert S.error_bound(1.0, 2**22, [0, 0, 0], 1.0) == float("inf")
    assert S.weight_levels(250, 1000, 2**22) == 2**20 and S.weight_levels(1000, 1000, 2**22) == 2**22


def test_client_range_check_refuses_what_secagg_would_clip_or_cannot_carry():
    gen = torch.Generator().manual_seed(draw_seed(2**31))
    upd = {"a": torch.randn(5, 3, generator=gen, dtype=torch.float64), "e": torch.empty(0, dtype=torch.float64)}
    top = float(upd["a"].abs().max())
    S.check_update_range(upd, 1.0, top)  # exactly at the clipping range: kept
    S.check_update_range(upd, 0.5, top * 0.5)
    with pytest.raises(ValueError, match=r"^secagg: update of a reaches .* beyond secagg_clipping_range"):
        S.check_update_range(upd, 1.0, top * 0.999)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = {k: v.clone() for k, v in upd.items()}
        u["a"][1, 2] = bad
        with pytest.raises(ValueError, match="update of a holds NaN or Inf"):
            S.check_update_range(u, 1.0, 1e300)


def test_client_refuses_an_unmask_request_listing_a_node_alive_and_dropped():
    S.check_unmask_request({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]})
    with pytest.raises(ValueError, match=r"lists nodes \[2\] as both alive and dropped"):
        S.check_unmask_request({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2],
                                Key.DEAD_NODE_ID_LIST: [2]})


# ---------------------------------------------------------------- Flower's protocol, in process
class SecAggGrid:
    """Nodes that run the package's ClientApp (with its SecAgg+ mod) in this process; node
    ``victim`` stops answering from stage ``dead_from`` on (None: never)."""

    def __init__(self, num_nodes, victim=None, dead_from=None, mangle=None):
        self.nodes = {1000 + 17 * i: {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)}
        self.states = {n: RecordDict() for n in self.nodes}
        self.victim, self.dead_from, self.mangle = victim, dead_from, mangle
        self.replies, self.count = {}, itertools.count()
        self.stages_seen = []

    def get_node_ids(self):
        return list(self.nodes)

    def _dead(self, node, stage):
        if node != self.victim or self.dead_from is None:
            return False
        order = list(Stage.all())
        return stage is not None and order.index(stage) >= order.index(self.dead_from)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"msg{next(self.count)}"
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = m.metadata.dst_node_id
            sa = m.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = sa[Key.STAGE] if sa is not None else None
            self.stages_seen.append(stage)
            if self._dead(node, stage):
                continue
            # as a SuperNode runs it: the message and the node's state are copies (the mod pops keys);
            # the state is kept only when the ClientApp returns, an exception is an error reply
            ctx = Context(1, node, self.nodes[node], copy.deepcopy(self.states[node]), {})
            try:
                rep = A.client_app(copy.deepcopy(m), ctx)
                self.states[node] = ctx.state
            except Exception as ex:  # noqa: BLE001
                rep = Message(Error(code=2, reason=f"{type(ex)}:<'{ex}'>"), reply_to=m)
            rep.metadata.__dict__["_src_node_id"] = node
            if self.mangle is not None and not rep.has_error():
                self.mangle(stage, self.nodes[node]["partition-id"], rep)
            self.replies[mid] = rep
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _oracle(cfg, data, drop):
    """The embedded engine's round 1 without SecAgg+ for the clients not in ``drop``, with
    each client's largest update value."""
    fed = Federation(cfg, "fedsq", data, quiet=True,
                     client_hook=lambda r, c, s: _record(c, s) if c not in drop else _raise())
    glob = {k: v.clone() for k, v in adapter.payload_state(fed.model).items()}
    biggest.clear()
    biggest["glob"] = glob
    res = fed.run()
    return res, glob


biggest: dict = {}


def _record(cid, state):
    g = biggest["glob"]
    biggest[cid] = max(float((state[k].double() - g[k].double()).abs().max()) for k in g
                       if g[k].dtype.is_floating_point and g[k].numel())
    return state


def _raise():
    raise RuntimeError("dropped")


@pytest.mark.parametrize("dead_from", [None, "setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_in_process_secagg_round_equals_the_survivors_plain_average(tmp_path, dead_from):
    victim_pid = 1
    cfg = small_config(**_secagg(methods=["fedsq"], rounds=1, num_clients=4, min_clients=2,
                                 out_dir=str(tmp_path)))
    data = prepare_data(cfg)
    grid = SecAggGrid(4, victim=1000 + 17 * victim_pid, dead_from=dead_from)
    res = Federation(cfg, "fedsq", data, quiet=True,
                     transport=S.SecAggTransport(grid, round_timeout=0.3, poll_s=0)).run()
    # a node that sent its masked vector and died in the unmask stage is in the sum (its mask seed is rebuilt)
    in_sum = dead_from in (None, "unmask")
    drop = set() if in_sum else {victim_pid}
    plain, glob = _oracle(cfg.replace(secagg=False), data, drop)
    h = res.history[1]
    assert h["clients_ok"] == 4 - len(drop), h
    assert [c for c, _ in h["clients_dropped"]] == sorted(drop), h
    if drop:
        assert f"SecAgg+ {dead_from}: no reply within round-timeout" in h["clients_dropped"][0][1]
    assert h["samples"] == sum(len(data.parts[c]) for c in range(4) if c not in drop)
    assert np.isnan(h["client_drift"]) and h["update_norm"] > 0
    assert set(grid.stages_seen) == {None, *Stage.all()}  # discovery, then the four SecAgg+ stages
    sizes = {c: len(data.parts[c]) for c in range(4) if c not in drop}
    levels = [S.weight_levels(n, max(len(data.parts[c]) for c in range(4)), cfg.secagg_quantization_range)
              for n in sizes.values()]
    bound = S.error_bound(cfg.secagg_clipping_range, cfg.secagg_quantization_range, levels,
                          max(biggest[c] for c in sizes))
    got, want = adapter.payload_state(res.model), adapter.payload_state(plain.model)
    worst = 0.0
    for k, g in glob.items():
        if not g.dtype.is_floating_point:
            assert torch.equal(got[k], g), k  # integer buffers are not summed: the global value stays
            continue
        ulp = torch.finfo(g.dtype).eps * float(want[k].abs().max() if want[k].numel() else 0)
        err = float((got[k].double() - want[k].double()).abs().max()) if g.numel() else 0.0
        assert err <= bound + 2 * ulp, (k, err, bound)
        worst = max(worst, err)
    assert 0 < worst, "the secure sum went through quantization (not bit-equal to the plain average)"
    assert bound < 1e-3


def test_in_process_secagg_halts_when_too_few_nodes_are_left(tmp_path):
    # threshold 1.0 of 4 shares: no node may drop; a node dead from share_keys halts the round
    cfg = small_config(**_secagg(methods=["fedsq"], rounds=1, num_clients=4, min_clients=2, out_dir=str(tmp_path),
                                 secagg_reconstruction_threshold=1.0))
    data = prepare_data(cfg)
    grid = SecAggGrid(4, victim=1000 + 17 * 2, dead_from="share_keys")
    fed = Federation(cfg, "fedsq", data, quiet=True, transport=S.SecAggTransport(grid, round_timeout=0.3, poll_s=0))
    before = {k: v.clone() for k, v in fed.model.state_dict().items()}
    res = fed.run()
    h = res.history[1]
    assert h["clients_ok"] == 0 and h["round_skipped"], h
    reasons = dict(h["clients_dropped"])
    assert sorted(reasons) == [0, 1, 2, 3]
    assert all("SecAgg+ halted at stage share_keys" in r for r in reasons.values()), reasons
    assert "no reply within round-timeout" in reasons[2]
    for k, v in res.model.state_dict().items():  # the global model kept
        assert torch.equal(v, before[k]), k


def test_client_out_of_range_update_leaves_the_round_with_its_reason(tmp_path):
    # a clipping range far below the updates: every client refuses to send, none is clipped silently
    cfg = small_config(**_secagg(methods=["fedsq"], rounds=1, num_clients=3, min_clients=2, out_dir=str(tmp_path),
                                 secagg_clipping_range=1e-9))
    data = prepare_data(cfg)
    res = Federation(cfg, "fedsq", data, quiet=True,
                     transport=S.SecAggTransport(SecAggGrid(3), round_timeout=0.3, poll_s=0)).run()
    h = res.history[1]
    assert h["clients_ok"] == 0
    for _, why in h["clients_dropped"]:
        assert "beyond secagg_clipping_range" in why and "collect_masked_vectors" in why, why


# ---------------------------------------------------------------- real deployment on loopback
@pytest.mark.slow
def test_deployment_secagg_supernode_killed_in_the_masked_vector_stage(tmp_path):
    """A SuperLink and 3 SuperNodes (subprocesses); node 1 is killed (SIGKILL, no goodbye) while
    its ClientApp trains for the masked-vector stage of the round, after it shared its keys: the
    round completes with the 2 survivors' secure sum (the victim's pairwise masks rebuilt from
    its key shares: 2 of 3 shares, the default threshold), equal to the plain average of the
    same 2 clients' updates within the bound."""
    from test_flower import Deployment, _cmdline, _descendants, _final_model, _kill_tree, _run_config, _wait

    victim = 1
    cfg = small_config(**_secagg(methods=["fedsq"], rounds=1, num_clients=3, min_clients=2, val_size=150,
                                 max_test_samples=100, out_dir=str(tmp_path / "out")))
    dep = Deployment(tmp_path)
    try:
        dep.start_superlink()
        for i in range(cfg.num_clients):
            dep.start_supernode(i, cfg.num_clients)
        run = dep.flwr_run(_run_config(cfg, **{"round-timeout": 90.0}), timeout=400)
        node = dep.nodes[victim]
        seen, end = set(), time.monotonic() + 300
        # one ClientApp process per message: discovery, setup, share keys, then the masked-vector stage
        while time.monotonic() < end and len(seen) < 4:
            seen |= {p for p in _descendants(node.pid) if "flwr-clientapp" in _cmdline(p)}
            assert run.poll() is None, dep.tail()
            time.sleep(0.05)
        assert len(seen) == 4, "the victim never reached the masked-vector stage\n" + dep.tail()
        _kill_tree(node, signal.SIGKILL)
        _wait(run, 400, dep)
    finally:
        dep.stop()
    out = tmp_path / "out" / "fedsq"
    assert (out / "metrics.json").is_file(), dep.tail()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["summary"]["complete"], doc["summary"]
    h = doc["history"][1]
    assert h["clients_ok"] == 2 and [c for c, _ in h["clients_dropped"]] == [victim], h
    assert "SecAgg+ collect_masked_vectors" in h["clients_dropped"][0][1], h
    data = prepare_data(cfg)
    plain, glob = _oracle(cfg.replace(secagg=False), data, {victim})
    model, _ = _final_model(Federation(cfg.replace(secagg=False), "fedsq", data, quiet=True), out)
    got, want = adapter.payload_state(model), adapter.payload_state(plain.model)
    survivors = [c for c in range(3) if c != victim]
    top = max(len(data.parts[c]) for c in range(3))
    levels = [S.weight_levels(len(data.parts[c]), top, cfg.secagg_quantization_range) for c in survivors]
    bound = S.error_bound(cfg.secagg_clipping_range, cfg.secagg_quantization_range, levels,
                          max(biggest[c] for c in survivors))
    worst = 0.0
    for k, g in glob.items():
        if not g.dtype.is_floating_point:
            assert torch.equal(got[k], g), k
            continue
        ulp = torch.finfo(g.dtype).eps * float(want[k].abs().max() if want[k].numel() else 0)
        err = float((got[k].double() - want[k].double()).abs().max()) if g.numel() else 0.0
        assert err <= bound + 4 * ulp, (k, err, bound)  # other processes: their float rounding too
        worst = max(worst, err)
    assert 0 < worst and bound < 1e-3


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_in_process_malformed_protocol_reply_is_that_nodes_drop_not_the_runs_end(tmp_path, stage):
    """A node whose reply the workflow could not read (a key missing, a list naming a node of
    no round) leaves the protocol at that stage with the reason; the round completes. Left out
    at unmask, its masked vector was already summed: it stays in the sum."""
    bad = 2

    def mangle(st, pid, rep):
        if st != stage or pid != bad:
            return
        rec = rep.content.config_records[RECORD_KEY_CONFIGS]
        if stage == "setup":
            del rec[Key.PUBLIC_KEY_2]
        elif stage == "share_keys":
            rec[Key.DESTINATION_LIST] = [12345] * len(rec[Key.DESTINATION_LIST])
        elif stage == "collect_masked_vectors":
            rec[Key.MASKED_PARAMETERS] = rec[Key.MASKED_PARAMETERS][:-1]
        else:
            rec[Key.NODE_ID_LIST] = [999] * len(rec[Key.NODE_ID_LIST])

    cfg = small_config(**_secagg(methods=["fedsq"], rounds=1, num_clients=4, min_clients=2, out_dir=str(tmp_path)))
    data = prepare_data(cfg)
    res = Federation(cfg, "fedsq", data, quiet=True,
                     transport=S.SecAggTransport(SecAggGrid(4, mangle=mangle), round_timeout=0.3, poll_s=0)).run()
    h = res.history[1]
    if stage == "unmask":
        assert h["clients_ok"] == 4 and h["clients_dropped"] == [], h
    else:
        assert h["clients_ok"] == 3 and [c for c, _ in h["clients_dropped"]] == [bad], h
        assert f"SecAgg+ {stage}: malformed reply" in h["clients_dropped"][0][1], h


@pytest.mark.parametrize("method", ["fedsq+fedadam", "fedbn"])
def test_in_process_secagg_two_rounds_after_a_drop_with_server_optimizer_and_fedbn(tmp_path, method):
    """Round 2 after a node left round 1 in the masked-vector stage (and again in round 2):
    every node's SecAgg+ state restarts at setup; FedAdam steps on the secure average, FedBN's
    nodes keep their BatchNorm layers; the result equals the plain engine's within the bound
    propagated by 2 rounds (checked loosely: the global models agree to 1e-3)."""
    victim = 3
    cfg = small_config(**_secagg(methods=[method], rounds=2, num_clients=4, min_clients=2, out_dir=str(tmp_path)))
    data = prepare_data(cfg)
    grid = SecAggGrid(4, victim=1000 + 17 * victim, dead_from="collect_masked_vectors")
    res = Federation(cfg, method, data, quiet=True,
                     transport=S.SecAggTransport(grid, round_timeout=0.3, poll_s=0)).run()
    for h in res.history[1:]:
        assert h["clients_ok"] == 3 and [c for c, _ in h["clients_dropped"]] == [victim], h
        assert not h["round_skipped"] and not h["rolled_back"], h
    plain = Federation(cfg.replace(secagg=False), method, data, quiet=True,
                       client_hook=lambda r, c, s: _raise() if c == victim else s).run()
    a, b = res.model.state_dict(), plain.model.state_dict()
    for k in a:
        if a[k].dtype.is_floating_point and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3, msg=k)
    if method == "fedbn":  # each surviving node kept its own BatchNorm layers in its Context
        kept = [n for n, st in grid.states.items() if A.LOCAL_STATE_KEY in st.array_records]
        assert len(kept) == 3


# ---------------------------------------------------------------- distributed DP composed with SecAgg+
def _dp_secagg(**kw):
    """dp = 'distributed' (fixed sampling) under secagg, on partitions of unequal sizes."""
    return _secagg(dp="distributed", dp_sampling="fixed", dp_noise_multiplier=0.8, dp_clip=0.5,
                   dp_delta=1e-3, partition="dirichlet", alpha=0.3, **kw)


@pytest.fixture
def seeded_client_noise(monkeypatch):
    """The ClientApp's distributed-DP noise from (seed, round, client), as the embedded engine
    draws it (a real SuperNode draws it from OS entropy): each client's noised update is then
    known to the test, the oracle sums them by hand."""
    from fedsq_fast.federation import privacy as P

    real = P.client_privacy
    monkeypatch.setattr(P, "client_privacy", lambda cfg, seeded=True: real(cfg, seeded=True))
    A._RUNTIME.clear()
    yield
    A._RUNTIME.clear()


def _noised_updates(cfg, data, drop):
    """Each client's update as it sends it under dp = 'distributed' (clipped and noised, the
    same seeded noise), recorded from the embedded engine's round 1 (no SecAgg+), and the
    global state of round 1: (updates {client: {key: float64 update}}, glob, engine result)."""
    seen, box = {}, {}

    def hook(r, c, s):
        seen[c] = {k: s[k].double() - box["glob"][k].double() for k in box["glob"]
                   if box["glob"][k].dtype.is_floating_point}
        if c in drop:
            raise RuntimeError("dropped")
        return s

    fed = Federation(cfg.replace(secagg=False), "fedsq", data, quiet=True, client_hook=hook)
    box["glob"] = {k: v.clone() for k, v in adapter.payload_state(fed.model).items()}
    return seen, box["glob"], fed.run()


def _dp_hand_aggregate(cfg, glob, updates, survivors, rnd=1):
    """The server's side of distributed DP by hand (float64): the survivors' noised updates
    summed unweighted, the noise share of the m - K clients that sent nothing added back
    (N(0, (z C)^2 (m - K) / m), drawn from (seed, round, DP_NOISE) as float32 per floating
    key in payload order), divided by m."""
    from fedsq_fast.federation.client import derive_seed
    from fedsq_fast.federation.seeds import DP_NOISE

    m = cfg.num_clients  # fraction 1: every client is sampled
    z, c = float(cfg.dp_noise_multiplier), float(cfg.dp_clip)
    extra = z * c * ((m - len(survivors)) / m) ** 0.5
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, rnd, DP_NOISE))
    out = {}
    for k, g in glob.items():
        if not g.dtype.is_floating_point:
            continue
        total = sum((updates[s][k] for s in survivors), torch.zeros(g.shape, dtype=torch.float64))
        if extra:
            total = total + extra * torch.randn(g.shape, generator=gen, dtype=torch.float32).double()
        out[k] = g.double() + total / m
    return out


def _worst(got, want, glob):
    return max(float((got[k].double() - want[k]).abs().max()) for k in want if glob[k].numel())


@pytest.mark.parametrize("dead_from", [None, "collect_masked_vectors"])
def test_dp_distributed_under_secagg_equals_the_hand_sum_of_noised_updates(tmp_path, seeded_client_noise, dead_from):
    """dp = 'distributed' + secagg: every update enters the secure sum with weight 1 (partitions
    of unequal sizes), the server counts the secure average as the K survivors' updates, adds
    back the noise share of a node that dropped mid-round, and divides by m: equal to the hand
    sum of the clients' noised updates within the quantization bound 2 c / Q on the average
    (times K / m on the global model) plus float32 rounding."""
    victim = 2
    cfg = small_config(**_dp_secagg(methods=["fedsq"], rounds=1, num_clients=4, min_clients=2,
                                     out_dir=str(tmp_path)))
    validate(cfg)
    data = prepare_data(cfg)
    sizes = [len(p) for p in data.parts]
    assert len(set(sizes)) > 1, sizes  # unequal partitions: a sample weighting would show
    grid = SecAggGrid(4, victim=1000 + 17 * victim, dead_from=dead_from)
    res = Federation(cfg, "fedsq", data, quiet=True,
                     transport=S.SecAggTransport(grid, round_timeout=0.3, poll_s=0)).run()
    drop = {victim} if dead_from else set()
    survivors = [c for c in range(4) if c not in drop]
    h = res.history[1]
    assert h["clients_ok"] == len(survivors) and [c for c, _ in h["clients_dropped"]] == sorted(drop), h
    assert h["samples"] == sum(sizes[c] for c in survivors)
    assert h["dp_noise_std"] == pytest.approx(0.8 * 0.5 / 4, rel=1e-12)  # z C / m: the whole noise, every round
    updates, glob, engine = _noised_updates(cfg, data, drop)
    want = _dp_hand_aggregate(cfg, glob, updates, survivors)
    got = adapter.payload_state(res.model)
    for k, g in glob.items():
        if not g.dtype.is_floating_point:
            assert torch.equal(got[k], g), k  # integer buffers: the global value stays
    top = max(float(w.abs().max()) for w in want.values() if w.numel())
    ulp = torch.finfo(torch.float32).eps * top
    bound = S.error_bound(cfg.secagg_clipping_range, cfg.secagg_quantization_range,
                          [cfg.secagg_quantization_range] * len(survivors), 0.0) * len(survivors) / 4
    worst = _worst(got, want, glob)
    assert worst <= bound + (len(survivors) + 2) * ulp, (worst, bound, ulp)
    assert 0 < worst  # the secure sum went through quantization
    # the embedded engine (no SecAgg+) computes the same hand sum: both paths share the server's math
    assert _worst(adapter.payload_state(engine.model), want, glob) <= 3 * ulp
    # not vacuous: the wrong compositions differ from the result by far more than the bound
    n = {c: sizes[c] for c in survivors}
    weighted = {k: glob[k].double() + len(survivors) / 4 * sum(updates[c][k] * n[c] for c in survivors)
                / sum(n.values()) for k in want}  # a sample-weighted secure average
    one_reply = {k: glob[k].double() + sum(updates[c][k] for c in survivors) / len(survivors) / 4
                 for k in want}  # the secure sum counted as one reply (its noise share only: see below)
    for wrong in (weighted, one_reply):
        assert _worst(got, wrong, glob) > 20 * (bound + (len(survivors) + 2) * ulp)
    if drop:  # the dropped node's noise share, added back by the server, is in the result
        no_add_back = _dp_hand_aggregate(cfg.replace(dp_noise_multiplier=0.0), glob, updates, survivors)
        assert _worst(got, no_add_back, glob) > 20 * (bound + (len(survivors) + 2) * ulp)


def _fit_reply(cfg, n, max_w, q_range, clip, rng):
    from flwr.app import ConfigRecord, MessageType
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    glob = {"w": torch.from_numpy(rng.standard_normal((7, 3))).float(), "c": torch.tensor(4, dtype=torch.int64)}
    state = {"w": glob["w"] + torch.from_numpy(rng.uniform(-0.1, 0.1, (7, 3))).float(), "c": glob["c"] + 1}
    msg = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = "m0"
    ctx = Context(1, 1, {}, RecordDict({RECORD_KEY_STATE: ConfigRecord(
        {"target_range": q_range, "clipping_range": clip, "max_weight": max_w})}), {})
    rep = S.secagg_fit_reply(msg, ctx, state, glob, {"num_samples": n, "seconds": 0.0}, 0, cfg, 1)
    return rep.content.metric_records["fitres.num_examples"]["num_examples"]


def test_dp_client_sends_weight_one_whatever_its_samples_and_refuses_another_max_weight():
    """Under dp = 'distributed' a client's weight in the secure sum is 1 (secaggplus_mod's
    q_k = round(1 / 1 x Q) = Q exactly, for every partition size); without DP it is its
    sample count. A server announcing max_weight != 1 under DP is refused: weights that differ
    would let it single out one client's update."""
    rng = np.random.default_rng(draw_seed(2**31))
    dp_cfg = from_mapping(_dp_secagg(num_clients=4))
    plain = from_mapping(_secagg(num_clients=4))
    q_range = 2**22
    for n in [1, 2, 17, int(rng.integers(3, 10**6))]:
        assert _fit_reply(dp_cfg, n, 1.0, q_range, 8.0, rng) == 1
        assert S.weight_levels(1, 1.0, q_range) == q_range  # what secaggplus_mod makes of it
        assert _fit_reply(plain, n, float(n) * 2, q_range, 8.0, rng) == n
    for max_w in (0.5, 2.0, float(rng.integers(3, 1000))):
        with pytest.raises(ValueError, match=rf"^secagg: under dp = 'distributed' .* announced max_weight {max_w:g}"):
            _fit_reply(dp_cfg, 10, max_w, q_range, 8.0, rng)
    # the range check still applies to the noised update, with a message that says how to size it
    with pytest.raises(ValueError, match=r"beyond secagg_clipping_range .*not sent \(a noised update: .*docs/privacy"):
        _fit_reply(dp_cfg, 10, 1.0, q_range, 1e-6, rng)


def test_dp_server_drops_a_node_whose_weight_is_not_one(tmp_path, seeded_client_noise):
    """The server checks the weight each node claims in the masked-vector stage: under
    dp = 'distributed' anything but 1 (its update would enter the sum that many times) leaves
    the protocol with the reason; the round completes with the others."""
    bad = 1

    def mangle(st, pid, rep):
        if st == "collect_masked_vectors" and pid == bad:
            rep.content.metric_records["fitres.num_examples"]["num_examples"] = 2

    cfg = small_config(**_dp_secagg(methods=["fedsq"], rounds=1, num_clients=4, min_clients=2,
                                     out_dir=str(tmp_path)))
    data = prepare_data(cfg)
    res = Federation(cfg, "fedsq", data, quiet=True,
                     transport=S.SecAggTransport(SecAggGrid(4, mangle=mangle), round_timeout=0.3, poll_s=0)).run()
    h = res.history[1]
    assert h["clients_ok"] == 3 and [c for c, _ in h["clients_dropped"]] == [bad], h
    assert "weight 2 under dp = 'distributed'" in h["clients_dropped"][0][1], h


def test_dp_central_refused_under_secagg_and_the_suggested_fix_validates():
    """dp = 'central' clips on the server, which under secagg sees only the sum: refused in
    one line naming dp; the fixes the secagg refusals suggest (dp = 'distributed' with
    dp_sampling = 'fixed') validate."""
    base = _secagg(num_clients=10, dp_noise_multiplier=1.0, dp_delta=1e-3)
    with pytest.raises(ConfigError) as e:
        validate(from_mapping({**base, "dp": "central"}))
    msg = str(e.value)
    assert msg.startswith("dp: 'central'") and "\n" not in msg and "dp = 'distributed'" in msg
    assert "dp_sampling = 'fixed'" in msg
    validate(from_mapping({**base, "dp": "distributed", "dp_sampling": "fixed"}))
    # the robust-aggregator refusal's fix: aggregator = 'mean' and distributed DP
    with pytest.raises(ConfigError) as e:
        validate(from_mapping(_secagg(num_clients=10, aggregator="median")))
    assert str(e.value).startswith("aggregator:") and 'dp_sampling = "fixed"' in str(e.value)
    validate(from_mapping({**base, "aggregator": "mean", "dp": "distributed", "dp_sampling": "fixed"}))


@pytest.mark.parametrize("trial", range(5))
def test_dp_clipping_range_must_cover_clip_plus_eight_noise_stds(trial):
    """Under dp = 'distributed' + secagg, secagg_clipping_range >= dp_clip + 8 x each client's
    noise std z C / sqrt(m) (float64 by hand): just below refused in one line naming the key
    and the number, at it accepted."""
    rng = np.random.default_rng(draw_seed(2**31))
    n = int(rng.integers(3, 40))
    z, c = float(rng.uniform(0.1, 5)), float(rng.choice([0.01, 0.5, 1.0, 3.0, 50.0]))
    base = _secagg(num_clients=n, dp="distributed", dp_sampling="fixed", dp_noise_multiplier=z, dp_clip=c,
                   dp_delta=0.5 / n)
    need = c + 8 * z * c / math.sqrt(n)
    with pytest.raises(ConfigError) as e:
        validate(from_mapping({**base, "secagg_clipping_range": need * (1 - 1e-9)}))
    msg = str(e.value)
    assert msg.startswith("secagg_clipping_range:") and "\n" not in msg and f"{need:.4g}" in msg
    validate(from_mapping({**base, "secagg_clipping_range": need * (1 + 1e-9)}))
