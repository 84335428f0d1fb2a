"""Every example in README.md and docs/*.md runs as written (issue 14).

Extracted from the Markdown, not copied here, so the text users copy is what is tested:
- every ```python block runs (in a fresh namespace, in a temporary folder);
- every `fedsq-fast ...` / `python -m fedsq_fast ...` command of a ```bash block runs, one
  document's commands in order in one temporary folder (``report runs/default`` reads what
  ``run`` wrote), with size options appended to ``run``/``compare`` (the documented
  ``--rounds 1 --max-train-samples ...``; later flags win); ``--device cuda`` without a GPU
  must be refused with exit code 2;
- a block after ``<!-- file: NAME -->`` is written to NAME first (e.g. my.toml).
Not run here, and why: the install and test commands (CI runs them: `.ci/run` executes the
README's test command), `pytest benchmarks/ --benchmark-only` (its collection is tested in
test_user_paths.py), and docs/flower.md's multi-machine deployment commands (tests/flower/test_flower.py
runs the Flower apps on loopback). Any other command line fails this test until it is
classified, so a new example cannot go untested by accident."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN_DOCS = {"flower.md": "multi-machine Flower deployment: tests/flower/test_flower.py runs the apps on loopback"}
# Setup and test commands, run by CI itself (.ci/run) rather than here.
SKIP_PREFIXES = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest tests/",
                 "pytest benchmarks/")
SIZE = ["--rounds", "1", "--max-train-samples", "200", "--val-size", "60", "--max-test-samples", "60"]
FENCE = re.compile(r"^```(\w*)\s*$")
FILE_MARK = re.compile(r"<!--\s*file:\s*(\S+)\s*-->")


def _blocks(path: Path):
    """(lang, first line number, text, file name or None) for each fenced block."""
    lines = path.read_text().splitlines()
    out, i, pending = [], 0, None
    while i < len(lines):
        m = FILE_MARK.search(lines[i])
        if m:
            pending = m.group(1)
        f = FENCE.match(lines[i])
        if f:
            lang, start, body = f.group(1), i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            out.append((lang, start, "\n".join(body) + "\n", pending))
            pending = None
        i += 1
    return out


def _commands(text: str):
    """Logical command lines of a bash block (backslash continuations joined, comments cut),
    split at '&&'."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            part = part.strip()
            if part:
                yield shlex.split(part, comments=True)


def _examples():
    items = []
    for doc in DOCS:
        if doc.name in NOT_RUN_DOCS:
            continue
        rel = doc.relative_to(ROOT)
        for lang, line, text, fname in _blocks(doc):
            if fname:
                continue  # written into the document's folder first (workdirs)
            if lang == "python":
                items.append(pytest.param(("python", doc, None, text), id=f"{rel}:{line}:python"))
            elif lang == "bash":
                for argv in _commands(text):
                    cmd = " ".join(argv)
                    if cmd.startswith(SKIP_PREFIXES) or argv[0] == "export":
                        continue
                    items.append(pytest.param(("cmd", doc, None, argv), id=f"{rel}:{line}:{cmd[:60]}"))
    return items


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One folder per document, holding the document's files (``<!-- file: NAME -->``
    blocks) and a copy of experiments/ (suite commands read and rewrite its reports; the
    repository's own copy is never touched)."""
    dirs = {}

    def get(doc):
        if doc not in dirs:
            d = tmp_path_factory.mktemp(doc.stem)
            shutil.copytree(ROOT / "experiments", d / "experiments")
            for _, _, text, fname in _blocks(doc):
                if fname:
                    (d / fname).write_text(text)
            dirs[doc] = d
        return dirs[doc]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("example", _examples())
def test_example_runs_as_written(example, workdirs, monkeypatch):
    kind, doc, _, payload = example
    cwd = workdirs(doc)
    if kind == "python":
        monkeypatch.chdir(cwd)
        ns = {"__name__": "__doc_example__"}
        exec(compile(payload, f"{doc.name} example", "exec"), ns)
        _check_python_example(doc, payload, ns)
        return
    argv = list(payload)
    if argv[0] == "fedsq-fast":
        argv = [sys.executable, "-m", "fedsq_fast", *argv[1:]]
    elif argv[:3] == ["python", "-m", "fedsq_fast"]:
        argv = [sys.executable, *argv[1:]]
    else:
        pytest.fail(f"{doc.name}: unclassified example command {' '.join(argv)!r}: run it here, or "
                    "say in this file why it is covered elsewhere")
    sub = argv[3] if len(argv) > 3 else None  # bare fedsq-fast prints the help
    if sub in ("run", "compare"):
        argv += SIZE + (["--seeds", "0", "--partitions", "iid"] if sub == "compare" else [])
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if "--device" in argv and "cuda" in argv[argv.index("--device") + 1] and not torch.cuda.is_available():
        assert out.returncode == 2 and "sees no CUDA GPU" in out.stderr, out.stderr[-2000:]
        return
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr


def _check_python_example(doc, text, ns):
    """What the examples' comments claim."""
    if "assert_close(dual(x), model(x))" in text:  # README models: real weights, eval mode
        assert ns["model"].weights == "offline" and not ns["dual"].training
    if "fs.federate(make_model, (x, y)" in text:  # README: your own model and data learns
        res = ns["res"]
        assert res["fedsq"].summary["model"]["kind"] == "dualcopy"
        assert min(r.summary["bva"] for r in res.values()) > 0.5
    if 'Federation(cfg, "fedsq+fedprox", data' in text:  # docs/federation.md Python API learns
        assert ns["res"].summary["bva"] > 0.6
    if "load_breast_cancer" in text:  # docs/federation.md: a table (logistic regression: 0.958)
        assert min(r.summary["test_acc"] for r in ns["res"].values()) > 0.9
    if "BagOfTokens" in text:  # docs/federation.md: token ids through an embedding (majority class 0.6)
        assert min(r.summary["test_acc"] for r in ns["res"].values()) > 0.85
