"""`python -m train`: collection (rows, batching, resume), metrics on hand-made labels, the CLI end to end."""

import json
import lzma
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED
from test_corpus import damage, write_jsonl_xz
from train.__main__ import main as train_main
from train.activations import ActivationStore
from train.collect import CollectOptions, collect
from train.metrics import BinaryCounts, TopKCurve, head_labels, smallest_k

VALIDATION = SHARED / "data" / "wiki2015" / "validation.jsonl.xz"


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def converted_model(reference_model_dir, tmp_path_factory):
    """The reference model converted once (fp32, so the tests compare against exact params)."""
    from dejavu_jax.checkpoint import convert_to_directory

    out = tmp_path_factory.mktemp("model") / "opt-21m-wiki"
    convert_to_directory(reference_model_dir, out, dtype="float32")
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """14 short documents (~60-120 tokens each): windows cross document boundaries and the stream ends mid-window."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with lzma.open(VALIDATION, "rt") as f, open(path, "w") as out:
        for i, line in enumerate(f):
            if i == 14:
                break
            text = json.loads(line)["text"]
            out.write(json.dumps({"text": text[: 250 + 40 * i]}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(reference_model_dir, tmp_path_factory):
    """A random 3-layer OPT (d 32, ffn 64) with the reference model's tokenizer and vocabulary, converted (fp32):
    for the CLI tests that check bookkeeping, not the predictors' quality."""
    from conftest import random_hf_model, tiny_hf_config
    from dejavu_jax.checkpoint import convert_to_directory

    hf = tmp_path_factory.mktemp("tiny-hf")
    hf_config = tiny_hf_config(vocab_size=16384, num_hidden_layers=3, max_position_embeddings=128)
    random_hf_model(hf_config, std=0.02).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference_model_dir / name, hf / name)
    out = tmp_path_factory.mktemp("tiny-model") / "opt-tiny"
    convert_to_directory(hf, out, dtype="float32")
    return out


def _rows(directory):
    store = ActivationStore(directory)
    fields = {"tokens": store.read(0, "tokens")}
    for layer in range(store.config.num_hidden_layers):
        for field in ("attn_input", "mlp_input", "mlp_active", "head_norm"):
            fields[f"{layer}.{field}"] = store.read(layer, field)
    return store, fields


def _assert_same_rows(a, b, exact=True):
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for key in a:
        if key.endswith("mlp_active") and not exact:
            assert np.mean(np.unpackbits(a[key]) != np.unpackbits(b[key])) < 1e-4, key
        elif exact:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            x, y = a[key].astype(np.float32), b[key].astype(np.float32)
            assert np.abs(x - y).max() <= 1e-3 * max(np.abs(y).max(), 1.0), key


def recall_by_k(scores, labels, per_token=False):
    """[N, M] scores and bool labels -> [M]: mean over tokens of the share of active outputs in the top K, K = 1..M
    (a token with nothing active counts 1); [N, M], each token's, with `per_token`."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.cumsum(np.take_along_axis(labels, order, axis=1), axis=1)
    n_active = labels.sum(1, keepdims=True)
    recall = np.where(n_active > 0, hits / np.maximum(n_active, 1), 1.0)
    return recall if per_token else recall.mean(0)


def mass_recall_by_k(scores, norms, per_token=False):
    """[N, H] -> [H]: mean over tokens of the share of the head-norm mass in the K best-scored heads ([N, H] with
    `per_token`)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    kept = np.cumsum(np.take_along_axis(norms, order, axis=1), axis=1)
    recall = kept / norms.sum(1, keepdims=True)
    return recall if per_token else recall.mean(0)


