"""Data and initial model of a run: load, split (server validation / client pool),
subsample, resize and partition once for all methods; build the initial model."""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import adapter, seeds
from .client import derive_seed
from .config import RunConfig, resolve_device
from .data import DataBundle, load_dataset
from .augment import make_augment
from .config import MethodSpec
from .inputs import InputSpec, InputTransform, TensorSpec, TensorTransform, input_transform_for
from .lazy import LazyImages, is_lazy, is_random, resized, rows, take
from .partition import ClientRanges, class_counts, make_partition

log = logging.getLogger("fedsq_fast.federation")


@dataclass
class FedData:
    """Everything data-related that all methods of one (dataset, seed, partition) share."""

    x: torch.Tensor | LazyImages  # client pool, resized (LazyImages: read per batch, see .lazy)
    y: torch.Tensor
    parts: list  # per client: contiguous index ranges into x, y (the pool is stored client by client)
    val_x: torch.Tensor | LazyImages
    val_y: torch.Tensor
    test_x: torch.Tensor | LazyImages
    test_y: torch.Tensor
    probe: torch.Tensor  # fixed batch for gate stability
    transform: InputTransform | TensorTransform
    num_classes: int
    classes: tuple = ()
    counts: np.ndarray | None = None
    # federated evaluation (client_test_fraction > 0, federation/evaluation.py): the clients' local
    # test splits stored client by client (ctest_parts[k]: client k's rows); None when off
    ctest_x: torch.Tensor | LazyImages | None = None
    ctest_y: torch.Tensor | None = None
    ctest_parts: ClientRanges | None = None

    @property
    def device(self) -> torch.device:
        return self.x.device

    _TENSORS = ("x", "y", "val_x", "val_y", "test_x", "test_y", "probe", "ctest_x", "ctest_y")

    def _tensors(self):
        return [f for f in self._TENSORS if getattr(self, f) is not None]

    @property
    def lazy(self) -> bool:
        """Whether some images are read per batch (:class:`~.lazy.LazyImages`)."""
        return any(is_lazy(getattr(self, f)) for f in ("x", "val_x", "test_x", "ctest_x"))

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory tensors (images read per batch count nothing)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self._tensors()
                   if not is_lazy(getattr(self, f)))

    def to(self, device) -> "FedData":
        """A copy with every in-memory tensor on ``device`` (the same object when already
        there); images read per batch stay on the host, each batch is moved as used."""
        device = torch.device(device)
        if self.device == device or (self.lazy and self.probe.device == device):
            return self
        mv = {f: getattr(self, f).to(device) for f in self._tensors() if not is_lazy(getattr(self, f))}
        return dataclasses.replace(self, **mv, transform=copy.deepcopy(self.transform).to(device))


def place_data(data: FedData, device) -> FedData:
    """``data`` on ``device`` when it takes at most half the GPU's free memory; otherwise
    the splits stay in host memory and each batch is copied as it is used (only the probe
    batch moves)."""
    device = torch.device(device)
    if data.device == device or data.probe.device == device:
        return data
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if data.nbytes > free // 2:
            log.warning("data (%.1f GB) kept in host memory: more than half of %s's free %.1f GB; "
                        "batches are copied as used", data.nbytes / 1e9, device, free / 1e9)
            return dataclasses.replace(data, probe=data.probe.to(device))
    return data.to(device)


