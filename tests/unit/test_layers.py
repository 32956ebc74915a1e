"""The library stands in layers (README, "Layout"): each folder of nanobumble/ imports
only the folders below it, the programs at the package's root sit above the whole
library, and the scripts at the repository root above them. Read from the source
(AST), nothing is imported.

Also checked: no import cycle; no project import inside a function, except the one
place that loads the Triton kernels when they are chosen; no importlib / __import__
on project names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "nanobumble"

# bottom to top; a module may import its own layer and those before it
LAYERS = ("base", "kernels", "model", "data", "store", "inference", "evals", "run")
PROGRAMS = len(LAYERS)  # nanobumble/<program>.py, above every folder
SCRIPTS = len(LAYERS) + 1  # train_*.py and chat.py at the repository root

IMPORT_CALLS = ("__import__", "importlib.import_module", "import_module", "importlib.util.find_spec", "find_spec")

# the one lazy project import: the Triton kernels load only when a run chooses them
LAZY_ALLOWED = {("nanobumble/model/layers.py", "triton_kernels", "nanobumble.kernels")}


def project_files() -> list[Path]:
    return sorted((ROOT / PACKAGE).rglob("*.py")) + sorted(ROOT.glob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return SCRIPTS
    if len(parts) == 1:
        return -1  # the package's own __init__, empty
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return PROGRAMS


def imported_modules(node: ast.AST, importer: str, known: set[str], is_package: bool = False) -> list[str]:
    """The project modules an import statement loads (a from-import of a submodule counts as it).
    Project modules: the package's, and the scripts at the root (train_sft, chat, ...)."""
    tops = {PACKAGE} | {name for name in known if "." not in name}
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in tops]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: from the importer's package (a package's __init__ is its own)
        parts = importer.split(".")
        base = parts[: len(parts) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] not in tops:
        return []
    found = [target]
    found += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return found


def scan() -> tuple[dict[str, set[str]], list[str]]:
    """(top-level project imports of each module, problems found on the way)"""
    files = project_files()
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        name = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        graph[name] = set()

        def visit(node: ast.AST, function: str | None) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in imported_modules(child, name, known, path.name == "__init__.py"):
                        if function is None:
                            graph[name].add(target)
                        elif (rel, function, target) not in LAZY_ALLOWED:
                            problems.append(f"{rel}:{child.lineno}: {target} imported inside {function}()")
                if isinstance(child, ast.Call) and ast.unparse(child.func) in IMPORT_CALLS:
                    func = ast.unparse(child.func)
                    first = child.args[0] if child.args else None
                    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                        problems.append(f"{rel}:{child.lineno}: {func}() of a computed name")
                    elif first.value.split(".")[0] == PACKAGE:
                        problems.append(f"{rel}:{child.lineno}: {func}({first.value!r}) loads a project module by name")
                inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
                visit(child, inner)

        visit(tree, None)
    return graph, problems


def test_no_project_import_inside_a_function_and_none_by_name():
    _, problems = scan()
    assert not problems, "\n".join(problems)


def test_no_import_runs_up_a_layer():
    graph, _ = scan()
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
              for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    graph, _ = scan()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def walk(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                walk(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_layers_are_the_folders():
    """Every folder of the package that holds Python is a named layer (and a package),
    so none escapes the rules above."""
    folders = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    assert folders == set(LAYERS)
    assert all((ROOT / PACKAGE / folder / "__init__.py").is_file() for folder in LAYERS)


def test_the_checker_sees_what_it_must_refuse(tmp_path):
    """The rules above fail on a real violation: an upward import and a lazy one."""
    tree = ast.parse("from nanobumble.run.stage import Stage\ndef f():\n    from nanobumble.data import records\n")
    found = [imported_modules(n, "nanobumble.model.x", {"nanobumble.data.records"})
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert found == [["nanobumble.run.stage"], ["nanobumble.data", "nanobumble.data.records"]]
    assert layer_of("nanobumble.run.stage") > layer_of("nanobumble.model.x")
    assert layer_of("nanobumble.serve") == PROGRAMS and layer_of("train_sft") == SCRIPTS
    # a relative import in a package's __init__ starts from that package; a script counts too
    tree = ast.parse("from .lora import x\nfrom ..run import stage\nimport train_sft\n")
    found = [imported_modules(n, "nanobumble.model", {"nanobumble.run.stage", "train_sft"}, is_package=True)
             for n in tree.body]
    assert found == [["nanobumble.model.lora"], ["nanobumble.run", "nanobumble.run.stage"], ["train_sft"]]