def window_lower_bound(per_token, windows, confidence):
    """[N, ...] per-token recalls, [N] window ids -> [...]: the documented bound, mean - t * SE, with the windows as
    sampling units (SE from the per-window recall sums, t Student's with windows - 1 degrees of freedom)."""
    import scipy.stats

    ids = np.unique(windows)
    sums = np.stack([per_token[windows == w].sum(0) for w in ids])
    tokens = np.array([(windows == w).sum() for w in ids], np.float64).reshape((-1,) + (1,) * (sums.ndim - 1))
    mean = per_token.mean(0)
    se = np.sqrt(len(ids) / (len(ids) - 1) * ((sums - mean * tokens) ** 2).sum(0)) / len(per_token)
    return mean - scipy.stats.t.ppf(confidence, len(ids) - 1) * se


# ---- metrics on hand-made labels ----------------------------------------------------------------------------------


def test_binary_metrics_by_hand():
    label = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    pred = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]], bool)
    counts = BinaryCounts()
    counts.update(pred[:2], label[:2])  # accumulation over chunks must equal one pass
    counts.update(pred[2:], label[2:])
    r = counts.result()
    # TP = 2 ((0,0), (1,3)); label positives 3; predicted positives 4; 12 entries.
    assert r == {"recall": 2 / 3, "precision": 2 / 4, "true_density": 3 / 12, "predicted_density": 4 / 12}


def test_topk_curve_by_hand():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # order 0, 2, 3, 1
            [0.2, 0.8, 0.4, 0.6],  # order 1, 3, 2, 0
            [0.1, 0.2, 0.3, 0.4],
        ]
    )  # order 3, 2, 1, 0
    labels = np.array(
        [
            [1, 1, 0, 0],  # hits by K: 1, 1, 1, 2 of 2
            [0, 0, 1, 0],  # 0, 0, 1, 1 of 1
            [0, 0, 0, 0],
        ],
        bool,
    )  # nothing active: recall 1 at every K
    curve = TopKCurve(4)
    curve.update(scores, labels)
    want_recall = np.array([(0.5 + 0 + 1) / 3, (0.5 + 0 + 1) / 3, (0.5 + 1 + 1) / 3, (1 + 1 + 1) / 3])
    np.testing.assert_allclose(curve.recall(), want_recall)
    at2 = curve.at(2)
    assert at2["k"] == 2 and at2["predicted_density"] == 2 / 4 and at2["true_density"] == 3 / 12
    assert at2["precision"] == pytest.approx((1 + 0 + 0) / (3 * 2))
    assert at2["label_recall"] == pytest.approx(1 / 3)
    assert smallest_k(curve.recall(), 0.8, 1) == (3, 3)
    assert smallest_k(curve.recall(), 0.8, 2) == (3, 4)
    assert smallest_k(curve.recall(), 0.5, 16) == (1, 4)  # rounded up, capped at the width
    assert smallest_k(curve.recall(), 1.0, 1) == (4, 4)


def test_topk_curve_matches_a_per_token_sort_on_random_scores_with_ties():
    from train.metrics import (
        _descending_order_xla,
        _labels_in_score_order_xla,
        descending_order,
        descending_row_order,
        labels_in_score_order,
    )

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (40, 33)).astype(np.float32)  # few distinct values: many ties
    labels = rng.random((40, 33)) < 0.2
    labels[3] = False  # a token with nothing active
    in_order = labels_in_score_order(scores, labels)
    # The host's quicksort with its tie repair gives the stable order, on tied rows and on rows without ties.
    distinct = rng.permutation(40 * 33).reshape(40, 33).astype(np.float32)
    paired = distinct.copy()
    paired[:, [5, 9, 2]] = paired[:, [20, 30, 31]]  # pairs of equal values, each in either order after a quicksort
    for values in (scores, distinct, paired, np.where(np.arange(40)[:, None] % 2, scores, paired)):
        np.testing.assert_array_equal(descending_row_order(values), np.argsort(-values, axis=1, kind="stable"))
    # The accelerator's sort (XLA, here on the CPU) gives the same stable order as numpy's.
    xla = np.unpackbits(np.asarray(_labels_in_score_order_xla(scores, labels)), axis=1, count=33).astype(bool)
    np.testing.assert_array_equal(xla, in_order)
    values = scores.ravel()
    for order in (descending_order(values), np.asarray(_descending_order_xla(values))):
        np.testing.assert_array_equal(values[order], np.sort(values)[::-1])
    curve = TopKCurve(33)
    curve.update(scores[:25], labels[:25])
    curve.update(scores[25:], labels[25:])
    want_recall, want_hits = np.zeros(33), np.zeros(33)
    for s, y in zip(scores, labels):
        ranked = y[sorted(range(33), key=lambda j: (-s[j], j))]  # by score, ties by index
        hits = np.cumsum(ranked)
        want_hits += hits
        want_recall += hits / y.sum() if y.any() else 1.0
    np.testing.assert_allclose(curve.recall(), want_recall / 40, rtol=1e-12)
    np.testing.assert_array_equal(curve.hits_sum, want_hits)
    assert curve.n_active == labels.sum() and curve.n_tokens == 40


