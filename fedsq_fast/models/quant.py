"""The quantitative copy: the traced model with every gated activation replaced by
``quant_site`` (BatchNorm trains normally), one graph per mode when eval and train
traces differ (:class:`QuantGraphModule`). A soft squeeze-excitation site (``sigmoid``,
``hardsigmoid``) becomes the structural gate value itself: the side branch before it
still runs (its parameters keep their keys) but takes no gradient."""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layers import quant_site
from .trace import _quant_maxpool, _sites, _trace_graph


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
    # right after the input: the forward's other inputs (fixed at their defaults) follow
    first_ph = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(first_ph):
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


_DROPOUT_FUNCS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)  # random unless p == 0
_RANDOM_FUNCS = {F.feature_alpha_dropout, F.rrelu, torch.dropout, torch.bernoulli, torch.rand, torch.rand_like, torch.randn,
                 torch.randn_like, torch.randint, torch.randint_like, torch.randperm, torch.normal,
                 torch.multinomial, torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                   "geometric_", "cauchy_", "log_normal_"}


def _is_random(node, modules):
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) or type(m).__name__ == "StochasticDepth"
    if node.op == "call_function":
        if node.target in _DROPOUT_FUNCS:
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            return not (isinstance(p, (int, float)) and p == 0)
        return node.target in _RANDOM_FUNCS or getattr(node.target, "__name__", "") == "stochastic_depth"
    return node.op == "call_method" and node.target in _RANDOM_METHODS


def random_fed_sites(graph, found, modules):
    """Names of the gate sites whose input depends on a random draw in ``graph`` (the train
    trace): dropout, stochastic depth, in-graph bernoulli/rand. The original model in train
    mode gates those activations by its own noisy pre-activation; the DualCopy model by
    the structural copy's, which is eval and noise-free."""
    tainted = set()
    for node in graph.nodes:
        if _is_random(node, modules) or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
    return [site.name for node, site in found if node.args and node.args[0] in tainted]


def _set_modes(model, train, quant_bn):
    """The modes DualCopyModel.train(train) gives the quantitative copy (the
    model's own ``train()``, so an override that keeps e.g. BN frozen counts)."""
    model.train(train)
    if train and quant_bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _build_quantitative(model, sites, gate, gate_maxpool, allow_ungated, leaf_modules, quant_bn="train",
                        soft=False):
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
            found[train] = _sites(graphs[train], modules, gate, gate_maxpool, allow_ungated, soft)
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
    noisy = random_fed_sites(graphs[True], found[True], modules)
    _rewrite_quant_graph(graphs[False], found[False])
    _rewrite_quant_graph(graphs[True], found[True])
    if graphs[True].python_code("self").src == graphs[False].python_code("self").src:
        graphs[True] = graphs[False]  # train-only logic lives in leaf modules (Dropout, BN)
    q = QuantGraphModule(model, graphs, eval_in_train)
    q.random_fed_sites = noisy
    return q


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
