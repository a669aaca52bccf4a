"""The two baselines MGAS is compared with at equal size.

1. **Operation level only** (`op_level_config`): the same search with filter- and weight-level search
   switched off (`search.filter_level = search.weight_level = False`): a DARTS-like sigmoid search with
   learned thresholds on ops only (docs/method.md sections 2-3 at one granularity). Its exports at the
   targets come out of mode=search as usual; their sizes follow from op removal alone.

2. **Fixed ratio** (`fixed_ratio_export`): an architecture's cells at full filter width (the op-level
   decisions kept, every filter back), pruned to the same number of non-zero parameters as an MGAS export
   by uniform magnitude pruning: one keep ratio r for every masked conv kernel (the depthwise and
   pointwise kernels of sep/dil convs, the ones MGAS prunes at the weight level), each layer keeping its
   round(r x size) largest-magnitude weights (at least one). The other parameters (stem, preprocess,
   FactorizedReduce, BN, classifier) stay dense, as they do in MGAS exports.

   Which magnitudes: by default those of a **freshly initialised** network (`params=None`; seeded, so
   reproducible) - with i.i.d. initial weights that is uniform-ratio random pruning at initialisation, the
   usual "fixed ratio" baseline of pruning-at-init studies. Pass `params` (a `params` collection of the
   full-width network, e.g. briefly trained) for magnitude pruning of trained weights instead.

   The result is an export-format JSON + npz (`export.FORMAT`) that retrain.py consumes like a search
   export; its `baseline` field records the source, the ratio and the magnitudes used.

    base = baselines.fixed_ratio_export("w/search/export/arch_20000.json", "w/fixed_ratio/export")
    results = retrain.retrain_architecture(config, base, "w/fixed_ratio/retrain/arch_20000")
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mgas_jax import export
from mgas_jax import genotype as genotype_lib
from mgas_jax import network, supernet


def op_level_config(config):
    """A copy of `config` whose search is operation level only (filter_level = weight_level = False)."""
    config = config.copy_and_resolve_references()
    config.search.filter_level = False
    config.search.weight_level = False
    return config


def full_width_cells(record: dict) -> tuple:
    """The record's cells with their ops, at the super-net's full width (every filter kept).

    The full width of each cell comes from the record's search config (search.init_channels, layers,
    steps; reduction cells double it); a record without one keeps each cell's own width.
    """
    cells = genotype_lib.cells_from_json(record["cells"])
    s = (record.get("config") or {}).get("search")
    full = None
    if s:
        full = supernet.full_cells(int(s["init_channels"]), int(s["layers"]), int(s["steps"]))
        if len(full) != len(cells) or any(f.reduction != c.reduction or f.steps != c.steps
                                          for f, c in zip(full, cells)):
            raise export.ExportError(f"the record's cells do not match its search config ({len(cells)} cells vs "
                                     f"search.layers = {s['layers']}, steps = {s['steps']})")
    out = []
    for i, c in enumerate(cells):
        width = full[i].width if full is not None else c.width
        out.append(dataclasses.replace(c, width=width, pre0_index=None, pre1_index=None,
                                       ops=tuple(dataclasses.replace(o, mid=None, out_index=None) for o in c.ops)))
    return tuple(out)


def uniform_keep_counts(sizes: list[int], budget: int) -> list[int]:
    """Per layer, how many weights to keep so that they sum to exactly `budget`, uniformly across layers.

    Every layer keeps 1 + its share of (budget - layers) in proportion to (size - 1), rounded by largest
    remainders: k_l / size_l is the same ratio r = budget / sum(sizes) up to one weight per layer.

    Raises:
      ValueError: budget < number of layers (each keeps one) or > sum(sizes).
    """
    sizes = [int(s) for s in sizes]
    if not len(sizes) <= budget <= sum(sizes):
        raise ValueError(f"cannot keep {budget} weights in {len(sizes)} layers of {sum(sizes)} weights "
                         f"(at least one per layer, at most all)")
    rest, room = budget - len(sizes), [s - 1 for s in sizes]
    total = sum(room)
    if total == 0:
        return [1] * len(sizes)
    quota = [rest * r / total for r in room]
    keep = [int(np.floor(q)) for q in quota]
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - keep[i]), i))
    for i in order[:rest - sum(keep)]:
        keep[i] += 1
    return [1 + k for k in keep]


def magnitude_masks(params: dict, kernel_paths: list[tuple], counts: list[int]) -> dict:
    """{'/'-joined path: 0/1 float32 mask} keeping each kernel's `count` largest-magnitude entries.

    Ties are broken by position (a stable sort), so the masks are deterministic.
    """
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, k in zip(kernel_paths, counts):
        w = np.abs(np.asarray(flat[path], np.float32)).ravel()
        keep = np.argsort(-w, kind="stable")[:k]
        m = np.zeros(w.size, np.float32)
        m[keep] = 1.0
        out["/".join(path)] = m.reshape(np.shape(flat[path]))
    return out


def _filters(cell: genotype_lib.CellSpec) -> int:
    """Output channels of a full-width cell's preprocess layers, pointwise convs and FactorizedReduce skips."""
    n = 2 * cell.width
    for o in cell.ops:
        if o.op.startswith("sep_conv"):
            n += 2 * cell.width
        elif o.op.startswith("dil_conv") or (o.op == "skip_connect" and cell.reduction and o.src < 2):
            n += cell.width
    return n


