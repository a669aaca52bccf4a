"""Tests of mgas_jax.kernels: every fast formulation equals the plain one, values and gradients.

The plain formulation is `jax.lax.conv_general_dilated` with `feature_group_count = C` (depthwise)
or a 1x1 kernel (pointwise). Each case compares the output and the gradients of a random linear
function of it with respect to the input and to the kernel, over kernel sizes 3 and 5, strides 1
and 2, dilations 1 and 2, odd and even input sizes, and explicit paddings other than 'same'
(including one wider than the kernel's reach, where the input gradient crops). Shapes are tiny; each
case is one jit-compiled function.
"""
import functools
import itertools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgas_jax import kernels

FAST = ("shift", "shift_vjp")


def _plain_depthwise(x, kernel, stride, dilation, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


def _plain_pointwise(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _value_and_grads(conv, x, kernel, cotangent):
    """conv(x, kernel) and the gradients of sum(conv(x, kernel) * cotangent) w.r.t. x and kernel."""
    def f(x, kernel):
        y = conv(x, kernel)
        return jnp.sum(y * cotangent), y
    (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, kernel)
    return y, grads


def _random(shape, seed, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32), dtype)


def _check_depthwise(impl, size, k, stride, dilation, padding, channels=3, dtype=jnp.float32, tol=1e-4):
    x = _random((2, size, size + 1, channels), 0, dtype)   # H != W catches a swapped axis
    kernel = _random((k, k, 1, channels), 1, dtype)
    pad = kernels.same_padding(k, dilation) if padding is None else padding
    expected = _plain_depthwise(x, kernel, stride, dilation, pad)
    cotangent = _random(expected.shape, 2, dtype)
    y_ref, (dx_ref, dk_ref) = _value_and_grads(
        lambda a, b: _plain_depthwise(a, b, stride, dilation, pad), x, kernel, cotangent)
    y, (dx, dk) = _value_and_grads(
        lambda a, b: kernels.depthwise_conv(a, b, stride=stride, dilation=dilation, padding=padding, impl=impl),
        x, kernel, cotangent)
    chex.assert_trees_all_equal_shapes_and_dtypes((y, dx, dk), (y_ref, dx_ref, dk_ref))
    for got, want, what in ((y, y_ref, "output"), (dx, dx_ref, "input gradient"), (dk, dk_ref, "kernel gradient")):
        want = np.asarray(want, np.float32)
        # sums of up to ~150 products: the error scales with the largest entry, not each entry
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()),
                                   err_msg=f"{impl}: {what} differs from lax.conv_general_dilated")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("k,stride,dilation,size",
                         list(itertools.product((3, 5), (1, 2), (1, 2), (7, 8))))
def test_depthwise_matches_lax(impl, k, stride, dilation, size):
    _check_depthwise(impl, size, k, stride, dilation, padding=None)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("k,stride,dilation,padding", [(3, 1, 1, 0), (3, 2, 1, 3), (5, 1, 2, 5), (5, 2, 1, 1)])
def test_depthwise_explicit_padding(impl, k, stride, dilation, padding):
    """Paddings other than 'same', narrower and wider than the kernel's reach."""
    _check_depthwise(impl, 8, k, stride, dilation, padding)


@pytest.mark.parametrize("impl", FAST)
def test_depthwise_bfloat16(impl):
    """Reduced-precision compute (SuperNetSpec.dtype='bfloat16') keeps the dtype and the values."""
    _check_depthwise(impl, 8, 3, 1, 1, padding=None, channels=8, dtype=jnp.bfloat16, tol=2e-2)


def test_depthwise_auto_and_lax():
    """'auto' resolves per backend and 'lax' is the plain formulation itself."""
    assert kernels.resolve_impl("auto") == ("shift_vjp" if jax.default_backend() == "cpu" else "lax")
    for impl in ("auto", "lax"):
        _check_depthwise(impl, 8, 5, 2, 1, padding=None)


def test_unknown_impl():
    with pytest.raises(ValueError, match=r"unknown depthwise conv implementation 'cuda'"):
        kernels.resolve_impl("cuda")
    assert set(kernels.IMPLS) >= {"auto", "lax", "shift"}


