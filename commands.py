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
    from .engine.registry import METHODS, method_class, methods_with_option
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


def quantize(args) -> int:
    from .engine.api import QuantizeOptions
    from .engine.api import quantize as run_quantize

    opts = QuantizeOptions(
        output=args.output, model=args.model, method=args.method, method_options=method_options_from_args(args),
        bits=args.bits, group_size=args.group_size, sym=args.sym, mse=args.mse, act_bits=args.act_bits,
        act_scheme=args.act_scheme, act_sym=args.act_sym, calib=args.calib,
        text_column=args.text_column, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        calib_batch=args.calib_batch, offload_activations=args.offload_activations, out_format=args.out_format,
        overwrite=args.overwrite, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        eval_data=args.eval_data, eval_windows=args.eval_windows, progress=not args.no_progress,
    )
    s = run_quantize(opts)
    secs = s.seconds
    grid = f"{opts.bits}-bit, group {s.group_size}, {'sym' if opts.sym else 'asym'}"
    text = (f"Quantized {opts.model} with {opts.method.upper()} ({grid}) over {s.layers} linear layers in "
            f"{secs.get('quantize_total', 0):.1f} s (load {secs.get('load', 0):.1f} s, "
            f"save {secs.get('save', 0):.1f} s, total {secs['total']:.1f} s); wrote {s.output} ({opts.out_format}).")
    if s.perplexity is not None:
        text += f" Perplexity on {opts.eval_data} ({s.eval_windows} windows of {opts.eval_seqlen}): {s.perplexity:.2f}."
    print(text)
    return 0


def evaluate(args) -> int:
    from .engine.api import evaluate as run_evaluate

    res = run_evaluate(args.model, args.data, args.max_windows, args.seqlen, args.device, args.dtype,
                       progress=not args.json, trust_remote_code=args.trust_remote_code, act_bits=args.act_bits,
                       act_scheme=args.act_scheme, act_sym=args.act_sym)
    if args.json:
        print(json.dumps({**asdict(res), "model": args.model, "data": args.data}))
    else:
        print(f"perplexity {res.perplexity:.4f} over {res.windows} windows of {res.seqlen} tokens "
              f"({res.tokens} tokens) of {args.data}")
    return 0 if math.isfinite(res.perplexity) else 1


def pack(args) -> int:
    """``tritonq pack SRC --format F --output OUT [--overwrite]``: pack a tritonq output, print its size."""
    from .engine.formats import save_packed

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

    from .engine import serve as packed
    from .errors import TritonqError

    if args.max_new_tokens < 1:
        raise TritonqError("--max-new-tokens must be at least 1")
    model, tokenizer = packed.load_packed_model(args.model, args.device, args.dtype)
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
    """``tritonq serve DIR [--host 127.0.0.1] [--port 8000]``: the OpenAI-compatible server until interrupted."""
    import sys
    from pathlib import Path

    from .errors import TritonqError

    try:
        import uvicorn

        from .engine.openai_server import create_app
    except ImportError:
        raise TritonqError("tritonq serve needs FastAPI and uvicorn: pip install 'tritonq[serve]'") from None
    from .engine.serve import load_packed_model

    model, tokenizer = load_packed_model(args.model, args.device, args.dtype)
    model_id = Path(args.model).resolve().name
    app = create_app(model, tokenizer, model_id)
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1 ({model.device}, {model.dtype})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
