"""Validation of a whole experiment config before any compute.

Every key a config may hold is declared here, and only here, per section, as a
`Field(type, check, doc, default=...)`:

    SCHEMA['train']['batch_size'] = Field(int, positive, "GLOBAL batch size, ...", default=96)

`default_config()` builds the config of the defaults (configs/default.py returns it); `describe()`
lists every key with its type, default and doc (`python -m mgas_jax.main --helpconfig`).

`validate(config)` walks the config against `SCHEMA` and raises `ConfigError` (a ValueError) naming
the dotted key (`train.batch_size`), the value, and what is allowed, for

- a key the schema does not know (with the keys that exist and the closest match),
- a declared key the config lacks,
- a value of the wrong type,
- a value outside its allowed set or range (a check on that one value),
- a combination that cannot run (a cross-check on the whole config; see `CROSS_CHECKS`).

Adding a section is adding entries: `SCHEMA['search'] = {'ops': Field(tuple, op_list(), '...'), ...}`
and, for rules that involve several keys, `CROSS_CHECKS.append(fn)`. Nothing else changes.

`run_identity(config, sections)` is the hash of what determines a run (logged at its start, checked
when it resumes, written with its checkpoints and results): the *semantic* keys (Field.semantic, the
default) of the sections the run reads, so that flipping a progress bar or a logging interval does not
make a resumed run look like a different experiment (see checkpoint.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import ml_collections
from ml_collections import config_dict

from mgas_jax import genotype as genotype_lib
from mgas_jax import ops as ops_lib

MODE_NAMES = ("train", "search", "retrain", "evaluate", "all")
"""The values of `config.mode`; modes.MODES maps each to its function."""

# A check takes a value (already of the declared type) and returns None when it is fine, or a short
# description of what is allowed ("must be > 0") when it is not.
Check = Callable[[Any], Optional[str]]


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key and what is allowed."""


