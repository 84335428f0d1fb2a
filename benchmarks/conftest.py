import os
from pathlib import Path

import _bench


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
