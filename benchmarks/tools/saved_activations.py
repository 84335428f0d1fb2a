"""Where a training step's memory goes: the tensors autograd saves for backward, by the
module (or op) that saved them, for plain fine-tuning, the naive two-model DualCopy of
bench_models.py and fedsq_fast's DualCopy.

    python benchmarks/tools/saved_activations.py [--model resnet18] [--batch 64] [--px 32]

A tensor saved twice (the same storage) is counted once. Parameters (weights autograd
saves for the input gradient) are listed apart: they exist whether or not a step runs.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/ (bench_models)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

import fedsq_fast as fs  # noqa: E402
from bench_models import NaiveDualCopy  # noqa: E402
from fedsq_fast.models import build_model  # noqa: E402


def saved_by_layer(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """{(module type, dtype): bytes} of the activations autograd saves in one forward,
    and the bytes of saved parameters; the storage is counted once per distinct tensor."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = ["(top)"]

    def pre(m, _):
        stack.append(type(m).__name__)

    def post(m, _i, _o):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if not list(m.children())]
    handles += [m.register_forward_hook(post) for m in model.modules() if not list(m.children())]
    packed = []

    def pack(t):
        # a detached alias: the tensor itself would tie its grad_fn to the saved copy in a
        # cycle that keeps dead nodes alive (autograd restores the grad_fn on unpack)
        t = t.detach()
        where = stack[-1] if len(stack) > 1 else "function"  # fx call_function: gate sites, adds
        packed.append((where, str(t.dtype).replace("torch.", ""), weakref.ref(t)))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
    finally:
        for h in handles:
            h.remove()
    # what backward will find: a tensor saved by a node that died before the loss (an output
    # a forward hook replaced) is gone by now; each live storage counts once
    by, seen, param_bytes = collections.Counter(), set(), 0
    for where, dt, ref in packed:
        t = ref()
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen or not s.nbytes():
            continue
        seen.add(s.data_ptr())
        if s.data_ptr() in params:
            param_bytes += s.nbytes()
        else:
            by[(where, dt)] += s.nbytes()
    loss.backward()
    return by, param_bytes


def variant(name: str, model_name: str):
    torch.manual_seed(0)
    base = build_model(model_name, num_classes=10)
    if name == "plain":
        return base.train()
    if name == "naive":
        return NaiveDualCopy(base).train()
    return fs.dualcopy(base).train()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--px", type=int, default=32)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.px, a.px, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    totals = {}
    for name in ("plain", "naive", "fedsq"):
        by, pb = saved_by_layer(variant(name, a.model), x, y)
        totals[name] = sum(by.values())
        print(f"\n{a.model} batch {a.batch} {a.px}px, {name}: saved activations {totals[name] / 2**20:.1f} MiB "
              f"(+ {pb / 2**20:.1f} MiB of saved parameters)")
        for (where, dt), b in sorted(by.items(), key=lambda kv: -kv[1]):
            print(f"  {where:<22} {dt:<8} {b / 2**20:8.1f} MiB")
    print(f"\nsaved activations fedsq / naive: {totals['fedsq'] / totals['naive']:.3f}, "
          f"fedsq / plain: {totals['fedsq'] / totals['plain']:.3f}")


if __name__ == "__main__":
    main()
