"""The Python API under the CLI: ``quantize(...)`` and ``evaluate(...)``.

Example::

    from tritonq.engine.api import QuantizeOptions, quantize
    summary = quantize(QuantizeOptions(model="smollm2", method="gptq", bits=4, group_size=64,
                                       method_options={"damp": 0.1}, output="out/smollm2-w4g64"))
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import TritonqError, warn
from .activations import apply_activation_quant, block_linear_names, resolve_act_spec, saved_act_spec
from .adapters import adapter_for
from .data import calibration_windows, evaluation_windows, load_corpus, tokenize
from .grid import GridSpec
from .methods.act_quant import WithActivationQuant
from .methods.registry import make_method
from .model_io import load_config, load_model, load_tokenizer, resolve_device, resolve_dtype
from .outputs import atomic_output_dir, check_output_dir


@dataclass
class QuantizeOptions:
    output: str
    model: str = "smollm2"
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = None  # None: 128, or the largest of 64/32 that divides every layer
    sym: bool = False
    mse: bool = False
    method_options: Any = None  # the method's Options dataclass, a dict of its fields, or None (defaults)
    act_bits: int | None = None  # dynamic activation quantization (engine/act_quant.py); None: the method's default
    act_scheme: str | None = None  # per-token or per-tensor (None: the method's default, else per-token)
    act_sym: bool | None = None  # None: the method's default, else symmetric
    calib: str = "pydoc"
    text_column: str = "text"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib_batch: int = 8  # calibration windows per forward chunk: bounds the working activation memory
    offload_activations: bool = False  # keep the cached calibration activations on the CPU between stages
    out_format: str = "fake"
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    eval_data: str | None = None
    eval_windows: int | None = None
    eval_seqlen: int = 2048
    progress: bool = True


@dataclass
class QuantizeSummary:
    output: str
    seconds: dict = field(default_factory=dict)
    perplexity: float | None = None
    eval_windows: int | None = None
    layers: int = 0
    group_size: int | None = None




def _check_format(opts: QuantizeOptions, method, spec: GridSpec, act, adapter, tokenizer) -> None:
    """Ask the output format, once and before calibration, whether it can hold this run."""
    from .formats.gguf_vocab import tokenizer_json_of
    from .formats.request import FormatRequest, check_request

    config = load_config(opts.model, opts.trust_remote_code)
    names = [f"{adapter.blocks}.{i}.{leaf}" for i in range(config.num_hidden_layers) for leaf in adapter.linear_names()]
    try:
        vocab = tokenizer_json_of(tokenizer)
    except TritonqError:
        vocab = None  # a slow tokenizer: only GGUF needs tokenizer.json, and it refuses when writing
    request = FormatRequest({n: method.layer_grid(n, spec) for n in names}, config.to_dict(), vocab,
                            method.act_order_groups(), act)
    check_request(opts.out_format, request)


def linear_widths(model_name: str, trust_remote_code: bool = False):
    """Adapter of the model and the input width of every linear of a block, from the config alone."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_name, trust_remote_code)
    adapter = adapter_for(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    block = adapter.block_list(skeleton)[0]
    widths = {f"{adapter.blocks}.0.{name}": block.get_submodule(name).in_features for name in adapter.linear_names()}
    return adapter, widths


def default_group_size(widths: dict[str, int]) -> int:
    """Group 128 (the common default), or 64 / 32 when 128 does not divide the model (SmolLM2: 576)."""
    for group in (128, 64, 32):
        if all(k % group == 0 for k in widths.values()):
            if group != 128:
                warn(f"group size 128 does not divide this model's layers; using {group}")
            return group
    return 128  # the grid check reports the problem


def quantize(opts: QuantizeOptions) -> QuantizeSummary:
    """Load, calibrate, quantize block by block, save atomically, optionally evaluate."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    from .formats.registry import get_format

    get_format(opts.out_format)  # an unknown name fails here, listing the formats
    group_size = 128 if opts.group_size is None else opts.group_size
    spec = GridSpec(bits=opts.bits, group_size=group_size, sym=opts.sym, mse=opts.mse)
    method = make_method(opts.method, opts.method_options)
    act = resolve_act_spec(getattr(method, "default_act", None), opts.act_bits, opts.act_scheme, opts.act_sym)
    if act is not None:
        method = WithActivationQuant(method, act)
    if opts.calib_batch < 1:
        raise TritonqError(f"--calib-batch must be positive, got {opts.calib_batch}")
    check_output_dir(opts.output, opts.overwrite)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(opts.model, opts.trust_remote_code)
    adapter, widths = linear_widths(opts.model, opts.trust_remote_code)  # from the config: fail before loading
    if opts.group_size is None:
        spec = dataclasses.replace(spec, group_size=default_group_size(widths))
    for name, k in widths.items():
        spec.groups_for(k, name)
    _check_format(opts, method, spec, act, adapter, tokenizer)  # grids, architecture, tokenizer fit the format
    seconds["preflight"] = time.perf_counter() - t0

    calib_meta = None
    batches = None
    eval_windows = None
    if opts.eval_data:  # resolve the evaluation data before the long part, so a typo fails fast
        eval_corpus = load_corpus(opts.eval_data, split="test")
        eval_windows = evaluation_windows(tokenize(tokenizer, eval_corpus.text), opts.eval_seqlen,
                                          opts.eval_windows, eval_corpus.source)
    if method.calibrated:
        t0 = time.perf_counter()
        corpus = load_corpus(opts.calib, opts.text_column, split="train")
        windows = calibration_windows(tokenize(tokenizer, corpus.text), opts.nsamples, opts.seqlen, opts.seed,
                                      corpus.source)
        batches = list(torch.split(windows, opts.calib_batch))
        calib_meta = {"name": opts.calib, "source": corpus.source, "sha256": corpus.sha256,
                      "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seed": opts.seed}
        seconds["calibration_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = load_model(opts.model, dtype, opts.trust_remote_code)
    seconds["load"] = time.perf_counter() - t0

    from .pipeline import quantize_blocks

    t0 = time.perf_counter()
    store = torch.device("cpu") if opts.offload_activations else device
    report = quantize_blocks(model, adapter, method, spec, device, batches, progress=opts.progress,
                             store_device=store)
    seconds["quantize_total"] = time.perf_counter() - t0
    for stage, value in report.seconds.items():
        seconds[f"quantize_{stage}"] = value

    t0 = time.perf_counter()
    if act is not None:  # the saved config says how the model runs (eval, serve and export read it)
        model.config.tritonq_activations = act.describe()
    meta = {
        "method": method.name, **method.describe(), "bits": spec.bits, "group_size": spec.group_size,
        "sym": spec.sym, "mse": spec.mse, "activations": None if act is None else act.describe(),
        "model": opts.model, "architecture": adapter.family,
        "dtype": str(dtype).replace("torch.", ""), "device": str(device), "calibration": calib_meta,
        "tritonq_version": __version__, "layers": sorted(report.layers),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    from .formats.checkpoint import ModelCheckpoint
    from .formats.registry import get_format

    # written from memory, layer by layer, through the format's writer: nothing is read back from disk
    checkpoint = ModelCheckpoint(model, tokenizer, report.layers, meta, spec)
    with atomic_output_dir(opts.output, opts.overwrite) as tmp:
        get_format(opts.out_format).write(checkpoint, tmp)
    seconds["save"] = time.perf_counter() - t0

    summary = QuantizeSummary(str(Path(opts.output).resolve()), seconds, layers=len(report.layers),
                              group_size=spec.group_size)
    if eval_windows is not None:
        from .evaluation.perplexity import perplexity

        t0 = time.perf_counter()
        if act is not None:
            apply_activation_quant(model, act, sorted(report.layers))
        result = perplexity(model, eval_windows, device, progress=opts.progress)
        seconds["eval"] = time.perf_counter() - t0
        summary.perplexity = result.perplexity
        summary.eval_windows = result.windows
        from .evaluation.report import PERPLEXITY, perplexity_label, record_evaluation

        # every output keeps a quantization.json (packed ones too); `tritonq report` reads the score there
        record_evaluation(opts.output, PERPLEXITY, perplexity_label(opts.eval_data, result.windows, result.seqlen),
                          {**dataclasses.asdict(result), "data": opts.eval_data},
                          seconds={"save": seconds["save"], "eval": seconds["eval"]})
    seconds["total"] = time.perf_counter() - started
    return summary


def evaluate(model_name: str, data: str, max_windows: int | None = None, seqlen: int = 2048,
             device: str = "auto", dtype: str = "auto", progress: bool = True, trust_remote_code: bool = False,
             act_bits: int | None = None, act_scheme: str | None = None, act_sym: bool | None = None):
    """Perplexity of a model (hub id, directory, tritonq output, or ``smollm2``) on a text.

    Activations are quantized as the checkpoint records (``quantization.json`` / ``config.json``); ``act_*``
    override that, or quantize a float model's block inputs (the W16A8 ``act_only`` ablation)."""
    from .evaluation.perplexity import perplexity

    dev = resolve_device(device)
    tokenizer = load_tokenizer(model_name, trust_remote_code)
    corpus = load_corpus(data, split="test")
    windows = evaluation_windows(tokenize(tokenizer, corpus.text), seqlen, max_windows, corpus.source)
    model = load_evaluation_model(model_name, dev, resolve_dtype(dtype, dev), trust_remote_code, act_bits,
                                  act_scheme, act_sym)
    return perplexity(model, windows, dev, progress=progress)


def load_evaluation_model(model_name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                          act_bits: int | None = None, act_scheme: str | None = None, act_sym: bool | None = None):
    """The model as it runs: packed int4 through ``QuantLinear``, anything else as float (fake-quantized) weights.

    Activation quantization is applied as the checkpoint records it, or as ``act_*`` override (see ``evaluate``).
    Shared by perplexity and the lm-eval tasks (``engine/zero_shot.py``), so both score the same model."""
    if _is_packed_checkpoint(model_name):  # packed int4: our QuantLinear path, no float weights
        from .runtime.serve import load_packed_model

        model, _ = load_packed_model(model_name, device=str(device), dtype=str(dtype).replace("torch.", ""))
    else:
        model = load_model(model_name, dtype, trust_remote_code)
    apply_run_activation_quant(model, model_name, act_bits, act_scheme, act_sym)
    return model


def apply_run_activation_quant(model, model_name: str, bits: int | None, scheme: str | None,
                               sym: bool | None) -> None:
    """Wrap the quantized linears (every block linear for a float model) as the saved or given setting says."""
    saved = saved_act_spec(model_name) if Path(model_name).is_dir() else None
    act = resolve_act_spec(saved, bits, scheme, sym)
    if act is None:
        return
    meta = Path(model_name) / "quantization.json"
    if meta.is_file():
        names = json.loads(meta.read_text())["layers"]
    else:  # a packed checkpoint (its layers already wrapped by load_packed_model: re-set) or a float model
        names = block_linear_names(model, adapter_for(model.config))
    apply_activation_quant(model, act, names)


def _is_packed_checkpoint(name: str) -> bool:
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    return "quantization_config" in json.loads(config.read_text())
