"""The tests' own shape: a helper shared by several test files lives in helpers.py, fixtures live in conftest.py,
and no test file imports another test file or takes a plain function from conftest."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TEST_MODULES = {p.stem for p in TESTS.glob("test_*.py")}


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module name, line) for every import anywhere in the file, inside functions too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):  # `from . import x` or `from .test_x import y`
            found.append((node.module or ".", node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
    return found


def test_no_test_file_imports_another_test_file_or_conftest():
    wrong = []
    for path in sorted(TESTS.glob("test_*.py")):
        for module, line in imported_modules(ast.parse(path.read_text(), str(path))):
            if module in TEST_MODULES or module == "conftest" or module.startswith("."):
                wrong.append(f"{path.name}:{line}: imports {module} (shared helpers belong in helpers.py)")
    assert not wrong, "\n".join(wrong)


def test_helpers_hold_no_tests_or_fixtures_and_conftest_no_plain_helpers():
    helpers = ast.parse((TESTS / "helpers.py").read_text())
    for node in ast.walk(helpers):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert not node.name.startswith(("test_", "Test")), f"helpers.py:{node.lineno}: {node.name} is a test"
            assert not node.decorator_list, f"helpers.py:{node.lineno}: {node.name} is decorated; fixtures " \
                                            "belong in conftest.py"
    conftest = ast.parse((TESTS / "conftest.py").read_text())
    for node in conftest.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("pytest_"):  # hooks
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert any(d.startswith("pytest.fixture") for d in decorators), \
                f"conftest.py:{node.lineno}: {node.name} is a plain function; move it to helpers.py"


def test_the_layout_check_catches_a_cross_import():
    for source in ("from test_resume import overlay", "import test_storage", "from conftest import free_port",
                   "def f():\n    from test_ddp import args_for\n"):
        modules = [m for m, _ in imported_modules(ast.parse(source))]
        assert any(m in TEST_MODULES or m == "conftest" for m in modules), source
    assert [m for m, _ in imported_modules(ast.parse("from helpers import free_port"))] == ["helpers"]


def test_every_slow_entry_names_a_test_that_exists():
    """conftest.py's SLOW list, read as text: a renamed test would drop out of it and into the fast tier."""
    conftest = ast.parse((TESTS / "conftest.py").read_text())
    (slow,) = [ast.literal_eval(n.value) for n in conftest.body
               if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["SLOW"]]
    for entry in sorted(slow):
        file, _, test = entry.partition("::")
        assert (TESTS / file).is_file(), entry
        if not test:
            continue
        name, _, case = test.partition("[")
        functions = {n.name: n for n in ast.parse((TESTS / file).read_text()).body if isinstance(n, ast.FunctionDef)}
        assert name.startswith("test_") and name in functions, f"{entry}: no such test"
        if case:
            decorators = [ast.unparse(d) for d in functions[name].decorator_list]
            assert any(d.startswith("pytest.mark.parametrize") for d in decorators), f"{entry}: not parametrized"
