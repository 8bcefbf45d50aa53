"""Model-free RTN: a data-free method on a safetensors checkpoint, shard in, packed shard out, no model built.

Round-to-nearest needs nothing but each linear's weight, so there is no reason to build the model (auto-round's
model-free RTN did Qwen3-235B W4A16 at 2 GB peak; issue 21 item 3). :func:`quantize_model_free` reads the config,
finds the quantized linears exactly as the pipeline does (a meta skeleton, the adapter, ``preflight``'s
per-layer grids), and hands the output format a :class:`ShardCheckpoint`: a lazy
:class:`~tritonq.engine.formats.checkpoint.Checkpoint` whose tensors are read one at a time from the source
shards, and whose quantized linears are rounded on demand by ``methods/rtn.round_to_nearest`` (the function the
pipeline's RTN calls, so the grids, codes and weights are identical). Every format writes from it unchanged.

Memory: one layer being written plus at most ``workers`` layers computed ahead in a thread pool (torch releases
the GIL), each rounded a few rows at a time. Tensors are read with plain file reads, not through a
memory map, because a mapped shard's touched pages count in the RSS while the mapping lives.

The float tensors keep the checkpoint's dtype, each its own, as the pipeline's streamed output does; ``--dtype``
is the dtype the weights are rounded in (after the pipeline's load into it), so for the same flags the output is
byte-identical to the pipeline's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import __version__
from ..errors import TritonqError
from ..kernels.grid_rule import quantize_codes
from .formats.checkpoint import Checkpoint, hf_state_dict
from .formats.records import QuantizedWeight, check_layer
from .formats.store import read_header, read_tensor, stored_dtype, tensor_files
from .grid import GridSpec, dequantize
from .methods.base import Method
from .methods.rtn import RTN, round_to_nearest
from .streaming import streamable_directory

if TYPE_CHECKING:
    from .preflight import Preflight

PARAMS_KEPT_BY = ("fake", "gguf")  # formats that ask every layer's grid parameters again after its weight


def applies(method: Method, run: Preflight, model: str) -> Path | None:
    """The source directory when the run can be model-free: a data-free method with no model-level step whose
    linears are rounded by RTN's own ``quantize`` (any grid: ``--mse``, per-layer ``layer_grid``), no activation
    quantization, on safetensors shards. None sends the run through the pipeline."""
    kind = type(method)
    if (method.calibrated or kind.prepare is not Method.prepare or kind.scope != "group"
            or not isinstance(method, RTN) or kind.quantize is not RTN.quantize or run.act is not None):
        return None
    return streamable_directory(model)  # the streamed pipeline's own test: safetensors, not packed


class _Layer(NamedTuple):
    codes: Tensor  # uint8 [N, K]: the codes QuantizedWeight.from_grid finds in the fake-quantized weight
    scale: Tensor  # fp32 [N, G]
    zero: Tensor  # fp32 [N, G]
    g_idx: Tensor  # int32 [K]
    seconds: float  # time the rounding took (in a worker)


ELEMENTS_PER_STEP = 1 << 22  # weights read and rounded at a time, whole rows (RTN is per row: same bits, and
# the temporaries of a step -- fp32 copies, gathered scales, codes -- stay near 100 MB whatever the layer's width)


class ShardCheckpoint(Checkpoint):
    """A checkpoint directory of safetensors shards, quantized with RTN layer by layer as a writer asks.

    ``grids``: every quantized linear -> its grid (``preflight``); ``dtype``: the float dtype of the output
    (None: the checkpoint's); ``workers``: threads rounding the next layers ahead of the writer (at most that
    many layers ahead); ``keep_params``: keep every layer's (scale, zero, g_idx) once computed, for the writers
    that ask for them again after the weights (fake, GGUF). Layers are rounded ahead in the order the writer
    asks: the fake writer's tensor order with ``keep_params``, else the packed writers' (sorted) order."""

    def __init__(self, directory: Path, config: Any, grids: dict[str, GridSpec], meta: dict, tokenizer: Any,
                 compute_dtype: torch.dtype = torch.float32, workers: int = 1, keep_params: bool = False,
                 progress: bool = True) -> None:
        from transformers import AutoModelForCausalLM

        self.dir, self.grids, self.meta, self.tokenizer = directory, grids, meta, tokenizer
        self.label = str(meta.get("model", directory.name))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        self._names = list(hf_state_dict(skeleton))  # the tensors save_pretrained writes, tied aliases dropped
        self._file_of = tensor_files(directory)
        self._headers: dict[Path, tuple[int, dict]] = {}  # per shard: where its data starts, its header
        missing = [k for k in self._names if k not in self._file_of]
        if missing:
            raise TritonqError(f"{directory} has no tensor {missing[0]!r} ({len(missing)} missing); model-free "
                               "quantization reads checkpoints written by save_pretrained -- re-save it so")
        first = f"{next(iter(grids))}.weight" if grids else self._names[0]
        self.dtype = _stored_dtype(self._file_of[first], first)  # what config.json records
        self.compute_dtype = compute_dtype
        self._can_generate = skeleton.can_generate()
        # what load_model and save_pretrained record before the config is written (ModelCheckpoint does the same)
        config.use_cache = False
        config.dtype = str(self.dtype).split(".")[1]
        config.architectures = [type(skeleton).__name__]
        self._hf_config = config
        self._config_text = config.to_json_string(use_diff=True)
        self.config = json.loads(self._config_text)
        del skeleton
        self.workers = max(1, workers)
        weights = {f"{n}.weight": n for n in grids}
        self._order = ([weights[k] for k in self._names if k in weights] if keep_params else list(grids))
        self._pos = {name: i for i, name in enumerate(self._order)}
        # workers round the next layers while this thread packs and writes (torch releases the GIL)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tritonq-rtn")
        self._ahead: dict[str, Future] = {}
        self._current: tuple[str, _Layer] | None = None
        self._kept: dict[str, tuple[Tensor, Tensor, Tensor]] | None = {} if keep_params else None
        self._done: set[str] = set()
        self.rounding_seconds = 0.0  # time spent in _compute, summed over the workers
        self._bar = tqdm(total=len(grids), desc="rtn layers (model-free)", unit="layer", disable=not progress)

    # ---- the Checkpoint interface

    def config_text(self) -> str:
        return self._config_text

    def float_keys(self) -> list[str]:
        return list(self._names)

    def tensor(self, key: str) -> Tensor:
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in self.grids:  # only the fake format asks: its grid points, in dtype
            layer = self._layer(module)
            # scale * (codes - zero): the operations of RTN's fake_quantize on the same values, so the same bits
            stored = _stored_dtype(self._file_of[key], key)
            return dequantize(layer.codes, layer.scale, layer.zero, layer.g_idx).to(stored)
        return self._read(key)

    def params(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        if self._kept is not None and name in self._kept:
            return self._kept[name]
        layer = self._layer(name)
        return layer.scale, layer.zero, layer.g_idx

    def record(self, name: str) -> QuantizedWeight:
        """The record straight from the rounding (computed ahead, in the workers): the codes ``from_grid``
        would recover from the weight, without its second pass over the weight (tests check they agree)."""
        layer = self._layer(name)
        bias = self.tensor(f"{name}.bias") if f"{name}.bias" in self._key_set() else None
        q = QuantizedWeight(layer.codes, layer.scale, layer.zero, layer.g_idx, bias)
        check_layer(name, q, self.grids[name])
        return q

    def write_side_files(self, out: Path) -> None:
        self.tokenizer.save_pretrained(out)
        if self._can_generate:
            from transformers import GenerationConfig

            if (self.dir / "generation_config.json").is_file():
                gen = GenerationConfig.from_pretrained(self.dir)
            else:
                gen = GenerationConfig.from_model_config(self._hf_config)
            gen.save_pretrained(out)

    def vocabulary_dir(self, scratch: Path) -> Path:
        scratch.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(scratch)
        (scratch / "config.json").write_text(self._config_text)
        return scratch

    def close(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._ahead.clear()
        self._current = None
        self._bar.close()

    # ---- reading and rounding

    def _read(self, key: str, rows: slice | None = None) -> Tensor:
        # plain file reads, no memory map: the RSS holds what was read, never the mapped pages of a shard
        path = self._file_of[key]
        header = self._headers.get(path)
        if header is None:
            header = self._headers[path] = read_header(path)
        return read_tensor(path, key, header, rows)

    def _shape(self, key: str) -> list[int]:
        path = self._file_of[key]
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return list(self._headers[path][1][key]["shape"])

    def _compute(self, name: str) -> _Layer:
        """RTN of one linear, ``ELEMENTS_PER_STEP`` weights (whole rows) at a time, to codes (in a worker)."""
        t0 = time.perf_counter()
        spec, key = self.grids[name], f"{name}.weight"
        n, k = self._shape(key)
        g = spec.effective_group(k)
        groups = spec.groups_for(k, name)
        codes = torch.empty(n, k, dtype=torch.uint8)
        scale, zero = torch.empty(n, groups), torch.empty(n, groups)
        g_idx = torch.empty(k, dtype=torch.int32)
        step_rows = max(1, ELEMENTS_PER_STEP // k)
        for start in range(0, n, step_rows):
            rows = slice(start, min(n, start + step_rows))
            w = self._read(key, rows).to(self.compute_dtype)  # the weight as the pipeline's model holds it
            res = round_to_nearest(w.float(), spec, name)
            scale[rows], zero[rows], g_idx = res.scale, res.zero, res.g_idx.to(torch.int32)
            # the codes of the fp32 grid points on the [rows, G, g] view (no [rows, K] gathers); the dtype's
            # rounding of a point moves it by far less than half a step, so from_grid finds the same codes
            step = quantize_codes(res.weight.view(-1, groups, g), scale[rows, :, None], zero[rows, :, None],
                                  spec.maxq)
            codes[rows] = step.view(-1, k)
        return _Layer(codes, scale, zero, g_idx, time.perf_counter() - t0)

    def _layer(self, name: str) -> _Layer:
        """One layer's RTN result: the current one, one computed ahead, or computed now; then queue the next."""
        if self._current is not None and self._current[0] == name:
            return self._current[1]
        self._current = None  # drop the previous layer before this one is computed
        fut = self._ahead.pop(name, None) or self._pool.submit(self._compute, name)
        pos = self._pos.get(name)
        wanted = set() if pos is None else set(self._order[pos + 1:pos + 1 + self.workers])
        for stale in [n for n in self._ahead if n not in wanted]:  # the writer went elsewhere
            self._ahead.pop(stale).cancel()
        for nxt in sorted(wanted - self._ahead.keys() - self._done, key=self._pos.__getitem__):
            self._ahead[nxt] = self._pool.submit(self._compute, nxt)
        layer = fut.result()
        self._current = (name, layer)
        if self._kept is not None:
            self._kept[name] = (layer.scale, layer.zero, layer.g_idx)
        if name not in self._done:
            self._done.add(name)
            self.rounding_seconds += layer.seconds
            self._bar.update(1)
        return layer


