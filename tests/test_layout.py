"""The house rules of the layout, checked on the source (README "How it is built"):

- imports go one way, `job` → `services` → `async_pmd`: the library imports neither, nor Ray
  Serve; an actor never imports the job; the library has no import cycle. The two commands,
  `async_pmd.launch` and `async_pmd.scale`, are the exception the mission's command line makes
  (`python -m async_pmd.launch`): they load the job lazily, after the config is checked;
- every module of the three packages is in README's layout table, and the table names nothing
  that does not exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("async_pmd", "services", "job")


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of `package`."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path) -> set[str]:
    """Absolute module names a file imports (at any depth: lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_imports_go_one_way():
    commands = {"async_pmd.launch": "job", "async_pmd.scale": "job"}
    for name, path in modules("async_pmd").items():
        bad = {m for m in imported(path) if m.split(".")[0] in ("services", "job") or m.startswith("ray.serve")
               or m == "ray" and "from ray import serve" in path.read_text()}
        bad = {m for m in bad if not m.startswith(commands.get(name, "-"))}
        assert not bad, f"{name} imports {sorted(bad)}"
    for name, path in modules("services").items():
        assert not {m for m in imported(path) if m.split(".")[0] == "job"}, name


def test_the_library_has_no_import_cycle():
    library = modules("async_pmd")
    graph = {name: {m for m in imported(path) if m in library and m != name} for name, path in library.items()}
    # a package's __init__ re-exporting its own modules is not a cycle between ideas
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*trail, node, dep])
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_readme_layout_table_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## How it is built"):readme.index("Every batch that crosses an actor boundary")]
    cells = " ".join(re.findall(r"^\| (`[^|]*`) \|", table, flags=re.M))
    named = set(re.findall(r"`([^`]+)`", cells))
    listed = set()
    for cell in named:  # "async_pmd/grouping.py", "ledger.py", "async_pmd/data/" ...
        listed |= {c.strip() for c in cell.split(",")}
    for package in PACKAGES:
        for path in sorted((REPO / package).iterdir()):
            if path.name.startswith(("_", ".")) or path.suffix not in (".py", ""):
                continue
            rel = f"{package}/{path.name}" + ("/" if path.is_dir() else "")
            shown = rel in listed or path.name in listed or f"{package}/" in listed and package != "async_pmd"
            if package == "services" or package == "job":
                # one row each names its files by stem
                row = next(line for line in table.splitlines() if line.startswith(f"| `{package}/`"))
                shown = f"`{path.stem}`" in row
            assert shown, f"{rel} is not in README's layout table"
    for entry in listed:
        if "/" in entry:
            assert (REPO / entry).exists(), f"README's layout table names {entry}, which does not exist"


def test_the_job_and_the_services_modules_load_without_torch():
    """The launcher imports the job and every actor's module, and Ray loads an actor's module in
    each process that takes a handle to it (the driver's takes the buffer's and the store's):
    none of them may pull in torch or DeepSpeed at import (seconds of CPU each at start-up, README
    "Start-up"); an actor imports them in its own process, in its methods."""
    import subprocess
    import sys

    mods = sorted(m for p in ("job", "services") for m in modules(p))
    script = (f"import importlib, sys; [importlib.import_module(m) for m in {mods!r}]; "
              "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
