"""`python -m eval tasks`: the lm-eval adapter against lm-eval's own Hugging Face backend, the local task
loaders against the shared splits, and the CLI (resume, errors)."""

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from conftest import REFERENCE_MODEL, SHARED  # noqa: E402
from eval.__main__ import main  # noqa: E402
from eval.local_tasks import LOCAL_TASKS, TaskDataError, build_task, parse_task_list  # noqa: E402

TASKS_DIR = SHARED / "data" / "tasks"
pytestmark = pytest.mark.skipif(not TASKS_DIR.is_dir(), reason="needs ../shared/data/tasks")

# Requests of the shapes tasks produce: a trailing space moved onto the continuation, an empty context, a
# multi-token continuation, a continuation the model predicts greedily, unicode; and the edge cases: an empty
# context before a continuation that starts with </s>, a context that starts with </s>, a context longer than the
# model's 1024 positions (truncated from the left).
REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The United States of", " America"),
    ("Question: Is water wet?\nAnswer: ", "yes"),
    ("", "Hello world, this is a test."),
    ("The the the the the the the the", " the"),
    ("Café au lait is a", " drink made with coffee and hot milk."),
    ("", "</s>Hello world"),
    ("</s>The capital of France is", " Paris"),
    (" ".join(["word"] * 1100), " end"),
]


@pytest.fixture(scope="module")
def jax_lm():
    from dejavu_jax.checkpoint import load_model
    from eval.harness import JaxOPT

    return JaxOPT(load_model(REFERENCE_MODEL, "float32"), batch_size=4, progress=False)


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_loglikelihood_matches_lm_eval_hf_backend(jax_lm):
    """Same requests through lm-eval's HF backend (torch, fp32) and through ours: same numbers, same greedy flags."""
    pytest.importorskip("accelerate")
    assert len(jax_lm.encode_pair(*REQUESTS[-1])[0]) > jax_lm.max_length  # the truncation case is real
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(REFERENCE_MODEL), device="cpu", batch_size=4, dtype="float32")
    want = hf.loglikelihood(_instances(REQUESTS), disable_tqdm=True)
    got = jax_lm.loglikelihood(_instances(REQUESTS))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert any(w[1] for w in want) and not all(w[1] for w in want)  # both kinds of greedy flag occur


