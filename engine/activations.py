"""Dynamic activation quantization: the quantizer, the fake-quant linear wrapper, and where it is applied.

Grids (``../shared/docs/awq_family.md`` §0.1, last two rows):

* ``per-token`` symmetric (SmoothQuant, llmc W8A8): one scale per token, ``absmax / (2^(b-1) - 1)``, codes in
  ``[-2^(b-1), 2^(b-1) - 1]``;
* ``per-tensor`` asymmetric (AWRQ ``quantize_activation_per_tensor_asym``): one (scale, zero) from the min
  and max of the tensor, codes in ``[0, 2^b - 1]``;

and the other two combinations by the same rules. Ranges are computed at run time (dynamic) from the
tensor itself. Two choices of ours: the asymmetric range always contains 0 (``min(lo, 0)``, ``max(hi, 0)``,
as GPTQ's grid, so zero padding stays exact), and "per tensor" means per sequence (every dimension but the
batch), so a result does not depend on how many windows share a forward call (AWRQ's reference quantizes
one sequence per call, so this is the same thing there).

The activation setting is global (``QuantizeOptions.act_*``, flags ``--act-bits/--act-scheme/--act-sym``),
not a method option: ``methods/act_quant.py``'s ``WithActivationQuant`` wraps any method so that every
quantized linear runs on quantized inputs during the propagation to the next block (RTN, GPTQ, AWQ get it
unchanged), and
:func:`apply_activation_quant` wraps a loaded model's linears for ``tritonq eval``, ``generate`` and ``serve``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import TritonqError
from ..kernels.grid_rule import MIN_ACT_SCALE
from .outputs import QUANT_JSON, read_json_object, read_quantization_json

ACT_BITS = (8, 6, 4)
ACT_SCHEMES = ("per-token", "per-tensor")


@dataclass(frozen=True)
class ActSpec:
    """How a linear's input is quantized at run time."""

    bits: int = 8
    scheme: str = "per-token"
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise TritonqError(f"--act-bits must be one of {', '.join(map(str, ACT_BITS))}, got {self.bits!r}")
        if self.scheme not in ACT_SCHEMES:
            raise TritonqError(f"--act-scheme must be per-token or per-tensor, got {self.scheme!r}")

    def describe(self) -> dict:
        """The record in ``quantization.json`` and ``config.json``."""
        return {**asdict(self), "dynamic": True}

    @classmethod
    def from_record(cls, record: dict) -> ActSpec:
        return cls(bits=int(record["bits"]), scheme=record["scheme"], sym=bool(record["sym"]))


def _reduce_dims(x: torch.Tensor, scheme: str) -> tuple[int, ...]:
    if scheme == "per-token":
        return (-1,)
    return tuple(range(1, x.dim())) if x.dim() >= 3 else tuple(range(x.dim()))


def activation_params(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (fp32, broadcastable to ``x``) of the dynamic grid of ``x``; zero is 0 when symmetric."""
    dims = _reduce_dims(x, spec.scheme)
    xf = x.float()
    if spec.sym:
        absmax = xf.abs().amax(dim=dims, keepdim=True)
        scale = (absmax / (2 ** (spec.bits - 1) - 1)).clamp(min=MIN_ACT_SCALE)
        return scale, torch.zeros_like(scale)
    lo = xf.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=dims, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**spec.bits - 1)).clamp(min=MIN_ACT_SCALE)
    return scale, torch.round(-lo / scale)


def quantize_activation(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (fp32, signed when symmetric), scale and zero of ``x``."""
    scale, zero = activation_params(x, spec)
    if spec.sym:
        lim = 2 ** (spec.bits - 1)
        codes = torch.clamp(torch.round(x.float() / scale), -lim, lim - 1)
    else:
        codes = torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**spec.bits - 1)
    return codes, scale, zero


