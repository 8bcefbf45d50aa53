"""The installed layout: everything under ``tritonq``, nothing generic at the top of site-packages."""

import subprocess
import sys
import textwrap


def test_import_from_outside_the_repository(tmp_path):
    code = textwrap.dedent("""
        import importlib.util, shutil
        import tritonq.engine, tritonq.kernels, tritonq.bench, tritonq.cli
        from transformers.utils.import_utils import is_kernels_available
        assert not is_kernels_available(), "a top-level 'kernels' package shadows Hugging Face kernels"
        for name in ("kernels", "engine", "bench", "cli", "setup"):
            assert importlib.util.find_spec(name) is None, name
        assert shutil.which("tritonq"), "console script missing"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
