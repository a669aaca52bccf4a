"""Flax module names and variable paths: the contract between the networks and the code that reads them.

The super-net (`supernet.py`), the evaluation network (`network.py`) and the ops they share (`ops.py`)
name their submodules with the constants and functions here, and everything that reads their variables
by path (pruning, export, retraining, reports, benchmarks) builds those paths here too, so renaming a
module is one edit. A path is a tuple of keys into a collection (`params`, `arch`, `batch_stats`,
`masks`); the same path names a kernel in `params` and its weight mask in `masks`.

    cell_{i}/pre0, cell_{i}/pre1                 ops.Preprocess: conv/ + bn/, or fr/{conv1,conv2,bn}; gate/
    cell_{i}/op_{node}_{src}_{op}                ops.Op:
        sep/unit1, sep/unit2                       sep_conv's two ConvUnits: dw/, pw/, bn/, gate/
        dil/unit                                   dil_conv's ConvUnit
        fr/{conv1,conv2,bn,gate}                   a stride-2 skip_connect (FactorizedReduce)
    cell_{i}/ops (masks), cell_{i}/alpha, t_op, t_k, t_w, t_pre (arch)    a SuperCell's own variables

This module imports nothing of the project, so every module can use it.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import jax

# Modules of a network
CELL_PREFIX = "cell_"
PRE = ("pre0", "pre1")         # the preprocess layers of a cell's inputs 0 and 1
OP_PREFIX = "op_"

# Submodules of ops.Op, ops.Preprocess and ops.ConvUnit
SEP, DIL, FR = "sep", "dil", "fr"
SEP_UNITS = ("unit1", "unit2")  # sep_conv's ConvUnits (the first carries the stride)
DIL_UNIT = "unit"
DW, PW = "dw", "pw"             # a ConvUnit's depthwise and pointwise convs
CONV = "conv"                   # Preprocess's 1x1 conv
FR_CONVS = ("conv1", "conv2")   # FactorizedReduce's two halves
BN = "bn"
GATE = "gate"                   # ops.FilterGate

# Variables
KERNEL = "kernel"               # a conv kernel in `params`, its weight mask in `masks`
BETA = "beta"                   # filter scores in `arch`, their committed mask in `masks`
OPS_MASK = "ops"                # a SuperCell's committed (E, 7) op mask in `masks`
BN_LEAVES = ("mean", "var", "scale", "bias")  # flax BatchNorm's statistics and affine parameters

_OP_NAME = re.compile(rf"^{OP_PREFIX}(\d+)_(\d+)_(.+)$")


def cell_name(i: int) -> str:
    """Name of cell i in both networks."""
    return f"{CELL_PREFIX}{i}"


def cell_index(name: str) -> Optional[int]:
    """i of a `cell_{i}` name; None for any other name."""
    if name.startswith(CELL_PREFIX) and name[len(CELL_PREFIX):].isdigit():
        return int(name[len(CELL_PREFIX):])
    return None


def op_name(o) -> str:
    """Submodule name of an op (a genotype.OpSpec, or anything with node, src, op) in both networks."""
    return f"{OP_PREFIX}{o.node}_{o.src}_{o.op}"


def parse_op_name(name: str) -> Optional[tuple[int, int, str]]:
    """(node, src, op) of an `op_name`; None for any other name."""
    m = _OP_NAME.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def is_op_name(name: str) -> bool:
    return parse_op_name(name) is not None


def op_path(i: int, o) -> tuple:
    """Path of op `o` of cell i."""
    return (cell_name(i), op_name(o))


def pre_path(i: int, k: int) -> tuple:
    """Path of the preprocess layer of input k (0 or 1) of cell i."""
    return (cell_name(i), PRE[k])


def conv_units(op: str) -> tuple:
    """Paths (relative to the op) of the gated ConvUnits of an op: two for sep_conv, one for dil_conv."""
    if op.startswith("sep_conv"):
        return tuple((SEP, u) for u in SEP_UNITS)
    if op.startswith("dil_conv"):
        return ((DIL, DIL_UNIT),)
    return ()


def gate(base: tuple = ()) -> tuple:
    """Path of the filter scores (`arch`) and filter mask (`masks`) of the gated module at `base`."""
    return tuple(base) + (GATE, BETA)


def unit_kernels(unit: tuple) -> tuple:
    """Paths of a ConvUnit's depthwise and pointwise kernels."""
    return tuple(tuple(unit) + (c, KERNEL) for c in (DW, PW))


def is_filter_mask(path: tuple) -> bool:
    """A path that ends in a filter gate's scores or mask (`.../gate/beta`)."""
    return tuple(path[-2:]) == (GATE, BETA)


def is_kernel(path: tuple) -> bool:
    return bool(path) and path[-1] == KERNEL


def get_path(tree: dict, path: tuple):
    """The subtree or leaf of a nested dict at `path`."""
    for k in path:
        tree = tree[k]
    return tree


def has_path(tree: dict, path: tuple) -> bool:
    try:
        get_path(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def key_path(path) -> tuple:
    """A jax key path (DictKey, GetAttrKey, ...) as a tuple of plain names."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# ----------------------------------------------------------------------------------------------
# Weight masks as a tree parallel to params

def _is_none(x) -> bool:
    return x is None


def masks_like(params: Any, masks: Any) -> Any:
    """The weight masks as a tree of `params`' structure: at each leaf, the mask at the same path or None.

    Flax stores a kernel's weight mask in the `masks` collection at the kernel's own path, so the
    collection is keyed like `params` but holds only the masked kernels (plus, in the super-net, the
    filter and op masks, which no parameter has the path of). This aligns the two trees, so that
    masking is a `jax.tree.map` (see `apply`); a None leaf is a parameter nothing masks.

    Args:
      params: any params-shaped tree of nested dicts (params, gradients, updates, shapes).
      masks: the `masks` collection (or None / {}).
    """
    masks = masks or {}

    def pick(path, _):
        node = masks
        for k in key_path(path):
            if not hasattr(node, "get"):
                return None
            node = node.get(k)
            if node is None:
                return None
        return None if hasattr(node, "keys") else node

    return jax.tree_util.tree_map_with_path(pick, params)


def apply(tree: Any, masks: Any) -> Any:
    """`tree` with every leaf that has a weight mask multiplied by it (pruned entries exactly 0).

    Args:
      tree: params, gradients or updates.
      masks: the `masks` collection, or an aligned tree from `masks_like` (None where unmasked).
    """
    aligned = masks_like(tree, masks)
    return jax.tree.map(lambda m, x: x if m is None else x * m.astype(x.dtype), aligned, tree, is_leaf=_is_none)
