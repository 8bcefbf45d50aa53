"""CLI handlers: argparse namespaces -> engine calls; the engine never sees argparse.

Each handler takes the parsed arguments of one subcommand, builds the engine's options, calls the
engine, prints the one-line summary and returns the exit status.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields


def method_flag_dest(field_name: str) -> str:
    """argparse destination of a method option (prefixed so it cannot clash with a general flag)."""
    return f"method_{field_name}"


def method_options_from_args(args) -> dict:
    """The chosen method's options that were given on the command line; a flag of another method is an error."""
    from .engine.methods.registry import METHODS, method_class, methods_with_option
    from .errors import TritonqError

    cls = method_class(args.method)
    own = {f.name for f in fields(cls.Options)}
    given = {}
    for other in METHODS.values():
        for f in fields(other.Options):
            value = getattr(args, method_flag_dest(f.name), None)
            if value is None:
                continue
            if f.name not in own:
                flag = "--" + f.name.replace("_", "-")
                users = methods_with_option(f.name)
                raise TritonqError(f"{flag} does not apply to --method {args.method} (it is an option of "
                                   f"{', '.join(users)})")
            given[f.name] = value
    return given


def offload_from_args(values: list[str] | None) -> tuple[bool | str, str | None]:
    """``--offload-activations`` [cpu | disk DIR] as (place, directory)."""
    from .errors import TritonqError

    if values is None:
        return False, None
    if values in ([], ["cpu"]):
        return "cpu", None
    if len(values) == 2 and values[0] == "disk":
        return "disk", values[1]
    raise TritonqError(f"--offload-activations takes nothing, 'cpu', or 'disk DIR'; got {' '.join(values)!r}")


def launch_ranks(argv: list[str], nproc: int) -> int:
    """``tritonq quantize --nproc N``: the same command on N ranks through ``torch.distributed.run`` (a standalone
    rendezvous on a free local port); each rank runs ``python -m tritonq`` without ``--nproc`` (torchrun's own
    parser would take it for an abbreviation of its ``--nproc-per-node``), joins the group from torchrun's
    environment, and rank 0 writes. Returns the launcher's exit status."""
    import subprocess
    import sys

    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tritonq", *rest]
    return subprocess.run(cmd, check=False).returncode


def quantize(args) -> int:
    from .engine import distributed
    from .engine.api import QuantizeOptions
    from .engine.api import quantize as run_quantize
    from .engine.model_io import resolve_device
    from .errors import TritonqError

    if args.nproc < 1:
        raise TritonqError(f"--nproc must be a positive number of ranks, got {args.nproc}")
    if args.nproc > 1:
        if distributed.launched_world() > 1:
            raise TritonqError("--nproc launches its own ranks; under torchrun drop --nproc (torchrun sets them)")
        from .engine.methods.registry import make_method
        from .engine.preflight import check_data_parallel

        # refuse a method that cannot run data-parallel before N processes start
        if args.recipe is not None:
            from .engine.methods.recipe import RecipeMethod
            from .engine.recipe import load_recipe

            method = RecipeMethod(load_recipe(args.recipe), args.method, method_options_from_args(args))
        else:
            method = make_method(args.method, method_options_from_args(args))
        check_data_parallel(method, args.nproc)
        return launch_ranks(args.argv, args.nproc)
    collective = distributed.init_from_env(resolve_device(args.device))
    try:
        return _quantize_here(args, run_quantize, QuantizeOptions, collective.is_writer)
    finally:
        distributed.shutdown()


