"""tritonq: post-training quantization of large language models on Triton kernels.

Importing the package does nothing else: no CUDA queries, no environment changes.
"""

__version__ = "0.1.0"
