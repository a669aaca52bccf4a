"""mgas_jax.programs: a search step as a chain of small compiled programs (per cell or per edge)
computes what the one-program step computes, compiles each distinct cell or edge once, and its pieces
(vjp_programs, accumulate) on their own."""
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mgas_jax import programs, search_step, supernet

C, LAYERS, STEPS = 4, 3, 2
WARMUP, ALL = search_step.GroupScales.weights_only(), search_step.GroupScales()  # the step's group factors


def _cfg(**kw):
    c = ml_collections.ConfigDict(dict(momentum=0.9, grad_clip=5.0, weight_decay=3e-4, lr=0.01, alpha_lr=1.0,
                                       beta_lr=1.0, threshold_lr=0.1, weight_threshold_lr=0.001))
    c.update(kw)
    return c


def _state(tx, v):
    v = jax.tree.map(jnp.array, v)  # the step donates its state: a fresh copy each time
    trainable = {"params": v["params"], "arch": v["arch"]}
    return search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                   batch_stats=v["batch_stats"], masks=v["masks"], opt_state=tx.init(trainable))


def _run_steps(spec, v, programs, scale_rows, tx=None):
    tx = search_step.make_optimizer(_cfg()) if tx is None else tx
    data_cfg = ml_collections.ConfigDict(dict(crop_padding=1, flip=True, cutout=0, autoaugment=False))
    step = search_step.make_step(spec, tx, data_cfg, jnp.full(3, 100.0), jnp.full(3, 60.0), programs=programs)
    state, rng, out = _state(tx, v), np.random.default_rng(0), []
    for i, scales in enumerate(scale_rows):
        batch = {"image": rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, metrics = step(state, batch, jax.random.key(i), jnp.float32(0.05), scales.asarrays())
        out.append(jax.device_get(metrics))
    return jax.device_get(state), out


def _assert_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)), 1e-3)
        assert np.max(np.abs(x - y)) <= rtol * scale, (jax.tree_util.keystr(path), np.max(np.abs(x - y)), scale)


@pytest.mark.slow
@pytest.mark.parametrize("remat,head", [(False, "classifier"), (True, "stage")])
def test_chained_programs_give_the_one_program_step(remat, head):
    """The step as a chain of per-cell or per-edge programs (forward with residuals, backward)
    computes what the one-program step computes: same metrics, and after 3 steps (one with the arch
    groups frozen) the same parameters, batch statistics and optimizer state, up to float
    reassociation."""
    spec = supernet.SuperNetSpec(supernet.full_cells(C, LAYERS, STEPS), num_classes=10, stem_channels=3 * C,
                                 head=head, impl="lax", remat=remat)
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    scale_rows = [WARMUP, ALL, ALL]
    one, one_metrics = _run_steps(spec, v, "step", scale_rows)
    for programs in ("cell", "edge"):
        chain, chain_metrics = _run_steps(spec, v, programs, scale_rows)
        assert jax.tree.structure(one) == jax.tree.structure(chain), programs
        for m1, m2 in zip(one_metrics, chain_metrics):
            assert m1.keys() == m2.keys() and m1["finite"] == m2["finite"] == 1.0
            for k in m1:
                np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=f"{programs} {k}")
        assert int(chain.step) == 3
        _assert_close(chain.params, one.params, 1e-4)
        _assert_close(chain.arch, one.arch, 1e-4)
        _assert_close(chain.batch_stats, one.batch_stats, 1e-4)
        _assert_close(chain.opt_state, one.opt_state, 1e-4)
        assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(chain.arch), jax.tree.leaves(v["arch"])))


@pytest.mark.slow
def test_chained_programs_handle_a_cell_input_that_nothing_reads():
    """After pruning, no op of a cell may read one of its inputs: that preprocess layer gets a zero
    gradient in the chained forms, as in the one program; with the update by parts and without."""
    cells = supernet.full_cells(C, 2, STEPS)
    unread = dataclasses.replace(cells[1], ops=tuple(o for o in cells[1].ops if o.src != 0))
    spec = supernet.SuperNetSpec((cells[0], unread), num_classes=10, stem_channels=3 * C, impl="lax")
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    one, one_metrics = _run_steps(spec, v, "step", [ALL] * 2)
    # an optimizer not known to act leaf by leaf: the chain updates the whole tree in one program
    whole = optax.GradientTransformationExtraArgs(*search_step.make_optimizer(_cfg()))
    for programs, tx in (("cell", None), ("edge", None), ("edge", whole)):
        chain, chain_metrics = _run_steps(spec, v, programs, [ALL] * 2, tx)
        np.testing.assert_allclose(chain_metrics[-1]["loss"], one_metrics[-1]["loss"], rtol=2e-5)
        _assert_close(chain.params, one.params, 1e-4)
        _assert_close(chain.arch, one.arch, 1e-4)


def _compiled_programs(caplog, fn) -> list[str]:
    """Names of the programs XLA compiles while fn() runs (from JAX's compile log)."""
    caplog.clear()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            fn()
    finally:
        jax.config.update("jax_log_compiles", False)
    return re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)