def fixed_ratio_export(source_json: str, out_dir: str, *, target: Optional[int] = None, seed: int = 0,
                       params: Optional[dict] = None, name: Optional[str] = None) -> str:
    """Writes the fixed-ratio baseline of an exported architecture; returns its JSON path.

    Args:
      source_json: an export-format JSON (an MGAS export, or the op-level baseline's).
      out_dir: where to write `<name>.json` and `<name>.npz`.
      target: non-zero parameters to match; default the source's own non-zero count.
      seed: seeds the fresh initialisation whose magnitudes decide the masks (when params is None).
      params: optional `params` collection of the full-width network to take magnitudes from instead.
      name: file name without extension; default the source's (e.g. arch_20000).
    Returns:
      the JSON path; its record has params['nonzero'] == target exactly, and a 'baseline' field
      {'kind': 'fixed_ratio', 'keep_ratio', 'source', 'source_params', 'magnitudes', 'seed'}.
    Raises:
      export.ExportError: the target cannot be met (the dense parameters outside the masked kernels
        already exceed it, or it exceeds the full-width network).
    """
    with open(source_json) as f:
        source = json.load(f)
    target = int(source["params"]["nonzero"] if target is None else target)
    cells = full_width_cells(source)
    spec = network.NetworkSpec(cells=cells, num_classes=int(source["num_classes"]),
                               stem_channels=int(source["stem_channels"]), pool_bn=True, masked=True)
    shape = (1,) + tuple(source["input_shape"])
    if params is None:
        magnitudes = "fresh initialisation (seed %d)" % seed
        variables = network.init_network(spec, jax.random.key(seed, impl="rbg"), shape)
        params = jax.device_get(variables["params"])
        mask_tree = jax.device_get(variables["masks"])
    else:
        magnitudes = "given parameters"
        params = jax.device_get(params.get("params", params))
        shapes = jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), jnp.zeros(shape), train=False))
        mask_tree = shapes["masks"]
    kernel_paths = sorted(traverse_util.flatten_dict(mask_tree))
    sizes = [int(np.prod(traverse_util.flatten_dict(mask_tree)[p].shape)) for p in kernel_paths]
    dense = network.count_params(params)["dense"]
    fixed = dense - sum(sizes)  # parameters no mask touches
    if not len(sizes) <= target - fixed <= sum(sizes):
        why = (f"{fixed} of them lie outside the {len(sizes)} prunable conv kernels (which keep at least one "
               f"weight each)" if target - fixed < len(sizes) else "fewer than the target")
        raise export.ExportError(
            f"the fixed-ratio baseline of {source_json} cannot have {target} non-zero parameters: its full-width "
            f"network has {dense} parameters, {why}; uniform weight pruning alone cannot reach it")
    counts = uniform_keep_counts(sizes, target - fixed)
    masks_flat = magnitude_masks(params, kernel_paths, counts)

    record = {k: v for k, v in source.items() if k not in ("masks", "params", "counts", "val_accuracy")}
    record.update(cells=genotype_lib.cells_to_json(cells), val_accuracy=None, budget="nonzero",
                  target=source.get("target", target))
    kept_filters = sum(_filters(c) for c in cells)
    record["counts"] = dict(ops=sum(len(c.ops) for c in cells), filters=kept_filters, filters_total=kept_filters,
                            weights=int(sum(counts)), weights_total=int(sum(sizes)))
    record["baseline"] = dict(kind="fixed_ratio", keep_ratio=(target - fixed) / sum(sizes),
                              source=os.path.abspath(source_json), source_params=source["params"],
                              magnitudes=magnitudes, seed=int(seed))
    name = name or os.path.splitext(os.path.basename(source_json))[0]
    record["masks"] = f"{name}.npz"
    record["params"] = export.network_params(record, masks_flat)
    if record["params"]["nonzero"] != target:  # the construction above makes this exact
        raise export.ExportError(f"fixed-ratio baseline: {record['params']['nonzero']} non-zero parameters, "
                                 f"target {target}")
    export.write_once(os.path.join(out_dir, f"{name}.npz"), export.npz_bytes(masks_flat))
    path = os.path.join(out_dir, f"{name}.json")
    export.write_once(path, export.json_bytes(record))
    return os.path.abspath(path)