def _stored_dtype(path: Path, key: str) -> torch.dtype:
    dtype = stored_dtype(path, key)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TritonqError(f"{path}: {key} is stored as {dtype}, not a float; model-free RTN quantizes float weights")
    return dtype


def quantize_model_free(opts: Any, run: Preflight, source: Path, tokenizer: Any,
                        seconds: dict[str, float], started: float, eval_windows: Tensor | None = None) -> dict:
    """Quantize ``source`` with ``run.method`` (data-free) into ``opts.output``, building no model; evaluate
    the written output on ``eval_windows``. ``opts``: :class:`tritonq.engine.api.QuantizeOptions`; returns the
    fields of the run's ``QuantizeSummary``."""
    from .data import check_positive
    from .formats.head import with_quantized_head
    from .formats.registry import get_format
    from .memory_peak import host_peak_bytes
    from .model_io import load_config, resolve_dtype
    from .outputs import atomic_output_dir

    check_positive(opts.workers, "--workers", 2)
    t0 = time.perf_counter()
    method, spec = run.method, run.spec
    compute_dtype = resolve_dtype(opts.dtype, torch.device("cpu"))
    meta = {
        "method": method.name, **method.describe(), "bits": spec.bits, "group_size": spec.group_size,
        "sym": spec.sym, "mse": spec.mse, "activations": None, "model": opts.model,
        "architecture": run.adapter.family, "dtype": None, "compute_dtype": None, "device": "cpu",
        "calibration": None,
        "tritonq_version": __version__, "layers": sorted(run.grids), "seconds": {}, "model_free": True,
    }
    ckpt = ShardCheckpoint(source, load_config(opts.model, opts.trust_remote_code), dict(sorted(run.grids.items())),
                           meta, tokenizer, compute_dtype, opts.workers, opts.out_format in PARAMS_KEPT_BY,
                           opts.progress)
    meta["dtype"] = str(ckpt.dtype).replace("torch.", "")
    meta["compute_dtype"] = str(compute_dtype).replace("torch.", "")
    seconds["load"] = time.perf_counter() - t0  # config, skeleton and index: no weights
    try:
        with atomic_output_dir(opts.output, opts.overwrite) as tmp:
            t0 = time.perf_counter()
            fmt = get_format(opts.out_format)
            fmt.write(with_quantized_head(ckpt, opts.quantize_head, run.adapter, fmt), tmp)
            # rounding (summed over the workers) overlaps the writing: "save" is the wall time of both
            seconds["quantize_total"] = ckpt.rounding_seconds
            seconds["save"] = time.perf_counter() - t0
            # the stage times and the peak are known only once the record is written, so it is rewritten
            memory = {"weights": "model-free (shards in, shards out)", "host_peak_mb":
                      round(host_peak_bytes() / 2**20, 1), "device_peak_mb": 0.0, "per_block": []}
            _rewrite_record(tmp, {k: round(v, 3) for k, v in seconds.items()}, memory)
    finally:
        ckpt.close()
    summary = {"output": str(Path(opts.output).resolve()), "seconds": seconds, "layers": len(run.grids),
               "group_size": spec.group_size, "memory": memory}
    if eval_windows is not None:
        summary["perplexity"], summary["eval_windows"] = _evaluate_output(opts, eval_windows, seconds)
    seconds["total"] = time.perf_counter() - started
    return summary


