"""Images read per batch: data larger than memory.

:class:`LazyImages` stands where the engine otherwise holds an ``(N, C, H, W)`` float32
tensor of images (``FedData.x``, ``val_x``, ``test_x``): it has the same ``len``, ``shape``
and ``dtype``, and indexing follows torch's own split between views and copies:

- ``x[a:b]`` (a slice) and :meth:`LazyImages.select` give a lazy *view* (an index map into
  the source; nothing is read), as slicing a tensor gives a view;
- ``x[idx]`` (an index tensor, array or list) and ``x[i]`` read those samples only and
  return a float32 tensor, as advanced indexing copies out of a tensor.

So :func:`~fedsq_fast.federation.client.local_train` (``x[idx]`` per batch) runs on it
unchanged. The source is a numpy array (a ``numpy.memmap`` in the intended use) or a torch
tensor, or any map-style Dataset of ``(image, label)`` items. Each batch gets exactly the
conversion the in-memory path applies to the whole set (uint8 / 255, other types as float;
(N, H, W) gets C = 1; the load-time resize, :meth:`InputTransform.resize`), per sample, so a
lazy run computes the in-memory run's numbers bit for bit.

Worker processes (``workers`` > 1) receive the view, not the data: a memmap travels as its
file name, offset, dtype and shape and is opened again there; a Dataset travels as itself
(pickled: an ImageFolder is its list of file names; a Dataset that holds its images in
memory is copied, that is its design).
"""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["LazyImages", "DEFAULT_MEMORY_BUDGET", "is_lazy", "is_random", "take", "rows", "resized",
           "KINDS", "read_item"]

# What a split's samples are: "images" ((C, H, W); uint8 scaled to [0, 1], resized and
# normalised for the model) or "tensor" (features (F,), token ids (L,), sequences (L, F), ...:
# used as given, floats as float32, integers kept as integers).
KINDS = ("images", "tensor")


def _default_budget() -> int:
    # a quarter of the machine's memory: room for the model, the caches and the other splits
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 4 << 30


DEFAULT_MEMORY_BUDGET = _default_budget()


