"""The MGAS super-net: every cell with its own 14 x 7 op scores, filter scores, per-op thresholds.

Variables live in separate collections, which `init` returns as separate pytrees:

- `params`: network weights (conv kernels, BN affine of the stem and heads, classifier);
- `arch`: architecture parameters: per cell `alpha`, `t_op`, `t_k`, `t_w` (14 x 7 each) and `t_pre` (2,);
  per conv output and preprocess output a `beta` vector;
- `batch_stats`: BatchNorm running statistics;
- `masks`: committed 0/1 masks: one per `beta` (filters) and one per sep/dil conv kernel (weights).

Committed op masks are structural: a `SuperNetSpec` lists, per cell, the ops that are still present
(`CellSpec.ops`), and a committed-off op is simply not built (it costs nothing). Live masks are
recomputed in every forward pass from the scores and thresholds and ANDed with the committed ones.

Method reference: docs/method.md sections 1, 2 and 5 (stage heads).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgas_jax import gates, names, ops
from mgas_jax.genotype import CellSpec, OpSpec, num_edges

NUM_OPS = len(ops.OPS)


@dataclasses.dataclass(frozen=True)
class SuperNetSpec:
    """Static structure of a (sub-)super-net; hashable, so a new spec means a new compilation.

    Attributes:
      cells: the built cells (a stage's sub-net builds only the cells of stages <= s).
      num_classes: classifier outputs.
      stem_channels: stem output channels (3 C).
      head: 'classifier' (global pool + linear) or 'stage' (the auxiliary-style head of stages 1 and 2).
      impl: depthwise conv implementation ('auto', 'lax', 'shift').
      remat: rematerialise each cell in the backward pass (trades compute for memory).
      dtype: compute dtype (None: float32); parameters stay float32.
      filter_level, weight_level: search filters and weights too (False: those gates are off, e.g. the
        operation-level-only baseline, a DARTS-like sigmoid search).
    """
    cells: tuple
    num_classes: int
    stem_channels: int
    head: str = "classifier"
    impl: str = "auto"
    remat: bool = False
    dtype: Optional[str] = None
    filter_level: bool = True
    weight_level: bool = True


def full_cell(width: int, reduction: bool, steps: int = 4) -> CellSpec:
    """A cell of the unpruned super-net: all 7 ops on all edges, full widths."""
    cell_ops = tuple(OpSpec(node, src, op) for node in range(steps) for src in range(node + 2) for op in ops.OPS)
    return CellSpec(reduction=reduction, ops=cell_ops, width=width, steps=steps,
                    concat=tuple(range(2, steps + 2)))


def reduction_layers(layers: int) -> tuple[int, int]:
    return layers // 3, 2 * layers // 3


def full_cells(init_channels: int, layers: int, steps: int = 4) -> tuple:
    """All cells of the unpruned super-net (DARTS layout: width doubled at each reduction cell)."""
    width, cells = init_channels, []
    for i in range(layers):
        reduction = i in reduction_layers(layers)
        if reduction:
            width *= 2
        cells.append(full_cell(width, reduction, steps))
    return tuple(cells)


def active_matrix(cell: CellSpec) -> np.ndarray:
    """(E, 7) 0/1 committed op mask of a cell, from the ops it still has."""
    m = np.zeros((num_edges(cell.steps), NUM_OPS), np.float32)
    for o in cell.ops:
        m[o.edge, o.op_index] = 1.0
    return m


def conv_matrix(cell: CellSpec) -> np.ndarray:
    """(E, 7) 0/1: active ops that own filter and weight thresholds (sep/dil convs)."""
    m = np.zeros((num_edges(cell.steps), NUM_OPS), np.float32)
    for o in cell.ops:
        if o.op in ops.CONV_OPS:
            m[o.edge, o.op_index] = 1.0
    return m


op_name = names.op_name  # the evaluation network uses the same names, so masks carry over


def preprocess(cell: CellSpec, reduction_prev: bool, k: int, filter_level: bool, dtype: Optional[str],
               name: Optional[str] = None) -> ops.Preprocess:
    """The preprocess layer of a cell's input k (0: the cell two back, reduced after a reduction cell)."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    return ops.Preprocess(cell.width, reduction_prev and k == 0, (cell.pre0_index, cell.pre1_index)[k],
                          search=filter_level, affine=False, dtype=dtype, name=name)


