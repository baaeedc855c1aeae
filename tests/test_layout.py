"""The house's rooms: pipeline/ is packages by stage, each importing only the ones before it;
serving/ never imports pipeline/; no room and no module (in pipeline/ or serving/) grows past
what a reader takes in."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
PIPELINE = ROOT / "pipeline"

# The stages in the order data flows: each package imports only those before it.
STAGES = ("data", "model", "settings", "kernels", "train", "export", "release", "research")
# The ground floor: helpers any stage may import; they import no stage.
GROUND = ("errors", "flags", "cache", "cpu", "digests", "quiet")
# The top floor: the command line and the demo, which may import any stage.
TOP = ("cli", "demo")
MAX_PACKAGE_LINES = 1500
MAX_MODULE_LINES = 450


def imported_modules(path: pathlib.Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            if node.module == "pipeline":  # from pipeline import flags
                modules.update(f"pipeline.{alias.name}" for alias in node.names)
    return modules


def room(module: str) -> str | None:
    """The stage, ground or top module a "pipeline.x.y" name lives in."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def test_serving_never_imports_pipeline():
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "pipeline")
                 for path in (ROOT / "serving").rglob("*.py")}
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_every_room_of_pipeline_is_named_in_the_layering():
    rooms = {path.stem if path.is_file() else path.name for path in PIPELINE.iterdir()
             if path.name != "__init__.py" and (path.suffix == ".py" or (path / "__init__.py").exists())}
    assert rooms == set(STAGES) | set(GROUND) | set(TOP)


def test_each_stage_says_what_it_owns_in_one_line():
    for stage in STAGES:
        docstring = ast.get_docstring(ast.parse((PIPELINE / stage / "__init__.py").read_text()))
        assert docstring and "\n" not in docstring, stage


def test_stages_import_only_earlier_stages_and_the_ground_floor():
    upward = {}
    for path in PIPELINE.rglob("*.py"):
        own = path.relative_to(PIPELINE).parts[0].removesuffix(".py")
        if own in TOP or own == "__init__":
            continue
        allowed = set(GROUND) | (set(STAGES[:STAGES.index(own) + 1]) if own in STAGES else {own})
        wrong = sorted(m for m in imported_modules(path) if room(m) and room(m) not in allowed)
        if wrong:
            upward[str(path.relative_to(ROOT))] = wrong
    assert not upward


def test_no_stage_and_no_module_is_too_long():
    lengths = {path: len(path.read_text().splitlines()) for path in PIPELINE.rglob("*.py")}
    serving = {path: len(path.read_text().splitlines()) for path in (ROOT / "serving").rglob("*.py")}
    assert not {str(p.relative_to(ROOT)): n for p, n in {**lengths, **serving}.items() if n > MAX_MODULE_LINES}
    for stage in STAGES:
        assert sum(n for p, n in lengths.items() if p.is_relative_to(PIPELINE / stage)) <= MAX_PACKAGE_LINES, stage


# Where an import waits inside a function, and why: the verbs' work modules load TensorFlow, which
# no --help needs; `accresnet tf-config` reads TF_CONFIG in every training pod without it.
LATE_IMPORTS = {"pipeline/cli.py", "pipeline/train/distribute.py"}


def test_pipeline_modules_import_at_the_top():
    late = {}
    for path in PIPELINE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        inner = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top]
        if inner and str(path.relative_to(ROOT)) not in LATE_IMPORTS:
            late[str(path.relative_to(ROOT))] = inner
    assert not late
