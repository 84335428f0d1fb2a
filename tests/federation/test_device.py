"""The run config's ``device`` key: validation, placement, resume across devices, CUDA runs."""
import json

import pytest
import torch
from conftest import small_config

from fedsq_fast.federation import Federation, from_mapping, prepare_data, validate
from fedsq_fast.federation.adapter import TinyCNN
from fedsq_fast.federation.config import resolve_device

torch.set_num_threads(1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _cfg(**kw):
    return small_config(**kw)


@pytest.mark.parametrize("bad", ["gpu", "tpu", "", "cuda:x", "meta", 0, None, ["cpu"]])
def test_bad_device_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"^device: "):
        validate(_cfg(device=bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_before_any_work(spec):
    with pytest.raises(ValueError, match=r"^device: .*no CUDA GPU"):
        validate(_cfg(device=spec))


def test_auto_resolves_to_what_torch_sees():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")
    validate(_cfg(device="auto"))
    validate(_cfg(device="cpu"))


def test_data_model_and_summary_on_the_configured_device(tmp_path, digits_bundle):
    cfg = _cfg(rounds=1, device="cpu")
    data = prepare_data(cfg, digits_bundle)
    assert data.device == torch.device("cpu") and data.to("cpu") is data
    res = Federation(cfg, "fedavg", data, out_dir=tmp_path, quiet=True).run()
    assert all(p.device.type == "cpu" for p in res.model.parameters())
    assert res.summary["device"] == "cpu"
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["device"] == "cpu"


def test_resume_ignores_the_device_key(tmp_path, digits_bundle):
    """A checkpoint written with device 'cpu' resumes under 'auto' (another machine's
    setting); on a CPU-only machine the result is the uninterrupted run, bit for bit."""
    cfg = _cfg(rounds=3, device="cpu")
    data = prepare_data(cfg, digits_bundle)
    full = Federation(cfg, "fedavg", data, out_dir=tmp_path / "a", quiet=True).run()
    Federation(cfg, "fedavg", data, out_dir=tmp_path / "b", quiet=True).run(stop_after=1)
    cfg2 = from_mapping({"device": "auto"}, cfg)
    resumed = Federation(cfg2, "fedavg", data, out_dir=tmp_path / "b", quiet=True).run(resume=True)
    assert len(resumed.history) == cfg.rounds + 1
    a, b = full.model.state_dict(), resumed.model.state_dict()
    if not torch.cuda.is_available():
        assert all(torch.equal(a[k], b[k].cpu()) for k in a)
    else:  # resumed on the GPU: same run up to float rounding
        for k in a:
            torch.testing.assert_close(b[k].cpu().double(), a[k].double(), rtol=5e-2, atol=5e-3)


def test_finished_runs_without_a_device_key_still_count_as_done(tmp_path):
    """Results written before the key existed are not refused or re-run by --resume."""
    from fedsq_fast.experiments import _cell_state

    cfg = _cfg()
    theirs = cfg.to_dict()
    del theirs["device"]
    (tmp_path / "metrics.json").write_text(json.dumps({"config": theirs, "summary": {"complete": True}}))
    assert _cell_state(tmp_path, cfg) == "done"
    theirs["lr"] = cfg.lr * 2  # a setting that changes the result is still refused
    (tmp_path / "metrics.json").write_text(json.dumps({"config": theirs, "summary": {"complete": True}}))
    with pytest.raises(ValueError, match="lr"):
        _cell_state(tmp_path, cfg)


# ---------------------------------------------------------------- CUDA (skipped without a GPU)
@cuda
@pytest.mark.parametrize("method", ["fedavg", "fedsq", "fedsq+fedadam"])
def test_cuda_run_matches_cpu_run(tmp_path, digits_bundle, method):
    models = pytest.importorskip("fedsq_fast.models")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    def mk():
        torch.manual_seed(0)
        m = TinyCNN(1, 10)
        return models.dualcopy(m) if method.startswith("fedsq") else m

    out = {}
    for dev in ("cpu", "cuda"):
        cfg = _cfg(rounds=2, device=dev, seed=7, mask_cache=True)
        data = prepare_data(cfg, digits_bundle)
        assert data.device.type == dev
        fed = Federation(cfg, method, data, out_dir=tmp_path / dev, quiet=True, model_fn=mk)
        out[dev] = fed.run()
        assert out[dev].summary["device"].startswith(dev)
        assert all(p.device.type == dev for p in out[dev].model.parameters())
    a, b = out["cpu"].model.state_dict(), out["cuda"].model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k].cpu().double(), a[k].double(), rtol=1e-3, atol=1e-4, msg=k)
    assert abs(out["cpu"].summary["bva"] - out["cuda"].summary["bva"]) <= 0.02


@cuda
def test_cuda_resume_is_bit_exact_with_deterministic_kernels(tmp_path, digits_bundle):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cfg = _cfg(rounds=3, device="cuda", methods=["fedsq"])
    data = prepare_data(cfg, digits_bundle)
    full = Federation(cfg, "fedsq", data, out_dir=tmp_path / "a", quiet=True).run()
    Federation(cfg, "fedsq", data, out_dir=tmp_path / "b", quiet=True).run(stop_after=1)
    resumed = Federation(cfg, "fedsq", data, out_dir=tmp_path / "b", quiet=True).run(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@cuda
def test_cuda_run_with_data_kept_in_host_memory(tmp_path, digits_bundle, monkeypatch):
    """Splits too big for the GPU stay on the host and batches are copied as used: the
    same result as with the splits on the GPU."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cfg = _cfg(rounds=2, device="cuda", methods=["fedsq"])
    on_gpu = prepare_data(cfg, digits_bundle)
    assert on_gpu.device.type == "cuda"
    a = Federation(cfg, "fedsq", on_gpu, quiet=True).run()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (1024, 1 << 40))
    on_host = prepare_data(cfg, digits_bundle)
    assert on_host.device.type == "cpu" and on_host.probe.device.type == "cuda"
    b = Federation(cfg, "fedsq", on_host, quiet=True).run()
    assert b.summary["device"].startswith("cuda")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
