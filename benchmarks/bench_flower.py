"""Server-side aggregation on Flower: fedsq_fast's strategy vs Flower's built-in FedAvg.

10 client replies of a ResNet-18-sized model (torchvision resnet18's state-dict shapes,
11.7M parameters, random values, BatchNorm's int64 num_batches_tracked included), as
Flower hands them to ``aggregate_train`` (inflated Messages: ArrayRecord + MetricRecord).
Time: pytest-benchmark in this process. Peak memory: a subprocess per variant, peak RSS
growth during aggregate_train only (the replies themselves are built before).

    pytest benchmarks/bench_flower.py --benchmark-only -s
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import _bench

pytest.importorskip("flwr")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 10
GROUP = "flower aggregate_train (10 clients, resnet18-sized, 46.8 MB)"

# Shared with the memory subprocess: builds the replies and both strategies.
_SETUP = r"""
import os, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
import torch, torchvision
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from fedsq_fast.federation import from_mapping
from fedsq_fast.flower import FedSQStrategy, state_to_arrays

TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
K = 10


def make(k_clients=K):
    torch.manual_seed(0)
    shapes = {k: (v.shape, v.dtype) for k, v in torchvision.models.resnet18().state_dict().items()}
    glob = {k: torch.randn(s) if d.is_floating_point else torch.tensor(7, dtype=d) for k, (s, d) in shapes.items()}
    for k in glob:  # BatchNorm variances are positive (replies with a negative one are rejected)
        if k.endswith("running_var"):
            glob[k] = glob[k].abs() + 0.5
    arrays = state_to_arrays(glob)

    class G:
        def get_node_ids(self):
            return list(range(1, k_clients + 1))

    ours = FedSQStrategy(from_mapping({"dataset": "digits", "model": "tiny_cnn"}), "fedsq",
                         min_train_nodes=k_clients, min_available_nodes=k_clients)
    msgs = list(ours.configure_train(1, arrays, ConfigRecord(), G()))
    replies = []
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{i}"
        gen = torch.Generator().manual_seed(i + 1)
        st = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + i
              for k, v in glob.items()}
        replies.append(Message(RecordDict({"arrays": state_to_arrays(st), "metrics": MetricRecord(
            {"num-examples": 100 + i, "partition-id": i})}), reply_to=m))
    model_bytes = sum(t.numel() * t.element_size() for t in glob.values())
    return glob, ours, FedAvg(min_train_nodes=k_clients, min_available_nodes=k_clients), replies, model_bytes


def kernel_only(replies):
    # decode, StreamingAverage, encode: the strategy minus the engine's per-reply checks
    # (keys/shapes/dtypes, NaN/Inf) and drift metrics, to show where the time goes
    from fedsq_fast import StreamingAverage
    from fedsq_fast.flower import arrays_to_state
    avg = StreamingAverage()
    for r in replies:
        avg.add(arrays_to_state(r.content["arrays"], copy=False), r.content["metrics"]["num-examples"])
    return state_to_arrays(avg.result(consume=True), keep_input=False)
"""

_MEM = _SETUP + r"""
import json, sys
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
glob, ours, flower, replies, M = make()
strat = ours if sys.argv[1] == "fedsq" else flower
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark
base = kb("VmRSS")
arrays, metrics = strat.aggregate_train(1, replies)
peak = kb("VmHWM") - base
out = arrays["bn1.num_batches_tracked"].numpy()
print(json.dumps({"variant": sys.argv[1], "model_bytes": M, "peak_growth_bytes": peak,
                  "int_buffer_dtype": str(out.dtype), "int_buffer_value": float(out)}))
"""


def _mem(variant):
    # fixed mmap threshold: freed tensors/arrays leave RSS, so the peak tracks live bytes
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               FLWR_TELEMETRY_ENABLED="0")
    r = subprocess.run([sys.executable, "-c", _MEM, variant], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup():
    ns = {}
    exec(compile(_SETUP, "bench_flower_setup", "exec"), ns)  # noqa: S102 - our own code, shared with the subprocess
    return ns["make"](), ns["kernel_only"]


@pytest.mark.parametrize("variant", ["fedsq_fast", "fedsq_fast_kernel_only", "flower_fedavg"])
def test_aggregate_time(benchmark, setup, variant):
    (glob, ours, flower, replies, _), kernel_only = setup
    fn = {"fedsq_fast": lambda: ours.aggregate_train(1, replies),
          "fedsq_fast_kernel_only": lambda: kernel_only(replies),
          "flower_fedavg": lambda: flower.aggregate_train(1, replies)}[variant]
    _bench.run(benchmark, GROUP, variant, fn, rounds=3)
    if variant == "flower_fedavg":
        # issue 28's targets: every check on, >= 1.8x Flower's FedAvg and within 1.5x of the kernel
        _bench.ratio("Flower FedAvg time / fedsq_fast strategy time", GROUP, "fedsq_fast", "flower_fedavg",
                     1.8, ">=")
        _bench.ratio("Flower FedAvg time / fedsq_fast kernel-only time", GROUP, "fedsq_fast_kernel_only",
                     "flower_fedavg", 1.0, ">=")
        _bench.ratio("fedsq_fast strategy time / kernel-only time", GROUP, "fedsq_fast_kernel_only",
                     "fedsq_fast", 1.5, "<=")
        t = _bench.RESULTS
        print(f"\naggregate_train (min over rounds): fedsq_fast {t[(GROUP, 'fedsq_fast')] * 1e3:.0f} ms "
              f"(kernel only {t[(GROUP, 'fedsq_fast_kernel_only')] * 1e3:.0f} ms), "
              f"Flower FedAvg {t[(GROUP, 'flower_fedavg')] * 1e3:.0f} ms, ratio "
              f"{t[(GROUP, 'flower_fedavg')] / t[(GROUP, 'fedsq_fast')]:.2f}x")


def test_aggregate_peak_memory(benchmark):
    out = {}

    def measure():
        out["fedsq_fast"] = _mem("fedsq")
        out["flower_fedavg"] = _mem("flower")

    benchmark.group = GROUP + " peak memory"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    s, f = out["fedsq_fast"], out["flower_fedavg"]
    m = s["model_bytes"]
    benchmark.extra_info.update(fedsq_models=s["peak_growth_bytes"] / m, flower_models=f["peak_growth_bytes"] / m)
    print(f"\nmodel {m / 1e6:.1f} MB; peak RSS growth in aggregate_train: fedsq_fast "
          f"{s['peak_growth_bytes'] / 1e6:.1f} MB ({s['peak_growth_bytes'] / m:.2f} models), Flower FedAvg "
          f"{f['peak_growth_bytes'] / 1e6:.1f} MB ({f['peak_growth_bytes'] / m:.2f} models), ratio "
          f"{f['peak_growth_bytes'] / max(1, s['peak_growth_bytes']):.2f}x; int64 buffer comes back as "
          f"{s['int_buffer_dtype']} (fedsq_fast) vs {f['int_buffer_dtype']} (Flower)")
    assert s["int_buffer_dtype"] == "int64"
