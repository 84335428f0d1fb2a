"""Data larger than memory (issue 17): images read per batch (LazyImages) from a numpy memmap
or a map-style Dataset give the in-memory path's numbers bit for bit, in process and with
worker processes, and are never read whole. Oracles: numpy's own reads of the same file and
the in-memory path (the engine as it was before LazyImages existed)."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import draw_seed

from fedsq_fast.federation import (Callback, Federation, LazyImages, federate, from_mapping, make_bundle,
                                   prepare_data)
from fedsq_fast.federation import data as D
from fedsq_fast.federation.inputs import InputTransform
from fedsq_fast.federation.lazy import resized, rows

torch.set_num_threads(1)


def _rng():
    return np.random.default_rng(draw_seed(2**31))


def _npy(path, arr):
    """``arr`` written as a .npy file and opened again as a read-only memmap (header offset)."""
    np.save(path, arr)
    return np.load(path, mmap_mode="r")


class CountingMemmap(np.memmap):
    """A memmap that records how many rows each read took (reads of whole rows only)."""

    reads: list

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(key, np.ndarray):
            type(self).reads.append(len(key))
        return out


def _counting(path):
    mm = np.load(path, mmap_mode="r")
    c = CountingMemmap(path, dtype=mm.dtype, mode="r", shape=mm.shape, offset=mm.offset)
    CountingMemmap.reads = []
    return c


# ------------------------------------------------------------------ LazyImages itself
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (37, 3, 5, 7)), (np.float32, (29, 2, 3, 1)),
                                         (np.int16, (31, 6, 9))])
def test_reads_match_numpys_reads_of_the_file(tmp_path, dtype, shape):
    rng = _rng()
    raw = rng.integers(0, 255, shape).astype(dtype) if dtype != np.float32 else \
        rng.standard_normal(shape).astype(dtype)
    raw.reshape(-1)[[0, -1]] = np.array([0, 255 if dtype != np.float32 else -1e30]).astype(dtype)  # edge values
    mm = _npy(tmp_path / "x.npy", raw)
    want = torch.from_numpy(raw.copy())
    want = want.float() / 255.0 if dtype == np.uint8 else want.float()
    want = want.reshape(shape[0], -1, *shape[-2:])
    x = LazyImages(mm, "train images")
    assert len(x) == shape[0] and tuple(x.shape) == tuple(want.shape) and x.dtype == torch.float32
    idx = torch.from_numpy(rng.permutation(shape[0])[:11])
    assert torch.equal(x[idx], want[idx]) and x.reads == 11
    v = x[3:-2]  # a slice is a view: nothing read
    assert isinstance(v, LazyImages) and len(v) == shape[0] - 5 and x.reads == 11 and v.reads == 0
    j = rng.integers(-len(v), len(v), 7)
    assert torch.equal(v[j], want[3:-2][torch.from_numpy(j)])
    assert torch.equal(v.select(j)[::2].read(), want[3:-2][torch.from_numpy(j)][::2])
    mask = torch.from_numpy(rng.random(len(v)) < 0.5)
    assert torch.equal(v[mask], want[3:-2][mask])
    assert torch.equal(x[4], want[4]) and x[[]].shape == (0, *want.shape[1:])
    with pytest.raises(IndexError, match="train images: index out of range for 37|out of range"):
        x[torch.tensor([0, shape[0]])]


def test_a_worker_gets_the_file_not_the_images(tmp_path):
    rng = _rng()
    raw = rng.integers(0, 255, (300, 3, 16, 16), dtype=np.uint8)
    mm = _npy(tmp_path / "x.npy", raw)
    for arr, want in ((mm, raw), (mm[17:], raw[17:])):  # a view: its own offset in the file
        x = LazyImages(arr).select(np.arange(5, 40))
        blob = pickle.dumps(x)
        assert len(blob) < raw[0].nbytes * 10  # the index map and the file name, not 230 KB of images
        y = pickle.loads(blob)
        idx = rng.permutation(35)[:9]
        assert torch.equal(y[idx], torch.from_numpy(want[5:40][idx].copy()).float() / 255)


def test_resize_per_batch_equals_the_load_time_resize(tmp_path):
    rng = _rng()
    raw = rng.random((45, 3, 13, 11)).astype(np.float32)
    for size in (32, 7):
        tf = InputTransform(3, size, None, None)
        x = resized(tf, LazyImages(_npy(tmp_path / f"x{size}.npy", raw)))
        want = tf.resize(torch.from_numpy(raw))
        assert x.shape == want.shape
        idx = rng.permutation(45)
        for i in range(0, 45, 8):  # batches of 8 in random order, as local_train reads them
            assert torch.equal(x[idx[i:i + 8]], want[idx[i:i + 8]])


# ------------------------------------------------------------------ make_bundle: when lazy, bad input
def test_make_bundle_keeps_data_past_the_budget_where_it_is(tmp_path):
    rng = _rng()
    n = 41
    mm = _npy(tmp_path / "x.npy", rng.integers(0, 255, (n, 1, 6, 6), dtype=np.uint8))
    y = rng.integers(0, 3, n)
    y[:3] = [0, 1, 2]
    nbytes = n * 36 * 4  # the float32 copy the in-memory path would make
    lazy = make_bundle((mm, y), memory_budget=nbytes - 1)
    inmem = make_bundle((mm, y), memory_budget=nbytes)
    forced = make_bundle((mm, y), in_memory=False)
    assert isinstance(lazy.train.x, LazyImages) and isinstance(lazy.test.x, LazyImages)
    assert isinstance(inmem.train.x, torch.Tensor) and isinstance(forced.train.x, LazyImages)
    assert isinstance(make_bundle((mm, y), in_memory=True, memory_budget=0).train.x, torch.Tensor)
    for b in (lazy, forced):  # same held-out split, same images
        assert torch.equal(b.train.y, inmem.train.y) and torch.equal(b.test.y, inmem.test.y)
        assert torch.equal(b.train.x.read(), inmem.train.x) and torch.equal(b.test.x.read(), inmem.test.x)
    back = make_bundle(lazy.train, lazy.test, in_memory=True)  # a lazy bundle read into memory
    assert torch.equal(back.train.x, inmem.train.x) and torch.equal(back.test.x, inmem.test.x)
    assert isinstance(make_bundle(inmem.train, inmem.test, in_memory=False).train.x, LazyImages)
    with pytest.raises(ValueError, match="in_memory must be True, False or 'auto'"):
        make_bundle((mm, y), in_memory="yes")
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes"):
        make_bundle((mm, y), memory_budget=-1)


class ItemsDataset(torch.utils.data.Dataset):
    """A map-style dataset over arrays; ``bad``: {index: what item index returns instead}."""

    def __init__(self, x, y, bad=None, targets=True):
        self.x, self.y, self.bad = x, y, bad or {}
        self.calls = 0
        if targets:
            self.targets = list(int(v) for v in y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.calls += 1
        if i in self.bad:
            return self.bad[i]
        return torch.from_numpy(self.x[i]), int(self.y[i])


@pytest.mark.parametrize("bad,err,match", [
    ({0: ("an image", 1)}, TypeError, r"train\[0\]: image must be a tensor, array or PIL image, got str"),
    ({0: torch.zeros(3)}, ValueError, r"train\[0\]: items must be \(image, label\) pairs"),
    ({12: (torch.zeros(1, 5, 5), 0)}, ValueError, r"train\[12\]: image shape \(1, 5, 5\) differs from item 0's \(1, 6, 6\)"),
    ({12: (torch.full((1, 6, 6), float("nan")), 0)}, ValueError, r"train images?: image 12 holds NaN|train: image 12 holds NaN"),
    ({12: (torch.zeros(1, 6, 6, dtype=torch.float64), 0)}, TypeError, r"train\[12\]: image dtype torch.float64"),
])
def test_a_bad_lazy_dataset_is_refused_before_any_work(bad, err, match):
    rng = _rng()
    x = rng.random((13, 1, 6, 6)).astype(np.float32)
    ds = ItemsDataset(x, np.arange(13) % 3, bad)
    with pytest.raises(err, match=match):
        make_bundle(ds, in_memory=False)  # the first and last items are read up front
    # item 0, the last item (label and image), and the random-transform check (a few items read
    # twice, data.RANDOM_CHECK_ITEMS): never a pass over the data
    assert ds.calls <= 6 + 2 * D.RANDOM_CHECK_ITEMS


def test_a_bad_item_in_the_middle_is_named_when_read():
    rng = _rng()
    x = rng.random((13, 1, 6, 6)).astype(np.float32)
    b = make_bundle(ItemsDataset(x, np.arange(13) % 3, {5: (torch.zeros(1, 4, 6), 0)}), in_memory=False,
                    test=ItemsDataset(x, np.arange(13) % 3))
    with pytest.raises(ValueError, match=r"train\[5\]: image shape \(1, 4, 6\) differs"):
        b.train.x.read()


def test_labels_come_from_targets_or_one_pass_and_must_agree():
    rng = _rng()
    x, y = rng.random((9, 1, 6, 6)).astype(np.float32), np.arange(9) % 3
    with_t = ItemsDataset(x, y)
    b = make_bundle(with_t, in_memory=False, test=ItemsDataset(x, y))
    # targets: items 0 and -1 only, besides the random-transform check (a few items read twice)
    assert with_t.calls <= 6 + 2 * D.RANDOM_CHECK_ITEMS and torch.equal(b.train.y, torch.from_numpy(y))
    without = ItemsDataset(x, y, targets=False)
    assert torch.equal(make_bundle(without, in_memory=False, test=ItemsDataset(x, y)).train.y, torch.from_numpy(y))
    assert without.calls >= with_t.calls + len(y) - 2  # one pass over the items where there are no targets
    liar = ItemsDataset(x, y)
    liar.targets = [1] + liar.targets[1:]
    with pytest.raises(ValueError, match=r"train.targets\[0\] is 1 but item 0's label is 0"):
        make_bundle(liar, in_memory=False)


# ------------------------------------------------------------------ the engine: same numbers
def model_fn():
    """tiny_cnn for 8x8 grey digits (module level: worker processes unpickle it)."""
    from fedsq_fast.federation.adapter import build_model

    return build_model("tiny_cnn", 10, None, in_channels=1, image_size=8)


def _digits_files(tmp_path):
    b = D.load_digits()
    tr = _npy(tmp_path / "train.npy", b.train.x.numpy())
    te = _npy(tmp_path / "test.npy", b.test.x.numpy())
    return b, tmp_path / "train.npy", tr, te


def _numbers(res):
    h = [{k: v for k, v in dict(r).items() if not k.startswith("time_") and k != "elapsed_s"} for r in res.history]
    return h, res.summary["test_acc"], res.model.state_dict()


def _same(a, b):
    (ha, ta, sa), (hb, tb, sb) = a, b
    assert len(ha) == len(hb) and ta == tb
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]), (k, ra[k], rb[k])  # NaN == NaN
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _cfg(**kw):
    return from_mapping({**dict(dataset="custom", model="tiny_cnn", rounds=2, num_clients=5, val_size=150,
                                max_test_samples=120, batch_size=16, eval_batch_size=40, lr=0.05, probe_size=8,
                                min_partition_size=5, threads=1, checkpoint=False, seed=draw_seed()), **kw})


@pytest.mark.parametrize("method", ["fedavg", "fedsq"])
def test_a_memmap_past_the_budget_is_read_per_batch_with_the_same_numbers(tmp_path, method):
    b, path, tr, te = _digits_files(tmp_path)
    counting = _counting(path)
    lazy = make_bundle((counting, b.train.y), (te, b.test.y), memory_budget=10_000)  # digits: 368 KB as float32
    inmem = make_bundle((np.array(tr), b.train.y), (np.array(te), b.test.y))
    assert isinstance(lazy.train.x, LazyImages) and isinstance(inmem.train.x, torch.Tensor)
    cfg = _cfg()
    runs = []
    for bb in (lazy, inmem):
        data = prepare_data(cfg, bb, model_name="tiny_cnn")
        runs.append(_numbers(Federation(cfg, method, data, quiet=True).run()))
    _same(*runs)
    reads = CountingMemmap.reads
    assert reads and max(reads) <= max(cfg.batch_size, cfg.eval_batch_size, cfg.probe_size)  # never read whole
    assert sum(reads) < cfg.rounds * 3 * len(tr)  # training + validation each round, not more


def test_a_lazy_dataset_through_federate_gives_the_same_numbers(tmp_path):
    b = D.load_digits()
    x, y = b.train.x.numpy(), b.train.y.numpy()
    ds = ItemsDataset(x, y)
    conf = dict(num_clients=4, rounds=2, val_size=120, max_test_samples=100, batch_size=16, lr=0.05,
                min_partition_size=5, probe_size=8, threads=1, seed=draw_seed(), checkpoint=False)
    kw = dict(config=conf, methods=["fedsq"], quiet=True)
    lazy = federate(model_fn, ds, in_memory=False, out_dir=tmp_path / "lazy", **kw)
    assert ds.calls > 0
    inmem = federate(model_fn, (x, y), out_dir=tmp_path / "mem", **kw)
    _same(_numbers(lazy["fedsq"]), _numbers(inmem["fedsq"]))


@pytest.mark.parametrize("method,source", [("fedsq", "memmap"), ("fedavg", "dataset")])
def test_workers_read_the_data_themselves_with_the_same_numbers(tmp_path, method, source, monkeypatch):
    """workers = 2 on data read per batch (each worker opens the memmap / unpickles the Dataset)
    against the in-memory run in process; under FedSQ with a mask-cache budget of a few rows,
    so the workers' caches spill, into the pool's temporary folder, removed with the pool."""
    import tempfile

    from fedsq_fast.federation import trainer

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the pool's folder (workers' spill files) goes here
    b, path, tr, te = _digits_files(tmp_path)
    train = (tr, b.train.y) if source == "memmap" else ItemsDataset(np.array(tr), b.train.y.numpy())
    lazy = make_bundle(train, (te, b.test.y), in_memory=False)
    inmem = make_bundle((np.array(tr), b.train.y), (np.array(te), b.test.y))
    seed = draw_seed()
    par, one = _cfg(workers=2, seed=seed), _cfg(seed=seed)
    want = _numbers(Federation(one, method, prepare_data(one, inmem, model_name="tiny_cnn"), quiet=True).run())
    data = prepare_data(par, lazy, model_name="tiny_cnn")
    pools = []

    class SeePool(Callback):
        def on_round_end(self, fed, record):
            pools.extend(fed.transport._tmp)
            if method == "fedsq":  # each worker's spill folders are in the pool's: its training cache's and
                # its validation share's (150 validation samples in 4 batches of 40: 2 per worker)
                assert len([d for p in fed.transport._tmp for d in os.listdir(p)]) == 4

    monkeypatch.setattr(trainer, "MASK_CACHE_BYTES", 100)  # sent to the workers with the model
    got = _numbers(Federation(par, method, data, quiet=True, callbacks=[SeePool()]).run())
    assert isinstance(data.x, LazyImages) and data.x.reads == 0  # the workers read, not the server
    assert pools and all(os.path.dirname(p) == str(tmp) for p in pools)
    assert not any(os.path.exists(p) for p in pools)  # the pool's temporary folder went with the pool
    _same(got, want)


def test_rows_reads_a_slice_of_either_kind():
    x = torch.arange(24.0).reshape(6, 1, 2, 2)
    assert rows(x, slice(1, 3)).data_ptr() == x[1:3].data_ptr()  # a tensor's slice stays a view
    assert torch.equal(rows(LazyImages(x.numpy()), slice(1, 3)), x[1:3])


# ------------------------------------------------------------------ the gate store spills to disk
class _SeeSpill:
    """Records, at each round's end, the spill files of the client and validation caches."""

    def __init__(self, raise_at=None):
        self.paths, self.raise_at = [], raise_at

    def on_run_start(self, fed, start_round):
        pass

    def on_round_start(self, fed, rnd):
        pass

    def on_reply(self, fed, reply):
        pass

    def on_round_end(self, fed, record):
        for c in (fed.cache, fed.model.mask_cache):
            assert c.spill_path is not None and os.path.getsize(c.spill_path) == c.spill_bytes > 0
            self.paths.append(c.spill_path)
        if record["round"] == self.raise_at:
            raise RuntimeError("boom")

    def on_run_end(self, fed, result):
        pass


