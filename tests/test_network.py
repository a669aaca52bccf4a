"""Tests of mgas_jax.network: the evaluation network, its parameter and multiply-add counts.

Sizes are tiny (C = 4, 1-3 cells, 8x8 inputs); the published-size checks use `jax.eval_shape` only.
Compile time dominates on CPU, so: parameters come from 'rbg' keys (XLA compiles threefry random bits
slowly, once per distinct parameter shape; the tests do not care which PRNG makes the weights), and
networks other than the DARTS_V2 fixture use the native depthwise conv (`impl="lax"`; the CPU default
'shift' formulation is many small slices, each compiled separately when run eagerly; the two are
equal by tests/test_kernels.py).
"""
import importlib

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mgas_jax
from mgas_jax import genotype as G
from mgas_jax import network as N
from mgas_jax import ops


def key(i):
    return jax.random.key(i, impl="rbg")


def flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def unflat(d):
    return flax.traverse_util.unflatten_dict(d)


def shapes_of(spec, input_shape):
    """Variables of Network(spec) as ShapeDtypeStructs (no computation)."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.eval_shape(lambda k, x: N.Network(spec).init({"params": k}, x, train=False), key(0), x)


def init(spec, input_shape, seed=0):
    """Eager init: XLA compiles each primitive once per shape and the tests share that cache."""
    return N.Network(spec).init({"params": key(seed)}, jnp.zeros(input_shape), train=False)


def one_cell_spec(ops_, width=4, reduction=False, steps=1, concat=(2,), **kw):
    cell = G.CellSpec(reduction, tuple(ops_), width, steps=steps, concat=concat)
    return N.NetworkSpec((cell,), num_classes=10, stem_channels=6, **kw)


# ---------------------------------------------------------------------------------------------------
# Published sizes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_darts_v2_cifar10_param_count():
    """DARTS's eval log prints `param size = 3.349342MB` (parameters, auxiliary head excluded)."""
    net = mgas_jax.build_network("DARTS_V2", init_channels=36, layers=20, num_classes=10, auxiliary=True)
    variables = shapes_of(net.spec, (1, 32, 32, 3))
    assert mgas_jax.count_params(variables["params"]) == {"dense": 3349342, "nonzero": 3349342}
    # the auxiliary head on 576 channels: 576*128 + 2*128 + 128*768*4 + 2*768 + 768*10 + 10
    assert mgas_jax.count_params(variables, include_aux=True)["dense"] == 3349342 + 476426
    # multiply-adds: DARTS's CIFAR network is usually quoted at 528M
    assert round(mgas_jax.count_flops(net.spec, (32, 32, 3)) / 1e6) == 528


def test_darts_v2_imagenet_param_count():
    """DARTS ImageNet (C=48, 14 cells, 1000 classes): 4.7M in the paper."""
    net = mgas_jax.build_network("DARTS_V2", init_channels=48, layers=14, num_classes=1000, auxiliary=True,
                                 imagenet_stem=True)
    variables = shapes_of(net.spec, (1, 224, 224, 3))
    assert mgas_jax.count_params(variables)["dense"] == 4718752
    assert set(variables["params"]["aux_head"]) == {"conv1", "bn1", "conv2", "classifier"}  # no BN after conv2


