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
"""
from __future__ import annotations

import copy
import json
import operator
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..layers import SiteMasks, activation_kind, quant_site, struct_site

__all__ = [
    "dualcopy",
    "DualCopyModel",
    "GateSite",
    "save_dualcopy",
    "load_dualcopy",
    "replace_head",
    "QuantGraphModule",
    "UNSUPPORTED_ACTIVATIONS",
]

GATEABLE = ("relu", "relu6", "hardtanh", "leaky_relu")

# Smooth or learnable activations: no finite regime code, so no FedSQ gate.
_UNSUPPORTED_MODULES = (
    nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.PReLU, nn.RReLU, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.GLU,
)
_UNSUPPORTED_FUNCS = {
    F.gelu, F.silu, torch.tanh, torch.sigmoid, F.elu, F.selu, F.celu, F.softplus, F.mish,
    F.hardswish, F.hardsigmoid, F.prelu, F.rrelu, F.softsign, F.tanhshrink, F.logsigmoid,
    F.threshold, F.glu, torch.nn.functional.tanh, torch.nn.functional.sigmoid,
}
_UNSUPPORTED_METHODS = {"tanh", "sigmoid", "tanh_", "sigmoid_"}
UNSUPPORTED_ACTIVATIONS = tuple(m.__name__ for m in _UNSUPPORTED_MODULES)


@dataclass(frozen=True)
class GateSite:
    """One gate site: ``name`` (module path, ``#k`` for the k-th reuse, or the
    fx node name), ``kind`` ('relu' | 'leaky_relu' | 'hardtanh' | 'maxpool'),
    ``p1``/``p2`` (slope, or min/max)."""

    name: str
    kind: str
    p1: float = 0.0
    p2: float = 0.0


# ---------------------------------------------------------------------------
# Recognising activation nodes.
def _arg(node, pos, key, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


def _classify(node, modules):
    """(kind, p1, p2, label) for an activation node, ('unsupported', .., label), or None."""
    if node.op == "call_module":
        m = modules[node.target]
        k = activation_kind(m)
        if k is not None:
            return (*k, type(m).__name__)
        if isinstance(m, _UNSUPPORTED_MODULES):
            return ("unsupported", 0.0, 0.0, type(m).__name__)
        return None
    if node.op == "call_function":
        f = node.target
        if f in (F.relu, torch.relu, torch.relu_, F.relu_):
            return ("relu", 0.0, 0.0, "relu")
        if f is F.relu6:
            return ("hardtanh", 0.0, 6.0, "relu6")
        if f in (F.hardtanh, F.hardtanh_):
            return ("hardtanh", float(_arg(node, 1, "min_val", -1.0)),
                    float(_arg(node, 2, "max_val", 1.0)), "hardtanh")
        if f in (F.leaky_relu, F.leaky_relu_):
            return ("leaky_relu", float(_arg(node, 1, "negative_slope", 0.01)), 0.0, "leaky_relu")
        if f in _UNSUPPORTED_FUNCS:
            return ("unsupported", 0.0, 0.0, getattr(f, "__name__", str(f)))
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return ("relu", 0.0, 0.0, "relu")
        if node.target in _UNSUPPORTED_METHODS:
            return ("unsupported", 0.0, 0.0, node.target)
    return None


def _option_name(kind, p1, p2):
    if kind == "hardtanh":
        return "relu6" if (p1, p2) == (0.0, 6.0) else "hardtanh"
    return kind


def _is_maxpool(node, modules):
    if node.op == "call_module":
        return type(modules[node.target]) is nn.MaxPool2d
    return node.op == "call_function" and node.target is F.max_pool2d


def _maxpool_args(node, modules):
    if node.op == "call_module":
        m = modules[node.target]
        return (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    ks = _arg(node, 1, "kernel_size", None)
    return (ks, _arg(node, 2, "stride", None) or ks, _arg(node, 3, "padding", 0),
            _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False))


@torch.no_grad()
def _struct_maxpool(x, k, s, p, d, ceil):
    y, idx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    return y, SiteMasks((idx,), False)


def _quant_maxpool(z, m: SiteMasks):
    """Pool z at the positions the structural copy chose."""
    idx = m.bits[0]
    n, c = idx.shape[:2]
    return z.reshape(n, c, -1).gather(2, idx.reshape(n, c, -1)).view(idx.shape)


class _LeafTracer(fx.Tracer):
    """fx tracer that does not enter ``leaf_types`` (module level: graphs pickle).

    ``reuse``: [(name, tensor)] constants an earlier trace of the same root stored
    (``_tensor_constant0``, ...). A constant the forward creates again with the
    same value takes the earlier name instead of a fresh one, so a second trace of
    a forward that does not depend on the mode gives the same code."""

    def __init__(self, leaf_types=(), reuse=()):
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self._reuse = list(reuse)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def create_arg(self, a):
        if (self._reuse and isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)
                and self.tensor_attrs.get(a) is None):
            name, old = self._reuse[0]
            if (type(old) is type(a) and old.dtype == a.dtype and old.shape == a.shape
                    and old.device == a.device and torch.equal(old, a)):
                self._reuse.pop(0)
                self.tensor_attrs[a] = name
        return super().create_arg(a)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _is_user_file(filename):
    f = os.path.abspath(filename)
    return not f.startswith(_TORCH_DIR) and f != _THIS_FILE and not filename.startswith("<eval_with_key")


def _user_frame_of_tb(tb):
    """'file:line (source)' of the innermost traceback frame outside torch and this file."""
    import traceback

    frames = [f for f in traceback.extract_tb(tb) if _is_user_file(f.filename)]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}" + (f" ({f.line.strip()})" if f.line else "")


def _rng_states():
    import random

    st = [torch.default_generator.get_state(), random.getstate()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st.append(torch.cuda.get_rng_state())
    return st


def _set_rng_states(st):
    import random

    torch.default_generator.set_state(st[0])
    random.setstate(st[1])
    if len(st) > 2:
        torch.cuda.set_rng_state(st[2])


def _rng_changed(a, b):
    return any((not torch.equal(x, y)) if isinstance(x, torch.Tensor) else x != y for x, y in zip(a, b))


def _locate_rng_draw(run):
    """Re-run ``run()`` under a profile hook; 'file:line (source)' of the first
    C call (torch.rand, random.random, ...) that advanced an RNG, or None."""
    import linecache
    import sys

    hits, stack = [], []

    def prof(frame, event, arg):
        if hits:
            return
        if event == "c_call":
            stack.append(_rng_states())
        elif event in ("c_return", "c_exception") and stack:
            before = stack.pop()
            if _rng_changed(before, _rng_states()):
                f = frame
                while f is not None and not _is_user_file(f.f_code.co_filename):
                    f = f.f_back
                if f is not None:
                    line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
                    hits.append(f"{f.f_code.co_filename}:{f.f_lineno}" + (f" ({line})" if line else "")
                                + f", calling {getattr(arg, '__name__', arg)}()")

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        run()
    except Exception:
        pass
    finally:
        sys.setprofile(old)
    return hits[0] if hits else None


_TRACE_HINT = ("Data-dependent control flow (if on a tensor value, .item(), a random draw at trace "
               "time) is not traceable: draw randomness as tensor ops whose shape/device come from the "
               "input (e.g. keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= p; x = x * keep / "
               "(1 - p)), build the model from fedsq_fast.GatedConv2d / GatedLinear / GatedActivation, or "
               "pass leaf_modules=(...) for submodules fx should not enter (they then run as they are, ungated).")


def _trace_graph(model, leaf_modules, mode="eval", reuse=()):
    """Trace ``model`` (in the mode it is in; ``mode`` is for messages) into an fx Graph.

    Refuses what fx would silently freeze into the graph: a random number drawn at
    trace time (e.g. ``if self.training and torch.rand(1).item() < p``) makes the
    graph take one fixed branch / constant forever."""
    tracer = _LeafTracer(leaf_modules, reuse)
    before = _rng_states()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types; name the user's line and say what to do
        _set_rng_states(before)
        where = _user_frame_of_tb(e.__traceback__)
        mods = [k for k in tracer.module_stack] if getattr(tracer, "module_stack", None) else []
        raise ValueError(
            f"dualcopy: model ({type(model).__name__}) could not be traced by torch.fx in {mode} mode"
            + (f" at {where}" if where else "")
            + (f" (module {mods[-1]!r})" if mods else "")
            + f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. " + _TRACE_HINT
        ) from e
    after = _rng_states()
    if _rng_changed(before, after):
        # the trace consumed random numbers: restore the caller's streams, find the line
        _set_rng_states(before)
        where = _locate_rng_draw(lambda: _LeafTracer(leaf_modules).trace(model))
        _set_rng_states(before)
        raise ValueError(
            f"dualcopy: model ({type(model).__name__}) draws a random number at trace time in {mode} mode"
            + (f" at {where}" if where else "")
            + ": torch.fx would freeze that one draw into the graph (the same branch or noise on "
            "every call), so the converted model would differ from the original. " + _TRACE_HINT
        )
    return graph


def _trace(model, leaf_modules, mode="eval"):
    return fx.GraphModule(model, _trace_graph(model, leaf_modules, mode))


def _sites(graph, modules, gate, gate_maxpool, allow_ungated):
    """The gate-site nodes of a traced graph, in order, with GateSite records
    (``modules``: the traced root's ``dict(named_modules())``)."""
    out, bad, seen = [], [], {}
    for node in graph.nodes:
        c = _classify(node, modules)
        if c is not None:
            kind, p1, p2, label = c
            if kind == "unsupported" or _option_name(kind, p1, p2) not in gate:
                if kind == "unsupported" and not allow_ungated:
                    where = node.target if node.op == "call_module" else node.name
                    bad.append(f"{label} at {where!r}")
                continue
        elif gate_maxpool and _is_maxpool(node, modules):
            kind, p1, p2 = "maxpool", 0.0, 0.0
        else:
            continue
        base = node.target if node.op == "call_module" else node.name
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append((node, GateSite(base if k == 0 else f"{base}#{k}", kind, p1, p2)))
    if bad:
        raise ValueError(
            "dualcopy: unsupported activation(s) with no piecewise-linear regime code: "
            + ", ".join(bad)
            + ". FedSQ gates ReLU, ReLU6/Hardtanh and LeakyReLU; pass allow_ungated=True to keep "
            "these as ordinary (ungated) activations in both copies."
        )
    return out


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
_AFFINE = (nn.Conv2d, nn.Linear, nn.Conv1d)


def _build_structural(model, gate, gate_maxpool, allow_ungated, leaf_modules):
    root = copy.deepcopy(model).eval()
    gm = _trace(root, leaf_modules, "eval")
    modules = dict(gm.named_modules())
    sites = _sites(gm.graph, modules, gate, gate_maxpool, allow_ungated)
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
            # conv/linear [-> eval BN] -> act: bias and BN go into the epilogue.
            if (inp.op == "call_module" and isinstance(modules[inp.target], nn.BatchNorm2d | nn.BatchNorm1d)
                    and len(inp.users) == 1 and calls[inp.target] == 1
                    and modules[inp.target].running_var is not None):
                bn, inp_bn = modules[inp.target], inp
                inp = inp.args[0]
            aff = (inp.op == "call_module" and isinstance(modules[inp.target], _AFFINE)
                   and len(inp.users) == 1 and calls[inp.target] == 1)
            if aff:
                lin = modules[inp.target]
                shift = None if lin.bias is None else lin.bias.detach().float()
                lin.bias = None
            if bn is not None and aff:
                inv = torch.rsqrt(bn.running_var.float() + bn.eps)
                g = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(inv)
                b = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(inv)
                scale = g * inv
                shift = ((-bn.running_mean.float()) if shift is None else shift - bn.running_mean.float()) * scale + b
                inp_bn.replace_all_uses_with(inp)
                graph.erase_node(inp_bn)
            elif bn is not None:
                inp = inp_bn  # BN without a conv before it: leave it as is
            fresh = aff or (inp.op == "call_module" and isinstance(modules[inp.target], nn.BatchNorm2d | nn.BatchNorm1d)) \
                or (inp.op == "call_function" and inp.target in _FRESH_FUNCS)
            fresh = fresh and len(inp.users) == 1
            with graph.inserting_before(node):
                s_node = None if scale is None else _const(gm, graph, f"_fedsq_scale_{i}", scale)
                t_node = None if shift is None else _const(gm, graph, f"_fedsq_shift_{i}", shift)
            args = (inp, s_node, t_node, site.kind, site.p1, site.p2, fresh)
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


def _site_module(node):
    """Path of the module whose forward made ``node`` ('' for the root)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _site_label(node):
    """A gate site's name for messages: module path, or node name with its module."""
    if node.op == "call_module":
        return repr(node.target)
    path = _site_module(node)
    return repr(node.name) + (f" (in module {path!r})" if path else "")


def _rewrite_quant_graph(graph, found):
    """Replace each gate-site node by quant_site / _quant_maxpool with that site's masks."""
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_ph):
        masks = graph.placeholder("fedsq_masks")
    for i, (node, site) in enumerate(found):
        with graph.inserting_before(node):
            m = graph.call_function(operator.getitem, (masks, i))
            if site.kind == "maxpool":
                y = graph.call_function(_quant_maxpool, (node.args[0], m))
            else:
                y = graph.call_function(quant_site, (node.args[0], m, site.kind, site.p1, site.p2))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    graph.lint()