class SuperCell(nn.Module):
    """One searchable cell with its own architecture parameters."""
    cell: CellSpec
    reduction_prev: bool
    impl: str = "auto"
    dtype: Optional[str] = None
    filter_level: bool = True
    weight_level: bool = True

    @nn.compact
    def __call__(self, s0, s1, train: bool):
        cell = self.cell
        shape = (num_edges(cell.steps), NUM_OPS)
        alpha = self.variable("arch", "alpha", jnp.zeros, shape, jnp.float32).value
        t_op = self.variable("arch", "t_op", jnp.zeros, shape, jnp.float32).value
        t_k = self.variable("arch", "t_k", jnp.zeros, shape, jnp.float32).value
        t_w = self.variable("arch", "t_w", jnp.zeros, shape, jnp.float32).value
        t_pre = self.variable("arch", "t_pre", jnp.zeros, (2,), jnp.float32).value
        # committed op mask: ops committed off inside a stage stay built (no recompilation) but gated
        # to 0; at stage ends and final-phase commits they leave the spec and are not built at all
        committed = self.variable("masks", names.OPS_MASK, lambda: jnp.asarray(active_matrix(cell))).value
        g, _ = gates.op_gate(alpha, t_op, committed * active_matrix(cell), gates.edge_nodes(cell.steps))
        fl = self.filter_level
        s0 = preprocess(cell, self.reduction_prev, 0, fl, self.dtype, name=names.PRE[0])(s0, train, t_pre[0])
        s1 = preprocess(cell, self.reduction_prev, 1, fl, self.dtype, name=names.PRE[1])(s1, train, t_pre[1])
        states = [s0, s1]
        for node in range(cell.steps):
            acc = None
            for o in cell.ops_into(node):
                stride = 2 if cell.reduction and o.src < 2 else 1
                y = _gated_op(o.op, o.mid, o.out_index, cell.width, stride, self.impl, self.dtype, fl, self.weight_level,
                              op_name(o), states[o.src], train, g[o.edge], t_k[o.edge], t_w[o.edge])
                acc = y if acc is None else acc + y
            if acc is None:
                raise ValueError(f"node {node} of a cell has no op; the protection rule should prevent this")
            states.append(acc)
        return jnp.concatenate([states[i] for i in cell.concat], axis=-1)


def _gated_op(op: str, mid, out_index, width: int, stride: int, impl: str, dtype: Optional[str], filter_level: bool,
              weight_level: bool, name: str, x, train: bool, g, t_k, t_w):
    # one op of an edge times its gate; g, t_k, t_w are the edge's rows. Called inside a compact
    # method (SuperCell's and SuperEdge's): the op's variables are the caller's, under `name`.
    k = ops.OPS.index(op)
    dtype = None if dtype is None else jnp.dtype(dtype)
    y = ops.Op(op, width, stride, mid=mid, out_index=out_index, search=filter_level, affine=False,
               pool_bn=False, masked=weight_level, impl=impl, dtype=dtype, name=name)(x, train, t_k[k], t_w[k])
    return y * g[k].astype(y.dtype)


class SuperEdge(nn.Module):
    """One edge of a SuperCell alone: the gated sum of its ops, for the per-edge step programs.

    Its variables are SuperCell's op subtrees, named by op (not `op_{node}_{src}_{op}`), so that
    every edge that computes the same thing is the same module. `g`, `t_k`, `t_w` are the cell's
    (E, 7) matrices and `e` the edge's row: the gradients come back as whole matrices.

    Attributes:
      ops: (op name, mid, out_index) of each op on the edge, in the cell's order.
    """
    ops: tuple
    width: int
    stride: int
    impl: str = "auto"
    dtype: Optional[str] = None
    filter_level: bool = True
    weight_level: bool = True

    @nn.compact
    def __call__(self, x, g, t_k, t_w, e, train: bool):
        acc = None
        for op, mid, out_index in self.ops:
            y = _gated_op(op, mid, out_index, self.width, self.stride, self.impl, self.dtype, self.filter_level,
                          self.weight_level, op, x, train, g[e], t_k[e], t_w[e])
            acc = y if acc is None else acc + y
        return acc


