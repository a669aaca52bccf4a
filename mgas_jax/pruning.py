"""Host-side pruning decisions of MGAS: lambda schedule, size proxy, commits, regrowth, physical shrinking.

These run between jit-compiled steps, on replicated state, so every device takes the same decision.
Each is a small function of explicit inputs (numpy or jax arrays, specs), testable on its own.

Method reference: docs/method.md sections 2 (commits), 3 (lambda, size proxy) and 5 (regrowth,
physical filter pruning).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mgas_jax import gates, names, ops
from mgas_jax.genotype import CellSpec, OpSpec, edge_endpoints, num_edges
from mgas_jax.names import get_path as _get, has_path as _has
from mgas_jax.supernet import NUM_OPS, SuperNetSpec, active_matrix

REMOVED_ALPHA = -30.0  # "pushed to a very negative value": sigma(-30) ~ 1e-13


# ----------------------------------------------------------------------------------------------
# Adaptive lambda (GOLD-NAS style)

@dataclasses.dataclass
class LambdaState:
    """lam: current penalty weight; d: its current increment."""
    lam: float = 0.0
    d: float = 0.0


def lambda_start(lambda0: float) -> LambdaState:
    """At the start of a stage: lambda = 0, d = lambda0."""
    return LambdaState(0.0, lambda0)


def lambda_update(s: LambdaState, pruned: int, *, lambda0: float, c0: float, n: int,
                  mean_ce: float, mean_reg: float, cap_factor: float = 1.0, cap: float = 100.0) -> LambdaState:
    """One update after a commit that pruned `pruned` ops (docs/method.md sections 3 and 7).

    The bound: when the epoch's mean CE is below cap_factor * mean(lambda * R_op), lambda is capped at
    its current value (cap_factor is 0.5 in the final phase), otherwise at `cap`.
    if pruned >= 4n: d = lambda0, lambda /= c0; elif pruned < 2n: unless lambda already sits at the
    bound, d *= c0^2 and lambda += d; else unchanged; then lambda = min(lambda, bound).

    As in the released code (train_search.py ~531-536), a lambda held at its bound keeps its increment
    too: growing d on every capped round would let lambda jump by orders of magnitude once the cap lifts.
    """
    bound = s.lam if mean_ce < cap_factor * mean_reg else cap
    lam, d = s.lam, s.d
    if pruned >= 4 * n:
        d, lam = lambda0, lam / c0
    elif pruned < 2 * n and lam != bound:
        d = d * c0 ** 2
        lam = lam + d
    return LambdaState(min(lam, bound), d)


def commit_due(pruning_epochs: int, first_after: int, every: int) -> bool:
    """Whether the epoch that ends a phase's `pruning_epochs`-th pruning epoch commits: the first commit
    after `first_after` epochs, then one every `every` (train_search.py ~494: 3, then every 2)."""
    return pruning_epochs >= first_after and (pruning_epochs - first_after) % every == 0


# ----------------------------------------------------------------------------------------------
# Tree paths

def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def to_numpy(tree):
    """A nested dict of host numpy arrays (mutable copies)."""
    return jax.tree.map(lambda x: np.array(x), tree)


def _walk(tree: dict, prefix=()):
    """Yield (path, leaf) of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


# ----------------------------------------------------------------------------------------------
# Counts and the size proxy

def committed_count(masks: dict, cell_idx: int, o: OpSpec, unit: tuple) -> Optional[int]:
    """Committed output filters of one gated unit of op `o` (one of `names.conv_units(o.op)`)."""
    path = names.gate(names.op_path(cell_idx, o) + unit)
    if not _has(masks, path):  # filter level off: every filter counts
        return None
    return int(np.sum(np.asarray(_get(masks, path))))


