"""The super-net's variables and the search step's per-group freezing (warm-up, bilevel)."""
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mgas_jax import ops, search_step, supernet

C, LAYERS, STEPS = 4, 3, 2


@pytest.fixture(scope="module")
def net():
    spec = supernet.SuperNetSpec(supernet.full_cells(C, LAYERS, STEPS), num_classes=10, stem_channels=3 * C,
                                 head="classifier", impl="lax")
    return spec, supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))


def test_every_cell_has_its_own_architecture(net):
    spec, v = net
    edges = sum(2 + j for j in range(STEPS))
    for i in range(LAYERS):
        a = v["arch"][f"cell_{i}"]
        for name in ("alpha", "t_op", "t_k", "t_w"):
            assert a[name].shape == (edges, len(ops.OPS))
            assert not np.any(a[name])  # all architecture tensors start at 0
        assert a["t_pre"].shape == (2,)
    # filter scores on every pointwise output of sep/dil convs and on the preprocess outputs
    op = v["arch"]["cell_0"]["op_0_0_sep_conv_3x3"]["sep"]
    assert op["unit1"]["gate"]["beta"].shape == (C,) and op["unit2"]["gate"]["beta"].shape == (C,)
    assert v["arch"]["cell_0"]["pre0"]["gate"]["beta"].shape == (C,)
    # committed weight masks mirror the sep/dil kernels, all on
    m = v["masks"]["cell_0"]["op_0_0_dil_conv_5x5"]["dil"]["unit"]
    assert m["dw"]["kernel"].shape == (5, 5, 1, C) and np.all(m["dw"]["kernel"] == 1)
    # no weight masks on pools, skip and preprocess convs
    assert "op_0_0_max_pool_3x3" not in v["params"]["cell_0"]
    assert "kernel" not in v["masks"]["cell_0"]["pre0"].get("conv", {})


def test_stage_heads_follow_the_method_sizes():
    assert supernet.stage_head_sizes(32) == (11, 8)   # head_1 of a 32x32 input
    assert supernet.stage_head_sizes(16) == (7, 4)    # head_2 of a 16x16 input
    assert supernet.stage_head_sizes(8) == (5, 2)


def test_stage_subnet_builds_only_its_cells():
    cells = supernet.full_cells(C, LAYERS, STEPS)[:1]
    spec = supernet.SuperNetSpec(cells, 10, 3 * C, head="stage", impl="lax")
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    assert set(k for k in v["params"] if k.startswith("cell_")) == {"cell_0"}
    assert "head_1" in v["params"]


def _cfg(**kw):
    c = ml_collections.ConfigDict(dict(momentum=0.9, grad_clip=5.0, weight_decay=3e-4, lr=0.01, alpha_lr=1.0,
                                       beta_lr=1.0, threshold_lr=0.1, weight_threshold_lr=0.001))
    c.update(kw)
    return c


@pytest.mark.parametrize("flags", [(1, 0, 0, 0, 0), (0, 1, 1, 1, 1)])
def test_frozen_groups_keep_values_and_optimizer_state(net, flags):
    spec, v = net
    v = jax.tree.map(jnp.array, v)  # the step donates its state: work on a copy of the fixture
    tx = search_step.make_optimizer(_cfg())
    trainable = {"params": v["params"], "arch": v["arch"]}
    state = search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                    batch_stats=v["batch_stats"], masks=v["masks"], opt_state=tx.init(trainable))
    data_cfg = ml_collections.ConfigDict(dict(crop_padding=0, flip=False, cutout=0, autoaugment=False))
    step = search_step.make_step(spec, tx, data_cfg, jnp.zeros(3), jnp.ones(3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8), "label": rng.integers(0, 10, 8).astype(np.int32)}
    before = jax.tree.map(np.asarray, (state.params, state.arch, state.opt_state))
    new, metrics = step(state, batch, jax.random.key(1), jnp.float32(0.1), jnp.asarray(flags, jnp.float32))
    assert float(metrics["finite"]) == 1.0
    params_changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before[0])))
    arch_changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.arch), jax.tree.leaves(before[1])))
    assert params_changed == bool(flags[0])
    assert arch_changed == bool(flags[1])
    w_state_new = jax.tree.leaves(new.opt_state.inner_states["weights"])
    w_state_old = jax.tree.leaves(before[2].inner_states["weights"])
    assert any(np.any(a != b) for a, b in zip(w_state_new, w_state_old)) == bool(flags[0])


def _state(tx, v):
    v = jax.tree.map(jnp.array, v)  # the step donates its state: a fresh copy each time
    trainable = {"params": v["params"], "arch": v["arch"]}
    return search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                   batch_stats=v["batch_stats"], masks=v["masks"], opt_state=tx.init(trainable))


