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

import json
import pathlib

from pipeline.research.configs import CompareConfig
from pipeline.research.health import gate_statement
from pipeline.research.records import RecordError, RunRecord, read_records
from pipeline.research.report import METRICS, context_of, paired_difference, run_metrics
from pipeline.train import rundir
from serving.atomic import write_atomically

# Run settings that must agree for the errors to be comparable at all (data_digest where both
# records have one), besides the recipe's own fields.
MUST_AGREE = ("dataset", "data_digest", "num_classes", "class_names", "depth", "width", "cardinality", "recipe",
              "epochs", "global_batch", "per_replica_batch", "total_steps", "steps_per_epoch")
# Settings either side may differ in, the same for every pair; the result names those that do.
MAY_DIFFER = ("arch", "zero_init_residual", "shortcut", "weight_decay", "batch_norm_momentum", "batch_norm_epsilon",
              "batch_norm_weight_decay", "fused_batch_norm", "classifier_initializer", "projection_initializer",
              "augmentation", "learning_rate", "replicas", "workers", "mixed_precision", "jit", "image_size",
              "recipe_settings", "overrides", "export_best", "early_stopping")
# Every other field of RunSettings, and why it is not compared.
NOT_COMPARED = {"seed": "the pairing itself"}


def _side(folder: str, arch: str) -> dict[int, RunRecord]:
    records = read_records(folder)
    context_of(records)  # one experiment per folder, or a RecordError naming what differs
    runs = {r.seed: r for r in records if r.arch == arch}
    if not runs:
        raise RecordError(f"{folder} holds no record of {arch}")
    return runs


def _differences(mine: RunRecord, theirs: RunRecord) -> dict[str, list]:
    """The MAY_DIFFER settings in which a pair differs; refuses a pair that differs in a MUST_AGREE
    one or in the recipe's fields."""
    seed = mine.seed
    for name in MUST_AGREE:
        a, b = getattr(mine.summary.settings, name), getattr(theirs.summary.settings, name)
        if rundir.settings_differ(name, a, b):
            raise RecordError(f"seed {seed}: the two sides differ in {name} ({a!r} vs {b!r}), "
                              "so their errors are not comparable")
    recipe_fields = sorted(k for k in set(mine.recipe) | set(theirs.recipe)
                           if k != "description" and mine.recipe.get(k) != theirs.recipe.get(k))
    if recipe_fields:
        raise RecordError(f"seed {seed}: the two sides' recipes differ in {', '.join(recipe_fields)}, "
                          "so their errors are not comparable")
    pairs = {name: [getattr(mine.summary.settings, name), getattr(theirs.summary.settings, name)]
             for name in MAY_DIFFER}
    return {name: pair for name, pair in pairs.items()
            if rundir.settings_differ(name, *pair)}


def compare(config: CompareConfig) -> dict:
    """The paired differences (compared − baseline) per metric, with what the two sides differ in."""
    side, baseline = _side(config.records_dir, config.arch), _side(config.baseline_records_dir, config.baseline_arch)
    common = sorted(set(side) & set(baseline))
    if not common:
        raise RecordError(f"the two sides share no seed ({config.arch}: {', '.join(map(str, sorted(side)))}; "
                          f"{config.baseline_arch}: {', '.join(map(str, sorted(baseline)))}): nothing to pair")
    seeds = common if config.seeds is None else list(config.seeds)
    missing = [s for s in seeds if s not in common]
    if missing:
        raise RecordError(f"seed(s) {', '.join(map(str, missing))} are not recorded on both sides "
                          f"(both have {', '.join(map(str, common))})")
    differing = {seed: _differences(side[seed], baseline[seed]) for seed in seeds}
    first = differing[seeds[0]]
    for seed in seeds[1:]:
        if differing[seed] != first:
            raise RecordError(f"the pairs differ in different settings (seed {seeds[0]}: {first or 'none'}; "
                              f"seed {seed}: {differing[seed] or 'none'}): one comparison asks one question")
    metrics = {seed: (run_metrics(side[seed]), run_metrics(baseline[seed])) for seed in seeds}
    first_record = side[seeds[0]]
    return {
        "compared": {"records": config.records_dir, "arch": config.arch},
        "baseline": {"records": config.baseline_records_dir, "arch": config.baseline_arch},
        "shared": {name: getattr(first_record.summary.settings, name) for name in MUST_AGREE},
        "differing": first,
        "seeds": seeds,
        "primary_metric": config.primary_metric,
        # Did each run start? A pair with a run that did not measures that, not the settings.
        "start_gate": {"statement": gate_statement(first_record.summary.settings.num_classes),
                       "failing": [[side_name, seed] for seed in seeds
                                   for side_name, m in zip(("compared", "baseline"), metrics[seed])
                                   if not m["start_health"]["passed"]]},
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
    failing = result["start_gate"]["failing"]
    names = {"compared": compared, "baseline": baseline}
    lines.append("start-up gate: " + ("every run passes" if not failing else "fails for " + ", ".join(
        f"{names[side]} seed {seed}" for side, seed in failing) + ": the pairs with them measure a net that did "
        "not start"))
    # The primary metric first.
    ordered = sorted(result["differences"].items(), key=lambda item: item[0] != result["primary_metric"])
    if result["primary_metric"] not in result["differences"]:
        lines.append(f"{result['primary_metric']} (primary): not recorded on both sides")
    for metric, difference in ordered:
        primary = " (primary)" if metric == result["primary_metric"] else ""
        signs = difference["signs"]
        if difference["ci95"] is None:
            interval = f"{difference['mean']:+.2f} (one seed: no interval)"
        else:
            low, high = difference["ci95"]
            p = f", p = {difference['p_value']:.2g}" if difference["p_value"] is not None else ""
            interval = f"{difference['mean']:+.2f} [{low:+.2f}, {high:+.2f}]{p}"
        sign_test = f" (sign test p = {signs['p_value']:.2g})" if signs["p_value"] is not None else ""
        lines.append(f"{metric}{primary}: {interval}; higher in {signs['higher']} of {difference['n']}, "
                     f"lower in {signs['lower']}{sign_test}; per seed " +
                     " ".join(f"{d:+.2f}" for d in difference["values"]))
    return lines


def run(config: CompareConfig) -> dict:
    result = compare(config)
    if config.out:
        path = pathlib.Path(config.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(result, indent=2) + "\n")
    return result
