"""Tests of mgas_jax.pruning: the adaptive lambda, the size proxy, commits, regrowth, grafting and the
physical shrinking of filters (docs/method.md sections 2, 3 and 5).

The super-net is the tiny one of the tests: C = 4, 3 cells (the last two are reduction cells, so one
cell has a FactorizedReduce preprocess), 2 steps (5 edges x 7 ops per cell), 8x8 inputs.

Its variables are built once per module. Their structure comes from `SuperNet.init` itself (through
`jax.eval_shape`); the values are drawn in numpy (params uniform, arch 0, masks 1, running mean 0 and
variance 1, as the initialisers give) because compiling the init of 105 ops takes ~30 s on the shared
2-core CPU and these tests do not care which PRNG made the weights. Forward passes run eagerly with the
native depthwise conv (`impl="lax"`), where XLA caches each primitive per shape.
"""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgas_jax import budget as B
from mgas_jax import export
from mgas_jax import genotype as G
from mgas_jax import gates, names, ops
from mgas_jax import pruning as P
from mgas_jax import supernet as S

C, LAYERS, STEPS = 4, 3, 2
INPUT = (8, 8, 3)
OPS = ops.OPS  # column order of alpha: skip, sep3, sep5, dil3, dil5, avg, max


def idx(name):
    return OPS.index(name)


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def leaves(tree):
    """{path tuple: leaf} of a nested dict."""
    return {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def copy(variables):
    return {c: P.to_numpy(t) for c, t in variables.items()}


@pytest.fixture(scope="module")
def net():
    spec = S.SuperNetSpec(S.full_cells(C, LAYERS, steps=STEPS), num_classes=10, stem_channels=3 * C, impl="lax")
    x = jnp.zeros((2,) + INPUT, jnp.float32)
    shapes = jax.eval_shape(lambda: S.SuperNet(spec).init(jax.random.key(0, impl="rbg"), x, train=False))
    rng = np.random.default_rng(0)

    def fill(path, s):
        collection, name = path[0].key, path[-1].key
        if collection == "params":
            return rng.uniform(-0.5, 0.5, s.shape).astype(np.float32)
        if collection == "batch_stats":
            return (np.zeros if name == "mean" else np.ones)(s.shape, np.float32)
        return (np.zeros if collection == "arch" else np.ones)(s.shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, dict(shapes))
    assert set(variables) == {"params", "arch", "batch_stats", "masks"}
    return spec, variables


def test_tiny_supernet_layout(net):
    spec, _ = net
    assert [(c.reduction, c.width, len(c.ops)) for c in spec.cells] == [(False, 4, 35), (True, 8, 35), (True, 16, 35)]


# ---------------------------------------------------------------------------------------------------
# adaptive lambda
# ---------------------------------------------------------------------------------------------------

LAM = dict(lambda0=1e-5, c0=2.0, n=12)
NO_CAP = dict(mean_ce=1.0, mean_reg=0.0)  # CE above the penalty: only the cap of 100 applies


def test_lambda_start():
    s = P.lambda_start(1e-5)
    assert s.lam == 0.0 and s.d == 1e-5


@pytest.mark.parametrize("pruned, lam, d", [
    (48, 1e-3 / 2, 1e-5),      # p >= 4n: d = lambda0, lambda /= c0
    (100, 1e-3 / 2, 1e-5),
    (23, 1e-3 + 4 * 3e-4, 4 * 3e-4),  # p < 2n: d *= c0^2, lambda += d
    (0, 1e-3 + 4 * 3e-4, 4 * 3e-4),
    (24, 1e-3, 3e-4),          # 2n <= p < 4n: unchanged
    (47, 1e-3, 3e-4),
])
def test_lambda_update_rules(pruned, lam, d):
    s = P.lambda_update(P.LambdaState(1e-3, 3e-4), pruned, **LAM, **NO_CAP)
    assert s.lam == pytest.approx(lam, rel=1e-12)
    assert s.d == pytest.approx(d, rel=1e-12)


def test_lambda_cap():
    start = P.LambdaState(1e-3, 3e-4)
    # CE below the penalty: lambda stays at its current value, and so does its increment d
    s = P.lambda_update(start, 0, **LAM, mean_ce=0.1, mean_reg=0.2)
    assert s.lam == pytest.approx(1e-3) and s.d == pytest.approx(3e-4)
    # ... but it may shrink (d back to lambda0)
    s = P.lambda_update(start, 60, **LAM, mean_ce=0.1, mean_reg=0.2)
    assert s.lam == pytest.approx(5e-4) and s.d == pytest.approx(1e-5)
    # final phase: the comparison is with cap_factor * mean_reg
    s = P.lambda_update(start, 0, **LAM, mean_ce=0.15, mean_reg=0.2, cap_factor=0.5)
    assert s.lam == pytest.approx(2.2e-3) and s.d == pytest.approx(1.2e-3)
    s = P.lambda_update(start, 0, **LAM, mean_ce=0.05, mean_reg=0.2, cap_factor=0.5)
    assert s.lam == pytest.approx(1e-3) and s.d == pytest.approx(3e-4)
    # otherwise lambda is capped at `cap`; d grew on the way there
    s = P.lambda_update(P.LambdaState(99.0, 10.0), 0, **LAM, **NO_CAP)
    assert s.lam == 100.0 and s.d == 40.0
    s = P.lambda_update(P.LambdaState(0.5, 0.4), 0, **LAM, **NO_CAP, cap=1.0)
    assert s.lam == 1.0
    # a lambda already at `cap` keeps its d (the released code compares lambda with its bound)
    s = P.lambda_update(P.LambdaState(100.0, 10.0), 0, **LAM, **NO_CAP)
    assert s.lam == 100.0 and s.d == 10.0


def test_lambda_trajectory_while_capped():
    """Three capped rounds then one free one, by hand: lambda and d both hold while capped, so the
    round after the cap lifts grows lambda by one step (d x 4), not by 4^4."""
    s = P.LambdaState(1e-3, 3e-4)
    for _ in range(3):
        s = P.lambda_update(s, 0, **LAM, mean_ce=0.1, mean_reg=0.2)
        assert (s.lam, s.d) == (pytest.approx(1e-3), pytest.approx(3e-4))
    s = P.lambda_update(s, 0, **LAM, mean_ce=1.0, mean_reg=0.2)
    assert s.lam == pytest.approx(1e-3 + 1.2e-3) and s.d == pytest.approx(1.2e-3)
    # the rule that kept growing d while capped would be at 1e-3 + 3e-4 * 4^4 = 7.78e-2 here
    assert s.lam < 0.1 * (1e-3 + 3e-4 * 4 ** 4)


def test_lambda_sequence_of_rounds():
    """Seven commits computed by hand: (pruned, mean CE, mean lambda R_op) -> (lambda, d)."""
    s = P.lambda_start(1e-5)
    rounds = [
        (0, 2.0, 0.0, 4e-5, 4e-5),        # grow: d = 4e-5, lambda = 4e-5
        (10, 2.0, 0.0, 2e-4, 1.6e-4),     # grow: d = 1.6e-4, lambda = 2e-4
        (30, 2.0, 0.0, 2e-4, 1.6e-4),     # 24 <= 30 < 48: unchanged
        (50, 2.0, 0.0, 1e-4, 1e-5),       # too many: lambda halves, d back to lambda0
        (5, 0.1, 0.5, 1e-4, 1e-5),        # CE < penalty: lambda and d hold
        (5, 2.0, 0.5, 1.4e-4, 4e-5),      # grows again: d = 4e-5, 1e-4 + 4e-5
        (5, 2.0, 0.5, 3e-4, 1.6e-4),      # and again: d = 1.6e-4
    ]
    for pruned, ce, reg, lam, d in rounds:
        s = P.lambda_update(s, pruned, **LAM, mean_ce=ce, mean_reg=reg)
        assert s.lam == pytest.approx(lam, rel=1e-9) and s.d == pytest.approx(d, rel=1e-9), (pruned, s)


# ---------------------------------------------------------------------------------------------------
# size proxy
# ---------------------------------------------------------------------------------------------------

def full_cell_size(c, reduction):
    """Per edge: sep3 18c + 2c^2, sep5 50c + 2c^2, dil3 9c + c^2, dil5 25c + c^2; 5 edges;
    skips from the cell inputs of a reduction cell (4 edges) c^2 each."""
    return 5 * (102 * c + 6 * c * c) + (4 * c * c if reduction else 0)


def op_spec(cell, node, src, name):
    (o,) = [o for o in cell.ops if (o.node, o.src, o.op) == (node, src, name)]
    return o


def test_size_proxy_hand_computed(net):
    spec, variables = net
    masks = P.to_numpy(variables["masks"])
    c0, c1 = spec.cells[0], spec.cells[1]
    full = full_cell_size(4, False) + full_cell_size(8, True) + full_cell_size(16, True)
    assert full == 25640
    assert P.size_proxy(spec, masks) == full
    assert P.size_proxy(spec, masks, range(1)) == 2520

    sep3 = op_spec(c0, 0, 0, "sep_conv_3x3")
    masks["cell_0"][S.op_name(sep3)]["sep"]["unit1"]["gate"]["beta"][[2]] = 0.0     # K1 = 3
    masks["cell_0"][S.op_name(sep3)]["sep"]["unit2"]["gate"]["beta"][[1, 2]] = 0.0  # K3 = 2
    assert P.op_size(c0, 0, sep3, masks) == 9 * 4 + 4 * 3 + 9 * 3 + 3 * 2 == 81

    sep5 = op_spec(c0, 1, 2, "sep_conv_5x5")
    assert P.op_size(c0, 0, sep5, masks) == 25 * 4 + 16 + 25 * 4 + 16 == 232
    masks["cell_0"][S.op_name(sep5)]["sep"]["unit1"]["gate"]["beta"][:] = 0.0      # K1 = 0
    assert P.op_size(c0, 0, sep5, masks) == 25 * 4

    dil3 = op_spec(c1, 0, 0, "dil_conv_3x3")
    masks["cell_1"][S.op_name(dil3)]["dil"]["unit"]["gate"]["beta"][[0, 1, 4, 6, 7]] = 0.0  # K1 = 3
    assert P.op_size(c1, 1, dil3, masks) == 9 * 8 + 8 * 3 == 96
    assert P.op_size(c1, 1, op_spec(c1, 0, 1, "dil_conv_5x5"), masks) == 25 * 8 + 64

    # skip: C^2 only from the inputs of a reduction cell; pools 0
    assert P.op_size(c1, 1, op_spec(c1, 0, 0, "skip_connect"), masks) == 64
    assert P.op_size(c1, 1, op_spec(c1, 1, 1, "skip_connect"), masks) == 64
    assert P.op_size(c1, 1, op_spec(c1, 1, 2, "skip_connect"), masks) == 0
    assert P.op_size(c0, 0, op_spec(c0, 0, 0, "skip_connect"), masks) == 0
    for name in ("avg_pool_3x3", "max_pool_3x3"):
        assert P.op_size(c0, 0, op_spec(c0, 0, 1, name), masks) == 0
        assert P.op_size(c1, 1, op_spec(c1, 0, 0, name), masks) == 0

    delta0 = (104 - 81) + (232 - 100)
    assert P.size_proxy(spec, masks, range(1)) == 2520 - delta0
    assert P.size_proxy(spec, masks) == full - delta0 - (136 - 96)
    assert P.size_proxy(spec, masks, range(1, 3)) == full - 2520 - 40


# ---------------------------------------------------------------------------------------------------
# count_units and reset_thresholds
# ---------------------------------------------------------------------------------------------------

def test_count_units(net):
    spec, variables = net
    masks = P.to_numpy(variables["masks"])
    # filters: preprocess 2C, 6C per edge (sep 2x, dil 1x), the FactorizedReduce skips of reduction cells
    filters = (2 * 4 + 5 * 24) + (2 * 8 + 5 * 48 + 4 * 8) + (2 * 16 + 5 * 96 + 4 * 16)
    # weights: the sep/dil kernels, 102 C + 6 C^2 per edge
    weights = sum(5 * (102 * c + 6 * c * c) for c in (4, 8, 16))
    assert P.count_units(spec, masks) == dict(ops=105, filters=filters, filters_total=filters,
                                              weights=weights, weights_total=weights)
    masks["cell_2"]["pre0"]["gate"]["beta"][:3] = 0.0
    masks["cell_1"]["op_1_2_sep_conv_5x5"]["sep"]["unit2"]["dw"]["kernel"][0, 0, 0, :5] = 0.0
    smaller = dataclasses.replace(spec, cells=(dataclasses.replace(spec.cells[0], ops=spec.cells[0].ops[:-4]),)
                                  + spec.cells[1:])
    assert P.count_units(smaller, masks) == dict(ops=101, filters=filters - 3, filters_total=filters,
                                                 weights=weights - 5, weights_total=weights)


def test_reset_thresholds(net):
    _, variables = net
    rng = np.random.default_rng(1)
    arch = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), variables["arch"])
    before = P.to_numpy(arch)
    out = P.reset_thresholds(arch)
    assert jax.tree.structure(out) == jax.tree.structure(arch)
    for path, leaf in leaves(out).items():
        if path[-1] in ("t_op", "t_k", "t_w", "t_pre"):
            np.testing.assert_array_equal(leaf, 0.0)
        else:
            assert path[-1] in ("alpha", "beta")
            np.testing.assert_array_equal(leaf, get(arch, path))
    chex.assert_trees_all_equal(arch, before)  # the input is not modified