@pytest.mark.slow
def test_per_cell_programs_compile_an_unchanged_cell_once(caplog):
    """After a structural change in one cell, the per-cell step of the new structure compiles that
    cell's forward and backward only: the unchanged cell's programs are found already compiled."""
    # a width no other test uses: programs compiled (or cached on disk) by other tests would not log
    cells = supernet.full_cells(C + 2, 2, STEPS)
    spec = supernet.SuperNetSpec(cells, num_classes=10, stem_channels=3 * (C + 2), impl="lax")
    last = cells[1]
    pruned = dataclasses.replace(last, ops=tuple(o for o in last.ops if o.op != "sep_conv_5x5"))
    spec2 = dataclasses.replace(spec, cells=(cells[0], pruned))
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    v2 = supernet.init_variables(spec2, jax.random.key(0, impl="rbg"), (8, 8, 3))
    first = _compiled_programs(caplog, lambda: _run_steps(spec, v, "cell", [ALL] * 2))
    assert first.count("cell_forward") == 2 and first.count("cell_backward") == 2, first
    second = _compiled_programs(caplog, lambda: _run_steps(spec2, v2, "cell", [ALL]))
    assert second.count("cell_forward") == 1 and second.count("cell_backward") == 1, second  # only cell 1 is new


@pytest.mark.slow
def test_per_edge_programs_compile_each_distinct_edge_once(caplog):
    """Edges that compute the same thing on the same shapes run one program: a whole normal cell (all
    its edges carry all 7 ops) compiles one edge program and one preprocess program (both cell inputs
    are the stem's output), and one update program per kind of part. After one edge loses an op, only
    that edge compiles."""
    # a width no other test uses: programs compiled (or cached on disk) by other tests would not log
    cell = supernet.full_cell(C + 1, reduction=False, steps=STEPS)
    spec = supernet.SuperNetSpec((cell,), num_classes=10, stem_channels=3 * (C + 1), impl="lax")
    pruned = dataclasses.replace(cell, ops=tuple(o for o in cell.ops
                                                 if not (o.node == 1 and o.src == 0 and o.op == "sep_conv_5x5")))
    spec2 = dataclasses.replace(spec, cells=(pruned,))
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    v2 = supernet.init_variables(spec2, jax.random.key(0, impl="rbg"), (8, 8, 3))
    tx = search_step.make_optimizer(_cfg())   # a search's one optimizer: its update programs are shared too
    first = _compiled_programs(caplog, lambda: _run_steps(spec, v, "edge", [ALL] * 2, tx))
    parts = ("edge_forward", "edge_backward", "preprocess_forward", "preprocess_backward", "part_update")
    # updates: one program per kind of part (stem, stem_bn, edge, preprocess, the cell's arch, head)
    assert [first.count(p) for p in parts] == [1, 1, 1, 1, 6], first
    assert "whole_update" not in first
    second = _compiled_programs(caplog, lambda: _run_steps(spec2, v2, "edge", [ALL], tx))
    assert [second.count(p) for p in parts] == [1, 1, 0, 0, 1], second   # the pruned edge only


def test_unknown_step_programs_are_refused():
    spec = supernet.SuperNetSpec(supernet.full_cells(C, 1, STEPS), num_classes=10, stem_channels=3 * C)
    with pytest.raises(ValueError, match="unknown step programs 'cells'.*'step'.*'cell'.*'edge'"):
        search_step.make_step(spec, search_step.make_optimizer(_cfg()), None, None, None, programs="cells")


def _toy(const, x, w):
    """out = tanh(x @ w) * const, aux = the sum of x (a stand-in for a cell's batch statistics)."""
    return jnp.tanh(x @ w) * const, {"sum": jnp.sum(x)}


@pytest.mark.parametrize("remat", [False, True])
def test_vjp_programs_give_jaxs_vjp(remat):
    """forward returns out, residuals, aux; backward(residuals, g) the input gradients of jax.vjp (not
    const's). With remat the residuals are only the inputs themselves."""
    rng = np.random.default_rng(0)
    const, x, w = jnp.float32(1.5), jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), \
        jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    forward, backward = programs.vjp_programs(_toy, remat, "toy")
    out, residuals, aux = forward(const, x, w)
    want_out, vjp, want_aux = jax.vjp(lambda a, b: _toy(const, a, b), x, w, has_aux=True)
    np.testing.assert_allclose(out, want_out, rtol=1e-6)
    np.testing.assert_allclose(aux["sum"], want_aux["sum"], rtol=1e-6)
    if remat:
        assert len(residuals) == 3 and residuals[1] is x and residuals[2] is w
    gx, gw = backward(residuals, g)
    want_gx, want_gw = vjp(g)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-6)


def test_vjp_programs_are_named_in_the_compile_log(caplog):
    forward, _ = programs.vjp_programs(_toy, False, "toy_named")
    inputs = (jnp.float32(1.0), jnp.ones((2, 3)), jnp.ones((3, 1)))
    assert _compiled_programs(caplog, lambda: forward(*inputs)) == ["toy_named_forward"]


def test_accumulate_starts_from_none_and_adds_trees():
    term = {"a": jnp.ones(2), "b": (jnp.float32(3.0),)}
    assert programs.accumulate(None, term) is term
    total = programs.accumulate(term, {"a": jnp.arange(2.0), "b": (jnp.float32(1.0),)})
    np.testing.assert_array_equal(total["a"], [1.0, 2.0])
    assert float(total["b"][0]) == 4.0


def test_cells_with_the_same_module_share_one_program_pair():
    cells = supernet.full_cells(C, LAYERS, STEPS)
    spec = supernet.SuperNetSpec(cells, num_classes=10, stem_channels=3 * C, impl="lax")
    twin = supernet.SuperNetSpec(cells, num_classes=100, stem_channels=3 * C, impl="lax")   # another head
    pair = programs.cell_programs(supernet.cell_module(spec, 1), False)
    assert programs.cell_programs(supernet.cell_module(twin, 1), False) is pair
    assert programs.cell_programs(supernet.cell_module(spec, 1), True) is not pair
    assert programs.cell_programs(supernet.cell_module(spec, 2), False) is not pair
