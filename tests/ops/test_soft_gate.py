"""The fused soft gate ``soft_gate_apply(z_q, z_s, kind) = z_q * g(z_s)`` (issue 27) on every CPU
kernel variant this machine runs (the ``isa`` fixture), against independent oracles:

- the gate functions written out by hand in float64 (the stated accuracy bound of the float32
  gates, ``GATE_TOL``: the vectorised approximations are not torch's functions, so not its bits),
  and torch's own float32 functions (within the same bound plus their own error);
- the multiply given the kernel's gate: ``y == (z_q * g)`` rounded as eager rounds it, bit for bit
  (NaN/Inf propagation, the sign of zero), over dtypes, odd sizes, edge values and layouts;
- the backward: ``grad_z_q == grad_y * g`` bit for bit, only ``z_s`` saved, gradcheck in float64.

The CUDA kernels are checked against these in tests/ops/test_ops_cuda.py (benchmarks/gpu_check.sh).
"""
import math

import pytest
import torch

import fedsq_fast as ff
from fedsq_fast import ops, reference as ref
from fedsq_fast.ops._registry import OPS
from tests.ops._isa import isa  # noqa: F401 (a fixture)

COMPILED = ff.backend() == "compiled"
KINDS = ("sigmoid", "phi", "phi_tanh", "hardsigmoid", "tanh_softplus")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 7, 31, 33, 1023, 65537]
# Accuracy of the float32 gates against float64, |g - g64| <= ABS + REL * g64 (docs/models.md,
# "Soft gates"; measured maxima 2026-12-07 in brackets). The vectorised exp (Cephes' expf) is
# within a few ulp, so sigmoid and Mish's gate hold a relative bound down to the underflow
# [2.3, 4.5 ulp]; the tanh form of GELU is sigmoid(2u) with u rounded, so absolute [9.8e-8];
# Phi uses N. Juffa's float erf (about 1 ulp), absolute [6.3e-8]; hardsigmoid is torch's own
# operations [its bits]. torch's own float32 functions are 6-9e-8 from float64.
ULP = 2.0 ** -24
GATE_TOL = {  # kind -> (ABS, REL)
    "sigmoid": (1e-38, 4 * ULP),
    "phi": (8e-8, 2 * ULP),
    "phi_tanh": (1.2e-7, 2 * ULP),
    "hardsigmoid": (ULP, 2 * ULP),
    "tanh_softplus": (1e-38, 6 * ULP),
}
EDGES = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 3e38, -3e38, 5.0, -5.0, 88.9,
         -88.9, 104.5, -104.5, 20.0, -3.0, 3.0]