# ---------------------------------------------------------------------------------------------------
# commits
# ---------------------------------------------------------------------------------------------------

def commit_case(net):
    """Thresholds that put known ops, filters and weights below; returns (variables, expectations)."""
    spec, variables = net
    v = copy(variables)
    arch, masks, params = v["arch"], v["masks"], v["params"]
    a0, a1, a2 = arch["cell_0"], arch["cell_1"], arch["cell_2"]
    removed = set()
    # cell 0, node 0 (edges 0-1): every op below t_op = 0.6; avg_pool on edge 1 has the best alpha
    a0["t_op"][:2] = 0.6
    a0["alpha"][1, idx("avg_pool_3x3")] = 0.3  # sigma = 0.574 < 0.6, protected
    removed |= {(0, e, k) for e in (0, 1) for k in range(7)} - {(0, 1, idx("avg_pool_3x3"))}
    # cell 0, node 1: three single ops below threshold
    for e, name in ((2, "sep_conv_3x3"), (3, "skip_connect"), (4, "max_pool_3x3")):
        a0["t_op"][e, idx(name)] = 0.6
        a0["t_k"][e, idx(name)] = 0.9  # filters of a removed op are not counted
        removed.add((0, e, idx(name)))
    # cell 1, op_0_0_sep_conv_3x3 (edge 0): filters; t_k is shared by both units
    a1["t_k"][0, idx("sep_conv_3x3")] = 0.5
    unit = arch["cell_1"]["op_0_0_sep_conv_3x3"]["sep"]
    unit["unit1"]["gate"]["beta"][:] = 1.0
    unit["unit1"]["gate"]["beta"][[3, 5]] = [-1.0, 0.0]   # sigma(0) = 0.5 is not above 0.5
    unit["unit2"]["gate"]["beta"][:] = 1.0
    unit["unit2"]["gate"]["beta"][0] = -2.0
    masks["cell_1"]["op_0_0_sep_conv_3x3"]["sep"]["unit2"]["gate"]["beta"][7] = 0.0  # already off, stays off
    # cell 1, pre1: one channel off
    a1["t_pre"][1] = 0.5
    arch["cell_1"]["pre1"]["gate"]["beta"][:] = 1.0
    arch["cell_1"]["pre1"]["gate"]["beta"][0] = -1.0
    # cell 2, op_1_2_dil_conv_3x3 (edge 4): weights |w| <= 0.2 off
    a2["t_w"][4, idx("dil_conv_3x3")] = 0.2
    dil = params["cell_2"]["op_1_2_dil_conv_3x3"]["dil"]["unit"]
    dil_masks = masks["cell_2"]["op_1_2_dil_conv_3x3"]["dil"]["unit"]
    dil["pw"]["kernel"][0, 0, 0, 0] = 0.45
    dil_masks["pw"]["kernel"][0, 0, 0, 0] = 0.0  # already off, stays off
    weights_off = int(sum(np.sum(np.abs(dil[k]["kernel"]) <= 0.2) for k in ("dw", "pw")))
    # cell 2, a FactorizedReduce skip: no threshold, never committed
    a2["t_k"][0, idx("skip_connect")] = 0.9
    arch["cell_2"]["op_0_0_skip_connect"]["fr"]["gate"]["beta"][:] = -5.0
    return v, dict(removed=removed, filters_off=2 + 1 + 1, weights_off=weights_off)


