"""Bring your own folder of images onto the shared volume (the data Job's init container).

    python3 fetch_images.py SOURCE DEST

SOURCE is an archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .zip) or a folder:

- http:// or https://: an archive, downloaded (a web server lists no folders);
- file:// or a plain path: an archive or a folder on the pod's file system;
- any other scheme (gs://, s3://, hdfs://, ...): an archive or a folder, read
  through TensorFlow's file systems (tf.io.gfile), which the trainer image
  carries. gs:// is built into TensorFlow (credentials: the pod's Workload
  Identity or GOOGLE_APPLICATION_CREDENTIALS); s3:// and others need a file
  system plugin in the image (tensorflow-io), else the error says so.

DEST gets the images, replaced whole, so a reader never sees half of them: one
subfolder per class, or train/ and test/ (and validation/) of them, as
`accresnet train --dataset=folder:DEST` reads them. An archive whose files sit
in one top folder is unwrapped. Archive members that would land outside DEST,
links and device files are refused (tarfile's "data" filter), as are sources
larger than --max-bytes.

Only the standard library, and TensorFlow for the schemes it serves: this file is
mounted into the trainer image from a ConfigMap, so it runs with any build of it.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
CHUNK = 1 << 20


class FetchError(Exception):
    pass


def is_archive(source: str) -> bool:
    return urllib.parse.urlsplit(source).path.lower().endswith(ARCHIVES)


def scheme(source: str) -> str:
    found = urllib.parse.urlsplit(source).scheme
    return "" if len(found) == 1 else found  # C:\... is a path


def local_path(source: str) -> pathlib.Path:
    if scheme(source) == "file":
        return pathlib.Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
    return pathlib.Path(source)


def gfile():
    """TensorFlow's file systems, for the schemes it serves."""
    import tensorflow as tf

    return tf.io.gfile, tf.errors


def copy_stream(reader, target: pathlib.Path, budget: list[int], what: str) -> None:
    with target.open("wb") as out:
        while chunk := reader.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise FetchError(f"{what} is larger than --max-bytes")
            out.write(chunk)


@contextlib.contextmanager
def file_system_errors(source: str):
    """TensorFlow's file-system errors while reading `source`, as FetchErrors that say what to do."""
    _, errors = gfile()
    try:
        yield
    except errors.UnimplementedError as error:
        raise FetchError(f"TensorFlow in this image has no file system for {scheme(source)}:// ({error.message}); "
                         "install its plugin (tensorflow-io) in the image, or use an http(s) URL") from error
    except errors.OpError as error:
        raise FetchError(f"cannot read {source}: {error.message}") from error


def download(source: str, target: pathlib.Path, budget: list[int]) -> pathlib.Path:
    """The archive as a file of this pod: downloaded next to DEST, or where it lies."""
    kind = scheme(source)
    if kind in ("http", "https"):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                copy_stream(response, target, budget, source)
        except OSError as error:  # URLError, HTTPError, timeouts
            raise FetchError(f"cannot download {source}: {error}") from error
        return target
    if kind in ("", "file"):
        path = local_path(source)
        if not path.is_file():
            raise FetchError(f"{source}: no such file")
        return path
    io, _ = gfile()
    with file_system_errors(source):
        with io.GFile(source, "rb") as reader:
            copy_stream(reader, target, budget, source)
    return target


def unpack(archive: pathlib.Path, into: pathlib.Path, budget: list[int]) -> None:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as opened:
            size = sum(info.file_size for info in opened.infolist())
            if size > budget[0]:
                raise FetchError(f"{archive.name} unpacks to {size} bytes, more than --max-bytes")
            for info in opened.infolist():
                parts = pathlib.PurePosixPath(info.filename).parts
                if info.filename.startswith("/") or ".." in parts:
                    raise FetchError(f"{archive.name}: {info.filename!r} would land outside the folder")
            opened.extractall(into)
        return
    if not hasattr(tarfile, "data_filter"):
        raise FetchError("unpacking a tar archive safely needs Python 3.11.4 or newer (tarfile's data filter)")
    try:
        with tarfile.open(archive) as opened:
            size = sum(member.size for member in opened.getmembers())
            if size > budget[0]:
                raise FetchError(f"{archive.name} unpacks to {size} bytes, more than --max-bytes")
            opened.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise FetchError(f"cannot unpack {archive.name}: {error}") from error


def copy_folder(source: str, into: pathlib.Path, budget: list[int]) -> None:
    kind = scheme(source)
    if kind in ("http", "https"):
        raise FetchError(f"{source}: an http(s) source must be an archive ({', '.join(ARCHIVES)}); "
                         "a web server lists no folders")
    if kind in ("", "file"):
        path = local_path(source)
        if not path.is_dir():
            raise FetchError(f"{source}: no such folder (or an archive of an unknown kind)")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            target = into / file.relative_to(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with file.open("rb") as reader:
                copy_stream(reader, target, budget, source)
        return
    copy_tree(source, into, budget)


def copy_tree(source: str, into: pathlib.Path, budget: list[int]) -> None:
    """A folder through TensorFlow's file systems (gs://BUCKET/photos/), file by file."""
    io, _ = gfile()
    base = source.rstrip("/")
    with file_system_errors(source):
        if not io.exists(base) or not io.isdir(base):  # exists() says when a scheme has no file system
            raise FetchError(f"{source}: no such folder (or an archive of an unknown kind)")
        for folder, _, files in io.walk(base):
            relative = folder[len(base):].lstrip("/")
            for name in files:
                target = into / relative / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with io.GFile(f"{folder.rstrip('/')}/{name}", "rb") as reader:
                    copy_stream(reader, target, budget, source)


def top(folder: pathlib.Path) -> pathlib.Path:
    """The folder that holds the classes: an archive's single top folder is unwrapped
    (a dataset has at least two classes, so one folder alone is never the classes)."""
    shutil.rmtree(folder / "__MACOSX", ignore_errors=True)  # the resource forks macOS zips add
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


def classes(root: pathlib.Path, source: str) -> tuple[list[str], int]:
    """The class folders (of train/ where there is one) and the number of files."""
    train = root / "train" if (root / "train").is_dir() else root
    found = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = sum(1 for p in root.rglob("*") if p.is_file())
    if len(found) < 2 or not files:
        raise FetchError(f"{source} holds {found or 'no folders'} and {files} files: expected one subfolder "
                         "per class (at least two), or train/ and test/ of them")
    return found, files


def fetch(source: str, dest: pathlib.Path, max_bytes: int) -> str:
    staging = dest.with_name(f".{dest.name}.partial")
    download_file = dest.with_name(f".{dest.name}.download")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    budget = [max_bytes]
    try:
        if is_archive(source):
            archive = download(source, download_file, budget)
            unpack(archive, staging, [max_bytes])
        else:
            copy_folder(source, staging, budget)
        root = top(staging)
        names, files = classes(root, source)
        shutil.rmtree(dest, ignore_errors=True)
        root.rename(dest)
    finally:
        download_file.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return f"{files} files in {len(names)} classes ({', '.join(names)}) from {source} in {dest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch_images.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="an archive's URL or path, or a folder's (gs://BUCKET/flowers/)")
    parser.add_argument("dest", help="the folder to fill, replaced whole")
    parser.add_argument("--max-bytes", type=int, default=20 << 30,
                        help="refuse a source larger than this, downloaded or unpacked (default: 20 GiB)")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.source, pathlib.Path(args.dest), args.max_bytes), flush=True)
    except FetchError as error:
        print(f"fetch_images.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
