"""What a model expects of its input and the per-batch transform that gives it. Images:
channels, size and normalisation (:class:`InputSpec`) read from the argument, the model or
the zoo, applied by :class:`InputTransform` (resize once at load time; grey -> RGB and
normalisation per batch, both cheap elementwise ops). Other tensor data (features, token
ids, sequences) is used as given: :class:`TensorSpec` / :class:`TensorTransform` only say
whether integer samples are token ids (kept) or numbers (cast to float32).
:func:`expected_input` names what a model takes, from its first layer."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- model input
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: ``channels``, square ``size`` in px (None: the data's
    own size, no resize) and per-channel ``mean``/``std`` (None: no normalisation, the data
    is fed as given)."""

    channels: int
    size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None

    def __post_init__(self):
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"input_spec.channels must be a positive int, got {self.channels!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)
                                      or not 1 <= self.size <= 4096):
            raise ValueError(f"input_spec.size must be None or an int in [1, 4096], got {self.size!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("input_spec: give both mean and std, or neither")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is None:
                continue
            v = tuple(float(t) for t in v)
            if len(v) != self.channels or not all(math.isfinite(t) for t in v):
                raise ValueError(f"input_spec.{k} must hold {self.channels} finite numbers, got {getattr(self, k)!r}")
            if k == "std" and not all(t > 0 for t in v):
                raise ValueError(f"input_spec.std must be positive, got {v!r}")
            object.__setattr__(self, k, v)


# The zoo models' specs by name, for configs that name a zoo model (the CLI, suites). DEFAULT
# sizes for ImageNet backbones are ours (32/64 px instead of 224) so that CPU runs stay short;
# override with image_size. A model passed as model_fn states its own spec (input_spec_of).
MODEL_INPUT = {
    "svhn_cnn": (3, 32, SVHN_MEAN, SVHN_STD),
    "mnist_cnn_silu": (1, 32, (0.1307,), (0.3081,)),  # MNIST's usual mean/std
    "mnist_cnn_relu": (1, 32, (0.1307,), (0.3081,)),
    "mobilenet_v2": (3, 32, IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": (3, 32, IMAGENET_MEAN, IMAGENET_STD),
    "alexnet": (3, 64, IMAGENET_MEAN, IMAGENET_STD),
}


def input_spec_of(model) -> InputSpec | None:
    """The input spec a model states: ``model.input_spec`` (an InputSpec or a (channels,
    size, mean, std) tuple), else the zoo attributes ``input_channels`` / ``input_size`` /
    ``input_mean`` / ``input_std`` (a DualCopy model keeps them in ``config``), else the
    ``in_channels`` of its first Conv2d (size and normalisation then stay the data's own).
    None when the model states nothing (e.g. an MLP)."""
    from torch import nn

    spec = getattr(model, "input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 4:
        return InputSpec(int(spec[0]), spec[1], spec[2], spec[3])
    attrs = dict(getattr(model, "config", None) or {}) if isinstance(getattr(model, "config", None), dict) else {}
    for k in ("input_channels", "input_size", "input_mean", "input_std"):
        if hasattr(model, k):
            attrs[k] = getattr(model, k)
    if "input_channels" in attrs:
        return InputSpec(int(attrs["input_channels"]), attrs.get("input_size"),
                         attrs.get("input_mean"), attrs.get("input_std"))
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None:
        return InputSpec(int(first.in_channels))
    return None


@dataclass
class InputTransform:
    """Per-batch: grey -> `channels` by repetition, then (x - mean) / std (identity when
    mean/std are None). ``augment``: the training batches' augmentation
    (:class:`~.augment.Augment`, applied by local training before this transform; never in
    evaluation), or None."""

    channels: int
    size: int | None
    mean: tuple | None
    std: tuple | None
    augment: object = None
    kind = "images"

    def __post_init__(self):
        mean = self.mean if self.mean is not None else (0.0,) * self.channels
        std = self.std if self.std is not None else (1.0,) * self.channels
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._identity = self.mean is None

    def resize(self, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """Resize once at load time (bilinear, antialiased when shrinking)."""
        if self.size is None or tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        out = [F.interpolate(x[i:i + batch], size=(self.size, self.size), mode="bilinear",
                             align_corners=False, antialias=x.shape[-1] > self.size)
               for i in range(0, len(x), batch)]
        out = torch.cat(out)
        # images in [0, 1] stay there (bilinear overshoot); other value ranges are the user's
        return out.clamp_(0.0, 1.0) if bool(x.min() >= 0) and bool(x.max() <= 1) else out

    def check_channels(self, data_channels: int) -> None:
        """Refuse, before any work, data whose channel count cannot be mapped to the model's."""
        if data_channels != self.channels and data_channels != 1 and self.channels != 1:
            raise ValueError(f"input channels: the data has {data_channels}, the model takes {self.channels}; "
                             "only grey -> RGB (repeated) and RGB -> grey (mean) are converted: pass "
                             "input_spec=InputSpec(channels=...) matching your model, or convert the data")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(1, keepdim=True)  # RGB -> grey for grey models
            else:
                raise ValueError(f"cannot map {x.shape[1]} input channels to {self.channels}")
        if self._identity:
            return x
        if self._mean.device != x.device:
            self.to(x.device)
        return (x - self._mean) / self._std

    def to(self, device) -> "InputTransform":
        """Keep the normalisation constants on the data's device (in place; returns self)."""
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        return self


def input_transform_for(model_name: str | None, model=None, image_size: int | None = None,
                        data_channels: int = 1, spec: InputSpec | None = None) -> InputTransform:
    """The input transform: ``spec`` if given, else what ``model`` states
    (:func:`input_spec_of`), else the zoo spec of ``model_name`` (:data:`MODEL_INPUT`), else
    the data's own shape with mean 0.5 / std 0.5 (the built-in toy models)."""
    if spec is None and model is not None:
        spec = input_spec_of(model)
    if spec is None and model_name in MODEL_INPUT:
        spec = InputSpec(*MODEL_INPUT[model_name])
    if spec is None:
        spec = InputSpec(data_channels, None, (0.5,) * data_channels, (0.5,) * data_channels)
    size = int(image_size) if image_size is not None else spec.size
    tf = InputTransform(spec.channels, size, spec.mean, spec.std)
    tf.check_channels(data_channels)
    return tf


# ---------------------------------------------------------------- your own data


# ---------------------------------------------------------------- tensor data
@dataclass(frozen=True)
class TensorSpec:
    """What a model expects of tensor data (features, token ids, sequences), which is used as
    given: ``integers`` says what integer samples become, ``"long"`` (token ids for an
    ``nn.Embedding``: kept, never cast or scaled) or ``"float"`` (numbers for a Linear or a
    conv: cast to float32). ``expects``: the model's input as words, for error messages."""

    integers: str = "float"
    expects: str = ""

    def __post_init__(self):
        if self.integers not in ("long", "float"):
            raise ValueError(f"TensorSpec.integers must be 'long' or 'float', got {self.integers!r}")


@dataclass
class TensorTransform:
    """Per-batch for tensor data: integer samples cast to float32 unless they are token ids
    (``integers="long"``); nothing else (no resize, no normalisation, no channel mapping).
    ``augment``: a callable augmentation of training batches (see :class:`InputTransform`)."""

    integers: str = "float"
    augment: object = None
    kind = "tensor"
    channels = None
    size = None
    mean = None
    std = None

    def resize(self, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """Identity: tensor data keeps its shape."""
        return x

    def check_channels(self, data_channels) -> None:
        """Nothing to check: tensor data has no channels to map."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point and self.integers == "float":
            return x.float()
        return x

    def to(self, device) -> "TensorTransform":
        """Itself (no constants to move)."""
        return self


# the layers a model's input meets first, and what each takes
_INPUT_LAYERS = ("Conv1d", "Conv2d", "Conv3d", "Linear", "Bilinear", "Embedding", "EmbeddingBag",
                 "RNN", "LSTM", "GRU", "TransformerEncoderLayer", "TransformerEncoder", "MultiheadAttention",
                 "LayerNorm", "BatchNorm1d", "BatchNorm2d")


def _describe_layer(m) -> str:
    """What layer ``m`` takes, as the shape a batch must have."""
    name = type(m).__name__
    if name in ("Conv1d", "Conv2d", "Conv3d"):
        dims = {"Conv1d": "L", "Conv2d": "H, W", "Conv3d": "D, H, W"}[name]
        return f"(batch, {m.in_channels}, {dims}) ({name} with in_channels={m.in_channels})"
    if name == "Linear":
        return f"(batch, ..., {m.in_features}) ({name} with in_features={m.in_features})"
    if name in ("Embedding", "EmbeddingBag"):
        return (f"integer token ids in [0, {m.num_embeddings}), (batch, L) "
                f"({name}({m.num_embeddings}, {m.embedding_dim}))")
    if name in ("RNN", "LSTM", "GRU"):
        order = "(batch, L, " if m.batch_first else "(L, batch, "
        return f"{order}{m.input_size}) ({name} with input_size={m.input_size}, batch_first={m.batch_first})"
    if name in ("TransformerEncoderLayer", "TransformerEncoder", "MultiheadAttention"):
        layer = m.layers[0] if name == "TransformerEncoder" else m
        attn = layer if name == "MultiheadAttention" else layer.self_attn
        bf = getattr(attn, "batch_first", False)
        return f"{'(batch, L, ' if bf else '(L, batch, '}{attn.embed_dim}) ({name}, batch_first={bf})"
    if name == "LayerNorm":
        return f"(batch, ..., {', '.join(map(str, m.normalized_shape))}) (LayerNorm)"
    if name in ("BatchNorm1d", "BatchNorm2d"):
        return f"(batch, {m.num_features}, ...) ({name} with num_features={m.num_features})"
    return name


def first_layer(model, x: torch.Tensor | None = None):
    """The first layer ``model``'s input meets: the first module called when ``model`` runs on
    ``x`` (a probe forward, eval mode, modes restored; its errors are ignored, the module that
    raised is still the first one called), else the first of :data:`_INPUT_LAYERS` in
    definition order. None when neither finds one."""
    from torch import nn

    if x is not None:
        seen = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod) if not seen else None)
                 for m in model.modules() if type(m).__name__ in _INPUT_LAYERS or
                 (not list(m.children()) and any(True for _ in m.parameters(recurse=False)))]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        except Exception:  # noqa: BLE001 - the probe only looks for the first module called
            pass
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        if seen:
            return seen[0]
    return next((m for m in model.modules() if type(m).__name__ in _INPUT_LAYERS and isinstance(m, nn.Module)), None)


def expected_input(model, x: torch.Tensor | None = None) -> str:
    """What ``model`` takes, in words, from its first layer (:func:`first_layer`), e.g.
    ``"(batch, ..., 30) (Linear with in_features=30)"``; "" when no layer says."""
    m = first_layer(model, x)
    return "" if m is None else _describe_layer(m)


def takes_token_ids(model, x: torch.Tensor | None = None) -> bool:
    """Whether the first layer of ``model`` is an embedding (integer samples are token ids)."""
    m = first_layer(model, x)
    return m is not None and type(m).__name__ in ("Embedding", "EmbeddingBag")