def prepare_data(cfg: RunConfig, bundle: DataBundle | None = None, model_name: str | None = None,
                 *, input_spec: InputSpec | TensorSpec | None = None, model=None, augment_fn=None) -> FedData:
    """Load, split (server validation / client pool), subsample, resize and partition;
    the tensors end on ``cfg.device`` when they fit (:func:`place_data`), which saves a
    host-to-device copy per batch.

    The model's input spec (channels, size, normalisation) is, in order: ``input_spec``,
    what ``model`` states (:func:`~fedsq_fast.federation.data.input_spec_of`), the zoo spec
    of ``model_name`` or ``cfg.model``. Tensor data (``bundle.train.kind == "tensor"``:
    features, token ids, sequences) is used as given; ``input_spec`` may then be a
    :class:`TensorSpec` (integers as token ids or numbers; default numbers). ``bundle``: your
    own data (:func:`make_bundle`); default: ``cfg.dataset`` loaded from its source.

    ``cfg.augment`` (none, flip, crop_flip; ``"callable:..."`` with ``augment_fn``, the
    callable itself) is set on the transform, which local training applies to each training
    batch (:mod:`.augment`). With augmentation, or a training Dataset whose items change
    between reads, FedSQ's mask cache steps aside for training (logged): the gates are
    computed from each batch as it is fed."""
    bundle = bundle if bundle is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.in_memory)
    tr = bundle.train
    n = len(tr)
    if cfg.val_size >= n:
        raise ValueError(f"val_size ({cfg.val_size}) must be smaller than the training data ({n} samples)")
    perm = np.random.default_rng(derive_seed(cfg.seed, seeds.SPLIT)).permutation(n)
    val_idx = perm[:cfg.val_size]
    pool_idx = perm[cfg.val_size:]
    if cfg.max_train_samples is not None:
        pool_idx = pool_idx[:cfg.max_train_samples]
    per = {"dirichlet": cfg.min_partition_size, "quantity": cfg.min_partition_size,
           "shards": cfg.shards_per_client}.get(cfg.partition, 1)  # samples a client needs at least
    need = cfg.num_clients * max(1, per)
    if need > len(pool_idx):
        lower = "shards_per_client" if cfg.partition == "shards" else "min_partition_size"
        raise ValueError(f"num_clients: {cfg.num_clients} clients need at least {need} samples in the client pool, "
                         f"which holds {len(pool_idx)} ({n} training samples - val_size {cfg.val_size}"
                         + (f", capped by max_train_samples {cfg.max_train_samples}" if cfg.max_train_samples else "")
                         + f"); lower num_clients, {lower} or val_size")
    te = bundle.test
    te_idx = np.random.default_rng(derive_seed(cfg.seed, seeds.SPLIT, 1)).permutation(len(te))
    if cfg.max_test_samples is not None:
        te_idx = te_idx[:cfg.max_test_samples]
    tf = _transform(cfg, tr, te, model_name, model, input_spec, augment_fn)
    pool, val, test = tr.subset(pool_idx), tr.subset(val_idx), te.subset(te_idx)
    parts = make_partition(cfg.partition, pool.y.numpy(), cfg.num_clients, alpha=cfg.alpha,
                           min_partition_size=cfg.min_partition_size,
                           shards_per_client=cfg.shards_per_client,
                           seed=derive_seed(cfg.seed, seeds.PART))
    ctest = None
    if cfg.client_test_fraction:  # each client's test split, taken from its partition before its training data
        from .evaluation import client_test_split

        parts, tparts = client_test_split(parts, cfg.client_test_fraction, cfg.seed)
        torder = torch.from_numpy(np.concatenate(tparts))
        ctest = (resized(tf, take(pool.x, torder)), pool.y[torder], ClientRanges([len(p) for p in tparts]))
    warn_little_data(cfg, n, [len(p) for p in parts])
    counts = class_counts(pool.y.numpy(), parts, tr.num_classes)
    # Store the pool client by client: a client's data is then a view (no gather per round).
    order = torch.from_numpy(np.concatenate(parts))
    parts = ClientRanges([len(p) for p in parts])  # one bound per client, not an array per client
    vx = resized(tf, val.x)  # images read per batch (LazyImages) are resized per batch
    data = FedData(resized(tf, take(pool.x, order)), pool.y[order], parts, vx, val.y, resized(tf, test.x), test.y,
                   rows(vx, slice(0, cfg.probe_size)), tf, tr.num_classes, tr.classes, counts)
    if ctest is not None:
        data.ctest_x, data.ctest_y, data.ctest_parts = ctest
    return place_data(data, resolve_device(cfg.device))


