"""Per-batch augmentation of the clients' training images (config key ``augment``).

Applied by :func:`~fedsq_fast.federation.client.local_train` to each training batch where it
lives (the GPU included: pure torch ops on the batch's device), before the model's input
transform (normalisation), never in evaluation. Its random numbers come from a
``torch.Generator`` on the CPU seeded from the client's seed, itself derived from (seed,
round, client), and are drawn step after step in the client's batch order: a client's
augmented batches do not depend on the process, the worker count or the device.

- ``"none"`` (DEFAULT): no augmentation (recorded runs reproduce as they were);
- ``"flip"``: each image flipped left-right with probability 1/2;
- ``"crop_flip"``: the CIFAR recipe for any image size: zero-pad 4 pixels on each side, take a
  random crop of the original size (offsets uniform in 0..8 per axis), then flip left-right with
  probability 1/2 (torchvision's ``RandomCrop(size, padding=4)`` + ``RandomHorizontalFlip()``
  on images in [0, 1], before normalisation, so the padding is black);
- a callable ``fn(x, generator) -> x`` (Python API, ``federate(augment=fn)``): ``x`` is the
  (B, ...) batch on its device, ``generator`` the client's CPU generator (draw from it, or
  use it to seed your own draws, for runs that reproduce); the result must have ``x``'s
  shape, dtype and device.

Draw order per batch of B images (what tests replay): ``flip``: ``torch.rand(B)`` (flip where
< 0.5); ``crop_flip``: ``torch.randint(0, 2*pad+1, (B,))`` for the row offsets, the same for
the column offsets, then ``torch.rand(B)`` (flip where < 0.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTS", "Augment", "make_augment", "flip_params", "crop_flip_params", "crop_flip", "flip"]

AUGMENTS = ("none", "flip", "crop_flip")
CALLABLE_PREFIX = "callable:"
PAD = 4  # the CIFAR recipe's padding
AUGMENT_SEED_TAG = 0xA0C  # the augmentation generator's seed: derive_seed(client seed, this)


def flip_params(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``batch`` images ``"flip"`` flips (bool, CPU)."""
    return torch.rand(batch, generator=generator) < 0.5


def crop_flip_params(batch: int, generator: torch.Generator, pad: int = PAD):
    """``(row offsets, column offsets, flips)`` of ``"crop_flip"`` for ``batch`` images
    (CPU): offsets into the zero-padded image in ``0..2*pad``, flips bool."""
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    return oy, ox, torch.rand(batch, generator=generator) < 0.5


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W) flipped left-right with probability 1/2."""
    f = flip_params(x.shape[0], generator).to(x.device)
    return torch.where(f.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Pad ``pad`` zeros on each side, random crop of the original size, random left-right
    flip, per image of ``x`` (B, C, H, W), in one gather on ``x``'s device."""
    b, _, h, w = x.shape
    oy, ox, f = crop_flip_params(b, generator, pad)
    dev = x.device
    oy, ox, f = oy.to(dev), ox.to(dev), f.to(dev)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev)
    cols = ox[:, None] + torch.where(f[:, None], w - 1 - cols, cols)  # (B, W), reversed where flipped
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)


class Augment:
    """One augmentation: a name of :data:`AUGMENTS` or a callable (see the module docstring).
    ``aug(x, generator)`` returns the augmented batch; ``name`` is what the config records
    (``"callable:<module>.<name>"`` for a callable)."""

    def __init__(self, kind):
        if callable(kind):
            self.fn = kind
            self.name = CALLABLE_PREFIX + callable_name(kind)
        elif kind in ("flip", "crop_flip"):
            self.fn = {"flip": flip, "crop_flip": crop_flip}[kind]
            self.name = kind
        else:
            raise ValueError(f"augment: must be one of {', '.join(AUGMENTS)} or a callable, got {kind!r}")
        self.images_only = not callable(kind)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.images_only and x.dim() != 4:
            raise ValueError(f"augment: {self.name!r} takes image batches (B, C, H, W), got shape {tuple(x.shape)}")
        out = self.fn(x, generator)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype \
                or out.device != x.device:
            got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise ValueError(f"augment: {self.name} must return a tensor of the batch's shape, dtype and device "
                             f"({tuple(x.shape)} {x.dtype} on {x.device}), got {got}")
        return out

    def __repr__(self) -> str:
        return f"Augment({self.name})"


def callable_name(fn) -> str:
    """``module.qualname`` of a callable (what a config records for it)."""
    mod = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}.{name}"


def make_augment(value, fn=None):
    """The :class:`Augment` of a config value (None for ``"none"``); ``fn``: the callable a
    ``"callable:..."`` value stands for (only the Python API can pass one)."""
    if value in (None, "none"):
        if fn is not None:
            raise ValueError("augment: a callable was given but the config says augment = 'none'")
        return None
    if isinstance(value, str) and value.startswith(CALLABLE_PREFIX):
        if fn is None or not callable(fn):
            raise ValueError(f"augment: {value!r} names a Python callable; pass the callable itself, "
                             "federate(..., augment=fn)")
        return Augment(fn)
    return Augment(value)
