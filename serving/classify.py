"""The `accresnet classify` verb: image files in, top-k classes out."""

from __future__ import annotations

import argparse
import json
import sys


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files (any format Pillow opens) or folders of them")
    parser.add_argument("--server", default="localhost:8500",
                        help="HOST:PORT of the gRPC port, or of the REST port with --rest (default: %(default)s)")
    parser.add_argument("--rest", action="store_true",
                        help="talk to the REST API (--rest_api_port) instead of gRPC; versions and labels alike")
    parser.add_argument("--model", default="accresnet", help="model name on the server (default: %(default)s)")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, help="a model version (default: the latest available)")
    version.add_argument("--label", help="a version label from the server's model config, e.g. stable")
    parser.add_argument("--signature", default="serving_default",
                        help="serving_default sends 32x32 pixels; serving_bytes sends the files' own bytes "
                             "(default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per request (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries with exponential backoff while the server is UNAVAILABLE (default: %(default)s)")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate: use TLS")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image and line, with the version that answered (from the "
                             "gRPC response's model spec; over REST, which names none, only a --version asked "
                             "for) and the --label asked for")


class _Progress:
    """A one-line progress bar on a terminal's stderr, for folders of many images."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def advance(self, count: int) -> None:
        self.done += count
        if self.enabled:
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}", end="", file=sys.stderr,
                  flush=True)

    def finish(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _table_row(prediction, width: int) -> str:
    top = ", ".join(f"{name} {p:.3f}" for name, p in prediction.top_k)
    return f"{prediction.path:<{width}}  {prediction.class_name:<20} {prediction.probability:>7.3f}   {top}"


def run(args: argparse.Namespace) -> int:
    from serving.client import Classifier, ClientError, RestClassifier, image_files

    if args.top_k < 1 or args.batch_size < 1:
        print("accresnet classify: error: --top-k and --batch-size must be positive", file=sys.stderr)
        return 2
    files = image_files(args.paths)
    if not files:
        print("accresnet classify: error: no image files found", file=sys.stderr)
        return 2
    failures = []

    def on_error(path, error):
        failures.append(path)
        print(f"accresnet classify: cannot read {path}: {error}", file=sys.stderr)

    progress = _Progress(len(files), sys.stderr.isatty() and not args.json and len(files) > args.batch_size)
    width = min(max(len(f) for f in files), 60)
    try:
        client = RestClassifier if args.rest else Classifier
        with client(args.server, args.model, args.signature, args.version, args.label, args.timeout,
                    args.retries, args.tls_ca) as classifier:
            if not args.json:
                print(f"{'image':<{width}}  {'class':<20} {'prob':>7}   top-{args.top_k}")
            for prediction in classifier.classify_files(files, args.batch_size, args.top_k, on_error,
                                                        progress.advance):
                if args.json:
                    print(json.dumps(prediction.to_json()), flush=True)
                else:
                    print(_table_row(prediction, width), flush=progress.enabled)
    except ClientError as error:
        progress.finish()
        print(f"accresnet classify: error: {error}", file=sys.stderr)
        return 1
    progress.finish()
    if failures:
        print(f"accresnet classify: {len(failures)} of {len(files)} file(s) could not be read", file=sys.stderr)
        return 1
    return 0
