"""Session-wide test settings.

XLA's CPU backend spends most of a tiny run optimising code (threefry PRNG, many small fusions);
tests need correct numbers, not fast kernels, so they compile with backend optimisation off. A
persistent compilation cache lets later runs of the same structure (a resumed search, a rerun)
load their programs from disk instead of compiling again. Both must be set before JAX starts.

The tiny runs that several test files read are made here once per session (`searched`, `tiny_all`).
"""
import os
import shutil
import tempfile

_flag = "--xla_backend_optimization_level=0"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
import tiny_runs  # noqa: E402

_cache = tempfile.mkdtemp(prefix="mgas_jax_test_cache_")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def compilation_cache_dir():
    """This session's persistent compilation cache: a subprocess given it as JAX_COMPILATION_CACHE_DIR
    (with the same XLA_FLAGS) loads the programs the tests compiled instead of compiling them again."""
    return _cache


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """(workdir, result) of the session's one finished tiny search (tiny_runs.search_config), in
    <tmp>/search as mode=all lays it out. Read it; copy it (shutil.copytree) before writing to it."""
    from mgas_jax import search

    workdir = tmp_path_factory.mktemp("tiny") / "search"
    return workdir, search.search(tiny_runs.search_config(), str(workdir))


@pytest.fixture(scope="session")
def tiny_all(searched, tmp_path_factory):
    """(workdir, result, modes validated) of mode=all (tiny_runs.short_config) on a copy of the shared
    search: the finished search resumes and only re-exports, then its one reachable export (100k) is
    retrained for 1 epoch of 2 steps, evaluated and reported. The third item lists the mode of each
    config_lib.validate call the run made. Read it; copy it before writing to it."""
    from mgas_jax import config as config_lib
    from mgas_jax import modes

    workdir = tmp_path_factory.mktemp("tiny_all")
    shutil.copytree(searched[0], workdir / "search")
    validations = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_lib, "validate", lambda config, **kw: validations.append(config.mode))
        result = modes.run(tiny_runs.short_config("all"), str(workdir))
    return workdir, result, validations


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per core, as many as memory holds. A worker that compiles a
    super-net step peaks near 6 GB; tests are compile-bound and XLA compiles on one thread, so two
    workers on two cores take about half the time of one."""
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = 12.0
    return max(1, min(os.cpu_count() or 1, int(memory_gb // 6)))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(items):
    """A test that reads a shared tiny run pays for it when it runs alone: it belongs to the slow tier.

    Under pytest-xdist each worker is a session of its own, so a session or module fixture is made once
    per worker that uses it. The tests of one shared run go to one worker (group "tiny"), and so do the
    tests of one module that share a module fixture; the other tests spread one by one."""
    shared = {"searched", "tiny_all"}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if shared & fixtures:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("tiny"))
            continue
        info = getattr(item, "_fixtureinfo", None)
        module_fixtures = sorted(name for name, defs in (info.name2fixturedefs.items() if info else ())
                                 if defs and defs[-1].scope == "module" and name in fixtures)
        if module_fixtures:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ + ":" + "+".join(module_fixtures)))