def test_thresholds_off_leaves_the_committed_masks_alone_in_force(net):
    """With every threshold below every score (how a record is scored), the live masks are the committed
    ones: a commit then switches nothing off, and committed-off units stay off."""
    spec, _ = net
    v, expect = commit_case(net)
    assert expect["removed"] and expect["weights_off"]          # the thresholds do bite
    v["masks"]["cell_0"]["ops"] = P.active_matrix(spec.cells[0])
    v["masks"]["cell_0"]["ops"][3, idx("sep_conv_5x5")] = 0.0   # one op committed off earlier
    arch = P.thresholds_off(v["arch"])
    assert jax.tree.structure(arch) == jax.tree.structure(v["arch"])
    live = P.op_live_masks(arch, spec, v["masks"])
    for on, committed in zip(live, P.committed_ops(v["masks"], spec)):
        np.testing.assert_array_equal(on, committed)
    r = P.commit(spec, v["params"], arch, v["masks"], remove=False)
    assert r.removed == [] and r.filters_off == 0 and r.weights_off == 0
    assert r.masks["cell_0"]["ops"][3, idx("sep_conv_5x5")] == 0.0
    chex.assert_trees_all_equal(r.masks, P.prune_tree(v["masks"], r.spec))


def node_counts(spec):
    return [[len(c.ops_into(j)) for j in range(c.steps)] for c in spec.cells]


