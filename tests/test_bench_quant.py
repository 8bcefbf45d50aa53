"""``tritonq bench quant`` runs on the CPU (kernels in the interpreter) and its kernels agree with the refs."""

import argparse
import json

from tritonq.bench import quant_time


def test_bench_quant_cpu_proof(capsys):
    assert quant_time.main(argparse.Namespace(json=True, end_to_end=False)) == 0
    result = json.loads(capsys.readouterr().out)
    assert "NOT a speed measurement" in result["device"]
    ops = {r["op"]: r for r in result["rows"]}
    assert ops["hessian"]["max_rel_diff"] < 1e-5
    assert ops["gptq_solve"]["frac_weights_differing"] < 0.01
    assert abs(ops["gptq_solve"]["loss_kernel"] - ops["gptq_solve"]["loss_ref"]) <= 1e-3 * ops["gptq_solve"]["loss_ref"]
