"""Tests of mgas_jax.prune: MGAS's filter and weight gates on a user's Flax model (Linen and NNX).

Tiny models on 4x4 inputs: the spec read from the trace, gates under jit and grad, commits, the
budget fill, physical removal (the smaller model computes the gated model's outputs), the optimizer
partition and the errors of bad input.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mgas_jax import gates, prune


class LinenCNN(nn.Module):
    """conv-BN-relu, conv(bias)-relu, pool, a channels-first flatten and a dense classifier."""
    widths: tuple = (4, 5)

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.widths[0], (3, 3))(x)))
        x = nn.relu(nn.Conv(self.widths[1], (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # index i = channel i // 4
        return nn.Dense(3)(x)


def linen_setup(widths=(4, 5)):
    model = LinenCNN(widths)
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
    variables = model.init(jax.random.key(0), x)
    return model, x, variables


def forward_of(model):
    return lambda p, e, x: model.apply({"params": p, "batch_stats": e}, x)


def random_stats(stats, seed=2):
    """Running statistics that are not the init's zeros and ones, so that slicing them matters."""
    leaves, treedef = jax.tree.flatten(stats)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.5 + jax.random.uniform(k, v.shape) for k, v in zip(keys, leaves)])


def some_off(spec, params):
    """Gate state with chosen filters below their threshold and t_w masking some weights."""
    g = prune.init_gates(spec)
    g["Conv_0/kernel"].update(beta=jnp.array([1.0, -3.0, 1.0, 0.5]), t_k=jnp.float32(0.3))
    g["Conv_1/kernel"].update(beta=jnp.array([-2.0, 1.0, 1.0, -3.0, 2.0]), t_k=jnp.float32(0.3))
    for k in spec.weight_kernels:
        g[k]["t_w"] = jnp.float32(0.5 * np.median(np.abs(np.asarray(dict(zip(prune.leaf_paths(params),
                                                                                 jax.tree.leaves(params)))[k]))))
    return g


def test_spec_reads_channels_and_consumers_from_the_model():
    model, x, v = linen_setup()
    spec = prune.make_spec(v["params"], forward_of(model), x, extra=v["batch_stats"])
    assert spec.weight_kernels == ("Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel")
    assert spec.filter_kernels == ("Conv_0/kernel", "Conv_1/kernel")  # not the classifier's outputs
    f0, f1 = spec.filters
    assert (f0.out_axis, f0.width) == (3, 4)
    assert {s.path for s in f0.channel_params} == {"Conv_0/bias", "BatchNorm_0/scale", "BatchNorm_0/bias"}
    assert f0.inputs == (prune.Slice("Conv_1/kernel", 2, 1),)
    assert {s.path for s in f0.extra} == {"BatchNorm_0/mean", "BatchNorm_0/var"}
    assert {s.path for s in f1.channel_params} == {"Conv_1/bias"}
    assert f1.inputs == (prune.Slice("Dense_0/kernel", 0, 4),)  # channels-first flatten of 2x2 positions


