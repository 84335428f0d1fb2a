"""FedSQ on Flower's simulation engine (Ray backend): the package's Flower app in one process.

:func:`simulate` runs the app of :mod:`fedsq_fast.flower.app` under
``flwr.simulation.run_simulation``: the ServerApp's work (the engine's driver and round loop
with a :class:`~fedsq_fast.flower.transport.GridTransport`, config parsed from a Flower run
config exactly as ``flwr run --run-config`` hands it over) in a thread of this process, and
the package's ``client_app`` in Ray actors, one virtual SuperNode per client (Flower sets
each node's ``partition-id``/``num-partitions``). Same seeds, partitions and local training
as the embedded engine, so the same global model, bit for bit with equal thread counts
(``tests/flower/test_simulation.py``).

Needs Flower's simulation extra: ``pip install "flwr[simulation]==1.41.0"`` (Ray).
"""
from __future__ import annotations

import importlib.util

from ..federation import adapter
from ..federation.config import RunConfig, validate
from .app import client_app, config_from_run_config, run_federation
from .transport import reject_ablation

RAY_MISSING = "Flower's simulation engine needs Ray: pip install \"flwr[simulation]==1.41.0\""


def to_run_config(cfg: RunConfig, **app_keys) -> dict:
    """``cfg`` as a Flower run config (``flwr run --run-config``): every key with dashes, None
    as ``"none"``, methods comma-joined; ``app_keys``: the app's own keys (``round-timeout``,
    ``aggregation-order``, ...; see ``app.FLOWER_KEYS``)."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig (fedsq_fast.federation.from_mapping), got {type(cfg).__name__}")
    rc = {k.replace("_", "-"): ("none" if v is None else v) for k, v in cfg.to_dict().items()}
    rc["methods"] = ",".join(cfg.methods)
    rc.update(app_keys)
    return rc


def simulate(cfg: RunConfig, *, backend_config: dict | None = None, poll_s: float = 0.1,
             verbose: bool = False, **app_keys) -> dict:
    """Every method of ``cfg`` on Flower's simulation engine (Ray backend, ``cfg.num_clients``
    virtual SuperNodes); returns ``{method: RunResult}`` like ``fedsq-fast run``'s driver and
    writes the same files under ``cfg.out_dir``.

    ``backend_config``: Flower's (default: 1 CPU, no GPU per client, so one Ray actor per
    core); ``poll_s``: seconds between pulls of replies (Flower's own grid polls every 0.1 s);
    ``app_keys``: the app's run-config keys (``round-timeout``, ``aggregation-order``).
    ``cfg.workers`` must be 1 (Ray's actors train the clients)."""
    to_run = to_run_config(cfg, **app_keys)
    # the config's mistakes before Ray starts (its start costs 15-25 s), as the ServerApp words them
    validate(cfg, adapter.list_models())
    if cfg.workers > 1:
        raise ValueError(f"workers: {cfg.workers} asked for, but Flower's simulation trains the clients in "
                         "Ray actors; set workers = 1")
    for m in cfg.methods:
        reject_ablation(m)
    config_from_run_config(to_run)  # the app keys (round-timeout, aggregation-order, ...)
    if importlib.util.find_spec("ray") is None:
        raise ImportError(RAY_MISSING)
    if backend_config is None:
        backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    results: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        context.run_config.update(to_run)  # what `flwr run --run-config` gives the ServerApp
        run_cfg, opts = config_from_run_config(context.run_config)
        results.update(run_federation(grid, run_cfg, poll_s=poll_s, **opts))

    run_simulation(server_app, client_app, num_supernodes=cfg.num_clients, backend_config=backend_config,
                   verbose_logging=verbose)
    if set(results) != set(cfg.methods):  # the ServerApp's errors are re-raised by run_simulation
        raise RuntimeError(f"simulation ended without results for {sorted(set(cfg.methods) - set(results))}")
    return results


__all__ = ["simulate", "to_run_config", "RAY_MISSING"]
