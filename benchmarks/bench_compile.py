"""Where the XLA compile time of a search step goes, and one idea that does not cut it.

Part 1 compiles pieces of the one-level search step of a full super-net (`search_step.make_loss`, its
gradient, and the update of `search_step.make_step`, each compiled alone): the forward pass, the forward and backward
pass (`jax.grad`), the optimizer update (`search_step.make_optimizer`, every group, plus the finite check),
and the whole step. For each: compile seconds and the number of fusions in the compiled program (each
fusion is a kernel the backend generates code for).

Part 2 asks whether compiling fewer, larger kernels helps: the two sep_convs (3x3 and 5x5) of every
edge of one cell, forward and backward, written per edge (14 x 2 sep_convs, as the super-net does) and
batched over the edges into each node (`jax.vmap` over stacked parameters and inputs: 4 x 2 sep_convs
of 2-5 edges each), same values; compile seconds and ms per fwd+bwd.

    python benchmarks/bench_compile.py                      # 1 cell, batch 8, C 8, 16x16
    python benchmarks/bench_compile.py --layers 2 --batch 32

XLA's per-pass and backend timings for the same program (HLO passes against LLVM code generation):

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=cpu_compiler=1 python benchmarks/bench_compile.py 2>&1 \\
        | grep "jit_step\\]"
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_search_step import CIFAR_MEAN, CIFAR_STD, OPTIMIZER  # noqa: E402
from mgas_jax import kernels, losses, search_step, supernet  # noqa: E402


def _compile(fn, *args):
    """(compiled, seconds, fusions) of jit(fn) at args; fn may already be jitted."""
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    fusions = len(re.findall(r"^\s*\S+ = \S+ fusion\(", compiled.as_text(), re.M))
    return compiled, seconds, fusions


def step_pieces(args) -> None:
    spec = supernet.SuperNetSpec(supernet.full_cells(args.channels, args.layers), args.classes, 3 * args.channels)
    tx = search_step.make_optimizer(types.SimpleNamespace(**OPTIMIZER))
    key = jax.random.key(0, impl="rbg")
    v = supernet.init_variables(spec, key, (args.image, args.image, 3))
    trainable = {"params": v["params"], "arch": v["arch"]}
    state = search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                    batch_stats=v["batch_stats"], masks=v["masks"], opt_state=tx.init(trainable))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.image, args.image, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.classes, (args.batch,)), jnp.int32)
    loss_fn = search_step.make_loss(spec)   # the step's own loss

    def forward(state, images, labels):
        return loss_fn({"params": state.params, "arch": state.arch}, state.batch_stats, state.masks, images,
                       labels, 1e-5)

    def backward(state, images, labels):
        return jax.grad(loss_fn, has_aux=True)({"params": state.params, "arch": state.arch}, state.batch_stats,
                                               state.masks, images, labels, 1e-5)

    def update(state, grads):
        trainable = {"params": state.params, "arch": state.arch}
        updates, opt_state = tx.update(grads, state.opt_state, trainable, scales=search_step.GroupScales())
        return optax.apply_updates(trainable, updates), opt_state, losses.all_finite(grads)

    data_cfg = ml_collections.ConfigDict(dict(crop_padding=0, flip=False, cutout=0, autoaugment=False))
    step = search_step.make_step(spec, tx, data_cfg, jnp.asarray(CIFAR_MEAN), jnp.asarray(CIFAR_STD))
    batch = {"image": jnp.zeros((args.batch, args.image, args.image, 3), jnp.uint8), "label": labels}
    grads = {"params": state.params, "arch": state.arch}
    print(f"part 1: pieces of the search step; {args.layers} cells, batch {args.batch}, C {args.channels}, "
          f"{args.image}x{args.image}, impl {kernels.resolve_impl('auto')}")
    print(f"{'piece':>22} {'compile_s':>9} {'fusions':>8}")
    for name, fn, fn_args in (("forward", forward, (state, images, labels)),
                              ("forward + backward", backward, (state, images, labels)),
                              ("optimizer update", update, (state, grads))):
        _, seconds, fusions = _compile(fn, *fn_args)
        print(f"{name:>22} {seconds:9.1f} {fusions:8d}", flush=True)
    _, seconds, fusions = _compile(step, state, batch, key, jnp.float32(1e-5), search_step.GroupScales().asarrays())
    print(f"{'whole step':>22} {seconds:9.1f} {fusions:8d}", flush=True)


# ------------------------------------------------------------------------------------------------
# Part 2: per-edge against edge-batched sep_convs

def _unit(p, x):
    x = kernels.depthwise_conv(jax.nn.relu(x), p["dw"])
    x = kernels.pointwise_conv(x, p["pw"])
    mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5)


def _sep(p, x):
    return _unit(p["u2"], _unit(p["u1"], x))


def edge_batching(args) -> None:
    c, steps = args.channels, 4
    edges = [(n, s) for n in range(steps) for s in range(n + 2)]
    rng = np.random.default_rng(0)

    def sep_params(k):
        return {u: {"dw": jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32),
                    "pw": jnp.asarray(rng.normal(size=(1, 1, c, c)) / np.sqrt(c), jnp.float32)} for u in ("u1", "u2")}

    params = {f"{n}_{s}": {k: sep_params(int(k)) for k in ("3", "5")} for n, s in edges}
    x0 = jnp.asarray(rng.normal(size=(args.batch, args.image, args.image, c)), jnp.float32)

    def per_edge(params, x0):
        states = [x0, 0.5 * x0]
        for n in range(steps):
            states.append(sum(_sep(params[f"{n}_{s}"][k], states[s]) for s in range(n + 2) for k in ("3", "5")))
        return jnp.sum(jnp.concatenate(states[2:], -1) ** 2)

    def batched(params, x0):
        states = [x0, 0.5 * x0]
        for n in range(steps):
            xs = jnp.stack(states[:n + 2])
            acc = 0.0
            for k in ("3", "5"):
                p = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[f"{n}_{s}"][k] for s in range(n + 2)])
                acc = acc + jnp.sum(jax.vmap(_sep)(p, xs), axis=0)
            states.append(acc)
        return jnp.sum(jnp.concatenate(states[2:], -1) ** 2)

    print(f"part 2: the 28 sep_convs of one normal cell, fwd+bwd; batch {args.batch}, C {c}, {args.image}x{args.image}")
    print(f"{'formulation':>22} {'compile_s':>9} {'fusions':>8} {'ms':>8}")
    results = {}
    for name, fn in (("per edge (14 x 2)", per_edge), ("batched per node (4 x 2)", batched)):
        compiled, seconds, fusions = _compile(jax.grad(fn), params, x0)
        jax.block_until_ready(compiled(params, x0))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            results[name] = jax.block_until_ready(compiled(params, x0))
            times.append(time.perf_counter() - t0)
        print(f"{name:>22} {seconds:9.1f} {fusions:8d} {min(times) * 1e3:8.1f}", flush=True)
    a, b = results.values()
    diff = max(float(jnp.max(jnp.abs(u - v) / (jnp.abs(u) + 1))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(f"largest relative gradient difference between the two: {diff:.1e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--image", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    step_pieces(args)
    edge_batching(args)


if __name__ == "__main__":
    main()
