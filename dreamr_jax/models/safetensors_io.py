"""Reading and writing safetensors files with NumPy memory maps.

Our own reader rather than `safetensors.numpy`: it hands out memory-mapped views (a sharded load
reads only each device's slice) and understands bfloat16 through `ml_dtypes`, which plain NumPy
cannot represent.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy access to the tensors of one `.safetensors` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._data_start = 8 + header_len
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped array (no bytes are read until it is sliced or copied)."""
        info = self._header[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def release(self, key: str) -> None:
        """Unmaps the pages of `key` that reading it mapped into this process (they stay in
        the OS's file cache). Mapped pages count as the process's memory until the file is
        closed, so a loader that reads tensor after tensor would otherwise hold the whole
        checkpoint twice at its end: once mapped, once in the arrays made from it."""
        start, end = self._header[key]["data_offsets"]
        page = mmap.PAGESIZE
        lo = (self._data_start + start) // page * page  # madvise takes page-aligned ranges
        self._mmap._mmap.madvise(mmap.MADV_DONTNEED, lo, self._data_start + end - lo)


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` (C-ordered) as one safetensors file, keys sorted."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be written to safetensors")
        header[key] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


class CheckpointTensors:
    """All tensors of a Hugging Face checkpoint directory, single-file or sharded with an index."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {
                name: SafetensorsFile(os.path.join(directory, name))
                for name in sorted(set(weight_map.values()))
            }
            self._where = {key: files[name] for key, name in weight_map.items()}
        elif os.path.exists(single):
            file = SafetensorsFile(single)
            self._where = {key: file for key in file.keys()}
        else:
            raise FileNotFoundError(
                f"{directory}: no model.safetensors or model.safetensors.index.json"
            )

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def release(self, key: str) -> None:
        self._where[key].release(key)