def stage_head_sizes(spatial: int) -> tuple[int, int]:
    """Pool size and final conv size of the stage heads (stride-3 average pool).

    The method's heads for 32x32 (pool 11 -> 8x8 -> conv 8x8) and 16x16 (pool 7 -> 4x4 -> conv 4x4)
    inputs both follow out = spatial // 4, pool = spatial - 3 (out - 1); the same rule serves any size.
    """
    out = max(1, spatial // 4)
    return spatial - 3 * (out - 1), out


class StageHead(nn.Module):
    """Head of stages 1 and 2: ReLU, AvgPool(stride 3), Conv1x1->128, BN, ReLU, Conv->256, BN, ReLU, Linear."""
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        pool, out = stage_head_sizes(x.shape[1])
        x = nn.relu(x)
        x = nn.avg_pool(x, (pool, pool), (3, 3))
        x = nn.Conv(128, (1, 1), use_bias=False, kernel_init=ops.conv_init, name="conv1")(x)
        x = nn.relu(ops.batch_norm(train, True, name="bn1")(x))
        x = nn.Conv(256, (out, out), padding="VALID", use_bias=False, kernel_init=ops.conv_init, name="conv2")(x)
        x = nn.relu(ops.batch_norm(train, True, name="bn2")(x))
        return nn.Dense(self.num_classes, name="linear")(x.reshape(x.shape[0], -1))


STEM_NAMES = ("stem", "stem_bn")   # the stem's variables, at the top of every collection


def _stem(x, channels: int, train: bool):
    # called inside a compact method: the variables are the caller's
    conv, bn = STEM_NAMES
    x = nn.Conv(channels, (3, 3), padding=1, use_bias=False, kernel_init=ops.conv_init, name=conv)(x)
    return ops.batch_norm(train, True, name=bn)(x)


def _head(x, spec: SuperNetSpec, train: bool):
    x = x.astype(jnp.float32)
    if spec.head == "stage":
        return StageHead(spec.num_classes, name=head_name(spec))(x, train)
    return nn.Dense(spec.num_classes, name=head_name(spec))(jnp.mean(x, axis=(1, 2)))


def head_name(spec: SuperNetSpec) -> str:
    """Variable name of the spec's head: 'classifier', or 'head_<cells>' for a stage head."""
    return f"head_{len(spec.cells)}" if spec.head == "stage" else "classifier"


def _cell_fields(spec: SuperNetSpec, i: int) -> tuple:
    reduction_prev = i > 0 and spec.cells[i - 1].reduction
    return spec.cells[i], reduction_prev, spec.impl, spec.dtype, spec.filter_level, spec.weight_level


def cell_module(spec: SuperNetSpec, i: int) -> SuperCell:
    """Cell i of the spec as a module of its own; its variables are SuperNet's `cell_{i}` subtrees."""
    return SuperCell(*_cell_fields(spec, i))


class SuperStem(nn.Module):
    """SuperNet's stem alone (variables 'stem', 'stem_bn', as in SuperNet): for per-cell programs."""
    channels: int

    @nn.compact
    def __call__(self, x, train: bool):
        return _stem(x, self.channels, train)


class SuperHead(nn.Module):
    """SuperNet's head alone (variables named by `head_name`): for per-cell programs."""
    spec: SuperNetSpec

    @nn.compact
    def __call__(self, x, train: bool):
        return _head(x, self.spec, train)


class SuperNet(nn.Module):
    """Stem, the spec's cells, and the head of the current stage. `__call__(x, train) -> logits`."""
    spec: SuperNetSpec

    @nn.compact
    def __call__(self, x, train: bool):
        spec = self.spec
        x = _stem(x, spec.stem_channels, train)
        cell_cls = nn.remat(SuperCell, static_argnums=(3,)) if spec.remat else SuperCell
        s0 = s1 = x
        for i in range(len(spec.cells)):
            s0, s1 = s1, cell_cls(*_cell_fields(spec, i), name=names.cell_name(i))(s0, s1, train)
        return _head(s1, spec, train)


def init_variables(spec: SuperNetSpec, key: jax.Array, input_shape: tuple) -> dict:
    """Variables of a super-net: dict with 'params', 'arch', 'batch_stats', 'masks'.

    Args:
      input_shape: (H, W, C) of one image.

    Runs op by op, not compiled: compiling the init of a whole super-net costs XLA as much as its
    forward pass (224 s for 8 cells at C 16 on the CPU of benchmarks/README.md, against 15 s op by op),
    and the values are the same (each parameter's key comes from its path, not from the computation).
    The forward that init runs uses the native depthwise convolution: its values are thrown away.
    """
    x = jnp.zeros((2,) + tuple(input_shape), jnp.float32)
    model = SuperNet(dataclasses.replace(spec, impl="lax", remat=False))
    variables = model.init(key, x, train=False)
    return {c: variables.get(c, {}) for c in ("params", "arch", "batch_stats", "masks")}
