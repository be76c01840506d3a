"""The package layout (docs/layout.md): no import circle between connpub modules (counting
function-local imports too), and every module named in the layout table exists, every
sub-package in it with one line of purpose. No root needed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import connpub

PACKAGE = Path(connpub.__file__).parent
REPO = PACKAGE.parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """connpub modules a module imports, at module level or inside functions (a function-local
    import hides a circle, it does not remove it); not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def test_no_import_circle():
    known = modules()
    graph = {name: imports_of(path, set(known)) - {name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            # importing a.b runs a's __init__ first; a package importing its own modules is not
            # a circle, a module importing a sibling through the package is not either
            if name.startswith(dep + ".") or dep.startswith(name + "."):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_layout_table_names_existing_modules():
    table = (REPO / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`(connpub(?:\.\w+)+)`", table))
    assert named, "docs/layout.md names no module"
    known = modules()
    missing = sorted(name for name in named if name not in known)
    assert not missing, f"docs/layout.md names modules that do not exist: {missing}"
    # every sub-package is in the table, with its one line of purpose in its __init__
    for package in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        name = module_name(package / "__init__.py")
        assert f"`{name}`" in table, f"{name} missing from docs/layout.md"
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), name
