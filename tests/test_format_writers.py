"""The writer interface: every format writes from memory, layer by layer, through one class per format.

``tritonq quantize --format F`` must write the model it holds (no fake checkpoint written and read back), and
what it writes must be the files ``tritonq pack`` writes from the same run's fake output, byte for byte.
Sharded writing (``shard_bytes``) must give the same tensors as one file, with a Hugging Face index.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_gguf import bpe_tokenizer, gguf_export_config
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.formats.registry import read_packed, save_packed
from tritonq.engine.formats.store import ShardedWriter, TensorStore
from tritonq.errors import TritonqError

from .helpers import make_fake_dir

PACKED_FORMATS = ["compressed-tensors", "gptq", "awq", "gguf"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (GGUF accepts it), saved as a float checkpoint."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("model") / "float"
    torch.manual_seed(7)
    LlamaForCausalLM(gguf_export_config()).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


def _quantize(model_dir: Path, out: Path, fmt: str, sym: bool = False) -> Path:
    quantize(QuantizeOptions(output=str(out), model=str(model_dir), method="rtn", bits=4, group_size=32, sym=sym,
                             out_format=fmt, device="cpu", progress=False))
    return out


def _guard_reads(monkeypatch, guarded: Path) -> list[str]:
    """Make every safetensors read of a path under ``guarded`` raise, and a fake output on disk unreadable."""
    import safetensors
    import safetensors.torch
    from tritonq.engine.formats import checkpoint, store

    opened: list[str] = []

    def guard(original):
        def wrapped(path, *args, **kwargs):
            if str(Path(path).resolve()).startswith(str(guarded.resolve())):
                opened.append(str(path))
                raise AssertionError(f"read back a file it wrote: {path}")
            return original(path, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(safetensors, "safe_open", guard(safetensors.safe_open))
    monkeypatch.setattr(safetensors.torch, "safe_open", guard(safetensors.torch.safe_open))
    monkeypatch.setattr(safetensors.torch, "load_file", guard(safetensors.torch.load_file))
    monkeypatch.setattr(store, "safe_open", guard(store.safe_open))

    def refuse(*args, **kwargs):
        opened.append("FakeDirectory")
        raise AssertionError("quantize read a fake output from disk")

    monkeypatch.setattr(checkpoint.FakeDirectory, "__init__", refuse)
    monkeypatch.setattr(store.TensorStore, "__init__", refuse)
    return opened


@pytest.mark.parametrize("fmt", PACKED_FORMATS)
def test_quantize_never_opens_a_file_it_wrote(model_dir, tmp_path, monkeypatch, fmt):
    guarded = tmp_path / "outs"
    guarded.mkdir()
    opened = _guard_reads(monkeypatch, guarded)
    out = _quantize(model_dir, guarded / fmt, fmt)
    assert opened == [] and (out / "quantization.json").is_file()
    monkeypatch.undo()
    if fmt == "gguf":
        assert (out / "model.gguf").stat().st_size > 0
    else:  # and what it wrote is a checkpoint tritonq reads back
        layers = {name for name, _, _ in read_packed(out)}
        assert len(layers) == 14


def test_the_guard_catches_a_read_back(tmp_path, monkeypatch):
    """The test above could not pass by accident: the old path (pack a fake output on disk) trips it."""
    src = make_fake_dir(tmp_path / "outs" / "fake")
    _guard_reads(monkeypatch, tmp_path / "outs")
    with pytest.raises(AssertionError, match="fake output from disk|read back"):
        save_packed(src, tmp_path / "outs" / "packed", "compressed-tensors")


@pytest.mark.parametrize("fmt", PACKED_FORMATS)
def test_quantize_from_memory_writes_what_pack_writes_from_disk(model_dir, tmp_path, fmt):
    sym = fmt == "gptq"  # gptq v1 cannot hold the asymmetric zero point 0
    direct = _quantize(model_dir, tmp_path / "direct", fmt, sym)
    fake = _quantize(model_dir, tmp_path / "fake", "fake", sym)
    packed = save_packed(fake, tmp_path / "packed", fmt)
    files = sorted(p.name for p in direct.iterdir())
    assert files == sorted(p.name for p in packed.iterdir())
    for name in files:
        a, b = (direct / name).read_bytes(), (packed / name).read_bytes()
        if name == "quantization.json":  # stage times and memory peaks differ between two runs
            a, b = ({k: v for k, v in json.loads(x).items() if k not in ("seconds", "memory")} for x in (a, b))
        assert a == b, name


def test_sharded_writer_splits_and_indexes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(int(s), generator=gen) for i, s in enumerate([100, 300, 50, 10, 400, 20])}
    # bytes 400, 1200, 200, 40, 1600, 80 at a 1000-byte limit: a shard closes before the tensor that would
    # overflow it, and tensors above the limit (t1, t4) sit alone
    writer = ShardedWriter(tmp_path, shard_bytes=1000)
    for key, t in tensors.items():
        writer.add(key, t)
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    shard_of = {k: int(v[6:11]) for k, v in index["weight_map"].items()}
    assert shard_of == {"t0": 1, "t1": 2, "t2": 3, "t3": 3, "t4": 4, "t5": 5}
    assert [sorted(load_file(str(f))) for f in files] == [["t0"], ["t1"], ["t2", "t3"], ["t4"], ["t5"]]
    store = TensorStore(tmp_path)
    for key, t in tensors.items():
        assert torch.equal(store.get(key), t), key
    again = ShardedWriter(tmp_path / "again", 10)
    again.add("a", torch.ones(1))
    with pytest.raises(TritonqError, match="written twice"):
        again.add("a", torch.ones(1))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq_v2", "awq", "fake"])
def test_sharded_output_holds_the_same_tensors(tmp_path, fmt):
    src = make_fake_dir(tmp_path / "src", sym=False)
    if fmt == "fake":  # the fake writer takes the same limit
        from tritonq.engine.formats.checkpoint import FakeDirectory
        from tritonq.engine.formats.registry import FORMATS

        out = tmp_path / "sharded"
        out.mkdir()
        FORMATS["fake"].write(FakeDirectory(src), out, shard_bytes=20_000)
        one = load_file(str(src / "model.safetensors"))
    else:
        out = save_packed(src, tmp_path / "sharded", fmt, shard_bytes=20_000)
        one = load_file(str(save_packed(src, tmp_path / "one", fmt) / "model.safetensors"))
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    store = TensorStore(out)
    assert set(store.keys()) == set(one)
    for key, t in one.items():
        got = store.get(key)
        assert got.dtype == t.dtype and torch.equal(got, t), key
    if fmt != "fake":
        assert {n for n, _, _ in read_packed(out)} == {n for n, _, _ in read_packed(tmp_path / "one")}


def test_check_request_asks_the_format_class(model_dir):
    """The one preflight entry dispatches through the registry; each class refuses what it cannot hold."""
    from tritonq.engine.activations import ActSpec
    from tritonq.engine.formats.request import FormatRequest, check_request
    from tritonq.engine.grid import GridSpec
    from tritonq.engine.model_io import load_tokenizer, tokenizer_json

    config = json.loads((model_dir / "config.json").read_text())
    vocab = tokenizer_json(load_tokenizer(str(model_dir)))
    g32, g64 = GridSpec(4, 32, False), GridSpec(4, 64, False)
    mixed = {"model.layers.0.mlp.up_proj": g32, "model.layers.0.mlp.down_proj": GridSpec(8, 32, True)}

    def request(grids, act_order=None):
        return FormatRequest(grids, config, vocab, act_order, None)

    for fmt in ("fake", "compressed-tensors", "gptq_v2", "gguf"):
        check_request(fmt, request(mixed))  # every one of them holds 4-bit + symmetric 8-bit g32
    refusals = [
        ("gguf", request({"a": g32}, "dynamic"), "group act-order"),  # awq+gptq --act-order dynamic, in seconds
        ("gguf", request({"a": g64}), "group size 64"),
        ("gptq", request({"a": GridSpec(3, 32, False)}), "2, 4 or 8 bits"),
        ("awq", request(mixed), "one grid for the whole model"),
        ("awq", request({"a": GridSpec(3, 64, False)}), "4-bit grouped weights only"),  # gptq --bits 3 --format awq
        ("awq", request({"a": g32}, "dynamic"), "cannot store group act-order"),
        ("gguf", FormatRequest({"a": g32}, config, vocab, None, ActSpec(bits=8)), "no setting for activation"),
        ("zip", request({"a": g32}), "unknown --format 'zip'"),
    ]
    for fmt, req, message in refusals:
        with pytest.raises(TritonqError, match=message):
            check_request(fmt, req)
