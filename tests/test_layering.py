"""The package's layering, read from the imports in the source (ast): commands -> library, eval -> library.

The library (``dts_llm`` outside ``dts_llm.cli``, ``dts_llm.__main__`` and ``dts_llm.commands``) never
imports eval or a command; eval imports no command; no module imports itself back through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("dts_llm.cli", "dts_llm.__main__", "dts_llm.commands")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports() -> dict[str, set[str]]:
    """Every module of dts_llm and eval -> the modules of dts_llm and eval it imports, wherever in its code."""
    graph = {}
    for package in ("dts_llm", "eval"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = _module_name(path)
            here = name if _is_package(path) else name.rpartition(".")[0]
            found = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                    found.update(f"{module}.{alias.name}" for alias in node.names)  # `from .pkg import module`
                    found.add(module)
            graph[name] = found
    return {
        name: {target for target in targets if target in graph and target != name} for name, targets in graph.items()
    }


def _is_command(module: str) -> bool:
    return any(module == command or module.startswith(command + ".") for command in COMMANDS)


def _is_eval(module: str) -> bool:
    return module == "eval" or module.startswith("eval.")


def test_the_library_imports_neither_eval_nor_the_commands():
    graph = imports()
    library = [name for name in graph if name.startswith("dts_llm") and not _is_command(name)]
    assert "dts_llm.trainer" in library and "dts_llm.cli" in graph  # the scan sees both sides
    wrong = {name: sorted(t for t in graph[name] if _is_eval(t) or _is_command(t)) for name in library}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_eval_imports_no_command():
    graph = imports()
    wrong = {name: sorted(filter(_is_command, targets)) for name, targets in graph.items() if _is_eval(name)}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_no_module_imports_itself_back():
    """No cycle: a depth-first walk of the import graph never meets a module still on its path."""
    graph = imports()
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(path[path.index(name) :] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []
