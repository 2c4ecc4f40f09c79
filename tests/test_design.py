"""The shape of the code, held by tests: every import (also those inside functions) forms a graph without circles,
with the scripts on top and the Hub model files at the bottom; no script is imported; nothing patches sys.path."""

import ast
import sys
from pathlib import Path

from conftest import ROOT

HUB_FILES = {"modeling_moebert", "configuration_moebert", "experts_moebert"}


def project_files() -> dict[str, Path]:
    """{module name: file} of everything but the tests."""
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", ".venv", "mutants") or relative.parts[0].startswith("."):
            continue
        name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    return files


def imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found - {path_module(path)}


def path_module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def is_script(path: Path) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in ast.parse(path.read_text()).body)


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: imported(path, set(files)) - {"moebert"} for name, path in files.items()}


def test_the_import_graph_has_no_circle():
    graph, state = import_graph(), {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import circle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_no_script_is_imported_and_nothing_patches_sys_path():
    files, graph = project_files(), import_graph()
    scripts = {name for name, path in files.items() if is_script(path)}
    assert {"train", "eval", "search", "moebert.__main__", "data.build"} <= scripts
    importers = {f"{module} imports {other}" for module, others in graph.items() for other in others & scripts}
    assert not importers
    patched = [name for name, path in files.items() if "sys.path" in path.read_text()]
    assert not patched


def test_the_hub_files_import_only_torch_transformers_and_each_other():
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "safetensors"}
    for name in HUB_FILES:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: the other Hub file
                assert node.module in HUB_FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                tops = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else [
                    node.module.split(".")[0]]
                assert set(tops) <= allowed | HUB_FILES, (name, tops)
    graph = import_graph()
    assert all(graph[name] <= HUB_FILES for name in HUB_FILES)  # the bottom of the graph


def test_the_library_imports_no_script_and_the_scripts_sit_on_top():
    graph = import_graph()
    library = {name for name in graph if name.startswith("moebert.") and name != "moebert.__main__"}
    for name in library:
        assert graph[name] <= library | HUB_FILES, (name, graph[name] - library - HUB_FILES)


def test_no_function_of_train_py_is_longer_than_sixty_lines():
    tree = ast.parse((ROOT / "train.py").read_text())
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60}
    assert not long
