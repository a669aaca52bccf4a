"""The training loop end to end on configs/tiny.py (digits, 3 cells of width 4, 2 epochs of 3 steps).

Covers: the CLI writes metrics.jsonl, TensorBoard events, checkpoints and results.json; an interrupted
run resumed on the same workdir ends with exactly the numbers of an uninterrupted run; fixed weight
masks keep pruned weights exactly zero; a workdir of another config is refused.
"""
import os

# XLA's CPU backend spends most of a tiny run optimising threefry PRNG code (about 20 s per compile);
# tests only need correct numbers, not fast kernels. Effective only if JAX's backend is not up yet.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

from mgas_jax import checkpoint as checkpoint_lib  # noqa: E402
from mgas_jax import config as config_lib  # noqa: E402
from mgas_jax import data as data_lib  # noqa: E402
from mgas_jax import network, parallel, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def tiny(**train_overrides):
    config = config_lib.load_config(TINY)
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full tiny run in this process: (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("full"))
    return workdir, train.train_and_evaluate(tiny(), workdir)


@pytest.mark.slow
def test_cli_run_writes_everything(tmp_path, compilation_cache_dir):
    workdir = tmp_path / "cli"
    # The same cache: this run compiles what the in-process runs below then load.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "-m", "mgas_jax.main", f"--config={TINY}", f"--workdir={workdir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["test"]) == {"top1", "top5", "loss"}
    assert 0.0 <= results["test"]["top1"] <= results["test"]["top5"] <= 1.0
    assert results["params"]["dense"] == results["params"]["nonzero"] > 0  # the auxiliary head excluded
    assert results["epochs"] == 2 and results["steps"] == 6
    assert results["config"]["train"]["epochs"] == 2
    lines = read_jsonl(workdir / "metrics.jsonl")
    splits = [line["split"] for line in lines]
    # per epoch: train lines after steps 2 and 3 (log every 2 steps, and the epoch's end), one val line
    assert splits == ["train", "train", "val", "train", "train", "val", "test"]
    assert {"step", "epoch", "loss", "ce", "aux_ce", "top1", "lr", "grad_norm", "drop_path"} <= set(lines[0])
    # The auxiliary head is on in tiny.py: loss = ce + 0.4 * aux_ce.
    assert lines[0]["aux_ce"] > 0
    assert lines[0]["loss"] == pytest.approx(lines[0]["ce"] + 0.4 * lines[0]["aux_ce"], rel=1e-5)
    assert glob.glob(str(workdir / "tb" / "events.out.tfevents.*"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # numbered by optimizer step
    assert "test top1" in out.stderr


@pytest.mark.slow
def test_cli_keeps_compiled_programs_for_the_next_run(tmp_path):
    """Without a JAX cache setting, the CLI caches in <workdir>/xla_cache; a second run pointed at that
    cache (config.compilation_cache_dir) loads every program from it and compiles none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    # JAX logs every persistent-cache hit and miss of jax._src.compiler at debug level.
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DEBUG_LOG_MODULES="jax._src.compiler")
    hit, miss = "Persistent compilation cache hit", "PERSISTENT COMPILATION CACHE MISS"

    def cli(workdir, *overrides):
        out = subprocess.run([sys.executable, "-m", "mgas_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                              "--config.train.epochs=1", "--config.train.steps_per_epoch=1", *overrides],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr, json.loads((workdir / "results.json").read_text())

    cache = tmp_path / "first" / "xla_cache"
    log, first = cli(tmp_path / "first")
    assert f"compiled programs cached in {cache}" in log
    assert log.count(miss) > 0 and os.listdir(cache), "the first run compiled nothing into the cache"
    entries = sorted(os.listdir(cache))
    log, second = cli(tmp_path / "second", f"--config.compilation_cache_dir={cache}")
    assert f"compiled programs cached in {cache}" in log
    assert log.count(hit) > 0 and log.count(miss) == 0, (log.count(hit), log.count(miss))
    assert sorted(os.listdir(cache)) == entries
    assert not (tmp_path / "second" / "xla_cache").exists()
    assert second["test"] == first["test"]                # and the loaded programs compute the same
    # 'off' wins even over JAX's own setting
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "env_cache")
    log, _ = cli(tmp_path / "third", "--config.compilation_cache_dir=off")
    assert "compilation cache off" in log and log.count(hit) == 0
    assert not (tmp_path / "third" / "xla_cache").exists() and not (tmp_path / "env_cache").exists()


@pytest.mark.slow
def test_uninterrupted_run(uninterrupted):
    workdir, results = uninterrupted
    assert results["steps"] == 6 and results["epochs"] == 2
    assert set(results) >= {"test", "val", "params", "config_hash"}
    # keep_checkpoints = 2: both epochs are kept (numbered by optimizer step, 3 per epoch).
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    meta = ckpt.meta()
    ckpt.close()
    assert meta["epoch"] == 2 and meta["step"] == 6 and meta["config_hash"] == results["config_hash"]
    # drop-path is ramped: 0 in epoch 0, drop_path * 1 / 2 in epoch 1.
    rates = {line["epoch"]: line["drop_path"] for line in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if line["split"] == "train"}
    assert rates == {0: 0.0, 1: pytest.approx(0.1)}


def interrupt_after_epoch_1(epoch, state):
    """An epoch hook: the job dies right after epoch 1's checkpoint, as a preempted one would."""
    del state
    if epoch == 1:
        raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_gives_the_same_numbers(uninterrupted, tmp_path):
    _, expected = uninterrupted
    workdir = str(tmp_path / "resumed")

    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(), workdir, epoch_hooks=[interrupt_after_epoch_1])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    # The same command again; non-semantic keys may differ (here the logging interval).
    results = train.train_and_evaluate(tiny(log_every_steps=1), workdir)
    assert results["test"] == expected["test"]
    assert results["val"] == expected["val"]
    assert results["params"] == expected["params"] and results["steps"] == expected["steps"]
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_steps = [line["step"] for line in lines if line["split"] == "train"]
    assert train_steps == [2, 3, 4, 5, 6]  # epoch 0 logged every 2 steps, epoch 1 (resumed) every step


def steps_calling(monkeypatch, action):
    """Wraps the jitted train step: `action(n, args)` runs before its n-th call (1-based) and returns
    the (possibly changed) arguments."""
    original = train.make_train_step
    calls = {"n": 0}

    def make(*args, **kwargs):
        step = original(*args, **kwargs)

        def wrapped(*step_args):
            calls["n"] += 1
            return step(*action(calls["n"], step_args))
        return wrapped

    monkeypatch.setattr(train, "make_train_step", make)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_checkpoints_inside_an_epoch_and_resumes(uninterrupted, tmp_path, monkeypatch, signame):
    """A real SIGTERM (or Ctrl-C) in the 2nd step of epoch 2: checkpoint at that step, clean exit, exact resume."""
    import signal
    _, expected = uninterrupted
    workdir = str(tmp_path / "preempted")

    def signal_at_5(n, args):
        if n == 5:
            os.kill(os.getpid(), getattr(signal, signame))  # the handler only flags; the step runs to its end
        return args

    steps_calling(monkeypatch, signal_at_5)
    with pytest.raises(SystemExit, match=f"{signame}: training stopped at epoch 2, batch 2 of 3") as e:
        train.train_and_evaluate(tiny(), workdir)
    assert isinstance(e.value, checkpoint_lib.Preempted)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "5"]
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    meta = ckpt.meta()
    ckpt.close()
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 2, 5)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    monkeypatch.undo()

    results = train.train_and_evaluate(tiny(), workdir)
    assert results["test"] == expected["test"] and results["val"] == expected["val"]
    assert results["steps"] == 6
    train_steps = [line["step"] for line in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                   if line["split"] == "train"]
    assert train_steps == [2, 3, 5, 6]  # the preempted run flushed its window at step 5


