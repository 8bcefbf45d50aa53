"""Tensor files of a checkpoint: lazy reading (one file or shards + index) and incremental, sharded writing.

Sharded checkpoints follow Hugging Face's convention: ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``);
a checkpoint that fits one shard is a single ``model.safetensors`` with no index, as ``save_pretrained``
writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ...errors import TritonqError

WEIGHTS_FILE = "model.safetensors"


class TensorStore:
    """Lazy read access to the tensors of a checkpoint directory (one file or shards + index), one tensor at a
    time."""

    def __init__(self, directory: str | os.PathLike, filename: str = WEIGHTS_FILE) -> None:
        self.dir = Path(directory)
        index = self.dir / f"{filename}.index.json"
        single = self.dir / filename
        if single.is_file():
            files = {single}
            self._where: dict[str, Path] = {}
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: self.dir / v for k, v in weight_map.items()}
            files = set(self._where.values())
        else:
            raise TritonqError(
                f"{self.dir} has no {filename} (nor a sharded index); is it a checkpoint directory?"
            )
        if not self._where:
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self._where.update(dict.fromkeys(h.keys(), f))

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


class ShardedWriter:
    """Write tensors as they come, a shard at a time, so a checkpoint never has to sit in memory whole.

    ``shard_bytes=None`` keeps every tensor until :meth:`close` and writes one ``model.safetensors`` (exactly
    the bytes ``save_file`` gives the whole dict). With a limit, a shard is written as soon as the next tensor
    would push it past ``shard_bytes`` (a larger tensor gets a shard of its own); :meth:`close` names the shards
    ``model-0000i-of-0000n.safetensors`` and writes the index. Keys must be unique.
    """

    def __init__(self, directory: str | os.PathLike, shard_bytes: int | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        if shard_bytes is not None and shard_bytes < 1:
            raise TritonqError(f"the shard size must be positive, got {shard_bytes} bytes")
        self.dir = Path(directory)
        self.shard_bytes = shard_bytes
        self.metadata = {"format": "pt"} if metadata is None else metadata
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
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
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def update(self, tensors: dict[str, Tensor]) -> None:
        for key, tensor in tensors.items():
            self.add(key, tensor)

    def _flush(self) -> None:
        path = self.dir / f"model-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is pending, name the shards, write the index; returns the files written."""
        if not self._shards:
            save_file(self._pending, str(self.dir / WEIGHTS_FILE), metadata=self.metadata)
            self._pending = {}
            return [self.dir / WEIGHTS_FILE]
        if self._pending:
            self._flush()
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
