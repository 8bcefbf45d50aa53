"""Launch configurations and declared limits shared by every kernel module.

Each kernel module exposes ``CONFIGS`` (every :class:`LaunchConfig` its launcher may pick),
``pick_config(...)`` (the dispatch rule), ``aot_signature(dtype, config)`` (the argument types for
ahead-of-time compilation) and ``LIMITS`` (a :class:`KernelLimits`: what its Triton path accepts).
The catalog of all kernels is built from those names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
