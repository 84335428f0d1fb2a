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


# ---------------------------------------------------------------- issue 24, items 5 and 6
QUIET_TINY = ["--dataset", "digits", "--model", "tiny_cnn", "--weights", "none", "--num-clients", "2",
              "--val-size", "100", "--max-train-samples", "400", "--max-test-samples", "100", "--methods", "fedavg",
              "--threads", "1", "--batch-size", "16", "--quiet"]  # no warnings: stderr holds only our lines


def test_outputs_are_never_written_through_a_planted_symlink(tmp_path):
    """A link planted in the output folder (here to a file outside it) is replaced by the real
    output; the file it pointed at is untouched. Every writer of a run's folder is covered."""
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("precious")
    names = ["partition.txt", "partition.png", "summary.md", "summary.csv", "accuracy.png", "rounds_to_best.png",
             "fedavg/metrics.json", "fedavg/metrics.csv", "fedavg/checkpoint.safetensors"]
    (out / "fedavg").mkdir(parents=True)
    for n in names:
        (out / n).symlink_to(victim)
    assert main(["run", *QUIET_TINY, "--rounds", "1", "--out-dir", str(out)]) == 0
    assert victim.read_text() == "precious"
    for n in names:
        assert (out / n).is_file() and not (out / n).is_symlink(), n
    assert oct((out / "partition.txt").stat().st_mode & 0o777) != "0o600"  # the umask's mode, not mkstemp's
    (out / "summary.md").unlink()
    (out / "summary.md").symlink_to(victim)
    assert main(["report", str(out)]) == 0
    assert victim.read_text() == "precious" and not (out / "summary.md").is_symlink()
    assert not list(out.rglob("*.tmp"))


def _strip_timings(doc):
    skip = ("time_", "elapsed_s", "seconds_to_target")
    if isinstance(doc, dict):
        return {k: _strip_timings(v) for k, v in doc.items() if not k.startswith(skip)}
    if isinstance(doc, list):
        return [_strip_timings(v) for v in doc]
    return doc


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_resume_command_which_ends_bit_exact(tmp_path):
    import os
    import shlex
    import signal
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    argv = ["run", *QUIET_TINY, "--rounds", "12", "--out-dir", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "fedsq_fast", *argv], cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ck = out / "fedavg" / "checkpoint.prev.safetensors"  # exists once round 2 is saved
    t0 = time.time()
    while not ck.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fedsq-fast: interrupted (Ctrl-C) after round ") and " of 12 of fedavg was saved" in lines[0]
    cmd = lines[0].split("resume with: ", 1)[1]
    assert cmd == "python -m fedsq_fast " + shlex.join(argv) + " --resume"
    saved = json.loads(__import__("safetensors").safe_open(str(out / "fedavg" / "checkpoint.safetensors"),
                                                           "pt").metadata()["meta"])["round"]
    assert f"after round {saved} of 12" in lines[0] and not (out / "fedavg" / "metrics.json").exists()
    words = shlex.split(cmd)
    r = subprocess.run([sys.executable, *words[1:]], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    resumed = json.loads((out / "fedavg" / "metrics.json").read_text())
    full = tmp_path / "full"
    assert main(["run", *QUIET_TINY, "--rounds", "12", "--out-dir", str(full)]) == 0
    whole = json.loads((full / "fedavg" / "metrics.json").read_text())
    for d in (resumed, whole):
        d["config"].pop("out_dir")
    assert _strip_timings(resumed) == _strip_timings(whole)


def test_outputs_replacing_is_atomic_and_never_follows_a_link(tmp_path):
    from fedsq_fast import outputs

    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "out.txt"
    target.symlink_to(victim)
    with pytest.raises(RuntimeError):
        with outputs.replacing(target) as f:
            f.write("half")
            raise RuntimeError("interrupted mid-write")
    assert target.is_symlink() and victim.read_text() == "precious"  # untouched on an error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "victim"]  # no temp left
    outputs.write_text(target, "new")
    assert not target.is_symlink() and target.read_text() == "new" and victim.read_text() == "precious"
    (tmp_path / ".ckpt-x.tmp").write_text("stale")
    (tmp_path / ".ckpt-link.tmp").symlink_to(victim)
    assert [p.name for p in outputs.remove_stale_temps(tmp_path)] == [".ckpt-x.tmp"]
    assert victim.read_text() == "precious" and (tmp_path / ".ckpt-link.tmp").is_symlink()
