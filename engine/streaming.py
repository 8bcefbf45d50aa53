"""Where the pipeline's weights come from: a model held in memory, or a checkpoint streamed from disk.

:class:`StreamedModel` builds the model's skeleton on the meta device from its config (no weight allocated),
and fills one module at a time from the safetensors shards when the pipeline reaches it: a decoder block when
it is quantized, the embeddings while the calibration inputs are captured, the final norm and ``lm_head``
while the quantized model is evaluated. Each load opens the shard, copies the module's tensors out and closes
it again, so mapped pages never pile up in the process's resident memory, and ``release`` puts the module
back on the meta device. This is the "sequential onloading" of llm-compressor and GPTQModel's meta-device
shell filled from shards; auto-round's ``AR_DISK_STREAM_MODEL`` does the same.

:class:`InMemoryModel` is the same interface over a model loaded whole (a GGUF file such as the built-in
default, a checkpoint without safetensors, or a method whose ``prepare`` transforms the whole model first).

Both say which dtype each tensor of the output keeps (``storage_dtype``): the checkpoint's own, so a bf16
checkpoint gives a bf16 output whatever dtype the computation runs in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from torch import Tensor

from ..errors import TritonqError
from .formats.checkpoint import hf_state_dict
from .formats.store import read_header, stored_dtype, tensor_files


class ModelWeights:
    """The interface the pipeline, the final writer and the evaluation use; see the module docstring."""

    model: nn.Module
    streamed: bool

    def load(self, name: str, device: torch.device, tensors: dict[str, Tensor] | None = None) -> nn.Module:
        """Module ``name`` of the model with its weights on ``device``; ``tensors`` (full names) in place of the
        model's own (a quantized block read back from the work directory)."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Done with module ``name`` for now (freed when streamed, back to the CPU otherwise)."""
        raise NotImplementedError

    def storage_dtype(self, key: str) -> torch.dtype:
        """The dtype tensor ``key`` keeps in the output (the checkpoint's)."""
        raise NotImplementedError

    def tensor(self, key: str) -> Tensor:
        """Tensor ``key`` of the model as the output stores it (CPU, ``storage_dtype``)."""
        raise NotImplementedError

    def output_keys(self) -> list[str]:
        """Every tensor ``save_pretrained`` writes for this model (tied aliases removed)."""
        raise NotImplementedError

    def output_dtype(self) -> torch.dtype:
        """The dtype ``config.json`` records for the output."""
        raise NotImplementedError


class InMemoryModel(ModelWeights):
    """A model loaded whole on the CPU; blocks visit the compute device one at a time."""

    streamed = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state: dict[str, Tensor] | None = None

    def load(self, name: str, device: torch.device, tensors: dict[str, Tensor] | None = None) -> nn.Module:
        module = self.model.get_submodule(name)
        if tensors is not None:
            with torch.no_grad():
                for key, t in module.state_dict(prefix=f"{name}.").items():
                    t.copy_(tensors[key])
        return module.to(device)

    def release(self, name: str) -> None:
        self.model.get_submodule(name).to("cpu")

    def _output_state(self) -> dict[str, Tensor]:
        if self._state is None:  # views of the model's own tensors: nothing is copied
            self._state = hf_state_dict(self.model)
        return self._state

    def storage_dtype(self, key: str) -> torch.dtype:
        return self._output_state()[key].dtype

    def tensor(self, key: str) -> Tensor:
        return self._output_state()[key].cpu()

    def output_keys(self) -> list[str]:
        return list(self._output_state())

    def output_dtype(self) -> torch.dtype:
        return self.model.dtype


