"""The llama.cpp side of ``tritonq bench decode --sides packed,llama.cpp``: the packed side's very weights as a
Q4_1 GGUF, decoded by llama.cpp (llama-cpp-python) from the same prompt ids.

The random-weight Llama of :mod:`tritonq.bench.decode` is rebuilt from its config and seed, RTN-quantized on
the same grid (4-bit asymmetric, group 32: one ggml Q4_1 block per group), and written by tritonq's own GGUF
writer (:class:`~tritonq.engine.formats.gguf.GgufFormat`) from :class:`RandomLlamaCheckpoint`, the
:class:`~tritonq.engine.formats.checkpoint.Checkpoint` that also feeds the compressed-tensors writer, so both
files hold one set of records. Float matrices (embeddings, lm_head) are written in the packed side's dtype (F32
for float32), so both sides read the same head bytes. The file is checked against the records
(:func:`check_gguf_weights`): Q4_1 stores ``d = s`` exactly and ``m = -s z`` rounded to fp16, so its weights
differ from ``s (q - z)`` by at most half an fp16 ulp of ``m`` per block; float tensors are compared bit for bit.

llama.cpp decodes in a fresh process (:func:`run_llama_cpp_side`) as the torch sides do: ``n_threads`` = torch's
threads, one untimed warm-up, then ``runs`` timed runs of a prefill of the prompt ids and ``new_tokens`` greedy
tokens (argmax of the logits, KV-cached; end-of-sequence ignored: we pick each token ourselves). Its weight bytes
are the GGUF's tensor sizes, counted as the packed side counts its own (every tensor but the input embedding
table, of which a token reads one row). llama.cpp maps the file (its default), so its RSS includes the mapped
pages it touched.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from ..engine.formats.checkpoint import Checkpoint, hf_state_dict
from ..engine.formats.gguf_vocab import BLOCK
from ..engine.formats.records import QuantizedWeight
from ..engine.grid import GridSpec, codes_of
from ..errors import TritonqError
from .decode_measure import rate_summary, rss_bytes

FLOAT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def llama_cpp_lib():
    """The ``llama_cpp`` module, or the one-line error that says how to install it (an optional bench extra)."""
    try:
        import llama_cpp
    except ImportError:
        raise TritonqError("the llama.cpp side of 'bench decode' needs llama-cpp-python: "
                           "pip install llama-cpp-python") from None
    return llama_cpp


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """The linears inside the decoder blocks: what the random Llama quantizes (never the lm_head)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def write_byte_level_tokenizer(directory: Path) -> None:
    """A minimal GPT-2 style byte-level BPE tokenizer (the 256 byte tokens and one merge): the GGUF vocabulary
    llama.cpp needs to load a model that has no tokenizer. The benchmark feeds token ids, never text; ids
    beyond the tokenizer are written as unused padding tokens, as for any embedding wider than its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["\u0120t"] = len(vocab)  # " t": GGUF's gpt2 vocabulary needs at least one merge
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(directory))


class RandomLlamaCheckpoint(Checkpoint):
    """The random Llama of ``bench decode`` (same config and seed, so the same float weights as its sides) with
    RTN records of its block linears on ``spec``, as writers read a quantized model. Records are rebuilt one
    layer at a time when a writer asks; only the grids' scales and zeros are kept."""

    def __init__(self, config, spec: GridSpec, dtype: torch.dtype, seed: int = 0, label: str = "random Llama"):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)  # as bench.decode.random_llama draws them
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        names = block_linear_names(model)
        self._state = hf_state_dict(model)
        self._dtype = dtype
        self._params: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.label = label
        self.grids = {name: spec for name in sorted(names)}
        self.config = {**config.to_dict(), "dtype": str(dtype).removeprefix("torch.")}
        self.meta = {"model": label, "method": "rtn", "bits": spec.bits, "group_size": spec.group_size,
                     "sym": spec.sym, "act_order": False, "layers": sorted(names)}

    def float_keys(self) -> list[str]:
        return list(self._state)

    def tensor(self, key: str) -> Tensor:
        module = key.removesuffix(".weight")
        if module in self.grids and key.endswith(".weight"):  # the fake-quantized weight, as a fake output holds
            return self.record(module).dequantize().to(self._dtype)
        return self._state[key].to(self._dtype)

    def params(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        if name not in self._params:
            self.record(name)
        return self._params[name]

    def record(self, name: str) -> QuantizedWeight:
        from ..engine.methods.rtn import round_to_nearest

        spec = self.grids[name]
        res = round_to_nearest(self._state[f"{name}.weight"], spec, name)
        self._params[name] = (res.scale, res.zero, res.g_idx)
        return QuantizedWeight(codes_of(res.weight, res.scale, res.zero, res.g_idx, spec.maxq), res.scale,
                               res.zero, res.g_idx, None)

    def write_side_files(self, out: Path) -> None:
        write_byte_level_tokenizer(out)

    def vocabulary_dir(self, scratch: Path) -> Path:
        write_byte_level_tokenizer(scratch)
        (scratch / "config.json").write_text(self.config_text())
        return scratch


# ---------------------------------------------------------------------------------------------------
# the file and its check


def gguf_weight_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of a GGUF's tensors, of its ggml-block tensors, and those read per token (all but the input
    embedding table, unless it is also the output head): :func:`tritonq.bench.decode.weight_bytes`' rule."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    total = sum(int(t.n_bytes) for t in tensors)
    quantized = sum(int(t.n_bytes) for t in tensors if t.tensor_type.name in QUANT_TYPES)
    names = {t.name: int(t.n_bytes) for t in tensors}
    tied = "output.weight" not in names
    read = total - (0 if tied else names.get("token_embd.weight", 0))
    return {"total": total, "quantized_linears": quantized, "read_per_token": read}


