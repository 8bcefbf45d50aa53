"""Preflight: everything a quantize run can refuse, asked once, before calibration data or the model is loaded.

From the model's config (a meta skeleton, no weights) and its tokenizer, :func:`preflight` asks

1. the method, through its declared contract (``methods/base.py``): its activation setting (``default_act``, and
   ``set_activation`` when it ``receives_act``), the grid of every linear of every block (``layer_grid``), which
   must divide the linear's input width and agree within a linear group, and its act-order groups; a recipe
   (``--recipe``, ``methods/recipe.py``) is first bound to the model's linears, every problem of it at once;
2. the output format, through ``formats/request.py``'s :func:`check_request` with one :class:`FormatRequest`;
3. the kernels the run will use on its device, through their declared ``LIMITS``
   (``kernels/configs.py``'s :func:`check_limits`): on CUDA, the Hessian and GPTQ kernels of a calibrated
   method; for a packed 4-bit output, the dequant-matmul kernels that serve it.

So a run the output cannot hold (``--method awq+gptq --act-order dynamic --format gguf``) fails in seconds with
one line, not after the whole quantization. On several ranks (``engine/distributed.py``) a method that cannot
run data-parallel is refused here too (:func:`check_data_parallel`). Before any of that,
:func:`check_quantize_options` refuses what the options alone show (counts, the grid, data files parsed, the
output directory, the model's files and context), before the tokenizer loads; ``tritonq eval`` and
:func:`tritonq.engine.api.evaluate` use its pieces too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import TritonqError, warn
from ..kernels.configs import check_limits
from .activations import ActSpec, resolve_act_spec
from .adapters import Adapter, adapter_for
from .data import check_context, check_data, check_positive
from .distributed import current_collective
from .formats.head import HEAD_MODES, check_head_format, check_head_model
from .formats.request import FormatRequest, check_request
from .grid import GridSpec
from .methods.act_quant import WithActivationQuant
from .methods.base import Method
from .methods.recipe import RecipeMethod
from .methods.registry import method_class
from .model_io import load_config, model_context, resolve_model, tokenizer_json
from .outputs import QUANT_JSON, check_output_dir, read_quantization_json
from .pipeline import group_grid
from .rotation import RotationSpec, check_rotatable
from .scale_tuning import ScaleTuning

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Preflight:
    """What a quantize run needs from its preflight."""

    method: Method  # the method to run: wrapped in WithActivationQuant when the run quantizes activations
    spec: GridSpec  # the run's grid, group size resolved
    grids: dict[str, GridSpec]  # every linear the run quantizes (the model's names) -> its grid (``layer_grid``)
    act: ActSpec | None  # the run's activation quantization; None: weights only
    adapter: Adapter
    widths: dict[str, int]  # every linear -> its input width
    config: dict  # the model's config.json as a dict


def block_widths(config: Any, adapter: Adapter, trust_remote_code: bool = False) -> dict[str, int]:
    """The input width of every linear of every block (the model's names), read off a meta skeleton."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {f"{adapter.blocks}.{i}.{name}": block.get_submodule(name).in_features
            for i, block in enumerate(adapter.block_list(skeleton)) for name in adapter.linear_names()}


def default_group_size(widths: dict[str, int]) -> int:
    """Group 128 (the common default), or 64 / 32 when 128 does not divide the model (SmolLM2: 576)."""
    for group in (128, 64, 32):
        if all(k % group == 0 for k in widths.values()):
            if group != 128:
                warn(f"group size 128 does not divide this model's layers; using {group}")
            return group
    return 128  # the grid check reports the problem


def check_model_files(name: str) -> None:
    """A local model directory's metadata must parse before anything loads: ``config.json`` (every loader reads
    it) and, where present, ``quantization.json`` (eval, generate and serve read its activation record)."""
    if Path(name).expanduser().is_dir():
        resolve_model(name)  # config.json present and a JSON object
        meta = Path(name).expanduser() / QUANT_JSON
        if meta.is_file():
            read_quantization_json(meta)


def check_seqlen_fits(model: str, seqlen: int, trust_remote_code: bool, flag: str = "--seqlen") -> None:
    """Windows of ``seqlen`` tokens must fit the model's context; read from the config before the model loads."""
    check_context(seqlen, model_context(model, trust_remote_code), flag, model)


