"""A release candidate's folder made by hand, and the blessing validate would write for it:
what the tests of candidate entries and of the release waits share."""

import pathlib

from pipeline.release import blessing


def candidate(root: pathlib.Path) -> pathlib.Path:
    """A SavedModel folder's layout (its bytes are never loaded here: every refusal comes first)."""
    folder = root / "staging" / "1"
    for name, data in (("saved_model.pb", b"graph"), ("variables/variables.index", b"index"),
                       ("variables/variables.data-00000-of-00001", b"weights"), ("assets/labels.txt", b"a\nb\n"),
                       ("model_card.json", b"{}")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "assets.extra").mkdir()  # an empty folder is an entry too
    return folder


def bless(folder: pathlib.Path) -> blessing.Blessing:
    """The record validate writes for a blessed candidate (the checks themselves are tested in
    test_blessing.py; here only the binding to the entries matters)."""
    return blessing.write(folder, blessing.Blessing(
        candidate=str(folder), verdict="blessed", reasons=(), checks={"operations": "passed"}, time="",
        dataset="synthetic:10", class_names=("a", "b"), data={}, thresholds={}, ops=(), infra={},
        candidate_metrics=None, current=blessing.Served(None, None, None), project={}, tensorflow="test"))
