"""Augmentation done right (issue 23): the built-in per-batch augmentations against a numpy
oracle, seeded so that any worker count gives the same run; a Dataset whose items change
between reads is read per batch (reads counted), never frozen at load; FedSQ's mask cache
steps aside for random data instead of failing the run; the ``augment`` key checked."""
import logging

import numpy as np
import pytest
import torch
from conftest import draw_seed, small_config
from torch import nn

import fedsq_fast as fs
from fedsq_fast.federation import Federation, federate, make_bundle, prepare_data
from fedsq_fast.federation import augment as A
from fedsq_fast.federation import data as D
from fedsq_fast.federation.config import ConfigError, config_differences, from_mapping, validate
from fedsq_fast.models import MaskCache

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _replay(gen):
    """A generator in ``gen``'s state (draws the same numbers next)."""
    return torch.Generator().set_state(gen.get_state())


# ------------------------------------------------------------------ the ops against numpy
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (1, 1, 1, 1), (4, 2, 13, 3)])
def test_crop_flip_is_numpy_pad_slice_and_flip_with_the_same_offsets(shape, seed):
    x = torch.randn(*shape, generator=_gen(seed))
    g = _gen(seed + 1)
    oy, ox, f = A.crop_flip_params(shape[0], _replay(g))
    got = A.crop_flip(x, g)
    h, w = shape[2:]
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))  # zeros: black in [0, 1] images
    want = np.stack([xp[b, :, oy[b]:oy[b] + h, ox[b]:ox[b] + w][..., ::-1] if f[b] else
                     xp[b, :, oy[b]:oy[b] + h, ox[b]:ox[b] + w] for b in range(shape[0])])
    assert got.shape == x.shape and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), want)


def test_crop_flip_draws_cover_every_offset_and_flip_half_the_time(seed):
    oy, ox, f = A.crop_flip_params(20000, _gen(seed))
    for o in (oy, ox):
        counts = np.bincount(o.numpy(), minlength=9)
        assert len(counts) == 9 and counts.min() > 20000 / 9 * 0.85  # uniform over 0..8
    assert 0.47 < f.float().mean() < 0.53
    flips = A.flip_params(20000, _gen(seed))
    assert 0.47 < flips.float().mean() < 0.53


def test_flip_is_numpy_flip_where_drawn(seed):
    x = torch.randn(7, 2, 5, 3, generator=_gen(seed))
    g = _gen(seed + 1)
    f = A.flip_params(7, _replay(g))
    got = A.flip(x, g)
    want = np.stack([x[b].numpy()[..., ::-1] if f[b] else x[b].numpy() for b in range(7)])
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_crop_flip_on_the_gpu_equals_the_cpu(seed):
    x = torch.rand(6, 3, 11, 10, generator=_gen(seed))
    a = A.crop_flip(x, _gen(seed + 1))
    b = A.crop_flip(x.cuda(), _gen(seed + 1))
    assert b.is_cuda and torch.equal(a, b.cpu())


def test_a_callable_that_changes_the_batch_shape_is_refused_naming_augment():
    aug = A.Augment(lambda x, g: x[:, :, :2])
    with pytest.raises(ValueError, match=r"augment: .*<lambda> must return a tensor of the batch's shape"):
        aug(torch.zeros(2, 1, 4, 4), _gen(0))
    with pytest.raises(ValueError, match=r"augment: 'crop_flip' takes image batches \(B, C, H, W\)"):
        A.Augment("crop_flip")(torch.zeros(2, 30), _gen(0))


