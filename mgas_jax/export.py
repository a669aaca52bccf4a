"""Architectures out of a search: records of the final phase and the exports at target sizes.

A record is a self-describing JSON (format `mgas-architecture/1`) plus an `.npz` of weight masks:

    {"format", "index", "epoch", "seed", "config", "num_classes", "stem_channels", "input_shape",
     "cells": [...per-cell ops with channel widths (genotype.cells_to_json)...],
     "counts": {"ops", "filters", "filters_total", "weights", "weights_total"},
     "params": {"dense", "nonzero"},           # of the derived evaluation network, auxiliary head excluded
     "val_accuracy", "masks": "<file>.npz"}

The npz maps `cell_{i}/op_{node}_{src}_{op}/.../kernel` (the evaluation network's parameter paths,
`names.py`, joined by '/') to
0/1 masks; `load_architecture` turns both back into a NetworkSpec's cells and a `masks` collection.
Files are written atomically (temporary file + rename); an export that exists with other content is
never overwritten (docs/method.md section 6: nothing is lost).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mgas_jax import genotype as genotype_lib
from mgas_jax import names, network, pruning, supernet

FORMAT = "mgas-architecture/1"


class ExportError(ValueError):
    """An export or record that does not match its network, or would overwrite other content."""


# ----------------------------------------------------------------------------------------------
# Atomic files

def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def same_content(old: bytes, new: bytes) -> bool:
    """Whether two files of an export hold the same thing.

    A JSON record's provenance (its "source" and its baseline's "source": absolute paths of the file it
    was made from) is not content: a workdir or study moved elsewhere rewrites the same records with
    other paths, and must resume rather than be refused. Everything else must match exactly.
    """
    if old == new:
        return True
    try:
        a, b = json.loads(old), json.loads(new)
    except ValueError:  # npz bytes, or a damaged file
        return False
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    for record in (a, b):
        record.pop("source", None)
        if isinstance(record.get("baseline"), dict):
            record["baseline"].pop("source", None)
    return a == b


def write_once(path: str, data: bytes) -> None:
    """Write, unless the file already holds this content (`same_content`); refuse to replace other content."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            if same_content(f.read(), data):
                return
        raise ExportError(f"{path} exists with different content; an export is never overwritten. Move it "
                          f"away (or use another workdir) if you mean to replace it.")
    _atomic_write(path, data)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, default=_plain) + "\n").encode()


