"""The direction of imports across the whole repository: train.py -> trainer -> data, with common/ and convert/ at
the bottom, nothing importing train.py (the entry point), and no loop of imports between any two modules.

Every .py file's imports are read with `ast`, not executed: imports inside functions and under TYPE_CHECKING
count too (a lazy import is still a dependency), relative imports are resolved to their package, and
`importlib.import_module("...")` with a literal name counts as an import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT = "train"  # train.py


@dataclass(frozen=True)
class Import:
    file: Path  # relative to the repository root
    line: int
    module: str  # dotted and absolute

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def python_files(root: Path = REPO_ROOT) -> list[Path]:
    """Every .py file of the project: hidden folders (.venv, .git) and caches left out."""
    return sorted(
        path for path in root.rglob("*.py")
        if not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts)
    )


def project_names(root: Path = REPO_ROOT) -> set[str]:
    """The top-level names the project's own code is imported by: its folders of Python files, its top .py files."""
    return {path.relative_to(root).parts[0].removesuffix(".py") for path in python_files(root)}


def _package_of(relative: Path) -> list[str]:
    """The package a file's relative imports start from: its folder (also for an __init__.py)."""
    return list(relative.parent.parts)


def imports_of(path: Path, root: Path = REPO_ROOT) -> list[Import]:
    relative = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(relative))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(relative, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x`, `from ..pkg import y`: relative to this file's package
                base = _package_of(relative)[: len(_package_of(relative)) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(relative, node.lineno, module))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append(Import(relative, node.lineno, node.args[0].value))
    return sorted(found, key=lambda f: f.line)  # ast.walk goes breadth first; report in reading order


def files_of(folder: str, root: Path = REPO_ROOT) -> list[Path]:
    """The .py files of `folder`: a top-level folder, or a top-level .py file named without .py."""
    return [path for path in python_files(root) if path.relative_to(root).parts[0].removesuffix(".py") == folder]


def imports_under(folder: str, root: Path = REPO_ROOT) -> list[Import]:
    return [found for path in files_of(folder, root) for found in imports_of(path, root)]


def violations(folder: str, forbidden: set[str], root: Path = REPO_ROOT) -> list[str]:
    return [str(found) for found in imports_under(folder, root) if found.top in forbidden - {folder}]


def module_name(relative: Path) -> str:
    """`trainer/run/loop.py` -> `trainer.run.loop`; a package's `__init__.py` is the package."""
    return ".".join(relative.with_suffix("").parts).removesuffix(".__init__")


def module_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (`from pkg import module` is the module; an import of
    a name inside a module is that module)."""
    modules = {module_name(path.relative_to(root)): path for path in python_files(root)}

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {found.module for found in imports_of(path, root)}
        targets |= {f"{node.module}.{alias.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level
                    for alias in node.names if f"{node.module}.{alias.name}" in modules}
        graph[name] = {resolved for target in targets if (resolved := resolve(target)) and resolved != name}
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (strongly connected components of more than
    one module), each sorted; Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start), on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child), on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    loops.append(sorted(group))
    return loops


# ---------------------------------------------------------------- the rules


def test_data_imports_neither_trainer_nor_train():
    assert violations("data", {"trainer", ENTRY_POINT}) == []


@pytest.mark.slow
def test_common_imports_nothing_of_the_project():
    assert project_names() >= {"common", "data", "trainer", ENTRY_POINT}  # the rule below is not vacuous
    assert violations("common", project_names()) == []


@pytest.mark.slow
def test_convert_imports_neither_trainer_nor_data():
    if not files_of("convert"):
        pytest.skip("convert/ does not exist yet (the conversion package is being created); this rule applies to it "
                    "once it does: convert/ imports neither trainer nor data (nor train.py)")
    assert violations("convert", {"trainer", "data", ENTRY_POINT}) == []


@pytest.mark.slow
def test_nothing_imports_the_entry_point():
    assert [str(found) for path in python_files() for found in imports_of(path) if found.top == ENTRY_POINT] == []


@pytest.mark.slow
def test_no_two_modules_import_each_other():
    assert import_loops(module_graph()) == []


@pytest.mark.slow
def test_no_module_of_the_product_is_over_450_lines():
    """Long modules hide what they own: past this, a module splits along its concepts."""
    long = [f"{path.relative_to(REPO_ROOT)}: {lines} lines" for folder in ("trainer", "data", "convert", "common")
            for path in files_of(folder) if (lines := len(path.read_text(encoding="utf-8").splitlines())) > 450]
    assert long == []


# ---------------------------------------------------------------- the reader itself


def test_the_reader_sees_every_kind_of_import(tmp_path: Path):
    package = tmp_path / "pkg" / "sub"
    package.mkdir(parents=True)
    (package / "mod.py").write_text(
        "from __future__ import annotations\n"
        "import os, trainer.config as config\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "if TYPE_CHECKING:\n"
        "    from data.scan import Scan\n"
        "def later():\n"
        "    import train\n"
        "    return importlib.import_module('common.files')\n",
        encoding="utf-8",
    )
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "ignored.py").write_text("import trainer\n", encoding="utf-8")
    found = imports_under("pkg", tmp_path)
    assert [f.module for f in found] == ["__future__", "os", "trainer.config", "typing", "pkg.sub", "pkg.other",
                                         "data.scan", "train", "common.files"]
    assert str(found[2]) == f"{Path('pkg/sub/mod.py')}:2 imports trainer.config"
    assert project_names(tmp_path) == {"pkg"}
    assert violations("pkg", {"trainer", "train"}, tmp_path) == [
        f"{Path('pkg/sub/mod.py')}:2 imports trainer.config", f"{Path('pkg/sub/mod.py')}:9 imports train"]


@pytest.mark.slow
def test_the_rules_catch_what_the_repository_really_imports():
    """train.py imports the trainer, and the trainer imports data/: the reader finds real edges."""
    assert any(found.module.startswith("trainer.config.") for found in imports_under(ENTRY_POINT))
    assert any(found.top == "data" for found in imports_under("trainer"))


def test_the_loop_finder_finds_loops_and_only_loops(tmp_path: Path):
    for name, text in {"a.py": "import b\n", "b.py": "from c import x\n", "c.py": "import a\nimport d\n",
                       "d.py": "import os\n", "e.py": "from pkg import f\n", "pkg/__init__.py": "",
                       "pkg/f.py": "def later():\n    import e\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    graph = module_graph(tmp_path)
    assert graph["a"] == {"b"} and graph["c"] == {"a", "d"} and graph["e"] == {"pkg", "pkg.f"}
    assert import_loops(graph) == [["a", "b", "c"], ["e", "pkg.f"]]
    assert import_loops({"x": {"y"}, "y": set()}) == []
