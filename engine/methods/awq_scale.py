"""AWQ's scale search: the candidate scales of one pair and their losses (which candidate to fold).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024
(arXiv:2306.00978), §3.2, as specified in ``../shared/docs/awq_family.md`` §3.3 (llm-awq ``auto_scale.py``,
AutoAWQ's duo scaling, llmc's version 2):

* :func:`weight_mean` and :func:`candidate_scales` - the scale formula (version 1: ``x^a / w^(1-a)``;
  version 2: ``x^a``), normalised to a geometric centre of 1, for the ratios :func:`grid_ratios`;
* :func:`search_module_scale` - loss on the parent module's output (self_attn for norm -> q/k/v, the MLP for
  norm -> gate/up) when each balance linear holds ``Q(W s)/s``;
* :func:`search_linear_scale` - loss on one linear's output (v -> o, up -> down), the ``awq_scale_loss`` kernel
  (its CPU reference is the Gram form) - no candidate weight is stored.

The module search has two paths. On CUDA (``kernels.awq_linear_usable``) every candidate's scaled and
fake-quantized q/k/v (or gate/up) weights and their linear outputs come from ONE launch of
``kernels/awq_search.py``'s kernel (a candidate axis in its grid; one launch per module call, or per slice of
its windows when ``candidates x tokens x outputs`` exceeds :data:`BATCH_ELEMENTS`); the rest of the module -
the attention on those projections (with its norms and rotary embedding), or the MLP's ``act(gate) * up`` and
down_proj - needs the module itself, so it stays in PyTorch: the module runs once on a batch of
``candidates x windows`` with the balance linears answering from the kernel's outputs (no deep copy, no weight
written). Elsewhere (the CPU) the reference scores one candidate at a time on the module with its weights
swapped, exactly as before the kernel existed: batched matmuls may block and sum differently from the
per-candidate ones, so the reference keeps its loop to keep its bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ... import kernels
from ...errors import TritonqError
from ..grid import GridSpec, fake_quantize_groups
from .awq_observe import PairObserver

if TYPE_CHECKING:
    from ..distributed import Collective

SEARCH_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ScaleSearchOptions:
    """Settings of the AWQ scale search (shared by ``awq`` and ``awq+gptq``)."""

    awq_version: int = field(default=1, metadata={
        "help": "scale formula: 1 = mean|x|^a / w^(1-a) (AutoAWQ duo scaling), 2 = mean|x|^a (llm-awq, llmc v2)",
        "choices": ("1", "2"), "const": "2"})
    n_grid: int = field(default=20, metadata={"help": "ratios a = i / n_grid, i = 0 .. n_grid-1"})
    search_tokens: int = field(default=4096, metadata={
        "help": "calibration tokens (whole windows) the scale candidates are scored on; 0 = all"})
    search_dtype: str = field(default="auto", metadata={
        "help": "dtype of the module forwards that score candidates: auto (the model's; bfloat16 for a float32 "
                "model on the CPU), float32, bfloat16, float16", "choices": tuple(SEARCH_DTYPES), "const": "bfloat16"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "awq_version", int(self.awq_version))
        if self.awq_version not in (1, 2):
            raise TritonqError(f"--awq-version must be 1 or 2, got {self.awq_version}")
        if self.n_grid < 1:
            raise TritonqError(f"--n-grid must be at least 1, got {self.n_grid}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise TritonqError(f"--search-dtype must be one of {', '.join(SEARCH_DTYPES)}, got {self.search_dtype!r}")
        if self.search_tokens < 0:
            raise TritonqError(f"--search-tokens must be 0 (all) or positive, got {self.search_tokens}")



# ----------------------------------------------------------------------------------------------------------
# the scale formula


def weight_mean(weights: list[torch.Tensor], spec: GridSpec) -> torch.Tensor:
    """``w_j``: mean over the rows of every linear of ``|W_ij| / max|W|`` of the element's quantization group
    (AutoAWQ's ``get_act_scale``-free weight statistic of duo scaling; rows of all linears concatenated)."""
    w = torch.cat([x.float() for x in weights], dim=0)
    n, k = w.shape
    g = spec.effective_group(k)
    grouped = w.abs().reshape(n, k // g, g)
    normed = grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)
    return normed.reshape(n, k).mean(dim=0)


def grid_ratios(n_grid: int) -> torch.Tensor:
    """The ratios tried: ``i / n_grid`` for ``i = 0 .. n_grid-1`` (ratio 1 not tried, as llm-awq/AutoAWQ)."""
    return torch.arange(n_grid, dtype=torch.float64) / n_grid


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratios: torch.Tensor) -> torch.Tensor:
    """Scales ``[A, K]`` for every ratio: ``max(x^a / (w^(1-a) + 1e-4), 1e-4)`` (duo, ``w_mean`` given) or
    ``max(x^a, 1e-4)``; each divided by ``sqrt(max * min)``; non-finite entries set to 1 (AutoAWQ)."""
    x = x_mean.double()[None]
    a = ratios.double()[:, None]
    if w_mean is None:
        s = x.pow(a)
    else:
        s = x.pow(a) / (w_mean.double()[None].pow(1 - a) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / torch.sqrt(s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True))
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return s.float()


