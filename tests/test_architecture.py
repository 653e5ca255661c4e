"""The rules of the package's shape that a reader should be able to rely on, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gptcli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def private_imports(path: Path) -> list[str]:
    return private_uses(path.read_text(encoding="utf-8"), module_name(path))


def private_uses(source: str, me: str) -> list[str]:
    """`from gptcli.X import _name` and `gptcli.X._name` (through an imported module) where X is not
    `me`, the importing module: each use of another module's private name, as "line: what"."""
    tree = ast.parse(source)
    found = []
    modules: dict[str, str] = {}  # local name -> the gptcli module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gptcli"):  # `import gptcli.x.y` binds gptcli
                    local = alias.asname or alias.name.split(".")[0]
                    modules[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptcli"):
            for alias in node.names:
                # Importing a private *module* (gptcli.cli._common) by its public names is fine; a
                # module imported from its package counts as a module, not a name.
                if is_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif private(alias.name) and node.module != me:
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            target = _dotted(node.value) or ""
            head, _, rest = target.partition(".")
            if head in modules:
                full = ".".join(filter(None, [modules[head], rest]))  # gptcli.X, or a name inside it
                if full != me and is_module(full):
                    found.append(f"{node.lineno}: {full}.{node.attr}")
    return found


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path: Path) -> None:
    assert private_imports(path) == []


def test_benchmarks_use_public_names_too() -> None:
    found = {str(p.relative_to(ROOT)): private_imports(p) for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert {name: uses for name, uses in found.items() if uses} == {}


def test_the_check_finds_what_it_looks_for() -> None:
    """The rule's own test: each way of reaching a private name is caught, public ones are not."""
    source = (
        "import gptcli.generation.generate as g\n"
        "from gptcli.generation import decoding\n"
        "from gptcli.generation.generate import _decode, complete\n"
        "from gptcli.cli import _common\n"
        "from gptcli.cli._common import note\n"
        "g._decode\n"
        "decoding._advance\n"
        "decoding.take\n"
        "_common.note\n"
        "from gptcli.serving.engine import _Slot\n"
        "import gptcli.generation.generate\n"
        "gptcli.generation.generate._SORT_WINDOW = 1\n"
    )
    assert private_uses(source, "gptcli.serving.engine") == [
        "3: from gptcli.generation.generate import _decode",
        "6: gptcli.generation.generate._decode",
        "7: gptcli.generation.decoding._advance",
        "12: gptcli.generation.generate._SORT_WINDOW",
    ]
