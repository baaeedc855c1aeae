"""No test module imports another: what tests share lives in helper modules (tests/*.py
without the test_ prefix) or conftest.py, so each test file runs, and is read, on its own."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_of_the_tests_imports_a_test_module():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = {}
    for path in sorted(TESTS.glob("*.py")):
        imported = {name.removeprefix("tests.") for name in imported_modules(path)}
        if imported & test_modules:
            offenders[path.name] = sorted(imported & test_modules)
    assert not offenders, f"move what these share into a helper module or conftest.py: {offenders}"
