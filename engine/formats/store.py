"""Tensor files of a checkpoint: lazy reading (one file or shards + index) and incremental, sharded writing.

Sharded checkpoints follow Hugging Face's convention: ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``);
a checkpoint that fits one shard is a single ``model.safetensors`` with no index, as ``save_pretrained``
writes it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ...errors import TritonqError

WEIGHTS_FILE = "model.safetensors"


def tensor_files(directory: str | os.PathLike, filename: str = WEIGHTS_FILE) -> dict[str, Path] | None:
    """Tensor name -> file of a checkpoint directory: one ``filename`` (names in sorted order) or its shards listed
    by ``filename.index.json``; None when it has neither."""
    directory = Path(directory)
    single, index = directory / filename, directory / f"{filename}.index.json"
    if single.is_file():
        return dict.fromkeys(sorted(k for k in read_header(single)[1] if k != "__metadata__"), single)
    if index.is_file():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return None


class TensorStore:
    """Lazy read access to the tensors of a checkpoint directory (one file or shards + index), one tensor at a
    time."""

    def __init__(self, directory: str | os.PathLike, filename: str = WEIGHTS_FILE) -> None:
        self.dir = Path(directory)
        where = tensor_files(self.dir, filename)
        if where is None:
            raise TritonqError(
                f"{self.dir} has no {filename} (nor a sharded index); is it a checkpoint directory?"
            )
        self._where: dict[str, Path] = where

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, what: str = "") -> Tensor:
        if name not in self._where:
            hint = f" ({what})" if what else ""
            raise TritonqError(
                f"tensor {name!r} is missing from {self.dir}{hint}; the checkpoint is incomplete"
            )
        # opened per read and closed again: a handle kept open keeps every page read from it mapped, and a pass
        # over a large checkpoint would end with all of it counted in the process's resident memory
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def maybe(self, name: str) -> Tensor | None:
        return self.get(name) if name in self._where else None


def read_header(path: str | os.PathLike) -> tuple[int, dict]:
    """Where a safetensors file's data starts and its header (``{name: {dtype, shape, data_offsets}}``)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TritonqError(f"{path} is not a safetensors file (shorter than its 8-byte header length); "
                               "download or save the checkpoint again")
        size = struct.unpack("<Q", raw)[0]
        try:
            return 8 + size, json.loads(f.read(size))
        except ValueError:
            raise TritonqError(f"{path} has a corrupt safetensors header; download or save the checkpoint "
                               "again") from None


def stored_dtype(path: str | os.PathLike, key: str, header: tuple[int, dict] | None = None) -> torch.dtype:
    """The dtype tensor ``key`` is stored in (``header``: :func:`read_header`'s answer, if known)."""
    code = (read_header(path) if header is None else header)[1][key]["dtype"]
    if code not in _DTYPE_OF_NAME:
        raise TritonqError(f"{path}: {key} is stored as {code}, which tritonq does not read")
    return _DTYPE_OF_NAME[code]


