"""Verified checkpoints: a damaged or forged checkpoint is never resumed silently. The latest
file falls back to the previous good one with a warning (and the run still ends bit for bit
where an uninterrupted run ends); with no good file, an error names the file and the fault."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import small_config, draw_seed, model_state, assert_same_state

from fedsq_fast.federation import Federation, prepare_data
from fedsq_fast.federation import checkpoint as C

torch.set_num_threads(1)


def _cfg(**kw):
    return small_config(**{**dict(rounds=4, num_clients=4, max_train_samples=None, val_size=200, max_test_samples=100, batch_size=32, methods=['fedadam'], probe_size=8), **kw})


def _interrupted(tmp_path, cfg, data, method, stop):
    fed = Federation(cfg, method, data, out_dir=tmp_path, quiet=True)
    fed.run(stop_after=stop)
    return tmp_path / "checkpoint.safetensors"


def _resume(tmp_path, cfg, data, method):
    return Federation(cfg, method, data, out_dir=tmp_path, quiet=True).run(resume=True)


def _damage(path, how, rng):
    raw = bytearray(path.read_bytes())
    if how == "random":
        path.write_bytes(rng.bytes(4096))
    elif how == "bitflip":  # one bit in the tensor data (after the JSON header)
        hdr = int.from_bytes(raw[:8], "little") + 8
        i = int(rng.integers(hdr, len(raw)))
        raw[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":  # killed between the two renames of a save
        path.unlink()


@pytest.fixture(scope="module")
def uninterrupted(bundle, tmp_path_factory):
    cfg = _cfg(rounds=3)
    data = prepare_data(cfg, bundle)
    return cfg, data, Federation(cfg, "fedadam", data, out_dir=tmp_path_factory.mktemp("full"), quiet=True).run()


@pytest.mark.parametrize("how", ["random", "bitflip", "truncate", "empty", "missing"])
def test_damaged_latest_falls_back_to_previous_and_ends_bit_exact(tmp_path, uninterrupted, how):
    cfg, data, full = uninterrupted
    ck = _interrupted(tmp_path, cfg, data, "fedadam", stop=2)
    assert C.load(C.previous(ck))[1]["round"] == 1
    _damage(ck, how, np.random.default_rng(draw_seed(2**31)))
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint .*round 1"):
        res = _resume(tmp_path, cfg, data, "fedadam")
    assert_same_state(model_state(full.model), model_state(res.model))
    assert [h["val_acc"] for h in res.history] == [h["val_acc"] for h in full.history]
    # the damaged file did not become the fallback: both files on disk verify now
    assert C.load(ck)[1]["round"] == 3 and C.load(C.previous(ck))[1]["round"] == 2


def test_no_good_checkpoint_is_an_error_naming_the_files(tmp_path, bundle):
    cfg = _cfg(rounds=2)
    data = prepare_data(cfg, bundle)
    ck = _interrupted(tmp_path, cfg, data, "fedadam", stop=1)
    assert not C.previous(ck).exists()  # round 1 is the first file
    _damage(ck, "bitflip", np.random.default_rng(draw_seed(2**31)))
    with pytest.raises(C.CheckpointError, match=rf"no usable checkpoint: checkpoint {ck}: content does not match its sha256"):
        _resume(tmp_path, cfg, data, "fedadam")
    ck.unlink()
    ck.mkdir()
    with pytest.raises(C.CheckpointError, match=rf"checkpoint: {ck} is a folder"):  # before any round
        _resume(tmp_path, cfg, data, "fedadam")


def _forge(ck, edit):
    """Rewrite a checkpoint through checkpoint.save (so the hash matches) after ``edit``."""
    groups, meta = C.load(ck)
    meta.pop("rng", None)
    edit(groups, meta)
    C.save(ck, groups, meta, keep_previous=False)


@pytest.mark.parametrize("forgery, match", [
    ("nan_weights", "holds NaN or Inf"),
    ("round", "round 99 is not a round of this run"),
    ("history", r"history does not hold rounds 0..2"),
    ("server_state", "server optimizer state holds 0 tensors, fedadam needs"),
    ("model_key", "model keys differ"),
    ("dtype", "is torch.float64"),
])
def test_forged_checkpoint_with_a_valid_hash_is_refused(tmp_path, bundle, forgery, match):
    cfg = _cfg(rounds=3)
    data = prepare_data(cfg, bundle)
    ck = _interrupted(tmp_path, cfg, data, "fedadam", stop=2)
    os.unlink(C.previous(ck))  # no fallback: the forged file alone decides

    def edit(g, m):
        if forgery == "nan_weights":
            for t in g["model"].values():
                if t.dtype.is_floating_point:
                    t.fill_(float("nan"))
        elif forgery == "round":
            m["round"] = 99
        elif forgery == "history":
            m["history"] = m["history"][:-1]
        elif forgery == "server_state":
            g["server"] = {}
        elif forgery == "model_key":
            k = next(iter(g["model"]))
            g["model"]["extra." + k] = g["model"].pop(k)
        elif forgery == "dtype":
            k = next(k for k, t in g["model"].items() if t.dtype.is_floating_point)
            g["model"][k] = g["model"][k].double()

    _forge(ck, edit)
    with pytest.raises(C.CheckpointError, match=match):
        _resume(tmp_path, cfg, data, "fedadam")


def test_checkpoint_hash_covers_every_byte_and_the_metadata(tmp_path):
    g = {"model": {"w": torch.randn(5, 3), "n": torch.tensor(7), "b": torch.tensor([True, False]),
                   "h": torch.randn(4).bfloat16(), "e": torch.empty(0)}}
    p = tmp_path / "c.safetensors"
    C.save(p, g, {"round": 1, "note": "x"})
    groups, meta = C.load(p)
    for k, t in g["model"].items():
        assert torch.equal(groups["model"][k], t)
    header_len = int.from_bytes(p.read_bytes()[:8], "little")
    raw = bytearray(p.read_bytes())
    # edit the metadata's JSON (same length, so the file still parses): refused
    at = raw.index(b'\\"note\\": \\"x\\"', 8, 8 + header_len)
    raw[at + len(b'\\"note\\": \\"')] = ord("y")
    p.write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match="does not match its sha256"):
        C.load(p)


def test_old_checkpoints_without_a_hash_load_with_a_warning(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "old.safetensors"
    save_file({"model/w": torch.ones(2)}, str(p), metadata={"meta": json.dumps({"round": 0})})
    with pytest.warns(UserWarning, match="no content hash"):
        groups, meta = C.load(p)
    assert meta == {"round": 0} and torch.equal(groups["model"]["w"], torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.save(p, groups, meta)
        C.load(p)


# ---------------------------------------------------------------- issue 24, item 6: files
def test_forged_weights_1e30_are_refused_on_resume(tmp_path, bundle):
    """Weights x 1e30 with a recomputed hash: every later round would keep 0 valid updates and
    the run would exit 0 with a useless model; the plausibility bound replies get refuses it."""
    cfg = _cfg(rounds=3)
    data = prepare_data(cfg, bundle)
    ck = _interrupted(tmp_path, cfg, data, "fedadam", stop=2)
    os.unlink(C.previous(ck))

    def edit(g, m):
        for t in g["model"].values():
            if t.dtype.is_floating_point:
                t.mul_(1e30)

    _forge(ck, edit)
    with pytest.raises(C.CheckpointError, match=r"implausible against the global model's .*plausible_scale = 1e\+06"):
        _resume(tmp_path, cfg, data, "fedadam")


def test_checkpoint_path_that_is_a_folder_is_refused_before_round_1(tmp_path, bundle):
    cfg = _cfg(rounds=2)
    data = prepare_data(cfg, bundle)
    (tmp_path / "checkpoint.safetensors").mkdir()
    fed = Federation(cfg, "fedadam", data, out_dir=tmp_path, quiet=True)
    with pytest.raises(C.CheckpointError, match=rf"^checkpoint: {tmp_path / 'checkpoint.safetensors'} is a folder"):
        fed.run()
    assert len(fed.history) <= 1  # round 0 at most: no round trained
    assert not list(tmp_path.glob(".ckpt-*"))


def test_stale_temp_files_of_a_killed_save_are_removed_on_resume(tmp_path, uninterrupted):
    cfg, data, full = uninterrupted
    ck = _interrupted(tmp_path, cfg, data, "fedadam", stop=2)
    stale = [tmp_path / ".ckpt-abc123.tmp", tmp_path / ".metrics.json.x1.tmp"]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    mine = tmp_path / "notes.tmp"  # not a name a save makes: kept
    mine.write_text("keep")
    res = _resume(tmp_path, cfg, data, "fedadam")
    assert not any(f.exists() for f in stale) and mine.read_text() == "keep"
    assert_same_state(model_state(full.model), model_state(res.model))


def test_checkpoint_signed_with_a_key(tmp_path, monkeypatch):
    """HMAC-SHA256 with a key from the environment: a forged file whose sha256 was recomputed
    is refused where a key is set; a signed file loaded without a key says it is signed; an
    unsigned file with a key set is refused; the key is never written into the file."""
    g = {"model": {"w": torch.randn(4, 3)}}
    p = tmp_path / "c.safetensors"
    monkeypatch.setenv(C.KEY_ENV, "s3cret-key")
    C.save(p, g, {"round": 1})
    assert b"s3cret-key" not in p.read_bytes()
    assert torch.equal(C.load(p)[0]["model"]["w"], g["model"]["w"])
    # a forger without the key: edit the weights and recompute the hash
    monkeypatch.delenv(C.KEY_ENV)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(p), framework="pt") as f:
        header = dict(f.metadata())
    flat = load_file(str(p))
    flat["model/w"] = flat["model/w"] * 1e30
    header["sha256"] = C.digest(flat, header["meta"])
    save_file(flat, str(p), metadata=header)
    monkeypatch.setenv(C.KEY_ENV, "s3cret-key")
    with pytest.raises(C.CheckpointError, match="HMAC signature does not match"):
        C.load(p)
    monkeypatch.delenv(C.KEY_ENV)
    with pytest.raises(C.CheckpointError, match="is signed .*but no key is set: set FEDSQ_CHECKPOINT_KEY"):
        C.load(p)
    C.save(p, g, {"round": 1})  # unsigned
    keyfile = tmp_path / "key"
    keyfile.write_text("s3cret-key\n")
    monkeypatch.setenv(C.KEY_FILE_ENV, str(keyfile))
    with pytest.raises(C.CheckpointError, match="not signed, but a key is set"):
        C.load(p)
    C.save(p, g, {"round": 1})
    monkeypatch.delenv(C.KEY_FILE_ENV)
    monkeypatch.setenv(C.KEY_ENV, "s3cret-key")  # the same key from the file and from the variable
    assert torch.equal(C.load(p)[0]["model"]["w"], g["model"]["w"])
    monkeypatch.setenv(C.KEY_ENV, "another key")
    with pytest.raises(C.CheckpointError, match="signed with another key"):
        C.load(p)
    monkeypatch.setenv(C.KEY_ENV, "")
    with pytest.raises(ValueError, match="FEDSQ_CHECKPOINT_KEY: is set but empty"):
        C.save(p, g, {"round": 1})
