"""Gate stability probe (mask-evolution analysis).

``gate_stability(a, b, probe_batch)`` -> {site name: fraction of gates that
differ}. A gate "differs" when the activation regime differs (on/off for ReLU
and LeakyReLU; off/linear/clipped for ReLU6/Hardtanh).

Soft gate sites (``soft_gates=True``): the mean absolute gate difference,
``mean |g_a - g_b|`` over the site's elements (for the DualCopy probe
``mean |g(z_q) - g(z_s)|``), in [0, 1] since every soft gate lies in [0, 1]. For
0/1 gates this is exactly the fraction that differs, so both read alike: 0 for
gates that did not move, 1 for gates that all flipped from 0 to 1 or back.

* ``gate_stability(dc, None, x)`` for a DualCopyModel: structural gates vs the
  gates the quantitative copy's own pre-activations would choose.
* ``gate_stability(a, b, x)``: two versions of a network (plain modules or
  DualCopy models; a DualCopy model contributes its quantitative gates).
Both models run in eval mode (restored afterwards).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import struct_site
from .dualcopy import DualCopyModel, dualcopy

__all__ = ["gate_stability"]

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _quant_codes(dc: DualCopyModel, x):
    """(structural masks, quantitative masks) of a DualCopy model on x."""
    s_masks = dc.structural_masks(x)
    rec = []

    def hook(z_q, kind, p1, p2):
        _, m = struct_site(z_q.detach().clone(), None, None, kind, p1, p2)
        rec.append(m)

    import fedsq_fast.layers as L

    orig = L.quant_site

    def recording(z_q, masks, kind="relu", p1=0.0, p2=0.0):
        hook(L._match(z_q, masks), kind, p1, p2)
        return orig(z_q, masks, kind, p1, p2)

    # quant_site is called by the compiled graph(s) through their globals (one
    # dict per graph; a model whose forward depends on the mode has two): swap it there.
    swaps = [(g, k) for g in dc.quantitative.code_globals() for k, v in list(g.items()) if v is orig]
    if not swaps:
        raise RuntimeError("internal: quant_site not found in the quantitative graph")
    for g, k in swaps:
        g[k] = recording
    try:
        with torch.no_grad():
            dc.quantitative(x, s_masks)
    finally:
        for g, k in swaps:
            g[k] = orig
    gated = [m for s, m in zip(dc.sites, s_masks) if s.kind != "maxpool"]
    return gated, rec


def _codes(model, x, soft_gates=False):
    if isinstance(model, DualCopyModel):
        return _quant_codes(model, x)[1], [s.name for s in model.sites if s.kind != "maxpool"]
    dc = dualcopy(model, copy_model=True, soft_gates=soft_gates)
    return dc.structural_masks(x), [s.name for s in dc.sites if s.kind != "maxpool"]


def _diff_fraction(m1, m2):
    if m1.soft or m2.soft:
        if not (m1.soft and m2.soft):
            raise ValueError("model_a and model_b gate a site differently (soft vs binary): "
                             "not two versions of one network")
        g1, g2 = m1.gate, m2.gate  # computed once (a pre-activation site computes g on access)
        return float((g1.double() - g2.double()).abs().mean()) if g1.numel() else 0.0
    x = None
    for a, b in zip(m1.bits, m2.bits):
        d = (a ^ b).cpu()
        x = d if x is None else x | d
    return float(_POPCOUNT[x.long()].sum()) / m1.numel


def gate_stability(model_a: nn.Module, model_b: nn.Module | None, probe_batch: torch.Tensor) -> dict:
    """{site name: how much the gates differ} on ``probe_batch``: the fraction of regimes
    that differ at a binary site, ``mean |g_a - g_b|`` at a soft site (see the module
    docstring). ``model_b=None``: a DualCopy model's structural gates against those its
    quantitative pre-activations would choose."""
    if not isinstance(model_a, nn.Module):
        raise TypeError(f"model_a must be an nn.Module, got {type(model_a).__name__}")
    if model_b is not None and not isinstance(model_b, nn.Module):
        raise TypeError(f"model_b must be an nn.Module or None, got {type(model_b).__name__}")
    if not isinstance(probe_batch, torch.Tensor) or not probe_batch.is_floating_point():
        raise TypeError("probe_batch must be a floating-point Tensor")
    if model_b is None and not isinstance(model_a, DualCopyModel):
        raise ValueError("model_b may be None only when model_a is a DualCopyModel")
    models = [m for m in (model_a, model_b) if m is not None]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            if model_b is None:
                s, q = _quant_codes(model_a, probe_batch)
                names = [x.name for x in model_a.sites if x.kind != "maxpool"]
                return {n: _diff_fraction(a, b) for n, a, b in zip(names, s, q)}
            # a plain model is probed with the gates of the DualCopy model beside it
            soft = any(getattr(m, "config", {}).get("soft_gates", False) for m in models
                       if isinstance(m, DualCopyModel))
            ca, names = _codes(model_a, probe_batch, soft)
            cb, names_b = _codes(model_b, probe_batch, soft)
    finally:
        for m, t in zip(models, modes):
            m.train(t)
    if len(ca) != len(cb) or any(a.numel != b.numel or len(a.bits) != len(b.bits)
                                 or a.soft != b.soft for a, b in zip(ca, cb)):
        raise ValueError(f"model_a and model_b have different gate sites ({len(ca)} vs {len(cb)} "
                         "or different shapes): not two versions of one network")
    return {n: _diff_fraction(a, b) for n, a, b in zip(names, ca, cb)}
