"""Peak memory of one federation of K clients, run as a subprocess by test_scale.py and
benchmarks/bench_scale.py: ``python scale_probe.py K COHORT ROUNDS PARTITION OUT``.

Prints one JSON line: ``peak_kb`` (the process's peak RSS during data preparation and the
run, above its RSS before them; the RSS high-water mark is reset first through
/proc/self/clear_refs), ``seconds``, and the run's per-round sampled / ok client counts.
The same synthetic pool (20,000 grey 16x16 images, 10 classes) and tiny model for every K,
after a warm-up run that pays imports and torch's first-use allocations."""
import gc
import json
import re
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from fedsq_fast.federation import Federation, InputSpec, from_mapping, make_bundle, prepare_data

POOL, TEST = 20000, 400


def tiny_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10))


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def run(bundle, k: int, cohort: int, rounds: int, partition: str, out):
    cfg = from_mapping({"num_clients": k, "fraction": cohort / k, "min_clients": 2, "rounds": rounds,
                        "val_size": 200, "max_train_samples": None, "max_test_samples": TEST, "batch_size": 8,
                        "lr": 0.05, "partition": partition, "alpha": 0.5, "min_partition_size": 0,
                        "probe_size": 8, "threads": 1, "failure_rate": 0.1, "methods": ["fedavg"],
                        "checkpoint": out is not None})
    data = prepare_data(cfg, bundle, input_spec=InputSpec(1))
    return Federation(cfg, "fedavg", data, model_fn=tiny_model, quiet=True, out_dir=out).run()


def main(argv):
    k, cohort, rounds, partition, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # tiny clients: the 'too little data' warning is expected
    rng = np.random.default_rng(0)
    x = rng.random((POOL + TEST, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, POOL + TEST)
    bundle = make_bundle((x[:POOL], y[:POOL]), (x[POOL:], y[POOL:]))
    del x, y
    run(bundle, 10, 2, 1, "iid", None)  # warm-up: imports, torch's first allocations
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
    base = _status("VmRSS")
    t0 = time.perf_counter()
    res = run(bundle, k, cohort, rounds, partition, out)
    peak = _status("VmHWM") - base
    print(json.dumps({"k": k, "peak_kb": peak, "seconds": time.perf_counter() - t0,
                      "sampled": [h["clients_sampled"] for h in res.history[1:]],
                      "ok": [h["clients_ok"] for h in res.history[1:]]}))


if __name__ == "__main__":
    main(sys.argv[1:])