@pytest.mark.slow
@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_gates_grad_through_the_model_reaches_every_group(transform):
    model, x, v = linen_setup()
    spec = prune.make_spec(v["params"], forward_of(model), x, extra=v["batch_stats"])
    g = some_off(spec, v["params"])
    masks = prune.init_masks(spec)
    labels = jnp.array([0, 1, 2])

    def loss(trainable):
        p = prune.apply_gates(spec, trainable["params"], trainable["gates"], masks)
        logits, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + 0.1 * prune.threshold_penalty(spec, trainable["gates"], masks)

    grads = transform(jax.grad(loss))({"params": v["params"], "gates": g})
    for k in spec.filter_kernels:
        assert np.all(np.abs(grads["gates"][k]["beta"]) > 0), k  # every channel, gated off ones included
        assert abs(float(grads["gates"][k]["t_k"])) > 0
    for k in spec.weight_kernels:
        assert abs(float(grads["gates"][k]["t_w"])) > 0
    # masked weights still get gradient through the surrogate (their |w| is within 1 of t_w), where
    # their input channel is not gated off
    w = np.asarray(v["params"]["Dense_0"]["kernel"])
    rows = np.arange(20) // 4  # Conv_1's channel of each dense input row
    masked = (np.abs(w) <= float(g["Dense_0/kernel"]["t_w"])) & np.isin(rows, [1, 2, 4])[:, None]
    assert masked.any()
    assert np.all(np.asarray(grads["params"]["Dense_0"]["kernel"])[masked] != 0)
    # a gated-off filter's channel is read as exactly zero by the next layer
    p = prune.apply_gates(spec, v["params"], g, masks)
    assert np.all(np.asarray(p["Conv_1"]["kernel"])[:, :, 1] == 0)
    beta = np.array([-2.0, 1.0, 1.0, -3.0, 2.0])
    gate = 1 / (1 + np.exp(-beta)) * (1 / (1 + np.exp(-beta)) > 0.3)  # [0, s(1), s(1), 0, s(2)]
    expected = w * (np.abs(w) > float(g["Dense_0/kernel"]["t_w"])) * gate[rows][:, None]
    np.testing.assert_allclose(p["Dense_0"]["kernel"], expected, rtol=1e-6)
    np.testing.assert_array_equal(p["BatchNorm_0"]["scale"], v["params"]["BatchNorm_0"]["scale"])


