"""Run packed int4 models as a library: load a packed checkpoint, then prefill/decode/generate.

Generation is a chain of small functions as in gpt-fast's ``generate.py`` (``prefill``,
``decode_one_token``, ``generate_tokens``, ``stream_text``) over a Hugging Face model whose quantized
linears are :class:`~tritonq.engine.runtime.qlinear.QuantLinear`. Nothing here knows about HTTP or argparse:
the OpenAI-compatible server is :mod:`tritonq.engine.runtime.openai_server`, the CLI handlers are in
``commands.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ...errors import TritonqError, warn

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedTokenizerBase

# ---------------------------------------------------------------------------------------------------
# loading


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` -> CUDA if present else CPU; dtype ``auto`` -> float16 on CUDA, float32 on the CPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TritonqError(f"device {device} requested but CUDA is not available; pass --device cpu")
    if dtype in (None, "auto"):
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in ("float32", "float16", "bfloat16"):
        raise TritonqError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return dev, getattr(torch, dtype)


def load_packed_model(directory: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                      cpu_int4: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A Hugging Face causal LM from a packed checkpoint (any format ``engine.formats`` reads).

    The skeleton is built with parameters on the meta device; quantized linears become
    ``QuantLinear`` with the packed tensors; only the remaining float tensors are loaded.
    Returns ``(model, tokenizer)`` on ``device`` in eval mode. On the CPU every ``QuantLinear`` that a CPU
    int4 op can take is repacked for it (:func:`~tritonq.engine.runtime.qlinear.use_cpu_int4`: tritonq's own
    where it builds, else PyTorch's); the others keep the reference dequant-matmul, with a warning naming them.
    Input-sharing linears are fused (:func:`~tritonq.engine.runtime.fused.fuse_input_sharing_linears`), and a
    float output head goes onto the fp16 CPU op (:func:`~tritonq.engine.runtime.cpu_head.use_cpu_head`); an int8
    lm_head (``--quantize-head``) runs a CPU int8 op, and an int8 embedding table becomes an ``Int8Embedding``.
    ``cpu_int4=False`` keeps the references everywhere: exact against the stored fp16 scales but slow (for
    checks of the formats).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..activations import apply_activation_quant, saved_act_spec
    from ..formats.registry import float_tensors
    from ..formats.runtime import load_packed_layers
    from .cpu_head import use_cpu_head
    from .fused import fuse_input_sharing_linears
    from .qlinear import Int8Embedding, Int8Linear, parameters_on_meta, swap_embeddings, swap_linears, use_cpu_int4

    path = Path(directory)
    if not path.is_dir():
        raise TritonqError(f"model directory {path} does not exist; give a directory written by 'tritonq pack'")
    dev, dt = resolve_device_dtype(device, dtype)
    layers = load_packed_layers(path)
    if not layers:
        raise TritonqError(f"{path} has a quantization_config but no packed linears")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we load the packed layers ourselves
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    tables = swap_embeddings(model, layers, dt)  # --quantize-head: an int8 embedding table
    swap_linears(model, {n: q for n, q in layers.items() if n not in tables}, dt)
    state = {k: t.to(dt) if t.is_floating_point() else t for k, t in float_tensors(path, set(layers))}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) or getattr(
        config.get_text_config(), "tie_word_embeddings", False
    ):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise TritonqError(
            f"{path} lacks tensors for {len(missing)} parameters (e.g. {missing[0]}); "
            "the checkpoint is incomplete"
        )
    from ..online_hadamard import attach_saved

    attach_saved(model, path)  # the online Hadamard it was quantized with (before the act wrappers, which run it)
    act = saved_act_spec(path)
    if act is not None:  # a W8A8 / W4A8 checkpoint runs on quantized inputs, as it was calibrated
        apply_activation_quant(model, act, sorted(set(layers) - tables))
    model.to(dev).eval()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, Int8Linear) and isinstance(embedding, Int8Embedding):
        embedding.share_table(head)  # an int8 head of a tied model: one table in memory
    if dev.type == "cpu" and cpu_int4 and isinstance(head, Int8Linear):
        head.use_cpu_op()  # tritonq's int8 CPU op (int8 activations, as the int4 one below), else PyTorch's
    if dev.type == "cpu" and cpu_int4:
        refused = use_cpu_int4(model)
        if refused:
            name, why = next(iter(refused.items()))
            warn(f"{len(refused)} packed linears run the slow reference dequant-matmul on the CPU because "
                 f"no CPU int4 op can take their layout (e.g. {name}: {why})")
        fuse_input_sharing_linears(model)  # q/k/v and gate/up: one call each, bit-identical
        use_cpu_head(model)  # a float head at half the bytes; a head the op cannot take stays as it is
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def is_packed_checkpoint(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a directory whose config.json carries a ``quantization_config`` (a packed model)."""
    from ..outputs import read_json_object

    config = Path(name) / "config.json"
    return config.is_file() and "quantization_config" in read_json_object(config, "restore its config.json")


