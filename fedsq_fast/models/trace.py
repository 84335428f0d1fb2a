"""Finding the gate sites of a network: torch.fx tracing (eval and train mode), the
activation classifier, and the refusals with file:line (random draws at trace time,
untraceable branches) that make a conversion faithful or impossible."""
from __future__ import annotations

import functools
import operator
import os
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layers import SE_KINDS, SOFT_KINDS, SiteMasks, activation_kind


GATEABLE = ("relu", "relu6", "hardtanh", "leaky_relu")
# with soft_gates=True (beyond the paper): z * g(z) activations and squeeze-excitation gates
SOFT_GATEABLE = SOFT_KINDS

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
    fx node name), ``kind`` ('relu' | 'leaky_relu' | 'hardtanh' | 'maxpool', or a
    soft kind: 'silu' | 'gelu' | 'gelu_tanh' | 'hardswish' | 'mish' | 'sigmoid' |
    'hardsigmoid'), ``p1``/``p2`` (slope, or min/max)."""

    name: str
    kind: str
    p1: float = 0.0
    p2: float = 0.0

    @property
    def soft(self) -> bool:
        """A soft gate (``soft_gates=True``): its gate is a tensor g(z_s), not bits."""
        return self.kind in SOFT_KINDS


# ---------------------------------------------------------------------------
# Recognising activation nodes.
def _arg(node, pos, key, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


# shape-only ops a squeeze-excitation gate may pass through before its multiply
_SHAPE_METHODS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten",
                  "permute", "transpose", "contiguous"}
_SHAPE_FUNCS = {torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, torch.permute, torch.transpose}
_MUL_FUNCS = {operator.mul, torch.mul}


def _feeds_multiply(node, _depth=0) -> bool:
    """True when every use of ``node``'s value (through shape-only ops) multiplies it into
    another tensor: a gate (``x * sigmoid(s)``), not an output. An in-place multiply of
    the value itself (``g.mul_(x)``) does not count: it would write over the gate."""
    if not node.users or _depth > 8:
        return False
    for u in node.users:
        first = bool(u.args) and u.args[0] is node
        if u.op == "call_function" and u.target in _MUL_FUNCS:
            continue
        if u.op == "call_function" and u.target is operator.imul and not first:
            continue
        if u.op == "call_method" and (u.target == "mul" or (u.target == "mul_" and not first)):
            continue
        shape_op = (u.op == "call_method" and u.target in _SHAPE_METHODS) or \
            (u.op == "call_function" and u.target in _SHAPE_FUNCS)
        if shape_op and first and _feeds_multiply(u, _depth + 1):
            continue
        return False
    return True


def _soft_module(m):
    """The soft kind of an activation module (exact types: a subclass may compute else), or None."""
    t = type(m)
    if t is nn.SiLU:
        return "silu"
    if t is nn.GELU:
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    return {nn.Hardswish: "hardswish", nn.Mish: "mish", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}.get(t)


_SOFT_FUNCS = {F.silu: "silu", F.hardswish: "hardswish", F.mish: "mish", torch.sigmoid: "sigmoid",
               torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid"}
_SOFT_METHODS = {"sigmoid": "sigmoid", "sigmoid_": "sigmoid"}


def _soft_kind(node, modules):
    """The soft kind of an activation node (a squeeze-excitation kind only where its
    output is multiplied into a feature map), or None."""
    kind = None
    if node.op == "call_module":
        kind = _soft_module(modules[node.target])
    elif node.op == "call_function":
        if node.target is F.gelu:
            kind = "gelu_tanh" if _arg(node, 1, "approximate", "none") == "tanh" else "gelu"
        else:
            kind = _SOFT_FUNCS.get(node.target)
    elif node.op == "call_method":
        kind = _SOFT_METHODS.get(node.target)
    if kind in SE_KINDS and not _feeds_multiply(node):
        return None
    return kind


def _classify(node, modules, soft=False):
    """(kind, p1, p2, label) for an activation node, ('unsupported', .., label), or None.
    ``soft``: SiLU, GELU, Hardswish, Mish and squeeze-excitation Sigmoid/Hardsigmoid are
    soft gate sites (their kinds), else unsupported."""
    c = _classify_binary(node, modules)
    if soft and (c is None or c[0] == "unsupported"):
        kind = _soft_kind(node, modules)
        if kind is not None:
            label = c[3] if c is not None else getattr(node.target, "__name__", str(node.target))
            return (kind, 0.0, 0.0, label)
    return c


def _classify_binary(node, modules):
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


# fx keeps every torch.nn module a leaf; these hold their activation inside their forward
# (F.relu by default), so they are traced into to reach it. Their attention stays a leaf.
_ENTERED_TORCH_MODULES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                          nn.TransformerDecoder, nn.Transformer)


def _concrete_args(model):
    """The root forward's inputs past the first, at their defaults: DualCopyModel feeds
    one tensor, and fx would otherwise trace ``if mask is not None`` with a proxy."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(pos) <= 1:
        return None
    required = [p.name for p in pos[1:] if p.default is p.empty]
    if required:
        raise ValueError(f"dualcopy: {type(model).__name__}.forward needs inputs {required} beside the first: a "
                         "DualCopy model is fed one tensor (wrap the model so that forward(x) supplies the rest)")
    return {p.name: p.default for p in pos[1:]}


