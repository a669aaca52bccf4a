"""The package's import structure: every module imports on its own, and no two modules import each other.

Each module is imported in a fresh interpreter of its own, so that a module that only works because
another one was imported first (an import circle resolved by luck of order) fails here. The static
check reads every `import` of the package with `ast` (module level and inside functions), so a lazy
import that hides a circle from the first test is still found.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mgas_jax"


def package_modules() -> dict[str, str]:
    """{dotted module name: file} of every module of the package (a package by its own name)."""
    out = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = package_modules()


def imports_of(path: str, modules) -> set[str]:
    """The package modules a file imports anywhere in it (`import a.b`, `from a import b`, `from a.b import c`)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == PACKAGE:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (line {node.lineno}); the package imports absolutely")
    return found


def import_graph(modules) -> dict[str, set[str]]:
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle of `graph` as a list of nodes [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle():
    graph = import_graph(MODULES)
    assert graph["mgas_jax.modes"] >= {"mgas_jax.search", "mgas_jax.train"}  # the reader sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_workdir_layout_is_a_leaf():
    """workdirs.py is the one owner of the layout that search, retraining, evaluation and reports share."""
    assert import_graph(MODULES)["mgas_jax.workdirs"] == set()
    for name in ("mgas_jax.retrain", "mgas_jax.evaluation", "mgas_jax.reports", "mgas_jax.modes"):
        assert "mgas_jax.workdirs" in import_graph(MODULES)[name], name


def third_party_imports(modules) -> list[str]:
    """The top-level names the package imports at module level from outside itself (jax, flax, ...)."""
    found = set()
    for path in modules.values():
        for node in ast.parse(open(path, encoding="utf-8").read(), path).body:
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return sorted(n for n in found if n.split(".")[0] not in (PACKAGE, "__future__"))


# Imports the package's third-party modules once, then forks one child per package module: each child
# starts with no module of the package loaded and imports just that one, so its import is alone; the
# fork spares each child the seconds of importing jax, flax and orbax again.
_FORKED_IMPORTS = """
import importlib, json, os, sys, traceback
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] == "mgas_jax"]
failures = {}
for module in json.loads(sys.argv[2]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if status:
        failures[module] = text or f"exit status {status}"
print(json.dumps(failures))
"""


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_module_imports_alone():
    modules = sorted(MODULES)
    out = subprocess.run([sys.executable, "-c", _FORKED_IMPORTS, json.dumps(third_party_imports(MODULES)),
                          json.dumps(modules)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail to import alone:\n" + "\n".join(
        f"--- {m}\n{t[-1500:]}" for m, t in failures.items())


@pytest.mark.parametrize("module", ["mgas_jax.config", "mgas_jax.main"])
def test_entry_modules_import_in_a_fresh_interpreter(module):
    """config.py (the start of the former circle) and main.py (which imports every mode) in `python -c`."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"import {module} failed alone:\n{out.stderr[-3000:]}"
