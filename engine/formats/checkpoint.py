"""What every writer writes from: a quantized model as grids per layer plus float tensors, in memory or on disk.

A :class:`Checkpoint` gives a writer, one layer at a time, the integer record of each quantized linear
(rebuilt from its grid parameters and its fake-quantized float weight, bit exactly, by
:meth:`QuantizedWeight.from_grid`), every other float tensor, ``config.json`` and the files that travel with
the model (tokenizer, generation config). Two sources exist:

* :class:`RunCheckpoint`: the run of ``tritonq quantize`` that just finished: its blocks from the run's work
  directory (``engine/workdir.py``), every other tensor from the model's weights (in memory, or streamed from
  the checkpoint's shards), one tensor at a time. Tensors and config are the ones ``save_pretrained`` would
  write, in the checkpoint's dtype.
* :class:`FakeDirectory`: a ``tritonq quantize --format fake`` output on disk (``tritonq pack``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ...errors import TritonqError
from ..adapters import block_index
from ..grid import GridSpec
from ..outputs import QUANT_JSON, read_json_object, read_quantization_json
from .records import (
    GRID_LEAF,
    QUANT_PARAMS,
    QuantizedWeight,
    check_layer,
    default_g_idx,
    grid_from_tensor,
    grid_tensor,
)
from .store import WEIGHTS_FILE, ShardedWriter, TensorStore

_SKIP_COPY = {QUANT_JSON, QUANT_PARAMS, "config.json", WEIGHTS_FILE, f"{WEIGHTS_FILE}.index.json"}


class Checkpoint:
    """A quantized model as writers see it. ``grids``: every quantized linear (sorted) -> its grid."""

    config: dict  # config.json content
    meta: dict  # quantization.json content
    grids: dict[str, GridSpec]
    label: str  # a name for the model when quantization.json has none
    _keys: set[str] | None = None

    def config_text(self) -> str:
        """``config.json`` of the fake-quantized model, byte for byte."""
        return json.dumps(self.config, indent=2, sort_keys=True) + "\n"

    def float_keys(self) -> list[str]:
        """Every tensor of the fake-quantized checkpoint (the quantized linears' float weights included)."""
        raise NotImplementedError

    def tensor(self, key: str) -> Tensor:
        raise NotImplementedError

    def params(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(scale [N, G], zero [N, G], g_idx [K])`` of a quantized linear, fp32 / int32."""
        raise NotImplementedError

    def record(self, name: str) -> QuantizedWeight:
        """The integer record of one quantized linear, rebuilt bit exactly from its grid and its float weight."""
        scale, zero, g_idx = self.params(name)
        keys = self._key_set()
        bias = self.tensor(f"{name}.bias") if f"{name}.bias" in keys else None
        weight = self.tensor(f"{name}.weight")
        return QuantizedWeight.from_grid(name, weight, scale, zero, g_idx, self.grids[name], bias)

    def write_side_files(self, out: Path) -> None:
        """Tokenizer, generation config and any other file that travels with the weights."""
        raise NotImplementedError

    def vocabulary_dir(self, scratch: Path) -> Path:
        """A directory holding the tokenizer files and ``config.json`` (GGUF reads its vocabulary there)."""
        raise NotImplementedError

    def _key_set(self) -> set[str]:
        if self._keys is None:
            self._keys = set(self.float_keys())
        return self._keys


def hf_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors ``model.save_pretrained`` writes: the state dict without tied aliases, conversions reverted."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return revert_weight_conversion(model, state)


class RunCheckpoint(Checkpoint):
    """The output of a quantize run as it streams: the finished blocks from the run's work directory
    (``engine/workdir.py``), every other tensor from the model's weights source (``engine/streaming.py``: a model
    in memory, or the checkpoint's shards on disk), each in the dtype the checkpoint stores it in. One tensor is
    in memory at a time; nothing holds the whole model. ``layers``: each quantized linear's result (its grid)."""

    def __init__(self, weights, work, blocks: str, tokenizer, layers: Mapping, meta: dict, run_spec: GridSpec) -> None:
        model = weights.model
        # what save_pretrained records before writing the config (transformers modeling_utils.save_pretrained)
        model.config.dtype = str(weights.output_dtype()).split(".")[1]
        model.config.architectures = [type(model).__name__]
        self.weights, self.work, self.tokenizer, self.meta = weights, work, tokenizer, meta
        self.label = str(meta.get("model", "model"))
        self._blocks = blocks
        self._config_text = model.config.to_json_string(use_diff=True)
        self.config = json.loads(self._config_text)
        self.grids = {name: layers[name].spec or run_spec for name in sorted(layers)}

    def _block_of(self, key: str) -> int | None:
        return block_index(key, self._blocks)

    def config_text(self) -> str:
        return self._config_text

    def float_keys(self) -> list[str]:
        return self.weights.output_keys()

    def tensor(self, key: str) -> Tensor:
        index = self._block_of(key)
        return self.weights.tensor(key) if index is None else self.work.block_tensors(index, [key])[key]

    def params(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        scale, zero, g_idx = self.work.layer_params(self._block_of(name), name)
        return scale.float(), zero.float(), g_idx.to(torch.int32)

    def write_side_files(self, out: Path) -> None:
        self.tokenizer.save_pretrained(out)
        model = self.weights.model
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(out)

    def vocabulary_dir(self, scratch: Path) -> Path:
        scratch.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(scratch)
        (scratch / "config.json").write_text(self._config_text)
        return scratch


def read_source(src_dir: str | os.PathLike) -> tuple[dict, GridSpec, dict]:
    """Read a ``tritonq quantize`` output: (config.json dict, the run's grid, quantization.json dict)."""
    src = Path(src_dir)
    cfg_file = src / "config.json"
    if cfg_file.is_file() and "quantization_config" in read_json_object(cfg_file, "restore its config.json"):
        raise TritonqError(
            f"{src} is already a packed checkpoint; pack reads the fake-quantized output of 'tritonq quantize'"
        )
    for f in ("config.json", QUANT_JSON, QUANT_PARAMS):
        if not (src / f).is_file():
            raise TritonqError(
                f"{src} has no {f}; pass a directory written by 'tritonq quantize' (--format fake)"
            )
    meta = read_quantization_json(src / QUANT_JSON)
    for key in ("bits", "group_size", "sym", "layers"):
        if key not in meta:
            raise TritonqError(f"{src / QUANT_JSON} lacks {key!r}; re-run 'tritonq quantize'")
    spec = GridSpec(int(meta["bits"]), int(meta["group_size"]), bool(meta["sym"]), bool(meta.get("mse", False)))
    config = read_json_object(src / "config.json", "restore its config.json")
    return config, spec, meta


def layer_grids(params: TensorStore, names: list[str], run: GridSpec) -> dict[str, GridSpec]:
    """The grid of every layer from ``quant_params.safetensors``; files written before per-layer grids hold
    none, and then every layer has the run's grid."""
    grids = {}
    for name in names:
        t = params.maybe(f"{name}.{GRID_LEAF}")
        grids[name] = run if t is None else grid_from_tensor(name, t, run)
    return grids


class FakeDirectory(Checkpoint):
    """A ``tritonq quantize --format fake`` output on disk. ``layers``: records the caller already holds
    (validated against each layer's grid), otherwise they are rebuilt from ``quant_params.safetensors``."""

    def __init__(self, src_dir: str | os.PathLike, layers: Mapping[str, QuantizedWeight] | None = None) -> None:
        self.dir = Path(src_dir)
        self.label = self.dir.name
        self.config, run, self.meta = read_source(self.dir)
        names = sorted(self.meta["layers"])
        self._params = TensorStore(self.dir, QUANT_PARAMS)
        self.grids = layer_grids(self._params, names, run)
        self._weights = TensorStore(self.dir)
        self._given = layers
        if layers is not None and set(layers) != set(names):
            extra = sorted(set(layers) ^ set(names))
            raise TritonqError(
                f"the records passed to save_packed and {self.dir / QUANT_JSON} name different layers (e.g. "
                f"{extra[0]}); pass the records of the run that wrote {self.dir}"
            )

    def float_keys(self) -> list[str]:
        return self._weights.keys()

    def tensor(self, key: str) -> Tensor:
        return self._weights.get(key)

    def params(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        if self._given is not None:
            q = self._given[name]
            return q.scale, q.zero, q.g_idx
        k = self._weights.get(f"{name}.weight", "quantized linear weight").shape[-1]
        g_idx = self._params.maybe(f"{name}.g_idx")
        if g_idx is None:
            g_idx = default_g_idx(k, self.grids[name].effective_group(k))
        return (self._params.get(f"{name}.scale", "scale").float(), self._params.get(f"{name}.zero", "zero point"),
                g_idx.to(torch.int32))

    def record(self, name: str) -> QuantizedWeight:
        if self._given is None:
            return super().record(name)
        q = self._given[name]
        check_layer(name, q, self.grids[name])
        return q

    def write_side_files(self, out: Path) -> None:
        for f in self.dir.iterdir():
            if f.is_file() and f.name not in _SKIP_COPY and not f.name.endswith(".safetensors"):
                shutil.copy2(f, out / f.name)

    def vocabulary_dir(self, scratch: Path) -> Path:
        return self.dir


def source_layers(src_dir: str | os.PathLike, spec: GridSpec,
                  layers: list[str]) -> Iterator[tuple[str, QuantizedWeight]]:
    """The integer record of every named quantized linear of a tritonq output (each on its own grid when the
    file records one, else on ``spec``), rebuilt bit exactly."""
    ckpt = FakeDirectory(src_dir)
    for name in layers:
        if name not in ckpt.grids:
            ckpt.grids[name] = spec
        yield name, ckpt.record(name)


def grid_tensors(name: str, scale: Tensor, zero: Tensor, g_idx: Tensor, spec: GridSpec) -> dict[str, Tensor]:
    """The ``quant_params.safetensors`` entries of one quantized linear: scale and zero (fp32), g_idx (int32) and
    its grid (``<name>.grid``)."""
    return {f"{name}.scale": scale.float(), f"{name}.zero": zero.float(), f"{name}.g_idx": g_idx.to(torch.int32),
            f"{name}.{GRID_LEAF}": grid_tensor(spec)}


def write_quant_params(path: Path, ckpt: Checkpoint) -> None:
    """``quant_params.safetensors``: per quantized linear its scale, zero, g_idx and grid (``<name>.grid``), written
    as they are read (one layer's in memory: 4 GB of grids for a 70B model never sit in RAM together)."""
    writer = ShardedWriter(path.parent, metadata=None, filename=path.name)  # as save_file(tensors, path) writes
    for name, spec in ckpt.grids.items():
        writer.update(grid_tensors(name, *ckpt.params(name), spec))
    writer.close()
