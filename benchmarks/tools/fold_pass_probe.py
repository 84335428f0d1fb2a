#!/usr/bin/env python3
# Usage: PYTHONPATH=<this checkout, library built> python benchmarks/tools/fold_pass_probe.py [rounds]
"""Issue 28: should the server fold an accepted reply in the same read as its checks?

One ResNet-18-sized reply (12 Mi fp32 in 100 tensors) against the global model, accumulated
into a float32 accumulator, interleaved rounds (minima):
  two passes  : reply_stats (reads reply + global) then accumulate_list_ (reads reply + acc,
                writes acc): today's path;
  fold only   : accumulate_list_ alone (the fold's own cost: the least a fused op can take);
  fused floor : weighted_sum_list_out over [acc, reply, global] into a second buffer (reads the
                three, writes one): the traffic of the only exact fused op (a checked sum into
                scratch, kept on acceptance; undoing a fold in place is not exact in float);
  checks only : reply_stats alone.
"""
import os
import sys
import time

import torch

import fedsq_fast as ff

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _bench  # noqa: E402 - benchmarks/_bench.py: the shared interleaved timer

P, T = 12 << 20, 100
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
g = torch.Generator().manual_seed(0)
glob = list(torch.chunk(torch.randn(P, generator=g), T))
reply = [t + 0.01 * torch.randn(t.shape, generator=g) for t in glob]
acc = [torch.zeros_like(t) for t in glob]
scratch = [torch.empty_like(t) for t in glob]
ops = torch.ops.fedsq_fast
flags = [1] * T


def two_passes():
    ff.ops.reply_stats(reply, glob, flags)
    ops.accumulate_list_(acc, reply, 0.1)


fns = {
    "two passes (checks, then fold)": two_passes,
    "fold only (accumulate_list_)": lambda: ops.accumulate_list_(acc, reply, 0.1),
    "fused floor (3 reads + 1 write)": lambda: ops.weighted_sum_list_out(acc + reply + glob, [1.0, 0.1, 0.0],
                                                                         scratch),
    "checks only (reply_stats)": lambda: ff.ops.reply_stats(reply, glob, flags),
}
m = {k: v * 1e3 for k, v in _bench.interleaved(fns, ROUNDS).items()}
print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "minima ms:",
      ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
two, floor_ = m["two passes (checks, then fold)"], m["fused floor (3 reads + 1 write)"]
print(f"two passes / fused floor {two / floor_:.2f}; saving at most {two - floor_:.2f} ms per reply "
      f"({100 * (two - floor_) / two:.0f}% of the check + fold)")