NO_DEFAULT = type("NoDefault", (), {"__repr__": lambda self: "NO_DEFAULT"})()


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key.

    Attributes:
      type: the accepted Python type(s). `float` also accepts ints; `int` never accepts bools;
        `tuple` also accepts lists. Add `type(None)` to allow None.
      check: optional value check (see the factories below); runs only on values of the right type
        that are not None.
      doc: what the key does (shown by `describe`, --helpconfig and in errors about the key).
      default: the value of `default_config()`, which configs/default.py returns; every key of SCHEMA has
        one (tests/test_config.py checks), a key without one must be set by each config.
      semantic: False for keys that do not change the numbers a run produces (logging, progress bars,
        how many checkpoints to keep); they are left out of `config_hash`.
    """
    type: Union[type, tuple]
    check: Optional[Check] = None
    doc: str = ""
    default: Any = NO_DEFAULT
    semantic: bool = True


# --------------------------------------------------------------------------------------------------
# Checks. Each factory returns a Check; the string it returns completes "<key> = <value>: ...".

def one_of(*allowed: Any) -> Check:
    """The value must be one of `allowed`."""
    def check(value):
        if value not in allowed:
            near = difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1) \
                if isinstance(value, str) else []
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return f"must be one of {', '.join(repr(a) for a in allowed)}{hint}"
        return None
    return check


def in_range(low: Optional[float] = None, high: Optional[float] = None, *,
             low_open: bool = False, high_open: bool = False) -> Check:
    """low <= value <= high (strict on the open ends); None leaves that end unbounded."""
    def check(value):
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if high is None:
                return f"must be {'>' if low_open else '>='} {low}"
            if low is None:
                return f"must be {'<' if high_open else '<='} {high}"
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            return f"must lie in {left}{low}, {high}{right}"
        return None
    return check


positive = in_range(0, low_open=True)
non_negative = in_range(0)
fraction = in_range(0, 1, low_open=True)          # (0, 1]
probability = in_range(0, 1, high_open=True)      # [0, 1)


def each(check: Check) -> Check:
    """Applies `check` to every element of a tuple/list value."""
    def run(values):
        for i, value in enumerate(values):
            problem = check(value)
            if problem:
                return f"element {i} ({value!r}) {problem}"
        return None
    return run


def positive_ints(values) -> Optional[str]:
    """A non-empty tuple of positive ints (bools are not ints here)."""
    if not values:
        return "must be a non-empty tuple of positive ints, e.g. (700000, 300000)"
    for i, value in enumerate(values):
        if type(value) is not int or value < 1:
            return f"element {i} ({value!r}) must be a positive int, e.g. (700000, 300000)"
    return None


def op_list(allowed: Optional[Sequence[str]] = None, *, allow_empty: bool = False) -> Check:
    """A tuple of op names, each one of `allowed` (default: the 7 MGAS candidate ops, ops.OPS)."""
    def check(values):
        names = tuple(ops_lib.OPS if allowed is None else allowed)
        if not values and not allow_empty:
            return f"must name at least one op of {', '.join(names)}"
        for value in values:
            if value not in names:
                near = difflib.get_close_matches(str(value), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                return f"has unknown op {value!r}{hint}; the allowed ops are {', '.join(names)}"
        if len(set(values)) != len(values):
            return "lists an op twice"
        return None
    return check


def genotype_check(value: str) -> Optional[str]:
    """A registered genotype name or a DARTS `Genotype(...)` string that genotype.py can parse."""
    try:
        genotype_lib.get_genotype(value)
    except (ValueError, TypeError, SyntaxError, KeyError) as e:
        return f"is not a usable genotype: {e}"
    return None


def host_allocator_check(value: str) -> Optional[str]:
    """host_allocator: one of HOST_ALLOCATORS or a path to a shared library (host_allocator.py)."""
    if value in HOST_ALLOCATORS or os.sep in value:
        return None
    return f"must be one of {', '.join(map(repr, HOST_ALLOCATORS))} or the path of a libjemalloc shared library"


# --------------------------------------------------------------------------------------------------
# The schema. A value that is a dict is a section; a Field is a key.

HOST_ALLOCATORS = ("auto", "system", "jemalloc")
DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "synthetic")
DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("cosine", "step")
NAN_POLICIES = ("stop", "rollback")


def _nan_policy_fields(what: str) -> dict:
    """The keys of a section's reaction to a non-finite loss or gradient (train.*, search.*)."""
    return {
        "nan_policy": Field(str, one_of(*NAN_POLICIES), "on a non-finite loss or gradient: 'stop' (name the "
                            "step and the last good checkpoint), or 'rollback' (restore the last checkpoint "
                            f"and go on with {what} lowered)", default="stop", semantic=False),
        "rollback_lr_factor": Field(float, fraction, f"nan_policy=rollback: {what} x this per rollback",
                                    default=0.5, semantic=False),
        "max_rollbacks": Field(int, non_negative, "nan_policy=rollback: rollbacks before giving up",
                               default=3, semantic=False),
    }

