"""The run modes: one function `(config, workdir) -> result` per `config.mode`, and the pipeline.

    result = modes.run(config, workdir)      # validates config once, then runs config.mode

`MODES` maps each name of config.MODE_NAMES to its function: train.train_and_evaluate, search.search,
retrain.retrain, evaluation.evaluate and `run_all` (search -> retrain -> evaluate -> reports). The
process set-up a run needs before its first compilation (compilation cache, host allocator) is here
too; main.py calls it.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Callable, Optional

import jax
from absl import logging

from mgas_jax import config as config_lib
from mgas_jax import evaluation, export, reports, retrain, search, train, workdirs

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
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_host_memory() -> bool:
    """Makes this process's malloc keep freed memory for reuse; True where it could (Linux, glibc).

    Why: XLA's CPU backend allocates every program's buffers afresh on each run. glibc serves large
    blocks with mmap and returns them with munmap, so each run pays a page fault per 4 KiB of its
    buffers; a step made of many programs (search.programs = 'cell' or 'edge') pays it on every one.
    With mmap off and no trimming, freed blocks stay in the heap and the next run reuses pages already
    mapped. The cost: memory freed at the peak stays with the process (RSS does not drop after it).
    Measured in benchmarks/README.md, section 8. Other C libraries are left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)            # the C library this process already uses
        libc.gnu_get_libc_version           # glibc only: musl's malloc has no such options
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)


def setup_host_memory(config) -> bool:
    """`keep_freed_host_memory()` when `config.keep_freed_host_memory` (default True); logs the choice."""
    if not config.get("keep_freed_host_memory", True):
        logging.info("host malloc: system default")
        return False
    kept = keep_freed_host_memory()
    logging.info("host malloc: %s", "keeps freed memory for reuse" if kept else "system default (not glibc)")
    return kept


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