def check_quantize_options(opts: Any) -> None:
    """What the options alone (and the model's config) can refuse, before anything is tokenized or loaded
    (``opts``: :class:`tritonq.engine.api.QuantizeOptions`)."""
    GridSpec(bits=opts.bits, group_size=128 if opts.group_size is None else opts.group_size, sym=opts.sym,
             mse=opts.mse)  # the grid's own checks, before the config is read below
    check_positive(opts.nsamples, "--nsamples", 128)
    check_positive(opts.seqlen, "--seqlen", 512)
    check_positive(opts.calib_batch, "--calib-batch", 8)
    check_positive(opts.eval_windows, "--eval-windows", 8)
    head = getattr(opts, "quantize_head", "none")
    if head not in HEAD_MODES:
        raise TritonqError(f"unknown --quantize-head {head!r}; choose one of {', '.join(HEAD_MODES)}")
    if head != "none" and opts.eval_data is not None:
        raise TritonqError("--eval-data scores the model in memory, whose lm_head is float; with --quantize-head "
                           "drop --eval-data and run 'tritonq eval OUTPUT --data FILE' on the written output")
    if opts.eval_windows is not None and opts.eval_data is None:
        raise TritonqError("--eval-windows applies to the evaluation after quantizing; add --eval-data FILE "
                           "or drop --eval-windows")
    calibrated = method_class(opts.method).calibrated
    if opts.recipe is not None:  # the recipe's own checks (keys, regexes, methods), before anything loads
        from .recipe import load_recipe

        calibrated = any(method_class(m).calibrated for m in load_recipe(opts.recipe).method_names(opts.method))
    check_rotation_options(opts)
    check_tuning_options(opts)
    calibrated = calibrated or getattr(opts, "tune_epochs", 0) > 0  # the tuning trains on the calibration windows
    check_output_dir(opts.output, opts.overwrite)  # cheap: before the model's config is read
    if calibrated:
        check_data(opts.calib, opts.text_column)
    if opts.eval_data is not None:
        check_data(opts.eval_data)
    check_model_files(opts.model)
    if calibrated:
        check_seqlen_fits(opts.model, opts.seqlen, opts.trust_remote_code)


def check_rotation_options(opts: Any) -> None:
    """``--rotate`` and ``--rotate-seed`` parse, and the run can hold a rotated model: the whole float model is
    rewritten in memory before calibration, so it is neither streamed from disk nor planned by ``--method auto``
    (which scores its candidates on the unrotated model)."""
    rotation = RotationSpec(getattr(opts, "rotate", "none"), getattr(opts, "rotate_seed", 0))
    recorded = _replayed_rotation(opts.recipe)
    if recorded is not None and recorded != (rotation.kind, rotation.seed if rotation.active else 0):
        raise TritonqError(f"--recipe {opts.recipe} replays a run made with --rotate {recorded[0]} --rotate-seed "
                           f"{recorded[1]}; pass the same --rotate and --rotate-seed to replay it")
    if not rotation.active:
        return
    if opts.stream:
        raise TritonqError("--rotate rewrites the whole float model in memory before calibration, so it cannot be "
                           "streamed from disk; drop stream=True (or --rotate none)")
    if opts.method == "auto":
        raise TritonqError("--method auto scores its candidates on the unrotated model; pick a method with --rotate, "
                           "or drop --rotate")


def check_tuning_options(opts: Any) -> None:
    """``--tune-epochs``, ``--tune-lr`` and ``--tune-batch`` parse, and the run can hold the whole model: the tuning
    trains through every block at once, so the weights are not streamed from disk."""
    tuning = ScaleTuning(getattr(opts, "tune_epochs", 0), getattr(opts, "tune_lr", 3e-3),
                         getattr(opts, "tune_batch", 4), getattr(opts, "tune_norms", True))
    if tuning.active and opts.stream:
        raise TritonqError("--tune-epochs trains through the whole model in memory, so it cannot be streamed from "
                           "disk; drop stream=True (or --tune-epochs)")


def _replayed_rotation(recipe: Any) -> tuple[str, int] | None:
    """``(rotate, seed)`` of the run a ``--recipe`` ``quantization.json`` (or output directory) replays; None for
    any other recipe (a recipe file holds no rotation)."""
    if not isinstance(recipe, str | Path):
        return None
    path = Path(recipe).expanduser()
    path = path / QUANT_JSON if path.is_dir() else path
    if path.suffix.lower() != ".json" or not path.is_file():
        return None  # load_recipe reports a missing file
    try:
        meta = read_quantization_json(path)
    except TritonqError:
        return None  # a recipe .json, or one load_recipe reports
    if "method" not in meta or "layers" not in meta:
        return None
    return str(meta.get("rotate", "none")), int((meta.get("rotation") or {}).get("seed", 0))


def preflight(method: Method, model_name: str, spec: GridSpec, *, default_group: bool, act_bits: int | None,
              act_scheme: str | None, act_sym: bool | None, out_format: str, tokenizer: Any,
              device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
              quantize_head: str = "none", rotation: RotationSpec | None = None) -> Preflight:
    """Ask the method, the output format and the kernels once; raise :class:`TritonqError` on the first refusal.

    ``spec`` is the run's grid (``default_group``: its group size is to be chosen from the model's widths);
    ``act_*`` are the run's activation flags over the method's ``default_act``; ``tokenizer`` the loaded one;
    ``quantize_head`` the ``--quantize-head`` mode (the format must hold it, the run must be weight-only).
    ``rotation`` the run's ``--rotate`` (the model must have a residual stream a rotation keeps exact).
    """
    act = resolve_act_spec(method.default_act, act_bits, act_scheme, act_sym)
    if act is not None:
        method = WithActivationQuant(method, act)
    check_data_parallel(method, current_collective().world)
    config = load_config(model_name, trust_remote_code)
    adapter = adapter_for(config)
    if rotation is not None and rotation.active:
        check_rotatable(adapter)
    widths = block_widths(config, adapter, trust_remote_code)
    if default_group:
        spec = replace(spec, group_size=default_group_size(widths))
    recipe = recipe_of(method)
    if recipe is not None:  # every linear's scheme, checked against the model (all problems at once)
        recipe.bind(adapter, widths, spec)
    grids = layer_grids(method, adapter, widths, spec)
    record = config.to_dict()
    vocabulary = None if out_format == "fake" else tokenizer_json(tokenizer)  # a fake output holds no vocabulary
    check_request(out_format, FormatRequest(layer_grids=grids, config=record, tokenizer_json=vocabulary,
                                            act_order_groups=method.act_order_groups(), activations=act,
                                            online_transform=act is not None and rotation is not None
                                            and rotation.active))
    check_kernel_limits(method, out_format, grids, widths, device, dtype)
    check_quantize_head(quantize_head, out_format, record, act, adapter)
    return Preflight(method, spec, grids, act, adapter, widths, record)