def load_generation_model(name: str, device: str = "auto",
                          dtype: str = "auto") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """What ``tritonq generate`` and ``serve`` run: a packed checkpoint through :func:`load_packed_model`,
    anything else (a float or fake-quantized model: directory, hub id or ``smollm2``) as a float model,
    so that both are timed on the same generation path."""
    if is_packed_checkpoint(name):
        return load_packed_model(name, device, dtype)
    from ..model_io import load_model, load_tokenizer
    from ..online_hadamard import attach_saved

    dev, dt = resolve_device_dtype(device, dtype)
    tokenizer = load_tokenizer(str(name))
    model = load_model(str(name), dt).to(dev).eval()
    if Path(name).is_dir():
        attach_saved(model, name)
    return model, tokenizer


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The float model behind a packed one: every QuantLinear (and a quantized head's ``Int8Linear`` and
    ``Int8Embedding``) replaced by a dense ``nn.Linear`` (``nn.Embedding``).

    Used as the float baseline of ``tritonq bench decode`` (same shapes, same device and dtype).
    """
    import copy

    from .qlinear import Int8Embedding, Int8Linear, QuantLinear

    dense = copy.deepcopy(model)
    dtype = next(dense.parameters()).dtype  # the norms' (the model's) dtype
    head, embedding = dense.get_output_embeddings(), dense.get_input_embeddings()
    if isinstance(embedding, Int8Embedding):
        table = (embedding.qweight.float() * embedding.weight_scale[:, None]).to(dtype)
        dense.set_input_embeddings(nn.Embedding.from_pretrained(table, freeze=True, padding_idx=embedding.padding_idx))
    if isinstance(head, Int8Linear):  # W8A8 layers elsewhere stay: their wrappers run them on quantized inputs
        lin = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=dtype,
                        device=head.qweight.device)
        lin.weight.data = head.dequantized_weight().to(dtype)
        if head.bias is not None:
            lin.bias.data = head.bias.to(dtype)
        dense.set_output_embeddings(lin)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, QuantLinear):
            weight = mod.dequantized_weight()
            lin = nn.Linear(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            lin.weight.data = weight
            if mod.bias is not None:
                lin.bias.data = mod.bias.clone()
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, lin)
    return dense


# ---------------------------------------------------------------------------------------------------
# generation


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str | None = None, messages: list[dict] | None = None
) -> list[int]:
    """Token ids of a plain prompt, or of chat messages through the tokenizer's chat template."""
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return tokenizer(text)["input_ids"]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return tokenizer(prompt)["input_ids"]


def _next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
            return int(logits.numpy().argmax())  # the same first maximum, ~15x faster than torch's CPU argmax
        return int(logits.argmax(dim=-1))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@functools.cache
def _cache_argument(model_class: type) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache`` and warns on the old name; the pin still
    # admits 4.x, whose forward only knows ``past_key_values``.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def prefill(model: nn.Module, ids: list[int], cache: Cache) -> torch.Tensor:
    """Run the whole prompt once, filling ``cache``; the logits of its last position."""
    x = torch.tensor([ids], device=model.device)
    return model(input_ids=x, use_cache=True, **{_cache_argument(type(model)): cache}).logits[0, -1]


def decode_one_token(model: nn.Module, token: int, cache: Cache) -> torch.Tensor:
    """One step of KV-cached decoding; the logits of the new position."""
    x = torch.tensor([[token]], device=model.device)
    return model(input_ids=x, use_cache=True, **{_cache_argument(type(model)): cache}).logits[0, -1]


