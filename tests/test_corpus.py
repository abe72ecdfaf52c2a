"""The corpus reader on damaged and empty input: one `CorpusError` naming the file, never an lzma/EOF traceback."""

import json
import lzma

import numpy as np
import pytest

from dejavu_jax.corpus import CorpusError, corpus_kind, iter_documents, token_stream


def synthetic_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of random words (seeded): incompressible enough that a cut in the .xz lands mid-stream."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(500)]
    return [" ".join(rng.choice(words, size=rng.integers(40, 80))) + "." for _ in range(n_docs)]


def write_jsonl_xz(path, texts) -> bytes:
    blob = lzma.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    path.write_bytes(blob)
    return blob


def damage(path, how: str) -> None:
    """Truncate `path` (an .xz file) at 60% of its bytes, or flip 64 bytes there ("corrupt")."""
    blob = bytearray(path.read_bytes())
    cut = int(len(blob) * 0.6)
    if how == "truncated":
        del blob[cut:]
    else:
        blob[cut : cut + 64] = bytes(b ^ 0xFF for b in blob[cut : cut + 64])
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how, cause", [("truncated", "Compressed file ended"), ("corrupt", "Corrupt input data")])
def test_damaged_xz_is_a_corpus_error_after_the_readable_documents(tmp_path, how, cause):
    texts = synthetic_texts(200)
    path = tmp_path / "docs.jsonl.xz"
    write_jsonl_xz(path, texts)
    damage(path, how)
    read = []
    with pytest.raises(CorpusError) as error:
        for text in iter_documents(path):  # a loop, not list(): keep what was read before the error
            read.append(text)  # noqa: PERF402
    message = str(error.value)
    assert str(path) in message and "truncated or corrupt" in message and cause in message
    assert f"xz -t {path}" in message  # says what to do
    assert 0 < len(read) < len(texts) and read == texts[: len(read)]  # the documents before the damage, intact


def test_a_file_that_is_not_xz_fails_on_the_kind_check(tmp_path):
    """corpus_kind (what the CLIs call before loading a model) reads the header, not the whole file."""
    path = tmp_path / "plain.jsonl.xz"
    path.write_text(json.dumps({"text": "not compressed"}) + "\n")
    with pytest.raises(CorpusError, match="is not xz-compressed"):
        corpus_kind(path)
    (tmp_path / "empty.txt.xz").write_bytes(b"")
    with pytest.raises(CorpusError, match="is not xz-compressed"):
        corpus_kind(tmp_path / "empty.txt.xz")


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "caf"}).encode()[:-2] + b'\xe9"}\n')
    with pytest.raises(CorpusError, match=r"latin1.jsonl is not UTF-8 text.*re-encode"):
        list(iter_documents(path))


def test_text_that_is_not_a_string(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(CorpusError, match=r"x.jsonl:2: \"text\" is not a string"):
        list(iter_documents(path))


def test_documents_without_text_are_skipped(tmp_path):
    path = tmp_path / "some-empty.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "first", " \n\t", "second"]))
    assert list(iter_documents(path)) == ["first", "second"]
    (tmp_path / "empty.txt").write_text("")
    assert list(iter_documents(tmp_path / "empty.txt")) == []
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    assert list(iter_documents(tmp_path / "blank.txt")) == []


@pytest.mark.parametrize("content", ["", json.dumps({"text": ""}) + "\n", "\n\n"])
def test_an_empty_corpus_holds_no_tokens(tmp_path, content):
    """Not a stream of lone BOS tokens: an error that says the corpus is empty."""
    path = tmp_path / "empty.jsonl"
    path.write_text(content)

    def tokenizer(text, verbose=False):
        return {"input_ids": [2] + [3] * len(text.split())}

    with pytest.raises(CorpusError, match="holds no documents with text"):
        token_stream(tokenizer, path)
    path.write_text(content + json.dumps({"text": "two words"}) + "\n")
    np.testing.assert_array_equal(token_stream(tokenizer, path), [2, 3, 3])
