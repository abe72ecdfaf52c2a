"""`python -m train --store stream`: resume to the same predictors, held-out tokens apart from training tokens, recall
close to disk mode's, and bad input refused before anything is written."""

import contextlib
import dataclasses
import io
import json
import lzma

import jax
import numpy as np
import pytest

from conftest import SHARED
from train.__main__ import main as train_main

VALIDATION = SHARED / "data" / "wiki2015" / "validation.jsonl.xz"
TINY = dict(max_tokens=1200, seq_len=32, batch_size=4)  # 33 training windows: 9 batches an epoch, the last short
TINY_FIT = dict(rank=8, epochs=2, batch_size=64)
STREAM_WORK_DIR = ["predictors", "report.json", "report.md", "report.png", "stream-state"]  # no activations/


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 30 documents of the shared validation split."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with lzma.open(VALIDATION, "rt") as f, open(path, "w") as out:
        for i, line in enumerate(f):
            if i == 30:
                break
            out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return path


def _options(model, corpus, work_dir, **overrides):
    from train.fit import FitOptions
    from train.stream import StreamOptions

    stream = {**TINY, **{k: v for k, v in overrides.items() if k in StreamOptions.__dataclass_fields__}}
    fit = {**TINY_FIT, **{k: v for k, v in overrides.items() if k in FitOptions.__dataclass_fields__}}
    return StreamOptions(str(model), str(corpus), work_dir, **stream), FitOptions(**fit)


def _arrays(predictors):
    return [np.asarray(leaf) for leaf in jax.tree.leaves((predictors.mlp, predictors.heads))]


