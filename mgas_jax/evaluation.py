"""mode=evaluate: accuracy, size, cost and speed of retrained (or just exported) networks.

    result = evaluation.evaluate(config, workdir)     # writes workdir/evaluation.json

For each model it reports

    test       {'top1', 'top5', 'loss'} on the test split of config.data (None for an untrained export)
    params     {'dense', 'nonzero'}, auxiliary head excluded (docs/method.md section 6)
    flops      {'dense', 'nonzero'} multiply-adds per image (network.count_flops; 'nonzero' skips masked weights)
    throughput {'images_per_s', 'batch_size', 'steps', 'platform'}: the jit-compiled inference forward pass,
               timed over evaluate.throughput_steps batches after evaluate.throughput_warmup untimed ones
               (masked weights are multiplied, not skipped: dense hardware speed, not a sparse kernel's)

Which models (the first rule that applies):

1. config.export.architecture: that architecture, with the checkpoint of workdir/retrain/<name> if
   there is one (else untrained: sizes and speed only);
2. every retraining in workdir/retrain/<name>/ (mode=retrain, mode=all), then every export of
   workdir/search/export that has none (untrained);
3. a mode=train run in workdir itself (workdir/checkpoints and workdir/config.json).

A checkpoint is restored with the network and optimizer of the config that wrote it (its config.json),
so evaluating with a config whose train.* differ (e.g. fewer epochs) still reads it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mgas_jax import checkpoint as checkpoint_lib
from mgas_jax import config as config_lib
from mgas_jax import data as data_lib
from mgas_jax import export, network, parallel, train, workdirs


@dataclasses.dataclass
class Model:
    """One network to evaluate.

    Attributes:
      name: its key in evaluation.json (the retraining directory's name).
      source: the architecture JSON, or the train workdir.
      record: the export record (None for a DARTS genotype trained by mode=train).
      masks: the fixed weight masks (`masks` collection) or None.
      run_dir: the directory of the training run (checkpoints/, config.json), or None (untrained).
    """
    name: str
    source: str
    record: Optional[dict]
    masks: Optional[dict]
    run_dir: Optional[str]


def _has_checkpoint(run_dir: str) -> bool:
    return (os.path.isfile(os.path.join(run_dir, workdirs.RUN_CONFIG))
            and bool(glob.glob(os.path.join(run_dir, workdirs.CHECKPOINTS, "[0-9]*"))))


def _load(path: str, name: str, run_dir: Optional[str] = None) -> Model:
    """The export or retraining copy at `path`; `run_dir` its retraining when that has a checkpoint."""
    record, _, masks = export.load_architecture(path)
    trained = run_dir is not None and _has_checkpoint(run_dir)
    return Model(name=name, source=path, record=record, masks=masks, run_dir=run_dir if trained else None)


def find_models(config, workdir: str) -> list[Model]:
    """The models mode=evaluate reports (see the module doc for the rules)."""
    workdir = os.path.abspath(workdir)
    if config.export.architecture:
        path = workdirs.resolve_architecture(config.export.architecture, workdir)
        name = workdirs.architecture_name(path)
        return [_load(path, name, workdirs.retrain_dir(workdir, name))]
    models = [_load(path, os.path.basename(os.path.dirname(path)), os.path.dirname(path))
              for path in workdirs.retrained(workdir)]
    seen = {m.name for m in models}
    for path in sorted(workdirs.exports(workdir)):
        name = workdirs.architecture_name(path)
        if name not in seen:
            models.append(_load(path, name))
    if not models and _has_checkpoint(workdir):
        models.append(Model(name=os.path.basename(workdir) or "model", source=workdir, record=None, masks=None,
                            run_dir=workdir))
    if not models:
        raise FileNotFoundError(
            f"nothing to evaluate in {workdir}: no retraining ({workdirs.RETRAIN}/<name>/{workdirs.ARCH_JSON}), "
            f"no export ({workdirs.export_dir(workdir)}/arch_*.json) and no mode=train checkpoint; run "
            f"mode=search, retrain or all there first, or name an export with "
            f"--config.export.architecture=<path.json>")
    models.sort(key=lambda m: -workdirs.target_of(m.name + ".json"))
    return models


def run_config(run_dir: str):
    """The config that wrote a training run (its config.json), as a ConfigDict."""
    with open(os.path.join(run_dir, workdirs.RUN_CONFIG)) as f:
        return ml_collections.ConfigDict(json.load(f)["config"])


def model_spec(model: Model, config, num_classes: int) -> network.NetworkSpec:
    """The network of a model as trained by `config` (its run's own config for a checkpoint)."""
    if model.record is not None:
        return export.retraining_spec(config, model.record)
    return train.spec_from_config(config, num_classes)


def restore(model: Model, spec: network.NetworkSpec, image_shape, mesh) -> tuple[train.TrainState, dict]:
    """(state, meta) of the latest checkpoint of model.run_dir, restored on `mesh`."""
    cfg = run_config(model.run_dir)
    # The optimizer state's structure depends on train.{grad_clip, weight_decay, momentum} only;
    # steps_per_epoch (inside the schedule) does not change it.
    tx = train.make_optimizer(cfg, 1)
    like = train.create_train_state(cfg, spec, jax.random.key(0), image_shape, tx=tx, masks=model.masks, mesh=mesh)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(model.run_dir, workdirs.CHECKPOINTS), max_to_keep=1_000_000)
    try:
        step = ckpt.latest_step()
        meta = ckpt.meta(step)
        state = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return state, meta


def throughput(spec: network.NetworkSpec, variables: dict, image_shape: Sequence[int], *, batch_size: int,
               warmup: int, steps: int, mesh) -> Optional[dict]:
    """Images per second of the jit-compiled inference forward pass on `mesh` (None when steps == 0).

    Args:
      variables: {'params', 'batch_stats'[, 'masks']}, replicated.
      image_shape: (H, W, C); the input is a normalised float32 batch (batch_size, H, W, C), split over
        the mesh's data axis (batch_size is rounded up to a multiple of the device count).
    """
    if steps <= 0:
        return None
    n_dev = mesh.size
    batch_size = -(-batch_size // n_dev) * n_dev
    model = network.Network(spec)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)[0],
                  in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)))
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((batch_size,) + tuple(image_shape)),
                                   jnp.float32), parallel.batch_sharding(mesh))
    for _ in range(max(1, warmup)):  # at least one: the compilation is not timed
        fwd(variables, x).block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        out = fwd(variables, x)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return dict(images_per_s=batch_size * steps / seconds, batch_size=batch_size, steps=steps, seconds=seconds,
                platform=jax.devices()[0].platform, devices=n_dev)


