"""The fedsq-fast command line on tiny real data (scikit-learn digits)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsq_fast.cli import main

TINY = ["--dataset", "digits", "--model", "tiny_cnn", "--num-clients", "4", "--val-size", "200",
        "--max-train-samples", "none", "--max-test-samples", "200", "--lr", "0.05", "--threads", "1",
        "--probe-size", "16", "--min-partition-size", "5"]


def _methods():
    try:
        import fedsq_fast.models  # noqa: F401

        return ["fedavg", "fedsq"]
    except ImportError:
        return ["fedavg", "fedprox"]


def test_run_two_rounds_end_to_end_then_resume_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", *TINY, "--rounds", "2", "--methods", *_methods(), "--out-dir", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "config:" in text and "num_clients = 4" in text and "rounds = 2" in text  # printed in full
    assert "summary" in text and "BVA" in text
    for m in _methods():
        doc = json.loads((out / m / "metrics.json").read_text())
        assert [h["round"] for h in doc["history"]] == [0, 1, 2]
        assert doc["summary"]["rounds"] == 2 and 0 <= doc["summary"]["bva"] <= 1
        assert (out / m / "metrics.csv").read_text().count("\n") == 4
        assert (out / m / "checkpoint.safetensors").is_file()
    for f in ("partition.txt", "partition.png", "summary.md", "accuracy.png", "rounds_to_best.png"):
        assert (out / f).is_file(), f
    first = json.loads((out / _methods()[0] / "metrics.json").read_text())
    # resume of a finished run trains nothing and reports the same model's numbers
    assert main(["run", *TINY, "--rounds", "2", "--methods", *_methods(), "--out-dir", str(out),
                 "--resume", "--quiet"]) == 0
    again = json.loads((out / _methods()[0] / "metrics.json").read_text())
    assert again["summary"]["test_acc"] == first["summary"]["test_acc"]
    assert [h["val_acc"] for h in again["history"]] == [h["val_acc"] for h in first["history"]]
    (out / "accuracy.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "accuracy.png").is_file()


def test_config_file_toml_and_yaml(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\ndataset = "digits"\nmodel = "tiny_cnn"\nrounds = 1\nnum_clients = 3\n'
                    'val_size = 200\nmax_train_samples = 600\nmethods = ["fedavg"]\nthreads = 1\n'
                    f'out_dir = "{tmp_path / "t"}"\n')
    assert main(["run", "--config", str(toml), "--partition", "iid"]) == 0
    text = capsys.readouterr().out
    assert 'partition = "iid"' in text and "num_clients = 3" in text
    assert (tmp_path / "t" / "fedavg" / "metrics.json").is_file()
    yml = tmp_path / "c.yaml"
    yml.write_text("dataset: digits\nmodel: tiny_cnn\nnum_clinets: 3\n")
    assert main(["run", "--config", str(yml), "--out-dir", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "num_clinets" in err and "num_clients" in err
    assert not (tmp_path / "y").exists()  # rejected before anything ran


@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet9000"], "model: must be one of"),
    (["--dataset", "imagenet"], "dataset: must be one of"),
    (["--methods", "fedsgd"], "fedsgd"),
    (["--methods", "fedavg:refresh=2"], "need a fedsq method"),
    (["--alpha", "0"], "alpha"),
    (["--alpha", "-0.5"], "alpha"),
    (["--fraction", "0"], "fraction"),
    (["--fraction", "1.5"], "fraction"),
    (["--num-clients", "5000"], "num_clients"),
    (["--partition", "pathological"], "partition: must be one of"),
    (["--optimizer", "lbfgs"], "optimizer: must be one of"),
])
def test_bad_input_rejected_before_training(tmp_path, capsys, args, needle):
    out = tmp_path / "bad"
    rc = main(["run", "--dataset", "digits", "--model", "tiny_cnn", "--max-train-samples", "none",
               "--out-dir", str(out), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err
    if "must be one of" in needle:
        assert "," in err.split(needle, 1)[1]  # lists the valid names
    assert not any(out.rglob("metrics.json"))


def test_compare_table_with_seeds_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *TINY, "--rounds", "1", "--methods", "fedavg", "fedavgm", "--seeds", "0", "1",
               "--partitions", "iid", "dirichlet:0.3", "--out-dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "±" in text
    rows = (out / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4  # 2 partitions x 2 methods
    assert all(r.split(",")[2] == "2" for r in rows[1:])  # two seeds each
    assert (out / "accuracy.png").is_file() and (out / "rounds_to_best.png").is_file()
    assert len(list(out.rglob("metrics.json"))) == 8


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "fedsq_fast", "run", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0 and "--num-clients" in r.stdout and "--resume" in r.stdout
