"""``tritonq report``: one Markdown table across several quantized outputs, from what each output records.

A ``tritonq quantize`` output keeps its settings, stage times (``seconds``) and, once evaluated, its scores in
``quantization.json``. Scores land there under ``evaluations`` through :func:`record_evaluation`, written by
``quantize --eval-data`` and by ``tritonq eval DIR --record`` (perplexity and lm-eval tasks alike):

    "evaluations": {"perplexity": {"wikitext2_test.txt 8x2048": {"perplexity": 19.3, "windows": 8, ...}},
                    "lm_eval": {"arc_easy 0-shot": {"metrics": {"acc": 0.41, ...}, "samples": 2376, ...}}}

Packed outputs of ``tritonq quantize --format F`` and ``tritonq pack`` keep the source's ``quantization.json``
(marked ``"format": F``); for packed checkpoints from elsewhere the grid is read from the
``quantization_config`` of ``config.json`` and the method is unknown. Nothing here loads a model.

The ``bits/weight`` column is ``engine/bits.py``'s count over the blocks' linears (codes, scales, zeros as the
output's format stores them, 16 bits for a float linear), with the linears' shapes from a meta skeleton of
``config.json`` and each one's grid from the run's record: a recipe's ``recipe.layers``, a fake output's
``quant_params.safetensors``, or a packed ``quantization_config`` (config groups, GPTQModel ``dynamic``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import TritonqError
from ..bits import FORMATS, average_bits, block_linear_shapes
from ..formats.base import method_of
from ..formats.checkpoint import layer_grids
from ..formats.ct_library import matches
from ..formats.records import QUANT_PARAMS
from ..formats.store import TensorStore
from ..grid import GridSpec
from ..outputs import QUANT_JSON, atomic_write, read_json_object, read_quantization_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")  # what counts as weights on disk
PERPLEXITY = "perplexity"
LM_EVAL = "lm_eval"


@dataclass
class OutputSummary:
    """What one output directory records, flattened for the table."""

    path: Path
    method: str
    bits: int | None
    group_size: int | None
    sym: bool | None
    activations: str  # "" (weights only) or e.g. "A8 per-token sym"
    out_format: str  # fake, or the packed format named by config.json
    perplexities: dict[str, float] = field(default_factory=dict)  # label -> perplexity
    task_scores: dict[str, float] = field(default_factory=dict)  # "task setting metric" -> value
    seconds: dict[str, float] = field(default_factory=dict)
    weight_bytes: int = 0
    bits_per_weight: float | None = None  # average over the blocks' linear weights, scales and zeros counted (bits.py)
    rotate: str = ""  # "" (not rotated) or the --rotate kind with its seed, e.g. "hadamard seed 0"


def record_evaluation(directory: str | os.PathLike, kind: str, label: str, record: dict,
                      seconds: dict[str, float] | None = None) -> Path:
    """Add (or replace) one score in ``DIR/quantization.json`` under ``evaluations[kind][label]``, atomically.

    ``seconds`` are merged into the stage times (``eval``, ``save``: the stages that end after the file is
    first written). Raises :class:`TritonqError` where the directory has no ``quantization.json``."""
    path = Path(directory) / QUANT_JSON
    if not path.is_file():
        raise TritonqError(f"{directory} has no {QUANT_JSON}, so there is nowhere to record the score; --record "
                           f"takes a directory written by 'tritonq quantize' or 'tritonq pack'")
    meta = read_quantization_json(path)
    meta.setdefault("evaluations", {}).setdefault(kind, {})[label] = record
    if seconds:
        meta.setdefault("seconds", {}).update({k: round(float(v), 3) for k, v in seconds.items()})
    atomic_write(path, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def perplexity_label(data: str, windows: int, seqlen: int) -> str:
    """How a perplexity is named: the data's file name (or hub name) and ``windows x seqlen``."""
    return f"{Path(data).name} {windows}x{seqlen}"


def task_label(task: str, num_fewshot: int, limit: int | float | None) -> str:
    """How an lm-eval score is named: the task, its shots, and ``limit N`` when not all examples ran."""
    return f"{task} {num_fewshot}-shot" + ("" if limit is None else f" limit {limit:g}")


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _activation_text(act: dict | None) -> str:
    if not act:
        return ""
    sym = act.get("sym")
    return " ".join(str(p) for p in (f"A{act.get('bits', '?')}", act.get("scheme"),
                                     None if sym is None else ("sym" if sym else "asym")) if p)


