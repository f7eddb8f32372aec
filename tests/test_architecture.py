"""The package's structure, read from its source: the import graph of ``lightning_slimmoe/`` and ``callbacks/`` is
acyclic (lazy imports inside functions count), no module imports another's private name, every module opens
with a docstring saying what it owns, and the README's code map and config reference match the code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_slimmoe", "callbacks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(imported project module, names taken from it)`` for every import statement anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in modules else (node.module, [alias.name]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in _imports(path, modules):
            target = target if target in modules else target.rsplit(".", 1)[0]
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)  # a package's __init__ importing its own modules is not an edge back
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_is_acyclic():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detection_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    private = [f"{name}: from {target} import {n}" for name, path in modules.items()
               for target, names in _imports(path, modules) for n in names if n.startswith("_")]
    assert not private, private


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_opens_with_a_docstring(name):
    docstring = ast.get_docstring(ast.parse(_modules()[name].read_text()))
    assert docstring and len(docstring.split()) >= 5, f"{name} has no docstring saying what it owns"


def test_readme_code_map_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## How it works"):readme.index("## Config reference")]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "lightning_slimmoe").glob("*.py")
             if p.name not in ("__init__.py", "__main__.py")}
    assert {f for f in listed if f.startswith("lightning_slimmoe/") and f.endswith(".py")} == files
    assert {"lightning_slimmoe/families/", "callbacks/"} <= listed


def test_readme_config_reference_is_the_run_config():
    from lightning_slimmoe.config import config_reference

    assert config_reference() in (ROOT / "README.md").read_text()


def test_every_recipe_key_is_documented_in_help():
    """Every key a recipe may hold has an attribute docstring, which is its `--help` text (`--stages.help
    StageConfig` lists a stage's keys, its kd and optimizer sections included)."""
    import dataclasses
    import subprocess
    import sys

    from lightning_slimmoe.config import (KDConfig, OptimizerConfig, ParallelConfig, PretrainConfig, RunConfig,
                                          ServingConfig, StageConfig, attribute_docs)

    for cls in (RunConfig, StageConfig, KDConfig, OptimizerConfig, PretrainConfig, ParallelConfig, ServingConfig):
        undocumented = [f.name for f in dataclasses.fields(cls) if not attribute_docs(cls).get(f.name)]
        assert not undocumented, (cls.__name__, undocumented)
    shown = subprocess.run([sys.executable, "train.py", "--stages.help", "StageConfig"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120).stdout
    for doc in ("target width of every expert", "teacher logits kept per token", "peak learning rate"):
        assert doc in " ".join(shown.split()), doc


def test_nothing_points_outside_the_repository():
    offenders = []
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "conf").rglob("*.yaml"),
                 *(p for package in (*PACKAGES, "bench", "tests") for p in (ROOT / package).rglob("*.py"))]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        offenders += [str(path.relative_to(ROOT)) for needle in ("../shared", "/work/") if needle in text]
    assert not offenders, offenders
