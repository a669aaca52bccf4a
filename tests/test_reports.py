"""mode=all end to end on configs/tiny.py (search -> retrain 1 epoch of 2 steps -> evaluate -> reports),
mode=evaluate on an untrained export, and the report pieces on hand-made inputs.

The mode=all run is the session's (conftest.py's `tiny_all`), on a copy of the session's finished search.
"""
import json
import os
import shutil

import numpy as np
import pytest
from matplotlib import image as mpimg

from mgas_jax import config as config_lib
from mgas_jax import evaluation, modes, reports
from mgas_jax.genotype import CellSpec, OpSpec, cells_to_json
from tiny_runs import short_config as tiny_config


def assert_png(path):
    assert os.path.isfile(path), path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50, (path, img.shape)
    assert img.std() > 0.01, f"{path} is blank"


def test_mode_all_validates_its_config_once(tiny_all):
    """modes.run validates; the search, each retraining and training, and the evaluation it calls do not."""
    workdir, _, validations = tiny_all
    assert validations == ["all"]
    # each entry point called on its own still validates its config, once
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_lib, "validate", lambda config, **kw: calls.append(1))
        with pytest.raises(FileNotFoundError):
            evaluation.evaluate(tiny_config("evaluate"), str(workdir / "nothing_here"))
        assert calls == [1]
        # and a config changed after the run's validation is checked again inside the run
        config = tiny_config("evaluate")
        with config_lib.validated(config):
            config.evaluate.throughput_steps = 3
            with pytest.raises(FileNotFoundError):
                evaluation.evaluate(config, str(workdir / "nothing_here"))
        assert calls == [1, 1, 1]


def test_all_mode_end_to_end(tiny_all):
    workdir, result, _ = tiny_all
    # search
    small = str(min(tiny_config("all").export.targets))  # below anything 3 tiny cells reach
    assert "path" in result["search"]["1000"] and "error" in result["search"][small]
    assert os.path.isfile(workdir / "search" / "search_result.json")
    # retraining of the one reachable target, from scratch, with the short protocol
    results = json.loads((workdir / "retrain" / "arch_1000" / "results.json").read_text())
    assert results["epochs"] == 1 and results["steps"] == 2
    record = json.loads((workdir / "search" / "export" / "arch_1000.json").read_text())
    assert results["params"] == record["params"]
    assert (workdir / "retrain" / "arch_1000" / "architecture.npz").is_file()
    # evaluation of its checkpoint
    ev = json.loads((workdir / "evaluation.json").read_text())["models"]["arch_1000"]
    assert ev["trained"] and ev["epoch"] == 1
    assert ev["test"]["top1"] == pytest.approx(results["test"]["top1"], abs=1e-6)
    assert ev["params"] == record["params"] and ev["flops"] == results["flops"]
    assert ev["throughput"]["images_per_s"] > 0 and ev["throughput"]["batch_size"] == 16
    # reports
    report = workdir / "report"
    for name in ("accuracy_vs_params.png", "curves_search.png", "curves_retrain.png", "search_records.png",
                 "sparsity_arch_1000.png"):
        assert_png(str(report / name))
    for i in range(3):
        assert_png(str(report / "cells" / f"arch_1000_cell{i}.png"))
    summary = (report / "summary.md").read_text()
    assert "| arch_1000 | 1,000 |" in summary
    assert f"{record['params']['nonzero']:,}" in summary and f"{100 * results['test']['top1']:.2f} %" in summary
    for link in ("accuracy_vs_params.png", "sparsity_arch_1000.png", "cells/arch_1000_cell0.png"):
        assert f"]({link})" in summary
    assert f"target {small}:" in summary  # the unreachable target is reported, not hidden
    assert os.path.isfile(workdir / "all_result.json")


