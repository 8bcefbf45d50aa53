"""``python -m tritonq ...``: the CLI, so that ``torchrun --nproc-per-node N -m tritonq quantize ...`` starts one
rank per process (``engine/distributed.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
