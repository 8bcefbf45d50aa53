"""The memory a quantize run needs, from the model's config alone: what the run prints before it starts.

The run streams the model (one block's weights at a time), so its peak is the largest of three phases:

* **capture**: the token embedding (``vocab x hidden``) on the device and the block-0 inputs it makes;
* **block**: one block's parameters in the compute dtype (plus, while they load, a copy in the checkpoint's
  dtype), the calibration cache on the store (``pipeline.py``'s docstring: the chunks' block inputs, the
  replayed sub-module outputs, during a tail group's stage that group's inputs, and in the last stage the next
  block's inputs), and on the device either one chunk's intermediates (while the chunks run) or the method's
  state for the group being solved (after they ran). The peak of a block is the worst stage;
* **write**: the output writer's one tensor and its 64 MiB copy buffer.

The interpreter with torch and transformers imported is a measured constant (``INTERPRETER_BYTES``). A disk
store (``--offload-activations disk DIR``) counts no host bytes: its pages are file-backed, so the kernel writes
them back and drops them under pressure (they do show in the RSS while they are warm).

Each method's state follows its code: GPTQ keeps a ``K x K`` fp32 Hessian while the chunks run; the solve takes
it over and holds at most four ``K^2`` (the permuted and reversed working copy, then the Cholesky factor, the
identity and the inverse factor: ``hessian.inverse_cholesky_reversed``; 3.1 ``K^2`` above the input measured at
K = 5632, tests and bench/RESULTS.md) beside the group's rows in fp32; AWQ caches the
parent modules' calls on ``--search-tokens`` tokens and scores candidates on a bf16 copy of the module; BoA is
GPTQ plus its query/key moments and rotary matrices; RTN holds one fp32 copy of a group's rows. Methods not
modelled here are counted as GPTQ (an upper bound for every method built on the shared Hessian core).

``bench/memory_check.py`` checks the per-block part against the measured RSS; ``bench/memory_table.py`` writes
the README's table from :func:`estimate_memory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TritonqError
from .methods.boa import VALUE_CHUNK as BOA_VALUE_CHUNK

GIB = 2**30
MIB = 2**20
INTERPRETER_BYTES = 450 * MIB  # VmRSS after importing torch 2.13 (CPU) + transformers 5.25 + tritonq, measured here
CUDA_CONTEXT_BYTES = 512 * MIB  # the CUDA context and kernels, on the device and in host RSS alike (typical)
WRITER_BUFFER_BYTES = 64 * MIB  # the output writer's copy buffer (formats/store.py)
AWQ_SEARCH_TOKENS = 4096  # AWQ's default --search-tokens
STORES = ("device", "cpu", "disk")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set the memory of a decoder-only model (Llama/Qwen/Mistral field names, or OPT's)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool = True  # gate/up/down (Llama family) or fc1/fc2 (OPT)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        model_type = get("model_type", "llama")
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        intermediate = get("intermediate_size") or get("ffn_dim")  # OPT names the MLP width ffn_dim
        if not hidden or not heads or not intermediate or not get("num_hidden_layers") or not get("vocab_size"):
            raise TritonqError("the model config lacks hidden_size, num_attention_heads, intermediate_size, "
                               "num_hidden_layers or vocab_size; give a config.json of a decoder-only model")
        return cls(layers=get("num_hidden_layers"), hidden=hidden, intermediate=intermediate, heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or hidden // heads,
                   vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)),
                   gated_mlp=model_type != "opt")

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    def groups(self) -> list[tuple[str, int, int]]:
        """(name, input width K, stacked output rows N) of each linear group, in the pipeline's order."""
        h, i, d = self.hidden, self.intermediate, self.head_dim
        qkv = ("q/k/v", h, (self.heads + 2 * self.kv_heads) * d)
        o = ("o_proj", self.attention_width, h)
        if self.gated_mlp:
            return [qkv, o, ("gate/up", h, 2 * i), ("down_proj", i, h)]
        return [qkv, o, ("fc1", h, i), ("fc2", i, h)]

    def block_params(self) -> int:
        return sum(k * n for _, k, n in self.groups()) + 2 * self.hidden  # linears and the two norms

    def cache_widths(self) -> list[tuple[int, ...]]:
        """Per stage (one per group, then the last), the per-token widths of what the store holds: the block
        inputs, replays of finished sub-modules, the tail group's inputs, and at the end the next inputs."""
        h, a, i = self.hidden, self.attention_width, self.intermediate
        # Llama: the MLP is a sub-module with down_proj its tail; OPT's fc1 output is recorded and replayed
        mlp_replay = h if self.gated_mlp else i
        return [(h,), (h, a), (h, h), (h, h, i), (h, h, mlp_replay, h)]


