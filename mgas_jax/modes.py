"""The run modes: one function `(config, workdir) -> result` per `config.mode`.

main.py validates the config and calls `run(config, workdir)`, which looks the mode up in `MODES`.
Each entry imports its module lazily, so `--config=...` with mode=train never imports the search code
(and config.py can import this file to know the mode names without pulling in JAX).

Registration: a mode whose entry is None is declared (config validation accepts its name) but not
implemented yet; `run` then says so. To implement one, replace None with a function below.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Callable, Optional

from absl import logging

RunFn = Callable[[Any, str], Any]


def _train(config, workdir: str):
    """mode=train: train a fixed genotype (config.model.genotype) from scratch, then test it."""
    from mgas_jax import train
    return train.train_and_evaluate(config, workdir)


def _search(config, workdir: str):
    """mode=search: the MGAS search; architectures at config.export.targets in workdir/export."""
    from mgas_jax import search
    return search.search(config, workdir)


def _retrain(config, workdir: str):
    """mode=retrain: retrain exported architectures from scratch (fixed masks) in workdir/retrain/<name>."""
    from mgas_jax import retrain
    return retrain.retrain(config, workdir)


def _evaluate(config, workdir: str):
    """mode=evaluate: test accuracy, params, FLOPs, throughput of the retrained networks; evaluation.json."""
    from mgas_jax import evaluation
    return evaluation.evaluate(config, workdir)


def _all(config, workdir: str):
    """mode=all: search (workdir/search) -> retrain every export -> evaluate -> reports (workdir/report)."""
    from mgas_jax import retrain
    return retrain.run_all(config, workdir)


MODES: dict[str, Optional[RunFn]] = {
    "train": _train,
    # ---- registered by the search side (lead) ------------------------------------------------
    "search": _search,
    "retrain": _retrain,
    "evaluate": _evaluate,
    "all": _all,
    # -------------------------------------------------------------------------------------------
}

MODE_NAMES = tuple(MODES)


def setup_compilation_cache(config, workdir: str) -> Optional[str]:
    """Points JAX's persistent compilation cache where `config.compilation_cache_dir` says, logs the
    choice, and returns the directory.

    '' keeps a directory already set (JAX_COMPILATION_CACHE_DIR, or jax.config by the caller) and
    otherwise uses <workdir>/xla_cache; 'off' turns the cache off (returns None); any other value is
    the directory. The cache is keyed by the program and the backend, so a stale entry is never used: a
    changed network simply compiles (and is then cached too). Call it before the first compilation.
    """
    import jax  # lazy, like every mode: this module stays importable without a backend

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


def run(config, workdir: str):
    """Runs `config.mode` and returns what its function returns."""
    mode = config.mode
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}: unknown; the modes are {', '.join(MODE_NAMES)}")
    fn = MODES[mode]
    if fn is None:
        implemented = [name for name, f in MODES.items() if f is not None]
        raise NotImplementedError(f"mode = {mode!r} is declared but not implemented yet "
                                  f"(register it in mgas_jax/modes.py); available now: {', '.join(implemented)}")
    return fn(config, workdir)
