"""What users bring (issue 14): their own model under fedsq, their own data, configs that
cannot learn, progress off a terminal, plot ticks, benchmark collection. Each test here
fails on the code before the fix (no conversion, no federate, no warning, ...)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_seed
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs
from fedsq_fast.federation import (Federation, InputSpec, federate, from_mapping, make_bundle,
                                   prepare_data)
from fedsq_fast.federation import data as D

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def _seed():
    return draw_seed()


class UserCNN(nn.Module):
    """A user's model: RGB input (first conv takes 3 channels), BatchNorm, functional relu."""

    def __init__(self, in_ch=3, num_classes=10, width=8):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.adaptive_avg_pool2d(torch.relu(self.c2(x)), 2)
        return self.head(x.flatten(1))


def _digits(n=None):
    b = D.load_digits()
    x, y = b.train.x, b.train.y
    return (x, y) if n is None else (x[:n], y[:n])


def _cfg(**kw):
    base = dict(rounds=2, num_clients=4, val_size=120, max_test_samples=100, batch_size=16, lr=0.05,
                min_partition_size=5, probe_size=8, threads=1, seed=_seed(), checkpoint=False)
    base.update(kw)
    return base


# ------------------------------------------------------------ 1. no silent fallback
def test_fedsq_with_a_plain_model_fn_trains_a_dualcopy_model(tmp_path):
    cfg = from_mapping(dict(_cfg(), dataset="digits", model="tiny_cnn"))
    data = prepare_data(cfg, D.load_digits(), input_spec=InputSpec(1))

    def make():  # a random init, unseeded: the engine seeds it, so both methods start equal
        return UserCNN(in_ch=1)

    res = {m: Federation(cfg, m, data, model_fn=make, out_dir=tmp_path / m, quiet=True).run()
           for m in ("fedavg", "fedsq")}
    dual, plain = res["fedsq"], res["fedavg"]
    assert isinstance(dual.model, fs.DualCopyModel) and not isinstance(plain.model, fs.DualCopyModel)
    info = json.loads((tmp_path / "fedsq" / "metrics.json").read_text())["summary"]["model"]
    assert info["kind"] == "dualcopy" and info["converted_by_engine"] and info["arch"] == "UserCNN"
    assert info["gate_sites"] == 2 == len(dual.model.sites)
    # what travels is the quantitative copy, keyed as the original model
    assert set(dual.model.quantitative_state_dict()) == set(make().state_dict())
    assert info["payload_bytes"] == sum(t.numel() * t.element_size() for t in make().state_dict().values())
    assert info["full_model_bytes"] > info["payload_bytes"]
    assert json.loads((tmp_path / "fedavg" / "metrics.json").read_text())["summary"]["model"]["kind"] == "plain"
    # FedSQ's gates are fixed: after training, the two methods' histories differ
    assert [h["val_loss"] for h in dual.history[1:]] != [h["val_loss"] for h in plain.history[1:]]
    # and the round-0 model is the same network (a DualCopy equals its original at conversion)
    assert dual.history[0]["val_acc"] == plain.history[0]["val_acc"]


def test_dualcopy_model_fn_is_used_as_is_and_refused_under_a_plain_method():
    cfg = from_mapping(dict(_cfg(rounds=1), dataset="digits", model="tiny_cnn"))
    data = prepare_data(cfg, D.load_digits(), input_spec=InputSpec(1))
    dc = fs.dualcopy(UserCNN(in_ch=1), quant_bn="frozen")
    fed = Federation(cfg, "fedsq", data, model_fn=lambda: dc, quiet=True)
    assert fed.model_info["converted_by_engine"] is False and fed.model_info["quant_bn"] == "frozen"
    assert fed.model is not dc  # a copy: the user's object is not trained in place
    with pytest.raises(ValueError, match="not a fedsq method.*DualCopy"):
        Federation(cfg, "fedprox", data, model_fn=lambda: dc, quiet=True)
    with pytest.raises(TypeError, match="model_fn must return a torch.nn.Module"):
        Federation(cfg, "fedsq", data, model_fn=lambda: "resnet", quiet=True)


