"""The export files (mgas_jax.export) on hand-made records, no search: the records of a small super-net
whose committed masks are set by hand are written, exported at parameter budgets and loaded back.

Covers: a loaded record rebuilds a network with exactly its recorded counts; each budget exports the
largest record within it, and an unreachable one is reported; a moved records directory still exports;
an export is never overwritten with other content (provenance aside); masks that do not fit the network,
and files that are not MGAS records, are refused naming the problem; both search kinds (with and without
the weight level) record a mask for every kernel.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgas_jax import export, network, ops, supernet
from mgas_jax.genotype import OpSpec

INPUT = (8, 8, 1)
STEM = 6
# a few ops of each kind keep the super-net small: its variable shapes take seconds, not a minute
KINDS = ("skip_connect", "sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3")
REMOVED = OpSpec(0, 0, "sep_conv_3x3")   # committed off in cell 0 by the second record
ZEROED = 5                               # weights committed off in cell 2 by the second record


def small_spec(**kwargs) -> supernet.SuperNetSpec:
    """3 cells (normal, reduction, reduction) of 1 node, widths 2, 4, 8, the ops of KINDS on both edges."""
    cells = tuple(dataclasses.replace(c, ops=tuple(o for o in c.ops if o.op in KINDS))
                  for c in supernet.full_cells(2, 3, steps=1))
    return supernet.SuperNetSpec(cells, num_classes=10, stem_channels=STEM, impl="lax", **kwargs)


def committed_masks(spec) -> dict:
    """The super-net's `masks` collection with nothing committed off (every entry 1), as numpy."""
    x = jnp.zeros((1,) + INPUT)
    shapes = jax.eval_shape(lambda: supernet.SuperNet(spec).init(jax.random.key(0, impl="rbg"), x, train=False))
    return jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes["masks"])


def write(directory, spec, masks, index) -> dict:
    """make_record + write_record, and the summary a search keeps of it (search.record_commit's)."""
    rec = export.make_record(spec, masks, INPUT, index=index, epoch=index, config={"hand": "made"}, seed=0,
                             val_accuracy=0.5, stem_channels=STEM)
    path = export.write_record(str(directory), rec, export.derived_masks(masks, rec))
    return dict(index=rec["index"], path=path, params=rec["params"], counts=rec["counts"])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """(records directory, [the full super-net's record, a record with REMOVED off and ZEROED weights off])."""
    directory = tmp_path_factory.mktemp("records")
    spec = small_spec()
    masks = committed_masks(spec)
    full = write(directory, spec, masks, 0)
    masks["cell_0"]["ops"][REMOVED.edge, ops.OPS.index(REMOVED.op)] = 0.0
    flat = jax.tree_util.tree_flatten_with_path(masks["cell_2"])[0]
    kernel = next(leaf for path, leaf in flat if "dil_conv" in jax.tree_util.keystr(path)
                  and jax.tree_util.keystr(path).endswith("['kernel']"))
    kernel.reshape(-1)[:ZEROED] = 0.0
    pruned = write(directory, spec, masks, 1)
    return directory, [full, pruned]


def rebuilt_counts(record, spec, masks) -> dict:
    x = np.zeros((1,) + tuple(record["input_shape"]), np.float32)
    variables = jax.eval_shape(lambda: network.Network(spec).init(jax.random.key(0), x, train=False))
    return network.count_params(variables["params"], masks)


def test_records_rebuild_with_their_recorded_counts(records):
    _, (full, pruned) = records
    loaded = [export.load_architecture(r["path"]) for r in (full, pruned)]
    for (record, spec, masks), summary in zip(loaded, (full, pruned)):
        assert record["format"] == export.FORMAT and record["params"] == summary["params"]
        assert rebuilt_counts(record, spec, masks) == record["params"]
    (_, full_spec, _), (pruned_record, pruned_spec, _) = loaded
    assert full["params"]["dense"] == full["params"]["nonzero"]          # nothing committed off
    assert REMOVED in full_spec.cells[0].ops and REMOVED not in pruned_spec.cells[0].ops
    assert [len(c.ops) for c in pruned_spec.cells] == [len(c.ops) - (i == 0) for i, c in enumerate(full_spec.cells)]
    assert pruned["params"]["dense"] < full["params"]["dense"]
    assert pruned["params"]["dense"] - pruned["params"]["nonzero"] == ZEROED
    assert pruned["counts"]["ops"] == full["counts"]["ops"] - 1
    assert pruned["counts"]["weights"] < pruned["counts"]["weights_total"]
    assert pruned_record["masks"] == "commit_001.npz"


def test_each_budget_exports_the_largest_record_within_it(records, tmp_path):
    directory, (full, pruned) = records
    big = full["params"]["nonzero"]
    targets = [big, big - 1, 10]
    summary = export.export_targets(str(directory), [full, pruned], targets, str(tmp_path / "export"))
    assert summary[str(big)]["index"] == 0 and summary[str(big - 1)]["index"] == 1
    assert summary[str(big - 1)]["params"] == pruned["params"]
    # 10 parameters: below both records, reported with the smallest size and the fix, not faked
    assert set(summary["10"]) == {"error"} and "<= 10 " in summary["10"]["error"]
    assert f"smallest: {pruned['params']['nonzero']}" in summary["10"]["error"]
    assert sorted(os.listdir(tmp_path / "export")) == sorted(f"arch_{t}.{e}" for t in targets[:2] for e in ("json", "npz"))
    record, _, masks = export.load_architecture(summary[str(big - 1)]["path"])
    assert (record["target"], record["budget"], record["masks"]) == (big - 1, "nonzero", f"arch_{big - 1}.npz")
    assert record["cells"] == json.load(open(pruned["path"]))["cells"]
    # exporting again finds the same files
    assert export.export_targets(str(directory), [full, pruned], targets, str(tmp_path / "export")) == summary