# ------------------------------------------------------------------ local training draws
def test_local_train_augments_every_step_from_the_client_seed(seed):
    """The augmentation sees every batch, with draws that depend on the seed only."""
    seen = []

    def record(x, g):
        seen.append((x.clone(), torch.rand(1, generator=g).item()))
        return x

    from fedsq_fast.federation.client import LocalConfig, local_train

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(37, 1, 4, 4), torch.arange(37) % 3
    cfg = LocalConfig(lr=0.01, batch_size=8, local_epochs=2)
    local_train(model, x, y, cfg, seed, augment=A.Augment(record))
    first = [d for _, d in seen]
    assert len(seen) == 10  # ceil(37 / 8) batches x 2 epochs
    seen.clear()
    local_train(model, x, y, cfg, seed, augment=A.Augment(record))
    assert [d for _, d in seen] == first
    seen.clear()
    local_train(model, x, y, cfg, seed + 1, augment=A.Augment(record))
    assert [d for _, d in seen] != first
    with pytest.raises(ValueError, match="sample_idx .* with augment"):
        local_train(model, x, y, cfg, seed, sample_idx=torch.arange(37), augment=A.Augment(record))


# ------------------------------------------------------------------ the config key
def test_the_augment_key_is_checked_naming_it_and_recorded_configs_take_none():
    assert from_mapping({}).augment == "none"
    for bad in ("rotate", "", 3, None):
        with pytest.raises(ConfigError, match=r"^augment: must be one of none, flip, crop_flip"):
            validate(from_mapping({"augment": bad}))
    with pytest.raises(ConfigError, match=r"^augment: 'callable:m.f' names a Python callable"):
        validate(from_mapping({"augment": "callable:m.f"}))
    validate(from_mapping({"augment": "callable:m.f"}), own_data=True)  # federate(augment=fn) records it so
    recorded = {k: v for k, v in from_mapping({}).to_dict().items() if k != "augment"}  # before the key existed
    assert config_differences(from_mapping({}), recorded) == []
    assert config_differences(from_mapping({"augment": "flip"}), recorded) == ["augment"]
    from fedsq_fast.cli import build_parser

    ns = build_parser().parse_args(["run", "--augment", "crop_flip"])
    assert ns.augment == "crop_flip"


def test_built_in_augmentation_of_tabular_data_is_refused_naming_augment(tmp_path):
    x, y = torch.randn(60, 7), torch.arange(60) % 2
    with pytest.raises(ValueError, match=r"^augment: 'flip' augments images"):
        federate(lambda: nn.Linear(7, 2), (x, y), augment="flip", quiet=True, out_dir=tmp_path,
                 config={"num_clients": 2, "rounds": 1, "val_size": 10, "min_partition_size": 2})
    with pytest.raises(ValueError, match=r"^augment: given as an argument and in config"):
        federate(lambda: nn.Linear(7, 2), (x, y), augment="flip", config={"augment": "flip"}, quiet=True)


# ------------------------------------------------------------------ runs
def _cnn():
    """Module level: worker processes unpickle it."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 10))


def _numbers(history):
    import re

    timing = re.compile(r"time|elapsed|seconds")
    return [{k: v for k, v in dict(h).items() if not timing.search(k)} for h in history]


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedsq"])  # FedAvg takes the same path, minus the gates
def test_augmented_runs_are_identical_for_any_worker_count(bundle, method, caplog):
    cfg = small_config(methods=[method], rounds=2, num_clients=4, checkpoint=False, lr=0.1, augment="crop_flip")
    data = prepare_data(cfg, bundle)
    assert data.transform.augment.name == "crop_flip"
    with caplog.at_level(logging.INFO, logger="fedsq_fast.federation"):
        fed = Federation(cfg, method, data, model_fn=_cnn, quiet=True)
        one = fed.run()
    if method == "fedsq":  # the gates come from each augmented batch; validation keeps its cache
        assert fed.trainer.cache is None and fed.trainer.cache_off == "augment 'crop_flip'"
        assert fed.model.mask_cache is not None and fed.model.mask_cache.stepped_aside is None
    two = Federation(cfg.replace(workers=2), method, data, model_fn=_cnn, quiet=True).run()
    _same_model(one.model, two.model)
    assert _numbers(one.history) == _numbers(two.history)
    plain = Federation(cfg.replace(augment="none"), method, prepare_data(cfg.replace(augment="none"), bundle),
                       model_fn=_cnn, quiet=True).run()
    assert plain.history[-1]["train_loss"] != one.history[-1]["train_loss"]  # it did augment


class Flipping(torch.utils.data.Dataset):
    """Images whose __getitem__ flips at random (a user's augmentation); counts its reads."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 4
        self.calls = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.calls += 1
        x = self.x[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), int(self.y[i])


class Fixed(Flipping):
    def __getitem__(self, i):
        self.calls += 1
        return self.x[i], int(self.y[i])


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))


