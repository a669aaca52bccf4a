"""mgas_jax.checkpoint on its own: a state with typed PRNG keys round-trips through orbax with its
metadata, old steps are dropped, a damaged checkpoint is reported with the fix, another config's
checkpoints are refused naming the keys that differ, and SIGTERM or Ctrl-C only sets a flag.

The search and the trainer use these through their own tests (test_search.py, test_train.py).
"""
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from mgas_jax import checkpoint as ckpt_lib


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    key: jax.Array        # threefry (jax's default)
    init_key: jax.Array   # rbg, as the search's init key


def make_state(seed: int) -> State:
    rng = np.random.default_rng(seed)
    return State(step=jnp.int32(seed), params={"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                                               "b": {"bias": jnp.arange(4, dtype=jnp.float32) * seed}},
                 key=jax.random.key(seed), init_key=jax.random.key(seed, impl="rbg"))


def test_a_state_with_prng_keys_round_trips_with_its_meta(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    state = make_state(7)
    ckpt.save(7, state, {"epoch": 3, "config_hash": "abc", "config": {"train": {"lr": 0.1}}})
    ckpt.wait()
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
    assert ckpt.meta() == {"epoch": 3, "config_hash": "abc", "config": {"train": {"lr": 0.1}}}
    restored = ckpt.restore(7, make_state(0))   # `like` gives structure, dtypes and key kinds only
    ckpt.close()
    assert int(restored.step) == 7
    np.testing.assert_array_equal(restored.params["w"], state.params["w"])
    np.testing.assert_array_equal(restored.params["b"]["bias"], state.params["b"]["bias"])
    for name in ("key", "init_key"):
        got, want = getattr(restored, name), getattr(state, name)
        assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key), name
        assert jax.random.key_impl(got) == jax.random.key_impl(want), name
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
        # the restored key draws what the saved one draws
        np.testing.assert_array_equal(jax.random.uniform(got, (3,)), jax.random.uniform(want, (3,)))


def test_only_the_latest_steps_are_kept(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, make_state(step), {"epoch": step})
        ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    assert ckpt.meta(2) == {"epoch": 2} and ckpt.meta() == {"epoch": 3}
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]
    # a new Checkpointer on the directory finds them (a resumed run)
    again = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    assert again.latest_step() == 3 and int(again.restore(2, make_state(0)).step) == 2
    again.close()


def test_a_damaged_checkpoint_is_reported_with_the_fix(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    ckpt.save(5, make_state(5), {"epoch": 1})
    ckpt.wait()
    step_dir = tmp_path / "ckpt" / "5"
    for p in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0):
        with open(p, "r+b") as f:   # truncate every file of the checkpoint
            f.truncate(p.stat().st_size // 3)
    for read in (lambda: ckpt.meta(5), lambda: ckpt.restore(5, make_state(0))):
        with pytest.raises(ckpt_lib.CorruptCheckpointError) as e:
            read()
        message = str(e.value)
        assert "the checkpoint of step 5" in message and "Nothing was changed" in message
        assert f"move {step_dir} out of the way" in message and "another --workdir" in message
    ckpt.close()


def test_pack_and_unpack_round_trip_every_dtype_in_leaf_order():
    """pack holds one flat array per dtype; unpack cuts the leaves back out, shapes and dtypes as in
    `like`, keys rewrapped."""
    state = make_state(3)
    tree = {"s": state, "i8": jnp.arange(6, dtype=jnp.int8).reshape(2, 3), "scalar": jnp.float32(2.5)}
    packed = ckpt_lib.pack(tree)
    assert set(packed) == {"int32", "float32", "uint32", "int8"}
    assert all(a.ndim == 1 for a in packed.values())
    assert packed["float32"].size == 6 + 4 + 1      # w, bias and the scalar
    back = ckpt_lib.unpack(packed, {"s": make_state(0), "i8": jnp.zeros((2, 3), jnp.int8), "scalar": jnp.float32(0)})
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(ckpt_lib.keys_to_data(back)), jax.tree.leaves(ckpt_lib.keys_to_data(tree))):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_a_state_of_another_layout_is_refused_naming_the_leaf(tmp_path):
    """Restoring into a state whose leaves differ from the saved ones (another structure) is refused
    with the first leaf that differs, not read into the wrong places."""
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    ckpt.save(5, make_state(5), {"epoch": 1})
    ckpt.wait()
    other = make_state(0).replace(params={"w": jnp.zeros((2, 3), jnp.float32), "b": {"bias": jnp.zeros(4)}})
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r"its layout is not the state's \(.*\['w'\]"):
        ckpt.restore(5, other)
    ckpt.close()


