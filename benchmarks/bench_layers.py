"""The retraining step's two most common layers alone, in the forms measured in benchmarks/README.md
section 12: the 1x1 convolution (`kernels.pointwise_conv`) and the BatchNorm (`ops.BatchNorm`).

    python benchmarks/bench_layers.py                       # (96, 32, 32, 36): the first cells at C 36
    python benchmarks/bench_layers.py --shape 32 16 16 72

- 1x1 conv, forward and backward behind a ReLU, with a cotangent made like a BatchNorm's backward
  (an elementwise function of several tensors): as an einsum over n, h, w (the form before section
  12) and as one 2-d matmul (now). Prints ms and whether XLA wrote a transposed copy
  (`copy_*fusion` in the compiled program).
- BatchNorm in training mode, forward and backward with the running statistics updated:
  flax.linen.BatchNorm against ops.BatchNorm (kernels.batch_norm_train), with one- and two-pass
  variance.

Each figure is the fastest of --repeats runs of one jit-compiled function.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_depthwise import min_time  # noqa: E402  (this directory is on the path of a script)


def best_ms(fn, *args, repeats: int) -> float:
    """Milliseconds of the fastest of `repeats` runs of fn(*args), after one warm-up run."""
    import jax
    return 1e3 * min_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=[96, 32, 32, 36], metavar=("N", "H", "W", "C"))
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from mgas_jax import kernels, modes, ops

    modes.keep_freed_host_memory()    # as a run sets it up
    shape, c = tuple(args.shape), args.shape[-1]
    x, g1, g2, h = (jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(0), 4))
    a = jax.random.normal(jax.random.key(1), (c,))
    w = jax.random.normal(jax.random.key(2), (1, 1, c, c))
    print(f"shape {shape}, float32, backend {jax.default_backend()}; ms, fastest of {args.repeats}")

    convs = {"einsum over n, h, w": lambda x, w: jnp.einsum("nhwc,cd->nhwd", x, w.reshape(c, c)),
             "2-d matmul (kernels.pointwise_conv)": kernels.pointwise_conv}
    for name, conv in convs.items():
        def loss(x, w, g1, g2, h, conv=conv):
            y = conv(jnp.maximum(x, 0), w)
            return jnp.sum((y - 1.0) * a * (g1 + g2) + h * y)
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        hlo = fn.lower(x, w, g1, g2, h).compile().as_text()
        copies = sum(" fusion(" in line and "copy" in line.split("=")[0] for line in hlo.splitlines())
        print(f"1x1 conv fwd+bwd, {name:36s} {best_ms(fn, x, w, g1, g2, h, repeats=args.repeats):7.1f}"
              f"   transposed copies: {copies}")

    bns = {"flax.linen.BatchNorm (one-pass variance)": nn.BatchNorm(False, momentum=0.9, epsilon=1e-5),
           "flax.linen.BatchNorm (two-pass variance)": nn.BatchNorm(False, momentum=0.9, epsilon=1e-5,
                                                                    use_fast_variance=False),
           "ops.BatchNorm (one-pass variance)": ops.BatchNorm(False, use_fast_variance=True),
           "ops.BatchNorm (two-pass, the default)": ops.BatchNorm(False)}
    for name, bn in bns.items():
        variables = bn.init(jax.random.key(3), x)

        def loss(x, params, bn=bn, variables=variables):
            y, new = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
            return jnp.sum(y * g1), new
        fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        print(f"BatchNorm fwd+bwd, {name:42s} {best_ms(fn, x, variables['params'], repeats=args.repeats):7.1f}")


if __name__ == "__main__":
    main()
