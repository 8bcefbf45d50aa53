"""What AWQ and its variants observe during calibration: per-pair statistics and a token sample
(:class:`PairObserver`), and the diagonal Gram blocks of a group's input for the clip error (:class:`GramObserver`).

Lin et al., AWQ, MLSys 2024 (arXiv:2306.00978); ``../shared/docs/awq_family.md`` §3.3 (``mean |x|`` per input
channel, candidates scored on the parent module's calls or one linear's inputs) and §3.4 (the clip error's exact
Gram form ``d^T H_g d``). The pipeline feeds both through its hooks (``group.on_call``, ``group.on_input``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...errors import TritonqError
from ..adapters import ScalePair
from ..distributed import SINGLE, Collective, OrderedSum


class PairObserver:
    """Calibration statistics of one scale pair, fed by the pipeline's hooks.

    ``mean |x|`` of the balance input over every token; a sample of ``sample_tokens`` tokens (0 = all) to
    score candidates on: the parent module's calls (``add_call``) or the balance linear's inputs (``add_stat``).
    """

    def __init__(self, pair: ScalePair, parent: str | None, sample_tokens: int,
                 moments: tuple[str, ...] = ("abs", "sq", "sum"), collective: Collective = SINGLE) -> None:
        self.pair = pair
        self.moments = moments  # which of |x|, x^2, x to sum (each is a pass over every token in fp64)
        self.parent = parent  # module whose output scores candidates; None: the single balance linear
        self.sample_tokens = sample_tokens
        # fp64 sums per channel of |x|, x^2 and x, in chunk order (several ranks: finished in one process's order)
        self._sums = {m: OrderedSum(collective) for m in ("abs", "sq", "sum") if m in moments}
        self.width = 0
        self.tokens = 0
        self.calls: list[tuple[tuple, dict]] = []
        self.inputs: list[torch.Tensor] = []
        self.sampled = 0

    @property
    def abs_sum(self) -> torch.Tensor | None:
        return self._sums["abs"].total if "abs" in self._sums else None

    @property
    def sq_sum(self) -> torch.Tensor | None:
        return self._sums["sq"].total if "sq" in self._sums else None

    @property
    def sum(self) -> torch.Tensor | None:
        return self._sums["sum"].total if "sum" in self._sums else None

    def _sample_full(self) -> bool:
        return 0 < self.sample_tokens <= self.sampled

    def add_stat(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        values: dict[str, Callable[[], torch.Tensor]] = {"abs": flat.abs, "sq": flat.square, "sum": lambda: flat}
        for moment, total in self._sums.items():
            total.add(values[moment]().sum(dim=0, dtype=torch.float64))
        self.width = flat.shape[1]
        self.tokens += flat.shape[0]
        if self.parent is None and not self._sample_full():
            self.inputs.append(x.reshape(-1, x.shape[-1]))
            self.sampled += flat.shape[0]

    def add_call(self, args: tuple, kwargs: dict) -> None:
        if self._sample_full():
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        windows, per_window = hidden.shape[0], hidden.shape[1:-1].numel()
        if self.sample_tokens and hidden.dim() > 2:  # whole windows: attention needs its full sequence
            need = -(-(self.sample_tokens - self.sampled) // per_window)
            if need < windows:
                args, kwargs = _take_windows(args, windows, need), _take_windows(kwargs, windows, need)
                windows = need
        self.calls.append((args, dict(kwargs)))
        self.sampled += windows * per_window

    def _mean(self, total: torch.Tensor | None, moment: str) -> torch.Tensor:
        if not self.tokens:
            raise TritonqError(f"AWQ saw no calibration tokens for the inputs of {self.pair.balance[0]}; "
                               "give calibration data")
        if moment not in self.moments:
            raise TritonqError(f"the observer of {self.pair.balance[0]} did not collect the {moment!r} moment; "
                               f"pass moments including it (it has {self.moments})")
        return (total / self.tokens).float()

    def mean_abs(self) -> torch.Tensor:
        """``E|x_j|`` (AWQ's activation statistic)."""
        return self._mean(self.abs_sum, "abs")

    def mean_sq(self) -> torch.Tensor:
        """``E[x_j^2]`` (DH-AWQ's "L2 salience")."""
        return self._mean(self.sq_sum, "sq")

    def mean(self) -> torch.Tensor:
        """``E[x_j]`` (DH-AWQ's mean input)."""
        return self._mean(self.sum, "sum")

    def sample_inputs(self) -> torch.Tensor:
        if not self.inputs:  # a rank whose windows all lie past the sample (several ranks): nothing to score
            return torch.empty(0, self.width)
        x = torch.cat(self.inputs)
        return x[: self.sample_tokens] if self.sample_tokens else x

    def reduce(self, collective: Collective) -> None:
        """Statistics of every rank's tokens, and the sample one process would take: the moment sums are finished
        in one process's chunk order (``OrderedSum``: bitwise one process's); the sample keeps the first
        ``sample_tokens`` tokens of the global window order (rank 0's windows first), so each rank keeps only the
        part of its own sample that one process would have taken, possibly none, and the search losses are
        reduced over the ranks (``awq_scale``)."""
        if collective.world == 1:
            return
        counts = collective.counts(self.tokens)
        before = sum(counts[: collective.rank])  # tokens on the lower ranks: this rank's offset in the global order
        if self.sample_tokens:
            self._trim_sample(max(0, self.sample_tokens - before))
        for total in self._sums.values():
            total.reduce(collective)
        self.tokens = sum(counts)

    def _trim_sample(self, budget: int) -> None:
        """Keep the first ``budget`` tokens of this rank's sample: whole windows of the calls (as ``add_call``
        takes them), tokens of the inputs (as ``sample_inputs`` cuts them)."""
        kept_calls, left = [], budget
        for args, kwargs in self.calls:
            if left <= 0:
                break
            hidden = args[0] if args else kwargs["hidden_states"]
            windows, per_window = hidden.shape[0], hidden.shape[1:-1].numel()
            need = -(-left // per_window)
            if hidden.dim() > 2 and need < windows:
                args, kwargs = _take_windows(args, windows, need), _take_windows(kwargs, windows, need)
                windows = need
            kept_calls.append((args, kwargs))
            left -= windows * per_window
        self.calls = kept_calls
        if self.inputs:
            x = torch.cat(self.inputs)[:budget]
            self.inputs = [x] if x.shape[0] else []


def _take_windows(value: Any, windows: int, keep: int) -> Any:
    """The first ``keep`` windows of a module call's arguments: tensors whose leading dimension is the batch
    are sliced, broadcast ones (position embeddings of shape [1, T, D], masks [1, 1, T, T]) kept."""
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() and value.shape[0] == windows else value
    if isinstance(value, tuple):
        return tuple(_take_windows(v, windows, keep) for v in value)
    if isinstance(value, list):
        return [_take_windows(v, windows, keep) for v in value]
    if isinstance(value, dict):
        return {k: _take_windows(v, windows, keep) for k, v in value.items()}
    return value


class GramObserver:
    """Diagonal ``g x g`` blocks of ``sum_t x_t x_t^T`` of one input (fp64 sums; the clip error's Gram form)."""

    def __init__(self, in_features: int, group: int, collective: Collective = SINGLE) -> None:
        self.group = group
        self._blocks = OrderedSum(collective)
        self.tokens = 0
        self.in_features = in_features

    @property
    def blocks(self) -> torch.Tensor | None:
        return self._blocks.total

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, self.in_features).float()
        grouped = flat.reshape(flat.shape[0], -1, self.group).transpose(0, 1)  # [G, T, g]
        self._blocks.add((grouped.transpose(1, 2) @ grouped).double())
        self.tokens += flat.shape[0]

    def reduce(self, collective: Collective) -> None:
        """Sums and token counts of every rank, the sums finished in one process's chunk order (``OrderedSum``)."""
        if collective.world == 1:
            return
        self._blocks.reduce(collective)
        self.tokens = collective.sum_count(self.tokens)

    def mean(self, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``[G, g, g]`` fp32 mean over tokens; of ``x / input_scale`` when given (exact rescaling)."""
        h = self.blocks / max(self.tokens, 1)
        if input_scale is not None:
            inv = (1.0 / input_scale.double()).reshape(-1, self.group)
            h = h * inv[:, :, None] * inv[:, None, :]
        return h.float()
