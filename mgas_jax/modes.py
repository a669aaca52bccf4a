"""The run modes: one function `(config, workdir) -> result` per `config.mode`.

main.py validates the config and calls `run(config, workdir)`, which looks the mode up in `MODES`.
Each entry imports its module lazily, so `--config=...` with mode=train never imports the search code
(and config.py can import this file to know the mode names without pulling in JAX).

Registration: a mode whose entry is None is declared (config validation accepts its name) but not
implemented yet; `run` then says so. To implement one, replace None with a function below.
"""
from __future__ import annotations

import os
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