def test_conv_shapes_of_a_tiny_network_by_hand():
    """conv_shapes reads every conv and linear layer off the real modules, with its output positions."""
    ops_ = [G.OpSpec(0, 0, "sep_conv_3x3", mid=2, out_index=(1, 3)), G.OpSpec(0, 1, "dil_conv_5x5", out_index=(0,)),
            G.OpSpec(0, 1, "max_pool_3x3")]
    spec = one_cell_spec(ops_, pool_bn=True, masked=True, auxiliary=True)
    sep, dil = ("cell_0", "op_0_0_sep_conv_3x3", "sep"), ("cell_0", "op_0_1_dil_conv_5x5", "dil", "unit")
    want = {("stem", "conv0", "kernel"): ((3, 3, 3, 6), 64),
            ("cell_0", "pre0", "conv", "kernel"): ((1, 1, 6, 4), 64),
            ("cell_0", "pre1", "conv", "kernel"): ((1, 1, 6, 4), 64),
            sep + ("unit1", "dw", "kernel"): ((3, 3, 1, 4), 64),   # depthwise on the cell width
            sep + ("unit1", "pw", "kernel"): ((1, 1, 4, 2), 64),   # 4 -> mid 2
            sep + ("unit2", "dw", "kernel"): ((3, 3, 1, 2), 64),
            sep + ("unit2", "pw", "kernel"): ((1, 1, 2, 2), 64),   # mid 2 -> the 2 kept outputs
            dil + ("dw", "kernel"): ((5, 5, 1, 4), 64),
            dil + ("pw", "kernel"): ((1, 1, 4, 1), 64),
            ("classifier", "kernel"): ((4, 10), 1)}              # the auxiliary head is not counted
    assert {p: (k, n) for p, k, n in N.conv_shapes(spec, (8, 8, 3))} == want
    flops = 64 * (162 + 24 + 24 + (36 + 8 + 18 + 4) + (100 + 4)) + 40
    assert N.count_flops(spec, (8, 8, 3)) == flops == 24360
    # masks: each zeroed weight saves its layer's output positions
    masks = {p: np.ones(m.shape, np.float32) for p, m in flat(shapes_of(spec, (1, 8, 8, 3))["masks"]).items()}
    masks[dil + ("dw", "kernel")].reshape(-1)[:7] = 0
    masks[sep + ("unit2", "pw", "kernel")].reshape(-1)[:3] = 0
    nested = flax.traverse_util.unflatten_dict(masks)
    assert N.count_flops(spec, (8, 8, 3), nested) == flops - (7 + 3) * 64 == 23720
    assert N.count_flops(spec, (8, 8, 3), {"masks": nested}) == 23720   # a variables dict too
    # a reduction cell on an odd input: stride 2 gives ceil(7 / 2) = 4 rows and columns
    spec = one_cell_spec([G.OpSpec(0, 0, "sep_conv_3x3")], reduction=True)
    assert N.count_flops(spec, (7, 7, 3)) == 49 * (162 + 24 + 24) + 16 * (36 + 16 + 36 + 16) + 40 == 11994


# ---------------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """DARTS_V2, C=4, 3 cells (normal, reduce, reduce), 8x8 inputs: the aux head sees a 2x2 map."""
    net = N.build_network("DARTS_V2", init_channels=4, layers=3, num_classes=10, auxiliary=True)
    variables = N.init_network(net.spec, key(0), (2, 8, 8, 3))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    return net, variables, x


@pytest.mark.slow
def test_forward_shapes_and_aux(tiny):
    net, variables, x = tiny
    assert set(variables) == {"params", "batch_stats"}
    assert net.spec.aux_cell == 2
    assert variables["params"]["aux_head"]["conv2"]["kernel"].shape == (2, 2, 128, 768)
    logits, aux = net.apply(variables, x, train=False)
    chex.assert_shape(logits, (2, 10))
    chex.assert_type(logits, jnp.float32)
    assert aux is None
    again, _ = net.apply(variables, x, train=False)
    np.testing.assert_array_equal(logits, again)  # evaluation is deterministic
    (logits_t, aux_t), updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_shape([logits_t, aux_t], (2, 10))
    chex.assert_tree_all_finite((logits_t, aux_t))
    assert not np.allclose(logits_t, logits)  # batch statistics instead of running ones
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    names = set(variables["params"])
    assert names == {"stem", "cell_0", "cell_1", "cell_2", "aux_head", "classifier"}
    assert {"pre0", "pre1", "op_0_0_sep_conv_3x3", "op_3_2_dil_conv_3x3"} <= set(variables["params"]["cell_0"])
    assert "fr" in variables["params"]["cell_2"]["pre0"]  # after a reduction: FactorizedReduce


