"""Tests of mgas_jax.genotype: DARTS genotype parsing, the published genotypes, network layout, JSON."""
import json

import pytest

from mgas_jax import genotype as G
from mgas_jax import ops

# DARTS_V2 exactly as quark0/darts cnn/genotypes.py publishes it.
DARTS_V2_TEXT = (
    "DARTS_V2 = Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
    "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
    "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
    "reduce_concat=[2, 3, 4, 5])")

GOOD = ("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2], "
        "reduce=[('max_pool_3x3', 0), ('avg_pool_3x3', 1)], reduce_concat=range(2, 3))")


def test_parse_published_darts_v2():
    g = G.parse_genotype(DARTS_V2_TEXT)
    assert g == G.GENOTYPES["DARTS_V2"] == G.GENOTYPES["DARTS"]
    assert g.normal[:2] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    assert g.normal[-1] == ("dil_conv_3x3", 2)
    assert g.normal_concat == (2, 3, 4, 5) and g.reduce_concat == (2, 3, 4, 5)
    assert len(g.reduce) == 8 and g.reduce[2] == ("skip_connect", 2)
    hash(g)  # all tuples


def test_parse_formats():
    multi_line = """
    PDARTS = genotypes.Genotype(
        normal=[('skip_connect', 0), ('dil_conv_3x3', 1)],
        normal_concat=range(2, 3),
        reduce=(('avg_pool_3x3', 0), ('sep_conv_5x5', 1),),
        reduce_concat=list(range(2, 3)),
    )
    """
    g = G.parse_genotype(multi_line)
    assert g == G.Genotype((("skip_connect", 0), ("dil_conv_3x3", 1)), (2,),
                           (("avg_pool_3x3", 0), ("sep_conv_5x5", 1)), (2,))
    positional = G.parse_genotype("Genotype([('none', 0), ('skip_connect', 1)], [2], "
                                  "[('max_pool_3x3', 0), ('max_pool_3x3', 1)], (2,))")
    assert positional.normal[0] == ("none", 0) and positional.reduce_concat == (2,)
    # the text of a parsed genotype (its repr) parses back to itself
    for g in G.GENOTYPES.values():
        assert G.parse_genotype(repr(g)) == g


def test_published_genotypes():
    assert {"DARTS_V1", "DARTS_V2", "PC_DARTS", "PDARTS"} <= set(G.GENOTYPES)
    for name, g in G.GENOTYPES.items():
        assert len(g.normal) == len(g.reduce) == 8, name
        assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5), name
    # spot checks against the authors' genotypes.py
    assert G.GENOTYPES["DARTS_V1"].reduce[-1] == ("avg_pool_3x3", 0)
    assert G.GENOTYPES["PC_DARTS"].normal[0] == ("sep_conv_3x3", 1)
    assert G.GENOTYPES["PC_DARTS"].reduce[3] == ("sep_conv_5x5", 2)
    assert G.GENOTYPES["PDARTS"].normal[-1] == ("dil_conv_5x5", 4)
    assert G.GENOTYPES["PDARTS"].reduce[-1] == ("dil_conv_5x5", 3)


def test_get_genotype():
    assert G.get_genotype("PDARTS") is G.GENOTYPES["PDARTS"]
    assert G.get_genotype(DARTS_V2_TEXT) == G.GENOTYPES["DARTS_V2"]
    assert G.get_genotype(G.GENOTYPES["PC_DARTS"]) == G.GENOTYPES["PC_DARTS"]
    with pytest.raises(ValueError, match=r"unknown genotype 'DARTS_V3'; use one of DARTS_V1, DARTS_V2"):
        G.get_genotype("DARTS_V3")


