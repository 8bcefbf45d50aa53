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


def _read_text(path: Path) -> str:
    """The file as UTF-8; other encodings are refused with the offset of the first bad byte (no guessed
    fallback: a wrong guess would calibrate on garbled text without a word). Newlines as ``open`` reads text:
    ``\\r\\n`` and ``\\r`` become ``\\n``."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise TritonqError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
        ) from None


def _row_text(row: object, text_column: str, where: str) -> str:
    """The text of one JSON row: a string, or an object's ``text_column`` string."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if text_column not in row:
            keys = ", ".join(list(row)[:5]) or "none"
            raise TritonqError(f"{where} has no field {text_column!r} (its fields: {keys}); pass --text-column")
        return str(row[text_column])
    raise TritonqError(f"{where} is a JSON {type(row).__name__}, not a string or an object with a "
                       f"{text_column!r} field; give rows of text")


def _read_file(path: Path, text_column: str) -> str:
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TritonqError(f"{path}:{lineno} is not valid JSON ({exc.msg}); give one JSON object per "
                                   "line") from None
            docs.append(_row_text(row, text_column, f"{path}:{lineno}"))
        return "\n\n".join(docs)
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TritonqError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); "
                               "fix it, or give a .txt file") from None
        if not isinstance(rows, list):
            raise TritonqError(f"{path} must hold a JSON list of strings or objects, not a JSON "
                               f"{type(rows).__name__}")
        return "\n\n".join(_row_text(r, text_column, f"{path} row {i}") for i, r in enumerate(rows))
    return text


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


def check_data_name(name: str) -> None:
    """Refuse a data name that :func:`load_corpus` cannot resolve, without reading anything (a preflight check)."""
    if name == "pydoc" or name in HUB_DATASETS:
        return
    if not Path(name).expanduser().is_file():
        raise TritonqError(
            f"data file {name!r} not found; give an existing .txt/.jsonl/.json path, 'pydoc', "
            f"or a hub name ({', '.join(HUB_DATASETS)})"
        )


def check_data(name: str, text_column: str = "text") -> None:
    """Refuse data that :func:`load_corpus` would refuse, before the tokenizer or the model loads: a local file
    is read and parsed (and dropped: it is read again later); ``pydoc`` and hub names pass unread."""
    check_data_name(name)
    if name == "pydoc" or name in HUB_DATASETS:
        return
    path = Path(name).expanduser()
    if not _read_file(path, text_column).strip():
        raise TritonqError(f"data file {path} holds no text")


def load_corpus(name: str, text_column: str = "text", split: str = "train") -> Corpus:
    """Resolve ``name``: ``pydoc``, a hub name, or a local file."""
    if name == "pydoc":
        text = pydoc_corpus()
        return Corpus(text, "pydoc", _sha(text))
    if name in HUB_DATASETS:
        text = _load_hub(name, split)
        return Corpus(text, f"hub:{name}/{split}", _sha(text))
    check_data_name(name)
    path = Path(name).expanduser()
    text = _read_file(path, text_column)
    if not text.strip():
        raise TritonqError(f"data file {path} holds no text")
    return Corpus(text, str(path.resolve()), _sha(text))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, T] of the whole text (one BOS at most, as the tokenizer adds it)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids


def check_positive(value: int | None, flag: str, example: int) -> None:
    """Refuse a count that must be at least 1 (``None``: not given, allowed); call it before any tokenizing."""
    if value is not None and value < 1:
        raise TritonqError(f"{flag} must be at least 1, got {value}; pass e.g. {flag} {example}")


def check_eval_seqlen(seqlen: int, flag: str = "--seqlen") -> None:
    """A perplexity window needs two tokens at least: each position predicts the next one."""
    if seqlen < 2:
        raise TritonqError(f"{flag} must be at least 2 for perplexity (a window scores the tokens after its first), "
                           f"got {seqlen}; pass e.g. {flag} 2048")


def check_context(seqlen: int, context: int | None, flag: str, model: str) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``; None: unknown, allowed)."""
    if context is not None and seqlen > context:
        raise TritonqError(f"{flag} {seqlen} is longer than the context of {model} ({context} tokens); pass "
                           f"{flag} {context} or less")


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """``nsamples`` random windows [nsamples, seqlen] drawn with a private generator seeded by ``seed``."""
    check_positive(nsamples, "--nsamples", 128)
    check_positive(seqlen, "--seqlen", 512)
    total = ids.shape[1]
    if total < nsamples * seqlen:
        raise TritonqError(
            f"calibration data {source} has {total} tokens, fewer than --nsamples {nsamples} x --seqlen {seqlen}"
            f" = {nsamples * seqlen}; lower --nsamples/--seqlen or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[0, s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, source: str,
                       windows_flag: str = "--max-windows", seqlen_flag: str = "--seqlen") -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] (tail dropped), the first ``max_windows`` of them.

    ``windows_flag``/``seqlen_flag``: how the caller's user spells the two (``quantize`` says ``--eval-windows``)."""
    check_eval_seqlen(seqlen, seqlen_flag)
    check_positive(max_windows, windows_flag, 8)
    n = ids.shape[1] // seqlen
    if n == 0:
        raise TritonqError(f"evaluation data {source} has {ids.shape[1]} tokens, fewer than one window of {seqlen}; "
                           f"lower {seqlen_flag} or give more text")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[0, : n * seqlen].reshape(n, seqlen)
