"""Choose any method's defaults from calibration-side evidence: held-out loss on the calibration corpus.

The calibration corpus (``pydoc`` by default) is split by position: windows are drawn from its first 90%,
and every candidate setting is scored by the perplexity of the quantized model on the last 10% (windows
of 2048 tokens), never on the evaluation texts. Texts named with ``--check`` are scored too: a second corpus
(the Vim user manual in issues 9 and 22) takes part in the choice, the evaluation texts are for the record only.
Calibration seeds move 3-bit results by a few per cent, so every setting runs under each ``--seeds`` value and
the table reports the mean. This is how GPTQ's defaults were chosen (issue 9, :mod:`.gptq_defaults`); issue 22
applies it to every method.

A setting is ``[METHOD:]FIELD=VALUE,...`` over the fields of the method's Options (``--method`` when no
method is named), or a bare method name for its defaults, or ``default`` for ``--method``'s defaults:

    python -m tritonq.bench.method_defaults --method boa --bits 3 --group-size 64 -1 --seeds 0 \\
        --settings gptq act_order_col=1 act_order_col=1,block_v=1 act_order_col=1,qparam=hessian \\
        --check vim_usr_manual.txt wikitext2_test.txt:8 licenses.txt --check-windows 4 --log sweep.jsonl

Every finished run is appended to ``--log`` (one JSON line), and a rerun with the same log skips the runs
already there, so a long sweep can be stopped and resumed; ``--table-only`` prints the table from the log.
A text scored over more windows than ``--check-windows`` also gets a column for its first ``--check-windows``
windows (per-window losses are kept, so both come from one evaluation). The float model is loaded once; each
run quantizes a fresh copy in memory (nothing is written).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TritonqError

HELDOUT = "heldout"


def parse_setting(setting: str, default_method: str) -> tuple[str, dict[str, Any]]:
    """``[METHOD:]FIELD=VALUE,...`` -> (method, options dict), each value converted to its field's type."""
    from ..engine.methods.registry import method_class

    if setting == "default":
        return default_method, {}
    if "=" not in setting:
        method, body = (setting.rstrip(":"), "")
    elif ":" in setting.split("=", 1)[0]:
        method, body = setting.split(":", 1)
    else:
        method, body = default_method, setting
    cls = method_class(method)
    hints = typing.get_type_hints(cls.Options)
    known = {f.name: f for f in fields(cls.Options)}
    options: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        name, _, text = item.partition("=")
        if name not in known:
            raise TritonqError(f"setting {setting!r}: {method} has no option {name!r} (it takes: {', '.join(known)})")
        options[name] = _convert(text, hints[name], setting)
    return method, options


def _convert(text: str, hint: Any, setting: str) -> Any:
    kinds = set(typing.get_args(hint)) or {hint}
    if bool in kinds:
        if text.lower() not in ("1", "0", "true", "false"):
            raise TritonqError(f"setting {setting!r}: {text!r} is not a boolean; write 1 or 0")
        return text.lower() in ("1", "true")
    for kind in (int, float):
        if kind in kinds:
            return kind(text)
    return text


def label(method: str, options: dict[str, Any]) -> str:
    """A setting's name in the table and the log: the method and the options given (none: its defaults), so
    the name does not change when a default does."""
    given = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in options.items())
    return f"{method}:{given}" if given else f"{method} (defaults)"


def _effective(method: Any) -> dict[str, Any]:
    """Every option the run used, defaults included: the label names only those given, and a default may change
    between runs of one sweep (issue 22 changed BoA's)."""
    options = getattr(method, "options", None)
    return asdict(options) if is_dataclass(options) else {}


def _windows(ids: torch.Tensor, seqlen: int, limit: int | None) -> torch.Tensor:
    from ..engine.data import evaluation_windows

    return evaluation_windows(ids, seqlen, limit, "held-out")


def window_losses(model: torch.nn.Module, windows: torch.Tensor) -> list[float]:
    """Mean token NLL of each window (perplexity over the first n windows is ``exp(mean(losses[:n]))``)."""
    from ..engine.evaluation.perplexity import perplexity

    cpu = torch.device("cpu")
    return [math.log(perplexity(model, w.unsqueeze(0), cpu, progress=False).perplexity) for w in windows]


def ppl(losses: list[float], n: int | None = None) -> float:
    part = losses[:n] if n else losses
    return math.exp(sum(part) / len(part))


def _check_texts(specs: list[str], default_windows: int) -> dict[str, int]:
    """``FILE[:N]`` -> {FILE: N}."""
    texts = {}
    for spec in specs:
        path, _, n = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
        texts[path] = int(n) if n else default_windows
    return texts