def poison_params(n_from, n_to=None):
    """Before calls n_from..n_to: every weight NaN (the step then sees a non-finite loss)."""
    def action(n, args):
        if n_from <= n and (n_to is None or n <= n_to):
            state = args[0]
            args = (state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params)),) + args[1:]
        return args
    return action


@pytest.mark.slow
def test_non_finite_loss_stops_names_the_step_and_saves_nothing(uninterrupted, tmp_path, monkeypatch):
    _, expected = uninterrupted
    workdir = str(tmp_path / "nan")
    steps_calling(monkeypatch, poison_params(5))
    with pytest.raises(FloatingPointError) as e:
        train.train_and_evaluate(tiny(), workdir)
    message = str(e.value)
    for fragment in ("step 4 (epoch 2)", "last good checkpoint is step 3", "lower train.lr",
                     "nan_policy=rollback", "run the same command again"):
        assert fragment in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]   # nothing written after
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    monkeypatch.undo()
    # The fault is gone: the same command resumes from step 3 and ends as if nothing had happened.
    results = train.train_and_evaluate(tiny(), workdir)
    assert results["test"] == expected["test"] and results["rollbacks"] == 0


@pytest.mark.slow
def test_rollback_policy_restores_the_checkpoint_and_lowers_the_learning_rate(tmp_path, monkeypatch):
    workdir = str(tmp_path / "rollback")
    calls = steps_calling(monkeypatch, poison_params(5, 5))   # one bad step, in epoch 2
    config = tiny(nan_policy="rollback", rollback_lr_factor=0.25, log_every_steps=1)
    results = train.train_and_evaluate(config, workdir)
    assert calls["n"] == 8  # 3 in epoch 1; 2 in its failed try of epoch 2 (the 2nd bad); 3 in the redo
    assert results["rollbacks"] == 1 and results["steps"] == 6
    assert np.isfinite(results["test"]["loss"])
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    meta = ckpt.meta()
    ckpt.close()
    assert meta["lr_scale"] == 0.25 and meta["rollbacks"] == 1
    lines = [line for line in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if line["split"] == "train"]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]   # the discarded line of step 4 is gone
    schedule = train.learning_rate_schedule(config, 3)
    assert lines[3]["lr"] == pytest.approx(0.25 * float(schedule(3)))
    assert lines[2]["lr"] == pytest.approx(float(schedule(2)))


