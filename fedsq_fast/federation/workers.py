"""Parallel clients: a round's cohort trained by N worker processes (config key ``workers``).

Each worker holds ONE :class:`~.trainer.ClientTrainer` (the method's model; for FedSQ its
structural copy and a mask cache) built from what the server sends it: the config and
method (the model is built as the server built it, then loaded with the server's state),
the client pool's tensors in shared memory (one copy for all workers). Each round the
sampled clients are dealt by size (:func:`deal`); a worker trains its clients in client
order with the same ``ClientTrainer.train`` as in process (seed from (seed,
round, client)), so a client's update does not depend on which worker trains it, and the
transport yields the replies in client order: the global model and every recorded number
(timings aside) are those of the in-process run, bit for bit, for any number of workers.
The server's validation of each new global model is shared out too (:meth:`WorkerPoolTransport.validate`:
whole batches per worker, batch sums added in batch order: the serial numbers bit for bit).

Faults: a worker that dies (killed, segfault, ``os._exit``) or sends no reply within the
timeout is killed; the clients it still owed are dropped with the reason, the round
completes with the others, and a fresh worker takes its place at the next round.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import signal
import time
import weakref
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as tmp

from .transport import Reply, RoundTask, Transport

log = logging.getLogger("fedsq_fast.federation")

# 'spawn': a fresh interpreter per worker. fork after torch has started its thread pools
# can deadlock the child; forkserver leaves its server process behind for the life of the
# parent (a stray process after the run). spawn costs one `import torch` per worker start.
START_METHOD = "spawn"
DEFAULT_TIMEOUT_S = 600.0  # per reply when client_timeout_s is not set: generous, only catches hangs
TIMEOUT_MARGIN_S = 30.0  # beyond client_timeout_s (checked between batches) for a batch and the transfer
START_TIMEOUT_S = 300.0  # a worker's start-up (import torch, build the model)


def _threads(cfg_threads, workers: int) -> int:
    """torch threads per worker: the configured count, else the cores shared out."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cfg_threads or cores // workers)


