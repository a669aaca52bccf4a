"""Cell descriptions: MGAS per-cell op sets with channel widths, and DARTS genotypes.

A cell has 2 inputs (states 0 and 1, the outputs of the two previous cells), `steps` intermediate
nodes (states 2 .. steps+1) and outputs the concatenation of `concat` states. An op reads state
`src` and feeds node `node` (0-based among the intermediate nodes, so it writes state node + 2).

`CellSpec` is the one description used everywhere: the super-net's still-active ops, an exported
MGAS architecture (every op whose committed mask is 1, with its channel widths), and a DARTS genotype
(two ops per node at full width). It is frozen and hashable, so it is a static Flax attribute and a
structural change (an op removed, channels shrunk) is a new spec and a new compilation.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, NamedTuple, Optional, Sequence, Union

from mgas_jax import ops as ops_lib


def num_edges(steps: int = 4) -> int:
    """14 for 4 steps: node j has 2 + j incoming edges."""
    return sum(2 + j for j in range(steps))


def edge_index(node: int, src: int) -> int:
    """Index of the edge src -> node in the standard DARTS edge order (node-major, then source)."""
    if not 0 <= src < node + 2:
        raise ValueError(f"node {node} can read states 0..{node + 1}, not {src}")
    return sum(2 + j for j in range(node)) + src


def edge_endpoints(edge: int, steps: int = 4) -> tuple[int, int]:
    """(node, src) of an edge index."""
    for node in range(steps):
        if edge < 2 + node:
            return node, edge
        edge -= 2 + node
    raise ValueError(f"edge index out of range for a cell with {steps} steps")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op on one edge.

    Attributes:
      node: intermediate node the op feeds (0-based).
      src: state the op reads (0, 1 = cell inputs; 2 + j = node j).
      op: op name (ops.DARTS_OPS).
      mid: inner width of a sep_conv (None: the cell width).
      out_index: node channels the op writes (None: all); sorted tuple of ints.
    """
    node: int
    src: int
    op: str
    mid: Optional[int] = None
    out_index: Optional[tuple] = None

    @property
    def edge(self) -> int:
        return edge_index(self.node, self.src)

    @property
    def op_index(self) -> int:
        """Column of this op in the super-net's alpha (ops.OPS order)."""
        return ops_lib.OPS.index(self.op)


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """One cell: its ops and the widths of its parts.

    Attributes:
      reduction: stride 2 on the edges from the cell inputs, width doubled.
      ops: the ops of the cell, any number per edge (an edge may keep several ops).
      width: node channel width C of this cell.
      pre0_index, pre1_index: surviving output channels of the two preprocess layers (None: all).
      steps: number of intermediate nodes.
      concat: states concatenated into the cell output.
    """
    reduction: bool
    ops: tuple
    width: int
    pre0_index: Optional[tuple] = None
    pre1_index: Optional[tuple] = None
    steps: int = 4
    concat: tuple = (2, 3, 4, 5)

    def ops_into(self, node: int) -> tuple:
        return tuple(o for o in self.ops if o.node == node)

    @property
    def multiplier(self) -> int:
        return len(self.concat)


# ---------------------------------------------------------------------------------------------------
# DARTS genotypes
# ---------------------------------------------------------------------------------------------------


class Genotype(NamedTuple):
    """A DARTS-family genotype, with DARTS's own field names.

    Attributes:
      normal, reduce: (op_name, input_index) pairs, two per intermediate node; entry k feeds node k // 2,
        which may read states 0 .. k // 2 + 1 (0, 1 = the cell inputs, 2 + j = node j).
      normal_concat, reduce_concat: states concatenated into the cell output.

    `parse_genotype` returns tuples throughout, so a Genotype is hashable.
    """
    normal: Sequence
    normal_concat: Sequence
    reduce: Sequence
    reduce_concat: Sequence


_FIELDS = Genotype._fields
_SHAPE = "Genotype(normal=[(op, index), ...], normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=range(2, 6))"


def _literal(node: ast.AST, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{where} must be a literal (numbers, strings, lists, tuples), "
                         f"got {ast.unparse(node)!r}") from None


