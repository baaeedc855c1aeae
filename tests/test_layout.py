"""The wall between the parts: serving/ never imports pipeline/."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]


def imported_modules(path: pathlib.Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_serving_never_imports_pipeline():
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "pipeline")
                 for path in (ROOT / "serving").rglob("*.py")}
    assert not {path: modules for path, modules in offenders.items() if modules}
