"""Fine-tuning knobs (issue 25): client learning-rate schedules over rounds, gradient
clipping by norm and label smoothing, each against a hand-written loop or formula."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsq_fast.federation import from_mapping, validate
from fedsq_fast.federation.client import LocalConfig, local_train
from fedsq_fast.federation.config import ConfigError, local_config
from tests.conftest import draw_seed


def _expected_lr(lr, sched, w, step, gamma, lr_min, rnd, rounds):
    """The schedule written out from its definition in docs/federation.md."""
    if w and rnd <= w:
        return lr * rnd / w
    k = rnd - w - 1
    if sched == "constant":
        return lr
    if sched == "step":
        return lr * gamma ** math.floor(k / step)
    t = k / max(1, rounds - w - 1)
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * min(t, 1.0))) / 2


def test_round_lr_matches_definition_on_random_configs():
    rng = np.random.default_rng(draw_seed(2**31))
    for _ in range(200):
        rounds = int(rng.integers(2, 60))
        sched = str(rng.choice(["constant", "step", "cosine"]))
        lr = float(rng.uniform(1e-4, 1.0))
        keys = dict(rounds=rounds, lr=lr, lr_schedule=sched, warmup_rounds=int(rng.integers(0, rounds)))
        if sched == "step":
            keys.update(lr_step_rounds=int(rng.integers(1, 10)), lr_gamma=float(rng.uniform(0.05, 1.0)))
        if sched == "cosine":
            keys.update(lr_min=float(rng.uniform(0, lr)))
        cfg = validate(from_mapping(keys))
        for rnd in range(1, rounds + 1):
            want = _expected_lr(lr, sched, cfg.warmup_rounds, cfg.lr_step_rounds, cfg.lr_gamma, cfg.lr_min, rnd,
                                rounds)
            assert local_config(cfg, 0.0, rnd).lr == pytest.approx(want, rel=1e-12), (keys, rnd)
        if sched == "cosine" and rounds - cfg.warmup_rounds >= 2:  # one round after warm-up: lr itself
            assert local_config(cfg, 0.0, rounds).lr == pytest.approx(cfg.lr_min, rel=1e-12, abs=1e-15)
    # the defaults: constant, the configured lr every round (recorded runs unchanged)
    cfg = validate(from_mapping(dict(rounds=5, lr=0.03)))
    assert [local_config(cfg, 0.0, r).lr for r in range(1, 6)] == [0.03] * 5


@pytest.mark.parametrize("bad, key", [
    (dict(lr_schedule="exponential"), "lr_schedule"), (dict(warmup_rounds=-1), "warmup_rounds"),
    (dict(rounds=3, warmup_rounds=3), "warmup_rounds"), (dict(lr_schedule="step", lr_gamma=0), "lr_gamma"),
    (dict(lr_schedule="step", lr_gamma=1.5), "lr_gamma"), (dict(lr_schedule="step", lr_step_rounds=0), "lr_step_rounds"),
    (dict(lr_schedule="cosine", lr=0.1, lr_min=0.2), "lr_min"), (dict(lr_gamma=0.5), "lr_gamma"),
    (dict(lr_min=0.001), "lr_min"), (dict(clip_grad_norm=0), "clip_grad_norm"),
    (dict(clip_grad_norm=float("nan")), "clip_grad_norm"), (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(label_smoothing="0.1"), "label_smoothing"),
])
def test_knob_values_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate(from_mapping(bad))


def _net():
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 4))


def test_local_train_clipping_and_smoothing_against_hand_loop():
    seed = draw_seed(2**31)
    torch.manual_seed(seed)
    x, y = torch.randn(53, 7) * 3, torch.randint(0, 4, (53,))
    m0 = _net()
    for clip, smooth in ((0.05, 0.0), (None, 0.2), (0.3, 0.1), (1e9, 0.0)):
        cfg = LocalConfig(lr=0.2, momentum=0.9, local_epochs=2, batch_size=8, clip_grad_norm=clip,
                          label_smoothing=smooth)
        ours = _net()
        ours.load_state_dict(m0.state_dict())
        info = local_train(ours, x, y, cfg, seed)
        # the hand-written loop: same batches, torch's own clipping and smoothing
        ref = _net()
        ref.load_state_dict(m0.state_dict())
        opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        clipped, total = 0, 0.0
        for _ in range(2):
            perm = torch.randperm(53, generator=gen)
            for i in range(0, 53, 8):
                idx = perm[i:i + 8]
                if idx.numel() < 2:
                    continue
                loss = F.cross_entropy(ref(x[idx]), y[idx], label_smoothing=smooth)
                opt.zero_grad()
                loss.backward()
                if clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
                    clipped += int(norm > clip)
                opt.step()
                total += float(loss) * idx.numel()
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert info["loss"] == pytest.approx(total / (53 * 2), rel=1e-6)
        if clip == 0.05:
            assert clipped > 0  # the bound was active: the comparison above tested it
        if clip == 1e9:  # never active: identical to no clipping, bit for bit
            plain = _net()
            plain.load_state_dict(m0.state_dict())
            local_train(plain, x, y, LocalConfig(lr=0.2, momentum=0.9, local_epochs=2, batch_size=8), seed)
            for a, b in zip(ours.parameters(), plain.parameters()):
                assert torch.equal(a, b)


def test_engine_trains_each_round_at_the_scheduled_lr(small_cfg, tmp_path, bundle):
    from fedsq_fast.federation.runner import run_methods

    cfg = small_cfg(rounds=4, lr=0.08, lr_schedule="step", lr_step_rounds=1, lr_gamma=0.5, warmup_rounds=1,
                    clip_grad_norm=5.0, label_smoothing=0.1)
    seen = {}

    import fedsq_fast.federation.client as client

    orig = client.local_train

    def spy(model, x, y, lcfg, seed, *a, **k):
        seen.setdefault(lcfg.lr, 0)
        seen[lcfg.lr] += 1
        return orig(model, x, y, lcfg, seed, *a, **k)

    import fedsq_fast.federation.trainer as trainer

    trainer.local_train = spy
    try:
        res = run_methods(cfg, tmp_path, quiet=True, bundle=bundle)["fedavg"]
    finally:
        trainer.local_train = orig
    # warm-up round 1 (0.08 * 1/1), then 0.08, 0.04, 0.02: 5 clients each round
    assert seen == {0.08: 10, 0.04: 5, 0.02: 5}
    assert all(math.isfinite(h["train_loss"]) for h in res.history[1:])


def test_precision_bf16_against_hand_autocast_loop_and_fp16_refused_on_cpu():
    import fedsq_fast as fs

    seed = draw_seed(2**31)
    torch.manual_seed(seed)
    x, y = torch.randn(40, 7), torch.randint(0, 4, (40,))
    m0 = _net()
    for dual in (False, True):
        ours = fs.dualcopy(_net_from(m0)) if dual else _net_from(m0)
        ref = fs.dualcopy(_net_from(m0)) if dual else _net_from(m0)
        info = local_train(ours, x, y, LocalConfig(lr=0.1, batch_size=16, precision="bf16"), seed)
        opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        ref.train()
        perm = torch.randperm(40, generator=gen)
        for i in range(0, 40, 16):
            idx = perm[i:i + 16]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(ref(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a, b)
        assert math.isfinite(info["loss"])
        # evaluation in bf16 is not fp32's (the autocast ran) but close
        from fedsq_fast.federation.client import evaluate

        l16, a16 = evaluate(ours, x, y, precision="bf16")
        l32, a32 = evaluate(ours, x, y)
        assert l16 != l32 and abs(l16 - l32) < 0.05 * abs(l32) + 0.05
    from fedsq_fast.federation.config.checks import cpu_has_bf16

    if not cpu_has_bf16():  # emulated bf16: refused with the measured cost
        with pytest.raises(ConfigError, match=r"^precision: 'bf16' on a CPU without native bf16"):
            validate(from_mapping(dict(precision="bf16", device="cpu")))
    else:
        validate(from_mapping(dict(precision="bf16", device="cpu")))
    with pytest.raises(ConfigError, match=r"^precision: 'fp16' needs a CUDA GPU"):
        validate(from_mapping(dict(precision="fp16", device="cpu")))
    with pytest.raises(ConfigError, match=r"^precision: must be one of fp32, bf16, fp16"):
        validate(from_mapping(dict(precision="fp64")))


def _net_from(m0):
    m = _net()
    m.load_state_dict(m0.state_dict())
    return m
