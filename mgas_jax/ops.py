"""The candidate operations of the DARTS-like cell space, shared by the super-net and the evaluation network.

One Flax Linen module per op. The same module serves both networks:

- in the super-net (`search=True`) every pointwise-conv output carries filter scores `beta`
  (collection `arch`) and a committed filter mask (collection `masks`); conv kernels carry committed
  weight masks (collection `masks`), and the live gates come from the thresholds the cell passes in;
- in the evaluation network (`search=False`) there are no scores: the weight masks in `masks` are
  fixed, and the filter pruning is physical (fewer output channels).

Channel bookkeeping: an op writes `len(out_index)` channels into the node tensor of width C at the
channel positions `out_index` (None = all C). A sep_conv's inner width is `mid`. This lets a pruned op
compute only its surviving channels while node tensors keep their width, so removing committed-off
channels changes no output value (docs/method.md section 5, physical filter pruning).

Method reference: docs/method.md section 1 (ops) and 2 (gates).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgas_jax import gates, kernels, names

OPS = ("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
       "avg_pool_3x3", "max_pool_3x3")
"""The 7 MGAS candidate ops, in the column order of alpha (no `none` op)."""

DARTS_OPS = OPS + ("none",)
"""Op names a DARTS genotype may use (`none` appears in search spaces, never in derived cells)."""

CONV_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
BN_MOMENTUM = 0.9  # PyTorch's 0.1 in the other convention
BN_EPS = 1e-5

# PyTorch's default conv init (kaiming uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_op(name: str, allowed: Sequence[str] = OPS) -> str:
    if name not in allowed:
        raise ValueError(f"unknown op {name!r}; the allowed ops are {', '.join(allowed)}")
    return name


def kernel_size(name: str) -> int:
    """3 or 5 for conv ops, 3 for pools, 1 for skip."""
    if name in CONV_OPS or name.endswith("pool_3x3"):
        return int(name[-1])
    return 1


def scatter_channels(y: jax.Array, out_index: Optional[tuple], width: int) -> jax.Array:
    """Place y's channels at `out_index` of a zero tensor of `width` channels (None: y is full width).

    `out_index` is sorted and distinct (network._check_index). The values and gradients are those of
    `zeros.at[..., out_index].set(y)`, computed as two gathers (`_place_channels`).
    """
    if out_index is None or len(out_index) == width and tuple(out_index) == tuple(range(width)):
        return y
    return _place_channels(y, tuple(int(i) for i in out_index), int(width))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _place_channels(y: jax.Array, out_index: tuple, width: int) -> jax.Array:
    # A gather from y with one zero channel appended, not a scatter into zeros: XLA's CPU scatter is an
    # element loop (at (96, 32, 32, 27) -> 36 channels: forward 14x, forward and backward 3x slower
    # than these gathers). The backward below gathers the cotangent's kept channels, where autodiff of
    # this gather would be a scatter-add again.
    source = np.full(width, len(out_index), np.int32)
    source[list(out_index)] = np.arange(len(out_index), dtype=np.int32)
    padded = jnp.concatenate([y, jnp.zeros(y.shape[:-1] + (1,), y.dtype)], axis=-1)
    return jnp.take(padded, jnp.asarray(source), axis=-1)


def _place_channels_fwd(y, out_index, width):
    return _place_channels(y, out_index, width), None


def _place_channels_bwd(out_index, width, _, g):
    return (jnp.take(g, jnp.asarray(out_index, jnp.int32), axis=-1),)


_place_channels.defvjp(_place_channels_fwd, _place_channels_bwd)


class Conv(nn.Module):
    """A bias-free convolution with an optional committed weight mask and live weight threshold.

    Attributes:
      features: output channels (ignored for depthwise).
      kernel_size, stride, dilation: as in PyTorch; padding keeps the size at stride 1.
      depthwise: one filter per input channel.
      masked: the kernel has a 0/1 mask in collection `masks` (weight-level pruning).
      relu: convolve relu(x), with a ReLU whose backward does not read x (kernels.relu, or the
        depthwise kernel's own ReLU): the conv saves the ReLU's output anyway, and x, a cell's output
        or a sum of ops, then need not live until the backward.
    """
    features: int
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    depthwise: bool = False
    masked: bool = False
    impl: str = "auto"
    dtype: Optional[jnp.dtype] = None
    relu: bool = False

    @nn.compact
    def __call__(self, x, t_w=None):
        c_in = x.shape[-1]
        k = self.kernel_size
        shape = (k, k, 1, c_in) if self.depthwise else (k, k, c_in, self.features)
        kernel = self.param(names.KERNEL, conv_init, shape, jnp.float32)
        if self.masked:
            committed = self.variable("masks", names.KERNEL, jnp.ones, shape, jnp.float32).value
            mask = committed if t_w is None else gates.weight_mask(kernel, t_w, committed)
            kernel = kernel * mask
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.depthwise:
            return kernels.depthwise_conv(x, kernel, stride=self.stride, dilation=self.dilation, impl=self.impl,
                                          relu=self.relu)
        if k == 1:
            # a strided 1x1 conv reads every stride-th pixel: subsample, then one matmul. XLA CPU's
            # strided convolution made FactorizedReduce slower than PyTorch's (benchmarks/README.md
            # section 9); this form took a retraining step from 11-13 s to 9.2-9.5 s (section 12).
            # The ReLU after the subsampling: it then saves only the pixels the conv reads.
            x = kernels.subsample(x, self.stride) if self.stride > 1 else x
            return kernels.pointwise_conv(kernels.relu(x) if self.relu else x, kernel)
        if self.relu:
            x = kernels.relu(x)
        pad = kernels.same_padding(k, self.dilation)
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), [(pad, pad)] * 2, rhs_dilation=(self.dilation,) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nn.Module):
    """flax.linen.BatchNorm over every axis but the last: the same variables (params `scale`, `bias`;
    batch_stats `mean`, `var`), initial values, running-average rule and results, with the training
    forward and backward of `kernels.batch_norm_train` (fewer passes over the activations than
    autodiff of Flax's formula). Eval mode is Flax's formula as written there. The batch variance
    takes two passes (flax.linen.BatchNorm(use_fast_variance=False)) unless `use_fast_variance`.
    """
    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    use_scale: bool = True
    use_bias: bool = True
    use_fast_variance: bool = False   # two passes: see kernels.batch_norm_train

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        # absent affine parameters take x's dtype, so that (as in Flax) they do not promote the output
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32) if self.use_scale \
            else jnp.ones((c,), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32) if self.use_bias \
            else jnp.zeros((c,), x.dtype)
        if self.use_running_average:
            mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            return ((x - ra_mean.value) * mul + bias).astype(jnp.result_type(x, scale, bias))
        y, mean, var = kernels.batch_norm_train(x, scale, bias, self.epsilon, self.use_fast_variance)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def batch_norm(train: bool, affine: bool, name: Optional[str] = None) -> BatchNorm:
    return BatchNorm(use_running_average=not train, use_scale=affine, use_bias=affine, name=name)


class FilterGate(nn.Module):
    """Filter-level gate of one conv output: x * sigma(beta) * H(sigma(beta) - t) * committed.

    With `threshold=None` (FactorizedReduce) the gate is sigma(beta) * committed.
    """
    features: int

    @nn.compact
    def __call__(self, x, threshold=None):
        beta = self.variable("arch", names.BETA, jnp.zeros, (self.features,), jnp.float32).value
        committed = self.variable("masks", names.BETA, jnp.ones, (self.features,), jnp.float32).value
        if threshold is None:
            g = jax.nn.sigmoid(beta) * committed
        else:
            g = gates.filter_gate(beta, threshold, committed)
        return x * g.astype(x.dtype)


class ConvUnit(nn.Module):
    """ReLU - depthwise k x k - pointwise - BN [- filter gate]: one half of a sep_conv, or a dil_conv."""
    features: int
    kernel_size: int
    stride: int
    dilation: int
    search: bool
    affine: bool
    masked: bool
    impl: str = "auto"
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x, train: bool, t_k=None, t_w=None):
        x = Conv(0, self.kernel_size, self.stride, self.dilation, depthwise=True, masked=self.masked,
                 impl=self.impl, dtype=self.dtype, relu=True, name=names.DW)(x, t_w)
        x = Conv(self.features, 1, masked=self.masked, dtype=self.dtype, name=names.PW)(x, t_w)
        x = batch_norm(train, self.affine, name=names.BN)(x)
        if self.search:
            x = FilterGate(self.features, name=names.GATE)(x, t_k)
        return x


class SepConv(nn.Module):
    """sep_conv_k: two ConvUnits (the first carries the stride); inner width `mid`, output `out`."""
    mid: int
    out: int
    kernel_size: int
    stride: int
    search: bool
    affine: bool
    masked: bool = True
    impl: str = "auto"
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x, train: bool, t_k=None, t_w=None):
        kw = dict(search=self.search, affine=self.affine, masked=self.masked, impl=self.impl, dtype=self.dtype)
        x = ConvUnit(self.mid, self.kernel_size, self.stride, 1, name=names.SEP_UNITS[0], **kw)(x, train, t_k, t_w)
        return ConvUnit(self.out, self.kernel_size, 1, 1, name=names.SEP_UNITS[1], **kw)(x, train, t_k, t_w)


class DilConv(nn.Module):
    """dil_conv_k: one ConvUnit with dilation 2."""
    out: int
    kernel_size: int
    stride: int
    search: bool
    affine: bool
    masked: bool = True
    impl: str = "auto"
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x, train: bool, t_k=None, t_w=None):
        return ConvUnit(self.out, self.kernel_size, self.stride, 2, search=self.search, affine=self.affine,
                        masked=self.masked, impl=self.impl, dtype=self.dtype, name=names.DIL_UNIT)(x, train, t_k, t_w)


class FactorizedReduce(nn.Module):
    """ReLU, two 1x1 stride-2 convs (the second on the input shifted by one pixel), concat, BN.

    `n1` and `n2` are the channels of the two halves (C//2 and C - C//2 unpruned). In the super-net
    the output carries filter scores without threshold (docs/method.md section 2).
    """
    n1: int
    n2: int
    search: bool
    affine: bool
    gated: bool = True
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x, train: bool, threshold=None):
        # the second half reads the input shifted by one pixel, zero-padded so that both halves have
        # the same size for odd and even inputs; the convs take the ReLU (of the pixels they read:
        # relu(0) is the padding's 0)
        parts = []
        if self.n1:
            parts.append(Conv(self.n1, 1, dtype=self.dtype, relu=True, name=names.FR_CONVS[0])(
                kernels.subsample(x, 2)))
        if self.n2:
            parts.append(Conv(self.n2, 1, dtype=self.dtype, relu=True, name=names.FR_CONVS[1])(
                kernels.subsample(x, 2, 1)))
        y = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        y = batch_norm(train, self.affine, name=names.BN)(y)
        if self.search and self.gated:
            y = FilterGate(self.n1 + self.n2, name=names.GATE)(y, threshold)
        return y


def factorized_halves(out_index: Optional[tuple], width: int) -> tuple[int, int]:
    """Channels of each FactorizedReduce half that survive in `out_index` (first half: index < width//2)."""
    if out_index is None:
        return width // 2, width - width // 2
    n1 = sum(1 for i in out_index if i < width // 2)
    return n1, len(out_index) - n1


def pool(name: str, x: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
    """3x3 pools with padding 1; the average excludes the padding (count_include_pad=False).

    `impl` picks the pools' formulations (kernels.max_pool_3x3, kernels.avg_pool_3x3), as it does
    the depthwise conv's.
    """
    if name == "max_pool_3x3":
        return kernels.max_pool_3x3(x, stride, impl)
    return kernels.avg_pool_3x3(x, stride, impl)


class Op(nn.Module):
    """One candidate op on one edge, by name.

    Attributes:
      name_: op name (one of DARTS_OPS).
      width: channel width C of the cell's node tensors (the op's input and output width).
      stride: 2 on the edges from the cell inputs of a reduction cell, else 1.
      mid: inner width of sep_conv (default C).
      out_index: node channels this op writes (None: all C). Conv ops and FactorizedReduce compute
        only these channels.
      search: super-net mode (filter scores, live gates).
      pool_bn: a BatchNorm after pools (MGAS retraining network; DARTS's evaluation network has none).
      masked: conv kernels carry weight masks.
    """
    name_: str
    width: int
    stride: int = 1
    mid: Optional[int] = None
    out_index: Optional[tuple] = None
    search: bool = False
    affine: bool = True
    pool_bn: bool = False
    masked: bool = True
    impl: str = "auto"
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x, train: bool, t_k=None, t_w=None):
        name = check_op(self.name_, DARTS_OPS)
        n_out = self.width if self.out_index is None else len(self.out_index)
        if name == "none":
            y = jnp.zeros(x.shape[:1] + (x.shape[1] // self.stride, x.shape[2] // self.stride, self.width), x.dtype)
            return y
        if name == "skip_connect":
            if self.stride == 1:
                return x
            n1, n2 = factorized_halves(self.out_index, self.width)
            y = FactorizedReduce(n1, n2, self.search, self.affine, dtype=self.dtype, name=names.FR)(x, train)
            return scatter_channels(y, self.out_index, self.width)
        if name.endswith("pool_3x3"):
            y = pool(name, x, self.stride, self.impl)
            if self.pool_bn:
                y = batch_norm(train, self.affine, name=names.BN)(y)
            return y
        k = kernel_size(name)
        kw = dict(search=self.search, affine=self.affine, masked=self.masked, impl=self.impl, dtype=self.dtype)
        if name.startswith("sep_conv"):
            mid = self.width if self.mid is None else self.mid
            y = SepConv(mid, n_out, k, self.stride, name=names.SEP, **kw)(x, train, t_k, t_w)
        else:
            y = DilConv(n_out, k, self.stride, name=names.DIL, **kw)(x, train, t_k, t_w)
        return scatter_channels(y, self.out_index, self.width)


class Preprocess(nn.Module):
    """Cell input preprocessing: ReLU-Conv1x1-BN, or FactorizedReduce after a reduction cell.

    In the super-net its output carries filter scores with a threshold per layer (passed in).
    """
    width: int
    reduce: bool
    out_index: Optional[tuple] = None
    search: bool = False
    affine: bool = True
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x, train: bool, threshold=None):
        n_out = self.width if self.out_index is None else len(self.out_index)
        if self.reduce:
            n1, n2 = factorized_halves(self.out_index, self.width)
            y = FactorizedReduce(n1, n2, self.search, self.affine, gated=False, dtype=self.dtype, name=names.FR)(x, train)
        else:
            y = Conv(n_out, 1, dtype=self.dtype, relu=True, name=names.CONV)(x)
            y = batch_norm(train, self.affine, name=names.BN)(y)
        if self.search:
            y = FilterGate(n_out, name=names.GATE)(y, threshold)
        return scatter_channels(y, self.out_index, self.width)
