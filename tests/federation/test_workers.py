"""Parallel clients (WorkerPoolTransport, config key ``workers``): the in-process run is the
oracle. The same global model, bit for bit, and the same recorded numbers (timings aside)
for workers = 1, 2 and 4; a worker that dies or hangs costs its unfinished clients (dropped
with the reason, as a client that raises in process), the pool is restored; no worker
process outlives a run, an error or Ctrl-C. Every pool is closed in a finally and every test
checks that this process has no child left (hung workers are killed after ``timeout_s``)."""
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import small_config

from fedsq_fast.federation import Callback, Federation, WorkerPoolTransport, prepare_data
from fedsq_fast.federation import workers as W
from fedsq_fast.federation.config import ConfigError, from_mapping, validate

torch.set_num_threads(1)
TIMING = re.compile(r"time|elapsed|seconds")


def _children() -> list[int]:
    """This process's children, but multiprocessing's resource tracker: spawn starts one per
    Python process, for the life of that process (it exits with it); it is not a worker."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass

    def tracker(p):
        try:
            return b"resource_tracker" in Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return False
    return [p for p in pids if not tracker(p)]


@pytest.fixture(autouse=True)
def no_stray_processes():
    before = set(_children())
    yield
    left = [p for p in _children() if p not in before]
    for p in left:  # never leave them to the rest of the session, even when the test failed
        try:
            os.kill(p, signal.SIGKILL)
            os.waitpid(p, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not left, f"worker processes left behind: {left}"


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    """A worker that hangs by mistake fails the test in a minute, not after the defaults."""
    monkeypatch.setattr(W, "DEFAULT_TIMEOUT_S", 60.0)
    monkeypatch.setattr(W, "START_TIMEOUT_S", 60.0)


def _cfg(method, **kw):
    # eval_batch_size 37: 200 validation samples in 6 batches (the last of 15), so the workers
    # share the server's validation out (2 or 4 shares) in every run of this module
    return small_config(methods=[method], rounds=2, num_clients=6, checkpoint=False, lr=0.1,
                        **{"eval_batch_size": 37, **kw})


def _spy_validate(pool) -> list:
    """Record, per call of the pool's validate, the round and whether it shared the work out."""
    calls, inner = [], pool.validate

    def validate(rnd):
        out = inner(rnd)
        calls.append((rnd, out is not None))
        return out
    pool.validate = validate
    return calls


def _numbers(history):
    """Every recorded number of every round, timings aside."""
    return [{k: v for k, v in dict(h).items() if not TIMING.search(k)} for h in history]


def _same_numbers(a, b):
    for x, y in zip(_numbers(a), _numbers(b), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            same = x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k]))
            assert same, (k, x[k], y[k])


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def runs(bundle):
    """method -> (config, data, in-process result, its FedBN layers): the oracle."""
    out = {}
    for m in ("fedavg", "fedsq", "fedbn", "fedsq:refresh=1"):  # refresh: workers rebuild their model
        cfg = _cfg(m)
        data = prepare_data(cfg, bundle)
        fed = Federation(cfg, m, data, quiet=True)
        out[m] = (cfg, data, fed.run(), fed.transport.state_dict())
    return out


@pytest.mark.parametrize("workers", [2, 4])
def test_results_do_not_depend_on_the_number_of_workers(runs, workers):
    pool = WorkerPoolTransport(workers, threads=1)  # one pool for the three methods (as run_methods)
    calls = _spy_validate(pool)
    try:
        for m, (cfg, data, ref, local) in runs.items():
            del calls[:]
            got = Federation(cfg, m, data, quiet=True, transport=pool).run()
            assert calls == [(1, True), (2, True)]  # the validation of both rounds shared out (round 0: the server's)
            _same_model(ref.model, got.model)
            _same_numbers(ref.history, got.history)
            assert all(h["clients_ok"] == 6 for h in got.history[1:])
            assert got.history[2]["structural_refreshed"] == (m == "fedsq:refresh=1")
            mine = pool.state_dict()  # FedBN: the personal layers kept server-side, as in process
            assert mine.keys() == local.keys() and all(torch.equal(mine[k], local[k]) for k in local)
            assert bool(local) == (m == "fedbn")
    finally:
        pool.close()


