"""The work directory of a quantize run: every finished block on disk, so a run streams its results out and an
interrupted run resumes where it stopped, bit for bit.

After block ``i`` the pipeline commits, each file written to a temporary name and renamed into place:

* ``block-0000i.safetensors``: the block's tensors as the output stores them (the checkpoint's dtype; the
  quantized linears' weights are their grid points);
* ``block-0000i.params.safetensors``: scale, zero, g_idx and grid of each quantized linear;
* ``block-0000i.json``: each linear's info (loss, damping ...) and the block's seconds and peak memory;
* ``inputs-0000{i+1}[.rank R].pt``: the calibration chunks entering the next block, exactly as they are (not
  regenerated: auto-round's resume regenerated them, was not bit-identical, and lost 20x on the first
  resumed block);
* ``progress.json`` last: ``{"done": i + 1}``, the commit point. A run killed anywhere before it finds the
  previous commit and redoes only block ``i``.

With end-to-end scale tuning (``scale_tuning.py``), once every block is done, each block's tuned tensors and grids go
to ``tuned-0000i[.params].safetensors`` and ``tuned.json`` (the tuning settings) last. The block files stay as they
were, so a resume with other tuning settings tunes again from them; one with the same settings reads the tuned ones.

``fingerprint.json`` says what the run is (model files, calibration data, method, options, tritonq version);
``--resume`` refuses a directory whose fingerprint differs and says what differs. The output writer reads the
blocks from here (nothing holds the whole model), and a finished run removes the directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import TritonqError
from .formats.checkpoint import grid_tensors
from .formats.records import GRID_LEAF, grid_from_tensor
from .formats.store import ShardedWriter
from .grid import GridSpec
from .groups import Chunk
from .methods.base import LayerResult
from .outputs import atomic_file

FINGERPRINT = "fingerprint.json"
PROGRESS = "progress.json"
TUNED = "tuned.json"


def default_work_dir(output: str | Path) -> Path:
    out = Path(output).expanduser().resolve()
    return out.with_name(f"{out.name}.tritonq-work")


def file_fingerprint(path: Path) -> dict:
    """Name, size and a hash of the first MiB (a safetensors header and its first tensors; a GGUF header):
    enough to tell another checkpoint apart without reading gigabytes."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return {"size": path.stat().st_size, "head": head}


def model_fingerprint(directory: Path) -> dict:
    """Every weight and config file of a model directory, by name."""
    names = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".json", ".gguf", ".bin"))
    return {p.name: file_fingerprint(p) for p in names}