@pytest.mark.slow
def test_rollback_gives_up_after_max_rollbacks(tmp_path, monkeypatch):
    steps_calling(monkeypatch, poison_params(5))   # every step from the 5th on is bad
    with pytest.raises(FloatingPointError, match="train.max_rollbacks rollbacks did not help"):
        train.train_and_evaluate(tiny(nan_policy="rollback", max_rollbacks=2), str(tmp_path / "hopeless"))


@pytest.mark.slow
def test_half_written_checkpoint_is_ignored_on_resume(uninterrupted, tmp_path):
    """What a kill during orbax's write leaves (a temporary directory) is not taken for a checkpoint."""
    _, expected = uninterrupted
    workdir = str(tmp_path / "killed")

    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(), workdir, epoch_hooks=[interrupt_after_epoch_1])
    # The next save (step 6) killed mid-write: orbax writes into a temporary directory and renames it
    # only when complete.
    partial = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1764390000000000")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {"par')   # cut off
    results = train.train_and_evaluate(tiny(), workdir)
    assert results["test"] == expected["test"] and results["steps"] == 6


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(uninterrupted, tmp_path, compilation_cache_dir):
    """SIGKILL the CLI as soon as its first checkpoint write begins, and again later; reruns finish
    with the uninterrupted numbers."""
    import signal
    import time
    _, expected = uninterrupted
    workdir = tmp_path / "sigkill"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "mgas_jax.main", f"--config={TINY}", f"--workdir={workdir}"]
    ckpts = workdir / "checkpoints"
    for n_entries in (1, 2):   # kill when the 1st, then the 2nd, checkpoint entry appears
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if ckpts.exists() and len(os.listdir(ckpts)) >= n_entries:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["test"] == expected["test"]
    assert results["steps"] == 6


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(uninterrupted):
    workdir, _ = uninterrupted
    config = tiny(lr=0.1)
    with pytest.raises(checkpoint_lib.ConfigMismatchError) as e:
        train.train_and_evaluate(config, workdir)
    message = str(e.value)
    # The hash is of the sections training reads (train.run_identity), not of the whole config.
    old_hash, new_hash = train.run_identity(tiny(), None, None)[0], train.run_identity(config, None, None)[0]
    for fragment in (workdir, "different config", "train.lr: 0.05 -> 0.1", old_hash, new_hash,
                     "another --workdir", "delete"):
        assert fragment in message


def masked_spec_and_masks(config, seed=0, density=0.5):
    ds = data_lib.load(config.data)
    spec = dataclasses.replace(train.spec_from_config(config, ds.num_classes), masked=True)
    x = jnp.zeros((1,) + ds.image_shape)
    shapes = jax.eval_shape(lambda: network.Network(spec).init({"params": jax.random.key(0)}, x, train=False))["masks"]
    rng = np.random.default_rng(seed)
    masks = jax.tree.map(lambda s: (rng.random(s.shape) < density).astype(np.float32), shapes)
    return spec, masks, ds


def pruned_values(params, masks):
    """All parameter entries whose mask is 0, as one flat array."""
    flat_p, flat_m = traverse_util.flatten_dict(params), traverse_util.flatten_dict(masks)
    return np.concatenate([np.asarray(flat_p[k])[np.asarray(m) == 0] for k, m in flat_m.items()])