def _plain_encoder_call(args, kwargs):
    """A TransformerEncoder call without masks (what a DualCopy model's forward gives it)."""
    names = ("mask", "src_key_padding_mask", "is_causal")
    extra = dict(zip(names, args[1:]), **kwargs)
    return (extra.get("mask") is None and extra.get("src_key_padding_mask") is None
            and extra.get("is_causal") in (None, False))


def _encoder_forward(m, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """nn.TransformerEncoder.forward without masks, as torch computes it when no nested
    tensor is made (its fast-path checks ask `src.is_nested` and `len(src.size())`, which a
    traced input cannot answer): each layer in turn, then the norm."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=None, is_causal=False, src_key_padding_mask=None)
    return out if m.norm is None else m.norm(out)


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
        if isinstance(m, self.leaf_types):
            return True
        if isinstance(m, _ENTERED_TORCH_MODULES):
            return False  # torch.nn modules that hold a gateable activation inside
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if type(m) is nn.TransformerEncoder and _plain_encoder_call(args, kwargs):
            forward = functools.partial(_encoder_forward, m)
        return super().call_module(m, forward, args, kwargs)

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
    concrete = _concrete_args(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # the attention fast path fuses a transformer layer's ReLU into one op: trace the
        # ordinary path (the same numbers; the fast path is an inference-only shortcut)
        torch.backends.mha.set_fastpath_enabled(False)
        graph = tracer.trace(model, concrete_args=concrete)
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
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    after = _rng_states()
    if _rng_changed(before, after):
        # the trace consumed random numbers: restore the caller's streams, find the line
        _set_rng_states(before)
        where = _locate_rng_draw(lambda: _LeafTracer(leaf_modules).trace(model, concrete_args=concrete))
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


def _where(node):
    """A site for messages: 'path' of its module, or 'node' (in module 'path') for a function call."""
    if node.op == "call_module":
        return repr(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return repr(node.name) + (f" (in {path!r})" if path else "")


def _summary(items, first=3):
    """'N: A x3, B x1; first: a, b, c' for a long list of (label, where) pairs."""
    from collections import Counter

    counts = Counter(label for label, _ in items)
    kinds = ", ".join(f"{k} x{n}" for k, n in counts.most_common())
    shown = ", ".join(f"{label} at {where}" for label, where in items[:first])
    more = f", ... (+{len(items) - first} more)" if len(items) > first else ""
    return f"{len(items)} ({kinds}): {shown}{more}"


_FULL_LIST = "every site: fedsq_fast.models.activation_sites(model)"


_SOFT_FAMILIES = ("SiLU, GELU (exact and tanh), Hardswish, Mish, and Sigmoid/Hardsigmoid where their output "
                  "multiplies a feature map (squeeze-excitation)")
_SOFT_HINT = (f"soft_gates=True gates {_SOFT_FAMILIES} with fixed soft gates y_q = z_q * g(z_s) (beyond the "
              "paper, which gates ReLU-like activations only; docs/models.md, 'Soft gates')")


def _sites(graph, modules, gate, gate_maxpool, allow_ungated, soft=False):
    """The gate-site nodes of a traced graph, in order, with GateSite records
    (``modules``: the traced root's ``dict(named_modules())``). Refuses, before any
    work, a model with activations it does not gate (unless ``allow_ungated``) and one
    with nothing to gate, saying which activations it has and what FedSQ gates.
    ``soft``: soft gate sites too (``dualcopy(soft_gates=True)``)."""
    out, bad, left_out, seen = [], [], [], {}
    softable = 0  # refused sites that soft_gates=True would gate
    for node in graph.nodes:
        c = _classify(node, modules, soft)
        if c is not None:
            kind, p1, p2, label = c
            where = _where(node)
            if kind == "unsupported":
                bad.append((label, where))
                softable += (not soft) and _soft_kind(node, modules) is not None
                continue
            if _option_name(kind, p1, p2) not in gate and kind not in SOFT_GATEABLE:
                left_out.append((label, where))
                continue
        elif gate_maxpool and _is_maxpool(node, modules):
            kind, p1, p2 = "maxpool", 0.0, 0.0
        else:
            continue
        base = node.target if node.op == "call_module" else node.name
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append((node, GateSite(base if k == 0 else f"{base}#{k}", kind, p1, p2)))
    gated = sum(1 for _, s in out if s.kind != "maxpool")
    families = "ReLU, ReLU6/Hardtanh and LeakyReLU (binary or 2-bit regime gates)"
    if soft:
        families += f"; with soft_gates=True also {_SOFT_FAMILIES} (soft gates)"
    hint = ""
    if softable:
        hint = f"{softable} of them would be gated: {_SOFT_HINT}. "
    elif soft and bad:
        hint = ("Soft gates cover activations of the form z * g(z) with g in [0, 1] and squeeze-excitation "
                "gates; Tanh, ELU, Softplus, PReLU and a Sigmoid whose output is not multiplied into a feature "
                "map are not of that form. ")
    if not gated:
        found = []
        if bad:
            found.append(f"activations it does not gate {_summary(bad)}")
        if left_out:
            found.append(f"activations left out by gate={tuple(gate)}: {_summary(left_out)}")
        raise ValueError(
            "dualcopy: FedSQ needs ReLU-like gating and this model has no activation it can gate; FedSQ gates "
            f"{families}. Found: " + ("; ".join(found) if found else "no activation at all") + ". "
            + ("Widen gate= to include them. " if left_out else "") + hint
            + f"({_FULL_LIST})"
        )
    if bad and not allow_ungated:
        raise ValueError(
            f"dualcopy: {len(bad)} activation(s) that FedSQ does not gate: "
            f"{_summary(bad)}. FedSQ gates {families}; this model also has {gated} such site(s). " + hint
            + f"allow_ungated=True converts it with those {gated} gated and the {len(bad)} others left as ordinary "
            f"activations in both copies (only part of the network is then FedSQ). ({_FULL_LIST})"
        )
    return out


def activation_sites(model, leaf_modules=(), soft_gates=False):
    """Every activation call of ``model`` (traced in eval mode, as dualcopy's structural
    copy is) as ``(site, activation, gateable)``: the module path or fx node name, the
    activation's name, and whether FedSQ gates it (ReLU, ReLU6/Hardtanh, LeakyReLU; with
    ``soft_gates=True`` also SiLU, GELU, Hardswish, Mish and squeeze-excitation gates)."""
    import copy as _copy

    root = _copy.deepcopy(model).eval()
    graph = _trace_graph(root, tuple(leaf_modules))
    modules = dict(root.named_modules())
    rows = []
    for node in graph.nodes:
        c = _classify(node, modules, bool(soft_gates))
        if c is not None:
            rows.append((_where(node), c[3], c[0] != "unsupported"))
    return rows