def op_size(cell: CellSpec, cell_idx: int, o: OpSpec, masks: dict) -> int:
    """Size proxy of one op (docs/method.md section 3):
    sep_conv: k^2 C + C K1 + k^2 K1 + K1 K3; dil_conv: k^2 C + C K1; skip in a reduction cell: C^2; else 0."""
    c = cell.width
    if o.op in ops.CONV_OPS:
        k = ops.kernel_size(o.op)
        n_out = c if o.out_index is None else len(o.out_index)
        units = names.conv_units(o.op)
        if o.op.startswith("sep"):
            k1 = _or(committed_count(masks, cell_idx, o, units[0]), c if o.mid is None else o.mid)
            k3 = _or(committed_count(masks, cell_idx, o, units[1]), n_out)
            return k * k * c + c * k1 + k * k * k1 + k1 * k3
        k1 = _or(committed_count(masks, cell_idx, o, units[0]), n_out)
        return k * k * c + c * k1
    if o.op == "skip_connect" and cell.reduction and o.src < 2:
        return c * c
    return 0


def _or(value, default):
    return default if value is None else value


def size_proxy(spec: SuperNetSpec, masks: dict, cells: Optional[range] = None) -> int:
    """Sum of op sizes over the committed ops of the given cells (default all built cells)."""
    cells = range(len(spec.cells)) if cells is None else cells
    on = committed_ops(masks, spec)
    return int(sum(op_size(spec.cells[i], i, o, masks) for i in cells for o in spec.cells[i].ops
                   if on[i][o.edge, o.op_index] > 0))


# ----------------------------------------------------------------------------------------------
# Commits

@dataclasses.dataclass
class CommitResult:
    spec: SuperNetSpec
    arch: dict
    masks: dict
    removed: list          # [(cell, OpSpec)] ops committed off in this round
    filters_off: int       # filters newly committed off
    weights_off: int       # weights newly committed off


def committed_ops(masks: dict, spec: SuperNetSpec) -> list[np.ndarray]:
    """(E, 7) 0/1 committed op masks of every built cell: present in the spec and not committed off."""
    out = []
    for i, cell in enumerate(spec.cells):
        m = active_matrix(cell)
        path = (names.cell_name(i), names.OPS_MASK)
        if _has(masks, path):
            m = m * np.asarray(_get(masks, path))
        out.append(m)
    return out


def op_live_masks(arch: dict, spec: SuperNetSpec, masks: Optional[dict] = None) -> list[np.ndarray]:
    """Protected live op masks (E, 7) of every built cell."""
    active = committed_ops(masks or {}, spec)
    out = []
    for i, cell in enumerate(spec.cells):
        a = arch[names.cell_name(i)]
        _, live = gates.op_gate(a["alpha"], a["t_op"], active[i], gates.edge_nodes(cell.steps))
        out.append(np.asarray(live))
    return out


def _recommit(masks: dict, path: tuple, rule: Callable) -> int:
    """Replace the committed mask at `path` (where there is one) by `rule(old)`; returns the units it drops."""
    if not _has(masks, path):  # that level is off
        return 0
    old = _get(masks, path)
    new = np.asarray(rule(jnp.asarray(old)), np.float32)
    _set(masks, path, new)
    return int(old.sum() - new.sum())


