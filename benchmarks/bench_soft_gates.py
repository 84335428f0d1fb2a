"""Soft-gate kernels (issue 27): the fused ``soft_gate_apply`` against the eager form a user
would write, the gate-store options, and a FedSQ-soft training step against plain fine-tuning.
All variants of a comparison are measured in the same run; ratios in benchmarks/RESULTS.md,
"Soft-gate kernels (issue 27)".

    pytest benchmarks/bench_soft_gates.py --benchmark-only
    FEDSQ_BENCH_THREADS=1 pytest benchmarks/bench_soft_gates.py --benchmark-only   # one thread

- apply: z_q * g(z_s) forward + backward (autograd.grad of z_q), fused (one pass each way, the
  backward recomputes g from z_s) against eager ``z_q * torch.sigmoid(z_s)`` (GELU:
  ``z_q * (0.5 * (1 + torch.erf(z_s / sqrt 2)))``), FEDSQ_BENCH_N fp32 elements (default 16 Mi,
  as the binary gate's benchmark), and the forward alone.
- store: what a soft site keeps for the backward, from the structural pre-activation t to the
  gradient of z_q: g in float32 (exact, 32 bits / activation), g in float16 (16 bits, rounded:
  the forward then differs from the original network by up to 2^-11 relative), or t itself
  with g recomputed by the fused op (exact, 32 bits, nothing besides t).
- step: one SGD step (forward, backward, update) of a small SiLU CNN (conv-BN-SiLU blocks, a
  squeeze-excitation gate, GELU head; 32 px, batch 32): plain fine-tuning of the original,
  FedSQ-soft (``dualcopy(soft_gates=True)``: the fused op), and FedSQ-soft with the eager gate
  (the same model with the op swapped for ``z_q * g``, g from torch's functions).
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _bench
import fedsq_fast as ff
from fedsq_fast import layers, reference as ref

if os.environ.get("FEDSQ_BENCH_THREADS"):  # e.g. 1 on a shared machine: no OpenMP waits on descheduled threads
    torch.set_num_threads(int(os.environ["FEDSQ_BENCH_THREADS"]))
N = int(os.environ.get("FEDSQ_BENCH_N", 16 << 20))
ROUNDS = int(os.environ.get("FEDSQ_BENCH_ROUNDS", 10))
INTERLEAVED_ROUNDS = int(os.environ.get("FEDSQ_BENCH_INTERLEAVED_ROUNDS", 10))
BATCH, PX = 32, 32

EAGER_G = {"sigmoid": torch.sigmoid, "phi": lambda z: 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))}


def _gen(n, seed, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def inputs():
    return _gen(N, 1), _gen(N, 2, 3.0), _gen(N, 3)


def _fused(z_q, z_s, kind, g):
    q = z_q.clone().requires_grad_()

    def f():
        y = ff.soft_gate_apply(q, z_s, kind)
        return torch.autograd.grad(y, q, g)

    return f


def _eager(z_q, z_s, kind, g):
    q = z_q.clone().requires_grad_()

    def f():
        y = q * EAGER_G[kind](z_s)
        return torch.autograd.grad(y, q, g)

    return f


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sigmoid", "phi"])
def test_soft_apply_fused(benchmark, inputs, kind):
    z_q, z_s, g = inputs
    _bench.run(benchmark, f"soft apply fwd+bwd {kind}", "fedsq soft_gate_apply", _fused(z_q, z_s, kind, g), ROUNDS)


@pytest.mark.parametrize("kind", ["sigmoid", "phi"])
def test_soft_apply_eager(benchmark, inputs, kind):
    z_q, z_s, g = inputs
    _bench.run(benchmark, f"soft apply fwd+bwd {kind}", "eager z_q * g(z_s)", _eager(z_q, z_s, kind, g), ROUNDS)


@pytest.mark.parametrize("kind", ["sigmoid", "phi"])
def test_soft_forward_fused(benchmark, inputs, kind):
    z_q, z_s, _ = inputs
    _bench.run(benchmark, f"soft apply fwd {kind}", "fedsq soft_gate_apply",
               lambda: ff.soft_gate_apply(z_q, z_s, kind), ROUNDS)


@pytest.mark.parametrize("kind", ["sigmoid", "phi"])
def test_soft_forward_eager(benchmark, inputs, kind):
    z_q, z_s, _ = inputs
    _bench.run(benchmark, f"soft apply fwd {kind}", "eager z_q * g(z_s)", lambda: z_q * EAGER_G[kind](z_s), ROUNDS)


for _k in ("sigmoid", "phi"):
    _bench.ratio(f"soft {_k} fwd+bwd vs eager (both allocate)", f"soft apply fwd+bwd {_k}",
                 "fedsq soft_gate_apply", "eager z_q * g(z_s)", 2.0)
    _bench.ratio(f"soft {_k} fwd vs eager (both allocate)", f"soft apply fwd {_k}",
                 "fedsq soft_gate_apply", "eager z_q * g(z_s)", 2.0)


# ---------------------------------------------------------------------------
# the gate store: from t (the structural pre-activation) to grad z_q, per option
def _store_variants(z_q, t, g_out):
    q = z_q.clone().requires_grad_()

    def store_g32():
        g = torch.sigmoid(t)  # the structural site writes g (kept for the backward)
        y = q * g
        return torch.autograd.grad(y, q, g_out)

    def store_g16():
        g16 = torch.sigmoid(t).half()  # rounded store: 2 bytes / activation
        y = q * g16  # computed in float32 (type promotion), no float copy of g16
        return torch.autograd.grad(y, q, g_out)

    def store_pre():
        y = ff.soft_gate_apply(q, t, "sigmoid")  # t kept; g recomputed in the backward
        return torch.autograd.grad(y, q, g_out)

    return {"g float32 (exact, 32 bit)": store_g32, "g float16 (2^-11 rel., 16 bit)": store_g16,
            "z_s + recompute (exact, 32 bit)": store_pre}


@pytest.mark.parametrize("option", ["g float32 (exact, 32 bit)", "g float16 (2^-11 rel., 16 bit)",
                                    "z_s + recompute (exact, 32 bit)"])
def test_gate_store(benchmark, inputs, option):
    z_q, z_s, g = inputs
    _bench.run(benchmark, "gate store (sigmoid) t -> grad z_q", option, _store_variants(z_q, z_s, g)[option], ROUNDS)


# ---------------------------------------------------------------------------
# training step
class SiluNet(nn.Module):
    """A small EfficientNet-like CNN: conv-BN-SiLU blocks, a squeeze-excitation gate, a GELU head."""

    def __init__(self, classes=10):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU())
        self.b2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.SiLU())
        self.b3 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)
        self.b4 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.SiLU())
        self.fc1, self.fc2 = nn.Linear(128, 128), nn.Linear(128, classes)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(x)))
        s = torch.sigmoid(self.se2(F.silu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = self.b4(x * s)
        return self.fc2(F.gelu(self.fc1(x.mean((2, 3)))))


def _eager_soft_gate_apply(z_q, z_s, kind, *, out=None):
    """The eager gate the kernels replace: z_q * g(z_s), g from torch's functions (autograd saves g)."""
    return z_q * ref.soft_gate_values(z_s, kind)


