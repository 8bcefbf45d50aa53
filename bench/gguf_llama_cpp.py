"""GGUF files in llama.cpp itself (llama-cpp-python): perplexity on tritonq's windows, llama.cpp's own quantizer.

``python -m tritonq.bench.gguf_llama_cpp ppl FILE.gguf [...]`` scores each file on exactly the windows
``tritonq eval`` scores (the tokenizer of ``--model``, ``engine.data.tokenize`` / ``evaluation_windows``:
non-overlapping ``--seqlen`` windows, mean cross-entropy of the ``seqlen - 1`` shifted positions per
window, PPL = exp(mean over windows)); the token ids are fed to llama.cpp, so both sides see the same
tokens. It also reports how often llama.cpp's own tokenizer agrees with the HF one on the text.

``python -m tritonq.bench.gguf_llama_cpp quantize FLOAT.gguf OUT.gguf --type Q4_1|Q4_K_M [--imatrix]``
runs llama.cpp's quantizer (``llama_model_quantize``) on a float GGUF, optionally with an importance
matrix. llama-cpp-python has no imatrix computation, so ``--imatrix`` computes one here the way
``llama-imatrix`` defines it - per input column of every linear, the mean of the squared input activations
over the calibration tokens - from the float HF model on tritonq's calibration windows (``--calib``,
``--nsamples``, ``--seqlen``, ``--seed``: the same windows GPTQ sees), and passes it through the
quantizer's ``imatrix`` parameter.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import TritonqError

SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.txt"  # ../shared/data
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # enum llama_ftype


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise TritonqError("this bench needs llama-cpp-python: pip install llama-cpp-python") from None
    return llama_cpp


def windows_for(model: str, data: str, seqlen: int, max_windows: int | None):
    """The token windows and tokenizer ``tritonq eval`` uses (same functions, same protocol)."""
    from ..engine.data import evaluation_windows, load_corpus, tokenize
    from ..engine.model_io import load_tokenizer

    tok = load_tokenizer(model)
    corpus = load_corpus(data, split="test")
    return evaluation_windows(tokenize(tok, corpus.text), seqlen, max_windows, corpus.source), tok, corpus.text


def llama_cpp_perplexity(path: str, windows: torch.Tensor, threads: int = 2) -> dict:
    """Perplexity of a GGUF file in llama.cpp over ``windows`` [n, seqlen] (all logits of each window)."""
    llama_cpp = _llama_cpp()
    n, seqlen = windows.shape
    llm = llama_cpp.Llama(path, n_ctx=seqlen, n_batch=seqlen, n_ubatch=512, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    nlls = []
    t0 = time.perf_counter()
    for ids in windows.tolist():
        llm.reset()
        llm.eval(ids)
        scores = llm.scores  # [n_ctx, vocab] float32, row i = logits after token i
        total = 0.0
        for start in range(0, seqlen - 1, 256):  # float64 log-softmax a slice at a time
            stop = min(start + 256, seqlen - 1)
            z = scores[start:stop].astype(np.float64)
            zmax = z.max(axis=1, keepdims=True)
            logz = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
            target = np.asarray(ids[start + 1:stop + 1])
            total += float((logz - z[np.arange(stop - start), target]).sum())
        nlls.append(total / (seqlen - 1))
    seconds = time.perf_counter() - t0
    del llm
    return {"file": path, "perplexity": math.exp(sum(nlls) / n), "windows": n, "seqlen": seqlen,
            "window_nll": nlls, "seconds": round(seconds, 1), "bytes": Path(path).stat().st_size}


def tokenizer_agreement(path: str, tokenizer, text: str, chars: int = 200_000) -> dict:
    """Whether llama.cpp's tokenizer gives the HF ids on the first ``chars`` characters of the text."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    piece = text[:chars]
    ours = tokenizer(piece, add_special_tokens=False)["input_ids"]
    theirs = llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False)
    same = sum(a == b for a, b in zip(ours, theirs, strict=False))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    return {"hf_tokens": len(ours), "llama_cpp_tokens": len(theirs), "identical": ours == theirs,
            "first_difference": first, "same_prefix_positions": same}


