"""The package reads like the DAG: every import points down the layers, and no module reaches into
another's private names (docs/design.md, "Layout")."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

# Lower layers never import higher ones; a layer may import itself and anything below.
LAYERS = {
    "errors": 0,
    "files": 1, "config": 1, "launch": 1,
    "data": 2,
    "features": 3,
    "method": 4,
    "evaluation": 5,
    "stages": 6, "cli": 6, "predict": 7,
}


def layer_of(module: str) -> tuple[str, int]:
    top = module.split(".")[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: pipeline/{top} is in no layer of tests/test_layout.py; place it")
    return top, LAYERS[top]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "pipeline":
            out.append((name, path))
    return out


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every ``pipeline`` import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            if node.module == "pipeline":  # from pipeline import launch
                found += [(f"pipeline.{a.name}", [], node.lineno) for a in node.names]
            else:
                found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("pipeline.")]
    return found


def test_every_module_has_a_layer():
    for name, _ in modules():
        layer_of(name)


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(name, path):
    top, level = layer_of(name)
    for module, _, line in imports(path):
        other, other_level = layer_of(module)
        assert other_level < level or other == top, (
            f"{path.relative_to(ROOT)}:{line} imports {module} (layer {other}), above or beside its own ({top})")


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_no_private_names_across_modules(name, path):
    for module, names, line in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)}:{line} imports private {private} from {module}"
    # attribute access to another module's private name: `metrics._ranking`
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
               and n.module.startswith("pipeline") for a in n.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_the_package_never_imports_analyses_benchmarks_or_tests(name, path):
    for node in ast.walk(ast.parse(path.read_text())):
        named = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for module in named:
            assert module.split(".")[0] not in ("analysis", "benchmarks", "tests", "tools"), (
                f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