def scales_for(observer: PairObserver, weights: list[torch.Tensor], spec: GridSpec,
               options: ScaleSearchOptions) -> torch.Tensor:
    """The candidate scales of one pair under ``options`` (version 1: duo, version 2: activations only)."""
    w_mean = weight_mean(weights, spec) if options.awq_version == 1 else None
    return candidate_scales(observer.mean_abs().to(weights[0].device), w_mean, grid_ratios(options.n_grid))


def pick_best(losses: torch.Tensor, label: str) -> int:
    """Index of the smallest loss, the first one on ties (llm-awq's strict ``<``); all-NaN is an error."""
    finite = torch.isfinite(losses)
    if not finite.any():
        raise TritonqError(f"every AWQ scale candidate of {label} gave a non-finite loss; check the model's float "
                           "outputs (or run with --dtype float32)")
    masked = torch.where(finite, losses.double(), torch.full_like(losses.double(), math.inf))
    return int(torch.argmin(masked))


def reduced_losses(totals: torch.Tensor, count: int, collective: Collective | None) -> torch.Tensor:
    """Per-candidate mean error ``totals / count`` over every rank's sample: with several ranks each scores the
    candidates on its own sample and the sums (fp64) and counts are added in rank order (``Collective.sum``), so
    every rank takes the same argmin; one process divides as before."""
    if collective is None or collective.world == 1:
        return totals / max(count, 1)
    return collective.sum(totals.double()) / max(collective.sum_count(count), 1)


