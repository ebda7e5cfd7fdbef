"""numpy dtype <-> wire DType, and array <-> little-endian bytes.

bfloat16 comes from `ml_dtypes` (the package JAX and Keras use for it).
Every supported dtype round-trips bit-exactly: bytes are sent and restored
as they are, never converted through another type.
"""
from __future__ import annotations

import numpy as np

from ._proto import logd_pb2 as pb

try:  # ml_dtypes is a dependency, but keep the import failure readable.
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    ml_dtypes = None
    _BF16 = None

_BY_NAME = {
    "float32": pb.FLOAT32,
    "float64": pb.FLOAT64,
    "int32": pb.INT32,
    "int64": pb.INT64,
    "uint8": pb.UINT8,
    "uint32": pb.UINT32,
    "uint64": pb.UINT64,
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
    "int8": pb.INT8,
    "int16": pb.INT16,
    "uint16": pb.UINT16,
    "bool": pb.BOOL,
}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if _BF16 is None:
            raise ImportError("bfloat16 needs the ml_dtypes package")
        return _BF16
    return np.dtype(name)


_BY_CODE = {code: name for name, code in _BY_NAME.items()}

#: Names of the supported dtypes (numpy spelling).
SUPPORTED = tuple(_BY_NAME)


def to_wire(dtype) -> int:
    """The wire DType of a numpy dtype; ValueError if unsupported."""
    d = np.dtype(dtype)
    name = d.name
    if name not in _BY_NAME:
        raise ValueError(
            f"dtype {d} is not supported; use one of {', '.join(SUPPORTED)}")
    return _BY_NAME[name]


def from_wire(code: int) -> np.dtype:
    """The numpy dtype (little-endian) of a wire DType."""
    if code not in _BY_CODE:
        raise ValueError(f"unknown wire dtype {code}")
    return _np_dtype(_BY_CODE[code]).newbyteorder("<")


def name_of(code: int) -> str:
    return _BY_CODE[code]


def as_le_array(a) -> np.ndarray:
    """A C-contiguous little-endian numpy array with the same values.

    No copy when `a` already is one (e.g. a NumPy view of a JAX CPU array).
    """
    a = np.asarray(a)
    to_wire(a.dtype)  # validate early, with the readable message
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    # (np.ascontiguousarray would turn a 0-d array into shape (1,).)
    return a if a.flags.c_contiguous else a.copy(order="C")


def byte_view(a: np.ndarray) -> memoryview:
    """A flat memoryview of the bytes of a C-contiguous array (no copy)."""
    return memoryview(a.reshape(-1).view(np.uint8))


def from_bytes(data, code: int, shape) -> np.ndarray:
    """Rebuild an array from its little-endian bytes (owns a writable copy)."""
    dt = from_wire(code)
    shape = tuple(int(s) for s in shape)
    arr = np.frombuffer(data, dtype=dt)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if arr.size != n:
        raise ValueError(
            f"{len(data)} bytes do not make a {dt.name} tensor of shape {shape}")
    arr = arr.reshape(shape)
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)
