"""The `accresnet` command: one verb per stage of the pipeline.

Each verb imports its module only when it runs, so `accresnet --help` and
the flag checks answer without loading TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

from pipeline import config as cfg

DATASET_HELP = (
    "synthetic[:N] (built in, offline; N training images, default 10000), synthetic-hard[:N] (the same with "
    "noise, clutter and occlusion), cifar10, cifar100, "
    "tfds:NAME (TensorFlow Datasets), folder:PATH (one subfolder per class, or PATH/train and "
    "PATH/test of those), cifar-bin:PATH (the CIFAR-10/100 binary release, folder or .tar.gz)"
)


def _recipes_help() -> str:
    # argparse %-formats help strings; the descriptions mention percentages.
    return "; ".join(f"{r.name}: {r.description}" for r in cfg.RECIPES.values()).replace("%", "%%")


def _add_shortcut_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shortcut", choices=cfg.SHORTCUTS,
                        help="where a block changes shape: projection (1x1 conv, no BN: option B as the Keras "
                             "example builds it), projection-bn (1x1 conv and BN), padding (He et al.'s option A "
                             "for CIFAR: subsampled identity with zero channels, no parameters) (default: the "
                             "recipe's: padding for he2016 and he2016-subset, else projection)")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=cfg.ARCHES, default="accumulated",
                        help="plain ResNet v1 or the accumulated ResNet; beyond the paper: wide (WRN) and "
                             "aggregated (ResNeXt) nets, plain or accumulated (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=32,
                        help="resnet/accumulated: 6n+2 (20, 32, 44, 56, 110); wrn: 6n+4 (16, 28, 40); "
                             "resnext: 9n+2 (11, 29) (default: %(default)s)")
    parser.add_argument("--width", type=int,
                        help="wrn: the widening factor k (default 4); resnext: the width d of a group (default 4)")
    parser.add_argument("--cardinality", type=int, help="resnext: the number of groups C (default 8)")
    parser.add_argument("--dataset", default="synthetic", metavar="SPEC", help=DATASET_HELP)
    parser.add_argument("--data-dir", help="TensorFlow Datasets data directory for cifar10/cifar100/tfds:")
    parser.add_argument("--val-split", type=float,
                        help="fraction of the training split held out for validation "
                             "(default: the source's validation split, else 0.1: 45k/5k on CIFAR)")
    parser.add_argument("--train-images", type=int,
                        help="train on N images of the training split only, a fixed choice with as many of "
                             "each class as it holds (default: the recipe's, else all)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable files of a folder: dataset (counted in the log) instead of failing")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="turn off pad-crop-flip augmentation of the training images")
    parser.add_argument("--recipe", choices=tuple(cfg.RECIPES), default="quick", help=_recipes_help())
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="train this many epochs (the schedule is stretched to fit)")
    length.add_argument("--steps", type=int, help="train this many steps (the schedule is stretched to fit)")
    parser.add_argument("--batch-size", type=int,
                        help="images per replica per step (default: the recipe's). The global batch is "
                             "this times the number of replicas, and the learning rate follows it "
                             "linearly: recipe rate x global batch / recipe batch")
    _add_shortcut_flag(parser)
    parser.add_argument("--model-dir", required=True,
                        help="checkpoints, logs, history.csv and summary.json; a run started again "
                             "with the same flags resumes from its last finished epoch")
    parser.add_argument("--export-base",
                        help="after training, export the model as the next numbered SavedModel version here")
    parser.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation (default: 0)")
    parser.add_argument("--devices", type=int,
                        help="replicas on this machine: N GPUs, or the CPU split into N logical devices")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="bfloat16 compute on CPU, float16 with loss scaling on GPU")
    parser.add_argument("--jit", action="store_true", help="compile the forward and backward pass with XLA")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels for bit-identical reruns (slower)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="a progress bar even when not on a terminal")
    progress.add_argument("--no-progress", dest="progress", action="store_false",
                          help="plain log lines even on a terminal")


def train_config_from_args(args: argparse.Namespace) -> cfg.TrainConfig:
    return cfg.TrainConfig(
        model_dir=args.model_dir, arch=args.arch, depth=args.depth,
        data=cfg.DataConfig(spec=args.dataset, data_dir=args.data_dir, val_split=args.val_split,
                            augment=args.augment, skip_bad_images=args.skip_bad_images,
                            train_images=args.train_images),
        recipe=args.recipe, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        shortcut=args.shortcut, width=args.width, cardinality=args.cardinality,
        seed=args.seed, devices=args.devices, mixed_precision=args.mixed_precision, jit=args.jit,
        deterministic=args.deterministic, progress=args.progress,
    )


def _run_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    from pipeline import train

    summary = train.train(config)
    final = summary["final"]
    shown = " ".join(f"{k} {v:.4f}" for k, v in final.items())
    print(f"{summary['model_dir']}: {summary['epochs_completed']} epoch(s), {shown}")
    if args.export_base and summary["is_chief"]:
        from pipeline import export

        print(export.export_run(args.model_dir, args.export_base))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from pipeline import export

    print(export.export_run(args.model_dir, args.export_base, top_k=args.top_k))
    return 0


def _run_prepare_data(args: argparse.Namespace) -> int:
    from pipeline.prepare import PrepareConfig, prepare

    config = PrepareConfig(cfg.DataConfig(spec=args.dataset, data_dir=args.data_dir), images_dir=args.images_dir,
                           images=args.images)
    print(prepare(config))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from serving.server.main import serve

    return serve(args)


def _run_experiment(args: argparse.Namespace) -> int:
    from pipeline.experiment import ExperimentConfig, parse_seeds, run_experiment

    config = ExperimentConfig(
        out_dir=args.out, arches=tuple(a.strip() for a in args.arches.split(",") if a.strip()), depth=args.depth,
        seeds=parse_seeds(args.seeds), recipe=args.recipe, dataset=args.dataset, data_dir=args.data_dir,
        epochs=args.epochs, batch_size=args.batch_size, width=args.width, cardinality=args.cardinality,
        train_images=args.train_images, devices=args.devices, mixed_precision=args.mixed_precision,
        shortcut=args.shortcut)
    run_experiment(config, announce=lambda line: print(line, flush=True))
    print((pathlib.Path(args.out) / "table.md").read_text())
    return 0


def _run_tf_config(args: argparse.Namespace) -> int:
    from pipeline.distribute import tf_config_from_environment

    config = tf_config_from_environment()
    if config is None:
        print("accresnet tf-config: no TF_CONFIG and no Indexed Job variables: a single worker", file=sys.stderr)
        return 1
    print(config)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(output_dir=args.output_dir, dataset=args.dataset, data_dir=args.data_dir,
                               arch=args.arch, depth=args.depth, width=args.width, cardinality=args.cardinality,
                               epochs=args.epochs, batch_size=args.batch_size, devices=args.devices,
                               held_out=args.held_out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accresnet",
        description="Train, export, serve and query the accumulated residual network (Saraiya 2018) and its "
                    "plain ResNet baseline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="TensorFlow's own logs too")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    train = verbs.add_parser(
        "train", help="train a model with a distribution strategy",
        description="Train the plain or accumulated CIFAR ResNet with MirroredStrategy (local "
                    "devices) or MultiWorkerMirroredStrategy (when TF_CONFIG names several workers).",
    )
    _add_train_flags(train)
    train.set_defaults(run=_run_train)

    export = verbs.add_parser(
        "export", help="export a training run as the next versioned SavedModel",
        description="Write the latest checkpoint of --model-dir as <export-base>/<next version>/, a SavedModel "
                    "with the signatures serving_default (uint8 images [batch, 32, 32, 3]) and serving_bytes "
                    "(encoded images [batch]); prints the version's path. The version appears atomically.",
    )
    export.add_argument("--model-dir", required=True, help="the training run's --model-dir")
    export.add_argument("--export-base", required=True, help="the model's base path, as TF Serving polls it")
    export.add_argument("--top-k", type=int, default=5,
                        help="classes named per image in the top_k_* outputs and the classify signature, "
                             "at most the class count (default: %(default)s)")
    export.set_defaults(run=_run_export)

    prepare_data = verbs.add_parser(
        "prepare-data", help="download and prepare a dataset, and write held-out images for the client",
        description="Prepare a TensorFlow Datasets source in --data-dir once, before several training workers "
                    "read it, and optionally write its first test images as PNG files (one folder per class) "
                    "for `accresnet classify`. Other sources are read and checked.")
    prepare_data.add_argument("--dataset", default="synthetic", metavar="SPEC", help=DATASET_HELP)
    prepare_data.add_argument("--data-dir", help="TensorFlow Datasets data directory")
    prepare_data.add_argument("--images-dir", help="write held-out test images here (replaced whole)")
    prepare_data.add_argument("--images", type=int, default=100,
                              help="how many held-out images to write (default: %(default)s)")
    prepare_data.set_defaults(run=_run_prepare_data)

    from serving.server.options import add_flags

    serve = verbs.add_parser(
        "serve", help="serve SavedModels over TF Serving's gRPC and REST APIs",
        description="A model server compatible with TF Serving (PredictionService, ModelService, health, REST, "
                    "version polling, batching, Prometheus). It takes tensorflow_model_server's flags, so "
                    "either can be started with the same arguments.")
    add_flags(serve)
    serve.set_defaults(run=_run_serve)

    from serving import classify

    classify_parser = verbs.add_parser(
        "classify", help="classify image files through a model server's gRPC API",
        description="Send images to TF Serving or `accresnet serve` as Predict requests and print each "
                    "image's top-k classes. Unreadable files are reported on stderr and make the exit status "
                    "non-zero; the others are still classified.")
    classify.add_flags(classify_parser)
    classify_parser.set_defaults(run=classify.run)

    experiment = verbs.add_parser(
        "experiment", help="reproduce the paper's Table 1 and Figures 3-6 over several seeds",
        description="Train every (arch, seed) with the same data order per seed, then write results.json "
                    "(min and mean validation error over epochs, final validation and test error, mean ± std over "
                    "seeds, paired accumulated - plain differences with 95%% confidence intervals), table.md "
                    "(the paper's Table 1 layout) and figures 3-6 as PNG. Run it again to resume: finished runs "
                    "are kept, interrupted ones resume from their checkpoints.")
    experiment.add_argument("--arches", default="resnet,accumulated",
                            help=f"comma-separated, from {', '.join(cfg.ARCHES)} (default: %(default)s)")
    experiment.add_argument("--depth", type=int, default=32, help="network depth (default: %(default)s)")
    experiment.add_argument("--width", type=int, help="wrn: widening factor k; resnext: group width d")
    experiment.add_argument("--cardinality", type=int, help="resnext: number of groups C")
    experiment.add_argument("--seeds", default="3", help="a count (3: seeds 0, 1, 2) or a list (0,4,7) "
                                                         "(default: %(default)s)")
    experiment.add_argument("--recipe", choices=tuple(cfg.RECIPES), default="paper50", help=_recipes_help())
    experiment.add_argument("--dataset", default="cifar10", metavar="SPEC", help=DATASET_HELP)
    experiment.add_argument("--data-dir", help="TensorFlow Datasets data directory")
    experiment.add_argument("--train-images", type=int, help="train on N training images only, as many of each class")
    experiment.add_argument("--epochs", type=int, help="epochs per run (default: the recipe's)")
    experiment.add_argument("--batch-size", type=int, help="images per replica per step (default: the recipe's)")
    _add_shortcut_flag(experiment)
    experiment.add_argument("--devices", type=int, help="replicas on this machine")
    experiment.add_argument("--mixed-precision", action="store_true")
    experiment.add_argument("--out", required=True, help="the experiment's folder (runs/, results, table, figures)")
    experiment.set_defaults(run=_run_experiment)

    tf_config = verbs.add_parser(
        "tf-config", help="print the TF_CONFIG this process would train with",
        description="TF_CONFIG as set, or derived for a pod of a Kubernetes Indexed Job from "
                    "JOB_COMPLETION_INDEX, ACCRESNET_NUM_WORKERS, ACCRESNET_JOB_NAME, "
                    "ACCRESNET_WORKER_SERVICE and ACCRESNET_WORKER_PORT (default 2222).")
    tf_config.set_defaults(run=_run_tf_config)

    demo = verbs.add_parser(
        "demo", help="train, export, serve and classify on embedded defaults",
        description="The whole chain on one machine: train the accumulated ResNet-32 (quick recipe) on the "
                    "built-in synthetic data, export it, start a model server (tensorflow_model_server if on "
                    "PATH, else accresnet serve), classify held-out images through the gRPC client, print the "
                    "accuracy and stop the server.")
    demo.add_argument("--output-dir", default="demo-output", help="where everything goes (default: %(default)s)")
    demo.add_argument("--dataset", default="synthetic:3000", metavar="SPEC",
                      help=f"{DATASET_HELP} (default: %(default)s)")
    demo.add_argument("--data-dir", help="TensorFlow Datasets data directory")
    demo.add_argument("--arch", choices=cfg.ARCHES, default="accumulated")
    demo.add_argument("--width", type=int, help="wrn: widening factor k; resnext: group width d")
    demo.add_argument("--cardinality", type=int, help="resnext: number of groups C")
    demo.add_argument("--depth", type=int, default=32)
    demo.add_argument("--epochs", type=int, help="training epochs (default: the quick recipe's 3)")
    demo.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    demo.add_argument("--devices", type=int, help="replicas on this machine")
    demo.add_argument("--held-out", type=int, default=200, help="test images to classify (default: %(default)s)")
    demo.set_defaults(run=_run_demo)
    return parser


def _configure_logging(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("accresnet: interrupted", file=sys.stderr)
        return 130
    except cfg.UserError as error:
        print(f"accresnet {args.verb}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
