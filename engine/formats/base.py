"""The writer interface every output format implements, and the shared part of the safetensors layouts.

:class:`OutputFormat` is one ``--format``: ``check(request)`` refuses, before calibration, what the layout
cannot hold (:class:`~tritonq.engine.formats.request.FormatRequest`), and ``write(ckpt, out, shard_bytes)``
writes a :class:`~tritonq.engine.formats.checkpoint.Checkpoint` (in memory or read from a fake output)
into the directory ``out``, one layer at a time. :class:`PackedFormat` is the shape shared by the packed
safetensors layouts (compressed-tensors, GPTQ, AWQ): per layer ``pack_layer`` gives the packed tensors, per
checkpoint ``config`` gives the ``quantization_config``; ``read`` and ``recognizes`` read them back. The shape
of gpt-fast's ``*QuantHandler`` classes (pytorch-labs/gpt-fast ``quantize.py``), collected in one dict in
:mod:`~tritonq.engine.formats.registry`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ...errors import warn
from ..activations import ActSpec
from ..grid import GridSpec
from ..outputs import QUANT_JSON
from .records import QuantizedWeight, is_default_g_idx, layout_key, model_dtype
from .store import ShardedWriter, TensorStore

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


@dataclass(frozen=True)
class FormatRequest:
    """A quantize run as an output format sees it before calibration starts."""

    layer_grids: Mapping[str, GridSpec]  # every linear that will be quantized (the model's names) -> its grid
    config: dict  # the model's config.json as a dict
    tokenizer_json: dict | None  # the tokenizer's tokenizer.json (formats that embed the vocabulary need it)
    act_order_groups: str | None  # None, "static" or "dynamic" (Method.act_order_groups)
    activations: ActSpec | None  # the run's activation quantization, None for weight-only
    online_transform: bool = False  # the run rotates the down_proj input at run time (engine/online_hadamard.py)


class OutputFormat:
    """One ``--format``. Subclasses set ``name`` and implement ``check`` and ``write``."""

    name: ClassVar[str]
    #: how the layout holds ``--quantize-head`` tables (``formats/head.py``): None refuses them, -1 keeps the
    #: per-channel int8 scales as they are, a block size repeats them per block of that many weights
    head_block: ClassVar[int | None] = None
    #: what other loaders make of those tables, when it needs saying (warned and kept in quantization.json)
    head_note: ClassVar[str | None] = None
    #: whether a checkpoint in this layout can carry an online transform of a linear's input (the online Hadamard
    #: of ``--rotate`` with ``--act-bits``): other loaders of the layout would run the model without it
    holds_online_transform: ClassVar[bool] = False

    def check(self, request: FormatRequest) -> None:
        """Refuse a request this layout cannot hold, before any work; the message names the fix."""

    def write(self, ckpt: Checkpoint, out: Path, shard_bytes: int | None = None) -> None:
        """Write ``ckpt`` into the (empty, temporary) directory ``out``; shards of at most ``shard_bytes``."""
        raise NotImplementedError


def write_packed_record(out_dir: Path, meta: dict, fmt: str) -> None:
    """Keep the source's ``quantization.json`` beside a packed checkpoint, marked with its format, so that
    ``tritonq report`` shows the method and stage times of packed outputs too and ``eval --record`` can
    store their scores. Loaders read ``config.json``; nothing decides fake-or-packed from this file (the
    ``quantization_config`` does). The fake model's scores are dropped: they were not taken on these files."""
    record = {k: v for k, v in meta.items() if k != "evaluations"}
    (out_dir / QUANT_JSON).write_text(json.dumps({**record, "format": fmt}, indent=2) + "\n")


def linear_names(config: dict) -> list[str]:
    """All nn.Linear module names of the architecture (built on the meta device, nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def warn_marlin(shapes: Mapping[str, tuple[int, int]]) -> None:
    """vLLM's Marlin kernels need K % 128 == 0 and N % 64 == 0 (formats doc §1.4): say so early."""
    bad = [n for n, (rows, cols) in shapes.items() if cols % 128 or rows % 64]
    if bad:
        warn(
            f"{len(bad)} layers (e.g. {bad[0]}) have in_features % 128 != 0 or out_features % 64 != 0; "
            "vLLM falls back from Marlin to a slower kernel for them"
        )


def method_of(qcfg: dict) -> str:
    """``quant_method`` of a config, lower case; CT configs before the key existed are recognised by shape."""
    default = "compressed-tensors" if "config_groups" in qcfg else ""
    return str(qcfg.get("quant_method") or default).lower()


def majority_grid(grids: Mapping[str, GridSpec]) -> GridSpec:
    """The grid most layers have (the first seen on a tie): the base of formats with per-module overrides."""
    counts: dict[tuple, int] = {}
    first: dict[tuple, GridSpec] = {}
    for spec in grids.values():
        key = layout_key(spec)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, spec)
    return first[max(counts, key=counts.__getitem__)]


def distinct_grids(grids: Iterable[GridSpec]) -> list[GridSpec]:
    """One grid per distinct layout, in first-seen order."""
    seen: dict[tuple, GridSpec] = {}
    for spec in grids:
        seen.setdefault(layout_key(spec), spec)
    return list(seen.values())


