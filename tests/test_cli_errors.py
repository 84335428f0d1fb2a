"""Careless-user probes of the command line (issue 16): every mistake ends with exactly one
stderr line ``fedsq-fast: error: ...`` naming the key/file (and line for TOML/YAML syntax),
exit code 2, no traceback, nothing written and, for what can be checked up front, no data
loaded (``load_dataset`` is replaced by a tripwire)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsq_fast import cli
from fedsq_fast.federation import config as cfgmod
from fedsq_fast.federation import data as datamod
from fedsq_fast.federation import prepare

# a run that would start quickly if nothing were wrong (digits + tiny_cnn, one round)
TINY = ["--dataset", "digits", "--model", "tiny_cnn", "--weights", "none", "--num-clients", "2",
        "--val-size", "100", "--max-train-samples", "200", "--max-test-samples", "100", "--rounds", "1",
        "--methods", "fedavg", "--threads", "1", "--quiet"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading any data is a failure: these mistakes must be caught before."""
    def trip(*a, **k):
        raise AssertionError("data was loaded before the mistake was reported")

    monkeypatch.setattr(prepare, "load_dataset", trip)
    monkeypatch.setattr(datamod, "load_dataset", trip)


def fails(capsys, tmp_path, argv, *needles):
    """Run the CLI in-process; check exit 2, one error line holding ``needles``, nothing written."""
    before = {p for p in tmp_path.rglob("*")}
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse-level mistakes
        rc = e.code
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1 and lines[0].startswith("fedsq-fast: error: "), cap.err
    assert "Traceback" not in cap.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    after = {p for p in tmp_path.rglob("*")}
    assert after == before, sorted(map(str, after - before))  # nothing written at all
    assert not list(tmp_path.rglob("partition.txt"))
    return lines[0]


def _cfg(tmp_path, name, content):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def _out(tmp_path):
    return ["--out-dir", str(tmp_path / "out")]


# ---------------------------------------------------------------- config files
def test_malformed_yaml_names_file_and_line(tmp_path, capsys, no_data):
    p = _cfg(tmp_path, "c.yaml", "rounds: 2\nmethods: [fedavg, fedsq\nlr: 0.1\n")
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)], str(p), "line 3")


def test_malformed_toml_names_file_and_line(tmp_path, capsys, no_data):
    p = _cfg(tmp_path, "c.toml", 'rounds = 2\nlr = 0.1\nmethods = ["fedavg"\n')
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)], str(p), "line 3")


def test_non_utf8_config_names_file(tmp_path, capsys, no_data):
    p = _cfg(tmp_path, "c.toml", b"rounds = 2\n# caf\xe9\n")
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)], str(p), "UTF-8", "line 2")


def test_keys_beside_run_table_are_refused(tmp_path, capsys, no_data):
    p = _cfg(tmp_path, "c.toml", 'lr = 0.5\nrounds = 7\n\n[run]\nseed = 1\n')
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)], str(p), "lr", "rounds", "[run]")
    with pytest.raises(ValueError, match="lr, rounds"):  # the Python API too
        cfgmod.load_file(p)


def test_unknown_key_in_file_suggests_and_names_file(tmp_path, capsys, no_data):
    p = _cfg(tmp_path, "c.yaml", "num_client: 3\n")
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)],
          str(p), "num_client", "did you mean num_clients")


def test_bad_value_in_file_names_file(tmp_path, capsys, no_data):
    p = _cfg(tmp_path, "c.toml", "lr = -1\n")
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)], "lr", str(p))


def test_unknown_flag_is_one_line(tmp_path, capsys, no_data):
    fails(capsys, tmp_path, ["run", *TINY, "--num-clientz", "3", *_out(tmp_path)], "--num-clientz",
          "did you mean --num-clients")


# ---------------------------------------------------------------- output folder
def test_out_dir_is_a_file(tmp_path, capsys, no_data):
    f = tmp_path / "f"
    f.write_text("x")
    fails(capsys, tmp_path, ["run", *TINY, "--out-dir", str(f)], "out_dir", str(f))


def test_out_dir_under_a_file(tmp_path, capsys, no_data):
    f = tmp_path / "f"
    f.write_text("x")
    fails(capsys, tmp_path, ["run", *TINY, "--out-dir", str(f / "sub" / "run")], "out_dir", str(f))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write anywhere; the under-a-file case covers the same check")
def test_out_dir_not_writable(tmp_path, capsys, no_data):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        fails(capsys, tmp_path, ["run", *TINY, "--out-dir", str(ro / "run")], "out_dir", "not writable")
    finally:
        ro.chmod(0o700)