# One batch a pool: checkpoints after batches 3, 6, ..., 21. Pools of 2 batches (an epoch's 9 batches in pools of
# 2, 2, 2, 2, 1): a checkpoint after the pool that reaches a multiple of 3, after batches 4, 6, 9, 13, ..., 22.
# Stopped after batch 20, the last checkpoint is the one written between the two layer groups (after batch 18,
# with no training state in it, the first group's predictors in their own file). Stopped after batch 18, the first
# group's last batch, its last checkpoint holds its state and no group file is written yet. Stopped after batch 23,
# the second group resumes from its own state beside the first group's file (once, with pools of 2 batches: the
# same resume with one batch a pool differs only in where the checkpoint falls).
@pytest.mark.parametrize("mix_tokens,stops", [(128, ((18, 18), (20, 18))), (256, ((23, 22),))])
def test_interrupted_run_resumes_to_the_same_predictors(reference_model_dir, corpus, tmp_path, mix_tokens, stops):
    from train.stream import train_stream

    settings = dict(layer_groups=2, checkpoint_every=3, mix_tokens=mix_tokens)  # 2 groups x 2 epochs x 9 batches
    full, _, full_summary = train_stream(
        *_options(reference_model_dir, corpus, tmp_path / "full", **settings), progress=False
    )
    assert full_summary["forward_batches_run"] == 36 and full_summary["layer_groups"] == 2
    assert full_summary["pool_batches"] == mix_tokens // 128

    class Stop(Exception):
        pass

    for stop_after, last_checkpoint in stops:  # batches after the last checkpoint are lost and rerun

        def stop(batches_done, stop_after=stop_after):
            if batches_done == stop_after:
                raise Stop

        work = tmp_path / f"resumed-{stop_after}"
        with pytest.raises(Stop):
            train_stream(*_options(reference_model_dir, corpus, work, **settings), progress=False, on_batch=stop)
        group_files = ["predictors-group-000.npz"] if stop_after > 18 else []
        assert sorted(p.name for p in (work / "stream-state").iterdir()) == ["checkpoint.npz", *group_files]
        resumed, _, summary = train_stream(*_options(reference_model_dir, corpus, work, **settings), progress=False)
        assert summary["forward_batches_run"] == 36 - last_checkpoint
        for a, b in zip(_arrays(full), _arrays(resumed), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(full_summary["final_loss"], summary["final_loss"])
    # Finished: a rerun trains nothing and returns the same predictors.
    again, _, summary = train_stream(*_options(reference_model_dir, corpus, work, **settings), progress=False)
    assert summary["forward_batches_run"] == 0
    for a, b in zip(_arrays(full), _arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_pool_of_batches_trains_as_one_batch_of_their_windows(reference_model_dir, corpus, tmp_path):
    """Pools of 4 batches of 2 windows and batches of 8 windows without pooling: the same windows and row order in
    every round of steps, so the same predictors (up to the forward pass's rounding at another batch size); one
    batch of 2 windows a round differs."""
    from train.stream import train_stream

    def train(name, batch_size, mix_tokens):
        stream, fit = _options(reference_model_dir, corpus, tmp_path / name, mix_tokens=mix_tokens)
        stream = dataclasses.replace(stream, batch_size=batch_size)  # windows a forward pass; rows a step stay 64
        predictors, _, summary = train_stream(stream, fit, progress=False)
        return _arrays(predictors), summary

    pooled, pooled_summary = train("pooled", 2, 256)
    batch, batch_summary = train("batch", 8, 256)
    alone, _ = train("alone", 2, 64)
    assert (pooled_summary["pool_batches"], batch_summary["pool_batches"]) == (4, 1)
    assert (pooled_summary["forward_batches_run"], batch_summary["forward_batches_run"]) == (2 * 17, 2 * 5)
    assert pooled_summary["steps_per_layer"] == batch_summary["steps_per_layer"]
    for a, b in zip(pooled, batch, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert max(np.abs(a - b).max() for a, b in zip(pooled, alone, strict=True)) > 1e-2


def test_held_out_tokens_never_overlap_training_tokens(reference_model_dir, corpus):
    from dejavu_jax.corpus import token_stream
    from dejavu_jax.tokenizer import load_tokenizer
    from train.stream import epoch_batches, plan_windows

    tokenizer = load_tokenizer(reference_model_dir)
    stream = token_stream(tokenizer, corpus)
    for cap in (10**9, 70):  # every held-out token kept; or a sample cut inside the third held-out window
        plan = plan_windows(tokenizer, corpus, 32, 1200, 0.1, cap)
        train = np.concatenate([w.tokens for w in plan.train])
        held = np.concatenate([w.tokens for w in plan.held_out])
        # Training windows are the stream's first whole windows; the sample is the tokens right after them.
        assert all(len(w.tokens) == 32 for w in plan.train) and len(train) == int(1200 * 0.9) // 32 * 32
        np.testing.assert_array_equal(train, stream[: len(train)])
        np.testing.assert_array_equal(held, stream[len(train) : len(train) + len(held)])
        assert len(held) == min(cap, plan.held_out_available) and len(train) + plan.held_out_available == 1200
        assert plan.held_out_index == list(range(len(plan.train), len(plan.train) + len(plan.held_out)))
        last_train_end = max(w.end for w in plan.train)
        assert all(w.start >= last_train_end for w in plan.held_out)  # (document, offset) positions
        # Every epoch feeds each training window exactly once, and nothing else.
        for epoch in range(2):
            fed = sorted(i for batch in epoch_batches(plan, 4, 0, 0, epoch) for i in batch)
            assert fed == list(range(len(plan.train)))


@pytest.fixture(scope="module")
def stream_run(reference_model_dir, corpus, tmp_path_factory):
    """(work dir, argv, JSON summary) of one CLI run that --store auto sends to stream mode (a tiny disk budget)."""
    work = tmp_path_factory.mktemp("stream") / "work"
    argv = ["--model", str(reference_model_dir), "--data", str(corpus), "--work-dir", str(work)]
    argv += ["--max-tokens", "2400", "--seq-len", "64", "--batch-size", "4", "--rank", "16", "--epochs", "3"]
    # --mix-tokens 2304: an epoch's 9 batches make one pool, as under the default (16384), without the default
    # pool's 14,000 padding rows, which every round of steps still runs through.
    argv += ["--train-batch-size", "128", "--mix-tokens", "2304", "--quiet", "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train_main(argv + ["--disk-budget-gb", "1e-6"]) == 0
    return work, argv, json.loads(stdout.getvalue())


def _run(argv, capsys):
    rc = train_main(argv)
    return rc, capsys.readouterr()


def test_stream_matches_disk_recall_and_writes_no_activations(stream_run, capsys, tmp_path):
    from dejavu_jax.predictor_store import load_predictors
    from dejavu_jax.predictors import predictor_scores
    from train.activations import ActivationStore
    from train.heldout import StoreHeldOut

    work, argv, summary = stream_run
    assert summary["store"]["mode"] == "stream" and "--disk-budget-gb" in summary["store"]["reason"]
    assert sorted(p.name for p in work.iterdir()) == STREAM_WORK_DIR
    s = summary["stream"]
    assert s["held_out_tokens"] == 2400 - s["training_tokens"] and s["peak_host_rss_bytes"] > 0
    assert s["peak_device_bytes"] is None or s["peak_device_bytes"] > 0

    disk = tmp_path / "disk"
    rc, out = _run([*argv[:5], str(disk), *argv[6:], "--store", "disk"], capsys)
    assert rc == 0, out.err
    assert json.loads(out.out)["store"]["mode"] == "disk"
    # Both predictor sets scored on the same rows (disk mode's held-out test rows), keeping 10% of the neurons (the
    # calibrated K of predictors this briefly trained is too large to tell them apart).
    held_out = StoreHeldOut(ActivationStore(disk / "activations"), 0.1)
    by_mode = {mode: load_predictors(w / "predictors") for mode, w in (("disk", disk), ("stream", work))}
    recall = {mode: [] for mode in (*by_mode, "random")}
    rng = np.random.default_rng(0)
    for layer in range(held_out.config.num_hidden_layers):
        x = held_out.read(layer, "attn_input")[held_out.test]
        labels = held_out.read_labels(layer)[held_out.test]
        k = held_out.config.ffn_dim // 10
        for mode in recall:
            scores = (
                rng.random(labels.shape)
                if mode == "random"
                else np.asarray(predictor_scores(by_mode[mode].mlp[layer], x))
            )
            top = np.argsort(-scores, axis=1)[:, :k]
            hits = np.take_along_axis(labels, top, axis=1).sum(1)
            n_active = labels.sum(1)
            recall[mode].append(np.where(n_active > 0, hits / np.maximum(n_active, 1), 1.0).mean())
    gap = np.abs(np.subtract(recall["stream"], recall["disk"]))
    assert gap.mean() < 0.02 and gap.max() < 0.05, recall
    assert np.mean(recall["stream"]) > np.mean(recall["random"]) + 0.05, recall  # the comparison can fail


def test_resume_with_other_settings_is_refused_and_recalibration_reuses_training(stream_run, capsys):
    from dejavu_jax.predictor_store import load_predictors

    work, argv, _ = stream_run
    checkpoint = work / "stream-state" / "checkpoint.npz"
    before = (checkpoint.read_bytes(), (work / "predictors" / "predictors.json").read_bytes())
    rc, out = _run(argv + ["--store", "stream", "--rank", "8"], capsys)
    assert rc == 2 and out.err.startswith("error: ") and out.err.count("\n") == 1
    assert "other settings (fit.rank: 16 vs 8" in out.err
    assert (checkpoint.read_bytes(), (work / "predictors" / "predictors.json").read_bytes()) == before
    assert sorted(p.name for p in work.iterdir()) == STREAM_WORK_DIR

    k_before = load_predictors(work / "predictors").mlp_k
    rc, out = _run(argv + ["--store", "stream", "--recall-target", "0.5"], capsys)
    assert rc == 0, out.err
    assert json.loads(out.out)["stream"]["forward_batches_run"] == 0  # training came from the checkpoint
    assert sum(load_predictors(work / "predictors").mlp_k) < sum(k_before)
    # The standalone calibrate step has no activations to read here, and says what to run instead.
    rc, out = _run(["calibrate", "--work-dir", str(work)], capsys)
    assert rc == 2 and "--store stream" in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--store", "bogus"], "--store must be one of auto, disk, stream. Got 'bogus'"),
        (["--store", "stream", "--layer-groups", "0"], "--layer-groups must be a positive integer"),
        (["--store", "stream", "--layer-groups", "9"], "--layer-groups (9) must not exceed the model's 8 layers"),
        (["--store", "stream", "--checkpoint-every", "-1"], "--checkpoint-every must be a positive integer"),
        (["--store", "stream", "--mix-tokens", "0"], "--mix-tokens must be a positive integer"),
        (["--store", "stream", "--holdout-memory-gb", "0"], "--holdout-memory-gb must be > 0"),
        (["--disk-budget-gb", "0"], "--disk-budget-gb must be > 0"),
        (["--store", "stream", "--stream-disk-budget-gb", "0"], "--stream-disk-budget-gb must be > 0"),
        (["--store", "stream", "--stream-disk-budget-gb", "0.001"], "stream mode needs at least 0.0"),
        (["--store", "stream", "--layer-groups", "1", "--stream-disk-budget-gb", "0.009"], "--layer-groups 1 needs"),
    ],
)
def test_cli_rejects_bad_stream_options_before_any_work(reference_model_dir, tmp_path, capsys, extra, message):
    work = tmp_path / "work"
    rc, out = _run(
        ["--model", str(reference_model_dir), "--data", str(VALIDATION), "--work-dir", str(work), *extra], capsys
    )
    assert rc == 2 and out.err.startswith("error: ") and out.err.count("\n") == 1 and message in out.err
    assert not work.exists()
