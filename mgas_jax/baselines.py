"""The baselines MGAS is compared with at equal size.

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

3. **Random architecture** (`random_export`), the standard NAS sanity check: cells drawn at random from
   the same search space (as many ops per cell as the matched export, on random edges, every prunable
   width drawn at random), then pruned like the fixed-ratio baseline to exactly the matched export's
   non-zero count. If MGAS's search is worth its cost, its networks beat these at equal size.

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
from mgas_jax import network, ops as ops_lib, supernet


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

    Each layer's quota is r * size with r = budget / sum(sizes), apportioned by largest remainders; a
    layer whose quota is below one weight still keeps one (a layer with no weight would cut its op out
    of the network), taken back from the layers most over their quota. Every layer keeps 1..size, and
    when every quota is at least one weight, each layer keeps its quota's floor or ceiling.

    Raises:
      ValueError: budget < number of layers (each keeps one) or > sum(sizes).
    """
    sizes = [int(s) for s in sizes]
    if not len(sizes) <= budget <= sum(sizes):
        raise ValueError(f"cannot keep {budget} weights in {len(sizes)} layers of {sum(sizes)} weights "
                         f"(at least one per layer, at most all)")
    total = sum(sizes)
    quota = [budget * s / total for s in sizes]
    keep = [max(1, int(np.floor(q))) for q in quota]
    # Shares in proportion to the size itself, so every layer's keep ratio is the same to within a
    # weight; the floors sum to at most `budget` unless some quota is below one.
    while sum(keep) < budget:
        i = max((i for i in range(len(sizes)) if keep[i] < sizes[i]), key=lambda i: (quota[i] - keep[i], -i))
        keep[i] += 1
    while sum(keep) > budget:
        i = max((i for i in range(len(sizes)) if keep[i] > 1), key=lambda i: (keep[i] - quota[i], -i))
        keep[i] -= 1
    return keep


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


def parameter_split(spec: network.NetworkSpec, input_shape) -> tuple[int, list[int]]:
    """(parameters outside the masked kernels, the masked kernels' sizes) of an evaluation network.

    Read off the variable shapes of one abstract `init` of Network(spec) (jax.eval_shape: traced, not
    compiled; the lax formulation of the depthwise convs and pools, which traces fastest and makes the
    same variables): the kernels that carry a weight mask are the masked ones; every other parameter
    (auxiliary head excluded) is fixed.
    """
    shapes = export.variable_shapes(dataclasses.replace(spec, impl="lax"), input_shape)
    params = export._flat(shapes["params"])
    masked = [int(np.prod(params[p].shape)) for p in export._flat(shapes.get("masks", {}))
              if p in params and not p.startswith("aux_head/")]
    return network.count_params(shapes["params"])["dense"] - sum(masked), masked