def test_drop_path(tiny):
    net, variables, x = tiny

    def run(rate, rng=None):
        rngs = None if rng is None else {"dropout": rng}
        return net.apply(variables, x, train=True, drop_path_rate=rate, rngs=rngs, mutable=["batch_stats"])[0][0]

    base = run(0.0)  # rate 0: no rng needed, deterministic
    np.testing.assert_array_equal(base, run(0.0))
    dropped = run(0.5, jax.random.key(3))
    assert not np.allclose(dropped, base)
    np.testing.assert_array_equal(dropped, run(0.5, jax.random.key(3)))
    assert not np.allclose(dropped, run(0.5, jax.random.key(4)))
    # a traced (array) rate always takes the drop-path branch; at 0 it keeps everything
    np.testing.assert_allclose(run(jnp.asarray(0.0), jax.random.key(3)), base, rtol=1e-6, atol=1e-6)
    # evaluation ignores the rate
    np.testing.assert_array_equal(net.apply(variables, x, train=False, drop_path_rate=0.5)[0],
                                  net.apply(variables, x, train=False)[0])


def test_drop_path_spares_identity():
    """A cell of stride-1 skip_connects only: drop-path changes nothing (DARTS: not on Identity)."""
    spec = one_cell_spec([G.OpSpec(0, 0, "skip_connect"), G.OpSpec(0, 1, "skip_connect"),
                          G.OpSpec(1, 2, "skip_connect"), G.OpSpec(1, 0, "skip_connect")], steps=2, concat=(2, 3))
    net = N.Network(spec)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = init(spec, x.shape)
    out = [net.apply(variables, x, train=True, drop_path_rate=r, rngs={"dropout": jax.random.key(5)},
                     mutable=["batch_stats"])[0][0] for r in (0.0, 0.9)]
    np.testing.assert_array_equal(out[0], out[1])


