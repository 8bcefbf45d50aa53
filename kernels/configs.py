"""Launch configurations shared by every kernel module.

Each kernel module exposes ``CONFIGS`` (every :class:`LaunchConfig` its launcher may pick),
``pick_config(...)`` (the dispatch rule) and ``aot_signature(dtype, config)`` (the argument types for
ahead-of-time compilation). The catalog of all kernels is built from those three names.
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
