#!/usr/bin/env python3
# Usage: PYTHONPATH=<this checkout, library built> python benchmarks/tools/ab_output_cache.py [rounds]
"""A/B for issue 28: the gate's backward and forward through autograd with the compiled library's
cache of freed large outputs on and off (torch.ops.fedsq_fast.cpu_cache), against eager, in
interleaved rounds (each round runs every variant, the order rotating; minima). 16 Mi fp32."""
import sys
import time

import torch

import fedsq_fast as ff

N = 16 << 20
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
limit = torch.ops.fedsq_fast.cpu_cache(-1)[1] >> 20
g = torch.Generator().manual_seed(1)
z_q, z_s, gr = (torch.randn(N, generator=g) for _ in range(3))
q1, q2 = z_q.clone().requires_grad_(), z_q.clone().requires_grad_()
y1, _ = ff.gate(q1, z_s)
y2 = q2 * (z_s > 0).float()


def with_cache(mb, f):
    def run():
        torch.ops.fedsq_fast.cpu_cache(mb)
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0
    return run


def plain(f):
    def run():
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0
    return run


bwd_f = lambda: torch.autograd.grad(y1, q1, gr, retain_graph=True)  # noqa: E731
fwd_f = lambda: ff.gate(z_q, z_s)  # noqa: E731
fns = {
    "bwd fedsq, cache on": with_cache(max(limit, 256), bwd_f),
    "bwd fedsq, cache off": with_cache(0, bwd_f),
    "bwd eager": plain(lambda: torch.autograd.grad(y2, q2, gr, retain_graph=True)),
    "fwd fedsq, cache on": with_cache(max(limit, 256), fwd_f),
    "fwd fedsq, cache off": with_cache(0, fwd_f),
    "fwd eager": plain(lambda: z_q * (z_s > 0).float()),
}
for f in fns.values():
    f()
t = {k: [] for k in fns}
order = list(fns)
for r in range(ROUNDS):
    for k in order[r % len(order):] + order[:r % len(order)]:
        t[k].append(fns[k]())
torch.ops.fedsq_fast.cpu_cache(limit)
m = {k: min(v) * 1e3 for k, v in t.items()}
print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "minima ms:",
      ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
for d in ("bwd", "fwd"):
    print(f"{d}: eager / fedsq with the cache {m[f'{d} eager'] / m[f'{d} fedsq, cache on']:.2f}, "
          f"without {m[f'{d} eager'] / m[f'{d} fedsq, cache off']:.2f}")
