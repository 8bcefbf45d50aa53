"""The installed layout: everything under ``tritonq``, nothing generic at the top of site-packages."""

import subprocess
import sys
import textwrap


def test_import_from_outside_the_repository(tmp_path):
    code = textwrap.dedent("""
        import importlib.util, shutil
        import tritonq.engine, tritonq.kernels, tritonq.bench, tritonq.cli
        spec = importlib.util.find_spec("kernels")  # Hugging Face's package, if installed; never ours
        import tritonq.kernels as ours
        assert spec is None or spec.origin != ours.__file__, "a top-level 'kernels' package is tritonq's"
        for name in ("engine", "bench", "cli", "setup"):
            assert importlib.util.find_spec(name) is None, name
        assert shutil.which("tritonq"), "console script missing"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
