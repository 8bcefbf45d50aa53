"""The streaming ``ShardedWriter``: files byte-identical to ``safetensors.torch.save_file``, memory bounded.

Each tensor goes to disk when it is added and the shard is assembled from a data file at the end, so the
header (dtype order, offsets, padding, metadata) must be rebuilt exactly as the library writes it.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from tritonq.engine.formats import store
from tritonq.engine.formats.store import ShardedWriter, TensorStore

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.uint8, torch.int64, torch.bool,
          torch.int8, torch.int16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
          torch.uint32, torch.uint64, torch.complex64]


def _random_tensor(gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    ndim = int(torch.randint(0, 4, (1,), generator=gen))
    shape = [int(s) for s in torch.randint(0, 6, (ndim,), generator=gen)]  # 0-size and scalar tensors too
    bits = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), generator=gen,
                         dtype=torch.uint8)
    if dtype == torch.bool:
        return (bits[:torch.Size(shape).numel()] % 2).bool().reshape(shape)
    return bits[:torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)


def _random_dict(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(int(torch.randint(1, 14, (1,), generator=gen))):
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=gen))]
        name = ["w", "a.b", "model.layers.3.x", "Z", "é/q\"", "t"][i % 6] + str(int(torch.randint(0, 99, (1,),
                                                                                              generator=gen)))
        out[name] = _random_tensor(gen, dtype)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_one_file_is_byte_identical_to_save_file(tmp_path, seed):
    tensors = _random_dict(seed)
    metadata = [None, {"format": "pt"}, {}, {"a": "x\n\u00e9\u0001"}][seed % 4]
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, metadata=metadata)
    if metadata is None:  # the writer's own default is {"format": "pt"}; None means "no metadata" here
        writer.metadata = None
    writer.update(tensors)
    assert writer.close() == [out / "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # no data file left behind


def test_several_metadata_keys_are_written_sorted(tmp_path):
    """save_file orders several metadata keys as a Rust HashMap iterates (it varies from run to run); the
    writer sorts them, so its files are reproducible, and they read back the same."""
    metadata = {"b": "2", "a": "1", "c": "3"}
    tensors = {"w": torch.randn(3, 2), "q": torch.arange(4, dtype=torch.int32)}
    writer = ShardedWriter(tmp_path, metadata=metadata)
    writer.update(tensors)
    (path,) = writer.close()
    raw = path.read_bytes()
    header = raw[8:8 + int.from_bytes(raw[:8], "little")]
    assert header.startswith(b'{"__metadata__":{"a":"1","b":"2","c":"3"},')
    save_file(tensors, str(tmp_path / "ref"), metadata=metadata)
    ref = (tmp_path / "ref").read_bytes()
    assert raw[8 + len(header):] == ref[8 + len(header):] and json.loads(header) == json.loads(ref[8:8 + len(header)])


def test_small_copy_chunks_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "COPY_CHUNK", 7)  # a tensor crosses many chunks, and chunks cross tensors
    gen = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(33, generator=gen), "b": torch.randn(5, 3, generator=gen).bfloat16(),
               "c": torch.randint(0, 9, (17,), generator=gen, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = ShardedWriter(tmp_path / "out")
    (tmp_path / "out").mkdir()
    writer.update(tensors)
    writer.close()
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_shards_match_save_file_of_their_tensors(tmp_path):
    gen = torch.Generator().manual_seed(11)
    tensors = {f"m.{i}": torch.randn(int(s), generator=gen).to([torch.float32, torch.bfloat16][i % 2])
               for i, s in enumerate(torch.randint(10, 300, (9,), generator=gen))}
    writer = ShardedWriter(tmp_path, shard_bytes=700)
    writer.update(tensors)
    files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for f in files:
        keys = [k for k, v in index["weight_map"].items() if v == f.name]
        save_file({k: tensors[k] for k in keys}, str(tmp_path / "ref"), metadata={"format": "pt"})
        assert f.read_bytes() == (tmp_path / "ref").read_bytes(), f.name
    store_ = TensorStore(tmp_path)
    for key, t in tensors.items():
        assert torch.equal(store_.get(key), t), key
    assert not list(tmp_path.glob(".*.data"))


def test_unknown_dtype_falls_back_to_the_library(tmp_path, monkeypatch):
    monkeypatch.delitem(store._SAFETENSORS_DTYPE, torch.int16)
    tensors = {"a": torch.arange(6, dtype=torch.int16).reshape(2, 3), "b": torch.randn(4)}
    save_file(tensors, str(tmp_path / "ref"), metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    writer = ShardedWriter(tmp_path / "out")
    writer.update(tensors)
    writer.close()
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref").read_bytes()


def test_writer_keeps_no_tensor(tmp_path):
    """Nothing added is retained: each tensor is freed once the caller drops it, before close()."""
    writer = ShardedWriter(tmp_path, shard_bytes=1 << 20)
    refs = []
    for i in range(6):
        t = torch.randn(64, 1024)  # 256 KiB each: several shards
        refs.append(weakref.ref(t))
        writer.add(f"t{i}", t)
        del t
        gc.collect()
        assert refs[-1]() is None, "the writer kept a reference to the tensor"
    files = writer.close()
    assert len(files) == 2
    assert load_file(str(files[0]))["t0"].shape == (64, 1024)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("seed", range(8))
def test_read_tensor_matches_the_library_whole_and_by_rows(tmp_path, seed):
    from tritonq.engine.formats.store import read_header, read_tensor

    tensors = _random_dict(100 + seed)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    for key, t in tensors.items():
        got = read_tensor(path, key, header)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_raw(got), _raw(t))
        if t.dim() >= 1:
            for rows in (slice(0, 1), slice(1, 3), slice(2, None), slice(0, t.shape[0])):
                part = read_tensor(path, key, rows=rows)
                assert part.shape == t[rows].shape and torch.equal(_raw(part), _raw(t[rows])), (key, rows)
    with pytest.raises(store.TritonqError, match="holds no tensor"):
        read_tensor(path, "nope", header)