def test_commit_ands_live_masks_and_penalty_counts_active_thresholds():
    model, x, v = linen_setup()
    spec = prune.make_spec(v["params"], forward_of(model), x, extra=v["batch_stats"])
    g = some_off(spec, v["params"])
    masks = prune.commit(spec, v["params"], g, prune.init_masks(spec))
    np.testing.assert_array_equal(masks["Conv_0/kernel"]["filters"], [1, 0, 1, 1])
    np.testing.assert_array_equal(masks["Conv_1/kernel"]["filters"], [0, 1, 1, 0, 1])
    w = np.asarray(v["params"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(masks["Dense_0/kernel"]["weights"], np.abs(w) > float(g["Dense_0/kernel"]["t_w"]))
    # committed-off units stay off whatever the live masks say
    g["Conv_0/kernel"]["beta"] = jnp.full((4,), 3.0)
    again = prune.commit(spec, v["params"], g, masks)
    np.testing.assert_array_equal(again["Conv_0/kernel"]["filters"], [1, 0, 1, 1])
    # R_thr: exp(-t) of every threshold whose kernel has a committed unit left
    t = {k: float(g[k]["t_w"]) for k in spec.weight_kernels}
    expected = 2 * np.exp(-0.3) + sum(np.exp(-t[k]) for k in spec.weight_kernels)
    np.testing.assert_allclose(prune.threshold_penalty(spec, g, masks), expected, rtol=1e-6)
    masks["Conv_1/kernel"]["filters"][:] = 0
    np.testing.assert_allclose(prune.threshold_penalty(spec, g, masks), expected - np.exp(-0.3), rtol=1e-6)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_removal_gives_a_smaller_linen_model_with_the_same_outputs(train):
    model, x, v = linen_setup()
    stats = random_stats(v["batch_stats"])
    spec = prune.make_spec(v["params"], forward_of(model), x, extra=stats)
    g = some_off(spec, v["params"])
    masks = prune.commit(spec, v["params"], g, prune.init_masks(spec))
    gated = prune.apply_gates(spec, v["params"], g, masks)
    small = prune.remove(spec, v["params"], g, masks, stats)
    assert small.widths == {"Conv_0/kernel": 3, "Conv_1/kernel": 3}
    np.testing.assert_array_equal(small.kept["Conv_1/kernel"], [1, 2, 4])
    assert small.params["Dense_0"]["kernel"].shape == (12, 3) and small.extra["BatchNorm_0"]["var"].shape == (3,)
    np.testing.assert_array_equal(small.extra["BatchNorm_0"]["mean"], np.asarray(stats["BatchNorm_0"]["mean"])[[0, 2, 3]])
    smaller = LinenCNN((small.widths["Conv_0/kernel"], small.widths["Conv_1/kernel"]))
    kw = dict(train=True, mutable=["batch_stats"]) if train else {}
    out = model.apply({"params": gated, "batch_stats": stats}, x, **kw)
    out_small = smaller.apply({"params": small.params, "batch_stats": small.extra}, x, **kw)
    if train:
        out, out_small = out[0], out_small[0]
    np.testing.assert_allclose(out_small, out, atol=1e-5)
    assert prune.nonzero_params(spec, v["params"], g, masks) == prune.count_nonzero(small.params)
    np.testing.assert_array_equal(small.weight_masks["Dense_0/kernel"], np.asarray(small.params["Dense_0"]["kernel"]) != 0)


def test_fill_budget_meets_the_budget_exactly_by_weight_margin():
    model, x, v = linen_setup()
    spec = prune.make_spec(v["params"], forward_of(model), x, extra=v["batch_stats"])
    g = some_off(spec, v["params"])
    masks = prune.commit(spec, v["params"], g, prune.init_masks(spec))
    before = prune.nonzero_params(spec, v["params"], g, masks)
    budget = before - 40
    filled = prune.fill_budget(spec, v["params"], g, masks, budget)
    assert prune.nonzero_params(spec, v["params"], g, filled) == budget
    # it switched off the 40 surviving weights with the smallest |w| - t_w: none left on is below them
    flat = dict(zip(prune.leaf_paths(v["params"]), jax.tree.leaves(v["params"])))
    small = prune.remove(spec, v["params"], g, masks)
    off, on = [], []
    for k in spec.weight_kernels:
        m = np.abs(np.asarray(flat[k])) - float(g[k]["t_w"])
        index = np.arange(m.size).reshape(m.shape)
        surviving = prune._slice(index, prune._cuts(spec, small.kept).get(k, [])).ravel()
        was, now = np.asarray(masks[k]["weights"]).ravel(), filled[k]["weights"].ravel()
        off += list(m.ravel()[surviving][(was[surviving] > 0) & (now[surviving] == 0)])
        on += list(m.ravel()[surviving][now[surviving] > 0])
    assert len(off) == 40 and max(off) <= min(on)
    assert prune.fill_budget(spec, v["params"], g, filled, budget) is not filled  # a copy, unchanged
    with pytest.raises(ValueError, match="out of reach"):
        prune.fill_budget(spec, v["params"], g, masks, 2)  # below the 3 kept BatchNorm scales


class NNXNet(nnx.Module):
    def __init__(self, widths, rngs):
        self.conv = nnx.Conv(1, widths[0], (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(widths[0], rngs=rngs)
        self.conv2 = nnx.Conv(widths[0], widths[1], (3, 3), rngs=rngs)
        self.head = nnx.Linear(widths[1], 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.bn(self.conv(x)))))
        return self.head(jnp.mean(x, axis=(1, 2)))


def test_nnx_model_through_split_and_merge():
    net = NNXNet((4, 5), nnx.Rngs(0))
    net.eval()
    graphdef, params, stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    stats = random_stats(stats)
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
    forward = lambda p, e, x: nnx.merge(graphdef, p, e)(x)
    spec = prune.make_spec(params, forward, x, extra=stats)
    assert spec.filter_kernels == ("conv/kernel", "conv2/kernel")
    g = prune.init_gates(spec)
    g["conv/kernel"].update(beta=jnp.array([1.0, -3.0, 1.0, -3.0]), t_k=jnp.float32(0.3))
    g["conv2/kernel"].update(beta=jnp.array([1.0, 1.0, -3.0, 1.0, 1.0]), t_k=jnp.float32(0.3))
    masks = prune.commit(spec, params, g, prune.init_masks(spec))
    out = jax.jit(lambda p, gs: forward(prune.apply_gates(spec, p, gs, masks), stats, x))(params, g)
    small = prune.remove(spec, params, g, masks, stats)
    assert small.widths == {"conv/kernel": 2, "conv2/kernel": 4}
    smaller = NNXNet((2, 4), nnx.Rngs(0))
    smaller.eval()
    graphdef2 = nnx.split(smaller, nnx.Param, nnx.BatchStat)[0]
    np.testing.assert_allclose(nnx.merge(graphdef2, small.params, small.extra)(x), out, atol=1e-5)


def test_optimizer_routes_each_group_to_its_learning_rate():
    model, x, v = linen_setup()
    spec = prune.make_spec(v["params"], forward_of(model), x, extra=v["batch_stats"])
    trainable = {"params": v["params"], "gates": prune.init_gates(spec)}
    tx = prune.optimizer(lr=2.0, weight_decay=0.0, grad_clip=0.0, beta_lr=3.0, threshold_lr=5.0, weight_threshold_lr=7.0)
    ones = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(ones, tx.init(trainable), trainable)
    assert all(np.all(np.asarray(u) == -2.0) for u in jax.tree.leaves(updates["params"]))
    for k, leaves in updates["gates"].items():
        for name, lr in (("beta", 3.0), ("t_k", 5.0), ("t_w", 7.0)):
            if name in leaves:
                np.testing.assert_array_equal(leaves[name], -lr, err_msg=f"{k}/{name}")
    # the defaults are the authors' (clip 5, weight decay 3e-4 on the weights only)
    updates, _ = prune.optimizer().update(ones, prune.optimizer().init(trainable), trainable)
    np.testing.assert_allclose(updates["gates"]["Conv_0/kernel"]["beta"], -1.0)
    np.testing.assert_allclose(updates["gates"]["Conv_0/kernel"]["t_k"], -0.1)
    np.testing.assert_allclose(updates["gates"]["Dense_0/kernel"]["t_w"], -0.001)
    norm = np.sqrt(sum(np.asarray(u).size for u in jax.tree.leaves(ones["params"])))  # the weights' norm only
    b = np.asarray(v["params"]["Dense_0"]["bias"])
    np.testing.assert_allclose(updates["params"]["Dense_0"]["bias"], -0.01 * (5.0 / norm + 3e-4 * b), rtol=1e-5)


class Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3))(x)
        y = y + nn.Conv(4, (1, 1))(y)
        return nn.Dense(2)(jnp.mean(y, axis=(1, 2)))


