"""End-to-end scale tuning (``--tune-epochs``): after every block is quantized, the per-group scales of all the
quantized linears are trained together, through the whole model, to match the float model's next-token
distribution on the calibration windows. The integer codes and the zeros stay as the method left them, so every
output format takes the result unchanged: only ``scale`` moves.

This is EfficientQAT's second phase, E2E-QP (Chen et al., "EfficientQAT: Efficient Quantization-Aware Training
for Large Language Models", arXiv:2407.11062, ACL 2025): block-wise training first (here any method, AutoRound
the closest to its Block-AP), then only the step sizes end to end with the codes frozen. Where we differ:

- the loss is the KL divergence from the float model's next-token distribution (the teacher: the float model's
  last hidden states, captured before quantization, through the same float ``lm_head``), not the cross-entropy on
  the calibration text's own next tokens; with a few dozen windows of one text the labels would fit that text,
  the teacher's distribution says more per token and is what the quantized model is to keep;
- each scale is trained as a factor ``s0 * (1 + a)`` with ``a`` starting at 0, by Adam with a linearly decaying
  rate, so one rate (``--tune-lr``, a relative change per step) fits layers whose scales differ by orders of
  magnitude; EfficientQAT trains ``s`` itself with AdamW (rate 2e-5 at w2g64 on Llama-2);
- the trained scales are rounded to fp16, as every grid's are (``grid.py``), so the packed formats' fp16 scales
  reproduce the weights bit for bit;
- with ``norms`` (``--tune-norms``, on by default) the blocks' vectors are trained too, each entry as a factor
  ``v0 (1 + b)`` at the same rate: the norms' weights (and biases) and the linears' biases, which every format
  stores in float. EfficientQAT trains only the step sizes; a norm's weight scales its linears' input channels, a
  degree of freedom the per-output-channel scales lack. The evidence (bench/RESULTS.md): SmolLM2 at 2 bits on
  AutoRound's blocks, three tuning seeds: about 1% lower perplexity on the Vim manual and on the licenses in each,
  a tie in the KL on held-out pydoc (the texts that choose defaults here); WikiText-2 211.80 -> 206.81 at seed 0.

A batch's windows are run one at a time and their gradients summed (the same gradient as the batch at once, with
one window's activations in memory). The whole model is held in memory (the run does not stream from disk).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..errors import TritonqError
from .grid import MIN_SCALE, codes_of
from .stages import StopForward


@dataclass(frozen=True)
class ScaleTuning:
    """The settings of end-to-end scale tuning; ``epochs = 0`` turns it off (the default)."""

    epochs: int = 0
    lr: float = 3e-3  # relative change of a scale per step (Adam), decaying linearly to 0
    batch: int = 4  # calibration windows per step
    norms: bool = True  # train the blocks' norm weights and biases too (relative steps of the same rate)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise TritonqError(f"--tune-epochs must be a whole number >= 0, got {self.epochs!r}; e.g. --tune-epochs 2")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise TritonqError(f"--tune-lr must be a positive number, got {self.lr!r}; e.g. --tune-lr 0.003")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise TritonqError(f"--tune-batch must be a whole number >= 1, got {self.batch!r}; e.g. --tune-batch 4")
        if not isinstance(self.norms, bool):
            raise TritonqError(f"--tune-norms is on or off, got {self.norms!r}")

    @property
    def active(self) -> bool:
        return self.epochs > 0

    def describe(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch": self.batch, "norms": self.norms}


def head_name(model: nn.Module) -> str:
    """The name of the module that turns the last hidden states into logits (``get_output_embeddings``)."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None:
        raise TritonqError(f"{type(model).__name__} has no output embedding (lm_head); --tune-epochs needs a causal "
                           "LM's head to compare next-token distributions")
    return name


@contextmanager
def _head_input(model: nn.Module, head_name: str) -> Iterator[list[torch.Tensor]]:
    """Collect what enters ``lm_head`` and stop the forward there (the logits are computed outside, per window)."""
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0])
        raise StopForward

    handle = model.get_submodule(head_name).register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _last_hidden(model: nn.Module, head_name: str, ids: torch.Tensor) -> torch.Tensor:
    with _head_input(model, head_name) as seen:
        try:
            model(input_ids=ids, use_cache=False)
        except StopForward:
            pass
    if not seen:
        raise TritonqError(f"the model's forward never reached {head_name}; --tune-epochs needs a causal LM "
                           "whose logits come from that head")
    return seen[0]


