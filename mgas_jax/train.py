"""Training a fixed network from scratch: mode=train for DARTS genotypes, and MGAS retraining.

    results = train.train_and_evaluate(config, workdir)                   # config.model.genotype
    results = train.train_and_evaluate(config, workdir, spec=spec, masks=masks)   # MGAS retraining

The recipe is DARTS's evaluation training (docs/method.md section 6): SGD with momentum, gradient-norm
clip, weight decay, a cosine (or step) learning rate, drop-path ramped linearly over the epochs,
cross-entropy with optional label smoothing plus a weighted auxiliary loss. With fixed weight masks
(`spec.masked`) the pruned weights are zero from the start and stay exactly zero: their gradients are
zeroed and the weights are re-multiplied by the masks after every update (weight decay and momentum
would otherwise move them).

Everything is jit-compiled over a 1-D device mesh (parallel.py): batches split over 'data', state
replicated. Images arrive as uint8 and are augmented on device inside the step.

Resuming: an orbax checkpoint, numbered by optimizer step, is written after every epoch, and on
SIGTERM or Ctrl-C at the next step (then the run exits with `checkpoint.Preempted`). Running the same command
again on the same workdir restores the latest one and continues at the batch after it; because the
data order is a pure function of (seed, epoch) and every PRNG key is fold_in(key, step), the resumed
run ends with the same numbers as an uninterrupted one. A workdir holding checkpoints of another
config is refused (checkpoint.check_same_run).

Numerical faults: every step reports whether its loss and gradients were finite; the host checks at
each log line, before anything is saved. `train.nan_policy = "stop"` raises FloatingPointError naming
the step and the last good checkpoint; "rollback" restores that checkpoint and goes on with the
learning rate times `train.rollback_lr_factor` (at most `train.max_rollbacks` times).

Outputs in workdir: metrics.jsonl, tb/ (TensorBoard), checkpoints/, results.json.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from mgas_jax import checkpoint as checkpoint_lib
from mgas_jax import config as config_lib
from mgas_jax import data as data_lib
from mgas_jax import losses, loop, metrics, names, network, parallel

# Called after each finished epoch (after its checkpoint is saved): fn(epoch, state), epoch 1-based.
EpochHook = Callable[[int, "TrainState"], None]


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and saves in checkpoints).

    Attributes:
      step: () int32, optimizer steps taken.
      params: the `params` collection (float32).
      batch_stats: BatchNorm running statistics.
      masks: the fixed 0/1 weight masks (`masks` collection, same paths as their kernels); {} when the
        network is not masked. Never trained.
      opt_state: optax state of the optimizer.
      key: typed PRNG key of the run; step s draws from fold_in(key, s).
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    masks: Any
    opt_state: Any
    key: jax.Array


# ---------------------------------------------------------------------------------------------------
# Construction: network spec, optimizer, initial state
# ---------------------------------------------------------------------------------------------------

def spec_from_config(config, num_classes: int) -> network.NetworkSpec:
    """The evaluation network of `config.model` (a DARTS genotype laid out over model.layers cells)."""
    m = config.model
    return network.build_network(
        m.genotype, init_channels=m.init_channels, num_classes=num_classes, layers=m.layers,
        auxiliary=m.auxiliary, stem_multiplier=m.stem_multiplier, pool_bn=m.pool_bn, masked=False,
        imagenet_stem=m.imagenet_stem, dtype=None if m.dtype == "float32" else jnp.dtype(m.dtype)).spec


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step.

    cosine: lr -> lr_min over all epochs * steps_per_epoch steps (per step; DARTS steps its cosine
    per epoch, which differs by less than one epoch's worth). step: lr * lr_decay_rate ** k after
    k * lr_decay_epochs epochs (DARTS ImageNet's StepLR).
    """
    t = config.train
    total = max(1, t.epochs * steps_per_epoch)
    if t.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(t.lr, decay_steps=total, alpha=t.lr_min / t.lr)
    return optax.exponential_decay(t.lr, transition_steps=max(1, t.lr_decay_epochs * steps_per_epoch),
                                   decay_rate=t.lr_decay_rate, staircase=True)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> add_decayed_weights -> SGD(schedule, momentum), as PyTorch's DARTS does.

    The clip sees the loss gradient only; weight decay is added after it, like torch's SGD(weight_decay).
    """
    t = config.train
    parts = []
    if t.grad_clip > 0:
        parts.append(losses.clip_by_global_norm(t.grad_clip))
    if t.weight_decay > 0:
        parts.append(optax.add_decayed_weights(t.weight_decay))
    parts.append(optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=t.momentum or None,
                           nesterov=t.nesterov))
    return optax.chain(*parts)


def apply_masks(tree: Any, masks: Any) -> Any:
    """Multiplies the leaves of `tree` (params-shaped) by the mask at the same path, where there is one.

    A jax.tree.map over `tree` and its masks aligned to it (`names.masks_like`: Flax keeps each weight
    mask at its kernel's path in the `masks` collection).

    Args:
      tree: params, gradients or updates (nested dicts of arrays).
      masks: the `masks` collection; entries without a matching leaf in `tree` are ignored.
    Returns:
      tree with every masked leaf multiplied by its 0/1 mask.
    """
    return names.apply(tree, masks)


def _check_masks(given: Any, expected: Any) -> None:
    """Raises ValueError unless `given` has the paths and shapes of the network's `masks` collection."""
    flat_given = traverse_util.flatten_dict(given)
    flat_expected = traverse_util.flatten_dict(expected)
    missing = sorted("/".join(p) for p in set(flat_expected) - set(flat_given))
    extra = sorted("/".join(p) for p in set(flat_given) - set(flat_expected))
    if missing or extra:
        raise ValueError(f"masks do not match the network: missing {missing[:5]}, unexpected {extra[:5]} "
                         "(masks must have the paths of the network's 'masks' collection)")
    for path, m in flat_expected.items():
        if tuple(np.shape(flat_given[path])) != tuple(m.shape):
            raise ValueError(f"mask {'/'.join(path)} has shape {np.shape(flat_given[path])}, expected {m.shape}")


def create_train_state(config, spec: network.NetworkSpec, key: jax.Array, input_shape: Sequence[int], *,
                       tx: optax.GradientTransformation, masks: Any = None, mesh=None) -> TrainState:
    """A fresh, replicated TrainState.

    Args:
      config: the experiment config (unused beyond what tx and spec carry; kept for symmetry).
      spec: the network.
      key: the run's root key, jax.random.key(seed): split into the parameter key and state.key.
      input_shape: (H, W, C) of one image.
      tx: the optimizer (make_optimizer).
      masks: fixed 0/1 weight masks with the paths of the network's `masks` collection (spec.masked
        only); None keeps the all-ones masks of the initialisation. The parameters are multiplied by
        them, so pruned weights start at exactly zero.
      mesh: the device mesh (default parallel.make_mesh()).
    Returns:
      TrainState with step 0, replicated over the mesh.
    """
    del config
    mesh = parallel.make_mesh() if mesh is None else mesh
    model = network.Network(spec)
    params_key, state_key = jax.random.split(key)
    x = jnp.zeros((2,) + tuple(input_shape), jnp.float32)
    if masks is not None:
        if not spec.masked:
            raise ValueError("masks were given but spec.masked is False; build the spec with masked=True")
        expected = jax.eval_shape(lambda: model.init({"params": params_key}, x, train=False))["masks"]
        _check_masks(masks, expected)
        masks = parallel.replicate(jax.tree.map(lambda m: np.asarray(m, np.float32), masks), mesh)

    def init(params_key, state_key, given_masks):
        variables = model.init({"params": params_key}, x, train=False)
        fixed = variables.get("masks", {}) if given_masks is None else given_masks
        params = apply_masks(variables["params"], fixed)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), masks=fixed,
                          opt_state=tx.init(params), key=state_key)

    return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))(params_key, state_key, masks)


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------

