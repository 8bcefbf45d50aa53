"""Issue 20: nothing lost, no tracebacks, clear messages (items 2-7, 10, 11).

Each case checks the exit status, one ``tritonq: error:`` line naming the problem and the fix, no traceback,
nothing left behind, and, where it matters, that the refusal comes before the model is loaded (the
``no_model_load`` fixture fails the test if weights are read) or before the calibration text is tokenized.
One file for the issue's cases (a little over 400 lines), so that its list reads against the issue in one place.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import make_fake_dir
from tritonq.cli import main
from tritonq.engine import outputs
from tritonq.errors import TritonqError


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("Nothing lost, nothing wasted. " * 300, encoding="utf-8")
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test (``pytest.fail`` is a BaseException: no loader's ``except`` hides it)."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the bad input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Tokenizing the calibration or evaluation text fails the test."""
    from tritonq.engine import api

    def refuse(*args, **kwargs):
        pytest.fail("the text was tokenized before the bad input was refused")

    monkeypatch.setattr(api, "tokenize", refuse)


def _run(argv, capsys) -> tuple[int, list[str], float]:
    t0 = time.perf_counter()
    rc = main([str(a) for a in argv])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.strip().splitlines() if line.startswith("tritonq:")], seconds


def _error(argv, capsys, *needles: str) -> str:
    """Run ``argv``; it must exit 2 with exactly one error line holding every needle. Returns that line."""
    rc, lines, _ = _run(argv, capsys)
    errors = [line for line in lines if line.startswith("tritonq: error: ")]
    assert rc == 2 and len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _quantize(model, calib, out, *extra):
    return ["quantize", "--model", model, "--calib", calib, "--nsamples", "4", "--seqlen", "64", "--group-size", "32",
            "--device", "cpu", "--no-progress", "--output", out, *extra]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------------
# item 2: an unwritable output is refused before any work


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        os.rmdir(tempfile.mkdtemp(dir=ro))
    except OSError:
        return ro
    ro.chmod(0o755)
    pytest.skip("this user (root) writes into a 0o555 directory anyway")


def _unwritable_mount() -> Path:
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("/sys is writable here")


@pytest.mark.parametrize("where", ["read_only_parent", "nested_under_read_only", "read_only_mount"])
def test_unwritable_output_is_refused_before_work(where, tiny_dir, calib, tmp_path, capsys, no_model_load):
    if where == "read_only_mount":
        base = _unwritable_mount()
        out = base / "tritonq-out" / "model"
    else:
        base = _read_only_dir(tmp_path)
        out = base / "out" if where == "read_only_parent" else base / "a" / "b" / "out"
    try:
        _error(_quantize(tiny_dir, calib, out), capsys, f"cannot write the output {out}", f"{base} is not writable",
               "choose another --output")
        assert _listing(base) == [] if base != Path("/sys") else not (base / "tritonq-out").exists()
    finally:
        if base != Path("/sys"):
            base.chmod(0o755)


def test_pack_into_an_unwritable_output_is_refused_before_packing(tmp_path, capsys, monkeypatch):
    from tritonq.engine.formats import registry

    src = make_fake_dir(tmp_path / "src")
    monkeypatch.setattr(registry, "save_packed", lambda *a, **k: pytest.fail("packed before the output check"))
    out = _unwritable_mount() / "tritonq-out" / "packed"
    _error(["pack", src, "--format", "gptq", "--output", out], capsys, "cannot write the output", "is not writable")


def test_writable_probe_leaves_nothing(tmp_path):
    outputs.check_output_dir(tmp_path / "new" / "deeper" / "out", overwrite=False)
    assert _listing(tmp_path) == []  # neither the probe nor the missing parents


# ---------------------------------------------------------------------------------------------------
# item 3: --overwrite replaces only what tritonq wrote


def test_overwrite_refuses_a_foreign_directory(tiny_dir, calib, tmp_path, capsys, no_model_load):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("\\documentclass{article} years of work")
    _error(_quantize(tiny_dir, calib, out, "--overwrite"), capsys, f"{out} is not one", "thesis.tex",
           "move its files away or choose another --output")
    assert (out / "thesis.tex").read_text().endswith("years of work")
    assert _listing(tmp_path) == ["thesis", "thesis/thesis.tex"]