def test_none_op_on_odd_inputs():
    """`none` adds zero and has no variables; a reduction on an odd map keeps ceil sizes (as DARTS)."""
    g = G.parse_genotype("Genotype(normal=[('none', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
                         "reduce=[('none', 0), ('max_pool_3x3', 1)], reduce_concat=[2])")
    net = N.build_network(g, init_channels=4, layers=3, num_classes=5, auxiliary=True)
    variables = shapes_of(net.spec, (2, 9, 9, 3))
    assert not any("none" in name for name in variables["params"]["cell_1"])
    x = jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32)
    logits, aux = jax.eval_shape(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"])[0], variables, x)
    assert logits.shape == aux.shape == (2, 5)


def test_aux_geometry():
    assert N.aux_geometry(8) == (5, 3, 2)  # DARTS CIFAR: 8x8 -> pool 5/3 -> 2x2 -> conv 2x2 -> 1x1
    assert N.aux_geometry(7, imagenet=True) == (5, 2, 2)  # DARTS ImageNet: 7x7 -> 2x2
    assert N.aux_geometry(16) == (5, 3, 4)  # larger maps: the conv covers the pooled map
    assert N.aux_geometry(5) == (4, 1, 2)  # too small for 5/3 to give 2x2
    assert N.aux_geometry(2) == (1, 1, 2)  # 8x8 digits after two reductions
    assert N.aux_geometry(1) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# Per-op widths and weight masks
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_per_op_widths_equal_zero_padded_full_width():
    """An op writing a channel subset, with a narrow sep_conv interior, equals the full-width op whose
    extra channels' weights are zero (and BN biases 0)."""
    width, sep_out, dil_out = 4, (0, 2), (3,)
    pruned_ops = [G.OpSpec(0, 0, "sep_conv_3x3", mid=2, out_index=sep_out), G.OpSpec(0, 1, "skip_connect"),
                  G.OpSpec(0, 1, "dil_conv_3x3", out_index=dil_out)]
    full_ops = [G.OpSpec(o.node, o.src, o.op) for o in pruned_ops]
    pruned, full = one_cell_spec(pruned_ops, width, impl="lax"), one_cell_spec(full_ops, width, impl="lax")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    vp = init(pruned, x.shape)
    # random values everywhere, so that nothing matches by accident
    rng = np.random.default_rng(2)
    vp = jax.tree.map(lambda a: a + 0.3 * rng.uniform(size=a.shape).astype(np.float32), vp)
    sep = ("cell_0", "op_0_0_sep_conv_3x3", "sep")
    dil = ("cell_0", "op_0_1_dil_conv_3x3", "dil", "unit")
    p = flat(vp["params"])
    assert p[sep + ("unit1", "dw", "kernel")].shape == (3, 3, 1, 4)
    assert p[sep + ("unit1", "pw", "kernel")].shape == (1, 1, 4, 2)
    assert p[sep + ("unit2", "dw", "kernel")].shape == (3, 3, 1, 2)
    assert p[sep + ("unit2", "pw", "kernel")].shape == (1, 1, 2, 2)
    assert p[sep + ("unit2", "bn", "scale")].shape == (2,)
    assert p[dil + ("pw", "kernel")].shape == (1, 1, 4, 1)

    # the full-width variables: same everywhere else; pruned channels embedded, the rest zero
    vf = {c: flat(v) for c, v in init(full, x.shape).items()}
    vp_flat = {c: flat(v) for c, v in vp.items()}
    for c in vf:
        for path, value in vp_flat[c].items():
            if vf[c][path].shape == value.shape:
                vf[c][path] = value
    sel = {"mid": np.array([0, 1]), "sep_out": np.array(sep_out), "dil_out": np.array(dil_out)}

    def embed(path, idx, axis=-1, coll="params", fill=0.0):
        target = np.full(vf[coll][path].shape, fill, np.float32)
        value = np.asarray(vp_flat[coll][path])
        if axis == "io":  # unit2 pw: rows = mid channels, columns = the op's output channels
            target[:, :, sel["mid"][:, None], sel["sep_out"][None, :]] = value
        else:
            target[..., idx] = value
        vf[coll][path] = jnp.asarray(target)

    embed(sep + ("unit1", "pw", "kernel"), sel["mid"])
    embed(sep + ("unit2", "dw", "kernel"), sel["mid"])
    embed(sep + ("unit2", "pw", "kernel"), None, axis="io")
    embed(dil + ("pw", "kernel"), sel["dil_out"])
    for unit, idx in ((sep + ("unit1",), sel["mid"]), (sep + ("unit2",), sel["sep_out"]), (dil, sel["dil_out"])):
        embed(unit + ("bn", "scale"), idx, fill=1.0)
        embed(unit + ("bn", "bias"), idx)
        embed(unit + ("bn", "mean"), idx, coll="batch_stats")
        embed(unit + ("bn", "var"), idx, coll="batch_stats", fill=1.0)
    vf = {c: unflat(v) for c, v in vf.items()}
    for train in (False, True):
        out_p = N.Network(pruned).apply(vp, x, train=train, mutable=["batch_stats"])[0][0]
        out_f = N.Network(full).apply(vf, x, train=train, mutable=["batch_stats"])[0][0]
        np.testing.assert_allclose(out_p, out_f, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_weight_masks_equal_zeroed_weights():
    normal = G.CellSpec(False, (G.OpSpec(0, 0, "sep_conv_3x3"), G.OpSpec(0, 1, "dil_conv_5x5"),
                                G.OpSpec(1, 2, "sep_conv_5x5", mid=3), G.OpSpec(1, 1, "avg_pool_3x3")),
                        4, steps=2, concat=(2, 3))
    reduce = G.CellSpec(True, (G.OpSpec(0, 0, "sep_conv_3x3"), G.OpSpec(0, 1, "dil_conv_3x3", out_index=(1, 5))),
                        8, steps=1, concat=(2,))
    net = N.build_network((normal, reduce), init_channels=4, num_classes=10, impl="lax")
    assert net.spec.masked and net.spec.pool_bn
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    variables = init(net.spec, x.shape)
    masks = flat(variables["masks"])
    assert masks and all("sep" in p or "dil" in p for p in masks)
    params = flat(variables["params"])
    assert all(params[p].shape == m.shape for p, m in masks.items())
    rng = np.random.default_rng(2)
    drawn = {p: jnp.asarray(rng.uniform(size=m.shape) < 0.7, jnp.float32) for p, m in masks.items()}
    zeros = sum(int(m.size - m.sum()) for m in drawn.values())
    assert zeros > 0
    masked = dict(variables, masks=unflat(drawn))
    zeroed = dict(variables, params=unflat({p: v * drawn[p] if p in drawn else v for p, v in params.items()}))
    for train in (False, True):
        a = net.apply(masked, x, train=train, mutable=["batch_stats"])[0][0]
        b = net.apply(zeroed, x, train=train, mutable=["batch_stats"])[0][0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    counts = N.count_params(variables["params"], masked)
    assert counts["dense"] == N.count_params(variables)["dense"]
    assert counts["nonzero"] == counts["dense"] - zeros
    # multiply-adds drop by each zeroed weight times the output positions of its layer
    positions = {p: n for p, _, n in N.conv_shapes(net.spec, (8, 8, 3))}
    drop = sum(int(m.size - m.sum()) * positions[p] for p, m in drawn.items())
    assert N.count_flops(net.spec, (8, 8, 3), masked) == N.count_flops(net.spec, (8, 8, 3)) - drop


def test_count_params_bn_and_pool_bn():
    """BN scale and bias count, batch statistics do not; pool_bn adds a BN (2 * width) per pool."""
    pools = [G.OpSpec(0, 0, "max_pool_3x3"), G.OpSpec(0, 1, "avg_pool_3x3")]
    without = N.count_params(shapes_of(one_cell_spec(pools), (1, 8, 8, 3)))["dense"]
    with_bn = N.count_params(shapes_of(one_cell_spec(pools, pool_bn=True), (1, 8, 8, 3)))["dense"]
    # stem 3*3*3*6 + 2*6; pre0, pre1: 6*4 + 2*4 each; classifier 4*10 + 10
    assert without == (162 + 12) + 2 * (24 + 8) + 50
    assert with_bn == without + 2 * 2 * 4


# ---------------------------------------------------------------------------------------------------
# Multiply-adds, by hand
# ---------------------------------------------------------------------------------------------------

def test_flops_single_sep_conv():
    spec = one_cell_spec([G.OpSpec(0, 0, "sep_conv_3x3")])
    stem = 3 * 3 * 3 * 6 * 64
    preprocess = 2 * (6 * 4 * 64)  # two 1x1 convs 6 -> 4 on 8x8
    sep = 2 * (9 * 4 * 64 + 4 * 4 * 64)  # (depthwise 3x3 + pointwise 4 -> 4) twice
    assert N.count_flops(spec, (8, 8, 3)) == stem + preprocess + sep + 4 * 10 == 20136
    # a narrower interior and fewer outputs
    spec = one_cell_spec([G.OpSpec(0, 0, "sep_conv_3x3", mid=2, out_index=(1,))])
    assert N.count_flops(spec, (8, 8, 3)) == stem + preprocess + (9 * 4 + 4 * 2 + 9 * 2 + 2 * 1) * 64 + 40


def test_flops_1x1_convs_of_a_reduction():
    """A reduction cell whose only op is a stride-2 skip_connect: FactorizedReduce's two 1x1 convs."""
    spec = one_cell_spec([G.OpSpec(0, 0, "skip_connect")], reduction=True)
    stem, preprocess = 3 * 3 * 3 * 6 * 64, 2 * (6 * 4 * 64)
    factorized = 2 * (4 * 2 * 16)  # 4 -> 2 channels each, on the 4x4 output
    assert N.count_flops(spec, (8, 8, 3)) == stem + preprocess + factorized + 40 == 13736
    assert N.count_flops(spec, (1, 8, 8, 3)) == 13736  # per example
    # pools, identities and BN cost nothing
    spec = one_cell_spec([G.OpSpec(0, 0, "avg_pool_3x3"), G.OpSpec(0, 1, "skip_connect")], pool_bn=True)
    assert N.count_flops(spec, (8, 8, 3)) == stem + preprocess + 40


# ---------------------------------------------------------------------------------------------------
# Construction and errors
# ---------------------------------------------------------------------------------------------------

def test_build_network_defaults():
    cells = G.genotype_to_cells("DARTS_V1", 3, 4)
    from_genotype = N.build_network("DARTS_V1", init_channels=4, layers=3, num_classes=10).spec
    from_cells = N.build_network(cells, init_channels=4, num_classes=10).spec
    assert from_genotype.cells == from_cells.cells and from_genotype.stem_channels == 12
    assert (from_genotype.pool_bn, from_genotype.masked) == (False, False)
    assert (from_cells.pool_bn, from_cells.masked) == (True, True)  # MGAS retraining network
    assert hash(from_cells) == hash(N.NetworkSpec(cells, 10, 12, pool_bn=True, masked=True))
    with pytest.raises(ValueError, match="needs layers="):
        N.build_network("DARTS_V1", init_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="layers=4 but 3 cells"):
        N.build_network(cells, init_channels=4, layers=4, num_classes=10)


@pytest.mark.parametrize("ops_, kw, message", [
    ([G.OpSpec(0, 0, "skip_connect"), G.OpSpec(0, 0, "skip_connect")], {}, r"op_0_0_skip_connect must be unique"),
    ([G.OpSpec(0, 0, "sep_conv_3x3", out_index=(1, 4))], {}, r"out_index = \(1, 4\) must be .* channels in 0..3"),
    ([G.OpSpec(0, 2, "skip_connect")], {}, r"node 0 may read states 0..1, not 2"),
    ([G.OpSpec(0, 0, "conv_7x1_1x7")], {}, r"unknown op 'conv_7x1_1x7'; the allowed ops are"),
    ([G.OpSpec(0, 0, "skip_connect")], {"auxiliary": True, "aux_cell": 3}, r"aux_cell must be a cell index 0..0"),
    ([G.OpSpec(0, 0, "skip_connect")], {"impl": "cuda"}, r"unknown depthwise conv implementation 'cuda'"),
])
def test_spec_errors(ops_, kw, message):
    with pytest.raises(ValueError, match=message):
        one_cell_spec(ops_, **kw)


def test_spec_errors_concat_and_input():
    with pytest.raises(ValueError, match=r"concat = \(0, 2\): states must be in 2..2"):
        one_cell_spec([G.OpSpec(0, 0, "skip_connect")], reduction=True, concat=(0, 2))
    spec = one_cell_spec([G.OpSpec(0, 0, "skip_connect")])
    with pytest.raises(ValueError, match=r"float images \(N, H, W, C\)"):
        N.Network(spec).init({"params": key(0)}, jnp.zeros((8, 8, 3)), train=False)


def test_package_exports():
    for name in ("parse_genotype", "get_genotype", "Genotype", "CellSpec", "OpSpec", "Network", "NetworkSpec",
                 "build_network", "count_params", "count_flops", "gates"):
        assert name in mgas_jax.__all__ and getattr(mgas_jax, name) is not None
    assert mgas_jax.gates.hard_step is not None and mgas_jax.CellSpec is G.CellSpec
    # the package's names are the modules' own objects, not copies
    assert mgas_jax.Network is N.Network and mgas_jax.count_params is N.count_params
    assert mgas_jax.gates is importlib.import_module("mgas_jax.gates") and mgas_jax.OpSpec is G.OpSpec
    with pytest.raises(AttributeError, match="has no attribute 'not_exported'"):
        mgas_jax.not_exported  # noqa: B018


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scatter_channels_equals_a_scatter_into_zeros_in_values_and_gradients(dtype):
    """Two gathers with a hand-written VJP; the plain formulation is `zeros.at[..., index].set(y)`."""
    index, width = (0, 2, 3, 6), 8
    y = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, len(index))), dtype)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(width,)), dtype)

    def plain(y):
        return jnp.zeros(y.shape[:-1] + (width,), y.dtype).at[..., jnp.asarray(index)].set(y)

    def loss(place):
        return lambda y: jnp.sum(jnp.sin(place(y)) * w).astype(jnp.float32)

    ours = lambda y: ops.scatter_channels(y, index, width)
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(y), np.float32), np.asarray(plain(y), np.float32))
    g_ours, g_plain = jax.jit(jax.grad(loss(ours)))(y), jax.grad(loss(plain))(y)
    assert g_ours.dtype == dtype and g_ours.shape == y.shape
    np.testing.assert_array_equal(np.asarray(g_ours, np.float32), np.asarray(g_plain, np.float32))
    # channels outside the index are zero; full width in order is the identity
    assert not np.asarray(ours(y), np.float32)[..., [1, 4, 5, 7]].any()
    assert ops.scatter_channels(y, tuple(range(len(index))), len(index)) is y
