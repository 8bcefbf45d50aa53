"""Launch configurations and declared limits shared by every kernel module.

Each kernel module exposes ``CONFIGS`` (every :class:`LaunchConfig` its launcher may pick),
``pick_config(...)`` (the dispatch rule), ``aot_signature(dtype, config)`` (the argument types for
ahead-of-time compilation) and ``LIMITS`` (a :class:`KernelLimits`: what its Triton path accepts).
The catalog of all kernels is built from those names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORCE: tuple[str | None, ...] = (None, "triton", "ref")  # every op's force= vocabulary (see kernels/__init__)


def check_force(force: str | None) -> None:
    """Raise :class:`TritonqError` unless ``force`` is one of :data:`FORCE`."""
    if force not in FORCE:
        from ..errors import TritonqError

        raise TritonqError(f"force must be one of {FORCE}, got {force!r}")


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time block sizes plus the launch knobs Triton takes."""

    meta: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def of(num_warps: int = 4, num_stages: int = 2, **meta: int) -> LaunchConfig:
        return LaunchConfig(tuple(sorted(meta.items())), num_warps, num_stages)

    def constexprs(self) -> dict[str, int]:
        return dict(self.meta)

    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.meta)
        return f"{inner},w{self.num_warps},s{self.num_stages}"


@dataclass(frozen=True)
class KernelLimits:
    """What a kernel module's Triton path accepts, declared as data beside its configs.

    The launchers check their arguments against it and the engine checks user options against it before
    any work starts (as GPTQModel's ``SUPPORTS_BITS`` / ``SUPPORTS_GROUP_SIZE`` class attributes in
    ``gptqmodel/nn_modules/qlinear/tritonv2.py``); the catalog reads the AOT dtypes from it.
    """

    dtypes: tuple[str, ...]  # Triton element types of the main input ("fp16", "bf16", "fp32")
    max_cols: int | None = None  # widest block of columns one launch holds (None: any)
    bits: tuple[int, ...] | None = None  # code widths the kernels unpack (None: they never see packed codes)
    group_multiple: int = 1  # group sizes must be multiples of this, or -1 (one group per output channel)
    k_multiple: int = 1  # the input width must be a multiple of this


_DTYPE_FLAGS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # Triton names -> --dtype values


def check_limits(kernel: str, limits: KernelLimits, *, dtype: str | None = None, bits: int | None = None,
                 group_size: int | None = None, in_features: int | None = None, cols: int | None = None,
                 where: str = "") -> None:
    """Refuse a request that ``kernel``'s declared ``limits`` do not cover, before any work starts.

    The one check of a request against a :class:`KernelLimits` (the engine's preflight calls it for the kernels
    a run will use): each argument given is one property of the request (``dtype`` a Triton element type name
    as in ``limits.dtypes``, ``bits`` the code width, ``group_size`` -1 or the grid's group, ``in_features`` a
    layer's input width, ``cols`` the columns of one launch); None skips it. ``where`` names the layer. Raises
    :class:`tritonq.errors.TritonqError` naming the kernel, the value and the fix.
    """
    from ..errors import TritonqError  # lazily: importing this module stays import-free (see kernels/__init__)

    at = f" ({where})" if where else ""
    if dtype is not None and dtype not in limits.dtypes:
        raise TritonqError(f"the {kernel} kernel takes {' or '.join(limits.dtypes)} inputs, got {dtype}{at}; "
                           f"choose --dtype {' or '.join(_DTYPE_FLAGS.get(d, d) for d in limits.dtypes)}")
    if bits is not None and limits.bits is not None and bits not in limits.bits:
        raise TritonqError(f"the {kernel} kernel unpacks {' or '.join(map(str, limits.bits))}-bit codes, got "
                           f"{bits} bits{at}; quantize with --bits {' or '.join(map(str, limits.bits))} or "
                           "write --format fake")
    if group_size is not None and group_size != -1 and (group_size < 1 or group_size % limits.group_multiple):
        raise TritonqError(f"the {kernel} kernel takes group sizes that are -1 or positive multiples of "
                           f"{limits.group_multiple}, got {group_size}{at}; choose such a --group-size")
    if in_features is not None and in_features % limits.k_multiple:
        raise TritonqError(f"the {kernel} kernel needs input widths that are multiples of {limits.k_multiple}, "
                           f"got {in_features}{at}; leave this layer out or pad its input features")
    if cols is not None and limits.max_cols is not None and not 1 <= cols <= limits.max_cols:
        raise TritonqError(f"the {kernel} kernel takes 1 to {limits.max_cols} columns per launch, got {cols}{at}; "
                           f"split the columns into launches of at most {limits.max_cols}")