def in_memory_choice(value, key: str = "in_memory"):
    """``"auto"``, True or False from a config value (a bool, or its string from a flag or a
    file: auto / true / false, any case); anything else is a ValueError naming ``key``."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower() if isinstance(value, str) else None
    if v in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[v]
    raise ValueError(f"{key}: must be auto, true or false, got {value!r}")


def _open_memmap(filename, dtype, shape, offset):
    return np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=tuple(shape), offset=offset)


def _memmap_file_offset(arr: np.memmap) -> int:
    """Where ``arr``'s first byte lies in its file (a view of a memmap inherits the parent's
    ``offset`` attribute, not its own, so compute it from the mapping)."""
    import mmap as _mmap

    gran = _mmap.ALLOCATIONGRANULARITY
    start = arr.offset - arr.offset % gran  # where numpy's mapping of the file starts
    base = np.frombuffer(arr._mmap, dtype=np.uint8).ctypes.data
    return start + (arr.ctypes.data - base)


class _ArraySource:
    """Rows of a numpy array (memmap) or torch tensor, read by fancy indexing."""

    def __init__(self, arr, arg: str, kind: str = "images"):
        self.arr, self.arg, self.kind = arr, arg, kind
        if isinstance(arr, torch.Tensor):
            dt = arr.dtype
            if dt == torch.bool or dt.is_complex:
                raise TypeError(f"{arg}: images must be real numbers, got dtype {dt}")
        else:
            if arr.dtype.kind not in "uif":
                raise TypeError(f"{arg}: images must be real numbers, got numpy dtype {arr.dtype}")
        if kind == "images" and arr.ndim not in (3, 4):
            raise ValueError(f"{arg}: images must be (N, C, H, W) or (N, H, W), got shape {tuple(arr.shape)}")
        if kind == "tensor" and arr.ndim < 2:
            raise ValueError(f"{arg}: samples must be at least (N, F) (features), got shape {tuple(arr.shape)}")
        self.n = int(arr.shape[0])
        self.item_shape = (tuple(int(s) for s in arr.shape[1:]) if arr.ndim != 3 or kind == "tensor"
                           else (1, *map(int, arr.shape[1:])))
        self.uint8 = (arr.dtype == torch.uint8) if isinstance(arr, torch.Tensor) else arr.dtype == np.uint8
        self.integer = (not arr.dtype.is_floating_point) if isinstance(arr, torch.Tensor) else arr.dtype.kind in "iu"

    def read(self, base: np.ndarray) -> torch.Tensor:
        if isinstance(self.arr, torch.Tensor):
            x = self.arr[torch.from_numpy(base)]
        else:
            x = torch.from_numpy(np.asarray(self.arr[base]))
        return x.reshape(len(base), *self.item_shape)

    def __reduce__(self):
        a = self.arr
        if isinstance(a, np.memmap) and a.filename is not None and a._mmap is not None:
            if not a.flags.c_contiguous:
                raise ValueError(f"{self.arg}: a memmap view that is not C-contiguous cannot be opened again in a "
                                 "worker process; pass a contiguous memmap of the file")
            arr = (_open_memmap, (a.filename, a.dtype.str, a.shape, _memmap_file_offset(a)))
            return (_rebuild_array_source, (arr, self.arg, self.kind))
        return (_ArraySource, (a, self.arg, self.kind))


def _rebuild_array_source(opener, arg, kind="images"):
    fn, args = opener
    return _ArraySource(fn(*args), arg, kind)


def _item_path(ds, i: int):
    """The file behind item ``i`` of an ImageFolder-like Dataset (``samples``), if it says."""
    try:
        folders = getattr(ds, "folders", None)
        if folders is not None and hasattr(ds, "offsets"):  # data._Folders
            k = int(np.searchsorted(ds.offsets, i, side="right")) - 1
            return _item_path(folders[k], int(i - ds.offsets[k]))
        samples = getattr(ds, "samples", None)
        return str(samples[i][0]) if samples is not None else None
    except Exception:  # only a hint for the error message
        return None


def read_item(ds, i: int, arg: str):
    """``ds[i]``, with an image file that cannot be decoded (PIL's UnidentifiedImageError, a
    truncated file, a decompression bomb: an image of more pixels than PIL allows) reported as
    a one-line ValueError naming ``arg[i]`` and the file, as a bad image is everywhere."""
    try:
        from PIL.Image import DecompressionBombError as _Bomb
    except ImportError:  # pragma: no cover - torchvision brings PIL
        _Bomb = OSError
    try:
        return ds[i]
    except (OSError, _Bomb) as e:
        path = _item_path(ds, i)
        where = f" ({path})" if path else ""
        raise ValueError(f"{arg}[{i}]{where}: not a readable image ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def item_image(item, arg: str, i: int, kind: str = "images") -> torch.Tensor:
    """The sample of one Dataset item in its own dtype: an image as a (C, H, W) tensor
    (``kind="images"``; (H, W) gets C = 1, a PIL image is converted), any other sample as
    the tensor it is (``kind="tensor"``)."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        what = "image" if kind == "images" else "sample"
        raise ValueError(f"{arg}[{i}]: items must be ({what}, label) pairs, got {type(item).__name__}")
    img = item[0]
    if kind == "tensor":
        if not isinstance(img, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{arg}[{i}]: sample must be a tensor or array, got {type(img).__name__}")
        return torch.as_tensor(img)
    if not isinstance(img, (torch.Tensor, np.ndarray)):
        if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
            from torchvision.transforms.functional import pil_to_tensor

            img = pil_to_tensor(img)
        else:
            raise TypeError(f"{arg}[{i}]: image must be a tensor, array or PIL image, got {type(img).__name__}")
    img = torch.as_tensor(img)
    if img.dim() == 2:
        img = img.unsqueeze(0)
    return img


class _DatasetSource:
    """Items of a map-style Dataset, read one by one and stacked per batch."""

    def __init__(self, ds, arg: str, kind: str = "images"):
        self.ds, self.arg, self.kind = ds, arg, kind
        self.n = len(ds)
        if self.n == 0:
            raise ValueError(f"{arg}: the dataset is empty")
        first = item_image(read_item(ds, 0, arg), arg, 0, kind)
        if kind == "images" and first.dim() != 3:
            raise ValueError(f"{arg}[0]: image must be (C, H, W) or (H, W), got shape {tuple(first.shape)}")
        if kind == "tensor" and first.dim() < 1:
            raise ValueError(f"{arg}[0]: sample must be at least (F,) (features), got a scalar")
        if first.dtype == torch.bool or first.is_complex():
            raise TypeError(f"{arg}[0]: samples must be real numbers, got dtype {first.dtype}")
        self.item_shape, self.dtype = tuple(first.shape), first.dtype
        self.uint8 = first.dtype == torch.uint8
        self.integer = not first.dtype.is_floating_point

    def read(self, base: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(base), *self.item_shape), dtype=self.dtype)
        for j, i in enumerate(base.tolist()):
            img = item_image(read_item(self.ds, i, self.arg), self.arg, i, self.kind)
            if tuple(img.shape) != self.item_shape:
                raise ValueError(f"{self.arg}[{i}]: {'image' if self.kind == 'images' else 'sample'} shape "
                                 f"{tuple(img.shape)} differs from item 0's "
                                 f"{self.item_shape}; give the dataset a transform that resizes "
                                 "(e.g. torchvision.transforms.Resize((32, 32)))")
            if img.dtype != self.dtype:
                raise TypeError(f"{self.arg}[{i}]: {'image' if self.kind == 'images' else 'sample'} dtype "
                                f"{img.dtype} differs from item 0's {self.dtype}")
            out[j] = img
        return out