def _read_log(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _key(row: dict) -> tuple:
    return row["bits"], row["group_size"], row["setting"], row["seed"]


def run_sweep(args: argparse.Namespace, done: list[dict]) -> list[dict]:
    """Quantize and score every (bits, group, setting, seed) not already in ``done``; return all rows."""
    from ..engine.adapters import adapter_for
    from ..engine.data import calibration_windows, load_corpus, tokenize
    from ..engine.grid import GridSpec
    from ..engine.methods.registry import make_method
    from ..engine.model_io import load_model, load_tokenizer
    from ..engine.pipeline import quantize_blocks

    settings = [parse_setting(s, args.method) for s in args.settings]  # refuse a bad setting before loading
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(args.model)
    float_model = load_model(args.model, torch.float32)
    adapter = adapter_for(float_model.config)
    ids = tokenize(tokenizer, load_corpus(args.calib).text)
    cut = int(ids.shape[1] * (1 - args.heldout_fraction))
    calib_ids, heldout = ids[:, :cut], _windows(ids[:, cut:], 2048, None)
    checks = {path: _windows(tokenize(tokenizer, load_corpus(path, split="test").text), 2048, n)
              for path, n in _check_texts(args.check, args.check_windows).items()}
    rows, seen = list(done), {_key(r) for r in done}
    for bits in args.bits:
        for group_size in args.group_size:
            spec = GridSpec(bits=bits, group_size=group_size)
            for method_name, options in settings:
                name = label(method_name, options)
                for seed in args.seeds if method_name != "rtn" else args.seeds[:1]:  # RTN uses no data
                    if (bits, group_size, name, seed) in seen:
                        continue
                    model = copy.deepcopy(float_model)
                    method, batches = make_method(method_name, options), None
                    if method_name != "rtn":
                        windows = calibration_windows(calib_ids, args.nsamples, args.seqlen, seed, args.calib)
                        batches = list(torch.split(windows, 8))
                    t0 = time.perf_counter()
                    quantize_blocks(model, adapter, method, spec, cpu, batches, progress=False)
                    row = {"bits": bits, "group_size": group_size, "setting": name, "seed": seed,
                           "options": _effective(method), "quantize_s": round(time.perf_counter() - t0, 1),
                           "losses": {HELDOUT: window_losses(model, heldout)}}
                    for path, windows in checks.items():
                        row["losses"][path] = window_losses(model, windows)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "options")}), file=sys.stderr,
                          flush=True)
                    if args.log:
                        with open(args.log, "a") as log:
                            log.write(json.dumps(row) + "\n")
                    del model
    return rows


def columns(rows: list[dict], check_windows: int) -> list[tuple[str, str, int | None]]:
    """(title, text, windows) per table column: held-out, then each text, plus its first ``check_windows``."""
    texts: dict[str, int] = {}
    for row in rows:
        for text, losses in row["losses"].items():
            texts[text] = max(texts.get(text, 0), len(losses))
    out = []
    for text, n in texts.items():
        short = "held-out pydoc" if text == HELDOUT else Path(text).name
        if text != HELDOUT and n > check_windows:
            out.append((f"{short} ({check_windows} w)", text, check_windows))
        out.append((short if text == HELDOUT else f"{short} ({n} w)", text, None))
    return out


def table(rows: list[dict], check_windows: int, per_seed: bool = False) -> str:
    """Markdown: one line per (bits, group, setting), the mean ± sd over seeds (or the seeds' values)."""
    cols = columns(rows, check_windows)
    lines = [f"| bits | group | setting | seeds | {' | '.join(title for title, _, _ in cols)} |",
             "| --- | --- | --- | --- |" + " --- |" * len(cols)]
    keys = list(dict.fromkeys((r["bits"], r["group_size"], r["setting"]) for r in rows))
    for bits, group_size, setting in keys:
        sel = sorted((r for r in rows if (r["bits"], r["group_size"], r["setting"]) == (bits, group_size, setting)),
                     key=lambda r: r["seed"])
        cells = []
        for _, text, n in cols:
            values = [ppl(r["losses"][text], n) for r in sel if text in r["losses"]]
            if not values:
                cells.append("-")
            elif per_seed:
                cells.append(" / ".join(f"{v:.2f}" for v in values))
            else:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.2f} ± {sd:.2f}")
        seeds = ",".join(str(r["seed"]) for r in sel)
        lines.append(f"| {bits} | {'channel' if group_size == -1 else group_size} | {setting} | {seeds} | "
                     f"{' | '.join(cells)} |")
    return "\n".join(lines)


def build_parser(prog: str = "python -m tritonq.bench.method_defaults") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--method", default="gptq", help="the method of settings that name none")
    p.add_argument("--bits", type=int, nargs="+", default=[3])
    p.add_argument("--group-size", type=int, nargs="+", default=[64], help="one or more; -1 = per channel")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["default"],
                   help="[METHOD:]FIELD=VALUE,... ; a method name alone or 'default' for defaults; 'rtn' for RTN")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--check", nargs="*", default=[], help="FILE[:WINDOWS] texts scored besides the held-out text")
    p.add_argument("--check-windows", type=int, default=8)
    p.add_argument("--log", help="JSON lines: every finished run is appended, runs already there are skipped")
    p.add_argument("--table-only", action="store_true", help="print the table from --log, run nothing")
    p.add_argument("--per-seed", action="store_true", help="cells list each seed's value instead of mean ± sd")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    done = _read_log(args.log)
    rows = done if args.table_only else run_sweep(args, done)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, args.check_windows, args.per_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