def qweight_layers(store: TensorStore) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """``(name, qweight, scales, qzeros)`` of every layer stored in the GPTQ / AWQ tensor naming."""
    for key in store.keys():
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            yield name, store.get(key), store.get(f"{name}.scales", "scales"), store.get(f"{name}.qzeros", "qzeros")


class PackedFormat(OutputFormat):
    """A packed safetensors layout: its rules, its ``quantization_config``, and the tensors of one linear.

    Subclasses set ``tensor_names`` (leaf names of the packed tensors of one linear, so the float tensors of a
    checkpoint can be told apart) and implement ``check_grid``, ``config``, ``pack_layer``, ``recognizes`` and
    ``read``. ``write`` is shared: float tensors are copied, each quantized linear is rebuilt from its grid and
    packed in turn, and the tensors go out through a :class:`~tritonq.engine.formats.store.ShardedWriter`.
    """

    tensor_names: ClassVar[tuple[str, ...]]

    def check_grid(self, spec: GridSpec) -> None:
        """Refuse one grid this layout cannot hold."""

    def check_grids(self, grids: Mapping[str, GridSpec]) -> None:
        """Refuse a set of per-layer grids; by default each distinct grid is checked on its own."""
        for spec in distinct_grids(grids.values()):
            self.check_grid(spec)

    def check(self, request: FormatRequest) -> None:
        self.check_grids(request.layer_grids)

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype scales are stored in (fp16 is the GPTQ and AWQ convention, formats doc §1.5)."""
        return torch.float16

    def config(
        self,
        grids: Mapping[str, GridSpec],
        *,
        model_dtype: torch.dtype,
        ignore: list[str],
        act_order: bool,
        desc_act: bool,
        version: str,
    ) -> dict:
        """The ``quantization_config`` block of ``config.json``.

        ``grids``: every quantized linear -> its grid; ``ignore``: linears left in float; ``act_order``: columns
        were reordered for the solve (static groups, monotonic g_idx); ``desc_act``: some g_idx is non-monotonic.
        """
        raise NotImplementedError

    def pack_layer(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype) -> dict[str, Tensor]:
        """The packed tensors of one linear, keyed ``<name>.<leaf>``; refuses records the layout cannot hold."""
        raise NotImplementedError

    def recognizes(self, qcfg: dict) -> bool:
        """Whether a checkpoint's ``quantization_config`` is this layout (raises for a known-unsupported variant)."""
        raise NotImplementedError

    def read(self, store: TensorStore, qcfg: dict) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
        """Every packed linear of a checkpoint as ``(name, grid, record)``, validated, in file order."""
        raise NotImplementedError

    def side_files(self, qcfg: dict) -> dict[str, dict]:
        """Extra JSON files written beside ``config.json`` (file name -> content)."""
        return {}

    def extra_kwargs(self, ckpt: Checkpoint) -> dict:
        """Keyword arguments ``config`` and ``pack_layer`` take beyond the common ones (activations ...)."""
        if ckpt.meta.get("activations"):
            warn(f"the {self.name} config cannot say how activations are quantized; tritonq keeps its record "
                 "(tritonq_activations in config.json), other loaders will run the model weight-only")
        return {}

    def online_transform(self, ckpt: Checkpoint) -> tuple[dict, dict[str, Tensor]]:
        """The layout's record of the run's online transform (``engine/online_hadamard.py``), for other loaders:
        ``(entries of quantization_config, tensors written beside the layers)``; nothing by default."""
        return {}, {}

    def write(self, ckpt: Checkpoint, out: Path, shard_bytes: int | None = None) -> None:
        from ... import __version__

        grids = ckpt.grids
        self.check_grids(grids)
        dtype = model_dtype(ckpt.config)
        extra = self.extra_kwargs(ckpt)
        transform_entries, transform_tensors = self.online_transform(ckpt)
        writer = ShardedWriter(out, shard_bytes)
        writer.update(transform_tensors)
        for key in ckpt.float_keys():
            module, _, leaf = key.rpartition(".")
            if module not in grids or leaf not in ("weight", "bias"):  # a quantized linear's come with its record
                writer.add(key, ckpt.tensor(key))
        desc_act, shapes = False, {}
        for name, spec in grids.items():
            q = ckpt.record(name)
            desc_act = desc_act or not is_default_g_idx(q.g_idx, spec.effective_group(q.shape[1]))
            shapes[name] = q.shape
            writer.update(self.pack_layer(name, q, spec, dtype, **extra))
            if q.bias is not None:
                writer.add(f"{name}.bias", q.bias)
        writer.close()
        qcfg = self.config(grids, model_dtype=dtype, ignore=[n for n in linear_names(ckpt.config) if n not in grids],
                           act_order=bool(ckpt.meta.get("act_order")), desc_act=desc_act, version=__version__,
                           **extra)
        qcfg.update(transform_entries)
        warn_marlin(shapes)
        ckpt.write_side_files(out)
        config = {**ckpt.config, "quantization_config": qcfg}
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, content in self.side_files(qcfg).items():
            (out / fname).write_text(json.dumps(content, indent=2) + "\n")
        write_packed_record(out, ckpt.meta, self.name)


def module_pattern(name: str) -> str:
    """An anchored regex matching exactly the module ``name`` (GPTQModel ``dynamic`` keys)."""
    return f"^{re.escape(name)}$"
