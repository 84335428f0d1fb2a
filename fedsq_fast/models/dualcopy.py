"""``dualcopy(model)``: a FedSQ DualCopy model from any traceable ReLU network.

Two torch.fx graphs are built from the model:

* structural (frozen, eval, no grad): BatchNorm folded into the epilogue of the
  conv/linear before each gated activation (or into the conv weights where no
  activation follows), every gated activation replaced by ``struct_site``
  (``struct_epilogue``: activation + packed bits in one pass), and the graph
  cut after the last gate (the head needs no structural copy). Its weights are
  buffers, so they are not ``parameters()``, never get gradients, and are not
  part of ``quantitative_state_dict()``.
* quantitative (trained): the model itself, every gated activation replaced by
  ``quant_site`` (``apply_mask`` with that site's bits); BatchNorm trains
  normally. fx evaluates ``self.training`` at trace time, so this copy is traced
  in eval and in train mode; when the two differ (drop-path as a function,
  ``F.dropout(x, p, self.training)``, ``if self.training:``) it keeps both and
  runs the one of its current mode (:class:`QuantGraphModule`).

What cannot be converted faithfully is refused at conversion, naming the site:
a gate site that runs in one mode only (a train-only auxiliary head), a random
number drawn at trace time, data-dependent control flow.

Layout: :mod:`.trace` finds the gate sites (tracing, classification, refusals),
:mod:`.quant` builds the quantitative copy, this module the structural copy, the
:class:`DualCopyModel` and its files.
"""
from __future__ import annotations

import copy
import json
import operator
import os
import tempfile

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..layers import fold_bias_bn, struct_site
from .quant import QuantGraphModule, _build_quantitative
from .trace import (GATEABLE, UNSUPPORTED_ACTIVATIONS, GateSite, _maxpool_args, _sites, _struct_maxpool,
                    _trace)

__all__ = [
    "dualcopy",
    "DualCopyModel",
    "GateSite",
    "save_dualcopy",
    "load_dualcopy",
    "replace_head",
    "QuantGraphModule",
    "UNSUPPORTED_ACTIVATIONS",
    "TrainModeGateWarning",
]

