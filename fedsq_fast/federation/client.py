"""Local training on one client: a pure function of (model, data, options, seed).

Batches come from in-memory tensors, or are read per batch from a
:class:`~fedsq_fast.federation.lazy.LazyImages` (``x[idx]`` either way; no DataLoader),
shuffled by a generator seeded from (seed, round, client), so a client's update does not
depend on what ran before it in the process.
"""
from __future__ import annotations

import time
from dataclasses import KW_ONLY, InitVar, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ClientTimeout(RuntimeError):
    pass


def _opt(help_: str) -> dict:
    return {"help": help_}


@dataclass
class ClientConfig:
    """The client section of a run config (``[client]`` in a config file): how each client
    trains locally. :class:`LocalConfig` adds the strategy's per-round ``prox_mu``; RunConfig
    is made of this section and the others (``federation.config``)."""

    optimizer: str = field(default="sgd", metadata=_opt("local optimizer: " + ", ".join(OPTIMIZERS)))
    lr: float = field(default=0.01, metadata=_opt("local learning rate"))
    momentum: float = field(default=0.9, metadata=_opt("sgd momentum, in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=_opt("local weight decay"))
    local_epochs: int = field(default=1, metadata=_opt("passes over a client's data per round"))
    batch_size: int = field(default=64, metadata=_opt("local batch size"))
    # keyword-only from here: LocalConfig's positional order stays what it was before this
    # section existed (..., batch_size, prox_mu, timeout_s)
    _: KW_ONLY
    # Local batches smaller than this are skipped (the last of an epoch when a client's sample
    # count is not a multiple of batch_size; reshuffled each round, so no sample is lost for
    # good). 2 keeps BatchNorm's training statistics defined; a few more avoid BatchNorm's
    # blow-ups on 2-3 samples over 1x1 feature maps (MobileNetV2 at 32 px; experiments/README.md).
    min_batch_size: int = field(default=2, metadata=_opt("smaller local batches are skipped"))
    client_timeout_s: float | None = field(default=None, metadata=_opt(
        "a client past it is dropped (checked between batches); none: no limit"))
    # Fine-tuning knobs (defaults: off, so recorded runs reproduce). The schedule runs over
    # rounds (the server sets each round's lr; a client trains with one lr per round).
    lr_schedule: str = field(default="constant", metadata=_opt(
        "client lr over rounds: " + ", ".join(LR_SCHEDULES) + " (after warmup_rounds)"))
    warmup_rounds: int = field(default=0, metadata=_opt("rounds of linear lr warm-up: round r <= W trains at lr*r/W"))
    lr_step_rounds: int = field(default=10, metadata=_opt("step: lr x lr_gamma every this many rounds"))
    lr_gamma: float = field(default=0.1, metadata=_opt("step: the factor, in (0, 1]"))
    lr_min: float = field(default=0.0, metadata=_opt("cosine: the lr of the last round, in [0, lr]"))
    clip_grad_norm: float | None = field(default=None, metadata=_opt(
        "clip each local step's gradient to this global L2 norm; none: off"))
    label_smoothing: float = field(default=0.0, metadata=_opt("cross-entropy label smoothing, in [0, 1)"))
    precision: str = field(default="fp32", metadata=_opt(
        "local training and evaluation: fp32, bf16 (autocast), fp16 (autocast + gradient scaler; CUDA only)"))


def round_lr(c: ClientConfig, rnd: int, rounds: int) -> float:
    """The client learning rate of round ``rnd`` (1-based) of ``rounds``: linear warm-up
    over ``warmup_rounds`` (round r <= W: lr * r / W), then ``lr_schedule`` over the rounds
    left: constant; step (lr * lr_gamma ** (k // lr_step_rounds), k rounds after warm-up);
    cosine from lr down to lr_min at the last round."""
    import math

    w = c.warmup_rounds
    if rnd <= w:
        return c.lr * rnd / w
    k, left = rnd - w - 1, max(1, rounds - w - 1)  # k = 0 at the first round after warm-up
    if c.lr_schedule == "step":
        return c.lr * c.lr_gamma ** (k // c.lr_step_rounds)
    if c.lr_schedule == "cosine":
        t = min(1.0, k / left)
        return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1.0 + math.cos(math.pi * t))
    return c.lr


@dataclass
class LocalConfig(ClientConfig):
    """One client's options for one round: the client section plus the strategy's
    ``prox_mu`` (FedProx; 0 otherwise). ``LocalConfig(**dataclasses.asdict(c))`` rebuilds it
    (the Flower path sends it as JSON). ``timeout_s``: the old name of ``client_timeout_s``
    (still accepted, with a DeprecationWarning)."""

    prox_mu: float = 0.0
    timeout_s: InitVar[float | None] = None

    def __post_init__(self, timeout_s):
        if timeout_s is not None:
            import warnings

            warnings.warn("LocalConfig(timeout_s=...) is deprecated; use client_timeout_s=", DeprecationWarning,
                          stacklevel=3)
            if self.client_timeout_s is not None and self.client_timeout_s != timeout_s:
                raise TypeError(f"LocalConfig: timeout_s={timeout_s!r} and client_timeout_s="
                                f"{self.client_timeout_s!r} disagree; give client_timeout_s only")
            self.client_timeout_s = timeout_s


# read access under the old name (the InitVar above only covers construction)
LocalConfig.timeout_s = property(lambda self: self.client_timeout_s,
                                 doc="Deprecated alias of ``client_timeout_s``.")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, round, client, ...), stable across processes."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0]
               >> np.uint64(1))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def make_optimizer(params, cfg: LocalConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {cfg.optimizer!r}")


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LocalConfig, seed: int,
                transform=None, sample_idx: torch.Tensor | None = None, augment=None) -> dict:
    """Train ``model`` in place on (x, y); returns {num_samples, loss, steps, seconds}.

    FedProx: the gradient of (mu/2)||w - w0||^2, mu (w - w0), is added after
    backward (w0: the weights received). A client past ``client_timeout_s`` raises
    :class:`ClientTimeout` at the next batch. ``sample_idx`` (one dataset index
    per row of x) goes to the model's forward: a DualCopy model with a MaskCache
    then reuses each sample's structural masks. ``augment(x, generator)``
    (:class:`~fedsq_fast.federation.augment.Augment`) augments each batch where it lives,
    before ``transform``, with a CPU generator seeded from ``seed`` (so from (seed, round,
    client)): give no ``sample_idx`` with it (augmented masks are not the cached ones).
    """
    if augment is not None and sample_idx is not None:
        raise ValueError("local_train: sample_idx (the mask cache) with augment: cached masks belong to "
                         "unaugmented samples; pass sample_idx=None")
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    opt = make_optimizer(params, cfg)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = None
    if augment is not None:
        from .augment import AUGMENT_SEED_TAG

        aug_gen = torch.Generator().manual_seed(derive_seed(seed, AUGMENT_SEED_TAG))
    torch.manual_seed(seed)  # dropout and any other global-RNG use inside the model
    model.train()
    dev = _device_of(model)
    n = int(y.numel())
    total, steps = 0.0, 0
    smoothing = getattr(cfg, "label_smoothing", 0.0)
    clip = getattr(cfg, "clip_grad_norm", None)
    zeros = []  # _clip_'s reference for the CPU norm, made once per call, not per step
    precision = getattr(cfg, "precision", "fp32")
    # fp16's narrow range needs the loss scaled (and steps with Inf/NaN gradients skipped)
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            if cfg.client_timeout_s is not None and time.perf_counter() - t0 > cfg.client_timeout_s:
                raise ClientTimeout(f"timed out after {time.perf_counter() - t0:.2f} s "
                                    f"(client_timeout_s={cfg.client_timeout_s})")
            idx = perm[i:i + cfg.batch_size]
            if idx.numel() < cfg.min_batch_size and n >= cfg.min_batch_size:
                continue  # a batch of one breaks BatchNorm's training statistics; of 2-3, it can blow up
            xb = x[idx].to(dev, non_blocking=True)  # no-op when the data lives there
            if augment is not None:
                xb = augment(xb, aug_gen)
            if transform is not None:
                xb = transform(xb)
            with autocast(dev, precision):
                out = model(xb) if sample_idx is None else model(xb, sample_idx[idx])
                loss = F.cross_entropy(out, y[idx].to(dev, non_blocking=True), label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is not None:
                scaler.unscale_(opt)  # FedProx's term and clipping see the true gradient
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        if p.grad is not None:
                            p.grad.add_(p - a, alpha=cfg.prox_mu)
            if clip is not None:
                _clip_(params, clip, zeros)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            # on the device, in float64: no host sync per batch, the same sums as in Python floats
            total = total + loss.detach().double() * idx.numel()
            steps += 1
    total = float(total)
    return {"num_samples": n, "loss": total / max(1, n * cfg.local_epochs), "steps": steps,
            "seconds": time.perf_counter() - t0}


def autocast(dev: torch.device, precision: str):
    """The autocast context of a ``precision`` (fp32: none) on device ``dev``."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=_AMP[precision])


@torch.no_grad()
def _clip_(params, max_norm: float, zeros: list) -> None:
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (as
    torch.nn.utils.clip_grad_norm_), with the norm summed in fixed tiles (fedsq_fast's
    sq_dist): the same number for any thread or worker count, so runs stay identical.
    ``zeros``: an empty list the first time, then the zero tensors it filled (one per param)."""
    from ..ops import sq_dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if grads[0].is_cuda:  # a tensor factor, no host sync per batch (GPU reductions do not depend on threads)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return
    if not zeros:
        zeros.extend(torch.zeros_like(p) for p in params)
    norm = sq_dist(grads, [z for p, z in zip(params, zeros) if p.grad is not None]) ** 0.5
    if norm > max_norm:  # NaN/Inf gradients pass unchanged: the server refuses such an update
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, transform=None,
             batch_size: int = 512, sample_idx: torch.Tensor | None = None,
             precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode (``sample_idx``: as in local_train); ``x``
    a tensor or a :class:`~fedsq_fast.federation.lazy.LazyImages` (read per batch)."""
    losses, correct = eval_sums(model, x, y, transform, batch_size, sample_idx, precision)
    return eval_result(losses, correct, len(y))


@torch.no_grad()
def eval_sums(model: nn.Module, x, y: torch.Tensor, transform=None, batch_size: int = 512,
              sample_idx: torch.Tensor | None = None, precision: str = "fp32",
              start: int = 0, stop: int | None = None) -> tuple[list, int]:
    """The pieces :func:`evaluate` is made of, over samples ``[start, stop)`` of (x, y):
    each batch's summed cross-entropy (a Python float, batches of ``batch_size`` counted from
    ``start``, in order) and the number of correct predictions. ``sample_idx``, when given,
    holds one index per sample of the range (``sample_idx[j]`` for sample ``start + j``).
    A range that starts on a batch boundary of the whole set computes that set's batches
    exactly (the same rows per batch), so ranges split at batch boundaries and evaluated
    anywhere give, through :func:`eval_result`, the whole set's numbers bit for bit."""
    from .lazy import rows

    stop = len(y) if stop is None else stop
    was = model.training
    model.eval()
    dev = _device_of(model)
    losses, correct = [], 0
    try:
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            xb = rows(x, slice(i, j)).to(dev, non_blocking=True)
            yb = y[i:j].to(dev, non_blocking=True)
            if transform is not None:
                xb = transform(xb)
            with autocast(dev, precision):
                out = model(xb) if sample_idx is None else model(xb, sample_idx[i - start:j - start])
            out = out.float()  # the loss and argmax in float32 whatever the precision
            losses.append(float(F.cross_entropy(out, yb, reduction="sum")))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was)
    return losses, correct


def eval_result(losses, correct: int, n: int) -> tuple[float, float]:
    """(mean loss, accuracy) from :func:`eval_sums`' pieces of ``n`` samples, the batch sums
    given in batch order. Added one by one from 0.0 (never ``sum()``: Python 3.12's sum of
    floats is compensated, so it would not be the loop :func:`evaluate` always ran)."""
    loss = 0.0
    for v in losses:
        loss += v
    n = max(1, n)
    return loss / n, correct / n