class StreamedModel(ModelWeights):
    """A safetensors checkpoint on disk behind a meta-device skeleton (see the module docstring)."""

    streamed = True

    def __init__(self, directory: Path, files: dict[str, Path], config, dtype: torch.dtype,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.dir, self.files, self.dtype = directory, files, dtype
        config.use_cache = False
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        if (directory / "generation_config.json").is_file():  # as from_pretrained reads it
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(directory)
        self._rebuild_buffers()
        self._headers: dict[Path, tuple[int, dict]] = {}
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._prefix = f"{prefix}." if prefix else ""
        # parameters shared by several names (tied embeddings): every alias reads the first name's tensor
        self._alias: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            self._alias[name] = first.setdefault(id(param), name)
        self._output_keys = list(hf_state_dict(self.model))
        self._check_complete()

    # -- construction

    def _rebuild_buffers(self) -> None:
        """Buffers computed at construction (the rotary embedding's frequencies) are not in the checkpoint:
        build the modules that hold them again on the CPU, for real."""
        for name, module in list(self.model.named_modules()):
            own = [b for b in module._buffers.values() if b is not None and b.is_meta]
            if not own:
                continue
            if any(True for _ in module.parameters(recurse=False)):
                raise TritonqError(f"module {name} of {type(self.model).__name__} holds both weights and computed "
                                   "buffers; streaming cannot rebuild it. Quantize it from memory (a GGUF file, or "
                                   "a checkpoint without safetensors, loads whole)")
            try:
                rebuilt = type(module)(config=getattr(module, "config", self.model.config))
            except TypeError as exc:
                raise TritonqError(f"cannot rebuild {name} ({type(module).__name__}: {exc}) outside the meta "
                                   "device; this architecture cannot be streamed from disk") from None
            parent_name, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, leaf, rebuilt)

    def _checkpoint_key(self, key: str) -> str:
        key = self._alias.get(key, key)
        for candidate in (key, key.removeprefix(self._prefix)):
            if candidate in self.files:
                return candidate
        raise TritonqError(f"tensor {key!r} of {type(self.model).__name__} is not in the checkpoint {self.dir}; "
                           "the checkpoint does not match its config.json (download or save it again)")

    def _check_complete(self) -> None:
        """Every parameter has a tensor in the checkpoint: fail before calibration, not at block 30."""
        for name, _ in self.model.named_parameters():
            self._checkpoint_key(name)

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    # -- the interface

    def _read(self, keys: list[str]) -> dict[str, Tensor]:
        """Checkpoint tensors by model key, in their stored dtype; each shard opened once and closed after."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key in keys:
            ckpt_key = self._checkpoint_key(key)
            by_file.setdefault(self.files[ckpt_key], []).append((key, ckpt_key))
        out = {}
        for path, pairs in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key, ckpt_key in pairs:
                    out[key] = f.get_tensor(ckpt_key)
        return out

    def load(self, name: str, device: torch.device, tensors: dict[str, Tensor] | None = None) -> nn.Module:
        module = self.model.get_submodule(name)
        params = dict(module.named_parameters(prefix=name, remove_duplicate=False))
        for key, value in (tensors if tensors is not None else self._read(list(params))).items():
            _set_parameter(self.model, key, value.to(device=device, dtype=params[key].dtype))
        _move_buffers(module, device)
        return module

    def release(self, name: str) -> None:
        module = self.model.get_submodule(name)
        for key, param in list(module.named_parameters(prefix=name, remove_duplicate=False)):
            _set_parameter(self.model, key, torch.empty(param.shape, dtype=param.dtype, device="meta"))
        _move_buffers(module, torch.device("cpu"))

    def storage_dtype(self, key: str) -> torch.dtype:
        ckpt_key = self._checkpoint_key(key)
        path = self.files[ckpt_key]
        return stored_dtype(path, ckpt_key, self._header(path))

    def tensor(self, key: str) -> Tensor:
        return self._read([key])[key]

    def output_keys(self) -> list[str]:
        return list(self._output_keys)

    def output_dtype(self) -> torch.dtype:
        embedding = self.model.get_input_embeddings()
        name = next(n for n, p in self.model.named_parameters() if p is embedding.weight)
        return self.storage_dtype(name)


def as_weights(model: ModelWeights | nn.Module) -> ModelWeights:
    """A model given whole (the Python API, tests) is an :class:`InMemoryModel`."""
    return model if isinstance(model, ModelWeights) else InMemoryModel(model)


def _set_parameter(model: nn.Module, key: str, value: Tensor) -> None:
    """Put ``value`` in place of parameter ``key`` (no gradient: the pipeline quantizes under no_grad)."""
    parent_name, _, leaf = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for key, buf in sub._buffers.items():
            if buf is not None and not buf.is_meta:
                sub._buffers[key] = buf.to(device)


def streamable_directory(name: str) -> Path | None:
    """The local directory of safetensors weights behind model ``name`` (a directory, or a hub id already in the
    cache or downloadable), or None when it has none (the built-in GGUF default, ``.bin`` weights)."""
    from .model_io import SMOLLM2_NAME, resolve_model

    if name == SMOLLM2_NAME:
        return None
    source = resolve_model(name)
    path = Path(source.src)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        from .model_io import quiet_hub

        try:
            with quiet_hub():
                path = Path(snapshot_download(source.src, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt", "*.tiktoken"],
                                              local_files_only=bool(source.kwargs.get("local_files_only"))))
        except Exception:  # noqa: BLE001 - no snapshot: load whole through transformers, which reports the cause
            return None
    if tensor_files(path) is None:
        return None
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config"):  # packed weights: transformers' loader dequantizes them
        return None
    return path


def open_weights(name: str, dtype: torch.dtype, trust_remote_code: bool = False, stream: bool | None = None,
                 whole_model: bool = False) -> ModelWeights:
    """The weights of model ``name``: streamed from its safetensors shards when it has them (``stream`` None or
    True), else loaded whole. ``whole_model``: the method transforms the whole model first (``Method.prepare``),
    which needs it in memory."""
    from .model_io import load_config, load_model

    directory = None if stream is False or whole_model else streamable_directory(name)
    if directory is None:
        if stream:
            why = ("the method transforms the whole model before calibration" if whole_model else
                   "it has no safetensors weights (a GGUF file or .bin weights load whole)")
            raise TritonqError(f"model {name!r} cannot be streamed from disk: {why}")
        return InMemoryModel(load_model(name, dtype, trust_remote_code))
    config = load_config(str(directory), trust_remote_code)
    return StreamedModel(directory, tensor_files(directory), config, dtype, trust_remote_code)


def model_files_fingerprint(name: str) -> dict:
    """The files behind model ``name`` (names, sizes, a hash of each file's head): what ``--resume`` compares."""
    from .model_io import SMOLLM2_GGUF, SMOLLM2_NAME, smollm2_dir
    from .workdir import file_fingerprint, model_fingerprint

    if name == SMOLLM2_NAME:
        directory = smollm2_dir()
        return {} if directory is None else {SMOLLM2_GGUF: file_fingerprint(directory / SMOLLM2_GGUF)}
    local = Path(name).expanduser()
    directory = local if local.is_dir() else streamable_directory(name)
    return {"hub": name} if directory is None else model_fingerprint(directory)
