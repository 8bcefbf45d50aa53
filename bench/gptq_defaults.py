"""Choose GPTQ's defaults from calibration-side evidence (issue 9): :mod:`.method_defaults` with GPTQ's settings
written the short way it was first run with, ``act_order:damp`` pairs.

    python -m tritonq.bench.gptq_defaults --bits 3 --seeds 0 1 2 \\
        --settings none:0.01 none:0.05 none:0.1 static:0.01 static:0.05 static:0.1 [--check FILE ...] [--json]

is ``python -m tritonq.bench.method_defaults --method gptq --settings act_order=none,damp=0.01 ...``; every other
flag is passed on as it is (see that module for the held-out split, the texts and the log).
"""

from __future__ import annotations

import sys

from . import method_defaults


def gptq_setting(short: str) -> str:
    """``act_order:damp`` (or ``rtn``) -> a :mod:`.method_defaults` setting."""
    if short == "rtn" or "=" in short:
        return short
    act_order, damp = short.split(":")
    return f"gptq:act_order={act_order},damp={damp}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--settings" in argv:
        i = argv.index("--settings") + 1
        while i < len(argv) and not argv[i].startswith("--"):
            argv[i] = gptq_setting(argv[i])
            i += 1
    else:
        argv += ["--settings", gptq_setting("none:0.01"), gptq_setting("static:0.1")]
    return method_defaults.main(["--method", "gptq", *argv])


if __name__ == "__main__":
    sys.exit(main())