def _plain(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (replaces: for run summaries, not for exports)."""
    _atomic_write(path, json_bytes(obj))


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v, np.uint8) for k, v in sorted(arrays.items())})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Deriving the final network

def _dead(masks: dict, cell_idx: int, o) -> bool:
    """An op whose inner or output filters are all committed off outputs exactly zero."""
    for unit in names.conv_units(o.op):
        path = names.gate(names.op_path(cell_idx, o) + unit)
        if names.has_path(masks, path) and float(np.sum(names.get_path(masks, path))) == 0.0:
            return True
    return False


def derive_cells(spec: supernet.SuperNetSpec, masks: dict) -> tuple:
    """Cells of the final network: every op whose committed mask is 1, with its widths (section 6).

    Ops whose filters are all committed off are dropped too (they output exactly zero), unless the
    op is the last one into its node.
    """
    cells = []
    on = pruning.committed_ops(masks, spec)
    for i, cell in enumerate(spec.cells):
        keep = []
        for node in range(cell.steps):
            into = tuple(o for o in cell.ops_into(node) if on[i][o.edge, o.op_index] > 0)
            alive = [o for o in into if not _dead(masks, i, o)]
            keep.extend(alive if alive else into[:1])
        order = lambda o: (o.node, o.src, o.op_index)
        cells.append(dataclasses.replace(cell, ops=tuple(sorted(keep, key=order))))
    return tuple(cells)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, path))
        else:
            out[path] = v
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def derived_masks(masks: dict, record: dict, *, weight_level: bool = True) -> dict:
    """Weight masks of the derived network: {kernel path: 0/1 array} for its sep/dil kernels.

    A search without the weight level (search.weight_level = False, the op-level baseline) has no
    weight masks: then every kernel of the derived network gets an all-ones mask, so that its export
    has the format retraining reads. With the weight level a missing mask stays missing (and the
    record's check reports it).
    """
    cells = genotype_lib.cells_from_json(record["cells"])
    out = {}
    if not weight_level:
        return {p: np.ones(v.shape, np.uint8) for p, v in _flat(_network_shapes(record).get("masks", {})).items()}
    for i, cell in enumerate(cells):
        for o in cell.ops:
            base = names.op_path(i, o)
            if not names.has_path(masks, base):
                continue
            for path, m in _flat(names.get_path(masks, base), "/".join(base)).items():
                if names.is_kernel(path.split("/")):
                    out[path] = np.asarray(m)
    return out


def network_spec(record: dict, *, auxiliary: bool = False, **kwargs) -> network.NetworkSpec:
    """The evaluation network of a record: its cells, BN after pools, fixed weight masks."""
    return network.NetworkSpec(cells=genotype_lib.cells_from_json(record["cells"]),
                               num_classes=int(record["num_classes"]), stem_channels=int(record["stem_channels"]),
                               auxiliary=auxiliary, pool_bn=True, masked=True, **kwargs)


def variable_shapes(spec: network.NetworkSpec, input_shape: Sequence[int]) -> dict:
    """The variable shapes (params, batch_stats, masks) of Network(spec) on (H, W, C) inputs; no compute.

    An abstract trace costs ~1-2 s for a digits network, and the budget-true final phase asks for the
    same structures again and again (units of weights leave it unchanged): structures are cached.
    """
    shapes = _variable_shapes(dataclasses.replace(spec, impl="lax"), tuple(int(s) for s in input_shape))
    return jax.tree.map(lambda x: x, shapes)  # a fresh tree: callers may edit theirs


@functools.lru_cache(maxsize=512)
def _variable_shapes(spec: network.NetworkSpec, input_shape: tuple) -> dict:
    # the lax formulation of the depthwise convs: the same variables as every other, the fastest to trace
    x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
    return jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), jnp.zeros(x.shape, x.dtype),
                                                             train=False))


def _network_shapes(record: dict) -> dict:
    """The variable shapes (params, batch_stats, masks) of the record's network, without computing them."""
    return variable_shapes(network_spec(record), record["input_shape"])


def network_params(record: dict, masks_flat: dict) -> dict:
    """{'dense', 'nonzero'} parameters of the record's network (auxiliary head excluded)."""
    shapes = _network_shapes(record)
    check_masks(shapes.get("masks", {}), masks_flat, where="the record")
    return network.count_params(shapes["params"], _nest(masks_flat))


def check_masks(expected_tree: dict, masks_flat: dict, where: str) -> None:
    """Every mask must match a kernel of the network, with its shape, and every kernel needs a mask."""
    expected = {p: tuple(v.shape) for p, v in _flat(expected_tree).items()}
    given = {p: tuple(np.shape(v)) for p, v in masks_flat.items()}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    wrong = sorted(p for p in set(expected) & set(given) if expected[p] != given[p])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"no mask for {len(missing)} kernels (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} masks for kernels the network does not have (e.g. {extra[0]})")
        if wrong:
            p = wrong[0]
            parts.append(f"{len(wrong)} masks of the wrong shape (e.g. {p}: {given[p]} vs kernel {expected[p]})")
        raise ExportError(f"the weight masks of {where} do not match its network: " + "; ".join(parts) +
                          ". Use the .npz written with this JSON by the same search.")


def make_record(spec: supernet.SuperNetSpec, masks: dict, input_shape, *, index: int, epoch: int, config: dict,
                seed: int, val_accuracy: float, stem_channels: int) -> dict:
    """The JSON record of the current architecture (see module doc)."""
    rec = _derived(spec, masks, input_shape, stem_channels)
    rec = dict(rec, format=FORMAT, index=int(index), epoch=int(epoch), seed=int(seed), config=config,
               counts=pruning.count_units(dataclasses.replace(spec, cells=genotype_lib.cells_from_json(rec["cells"])),
                                          masks),
               val_accuracy=None if val_accuracy != val_accuracy else float(val_accuracy))
    rec["params"] = network_params(rec, derived_masks(masks, rec, weight_level=spec.weight_level))
    return rec


def _derived(spec: supernet.SuperNetSpec, masks: dict, input_shape, stem_channels: int) -> dict:
    """The fields of a record that fix its network: classes, stem, input shape, derived cells."""
    return dict(num_classes=int(spec.num_classes), stem_channels=int(stem_channels),
                input_shape=[int(s) for s in input_shape],
                cells=genotype_lib.cells_to_json(derive_cells(spec, masks)))


def record_params(spec: supernet.SuperNetSpec, masks: dict, input_shape, stem_channels: int) -> dict:
    """{'dense', 'nonzero'} parameters a record of this (committed, dropped and shrunk) state would
    report, without writing it: what the budget-true final phase aims at (budget.py)."""
    rec = _derived(spec, masks, input_shape, stem_channels)
    return network_params(rec, derived_masks(masks, rec, weight_level=spec.weight_level))


def write_record(directory: str, record: dict, masks_flat: dict) -> str:
    """Write commit_{index:03d}.json and .npz; returns the JSON path."""
    name = f"commit_{record['index']:03d}"
    rec = dict(record, masks=f"{name}.npz")
    write_once(os.path.join(directory, f"{name}.npz"), npz_bytes(masks_flat))
    path = os.path.join(directory, f"{name}.json")
    write_once(path, json_bytes(rec))
    return path


# ----------------------------------------------------------------------------------------------
# Exports at target sizes

def export_targets(records_dir: str, records: list, targets: list, out_dir: str,
                   budget: str = "nonzero") -> dict:
    """For each target parameter budget, export the first record at or below it.

    Records are in commit order, so sizes fall; the first at or below a budget is the largest network
    that fits it. Returns {str(target): {'path', 'params', 'index'} or {'error'}}.
    """
    summary = {}
    for target in targets:
        hit = next((r for r in records if r["params"][budget] <= target), None)
        if hit is None:
            smallest = min((r["params"][budget] for r in records), default=None)
            summary[str(target)] = dict(error=f"no recorded architecture has <= {target} {budget} parameters "
                                              f"(smallest: {smallest}); run the final phase longer "
                                              f"(search.final_max_epochs) or lower search.final_size_floor")
            continue
        # The record's own directory, not its stored absolute path: a moved workdir still exports.
        with open(os.path.join(records_dir, os.path.basename(hit["path"])), "rb") as f:
            rec = json.loads(f.read())
        with open(os.path.join(records_dir, rec["masks"]), "rb") as f:
            npz = f.read()
        name = f"arch_{int(target)}"
        rec = dict(rec, target=int(target), budget=budget, masks=f"{name}.npz")
        write_once(os.path.join(out_dir, f"{name}.npz"), npz)
        write_once(os.path.join(out_dir, f"{name}.json"), json_bytes(rec))
        summary[str(target)] = dict(path=os.path.join(out_dir, f"{name}.json"), params=hit["params"],
                                    index=hit["index"])
    return summary


def load_architecture(json_path: str) -> tuple[dict, network.NetworkSpec, dict]:
    """(record, evaluation NetworkSpec, nested `masks` collection) of an exported architecture.

    Raises ExportError naming the problem when the JSON is not an MGAS export or its masks do not
    fit its network.
    """
    try:
        with open(json_path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read the architecture {json_path}: {e}. Pass a .json written by mode=search "
                          f"(workdir/export/arch_<target>.json)") from e
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ExportError(f"{json_path} is not an MGAS architecture (format {FORMAT!r} expected, found "
                          f"{rec.get('format') if isinstance(rec, dict) else type(rec).__name__!r})")
    spec = network_spec(rec)
    mask_path = os.path.join(os.path.dirname(json_path), rec["masks"])
    try:
        with np.load(mask_path) as z:
            flat = {k: z[k].astype(np.float32) for k in z.files}
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the weight masks {mask_path} of {json_path}: {e}") from e
    check_masks(variable_shapes(spec, rec["input_shape"]).get("masks", {}), flat, where=json_path)
    return rec, spec, _nest(flat)


def content_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The retraining network of a record and its size checks

def retraining_spec(config, record: dict) -> network.NetworkSpec:
    """The network a record is retrained as: its cells and widths, BN after pools, fixed weight masks,
    the auxiliary head per config.model.auxiliary, compute dtype per config.model.dtype."""
    dtype = None if config.model.dtype == "float32" else jnp.dtype(config.model.dtype)
    return network_spec(record, auxiliary=bool(config.model.auxiliary), dtype=dtype)


def rebuilt_params(spec: network.NetworkSpec, input_shape: Sequence[int], masks: dict) -> dict:
    """{'dense', 'nonzero'} parameters of Network(spec) with `masks` (auxiliary head excluded); no compute."""
    return network.count_params(variable_shapes(spec, input_shape)["params"], masks)


def check_params(record: dict, counts: dict, where: str) -> None:
    """Raises ExportError unless `counts` equal the record's {'dense', 'nonzero'} parameters."""
    recorded = {k: int(record["params"][k]) for k in ("dense", "nonzero")}
    got = {k: int(counts[k]) for k in ("dense", "nonzero")}
    if got != recorded:
        raise ExportError(
            f"{where}: the rebuilt network has {got['dense']} dense / {got['nonzero']} non-zero parameters, but "
            f"the architecture records {recorded['dense']} dense / {recorded['nonzero']} non-zero (auxiliary head "
            f"excluded). The export and this code disagree on the network; re-export it with this version.")


def flops(spec: network.NetworkSpec, input_shape: Sequence[int], masks: Optional[dict]) -> dict:
    """Multiply-adds per image: {'dense': all conv/linear weights, 'nonzero': only unmasked weights}."""
    return {"dense": network.count_flops(spec, input_shape),
            "nonzero": network.count_flops(spec, input_shape, masks)}
