"""An experiment's runs -> results.json, the paper's Table 1 and Figures 3-6.

Errors are top-1 errors in percent. For each run: the minimum and the mean
validation error over its epochs (the two columns of the paper's Table 1),
the final validation and test errors, wall time and images/s. For each
architecture: mean and standard deviation over seeds. For each accumulated
architecture and its plain twin: a paired comparison over the seeds they
share (accumulated minus plain, per seed), with a Student-t 95% confidence
interval and two-sided p-value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics

from pipeline.config import is_accumulated, plain_counterpart
from pipeline.rundir import HistoryRow, RunSummary

# Saraiya 2018, Table 1: CIFAR-10, depth 32, 50 epochs, one run each.
PAPER_TABLE1 = {"resnet": {"min_val_error": 13.92, "mean_val_error": 19.9},
                "accumulated": {"min_val_error": 12.65, "mean_val_error": 18.1}}
METRICS = ("min_val_error", "mean_val_error", "final_val_error", "final_test_error")
# Figures 3-6 of the paper, in its order.
FIGURES = (
    ("figure3_val_accuracy.png", "val_accuracy", "validation accuracy"),
    ("figure4_train_loss.png", "loss", "training loss"),
    ("figure5_train_accuracy.png", "accuracy", "training accuracy"),
    ("figure6_val_loss.png", "val_loss", "validation loss"),
)
DISPLAY_NAMES = {"resnet": "ResNet", "accumulated": "Accumulated", "wrn": "WRN", "accumulated-wrn": "Accumulated WRN",
                 "resnext": "ResNeXt", "accumulated-resnext": "Accumulated ResNeXt"}


@dataclasses.dataclass(frozen=True)
class Run:
    arch: str
    seed: int
    history: list[HistoryRow]
    summary: RunSummary


def run_metrics(run: Run) -> dict:
    val_errors = [100 * (1 - row.val_accuracy) for row in run.history]
    final = run.summary.final
    return {
        "arch": run.arch, "seed": run.seed, "epochs": len(run.history),
        "min_val_error": min(val_errors), "mean_val_error": statistics.fmean(val_errors),
        "final_val_error": val_errors[-1],
        "final_test_error": 100 * (1 - final["test_accuracy"]) if "test_accuracy" in final else None,
        "wall_time_sec": run.summary.wall_time_sec,
        "train_images_per_sec": run.summary.train_images_per_sec,
    }


def describe(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def paired_difference(differences: list[float]) -> dict:
    """Mean of per-seed differences with its t-based 95% CI and two-sided p-value (n >= 2)."""
    from scipy import stats

    n = len(differences)
    result = {"mean": statistics.fmean(differences), "n": n, "values": differences,
              "std": None, "ci95": None, "t": None, "p_value": None}
    if n < 2:
        return result
    std = statistics.stdev(differences)
    error = std / math.sqrt(n)
    margin = stats.t.ppf(0.975, n - 1) * error
    result.update(std=std, ci95=[result["mean"] - margin, result["mean"] + margin])
    if error > 0:
        t = result["mean"] / error
        result.update(t=t, p_value=float(2 * stats.t.sf(abs(t), n - 1)))
    return result


def summarize(runs: list[Run], context: dict) -> dict:
    per_run = [run_metrics(run) for run in sorted(runs, key=lambda r: (r.arch, r.seed))]
    arches = sorted({m["arch"] for m in per_run}, key=list(DISPLAY_NAMES).index)
    per_arch = {}
    for arch in arches:
        mine = [m for m in per_run if m["arch"] == arch]
        per_arch[arch] = {metric: describe([m[metric] for m in mine]) for metric in METRICS
                          if all(m[metric] is not None for m in mine)}
        per_arch[arch]["seeds"] = [m["seed"] for m in mine]
        for measure in ("wall_time_sec", "train_images_per_sec"):
            values = [m[measure] for m in mine if m[measure]]
            per_arch[arch][measure] = describe(values) if values else None
    paired = {}
    for arch in arches:
        plain = plain_counterpart(arch)
        if not is_accumulated(arch) or plain not in per_arch:
            continue
        by_seed = {(m["arch"], m["seed"]): m for m in per_run}
        seeds = sorted(s for a, s in by_seed if a == arch and (plain, s) in by_seed)
        paired[f"{arch} - {plain}"] = {
            "seeds": seeds,
            **{metric: paired_difference([by_seed[(arch, s)][metric] - by_seed[(plain, s)][metric] for s in seeds])
               for metric in METRICS if all(by_seed[(a, s)][metric] is not None for a in (arch, plain) for s in seeds)},
        }
    return {"context": context, "runs": per_run, "per_arch": per_arch, "paired": paired,
            "paper_table1": PAPER_TABLE1, "units": "top-1 error in percent"}


def _cell(summary: dict | None) -> str:
    if summary is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def _difference_cell(difference: dict | None) -> str:
    if difference is None:
        return "–"
    if difference["ci95"] is None:
        return f"{difference['mean']:+.2f} (one seed: no interval)"
    low, high = difference["ci95"]
    return f"{difference['mean']:+.2f} [{low:+.2f}, {high:+.2f}], p={difference['p_value']:.2g}" \
        if difference["p_value"] is not None else f"{difference['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"


def table_markdown(results: dict) -> str:
    context = results["context"]
    seeds = sorted({m["seed"] for m in results["runs"]})
    lines = [
        f"# {context['title']}",
        "",
        f"Dataset `{context['dataset']}`, depth {context['depth']}, recipe `{context['recipe']}`, "
        f"{context.get('shortcut', 'projection')} shortcuts, {context['epochs']} epochs, "
        f"seeds {', '.join(map(str, seeds))}. Top-1 error in %: the minimum and the mean over each run's epochs of "
        "the validation error (the paper's two columns), and the test error after the last epoch; mean ± std over "
        "seeds. Differences are paired by seed (same data order), with a Student-t 95% confidence interval and "
        "two-sided p-value.",
        "",
        "| | min top-1 val error | avg top-1 val error (over epochs) | final test error |",
        "|---|---|---|---|",
    ]
    for arch, summary in results["per_arch"].items():
        cells = [_cell(summary.get(metric)) for metric in ("min_val_error", "mean_val_error", "final_test_error")]
        lines.append(f"| {DISPLAY_NAMES[arch]} ({summary['min_val_error']['n']} runs) | " + " | ".join(cells) + " |")
    for name, difference in results["paired"].items():
        arch, plain = name.split(" - ")
        cells = [_difference_cell(difference.get(metric))
                 for metric in ("min_val_error", "mean_val_error", "final_test_error")]
        lines.append(f"| {DISPLAY_NAMES[arch]} − {DISPLAY_NAMES[plain]} (paired) | " + " | ".join(cells) + " |")
    for arch, paper in PAPER_TABLE1.items():
        lines.append(f"| Paper: {DISPLAY_NAMES[arch]} (CIFAR-10, ResNet-32, 50 epochs, 1 run) | "
                     f"{paper['min_val_error']:.2f} | {paper['mean_val_error']:.1f} | – |")
    lines.append("")
    if not context["dataset"].startswith("cifar10"):
        lines.append(f"These runs are on `{context['dataset']}`, not CIFAR-10: the paper's rows are there for "
                     "reference, not for comparison.")
    else:
        lines.append("The paper's rows are one run each, with He et al.'s 45k/5k split of CIFAR-10.")
    return "\n".join(lines) + "\n"


def write_figures(runs: list[Run], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Figures 3-6: per epoch, each architecture's mean over seeds with a ±1 std band."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    arches = sorted({r.arch for r in runs}, key=list(DISPLAY_NAMES).index)
    for filename, key, label in FIGURES:
        figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
        for arch in arches:
            curves = [[getattr(row, key) for row in r.history] for r in runs if r.arch == arch]
            epochs = min(len(c) for c in curves)
            values = np.array([c[:epochs] for c in curves])
            x = np.arange(1, epochs + 1)
            mean = values.mean(axis=0)
            line, = axes.plot(x, mean, label=f"{DISPLAY_NAMES[arch]} ({len(curves)} seeds)")
            if len(curves) > 1:
                std = values.std(axis=0, ddof=1)
                axes.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_title(f"{label} per epoch (mean ± std over seeds)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(runs: list[Run], context: dict, out_dir: pathlib.Path) -> dict:
    results = summarize(runs, context)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "table.md").write_text(table_markdown(results))
    write_figures(runs, out_dir)
    return results
