"""`accresnet demo`: the whole chain on embedded defaults.

Train the accumulated ResNet-32 (quick recipe) on the built-in synthetic data
(or --dataset), export it as version 1 of model "accresnet", write held-out
test images as PNG files, start a model server exactly as the Kubernetes
Deployment starts TF Serving (the shipped model, batching and monitoring
configs; `tensorflow_model_server` when it is on PATH, else `accresnet
serve`, with paths and ports mapped onto this machine and printed), classify
the files through the gRPC client, print the accuracy and a few examples, and
stop the server.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time

from pipeline.data import datasets
from pipeline.data.prepare import write_held_out
from pipeline.export import saved_model
from pipeline.settings.config import DemoConfig
from pipeline.train import loop
from serving.client import Classifier
from serving.deployment import MODEL_NAME, serving_locally

log = logging.getLogger(__name__)


def run_demo(config: DemoConfig) -> int:
    started = time.monotonic()
    out = pathlib.Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, models_dir = out / "run", out / "models"
    base_path = models_dir / MODEL_NAME
    run = dataclasses.replace(config.run, model_dir=str(model_dir))

    print(f"== 1/4 train {run.net.arch} ResNet-{run.net.depth} on {run.data.spec} ({run.recipe.name} recipe) "
          f"-> {model_dir}")
    summary = loop.train(run)
    print(f"   {summary.epochs_completed} epochs, val accuracy {summary.final.get('val_accuracy', float('nan')):.4f}, "
          f"{summary.train_images_per_sec or 0:.0f} images/s")

    print(f"== 2/4 export -> {base_path}")
    version = saved_model.export_run(model_dir, base_path)
    print(f"   {version}")

    data = datasets.load(run.data)
    held_out = write_held_out(data, out / "held-out", config.held_out)
    # The server starts exactly as the Kubernetes Deployment starts TF Serving
    # (shipped configs, batching on); only paths and ports are mapped.
    with serving_locally(models_dir, out / "server-config", out / "server.log") as server:
        print(f"== 3/4 serve as deployed: {' '.join(server.command)}")
        for mapping in server.mappings:
            print(f"   mapped {mapping}")
        print(f"== 4/4 classify {len(held_out)} held-out images through gRPC at {server.grpc_address}")
        truth = dict(held_out)
        classify_started = time.monotonic()
        with Classifier(server.grpc_address, MODEL_NAME) as classifier:
            predictions = list(classifier.classify_files([path for path, _ in held_out], top_k=3))
        seconds = time.monotonic() - classify_started
        flags, grpc_port = server.server.flags, server.server.grpc_port
    correct = sum(p.class_name == truth[p.path] for p in predictions)
    accuracy = correct / len(predictions)
    print(f"\n{'image':<44} {'true class':<20} {'predicted':<20} {'prob':>6}")
    for prediction in predictions[:config.examples]:
        print(f"{prediction.path:<44} {truth[prediction.path]:<20} {prediction.class_name:<20} "
              f"{prediction.probability:>6.3f}")
    print(f"\nheld-out accuracy through the server: {correct}/{len(predictions)} = {accuracy:.4f} "
          f"({len(predictions) / seconds:.0f} images/s over gRPC)")
    print(f"server stopped; total {time.monotonic() - started:.0f}s. Try it yourself:\n"
          f"  accresnet serve {' '.join(flags)}\n"
          f"  accresnet classify --server localhost:{grpc_port} {out / 'held-out'}")
    problem = below_chance(accuracy, data.num_classes)
    if problem:
        print(f"accresnet demo: error: {problem}", file=sys.stderr)
        return 1
    return 0


def below_chance(accuracy: float, num_classes: int) -> str | None:
    """Why the demo fails when the served model is no better than guessing; None when it is."""
    chance = 1 / num_classes
    if accuracy > chance:
        return None
    return (f"held-out accuracy {accuracy:.4f} is not above chance ({chance:.4f} for {num_classes} classes): the "
            "chain ran, but the model did not learn; train longer (--steps) or check the data")