def test_a_run_checkpointed_in_process_resumes_on_workers_bit_for_bit(runs, tmp_path):
    cfg, data, ref, local = runs["fedbn"]  # FedBN: the personal layers go through the checkpoint
    cfg = cfg.replace(checkpoint=True)
    Federation(cfg, "fedbn", data, out_dir=tmp_path, quiet=True).run(stop_after=1)
    fed = Federation(cfg.replace(workers=2), "fedbn", data, out_dir=tmp_path, quiet=True)  # workers: placement
    got = fed.run(resume=True)
    _same_model(ref.model, got.model)
    _same_numbers(ref.history, got.history)
    mine = fed.transport.state_dict()
    assert mine.keys() == local.keys() and all(torch.equal(mine[k], local[k]) for k in local)


def test_a_run_checkpointed_on_workers_resumes_in_process_bit_for_bit(runs, tmp_path):
    """Stopped after round 1 (its validation shared out by the workers), resumed in process: the
    in-process run's model and numbers (validation decides best_round). The other direction:
    test_a_run_checkpointed_in_process_resumes_on_workers_bit_for_bit."""
    cfg, data, ref, _ = runs["fedsq"]
    cfg = cfg.replace(checkpoint=True)
    Federation(cfg.replace(workers=2), "fedsq", data, out_dir=tmp_path, quiet=True).run(stop_after=1)
    got = Federation(cfg, "fedsq", data, out_dir=tmp_path, quiet=True).run(resume=True)
    _same_model(ref.model, got.model)
    _same_numbers(ref.history, got.history)