def _pruned_export(source: dict, cells: tuple, out_dir: str, name: str, *, target: int, seed: int,
                   params: Optional[dict], what: str, baseline: dict) -> str:
    """Writes `cells`, uniformly magnitude-pruned to exactly `target` non-zero parameters, as an export.

    The record copies the source's fields (config, classes, stem, input shape, target) and records
    `baseline` (with the keep ratio and the magnitudes used) in its 'baseline' field.
    """
    spec = network.NetworkSpec(cells=cells, num_classes=int(source["num_classes"]),
                               stem_channels=int(source["stem_channels"]), pool_bn=True, masked=True)
    shape = (1,) + tuple(source["input_shape"])
    if params is None:
        magnitudes = "fresh initialisation (seed %d)" % seed
        variables = network.init_network(spec, jax.random.key(seed, impl="rbg"), shape)
        params = jax.device_get(variables["params"])
        mask_tree = jax.device_get(variables.get("masks", {}))
    else:
        magnitudes = "given parameters"
        params = jax.device_get(params.get("params", params))
        shapes = jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), jnp.zeros(shape), train=False))
        mask_tree = shapes.get("masks", {})
    kernel_paths = sorted(traverse_util.flatten_dict(mask_tree))
    sizes = [int(np.prod(traverse_util.flatten_dict(mask_tree)[p].shape)) for p in kernel_paths]
    dense = network.count_params(params)["dense"]
    fixed = dense - sum(sizes)  # parameters no mask touches
    if not sizes and target != dense:
        raise export.ExportError(
            f"{what} cannot have {target} non-zero parameters: its cells hold no conv kernel to prune (only "
            f"pooling and skip operations), so its {dense} parameters are all fixed; weight pruning alone "
            f"cannot change its size")
    if not len(sizes) <= target - fixed <= sum(sizes):
        why = (f"{fixed} of them lie outside the {len(sizes)} prunable conv kernels (which keep at least one "
               f"weight each)" if target - fixed < len(sizes) else "fewer than the target")
        raise export.ExportError(
            f"{what} cannot have {target} non-zero parameters: its network has {dense} parameters, {why}; "
            f"uniform weight pruning alone cannot reach it")
    counts = uniform_keep_counts(sizes, target - fixed)
    masks_flat = magnitude_masks(params, kernel_paths, counts)

    record = {k: v for k, v in source.items() if k not in ("masks", "params", "counts", "val_accuracy")}
    record.update(cells=genotype_lib.cells_to_json(cells), val_accuracy=None, budget="nonzero",
                  target=source.get("target", target))
    kept_filters = sum(_filters(c) for c in cells)
    record["counts"] = dict(ops=sum(len(c.ops) for c in cells), filters=kept_filters, filters_total=kept_filters,
                            weights=int(sum(counts)), weights_total=int(sum(sizes)))
    record["baseline"] = dict(baseline, keep_ratio=(target - fixed) / sum(sizes), magnitudes=magnitudes,
                              seed=int(seed))
    record["masks"] = f"{name}.npz"
    record["params"] = export.network_params(record, masks_flat)
    if record["params"]["nonzero"] != target:  # the construction above makes this exact
        raise export.ExportError(f"{what}: {record['params']['nonzero']} non-zero parameters, target {target}")
    export.write_once(os.path.join(out_dir, f"{name}.npz"), export.npz_bytes(masks_flat))
    path = os.path.join(out_dir, f"{name}.json")
    export.write_once(path, export.json_bytes(record))
    return os.path.abspath(path)


def _read_source(source_json: str, target: Optional[int]) -> tuple[dict, int]:
    with open(source_json) as f:
        source = json.load(f)
    return source, int(source["params"]["nonzero"] if target is None else target)


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
    source, target = _read_source(source_json, target)
    name = name or os.path.splitext(os.path.basename(source_json))[0]
    return _pruned_export(source, full_width_cells(source), out_dir, name, target=target, seed=seed, params=params,
                          what=f"the fixed-ratio baseline of {source_json}",
                          baseline=dict(kind="fixed_ratio", source=os.path.abspath(source_json),
                                        source_params=source["params"]))


# --------------------------------------------------------------------------------------------------
# Random architectures of equal size

def _channels(rng: np.random.Generator, width: int) -> tuple:
    """A uniformly drawn count 1..width of channels, at uniformly drawn positions (sorted)."""
    return tuple(int(i) for i in np.sort(rng.choice(width, size=int(rng.integers(1, width + 1)), replace=False)))


def random_cell(rng: np.random.Generator, full: genotype_lib.CellSpec, num_ops: int) -> genotype_lib.CellSpec:
    """A cell drawn from the search space of `full` (one cell of the unpruned super-net).

    `num_ops` distinct (edge, op) pairs, uniformly among the draws that give every node at least one
    input op (so every node is computed); then every part the search can narrow gets a uniformly drawn
    width (1..C channels at random positions): both preprocess layers, each conv op's output and a
    sep_conv's inner width, a reduction skip's FactorizedReduce.
    """
    pairs = [(o.node, o.src, o.op) for o in full.ops]
    if not full.steps <= num_ops <= len(pairs):
        raise ValueError(f"a cell of {full.steps} nodes and {len(pairs)} candidate ops cannot hold {num_ops} ops "
                         f"(at least one per node)")
    while True:  # rejection: uniform over the valid op sets; a valid draw has probability >= ~0.05
        chosen = sorted(rng.choice(len(pairs), size=num_ops, replace=False))
        if len({pairs[k][0] for k in chosen}) == full.steps:
            break
    width, ops = full.width, []
    for k in chosen:
        node, src, op = pairs[k]
        if op in ops_lib.CONV_OPS:
            mid = int(rng.integers(1, width + 1)) if op.startswith("sep_conv") else None
            ops.append(genotype_lib.OpSpec(node, src, op, mid=mid, out_index=_channels(rng, width)))
        elif op == "skip_connect" and full.reduction and src < 2:
            ops.append(genotype_lib.OpSpec(node, src, op, out_index=_channels(rng, width)))
        else:
            ops.append(genotype_lib.OpSpec(node, src, op))
    return dataclasses.replace(full, ops=tuple(ops), pre0_index=_channels(rng, width),
                               pre1_index=_channels(rng, width))