def importance_matrix(model_name: str, calib: str, nsamples: int, seqlen: int, seed: int) -> dict[str, np.ndarray]:
    """llama-imatrix's statistic per linear, keyed by GGUF tensor name: mean over tokens of x_k^2 per column k."""
    import gguf

    from ..engine.data import calibration_windows, load_corpus, tokenize
    from ..engine.model_io import load_model, load_tokenizer

    tok = load_tokenizer(model_name)
    corpus = load_corpus(calib, "text", split="train")
    windows = calibration_windows(tokenize(tok, corpus.text), nsamples, seqlen, seed, corpus.source)
    model = load_model(model_name, torch.float32)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            gname = name_map.get_name(f"{name}.weight", try_suffixes=(".weight",))

            def hook(_m, args, _out, gname=gname):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sums[gname] = sums.get(gname, 0) + (x * x).sum(dim=0)
                counts[gname] = counts.get(gname, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {g: (s / counts[g]).float().numpy() for g, s in sums.items()}


def llama_cpp_quantize(src: str, dst: str, qtype: str, imatrix: dict[str, np.ndarray] | None = None,
                       threads: int = 2) -> dict:
    """llama.cpp's own quantizer on a float GGUF (its default tensor-type choices for ``qtype``)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the list ends at a null name
        params.imatrix = entries
        keep.append(entries)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise TritonqError(f"llama_model_quantize returned {rc} for {src} -> {dst} ({qtype})")
    return {"file": dst, "type": qtype, "imatrix": imatrix is not None,
            "seconds": round(time.perf_counter() - t0, 1), "bytes": Path(dst).stat().st_size}


def float_gguf(model: str, dst: str, out_type: str = "f32") -> dict:
    """``save_float_gguf`` of a directory, or of a model name saved first as a float HF checkpoint."""
    import tempfile

    from ..engine.formats.gguf import save_float_gguf
    from ..engine.model_io import load_model, load_tokenizer

    if Path(model).is_dir():
        save_float_gguf(model, dst, out_type, overwrite=True)
    else:
        with tempfile.TemporaryDirectory(prefix="tritonq-float-") as tmp:
            load_model(model, torch.float32).save_pretrained(tmp)
            load_tokenizer(model).save_pretrained(tmp)
            save_float_gguf(tmp, dst, out_type, overwrite=True, name=f"{model} {out_type}")
    return {"file": dst, "type": out_type, "bytes": Path(dst).stat().st_size}


def tensor_types(path: str) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds (what llama.cpp's quantizer chose)."""
    import gguf

    out: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.gguf_llama_cpp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("ppl")
    e.add_argument("files", nargs="+")
    e.add_argument("--model", default="smollm2", help="whose tokenizer makes the windows")
    e.add_argument("--data", default=str(SHARED_WIKITEXT), help="evaluation text (file or hub name)")
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--tokenizer-check", action="store_true", help="also compare llama.cpp's tokenizer with HF's")
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--type", required=True, choices=list(FTYPES))
    q.add_argument("--imatrix", action="store_true")
    q.add_argument("--model", default="smollm2")
    q.add_argument("--calib", default="pydoc")
    q.add_argument("--nsamples", type=int, default=32)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("float", help="a float GGUF (tritonq's writer) of a model name or a checkpoint directory")
    f.add_argument("model", help="smollm2, a HF checkpoint directory, or a tritonq fake-quantized output")
    f.add_argument("dst")
    f.add_argument("--type", default="f32", choices=["f32", "f16", "bf16"])
    args = p.parse_args(argv)
    if args.cmd == "float":
        print(json.dumps(float_gguf(args.model, args.dst, args.type)), flush=True)
    elif args.cmd == "ppl":
        windows, tok, text = windows_for(args.model, args.data, args.seqlen, args.windows)
        for f in args.files:
            res = llama_cpp_perplexity(f, windows, args.threads)
            res["types"] = tensor_types(f)
            if args.tokenizer_check:
                res["tokenizer"] = tokenizer_agreement(f, tok, text)
            print(json.dumps(res), flush=True)
    else:
        imatrix = None
        if args.imatrix:
            imatrix = importance_matrix(args.model, args.calib, args.nsamples, args.seqlen, args.seed)
        res = llama_cpp_quantize(args.src, args.dst, args.type, imatrix, args.threads)
        res["types"] = tensor_types(args.dst)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