SCHEMA: dict[str, Any] = {
    "mode": Field(str, one_of(*MODE_NAMES), "what to run: 'train' trains model.genotype from scratch and "
                  "tests it (train.py); 'search', 'retrain', 'evaluate', 'all' are the MGAS modes (modes.py)",
                  default="train", semantic=False),
    "seed": Field(int, non_negative, "seeds the parameters, the data order (a pure function of (seed, epoch)), "
                  "augmentation and drop-path (keys fold_in(key(seed), step)), so a resumed run repeats the "
                  "same numbers", default=0),
    "compilation_cache_dir": Field(str, None, "where compiled XLA programs are kept, so a resumed or repeated "
                                   "run of the same structure loads them instead of compiling (a super-net "
                                   "step compiles for minutes on a CPU); '' = JAX_COMPILATION_CACHE_DIR when "
                                   "set, else <workdir>/xla_cache; 'off' = none; runs of the same network "
                                   "can share one directory", default="", semantic=False),
    "keep_freed_host_memory": Field(bool, None, "malloc keeps freed memory for reuse instead of unmapping it "
                                    "(Linux, glibc; on the CPU backend all threads share one arena): XLA CPU "
                                    "allocates each program's buffers afresh and fresh pages cost a page fault "
                                    "each (a search step runs ~1.3x faster, the retraining step ~1.7x, "
                                    "benchmarks/README.md sections 8 and 13); the process keeps its peak RSS, "
                                    "and a long run can come to hold a second copy of a step's buffers "
                                    "(section 15; host_allocator avoids it where jemalloc is installed)",
                                    default=True, semantic=False),
    "host_allocator": Field(str, host_allocator_check, "the host's malloc (mgas_jax.main, Linux): "
                            "'auto' re-executes the run with jemalloc preloaded (kept memory) on the CPU for "
                            "'train', 'retrain' and 'all' where libjemalloc is installed (apt install "
                            "libjemalloc2), because under glibc a long retraining comes to hold a second copy "
                            "of its step's buffers (benchmarks/README.md sections 15-16); 'system' keeps the C "
                            "library's; 'jemalloc' requires it; a path names the library file",
                            default="auto", semantic=False),
    "data": {
        "name": Field(str, one_of(*DATASETS), "data set", default="cifar10"),
        "data_dir": Field((str, type(None)), None, "where TFDS array_record data sets are prepared (None = the "
                          "TFDS default, ~/tensorflow_datasets)", default=None, semantic=False),
        "val_size": Field(int, non_negative, "training examples held out as the validation split (0 for "
                          "retraining: like DARTS and MGAS, train on all 50k and report the test split; the "
                          "search holds out search.val_size)", default=0),
        "train_fraction": Field(float, fraction, "class-balanced share of the (remaining) training split used",
                                default=1.0),
        "folds": Field(int, non_negative, "digits only: 0 = the fixed stratified 80/20 test split; k >= 2 = a "
                       "stratified k-fold split of all 1797 images whose fold `fold` is the test split and the "
                       "other k-1 folds the training split (validation is held out of those)", default=0),
        "fold": Field(int, non_negative, "data.folds > 0: the fold used as the test split", default=0),
        "fold_repeat": Field(int, non_negative, "data.folds > 0: the repetition, which seeds the fold "
                             "assignment; repetition r tests every image once (experiments/digits_study.py "
                             "runs folds x repetitions x seeds)", default=0),
        "image_size": Field(int, positive, "side of the (square) model input; used by imagenet (resize) and "
                            "synthetic", default=32),
        "num_classes": Field(int, non_negative, "classes of 'synthetic' (0 = the data set's own count; the "
                             "other data sets know theirs)", default=10),
        "synthetic_size": Field(int, positive, "examples per split of the 'synthetic' data set", default=1024),
        "crop_padding": Field(int, non_negative, "zero-pad by this much, then random crop back to the image "
                              "size (0 = no crop)", default=4),
        "flip": Field(bool, None, "random horizontal flips", default=True),
        "cutout": Field(int, non_negative, "Cutout square side in pixels (0 = off)", default=16),
        "autoaugment": Field(bool, None, "AutoAugment (CIFAR policy) while retraining; the search uses "
                             "search.autoaugment", default=False),
    },
    "model": {
        "init_channels": Field(int, positive, "C, the width of the first cells (DARTS CIFAR evaluation: 36)",
                               default=36),
        "layers": Field(int, in_range(3), "cells L; reductions at L//3 and 2L//3 need L >= 3", default=20),
        "stem_multiplier": Field(int, positive, "stem conv outputs stem_multiplier * C channels", default=3),
        "genotype": Field(str, genotype_check, "genotype name (genotype.GENOTYPES) or DARTS Genotype(...) "
                          "string", default="DARTS_V2"),
        "auxiliary": Field(bool, None, "DARTS auxiliary head after cell 2L//3 (training only)", default=True),
        "auxiliary_weight": Field(float, non_negative, "loss = CE + auxiliary_weight * CE(aux)", default=0.4),
        "drop_path": Field(float, probability, "drop-path rate at the last epoch, ramped linearly "
                           "(rate * epoch / epochs; not on identity edges)", default=0.2),
        "pool_bn": Field(bool, None, "BatchNorm after the pooling ops (retraining network)", default=True),
        "imagenet_stem": Field(bool, None, "the DARTS ImageNet stem (3 stride-2 convs) for 224 px inputs",
                               default=False),
        "dtype": Field(str, one_of(*DTYPES), "compute dtype (parameters stay float32)", default="float32"),
    },
    "train": {
        "epochs": Field(int, positive, "training epochs", default=600),
        "batch_size": Field(int, positive, "GLOBAL batch size, split over all devices (must divide evenly)",
                            default=96),
        "eval_batch_size": Field(int, positive, "GLOBAL evaluation batch size; the last batch is padded, not "
                                 "dropped", default=256),
        "steps_per_epoch": Field(int, non_negative, "cap on steps per epoch (0 = full epoch; > 0 for quick "
                                 "runs and tests)", default=0),
        "lr": Field(float, positive, "initial SGD learning rate", default=0.025),
        "lr_schedule": Field(str, one_of(*LR_SCHEDULES), "'cosine': lr -> lr_min over all steps (CIFAR); "
                             "'step': lr x lr_decay_rate every lr_decay_epochs (DARTS ImageNet: 0.97 every "
                             "epoch)", default="cosine"),
        "lr_min": Field(float, non_negative, "final learning rate of the cosine schedule", default=0.0),
        "lr_decay_rate": Field(float, fraction, "step schedule: factor per lr_decay_epochs", default=0.97),
        "lr_decay_epochs": Field(int, positive, "step schedule: epochs between decays", default=1),
        "momentum": Field(float, probability, "SGD momentum", default=0.9),
        "nesterov": Field(bool, None, "Nesterov momentum", default=False),
        "weight_decay": Field(float, non_negative, "L2 weight decay added to the gradient (PyTorch SGD style), "
                              "after clipping", default=3e-4),
        "grad_clip": Field(float, non_negative, "global gradient-norm clip (0 = off)", default=5.0),
        "label_smoothing": Field(float, probability, "label smoothing of the cross-entropy", default=0.0),
        "eval_every_epochs": Field(int, non_negative, "validation every N epochs when data.val_size > 0 "
                                   "(0 = never)", default=1, semantic=False),
        "keep_checkpoints": Field(int, positive, "orbax keeps the latest N checkpoints (one per epoch)",
                                  default=2, semantic=False),
        "log_every_steps": Field(int, positive, "steps between training-metric log lines (averaged since the "
                                 "last line)", default=50, semantic=False),
        "progress": Field(bool, None, "tqdm progress bar per epoch on process 0", default=True, semantic=False),
        **_nan_policy_fields("the learning rate"),
    },
}


