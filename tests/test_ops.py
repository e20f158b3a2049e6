"""The backends' structure: every backend method matches the declared Ops, and the package's
imports (function-level ones included) form no cycle. Both run without CuPy: the GPU classes
are compared as classes, and imports are read from the sources."""

import ast
import inspect
import pathlib
import re

import pytest

import fastff
from fastff.cpu.ops import CPUOps
from fastff.gpu.ops import GPUOps
from fastff.ops import Ops

PACKAGE = pathlib.Path(fastff.__file__).parent


def _public_methods(cls):
    return {
        name: member
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }


@pytest.mark.parametrize("backend", [CPUOps, GPUOps], ids=["cpu", "cuda"])
def test_backend_methods_match_the_declared_ops(backend):
    declared = _public_methods(Ops)
    methods = _public_methods(backend)
    assert methods, "no methods found"
    for name, method in methods.items():
        assert name in declared, f"{backend.__name__}.{name} is not declared on Ops"
        assert inspect.signature(method) == inspect.signature(declared[name]), (
            f"{backend.__name__}.{name}{inspect.signature(method)} differs from "
            f"Ops.{name}{inspect.signature(declared[name])}"
        )
    # every operation without a shared implementation is implemented by every backend
    abstract = {
        n for n, m in declared.items() if "raise NotImplementedError" in inspect.getsource(m)
    }
    assert abstract <= set(methods), f"{backend.__name__} lacks {sorted(abstract - set(methods))}"


def test_a_drifted_signature_is_caught():
    class Drifted(CPUOps):
        def ultra_forward(self, x, w_in, b_in, w_out_t, depth, n_trees, act, save_path):
            raise AssertionError

    with pytest.raises(AssertionError, match="differs from"):
        test_backend_methods_match_the_declared_ops(Drifted)


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph():
    """fastff module -> the fastff modules it imports anywhere in its source (.py and .pyx)."""
    modules = {
        _module_name(p): p for p in list(PACKAGE.rglob("*.py")) + list(PACKAGE.rglob("*.pyx"))
    }
    graph = {}
    for name, path in modules.items():
        if path.suffix == ".pyx":  # Cython: read its Python-level imports only
            lines = [
                ln for ln in path.read_text().splitlines() if ln.startswith(("import ", "from "))
            ]
            tree = ast.parse("\n".join(ln for ln in lines if " cimport " not in ln))
        else:
            tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                # `from pkg import submodule` needs only the submodule (pkg is its parent)
                names = [m for m in submodules if m not in modules]
                found = submodules + ([base] if names else [])
            else:
                continue
            targets |= {t for t in found if t in modules and t != name}
        graph[name] = targets
    return graph


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "fastff.gpu.ops" in graph and "fastff.ops" in graph["fastff.gpu.ops"]
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_gpu_kernel_module_mirrors_the_cpu_one():
    """Ops calls self.cmm.<kernel>(...) on either backend: every CUDA launcher has a CPU twin
    of the same name taking n_threads last, and every kernel Ops calls exists on both."""
    from fastff import _cmm
    from fastff.gpu import cmm as gpu_cmm

    launchers = {
        name
        for name, f in vars(gpu_cmm).items()
        if not name.startswith("_") and inspect.isfunction(f) and f.__module__ == gpu_cmm.__name__
    }
    assert launchers, "no launchers found"
    missing = sorted(n for n in launchers if not callable(getattr(_cmm, n, None)))
    assert not missing, f"CUDA launchers without a CPU twin: {missing}"
    called = set()
    for method in _public_methods(Ops).values():
        called |= set(re.findall(r"self\.cmm\.(\w+)", inspect.getsource(method)))
    assert called and called <= launchers, sorted(called - launchers)


def test_unknown_device_names_the_registered_ones():
    from fastff.backends import get_ops

    with pytest.raises(ValueError, match="'cpu' or 'cuda', got 'tpu'"):
        get_ops("tpu")
