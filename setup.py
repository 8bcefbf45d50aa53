"""Install tritonq: the repository root is the ``tritonq`` package.

The folders ``kernels/``, ``engine/`` and ``bench/`` become ``tritonq.kernels``, ``tritonq.engine`` and
``tritonq.bench``; ``cli.py`` becomes ``tritonq.cli``. Nothing else lands at the top of site-packages
(a top-level ``kernels`` would shadow the Hugging Face ``kernels`` package that transformers probes).
"""

from setuptools import setup
from setuptools.command.build_py import build_py

# every folder of the package; a new sub-package is one entry here
SUBPACKAGES = ("kernels", "kernels.aot", "engine", "engine.methods", "engine.formats", "engine.runtime",
               "engine.evaluation", "bench")
# the only root-level .py files that belong to the package (__main__: python -m tritonq, torchrun -m tritonq)
ROOT_MODULES = ("__init__", "__main__", "cli", "commands", "errors")


class BuildPy(build_py):
    """Keep ``setup.py`` and stray root scripts out of the installed ``tritonq`` package."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "tritonq":
            modules = [m for m in modules if m[1] in ROOT_MODULES]
        return modules


setup(
    name="tritonq",
    version="0.1.0",
    description="Post-training quantization of LLMs on Triton kernels (RTN, GPTQ, ...)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tritonq", *(f"tritonq.{p}" for p in SUBPACKAGES)],
    package_dir={"tritonq": ".", **{f"tritonq.{p}": p.replace(".", "/") for p in SUBPACKAGES}},
    # the CPU decode ops, compiled on first use on the user's machine
    package_data={"tritonq.kernels": ["cpu_gemv.cpp", "cpu_attention.cpp", "cpu_pool.h"]},
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.4,<3",
        "triton>=3.1",
        "transformers>=4.45",
        "datasets>=2.19",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "compressed-tensors>=0.18",  # writes and reads the compressed-tensors format (engine/formats.py)
        "ninja>=1.11",  # torch.utils.cpp_extension builds the CPU decode op (kernels/cpu_gemv.cpp) with it
    ],
    extras_require={
        "test": ["pytest>=7", "ruff>=0.5", "httpx>=0.27", "fastapi>=0.110", "uvicorn>=0.29"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "gguf": ["gguf>=0.10", "accelerate>=0.30"],
        "eval": ["lm-eval>=0.4"],
        "plot": ["matplotlib>=3.6"],  # Figure(layout=...), legend(ncols=...)
    },
    entry_points={"console_scripts": ["tritonq=tritonq.cli:main"]},
)