def test_overwrite_replaces_a_tritonq_output_or_an_empty_directory(tiny_dir, calib, tmp_path, capsys):
    empty, ours = tmp_path / "empty", tmp_path / "ours"
    empty.mkdir()
    for out in (empty, ours, ours):  # the second run into `ours` replaces the first
        rc, lines, _ = _run(_quantize(tiny_dir, calib, out, "--method", "rtn", "--overwrite"), capsys)
        assert rc == 0, lines
        assert json.loads((out / "quantization.json").read_text())["method"] == "rtn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours"]  # no temporary left


def test_what_counts_as_a_tritonq_output(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "quantization.json").write_text(json.dumps({"method": "gptq"}))  # another tool's file of that name
    assert not outputs.is_tritonq_output(meta)
    (meta / "quantization.json").write_text(json.dumps({"method": "gptq", "tritonq_version": "0.1"}))
    assert outputs.is_tritonq_output(meta)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert not outputs.is_tritonq_output(cfg)
    (cfg / "config.json").write_text(json.dumps({"quantization_config": {"meta": {"quantizer": ["tritonq:0.1"]}}}))
    assert outputs.is_tritonq_output(cfg)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model.gguf").write_bytes(b"GGUF" + os.urandom(3 * 2**20))
    assert not outputs.is_tritonq_output(gguf)
    # the key straddles a 1 MiB read boundary
    (gguf / "model.gguf").write_bytes(b"GGUF" + b"\0" * (2**20 - 8) + outputs.GGUF_MARKER + os.urandom(100))
    assert outputs.is_tritonq_output(gguf)


# ---------------------------------------------------------------------------------------------------
# item 4: SIGTERM during the save, and the debris of killed runs

_KILLED_DURING_SAVE = """
import os, signal, sys, time
from tritonq.engine.formats import fake
from tritonq.cli import main

def save_then_die(path, checkpoint):
    open(os.path.join(os.path.dirname(path), "partial.bin"), "wb").write(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

fake.write_quant_params = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_save_removes_the_temporary_directory(tiny_dir, calib, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, *map(str, _quantize(tiny_dir, calib, out))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert time.perf_counter() - t0 < 25, "the process slept through SIGTERM"
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "tritonq: terminated (SIGTERM)" and "Traceback" not in proc.stderr
    # the half-written output is gone; the finished blocks stay in the work directory for --resume
    assert {p.split("/")[0] for p in _listing(tmp_path)} == {"out.tritonq-work"}
    assert (tmp_path / "out.tritonq-work" / "progress.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_runs_are_removed(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}-abc123"
    (stale / "_fake").mkdir(parents=True)
    (stale / "_fake" / "model.safetensors").write_bytes(b"\0" * 2**20)
    live = tmp_path / f".out.tmp-{os.getppid()}-def456"  # a run that still goes on (our parent process)
    live.mkdir()
    other = tmp_path / ".other.tmp-1-xyz"  # another output's
    other.mkdir()
    rc, lines, _ = _run(_quantize(tiny_dir, calib, out, "--method", "rtn"), capsys)
    assert rc == 0
    assert lines == [f"tritonq: warning: removed {stale} (1.0 MiB), left by an earlier run into out that was "
                     "killed"], lines
    assert not stale.exists() and live.is_dir() and other.is_dir() and (out / "quantization.json").is_file()


def test_a_previous_output_moved_aside_is_put_back(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()
    (old / "quantization.json").write_text("{}")
    with pytest.warns(UserWarning, match="restored the previous output"):
        outputs.remove_stale_temporaries(out)
    assert (out / "quantization.json").is_file() and not old.exists()


_SIGTERM_BETWEEN_RENAMES = """
import json, os, signal, sys
from pathlib import Path
from tritonq.engine import outputs

out = Path(sys.argv[1])
real_replace, calls = os.replace, []

def replace(a, b):
    calls.append(b)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives after the first rename
    real_replace(a, b)

