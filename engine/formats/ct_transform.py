"""The online Hadamard of a rotated W4A8 / W4A4 run (``engine/online_hadamard.py``) in a compressed-tensors
checkpoint: the ``transform_config`` and the transform matrix, where compressed-tensors and vLLM read them.

What the readers do (read from their code, compressed-tensors 0.20.1 as installed, vLLM and llm-compressor main,
2026-08):

* compressed-tensors ``transform/{transform_config,transform_scheme,transform_args}.py``: a ``TransformConfig`` holds
  named ``TransformScheme`` groups (``type``, ``apply``: a list of ``TransformArgs(targets, location, inverse)``,
  ``randomize``, ``head_dim``, ``precision``). ``transform/apply.py`` ``apply_transform_config`` builds one
  ``TransformFactory`` per group (``factory/base.py``): it registers a submodule ``<group>_<location>`` on every
  target; ``location: input`` runs it as a forward pre-hook, ``weight_input`` fuses it into the weight at once.
  ``factory/hadamard.py``'s ``HadamardTransform`` computes ``x @ M / sqrt(n)`` online (``utils/matrix.py``
  ``apply_transform_weight``), ``M`` its ``weight`` parameter; the factory makes one ``M`` per size, shared by every
  target. ``hadamard`` is Sylvester only (``utils/hadamard.py`` ``deterministic_hadamard_matrix``: powers of two, no
  signs); ``random-hadamard`` (``factory/random_hadamard.py``) draws signs from a generator whose seed is not in the
  config, over its own base table (``utils/hadamards.safetensors``: its order-12 base is not our Paley I). Neither
  construction reproduces ours, but neither is regenerated on load either: ``M`` is a parameter, so llm-compressor's
  ``save_pretrained`` writes it, ``apply.py`` ``_register_tied_transform_weights`` marks every later copy as tied to
  the first (transformers v5 then saves one tensor), and the transformers loader of huggingface/transformers#42887
  (open; transformers 5.25 installed here ignores ``transform_config`` and loads the model *without* any transform)
  applies the config before loading the weights, so the stored ``M`` replaces the generated one.
* vLLM ``model_executor/layers/quantization/compressed_tensors/transform/{linear,module}.py``: for every linear
  matched by an online ``TransformArgs`` (``input``/``output``; ``weight_*`` entries are skipped: already fused) it
  creates ``<group>_<location>.weight`` as a ``SharedWeightParameter`` keyed by (scheme, size), *loads it from the
  checkpoint*, divides it by ``sqrt(n)`` and applies ``x @ M`` densely, except for ``type: hadamard``, which runs
  the ``hadacore`` Sylvester kernel and ignores the stored tensor. Its ``apply`` asserts that the linear has no bias.
* llm-compressor ``modifiers/transform/spinquant/base.py`` ``_create_r4_scheme`` (the reference producer of this
  very rotation, SpinQuant's R4): one group ``R4``, ``apply = [input on down_proj, weight_input inverse on
  down_proj]``.

So the design is (a) of the issue: both readers load ``M`` from the checkpoint, and our ``T`` goes in as it is.
``M = sqrt(n) T^T`` (``x T^T == x M / sqrt(n)``, the readers' online formula): entries +-1 for every Hadamard
construction tritonq builds, written as float32 (the scheme's ``precision``; a Haar-random base, where no Hadamard
of the width is built, is not +-1 and float32 rounds it). The group is SpinQuant's ``R4`` with ``type:
random-hadamard`` (not ``hadamard``: vLLM would run Sylvester without our signs), its ``weight_input`` entry says
the weight already holds ``T^T``. ``M`` is stored once, under the first block's ``down_proj``, as the reference
producer's files hold it. tritonq itself still runs its own record (``tritonq_online_hadamard``) and checks that the
stored ``M`` is the one the record rebuilds (:func:`check_stored`); a ``transform_config`` it did not write (e.g.
llm-compressor's) is refused rather than run without its transforms. Nothing here needs a new construction of ``T``
(design (b)): no reader regenerates it. Checked: ``tests/test_ct_transform.py`` (compressed-tensors' own modules give
tritonq's logits), ``bench/ct_transform_check.py`` on SmolLM2; not run here: vLLM (no GPU) and transformers#42887.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import torch
from torch import Tensor

from ...errors import TritonqError, warn
from .ct_library import compressed_tensors_lib

GROUP = "R4"  # llm-compressor's SpinQuant name for the online rotation of the down_proj input
LOCATION = "input"


def _targets(config: dict) -> tuple[str, str]:
    """The ``re:`` target of every block's online linear, and the module name of block 0's (where ``M`` is kept)."""
    from ..adapters import adapter_for
    from ..online_hadamard import online_targets

    adapter = adapter_for(SimpleNamespace(**config))
    (linear,) = online_targets(adapter)
    blocks = re.escape(adapter.blocks)
    return f"re:.*{blocks}\\.\\d+\\.{re.escape(linear)}$", f"{adapter.blocks}.0.{linear}"


def matrix_key(config: dict) -> str:
    """Where the checkpoint keeps ``M``: ``<block 0's down_proj>.R4_input.weight`` (the readers' module name)."""
    return f"{_targets(config)[1]}.{GROUP}_{LOCATION}.weight"


def ct_matrix(record: dict, where: str) -> Tensor:
    """``M = sqrt(n) T^T`` [n, n] float32 of the transform ``record`` describes, entries exactly +-1 where ``T`` is
    a Hadamard construction."""
    from ..online_hadamard import rebuild

    transform = rebuild(record, where)
    m = transform.matrix().T * math.sqrt(transform.size)
    signs = m.round()
    if bool(signs.abs().eq(1).all()) and float((m - signs).abs().max()) < 1e-9:
        m = signs  # float64 round-off of a +-1 matrix: store the exact entries
    return m.to(torch.float32).contiguous()


def transform_config(config: dict, record: dict | None) -> dict:
    """``quantization_config.transform_config`` for a run with the online Hadamard (``{}`` without one)."""
    if not record:
        return {}
    compressed_tensors_lib()  # a missing library fails with its own message
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    target, _ = _targets(config)
    scheme = TransformScheme(type="random-hadamard", randomize=False, precision=torch.float32, apply=[
        TransformArgs(targets=[target], location=LOCATION),
        TransformArgs(targets=[target], location="weight_input", inverse=True),  # fused when tritonq quantized
    ])
    return TransformConfig(config_groups={GROUP: scheme}).model_dump()


def transform_tensors(config: dict, record: dict | None, where: str) -> dict[str, Tensor]:
    """The tensor the readers load for the online transform: ``M`` once, under block 0's online linear."""
    if not record:
        return {}
    if config.get("mlp_bias"):  # vLLM's CompressedTensorsLinearTransformMethod.apply asserts bias is None
        warn("down_proj has a bias: vLLM refuses online transforms on linears with a bias (it asserts none); "
             "compressed-tensors and tritonq run this checkpoint")
    return {matrix_key(config): ct_matrix(record, where)}


def check_stored(qcfg: dict, stored: Tensor | None, config: dict, record: dict | None, where: str) -> None:
    """Refuse a checkpoint whose ``transform_config`` tritonq would not run as its readers do: a transform config
    without tritonq's record (e.g. llm-compressor's own), or a stored ``M`` that is not the recorded ``T``."""
    tcfg = qcfg.get("transform_config") or {}
    if not tcfg.get("config_groups"):
        return
    if record is None or stored is None or set(tcfg["config_groups"]) != {GROUP}:
        raise TritonqError(f"{where}: its transform_config ({', '.join(tcfg['config_groups'])}) is not one tritonq "
                           "wrote with its online Hadamard record; tritonq does not run other transforms (use vLLM)")
    if not torch.equal(stored.to(torch.float32), ct_matrix(record, where)):
        raise TritonqError(f"{where}: the stored {matrix_key(config)} is not the transform tritonq_online_hadamard "
                           "records; the checkpoint was altered, re-pack it")