def commit(spec: SuperNetSpec, params: dict, arch: dict, masks: dict, *, remove: bool = True) -> CommitResult:
    """Refresh the committed masks from the live ones at all three granularities.

    Ops whose live mask is 0 are committed off (their alpha is pushed to REMOVED_ALPHA): with
    `remove` they leave the spec (with every op committed off earlier), otherwise their entry of the
    cell's `ops` mask becomes 0 and the structure stays (no recompilation). Filter masks become
    committed AND (sigma(beta) > t) (`gates.filter_mask`); weight masks committed AND (|w| > t_w)
    (`gates.weight_mask`), the live masks of the forward. Filter scores of FactorizedReduce have no
    threshold and are not committed here.
    """
    arch, masks = to_numpy(arch), to_numpy(masks)
    params = to_numpy(params)
    # The forward's own gate functions (one rule, so a change of gate cannot leave the commits behind),
    # looked up now and compiled once per shape.
    filter_rule, weight_rule = jax.jit(gates.filter_mask), jax.jit(gates.weight_mask)
    live = op_live_masks(arch, spec, masks)
    before = committed_ops(masks, spec)
    new_cells, removed = [], []
    filters_off = weights_off = 0
    for i, cell in enumerate(spec.cells):
        cname = names.cell_name(i)
        a = arch[cname]
        keep = []
        for o in cell.ops:
            on_before = before[i][o.edge, o.op_index] > 0
            if on_before and live[i][o.edge, o.op_index] > 0:
                keep.append(o)
                continue
            if on_before:
                removed.append((i, o))
                a["alpha"][o.edge, o.op_index] = REMOVED_ALPHA
            if not remove:
                keep.append(o)  # stays built, gated off by its committed mask
                masks[cname].setdefault(names.OPS_MASK, active_matrix(cell))[o.edge, o.op_index] = 0.0
        new_cell = dataclasses.replace(cell, ops=tuple(keep))
        if remove and cname in masks:
            masks[cname][names.OPS_MASK] = active_matrix(new_cell)
        new_cells.append(new_cell)
        for k in range(len(names.PRE)):
            path = names.gate(names.pre_path(i, k))
            t = a["t_pre"][k]
            filters_off += _recommit(masks, path, lambda m, path=path, t=t: filter_rule(_get(arch, path), t, m))
        for o in keep:
            if live[i][o.edge, o.op_index] == 0:
                continue
            t_k, t_w = a["t_k"][o.edge, o.op_index], a["t_w"][o.edge, o.op_index]
            for unit in names.conv_units(o.op):
                u = names.op_path(i, o) + unit
                path = names.gate(u)
                filters_off += _recommit(masks, path, lambda m, path=path: filter_rule(_get(arch, path), t_k, m))
                for path in names.unit_kernels(u):
                    weights_off += _recommit(masks, path, lambda m, path=path: weight_rule(_get(params, path), t_w, m))
    new_spec = dataclasses.replace(spec, cells=tuple(new_cells))
    return CommitResult(new_spec, prune_tree(arch, new_spec), prune_tree(masks, new_spec),
                        removed, filters_off, weights_off)


def prune_tree(tree: dict, spec: SuperNetSpec) -> dict:
    """Drop the subtrees of ops that are not in the spec (committed off), and of unbuilt cells."""
    out = {}
    for k, v in tree.items():
        i = names.cell_index(k)
        if i is not None:
            if i >= len(spec.cells):
                continue
            built = {names.op_name(o) for o in spec.cells[i].ops}
            out[k] = {n: sub for n, sub in v.items() if not names.is_op_name(n) or n in built}
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Grafting state onto a new structure

def graft(new: Any, old: Any) -> Any:
    """Copy every leaf of `old` into `new` where the key path exists in both with the same shape.

    Used after every structural change: new cells, a new head, a regrown op and re-created optimizer
    states start from their fresh initial values; everything else carries over unchanged.
    """
    old_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(old)}

    def pick(path, leaf):
        v = old_leaves.get(jax.tree_util.keystr(path))
        if v is not None and np.shape(v) == np.shape(leaf) and np.asarray(v).dtype == np.asarray(leaf).dtype:
            return v
        return leaf

    return jax.tree_util.tree_map_with_path(pick, new)


# ----------------------------------------------------------------------------------------------
# Regrowth

def regrowth_probabilities(alpha: list, momentum: list, active: list) -> np.ndarray:
    """P(i, j) = I_cell(i) * I_op(i, j) over cells i and op types j (docs/method.md section 5).

    Args:
      alpha, momentum, active: per cell, (E, 7) alpha, its optimizer momentum and 0/1 committed ops.
    Returns:
      (cells, 7) probabilities summing to 1.
    """
    n_cells = len(alpha)
    g = np.zeros((n_cells, NUM_OPS))
    a = np.zeros((n_cells, NUM_OPS))
    n_active = np.zeros(n_cells)
    for i in range(n_cells):
        act = np.asarray(active[i]) > 0
        n_active[i] = act.sum()
        sig = 1.0 / (1.0 + np.exp(-np.asarray(alpha[i], np.float64)))
        mom = np.abs(np.asarray(momentum[i], np.float64))
        has = act.any(axis=0)
        for j in range(NUM_OPS):
            if has[j]:
                g[i, j] = mom[act[:, j], j].mean()
                a[i, j] = sig[act[:, j], j].mean()
        if has.any():
            g[i, ~has] = 0.5 * g[i, has].min()
            a[i, ~has] = 0.5 * a[i, has].min()

    def share(x, axis):
        s = x.sum(axis=axis, keepdims=True)
        n = x.shape[axis]
        return np.where(s > 0, x / np.where(s > 0, s, 1.0), 1.0 / n)

    i_op = 0.5 * share(g, 1) + 0.5 * share(a, 1)
    per_cell_g = g.sum(1) / np.maximum(n_active, 1)
    per_cell_a = a.sum(1) / np.maximum(n_active, 1)
    i_cell = 0.5 * share(per_cell_g, 0) + 0.5 * share(per_cell_a, 0)
    p = i_cell[:, None] * i_op
    return p / p.sum()


