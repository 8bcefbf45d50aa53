"""``tritonq bench decode``: prefill and decode tokens/s, and memory, of a packed int4 model against its float model.

Two sources. ``tritonq bench decode DIR`` benches a packed checkpoint; its float model is the same model
with every ``QuantLinear`` replaced by a dense ``nn.Linear`` holding the dequantized weights (the
fake-quantized model: same architecture, device and dtype), as marlin's ``bench.py`` compares with a
dense baseline. ``tritonq bench decode --random-llama [--layers N | --config config.json]`` builds a
random-weight Llama from a config (hidden 2048, intermediate 5632 by default: shapes where decode is
bandwidth-bound), nothing downloaded; its packed model is RTN 4-bit group 64 (``--group-size``; asymmetric)
of those weights and its float model the RTN fake-quantized weights, so both compute the same function.

``--sides`` picks the sides (packed, float, llama.cpp; packed always). The llama.cpp side
(:mod:`tritonq.bench.decode_llama_cpp`, random Llama only, group 32) runs the packed side's very RTN weights
as tritonq's Q4_1 GGUF in llama-cpp-python, with the same prompt ids, new tokens and threads (issue 23, item 1).

Each side runs in a fresh Python process, so that its resident memory (RSS) is its own. There, one
untimed warm-up precedes ``--runs`` timed runs; a run prefills ``--prompt-tokens`` tokens and then
decodes ``--max-new-tokens`` tokens greedily (KV-cached, no stop at end-of-sequence) through
:func:`tritonq.engine.runtime.serve.generate_tokens`, the path of ``tritonq generate`` and ``serve``. Reported:
the median tokens/s of the runs with their min and max; weight bytes (all parameters and buffers, and
those of the quantized linears alone) and RSS after the runs, above the process's RSS before the model
was built (memory that building freed is handed back to the OS first); the machine's copy
bandwidth (a large ``Tensor.copy_``: bytes read plus bytes written per
second); and the decode bound it implies, bandwidth / weight bytes read per token (every weight but the
input embedding table, of which a token reads one row).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..engine.outputs import QUANT_JSON, read_json_object, read_quantization_json
from ..errors import TritonqError
from .decode_measure import rate_summary, rss_bytes

PROMPT = "The history of quantization in signal processing"

#: The random-weight Llama: TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
#: vocabulary 32000) with a few layers.
RANDOM_LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                    vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2)
RANDOM_GROUP_SIZE = 64
SIDES = ("packed", "float")  # the default --sides
ALL_SIDES = ("packed", "float", "llama.cpp")


# ---------------------------------------------------------------------------------------------------
# measurements


def memory_bandwidth(mib: int = 512, repeats: int = 7) -> dict:
    """Copy bandwidth of this machine: a ``mib``-MiB float32 ``copy_`` (far above any cache), median of
    ``repeats``; counts the bytes read and the bytes written."""
    import torch

    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"copy_mib": mib, "copy_gb_per_s": 2 * n * 4 / med / 1e9,
            "copy_gb_per_s_max": 2 * n * 4 / min(times) / 1e9}


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's tensors (each storage once), of its quantized linears' tensors (``QuantLinear``
    buffers, or the float weights of the same linears), and those read per decoded token."""
    import torch.nn as nn

    from ..engine.runtime.fused import SharedGemm
    from ..engine.runtime.qlinear import QuantLinear

    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    linears = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, SharedGemm)):
            linears += sum(b.numel() * b.element_size() for b in mod.buffers() if b is not mod.bias)
        elif isinstance(mod, nn.Linear) and ".layers." in f".{name}":
            linears += mod.weight.numel() * mod.weight.element_size()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = _table_of(embed)  # an Int8Embedding / Int8Linear (--quantize-head) holds int8 codes, no .weight
    tied = head is not None and _table_of(head).data_ptr() == table.data_ptr()
    embed_bytes = sum(t.numel() * t.element_size() for t in [*embed.parameters(), *embed.buffers()])
    per_token = total - (0 if tied else embed_bytes)
    return {"total": total, "quantized_linears": linears, "read_per_token": per_token}