# ---------------------------------------------------------------------------
def replace_head(model: nn.Module, num_classes: int, head: str | None = None) -> str:
    """Replace the classifier head (``head``: module path; default the last
    nn.Linear) with a fresh ``nn.Linear(in_features, num_classes)``; returns its path."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    mods = dict(model.named_modules())
    if head is None:
        linears = [n for n, m in mods.items() if type(m) is nn.Linear]
        if not linears:
            raise ValueError("model has no nn.Linear head; pass head='path.to.module'")
        head = linears[-1]
    if head not in mods or type(mods[head]) is not nn.Linear:
        raise ValueError(f"head must name an nn.Linear submodule, got {head!r}")
    old = mods[head]
    new = nn.Linear(old.in_features, num_classes, old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = head.rpartition(".")
    setattr(mods[parent_name] if parent_name else model, attr, new)
    return head


def _params_to_buffers(module: nn.Module) -> None:
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            del m._parameters[name]
            m.register_buffer(name, None if p is None else p.detach().clone())


_FRESH_FUNCS = {operator.add, operator.iadd, torch.add}
# Layers whose bias (and a BatchNorm after them) fold into a gate site's epilogue, with
# the channel dim of their output (layers.struct_site's ``cdim``): the last for Linear
# (it takes any rank), -(N+1) for ConvNd (dim 1 batched, dim 0 unbatched).
_AFFINE = {nn.Linear: -1, nn.Conv1d: -2, nn.Conv2d: -3, nn.Conv3d: -4}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _affine_cdim(m):
    """The output channel dim of an affine layer (see _AFFINE), or None."""
    return next((c for t, c in _AFFINE.items() if isinstance(m, t)), None)


def _const(gm, graph, name, value):
    gm.register_buffer(name, value)
    return graph.get_attr(name)


def _fold_conv_bn(gm):
    modules = dict(gm.named_modules())
    calls = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or type(modules[n.target]) is not nn.BatchNorm2d:
            continue
        bn = modules[n.target]
        c = n.args[0]
        if (c.op == "call_module" and type(modules[c.target]) is nn.Conv2d and len(c.users) == 1
                and calls[c.target] == 1 and calls[n.target] == 1 and bn.running_var is not None):
            fused = fuse_conv_bn_eval(modules[c.target].eval(), bn.eval())
            parent, _, attr = c.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
            n.replace_all_uses_with(c)
            gm.graph.erase_node(n)


def _build_structural(model, gate, gate_maxpool, allow_ungated, leaf_modules, soft=False):
    root = copy.deepcopy(model).eval()
    gm = _trace(root, leaf_modules, "eval")
    modules = dict(gm.named_modules())
    sites = _sites(gm.graph, modules, gate, gate_maxpool, allow_ungated, soft)
    graph = gm.graph
    calls = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    entries = []
    for i, (node, site) in enumerate(sites):
        inp = node.args[0]
        if site.kind == "maxpool":
            args = (inp, *_maxpool_args(node, modules))
            fn = _struct_maxpool
            kw = {}
        else:
            scale = shift = None
            bn = None
            # affine [-> eval BN] -> act: bias and BN go into the epilogue.
            if (inp.op == "call_module" and isinstance(modules[inp.target], _BN)
                    and len(inp.users) == 1 and calls[inp.target] == 1
                    and modules[inp.target].running_var is not None):
                bn, inp_bn = modules[inp.target], inp
                inp = inp.args[0]
            cdim = _affine_cdim(modules[inp.target]) if inp.op == "call_module" else None
            aff = cdim is not None and len(inp.users) == 1 and calls[inp.target] == 1
            split = None
            if aff:
                lin = modules[inp.target]
                scale, shift, split = fold_bias_bn(lin.bias, bn)
                lin.bias = None
                if bn is not None:
                    inp_bn.replace_all_uses_with(inp)
                    graph.erase_node(inp_bn)
            elif bn is not None:
                inp = inp_bn  # BN without a conv before it: leave it as is
            fresh = aff or (inp.op == "call_module" and isinstance(modules[inp.target], _BN)) \
                or (inp.op == "call_function" and inp.target in _FRESH_FUNCS)
            fresh = fresh and len(inp.users) == 1
            with graph.inserting_before(node):
                s_node = None if scale is None else _const(gm, graph, f"_fedsq_scale_{i}", scale)
                t_node = None if shift is None else _const(gm, graph, f"_fedsq_shift_{i}", shift)
                if split is not None:  # bias and BN apart, for input ranks where their dims differ
                    split = (None if split[0] is None else _const(gm, graph, f"_fedsq_bias_{i}", split[0]),
                             s_node, _const(gm, graph, f"_fedsq_bnshift_{i}", split[2]))
            args = (inp, s_node, t_node, site.kind, site.p1, site.p2, fresh, cdim if aff else 1, split)
            fn = struct_site
            kw = {}
        with graph.inserting_before(node):
            call = graph.call_function(fn, args, kw)
            h = graph.call_function(operator.getitem, (call, 0))
            e = graph.call_function(operator.getitem, (call, 1))
        node.replace_all_uses_with(h)
        graph.erase_node(node)
        entries.append(e)
    # Cut the graph after the last gate: the output is the list of site masks.
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        graph.output(tuple(entries))
    graph.erase_node(out)
    graph.eliminate_dead_code()
    # Remaining conv -> BN pairs (no activation after them): fold BN into weights.
    _fold_conv_bn(gm)
    graph.lint()
    gm = fx.GraphModule(gm, graph)
    _params_to_buffers(gm)
    gm.eval()
    return gm, [s for _, s in sites]


class TrainModeGateWarning(UserWarning):
    """dualcopy: some gate sites are fed by train-only randomness (see ``random_fed_sites``)."""


# ---------------------------------------------------------------------------
class DualCopyModel(nn.Module):
    """A FedSQ DualCopy model (build it with :func:`dualcopy`).

    ``forward(x, sample_idx=None)``: x is a Tensor (both copies see it) or a
    pair ``(x_q, x_s)``. With ``sample_idx`` (one int per row) and an attached
    :class:`~fedsq_fast.MaskCache` the structural masks come from the cache.

    Attributes: ``structural`` (frozen fx graph, buffers only, always eval),
    ``quantitative`` (the trained copy, a :class:`QuantGraphModule`: one graph,
    or a train and an eval graph), ``sites`` (list of GateSite),
    ``config`` (the options dualcopy was called with), ``mask_cache``.
    """

    def __init__(self, structural, quantitative, sites, config):
        super().__init__()
        self.structural = structural
        self.quantitative = quantitative
        self.sites = list(sites)
        self.config = dict(config)
        self.mask_cache = None
        self.random_fed_sites = []  # gate sites fed by train-only randomness (set by dualcopy)
        self._record = None  # set by gate_stability to capture quantitative regimes
        self.structural.eval()

    # -- modes ---------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.structural.eval()  # its masks depend on the input alone
        if mode and self.config.get("quant_bn") == "frozen":
            for m in self.quantitative.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward -------------------------------------------------------------
    @torch.no_grad()
    def structural_masks(self, x_s: torch.Tensor):
        """The per-site masks for a batch (runs the structural graph)."""
        self.structural.eval()
        return list(self.structural(x_s))

    def forward(self, x, sample_idx=None, *, masks=None):
        if isinstance(x, torch.Tensor):
            x_q = x_s = x
        elif isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
            x_q, x_s = x
            if x_q.shape != x_s.shape:
                raise ValueError(f"x = (x_q, x_s) must have the same shape, got {tuple(x_q.shape)} and "
                                 f"{tuple(x_s.shape)}")
        else:
            raise TypeError(f"x must be a Tensor or a pair (x_q, x_s), got {type(x).__name__}")
        if masks is None:
            if sample_idx is not None:
                if self.mask_cache is None:
                    raise ValueError("sample_idx was given but no MaskCache is attached: "
                                     "model.attach_cache(MaskCache(...)) first")
                masks = self.mask_cache.masks(self, x_s, sample_idx)
            else:
                masks = self.structural_masks(x_s)
        elif len(masks) != len(self.sites):
            raise ValueError(f"masks must hold {len(self.sites)} site entries, got {len(masks)}")
        return self.quantitative(x_q, masks)

    def attach_cache(self, cache):
        """Attach a MaskCache (or None to detach); returns self."""
        from .cache import MaskCache

        if cache is not None and not isinstance(cache, MaskCache):
            raise TypeError(f"cache must be a MaskCache or None, got {type(cache).__name__}")
        if cache is not None:
            cache.bind(self)
        self.mask_cache = cache
        return self

    # -- state ---------------------------------------------------------------
    def quantitative_state_dict(self):
        """What a client sends: quantitative parameters and buffers (BN running
        statistics, num_batches_tracked), keyed as in the original model."""
        return self.quantitative.state_dict()

    def load_quantitative_state_dict(self, state_dict, strict: bool = True):
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
        own = self.quantitative.state_dict()
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict[{k!r}] must be a Tensor, got {type(v).__name__}")
            if k in own and own[k].shape != v.shape:
                raise ValueError(
                    f"state_dict[{k!r}] has shape {tuple(v.shape)}, this model's quantitative copy "
                    f"has {tuple(own[k].shape)}: a state of another architecture?"
                )
        if strict:
            missing = [k for k in own if k not in state_dict]
            extra = [k for k in state_dict if k not in own]
            if missing or extra:
                raise ValueError(
                    "state_dict does not match this model's quantitative copy (another architecture?): "
                    f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}"
                )
        return self.quantitative.load_state_dict(state_dict, strict=strict)

    @torch.no_grad()
    def set_structural_from_quantitative(self) -> None:
        """Replace the frozen structural copy by the current quantitative weights
        (the paper review's ablation: unfreeze/refresh the gates). The gate
        sites stay the same; an attached MaskCache is detached, because its
        masks belong to the old structural copy."""
        template = getattr(self, "_template", None)
        if template is None:
            raise ValueError("this DualCopyModel was not built by dualcopy() in this process "
                             "(no architecture template): rebuild it with dualcopy()")
        arch, leaf_modules = template
        plain = copy.deepcopy(arch).to_empty(device="cpu")
        plain.load_state_dict({k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
                               for k, v in self.quantitative.state_dict().items()})
        cfg = self.config
        structural, sites = _build_structural(plain, cfg["gate"], cfg["gate_maxpool"], cfg["allow_ungated"],
                                              leaf_modules, cfg.get("soft_gates", False))
        if sites != self.sites:
            raise RuntimeError("internal: the rebuilt structural copy has other gate sites")
        ref = next(iter(self.structural.buffers()), None)
        if ref is not None:
            structural = structural.to(device=ref.device)
            if ref.is_floating_point() and ref.dtype != torch.float32:
                structural = structural.to(dtype=ref.dtype)
        self.structural = structural.eval()
        if self.mask_cache is not None:
            self.mask_cache = None

    def structural_fingerprint(self) -> str:
        """A short hash of the structural copy (masks are valid for exactly it)."""
        import hashlib

        h = hashlib.sha256()
        for k, v in self.structural.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def dualcopy(
    model: nn.Module,
    *,
    gate=GATEABLE,
    gate_maxpool: bool = False,
    quant_bn: str = "train",
    num_classes: int | None = None,
    head: str | None = None,
    allow_ungated: bool = False,
    copy_model: bool = True,
    leaf_modules=(),
    soft_gates: bool = False,
) -> DualCopyModel:
    """Turn ``model`` into a FedSQ DualCopy model (both copies start equal).

    gate: activation kinds that are gated (subset of 'relu', 'relu6', 'hardtanh',
      'leaky_relu'; 'relu' always). Kinds left out stay ordinary activations in
      both copies. DEFAULT (ours): all four.
    gate_maxpool: max-pool positions follow the structural copy (DEFAULT off).
    quant_bn: 'train' (DEFAULT: quantitative BN trains normally) or 'frozen'
      (quantitative BN always uses its running statistics; affine still trains).
      The structural BN is always eval with its pretrained statistics.
    num_classes / head: replace the classifier head (default: the last nn.Linear).
    allow_ungated: keep smooth activations (GELU, SiLU, ...) ungated instead of raising.
    copy_model: deep-copy the quantitative copy (DEFAULT True); False reuses
      ``model``'s modules (saves memory; training then changes ``model``).
    leaf_modules: module types fx should not trace into.
    soft_gates: also gate SiLU, GELU (exact, tanh), Hardswish and Mish as
      ``y_q = z_q * g(z_s)`` (g = sigmoid, Phi, hardsigmoid, tanh(softplus)) and
      Sigmoid/Hardsigmoid whose output multiplies a feature map (squeeze-excitation)
      as ``y_q = g(s_s)``; g from the structural copy, no gradient through it.
      Beyond the paper (binary gates only): DEFAULT False, which converts exactly as
      before. See docs/models.md, "Soft gates".

    Train-only logic is kept: the converted model equals ``model`` in eval mode,
    and in train mode its dropout / stochastic depth / ``if self.training:``
    branches run (on the quantitative copy; the structural copy is always eval),
    whatever mode ``model`` was in. Raises ValueError, naming the site, where
    that cannot be done (see docs/models.md, "Train-only logic").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DualCopyModel):
        raise ValueError("model is already a DualCopyModel")
    if isinstance(gate, str):
        gate = (gate,)
    gate = tuple(gate)
    bad = [g for g in gate if g not in GATEABLE]
    if bad:
        raise ValueError(f"gate must be a subset of {GATEABLE}, got {bad}")
    if "relu" not in gate:
        raise ValueError("gate must include 'relu' (FedSQ always gates ReLU)")
    if quant_bn not in ("train", "frozen"):
        raise ValueError(f"quant_bn must be 'train' or 'frozen', got {quant_bn!r}")
    if not isinstance(gate_maxpool, bool):
        raise TypeError(f"gate_maxpool must be a bool, got {type(gate_maxpool).__name__}")
    if not isinstance(soft_gates, bool):
        raise TypeError(f"soft_gates must be a bool, got {type(soft_gates).__name__}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    leaf_modules = tuple(leaf_modules)
    was_training = model.training
    structural, sites = _build_structural(model, gate, gate_maxpool, allow_ungated, leaf_modules, soft_gates)
    qmodel = copy.deepcopy(model) if copy_model else model
    if num_classes is not None:
        head = replace_head(qmodel, num_classes, head)
    quantitative = _build_quantitative(qmodel, sites, gate, gate_maxpool, allow_ungated, leaf_modules, quant_bn,
                                       soft_gates)
    config = dict(gate=gate, gate_maxpool=gate_maxpool, quant_bn=quant_bn, num_classes=num_classes,
                  head=head, allow_ungated=allow_ungated, soft_gates=soft_gates, arch=type(model).__name__)
    for attr in ("input_size", "input_channels", "input_mean", "input_std"):
        if hasattr(model, attr):
            config[attr] = getattr(model, attr)
    dc = DualCopyModel(structural, quantitative, sites, config)
    dc.random_fed_sites = list(getattr(quantitative, "random_fed_sites", []))
    if dc.random_fed_sites:
        import warnings

        n = len(dc.random_fed_sites)
        warnings.warn(
            f"dualcopy: {n} gate site(s) of {type(model).__name__} are fed by train-only randomness (dropout or "
            f"stochastic depth before the activation: {', '.join(dc.random_fed_sites[:3])}{', ...' if n > 3 else ''}; "
            "all in dc.random_fed_sites). In train mode their gates come from the structural copy, which is eval "
            "and noise-free, so the DualCopy model's train-mode output differs from the original's there: FedSQ's "
            "fixed gates, not a conversion error (docs/models.md, 'Train-only logic'). Eval mode is exact.",
            TrainModeGateWarning, stacklevel=2)
    # The architecture without gate rewrites, on the meta device (no memory):
    # set_structural_from_quantitative() rebuilds the structural copy from it.
    dc._template = [copy.deepcopy(qmodel).to("meta") if copy_model else None, leaf_modules]
    if not copy_model:
        dc._template[0] = copy.deepcopy(model).to("meta")
    return dc.train(was_training)


# ---------------------------------------------------------------------------
# Full state (both copies) with safetensors; atomic write.
def save_dualcopy(model: DualCopyModel, path) -> None:
    """Save both copies (and the config) to a .safetensors file atomically."""
    from safetensors.torch import save_file

    if not isinstance(model, DualCopyModel):
        raise TypeError(f"model must be a DualCopyModel, got {type(model).__name__}")
    path = os.fspath(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "fedsq_fast.dualcopy/1",
            "config": json.dumps(model.config, default=str),
            "sites": json.dumps([s.__dict__ for s in model.sites])}
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_dualcopy(model: DualCopyModel, path, strict: bool = True) -> DualCopyModel:
    """Load a file written by :func:`save_dualcopy` into a DualCopyModel built the
    same way (``dualcopy(arch(), ...)``); checks the gate sites match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not isinstance(model, DualCopyModel):
        raise TypeError(f"model must be a DualCopyModel, got {type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "fedsq_fast.dualcopy/1":
        raise ValueError(f"{path!r} is not a fedsq_fast DualCopy file (format={meta.get('format')!r})")
    saved_sites = json.loads(meta["sites"])
    own_sites = [s.__dict__ for s in model.sites]
    if saved_sites != own_sites:
        raise ValueError(f"{path!r} has {len(saved_sites)} gate sites that differ from this model's "
                         f"{len(own_sites)}: another architecture or other gate options")
    sd = load_file(path)
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{path!r}: {k!r} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=strict)
    return model
