"""The Python API under the CLI: ``quantize(...)`` and ``evaluate(...)``.

Example::

    from tritonq.engine.api import QuantizeOptions, quantize
    summary = quantize(QuantizeOptions(model="smollm2", method="gptq", bits=4, group_size=64,
                                       method_options={"damp": 0.1}, output="out/smollm2-w4g64"))
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import TritonqError
from .activations import apply_activation_quant, block_linear_names, resolve_act_spec, saved_act_spec
from .adapters import adapter_for, block_index
from .cache import ActivationCache
from .data import (
    calibration_windows,
    check_data,
    check_eval_seqlen,
    check_positive,
    evaluation_windows,
    load_corpus,
    tokenize,
)
from .distributed import current_collective
from .grid import GridSpec
from .methods.base import Method
from .methods.registry import make_method
from .model_io import load_model, load_tokenizer, resolve_device, resolve_dtype
from .outputs import QUANT_JSON, atomic_output_dir, read_quantization_json
from .preflight import check_model_files, check_quantize_options, check_seqlen_fits, preflight
from .rotation import RotationSpec, rotate_model
from .scale_tuning import ScaleTuning
from .streaming import model_files_fingerprint, open_weights
from .workdir import WorkDir, default_work_dir


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
    # per-layer methods and grids (engine/recipe.py): a .yaml/.json file, a quantization.json to replay, or a dict;
    # ``method`` and its options then fill what the recipe leaves out
    recipe: Any = None
    act_bits: int | None = None  # dynamic activation quantization (engine/act_quant.py); None: the method's default
    act_scheme: str | None = None  # per-token or per-tensor (None: the method's default, else per-token)
    act_sym: bool | None = None  # None: the method's default, else symmetric
    calib: str = "pydoc"
    text_column: str = "text"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib_batch: int = 8  # calibration windows per forward chunk: bounds the working activation memory
    # where the cached calibration activations wait between stages: False (the device), True or "cpu" (host RAM),
    # or "disk" with activations_dir (memory-mapped files; engine/cache.py)
    offload_activations: bool | str = False
    activations_dir: str | None = None
    stream: bool | None = None  # None: stream the weights from disk when the checkpoint has safetensors shards
    work_dir: str | None = None  # finished blocks and the next block's inputs (default: beside the output)
    resume: bool = False  # continue an interrupted run from its work directory
    out_format: str = "fake"
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    eval_data: str | None = None
    eval_windows: int | None = None
    eval_seqlen: int = 2048
    progress: bool = True
    workers: int = 1  # model-free RTN: layers rounded ahead in a thread pool while the writer writes
    quantize_head: str = "none"  # none, int8 or int4: the lm_head and embedding table as integers (formats/head.py)
    rotate: str = "none"  # an orthogonal rotation of the float model before calibration (engine/rotation.py)
    rotate_seed: int = 0  # the seed of the rotation's random signs or matrices
    # end-to-end scale tuning after every block (engine/scale_tuning.py): epochs over the calibration windows (0: off),
    # Adam's rate (a relative change of a scale per step) and windows per step
    tune_epochs: int = 0
    tune_lr: float = 3e-3
    tune_batch: int = 4
    tune_norms: bool = True  # the blocks' norm weights and biases are trained with the scales


@dataclass
class QuantizeSummary:
    output: str
    seconds: dict = field(default_factory=dict)
    perplexity: float | None = None
    eval_windows: int | None = None
    layers: int = 0
    group_size: int | None = None
    memory: dict = field(default_factory=dict)  # quantization.json's "memory": peaks per block (MB)




def quantize(opts: QuantizeOptions) -> QuantizeSummary:
    """Load, calibrate, quantize block by block, save atomically, optionally evaluate."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    from .formats.registry import get_format

    get_format(opts.out_format)  # an unknown name fails here, listing the formats
    check_quantize_options(opts)  # counts, data files, the output directory, the model's files and context
    if opts.method == "auto":  # score the candidates on calibration data and allocate bits first (issue 22)
        from .auto_plan import plan_auto

        opts = plan_auto(opts)
    group_size = 128 if opts.group_size is None else opts.group_size
    spec = GridSpec(bits=opts.bits, group_size=group_size, sym=opts.sym, mse=opts.mse)
    default_group = opts.group_size is None
    if opts.recipe is not None:
        from .methods.recipe import RecipeMethod
        from .recipe import load_recipe

        recipe = load_recipe(opts.recipe)
        method: Method = RecipeMethod(recipe, opts.method, opts.method_options)
        spec = dataclasses.replace(spec, **recipe.default.grid_fields())  # the recipe's default is the run's grid
        default_group = default_group and recipe.default.group_size is None
    else:
        method = make_method(opts.method, opts.method_options)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    rotation = RotationSpec(opts.rotate, opts.rotate_seed)
    tuning = ScaleTuning(opts.tune_epochs, opts.tune_lr, opts.tune_batch, opts.tune_norms)

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(opts.model, opts.trust_remote_code)
    # the method, the output format and the kernels, asked once from the config: fail before loading anything big
    run = preflight(method, opts.model, spec, default_group=default_group, act_bits=opts.act_bits,
                    act_scheme=opts.act_scheme, act_sym=opts.act_sym, out_format=opts.out_format, tokenizer=tokenizer,
                    device=device, dtype=dtype, trust_remote_code=opts.trust_remote_code,
                    quantize_head=opts.quantize_head, rotation=rotation)
    method, spec, act, adapter = run.method, run.spec, run.act, run.adapter
    seconds["preflight"] = time.perf_counter() - t0
    collective = current_collective()  # [distributed] world 1 unless run under torchrun / --nproc
    if tuning.active:
        check_tuning_run(act, collective.world)

    calib_meta = None
    batches = None
    eval_windows = None
    if opts.eval_data:  # resolve the evaluation data before the long part, so a typo fails fast
        eval_corpus = load_corpus(opts.eval_data, split="test")
        eval_windows = evaluation_windows(tokenize(tokenizer, eval_corpus.text), opts.eval_seqlen,
                                          opts.eval_windows, eval_corpus.source, windows_flag="--eval-windows")
    # --- model-free RTN (issue 21 item 3): a data-free method on safetensors shards builds no model at all;
    # the shards are read layer by layer and written straight to the output format (engine/model_free.py)
    from . import model_free

    # one process only (ranks go through the pipeline, where RTN's solves are shared out), and not when the caller
    # asked for the model in memory (stream=False)
    # (a rotation rewrites the whole float model first: never model-free)
    model_free_ok = collective.world == 1 and opts.stream is not False and not rotation.active and not tuning.active
    source = model_free.applies(method, run, opts.model) if model_free_ok else None
    if source is not None:
        return QuantizeSummary(**model_free.quantize_model_free(opts, run, source, tokenizer, seconds, started,
                                                                eval_windows))
    # --- end model-free
    if method.calibrated or tuning.active:  # scale tuning trains on the calibration windows, after any method
        t0 = time.perf_counter()
        corpus = load_corpus(opts.calib, opts.text_column, split="train")
        windows = calibration_windows(tokenize(tokenizer, corpus.text), opts.nsamples, opts.seqlen, opts.seed,
                                      corpus.source)
        windows = collective.share(windows, opts.calib_batch)  # [distributed] this rank's whole chunks
        batches = list(torch.split(windows, opts.calib_batch))
        calib_meta = {"name": opts.calib, "source": corpus.source, "sha256": corpus.sha256,
                      "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seed": opts.seed}
        seconds["calibration_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    weights = open_weights(opts.model, dtype, opts.trust_remote_code, opts.stream,
                           whole_model=rotation.active or _prepares(method) or tuning.active)
    seconds["load"] = time.perf_counter() - t0
    from .memory import estimate_for_options

    # the memory this run needs, from the config alone (engine/memory.py), before the long part
    estimate = estimate_for_options(opts, run.config, device, streamed=weights.streamed)  # config.json: its dtype
    if opts.progress and collective.is_writer:
        print(estimate.describe())
    rotated = None
    if rotation.active:  # the float model is rotated before any method's prepare and before calibration
        t0 = time.perf_counter()
        rotated = rotate_model(weights.model, adapter, rotation)
        seconds["rotate"] = time.perf_counter() - t0
        if opts.progress and collective.is_writer:
            print(rotated.log_line())
    online = None
    if rotated is not None and act is not None:  # quantized activations: the down_proj input rotated at run time
        from .online_hadamard import apply_online, without_online_pairs

        online = apply_online(weights.model, adapter, rotation.seed, fold=True)
        adapter = without_online_pairs(adapter)  # no channel scale crosses the transform
        if opts.progress and collective.is_writer:
            print(f"online Hadamard at the down_proj input: {online.extra_repr()}")
    if not weights.streamed:
        method.prepare(weights.model, adapter)  # the model-level step, before the block inputs are captured
    # [distributed] rank 0 writes the blocks and the commit mark; every rank keeps its own share of the inputs
    work = WorkDir(Path(opts.work_dir).expanduser() if opts.work_dir else default_work_dir(opts.output),
                   {**run_fingerprint(opts, method, spec, act, dtype, device, calib_meta), "ranks": collective.world,
                    **({"rotation": {"rotate": rotation.kind, "seed": rotation.seed}} if rotation.active else {})},
                   opts.resume, opts.overwrite, rank=collective.rank, writer=collective.is_writer,
                   barrier=collective.barrier)
    resumed_from = work.done
    if resumed_from:
        print(f"resuming at block {resumed_from} from {work.path}")
    teacher = None
    if tuning.active and not work.use_tuned(tuning.describe()):
        from .scale_tuning import head_name, teacher_states

        t0 = time.perf_counter()  # the float model's last hidden states, before any block is quantized
        teacher = teacher_states(weights.model.to(device), head_name(weights.model), batches, device)
        weights.model.to("cpu")  # the pipeline moves one block at a time
        seconds["tune_teacher"] = time.perf_counter() - t0

    from .pipeline import quantize_blocks

    t0 = time.perf_counter()
    cache = ActivationCache(_offload_place(opts.offload_activations), device, opts.activations_dir)
    report = quantize_blocks(weights, adapter, method, spec, device, batches if method.calibrated else None,
                             cache=cache, work=work, seed=opts.seed,
                             progress=opts.progress and collective.is_writer)  # [distributed] bars on rank 0 only
    seconds["quantize_total"] = time.perf_counter() - t0
    for stage, value in report.seconds.items():
        seconds[f"quantize_{stage}"] = value
    tuning_log = None
    if teacher is not None:
        t0 = time.perf_counter()
        tuning_log = tune_and_commit(weights, adapter, report, work, batches, teacher, tuning, device, opts.seed,
                                     opts.progress)
        seconds["tune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if act is not None:  # the saved config says how the model runs (eval, serve and export read it)
        weights.model.config.tritonq_activations = act.describe()
    if online is not None:  # and that its down_proj input is rotated at run time (engine/online_hadamard.py)
        from .online_hadamard import CONFIG_KEY

        setattr(weights.model.config, CONFIG_KEY, online.describe())
    meta = {
        "method": method.name, **method.describe(), "bits": spec.bits, "group_size": spec.group_size,
        "sym": spec.sym, "mse": spec.mse, "activations": None if act is None else act.describe(),
        "model": opts.model, "architecture": adapter.family,
        # the dtype the output stores (the checkpoint's), and the one the run computed in
        "dtype": str(weights.output_dtype()).replace("torch.", ""),
        "compute_dtype": str(dtype).replace("torch.", ""), "device": str(device), "calibration": calib_meta,
        "tritonq_version": __version__, "layers": sorted(report.layers),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "memory": {**memory_record(report, weights.streamed, cache), "estimate": estimate.to_json()},
    }
    if tuning.active:  # recorded only where the run tunes (a resume that found the tuning done: its saved log)
        meta["scale_tuning"] = {**tuning.describe(), **(tuning_log or {**work.tuned_log(), "resumed": True})}
    if rotated is not None:  # recorded only where the run rotates: unrotated records stay as they were
        meta["rotate"], meta["rotation"] = rotation.kind, rotated.describe()
    if online is not None:
        meta["online_hadamard"] = online.describe()
    if resumed_from:
        meta["resumed_from_block"] = resumed_from
    from .formats.checkpoint import RunCheckpoint
    from .formats.head import with_quantized_head
    from .formats.registry import get_format

    # written from the work directory and the model's weights, one tensor at a time: nothing holds the whole model
    if collective.is_writer:  # [distributed] rank 0 writes; the other ranks hold the same results
        checkpoint = RunCheckpoint(weights, work, adapter.blocks, tokenizer, report.layers, meta, spec)
        fmt = get_format(opts.out_format)
        with atomic_output_dir(opts.output, opts.overwrite) as tmp:
            fmt.write(with_quantized_head(checkpoint, opts.quantize_head, adapter, fmt), tmp)
    seconds["save"] = time.perf_counter() - t0

    summary = QuantizeSummary(str(Path(opts.output).resolve()), seconds, layers=len(report.layers),
                              group_size=spec.group_size, memory=meta["memory"])
    if eval_windows is not None and collective.is_writer:  # [distributed] rank 0 evaluates what it wrote
        from .evaluation.perplexity import perplexity, streamed_perplexity

        t0 = time.perf_counter()
        if weights.streamed:  # block by block from the work directory, as the quantized blocks were made
            result = streamed_perplexity(weights, adapter, eval_windows, device, work.block_tensors, act,
                                         progress=opts.progress)
        else:
            if act is not None:
                apply_activation_quant(weights.model, act, sorted(report.layers))
            result = perplexity(weights.model, eval_windows, device, progress=opts.progress)
        seconds["eval"] = time.perf_counter() - t0
        summary.perplexity = result.perplexity
        summary.eval_windows = result.windows
        from .evaluation.report import PERPLEXITY, perplexity_label, record_evaluation

        # every output keeps a quantization.json (packed ones too); `tritonq report` reads the score there
        record_evaluation(opts.output, PERPLEXITY, perplexity_label(opts.eval_data, result.windows, result.seqlen),
                          {**dataclasses.asdict(result), "data": opts.eval_data},
                          seconds={"save": seconds["save"], "eval": seconds["eval"]})
    work.remove()  # the run is finished: its blocks are in the output now
    seconds["total"] = time.perf_counter() - started
    return summary


def run_fingerprint(opts: QuantizeOptions, method: Method, spec: GridSpec, act, dtype: torch.dtype,
                    device: torch.device, calib_meta: dict | None) -> dict:
    """What makes two runs the same run (``--resume`` refuses a work directory whose fingerprint differs)."""
    return {
        "model": {"name": opts.model, "files": model_files_fingerprint(opts.model)},
        "calibration": None if calib_meta is None else {**calib_meta, "calib_batch": opts.calib_batch},
        "method": {"name": method.name, **method.describe()},
        "grid": {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "mse": spec.mse},
        "activations": None if act is None else act.describe(),
        "dtype": str(dtype).replace("torch.", ""), "device": device.type, "tritonq_version": __version__,
    }


def check_tuning_run(act, world: int) -> None:
    """What ``--tune-epochs`` cannot do: quantized activations (the scales are tuned for a weight-only model) and
    several ranks (the tuning runs in one process)."""
    if act is not None:
        raise TritonqError("--tune-epochs tunes the weight scales of a weight-only model; this run quantizes "
                           "activations too: drop --tune-epochs, or the activation flags")
    if world > 1:
        raise TritonqError("--tune-epochs trains through the whole model in one process; run without --nproc / "
                           "torchrun, or drop --tune-epochs")


def tune_and_commit(weights, adapter, report, work: WorkDir, batches, teacher, tuning: ScaleTuning,
                    device: torch.device, seed: int, progress: bool) -> dict:
    """Tune the scales of every quantized linear (``scale_tuning.tune_scales``) and commit each block's tuned
    tensors and grids to the work directory, which the output is then written from."""
    from .methods.base import LayerResult
    from .pipeline import block_tensors
    from .scale_tuning import block_vectors, head_name, tune_scales

    index_of = {name: block_index(name, adapter.blocks) for name in report.layers}
    layers = {}
    for name, res in report.layers.items():
        scale, zero, g_idx = work.layer_params(index_of[name], name)
        layers[name] = (scale, zero, g_idx, res.spec.bits)
    vectors = block_vectors(weights.model, adapter.blocks) if tuning.norms else []
    result = tune_scales(weights.model.to(device), head_name(weights.model), layers, batches, teacher, tuning, device,
                         seed, progress=_say if progress else None, vectors=vectors)
    blocks = {}
    for i in range(len(adapter.block_list(weights.model))):
        names = [n for n in layers if index_of[n] == i]
        block = weights.model.get_submodule(f"{adapter.blocks}.{i}")
        blocks[i] = (block_tensors(weights, block, f"{adapter.blocks}.{i}"),
                     {n: LayerResult(torch.empty(0), result.scales[n], layers[n][1], layers[n][2],
                                     spec=report.layers[n].spec) for n in names})
    weights.model.to("cpu")
    work.commit_tuned(tuning.describe(), blocks, result.log)
    return result.log


def _prepares(method: Method) -> bool:
    """Whether the method transforms the whole model before calibration (``prepare``): it needs the model in memory.
    A recipe prepares only through a method that quantizes every layer (``RecipeMethod.bind`` checks)."""
    from .preflight import recipe_of

    recipe = recipe_of(method)
    if recipe is not None and type(method) is type(recipe):
        return any(type(m).prepare is not Method.prepare for m in recipe.methods)
    return type(method).prepare is not Method.prepare


def _offload_place(offload: bool | str | None) -> str:
    """``QuantizeOptions.offload_activations`` as a cache place (False: the device; True: the CPU, as before)."""
    return {False: "device", None: "device", True: "cpu"}.get(offload, offload)  # type: ignore[arg-type]


def memory_record(report, streamed: bool, cache: ActivationCache) -> dict:
    """Peak host and device memory per block (MB), as recorded in ``quantization.json``."""
    blocks = [b for b in report.blocks if not b.get("resumed")]
    host = max((b["host_peak_mb"] for b in blocks), default=0.0)
    device = max((b["device_peak_mb"] for b in blocks), default=0.0)
    return {"weights": "streamed from disk" if streamed else "in memory", "activation_cache": cache.describe(),
            "host_peak_mb": host, "device_peak_mb": device,
            "per_block": [{k: b[k] for k in ("block", "host_peak_mb", "device_peak_mb", "seconds", "resumed")
                           if k in b} for b in report.blocks]}


def evaluate(model_name: str, data: str, max_windows: int | None = None, seqlen: int = 2048,
             device: str = "auto", dtype: str = "auto", progress: bool = True, trust_remote_code: bool = False,
             act_bits: int | None = None, act_scheme: str | None = None, act_sym: bool | None = None):
    """Perplexity of a model (hub id, directory, tritonq output, or ``smollm2``) on a text.

    Activations are quantized as the checkpoint records (``quantization.json`` / ``config.json``); ``act_*``
    override that, or quantize a float model's block inputs (the W16A8 ``act_only`` ablation)."""
    from .evaluation.perplexity import perplexity, streamed_perplexity

    check_eval_seqlen(seqlen)
    check_positive(max_windows, "--max-windows", 8)
    check_data(data)
    check_model_files(model_name)
    check_seqlen_fits(model_name, seqlen, trust_remote_code)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(model_name, trust_remote_code)
    corpus = load_corpus(data, split="test")
    windows = evaluation_windows(tokenize(tokenizer, corpus.text), seqlen, max_windows, corpus.source)
    from .online_hadamard import saved_record
    from .runtime.serve import is_packed_checkpoint

    online = Path(model_name).is_dir() and saved_record(model_name) is not None  # its hooks need the whole model
    if not is_packed_checkpoint(model_name) and not online:  # float weights in shards: streamed block by block
        weights = open_weights(model_name, resolve_dtype(dtype, dev), trust_remote_code)
        if weights.streamed:
            saved = saved_act_spec(model_name) if Path(model_name).is_dir() else None
            act = resolve_act_spec(saved, act_bits, act_scheme, act_sym)
            return streamed_perplexity(weights, adapter_for(weights.model.config), windows, dev, None, act,
                                       progress=progress)
    model = load_evaluation_model(model_name, dev, resolve_dtype(dtype, dev), trust_remote_code, act_bits,
                                  act_scheme, act_sym)
    return perplexity(model, windows, dev, progress=progress)


def load_evaluation_model(model_name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                          act_bits: int | None = None, act_scheme: str | None = None, act_sym: bool | None = None):
    """The model as it runs: packed int4 through ``QuantLinear``, anything else as float (fake-quantized) weights.

    Activation quantization is applied as the checkpoint records it, or as ``act_*`` override (see ``evaluate``).
    Shared by perplexity and the lm-eval tasks (``engine/evaluation/zero_shot.py``), so both score the same model."""
    from .runtime.serve import is_packed_checkpoint, load_packed_model

    if is_packed_checkpoint(model_name):  # packed int4: our QuantLinear path, no float weights
        model, _ = load_packed_model(model_name, device=str(device), dtype=str(dtype).replace("torch.", ""))
    else:
        from .online_hadamard import attach_saved

        model = load_model(model_name, dtype, trust_remote_code)
        if Path(model_name).is_dir():
            attach_saved(model, model_name)  # the online Hadamard it was quantized with (the act wrappers run it)
    apply_run_activation_quant(model, model_name, act_bits, act_scheme, act_sym)
    return model


def apply_run_activation_quant(model, model_name: str, bits: int | None, scheme: str | None,
                               sym: bool | None) -> None:
    """Wrap the quantized linears (every block linear for a float model) as the saved or given setting says."""
    saved = saved_act_spec(model_name) if Path(model_name).is_dir() else None
    act = resolve_act_spec(saved, bits, scheme, sym)
    if act is None:
        return
    meta = Path(model_name) / QUANT_JSON
    if meta.is_file():
        names = read_quantization_json(meta).get("layers") or []
    else:  # a packed checkpoint (its layers already wrapped by load_packed_model: re-set) or a float model
        names = block_linear_names(model, adapter_for(model.config))
    apply_activation_quant(model, act, names)


def _say(line: str) -> None:
    """A progress line of a long stage, seen at once even when stdout is a file."""
    print(line, flush=True)
