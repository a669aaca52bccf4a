"""The evaluation network: a DARTS-style network built from a tuple of CellSpec (Flax Linen).

One module serves DARTS genotypes (two full-width ops per node, `pool_bn=False`: the same network as
DARTS's `NetworkCIFAR` / `NetworkImageNet`) and MGAS-derived cells (any number of ops per edge, per-op
channel counts, fixed weight masks, BN after pools; docs/method.md section 6).

    cells = genotype.genotype_to_cells("DARTS_V2", layers=20, init_channels=36)
    spec = NetworkSpec(cells, num_classes=10, stem_channels=108, auxiliary=True)
    variables = init_network(spec, jax.random.key(0), (1, 32, 32, 3))
    logits, aux = Network(spec).apply(variables, x, train=True, drop_path_rate=0.2,
                                      rngs={"dropout": key}, mutable=["batch_stats"])[0]

Variable names (stable; exported weight masks from the search are matched by them; `names.py` owns them):

    stem/conv0, stem/bn0                      CIFAR stem (ImageNet: stem0/{conv0,bn0,conv1,bn1}, stem1/{conv0,bn0})
    cell_{i}/pre0, cell_{i}/pre1              ops.Preprocess (conv+bn, or fr/{conv1,conv2,bn})
    cell_{i}/op_{node}_{src}_{opname}         ops.Op (e.g. sep/unit1/dw/kernel, dil/unit/pw/kernel, fr/conv1/kernel)
    aux_head/{conv1,bn1,conv2,bn2,classifier} auxiliary head (after cell `aux_cell`)
    classifier                                the final linear layer

Collections: `params`, `batch_stats`, and with `masked=True` the fixed 0/1 weight masks of the sep/dil
conv kernels in `masks` (same paths as their kernels). Drop-path draws from the rng stream `dropout`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgas_jax import kernels, names
from mgas_jax import ops as ops_lib
from mgas_jax.genotype import CellSpec, Genotype, genotype_to_cells, get_genotype

AUX_MID = 128  # channels of the auxiliary head's 1x1 conv (DARTS)
AUX_OUT = 768  # channels of its second conv


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything that fixes the structure of an evaluation network (hashable: a static attribute).

    Attributes:
      cells: the cells, in order (tuple of CellSpec). Reduction cells use their own `width`.
      num_classes: classifier outputs.
      stem_channels: stem output channels (DARTS CIFAR: 3 * C; ImageNet stem: C).
      auxiliary: build DARTS's auxiliary head after cell `aux_cell` (its logits only in training).
      aux_cell: index of the cell the auxiliary head reads; default 2 * len(cells) // 3 (DARTS).
      pool_bn: BatchNorm after pools (MGAS retraining network); False = DARTS's evaluation network.
      masked: sep/dil conv kernels carry fixed 0/1 weight masks in the `masks` collection.
      imagenet_stem: DARTS's ImageNet stems (three stride-2 3x3 convs, for 224 x 224 inputs) and its
        ImageNet auxiliary head; the first cell then sees a "reduction" before it (FactorizedReduce).
      dtype: computation dtype of the convs (None: the input's); parameters stay float32.
      impl: depthwise conv formulation (kernels.IMPLS).
    """
    cells: tuple
    num_classes: int
    stem_channels: int
    auxiliary: bool = False
    aux_cell: Optional[int] = None
    pool_bn: bool = False
    masked: bool = False
    imagenet_stem: bool = False
    dtype: Optional[Any] = None
    impl: str = "auto"

    def __post_init__(self):
        cells = tuple(self.cells) if isinstance(self.cells, (list, tuple)) else self.cells
        if not isinstance(cells, tuple) or not cells or not all(isinstance(c, CellSpec) for c in cells):
            raise ValueError("NetworkSpec.cells must be a non-empty tuple of CellSpec "
                             "(genotype.genotype_to_cells or genotype.cells_from_json make them)")
        object.__setattr__(self, "cells", cells)
        for name in ("num_classes", "stem_channels"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"NetworkSpec.{name} must be a positive int, got {value!r}")
        if self.imagenet_stem and self.stem_channels < 2:
            raise ValueError(f"the ImageNet stem needs stem_channels >= 2 (its first conv has stem_channels // 2), "
                             f"got {self.stem_channels}")
        if self.aux_cell is None:
            object.__setattr__(self, "aux_cell", 2 * len(cells) // 3)
        if self.auxiliary and not (type(self.aux_cell) is int and 0 <= self.aux_cell < len(cells)):
            raise ValueError(f"NetworkSpec.aux_cell must be a cell index 0..{len(cells) - 1}, got {self.aux_cell!r}")
        if self.impl not in kernels.IMPLS:
            raise ValueError(f"unknown depthwise conv implementation {self.impl!r}; choose one of {kernels.IMPLS}")
        for i, cell in enumerate(cells):
            _check_cell(cell, f"cells[{i}]")


def _check_index(index: Optional[tuple], width: int, where: str) -> None:
    if index is None:
        return
    if not index or list(index) != sorted(set(index)) or index[0] < 0 or index[-1] >= width:
        raise ValueError(f"{where} = {index!r} must be a non-empty sorted tuple of distinct channels in "
                         f"0..{width - 1} (or None for all)")


def _check_cell(cell: CellSpec, where: str) -> None:
    """Structural checks the network relies on, each with what is wrong and what is allowed."""
    if type(cell.width) is not int or cell.width < 1:
        raise ValueError(f"{where}.width must be a positive int, got {cell.width!r}")
    _check_index(cell.pre0_index, cell.width, f"{where}.pre0_index")
    _check_index(cell.pre1_index, cell.width, f"{where}.pre1_index")
    seen = set()
    for k, o in enumerate(cell.ops):
        at = f"{where}.ops[{k}] ({o.op} {o.src}->{o.node})"
        ops_lib.check_op(o.op, ops_lib.DARTS_OPS)
        if not 0 <= o.node < cell.steps:
            raise ValueError(f"{at}: node must be in 0..{cell.steps - 1}")
        if not 0 <= o.src <= o.node + 1:
            raise ValueError(f"{at}: node {o.node} may read states 0..{o.node + 1}, not {o.src}")
        key = (o.node, o.src, o.op)
        if key in seen:
            raise ValueError(f"{at}: the same op appears twice on one edge; {names.op_name(o)} must be unique")
        seen.add(key)
        if o.mid is not None and (type(o.mid) is not int or o.mid < 1):
            raise ValueError(f"{at}: mid must be a positive int or None, got {o.mid!r}")
        _check_index(o.out_index, cell.width, f"{at}.out_index")
    lowest = 2 if cell.reduction else 0  # a reduction cell's inputs have twice the nodes' resolution
    for s in cell.concat:
        if not lowest <= s <= cell.steps + 1:
            raise ValueError(f"{where}.concat = {cell.concat!r}: states must be in {lowest}..{cell.steps + 1}")


def _drop_path(module: nn.Module, x: jax.Array, rate) -> jax.Array:
    """DARTS's drop-path: zero whole examples with probability `rate`, scale the rest by 1 / keep."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def _torch_bias_init(fan_in: int):
    """PyTorch's Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _linear(features: int, fan_in: int, name: str) -> nn.Dense:
    # PyTorch's default Linear init (as DARTS trains): kernel and bias U(+-1/sqrt(fan_in)).
    return nn.Dense(features, kernel_init=ops_lib.conv_init, bias_init=_torch_bias_init(fan_in), name=name)


def _down(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Output size of the 'same'-padded convs and pools of the cell at `stride` (ceil(h / stride))."""
    return tuple((s - 1) // stride + 1 for s in hw)


class Stem(nn.Module):
    """[ReLU] Conv3x3 - BN, repeated for each entry of `features` (ReLU between them); bias-free convs."""
    features: tuple
    stride: int = 1
    relu_first: bool = False
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x, train: bool):
        for k, f in enumerate(self.features):
            if k or self.relu_first:
                x = nn.relu(x)
            x = ops_lib.Conv(f, 3, self.stride, dtype=self.dtype, name=f"conv{k}")(x)
            x = ops_lib.batch_norm(train, True, name=f"bn{k}")(x)
        return x


class Cell(nn.Module):
    """One cell of the evaluation network (DARTS `Cell`, generalised to CellSpec).

    Attributes:
      cell: its description.
      reduction_prev: the previous cell was a reduction, so input 0 has twice the resolution and is
        reduced by a FactorizedReduce.
    """
    cell: CellSpec
    reduction_prev: bool
    pool_bn: bool = False
    masked: bool = False
    impl: str = "auto"
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, s0, s1, train: bool, drop_path_rate=0.0):
        c = self.cell
        s0 = ops_lib.Preprocess(c.width, self.reduction_prev, out_index=c.pre0_index, search=False,
                                dtype=self.dtype, name=names.PRE[0])(s0, train)
        s1 = ops_lib.Preprocess(c.width, False, out_index=c.pre1_index, search=False,
                                dtype=self.dtype, name=names.PRE[1])(s1, train)
        # A traced rate (a schedule inside jit) always applies the mask; a Python 0 skips it.
        use_drop_path = train and not (isinstance(drop_path_rate, (int, float)) and drop_path_rate <= 0)
        states = [s0, s1]
        for node in range(c.steps):
            total = None
            for o in c.ops_into(node):
                if o.op == "none":  # adds exactly zero (and ops.Op's zeros are floor-sized on odd inputs)
                    continue
                stride = 2 if c.reduction and o.src < 2 else 1
                y = ops_lib.Op(o.op, c.width, stride, mid=o.mid, out_index=o.out_index, search=False, affine=True,
                               pool_bn=self.pool_bn, masked=self.masked, impl=self.impl, dtype=self.dtype,
                               name=names.op_name(o))(states[o.src], train)
                # DARTS drops every op output except the identity's (stride-1 skip_connect)
                if use_drop_path and not (o.op == "skip_connect" and stride == 1):
                    y = _drop_path(self, y, drop_path_rate)
                total = y if total is None else total + y
            if total is None:  # a node no op (or only `none`) feeds is zero
                h, w = _down(s1.shape[1:3], 2 if c.reduction else 1)
                total = jnp.zeros((s1.shape[0], h, w, c.width), s1.dtype)
            states.append(total)
        return jnp.concatenate([states[i] for i in c.concat], axis=-1)


def aux_geometry(size: int, imagenet: bool = False) -> tuple[int, int, int]:
    """(pool window, pool stride, conv kernel) of the auxiliary head along one spatial axis.

    DARTS pools 5 x 5 with stride 3 (ImageNet: stride 2) and then applies a 2 x 2 conv, which assumes an
    8 x 8 input (ImageNet: 7 x 7) and ends at 1 x 1. Here the conv kernel is the pooled size, so any input
    at least that large ends at 1 x 1 too (8 x 8: exactly DARTS). Inputs too small for a pooled size of
    2 or more (the 8 x 8 digits give a 2 x 2 map) pool with window size - 1 and stride 1 down to 2 x 2
    and keep the 2 x 2 conv; a 1 x 1 map skips the pool and uses a 1 x 1 conv.
    """
    stride = 2 if imagenet else 3
    pooled = (size - 5) // stride + 1 if size >= 5 else 0
    if pooled >= 2:
        return 5, stride, pooled
    if size >= 2:
        return size - 1, 1, 2
    return 1, 1, 1


class AuxHead(nn.Module):
    """DARTS's auxiliary head: ReLU, AvgPool, Conv1x1->128, BN, ReLU, Conv->768, BN, ReLU, Linear.

    The pool has no padding (so count_include_pad is moot); the ImageNet variant pools with stride 2 and
    has no BN after the second conv (as DARTS's code). Sizes adapt to small maps: see `aux_geometry`.
    """
    num_classes: int
    imagenet: bool = False
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x, train: bool):
        (wh, sh, kh), (ww, sw, kw) = (aux_geometry(s, self.imagenet) for s in x.shape[1:3])
        x = nn.relu(x)
        x = nn.avg_pool(x, (wh, ww), (sh, sw), padding="VALID")
        x = ops_lib.Conv(AUX_MID, 1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(ops_lib.batch_norm(train, True, name="bn1")(x))
        x = nn.Conv(AUX_OUT, (kh, kw), padding="VALID", use_bias=False, kernel_init=ops_lib.conv_init,
                    dtype=self.dtype, name="conv2")(x)
        if not self.imagenet:
            x = ops_lib.batch_norm(train, True, name="bn2")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return _linear(self.num_classes, x.shape[-1], "classifier")(x)


class Network(nn.Module):
    """The evaluation network of a NetworkSpec.

    `__call__(x, train, drop_path_rate=0.0) -> (logits, aux_logits or None)`:
      x: (N, H, W, C_in) float images.
      train: batch statistics in BN (mutable `batch_stats`), drop-path, auxiliary logits.
      drop_path_rate: probability of dropping a non-identity op output per example (rng `dropout`);
        used only when training, and skipped when it is a Python 0.
    Returns float32 logits (N, num_classes) and, when training with `spec.auxiliary`, the auxiliary
    logits (N, num_classes), else None. Initialising (any `train`) creates the auxiliary head's
    variables, so one set of variables serves training and evaluation.
    """
    spec: NetworkSpec

    @nn.compact
    def __call__(self, x, train: bool, drop_path_rate=0.0):
        spec = self.spec
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"Network expects float images (N, H, W, C), got shape {x.shape} dtype {x.dtype}")
        if spec.imagenet_stem:
            s0 = Stem((spec.stem_channels // 2, spec.stem_channels), stride=2, dtype=spec.dtype, name="stem0")(x, train)
            s1 = Stem((spec.stem_channels,), stride=2, relu_first=True, dtype=spec.dtype, name="stem1")(s0, train)
        else:
            s0 = s1 = Stem((spec.stem_channels,), dtype=spec.dtype, name="stem")(x, train)
        reduction_prev = spec.imagenet_stem
        aux = None
        for i, cell in enumerate(spec.cells):
            s0, s1 = s1, Cell(cell, reduction_prev, pool_bn=spec.pool_bn, masked=spec.masked, impl=spec.impl,
                              dtype=spec.dtype, name=names.cell_name(i))(s0, s1, train, drop_path_rate)
            reduction_prev = cell.reduction
            if spec.auxiliary and i == spec.aux_cell and (train or self.is_initializing()):
                aux = AuxHead(spec.num_classes, spec.imagenet_stem, dtype=spec.dtype, name="aux_head")(s1, train)
        out = jnp.mean(s1, axis=(1, 2))
        logits = _linear(spec.num_classes, out.shape[-1], "classifier")(out).astype(jnp.float32)
        return logits, (aux.astype(jnp.float32) if train and aux is not None else None)


# ---------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------

def build_network(genotype_or_cells: Union[str, Genotype, Sequence[CellSpec]], *, init_channels: int,
                  num_classes: int, layers: Optional[int] = None, auxiliary: bool = False,
                  stem_multiplier: int = 3, pool_bn: Optional[bool] = None, masked: Optional[bool] = None,
                  imagenet_stem: bool = False, aux_cell: Optional[int] = None, dtype: Optional[Any] = None,
                  impl: str = "auto") -> Network:
    """A Network from a genotype (name, text or Genotype) or from cells.

    Args:
      genotype_or_cells: DARTS genotype (laid out by `genotype_to_cells(g, layers, init_channels)`), or a
        sequence of CellSpec (e.g. an exported MGAS architecture), used as is.
      init_channels: C; the stem has stem_multiplier * C channels (ImageNet stem: C, as DARTS).
      num_classes: classifier outputs.
      layers: number of cells; required for a genotype, checked against the cells otherwise.
      auxiliary: build the auxiliary head (after cell 2 * layers // 3 unless `aux_cell`).
      pool_bn, masked: default False for a genotype (DARTS's network), True for cells (MGAS retraining:
        BN after pools, fixed weight masks).
      imagenet_stem, aux_cell, dtype, impl: see NetworkSpec.
    Returns:
      Network(spec); the spec is `network.spec`.
    """
    is_cells = isinstance(genotype_or_cells, (list, tuple)) and not isinstance(genotype_or_cells, Genotype) \
        and all(isinstance(c, CellSpec) for c in genotype_or_cells)
    if is_cells:
        cells = tuple(genotype_or_cells)
        if layers is not None and layers != len(cells):
            raise ValueError(f"layers={layers} but {len(cells)} cells were given; omit layers or make them agree")
        default = True
    else:
        if layers is None:
            raise ValueError("build_network needs layers=... to lay out a genotype")
        cells = genotype_to_cells(get_genotype(genotype_or_cells), layers, init_channels)
        default = False
    if type(init_channels) is not int or init_channels < 1:
        raise ValueError(f"init_channels must be a positive int, got {init_channels!r}")
    spec = NetworkSpec(
        cells=cells, num_classes=num_classes,
        stem_channels=init_channels if imagenet_stem else stem_multiplier * init_channels,
        auxiliary=auxiliary, aux_cell=aux_cell, pool_bn=default if pool_bn is None else pool_bn,
        masked=default if masked is None else masked, imagenet_stem=imagenet_stem, dtype=dtype, impl=impl)
    return Network(spec)


def _example_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got {tuple(input_shape)}")
    return shape


def init_network(spec: NetworkSpec, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Variables of Network(spec): {'params', 'batch_stats'[, 'masks' (all ones)]}.

    Args:
      spec: the network.
      key: PRNG key for the parameters.
      input_shape: (N, H, W, C) or (H, W, C) of the inputs.

    Equal to `Network(spec).init({'params': key}, zeros, train=False)`, compiled once. On CPU, XLA
    compiles the default (threefry) random bits slowly, once per distinct parameter shape; a key made
    with `jax.random.key(seed, impl='rbg')` compiles several times faster.
    """
    x = jnp.zeros(_example_shape(input_shape), jnp.float32)
    model = Network(spec)
    return jax.jit(lambda k: model.init({"params": k}, x, train=False))(key)


# ---------------------------------------------------------------------------------------------------
# Size: parameters and multiply-adds
# ---------------------------------------------------------------------------------------------------

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten(tree) -> list[tuple[tuple[str, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def _collection(tree, name: str):
    """Accept either a collection (e.g. params) or a whole variables dict holding it."""
    if hasattr(tree, "keys") and name in tree.keys():
        return tree[name]
    return tree


def count_params(params, masks=None, include_aux: bool = False) -> dict:
    """Parameter counts as DARTS reports them (auxiliary head excluded unless asked).

    Args:
      params: the `params` collection (or the whole variables dict); arrays or ShapeDtypeStructs.
        BatchNorm scale and bias count (as in PyTorch); batch statistics are not parameters.
      masks: optional `masks` collection (or variables dict): 0/1 arrays at the paths of the kernels
        they mask; entries without a matching parameter (e.g. filter masks) are ignored.
      include_aux: count the auxiliary head (`aux_head`) too.
    Returns:
      {'dense': all parameters, 'nonzero': dense minus the weights the masks zero}.
    """
    flat = {p: leaf for p, leaf in _flatten(_collection(params, "params"))}
    keep = (lambda p: True) if include_aux else (lambda p: p[0] != "aux_head")
    dense = sum(int(np.prod(leaf.shape)) for p, leaf in flat.items() if keep(p))
    zeroed = 0
    if masks is not None:
        for p, m in _flatten(_collection(masks, "masks")):
            if p not in flat or not keep(p):
                continue
            if tuple(m.shape) != tuple(flat[p].shape):
                raise ValueError(f"mask {'/'.join(p)} has shape {tuple(m.shape)} but its parameter has "
                                 f"{tuple(flat[p].shape)}")
            zeroed += int(np.prod(m.shape)) - int(np.count_nonzero(np.asarray(m)))
    return {"dense": dense, "nonzero": dense - zeroed}


@functools.lru_cache(maxsize=64)
def _layers(spec: NetworkSpec, example_shape: tuple[int, ...]) -> tuple[tuple[tuple[str, ...], tuple[int, ...], int], ...]:
    layers = []

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (ops_lib.Conv, nn.Dense)) \
                and module.path[0] != "aux_head":
            kernel = module.get_variable("params", names.KERNEL)
            layers.append((tuple(module.path) + (names.KERNEL,), tuple(kernel.shape), int(np.prod(y.shape[1:-1]))))
        return y

    x = jax.ShapeDtypeStruct(example_shape, jnp.float32)
    model = Network(dataclasses.replace(spec, impl="lax"))  # the same layers; the fastest to trace
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return tuple(layers)


def conv_shapes(spec: NetworkSpec, input_shape: Sequence[int]) -> tuple[tuple[tuple[str, ...], tuple[int, ...], int], ...]:
    """Every conv and linear layer of one forward pass of Network(spec) (auxiliary head excluded).

    Read off the real modules: each `ops.Conv` and `nn.Dense` call of one abstract `init` (jax.eval_shape:
    traced, not compiled) is recorded with its kernel and output shape (nn.intercept_methods). Cached by
    (spec, input shape).

    Args:
      spec: the network.
      input_shape: (H, W, C) or (N, H, W, C); only the last three matter.
    Returns:
      (parameter path, kernel shape, output positions) per layer: the path is that of the kernel in
      `params` (and `masks`), e.g. ('cell_0', 'op_0_1_sep_conv_3x3', 'sep', 'unit1', 'dw', 'kernel');
      the kernel shape is HWIO (depthwise (k, k, 1, C); linear (C_in, C_out)); positions = H_out * W_out
      (1 for the linear layer). Each kernel entry is used once per output position, so the layer's
      multiply-adds are prod(kernel shape) * positions.
    """
    return _layers(spec, (1,) + _example_shape(input_shape)[1:])


def count_flops(spec: NetworkSpec, input_shape: Sequence[int], masks=None) -> int:
    """Multiply-adds of one forward pass of one example, counted on the real modules (`conv_shapes`).

    Counts convs (depthwise: k*k*C per output position) and the linear layer (C_in * classes); pools,
    BN, ReLU, additions and the auxiliary head are not counted. With `masks` (the `masks` collection or
    variables dict) a masked kernel counts only its non-zero entries: the multiply-adds left after
    weight pruning.

    Args:
      spec: the network.
      input_shape: (H, W, C) or (N, H, W, C) of the input; the count is per example.
      masks: optional weight masks.
    """
    flat = {} if masks is None else {p: m for p, m in _flatten(_collection(masks, "masks"))}
    total = 0
    for path, shape, positions in conv_shapes(spec, input_shape):
        m = flat.get(path)
        if m is not None and tuple(m.shape) != shape:
            raise ValueError(f"mask {'/'.join(path)} has shape {tuple(m.shape)}, the layer's kernel is {shape}")
        entries = int(np.prod(shape)) if m is None else int(np.count_nonzero(np.asarray(m)))
        total += entries * positions
    return total