def fake_quantize_activation(x: torch.Tensor, spec: ActSpec | None) -> torch.Tensor:
    """``x`` rounded to its dynamic grid, in ``x``'s dtype (identity when ``spec`` is None)."""
    if spec is None:
        return x
    codes, scale, zero = quantize_activation(x, spec)
    return ((codes - zero) * scale).to(x.dtype)


class ActQuantLinear(nn.Module):
    """A linear (``nn.Linear`` or ``QuantLinear``) that fake-quantizes its input first."""

    def __init__(self, linear: nn.Module, spec: ActSpec) -> None:
        super().__init__()
        self.linear = linear
        self.spec = spec
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transform = getattr(self.linear, "input_transform", None)  # the online Hadamard (online_hadamard.py)
        if transform is not None:  # rotate, then quantize; the inner linear's forward skips its own hook
            x = transform(x)
        run_quantized = getattr(self.linear, "forward_act", None)  # an int8 runtime layer quantizes for real
        if run_quantized is not None:
            return run_quantized(x, self.spec)
        x = fake_quantize_activation(x, self.spec)
        return self.linear(x) if transform is None else self.linear.forward(x)

    def extra_repr(self) -> str:
        sym = "sym" if self.spec.sym else "asym"
        return f"act_bits={self.spec.bits}, {self.spec.scheme}, {sym}, dynamic"


def resolve_act_spec(default: ActSpec | None, bits: int | None, scheme: str | None,
                     sym: bool | None) -> ActSpec | None:
    """The activation setting of a run: the flags given over ``default`` (a method's ``default_act``, or a
    checkpoint's saved setting); None: float inputs."""
    if bits is None and default is None:
        if scheme is not None or sym is not None:
            raise TritonqError("--act-scheme / --act-sym need --act-bits (e.g. --act-bits 8)")
        return None
    base = default or ActSpec()
    return ActSpec(bits=base.bits if bits is None else bits, scheme=base.scheme if scheme is None else scheme,
                   sym=base.sym if sym is None else sym)


def apply_activation_quant(model: nn.Module, spec: ActSpec, names: list[str]) -> int:
    """Wrap the named linears of ``model`` (each once) in :class:`ActQuantLinear`; returns how many."""
    count = 0
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, leaf)
        if isinstance(module, ActQuantLinear):
            module.spec = spec
        else:
            setattr(parent, leaf, ActQuantLinear(module, spec))
        count += 1
    return count


def block_linear_names(model: nn.Module, adapter: Any) -> list[str]:
    """Every linear of every decoder block (the ones a method quantizes; lm_head stays float)."""
    blocks = adapter.block_list(model)
    return [f"{adapter.blocks}.{i}.{n}" for i in range(len(blocks)) for n in adapter.linear_names()]


def saved_act_spec(directory: str | Path) -> ActSpec | None:
    """The activation setting recorded in a tritonq output (``quantization.json``) or a packed checkpoint's
    ``config.json`` (tritonq's record beside the ``quantization_config``); None when weights only."""
    path = Path(directory)
    meta = path / QUANT_JSON
    if meta.is_file():
        record = read_quantization_json(meta).get("activations")
        return ActSpec.from_record(record) if record else None
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    config = read_json_object(cfg, "restore its config.json")
    if config.get("tritonq_activations"):
        return ActSpec.from_record(config["tritonq_activations"])
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    for group in groups.values():  # a compressed-tensors checkpoint from another tool (llm-compressor)
        inputs = group.get("input_activations")
        if inputs:
            if not inputs.get("dynamic") or inputs.get("strategy") not in ("token", "tensor"):
                raise TritonqError(f"{path}: input activations {inputs.get('strategy')!r} "
                                   f"(dynamic={inputs.get('dynamic')}) are not supported; tritonq runs dynamic "
                                   "per-token or per-tensor activation quantization")
            scheme = "per-token" if inputs["strategy"] == "token" else "per-tensor"
            return ActSpec(int(inputs["num_bits"]), scheme, bool(inputs.get("symmetric", True)))
    return None
