"""Experiment suites end to end: experiments/smoke.toml (2 rounds) -> runs -> REPORT.md whose
numbers equal the raw per-run metrics; resume; errors that name the key."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedsq_fast import experiments as ex

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.toml"


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "smoke"
    assert ex.main(["run", str(SMOKE), "--out", str(out)]) == 0
    return out


def _table(md: str, heading: str) -> list[list[str]]:
    """Rows of the first Markdown table after ``heading``."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows[2:]  # header and separator


def _raw(out):
    docs = [json.loads(p.read_text()) for p in sorted(out.rglob("metrics.json"))]
    by = {}
    for d in docs:
        c = d["config"]
        part = c["partition"] if c["partition"] == "iid" else f"{c['partition']}:{c['alpha']:g}"
        by.setdefault((part, d["method"]), []).append(d)
    return by


def test_smoke_suite_report_matches_raw_metrics(smoke_out):
    suite = ex.load_suite(SMOKE)
    for f in ("REPORT.md", "summary.json", "summary.csv", "suite.toml", "accuracy.png", "gate_stability.png",
              "rounds_to_best.png"):
        assert (smoke_out / f).is_file(), f
    md = (smoke_out / "REPORT.md").read_text()
    for section in ("## Machine and date", "## Status", "## Claims", "## Results", "## Gate stability"):
        assert section in md, section
    assert "5 of 5 runs complete" in md
    rows = _table(md, "## Results")
    expect = [(p, m) for p in suite.partition_tags for m in suite.methods_for(p)]
    assert [(r[0], r[1]) for r in rows] == expect
    raw = _raw(smoke_out)
    assert set(raw) == set(expect)
    for r in rows:
        docs = raw[(r[0], r[1])]
        assert int(r[2]) == len(docs) == len(suite.seeds)
        bva = np.mean([d["summary"]["bva"] for d in docs])
        rtb = np.mean([d["summary"]["rounds_to_best"] for d in docs])
        assert r[3] == f"{bva:.4f} ± 0.0000"
        assert r[4] == f"{rtb:.2f} ± 0.00"
        test = np.mean([d["summary"]["test_acc"] for d in docs])
        assert r[7] == f"{test:.4f} ± 0.0000"
        assert r[8] == f"{docs[0]['summary']['payload_bytes'] / 1e6:.3f}"
        # rounds to 95% of the same-seed FedAvg BVA, recomputed from the raw history
        base = raw[(r[0], "fedavg")][0]["summary"]["bva"]
        hit = next(h["round"] for h in docs[0]["history"] if h["val_acc"] >= 0.95 * base)
        assert r[5].startswith(f"{hit:.2f} ± 0.00 (1/1)")
        # every round carries the mask-evolution metrics
        for h in docs[0]["history"][1:]:
            assert {"gate_flip_prev", "weight_step_rel", "weight_dist_rel", "gate_change"} <= set(h)
            assert 0.0 <= h["gate_change"] <= 1.0 and h["weight_dist_rel"] > 0
    # summary.json holds the same aggregates as the table
    js = json.loads((smoke_out / "summary.json").read_text())
    for row in js["rows"]:
        docs = raw[(row["partition"], row["method"])]
        assert math.isclose(row["bva"], np.mean([d["summary"]["bva"] for d in docs]), rel_tol=0, abs_tol=1e-12)
    # the ablation really re-took the structural copy in round 2 (unfreeze=1)
    abl = raw[("dirichlet:0.5", "fedsq:unfreeze=1")][0]["history"]
    assert [h["structural_refreshed"] for h in abl] == [False, False, True]
    # one seed: verdicts say so instead of guessing
    assert "not testable yet (fewer than 2 seeds per cell)" in md