def _concat_value(node: ast.AST, where: str) -> tuple:
    """A concat field: a literal list/tuple of ints, or range(...) / list(range(...)) with int literals."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("list", "tuple") \
            and len(node.args) == 1 and not node.keywords:
        node = node.args[0]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        if node.keywords or not 1 <= len(node.args) <= 3:
            raise ValueError(f"{where}: range() takes 1 to 3 integer arguments, got {ast.unparse(node)!r}")
        args = [_literal(a, where) for a in node.args]
        if not all(type(a) is int for a in args):
            raise ValueError(f"{where}: range() arguments must be integers, got {ast.unparse(node)!r}")
        return tuple(range(*args))
    value = _literal(node, where)
    if not isinstance(value, (list, tuple)) or not all(type(v) is int for v in value):
        raise ValueError(f"{where} must be a list of state indices or range(a, b), got {ast.unparse(node)!r}")
    return tuple(value)


def _check_ops(entries: Any, field: str) -> tuple:
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"{field} must be a list of (op_name, input_index) pairs, got {entries!r}")
    if not entries:
        raise ValueError(f"{field} is empty; a cell needs at least one node (2 entries)")
    if len(entries) % 2:
        raise ValueError(f"{field} has {len(entries)} entries; a DARTS genotype has exactly 2 per node, "
                         f"so the count must be even")
    out = []
    for k, entry in enumerate(entries):
        where = f"{field}[{k}]"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                and type(entry[1]) is int):
            raise ValueError(f"{where} must be a pair (op_name: str, input_index: int), got {entry!r}")
        name, index = entry
        if name not in ops_lib.DARTS_OPS:
            raise ValueError(f"{where}: unknown op {name!r}; the allowed ops are {', '.join(ops_lib.DARTS_OPS)}")
        node = k // 2
        if not 0 <= index <= node + 1:
            raise ValueError(f"{where} = {tuple(entry)!r}: node {node} (entries {2 * node} and {2 * node + 1}) "
                             f"may read states 0..{node + 1}, not {index}")
        out.append((name, index))
    return tuple(out)


def _check_concat(concat: tuple, field: str, steps: int) -> tuple:
    if not concat:
        raise ValueError(f"{field} is empty; it must list at least one state to concatenate")
    for s in concat:
        if not 0 <= s <= steps + 1:
            raise ValueError(f"{field} = {list(concat)}: state {s} does not exist; a cell with {steps} nodes "
                             f"has states 0..{steps + 1} (nodes are 2..{steps + 1})")
    if len(set(concat)) != len(concat):
        raise ValueError(f"{field} = {list(concat)} repeats a state; list each state once")
    return tuple(concat)


def validate_genotype(genotype: Genotype) -> Genotype:
    """Check a Genotype's ops, indices and concats; returns it with every field as a tuple.

    Raises:
      ValueError: saying which entry is wrong and what is allowed.
    """
    normal = _check_ops(genotype.normal, "normal")
    reduce = _check_ops(genotype.reduce, "reduce")
    normal_concat = _check_concat(tuple(genotype.normal_concat), "normal_concat", len(normal) // 2)
    reduce_concat = _check_concat(tuple(genotype.reduce_concat), "reduce_concat", len(reduce) // 2)
    return Genotype(normal, normal_concat, reduce, reduce_concat)


def parse_genotype(text: str) -> Genotype:
    """Parse a genotype as DARTS-family papers and code publish it, without evaluating any code.

    Accepts `Genotype(normal=[...], normal_concat=[...], reduce=[...], reduce_concat=range(2, 6))`
    (keyword or positional fields, any whitespace, `genotypes.Genotype` too) and an assignment
    `NAME = Genotype(...)`. Concats may be lists, tuples, `range(...)` or `list(range(...))`.

    Args:
      text: the genotype string.
    Returns:
      a Genotype whose fields are tuples: ops as ((op, index), ...), concats as (state, ...).
    Raises:
      ValueError: malformed text, a missing or unknown field, an unknown op (the message lists
        ops.DARTS_OPS), an input index a node may not read, or an odd number of entries.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_genotype expects a string, got {type(text).__name__}")
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as err:
        try:  # `NAME = Genotype(...)`, as genotypes.py files write it
            module = ast.parse(source, mode="exec")
        except SyntaxError:
            raise ValueError(f"genotype text is not valid Python syntax ({err.msg}, line {err.lineno}, "
                             f"column {err.offset}); expected {_SHAPE}") from None
        if len(module.body) != 1 or not isinstance(module.body[0], ast.Assign):
            raise ValueError(f"genotype text must be one expression or one assignment; expected {_SHAPE}") from None
        tree = module.body[0].value
    func = tree.func if isinstance(tree, ast.Call) else None
    fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if fname != "Genotype":
        raise ValueError(f"genotype text must be a call Genotype(...), got {ast.unparse(tree)[:80]!r}; "
                         f"expected {_SHAPE}")
    if len(tree.args) > len(_FIELDS):
        raise ValueError(f"Genotype takes {len(_FIELDS)} fields ({', '.join(_FIELDS)}), got {len(tree.args)} "
                         f"positional arguments")
    nodes = dict(zip(_FIELDS, tree.args))
    for kw in tree.keywords:
        if kw.arg not in _FIELDS:
            raise ValueError(f"unknown Genotype field {kw.arg!r}; the fields are {', '.join(_FIELDS)}")
        if kw.arg in nodes:
            raise ValueError(f"Genotype field {kw.arg!r} is given twice")
        nodes[kw.arg] = kw.value
    missing = [f for f in _FIELDS if f not in nodes]
    if missing:
        raise ValueError(f"Genotype is missing the field(s) {', '.join(missing)}; expected {_SHAPE}")
    return validate_genotype(Genotype(
        normal=_literal(nodes["normal"], "normal"),
        normal_concat=_concat_value(nodes["normal_concat"], "normal_concat"),
        reduce=_literal(nodes["reduce"], "reduce"),
        reduce_concat=_concat_value(nodes["reduce_concat"], "reduce_concat")))


