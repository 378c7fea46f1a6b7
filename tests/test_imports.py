"""Import hygiene of the installed package, checked by parsing (nothing is imported).

- no import cycles between the package's modules (module-top and function-level imports both count);
- the repository folders passes/, operators/, models/, tools/ are never imported as top-level packages
  (installed, they are spa.passes, spa.operators, spa.models; tools/ is not installed);
- operators/ never imports torch (the operator rules must load without the optional extras);
- imports are at module top, except for the genuinely optional heavy dependencies.

The module list comes from pyproject.toml ([tool.setuptools] packages and package-dir), so it follows the
install layout. Imports under `if TYPE_CHECKING:` do not run and are not edges. Imports by string
(importlib.import_module, e.g. spa.importance's criterion registry) are not seen.
"""
from __future__ import annotations

import ast
import pathlib
import sys
from dataclasses import dataclass, field

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent

# top-level names of optional dependencies (the extras, not [project] dependencies): importing them inside a
# function is how the core stays importable without them
OPTIONAL_HEAVY = {"torch", "gymnasium", "ray", "matplotlib", "sklearn", "onnxscript", "skl2onnx", "tensorflow",
                  "tf2onnx", "jax", "flax", "jax2onnx", "torch_pruning", "mnist1d", "onnxsim", "scipy"}
REPO_FOLDERS = {"passes", "operators", "models", "tools"}
STRING_IMPORTERS = {"importorskip", "import_module", "__import__"}


# ---- parsing ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    module: str          # the importing module
    target: str          # absolute dotted name imported (for `from a import b`: `a.b` if a module, else `a`)
    line: int
    in_function: bool
    path: pathlib.Path


@dataclass
class Package:
    modules: dict[str, pathlib.Path] = field(default_factory=dict)  # dotted name -> file
    packages: set[str] = field(default_factory=set)                # names that are packages (__init__.py)


