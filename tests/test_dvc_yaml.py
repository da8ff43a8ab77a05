"""dvc.yaml stays honest: each stage lists as deps every pipeline module its entry point imports
(transitively) and as params every key it reads, so a change re-runs exactly the stages it affects."""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def pipeline_imports(path: Path) -> set[str]:
    """Modules of the pipeline package imported anywhere in ``path`` (package __init__ included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}").is_file()}
    # importing pipeline.x.y runs pipeline/x/__init__.py too
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
    return {m for m in found | parents if m != "pipeline"}


def closure(module: str) -> set[Path]:
    # `python -m pipeline.stages.x` runs pipeline/stages/__init__.py before the module itself
    todo = [module] + [".".join(module.split(".")[:i]) for i in range(2, module.count(".") + 1)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(pipeline_imports(module_file(name)))
    return {module_file(m).relative_to(ROOT) for m in seen}


def params_read(path: Path) -> dict[str, set[str] | None]:
    """Section -> fields read through a name bound to that section (None: the whole section is used)."""
    tree = ast.parse(path.read_text())
    sections: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params":
            sections += [e.value for e in node.args[1].elts]
    bound: dict[str, str] = {}  # variable -> section
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else [node.targets[0]]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for t, v in zip(targets, values):
                if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and v.attr in sections:
                    bound[t.id] = v.attr
    fields: dict[str, set[str] | None] = {s: set() for s in sections}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            fields[bound[node.value.id]].add(node.attr)
    return {s: (f or None) for s, f in fields.items()}


def stage_params(do: dict) -> set[str]:
    return {p if isinstance(p, str) else next(iter(p)) for p in do.get("params", [])}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_its_modules_and_params(name):
    do = STAGES[name].get("do", STAGES[name])
    module = re.search(r"-m (pipeline\.stages\.\w+)", do["cmd"]).group(1)
    deps = {Path(d) for d in do["deps"] if isinstance(d, str)}
    missing = sorted(str(p) for p in closure(module) - deps)
    assert not missing, f"stage {name}: imports {missing} but does not list them in deps"
    listed = stage_params(do)
    reads = params_read(module_file(module))
    # a stage that runs another stage's code (normals runs extract's write_store) reads what that code reads
    for other in closure(module):
        if other.parts[:2] == ("pipeline", "stages") and other != module_file(module).relative_to(ROOT) \
                and other.name != "__init__.py":
            for section, fields in params_read(ROOT / other).items():
                if section in reads and fields:
                    reads[section] = (reads[section] or set()) | fields
    for section, fields in reads.items():
        # a foreach stage lists its own dataset's entry: extract's key, or evaluate's target
        if section in listed or (section == "datasets" and listed & {"datasets.${key}", "datasets.${item.target}"}):
            continue
        assert fields, f"stage {name}: reads params section {section!r} but lists none of it"
        absent = sorted(f"{section}.{f}" for f in fields if f"{section}.{f}" not in listed)
        assert not absent, f"stage {name}: reads {absent} but does not list them in params"


def test_the_checker_sees_what_a_stage_reads():
    """The parser above finds the real reads of the extract stage (so the test cannot pass vacuously)."""
    reads = params_read(ROOT / "pipeline/stages/extract.py")
    assert reads["backbone"] == {"name", "layer", "image_size"}
    assert "pipeline/features/store.py" in {str(p) for p in closure("pipeline.stages.extract")}