def test_commit_removes_exactly_the_units_below_threshold(net):
    spec, _ = net
    v, expect = commit_case(net)
    before = copy(v)
    res = P.commit(spec, v["params"], v["arch"], v["masks"])
    chex.assert_trees_all_equal(v, before)  # inputs untouched

    removed = {(i, o.edge, o.op_index) for i, o in res.removed}
    assert removed == expect["removed"]
    assert len(res.removed) == len(expect["removed"]) == 16
    assert res.filters_off == expect["filters_off"]
    assert res.weights_off == expect["weights_off"] > 0

    # the new spec lists the surviving ops, in their old order
    for i, (old, new) in enumerate(zip(spec.cells, res.spec.cells)):
        assert new.ops == tuple(o for o in old.ops if (i, o.edge, o.op_index) not in removed)
    assert res.spec.cells[0].ops_into(0) == (G.OpSpec(0, 1, "avg_pool_3x3"),)
    assert min(min(n) for n in node_counts(res.spec)) >= 1

    # alpha of removed ops is pushed to REMOVED_ALPHA, the rest is unchanged
    alpha = res.arch["cell_0"]["alpha"]
    for _, e, k in removed:
        assert alpha[e, k] == P.REMOVED_ALPHA
    keep = np.ones((5, 7), bool)
    keep[tuple(np.array([(e, k) for _, e, k in removed]).T)] = False
    np.testing.assert_array_equal(alpha[keep], v["arch"]["cell_0"]["alpha"][keep])
    # removed ops leave the arch and mask trees
    for i, o in res.removed:
        assert S.op_name(o) not in res.arch[f"cell_{i}"] and S.op_name(o) not in res.masks[f"cell_{i}"]

    # committed filter and weight masks
    m = res.masks["cell_1"]["op_0_0_sep_conv_3x3"]["sep"]
    np.testing.assert_array_equal(m["unit1"]["gate"]["beta"], [1, 1, 1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(m["unit2"]["gate"]["beta"], [0, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(res.masks["cell_1"]["pre1"]["gate"]["beta"], [0, 1, 1, 1, 1, 1, 1, 1])
    dil = v["params"]["cell_2"]["op_1_2_dil_conv_3x3"]["dil"]["unit"]
    dil_masks = res.masks["cell_2"]["op_1_2_dil_conv_3x3"]["dil"]["unit"]
    np.testing.assert_array_equal(dil_masks["dw"]["kernel"], np.abs(dil["dw"]["kernel"]) > 0.2)
    expected_pw = (np.abs(dil["pw"]["kernel"]) > 0.2).astype(np.float32)
    expected_pw[0, 0, 0, 0] = 0.0
    np.testing.assert_array_equal(dil_masks["pw"]["kernel"], expected_pw)
    np.testing.assert_array_equal(res.masks["cell_2"]["op_0_0_skip_connect"]["fr"]["gate"]["beta"], 1.0)

    # committed masks only ever go 1 -> 0, and only where asked
    old = leaves(v["masks"])
    changed = set()
    for path, new in leaves(res.masks).items():
        assert np.all((new == 0) | (new == 1)) and np.all(new <= old[path])
        if np.any(new != old[path]):
            changed.add(path[:2])
    # the committed op masks ("ops") follow the new spec: 1 exactly for the ops still in it
    for i, cell in enumerate(res.spec.cells):
        np.testing.assert_array_equal(res.masks[f"cell_{i}"]["ops"], S.active_matrix(cell))
    changed = {p for p in changed if p[1] != "ops"}
    assert changed == {("cell_1", "op_0_0_sep_conv_3x3"), ("cell_1", "pre1"), ("cell_2", "op_1_2_dil_conv_3x3")}


def test_commit_inside_a_stage_keeps_the_structure(net):
    """remove=False: ops committed off stay built, gated off by their `ops` mask entry; nothing else
    differs from a removing commit, and a later removal drops exactly them."""
    spec, _ = net
    v, _ = commit_case(net)
    removing = P.commit(spec, v["params"], v["arch"], v["masks"])
    keeping = P.commit(spec, v["params"], v["arch"], v["masks"], remove=False)
    assert keeping.spec == spec
    assert [(i, o) for i, o in keeping.removed] == [(i, o) for i, o in removing.removed]
    assert (keeping.filters_off, keeping.weights_off) == (removing.filters_off, removing.weights_off)
    for i, o in keeping.removed:
        assert keeping.masks[f"cell_{i}"]["ops"][o.edge, o.op_index] == 0
    assert P.count_units(keeping.spec, keeping.masks) == P.count_units(removing.spec, removing.masks)
    assert P.size_proxy(keeping.spec, keeping.masks) == P.size_proxy(removing.spec, removing.masks)
    trees = {"params": P.to_numpy(v["params"]), "arch": keeping.arch, "batch_stats": {}, "masks": keeping.masks}
    dropped, _ = P.drop_committed_off(keeping.spec, trees)
    assert dropped == removing.spec


def test_commit_follows_the_gate_functions(net, monkeypatch):
    """The commit calls gates.py's rules (the forward's): change one there and the commit follows."""
    spec, _ = net
    v, expected = commit_case(net)
    dil = names.op_path(2, G.OpSpec(1, 2, "dil_conv_3x3")) + names.conv_units("dil_conv_3x3")[0]
    kernels = [(get(v["params"], p), get(v["masks"], p)) for p in names.unit_kernels(dil)]
    monkeypatch.setattr(gates, "filter_mask", lambda beta, t, committed=None: committed)  # never prunes a filter
    monkeypatch.setattr(gates, "weight_mask", lambda w, t, committed=None: (jnp.abs(w) > 2 * t) * committed)
    monkeypatch.setattr(gates, "protect_last_op", lambda live, *args, **kwargs: live)  # no protection
    res = P.commit(spec, v["params"], v["arch"], v["masks"])
    assert res.filters_off == 0 and expected["filters_off"] > 0
    assert res.weights_off == sum(int(np.sum((np.abs(w) <= 0.4) & (m > 0))) for w, m in kernels) > expected["weights_off"]
    protected = (0, 1, idx("avg_pool_3x3"))  # commit_case's op that only the protection keeps
    assert {(i, o.edge, o.op_index) for i, o in res.removed} == expected["removed"] | {protected}


def test_commit_agrees_with_the_jitted_forward_at_ties(net):
    """Random scores with thresholds exactly at sigma(score) or |w| (a tie is off: the gate is H(x > 0))
    and a node whose ops all fall below t_op: what the commit keeps is what the jitted forward's gates let
    through (ops.FilterGate for filters, gates.op_gate with its protection for ops, the kernel masks of
    ops.Conv)."""
    spec, variables = net
    v = copy(variables)
    rng = np.random.default_rng(7)
    sigmoid = jax.jit(jax.nn.sigmoid)
    for i in range(LAYERS):
        a = v["arch"][names.cell_name(i)]
        a["alpha"][:] = rng.normal(0.0, 1.0, a["alpha"].shape)
        p = np.asarray(sigmoid(a["alpha"]))
        a["t_op"][:] = np.where(rng.random(p.shape) < 0.3, p, p + rng.normal(0.0, 0.1, p.shape))
        a["t_op"][:2] = 0.999  # node 0: every op below threshold, its best op protected
        a["t_pre"][:] = np.asarray(sigmoid(get(v["arch"], names.gate(names.pre_path(i, 0)))[:1]))[0]
        for o in spec.cells[i].ops:
            for unit in names.conv_units(o.op):
                beta = get(v["arch"], names.gate(names.op_path(i, o) + unit))
                beta[:] = rng.normal(0.0, 1.0, beta.shape)
            if names.conv_units(o.op):
                first = names.op_path(i, o) + names.conv_units(o.op)[0]
                a["t_k"][o.edge, o.op_index] = np.asarray(sigmoid(get(v["arch"], names.gate(first))))[0]
                a["t_w"][o.edge, o.op_index] = np.abs(get(v["params"], names.unit_kernels(first)[0])).ravel()[0]
        for k in range(2):
            beta = get(v["arch"], names.gate(names.pre_path(i, k)))
            beta[1:] = rng.normal(0.0, 1.0, beta.shape[0] - 1)
    res = P.commit(spec, v["params"], v["arch"], v["masks"])

    gate_forward = jax.jit(lambda beta, m, t: ops.FilterGate(beta.shape[0]).apply(
        {"arch": {names.BETA: beta}, "masks": {names.BETA: m}}, jnp.ones((1,) + beta.shape), t)[0])
    weight_forward = jax.jit(gates.weight_mask)
    removed = {(i, o) for i, o in res.removed}
    n_tied = 0
    for i, cell in enumerate(spec.cells):
        a = v["arch"][names.cell_name(i)]
        g, _ = jax.jit(gates.op_gate)(a["alpha"], a["t_op"], S.active_matrix(cell), gates.edge_nodes(cell.steps))
        g = np.asarray(g)
        assert {o for o in cell.ops if g[o.edge, o.op_index] == 0} == {o for j, o in removed if j == i}
        assert all(np.any(g[gates.edge_nodes(cell.steps) == j] > 0) for j in range(cell.steps))
        n_tied += int(np.sum(a["t_op"] == np.asarray(sigmoid(a["alpha"]))))
        for k in range(2):
            path = names.gate(names.pre_path(i, k))
            kept = np.asarray(gate_forward(get(v["arch"], path), get(v["masks"], path), a["t_pre"][k])) > 0
            np.testing.assert_array_equal(get(res.masks, path), kept)
        for o in cell.ops:
            if (i, o) in removed:
                continue
            for unit in names.conv_units(o.op):
                u = names.op_path(i, o) + unit
                kept = np.asarray(gate_forward(get(v["arch"], names.gate(u)), get(v["masks"], names.gate(u)),
                                               a["t_k"][o.edge, o.op_index])) > 0
                np.testing.assert_array_equal(get(res.masks, names.gate(u)), kept)
                for path in names.unit_kernels(u):
                    live = weight_forward(get(v["params"], path), a["t_w"][o.edge, o.op_index], get(v["masks"], path))
                    np.testing.assert_array_equal(get(res.masks, path), np.asarray(live))
    assert n_tied > 0 and res.filters_off > 0 and res.weights_off > 0 and removed


def test_commit_again_changes_nothing(net):
    """A second commit with the same thresholds: removed ops stay out, the protected op stays in."""
    spec, _ = net
    v, _ = commit_case(net)
    res = P.commit(spec, v["params"], v["arch"], v["masks"])
    again = P.commit(res.spec, P.prune_tree(v["params"], res.spec), res.arch, res.masks)
    assert again.removed == [] and again.filters_off == 0 and again.weights_off == 0
    assert again.spec == res.spec
    chex.assert_trees_all_equal(again.masks, res.masks)
    chex.assert_trees_all_equal(again.arch, res.arch)


def test_commit_protection_keeps_one_op_per_node(net):
    """Every op below threshold: each node of each cell keeps exactly its best op."""
    spec, variables = net
    v = copy(variables)
    rng = np.random.default_rng(2)
    best = {}
    for i in range(LAYERS):
        a = v["arch"][f"cell_{i}"]
        a["alpha"][:] = rng.normal(0.0, 1.0, (5, 7))
        a["t_op"][:] = 0.999
        nodes = np.array([0, 0, 1, 1, 1])
        for j in range(STEPS):
            rows = np.flatnonzero(nodes == j)
            e, k = np.unravel_index(np.argmax(a["alpha"][rows]), (len(rows), 7))
            best[i, j] = (int(rows[e]), int(k))
    res = P.commit(spec, v["params"], v["arch"], v["masks"])
    assert node_counts(res.spec) == [[1, 1]] * LAYERS
    assert len(res.removed) == 105 - 6
    for i, cell in enumerate(res.spec.cells):
        for j in range(STEPS):
            (o,) = cell.ops_into(j)
            assert (o.edge, o.op_index) == best[i, j]


# ---------------------------------------------------------------------------------------------------
# regrowth
# ---------------------------------------------------------------------------------------------------

def regrowth_case():
    rng = np.random.default_rng(3)
    alpha = [rng.normal(0.0, 1.0, (5, 7)) for _ in range(2)]
    momentum = [rng.normal(0.0, 0.1, (5, 7)) for _ in range(2)]
    active = [np.ones((5, 7)), np.ones((5, 7))]
    active[0][:, idx("dil_conv_5x5")] = 0.0       # no active edge of this type in cell 0
    active[0][[0, 3], idx("sep_conv_3x3")] = 0.0
    active[1][1:, :] = 0.0                         # cell 1: only edge 0 left
    active[1][0, idx("max_pool_3x3")] = 0.0
    return alpha, momentum, active


def regrowth_by_hand(alpha, momentum, active):
    """docs/method.md section 5, written out with loops."""
    cells = len(alpha)
    g, a = np.zeros((cells, 7)), np.zeros((cells, 7))
    for i in range(cells):
        for j in range(7):
            edges = [e for e in range(5) if active[i][e, j] > 0]
            if edges:
                g[i, j] = np.mean([abs(momentum[i][e, j]) for e in edges])
                a[i, j] = np.mean([1.0 / (1.0 + math.exp(-alpha[i][e, j])) for e in edges])
        present = [j for j in range(7) if active[i][:, j].any()]
        for j in range(7):
            if j not in present:  # half of the cell's minimum
                g[i, j] = 0.5 * min(g[i, k] for k in present)
                a[i, j] = 0.5 * min(a[i, k] for k in present)
    i_op = 0.5 * g / g.sum(1, keepdims=True) + 0.5 * a / a.sum(1, keepdims=True)
    n_active = np.array([active[i].sum() for i in range(cells)])
    cg, ca = g.sum(1) / n_active, a.sum(1) / n_active
    i_cell = 0.5 * cg / cg.sum() + 0.5 * ca / ca.sum()
    return i_cell[:, None] * i_op, g, a


def test_regrowth_probabilities_hand_computed():
    alpha, momentum, active = regrowth_case()
    p = P.regrowth_probabilities(alpha, momentum, active)
    expected, g, a = regrowth_by_hand(alpha, momentum, active)
    chex.assert_shape(p, (2, 7))
    np.testing.assert_allclose(p, expected, rtol=1e-10)
    assert p.sum() == pytest.approx(1.0)
    # the type without an active edge in cell 0 gets half of the cell's minimum
    j = idx("dil_conv_5x5")
    assert g[0, j] == pytest.approx(0.5 * np.delete(g[0], j).min())
    assert a[0, j] == pytest.approx(0.5 * np.delete(a[0], j).min())
    assert np.all(p > 0)


def test_sample_regrowth_frequencies():
    alpha, momentum, active = regrowth_case()
    p = P.regrowth_probabilities(alpha, momentum, active)
    n = 20000
    draws = P.sample_regrowth(jax.random.key(7), p, n)
    assert len(draws) == n
    counts = np.zeros_like(p)
    for i, j in draws:
        counts[i, j] += 1
    freq = counts / n
    np.testing.assert_array_less(np.abs(freq - p), 5.0 * np.sqrt(p * (1 - p) / n) + 1e-3)
    assert P.sample_regrowth(jax.random.key(7), p, 0) == []
    assert all(0 <= i < 2 and 0 <= j < 7 for i, j in draws)
    # the same key gives the same draws
    assert P.sample_regrowth(jax.random.key(7), p, 50) == P.sample_regrowth(jax.random.key(7), p, 50)


def pruned_spec():
    """Cell 0 without sep_conv_3x3 on edges 1 and 3 (and sep_conv_5x5 of edge 0 shrunk);
    cell 2 without dil_conv_5x5 on edge 4."""
    spec = S.SuperNetSpec(S.full_cells(C, LAYERS, steps=STEPS), num_classes=10, stem_channels=3 * C)
    c0, c2 = spec.cells[0], spec.cells[2]
    ops0 = tuple(dataclasses.replace(o, mid=2, out_index=(0, 3)) if (o.edge, o.op) == (0, "sep_conv_5x5") else o
                 for o in c0.ops if not (o.op == "sep_conv_3x3" and o.edge in (1, 3)))
    ops2 = tuple(o for o in c2.ops if not (o.op == "dil_conv_5x5" and o.edge == 4))
    cells = (dataclasses.replace(c0, ops=ops0), spec.cells[1], dataclasses.replace(c2, ops=ops2))
    return dataclasses.replace(spec, cells=cells)


def test_regrow_brings_back_committed_off_edges_of_the_drawn_type():
    spec = pruned_spec()
    draws = [(0, idx("sep_conv_3x3")), (1, idx("max_pool_3x3")), (2, idx("dil_conv_5x5")),
             (2, idx("dil_conv_5x5"))]
    new, grown = P.regrow(spec, jax.random.key(0), draws)
    # (1, max_pool) and the second (2, dil_conv_5x5) have nothing committed off: skipped
    assert len(grown) == 2
    (i0, o0), (i2, o2) = grown
    assert i0 == 0 and o0.op == "sep_conv_3x3" and o0.edge in (1, 3)
    assert (i2, o2) == (2, G.OpSpec(1, 2, "dil_conv_5x5"))
    # regrown at full width
    assert o0.mid is None and o0.out_index is None and o2.mid is None and o2.out_index is None
    # cells keep the canonical op order, nothing else changes
    order = lambda o: (o.node, o.src, o.op_index)
    for cell in new.cells:
        assert list(cell.ops) == sorted(cell.ops, key=order)
    assert set(new.cells[0].ops) == set(spec.cells[0].ops) | {o0}
    assert new.cells[1] == spec.cells[1]
    assert new.cells[2] == S.full_cell(16, True, STEPS)
    assert len(set(new.cells[0].ops)) == len(new.cells[0].ops)


def test_regrow_chooses_the_edge_uniformly_and_skips_full_cells():
    spec = pruned_spec()
    edges = [P.regrow(spec, jax.random.key(s), [(0, idx("sep_conv_3x3"))])[1][0][1].edge for s in range(40)]
    assert set(edges) == {1, 3}
    assert 8 <= edges.count(1) <= 32
    # drawn twice: both edges come back
    new, grown = P.regrow(spec, jax.random.key(0), [(0, idx("sep_conv_3x3"))] * 3)
    assert sorted(o.edge for _, o in grown) == [1, 3]
    assert sum(o.op == "sep_conv_3x3" for o in new.cells[0].ops) == 5
    # nothing to regrow anywhere
    full = dataclasses.replace(spec, cells=S.full_cells(C, LAYERS, steps=STEPS))
    same, grown = P.regrow(full, jax.random.key(0), [(i, j) for i in range(3) for j in range(7)])
    assert grown == [] and same == full


def test_regrown_ops_get_back_their_alpha_from_before_the_pruning(net):
    """pruned_alphas reads alpha before the commit pushes it to REMOVED_ALPHA; restore_regrown puts it
    back (0 for an op with nothing saved)."""
    spec, _ = net
    v, expect = commit_case(net)
    v["arch"]["cell_0"]["alpha"][2, idx("sep_conv_3x3")] = -0.7
    res = P.commit(spec, v["params"], v["arch"], v["masks"])
    saved = P.pruned_alphas(v["arch"], res.removed)
    assert len(saved) == 16 and saved["0/2/1"] == pytest.approx(-0.7) and "0/1/5" not in saved  # protected
    assert saved["0/0/0"] == 0.0
    grown = [(0, G.OpSpec(1, 0, "sep_conv_3x3")), (2, G.OpSpec(1, 2, "dil_conv_3x3"))]
    out = P.restore_regrown(res.arch, grown, saved)
    expected = np.array(res.arch["cell_0"]["alpha"])
    expected[2, idx("sep_conv_3x3")] = -0.7
    np.testing.assert_array_equal(out["cell_0"]["alpha"], expected)
    assert out["cell_2"]["alpha"][4, idx("dil_conv_3x3")] == 0.0        # never pruned: nothing saved
    assert res.arch["cell_0"]["alpha"][2, idx("sep_conv_3x3")] == P.REMOVED_ALPHA  # input untouched


def test_common_width_follows_the_released_rule():
    """Entries: pre0, pre1 (committed, up to even, at least 2), per node the most committed outputs of a
    conv op (up to even; none: the entry before). Mean (up to even) if >= C/2, else the max if >= C/2,
    else C/2. C = 8 here, 2 nodes: entries [pre0, pre1, node 0, node 1]."""
    cell = S.full_cell(8, False, STEPS)
    sep, dil = G.OpSpec(0, 0, "sep_conv_3x3"), G.OpSpec(1, 2, "dil_conv_3x3")

    def masks(pre0, pre1, sep_out, dil_out, conv_on=True, width=8):
        on = lambda n: (np.arange(width) < n).astype(float)
        ops_mask = S.active_matrix(cell)
        if not conv_on:
            for o in cell.ops:
                if o.op in ops.CONV_OPS:
                    ops_mask[o.edge, o.op_index] = 0.0
        m = {"ops": ops_mask, "pre0": {"gate": {"beta": on(pre0)}}, "pre1": {"gate": {"beta": on(pre1)}}}
        for o in cell.ops:
            if o.op in ops.CONV_OPS:
                n = sep_out if o == sep else dil_out if o == dil else 1
                unit = ("sep", "unit2") if o.op.startswith("sep") else ("dil", "unit")
                m[S.op_name(o)] = {unit[0]: {unit[1]: {"gate": {"beta": on(n)}}}}
        return {"cell_0": m}

    # [8, 6, 6, 8] (node 0's max 5 -> 6): mean 7 -> 8 >= 4
    assert P.common_width(cell, 0, masks(8, 6, 5, 8)) == 8
    # [2, 2, 2, 6]: mean 3 -> 4 >= 4
    assert P.common_width(cell, 0, masks(1, 0, 2, 5)) == 4
    # [2, 2, 2, 2]: mean 2 < 4, max 2 < 4: half the width
    assert P.common_width(cell, 0, masks(2, 2, 1, 1)) == 4
    # C = 16: [2, 2, 2, 10]: mean 4 < 8, max 10 >= 8
    assert P.common_width(S.full_cell(16, False, STEPS), 0, masks(2, 2, 2, 10, width=16)) == 10
    # the regrown ops themselves do not count: without the dil_conv of node 1, [2, 2, 2, 2]
    assert P.common_width(S.full_cell(16, False, STEPS), 0, masks(2, 2, 2, 10, width=16),
                          exclude={(dil.edge, dil.op_index)}) == 8
    # no committed conv op: every node repeats pre1's entry: [6, 4, 4, 4] -> mean 4.5 -> int 4 >= 4
    assert P.common_width(cell, 0, masks(6, 4, 8, 8, conv_on=False)) == 4


def test_regrown_ops_take_the_common_width_at_the_node_channels_used_most():
    spec = pruned_spec()   # cell 0: sep_conv_5x5 of edge 0 writes channels (0, 3); C = 4
    draws = [(0, idx("sep_conv_3x3")), (2, idx("dil_conv_5x5"))]
    new, grown = P.regrow(spec, jax.random.key(0), draws)
    (_, o0), _ = grown
    masks = {"cell_0": {"pre0": {"gate": {"beta": np.array([1.0, 0, 0, 0])}},
                        "pre1": {"gate": {"beta": np.array([1.0, 0, 0, 0])}}}}
    # cell 0 entries [2, 2, 4, 4] (no filter masks: conv ops count their written channels): mean 3 -> 4
    # = C: full width; cell 2 is the network's last cell: full width too
    sized_spec, sized = P.size_regrown(new, grown, masks, full_width_cells=(2,))
    assert [o for _, o in sized] == [o for _, o in grown]
    # narrower: every conv op of cell 0 writes 2 channels -> entries [2, 2, 2, 2] -> C/2 = 2
    narrow = dataclasses.replace(new.cells[0], ops=tuple(
        dataclasses.replace(o, out_index=(0, 3), mid=2) if o.op in ops.CONV_OPS and o != o0 else o
        for o in new.cells[0].ops))
    spec2 = dataclasses.replace(new, cells=(narrow,) + new.cells[1:])
    sized_spec, sized = P.size_regrown(spec2, grown, masks, full_width_cells=(2,))
    (_, s0), (_, s2) = sized
    assert s0.mid == 2 and len(s0.out_index) == 2 and s2 == grown[1][1]
    # the node's ops all write 0 and 3 (the pools and skips write all four): those two
    assert s0.out_index == (0, 3)
    assert s0 in sized_spec.cells[0].ops and o0 not in sized_spec.cells[0].ops


# ---------------------------------------------------------------------------------------------------
# graft
# ---------------------------------------------------------------------------------------------------

def test_graft_carries_leaves_with_the_same_path_and_shape():
    new = {"a": {"w": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.float32)},
           "c": jnp.zeros((1,)), "fresh": np.ones(2, np.float32), "i": np.zeros(2, np.int32)}
    old = {"a": {"w": np.ones(3, np.float32), "b": np.ones((3, 2), np.float32)},
           "c": jnp.full((1,), 5.0), "gone": np.ones(4), "i": np.ones(2, np.float32)}
    out = P.graft(new, old)
    assert jax.tree.structure(out) == jax.tree.structure(new)
    np.testing.assert_array_equal(out["a"]["w"], 1.0)       # same path and shape: carried
    np.testing.assert_array_equal(out["a"]["b"], np.zeros((2, 2)))  # other shape: fresh
    np.testing.assert_array_equal(out["c"], 5.0)
    np.testing.assert_array_equal(out["fresh"], 1.0)         # not in old: fresh
    np.testing.assert_array_equal(out["i"], 0)               # other dtype: fresh
    assert out["i"].dtype == np.int32 and "gone" not in out


def test_graft_onto_a_regrown_supernet(net):
    """A regrown op starts from its fresh values; every other leaf carries over."""
    spec, variables = net
    old = copy(variables)
    del old["params"]["cell_0"]["op_0_1_sep_conv_3x3"]  # as if committed off
    old["params"]["cell_0"]["pre0"]["conv"]["kernel"] = old["params"]["cell_0"]["pre0"]["conv"]["kernel"][..., :2]
    fresh = jax.tree.map(lambda x: x + 1.0, variables["params"])
    out = P.graft(fresh, old["params"])
    for path, leaf in leaves(out).items():
        # the regrown op, and pre0's kernel of another shape (its affine BN keeps its shape: carried)
        if path[:2] == ("cell_0", "op_0_1_sep_conv_3x3") or path[:3] == ("cell_0", "pre0", "conv"):
            np.testing.assert_array_equal(leaf, get(fresh, path))
        else:
            np.testing.assert_array_equal(leaf, get(variables["params"], path))


# ---------------------------------------------------------------------------------------------------
# physical shrinking: the network output does not change
# ---------------------------------------------------------------------------------------------------

def keep_pattern(width, kind):
    """Channels a beta vector keeps; a few patterns only, so the shrunk net has few distinct shapes."""
    keep = np.ones(width, bool)
    if kind == 1:
        keep[1::2] = False
    elif kind == 2:
        keep[-1] = False
    elif kind == 3:
        keep[width // 2:] = False
    elif kind == 4:
        keep[:] = False
    return keep


@pytest.fixture(scope="module")
def shrink_case(net):
    spec, variables = net
    rng = np.random.default_rng(4)
    v = copy(variables)
    special = {("cell_0", "op_0_1_sep_conv_3x3", "unit1"): 4,   # all inner channels off
               ("cell_1", "op_1_2_sep_conv_5x5", "unit2"): 4,   # all outputs off
               ("cell_2", "op_0_0_dil_conv_3x3", "unit"): 4,
               ("cell_2", "pre0", "pre0"): 1}                   # FactorizedReduce: both halves shrink

    def beta(path, x):
        kind = special.get((path[0], path[1], path[-3]), int(rng.integers(4)))
        mag = rng.uniform(0.2, 2.0, x.shape)
        return np.where(keep_pattern(x.shape[0], kind), mag, -mag).astype(np.float32)

    for path, x in leaves(v["arch"]).items():
        parent = get(v["arch"], path[:-1])
        if path[-1] == "alpha":
            parent["alpha"] = rng.normal(-0.3, 1.0, x.shape).astype(np.float32)
            parent["t_op"][:], parent["t_k"][:], parent["t_w"][:], parent["t_pre"][:] = 0.5, 0.5, 0.1, 0.5
        elif path[-1] == "beta":
            parent["beta"] = beta(path, x)
    for cell, op, _ in list(special)[:3]:  # make sure these ops survive the commit
        e, k = G.OpSpec(*names.parse_op_name(op)).edge, idx(names.parse_op_name(op)[2])
        v["arch"][cell]["alpha"][e, k] = 2.0
    for path, x in leaves(v["batch_stats"]).items():
        get(v["batch_stats"], path[:-1])[path[-1]] = (
            rng.normal(0.0, 0.5, x.shape) if path[-1] == "mean" else rng.uniform(0.5, 1.5, x.shape)).astype(np.float32)

    res = P.commit(spec, v["params"], v["arch"], v["masks"])
    assert 10 < len(res.removed) < 95 and res.filters_off > 0 and res.weights_off > 0
    before = dict(v, arch=P.graft(v["arch"], res.arch), masks=P.graft(v["masks"], res.masks))
    pruned = dict(params=P.prune_tree(v["params"], res.spec), arch=res.arch, masks=res.masks,
                  batch_stats=P.prune_tree(v["batch_stats"], res.spec))
    new_spec, shrunk = P.shrink(res.spec, pruned)
    x = rng.normal(size=(2,) + INPUT).astype(np.float32)
    return dict(spec=spec, v=v, res=res, before=before, pruned=pruned, new_spec=new_spec, shrunk=shrunk, x=x)


def forward(spec, variables, x, train):
    net = S.SuperNet(spec)
    if train:
        return net.apply(variables, x, train=True, mutable=["batch_stats"])
    return net.apply(variables, x, train=False), None


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_commit_prune_and_shrink_keep_the_output(shrink_case, train):
    c = shrink_case
    y0, _ = forward(c["spec"], c["v"], c["x"], train)                        # live masks, nothing committed
    y1, _ = forward(c["spec"], c["before"], c["x"], train)                   # old spec, committed masks
    y2, stats2 = forward(c["res"].spec, c["pruned"], c["x"], train)          # removed ops gone
    y3, stats3 = forward(c["new_spec"], c["shrunk"], c["x"], train)          # filters physically gone
    chex.assert_shape([y0, y1, y2, y3], (2, 10))
    assert np.all(np.isfinite(np.asarray(y0))) and float(jnp.std(y0)) > 1e-3
    for y in (y1, y2, y3):
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    if train:
        # the running statistics of what stays move exactly as before the shrink
        _, expected = P.shrink(c["res"].spec, dict(c["pruned"], batch_stats=stats2["batch_stats"]))
        chex.assert_trees_all_close(P.to_numpy(stats3["batch_stats"]), expected["batch_stats"],
                                    rtol=1e-5, atol=1e-6)


def count(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_shrink_shapes_follow_the_new_spec(shrink_case):
    c = shrink_case
    res, new_spec, shrunk = c["res"], c["new_spec"], c["shrunk"]
    assert count(shrunk["params"]) < count(c["pruned"]["params"])
    assert count(shrunk["masks"]) < count(c["pruned"]["masks"])
    assert set(shrunk) == {"params", "arch", "batch_stats", "masks"}
    assert P.size_proxy(new_spec, shrunk["masks"]) == P.size_proxy(res.spec, res.masks)
    assert P.count_units(new_spec, shrunk["masks"])["filters"] == P.count_units(res.spec, res.masks)["filters"]
    seen_all_off = 0
    for i, (old_cell, cell) in enumerate(zip(res.spec.cells, new_spec.cells)):
        cname, width = f"cell_{i}", cell.width
        assert [(o.node, o.src, o.op) for o in cell.ops] == [(o.node, o.src, o.op) for o in old_cell.ops]
        p, m, a, b = (shrunk[k][cname] for k in ("params", "masks", "arch", "batch_stats"))
        for o in cell.ops:
            name, k = S.op_name(o), ops.kernel_size(o.op)
            mid = width if o.mid is None else o.mid
            out = width if o.out_index is None else len(o.out_index)
            old_m = res.masks[cname].get(name, {})  # pools and plain skips have no masks
            if o.op.startswith("sep"):
                u1, u2 = ("sep", "unit1"), ("sep", "unit2")
                assert get(p[name], u1 + ("pw", "kernel")).shape == (1, 1, width, mid)
                assert get(p[name], u2 + ("dw", "kernel")).shape == (k, k, 1, mid)
                assert get(p[name], u2 + ("pw", "kernel")).shape == (1, 1, mid, out)
                assert get(m[name], u2 + ("dw", "kernel")).shape == (k, k, 1, mid)
                assert get(m[name], u2 + ("pw", "kernel")).shape == (1, 1, mid, out)
                assert get(a[name], u1 + ("gate", "beta")).shape == (mid,)
                assert get(b[name], u1 + ("bn", "mean")).shape == (mid,)
                assert get(b[name], u2 + ("bn", "var")).shape == (out,)
                n1 = int(get(old_m, u1 + ("gate", "beta")).sum())
                assert mid == max(n1, 1)
                kept2 = np.flatnonzero(get(old_m, u2 + ("gate", "beta")))
                if kept2.size:
                    assert tuple(range(width) if o.out_index is None else o.out_index) == tuple(kept2)
                units = (u1, u2)
            elif o.op.startswith("dil"):
                assert get(p[name], ("dil", "unit", "pw", "kernel")).shape == (1, 1, width, out)
                assert get(p[name], ("dil", "unit", "dw", "kernel")).shape == (k, k, 1, width)
                kept = np.flatnonzero(get(old_m, ("dil", "unit", "gate", "beta")))
                if kept.size:
                    assert tuple(range(width) if o.out_index is None else o.out_index) == tuple(kept)
                units = (("dil", "unit"),)
            else:
                assert o.mid is None and o.out_index is None
                units = ()
            for u in units:  # what stays is committed; an all-off unit keeps one channel, masked
                g = get(m[name], u + ("gate", "beta"))
                if not np.all(g == 1):
                    assert g.shape == (1,) and g[0] == 0
                    seen_all_off += 1
        for j, pre in enumerate(("pre0", "pre1")):
            index = cell.pre0_index if j == 0 else cell.pre1_index
            n = width if index is None else len(index)
            kept = np.flatnonzero(res.masks[cname][pre]["gate"]["beta"])
            assert tuple(range(width) if index is None else index) == tuple(kept)
            assert a[pre]["gate"]["beta"].shape == (n,) and m[pre]["gate"]["beta"].shape == (n,)
            if "conv" in p[pre]:
                assert p[pre]["conv"]["kernel"].shape[-1] == n
                assert b[pre]["bn"]["mean"].shape == (n,)
            else:
                n1, n2 = ops.factorized_halves(index, width)
                assert p[pre]["fr"]["conv1"]["kernel"].shape[-1] == n1
                assert p[pre]["fr"]["conv2"]["kernel"].shape[-1] == n2
                assert b[pre]["fr"]["bn"]["mean"].shape == (n,)
    assert seen_all_off == 3
    assert any(o.mid is not None for cell in new_spec.cells for o in cell.ops)
    assert any(cell.pre0_index is not None and cell.reduction for cell in new_spec.cells[2:])


def test_shrink_and_commit_again_change_nothing(shrink_case):
    """A shrunk super-net is a fixed point: shrinking again, or committing with the same thresholds."""
    c = shrink_case
    spec2, again = P.shrink(c["new_spec"], c["shrunk"])
    assert spec2 == c["new_spec"]
    chex.assert_trees_all_equal(again, c["shrunk"])
    res = P.commit(c["new_spec"], c["shrunk"]["params"], c["shrunk"]["arch"], c["shrunk"]["masks"])
    assert res.removed == [] and res.filters_off == 0 and res.weights_off == 0
    assert res.spec == c["new_spec"]
    chex.assert_trees_all_equal(res.masks, c["shrunk"]["masks"])


def variable_shapes(spec):
    """{(collection, ...path): shape} of SuperNet(spec)'s variables (traced only, nothing computed)."""
    x = jnp.zeros((2,) + INPUT, jnp.float32)
    shapes = jax.eval_shape(lambda: S.SuperNet(spec).init(jax.random.key(0, impl="rbg"), x, train=False))
    return {path: tuple(s.shape) for path, s in leaves(dict(shapes)).items()}


@pytest.mark.parametrize("half", [None, "first", "second"])
def test_shrunk_variables_have_the_structure_of_the_new_spec(shrink_case, half):
    """After shrinking, the variables are exactly what SuperNet(new spec).init gives, leaf for leaf.

    half: the FactorizedReduce preprocess of cell 2 keeps channels of one half only, so one of its two
    convs has no output channel left (the new spec does not build it).
    """
    c = shrink_case
    variables, spec = c["pruned"], c["res"].spec
    if half is not None:
        variables = copy(variables)
        m = variables["masks"]["cell_2"]["pre0"]["gate"]["beta"]
        m[:] = 1.0
        m[8:] = 0.0
        if half == "second":
            m[:] = 1.0 - m
    new_spec, shrunk = P.shrink(spec, variables)
    expected = variable_shapes(new_spec)
    got = {path: tuple(np.shape(x)) for path, x in leaves(shrunk).items()}
    extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    assert not extra and not missing, f"leaves the new spec does not have: {extra}; missing: {missing}"
    assert got == expected


# ---------------------------------------------------------------------------------------------------
# operation level only (filter_level = weight_level = False: no filter or weight masks at all)
# ---------------------------------------------------------------------------------------------------

def test_op_level_only_commit_size_and_shrink():
    spec = S.SuperNetSpec(S.full_cells(C, LAYERS, steps=STEPS), num_classes=10, stem_channels=3 * C,
                          filter_level=False, weight_level=False)
    arch = {f"cell_{i}": {k: np.zeros((5, 7), np.float32) for k in ("alpha", "t_op", "t_k", "t_w")}
            for i in range(LAYERS)}
    for a in arch.values():
        a["t_pre"] = np.zeros(2, np.float32)
    arch["cell_1"]["t_op"][3, idx("sep_conv_5x5")] = 0.6
    arch["cell_1"]["t_k"][:] = arch["cell_1"]["t_w"][:] = 0.9
    res = P.commit(spec, {}, arch, {})
    assert [(i, o.edge, o.op) for i, o in res.removed] == [(1, 3, "sep_conv_5x5")]
    assert res.filters_off == 0 and res.weights_off == 0 and res.masks == {}
    # without masks every filter counts, at the op's own widths
    assert P.size_proxy(spec, {}) == 25640
    c0 = spec.cells[0]
    sep3 = dataclasses.replace(op_spec(c0, 0, 0, "sep_conv_3x3"), mid=2, out_index=(0, 1, 2))
    assert P.op_size(c0, 0, sep3, {}) == 9 * 4 + 4 * 2 + 9 * 2 + 2 * 3
    dil5 = dataclasses.replace(op_spec(c0, 0, 0, "dil_conv_5x5"), out_index=(1,))
    assert P.op_size(c0, 0, dil5, {}) == 25 * 4 + 4 * 1
    assert P.count_units(res.spec, {}) == dict(ops=104, filters=0, filters_total=0, weights=0, weights_total=0)
    same, trees = P.shrink(res.spec, {"params": {}, "arch": res.arch, "batch_stats": {}, "masks": {}})
    assert same == res.spec


# ---------------------------------------------------------------------------------------------------
# budget-true final phase: partial commits (budget.py)
# ---------------------------------------------------------------------------------------------------

COSTS = np.array([100, 50, 400, 30, 20, 10])


def cost_size(chosen):
    """A hand-made size: 1000 minus what each committed unit removes."""
    return 1000 - int(COSTS[np.asarray(chosen, int)].sum())


@pytest.mark.parametrize("target, low, chosen", [
    (870, 800, [0, 1]),        # 900, 850: the shortest prefix at or below the target
    (830, 800, [0, 1, 3]),     # unit 2 alone jumps 850 -> 450: left out, the prefix goes on past it
    (860, 855, [0, 3, 5]),     # 850 < 855 leaves out unit 1, then 2, then 4: 1000 - 100 - 30 - 10
    (999, 900, [0]),
])
def test_choose_units_takes_the_furthest_below_first_and_lands_in_the_window(target, low, chosen):
    margin = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    got = B.choose_units(margin, cost_size, target, low)
    assert got.tolist() == chosen
    assert low <= cost_size(got) <= target
    # the order is by shortfall, not by position
    perm = np.array([3, 0, 5, 1, 4, 2])
    got = B.choose_units(margin[perm], lambda c: cost_size(perm[np.asarray(c, int)]), target, low)
    assert sorted(perm[got].tolist()) == chosen


def test_choose_units_when_the_window_cannot_be_hit():
    margin = np.linspace(1.0, 0.5, 6)
    assert B.choose_units(margin, cost_size, 300, 270) is None  # every unit: 390 > 300
    # no selection lands in [845, 848]: units 2, 3, 4 and 5 each jump from 850 to below 845 in turn;
    # the closest to the target from below that was tried is kept: 1000 - 100 - 50 - 10
    got = B.choose_units(margin, cost_size, 848, 845)
    assert got.tolist() == [0, 1, 5] and cost_size(got) == 840


def test_choose_units_leaves_out_a_long_run_of_whole_ops():
    """Twelve coarse units (whole ops, 100 each) are the furthest below, and each alone jumps past a
    15-wide window; the fine units after them (single weights) fill it. Each op left out costs one or
    two size calls, not a bisection."""
    costs = np.array([100] * 12 + [1] * 50)
    margin = np.linspace(1.0, 0.1, costs.size)
    calls = []

    def size(chosen):
        calls.append(1)
        return 2000 - int(costs[np.asarray(chosen, int)].sum())

    got = B.choose_units(margin, size, 1995, 1980)
    assert got.tolist() == [12, 13, 14, 15, 16] and size(got) == 1995
    assert len(calls) < 40
    # out of size calls before the fine units are reached: the closest below the target tried so far
    got = B.choose_units(margin, size, 1995, 1980, max_evals=5)
    assert size(got) == 1900


def test_choose_units_commits_a_unit_that_cannot_be_spared_first():
    """The op (unit 5, 460) jumps past the window after the five units before it, but without it not
    even every other unit reaches the target: it is committed, and only two of the units before it."""
    costs = np.array([10] * 5 + [460] + [10] * 5)
    size = lambda chosen: 1000 - int(costs[np.asarray(chosen, int)].sum())
    got = B.choose_units(np.linspace(1.0, 0.1, costs.size), size, 520, 500)
    assert got.tolist() == [0, 1, 5] and size(got) == 520


def test_off_units_shortfalls_by_hand(net):
    """The units a commit switches off, each with (t - s) / t in its own granularity's units."""
    spec, _ = net
    v, expect = commit_case(net)
    full = P.commit(spec, v["params"], v["arch"], v["masks"], remove=False)
    units = B.off_units(spec, v["params"], v["arch"], v["masks"], full)
    assert len(units) == 16 + expect["filters_off"] + expect["weights_off"]
    assert units.ops == full.removed
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    by_op = dict(zip([(i, o.edge, o.op_index) for i, o in units.ops], units.margin[:16]))
    assert by_op[(0, 0, 0)] == pytest.approx((0.6 - 0.5) / 0.6)
    assert (0, 1, idx("avg_pool_3x3")) not in by_op  # protected: stays on
    leaves_ = dict((p, (idx_, m)) for (p, idx_), m in zip(units.leaves, np.split(
        units.margin[16:], np.cumsum([i.size for _, i in units.leaves])[:-1])))
    sep = ("cell_1", "op_0_0_sep_conv_3x3", "sep")
    idx1, m1 = leaves_[sep + ("unit1", "gate", "beta")]
    assert idx1.tolist() == [3, 5]
    np.testing.assert_allclose(m1, [(0.5 - sig(-1.0)) / 0.5, 0.0], atol=1e-7)
    idx2, m2 = leaves_[sep + ("unit2", "gate", "beta")]
    assert idx2.tolist() == [0] and m2[0] == pytest.approx((0.5 - sig(-2.0)) / 0.5)
    idx3, m3 = leaves_[("cell_1", "pre1", "gate", "beta")]
    assert idx3.tolist() == [0] and m3[0] == pytest.approx((0.5 - sig(-1.0)) / 0.5)
    dil = v["params"]["cell_2"]["op_1_2_dil_conv_3x3"]["dil"]["unit"]
    for k in ("dw", "pw"):
        i_w, m_w = leaves_[("cell_2", "op_1_2_dil_conv_3x3", "dil", "unit", k, "kernel")]
        w = np.abs(dil[k]["kernel"]).ravel()
        np.testing.assert_allclose(m_w, (0.2 - w[i_w]) / 0.2, rtol=1e-5)
        assert np.all((0 <= m_w) & (m_w <= 1))
    # all of them applied = the full commit; none = the state before
    arch, masks = B.apply_units(spec, v["arch"], v["masks"], units, np.arange(len(units)))
    chex.assert_trees_all_equal(masks, full.masks)
    chex.assert_trees_all_equal(arch, full.arch)
    arch, masks = B.apply_units(spec, v["arch"], v["masks"], units, np.array([], int))
    chex.assert_trees_all_equal(masks, P.to_numpy(v["masks"]))


@pytest.mark.slow
def test_partial_commit_lands_the_exported_size_just_below_a_target(net):
    """From the hand-made gates of commit_case: the exported non-zero count of the partly committed,
    dropped and shrunk state lands in a narrow window below a target between the sizes before and after."""
    spec, _ = net
    v, _ = commit_case(net)
    full = P.commit(spec, v["params"], v["arch"], v["masks"], remove=False)
    units = B.off_units(spec, v["params"], v["arch"], v["masks"], full)

    def size_of(chosen):
        arch, masks = B.apply_units(spec, v["arch"], v["masks"], units, chosen)
        trees = dict(params=v["params"], arch=arch, batch_stats=v["batch_stats"], masks=masks)
        dropped, trees = P.drop_committed_off(spec, trees)
        shrunk, trees = P.shrink(dropped, trees)
        return export.record_params(shrunk, trees["masks"], INPUT, 3 * C)["nonzero"]

    before, after = size_of(np.array([], int)), size_of(np.arange(len(units)))
    assert after < before - 1000
    # a window far narrower than the whole commit (1/20 of it), so that only a partial commit lands in it
    target = (before + after) // 2
    low = target - (before - after) / 20
    chosen = B.choose_units(units.margin, size_of, target, low)
    assert after < low <= size_of(chosen) <= target
    assert 0 < len(chosen) < len(units)
    # the chosen units are the furthest below their thresholds (no unit had to be left out here)
    assert units.margin[chosen].min() >= np.delete(units.margin, chosen).max()


@pytest.mark.parametrize("first, every, commits", [
    (3, 2, [3, 5, 7, 9]),      # the released code: epochs 0, 1, 2 of a phase, then every 2
    (2, 2, [2, 4, 6, 8]),
    (1, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9]),
    (2, 3, [2, 5, 8]),
])
def test_commit_timing(first, every, commits):
    assert [e for e in range(1, 10) if P.commit_due(e, first, every)] == commits


def test_stage_end_measures_cells_0_to_the_end_of_the_stage(net):
    """Stage 2 of the tiny super-net builds cells 0 and 1: its measure is both cells' size proxy (the
    released code's flops of cells 0..stage2_end), not cell 1's alone."""
    from mgas_jax import search
    spec, variables = net
    stage2 = dataclasses.replace(spec, cells=spec.cells[:search.built_cells(LAYERS, 2)])
    both = full_cell_size(4, False) + full_cell_size(8, True)
    assert search.stage_size(stage2, variables["masks"]) == both
    assert both != P.size_proxy(stage2, variables["masks"], search.stage_cells(LAYERS, 2))
    # pruning cell 0 (an earlier stage's cell) counts towards the end of stage 2
    masks = copy(variables)["masks"]
    masks["cell_0"]["ops"][:, idx("sep_conv_5x5")] = 0.0
    assert search.stage_size(stage2, masks) == both - 5 * (50 * 4 + 2 * 16)