def _transform(cfg, tr, te, model_name, model, input_spec, augment_fn):
    """The per-batch input transform of the data's kind, with the run's augmentation."""
    kind = getattr(tr, "kind", "images")
    aug = make_augment(cfg.augment, augment_fn)
    if kind == "tensor":
        if isinstance(input_spec, InputSpec):
            raise ValueError(f"input_spec: InputSpec describes images, but the data is {tuple(tr.x.shape[1:])} "
                             "samples used as given (features, token ids or sequences); pass a model without a "
                             "Conv2d, or image data (N, C, H, W)")
        if cfg.image_size is not None:
            raise ValueError(f"image_size: {cfg.image_size} resizes images; this data is {tuple(tr.x.shape[1:])} "
                             "samples used as given (features, token ids or sequences): remove image_size")
        if aug is not None and aug.images_only:
            raise ValueError(f"augment: {cfg.augment!r} augments images (N, C, H, W); this data is "
                             f"{tuple(tr.x.shape[1:])} samples used as given (features, token ids or sequences): "
                             "use augment = 'none', or a callable through federate(augment=fn)")
        spec = input_spec if isinstance(input_spec, TensorSpec) else TensorSpec()
        tf = TensorTransform(spec.integers, augment=aug)
    else:
        if isinstance(input_spec, TensorSpec):
            raise ValueError("input_spec: TensorSpec describes tensor data, but the data is images "
                             f"{tuple(tr.x.shape[1:])}; pass an InputSpec(channels, size, mean, std) or none")
        tf = input_transform_for(model_name or cfg.model, model=model, image_size=cfg.image_size,
                                 data_channels=tr.x.shape[1], spec=input_spec)
        tf.augment = aug
    fedsq = any(MethodSpec.parse(m).dual for m in cfg.methods)
    why = (f"augment = {aug.name!r} draws new training batches every step" if aug is not None
           else "the training data changes between reads (random transforms)" if is_random(tr.x) else None)
    if why is not None:
        log.info("%s: %s", "data" if aug is None else "augment", why + (
            "; FedSQ's mask cache steps aside for training: the gates are computed from each batch as fed"
            if fedsq and cfg.mask_cache else ""))
    if is_random(te.x) or is_random(tr.x):
        log.info("data: validation%s read through a random transform: its numbers vary with the draws; "
                 "give federate a test set without augmentation for stable ones",
                 " and test data are" if is_random(te.x) else " data is")
    return tf


def warn_little_data(cfg: RunConfig, n_train: int, sizes: list) -> list[str]:
    """Warn (and return the messages) when the config leaves clients too little to learn
    from: the median client gets less than one batch per round, or the server's validation
    split takes most of the training data. Training still runs: small federations are
    legitimate, silent ones that cannot learn are not."""
    msgs = []
    med = float(np.median(sizes)) if len(sizes) else 0.0
    if med * cfg.local_epochs < cfg.batch_size:
        msgs.append(f"the median client holds {med:g} samples: with batch_size={cfg.batch_size} and "
                    f"local_epochs={cfg.local_epochs} that is about one optimizer step per client per round, "
                    "too few to learn; lower batch_size or num_clients, raise local_epochs, or give the "
                    "clients more data (val_size takes the server's validation split first)")
    if cfg.val_size > n_train // 2:
        msgs.append(f"val_size={cfg.val_size} takes {100 * cfg.val_size / n_train:.0f}% of the {n_train} training "
                    "samples for the server's validation split; lower it so the clients keep most of the data")
    for m in msgs:
        warnings.warn(m, UserWarning, stacklevel=3)
    return msgs


def call_model_fn(model_fn, seed: int):
    """``model_fn()`` with torch's RNG seeded from the run's seed: every method (and a resumed
    run) starts from the same initial model even when model_fn draws a random init."""
    torch.manual_seed(derive_seed(seed, seeds.MODEL))
    return model_fn()


def build_method_model(cfg: RunConfig, dual: bool, data: FedData) -> nn.Module:
    """The zoo model of ``cfg.model``, the same initial model (same head init) for every
    method; :func:`adapter.method_model` then converts it for fedsq methods."""
    torch.manual_seed(derive_seed(cfg.seed, seeds.MODEL))
    return adapter.build_model(cfg.model, data.num_classes, cfg.weights,
                               in_channels=data.transform.channels,
                               image_size=int(data.x.shape[-1]))