IMPLS = ("auto", "lax", "shift")

# mode=search (docs/method.md sections 1-5). The search reads config.data with search.val_size,
# search.train_fraction and search.autoaugment in place of data.*'s (retraining uses data.* as they are).
SCHEMA["search"] = {
    "val_size": Field(int, non_negative, "training examples held out as validation while searching "
                      "(final-phase records report it)", default=5000),
    "train_fraction": Field(float, fraction, "class-balanced share of the training split searched on "
                            "(ImageNet: 0.1)", default=1.0),
    "autoaugment": Field(bool, None, "AutoAugment (CIFAR policy) while searching", default=True),
    "init_channels": Field(int, positive, "C of the super-net (the authors searched at the evaluation size: "
                           "small = 8 cells, C = 24; large = 14 cells, C = 44)", default=24),
    "layers": Field(int, in_range(3), "cells of the super-net; 3 stages need L >= 3", default=8),
    "steps": Field(int, in_range(1, 8), "intermediate nodes per cell (4: 14 edges)", default=4),
    "stem_multiplier": Field(int, positive, "stem conv outputs stem_multiplier * C channels", default=3),
    "batch_size": Field(int, positive, "GLOBAL search batch, split over all devices", default=96),
    "eval_batch_size": Field(int, positive, "GLOBAL batch of the validation passes at final-phase commits",
                             default=256),
    "steps_per_epoch": Field(int, non_negative, "cap on steps per epoch (0 = full epoch)", default=0),
    "lr": Field(float, positive, "SGD learning rate of the network weights (constant)", default=0.01),
    "momentum": Field(float, probability, "SGD momentum of every group", default=0.9),
    "weight_decay": Field(float, non_negative, "weight decay of the network weights only", default=3e-4),
    "grad_clip": Field(float, non_negative, "global-norm clip of the network weights only (0 = off)",
                       default=5.0),
    "alpha_lr": Field(float, non_negative, "learning rate of the op scores alpha", default=1.0),
    "beta_lr": Field(float, non_negative, "learning rate of the filter scores beta", default=1.0),
    "threshold_lr": Field(float, non_negative, "learning rate of t_op, t_k and preprocess thresholds",
                          default=0.1),
    "weight_threshold_lr": Field(float, non_negative, "learning rate of the weight thresholds t_w",
                                 default=0.001),
    "lambda0": Field(float, positive, "first increment of the adaptive lambda (GOLD-NAS style, section 3)",
                     default=1e-5),
    "lambda_c0": Field(float, in_range(1, low_open=True), "growth/shrink factor of lambda (> 1)", default=2.0),
    "lambda_n": Field(int, positive, "n of the lambda rule: > 4n ops pruned in a round backs off, < 2n pushes "
                      "harder", default=12),
    "lambda_cap": Field(float, positive, "upper bound of lambda", default=100.0),
    "warmup_epochs": Field(int, non_negative, "weight-only epochs at the start of each stage and of the final "
                           "phase", default=5),
    "first_commit_after": Field(int, positive, "pruning epochs of a phase before its first commit of the live "
                                "masks (the released code: 3, then every commit_every)", default=3),
    "commit_every": Field(int, positive, "epochs between commits of the live masks after the first", default=2),
    "stage_size_ratio": Field(float, fraction, "a stage ends when its size proxy < ratio x its size at the "
                              "start", default=0.3),
    "max_stage_epochs": Field(int, positive, "safety cap on the pruning epochs of a stage", default=100),
    "final_size_floor": Field(int, non_negative, "the final phase ends below this size proxy, after "
                              "final_max_epochs, or when no op can be pruned", default=100_000),
    "final_max_epochs": Field(int, positive, "cap on the epochs of the final phase", default=200),
    "final_rebuild": Field(bool, None, "final-phase commits take committed-off ops and channels out of the "
                           "compiled network (the released code: steps get cheaper as it shrinks, each commit "
                           "compiles a new step). False: they switch masks only, so the phase compiles its step "
                           "once (compile-bound CPU runs); the records are the same physically pruned "
                           "architectures, and the masked network computes what the pruned one does",
                           default=True),
    "budget_commits": Field(bool, None, "budget-true final phase (ours, README): a commit that would take the "
                            "exported size below an export.target without a record commits only the units "
                            "furthest below their thresholds, landing in [budget_window x target, target]; the "
                            "phase ends once every target has its record. False: whole commits to the floor",
                            default=True),
    "budget_window": Field(float, in_range(0, 1, low_open=True), "a target's record aims at [budget_window x "
                           "target, target]", default=0.9),
    "regrow_fraction": Field(float, in_range(0, 1), "after stages 2 and 3: regrow floor(fraction x ops pruned "
                             "in the stage)", default=0.2),
    "bilevel": Field(bool, None, "first-order bilevel variant (arch steps on the validation split)",
                     default=False),
    "filter_level": Field(bool, None, "search filters (False: operation level only, a DARTS-like baseline)",
                          default=True),
    "weight_level": Field(bool, None, "search individual weights", default=True),
    "eval_records": Field(bool, None, "validation accuracy of every final-phase record", default=True),
    "impl": Field(str, one_of(*IMPLS), "depthwise conv formulation: auto (shift on CPU, lax elsewhere) | lax "
                  "| shift", default="auto"),
    "remat": Field(bool, None, "rematerialise cells (per-edge programs: edges) in the backward pass: less "
                   "memory, more compute (on a CPU about a third of the memory for the same step time)",
                   default=False),
    "dtype": Field(str, one_of(*DTYPES), "compute dtype (parameters stay float32)", default="float32"),
    # the same computation either way (up to the order of float additions), so not in the config hash
    "programs": Field(str, one_of("auto", "step", "cell", "edge"), "the search step as one XLA program "
                      "('step') or a chain of per-cell or per-edge programs; edges of the same structure and "
                      "shapes share one, so a structure change compiles only new edges. 'auto': 'edge' on a "
                      "CPU (measured: 40 s against 600 s to compile the 8-cell super-net, and a faster step), "
                      "'step' on a GPU or TPU (search_step.resolve_programs says why; benchmarks/README.md 7, "
                      "8, 10)", default="auto", semantic=False),
    "keep_checkpoints": Field(int, positive, "search checkpoints kept (one per epoch)", default=3,
                              semantic=False),
    "progress": Field(bool, None, "tqdm bar per epoch", default=True, semantic=False),
    **_nan_policy_fields("every group's learning rate"),
}

