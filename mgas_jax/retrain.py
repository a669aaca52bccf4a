"""Retraining exported MGAS architectures from scratch (mode=retrain), and the whole pipeline (mode=all).

docs/method.md section 6: the derived network keeps every op whose committed mask is 1, with its
per-op channel counts and its weight masks; it is retrained from scratch with the masks fixed (pruned
weights stay exactly zero), BN after the pools, an auxiliary head when `config.model.auxiliary`, and the
config's `train.*` protocol (CIFAR-10: 600 epochs, batch 96, SGD 0.025 cosine, ...).

    results = retrain.retrain(config, workdir)       # every workdir/search/export/arch_*.json
    results = retrain.retrain_architecture(config, "w/search/export/arch_700000.json", "w/retrain/arch_700000")

Layout of a workdir (mode=all writes all of it; each part resumes on a rerun):

    workdir/search/                 mode=search: checkpoints, records/, export/arch_<target>.{json,npz}
    workdir/retrain/<name>/         one retraining per architecture: architecture.{json,npz} (a copy of
                                    the export), checkpoints/, metrics.jsonl, results.json
    workdir/retrain_result.json     {name: results} of the retrained architectures
    workdir/evaluation.json         mode=evaluate (evaluation.py)
    workdir/report/                 reports.py

The architecture fixes the network: `config.model.{init_channels, layers, genotype, stem_multiplier,
pool_bn}` are not used (pools are always followed by BN: the exported parameter counts include those BN
layers). `config.model.{auxiliary, auxiliary_weight, drop_path, dtype}` and `config.train.*` are.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mgas_jax import config as config_lib
from mgas_jax import data as data_lib
from mgas_jax import export, network, train

ARCH_JSON = "architecture.json"  # the copy of the export inside each retraining directory
ARCH_NPZ = "architecture.npz"


# ---------------------------------------------------------------------------------------------------
# Which architectures

def export_dir(workdir: str) -> str:
    """Where mode=search (run by mode=all in workdir/search) exports its architectures."""
    return os.path.join(workdir, "search", "export")


def target_of(path: str) -> int:
    """The target of an `arch_<target>.json` path (-1 for other names)."""
    m = re.search(r"arch_(\d+)\.json$", path)
    return int(m.group(1)) if m else -1


def resolve_architecture(name_or_path: str, workdir: str) -> str:
    """The JSON path of `config.export.architecture`.

    Accepted: a path (absolute or relative to the current directory), or a name in
    workdir/search/export with or without `.json` ("arch_700000", "arch_700000.json").
    """
    candidates = [name_or_path, os.path.join(export_dir(workdir), name_or_path)]
    if not name_or_path.endswith(".json"):
        candidates.append(os.path.join(export_dir(workdir), name_or_path + ".json"))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(export_dir(workdir), "arch_*.json")))
    raise FileNotFoundError(
        f"export.architecture = {name_or_path!r}: no such file (looked at {', '.join(candidates)}). "
        f"Exports in {export_dir(workdir)}: {', '.join(found) if found else 'none (run mode=search there first)'}")


def architecture_paths(config, workdir: str) -> list[str]:
    """`config.export.architecture`, or every arch_*.json in workdir/search/export (largest target first)."""
    if config.export.architecture:
        return [resolve_architecture(config.export.architecture, workdir)]
    paths = sorted(glob.glob(os.path.join(export_dir(workdir), "arch_*.json")), key=lambda p: -target_of(p))
    if not paths:
        raise FileNotFoundError(
            f"no exported architecture in {export_dir(workdir)}: run mode=search with --workdir={workdir}/search "
            f"(or mode=all with --workdir={workdir}), or name one with --config.export.architecture=<path.json>")
    return [os.path.abspath(p) for p in paths]


def architecture_name(path: str) -> str:
    """The retraining directory name of an architecture: its file name without .json."""
    return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------------------------------------------
# The retraining network and its size

def retraining_spec(config, record: dict) -> network.NetworkSpec:
    """The network a record is retrained as: its cells and widths, BN after pools, fixed weight masks,
    the auxiliary head per config.model.auxiliary, compute dtype per config.model.dtype."""
    dtype = None if config.model.dtype == "float32" else jnp.dtype(config.model.dtype)
    return export.network_spec(record, auxiliary=bool(config.model.auxiliary), dtype=dtype)


def rebuilt_params(spec: network.NetworkSpec, input_shape: Sequence[int], masks: dict) -> dict:
    """{'dense', 'nonzero'} parameters of Network(spec) with `masks` (auxiliary head excluded); no compute."""
    x = jax.ShapeDtypeStruct((1,) + tuple(int(s) for s in input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), jnp.zeros(x.shape, x.dtype),
                                                               train=False))
    return network.count_params(shapes["params"], masks)


def check_params(record: dict, counts: dict, where: str) -> None:
    """Raises ExportError unless `counts` equal the record's {'dense', 'nonzero'} parameters."""
    recorded = {k: int(record["params"][k]) for k in ("dense", "nonzero")}
    got = {k: int(counts[k]) for k in ("dense", "nonzero")}
    if got != recorded:
        raise export.ExportError(
            f"{where}: the rebuilt network has {got['dense']} dense / {got['nonzero']} non-zero parameters, but "
            f"the architecture records {recorded['dense']} dense / {recorded['nonzero']} non-zero (auxiliary head "
            f"excluded). The export and this code disagree on the network; re-export it with this version.")