def test_unconvertible_model_under_fedsq_is_refused_with_the_site():
    class Smooth(UserCNN):
        def forward(self, x):
            x = F.gelu(self.bn(self.c1(x)))
            x = F.adaptive_avg_pool2d(torch.relu(self.c2(x)), 2)
            return self.head(x.flatten(1))

    cfg = from_mapping(dict(_cfg(rounds=1), dataset="digits", model="tiny_cnn"))
    data = prepare_data(cfg, D.load_digits(), input_spec=InputSpec(1))
    with pytest.raises(ValueError, match="'fedsq'.*could not be converted.*gelu"):
        Federation(cfg, "fedsq", data, model_fn=lambda: Smooth(in_ch=1), quiet=True)
    # the config's dualcopy options apply: allow_ungated keeps GELU ungated
    cfg2 = from_mapping(dict(_cfg(rounds=1), dataset="digits", model="tiny_cnn", allow_ungated=True))
    fed = Federation(cfg2, "fedsq", data, model_fn=lambda: Smooth(in_ch=1), quiet=True)
    assert fed.model_info["gate_sites"] == 1


def test_zoo_fedsq_records_what_trained(tmp_path):
    cfg = from_mapping(dict(_cfg(rounds=1), dataset="digits", model="tiny_cnn"))
    data = prepare_data(cfg, D.load_digits())
    res = Federation(cfg, "fedsq+fedprox", data, out_dir=tmp_path, quiet=True).run()
    m = res.summary["model"]
    assert (m["kind"], m["source"], m["arch"], m["gate_sites"]) == ("dualcopy", "model 'tiny_cnn'", "TinyCNN", 3)


# ------------------------------------------------------------ 3. your own data and model
def test_federate_grey_data_with_an_rgb_user_model(tmp_path):
    x, y = _digits()
    res = federate(lambda: UserCNN(in_ch=3), (x, y), config=_cfg(), methods=["fedavg", "fedsq"],
                   out_dir=tmp_path, quiet=True)
    for m, r in res.items():
        assert r.summary["complete"] and 0.0 <= r.summary["test_acc"] <= 1.0
        doc = json.loads((tmp_path / m / "metrics.json").read_text())
        assert doc["config"]["dataset"] == "custom" and doc["config"]["model"] == "model_fn"
    assert res["fedsq"].summary["model"]["kind"] == "dualcopy"