def fake_quantize_scaled(w: torch.Tensor, s: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """``Q(W * s) / s`` on the shared grid (fp32)."""
    sf = s.float()[None, :]
    return fake_quantize_groups(w.float() * sf, spec, inplace=True).div_(sf)


def _call(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def search_dtype(name: str, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype candidates are scored in: ``auto`` is the model's, except bfloat16 for float32 on a CPU with
    native bf16 arithmetic (AVX512-BF16 or AMX: ~3x faster matmuls there; the references score in the model's
    half precision, AutoAWQ loads fp16). CPUs without it emulate bf16, slower than fp32, so they keep fp32."""
    if name == "auto":
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        on_cpu_fp32 = weight.dtype == torch.float32 and weight.device.type == "cpu"
        return torch.bfloat16 if on_cpu_fp32 and native_bf16 else None
    return SEARCH_DTYPES[name]


Quantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (W, s) -> the weight kept, Q(W s) / s


def search_module_scale(module: nn.Module, linears: list[nn.Linear], calls: list[tuple[tuple, dict]],
                        candidates: torch.Tensor, spec: GridSpec, label: str = "module",
                        dtype: torch.dtype | None = None, quantizer: Quantizer | None = None,
                        force: str | None = None, collective: Collective | None = None) -> tuple[int, torch.Tensor]:
    """Score every candidate by the mean squared error of ``module``'s output when each of ``linears`` holds
    ``Q(W s)/s``, against its float output on the same ``calls``; restores the weights. (best, losses).

    ``dtype``: the reference runs the forwards on a copy of the module in that dtype (the references score in
    the model's half precision; on the CPU bf16 matmuls are ~3x faster than fp32); the Triton path computes the
    balance outputs from inputs in that dtype and runs the rest of the module in its own. The candidates'
    weights are computed in fp32 either way and the squared errors summed in fp64. ``quantizer``:
    ``(W, s) -> Q(W s)/s`` (default: rounding on the grid, :func:`fake_quantize_scaled`; another one, or an MSE
    grid, takes the reference). ``force``: ``kernels.FORCE`` for the batched Triton path (see the module
    docstring). ``collective``: several ranks, each with its own ``calls`` (maybe none): the losses are
    reduced over them (:func:`reduced_losses`).
    """
    if quantizer is None and not spec.mse and calls:
        first = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
        g = spec.effective_group(linears[0].in_features)
        probe = first.new_empty(0, dtype=dtype or first.dtype)  # the device and dtype the kernel would see
        if kernels.awq_linear_usable(linears[0].weight, probe, g, force):
            with torch.no_grad():
                return _score_batched(module, linears, calls, candidates, spec, label, dtype, force, collective)
    quantizer = quantizer or (lambda w, s: fake_quantize_scaled(w, s, spec))
    if dtype is not None and dtype != linears[0].weight.dtype:
        import copy

        names = {id(m): n for n, m in module.named_modules()}
        lin_names = [names[id(lin)] for lin in linears]
        module = copy.deepcopy(module).to(dtype)
        linears_work = [module.get_submodule(n) for n in lin_names]
        calls = [(_cast(a, dtype), _cast(k, dtype)) for a, k in calls]
        originals = [lin.weight.data.float() for lin in linears]
        return _score_candidates(module, linears_work, originals, calls, candidates, quantizer, label, collective)
    return _score_candidates(module, linears, [lin.weight.data.clone() for lin in linears], calls, candidates,
                             quantizer, label, collective)


def _score_candidates(module: nn.Module, linears: list[nn.Linear], originals: list[torch.Tensor],
                      calls: list[tuple[tuple, dict]], candidates: torch.Tensor, quantizer: Quantizer,
                      label: str, collective: Collective | None = None) -> tuple[int, torch.Tensor]:
    with torch.no_grad():
        targets = [_call(module, a, k).float() for a, k in calls]
        totals = torch.empty(candidates.shape[0], dtype=torch.float64)
        count = 0
        try:
            for i, s in enumerate(candidates):
                for lin, w in zip(linears, originals):
                    lin.weight.data.copy_(quantizer(w.float(), s))  # copy_ rounds once to the module's dtype
                total, count = 0.0, 0
                for (a, k), target in zip(calls, targets):
                    diff = _call(module, a, k).float()  # a fresh output: safe to overwrite
                    total += float(diff.sub_(target).square_().sum(dtype=torch.float64))
                    count += target.numel()
                totals[i] = total
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data.copy_(w.to(lin.weight.dtype))
    losses = reduced_losses(totals, count, collective)
    return pick_best(losses, label), losses


def search_linear_scale(weight: torch.Tensor, inputs: torch.Tensor, candidates: torch.Tensor, spec: GridSpec,
                        label: str = "linear", force: str | None = None,
                        collective: Collective | None = None) -> tuple[int, torch.Tensor]:
    """Score every candidate by the output error of one linear on ``inputs`` (the ``awq_scale_loss`` kernel:
    no candidate weight is stored); (best, losses). With several ranks (``collective``) each rank's mean is
    weighted by its token count (none: nothing scored) and reduced (:func:`reduced_losses`)."""
    g = -1 if spec.group_size == -1 else spec.group_size
    if collective is not None and collective.world > 1:
        tokens = inputs.reshape(-1, inputs.shape[-1]).shape[0]
        totals = torch.zeros(candidates.shape[0], dtype=torch.float64)
        if tokens:
            totals = kernels.awq_scale_loss(weight.float(), inputs, candidates.to(weight.device), g, spec.maxq,
                                            spec.sym, force=force).cpu().double() * tokens
        losses = reduced_losses(totals, tokens, collective)
        return pick_best(losses, label), losses
    losses = kernels.awq_scale_loss(weight.float(), inputs, candidates.to(weight.device), g, spec.maxq, spec.sym,
                                    force=force)
    return pick_best(losses.cpu(), label), losses.cpu()


def search_linear_scale_with(weight: torch.Tensor, inputs: torch.Tensor, candidates: torch.Tensor,
                             quantizer: Quantizer, label: str = "linear",
                             collective: Collective | None = None) -> tuple[int, torch.Tensor]:
    """:func:`search_linear_scale` for another quantizer than rounding (torch, Gram form ``tr(E X^T X E^T)``)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    gram = x.t() @ x
    totals = torch.empty(candidates.shape[0], dtype=torch.float64)
    for i, s in enumerate(candidates):
        err = quantizer(weight.float(), s.to(weight.device)) - weight.float()
        totals[i] = float(((err @ gram) * err).sum(dtype=torch.float64))
    losses = reduced_losses(totals, x.shape[0] * weight.shape[0], collective)
    return pick_best(losses, label), losses


# Elements of the largest candidate-batched activation the Triton module search holds at once
# (candidates x tokens x the balance linears' outputs): 2^28 (1 GiB in fp32).
BATCH_ELEMENTS = 2**28


def _swap_windows(value: Any, windows: int, start: int, stop: int, times: int) -> Any:
    """Windows ``[start, stop)`` of a module call's arguments, repeated ``times`` (candidate-major): tensors of
    two or more dimensions whose leading one is the batch; broadcast ones ([1, T, D], masks [1, 1, T, T]) and
    1-D ones (cache positions) kept."""
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != windows or windows == 1:
            return value
        part = value[start:stop]
        return part.repeat(times, *([1] * (part.dim() - 1))) if times > 1 else part
    if isinstance(value, (tuple, list)):
        return type(value)(_swap_windows(v, windows, start, stop, times) for v in value)
    if isinstance(value, dict):
        return {k: _swap_windows(v, windows, start, stop, times) for k, v in value.items()}
    return value


@contextmanager
def _answering(linears: list[nn.Linear], outputs: list[torch.Tensor]) -> Iterator[None]:
    """Each of ``linears`` returns its entry of ``outputs`` (whatever its input) inside the block: an instance
    ``forward`` shadows the class's, removed on exit. Nothing is copied and no weight is written."""
    try:
        for lin, out in zip(linears, outputs, strict=True):
            lin.forward = lambda _x, _out=out: _out
        yield
    finally:
        for lin in linears:
            lin.__dict__.pop("forward", None)


def _score_batched(module: nn.Module, linears: list[nn.Linear], calls: list[tuple[tuple, dict]],
                   candidates: torch.Tensor, spec: GridSpec, label: str, dtype: torch.dtype | None,
                   force: str | None, collective: Collective | None = None) -> tuple[int, torch.Tensor]:
    """The Triton path of :func:`search_module_scale` (see the module docstring): one kernel launch gives every
    candidate's balance outputs for every sampled token (a launch per slice of windows when that would exceed
    :data:`BATCH_ELEMENTS`), then one module forward per slice on ``candidates x windows`` gives the losses."""
    w = torch.cat([lin.weight.float() for lin in linears])  # [N_q + N_k + N_v, K] (or gate + up)
    widths = [lin.out_features for lin in linears]
    n_cand, k_in = candidates.shape[0], w.shape[1]
    g = spec.effective_group(k_in)
    per_token = n_cand * max(w.shape[0], k_in)  # elements of the batched outputs per calibration token
    hiddens = [args[0] if args else kwargs["hidden_states"] for args, kwargs in calls]
    slices = []  # (call index, first window, end window): each within BATCH_ELEMENTS
    for i, hidden in enumerate(hiddens):
        windows, per_window = hidden.shape[0], hidden.shape[1:-1].numel()
        step = max(1, BATCH_ELEMENTS // (per_token * per_window))
        slices += [(i, w0, min(w0 + step, windows)) for w0 in range(0, windows, step)]

    def tokens_of(piece: tuple[int, int, int]) -> torch.Tensor:
        i, w0, w1 = piece
        x = hiddens[i][w0:w1].reshape(-1, k_in)
        return x.to(dtype or x.dtype)

    def launch(x: torch.Tensor) -> torch.Tensor:
        return kernels.awq_scaled_linear(w, x, candidates, g, spec.maxq, spec.sym, force=force)

    sizes = [tokens_of(p).shape[0] for p in slices]
    if sum(sizes) * per_token <= BATCH_ELEMENTS:  # the usual case: one launch for the whole pair
        outputs = iter(launch(torch.cat([tokens_of(p) for p in slices])).split(sizes, dim=1))
    else:
        outputs = (launch(tokens_of(p)) for p in slices)
    total = torch.zeros(n_cand, dtype=torch.float64, device=w.device)
    count, targets = 0, {}
    for (i, w0, w1), y in zip(slices, outputs):
        args, kwargs = calls[i]
        if i not in targets:
            targets[i] = _call(module, args, kwargs).float()
            count += targets[i].numel()
        hidden = hiddens[i]
        lead = (n_cand * (w1 - w0), *hidden.shape[1:-1])
        outs = [part.to(linears[0].weight.dtype).reshape(*lead, -1).contiguous() for part in y.split(widths, dim=-1)]
        placeholder = hidden.new_zeros(()).expand(*lead, k_in)  # read by the answering linears only
        a = _swap_windows(args[1:], hidden.shape[0], w0, w1, n_cand)
        k = _swap_windows(kwargs, hidden.shape[0], w0, w1, n_cand)
        if args:
            a = (placeholder, *a)
        else:
            k = {**k, "hidden_states": placeholder}
        with _answering(linears, outs):
            out = _call(module, a, k).float().reshape(n_cand, -1)
        total += out.sub_(targets[i][w0:w1].reshape(1, -1)).square_().sum(dim=1, dtype=torch.float64)
    losses = reduced_losses(total, count, collective).cpu()
    return pick_best(losses, label), losses
