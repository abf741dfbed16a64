"""Read single tensors out of safetensors checkpoints (one file or sharded) without loading the rest.

The header (names, dtypes, shapes, byte ranges) is the file's JSON header (the safetensors format: 8-byte
length, JSON, data); the bytes of one tensor are read with ``pread`` in bounded chunks straight into a tensor of
the requested dtype on the requested device. ``safe_open`` is not used for the bytes because it memory-maps the
file: every page it touches counts in the process's RSS until the file is closed, so reading the kept part of a
checkpoint and casting it would hold the stored copy and the cast copy at once (peak 3x the bf16 model for an
fp32 checkpoint). Here casting fp32 -> bf16 needs one 16 MiB chunk of scratch memory, not a second copy.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec in its README).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CHUNK_BYTES = 16 << 20  # scratch per read: bounds the extra memory of a cast to 16 MiB


class TensorFileError(ValueError):
    """A checkpoint file that is missing, unreadable, or lacks a tensor that is needed."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range (absolute offsets in the file)."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensor entries, ``__metadata__``) of one safetensors file, reading only its header."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TensorFileError(f"cannot read the safetensors header of {path} ({type(err).__name__}: {err}); "
                              f"the file is missing or corrupt") from err
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in ST_DTYPES:
            raise TensorFileError(f"{path}: tensor {name} has dtype {info['dtype']}, which skrr cannot read")
        start, stop = info["data_offsets"]
        entries[name] = TensorEntry(path, ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + stop)
    return entries, meta


class TensorFiles:
    """The tensors of one or several safetensors files (a sharded checkpoint), read one at a time."""

    def __init__(self, paths: Iterable[str | Path]):
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._buffers: dict[tuple[torch.dtype, bool], torch.Tensor] = {}
        for p in paths:
            entries, meta = read_header(p)
            self.entries.update(entries)
            self.metadata.update(meta)

    def _scratch(self, dtype: torch.dtype, numel: int, pinned: bool) -> torch.Tensor:
        # One buffer for all reads: a fresh 16 MiB allocation per tensor lets glibc's heap grow (its mmap
        # threshold adapts upwards) and keep the freed memory, which showed as +0.2 GB peak in bench_load.
        key = (dtype, pinned)
        if key not in self._buffers:
            buf = torch.empty(numel, dtype=dtype)
            self._buffers[key] = buf.pin_memory() if pinned else buf
        return self._buffers[key]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``name`` cast to ``dtype`` (None: as stored) on ``device``, through a bounded scratch buffer."""
        e = self.entries[name]
        dtype = dtype or e.dtype
        out = torch.empty(e.shape, dtype=dtype, device=device)
        if e.nbytes == 0:
            return out
        flat = out.view(-1)
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        if dtype == e.dtype and flat.device.type == "cpu":
            _pread_into(e.path, e.start, memoryview(flat.view(torch.uint8).numpy()))  # no scratch at all
            return out
        per_chunk = max(1, CHUNK_BYTES // itemsize)
        scratch = self._scratch(e.dtype, per_chunk, pinned=flat.device.type == "cuda")
        done = 0
        while done < flat.numel():
            k = min(per_chunk, flat.numel() - done)
            _pread_into(e.path, e.start + done * itemsize, memoryview(scratch[:k].view(torch.uint8).numpy()))
            flat[done:done + k].copy_(scratch[:k])  # copy_ casts (round-to-nearest-even, as Tensor.to does)
            done += k
        return out


def _pread_into(path: str, offset: int, buf: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n == 0:
                raise TensorFileError(f"{path} ends before the tensor bytes its header promises; it is truncated")
            got += n
    finally:
        os.close(fd)
