"""The package layout docs/architecture.md describes: no import circles, layers that only look down, and
short functions. Read from the source (ast), so a late import inside a function counts too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "zoft"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """zoft modules this file imports, anywhere in it; `from zoft.pkg import sub` counts as zoft.pkg.sub
    when sub is a module (the package's __init__ is only its docstring and names)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zoft"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            out.update(subs or [node.module])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("zoft"))
    return {m for m in out if m in MODULES}


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_no_import_circles():
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(GRAPH[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_only_look_down():
    """models/ knows nothing of engines, ZO or training (layer streaming aside: generation streams blocks);
    the engine knows nothing of ZO or training; zo/ nothing of training; nothing imports the benchmark."""
    rules = {"zoft.models": ("zoft.engine.native", "zoft.engine.packing", "zoft.zo", "zoft.train", "zoft.session"),
             "zoft.engine": ("zoft.zo", "zoft.train", "zoft.session"),
             "zoft.zo": ("zoft.train", "zoft.session", "zoft.engine")}
    bad = [(m, d) for m, deps in GRAPH.items() for layer, banned in rules.items() if m.startswith(layer)
           for d in deps if d.startswith(banned)]
    bad += [(m, d) for m, deps in GRAPH.items() if not m.startswith(("zoft.bench", "zoft.cli"))
            for d in deps if d.startswith("zoft.bench")]
    assert not bad, bad


def test_functions_are_short():
    """No function in zoft/ longer than ~80 lines (90 with its docstring and signature): a long one is a
    sign that concerns are mixed (the training loop was 300 lines of closures before it was split)."""
    long = [f"{module_name(p)}.{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in ROOT.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 90]
    assert not long, long