def _packed_grid(qconfig: dict) -> tuple[int | None, int | None, bool | None, str, str]:
    """bits, group, sym, format name and activations from a ``quantization_config`` (compressed-tensors, GPTQ, AWQ)."""
    groups = qconfig.get("config_groups")
    if isinstance(groups, dict) and groups:
        group_config = next(iter(groups.values()))
        weights = group_config.get("weights") or {}
        group = weights.get("group_size")
        if weights.get("strategy") == "channel":
            group = -1
        fmt = "compressed-tensors " + str(qconfig.get("format", "")).strip()
        acts = group_config.get("input_activations") or {}
        act = _activation_text({"bits": acts["num_bits"], "scheme": acts.get("strategy"),
                                "sym": acts.get("symmetric")}) if acts.get("num_bits") else ""
        return weights.get("num_bits"), group, weights.get("symmetric"), fmt.strip(), act
    method = str(qconfig.get("quant_method", "packed"))
    fmt = method + (f" {qconfig['checkpoint_format']}" if qconfig.get("checkpoint_format") else "")
    return qconfig.get("bits", qconfig.get("w_bit")), qconfig.get("group_size", qconfig.get("q_group_size")), \
        qconfig.get("sym"), fmt, ""


def weight_bytes(directory: Path) -> int:
    """Bytes on disk of the weight files in ``directory`` (safetensors, bin, gguf, pt)."""
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def read_output(directory: str | os.PathLike) -> OutputSummary:
    """The summary of one output directory; a clear error where it is neither a tritonq nor a packed output."""
    path = Path(directory)
    if not path.is_dir():
        raise TritonqError(f"{directory} is not a directory; give output directories of 'tritonq quantize' or pack")
    meta_path, config_path = path / QUANT_JSON, path / "config.json"
    if meta_path.is_file():
        meta = read_quantization_json(meta_path)
        summary = OutputSummary(path, str(meta.get("method", "?")), meta.get("bits"), meta.get("group_size"),
                                meta.get("sym"), _activation_text(_dict(meta.get("activations"))),
                                str(meta.get("format", "fake")))
    elif config_path.is_file() and "quantization_config" in (
            config := read_json_object(config_path, "restore the checkpoint's config.json")):
        qconfig = config["quantization_config"]
        bits, group, sym, fmt, act = _packed_grid(qconfig if isinstance(qconfig, dict) else {})
        meta = {}
        summary = OutputSummary(path, "?", bits, group, sym, act, fmt)
    else:
        raise TritonqError(f"{directory} has neither {QUANT_JSON} nor a quantization_config in config.json; "
                           f"give output directories of 'tritonq quantize' or 'tritonq pack'")
    evaluations = _dict(meta.get("evaluations"))  # a hand-edited record of the wrong shape is skipped, not fatal
    for label, rec in _dict(evaluations.get(PERPLEXITY)).items():
        if isinstance(rec, dict) and isinstance(rec.get("perplexity"), int | float):
            summary.perplexities[label] = float(rec["perplexity"])
    for label, rec in _dict(evaluations.get(LM_EVAL)).items():
        for metric, value in _dict(_dict(rec).get("metrics")).items():
            if isinstance(value, int | float):
                summary.task_scores[f"{label} {metric}"] = float(value)
    if meta.get("rotate"):
        summary.rotate = f"{meta['rotate']} seed {_dict(meta.get('rotation')).get('seed', '?')}"
    summary.seconds = {k: float(v) for k, v in _dict(meta.get("seconds")).items() if isinstance(v, int | float)}
    summary.weight_bytes = weight_bytes(path)
    summary.bits_per_weight = output_bits_per_weight(path, meta)
    return summary


def output_bits_per_weight(path: Path, meta: dict) -> float | None:
    """Average bits per weight of an output (``engine/bits.py`` counts them: codes, fp16 scales, zeros as the
    format stores them, 16 bits for a linear left in float), over its blocks' linears; None where the output does
    not say which linears it quantized on which grid, or its config does not build."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    config = read_json_object(config_path, "restore the checkpoint's config.json")
    qconfig = _dict(config.get("quantization_config"))
    try:
        shapes = block_linear_shapes(config)
        grids, fmt = _layer_grids(path, meta, qconfig, list(shapes))
    except (TritonqError, ValueError, KeyError, TypeError):  # not a config transformers builds, or odd records
        return None
    return None if grids is None else round(average_bits(grids, shapes, fmt), 4)


def _layer_grids(path: Path, meta: dict, qconfig: dict, names: list[str]) -> tuple[dict | None, str]:
    """Every quantized linear's grid (the others stay float) and the format to count for."""
    fmt = str(meta.get("format", "fake")) if meta else _format_of(qconfig)
    recipe = _dict(meta.get("recipe"))
    if isinstance(recipe.get("layers"), dict):  # a recipe run records each linear's scheme
        return {n: None if s.get("skip") else GridSpec(int(s["bits"]), int(s["group_size"]), bool(s["sym"]))
                for n, s in recipe["layers"].items()}, fmt
    if meta and isinstance(meta.get("layers"), list) and "bits" in meta:
        run = GridSpec(int(meta["bits"]), int(meta.get("group_size", 128)), bool(meta.get("sym", False)))
        if (path / QUANT_PARAMS).is_file():  # a fake output keeps each layer's grid
            return layer_grids(TensorStore(path, QUANT_PARAMS), list(meta["layers"]), run), fmt
        if qconfig:
            return _config_grids(qconfig, list(meta["layers"])), fmt
        return dict.fromkeys(meta["layers"], run), fmt
    if qconfig and fmt in FORMATS:
        return _config_grids(qconfig, names), fmt
    return None, fmt


