"""From a checkout's root, our ``kernels/`` folder must not shadow Hugging Face's ``kernels`` package.

Python started in the checkout root (``python -c``, ``python -m``, a notebook) puts the root first on sys.path,
so ``import kernels`` (which transformers 5.2x does) finds our folder. ``kernels/__init__.py`` then hands the
import over to the installed package; these tests run exactly that situation in a subprocess.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_pipeline import make_family_model

ROOT = Path(__file__).resolve().parents[1]
HF_KERNELS = importlib.util.find_spec("kernels") is not None and "site-packages" in (
    importlib.util.find_spec("kernels").origin or "")


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed")
def test_transformers_imports_from_the_checkout_root():
    proc = _run_in_root(f"""
        import sys
        assert sys.path[0] == "", sys.path[0]  # the situation under test: the checkout root leads sys.path
        from transformers import LlamaForCausalLM
        import kernels
        assert not kernels.__file__.startswith({str(ROOT / "kernels")!r}), kernels.__file__
        assert hasattr(kernels, "CUDAProperties") or hasattr(kernels, "get_kernel"), dir(kernels)
        import tritonq.kernels
        assert tritonq.kernels.__file__.startswith({str(ROOT)!r}) or "site-packages" in tritonq.kernels.__file__
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_without_the_installed_package_the_folder_refuses_its_top_level_name(tmp_path):
    # sys.path without site-packages' kernels: the folder says what it is instead of half-importing
    proc = _run_in_root("""
        import sys
        sys.path[:] = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        try:
            import kernels
        except ImportError as e:
            print("refused:", e)
        else:
            raise SystemExit(f"imported {kernels.__file__}")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "import it as tritonq.kernels" in proc.stdout


def test_readme_python_api_runs_from_the_checkout_root(tmp_path):
    model = make_family_model(tmp_path / "model", "llama")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    proc = _run_in_root(f"""
        import json
        from tritonq.engine.api import evaluate
        result = evaluate({str(model)!r}, {str(text)!r}, max_windows=2, seqlen=64, device="cpu", progress=False)
        print(json.dumps({{"perplexity": result.perplexity}}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ppl = json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"]
    assert 1.0 < ppl < 1e4  # a random 259-token model: finite and above 1
