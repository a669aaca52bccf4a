"""The super-net's variables and the search step's per-group freezing (warm-up, bilevel)."""
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


@pytest.mark.slow
@pytest.mark.parametrize("scales", [search_step.GroupScales.weights_only(), search_step.GroupScales(weights=0.0)],
                         ids=["warmup", "arch_only"])
def test_frozen_groups_keep_values_and_optimizer_state(net, scales):
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
    new, metrics = step(state, batch, jax.random.key(1), jnp.float32(0.1), scales.asarrays())
    assert float(metrics["finite"]) == 1.0
    params_changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before[0])))
    arch_changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.arch), jax.tree.leaves(before[1])))
    assert params_changed == bool(scales.weights)
    assert arch_changed == bool(scales.alpha)
    w_state_new = jax.tree.leaves(new.opt_state.inner_states["weights"])
    w_state_old = jax.tree.leaves(before[2].inner_states["weights"])
    assert any(np.any(a != b) for a, b in zip(w_state_new, w_state_old)) == bool(scales.weights)
