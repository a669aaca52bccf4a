"""Convolution formulations, chosen per backend.

XLA's CPU backend runs depthwise convolutions (feature_group_count = C) far slower than a plain
sum of shifted, per-channel-scaled copies of the input; GPUs and TPUs have fast native depthwise
kernels. `depthwise_conv` picks the formulation from the default backend unless told otherwise; all
give the same values and gradients (tests/test_kernels.py).

The formulations ('auto' picks 'shift_vjp' on CPU, 'lax' elsewhere):

- 'lax': the native grouped convolution, `jax.lax.conv_general_dilated(feature_group_count=C)`.
- 'shift': the sum of k*k shifted, per-channel-scaled slices; its gradients come from autodiff.
- 'shift_vjp': a custom VJP. The forward pass and the input gradient are both sums of k*k shifted
  products (the input gradient correlates the stride-dilated cotangent with the flipped taps), each
  one loop fusion that reads its input once. The kernel gradient is one variadic reduction of the
  k*k window products (`_kernel_grad`): XLA CPU runs the native form, the grouped convolution's
  filter gradient, as a dense C x C convolution. On the CPU of benchmarks/README.md, a depthwise
  5x5 fwd+bwd (batch 32, 32x32, C = 16) takes 3.5 ms this way against 17 ms for 'shift', 53 ms
  for 'lax' and 12 ms in PyTorch (sections 5 and 9 there).

The 3x3 pools have shift forms too (`max_pool_3x3`, `avg_pool_3x3`), picked by the same `impl`.

On every backend, without an `impl`: the 1x1 conv as one 2-d matmul (`pointwise_conv`), the
training-mode BatchNorm with its own VJP (`batch_norm_train`, used by ops.BatchNorm), and a ReLU whose
derivative reads its output (`relu`). The last two, and the ReLU inside the 'shift_vjp' depthwise
kernel (`depthwise_conv(relu=True)`), decide what a training step keeps for its backward: one
activation per BatchNorm instead of two, and no ReLU input (a cell's output, a sum of ops) kept alive
for the ReLU's derivative. They took the retraining step's XLA buffers from 8.4 to 5.7 GB
(benchmarks/README.md section 14).

Layout everywhere: NHWC activations, HWIO kernels (depthwise: (k, k, 1, C)).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "lax", "shift", "shift_vjp")


def resolve_impl(impl: str = "auto") -> str:
    """'auto' -> 'shift_vjp' on CPU, 'lax' elsewhere; any other name must be one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise conv implementation {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "shift_vjp" if jax.default_backend() == "cpu" else "lax"
    return impl


def same_padding(kernel_size: int, dilation: int) -> int:
    """Padding that keeps the spatial size at stride 1 (odd kernels), as DARTS uses."""
    return dilation * (kernel_size - 1) // 2


def _depthwise_lax(x, kernel, stride, dilation, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


def _window_slices(xp, k: int, stride: int, dilation: int, h_out: int, w_out: int) -> list:
    """The k*k shifted views of a padded input that a k x k window reads, row-major over the window:
    view (i, j) holds xp[:, i*dilation + stride*a, j*dilation + stride*b, :] for a < h_out, b < w_out."""
    n, _, _, c = xp.shape
    return [jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                          (n, i * dilation + (h_out - 1) * stride + 1, j * dilation + (w_out - 1) * stride + 1, c),
                          (1, stride, stride, 1))
            for i in range(k) for j in range(k)]


def _spread_pad(a, value, k, dilation, padding, stride, h, w):
    """Pad an output-shaped array for a gather-form input gradient: spread it by the stride
    (interior `value`s) and pad it so that window i' of `_window_slices(..., k, 1, dilation, h, w)`
    holds, at input position m, the output that tap k-1-i' of a window reads m from (out of range:
    `value`). Negative pads crop the rows that a large `padding` puts beyond the input."""
    h_out, w_out = a.shape[1], a.shape[2]
    lo = (k - 1) * dilation - padding
    return jax.lax.pad(a, jnp.asarray(value, a.dtype),
                       ((0, 0, 0), (lo, h + padding - (h_out - 1) * stride - 1, stride - 1),
                        (lo, w + padding - (w_out - 1) * stride - 1, stride - 1), (0, 0, 0)))


def _pad(x, padding, value=0):
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=value)