@pytest.mark.parametrize("ci,co", [(3, 5), (8, 8)])
def test_pointwise_matches_lax(ci, co):
    x = _random((2, 5, 6, ci), 3)
    kernel = _random((1, 1, ci, co), 4)
    cotangent = _random((2, 5, 6, co), 5)
    y_ref, grads_ref = _value_and_grads(_plain_pointwise, x, kernel, cotangent)
    y, grads = _value_and_grads(kernels.pointwise_conv, x, kernel, cotangent)
    chex.assert_trees_all_equal_shapes_and_dtypes((y, grads), (y_ref, grads_ref))
    chex.assert_trees_all_close((y, grads), (y_ref, grads_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,dilation", [(3, 1), (5, 2)])
def test_same_padding_keeps_size(k, dilation):
    x = jnp.zeros((1, 9, 9, 2))
    y = kernels.depthwise_conv(x, jnp.zeros((k, k, 1, 2)), dilation=dilation, impl="lax")
    assert y.shape == x.shape


def _pool_value_and_grad(pool, x, cotangent):
    """pool(x) and the gradient of sum(pool(x) * cotangent) w.r.t. x, jit-compiled."""
    f = lambda a: (jnp.sum(pool(a) * cotangent), pool(a))  # noqa: E731
    (_, y), dx = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
    return y, dx


def _plain_max_pool(x, stride):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("impl", FAST + ("lax", "auto"))
@pytest.mark.parametrize("stride,size", [(1, 6), (1, 7), (2, 6), (2, 7)])
@pytest.mark.parametrize("values", ["normal", "ties", "zeros"])
def test_max_pool_matches_reduce_window(impl, stride, size, values):
    """The 3x3 max pool equals Flax's (reduce_window; gradient: XLA's select-and-scatter), values and
    input gradients, also where a window holds its maximum several times: the gradient goes to the
    first maximal element of the window, as select-and-scatter sends it."""
    shape = (2, size, size + 1, 3)
    rng = np.random.default_rng(0)
    x = {"normal": rng.normal(size=shape), "ties": rng.integers(-1, 2, size=shape),
         "zeros": np.zeros(shape)}[values]
    x = jnp.asarray(x, jnp.float32)
    cotangent = _random(_plain_max_pool(x, stride).shape, 2)
    y_ref, dx_ref = _pool_value_and_grad(lambda a: _plain_max_pool(a, stride), x, cotangent)
    y, dx = _pool_value_and_grad(lambda a: kernels.max_pool_3x3(a, stride, impl), x, cotangent)
    chex.assert_trees_all_equal_shapes_and_dtypes((y, dx), (y_ref, dx_ref))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-6, atol=1e-6)


def _plain_avg_pool(x, stride):
    return nn.avg_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)), count_include_pad=False)


@pytest.mark.parametrize("impl", FAST + ("lax", "auto"))
@pytest.mark.parametrize("stride,size", [(1, 6), (1, 7), (2, 6), (2, 7)])
def test_avg_pool_matches_flax(impl, stride, size):
    """The 3x3 average pool (padding not counted) equals Flax's, values and input gradients, at the
    borders too, where the count of a window is 4 or 6 instead of 9."""
    x = _random((2, size, size + 1, 3), 0)
    cotangent = _random(_plain_avg_pool(x, stride).shape, 2)
    y_ref, dx_ref = _pool_value_and_grad(lambda a: _plain_avg_pool(a, stride), x, cotangent)
    y, dx = _pool_value_and_grad(lambda a: kernels.avg_pool_3x3(a, stride, impl), x, cotangent)
    chex.assert_trees_all_equal_shapes_and_dtypes((y, dx), (y_ref, dx_ref))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-6, atol=1e-6)


def test_avg_pool_bfloat16():
    x = _random((2, 6, 7, 4), 0, jnp.bfloat16)
    y = kernels.avg_pool_3x3(x, 2, "shift_vjp")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(_plain_avg_pool(x.astype(jnp.float32), 2)), rtol=2e-2, atol=2e-2)


def test_max_pool_bfloat16():
    x = _random((2, 6, 7, 4), 0, jnp.bfloat16)
    y = kernels.max_pool_3x3(x, 1, "shift_vjp")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(_plain_max_pool(x, 1), np.float32))