@dataclass
class MemoryEstimate:
    """Bytes by named component at the host's and the device's peak (``device_parts`` empty on the CPU)."""

    host_parts: dict[str, int]
    device_parts: dict[str, int]
    host_phase: str
    device_phase: str
    settings: dict[str, Any]
    advice: list[str] = field(default_factory=list)
    block_rise_bytes: int = 0  # the block phase above its weights and inputs (what bench/memory_check measures)
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (host bytes, device bytes)

    @property
    def peak_host(self) -> int:
        return sum(self.host_parts.values())

    @property
    def peak_device(self) -> int:
        return sum(self.device_parts.values())

    @property
    def components(self) -> dict[str, int]:
        """Every component at the peak, host and device parts together (the device's prefixed ``device ``)."""
        return {**self.host_parts, **{f"device {k}": v for k, v in self.device_parts.items()}}

    def block_rise(self) -> int:
        return self.block_rise_bytes

    def to_json(self) -> dict:
        return {"peak_host_bytes": self.peak_host, "peak_device_bytes": self.peak_device,
                "host_phase": self.host_phase, "device_phase": self.device_phase,
                "host_parts": dict(self.host_parts), "device_parts": dict(self.device_parts),
                "settings": dict(self.settings), "formula": "engine/memory.py"}

    def describe(self) -> str:
        """2-4 lines for the user: the peaks, their largest parts, and the flag that lowers them."""
        lines = []
        for where, parts, phase in (("device", self.device_parts, self.device_phase),
                                    ("host RSS", self.host_parts, self.host_phase)):
            if not parts:
                continue
            top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"memory estimate, peak {where}: {_gib(sum(parts.values()))} during {phase} ("
                         + ", ".join(f"{name} {_gib(b)}" for name, b in top) + ")")
        if self.advice:
            lines.append("to lower it: " + "; ".join(self.advice))
        return "\n".join(lines)


AUTOROUND_BATCH = 8  # AutoRound's windows per step (its default; engine/methods/autoround.py)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _dtype_bytes(dtype: torch.dtype | str) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise TritonqError(f"no memory model for dtype {name!r}; use float32, float16 or bfloat16")
    return DTYPE_BYTES[name]


def _intermediates(m: ModelShape, windows: int, seqlen: int, c: int) -> int:
    """One chunk's live activations in a block: the larger of attention and the MLP. Attention runs through
    sdpa with ``is_causal`` (no mask is made for unpadded windows), so no ``T x T`` scores are held; measured
    on the CPU (bench/RESULTS.md, "Memory you need")."""
    tokens = windows * seqlen
    qkv = (m.heads + 2 * m.kv_heads) * m.head_dim
    # the input and the residual; q/k/v and their rotated copies; the output and its transposed copy
    attention = tokens * c * (2 * m.hidden + 2 * qkv + 2 * m.attention_width)
    mlp = tokens * c * (2 * m.hidden + 3 * m.intermediate)  # act(gate), up and their product; input and output
    return max(attention, mlp)


