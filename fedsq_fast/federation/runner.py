"""Several methods on one split (`fedsq-fast run`, :func:`run_methods`, :func:`federate`) and the
helpers the runners share. The grid of methods x seeds x partitions (`fedsq-fast compare`) and
the reports are in :mod:`fedsq_fast.experiments`."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from torch import nn

from ..outputs import remove_stale_temps, write_text
from ..plots import plot_partition
from . import adapter, checkpoint
from .config import DATA_KEYS, MODEL_KEYS, MethodSpec, RunConfig, check_sources, from_mapping, validate
from .augment import CALLABLE_PREFIX, callable_name
from .data import InputSpec, input_spec_of, make_bundle
from .inputs import TensorSpec, expected_input, takes_token_ids
from .lazy import is_lazy, rows
from .partition import PARTITIONS, partition_report, partition_table
from .prepare import build_method_model, call_model_fn, prepare_data
from .server import Federation


# The files a run writes into its output folder itself (beside the methods' folders).
RUN_FILES = ("partition.txt", "partition.png", "summary.md", "summary.csv", "accuracy.png", "rounds_to_best.png",
             "client_accuracy.png")


def method_slug(method: str) -> str:
    return method.replace("+", "_").replace(":", "_").replace("=", "")


def partition_tag(cfg) -> str:
    p, a = cfg["partition"], cfg["alpha"]
    if p in ("dirichlet", "quantity"):
        return f"{p}:{a:g}"
    if p == "shards":
        return f"shards:{cfg['shards_per_client']}"
    return p


def parse_partition(spec: str) -> dict:
    """'iid' | 'dirichlet:0.1' | 'quantity:0.5' | 'shards:2' -> config overrides."""
    kind, _, val = spec.partition(":")
    if kind not in PARTITIONS:
        raise ValueError(f"partitions: {spec!r}: kind must be one of {', '.join(PARTITIONS)}")
    out = {"partition": kind}
    if val:
        try:
            if kind == "shards":
                out["shards_per_client"] = int(val)
            elif kind in ("dirichlet", "quantity"):
                out["alpha"] = float(val)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"partitions: {spec!r}: bad parameter {val!r}") from None
    return out


def run_methods(cfg: RunConfig, out_dir=None, resume=False, quiet=False, echo=print, *, bundle=None,
                model_fn=None, input_spec=None, progress: bool | None = None, transport_fn=None,
                callbacks_fn=None, before_methods=None, augment_fn=None) -> dict:
    """All of ``cfg.methods`` on one data split; returns {method: RunResult}. The one driver
    of every runtime: validate, check files, prepare data, write the partition, run each
    method's round loop.

    ``bundle``/``model_fn``/``input_spec``: your own data and model (see :func:`federate`);
    default: ``cfg.dataset`` and the zoo model ``cfg.model``. ``progress``: bars on a
    terminal, else one line per round (default: not ``quiet``). ``transport_fn(method)``:
    how clients are reached (default in process; Flower passes a GridTransport);
    ``callbacks_fn(method)``: extra callbacks per method; ``before_methods(data)``: called
    once the data is ready (Flower waits for its nodes there); ``augment_fn``: the callable a
    ``"callable:..."`` value of ``cfg.augment`` stands for (:func:`federate`)."""
    names = None if model_fn is not None else adapter.list_models()
    validate(cfg, names, own_data=bundle is not None)
    if cfg.secagg and transport_fn is None:  # before any data loads or file is written
        from .config.checks import refuse_secagg_here

        refuse_secagg_here("the embedded engine (in process or workers)")
    if transport_fn is not None and cfg.workers > 1:
        raise ValueError(f"workers: {cfg.workers} asked for, but this runtime's transport reaches the clients "
                         "(Flower: the SuperNodes train them); set workers = 1")
    if augment_fn is not None and cfg.workers > 1:
        import pickle

        try:
            pickle.dumps(augment_fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(f"augment: the callable must be picklable (a module-level function) for workers = "
                             f"{cfg.workers} to apply it: {e}") from None
    check_sources(cfg, names, own_data=bundle is not None)  # data_root and weights files, before loading
    out = Path(out_dir or cfg.out_dir)
    check_out_dir(out)
    if cfg.checkpoint:  # a checkpoint path that is a folder, or a bad signing key: before any data loads
        for m in cfg.methods:
            checkpoint.check_path(out / method_slug(m) / "checkpoint.safetensors")
        checkpoint.signing_key()
    if resume:  # what a killed write of the folder's own files left (our names only)
        remove_stale_temps(out, tuple(f".{n}.*.tmp" for n in RUN_FILES))
    t0 = time.perf_counter()
    data = prepare_data(cfg, bundle, input_spec=input_spec, augment_fn=augment_fn)
    preflight_models(cfg, data, model_fn)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "partition.txt", partition_table(data.counts, data.classes) + "\n")  # every client
    plot_partition(data.counts, out / "partition.png", data.classes,
                   f"{cfg.dataset}, {partition_tag(cfg.to_dict())}, seed {cfg.seed}")
    if not quiet:
        tf = data.transform
        what = (f"input {tuple(data.x.shape[1:])} {data.x.dtype} used as given"
                if getattr(tf, "kind", "images") == "tensor" else
                f"input {tuple(data.x.shape[1:])} -> {tf.channels} ch, "
                f"{'no normalisation' if tf.mean is None else 'normalised'}")
        aug = getattr(tf, "augment", None)
        echo(f"data: {cfg.dataset} pool {len(data.y)}, val {len(data.val_y)}, test {len(data.test_y)}, {what}"
             + (f", augment {aug.name}" if aug is not None else "")
             + (", read per batch (items change between reads)" if getattr(data.x, "random", False) else "")
             + f" ({time.perf_counter() - t0:.1f} s)")
        echo(partition_report(data.counts, data.classes))  # beyond 50 clients: quantiles, not rows
    if before_methods is not None:
        before_methods(data)
    pool = None
    if cfg.workers > 1:
        from .workers import WorkerPoolTransport

        pool = WorkerPoolTransport(cfg.workers)  # one pool for every method: workers start once
    try:
        return _run_each(cfg, data, out, resume, quiet, echo, model_fn, progress, callbacks_fn,
                         transport_fn if pool is None else (lambda m: pool))
    finally:
        if pool is not None:
            pool.close()


def _run_each(cfg, data, out, resume, quiet, echo, model_fn, progress, callbacks_fn, transport_fn) -> dict:
    results = {}
    for m in cfg.methods:
        fed = Federation(cfg, m, data, model_fn=model_fn, out_dir=out / method_slug(m),
                         quiet=quiet if progress is None else not progress,
                         transport=transport_fn(m) if transport_fn is not None else None,
                         callbacks=callbacks_fn(m) if callbacks_fn is not None else ())
        if not quiet:
            i = fed.model_info
            what = (f"DualCopy({i['arch']}), {i['gate_sites']} gate site{'s' if i['gate_sites'] != 1 else ''}"
                    + (", converted by the engine" if i["converted_by_engine"] else "")
                    if i["kind"] == "dualcopy" else f"plain {i['arch']}")
            echo(f"{m}: trains {what}; sends {i['payload_bytes'] / 1e6:.2f} MB per client per round")
        results[m] = fed.run(resume=resume)
        if not quiet:
            s = results[m].summary
            echo(f"{m}: BVA {s['bva']:.4f} at round {s['rounds_to_best']}, final {s['final_val_acc']:.4f}, "
                 f"test {s.get('test_acc', float('nan')):.4f}, {s['time_total_s']:.1f} s")
    return results


def preflight_models(cfg: RunConfig, data, model_fn=None) -> None:
    """Build each kind of model the methods will train (plain, DualCopy) once and run it on
    the data, so that a model that cannot be built, converted or fed, or has the wrong head,
    is refused before any file is written (each Federation checks its own model again)."""
    for dual in sorted({MethodSpec.parse(m).dual for m in cfg.methods}):
        method = next(m for m in cfg.methods if MethodSpec.parse(m).dual == dual)
        source = "model_fn" if model_fn is not None else f"model {cfg.model!r}"
        model = call_model_fn(model_fn, cfg.seed) if model_fn is not None else build_method_model(cfg, dual, data)
        model, _ = adapter.method_model(model, method, dual, quant_bn=cfg.quant_bn,
                                        allow_ungated=cfg.allow_ungated, soft_gates=cfg.soft_gates, source=source)
        adapter.check_model_io(model.to(data.val_x.device), data.val_x, data.transform, data.num_classes, source)


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be one, before any data is loaded."""
    import tempfile

    p = Path(out)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"out_dir: {q} exists and is not a folder")
            if not os.access(q, os.W_OK | os.X_OK):
                raise ValueError(f"out_dir: {q} is not writable")
            try:  # what access() cannot tell (root, /proc, /sys, a read-only mount): make a folder there
                os.rmdir(tempfile.mkdtemp(prefix=".fedsq-probe-", dir=q))
            except OSError as e:
                raise ValueError(f"out_dir: cannot create folders in {q} "
                                 f"({e.strerror or type(e).__name__}; {p} would be made there)") from None
            break