def test_validation_shares_are_whole_batches_of_the_serial_evaluation(seed):
    rng = torch.Generator().manual_seed(seed)
    for _ in range(300):
        n, bs, k = (int(torch.randint(1, hi, (1,), generator=rng)) for hi in (3000, 700, 9))
        got = W.shares(n, bs, k)
        nb = -(-n // bs)
        assert len(got) == min(k, nb), (n, bs, k)
        assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        batches = [-(-(b - a) // bs) for a, b in got]
        assert all(a % bs == 0 for a, _ in got) and sum(batches) == nb and max(batches) - min(batches) <= 1
        assert all(b - a == bs * nb_ for (a, b), nb_ in zip(got[:-1], batches))  # only the last share is ragged
    assert W.shares(1000, 512, 2) == [(0, 512), (512, 1000)]  # the bench's job: one batch each
    assert W.shares(200, 512, 4) == [(0, 200)]  # one batch: nothing to share
    assert W.shares(0, 16, 3) == []  # no validation split


def _hand_loop(model, x, y, bs):
    """The serial evaluation written out: float32 batch sums, added one by one in a float."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), bs):
            out = model(x[i:i + bs]).float()
            loss += float(torch.nn.functional.cross_entropy(out, y[i:i + bs], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + bs]).sum())
    return loss / len(y), correct / len(y)


@pytest.mark.parametrize("dual", [False, True])
def test_eval_sums_over_batch_aligned_ranges_make_the_whole_evaluation(seed, dual):
    """Any cut of the set into batch-aligned ranges, evaluated range by range (FedSQ: each with
    a mask cache of its own, as a worker holds), combined in order: evaluate()'s numbers, which
    are the hand-written loop's, bit for bit."""
    from fedsq_fast.federation.client import eval_result, eval_sums, evaluate
    from fedsq_fast.federation.trainer import engine_mask_cache
    from fedsq_fast.models import dualcopy

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(), torch.nn.Linear(17, 5))
    model = dualcopy(net) if dual else net
    if dual:
        for p in model.quantitative.parameters():
            p.data.add_(0.3 * torch.randn_like(p))  # the trained copy drifts from the gates' copy
    rng = torch.Generator().manual_seed(seed)
    for n, bs in ((1, 1), (97, 7), (250, 64), (300, 300), (301, 100)):
        x = torch.randn(n, 13, generator=rng) * 10 ** torch.randint(-3, 4, (n, 1), generator=rng)
        y = torch.randint(0, 5, (n,), generator=rng)
        whole = evaluate(model, x, y, batch_size=bs)
        assert whole == _hand_loop(model, x, y, bs)
        for k in (1, 2, 3, 5):
            losses, correct = [], 0
            for a, b in W.shares(n, bs, k):
                idx = None
                if dual:
                    model.attach_cache(engine_mask_cache(b - a))
                    idx = torch.arange(b - a)
                    eval_sums(model, x, y, None, bs, idx, "fp32", a, b)  # fills the cache: the next pass reads it
                part = eval_sums(model, x, y, None, bs, idx, "fp32", a, b)
                losses += part[0]
                correct += part[1]
            assert eval_result(losses, correct, n) == whole, (n, bs, k)
    if dual:
        model.attach_cache(None)


def test_eval_result_adds_the_batch_sums_in_order_one_by_one():
    from fedsq_fast.federation.client import eval_result

    assert eval_result([1e16, 1.0, -1e16], 3, 3) == (0.0, 1.0)  # compensated summation would give 1/3
    assert eval_result([], 0, 0) == (0.0, 0.0)  # no samples: as evaluate() on an empty split
    loss, _ = eval_result([float("nan"), 1.0], 1, 2)
    assert math.isnan(loss)
    assert eval_result([0.1] * 10, 4, 10)[0] == sum([0.1] * 10) / 10  # the left-to-right float sum (0.99999...)


@pytest.mark.parametrize("how", ["kill", "hang", "raise", "one batch", "threads"])
def test_validation_falls_back_to_the_server_with_the_same_numbers(runs, how, caplog):
    """A worker that dies or hangs while validating: its share is evaluated by the server (a
    warning says so), the numbers are the serial ones and the pool is restored. Where sharing
    would save nothing (one batch) or change a number (workers with another thread count than
    the server), the server evaluates it all."""
    cfg, data, ref, _ = runs["fedsq"]
    if how == "one batch":
        cfg = cfg.replace(eval_batch_size=200)
        ref = Federation(cfg, "fedsq", data, quiet=True).run()
    pool = WorkerPoolTransport(2, threads=2 if how == "threads" else 1, timeout_s=5 if how == "hang" else None)
    if how in ("kill", "exit", "hang", "raise"):
        pool._test_fault = {(1, "val", 1): how}
    calls = _spy_validate(pool)
    try:
        with caplog.at_level("WARNING", logger="fedsq_fast.federation"):
            got = Federation(cfg, "fedsq", data, quiet=True, transport=pool).run()
    finally:
        pool.close()
    if how == "threads":  # 2 threads per worker change the training's last bits, not what validation is
        assert calls == [(1, False), (2, False)]
        assert all(h["clients_ok"] == 6 for h in got.history[1:])
        return
    _same_model(ref.model, got.model)
    _same_numbers(ref.history, got.history)
    if how == "one batch":
        assert calls == [(1, False), (2, False)]
        return
    assert calls == [(1, True), (2, True)]  # round 1 with one worker's share done by the server
    msgs = [r.getMessage() for r in caplog.records if "while validating" in r.getMessage()]
    assert len(msgs) == 1 and "round 1: worker 1" in msgs[0] and "evaluated by the server" in msgs[0], msgs
    assert {"hang": "timed out", "raise": "failed: RuntimeError: test fault"}.get(how, "died") in msgs[0]
    assert got.history[2]["clients_ok"] == 6 and not got.history[2]["clients_dropped"]  # pool restored


def _dealt(data, workers):
    """Round 1's clients (all 6: fraction 1) as the pool deals them."""
    clients = list(range(6))
    return W.deal(clients, [len(data.parts[c]) for c in clients], workers)


def test_clients_are_dealt_by_size_each_worker_in_client_order():
    assert W.deal([0, 1, 2, 3], [5, 5, 5, 5], 2) == [[0, 2], [1, 3]]  # equal sizes: round-robin
    assert W.deal([0, 1, 2, 3, 4, 5], [10, 50, 20, 20, 5, 40], 2) == [[1, 3, 4], [0, 2, 5]]  # 75 vs 70 samples
    assert W.deal([9, 4], [1, 1], 4) == [[9], [4], [], []]
    assert W.deal([], [], 3) == [[], [], []]


def _oracle(cfg, data, method, fail_round, failing):
    """The in-process run in which ``failing`` clients raise in ``fail_round``."""
    def hook(rnd, cid, state):
        if rnd == fail_round and cid in failing:
            raise RuntimeError("client fails (test)")
        return state
    return Federation(cfg, method, data, quiet=True, client_hook=hook).run()


def _check_against_oracle(ref, got, lost, reason):
    _same_model(ref.model, got.model)
    r1, g1 = ref.history[1], got.history[1]
    assert [c for c, _ in g1["clients_dropped"]] == sorted(lost) == [c for c, _ in r1["clients_dropped"]]
    assert all(why.startswith(reason) for _, why in g1["clients_dropped"]), g1["clients_dropped"]
    for h in (ref.history, got.history):
        h[1]["clients_dropped"] = []
    _same_numbers(ref.history, got.history)
    assert got.history[2]["clients_ok"] == 6 and not got.history[2]["clients_dropped"]  # pool restored


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_client_that_kills_its_worker_is_dropped_and_the_pool_restored(runs, how):
    cfg, data, *_ = runs["fedsq"]
    # the worker with the most clients dies before its second one: that one and the rest are lost
    mine = max(_dealt(data, 2), key=len)
    pool = WorkerPoolTransport(2, threads=1)
    pool._test_fault = {(1, mine[1]): how}
    try:
        got = Federation(cfg, "fedsq", data, quiet=True, transport=pool).run()
    finally:
        pool.close()
    why = "worker died: exit code 1" if how == "exit" else "worker died: killed by SIGKILL"
    _check_against_oracle(_oracle(cfg, data, "fedsq", 1, set(mine[1:])), got, mine[1:], why)


def test_a_hanging_worker_times_out_is_dropped_and_the_pool_restored(runs):
    cfg, data, *_ = runs["fedavg"]
    last = _dealt(data, 2)[0][-1]  # the last client of worker 0 hangs
    pool = WorkerPoolTransport(2, threads=1, timeout_s=5)  # tiny clients take well under 1 s
    pool._test_fault = {(1, last): "hang"}
    try:
        got = Federation(cfg, "fedavg", data, quiet=True, transport=pool).run()
    finally:
        pool.close()
    _check_against_oracle(_oracle(cfg, data, "fedavg", 1, {last}), got, [last], "worker timed out")


class Interrupt(Callback):
    def __init__(self, exc):
        self.exc = exc

    def on_reply(self, fed, reply):
        raise self.exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_an_error_in_the_round_loop_leaves_no_worker(runs, exc):
    cfg, data, *_ = runs["fedavg"]
    fed = Federation(cfg.replace(workers=2), "fedavg", data, quiet=True, callbacks=[Interrupt(exc("test"))])
    assert isinstance(fed.transport, WorkerPoolTransport)
    with pytest.raises(exc):
        fed.run()
    assert not _children()  # the Federation made the pool, so run() closed it


def test_workers_from_the_cli_write_the_same_metrics(tmp_path, capsys):
    from fedsq_fast.cli import main

    args = ["run", "--dataset", "digits", "--model", "tiny_cnn", "--methods", "fedavg", "fedsq", "--rounds", "2",
            "--num-clients", "4", "--max-train-samples", "none", "--val-size", "200", "--max-test-samples", "200",
            "--lr", "0.1", "--threads", "1", "--checkpoint", "false", "--eval-batch-size", "64", "--quiet"]
    docs = {}
    for n in (1, 2):
        assert main([*args, "--workers", str(n), "--out-dir", str(tmp_path / str(n))]) == 0
        docs[n] = {m: json.loads((tmp_path / str(n) / m / "metrics.json").read_text()) for m in ("fedavg", "fedsq")}
    for m in ("fedavg", "fedsq"):
        a, b = docs[1][m], docs[2][m]
        assert (a["config"]["workers"], b["config"]["workers"]) == (1, 2)
        _same_numbers(a["history"], b["history"])
        assert {k: v for k, v in a["summary"].items() if not TIMING.search(k)} == \
               {k: v for k, v in b["summary"].items() if not TIMING.search(k)}


def test_bad_workers_and_client_hook_are_refused(runs):
    for bad in (0, -1, 1.5, True, "2", 257):
        with pytest.raises(ConfigError, match="workers"):
            validate(from_mapping({"workers": bad}))
    with pytest.raises(ValueError, match="workers"):
        WorkerPoolTransport(0)
    cfg, data, *_ = runs["fedavg"]
    with pytest.raises(ValueError, match="client_hook.*workers = 2"):
        Federation(cfg.replace(workers=2), "fedavg", data, quiet=True, client_hook=lambda r, c, s: s)


def test_a_model_fn_workers_cannot_unpickle_is_refused_before_any_worker_starts(runs):
    cfg, data, *_ = runs["fedavg"]
    from fedsq_fast.federation.prepare import build_method_model

    fed = Federation(cfg.replace(workers=2), "fedavg", data, quiet=True,
                     model_fn=lambda: build_method_model(cfg, False, data))
    with pytest.raises(ValueError, match="workers: model_fn must be picklable"):
        fed.run()


def _pids_of_children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_ctrl_c_on_the_cli_stops_its_workers(tmp_path):
    """A real SIGINT to the process group of `fedsq-fast run --workers 2` (what a terminal's
    Ctrl-C sends) mid-run: the command exits and none of its workers is left."""
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "fedsq_fast", "run", "--dataset", "digits", "--model", "tiny_cnn", "--methods",
            "fedavg", "--rounds", "200", "--num-clients", "4", "--max-train-samples", "none", "--val-size", "200",
            "--max-test-samples", "200", "--threads", "1", "--workers", "2", "--checkpoint", "false", "--quiet",
            "--out-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [p for p in _pids_of_children(proc.pid) if b"spawn_main" in _cmdline(p)]
        assert len(workers) == 2, "the workers did not start"
        time.sleep(1.0)  # mid-round
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in workers), [p for p in workers if not _gone(p)]
        assert proc.returncode != 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of that group
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        err = proc.stderr.read().decode() if proc.stderr else ""
        proc.stderr.close()
    assert "KeyboardInterrupt" in err or "Interrupted" in err or proc.returncode in (130, -2), err[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("method", ["fedavg", "fedsq"])
def test_cuda_workers_share_the_gpu_and_equal_the_in_process_run(bundle, method, monkeypatch):
    """Workers on one GPU (data as CUDA IPC handles, the server's determinism switches copied):
    with deterministic cuDNN the run is the in-process run bit for bit. Were two in-process
    runs to differ (a nondeterministic kernel), identity could not be asked of the workers
    either: the test then requires the two runs to be as close as the in-process pair."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = _cfg(method, device="cuda")
    data = prepare_data(cfg, bundle)
    ref = Federation(cfg, method, data, quiet=True).run()
    again = Federation(cfg, method, data, quiet=True).run()
    pool = WorkerPoolTransport(2, threads=1)
    try:
        got = Federation(cfg, method, data, quiet=True, transport=pool).run()
    finally:
        pool.close()
    assert next(got.model.parameters()).is_cuda and all(h["clients_ok"] == 6 for h in got.history[1:])
    sr, sa = ref.model.state_dict(), again.model.state_dict()
    if all(torch.equal(sr[k], sa[k]) for k in sr):
        _same_model(ref.model, got.model)
        _same_numbers(ref.history, got.history)
    else:
        sg = got.model.state_dict()
        for k in sr:
            if sr[k].dtype.is_floating_point:
                spread = float((sr[k] - sa[k]).abs().max())
                assert float((sr[k] - sg[k]).abs().max()) <= 10 * spread + 1e-6, k


def test_messages_carry_tensors_as_bytes_and_keep_everything_else():
    # the pool's pickles: plain CPU tensors as raw bytes (dtype, shape, values, writable, no
    # shared storage with the sender); Parameters, autograd leaves and conjugate views keep
    # torch's reduction. The oracle is the tensor sent.
    import pickle

    from conftest import draw_seed

    gen = torch.Generator().manual_seed(draw_seed(2**31))
    sent = {"f32": torch.randn(3, 5, generator=gen), "t": torch.randn(4, 3, generator=gen).t(),
            "empty": torch.empty(0, 7), "scalar": torch.tensor(-0.0), "nan": torch.tensor([math.nan, math.inf, -math.inf]),
            "bool": torch.rand(9, generator=gen) > 0.5, "bf16": torch.randn(6, generator=gen).bfloat16(),
            "f16": torch.randn(2, 2, generator=gen).half(), "i64": torch.tensor([-2**63, 2**63 - 1]),
            "u8": torch.arange(256, dtype=torch.uint8), "slice": torch.arange(20)[3:17:4],
            "c64": torch.randn(3, dtype=torch.complex64, generator=gen), "f64": torch.randn(2, dtype=torch.float64, generator=gen),
            "param": torch.nn.Parameter(torch.randn(2, generator=gen)), "leaf": torch.randn(2, generator=gen).requires_grad_(),
            "conj": torch.randn(3, dtype=torch.complex64, generator=gen).conj()}
    got = pickle.loads(W._pack(("ok", 1, sent)))[2]
    for k, v in sent.items():
        g = got[k]
        assert type(g) is type(v) and g.dtype == v.dtype and g.shape == v.shape and g.requires_grad == v.requires_grad, k
        a, b = g.detach().resolve_conj(), v.detach().resolve_conj()
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b.view(torch.uint8) if b.dtype == torch.bool else b) \
            or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())), k
        if k not in ("param", "leaf", "conj") and g.numel():
            assert g.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
            g.view(-1)[0] = g.view(-1)[0]  # writable (no read-only buffer warning path)
    assert str(got["scalar"].item()) == "-0.0"
    # the fast path is the one taken (torch's reduction would pass the checks above too)
    assert b"_rebuild_tensor" in W._pack(torch.zeros(2)) and b"_rebuild_parameter" in W._pack(torch.nn.Parameter(torch.zeros(2)))