def test_compare_out_dir_is_a_file(tmp_path, capsys, no_data):
    f = tmp_path / "f"
    f.write_text("x")
    fails(capsys, tmp_path, ["compare", *TINY, "--seeds", "0", "--out-dir", str(f)], "out_dir", str(f))


# ---------------------------------------------------------------- weights
def test_weights_path_missing(tmp_path, capsys, no_data):
    w = tmp_path / "nope" / "w.pth"
    fails(capsys, tmp_path, ["run", *TINY, "--model", "svhn_cnn", "--weights", str(w), *_out(tmp_path)],
          "weights", str(w))


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_weights_file_garbage(tmp_path, capsys, no_data, name):
    w = tmp_path / name
    w.write_bytes(os.urandom(256))
    fails(capsys, tmp_path, ["run", *TINY, "--model", "svhn_cnn", "--weights", str(w), *_out(tmp_path)],
          "weights", str(w))


def test_weights_for_toy_model(tmp_path, capsys, no_data):
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    fails(capsys, tmp_path, ["run", *TINY, "--weights", str(w), *_out(tmp_path)], "weights", "tiny_cnn")
    from fedsq_fast.federation import adapter

    c = cfgmod.from_mapping({"model": "mlp", "weights": "offline", "dataset": "digits"})
    with pytest.raises(ValueError, match="weights: 'mlp'"):  # the Python API too
        cfgmod.validate(c, adapter.list_models())
    with pytest.raises(ValueError, match="weights"):
        adapter.build_model("tiny_cnn", 10, "offline")


# ---------------------------------------------------------------- data roots
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_data_root_missing(tmp_path, capsys, no_data, dataset):
    root = tmp_path / "nodata"
    fails(capsys, tmp_path, ["run", *TINY, "--dataset", dataset, "--data-root", str(root), *_out(tmp_path)],
          "data_root", str(root))


def test_fake_mnist_folder(tmp_path, capsys, no_data):
    (tmp_path / "d" / "MNIST" / "raw").mkdir(parents=True)
    fails(capsys, tmp_path, ["run", *TINY, "--dataset", "mnist", "--data-root", str(tmp_path / "d"),
                             *_out(tmp_path)], "data_root", "train-images-idx3-ubyte")


def test_data_root_without_the_dataset_folder(tmp_path, capsys, no_data):
    (tmp_path / "d").mkdir()  # exists, but holds no MNIST/raw: used to fall back to the bundled copy
    fails(capsys, tmp_path, ["run", *TINY, "--dataset", "mnist", "--data-root", str(tmp_path / "d"),
                             *_out(tmp_path)], "data_root", "MNIST")


def test_garbage_idx_file_names_file(tmp_path, capsys):
    raw = tmp_path / "d" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (raw / f).write_bytes(b"\x00\x00\x08\x03" + os.urandom(20))  # header says 3 dims, data is short
    fails(capsys, tmp_path, ["run", *TINY, "--dataset", "mnist", "--data-root", str(tmp_path / "d"),
                             *_out(tmp_path)], "train-images-idx3-ubyte")


def test_data_root_for_digits_is_refused(tmp_path, capsys, no_data):
    fails(capsys, tmp_path, ["run", *TINY, "--data-root", str(tmp_path), *_out(tmp_path)], "data_root", "digits")


# ---------------------------------------------------------------- sizes, log level
@pytest.mark.parametrize("size", ["20000", "0"])
def test_image_size_out_of_range(tmp_path, capsys, no_data, size):
    fails(capsys, tmp_path, ["run", *TINY, "--image-size", size, *_out(tmp_path)], "image_size", size)


def test_num_clients_absurd(tmp_path, capsys, no_data):
    fails(capsys, tmp_path, ["run", *TINY, "--max-train-samples", "none", "--num-clients", "1000000000",
                             *_out(tmp_path)], "num_clients")


def test_log_level_bogus(tmp_path, capsys, no_data):
    fails(capsys, tmp_path, ["run", *TINY, "--log-level", "BOGUS", *_out(tmp_path)], "--log-level", "BOGUS")


def test_report_missing_dir(tmp_path, capsys):
    fails(capsys, tmp_path, ["report", str(tmp_path / "nope")], str(tmp_path / "nope"))


# ---------------------------------------------------------------- suites
def test_suite_file_missing(tmp_path, capsys):
    fails(capsys, tmp_path, ["suite", "run", str(tmp_path / "nope.toml")], str(tmp_path / "nope.toml"))


def test_suite_file_malformed(tmp_path, capsys):
    p = _cfg(tmp_path, "s.toml", '[suite]\nname = "x"\nseeds = [0,\n')
    fails(capsys, tmp_path, ["suite", "run", str(p)], str(p), "line")


