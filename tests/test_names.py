"""Tests of mgas_jax.names: the module paths the networks create are the ones the readers build, and
weight masks align with params as a parallel tree."""
import jax
import jax.numpy as jnp
import numpy as np

from mgas_jax import names, network, supernet


def test_paths_name_the_variables_both_networks_create():
    cells = supernet.full_cells(4, 3, steps=1)  # the last cell follows a reduction: FactorizedReduce
    spec = supernet.SuperNetSpec(cells, num_classes=10, stem_channels=12, impl="lax")
    x = jnp.zeros((2, 8, 8, 3))
    v = jax.eval_shape(lambda: supernet.SuperNet(spec).init(jax.random.key(0), x, train=False))
    evaluation = network.NetworkSpec(cells, num_classes=10, stem_channels=12, masked=True)
    w = jax.eval_shape(lambda: network.Network(evaluation).init(jax.random.key(0), x, train=False))
    for i, cell in enumerate(cells):
        assert names.cell_index(names.cell_name(i)) == i
        assert v["masks"][names.cell_name(i)][names.OPS_MASK].shape == (2, 7)
        for k in range(2):
            assert names.get_path(v["arch"], names.gate(names.pre_path(i, k))).shape == (cell.width,)
            assert names.has_path(w["params"], names.pre_path(i, k))
        for o in cell.ops:
            assert names.parse_op_name(names.op_name(o)) == (o.node, o.src, o.op)
            strided_skip = o.op == "skip_connect" and cell.reduction and o.src < 2
            if names.conv_units(o.op) or strided_skip:  # the other ops have no parameters
                for tree in (v["params"], w["params"]):
                    assert names.has_path(tree, names.op_path(i, o)), names.op_path(i, o)
            if strided_skip:
                assert names.has_path(v["arch"], names.gate(names.op_path(i, o) + (names.FR,)))
            for unit in names.conv_units(o.op):
                u = names.op_path(i, o) + unit
                assert names.get_path(v["arch"], names.gate(u)).shape == (cell.width,)
                for path in names.unit_kernels(u):
                    for tree in (v["params"], v["masks"], w["params"], w["masks"]):
                        assert names.is_kernel(path) and names.has_path(tree, path), path
    for tree in (v["params"], w["params"]):
        assert names.FR in names.get_path(tree, names.pre_path(2, 0))
    assert names.conv_units("sep_conv_5x5") == (("sep", "unit1"), ("sep", "unit2"))
    assert names.conv_units("dil_conv_3x3") == (("dil", "unit"),) and names.conv_units("max_pool_3x3") == ()
    assert names.parse_op_name("pre0") is None and names.cell_index("classifier") is None


def test_masks_align_with_params_and_apply_as_a_tree_map():
    params = {"a": {"kernel": np.full((2, 2), 3.0), "bias": np.ones(2)}, "b": {"kernel": np.ones(3)}}
    masks = {"a": {"kernel": np.array([[1, 0], [0, 1]], np.float32), "gate": {"beta": np.zeros(2)}}}
    aligned = names.masks_like(params, masks)
    assert jax.tree.structure(aligned, is_leaf=lambda x: x is None) == jax.tree.structure(params)
    assert aligned["a"]["bias"] is None and aligned["b"]["kernel"] is None
    out = names.apply(params, masks)
    np.testing.assert_array_equal(out["a"]["kernel"], [[3.0, 0.0], [0.0, 3.0]])
    np.testing.assert_array_equal(out["a"]["bias"], params["a"]["bias"])
    np.testing.assert_array_equal(out["b"]["kernel"], params["b"]["kernel"])
    assert jax.jit(names.apply)(params, masks)["a"]["kernel"][0, 1] == 0.0
    assert names.apply(params, {}) is not None and names.apply(params, None)["a"]["kernel"][0, 1] == 3.0