def make_step(variant):
    torch.manual_seed(0)
    model = SiluNet().eval()
    with torch.no_grad():  # pretrained-like BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(4 * BATCH, 3, PX, PX, generator=g), torch.randint(0, 10, (4 * BATCH,), generator=g)
    net = model.train() if variant == "plain" else ff.dualcopy(model, soft_gates=True).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    state = {"b": 0}
    eager = variant == "fedsq-soft eager gate"

    def step():
        b = state["b"] = (state["b"] + 1) % 4
        x, y = xs[b * BATCH:(b + 1) * BATCH], ys[b * BATCH:(b + 1) * BATCH]
        saved = layers.ops.soft_gate_apply
        if eager:
            layers.ops.soft_gate_apply = _eager_soft_gate_apply
        try:
            out = net(x)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(out, y).backward()
        finally:
            layers.ops.soft_gate_apply = saved
        opt.step()

    return step


STEP_VARIANTS = ("plain", "fedsq-soft", "fedsq-soft eager gate")


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_train_step(benchmark, variant):
    step = make_step(variant)
    step()
    _bench.run(benchmark, f"SiLU CNN step {PX}px batch {BATCH}", variant, step, ROUNDS)


_bench.ratio("FedSQ-soft step vs plain fine-tuning (<= 1.35x plain, the binary bar)",
             f"SiLU CNN step {PX}px batch {BATCH}", "fedsq-soft", "plain", 1 / 1.35)
