"""Reading text corpora: `.txt`, `.jsonl` / `.jsonl.xz` (a "text" field per line), or a local `datasets` dataset."""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Iterator

import numpy as np


class CorpusError(ValueError):
    """A corpus path that is missing, of an unknown kind, or without text."""


def _open_text(path: Path):
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, encoding="utf-8")


def corpus_kind(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir():
        return "datasets"
    name = path.name
    if name.endswith((".jsonl", ".jsonl.xz", ".json")):
        return "jsonl"
    if name.endswith((".txt", ".raw", ".tokens", ".txt.xz")):
        return "txt"
    raise CorpusError(f"unknown corpus kind for {path}: expected .txt, .jsonl, .jsonl.xz or a datasets directory")


def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents in file order. A `.txt` file is one document."""
    path = Path(path)
    kind = corpus_kind(path)
    if kind == "txt":
        with _open_text(path) as f:
            yield f.read()
    elif kind == "jsonl":
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{line_no} is not JSON: {e}") from e
                if "text" not in record:
                    raise CorpusError(f"{path}:{line_no} has no \"text\" field")
                yield record["text"]
    else:
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
            yield record["text"]


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
        raise CorpusError(f"corpus {path} holds no documents")
    return np.concatenate(chunks)
