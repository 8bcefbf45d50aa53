"""Data-parallel calibration (``engine/distributed.py``): two gloo ranks on this machine against one process.

* the collectives: every rank holds bit-identical results, equal to a float64 reference (math.fsum per
  element, correctly rounded) within 2 ulp of the sum of magnitudes; the Hessian merge equals the mean over
  every rank's tokens; a rank that leaves makes the other fail with one clear line, not hang;
* ``tritonq quantize --nproc 2`` (torch.distributed.run, gloo) against one process on a tiny random Llama:
  the same codes for at least 99.99 % of the weights for every method, and bitwise the same weights for those
  whose statistics are finished in one process's order (``EXACT``; observed here: bitwise equal for all nine);
* every registered method runs data-parallel; one that does not declare how (the base class's default), or a
  block-scope one, is refused before any rank starts, with the reason.

Ranks are plain subprocesses given torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tritonq.bench.compare_codes import compare
from tritonq.cli import main
from tritonq.engine.distributed import SINGLE, Collective, assign_owners
from tritonq.engine.hessian import HessianAccumulator
from tritonq.engine.methods.base import Method
from tritonq.engine.methods.registry import METHODS, register
from tritonq.engine.methods.rtn import RTN
from tritonq.engine.preflight import check_data_parallel
from tritonq.errors import TritonqError

CODE_SHARE = 0.9999  # the bar: identical codes for >= 99.99 % of the weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(script: str, world: int, tmp_path: Path, timeout: float = 120, **env: str) -> list[str]:
    """Run ``script`` as ``world`` ranks (torchrun's environment); returns each rank's stderr."""
    path = tmp_path / "rank.py"
    path.write_text(textwrap.dedent(script), encoding="utf-8")
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env}
        procs.append(subprocess.Popen([sys.executable, str(path), str(tmp_path)], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        errs.append(err)
        assert p.returncode == 0, err
    return errs


COLLECTIVES = """
import sys
import torch
from tritonq.engine.distributed import OrderedSum, init_from_env, shutdown
from tritonq.engine.hessian import HessianAccumulator

out = sys.argv[1]
c = init_from_env(torch.device("cpu"))
gen = torch.Generator().manual_seed(1234 + c.rank)  # fresh values, different on every rank
x32 = torch.randn(37, 5, generator=gen) * 10.0 ** torch.randint(-6, 6, (37, 5), generator=gen)
x64 = torch.randn(11, generator=gen, dtype=torch.float64)
tokens = torch.randn(3 + 4 * c.rank, 7, 16, generator=gen)  # a different token count per rank
acc = HessianAccumulator(16, "cpu")  # without the collective: the ranks' means merged
exact = HessianAccumulator(16, "cpu", c)  # with it: one process's running mean, continued rank after rank
ordered = OrderedSum(c)
for chunk in tokens.split(2):
    acc.add(chunk)
    exact.add(chunk)
    ordered.add(chunk.double().sum(dim=(0, 1)))
acc.reduce(c)
exact.reduce(c)
ordered.reduce(c)
res = {"x32": x32, "x64": x64, "tokens": tokens, "sum32": c.sum(x32), "sum64": c.sum(x64), "max": c.max(x32),
       "counts": c.counts(10 + c.rank), "total": c.sum_count(10 + c.rank), "hessian": acc.hessian,
       "hessian_tokens": acc.tokens, "exact": exact.hessian, "exact_tokens": exact.tokens,
       "ordered": ordered.total, "bcast": c.broadcast({"from": c.rank, "t": x32[:2]}, owner=1)}
torch.save(res, f"{out}/rank{c.rank}.pt")
shutdown()  # leave the group before exit (gloo's threads otherwise may abort the interpreter's shutdown)
"""


def _fsum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise correctly rounded float64 sum of the parts (the reference)."""
    flat = [p.double().flatten().tolist() for p in parts]
    return torch.tensor([math.fsum(v) for v in zip(*flat)], dtype=torch.float64).reshape(parts[0].shape)


def test_collectives_are_deterministic_and_match_a_float64_reference(tmp_path):
    world = 3
    _run_ranks(COLLECTIVES, world, tmp_path)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for key in ("sum32", "sum64", "max", "hessian", "exact", "ordered"):  # bit-identical on every rank
        for r in range(1, world):
            assert torch.equal(res[0][key], res[r][key]), key
    for key in ("x32", "x64"):
        parts = [r[key] for r in res]
        got, ref = res[0]["sum" + key[1:]], _fsum(parts)
        assert got.dtype == torch.float64
        bound = 2 * torch.finfo(torch.float64).eps * torch.stack([p.double().abs() for p in parts]).sum(0)
        assert ((got - ref).abs() <= bound).all(), key
        assert not torch.equal(got, parts[0].double())  # the other ranks' parts were added
    assert torch.equal(res[0]["max"], torch.stack([r["x32"] for r in res]).amax(0))
    assert res[0]["counts"] == [10, 11, 12] and res[0]["total"] == 33
    assert res[2]["bcast"]["from"] == 1 and torch.equal(res[0]["bcast"]["t"], res[1]["x32"][:2])
    # the merged Hessian: 2 X^T X / T over every rank's tokens (fp32 running means: fp32 tolerance)
    x = torch.cat([r["tokens"].reshape(-1, 16) for r in res]).double()
    ref = 2 * x.t() @ x / x.shape[0]
    assert res[0]["hessian_tokens"] == x.shape[0]
    torch.testing.assert_close(res[0]["hessian"].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the in-order fold: exactly one process's running mean and chunk sums over the same chunks in rank order
    one, total = HessianAccumulator(16, "cpu"), None
    for chunk in [c for r in res for c in r["tokens"].split(2)]:  # each rank's chunks, in rank order
        one.add(chunk)
        part = chunk.double().sum(dim=(0, 1))
        total = part if total is None else total + part
    assert torch.equal(res[0]["exact"], one.hessian) and res[0]["exact_tokens"] == one.tokens
    assert torch.equal(res[0]["ordered"], total)
    assert not torch.equal(res[0]["hessian"], one.hessian)  # the merge is close, the fold is exact

LEAVER = """
import sys
import torch
from tritonq.engine.distributed import init_from_env, shutdown
from tritonq.errors import TritonqError

c = init_from_env(torch.device("cpu"))
if c.rank == 1:
    sys.exit(0)  # leaves without joining the collective (as a rank that failed would)
try:
    c.sum(torch.ones(4))
except TritonqError as exc:
    print(f"tritonq: error: {exc}", file=sys.stderr)
finally:
    shutdown()  # as the CLI does after any error: leave the group before the interpreter exits
"""


def test_a_rank_that_leaves_does_not_hang_the_others(tmp_path):
    errs = _run_ranks(LEAVER, 2, tmp_path, timeout=60, TRITONQ_DIST_TIMEOUT="10")
    lines = [line for line in errs[0].splitlines() if line.startswith("tritonq: error:")]
    assert len(lines) == 1 and "rank 0 of 2: the sum with the other ranks failed" in lines[0], errs[0]


def test_share_single_and_owners():
    items = torch.arange(11)
    shares = [Collective(r, 3).share(items) for r in range(3)]
    assert [len(s) for s in shares] == [3, 4, 4]
    assert torch.equal(torch.cat(shares), items)  # contiguous, disjoint, in rank order
    with pytest.raises(TritonqError, match="2 calibration windows make 2 chunk.s. of --calib-batch 1, fewer than"):
        Collective(0, 3).share(items[:2])
    # whole chunks of --calib-batch 4: 3 chunks, 1 and 2 (the ranks' chunks are one process's chunks)
    assert [Collective(r, 2).share(items[:10], 4).tolist() for r in range(2)] == [[0, 1, 2, 3], list(range(4, 10))]
    x = torch.randn(5)
    assert SINGLE.share(x) is x and SINGLE.max(x) is x and SINGLE.broadcast(x, 0) is x
    assert SINGLE.sum_count(7) == 7 and SINGLE.is_writer and not Collective(1, 2).is_writer
    # q [576 x 576^2], k and v [192 x ...]: q on one rank, k and v on the other; deterministic
    assert assign_owners([576.0, 192.0, 192.0], 2) == [0, 1, 1]
    assert assign_owners([5.0, 5.0, 5.0, 5.0], 2) == [0, 1, 0, 1]


def test_every_method_declares_how_it_runs_on_several_ranks():
    for name, cls in METHODS.items():
        method = cls()
        check_data_parallel(method, 1)  # one process: nothing is refused
        if cls.data_parallel == "refused":
            with pytest.raises(TritonqError, match=f"--method {name} cannot run on 2 ranks: .+; run it in one"):
                check_data_parallel(method, 2)
        else:
            check_data_parallel(method, 2)

    class WholeBlock(Method):
        name = "whole"
        scope = "block"
        data_parallel = "replicated"

    with pytest.raises(TritonqError, match="optimises whole blocks"):
        check_data_parallel(WholeBlock(), 2)


@pytest.fixture(scope="module")
def model_and_calib(tmp_path_factory):
    """A two-block random Llama (hidden 128, GQA) with the tiny tokenizer, and a calibration text."""
    import random

    from helpers import tiny_config, tiny_tokenizer
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    config = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    (root / "calib.txt").write_text(" ".join(rng.choice(words) for _ in range(20000)), encoding="utf-8")
    return root / "model", root / "calib.txt"


def _quantize(model, calib, out, method, *extra):
    return ["quantize", "--model", str(model), "--calib", str(calib), "--nsamples", "8", "--seqlen", "64",
            "--calib-batch", "2", "--group-size", "32", "--device", "cpu", "--no-progress", "--method", method,
            "--output", str(out), *extra]


# Methods whose statistics are all finished in one process's order (the in-order fold, maxima): bitwise one
# process's weights. BoA's query/key moments and AWRQ's cross term are merged (fp64, rank order): close, and held
# to the bar (observed here: bitwise equal too, on this model).
EXACT = ("rtn", "gptq", "awq", "awq+gptq", "dh-awq", "smoothquant")
MERGED = ("boa", "aboa", "awrq")


@pytest.fixture
def one_thread():
    """torchrun starts each rank with OMP_NUM_THREADS=1; the one process compared with them runs one thread too
    (a GEMM split over another thread count sums in another order, and the last bits differ)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", EXACT + MERGED)
def test_two_ranks_give_the_codes_of_one_process(method, model_and_calib, tmp_path, capsys, one_thread):
    model, calib = model_and_calib
    assert main(_quantize(model, calib, tmp_path / "one", method)) == 0
    # the launcher runs torch.distributed.run in a subprocess: its ranks print there, not to capsys
    assert main(_quantize(model, calib, tmp_path / "two", method, "--nproc", "2")) == 0
    result = compare(tmp_path / "one", tmp_path / "two")
    assert result.weights == 2 * (128 * 128 * 2 + 64 * 128 * 2 + 256 * 128 * 3)  # every linear of both blocks
    assert result.layers == 14 and result.code_share >= CODE_SHARE, result
    if method in EXACT:
        assert result.same_weights == result.weights and result.same_grids == result.groups, result


@dataclass(frozen=True)
class _NoOptions:
    pass


class _Undeclared(RTN):
    """A method that does not say how it runs on several ranks (the base class's default)."""

    name = "undeclared-dp"
    Options = _NoOptions
    data_parallel = Method.data_parallel
    data_parallel_refusal = Method.data_parallel_refusal


def test_refused_method_stops_before_launching(model_and_calib, tmp_path, capsys):
    model, calib = model_and_calib
    register(_Undeclared)
    try:
        rc = main(_quantize(model, calib, tmp_path / "out", _Undeclared.name, "--nproc", "2"))
    finally:
        del METHODS[_Undeclared.name]
    err = capsys.readouterr().err
    assert rc == 2 and (f"--method {_Undeclared.name} cannot run on 2 ranks: it does not declare how its statistics "
                        "are reduced across ranks; run it in one process") in err, err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "tritonq", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip()


# Two ranks under torchrun's environment that stop for good (os._exit, no cleanup) once block 0 is committed:
# what a killed multi-rank run leaves in its work directory.
STOPPED_AFTER_BLOCK_0 = """
import os
import sys
import tritonq.engine.workdir as workdir
from tritonq.cli import main

commit = workdir.WorkDir.commit_block


def commit_block(self, index, *args, **kwargs):
    commit(self, index, *args, **kwargs)
    if index == 0:
        os._exit(0)


workdir.WorkDir.commit_block = commit_block
sys.exit(main(sys.argv[2:]))
"""


def test_two_ranks_resume_from_their_own_inputs(model_and_calib, tmp_path):
    """Every rank keeps its share of the next block's inputs; ``--resume --nproc 2`` continues a killed two-rank run
    and writes the bytes of an uninterrupted two-rank run."""
    model, calib = model_and_calib
    full, out = tmp_path / "full", tmp_path / "out"
    assert main(_quantize(model, calib, full, "gptq", "--nproc", "2")) == 0
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(STOPPED_AFTER_BLOCK_0), encoding="utf-8")
    port, procs = str(_free_port()), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(script), str(tmp_path), *_quantize(model, calib, out, "gptq")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    work = tmp_path / "out.tritonq-work"
    assert sorted(f.name for f in work.glob("inputs-*")) == ["inputs-00001.pt", "inputs-00001.rank1.pt"]
    assert not out.exists()
    assert main(_quantize(model, calib, out, "gptq", "--nproc", "2", "--resume")) == 0
    for name in ("model.safetensors", "quant_params.safetensors"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
    assert not work.exists()