def test_evaluate_an_untrained_export(tiny_all, tmp_path):
    workdir, _, _ = tiny_all
    shutil.copytree(workdir / "search" / "export", tmp_path / "search" / "export")
    config = tiny_config("evaluate")
    result = modes.run(config, str(tmp_path))
    ev = result["models"]["arch_1000"]
    record = json.loads((tmp_path / "search" / "export" / "arch_1000.json").read_text())
    assert not ev["trained"] and ev["test"] is None
    assert ev["params"] == record["params"] and ev["flops"]["nonzero"] <= ev["flops"]["dense"]
    assert json.loads((tmp_path / "evaluation.json").read_text())["models"]["arch_1000"]["trained"] is False
    config.export.architecture = "arch_777"
    with pytest.raises(FileNotFoundError, match="arch_1000.json"):
        evaluation.evaluate(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# Pieces, on hand-made inputs

CELL = CellSpec(reduction=True, width=6, steps=2, concat=(2, 3), pre0_index=(0, 1, 2, 4), ops=(
    OpSpec(0, 0, "sep_conv_3x3", mid=4, out_index=(0, 1, 3)),
    OpSpec(0, 0, "max_pool_3x3"),
    OpSpec(0, 1, "skip_connect", out_index=(0, 5)),
    OpSpec(1, 1, "dil_conv_5x5"),
    OpSpec(1, 2, "avg_pool_3x3"),
    OpSpec(1, 0, "sep_conv_5x5")))


def test_op_labels_show_widths():
    labels = [reports.op_label(CELL, o) for o in CELL.ops]
    assert labels == ["sep3x3 4/3", "max3x3", "skip FR 2", "dil5x5 6", "avg3x3", "sep5x5 6/6"]


def test_cell_sparsity_by_hand():
    record = {"cells": cells_to_json([CELL]), "config": {"search": {"init_channels": 4, "layers": 3, "steps": 2}}}
    masks = {"cell_0/op_0_0_sep_conv_3x3/sep/unit1/dw/kernel": np.array([1, 0, 0, 1]),
             "cell_0/op_1_1_dil_conv_5x5/dil/unit/pw/kernel": np.ones(6),
             "cell_1/x/kernel": np.zeros(100)}
    # the record names one cell but a 3-cell search: no full widths, each cell's own width is used
    [row] = reports.cell_sparsity(record, masks)
    assert row["ops"] == 6 and row["ops_total"] == 7 * 5
    # pre 4 + 6, sep3 4 + 3, skip FR 2, dil 6, sep5 6 + 6 of 6 + 6 + 12 + 6 + 6 + 12
    assert (row["filters"], row["filters_total"]) == (37, 48)
    assert (row["weights"], row["weights_total"]) == (8, 10)


def test_figures_and_summary_render(tmp_path):
    assert_png(reports.draw_cell(CELL, str(tmp_path / "cell.png")))
    rows = [dict(cell=0, reduction=False, ops=3, ops_total=14, filters=10, filters_total=20, weights=5,
                 weights_total=50), dict(cell=1, reduction=True, ops=1, ops_total=14, filters=2, filters_total=40,
                                         weights=0, weights_total=0)]
    assert_png(reports.plot_sparsity(rows, str(tmp_path / "sparsity.png"), "t"))
    series = {"MGAS": [dict(params=1000, top1=0.9, top1_std=0.01, label="a"), dict(params=500, top1=0.8)],
              "fixed": [dict(params=1000, top1=0.85)]}
    assert_png(reports.plot_accuracy_vs_params(series, str(tmp_path / "acc.png")))
    events = [dict(step=s, epoch=s, split="search", loss=2.0 / s, ce=1.5 / s, reg=0.1, accuracy=0.1 * s,
                   stage=1 if s < 3 else 4) for s in range(1, 6)]
    assert_png(reports.plot_search_curves(events, str(tmp_path / "search.png")))
    runs = {"a": [dict(step=s, split="train", loss=1.0 / s, top1=0.1 * s) for s in range(1, 4)]
            + [dict(step=3, split="val", top1=0.2)]}
    assert_png(reports.plot_retrain_curves(runs, str(tmp_path / "retrain.png")))
    assert reports.plot_retrain_curves({}, str(tmp_path / "none.png")) is None
    # a workdir with nothing in it still gets a summary that says so
    out = reports.write_reports(str(tmp_path / "empty"))
    text = open(out["summary"]).read()
    assert "no exported or retrained architecture" in text and "no search metrics" in text


def overlapping_texts(fig):
    """Pairs of visible, non-empty texts of `fig` whose drawn boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(fig).get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def test_a_large_cell_stays_readable(tmp_path, monkeypatch):
    """29 ops in a 4-node cell (issue 18): every label is drawn, no two texts cover each other, the
    font keeps its size and the figure grows with the op count."""
    import dataclasses

    from mgas_jax import supernet

    full = supernet.full_cells(16, 8, 4)[2]
    keep = sorted(np.random.default_rng(0).choice(len(full.ops), 29, replace=False))
    big = dataclasses.replace(full, ops=tuple(full.ops[i] for i in keep))
    figures = []
    monkeypatch.setattr(reports, "_save", lambda fig, path: figures.append(fig) or path)
    reports.draw_cell(big, str(tmp_path / "big.png"))
    reports.draw_cell(CELL, str(tmp_path / "small.png"))
    fig, small = figures
    labels = [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]
    for o in big.ops:
        assert reports.op_label(big, o) in labels
    assert overlapping_texts(fig) == []
    assert min(t.get_fontsize() for ax in fig.axes for t in ax.texts) >= 7
    assert fig.get_size_inches()[1] > small.get_size_inches()[1]
    monkeypatch.undo()
    assert_png(reports.draw_cell(big, str(tmp_path / "big.png")))


def test_search_records_ticks_are_whole_epochs(tmp_path, monkeypatch):
    records = [dict(epoch=e, counts=dict(ops=10 - e, filters=20, filters_total=40, weights=50, weights_total=99),
                    params=dict(nonzero=1000 - 10 * e)) for e in (7, 8)]
    figures = []
    monkeypatch.setattr(reports, "_save", lambda fig, path: figures.append(fig) or path)
    reports.plot_search_records(records, str(tmp_path / "r.png"))
    ax = figures[0].axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
