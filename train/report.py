"""report: the per-layer plot (PNG), JSON and markdown summary of a calibration, written into the work dir."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def mean_mlp_density(result: dict, first_layer: int = 1) -> float:
    """Mean calibrated K/ffn over layers first_layer.. (layer 0 is dense-ish in OPT and usually left dense)."""
    values = [e["mlp"]["test"]["predicted_density"] for e in result["layers"][first_layer:]]
    return sum(values) / len(values) if values else float("nan")


def _threshold_table(result: dict, group: str, title: str, recall_name: str) -> list:
    """The markdown lines of a group's ("mlp" or "heads") threshold-selection table, or none (not calibrated)."""
    if "threshold_test" not in result["layers"][0][group]:
        return []
    lines = [
        "",
        title,
        "",
        f"| layer | threshold | {recall_name} | mean density | p99 density | max density | tokens above K |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in result["layers"]:
        t = e[group]["threshold_test"]
        lines.append(
            f"| {e['layer']} | {e[group]['threshold']:.3f} | {t['recall']:.4f} | {t['density']:.3f} | "
            f"{t['p99_density']:.3f} | {t['max_density']:.3f} | {t['above_k_fraction']:.1%} |"
        )
    return lines


def mean_threshold_density(result: dict, first_layer: int = 1) -> float:
    """Mean measured density under threshold selection over layers first_layer.. (test tokens)."""
    values = [e["mlp"]["threshold_test"]["density"] for e in result["layers"][first_layer:]]
    return sum(values) / len(values) if values else float("nan")


def _confidence_line(result: dict) -> str:
    c = result.get("recall_confidence", 0.5)
    if c == 0.5:
        return "- confidence 0.5: K and the threshold stop where the calibration tokens' mean recall reaches the target"
    return (
        f"- confidence {c}: K and the threshold stop where the one-sided lower {c} bound on the mean recall, mean - "
        f"t*SE with t = {result['confidence_quantile']:.3f} (Student, {result['calibration_units']} calibration "
        f"{result['sampling_unit']}s as the sampling units), reaches the target"
    )


def _calib(kind: dict) -> str:
    """The calibration tokens' mean recall at K, and its lower confidence bound where there is one."""
    c = kind["calibration"]
    return f"{c['recall']:.4f}" + (f" ({c['recall_bound']:.4f})" if "recall_bound" in c else "")


def markdown(result: dict, title: str = "Predictor calibration") -> str:
    fo = result.get("fit_options", {})
    fit = result.get("fit") or {}
    lines = [f"# {title}", ""]
    lines += [
        f"- model: `{result.get('model', '?')}`; activations: `{result.get('activations', '?')}`",
        f"- training tokens: {result.get('training_tokens')}; held-out: {result['calibration_tokens']} "
        f"calibration + {result['test_tokens']} test tokens ({result['split']})",
        f"- predictors: rank {fo.get('rank')}, MLP input `{result.get('mlp_input')}`, heads read layer l-1's "
        f"attn_input; loss `{fo.get('loss')}`, {fo.get('epochs')} epochs, batch {fo.get('batch_size')}, "
        f"lr {fo.get('learning_rate')}",
        f"- targets: MLP mean recall >= {result['recall_target']} of the active neurons (K in blocks of "
        f"{result['block']}); heads mean head-norm mass recall >= {result['head_recall_target']} (blocks of "
        f"{result['head_block']}); head labels = heads carrying the top {fo.get('head_label_mass')} of the "
        f"norm mass",
        _confidence_line(result),
        f"- mean calibrated MLP density, layers 1..{len(result['layers']) - 1}: "
        f"**{mean_mlp_density(result):.1%}** with top-K"
        + (
            f", **{mean_threshold_density(result):.1%}** with threshold selection (test tokens)"
            if "threshold_test" in result["layers"][0]["mlp"]
            else ""
        ),
    ]
    plan = result.get("stream_disk_plan")
    if plan is not None:
        lines.append(
            f"- stream mode: {plan['layer_groups']} layer group(s), estimated peak disk "
            f"{plan['estimated_peak_bytes'] / 1e9:.3g} GB (budget {plan['budget_bytes'] / 1e9:g} GB)"
        )
    lines += [
        "",
        "## MLP",
        "",
        "| layer | true density | K (raw) | K / ffn | recall@K calib (lower bound) | recall@K test | precision@K test | "
        "recall (p>0.5) | precision (p>0.5) | predicted density (p>0.5) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["layers"]:
        m, l = e["mlp"], e["layer"]
        f = (fit.get("mlp") or [None] * (l + 1))[l] or {}
        lines.append(
            f"| {l} | {m['test']['true_density']:.3f} | {m['k']} ({m['k_raw']}) | {m['test']['predicted_density']:.3f} "
            f"| {_calib(m)} | {m['test']['recall']:.4f} | {m['test']['precision']:.3f} | "
            f"{f.get('recall', float('nan')):.3f} | {f.get('precision', float('nan')):.3f} | "
            f"{f.get('predicted_density', float('nan')):.3f} |"
        )
    lines += _threshold_table(result, "mlp", "### MLP, threshold selection (test tokens)", "recall")
    lines += [
        "",
        "## Heads",
        "",
        "| layer | true density (labels) | K (raw) | K / heads | mass recall@K calib (lower bound) | mass recall@K test | "
        "label recall@K test | precision@K test | recall (p>0.5) | precision (p>0.5) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["layers"]:
        h, l = e["heads"], e["layer"]
        f = (fit.get("heads") or [None] * (l + 1))[l] or {}
        lines.append(
            f"| {l} | {h['test']['true_density']:.3f} | {h['k']} ({h['k_raw']}) | {h['test']['predicted_density']:.3f} "
            f"| {_calib(h)} | {h['test']['recall']:.4f} | {h['test']['label_recall']:.4f} | "
            f"{h['test']['precision']:.3f} | {f.get('recall', float('nan')):.3f} | "
            f"{f.get('precision', float('nan')):.3f} |"
        )
    title = "### Heads, threshold selection (test tokens; at most K a token at decode)"
    lines += _threshold_table(result, "heads", title, "mass recall")
    heads = result["layers"][0]["heads"].get("mass_recall_curve", [])
    if 0 < len(heads) <= 16:
        lines += [
            "",
            "Head-norm mass kept by the top-K heads (test tokens): predicted / oracle (the K largest true norms).",
            "",
            "| layer | " + " | ".join(f"K={k}" for k in range(1, len(heads) + 1)) + " |",
            "|---|" + "---|" * len(heads),
        ]
        for e in result["layers"]:
            pred, oracle = e["heads"]["mass_recall_curve"], e["heads"].get("oracle_mass_recall_curve", [])
            cells = [f"{p:.3f} / {o:.3f}" for p, o in zip(pred, oracle)] if oracle else [f"{p:.3f}" for p in pred]
            lines.append(f"| {e['layer']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Definitions: recall@K = mean over tokens of |top-K ∩ active| / |active| (MLP) or of the kept "
        "share of the head-norm mass (heads); precision@K = mean over tokens of |top-K ∩ active| / K; "
        "(p>0.5) columns: the predictor's own threshold, pooled over tokens and outputs, on all held-out rows.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [e["layer"] for e in result["layers"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, kind, title, recall_label in (
        (axes[0], "mlp", "MLP neurons", "recall@K (active neurons)"),
        (axes[1], "heads", "attention heads", "recall@K (head-norm mass)"),
    ):
        test = [e[kind]["test"] for e in result["layers"]]
        ax.plot(
            layers,
            [t["true_density"] for t in test],
            "o-",
            label="true density"
            if kind == "mlp"
            else f"true density (heads in the top {result.get('fit_options', {}).get('head_label_mass', '?')} mass)",
        )
        ax.plot(layers, [t["predicted_density"] for t in test], "s-", label="predicted density (K / width)")
        ax.plot(layers, [t["recall"] for t in test], "^-", label=recall_label)
        ax.axhline(
            result["recall_target" if kind == "mlp" else "head_recall_target"],
            color="gray",
            ls=":",
            lw=1,
            label="recall target",
        )
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle(f"calibrated K per layer (held-out test tokens; MLP input {result.get('mlp_input')})")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(result: dict, work_dir: Path, stem: str = "report") -> dict:
    """Write <stem>.json, <stem>.md and <stem>.png into work_dir (each atomically)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": work_dir / f"{stem}.json", "markdown": work_dir / f"{stem}.md", "plot": work_dir / f"{stem}.png"}
    _atomic_write(paths["json"], json.dumps(result, indent=2).encode())
    _atomic_write(paths["markdown"], markdown(result).encode())
    plot(result, paths["plot"])
    return {k: str(v) for k, v in paths.items()}
