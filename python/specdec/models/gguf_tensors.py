"""The tensors of a GGUF file, found without reading its metadata values.

gguf-py's ``GGUFReader`` parses every metadata value into numpy views, which for a vocabulary of 150,000 tokens and
as many merges takes seconds per file at every start. The loader needs only the tensor index (name, type, shape,
offset) and the data, so this walks past the values (a string array is a run of length-prefixed strings) and maps
the data once. The config and tokenizer come from the cache (``gguf_convert.ensure_metadata``), where gguf-py's
reader and transformers parsed them once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Sizes of the GGUF value types (GGUFValueType 0-12); 8 (string) and 9 (array) have their own encodings.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass
class Tensor:
    """One tensor: ``data`` is a read-only view of its stored bytes, [rows, bytes per row] for quantised types and
    the values ([rows, columns], or [columns] for 1-D) for float ones; ``shape`` is GGUF's (columns first)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind == _STRING:
            n = self.take("<Q")  # not `self.pos += self.take(...)`: that adds to the position before the take
            self.pos += n
        elif kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALAR:
                self.pos += _SCALAR[item] * count
            else:
                for _ in range(count):
                    self.skip_value(item)
        elif kind in _SCALAR:
            self.pos += _SCALAR[kind]
        else:
            raise ValueError(f"unknown GGUF value type {kind} at byte {self.pos}")


def read_tensors(path: Path) -> tuple[str, list[Tensor]]:
    """(general.architecture, the tensors) of the GGUF file ``path``."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw))
    if bytes(cur.buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cur.pos = 4
    version, n_tensors, n_fields = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    arch, alignment = "", 32
    for _ in range(n_fields):
        key, kind = cur.string(), cur.take("<I")
        if key == "general.architecture" and kind == _STRING:
            arch = cur.string()
        elif key == "general.alignment" and kind == _UINT32:
            alignment = cur.take("<I")
        else:
            cur.skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        name, dims = cur.string(), cur.take("<I")
        shape = tuple(cur.take("<Q") for _ in range(dims))
        infos.append((name, GGMLQuantizationType(cur.take("<I")), shape, cur.take("<Q")))
    start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, kind, shape, offset in infos:
        per_block, block_bytes = GGML_QUANT_SIZES[kind]
        rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = shape[0] // per_block * block_bytes
        data = raw[start + offset : start + offset + rows * row_bytes]
        if kind.name in ("F32", "F16", "BF16"):
            dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind.name]
            data = data.view(dtype).reshape(*reversed(shape)) if len(shape) > 1 else data.view(dtype)
        else:
            data = data.reshape(rows, row_bytes)
        tensors.append(Tensor(name, kind, shape, data))
    return arch, tensors