def _method_state(method: str, m: ModelShape, k: int, n: int, group: str, *, c: int, seqlen: int, tokens: int,
                  search_tokens: int, group_size: int, windows: int, block_v: bool = False) -> tuple[int, int]:
    """(bytes while the chunks run, bytes while solving) of ``method`` for one group ``[N, K]``."""
    fp32 = 4
    rounding = 3 * n * k * fp32  # per linear: its rounded copy, the gathered scales and zeros, temporaries
    hessian = k * k * fp32
    # at the triangular solve: the reversed working copy, L, I and L^-1 (4 K^2; the accumulator's H was handed
    # over and freed); or the blocked sweep: U and four copies of the rows
    gptq_solve = max(4 * hessian + n * k * fp32, hessian + 4 * n * k * fp32)
    if method == "rtn":
        return 0, rounding
    if method == "smoothquant":  # per-channel statistics, then rounding
        return 0, rounding
    if method in ("boa", "aboa"):
        if group == "q/k/v":
            moments = (m.heads + m.kv_heads) * m.head_dim ** 2 * fp32
            rotary = 2 * seqlen * m.head_dim ** 2 * fp32  # R_t [T, D, D] and the rotated basis it is made from
            if not block_v:
                return hessian + moments, gptq_solve + moments + rotary
            # --block-v: a K x K Hessian per KV head, held from the chunks to the solve; while a chunk runs, one
            # chunk of query positions at a time: the repeated keys, the scores / masked scores / probabilities
            # [windows, heads, chunk, T] and the attention-weighted inputs [windows, heads, chunk, K]
            value = m.kv_heads * k * k * fp32
            rows = min(BOA_VALUE_CHUNK, seqlen)  # BoA's query positions per chunk
            transient = windows * m.heads * (seqlen * m.head_dim + 3 * rows * seqlen + rows * k) * fp32
            return hessian + moments + value + transient, gptq_solve + moments + rotary + value
        return hessian, gptq_solve
    if method in ("awq", "dh-awq", "awq+gptq"):
        sample = min(search_tokens, tokens) if search_tokens > 0 else tokens
        observe, scoring = _awq_state(m, k, n, group, c=c, sample=sample, group_size=group_size)
        if method == "awq+gptq":  # the scales, then GPTQ on the Hessian instead of clip and rounding
            return observe + hessian, observe + max(scoring, gptq_solve)
        return observe, observe + max(scoring, rounding)
    return hessian, gptq_solve  # gptq and the other methods on the shared Hessian core (an upper bound)


def _awq_state(m: ModelShape, k: int, n: int, group: str, *, c: int, sample: int,
               group_size: int) -> tuple[int, int]:
    """AWQ's (observed, scoring) bytes: the clip's fp64 Gram blocks, the parent's calls on the sample tokens
    (or a single linear's sampled inputs), and while scoring a bf16 copy of the module, fp32 targets, a candidate."""
    g = min(group_size, k) if group_size > 0 else k
    gram = k * g * 8
    s = sample
    cached = 0
    if group in ("q/k/v", "gate/up", "fc1"):  # parent calls: hidden states, their bf16 copy, fp32 targets/outputs
        inner = m.intermediate if group == "gate/up" else (m.heads + 2 * m.kv_heads) * m.head_dim
        cached = s * m.hidden * (c + 2 + 4 + 4) + s * inner * 2 * 3  # and the module's intermediates in bf16
    elif group in ("down_proj", "fc2"):  # up -> down: the sampled inputs of down_proj
        cached = s * k * c * 2
    scoring = n * k * (4 + 2) + 2 * n * k * 4  # fp32 originals, the bf16 module copy, a candidate and its rounding
    return gram + cached, scoring


