"""MaskCache: cached training equals uncached training; budget, disk, misuse."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs
from fedsq_fast.models import IndexedDataset, MaskCache, MaskCacheFullError, build_model


class OddNet(nn.Module):
    """Per-sample gate sizes that are not multiples of 8 (13 and 3*5*5 = 75 elements)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.r = nn.ReLU6()
        self.fc = nn.Linear(75, 13)
        self.out = nn.Linear(13, 4)

    def forward(self, x):
        x = F.max_pool2d(self.r(self.c(x)), 2)
        return self.out(F.leaky_relu(self.fc(x.flatten(1)), 0.1))


def _data(n, shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 4, (n,), generator=g)


def _run(dc, X, Y, epochs, use_cache, batch=8, cache=None):
    torch.manual_seed(0)
    opt = torch.optim.SGD(dc.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), batch):
            idx = perm[i:i + batch]
            out = dc(X[idx], sample_idx=idx) if use_cache else dc(X[idx])
            opt.zero_grad()
            F.cross_entropy(out, Y[idx]).backward()
            opt.step()
    return {k: v.clone() for k, v in dc.quantitative_state_dict().items()}


@pytest.mark.parametrize("arch", ["svhn_cnn", "odd"])
def test_cached_training_equals_uncached(arch, tmp_path):
    torch.manual_seed(1)
    base = build_model("svhn_cnn") if arch == "svhn_cnn" else OddNet()
    shape = (3, 32, 32) if arch == "svhn_cnn" else (3, 10, 10)
    X, Y = _data(20, shape)
    a = fs.dualcopy(base)
    b = fs.dualcopy(base)
    cache = MaskCache(len(X), path=tmp_path / "m.bin" if arch == "odd" else None)
    b.attach_cache(cache)
    ref = _run(a, X, Y, 3, False)
    got = _run(b, X, Y, 3, True)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert len(cache) == 20 and cache.misses == 20 and cache.hits == 40
    per_sample = sum(n * ((k + 7) // 8) for n, k, _ in cache.layout)
    assert cache.row_bytes == per_sample and cache.nbytes >= 20 * per_sample
    if arch == "svhn_cnn":  # 1 bit per gated activation: 2*(32+...)... computed independently
        acts = 2 * (32 * 32 * 32 + 64 * 16 * 16 + 128 * 8 * 8) + 256
        assert cache.row_bytes == acts // 8


def test_cache_skips_structural_forward_and_matches_masks(monkeypatch):
    dc = fs.dualcopy(OddNet()).eval()
    X, _ = _data(6, (3, 10, 10))
    cache = MaskCache(6)
    dc.attach_cache(cache)
    first = dc(X, sample_idx=torch.arange(6))
    monkeypatch.setattr(dc, "structural_masks", lambda x: pytest.fail("structural forward ran"))
    idx = torch.tensor([4, 1, 5])
    got = cache.masks(dc, X[idx], idx)
    monkeypatch.undo()
    want = dc.structural_masks(X[idx])
    for g, w in zip(got, want):
        for gb, wb in zip(g.bits, w.bits):
            assert torch.equal(gb, wb)
    with torch.no_grad():
        torch.testing.assert_close(dc(X[idx], sample_idx=idx), first[idx])


def test_budget_error_and_partial_policy():
    dc = fs.dualcopy(OddNet())
    X, Y = _data(10, (3, 10, 10))
    small = MaskCache(10, max_bytes=50)
    dc.attach_cache(small)
    with pytest.raises(MaskCacheFullError, match="max_bytes=50"):
        dc(X[:2], sample_idx=[0, 1])
    part = MaskCache(10, max_bytes=100, policy="partial")
    dc2 = fs.dualcopy(OddNet().eval())
    dc2.load_quantitative_state_dict(dc.quantitative_state_dict())
    dc2.attach_cache(part)
    ref = fs.dualcopy(OddNet())
    ref.load_state_dict(dc2.state_dict())
    got = _run(dc2, X, Y, 2, True, batch=5)
    want = _run(ref, X, Y, 2, False, batch=5)
    assert 0 < part.capacity < 10 and len(part) == part.capacity
    for k in want:
        assert torch.equal(want[k], got[k])


def test_disk_cache_reopens(tmp_path):
    dc = fs.dualcopy(OddNet()).eval()
    X, _ = _data(8, (3, 10, 10))
    c = MaskCache(8, path=tmp_path / "masks.bin")
    dc.attach_cache(c)
    with torch.no_grad():
        want = dc(X, sample_idx=torch.arange(8))
    c.flush()
    c2 = MaskCache.open(tmp_path / "masks.bin")
    assert len(c2) == 8
    dc.attach_cache(c2)
    with torch.no_grad():
        got = dc(X, sample_idx=torch.arange(8))
    assert c2.hits == 8 and c2.misses == 0
    torch.testing.assert_close(got, want)


def test_random_pipeline_refused():
    from torchvision import transforms as T

    class DS(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.transform(torch.rand(3, 8, 8)), 0

    aug = DS(T.Compose([T.RandomHorizontalFlip(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        MaskCache(4, dataset=torch.utils.data.DataLoader(IndexedDataset(aug)))
    MaskCache(4, dataset=aug, allow_random_transforms=True)
    MaskCache(4, dataset=DS(T.Normalize((0.5,) * 3, (0.5,) * 3)))
    assert IndexedDataset(aug)[2][-1] == 2


def test_changed_input_detected_and_misuse():
    dc = fs.dualcopy(OddNet())
    X, _ = _data(4, (3, 10, 10))
    cache = MaskCache(4)
    dc.attach_cache(cache)
    dc(X, sample_idx=torch.arange(4))
    flipped = X.flip(-1)  # same pixel sum, other view
    with pytest.raises(ValueError, match="input of a cached sample changed"):
        dc(flipped, sample_idx=torch.arange(4))
    lax = MaskCache(4, allow_random_transforms=True)
    dc.attach_cache(lax)
    dc(X, sample_idx=torch.arange(4))
    dc(flipped, sample_idx=torch.arange(4))  # allowed: reuses the first view's masks
    with pytest.raises(ValueError, match="one index per row"):
        dc(X, sample_idx=[0, 1])
    with pytest.raises(ValueError, match=r"sample_idx must be in \[0, 4\)"):
        dc(X, sample_idx=[0, 1, 2, 9])
    with pytest.raises(ValueError, match="num_samples"):
        MaskCache(0)
    with pytest.raises(ValueError, match="policy"):
        MaskCache(4, policy="lru")
    with pytest.raises(TypeError, match="MaskCache"):
        dc.attach_cache({})
    with pytest.raises(ValueError, match="another structural copy"):
        fs.dualcopy(OddNet()).attach_cache(cache)
    with pytest.raises(ValueError, match="gate_maxpool"):
        fs.dualcopy(build_model("svhn_cnn"), gate_maxpool=True).attach_cache(MaskCache(4))


# ---------------------------------------------------------------- policy 'spill' (issue 17)
def _spilled_run(X, Y, max_bytes, tmp_path, epochs=3):
    """Train a DualCopy OddNet with a spilling cache; returns (state, cache, masks it holds)."""
    torch.manual_seed(1)
    dc = fs.dualcopy(OddNet())
    cache = MaskCache(len(X), max_bytes=max_bytes, policy="spill", spill_dir=tmp_path)
    dc.attach_cache(cache)
    return _run(dc, X, Y, epochs, True, batch=7), cache, dc


@pytest.mark.parametrize("n", [1, 23])
def test_spilled_rows_give_the_uncached_training_and_the_file_goes_on_close(tmp_path, n):
    X, Y = _data(n, (3, 10, 10))
    torch.manual_seed(1)
    want = _run(fs.dualcopy(OddNet()), X, Y, 3, False, batch=7)  # oracle: no cache at all
    got, cache, dc = _spilled_run(X, Y, 1, tmp_path)  # 1 byte of RAM: every row on disk
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert cache.ram_capacity == 0 and cache.capacity == n and len(cache) == n
    assert cache.misses == n and cache.hits == 2 * n  # epochs 2 and 3 read the rows back from disk
    assert cache.spill_bytes == n * cache.row_bytes and cache.nbytes < cache.spill_bytes + 64 * n
    folder = os.path.dirname(cache.spill_path)
    assert os.path.dirname(folder) == str(tmp_path) and os.path.getsize(cache.spill_path) == cache.spill_bytes
    # the rows on disk are the masks the structural copy computes (compare packed bits)
    idx = torch.arange(n).flip(0)
    with torch.no_grad():
        fresh = dc.structural_masks(X[idx])
    for g, w in zip(cache._assemble(idx, "cpu"), fresh):
        assert all(torch.equal(a, b) for a, b in zip(g.bits, w.bits))
    cache.close()
    assert not os.path.exists(folder) and cache.spill_path is None and len(cache) == 0
    with torch.no_grad():  # still usable after close: empty, refills
        dc(X[:1], sample_idx=[0])
    assert len(cache) == 1 and os.path.exists(cache.spill_path)
    cache.close()


def test_a_copy_of_a_spilling_cache_starts_empty_and_does_not_share_the_file(tmp_path):
    X, Y = _data(9, (3, 10, 10))
    _, cache, dc = _spilled_run(X, Y, 1, tmp_path, epochs=1)
    twin = copy.deepcopy(dc)
    assert twin.mask_cache is not cache and len(twin.mask_cache) == 0 and twin.mask_cache.spill_path is None
    with torch.no_grad():
        assert torch.equal(twin(X, sample_idx=torch.arange(9)), dc(X, sample_idx=torch.arange(9)))
    assert twin.mask_cache.spill_path != cache.spill_path and len(twin.mask_cache) == 9
    paths = [os.path.dirname(c.spill_path) for c in (cache, twin.mask_cache)]
    cache.close()
    twin.mask_cache.close()
    assert not any(os.path.exists(p) for p in paths)


def test_part_in_ram_part_on_disk_equals_all_in_ram(tmp_path):
    X, Y = _data(30, (3, 10, 10))
    ram, ram_cache, _ = _spilled_run(X, Y, 1 << 20, tmp_path)
    assert ram_cache.spill_path is None and ram_cache.ram_capacity == 30
    row = ram_cache.row_bytes
    split, cache, _ = _spilled_run(X, Y, 11 * row + row // 2, tmp_path)  # 11 rows fit in RAM
    assert cache.ram_capacity == 11 and cache.spill_bytes == 19 * row and cache.hits == 60
    for k in ram:
        assert torch.equal(ram[k], split[k]), k
    assert torch.equal(cache._get_rows(torch.arange(30)), ram_cache._get_rows(torch.arange(30)))
    cache.close()


def test_a_full_disk_recomputes_instead_of_spilling(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    X, Y = _data(12, (3, 10, 10))
    torch.manual_seed(1)
    want = _run(fs.dualcopy(OddNet()), X, Y, 2, False, batch=7)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    torch.manual_seed(1)
    dc = fs.dualcopy(OddNet())
    cache = MaskCache(12, max_bytes=1, policy="spill", spill_dir=tmp_path)
    dc.attach_cache(cache)
    with pytest.warns(RuntimeWarning, match="do not fit on .* recomputed"):
        got = _run(dc, X, Y, 2, True, batch=7)
    assert cache.spill_path is None and cache.capacity == 0 and os.listdir(tmp_path) == []
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_spill_and_path_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="policy='spill' .* give one or the other"):
        MaskCache(4, policy="spill", path=tmp_path / "m.bin")
