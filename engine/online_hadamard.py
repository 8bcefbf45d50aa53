"""The online Hadamard on the ``down_proj`` input (issue 24 item 2; QuaRot, Ashkboos et al. 2024,
arXiv:2404.00456, §4): the MLP's intermediate activations are rotated at run time, right before they are quantized.

``down_proj`` computes ``W u``. With an orthogonal ``T``, ``(W T^T) (T u) == W u``: the weight absorbs ``T^T``
offline (:func:`fold_online`, float64) and the input is multiplied by ``T`` at run time (:class:`OnlineHadamard`).
The outliers of ``u`` (a few channels of ``gate * up``) are spread over all channels of ``T u``, so a 4- or 8-bit
per-token grid loses far less on them. No norm sits between ``up_proj`` and ``down_proj`` to fold a rotation into,
which is why this one runs online; the residual stream and the value heads are rotated offline (``rotation.py``).

``T = H diag(s) / sqrt(n)``: ``s`` random signs from ``--rotate-seed`` (a generator of its own), ``H = B (x) S_p``
with ``S_p`` the Sylvester matrix of the largest power of two ``p`` that a Paley base ``B`` of order ``m = n / p``
completes (``orthogonal.hadamard_factors``). SmolLM2's intermediate width 1536 = 12 x 128: ``B`` is Paley I over
GF(11) (order 12), ``p = 128``. The ``p`` part runs as fast Walsh-Hadamard butterflies (``kernels/hadamard.py``:
the Triton kernel on CUDA, its PyTorch reference on the CPU), ``B`` as a small matmul. Where no Hadamard matrix of
order ``n`` is built here, ``B`` is a Haar-random orthogonal ``m x m`` (times ``sqrt(m)``) from the same seed.

When: with ``--rotate hadamard|random`` *and* activation quantization (``--act-bits``). Weight-only rotated runs
stay offline-only, as item 1 made them: their outputs do not change, they run with no extra work, and every format
(GPTQ, AWQ, GGUF too) can still hold them. ``--rotate random`` uses the same randomised Hadamard here (QuaRot's
online transform is always a Hadamard: it must be fast).

Where: at the input of the balance linear of the adapter's linear -> linear scale pair (``up_proj -> down_proj``).
No channel scale can cross the transform, so that pair is dropped from the adapter a run's methods see
(:func:`without_online_pairs`: AWQ, SmoothQuant, AWRQ then balance only the norm -> linear pairs).

How: :func:`attach` gives the linear an ``input_transform`` and a forward pre-hook that applies it, registered
first, so the calibration's input observations (the Hessian) see ``T u``; ``ActQuantLinear`` applies it itself
before quantizing and calls the inner linear's ``forward`` (which skips the hook). The same hook serves float,
fake-quantized and packed (``QuantLinear``, ``Int8Linear``) linears. ``quantization.json`` records it
(:meth:`OnlineHadamard.describe`); :func:`attach_saved` rebuilds it for ``eval``, ``generate`` and ``serve``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import TritonqError
from .adapters import Adapter, ScalePair
from .orthogonal import hadamard_factors, random_orthogonal
from .outputs import QUANT_JSON, read_json_object, read_quantization_json

RECORD_KEY = "online_hadamard"  # quantization.json's entry
CONFIG_KEY = "tritonq_online_hadamard"  # config.json's (beside tritonq_activations): packed copies keep it


class OnlineHadamard(nn.Module):
    """``x -> x T^T`` along the last dimension, ``T = (B (x) S_p) diag(s) / sqrt(n)`` (module docstring).

    The signs and the base are plain float64 tensors, not buffers: a model's ``.to(dtype)`` leaves them exact,
    and they are not written with the weights (the record rebuilds them)."""

    def __init__(self, signs: torch.Tensor, base: torch.Tensor | None, construction: str, seed: int) -> None:
        super().__init__()
        self.size = signs.numel()
        self.signs, self.base = signs.double(), None if base is None else base.double()
        self.construction, self.seed = construction, seed
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}  # (device, dtype) -> signs, base

    @classmethod
    def build(cls, n: int, seed: int) -> OnlineHadamard:
        """The transform of width ``n`` for ``--rotate-seed`` ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        factors = hadamard_factors(n)
        if factors is not None:
            base, _, how = factors
            return cls(signs, base, f"{how}, random signs", seed)
        p = n & -n
        m = n // p
        base = random_orthogonal(m, gen) * math.sqrt(m)
        return cls(signs, base, f"no Hadamard of order {n} here: Haar random {m} x Sylvester {p}, random signs", seed)

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (x.device, x.dtype)
        if key not in self._cast:
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            self._cast[key] = (self.signs.to(x.device, x.dtype),
                               None if self.base is None else self.base.to(x.device, work))
        return self._cast[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import hadamard_transform

        if x.shape[-1] != self.size:
            raise TritonqError(f"the online Hadamard has width {self.size}, its input {x.shape[-1]}; the record "
                               "does not match this model (re-quantize, or restore quantization.json)")
        signs, base = self._factors(x)
        return hadamard_transform(x * signs, base)

    def matrix(self) -> torch.Tensor:
        """The dense ``T`` [n, n], float64 (``forward(x) == x @ T.T``)."""
        eye = torch.eye(self.size, dtype=torch.float64)
        return self.forward(eye).T.contiguous()

    def describe(self) -> dict:
        p = self.size if self.base is None else self.size // self.base.shape[0]
        return {"size": self.size, "base_order": self.size // p, "power_of_two": p,
                "construction": self.construction, "seed": self.seed, "at": "down_proj input"}

    def extra_repr(self) -> str:
        return f"{self.size}: {self.construction} (seed {self.seed})"


def online_pair(adapter: Adapter) -> ScalePair | None:
    """The adapter's linear -> linear scale pair (``up_proj -> down_proj``): the transform sits between the two."""
    readers = set(adapter.stream.readers) if adapter.stream is not None else set()
    pairs = [p for p in adapter.input_pairs if p not in readers]
    return pairs[0] if len(pairs) == 1 else None


def online_targets(adapter: Adapter) -> tuple[str, ...]:
    """The per-block linears whose inputs the transform rotates; an error naming the reason where there is none."""
    pair = online_pair(adapter)
    if pair is None:
        raise TritonqError(f"{adapter.family} declares no linear -> linear MLP pair for the online Hadamard; "
                           "use --rotate none or weight-only (no --act-bits)")
    return pair.balance


def without_online_pairs(adapter: Adapter) -> Adapter:
    """``adapter`` without the pair the transform sits in: no channel scale may cross it."""
    from dataclasses import replace

    pair = online_pair(adapter)
    return replace(adapter, input_pairs=tuple(p for p in adapter.input_pairs if p != pair))


def fold_online(linear: nn.Module, transform: OnlineHadamard) -> None:
    """``W <- W T^T`` in float64: the linear then expects ``T u`` for ``u``."""
    t = transform.matrix()
    with torch.no_grad():
        linear.weight.data.copy_((linear.weight.data.double() @ t.T).to(linear.weight.dtype))


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_transform(args[0]), *args[1:])


