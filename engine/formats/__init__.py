"""Output formats: one file per on-disk layout, behind one writer interface, collected in one dict.

* ``base.py``: :class:`OutputFormat` (``check(request)``, ``write(checkpoint, out, shard_bytes)``), the
  :class:`FormatRequest` a format checks before calibration, and the shared part of the packed safetensors
  layouts (:class:`PackedFormat`);
* ``checkpoint.py``: what writers write from, layer by layer: a finished run (``tritonq quantize``: its work
  directory and the model's weights) or a fake output on disk (``tritonq pack``);
* ``records.py`` (the format-neutral integer record and the runtime layouts), ``bitpack.py`` (bit packing),
  ``store.py`` (reading tensors, writing shards with an index);
* one file per format: ``fake.py``, ``compressed_tensors.py`` (+ ``ct_int8.py``: the W8A8
  ``int-quantized`` layout, ``ct_library.py``: the library shim), ``gptq.py``
  (gptq and gptq_v2), ``awq.py``, ``gguf.py`` (+ ``gguf_vocab.py``: vocabulary, hyper-parameters, checks);
* ``registry.py``: the dict of formats, ``save_packed``, reading packed checkpoints; ``request.py``: the one
  preflight entry (``check_request``); ``runtime.py``: records to the serving layouts.
"""
