"""The import structure of r1pipe (docs/DESIGN.md, "Layers"), read from the source with `ast`.

Every `import` counts, at module level or inside a function, and so does `importlib.import_module` /
`__import__` with a literal name. Importing `a.b.c` also runs the package `a.b`, so it counts as
importing `a.b` as well (for a module outside `a.b`). The rules:

- no import cycle;
- no stage module (`r1pipe.stages.<x>`) imports another stage module;
- model/, kernels/ and rewards/ import nothing of the application (`r1pipe.<anything else>`);
- no function is longer than 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"r1pipe": ROOT / "r1pipe", "r1pipe.model": ROOT / "model", "r1pipe.kernels": ROOT / "kernels",
                "r1pipe.rewards": ROOT / "rewards"}
LIBRARIES = ("r1pipe.model", "r1pipe.kernels", "r1pipe.rewards")
MAX_FUNCTION_LINES = 80

def module_files() -> dict[str, Path]:
    """Import name -> source file of every module of the four packages."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported_modules(tree: ast.AST, module: str, is_package: bool, modules) -> set[str]:
    """The modules an import statement (or a literal importlib/__import__ call) in `tree` imports: for
    `from package import name`, the submodule `package.name` if there is one, else `package`."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the four packages it imports (and the packages those run first)."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for name in _imported_modules(tree, module, path.name == "__init__.py", modules):
            if name not in modules:
                continue  # a third-party package
            targets.add(name)
            parts = name.split(".")
            for depth in range(2, len(parts)):  # the packages above it, except r1pipe itself
                parent = ".".join(parts[:depth])
                if not module.startswith(parent + "."):
                    targets.add(parent)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _is_stage(module: str) -> bool:
    return module.startswith("r1pipe.stages.")


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_no_stage_imports_another_stage():
    bad = [(module, target) for module, targets in import_graph().items() if _is_stage(module)
           for target in sorted(targets) if _is_stage(target) and target != module]
    assert not bad, f"stages importing stages: {bad}"


def test_libraries_do_not_import_the_application():
    bad = [(module, target) for module, targets in import_graph().items() if module.startswith(LIBRARIES)
           for target in sorted(targets) if not target.startswith(LIBRARIES)]
    assert not bad, f"model/, kernels/ or rewards/ importing application modules: {bad}"


def test_no_function_over_80_lines():
    long = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name} ({path.relative_to(ROOT)}:{node.lineno}, {lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_rules_catch_what_they_are_for():
    """The walker sees function-level and relative imports, and the cycle finder finds a two-module cycle."""
    tree = ast.parse("def f():\n    from .sibling import x\n    import r1pipe.config\n")
    found = _imported_modules(tree, "r1pipe.stages.grpo", False, {"r1pipe.stages.sibling", "r1pipe.config"})
    assert found == {"r1pipe.stages.sibling", "r1pipe.config"}
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