def random_export(source_json: str, out_dir: str, *, seed, target: Optional[int] = None,
                  name: Optional[str] = None, max_draws: int = 10_000) -> str:
    """Writes a random architecture of the same size as an exported one; returns its JSON path.

    The cells are drawn from the search space of the source's super-net (its search config: layers,
    steps, init_channels), each with as many ops as the source's cell (so the draw differs in which
    ops and widths, not in how many; `random_cell`). A draw whose size cannot be pruned to the target
    (parameters outside the prunable kernels above it, or the whole network below it) is redrawn. The
    drawn network is then pruned like the fixed-ratio baseline: one keep ratio for every sep/dil kernel,
    magnitudes of a fresh initialisation, to exactly `target` non-zero parameters.

    Args:
      source_json: the export to match (an MGAS export).
      out_dir: where to write `<name>.json` and `<name>.npz`.
      seed: an int or a sequence of ints; the draw and the initialisation are a pure function of
        (the source's cell layout, seed, target).
      target: non-zero parameters; default the source's own count.
      name: file name without extension; default the source's.
      max_draws: draws tried before giving up.
    Returns:
      the JSON path; its record has params['nonzero'] == target and a 'baseline' field
      {'kind': 'random', 'draws', 'source', 'source_params', 'keep_ratio', 'magnitudes', 'seed'}.
    Raises:
      export.ExportError: no draw of max_draws can reach the target, or the source has no search config.
    """
    source, target = _read_source(source_json, target)
    s = (source.get("config") or {}).get("search")
    if not s:
        raise export.ExportError(f"{source_json} has no search config: the random baseline draws from the search "
                                 f"space it describes (search.init_channels, layers, steps)")
    full = supernet.full_cells(int(s["init_channels"]), int(s["layers"]), int(s["steps"]))
    like = genotype_lib.cells_from_json(source["cells"])
    if len(like) != len(full):
        raise export.ExportError(f"{source_json}: {len(like)} cells, but its search config builds {len(full)}")
    seq = [int(x) for x in np.atleast_1d(seed)] + [target]
    rng = np.random.default_rng(seq)
    shape = tuple(source["input_shape"])
    smallest = None
    for draw in range(1, max_draws + 1):
        cells = tuple(random_cell(rng, f, len(c.ops)) for f, c in zip(full, like))
        spec = network.NetworkSpec(cells=cells, num_classes=int(source["num_classes"]),
                                   stem_channels=int(source["stem_channels"]), pool_bn=True, masked=True)
        fixed, masked = parameter_split(spec, shape)
        smallest = fixed + len(masked) if smallest is None else min(smallest, fixed + len(masked))
        if fixed + len(masked) <= target <= fixed + sum(masked):
            break
    else:
        raise export.ExportError(
            f"no random architecture of {max_draws} draws from the search space of {source_json} can be pruned to "
            f"{target} non-zero parameters (the smallest drawn needs {smallest}: stem, preprocess, BN and classifier "
            f"are not pruned); match a larger export")
    init_seed = int(rng.integers(2 ** 31))
    name = name or os.path.splitext(os.path.basename(source_json))[0]
    return _pruned_export(source, cells, out_dir, name, target=target, seed=init_seed, params=None,
                          what=f"the random architecture matched to {source_json}",
                          baseline=dict(kind="random", draws=draw, source=os.path.abspath(source_json),
                                        source_params=source["params"]))