def flops(spec: network.NetworkSpec, input_shape: Sequence[int], masks: Optional[dict]) -> dict:
    """Multiply-adds per image: {'dense': all conv/linear weights, 'nonzero': only unmasked weights}."""
    return {"dense": network.count_flops(spec, input_shape),
            "nonzero": network.count_flops(spec, input_shape, masks)}


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
    record = dict(record, masks=ARCH_NPZ, source=os.path.abspath(json_path))
    files = {ARCH_JSON: export.json_bytes(record), ARCH_NPZ: npz}
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
    return os.path.join(workdir, ARCH_JSON)


def _check_data(record: dict, ds, where: str) -> None:
    if tuple(record["input_shape"]) != tuple(ds.image_shape) or int(record["num_classes"]) != ds.num_classes:
        raise export.ExportError(
            f"{where} was searched on {tuple(record['input_shape'])} images with {record['num_classes']} classes, "
            f"but data.name = {ds.name!r} gives {tuple(ds.image_shape)} images with {ds.num_classes} classes; "
            f"retrain it on the data set it was searched on")


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
    config_lib.validate(config)
    json_path = os.path.abspath(json_path)
    record, _, masks = export.load_architecture(json_path)
    if ds is None:
        ds = data_lib.load(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    _check_data(record, ds, json_path)
    spec = retraining_spec(config, record)
    # Before any training: the network we are about to train must be the one that was exported.
    check_params(record, rebuilt_params(spec, record["input_shape"], masks), json_path)
    _copy_architecture(json_path, workdir)
    logging.info("retraining %s (%d non-zero / %d dense params) in %s", json_path, record["params"]["nonzero"],
                 record["params"]["dense"], workdir)

    results = train.train_and_evaluate(config, workdir, spec=spec, masks=masks)

    # ... and after it: the trained state (its params and masks) still has the recorded counts.
    check_params(record, results["params"], f"{json_path} after retraining in {workdir}")
    results["flops"] = flops(spec, record["input_shape"], masks)
    results["architecture"] = dict(path=json_path, name=architecture_name(json_path), target=record.get("target"),
                                   index=record.get("index"), params=record["params"],
                                   baseline=record.get("baseline"))
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, "results.json"), results)
    return results


def retrain(config, workdir: str, architectures: Optional[Sequence[str]] = None) -> dict:
    """mode=retrain: retrains each architecture in workdir/retrain/<name> (see `architecture_paths`).

    Args:
      config: the experiment config.
      workdir: the run's directory (the search in workdir/search).
      architectures: JSON paths to retrain; default `architecture_paths(config, workdir)`.
    Returns:
      {name: results of retrain_architecture}; also written to workdir/retrain_result.json.
    """
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    paths = architecture_paths(config, workdir) if architectures is None else [os.path.abspath(p) for p in architectures]
    ds = data_lib.load(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    out = {}
    for path in paths:
        name = architecture_name(path)
        out[name] = retrain_architecture(config, path, os.path.join(workdir, "retrain", name), ds=ds)
        logging.info("%s: test top1 %.4f, %d non-zero params, %d non-zero multiply-adds", name,
                     out[name]["test"]["top1"], out[name]["params"]["nonzero"], out[name]["flops"]["nonzero"])
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, "retrain_result.json"), out)
    return out


# ---------------------------------------------------------------------------------------------------
# mode=all

def run_all(config, workdir: str) -> dict:
    """mode=all: search -> retrain every exported target -> evaluate -> reports, in sub-folders of workdir.

    Each part resumes: the search from its checkpoints (a finished search only re-exports, which finds
    the same files), each retraining from its own, evaluation and reports are recomputed.
    Returns {'search': summary, 'retrain': {name: test/params/flops}, 'evaluation', 'report'}.
    """
    from mgas_jax import evaluation, reports, search  # lazy: mode=retrain never imports the search
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    searched = search.search(config, os.path.join(workdir, "search"))
    exported = [v["path"] for _, v in sorted(searched["summary"].items(), key=lambda kv: -int(kv[0]))
                if "path" in v]
    for target, v in searched["summary"].items():
        if "error" in v:
            logging.warning("target %s not exported: %s", target, v["error"])
    retrained = retrain(config, workdir, exported) if exported else {}
    evaluated = evaluation.evaluate(config, workdir) if exported else {}
    report = reports.write_reports(workdir)
    result = dict(search=searched["summary"],
                  retrain={k: {f: r[f] for f in ("test", "params", "flops")} for k, r in retrained.items()},
                  evaluation=evaluated, report=report)
    if jax.process_index() == 0:
        export.write_json(os.path.join(workdir, "all_result.json"), result)
    return result