def _set_modes(model, train, quant_bn):
    """The modes DualCopyModel.train(train) gives the quantitative copy (the
    model's own ``train()``, so an override that keeps e.g. BN frozen counts)."""
    model.train(train)
    if train and quant_bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _build_quantitative(model, sites, gate, gate_maxpool, allow_ungated, leaf_modules, quant_bn="train"):
    """Trace ``model`` in eval and in train mode (fx freezes every ``self.training``
    test into the graph) and rewrite its gate sites; one graph when both traces
    give the same code, else both, picked by ``training`` at call time."""
    modules = dict(model.named_modules())
    saved = [(m, m.training) for m in model.modules()]
    graphs, found, constants = {}, {}, []
    try:
        for train in (False, True):
            _set_modes(model, train, quant_bn)
            if train:  # submodules the model's own train() leaves in eval (quant_bn aside)
                model.train(True)
                eval_in_train = [n for n, m in model.named_modules() if n and not m.training]
                _set_modes(model, True, quant_bn)
            known = set(model.__dict__)
            graphs[train] = _trace_graph(model, leaf_modules, "train" if train else "eval", reuse=constants)
            # tensors the forward creates (torch.tensor(...)) are stored on the root
            constants = [(k, v) for k, v in model.__dict__.items()
                         if k not in known and k.startswith("_tensor_constant")]
            found[train] = _sites(graphs[train], modules, gate, gate_maxpool, allow_ungated)
    finally:
        for m, t in saved:  # the caller's modes, module by module
            m.training = t
    if [s for _, s in found[False]] != sites:
        raise RuntimeError("internal: structural and quantitative gate sites differ")
    train_sites = [s for _, s in found[True]]
    if train_sites != sites:
        # Masks come from the structural copy, traced in eval mode: a gate that
        # only exists in train mode has no structural gate to follow. Align the two
        # site lists by module path and kind (fx numbers functional nodes per graph,
        # so node names shift after a train-only relu).
        import difflib

        def key(node, site):
            return (_site_label(node) if node.op == "call_module" else _site_module(node), site.kind)

        ev, tr = found[False], found[True]
        sm = difflib.SequenceMatcher(None, [key(*e) for e in ev], [key(*t) for t in tr], autojunk=False)
        only_train, only_eval = [], []
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op in ("replace", "delete"):
                only_eval += [_site_label(n) for n, _ in ev[i1:i2]]
            if op in ("replace", "insert"):
                only_train += [_site_label(n) for n, _ in tr[j1:j2]]
        detail = []
        if only_train:
            more = f" (+{len(only_train) - 5} more)" if len(only_train) > 5 else ""
            detail.append(f"gate site(s) {', '.join(only_train[:5])}{more} run only in train mode")
        if only_eval:
            more = f" (+{len(only_eval) - 5} more)" if len(only_eval) > 5 else ""
            detail.append(f"gate site(s) {', '.join(only_eval[:5])}{more} run only in eval mode")
        if not detail:  # same modules and kinds, other parameters (e.g. a mode-dependent slope)
            i = next(i for i, (x, y) in enumerate(zip(train_sites, sites)) if x != y)
            detail.append(f"gate site {i} is {train_sites[i]} in train mode but {sites[i]} in eval mode")
        detail = "; ".join(detail)
        raise ValueError(
            f"dualcopy: the model's gated activations differ between train and eval mode ({detail}): "
            "a train-only branch (e.g. an auxiliary head) has no gate in the structural copy, which is "
            "traced in eval mode. Disable that branch before converting (e.g. aux_logits=False), or pass "
            "its module type in leaf_modules=(...) so it runs as an ordinary, ungated submodule."
        )
    _rewrite_quant_graph(graphs[False], found[False])
    _rewrite_quant_graph(graphs[True], found[True])
    if graphs[True].python_code("self").src == graphs[False].python_code("self").src:
        graphs[True] = graphs[False]  # train-only logic lives in leaf modules (Dropout, BN)
    return QuantGraphModule(model, graphs, eval_in_train)


