"""`python -m eval ppl` against HF torch's perplexity under the same protocol."""

import json
import lzma
import math

import pytest
import torch

from conftest import SHARED
from test_corpus import damage, synthetic_texts, write_jsonl_xz
from eval.__main__ import main as eval_main

WIKITEXT = SHARED / "data" / "wikitext-2" / "wiki.test.raw"


def hf_perplexity(model_dir, token_ids, seq_len, windows):
    from transformers import OPTForCausalLM as HF

    hf = HF.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for w in range(windows):
        window = torch.tensor(token_ids[w * seq_len : (w + 1) * seq_len])[None]
        with torch.no_grad():
            loss = hf(input_ids=window, labels=window).loss.item()  # mean over tokens 2..L
        total += loss * (seq_len - 1)
        count += seq_len - 1
    return math.exp(total / count), count


def run_ppl(capsys, *argv):
    assert eval_main(["ppl", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ppl_matches_hf_on_txt(reference_model_dir, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    ids = tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"]
    assert ids[0] == 2
    expected, count = hf_perplexity(reference_model_dir, ids, 256, 6)
    got = run_ppl(
        capsys, "--model", str(reference_model_dir), "--data", str(WIKITEXT), "--seq-len", "256", "--max-windows", "6"
    )
    assert got["tokens"] == count
    assert abs(got["ppl"] - expected) / expected <= 1e-3


def test_ppl_on_jsonl_xz_tokenizes_each_line_with_bos(reference_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    with lzma.open(SHARED / "data" / "wiki2015" / "validation.jsonl.xz", "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(3)]
    ids = [i for t in texts for i in tok(t)["input_ids"]]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": n, "text": t}) + "\n" for n, t in enumerate(texts)))
    windows = min(4, len(ids) // 128)
    expected, _ = hf_perplexity(reference_model_dir, ids, 128, windows)
    got = run_ppl(
        capsys,
        "--model",
        str(reference_model_dir),
        "--data",
        str(data),
        "--seq-len",
        "128",
        "--max-windows",
        str(windows),
    )
    assert abs(got["ppl"] - expected) / expected <= 1e-3


def _damaged_corpus(directory, how):
    path = directory / f"{how}.jsonl.xz"
    write_jsonl_xz(path, synthetic_texts(200))
    damage(path, how)
    return path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: (p / "x.jsonl").write_text('{"title": "no text"}\n') and p / "x.jsonl", 'no "text" field'),
        (lambda p: (p / "short.txt").write_text("too short") and p / "short.txt", "fewer than one window"),
        (lambda p: (p / "empty.txt").write_text("") or p / "empty.txt", "holds no documents with text"),
        (lambda p: _damaged_corpus(p, "truncated"), "is truncated or corrupt (Compressed file ended"),
        (lambda p: _damaged_corpus(p, "corrupt"), "is truncated or corrupt (Corrupt input data)"),
    ],
)
def test_ppl_bad_data(reference_model_dir, tmp_path, capsys, setup, message):
    data = setup(tmp_path)
    assert eval_main(["ppl", "--model", str(reference_model_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (lambda p: p / "missing.jsonl", [], "does not exist"),
        (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", [], "unknown corpus kind"),
        (lambda p: (p / "x.jsonl.xz").write_text('{"text": "plain"}\n') and p / "x.jsonl.xz", [], "not xz-compressed"),
        (lambda p: WIKITEXT, ["--seq-len", "1"], "--seq-len must be at least 2"),
        (lambda p: WIKITEXT, ["--max-windows", "0"], "--max-windows must be >= 1"),
    ],
)
def test_ppl_cheap_checks_come_before_loading_the_model(tmp_path, capsys, monkeypatch, setup, extra, message):
    import dejavu_jax.checkpoint

    monkeypatch.setattr(dejavu_jax.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    data = setup(tmp_path)
    assert eval_main(["ppl", "--model", "any", "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
