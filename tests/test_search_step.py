"""The search step's optimizer: per-group update factors as an optax transformation (freezing with a
traced factor, inside one compiled program), and the alpha momentum read through optax.tree_utils."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mgas_jax import search_step
from mgas_jax.search_step import GroupScales


def _tree():
    rng = np.random.default_rng(0)
    return {"params": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
            "arch": {"cell_0": {"alpha": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
                                "t_w": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}}


def _grads(i):
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), _tree())


def _sgd():
    return optax.sgd(0.1, momentum=0.9)


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("jit", [False, True])
def test_a_frozen_group_keeps_its_state_and_gets_a_zero_update(jit):
    tx = search_step.scaled_by_group(_sgd(), "alpha")
    params = _tree()
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    _, state = update(_grads(0), state, params, scales=GroupScales(alpha=jnp.float32(1.0)))  # momentum != 0
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state))
    updates, frozen = update(_grads(1), state, params, scales=GroupScales(alpha=jnp.float32(0.0)))
    _assert_equal(frozen, state)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    _assert_equal(optax.apply_updates(params, updates), params)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("factor", [1.0, 0.25])
def test_a_trained_group_is_the_plain_optimizer_times_its_factor(jit, factor):
    plain, tx = _sgd(), search_step.scaled_by_group(_sgd(), "weights")
    params = _tree()
    update = jax.jit(tx.update) if jit else tx.update
    plain_update = jax.jit(plain.update) if jit else plain.update
    state, plain_state = tx.init(params), plain.init(params)
    for i in range(3):
        updates, state = update(_grads(i), state, params, scales=GroupScales(weights=jnp.float32(factor)))
        expected, plain_state = plain_update(_grads(i), plain_state, params)
        _assert_equal(updates, jax.tree.map(lambda u: u * jnp.float32(factor), expected))
        _assert_equal(state, plain_state)   # the factor scales the step, never the momentum


def test_switching_groups_between_steps_compiles_once():
    tx = search_step.make_optimizer(ml_collections.ConfigDict(dict(
        momentum=0.9, grad_clip=5.0, weight_decay=3e-4, lr=0.1, alpha_lr=1.0, beta_lr=1.0, threshold_lr=0.1,
        weight_threshold_lr=0.01)))
    traces = {"n": 0}

    @jax.jit
    def step(params, opt_state, grads, scales):
        traces["n"] += 1
        updates, opt_state = tx.update(grads, opt_state, params, scales=scales)
        return optax.apply_updates(params, updates), opt_state

    params = _tree()
    opt_state = tx.init(params)
    rows = [GroupScales(), GroupScales.weights_only(), GroupScales().times(0.5), GroupScales(alpha=0.0)]
    for i, scales in enumerate(rows):
        before_params, before_state = jax.device_get((params, opt_state))
        params, opt_state = step(params, opt_state, _grads(i), scales.asarrays())
        moved = {g: not np.array_equal(np.asarray(a), np.asarray(b)) for g, a, b in [
            ("weights", params["params"]["w"], before_params["params"]["w"]),
            ("alpha", params["arch"]["cell_0"]["alpha"], before_params["arch"]["cell_0"]["alpha"]),
            ("weight_threshold", params["arch"]["cell_0"]["t_w"], before_params["arch"]["cell_0"]["t_w"])]}
        assert moved == {g: getattr(scales, g) > 0 for g in moved}, (i, moved)
        for g in ("alpha", "weight_threshold"):
            if getattr(scales, g) == 0:
                _assert_equal(opt_state.inner_states[g], before_state.inner_states[g])
    assert traces["n"] == 1


@pytest.mark.slow
def test_alpha_momentum_is_the_alpha_groups_trace():
    """arch_momentum reads the trace through optax.tree_utils; it is the one of the alpha group."""
    from mgas_jax import supernet

    spec = supernet.SuperNetSpec(supernet.full_cells(4, 3, 2)[:1], num_classes=10, stem_channels=12, head="stage",
                                 impl="lax")
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    trainable = {"params": v["params"], "arch": v["arch"]}
    tx = search_step.make_optimizer(ml_collections.ConfigDict(dict(
        momentum=0.9, grad_clip=0.0, weight_decay=0.0, lr=0.1, alpha_lr=1.0, beta_lr=1.0, threshold_lr=0.1,
        weight_threshold_lr=0.01)))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), trainable)
    _, opt_state = tx.update(grads, tx.init(trainable), trainable, scales=GroupScales())
    (momentum,) = search_step.arch_momentum(opt_state, spec)
    np.testing.assert_array_equal(momentum, np.asarray(grads["arch"]["cell_0"]["alpha"]))   # 1st step: trace = grad
    direct = opt_state.inner_states["alpha"].inner_state[0].trace["arch"]["cell_0"]["alpha"]
    np.testing.assert_array_equal(momentum, np.asarray(direct))


@pytest.mark.parametrize("backend, expected", [("cpu", "edge"), ("gpu", "step"), ("tpu", "step")])
def test_auto_programs_follow_the_backend(backend, expected):
    assert search_step.resolve_programs("auto", backend) == expected
    for explicit in ("step", "cell", "edge"):
        assert search_step.resolve_programs(explicit, backend) == explicit


def test_auto_programs_on_this_cpu_build_the_per_edge_chain(monkeypatch):
    """make_step resolves 'auto' itself: on the CPU it builds the chain with per-edge programs."""
    seen = []
    monkeypatch.setattr(search_step, "make_cell_step", lambda *args: seen.append(args[-1]) or "chain")
    assert jax.default_backend() == "cpu"
    assert search_step.make_step(None, None, None, None, None, "auto") == "chain"
    assert seen == ["edge"]
