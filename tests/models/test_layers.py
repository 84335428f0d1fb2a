"""Gated layers against eager float-mask oracles."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedsq_fast as fs


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_gated_conv_conversion_and_oracle():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    g = fs.GatedConv2d.from_conv(conv)
    x = torch.randn(2, 3, 9, 9)
    y_q, y_s = g(x)
    ref = F.relu(conv(x))
    torch.testing.assert_close(y_q, ref)
    torch.testing.assert_close(y_s, ref)
    # After the quantitative copy moves: y_q = conv_q(x_q) * 1[conv_s(x_s) > 0]
    _perturb(g)
    x_q = torch.randn(2, 3, 9, 9, requires_grad=True)
    x_s = torch.randn(2, 3, 9, 9)
    y_q, y_s = g((x_q, x_s))
    z_s = conv(x_s)
    x_ref = x_q.detach().clone().requires_grad_()
    ref = F.conv2d(x_ref, g.conv.weight, g.conv.bias, padding=1) * (z_s > 0).float()
    torch.testing.assert_close(y_q, ref)
    torch.testing.assert_close(y_s, F.relu(z_s))
    gy = torch.randn_like(ref)
    y_q.backward(gy)
    gw = g.conv.weight.grad.clone()
    g.zero_grad()
    (gw_ref, gx_ref) = torch.autograd.grad(ref, (g.conv.weight, x_ref), gy)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(x_q.grad, gx_ref)


def test_gated_conv_with_bn_folds_structural_bn():
    conv, bn = nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    bn.eval()
    g = fs.GatedConv2d.from_conv(conv, bn=bn).eval()
    x = torch.randn(3, 4, 7, 7)
    y_q, y_s = g(x)
    ref = F.relu(bn(conv(x)))
    torch.testing.assert_close(y_q, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_s, ref, rtol=1e-5, atol=1e-5)


def test_gated_linear_parameter_hygiene_and_frozen_structural():
    lin = nn.Linear(10, 7)
    g = fs.GatedLinear.from_linear(lin)
    names = {n for n, _ in g.named_parameters()}
    assert names == {"linear.weight", "linear.bias"}
    before = {k: v.clone() for k, v in g.structural_state().items()}
    opt = torch.optim.SGD(g.parameters(), lr=0.5)
    for _ in range(3):
        y_q, _ = g(torch.randn(5, 10))
        y_q.square().sum().backward()
        opt.step()
        opt.zero_grad()
    after = g.structural_state()
    assert set(before) == {"weight_s", "shift_s"}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(g.linear.weight, lin.weight)
    x = torch.randn(4, 10)
    y_q, y_s = g(x)
    torch.testing.assert_close(y_s, F.relu(lin(x)))
    torch.testing.assert_close(y_q, g.linear(x) * (lin(x) > 0).float())


def test_relu6_regimes_at_exact_boundaries():
    act = fs.GatedActivation("relu6")
    z = torch.tensor([-1.0, 0.0, 1e-7, 3.0, 6.0 - 1e-6, 6.0, 7.5, -0.0])
    zq = z.clone().requires_grad_()
    y_q, y_s = act((zq, z))
    assert torch.equal(y_q.detach(), F.relu6(z))
    assert torch.equal(y_s, F.relu6(z))
    y_q.sum().backward()
    zr = z.clone().requires_grad_()
    F.relu6(zr).sum().backward()
    assert torch.equal(zq.grad, zr.grad)  # 0 at exactly 0 and exactly 6, like PyTorch
    assert zq.grad.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    # Different z_q: regimes follow z_s (off -> 0, linear -> z_q, clipped -> 6)
    zq2 = torch.full_like(z, 2.5)
    y_q, _ = act((zq2, z))
    assert y_q.tolist() == [0, 0, 2.5, 2.5, 2.5, 6, 6, 0]


@pytest.mark.parametrize("activation,fn", [
    ("hardtanh", lambda t: F.hardtanh(t, -0.5, 0.75)),
    ("leaky_relu", lambda t: F.leaky_relu(t, 0.2)),
    ("relu", F.relu),
])
def test_gated_activation_oracles(activation, fn):
    act = fs.GatedActivation(activation, negative_slope=0.2, min_val=-0.5, max_val=0.75)
    z_s = torch.randn(4, 5, 6, 6)
    z_q = torch.randn(4, 5, 6, 6)
    y_q, y_s = act((z_q, z_s))
    torch.testing.assert_close(y_s, fn(z_s))
    torch.testing.assert_close(act(z_s)[0], fn(z_s))
    if activation == "hardtanh":
        lin = ((z_s > -0.5) & (z_s < 0.75)).float()
        ref = z_q * lin + 0.75 * (z_s >= 0.75).float() - 0.5 * (z_s <= -0.5).float()
    elif activation == "leaky_relu":
        ref = torch.where(z_s > 0, z_q, 0.2 * z_q)
    else:
        ref = z_q * (z_s > 0).float()
    torch.testing.assert_close(y_q, ref)


def test_channels_last_streams_agree():
    conv = nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
    g = fs.GatedConv2d.from_conv(conv)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    _perturb(g)
    y_q, _ = g((x, x))
    ref = F.conv2d(x, g.conv.weight, g.conv.bias, padding=1) * (conv(x) > 0).float()
    torch.testing.assert_close(y_q, ref)


def test_dualmap_and_bad_arguments():
    pool = fs.DualMap(nn.MaxPool2d(2))
    a, b = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    ya, yb = pool((a, b))
    assert torch.equal(ya, F.max_pool2d(a, 2)) and torch.equal(yb, F.max_pool2d(b, 2))
    with pytest.raises(ValueError, match="no parameters"):
        fs.DualMap(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="activation"):
        fs.GatedActivation("tanh")  # gelu is a soft gate now (test_soft_gates.py); tanh is not z * g(z)
    with pytest.raises(TypeError, match="conv"):
        fs.GatedConv2d.from_conv(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="linear"):
        fs.GatedLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="pair"):
        fs.GatedReLU()((a, b, a))
    with pytest.raises(ValueError, match="min_val"):
        fs.GatedActivation("hardtanh", min_val=1.0, max_val=0.0)
