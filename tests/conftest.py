"""Test session set-up: Triton kernels run in the interpreter on the CPU; bf16 matmuls avoid AMX.

Both variables must be set before triton or torch kernels are imported (``triton.jit`` decides at
decoration time whether a kernel is interpreted).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

# Lets test modules ``import helpers`` (tiny models and tokenizers) under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _method_registry_restored():
    """Toy methods a test registers leave with the test: the registry (and so the CLI's flags) stays as shipped."""
    from tritonq.engine.methods import registry

    before = dict(registry.METHODS)
    yield
    registry.METHODS.clear()
    registry.METHODS.update(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The CLI tests' one-block random Llama with the tiny tokenizer (``helpers.save_tiny_llama``)."""
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """The first 20,000 characters of the pydoc corpus as a calibration file (a module may define its own, longer)."""
    from tritonq.engine.data import pydoc_corpus

    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(pydoc_corpus()[:20000], encoding="utf-8")
    return path
