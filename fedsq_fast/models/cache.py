"""MaskCache: per-sample packed structural masks, so later epochs/rounds skip
the structural forward entirely.

Layout: one uint8 row per sample (``num_samples x row_bytes``, in RAM or a
numpy memmap on disk). A row holds, for every gate site and every bit tensor
of that site, ``ceil(k/8)`` bytes for the k elements of one sample (the batch
is outermost in memory for contiguous and channels_last tensors, so a sample's
bits are a contiguous run of the batch's bits). Rows are assembled back into a
batch's bit tensors by gathering; sites where k is not a multiple of 8 are
re-packed bit by bit (correct, slower).

Budget: ``max_bytes`` bounds the row storage (DEFAULT 1 GiB, ours).
``policy='error'`` (DEFAULT) raises MaskCacheFullError when the rows for
``num_samples`` samples do not fit; ``policy='partial'`` caches the samples
with index < capacity and recomputes the others every time (no eviction, so
no thrashing; deterministic); ``policy='spill'`` keeps the samples with index
< capacity in RAM and the others in a memmap file in a temporary folder (under
``spill_dir``, default the system's temp folder) that :meth:`MaskCache.close`
removes (a finalizer too, if nobody calls it). Where the disk has no room for
the spilled rows, 'spill' recomputes them as 'partial' does (with a warning):
writing a memmap past a full disk would kill the process.

Soft gates (``dualcopy(soft_gates=True)`` with a SiLU/GELU/... site): their gates
are tensors of the activation's dtype, not bits, so a cache bound to such a model
steps aside: every batch runs the structural copy, nothing is stored (``nbytes``
stays 0, every sample counts as a miss) and :attr:`MaskCache.stepped_aside` says why.
A soft-gated model whose sites are all ReLU-like caches as before.

Random data pipelines: masks are a function of the input, so a random
transform (augmentation) makes cached masks wrong. The cache refuses a
dataset whose transforms look random (``check_pipeline``) and, by default,
checks a fingerprint of every cached sample's input on each hit
(``check_inputs=True``); both are skipped with ``allow_random_transforms=True``. A changed
input raises (``on_change='error'``, DEFAULT) or makes the cache step aside for good
(``on_change='step_aside'``, what the federation engine uses: logged once, every batch's
masks are then computed by the structural copy from the batch as fed, nothing is stored).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
import weakref

import numpy as np
import torch

from ..layers import SiteMasks
from .. import reference as _ref

__all__ = ["MaskCache", "MaskCacheFullError", "IndexedDataset", "random_transforms_in"]

DEFAULT_MAX_BYTES = 1 << 30
ON_CHANGE = ("error", "step_aside")
log = logging.getLogger("fedsq_fast.federation")


class MaskCacheFullError(RuntimeError):
    """The cache's rows do not fit in its memory budget."""


def random_transforms_in(obj, _depth=0) -> list[str]:
    """Names of transforms in a dataset / DataLoader / transform that look random
    (torchvision ``Random*``, AutoAugment, RandAugment, ColorJitter, ...)."""
    if obj is None or _depth > 8:
        return []
    found = []
    name = type(obj).__name__
    random_names = {"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix",
                    "GaussianBlur", "ElasticTransform", "RandomApply", "RandomChoice", "RandomOrder"}
    if name.startswith("Random") or name in random_names:
        found.append(name)
    for attr in ("dataset", "transform", "transforms", "target_transform"):
        sub = getattr(obj, attr, None)
        if sub is None or sub is obj:
            continue
        if isinstance(sub, (list, tuple)):
            for s in sub:
                found += random_transforms_in(s, _depth + 1)
        elif attr != "transforms" or not isinstance(sub, torch.Tensor):
            found += random_transforms_in(sub, _depth + 1)
    return found


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so items come back as ``(*item, index)`` for ``sample_idx``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        item = item if isinstance(item, tuple) else (item,)
        return (*item, i)


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Per-sample (sum, position-weighted sum) in float64: catches flips, crops, jitter."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    w = torch.arange(1, flat.shape[1] + 1, dtype=torch.float64, device=flat.device).remainder_(251).add_(1)
    return torch.stack([flat.sum(1), flat @ w], 1).cpu()


