"""The shape of the package: no module imports one that imports it back (lazy imports inside functions
included), and the README's layout section names every module and package it has."""

import ast
import re
from pathlib import Path

import posttrain

PACKAGE = Path(posttrain.__file__).parent
README = PACKAGE.parent / "README.md"


def module_imports() -> dict[str, set[str]]:
    """{module: the posttrain modules it imports anywhere in its file}."""
    names = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        names[name] = f
    edges = {}
    for name, f in names.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        edges[name] = {t for t in found if t in names and t != name}
    return edges


def test_no_import_cycles():
    edges = module_imports()
    assert "posttrain.reference" in edges["posttrain.engine"]  # the walk sees the package's imports

    def reachable(start):
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += edges[m]
        return seen

    cycles = sorted(m for m in edges if m in reachable(m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_readme_layout_names_every_module():
    text = README.read_text()
    block = re.search(r"## Layout\s+```\n(.*?)```", text, re.DOTALL).group(1)
    listed = set(re.findall(r"^\s{2}(\S+)", block, re.MULTILINE))
    present = {p.name + "/" if p.is_dir() else p.name for p in PACKAGE.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert present - listed == set(), "modules missing from the README layout"
    assert listed - present == set(), "the README layout names modules that do not exist"