class ChannelNorm(nn.Module):
    """Normalises over channels: removing a (zero) channel would change the mean."""
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3))(x)
        y = y - jnp.mean(y, axis=-1, keepdims=True)
        return nn.Dense(2)(jnp.mean(y, axis=(1, 2)))


def test_bad_input_gives_clear_errors():
    model, x, v = linen_setup()
    params, stats, fwd = v["params"], v["batch_stats"], forward_of(model)
    with pytest.raises(prune.PruneSpecError, match="matches no leaf"):
        prune.make_spec(params, fwd, x, extra=stats, weights=r"Conv_9/kernel")
    with pytest.raises(prune.PruneSpecError, match="not.*kernel|kernel.*rank"):
        prune.make_spec(params, fwd, x, extra=stats, weights=r"Conv_0/bias")
    with pytest.raises(prune.PruneSpecError, match="conv or dense"):
        prune.make_spec(params, fwd, x, extra=stats, filters=r"BatchNorm_0/scale")
    with pytest.raises(prune.PruneSpecError, match="model's outputs"):
        prune.make_spec(params, fwd, x, extra=stats, filters=r"Dense_0/kernel")
    norm = ChannelNorm()
    nv = norm.init(jax.random.key(0), x)
    with pytest.raises(prune.PruneSpecError, match="reduce_sum over its channel axis"):
        prune.make_spec(nv["params"], lambda p, x: norm.apply({"params": p}, x), x)
    res = Residual()
    rv = res.init(jax.random.key(0), x)
    with pytest.raises(prune.PruneSpecError, match="meet in one op"):
        prune.make_spec(rv["params"], lambda p, x: res.apply({"params": p}, x), x)
    spec = prune.make_spec(params, fwd, x, extra=stats)
    other = linen_setup((4, 6))[2]["params"]
    with pytest.raises(prune.PruneSpecError, match="do not match"):
        prune.apply_gates(spec, other, prune.init_gates(spec), prune.init_masks(spec))