def teacher_states(model: nn.Module, head_name: str, batches: list[torch.Tensor],
                   device: torch.device) -> list[torch.Tensor]:
    """The float model's hidden states entering ``lm_head``, one [seqlen, hidden] tensor per calibration window,
    kept on the CPU (the teacher of :func:`tune_scales`; the head itself stays float, so logits follow)."""
    states = []
    with torch.no_grad():
        for ids in batches:
            for row in ids:
                states.append(_last_hidden(model, head_name, row[None].to(device))[0].to("cpu"))
    return states


class _TunedLinear(nn.Module):
    """A quantized linear whose weight is ``s0 (1 + a)[g_idx] * (codes - zero[g_idx])``, ``a`` trainable."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
                 bits: int) -> None:
        super().__init__()
        idx = g_idx.long().to(linear.weight.device)
        scale, zero = scale.float().to(idx.device), zero.float().to(idx.device)
        codes = codes_of(linear.weight.detach(), scale, zero, idx, 2**bits - 1)
        self.register_buffer("centered", codes.float() - zero[:, idx])
        self.register_buffer("s0", scale)
        self.register_buffer("idx", idx)
        self.factor = nn.Parameter(torch.zeros_like(scale))
        self.linear = linear

    def scale(self) -> torch.Tensor:
        return self.s0 * (1 + self.factor)

    def weight_on(self, scale: torch.Tensor) -> torch.Tensor:
        """The weight on the grid of ``scale`` [N, G] (the codes and zeros fixed)."""
        return scale[:, self.idx] * self.centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_on(self.scale()).to(x.dtype), self.linear.bias)

    def final_scale(self) -> torch.Tensor:
        """The trained scale, fp16-representable and positive, as every grid's."""
        return self.scale().detach().clamp_min(MIN_SCALE).half().float()