def _rebuild_tensor(buf, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A tensor over the bytes _Pickler wrote (a bytearray: writable, owned by the tensor)."""
    if not len(buf):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class _Pickler(pickle.Pickler):
    """Plain pickle, except that a plain dense CPU tensor travels as its raw bytes, dtype and
    shape. torch's own reduction goes through ``torch.load`` for every tensor (~100 us each:
    a client's reply of 15 tensors took 1.6 ms to load and 1.2 ms to dump, against 64 and
    126 us this way), which made unpickling replies much of the server's serial time in a
    round. Anything else (autograd leaves, subclasses such as Parameter, quantized, sparse,
    conjugate views) keeps torch's reduction. Tensors sharing storage arrive as copies."""

    def reducer_override(self, obj):
        if (type(obj) is torch.Tensor and obj.layout == torch.strided and obj.device.type == "cpu"
                and not obj.requires_grad and not obj.is_quantized and not obj.is_conj() and not obj.is_neg()):
            flat = obj.detach().contiguous().reshape(-1)
            return _rebuild_tensor, (pickle.PickleBuffer(flat.view(torch.uint8).numpy()), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _pack(obj) -> bytes:
    # tensors travel as bytes in the message (the ForkingPickler would move the server's
    # tensors, the global model's among them, into shared memory on every send)
    f = io.BytesIO()
    _Pickler(f, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return f.getvalue()


# ---------------------------------------------------------------------- worker side
def _worker_main(conn, threads: int, tmpdir: str | None = None) -> None:
    """A worker's loop: ``setup`` builds the trainer, ``train`` trains clients in order and
    sends one message per client. Ctrl-C is the server's to handle (it closes the pool).
    ``tmpdir``: the pool's temporary folder (mask-cache spill files go there, so that the
    server removes them even after a killed worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    if tmpdir is not None:
        import tempfile

        tempfile.tempdir = tmpdir
    from .client import ClientTimeout
    from .trainer import ClientTrainer

    conn.send_bytes(_pack(("hello",)))

    trainer = validator = None
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:  # the server closed its end
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "setup":
            _, blob, x, y, val_x, val_y, test = msg  # test: the clients' test splits (federated evaluation), or None
            try:
                recipe, state, parts, transform = pickle.loads(blob)
                _set_determinism(recipe["determinism"])
                from . import trainer as _trainer

                _trainer.MASK_CACHE_BYTES = recipe.get("mask_cache_bytes", _trainer.MASK_CACHE_BYTES)
                model = _build_model(recipe, x, transform)
                model.load_state_dict(state)  # the server's model now (structural copy included)
                seed, mask_cache = recipe["cfg"].seed, recipe["cfg"].mask_cache
                from .privacy import client_privacy

                trainer = ClientTrainer(model, x, y, parts, transform, seed=seed, mask_cache=mask_cache,
                                        own_model=True, privacy=client_privacy(recipe["cfg"]), test=test)
                if validator is not None:
                    validator.close()  # the previous model's: its spill file goes now
                validator = _Validator(trainer, val_x, val_y, recipe["cfg"])
                conn.send_bytes(_pack(("ready",)))
            except Exception as e:  # reported, and the server refuses to run
                conn.send_bytes(_pack(("failed", f"{type(e).__name__}: {e}")))
            continue
        if kind == "evaluate":  # federated evaluation (evaluation.py): one message per client, in order
            _evaluate_clients(conn, trainer, msg)
            continue
        if kind == "validate":
            _, glob, start, stop, fault = msg
            try:
                _test_fault(fault)
                out = ("validated", *validator.run(pickle.loads(glob), start, stop))
            except Exception as e:  # the server evaluates this share itself (and meets a real error there)
                out = ("error", None, f"{type(e).__name__}: {e}")
            conn.send_bytes(_pack(out))
            continue
        _, rnd, glob, lcfg, items, faults = msg  # "train"
        glob = pickle.loads(glob)
        for cid, local in items:
            _test_fault(faults.get((rnd, cid)))
            trainer.local_states = {cid: local} if local is not None else {}
            try:
                state, info = trainer.train(rnd, cid, glob, lcfg)
                out = ("ok", cid, state, info["num_samples"], info["seconds"], info["loss"])
            except ClientTimeout as e:
                out = ("error", cid, str(e))
            except Exception as e:  # a failing client leaves the round, not the run (as in process)
                out = ("error", cid, f"error: {type(e).__name__}: {e}")
            conn.send_bytes(_pack(out))


def _evaluate_clients(conn, trainer, msg) -> None:
    """Worker side of federated evaluation: each client's EvalReply fields, in the order given."""
    from .evaluation import EvalTask, evaluate_reply

    _, rnd, glob, items, batch_size, precision, faults = msg
    task = EvalTask(rnd, pickle.loads(glob), [c for c, _ in items], batch_size, precision)
    for cid, local in items:
        _test_fault(faults.get(("evaluate", rnd, cid)))
        trainer.local_states = {cid: local} if local is not None else {}
        r = evaluate_reply(trainer, task, cid)
        conn.send_bytes(_pack(("eval", cid, r.num_samples, r.loss, r.accuracy, r.error)))


class _Validator:
    """A worker's share of the server's validation: samples ``[start, stop)`` of the
    validation split (whole batches of the server's batching) evaluated with the global
    model the server sends, on this worker's model (the same structural copy: the server's
    state at setup). With the mask cache on, a cache of its own for its share (the server's
    validation cache holds the whole split; the training cache stays attached for
    training): a FedSQ validation is then one quantitative forward, as in the server."""

    def __init__(self, trainer, x, y, cfg):
        from .lazy import is_random

        self.trainer, self.x, self.y, self.cfg = trainer, x, y, cfg
        self.use_cache = (cfg.mask_cache and not is_random(x)
                          and callable(getattr(trainer.worker, "attach_cache", None)))
        self.cache, self.range = None, None

    def run(self, glob: dict, start: int, stop: int) -> tuple[list, int]:
        from . import adapter
        from .client import eval_sums
        from .trainer import engine_mask_cache

        model = self.trainer.worker
        adapter.load_payload(model, glob)  # the payload is the whole trained state (see adapter)
        if not self.use_cache:
            return eval_sums(model, self.x, self.y, self.trainer.transform, self.cfg.eval_batch_size, None,
                             self.cfg.precision, start, stop)
        if self.range != (start, stop):  # the same share every round while the pool keeps its size
            if self.cache is not None:
                self.cache.close()
            self.cache, self.range = engine_mask_cache(stop - start), (start, stop)
            self.cache.bind(model)
        own = model.mask_cache
        model.mask_cache = self.cache  # bound above: swapping back and forth hashes no structural copy
        try:
            return eval_sums(model, self.x, self.y, self.trainer.transform, self.cfg.eval_batch_size,
                             torch.arange(stop - start), self.cfg.precision, start, stop)
        finally:
            model.mask_cache = own

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _gone_why(slot, ready, deadline: float, timeout: float) -> str | None:
    """Why a worker that still owes replies will not send them (it died, or sent nothing
    until ``deadline``), or None while it may still answer; ``ready``: what the last wait
    returned. One rule for training and federated evaluation."""
    if slot.proc.sentinel in ready or not slot.alive():
        return f"worker died: {slot.why_dead()}"
    if time.monotonic() >= deadline:
        return f"worker timed out: no reply within {timeout:g} s"
    return None


def shares(n: int, batch_size: int, k: int) -> list[tuple[int, int]]:
    """The validation split of ``n`` samples cut into at most ``k`` contiguous ``[start,
    stop)`` ranges of whole batches of ``batch_size`` (the batches of a serial evaluation),
    as even as the batches allow; fewer ranges where there are fewer batches."""
    nb = -(-n // batch_size)
    k = min(k, nb)
    return [(nb * i // k * batch_size, min(n, nb * (i + 1) // k * batch_size)) for i in range(k)]


def _determinism() -> tuple:
    """This process's reproducibility switches, which workers copy: a worker sharing the GPU
    must pick the kernels the server would, or results depend on the number of workers."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def _set_determinism(flags: tuple) -> None:
    algorithms, warn_only, cudnn_deterministic, cudnn_benchmark = flags
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark


def _build_model(recipe: dict, x, transform):
    """The method's model built as the server built it (a DualCopy model is an FX graph,
    which pickle cannot carry): the zoo model of the config, or the pickled ``model_fn``."""
    from types import SimpleNamespace

    from . import adapter
    from .prepare import build_method_model, call_model_fn

    cfg, method, dual, model_fn = recipe["cfg"], recipe["method"], recipe["dual"], recipe["model_fn"]
    if model_fn is not None:
        model, source = call_model_fn(model_fn, cfg.seed), "model_fn"
    else:
        data = SimpleNamespace(num_classes=recipe["num_classes"], transform=transform, x=x)
        model, source = build_method_model(cfg, dual, data), f"model {cfg.model!r}"
    model, _ = adapter.method_model(model, method, dual, quant_bn=cfg.quant_bn, allow_ungated=cfg.allow_ungated,
                                    soft_gates=cfg.soft_gates, source=source)
    return model


def _test_fault(what) -> None:
    """Test seam (``WorkerPoolTransport._test_fault``): misbehave before training a client."""
    if what == "exit":
        os._exit(1)
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "hang":
        time.sleep(3600)
    if what == "raise":  # validation only: the worker reports it and lives on
        raise RuntimeError("test fault")


def deal(clients: list, sizes: list, workers: int) -> list[list]:
    """The clients each worker trains, each list in client order: the largest client first to
    the least-loaded worker (load: samples), ties to the earlier client and the lower worker.
    Deterministic; which worker trains a client changes no result, only how evenly the
    round's work is shared (round-robin would leave one worker the big clients of a skewed
    partition)."""
    load, out = [0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(clients)), key=lambda i: (-sizes[i], i)):
        k = min(range(workers), key=lambda w: (load[w], w))
        load[k] += max(1, sizes[i])
        out[k].append(i)
    return [[clients[i] for i in sorted(o)] for o in out]


# ---------------------------------------------------------------------- server side
class _Slot:
    """One worker process and the server's end of its pipe."""

    def __init__(self, ctx, threads: int, tmpdir: str | None = None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, threads, tmpdir), daemon=True,
                                name="fedsq-worker")
        self.proc.start()
        child.close()
        self.version = None  # the setup it holds
        self.greeted = False  # its "hello" read: it is in its receive loop

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def why_dead(self) -> str:
        self.proc.join(1)
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


def _stop(slots, tmp=None) -> None:
    """Stop every worker: ask, wait briefly, then kill (also the finalizer's last resort);
    then remove the pool's temporary folder (``tmp``: a list holding its path, emptied)."""
    try:
        _stop_workers(slots)
    finally:
        while tmp:
            import shutil

            shutil.rmtree(tmp.pop(), ignore_errors=True)


def _stop_workers(slots) -> None:
    for s in slots:
        if not s.greeted:  # still importing torch: it would read "stop" only after that
            s.kill()
            continue
        try:
            if s.proc.is_alive():
                s.conn.send_bytes(_pack(("stop",)))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 5
    for s in slots:
        s.proc.join(max(0.0, deadline - time.monotonic()))
        s.kill()
    slots.clear()


class WorkerPoolTransport(Transport):
    """The sampled clients trained by ``workers`` processes, each with one model.

    Results are those of :class:`~.transport.InProcessTransport` bit for bit (replies are
    yielded in client order, whichever worker trained a client: :func:`deal`). ``threads``: torch threads per worker (default: the config's
    ``threads``, else the cores divided among the workers). ``timeout_s``: the longest wait
    for a worker's next reply before it counts as hung (default: ``client_timeout_s`` + 30 s
    when set, else 600 s). FedBN's personal layers stay in the server (checkpointed as in
    process) and go out with their client's task. One pool can serve several Federations
    in turn (``bind`` sends the new method's model); whoever made it closes it
    (:meth:`close`; a finalizer stops the workers if nobody does).

    ``_test_fault``: test seam, ``{(round, client): "exit" | "kill" | "hang"}``: the worker
    that trains that client in that round ends itself (``os._exit(1)`` / SIGKILL) or sleeps
    an hour before training it; a key ``("evaluate", round, client)``: before evaluating it
    (federated evaluation);
    ``{(round, "val", i): ... | "raise"}``: worker ``i`` does so (or raises) before its
    validation share.
    """

    parallel_clients = True  # what config key `workers` asks for (Federation's check)
    replies_alias = False  # each reply is unpickled from its worker's message

    def __init__(self, workers: int, *, threads: int | None = None, timeout_s: float | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads: must be an integer >= 1 or None, got {threads!r}")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s: must be a number > 0 or None, got {timeout_s!r}")
        self.workers, self.threads, self.timeout_s = workers, threads, timeout_s
        self._ctx = tmp.get_context(START_METHOD)
        self._slots: list = []
        self._tmp: list = []  # the pool's temporary folder (workers' spill files), made with the pool
        self._finalizer = weakref.finalize(self, _stop, self._slots, self._tmp)  # the list objects, not self
        self._version = 0
        self._setup = None
        self.local_states: dict[int, dict] = {}
        self._test_fault: dict = {}
        self._warned_threads = False

    # ------------------------------------------------------------------ engine hooks
    def bind(self, fed) -> None:
        if fed.device.type not in ("cpu", "cuda"):
            raise ValueError(f"workers: the worker pool trains on the CPU or a CUDA GPU; device is {fed.device}")
        super().bind(fed)
        self.local_states = {}
        self.refresh()

    def refresh(self) -> None:
        self._version += 1  # workers rebuild their model before their next task
        self._setup = None

    def state_dict(self) -> dict:
        return {f"{cid}/{k}": t for cid, d in self.local_states.items() for k, t in d.items()}

    def load_state_dict(self, state: dict) -> None:
        self.local_states = {}
        for k, t in state.items():
            cid, _, key = k.partition("/")
            self.local_states.setdefault(int(cid), {})[key] = t.to(self.fed.device)

    def close(self) -> None:
        """Stop and join every worker and remove their temporary files (the next round would
        start a new pool)."""
        _stop(self._slots, self._tmp)

    # ------------------------------------------------------------------ pool
    def _setup_bytes(self) -> bytes:
        """One worker's setup message: the model, partition and transform pickled (once per
        model), the pool's tensors as shared-memory handles (once per worker: a handle is
        fetched from this process's resource sharer once)."""
        from multiprocessing.reduction import ForkingPickler

        from .lazy import is_lazy

        d = self.fed.data
        for t in (d.x, d.y, d.val_x, d.val_y):
            # in place, once (a no-op after): every worker maps the same pages. Images read per
            # batch travel as their source (a memmap: its file name); on a GPU the pickler sends
            # CUDA IPC handles, so the workers read the server's copy.
            if not is_lazy(t) and not t.is_cuda:
                t.share_memory_()
        test = None
        if getattr(d, "ctest_parts", None) is not None:  # federated evaluation: the clients' test splits
            for t in (d.ctest_x, d.ctest_y):
                if not is_lazy(t) and not t.is_cuda:
                    t.share_memory_()
            test = (d.ctest_x, d.ctest_y, d.ctest_parts)
        return bytes(ForkingPickler.dumps(("setup", self._model_blob(), d.x, d.y, d.val_x, d.val_y, test)))

    def _model_blob(self) -> bytes:
        """What a worker builds its model from (once per model; before any worker starts,
        so a model_fn that cannot be pickled is refused with no process started)."""
        fed, d = self.fed, self.fed.data
        if self._setup is None:
            from . import trainer as _trainer

            recipe = {"cfg": fed.cfg, "method": fed.method, "dual": fed.dual, "num_classes": d.num_classes,
                      "model_fn": getattr(fed, "model_fn", None), "determinism": _determinism(),
                      "mask_cache_bytes": _trainer.MASK_CACHE_BYTES}  # the server's RAM budget, spill beyond
            try:
                self._setup = _pack((recipe, fed.model.state_dict(), d.parts, d.transform))
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                what = ("model_fn must be picklable (a module-level function)" if recipe["model_fn"] is not None
                        else "the model's recipe must be picklable")
                raise ValueError(f"workers: {what} for worker processes to build the model: {e}") from None
        return self._setup

    def _ensure_pool(self) -> None:
        """A live worker with the current model in every slot (dead ones replaced)."""
        self._model_blob()
        threads = _threads(self.threads if self.threads is not None else self.fed.cfg.threads, self.workers)
        if threads != torch.get_num_threads() and not self._warned_threads:
            self._warned_threads = True
            log.warning("workers: each of the %d workers trains with %d torch thread(s), a workers = 1 run with %d: "
                        "torch's CPU kernels round differently per thread count, so the model and every "
                        "number differ in the last bits (about 1e-8 relative); set threads (e.g. --threads 1) "
                        "for results bit-identical across worker counts", self.workers, threads,
                        torch.get_num_threads())
        if not self._tmp:
            import tempfile

            self._tmp.append(tempfile.mkdtemp(prefix="fedsq-workers-"))
        tmpdir = self._tmp[0]
        for i in range(self.workers):
            if i < len(self._slots) and not self._slots[i].alive():
                self._slots[i].kill()
                self._slots[i] = _Slot(self._ctx, threads, tmpdir)
            elif i >= len(self._slots):
                self._slots.append(_Slot(self._ctx, threads, tmpdir))
        stale = [s for s in self._slots if s.version != self._version]
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in stale:
            if not s.greeted:  # a new process: send nothing before it reads (a send could block for good)
                self._expect(s, "hello", deadline)
                s.greeted = True
            try:
                s.conn.send_bytes(self._setup_bytes())
            except OSError:
                pass  # it died: _expect reports it
        for s in stale:
            self._expect(s, "ready", deadline)
            s.version = self._version

    def _expect(self, s: "_Slot", kind: str, deadline: float) -> None:
        """Worker ``s``'s next message is ``kind``, before ``deadline``; otherwise the pool is
        stopped and the reason raised (a worker that cannot start is no client's fault)."""
        if not wait([s.conn, s.proc.sentinel], max(0.0, deadline - time.monotonic())):
            self.close()
            raise RuntimeError(f"workers: a worker did not start within {START_TIMEOUT_S:.0f} s")
        try:
            msg = pickle.loads(s.conn.recv_bytes())
        except (EOFError, OSError):
            why = s.why_dead()
            self.close()
            raise RuntimeError(f"workers: a worker died while starting ({why}; its traceback is above). Workers "
                               "are spawned: a script that runs a federation with workers > 1 must do so under "
                               "`if __name__ == '__main__':`") from None
        if msg[0] != kind:
            self.close()
            raise RuntimeError(f"workers: a worker could not build the model: {msg[1]}" if msg[0] == "failed"
                               else f"workers: internal error: {msg[0]!r} from a worker where {kind!r} was due")

    def _reply_timeout(self, lcfg) -> float:
        if self.timeout_s is not None:
            return float(self.timeout_s)
        if lcfg.client_timeout_s is not None:
            return lcfg.client_timeout_s + TIMEOUT_MARGIN_S
        return DEFAULT_TIMEOUT_S

    # ------------------------------------------------------------------ round
    def replies(self, task: RoundTask):
        clients = list(task.clients)
        if not clients:
            return
        self._ensure_pool()
        n = len(self._slots)
        parts = self.fed.data.parts
        owed = dict(enumerate(deal(clients, [len(parts[c]) for c in clients], n)))
        glob = _pack(task.payload)
        got: dict = {}  # early arrivals (raw bytes), by client
        lost: dict = {}  # client -> reason, for a dead or hung worker's unfinished clients
        for i, s in enumerate(self._slots):
            if owed[i]:
                items = [(c, self.local_states.get(c)) for c in owed[i]]
                faults = {k: v for k, v in self._test_fault.items() if k[0] == task.round and k[1] in owed[i]}
                try:
                    s.conn.send_bytes(_pack(("train", task.round, glob, task.local_config, items, faults)))
                except OSError:  # it died since the pool was checked
                    lost.update((c, f"worker died: {s.why_dead()} (before the round)") for c in owed[i])
                    owed[i] = []
                    s.kill()
        timeout = self._reply_timeout(task.local_config)
        deadline = {i: time.monotonic() + timeout for i in owed if owed[i]}

        def collect(block: bool) -> None:
            busy = {i: s for i, s in enumerate(self._slots) if owed[i]}
            if not busy:
                return
            waitables = [x for s in busy.values() for x in (s.conn, s.proc.sentinel)]
            left = min(deadline[i] for i in busy) - time.monotonic()
            ready = set(wait(waitables, max(0.0, left) if block else 0))
            for i, s in busy.items():
                # a reply already in the pipe counts even when the worker died after sending it
                while owed[i] and s.conn.poll():
                    try:
                        raw = s.conn.recv_bytes()
                    except (EOFError, OSError):
                        break
                    got[owed[i].pop(0)] = raw
                    deadline[i] = time.monotonic() + timeout
                if not owed[i]:
                    continue
                why = _gone_why(s, ready, deadline[i], timeout)
                if why is None:
                    continue
                log.warning("round %d: worker %d (pid %s) %s; restarted for the next round",
                            task.round, i, s.proc.pid, why.removeprefix("worker "))
                for c in owed[i]:
                    lost[c] = f"{why} (while training client {owed[i][0]})"
                owed[i] = []
                s.kill()

        try:
            for cid in clients:
                while cid not in got and cid not in lost:
                    if not any(cid in o for o in owed.values()):
                        raise RuntimeError(f"workers: internal error: client {cid} is owed by no worker")
                    collect(block=True)
                collect(block=False)  # keep the other workers' pipes drained
                if cid in lost:
                    yield Reply(cid, error=lost.pop(cid))
                    continue
                try:
                    msg = pickle.loads(got.pop(cid))
                    kind, who = msg[0], msg[1]
                except Exception as e:  # noqa: BLE001 - bytes that are no reply: this client's drop
                    yield Reply(cid, error=f"malformed reply from its worker: {type(e).__name__}: {e}")
                    continue
                if who != cid:  # workers answer their clients in the order dealt
                    raise RuntimeError(f"workers: internal error: reply for client {who} where {cid} was due")
                if kind == "error":
                    yield Reply(cid, error=str(msg[2]))
                    continue
                try:
                    _, _, state, num, secs, loss = msg
                    self._keep_local(cid, task.payload, state)
                except Exception as e:  # noqa: BLE001 - a reply of the wrong shape or kind: this client's drop
                    yield Reply(cid, error=f"malformed reply from its worker: {type(e).__name__}: {e}")
                    continue
                yield Reply(cid, state, num, secs, loss)
        finally:
            # a round abandoned half-way (an exception or Ctrl-C in the fold) leaves workers
            # mid-task: their later messages would be read as the next round's; restart them
            if any(owed.values()):
                for i, s in enumerate(self._slots):
                    if owed[i]:
                        s.kill()

    def client_evaluations(self, task):
        """Federated evaluation (:mod:`.evaluation`) by the workers: the clients dealt by test
        size, each evaluated by the same ``ClientTrainer.evaluate`` as in process; one EvalReply
        per client, in client order. A worker that dies or sends nothing within the reply
        timeout is killed (replaced at the next task); its clients' replies carry the reason."""
        from .evaluation import EvalReply

        clients = list(task.clients)
        if not clients:
            return
        self._ensure_pool()
        sizes = self.fed.data.ctest_parts.sizes()
        owed = dict(enumerate(deal(clients, [int(sizes[c]) for c in clients], len(self._slots))))
        glob = _pack(task.payload)
        out: dict = {}
        for i, s in enumerate(self._slots):
            if owed[i]:
                items = [(c, self.local_states.get(c)) for c in owed[i]]
                faults = {k: v for k, v in self._test_fault.items() if k[0] == "evaluate" and k[1] == task.round}
                try:
                    s.conn.send_bytes(_pack(("evaluate", task.round, glob, items, task.batch_size, task.precision,
                                             faults)))
                except OSError:
                    out.update((c, EvalReply(c, error=f"worker died: {s.why_dead()} (before the evaluation)"))
                               for c in owed[i])
                    owed[i] = []
                    s.kill()
        timeout = self.timeout_s if self.timeout_s is not None else DEFAULT_TIMEOUT_S
        deadline = {i: time.monotonic() + timeout for i in owed if owed[i]}
        try:
            while any(owed.values()):
                busy = {i: s for i, s in enumerate(self._slots) if owed[i]}
                ready = set(wait([x for s in busy.values() for x in (s.conn, s.proc.sentinel)],
                                 max(0.0, min(deadline[i] for i in busy) - time.monotonic())))
                for i, s in busy.items():
                    while owed[i] and s.conn.poll():
                        try:
                            msg = pickle.loads(s.conn.recv_bytes())
                            _, cid, n, loss, acc, err = msg
                        except (EOFError, OSError):
                            break
                        except Exception as e:  # noqa: BLE001 - bytes that are no reply: this client's failure
                            cid, err = owed[i][0], f"malformed reply from its worker: {type(e).__name__}: {e}"
                            n, loss, acc = 0, float("nan"), float("nan")
                        if cid != owed[i][0]:
                            raise RuntimeError(f"workers: internal error: evaluation of client {cid} where "
                                               f"{owed[i][0]} was due")
                        owed[i].pop(0)
                        out[cid] = EvalReply(cid, n, loss, acc, err)
                        deadline[i] = time.monotonic() + timeout
                    if not owed[i]:
                        continue
                    why = _gone_why(s, ready, deadline[i], timeout)
                    if why is None:
                        continue
                    log.warning("round %d: federated evaluation: worker %d (pid %s) %s; restarted for the next "
                                "task", task.round, i, s.proc.pid, why.removeprefix("worker "))
                    out.update((c, EvalReply(c, error=why)) for c in owed[i])
                    owed[i] = []
                    s.kill()
        finally:
            for i, s in enumerate(self._slots):  # abandoned half-way: their later messages would mislead
                if owed.get(i):
                    s.kill()
        for cid in clients:
            yield out[cid]

    # ------------------------------------------------------------------ validation
    def validate(self, rnd: int) -> tuple[list, int] | None:
        """The server's validation of its current global model shared out: worker ``i``
        evaluates range ``i`` of :func:`shares` (whole batches of the serial evaluation) while
        the server waits; the per-batch loss sums come back and are put in batch order, so
        ``eval_result`` of them is :meth:`Federation.evaluate`'s result bit for bit. A share
        whose worker is down, died or timed out, or failed, is evaluated in this process
        instead (same numbers). None (the server evaluates it all) where sharing would change
        a number or save nothing: a GPU (one process already has the device), workers whose
        torch thread count is not the server's (CPU kernels round differently per thread
        count), validation data that changes between reads (random transforms: the numbers
        would follow each process's random state), fewer than two batches, or no worker
        holding the current model (round 0; a round that sent no client after a structural
        refresh or a resume; after close)."""
        from . import adapter
        from .lazy import is_random

        fed = self.fed
        d, bs = fed.data, fed.cfg.eval_batch_size
        ranges = shares(len(d.val_y), bs, self.workers)
        threads = _threads(self.threads if self.threads is not None else fed.cfg.threads, self.workers)
        ready = [i for i, s in enumerate(self._slots[:len(ranges)])
                 if s.greeted and s.version == self._version and s.alive()]
        if (fed.device.type != "cpu" or is_random(d.val_x) or len(ranges) < 2 or threads != torch.get_num_threads()
                or not ready):
            return None

        glob = _pack(adapter.payload_state(fed.model))
        out: dict = {}
        owed = []
        try:
            for i in ready:
                s = self._slots[i]
                try:
                    s.conn.send_bytes(_pack(("validate", glob, *ranges[i], self._test_fault.get((rnd, "val", i)))))
                    owed.append(i)
                except OSError:  # it died since the round: this share is evaluated here
                    s.kill()
            for i in range(len(ranges)):  # the shares no worker took, while the workers evaluate theirs
                if i not in owed:
                    out[i] = fed.val_sums(*ranges[i])
            timeout = self.timeout_s if self.timeout_s is not None else DEFAULT_TIMEOUT_S
            for i in list(owed):
                s = self._slots[i]
                why = None
                if not wait([s.conn, s.proc.sentinel], timeout) and not s.conn.poll():
                    why = f"timed out: no reply within {timeout:g} s"
                else:
                    try:
                        msg = pickle.loads(s.conn.recv_bytes())
                        due = -(-(ranges[i][1] - ranges[i][0]) // bs)
                        if msg[0] == "validated" and len(msg[1]) == due:
                            out[i] = (list(msg[1]), int(msg[2]))
                        elif msg[0] == "error":
                            why = f"failed: {msg[2]}"
                        else:
                            why = (f"failed: internal error: {msg[0]!r} with {len(msg[1])} batch sums where {due} "
                                   "were due")
                    except (EOFError, OSError):
                        why = f"died: {s.why_dead()}"
                owed.remove(i)
                if why is not None:
                    log.warning("round %d: worker %d (pid %s) %s while validating; its share (validation samples "
                                "%d-%d) evaluated by the server", rnd, i, s.proc.pid, why, ranges[i][0],
                                ranges[i][1] - 1)
                    if not why.startswith("failed"):
                        s.kill()  # restarted at the next round
                    out[i] = fed.val_sums(*ranges[i])
        finally:
            for i in owed:  # abandoned (an exception or Ctrl-C): a late reply would be read as a client's
                self._slots[i].kill()
        losses, correct = [], 0
        for i in range(len(ranges)):
            losses += out[i][0]
            correct += out[i][1]
        return losses, correct

    def _keep_local(self, cid: int, glob: dict, state) -> None:
        """FedBN: the client's own layers from the state it sent (as ClientTrainer.keep_local)."""
        keys = self.fed.strategy.local_keys(glob)
        if keys and isinstance(state, dict) and all(k in state for k in keys):
            self.local_states[cid] = {k: state[k].detach().clone() for k in keys}