def test_suite_file_not_utf8(tmp_path, capsys):
    p = _cfg(tmp_path, "s.toml", b'[suite]\nname = "caf\xe9"\n')
    fails(capsys, tmp_path, ["suite", "run", str(p)], str(p), "UTF-8")


def test_suite_results_dir_is_a_file(tmp_path, capsys, no_data, monkeypatch):
    import fedsq_fast.experiments.runner as ex

    monkeypatch.setattr(ex, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data loaded")))
    suite = Path(__file__).resolve().parents[1] / "experiments" / "smoke.toml"
    f = tmp_path / "f"
    f.write_text("x")
    fails(capsys, tmp_path, ["suite", "run", str(suite), "--out", str(f)], "out", str(f))


# ---------------------------------------------------------------- end to end, as a user runs it
def test_subprocess_one_line_no_traceback(tmp_path):
    p = _cfg(tmp_path, "c.yaml", "rounds: [1\n")
    r = subprocess.run([sys.executable, "-m", "fedsq_fast.cli", "run", "--config", str(p), *TINY,
                        *_out(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("fedsq-fast: error: ") and str(p) in err[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    """Only user mistakes become one line: a bug (here a TypeError from deep inside) propagates."""
    def boom(*a, **k):
        raise TypeError("internal bug")

    monkeypatch.setattr(prepare, "load_dataset", boom)
    with pytest.raises(TypeError, match="internal bug"):
        cli.main(["run", *TINY, *_out(tmp_path)])


# ---------------------------------------------------------------- the Python API
def test_api_load_dataset_never_falls_back(tmp_path):
    with pytest.raises(ValueError, match="data_root: .* does not exist"):
        datamod.load_dataset("mnist", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="download: needs data_root"):
        cfgmod.validate(cfgmod.from_mapping({"dataset": "fashion_mnist", "download": True}))


def test_api_check_sources_and_config_errors(tmp_path):
    c = cfgmod.validate(cfgmod.from_mapping({"dataset": "digits", "model": "svhn_cnn",
                                             "weights": str(tmp_path / "w.pth")}))
    with pytest.raises(cfgmod.ConfigError, match="weights: file not found") as e:
        cfgmod.check_sources(c, ["svhn_cnn"])
    assert e.value.key == "weights"
    p = _cfg(tmp_path, "c.yaml", "1: 2\n")
    with pytest.raises(cfgmod.ConfigError, match="c.yaml: 1: config keys are names"):
        cfgmod.load_config(p)


# ---------------------------------------------------------------- issue 24, item 5: every word
def test_abbreviated_flag_is_refused_not_expanded(tmp_path, capsys, no_data):
    """--round 2 used to be taken as --rounds 2 (argparse prefix matching) and start a run."""
    fails(capsys, tmp_path, ["run", *TINY, "--round", "2", *_out(tmp_path)], "unrecognized arguments: --round 2",
          "did you mean --rounds")
    fails(capsys, tmp_path, ["compare", *TINY, "--local-epoch", "2", *_out(tmp_path)], "--local-epoch 2",
          "did you mean --local-epochs")
    fails(capsys, tmp_path, ["suite", "verify", str(tmp_path), "--cel", "x"], "--cel", "did you mean --cell")
    from fedsq_fast.experiments import main as suite_main

    with pytest.raises(SystemExit) as e:
        suite_main(["verify", str(tmp_path), "--samp", "2"])
    assert e.value.code == 2 and "--samp" in capsys.readouterr().err


def test_bare_command_prints_help_and_runs_nothing(tmp_path, capsys, monkeypatch, no_data):
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("usage: fedsq-fast") and "fedsq-fast run" in cap.out and not cap.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, key, bound", [
    ("--rounds", "9223372036854775807", "rounds", "100000"),
    ("--local-epochs", "1000000000", "local_epochs", "10000"),
])
def test_run_length_beyond_any_reasonable_time_is_refused(tmp_path, capsys, no_data, monkeypatch, flag, value, key,
                                                          bound):
    monkeypatch.delenv("FEDSQ_FAST_NO_LIMITS", raising=False)
    fails(capsys, tmp_path, ["run", *TINY, flag, value, *_out(tmp_path)], f"{key}: must be <= {bound}, got {value}",
          "FEDSQ_FAST_NO_LIMITS=1")
    # the override lifts exactly these bounds (API: the config validates)
    monkeypatch.setenv("FEDSQ_FAST_NO_LIMITS", "1")
    cfgmod.validate(cfgmod.from_mapping({key: int(value), "dataset": "digits", "model": "tiny_cnn"}))


def test_run_length_from_a_toml_file_names_the_file(tmp_path, capsys, no_data, monkeypatch):
    monkeypatch.delenv("FEDSQ_FAST_NO_LIMITS", raising=False)
    p = _cfg(tmp_path, "c.toml", "rounds = 9223372036854775807\n")
    i = TINY.index("--rounds")
    argv = TINY[:i] + TINY[i + 2:]
    fails(capsys, tmp_path, ["run", "--config", str(p), *argv, *_out(tmp_path)], str(p), "rounds: must be <= 100000")


@pytest.mark.parametrize("text, line", [
    ("rounds: 2\nlr: 0.1\nrounds: 3\n", 3),
    ("client:\n  lr: 0.1\n  lr: 0.2\n", 3),
])
def test_duplicate_yaml_key_is_refused_naming_file_line_and_key(tmp_path, capsys, no_data, text, line):
    p = _cfg(tmp_path, "c.yaml", text)
    fails(capsys, tmp_path, ["run", "--config", str(p), *TINY, *_out(tmp_path)], str(p), f"line {line}",
          "duplicate key", "(first at line")


def test_duplicate_json_key_is_refused(tmp_path):
    p = _cfg(tmp_path, "m.json", '{"a": 1,\n "b": {"c": 2,\n  "c": 3}}')
    with pytest.raises(cfgmod.ConfigError, match=rf"report: {p}: line 3: duplicate key 'c'"):
        cfgmod.read_json(p, "report")


@pytest.mark.parametrize("content, needles", [
    ('{"method": "fedavg", "summary": {"bva": 0.5}}', ["key 'config' missing"]),
    ('{"method": "fedavg", "config": {"partition": "dirichlet"}, "summary": {}, "history": [{"round": 0}]}',
     ["key 'config.alpha' missing"]),
    ('{"method": "fedavg", "config": {"partition": "iid"}, "summary": {"bva": "high"}, "history": [{"round": 0}]}',
     ["key 'summary.bva' must be a number"]),
    ('{"method": "fedavg", "config": {"partition": "iid"}, "summary": {}, "history": [{"val_acc": 0.1}]}',
     ["key 'history[0].round' missing"]),
    ('{"method": ', ["line 1, column 12", "not valid JSON"]),
    ('{"method": "a",\n "method": "b"}', ["line 2", "duplicate key 'method'"]),
    ('[1, 2]', ["top level must be a JSON object"]),
])
def test_report_on_a_hand_written_metrics_json_names_file_and_key(tmp_path, capsys, content, needles):
    (tmp_path / "run" / "fedavg").mkdir(parents=True)
    f = tmp_path / "run" / "fedavg" / "metrics.json"
    f.write_text(content)
    fails(capsys, tmp_path, ["report", str(tmp_path / "run")], str(f), *needles)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_dir_under_proc_names_out_dir(tmp_path, capsys, no_data):
    fails(capsys, tmp_path, ["run", *TINY, "--out-dir", "/proc/fedsq-probe/run"], "out_dir:",
          "cannot create folders in /proc")


def test_checkpoint_path_that_is_a_folder_is_refused_before_any_data(tmp_path, capsys, no_data):
    ck = tmp_path / "out" / "fedavg" / "checkpoint.safetensors"
    ck.mkdir(parents=True)
    fails(capsys, tmp_path, ["run", *TINY, *_out(tmp_path)], f"checkpoint: {ck} is a folder")


def test_unreadable_checkpoint_key_file_is_refused_before_any_data(tmp_path, capsys, no_data, monkeypatch):
    monkeypatch.delenv("FEDSQ_CHECKPOINT_KEY", raising=False)
    monkeypatch.setenv("FEDSQ_CHECKPOINT_KEY_FILE", str(tmp_path / "no-such-key"))
    fails(capsys, tmp_path, ["run", *TINY, *_out(tmp_path)], "FEDSQ_CHECKPOINT_KEY_FILE: cannot read")


def test_the_two_command_lines_do_not_import_each_other():
    """cli <-> experiments.cli was an import circle; both use fedsq_fast.cli_common now."""
    code = ("import sys, fedsq_fast.experiments.cli; assert 'fedsq_fast.cli' not in sys.modules, 'circle'; "
            "import fedsq_fast.cli_common as c; assert 'fedsq_fast.cli' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr


def test_suite_resume_over_a_malformed_metrics_json_names_the_file(tmp_path):
    from fedsq_fast.experiments import _cell_state

    (tmp_path / "metrics.json").write_text('{"config": {"seed": 1},\n "config": {}}')
    with pytest.raises(cfgmod.ConfigError, match=rf"out: {tmp_path / 'metrics.json'}: line 2: duplicate key 'config'"):
        _cell_state(tmp_path, cfgmod.RunConfig())
    (tmp_path / "metrics.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a metrics.json"):
        _cell_state(tmp_path, cfgmod.RunConfig())
