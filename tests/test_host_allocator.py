"""The host's malloc: choosing jemalloc for a run, re-executing the run with it preloaded, telling which
malloc a process has.

The re-execution runs in subprocesses. Where jemalloc is not installed (CI), a stand-in takes its
place: the C library this process already uses, which preloads without changing anything, so the
mechanism (same command, same pid, environment, the log of what it got) is checked on every machine;
where jemalloc is installed, a run under it is checked as well.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mgas_jax import config as config_lib
from mgas_jax import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
JEMALLOC = "/opt/lib/libjemalloc.so.2"   # what `find` returns in the choice tests


def found():
    return JEMALLOC


def nothing():
    return None


def stand_in() -> str:
    """A library that is harmless to preload: the one whose malloc this process calls (glibc's)."""
    library = host_allocator.malloc_library()
    assert library and os.path.isfile(library) and "jemalloc" not in library
    return library


@pytest.mark.parametrize("mode", ["train", "retrain", "all"])
def test_auto_preloads_jemalloc_for_a_cpu_run_that_trains(mode):
    assert host_allocator.preload_for("auto", mode=mode, on_cpu=True, keep_freed=True, find=found) == JEMALLOC


@pytest.mark.parametrize("mode, on_cpu, keep_freed, find", [
    ("search", True, True, found),        # the search was slower and larger under jemalloc
    ("evaluate", True, True, found),
    ("retrain", False, True, found),      # an accelerator's host buffers are few
    ("retrain", True, False, found),      # keep_freed_host_memory=False asks for the system's malloc as it is
    ("retrain", True, True, nothing),     # not installed: the C library's malloc, no error
])
def test_auto_keeps_the_system_malloc_elsewhere(mode, on_cpu, keep_freed, find):
    assert host_allocator.preload_for("auto", mode=mode, on_cpu=on_cpu, keep_freed=keep_freed, find=find) is None


def test_system_never_preloads_and_jemalloc_always_does():
    for mode in ("train", "search"):
        assert host_allocator.preload_for("system", mode=mode, on_cpu=True, keep_freed=True, find=found) is None
        assert host_allocator.preload_for("jemalloc", mode=mode, on_cpu=False, keep_freed=False,
                                          find=found) == JEMALLOC


def test_an_allocator_asked_for_and_missing_is_a_config_error_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(config_lib.ConfigError, match=r"host_allocator = 'jemalloc': no libjemalloc\.so\.2 .*"
                                                      r"apt install libjemalloc2"):
        host_allocator.preload_for("jemalloc", mode="retrain", on_cpu=True, keep_freed=True, find=nothing)
    missing = str(tmp_path / "libjemalloc.so.2")
    with pytest.raises(config_lib.ConfigError, match="no such file"):
        host_allocator.preload_for(missing, mode="retrain", on_cpu=True, keep_freed=True, find=found)
    library = tmp_path / "lib" / "libjemalloc.so.2"
    library.parent.mkdir()
    library.write_bytes(b"")
    monkeypatch.chdir(tmp_path)   # a relative path is made absolute: the re-executed process may start elsewhere
    assert host_allocator.preload_for(os.path.join("lib", "libjemalloc.so.2"), mode="search", on_cpu=True,
                                      keep_freed=True, find=nothing) == str(library)


def test_the_config_key_takes_a_choice_or_a_path():
    config = config_lib.load_config(TINY)
    for value in ("auto", "system", "jemalloc", "/usr/lib/libjemalloc.so.2"):
        config.host_allocator = value
        config_lib.validate(config)
    config.host_allocator = "jemaloc"
    with pytest.raises(config_lib.ConfigError, match="host_allocator = 'jemaloc': must be one of 'auto', 'system', "
                                                     "'jemalloc' or the path"):
        config_lib.validate(config)


def test_find_jemalloc_looks_in_order_and_prefers_the_versioned_name(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    assert host_allocator.find_jemalloc([str(first), str(second), str(tmp_path / "absent")]) is None
    (second / "libjemalloc.so").write_bytes(b"")
    assert host_allocator.find_jemalloc([str(first), str(second)]) == str(second / "libjemalloc.so")
    (second / "libjemalloc.so.2").write_bytes(b"")
    assert host_allocator.find_jemalloc([str(first), str(second)]) == str(second / "libjemalloc.so.2")
    (first / "libjemalloc.so").write_bytes(b"")
    assert host_allocator.find_jemalloc([str(first), str(second)]) == str(first / "libjemalloc.so")


def test_the_preloaded_environment_puts_the_library_and_its_settings_first():
    env = host_allocator.preloaded_env(JEMALLOC, {"LD_PRELOAD": "/x/a.so /x/b.so", "MALLOC_CONF": "narenas:2",
                                                  "HOME": "/h"})
    assert env["LD_PRELOAD"] == f"{JEMALLOC}:/x/a.so:/x/b.so"
    assert env["MALLOC_CONF"] == host_allocator.JEMALLOC_CONF + ",narenas:2"   # later options win: the user's
    assert env[host_allocator.PRELOADED] == JEMALLOC and env["HOME"] == "/h"
    again = host_allocator.preloaded_env(JEMALLOC, {"LD_PRELOAD": JEMALLOC})
    assert again["LD_PRELOAD"] == JEMALLOC and again["MALLOC_CONF"] == host_allocator.JEMALLOC_CONF


def test_this_process_malloc_is_told():
    assert host_allocator.malloc_library() == stand_in()
    assert host_allocator.describe() == "" and host_allocator.jemalloc_version() is None


# Prints its pid and arguments, re-executes itself once with the library of argv[1] preloaded, and prints
# what the second run got.
_REEXEC = textwrap.dedent("""
    import json, os, sys
    from mgas_jax import host_allocator
    if host_allocator.PRELOADED not in os.environ:
        print("first", os.getpid(), flush=False)   # reexec flushes what is buffered
        host_allocator.reexec(sys.argv[1])
    print("second", os.getpid(), json.dumps(dict(
        argv=sys.argv[1:], preload=os.environ["LD_PRELOAD"], conf=os.environ["MALLOC_CONF"],
        malloc=host_allocator.malloc_library(), described=host_allocator.describe())))
""")


def _reexec(library):
    out = subprocess.run([sys.executable, "-X", "utf8", "-c", _REEXEC, library, "two words"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    (first, pid), (second, pid2, got) = [line.split(" ", 2) for line in out.stdout.splitlines()]
    assert (first, second) == ("first", "second") and pid == pid2   # the same process, run again
    got = json.loads(got)
    assert got["argv"] == [library, "two words"]                     # the same command, words kept
    assert got["preload"].split(":")[0] == library and got["conf"].startswith(host_allocator.JEMALLOC_CONF)
    return got


def test_reexec_runs_the_same_command_again_with_the_library_preloaded():
    got = _reexec(stand_in())
    assert got["malloc"] == stand_in() and got["described"] == ""
    jemalloc = host_allocator.find_jemalloc()
    if jemalloc is not None:   # installed on this machine: the second run's malloc is jemalloc's
        got = _reexec(jemalloc)
        assert got["malloc"] == os.path.realpath(jemalloc)
        assert got["described"].startswith("jemalloc ") and got["described"].endswith(f"({got['malloc']})")


def _train(workdir, allocator):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop(host_allocator.PRELOADED, None)
    out = subprocess.run([sys.executable, "-m", "mgas_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                          "--config.mode=train", "--config.train.epochs=1", "--config.train.steps_per_epoch=2",
                          "--config.train.progress=False", f"--config.host_allocator={allocator}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    del results["config"]["host_allocator"]
    return out.stderr, results


@pytest.mark.slow
def test_a_run_re_executed_with_another_malloc_logs_it_and_gives_the_same_results(tmp_path):
    """mgas_jax.main re-executes itself with the library of config.host_allocator preloaded, logs the
    malloc it then has (a warning where it is not jemalloc's), and trains to the same numbers."""
    jemalloc = host_allocator.find_jemalloc()
    library = jemalloc or stand_in()
    log, results = _train(tmp_path / "preloaded", library)
    assert f"re-executing with LD_PRELOAD={os.path.abspath(library)}" in log
    if jemalloc:
        assert "host malloc: jemalloc " in log
        assert f"({os.path.realpath(jemalloc)}), MALLOC_CONF={host_allocator.JEMALLOC_CONF}" in log
    else:
        assert f"LD_PRELOAD={library} did not give this process jemalloc's malloc" in log
        assert "keeps freed memory for reuse" in log
    system_log, system_results = _train(tmp_path / "system", "system")
    assert "re-executing" not in system_log and "host malloc: jemalloc" not in system_log
    # glibc's, set up before validation starts JAX's threads, so that all of them share one arena
    assert "host malloc: keeps freed memory for reuse (kept,one-arena)" in system_log
    assert results == system_results


def test_jemalloc_asked_for_and_missing_ends_the_run_with_exit_status_3(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    missing = tmp_path / "libjemalloc.so.2"
    out = subprocess.run([sys.executable, "-m", "mgas_jax.main", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                          f"--config.host_allocator={missing}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"ConfigError: host_allocator = '{missing}': no such file")
    assert not (tmp_path / "run").exists()


def test_jax_reports_each_compilation_by_the_event_the_release_listens_to():
    """release_after_compiles hangs on this event: if JAX renamed it, the release would stop unseen."""
    import jax
    import jax.numpy as jnp
    seen = []
    jax.monitoring.register_event_duration_secs_listener(lambda event, seconds, **_: seen.append(event))
    jax.jit(lambda x: x * 3 + 1)(jnp.ones(5)).block_until_ready()
    assert host_allocator.COMPILE_EVENT in seen


def test_under_the_c_librarys_malloc_nothing_is_released():
    assert host_allocator.release_freed() is False and host_allocator.release_after_compiles() is False


# Frees 256 MiB that malloc keeps, then compiles a program; prints the RSS (MiB) before and after.
_RELEASE = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from mgas_jax import host_allocator
    def rss():
        return next(int(l.split()[1]) >> 10 for l in open("/proc/self/status") if l.startswith("VmRSS"))
    registered = host_allocator.release_after_compiles(min_seconds=0.0)
    a = np.ones(256 << 20, np.uint8)
    del a
    kept = rss()
    jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()
    print(registered, host_allocator.describe() != "", kept, rss())
""")


def test_freed_pages_are_released_when_a_program_has_compiled():
    """Under jemalloc with JEMALLOC_CONF the freed pages stay until a compilation releases them; under
    the C library's malloc release_after_compiles does nothing (run where jemalloc is installed)."""
    library = host_allocator.find_jemalloc() or stand_in()
    env = host_allocator.preloaded_env(library, dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    registered, jemalloc, kept, after = out.stdout.split()
    assert registered == jemalloc == str(library != stand_in())
    if jemalloc == "True":
        assert int(kept) - int(after) >= 200, (kept, after)
