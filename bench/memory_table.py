"""The README's "Memory you need" table, computed by ``engine/memory.py`` (so the table cannot drift from the
formula the run prints; ``tests/test_memory.py`` checks the README holds this output).

``python -m tritonq.bench.memory_table`` prints the Markdown table: Llama-3.1-8B and -70B (configs below, from
their config.json), per method, on one GPU (fp16 compute, the calibration cache on the GPU or with
``--offload-activations cpu``) and on the CPU (fp32), with the default calibration (128 x 512, calib-batch 8).
"""

from __future__ import annotations

from tritonq.engine.memory import GIB, estimate_memory

LLAMA_31 = {
    "Llama-3.1-8B": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False, dtype="bfloat16"),
    "Llama-3.1-70B": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                          tie_word_embeddings=False, dtype="bfloat16"),
}
METHODS = ("rtn", "gptq", "awq", "boa")
CALIBRATION = dict(nsamples=128, seqlen=512, calib_batch=8)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def table() -> str:
    """The Markdown table (GiB): GPU peak / host RSS peak on one GPU, host RSS peak on the CPU."""
    lines = ["| model | method | 1 GPU, cache on the GPU: GPU / host | 1 GPU, `--offload-activations cpu`: GPU / host "
             "| CPU only (fp32): host |",
             "| --- | --- | --- | --- | --- |"]
    for model, config in LLAMA_31.items():
        for method in METHODS:
            cells = []
            for device_type, store, dtype in (("cuda", "device", "float16"), ("cuda", "cpu", "float16"),
                                              ("cpu", "device", "float32")):
                est = estimate_memory(config, method, compute_dtype=dtype, checkpoint_dtype="bfloat16", store=store,
                                      device_type=device_type, **CALIBRATION)
                cells.append(f"{_gib(est.peak_device)} / {_gib(est.peak_host)}" if device_type == "cuda"
                             else _gib(est.peak_host))
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