@contextlib.contextmanager
def decode_threads(model: nn.Module) -> Iterator[None]:
    """While decoding on the CPU: torch's own ops on one thread, tritonq's matmul pool on torch's thread count.

    The matmuls are most of a decode step and their pool never waits for an unscheduled thread; torch's other
    ops (attention, norms) are small at one token and their OpenMP regions wait at a barrier for every
    thread. On a machine whose other core was busy, 2 threads everywhere decoded a 22-layer 2048/5632 Llama
    at 3.0 tokens/s, this split at 6.3-7.0, 1 thread everywhere at 6.0-6.6 (bench/RESULTS.md).
    """
    from ...kernels import cpu_gemv

    threads = torch.get_num_threads()
    if model.device.type != "cpu" or threads <= 1 or cpu_gemv.extension() is None:
        yield
        return
    previous = cpu_gemv.set_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cpu_gemv.set_threads(previous)


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: set[int] | frozenset = frozenset(),
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new tokens (KV-cached); stops after yielding a stop token.

    ``cancelled`` is asked before the prefill and before every decode step: once it returns true the
    generation ends without another forward pass, so a server stops work for a client that left
    within one token. It never changes which tokens are produced.
    """
    from transformers import DynamicCache

    from ...kernels import cpu_gemv
    from .lean_decode import lean_decoder
    from .ragged import RequestCache

    if not ids:
        raise TritonqError("the prompt is empty; give at least one token")
    if cancelled is not None and cancelled():
        return
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    lean = lean_decoder(model)
    with decode_threads(model), cpu_gemv.generating():
        if lean is not None:  # Llama-family on the CPU: tritonq's own decode step (lean_decode.py)
            cache = RequestCache()
            logits = lean.forward([ids], [cache])[0]

            def step(token: int) -> torch.Tensor:
                return lean.step([token], [cache])[0]
        else:
            cache = DynamicCache(config=model.config)
            logits = prefill(model, ids, cache)

            def step(token: int) -> torch.Tensor:
                return decode_one_token(model, token, cache)
        for i in range(max_new_tokens):
            tok = _next_token(logits, temperature, top_p, generator)
            yield tok
            if tok in stop_ids or i == max_new_tokens - 1:
                return
            if cancelled is not None and cancelled():
                return
            logits = step(tok)


@dataclass
class Completion:
    """Incremental text of one request; ``finish_reason`` is set once generation ends.

    ``finish_reason`` is ``"stop"`` (end-of-sequence token or stop string), ``"length"`` (``max_new_tokens``
    reached) or ``"cancelled"`` (the caller's ``cancelled`` check ended it early).
    """

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None


class TextDeltas:
    """The text of a growing token list, handed out in safe pieces: what :func:`stream_text` and the batched
    server (:mod:`~tritonq.engine.runtime.batching`) both stream.

    A piece never ends inside a UTF-8 sequence, and the last ``len(s) - 1`` characters (for the longest stop
    string ``s``) are held back until they can no longer begin a stop string. Tokens, text and (on a stop
    string) ``finish_reason`` go to ``state``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None, state: Completion) -> None:
        self.tokenizer, self.state = tokenizer, state
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.sent = 0  # characters handed out so far
        self.stopped = False  # a stop string ended the text

    def add(self, token: int) -> str:
        """Append ``token``; the text that became safe to send (often empty)."""
        state = self.state
        state.tokens.append(token)
        text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        hit = min((p for p in (text.find(s) for s in self.stop) if p >= 0), default=-1)
        if hit >= 0:
            state.text = text[:hit]
            state.finish_reason = "stop"
            self.stopped = True
            return text[self.sent:hit] if hit > self.sent else ""
        safe = max(self.sent, len(text) - self.hold)
        state.text = text
        piece = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece

    def flush(self) -> str:
        """At the end of a generation not ended by a stop string: the rest of the text."""
        self.state.text = self.tokenizer.decode(self.state.tokens, skip_special_tokens=True)
        piece = self.state.text[self.sent:]
        self.sent = len(self.state.text)
        return piece


def stream_text(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    state: Completion | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Yield text deltas (:class:`TextDeltas`): no partial UTF-8, nothing that could begin a stop string.

    ``cancelled`` is checked once per token (see :func:`generate_tokens`); a cancelled generation ends with
    ``finish_reason`` ``"cancelled"`` and the text made so far.
    """
    state = state if state is not None else Completion()
    state.prompt_tokens = len(ids)
    deltas = TextDeltas(tokenizer, stop, state)
    stop_ids = stop_token_ids(model, tokenizer)
    state.finish_reason = "length"
    for tok in generate_tokens(
        model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop_ids,
        cancelled=cancelled,
    ):
        if tok in stop_ids:
            state.finish_reason = "stop"
            break
        piece = deltas.add(tok)
        if piece:
            yield piece
        if deltas.stopped:
            return
    if state.finish_reason == "length" and len(state.tokens) < max_new_tokens and cancelled is not None \
            and cancelled():
        state.finish_reason = "cancelled"
    piece = deltas.flush()
    if piece:
        yield piece


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of ``text`` as one user turn when the tokenizer has a chat template, else as a plain prompt."""
    if has_chat_template(tokenizer):
        return prompt_ids(tokenizer, messages=[{"role": "user", "content": text}])
    return prompt_ids(tokenizer, text)


def synchronize(model: nn.Module) -> None:
    """Wait for the model's device, so that wall-clock timings include queued CUDA work."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