def check_gguf_weights(path: str | Path, ckpt: Checkpoint) -> dict:
    """Compare every tensor of a tritonq GGUF with the checkpoint it was written from.

    Block tensors: the ``gguf`` package's dequantization (rows put back in HF order) against ``s (q - z)`` of
    the record, in float64; each block may differ by half an fp16 ulp of ``m = -s z`` (Q4_1 stores ``m`` in
    fp16), plus float32 rounding of ``d q + m``. Float tensors must be equal bit for bit after the cast to the
    file's type. Returns counts (``exact``, ``within_m_rounding``, ``float_exact``) and the worst ratio of a
    difference to its bound; raises when a tensor is outside its bound.
    """
    import gguf
    from gguf.quants import dequantize

    from ..engine.formats.gguf import _gguf_name, _row_order, _tensor_name_map

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    name_map = _tensor_name_map(ckpt.config, gguf)
    out = {"exact": 0, "within_m_rounding": 0, "float_exact": 0, "worst_ratio_to_bound": 0.0}
    for key in ckpt.float_keys():
        t = by_name.get(_gguf_name(name_map, key))
        if t is None:
            continue  # a tied lm_head
        data = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(t.data.shape[0], -1)
        order = _row_order(key, ckpt.config)
        if order is not None:  # new row i holds old row order[i]
            data = data[torch.argsort(order)]
        module = key.removesuffix(".weight")
        if module not in ckpt.grids:
            want = ckpt.tensor(key)
            if t.tensor_type == gguf.GGMLQuantizationType.F16:  # the head and embeddings, as the packed side's head
                want = want.half().to(want.dtype)
            if not torch.equal(data.to(want.dtype).reshape(want.shape), want):
                raise TritonqError(f"{key}: the GGUF tensor is not the checkpoint's float tensor")
            out["float_exact"] += 1
            continue
        q = ckpt.record(module)
        want = q.dequantize().double()
        got = data.double()
        m = (-q.scale.double() * q.zero.double()).repeat_interleave(BLOCK, dim=1)
        bound = (m.abs() * 2.0**-11).clamp_min(2.0**-25) + 2.0**-23 * torch.maximum(want.abs(), m.abs())
        diff = (got - want).abs()
        ratio = float((diff / bound).max())
        out["worst_ratio_to_bound"] = max(out["worst_ratio_to_bound"], ratio)
        if ratio > 1:
            raise TritonqError(f"{key}: GGUF weights differ from the record by more than the fp16 rounding of m")
        out["exact" if bool((diff == 0).all()) else "within_m_rounding"] += 1
    return out


def write_random_gguf(config, source: dict, dtype: str, out_dir: str, check: bool = True) -> dict:
    """Write the GGUF of the random Llama's RTN weights (``config``, the source's grid and seed) into
    ``out_dir``; its path, weight bytes and the check of its weights against the records."""
    from ..engine.formats.gguf import GGUF_FILE, GgufFormat
    from ..engine.runtime.serve import resolve_device_dtype

    _, dt = resolve_device_dtype("cpu", dtype)
    spec = GridSpec(bits=4, group_size=source["group_size"], sym=False)
    ckpt = RandomLlamaCheckpoint(config, spec, dt, source.get("seed", 0))
    t0 = time.perf_counter()
    # float matrices (embeddings, lm_head) in F16: the packed side holds its head in fp16 on the CPU
    # (engine/runtime/cpu_head.py), so both sides read the same head bytes; llama.cpp's converter writes F16 too
    GgufFormat().write(ckpt, Path(out_dir), float_type="f16" if dt == torch.float32 else FLOAT_TYPES[dt])
    path = Path(out_dir) / GGUF_FILE
    result = {"path": str(path), "write_s": time.perf_counter() - t0, "weight_bytes": gguf_weight_bytes(path)}
    if check:
        t0 = time.perf_counter()
        result["weights_check"] = {**check_gguf_weights(path, ckpt), "seconds": time.perf_counter() - t0}
    return result


# ---------------------------------------------------------------------------------------------------
# the side beside the others