def _quantize_here(args, run_quantize, QuantizeOptions, writer: bool) -> int:  # noqa: N803 (a class passed in)
    offload, activations_dir = offload_from_args(args.offload_activations)
    opts = QuantizeOptions(
        output=args.output, model=args.model, method=args.method, method_options=method_options_from_args(args),
        recipe=args.recipe,
        bits=args.bits, group_size=args.group_size, sym=args.sym, mse=args.mse, act_bits=args.act_bits,
        act_scheme=args.act_scheme, act_sym=args.act_sym, calib=args.calib,
        text_column=args.text_column, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        calib_batch=args.calib_batch, offload_activations=offload, activations_dir=activations_dir,
        resume=args.resume, work_dir=args.work_dir, out_format=args.out_format,
        overwrite=args.overwrite, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        eval_data=args.eval_data, eval_windows=args.eval_windows, progress=not args.no_progress,
        workers=args.workers, quantize_head=args.quantize_head, rotate=args.rotate,
        rotate_seed=args.rotate_seed, tune_epochs=args.tune_epochs, tune_lr=args.tune_lr, tune_batch=args.tune_batch,
        tune_norms=args.tune_norms,
    )
    s = run_quantize(opts)
    if not writer:  # [distributed] rank 0 prints the summary of what it wrote
        return 0
    secs = s.seconds
    grid = f"{opts.bits}-bit, group {s.group_size}, {'sym' if opts.sym else 'asym'}"
    how = f"the recipe {opts.recipe}" if opts.recipe else opts.method.upper()
    text = (f"Quantized {opts.model} with {how} ({grid}) over {s.layers} linear layers in "
            f"{secs.get('quantize_total', 0):.1f} s (load {secs.get('load', 0):.1f} s, "
            f"save {secs.get('save', 0):.1f} s, total {secs['total']:.1f} s); wrote {s.output} ({opts.out_format}).")
    if s.perplexity is not None:
        text += f" Perplexity on {opts.eval_data} ({s.eval_windows} windows of {opts.eval_seqlen}): {s.perplexity:.2f}."
    print(text)
    mem = s.memory
    if mem.get("per_block"):
        worst = max((b for b in mem["per_block"] if "host_peak_mb" in b), key=lambda b: b["host_peak_mb"],
                    default=None)
        where = f" (block {worst['block']})" if worst else ""
        device = f", device {mem['device_peak_mb']:.0f} MB" if mem.get("device_peak_mb") else ""
        print(f"Peak memory while quantizing: host {mem['host_peak_mb']:.0f} MB{where}{device}; weights "
              f"{mem['weights']}, activations on {mem['activation_cache']} (per block in quantization.json).")
    return 0


def memory(args) -> int:
    """Print the memory estimate of a quantize run (``engine/memory.py``) without loading any weights."""
    from types import SimpleNamespace

    from .engine.memory import GIB, estimate_for_options, store_of
    from .engine.model_io import load_config

    offload, _directory = offload_from_args(args.offload_activations)  # the directory does not change the estimate
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = SimpleNamespace(method=args.method, method_options=method_options_from_args(args), nsamples=args.nsamples,
                           seqlen=args.seqlen, calib_batch=args.calib_batch, group_size=args.group_size,
                           offload_activations=offload, dtype=args.dtype, device=device)
    est = estimate_for_options(opts, load_config(args.model, args.trust_remote_code), device=device,
                               streamed=_streams(args.model))
    if args.json:
        print(json.dumps(est.to_json(), indent=1))
        return 0
    where = f"{est.settings['device_type']} ({est.settings['compute_dtype']}), cache on {store_of(offload)}"
    peaks = f"peak host {est.peak_host / GIB:.2f} GiB" + (f", device {est.peak_device / GIB:.2f} GiB"
                                                        if est.peak_device else "")
    print(f"{args.model}, {args.method}, {args.nsamples} x {args.seqlen} (calib-batch {args.calib_batch}), "
          f"{where}: {peaks}")
    print(est.describe())
    return 0


def _streams(model: str) -> bool:
    """Whether quantize would stream ``model`` block by block, judged without reading or downloading weights: a
    directory with safetensors shards, or a hub id (assumed to have them); the built-in GGUF default loads whole."""
    from pathlib import Path

    from .engine.formats.store import tensor_files
    from .engine.model_io import SMOLLM2_NAME

    path = Path(model).expanduser()
    return model != SMOLLM2_NAME and (not path.is_dir() or tensor_files(path) is not None)


