"""The plots of ``tritonq report --plot``, ``tritonq bench matmul --plot``, ``tritonq bench decode --plot``.

Each function takes what its command already produces (report summaries, or the JSON object a bench prints
with ``--json``) and writes one PNG, atomically: rendered to a temporary file beside the target, then renamed
over it, so an interrupted run never leaves half a PNG. matplotlib is an optional extra (``tritonq[plot]``);
only its object-oriented API is used (``Figure`` with the Agg canvas), so no global backend is switched.

The bench readers are tolerant of the JSON's shape: the matmul rows need ``M``, ``K``, ``N`` and a
``speedup``; a decode result needs ``packed`` and ``float`` entries whose tokens/s is a number or a
``{"median": ..., "min": ..., "max": ...}`` summary, under any key naming decode (or prefill) tokens/s.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from pathlib import Path

from ..engine.outputs import atomic_write
from ..errors import TritonqError

INSTALL_HINT = "pip install 'tritonq[plot]'"


def require_matplotlib() -> None:
    """Fail before any long work where matplotlib is missing, naming the extra that installs it."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise TritonqError(f"plots need matplotlib, which is not installed; install it with: {INSTALL_HINT}") from None


def _figure(width: float, height: float, ncols: int = 1):
    """A matplotlib Figure with ``ncols`` axes on the Agg canvas, or the error naming the extra."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def check_png_path(path: str | os.PathLike) -> Path:
    """The plot target: a ``.png`` name in an existing directory (checked before any work is done)."""
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise TritonqError(f"--plot {path}: give a file name ending in .png")
    if not out.parent.is_dir():
        raise TritonqError(f"--plot {path}: directory {out.parent} does not exist")
    if out.is_dir():
        raise TritonqError(f"--plot {path} is a directory; give a file name ending in .png")
    return out


def save_png(fig, path: str | os.PathLike) -> Path:
    """Render ``fig`` to ``path`` atomically (rendered in memory, then a temporary file and a rename)."""
    out = check_png_path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write(out, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# perplexity against bits (tritonq report)


def _series_name(summary) -> str:
    name = summary.method if summary.method != "?" else summary.out_format
    return f"{name} {summary.activations}" if summary.activations else name


def perplexity_series(summaries: Iterable) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{perplexity label: {method: [(bits, ppl), ...] sorted by bits}}`` from report summaries; ``bits`` is the
    average bits per weight with scales and zeros (``engine/bits.py``) where the output gives it, else the grid's."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for s in summaries:
        bits = s.bits_per_weight if s.bits_per_weight is not None else s.bits
        if bits is None:
            continue
        for label, ppl in s.perplexities.items():
            out.setdefault(label, {}).setdefault(_series_name(s), []).append((bits, ppl))
    for series in out.values():
        for points in series.values():
            points.sort()
    return out


def plot_perplexity_vs_bits(summaries: list, path: str | os.PathLike) -> Path:
    """One panel per recorded perplexity (data and windows): perplexity against average bits per weight (scales and
    zeros counted, as the report's column), a line per method."""
    data = perplexity_series(summaries)
    if not data:
        raise TritonqError("none of these outputs records a perplexity, so there is nothing to plot; evaluate them "
                           "with 'tritonq eval DIR --data FILE --record' (or quantize with --eval-data)")
    fig, axes = _figure(5.0, 3.8, len(data))
    for ax, (label, series) in zip(axes, data.items(), strict=True):
        for method, points in sorted(series.items()):
            bits, ppl = zip(*points, strict=True)
            ax.plot(bits, ppl, marker="o", label=method)
        ax.set_xlabel("average bits per weight (scales and zeros counted)")
        # log scale: perplexity is exp(loss), and 2-bit runs sit orders of magnitude above 4-bit ones
        ax.set_yscale("log")
        ax.set_ylabel("perplexity, log scale (lower is better)")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(sorted({round(b, 2) for pts in series.values() for b, _ in pts}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------
# tritonq bench matmul


def matmul_speedups(result: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{panel: {"KxN": [(M, speedup), ...]}}`` for the int4 rows and, where timed, the W8A8 rows."""
    panels = {}
    for key, speed_key, title in (("rows", "speedup", "int4 dequant-matmul vs fp16 matmul"),
                                  ("w8a8_rows", "speedup_vs_fp16", "W8A8 vs fp16 matmul")):
        shapes: dict[str, list[tuple[int, float]]] = {}
        for row in result.get(key) or []:
            value = row.get(speed_key)
            if isinstance(value, int | float) and math.isfinite(value) and {"M", "K", "N"} <= set(row):
                shapes.setdefault(f"{row['K']}x{row['N']}", []).append((int(row["M"]), float(value)))
        if shapes:
            panels[title] = {k: sorted(v) for k, v in shapes.items()}
    return panels


def plot_matmul_speedup(result: dict, path: str | os.PathLike) -> Path:
    """Speedup over fp16 ``torch.matmul`` against M (log scale), one line per K x N shape."""
    panels = matmul_speedups(result)
    if not panels:
        why = (" (no GPU: this run only checked the kernels in the Triton interpreter and timed nothing)"
               if result.get("speed_measured") is False or result.get("mode") == "interpreter" else "")
        raise TritonqError(f"this bench matmul result has no measured speedups{why}; run it on a CUDA GPU to plot")
    fig, axes = _figure(5.0, 3.8, len(panels))
    for ax, (title, shapes) in zip(axes, panels.items(), strict=True):
        for shape, points in shapes.items():
            ms, speed = zip(*points, strict=True)
            ax.plot(ms, speed, marker="o", label=f"K x N = {shape}")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ms_all = sorted({m for points in shapes.values() for m, _ in points})
        ax.set_xticks(ms_all, [str(m) for m in ms_all])
        ax.minorticks_off()
        ax.set_xlabel("M (tokens per call)")
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{title}\n{result.get('device', '')}".strip(), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------
# tritonq bench decode


def _rate(entry) -> tuple[float, float | None, float | None] | None:
    """(central, low, high) of a tokens/s value: a number, or a dict with median/mean and min/max."""
    if isinstance(entry, int | float) and not isinstance(entry, bool):
        return float(entry), None, None
    if isinstance(entry, dict):
        centre = next((entry[k] for k in ("median", "mean", "value") if isinstance(entry.get(k), int | float)), None)
        if centre is None:
            return None
        low, high = entry.get("min"), entry.get("max")
        return (float(centre), float(low) if isinstance(low, int | float) else None,
                float(high) if isinstance(high, int | float) else None)
    return None


def _stage_rate(side: dict, stage: str) -> tuple[float, float | None, float | None] | None:
    """The ``stage`` (decode or prefill) tokens/s of one side, under whichever key names it."""
    keys = [k for k in side if stage in k and "bound" not in k
            and ("tokens_per_s" in k or "tok_s" in k or "tokens/s" in k)]
    keys.sort(key=lambda k: ("median" not in k, len(k)))  # prefer an explicit median, then the plainest name
    for k in keys:
        rate = _rate(side[k])
        if rate is not None:
            if rate[1] is None:  # spread under sibling keys: <key>_min / <key>_max
                base = k.removesuffix("_median")
                low, high = side.get(f"{base}_min"), side.get(f"{base}_max")
                if isinstance(low, int | float) and isinstance(high, int | float):
                    rate = (rate[0], float(low), float(high))
            return rate
    return None


def decode_rates(results) -> dict[str, dict[str, dict[str, tuple]]]:
    """``{stage: {model label: {"packed": rate, "float": rate}}}`` from one decode JSON object or a list of them."""
    items = results if isinstance(results, list) else [results]
    out: dict[str, dict[str, dict[str, tuple]]] = {}
    for i, res in enumerate(items):
        if not isinstance(res, dict):
            continue
        label = str(res.get("model") or res.get("name") or (f"run {i + 1}" if len(items) > 1 else "model"))
        for stage in ("decode", "prefill"):
            pair = {}
            for side in ("packed", "float"):
                rate = _stage_rate(res.get(side) or {}, stage)
                if rate is not None:
                    pair[side] = rate
            if pair:
                out.setdefault(stage, {})[label] = pair
    return out


def decode_bounds(results) -> dict[str, dict[str, float]]:
    """``{model label: {side: tokens/s}}``: the bandwidth bound on decode (``decode_bound_tokens_per_s``), if given."""
    items = results if isinstance(results, list) else [results]
    out: dict[str, dict[str, float]] = {}
    for i, res in enumerate(items):
        if not isinstance(res, dict):
            continue
        label = str(res.get("model") or res.get("name") or (f"run {i + 1}" if len(items) > 1 else "model"))
        for side in ("packed", "float"):
            bound = (res.get(side) or {}).get("decode_bound_tokens_per_s")
            if isinstance(bound, int | float) and math.isfinite(bound):
                out.setdefault(label, {})[side] = float(bound)
    return out


def plot_decode(results, path: str | os.PathLike) -> Path:
    """Bars of tokens/s, packed int4 beside float, per model; decode (and prefill, where reported) panels."""
    data = decode_rates(results)
    bounds = decode_bounds(results)
    if "decode" not in data:
        raise TritonqError("this bench decode result has no packed/float decode tokens/s to plot (expected the "
                           "JSON of 'tritonq bench decode --json')")
    fig, axes = _figure(5.0, 3.8, len(data))
    width = 0.38
    for ax, (stage, models) in zip(axes, data.items(), strict=True):
        labels = list(models)
        for j, side in enumerate(("float", "packed")):
            xs, ys, errs = [], [], [[], []]
            for i, label in enumerate(labels):
                rate = models[label].get(side)
                if rate is None:
                    continue
                xs.append(i + (j - 0.5) * width)
                ys.append(rate[0])
                errs[0].append(rate[0] - rate[1] if rate[1] is not None else 0.0)
                errs[1].append(rate[2] - rate[0] if rate[2] is not None else 0.0)
            name = "packed int4" if side == "packed" else "float"
            ax.bar(xs, ys, width, yerr=errs if any(errs[0] + errs[1]) else None, capsize=3, label=name)
            if stage == "decode":  # the bandwidth bound of each bar, as a short black line above it
                marks = [(i + (j - 0.5) * width, bounds[lab][side]) for i, lab in enumerate(labels)
                         if side in bounds.get(lab, {})]
                if marks:
                    ax.hlines([b for _, b in marks], [x - width / 2 for x, _ in marks],
                              [x + width / 2 for x, _ in marks], colors="black", linewidths=1.5,
                              label="bandwidth bound" if j == 1 else None)
        for i, label in enumerate(labels):
            pair = models[label]
            if "packed" in pair and "float" in pair and pair["float"][0] > 0:
                top = max(pair["packed"][0], pair["float"][0])
                ax.annotate(f"{pair['packed'][0] / pair['float'][0]:.2f}x", (i, top), ha="center", va="bottom",
                            fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(f"{stage}: packed int4 vs float", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars and bounds
        ax.legend(fontsize=8, ncols=3, loc="upper center")
    return save_png(fig, path)