os.replace = replace
try:
    with outputs.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "quantization.json").write_text(json.dumps({"tritonq_version": "new"}))
except KeyboardInterrupt:
    sys.exit(10 + len(calls))
"""


def test_the_save_itself_survives_sigterm_in_its_renames(tmp_path):
    """Between the two renames SIGTERM waits: the output is the old one or the new one, never gone (a
    subprocess, so that a SIGTERM without its handler cannot end the test run)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "quantization.json").write_text(json.dumps({"tritonq_version": "old"}))
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_BETWEEN_RENAMES, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 12, proc.stderr  # interrupted, after both renames
    assert json.loads((out / "quantization.json").read_text())["tritonq_version"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------
# item 5: calibration files

CALIBRATION_FILES = {
    "json_rows_without_the_column": ("rows.json", json.dumps([{"body": "some text"}] * 3).encode(),
                                     ["row 0 has no field 'text' (its fields: body)", "pass --text-column"]),
    "invalid_json": ("broken.json", b'[{"text": "a"},', ["is not valid JSON", "line 1", "give a .txt file"]),
    "json_list_of_numbers": ("numbers.json", b"[1, 2, 3]", ["row 0 is a JSON int, not a string", "give rows"]),
    "json_object": ("object.json", b'{"text": "a"}', ["must hold a JSON list of strings or objects, not a JSON dict"]),
    "jsonl_without_the_column": ("rows.jsonl", b'{"body": "x"}\n', [":1 has no field 'text'", "--text-column"]),
    "not_utf8_text": ("latin1.txt", "caf\u00e9 cr\u00e8me ".encode("latin-1") * 50,
                      ["is not UTF-8 text (byte 0xe9 at offset 3)", "iconv -f latin1 -t utf-8"]),
    "not_utf8_jsonl": ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), ["is not UTF-8 text"]),
}


