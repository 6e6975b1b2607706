"""The package's import graph, read with `ast` from the sources (nothing is imported): the layers of docs/design.md,
no cycle, no phase importing a sibling phase, kernels without timm, phases without triton, and no import inside a
function except the optional or heavy dependencies listed here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# docs/design.md, "Layers": a module may import its own component and the layers below its own; within the
# helpers (layer 0), the foundation (layer 2) and the application layer (4) also its own layer. Phases never import
# each other.
LAYERS = {
    0: ("_io", "_nvtx", "_malloc", "_threads", "_validate", "_machine", "config"),  # helpers
    1: ("kernels", "reference", "_decode", "kmeans"),  # Triton kernels, their torch references, the C++ decoder
    2: ("ops", "augment", "backbone", "data", "synthetic", "artifacts"),  # the foundation the phases stand on
    3: ("stats", "distillation", "evaluation"),  # the phases
    4: ("pipeline", "demo", "cli", "__main__", "__init__"),  # the API and the applications
}
PHASES = LAYERS[3]
SAME_LAYER_OK = (0, 2, 4)
LAYER_OF = {component: layer for layer, components in LAYERS.items() for component in components}
EXTENSIONS = ("sfmkern._decode",)  # compiled modules (no .py source)
# Imports allowed inside a function: optional packages, heavy ones loaded only on the path that needs them (Triton
# through sfmkern.kernels, the compiled decoder), `_threads` reading torch only once it is loaded, and the CLI's and
# the package's lazy loading (so that `import sfmkern` and `sfmkern --help` stay cheap and OMP_WAIT_POLICY is set
# before torch loads).
LAZY_OK = ("timm", "PIL", "safetensors", "yaml", "nvtx", "triton", "skimage", "fcntl", "torch.utils.flop_counter",
           "torch.distributed", "sfmkern.kernels", "sfmkern._decode")
LAZY_OK_IN = {"_threads": ("torch",)}
LAZY_MODULES = ("__init__", "__main__", "cli")


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "sfmkern").rglob("*.py")):
        rel = path.relative_to(ROOT / "sfmkern").with_suffix("")
        if rel.parts[0] == "kernels":
            continue  # read from kernels/ below (sfmkern/kernels is a link to it in a checkout)
        files[".".join(("sfmkern", *rel.parts)).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files["sfmkern.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return files


FILES = _module_files()


def _component(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import of the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                for alias in child.names:  # `from pkg import submodule` is an import of the submodule
                    target = f"{base}.{alias.name}"
                    found.append((target if target in FILES or target in EXTENSIONS else base, in_function,
                                  child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {module: _imports(module, path) for module, path in FILES.items()}


def test_the_graph_reads_the_whole_package():
    assert {"sfmkern.cli", "sfmkern.artifacts.head", "sfmkern.evaluation.protocol", "sfmkern.distillation.run",
            "sfmkern.stats", "sfmkern.kernels"} <= set(FILES)
    assert all(_component(m) in LAYER_OF for m in FILES), sorted(m for m in FILES if _component(m) not in LAYER_OF)


@pytest.mark.parametrize("module", sorted(FILES))
def test_imports_point_down_the_layers(module):
    own = _component(module)
    for target, _, line in GRAPH[module]:
        if not target.startswith("sfmkern.") or _component(target) == own:
            continue
        other = _component(target)
        where = f"{FILES[module].relative_to(ROOT)}:{line} imports {target}"
        assert not (own in PHASES and other in PHASES), f"{where}: a phase imports a sibling phase"
        ok = LAYER_OF[other] < LAYER_OF[own] or (LAYER_OF[other] == LAYER_OF[own] and LAYER_OF[own] in SAME_LAYER_OK)
        assert ok, f"{where}: layer {LAYER_OF[own]} may not import layer {LAYER_OF[other]}"


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_import_inside_a_function_but_optional_or_heavy_ones(module):
    if _component(module) in LAZY_MODULES:
        return
    for target, in_function, line in GRAPH[module]:
        allowed = LAZY_OK + LAZY_OK_IN.get(_component(module), ())
        if in_function:
            assert target.startswith(allowed), f"{FILES[module].relative_to(ROOT)}:{line}: {target} inside a function"


def test_kernels_never_import_timm_and_phases_never_import_triton():
    for module, imports in GRAPH.items():
        names = {target for target, _, _ in imports}
        if _component(module) == "kernels":
            assert not any(n.startswith("timm") for n in names), module
        if _component(module) in PHASES or _component(module) == "artifacts":
            assert not any(n.startswith(("triton", "sfmkern.kernels")) for n in names), module


def test_no_cycle():
    edges = {m: sorted({t for t, _, _ in imports if t in FILES and t != m}) for m, imports in GRAPH.items()}
    # a package's __init__ re-exporting its submodules is the usual shape; those edges are left out of the cycle check
    edges = {m: [t for t in ts if not (FILES[m].name == "__init__.py" and t.startswith(m + "."))]
             for m, ts in edges.items()}
    state: dict[str, int] = {}

    def walk(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])


def test_setup_installs_every_package():
    """A fresh install carries every subpackage: setup.py's explicit list names each folder with an __init__.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "packages")
    found = {"sfmkern." + ".".join(p.parent.relative_to(ROOT / "sfmkern").parts) if p.parent != ROOT / "sfmkern"
             else "sfmkern" for p in (ROOT / "sfmkern").rglob("__init__.py") if "kernels" not in p.parts}
    assert found | {"sfmkern.kernels"} == set(listed)