# What mode=search writes and mode=retrain reads.
SCHEMA["export"] = {
    "targets": Field(tuple, positive_ints, "parameter budgets (non-zero parameters of the derived network, "
                     "auxiliary head excluded): for each, the first final-phase architecture at or below it "
                     "is exported to workdir/search/export", default=(700_000, 500_000, 300_000)),
    "architecture": Field((str, type(None)), None,
                          "mode=retrain/evaluate: the exported architecture JSON (None: every export of "
                          "the search in workdir/search/export, each retrained in workdir/retrain/<name>)",
                          default=None),
}


# --------------------------------------------------------------------------------------------------
# Cross-checks: functions of (config, device_count) that raise ConfigError. Append to extend.

def _check_batches(config, device_count: int) -> None:
    # Each batch is split evenly over the 'data' axis of the device mesh (parallel.py).
    for key in ("batch_size", "eval_batch_size"):
        value = config.train[key]
        if value % device_count:
            raise ConfigError(
                f"train.{key} = {value}: must be divisible by the number of devices ({device_count}); "
                f"use a multiple of {device_count}, e.g. {max(device_count, value // device_count * device_count)}")


def _check_schedule(config, device_count: int) -> None:
    del device_count
    if config.train.lr_schedule == "cosine" and config.train.lr_min > config.train.lr:
        raise ConfigError(f"train.lr_min = {config.train.lr_min}: must be <= train.lr ({config.train.lr})")


