"""The shape of the code, held by tests: every import (also those inside functions) forms a graph without circles,
with the scripts on top and the Hub model files at the bottom, and within the library the subpackages in the order
of their stages (docs/design.md); no script is imported; nothing patches sys.path; the library prints nothing, names
no module after the standard library's and hard-codes no text length."""

import ast
import sys
from pathlib import Path

from conftest import ROOT

HUB_FILES = {"modeling_moebert", "configuration_moebert", "experts_moebert"}
# the library's stages, bottom to top: a module imports its own stage's, those below, the flat core modules and the Hub
# files, never a stage above (training and search, at the top, do not import each other)
STAGES = {"data": 1, "encoders": 2, "evaluation": 3, "models": 4, "training": 5, "search": 5}
CORE = {"moebert.names", "moebert.atomic", "moebert.device", "moebert.loading", "moebert.logs"}


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


def stage(module: str) -> int | None:
    """The stage of a library module: 0 for the flat core modules, None outside the library (and its entry point)."""
    if module in CORE:
        return 0
    parts = module.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 and parts[0] == "moebert" else None


def test_the_library_is_the_flat_core_and_the_stage_subpackages():
    library = {name for name in project_files() if name.startswith("moebert.")} - {"moebert.__main__"}
    assert {name for name in library if stage(name) is None and name.count(".") == 1} == set()  # nothing else flat
    assert {name.split(".")[1] for name in library if name.count(".") >= 1 and name not in CORE} == set(STAGES)


def test_no_stage_imports_a_stage_above_it_and_the_core_imports_only_the_core():
    graph = import_graph()
    upward = [f"{module} imports {other}" for module, others in graph.items() if stage(module) is not None
              for other in others if other not in HUB_FILES and (stage(other) or 0) > stage(module)]
    assert not upward
    sideways = [f"{module} imports {other}" for module, others in graph.items() for other in others
                if stage(module) == stage(other) and stage(module) and other.split(".")[1] != module.split(".")[1]]
    assert not sideways


def test_the_library_prints_nothing_outside_its_command_line_entry_point():
    printing = [f"{name}:{node.lineno}" for name, path in project_files().items()
                if name.startswith("moebert.") and name != "moebert.__main__"
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not printing


def test_no_module_is_named_after_a_standard_library_module():
    shadowing = [name for name in project_files() if name.split(".")[-1] in sys.stdlib_module_names]
    assert not shadowing


def test_no_text_length_is_hard_coded_outside_the_recipes():
    """A length comes from the model's config (MoEBertConfig.sequence_length, moebert.loading.max_seq_length_of) or
    from a flag; the recipes are the one place that sets one."""
    found = []
    for name, path in project_files().items():
        if name == "moebert.training.recipes" or not (name.startswith("moebert") or name in HUB_FILES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                named, value = " ".join(ast.unparse(t) for t in targets), node.value or ast.Constant(None)
            elif isinstance(node, ast.keyword):
                named, value = node.arg or "", node.value
            elif isinstance(node, ast.BoolOp):
                named, value = ast.unparse(node), node
            else:
                continue
            numbers = [c for c in ast.walk(value) if isinstance(c, ast.Constant) and type(c.value) is int and c.value >= 64]
            if "length" in named and numbers:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found


def test_a_script_shows_each_library_message_once_on_stderr_whatever_configured_the_root_logger(capsys):
    import io
    import logging

    from moebert.logs import show_logs

    elsewhere = io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(elsewhere)  # as onnxruntime's quantizer's logging.basicConfig leaves the root
    root.addHandler(handler)
    try:
        show_logs()
        logging.getLogger("moebert.search.index").info("3594 papers in search_index/")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err == "3594 papers in search_index/\n" and elsewhere.getvalue() == ""
