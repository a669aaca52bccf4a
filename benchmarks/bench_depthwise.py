"""Micro-benchmark: one depthwise convolution, forward + backward, each formulation against PyTorch.

For every channel count it times `jax.vjp` of `kernels.depthwise_conv` (gradients w.r.t. the input
and the kernel) for each formulation of mgas_jax/kernels.py, jit-compiled, and the same computation in
PyTorch (`F.conv2d(groups=C)` forward, `backward`), on this machine's CPU. It also reports each
formulation's compile time for one conv and the compile and run time of a chain of `--chain` convs
(ReLU between them, fwd+bwd in one program; alone, and each followed by a 1x1 conv as in a sep_conv),
the case where XLA CPU fused each conv's producers into the next conv's k*k slices, and the kernel
gradient alone in its two forms (lax's filter-gradient convolution; shift_vjp's variadic reduction).

    python benchmarks/bench_depthwise.py                       # 5x5, batch 32, 32x32, C = 16 32 64
    python benchmarks/bench_depthwise.py --kernel 3 --dilation 2 --channels 16

Timings are the minimum over `--repeats` calls after one warm-up call (the minimum is the least
disturbed by other jobs on a shared machine); `ratio` is PyTorch ms / ours (> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mgas_jax import kernels  # noqa: E402

FORMULATIONS = tuple(i for i in kernels.IMPLS if i != "auto")


def min_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_case(impl: str, x, kernel, g, stride: int, dilation: int, repeats: int) -> tuple[float, float]:
    """(compile seconds, fwd+bwd seconds) of one depthwise conv."""
    def fwd_bwd(x, kernel):
        y, vjp = jax.vjp(lambda a, b: kernels.depthwise_conv(a, b, stride=stride, dilation=dilation, impl=impl),
                         x, kernel)
        return y, vjp(g)
    t0 = time.perf_counter()
    compiled = jax.jit(fwd_bwd).lower(x, kernel).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, min_time(lambda: jax.block_until_ready(compiled(x, kernel)), repeats)


def chain_compile(impl: str, x, kernel, dilation: int, length: int, pointwise: bool) -> tuple[float, float]:
    """(compile s, run ms) of `length` depthwise convs in a row, forward and backward.

    ReLU between them; with `pointwise`, each is followed by a 1x1 conv (a sep_conv's half: XLA
    materialises the 1x1 conv's output, so the chain's elementwise producers stop there).
    """
    c = x.shape[-1]
    def loss(x, dw, pw):
        for i in range(length):
            x = kernels.depthwise_conv(jax.nn.relu(x), dw[i], dilation=dilation, impl=impl)
            if pointwise:
                x = kernels.pointwise_conv(x, pw[i])
        return jnp.sum(x)
    dw = jnp.stack([kernel] * length)
    pw = jnp.stack([jnp.eye(c, dtype=x.dtype).reshape(1, 1, c, c) * 0.5] * length)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, dw, pw).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, min_time(lambda: jax.block_until_ready(compiled(x, dw, pw)), 3)


def kernel_grad_case(x, kernel, g, stride: int, dilation: int, repeats: int) -> tuple[float, float]:
    """(native s, variadic s): the kernel gradient alone, as lax's grouped convolution's VJP computes
    it (XLA CPU: a dense C x C convolution) and as 'shift_vjp' does (kernels._kernel_grad)."""
    k = kernel.shape[0]
    pad = kernels.same_padding(k, dilation)
    native = jax.jit(lambda x, g: jax.vjp(lambda kr: kernels._depthwise_lax(x, kr, stride, dilation, pad),
                                          kernel)[1](g)[0])
    variadic = jax.jit(lambda x, g: kernels._kernel_grad(kernels._pad(x, pad), g, k, stride, dilation))
    return tuple(min_time(lambda f=f: jax.block_until_ready(f(x, g)), repeats) for f in (native, variadic))


def torch_case(batch, size, channels, k, stride, dilation, repeats) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    w = torch.randn(channels, 1, k, k, requires_grad=True)
    pad = kernels.same_padding(k, dilation)
    y0 = F.conv2d(x, w, None, stride, pad, dilation, channels)
    g = torch.randn_like(y0)

    def step():
        x.grad = w.grad = None
        F.conv2d(x, w, None, stride, pad, dilation, channels).backward(g)
    return min_time(step, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chain", type=int, default=10, help="length of the conv chain whose compile time is timed (0: skip)")
    p.add_argument("--impls", nargs="+", default=list(FORMULATIONS), choices=FORMULATIONS)
    a = p.parse_args()
    try:
        import torch
        torch_info = f"torch {torch.__version__} threads={torch.get_num_threads()}"
    except ImportError:
        torch_info = "torch not installed (pip install -e .[bench])"
    print(f"depthwise {a.kernel}x{a.kernel} stride {a.stride} dilation {a.dilation}, batch {a.batch}, "
          f"{a.image}x{a.image}, fwd+bwd; backend {jax.default_backend()}, auto = {kernels.resolve_impl('auto')}; "
          f"{torch_info}")
    print(f"{'C':>4} {'impl':>10} {'compile_s':>9} {'ms':>8} {'torch_ms':>8} {'ratio':>6}")
    rng = np.random.default_rng(0)
    cases = {}
    for c in a.channels:
        x = jnp.asarray(rng.normal(size=(a.batch, a.image, a.image, c)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(a.kernel, a.kernel, 1, c)), jnp.float32)
        out = jax.eval_shape(lambda x, k: kernels.depthwise_conv(x, k, stride=a.stride, dilation=a.dilation,
                                                                 impl="lax"), x, kernel)
        g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
        cases[c] = x, kernel, g
        t_torch = torch_case(a.batch, a.image, c, a.kernel, a.stride, a.dilation, a.repeats)
        for impl in a.impls:
            compile_s, t = jax_case(impl, x, kernel, g, a.stride, a.dilation, a.repeats)
            ratio = f"{t_torch / t:6.2f}" if t_torch else "     -"
            torch_ms = f"{t_torch * 1e3:8.1f}" if t_torch else "       -"
            print(f"{c:>4} {impl:>10} {compile_s:9.2f} {t * 1e3:8.1f} {torch_ms} {ratio}", flush=True)
    print("kernel gradient alone, ms: native (lax's filter-gradient convolution) against one variadic "
          "reduction (shift_vjp's)")
    print(f"{'C':>4} {'native':>8} {'variadic':>8} {'ratio':>6}")
    for c, (x, kernel, g) in cases.items():
        native, variadic = kernel_grad_case(x, kernel, g, a.stride, a.dilation, a.repeats)
        print(f"{c:>4} {native * 1e3:8.2f} {variadic * 1e3:8.2f} {native / variadic:6.2f}", flush=True)
    if a.chain:
        c = a.channels[0]
        x = jnp.asarray(rng.normal(size=(a.batch, a.image, a.image, c)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(a.kernel, a.kernel, 1, c)) / a.kernel, jnp.float32)
        print(f"chain of {a.chain} convs (C={c}, stride 1), fwd+bwd in one program:")
        print(f"{'chain':>16} {'impl':>10} {'compile_s':>9} {'ms':>8}")
        for pointwise in (False, True):
            name = "depthwise+1x1" if pointwise else "depthwise only"
            for impl in a.impls:
                compile_s, t = chain_compile(impl, x, kernel, a.dilation, a.chain, pointwise)
                print(f"{name:>16} {impl:>10} {compile_s:9.2f} {t * 1e3:8.1f}", flush=True)


if __name__ == "__main__":
    main()
