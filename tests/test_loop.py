"""The shared epoch loop (loop.run_epoch) on a toy step, and the signals that stop it
(checkpoint.StopSignals: SIGTERM and Ctrl-C set a flag; a second Ctrl-C stops at once)."""
import os
import signal

import jax.numpy as jnp
import pytest

from mgas_jax import checkpoint as checkpoint_lib
from mgas_jax import loop


class _Flag:
    """A stop request that arrives after the `at`-th step."""

    def __init__(self, at=None):
        self.at, self.steps, self.signal = at, 0, None

    @property
    def requested(self):
        if self.at is not None and self.steps >= self.at:
            self.signal = "SIGTERM"
        return self.signal is not None


def _run(flag=None, start=0, total=6, bad=(), check_every=0, saves=None, checks=None, compiled=None):
    flag = flag or _Flag()

    def step(state, i, batch):
        flag.steps += 1
        finite = 0.0 if i in bad else 1.0
        return state + batch, {"x": jnp.float32(batch), "finite": jnp.float32(finite)}

    def save(state, end, metrics):
        saves.append((state, end, [float(m["x"]) for m in metrics]))
        return "/ckpt"

    return loop.run_epoch(0, step, iter(range(10, 10 + total + 3)), start=start, total=total, stop=flag,
                          save=save, where="the toy stopped at epoch 1", desc="toy", show=False,
                          check_every=check_every,
                          on_check=None if checks is None else lambda state, w: checks.append((state, len(w))),
                          on_compiled=None if compiled is None else compiled.append)


def test_runs_the_batches_from_the_start_position_to_the_epochs_end():
    compiled, checks = [], []
    run = _run(start=2, total=6, compiled=compiled, checks=checks)
    assert run.state == 12 + 13 + 14 + 15 and run.end == 6 and run.bad is None
    assert [float(m["x"]) for m in run.metrics] == [12, 13, 14, 15]
    assert len(compiled) == 1 and compiled[0] >= 0
    assert checks == [(run.state, 4)]            # check_every=0: one read-back, at the epoch's end


def test_reads_back_every_window_and_stops_at_the_first_non_finite_step():
    checks = []
    run = _run(total=7, bad=(4, 5), check_every=2, checks=checks)
    assert run.bad == 4 and run.end == 6          # the window [4, 5] was run, then the loop ended
    assert [float(m["x"]) for m in run.metrics] == [10, 11, 12, 13]   # the finite windows only
    assert checks == [(21, 2), (46, 2)]


def test_a_stop_request_checkpoints_the_exact_position_and_raises_preempted():
    saves = []
    with pytest.raises(checkpoint_lib.Preempted, match=r"SIGTERM: the toy stopped at epoch 1, batch 4 of 6, "
                                                       r"and checkpointed there in /ckpt; run the same command"):
        _run(_Flag(at=3), start=1, saves=saves)
    assert saves == [(11 + 12 + 13, 4, [11, 12, 13])]


def test_a_stop_with_a_non_finite_step_saves_nothing():
    saves = []
    run = _run(_Flag(at=2), bad=(1,), saves=saves)
    assert run.bad == 1 and saves == []


def test_sigterm_and_ctrl_c_only_flag_and_a_second_ctrl_c_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with checkpoint_lib.StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
    with checkpoint_lib.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)      # the first Ctrl-C after a SIGTERM: still only a flag
        assert stop.signal == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


def _slow_steps(wait):
    """run_epoch over 4 steps of ~0.1 s; returns whether each step's incoming state was ready."""
    import jax

    @jax.jit
    def work(state):
        m = jnp.full((256, 256), 1e-3, jnp.float32) + state
        return jax.lax.fori_loop(0, 100, lambda _, a: jnp.tanh(a @ m), m).mean()

    ready = []

    def step(state, i, batch):
        ready.append(state.is_ready())
        state = work(state)
        return state, {"finite": jnp.float32(1.0)}

    loop.run_epoch(jnp.float32(0.0), step, iter(range(4)), start=0, total=4, stop=_Flag(),
                   save=lambda *a: "/ckpt", where="", desc="", show=False, wait=wait)
    return ready[1:]


def test_on_the_cpu_each_step_waits_for_the_one_before():
    """On the CPU a step is dispatched only once the state it reads is computed (with freed host memory
    kept, overlapping steps would each hold their own buffers: loop.one_step_at_a_time); without the
    wait the next step is dispatched while the last one still runs."""
    import jax
    assert loop.one_step_at_a_time() == (jax.default_backend() == "cpu")
    assert all(_slow_steps(wait=None if jax.default_backend() == "cpu" else True))
    assert not all(_slow_steps(wait=False))


def test_a_step_that_compiled_settles_the_garbage_collector(monkeypatch):
    """After a first step that compiled (on_compiled given), the loop collects Python's garbage once
    and freezes what survives (gc.freeze): a later full collection no longer walks JAX's traced
    programs and caches. Without on_compiled (nothing compiled) it does not."""
    import gc
    settled = []
    monkeypatch.setattr(loop, "settle_garbage", lambda: settled.append(True))
    _run(total=3, compiled=[])
    assert settled == [True]
    _run(total=3)
    assert settled == [True]
    monkeypatch.undo()
    try:
        garbage = [[]]
        garbage[0].append(garbage)   # a reference cycle: only a collection frees it
        del garbage
        loop.settle_garbage()
        assert gc.get_freeze_count() > 0
        assert not any(isinstance(o, list) and o and o[0] is o for o in gc.get_objects())
    finally:
        gc.unfreeze()