class QuantGraphModule(nn.Module):
    """The quantitative copy: ``model``'s fx graph(s) with gate sites rewritten.

    One graph when the model's forward traces the same in train and eval mode
    (train-only logic only in leaf modules such as nn.Dropout / nn.BatchNorm2d,
    which follow ``.train()`` at run time), otherwise two graphs sharing every
    submodule and parameter, and ``forward`` runs the one of the current mode
    (``self.training``). Like fx.GraphModule it holds exactly the submodules,
    parameters and buffers the graphs reference, at their original paths, so
    ``state_dict()`` keys are the original model's. ``graph`` / ``code``: those
    of the current mode (read-only: edits are not recompiled). ``train(True)``
    leaves in eval the submodules (``eval_in_train``, paths) that the model's own
    ``train()`` left in eval, as the model would.
    """

    def __init__(self, root: nn.Module, graphs: dict, eval_in_train=()):
        super().__init__()
        from torch.fx.graph_module import _copy_attr  # GraphModule's own copy semantics

        uniq = [graphs[False]] + ([graphs[True]] if graphs[True] is not graphs[False] else [])
        for g in uniq:
            for node in g.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(root, self, node.target)
        self.training = root.training
        self._graphs = {False: graphs[False], True: graphs[True]}
        own = dict(self.named_modules())
        self._eval_in_train = [p for p in eval_in_train if p in own]
        self._compile()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for p in self._eval_in_train:
                self.get_submodule(p).eval()
        return self

    def _compile(self):
        from torch.fx.graph_module import _forward_from_src

        fns = {}
        for mode, g in self._graphs.items():
            if mode and g is self._graphs[False]:
                fns[mode] = fns[False]
                continue
            code = g.python_code(root_module="self")
            fns[mode] = (_forward_from_src(code.src, code.globals), code.src)
        self._fns = {k: v[0] for k, v in fns.items()}
        self._srcs = {k: v[1] for k, v in fns.items()}

    @property
    def mode_dependent(self) -> bool:
        """True when train and eval mode run different graphs."""
        return self._graphs[True] is not self._graphs[False]

    @property
    def graph(self) -> fx.Graph:
        return self._graphs[self.training]

    @property
    def code(self) -> str:
        return self._srcs[self.training]

    def code_globals(self) -> list:
        """The globals dict of each compiled forward (to swap a function such as
        quant_site for instrumentation, as gate_stability does)."""
        out = []
        for f in self._fns.values():
            if not any(f.__globals__ is g for g in out):
                out.append(f.__globals__)
        return out

    def forward(self, *args, **kwargs):
        return self._fns[self.training](self, *args, **kwargs)

    # Graphs and compiled functions are never mutated: copies share them (fast,
    # and the functions take the module as an argument).
    _SHARED = ("_graphs", "_fns", "_srcs")

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = v if k in self._SHARED else copy.deepcopy(v, memo)
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_fns"], state["_srcs"]  # exec'd functions do not pickle: recompiled on load
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._compile()

    def extra_repr(self) -> str:
        return "graphs: train+eval (mode-dependent forward)" if self.mode_dependent else "graphs: 1"


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
                                              leaf_modules)
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
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    leaf_modules = tuple(leaf_modules)
    was_training = model.training
    structural, sites = _build_structural(model, gate, gate_maxpool, allow_ungated, leaf_modules)
    if not any(s.kind != "maxpool" for s in sites):
        raise ValueError("model has no gateable activation (ReLU/ReLU6/Hardtanh/LeakyReLU)")
    qmodel = copy.deepcopy(model) if copy_model else model
    if num_classes is not None:
        head = replace_head(qmodel, num_classes, head)
    quantitative = _build_quantitative(qmodel, sites, gate, gate_maxpool, allow_ungated, leaf_modules, quant_bn)
    config = dict(gate=gate, gate_maxpool=gate_maxpool, quant_bn=quant_bn, num_classes=num_classes,
                  head=head, allow_ungated=allow_ungated, arch=type(model).__name__)
    for attr in ("input_size", "input_channels", "input_mean", "input_std"):
        if hasattr(model, attr):
            config[attr] = getattr(model, attr)
    dc = DualCopyModel(structural, quantitative, sites, config)
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
