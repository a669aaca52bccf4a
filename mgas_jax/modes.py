"""The run modes: one function `(config, workdir) -> result` per `config.mode`, and the pipeline.

    result = modes.run(config, workdir)      # validates config once, then runs config.mode

`MODES` maps each name of config.MODE_NAMES to its function: train.train_and_evaluate, search.search,
retrain.retrain, evaluation.evaluate and `run_all` (search -> retrain -> evaluate -> reports). The
process set-up a run needs before its first compilation (compilation cache, host allocator: the
malloc settings, and re-executing the run with jemalloc where config.host_allocator asks for it) is
here too; main.py calls it.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import jax
from absl import logging

from mgas_jax import config as config_lib
from mgas_jax import evaluation, export, host_allocator, reports, retrain, search, train, workdirs

RunFn = Callable[[Any, str], Any]


@config_lib.validates
def run_all(config, workdir: str) -> dict:
    """mode=all: search -> retrain every exported target -> evaluate -> reports, in sub-folders of workdir.

    Each part resumes: the search from its checkpoints (a finished search only re-exports, which finds
    the same files), each retraining from its own, evaluation and reports are recomputed. The layout of
    the workdir is workdirs.py's.
    Returns {'search': summary, 'retrain': {name: test/params/flops}, 'evaluation', 'report'}.
    """
    workdir = os.path.abspath(workdir)
    searched = search.search(config, workdirs.search_dir(workdir))
    exported = [v["path"] for _, v in sorted(searched["summary"].items(), key=lambda kv: -int(kv[0]))
                if "path" in v]
    for target, v in searched["summary"].items():
        if "error" in v:
            logging.warning("target %s not exported: %s", target, v["error"])
    retrained = retrain.retrain(config, workdir, exported) if exported else {}
    evaluated = evaluation.evaluate(config, workdir) if exported else {}
    report = reports.write_reports(workdir)
    result = dict(search=searched["summary"],
                  retrain={k: {f: r[f] for f in ("test", "params", "flops")} for k, r in retrained.items()},
                  evaluation=evaluated, report=report)
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, workdirs.ALL_RESULT), result)
    return result


MODES: dict[str, RunFn] = {
    "train": train.train_and_evaluate,   # a fixed genotype (config.model.genotype) from scratch, then tested
    "search": search.search,             # the MGAS search; architectures at config.export.targets in export/
    "retrain": retrain.retrain,          # exported architectures from scratch (fixed masks) in retrain/<name>
    "evaluate": evaluation.evaluate,     # accuracy, params, FLOPs, throughput of those; evaluation.json
    "all": run_all,
}


def setup_compilation_cache(config, workdir: str) -> Optional[str]:
    """Points JAX's persistent compilation cache where `config.compilation_cache_dir` says, logs the
    choice, and returns the directory.

    '' keeps a directory already set (JAX_COMPILATION_CACHE_DIR, or jax.config by the caller) and
    otherwise uses <workdir>/xla_cache; 'off' turns the cache off (returns None); any other value is
    the directory. The cache is keyed by the program and the backend, so a stale entry is never used: a
    changed network simply compiles (and is then cached too). Call it before the first compilation.
    """
    wanted = config.get("compilation_cache_dir", "")
    current = jax.config.jax_compilation_cache_dir
    if wanted == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("compilation cache off")
        return None
    directory = wanted or current or os.path.join(workdir, "xla_cache")
    if directory != current:
        jax.config.update("jax_compilation_cache_dir", directory)
    logging.info("compiled programs cached in %s", directory)
    return directory


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def _glibc():
    """This process's C library through ctypes when it is glibc (which has mallopt's options), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)            # the C library this process already uses
        libc.gnu_get_libc_version           # glibc only: musl's malloc has no such options
        libc.mallopt, libc.malloc_info, libc.fopen, libc.fclose
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.fopen.argtypes, libc.fopen.restype = [ctypes.c_char_p, ctypes.c_char_p], ctypes.c_void_p
    libc.fclose.argtypes, libc.malloc_info.argtypes = [ctypes.c_void_p], [ctypes.c_int, ctypes.c_void_p]
    return libc


def malloc_arenas(libc=None) -> int:
    """How many malloc arenas this process has (glibc's malloc_info); 0 where that cannot be read.

    glibc gives a thread its own arena on the thread's first allocation, up to 8 per core; an arena
    other than the main one grows in 64 MiB heaps and serves any larger block with mmap.
    """
    libc = libc or _glibc()
    if libc is None:
        return 0
    with tempfile.TemporaryFile(mode="w+b") as f:
        stream = libc.fopen(f"/proc/self/fd/{f.fileno()}".encode(), b"w")
        if not stream:
            return 0
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        f.seek(0)
        return f.read().count(b"<heap nr=")