def sample_regrowth(key: jax.Array, probs: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Draw `count` (cell, op type) pairs with replacement from P."""
    if count <= 0:
        return []
    flat = jax.random.choice(key, probs.size, (count,), replace=True, p=np.asarray(probs, np.float32).ravel())
    return [divmod(int(f), probs.shape[1]) for f in np.asarray(flat)]


def regrow(spec: SuperNetSpec, key: jax.Array, draws: list[tuple[int, int]]) -> tuple[SuperNetSpec, list]:
    """For each draw (i, j), bring back a uniformly chosen committed-off edge of op type j in cell i.

    Draws with no committed-off edge of that type are skipped. Regrown ops come back at full width;
    their fresh weights, beta = 0 and full masks come from the caller's re-initialisation (`graft`).
    Returns the new spec and the list of (cell, OpSpec) regrown.
    """
    cells = [list(c.ops) for c in spec.cells]
    grown = []
    for t, (i, j) in enumerate(draws):
        cell = spec.cells[i]
        present = {(o.edge, o.op_index) for o in cells[i]}
        candidates = [e for e in range(num_edges(cell.steps)) if (e, j) not in present]
        if not candidates:
            continue
        e = candidates[int(jax.random.randint(jax.random.fold_in(key, t), (), 0, len(candidates)))]
        node, src = edge_endpoints(e, cell.steps)
        o = OpSpec(node, src, ops.OPS[j])
        cells[i].append(o)
        grown.append((i, o))
    order = lambda o: (o.node, o.src, o.op_index)
    new_cells = tuple(dataclasses.replace(c, ops=tuple(sorted(ops_, key=order)))
                      for c, ops_ in zip(spec.cells, cells))
    return dataclasses.replace(spec, cells=new_cells), grown


def alpha_key(cell_idx: int, o: OpSpec) -> str:
    """Key of an op's alpha in `Progress.pruned_alpha` (JSON, so it survives checkpoints)."""
    return f"{cell_idx}/{o.edge}/{o.op_index}"


def pruned_alphas(arch: dict, removed: list) -> dict:
    """{alpha_key: alpha} of ops about to be committed off, read before the commit pushes them to
    REMOVED_ALPHA: what a regrown op gets back (docs/method.md section 7)."""
    return {alpha_key(i, o): float(np.asarray(arch[names.cell_name(i)]["alpha"])[o.edge, o.op_index]) for i, o in removed}


def restore_regrown(arch: dict, grown: list, saved: dict) -> dict:
    """alpha of each regrown op back to its value from before it was pruned (train_search.py ~1137:
    the released code adds back what pruning subtracted); 0 for an op with no saved value."""
    arch = to_numpy(arch)
    for i, o in grown:
        arch[names.cell_name(i)]["alpha"][o.edge, o.op_index] = saved.get(alpha_key(i, o), 0.0)
    return arch


def _even_up(n: int) -> int:
    return n + (n % 2)


def common_width(cell: CellSpec, cell_idx: int, masks: dict, exclude=()) -> int:
    """The one width the released code gives every op of a cell (model_search.py prune_kernel).

    Per cell: the committed output channels of each preprocess layer and, per node, the most committed
    output channels of a conv op into it (rounded up to even; a node without conv op repeats the entry
    before it). Their mean (rounded up to even) if it is >= half the cell's width, else their maximum if
    that is, else half the width. Here it sizes regrown ops (train_search.py ~1166); the ops already
    present keep their own committed channels (README, deviation table). Ops at the (edge, op index)
    pairs in `exclude` (the regrown ones) do not count.
    """
    half = cell.width // 2
    entries = []
    for pre in names.PRE:
        path = names.gate(names.pre_path(cell_idx, int(pre[-1])))
        n = int(np.sum(_get(masks, path))) if _has(masks, path) else cell.width
        entries.append(max(_even_up(n), 2))
    on = active_matrix(cell)
    if _has(masks, (names.cell_name(cell_idx), names.OPS_MASK)):
        on = on * np.asarray(_get(masks, (names.cell_name(cell_idx), names.OPS_MASK)))
    for node in range(cell.steps):
        counts = [_or(committed_count(masks, cell_idx, o, names.conv_units(o.op)[-1]),
                      cell.width if o.out_index is None else len(o.out_index))
                  for o in cell.ops_into(node)
                  if o.op in ops.CONV_OPS and on[o.edge, o.op_index] > 0 and (o.edge, o.op_index) not in exclude]
        best = _even_up(max(counts, default=0))
        entries.append(best if best > 0 else entries[-1])
    mean = _even_up(int(sum(entries) / len(entries)))
    if mean >= half:
        return mean
    return max(entries) if max(entries) >= half else half


def node_channels(cell: CellSpec, node: int, width: int, exclude=()) -> Optional[tuple]:
    """The `width` channel positions of a node that its ops write most (ties: lower index first).

    A regrown op writes there, so that it adds to the channels the node already carries. None when
    `width` is the cell's full width.
    """
    if width >= cell.width:
        return None
    cover = np.zeros(cell.width)
    for o in cell.ops_into(node):
        if (o.edge, o.op_index) not in exclude:
            cover[list(range(cell.width)) if o.out_index is None else list(o.out_index)] += 1
    best = sorted(range(cell.width), key=lambda c: (-cover[c], c))[:width]
    return tuple(sorted(best))


def size_regrown(spec: SuperNetSpec, grown: list, masks: dict, full_width_cells=()) -> tuple[SuperNetSpec, list]:
    """Regrown ops at their cell's common width (`common_width`): sep/dil convs and FactorizedReduce
    skips write that many channels (`node_channels`), a sep_conv's inner width is the same.

    Cells in `full_width_cells` (the network's last cell, whose output the classifier reads at its
    full width) keep regrown ops at full width. Returns the new spec and the regrown (cell, OpSpec).
    """
    cells = [list(c.ops) for c in spec.cells]
    fresh = {(i, o.edge, o.op_index) for i, o in grown}
    widths = {}
    out = []
    for i, o in grown:
        cell = spec.cells[i]
        exclude = {(e, k) for (c, e, k) in fresh if c == i}
        if i not in widths:
            widths[i] = cell.width if i in full_width_cells else common_width(cell, i, masks, exclude)
        w = widths[i]
        sized = o
        if o.op in ops.CONV_OPS or (o.op == "skip_connect" and cell.reduction and o.src < 2):
            index = node_channels(cell, o.node, w, exclude)
            mid = None if w >= cell.width or not o.op.startswith("sep") else w
            sized = dataclasses.replace(o, mid=mid, out_index=index)
        cells[i] = [sized if (p.edge, p.op_index) == (o.edge, o.op_index) else p for p in cells[i]]
        out.append((i, sized))
    new_cells = tuple(dataclasses.replace(c, ops=tuple(ops_)) for c, ops_ in zip(spec.cells, cells))
    return dataclasses.replace(spec, cells=new_cells), out


# ----------------------------------------------------------------------------------------------
# Physical filter pruning

def _keep(committed: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Indices of committed channels; at least one (the best scored) so shapes stay non-empty.

    A unit whose filters are all committed off keeps one channel with mask 0: it still outputs
    exactly 0, as before the shrink.
    """
    idx = np.flatnonzero(committed > 0)
    if idx.size == 0:
        idx = np.array([int(np.argmax(beta))])
    return idx


def _take(trees: dict, base: tuple, rel: tuple, axis: int, idx: np.ndarray) -> None:
    """Slice, in every collection that holds it, the leaf at base + rel along `axis`."""
    for tree in trees.values():
        try:
            leaf = _get(tree, base + rel)
        except (KeyError, TypeError):
            continue
        _set(tree, base + rel, np.take(leaf, idx, axis=axis))


def _drop(trees: dict, path: tuple) -> None:
    """Remove the subtree at `path` from every collection that holds it."""
    for tree in trees.values():
        if _has(tree, path):
            del _get(tree, path[:-1])[path[-1]]


def _shrink_unit(trees: dict, unit: tuple, idx: np.ndarray, next_unit: Optional[tuple]) -> None:
    """Keep output channels `idx` of the ConvUnit at `unit` (pw kernel, BN, gate) and the matching inputs
    of the ConvUnit `next_unit` it feeds (sep_conv's second), if any."""
    _take(trees, unit, (names.PW, names.KERNEL), 3, idx)
    for leaf in names.BN_LEAVES:
        _take(trees, unit, (names.BN, leaf), 0, idx)
    _take(trees, names.gate(unit), (), 0, idx)
    if next_unit:
        _take(trees, next_unit, (names.DW, names.KERNEL), 3, idx)
        _take(trees, next_unit, (names.PW, names.KERNEL), 2, idx)


def shrink(spec: SuperNetSpec, variables: dict) -> tuple[SuperNetSpec, dict]:
    """Physically remove committed-off filters (docs/method.md section 5, physical filter pruning).

    Every sep_conv's inner and output channels, every dil_conv's output channels and every
    preprocess layer's output channels shrink to their committed ones; weights, scores, masks and
    the full BatchNorm state of what stays are kept. The network output does not change: removed
    channels were exactly zero, and ops write their surviving channels at their old node positions
    (see `ops.scatter_channels`).

    Deviation from the released code, which forces one common width per cell (re-adding or dropping
    channels by a heuristic and losing BN state): we keep exactly the committed channels per op,
    which is lossless and is what makes the equivalence test hold.

    Args:
      variables: dict of collections ('params', 'arch', 'batch_stats', 'masks').
    Returns:
      (new spec, new variables as numpy trees).
    """
    trees = {k: to_numpy(v) for k, v in variables.items()}
    masks, arch = trees["masks"], trees["arch"]
    if not _has(masks, names.gate(names.pre_path(0, 0))):
        return spec, trees  # filter level off: no filter is ever committed off
    new_cells = []
    for i, cell in enumerate(spec.cells):
        width = cell.width
        pre_idx = []
        for k, old_index in enumerate((cell.pre0_index, cell.pre1_index)):
            base = names.pre_path(i, k)
            gate = names.gate(base)
            idx = _keep(_get(masks, gate), _get(arch, gate))
            old = list(range(width)) if old_index is None else list(old_index)
            fr = names.FR in _get(trees["params"], base)
            if fr:
                n1 = sum(1 for c in old if c < width // 2)
                for conv, part in zip(names.FR_CONVS, (idx[idx < n1], idx[idx >= n1] - n1)):
                    if part.size:
                        _take(trees, base, (names.FR, conv, names.KERNEL), 3, part)
                    else:  # a half with no channel left is not built at all (ops.FactorizedReduce)
                        _drop(trees, base + (names.FR, conv))
                for leaf in names.BN_LEAVES:
                    _take(trees, base, (names.FR, names.BN, leaf), 0, idx)
            else:
                _take(trees, base, (names.CONV, names.KERNEL), 3, idx)
                for leaf in names.BN_LEAVES:
                    _take(trees, base, (names.BN, leaf), 0, idx)
            _take(trees, gate, (), 0, idx)
            pre_idx.append(tuple(old[j] for j in idx))
        new_ops = []
        for o in cell.ops:
            old = list(range(width)) if o.out_index is None else list(o.out_index)
            units = tuple(names.op_path(i, o) + u for u in names.conv_units(o.op))
            kept = []
            for u, next_unit in zip(units, units[1:] + (None,)):
                idx = _keep(_get(masks, names.gate(u)), _get(arch, names.gate(u)))
                _shrink_unit(trees, u, idx, next_unit)
                kept.append(idx)
            if len(kept) == 2:  # sep_conv: inner and output channels
                o = dataclasses.replace(o, mid=int(kept[0].size), out_index=tuple(old[j] for j in kept[1]))
            elif kept:          # dil_conv: output channels
                o = dataclasses.replace(o, out_index=tuple(old[j] for j in kept[0]))
            new_ops.append(o)
        new_cells.append(dataclasses.replace(cell, ops=tuple(new_ops), pre0_index=_full_none(pre_idx[0], width),
                                             pre1_index=_full_none(pre_idx[1], width)))
    new_ops_specs = tuple(_normalise(c) for c in new_cells)
    return dataclasses.replace(spec, cells=new_ops_specs), trees


def _full_none(index: tuple, width: int) -> Optional[tuple]:
    return None if tuple(index) == tuple(range(width)) else tuple(int(i) for i in index)


def _normalise(cell: CellSpec) -> CellSpec:
    """Full-width indices become None, so an unpruned op keeps its unpruned (and cached) form."""
    new = []
    for o in cell.ops:
        out = None if o.out_index is None else _full_none(o.out_index, cell.width)
        mid = None if o.mid is None or o.mid == cell.width else o.mid
        new.append(dataclasses.replace(o, mid=mid, out_index=out))
    return dataclasses.replace(cell, ops=tuple(new))


def drop_committed_off(spec: SuperNetSpec, trees: dict) -> tuple[SuperNetSpec, dict]:
    """Remove ops committed off inside a stage from the structure (and from every collection)."""
    on = committed_ops(trees["masks"], spec)
    cells = []
    for i, cell in enumerate(spec.cells):
        new_cell = dataclasses.replace(cell, ops=tuple(o for o in cell.ops if on[i][o.edge, o.op_index] > 0))
        if names.cell_name(i) in trees["masks"]:
            trees["masks"][names.cell_name(i)][names.OPS_MASK] = active_matrix(new_cell)
        cells.append(new_cell)
    new_spec = dataclasses.replace(spec, cells=tuple(cells))
    return new_spec, {k: prune_tree(v, new_spec) for k, v in trees.items()}


def enable_ops(masks: dict, grown: list) -> dict:
    """Committed op mask 1 for regrown ops."""
    masks = to_numpy(masks)
    for i, o in grown:
        if _has(masks, (names.cell_name(i), names.OPS_MASK)):
            masks[names.cell_name(i)][names.OPS_MASK][o.edge, o.op_index] = 1.0
    return masks


# ----------------------------------------------------------------------------------------------
# Thresholds

THRESHOLD_NAMES = ("t_op", "t_k", "t_w", "t_pre")


def reset_thresholds(arch: dict) -> dict:
    """All thresholds to 0 (start of every stage and of the final phase)."""
    def reset(path, x):
        name = getattr(path[-1], "key", None)
        return np.zeros_like(x) if name in THRESHOLD_NAMES else x
    return jax.tree_util.tree_map_with_path(reset, to_numpy(arch))


def thresholds_off(arch: dict) -> dict:
    """Every threshold below every score (-1: sigma(.) > 0 and |w| >= 0), so that the live masks are all
    on and the gates are the committed masks alone: the network a record exports, which a partial
    (budget) commit leaves larger than the live one."""
    def lower(path, x):
        name = getattr(path[-1], "key", None)
        return np.full_like(x, -1.0) if name in THRESHOLD_NAMES else x
    return jax.tree_util.tree_map_with_path(lower, to_numpy(arch))


def count_units(spec: SuperNetSpec, masks: dict) -> dict:
    """Committed units per granularity: ops, filters (conv outputs), weights (sep/dil kernels).

    Units of ops committed off (but still built inside a stage) do not count.
    """
    on = committed_ops(masks, spec)
    n_ops = int(sum(m.sum() for m in on))
    off = {names.op_path(i, o) for i, c in enumerate(spec.cells) for o in c.ops
           if on[i][o.edge, o.op_index] == 0}
    filters = weights = filters_total = weights_total = 0
    for path, m in _walk(masks):
        if path[:2] in off:
            continue
        m = np.asarray(m)
        if names.is_filter_mask(path):
            filters += int(m.sum())
            filters_total += m.size
        elif names.is_kernel(path):
            weights += int(m.sum())
            weights_total += m.size
    return dict(ops=n_ops, filters=filters, filters_total=filters_total, weights=weights, weights_total=weights_total)