class LazyImages:
    """``(N, C, H, W)`` float32 images read per batch from ``source`` (see the module
    docstring): a numpy array or memmap, a torch tensor, or a map-style Dataset of
    ``(image, label)`` items. ``arg`` names the data in errors. Slices and :meth:`select`
    give views; index tensors/arrays read. Build one with :func:`~.data.make_bundle`
    (``in_memory=False``, or data past its memory budget) rather than by hand."""

    def __init__(self, source, arg: str = "images", kind: str = "images", random: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if isinstance(source, (np.ndarray, torch.Tensor)):
            self._src = _ArraySource(source, arg, kind)
        elif hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            self._src = _DatasetSource(source, arg, kind)
        else:
            raise TypeError(f"{arg}: expected a numpy array/memmap, a tensor or a map-style Dataset, "
                            f"got {type(source).__name__}")
        self.arg = arg
        self._index = None  # positions -> source rows; None: the identity
        self._resize = None  # an InputTransform whose resize() runs per batch
        self.reads = 0  # samples read so far (this view; a diagnostic)
        # a Dataset whose items change between reads (random transforms): never read into memory
        self.random = bool(random)

    @property
    def kind(self) -> str:
        """``"images"`` or ``"tensor"`` (see :data:`KINDS`)."""
        return self._src.kind

    # ------------------------------------------------------------------ tensor-like
    def __len__(self) -> int:
        return self._src.n if self._index is None else len(self._index)

    @property
    def shape(self) -> torch.Size:
        shape = self._src.item_shape
        if self._resize is not None and self._resize.size is not None:
            shape = (*shape[:-2], int(self._resize.size), int(self._resize.size))
        return torch.Size((len(self), *shape))

    @property
    def dtype(self) -> torch.dtype:
        """float32, but integer samples of kind "tensor" (token ids), which stay int64."""
        return torch.int64 if self._src.kind == "tensor" and self._src.integer else torch.float32

    device = torch.device("cpu")

    @property
    def ndim(self) -> int:
        return 1 + len(self._src.item_shape)

    def dim(self) -> int:
        return self.ndim

    def size(self, d=None):
        return self.shape if d is None else self.shape[d]

    def to(self, *args, **kwargs) -> "LazyImages":
        """Itself: batches are read on the host and moved where they are used."""
        return self

    def __repr__(self):
        src = type(self._src.arr if isinstance(self._src, _ArraySource) else self._src.ds).__name__
        return f"LazyImages({tuple(self.shape)}, kind={self.kind}{', random' if self.random else ''}, source={src})"

    # ------------------------------------------------------------------ indexing
    def _positions(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        if isinstance(key, torch.Tensor):
            key = key.detach().cpu().numpy()
        pos = np.asarray(key)
        if pos.dtype == np.bool_:
            if pos.shape != (n,):
                raise IndexError(f"{self.arg}: a boolean index must have shape ({n},), got {pos.shape}")
            return np.nonzero(pos)[0].astype(np.int64)
        if pos.size == 0:
            return np.zeros(0, dtype=np.int64)
        if pos.dtype.kind not in "iu":
            raise IndexError(f"{self.arg}: indices must be integers, got {pos.dtype}")
        pos = pos.astype(np.int64).reshape(-1)
        if int(pos.min()) < -n or int(pos.max()) >= n:
            raise IndexError(f"{self.arg}: index out of range for {n} images "
                             f"(got {int(pos.min())}..{int(pos.max())})")
        return np.where(pos < 0, pos + n, pos)

    def _base(self, pos: np.ndarray) -> np.ndarray:
        return pos if self._index is None else self._index[pos]

    def _view(self, index, resize) -> "LazyImages":
        v = object.__new__(LazyImages)
        v._src, v.arg, v._index, v._resize, v.reads = self._src, self.arg, index, resize, 0
        v.random = self.random
        return v

    def select(self, key) -> "LazyImages":
        """A lazy view of the samples ``key`` (slice, index tensor/array/list, bool mask)."""
        return self._view(self._base(self._positions(key)), self._resize)

    def resized(self, transform) -> "LazyImages":
        """A view whose batches go through ``transform.resize`` (the load-time resize of the
        in-memory path, run per batch: bilinear resizing is per image, so the values are the
        same)."""
        if self._resize is not None:
            raise ValueError(f"{self.arg}: already resized")
        return self._view(self._index, transform)

    def read(self, key=None) -> torch.Tensor:
        """Samples ``key`` (all when None) as a float32 ``(B, C, H, W)`` tensor (kind
        "tensor": ``(B, *sample shape)``, float32, or int64 for integer samples)."""
        pos = np.arange(len(self), dtype=np.int64) if key is None else self._positions(key)
        base = self._base(pos)
        if len(base) == 0:
            return torch.zeros((0, *self.shape[1:]), dtype=self.dtype)
        x = self._src.read(base)
        self.reads += len(base)
        floating = x.dtype.is_floating_point
        if self._src.kind == "tensor":
            x = x.float() if floating else x.long()  # token ids stay integers
        else:
            x = x.float() / 255.0 if self._src.uint8 else x.float()
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1) if floating else None  # integers are finite
        if bad is not None and bool(bad.any()):
            raise ValueError(f"{self.arg}: image {int(base[int(torch.nonzero(bad)[0, 0])])} holds NaN or Inf")
        if self._resize is not None:
            x = self._resize.resize(x)
        return x.contiguous()

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.select(key)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.read([int(key)])[0]
        return self.read(key)

    def __iter__(self):
        raise TypeError("LazyImages: iterate by batches (x[a:b].read() or x[index_tensor]), not image by image")


def is_lazy(x) -> bool:
    """Whether ``x`` is images read per batch (:class:`LazyImages`)."""
    return isinstance(x, LazyImages)


def is_random(x) -> bool:
    """Whether ``x`` is samples that change between reads (a Dataset with random transforms,
    read per batch: :class:`LazyImages` with ``random=True``)."""
    return isinstance(x, LazyImages) and x.random


def take(x, idx):
    """``x[idx]`` without reading: a lazy view for :class:`LazyImages`, the gathered tensor
    for a tensor (the in-memory path, as before)."""
    return x.select(idx) if is_lazy(x) else x[idx]


def rows(x, key) -> torch.Tensor:
    """Samples ``key`` of ``x`` as a tensor, whatever ``x`` is (a tensor's slice is a view)."""
    return x.read(key) if is_lazy(x) else x[key]


def resized(transform, x):
    """``transform.resize(x)``: at once for a tensor, per batch for :class:`LazyImages`."""
    if is_lazy(x):
        size = transform.size
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        return x.resized(transform)
    return transform.resize(x)