def oracle_g64(z, kind):
    """g in float64, written out by hand (not the library's code)."""
    z = z.double()
    if kind == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-z))
    if kind == "phi":
        return 0.5 * torch.erfc(-z / math.sqrt(2.0))
    if kind == "phi_tanh":  # 0.5 (1 + tanh u) = 1 / (1 + exp(-2u)): no cancellation for small gates
        return 1.0 / (1.0 + torch.exp(-2.0 * math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if kind == "hardsigmoid":
        return torch.clamp(z / 6.0 + 0.5, 0.0, 1.0)
    return torch.tanh(torch.log1p(torch.exp(z)))


def torch_g32(z, kind):
    """torch's own float32 function of each gate."""
    z = z.float()
    return {"sigmoid": torch.sigmoid, "phi": lambda t: 0.5 * (1.0 + torch.erf(t * 0.7071067811865476)),
            "phi_tanh": lambda t: 0.5 * (1.0 + torch.tanh(0.7978845608028654 * (t + 0.044715 * t * t * t))),
            "hardsigmoid": torch.nn.functional.hardsigmoid,
            "tanh_softplus": lambda t: torch.tanh(torch.nn.functional.softplus(t))}[kind](z)


def rand(n, dtype, seed, edges=True, scale=4.0, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if edges and n:
        idx = torch.randint(0, n, (min(n, 3 * len(EDGES)),), generator=g)
        x[idx] = torch.tensor(EDGES, dtype=torch.float64)[torch.arange(len(idx)) % len(EDGES)]
    x = x.to(dtype)
    return x.reshape(shape) if shape is not None else x


def gate_of(z_s, kind):
    """The op's own gate: 1 * g(z_s) is g exactly (g >= 0, no rounding in the multiply)."""
    return ff.soft_gate_apply(torch.ones_like(z_s), z_s, kind)


def eager_given(z_q, g):
    """z_q * g as eager computes it for a stored gate g of z_q's dtype."""
    return z_q * g


def same(a, b):
    """Bit-identical values: NaN where NaN, equal elsewhere, the same sign of zero."""
    assert a.shape == b.shape and a.dtype == b.dtype
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn)
    assert torch.equal(a[~an], b[~bn])
    assert torch.equal(torch.signbit(a[~an]), torch.signbit(b[~bn]))


# ---------------------------------------------------------------------------
# the gates' accuracy
@pytest.mark.parametrize("kind", KINDS)
def test_float32_gate_within_stated_bound_of_float64(isa, kind):
    z = torch.cat([torch.linspace(-110, 110, 200001), torch.randn(100000) * 3,
                   torch.tensor(EDGES), torch.logspace(-30, 2, 2001), -torch.logspace(-30, 2, 2001)]).float()
    g = gate_of(z, kind)
    want = oracle_g64(z, kind)
    fin = ~torch.isnan(want)
    assert torch.equal(torch.isnan(g), ~fin)  # NaN exactly where z is NaN
    a, r = GATE_TOL[kind]
    err = (g.double() - want).abs()[fin]
    bound = a + r * want.abs()[fin]
    if isa == "reference":  # torch's own functions: their error (1 + erf loses Phi's small values)
        bound = bound + 2e-7
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (kind, float(z[fin][worst]), float(g[fin][worst]), float(want[fin][worst]))
    assert ((g >= 0) & (g <= 1))[fin].all()  # a gate in [0, 1]
    # the limits exactly: g(+inf) = 1, g(-inf) = 0, and torch's own float32 functions agree to the bound
    assert gate_of(torch.tensor([float("inf"), -float("inf")]), kind).tolist() == [1.0, 0.0]
    t = torch_g32(z, kind).double()
    assert bool(((g.double() - t).abs()[fin] <= bound + 2e-7).all())


@pytest.mark.parametrize("kind", KINDS)
def test_float64_gate_is_libm_accurate(isa, kind):
    z = rand(20001, torch.float64, 5, edges=True)
    g, want = gate_of(z, kind), oracle_g64(z, kind)
    assert torch.equal(torch.isnan(g), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert bool(((g - want).abs()[fin] <= 1e-15 + 4e-16 * want.abs()[fin]).all())


# ---------------------------------------------------------------------------
# the fused apply
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_apply_is_z_q_times_its_gate_bit_for_bit(isa, kind, dtype, n):
    z_q, z_s = rand(n, dtype, 2 * n + 1), rand(n, dtype, 2 * n + 2)
    y = ff.soft_gate_apply(z_q, z_s, kind)
    g = gate_of(z_s, kind)
    assert y.dtype == dtype and y.shape == z_q.shape and g.dtype == dtype
    same(y, eager_given(z_q, g))  # multiply semantics: NaN/Inf propagate, -x * g = -0.0 for g == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_apply_against_float64_oracle(isa, kind, dtype):
    """|y - z_q g64(z_s)| <= |z_q| (gate bound + 3 units of the dtype's rounding): finite z_q
    (so Inf * 0 does not depend on an underflow), every edge value in z_s."""
    n = 4099
    z_q = rand(n, dtype, 11, edges=False)
    z_q[:4] = torch.tensor([0.0, -0.0, 1e-30, float(torch.finfo(dtype).max) / 2], dtype=torch.float64).to(dtype)
    z_s = rand(n, dtype, 12)
    y = ff.soft_gate_apply(z_q, z_s, kind)
    want = z_q.double() * oracle_g64(z_s, kind)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    fin = ~torch.isnan(want)
    u = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float64: 2.0 ** -53}[dtype]
    a, r = GATE_TOL[kind] if dtype != torch.float64 else (1e-15, 4e-16)
    if isa == "reference":
        a += 2e-7
    tiny = float(torch.finfo(dtype).smallest_normal) * u * 4
    bound = z_q.double().abs() * (a + r + 3 * u) + tiny
    assert torch.isfinite(z_q).all()
    err = (y.double() - want).abs()
    assert bool((err[fin] <= bound[fin]).all())


@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend_agrees_with_kernel(isa, kind):
    """The fallback (torch's functions, reference.py) and the kernels compute the same thing."""
    z_q, z_s = rand(3001, torch.float32, 21, edges=False), rand(3001, torch.float32, 22, edges=False)
    y = ff.soft_gate_apply(z_q, z_s, kind)
    y_ref = ref.soft_gate_apply(z_q, z_s, kind)
    a, r = GATE_TOL[kind]
    torch.testing.assert_close(y, y_ref, rtol=r + 4e-7, atol=a + 4e-7)


def test_empty_and_special_shapes(isa):
    for shape in [(0,), (2, 0, 3), (), (1,), (1, 1, 1, 1)]:
        z_q, z_s = torch.randn(shape), torch.randn(shape)
        for kind in KINDS:
            y = ff.soft_gate_apply(z_q, z_s, kind)
            assert y.shape == z_q.shape
            same(y, eager_given(z_q, gate_of(z_s, kind)))


def test_large_streaming_path(isa):
    """Above 16 MB of output the CPU kernels stream their stores: same bits."""
    n = (4 << 20) + 33
    z_q, z_s = rand(n, torch.float32, 31, edges=True), rand(n, torch.float32, 32, edges=True)
    same(ff.soft_gate_apply(z_q, z_s, "phi"), eager_given(z_q, gate_of(z_s, "phi")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layouts(isa, dtype):
    shape = (3, 5, 7, 9)
    z_q, z_s = rand(945, dtype, 3, shape=shape), rand(945, dtype, 4, shape=shape)
    cl = torch.channels_last
    pairs = [
        (z_q.contiguous(memory_format=cl), z_s.contiguous(memory_format=cl)),
        (z_q.contiguous(memory_format=cl), z_s),  # z_s brought to z_q's layout
        (z_q, z_s.contiguous(memory_format=cl)),
        (z_q.permute(2, 0, 3, 1), z_s.permute(2, 0, 3, 1)),  # dense, permuted
        (z_q[:, ::2], z_s[:, ::2]),  # not dense: made contiguous
        (z_q.transpose(0, 3)[1:], z_s.transpose(0, 3)[1:]),  # a strided view
    ]
    for kind in ("sigmoid", "phi", "tanh_softplus"):
        for zq, zs in pairs:
            y = ff.soft_gate_apply(zq, zs, kind)
            want = eager_given(zq, gate_of(zs.contiguous(), kind))
            same(y, want)
            target = zq if ref.is_dense(zq) else zq.contiguous()
            assert y.stride() == target.stride()


# ---------------------------------------------------------------------------
# backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_is_grad_times_gate_and_saves_z_s_only(isa, kind, dtype):
    shape = (2, 3, 17, 5)
    z_q = rand(510, dtype, 41, shape=shape).requires_grad_()
    z_s = rand(510, dtype, 42, shape=shape).requires_grad_()  # frozen: gets no gradient
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ff.soft_gate_apply(z_q, z_s, kind)
    assert len(saved) == 1 and saved[0].data_ptr() == z_s.data_ptr()  # z_s itself: no gate tensor, no copy
    w = rand(510, dtype, 43, edges=False, shape=shape)
    (gq,) = torch.autograd.grad(y, z_q, w)
    with torch.no_grad():
        same(gq, eager_given(w, gate_of(z_s.detach(), kind)))
    assert not y.grad_fn.next_functions[1][0]  # nothing reaches z_s
    # channels_last z_q, contiguous gradient: the gradient comes back in z_q's layout
    zq_cl = z_q.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    (g2,) = torch.autograd.grad(ff.soft_gate_apply(zq_cl, z_s, kind), zq_cl, w)
    if isa == "reference":  # torch's functions round an element by where it falls (vector body or tail)
        rtol = {torch.float32: 4e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-15}[dtype]
        torch.testing.assert_close(g2.contiguous(), gq.contiguous(), rtol=rtol, atol=1e-30, equal_nan=True)
    else:  # the kernels' gates do not depend on the position (the tail runs the same operations)
        same(g2.contiguous(), gq.contiguous())


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(isa, kind):
    z_q = torch.randn(3, 29, dtype=torch.float64, requires_grad=True)
    z_s = torch.randn(3, 29, dtype=torch.float64) * 3
    assert torch.autograd.gradcheck(lambda q: ff.soft_gate_apply(q, z_s, kind), (z_q,))


# ---------------------------------------------------------------------------
# out= and errors
def test_out_variant(isa):
    z_q, z_s = rand(5000, torch.float32, 1), rand(5000, torch.float32, 2)
    y = torch.full_like(z_q, 7.0)
    assert ff.soft_gate_apply(z_q, z_s, "phi", out=y) is y
    same(y, ff.soft_gate_apply(z_q, z_s, "phi"))
    q = z_q.clone()  # an output may be exactly its input
    ff.soft_gate_apply(q, z_s, "phi", out=q)
    same(q, y)
    with pytest.raises(ValueError, match="out overlaps z_q"):
        ff.soft_gate_apply(z_q[:-1], z_s[:-1], "phi", out=z_q[1:])
    with pytest.raises(ValueError, match="memory layout"):
        ff.soft_gate_apply(z_q.view(50, 100), z_s.view(50, 100), "phi", out=torch.empty(100, 50).t())
    with pytest.raises(ValueError, match="not differentiable"):
        ff.soft_gate_apply(z_q.clone().requires_grad_(), z_s, "phi", out=y)


def test_errors_name_the_argument():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="kind must be one of"):
        ff.soft_gate_apply(z, z, "silu")  # the activation's name is not a gate function's
    with pytest.raises(TypeError, match="z_q must be float32"):
        ff.soft_gate_apply(z.int(), z, "sigmoid")
    with pytest.raises(TypeError, match="z_s must be a torch.Tensor"):
        ff.soft_gate_apply(z, 1.0, "sigmoid")
    with pytest.raises(ValueError, match="z_s must have the shape of z_q"):
        ff.soft_gate_apply(z, z[:, :4], "sigmoid")
    with pytest.raises(TypeError, match="z_s must have the dtype of z_q"):
        ff.soft_gate_apply(z, z.double(), "sigmoid")


@pytest.mark.skipif(not COMPILED, reason="compiled library not loaded (no torch.ops.fedsq_fast)")
def test_raw_op_refuses_unknown_kind_and_mismatches():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="kind must be one of 'sigmoid'"):
        torch.ops.fedsq_fast.soft_gate_apply(z, z, "relu")
    with pytest.raises(ValueError, match="z_s must have the shape of z_q"):
        torch.ops.fedsq_fast.soft_gate_apply(z, z.t(), "sigmoid")
    with pytest.raises(ValueError, match="y must have the strides of z_q"):
        torch.ops.fedsq_fast.soft_gate_apply_out(z, z, "sigmoid", torch.empty(5, 4).t())


@pytest.mark.skipif(not COMPILED, reason="compiled library not loaded (no torch.ops.fedsq_fast)")
def test_opcheck():
    zq_g = torch.randn(3, 41, requires_grad=True)
    zs = torch.randn(3, 41)
    z4 = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fedsq_fast.soft_gate_apply.default, (zq_g, zs, "sigmoid"))
    torch.library.opcheck(torch.ops.fedsq_fast.soft_gate_apply.default, (z4.requires_grad_(), z4.detach() * 2, "phi"))
    torch.library.opcheck(torch.ops.fedsq_fast.soft_gate_apply_out.default,
                          (zs, zs * 2, "tanh_softplus", torch.empty_like(zs)))


def test_torch_compile_fullgraph():
    def f(z_q, z_s, w):
        return (ff.soft_gate_apply(z_q * w, z_s, "phi") * w).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    z_q, z_s = torch.randn(5, 67), torch.randn(5, 67)
    w1 = torch.tensor(1.5, requires_grad=True)
    w2 = torch.tensor(1.5, requires_grad=True)
    a, b = f(z_q, z_s, w1), compiled(z_q, z_s, w2)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_ops_lists_the_kinds():
    assert ops.SOFT_GATE_KINDS == ref.SOFT_GATE_KINDS == KINDS
    assert OPS.soft_gate_apply is not None