def estimate_memory(config: Any, method_name: str, *, nsamples: int, seqlen: int, calib_batch: int,
                    compute_dtype: torch.dtype | str, checkpoint_dtype: torch.dtype | str, store: str = "device",
                    device_type: str = "cpu", search_tokens: int = AWQ_SEARCH_TOKENS,
                    group_size: int = 128, streamed: bool = True, block_v: bool = False) -> MemoryEstimate:
    """The peak host and device bytes of a streamed quantize run, by component (see the module docstring).

    ``config``: a transformers config or a config.json dict; ``store``: where the calibration cache lives
    (``--offload-activations``: the compute device, CPU RAM, or files on disk); ``device_type``: cpu or cuda;
    ``streamed``: False where the weights load whole (a GGUF file, ``.bin`` weights): the whole model then sits in
    host RAM in the compute dtype through every phase; ``block_v``: BoA / A-BoA with ``--block-v`` (their default),
    whose per-KV-head value Hessians the q/k/v stage holds.
    """
    if store not in STORES:
        raise TritonqError(f"unknown activation store {store!r}; choose device, cpu or disk")
    if device_type not in ("cpu", "cuda"):
        raise TritonqError(f"no memory model for device {device_type!r}; use cpu or cuda")
    for value, flag in ((nsamples, "--nsamples"), (seqlen, "--seqlen"), (calib_batch, "--calib-batch")):
        if value < 1:
            raise TritonqError(f"{flag} must be positive for a memory estimate, got {value}")
    m = ModelShape.from_config(config)
    c, ck = _dtype_bytes(compute_dtype), _dtype_bytes(checkpoint_dtype)
    on_cpu = device_type == "cpu"
    calibrated = method_name != "rtn"
    windows = min(calib_batch, nsamples) if calibrated else 0
    tokens = nsamples * seqlen if calibrated else 0
    cache_on = "disk" if store == "disk" else "host" if (on_cpu or store == "cpu") else "device"
    # one chunk on the device while it runs from a host or disk store (its inputs and replays): on the CPU
    # only a disk store makes a copy (moving a tensor to its own device is free)
    staging = windows * seqlen * 4 * m.hidden * c if cache_on == "disk" or (cache_on == "host" and not on_cpu) else 0
    work = _intermediates(m, windows, seqlen, c) if calibrated else 0
    same_device = cache_on == "device" or (on_cpu and cache_on == "host")

    def cache(widths: tuple[int, ...]) -> int:
        return tokens * sum(widths) * c

    stages = m.cache_widths()
    worst: tuple[int, str, int, dict[str, int]] = (-1, "", 0, {})  # (bytes, stage, cache bytes, working parts)
    if method_name == "autoround":  # one block-scope stage: inputs, float targets and the float path's inputs
        h, fp32 = m.hidden, 4
        batch = min(AUTOROUND_BATCH, nsamples)
        tuning = {"method state": m.block_params() * fp32 * 9,  # weight, V and factors, their grads, best copy, fakes
                  # saved for the backward, with the attention probabilities of the CPU's sdpa backward; fitted to
                  # the default model's measured 1.77 GiB peak (32 x 512, batch 8, float32 on the CPU)
                  "chunk intermediates": 6 * _intermediates(m, batch, seqlen, c)
                  + 2 * batch * m.heads * seqlen * seqlen * fp32}
        worst = (0, "autoround steps", cache((h, h, h)), tuning)
    for s, widths in enumerate(stages if method_name != "autoround" else []):
        if s < len(m.groups()):
            label, k, n = m.groups()[s]
            observe, solve = _method_state(method_name, m, k, n, label, c=c, seqlen=seqlen, tokens=tokens,
                                           search_tokens=search_tokens, group_size=group_size, windows=windows,
                                           block_v=block_v)
            # a tail group's inputs are kept as they are made: on the store's own device the running chunk's
            # are already among its intermediates (counted once)
            kept = windows * seqlen * k * c if label in ("o_proj", "down_proj") and same_device else 0
            running = {"method state": observe, "chunk intermediates": work - kept, "chunk staging": staging}
            solving = {"method state": solve}
            parts = running if calibrated and sum(running.values()) > solve else solving
        else:
            label, parts = "last stage", {"chunk intermediates": work, "chunk staging": staging}
        total = cache(widths) + sum(parts.values())
        if total > worst[0]:
            worst = (total, label, cache(widths), parts)
    _, stage, cache_bytes, working = worst
    cache_name = "calibration cache"
    block_device = {"block weights": m.block_params() * c, **working}
    block_host = {"interpreter": INTERPRETER_BYTES}
    # the block arrives in the checkpoint's dtype and is converted: both copies live for a moment, before any stage
    load_device = {"block weights": m.block_params() * c}
    load_host = {"interpreter": INTERPRETER_BYTES, "block load (checkpoint dtype)": m.block_params() * ck}
    capture_device = {"token embedding": m.vocab * m.hidden * c, "chunk intermediates": windows * seqlen * m.hidden * c}
    capture_host = {"interpreter": INTERPRETER_BYTES, "embedding load (checkpoint dtype)": m.vocab * m.hidden * ck}
    for device_side, host_side, size in ((block_device, block_host, cache_bytes), (load_device, load_host, cache(
            stages[0])), (capture_device, capture_host, cache(stages[0]))):
        if cache_on == "device":
            device_side[cache_name] = size
        elif cache_on == "host":
            host_side[cache_name] = size
    largest = max(m.vocab * m.hidden, max(k * n for _, k, n in m.groups()))
    write_host = {"interpreter": INTERPRETER_BYTES, "writer tensor + buffer": largest * ck + WRITER_BUFFER_BYTES}

    if not streamed:  # loaded whole on the CPU in the compute dtype; the block on the device is a copy of its part
        whole = m.layers * m.block_params() + m.vocab * m.hidden * (1 if m.tied else 2) + m.hidden
        for host_side in (block_host, load_host, capture_host, write_host):
            host_side["the whole model (not streamed)"] = whole * c
        if on_cpu:  # the block and the embedding are the model's own tensors there, not copies
            block_device.pop("block weights")
            load_device.pop("block weights")
            load_host.pop("block load (checkpoint dtype)")
            capture_device.pop("token embedding")
            capture_host.pop("embedding load (checkpoint dtype)")
    phases = {f"block stage {stage}": (block_host, block_device), "a block's load": (load_host, load_device),
              "the write": (write_host, {})}
    if calibrated:  # data-free methods never run the embedding
        phases["capture"] = (capture_host, capture_device)
    if on_cpu:  # the device is the host: one set of parts per phase
        phases = {p: (_merged(hp, dp), {}) for p, (hp, dp) in phases.items()}
    else:
        for hp, dp in phases.values():
            hp["CUDA context"] = CUDA_CONTEXT_BYTES
            if dp:
                dp["CUDA context"] = CUDA_CONTEXT_BYTES
    host_phase = max(phases, key=lambda p: sum(phases[p][0].values()))
    device_phase = max(phases, key=lambda p: sum(phases[p][1].values())) if not on_cpu else ""
    settings = {"method": method_name, "nsamples": nsamples, "seqlen": seqlen, "calib_batch": calib_batch,
                "compute_dtype": str(compute_dtype).replace("torch.", ""),
                "checkpoint_dtype": str(checkpoint_dtype).replace("torch.", ""), "store": store,
                "device_type": device_type}
    rise = cache_bytes - cache(stages[0]) + sum(working.values())
    return MemoryEstimate({k: v for k, v in phases[host_phase][0].items() if v},
                          {k: v for k, v in phases[device_phase][1].items() if v} if device_phase else {},
                          host_phase, device_phase, settings, _advice(cache_on, on_cpu, cache_bytes, working), rise,
                          {p: (sum(hp.values()), sum(dp.values())) for p, (hp, dp) in phases.items()})


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _advice(cache_on: str, on_cpu: bool, cache_bytes: int, working: dict[str, int]) -> list[str]:
    """The flags that lower the peak, in the order they help most."""
    if not cache_bytes:
        return []
    out = []
    if cache_on == "device" and not on_cpu:
        out.append("--offload-activations cpu moves the calibration cache to host RAM")
    if cache_on in ("device", "host"):
        out.append("--offload-activations disk DIR keeps it in files")
    if cache_on != "disk":
        out.append("--nsamples or --seqlen shrink the cache in proportion")
    if working.get("chunk intermediates", 0) > working.get("method state", 0):
        out.append("--calib-batch shrinks the chunk intermediates")
    return out


