"""The thin layer between the federation engine and the models.

The engine never asks whether a model is a DualCopy model: it sends and
receives :func:`payload_state` and loads with :func:`load_payload`. A DualCopy
model's payload is its quantitative copy, so FedSQ is "the DualCopy model under
any strategy", not a separate code path.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

from .. import models as mm


def payload_state(model: nn.Module) -> dict:
    """What a client sends: the quantitative copy of a DualCopy model, else the state dict."""
    f = getattr(model, "quantitative_state_dict", None)
    return f() if callable(f) else model.state_dict()


def load_payload(model: nn.Module, state: dict, strict: bool = True) -> None:
    f = getattr(model, "load_quantitative_state_dict", None)
    if callable(f):
        f(state, strict=strict)
    else:
        model.load_state_dict(state, strict=strict)


def is_dualcopy(model: nn.Module) -> bool:
    return callable(getattr(model, "quantitative_state_dict", None))


def state_bytes(state: dict) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def check_model_fn(model_fn) -> None:
    """model_fn builds a model; a model itself (also callable) is refused with the fix."""
    if isinstance(model_fn, nn.Module):
        raise TypeError(f"model_fn must be a callable that builds the model, got a {type(model_fn).__name__} "
                        "instance: pass `lambda: model` (each method then starts from a copy of it)")
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a callable that builds the model, got {type(model_fn).__name__}")


def method_model(model, method: str, dual: bool, *, quant_bn: str = "train", allow_ungated: bool = False,
                 source: str = "model_fn", soft_gates: bool = False) -> tuple[nn.Module, dict]:
    """The model a method trains, and a record of what it is (for metrics.json).

    The rule (no silent fallback): a fedsq method always trains a DualCopy model. A plain
    model is converted with :func:`fedsq_fast.dualcopy` (``quant_bn``, ``allow_ungated``,
    ``soft_gates`` from the config); one that cannot be converted is refused with the reason. A model
    that already is a DualCopy model is used as is for fedsq methods and refused for the
    others (it would train FedSQ under another method's name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{source} must return a torch.nn.Module, got {type(model).__name__}")
    converted = False
    if dual and source.startswith("model ") and getattr(model, "weights", None) is None:
        warn_random_gates(method, source)
    if dual and not is_dualcopy(model):
        import logging
        import warnings

        from ..models import TrainModeGateWarning, dualcopy

        try:
            with warnings.catch_warnings(record=True) as seen:
                # the engine logs it (once per conversion) instead of a Python warning per process
                warnings.simplefilter("always", TrainModeGateWarning)
                model = dualcopy(model, quant_bn=quant_bn, allow_ungated=allow_ungated, soft_gates=soft_gates)
            for w in seen:
                if issubclass(w.category, TrainModeGateWarning):
                    logging.getLogger("fedsq_fast").info("%s", w.message)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        except ValueError as e:  # dualcopy's refusals; internal errors keep their traceback
            raise ValueError(
                f"methods: {method!r} trains a DualCopy model, but {source}'s {type(model).__name__} could not be "
                f"converted: {e} -- or run a method without fedsq (e.g. 'fedavg')") from e
        converted = True
    elif not dual and is_dualcopy(model):
        raise ValueError(
            f"methods: {method!r} is not a fedsq method, but {source} returned a DualCopy model: it would "
            f"train FedSQ under the name {method!r}; use 'fedsq+{method}' (or 'fedsq' for FedAvg), or "
            "return the plain model")
    info = {"kind": "dualcopy" if dual else "plain", "source": source, "converted_by_engine": converted,
            "arch": (model.config.get("arch") if dual else type(model).__name__),
            "payload_bytes": state_bytes(payload_state(model)),
            "full_model_bytes": state_bytes(model.state_dict())}
    if dual:
        info["gate_sites"] = sum(1 for s in model.sites if s.kind != "maxpool")
        info["quant_bn"] = model.config.get("quant_bn")
        soft = sum(1 for s in model.sites if getattr(s, "soft", False))
        if soft:  # recorded only for soft-gated models: binary runs' records stay as they were
            info["soft_gate_sites"] = soft
    return model, info


def warn_random_gates(method: str, source: str) -> str:
    """Warn (UserWarning; returns the text) that a fedsq method runs on a randomly initialised
    model: its structural copy, hence every gate, is random and stays fixed, so FedSQ has
    nothing pretrained to keep."""
    msg = (f"methods: {method!r} on {source}, which is randomly initialised (weights = none, or a model that "
           "takes no weights): FedSQ fixes its gates from this random structural copy, so they stay random "
           "and training can fail to learn (measured by issue 23's author, 2026-12-07: regnetx_002 on Fashion-MNIST from random init, FedSQ "
           "0.14 -> 0.093 while FedAvg went 0.10 -> 0.36); FedSQ is meant for pretrained backbones: use "
           "weights = default or a weights file, or a method without fedsq")
    import warnings

    warnings.warn(msg, UserWarning, stacklevel=3)
    return msg


@torch.no_grad()
def check_model_io(model: nn.Module, x: torch.Tensor, transform, num_classes: int,
                   source: str = "model_fn") -> None:
    """Run ``model`` (eval mode, modes restored) on a couple of samples of the data, as the
    engine will feed them, before any training: a model that cannot take the data's input
    or whose output is not (batch, num_classes) is refused with what to change, instead of
    crashing in the first evaluation or training on the wrong head."""
    from .lazy import rows

    xb = rows(x, slice(0, 2))
    if transform is not None:
        xb = transform(xb)
    was = model.training
    model.eval()
    try:
        out = model(xb)
    except Exception as e:  # the model's own error, whatever its type: say what it was fed
        from .inputs import expected_input

        model.train(was)
        takes = expected_input(model, xb)
        fix = ("pass input_spec=InputSpec(channels, size, mean, std) matching the model to federate() or "
               "prepare_data(), or give the model an input_spec attribute"
               if getattr(transform, "kind", "images") == "images" else
               "give data of the shape the model takes, or a model for this data")
        raise ValueError(
            f"{source}: the model cannot take this data's input, batches of shape {tuple(xb.shape)} {xb.dtype}"
            + (f"; its first layer takes {takes}" if takes else "")
            + f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {fix}") from e
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != xb.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{source}: the model must return logits of shape (batch, num_classes), got {shape} "
                         f"for a batch of {xb.shape[0]}")
    if out.shape[1] != num_classes:
        raise ValueError(f"{source}: the model returns {out.shape[1]} logits, but the data has num_classes="
                         f"{num_classes}; replace its head (fedsq_fast.models.replace_head(model, "
                         f"{num_classes})) or fix num_classes")


# ---------------------------------------------------------------- local models
class TinyCNN(nn.Module):
    """A small ReLU CNN for tests and quick runs (not pretrained)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, bn: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), norm(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, 32), nn.ReLU(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)




LOCAL_MODELS = ("tiny_cnn", "mlp")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def _is_weights_path(weights) -> bool:
    """The zoo's rule: a PathLike, or a string with a path separator or a weights-file suffix
    (anything else is a weights name: 'offline', 'DEFAULT', a torchvision name)."""
    return isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
        os.sep in weights or (os.altsep or os.sep) in weights or weights.endswith(WEIGHT_FILE_SUFFIXES)))


def weights_problem(name: str, weights, *, check_files: bool = True) -> str | None:
    """What is wrong with ``weights`` for the zoo/local model ``name``, or None. Cheap (stats
    the file and reads its header only): runs before any data is loaded. The full load
    happens in :func:`build_model`, whose errors name the file too. ``check_files=False``:
    only what the config says, not whether the file is on this machine."""
    if weights is None or weights == "default":
        return None
    if name in LOCAL_MODELS:
        return (f"{name!r} is a local untrained model and loads no weights; got {weights!r} "
                "(use weights=none, or a zoo model)")
    if not _is_weights_path(weights):
        if name in ("svhn_cnn", "mnist_cnn_silu", "mnist_cnn_relu") and weights != "offline":
            return f"for {name} must be 'default', 'offline', none or a .pth/.safetensors path; got {weights!r}"
        return None  # a torchvision weights name: checked by the zoo, which knows them
    if not check_files:
        return None
    p = Path(weights)
    if not p.exists():
        return f"file not found: {p}"
    if not p.is_file():
        return f"{p} is not a file"
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"{p}: cannot be read ({e.strerror})"
    if p.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt"):  # parses the JSON header, no tensor data
                pass
        except Exception as e:  # safetensors' own error types vary across versions
            return f"{p}: not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        return None
    import zipfile

    # torch.save writes a zip archive (torch >= 1.6) or, legacy, a pickle (protocol byte 0x80)
    if not (zipfile.is_zipfile(p) or head[:1] == b"\x80"):
        return f"{p}: not a PyTorch state dict file (torch.save zip or pickle) nor .safetensors"
    return None


def list_models() -> list[str]:
    names = list(mm.list_models())
    return sorted(set(names) | set(LOCAL_MODELS))


def build_model(name: str, num_classes: int | None = None, weights="default", *,
                in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """fedsq_fast.models.build_model when it exists, plus two local toy models (which take no
    weights). A weights file that cannot be loaded, or whose tensors do not fit the model, is
    a ValueError naming the file."""
    problem = weights_problem(name, weights)
    if problem is not None:
        raise ValueError(f"weights: {problem}")
    if _is_weights_path(weights):
        # a user's file: build without weights, then load it here so that only the loading's
        # errors (not the model's) are reported as the file's, one line, naming it
        m = _build_model(name, num_classes, None, in_channels=in_channels, image_size=image_size, _head=False)
        try:
            m.load_state_dict(mm.load_state_file(weights))
        except _weights_load_errors() as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"weights: {weights}: cannot be loaded into {name} ({type(e).__name__}: {first})") from e
        m.weights = str(weights)
        _fit_head(mm, m, num_classes)
        return m
    return _build_model(name, num_classes, weights, in_channels=in_channels, image_size=image_size)


def _weights_load_errors() -> tuple:
    """What loading a user's weights file raises when the file is at fault: torch.load's
    (pickle, zip, truncation), safetensors' and load_state_dict's (keys or shapes)."""
    import pickle

    errs = [OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errs.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errs)


def _fit_head(mm, m: nn.Module, num_classes) -> None:
    # DEFAULT (ours): keep the pretrained head when its class count already matches
    # (SVHN digits -> MNIST digits); otherwise a fresh head (seeded by the caller).
    heads = [mod for mod in m.modules() if type(mod) is nn.Linear]
    if num_classes is not None and (not heads or heads[-1].out_features != num_classes):
        mm.replace_head(m, num_classes)


def _build_model(name: str, num_classes: int | None, weights, *, in_channels: int, image_size: int,
                 _head: bool = True) -> nn.Module:
    if name == "tiny_cnn":
        return TinyCNN(in_channels, num_classes or 10)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes or 10)
    if name in mm.list_models():
        if weights == "default":  # ours: offline weights where they exist, else torchvision's
            offline = getattr(importlib.import_module("fedsq_fast.models.zoo"), "OFFLINE_WEIGHTS", {})
            weights = "offline" if name in offline else "DEFAULT"
        try:
            m = mm.build_model(name, num_classes=None, weights=weights)
        except RuntimeError as e:
            # the zoo's two "not on this machine" errors (no internet for torchvision's weights, the
            # offline-weights package missing) are the user's to fix: one line; other RuntimeErrors
            # are bugs and keep their traceback
            if str(e).startswith(("could not fetch torchvision weights", "offline weights for")):
                raise ValueError(f"weights: {str(e).splitlines()[0]}") from e
            raise
        if _head:
            _fit_head(mm, m, num_classes)
        return m
    raise ValueError(f"model must be one of {', '.join(list_models())}; got {name!r}")


# ---------------------------------------------------------------- gate stability
_GATED = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)


def _regime_codes(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Gate pattern at each activation module's input (pre-hook: inplace ReLUs are safe).
    ReLU/LeakyReLU: z > 0; ReLU6/Hardtanh: 3 regimes (below, linear, clipped)."""
    codes, hooks = [], []

    def pre(mod, inp):
        z = inp[0].detach()
        if isinstance(mod, nn.Hardtanh):  # ReLU6 is a Hardtanh
            codes.append((z > mod.min_val).to(torch.uint8) + (z >= mod.max_val).to(torch.uint8))
        else:
            codes.append(z > 0)

    for m in model.modules():
        if isinstance(m, _GATED):
            hooks.append(m.register_forward_pre_hook(pre))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return codes


def gate_change_sites(model_a: nn.Module, model_b: nn.Module, probe: torch.Tensor) -> list[float]:
    """Per gate site, in site order, the fraction of gates that differ between two versions
    of a network on ``probe`` (the engine's ``gate_change_sites``): DualCopy models through
    :func:`fedsq_fast.models.gate_stability` (which returns {site: fraction}); plain modules
    through forward hooks (no conversion per call)."""
    if is_dualcopy(model_a):  # plain models: hooks, no re-tracing per call
        try:
            res = mm.gate_stability(model_a, model_b, probe)
        except (TypeError, ValueError):
            res = None  # plain models it does not handle: fall back to hooks
        if res is not None:
            return [float(v) for v in (res.values() if isinstance(res, dict) else res)]
    ca, cb = _regime_codes(model_a, probe), _regime_codes(model_b, probe)
    return [float((a != b).float().mean()) for a, b in zip(ca, cb)]