def federate(model_fn, train, test=None, *, config=None, methods=None, input_spec=None,
             num_classes: int | None = None, classes=(), out_dir=None, resume: bool = False,
             quiet: bool = False, echo=print, in_memory="auto", memory_budget: int | None = None,
             augment=None) -> dict:
    """Federated fine-tuning of your own model on your own data, in one call.

    ``model_fn()``: builds the initial model (a plain ``nn.Module``; fedsq methods convert
    it with :func:`fedsq_fast.dualcopy`, or take a DualCopy model as is). ``train`` /
    ``test``: ``(images, labels)`` tensors or arrays, or map-style Datasets (see
    :func:`make_bundle`; without ``test`` 20% of ``train`` is held out). ``config``: a
    mapping of config keys (docs/federation.md; the data and model keys ``dataset``,
    ``data_root``, ``download``, ``model``, ``weights`` do not apply and are refused).
    ``methods``: e.g. ``["fedavg", "fedsq"]`` (default: the config's). ``input_spec``:
    an :class:`InputSpec` (channels, size, mean, std); default: what the model states
    (``model.input_spec``, the zoo attributes, or its first conv's ``in_channels``), else
    the data as given. ``in_memory`` / ``memory_budget``: whether the images are read into
    memory or per batch (:func:`make_bundle`; default: into memory when they fit in a quarter
    of the machine's memory; the results are the same). ``augment``: per-batch augmentation
    of the training images, ``"none"``, ``"flip"``, ``"crop_flip"`` (the config key
    ``augment``; docs/federation.md) or a callable ``fn(x, generator) -> x``
    (:mod:`fedsq_fast.federation.augment`; recorded as ``"callable:<module>.<name>"``).

    Data: images (N, C, H, W) / (N, H, W), features (N, F), token ids (N, L) (integers, kept
    as such for a model whose first layer is an ``nn.Embedding``, else cast to float32) and
    sequences (N, L, F): a model with a Conv2d (or an ``input_spec``) takes images; any other
    model takes the samples as given (no resize, no normalisation). A Dataset whose items
    change between reads (random transforms) is read per batch, never frozen (logged).
    Every argument is checked before any training; returns ``{method: RunResult}``."""
    adapter.check_model_fn(model_fn)
    config = dict(config or {})
    unused = sorted(k for k in config if k.replace("-", "_") in DATA_KEYS + MODEL_KEYS)
    if unused:
        raise ValueError(f"config: {', '.join(unused)} not used with your own data and model_fn; remove "
                         f"{'it' if len(unused) == 1 else 'them'}")
    if methods is not None:
        config["methods"] = list(methods) if not isinstance(methods, str) else methods
    if out_dir is not None:
        config["out_dir"] = str(out_dir)
    augment_fn = None
    if augment is not None:
        if "augment" in config:
            raise ValueError("augment: given as an argument and in config; give it once")
        if callable(augment):
            augment_fn, config["augment"] = augment, CALLABLE_PREFIX + callable_name(augment)
        else:
            config["augment"] = augment
    cfg = from_mapping(config)
    if input_spec is not None and not isinstance(input_spec, InputSpec):
        input_spec = InputSpec(*input_spec) if isinstance(input_spec, (tuple, list)) else input_spec
        if not isinstance(input_spec, InputSpec):
            raise TypeError(f"input_spec must be an InputSpec or (channels, size, mean, std), got "
                            f"{type(input_spec).__name__}")
    probe = call_model_fn(model_fn, cfg.seed)
    if not isinstance(probe, nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module, got {type(probe).__name__}")
    image_model = input_spec is not None or input_spec_of(probe) is not None
    bundle = make_bundle(train, test, num_classes=num_classes, classes=classes, in_memory=in_memory,
                         memory_budget=memory_budget, kind="auto" if image_model else _sample_kind(train))
    if bundle.train.kind == "tensor":
        sample = rows(bundle.train.x, slice(0, 1))
        if image_model:
            raise ValueError(f"train: samples of shape {tuple(bundle.train.x.shape[1:])} (features, token ids or "
                             f"sequences), but the model takes images: "
                             f"{expected_input(probe, sample) or 'it has a Conv2d'}"
                             + ("; input_spec describes images too" if input_spec is not None else "")
                             + "; give image data (N, C, H, W) or a model for this data")
        spec = TensorSpec("long" if takes_token_ids(probe, sample) else "float", expected_input(probe, sample))
    else:
        spec = input_spec or input_spec_of(probe) or InputSpec(int(bundle.train.x.shape[1]))
    del probe
    arch = "model_fn"
    cfg = cfg.replace(dataset=bundle.name, model=arch, weights=None)  # keeps the user's keys for validate
    return run_methods(cfg, cfg.out_dir, resume=resume, quiet=quiet, echo=echo, bundle=bundle,
                       model_fn=model_fn, input_spec=spec, augment_fn=augment_fn)


def _sample_kind(data) -> str:
    """How :func:`federate` reads ``data`` for a model without a Conv2d: 3-D arrays (and
    Datasets of 2-D items) that are not uint8 pixels are (N, L, F) sequences ("tensor"), not
    grey images; everything else as :func:`~.data.data_kind` decides ("auto")."""
    import numpy as np
    import torch

    from .data import InMemoryDataset, _is_dataset
    from .lazy import read_item

    x = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and not is_lazy(data[0]):
        x = data[0]
    elif _is_dataset(data) and not isinstance(data, InMemoryDataset):
        try:
            item = read_item(data, 0, "train") if len(data) else None
        except (TypeError, IndexError):
            return "auto"  # make_bundle names what is wrong
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], (torch.Tensor, np.ndarray)) \
                and np.ndim(item[0]) == 2:
            return "tensor" if torch.as_tensor(item[0]).dtype != torch.uint8 else "auto"
        return "auto"
    if isinstance(x, (torch.Tensor, np.ndarray)) and np.ndim(x) == 3:
        return "tensor" if torch.as_tensor(x[:0]).dtype != torch.uint8 else "auto"
    return "auto"
