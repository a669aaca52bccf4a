"""The search step's optimizer: per-group update factors as an optax transformation (freezing with a
traced factor, inside one compiled program), the alpha momentum read through optax.tree_utils, and
the chained step's update by parts (the same update as on the whole tree, one program per kind of part)."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mgas_jax import losses, names, search_step
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


# -- the update part by part (the chained step's) ------------------------------------------------

def _supernet_trainable(cells=3):
    from mgas_jax import supernet

    spec = supernet.SuperNetSpec(supernet.full_cells(4, cells, 2), num_classes=10, stem_channels=12, head="stage",
                                 impl="lax")
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    return {"params": v["params"], "arch": v["arch"]}


def _partwise_tx(grad_clip):
    return search_step.make_optimizer(ml_collections.ConfigDict(dict(
        momentum=0.9, grad_clip=grad_clip, weight_decay=3e-4, lr=0.1, alpha_lr=1.0, beta_lr=0.5, threshold_lr=0.1,
        weight_threshold_lr=0.01)))


def test_update_parts_cover_every_leaf_once():
    """update_parts splits the trainable tree into edges, preprocess layers, cells' own arch leaves,
    stem and head; take_part / join_parts give back the same tree, and edges of one kind are equal trees."""
    trainable = _supernet_trainable()
    plan = search_step.update_parts(trainable)
    parts = [search_step.take_part(trainable, p) for p in plan]
    assert sum(len(jax.tree.leaves(p)) for p in parts) == len(jax.tree.leaves(trainable))
    back = search_step.join_parts(trainable, parts, plan)
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        assert a is b
    kinds = {tuple(sorted(set(part.get("params", {})) | set(part.get("arch", {})))) for part in parts}
    convs = ("dil_conv_3x3", "dil_conv_5x5", "sep_conv_3x3", "sep_conv_5x5")
    assert kinds == {("stem",), ("stem_bn",), ("head_3",), ("pre",), ("alpha", "t_k", "t_op", "t_pre", "t_w"),
                     convs, convs + ("skip_connect",)}   # a stride-2 edge's skip_connect has weights
    # 3 cells x 5 edges, of fewer structures
    edges = [p for p in parts if "sep_conv_3x3" in p.get("params", {})]
    assert len(edges) == 15
    assert len({jax.tree.structure(e) for e in edges}) < len(edges)


@pytest.mark.parametrize("grad_clip", [0.5, 1e6])   # the clip binds; it does not
def test_update_by_parts_gives_the_whole_update(grad_clip):
    """update_by_parts (each part's sums of squares, then each part's update with the whole groups'
    norms) gives tx.update on the whole tree: parameters, optimizer state, over two steps with
    different group factors, with weight clipping that binds and that does not."""
    trainable = _supernet_trainable()
    tx = _partwise_tx(grad_clip)
    plan = search_step.update_parts(trainable)
    whole_params, whole_state = trainable, tx.init(trainable)
    part_params, part_state = jax.tree.map(jnp.copy, trainable), tx.init(trainable)   # parts are donated
    rng = np.random.default_rng(1)
    for scales in (GroupScales(), GroupScales(weights=0.5, beta=0.0)):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), trainable)
        updates, whole_state = jax.jit(tx.update)(grads, whole_state, whole_params, scales=scales.asarrays())
        whole_params = optax.apply_updates(whole_params, updates)
        part_params, part_state, finite = search_step.update_by_parts(
            tx, plan, part_params, grads, part_state, scales.asarrays(), jnp.float32(1.0))
        assert float(finite) == 1.0
        assert jax.tree.structure(part_state) == jax.tree.structure(whole_state)
        chex.assert_trees_all_close(part_params, whole_params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(part_state, whole_state, rtol=1e-5, atol=1e-6)
    norm = float(losses.global_norm(grads["params"]))
    assert (norm > grad_clip) == (grad_clip < 1)   # the case is what it says


def test_update_by_parts_flags_a_non_finite_part_or_loss():
    """The finite flag is 0 when one part's gradient or the loss is not finite."""
    trainable = _supernet_trainable(2)
    tx, plan = _partwise_tx(5.0), search_step.update_parts(trainable)
    grads = jax.tree.map(jnp.zeros_like, trainable)
    for broken, loss in ((False, jnp.float32(jnp.nan)), (True, jnp.float32(1.0))):
        def poison(path, x):   # an inf in one preprocess layer's gradient
            return jnp.full_like(x, jnp.inf) if broken and names.key_path(path)[:3] == ("params", "cell_1", "pre1") else x
        g = jax.tree_util.tree_map_with_path(poison, grads)
        assert broken == (not bool(losses.all_finite(g)))
        _, _, finite = search_step.update_by_parts(tx, plan, jax.tree.map(jnp.copy, trainable), g,
                                                   tx.init(trainable), GroupScales().asarrays(), loss)
        assert float(finite) == 0.0


def test_parts_of_one_kind_compile_one_program(caplog):
    """Parts of the same structure and shapes share their programs: one update program per kind of
    part (fewer than the parts), and a second update compiles none."""
    import logging
    import re

    trainable = _supernet_trainable()
    tx = _partwise_tx(5.0)
    plan = search_step.update_parts(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)

    def run():
        caplog.clear()
        jax.config.update("jax_log_compiles", True)
        try:
            with caplog.at_level(logging.WARNING):
                search_step.update_by_parts(tx, plan, jax.tree.map(jnp.copy, trainable), grads, tx.init(trainable),
                                            GroupScales().asarrays(), jnp.float32(1.0))
        finally:
            jax.config.update("jax_log_compiles", False)
        return re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)

    parts = [search_step.take_part(trainable, p) for p in plan]
    kinds = {(jax.tree.structure(p), tuple((x.shape, x.dtype) for x in jax.tree.leaves(p))) for p in parts}
    assert len(kinds) < len(plan)
    first = run()
    assert first.count("part_update") == len(kinds), (first.count("part_update"), len(kinds), len(plan))
    assert first.count("part_norms") == first.count("part_update")
    assert "part_update" not in run()
