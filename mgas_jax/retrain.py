"""Retraining exported MGAS architectures from scratch (mode=retrain).

docs/method.md section 6: the derived network keeps every op whose committed mask is 1, with its
per-op channel counts and its weight masks; it is retrained from scratch with the masks fixed (pruned
weights stay exactly zero), BN after the pools, an auxiliary head when `config.model.auxiliary`, and the
config's `train.*` protocol (CIFAR-10: 600 epochs, batch 96, SGD 0.025 cosine, ...).

    results = retrain.retrain(config, workdir)       # every workdir/search/export/arch_*.json
    results = retrain.retrain_architecture(config, "w/search/export/arch_700000.json", "w/retrain/arch_700000")

Each architecture is retrained in workdir/retrain/<name>/ (the layout: workdirs.py) and resumes there
on a rerun. The architecture fixes the network: `config.model.{init_channels, layers, genotype,
stem_multiplier, pool_bn}` are not used (pools are always followed by BN: the exported parameter counts
include those BN layers). `config.model.{auxiliary, auxiliary_weight, drop_path, dtype}` and
`config.train.*` are.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
from absl import logging

from mgas_jax import config as config_lib
from mgas_jax import data as data_lib
from mgas_jax import export, train, workdirs


# ---------------------------------------------------------------------------------------------------
# Retraining

def _copy_architecture(json_path: str, workdir: str) -> str:
    """Copies the export into workdir as architecture.{json,npz} (the retraining is then self-contained).

    A workdir already holding another architecture is refused: its checkpoints belong to that one.
    """
    with open(json_path) as f:
        record = json.load(f)
    with open(os.path.join(os.path.dirname(json_path), record["masks"]), "rb") as f:
        npz = f.read()
    record = dict(record, masks=workdirs.ARCH_NPZ, source=os.path.abspath(json_path))
    files = {workdirs.ARCH_JSON: export.json_bytes(record), workdirs.ARCH_NPZ: npz}
    os.makedirs(workdir, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(workdir, name)
        if jax.process_index() != 0 and not os.path.exists(path):
            continue  # process 0 writes it; the others only check a copy already there
        try:
            export.write_once(path, data)  # a moved workdir still resumes (export.same_content)
        except export.ExportError:
            raise export.ExportError(
                f"{workdir} already retrains another architecture ({path} differs from {json_path}); use "
                f"another workdir for {json_path}, or delete {workdir} to discard the old retraining") from None
    return os.path.join(workdir, workdirs.ARCH_JSON)


def _check_data(record: dict, ds, where: str) -> None:
    if tuple(record["input_shape"]) != tuple(ds.image_shape) or int(record["num_classes"]) != ds.num_classes:
        raise export.ExportError(
            f"{where} was searched on {tuple(record['input_shape'])} images with {record['num_classes']} classes, "
            f"but data.name = {ds.name!r} gives {tuple(ds.image_shape)} images with {ds.num_classes} classes; "
            f"retrain it on the data set it was searched on")


@config_lib.validates
def retrain_architecture(config, json_path: str, workdir: str, *, ds=None) -> dict:
    """Retrains one exported architecture from scratch in `workdir` (resuming), tests it.

    Args:
      config: the experiment config (train.*, model.auxiliary/drop_path/dtype, data.*).
      json_path: an export-format JSON (mode=search's arch_<target>.json, or a baseline's).
      workdir: the retraining directory (checkpoints, metrics.jsonl, results.json).
      ds: the loaded data set, to check the record against (default: loaded here from config.data).
    Returns:
      train.train_and_evaluate's results plus 'flops' {'dense', 'nonzero'} (multiply-adds per image),
      'architecture' {'path', 'name', 'target', 'index', 'params'}; also written to workdir/results.json.
    Raises:
      export.ExportError: the rebuilt network's parameter counts differ from the record's, the record does
        not fit the data set, or workdir retrains another architecture.
    """
    json_path = os.path.abspath(json_path)
    record, _, masks = export.load_architecture(json_path)
    if ds is None:
        ds = data_lib.load(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    _check_data(record, ds, json_path)
    spec = export.retraining_spec(config, record)
    # Before any training: the network we are about to train must be the one that was exported.
    export.check_params(record, export.rebuilt_params(spec, record["input_shape"], masks), json_path)
    _copy_architecture(json_path, workdir)
    logging.info("retraining %s (%d non-zero / %d dense params) in %s, run hash %s", json_path,
                 record["params"]["nonzero"], record["params"]["dense"], workdir,
                 train.run_identity(config, spec, masks)[0])

    results = train.train_and_evaluate(config, workdir, spec=spec, masks=masks)

    # ... and after it: the trained state (its params and masks) still has the recorded counts.
    export.check_params(record, results["params"], f"{json_path} after retraining in {workdir}")
    results["flops"] = export.flops(spec, record["input_shape"], masks)
    results["architecture"] = dict(path=json_path, name=workdirs.architecture_name(json_path),
                                   target=record.get("target"), index=record.get("index"), params=record["params"],
                                   baseline=record.get("baseline"))
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, workdirs.RESULTS), results)
    return results


@config_lib.validates
def retrain(config, workdir: str, architectures: Optional[Sequence[str]] = None) -> dict:
    """mode=retrain: retrains each architecture in workdir/retrain/<name> (see `workdirs.architecture_paths`).

    Args:
      config: the experiment config.
      workdir: the run's directory (the search in workdir/search).
      architectures: JSON paths to retrain; default every export of the workdir's search, or
        config.export.architecture (`workdirs.architecture_paths`).
    Returns:
      {name: results of retrain_architecture}; also written to workdir/retrain_result.json.
    """
    workdir = os.path.abspath(workdir)
    if architectures is None:
        paths = workdirs.architecture_paths(workdir, config.export.architecture)
    else:
        paths = [os.path.abspath(p) for p in architectures]
    ds = data_lib.load(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    out = {}
    for path in paths:
        name = workdirs.architecture_name(path)
        out[name] = retrain_architecture(config, path, workdirs.retrain_dir(workdir, name), ds=ds)
        logging.info("%s: test top1 %.4f, %d non-zero params, %d non-zero multiply-adds", name,
                     out[name]["test"]["top1"], out[name]["params"]["nonzero"], out[name]["flops"]["nonzero"])
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, workdirs.RETRAIN_RESULT), out)
    return out
