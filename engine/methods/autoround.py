"""AutoRound: each weight's rounding offset and each group's range, learned by signed gradient descent on the
block's output error (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs", arXiv:2309.05516; intel/auto-round 0.16, ``algorithms/quantization/sign_round/quantizer.py``).

Per decoder block (``scope = "block"``: the pipeline hands over the block, its calibration inputs taken from the
already-quantized blocks before it, and the float block's outputs on them, :class:`..groups.BlockGroup`):

* every linear gets ``V`` [N, K] (zeros), added before rounding, and per-group factors on the range's min and max
  (ones, kept in [0, 1] as auto-round's ``minmax_scale_bound``; with ``--mse`` both start at the shrink that
  GPTQ's MSE grid search picks for the group, so step 0 is ``--mse`` round-to-nearest and ``--init gptq`` solves on
  that grid: not in auto-round, which always starts from the min-max range); the fake quantization with straight-through
  rounding is :func:`tritonq.kernels.signround_qdq` (the Triton kernel on CUDA, its PyTorch reference elsewhere);
* ``iters`` steps of signed gradient descent, ``p -= lr_t * sign(grad)``, on the MSE of the block's output against
  the float block's, one batch of ``batch`` calibration windows per step drawn without replacement from a reshuffled
  order (auto-round's ``IndexSampler``; drawn from the run's ``--seed`` and the block's index, where auto-round
  draws from its global generator, so that a resumed run redoes a block's steps exactly); ``lr_t`` decays linearly
  from ``lr`` (default ``1 / iters``) to 0;
* the loss of every step is computed before its update, and the parameters with the lowest loss are kept (the
  first step's, ``V = 0``, is round-to-nearest: the result is never a worse batch loss than RTN's);
* ``--trim F`` leaves the largest fraction ``F`` of the squared output errors out of each step's loss
  (:func:`trimmed_mse`): SignRoundV2's loss filtering (arXiv:2512.04746, v2; in auto-round behind ``enable_alg_ext``,
  0.001 below 4 bits, on symmetric grids only); here on either grid, and off unless asked.

``--init awq`` first searches AWQ's activation-aware scales on the block and folds them (``awq.py``, without its
clip; the clip would only narrow ranges that the learned factors set anyway). ``--init gptq`` starts ``V`` from
GPTQ's rounding: GPTQ (static act-order, the run's damping default) solves each
linear on the Hessian of its input in the float block, on the min-max grid the factors start from, and ``V`` is set
so that rounding gives GPTQ's codes (clipped to [-0.5, 0.5], so a code more than half a step away from the weight
goes to the nearest reachable one).

The targets are, as auto-round's (``enable_quanted_input``), the float block's outputs on the float model's own
inputs, a second activation stream carried beside the quantized one (``--target quantized``: on the quantized path's
inputs, as GPTQ-style methods reconstruct; at 2 bits on SmolLM2 it is 42% worse, 301.98 against 212.18: with the
float target each block also undoes the error the blocks before it left). Where we differ from auto-round: ``V`` is
clamped to [-0.5, 0.5] after every step (auto-round leaves it free; its linear decay from ``1 / iters`` bounds the total
movement by 0.5 anyway); the symmetric grid is tritonq's (``kernels/signround.py``). No automatic mixed precision:
the block runs in the compute dtype (float32 on the CPU).

``--compile`` runs each step's block forward (and so its backward) through ``torch.compile``, as auto-round's
``enable_torch_compile``: one graph for every block of the model (the block module is an argument of the compiled
function, :func:`..groups.block_forward`), which fuses the block's elementwise work (norm, rotary, SiLU, the loss).
The fake quantization is inside the graph (on CUDA a Triton kernel each way, which the compiler calls as it is).
The graph keeps the fp16 rounding of each scale (inductor's ``emulate_precision_casts``; without it inductor
drops the round trip through fp16 and moved 78% of the fake weights of a random 576 x 576 linear); with it the
compiled step's gradients match the eager step's to 1e-6 relative, every sign the same (SmolLM2 block 5).
Where the compiler fails, the run warns once and goes on eagerly; the result then equals an eager run's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ... import kernels
from ...errors import TritonqError
from ...kernels.signround import signround_grid
from ..grid import GridSpec, default_g_idx, fit_rows_shrink
from ..groups import block_forward
from ..hessian import HessianAccumulator
from .awq import AWQ, AWQOptions
from .base import LayerResult, Method
from .gptq import GPTQOptions
from .gptq import solve as gptq_solve

if TYPE_CHECKING:
    from ..groups import BlockGroup, Group

INITS = ("none", "gptq", "awq")
# one linear's fake quantization inputs: name, weight, offsets, min and max factors, group, maxq, sym
FakeArgs = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, bool]
TARGETS = ("float", "quantized")
_SEED_STRIDE = 1_000_003  # above any block count: no two (seed, block) pairs share a generator seed


@dataclass(frozen=True)
class AutoRoundOptions:
    iters: int = field(default=200, metadata={"help": "signed-gradient steps per block (auto-round's default 200)"})
    lr: float = field(default=0.0, metadata={"help": "step size at the first step, decaying linearly to 0; 0 means "
                                                     "1/iters (auto-round's default)"})
    batch: int = field(default=8, metadata={"help": "calibration windows per step"})
    init: str = field(default="none", metadata={
        "help": "start from: none (round to nearest), gptq (GPTQ's codes as the initial offsets) or awq (AWQ's "
                "activation-aware scales searched and folded into the block first)",
        "choices": INITS, "const": "gptq"})
    target: str = field(default="float", metadata={
        "help": "what each block is fitted to: the float block on the float model's own inputs (float, auto-round's "
                "default: a second activation stream) or on the quantized blocks' outputs (quantized; at 2 bits on "
                "SmolLM2 its perplexity was 1.42x the float target's, bench/RESULTS.md)",
        "choices": TARGETS, "const": "float"})
    trim: float = field(default=0.0, metadata={
        "help": "leave this fraction of the largest squared output errors out of each step's loss (0: the plain MSE; "
                "auto-round's SignRoundV2 extension leaves out 0.001 below 4 bits; at 2 bits on SmolLM2 0.001 gave "
                "216.14 against 212.18 without it, one seed, bench/RESULTS.md)"})
    compile: bool = field(default=False, metadata={
        "help": "run each step's block forward and backward through torch.compile: one compile (tens of seconds) "
                "for every block, then about 1.17x faster steps on the CPU (SmolLM2); falls back to eager with a "
                "warning where the compiler fails"})

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise TritonqError(f"--iters must be a non-negative integer, got {self.iters!r}")
        if not self.lr >= 0:
            raise TritonqError(f"--lr must be >= 0 (0: 1/iters), got {self.lr!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise TritonqError(f"--batch must be a positive integer, got {self.batch!r}")
        if self.init not in INITS:
            raise TritonqError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.target not in TARGETS:
            raise TritonqError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 0.0 <= self.trim < 0.5:
            raise TritonqError(f"--trim must be a fraction in [0, 0.5), got {self.trim!r}")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr > 0 else 1.0 / max(self.iters, 1)


class _Tuned:
    """One linear's fixed weight and grid shape, and its learnable offsets and range factors."""

    def __init__(self, name: str, weight: torch.Tensor, spec: GridSpec, label: str) -> None:
        self.name = name
        self.spec = spec
        self.w = weight.detach().float().contiguous()
        n, k = self.w.shape
        groups = spec.groups_for(k, label)
        self.group = spec.effective_group(k)
        self.offsets = torch.zeros_like(self.w, requires_grad=True)
        # both factors start at 1 (the min-max grid), or with --mse at the shrink the MSE search picks per group,
        # which gives that search's grid exactly (signround_grid scales the range as fit_rows_shrink does)
        start = fit_rows_shrink(self.w.view(n * groups, self.group), spec)[2].view(n, groups)
        self.min_factor = start.clone().requires_grad_()
        self.max_factor = start.clone().requires_grad_()

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.offsets, self.min_factor, self.max_factor]

    @property
    def fake_args(self) -> FakeArgs:
        """What :func:`_block_loss` needs to make this linear's fake weight inside the (compiled) step."""
        return (self.name, self.w, self.offsets, self.min_factor, self.max_factor, self.group, self.spec.maxq,
                self.spec.sym)

    def fake(self) -> torch.Tensor:
        return kernels.signround_qdq(*self.fake_args[1:])

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = self.w.shape
        lo, hi = torch.aminmax(self.w.view(n, k // self.group, self.group), dim=2)
        return signround_grid(lo, hi, self.min_factor.detach(), self.max_factor.detach(), self.spec.maxq,
                                      self.spec.sym)


class _WindowSampler:
    """Batches of window indices without replacement; a fresh shuffle when fewer than a batch remain
    (auto-round's ``IndexSampler``)."""

    def __init__(self, count: int, batch: int, generator: torch.Generator) -> None:
        self.count, self.batch, self.gen = count, min(batch, count), generator
        self.order, self.pos = torch.randperm(count, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.count:
            self.order, self.pos = torch.randperm(self.count, generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx


def _shared_kwargs(kwargs: dict, rows: int, batch: int, label: str) -> dict:
    """The block's keyword inputs for a batch of ``batch`` windows from a chunk's (``rows`` windows): tensors with
    one row per window must hold the same row for every window (equal-length windows: masks, positions)."""

    def fit(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(fit(x) for x in v)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows and rows > 1:
            if not bool((v == v[:1]).all()):
                raise TritonqError(f"autoround batches calibration windows across chunks, but {label} gets a "
                                   "different keyword input per window; use windows of one length without padding")
            return v[:1].expand(batch, *v.shape[1:])
        return v

    return {k: fit(v) for k, v in kwargs.items()}


class AutoRound(Method):
    name = "autoround"
    summary = "AutoRound: rounding offsets and group ranges by signed gradient descent on the block output"
    Options = AutoRoundOptions
    scope = "block"
    needs_grad = True
    data_parallel_refusal = "its signed-gradient steps are not reduced across ranks; run it on one process"

    @property
    def float_targets(self) -> bool:  # type: ignore[override]
        return self.options.target == "float"

    def block_prepass(self, index: int) -> Method | None:
        return _AWQScales(self) if self.options.init == "awq" else None

    def quantize_block(self, block: BlockGroup) -> list[LayerResult]:
        o = self.options
        tuned = [_Tuned(name, lin.weight, spec, full)
                 for name, lin, spec, full in zip(block.names, block.linears, block.specs, block.full_names)]
        if not block.inputs:
            raise TritonqError("autoround needs calibration data; give --calib (the default is pydoc)")
        if o.init == "gptq":
            _start_from_gptq(block, tuned)
        hidden = torch.cat([c.hidden for c in block.inputs])
        targets = torch.cat(list(block.targets))
        rows = block.inputs[0].hidden.shape[0]
        # the batch order differs per block and per --seed (seed 0: the block index, as before the seed was used)
        gen = torch.Generator().manual_seed(block.index + _SEED_STRIDE * block.seed)
        sampler = _WindowSampler(hidden.shape[0], o.batch, gen)
        kwargs = _shared_kwargs(block.inputs[0].kwargs, rows, sampler.batch, block.label)
        params = [p for t in tuned for p in t.params]
        step_loss = _StepLoss.for_run(o.compile, o.trim)
        best, best_iter, first, kept = float("inf"), 0, None, None
        for step in range(max(o.iters, 1)):
            idx = sampler.next()
            last = o.iters == 0 or step == o.iters - 1  # the last step's update would never be scored
            loss, grads = step_loss(block.block, [t.fake_args for t in tuned], hidden[idx].to(block.device),
                                    targets[idx].to(block.device), kwargs, None if last else params)
            value = float(loss)
            if first is None:
                first = value
            if value < best:
                best, best_iter = value, step
                kept = [p.detach().clone() for p in params]
            if last:
                break
            lr = o.step_size * (1.0 - step / o.iters)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(g.sign(), alpha=lr)
                for t in tuned:
                    t.offsets.clamp_(-0.5, 0.5)
                    t.min_factor.clamp_(0.0, 1.0)
                    t.max_factor.clamp_(0.0, 1.0)
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
            info = {"loss": best, "loss_first_step": first, "best_step": best_iter}
            return [_result(t, info) for t in tuned]


def _block_loss(module: torch.nn.Module, linears: list[FakeArgs], hidden: torch.Tensor, target: torch.Tensor,
                kwargs: dict, trim: float = 0.0) -> torch.Tensor:
    """The step's loss: every linear's fake weight (``kernels.signround_qdq``), the block on ``hidden`` with them, and
    the MSE against ``target`` (:func:`trimmed_mse` with ``trim``). One function for the eager and the compiled step;
    compiled, the fake quantization is fused with the rest (on the CPU, SmolLM2 block 5, one thread: 1.21x a step,
    against 1.11x with it left outside, in one process)."""
    weights = {name: kernels.signround_qdq(w, v, lo, hi, group, maxq, sym)
               for name, w, v, lo, hi, group, maxq, sym in linears}
    return trimmed_mse(block_forward(module, hidden, kwargs, weights), target, trim)


def trimmed_mse(output: torch.Tensor, target: torch.Tensor, trim: float) -> torch.Tensor:
    """The mean squared error with the largest ``int(trim * numel)`` squared errors counted as zero (the mean is still
    over every element), so that a few outlier outputs (SmolLM2's massive activations) do not steer every sign.
    auto-round's SignRoundV2 extension (``enable_alg_ext``, ``sign_roundv2/quantizer.py``) does the same with 0.001
    for symmetric grids below 4 bits; ``trim = 0`` is :func:`torch.nn.functional.mse_loss`."""
    if trim <= 0.0:
        return F.mse_loss(output, target)
    squared = (output - target).square().flatten()
    left_out = int(trim * squared.numel())
    if left_out == 0:
        return squared.mean()
    keep = torch.ones_like(squared).index_fill_(0, squared.detach().topk(left_out).indices, 0.0)
    return (squared * keep).mean()


class _StepLoss:
    """One step's loss and, unless it is the last step, its gradients in ``params``; eager, or through one
    ``torch.compile`` of :func:`_block_loss` shared by every block and run of the process."""

    _compiled: Any = None
    _failed = False  # the compiler failed once in this process: later runs go eager without trying again

    def __init__(self, compiled: bool, trim: float = 0.0) -> None:
        self.compiled, self.trim = compiled, trim

    @classmethod
    def for_run(cls, compile: bool, trim: float = 0.0) -> _StepLoss:
        if compile and cls._compiled is None and not cls._failed:
            cls._compiled = torch.compile(_block_loss, options={"emulate_precision_casts": True})
        return cls(compile and not cls._failed, trim)

    def __call__(self, module: torch.nn.Module, linears: list[FakeArgs], hidden: torch.Tensor, target: torch.Tensor,
                 kwargs: dict, params: list[torch.Tensor] | None) -> tuple[torch.Tensor, tuple | None]:
        if self.compiled:
            try:
                return self._run(type(self)._compiled, module, linears, hidden, target, kwargs, params, self.trim)
            except Exception as exc:  # noqa: BLE001 - any compiler failure; eager below re-raises a real error
                type(self)._failed, self.compiled = True, False
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                warnings.warn(f"autoround --compile: torch.compile failed ({type(exc).__name__}: {first[:200]}); "
                              "running the steps eagerly", RuntimeWarning, stacklevel=2)
        return self._run(_block_loss, module, linears, hidden, target, kwargs, params, self.trim)

    @staticmethod
    def _run(fn: Any, module: torch.nn.Module, linears: list[FakeArgs], hidden: torch.Tensor, target: torch.Tensor,
             kwargs: dict, params: list[torch.Tensor] | None, trim: float) -> tuple[torch.Tensor, tuple | None]:
        loss = fn(module, linears, hidden, target, kwargs, trim)
        grads = None if params is None else torch.autograd.grad(loss, params)
        return loss.detach(), grads


class _AWQScales(AWQ):
    """``--init awq``: AWQ's scale search and fold on the block (no clip, no rounding); the pipeline runs it in its
    staged loop before the tuning (``Method.block_prepass``), and it hands back the folded float weights."""

    name = "autoround-awq-init"

    def __init__(self, outer: Method) -> None:
        super().__init__(AWQOptions(no_clip=True))
        self.outer = outer

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec:
        return self.outer.layer_grid(name, spec)

    def quantize(self, group: Group, state: Any) -> list[LayerResult]:
        self.search_and_fold(group, state)
        empty = torch.empty(0)
        return [LayerResult(lin.weight.data.float(), empty, empty, empty) for lin in group.linears]


def _result(t: _Tuned, info: dict) -> LayerResult:
    """The kept parameters' quantized weight and grid (codes on ``scale * (q - zero)`` exactly)."""
    weight = t.fake()
    scale, zero = t.grid()
    return LayerResult(weight, scale, zero, default_g_idx(t.w.shape[1], t.spec).to(t.w.device), dict(info), t.spec)


def _start_from_gptq(block: BlockGroup, tuned: list[_Tuned]) -> None:
    """Offsets that round each weight to GPTQ's code: GPTQ on every linear's input Hessian in the float block (one
    forward over the calibration chunks), on the min-max grid that the range factors start from."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for t, lin in zip(tuned, block.linears):
        acc = accs[t.name] = HessianAccumulator(lin.in_features, block.device)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0].detach())))
    try:
        with torch.no_grad():
            for c in range(len(block.inputs)):
                block.run(c)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for t, full in zip(tuned, block.full_names):
            res = gptq_solve([t.w], accs.pop(t.name).take(), t.spec, [full], GPTQOptions(act_order="static"))[0]
            scale, zero = t.grid()
            g = default_g_idx(t.w.shape[1], t.spec).long().to(t.w.device)
            codes = torch.round(res.weight.to(t.w.device) / scale[:, g]) + zero[:, g]
            t.offsets.copy_((codes - zero[:, g] - t.w / scale[:, g]).clamp_(-0.5, 0.5))
