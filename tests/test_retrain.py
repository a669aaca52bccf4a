"""Retraining exported architectures (retrain.py), their evaluation, and the baselines (baselines.py).

The session's tiny search and its mode=all run (conftest.py: `searched`, `tiny_all`) give the 100k
export and its retraining of 1 epoch of 2 steps.
Covers: pruned weights are exactly zero after retraining (read back from the checkpoint) and the
checkpoint's masks are the export's; the rebuilt network has exactly the recorded parameter counts (every
final-phase record), and a record that disagrees is refused naming both; a rerun resumes to the same
numbers; FLOPs of derived cells with inner widths (mid) and partial outputs (out_index), by hand; the
fixed-ratio baseline matches the MGAS export's non-zero count with one uniform keep ratio.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mgas_jax import baselines, evaluation, export, network, parallel, retrain
from mgas_jax import config as config_lib
from mgas_jax.genotype import CellSpec, OpSpec
from tiny_runs import short_config as tiny_config


# The tiny 1,000 export's own count (~740) lies below the parameters its full-width cells hold outside the
# prunable kernels (~1,350), so the fixed-ratio baseline of it is made at this count instead.
FIXED_TARGET = 2000


@pytest.fixture
def retrained(tiny_all):
    """(export path, retraining directory, its results.json) of mode=all's retraining."""
    workdir = tiny_all[0]
    run_dir = workdir / "retrain" / "arch_1000"
    results = json.loads((run_dir / "results.json").read_text())
    return results["architecture"]["path"], str(run_dir), results


def test_pruned_weights_stay_exactly_zero(tiny_all, retrained):
    workdir = tiny_all[0]
    path, run_dir, results = retrained
    config = tiny_config()
    [model] = evaluation.find_models(config, str(workdir))
    assert model.run_dir == run_dir and model.name == "arch_1000"
    spec = evaluation.model_spec(model, evaluation.run_config(run_dir), 10)
    state, meta = evaluation.restore(model, spec, (8, 8, 1), parallel.make_mesh())
    assert int(state.step) == results["steps"] == 2 and meta["epoch"] == 1
    params = traverse_util.flatten_dict(jax.device_get(state.params))
    masks = traverse_util.flatten_dict(jax.device_get(state.masks))
    exported = traverse_util.flatten_dict(model.masks)
    assert set(masks) == set(exported) and masks
    pruned = 0
    for p, m in masks.items():
        np.testing.assert_array_equal(m, exported[p])      # the masks never changed
        assert np.all(params[p][m == 0] == 0.0), p          # exactly zero, not small
        pruned += int(np.sum(m == 0))
    assert pruned > 0, "the tiny search pruned no weight: the test would prove nothing"
    # the unpruned weights did train
    assert any(np.any(params[p][m == 1] != 0) for p, m in masks.items())


def test_rebuilt_networks_have_the_recorded_parameter_counts(searched, retrained):
    _, result = searched
    config = tiny_config()
    assert result["records"]
    for rec in result["records"]:  # every final-phase commit, with and without the auxiliary head
        record, spec, masks = export.load_architecture(rec["path"])
        for aux in (False, True):
            config.model.auxiliary = aux
            spec = export.retraining_spec(config, record)
            assert export.rebuilt_params(spec, record["input_shape"], masks) == record["params"]
    path, _, results = retrained
    with open(path) as f:
        record = json.load(f)
    assert results["params"] == record["params"]
    assert results["architecture"]["params"] == record["params"]
    assert 0 < results["flops"]["nonzero"] < results["flops"]["dense"]
    assert 0.0 <= results["test"]["top1"] <= results["test"]["top5"] <= 1.0


def test_a_record_that_disagrees_is_refused_naming_both(searched, tmp_path):
    _, result = searched
    src = result["summary"]["1000"]["path"]
    with open(src) as f:
        record = json.load(f)
    shutil.copy(os.path.join(os.path.dirname(src), record["masks"]), tmp_path / record["masks"])
    true_nonzero = record["params"]["nonzero"]
    record["params"]["nonzero"] = true_nonzero + 7
    bad = tmp_path / "arch_1000.json"
    bad.write_text(json.dumps(record))
    with pytest.raises(export.ExportError) as e:
        retrain.retrain_architecture(tiny_config(), str(bad), str(tmp_path / "retrain"))
    assert f"{true_nonzero} non-zero" in str(e.value) and f"{true_nonzero + 7} non-zero" in str(e.value)
    assert not (tmp_path / "retrain" / "checkpoints").exists()  # refused before any training


def test_rerun_resumes_to_the_same_results(retrained, tmp_path):
    path, run_dir, first = retrained
    rerun = tmp_path / "arch_1000"   # a copy: the shared retraining stays as mode=all left it
    shutil.copytree(run_dir, rerun)
    again = retrain.retrain_architecture(tiny_config(), path, str(rerun))
    assert again["test"] == first["test"] and again["steps"] == first["steps"]
    assert again["flops"] == first["flops"] and again["params"] == first["params"]


