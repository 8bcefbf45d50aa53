"""Data-parallel calibration on ``torch.distributed``: one process per device, each with a disjoint share of the
calibration windows, statistics reduced before every solve.

``torchrun --nproc-per-node N -m tritonq quantize ...`` (or ``tritonq quantize --nproc N``, which launches the
same through ``torch.distributed.run``) starts N ranks. gloo on the CPU, NCCL on CUDA (each rank on
``cuda:LOCAL_RANK``; that path is written but was only run with gloo on a CPU here). The design follows the
DDP path of llm-compressor (``docs/guides/big_models_and_distributed/distributed_oneshot.md``): partial Hessians
are reduced, each solve runs on an owner rank chosen by a greedy bin-packing over estimated costs, and the owner
broadcasts the result.

:class:`Collective` is what the engine sees of the ranks. The reduction order is fixed, never the backend's:

* **statistics that one process accumulates chunk by chunk** (GPTQ's running-mean Hessian, AWQ's fp64 moment and
  Gram sums) are finished *in one process's order*: each rank holds whole ``--calib-batch`` chunks (rank r the
  r-th contiguous range, :meth:`Collective.share`), rank 0 accumulates its chunks as one process does, sends the
  state to rank 1, which continues it with its own chunks, and so on; the last rank broadcasts
  (:meth:`Collective.in_rank_order`, :class:`OrderedSum`). The result is one process's, bit for bit: the same
  operations on the same operands in the same order. Only the state travels (a K x K Hessian, a K vector). The
  price: the accumulation of a later rank runs after the one before it (the forwards still run in parallel),
  and a later rank keeps its share of the observed input (T / world x K) until the fold;
* **other sums** (AWQ's per-candidate search losses, BoA's and AWRQ's merged statistics) are *all-gathered*
  and added in rank order, 0 first, in float64, on every rank (:meth:`Collective.sum`): the same bits on every
  rank whatever the backend's reduction tree (an ``all_reduce`` may add in any order);
* maxima (SmoothQuant's ``max |x|``) are exact in any order (:meth:`Collective.max`).

When ``torch.distributed`` is not initialised, :func:`current_collective` is the single-process
:data:`SINGLE`: world 1, every call returns its input unchanged, so the one-process path changes no number.
How each method runs on several ranks is declared on the method (``Method.data_parallel``, ``methods/base.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..errors import TritonqError

# A rank that stops with an error leaves the others waiting in a collective: they fail after this long (torchrun's
# agent usually stops them sooner, when it sees the failed rank exit). Override with TRITONQ_DIST_TIMEOUT (seconds).
DEFAULT_TIMEOUT_S = 1800


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Collective:
    """This process's place among the ranks and the deterministic collectives (identity when ``world == 1``)."""

    rank: int = 0
    world: int = 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the output, evaluates and shows progress; the other ranks write nothing."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank is here (a no-op in one process)."""
        if self.world > 1:
            try:
                _dist().barrier()
            except Exception as exc:  # noqa: BLE001 - one line naming the rank, as every collective here
                raise TritonqError(_failed(self, "barrier", exc)) from None

    def bounds(self, count: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share of ``count`` items (sizes differ by at most one)."""
        return self.rank * count // self.world, (self.rank + 1) * count // self.world

    def share(self, items: torch.Tensor, align: int = 1) -> torch.Tensor:
        """This rank's disjoint, contiguous share of the calibration windows ``items`` (along dim 0), in whole
        chunks of ``align`` windows (``--calib-batch``): rank r takes the r-th of ``world`` near-equal ranges of
        chunks, so the ranks' chunks in rank order are exactly one process's chunks, in its order."""
        if self.world == 1:
            return items
        chunks = -(-items.shape[0] // align)
        if chunks < self.world:
            raise TritonqError(f"{items.shape[0]} calibration windows make {chunks} chunk(s) of --calib-batch "
                               f"{align}, fewer than the {self.world} ranks; give more --nsamples or a smaller "
                               "--calib-batch, or run fewer ranks")
        start, stop = self.bounds(chunks)
        return items[start * align:stop * align]

    def _gather(self, tensor: torch.Tensor, op: str) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order, on ``tensor``'s device (sent from the backend's device)."""
        dist = _dist()
        wire = tensor.to(self._device()).contiguous()
        parts = [torch.empty_like(wire) for _ in range(self.world)]
        try:
            dist.all_gather(parts, wire)
        except RuntimeError as exc:
            raise TritonqError(_failed(self, op, exc)) from exc
        return [p.to(tensor.device) for p in parts]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``tensor`` (same shape on every rank), added in rank order in float64 (int64 for
        integer tensors) and returned in that precision: bit-identical on every rank."""
        wide = torch.float64 if tensor.is_floating_point() else torch.int64
        if self.world == 1:
            return tensor.to(wide)
        parts = self._gather(tensor.to(wide), "sum")
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def sum_count(self, count: int) -> int:
        """Sum of an integer over the ranks (token counts)."""
        if self.world == 1:
            return count
        return int(self.sum(torch.tensor([count], dtype=torch.int64))[0])

    def counts(self, count: int) -> list[int]:
        """Every rank's ``count``, in rank order (e.g. to place this rank's tokens in the global order)."""
        if self.world == 1:
            return [count]
        parts = self._gather(torch.tensor([count], dtype=torch.int64), "counts")
        return [int(p[0]) for p in parts]

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise max of every rank's ``tensor``, in its own dtype (exact: order does not matter)."""
        if self.world == 1:
            return tensor
        parts = self._gather(tensor, "max")
        out = parts[0].clone()
        for part in parts[1:]:
            out = torch.maximum(out, part)
        return out

    def in_rank_order(self, carry: list[torch.Tensor],
                      resume: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Finish a fold over the calibration chunks in one process's order, bit for bit: rank 0's ``carry`` (its
        own chunks folded from the start) goes to rank 1, which folds its chunks onto it (``resume(carry)``),
        sends the result to rank 2, and so on; the last rank's result is broadcast to all. On ranks > 0 the given
        ``carry`` only gives the shapes and dtypes. The folds run one rank after another (only the forwards that
        produced the chunks ran in parallel); what travels is the state (e.g. one K x K Hessian), not the tokens."""
        if self.world == 1:
            return carry
        dist, wire_device = _dist(), self._device()
        try:
            if self.rank > 0:
                received = []
                for template in carry:
                    wire = torch.empty(template.shape, dtype=template.dtype, device=wire_device)
                    dist.recv(wire, src=self.rank - 1)
                    received.append(wire.to(template.device))
                carry = resume(received)
            if self.rank < self.world - 1:
                for t in carry:
                    dist.send(t.to(wire_device).contiguous(), dst=self.rank + 1)
            out = []
            for t in carry:
                wire = t.to(wire_device).contiguous()
                dist.broadcast(wire, src=self.world - 1)
                out.append(wire.to(t.device))
        except RuntimeError as exc:
            raise TritonqError(_failed(self, "in-order fold", exc)) from exc
        return out

    def broadcast(self, value: Any, owner: int) -> Any:
        """``value`` as the ``owner`` rank holds it, on every rank (pickled: give CPU tensors)."""
        if self.world == 1:
            return value
        box = [value if self.rank == owner else None]
        try:
            _dist().broadcast_object_list(box, src=owner)
        except RuntimeError as exc:
            raise TritonqError(_failed(self, "broadcast", exc)) from exc
        return box[0]

    def _device(self) -> torch.device:
        dist = _dist()
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = Collective()  # one process: every collective is the identity


def _failed(collective: Collective, op: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {collective.rank} of {collective.world}: the {op} with the other ranks failed ({first}); another "
            "rank has probably stopped with an error (see its output) or timed out")


def current_collective() -> Collective:
    """The ranks of this process's default ``torch.distributed`` group, or :data:`SINGLE` when none is initialised."""
    if not torch.distributed.is_available():
        return SINGLE
    dist = _dist()
    if not dist.is_initialized():
        return SINGLE
    return Collective(dist.get_rank(), dist.get_world_size())


def launched_world() -> int:
    """The world size a launcher (torchrun) set in the environment; 1 when there is none."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise TritonqError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun "
                           "or tritonq quantize --nproc N") from exc


def init_from_env(device: torch.device) -> Collective:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL for a
    CUDA ``device`` (this rank then uses ``cuda:LOCAL_RANK``), gloo otherwise. World 1: nothing to join."""
    if launched_world() <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TritonqError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun or "
                           "tritonq quantize --nproc N")
    dist = _dist()
    if dist.is_initialized():
        return current_collective()
    timeout = timedelta(seconds=float(os.environ.get("TRITONQ_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's own device
        backend = "nccl"
    dist.init_process_group(backend, timeout=timeout)
    return current_collective()


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    if torch.distributed.is_available() and _dist().is_initialized():
        _dist().destroy_process_group()


def assign_owners(costs: list[float], world: int) -> list[int]:
    """The rank that solves each job: longest job first onto the least loaded rank (ties: the lower index, the
    lower rank), the greedy bin-packing llm-compressor uses for its Hessian owners. Deterministic."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


class OrderedSum:
    """A sum over calibration chunks, ``part`` then ``total + part`` as one process adds them, that several ranks
    finish bit for bit: rank 0 adds as it goes; a later rank keeps its parts, and :meth:`reduce` adds them, in
    order, onto the total of the ranks before it (:meth:`Collective.in_rank_order`). Used for the fp64 moment and
    Gram sums of AWQ's observers, whose parts are small (a vector or a few g x g blocks per chunk)."""

    def __init__(self, collective: Collective = SINGLE) -> None:
        self.total: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []
        self._keep = collective.world > 1 and collective.rank > 0

    def add(self, part: torch.Tensor) -> None:
        if self._keep:
            self.parts.append(part)
        else:
            self.total = part if self.total is None else self.total + part

    def reduce(self, collective: Collective) -> torch.Tensor | None:
        """The sum over every rank's chunks, on every rank (this rank's ``total`` at world 1)."""
        if collective.world == 1:
            return self.total
        template = self.total if self.total is not None else self.parts[0]

        def resume(carry: list[torch.Tensor]) -> list[torch.Tensor]:
            total = carry[0]
            for part in self.parts:
                total = total + part
            return [total]

        self.total = collective.in_rank_order([template], resume)[0]
        self.parts, self._keep = [], False
        return self.total