def evaluate(args) -> int:
    """``tritonq eval``: perplexity on ``--data`` (default wikitext2), and/or lm-eval ``--tasks``.

    With ``--tasks`` alone only the tasks run; with both, perplexity first. ``--record`` stores each score in
    the output's ``quantization.json`` (checked before any work), where ``tritonq report`` finds it."""
    from .errors import TritonqError

    tasks = None
    if args.tasks is not None:
        from .engine.evaluation.zero_shot import parse_tasks

        tasks = parse_tasks(args.tasks)
    else:
        given = [flag for flag, value in (("--limit", args.limit), ("--include-path", args.include_path))
                 if value is not None]
        if given:
            raise TritonqError(f"{', '.join(given)} applies to lm-eval tasks; add --tasks NAME[,NAME...]")
    data = args.data if args.data is not None or tasks else "wikitext2"
    if data is not None:
        from .engine.data import check_data, check_eval_seqlen, check_positive

        check_eval_seqlen(args.seqlen)
        check_positive(args.max_windows, "--max-windows", 8)
        check_data(data)
    from .engine.preflight import check_model_files, check_seqlen_fits

    check_model_files(args.model)
    if data is not None:
        check_seqlen_fits(args.model, args.seqlen, args.trust_remote_code)
    if args.record:
        from pathlib import Path

        from .engine.outputs import QUANT_JSON

        if not (Path(args.model) / QUANT_JSON).is_file():
            raise TritonqError(f"--record stores scores in {QUANT_JSON}, which {args.model} does not have; give a "
                               f"directory written by 'tritonq quantize' or 'tritonq pack', or drop --record")
    out: dict = {"model": args.model}
    status = 0
    if data is not None:
        from .engine.api import evaluate as run_evaluate

        res = run_evaluate(args.model, data, args.max_windows, args.seqlen, args.device, args.dtype,
                           progress=not args.json, trust_remote_code=args.trust_remote_code, act_bits=args.act_bits,
                           act_scheme=args.act_scheme, act_sym=args.act_sym)
        out.update({**asdict(res), "data": data})
        if args.record:
            from .engine.evaluation.report import PERPLEXITY, perplexity_label, record_evaluation

            record_evaluation(args.model, PERPLEXITY, perplexity_label(data, res.windows, res.seqlen),
                              {**asdict(res), "data": data})
        if not args.json:
            print(f"perplexity {res.perplexity:.4f} over {res.windows} windows of {res.seqlen} tokens "
                  f"({res.tokens} tokens) of {data}")
        status = 0 if math.isfinite(res.perplexity) else 1
    if tasks:
        from .engine.evaluation.zero_shot import run_tasks, task_table

        limit = args.limit
        if limit is not None and limit >= 1 and float(limit).is_integer():
            limit = int(limit)
        res = run_tasks(args.model, tasks, limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                        include_path=args.include_path, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, act_bits=args.act_bits, act_scheme=args.act_scheme,
                        act_sym=args.act_sym)
        scores = {name: asdict(score) for name, score in res.tasks.items()}
        out["lm_eval"] = {"tasks": scores, "num_fewshot": res.num_fewshot, "limit": res.limit,
                          "batch_size": res.batch_size, "lm_eval_version": res.lm_eval_version}
        if args.record:
            from .engine.evaluation.report import LM_EVAL, record_evaluation, task_label

            for name, score in scores.items():
                record_evaluation(args.model, LM_EVAL, task_label(name, res.num_fewshot, res.limit),
                                  {**score, "num_fewshot": res.num_fewshot, "limit": res.limit,
                                   "lm_eval_version": res.lm_eval_version})
        if not args.json:
            shots = f"{res.num_fewshot}-shot" + ("" if res.limit is None else f", limit {res.limit:g} per task")
            print(f"lm-eval {res.lm_eval_version} on {args.model} ({shots}):")
            print(task_table(res))
    if args.json:
        print(json.dumps(out))
    return status


def report(args) -> int:
    """``tritonq report DIR... [--plot FILE.png] [--json]``: one Markdown table across outputs; the plot."""
    from .engine.evaluation.report import markdown_table, read_output

    if args.plot:
        from .bench.plots import check_png_path, require_matplotlib

        require_matplotlib()
        check_png_path(args.plot)
    summaries = [read_output(d) for d in args.dirs]
    if args.json:
        rows = [{**asdict(s), "path": str(s.path)} for s in summaries]
        print(json.dumps(rows, indent=1))
    else:
        print(markdown_table(summaries))
    if args.plot:
        import sys

        from .bench.plots import plot_perplexity_vs_bits

        print(f"wrote {plot_perplexity_vs_bits(summaries, args.plot)}", file=sys.stderr)
    return 0


def bench_decode(args) -> int:
    """``tritonq bench decode``; with ``--plot``, its JSON is printed and drawn (packed vs float tokens/s)."""
    from .bench.decode import main as decode_main

    if not getattr(args, "plot", None):
        return decode_main(args)
    import contextlib
    import io
    import sys

    from .bench.plots import check_png_path, plot_decode, require_matplotlib
    from .errors import TritonqError

    require_matplotlib()
    check_png_path(args.plot)
    args.json = True  # the plot reads the JSON result; it is also what is printed
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        status = decode_main(args)
    text = captured.getvalue()
    sys.stdout.write(text)
    start = text.find("{")
    try:
        result, _ = json.JSONDecoder().raw_decode(text[start:]) if start >= 0 else (None, 0)
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise TritonqError("bench decode printed no JSON result to plot")
    print(f"wrote {plot_decode(result, args.plot)}", file=sys.stderr)
    return status