def _check_search(config, device_count: int) -> None:
    if "search" not in config:
        return
    for key in ("batch_size", "eval_batch_size"):
        value = config.search[key]
        if not isinstance(value, int):
            continue  # reported by the schema walk
        if value % device_count:
            raise ConfigError(f"search.{key} = {value}: must be divisible by the number of devices ({device_count})")
    if config.search.bilevel and config.data.val_size == 0:
        raise ConfigError("search.bilevel = True needs a validation split for the architecture steps: "
                          "set data.val_size > 0")
    if config.search.init_channels * config.search.stem_multiplier < 1:
        raise ConfigError("search.init_channels * search.stem_multiplier must be positive")


def _check_folds(config, device_count: int) -> None:
    del device_count
    folds, fold = config.data.folds, config.data.fold
    if folds == 0:
        return
    if config.data.name != "digits":
        raise ConfigError(f"data.folds = {folds}: k-fold splits are implemented for digits only "
                          f"(data.name = {config.data.name!r} has a fixed test split); set data.folds = 0")
    if folds < 2:
        raise ConfigError(f"data.folds = {folds}: a k-fold split needs k >= 2 (0 = off)")
    if fold >= folds:
        raise ConfigError(f"data.fold = {fold}: must lie in [0, data.folds = {folds})")


CROSS_CHECKS: list[Callable[[Any, int], None]] = [_check_batches, _check_schedule, _check_search, _check_folds]


# --------------------------------------------------------------------------------------------------

def type_name(t) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join("None" if x is type(None) else x.__name__ for x in types)


def _type_ok(value, t) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    for x in types:
        if x is type(None) and value is None:
            return True
        if x is bool and isinstance(value, bool):
            return True
        if x is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if x is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if x is tuple and isinstance(value, (tuple, list)):
            return True
        if x not in (bool, int, float, tuple, type(None)) and isinstance(value, x):
            return True
    return False


def _is_section(value) -> bool:
    return isinstance(value, (ml_collections.ConfigDict, dict))