def test_a_mask_cache_past_its_budget_spills_with_the_same_numbers_and_cleans_up(tmp_path, monkeypatch):
    import tempfile

    from fedsq_fast.federation import trainer

    b = D.load_digits()
    cfg = _cfg(rounds=3)
    data = prepare_data(cfg, make_bundle((b.train.x, b.train.y), (b.test.x, b.test.y)), model_name="tiny_cnn")
    want = _numbers(Federation(cfg, "fedsq", data, quiet=True).run())  # 1 GiB budget: all in RAM
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(trainer, "MASK_CACHE_BYTES", 100)  # a few rows in RAM, the rest on disk
    seen = _SeeSpill()
    fed = Federation(cfg, "fedsq", data, quiet=True, callbacks=[seen])
    got = _numbers(fed.run())
    _same(got, want)
    assert len(seen.paths) == 2 * cfg.rounds and all(p.startswith(str(tmp)) for p in seen.paths)
    assert os.listdir(tmp) == []  # every spill folder removed when the run ended
    boom = _SeeSpill(raise_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        Federation(cfg, "fedsq", data, quiet=True, callbacks=[boom]).run()
    assert len(boom.paths) == 4 and os.listdir(tmp) == []  # removed when the run raised too


def _image_folder(root, rng, side=(9, 7)):
    """A CINIC-10-layout folder: train/valid/test, 3 classes, odd-sized random RGB PNGs."""
    from PIL import Image

    for split, n in (("train", 9), ("valid", 4), ("test", 5)):
        for cls in ("cat", "dog", "ship"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*side, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.parametrize("method", ["fedavg", "fedsq"])
def test_an_image_folder_read_per_batch_from_the_config_gives_the_same_numbers(tmp_path, method):
    """``in_memory = false`` (or auto past a quarter of the memory) keeps CINIC-10's ImageFolder
    on disk, read per batch: the same run as reading it into memory, bit for bit."""
    from fedsq_fast.federation import prepare_data

    _image_folder(tmp_path / "cinic", np.random.default_rng(draw_seed(2**31)))
    runs, seed = {}, draw_seed()
    for choice in (True, "false"):
        cfg = from_mapping(dict(dataset="cinic10", data_root=str(tmp_path / "cinic"), model="tiny_cnn", rounds=2,
                                num_clients=3, val_size=30, max_test_samples=12, batch_size=8, lr=0.05, probe_size=4,
                                min_partition_size=3, threads=1, checkpoint=False, seed=seed,
                                methods=[method], in_memory=choice))
        data = prepare_data(cfg)
        assert isinstance(data.x, LazyImages) == (choice == "false") and isinstance(data.val_x, LazyImages) == (choice == "false")
        runs[choice] = _numbers(Federation(cfg, method, data, quiet=True).run())
    _same(runs[True], runs["false"])


def test_in_memory_values_are_checked_and_auto_keeps_small_folders_in_memory(tmp_path):
    from fedsq_fast.federation import validate

    _image_folder(tmp_path, np.random.default_rng(draw_seed(2**31)), side=(5, 6))
    b = D.load_dataset("cinic10", str(tmp_path), in_memory="AUTO")
    assert isinstance(b.train.x, torch.Tensor) and b.train.x.shape == (39, 3, 5, 6)
    lazy = D.load_dataset("cinic10", str(tmp_path), in_memory=False)
    assert isinstance(lazy.train.x, LazyImages) and torch.equal(lazy.train.y, b.train.y)
    assert torch.equal(rows(lazy.test.x, slice(0, 15)), b.test.x)
    for bad in ("maybe", 1, None):
        with pytest.raises(ValueError, match="in_memory: must be auto, true or false"):
            validate(from_mapping({"in_memory": bad}))