def test_a_moved_study_resumes_its_retrainings(tiny_all, retrained, tmp_path):
    """The copied record's "source" names where the export was; after the search and retraining
    directories move together, the same architecture from its new place resumes instead of being refused."""
    workdir = tiny_all[0]
    path, run_dir, first = retrained
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    new_path = os.path.join(moved, os.path.relpath(path, workdir))
    new_run = os.path.join(moved, os.path.relpath(run_dir, workdir))
    again = retrain.retrain_architecture(tiny_config(), new_path, new_run)
    assert again["test"] == first["test"] and again["steps"] == first["steps"]
    # a fixed-ratio baseline made from the moved export is the one made before the move
    before = baselines.fixed_ratio_export(path, str(tmp_path / "fixed"), target=FIXED_TARGET)
    shutil.copytree(tmp_path / "fixed", moved / "fixed")
    after = baselines.fixed_ratio_export(new_path, str(moved / "fixed"), target=FIXED_TARGET)
    assert export.load_architecture(after)[0]["params"] == export.load_architecture(before)[0]["params"]
    # but a different architecture in that workdir is still refused
    other = tmp_path / "other"
    other.mkdir()
    with open(new_path) as f:
        record = json.load(f)
    shutil.copy(os.path.join(os.path.dirname(new_path), record["masks"]), other / record["masks"])
    record["target"] = record["target"] + 1  # another record, same network
    (other / "arch_1000.json").write_text(json.dumps(record))
    with pytest.raises(export.ExportError, match="already retrains another architecture"):
        retrain.retrain_architecture(tiny_config(), str(other / "arch_1000.json"), new_run)


# ---------------------------------------------------------------------------------------------------
# FLOPs of derived MGAS cells (hand-computed)

def derived_spec():
    """A normal cell with a narrowed sep_conv (mid 3, 2 output channels), a one-channel dil_conv and a
    narrowed pre1, then a reduction cell with a FactorizedReduce skip writing channels (0, 3) and a
    sep_conv of inner width 2; 4x4x1 inputs, stem of 2 channels."""
    normal = CellSpec(reduction=False, width=4, steps=1, concat=(2,), pre1_index=(0, 1, 3), ops=(
        OpSpec(0, 0, "dil_conv_3x3", out_index=(1,)),
        OpSpec(0, 0, "avg_pool_3x3"),
        OpSpec(0, 1, "sep_conv_3x3", mid=3, out_index=(0, 2)),
        OpSpec(0, 1, "skip_connect")))
    reduce = CellSpec(reduction=True, width=4, steps=1, concat=(2,), ops=(
        OpSpec(0, 0, "sep_conv_3x3", mid=2),
        OpSpec(0, 1, "skip_connect", out_index=(0, 3))))
    return network.NetworkSpec(cells=(normal, reduce), num_classes=10, stem_channels=2, pool_bn=True, masked=True)


def test_flops_of_derived_cells_with_mid_and_out_index():
    spec = derived_spec()
    # multiply-adds = kernel entries x output positions; 16 positions at 4x4, 4 after the reduction
    stem = 3 * 3 * 1 * 2 * 16
    cell0 = (1 * 1 * 2 * 4 * 16                  # pre0: 2 -> 4
             + 1 * 1 * 2 * 3 * 16                # pre1: 2 -> 3 kept channels
             + 3 * 3 * 4 * 16 + 4 * 1 * 16       # dil: depthwise on 4, pointwise 4 -> 1
             + 3 * 3 * 4 * 16 + 4 * 3 * 16       # sep unit 1: depthwise on 4, pointwise 4 -> mid 3
             + 3 * 3 * 3 * 16 + 3 * 2 * 16)      # sep unit 2: depthwise on 3, pointwise 3 -> 2
    cell1 = (1 * 1 * 2 * 4 * 16                  # pre0 (after a normal cell: conv) on the stem's 2 channels
             + 1 * 1 * 4 * 4 * 16                # pre1 on cell 0's 1 x 4 channels
             + 3 * 3 * 4 * 4 + 4 * 2 * 4         # sep (stride 2): depthwise 4, pointwise 4 -> 2
             + 3 * 3 * 2 * 4 + 2 * 4 * 4         # depthwise 2, pointwise 2 -> 4
             + 4 * 1 * 4 + 4 * 1 * 4)            # FactorizedReduce: one channel (0) from conv1, one (3) from conv2
    classifier = 4 * 10
    assert network.count_flops(spec, (4, 4, 1)) == stem + cell0 + cell1 + classifier == 3184

    # The layer list agrees with the network that is actually built.
    shapes = jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)),
                                                               train=False))
    params = traverse_util.flatten_dict(shapes["params"])
    for path, shape, _ in network.conv_shapes(spec, (4, 4, 1)):
        assert params[path].shape == shape, path

    masks = {p: np.ones(v.shape, np.float32) for p, v in traverse_util.flatten_dict(shapes["masks"]).items()}
    masks[("cell_0", "op_0_1_sep_conv_3x3", "sep", "unit1", "pw", "kernel")].reshape(-1)[:5] = 0   # 5 x 16
    masks[("cell_1", "op_0_0_sep_conv_3x3", "sep", "unit1", "dw", "kernel")].reshape(-1)[:3] = 0   # 3 x 4
    nested = traverse_util.unflatten_dict(masks)
    assert network.count_flops(spec, (4, 4, 1), nested) == 3184 - 5 * 16 - 3 * 4
    assert export.flops(spec, (4, 4, 1), nested) == {"dense": 3184, "nonzero": 3184 - 92}