def _rewrite_record(out: Path, stage_seconds: dict, memory: dict) -> None:
    from .outputs import QUANT_JSON

    path = out / QUANT_JSON
    if path.is_file():
        record = json.loads(path.read_text())
        record["seconds"] = {**record.get("seconds", {}), **stage_seconds}
        record["memory"] = memory  # the process's peak (quantize runs record theirs per block)
        path.write_text(json.dumps(record, indent=2) + "\n")


def _evaluate_output(opts: Any, windows: Tensor, seconds: dict[str, float]) -> tuple[float, int]:
    """Perplexity of the written output: a packed one runs packed (``load_packed_model``), a fake one loads as
    a float model (whole, in the checkpoint's dtype: fine for small models, not for big ones)."""
    from .evaluation.perplexity import perplexity
    from .evaluation.report import PERPLEXITY, perplexity_label, record_evaluation
    from .model_io import load_model, resolve_device, resolve_dtype
    from .runtime.serve import is_packed_checkpoint, load_packed_model

    t0 = time.perf_counter()
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if is_packed_checkpoint(opts.output):
        model, _ = load_packed_model(opts.output, device=str(device), dtype=str(dtype).replace("torch.", ""))
    else:
        model = load_model(opts.output, dtype, opts.trust_remote_code)
    result = perplexity(model, windows, device, progress=opts.progress)
    del model
    seconds["eval"] = time.perf_counter() - t0
    record_evaluation(opts.output, PERPLEXITY, perplexity_label(opts.eval_data, result.windows, result.seqlen),
                      {**dataclasses.asdict(result), "data": opts.eval_data}, seconds={"eval": seconds["eval"]})
    return result.perplexity, result.windows
