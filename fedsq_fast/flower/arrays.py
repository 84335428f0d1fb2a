"""State dicts <-> Flower ArrayRecords, with dtypes Flower cannot carry converted explicitly.

Every tensor numpy can represent travels as a plain ``numpy.ndarray`` Array (so Flower's
own strategies and wrappers can read it). bfloat16 has no numpy dtype, and
``ArrayRecord.from_torch_state_dict`` fails on it, so it travels as its raw
little-endian bytes under a stype of ours (:data:`RAW_STYPE`); Flower's numpy-based
code then refuses it loudly (``Array.numpy`` raises) instead of averaging bit patterns.
Decoding never unpickles: numpy arrays are read with ``allow_pickle=False`` (inside
``Array.numpy``) and raw arrays with ``torch.frombuffer``.
"""
from __future__ import annotations

import functools
import io
import math
import sys
import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

RAW_STYPE = "fedsq_fast.torch-raw-le"  # raw little-endian tensor bytes, dtype = torch dtype name
NUMPY_STYPE = "numpy.ndarray"
_RAW_DTYPES = {"bfloat16": torch.bfloat16}
# numpy kinds torch can hold: bool, signed/unsigned int, float (complex/object/str are refused)
_NUMPY_KINDS = "biuf"


def state_to_arrays(state: dict, *, arg: str = "state", keep_input: bool = True) -> ArrayRecord:
    """A tensor state dict as an ArrayRecord (keys and order kept; tensors copied to CPU).
    ``keep_input=False`` empties ``state`` as it goes, so the tensors and their bytes are
    not both held in full."""
    if not isinstance(state, dict):
        raise TypeError(f"{arg} must be a dict of tensors, got {type(state).__name__}")
    rec = ArrayRecord()
    for k in list(state):
        t = state[k] if keep_input else state.pop(k)
        if not isinstance(k, str):
            raise TypeError(f"{arg} keys must be strings, got {k!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}[{k!r}] must be a Tensor, got {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy()  # same bits; numpy knows int16
            if sys.byteorder != "little":
                raw = raw.byteswap()
            rec[k] = Array(dtype="bfloat16", shape=tuple(t.shape), stype=RAW_STYPE, data=raw.tobytes())
        else:
            try:
                arr = t.numpy()
            except TypeError as e:  # a dtype numpy lacks (e.g. float8): name it
                raise TypeError(f"{arg}[{k!r}]: dtype {t.dtype} cannot be sent ({e})") from None
            head = _npy_header_for(arr.dtype.str, arr.shape)
            if head is None:  # numpy would write another header version: Flower's own encoder
                rec[k] = Array(arr)
            else:  # the bytes np.save writes (tested against Flower's Array(ndarray)), copied once
                rec[k] = Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype=NUMPY_STYPE,
                               data=b"".join((head, memoryview(arr))))
    return rec


@functools.lru_cache(maxsize=1024)
def _npy_header_for(descr: str, shape: tuple) -> bytes | None:
    """The .npy 1.0 header np.save writes for a C-order array of this dtype and shape (a model
    repeats its shapes round after round: built once); None where numpy would need 2.0."""
    fp = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(fp, {"descr": descr, "fortran_order": False, "shape": shape})
    except ValueError:
        return None
    return fp.getvalue()


_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # numpy's own default limit (read_array_header_*'s max_header_size)


def _npy_header(data: bytes):
    """(shape, fortran, dtype, data offset) of a .npy payload, parsed by numpy's safe
    parser (literal_eval, no pickle); None when it is not one. Parsing costs ~40 us a
    tensor, more than reading it, and every reply repeats the same headers: the header's
    bytes key a cache of numpy's answers."""
    if not isinstance(data, bytes) or len(data) < 10 or not data.startswith(_NPY_MAGIC):
        return None
    start = 10 if data[6] == 1 else 12  # 1.0: a 2-byte header length; 2.0 and 3.0: 4 bytes
    end = start + int.from_bytes(data[8:start], "little")
    if end > len(data) or end - start > _NPY_MAX_HEADER:
        return None
    return _parse_npy_header(data[:end])


@functools.lru_cache(maxsize=1024)
def _parse_npy_header(head: bytes):
    try:
        fp = io.BytesIO(head)
        major, _ = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
    except Exception:  # noqa: BLE001 - the copying path reports what is wrong
        return None
    if fp.tell() != len(head):
        return None
    return shape, fortran, dtype, len(head)


