"""Partition properties: every sample exactly once, skew grows as alpha falls, seeds reproduce."""
import numpy as np
import pytest
from conftest import draw_seed

from fedsq_fast.federation import partition as P
from fedsq_fast.plots import plot_partition


def _labels(rng, n=2000, c=10):
    return rng.integers(0, c, size=n)


@pytest.fixture
def rng():
    return np.random.default_rng(draw_seed(2**31))  # fresh inputs every run


def _check_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("kind", P.PARTITIONS)
def test_every_sample_exactly_once(kind, rng):
    y = _labels(rng, n=int(rng.integers(500, 3000)))
    k = int(rng.integers(2, 20))
    parts = P.make_partition(kind, y, k, alpha=0.3, min_partition_size=5, shards_per_client=2,
                             seed=int(rng.integers(1 << 30)))
    assert len(parts) == k
    _check_exact_cover(parts, len(y))
    if kind in ("dirichlet", "quantity"):
        assert min(len(p) for p in parts) >= 5


@pytest.mark.parametrize("kind", P.PARTITIONS)
def test_seed_reproduces_and_differs(kind, rng):
    y = _labels(rng)
    s = int(rng.integers(1 << 30))
    a = P.make_partition(kind, y, 8, alpha=0.5, seed=s)
    b = P.make_partition(kind, y, 8, alpha=0.5, seed=s)
    c = P.make_partition(kind, y, 8, alpha=0.5, seed=s + 1)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_dirichlet_skew_grows_as_alpha_falls(rng):
    y = _labels(rng, n=5000)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        vals = [P.label_skew(y, P.dirichlet(y, 10, alpha, min_partition_size=0, seed=s))
                for s in rng.integers(1 << 30, size=5)]
        skews.append(np.mean(vals))
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.1 and skews[2] > 0.4


def test_iid_is_balanced_and_shards_are_few_classes(rng):
    y = _labels(rng, n=3000)
    parts = P.iid(y, 7, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    sh = P.shards(np.sort(y), 10, shards_per_client=2, seed=3)
    counts = P.class_counts(np.sort(y), sh, 10)
    assert ((counts > 0).sum(1) <= 4).all()  # two shards span at most 2 boundaries each


def test_quantity_skew_sizes_vary_labels_do_not(rng):
    y = _labels(rng, n=4000)
    parts = P.quantity(y, 10, alpha=0.3, min_partition_size=20, seed=2)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()
    assert sizes.min() >= 20


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="dirichlet", alpha=0.0), "alpha"),
    (dict(kind="dirichlet", alpha=-1.0), "alpha"),
    (dict(kind="iid", num_clients=5000), "num_clients"),
    (dict(kind="nope"), "partition must be one of"),
    (dict(kind="dirichlet", alpha=0.5, min_partition_size=1000), "min_partition_size"),
])
def test_bad_input_names_the_argument(kwargs, match, rng):
    y = _labels(rng, n=1000)
    kw = dict(num_clients=10, alpha=0.5)
    kw.update(kwargs)
    kind = kw.pop("kind")
    with pytest.raises(ValueError, match=match):
        P.make_partition(kind, y, kw.pop("num_clients"), **kw)


def test_report_table_and_png(tmp_path, rng):
    y = _labels(rng, n=600)
    parts = P.dirichlet(y, 5, 0.5, min_partition_size=5, seed=0)
    counts = P.class_counts(y, parts, 10)
    assert counts.sum() == 600 and (counts.sum(0) == np.bincount(y, minlength=10)).all()
    t = P.partition_table(counts)
    assert t.splitlines()[-1].split()[-1] == "600"
    plot_partition(counts, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not hasattr(P, "plot_partition")  # every plot is in fedsq_fast.plots (partition imports no plots)