def _unpack_rows(rows: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=rows.device)
    return ((rows.unsqueeze(-1) >> shifts) & 1).reshape(rows.shape[0], -1)


def _pack_rows(bits01: torch.Tensor) -> torch.Tensor:
    """[B, 8*r] 0/1 uint8 -> [B, r] packed LSB first."""
    w = (2 ** torch.arange(8, dtype=torch.int32, device=bits01.device))
    return (bits01.view(bits01.shape[0], -1, 8).to(torch.int32) * w).sum(-1).to(torch.uint8)


class MaskCache:
    """Per-sample cache of a DualCopy model's structural masks.

    >>> cache = MaskCache(len(train_set), dataset=train_set)    # refuses augmentation
    >>> model.attach_cache(cache)
    >>> logits = model(x, sample_idx=idx)                       # idx: dataset indices

    num_samples: the dataset size (indices are 0..num_samples-1).
    max_bytes: budget for the row storage (DEFAULT 1 GiB). policy: 'error' | 'partial' | 'spill'.
    path: store rows in a numpy memmap file there (created/overwritten) instead of RAM.
    spill_dir: where policy='spill' makes its temporary folder (DEFAULT: the system's).
    dataset: a dataset/DataLoader to check for random transforms now.
    allow_random_transforms: skip the pipeline check and input fingerprints.
    check_inputs: verify each hit's input fingerprint (DEFAULT True; ~1 cheap pass).
    on_change: what a changed input does: ``'error'`` (DEFAULT) raises ValueError;
    ``'step_aside'`` logs once and stops caching (:attr:`stepped_aside` says why): masks are
    computed from each batch from then on, so results equal an uncached run.
    """

    def __init__(self, num_samples: int, *, max_bytes: int = DEFAULT_MAX_BYTES, policy: str = "error",
                 path=None, dataset=None, allow_random_transforms: bool = False,
                 check_inputs: bool = True, spill_dir=None, on_change: str = "error"):
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if policy not in ("error", "partial", "spill"):
            raise ValueError(f"policy must be 'error', 'partial' or 'spill', got {policy!r}")
        if on_change not in ON_CHANGE:
            raise ValueError(f"on_change must be 'error' or 'step_aside', got {on_change!r}")
        if policy == "spill" and path is not None:
            raise ValueError("policy='spill' writes the rows past max_bytes to a temporary file; path= puts "
                             "every row in a file of yours: give one or the other")
        self.num_samples = num_samples
        self.max_bytes = max_bytes
        self.policy = policy
        self.path = None if path is None else os.fspath(path)
        self.allow_random_transforms = bool(allow_random_transforms)
        self.check_inputs = bool(check_inputs) and not self.allow_random_transforms
        self.on_change = on_change
        self.stepped_aside = None  # why the cache stepped aside (on_change='step_aside'), or None
        self.layout = None  # [(n_bit_tensors, k per sample, channels_last)] per site
        self.row_bytes = None
        self.capacity = None
        self._rows = None
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        self.spill_path = None  # the memmap of rows [ram_capacity, capacity) under policy='spill'
        self.ram_capacity = None
        self._spill = None
        self._spill_cleanup = None
        self._filled = torch.zeros(num_samples, dtype=torch.bool)
        self._fp = torch.zeros(num_samples, 2, dtype=torch.float64)
        self._owner = None
        self.hits = 0
        self.misses = 0
        if dataset is not None:
            self.check_pipeline(dataset)

    # -- checks ----------------------------------------------------------------
    def check_pipeline(self, dataset) -> None:
        """Raise ValueError if ``dataset`` (or a DataLoader's dataset) has random transforms."""
        if self.allow_random_transforms:
            return
        found = random_transforms_in(dataset)
        if found:
            raise ValueError(
                f"MaskCache refuses a random data pipeline ({', '.join(sorted(set(found)))}): cached "
                "masks would belong to another view of each sample. Drop the augmentation, or pass "
                "allow_random_transforms=True to reuse the first view's masks on purpose."
            )

    def bind(self, model) -> None:
        """Tie the cache to one structural copy (called by attach_cache)."""
        if any(s.kind == "maxpool" for s in model.sites):
            raise ValueError("MaskCache does not store max-pool indices: build the model with "
                             "gate_maxpool=False to use a cache")
        fp = model.structural_fingerprint()
        if self._owner is not None and self._owner != fp:
            raise ValueError("this MaskCache holds masks of another structural copy; use a new cache")
        self._owner = fp
        soft = [s.name for s in model.sites if getattr(s, "soft", False)]
        # a soft gate is one value per element (4 bytes in float32), not a bit: storing
        # it per sample would cost 32x a binary cache, and the structural forward up to
        # the last soft site is most of the forward anyway
        if soft:
            self.stepped_aside = (
                f"{len(soft)} soft gate site(s) ({', '.join(soft[:3])}{', ...' if len(soft) > 3 else ''}): their "
                "gates are tensors, not bits; the structural copy runs on every batch and nothing is cached")

    # -- size ------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: row storage (in RAM, or the ``path=`` file) plus the per-sample
        bookkeeping; spilled rows are :attr:`spill_bytes`."""
        rows = 0 if self._rows is None else self._rows.numel()
        return rows + self._filled.numel() + self._fp.numel() * 8

    @property
    def spill_bytes(self) -> int:
        """Bytes of rows spilled to the temporary file (policy='spill')."""
        return 0 if self._spill is None else int(self._spill.size)

    def __len__(self):
        return int(self._filled.sum())

    def __repr__(self):
        if self.stepped_aside is not None:
            return f"MaskCache(steps aside: {self.stepped_aside})"
        return (f"MaskCache({len(self)}/{self.num_samples} samples, {self.nbytes} B, "
                f"row={self.row_bytes} B, policy={self.policy!r}, path={self.path!r})")

    def _setup(self, masks, numels):
        self.layout = [(len(m.bits), k, m.channels_last) for m, k in zip(masks, numels)]
        self.row_bytes = sum(n * ((k + 7) // 8) for n, k, _ in self.layout)
        need = self.row_bytes * self.num_samples
        cap = self.num_samples
        if need > self.max_bytes:
            if self.policy == "error":
                raise MaskCacheFullError(
                    f"MaskCache needs {need} bytes ({self.num_samples} samples x {self.row_bytes} B) but "
                    f"max_bytes={self.max_bytes}; raise max_bytes, use path= (disk), or policy='partial' "
                    "or 'spill'"
                )
            cap = self.max_bytes // self.row_bytes
        self.capacity = self.ram_capacity = cap
        if self.policy == "spill" and cap < self.num_samples:
            self._open_spill(cap)
        if self.path is not None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(max(cap, 1), self.row_bytes))
            self._rows = torch.from_numpy(mm)
            self._memmap = mm
        else:
            self._rows = torch.zeros(cap, self.row_bytes, dtype=torch.uint8)

    def _open_spill(self, ram_cap: int) -> None:
        """Rows ``ram_cap..num_samples-1`` in a memmap in a fresh temporary folder, when the
        disk has room for them (with 10% to spare); else they are recomputed ('partial')."""
        n = self.num_samples - ram_cap
        base = self.spill_dir if self.spill_dir is not None else tempfile.gettempdir()
        free = shutil.disk_usage(base).free
        if n * self.row_bytes > 0.9 * free:
            warnings.warn(f"MaskCache: {n * self.row_bytes} bytes of masks past max_bytes do not fit on {base} "
                          f"({free} bytes free); those samples' masks are recomputed", RuntimeWarning, stacklevel=4)
            return
        folder = tempfile.mkdtemp(prefix="fedsq-maskcache-", dir=self.spill_dir)
        # removed by close(), else when the cache is collected or the interpreter exits
        self._spill_cleanup = weakref.finalize(self, shutil.rmtree, folder, True)
        self.spill_path = os.path.join(folder, "rows.bin")
        self._spill = np.memmap(self.spill_path, dtype=np.uint8, mode="w+", shape=(n, self.row_bytes))
        self.capacity = self.num_samples

    def close(self) -> None:
        """Drop every stored row and remove the spill file and its folder (policy='spill').
        The cache stays usable: it is empty again and refills as batches come. A cache with
        ``path=`` is left as it is (its file is yours: :meth:`flush`, :meth:`open`)."""
        if self.path is not None:
            return
        self._spill = None  # unmapped before the file goes
        if self._spill_cleanup is not None:
            self._spill_cleanup()
            self._spill_cleanup = None
        self.spill_path = None
        self._rows, self.layout, self.row_bytes, self.capacity, self.ram_capacity = None, None, None, None, None
        self._filled.zero_()

    def __deepcopy__(self, memo):
        """A copy holds its own rows; a spilling cache's copy starts empty (its rows would
        share the spill file, which the original removes when it closes), and refills."""
        import copy

        if self._spill_cleanup is None:
            new = object.__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
            return new
        new = type(self)(self.num_samples, max_bytes=self.max_bytes, policy=self.policy,
                         allow_random_transforms=self.allow_random_transforms, spill_dir=self.spill_dir,
                         on_change=self.on_change)
        new.check_inputs, new._owner, new.stepped_aside = self.check_inputs, self._owner, self.stepped_aside
        memo[id(self)] = new
        return new

    def _get_rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self._spill is None:
            return self._rows[idx]
        out = torch.empty(idx.numel(), self.row_bytes, dtype=torch.uint8)
        ram = idx < self.ram_capacity
        out[ram] = self._rows[idx[ram]]
        if not bool(ram.all()):
            disk = (idx[~ram] - self.ram_capacity).numpy()
            out[~ram] = torch.from_numpy(np.asarray(self._spill[disk]))
        return out

    def _put_rows(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        if self._spill is None:
            self._rows[idx] = rows
            return
        ram = idx < self.ram_capacity
        self._rows[idx[ram]] = rows[ram]
        if not bool(ram.all()):
            self._spill[(idx[~ram] - self.ram_capacity).numpy()] = rows[~ram].numpy()

    # -- the main entry --------------------------------------------------------
    def masks(self, model, x_s: torch.Tensor, sample_idx):
        """Masks for a batch: from the cache where every sample is stored, else
        computed by the structural copy (and stored)."""
        idx = torch.as_tensor(sample_idx).reshape(-1).to("cpu", torch.int64)
        if idx.numel() != x_s.shape[0]:
            raise ValueError(f"sample_idx must have one index per row of x ({x_s.shape[0]}), got {idx.numel()}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise ValueError(f"sample_idx must be in [0, {self.num_samples}), got {idx.min()}..{idx.max()}")
        if self._owner is None:
            self.bind(model)
        if model.mask_cache is not self:
            model.attach_cache(self)
        if self.stepped_aside is not None:
            self.misses += idx.numel()
            return model.structural_masks(x_s)
        fp = _fingerprint(x_s) if self.check_inputs else None
        if self._rows is not None:
            cached = idx < self.capacity
            filled = torch.zeros_like(cached)
            filled[cached] = self._filled[idx[cached]]
            if fp is not None and bool(filled.any()):
                old = self._fp[idx[filled]]
                new = fp[filled]
                if not torch.allclose(old, new, rtol=1e-9, atol=1e-6 * (1 + float(new.abs().max()))):
                    if self.on_change == "step_aside":
                        return self._step_aside(model, x_s, idx)
                    raise ValueError(
                        "MaskCache: the input of a cached sample changed (random transform or wrong "
                        "sample_idx?); pass allow_random_transforms=True to reuse the first masks on purpose"
                    )
            if bool(filled.all()):
                self.hits += idx.numel()
                return self._assemble(idx, x_s.device)
        masks = model.structural_masks(x_s)
        self.misses += idx.numel()
        self._store(idx, masks, fp, x_s.shape[0])
        return masks

    def _step_aside(self, model, x_s, idx):
        """Stop caching for good (the inputs change between reads): drop the rows, log why,
        and compute this and every later batch's masks from the batch itself."""
        self.stepped_aside = ("the input of a cached sample changed between reads (random transforms or "
                              "augmentation)")
        log.warning("mask cache steps aside: %s; FedSQ computes the gates from each batch as fed from now on "
                    "(the same results, one structural pass per batch)", self.stepped_aside)
        self.close()
        self.misses += idx.numel()
        return model.structural_masks(x_s)

    def _store(self, idx, masks, fp, batch):
        if self._rows is None:
            # per-sample element count of each site, from the structural output shapes
            numels = [self._site_numel(m, batch) for m in masks]
            self._setup(masks, numels)
        keep = idx < self.capacity
        if not bool(keep.any()):
            return
        parts = []
        for m, (n, k, cl) in zip(masks, self.layout):
            if len(m.bits) != n or m.channels_last != cl:
                raise ValueError("MaskCache: the gate layout changed (input size or memory format?)")
            for b in m.bits:
                parts.append(self._rows_of(b.cpu(), batch, k))
        rows = torch.cat(parts, 1)
        self._put_rows(idx[keep], rows[keep])
        self._filled[idx[keep]] = True
        if fp is not None:
            self._fp[idx[keep]] = fp[keep]

    @staticmethod
    def _site_numel(m, batch):
        if m.numel is None or m.numel % batch:
            raise ValueError("MaskCache: site masks carry no per-sample element count")
        return m.numel // batch

    @staticmethod
    def _rows_of(bits, batch, k):
        rb = (k + 7) // 8
        if k % 8 == 0:
            return bits[: batch * rb].view(batch, rb)
        flat = _unpack_rows(bits.view(1, -1))[0, : batch * k].view(batch, k)
        pad = torch.zeros(batch, rb * 8 - k, dtype=torch.uint8)
        return _pack_rows(torch.cat([flat, pad], 1))

    def _assemble(self, idx, device):
        rows = self._get_rows(idx)
        b = idx.numel()
        out, off = [], 0
        for n, k, cl in self.layout:
            rb = (k + 7) // 8
            bits = []
            for _ in range(n):
                r = rows[:, off: off + rb]
                off += rb
                nbytes = _ref.num_bit_bytes(b * k)
                if k % 8 == 0:
                    flat = r.reshape(-1)
                else:  # re-pack bit by bit: the sample boundaries are not byte aligned
                    bits01 = _unpack_rows(r)[:, :k].reshape(-1)
                    bits01 = torch.cat([bits01, bits01.new_zeros((-(b * k)) % 8)])
                    flat = _pack_rows(bits01.view(1, -1))[0]
                full = torch.zeros(nbytes, dtype=torch.uint8)
                full[: flat.numel()] = flat
                bits.append(full.to(device, non_blocking=True))
            out.append(SiteMasks(bits, cl, b * k))
        return out

    # -- disk ------------------------------------------------------------------
    def flush(self) -> None:
        """Write rows and the bookkeeping next to ``path`` (``path + '.json'``) so
        :meth:`open` can reuse the cache in a later process."""
        if self.path is None:
            raise ValueError("flush() needs a cache created with path=")
        if self._rows is None:
            return
        self._memmap.flush()
        meta = {"num_samples": self.num_samples, "layout": self.layout, "row_bytes": self.row_bytes,
                "capacity": self.capacity, "owner": self._owner,
                "filled": self._filled.nonzero().flatten().tolist(),
                "fp": self._fp.tolist() if self.check_inputs else None}
        tmp = self.path + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, self.path + ".json")

    @classmethod
    def open(cls, path, *, allow_random_transforms=False, check_inputs=True):
        """Reopen a cache written with ``path=`` and :meth:`flush`."""
        path = os.fspath(path)
        if not os.path.isfile(path + ".json"):
            raise FileNotFoundError(f"no MaskCache metadata at {path + '.json'!r} (call flush())")
        with open(path + ".json") as f:
            meta = json.load(f)
        self = cls(meta["num_samples"], max_bytes=max(meta["row_bytes"] * meta["capacity"], 1),
                   policy="partial", allow_random_transforms=allow_random_transforms,
                   check_inputs=check_inputs)
        self.path = path
        self.layout = [tuple(x) for x in meta["layout"]]
        self.row_bytes, self.capacity, self._owner = meta["row_bytes"], meta["capacity"], meta["owner"]
        mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(self.capacity, 1), self.row_bytes))
        self._memmap, self._rows = mm, torch.from_numpy(mm)
        self._filled[meta["filled"]] = True
        if meta["fp"] is not None:
            self._fp = torch.tensor(meta["fp"], dtype=torch.float64)
        elif self.check_inputs:
            self._filled.zero_()  # no fingerprints stored: cannot verify, recompute
        return self
