"""Tests of mgas_jax.gates: the hard step and its surrogate gradient, the three discretization functions,
the op gate with the protection rule, and the DARTS edge layout (docs/method.md section 2).

Everything is plain JAX on tiny arrays; each key function runs with and without `jax.jit`.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgas_jax import gates
from mgas_jax import genotype as G

TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def dsigmoid(x):
    s = sigmoid(x)
    return s * (1.0 - s)


def surrogate(x):
    """dH/dx of docs/method.md section 2, written out independently of the library."""
    a = np.abs(np.asarray(x, np.float64))
    return np.where(a <= 0.4, 2.0 - 4.0 * a, np.where(a <= 1.0, 0.4, 0.0))


# ---------------------------------------------------------------------------------------------------
# hard_step
# ---------------------------------------------------------------------------------------------------

SURROGATE_POINTS = [(0.0, 2.0), (0.1, 1.6), (-0.3, 0.8), (0.4, 0.4), (0.5, 0.4), (-1.0, 0.4), (1.5, 0.0)]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("x, expected", SURROGATE_POINTS)
def test_hard_step_surrogate_gradient_values(transform, x, expected):
    grad = transform(jax.grad(gates.hard_step))(jnp.float32(x))
    chex.assert_type(grad, jnp.float32)
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_hard_step_forward_is_exact_step_and_vector_grad(transform):
    x = jnp.array([-1.5, -1.0, -0.3, 0.0, 1e-7, 0.1, 0.4, 0.5, 1.5], jnp.float32)
    y = transform(gates.hard_step)(x)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, jnp.float32)
    # H(0) = 0: the step is 1[x > 0], strictly
    np.testing.assert_array_equal(y, [0, 0, 0, 0, 1, 1, 1, 1, 1])
    # backward: the cotangent times the surrogate, elementwise
    c = jnp.arange(1.0, 10.0)
    _, vjp = jax.vjp(transform(gates.hard_step), x)
    np.testing.assert_allclose(vjp(c)[0], np.asarray(c) * surrogate(x), atol=1e-6)
    np.testing.assert_allclose(gates.surrogate_grad(x), surrogate(x), atol=1e-6)


def test_hard_step_keeps_dtype():
    y = gates.hard_step(jnp.array([-1.0, 2.0], jnp.bfloat16))
    chex.assert_type(y, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), [0, 1])


# ---------------------------------------------------------------------------------------------------
# score, filter and weight gates
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_score_gate_values_and_gradients(transform):
    s = np.array([-2.0, -0.1, 0.0, 0.3, 2.0], np.float32)
    t = np.float32(0.5)
    p = sigmoid(s)
    live = (p > t).astype(np.float64)
    # sigma(0) = 0.5 is not above t = 0.5: H(0) = 0
    np.testing.assert_array_equal(live, [0, 0, 0, 1, 1])
    g = transform(gates.score_gate)(s, t)
    chex.assert_shape(g, s.shape)
    np.testing.assert_allclose(g, p * live, rtol=1e-6)
    np.testing.assert_array_equal(gates.live_mask(s, t), live)

    c = np.array([1.0, -2.0, 0.5, 3.0, 1.5], np.float32)
    loss = lambda s, t: jnp.sum(c * gates.score_gate(s, t))
    gs, gt = transform(jax.grad(loss, argnums=(0, 1)))(s, t)
    # d/ds [p H(p - t)] = p' H + p surr(p - t) p' ; d/dt = -p surr(p - t)
    expect_s = c * (dsigmoid(s) * live + p * surrogate(p - t) * dsigmoid(s))
    expect_t = -np.sum(c * p * surrogate(p - t))
    np.testing.assert_allclose(gs, expect_s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gt, expect_t, rtol=1e-5)
    # masked units still receive gradient (the point of the surrogate)
    assert np.all(np.abs(np.asarray(gs)[:3]) > 0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_filter_gate_with_committed_mask(transform):
    beta = np.array([1.0, -1.0, 2.0, 0.5], np.float32)
    t = np.float32(0.6)
    committed = np.array([1.0, 1.0, 0.0, 1.0], np.float32)
    p = sigmoid(beta)
    live = (p > t).astype(np.float64)
    np.testing.assert_array_equal(live, [1, 0, 1, 1])

    f = transform(gates.filter_gate)
    np.testing.assert_allclose(f(beta, t, committed), p * live * committed, rtol=1e-6)
    np.testing.assert_allclose(f(beta, t, committed), [sigmoid(1.0), 0, 0, sigmoid(0.5)], rtol=1e-6)
    # without a committed mask it is the score gate
    np.testing.assert_allclose(transform(lambda b, t: gates.filter_gate(b, t))(beta, t),
                               gates.score_gate(beta, t), rtol=1e-6)

    c = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    gb, gt = transform(jax.grad(lambda b, t: jnp.sum(c * gates.filter_gate(b, t, committed)),
                                argnums=(0, 1)))(beta, t)
    expect_b = c * committed * (dsigmoid(beta) * live + p * surrogate(p - t) * dsigmoid(beta))
    expect_t = -np.sum(c * committed * p * surrogate(p - t))
    np.testing.assert_allclose(gb, expect_b, rtol=1e-5)
    np.testing.assert_allclose(gt, expect_t, rtol=1e-5)
    assert gb[2] == 0.0          # a committed-off channel gets no gradient
    assert abs(float(gb[1])) > 0  # a live-off but committed channel does (surrogate)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_committed", [False, True])
def test_weight_mask_values_and_gradients(transform, with_committed):
    w = np.array([[0.05, -0.2], [0.3, -0.01], [0.15, -0.7]], np.float32)
    t = np.float32(0.1)
    committed = np.array([[1, 1], [0, 1], [1, 1]], np.float32) if with_committed else np.ones_like(w)
    expected = (np.abs(w) > t) * committed
    np.testing.assert_array_equal(expected, [[0, 1], [0 if with_committed else 1, 0], [1, 1]])

    f = transform(lambda w, t: gates.weight_mask(w, t, committed if with_committed else None))
    m = f(w, t)
    chex.assert_shape(m, w.shape)
    np.testing.assert_array_equal(m, expected)

    # the masked kernel w * m: gradients reach w (surrogate through |w|) and t_w
    loss = lambda w, t: jnp.sum(w * gates.weight_mask(w, t, committed if with_committed else None))
    gw, gt = transform(jax.grad(loss, argnums=(0, 1)))(w, t)
    surr = surrogate(np.abs(w) - t)
    expect_w = expected + w * surr * np.sign(w) * committed
    expect_t = -np.sum(w * surr * committed)
    np.testing.assert_allclose(gw, expect_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gt, expect_t, rtol=1e-5)
    # a masked weight close to its threshold still gets gradient
    assert abs(float(gw[0, 0])) > 0


# ---------------------------------------------------------------------------------------------------
# edges of a DARTS cell
# ---------------------------------------------------------------------------------------------------

def test_edge_nodes_and_sources_four_steps():
    nodes, sources = gates.edge_nodes(4), gates.edge_sources(4)
    chex.assert_shape([nodes, sources], (14,))
    assert nodes.dtype == np.int32 and sources.dtype == np.int32
    np.testing.assert_array_equal(nodes, [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(sources, [0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4])
    assert len(nodes) == G.num_edges(4) == 14


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_edge_layout_matches_genotype_edge_index(steps):
    nodes, sources = gates.edge_nodes(steps), gates.edge_sources(steps)
    assert len(nodes) == len(sources) == G.num_edges(steps)
    for e, (n, s) in enumerate(zip(nodes, sources)):
        assert G.edge_index(int(n), int(s)) == e
        assert G.edge_endpoints(e, steps) == (n, s)


def test_edge_nodes_two_steps():
    np.testing.assert_array_equal(gates.edge_nodes(2), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(gates.edge_sources(2), [0, 1, 0, 1, 2])


# ---------------------------------------------------------------------------------------------------
# op gate and the protection rule
# ---------------------------------------------------------------------------------------------------

NODES2 = gates.edge_nodes(2)  # [0, 0, 1, 1, 1]


def protection_case():
    """A 2-node cell (5 edges x 7 ops).

    node 0 (edges 0-1): every active op is below its threshold; the op with the largest alpha of the
      node, (1, 3), is committed off, so protection must pick the best *active* one, (0, 4).
    node 1 (edges 2-4): some ops live, some not, and a committed-off op (3, 6) with a large alpha.
    """
    rng = np.random.default_rng(0)
    alpha = rng.uniform(-0.3, 0.25, (5, 7)).astype(np.float32)
    alpha[0, 4] = 0.28   # best active op of node 0 (sigma ~ 0.57 < 0.6)
    alpha[1, 3] = 0.35   # larger, but committed off
    alpha[2:] = rng.normal(0.0, 1.0, (3, 7)).astype(np.float32)
    alpha[2, 0] = 1.5    # certainly live
    alpha[3, 6] = 3.0    # committed off, would be live
    t_op = np.full((5, 7), 0.5, np.float32)
    t_op[:2] = 0.6
    active = np.ones((5, 7), np.float32)
    active[1, 3] = 0.0
    active[3, 6] = 0.0
    active[0, 0] = active[4, 2] = 0.0
    return alpha, t_op, active


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_op_gate_without_protection_is_sigmoid_times_mask(transform):
    rng = np.random.default_rng(1)
    alpha = rng.normal(0.0, 1.0, (14, 7)).astype(np.float32)
    alpha[:, 0] = 2.0  # every node keeps a live op: protection does nothing
    t_op = rng.uniform(0.2, 0.8, (14, 7)).astype(np.float32)
    active = (rng.uniform(size=(14, 7)) > 0.2).astype(np.float32)
    active[:, 0] = 1.0
    f = transform(lambda a, t, act: gates.op_gate(a, t, act, gates.edge_nodes(4)))
    g, live = f(alpha, t_op, active)
    chex.assert_shape([g, live], (14, 7))
    expected_live = (sigmoid(alpha) > t_op) * active
    np.testing.assert_array_equal(live, expected_live)
    np.testing.assert_allclose(g, sigmoid(alpha) * expected_live, rtol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_op_gate_protection_rule(transform):
    alpha, t_op, active = protection_case()
    raw = (sigmoid(alpha) > t_op) * active
    assert raw[:2].sum() == 0 and raw[2:].sum() > 0  # the case is what it claims to be

    f = transform(lambda a, t, act: gates.op_gate(a, t, act, NODES2))
    g, live = f(alpha, t_op, active)
    live, g = np.asarray(live), np.asarray(g)

    # node 0 keeps exactly its highest-alpha *active* op
    expected0 = np.zeros((2, 7))
    expected0[0, 4] = 1.0
    np.testing.assert_array_equal(live[:2], expected0)
    np.testing.assert_allclose(g[:2], sigmoid(alpha[:2]) * expected0, rtol=1e-6)
    # node 1 has live ops: unchanged
    np.testing.assert_array_equal(live[2:], raw[2:])
    np.testing.assert_allclose(g[2:], sigmoid(alpha[2:]) * raw[2:], rtol=1e-6)
    # committed-off ops never come back, however large their alpha
    assert live[1, 3] == 0 and live[3, 6] == 0 and g[1, 3] == 0 and g[3, 6] == 0
    assert np.all(live <= active)
    # protect_last_op alone gives the same mask
    np.testing.assert_array_equal(gates.protect_last_op(jnp.asarray(raw, jnp.float32), active, alpha, NODES2),
                                  live)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_op_gate_gradient_still_flows_to_alpha(transform):
    alpha, t_op, active = protection_case()
    c = np.random.default_rng(2).uniform(0.5, 2.0, (5, 7)).astype(np.float32)
    _, live = gates.op_gate(alpha, t_op, active, NODES2)
    live = np.asarray(live, np.float64)

    loss = lambda a, t: jnp.sum(c * gates.op_gate(a, t, active, NODES2)[0])
    ga, gt = transform(jax.grad(loss, argnums=(0, 1)))(alpha, t_op)
    p, dp, surr = sigmoid(alpha), dsigmoid(alpha), surrogate(sigmoid(alpha) - t_op)
    # gate = p * m, with the step's surrogate gradient kept under the protected mask
    expect_a = c * (dp * live + p * surr * dp * active)
    np.testing.assert_allclose(ga, expect_a, rtol=1e-5, atol=1e-7)
    # the protected op of node 0 is trained through alpha; so are the ops it masked (surrogate)
    assert ga[0, 4] > 0 and abs(float(ga[0, 1])) > 0
    # committed-off ops get nothing
    assert ga[1, 3] == 0 and ga[3, 6] == 0 and gt[1, 3] == 0 and gt[3, 6] == 0
    # thresholds of unprotected ops: -p surr(p - t)
    unprotected = np.ones((5, 7), bool)
    unprotected[0, 4] = False
    np.testing.assert_allclose(np.asarray(gt)[unprotected], (-c * p * surr * active)[unprotected],
                               rtol=1e-5, atol=1e-7)


def test_protection_leaves_a_node_without_active_ops_empty():
    alpha = np.zeros((5, 7), np.float32)
    t_op = np.full((5, 7), 0.9, np.float32)
    active = np.zeros((5, 7), np.float32)
    active[2:, 1] = 1.0  # node 1 has active ops (all below threshold), node 0 none at all
    alpha[3, 1] = 0.5
    g, live = gates.op_gate(alpha, t_op, active, NODES2)
    expected = np.zeros((5, 7))
    expected[3, 1] = 1.0
    np.testing.assert_array_equal(live, expected)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_protection_every_node_of_a_four_step_cell(transform):
    """All ops under a high threshold: every node keeps exactly one op, its best active one."""
    rng = np.random.default_rng(3)
    alpha = rng.normal(0.0, 1.0, (14, 7)).astype(np.float32)
    active = (rng.uniform(size=(14, 7)) > 0.5).astype(np.float32)
    active[np.argmax(alpha.max(axis=1))] = 0.0  # the overall best row is committed off
    t_op = np.full((14, 7), 0.999, np.float32)
    nodes = gates.edge_nodes(4)
    _, live = transform(lambda a, t, act: gates.op_gate(a, t, act, nodes))(alpha, t_op, active)
    live = np.asarray(live)
    for j in range(4):
        rows = np.flatnonzero(nodes == j)
        assert live[rows].sum() == 1
        masked = np.where(active[rows] > 0, alpha[rows], -np.inf)
        e, o = np.unravel_index(np.argmax(masked), masked.shape)
        assert live[rows[e], o] == 1


# ---------------------------------------------------------------------------------------------------
# jit as a user writes it: the node layout is an ordinary argument
# ---------------------------------------------------------------------------------------------------

def test_op_gate_jits_with_the_node_layout_as_an_argument():
    """`jax.jit(gates.op_gate)(...)` with edge_nodes as a traced argument (no static_argnums) gives the
    eager result, and so does an explicit num_nodes; protect_last_op and op_sparsity jit the same way."""
    from mgas_jax import losses

    alpha, t_op, active = protection_case()
    eager = gates.op_gate(alpha, t_op, active, NODES2)
    for nodes in (NODES2, jnp.asarray(NODES2)):
        jitted = jax.jit(gates.op_gate)(alpha, t_op, active, nodes)
        for a, b in zip(jitted, eager):
            np.testing.assert_array_equal(a, b)
    exact = jax.jit(gates.op_gate, static_argnames="num_nodes")(alpha, t_op, active, NODES2, num_nodes=2)
    np.testing.assert_array_equal(exact[1], eager[1])
    raw = ((sigmoid(alpha) > t_op) * active).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(gates.protect_last_op)(raw, active, alpha, NODES2), eager[1])
    np.testing.assert_allclose(jax.jit(losses.op_sparsity)(alpha, active, NODES2),
                               losses.op_sparsity(alpha, active, NODES2), rtol=1e-6)
    # one compiled program serves every layout of the same shape
    layout = np.array([0, 1, 1, 1, 1], np.int32)     # node 0 fed by edge 0 only
    _, live = jax.jit(gates.op_gate)(alpha, t_op, active, layout)
    assert live[0].sum() == 1 and live[0, 4] == 1    # edge 0's best active op rescues node 0


def test_node_indices_outside_the_node_count_are_refused():
    alpha, t_op, active = protection_case()
    with pytest.raises(ValueError, match=r"node indices 0\.\.1, outside \[0, 1\)"):
        gates.op_gate(alpha, t_op, active, NODES2, num_nodes=1)