def test_a_moved_records_directory_still_exports(records, tmp_path):
    """Records store absolute paths; exporting reads them from the records directory it is given."""
    directory, (full, pruned) = records
    moved = tmp_path / "moved_records"
    shutil.copytree(directory, moved)
    stale = [dict(r, path=os.path.join("/nonexistent/old/workdir/records", os.path.basename(r["path"])))
             for r in (full, pruned)]
    target = pruned["params"]["nonzero"]
    summary = export.export_targets(str(moved), stale, [target], str(tmp_path / "export"))
    assert summary[str(target)]["params"] == pruned["params"]
    with open(summary[str(target)]["path"]) as f, open(pruned["path"]) as g:
        assert json.load(f)["cells"] == json.load(g)["cells"]


def test_an_export_is_never_overwritten_with_other_content(tmp_path):
    path = str(tmp_path / "arch_5.json")
    record = {"format": export.FORMAT, "cells": [], "source": "/old/place/arch_5.json",
              "baseline": {"kind": "fixed_ratio", "source": "/old/place/x.json"}}
    export.write_once(path, export.json_bytes(record))
    before = open(path, "rb").read()
    export.write_once(path, before)   # the same content: nothing to do
    # provenance (where the record was made from) is not content: a moved study rewrites it
    moved = dict(record, source="/new/place/arch_5.json", baseline=dict(record["baseline"], source="/new/x.json"))
    export.write_once(path, export.json_bytes(moved))
    assert open(path, "rb").read() == before
    for other in (dict(record, cells=[{"reduction": False}]), dict(record, baseline={"kind": "other"})):
        with pytest.raises(export.ExportError, match="never overwritten"):
            export.write_once(path, export.json_bytes(other))
        assert open(path, "rb").read() == before
    npz = str(tmp_path / "arch_5.npz")
    export.write_once(npz, export.npz_bytes({"a": np.ones(3)}))
    with pytest.raises(export.ExportError, match="never overwritten"):
        export.write_once(npz, export.npz_bytes({"a": np.zeros(3)}))
    assert sorted(os.listdir(tmp_path)) == ["arch_5.json", "arch_5.npz"]   # no temporary file left


def test_masks_must_fit_the_network(records, tmp_path):
    _, (_, pruned) = records
    rec = json.load(open(pruned["path"]))
    shutil.copy(pruned["path"], tmp_path / "a.json")
    npz = tmp_path / rec["masks"]
    shutil.copy(os.path.join(os.path.dirname(pruned["path"]), rec["masks"]), npz)
    export.load_architecture(str(tmp_path / "a.json"))  # a faithful copy loads
    with np.load(npz) as z:
        masks = {k: z[k] for k in z.files}
    key = sorted(masks)[0]
    wrong = dict(masks, **{key: np.ones(masks[key].shape[:-1] + (masks[key].shape[-1] + 1,), np.uint8)})
    extra = dict(masks, **{"cell_9/op_0_0_sep_conv_3x3/kernel": np.ones(3, np.uint8)})
    missing = {k: v for k, v in masks.items() if k != key}
    for arrays, message in ((wrong, "wrong shape"), (extra, "the network does not have"), (missing, "no mask for")):
        np.savez(npz, **arrays)
        with pytest.raises(export.ExportError, match=message):
            export.load_architecture(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(export.ExportError, match="not an MGAS architecture"):
        export.load_architecture(str(tmp_path / "b.json"))
    (tmp_path / "c.json").write_text('{"format": ')
    with pytest.raises(export.ExportError, match="cannot read the architecture"):
        export.load_architecture(str(tmp_path / "c.json"))


@pytest.mark.slow
@pytest.mark.parametrize("weight_level", [True, False])
def test_records_of_both_search_kinds_have_a_mask_for_every_kernel(weight_level):
    """The op-level baseline (weight_level False) has no weight masks: its records get all-ones masks,
    so that retraining reads them like any export; with the weight level the masks are the search's."""
    # every op kind, one node per cell
    spec = supernet.SuperNetSpec(supernet.full_cells(2, 3, steps=1), num_classes=10, stem_channels=STEM,
                                 impl="lax", filter_level=weight_level, weight_level=weight_level)
    masks = committed_masks(spec)
    rec = export.make_record(spec, masks, INPUT, index=0, epoch=0, config={}, seed=0,
                             val_accuracy=float("nan"), stem_channels=STEM)
    flat = export.derived_masks(masks, rec, weight_level=weight_level)
    kernels = [p for p in flat if "/dw/" in p or "/pw/" in p or p.endswith("/kernel")]
    assert kernels and all(np.all(np.asarray(flat[p]) == 1) for p in kernels)  # nothing pruned yet
    assert rec["params"]["nonzero"] == rec["params"]["dense"] > 0
    export.check_masks(export._network_shapes(rec)["masks"], flat, where="the test record")
