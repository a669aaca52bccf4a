"""The random-architecture baseline (baselines.random_export) on a hand-made export: no search, no training.

Covers: the untraced parameter split agrees with the traced network; the random export rebuilds with
exactly the target non-zero count and the source's op count per cell; the same seed draws the same cells,
another seed other cells; an unreachable target is refused naming the cause. (The fixed-ratio baseline's
tests use a real search export: tests/test_retrain.py.)
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgas_jax import baselines, export, network, supernet
from mgas_jax import genotype as genotype_lib
from mgas_jax.genotype import OpSpec

SEARCH = dict(init_channels=4, layers=3, steps=2)   # the super-net of configs/tiny.py


OPS = [(OpSpec(0, 0, "sep_conv_3x3", mid=2, out_index=(0, 3)), OpSpec(0, 1, "max_pool_3x3"),
        OpSpec(1, 2, "dil_conv_3x3")),
       (OpSpec(0, 1, "skip_connect"), OpSpec(1, 0, "avg_pool_3x3")),
       (OpSpec(0, 0, "sep_conv_5x5"), OpSpec(0, 1, "dil_conv_5x5", out_index=(1, 2, 5)),
        OpSpec(1, 2, "skip_connect"), OpSpec(1, 0, "sep_conv_3x3"))]


def _source(tmp_path, ops=OPS) -> str:
    """An export-format record of 3 cells (by default 3, 2, 4 ops; partial widths), all-ones masks."""
    full = supernet.full_cells(**SEARCH)
    cells = tuple(c.__class__(reduction=c.reduction, ops=o, width=c.width, steps=c.steps, concat=c.concat)
                  for c, o in zip(full, ops))
    record = dict(format=export.FORMAT, index=0, epoch=0, seed=0, config=dict(search=SEARCH), num_classes=10,
                  stem_channels=12, input_shape=[8, 8, 1], cells=genotype_lib.cells_to_json(cells),
                  val_accuracy=0.5, target=3000, budget="nonzero", masks="arch_3000.npz")
    masks = {p: np.ones(v.shape, np.uint8)
             for p, v in export._flat(export._network_shapes(record).get("masks", {})).items()}
    record["params"] = export.network_params(record, masks)
    export.write_once(str(tmp_path / "arch_3000.npz"), export.npz_bytes(masks))
    export.write_once(str(tmp_path / "arch_3000.json"), export.json_bytes(record))
    return str(tmp_path / "arch_3000.json")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _source(tmp_path_factory.mktemp("source"))


def test_parameter_split_matches_the_traced_network():
    full = supernet.full_cells(**SEARCH)
    rng = np.random.default_rng(0)
    for num_ops in (2, 5):
        cells = tuple(baselines.random_cell(rng, f, num_ops) for f in full)
        spec = network.NetworkSpec(cells=cells, num_classes=10, stem_channels=12, pool_bn=True, masked=True)
        shapes = jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                                                   train=False))
        fixed, masked = baselines.parameter_split(spec, (8, 8, 1))
        mask_sizes = sorted(int(np.prod(v.shape)) for v in export._flat(shapes["masks"]).values())
        assert sorted(masked) == mask_sizes
        assert fixed + sum(masked) == network.count_params(shapes["params"])["dense"]


def test_random_cells_are_valid_draws_of_the_space():
    full = supernet.full_cells(**SEARCH)[2]     # reduction cell, width 16, 2 nodes, 5 edges
    for seed in range(20):
        cell = baselines.random_cell(np.random.default_rng(seed), full, 3)
        assert len(cell.ops) == 3 and {o.node for o in cell.ops} == {0, 1}      # every node computed
        assert len({(o.node, o.src, o.op) for o in cell.ops}) == 3
        for o in cell.ops:
            if o.op.startswith(("sep", "dil")) or (o.op == "skip_connect" and o.src < 2):
                assert 1 <= len(o.out_index) <= 16 and list(o.out_index) == sorted(set(o.out_index))
            else:
                assert o.out_index is None
            assert (o.mid is not None) == o.op.startswith("sep")
        assert 1 <= len(cell.pre0_index) <= 16 and 1 <= len(cell.pre1_index) <= 16
    with pytest.raises(ValueError, match="at least one per node"):
        baselines.random_cell(np.random.default_rng(0), full, 1)


@pytest.mark.slow
def test_random_export_has_the_target_count_and_rebuilds(source, tmp_path):
    src = json.load(open(source))
    target = src["params"]["nonzero"] - 700
    path = baselines.random_export(source, str(tmp_path / "a"), seed=5, target=target)
    record, spec, masks = export.load_architecture(path)       # a valid export retraining can read
    assert record["params"]["nonzero"] == target
    assert export.rebuilt_params(spec, record["input_shape"], masks) == record["params"]
    assert [len(c.ops) for c in spec.cells] == [len(c["ops"]) for c in src["cells"]]
    assert [c.width for c in spec.cells] == [4, 8, 16]
    assert record["baseline"]["kind"] == "random" and record["baseline"]["draws"] >= 1
    assert record["target"] == 3000 and record["config"] == src["config"]

    # same seed: the same cells and masks (an equal file, so writing it again is accepted)
    again = baselines.random_export(source, str(tmp_path / "b"), seed=5, target=target)
    assert open(again, "rb").read() == open(path, "rb").read()
    assert baselines.random_export(source, str(tmp_path / "a"), seed=5, target=target) == path
    # other seeds: other cells (seed 1 at the default target, the source's own count)
    own = json.load(open(baselines.random_export(source, str(tmp_path / "s1"), seed=1)))
    assert own["params"]["nonzero"] == src["params"]["nonzero"]
    other = json.load(open(baselines.random_export(source, str(tmp_path / "s2"), seed=2, target=target)))
    assert len({json.dumps(c) for c in (record["cells"], own["cells"], other["cells"])}) == 3


def test_fixed_ratio_refuses_a_network_without_conv_kernels(tmp_path):
    """A small MGAS export can keep only pools and skips (normal cells' skips carry no conv): uniform
    weight pruning has nothing to prune there, and says so instead of failing on a missing collection."""
    pools = [(OpSpec(0, 1, "max_pool_3x3"), OpSpec(1, 2, "avg_pool_3x3")),
             (OpSpec(0, 1, "skip_connect"), OpSpec(1, 0, "avg_pool_3x3")),
             (OpSpec(0, 0, "max_pool_3x3"), OpSpec(1, 2, "skip_connect"))]
    (tmp_path / "src").mkdir()
    src = _source(tmp_path / "src", pools)
    with pytest.raises(export.ExportError, match="no conv kernel to prune"):
        baselines.fixed_ratio_export(src, str(tmp_path / "fixed"), seed=0, target=500)
    assert not os.path.exists(tmp_path / "fixed" / "arch_3000.json")


@pytest.mark.slow
def test_random_export_refuses_an_unreachable_target(source, tmp_path):
    with pytest.raises(export.ExportError, match="can be pruned to 50 non-zero"):
        baselines.random_export(source, str(tmp_path / "x"), seed=0, target=50, max_draws=20)
    no_search = json.load(open(source))
    no_search["config"] = {}
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(no_search))
    with pytest.raises(export.ExportError, match="no search config"):
        baselines.random_export(str(path), str(tmp_path / "y"), seed=0)
