"""The repo's shape, which a newcomer relies on: scripts at the top and the library in one package,
a short main script, short files, functions and lines, a short README, imports without circles, no
script importing another script, no private argparse, and table.py without torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "venv" not in p.parts)
MODULES = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", "."): p
           for p in SOURCES if "tests" not in p.relative_to(ROOT).parts}


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def is_script(path: Path) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in ast.parse(path.read_text()).body)


def imported(path: Path) -> set[str]:
    """The repo's modules that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # A package import stands for its __init__.
            module = (name if name in MODULES else f"{name}.__init__"
                      if f"{name}.__init__" in MODULES else None)
            if module:
                found.add(module)
    return found


SCRIPTS = ["train_cifar100.py", "test.py", "table.py", "reproduce.py", "benchmark.py", "params.py",
           "gradcam.py", "export.py"]
TOP_LEVEL = {*SCRIPTS, "utils.py", "conf", "models", "training", "docs", "tests", "README.md",
             "requirements.txt", "requirements-export.txt", "pytest.ini"}


def test_the_top_level_holds_the_scripts_and_the_library_one_package():
    """What git tracks at the top: the scripts, conf/, models/, utils.py, the library (training/),
    docs/, tests/, the README, the requirements and pytest's settings."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    entries = {line.split("/")[0] for line in tracked.splitlines() if not line.startswith(".")}
    assert entries == TOP_LEVEL
    assert len(entries) <= 18
    top = [p.name for p in ROOT.glob("*.py")]
    assert sorted(top) == sorted([*SCRIPTS, "utils.py"])
    assert all(is_script(ROOT / name) for name in SCRIPTS)
    library = sorted(p.stem for p in (ROOT / "training").glob("*.py"))
    assert not [name for name in library if is_script(ROOT / "training" / f"{name}.py")]


def test_lines_are_at_most_100_characters():
    long = [f"{p.relative_to(ROOT)}:{number}" for p in SOURCES
            for number, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 100]
    assert long == []


def test_no_private_argparse_and_no_scraped_error_text():
    """A resume checks recorded values with each option's own type (training/arguments.py), not by
    parsing a reconstructed command line and reading argparse's private state or its error text."""
    found = [f"{p.relative_to(ROOT)}: {word}" for p in SOURCES if "tests" not in p.parts
             for word in ("._actions", "argparse.SUPPRESS", "redirect_stderr")
             if word in p.read_text()]
    assert found == []


def test_the_main_script_the_files_and_the_readme_are_short():
    assert lines(ROOT / "train_cifar100.py") <= 250
    assert lines(ROOT / "README.md") <= 200
    assert [p.name for p in SOURCES if lines(p) > 600] == []


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in SOURCES for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno >= 80]
    assert long == []


def test_no_import_circle():
    graph = {name: imported(path) - {name} for name, path in MODULES.items()}

    def circle_from(start, path, seen):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                found = circle_from(start, path + [nxt], seen)
                if found:
                    return found
        return None

    circles = [" -> ".join(c) for c in (circle_from(name, [name], set()) for name in graph) if c]
    assert circles == []


def test_no_script_imports_another_script():
    scripts = {name for name, path in MODULES.items() if is_script(path)}
    assert {"train_cifar100", "test", "table", "reproduce", "benchmark", "gradcam",
            "params"} <= scripts
    assert [(name, sorted(imported(MODULES[name]) & scripts)) for name in sorted(scripts)
            if imported(MODULES[name]) & scripts] == []


@pytest.mark.parametrize("module", ["training.options", "training.run_records", "table",
                                    "training.stopping"])
def test_the_table_and_its_options_import_without_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
