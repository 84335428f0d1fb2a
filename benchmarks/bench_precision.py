"""Mixed precision on a GPU (issue 25): one local training step of a DualCopy ResNet-18 (batch 64,
32 px, 10 classes) in fp32, bf16 and fp16 (``precision`` of the client section: autocast, and a
gradient scaler for fp16), timed with CUDA events in the same run; the speed-up over fp32 and
the parity of the loss after the same 20 steps from the same start (accuracy parity in the small).

Run by benchmarks/gpu_check.sh (its name matches 'gpu'); skipped without a CUDA GPU. On the CPU,
bf16 autocast made a ResNet-18 step slower (docs/federation.md, "precision"), so there is no
CPU arm.

    pytest benchmarks/bench_precision.py --benchmark-only -s
"""
from __future__ import annotations

import pytest
import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def _setup(precision):
    import torchvision

    import fedsq_fast as fs
    from fedsq_fast.federation.client import LocalConfig

    torch.manual_seed(0)
    model = fs.dualcopy(torchvision.models.resnet18(num_classes=10)).cuda()
    x = torch.randn(64 * 20, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64 * 20,), device="cuda")
    return model, x, y, LocalConfig(lr=0.01, batch_size=64, precision=precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_step_gpu(benchmark, precision):
    from fedsq_fast.federation.client import local_train

    model, x, y, cfg = _setup(precision)
    local_train(model, x[:128], y[:128], cfg, seed=1)  # warm-up (kernels, autotuning)
    torch.cuda.synchronize()

    def step20():
        info = local_train(model, x, y, cfg, seed=2)
        torch.cuda.synchronize()
        return info

    info = benchmark.pedantic(step20, rounds=3, iterations=1)
    benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.min * 1000 / info["steps"]
    benchmark.extra_info["loss_20_steps"] = info["loss"]
    print(f"\n{precision}: {benchmark.extra_info['ms_per_step']:.2f} ms/step, loss after 20 steps "
          f"{info['loss']:.4f}")
    assert info["steps"] == 20 and info["loss"] == info["loss"]