def test_input_spec_comes_from_the_model_never_from_a_default_name():
    # a grey model that states nothing: its first conv says 1 channel; no resize, no normalisation
    cfg = from_mapping(dict(_cfg(), dataset="digits"))  # cfg.model is the default 'svhn_cnn'
    spec = D.input_spec_of(UserCNN(in_ch=1))
    assert spec == InputSpec(1)
    data = prepare_data(cfg, D.load_digits(), input_spec=spec)
    assert data.x.shape[-1] == 8 and data.transform.channels == 1 and data.transform.mean is None
    xb = data.val_x[:5]
    assert torch.equal(data.transform(xb), xb)  # the data as given
    # a model that states a spec (attribute) gets it
    m = UserCNN(in_ch=3)
    m.input_spec = InputSpec(3, 16, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    data = prepare_data(cfg, D.load_digits(), model=m)
    assert data.x.shape[-2:] == (16, 16) and data.transform.channels == 3
    xb = data.val_x[:3]
    torch.testing.assert_close(data.transform(xb), (xb.expand(-1, 3, -1, -1) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
                               / 0.2)
    # zoo models carry theirs (dualcopy keeps it in config)
    z = fs.models.build_model("svhn_cnn")
    assert D.input_spec_of(z) == D.input_spec_of(fs.dualcopy(z)) == InputSpec(3, 32, z.input_mean, z.input_std)


def test_a_model_that_cannot_take_the_data_is_refused_before_training():
    # the user's RGB model under a config whose spec maps to 1 channel: a clear error, not a crash
    cfg = from_mapping(dict(_cfg(), dataset="digits", model="tiny_cnn"))
    data = prepare_data(cfg, D.load_digits())
    with pytest.raises(ValueError, match=r"model_fn: the model cannot take this data's input.*\(2, 1, 8, 8\).*input_spec"):
        Federation(cfg, "fedavg", data, model_fn=lambda: UserCNN(in_ch=3), quiet=True)
    with pytest.raises(ValueError, match="returns 7 logits, but the data has num_classes=10"):
        Federation(cfg, "fedsq", data, model_fn=lambda: UserCNN(in_ch=1, num_classes=7), quiet=True)


@pytest.mark.parametrize("case, match", [
    ("lengths", "train: 50 images but 49 labels"),
    ("labels_high", r"labels must lie in \[0, num_classes=10\), got values in \[0, 10\]"),
    ("labels_negative", r"labels must lie in \[0, num_classes=10\), got values in \[-1, "),
    ("labels_float", "labels must be integers"),
    ("empty", "train: the dataset is empty"),
    ("nan", "train images: image 3 holds NaN or Inf"),
    ("shape", r"train: samples of shape \(64,\) \(features, token ids or sequences\), but the model takes images: "
              r"\(batch, 1, H, W\) \(Conv2d with in_channels=1\)"),
    ("rank", r"images must be \(N, C, H, W\) or \(N, H, W\), got shape \(200, 1, 1, 8, 8\)"),
    ("channels", "the data has 4, the model takes 3"),
    ("too_few", "num_clients: 4 clients need at least 20 samples in the client pool, which holds"),
    ("width", "returns 5 logits, but the data has num_classes=10"),
    ("unused_key", "config: dataset, weights not used with your own data"),
    ("model_fn", "model_fn must be a callable"),
])
def test_federate_bad_input_is_refused_before_any_work(tmp_path, case, match):
    x, y = _digits(200)
    y = y.clone()
    model_fn, kw, cfg = (lambda: UserCNN(in_ch=1)), {}, _cfg()
    if case == "lengths":
        x, y = x[:50], y[:49]
    elif case == "labels_high":
        y[7] = 10
        kw["num_classes"] = 10
    elif case == "labels_negative":
        y[7] = -1
        kw["num_classes"] = 10
    elif case == "labels_float":
        y = y.float() + 0.5
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "nan":
        x = x.clone()
        x[3, 0, 2, 2] = float("nan")
    elif case == "shape":
        x = x.reshape(len(x), -1)
    elif case == "rank":
        x = x.reshape(len(x), 1, 1, 8, 8)
    elif case == "channels":
        x = x.expand(-1, 4, -1, -1).contiguous()
        model_fn = lambda: UserCNN(in_ch=3)  # noqa: E731
    elif case == "too_few":
        x, y = x[:60], y[:60]  # 48 train - val 40 = 8 samples for 4 clients x 5
        cfg["val_size"] = 40
    elif case == "width":
        model_fn = lambda: UserCNN(in_ch=1, num_classes=5)  # noqa: E731
    elif case == "unused_key":
        cfg.update(dataset="mnist", weights="default")
    elif case == "model_fn":
        model_fn = UserCNN(in_ch=1)
    with pytest.raises((ValueError, TypeError), match=match):
        federate(model_fn, (x, y), config=cfg, out_dir=tmp_path / "out", quiet=True, **kw)
    assert not (tmp_path / "out").exists()  # nothing written


def test_federate_reads_map_style_datasets_and_image_folders(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(_seed())
    imgs = rng.integers(0, 256, size=(60, 12, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=60)
    for i, (im, c) in enumerate(zip(imgs, labels)):
        d = tmp_path / "folder" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:03d}.png")
    ds = ImageFolder(str(tmp_path / "folder"))
    b = make_bundle(ds, test_fraction=0.25)
    # every image read back exactly (uint8 -> [0, 1]), labels as the folder names say
    x = torch.cat([b.train.x, b.test.x])
    y = torch.cat([b.train.y, b.test.y])
    ref = {int(ds.targets[i]): None for i in range(len(ds))}
    assert len(y) == 60 and b.train.num_classes == 3 and set(y.tolist()) <= set(ref)
    order = sorted(range(len(ds)), key=lambda i: ds.samples[i][0])
    allx = torch.stack([torch.from_numpy(np.array(Image.open(ds.samples[i][0]))).permute(2, 0, 1).float() / 255
                        for i in order])
    assert sorted(map(lambda t: t.sum().item(), x)) == pytest.approx(sorted(map(lambda t: t.sum().item(), allx)))
    # torch's own TensorDataset is a map-style dataset too
    tds = torch.utils.data.TensorDataset(torch.rand(40, 1, 6, 6), torch.randint(0, 4, (40,)))
    b2 = make_bundle(tds, tds, num_classes=4)
    assert torch.equal(b2.train.x, tds.tensors[0]) and torch.equal(b2.test.y, tds.tensors[1])
    bad = torch.utils.data.TensorDataset(torch.rand(3, 6, 6))
    with pytest.raises(ValueError, match=r"train\[0\]: items must be \(image, label\) pairs"):
        make_bundle(bad)


def test_old_tensordataset_name_warns_and_points_to_the_new_one():
    import fedsq_fast.federation as fed

    with pytest.warns(DeprecationWarning, match="InMemoryDataset"):
        cls = fed.TensorDataset
    assert cls is D.InMemoryDataset


# ------------------------------------------------------------ 4. configs that cannot learn
def test_a_config_that_leaves_clients_one_step_per_round_warns():
    cfg = from_mapping(dict(dataset="digits", model="tiny_cnn", rounds=1))  # val_size 1000 of 1437
    with pytest.warns(UserWarning, match="about one optimizer step per client per round") as rec:
        prepare_data(cfg, D.load_digits())
    assert any("val_size=1000 takes 70%" in str(w.message) for w in rec)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sane config stays quiet
        prepare_data(from_mapping(dict(dataset="digits", model="tiny_cnn", val_size=200, batch_size=16,
                                       num_clients=5)), D.load_digits())


# ------------------------------------------------------------ 6. progress, plots
def test_one_progress_line_per_round_off_a_terminal_and_none_when_quiet(capsys):
    cfg = from_mapping(dict(_cfg(rounds=3), dataset="digits", model="tiny_cnn"))
    data = prepare_data(cfg, D.load_digits())
    Federation(cfg, "fedavg", data).run()
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("[fedavg] round")]
    assert [ln.split(":")[0] for ln in lines] == [f"[fedavg] round {r}/3" for r in (1, 2, 3)]
    assert all("val_acc 0." in ln and "ETA" in ln and " s" in ln for ln in lines)
    Federation(cfg, "fedavg", data, quiet=True).run()
    assert "[fedavg]" not in capsys.readouterr().err


def test_round_axes_have_integer_ticks(tmp_path):
    from fedsq_fast.federation.runner import partition_tag
    from fedsq_fast.plots import group_histories, plot_accuracy, round_axis

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2, 3], [0.1, 0.5, 0.6, 0.7])
    round_axis(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)
    docs = [{"config": {"partition": "iid", "alpha": 0.5}, "method": "fedavg",
             "history": [{"round": r, "val_acc": 0.1 * r} for r in range(4)]}]
    plot_accuracy(group_histories(docs, partition_tag), tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0


# ------------------------------------------------------------ 7. benchmarks are collected
def test_pytest_benchmarks_collects_every_suite():
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    files = {ln.split("::")[0] for ln in out.stdout.splitlines() if "::" in ln}
    expected = {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert expected and files == expected