def _bn_results(module, variables, x, cotangent, stat_weights):
    """y, the updated batch_stats and the gradients w.r.t. x and params of a loss that reads y and,
    through stat_weights, the updated running statistics (so their cotangents are not zero)."""
    def loss(x, params):
        y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
        stats = new["batch_stats"]
        extra = jnp.sum(stats["mean"] * stat_weights[0]) + jnp.sum(stats["var"] * stat_weights[1])
        return jnp.sum(y.astype(jnp.float32) * cotangent) + extra, (y, stats)
    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, variables.get("params", {}))
    return y, stats, grads


@pytest.mark.parametrize("train,fast_variance", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_norm_matches_flax(train, fast_variance, affine, dtype):
    """ops.BatchNorm (kernels.batch_norm_train's custom VJP in training mode) against
    flax.linen.BatchNorm: the same variables, outputs and their dtype, running statistics, and
    gradients w.r.t. the input, scale and bias, including what the running statistics' cotangents
    add to the input gradient."""
    from mgas_jax import ops
    ours = ops.BatchNorm(use_running_average=not train, use_scale=affine, use_bias=affine,
                         use_fast_variance=fast_variance)
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=ops.BN_MOMENTUM, epsilon=ops.BN_EPS,
                           use_scale=affine, use_bias=affine, use_fast_variance=fast_variance)
    keys = jax.random.split(jax.random.key(0), 6)
    # a mean far from 0 and per-channel spreads: the one-pass variance and the backward's sums matter
    x = (3.0 + jax.random.normal(keys[0], (4, 5, 6, 7)) * jnp.arange(1, 8)).astype(dtype)
    v_ours, v_flax = ours.init(keys[1], x), flax_bn.init(keys[1], x)
    chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_flax)
    chex.assert_trees_all_equal(v_ours, v_flax)
    variables = {"batch_stats": {"mean": 0.1 * jnp.arange(7.0), "var": 1 + 0.2 * jnp.arange(7.0)}}
    if affine:
        variables["params"] = {"scale": 1 + 0.3 * jax.random.normal(keys[2], (7,)),
                               "bias": jax.random.normal(keys[3], (7,))}
    cotangent = jax.random.normal(keys[4], x.shape)
    stat_weights = jax.random.normal(keys[5], (2, 7))
    got = _bn_results(ours, variables, x, cotangent, stat_weights)
    want = _bn_results(flax_bn, variables, x, cotangent, stat_weights)
    assert got[0].dtype == want[0].dtype
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == "float32" else dict(atol=0.05, rtol=0.02)
    chex.assert_trees_all_close(got, want, **tol)
    if train:   # a real check: the input gradient is not near zero
        assert float(jnp.abs(got[2][0].astype(jnp.float32)).max()) > 0.01