def _run_steps(spec, v, programs, flag_rows):
    tx = search_step.make_optimizer(_cfg())
    data_cfg = ml_collections.ConfigDict(dict(crop_padding=1, flip=True, cutout=0, autoaugment=False))
    step = search_step.make_step(spec, tx, data_cfg, jnp.full(3, 100.0), jnp.full(3, 60.0), programs=programs)
    state, rng, out = _state(tx, v), np.random.default_rng(0), []
    for i, flags in enumerate(flag_rows):
        batch = {"image": rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, metrics = step(state, batch, jax.random.key(i), jnp.float32(0.05), jnp.asarray(flags, jnp.float32))
        out.append(jax.device_get(metrics))
    return jax.device_get(state), out


def _assert_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)), 1e-3)
        assert np.max(np.abs(x - y)) <= rtol * scale, (jax.tree_util.keystr(path), np.max(np.abs(x - y)), scale)


@pytest.mark.parametrize("remat,head", [(False, "classifier"), (True, "stage")])
def test_chained_programs_give_the_one_program_step(remat, head):
    """The step as a chain of per-cell or per-edge programs (forward with residuals, backward)
    computes what the one-program step computes: same metrics, and after 3 steps (one with the arch
    groups frozen) the same parameters, batch statistics and optimizer state, up to float
    reassociation."""
    spec = supernet.SuperNetSpec(supernet.full_cells(C, LAYERS, STEPS), num_classes=10, stem_channels=3 * C,
                                 head=head, impl="lax", remat=remat)
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    flag_rows = [(1, 0, 0, 0, 0), (1, 1, 1, 1, 1), (1, 1, 1, 1, 1)]
    one, one_metrics = _run_steps(spec, v, "step", flag_rows)
    for programs in ("cell", "edge"):
        chain, chain_metrics = _run_steps(spec, v, programs, flag_rows)
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


def test_chained_programs_handle_a_cell_input_that_nothing_reads():
    """After pruning, no op of a cell may read one of its inputs: that preprocess layer gets a zero
    gradient in the chained forms, as in the one program."""
    cells = supernet.full_cells(C, 2, STEPS)
    unread = dataclasses.replace(cells[1], ops=tuple(o for o in cells[1].ops if o.src != 0))
    spec = supernet.SuperNetSpec((cells[0], unread), num_classes=10, stem_channels=3 * C, impl="lax")
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    one, one_metrics = _run_steps(spec, v, "step", [(1, 1, 1, 1, 1)] * 2)
    for programs in ("cell", "edge"):
        chain, chain_metrics = _run_steps(spec, v, programs, [(1, 1, 1, 1, 1)] * 2)
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
    first = _compiled_programs(caplog, lambda: _run_steps(spec, v, "cell", [(1, 1, 1, 1, 1)] * 2))
    assert first.count("cell_forward") == 2 and first.count("cell_backward") == 2, first
    second = _compiled_programs(caplog, lambda: _run_steps(spec2, v2, "cell", [(1, 1, 1, 1, 1)]))
    assert second.count("cell_forward") == 1 and second.count("cell_backward") == 1, second  # only cell 1 is new


def test_per_edge_programs_compile_each_distinct_edge_once(caplog):
    """Edges that compute the same thing on the same shapes run one program: a whole normal cell (all
    its edges carry all 7 ops) compiles one edge program and one preprocess program (both cell inputs
    are the stem's output). After one edge loses an op, only that edge compiles."""
    # a width no other test uses: programs compiled (or cached on disk) by other tests would not log
    cell = supernet.full_cell(C + 1, reduction=False, steps=STEPS)
    spec = supernet.SuperNetSpec((cell,), num_classes=10, stem_channels=3 * (C + 1), impl="lax")
    pruned = dataclasses.replace(cell, ops=tuple(o for o in cell.ops
                                                 if not (o.node == 1 and o.src == 0 and o.op == "sep_conv_5x5")))
    spec2 = dataclasses.replace(spec, cells=(pruned,))
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (8, 8, 3))
    v2 = supernet.init_variables(spec2, jax.random.key(0, impl="rbg"), (8, 8, 3))
    first = _compiled_programs(caplog, lambda: _run_steps(spec, v, "edge", [(1, 1, 1, 1, 1)] * 2))
    parts = ("edge_forward", "edge_backward", "preprocess_forward", "preprocess_backward")
    assert [first.count(p) for p in parts] == [1, 1, 1, 1], first
    second = _compiled_programs(caplog, lambda: _run_steps(spec2, v2, "edge", [(1, 1, 1, 1, 1)]))
    assert [second.count(p) for p in parts] == [1, 1, 0, 0], second   # the pruned edge only


def test_unknown_step_programs_are_refused():
    spec = supernet.SuperNetSpec(supernet.full_cells(C, 1, STEPS), num_classes=10, stem_channels=3 * C)
    with pytest.raises(ValueError, match="unknown step programs 'cells'.*'step'.*'cell'.*'edge'"):
        search_step.make_step(spec, search_step.make_optimizer(_cfg()), None, None, None, programs="cells")