def _npy_view(a: Array) -> torch.Tensor | None:
    """A read-only tensor over the bytes of a plain .npy payload (C order, native byte
    order, numeric dtype), or None where the copying path must handle it."""
    data = a.data
    head = _npy_header(data)
    if head is None:
        return None
    shape, fortran, dtype, offset = head
    if fortran or not dtype.isnative or dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
        return None
    n = math.prod(shape)
    if len(data) - offset != n * dtype.itemsize or n == 0:
        return None
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=offset).reshape(shape)
    return torch.from_numpy(arr)  # read-only by contract (arrays_to_state silences torch's warning)


def _decode_one(key: str, a, arg: str, copy: bool = True) -> torch.Tensor:
    if not isinstance(a, Array):
        raise ValueError(f"{arg}[{key!r}] is a {type(a).__name__}, not an Array")
    shape = tuple(int(s) for s in a.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{arg}[{key!r}] has a negative dimension in shape {shape}")
    if a.stype == RAW_STYPE:
        dt = _RAW_DTYPES.get(a.dtype)
        if dt is None:
            raise ValueError(f"{arg}[{key!r}]: raw dtype {a.dtype!r} is not one of {sorted(_RAW_DTYPES)}")
        n = math.prod(shape)
        want = n * torch.empty((), dtype=dt).element_size()
        if len(a.data) != want:
            raise ValueError(f"{arg}[{key!r}]: {len(a.data)} bytes for shape {shape} of {a.dtype} "
                             f"(expected {want})")
        if n == 0:
            return torch.empty(shape, dtype=dt)
        if not copy and sys.byteorder == "little" and isinstance(a.data, bytes):
            # the bytes are already native order: a read-only view, as for numpy payloads
            return torch.from_numpy(np.frombuffer(a.data, dtype=np.int16)).view(dt).reshape(shape)
        raw = np.frombuffer(a.data, dtype="<i2").astype(np.int16, copy=True)  # owned, native order
        return torch.from_numpy(raw).view(dt).reshape(shape)
    if a.stype != NUMPY_STYPE:
        raise ValueError(f"{arg}[{key!r}]: unsupported serialization type {a.stype!r}")
    if not copy:
        t = _npy_view(a)
        if t is not None:
            if tuple(t.shape) != shape:
                raise ValueError(f"{arg}[{key!r}]: data has shape {tuple(t.shape)}, header says {shape}")
            return t
    head = _npy_header(a.data)
    if head is not None and not head[2].hasobject:
        # np.load allocates the header's shape before it reads: check the length first
        want = math.prod(head[0]) * head[2].itemsize
        if len(a.data) - head[3] != want:
            raise ValueError(f"{arg}[{key!r}]: {len(a.data) - head[3]} data bytes, but the header claims shape "
                             f"{tuple(head[0])} of {head[2]} ({want} bytes)")
    try:
        arr = a.numpy()  # np.load(..., allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a malformed payload is a rejection, not a crash
        raise ValueError(f"{arg}[{key!r}]: not a readable numpy array ({type(e).__name__}: {e})") from None
    if arr.dtype.kind not in _NUMPY_KINDS:
        raise ValueError(f"{arg}[{key!r}]: numpy dtype {arr.dtype} cannot become a tensor")
    if tuple(arr.shape) != shape:
        raise ValueError(f"{arg}[{key!r}]: data has shape {tuple(arr.shape)}, header says {shape}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return torch.from_numpy(arr)


def arrays_to_state(record, *, arg: str = "arrays", copy: bool = True) -> dict:
    """An ArrayRecord as a state dict of CPU tensors (dtypes restored, bf16 included).
    Raises ValueError naming ``arg`` and the key for anything malformed.

    ``copy=False`` returns plain numpy payloads (and bfloat16 raw payloads on little-endian
    hosts) as views of the record's bytes, without
    a copy (decoding a model by copying costs as much as averaging it). The caller
    must only read them, and only while the record lives: the server folds replies
    this way."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{arg} must be an ArrayRecord, got {type(record).__name__}")
    if copy:
        return {k: _decode_one(k, a, arg, copy) for k, a in record.items()}
    with warnings.catch_warnings():  # views of bytes are read-only by contract: torch's warning says so
        warnings.simplefilter("ignore", UserWarning)
        return {k: _decode_one(k, a, arg, copy) for k, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (array data only)."""
    return int(sum(len(a.data) for a in record.values()))