def attach(linear: nn.Module, transform: OnlineHadamard) -> None:
    """Run ``transform`` on ``linear``'s input from now on (a forward pre-hook, registered before any other)."""
    if getattr(linear, "input_transform", None) is not None:
        raise TritonqError("this linear already has an online transform; attach it once")
    linear.input_transform = transform
    linear.register_forward_pre_hook(_pre_hook, prepend=True)


def input_transform_of(module: nn.Module) -> OnlineHadamard | None:
    """The transform attached to ``module`` (None where there is none)."""
    return getattr(module, "input_transform", None)


def apply_online(model: nn.Module, adapter: Adapter, seed: int, fold: bool) -> OnlineHadamard:
    """Attach the transform to every block's target linears (``fold``: and fold ``T^T`` into their weights, on a
    float model about to be calibrated; a saved checkpoint holds folded weights already)."""
    blocks = adapter.block_list(model)
    names = online_targets(adapter)
    width = blocks[0].get_submodule(names[0]).in_features
    transform = OnlineHadamard.build(width, seed)
    for block in blocks:
        for name in names:
            linear = block.get_submodule(name)
            if fold:
                fold_online(linear, transform)
            attach(linear, transform)
    return transform


def saved_record(directory: str | Path) -> dict | None:
    """The online transform a tritonq output (fake or packed) was made with: ``quantization.json``'s record, else
    ``config.json``'s (a checkpoint copied without its ``quantization.json`` still runs as it was made)."""
    path = Path(directory)
    if (path / QUANT_JSON).is_file():
        record = read_quantization_json(path / QUANT_JSON).get(RECORD_KEY)
        if record:
            return record
    if (path / "config.json").is_file():
        return read_json_object(path / "config.json", "restore its config.json").get(CONFIG_KEY) or None
    return None


def attach_saved(model: nn.Module, directory: str | Path, adapter: Any = None) -> OnlineHadamard | None:
    """Rebuild and attach the transform recorded in ``directory`` (None where it records none)."""
    record = saved_record(directory)
    if record is None:
        return None
    from .adapters import adapter_for

    adapter = adapter or adapter_for(model.config)
    transform = apply_online(model, adapter, int(record["seed"]), fold=False)
    check_rebuilt(transform, record, directory)
    return transform


def check_rebuilt(transform: OnlineHadamard, record: dict, where: str | Path) -> None:
    """Refuse a transform that is not the one ``record`` describes (another construction or width here)."""
    if transform.describe()["construction"] != record.get("construction") or transform.size != record.get("size"):
        raise TritonqError(f"{where}: the recorded online Hadamard ({record.get('construction')}, size "
                           f"{record.get('size')}) does not rebuild here ({transform.extra_repr()}); re-quantize")


def rebuild(record: dict, where: str | Path) -> OnlineHadamard:
    """The transform a ``quantization.json`` / ``config.json`` record describes, built again from its seed."""
    transform = OnlineHadamard.build(int(record["size"]), int(record["seed"]))
    check_rebuilt(transform, record, where)
    return transform