# Published genotypes, as text exactly as their authors' code publishes them (checked against
# quark0/darts, yuhuixu1993/PC-DARTS and chenxin061/pdarts genotypes.py).
_PUBLISHED = {
    # DARTS (Liu et al. 2019), first-order search
    "DARTS_V1": "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
                "('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                "('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
                "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
                "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])",
    # DARTS second-order search: the cell of the paper's 2.76 % / 3.3 M result
    "DARTS_V2": "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
                "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
                "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
                "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])",
    # PC-DARTS (Xu et al. 2020), searched on CIFAR-10
    "PC_DARTS": "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), "
                "('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), "
                "('dil_conv_3x3', 1)], normal_concat=range(2, 6), reduce=[('sep_conv_5x5', 1), "
                "('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), "
                "('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))",
    # P-DARTS (Chen et al. 2019), searched on CIFAR-10
    "PDARTS": "Genotype(normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0), "
              "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 0), "
              "('dil_conv_5x5', 4)], normal_concat=range(2, 6), reduce=[('avg_pool_3x3', 0), "
              "('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('dil_conv_5x5', 2), ('max_pool_3x3', 0), "
              "('dil_conv_3x3', 1), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)], reduce_concat=range(2, 6))",
}

GENOTYPES: dict[str, Genotype] = {name: parse_genotype(text) for name, text in _PUBLISHED.items()}
"""Published genotypes by name: DARTS_V1, DARTS_V2 (alias DARTS), PC_DARTS, PDARTS."""
GENOTYPES["DARTS"] = GENOTYPES["DARTS_V2"]  # DARTS's own code makes V2 its default


def get_genotype(name_or_text: Union[str, Genotype]) -> Genotype:
    """A genotype by name (a key of GENOTYPES), from its published text, or a Genotype (validated)."""
    if isinstance(name_or_text, Genotype):
        return validate_genotype(name_or_text)
    if not isinstance(name_or_text, str):
        raise ValueError(f"expected a genotype name or text, got {type(name_or_text).__name__}")
    if name_or_text.strip() in GENOTYPES:
        return GENOTYPES[name_or_text.strip()]
    if "(" in name_or_text:
        return parse_genotype(name_or_text)
    raise ValueError(f"unknown genotype {name_or_text!r}; use one of {', '.join(GENOTYPES)} "
                     f"or a genotype string {_SHAPE}")


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Indices of the reduction cells in a DARTS network of `layers` cells: layers//3 and 2*layers//3."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


def genotype_to_cells(genotype: Union[str, Genotype], layers: int, init_channels: int) -> tuple[CellSpec, ...]:
    """The cells of DARTS's evaluation network for a genotype.

    Reduction cells sit at layers//3 and 2*layers//3; the width starts at `init_channels` and doubles
    at each reduction (C, 2C, 4C). Every op is at full width; op k of the genotype feeds node k // 2.

    Args:
      genotype: a Genotype, or a name / text accepted by `get_genotype`.
      layers: number of cells L.
      init_channels: width C of the first cells.
    Returns:
      `layers` CellSpecs.
    """
    genotype = get_genotype(genotype)
    if type(layers) is not int or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    if type(init_channels) is not int or init_channels < 1:
        raise ValueError(f"init_channels must be a positive int, got {init_channels!r}")
    reductions = reduction_layers(layers)
    cells, width = [], init_channels
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            width *= 2
        pairs, concat = (genotype.reduce, genotype.reduce_concat) if reduction else \
            (genotype.normal, genotype.normal_concat)
        ops = tuple(OpSpec(node=k // 2, src=index, op=name) for k, (name, index) in enumerate(pairs))
        cells.append(CellSpec(reduction=reduction, ops=ops, width=width, steps=len(pairs) // 2,
                              concat=tuple(concat)))
    return tuple(cells)


# ---------------------------------------------------------------------------------------------------
# JSON export of cells (the search's exported architectures)
# ---------------------------------------------------------------------------------------------------

_CELL_KEYS = ("reduction", "width", "steps", "concat", "pre0_index", "pre1_index", "ops")
_OP_KEYS = ("node", "src", "op", "mid", "out_index")


def _index_to_json(index: Optional[tuple]) -> Optional[list]:
    return None if index is None else [int(i) for i in index]


def _index_from_json(value: Any, where: str) -> Optional[tuple]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(type(i) is int and i >= 0 for i in value):
        raise ValueError(f"{where} must be null or a list of channel indices (ints >= 0), got {value!r}")
    return tuple(value)


def _int_from_json(value: Any, where: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{where} must be an int >= {minimum}, got {value!r}")
    return value


def op_to_json(op: OpSpec) -> dict:
    """A plain dict {node, src, op, mid, out_index} (out_index a list or None)."""
    return {"node": int(op.node), "src": int(op.src), "op": op.op,
            "mid": None if op.mid is None else int(op.mid), "out_index": _index_to_json(op.out_index)}


def op_from_json(obj: dict, where: str = "op") -> OpSpec:
    """Inverse of `op_to_json`, with checks."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict with keys {', '.join(_OP_KEYS)}, got {obj!r}")
    missing = [k for k in ("node", "src", "op") if k not in obj]
    extra = [k for k in obj if k not in _OP_KEYS]
    if missing or extra:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {extra}; the keys are {', '.join(_OP_KEYS)}")
    node = _int_from_json(obj["node"], f"{where}.node")
    src = _int_from_json(obj["src"], f"{where}.src")
    if src > node + 1:
        raise ValueError(f"{where}: node {node} may read states 0..{node + 1}, not {src}")
    name = obj["op"]
    if name not in ops_lib.DARTS_OPS:
        raise ValueError(f"{where}: unknown op {name!r}; the allowed ops are {', '.join(ops_lib.DARTS_OPS)}")
    mid = obj.get("mid")
    return OpSpec(node=node, src=src, op=name,
                  mid=None if mid is None else _int_from_json(mid, f"{where}.mid", 1),
                  out_index=_index_from_json(obj.get("out_index"), f"{where}.out_index"))


def cell_to_json(cell: CellSpec) -> dict:
    """A JSON-able dict of a CellSpec; `cell_from_json(cell_to_json(c)) == c` exactly."""
    return {"reduction": bool(cell.reduction), "width": int(cell.width), "steps": int(cell.steps),
            "concat": [int(s) for s in cell.concat],
            "pre0_index": _index_to_json(cell.pre0_index), "pre1_index": _index_to_json(cell.pre1_index),
            "ops": [op_to_json(o) for o in cell.ops]}


def cell_from_json(obj: dict, where: str = "cell") -> CellSpec:
    """Inverse of `cell_to_json`; checks keys, types and op names."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict with keys {', '.join(_CELL_KEYS)}, got {type(obj).__name__}")
    missing = [k for k in ("reduction", "width", "ops") if k not in obj]
    extra = [k for k in obj if k not in _CELL_KEYS]
    if missing or extra:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {extra}; the keys are {', '.join(_CELL_KEYS)}")
    if not isinstance(obj["reduction"], bool):
        raise ValueError(f"{where}.reduction must be true or false, got {obj['reduction']!r}")
    steps = _int_from_json(obj.get("steps", 4), f"{where}.steps", 1)
    concat = obj.get("concat", list(range(2, steps + 2)))
    if not isinstance(concat, (list, tuple)) or not all(type(s) is int for s in concat):
        raise ValueError(f"{where}.concat must be a list of state indices, got {concat!r}")
    if not isinstance(obj["ops"], (list, tuple)):
        raise ValueError(f"{where}.ops must be a list of op dicts, got {obj['ops']!r}")
    ops = tuple(op_from_json(o, f"{where}.ops[{k}]") for k, o in enumerate(obj["ops"]))
    for k, o in enumerate(ops):
        if o.node >= steps:
            raise ValueError(f"{where}.ops[{k}] feeds node {o.node}, but the cell has {steps} nodes (0..{steps - 1})")
    return CellSpec(reduction=obj["reduction"], ops=ops, width=_int_from_json(obj["width"], f"{where}.width", 1),
                    pre0_index=_index_from_json(obj.get("pre0_index"), f"{where}.pre0_index"),
                    pre1_index=_index_from_json(obj.get("pre1_index"), f"{where}.pre1_index"),
                    steps=steps, concat=_check_concat(tuple(concat), f"{where}.concat", steps))


def cells_to_json(cells: Sequence[CellSpec]) -> list:
    """A list of `cell_to_json` dicts."""
    return [cell_to_json(c) for c in cells]


def cells_from_json(obj: Sequence[dict]) -> tuple[CellSpec, ...]:
    """Inverse of `cells_to_json`."""
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"expected a list of cell dicts, got {type(obj).__name__}")
    return tuple(cell_from_json(c, f"cells[{i}]") for i, c in enumerate(obj))