@pytest.mark.parametrize("text, message", [
    ("Genotype(normal=[('sep_conv_3x3', 0)", r"not valid Python syntax .*expected Genotype\(normal="),
    (GOOD.replace("'sep_conv_3x3'", "'sep_conv_7x7'"),
     r"normal\[0\]: unknown op 'sep_conv_7x7'; the allowed ops are skip_connect, sep_conv_3x3, sep_conv_5x5, "
     r"dil_conv_3x3, dil_conv_5x5, avg_pool_3x3, max_pool_3x3, none"),
    (GOOD.replace("('avg_pool_3x3', 1)", "('avg_pool_3x3', 2)"),
     r"reduce\[1\] = \('avg_pool_3x3', 2\): node 0 \(entries 0 and 1\) may read states 0..1, not 2"),
    (GOOD.replace("('skip_connect', 1)]", "('skip_connect', 1), ('skip_connect', 2)]"),
     r"normal has 3 entries; a DARTS genotype has exactly 2 per node, so the count must be even"),
    (GOOD.replace("normal=[('sep_conv_3x3', 0), ('skip_connect', 1)]", "normal=[]"),
     r"normal is empty; a cell needs at least one node"),
    (GOOD.replace("('sep_conv_3x3', 0)", "('sep_conv_3x3', '0')"),
     r"normal\[0\] must be a pair \(op_name: str, input_index: int\), got \('sep_conv_3x3', '0'\)"),
    (GOOD.replace(", reduce_concat=range(2, 3)", ""), r"missing the field\(s\) reduce_concat"),
    (GOOD.replace("normal_concat=", "normal_cat="), r"unknown Genotype field 'normal_cat'; the fields are normal, "),
    (GOOD.replace("normal_concat=[2]", "normal_concat=[2, 6]"),
     r"normal_concat = \[2, 6\]: state 6 does not exist; a cell with 1 nodes has states 0..2"),
    (GOOD.replace("range(2, 3)", "range(2, x)"), r"reduce_concat must be a literal"),
    ("Cell(normal=[])", r"must be a call Genotype\(...\)"),
    ("Genotype(normal=__import__('os').getcwd(), normal_concat=[2], reduce=[], reduce_concat=[2])",
     r"normal must be a literal"),
    ("x = 1; y = 2", r"one expression or one assignment"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        G.parse_genotype(text)


def test_genotype_to_cells_darts_layout():
    g = G.GENOTYPES["DARTS_V2"]
    cells = G.genotype_to_cells(g, layers=20, init_channels=36)
    assert len(cells) == 20
    assert [i for i, c in enumerate(cells) if c.reduction] == [6, 13]
    assert [c.width for c in cells] == [36] * 6 + [72] * 7 + [144] * 7
    normal, reduce = cells[0], cells[6]
    assert normal.ops[7] == G.OpSpec(node=3, src=2, op="dil_conv_3x3")
    assert [(o.node, o.src, o.op) for o in normal.ops[:2]] == [(0, 0, "sep_conv_3x3"), (0, 1, "sep_conv_3x3")]
    assert all(o.mid is None and o.out_index is None for c in cells for o in c.ops)
    assert reduce.ops[2] == G.OpSpec(node=1, src=2, op="skip_connect")
    assert normal.concat == reduce.concat == (2, 3, 4, 5) and normal.steps == 4
    # small networks: reductions at layers//3 and 2*layers//3 (coinciding for layers < 3, as in DARTS)
    assert [c.reduction for c in G.genotype_to_cells("DARTS_V2", 3, 4)] == [False, True, True]
    assert [c.width for c in G.genotype_to_cells("DARTS_V2", 3, 4)] == [4, 8, 16]
    assert [c.reduction for c in G.genotype_to_cells("DARTS_V2", 1, 4)] == [True]
    with pytest.raises(ValueError, match="layers must be a positive int"):
        G.genotype_to_cells(g, 0, 16)


def _mgas_cells():
    ops_ = (G.OpSpec(0, 0, "sep_conv_3x3", mid=3, out_index=(0, 2, 5)),
            G.OpSpec(0, 0, "skip_connect"), G.OpSpec(0, 1, "dil_conv_5x5", out_index=(1,)),
            G.OpSpec(1, 2, "max_pool_3x3"))
    return (G.CellSpec(False, ops_, 6, pre0_index=(0, 1, 2, 3), pre1_index=None, steps=2, concat=(2, 3)),
            G.CellSpec(True, (G.OpSpec(0, 1, "skip_connect", out_index=(4, 7)),), 8, steps=1, concat=(2,)))


def test_json_round_trip():
    cells = _mgas_cells() + G.genotype_to_cells("PDARTS", 5, 8)
    obj = json.loads(json.dumps(G.cells_to_json(cells)))
    assert G.cells_from_json(obj) == cells
    one = G.cell_to_json(cells[0])
    assert one["ops"][0] == {"node": 0, "src": 0, "op": "sep_conv_3x3", "mid": 3, "out_index": [0, 2, 5]}
    assert one["pre0_index"] == [0, 1, 2, 3] and one["pre1_index"] is None
    assert G.cell_from_json(json.loads(json.dumps(one))) == cells[0]


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.pop("width"), r"cell: missing keys \['width'\]"),
    (lambda o: o.update(colour=1), r"unknown keys \['colour'\]"),
    (lambda o: o["ops"][0].update(op="conv_7x1"), r"cell.ops\[0\]: unknown op 'conv_7x1'; the allowed ops are "),
    (lambda o: o["ops"][3].update(src=4), r"cell.ops\[3\]: node 1 may read states 0..2, not 4"),
    (lambda o: o["ops"][3].update(node=2), r"feeds node 2, but the cell has 2 nodes"),
    (lambda o: o.update(pre0_index=[0, -1]), r"cell.pre0_index must be null or a list of channel indices"),
    (lambda o: o.update(concat=[2, 9]), r"state 9 does not exist"),
])
def test_json_errors(edit, message):
    obj = G.cell_to_json(_mgas_cells()[0])
    edit(obj)
    with pytest.raises(ValueError, match=message):
        G.cell_from_json(obj)


def test_darts_ops_constant():
    # the parser's allowed ops are the op library's
    assert set(ops.DARTS_OPS) == {"none", *ops.OPS}