def check_quantize_head(mode: str, out_format: str, config: dict, act: ActSpec | None, adapter: Adapter) -> None:
    """``--quantize-head``: a format that holds the tables, a weight-only run, a hidden size the groups divide."""
    if mode == "none":
        return
    from .formats.registry import get_format

    fmt = get_format(out_format)
    check_head_format(fmt, mode)
    if act is not None:
        raise TritonqError(f"--quantize-head {mode} is for weight-only runs; this run quantizes activations "
                           f"({act.bits}-bit {act.scheme}); drop --act-bits or use --quantize-head none")
    if adapter.stream is None:
        raise TritonqError(f"--quantize-head is not supported for {adapter.family} models of this kind "
                           "(no declared embedding and lm_head); use --quantize-head none")
    check_head_model(mode, config, fmt.head_block)


DATA_PARALLEL_MODES = ("solve", "replicated", "refused")


def check_data_parallel(method: Method, world: int) -> None:
    """On ``world > 1`` ranks, the method must declare a way to run data-parallel (``Method.data_parallel``):
    a block-scope method, or one that declares ``"refused"``, stops here with one line naming the reason."""
    if method.data_parallel not in DATA_PARALLEL_MODES:
        raise TritonqError(f"method {method.name} declares data_parallel {method.data_parallel!r}; it must be one of "
                           f"{', '.join(DATA_PARALLEL_MODES)}")
    if world <= 1:
        return
    if method.scope == "block":
        reason = "it optimises whole blocks (scope 'block'), and that optimisation is not split across ranks"
    elif method.data_parallel == "refused":
        reason = method.data_parallel_refusal
    else:
        return
    what = "this --recipe" if recipe_of(method) is not None else f"--method {method.name}"
    raise TritonqError(f"{what} cannot run on {world} ranks: {reason}; run it in one process "
                       "(without --nproc or torchrun)")


def recipe_of(method: Method) -> RecipeMethod | None:
    """The recipe a run's method runs (``--recipe``), under an activation-quantization wrapper or not."""
    inner = method.inner if isinstance(method, WithActivationQuant) else method
    return inner if isinstance(inner, RecipeMethod) else None


def layer_grids(method: Method, adapter: Adapter, widths: dict[str, int], spec: GridSpec) -> dict[str, GridSpec]:
    """The grid of every linear the run quantizes (``method.layer_grid``; a linear left in float has none), one per
    linear group, each dividing its input width."""
    grids: dict[str, GridSpec] = {}
    for i in range(len(widths) // len(adapter.linear_names())):  # every block holds every linear of the adapter
        for names in adapter.linear_groups:
            full = [f"{adapter.blocks}.{i}.{n}" for n in names]
            grid = group_grid(method, full, spec)
            if grid is None:
                continue
            for name in full:
                grid.groups_for(widths[name], name)
                grids[name] = grid
    return grids


def check_kernel_limits(method: Method, out_format: str, grids: dict[str, GridSpec], widths: dict[str, int],
                        device: torch.device, dtype: torch.dtype) -> None:
    """The declared limits of every kernel the run will use: the Hessian and in-block GPTQ kernels of a calibrated
    method on CUDA (the CPU runs their PyTorch references), the dequant-matmul that serves a packed 4-bit output."""
    if method.calibrated and device.type == "cuda":
        from ..kernels import gptq_block, hessian_accum

        check_limits("hessian_accum", hessian_accum.LIMITS, dtype=_TRITON_DTYPES.get(dtype, "fp32"))
        check_limits("gptq_block", gptq_block.LIMITS, dtype="fp32")  # the engine solves in fp32
    from .formats.registry import PACKED

    if out_format in PACKED:  # a packed safetensors checkpoint: 'tritonq eval/generate/serve' run its layers
        from ..kernels import dequant_matmul

        for name, grid in grids.items():
            if grid.bits == 4:  # 8-bit sym per-channel weights run on int8_matmul, other widths are not served
                check_limits("dequant_matmul", dequant_matmul.LIMITS, bits=grid.bits, group_size=grid.group_size,
                             in_features=widths[name], where=name)
