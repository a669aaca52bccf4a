"""Convolution formulations, chosen per backend.

XLA's CPU backend runs depthwise convolutions (feature_group_count = C) far slower than a plain
sum of shifted, per-channel-scaled copies of the input; GPUs and TPUs have fast native depthwise
kernels. `depthwise_conv` picks the formulation from the default backend unless told otherwise; both
give the same values and gradients (tests/test_kernels.py).

Layout everywhere: NHWC activations, HWIO kernels (depthwise: (k, k, 1, C)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "lax", "shift")


def resolve_impl(impl: str = "auto") -> str:
    """'auto' -> 'shift' on CPU, 'lax' elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise conv implementation {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "lax"
    return impl


def same_padding(kernel_size: int, dilation: int) -> int:
    """Padding that keeps the spatial size at stride 1 (odd kernels), as DARTS uses."""
    return dilation * (kernel_size - 1) // 2


def _depthwise_lax(x, kernel, stride, dilation, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


def _depthwise_shift(x, kernel, stride, dilation, padding):
    k = kernel.shape[0]
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    taps = kernel.reshape(k, k, c)
    out = None
    for i in range(k):
        for j in range(k):
            window = jax.lax.slice(
                xp, (0, i * dilation, j * dilation, 0),
                (n, i * dilation + (h_out - 1) * stride + 1, j * dilation + (w_out - 1) * stride + 1, c),
                (1, stride, stride, 1))
            term = window * taps[i, j]
            out = term if out is None else out + term
    return out


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1,
                   padding: int | None = None, impl: str = "auto") -> jax.Array:
    """Depthwise 2-D convolution.

    Args:
      x: (N, H, W, C) input.
      kernel: (k, k, 1, C) per-channel filters.
      stride, dilation: spatial stride and dilation.
      padding: symmetric zero padding; default keeps the size at stride 1.
      impl: 'auto', 'lax' (native grouped convolution) or 'shift' (sum of k*k shifted products).
    Returns:
      (N, H_out, W_out, C).
    """
    k = kernel.shape[0]
    if padding is None:
        padding = same_padding(k, dilation)
    if resolve_impl(impl) == "lax":
        return _depthwise_lax(x, kernel, stride, dilation, padding)
    return _depthwise_shift(x, kernel, stride, dilation, padding)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution as a matmul over channels: x (N, H, W, Ci), kernel (1, 1, Ci, Co) -> (N, H, W, Co)."""
    return jnp.einsum("nhwc,cd->nhwd", x, kernel.reshape(kernel.shape[-2], kernel.shape[-1]))
