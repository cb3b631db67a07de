"""The layout shows the round and holds together: few files at the top level, a library package,
and no import cycles, between modules or between the rooms of the layout (the top-level modules,
data/, model_merging_methods/ and each sub-package of flasc/)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flasc", "data", "model_merging_methods")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project (tests, bench and venvs aside)."""
    out = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, modules: dict) -> set[str]:
    """The project modules a file imports, anywhere in it (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from flasc import models` imports the module flasc.models (a name in a module: the module)
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "flasc" and len(parts) > 1 else parts[0]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, if it has any."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_at_most_six_python_files_at_the_top_level():
    assert len(list(ROOT.glob("*.py"))) <= 6, sorted(p.name for p in ROOT.glob("*.py"))


def test_no_import_cycles_between_modules():
    modules = project_modules()
    graph = {m: imports(p, modules) - {m} for m, p in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the layout
    graph = {
        m: {n for n in deps if not (m.startswith(n + ".") and modules[n].name == "__init__.py")}
        for m, deps in graph.items()
    }
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_no_import_cycles_between_the_rooms_of_the_layout():
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for m, p in modules.items():
        graph.setdefault(room(m), set()).update(room(n) for n in imports(p, modules) if room(n) != room(m))
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_library_never_imports_the_entry_scripts():
    modules = project_modules()
    for m, p in modules.items():
        if m.startswith(("flasc", "data", "model_merging_methods")) or m in ("config", "merging"):
            assert not imports(p, modules) & {"train_lora", "run_experiments", "plot"}, m


def test_importing_the_config_imports_no_component():
    """config.py reads the component registries only when it checks a value: a study's expansion,
    run.sh's questions and plot.py start without loading torch."""
    import subprocess
    import sys

    code = "import sys, config; print(sorted(m for m in ('torch', 'flasc.algorithms', 'merging') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