def test_head_labels_and_mass_recall_by_hand():
    norms = np.array(
        [
            [4.0, 3.0, 2.0, 1.0],  # total 10: top-0.6 mass = heads 0, 1 (4 < 6, 7 >= 6)
            [1.0, 1.0, 6.0, 2.0],
        ]
    )  # total 10: head 2 alone reaches 0.6
    labels = head_labels(norms, 0.6)
    np.testing.assert_array_equal(labels, [[1, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(head_labels(norms, 1.0), np.ones((2, 4), bool))
    scores = np.array(
        [
            [0.0, 1.0, 2.0, 3.0],  # keeps heads 3, 2, 1, 0: mass 1, 3, 6, 10 of 10
            [0.0, 0.0, 5.0, 1.0],
        ]
    )  # keeps 2, 3, then 0 (tie broken by index), 1: 6, 8, 9, 10
    curve = TopKCurve(4)
    curve.update_mass(scores, norms, labels)
    np.testing.assert_allclose(curve.recall(), [(0.1 + 0.6) / 2, (0.3 + 0.8) / 2, (0.6 + 0.9) / 2, 1.0])
    # label hits at K=2: token 0 keeps heads 3, 2 (no labeled head), token 1 keeps 2, 3 (one).
    assert curve.at(2)["precision"] == pytest.approx((0 + 1) / (2 * 2))


# ---- collection ---------------------------------------------------------------------------------------------------


def test_collect_rows_match_the_model_and_exclude_padding(converted_model, small_corpus, tmp_path):
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.corpus import token_stream

    model = load_model(converted_model, "float32")
    stream = token_stream(model.tokenizer, small_corpus)
    assert len(stream) < 2000 and len(stream) % 64, "the corpus must end mid-window for this test"
    summary = collect(
        CollectOptions(
            str(converted_model),
            str(small_corpus),
            tmp_path / "a",
            max_tokens=2000,
            seq_len=64,
            batch_size=8,
            shard_tokens=200,
        ),
        progress=False,
    )
    assert summary["exhausted"] and summary["rows"] == len(stream)
    store = ActivationStore(tmp_path / "a")
    np.testing.assert_array_equal(store.read(0, "tokens"), stream)  # every token once, in order, no pads
    # Labels recomputed independently from the stored MLP input and the layer's own weights.
    c = model.config
    for layer in (0, 5):
        p = model.params[f"layers_{layer}"]
        h = store.read(layer, "mlp_input").astype(np.float64)
        x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + c.layer_norm_eps)
        x = x * np.asarray(p["final_layer_norm"]["scale"]) + np.asarray(p["final_layer_norm"]["bias"])
        pre = x @ np.asarray(p["mlp"]["fc1_w"], np.float64).T + np.asarray(p["mlp"]["fc1_b"])
        labels = store.read_labels(layer)
        confident = np.abs(pre) > 1e-2  # fp16 storage of the input moves values near 0
        assert np.array_equal(labels[confident], pre[confident] > 0)
    # The first window's layer-0 input is the token + position embedding, computed here by hand.
    emb = np.asarray(model.params["embed_tokens"]["embedding"])[stream[:64]]
    pos = np.asarray(model.params["embed_positions"]["embedding"])[np.arange(64) + 2]
    np.testing.assert_allclose(store.read(0, "attn_input", 0, 64).astype(np.float32), emb + pos, rtol=2e-3, atol=2e-3)


def test_batch_sizes_1_and_8_collect_the_same_rows(converted_model, small_corpus, tmp_path):
    for b in (1, 8):
        collect(
            CollectOptions(
                str(converted_model),
                str(small_corpus),
                tmp_path / f"b{b}",
                max_tokens=1000,
                seq_len=64,
                batch_size=b,
                shard_tokens=300,
            ),
            progress=False,
        )
    s1, rows1 = _rows(tmp_path / "b1")
    s8, rows8 = _rows(tmp_path / "b8")
    assert s1.num_rows == s8.num_rows == 1000
    assert [s["rows"] for s in s1.shards] == [300, 300, 300, 100]
    _assert_same_rows(rows1, rows8, exact=False)


def test_interrupted_collection_resumes_without_loss_or_duplicates(converted_model, small_corpus, tmp_path):
    opts = dict(max_tokens=1100, seq_len=64, batch_size=4, shard_tokens=150)  # shards end mid-window
    collect(CollectOptions(str(converted_model), str(small_corpus), tmp_path / "full", **opts), progress=False)

    class Stop(Exception):
        pass

    def stop_after_third(index, rows):
        if index == 2:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        collect(
            CollectOptions(str(converted_model), str(small_corpus), out, **opts),
            progress=False,
            on_shard=stop_after_third,
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_done"] == 450 and not manifest["complete"]
    assert manifest["position"]["skip_rows"] > 0 and manifest["documents_consumed"] > 0
    # A crash between a shard's rename and the manifest update leaves an uncounted shard; a temp dir too.
    shutil.copytree(out / "shard_00002", out / "shard_00003")
    (out / ".shard_00004.tmp-123").mkdir()
    summary = collect(CollectOptions(str(converted_model), str(small_corpus), out, **opts), progress=False)
    assert summary["resumed"] and summary["new_rows"] == 1100 - 450 and summary["rows"] == 1100
    _, full = _rows(tmp_path / "full")
    _, resumed = _rows(out)
    _assert_same_rows(full, resumed, exact=True)
    assert not (out / ".shard_00004.tmp-123").exists()
    # Finished: a rerun does nothing; a larger budget continues where it ended.
    assert (
        collect(CollectOptions(str(converted_model), str(small_corpus), out, **opts), progress=False)["new_rows"] == 0
    )
    more = dict(opts, max_tokens=1300)
    collect(CollectOptions(str(converted_model), str(small_corpus), tmp_path / "full2", **more), progress=False)
    collect(CollectOptions(str(converted_model), str(small_corpus), out, **more), progress=False)
    _assert_same_rows(_rows(tmp_path / "full2")[1], _rows(out)[1], exact=True)


def test_collect_reads_txt_and_datasets_dirs(converted_model, small_corpus, tmp_path):
    import datasets

    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "one.txt").write_text(texts[0])
    opts = dict(max_tokens=300, seq_len=64, batch_size=8, shard_tokens=200)
    for name, data in (("jsonl", small_corpus), ("ds", tmp_path / "ds"), ("txt", tmp_path / "one.txt")):
        collect(CollectOptions(str(converted_model), str(data), tmp_path / f"out-{name}", **opts), progress=False)
    jsonl, ds = ActivationStore(tmp_path / "out-jsonl"), ActivationStore(tmp_path / "out-ds")
    np.testing.assert_array_equal(jsonl.read(0, "tokens"), ds.read(0, "tokens"))
    np.testing.assert_array_equal(jsonl.read(2, "mlp_active"), ds.read(2, "mlp_active"))
    txt = ActivationStore(tmp_path / "out-txt")
    assert txt.manifest["exhausted"] and txt.num_rows < 300  # one short document: the stream ends early
    np.testing.assert_array_equal(txt.read(0, "tokens"), jsonl.read(0, "tokens")[: txt.num_rows])


def test_collect_refuses_other_settings(converted_model, small_corpus, tmp_path):
    opts = dict(max_tokens=300, seq_len=64, batch_size=8, shard_tokens=200)
    collect(CollectOptions(str(converted_model), str(small_corpus), tmp_path / "a", **opts), progress=False)
    with pytest.raises(ValueError, match="other settings.*seq_len"):
        collect(
            CollectOptions(str(converted_model), str(small_corpus), tmp_path / "a", **dict(opts, seq_len=32)),
            progress=False,
        )


# ---- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_end_to_end(converted_model, tmp_path, capsys):
    from dejavu_jax.predictor_store import load_predictors, predictor_metadata
    from dejavu_jax.config import OPTConfig

    work = tmp_path / "work"
    # 2048 tokens in windows of 64: the held-out tenth (rows 1843-2047) spans windows 28-31, so the calibration
    # has two windows (28 and 30), the fewest it takes as sampling units (with one it would count tokens).
    rc = train_main(
        [
            "--model",
            str(converted_model),
            "--data",
            str(VALIDATION),
            "--work-dir",
            str(work),
            "--max-tokens",
            "2048",
            "--seq-len",
            "64",
            "--shard-tokens",
            "512",
            "--epochs",
            "2",
            "--train-batch-size",
            "512",
            "--save-to",
            str(converted_model),
            "--quiet",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    config = OPTConfig.from_json_file(converted_model / "config.json")
    assert summary["collect"]["rows"] == 2048
    assert summary["fit"]["rank"] == min(1000, config.hidden_size // 2)
    for name in ("report.json", "report.md", "report.png"):
        assert (work / name).stat().st_size > 0
    report = json.loads((work / "report.json").read_text())
    assert len(report["layers"]) == config.num_hidden_layers
    assert "### Heads, threshold selection" in (work / "report.md").read_text()
    for entry in report["layers"]:
        mlp, heads = entry["mlp"], entry["heads"]
        assert mlp["k"] == mlp["k_raw"]  # --block 1: no rounding
        assert 1 <= heads["k"] == heads["k_raw"] <= config.num_attention_heads  # --head-block 1
    # The predictors sit next to the converted model and in the work dir, with K and metadata.
    for where in (converted_model, work / "predictors"):
        predictors = load_predictors(where, config)
        assert list(predictors.mlp_k) == summary["calibrate"]["mlp_k"]
        assert list(predictors.head_k) == summary["calibrate"]["head_k"]
    meta = predictor_metadata(converted_model)
    assert meta["recall_target"] == 0.99 and meta["mlp_input"] == "attn_input"
    assert meta["training_tokens"] == int(2048 * 0.9) and meta["stage"] == "calibrated"
    assert len(meta["calibration"]["layers"]) == config.num_hidden_layers
    # The stored predictor reproduces the calibrated recall: recompute layer 3's test recall by hand.
    store = ActivationStore(work / "activations")
    from train.calibrate import holdout_split

    n_train, _, test = holdout_split(store, 0.1)
    x = store.read(3, "attn_input", n_train)[test]
    labels = store.read_labels(3, n_train)[test]
    from dejavu_jax.predictors import predictor_scores

    scores = np.asarray(predictor_scores(predictors.mlp[3], jnp.asarray(x)))
    kept = np.zeros_like(labels)
    np.put_along_axis(kept, np.argsort(-scores, axis=1, kind="stable")[:, : predictors.mlp[3].keep], True, axis=1)
    n_active = labels.sum(1)
    recall = np.where(n_active > 0, (kept & labels).sum(1) / np.maximum(n_active, 1), 1.0).mean()
    assert recall == pytest.approx(report["layers"][3]["mlp"]["test"]["recall"], abs=1e-6)
    # ... and threshold selection with the stored threshold: its test recall and density, recomputed.
    chosen = scores >= predictors.mlp_threshold[3]
    t_recall = np.where(n_active > 0, (chosen & labels).sum(1) / np.maximum(n_active, 1), 1.0).mean()
    assert t_recall == pytest.approx(report["layers"][3]["mlp"]["threshold_test"]["recall"], abs=1e-6)
    assert chosen.mean() == pytest.approx(report["layers"][3]["mlp"]["threshold_test"]["density"], abs=1e-6)
    # Layers calibrated in parallel threads give the same result as one at a time, entries in layer order.
    from train.calibrate import CalibrateOptions, calibrate_held_out
    from train.heldout import StoreHeldOut

    runs = [
        calibrate_held_out(StoreHeldOut(store, 0.1), work / "predictors", CalibrateOptions(), workers=w) for w in (1, 3)
    ]
    for a, b in zip(*(r["layers"] for r in runs)):
        assert a["layer"] == b["layer"] and a["mlp"] == b["mlp"] and a["heads"] == b["heads"]
    assert [e["layer"] for e in runs[1]["layers"]] == list(range(config.num_hidden_layers))
    assert runs[0]["mlp_k"] == summary["calibrate"]["mlp_k"]
    # K per layer is the smallest whose lower confidence bound (default confidence, the calibration windows as
    # sampling units) reaches the target on the calibration tokens, and the threshold's bound reaches it too:
    # recomputed here from the documented split (held-out rows, even windows of --seq-len) and the stored
    # predictors, for every layer.
    from train.calibrate import DEFAULT_RECALL_CONFIDENCE

    assert report["recall_confidence"] == DEFAULT_RECALL_CONFIDENCE and report["sampling_unit"] == "window"
    n_rows = store.num_rows
    n_train = int(n_rows * 0.9)
    window = np.arange(n_train, n_rows) // 64
    calib = window % 2 == 0
    assert report["calibration_units"] == len(np.unique(window[calib])) >= 2
    for layer, entry in enumerate(report["layers"]):
        x = store.read(layer, "attn_input", n_train)[calib]
        calib_scores = np.asarray(predictor_scores(predictors.mlp[layer], jnp.asarray(x)))
        calib_labels = store.read_labels(layer, n_train)[calib]
        bound = window_lower_bound(
            recall_by_k(calib_scores, calib_labels, per_token=True), window[calib], DEFAULT_RECALL_CONFIDENCE
        )
        chosen = calib_scores >= predictors.mlp_threshold[layer]
        n_pos = calib_labels.sum(1)
        t_recall = np.where(n_pos > 0, (chosen & calib_labels).sum(1) / np.maximum(n_pos, 1), 1.0)
        assert window_lower_bound(t_recall, window[calib], DEFAULT_RECALL_CONFIDENCE) >= 0.99 - 1e-9
        k_raw = entry["mlp"]["k_raw"]
        assert bound[k_raw - 1] >= 0.99 - 1e-9 and (k_raw == 1 or bound[k_raw - 2] < 0.99), (
            layer,
            k_raw,
            bound[k_raw - 2 : k_raw],
        )
        x_prev = store.read(max(layer - 1, 0), "attn_input", n_train)[calib]
        norms = store.read(layer, "head_norm", n_train)[calib].astype(np.float64)
        head_scores = np.asarray(predictor_scores(predictors.heads[layer], jnp.asarray(x_prev)))
        mass = window_lower_bound(
            mass_recall_by_k(head_scores, norms, per_token=True), window[calib], DEFAULT_RECALL_CONFIDENCE
        )
        k_raw = entry["heads"]["k_raw"]
        assert mass[k_raw - 1] >= 0.99 - 1e-9 and (k_raw == 1 or mass[k_raw - 2] < 0.99), (layer, k_raw, mass)
        # the heads' threshold: its mass recall bound reaches the target on the calibration tokens too
        kept = np.where(head_scores >= predictors.head_threshold[layer], norms, 0.0).sum(1)
        total = norms.sum(1)
        t_mass = np.where(total > 0, kept / np.where(total > 0, total, 1.0), 1.0)
        assert window_lower_bound(t_mass, window[calib], DEFAULT_RECALL_CONFIDENCE) >= 0.99 - 1e-9
        assert entry["heads"]["threshold"] == predictors.head_threshold[layer]

    # Rerunning calibrate alone with another target rewrites K (fit and collect are not repeated).
    rc = train_main(["calibrate", "--work-dir", str(work), "--recall-target", "0.5", "--quiet"])
    assert rc == 0
    assert sum(load_predictors(work / "predictors").mlp_k) < sum(summary["calibrate"]["mlp_k"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--rank", "-3"], "--rank must be a positive integer"),
        (["--recall-target", "0"], "--recall-target must be in (0, 1]"),
        (["--recall-target", "1.5"], "--recall-target must be in (0, 1]"),
        (["--head-recall-target", "-0.1"], "--head-recall-target must be in (0, 1]"),
        (["--recall-confidence", "0.4"], "--recall-confidence must be in [0.5, 1)"),
        (["--recall-confidence", "1"], "--recall-confidence must be in [0.5, 1)"),
        (["--recall-confidence", "nan"], "--recall-confidence must be in [0.5, 1)"),
        (["--block", "0"], "--block must be a positive integer"),
        (["--max-tokens", "0"], "--max-tokens must be a positive integer"),
        (["--mlp-input", "attn_input", "--holdout", "1.0"], "--holdout must be in (0, 1)"),
    ],
)
def test_cli_rejects_bad_options_before_any_work(reference_model_dir, tmp_path, capsys, extra, message):
    work = tmp_path / "work"
    rc = train_main(["--model", str(reference_model_dir), "--data", str(VALIDATION), "--work-dir", str(work), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not work.exists()


def test_cli_bad_paths(reference_model_dir, tmp_path, capsys):
    work = tmp_path / "work"
    rc = train_main(
        ["--model", str(reference_model_dir), "--data", str(tmp_path / "missing.jsonl"), "--work-dir", str(work)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "error: corpus" in err and "does not exist" in err and not work.exists()

    rc = train_main(["--model", str(tmp_path / "no-such-model"), "--data", str(VALIDATION), "--work-dir", str(work)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "no-such-model" in err and not work.exists()

    rc = train_main(
        [
            "--model",
            str(reference_model_dir),
            "--data",
            str(VALIDATION),
            "--work-dir",
            str(work),
            "--save-to",
            str(reference_model_dir),
        ]
    )  # an HF dir, not a converted one
    err = capsys.readouterr().err
    assert rc == 2 and "not a converted model directory" in err and not work.exists()

    rc = train_main(["fit", "--work-dir", str(work)])
    err = capsys.readouterr().err
    assert rc == 2 and "no activations" in err and not (work / "predictors").exists()

    with pytest.raises(SystemExit) as exc:  # argparse: unknown choice
        train_main(["fit", "--work-dir", str(work), "--mlp-input", "fc1"])
    assert exc.value.code == 2


# ---- damaged, empty and tiny corpora; resumed fit ------------------------------------------------------------------


@pytest.fixture
def small_corpus_xz(small_corpus, tmp_path):
    """The small corpus, 40 documents long, as .jsonl.xz (texts of the shared validation split)."""
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    path = tmp_path / "corpus.jsonl.xz"
    write_jsonl_xz(path, (texts * 3)[:40])
    return path


def test_cli_truncated_corpus_keeps_the_finished_shards_and_resumes_once_replaced(
    converted_model, small_corpus_xz, tmp_path, capsys
):
    intact = small_corpus_xz.read_bytes()
    damage(small_corpus_xz, "truncated")
    work = tmp_path / "work"
    argv = [
        "collect",
        "--model",
        str(converted_model),
        "--data",
        str(small_corpus_xz),
        "--work-dir",
        str(work),
        "--max-tokens",
        "100000",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--shard-tokens",
        "256",
        "--quiet",
    ]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: corpus {small_corpus_xz} is truncated or corrupt") and err.count("\n") == 1
    assert "tokens collected before it are kept" in err
    manifest = json.loads((work / "activations" / "manifest.json").read_text())
    assert manifest["rows_done"] > 0 and not manifest["complete"]
    assert sorted(p.name for p in (work / "activations").iterdir()) == ["manifest.json"] + [
        s["name"] for s in manifest["shards"]
    ]  # counted shards only, no temp files
    # The corpus replaced by its intact copy: the rerun continues and ends with what one clean run collects.
    small_corpus_xz.write_bytes(intact)
    assert train_main(argv) == 0
    assert train_main(argv[:6] + [str(tmp_path / "clean")] + argv[7:]) == 0
    _assert_same_rows(_rows(tmp_path / "clean" / "activations")[1], _rows(work / "activations")[1], exact=True)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text(""), "holds no text"),
        (lambda p: p.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}) + "\n"), "holds no text"),
        (lambda p: p.write_bytes(lzma.compress(b'{"text": "a"}\n')[:12] + bytes(40)), "is truncated or corrupt"),
    ],
)
def test_cli_corpus_without_readable_text_leaves_nothing_behind(converted_model, tmp_path, capsys, make, message):
    data = tmp_path / ("corpus.jsonl.xz" if "corrupt" in message else "corpus.jsonl")
    make(data)
    work = tmp_path / "work"
    rc = train_main(["--model", str(converted_model), "--data", str(data), "--work-dir", str(work), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: corpus {data} ") and message in err and err.count("\n") == 1
    assert not work.exists()


def test_cli_checks_the_corpus_header_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import dejavu_jax.checkpoint

    monkeypatch.setattr(dejavu_jax.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    data = tmp_path / "plain.jsonl.xz"
    data.write_text(json.dumps({"text": "not compressed"}) + "\n")
    work = tmp_path / "work"
    assert train_main(["--model", "any", "--data", str(data), "--work-dir", str(work)]) == 2
    assert "is not xz-compressed" in capsys.readouterr().err and not work.exists()


def test_cli_corpus_too_small_to_fit_says_so(converted_model, tmp_path, capsys):
    """A corpus that ends after a few tokens: the error points at the corpus, not at --max-tokens."""
    data = tmp_path / "tiny.jsonl"
    data.write_text(json.dumps({"text": "Hello world."}) + "\n")
    work = tmp_path / "work"
    rc = train_main(["--model", str(converted_model), "--data", str(data), "--work-dir", str(work), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "too few to hold out" in err and "the corpus ended there" in err and "--max-tokens" not in err
    store = ActivationStore(work / "activations")  # the collection itself is whole: complete and exhausted
    assert store.complete and store.manifest["exhausted"] and store.num_rows < 20


def test_resumed_fit_reports_reused_layers(tiny_model, small_corpus, tmp_path, capsys):
    work = tmp_path / "work"
    assert (
        train_main(
            [
                "collect",
                "--model",
                str(tiny_model),
                "--data",
                str(small_corpus),
                "--work-dir",
                str(work),
                "--max-tokens",
                "600",
                "--seq-len",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    fit = ["fit", "--work-dir", str(work), "--rank", "8", "--epochs", "1", "--train-batch-size", "128"]

    def layer_lines():
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.lstrip().startswith(("mlp", "heads"))]
        summary = [line for line in out.splitlines() if line.startswith("fit: rank")]
        return lines, summary[0]

    assert train_main(fit) == 0
    lines, summary = layer_lines()
    layers = ActivationStore(work / "activations").config.num_hidden_layers
    assert len(lines) == 2 * layers and not any("reused" in line for line in lines) and "reused" not in summary
    # One predictor's saved state removed, as if the first run had stopped before it.
    state = next((work / "fit-state").iterdir())
    (state / "layer_2.mlp.npz").unlink()
    assert train_main(fit) == 0
    lines, summary = layer_lines()
    retrained = [line for line in lines if "reused" not in line]
    assert len(lines) == 2 * layers and len(retrained) == 1 and "mlp   layer 2" in retrained[0]
    assert f"({2 * layers - 1} of {2 * layers} predictors reused from an earlier run)" in summary