def _unknown_key(path: str, key: str, known: Sequence[str]) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {_join(path, near[0])!r}?" if near else ""
    where = f"section {path!r}" if path else "the top level"
    return ConfigError(f"{_join(path, key)}: unknown key.{hint} The keys of {where} are: "
                       f"{', '.join(sorted(known))}.")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _walk(config, schema: dict, path: str) -> None:
    keys = list(config.keys())
    for key in keys:
        if key not in schema:
            raise _unknown_key(path, key, list(schema))
    for key, spec in schema.items():
        dotted = _join(path, key)
        if key not in keys:
            kind = "section" if isinstance(spec, dict) else "key"
            doc = "" if isinstance(spec, dict) else f" ({spec.doc})"
            raise ConfigError(f"{dotted}: missing {kind}{doc}; start your config from configs/default.py "
                              f"(config_lib.load_config) or add it.")
        value = config[key]
        if isinstance(spec, dict):
            if not _is_section(value):
                raise ConfigError(f"{dotted} = {value!r}: must be a section (ConfigDict) with keys "
                                  f"{', '.join(sorted(spec))}")
            _walk(value, spec, dotted)
            continue
        if _is_section(value):
            raise ConfigError(f"{dotted}: is a section, but must be a value of type {type_name(spec.type)} "
                              f"({spec.doc})")
        if not _type_ok(value, spec.type):
            raise ConfigError(f"{dotted} = {value!r}: must be of type {type_name(spec.type)}, not "
                              f"{type(value).__name__} ({spec.doc})")
        if spec.check is not None and value is not None:
            problem = spec.check(value)
            if problem:
                raise ConfigError(f"{dotted} = {value!r}: {problem} ({spec.doc})")


def field(dotted: str) -> Field:
    """The Field of a dotted key ('train.epochs'); ConfigError naming the closest key when there is none.

    main.py checks every `--config.<key>=...` override with it before the flag parser sees them.
    """
    node, path = SCHEMA, ""
    for key in dotted.split("."):
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: unknown key; {path} is a value of type {type_name(node.type)}, "
                              f"not a section ({node.doc})")
        if key not in node:
            raise _unknown_key(path, key, list(node))
        node, path = node[key], _join(path, key)
    if isinstance(node, dict):
        raise ConfigError(f"{dotted} is a section, not a key; its keys are {', '.join(sorted(node))}")
    return node


def validate(config, *, device_count: Optional[int] = None) -> None:
    """Raises ConfigError for the first problem found in `config`; returns None when it can run.

    Args:
      config: the whole experiment ConfigDict (or a plain nested dict).
      device_count: devices the batch is split over; default jax.device_count() (all processes).
    """
    _walk(config, SCHEMA, "")
    if device_count is None:
        device_count = jax.device_count()
    for cross_check in CROSS_CHECKS:
        cross_check(config, device_count)


# The config the current run has validated, by content (see `validated`).
_VALIDATED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mgas_validated_config", default=None)


def _content(config) -> str:
    to_dict = getattr(config, "to_dict", None)
    return json.dumps(to_dict() if to_dict else config, sort_keys=True, default=repr)


@contextlib.contextmanager
def validated(config):
    """Validates `config` once for everything run inside the block.

    A run starts here (modes.run); the entry points it calls (train.train_and_evaluate, search.search,
    retrain.retrain, ...) are decorated with `validates`, so they check a config only when they are
    called on their own, and a config they receive from the run is not checked again. A config whose
    content differs from the validated one (a copy changed by the caller) is checked.
    """
    content = _content(config)
    if _VALIDATED.get() == content:
        yield
        return
    validate(config)
    token = _VALIDATED.set(content)
    try:
        yield
    finally:
        _VALIDATED.reset(token)


def validates(fn: Callable) -> Callable:
    """Decorates an entry point `fn(config, ...)`: its config is validated first (see `validated`)."""
    @functools.wraps(fn)
    def run(config, *args, **kwargs):
        with validated(config):
            return fn(config, *args, **kwargs)
    return run


def semantic_dict(config, schema: Optional[dict] = None) -> dict:
    """The config as a plain dict without the non-semantic keys (Field.semantic False).

    Keys the schema does not declare are kept (they cannot be judged), so an unvalidated config
    still hashes everything it holds.
    """
    schema = SCHEMA if schema is None else schema
    out = {}
    for key in sorted(config.keys()):
        value = config[key]
        spec = schema.get(key)
        if isinstance(spec, Field) and not spec.semantic:
            continue
        if _is_section(value):
            out[key] = semantic_dict(value, spec if isinstance(spec, dict) else {})
        elif isinstance(value, (tuple, list)):
            out[key] = list(value)
        else:
            out[key] = value
    return out