@pytest.mark.parametrize("fast_variance", [False, True])
def test_batch_norm_train_gradient_matches_autodiff(fast_variance):
    """kernels.batch_norm_train's backward equals autodiff of the plain formula (one- or two-pass
    variance), cotangents on all three outputs, in float32 at a tight tolerance."""
    def plain(x, scale, bias, eps):
        mean = x.mean((0, 1, 2))
        var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean) if fast_variance \
            else jnp.square(x - mean).mean((0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var

    keys = jax.random.split(jax.random.key(1), 6)
    x = 1.5 + jax.random.normal(keys[0], (3, 4, 4, 5))
    scale, bias = jax.random.normal(keys[1], (5,)), jax.random.normal(keys[2], (5,))
    cts = (jax.random.normal(keys[3], x.shape), jax.random.normal(keys[4], (5,)), jax.random.normal(keys[5], (5,)))

    def vjp(f):
        out, pull = jax.vjp(lambda x, s, b: f(x, s, b, 1e-5), x, scale, bias)
        return out, pull(cts)
    ours = functools.partial(kernels.batch_norm_train, fast_variance=fast_variance)
    chex.assert_trees_all_close(jax.jit(lambda: vjp(ours))(), jax.jit(lambda: vjp(plain))(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [7, 8])
def test_strided_pointwise_conv_matches_lax(size):
    """ops.Conv's 1x1 stride-2 conv (FactorizedReduce's halves: subsample, then a matmul) against
    the strided convolution, values and gradients, on odd and even inputs."""
    from mgas_jax import ops
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (2, size, size, 5))
    conv = ops.Conv(6, 1, stride=2)
    variables = conv.init(keys[1], x)
    cotangent = jax.random.normal(keys[2], (2, (size + 1) // 2, (size + 1) // 2, 6))
    strided = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 2), padding=[(0, 0)] * 2,
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = _value_and_grads(lambda x, k: conv.apply({"params": {"kernel": k}}, x), x,
                           variables["params"]["kernel"], cotangent)
    want = _value_and_grads(strided, x, variables["params"]["kernel"], cotangent)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [6, 7])
@pytest.mark.parametrize("stride,offset", [(2, 0), (2, 1), (3, 0), (3, 2)])
def test_subsample_matches_slicing(size, stride, offset):
    """kernels.subsample (its own backward, materialized) against plain slicing: x[:, o::s, o::s]
    of the input shifted by `offset` and zero-padded, values and gradients, odd and even sizes."""
    x = _random((2, size, size + 1, 3), 0)

    def plain(x):
        shifted = jnp.pad(x[:, offset:, offset:, :], ((0, 0), (0, offset), (0, offset), (0, 0)))
        return shifted[:, ::stride, ::stride, :]

    want = plain(x)
    cotangent = _random(want.shape, 1)
    got = kernels.subsample(x, stride, offset)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    np.testing.assert_array_equal(got, want)
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * cotangent)))(x)
    np.testing.assert_array_equal(grad(lambda x: kernels.subsample(x, stride, offset)), grad(plain))


@pytest.mark.parametrize("size", [6, 7])
def test_factorized_reduce_matches_the_plain_formula(size):
    """ops.FactorizedReduce (halves from kernels.subsample) against its formula written with plain
    slices and a pad, as it was: ReLU, a 1x1 conv on every second pixel and one on the input shifted
    by one pixel, concatenated, BatchNorm. Values and gradients, odd and even sizes."""
    from mgas_jax import ops
    x = _random((2, size, size, 4), 0)
    fr = ops.FactorizedReduce(3, 3, search=False, affine=True)
    variables = fr.init(jax.random.key(0), x, True)
    params = variables["params"]

    def ours(x, params):
        return fr.apply(dict(variables, params=params), x, True, mutable=["batch_stats"])[0]

    def plain(x, params):
        r = jax.nn.relu(x)
        shifted = jnp.pad(r[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
        halves = [jnp.einsum("nhwc,cd->nhwd", a[:, ::2, ::2, :], params[name]["kernel"][0, 0])
                  for a, name in ((r, "conv1"), (shifted, "conv2"))]
        y = jnp.concatenate(halves, -1)
        mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
        return (y - mean) / jnp.sqrt(var + ops.BN_EPS) * params["bn"]["scale"] + params["bn"]["bias"]

    want = plain(x, params)
    cotangent = _random(want.shape, 1)
    grads = lambda f: jax.jit(jax.grad(lambda x, p: jnp.sum(f(x, p) * cotangent), argnums=(0, 1)))(x, params)
    chex.assert_trees_all_close(ours(x, params), want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads(ours), grads(plain), atol=1e-4, rtol=1e-4)


def _compiled_computations(fn, *args) -> list:
    """The computations (fusions, the entry) of fn's compiled program for args, as HLO text each."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.split(r"\n(?=%?\S+ \(|ENTRY)", text)


def test_strided_gradient_is_spread_into_its_own_buffer():
    """The input gradient of a stride-2 edge, a sum of its ops' gradients (here FactorizedReduce and
    a 3x3 max pool): no fusion both spreads a gradient by the stride (a pad with interior padding)
    and adds. XLA had fused FactorizedReduce's spread into the sum, whose loop then tested every
    element for padding (23 ms against ~8 for a stride-2 edge; benchmarks/README.md section 17)."""
    from mgas_jax import ops
    x = _random((4, 16, 16, 8), 0)
    fr = ops.FactorizedReduce(4, 4, search=False, affine=True)
    variables = fr.init(jax.random.key(0), x, True)

    def edge(x):
        y = fr.apply(variables, x, True, mutable=["batch_stats"])[0]
        return y + kernels.max_pool_3x3(x, 2, impl="shift_vjp")

    cotangent = _random((4, 8, 8, 8), 1)
    computations = _compiled_computations(jax.grad(lambda x: jnp.sum(edge(x) * cotangent)), x)

    def spreads_by_a_stride(computation):   # a pad with interior padding: padding=lo_hi_interior x ...
        return any(any(dim.count("_") == 2 and dim.split("_")[2] != "0" for dim in padding.split("x"))
                   for padding in re.findall(r" pad\(.*padding=([\d_x-]+)", computation))

    spreads = [c for c in computations if not c.startswith("ENTRY") and spreads_by_a_stride(c)]
    assert spreads, "no fusion spreads a gradient"
    assert all(" add(" not in c for c in spreads)


def test_masked_kernel_is_not_recomputed_per_pixel():
    """A weight-masked kernel (kernel * (|kernel| > t), as ops.Conv masks it) feeding the 'shift_vjp'
    depthwise conv in a forward-only program: the mask is computed once, not inside the loop over
    the output's pixels, where XLA had fused it (a 5x5 conv 3x slower; benchmarks/README.md
    section 17). Checked on the compiled program: the fusion that reads the input's windows holds
    no abs."""
    x = _random((2, 12, 12, 8), 0)
    kernel = _random((5, 5, 1, 8), 1)

    def forward(x, kernel, t):
        masked = kernel * (jnp.abs(kernel) - t > 0)
        return kernels.depthwise_conv(x, masked, impl="shift_vjp")

    computations = _compiled_computations(forward, x, kernel, jnp.float32(0.1))
    taps = [c for c in computations if c.count(" slice(") >= 25]   # reads the 25 windows
    assert taps, "no fusion reads the 25 windows"
    assert all(" abs(" not in c for c in taps)
    np.testing.assert_allclose(jax.jit(forward)(x, kernel, 0.1),
                               _plain_depthwise(x, kernel * (jnp.abs(kernel) > 0.1), 1, 1, 2), rtol=1e-5, atol=1e-5)


def _with_zeros(x):
    """x with a quarter of its entries exactly 0: where a ReLU's derivative convention shows."""
    return jnp.where(jnp.arange(x.size).reshape(x.shape) % 4 == 0, 0.0, x).astype(x.dtype)