def runs_on_the_cpu(platforms: Optional[str] = None) -> bool:
    """Whether JAX will compute on the host: `platforms` (default: JAX_PLATFORMS, jax.config's
    jax_platforms) names the CPU first, or it is unset and no accelerator plugin (a CUDA/ROCm PJRT
    plugin, libtpu) is installed. Read without starting a backend, which would start XLA's threads."""
    platforms = jax.config.jax_platforms if platforms is None else platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def keep_freed_host_memory(one_arena: Optional[bool] = None) -> str:
    """Makes this process's malloc keep freed memory for reuse. Returns how ('kept', or
    'kept,one-arena'), or '' where it could not (not Linux with glibc).

    Why: XLA's CPU backend allocates every program's buffers afresh on each run, from its worker
    threads. glibc serves large blocks with mmap and returns them with munmap, so each run pays a
    page fault per 4 KiB of its buffers (a retraining step at C 36, batch 96: 2.1 million faults and
    7 s of system time). Three settings keep the pages: no mmap for large blocks, no trimming of the
    heap's free top at any size, and (`one_arena`) a single arena for all threads, because a
    thread's own arena serves blocks over 64 MiB with mmap whatever the first setting says. The
    single arena only takes where no thread has allocated yet (the process has one arena), so call
    this before JAX starts its backend; `one_arena=None` chooses it where JAX will compute on the
    CPU (on an accelerator the host's large buffers are few and the data pipeline's threads keep
    their own arenas). The cost: memory freed at the peak stays with the process (RSS does not drop
    after it), and a loop that dispatches a step while the last one runs holds the memory of both for
    good, so loops should wait for each step first (loop.one_step_at_a_time). And a program's
    buffers are one aligned block, which glibc cannot hand to the same request again once it is
    freed under a later allocation instead of into the heap's top: a long run can come to hold a
    second copy of a step's buffers (section 15; a training run on the CPU therefore runs under
    jemalloc where it is installed, host_allocator.py). Measured in benchmarks/README.md, sections 8, 13
    and 15. Other C libraries are left alone.
    """
    libc = _glibc()
    if libc is None:
        return ""
    if one_arena is None:
        one_arena = runs_on_the_cpu()
    one_arena = one_arena and malloc_arenas(libc) == 1
    # -1 is the largest size_t: an int of 2**31 - 1 would let a free top over 2 GiB be trimmed
    settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 256 << 20)]
    settings += [(_M_ARENA_MAX, 1)] if one_arena else []
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return ""
    return "kept,one-arena" if one_arena else "kept"


def setup_host_memory(config) -> str:
    """Sets up and logs the host's malloc; returns what it is.

    'jemalloc <version> (<library>)' when jemalloc serves it (mgas_jax.main preloads it for
    config.host_allocator, set up through MALLOC_CONF): its freed pages are then released after each
    compilation (host_allocator.release_after_compiles). Else keep_freed_host_memory()'s answer when
    `config.keep_freed_host_memory` (default True), else '' (the system's defaults).
    """
    jemalloc = host_allocator.describe()
    preloaded = os.environ.get(host_allocator.PRELOADED)
    if jemalloc:
        host_allocator.release_after_compiles()
        logging.info("host malloc: %s, MALLOC_CONF=%s; freed pages released after each compilation", jemalloc,
                     os.environ.get("MALLOC_CONF", ""))
        return jemalloc
    if preloaded:
        logging.warning("host malloc: LD_PRELOAD=%s did not give this process jemalloc's malloc (it is %s's); "
                        "going on with it", preloaded, host_allocator.malloc_library() or "an unknown library")
    if not config.get("keep_freed_host_memory", True):
        logging.info("host malloc: system default")
        return ""
    kept = keep_freed_host_memory()
    logging.info("host malloc: %s", f"keeps freed memory for reuse ({kept})" if kept else "system default (not glibc)")
    return kept


def preload_allocator(config) -> None:
    """Re-executes this process (the same command) with the malloc config.host_allocator asks for,
    where that is not already the one it has (host_allocator.preload_for); returns otherwise. Raises
    ConfigError for an allocator that is asked for and not found. Call it first: what ran before is
    run again."""
    if host_allocator.PRELOADED in os.environ or host_allocator.describe():
        return
    library = host_allocator.preload_for(config.get("host_allocator", "auto"), mode=config.mode,
                                         on_cpu=runs_on_the_cpu(),
                                         keep_freed=config.get("keep_freed_host_memory", True))
    if library:
        host_allocator.reexec(library)


# The hashes logged when a mode starts: those of the runs it makes that resume from checkpoints, each
# as its checkpoints and results record it (config.run_identity). A retraining's hash also covers its
# architecture; retrain.py logs it when that retraining starts.
LOGGED_RUNS = {
    "train": {"train": config_lib.TRAIN_SECTIONS},
    "search": {"search": config_lib.SEARCH_SECTIONS},
    "retrain": {},
    "evaluate": {},
    "all": {"search": config_lib.SEARCH_SECTIONS},
}


@config_lib.validates
def run(config, workdir: str):
    """Runs `config.mode` on `workdir` and returns what its function returns.

    The config is validated here, once: the mode functions (and the entry points they call) do not
    check it again.
    """
    hashes = "".join(f", {run} hash {config_lib.config_hash(config, sections)}"
                     for run, sections in LOGGED_RUNS[config.mode].items())
    logging.info("mode=%s workdir=%s%s", config.mode, workdir, hashes)
    return MODES[config.mode](config, workdir)
