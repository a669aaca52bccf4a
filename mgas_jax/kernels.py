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
  one loop fusion that reads its input once. The kernel gradient is k*k reductions over the whole
  batch in the shift form, which XLA CPU runs as one slice plus one reduction per tap (~5x slower
  than the native kernel-gradient convolution at C = 16-64), so it comes from the native
  convolution's own VJP. On the CPU of benchmarks/README.md, a depthwise 5x5 fwd+bwd (batch 32,
  32x32, C = 16) takes ~6 ms this way against ~25 ms for 'shift' and ~100 ms for 'lax'.

Layout everywhere: NHWC activations, HWIO kernels (depthwise: (k, k, 1, C)).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def _depthwise_shift(x, kernel, stride, dilation, padding):
    k = kernel.shape[0]
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    taps = kernel.reshape(k * k, c)
    out = None
    for t, window in enumerate(_window_slices(xp, k, stride, dilation, h_out, w_out)):
        term = window * taps[t]
        out = term if out is None else out + term
    return out


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shift_vjp(x, kernel, stride, dilation, padding):
    return _depthwise_shift(_materialized(x), kernel, stride, dilation, padding)


def _shift_vjp_fwd(x, kernel, stride, dilation, padding):
    x = _materialized(x)
    return _depthwise_shift(x, kernel, stride, dilation, padding), (x, kernel)


def _shift_vjp_bwd(stride, dilation, padding, residuals, g):
    x, kernel = residuals
    g = _materialized(g)
    k = kernel.shape[0]
    n, h, w, c = x.shape
    h_out, w_out = g.shape[1], g.shape[2]
    # Input gradient: dx[m] = sum_i g_dilated[m + p - i d] tap[i]. Spread g by the stride (interior
    # zeros), pad it so that slice i' starts at i' d, and correlate with the flipped taps. Negative
    # pads crop the rows that a large `padding` puts beyond the input.
    lo = (k - 1) * dilation - padding
    gp = jax.lax.pad(g, jnp.zeros((), g.dtype),
                     ((0, 0, 0), (lo, h + padding - (h_out - 1) * stride - 1, stride - 1),
                      (lo, w + padding - (w_out - 1) * stride - 1, stride - 1), (0, 0, 0)))
    flipped = kernel.reshape(k * k, c)[::-1]   # tap (k-1-i, k-1-j) for window (i, j)
    dx = None
    for t, window in enumerate(_window_slices(gp, k, 1, dilation, h, w)):
        term = window * flipped[t]
        dx = term if dx is None else dx + term
    # Kernel gradient: the native convolution's (one conv op; k*k separate reductions are slower).
    _, kernel_vjp = jax.vjp(lambda kr: _depthwise_lax(x, kr, stride, dilation, padding), kernel)
    (dk,) = kernel_vjp(g)
    # dx feeds the sum of every consumer's gradient of this state, read by several fusions (BN and
    # gate backward, other ops' taps): materialize it once instead of recomputing k*k taps in each.
    return _materialized(dx.astype(x.dtype)), dk.astype(kernel.dtype)


_depthwise_shift_vjp.defvjp(_shift_vjp_fwd, _shift_vjp_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1,
                   padding: int | None = None, impl: str = "auto") -> jax.Array:
    """Depthwise 2-D convolution.

    Args:
      x: (N, H, W, C) input.
      kernel: (k, k, 1, C) per-channel filters.
      stride, dilation: spatial stride and dilation.
      padding: symmetric zero padding; default keeps the size at stride 1.
      impl: 'auto', 'lax' (native grouped convolution), 'shift' (sum of k*k shifted products) or
        'shift_vjp' (shift forward and input gradient, native kernel gradient); see the module doc.
    Returns:
      (N, H_out, W_out, C).
    """
    k = kernel.shape[0]
    if padding is None:
        padding = same_padding(k, dilation)
    impl = resolve_impl(impl)
    if impl == "lax":
        return _depthwise_lax(x, kernel, stride, dilation, padding)
    if impl == "shift_vjp":
        return _depthwise_shift_vjp(x, kernel, stride, dilation, padding)
    return _depthwise_shift(x, kernel, stride, dilation, padding)


def _max_pool_out(x, stride):
    n, h, w, c = x.shape
    return (h - 1) // stride + 1, (w - 1) // stride + 1   # 3x3 window, padding 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_shift(x, stride):
    xp = jnp.pad(_materialized(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return functools.reduce(jnp.maximum, _window_slices(xp, 3, stride, 1, *_max_pool_out(x, stride)))


def _max_pool_fwd(x, stride):
    y = _max_pool_shift(x, stride)
    return y, (x, y)


def _max_pool_bwd(stride, residuals, g):
    # Each output's gradient goes to the first element of its window (row-major) that equals the
    # maximum: the rule of XLA's select-and-scatter (select = ge), so ties resolve as lax's do.
    x, y = residuals
    xp = jnp.pad(_materialized(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    windows, pull = jax.vjp(lambda a: _window_slices(a, 3, stride, 1, *_max_pool_out(x, stride)), xp)
    taken = jnp.zeros(y.shape, bool)
    routed = []
    for window in windows:
        first = (window == y) & ~taken
        taken = taken | first
        routed.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
    (dxp,) = pull(routed)
    return (_materialized(dxp[:, 1:-1, 1:-1, :]),)


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


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution as a matmul over channels: x (N, H, W, Ci), kernel (1, 1, Ci, Co) -> (N, H, W, Co)."""
    return jnp.einsum("nhwc,cd->nhwd", x, kernel.reshape(kernel.shape[-2], kernel.shape[-1]))