def _taps_sum(xp, kernel, stride, dilation):
    """The depthwise conv of an already padded input: the sum of k*k shifted, per-channel-scaled views."""
    k, c = kernel.shape[0], kernel.shape[-1]
    h_out = (xp.shape[1] - dilation * (k - 1) - 1) // stride + 1
    w_out = (xp.shape[2] - dilation * (k - 1) - 1) // stride + 1
    taps = kernel.reshape(k * k, c)
    out = None
    for t, window in enumerate(_window_slices(xp, k, stride, dilation, h_out, w_out)):
        term = window * taps[t]
        out = term if out is None else out + term
    return out


def _depthwise_shift(x, kernel, stride, dilation, padding):
    return _taps_sum(_pad(x, padding), kernel, stride, dilation)


def _materialized(x):
    """x, computed into its own buffer before the k*k slices read it.

    XLA CPU fuses cheap elementwise producers into every consumer that reads them, so k*k slices of
    relu(sum of gated ops) would each recompute that sum (and a chain of shift convs multiplies it:
    25^depth); a 4-conv chain then compiles 3x slower and runs ~10x slower. `optimization_barrier`
    does not stop it (XLA CPU removes barriers before fusion), but XLA never duplicates an expensive
    op (a division) into a consumer that reads its elements more than once, so the division below
    ends the producer's fusion here. It is the identity for finite x (inf becomes nan: both are
    non-finite, which the search step reports anyway).
    """
    return x / (1 + 0 * x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _depthwise_shift_vjp(x, kernel, stride, dilation, padding, relu):
    return _shift_vjp_fwd(x, kernel, stride, dilation, padding, relu)[0]


def _shift_vjp_fwd(x, kernel, stride, dilation, padding, relu):
    # the padded input, made in one pass with x's producer, is what the taps and the kernel
    # gradient read: the backward needs no pad of its own
    xp = _materialized(_pad(jnp.maximum(x, 0) if relu else x, padding))
    # the kernel too: a masked kernel's mask (|w| > t_w, a select) would otherwise be fused into
    # the taps' loop and recomputed for every output element, which made a forward-only program's
    # 5x5 taps 3x slower than the same taps in a forward that keeps the kernel as a residual
    kernel = _materialized(kernel)
    return _taps_sum(xp, kernel, stride, dilation), (xp, kernel)


def _kernel_grad(xp, g, k, stride, dilation):
    """A depthwise conv's kernel gradient from its padded input, dk[i, j, c] = sum over n, h, w of
    window (i, j) * g, as one variadic reduction: a single loop that reads g and the k*k windows of
    xp together and sums k*k products per element (in float32), first over each image's pixels,
    then over the batch.

    XLA CPU runs the native form (the grouped convolution's filter gradient) as a dense C x C
    convolution plus transposes, C times the work; k*k separate reductions each reread g, and
    inside an edge's backward XLA copied their slices out first. This form is 3-8x faster than the
    native one at C 16-64 (benchmarks/README.md, section 9).
    """
    g32 = g.astype(jnp.float32)
    products = tuple(window.astype(jnp.float32) * g32
                     for window in _window_slices(xp, k, stride, dilation, g.shape[1], g.shape[2]))
    zero = jnp.zeros((), jnp.float32)
    per_image = jax.lax.reduce(products, (zero,) * len(products),
                               lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
    return jnp.stack(per_image).sum(axis=1).reshape(k, k, 1, xp.shape[-1])


def _shift_vjp_bwd(stride, dilation, padding, relu, residuals, g):
    xp, kernel = residuals
    g = _materialized(g)
    k = kernel.shape[0]
    h, w = xp.shape[1] - 2 * padding, xp.shape[2] - 2 * padding
    # Input gradient: dx[m] = sum_i g_dilated[m + p - i d] tap[i]: the stride-1 conv of the spread,
    # padded g (h x w out) with the flipped taps.
    dx = _taps_sum(_spread_pad(g, 0, k, dilation, padding, stride, h, w), kernel[::-1, ::-1], 1, dilation)
    if relu:
        # the ReLU's derivative from its output, which xp holds: its input is not needed
        inside = jax.lax.slice(xp, (0, padding, padding, 0), (xp.shape[0], padding + h, padding + w, xp.shape[3]))
        dx = jnp.where(inside > 0, dx, 0)
    dk = _kernel_grad(xp, g, k, stride, dilation).astype(kernel.dtype)
    # dx feeds the sum of every consumer's gradient of this state, read by several fusions (BN and
    # gate backward, other ops' taps): materialize it once instead of recomputing k*k taps in each.
    return _materialized(dx.astype(xp.dtype)), dk


_depthwise_shift_vjp.defvjp(_shift_vjp_fwd, _shift_vjp_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1,
                   padding: int | None = None, impl: str = "auto", relu: bool = False) -> jax.Array:
    """Depthwise 2-D convolution, of relu(x) with `relu`.

    Args:
      x: (N, H, W, C) input.
      kernel: (k, k, 1, C) per-channel filters.
      stride, dilation: spatial stride and dilation.
      padding: symmetric zero padding; default keeps the size at stride 1.
      impl: 'auto', 'lax' (native grouped convolution), 'shift' (sum of k*k shifted products) or
        'shift_vjp' (shift forward and input gradient, native kernel gradient); see the module doc.
      relu: convolve max(x, 0). With 'shift_vjp' the ReLU is part of the kernel, whose backward
        takes the ReLU's derivative from the padded ReLU output it saves anyway: x itself (a sum of
        ops, a cell's input) need not stay alive until the backward. The values and gradients are
        those of `depthwise_conv(jax.nn.relu(x), ...)`.
    Returns:
      (N, H_out, W_out, C).
    """
    k = kernel.shape[0]
    if padding is None:
        padding = same_padding(k, dilation)
    impl = resolve_impl(impl)
    if impl == "shift_vjp":
        return _depthwise_shift_vjp(x, kernel, stride, dilation, padding, relu)
    if relu:
        x = jax.nn.relu(x)
    if impl == "lax":
        return _depthwise_lax(x, kernel, stride, dilation, padding)
    return _depthwise_shift(x, kernel, stride, dilation, padding)


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0), computed into its own buffer, with its derivative taken from that output.

    For a ReLU before a matmul (a 1x1 conv), which saves the ReLU's output for its kernel gradient:
    jax.nn.relu's derivative reads the input, so its input (a cell's concatenated output) would stay
    alive until the backward too. The output is materialized (`_materialized`) so that XLA reads it
    in the backward instead of recomputing it from the input. Same values and derivatives as
    jax.nn.relu (y > 0 exactly where x > 0); an infinite input gives nan.
    """
    return _materialized(jnp.maximum(x, 0))


@relu.defjvp
def _relu_jvp(primals, tangents):
    y = relu(primals[0])
    return y, jnp.where(y > 0, tangents[0], jnp.zeros_like(tangents[0]))


def _pool_out(x, stride):
    n, h, w, c = x.shape
    return (h - 1) // stride + 1, (w - 1) // stride + 1   # 3x3 window, padding 1


def _max_pool_windows(x, stride):
    """The 9 views of x padded with -inf that a 3x3 (padding 1) max pool's windows read."""
    return _window_slices(_pad(_materialized(x), 1, -jnp.inf), 3, stride, 1, *_pool_out(x, stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_shift(x, stride):
    return functools.reduce(jnp.maximum, _max_pool_windows(x, stride))


def _max_pool_fwd(x, stride):
    # Each output's gradient goes to the first element of its window (row-major) that equals the
    # maximum: the rule of XLA's select-and-scatter (select = ge), so ties resolve as lax's do. The
    # forward keeps which tap that is (int8; 9: none, a NaN window) and a zero-size array for x's shape.
    windows = _max_pool_windows(x, stride)
    y = functools.reduce(jnp.maximum, windows)
    first = jnp.full(y.shape, 9, jnp.int8)
    for t, window in reversed(list(enumerate(windows))):
        first = jnp.where(window == y, jnp.int8(t), first)
    return y, (first, jnp.zeros((0,) + x.shape[1:], x.dtype))


def _max_pool_bwd(stride, residuals, g):
    # Gather form: each input element sums, over the 9 windows that contain it, the gradient of
    # those whose first maximum it is, reading padded copies of the winning taps and of g. The
    # scatter form (one pad per tap, the transpose of a slice) fused those pads into the sum of an
    # edge's input gradients: at C 16 that fusion took 12.8 ms, 1.7-3.3 ms with this form
    # (benchmarks/README.md, section 9).
    first, like_x = residuals
    h, w = like_x.shape[1:3]
    first_p = _spread_pad(first, 9, 3, 1, 1, stride, h, w)
    gp = _spread_pad(_materialized(g), 0, 3, 1, 1, stride, h, w)
    dx = None
    for t, (won, gw) in enumerate(zip(_window_slices(first_p, 3, 1, 1, h, w), _window_slices(gp, 3, 1, 1, h, w))):
        term = jnp.where(won == 8 - t, gw, jnp.zeros((), g.dtype))   # window t reads tap 8 - t
        dx = term if dx is None else dx + term
    return (_materialized(dx),)


_max_pool_shift.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3(x: jax.Array, stride: int = 1, impl: str = "auto") -> jax.Array:
    """3x3 max pool with padding 1 (NHWC), as PyTorch's MaxPool2d(3, stride, 1).

    impl 'lax' is `reduce_window` (its gradient XLA's select-and-scatter, which XLA CPU runs about 8x
    slower than the rest of a sep_conv_3x3's backward); 'shift' and 'shift_vjp' take the maximum of the
    9 shifted views, with a gradient that routes each output's cotangent to the first maximal element
    of its window, as select-and-scatter does. Same values and gradients, ties included
    (tests/test_kernels.py). 'auto': 'shift_vjp' on CPU, 'lax' elsewhere, as for `depthwise_conv`.
    """
    if resolve_impl(impl) == "lax":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                     ((0, 0), (1, 1), (1, 1), (0, 0)))
    return _max_pool_shift(x, stride)


def _window_counts(size: int, out: int, stride: int) -> np.ndarray:
    """How many of a 3x3 (padding 1) window's positions along one axis fall inside the input."""
    start = np.arange(out) * stride - 1
    return np.minimum(start + 3, size) - np.maximum(start, 0)


def avg_pool_3x3(x: jax.Array, stride: int = 1, impl: str = "auto") -> jax.Array:
    """3x3 average pool with padding 1, not counting the padding (PyTorch's AvgPool2d(3, stride, 1,
    count_include_pad=False), DARTS's avg_pool_3x3).

    impl 'lax' is `reduce_window` (Flax's `avg_pool`); the shift forms are a depthwise conv with
    all-one taps (so 'shift_vjp' gets its gather-form input gradient) times the constant reciprocal
    of each window's count. XLA CPU runs `reduce_window` and its transpose several times slower.
    """
    if resolve_impl(impl) == "lax":
        ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
        window = lambda a: jax.lax.reduce_window(a, np.zeros((), a.dtype), jax.lax.add, (1, 3, 3, 1),
                                                 (1, stride, stride, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
        return window(x) / window(ones)
    (h_out, w_out), (h, w) = _pool_out(x, stride), x.shape[1:3]
    count = np.outer(_window_counts(h, h_out, stride), _window_counts(w, w_out, stride))
    taps = jnp.ones((3, 3, 1, x.shape[-1]), x.dtype)
    y = depthwise_conv(x, taps, stride=stride, padding=1, impl=impl) * jnp.asarray(1.0 / count[None, :, :, None], x.dtype)
    # materialized: a backward that recomputes the forward (remat) reads the pool's output for its
    # gate's gradient; left to fusion, XLA recomputed it there from nine materialized window slices
    # (~6 of an edge's 59 ms; benchmarks/README.md, section 17)
    return _materialized(y)


def _subsample_pads(size: int, out: int, stride: int, offset: int) -> tuple:
    # lax.pad's (low, high, interior) that takes an `out`-long axis back to the input's `size`
    # positions offset, offset + stride, ...; a negative high pad drops the zero fill beyond the input
    return offset, size - offset - ((out - 1) * stride + 1), stride - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def subsample(x: jax.Array, stride: int, offset: int = 0) -> jax.Array:
    """x[:, offset::stride, offset::stride, :] with ceil(size / stride) pixels per axis, zeros where
    that reaches past the input (offset 1 on an odd size): what a strided 1x1 conv reads, and the
    shifted half of a FactorizedReduce (the input shifted by one pixel and zero-padded).

    Its gradient spreads the cotangent back by the stride into a buffer of its own. As autodiff
    leaves it (the transpose of a strided slice: a pad with interior padding), XLA fused that pad
    into the sum of an edge's input gradients, whose loop then tested every element for being
    padding: a stride-2 edge's sum took 23 ms instead of ~8 (benchmarks/README.md, section 17).
    """
    return _subsample_fwd(x, stride, offset)[0]


def _subsample_fwd(x, stride, offset):
    pads = [(0, 0, 0)]
    for size in x.shape[1:3]:
        out = (size - 1) // stride + 1
        low, high, _ = _subsample_pads(size, out, stride, offset)
        pads.append((-low, -high, 0))     # the inverse pads crop (or zero-fill) to (out - 1) * stride + 1
    full = jax.lax.pad(x, jnp.zeros((), x.dtype), pads + [(0, 0, 0)])
    y = jax.lax.slice(full, (0, 0, 0, 0), full.shape, (1, stride, stride, 1))
    return y, jnp.zeros((0,) + x.shape[1:], x.dtype)   # a zero-size array that carries x's shape


def _subsample_bwd(stride, offset, like_x, g):
    pads = [(0, 0, 0)] + [_subsample_pads(size, out, stride, offset)
                          for size, out in zip(like_x.shape[1:3], g.shape[1:3])] + [(0, 0, 0)]
    return (_materialized(jax.lax.pad(g, jnp.zeros((), g.dtype), pads)),)


subsample.defvjp(_subsample_fwd, _subsample_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution as a matmul over channels: x (N, H, W, Ci), kernel (1, 1, Ci, Co) -> (N, H, W, Co).

    Written as one (N*H*W, Ci) @ (Ci, Co) product, not as an einsum over n, h, w: autodiff of the
    einsum makes the kernel gradient a dot with three contracting dimensions, which XLA CPU feeds
    with a transposed copy of the cotangent (and of everything fused into it, such as a
    BatchNorm's backward); of a 2-d product, a dot with one contracting dimension, which its matmul
    library reads in place. At (96, 32, 32, 36) behind a ReLU and before a BatchNorm-like cotangent,
    fwd+bwd took 45.5 ms as an einsum and 15.3 ms as this (benchmarks/README.md, section 12).
    """
    ci, co = kernel.shape[-2], kernel.shape[-1]
    return (x.reshape(-1, ci) @ kernel.reshape(ci, co)).reshape(x.shape[:-1] + (co,))


def _channel_sum(a: jax.Array) -> jax.Array:
    """The sum of a over every axis but the last, in float32: a plain reduction, which XLA CPU emits
    as a vectorized loop. Two sums as one variadic `lax.reduce` ran 5x slower at (96, 32, 32, 36),
    its generic loop reading the channels strided."""
    return a.astype(jnp.float32).sum(tuple(range(a.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     fast_variance: bool = False) -> tuple:
    """Training-mode BatchNorm over every axis but the last: (y, batch mean, batch variance).

    y = (x - mean) * rsqrt(var + epsilon) * scale + bias, statistics in float32 and the output in
    the dtype of x, scale and bias promoted, as flax.linen.BatchNorm computes them. The variance is
    mean((x - mean)^2) (two passes over x), or with `fast_variance` flax's default one-pass
    max(0, E[x^2] - E[x]^2), which loses digits to cancellation: a data-parallel step, whose sums
    run in another order, then drifts ~1e-3 from the one-device step in three steps instead of ~1e-5
    (tests/test_multidevice.py). The values and gradients are those of autodiff of that formula
    (tests/test_kernels.py), in fewer whole-tensor passes: the backward takes two per-channel sums
    (of g and of g * (x - mean)) and then dx in one multiply-add per element with per-channel
    coefficients, which also carry the cotangents of the returned statistics (the running averages
    read them). A retraining step with it (one-pass) ran 1.2x as fast as with flax's
    (benchmarks/README.md, section 12).
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, fast_variance)[0]


def _batch_norm_stats(x32, fast_variance):
    n = x32.size // x32.shape[-1]
    mean = _channel_sum(x32) / n
    if not fast_variance:
        return mean, _channel_sum(jnp.square(x32 - mean)) / n
    return mean, jnp.maximum(0.0, _channel_sum(x32 * x32) / n - mean * mean)


def _batch_norm_fwd(x, scale, bias, epsilon, fast_variance):
    x32 = x.astype(jnp.float32)
    mean, var = _batch_norm_stats(x32, fast_variance)
    rstd = jax.lax.rsqrt(var + epsilon)
    a = rstd * scale.astype(jnp.float32)
    # The backward reads x - mean. Saved as x, XLA CSEs the backward's x - mean with the forward's
    # and then keeps both alive until the backward (the buffer the two-pass variance reads, and x
    # for the fusions that recompute it): two activations per BatchNorm. Saved as x - mean,
    # materialized (XLA does not duplicate a division into other fusions), it is the only one: x
    # dies in the forward. In float32 that is x's size; a narrower x is saved as it is, half of it.
    centred = x.dtype == jnp.float32
    xc = _materialized(x32 - mean) if centred else x32 - mean
    y = xc * a + bias.astype(jnp.float32)
    out = y.astype(jnp.result_type(x, scale, bias))
    return (out, mean, var), (xc if centred else x, mean, rstd, scale, bias)


def _batch_norm_bwd(epsilon, fast_variance, residuals, cotangents):
    saved, mean, rstd, scale, bias = residuals
    g, g_mean, g_var = cotangents
    n = saved.size // saved.shape[-1]
    g32 = g.astype(jnp.float32)
    # saved is x - mean when x is float32 (_batch_norm_fwd), else x
    centred = saved.dtype == jnp.float32
    xc = saved if centred else saved.astype(jnp.float32) - mean
    sum_g, sum_gxc = _channel_sum(g32), _channel_sum(g32 * xc)
    a = rstd * scale.astype(jnp.float32)
    # d/dx of (x - mean) * a with the batch's mean and rstd: a * (g - mean(g) - xhat * mean(g * xhat)),
    # xhat = (x - mean) * rstd; plus what the statistics' own cotangents (the running averages) add:
    # g_mean / n and g_var * 2 (x - mean) / n. All per channel but xc and g.
    coef_xc = (2 * g_var - a * rstd * rstd * sum_gxc) / n
    shift = (g_mean - a * sum_g) / n
    dx = (g32 * a + xc * coef_xc + shift).astype(jnp.float32 if centred else saved.dtype)
    return dx, (sum_gxc * rstd).astype(scale.dtype), sum_g.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
