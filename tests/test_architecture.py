"""The layout's rules, checked on the source: imports flow one way between the pipeline's stages and never in a
circle, and the modules stay a size a reader can hold.

Every import counts, also one inside a function (a lazy import is still a dependency). The stages, lowest first
(a module may import its own stage and the ones below it):

    errors, log, files, tiny  <-  config  <-  data  <-  integrations  <-  ternary (formats, QAT layers, export,
    kernels)  <-  models  <-  engine  <-  ternary.ptq, eval  <-  recipe  <-  recipes  <-  registry, pipeline, cli

integrations/ (every touch of a library's private names) sits low, so that any stage above data may use it; in
exchange it imports nothing of posttrain above data. ternary's core sits below models because models loads
ternary folders through it; ptq (ternarize a loaded model) sits above. eval and ternary never import recipes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STAGES = [  # (stage, module prefixes); a module belongs to the longest matching prefix
    ("foundation", ["posttrain.errors", "posttrain.log", "posttrain.files", "posttrain.tiny"]),
    ("config", ["posttrain.config"]),
    ("data", ["posttrain.data"]),
    ("integrations", ["posttrain.integrations"]),
    ("ternary", ["posttrain.ternary"]),
    ("models", ["posttrain.models"]),
    ("engine", ["posttrain.engine"]),
    ("evaluation and PTQ", ["posttrain.eval", "posttrain.ternary.ptq"]),
    ("recipe", ["posttrain.recipe"]),
    ("recipes", ["posttrain.recipes"]),
    ("entry points", ["posttrain.registry", "posttrain.pipeline", "posttrain.cli", "posttrain.__main__"]),
]


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "recipes":  # installed as posttrain.recipes
        parts = ["posttrain", "recipes", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = [*ROOT.glob("posttrain/**/*.py"), *ROOT.glob("recipes/*.py")]
    return {module_name(p): p for p in files}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """posttrain modules that a file imports anywhere in it (`from a.b import c` counts a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def stage_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        # A package's __init__ runs before its submodules: importing posttrain.a.b imports posttrain.a too.
        edges = imported_modules(path, known)
        graph[module] = {m for m in edges if m != module and not module.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_stage():
    unplaced = [m for m in source_files() if m != "posttrain" and stage_of(m) is None]
    assert not unplaced, f"modules outside every stage (add them to STAGES): {unplaced}"


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_flow_one_way():
    against = []
    for module, imports in import_graph().items():
        if module == "posttrain":  # the package's public API re-exports from every stage
            continue
        for target in imports:
            if target != "posttrain" and stage_of(target) > stage_of(module):
                against.append(f"{module} ({STAGES[stage_of(module)][0]}) imports {target} "
                               f"({STAGES[stage_of(target)][0]})")
    assert not against, "imports against the stages' direction:\n" + "\n".join(sorted(against))


def test_eval_and_ternary_never_import_recipes():
    offending = [(m, t) for m, imports in import_graph().items() for t in imports
                 if m.startswith(("posttrain.eval", "posttrain.ternary")) and t.startswith("posttrain.recipe")]
    assert not offending, offending


def test_graph_sees_lazy_imports():
    """The checker itself: an import inside a function is an edge."""
    graph = import_graph()
    assert "posttrain.registry" in graph["posttrain.cli"]  # cli imports the registry inside its verbs


def node_name(node) -> str:
    return getattr(node, "name", None) or ""


def test_modules_and_functions_stay_readable():
    too_long = []
    for module, path in source_files().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > 500:
            too_long.append(f"{module}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            # Triton kernels (ternary/infer, `_*_fn`) are one function each by nature: a launch is one body.
            kernel = module.startswith("posttrain.ternary.infer") and node_name(node).endswith("_fn")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not kernel:
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert not too_long, "split these: " + "; ".join(too_long)


HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "triton", "bitsandbytes")


@pytest.mark.parametrize("statement", ["import posttrain", "import posttrain.ternary",
                                       "from posttrain.cli import build_parser; build_parser().format_help()"])
def test_heavy_libraries_load_on_first_use(statement):
    """`import posttrain.ternary` and `posttrain --help` stay instant: torch, transformers, TRL and triton load
    only when a function that needs them runs (checked as the modules loaded, not as a time: timings are noisy)."""
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"{statement!r} imports {loaded}"