@pytest.mark.parametrize("in_memory", ["auto", False])
def test_a_dataset_that_changes_between_reads_is_read_per_batch_never_frozen(tmp_path, caplog, in_memory):
    """The issue's case: 320 samples, 2 rounds x 2 local epochs, FedSQ (mask cache on): it
    used to read 322 items (once at load) or, read per batch, raise in the mask cache."""
    n, rounds, epochs, val = 320, 2, 2, 40
    ds = Flipping(n, draw_seed())
    test = torch.rand(40, 1, 8, 8), torch.arange(40) % 4
    conf = {"num_clients": 4, "rounds": rounds, "local_epochs": epochs, "val_size": val, "batch_size": 16,
            "checkpoint": False, "min_partition_size": 5, "partition": "iid", "seed": draw_seed(), "threads": 1}
    with caplog.at_level(logging.INFO, logger="fedsq_fast.federation"):
        res = federate(_small_cnn, ds, test, methods=["fedsq"], quiet=True, out_dir=tmp_path, in_memory=in_memory,
                       config=conf)
    assert res["fedsq"].history[-1]["clients_ok"] == 4
    # every training sample read per batch in every epoch of every round (and validation each round)
    assert ds.calls >= rounds * epochs * (n - val) + (rounds + 1) * val
    assert "train: read per batch, never frozen" in caplog.text
    assert "FedSQ's mask cache steps aside for training" in caplog.text
    fixed = Fixed(n, 0)  # the same check leaves data that does not change in memory: one read each
    make_bundle(fixed, test)
    assert n <= fixed.calls <= n + 2 * D.RANDOM_CHECK_ITEMS + 2


def test_random_transforms_are_found_by_reading_twice_or_by_name(seed):
    import torchvision.transforms as T

    torch.manual_seed(seed)  # the coin flips of Flipping
    assert D.random_reads(Flipping(50, seed)).endswith("read twice gave two different samples")
    assert D.random_reads(Fixed(50, seed)) is None

    class Named(Fixed):
        transform = T.Compose([T.RandomHorizontalFlip(p=0.0)])  # random by kind, even when it draws nothing

    assert D.random_reads(Named(10, seed)) == "its transforms are random (RandomHorizontalFlip)"


# ------------------------------------------------------------------ the mask cache steps aside
def test_a_mask_cache_steps_aside_for_changed_inputs_with_the_uncached_results(seed, caplog):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    dc = fs.dualcopy(model).eval()
    x, idx = torch.randn(6, 1, 7, 7), torch.arange(6)
    strict = MaskCache(6)
    dc.attach_cache(strict)
    dc(x, sample_idx=idx)
    with pytest.raises(ValueError, match="input of a cached sample changed"):
        dc(x.flip(-1), sample_idx=idx)
    cache = MaskCache(6, on_change="step_aside")
    dc.attach_cache(cache)
    want = dc(x, sample_idx=idx)
    with caplog.at_level(logging.WARNING, logger="fedsq_fast.federation"):
        got = dc(x.flip(-1), sample_idx=idx)
    assert cache.stepped_aside and "mask cache steps aside" in caplog.text
    dc.attach_cache(None)
    assert torch.equal(got, dc(x.flip(-1))) and not torch.equal(got, want)
    with pytest.raises(ValueError, match="on_change must be 'error' or 'step_aside'"):
        MaskCache(6, on_change="ignore")
