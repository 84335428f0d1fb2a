"""Shared, seeded fixtures.

Every random draw of a test comes from one session seed: fresh each run (so tests see new
inputs), printed in pytest's header and fixed with ``FEDSQ_TEST_SEED=N`` to replay a failure.
"""
import os

import numpy as np
import pytest

SESSION_SEED = int(os.environ.get("FEDSQ_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
_draws = np.random.default_rng(SESSION_SEED)


def pytest_report_header(config):
    return f"fedsq_fast test seed: {SESSION_SEED} (replay with FEDSQ_TEST_SEED={SESSION_SEED})"


def draw_seed(high: int = 1000) -> int:
    """A run seed from the session's stream (reproducible for one test selection)."""
    return int(_draws.integers(high))


# The small federation the engine, checkpoint, device and Flower tests share (digits, tiny_cnn).
SMALL = dict(dataset="digits", model="tiny_cnn", rounds=3, num_clients=5, max_train_samples=None,
             val_size=200, max_test_samples=200, lr=0.05, methods=["fedavg"], probe_size=16,
             min_partition_size=5, threads=1)


def small_config(**overrides):
    """A RunConfig of the shared small federation with a drawn seed; ``overrides`` win."""
    from fedsq_fast.federation import from_mapping

    return from_mapping({**SMALL, "seed": draw_seed(), **overrides})


@pytest.fixture(scope="session")
def small_cfg():
    """:func:`small_config` as a fixture (usable from module-scoped fixtures)."""
    return small_config


@pytest.fixture
def seed() -> int:
    return draw_seed(2**31)


@pytest.fixture(scope="session")
def bundle():
    """The digits dataset (scikit-learn's, in memory), loaded once per session."""
    from fedsq_fast.federation import data

    return data.load_digits()


@pytest.fixture(scope="session")
def digits_bundle(bundle):
    return bundle


def model_state(model) -> dict:
    """A copy of ``model``'s state dict (to compare later)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts with the same keys and bit-identical tensors."""
    import torch

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
