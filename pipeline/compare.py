"""One architecture of one experiment against another's, paired by seed, from the records alone.

`accresnet report` compares the two arms of one experiment. Some questions
take the arms from two experiments that differ in one declared setting, for
example each net at the initialisation that suits it (accumulated at gamma 1
from one experiment, plain at gamma 0 from another). The runs are paired by
seed (an experiment's seed fixes the data order and the initial kernels);
everything that makes the numbers comparable (data, depth, recipe, length)
must agree, and the settings in which the two sides differ are printed with
the result.

    accresnet compare --records A/records --arch accumulated \
        --baseline-records B/records --baseline-arch resnet [--seeds 3,4,5] [--out FILE.json]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from pipeline.flags import setting
from pipeline.records import RecordError, RunRecord, read_records
from pipeline.report import METRICS, PRIMARY_METRIC, paired_difference, run_metrics
from serving.atomic import write_atomically

# Settings that must agree for the errors to be comparable at all.
# (data_digest is compared where both records have one.)
MUST_AGREE = ("dataset", "data_digest", "depth", "width", "cardinality", "recipe", "epochs", "global_batch",
              "total_steps")
# Settings either side may differ in; the result names those that do.
MAY_DIFFER = ("arch", "zero_init_residual", "shortcut", "weight_decay", "batch_norm_momentum", "batch_norm_epsilon",
              "classifier_initializer", "projection_initializer", "augmentation", "learning_rate", "replicas",
              "mixed_precision")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """`accresnet compare`: an arch of one records folder minus an arch of another, paired by seed."""

    records_dir: str = setting(flag="--records", help="the records folder of the side compared")
    baseline_records_dir: str = setting(flag="--baseline-records", help="the records folder of the baseline")
    arch: str = setting("accumulated", help="the architecture compared")
    baseline_arch: str = setting("resnet", help="the baseline's architecture")
    seeds: str | None = setting(None, help="comma-separated seeds to pair", unset="every seed both sides have")
    out: str | None = setting(None, help="write the comparison as JSON here", unset="print it only")


def _setting(record: RunRecord, name: str):
    return getattr(record.summary.settings, name)


def _side(folder: str, arch: str) -> dict[int, RunRecord]:
    runs = {r.seed: r for r in read_records(folder) if r.arch == arch}
    if not runs:
        raise RecordError(f"{folder} holds no record of {arch}")
    return runs


def compare(config: CompareConfig) -> dict:
    """The paired differences (compared − baseline) per metric, with the settings of each side."""
    side, baseline = _side(config.records_dir, config.arch), _side(config.baseline_records_dir, config.baseline_arch)
    common = sorted(set(side) & set(baseline))
    seeds = common if config.seeds is None else [int(s) for s in config.seeds.split(",") if s.strip()]
    missing = [s for s in seeds if s not in common]
    if missing:
        raise RecordError(f"seed(s) {', '.join(map(str, missing))} are not recorded on both sides "
                          f"(both have {', '.join(map(str, common)) or 'none'})")
    if not seeds:
        raise RecordError("the two sides share no seed: nothing to pair")
    first, first_baseline = side[seeds[0]], baseline[seeds[0]]
    for seed in seeds:
        for name in MUST_AGREE:
            mine, theirs = _setting(side[seed], name), _setting(baseline[seed], name)
            if mine != theirs and not (name == "data_digest" and None in (mine, theirs)):
                raise RecordError(f"seed {seed}: the two sides differ in {name} ({mine!r} vs {theirs!r}), "
                                  "so their errors are not comparable")
    differing = {name: [_setting(first, name), _setting(first_baseline, name)] for name in MAY_DIFFER
                 if _setting(first, name) != _setting(first_baseline, name)}
    metrics = {seed: (run_metrics(side[seed]), run_metrics(baseline[seed])) for seed in seeds}
    return {
        "compared": {"records": config.records_dir, "arch": config.arch},
        "baseline": {"records": config.baseline_records_dir, "arch": config.baseline_arch},
        "shared": {name: _setting(first, name) for name in MUST_AGREE},
        "differing": differing,
        "seeds": seeds,
        "primary_metric": PRIMARY_METRIC,
        "values": {metric: {"compared": [metrics[s][0][metric] for s in seeds],
                            "baseline": [metrics[s][1][metric] for s in seeds]} for metric in METRICS},
        "differences": {metric: paired_difference([metrics[s][0][metric] - metrics[s][1][metric] for s in seeds])
                        for metric in METRICS
                        if all(m[metric] is not None for pair in metrics.values() for m in pair)},
        "units": "top-1 error in percent",
    }


def summary_lines(result: dict) -> list[str]:
    """The comparison as a reader wants it: who against whom, what differs, the numbers."""
    compared, baseline = result["compared"]["arch"], result["baseline"]["arch"]
    differing = "; ".join(f"{name} {a!r} vs {b!r}" for name, (a, b) in result["differing"].items())
    lines = [f"{compared} ({result['compared']['records']}) − {baseline} ({result['baseline']['records']}), "
             f"paired over seeds {', '.join(map(str, result['seeds']))}",
             f"differing settings: {differing or 'none'}"]
    # The primary metric first.
    ordered = sorted(result["differences"].items(), key=lambda item: item[0] != result["primary_metric"])
    for metric, difference in ordered:
        primary = " (primary)" if metric == result["primary_metric"] else ""
        signs = difference["signs"]
        if difference["ci95"] is None:
            interval = f"{difference['mean']:+.2f} (one seed: no interval)"
        else:
            low, high = difference["ci95"]
            p = f", p = {difference['p_value']:.2g}" if difference["p_value"] is not None else ""
            interval = f"{difference['mean']:+.2f} [{low:+.2f}, {high:+.2f}]{p}"
        lines.append(f"{metric}{primary}: {interval}; higher in {signs['higher']} of {difference['n']}, "
                     f"lower in {signs['lower']}; per seed " +
                     " ".join(f"{d:+.2f}" for d in difference["values"]))
    return lines


def run(config: CompareConfig) -> dict:
    result = compare(config)
    if config.out:
        path = pathlib.Path(config.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(result, indent=2) + "\n")
    return result
