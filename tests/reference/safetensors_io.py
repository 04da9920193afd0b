"""Minimal safetensors reader/writer (numpy only), shared by the loom reference scripts.

File layout (the public safetensors format):
  8 bytes   little-endian uint64 N = length of the JSON header in bytes
  N bytes   UTF-8 JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
            plus an optional "__metadata__": {str: str}. We pad the header with spaces so the
            data section starts on an 8-byte boundary (readers must accept any padding).
  rest      raw little-endian tensor bytes; data_offsets are relative to the start of this section.

Supported dtypes: F32, F64, I32, I64 (the brief needs F32/F64/I32; I64 is free). Anything else is
rejected with the name of the tensor and the dtype, so a C++ writer that emits BF16 gets a clear
message instead of garbage.

The reader validates everything a corrupted or truncated file could get wrong (header length,
JSON, offsets inside the file, byte count == prod(shape) * itemsize, no overlaps) and raises
SafetensorsError naming the file, the tensor and the numbers.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Optional

import numpy as np

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}

# A header larger than this is certainly corruption (the real format caps it at 100 MB too).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def _dtype_name(arr: np.ndarray, name: str) -> str:
    key = (arr.dtype.kind, arr.dtype.itemsize)
    table = {("f", 4): "F32", ("f", 8): "F64", ("i", 4): "I32", ("i", 8): "I64"}
    if key not in table:
        raise SafetensorsError(
            f"tensor '{name}' has numpy dtype {arr.dtype}; supported: float32, float64, int32, int64")
    return table[key]


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes `tensors` (name -> numpy array, or anything np.asarray accepts) to `path`.

    Tensors are written in sorted name order (deterministic bytes for identical inputs). The file
    is written to `path + ".tmp"` and renamed, so an interrupted write never leaves a half file.
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise SafetensorsError("'__metadata__' is reserved and cannot be a tensor name")
        arr = np.asarray(tensors[name])
        dname = _dtype_name(arr, name)
        data = np.ascontiguousarray(arr, dtype=_DTYPES[dname]).tobytes(order="C")
        header[name] = {"dtype": dname, "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((-(8 + len(hbytes))) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_file(path: str, with_metadata: bool = False):
    """Reads a safetensors file into {name: numpy array (native little-endian copy)}.

    With with_metadata=True returns (tensors, metadata_dict). Raises SafetensorsError on any
    malformed input (see module docstring); FileNotFoundError if `path` does not exist.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise SafetensorsError(f"{path}: {len(raw)} bytes is too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(raw):
        raise SafetensorsError(
            f"{path}: header length {n} does not fit the file of {len(raw)} bytes (truncated or not safetensors)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n:]
    out: Dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        try:
            dname, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(
                f"{path}: tensor '{name}' entry {info!r} lacks dtype/shape/data_offsets") from None
        if dname not in _DTYPES:
            raise SafetensorsError(
                f"{path}: tensor '{name}' has dtype {dname}; supported: {sorted(_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise SafetensorsError(f"{path}: tensor '{name}' has bad shape {shape!r}")
        dt = _DTYPES[dname]
        want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)):
            raise SafetensorsError(
                f"{path}: tensor '{name}' data_offsets [{begin}, {end}] outside the data section of {len(data)} bytes")
        if end - begin != want:
            raise SafetensorsError(
                f"{path}: tensor '{name}' {dname}{shape} needs {want} bytes but data_offsets span {end - begin}")
        spans.append((begin, end, name))
        out[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{path}: tensors '{n0}' [{b0},{e0}) and '{n1}' [{b1},{e1}) overlap")
    return (out, metadata) if with_metadata else out
