"""A candidate holds regular files and folders, nothing else: validate and push refuse a
symbolic link, a FIFO or a name that is not UTF-8 in one line (exit status 3) before
they read, copy or serve anything, and the blessing covers every entry with its type."""

import json
import os
import pathlib
import re
import shutil

import pytest

from pipeline.release import blessing
from pipeline import cli
from pipeline.release.blessing import BLESSING_FILE, BlessingError, EntryError
from pipeline.release.push import push
from pipeline.release.configs import PushConfig
from candidate_files import bless, candidate

REFUSED = 3


def run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def refused_in_one_line(capsys, verb, *args, reason):
    code, output = run(capsys, verb, *args)
    lines = [line for line in output.splitlines() if line.startswith(f"accresnet {verb}: error: ")]
    assert code == REFUSED and len(lines) == 1 and reason in lines[0], output
    assert "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def blessed(tmp_path):
    folder = candidate(tmp_path)
    bless(folder)
    return folder


def test_the_blessing_names_every_folder_and_file_with_its_type(blessed, tmp_path):
    record = blessing.read(blessed)
    assert record.format == 2
    assert record.content.folders == ("assets", "assets.extra", "variables")
    assert set(record.content.files) == {"saved_model.pb", "variables/variables.index", "model_card.json",
                                         "variables/variables.data-00000-of-00001", "assets/labels.txt"}
    pushed = push(PushConfig(candidate=str(blessed), export_base=str(tmp_path / "models")))
    assert pathlib.Path(pushed.path) == tmp_path / "models" / "1"
    assert (tmp_path / "models" / "1" / "assets.extra").is_dir()
    assert blessing.verify(blessed, pathlib.Path(pushed.path)) == record


@pytest.mark.parametrize("verb", ["validate", "push"])
def test_a_link_to_dev_zero_is_refused_before_anything_is_read_or_copied(blessed, tmp_path, capsys, verb):
    (blessed / "assets" / "zero").symlink_to("/dev/zero")
    args = ["--export-base", tmp_path / "models"] if verb == "push" else []
    line = refused_in_one_line(capsys, verb, "--candidate", blessed, *args,
                               reason="assets/zero is a symbolic link (-> /dev/zero); a candidate holds regular")
    assert line.count("\n") == 0 and not (tmp_path / "models").exists()


def test_push_refuses_a_link_with_force_too(blessed, tmp_path):
    (blessed / "variables" / "outside").symlink_to(tmp_path)
    with pytest.raises(EntryError, match="variables/outside is a symbolic link"):
        push(PushConfig(candidate=str(blessed), export_base=str(tmp_path / "models"), force=True))
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("verb", ["validate", "push"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(blessed, tmp_path, capsys, verb):
    os.mkfifo(blessed / "assets" / "pipe")
    args = ["--export-base", tmp_path / "models"] if verb == "push" else []
    refused_in_one_line(capsys, verb, "--candidate", blessed, *args, reason="assets/pipe is a FIFO")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("verb", ["validate", "push"])
def test_a_name_that_is_not_utf8_is_refused_escaped(blessed, tmp_path, capsys, verb):
    (pathlib.Path(os.fsdecode(bytes(blessed / "assets") + b"/caf\xe9"))).write_bytes(b"x")
    args = ["--export-base", tmp_path / "models"] if verb == "push" else []
    refused_in_one_line(capsys, verb, "--candidate", blessed, *args,
                        reason="the name 'assets/caf\\udce9' is not UTF-8")


@pytest.mark.parametrize("record,reason", [
    ("[" * 100_000 + "]" * 100_000, "cannot be read as a blessing record: it is nested too deep"),
    ('{"verdict": "blessed", "content": ' * 100_000, "cannot be read as a blessing record"),
])
def test_a_blessing_nested_deep_is_refused_in_one_line(blessed, tmp_path, capsys, record, reason):
    (blessed / BLESSING_FILE).write_text(record)
    refused_in_one_line(capsys, "push", "--candidate", blessed, "--export-base", tmp_path / "models", reason=reason)


@pytest.mark.parametrize("make", [lambda path: path.symlink_to("/dev/zero"), os.mkfifo])
def test_a_blessing_file_that_is_a_link_or_fifo_is_refused(blessed, tmp_path, capsys, make):
    (blessed / BLESSING_FILE).unlink()
    make(blessed / BLESSING_FILE)
    refused_in_one_line(capsys, "push", "--candidate", blessed, "--export-base", tmp_path / "models",
                        reason=f"{BLESSING_FILE} is a")


def swap_for_a_link(folder):
    """The file's own bytes, now behind a symbolic link: the contents agree, the type does not."""
    labels = folder / "assets" / "labels.txt"
    shutil.move(labels, folder / "assets.extra" / "labels.txt")
    labels.symlink_to("../assets.extra/labels.txt")


@pytest.mark.parametrize("change,reason", [
    (swap_for_a_link, "assets/labels.txt is a symbolic link (-> ../assets.extra/labels.txt)"),
    (lambda folder: (folder / "assets" / "empty").mkdir(), "stale blessing): added: assets/empty"),
    (lambda folder: (folder / "assets.extra").rmdir(), "stale blessing): missing: assets.extra"),
    (lambda folder: ((folder / "model_card.json").unlink(), (folder / "model_card.json").mkdir()),
     "stale blessing): changed: model_card.json"),
    (lambda folder: ((folder / "assets.extra").rmdir(), (folder / "assets.extra").write_text("")),
     "stale blessing): changed: assets.extra"),
])
def test_an_entry_whose_type_changed_after_blessing_fails_verification(blessed, tmp_path, change, reason):
    change(blessed)
    with pytest.raises(BlessingError, match=re.escape(reason)):
        push(PushConfig(candidate=str(blessed), export_base=str(tmp_path / "models")))
    assert not (tmp_path / "models").exists()


def test_a_format_1_record_is_refused_naming_its_format(blessed, tmp_path, capsys):
    record = json.loads((blessed / BLESSING_FILE).read_text())
    record["format"] = 1
    del record["content"]["folders"]
    record["content"]["digest"] = blessing.combined_digest(record["content"]["files"])
    (blessed / BLESSING_FILE).write_text(json.dumps(record))
    refused_in_one_line(capsys, "push", "--candidate", blessed, "--export-base", tmp_path / "models",
                        reason="is a blessing record of format 1, and this push reads format 2")


def test_the_copy_follows_no_link_and_opens_no_fifo_that_appears_after_the_check(tmp_path):
    """What push and validate copy with: a FIFO or a link put there between the check and the
    copy is refused by the copy itself (no zeros written until the disk is full, no hang)."""
    folder = candidate(tmp_path)
    os.mkfifo(folder / "assets" / "pipe")
    with pytest.raises(EntryError, match="assets/pipe is a FIFO"):
        blessing.copy_candidate(folder, tmp_path / "copy-1")
    with pytest.raises(EntryError, match="assets/pipe is a FIFO"):  # the digests read the same way
        blessing.regular_sha256(folder / "assets" / "pipe")
    (folder / "assets" / "pipe").unlink()
    (folder / "assets" / "zero").symlink_to("/dev/zero")
    with pytest.raises(EntryError, match="assets/zero is a symbolic link"):
        blessing.copy_candidate(folder, tmp_path / "copy-2")
    assert (tmp_path / "copy-2" / "assets" / "zero").is_symlink()  # copied as a link, never read
    with pytest.raises(EntryError, match="is a symbolic link"):
        blessing.copy_regular(str(folder / "assets" / "zero"), str(tmp_path / "zero"))
    assert not (tmp_path / "zero").exists()