def evaluate_model(config, model: Model, ds, mesh) -> dict:
    """Accuracy (trained models), parameters, FLOPs and throughput of one model."""
    trained = model.run_dir is not None
    run_cfg = run_config(model.run_dir) if trained else config
    spec = model_spec(model, run_cfg, ds.num_classes)
    if model.record is not None:
        if tuple(model.record["input_shape"]) != tuple(ds.image_shape) or model.record["num_classes"] != ds.num_classes:
            raise export.ExportError(
                f"{model.source} is for {tuple(model.record['input_shape'])} images with {model.record['num_classes']} "
                f"classes; data.name = {ds.name!r} has {tuple(ds.image_shape)} and {ds.num_classes}")
    out: dict[str, Any] = dict(name=model.name, source=model.source, trained=trained, test=None)
    if trained:
        state, meta = restore(model, spec, ds.image_shape, mesh)
        p_eval = train.make_eval_step(network.Network(spec), ds.mean, ds.std, mesh)
        out["test"] = train.evaluate(p_eval, state, ds.test, batch_size=config.train.eval_batch_size, mesh=mesh)
        out.update(epoch=int(meta.get("epoch", 0)), step=int(meta.get("step", 0)),
                   epochs=int(run_cfg.train.epochs), run_dir=model.run_dir)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if state.masks:
            variables["masks"] = state.masks
    else:
        v = network.init_network(spec, jax.random.key(0, impl="rbg"), ds.image_shape)
        if model.masks is not None:
            v = dict(v, masks=jax.tree.map(jnp.asarray, model.masks))
            v["params"] = train.apply_masks(v["params"], v["masks"])
        variables = parallel.replicate(v, mesh)
    host = jax.device_get(variables)
    out["params"] = network.count_params(host["params"], host.get("masks"))
    if model.record is not None and model.record.get("params"):
        export.check_params(model.record, out["params"], model.source)
    out["flops"] = export.flops(spec, ds.image_shape, host.get("masks"))
    e = config.evaluate
    out["throughput"] = throughput(spec, variables, ds.image_shape, batch_size=e.throughput_batch_size,
                                   warmup=e.throughput_warmup, steps=e.throughput_steps, mesh=mesh)
    if model.record is not None:
        out["target"] = model.record.get("target")
        out["baseline"] = model.record.get("baseline")
    return out


@config_lib.validates
def evaluate(config, workdir: str) -> dict:
    """mode=evaluate: evaluates `find_models(config, workdir)`; writes and returns workdir/evaluation.json.

    Returns:
      {'models': {name: evaluate_model's dict}, 'data': data set name, 'split': 'test'}.
    """
    workdir = os.path.abspath(workdir)
    models = find_models(config, workdir)
    ds = data_lib.load(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    mesh = parallel.make_mesh()
    result = dict(data=ds.name, split="test", models={})
    for m in models:
        r = evaluate_model(config, m, ds, mesh)
        result["models"][m.name] = r
        top1 = "untrained" if r["test"] is None else f"top1 {r['test']['top1']:.4f} top5 {r['test']['top5']:.4f}"
        speed = "" if r["throughput"] is None else f", {r['throughput']['images_per_s']:.0f} images/s"
        logging.info("%s: %s; %d / %d params (non-zero / dense), %d multiply-adds%s", m.name, top1,
                     r["params"]["nonzero"], r["params"]["dense"], r["flops"]["nonzero"], speed)
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, workdirs.EVALUATION), result)
    return result