def read_tensor(path: str | os.PathLike, key: str, header: tuple[int, dict] | None = None,
                rows: slice | None = None) -> Tensor:
    """One tensor of a safetensors file, or a block of its leading-dimension ``rows``, read with plain file reads
    into a fresh tensor. No memory map: the process holds exactly the bytes asked for (a mapped file's touched
    pages count in its RSS as long as the mapping lives). ``header``: :func:`read_header`'s answer, if known."""
    start, entries = read_header(path) if header is None else header
    if key not in entries or key == "__metadata__":
        raise TritonqError(f"{path} holds no tensor {key!r}; the checkpoint index and its shards disagree")
    entry = entries[key]
    dtype = _DTYPE_OF_NAME.get(entry["dtype"])
    if dtype is None:
        raise TritonqError(f"{path}: {key} is stored as {entry['dtype']}, which tritonq does not read")
    shape = list(entry["shape"])
    begin, end = entry["data_offsets"]
    if rows is not None:
        first, last, _ = rows.indices(shape[0] if shape else 0)
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        begin, end, shape[0] = begin + first * row_bytes, begin + max(last, first) * row_bytes, max(last - first, 0)
    out = torch.empty(shape, dtype=dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open(path, "rb") as f:
        f.seek(start + begin)
        done = 0
        while done < end - begin:
            n = f.readinto(view[done:min(end - begin, done + COPY_CHUNK)])
            if not n:
                raise TritonqError(f"{path} ends inside tensor {key!r}; the file is truncated")
            done += n
    return out


PT_METADATA = {"format": "pt"}  # what save_pretrained writes; ``save_file(..., metadata=None)`` writes none


class ShardedWriter:
    """Write tensors as they come, a shard at a time, so a checkpoint never has to sit in memory whole.

    Each tensor's bytes go to a temporary data file of the current shard as soon as it is added; when the shard
    is full (or at :meth:`close`) the safetensors file is assembled from that file: header, then the data copied
    in bounded chunks in safetensors' order. The file is byte-identical to what ``save_file`` writes for the
    same tensors (see :func:`safetensors_header`), so memory holds one tensor plus a copy buffer, never a shard.

    ``shard_bytes=None`` writes one ``filename`` (``model.safetensors``). With a limit, a shard closes as soon as the
    next tensor would push it past ``shard_bytes`` (a larger tensor gets a shard of its own); :meth:`close` names
    the shards ``model-0000i-of-0000n.safetensors`` and writes the index. Keys must be unique.
    """

    def __init__(self, directory: str | os.PathLike, shard_bytes: int | None = None,
                 metadata: dict[str, str] | None = PT_METADATA, filename: str = WEIGHTS_FILE) -> None:
        if shard_bytes is not None and shard_bytes < 1:
            raise TritonqError(f"the shard size must be positive, got {shard_bytes} bytes")
        self.dir = Path(directory)
        self.filename = filename
        self.shard_bytes = shard_bytes
        self.metadata = None if metadata is None else dict(metadata)  # None: a header without __metadata__
        self._pending: dict[str, _Entry] = {}  # the open shard's tensors: where their bytes sit in _data
        self._pending_bytes = 0
        self._data: BinaryIO | None = None
        self._data_path = self.dir / f".{filename}.{os.getpid()}-{id(self)}.data"  # the open shard's bytes
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: Tensor) -> None:
        if key in self._seen:
            raise TritonqError(f"tensor {key!r} written twice (a tritonq bug)")
        self._seen.add(key)
        size = tensor.numel() * tensor.element_size()
        limit = self.shard_bytes
        if limit is not None and self._pending and self._pending_bytes + size > limit:
            self._flush(self.dir / f"model-{len(self._shards) + 1:05d}.safetensors.part")
        if self._data is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._data = open(self._data_path, "wb")  # noqa: SIM115 -- stays open across add() calls
        start = self._data.tell()
        _write_tensor_bytes(self._data, tensor)
        self._pending[key] = _Entry(tensor.dtype, tuple(tensor.shape), start, size)
        self._pending_bytes += size
        self.total_bytes += size

    def update(self, tensors: dict[str, Tensor]) -> None:
        for key, tensor in tensors.items():
            self.add(key, tensor)

    def _flush(self, path: Path) -> None:
        """Assemble the open shard at ``path`` from its data file and drop the data file."""
        entries = self._pending
        if self._data is None:
            self._data_path.touch()  # a shard with no tensors (an empty checkpoint) still gets a file
        else:
            self._data.close()
            self._data = None
        if all(e.dtype in _SAFETENSORS_DTYPE for e in entries.values()):
            _assemble(path, entries, self._data_path, self.metadata)
        else:  # a dtype whose place in safetensors' order we do not know: let the library write it
            save_file(_read_back(entries, self._data_path), str(path), metadata=self.metadata)
        self._data_path.unlink(missing_ok=True)
        if path.name.endswith(".part"):
            self._shards.append((path, list(entries)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is pending, name the shards, write the index; returns the files written."""
        if not self._shards:
            self._flush(self.dir / self.filename)
            return [self.dir / self.filename]
        if self._pending:
            self._flush(self.dir / f"model-{len(self._shards) + 1:05d}.safetensors.part")
        count = len(self._shards)
        weight_map, files = {}, []
        for i, (part, keys) in enumerate(self._shards, start=1):
            final = self.dir / f"model-{i:05d}-of-{count:05d}.safetensors"
            part.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / f"{WEIGHTS_FILE}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offset in the shard's data file
    size: int  # bytes


# safetensors' dtype names, most significant first: the library orders a file's tensors by this rank
# (its Rust ``Dtype`` enum, descending), then by name. Checked against save_file in tests/test_store_stream.py.
_SAFETENSORS_DTYPE = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_RANK = {dtype: i for i, dtype in enumerate(_SAFETENSORS_DTYPE)}
_DTYPE_OF_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPE.items()}
COPY_CHUNK = 64 << 20  # bytes moved per read/write when a shard is assembled or a tensor written


def _write_tensor_bytes(f: BinaryIO, tensor: Tensor) -> None:
    """Append a tensor's raw little-endian bytes, in chunks, without copying a contiguous CPU tensor."""
    if tensor.numel() == 0:
        return
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    view = memoryview(flat.view(torch.uint8).numpy())
    for i in range(0, len(view), COPY_CHUNK):
        f.write(view[i:i + COPY_CHUNK])


def safetensors_header(entries: dict[str, _Entry], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """The header ``save_file`` writes (8-byte length + compact JSON padded with spaces to a multiple of 8)
    and the order in which the tensors' data follows it (dtype rank, then name)."""
    order = sorted(entries, key=lambda k: (_RANK[entries[k].dtype], k))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in order:
        e = entries[key]
        header[key] = {"dtype": _SAFETENSORS_DTYPE[e.dtype], "shape": list(e.shape),
                       "data_offsets": [offset, offset + e.size]}
        offset += e.size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _assemble(path: Path, entries: dict[str, _Entry], data_path: Path, metadata: dict[str, str] | None) -> None:
    head, order = safetensors_header(entries, metadata)
    buf = bytearray(min(COPY_CHUNK, max((e.size for e in entries.values()), default=0)) or 1)
    with open(path, "wb") as out, open(data_path, "rb") as src:
        out.write(head)
        for key in order:
            e = entries[key]
            src.seek(e.start)
            left = e.size
            while left:
                n = src.readinto(memoryview(buf)[:min(left, len(buf))])
                if not n:
                    raise TritonqError(f"{data_path} ended early while writing {key!r} (was the disk full?)")
                out.write(memoryview(buf)[:n])
                left -= n


def _read_back(entries: dict[str, _Entry], data_path: Path) -> dict[str, Tensor]:
    tensors = {}
    with open(data_path, "rb") as src:
        for key, e in entries.items():
            src.seek(e.start)
            raw = torch.frombuffer(bytearray(src.read(e.size)), dtype=torch.uint8) if e.size else \
                torch.empty(0, dtype=torch.uint8)
            tensors[key] = raw.view(e.dtype).reshape(e.shape)
    return tensors
