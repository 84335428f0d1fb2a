"""The op tests' ``isa`` fixture (import it into a test module): the test runs once per CPU kernel
variant the CPU has. Not a conftest.py: test modules import the top-level conftest by name."""
import pytest
import torch

import fedsq_fast as ff

COMPILED = ff.backend() == "compiled"


def _isas():
    if not COMPILED:
        return ["reference"]
    out = []
    for isa in ("scalar", "avx2", "avx512"):
        try:
            torch.ops.fedsq_fast.cpu_isa(isa)
            out.append(isa)
        except RuntimeError:
            pass
    torch.ops.fedsq_fast.cpu_isa("auto")
    return out


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """The CPU kernel variant in use for this test ('reference' without the compiled library)."""
    if request.param != "reference":
        torch.ops.fedsq_fast.cpu_isa(request.param)
    yield request.param
    if request.param != "reference":
        torch.ops.fedsq_fast.cpu_isa("auto")
