"""`python -m eval ppl` against HF torch's perplexity under the same protocol."""

import json
import lzma
import math

import pytest
import torch

from conftest import SHARED
from eval.__main__ import main as eval_main

WIKITEXT = SHARED / "data" / "wikitext-2" / "wiki.test.raw"


def hf_perplexity(model_dir, token_ids, seq_len, windows):
    from transformers import OPTForCausalLM as HF
    hf = HF.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for w in range(windows):
        window = torch.tensor(token_ids[w * seq_len:(w + 1) * seq_len])[None]
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
    got = run_ppl(capsys, "--model", str(reference_model_dir), "--data", str(WIKITEXT), "--seq-len", "256",
                  "--max-windows", "6")
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
    got = run_ppl(capsys, "--model", str(reference_model_dir), "--data", str(data), "--seq-len", "128",
                  "--max-windows", str(windows))
    assert abs(got["ppl"] - expected) / expected <= 1e-3


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "unknown corpus kind"),
    (lambda p: (p / "x.jsonl").write_text('{"title": "no text"}\n') and p / "x.jsonl", 'no "text" field'),
    (lambda p: (p / "short.txt").write_text("too short") and p / "short.txt", "fewer than one window"),
])
def test_ppl_bad_data(reference_model_dir, tmp_path, capsys, setup, message):
    data = setup(tmp_path)
    assert eval_main(["ppl", "--model", str(reference_model_dir), "--data", str(data)]) == 2
    assert message in capsys.readouterr().err
