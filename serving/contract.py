"""What the exporter, the model server and the client agree on about a model's folder.

A base path holds one folder per version, named by its number. TF Serving
reads a name as a version when absl::SimpleAtoi takes it as an int64
(sources/storage_path/file_system_storage_path_source.cc) and skips every
other name; this project is stricter: ASCII digits only, within int64, so
that `²` or `١` (digits to Python's str.isdigit) and `99999999999999999999`
are skipped instead of read as versions or breaking the listing.
"""

from __future__ import annotations

import re

INT64_MAX = (1 << 63) - 1
_VERSION_NAME = re.compile(r"[0-9]{1,19}")


def version_number(name: str) -> int | None:
    """The version a folder name stands for, or None when it is not a version's name."""
    name = name.rstrip("/")
    if not _VERSION_NAME.fullmatch(name):
        return None
    number = int(name)
    return number if number <= INT64_MAX else None