@pytest.mark.parametrize("impl", FAST + ("lax",))
@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 1)])
def test_depthwise_relu_matches_relu_then_conv(impl, k, stride, dilation):
    """depthwise_conv(x, relu=True) (for 'shift_vjp' the ReLU inside the kernel, its derivative read
    from the saved padded output) against jax.nn.relu then the native conv: values and gradients,
    with inputs exactly 0 (derivative 0 there, as jax.nn.relu)."""
    x = _with_zeros(_random((2, 7, 8, 3), 0))
    kernel = _random((k, k, 1, 3), 1)
    pad = kernels.same_padding(k, dilation)
    cotangent = _random(_plain_depthwise(x, kernel, stride, dilation, pad).shape, 2)
    want = _value_and_grads(lambda a, b: _plain_depthwise(jax.nn.relu(a), b, stride, dilation, pad), x, kernel,
                            cotangent)
    got = _value_and_grads(lambda a, b: kernels.depthwise_conv(a, b, stride=stride, dilation=dilation, impl=impl,
                                                               relu=True), x, kernel, cotangent)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(got[1][0]).max()) > 0.1   # the input gradient is not trivially zero
    # the gradient is zero wherever the input is not positive
    assert float(jnp.abs(jnp.where(x <= 0, got[1][0], 0)).max()) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_relu_matches_jax_nn_relu(dtype):
    """kernels.relu: jax.nn.relu's values, dtype, gradient (0 at 0) and forward-mode derivative."""
    x = _with_zeros(_random((3, 4, 5, 6), 3, dtype))
    t = _random(x.shape, 4, dtype)
    chex.assert_trees_all_equal(jax.jit(kernels.relu)(x), jax.nn.relu(x))
    assert kernels.relu(x).dtype == x.dtype
    grad = jax.jit(jax.grad(lambda a: jnp.sum(kernels.relu(a).astype(jnp.float32) * t.astype(jnp.float32))))
    want = jax.grad(lambda a: jnp.sum(jax.nn.relu(a).astype(jnp.float32) * t.astype(jnp.float32)))(x)
    chex.assert_trees_all_equal(grad(x), want)
    chex.assert_trees_all_equal(jax.jvp(kernels.relu, (x,), (t,)), jax.jvp(jax.nn.relu, (x,), (t,)))