def group_size_for(args, sides: tuple[str, ...], default: int) -> int:
    """``--group-size`` of the random Llama: ``default`` (64), or 32 with a llama.cpp side (one ggml block a
    group, the only grid Q4_1 holds)."""
    given = getattr(args, "group_size", None)
    if "llama.cpp" not in sides:
        return default if given is None else int(given)
    if given is not None and int(given) != BLOCK:
        raise TritonqError(f"the llama.cpp side runs Q4_1 blocks of {BLOCK} weights; pass --group-size {BLOCK} "
                           "(the default with a llama.cpp side) or drop llama.cpp from --sides")
    return BLOCK


def check_llama_cpp_side(source: dict, args) -> None:
    """Everything the llama.cpp side needs, refused before any side is built."""
    from ..engine.formats.gguf_vocab import gguf_lib
    from ..engine.runtime.serve import resolve_device_dtype

    if source["kind"] != "random":
        raise TritonqError("the llama.cpp side runs on --random-llama or --config; for a checkpoint, write its GGUF "
                           "with 'tritonq pack --format gguf' and drop llama.cpp from --sides")
    if resolve_device_dtype(args.device, args.dtype)[0].type != "cpu":
        raise TritonqError("llama.cpp runs on the CPU here; pass --device cpu with a llama.cpp side")
    llama_cpp_lib()
    gguf_lib()


def compare_with_packed(packed: dict, other: dict, ours: list[int], theirs: list[int]) -> dict:
    """Packed over another side: tokens/s ratios, bytes, and how many greedy tokens agree (in all, and before
    the first difference: after it the two continue from different contexts)."""
    same_prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    return {"decode_speedup": packed["decode_tokens_per_s"]["median"] / other["decode_tokens_per_s"]["median"],
            "prefill_speedup": packed["prefill_tokens_per_s"]["median"] / other["prefill_tokens_per_s"]["median"],
            "read_per_token_ratio": other["weight_bytes"]["read_per_token"] / packed["weight_bytes"]["read_per_token"],
            "matching_greedy_tokens": sum(a == b for a, b in zip(ours, theirs, strict=True)),
            "identical_prefix_tokens": same_prefix}


def print_llama_cpp_comparison(r: dict) -> None:
    """The lines ``bench decode`` prints about its llama.cpp side."""
    v, g = r["vs_llama_cpp"], r["llama.cpp"]["gguf"]
    print(f"  packed/llama.cpp (llama-cpp-python {r['llama.cpp']['llama_cpp_version']}): decode "
          f"{v['decode_speedup']:.2f}x, prefill {v['prefill_speedup']:.2f}x; llama.cpp reads "
          f"{v['read_per_token_ratio']:.2f}x the packed side's bytes per token; greedy tokens identical "
          f"{v['matching_greedy_tokens']}/{r['packed']['new_tokens']} (the first {v['identical_prefix_tokens']} "
          "in a row)")
    if "weights_check" in g:
        c = g["weights_check"]
        print(f"  GGUF against the packed records: {c['exact']} block tensors exact, {c['within_m_rounding']} "
              f"within the fp16 rounding of Q4_1's m (worst {c['worst_ratio_to_bound']:.3f} of that bound), "
              f"{c['float_exact']} float tensors bit-exact ({c['seconds']:.0f} s check)")


# ---------------------------------------------------------------------------------------------------
# decoding


def run_llama_cpp_side(gguf_path: str, ids: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    """Time llama.cpp on ``gguf_path`` (in this process: :mod:`tritonq.bench.decode` calls it in a fresh one)."""
    import numpy as np

    llama_cpp = llama_cpp_lib()
    before = rss_bytes()
    llm = llama_cpp.Llama(gguf_path, n_ctx=len(ids) + new_tokens + 8, n_batch=max(len(ids), 8),
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    vocab = llm.n_vocab()

    def next_token() -> int:  # argmax of the last position's logits (``Llama.scores`` holds them only with
        # logits_all, which would make llama.cpp compute the head for every prompt position)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    def once(n: int) -> tuple[float, float, list[int]]:
        llm.reset()  # the next eval overwrites the KV cache from position 0
        t0 = time.perf_counter()
        llm.eval(ids)
        out = [next_token()]
        t1 = time.perf_counter()
        while len(out) < n:
            llm.eval(out[-1:])
            out.append(next_token())
        return t1 - t0, time.perf_counter() - t1, out

    once(min(4, new_tokens))  # warm-up, as the torch sides
    prefill, decode, tokens = [], [], []
    for _ in range(runs):
        p, d, tokens = once(new_tokens)
        prefill.append(len(ids) / p)
        decode.append((len(tokens) - 1) / d if d > 0 else float("inf"))
    after = rss_bytes()
    return {"prefill_tokens_per_s": rate_summary(prefill), "decode_tokens_per_s": rate_summary(decode),
            "tokens": tokens,
            "prompt_tokens": len(ids), "new_tokens": new_tokens, "threads": threads, "device": "cpu",
            "dtype": "Q4_1", "llama_cpp_version": llama_cpp.__version__,
            "rss_bytes": after["rss"] - before["rss"], "peak_rss_bytes": after["peak_rss"] - before["rss"]}
