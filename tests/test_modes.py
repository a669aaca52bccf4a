"""Process setup of the run modes: the host allocator."""
import subprocess
import sys
import textwrap

import pytest

# Allocates, fills and frees a 64 MiB buffer five times; prints the minor page faults that took.
_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from mgas_jax import modes
    kept = modes.keep_freed_host_memory() if sys.argv[1] == "keep" else "system"
    def use():
        a = np.empty(64 << 20, np.uint8)
        a.fill(1)
    use()   # the first use maps new pages either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        use()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options are Linux-only")
def test_kept_host_memory_is_reused_without_page_faults():
    """With keep_freed_host_memory, a freed 64 MiB block is reused as it is: refilling it maps no
    new pages; with glibc's defaults each refill maps the block afresh."""
    assert _faults("keep")[0] == "kept,one-arena"   # no thread had allocated yet
    kept, system = _faults("keep")[1], _faults("system")[1]
    assert system >= 20 and kept <= system // 20, (kept, system)


@pytest.mark.slow
def test_the_logged_hash_is_the_checked_and_recorded_one(tmp_path):
    """mode=train: the hash logged when the run starts is the one in results.json and in its checkpoints."""
    import json
    import logging
    import os
    import re

    from mgas_jax import checkpoint, modes
    from mgas_jax import config as config_lib

    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py"))
    config.mode = "train"
    config.train.epochs = 1
    config.train.steps_per_epoch = 1
    messages = []

    class Lines(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    absl_logger, handler = logging.getLogger("absl"), Lines(logging.INFO)
    level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    absl_logger.addHandler(handler)
    try:
        results = modes.run(config, str(tmp_path))
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    [start] = [m for m in messages if m.startswith("mode=train")]
    logged = re.search(r"train hash ([0-9a-f]{16})", start).group(1)
    assert json.loads((tmp_path / "results.json").read_text())["config_hash"] == results["config_hash"] == logged
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1_000_000)
    try:
        assert ckpt.meta(ckpt.latest_step())["config_hash"] == logged
    finally:
        ckpt.close()
    # the one function behind all three: the semantic keys of the sections training reads
    assert logged == config_lib.config_hash(config, config_lib.TRAIN_SECTIONS)
    assert config_lib.config_hash(config) != logged  # the whole config's hash is another one


# Runs an XLA program with a 128 MiB temporary buffer 24 times from a thread other than the main one;
# prints how keep_freed_host_memory set malloc up, the buffer's MiB and the minor page faults of each
# of the last 22 runs.
_XLA_FAULTS = textwrap.dedent("""
    import resource, sys, threading
    from mgas_jax import modes
    mode = sys.argv[1]
    kept = modes.keep_freed_host_memory(one_arena=mode == "keep") if mode != "system" else "system"
    import jax, jax.numpy as jnp
    x = jnp.ones((4096, 8192), jnp.float32)
    f = jax.jit(lambda x: (jnp.sin(x) @ jnp.ones((8192, 4))).sum()).lower(x).compile()
    temp = f.memory_analysis().temp_size_in_bytes
    faults = []
    def runs():
        for i in range(24):        # the first runs map new pages either way
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            f(x).block_until_ready()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=runs)
    t.start(); t.join()
    print(kept, temp >> 20, *faults[2:])
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options are Linux-only")
def test_an_xla_programs_buffers_are_reused_from_any_thread():
    """Set up before JAX starts its threads on the CPU, malloc keeps one arena, so an XLA program run
    from any thread reuses the pages of an earlier run (a thread's own arena maps each block over
    64 MiB afresh: a fault per 4 KiB, every run, as glibc's defaults do)."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _XLA_FAULTS, mode], capture_output=True, text=True, check=True)
        how, temp_mb, *faults = out.stdout.split()
        return how, int(temp_mb) << 8, [int(f) for f in faults]   # the buffer in 4 KiB pages

    how, pages, kept = run("keep")
    assert how == "kept,one-arena" and pages >= 100 << 8
    how, _, thread_arenas = run("thread-arenas")
    assert how == "kept"
    _, _, system = run("system")
    assert all(f >= pages // 2 for f in system + thread_arenas), (system, thread_arenas)
    # most runs reuse the pages of the one before; a run now and then takes the block elsewhere, and
    # under load (the suite's other worker) the first several did in one run of the suite: 24 runs
    # leave room for that
    assert sum(f < pages // 100 for f in kept) >= 3, kept


def test_one_arena_is_chosen_only_where_jax_computes_on_the_cpu(monkeypatch):
    """JAX_PLATFORMS decides when set (its first entry); unset, an installed accelerator plugin means
    JAX will not compute on the host."""
    from mgas_jax import modes
    assert modes.runs_on_the_cpu("cpu") and modes.runs_on_the_cpu("cpu,cuda")
    assert not modes.runs_on_the_cpu("cuda,cpu") and not modes.runs_on_the_cpu("tpu")
    monkeypatch.setattr(modes.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(modes.importlib.metadata, "entry_points", lambda group: [])
    assert modes.runs_on_the_cpu("")
    monkeypatch.setattr(modes.importlib.metadata, "entry_points",
                        lambda group: ["xla_cuda12"] if group == "jax_plugins" else [])
    assert not modes.runs_on_the_cpu("")
    monkeypatch.setattr(modes.importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(modes.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not modes.runs_on_the_cpu("")