def load_config(path: str, arg: Optional[str] = None):
    """`get_config(arg)` (or `get_config()`) of the Python config file at `path`.

    Config files use it to start from their sibling default.py without making configs/ a package:
        config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "default.py"))
    """
    path = os.path.abspath(path)
    name = "_mgas_config_" + hashlib.sha1(path.encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load a config from {path!r} (a Python file with get_config())")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


TRAIN_SECTIONS = ("seed", "data", "model", "train")   # what a training (train.py) reads from the config
SEARCH_SECTIONS = ("seed", "data", "search")           # what a search reads (not train.* or export.*, so
                                                       # mode=all can change the retraining and still resume)


def run_identity(config, sections: Optional[Sequence[str]] = None, **digests: str) -> tuple[str, dict]:
    """(hash, identity) of what determines a run: the one hash that is logged, checked on resume and
    written to results.json and the checkpoints.

    Args:
      config: the experiment config.
      sections: the top-level keys the run reads (TRAIN_SECTIONS, SEARCH_SECTIONS); None: all of them.
        Their non-semantic keys are left out, so a progress bar or a logging interval does not make a
        resumed run look like another one.
      digests: hashes of inputs from outside the config (a retraining's network and masks), stored as
        `_<name>` in the identity.
    Returns:
      a 16-hex-digit hash and the identity dict it hashes (stored with checkpoints, so that a refused
      resume can name the keys that differ).
    """
    semantic = semantic_dict(config)
    identity = semantic if sections is None else {k: semantic[k] for k in sections if k in semantic}
    identity.update({f"_{name}": value for name, value in digests.items()})
    text = json.dumps(identity, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16], identity


def config_hash(config, sections: Optional[Sequence[str]] = None) -> str:
    """The hash of `run_identity` alone: equal for configs that must produce the same numbers."""
    return run_identity(config, sections)[0]


def describe(schema: Optional[dict] = None, path: str = "") -> str:
    """One line per key, `dotted.key  type  = default  doc`: what `python -m mgas_jax.main --helpconfig`
    prints."""
    schema = SCHEMA if schema is None else schema
    lines = []
    for key, spec in schema.items():
        dotted = _join(path, key)
        if isinstance(spec, dict):
            lines.append(describe(spec, dotted))
        else:
            default = "" if spec.default is NO_DEFAULT else f"= {spec.default!r}"
            lines.append(f"{dotted:32s} {type_name(spec.type):12s} {default:24s} {spec.doc}")
    return "\n".join(lines)


def default_config(schema: Optional[dict] = None) -> ml_collections.ConfigDict:
    """The config of every key's `Field.default`: what configs/default.py returns, and so where every
    other config starts. A key without a default (and a section of such keys only) is left out: a
    config must set it, and `validate` says so."""
    schema = SCHEMA if schema is None else schema
    config = ml_collections.ConfigDict()
    for key, spec in schema.items():
        if isinstance(spec, dict):
            section = default_config(spec)
            if section.keys():
                config[key] = section
            continue
        if spec.default is NO_DEFAULT:
            continue
        types = [t for t in (spec.type if isinstance(spec.type, tuple) else (spec.type,)) if t is not type(None)]
        if spec.default is None and len(types) == 1:
            # a typed None, so that --config.<key>=<text> knows what to parse the text as
            config[key] = config_dict.placeholder(types[0])
        else:
            config[key] = spec.default
    return config


# --------------------------------------------------------------------------------------------------
# mode=evaluate (evaluation.py). None of these change a number a search or training produces, so they
# are not semantic: setting them never invalidates a workdir's checkpoints.

SCHEMA["evaluate"] = {
    "throughput_batch_size": Field(int, positive, "GLOBAL batch of the throughput measurement: images/s of "
                                   "the jit-compiled forward pass in inference mode (rounded up to a multiple "
                                   "of the device count)", default=256, semantic=False),
    "throughput_warmup": Field(int, non_negative, "untimed forward passes before the throughput timing (the "
                               "first one compiles)", default=3, semantic=False),
    "throughput_steps": Field(int, non_negative, "timed forward passes (0 = no throughput measurement)",
                              default=20, semantic=False),
}
