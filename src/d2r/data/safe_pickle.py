"""A restricted unpickler for the CIFAR python archives: they are pickles, and `pickle.load` on a
file from the internet runs whatever code the file names. This one admits only the builtin
containers, numbers, strings and bytes the archives use, plus stand-ins for the three numpy names
a pickled numeric array refers to; any other global is refused before anything runs."""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

# Plain numeric dtypes a data array may have; object arrays (which would nest further pickles)
# and structured dtypes are refused.
_DTYPES = {f"{kind}{size}" for kind in "ui" for size in (1, 2, 4, 8)} | {"f4", "f8", "b1"}


class _ArrayClass:
    """Stands in for `numpy.ndarray` as the first argument of `_reconstruct`; never called."""


class _DtypeStub:
    """Stands in for `numpy.dtype(spec, align, copy)`; `__setstate__` receives the byte order."""

    def __init__(self, spec: str | bytes, align: Any = 0, copy: Any = 1) -> None:
        spec = spec.decode("ascii") if isinstance(spec, bytes) else spec
        if spec not in _DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {spec!r}: only plain numeric arrays")
        self.spec, self.order = spec, "|"

    def __setstate__(self, state: tuple) -> None:
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refused dtype byte order {order!r}")
        self.order = order

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype if self.order in "|=" else dtype.newbyteorder(self.order)


class _ArrayStub:
    """What `_reconstruct` returns; `__setstate__` receives shape, dtype and the raw bytes."""

    array: np.ndarray | None = None

    def __setstate__(self, state: tuple) -> None:
        # (version, shape, dtype, is_fortran, raw); very old pickles omit the version.
        shape, dtype, fortran, raw = state[1:] if len(state) == 5 else state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("refused array: only plain numeric arrays of raw bytes")
        dtype = dtype.numpy()
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"refused array shape {shape!r}")
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(f"array of shape {shape} does not match its data size")
        flat = np.frombuffer(raw, dtype=dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _ArrayClass:
        raise pickle.UnpicklingError("refused _reconstruct of anything but numpy.ndarray")
    return _ArrayStub()


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes as `_codecs.encode(text, "latin1")` under pickle protocol 2.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x and Python 2 writers
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x writers
    ("numpy", "ndarray"): _ArrayClass,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return _GLOBALS[(module, name)]


def _finish(obj: Any) -> Any:
    """Replaces array stand-ins by the numpy arrays they hold, inside dicts, lists and tuples."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("array without data")
        return obj.array
    if isinstance(obj, dict):
        return {key: _finish(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finish(item) for item in obj)
    if isinstance(obj, (_DtypeStub, _ArrayClass)) or obj is _ArrayClass:
        raise pickle.UnpicklingError("a numpy name outside an array")
    return obj


def safe_loads(data: bytes) -> Any:
    """Unpickles `data` admitting only builtin values and plain numeric numpy arrays.

    Python 2 strings come back as bytes (`encoding="bytes"`), as in the CIFAR archives' dict keys
    (b"data", b"labels"). Raises pickle.UnpicklingError for anything else; it never runs code
    that the data names."""
    unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes")
    try:
        return _finish(unpickler.load())
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # malformed opcodes, wrong arity, truncated data...
        raise pickle.UnpicklingError(f"malformed pickle: {error!r}") from error
