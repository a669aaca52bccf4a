"""Micro-benchmark: each candidate op and one whole edge of the super-net, forward + backward.

For each shape of the edges of the 8-cell super-net (`--shapes`: width C, input size, stride; by
default the normal cells at C 16/32/64 and the reduction cells' stride-2 edges) it times

- each of the 7 candidate ops in search mode (weight masks and filter gates live): `jax.grad` of
  sum(y * y) w.r.t. the op's parameters and its input, jit-compiled; and the same through the
  PyTorch reference's op (`make_op` of ../shared/bench/torch_reference.py), forward and backward;
- the edge's two programs as the per-edge search step runs them (`programs._edge_programs`, no
  remat): the forward with residuals, then the backward.

    python benchmarks/bench_ops.py                       # batch 32, the five edge shapes
    python benchmarks/bench_ops.py --shapes 16x32x1 --no-reference

Every time is the minimum over `--repeats` calls after one warm-up call (the least disturbed by
other jobs); `ratio` is PyTorch ms / ours (> 1: ours is faster). `impl` as in the search (`auto`).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_depthwise import min_time  # noqa: E402  (this directory is on the path of a script)
from mgas_jax import kernels, modes, names, ops, programs, supernet  # noqa: E402

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench")
# cell of supernet.full_cells(16, 8) whose first edge (node 0 from input 0) has each (C, stride)
CELL_OF = {(16, 1): 0, (32, 2): 2, (32, 1): 3, (64, 2): 5, (64, 1): 6}


def _min_ms(fn, repeats: int) -> float:
    return min_time(fn, repeats) * 1e3


def ours_op(name: str, c: int, stride: int, x, repeats: int) -> float:
    op = ops.Op(name, c, stride, search=True, affine=False, pool_bn=False, masked=True)
    variables = op.init(jax.random.key(0), x, False, 0.3, 0.3)

    def loss(params, x):
        y, _ = op.apply(dict(variables, params=params), x, True, 0.3, 0.3, mutable=["batch_stats"])
        return jnp.sum(y * y)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    params = variables.get("params", {})
    return _min_ms(lambda: jax.block_until_ready(grad(params, x)), repeats)


def reference_op(name: str, c: int, stride: int, x: np.ndarray, repeats: int) -> float:
    import torch
    from torch_reference import make_op
    torch.manual_seed(0)
    op = make_op(name, c, stride)
    xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)).copy(), requires_grad=True)
    takes_thresholds = name in ops.CONV_OPS

    def fwd_bwd():
        y = op(xt, torch.tensor(0.3), torch.tensor(0.3)) if takes_thresholds else op(xt)
        (y * y).sum().backward()
    return _min_ms(fwd_bwd, repeats)


def edge_programs(spec, variables, c: int, size: int, stride: int, x, repeats: int) -> tuple[float, float]:
    """(forward ms, backward ms) of the first edge of the super-net cell with this width and stride."""
    i = CELL_OF[(c, stride)]
    cell = spec.cells[i]
    edge_ops = [o for o in cell.ops_into(0) if o.src == 0]
    op_names = {o.op: names.op_name(o) for o in edge_ops}
    module = supernet.SuperEdge(tuple((o.op, o.mid, o.out_index) for o in edge_ops), c, stride, spec.impl,
                                None, True, True)
    forward, backward = programs._edge_programs(module, False)
    sub = lambda tree: programs._sub(tree[names.cell_name(i)], op_names)  # noqa: E731
    arch = variables["arch"][names.cell_name(i)]
    const = ({"batch_stats": sub(variables["batch_stats"]), "masks": sub(variables["masks"])}, edge_ops[0].edge)
    inputs = (sub(variables["params"]), sub(variables["arch"]), x, jax.nn.sigmoid(arch["alpha"]), arch["t_k"], arch["t_w"])
    y, residuals, _ = forward(const, *inputs)
    g = jnp.ones_like(y)
    fwd_ms = _min_ms(lambda: jax.block_until_ready(forward(const, *inputs)), repeats)
    bwd_ms = _min_ms(lambda: jax.block_until_ready(backward(residuals, g)), repeats)
    return fwd_ms, bwd_ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="16x32x1,32x16x1,64x8x1,32x32x2,64x16x2",
                   help="edge shapes CxSIZExSTRIDE (input width, input size, stride), comma-separated")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="time our side only")
    args = p.parse_args(argv)
    modes.keep_freed_host_memory()   # as the search runs (config.keep_freed_host_memory)
    reference = not args.no_reference
    if reference:
        import torch
        sys.path.insert(0, REFERENCE_DIR)
        print(f"torch {torch.__version__} threads={torch.get_num_threads()}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for c, _, stride in shapes:
        if (c, stride) not in CELL_OF:
            raise ValueError(f"no edge of the 8-cell super-net has width {c} and stride {stride}; "
                             f"choose from {sorted(CELL_OF)}")
    spec = supernet.SuperNetSpec(supernet.full_cells(16, 8), 10, 48)
    variables = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), (32, 32, 3))
    print(f"batch {args.batch}, fwd+bwd ms (min of {args.repeats}); backend {jax.default_backend()}, "
          f"impl auto = {kernels.resolve_impl('auto')}")
    print(f"{'C':>3} {'size':>4} {'stride':>6} {'op':>14} {'ours':>7}" + (f" {'torch':>7} {'ratio':>6}" if reference else ""))
    for c, size, stride in shapes:
        x_np = np.random.default_rng(1).normal(size=(args.batch, size, size, c)).astype(np.float32)
        x = jnp.asarray(x_np)
        total = ref_total = 0.0
        for name in ops.OPS:
            ours = ours_op(name, c, stride, x, args.repeats)
            total += ours
            line = f"{c:>3} {size:>4} {stride:>6} {name:>14} {ours:7.1f}"
            if reference:
                ref = reference_op(name, c, stride, x_np, args.repeats)
                ref_total += ref
                line += f" {ref:7.1f} {ref / ours:6.2f}"
            print(line, flush=True)
        line = f"{c:>3} {size:>4} {stride:>6} {'sum of ops':>14} {total:7.1f}"
        print(line + (f" {ref_total:7.1f} {ref_total / total:6.2f}" if reference else ""))
        fwd_ms, bwd_ms = edge_programs(spec, variables, c, size, stride, x, args.repeats)
        print(f"{c:>3} {size:>4} {stride:>6} {'edge programs':>14} {fwd_ms + bwd_ms:7.1f}   "
              f"(forward {fwd_ms:.1f} + backward {bwd_ms:.1f})", flush=True)


if __name__ == "__main__":
    main()
