"""compressed-tensors (``--format compressed-tensors``), written and read through the library itself.

Layout (formats doc §1.3): ``weight_packed`` int32 [N, K*b/32] packed along K, ``weight_scale`` [N, G],
``weight_shape``, ``weight_zero_point`` int32 [N*b/32, G] packed along N (asymmetric only; signed
``z - 2^(b-1)``), ``weight_g_idx`` [K] for group act-order only. Written with the compressed-tensors library
(``PackedQuantizationCompressor.compress``, ``pack_to_int32``/``unpack_from_int32``, its ``QuantizationConfig``
serialised as ``ModelCompressor.update_config`` does), so our files follow the library. Source read:
vllm-project/compressed-tensors ``compressors/pack_quantized/{base,helpers}.py``,
``compressors/model_compressors/model_compressor.py``, ``quantization/{quant_args,quant_scheme,quant_config}.py``.

W8A8 layers (8-bit symmetric per-channel weights with 8-bit activations) take the ``int-quantized`` layout
(:class:`~tritonq.engine.formats.ct_int8.IntQuantized`); every other layer is ``pack-quantized``.
Per-layer grids: one config group per distinct scheme. A uniform run writes one ``group_0`` targeting the
class ``Linear``; a mixed run writes ``group_0``, ``group_1``, ... each targeting its layers by name.
A run with the online Hadamard also gets a ``transform_config`` and the transform matrix (``ct_transform.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...errors import TritonqError, warn
from ..grid import GridSpec
from .base import PackedFormat, distinct_grids, method_of
from .ct_int8 import IntQuantized
from .ct_library import compressed_tensors_lib, matches
from .ct_transform import check_stored, matrix_key, transform_config, transform_tensors
from .records import (
    QuantizedWeight,
    check_layer,
    default_g_idx,
    is_default_g_idx,
    layout_key,
    signed,
    stored_scale,
    unsigned,
)
from .store import TensorStore

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


INT8 = IntQuantized()


class CompressedTensorsFormat(PackedFormat):
    """compressed-tensors ``pack-quantized``, through the compressed-tensors library (formats doc §1.3).

    With activation quantization (``quantization.json`` ``activations``) every config group also carries
    ``input_activations`` (dynamic, per token or per tensor), and W8A8 - 8-bit symmetric per-channel weights
    with 8-bit activations - is written as llm-compressor writes it for vLLM's int8 kernels:
    ``int-quantized``, an int8 ``weight`` [N, K] and ``weight_scale`` [N, 1], through the library's
    ``IntQuantizationCompressor``.

    The library decides the layout: ``PackedQuantizationCompressor.compress`` quantizes the grid point of
    every weight with our scale and zero point and packs it, and we check that it recovered our codes.
    Group act-order is the exception: compressed-tensors >= 0.19 has no g_idx in its compressor (it always
    forms contiguous groups) nor ``actorder='group'`` in its schema, so such layers are packed with the
    library's own ``pack_to_int32`` and the config says ``actorder: "group"`` for vLLM, which still reads it.
    """

    name = "compressed-tensors"
    holds_online_transform = True  # transform_config + the matrix (ct_transform.py), and tritonq's own record
    head_block = -1  # --quantize-head: lm_head and embedding as two more config groups, scales per channel
    head_note = ("the int8 embedding table is a config group targeting the Embedding module, which compressed-tensors "
                 "expresses but transformers 5.x cannot load (AttributeError: 'Embedding' object has no attribute "
                 "'weight'; vLLM quantizes linear layers only); only tritonq loads this checkpoint. A quantized "
                 "lm_head alone loads in transformers, but tritonq writes the two together")
    tensor_names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "weight")

    def check_grid(self, spec: GridSpec) -> None:
        compressed_tensors_lib()  # a missing library fails here, before any weight is read

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # CT stores scales in the model dtype; our scales are fp16 values, which bf16 cannot all hold,
        # so a bf16 model keeps fp16 scales and declares them (QuantizationArgs.scale_dtype).
        return model_dtype if model_dtype in (torch.float16, torch.float32, torch.float64) else torch.float16

    def _scheme(self, spec: GridSpec, model_dtype: torch.dtype, act_order: bool,
                activations: dict | None = None, targets: Iterable[str] = ("Linear",)) -> object:
        ct = compressed_tensors_lib()
        scale_dtype = self.scale_dtype(model_dtype)
        args = ct.Args(
            num_bits=spec.bits,
            type="int",
            symmetric=spec.sym,
            strategy="channel" if spec.group_size == -1 else "group",
            group_size=None if spec.group_size == -1 else spec.group_size,
            actorder="static" if act_order else None,
            scale_dtype=None if scale_dtype == model_dtype else scale_dtype,
        )
        inputs = None
        if activations:
            inputs = ct.Args(num_bits=int(activations["bits"]), type="int", symmetric=bool(activations["sym"]),
                             strategy="token" if activations["scheme"] == "per-token" else "tensor", dynamic=True)
        fmt = "int-quantized" if IntQuantized.holds(spec, activations) else "pack-quantized"
        return ct.Scheme(targets=list(targets), weights=args, input_activations=inputs, format=fmt)

    def extra_kwargs(self, ckpt: Checkpoint) -> dict:
        activations = ckpt.meta.get("activations")
        return {"activations": activations} if activations else {}

    def online_transform(self, ckpt: Checkpoint) -> tuple[dict, dict[str, Tensor]]:
        # the transform matrix and a transform_config that compressed-tensors and vLLM load (ct_transform.py)
        record = ckpt.meta.get("online_hadamard")
        if not record:
            return {}, {}
        return ({"transform_config": transform_config(ckpt.config, record)},
                transform_tensors(ckpt.config, record, ckpt.label))

    def config(
        self, grids: Mapping[str, GridSpec], *, model_dtype: torch.dtype, ignore: list[str], act_order: bool,
        desc_act: bool, version: str, activations: dict | None = None,
    ) -> dict:
        ct = compressed_tensors_lib()
        schemes = distinct_grids(grids.values())
        static = act_order and not desc_act
        if len(schemes) == 1:  # one scheme for every Linear: exactly llm-compressor's single group
            groups = {"group_0": self._scheme(schemes[0], model_dtype, static, activations)}
        else:  # one group per scheme, each naming its layers
            groups = {
                f"group_{i}": self._scheme(spec, model_dtype, static, activations,
                                           [n for n, s in grids.items() if layout_key(s) == layout_key(spec)])
                for i, spec in enumerate(schemes)
            }
        formats = {IntQuantized.holds(spec, activations) for spec in schemes}
        fmt = ("int-quantized" if formats == {True} else "pack-quantized") if len(formats) == 1 else "mixed-precision"
        qconfig = ct.Config(config_groups=groups, ignore=list(ignore), format=fmt, quantization_status="compressed")
        # the keys and values ModelCompressor.update_config writes (model_compressor.py)
        body = qconfig.model_dump(exclude=["quant_method"])
        if desc_act:
            for group in body["config_groups"].values():
                group["weights"]["actorder"] = "group"
            warn(
                "group act-order (non-monotonic g_idx) is written as compressed-tensors actorder='group'; "
                "compressed-tensors >= 0.19 no longer loads it (vLLM and tritonq do); quantize with static "
                "act-order for files every tool reads"
            )
        return {"version": ct.version, "quant_method": ct.method, "sparsity_config": {}, "transform_config": {},
                **body}

    def pack_layer(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype,
                   activations: dict | None = None) -> dict[str, Tensor]:
        ct = compressed_tensors_lib()
        n, k = q.shape
        mid = 2 ** (spec.bits - 1)
        if spec.sym and not bool((q.zero == mid).all()):
            raise TritonqError(f"{name}: a symmetric compressed-tensors grid needs every zero point at {mid}")
        scale = stored_scale(name, q.scale, self.scale_dtype(model_dtype))
        zero = None if spec.sym else signed(q.zero, spec.bits)
        if IntQuantized.holds(spec, activations):
            scheme = self._scheme(spec, model_dtype, act_order=False, activations=activations)
            out = INT8.pack_layer(name, q, scale, scheme)
        elif is_default_g_idx(q.g_idx, spec.effective_group(k)):
            state = {"weight": q.dequantize(), "weight_scale": scale}
            if zero is not None:
                state["weight_zero_point"] = zero
            out = ct.compressor.compress(state, self._scheme(spec, model_dtype, act_order=False))
            got = unsigned(ct.unpack(out["weight_packed"], spec.bits, (n, k)), spec.bits)
            if not torch.equal(got, q.codes.to(torch.int16)):
                raise TritonqError(
                    f"{name}: compressed-tensors {ct.version} quantized the grid points to other codes than "
                    "tritonq's; this version's rounding differs from ours, so try compressed-tensors 0.20"
                )
        else:
            out = {
                "weight_packed": ct.pack(signed(q.codes, spec.bits), spec.bits),
                "weight_scale": scale,
                "weight_shape": torch.tensor([n, k], dtype=torch.int64),
                "weight_g_idx": q.g_idx.to(torch.int32),
            }
            if zero is not None:
                out["weight_zero_point"] = ct.pack(zero, spec.bits, packed_dim=0)
        return {f"{name}.{leaf}": t.contiguous() for leaf, t in out.items()}

    def recognizes(self, qcfg: dict) -> bool:
        return method_of(qcfg) == "compressed-tensors"

    def _weight_groups(self, qcfg: dict) -> list[tuple[list[str], object, bool]]:
        """``(targets, QuantizationArgs, group act-order)`` of every weight config group."""
        ct = compressed_tensors_lib()
        fmt = qcfg.get("format")
        groups = []
        for gname, group in (qcfg.get("config_groups") or {}).items():
            gfmt = group.get("format") or fmt
            w = group.get("weights")
            if w is None:
                continue
            if gfmt not in ("pack-quantized", "int-quantized"):
                raise TritonqError(
                    f"compressed-tensors format {gfmt!r} (group {gname}) is not supported; "
                    "tritonq reads pack-quantized and int-quantized int weights"
                )
            # input_activations (dynamic) are read by act_quant.saved_act_spec and applied at run time
            w = dict(w)
            # 'group' (alias 'dynamic') left the schema in compressed-tensors 0.19 but is still on the hub
            group_order = str(w.get("actorder")).lower() in ("group", "dynamic")
            if group_order:
                w.pop("actorder")
            try:
                args = ct.Args.model_validate(w)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise TritonqError(
                    f"group {gname}: compressed-tensors {ct.version} cannot parse the weights config "
                    f"({str(exc).splitlines()[-1].strip()}); the checkpoint needs a newer compressed-tensors"
                ) from None
            if args.type != "int":
                raise TritonqError(f"group {gname}: weight type {args.type!r} is not supported (int only)")
            if args.strategy not in ("group", "channel"):
                raise TritonqError(
                    f"group {gname}: compressed-tensors strategy {args.strategy!r} is not supported "
                    "(group or channel)"
                )
            groups.append((list(group.get("targets") or ["Linear"]), args, group_order))
        if not groups:
            raise TritonqError("compressed-tensors config has no weight config_groups")
        return groups

    def read(self, store: TensorStore, qcfg: dict) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
        ct = compressed_tensors_lib()
        groups = self._weight_groups(qcfg)
        if (qcfg.get("transform_config") or {}).get("config_groups"):  # tritonq runs its record: the same T?
            from ..online_hadamard import saved_record
            from ..outputs import read_json_object

            config = read_json_object(store.dir / "config.json", "restore its config.json")
            check_stored(qcfg, store.maybe(matrix_key(config)), config, saved_record(store.dir), str(store.dir))
        ignore = list(qcfg.get("ignore") or [])
        for key in store.keys():
            if key.endswith(".weight") and f"{key}_scale" in store:  # int-quantized: int8 codes, per channel
                yield INT8.read_layer(store, key[: -len(".weight")], groups, ignore)
                continue
            if not key.endswith(".weight_packed"):
                continue
            name = key[: -len(".weight_packed")]
            if matches(name, ignore, linear=False):
                raise TritonqError(
                    f"{name} has packed weights but is listed in 'ignore'; the checkpoint is inconsistent"
                )
            args = next((a for targets, a, _ in groups if matches(name, targets, linear=True)), None)
            if args is None:
                raise TritonqError(f"{name} has packed weights but no config group targets it")
            bits = int(args.num_bits)
            if not 2 <= bits <= 8:
                raise TritonqError(f"{name}: {bits}-bit weights are not supported (2 to 8)")
            spec = GridSpec(bits, int(args.group_size) if args.strategy == "group" else -1, bool(args.symmetric))
            shape = store.get(f"{name}.weight_shape", "weight_shape").tolist()
            if len(shape) != 2:
                raise TritonqError(f"{name}: weight_shape {shape} is not 2-D")
            n, k = (int(s) for s in shape)
            packed = store.get(key)
            words = -(-k * bits // 32)
            if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words):
                raise TritonqError(
                    f"{name}: weight_packed must be int32 [{n}, {words}] for weight_shape [{n}, {k}] "
                    f"at {bits} bits, got {packed.dtype} {tuple(packed.shape)}"
                )
            codes = unsigned(ct.unpack(packed, bits, (n, k)), bits)
            scale = store.get(f"{name}.weight_scale", "weight_scale").float()
            gs = spec.group_size
            groups_n = 1 if gs == -1 else k // gs if k % gs == 0 else -1
            if tuple(scale.shape) != (n, groups_n):
                raise TritonqError(f"{name}: weight_scale must be [{n}, {groups_n}], got {tuple(scale.shape)}")
            if spec.sym:
                zero = torch.full((n, groups_n), float(2 ** (bits - 1)))
            else:
                zp = store.get(f"{name}.weight_zero_point", "asymmetric zero point")
                if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n * bits // 32), groups_n):
                    zero = unsigned(ct.unpack(zp, bits, (n, groups_n), packed_dim=0), bits).float()
                elif tuple(zp.shape) == (n, groups_n) and not zp.dtype.is_floating_point:
                    zero = unsigned(zp, bits).float()  # unpacked int8 zero points of CT < 0.10
                else:
                    raise TritonqError(
                        f"{name}: weight_zero_point has unexpected shape {tuple(zp.shape)} / {zp.dtype}"
                    )
            g_idx = store.maybe(f"{name}.weight_g_idx")
            g_idx = default_g_idx(k, spec.effective_group(k)) if g_idx is None else g_idx.to(torch.int32)
            q = QuantizedWeight(codes.to(torch.uint8), scale, zero, g_idx, store.maybe(f"{name}.bias"))
            check_layer(name, q, spec)
            yield name, spec, q