def _format_of(qconfig: dict) -> str:
    method = method_of(qconfig)
    return str(qconfig.get("checkpoint_format") or "gptq") if method == "gptq" else method


def _config_grids(qconfig: dict, names: list[str]) -> dict[str, GridSpec]:
    """Each named linear's grid from a packed ``quantization_config``: compressed-tensors config groups (first
    group targeting it; ``ignore`` stays float), GPTQModel ``dynamic`` (first match; ``-:`` stays float), AWQ's
    ``modules_to_not_convert``."""
    grids = {}
    groups = _dict(qconfig.get("config_groups"))
    ignore = list(qconfig.get("ignore") or qconfig.get("modules_to_not_convert") or [])
    bits, group, sym = qconfig.get("bits", qconfig.get("w_bit")), qconfig.get("group_size"), qconfig.get("sym")
    for name in names:
        if matches(name, ignore, linear=False) or any(name.startswith(m + ".") or name == m for m in ignore):
            continue
        if groups:
            w = next((_dict(g.get("weights")) for g in groups.values() if matches(name, g.get("targets") or
                                                                                  ["Linear"], linear=True)), None)
            if w:
                grids[name] = GridSpec(int(w["num_bits"]), -1 if w.get("strategy") == "channel" else
                                       int(w["group_size"]), bool(w.get("symmetric")))
            continue
        spec = (int(bits), int(group), bool(True if sym is None else sym)) if qconfig.get("quant_method") != "awq" \
            else (4, int(qconfig.get("group_size", qconfig.get("q_group_size"))), False)
        for pattern, override in _dict(qconfig.get("dynamic")).items():
            if re.match(pattern.removeprefix("+:").removeprefix("-:"), name):
                spec = None if pattern.startswith("-:") else (int(override.get("bits", spec[0])),
                                                              int(override.get("group_size", spec[1])),
                                                              bool(override.get("sym", spec[2])))
                break
        if spec is not None:
            grids[name] = GridSpec(*spec)
    return grids


def _union(dicts) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return keys


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "sym" if value else "asym"
    return str(value)


def markdown_table(summaries: list[OutputSummary]) -> str:
    """One row per output: grid, average bits per weight (scales and zeros counted), scores (perplexity, lm-eval
    metrics), stage seconds, weight size in MiB.

    Columns are the union over all outputs, in order of first appearance; a missing value is ``-``. A ``rotate``
    column (``--rotate``) appears where any output is rotated."""
    ppl_keys = _union(s.perplexities for s in summaries)
    task_keys = _union(s.task_scores for s in summaries)
    time_keys = _union(s.seconds for s in summaries)
    rotated = any(s.rotate for s in summaries)
    header = (["output", "method", "format", "bits", "group", "grid", "bits/weight", "activations"]
              + ["rotate"] * rotated + [f"ppl {k}" for k in ppl_keys] + task_keys + [f"{k} s" for k in time_keys]
              + ["weights MiB"])
    rows = []
    for s in summaries:
        rows.append([s.path.name or str(s.path), s.method, s.out_format, _cell(s.bits), _cell(s.group_size),
                     _cell(s.sym), "-" if s.bits_per_weight is None else f"{s.bits_per_weight:.3f}",
                     s.activations or "-"] + [s.rotate or "none"] * rotated
                    + [f"{s.perplexities[k]:.2f}" if k in s.perplexities else "-" for k in ppl_keys]
                    + [f"{s.task_scores[k]:.4f}" if k in s.task_scores else "-" for k in task_keys]
                    + [f"{s.seconds[k]:.1f}" if k in s.seconds else "-" for k in time_keys]
                    + [f"{s.weight_bytes / 2**20:.1f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