def test_metadata_that_is_not_a_dict_is_reported(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    ckpt.save(1, make_state(1), [1, 2, 3])
    ckpt.wait()
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="metadata is list, not a dict"):
        ckpt.meta()
    ckpt.close()


def test_diff_dicts_names_every_dotted_key_that_differs():
    old = {"seed": 0, "train": {"lr": 0.1, "epochs": 2, "opt": {"momentum": 0.9}}, "gone": 1}
    new = {"seed": 0, "train": {"lr": 0.2, "epochs": 2, "opt": {"momentum": 0.8}}, "added": "x"}
    assert ckpt_lib.diff_dicts(old, new) == ["added: '<absent>' -> 'x'", "gone: 1 -> '<absent>'",
                                             "train.lr: 0.1 -> 0.2", "train.opt.momentum: 0.9 -> 0.8"]
    assert ckpt_lib.diff_dicts(old, old) == []


def test_another_configs_checkpoints_are_refused_naming_both():
    meta = {"epoch": 4, "config_hash": "aaaa", "config": {"train": {"lr": 0.1}}}
    ckpt_lib.check_same_run(meta, "aaaa", {"train": {"lr": 0.5}}, "/w")   # the hash decides
    with pytest.raises(ckpt_lib.ConfigMismatchError) as e:
        ckpt_lib.check_same_run(meta, "bbbb", {"train": {"lr": 0.5}}, "/w")
    message = str(e.value)
    for fragment in ("'/w' holds checkpoints (epoch 4)", "stored hash aaaa vs this run's bbbb",
                     "train.lr: 0.1 -> 0.5", "another --workdir", "delete '/w'"):
        assert fragment in message
    with pytest.raises(ckpt_lib.ConfigMismatchError, match="no key differs"):
        ckpt_lib.check_same_run(meta, "bbbb", {"train": {"lr": 0.1}}, "/w")
    many = {f"k{i:02d}": i for i in range(25)}
    with pytest.raises(ckpt_lib.ConfigMismatchError) as e:
        ckpt_lib.check_same_run({"config": {}}, "bbbb", many, "/w")
    assert "k19:" in str(e.value) and "k20:" not in str(e.value) and "; ..." in str(e.value)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_only_sets_a_flag_inside_the_context(signame):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with ckpt_lib.StopSignals() as stop:
        assert not stop.requested and stop.signal is None
        os.kill(os.getpid(), getattr(signal, signame))   # the process goes on
        assert stop.requested and stop.signal == signame
        other = "SIGINT" if signame == "SIGTERM" else "SIGTERM"
        os.kill(os.getpid(), getattr(signal, other))     # the first signal is the one named
        assert stop.signal == signame
    assert {s: signal.getsignal(s) for s in before} == before
    assert issubclass(ckpt_lib.Preempted, SystemExit)


def test_a_second_ctrl_c_stops_at_once():
    with ckpt_lib.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="a second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT"


def test_stop_signals_outside_the_main_thread_install_nothing():
    seen = {}

    def enter():
        with ckpt_lib.StopSignals() as stop:
            seen["handlers"] = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            seen["requested"] = stop.requested

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"handlers": before, "requested": False}
    assert {s: signal.getsignal(s) for s in before} == before
