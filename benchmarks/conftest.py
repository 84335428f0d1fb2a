import os
from pathlib import Path

# fedsq_fast's OpenMP default (fedsq_fast/__init__.py: a short spin, so runs sharing the cores do
# not wait for each other's spinning threads) takes effect only when set before torch loads
# libgomp; _bench imports torch before any suite imports fedsq_fast, so set it here, by the same
# rule. Without it, on a loaded 2-core VM the Flower aggregate ran 0.36x Flower's speed against
# 1.33x with it, minutes apart (benchmarks/RESULTS.md, "Issue 28, continued").
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "2000"

import _bench  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    text = _bench.report()
    if text is None:
        return
    terminalreporter.write_sep("=", "fedsq_fast benchmark ratios (same run)")
    terminalreporter.write(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = os.environ.get("FEDSQ_BENCH_OUT", "latest.md")
    (out / name).write_text(text)