class _VectorFactor(nn.Module):
    """A parametrization ``v = v0 (1 + factor)`` of a float vector: a relative step, as the scales take (a norm's
    weights range from 0.05 to 2 across SmolLM2's blocks, so one absolute rate would be 6% per step for some); the
    factor is float32 whatever the model's dtype (a bf16 vector would round Adam's small steps away). A zero entry
    (an untrained bias) stays zero."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(original.dtype, torch.float32)
        return (original.to(dtype) * (1 + self.factor.to(dtype))).to(original.dtype)


def block_vectors(model: nn.Module, blocks: str) -> list[str]:
    """The 1-D parameters inside the blocks (``blocks`` is the adapter's prefix, e.g. ``model.layers``): the norms'
    weights and biases and the linears' biases, which every format stores in float (the embedding, the final norm
    and ``lm_head`` lie outside the blocks, and the work directory keeps only blocks)."""
    return [name for name, p in model.named_parameters() if name.startswith(f"{blocks}.") and p.dim() == 1]


@dataclass
class TuningResult:
    scales: dict[str, torch.Tensor]  # the new scale of every tuned linear (CPU, fp32)
    log: dict  # KL before and after each epoch, steps, seconds


def _kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)  # at least fp32 for the softmax
    student = F.log_softmax(head(student_hidden).to(dtype), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(head(teacher_hidden.to(student_hidden.dtype)).to(dtype), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / student.shape[0]


def tune_scales(model: nn.Module, head_name: str, layers: dict[str, tuple], batches: list[torch.Tensor],
                teacher: list[torch.Tensor], tuning: ScaleTuning, device: torch.device, seed: int = 0,
                progress: Callable[[str], None] | None = None, vectors: list[str] = ()) -> TuningResult:
    """Train the scales of ``layers`` (name -> ``(scale, zero, g_idx, bits)``; the model's linears hold their
    fake-quantized weights), and the float parameters named in ``vectors`` (:func:`block_vectors`), on the
    calibration ``batches`` against ``teacher`` (:func:`teacher_states`). The linears get the tuned weights back,
    the vectors their tuned values; returns the scales. The window order of each epoch is drawn from ``seed``."""
    windows = [row for ids in batches for row in ids]
    if len(windows) != len(teacher):
        raise TritonqError(f"scale tuning has {len(windows)} calibration windows but {len(teacher)} teacher states")
    head = model.get_submodule(head_name)
    tuned: dict[str, _TunedLinear] = {}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    parametrized: list[tuple[nn.Module, str]] = []
    log = None
    try:
        for name in vectors:  # before the linears are wrapped, while the names still lead to their modules
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            parametrize.register_parametrization(module, leaf, _VectorFactor(getattr(module, leaf)))
            parametrized.append((module, leaf))
        for name, (scale, zero, g_idx, bits) in layers.items():
            parent, _, leaf = name.rpartition(".")
            wrapper = _TunedLinear(model.get_submodule(name), scale, zero, g_idx, bits)
            setattr(model.get_submodule(parent), leaf, wrapper)
            tuned[name] = wrapper
        factors = [module.parametrizations[leaf][0].factor for module, leaf in parametrized]
        log = _train(model, head_name, head, tuned, factors, windows, teacher, tuning, device, seed, progress)
    finally:  # the linears and vectors go back in place; they take the tuned values only from a finished tuning
        for module, leaf in parametrized:
            parametrize.remove_parametrizations(module, leaf, leave_parametrized=log is not None)
        scales = {}
        for name, wrapper in tuned.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, wrapper.linear)
            if log is None:
                continue
            scale = wrapper.final_scale()
            with torch.no_grad():  # the weight the packers rebuild from (scale, codes, zero), in the linear's dtype
                wrapper.linear.weight.copy_(wrapper.weight_on(scale).to(wrapper.linear.weight.dtype))
            scales[name] = scale.cpu()
        for p, flag in frozen:
            p.requires_grad_(flag)
    # with the fp16 scales the output stores
    log["kl_end"] = _mean_kl(model, head_name, head, windows, teacher, device)
    if progress:
        progress(f"scale tuning: KL to the float model {log['kl_start']:.4f} -> {log['kl_end']:.4f}")
    return TuningResult(scales, log)


def _mean_kl(model, head_name, head, windows, teacher, device) -> float:
    with torch.no_grad():
        total = sum(_kl(_last_hidden(model, head_name, w[None].to(device))[0], t.to(device), head).item()
                    for w, t in zip(windows, teacher))
    return total / len(windows)


def _train(model, head_name, head, tuned, vector_factors, windows, teacher, tuning, device, seed, progress) -> dict:
    params = [w.factor for w in tuned.values()] + vector_factors
    per_epoch = math.ceil(len(windows) / tuning.batch)
    steps = tuning.epochs * per_epoch
    optimizer = torch.optim.Adam(params, lr=tuning.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    log = {"kl_start": _mean_kl(model, head_name, head, windows, teacher, device), "train_kl": [], "steps": steps}
    if progress:
        vectors = f" and {sum(p.numel() for p in vector_factors)} norm and bias values" if vector_factors else ""
        progress(f"scale tuning: {sum(w.factor.numel() for w in tuned.values())} scales of {len(tuned)} linears"
                 f"{vectors}, {steps} steps; KL to the float model {log['kl_start']:.4f}")
    with torch.enable_grad():
        for epoch in range(tuning.epochs):
            order = torch.randperm(len(windows), generator=generator).tolist()
            epoch_loss = 0.0
            for start in range(0, len(order), tuning.batch):
                picked = order[start:start + tuning.batch]
                optimizer.zero_grad(set_to_none=True)
                for i in picked:  # one window's activations at a time; the gradients add up to the batch's
                    hidden = _last_hidden(model, head_name, windows[i][None].to(device))[0]
                    loss = _kl(hidden, teacher[i].to(device), head)
                    (loss / len(picked)).backward()
                    epoch_loss += loss.item()
                if any(not torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                    raise TritonqError("scale tuning met a non-finite gradient; lower --tune-lr, or drop --tune-epochs")
                optimizer.step()
                schedule.step()
            log["train_kl"].append(epoch_loss / len(windows))
            if progress:
                progress(f"scale tuning: epoch {epoch + 1}/{tuning.epochs}, mean KL {log['train_kl'][-1]:.4f} "
                         f"({time.perf_counter() - started:.0f} s)")
    log["seconds"] = round(time.perf_counter() - started, 3)
    return log