# ---------------------------------------------------------------------------------------------------
# Baselines

def test_uniform_keep_counts():
    assert baselines.uniform_keep_counts([10, 10, 20], 20) == [5, 5, 10]
    counts = baselines.uniform_keep_counts([9, 36, 100, 7], 50)
    assert sum(counts) == 50 and all(1 <= c <= n for c, n in zip(counts, [9, 36, 100, 7]))
    ratio = 50 / 152
    assert all(abs(c - ratio * n) <= 1.0 + 1e-9 for c, n in zip(counts, [9, 36, 100, 7]))
    assert baselines.uniform_keep_counts([3, 4], 7) == [3, 4]
    # one large kernel among small ones keeps its own share (shares of budget - layers in proportion to
    # size - 1 kept 153 of its 160 here)
    sizes = [400] + [16] * 20
    counts = baselines.uniform_keep_counts(sizes, 288)
    assert sum(counts) == 288 and counts[0] == 160
    assert all(abs(c - 0.4 * n) < 1 for c, n in zip(counts, sizes))
    # a quota below one weight still keeps one, taken from the layer most over its quota
    assert baselines.uniform_keep_counts([1000, 2, 2], 100) == [98, 1, 1]
    with pytest.raises(ValueError):
        baselines.uniform_keep_counts([3, 4], 1)


def test_fixed_ratio_baseline_matches_the_mgas_count(searched, tmp_path):
    _, result = searched
    src = result["summary"]["1000"]["path"]
    source, _, _ = export.load_architecture(src)
    # its own count is out of the baseline's reach (below what the full-width cells hold outside the
    # prunable kernels): refused, naming why
    with pytest.raises(export.ExportError, match=f"cannot have {source['params']['nonzero']} non-zero"):
        baselines.fixed_ratio_export(src, str(tmp_path / "own"), seed=3)
    path = baselines.fixed_ratio_export(src, str(tmp_path / "fixed"), target=FIXED_TARGET, seed=3)
    assert os.path.basename(path) == "arch_1000.json"
    record, spec, masks = export.load_architecture(path)   # a valid export: masks fit its network
    assert record["params"]["nonzero"] == FIXED_TARGET
    assert export.rebuilt_params(spec, record["input_shape"], masks) == record["params"]
    # same ops, every filter back: widths of the super-net (C = 4, doubled at each reduction)
    assert [len(c["ops"]) for c in record["cells"]] == [len(c["ops"]) for c in source["cells"]]
    assert [c.width for c in spec.cells] == [4, 8, 16]
    assert all(o.mid is None and o.out_index is None for c in spec.cells for o in c.ops)
    # one keep ratio for every masked kernel (to within one weight)
    r = record["baseline"]["keep_ratio"]
    for p, m in traverse_util.flatten_dict(masks).items():
        assert abs(m.sum() - r * m.size) <= 1.0 + 1e-6, p
    assert record["baseline"]["kind"] == "fixed_ratio" and "fresh" in record["baseline"]["magnitudes"]
    # deterministic, and written once
    assert baselines.fixed_ratio_export(src, str(tmp_path / "fixed"), target=FIXED_TARGET, seed=3) == path
    with pytest.raises(export.ExportError, match="never overwritten"):
        baselines.fixed_ratio_export(src, str(tmp_path / "fixed"), target=FIXED_TARGET, seed=4)
    with pytest.raises(export.ExportError, match="cannot have 10 non-zero"):
        baselines.fixed_ratio_export(src, str(tmp_path / "small"), target=10)


def test_op_level_config():
    config = tiny_config()
    op = baselines.op_level_config(config)
    assert (op.search.filter_level, op.search.weight_level) == (False, False)
    assert (config.search.filter_level, config.search.weight_level) == (True, True)
    config_lib.validate(op)
