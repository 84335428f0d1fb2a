"""The compiled library's cache of freed large CPU outputs (csrc/ops.cpp, HugePageAllocator):
reused blocks never alias a live tensor, results equal eager's whatever block they land in,
the limit holds, and a bad limit is refused in one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedsq_fast as ff

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(ff.backend() != "compiled", reason="compiled library not loaded")
MB = 1 << 20
BIG = (5 * MB) // 4 + 13  # fp32 elements: just over the 4 MiB threshold, odd


def _cache(mb=-1):
    return list(torch.ops.fedsq_fast.cpu_cache(mb))


@pytest.fixture
def cache_on():
    old = _cache()[1] // MB
    _cache(0)  # start empty
    _cache(64)
    yield
    _cache(old)


def _masked(n, seed):
    g = torch.Generator().manual_seed(seed)
    z, s = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return z, s, ff.pack_mask(s)


def test_freed_block_is_reused_and_results_equal_eager(cache_on):
    z, s, bits = _masked(BIG, 1)
    y = ff.apply_mask(z, bits)
    p = y.data_ptr()
    assert torch.equal(y, z * (s > 0).to(z.dtype))
    del y
    assert _cache()[0] >= BIG * 4  # the block went to the cache
    z2, s2, bits2 = _masked(BIG, 2)
    y2 = ff.apply_mask(z2, bits2)
    assert y2.data_ptr() == p  # the same pages, no fresh mapping
    assert torch.equal(y2, z2 * (s2 > 0).to(z2.dtype))  # nothing of the old contents shows
    assert _cache()[0] == 0


def test_live_outputs_never_share_a_block(cache_on):
    z, s, bits = _masked(BIG, 3)
    ys = [ff.apply_mask(z * (i + 1), bits) for i in range(4)]
    del ys[1:3]  # two blocks back to the cache
    ys += [ff.apply_mask(z * (i + 5), bits) for i in range(3)]  # two reused, one fresh
    ptrs = [y.data_ptr() for y in ys]
    assert len(set(ptrs)) == len(ptrs)
    mask = (s > 0).to(z.dtype)
    for y, k in zip(ys, (1, 4, 5, 6, 7)):
        assert torch.equal(y, (z * k) * mask)
    ys[0].fill_(3.0)  # writing one leaves the others as they were
    for y, k in zip(ys[1:], (4, 5, 6, 7)):
        assert torch.equal(y, (z * k) * mask)


def test_no_block_much_larger_than_asked(cache_on):
    z, s, bits = _masked(4 * BIG, 4)
    big = ff.apply_mask(z, bits)
    p = big.data_ptr()
    del big
    zs, ss, bs = _masked(BIG, 5)
    small = ff.apply_mask(zs, bs)  # a quarter of the cached block: a fresh one
    assert small.data_ptr() != p
    assert torch.equal(small, zs * (ss > 0).to(zs.dtype))


def test_limit_is_kept_and_zero_frees_everything(cache_on):
    _cache(16)  # room for two ~5 MiB blocks, not three
    z, s, bits = _masked(BIG, 6)
    ys = [ff.apply_mask(z, bits) for _ in range(3)]
    del ys
    cached, limit = _cache()
    assert limit == 16 * MB and 0 < cached <= limit
    assert _cache(0) == [0, 0]
    y = ff.apply_mask(z, bits)  # the cache off: plain allocations still work
    del y
    assert _cache()[0] == 0


def test_gate_backward_through_the_cache_equals_eager(cache_on):
    z, s, _ = _masked(BIG, 7)
    g = torch.randn(BIG, generator=torch.Generator().manual_seed(8))
    q = z.clone().requires_grad_()
    y, _ = ff.gate(q, s)
    want = g * (s > 0).to(g.dtype)
    for _ in range(3):  # the second and third gradients land in reused blocks
        (got,) = torch.autograd.grad(y, q, g, retain_graph=True)
        assert torch.equal(got, want)
        del got


def test_negative_limit_refused():
    with pytest.raises(ValueError, match="mb must be >= 0"):
        _cache(-2)


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5", " 8"])
def test_bad_env_limit_refused_in_one_line(bad):
    env = dict(os.environ, FEDSQ_FAST_CPU_CACHE_MB=bad, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "import fedsq_fast"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert f"FEDSQ_FAST_CPU_CACHE_MB must be a whole number of MiB >= 0, got {bad!r}" in r.stderr


def test_env_limit_is_read():
    env = dict(os.environ, FEDSQ_FAST_CPU_CACHE_MB="12", PYTHONPATH=str(ROOT))
    code = "import fedsq_fast, torch; print(list(torch.ops.fedsq_fast.cpu_cache(-1)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == f"[0, {12 * MB}]"