@pytest.mark.parametrize("case", list(CALIBRATION_FILES))
def test_bad_calibration_files(case, tiny_dir, tmp_path, capsys, monkeypatch, no_model_load):
    from tritonq.engine import api

    monkeypatch.setattr(api, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded before the file check"))
    name, data, needles = CALIBRATION_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    _error(_quantize(tiny_dir, path, tmp_path / "out"), capsys, str(path), *needles)
    assert not (tmp_path / "out").exists()


def test_good_json_calibration_rows_still_load(tmp_path):
    from tritonq.engine.data import load_corpus

    (tmp_path / "rows.json").write_text(json.dumps(["first", {"text": "second", "id": 2}]))
    assert load_corpus(str(tmp_path / "rows.json")).text == "first\n\nsecond"
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree")  # newlines as text mode reads them
    assert load_corpus(str(tmp_path / "crlf.txt")).text == "one\ntwo\nthree"


# ---------------------------------------------------------------------------------------------------
# item 6: window lengths


@pytest.mark.parametrize("seqlen", ["0", "-3", "1"])
def test_eval_seqlen_below_two(seqlen, tiny_dir, calib, capsys, no_model_load, no_tokenizing):
    _error(["eval", tiny_dir, "--data", calib, "--seqlen", seqlen, "--device", "cpu"], capsys,
           "--seqlen must be at least 2", f"got {seqlen}", "pass e.g. --seqlen 2048")


def test_seqlen_longer_than_the_context(tiny_dir, calib, tmp_path, capsys, no_model_load, no_tokenizing):
    fix = "the context of"
    _error(["eval", tiny_dir, "--data", calib, "--seqlen", "512", "--device", "cpu"], capsys,
           "--seqlen 512 is longer than", fix, "(256 tokens); pass --seqlen 256 or less")
    _error(_quantize(tiny_dir, calib, tmp_path / "out", "--seqlen", "300"), capsys,
           "--seqlen 300 is longer than", fix, "(256 tokens)")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# item 7: corrupt metadata


@pytest.fixture
def corrupt_config(tmp_path):
    path = make_fake_dir(tmp_path / "model")
    (path / "config.json").write_text('{"model_type": "llama", ')
    return path


def test_generate_on_an_invalid_config(corrupt_config, capsys, no_model_load):
    _error(["generate", corrupt_config, "--prompt", "hi", "--device", "cpu"], capsys,
           f"{corrupt_config / 'config.json'} is not valid JSON", "restore its config.json")


def test_bench_decode_on_an_invalid_config(corrupt_config, capsys, no_model_load):
    _error(["bench", "decode", corrupt_config, "--device", "cpu"], capsys,
           f"{corrupt_config / 'config.json'} is not valid JSON", "restore the checkpoint's config.json")


@pytest.mark.parametrize("content", ['{"method": "rtn",', "[1, 2]", "\"text\""])
def test_eval_and_report_on_a_corrupt_quantization_json(content, tmp_path, calib, capsys, no_model_load):
    out = make_fake_dir(tmp_path / "out")
    (out / "quantization.json").write_text(content)
    needles = ["is not valid JSON"] if content.startswith("{") else ["not an object"]
    for argv in (["eval", out, "--data", calib, "--seqlen", "128", "--device", "cpu"], ["report", out],
                 ["eval", out, "--data", calib, "--seqlen", "128", "--device", "cpu", "--record"]):
        _error(argv, capsys, str(out / "quantization.json"), *needles, "re-run 'tritonq quantize'")
    assert (out / "quantization.json").read_text() == content


def test_report_skips_wrongly_shaped_records(tmp_path, capsys):
    out = make_fake_dir(tmp_path / "out")
    meta = json.loads((out / "quantization.json").read_text())
    meta.update(evaluations=[1], seconds="fast", activations="A8")
    (out / "quantization.json").write_text(json.dumps(meta))
    rc, lines, _ = _run(["report", out], capsys)
    assert rc == 0 and lines == []


# ---------------------------------------------------------------------------------------------------
# item 10: messages


def test_eval_windows_flags(tiny_dir, calib, tmp_path, capsys, no_model_load, no_tokenizing):
    line = _error(_quantize(tiny_dir, calib, tmp_path / "o", "--eval-data", calib, "--eval-windows", "0"), capsys,
                  "--eval-windows must be at least 1, got 0")
    assert "--max-windows" not in line
    _error(_quantize(tiny_dir, calib, tmp_path / "o", "--eval-windows", "2"), capsys,
           "--eval-windows applies to the evaluation after quantizing; add --eval-data FILE or drop --eval-windows")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(("flag", "value"), [("--nsamples", "0"), ("--seqlen", "0"), ("--nsamples", "-1"),
                                             ("--calib-batch", "0")])
def test_counts_are_checked_before_tokenizing(flag, value, tiny_dir, calib, tmp_path, capsys, monkeypatch,
                                              no_model_load):
    from tritonq.engine import api

    monkeypatch.setattr(api, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    _error(_quantize(tiny_dir, calib, tmp_path / "o", flag, value), capsys, f"{flag} must be at least 1, got {value}")


def test_a_relative_path_typo_is_a_path_error(tmp_path, calib, capsys, monkeypatch, no_model_load):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    _error(_quantize("models/nope", calib, tmp_path / "o"), capsys,
           "model path 'models/nope' does not exist (the local folder models has no 'nope')")


def test_a_missing_tokenizer_is_named(tiny_dir, calib, tmp_path, capsys, no_model_load):
    import shutil

    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_dir, model)
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    line = _error(_quantize(model, calib, tmp_path / "o"), capsys, f"model directory '{model}' has no tokenizer",
                  "save the base model's tokenizer into it")
    assert "Couldn't instantiate" not in line


# ---------------------------------------------------------------------------------------------------
# item 11: a relative --config for bench decode


def test_bench_decode_config_is_resolved(tmp_path, monkeypatch):
    import argparse

    from tritonq.bench.decode import _source

    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "models" / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(model=None, random_llama=False, config="models/llama/config.json", layers=1, runs=1,
                              prompt_tokens=4, max_new_tokens=2)
    assert _source(args)["config"] == str(tmp_path / "models" / "llama" / "config.json")
    (tmp_path / "models" / "llama" / "config.json").write_text("[]")
    with pytest.raises(TritonqError, match="holds a JSON list, not an object"):
        _source(args)
