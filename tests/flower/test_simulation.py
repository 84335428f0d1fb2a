"""FedSQ on Flower's simulation engine (Ray backend) against the embedded engine: the same
config (seed, partitions, sampled clients) gives the same global model and the same
per-round numbers, bit for bit. Skipped where Ray is not installed (CI installs
``.[flower]`` only; ``pip install "flwr[simulation]==1.41.0"`` adds it)."""
import importlib.util
import json

import pytest
import torch
from conftest import assert_same_state, model_state, small_config

pytest.importorskip("flwr")
if importlib.util.find_spec("ray") is None:
    pytest.skip('Ray is not installed: Flower\'s simulation needs pip install "flwr[simulation]==1.41.0"',
                allow_module_level=True)

from fedsq_fast.federation import Federation, prepare_data  # noqa: E402
from fedsq_fast.flower.simulation import simulate, to_run_config  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.slow
def test_simulation_equals_embedded_engine_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    # 3 clients, 2 sampled per round: the unsampled node must answer without training
    cfg = small_config(rounds=2, num_clients=3, fraction=0.6, methods=["fedavg", "fedsq"], val_size=150,
                       max_test_samples=100, out_dir=str(tmp_path / "sim"))
    sim = simulate(cfg)
    data = prepare_data(cfg)
    for method in cfg.methods:
        emb = Federation(cfg, method, data, out_dir=tmp_path / "emb" / method, quiet=True).run()
        got = sim[method]
        assert_same_state(model_state(emb.model), model_state(got.model))
        assert len(got.history) == cfg.rounds + 1
        for h1, h2 in zip(emb.history, got.history):
            for k in ("val_acc", "val_loss", "train_loss", "clients_sampled", "clients_ok", "clients_dropped",
                      "samples", "client_drift", "update_norm", "gate_change"):
                assert h1[k] == h2[k] or h1[k] != h1[k] and h2[k] != h2[k], (method, h1["round"], k)  # NaN: round 0
        for h in got.history[1:]:
            assert h["clients_sampled"] == h["clients_ok"] == 2 and h["clients_dropped"] == []
        assert got.summary["test_acc"] == emb.summary["test_acc"]
        doc = json.loads((tmp_path / "sim" / method / "metrics.json").read_text())  # the app's files
        assert doc["summary"]["complete"] and [h["val_acc"] for h in doc["history"]] == [
            h["val_acc"] for h in emb.history]


def test_to_run_config_round_trips_through_the_app_parser(small_cfg):
    from fedsq_fast.flower.app import config_from_run_config

    cfg = small_cfg(methods=["fedavg", "fedsq+fedprox"], max_train_samples=None)
    back, opts = config_from_run_config(to_run_config(cfg, **{"aggregation-order": "arrival"}))
    assert back.to_dict() == cfg.to_dict() and opts["order"] == "arrival"
    with pytest.raises(TypeError, match="cfg must be a RunConfig"):
        to_run_config(cfg.to_dict())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(text: str) -> list:
    """Processes whose command line contains ``text`` (the detached local SuperLink)."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.mark.slow
def test_flwr_run_local_simulation_as_documented(tmp_path):
    """docs/flower.md's `flwr run flower` on a local simulation federation (Flower starts its own
    SuperLink in simulation mode, detached: stopped here by its port) equals the embedded engine."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from fedsq_fast.federation import checkpoint as ckpt

    root, bin_ = Path(__file__).resolve().parents[2], Path(sys.executable).parent
    cfg = small_config(rounds=2, num_clients=3, methods=["fedsq"], val_size=150, max_test_samples=100,
                       out_dir=str(tmp_path / "out"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {cfg.num_clients}\noptions.backend.client-resources.num-cpus = 1\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text((root / "flower" / "pyproject.toml").read_text())
    (tmp_path / "run.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in to_run_config(cfg).items()))
    port, control = _free_port(), _free_port()
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port), FLWR_LOCAL_CONTROL_API_PORT=str(control),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(bin_), os.environ.get("PATH", "")]))
    try:
        r = subprocess.run([str(bin_ / "flwr"), "run", str(tmp_path / "app"), "--run-config", str(tmp_path / "run.toml"),
                            "--stream"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    finally:
        for pid in _pids_with(f"--port {port}"):  # the local SuperLink outlives `flwr run`
            os.kill(pid, signal.SIGTERM)
    log = tmp_path / "home" / "local-superlink" / "superlink.log"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (log.read_text()[-2000:] if log.exists() else "")
    out = tmp_path / "out" / "fedsq"
    assert (out / "metrics.json").is_file(), r.stdout[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    data = prepare_data(cfg)
    emb = Federation(cfg, "fedsq", data, out_dir=tmp_path / "emb", quiet=True).run()
    groups, _ = ckpt.load(out / "checkpoint.safetensors")
    assert_same_state(model_state(emb.model), groups["model"])
    assert [h["val_acc"] for h in doc["history"]] == [h["val_acc"] for h in emb.history]
