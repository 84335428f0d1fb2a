#!/usr/bin/env python3
# Usage: PYTHONPATH=<this checkout, library built> python benchmarks/tools/avg_floor_probe.py [rounds]
"""Issue 28: can the K=8 average be 2x faster than torch._foreach_add_ per client on this machine?

bench_ops's sizes (12 Mi fp32 per client, 100 tensors each, K = 8), interleaved rounds (minima).
Each variant's time and the bytes it must move give its effective bandwidth; the best bandwidth
any variant reaches bounds what the fused average can do: its floor is (K reads + 1 write) at
that bandwidth, and foreach's time over that floor is the most the fused op could gain."""
import os
import sys
import time

import torch

import fedsq_fast as ff

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _bench  # noqa: E402 - benchmarks/_bench.py: the shared interleaved timer

P, T, K = 12 << 20, 100, 8
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
B = P * 4  # bytes per client
g = torch.Generator().manual_seed(0)
clients = [list(torch.chunk(torch.randn(P, generator=g), T)) for _ in range(K)]
flat = [torch.randn(P, generator=g) for _ in range(2)]
w = [float(100 + 17 * i) for i in range(K)]
acc = [torch.empty_like(t) for t in clients[0]]
out = [torch.empty_like(t) for t in clients[0]]
dst, big = torch.empty(P), torch.empty(P)


def foreach():
    torch._foreach_zero_(acc)
    for c, wk in zip(clients, w):
        torch._foreach_add_(acc, c, alpha=wk / sum(w))


# name -> (fn, bytes read + written, counting a store to memory not in cache as one write)
fns = {
    "copy_ (1 read + 1 write)": (lambda: dst.copy_(flat[0]), 2 * B),
    "sum (1 read)": (lambda: flat[0].sum(), B),
    "add_ in place (2 reads + 1 write)": (lambda: big.add_(flat[1], alpha=0.5), 3 * B),
    "foreach_add_ one client, 100 tensors (2 reads + 1 write)": (
        lambda: torch._foreach_add_(acc, clients[0], alpha=0.1), 3 * B),
    "foreach K=8 (zero + 8 x (2 reads + 1 write))": (foreach, (1 + 3 * K) * B),
    "fedsq K=8 weighted_average (8 reads + 1 write)": (lambda: ff.weighted_average(clients, w, out=out),
                                                        (K + 1) * B),
}
m = _bench.interleaved({k: f for k, (f, _) in fns.items()}, ROUNDS)
print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), f"(12 Mi fp32 per client, {ROUNDS} rounds)")
bw = {}
for k, (_, nbytes) in fns.items():
    bw[k] = nbytes / m[k] / 1e9
    print(f"  {k:<58} {m[k] * 1e3:7.2f} ms  {bw[k]:6.1f} GB/s")
best = max(bw.values())
fe, ours = m["foreach K=8 (zero + 8 x (2 reads + 1 write))"], m["fedsq K=8 weighted_average (8 reads + 1 write)"]
floor_ = (K + 1) * B / best / 1e9
print(f"foreach / fedsq = {fe / ours:.2f}; fedsq's floor at the best bandwidth seen ({best:.1f} GB/s) = "
      f"{floor_ * 1e3:.2f} ms, so at most foreach / floor = {fe / floor_:.2f}")
