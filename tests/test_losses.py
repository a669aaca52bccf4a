"""Tests of mgas_jax.losses: R_op, R_thr and the cross entropy (docs/method.md section 3), against
hand computations in numpy, with and without `jax.jit`."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgas_jax import gates, losses

TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
NODES2 = gates.edge_nodes(2)  # edges 0-1 feed node 0, edges 2-4 node 1


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# A 2-node cell, 3 op columns (the function does not care how many): node 0 has 3 active ops,
# node 1 has 7.
ALPHA = np.array([[0.0, 1.0, -1.0],
                  [2.0, 0.5, 0.0],
                  [0.0, 0.0, 0.0],
                  [1.0, -1.0, 0.3],
                  [-2.0, 0.0, 1.0]], np.float32)
ACTIVE = np.array([[1, 1, 0],
                   [1, 0, 0],
                   [1, 1, 1],
                   [0, 1, 1],
                   [1, 0, 1]], np.float32)


def r_op_by_hand(n_of_node=None):
    """sum_j sum_{active (e, o) into j} log(1 + n_j sigma(alpha_eo) / S_j), written out per node.

    `n_of_node` overrides n_j (to reproduce the released code's bug, which used node 0's count).
    """
    s = sigmoid(ALPHA)
    node0 = [(0, 0), (0, 1), (1, 0)]
    node1 = [(2, 0), (2, 1), (2, 2), (3, 1), (3, 2), (4, 0), (4, 2)]
    total = 0.0
    for j, entries in enumerate((node0, node1)):
        n_j = len(entries) if n_of_node is None else n_of_node[j]
        s_j = sum(s[e, o] for e, o in entries)
        total += sum(math.log(1.0 + n_j * s[e, o] / s_j) for e, o in entries)
    return total


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_op_sparsity_hand_computed(transform):
    r = transform(lambda a, act: losses.op_sparsity(a, act, NODES2))(ALPHA, ACTIVE)
    chex.assert_shape(r, ())
    np.testing.assert_allclose(r, r_op_by_hand(), rtol=1e-6)


def test_op_sparsity_counts_ops_per_node():
    """n_j is each node's own count (3 and 7 here); the released code's n_0 for every node differs."""
    r = float(losses.op_sparsity(ALPHA, ACTIVE, NODES2))
    buggy = r_op_by_hand(n_of_node=(3, 3))
    assert abs(r - buggy) > 0.1
    np.testing.assert_allclose(r, r_op_by_hand(n_of_node=(3, 7)), rtol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_op_sparsity_ignores_inactive_ops(transform):
    f = transform(lambda a, act: losses.op_sparsity(a, act, NODES2))
    other = np.where(ACTIVE > 0, ALPHA, 5.0 * np.random.default_rng(0).normal(size=ALPHA.shape)).astype(np.float32)
    np.testing.assert_allclose(f(other, ACTIVE), f(ALPHA, ACTIVE), rtol=1e-6)
    grad = jax.grad(lambda a: losses.op_sparsity(a, ACTIVE, NODES2))(ALPHA)
    np.testing.assert_array_equal(np.asarray(grad)[ACTIVE == 0], 0.0)
    assert np.all(np.isfinite(np.asarray(grad)))
    # switching an op off changes both S_j and n_j of its node only
    act = ACTIVE.copy()
    act[4, 2] = 0.0  # a node-1 op
    s = sigmoid(ALPHA)
    node1 = [(2, 0), (2, 1), (2, 2), (3, 1), (3, 2), (4, 0)]
    s1 = sum(s[e, o] for e, o in node1)
    node0_part = r_op_by_hand() - sum(math.log(1 + 7 * s[e, o] / sum(s[i, k] for i, k in node1 + [(4, 2)]))
                                      for e, o in node1 + [(4, 2)])
    expected = node0_part + sum(math.log(1 + 6 * s[e, o] / s1) for e, o in node1)
    np.testing.assert_allclose(f(ALPHA, act), expected, rtol=1e-6)


def test_op_sparsity_equal_scores_is_log2_per_op():
    """With all sigma equal in a node the ratio is 1: R_op = (active ops) * log 2."""
    nodes = gates.edge_nodes(4)
    active = np.ones((14, 7), np.float32)
    np.testing.assert_allclose(losses.op_sparsity(np.zeros((14, 7), np.float32), active, nodes),
                               98 * math.log(2.0), rtol=1e-6)
    active[::3, 2:] = 0.0
    np.testing.assert_allclose(losses.op_sparsity(np.full((14, 7), -1.3, np.float32), active, nodes),
                               active.sum() * math.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_threshold_penalty(transform):
    t = np.array([[0.0, 0.5], [-1.0, 2.0]], np.float32)
    active = np.array([[1, 0], [1, 1]], np.float32)
    f = transform(losses.threshold_penalty)
    np.testing.assert_allclose(f(t, active), 1.0 + math.exp(1.0) + math.exp(-2.0), rtol=1e-6)
    np.testing.assert_allclose(transform(lambda t: losses.threshold_penalty(t))(t),
                               np.exp(-t.astype(np.float64)).sum(), rtol=1e-6)
    # its gradient pushes active thresholds up (d/dt exp(-t) = -exp(-t)), inactive ones not at all
    g = jax.grad(losses.threshold_penalty)(t, active)
    np.testing.assert_allclose(g, -np.exp(-t) * active, rtol=1e-6)


def ce_by_hand(logits, labels, smoothing=0.0):
    logits = np.asarray(logits, np.float64)
    k = logits.shape[-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.eye(k)[labels] * (1.0 - smoothing) + smoothing / k
    return float(np.mean(-(targets * logp).sum(-1)))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy(transform, smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2, 1, 3], np.int32)
    ce = transform(lambda l, y: losses.cross_entropy(l, y, label_smoothing=smoothing))(logits, labels)
    chex.assert_shape(ce, ())
    chex.assert_type(ce, jnp.float32)
    np.testing.assert_allclose(ce, ce_by_hand(logits, labels, smoothing), rtol=1e-5)


def test_cross_entropy_of_low_precision_logits_is_float32():
    logits = jnp.array([[1.0, 2.0, 0.5]], jnp.bfloat16)
    ce = losses.cross_entropy(logits, jnp.array([1]))
    chex.assert_type(ce, jnp.float32)
    np.testing.assert_allclose(ce, ce_by_hand(np.asarray(logits, np.float32), [1]), rtol=1e-5)


def _tree(scale):
    # many small leaves of several shapes and dtypes, as a super-net's gradients
    rng = np.random.default_rng(0)
    return {"a": [jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32) for _ in range(20)],
            "b": {"c": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32),
                  "d": jnp.asarray(rng.normal(size=(2, 2, 1, 3)) * scale, jnp.bfloat16)}}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_whole_tree_reductions(transform):
    """all_finite and global_norm over one concatenation: a single non-finite element anywhere is
    found, and the norm is optax's (per-leaf sums)."""
    tree = _tree(1.0)
    assert bool(transform(losses.all_finite)(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        broken = jax.tree.map(lambda x: x, tree)
        broken["a"][13] = broken["a"][13].at[2, 1].set(bad)
        assert not bool(transform(losses.all_finite)(broken))
    assert bool(losses.all_finite({})) and float(losses.global_norm({})) == 0.0
    expected = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(float(transform(losses.global_norm)(tree)), expected, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.01, 10.0])   # under and over the norm limit
def test_clip_by_global_norm_is_optaxs(scale):
    """Our clip (one reduction for the norm) gives optax's updates, whether it clips or not."""
    import optax
    tree = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(scale))
    ours, ref = losses.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    got, state = jax.jit(ours.update)(tree, ours.init(tree))
    want, _ = ref.update(tree, ref.init(tree))
    assert state == ref.init(tree)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-8)
    norm = float(optax.tree.norm(got))
    assert norm <= 1.0 + 1e-5 if scale > 1 else norm < 1.0


