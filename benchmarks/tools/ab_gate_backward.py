#!/usr/bin/env python3
# Usage: PYTHONPATH=<a fedsq_fast checkout with its library built> python benchmarks/tools/ab_gate_backward.py <label>
"""A/B for issue 18 #13: gate backward through autograd vs eager, interleaved rounds (minima)."""
import sys, time, torch, fedsq_fast as ff
N = 16 << 20
g = torch.Generator().manual_seed(1)
z_q, z_s, gr = (torch.randn(N, generator=g) for _ in range(3))
q1, q2 = z_q.clone().requires_grad_(), z_q.clone().requires_grad_()
y1, _ = ff.gate(q1, z_s)
y2 = q2 * (z_s > 0).float()
bits, mf, out = ff.pack_mask(z_s), (z_s > 0).float(), torch.empty(N)
fns = {
    "fedsq autograd bwd": lambda: torch.autograd.grad(y1, q1, gr, retain_graph=True),
    "eager autograd bwd": lambda: torch.autograd.grad(y2, q2, gr, retain_graph=True),
    "fedsq gate fwd (alloc)": lambda: ff.gate(z_q, z_s),
    "eager gate fwd (alloc)": lambda: z_q * (z_s > 0).float(),
    "fedsq apply out=": lambda: ff.apply_mask(gr, bits, out=out),
    "eager mul out=": lambda: torch.mul(gr, mf, out=out),
}
for f in fns.values(): f()
t = {k: [] for k in fns}
order = list(fns)
for r in range(15):
    for k in order[r % len(order):] + order[:r % len(order)]:
        t0 = time.perf_counter(); fns[k](); t[k].append(time.perf_counter() - t0)
m = {k: min(v) * 1e3 for k, v in t.items()}
print(sys.argv[1], " ".join(f"{k}={v:.2f}" for k, v in m.items()),
      f"| bwd ratio eager/fedsq={m['eager autograd bwd']/m['fedsq autograd bwd']:.2f}",
      f"fwd ratio={m['eager gate fwd (alloc)']/m['fedsq gate fwd (alloc)']:.2f}",
      f"kernel ratio={m['eager mul out=']/m['fedsq apply out=']:.2f}")