def test_resume_skips_finished_runs_and_refuses_silent_overwrite(smoke_out, capsys):
    before = {p: p.read_text() for p in smoke_out.rglob("metrics.json")}
    assert ex.main(["run", str(SMOKE), "--out", str(smoke_out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert ex.main(["run", str(SMOKE), "--out", str(smoke_out), "--resume"]) == 0
    assert "5 already done, 0 to run" in capsys.readouterr().out
    assert {p: p.read_text() for p in smoke_out.rglob("metrics.json")} == before
    (smoke_out / "REPORT.md").unlink()
    assert ex.main(["report", str(smoke_out)]) == 0
    assert (smoke_out / "REPORT.md").is_file()


def test_interrupted_suite_reports_missing_runs(smoke_out, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(smoke_out, part)
    shutil.rmtree(part / "dirichlet_0.5" / "seed0" / "fedsq")
    assert ex.main(["report", str(part)]) == 0
    md = (part / "REPORT.md").read_text()
    assert "4 of 5 runs complete" in md and "dirichlet:0.5/fedsq" in md and "--resume" in md


def test_summary_puts_each_suites_verdicts_side_by_side(smoke_out, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(smoke_out, root / "a_full")
    shutil.copytree(smoke_out, root / "b_partial")
    shutil.rmtree(root / "b_partial" / "iid" / "seed0" / "fedsq")
    (root / "b_partial" / "summary.json").unlink()  # stale or missing: the summary rewrites it
    assert ex.main(["summary", str(root)]) == 0
    md = (root / "SUMMARY.md").read_text()
    suites = _table(md, "## Suites")
    assert [r[0] for r in suites] == ["[smoke](a_full/REPORT.md)", "[smoke](b_partial/REPORT.md)"]
    assert suites[0][2] == "5 of 5" and suites[1][2].startswith("4 of 5 (partial")
    verdicts = _table(md, "## Verdicts")
    for i, d in enumerate(("a_full", "b_partial")):
        claims = json.loads((root / d / "summary.json").read_text())["claims"]
        assert [r[0] for r in verdicts] == [c["claim"] for c in claims]
        assert [r[1 + i] for r in verdicts] == [c["verdict"] for c in claims]
    # the FedSQ - FedAvg BVA cell equals the raw per-run metrics
    raw = _raw(smoke_out)
    bva = _table(md, "### Best validation accuracy")
    row = next(r for r in bva if r[1] == "fedsq − fedavg")
    part = "dirichlet:0.5"
    col = 2 + [ln for ln in md.split("### Best validation accuracy", 1)[1].splitlines()
               if ln.startswith("| suite")][0].strip("|").split("|")[2:].index(f" {part} ")
    diff = raw[(part, "fedsq")][0]["summary"]["bva"] - raw[(part, "fedavg")][0]["summary"]["bva"]
    assert row[col] == f"{100 * diff:+.2f} pp (n=1, no interval): n=1"
    assert "partial" in md.rsplit("##", 1)[1]
    with pytest.raises(SystemExit):
        ex.main(["summary"] + [str(tmp_path / "nope"), "extra"])
    assert ex.main(["summary", str(tmp_path / "nope")]) == 2


def test_summary_leaves_unmeasured_gates_empty_and_orders_partitions(smoke_out, tmp_path):
    """A suite whose baseline has no gate sites (FedAvg on a SiLU CNN: gate metrics None or
    NaN) gets an empty gate cell, not a crash; partition columns run iid -> Dirichlet by
    falling alpha whatever order the suites list them in."""
    from fedsq_fast.experiments.summary import summarize_suites

    root = tmp_path / "results"
    for name, value in (("a_none", None), ("b_nan", float("nan")), ("c_ok", 0.25)):
        shutil.copytree(smoke_out, root / name)
        sj = root / name / "summary.json"
        res = json.loads(sj.read_text())
        res["partitions"] = list(reversed(res["partitions"]))  # dirichlet:0.5 listed before iid
        for g in res["gates"]:
            g["gate_change_rR"] = [value, None if value is None else 0.01, 1]
        sj.write_text(json.dumps(res))
    summarize_suites(root, echo=lambda *a: None, refresh=False)
    md = (root / "SUMMARY.md").read_text()
    head = [ln for ln in md.split("### Gates of the pretrained network flipped", 1)[1].splitlines()
            if ln.startswith("| suite")][0]
    assert head.strip("|").split("|")[1:] == [" iid ", " dirichlet:0.5 "]
    cells = _table(md, "### Gates of the pretrained network flipped")
    assert len(cells) == 3  # one row a suite, in folder order (all three are named "smoke")
    assert [c[1:] for c in cells[:2]] == [["", ""], ["", ""]]  # None and NaN: not measured
    assert all(c.startswith("25.0% ± 1.0 (round ") for c in cells[2][1:])


@pytest.mark.parametrize("edit, key", [
    (("seeds = [0]", "seedz = [0]"), "suite.seedz"),
    (("[run]\n", "[run]\nseed = 3\n"), "run.seed"),
    (("[run]\n", "[run]\nnum_clientz = 3\n"), "num_clientz"),
    (('methods = ["fedavg", "fedsq"]', 'methods = ["fedavg", "fedsq:thaw=2"]'), "suite.methods"),
    (('partitions = ["iid", "dirichlet:0.5"]', 'partitions = ["iid", "dirichlet:x"]'), "suite.partitions"),
    (("lr = 0.01", "lr = -1"), "lr"),
])
def test_suite_errors_name_the_key(tmp_path, edit, key):
    text = SMOKE.read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ex.load_suite(bad)


def test_statistics_helpers():
    assert ex.settle_round([(0, 0.0), (1, 1.0), (2, 0.5), (3, 0.2), (4, 0.1)], 0.25) == 3
    assert ex.settle_round([(1, 1.0), (2, 0.1), (3, 0.5)], 0.25) is None  # must stay settled
    ci = ex.paired_ci([1.0, 2.0, 3.0])
    t95_df2 = 4.302652729749464  # two-sided 95% Student-t quantile, 2 degrees of freedom
    assert ci["mean"] == 2.0 and math.isclose(ci["hi"] - 2.0, t95_df2 * 1.0 / math.sqrt(3), rel_tol=1e-12)
    assert math.isclose(2.0 - ci["lo"], ci["hi"] - 2.0, rel_tol=1e-12)
    # large n: the t quantile, not the normal 1.96 (n = 41, df 40: 2.021)
    big = ex.paired_ci([0.0, 2.0] * 20 + [1.0])
    assert math.isclose((big["hi"] - big["lo"]) / 2, 2.021075390306273 * np.std([0.0, 2.0] * 20 + [1.0], ddof=1)
                        / math.sqrt(41), rel_tol=1e-12)
    assert ex.paired_ci([1.0])["lo"] is None


def test_verify_reruns_a_recorded_run_and_catches_a_changed_number(smoke_out, tmp_path, capsys):
    rec = tmp_path / "rec"
    shutil.copytree(smoke_out, rec)
    cell = "dirichlet_0.5/seed0/fedsq"
    rows_json = tmp_path / "verify.json"
    assert ex.main(["verify", str(rec), "--cell", cell, "--json", str(rows_json)]) == 0
    out = capsys.readouterr().out
    assert f"{cell}: every recorded number identical" in out
    rows = json.loads(rows_json.read_text())
    assert [(r["run"], r["identical"], r["match"]) for r in rows] == [(cell, True, True)]
    # the recorded results are only read; the check itself is recorded and the report lists it
    assert (rec / cell / "metrics.json").read_text() == (smoke_out / cell / "metrics.json").read_text()
    logged = json.loads((rec / "verification.json").read_text())
    assert [(r["run"], r["match"]) for r in logged] == [(cell, True)]
    assert logged[0]["cpu"]["torch_cpu_capability"] and logged[0]["code"] == rows[0]["code"]
    assert ex.main(["report", str(rec)]) == 0
    section = (rec / "REPORT.md").read_text().split("## Reproduction", 1)[1].split("\n## ", 1)[0]
    assert f"| {cell} |" in section and "1 of 1 reruns gave every number the report uses, unchanged" in section
    assert "CPU code paths: CPU has" in (rec / "REPORT.md").read_text()
    # a number the report uses, changed in the record, is found and named with its place
    doc = json.loads((rec / cell / "metrics.json").read_text())
    doc["history"][2]["val_acc"] += 0.01
    (rec / cell / "metrics.json").write_text(json.dumps(doc))
    assert ex.main(["verify", str(rec), "--cell", cell, "--no-record"]) == 1
    assert "DIFFERS in val_acc (1x, first .history[2].val_acc" in capsys.readouterr().out
    assert len(json.loads((rec / "verification.json").read_text())) == 1
    # a diagnostic the report does not use differs: reported, but the report's numbers still match
    doc["history"][2]["val_acc"] -= 0.01
    doc["history"][1]["client_drift"] *= 1.5
    doc["history"][1]["time_round_s"] = 1e9  # timings are never compared
    (rec / cell / "metrics.json").write_text(json.dumps(doc))
    assert ex.main(["verify", str(rec), "--cell", cell, "--no-record"]) == 0
    assert "other recorded numbers differ: client_drift" in capsys.readouterr().out
    # bad input is refused before any work, naming the argument
    assert ex.main(["verify", str(rec), "--cell", "iid/seed7/fedavg"]) == 2
    assert "--cell" in capsys.readouterr().err
    assert ex.main(["verify", str(tmp_path)]) == 2
    assert "suite.toml" in capsys.readouterr().err


def test_shards_fill_one_folder_with_the_unsharded_results(smoke_out, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert ex.main(["run", str(SMOKE), "--out", str(out), "--shard", "2/2"]) == 0
    assert "(shard 2/2: 2 of them), 0 already done, 2 to run" in capsys.readouterr().out
    assert len(list(out.rglob("metrics.json"))) == 2
    assert ex.main(["run", str(SMOKE), "--out", str(out), "--shard", "1/2", "--resume"]) == 0
    assert "(shard 1/2: 3 of them), 0 already done, 3 to run" in capsys.readouterr().out

    def untimed(d):
        return {k: v for k, v in d.items() if not k.startswith(("time_", "elapsed_s"))}

    def numbers(root):
        docs = {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))}
        return {k: (untimed(d["summary"]), [untimed(h) for h in d["history"]]) for k, d in docs.items()}

    assert numbers(out) == numbers(smoke_out)
    assert "5 of 5 runs complete" in (out / "REPORT.md").read_text()
    for bad in ("3/2", "0/2", "1", "a/b"):
        assert ex.main(["run", str(SMOKE), "--out", str(tmp_path / "x"), "--shard", bad]) == 2
        assert "shard" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_longer_suite_retraces_the_shorter_ones_rounds(smoke_out, tmp_path, capsys):
    longer = tmp_path / "smoke3.toml"
    text = SMOKE.read_text()
    assert "rounds = 2\n" in text
    longer.write_text(text.replace("rounds = 2\n", "rounds = 3\n").replace('name = "smoke"', 'name = "smoke3"'))
    out = tmp_path / "smoke3"
    assert ex.main(["run", str(longer), "--out", str(out), "--max-runs", "2"]) == 0
    capsys.readouterr()
    assert ex.main(["verify", str(out), "--against", str(smoke_out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2 and all("rounds 0-2 vs " in ln and "every recorded number identical" in ln for ln in lines)
    # a changed number in the shorter record is found, with the round it is in
    short = tmp_path / "short"
    shutil.copytree(smoke_out, short)
    rel = json.loads((out / "verification.json").read_text())[0]["run"]
    doc = json.loads((short / rel / "metrics.json").read_text())
    doc["history"][1]["gate_flip_prev"] += 1e-9
    (short / rel / "metrics.json").write_text(json.dumps(doc))
    assert ex.main(["verify", str(out), "--against", str(short)]) == 1
    assert f"{rel}: rounds 0-2 vs {short}: DIFFERS in gate_flip_prev (1x, first [1].gate_flip_prev" in capsys.readouterr().out
    # a diagnostic the report does not use (client drift) differing is named, but the numbers match
    diag = tmp_path / "diag"
    shutil.copytree(smoke_out, diag)
    doc = json.loads((diag / rel / "metrics.json").read_text())
    drift = next(h for h in doc["history"] if h.get("client_drift"))
    drift["client_drift"] *= 1 + 2e-8
    (diag / rel / "metrics.json").write_text(json.dumps(doc))
    assert ex.main(["verify", str(out), "--against", str(diag)]) == 0
    assert (f"{rel}: rounds 0-2 vs {diag}: every number the report uses identical; other recorded numbers differ: "
            "client_drift (max rel. 2.0e-08)") in capsys.readouterr().out
    assert ex.main(["report", str(out)]) == 0
    md = (out / "REPORT.md").read_text()
    assert "**2 of 2 runs retrace the shorter run's rounds number for number**" in md  # the first check
    assert "**1 of 2 runs retrace" in md and "DIFFERS in gate_flip_prev" in md  # against the changed copy
    assert ("**1 of 2 runs retrace the shorter run's rounds number for number** (timings excluded); **1 more "
            "retrace every number the report uses**, differing only in diagnostics (client_drift max rel. 2.0e-08)") in md
    assert ex.main(["verify", str(out), "--against", str(tmp_path / "none")]) == 2
    assert "--against" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_committed_suite_file_is_valid(path):
    """A broken suite file would only show when someone runs it (the paper ones: on a GPU, with
    data we do not have); every cell must expand into a valid run configuration."""
    suite = ex.load_suite(path)
    cells = suite.cells()
    per_cell = len(suite.seeds) * (len(suite.partitions) * len(suite.methods)
                                   + len(suite.ablation_partitions) * len(suite.ablation_methods))
    assert len(cells) == per_cell and len(set(cells)) == len(cells)
    for s, p, m in cells:
        cfg = suite.cell_config(p, s, m)
        assert cfg.seed == s and cfg.num_clients >= 2
    assert suite.name == path.stem and suite.title


@pytest.mark.parametrize("name, expected", [("paper_resnet18_cifar10", "cifar-10-batches-py"),
                                            ("paper_alexnet_cinic10", "no images under")])
def test_paper_suite_without_its_data_fails_before_writing(name, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the paper suites' data_root is relative: data/... here does not exist
    out = tmp_path / "out"
    assert ex.main(["run", str(ROOT / "experiments" / f"{name}.toml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data/" in err and expected in err
    assert not out.exists()


def test_interval_verdict_is_the_one_reading_of_an_interval():
    ci = lambda lo, hi: {"n": 3, "mean": (lo + hi) / 2, "lo": lo, "hi": hi}  # noqa: E731
    words = dict(below="holds", above="contradicted", between="not shown")
    assert ex.interval_verdict(ci(-2.0, -0.5), 0.0, **words) == "holds"
    assert ex.interval_verdict(ci(0.5, 2.0), 0.0, **words) == "contradicted"
    assert ex.interval_verdict(ci(-1.0, 1.0), 0.0, **words) == "not shown"
    # every seed the same difference: a zero-width interval at 0 lies neither below nor above it
    assert ex.interval_verdict(ci(0.0, 0.0), 0.0, **words) == "not shown"
    assert ex.interval_verdict({"n": 1, "mean": 1.0, "lo": None, "hi": None}, 0.0, **words).startswith("not testable")
    # non-inferiority (claim 1): an interval starting exactly at the margin holds
    bva = dict(below="fails", above="holds", between="inconclusive", closed_above=True)
    assert ex.interval_verdict(ci(-0.01, 0.02), -0.01, **bva) == "holds"
    assert ex.interval_verdict(ci(-0.05, -0.02), -0.01, **bva) == "fails"
    assert ex.interval_verdict(ci(-0.05, 0.02), -0.01, **bva) == "inconclusive"
    from fedsq_fast.experiments.verdicts import direction

    assert [direction(ci(-2.0, -1.0)), direction(ci(1.0, 2.0)), direction(ci(-1.0, 1.0))] == \
        ["lower", "higher", "no difference detected"]


def test_mask_metrics_callback_adds_the_suite_metrics(small_cfg):
    """The suite's per-round metrics come from an engine callback: the keys after the engine's own,
    in this order, and values recomputed here from the models."""
    from fedsq_fast.federation import Federation, adapter, prepare_data

    cfg = small_cfg(rounds=2)
    fed = Federation(cfg, "fedavg", prepare_data(cfg), quiet=True, callbacks=[ex.MaskMetrics()])
    res = fed.run()
    h = res.history
    extra = ("weight_step_rel", "weight_dist_rel", "gate_flip_prev", "time_probe_s", "gate_flip_error")
    assert not set(extra) & set(h[0])  # round 0 is the pretrained model: nothing to compare
    for r in h[1:]:
        assert [k for k in r if k in extra] == list(extra[:4])
    # round 1 starts from the initial model: the step is the distance, the flips are gate_change
    assert h[1]["weight_step_rel"] == h[1]["weight_dist_rel"] > 0
    assert h[1]["gate_flip_prev"] == h[1]["gate_change"]
    w0, w = adapter.payload_state(fed.initial), adapter.payload_state(res.model)
    keys = [k for k, v in w0.items() if v.is_floating_point() and "running_" not in k]
    dist = math.sqrt(sum(float(((w[k].double() - w0[k].double()) ** 2).sum()) for k in keys))
    norm = math.sqrt(sum(float((w0[k].double() ** 2).sum()) for k in keys))
    assert math.isclose(h[-1]["weight_dist_rel"], dist / norm, rel_tol=1e-12)
    assert 0 <= h[2]["gate_flip_prev"] <= 1 and h[2]["weight_step_rel"] > 0


# ---------------------------------------------------------------- issue 24, item 7: verification that travels
TINY_SUITE = """[suite]
name = "tiny3"
title = "three seeds of a tiny federation (digits, tiny_cnn)"
notes = "test only: its numbers mean nothing"
seeds = [0, 1, 2]
partitions = ["iid"]
methods = ["fedavg", "fedsq"]

[run]
dataset = "digits"
model = "tiny_cnn"
weights = "none"
max_train_samples = 300
val_size = 100
max_test_samples = 100
num_clients = 3
min_partition_size = 5
rounds = 2
batch_size = 16
lr = 0.05
probe_size = 8
threads = 1
"""


@pytest.fixture(scope="module")
def tiny3_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny3")
    (d / "tiny3.toml").write_text(TINY_SUITE)
    assert ex.main(["run", str(d / "tiny3.toml"), "--out", str(d / "out")]) == 0
    return d / "out"


def test_new_runs_record_the_machine_that_decides_their_bits(tiny3_out):
    info = json.loads((tiny3_out / "iid" / "seed0" / "fedavg" / "run_info.json").read_text())
    for k in ("host_cpu", "cpu_vendor", "torch_cpu_capability", "fedsq_fast_cpu_isa", "isa_env", "torch",
              "fedsq_fast_backend", "numpy"):
        assert k in info, k
    assert info["torch_cpu_capability"]


def _other_machine(monkeypatch):
    import fedsq_fast.experiments.verify as V

    real = V.machine_info()
    fake = dict(real, host_cpu="Intel(R) Xeon(R) Platinum 8480+", cpu_vendor="GenuineIntel",
                torch_cpu_capability="AVX512", fedsq_fast_cpu_isa="avx512")
    monkeypatch.setattr(V, "machine_info", lambda: fake)
    return real


def _nudge(path, key, by):
    doc = json.loads(path.read_text())
    doc["summary"][key] += by
    path.write_text(json.dumps(doc))


def test_verify_on_another_cpu_judges_statistically(tiny3_out, tmp_path, capsys, monkeypatch):
    """The recorded run came from 'another machine' (the rerun's machine is faked as an Intel
    AVX-512 one) and its test accuracy is off by 1e-6: not bit-identical, but within the
    seed-to-seed spread with every verdict unchanged -> exit 3, and the machines are named."""
    rec = tmp_path / "rec"
    shutil.copytree(tiny3_out, rec)
    cell = "iid/seed1/fedsq"
    _nudge(rec / cell / "metrics.json", "test_acc", 1e-6)
    real = _other_machine(monkeypatch)
    assert ex.main(["verify", str(rec), "--cell", cell, "--no-record"]) == 3
    out = capsys.readouterr().out
    assert f"recorded on:  {real['host_cpu']} ({real['cpu_vendor']}), torch {real['torch']} at ISA " \
           f"{real['torch_cpu_capability']}" in out
    assert "verifying on: Intel(R) Xeon(R) Platinum 8480+ (GenuineIntel)" in out
    assert "bit-identical numbers: not expected (CPU vendor AuthenticAMD -> GenuineIntel" in out or \
           "bit-identical numbers: not expected (CPU vendor" in out
    assert f"{cell}: not bit-identical in test_acc" in out
    assert "REPRODUCED STATISTICALLY (exit 3)" in out
    # a difference beyond the seed-to-seed spread is a difference, whatever the machine
    _nudge(rec / cell / "metrics.json", "bva", 0.5)
    assert ex.main(["verify", str(rec), "--cell", cell, "--json", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS (exit 1): " in out and f"{cell} bva: " in out and "seed-to-seed sd" in out
    logged = json.loads((rec / "verification.json").read_text())
    assert [(r["run"], r["outcome_code"], r["identity_expected"]) for r in logged] == [(cell, 1, False)]
    assert json.loads((tmp_path / "v.json").read_text())[0]["outcome"] == "DIFFERS"


def test_verify_on_the_same_machine_kind_a_difference_differs(tiny3_out, tmp_path, capsys):
    rec = tmp_path / "rec"
    shutil.copytree(tiny3_out, rec)
    cell = "iid/seed1/fedsq"
    _nudge(rec / cell / "metrics.json", "test_acc", 1e-6)
    assert ex.main(["verify", str(rec), "--cell", cell, "--no-record"]) == 1
    out = capsys.readouterr().out
    assert "bit-identical numbers: expected (same CPU, ISA and torch)" in out
    assert "DIFFERS (exit 1): the same machine kind should give the same bits" in out


@pytest.mark.slow
def test_verify_without_a_seed_spread_could_not_verify(smoke_out, tmp_path, capsys, monkeypatch):
    """One recorded seed per cell (the smoke suite): a difference on another machine cannot be
    judged -> exit 4, saying why."""
    rec = tmp_path / "rec"
    shutil.copytree(smoke_out, rec)
    cell = "iid/seed0/fedavg"
    _nudge(rec / cell / "metrics.json", "test_acc", 1e-6)
    _other_machine(monkeypatch)
    assert ex.main(["verify", str(rec), "--cell", cell, "--no-record"]) == 4
    assert "COULD NOT VERIFY (exit 4): not bit-identical, and iid/seed0/fedavg: its cell (iid, fedavg) has 1 " \
           "recorded seed(s)" in capsys.readouterr().out


def test_verify_judge_and_identity_rules():
    from fedsq_fast.experiments import verify as V

    a = {"host_cpu": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "torch_cpu_capability": "AVX2",
         "fedsq_fast_cpu_isa": "avx2", "isa_env": {}, "torch": "2.14.1", "fedsq_fast_backend": "compiled"}
    assert V.identity_expected(a, dict(a)) == (True, [])
    assert V.identity_expected(a, dict(a, torch="2.15.0")) == (False, ["torch 2.14.1 -> 2.15.0"])
    exp, why = V.identity_expected({"host_cpu": "AMD EPYC", "torch": "2.14.1"}, a)  # an old recording
    assert exp is None and "torch's CPU ISA" in why
    same = [{"match": True}]
    assert V.judge(same, None)[0] == V.EXIT_IDENTICAL
    off = [{"match": False, "identity_expected": False}]
    ok = {"possible": True, "ok": True, "largest_in_sd": 0.1, "verdicts_changed": [], "intervals_changed": [],
          "outside_spread": []}
    assert V.judge(off, ok)[0] == V.EXIT_STATISTICAL
    assert V.judge(off, dict(ok, ok=False, verdicts_changed=["claim: HOLDS -> NOT SHOWN"])) == (
        V.EXIT_DIFFERS, "claim: HOLDS -> NOT SHOWN")
    assert V.judge(off, dict(ok, possible=False, ok=False, why="no spread"))[0] == V.EXIT_UNVERIFIED
    assert V.judge([{"match": False, "identity_expected": True}], ok)[0] == V.EXIT_DIFFERS


# ---------------------------------------------------------------- federated evaluation (robustness verdict)
def _fe_doc(part, alpha, method, seed, client, rounds=3):
    """A metrics.json document with only what the analysis reads; ``client``: its summary's
    federated-evaluation numbers (None: a run without federated evaluation)."""
    hist = [{"round": r, "val_acc": 0.5 + 0.01 * r, "bytes_up": 100 * (r > 0), "gate_change": 0.0}
            for r in range(rounds + 1)]
    summ = {"bva": 0.5 + 0.01 * rounds, "rounds_to_best": rounds, "test_acc": 0.5, "final_val_acc": 0.53,
            "initial_val_acc": 0.5, "bytes_up": 300, "payload_bytes": 100, "time_total_s": 1.0, "rounds": rounds,
            **(client or {})}
    return {"method": method, "config": {"partition": part, "alpha": alpha, "seed": seed, "rounds": rounds,
                                         "probe_size": 8}, "summary": summ, "history": hist}


def test_robustness_verdict_follows_the_paired_intervals_of_worst_and_p10(tmp_path):
    from scipy import stats as st

    from fedsq_fast.experiments.analysis import analyse
    from fedsq_fast.experiments.report import client_eval_section

    rng = np.random.default_rng(7)
    docs, want = [], {}
    # dirichlet:0.5: FedSQ clearly better; dirichlet:0.1: clearly worse; iid: not judged (not Dirichlet)
    for part, alpha, shift in (("dirichlet", 0.5, 0.05), ("dirichlet", 0.1, -0.08), ("iid", 0.5, -0.2)):
        for s in range(4):
            base = {k: float(rng.uniform(0.2, 0.6)) for k in
                    ("client_acc_weighted", "client_acc_mean", "client_acc_worst", "client_acc_p10", "client_acc_std")}
            other = {k: v + shift + float(rng.normal(0, 0.005)) for k, v in base.items()}
            docs += [_fe_doc(part, alpha, "fedavg", s, base), _fe_doc(part, alpha, "fedsq", s, other)]
            for k in ("client_acc_worst", "client_acc_p10"):
                want.setdefault((part, alpha, k), []).append(other[k] - base[k])
    res = analyse(docs, None)
    claim = next(c for c in res["claims"] if c["claim"].startswith("FedSQ is robust"))
    assert len(claim["details"]) == 4  # two Dirichlet partitions x (worst, p10); iid is no Dirichlet split
    for (part, alpha, k), d in want.items():
        if part == "iid":
            continue
        n, mu, sd = len(d), float(np.mean(d)), float(np.std(d, ddof=1))
        h = st.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        verdict = "holds" if mu - h >= -0.01 else "fails" if mu + h < -0.01 else "inconclusive"
        c = next(c for c in res["comparisons"] if c["partition"] == f"{part}:{alpha:g}" and c["a"] == "fedsq")
        assert c[k]["lo"] == pytest.approx(mu - h) and c[k]["hi"] == pytest.approx(mu + h)
        label = "worst-client" if k == "client_acc_worst" else "10th-percentile"
        line = next(x for x in claim["details"] if x.startswith(f"{part}:{alpha:g},") and label in x)
        assert line.split(" -> ")[1].startswith(verdict), line
    assert claim["verdict"].startswith("DOES NOT HOLD in 2/4")
    md = "\n".join(client_eval_section(res))
    assert "## Federated evaluation" in md and "dirichlet:0.1 | fedsq vs fedavg | 4 |" in md
    # runs without federated evaluation: no claim, no section, no extra keys (recorded reports unchanged)
    old = analyse([_fe_doc("dirichlet", 0.5, m, s, None) for m in ("fedavg", "fedsq") for s in range(2)], None)
    assert not any(c["claim"].startswith("FedSQ is robust") for c in old["claims"])
    assert "client_eval" not in old and client_eval_section(old) == []
    assert not any(k.startswith("client_") for c in old["comparisons"] for k in c)


def test_client_accuracy_plot_draws_the_runs_that_have_it(tmp_path):
    from fedsq_fast.plots import client_quantiles, plot_client_accuracy

    rng = np.random.default_rng(3)
    hist = []
    for r in range(4):
        accs = [float(x) for x in rng.uniform(0, 1, 10)] + [None]
        a = np.array([x for x in accs if x is not None])
        hist.append({"round": r, "client_acc": accs, "client_acc_weighted": float(a.mean())} if r != 1 else
                    {"round": r})
    x, q = client_quantiles(hist)
    assert x == [0, 2, 3]
    for row, h in zip(q, [hist[0], hist[2], hist[3]]):
        a = sorted(v for v in h["client_acc"] if v is not None)
        assert list(row) == [a[0], a[0], float(np.median(a)), a[-1], h["client_acc_weighted"]]  # 10 clients: p10 = worst
    assert plot_client_accuracy({("iid", "fedavg"): [hist]}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert not plot_client_accuracy({("iid", "fedavg"): [[{"round": 0}]]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_premise_without_measured_gate_flips_is_not_measurable(tiny3_out, tmp_path):
    """A plain network with no gate sites (a SiLU CNN under FedAvg) records NaN gate flips:
    its 'never settled' is no measurement, so the premise is 'not measurable', not a verdict."""
    out = tmp_path / "out"
    shutil.copytree(tiny3_out, out)
    assert ex.main(["report", str(out)]) == 0
    before = (out / "REPORT.md").read_text()
    assert "not measurable" not in before and "n/a (not measured)" not in before
    for p in out.rglob("fedavg/metrics.json"):
        doc = json.loads(p.read_text())
        for rec in doc["history"]:
            rec["gate_flip_prev"] = float("nan")
        p.write_text(json.dumps(doc))
    assert ex.main(["report", str(out)]) == 0
    md = (out / "REPORT.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("- **Premise"))
    assert line.endswith("not measurable (no gate flips recorded).")
    assert "iid, fedavg: gate flips not measured in 3/3 runs" in md
    row = next(r for r in _table(md, "## Gate stability") if r[1] == "fedavg")
    assert "n/a (not measured)" in row
    # the other claims are untouched by the metric
    assert [ln for ln in md.splitlines() if ln.startswith("- **FedSQ keeps")] == \
        [ln for ln in before.splitlines() if ln.startswith("- **FedSQ keeps")]