def _table_of(module):
    """The weight table of an embedding or output layer: ``weight``, or the codes of a quantized one (int8
    ``qweight``; an int4 head's ``qweight``, or its CPU repacking; the fp16 head's ``weight_rows``)."""
    names = ("rows_weight", "weight_rows", "weight", "qweight", "weight_int4pack")  # the first two: tritonq's CPU ops
    return next(t for t in (getattr(module, n, None) for n in names) if t is not None)


def _timed_runs(model, ids: list[int], new_tokens: int, runs: int) -> dict:
    from ..engine.runtime.serve import generate_tokens, synchronize

    def once(n: int) -> tuple[float, float, list[int]]:
        synchronize(model)
        t0 = time.perf_counter()
        it = generate_tokens(model, ids, n)
        out = [next(it)]  # the first token comes from the prefill's logits
        synchronize(model)
        t1 = time.perf_counter()
        out.extend(it)
        synchronize(model)
        return t1 - t0, time.perf_counter() - t1, out

    once(min(4, new_tokens))  # warm-up: caches allocated, kernels picked
    prefill, decode, tokens = [], [], []
    for _ in range(runs):
        p, d, tokens = once(new_tokens)
        prefill.append(len(ids) / p)
        decode.append((len(tokens) - 1) / d if d > 0 else float("inf"))
    return {"prefill_tokens_per_s": rate_summary(prefill), "decode_tokens_per_s": rate_summary(decode),
            "tokens": tokens}


# ---------------------------------------------------------------------------------------------------
# the two models


def random_llama_config(layers: int = 4, config_path: str | None = None, **overrides):
    """The random-weight Llama's config: :data:`RANDOM_LLAMA` with ``layers`` layers, or a config.json."""
    from transformers import AutoConfig, LlamaConfig

    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise TritonqError(f"config {path} does not exist; give a Hugging Face config.json")
        config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    else:
        config = LlamaConfig(**{**RANDOM_LLAMA, "num_hidden_layers": layers})
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def random_llama(config, side: str, dtype, seed: int = 0, group_size: int = RANDOM_GROUP_SIZE):
    """A random-weight causal LM from ``config``: RTN 4-bit (group ``group_size``, asymmetric) of its block
    linears, packed in ``QuantLinear`` (``side="packed"``) or fake-quantized in float (``side="float"``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..engine.formats.records import QuantizedWeight
    from ..engine.formats.runtime import to_runtime
    from ..engine.grid import GridSpec, codes_of
    from ..engine.methods.rtn import round_to_nearest
    from ..engine.runtime.qlinear import swap_linears
    from .decode_llama_cpp import block_linear_names

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    spec = GridSpec(bits=4, group_size=group_size, sym=False)
    names = block_linear_names(model)
    packed = {}
    for name in names:
        lin = model.get_submodule(name)
        res = round_to_nearest(lin.weight.data, spec, name)
        if side == "float":
            lin.weight.data = res.weight.to(dtype)
            continue
        codes = codes_of(res.weight, res.scale, res.zero, res.g_idx, spec.maxq)
        bias = None if lin.bias is None else lin.bias.data
        packed[name] = to_runtime(QuantizedWeight(codes, res.scale, res.zero, res.g_idx, bias), spec)
        lin.weight = None  # free the float weight now: the process holds one layer's floats at a time
    if packed:
        swap_linears(model, packed, dtype)
    return model.to(dtype)


def _build(source: dict, side: str, device: str, dtype: str):
    """(model, prompt ids) of one side; the packed model on the CPU runs as ``load_packed_model`` sets it up."""
    import gc

    from ..engine.runtime.cpu_head import use_cpu_head
    from ..engine.runtime.fused import fuse_input_sharing_linears
    from ..engine.runtime.qlinear import use_cpu_int4
    from ..engine.runtime.serve import dequantized_copy, load_packed_model, prompt_ids, resolve_device_dtype

    dev, dt = resolve_device_dtype(device, dtype)
    if source["kind"] == "random":
        config = random_llama_config(source["layers"], source.get("config"))
        group_size = source.get("group_size", RANDOM_GROUP_SIZE)
        model = random_llama(config, side, dt, source.get("seed", 0), group_size).to(dev)
        if side == "packed" and dev.type == "cpu":
            use_cpu_int4(model)
            fuse_input_sharing_linears(model)
            use_cpu_head(model)
        return model, random_prompt_ids(source, config.vocab_size)
    if side == "packed":
        model, tokenizer = load_packed_model(source["path"], device, dtype)
    else:  # the fake-quantized model, from the exact (fp16-scale) reference weights
        packed, tokenizer = load_packed_model(source["path"], device, dtype, cpu_int4=False)
        model = dequantized_copy(packed)
        del packed
        gc.collect()
    ids = prompt_ids(tokenizer, PROMPT)
    ids = (ids * (source["prompt_tokens"] // max(len(ids), 1) + 1))[: source["prompt_tokens"]]
    return model, ids


def random_prompt_ids(source: dict, vocab_size: int) -> list[int]:
    """The random model's prompt: ``prompt_tokens`` ids drawn from the source's seed (every side feeds these)."""
    import torch

    gen = torch.Generator().manual_seed(source.get("seed", 0))
    return torch.randint(0, vocab_size, (source["prompt_tokens"],), generator=gen).tolist()


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_side(source: dict, side: str, device: str, dtype: str, runs: int, new_tokens: int) -> dict:
    """Build one side and time it (in this process; :func:`main` calls it in a fresh one per side)."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline: its libraries are not the model's)
    from transformers import AutoModelForCausalLM  # noqa: F401

    before = rss_bytes()
    model, ids = _build(source, side, device, dtype)
    _release_freed_memory()  # what building freed (float weights before packing) is not the model's RSS
    timed = _timed_runs(model, ids, new_tokens, runs)
    after = rss_bytes()
    return {
        **timed, "prompt_tokens": len(ids), "new_tokens": new_tokens, "threads": torch.get_num_threads(),
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "weight_bytes": weight_bytes(model),
        "rss_bytes": after["rss"] - before["rss"], "peak_rss_bytes": after["peak_rss"] - before["rss"],
    }


