"""The `accresnet` command: one verb per stage of the pipeline.

VERBS is the table of verbs: each names the function that adds its flags and
the function that runs it. The flags come from the verbs' config dataclasses
(pipeline/settings, pipeline/data/specs.py, pipeline/research/configs.py,
pipeline/release/configs.py, the server's and the client's flag modules), none
of which imports TensorFlow, numpy or gRPC; the modules that do the work are
imported inside the run functions, so `accresnet --help` and every verb's
--help answer without loading them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

from pipeline import flags
from pipeline.data.specs import DataConfig
from pipeline.errors import UserError
from pipeline.quiet import quiet_tensorflow_startup
from pipeline.release.configs import LabelConfig, PushConfig, ValidateConfig
from pipeline.research.configs import RUN_FLAGS as EXPERIMENT_RUN_FLAGS
from pipeline.research.configs import CompareConfig, ExperimentConfig, ReportConfig
from pipeline.settings.config import DEMO_RUN_FLAGS, DemoConfig, TrainConfig
from serving import classify
from serving.server import flags as server_flags

# The run functions below import the modules that do a verb's work when it runs: most of
# them import TensorFlow (seconds and hundreds of MB), which no --help needs.


@dataclasses.dataclass(frozen=True)
class Verb:
    name: str
    help: str
    description: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # the exit status


# --- train, export, prepare-data, tf-config -----------------------------------------------------


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, TrainConfig, required=("model_dir",))
    parser.add_argument("--export-base",
                        help="after training, export the model as the next numbered SavedModel version here")


def run_train(args: argparse.Namespace) -> int:
    from pipeline.export import saved_model
    from pipeline.train import distribute, loop

    summary = loop.train(flags.from_args(TrainConfig, args))
    shown = " ".join(f"{k} {v:.4f}" for k, v in summary.final.items())
    print(f"{summary.model_dir}: {summary.epochs_completed} epoch(s), {shown}")
    if args.export_base and summary.is_chief:
        print(saved_model.export_run(args.model_dir, args.export_base), flush=True)
    if summary.settings.workers > 1:
        distribute.leave_together("accresnet-train-done")
    return 0


def add_export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="the training run's --model-dir")
    parser.add_argument("--export-base", required=True, help="the model's base path, as TF Serving polls it")
    parser.add_argument("--top-k", type=int, default=5,
                        help="classes named per image in the top_k_* outputs and the classify signature, "
                             "at most the class count (default: %(default)s)")


def run_export(args: argparse.Namespace) -> int:
    from pipeline.export import saved_model

    print(saved_model.export_run(args.model_dir, args.export_base, top_k=args.top_k))
    return 0


def add_prepare_data_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, DataConfig, ("dataset", "data_dir"))
    parser.add_argument("--images-dir", help="write held-out test images here (replaced whole)")
    parser.add_argument("--images", type=int, default=100,
                        help="how many held-out images to write (default: %(default)s)")


def run_prepare_data(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(flags.from_args(DataConfig, args), images_dir=args.images_dir, images=args.images)
    print(prepare(config))
    return 0


def add_no_flags(parser: argparse.ArgumentParser) -> None:
    pass


def run_tf_config(args: argparse.Namespace) -> int:
    from pipeline.train.distribute import Cluster, ClusterConfigError, tf_config_from_environment

    try:
        config = tf_config_from_environment()
        Cluster.from_tf_config(config)  # as strict as train: what it would refuse is not printed
    except ClusterConfigError as error:
        print(f"accresnet tf-config: error: {error}", file=sys.stderr)
        return 2
    if config is None:
        print("accresnet tf-config: no TF_CONFIG and no Indexed Job variables: a single worker", file=sys.stderr)
        return 1
    print(config)
    return 0


# --- serve, classify ---------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    from serving.server import main

    return main.serve(args)


# --- experiment, report, compare, demo ---------------------------------------------------------------


def _announce(line: str) -> None:
    print(line, flush=True)


def add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ExperimentConfig,
                    ("out", "records", "arches", "seeds", "primary_metric", *EXPERIMENT_RUN_FLAGS))


def run_experiment(args: argparse.Namespace) -> int:
    from pipeline.research import experiment

    config = flags.from_args(ExperimentConfig, args)
    experiment.run_experiment(config, announce=_announce)
    print((ReportConfig(str(config.records)).report_dir / "table.md").read_text())
    return 0


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ReportConfig)


def run_report(args: argparse.Namespace) -> int:
    from pipeline.research import report

    config = flags.from_args(ReportConfig, args)
    report.report(config)
    print((config.report_dir / "table.md").read_text())
    return 0


def add_compare_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, CompareConfig)


def run_compare(args: argparse.Namespace) -> int:
    from pipeline.research import compare

    print("\n".join(compare.summary_lines(compare.run(flags.from_args(CompareConfig, args)))))
    return 0


def add_demo_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, DemoConfig, ("output_dir", *DEMO_RUN_FLAGS, "held_out"))


def run_demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    return demo.run_demo(flags.from_args(DemoConfig, args))


# --- validate, push, promote, rollback ---------------------------------------------------------------


def add_validate_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ValidateConfig, ("candidate", "dataset", "data_dir", "eval_images", "candidate_server",
                                             "candidate_rest_server", "candidate_server_base", "current_server",
                                             "current_label",
                                             "export_base", "model", "min_accuracy", "max_accuracy_drop",
                                             "latency_budget_ms"))


def run_validate(args: argparse.Namespace) -> int:
    from pipeline.release.blessing import BLESSING_FILE, REFUSED
    from pipeline.release.validate import validate

    blessing = validate(flags.from_args(ValidateConfig, args), announce=_announce)
    metrics, current = blessing.candidate_metrics, blessing.current.metrics
    if metrics:
        print(f"candidate accuracy {metrics.accuracy:.4f}, loss {metrics.loss:.4f} on {metrics.images} images"
              + (f"; served {current.accuracy:.4f}" if current else "; no served version to compare with"))
    print(f"{blessing.verdict}: {pathlib.Path(blessing.candidate) / BLESSING_FILE}")
    for reason in blessing.reasons:
        print(f"  refused: {reason}")
    return 0 if blessing.blessed else REFUSED


def add_push_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, PushConfig)


def run_push(args: argparse.Namespace) -> int:
    from pipeline.release.push import push

    pushed = push(flags.from_args(PushConfig, args), announce=_announce)
    print(pushed.path + (f" (labels: {_labels_text(pushed.labels)})" if pushed.labels else ""))
    return 0


def _labels_text(labels: dict[str, int]) -> str:
    return ", ".join(f"{label} -> {version}" for label, version in sorted(labels.items()))


def add_label_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, LabelConfig)


def run_promote(args: argparse.Namespace) -> int:
    from pipeline.release.push import promote

    print(_labels_text(promote(flags.from_args(LabelConfig, args), announce=_announce)))
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from pipeline.release.push import rollback

    print(_labels_text(rollback(flags.from_args(LabelConfig, args), announce=_announce)))
    return 0


VERBS = (
    Verb("train", "train a model with a distribution strategy",
         "Train the plain or accumulated CIFAR ResNet with MirroredStrategy (local devices) or "
         "MultiWorkerMirroredStrategy (when TF_CONFIG names several workers).",
         add_train_flags, run_train),
    Verb("export", "export a training run as the next versioned SavedModel",
         "Write the latest checkpoint of --model-dir as <export-base>/<next version>/, a SavedModel with the "
         "signatures serving_default (uint8 images [batch, 32, 32, 3]), serving_bytes (encoded images [batch]) "
         "and classify (tf.Examples); prints the version's path. The version appears atomically.",
         add_export_flags, run_export),
    Verb("prepare-data", "download and prepare a dataset, and write held-out images for the client",
         "Prepare a TensorFlow Datasets source in --data-dir once, before several training workers read it, and "
         "optionally write its first test images as PNG files (one folder per class) for `accresnet classify`. "
         "Other sources are read and checked.",
         add_prepare_data_flags, run_prepare_data),
    Verb("serve", "serve SavedModels over TF Serving's gRPC and REST APIs",
         "A model server compatible with TF Serving (PredictionService, ModelService, health, REST, version "
         "polling, batching, Prometheus). It takes tensorflow_model_server's flags, so either can be started "
         "with the same arguments.",
         server_flags.add_flags, run_serve),
    Verb("classify", "classify image files through a model server's gRPC API",
         "Send images to TF Serving or `accresnet serve` as Predict requests and print each image's top-k "
         "classes. Unreadable files are reported on stderr and make the exit status non-zero; the others are "
         "still classified.",
         classify.add_flags, classify.run),
    Verb("experiment", "reproduce the paper's Table 1 and Figures 3-6 over several seeds",
         "Train every (arch, seed) with the same data order per seed, writing each finished run's record "
         "(settings, per-epoch history, final and test metrics) into --records, then write from the records "
         "results.json (min and mean validation error over epochs, final validation and test error, mean ± std "
         "over seeds, paired accumulated - plain differences with 95% confidence intervals and sign counts; the "
         "primary metric, --primary-metric, is listed first), table.md (the paper's Table 1 layout) and figures 3-6 as PNG. "
         "Run it again, here or on another machine with the records, to go on: recorded runs are skipped, "
         "interrupted ones resume from their checkpoints in --out.",
         add_experiment_flags, run_experiment),
    Verb("report", "rebuild an experiment's table and figures from its records alone",
         "Read every run record (<arch>-seed<N>.json) of --records and write results.json, table.md and "
         "figures 3-6, as `accresnet experiment` does at its end; no checkpoint and no TensorFlow needed.",
         add_report_flags, run_report),
    Verb("compare", "one experiment's architecture against another's, paired by seed, from the records",
         "Pair the runs of --arch in --records with those of --baseline-arch in --baseline-records by seed and "
         "print the differences (compared - baseline) of the test and validation errors, the primary metric "
         "(--primary-metric) first, with Student-t 95% intervals, p-values and sign counts. The two sides must agree "
         "in data, depth, recipe and length; the settings they differ in are printed with the result.",
         add_compare_flags, run_compare),
    Verb("validate", "check that a candidate export loads, answers and is at least as good as the served one",
         "Start a model server on the candidate as the Deployment starts one, check its gRPC and REST answers and "
         "latency, evaluate it through that server and compare it with the version a server now serves (over "
         "gRPC); write blessing.json and confusion.png into the candidate. Exit status 0 when blessed, 3 when "
         "refused.",
         add_validate_flags, run_validate),
    Verb("push", "publish a blessed candidate as the next served version (optionally as canary)",
         "Copy a candidate that validate blessed to the served base path as the next version, appearing whole; "
         "with --model-config-file, label it canary there (stable stays on the version served until then).",
         add_push_flags, run_push),
    Verb("promote", "move the stable label to the canary",
         "In the servers' model config file: stable moves to the canary's version, rollback keeps the old one.",
         add_label_flags, run_promote),
    Verb("rollback", "move the stable label back to the version before the last promotion",
         "In the servers' model config file: stable moves back to the rollback label's version; the demoted "
         "version is no longer loaded.",
         add_label_flags, run_rollback),
    Verb("tf-config", "print the TF_CONFIG this process would train with",
         "TF_CONFIG as set, or derived for a pod of a Kubernetes Indexed Job from JOB_COMPLETION_INDEX, "
         "ACCRESNET_NUM_WORKERS, ACCRESNET_JOB_NAME, ACCRESNET_WORKER_SERVICE and ACCRESNET_WORKER_PORT "
         "(default 2222).",
         add_no_flags, run_tf_config),
    Verb("demo", "train, export, serve and classify on embedded defaults",
         "The whole chain on one machine: train the accumulated ResNet-32 (quick recipe) on the built-in "
         "synthetic data, export it, start a model server as the Kubernetes Deployment starts it "
         "(tensorflow_model_server if on PATH, else accresnet serve), classify held-out images through the gRPC "
         "client, print the accuracy and stop the server.",
         add_demo_flags, run_demo),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accresnet",
        description="Train, export, serve and query the accumulated residual network (Saraiya 2018) and its "
                    "plain ResNet baseline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="TensorFlow's own logs too, its start-up lines included")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        sub = verbs.add_parser(verb.name, help=verb.help, description=verb.description)
        verb.add_flags(sub)
        sub.set_defaults(run=verb.run)
    return parser


def _configure_logging(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        quiet_tensorflow_startup()  # the lines TF_CPP_MIN_LOG_LEVEL cannot reach (pipeline/quiet.py)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("accresnet: interrupted", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"accresnet {args.verb}: error: {error}", file=sys.stderr)
        # Bad flags or data (2) are worth no retry; a preemption (143) or a lost peer (144) are.
        return getattr(error, "exit_status", 2 if isinstance(error, ValueError) else 1)


if __name__ == "__main__":
    sys.exit(main())
