"""The epoch loop that the search and the training share: one pass over an epoch's batches.

    run = loop.run_epoch(state, step, batches, start=batch_in_epoch, total=steps_per_epoch,
                         stop=stop_flag, save=save, where="training stopped at epoch 2", desc="epoch 2/10")
    state, metrics, bad = run.state, run.metrics, run.bad

What both loops need and would otherwise each write: the batches from `start` on (a resumed epoch
continues at the batch after its checkpoint), a progress bar, a stop request (SIGTERM or Ctrl-C,
checkpoint.StopSignals) answered by checkpointing the exact position and raising
`checkpoint.Preempted`, the non-finite check of every step, and the time of a first step that
compiles. The host reads the metrics back once per window (`check_every` steps), never per step.
On the CPU backend each step waits for the one before it (`one_step_at_a_time`).
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from typing import Any, Callable, Iterable, Optional

import jax

from mgas_jax import checkpoint as checkpoint_lib
from mgas_jax import metrics as metrics_lib


def one_step_at_a_time() -> bool:
    """Whether a loop should wait for each step's result before it dispatches the next: on the CPU.

    Why: XLA CPU takes a program's buffers from malloc when the program is set to run. With freed
    memory kept for reuse (modes.keep_freed_host_memory, which a run sets up), a step set to run
    while the last one still holds its buffers takes other memory, and that memory stays with the
    process: the retraining step at C 36, batch 96 grew from 10 GB to over 15 GB with three steps
    dispatched at once (benchmarks/README.md section 13). The wait gives up only the overlap of
    Python's dispatch with the step before, on cores that both share.
    """
    return jax.default_backend() == "cpu"


def settle_garbage() -> None:
    """Collect Python's garbage once, then leave what survives out of later collections (`gc.freeze`).

    Called after a step that compiled. Why: a chained search step (search.programs 'edge') makes
    thousands of short-lived Python objects per step, which set off the collector, and about one
    collection in three is a full one that walks every object JAX holds (traced programs, caches):
    0.4 s of the Python thread's CPU at the 8-cell benchmark's size, on cores that the step's
    kernels share (benchmarks/README.md section 17). Frozen, those objects are not walked again.
    Unfreezing first lets this collection reclaim what an earlier freeze kept that has since become
    garbage (the programs of a structure no longer searched).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclasses.dataclass
class EpochRun:
    """What `run_epoch` did.

    Attributes:
      state: the state after the last step run.
      metrics: host metrics of the steps run, in batch order; when a step was not finite, only those
        of the windows before its window.
      end: the batch index after the last step run.
      bad: the batch index of the first step that was not finite, or None.
    """
    state: Any
    metrics: list
    end: int
    bad: Optional[int] = None


def run_epoch(state, step: Callable, batches: Iterable, *, start: int, total: int,
              stop: checkpoint_lib.StopSignals, save: Callable[[Any, int, list], str], where: str, desc: str,
              show: bool = True, check_every: int = 0, on_check: Optional[Callable[[Any, list], Optional[dict]]] = None,
              on_compiled: Optional[Callable[[float], None]] = None, wait: Optional[bool] = None) -> EpochRun:
    """Runs the steps of batches [start, total) of an epoch.

    Args:
      state: the state before the first step (the step may donate it).
      step: (state, i, batch) -> (state, metrics), metrics a dict of device scalars with 'finite'
        (1.0 when the step's loss and gradients were finite).
      batches: the epoch's batches from its first one; those before `start` are skipped.
      start: batches of the epoch already done (0, or the position of a mid-epoch checkpoint).
      total: the epoch's number of batches.
      stop: checked after every step; once set, the metrics so far are checked, `save(state, i + 1,
        metrics)` checkpoints the position (and returns the checkpoint directory) and
        `checkpoint.Preempted` is raised, saying `where` it stopped.
      check_every: read the metrics back and check them every this many steps; 0: only at the end of
        the epoch and on a stop.
      on_check: fn(state, host metrics of the window) after each finite window; a dict it returns
        becomes the progress bar's postfix.
      on_compiled: fn(seconds) after the first step, which then waits for its result: the step
        compiled in that time (with the first batch's loading). Python's garbage is then settled
        (`settle_garbage`).
      wait: wait for each step's state before the next step is dispatched (the next batch is loaded
        meanwhile); None: `one_step_at_a_time()`.
    Returns:
      EpochRun; the loop ends at the first window holding a step that was not finite.
    """
    bar = metrics_lib.progress_bar(total, desc, enabled=show, initial=start)  # log lines go above it
    done, window, end = [], [], start
    wait = one_step_at_a_time() if wait is None else wait
    t0 = time.time()
    try:
        for i, batch in enumerate(itertools.islice(batches, start, total), start):
            if wait and i > start:
                jax.block_until_ready(state)
            state, metrics = step(state, i, batch)
            if on_compiled is not None and i == start:
                jax.block_until_ready(metrics)
                on_compiled(time.time() - t0)
                settle_garbage()
            window.append(metrics)
            end = i + 1
            bar.update(1)
            if stop.requested or end == total or (check_every and len(window) == check_every):
                host, window = jax.device_get(window), []
                finite = [float(m["finite"]) for m in host]
                if min(finite) < 1.0:
                    return EpochRun(state, done, end, bad=end - len(host) + finite.index(min(finite)))
                done += host
                postfix = on_check(state, host) if on_check is not None else None
                if postfix:
                    bar.set_postfix(**postfix)
            if stop.requested:
                directory = save(state, end, done)
                raise checkpoint_lib.Preempted(
                    f"{stop.signal}: {where}, batch {end} of {total}, and checkpointed there in {directory}; "
                    f"run the same command again to resume")
    finally:
        bar.close()
    return EpochRun(state, done, end)