class WorkDir:
    """The committed state of a run (see the module docstring). ``rank``: this process's rank (its own inputs)."""

    def __init__(self, path: Path, fingerprint: dict, resume: bool, overwrite: bool, rank: int = 0,
                 writer: bool = True, barrier: Callable[[], None] | None = None) -> None:
        self.path, self.fingerprint, self.rank, self.writer = path, fingerprint, rank, writer
        self._barrier = barrier or (lambda: None)  # several ranks: rank 0 writes, every rank keeps its inputs
        self.done = 0
        self.tuned = False  # reads go to the tuned-* files (``use_tuned``)
        exists = (path / FINGERPRINT).is_file()
        if exists and not resume and not overwrite:
            raise TritonqError(
                f"{path} holds an interrupted run's finished blocks; pass --resume to continue it, or "
                "--overwrite to start again (or delete the directory)")
        self._barrier()  # every rank has looked before rank 0 changes anything
        if self.writer:
            if exists and not resume:
                shutil.rmtree(path)
            if not (exists and resume):
                path.mkdir(parents=True, exist_ok=True)
                _write_json(path / FINGERPRINT, fingerprint)
        self._barrier()
        if exists and resume:
            saved = json.loads((path / FINGERPRINT).read_text())
            differ = describe_difference(saved, fingerprint)
            if differ:
                raise TritonqError(f"--resume: {path} was written by another run ({differ}); run the same command "
                                   "again, or pass --overwrite instead of --resume to start over")
            progress = path / PROGRESS
            self.done = int(json.loads(progress.read_text())["done"]) if progress.is_file() else 0

    # -- names

    def _block(self, i: int, suffix: str) -> Path:
        tuned = self.tuned and suffix in (".safetensors", ".params.safetensors")
        return self.path / f"{'tuned' if tuned else 'block'}-{i:05d}{suffix}"

    def _inputs(self, i: int) -> Path:
        rank = f".rank{self.rank}" if self.rank else ""
        return self.path / f"inputs-{i:05d}{rank}.pt"

    # -- committing

    def commit_inputs(self, index: int, chunks: list[Chunk] | None) -> None:
        """The chunks entering block ``index`` (after the capture, or after block ``index - 1``)."""
        if chunks is None:
            return
        with atomic_file(self._inputs(index)) as tmp:
            torch.save([(c.hidden, c.kwargs, c.reference) for c in chunks], tmp)

    def commit_block(self, index: int, tensors: dict[str, Tensor], layers: dict[str, LayerResult],
                     record: dict, next_chunks: list[Chunk] | None) -> None:
        """Block ``index`` is finished: its tensors, its grids, its record, the next block's inputs, then the mark."""
        if self.writer:
            _save(self._block(index, ".safetensors"), tensors)
            params = {}
            for name, res in layers.items():
                params.update(grid_tensors(name, res.scale, res.zero, res.g_idx, res.spec))
            _save(self._block(index, ".params.safetensors"), params)
            _write_json(self._block(index, ".json"),
                        {"layers": {n: _jsonable(r.info) for n, r in layers.items()}, **record})
        self.commit_inputs(index + 1, next_chunks)
        self._barrier()  # every rank's inputs for the next block are on disk before the mark says so
        if self.writer:
            _write_json(self.path / PROGRESS, {"done": index + 1})
        self._barrier()  # and the mark is down before any rank lets go of the inputs it replaces
        self.done = index + 1
        old = self._inputs(index)
        if old.exists():
            old.unlink()

    def commit_tuned(self, settings: dict, blocks: dict[int, tuple[dict[str, Tensor], dict[str, LayerResult]]],
                     log: dict) -> None:
        """Every block's tuned tensors and grids (``blocks``: index -> (tensors, layers)), then ``tuned.json`` (with
        the tuning's ``log``); reads go to them from here on."""
        if self.writer:
            for index, (tensors, layers) in blocks.items():
                _save(self.path / f"tuned-{index:05d}.safetensors", tensors)
                params = {}
                for name, res in layers.items():
                    params.update(grid_tensors(name, res.scale, res.zero, res.g_idx, res.spec))
                _save(self.path / f"tuned-{index:05d}.params.safetensors", params)
            _write_json(self.path / TUNED, {"settings": settings, "blocks": sorted(blocks), "log": log})
        self._barrier()
        self.tuned = True

    def use_tuned(self, settings: dict) -> bool:
        """Read the tuned files from now on if a finished tuning with these ``settings`` left them (a resume)."""
        path = self.path / TUNED
        self.tuned = path.is_file() and json.loads(path.read_text())["settings"] == settings
        if path.is_file() and not self.tuned and self.writer:
            path.unlink()  # other settings: their files are rewritten, and must not pass for these meanwhile
        return self.tuned

    def tuned_log(self) -> dict:
        """The log of the tuning whose files are read (``use_tuned``)."""
        return json.loads((self.path / TUNED).read_text())["log"]

    # -- reading back

    def inputs(self, index: int) -> list[Chunk] | None:
        path = self._inputs(index)
        if not path.is_file():
            return None
        return [Chunk(*saved) for saved in torch.load(path, weights_only=False)]  # (hidden, kwargs[, reference])

    def block_record(self, index: int) -> dict:
        return json.loads(self._block(index, ".json").read_text())

    def block_tensors(self, index: int, keys: list[str] | None = None) -> dict[str, Tensor]:
        with safe_open(str(self._block(index, ".safetensors")), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}

    def layer_params(self, index: int, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(scale, zero, g_idx)`` of quantized linear ``name`` of block ``index``."""
        with safe_open(str(self._block(index, ".params.safetensors")), framework="pt") as f:
            return f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.zero"), f.get_tensor(f"{name}.g_idx")

    def layer_spec(self, index: int, name: str, run: GridSpec) -> GridSpec:
        with safe_open(str(self._block(index, ".params.safetensors")), framework="pt") as f:
            return grid_from_tensor(name, f.get_tensor(f"{name}.{GRID_LEAF}"), run)

    def remove(self) -> None:
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)


def describe_difference(saved: dict, now: dict, prefix: str = "") -> str:
    """What differs between two fingerprints, as ``key: old -> new`` items (at most four)."""
    items = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_difference(a, b, f"{prefix}{key}.")
            items.append(inner)
        else:
            items.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return "; ".join(i for i in items if i)[:600]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(info: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, int)) and not isinstance(v, bool) else v)
            for k, v in info.items() if isinstance(v, (bool, int, float, str, type(None)))}


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file written atomically, a tensor at a time (the streaming writer: no serialised copy)."""
    with atomic_file(path) as tmp:
        writer = ShardedWriter(tmp.parent, metadata=None, filename=tmp.name)
        writer.update(tensors)
        writer.close()


def _write_json(path: Path, content: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