def checkpoint_dtype_of(config: Any) -> str:
    """The dtype the checkpoint stores its floats in (config ``torch_dtype`` / ``dtype``; float32 if unsaid)."""
    if isinstance(config, dict):
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    else:  # transformers 5 calls it dtype (reading torch_dtype warns)
        dtype = getattr(config, "dtype", None) or "float32"
    name = str(dtype).replace("torch.", "")
    return name if name in DTYPE_BYTES else "float32"


def store_of(offload: Any) -> str:
    """``QuantizeOptions.offload_activations`` as a store name: False -> device, True -> cpu, or the name."""
    if offload is False or offload is None:
        return "device"
    if offload is True:
        return "cpu"
    return str(offload)


def estimate_for_options(opts: Any, config: Any, device: torch.device | str | None = None,
                         streamed: bool = True) -> MemoryEstimate:
    """:func:`estimate_memory` for a ``QuantizeOptions``-like object (the one call a quantize run makes);
    ``streamed``: whether the run streams the weights (``streaming.StreamedModel``) or holds them whole."""
    from .methods.registry import make_method
    from .model_io import resolve_device, resolve_dtype

    dev = torch.device(device) if device is not None else resolve_device(opts.device)
    compute = resolve_dtype(opts.dtype, dev)
    method = make_method(opts.method, opts.method_options)
    search = getattr(method.options, "search_tokens", AWQ_SEARCH_TOKENS)
    group_size = 128 if opts.group_size is None else opts.group_size
    return estimate_memory(config, method.name, nsamples=opts.nsamples, seqlen=opts.seqlen,
                           calib_batch=opts.calib_batch, compute_dtype=compute,
                           checkpoint_dtype=checkpoint_dtype_of(config), store=store_of(opts.offload_activations),
                           device_type=dev.type, search_tokens=search, group_size=group_size, streamed=streamed,
                           block_v=bool(getattr(method.options, "block_v", False)))
