"""Budget-true final phase: commits that land the exported size just below each target (our design).

The released code's final phase prunes to a floor and leaves the choice of a network to the user
(docs/method.md section 7, "Targets"). Here the final phase knows `export.targets`: when the next
commit would take the size below a target that has no record yet, only part of it is committed, as
many of the units it would switch off as bring the size to just below the target; that state is
recorded and the search goes on from it (the other units stay uncommitted, and are committed at a
later round if they are still off then).

Which units first: the ones furthest below their thresholds, across the three granularities. "How
far" is the shortfall relative to the unit's own threshold, (t - s) / t, with s and t in the
granularity's own units: sigma(alpha) against t_op for an op, sigma(beta) against t_k (or the
preprocess threshold) for a filter, |w| against t_w for a weight. A unit switched off has
0 <= s <= t, so the shortfall lies in [0, 1] whatever the units' scale: 1 for a score at 0, 0 for a
score at its threshold. Weights' magnitudes (~1e-2) and scores (~0.5) are not comparable; their
shortfalls are.

The size is what the records report: the non-zero parameters of the derived network
(`export.record_params`), computed on the committed, dropped and shrunk state of each candidate.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from mgas_jax import names, pruning
from mgas_jax.names import op_name
from mgas_jax.supernet import SuperNetSpec


@dataclasses.dataclass
class Units:
    """The units one full commit would switch off, in a fixed order.

    Attributes:
      ops: [(cell, OpSpec)] committed-on ops whose live mask is off.
      leaves: [(mask path, flat indices)] filters (`.../gate/beta`) and weights (`.../kernel`) of
        the kept ops and the preprocess layers, whose committed mask would go from 1 to 0.
      margin: (len(ops) + sum of the leaves' sizes,) shortfall below the threshold of each unit,
        ops first, then the leaves' entries in order.
    """
    ops: list
    leaves: list
    margin: np.ndarray

    def __len__(self) -> int:
        return int(self.margin.size)


def _shortfall(score, threshold) -> np.ndarray:
    t = np.asarray(threshold, np.float64)
    return (t - np.asarray(score, np.float64)) / np.maximum(t, 1e-12)


def _sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def off_units(spec: SuperNetSpec, params: dict, arch: dict, masks: dict, full: pruning.CommitResult) -> Units:
    """The units `full` (a `pruning.commit(..., remove=False)` of this state) switches off, with the
    shortfall of each below its threshold (module doc)."""
    arch, params = pruning.to_numpy(arch), pruning.to_numpy(params)
    margins = []
    for i, o in full.removed:
        a = arch[names.cell_name(i)]
        margins.append(_shortfall(_sigmoid(a["alpha"][o.edge, o.op_index]), a["t_op"][o.edge, o.op_index]))
    leaves = []
    ops_of = [{op_name(o): o for o in c.ops} for c in spec.cells]
    for path, old in pruning._walk(masks):
        new = np.asarray(pruning._get(full.masks, path)) if pruning._has(full.masks, path) else None
        is_filter = names.is_filter_mask(path) and names.FR not in path
        if new is None or not (is_filter or names.is_kernel(path)) or new.shape != np.shape(old):
            continue
        idx = np.flatnonzero((np.asarray(old).ravel() > 0) & (new.ravel() == 0))
        if idx.size == 0:
            continue
        i = names.cell_index(path[0])
        a = arch[path[0]]
        if is_filter:
            score = _sigmoid(np.asarray(pruning._get(arch, path)).ravel()[idx])
            if path[1] in names.PRE:
                t = a["t_pre"][names.PRE.index(path[1])]
            else:
                o = ops_of[i][path[1]]
                t = a["t_k"][o.edge, o.op_index]
        else:
            o = ops_of[i][path[1]]
            score = np.abs(np.asarray(pruning._get(params, path)).ravel()[idx])
            t = a["t_w"][o.edge, o.op_index]
        leaves.append((path, idx))
        margins.append(_shortfall(score, t))
    margin = np.concatenate([np.atleast_1d(m) for m in margins]) if margins else np.zeros((0,))
    return Units(list(full.removed), leaves, margin)


def apply_units(spec: SuperNetSpec, arch: dict, masks: dict, units: Units, chosen: np.ndarray) -> tuple[dict, dict]:
    """(arch, masks) with only the `chosen` units (indices into `units`) committed off.

    The structure stays (ops committed off get committed op mask 0 and alpha REMOVED_ALPHA, as a
    commit inside a stage does); `pruning.drop_committed_off` and `pruning.shrink` remove them.
    """
    arch, masks = pruning.to_numpy(arch), pruning.to_numpy(masks)
    chosen = np.zeros(len(units), bool) if chosen is None else np.isin(np.arange(len(units)), chosen)
    n_ops = len(units.ops)
    for (i, o), on in zip(units.ops, chosen[:n_ops]):
        if on:
            cell = names.cell_name(i)
            masks[cell].setdefault(names.OPS_MASK, pruning.active_matrix(spec.cells[i]))[o.edge, o.op_index] = 0.0
            arch[cell]["alpha"][o.edge, o.op_index] = pruning.REMOVED_ALPHA
    start = n_ops
    for path, idx in units.leaves:
        pick = idx[chosen[start:start + idx.size]]
        start += idx.size
        if pick.size:
            m = np.array(pruning._get(masks, path), np.float32)
            m.reshape(-1)[pick] = 0.0
            pruning._set(masks, path, m)
    return arch, masks


def choose_units(margin: np.ndarray, size_of: Callable[[np.ndarray], int], target: float, low: float,
                 max_evals: int = 96) -> Optional[np.ndarray]:
    """Which units to commit so that size_of lands in [low, target]: the furthest below first.

    Takes the shortest prefix of the units in order of falling shortfall (ties: original order) whose
    size is <= target. When that prefix ends with a unit that alone jumps from above `target` to below
    `low` (a whole op, at a target whose window is smaller than the op), that unit is left out and the
    prefix goes on past it, as often as it takes. When the units left after such a skip cannot bring the
    size down to `target`, the skipped unit cannot be spared: it is committed first, and the search
    starts again from the top of the order with it (so that fewer of the other units fill the window).
    Prefixes are found by galloping then bisection, so a run of skipped units costs a size_of call or
    two each; the whole search stops after about `max_evals` calls. Returns the indices of the chosen
    units (the selection closest to `target` from below among those tried, when none lands in the
    window), or None when committing every unit still leaves the size above `target`.

    Args:
      margin: (n,) shortfall of each unit (`Units.margin`).
      size_of: indices of units committed -> the size (e.g. non-zero parameters) of that state;
        must not grow when units are added.
      max_evals: bound on size_of calls (each one costs an abstract trace of the network in the search).
    """
    order = np.argsort(-np.asarray(margin, np.float64), kind="stable")
    seen: dict = {}
    best = [None, -np.inf]

    def size(pick):
        key = np.sort(pick).tobytes()
        if key not in seen:
            seen[key] = n = size_of(pick)
            if best[1] < n <= target:
                best[0], best[1] = pick, n
        return seen[key]

    if size(order) > target:
        return None
    must = order[:0]  # units no selection within the window can do without, found on the way
    while len(seen) < max_evals:
        base, rest, skipped = must, order[~np.isin(order, must)], None
        while len(seen) < max_evals:
            # the smallest h with size(base + rest[:h]) <= target (size(base) > target), galloping from 1
            lo, hi = 0, 1
            while hi < rest.size and size(np.concatenate([base, rest[:hi]])) > target:
                lo, hi = hi, min(2 * hi, rest.size)
            if size(np.concatenate([base, rest])) > target:
                break  # not even every unit left: the unit skipped last cannot be spared
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if size(np.concatenate([base, rest[:mid]])) <= target:
                    hi = mid
                else:
                    lo = mid
            pick = np.concatenate([base, rest[:hi]])
            if size(pick) >= low:
                return np.sort(pick)
            skipped = rest[hi - 1]  # alone it jumps from above the target to below the window
            base, rest = np.concatenate([base, rest[:hi - 1]]), rest[hi:]
        if skipped is None:
            break
        must = np.append(must, skipped)
        if size(must) <= target:  # the units that cannot be spared reach the target by themselves
            if size(must) >= low:
                return np.sort(must)
            break
    return np.sort(best[0])
