"""The package's shape, checked from its source: imports run one way, between modules and between parts, the
trainer never reaches the launcher, lazy imports say why, and every module says what it exports."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resnet50_recipe"
# The parts, bottom to top: a part may import the parts before it, never one after it. Top-level modules are
# parts of their own. `resnet50_recipe` itself (the public API) and `cli` are imported by nothing in the package.
LAYERS = ["version", "errors", "model", "recipe", "ec2", "store", "data", "publish", "trainer", "inspect", "cloud",
          "cli", "__main__", ""]
LAZY = "# lazy:"  # what an import inside a function must say, on its line or the line above, and why


def module_name(path: Path) -> str:
    parts = ["resnet50_recipe", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported package module, statement, inside a function) for each import of the package's own modules."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and ast.unparse(f.test) == "TYPE_CHECKING"
                   for n in ast.walk(f)}  # never run: the type checker's view only
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; the package imports absolutely"
            if not (node.module or "").startswith("resnet50_recipe"):
                continue
            for alias in node.names:  # `from resnet50_recipe.x import y` imports the module x.y when there is one
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node, id(node) in inside))
        elif isinstance(node, ast.Import):
            found += [(a.name, node, id(node) in inside) for a in node.names if a.name.startswith("resnet50_recipe")]
    return found


GRAPH = {m: {target for target, _, _ in imports(p) if target != m} for m, p in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_itself_back():
    circles = sorted(m for m in MODULES if m in reachable(m))
    assert not circles, f"import circles through {circles}"


def test_parts_import_only_the_parts_below_them():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if LAYERS.index(part(t)) > LAYERS.index(part(m)) or (t == "resnet50_recipe" and m != t)]
    assert not upward, "imports that run upward (see LAYERS): " + ", ".join(sorted(upward))


def test_the_trainer_never_reaches_the_launcher():
    for module in (m for m in MODULES if part(m) == "trainer"):
        assert not {t for t in reachable(module) if part(t) in ("cloud", "cli")}, module


def says_why(lines: list[str], lineno: int) -> bool:
    """A LAZY comment on the import's line or on the comment and import lines right above it."""
    i = lineno - 1
    while i >= 0 and (i == lineno - 1 or lines[i].lstrip().startswith(("#", "from ", "import ", ")"))
                      or lines[i].startswith("    ") and lines[i].rstrip().endswith(",")):
        if LAZY in lines[i]:
            return True
        i -= 1
    return False


def test_imports_inside_functions_say_why():
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, node, inside in imports(path):
            if inside and not says_why(lines, node.lineno):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not silent, f"package imports inside functions without a '{LAZY} reason' comment: {silent}"


def test_every_module_defines_all():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        names = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in getattr(n, "targets", [getattr(n, "target", None)]))]
        assert names or module.endswith("__main__"), f"{path}: no __all__"
        if names:
            declared = ast.literal_eval(names[0].value)
            defined = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                       for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets)
                       for t in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(t, ast.Name)}
            defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {a.asname or a.name for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                        for a in n.names}
            assert set(declared) <= defined, f"{path}: __all__ names {set(declared) - defined}, not defined there"


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, f"functions over 80 lines: {long}"


def test_no_public_name_hides_a_part():
    """`from resnet50_recipe import train` is the function; a subpackage of the same name would be hidden by it,
    and `import resnet50_recipe.<part>.x as y` would then fail."""
    import importlib
    import types

    import resnet50_recipe

    for module in MODULES:
        if module.count(".") == 1 and not module.endswith("__main__"):
            importlib.import_module(module)
            attribute = getattr(resnet50_recipe, module.split(".")[1])
            assert isinstance(attribute, types.ModuleType) and attribute.__name__ == module, module
