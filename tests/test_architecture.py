"""The import graph of the package, pinned: leaves stay leaves, backends stay below the API, and
no module reaches into another's private names. Read from the source with ast, so a lazy import
inside a function counts as much as one at the top."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "numba_bn"
LEAVES = ("numba_bn.memory", "numba_bn.layout", "numba_bn.hostcall", "numba_bn.codecache")
ABOVE_THE_BACKENDS = ("numba_bn.functional", "numba_bn.layer", "numba_bn.distributed")


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """(module imported, names taken from it) for every import statement of ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = tuple(alias.name for alias in node.names)
            if node.module is None:  # from . import a, b: modules
                found += [(f"{target}.{name}", ()) for name in names]
            else:
                found.append((target, names))
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _package_imports(module):
    return {target for target, _ in MODULES[module] if target.startswith("numba_bn")}


def test_the_graph_was_read():
    assert {"numba_bn.stats", "numba_bn.cpu.items", "numba_bn.capi.ranges"} <= set(MODULES)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_of_the_package(leaf):
    assert _package_imports(leaf) == set()


def test_the_kernels_statistics_import_only_leaves():
    """stats.py, which every kernel, the CUDA backend and the C library's build import, takes
    only how numba_bn keeps Numba's cache (codecache) from the package."""
    assert _package_imports("numba_bn.stats") <= set(LEAVES)


BACKENDS = [m for m in MODULES if m.startswith(("numba_bn.cpu", "numba_bn.cuda"))]


@pytest.mark.parametrize("module", BACKENDS)
def test_backends_never_import_the_api_above_them(module):
    above = {t for t in _package_imports(module) if t.startswith(ABOVE_THE_BACKENDS)}
    assert above == set(), f"{module} imports {above}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("numba_bn.cpu")])
def test_the_cpu_backend_does_not_import_the_c_library(module):
    assert not {t for t in _package_imports(module) if t.startswith("numba_bn.capi")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_private_name_of_another(module):
    private = [
        f"{target}.{name}"
        for target, names in MODULES[module]
        if target.startswith("numba_bn")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def _reduction_kernels():
    """Names of the kernels compiled with REDUCE_FASTMATH (reassociation allowed)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call)
                and any(
                    k.arg == "fastmath" and ast.unparse(k.value) == "REDUCE_FASTMATH"
                    for k in d.keywords
                )  # fmt: skip
                for d in node.decorator_list
            ):
                names.add(node.name)
    return names


def test_reduction_kernels_are_only_called_apart():
    """A REDUCE_FASTMATH kernel inlined into two callers may be vectorised, hence summed, two
    ways (stats.apart): every call passes through ``apart``, whose noinline call site keeps one
    compiled body, one order, whatever calls it."""
    reductions = _reduction_kernels()
    assert {"runs_stats", "runs_sums", "rows_chunk_stats", "rows_chunk_sums"} <= reductions
    direct = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in reductions:
                    direct.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.func.id}")
    assert not direct, f"called without stats.apart: {direct}"