def _grad_temp_bytes(f, *args):
    """XLA's temporary buffer bytes of the jitted gradient of f: the activations it keeps for the
    backward, and the backward's own."""
    compiled = jax.jit(jax.grad(f, argnums=tuple(range(len(args))))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


UNITS = 4   # units in the chains of the memory tests below


def test_batch_norm_keeps_one_activation():
    """A chain of 1x1 conv - BatchNorm - ReLU units keeps two activations per unit for the backward:
    the conv's input and the BatchNorm's x - mean. Saving x instead, XLA kept x and x - mean both
    (11 activations for these 4 units against 8, measured), as in the retraining step
    (benchmarks/README.md section 14)."""
    keys = jax.random.split(jax.random.key(5), 2)
    x = jax.random.normal(keys[0], (8, 16, 16, 32))
    w = jax.random.normal(keys[1], (UNITS, 1, 1, 32, 32)) * 0.2

    def f(x, w):
        for i in range(UNITS):
            y = kernels.batch_norm_train(kernels.pointwise_conv(x, w[i]), jnp.ones(32), jnp.zeros(32), 1e-5)[0]
            x = jax.nn.relu(y)
        return jnp.sum(x * x)

    activation = x.size * 4
    assert _grad_temp_bytes(f, x, w) <= (2 * UNITS + 0.5) * activation


def test_relu_does_not_keep_its_input():
    """A chain of units concat(two 1x1 convs) - ReLU - 1x1 conv: with kernels.relu the backward
    reads the ReLU's output (which the conv keeps anyway), so the concatenation is not kept; with
    jax.nn.relu it is. At least one activation per unit but the last smaller."""
    keys = jax.random.split(jax.random.key(6), 4)
    x = jax.random.normal(keys[0], (8, 16, 16, 32))
    wa, wb = (jax.random.normal(k, (UNITS, 1, 1, 32, 16)) * 0.2 for k in keys[1:3])
    wc = jax.random.normal(keys[3], (UNITS, 1, 1, 32, 32)) * 0.2

    def chain(relu):
        def f(x, wa, wb, wc):
            for i in range(UNITS):
                s = jnp.concatenate([kernels.pointwise_conv(x, wa[i]), kernels.pointwise_conv(x, wb[i])], -1)
                x = kernels.pointwise_conv(relu(s), wc[i])
            return jnp.sum(x * x)
        return f

    activation = x.size * 4
    assert (_grad_temp_bytes(chain(kernels.relu), x, wa, wb, wc)
            <= _grad_temp_bytes(chain(jax.nn.relu), x, wa, wb, wc) - (UNITS - 1) * activation)


def test_depthwise_relu_does_not_keep_its_input():
    """A chain of units (1x1 conv + skip) - ReLU - depthwise 3x3 ('shift_vjp'): with the ReLU in the
    kernel, the sum before it is not kept for the backward; with jax.nn.relu before the kernel it
    is. At least one activation per unit but the last smaller."""
    keys = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(keys[0], (8, 16, 16, 32))
    w = jax.random.normal(keys[1], (UNITS, 1, 1, 32, 32)) * 0.2
    k = jax.random.normal(keys[2], (UNITS, 3, 3, 1, 32))

    def chain(fused):
        def f(x, w, k):
            for i in range(UNITS):
                s = kernels.pointwise_conv(x, w[i]) + x
                x = (kernels.depthwise_conv(s, k[i], impl="shift_vjp", relu=True) if fused
                     else kernels.depthwise_conv(jax.nn.relu(s), k[i], impl="shift_vjp"))
            return jnp.sum(x * x)
        return f

    activation = x.size * 4
    assert _grad_temp_bytes(chain(True), x, w, k) <= _grad_temp_bytes(chain(False), x, w, k) - (UNITS - 1) * activation
