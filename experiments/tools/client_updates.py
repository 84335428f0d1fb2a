"""Per-client update sizes in one round of a suite cell, and what each client's batches looked
like: a diagnostic for runs whose global model blows up (update norms in the thousands).

    python experiments/tools/client_updates.py experiments/mobilenet_fmnist.toml dirichlet:0.5 2 fedavg [--round 1]

Starts from the round-0 global model (the pretrained one) as the suite run does, trains each
client once with the run's own seeds, and prints ||w_k - w_0|| and the parameter with the largest
change; then trains the same client again with its size-2..3 last batch left out, to show how much
of the change that batch makes. Writes nothing.
"""
import argparse
import math
import sys

import torch

from fedsq_fast import experiments as ex
from fedsq_fast.federation import adapter
from fedsq_fast.federation.client import local_train
from fedsq_fast.federation.data import load_dataset
from fedsq_fast.federation.server import Federation, client_seed, prepare_data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite")
    p.add_argument("partition")
    p.add_argument("seed", type=int)
    p.add_argument("method")
    p.add_argument("--round", type=int, default=1, help="round whose seeds the clients use (default 1)")
    a = p.parse_args(argv)
    suite = ex.load_suite(a.suite)
    cfg = suite.cell_config(a.partition, a.seed, a.method)
    torch.set_num_threads(cfg.threads or 1)
    data = prepare_data(cfg, load_dataset(cfg.dataset, cfg.data_root, cfg.download))
    fed = Federation(cfg, a.method, data, quiet=True)
    glob = {k: v.clone() for k, v in adapter.payload_state(fed.model).items()}
    keys = [k for k, v in glob.items() if v.is_floating_point() and "running_" not in k]
    bs = cfg.batch_size
    print(f"{a.suite} {a.partition} seed {a.seed} {a.method}, round {a.round}, batch size {bs}")
    print("client  samples  last batch  ||w_k - w_0||  largest change (parameter: ||dw||)   "
          "||w_k - w_0|| without the last batch")
    for cid in fed.sample_clients(a.round):
        state, info = fed.train_client(a.round, cid, glob)
        d = {k: float((state[k].double() - glob[k].double()).norm()) for k in keys}
        top = max(d, key=d.get)
        n = len(data.parts[cid])
        last = n % bs or bs
        alt = ""
        if 2 <= last <= 3 and n > bs:
            # same client, same seed, but batches end before the tiny one
            adapter.load_payload(fed.worker, glob)
            part = data.parts[cid]
            sl = slice(int(part[0]), int(part[-1]) + 1)
            lcfg = fed.local_config(a.round)
            x, y = data.x[sl], data.y[sl]
            gen = torch.Generator().manual_seed(client_seed(cfg.seed, a.round, cid))
            keep = torch.randperm(n, generator=gen)[: n - last]  # the samples of the full batches
            keep = keep.sort().values
            local_train(fed.worker, x[keep], y[keep], lcfg, client_seed(cfg.seed, a.round, cid), data.transform,
                        torch.from_numpy(part)[keep] if fed.cache is not None else None)
            s2 = adapter.payload_state(fed.worker)
            alt = f"{math.sqrt(sum(float((s2[k].double() - glob[k].double()).norm()) ** 2 for k in keys)):14.3f}"
        tot = math.sqrt(sum(v * v for v in d.values()))
        print(f"{cid:6d}  {n:7d}  {last:10d}  {tot:13.3f}  {top}: {d[top]:.3f}   {alt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