def plot(args) -> int:
    """``tritonq plot {matmul,decode} RESULT.json --output FILE.png``: plot a saved bench result."""
    import sys
    from pathlib import Path

    from .bench.plots import check_png_path, plot_decode, plot_matmul_speedup, require_matplotlib
    from .errors import TritonqError

    require_matplotlib()
    check_png_path(args.output)
    src = Path(args.result)
    if not src.is_file():
        raise TritonqError(f"{src} does not exist; give the JSON file a 'tritonq bench {args.kind} --json' run wrote")
    try:
        result = json.loads(src.read_text())
    except json.JSONDecodeError as exc:
        raise TritonqError(f"{src} is not JSON ({exc.msg}, line {exc.lineno}); give the output of "
                           f"'tritonq bench {args.kind} --json'") from None
    draw = plot_matmul_speedup if args.kind == "matmul" else plot_decode
    print(f"wrote {draw(result, args.output)}", file=sys.stderr)
    return 0


def pack(args) -> int:
    """``tritonq pack SRC --format F --output OUT [--overwrite]``: pack a tritonq output, print its size."""
    from .engine.formats.registry import save_packed
    from .engine.outputs import check_output_dir

    check_output_dir(args.output, args.overwrite)  # unwritable, or not ours to replace: refused before packing
    out = save_packed(args.src, args.output, args.out_format, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {args.out_format} checkpoint to {out} ({size / 2**20:.1f} MiB)")
    return 0


def generate(args) -> int:
    """``tritonq generate DIR --prompt P [--max-new-tokens N]``: greedy continuation, then tokens/s on stderr.

    The text streams to stdout as it is decoded; the timing line goes to stderr so stdout holds only the text.
    """
    import sys
    import time

    from .engine.preflight import check_model_files
    from .engine.runtime import serve as packed
    from .errors import TritonqError

    if args.max_new_tokens < 1:
        raise TritonqError("--max-new-tokens must be at least 1")
    check_model_files(args.model)
    model, tokenizer = packed.load_generation_model(args.model, args.device, args.dtype)
    chat = packed.has_chat_template(tokenizer)
    ids = packed.user_prompt_ids(tokenizer, args.prompt)
    state = packed.Completion()
    t0 = time.perf_counter()
    for delta in packed.stream_text(model, tokenizer, ids, args.max_new_tokens, state=state):
        sys.stdout.write(delta)
        sys.stdout.flush()
    packed.synchronize(model)
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    n = len(state.tokens) + (state.finish_reason == "stop")  # the stop token was decoded too
    tps = n / (t1 - t0) if t1 > t0 else float("inf")
    print(
        f"[{n} tokens in {t1 - t0:.2f} s: {tps:.1f} tokens/s; prompt {len(ids)} tokens"
        f"{', chat template' if chat else ''}; device {model.device}, {model.dtype}]",
        file=sys.stderr,
    )
    return 0


def serve(args) -> int:
    """``tritonq serve DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-queue 32]
    [--prefix-cache-tokens 2048]``: the
    OpenAI-compatible server, batching concurrent requests, until interrupted."""
    import sys
    from pathlib import Path

    from .errors import TritonqError

    try:
        import uvicorn

        from .engine.runtime.openai_server import create_app
    except ImportError:
        raise TritonqError("tritonq serve needs FastAPI and uvicorn: pip install 'tritonq[serve]'") from None
    from .engine.preflight import check_model_files
    from .engine.runtime.batching import check_bounds
    from .engine.runtime.serve import load_generation_model

    check_bounds(args.max_batch, args.max_queue, args.prefix_cache_tokens)
    check_model_files(args.model)
    model, tokenizer = load_generation_model(args.model, args.device, args.dtype)
    model_id = Path(args.model).resolve().name
    app = create_app(model, tokenizer, model_id, args.max_batch, args.max_queue, args.prefix_cache_tokens)
    engine = app.state.engine
    mode = f"batches of up to {engine.max_batch}" if engine.batched else "one row at a time per step"
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1 ({model.device}, {model.dtype}; {mode}, "
          f"queue {engine.max_queue})", file=sys.stderr, flush=True)
    # a stream in flight must not hold SIGTERM for its whole length: uvicorn cancels it after 5 s
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