def _variables(state: TrainState) -> dict:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if state.masks:
        variables["masks"] = state.masks
    return variables


def _correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """(B,) float32: 1 where the label is among the top-k logits."""
    k = min(k, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch: dict, drop_path_rate: jax.Array, lr_scale: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, data_config, mean, std,
               label_smoothing: float, aux_weight: float) -> tuple[TrainState, dict]:
    """One SGD step on one global batch. Pure: jit it with the keyword arguments bound (make_train_step).

    Args:
      state: the replicated TrainState (donated).
      batch: {'image': uint8 (B, H, W, C), 'label': int32 (B,)}, split over the 'data' axis.
      drop_path_rate: () float32, this epoch's drop-path rate (traced: no recompilation per epoch).
      lr_scale: () float32 multiplying the learning rate (1; lower after a nan_policy=rollback).
        SGD's update is linear in the learning rate, so scaling the update scales the rate.
    Returns:
      (new state, metrics {'loss', 'ce', 'aux_ce', 'top1', 'grad_norm', 'lr', 'finite'}: () float32
      each); loss = ce + aux_weight * aux_ce (aux_ce 0 without an auxiliary head); finite is 1 when
      the loss and every gradient are finite (the host stops or rolls back otherwise).
    """
    step_key = jax.random.fold_in(state.key, state.step)
    aug_key, drop_key = jax.random.split(step_key)
    images = data_lib.augment.augment_batch(aug_key, batch["image"], data_config, mean, std, train=True)
    labels = batch["label"]

    def loss_fn(params):
        variables = _variables(state.replace(params=params))
        (logits, aux), updates = model.apply(variables, images, train=True, drop_path_rate=drop_path_rate,
                                             rngs={"dropout": drop_key}, mutable=["batch_stats"])
        ce = losses.cross_entropy(logits, labels, label_smoothing)
        aux_ce = jnp.zeros((), jnp.float32)
        if aux is not None and aux_weight > 0:
            aux_ce = losses.cross_entropy(aux, labels, label_smoothing)
        return ce + aux_weight * aux_ce, (ce, aux_ce, logits, updates["batch_stats"])

    (loss, (ce, aux_ce, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # The forward pass already multiplies kernels by their masks, so these gradients are zero; zeroing
    # them explicitly keeps that true whatever the network does.
    grads = apply_masks(grads, state.masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    # Weight decay of a zero weight is zero and so is its momentum, but float round-off or a mask that
    # changed under a restored optimizer state could still move it: re-mask so pruned weights stay 0.
    params = apply_masks(params, state.masks)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics_ = {"loss": loss, "ce": ce, "aux_ce": aux_ce, "top1": jnp.mean(_correct(logits, labels, 1)),
                "grad_norm": optax.tree.norm(grads), "lr": jnp.asarray(schedule(state.step), jnp.float32) * lr_scale,
                "finite": (jnp.isfinite(loss) & losses.all_finite(grads)).astype(jnp.float32)}
    return new_state, metrics_


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, mean, std) -> dict:
    """Sums over one (padded) evaluation batch.

    Args:
      batch: {'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,) 1 = real}.
    Returns:
      {'loss', 'top1', 'top5', 'count'}: () float32 sums over the real examples (divide by count).
    """
    images = data_lib.augment.normalize(batch["image"], mean, std)
    logits, _ = model.apply(_variables(state), images, train=False)
    labels, weight = batch["label"], batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {"loss": jnp.sum(ce * weight), "top1": jnp.sum(_correct(logits, labels, 1) * weight),
            "top5": jnp.sum(_correct(logits, labels, 5) * weight), "count": jnp.sum(weight)}


def make_train_step(config, model, tx, schedule, mean, std, mesh):
    """train_step jit-compiled for `mesh`: state replicated and donated, batch split over 'data'."""
    fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule, data_config=config.data,
                           mean=np.asarray(mean), std=np.asarray(std),
                           label_smoothing=config.train.label_smoothing,
                           aux_weight=config.model.auxiliary_weight if config.model.auxiliary else 0.0)
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(fn, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model, mean, std, mesh):
    fn = functools.partial(eval_step, model=model, mean=np.asarray(mean), std=np.asarray(std))
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(fn, in_shardings=(replicated, parallel.batch_sharding(mesh)), out_shardings=replicated)


def evaluate(p_eval_step, state: TrainState, split: data_lib.Split, *, batch_size: int, mesh) -> dict:
    """Top-1, top-5 and mean cross-entropy over a whole split, padding its last batch.

    Args:
      batch_size: GLOBAL evaluation batch size.
    Returns:
      {'top1', 'top5', 'loss'} floats, or {} for an empty split.
    """
    if split.num_examples == 0:
        return {}
    local = batch_size // jax.process_count()
    totals = None
    wait = loop.one_step_at_a_time()
    for batch in split.batches(batch_size, epoch=0, seed=0, shuffle=False, drop_remainder=False):
        if wait and totals is not None:
            jax.block_until_ready(totals)
        sums = p_eval_step(state, parallel.shard_batch(parallel.pad_batch(batch, local), mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {k: float(totals[k]) / count for k in ("top1", "top5", "loss")}


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def _digest(tree: Any) -> str:
    """A hash of a host pytree's paths, shapes and values (identifies given masks in the run hash)."""
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(tree).items()):
        arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update("/".join(path).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def run_identity(config, spec: Optional[network.NetworkSpec], masks: Any) -> tuple[str, dict]:
    """(hash, identity) of a training run for the same-run check of a resumed workdir (config.run_identity).

    The sections training reads (config.TRAIN_SECTIONS): a changed search knob does not invalidate a
    training workdir. An explicit spec or masks (retraining) are part of the run, so their digests join.
    """
    digests = {}
    if spec is not None:
        digests["spec"] = hashlib.sha256(repr(spec).encode()).hexdigest()[:16]
    if masks is not None:
        digests["masks"] = _digest(masks)
    return config_lib.run_identity(config, config_lib.TRAIN_SECTIONS, **digests)


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return repr(x)


def _restore(ckpt: checkpoint_lib.Checkpointer, step: int, like: TrainState) -> tuple[TrainState, dict]:
    """The state and loop position (epoch, batch, lr_scale, rollbacks) of checkpoint `step`."""
    meta = ckpt.meta(step)
    state = ckpt.restore(step, like)
    pos = dict(epoch=int(meta["epoch"]), batch=int(meta.get("batch", 0)),
               lr_scale=float(meta.get("lr_scale", 1.0)), rollbacks=int(meta.get("rollbacks", 0)))
    return state, pos


def _non_finite(config, ckpt: checkpoint_lib.Checkpointer, state: TrainState, pos: dict, bad_step: int,
                initial_state: Callable[[], TrainState]) -> tuple[TrainState, dict]:
    """A non-finite loss or gradient at optimizer step `bad_step`: stop, or roll back (nan_policy).

    Nothing of the failed stretch is saved. Rolling back restores the latest checkpoint (the initial
    state when there is none) and multiplies the learning rate by rollback_lr_factor; the scale and
    the count are stored in later checkpoints, so a resumed run keeps them.
    """
    t = config.train
    ckpt.wait()  # the last save may still be in flight
    latest = ckpt.latest_step()
    where = f"step {bad_step} (epoch {pos['epoch'] + 1})"
    last = ("no checkpoint yet" if latest is None
            else f"the last good checkpoint is step {latest} in {ckpt.directory}")
    if t.nan_policy == "rollback" and pos["rollbacks"] < t.max_rollbacks:
        if latest is None:
            state, back = initial_state(), dict(epoch=0, batch=0)
        else:
            state, back = _restore(ckpt, latest, state)
        pos = dict(back, lr_scale=pos["lr_scale"] * t.rollback_lr_factor, rollbacks=pos["rollbacks"] + 1)
        logging.warning("non-finite loss or gradient at %s: rolled back to step %d (rollback %d of %d), "
                        "learning rate x %g", where, int(state.step), pos["rollbacks"], t.max_rollbacks,
                        pos["lr_scale"])
        return state, pos
    fix = ("train.max_rollbacks rollbacks did not help; lower train.lr" if t.nan_policy == "rollback"
           else "lower train.lr (or set train.nan_policy=rollback)")
    raise FloatingPointError(
        f"non-finite loss or gradient at {where}; {last}; nothing was saved after it. "
        f"To go on: {fix} and run the same command again, which resumes from the last checkpoint.")


def _write_json(path: str, obj: dict, chief: bool) -> None:
    if chief:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=_json_default)


def _check_workdir(ckpt: checkpoint_lib.Checkpointer, run_hash: str, identity: dict, workdir: str) -> None:
    latest = ckpt.latest_step()
    if latest is not None:
        checkpoint_lib.check_same_run(ckpt.meta(latest), run_hash, identity, workdir)


def _spec_for(config, spec: Optional[network.NetworkSpec], ds) -> network.NetworkSpec:
    if spec is None:
        return spec_from_config(config, ds.num_classes)
    if spec.num_classes != ds.num_classes:
        raise ValueError(f"spec.num_classes = {spec.num_classes} but data set {config.data.name!r} has "
                         f"{ds.num_classes} classes")
    return spec


def _steps_per_epoch(t, split) -> int:
    n = split.steps_per_epoch(t.batch_size, drop_remainder=True)
    if t.steps_per_epoch:
        n = min(n, t.steps_per_epoch)
    if n == 0:
        raise ValueError(f"{split.name} has {split.num_examples} examples, fewer than one batch of "
                         f"train.batch_size = {t.batch_size}; lower the batch size")
    return n


def _resume(ckpt: checkpoint_lib.Checkpointer, state: TrainState, writer) -> tuple[TrainState, dict]:
    """The latest checkpoint's state and loop position (epoch, batches of it done, learning-rate scale,
    rollbacks so far), or `state` at the start."""
    latest = ckpt.latest_step()
    if latest is None:
        return state, dict(epoch=0, batch=0, lr_scale=1.0, rollbacks=0)
    state, pos = _restore(ckpt, latest, state)
    writer.truncate_after(int(state.step))  # lines logged after the checkpoint are logged again
    logging.info("resumed from %s at epoch %d, batch %d (step %d)", ckpt.directory, pos["epoch"], pos["batch"],
                 int(state.step))
    return state, pos


def _log_window(writer, state: TrainState, epoch: int, rate, window: list) -> dict:
    """Writes the mean of a window of step metrics; returns the progress bar's postfix."""
    mean = {k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"}
    mean["drop_path"] = float(rate)
    writer.write(int(state.step), epoch, "train", mean)
    return dict(loss=f"{mean['loss']:.3f}", top1=f"{mean['top1']:.3f}")


@config_lib.validates
def train_and_evaluate(config, workdir: str, *, spec: Optional[network.NetworkSpec] = None,
                       masks: Any = None, epoch_hooks: Iterable[EpochHook] = ()) -> dict:
    """Trains for config.train.epochs (resuming from workdir), tests, writes workdir/results.json.

    Args:
      config: the experiment config (validated first, unless the run calling this already did).
      workdir: output directory; a rerun of the same config resumes from its latest checkpoint.
      spec: the network; None builds config.model.genotype (spec_from_config).
      masks: fixed weight masks for a masked spec (MGAS retraining), as in create_train_state.
      epoch_hooks: functions called as fn(epoch, state) after each epoch's checkpoint (tests use one
        to interrupt a run).
    Returns:
      the results dict: {'test': {'top1', 'top5', 'loss'}, 'val': {...} (when there is a validation
      split), 'params': {'dense', 'nonzero'}, 'epochs', 'steps', 'config_hash', 'config'}.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    chief = jax.process_index() == 0
    t = config.train
    run_hash, identity = run_identity(config, spec, masks)
    # closed in reverse order on the way out: an interrupted run still finishes writing its last checkpoint
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(contextlib.closing(
            checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints)))
        _check_workdir(ckpt, run_hash, identity, workdir)  # before data loading and compilation
        ds = data_lib.load(config.data, process_index=jax.process_index(), process_count=jax.process_count())
        spec = _spec_for(config, spec, ds)
        mesh = parallel.make_mesh()
        steps_per_epoch = _steps_per_epoch(t, ds.train)
        schedule, tx = learning_rate_schedule(config, steps_per_epoch), make_optimizer(config, steps_per_epoch)
        initial_state = functools.partial(create_train_state, config, spec, jax.random.key(config.seed),
                                          ds.image_shape, tx=tx, masks=masks, mesh=mesh)
        model = network.Network(spec)
        p_train_step = make_train_step(config, model, tx, schedule, ds.mean, ds.std, mesh)
        p_eval_step = make_eval_step(model, ds.mean, ds.std, mesh)
        evaluate_on = functools.partial(evaluate, p_eval_step, batch_size=t.eval_batch_size, mesh=mesh)
        writer = stack.enter_context(contextlib.closing(metrics.MetricWriter(workdir, enabled=chief)))
        state, pos = _resume(ckpt, initial_state(), writer)
        _write_json(os.path.join(workdir, "config.json"), {"config_hash": run_hash, "config": config.to_dict()}, chief)

        def save(state, pos, wait=False):
            # The save copies the state to the host before returning; the write runs in the background.
            ckpt.save(int(state.step), state, dict(pos, step=int(state.step), config_hash=run_hash, config=identity))
            if wait:
                ckpt.wait()
            return ckpt.directory

        stop = stack.enter_context(checkpoint_lib.StopSignals())
        while pos["epoch"] < t.epochs:
            epoch = pos["epoch"]
            rate = jnp.asarray(config.model.drop_path * epoch / t.epochs, jnp.float32)  # DARTS: 0 in epoch 1
            lr_scale = jnp.asarray(pos["lr_scale"], jnp.float32)
            run = loop.run_epoch(
                state, lambda state, i, batch: p_train_step(state, parallel.shard_batch(batch, mesh), rate, lr_scale),
                ds.train.batches(t.batch_size, epoch=epoch, seed=config.seed, shuffle=True, drop_remainder=True),
                start=pos["batch"], total=steps_per_epoch, stop=stop,
                save=lambda state, end, _: save(state, dict(pos, batch=end), wait=True),
                where=f"training stopped at epoch {epoch + 1}", desc=f"epoch {epoch + 1}/{t.epochs}",
                show=t.progress and chief, check_every=t.log_every_steps,
                on_check=lambda state, window: _log_window(writer, state, epoch, rate, window))
            state = run.state
            if run.bad is not None:
                state, pos = _non_finite(config, ckpt, state, pos, int(state.step) - (run.end - run.bad), initial_state)
                writer.truncate_after(int(state.step))
                continue
            if t.eval_every_epochs and (epoch + 1) % t.eval_every_epochs == 0 and ds.val.num_examples:
                writer.write(int(state.step), epoch, "val", evaluate_on(state, ds.val))
            pos = dict(pos, epoch=epoch + 1, batch=0)
            save(state, pos)
            for hook in epoch_hooks:
                hook(epoch + 1, state)
            if stop.requested:
                ckpt.wait()
                raise checkpoint_lib.Preempted(f"{stop.signal}: training stopped after epoch {epoch + 1} and "
                                               f"checkpointed it in {ckpt.directory}; run the same command again to resume")
        ckpt.wait()
        results = {"test": evaluate_on(state, ds.test)}
        if ds.val.num_examples:
            results["val"] = evaluate_on(state, ds.val)
        results["params"] = network.count_params(jax.device_get(state.params), jax.device_get(state.masks) or None)
        results.update(epochs=t.epochs, steps=int(state.step), rollbacks=pos["rollbacks"], config_hash=run_hash,
                       config=json.loads(json.dumps(config.to_dict(), default=_json_default)))
        if not writer.logged(int(state.step), "test"):  # a rerun of a finished run has logged it
            writer.write(int(state.step), t.epochs - 1, "test", results["test"])
    _write_json(os.path.join(workdir, "results.json"), results, chief)
    logging.info("test top1 %.4f top5 %.4f loss %.4f; params %s", results["test"]["top1"],
                 results["test"]["top5"], results["test"]["loss"], results["params"])
    return results