def test_clip_by_global_norm_clips_by_a_given_group_norm():
    """Given `group_norm` (the norm of the whole group, when `updates` is a part of it), the clip
    scales by that norm, not by the part's own: the part of optax's clip of the whole tree."""
    import optax
    whole = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(10.0))
    part = {"a": whole["a"]}
    want, _ = optax.clip_by_global_norm(1.0).update(whole, optax.EmptyState())
    ours = losses.clip_by_global_norm(1.0)
    got, _ = jax.jit(ours.update)(part, ours.init(part), group_norm=losses.global_norm(whole))
    chex.assert_trees_all_close(got, {"a": want["a"]}, rtol=1e-6, atol=1e-8)
    alone, _ = ours.update(part, ours.init(part))
    assert not np.allclose(np.asarray(alone["a"]), np.asarray(got["a"]))   # the part's own norm clips less


def test_search_r_op_counts_live_ops_of_the_penalised_cells_only():
    """search_step.regularizers: R_op over spec.penalised cells, an op counting when its live
    (protected) mask is on, n_j the node's live count, S_j over every committed op into the node;
    R_thr over the committed units of every built cell. Two cells of 2 nodes, by hand."""
    from mgas_jax import search_step, supernet

    cells = supernet.full_cells(4, 3, steps=2)[:2]
    rng = np.random.default_rng(5)
    arch, masks = {}, {}
    for i in range(2):
        alpha = rng.normal(0.0, 1.0, (5, 7)).astype(np.float32)
        t_op = np.full((5, 7), 0.5, np.float32)
        arch[f"cell_{i}"] = dict(alpha=alpha, t_op=t_op, t_k=np.zeros((5, 7), np.float32),
                                 t_w=np.zeros((5, 7), np.float32), t_pre=np.zeros(2, np.float32))
        committed = np.ones((5, 7), np.float32)
        committed[0, :3] = 0.0                      # committed off: neither counted nor scored
        masks[f"cell_{i}"] = {"ops": committed}
    arch["cell_1"]["alpha"][:2] = -3.0              # node 0 of cell 1: every op live-off ...
    arch["cell_1"]["alpha"][1, 4] = -1.0            # ... this one has the best alpha: protected

    def by_hand(i):
        a, committed = arch[f"cell_{i}"]["alpha"].astype(np.float64), masks[f"cell_{i}"]["ops"]
        sig = sigmoid(a)
        live = (sig > 0.5) * committed
        total = 0.0
        for node, edges in ((0, [0, 1]), (1, [2, 3, 4])):
            on = [(e, o) for e in edges for o in range(7) if live[e, o]]
            if not on:  # protection: the committed op of the node with the highest alpha
                on = [max(((e, o) for e in edges for o in range(7) if committed[e, o]), key=lambda eo: a[eo])]
            s_j = sum(sig[e, o] for e in edges for o in range(7) if committed[e, o])
            total += sum(math.log(1 + len(on) * sig[e, o] / s_j) for e, o in on)
        return total

    assert by_hand(1) != by_hand(0)
    for penalised, cells_in in ((None, (0, 1)), ((1,), (1,)), ((0,), (0,))):
        spec = supernet.SuperNetSpec(cells, num_classes=10, stem_channels=12, penalised=penalised)
        r_op, r_thr = search_step.regularizers(arch, masks, spec)
        np.testing.assert_allclose(r_op, sum(by_hand(i) for i in cells_in), rtol=1e-5)
        # R_thr: exp(-0.5) per committed op (t_op); exp(-0) per conv op (t_k, t_w) and preprocess layer
        n_thr = sum(math.exp(-0.5) * masks[f"cell_{i}"]["ops"].sum()
                    + 2 * (supernet.conv_matrix(cells[i]) * masks[f"cell_{i}"]["ops"]).sum() + 2 for i in range(2))
        np.testing.assert_allclose(r_thr, n_thr, rtol=1e-6)