_bench.ratio("FedSQ-soft step: fused op vs eager gate", f"SiLU CNN step {PX}px batch {BATCH}",
             "fedsq-soft", "fedsq-soft eager gate", 1.0)


# ---------------------------------------------------------------------------
# Interleaved cross-check (_bench.interleaved): each round times every variant of a comparison back
# to back.
def test_interleaved_cross_check(benchmark, inputs):
    z_q, z_s, g = inputs
    comparisons = {}
    for kind in ("sigmoid", "phi"):
        comparisons[f"soft {kind} fwd+bwd: eager / fedsq (target >= 2)"] = {
            "a": _fused(z_q, z_s, kind, g), "b": _eager(z_q, z_s, kind, g)}
        comparisons[f"soft {kind} fwd: eager / fedsq (target >= 2)"] = {
            "a": lambda kind=kind: ff.soft_gate_apply(z_q, z_s, kind), "b": lambda kind=kind: z_q * EAGER_G[kind](z_s)}
    st = _store_variants(z_q, z_s, g)
    comparisons["store: g float32 / z_s + recompute"] = {"a": st["z_s + recompute (exact, 32 bit)"],
                                                         "b": st["g float32 (exact, 32 bit)"]}
    comparisons["store: g float16 / z_s + recompute"] = {"a": st["z_s + recompute (exact, 32 bit)"],
                                                         "b": st["g float16 (2^-11 rel., 16 bit)"]}
    steps = {v: make_step(v) for v in STEP_VARIANTS}
    comparisons["step: plain / fedsq-soft (>= 0.74 is within 1.35x)"] = {"a": steps["fedsq-soft"], "b": steps["plain"]}
    comparisons["step: fedsq-soft eager gate / fedsq-soft"] = {"a": steps["fedsq-soft"],
                                                               "b": steps["fedsq-soft eager gate"]}

    def run_all():
        for label, fns in comparisons.items():
            t = _bench.interleaved(fns, INTERLEAVED_ROUNDS)
            _bench.INTERLEAVED[label] = (t["b"] / t["a"], t["a"], t["b"])

    benchmark.group = "interleaved soft gates"
    benchmark.pedantic(run_all, rounds=1, iterations=1)


def test_soft_gate_memory_per_activation(benchmark):
    """Bits a site saves per activation element for the backward (saved_tensors_hooks), soft
    beside binary: a count (the timed body is the count itself)."""
    z_s, z_q = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16, requires_grad=True)
    counts = {}

    def count():
        for kind in ("silu", "relu"):
            _, m = layers.struct_site(z_s.clone(), kind=kind)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                layers.quant_site(z_q, m, kind)
            counts[kind] = sum(t.numel() * t.element_size() for t in saved) * 8 / z_s.numel()

    benchmark.pedantic(count, rounds=1, iterations=1)
    assert counts == {"silu": 32.0, "relu": 1.0}
    _bench.EXTRA["Soft-gate store, bits per activation saved for the backward"] = (
        f"- soft (SiLU, float32, store z_s): {counts['silu']:.0f} bits\n- binary (ReLU): {counts['relu']:.0f} bit\n")