@pytest.mark.slow
def test_masked_weights_stay_exactly_zero(tmp_path):
    config = tiny(weight_decay=0.1)  # strong decay: it would move any pruned weight that were not zero
    spec, masks, _ = masked_spec_and_masks(config)
    seen = []

    def check(epoch, state):
        params, state_masks = jax.device_get((state.params, state.masks))
        seen.append(epoch)
        assert pruned_values(params, state_masks).size > 0
        assert np.all(pruned_values(params, state_masks) == 0.0)
        # ... while the unpruned weights train.
        assert np.any(np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(params)]) != 0.0)

    results = train.train_and_evaluate(config, str(tmp_path / "masked"), spec=spec, masks=masks, epoch_hooks=[check])
    assert seen == [1, 2]
    zeros = sum(int(np.sum(m == 0)) for m in jax.tree.leaves(masks))
    assert results["params"]["nonzero"] == results["params"]["dense"] - zeros


@pytest.mark.slow
def test_train_step_remasks_after_the_update():
    """Even a state whose pruned weights are non-zero (and have momentum) leaves a step with them at 0."""
    config = tiny(weight_decay=0.1)
    spec, masks, ds = masked_spec_and_masks(config, seed=1)
    mesh = parallel.make_mesh()
    tx = train.make_optimizer(config, 3)
    state = train.create_train_state(config, spec, jax.random.key(0), ds.image_shape, tx=tx, masks=masks, mesh=mesh)
    assert np.all(pruned_values(jax.device_get(state.params), masks) == 0.0)  # zero from the start
    # Break the invariant: every weight 0.5, every momentum 1.
    state = state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params),
                          opt_state=jax.tree.map(lambda s: jnp.ones_like(s) if s.ndim else s, state.opt_state))
    step = train.make_train_step(config, network.Network(spec), tx, train.learning_rate_schedule(config, 3),
                                 ds.mean, ds.std, mesh)
    batch = next(ds.train.batches(16, epoch=0, seed=0, shuffle=True, drop_remainder=True))
    new_state, step_metrics = step(state, parallel.shard_batch(batch, mesh), jnp.float32(0.1), jnp.float32(1.0))
    params = jax.device_get(new_state.params)
    assert np.all(pruned_values(params, masks) == 0.0)
    assert np.isfinite(float(step_metrics["loss"]))
    assert int(new_state.step) == 1


def test_wrong_masks_are_refused():
    config = tiny()
    spec, masks, ds = masked_spec_and_masks(config)
    flat = traverse_util.flatten_dict(masks)
    path = next(iter(flat))
    flat[path] = np.ones((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="has shape"):
        train.create_train_state(config, spec, jax.random.key(0), ds.image_shape, tx=train.make_optimizer(config, 3),
                                 masks=traverse_util.unflatten_dict(flat))
    unmasked = dataclasses.replace(spec, masked=False)
    with pytest.raises(ValueError, match="spec.masked is False"):
        train.create_train_state(config, unmasked, jax.random.key(0), ds.image_shape,
                                 tx=train.make_optimizer(config, 3), masks=masks)


def test_learning_rate_schedules():
    config = tiny()
    schedule = train.learning_rate_schedule(config, steps_per_epoch=3)   # 2 epochs x 3 steps, cosine
    assert float(schedule(0)) == pytest.approx(config.train.lr)
    assert float(schedule(3)) == pytest.approx(config.train.lr / 2)
    assert float(schedule(6)) == pytest.approx(config.train.lr_min)
    config.train.lr_schedule = "step"
    config.train.lr_decay_rate = 0.5
    schedule = train.learning_rate_schedule(config, steps_per_epoch=3)
    assert [float(schedule(s)) for s in (0, 2, 3, 5, 6)] == pytest.approx(
        [config.train.lr, config.train.lr, config.train.lr / 2, config.train.lr / 2, config.train.lr / 4])


@pytest.mark.parametrize("name,classes,shape,millions", [("cifar10.py", 10, (32, 32, 3), 3.35),
                                                         ("imagenet.py", 1000, (224, 224, 3), 4.72)])
def test_configs_build_the_published_networks(name, classes, shape, millions):
    """DARTS_V2 at the DARTS sizes: 3.3 M parameters on CIFAR-10, 4.7 M in the ImageNet mobile setting."""
    config = config_lib.load_config(os.path.join(ROOT, "configs", name))
    spec = train.spec_from_config(config, classes)
    shapes = jax.eval_shape(lambda: network.Network(spec).init({"params": jax.random.key(0)},
                                                               jnp.zeros((1,) + shape), train=False))
    assert network.count_params(shapes["params"])["dense"] / 1e6 == pytest.approx(millions, abs=0.01)
