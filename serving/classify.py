"""The `accresnet classify` verb: image files in, top-k classes out."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

from serving.contract import DEFAULT_TOP_K, MODEL_NAME, SERVING_DEFAULT

OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files (any format Pillow opens) or folders of them")
    parser.add_argument("--server", default="localhost:8500",
                        help="HOST:PORT of the gRPC port, or of the REST port with --rest (default: %(default)s)")
    parser.add_argument("--rest", action="store_true",
                        help="talk to the REST API (--rest_api_port) instead of gRPC; versions and labels alike")
    parser.add_argument("--model", default=MODEL_NAME, help="model name on the server (default: %(default)s)")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, help="a model version (default: the latest available)")
    version.add_argument("--label", help="a version label from the server's model config, e.g. stable")
    parser.add_argument("--signature", default=SERVING_DEFAULT,
                        help="serving_default sends 32x32 pixels; serving_bytes sends the files' own bytes "
                             "(default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help="classes shown per image, at most the export's --top-k (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once; the answers still come in order (default: %(default)s)")
    parser.add_argument("--output", metavar="FILE",
                        help="also write every prediction to FILE: JSON lines (.jsonl) or CSV (.csv), by its "
                             "extension; written to FILE.partial and renamed when complete")
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


# Characters a terminal acts on instead of showing: C0 and C1 controls (escape sequences,
# carriage returns, newlines), line and paragraph separators, and the bidirectional
# overrides and isolates that reorder what follows them.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every character a terminal would act on written as a Python escape
    (ESC as \\x1b, a newline as \\n): class names, paths and servers' messages are
    shown, never obeyed."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def _header(width: int, shown: int) -> str:
    return f"{'image':<{width}}  {'class':<20} {'prob':>7}   top-{shown}"


def _table_row(prediction, width: int) -> str:
    top = ", ".join(f"{printable(name)} {p:.3f}" for name, p in prediction.top_k)
    return (f"{printable(prediction.path):<{width}}  {printable(prediction.class_name):<20} "
            f"{prediction.probability:>7.3f}   {top}")


def _error(message) -> None:
    print(f"accresnet classify: {printable(str(message))}", file=sys.stderr)


class _OutputFile:
    """--output FILE: every prediction as a JSON line or a CSV row, written to FILE.partial and
    renamed to FILE only when the run completes, so a FILE is never a torn half."""

    CSV_COLUMNS = ("path", "class_name", "class_id", "probability", "version", "label", "top_k")

    def __init__(self, path: str):
        self.path, self.partial = path, path + ".partial"
        self.format = OUTPUT_FORMATS[os.path.splitext(path)[1].lower()]
        self.file = open(self.partial, "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file) if self.format == "csv" else None
        if self.csv:
            self.csv.writerow(self.CSV_COLUMNS)

    def write(self, prediction) -> None:
        if self.csv:
            record = prediction.to_json()
            record["top_k"] = " ".join(f"{name}:{p:.6f}" for name, p in prediction.top_k)
            self.csv.writerow(["" if record[c] is None else record[c] for c in self.CSV_COLUMNS])
        else:
            self.file.write(json.dumps(prediction.to_json(), allow_nan=False) + "\n")

    def close(self, complete: bool) -> None:
        self.file.close()
        if complete:
            os.replace(self.partial, self.path)


def _check(args: argparse.Namespace) -> str | None:
    """The flags' own mistakes, named; None when there are none."""
    for name in ("top_k", "batch_size", "concurrency"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}"
    if args.output:
        if os.path.splitext(args.output)[1].lower() not in OUTPUT_FORMATS:
            return f"--output {args.output}: name a .jsonl or .csv file (the extension says the format)"
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            return f"--output {args.output}: no folder {os.path.dirname(os.path.abspath(args.output))}"
    return None


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the client brings gRPC and numpy, which `accresnet classify --help` does not need.
    from serving.client import Classifier, ClientError, image_files
    from serving.rest_client import RestClassifier

    problem = _check(args)
    if problem:
        _error(f"error: {problem}")
        return 2
    try:
        files = image_files(args.paths)
    except ClientError as error:
        _error(f"error: {error}")
        return 2
    if not files:
        _error("error: no image files given")
        return 2
    failures = []

    def on_error(path, error):
        failures.append(path)
        _error(f"cannot read {path}: {error}")

    progress = _Progress(len(files), sys.stderr.isatty() and not args.json and len(files) > args.batch_size)
    width = min(max(len(f) for f in files), 60)
    output = _OutputFile(args.output) if args.output else None
    complete = False
    try:
        client = RestClassifier if args.rest else Classifier
        with client(args.server, args.model, args.signature, args.version, args.label, args.timeout,
                    args.retries, args.tls_ca) as classifier:
            header = args.json  # the table's header comes with the first answer, naming the k it shows
            for prediction in classifier.classify_files(files, args.batch_size, args.top_k, on_error,
                                                        progress.advance, args.concurrency):
                if output:
                    output.write(prediction)
                if args.json:
                    print(json.dumps(prediction.to_json(), allow_nan=False), flush=True)
                    continue
                if not header:
                    print(_header(width, len(prediction.top_k)))
                    header = True
                print(_table_row(prediction, width), flush=progress.enabled)
        complete = True
    except ClientError as error:
        progress.finish()
        _error(f"error: {error}")
        return 1
    finally:
        if output:
            output.close(complete)
    progress.finish()
    if output:
        print(f"accresnet classify: wrote {len(files) - len(failures)} prediction(s) to {args.output}",
              file=sys.stderr)
    if failures:
        print(f"accresnet classify: {len(failures)} of {len(files)} file(s) could not be read", file=sys.stderr)
        return 1
    return 0