def package_layout(root: pathlib.Path = ROOT) -> Package:
    """Every module the install ships, by its installed name, from pyproject's setuptools config."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = cfg.get("package-dir", {})
    out = Package()
    for pkg in cfg["packages"]:
        # the longest package-dir key that is `pkg` or a parent of it ("" is the root)
        keys = [k for k in package_dir if k == "" or pkg == k or pkg.startswith(k + ".")]
        key = max(keys, key=len) if keys else ""
        base = package_dir.get(key, "")
        rest = pkg[len(key):].lstrip(".") if key else pkg
        folder = root / base / rest.replace(".", "/") if rest else root / base
        assert (folder / "__init__.py").is_file(), f"package {pkg}: no {folder}/__init__.py"
        for f in sorted(folder.glob("*.py")):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            out.modules[name] = f
        out.packages.add(pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(tree: ast.AST):
    """(node, in_function) for every import statement, skipping `if TYPE_CHECKING:` bodies."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_fn = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_fn
            continue
        children = ast.iter_child_nodes(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = iter(node.orelse)
        fn = in_fn or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((c, fn) for c in children)


def raw_imports(path: pathlib.Path, module: str, is_pkg: bool) -> list[tuple[str, list[str], int, bool]]:
    """(absolute base module, imported names or [] for `import x`, line, in_function) per import statement."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node, in_fn in _walk_imports(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno, in_fn) for a in node.names)
            continue
        if node.level:
            parts = package.split(".")
            if node.level - 1 >= len(parts) + (0 if package else 1):
                raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        out.append((base, [a.name for a in node.names], node.lineno, in_fn))
    return out


def project_imports(pkg: Package, top: str = "spa") -> list[Import]:
    """Imports of the package's own modules (third-party and stdlib imports are dropped)."""
    out = []
    for module, path in pkg.modules.items():
        for base, names, line, in_fn in raw_imports(path, module, module in pkg.packages):
            if base.split(".")[0] != top:
                continue
            targets = []
            if names:  # from base import names: base.name when that is a module, else base
                for n in names:
                    targets.append(f"{base}.{n}" if f"{base}.{n}" in pkg.modules else base)
            else:      # import a.b.c: the longest prefix that is a module
                parts = base.split(".")
                while parts and ".".join(parts) not in pkg.modules:
                    parts.pop()
                targets.append(".".join(parts) if parts else base)
            for t in dict.fromkeys(targets):
                out.append(Import(module, t, line, in_fn, path))
    return out


# ---- cycles -----------------------------------------------------------------------------------------------------
def tarjan_scc(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (iterative Tarjan), each sorted, in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(sorted(comp))
    return comps


def import_cycles(pkg: Package, top: str = "spa") -> list[tuple[list[str], list[Import]]]:
    """Each strongly connected component of more than one module, with the imports inside it."""
    imps = [i for i in project_imports(pkg, top) if i.target != i.module]
    graph: dict[str, set[str]] = {m: set() for m in pkg.modules}
    for i in imps:
        graph[i.module].add(i.target)
    out = []
    for comp in tarjan_scc(graph):
        if len(comp) > 1:
            members = set(comp)
            out.append((comp, [i for i in imps if i.module in members and i.target in members]))
    return sorted(out, key=lambda c: (-len(c[0]), c[0]))


def describe_cycles(cycles) -> str:
    lines = []
    for comp, edges in cycles:
        lines.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        for i in sorted(edges, key=lambda i: (i.module, i.line)):
            where = "in a function" if i.in_function else "module top"
            lines.append(f"    {i.module} -> {i.target}  ({i.path.relative_to(i.path.parents[1])}:{i.line}, {where})")
    return "\n".join(lines)


# ---- the detector on fake packages ------------------------------------------------------------------------------
def _fake(tmp_path: pathlib.Path, files: dict[str, str]) -> Package:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackages = ["fake", "fake.sub", "fake.extra"]\n'
        '[tool.setuptools.package-dir]\n"fake.extra" = "extra"\n')
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in ("fake", "fake/sub", "extra"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "__init__.py").touch()
    return package_layout(tmp_path)


def test_detector_finds_function_level_cycle(tmp_path):
    pkg = _fake(tmp_path, {
        "fake/a.py": "from . import b\n",
        "fake/b.py": "def f():\n    from .a import thing\n    return thing\n",
        "fake/c.py": "import fake.a\n",
    })
    cycles = import_cycles(pkg, "fake")
    assert [c for c, _ in cycles] == [["fake.a", "fake.b"]]
    edges = {(i.module, i.target, i.in_function) for i in cycles[0][1]}
    assert edges == {("fake.a", "fake.b", False), ("fake.b", "fake.a", True)}
    assert "fake.a -> fake.b" in describe_cycles(cycles)


def test_detector_resolves_package_dir_and_relative_levels(tmp_path):
    pkg = _fake(tmp_path, {
        "fake/sub/x.py": "from .. import a\nfrom ..extra import y\n",
        "fake/a.py": "import os\nimport numpy\nfrom fake.sub.x import name\n",
        "extra/y.py": "from fake import sub\n",
    })
    assert set(pkg.modules) >= {"fake", "fake.a", "fake.sub", "fake.sub.x", "fake.extra", "fake.extra.y"}
    assert pkg.modules["fake.extra.y"] == tmp_path / "extra" / "y.py"
    cycles = import_cycles(pkg, "fake")
    # a <-> sub.x; extra.y -> fake.sub (the package, not a module named sub.x) closes no further cycle
    assert [c for c, _ in cycles] == [["fake.a", "fake.sub.x"]]


def test_detector_passes_without_cycle(tmp_path):
    pkg = _fake(tmp_path, {
        "fake/a.py": "from . import b\nimport fake.sub\n",
        "fake/b.py": "def f():\n    from fake.extra import y\n    return y\n",
        "extra/y.py": "import json\n",
        "fake/sub/z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake import a\n",
    })
    assert import_cycles(pkg, "fake") == []


def test_tarjan_on_a_long_chain_is_iterative():
    n = 5 * sys.getrecursionlimit()
    graph = {str(i): {str(i + 1)} for i in range(n)}
    graph[str(n)] = {"0"}
    comps = tarjan_scc(graph)
    assert len(comps) == 1 and len(comps[0]) == n + 1
    graph[str(n)] = set()
    assert len(tarjan_scc(graph)) == n + 1


# ---- the real package -------------------------------------------------------------------------------------------
def test_layout_covers_every_package_folder():
    pkg = package_layout()
    assert {"spa", "spa.search", "spa.passes", "spa.operators", "spa.models"} <= pkg.packages
    assert pkg.modules["spa.passes.fold"] == ROOT / "passes" / "fold.py"
    on_disk = {p for d in ("spa", "passes", "operators", "models") for p in (ROOT / d).rglob("*.py")}
    assert on_disk == set(pkg.modules.values()), "a .py file under a package folder that the install misses"


def test_no_import_cycles():
    cycles = import_cycles(package_layout())
    assert not cycles, "import cycles:\n" + describe_cycles(cycles)


def _all_files(dirs=("spa", "passes", "operators", "models", "tools", "tests")):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def _bare_imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(where: name, by string) for each import of a repository folder name as a top-level package: static
    imports, and string imports (pytest.importorskip / importlib.import_module / __import__ of a literal)."""
    rel = path.relative_to(ROOT)
    allowed = {"tools"} if rel.parts[0] in ("tests", "tools") else set()
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        names: list[str] = []
        by_string = False
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in STRING_IMPORTERS:
            names, by_string = [node.args[0].value], True
        for n in names:
            if n.split(".")[0] in REPO_FOLDERS - allowed:
                bad.append((f"{rel}:{node.lineno}: {n}", by_string))
    return bad


def test_no_bare_repo_folder_imports():
    """`import models` works from a checkout (pytest's pythonpath) but not from an install, and it loads a
    second copy of the modules next to spa.models."""
    bad = [w for f in _all_files() for w, by_string in _bare_imports(f) if not by_string]
    assert not bad, "import spa.passes / spa.operators / spa.models instead:\n" + "\n".join(bad)


def test_no_bare_repo_folder_string_imports():
    bad = [w for f in _all_files() for w, by_string in _bare_imports(f) if by_string]
    assert not bad, "use the installed names (spa.models, ...):\n" + "\n".join(bad)


def test_operators_never_import_torch():
    pkg = package_layout()
    bad = []
    for module, path in pkg.modules.items():
        if not module.startswith("spa.operators"):
            continue
        for base, _, line, _ in raw_imports(path, module, module in pkg.packages):
            if base.split(".")[0] == "torch":
                bad.append(f"{path.relative_to(ROOT)}:{line}: {base}")
    assert not bad, "operators/ must not import torch:\n" + "\n".join(bad)


# core dependencies imported inside functions on purpose, with the reason
DEFERRED_CORE = {
    "onnxruntime": "costs ~0.3 s at start-up; --no-verify and analyse never load it (tests/test_cli_errors.py)",
    "PIL": "only image folders (--calib DIR, make-calib) need Pillow; a prune without them does not load it",
}


# project modules imported inside functions on purpose, with the reason (start-up time: see BENCHMARKS.md (a))
DEFERRED_PROJECT = {
    "spa.progressive": "only --steps runs load the fine-tuning machinery",
    "spa.reconstruction": "only runs with value passes (reconstruct, recalibrate, compensate) load them",
}


def heavy_modules(pkg: Package) -> set[str]:
    """Project modules that import an optional heavy dependency at module top, directly or through other
    project modules they import at module top: importing one of them inside a function is how a caller stays
    importable without that dependency."""
    top_edges: dict[str, set[str]] = {m: set() for m in pkg.modules}
    heavy = set()
    for module, path in pkg.modules.items():
        for base, _, _, in_fn in raw_imports(path, module, module in pkg.packages):
            if in_fn:
                continue
            if base.split(".")[0] in OPTIONAL_HEAVY:
                heavy.add(module)
    for imp in project_imports(pkg):
        if not imp.in_function:
            top_edges[imp.module].add(imp.target)
    changed = True
    while changed:
        changed = False
        for module, targets in top_edges.items():
            parent = module.rpartition(".")[0]   # importing a submodule runs its package's __init__ first
            if module not in heavy and (targets & heavy or parent in heavy):
                heavy.add(module)
                changed = True
    return heavy


def function_level_imports(pkg: Package) -> list[str]:
    """Imports inside functions of anything but an optional heavy dependency (or a project module that needs
    one, or a core dependency deferred for a written reason)."""
    bad = []
    heavy = heavy_modules(pkg)
    for module, path in pkg.modules.items():
        for base, names, line, in_fn in raw_imports(path, module, module in pkg.packages):
            root = base.split(".")[0]
            if not in_fn or root in OPTIONAL_HEAVY or root in DEFERRED_CORE:
                continue
            targets = {base, *(f"{base}.{n}" for n in names)}
            if root == "spa" and targets & (heavy | set(DEFERRED_PROJECT)):
                continue
            what = f"from {base} import {', '.join(names)}" if names else f"import {base}"
            bad.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    return bad


def test_heavy_modules_are_found_through_module_top_imports():
    heavy = heavy_modules(package_layout())
    assert {"spa.torch_graph", "spa.lowering", "spa.search.env", "spa.search"} <= heavy
    assert not heavy & {"spa.operators", "spa.driver", "spa.cli", "spa.latency", "spa.importance"}


def test_imports_at_module_top():
    """Function-level imports are for optional heavy dependencies only (torch, gymnasium, matplotlib, ...);
    the package's own modules and the core dependencies are imported at module top."""
    bad = function_level_imports(package_layout())
    own = sum(b.split(": ", 1)[1].split()[1].split(".")[0] == "spa" for b in bad)
    assert not bad, f"{len(bad)} function-level imports ({own} of spa modules):\n" + "\n".join(bad)


# The layers of docs/architecture.md, bottom-up: a module imports only from its own layer or below.
LAYERS = [
    ["spa.errors", "spa.memory", "spa.fileio", "spa.options"],
    ["spa.ir", "spa.validate", "spa.model", "spa.quant", "spa.labels", "spa.groups"],
    ["spa.operators", "spa.lowering", "spa.torch_graph", "spa.models"],
    ["spa.calib", "spa.importance", "spa.execution", "spa.synthesis", "spa.obspa", "spa.gradients",
     "spa.fixed_transforms", "spa.patterns"],
    ["spa.passes"],
    ["spa.select", "spa.budget", "spa.loading"],
    ["spa.reconstruction", "spa.pipeline", "spa.driver"],
    ["spa.search", "spa.latency", "spa.finetune", "spa.train_batchnorm", "spa.torch_bridge", "spa.torch_plan",
     "spa.progressive"],
    ["spa.cli"],
]


def layer_of(module: str, layers=LAYERS) -> int | None:
    for depth, names in enumerate(layers):
        if any(module == n or module.startswith(n + ".") for n in names):
            return depth
    return None


def upward_imports(pkg: Package, layers=LAYERS, top: str = "spa") -> list[str]:
    """Every import from a module to a module of a higher layer (the package's own __init__ is the API facade
    and exempt)."""
    return [f"{imp.module} (layer {layer_of(imp.module, layers)}) imports {imp.target} "
            f"(layer {layer_of(imp.target, layers)}) at {imp.path.name}:{imp.line}"
            for imp in project_imports(pkg, top)
            if imp.module != top and layer_of(imp.target, layers) is not None
            and layer_of(imp.module, layers) is not None
            and layer_of(imp.target, layers) > layer_of(imp.module, layers)]


def test_every_module_has_a_layer_and_imports_only_downwards():
    pkg = package_layout()
    unplaced = sorted(m for m in pkg.modules if m != "spa" and layer_of(m) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    upward = upward_imports(pkg)
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    pkg = _fake(tmp_path, {"fake/low.py": "def f():\n    from .high import g\n", "fake/high.py": "from . import low\n"})
    layers = [["fake.low"], ["fake.high"]]
    assert upward_imports(pkg, layers, "fake") == ["fake.low (layer 0) imports fake.high (layer 1) at low.py:2"]
    assert upward_imports(pkg, list(reversed(layers)), "fake") == \
        ["fake.high (layer 0) imports fake.low (layer 1) at high.py:1"]
