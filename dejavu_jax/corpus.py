"""Reading text corpora: `.txt`, `.jsonl` / `.jsonl.xz` (a "text" field per line), or a local `datasets` dataset.

A document whose text is empty or only whitespace is skipped: it would add nothing but a BOS token to the stream.
A file that cannot be read whole (a truncated or corrupt `.xz`, bytes that are not UTF-8) raises `CorpusError`
naming the file, at the point where reading reaches the damage.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Iterator

import numpy as np

XZ_MAGIC = b"\xfd7zXZ\x00"


class CorpusError(ValueError):
    """A corpus path that is missing, of an unknown kind, unreadable (truncated, corrupt), or without text."""


def _open_text(path: Path):
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, encoding="utf-8")


def _unreadable(path: Path, error: Exception) -> CorpusError:
    if isinstance(error, UnicodeDecodeError):
        return CorpusError(f"corpus {path} is not UTF-8 text ({error}); re-encode it as UTF-8")
    return CorpusError(
        f"corpus {path} is truncated or corrupt ({error}); check it with `xz -t {path}` and copy or download it again"
    )


def corpus_kind(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir():
        return "datasets"
    name = path.name
    if name.endswith((".jsonl", ".jsonl.xz", ".json")):
        kind = "jsonl"
    elif name.endswith((".txt", ".raw", ".tokens", ".txt.xz")):
        kind = "txt"
    else:
        raise CorpusError(f"unknown corpus kind for {path}: expected .txt, .jsonl, .jsonl.xz or a datasets directory")
    if name.endswith(".xz"):  # cheap: a file that is not xz at all fails here, before any model is loaded
        with open(path, "rb") as f:
            if f.read(len(XZ_MAGIC)) != XZ_MAGIC:
                raise CorpusError(
                    f"corpus {path} is not xz-compressed (no xz header); if it is plain text, "
                    f"drop the .xz suffix, else copy or download it again"
                )
    return kind


def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents in file order, those without text skipped. A `.txt` file is one document."""
    path = Path(path)
    kind = corpus_kind(path)
    for text in _dataset_texts(path) if kind == "datasets" else _file_texts(path, kind):
        if text.strip():
            yield text


def _file_texts(path: Path, kind: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            if kind == "txt":
                yield f.read()
                return
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{line_no} is not JSON: {e}") from e
                if not isinstance(record, dict) or "text" not in record:
                    raise CorpusError(f'{path}:{line_no} has no "text" field')
                if not isinstance(record["text"], str):
                    raise CorpusError(f'{path}:{line_no}: "text" is not a string (got {type(record["text"]).__name__})')
                yield record["text"]
    except (EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from e


def _dataset_texts(path: Path) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CorpusError(f"{path} is not a dataset saved with datasets.save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {path} has no 'text' column (columns: {ds.column_names})")
    for record in ds:
        yield record["text"] or ""


def token_stream(tokenizer, path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Every document tokenized with BOS and concatenated in order (stops early once `max_tokens` are read)."""
    chunks, total = [], 0
    for text in iter_documents(path):
        ids = tokenizer(text, verbose=False)["input_ids"]
        chunks.append(np.asarray(ids, np.int32))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not chunks:
        raise CorpusError(f"corpus {path} holds no documents with text")
    return np.concatenate(chunks)
