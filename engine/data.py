"""Calibration and evaluation text: the offline ``pydoc`` corpus, local ``.txt``/``.jsonl``/``.json``
files, and hub datasets by name (``wikitext2``, ``c4``, ``pileval``) through ``datasets``.

Protocols follow ``../shared/docs/awq_family.md`` §10: calibration draws ``nsamples`` random windows
of ``seqlen`` tokens with our own seeded generator (the global RNG is never touched); perplexity uses
non-overlapping windows of the whole tokenised text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TritonqError

HUB_DATASETS = ("wikitext2", "c4", "pileval")


@dataclass(frozen=True)
class Corpus:
    text: str
    source: str  # name or resolved path
    sha256: str


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pydoc_corpus() -> str:
    """The language-reference topics every CPython ships, in sorted key order, blank-line separated."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _read_file(path: Path, text_column: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TritonqError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or text_column not in row:
                    raise TritonqError(f"{path}:{lineno} has no field {text_column!r}; pass --text-column")
                docs.append(str(row[text_column]))
        return "\n\n".join(docs)
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise TritonqError(f"{path} must hold a JSON list of strings or objects")
        return "\n\n".join(r if isinstance(r, str) else str(r[text_column]) for r in rows)
    return path.read_text(encoding="utf-8")


def _load_hub(name: str, split: str) -> str:
    try:
        import datasets

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "c4":
            shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                     else "en/c4-validation.00000-of-00008.json.gz")
            ds = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
            return "\n\n".join(ds["text"][:1100] if split != "train" else ds["text"][:5000])
        ds = datasets.load_dataset("mit-han-lab/pile-val-backup", split="validation")
        return "\n\n".join(ds["text"][:2000])
    except Exception as exc:  # noqa: BLE001 - offline, missing config, network: one clear message
        raise TritonqError(
            f"could not load the hub dataset {name!r} ({type(exc).__name__}); offline, pass a local file "
            "instead, e.g. --calib pydoc or a .txt/.jsonl path, or --data ../shared/data/wikitext2_test.txt"
        ) from None


def load_corpus(name: str, text_column: str = "text", split: str = "train") -> Corpus:
    """Resolve ``name``: ``pydoc``, a hub name, or a local file."""
    if name == "pydoc":
        text = pydoc_corpus()
        return Corpus(text, "pydoc", _sha(text))
    if name in HUB_DATASETS:
        text = _load_hub(name, split)
        return Corpus(text, f"hub:{name}/{split}", _sha(text))
    path = Path(name).expanduser()
    if not path.is_file():
        raise TritonqError(
            f"data file {name!r} not found; give an existing .txt/.jsonl/.json path, 'pydoc', "
            f"or a hub name ({', '.join(HUB_DATASETS)})"
        )
    text = _read_file(path, text_column)
    if not text.strip():
        raise TritonqError(f"data file {path} holds no text")
    return Corpus(text, str(path.resolve()), _sha(text))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, T] of the whole text (one BOS at most, as the tokenizer adds it)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """``nsamples`` random windows [nsamples, seqlen] drawn with a private generator seeded by ``seed``."""
    if nsamples < 1 or seqlen < 1:
        raise TritonqError(f"--nsamples and --seqlen must be positive, got {nsamples} and {seqlen}")
    total = ids.shape[1]
    if total < nsamples * seqlen:
        raise TritonqError(
            f"calibration data {source} has {total} tokens, fewer than --nsamples {nsamples} x --seqlen {seqlen}"
            f" = {nsamples * seqlen}; lower --nsamples/--seqlen or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[0, s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, source: str) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] (tail dropped), the first ``max_windows`` of them."""
    n = ids.shape[1] // seqlen
    if n == 0:
        raise TritonqError(f"evaluation data {source} has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise TritonqError(f"--max-windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    return ids[0, : n * seqlen].reshape(n, seqlen)
