"""``--method auto --avg-bits B``: candidates, the honest bit count, the allocation against brute force, the scoring
pass on a tiny random Llama, the end-to-end run (recorded recipe, budget kept, replay) and its one-line refusals."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import make_family_model, pydoc_corpus
from tritonq.cli import main
from tritonq.engine import auto_bits
from tritonq.engine.auto_bits import (
    Candidate,
    GroupOption,
    allocate,
    allocation_recipe,
    bits_per_weight,
    heuristic_choices,
    parse_candidates,
    recipe_scheme,
    stored_bits,
)
from tritonq.errors import TritonqError

G = 32
CANDS = parse_candidates("gptq:2,gptq:3,gptq:4")


def test_parse_candidates_and_refusals():
    assert parse_candidates("gptq:3, rtn:4") == (Candidate("gptq", 3), Candidate("rtn", 4))
    for bad, what in [("awq:4", "unknown candidate 'awq:4'"), ("gptq", "unknown candidate 'gptq'"),
                      ("gptq:9", "unknown candidate"), ("gptq:3,gptq:3", "listed twice")]:
        with pytest.raises(TritonqError, match=re.escape(what)):
            parse_candidates(bad)


def test_stored_bits_count_scales_and_zeros():
    # 4-bit g64 asymmetric: 4 code bits + (16-bit scale + 4-bit zero) / 64 per weight; symmetric has no zeros
    assert bits_per_weight(4, 64, False, 576) == pytest.approx(4 + 20 / 64)
    assert bits_per_weight(3, 64, True, 576) == pytest.approx(3 + 16 / 64)
    assert bits_per_weight(2, -1, False, 1000) == pytest.approx(2 + 18 / 1000)  # per channel: one group per row
    assert stored_bits(8, 128, 3, 32, False) == 8 * 128 * 3 + 8 * 4 * 19


def _random_groups(gen: torch.Generator, count: int) -> list[GroupOption]:
    groups = []
    for i in range(count):
        shapes = [(int(torch.randint(1, 5, (1,), generator=gen)) * 8, int(torch.randint(1, 4, (1,), generator=gen)) * G)
                  for _ in range(int(torch.randint(1, 3, (1,), generator=gen)))]
        # errors fall with bits (as a real layer's do), with a random scale per group
        base = float(torch.rand(1, generator=gen)) * 10 + 0.1
        drops = torch.rand(2, generator=gen) * 0.5 + 0.1
        scores = {"gptq:2": base, "gptq:3": base * float(drops[0]), "gptq:4": base * float(drops[0] * drops[1])}
        groups.append(GroupOption([f"model.layers.{i}.mlp.down_proj"], shapes, scores))
    return groups


def _brute_force(groups, budget_bits):
    best = None
    for combo in itertools.product(CANDS, repeat=len(groups)):
        cost = sum(g.cost(c, G, False) for g, c in zip(groups, combo))
        if cost <= budget_bits:
            score = sum(g.scores[c.label] for g, c in zip(groups, combo))
            best = score if best is None else min(best, score)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_allocation_is_the_brute_force_optimum_within_budget(seed):
    gen = torch.Generator().manual_seed(seed + int(torch.randint(0, 10**6, (1,))))  # fresh draws every run
    groups = _random_groups(gen, 6)
    weights = sum(g.weights() for g in groups)
    lo, hi = bits_per_weight(2, G, False, G), bits_per_weight(4, G, False, G)
    previous = float("inf")
    for avg in torch.linspace(lo, hi, 7).tolist():
        got = allocate(groups, CANDS, avg, G, False)
        assert got.avg_bits <= avg + 1e-12
        spent = sum(g.cost(c, G, False) for g, c in zip(groups, got.choices))
        assert spent == pytest.approx(got.avg_bits * weights)
        assert got.score == pytest.approx(_brute_force(groups, avg * weights), rel=1e-12)
        assert got.score <= previous + 1e-12  # a bigger budget never scores worse
        previous = got.score


def test_coarse_costs_keep_the_budget(monkeypatch):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    groups = _random_groups(gen, 6)
    avg = 3.1 + 0.1 * float(torch.rand(1, generator=gen))
    exact = allocate(groups, CANDS, avg, G, False)
    monkeypatch.setattr(auto_bits, "MAX_CELLS", 64)  # costs rounded up to 1/64 of the budget
    coarse = allocate(groups, CANDS, avg, G, False)
    assert coarse.avg_bits <= avg and coarse.score >= exact.score - 1e-12


def test_budget_outside_the_candidates_is_refused():
    groups = _random_groups(torch.Generator().manual_seed(5), 3)
    with pytest.raises(TritonqError, match=r"--avg-bits 2\.1 is below the cheapest candidate \(2\.562"):
        allocate(groups, CANDS, 2.1, G, False)
    with pytest.raises(TritonqError, match=r"--avg-bits 5\.0 is above the richest candidate \(4\.625"):
        allocate(groups, CANDS, 5.0, G, False)


def test_recipe_rules_are_anchored_and_first_match_wins():
    groups = [GroupOption([f"model.layers.{i}.mlp.down_proj"], [(8, G)], {}) for i in (1, 11)]
    recipe = allocation_recipe(groups, [Candidate("gptq", 2), Candidate("rtn", 4)], G, False)
    assert recipe["rules"][0]["match"] == r"^model\.layers\.1\.mlp\.down_proj$"
    assert recipe_scheme(recipe, "model.layers.1.mlp.down_proj")["bits"] == 2  # not layers.11's rule
    assert recipe_scheme(recipe, "model.layers.11.mlp.down_proj") == {"method": "rtn", "bits": 4, "group_size": G,
                                                                      "sym": False}
    assert recipe_scheme(recipe, "model.layers.2.mlp.up_proj") == recipe["default"]


def test_heuristic_edges():
    low, high = Candidate("gptq", 3), Candidate("gptq", 4)
    got = heuristic_choices([0, 0, 1, 2, 3, 4, 5], low, high, 2)
    assert [c.bits for c in got] == [4, 4, 4, 3, 3, 4, 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    make_family_model(root / "float", "llama", seed=int(torch.randint(0, 1000, (1,))))
    (root / "calib.txt").write_text(pydoc_corpus()[:60000], encoding="utf-8")
    return root


def _scores(tiny, candidates, fisher_pass=False):
    from tritonq.engine.auto_plan import score_candidates
    from tritonq.engine.data import calibration_windows, load_corpus, tokenize
    from tritonq.engine.grid import GridSpec
    from tritonq.engine.model_io import load_tokenizer

    ids = tokenize(load_tokenizer(str(tiny / "float")), load_corpus(str(tiny / "calib.txt")).text)
    windows = calibration_windows(ids, 8, 128, int(torch.randint(0, 1000, (1,))), "calib")
    return score_candidates(str(tiny / "float"), torch.float32, torch.device("cpu"), GridSpec(group_size=G),
                            candidates, list(torch.split(windows, 4)), progress=False, fisher_pass=fisher_pass)


def test_scores_are_positive_and_fall_with_bits(tiny):
    groups = _scores(tiny, parse_candidates("gptq:2,gptq:3,gptq:4,rtn:2,rtn:4"), fisher_pass=True)
    assert len(groups) == 2 * 4  # two blocks of q/k/v, o, gate/up, down
    for g in groups:
        assert 0 < g.energy < float("inf"), g.names
        for e in (g.errors, g.loss_errors):
            assert all(0 < v < float("inf") for v in e.values()), g.names
            assert e["gptq:2"] > e["gptq:3"] > e["gptq:4"], g.names
            assert e["rtn:2"] > e["rtn:4"], g.names


def _run(tiny, out, *extra):
    return main(["quantize", "--model", str(tiny / "float"), "--method", "auto", "--group-size", str(G),
                 "--calib", str(tiny / "calib.txt"), "--nsamples", "8", "--seqlen", "128", "--device", "cpu",
                 "--no-progress", "--output", str(out), *extra])


def test_auto_run_keeps_the_budget_and_records_its_recipe(tiny, tmp_path):
    assert _run(tiny, tmp_path / "out", "--avg-bits", "3.3", "--candidates", "gptq:2,gptq:3,rtn:4") == 0
    meta = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert meta["method"] == "auto" and meta["achieved_avg_bits"] <= 3.3
    params = load_file(str(tmp_path / "out" / "quantization.json").replace("quantization.json",
                                                                           "quant_params.safetensors"))
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    stored = total = 0
    for name in meta["layers"]:
        chosen = recipe_scheme(meta["recipe"], name)
        assert params[f"{name}.grid"].tolist()[:2] == [chosen["bits"], G], name
        n, k = weights[f"{name}.weight"].shape
        stored += stored_bits(n, k, chosen["bits"], G, False)
        total += n * k
    assert stored / total == pytest.approx(meta["achieved_avg_bits"], abs=1e-6)
    assert set(meta["scores"]) and all(set(v["errors"]) == {"gptq:2", "gptq:3", "rtn:4"}
                                       for v in meta["scores"].values())
    # the recorded recipe replays: the same weights, no scoring pass
    from tritonq.engine.api import QuantizeOptions, quantize

    quantize(QuantizeOptions(output=str(tmp_path / "replay"), model=str(tiny / "float"), method="auto", group_size=G,
                             method_options={"plan": {"recipe": meta["recipe"]}}, calib=str(tiny / "calib.txt"),
                             nsamples=8, seqlen=128, device="cpu", progress=False))
    again = load_file(str(tmp_path / "replay" / "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


@pytest.mark.parametrize("extra, message", [
    ((), "--method auto needs a budget: add --avg-bits"),
    (("--avg-bits", "3.5", "--candidates", "gptq:3,foo:4"), "unknown candidate 'foo:4'"),
    (("--avg-bits", "1.5"), "is below the cheapest candidate"),
    (("--avg-bits", "9"), "is above the richest candidate"),
    (("--avg-bits", "3.5", "--group-size", "48"), "group size 48 does not divide"),
    (("--avg-bits", "3.5", "--format", "awq"), "the AWQ config holds one grid"),  # refused before scoring
])
def test_bad_arguments_fail_in_one_line(tiny, tmp_path, capsys, extra, message):
    args = ["quantize", "--model", str(tiny / "float"), "--method", "auto", "--calib", str(tiny / "calib.txt"),
            "--device", "cpu", "--no-progress", "--output", str(tmp_path / "bad"),
            *(extra if "--group-size" in extra else (*extra, "--group-size", str(G)))]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_output_fisher_is_the_mean_squared_loss_gradient(tiny):
    from transformers import AutoModelForCausalLM
    from tritonq.engine.adapters import adapter_for
    from tritonq.engine.auto_plan import output_fisher

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "float"), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 64))
    got = output_fisher(model, adapter_for(model.config), [ids], torch.device("cpu"), progress=False)
    assert len(got) == 2 * 7
    name = "model.layers.1.self_attn.v_proj"
    kept = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: kept.append(out))
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        loss = model(input_ids=ids, labels=ids).loss
        (grad,) = torch.autograd.grad(loss, kept[0])
    handle.remove()
    tokens = ids.numel()  # the mean loss's gradient times the token count is the per-token one; squared, averaged
    expected = (grad * tokens).pow(2).reshape(-1, grad.shape[-1]).sum(0) / tokens
    assert torch.allclose(got[name], expected, rtol=1e-4, atol=0), (got[name] - expected).abs().max()
    assert bool((got[name] > 0).all())


def test_cli_flags_reach_the_options_and_the_plan_is_no_flag():
    from tritonq.cli import build_parser
    from tritonq.commands import method_options_from_args
    from tritonq.engine.methods.registry import make_method

    args = build_parser().parse_args(["quantize", "--method", "auto", "--output", "/tmp/x", "--avg-bits", "3.25",
                                      "--candidates", "rtn:4,gptq:3", "--scoring", "absolute"])
    opts = make_method("auto", method_options_from_args(args)).options
    assert (opts.avg_bits, opts.candidates, opts.scoring, opts.plan) == (3.25, "rtn:4,gptq:3", "absolute", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--method", "auto", "--output", "/tmp/x", "--plan", "{}"])


def test_auto_choice_replays_through_recipe(tmp_path):
    """``--recipe OUT/quantization.json`` replays an auto run's choice: the same weights, byte for byte."""
    import hashlib

    from test_pipeline import make_family_model
    from tritonq.engine.api import QuantizeOptions, quantize

    model = make_family_model(tmp_path / "llama", "llama")
    common = dict(model=str(model), group_size=32, nsamples=4, seqlen=64, device="cpu", progress=False)
    quantize(QuantizeOptions(output=str(tmp_path / "auto"), method="auto", method_options={"avg_bits": 3.5}, **common))
    quantize(QuantizeOptions(output=str(tmp_path / "replay"), recipe=str(tmp_path / "auto" / "quantization.json"),
                             **common))
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in ("auto", "replay")]
    assert digest[0] == digest[1]
