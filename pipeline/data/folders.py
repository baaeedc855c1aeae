"""folder:PATH datasets: one subfolder per class (or train/, test/ and validation/ of those),
any common image format, read and resized as the client reads and resizes them."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import pathlib

import numpy as np

from pipeline.data.splits import DatasetError, Source, Split, check_fits_in_memory
from serving import images as image_files
from serving.contract import IMAGE_SIZE

log = logging.getLogger(__name__)


def read_folder_tree(root: str, skip_bad_images: bool, size: int = IMAGE_SIZE) -> Source:
    """`root` holds class folders, or train/ and test/ (and validation/) of them, read at size x size."""
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"folder:{root}: no such directory")
    subdirs = {p.name for p in path.iterdir() if p.is_dir()}
    if "train" in subdirs and subdirs <= {"train", "test", "val", "validation"}:
        class_names, train = _read_class_folders(path / "train", skip_bad_images, None, size)
        splits = {}
        for name in ("test", "val", "validation"):
            if name in subdirs:
                splits[name] = _read_class_folders(path / name, skip_bad_images, class_names, size)[1]
        return Source(class_names, train, splits.get("test"), splits.get("val", splits.get("validation")))
    class_names, train = _read_class_folders(path, skip_bad_images, None, size)
    return Source(class_names, train)


def _read_class_folders(path: pathlib.Path, skip_bad_images: bool, class_names: tuple[str, ...] | None,
                        size: int = IMAGE_SIZE) -> tuple[tuple[str, ...], Split]:
    found = tuple(sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")))
    # A file's name only says where its bytes are: one that is not UTF-8 is read like any other
    # (its digest hashes the name's bytes, pipeline/export/provenance.py). A class folder's name becomes
    # a class name, which the model answers as a UTF-8 string: one that is not UTF-8 is refused,
    # named with its bytes escaped (a surrogate cannot be printed or written as UTF-8).
    if undecodable := [name for name in found if not _is_utf8(name)]:
        raise DatasetError(f"folder:{_shown(path)}: the class folder name(s) {', '.join(map(repr, undecodable))} "
                           "are not UTF-8, and class names are served as UTF-8 text: rename them")
    if class_names is None:
        class_names = found
        if len(class_names) < 2:
            raise DatasetError(f"folder:{path}: needs one subfolder per class, at least two; found {list(found)}")
    elif unknown := sorted(set(found) - set(class_names)):
        raise DatasetError(f"folder:{path}: classes {unknown} are not among the training classes {list(class_names)}")
    extensions = image_files.image_extensions()
    files, labels, ignored = [], [], 0
    for label, name in enumerate(class_names):
        class_dir = path / name
        if not class_dir.is_dir():
            continue
        for file in sorted(class_dir.rglob("*")):
            if not file.is_file() or file.name.startswith("."):
                continue
            if file.suffix.lower() in extensions:
                files.append(file)
                labels.append(label)
            else:
                ignored += 1
    if ignored:
        log.info("folder:%s: ignored %d files that are not images by their extension", path, ignored)
    if not files:
        raise DatasetError(f"folder:{path}: no image files in the class folders {list(class_names)}")
    check_fits_in_memory(len(files), f"folder:{path}", size)

    def read(file: pathlib.Path) -> tuple[np.ndarray, tuple[int, int]] | Exception:
        try:
            return image_files.read_pixels_and_size(str(file), size)
        except Exception as error:  # Pillow raises many types for bad files.
            return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(read, files))
    bad = [(file, result) for file, result in zip(files, decoded) if isinstance(result, Exception)]
    if bad and not skip_bad_images:
        shown = "; ".join(f"{file}: {error}" for file, error in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DatasetError(
            f"folder:{path}: cannot read {len(bad)} image file(s): {shown}{more}. "
            "Fix or remove them, or pass --skip-bad-images to skip them."
        )
    if bad:
        log.warning("folder:%s: skipped %d unreadable image file(s), e.g. %s", path, len(bad), bad[0][0])
    good = [i for i, result in enumerate(decoded) if not isinstance(result, Exception)]
    if not good:
        raise DatasetError(f"folder:{path}: none of the {len(files)} image files could be read")
    other_sizes = collections.Counter(decoded[i][1] for i in good if decoded[i][1] != (size, size))
    if other_sizes:
        common = ", ".join(f"{w}x{h}" for (w, h), _ in other_sizes.most_common(3))
        log.info("folder:%s: %d of %d images are not %dx%d (%s%s): resized to %dx%d (--image-size %d)", path,
                 sum(other_sizes.values()), len(good), size, size, common,
                 ", ..." if len(other_sizes) > 3 else "", size, size, size)
    images = np.stack([decoded[i][0] for i in good])
    return class_names, Split(images, np.asarray(labels, np.int64)[good])


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # the bytes os.fsdecode escaped as surrogates
        return False
    return True


def _shown(path: pathlib.Path) -> str:
    return str(path) if _is_utf8(str(path)) else repr(str(path))