def _in_subprocess(job: dict, what: str) -> dict:
    """Run ``job`` through :func:`_child` in a fresh Python process; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="tritonq-bench-") as tmp:
        out = Path(tmp) / "side.json"
        code = "import sys; from tritonq.bench.decode import _child; _child(sys.argv[1])"
        # -P and cwd=tmp: a checkout's own kernels/ folder must not shadow the Hugging Face ``kernels`` package
        proc = subprocess.run([sys.executable, "-P", "-c", code, json.dumps({**job, "out": str(out)})], cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise TritonqError(f"the {what} of the benchmark failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _side_in_subprocess(source: dict, side: str, args) -> dict:
    job = {"task": "side", "source": source, "side": side, "device": args.device, "dtype": args.dtype,
           "runs": args.runs, "new_tokens": args.max_new_tokens}
    return _in_subprocess(job, f"{side} side")


def _llama_cpp_in_subprocess(source: dict, args, threads: int) -> dict:
    """The GGUF written (and checked) in one fresh process, then decoded by llama.cpp in another."""
    with tempfile.TemporaryDirectory(prefix="tritonq-bench-gguf-") as gguf_dir:
        written = _in_subprocess({"task": "gguf", "source": source, "dtype": args.dtype, "dir": gguf_dir},
                                 "GGUF writer")
        job = {"task": "llama.cpp", "source": source, "gguf": written["path"], "runs": args.runs,
               "new_tokens": args.max_new_tokens, "threads": threads}
        side = _in_subprocess(job, "llama.cpp side")
    return {**side, "weight_bytes": written["weight_bytes"],
            "gguf": {k: v for k, v in written.items() if k not in ("path", "weight_bytes")}}


def _child(job_json: str) -> None:
    job = json.loads(job_json)
    try:
        if job["task"] == "gguf":
            from .decode_llama_cpp import write_random_gguf

            source = job["source"]
            result = write_random_gguf(random_llama_config(source["layers"], source.get("config")), source,
                                       job["dtype"], job["dir"])
        elif job["task"] == "llama.cpp":
            from .decode_llama_cpp import run_llama_cpp_side

            source = job["source"]
            ids = random_prompt_ids(source, random_llama_config(source["layers"], source.get("config")).vocab_size)
            result = run_llama_cpp_side(job["gguf"], ids, job["new_tokens"], job["runs"], job["threads"])
        else:
            result = run_side(job["source"], job["side"], job["device"], job["dtype"], job["runs"],
                              job["new_tokens"])
    except TritonqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    Path(job["out"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# the command


def _sides(args) -> tuple[str, ...]:
    """``--sides``: a comma list of :data:`ALL_SIDES` that includes packed (every comparison is against it)."""
    raw = getattr(args, "sides", None) or ",".join(SIDES)
    sides = tuple(s.strip() for s in (raw.split(",") if isinstance(raw, str) else raw) if s.strip())
    unknown = [s for s in sides if s not in ALL_SIDES]
    if unknown or len(set(sides)) != len(sides) or "packed" not in sides:
        raise TritonqError(f"--sides {raw!r}: give distinct sides among {', '.join(ALL_SIDES)}, packed included "
                           "(e.g. --sides packed,llama.cpp)")
    return tuple(s for s in ALL_SIDES if s in sides)


def _source(args) -> dict:
    random = bool(getattr(args, "random_llama", False) or getattr(args, "config", None))
    if random == bool(args.model):
        raise TritonqError("give either a packed checkpoint directory or --random-llama (or --config FILE), "
                           "not both and not neither")
    prompt_tokens = int(getattr(args, "prompt_tokens", 32))
    if prompt_tokens < 1:
        raise TritonqError("--prompt-tokens must be at least 1")
    if int(getattr(args, "runs", 1)) < 1 or int(args.max_new_tokens) < 2:
        raise TritonqError("--runs must be at least 1 and --max-new-tokens at least 2")
    if random:
        layers = int(getattr(args, "layers", 4))
        if layers < 1:
            raise TritonqError("--layers must be at least 1")
        config = getattr(args, "config", None)
        if config is not None:
            if not Path(config).is_file():
                raise TritonqError(f"config {config} does not exist; give a Hugging Face config.json")
            read_json_object(Path(config), "give a Hugging Face config.json")
            config = str(Path(config).resolve())  # each side runs in a fresh process in another folder
        return {"kind": "random", "layers": layers, "config": config, "prompt_tokens": prompt_tokens, "seed": 0}
    path = Path(args.model)
    if not path.is_dir():
        raise TritonqError(f"{path} is not a packed checkpoint (not a directory); make one with 'tritonq pack', "
                           "or pass --random-llama")
    if not (path / "config.json").is_file() or "quantization_config" not in read_json_object(
            path / "config.json", "restore the checkpoint's config.json, or pack it again with 'tritonq pack'"):
        raise TritonqError(f"{path} is not a packed checkpoint (no config.json with a quantization_config); "
                           "make one with 'tritonq pack', or pass --random-llama")
    if (path / QUANT_JSON).is_file():  # its activation record is read when the model loads
        read_quantization_json(path / QUANT_JSON)
    return {"kind": "dir", "path": str(path.resolve()), "prompt_tokens": prompt_tokens}


def main(args) -> int:
    from .decode_llama_cpp import check_llama_cpp_side, compare_with_packed, group_size_for

    args.runs = int(getattr(args, "runs", 5))
    args.prompt_tokens = int(getattr(args, "prompt_tokens", 32))
    side_names = _sides(args)
    source = _source(args)
    if source["kind"] == "random":
        source["group_size"] = group_size_for(args, side_names, RANDOM_GROUP_SIZE)
        if source["group_size"] < 1:
            raise TritonqError("--group-size must be at least 1")
    if "llama.cpp" in side_names:
        check_llama_cpp_side(source, args)
    bandwidth = memory_bandwidth()
    sides: dict[str, dict] = {}
    for name in side_names:  # packed first: llama.cpp takes its thread count
        sides[name] = (_llama_cpp_in_subprocess(source, args, sides["packed"]["threads"]) if name == "llama.cpp"
                       else _side_in_subprocess(source, name, args))
    packed = sides["packed"]
    tokens = {name: side.pop("tokens") for name, side in sides.items()}
    bw = bandwidth["copy_gb_per_s"] * 1e9
    for side in sides.values():
        side["decode_bound_tokens_per_s"] = bw / side["weight_bytes"]["read_per_token"]
    label = (f"random Llama {source['layers']}L" if source["kind"] == "random" and not source.get("config")
             else Path(source.get("config") or source.get("path")).name)
    result = {"model": label, "source": source, "device": packed["device"], "dtype": packed["dtype"],
              "threads": packed["threads"], "runs": args.runs, "bandwidth": bandwidth, "sides": list(side_names),
              **sides}
    if "float" in sides:
        float_ = sides["float"]
        result.update({
            "decode_speedup": packed["decode_tokens_per_s"]["median"] / float_["decode_tokens_per_s"]["median"],
            "prefill_speedup": packed["prefill_tokens_per_s"]["median"] / float_["prefill_tokens_per_s"]["median"],
            "quantized_linear_memory_ratio": float_["weight_bytes"]["quantized_linears"]
            / max(packed["weight_bytes"]["quantized_linears"], 1),
            "weight_memory_ratio": float_["weight_bytes"]["total"] / packed["weight_bytes"]["total"],
            "rss_ratio": float_["rss_bytes"] / max(packed["rss_bytes"], 1),
            "matching_greedy_tokens": sum(a == b for a, b in zip(tokens["packed"], tokens["float"], strict=True)),
        })
    if "llama.cpp" in sides:
        result["vs_llama_cpp"] = compare_with_packed(packed, sides["llama.cpp"], tokens["packed"], tokens["llama.cpp"])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print(result)
    return 0


def _print(r: dict) -> None:
    mib = 2**20
    what = r["source"].get("path") or r["model"]
    p = r["packed"]
    grid = f", RTN 4-bit g{r['source']['group_size']} asym" if "group_size" in r["source"] else ""
    print(f"decode bench: {what}{grid} on {r['device']} ({r['dtype']}, {r['threads']} threads); prompt "
          f"{p['prompt_tokens']} tokens, {p['new_tokens']} new tokens, median of {r['runs']} runs [min, max]")
    print(f"  copy bandwidth {r['bandwidth']['copy_gb_per_s']:.1f} GB/s ({r['bandwidth']['copy_mib']} MiB copy)")
    names = r.get("sides", SIDES)
    width = max(len(name) for name in names)
    print(f"  {'':{width}s} {'prefill tok/s':>24s} {'decode tok/s':>24s} {'bound tok/s':>11s} {'weights MiB':>11s} "
          f"{'linears MiB':>11s} {'RSS MiB':>8s}")
    for name in names:
        s = r[name]
        pre, dec = s["prefill_tokens_per_s"], s["decode_tokens_per_s"]
        print(f"  {name:{width}s} {pre['median']:8.1f} [{pre['min']:6.1f}, {pre['max']:6.1f}] "
              f"{dec['median']:8.2f} [{dec['min']:6.2f}, {dec['max']:6.2f}] {s['decode_bound_tokens_per_s']:11.1f} "
              f"{s['weight_bytes']['total'] / mib:11.1f} {s['weight_bytes']['quantized_linears'] / mib:11.1f} "
              f"{s['rss_bytes'] / mib:8.1f}")
    shares = [f"{name} {r[name]['decode_tokens_per_s']['median'] / r[name]['decode_bound_tokens_per_s']:.0%}"
              for name in names]
    print(f"  decode median as a share of its bandwidth bound: {', '.join(shares)}")
    if "decode_speedup" in r:
        print(f"  packed/float: decode {r['decode_speedup']:.2f}x, prefill {r['prefill_speedup']:.2f}x; float/packed "
              f"memory: quantized linears {r['quantized_linear_memory_ratio']:.2f}x, all weights "
              f"{r['weight_memory_ratio']:.2f}x, RSS {r['rss_ratio']:.2f}x; greedy tokens identical "
              f"{r['matching_greedy_tokens']}/{p['new_tokens']}")
    if "vs_llama_cpp" in r:
        from .decode_llama_cpp import print_llama_cpp_comparison

        print_llama_cpp_comparison(r)

if __name__ == "__main__":
    raise SystemExit("run it as: tritonq bench decode")