def test_batching_and_padding_do_not_change_scores(jax_lm):
    """One request alone equals the same request inside a padded, length-sorted batch."""
    batch = jax_lm.loglikelihood(_instances(REQUESTS))
    alone = [jax_lm.loglikelihood(_instances([pair]))[0] for pair in REQUESTS]
    np.testing.assert_allclose([b[0] for b in batch], [a[0] for a in alone], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def task_manager():
    from eval.local_tasks import lm_eval_task_manager

    return lm_eval_task_manager()  # the process's one index, shared with the CLI runs below


@pytest.mark.parametrize("name", list(LOCAL_TASKS))
def test_local_task_documents(name, task_manager):
    """Every local split loads whole into lm-eval's task, and its first documents have a valid gold answer."""
    task = build_task(name, TASKS_DIR, task_manager)
    docs = list(task.eval_docs)
    assert len(docs) == LOCAL_TASKS[name].documents
    for doc in docs[:5]:
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if task.OUTPUT_TYPE != "multiple_choice":
            assert text and isinstance(target, str) and target.strip()
            continue
        choices = task.doc_to_choice(doc)
        assert len(choices) >= 2
        if isinstance(text, int):  # winogrande: the choices are contexts, the gold one is text's index
            assert 0 <= text < len(choices) and target.strip()
        else:
            assert text and 0 <= (target if isinstance(target, int) else choices.index(target)) < len(choices)


def test_unknown_task_and_missing_dir_are_clear_errors(tmp_path, task_manager):
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_list("piqa,squad")
    with pytest.raises(TaskDataError, match="does not exist"):
        build_task("piqa", tmp_path / "nowhere", task_manager)
    (tmp_path / "piqa").mkdir()
    with pytest.raises(TaskDataError, match="missing task file"):
        build_task("piqa", tmp_path, task_manager)


# Gold answers read straight from the raw split files, not through the local loaders' label mapping.
RAW_GOLD = {
    "copa": ("copa/val.jsonl", lambda record: int(record["label"])),
    "rte": ("rte/val.jsonl", lambda record: 0 if record["label"] == "entailment" else 1),
}


def accuracy_by_hand(jax_lm, name, task_manager, limit):
    """acc of the first `limit` documents: the choice with the highest log-likelihood (scored request by request
    through the adapter) against the raw file's gold answer, averaged here rather than by lm-eval's evaluator."""
    task = build_task(name, TASKS_DIR, task_manager)
    task.build_all_requests(limit=limit)
    scores = {}
    for instance, (logprob, _) in zip(task.instances, jax_lm.loglikelihood(task.instances)):
        scores.setdefault(instance.doc_id, {})[instance.idx] = logprob
    path, gold_of = RAW_GOLD[name]
    with open(TASKS_DIR / path) as f:
        gold = [gold_of(json.loads(line)) for line, _ in zip(f, range(limit))]
    assert sorted(scores) == list(range(limit))
    return float(np.mean([int(np.argmax([scores[d][i] for i in sorted(scores[d])])) == gold[d] for d in scores]))


def test_cli_writes_results_and_resumes(tmp_path, capsys, monkeypatch, jax_lm, task_manager):
    out = tmp_path / "tasks.json"
    argv = [
        "tasks",
        "--model",
        str(REFERENCE_MODEL),
        "--tasks",
        "copa,rte",
        "--tasks-dir",
        str(TASKS_DIR),
        "--limit",
        "6",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    # Every progress bar the run draws (lm-eval's over the documents, ours over the batches) names its task.
    bars = {line.split(":")[0] for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "|" in line}
    assert bars == {"copa requests", "copa dense", "rte requests", "rte dense"}
    saved = json.loads(out.read_text())
    for name in ("copa", "rte"):
        assert saved["tasks"][name]["dense"]["documents"] == 6
        assert saved["tasks"][name]["dense"]["acc"] == pytest.approx(accuracy_by_hand(jax_lm, name, task_manager, 6))
    # A rerun with the same settings scores nothing again.
    import eval.tasks

    monkeypatch.setattr(eval.tasks, "evaluate_task", lambda *a: pytest.fail("re-evaluated a finished task"))
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == saved["tasks"]


def test_cli_predictors_keeping_every_neuron_reproduce_dense(tmp_path, capsys):
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.predictor_store import save_predictors
    from test_sparse_model import random_predictors

    config = load_model(REFERENCE_MODEL, "float32").config
    save_predictors(random_predictors(config, k=config.ffn_dim, threshold=-float("inf")), tmp_path / "predictors")
    argv = [
        "tasks",
        "--model",
        str(REFERENCE_MODEL),
        "--tasks",
        "copa",
        "--tasks-dir",
        str(TASKS_DIR),
        "--limit",
        "8",
        "--predictors",
        str(tmp_path / "predictors"),
        "--json",
    ]
    # Top-K choosing every neuron equals dense at the model level (test_sparse_model.py); here the CLI's plumbing.
    assert main(argv + ["--selection", "topk"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"]["copa"]["sparse"] == report["tasks"]["copa"]["dense"]
    assert report["settings"]["selection"] == "topk"
    assert report["mlp_k"] == [config.ffn_dim] * config.num_hidden_layers


@pytest.fixture
def no_model_loading(monkeypatch):
    import dejavu_jax.checkpoint

    monkeypatch.setattr(dejavu_jax.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))


def test_cli_refuses_an_out_file_it_would_overwrite(tmp_path, capsys, no_model_loading):
    """An --out holding other results, or not writable, is an error before the model loads, and is left as it was."""
    argv = [
        "tasks",
        "--model",
        str(REFERENCE_MODEL),
        "--tasks",
        "copa",
        "--tasks-dir",
        str(TASKS_DIR),
        "--limit",
        "4",
        "--out",
    ]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {"limit": 99}, "tasks": {"copa": {}}}))
    not_results = tmp_path / "notes.md"
    not_results.write_text("# my notes")
    for out, message in (
        (other, "other settings"),
        (not_results, "not an `eval tasks` results file"),
        (tmp_path / "missing" / "r.json", "existing directory"),
        (tmp_path, "existing directory"),
    ):
        before = out.read_text() if out.is_file() else None
        assert main(argv + [str(out)]) == 2
        assert message in capsys.readouterr().err
        assert (out.read_text() if out.is_file() else None) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "nope"], "unknown task"),
        (["--tasks-dir", "/no/such/tasks"], "--tasks-dir /no/such/tasks is not a directory"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_cli_bad_input_exits_2_before_loading(capsys, no_model_loading, extra, message):
    argv = ["tasks", "--model", str(REFERENCE_MODEL), "--tasks", "copa", "--tasks-dir", str(TASKS_DIR), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
