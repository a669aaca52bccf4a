"""Reports of a run: cell drawings, sparsity per cell and granularity, accuracy versus parameters,
training curves, and a summary.md linking them (matplotlib's Agg canvas; no pyplot, no graphviz).

    paths = reports.write_reports(workdir)       # into workdir/report/

What it reads (each part is optional; what is missing is left out and said so in summary.md; the
layout is workdirs.py's):

    workdir/search/search_result.json, metrics.jsonl      the search: records, log, per-epoch metrics
    workdir/search/export/arch_<target>.{json,npz}         exported architectures
    workdir/retrain/<name>/architecture.{json,npz}         retrained architectures (retrain.py)
    workdir/retrain/<name>/results.json, metrics.jsonl     their test results and training curves
    workdir/evaluation.json                                mode=evaluate (params, FLOPs, throughput)

What it writes into workdir/report/:

    cells/<arch>_cell<i>.png      each cell as a graph: states, one arrow per op, labelled with the op and
                                  its channel widths (sep: inner/out, dil and FactorizedReduce: out)
    sparsity_<arch>.png           per cell, what is kept at each granularity (docs/method.md section 2):
                                  ops (of the 7 x edges candidates), filters (conv/preprocess output channels
                                  of the kept ops, of the super-net's full width), weights (non-zero of the
                                  kept kernels, from the masks)
    search_records.png            ops / filters / weights kept and non-zero params over the final-phase commits
    accuracy_vs_params.png        test top-1 of the retrained networks against their non-zero parameters
    curves_search.png             search loss, cross-entropy and accuracy per epoch, stages marked
    curves_retrain.png            retraining loss and top-1 per step (validation top-1 when there is one)
    summary.md                    a table (target, params dense / non-zero, FLOPs, test top-1) and the figures
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mgas_jax import genotype as genotype_lib
from mgas_jax import names
from mgas_jax import ops as ops_lib
from mgas_jax import supernet, workdirs

SHORT = {"skip_connect": "skip", "sep_conv_3x3": "sep3x3", "sep_conv_5x5": "sep5x5", "dil_conv_3x3": "dil3x3",
         "dil_conv_5x5": "dil5x5", "avg_pool_3x3": "avg3x3", "max_pool_3x3": "max3x3", "none": "none"}
COLORS = {"skip_connect": "#7f7f7f", "sep_conv_3x3": "#1f77b4", "sep_conv_5x5": "#17becf",
          "dil_conv_3x3": "#d62728", "dil_conv_5x5": "#ff7f0e", "avg_pool_3x3": "#2ca02c",
          "max_pool_3x3": "#9467bd", "none": "#000000"}
GRANULARITIES = ("ops", "filters", "weights")


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def read_jsonl(path: str) -> list[dict]:
    """The events of a metrics.jsonl ([] when the file is missing)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str) -> Optional[Any]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_record(json_path: str) -> tuple[dict, dict]:
    """(record, {kernel path: 0/1 array}) of an export-format JSON and its npz (no network is built)."""
    record = _read_json(json_path)
    with np.load(os.path.join(os.path.dirname(json_path), record["masks"])) as z:
        masks = {k: z[k] for k in z.files}
    return record, masks


# ---------------------------------------------------------------------------------------------------
# Cells as graphs

def op_label(cell: genotype_lib.CellSpec, o: genotype_lib.OpSpec) -> str:
    """'sep3x3 6/8' (inner / output channels), 'dil3x3 5', 'skip FR 8', 'skip', 'avg3x3'."""
    n_out = cell.width if o.out_index is None else len(o.out_index)
    name = SHORT.get(o.op, o.op)
    if o.op.startswith("sep_conv"):
        return f"{name} {cell.width if o.mid is None else o.mid}/{n_out}"
    if o.op.startswith("dil_conv"):
        return f"{name} {n_out}"
    if o.op == "skip_connect" and cell.reduction and o.src < 2:
        return f"skip FR {n_out}"
    return name


def _state_positions(steps: int) -> dict:
    """States on a zig-zag left to right: inputs at x = 0, node j at x = 1.5 (j + 1), the output last."""
    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for j in range(steps):
        pos[j + 2] = (1.5 * (j + 1), 0.55 if j % 2 == 0 else -0.55)
    pos["out"] = (1.5 * (steps + 1), 0.0)
    return pos


OPS_PER_LINE = 3  # op labels per line of the edge table


def _state_name(state) -> str:
    return {0: "c[k-2]", 1: "c[k-1]"}.get(state, f"node {state - 2}")


def draw_cell(cell: genotype_lib.CellSpec, path: str, title: str = "") -> str:
    """Draws one cell into `path` (PNG): its graph on the left, its ops edge by edge on the right.

    The graph has the two cell inputs (with their preprocess widths), the intermediate nodes and the
    concatenated output, one arrow per edge that kept ops (in the op's colour when it carries one,
    black and thicker when several). The table lists every such edge with its ops, labelled by
    op_label and coloured by op, OPS_PER_LINE to a line: a searched cell keeps up to 7 ops on an edge
    and dozens in all, which as labels on arrows would cover each other. The figure grows with the
    table's lines, so text keeps its size whatever the op count.
    """
    pos = _state_positions(cell.steps)
    edges: dict = {}
    for o in cell.ops:
        edges.setdefault((o.src, o.node + 2), []).append(o)
    order = sorted(edges, key=lambda e: (e[1], e[0]))
    lines = sum(-(-len(edges[e]) // OPS_PER_LINE) for e in order)
    line_h = 0.2  # inches per table line (7 pt text)
    graph_w, table_w = 1.6 + 1.5 * (cell.steps + 1), 1.4 + 1.05 * OPS_PER_LINE
    height = max(3.4, 0.9 + line_h * (lines + len(order) * 0.35))
    fig = Figure(figsize=(graph_w + table_w, height))
    ax = fig.add_axes([0.0, 0.0, graph_w / (graph_w + table_w), 0.9])
    ax.axis("off")
    pre = [cell.width if idx is None else len(idx) for idx in (cell.pre0_index, cell.pre1_index)]
    labels = {0: f"c[k-2]\npre0 {pre[0]}", 1: f"c[k-1]\npre1 {pre[1]}", "out": f"c[k]\n{cell.multiplier}x{cell.width}"}
    for j in range(cell.steps):
        labels[j + 2] = f"node {j}"
    for state, (x, y) in pos.items():
        color = "#e8f0fe" if state in (0, 1) else "#fde9d9" if state == "out" else "#fff7cc"
        ax.text(x, y, labels[state], ha="center", va="center", fontsize=7, zorder=3,
                bbox=dict(boxstyle="round,pad=0.35", fc=color, ec="black", lw=0.8))
    for (src, dst) in order:
        ops_on_edge = edges[(src, dst)]
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        span = dst - max(src, 1)
        rad = 0.0 if span <= 1 else 0.25 * (1 if (src + dst) % 2 else -1)
        color = COLORS.get(ops_on_edge[0].op, "black") if len(ops_on_edge) == 1 else "black"
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1), zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=0.8 + 0.35 * (len(ops_on_edge) - 1),
                                    connectionstyle=f"arc3,rad={rad}", shrinkA=13, shrinkB=13))
    for st in cell.concat:
        (x1, y1), (x2, y2) = pos[st], pos["out"]
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1), zorder=0,
                    arrowprops=dict(arrowstyle="-|>", color="#bbbbbb", lw=0.8, ls="--", shrinkA=10, shrinkB=13))
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(-1.9, 1.9)

    table = fig.add_axes([graph_w / (graph_w + table_w), 0.0, table_w / (graph_w + table_w), 0.9])
    table.axis("off")
    table.set_xlim(0, table_w)
    table.set_ylim(-(lines + len(order) * 0.35) * line_h, 0)
    y = -0.5 * line_h
    for (src, dst) in order:
        ops_on_edge = edges[(src, dst)]
        table.text(0.05, y, f"{_state_name(src)} \u2192 {dst - 2} ({len(ops_on_edge)})", fontsize=7,
                   va="center", ha="left", fontweight="bold")
        for k, o in enumerate(ops_on_edge):
            row, col = divmod(k, OPS_PER_LINE)
            table.text(1.4 + 1.05 * col, y - row * line_h, op_label(cell, o), fontsize=7, va="center", ha="left",
                       color=COLORS.get(o.op, "black"))
        y -= (-(-len(ops_on_edge) // OPS_PER_LINE) + 0.35) * line_h
    kind = "reduction" if cell.reduction else "normal"
    fig.suptitle(title or f"{kind} cell, width {cell.width}, {len(cell.ops)} ops", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Sparsity

def full_widths(record: dict) -> Optional[list[int]]:
    """Per cell, the super-net's width before filter pruning (from the record's search config), or None."""
    s = (record.get("config") or {}).get("search")
    if not s:
        return None
    try:
        cells = supernet.full_cells(int(s["init_channels"]), int(s["layers"]), int(s["steps"]))
    except (KeyError, TypeError, ValueError):
        return None
    if len(cells) != len(record["cells"]):
        return None
    return [c.width for c in cells]


def cell_sparsity(record: dict, masks: Mapping[str, np.ndarray]) -> list[dict]:
    """Per cell, kept and total units at each granularity.

    ops: kept ops / (7 candidate ops x edges). filters: output channels of the kept ops' pointwise convs
    (sep: inner + output) and FactorizedReduce skips, and of the two preprocess layers, over the same at
    the super-net's full width (so a narrower cell counts as pruned filters). weights: non-zero / all
    entries of the kept conv kernels' masks.
    """
    cells = genotype_lib.cells_from_json(record["cells"])
    widths = full_widths(record) or [c.width for c in cells]
    rows = []
    for i, c in enumerate(cells):
        full = widths[i]
        kept = total = 0
        for index in (c.pre0_index, c.pre1_index):
            kept += c.width if index is None else len(index)
            total += full
        for o in c.ops:
            n_out = c.width if o.out_index is None else len(o.out_index)
            if o.op.startswith("sep_conv"):
                kept += (c.width if o.mid is None else o.mid) + n_out
                total += 2 * full
            elif o.op.startswith("dil_conv") or (o.op == "skip_connect" and c.reduction and o.src < 2):
                kept += n_out
                total += full
        prefix = names.cell_name(i) + "/"
        w_kept = sum(int(np.count_nonzero(m)) for p, m in masks.items() if p.startswith(prefix))
        w_total = sum(int(np.size(m)) for p, m in masks.items() if p.startswith(prefix))
        rows.append(dict(cell=i, reduction=bool(c.reduction), width=c.width, full_width=full,
                         ops=len(c.ops), ops_total=len(ops_lib.OPS) * genotype_lib.num_edges(c.steps),
                         filters=kept, filters_total=total, weights=w_kept, weights_total=w_total))
    return rows


def plot_sparsity(rows: Sequence[dict], path: str, title: str = "") -> str:
    """One panel per granularity, one bar per cell: the fraction kept (reduction cells hatched)."""
    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3, sharey=True)
    x = np.arange(len(rows))
    for ax, g, color in zip(axes, GRANULARITIES, ("#1f77b4", "#ff7f0e", "#2ca02c")):
        frac = [r[g] / r[f"{g}_total"] if r[f"{g}_total"] else 0.0 for r in rows]
        bars = ax.bar(x, frac, color=color, edgecolor="black", lw=0.5)
        for b, r in zip(bars, rows):
            if r["reduction"]:
                b.set_hatch("//")
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02, f"{r[g]}/{r[g + '_total']}",
                    ha="center", va="bottom", fontsize=6, rotation=90 if len(rows) > 6 else 0)
        ax.set_xticks(x)
        ax.set_xticklabels([str(r["cell"]) for r in rows], fontsize=7)
        ax.set_xlabel("cell (hatched: reduction)")
        ax.set_title(f"{g} kept", fontsize=9)
        ax.set_ylim(0, 1.25)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fraction kept")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_search_records(records: Sequence[dict], path: str) -> Optional[str]:
    """Units kept at each granularity and non-zero parameters over the final-phase commits."""
    if not records:
        return None
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    x = [r["epoch"] for r in records]
    first_ops = max(records[0]["counts"]["ops"], 1)
    series = {"ops (of the first record)": [r["counts"]["ops"] / first_ops for r in records],
              "filters": [r["counts"]["filters"] / max(r["counts"]["filters_total"], 1) for r in records],
              "weights": [r["counts"]["weights"] / max(r["counts"]["weights_total"], 1) for r in records]}
    for label, y in series.items():
        ax.plot(x, y, marker="o", ms=3, label=label)
    ax.set_xlabel("search epoch (final-phase commits)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 6.5 ticks
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    ax2.plot(x, [r["params"]["nonzero"] for r in records], color="black", ls="--", marker="x", ms=3,
             label="non-zero params")
    ax2.set_ylabel("non-zero params")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Accuracy versus parameters

def plot_accuracy_vs_params(series: Mapping[str, Sequence[dict]], path: str, title: str = "") -> str:
    """Test top-1 against non-zero parameters, one line per series.

    Args:
      series: {label: [{'params': x, 'top1': y, 'top1_std': optional error bar, 'label': optional point
        label}, ...]}; points are sorted by params.
      path: the PNG to write.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    xs = []
    for label, points in series.items():
        pts = sorted((p for p in points if p.get("top1") is not None), key=lambda p: p["params"])
        if not pts:
            continue
        x = [p["params"] for p in pts]
        y = [100 * p["top1"] for p in pts]
        err = [100 * p.get("top1_std", 0.0) or 0.0 for p in pts]
        ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=label)
        for p, xi, yi in zip(pts, x, y):
            if p.get("label"):
                ax.annotate(p["label"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6)
        xs += x
    if xs and max(xs) > 5 * max(min(xs), 1):
        ax.set_xscale("log")
    ax.set_xlabel("non-zero parameters (auxiliary head excluded)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    ax.set_title(title or "accuracy versus parameters", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Training curves

def plot_search_curves(events: Sequence[dict], path: str) -> Optional[str]:
    """Loss, cross-entropy (and lambda x R_op) and accuracy per search epoch; stage starts marked."""
    rows = [e for e in events if e.get("split") == "search"]
    if not rows:
        return None
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    x = [e["step"] for e in rows]
    for key, style in (("loss", "-"), ("ce", "--"), ("reg", ":")):
        if key in rows[0]:
            ax1.plot(x, [e[key] for e in rows], style, label=key)
    ax2.plot(x, [e.get("accuracy", np.nan) for e in rows], label="training accuracy")
    for ax in (ax1, ax2):
        last = None
        for e in rows:
            if e.get("stage") != last:
                last = e.get("stage")
                ax.axvline(e["step"] - 0.5, color="grey", lw=0.6, ls=":")
                ax.text(e["step"] - 0.4, 1.0, "final" if last == 4 else f"stage {last}", fontsize=6,
                        transform=ax.get_xaxis_transform(), va="top")
        ax.set_xlabel("search epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("loss")
    ax1.set_yscale("symlog", linthresh=1.0)
    ax2.set_ylabel("accuracy")
    return _save(fig, path)


def plot_retrain_curves(runs: Mapping[str, Sequence[dict]], path: str) -> Optional[str]:
    """Training loss and top-1 per step for each retraining (validation top-1 dashed, when logged)."""
    runs = {k: v for k, v in runs.items() if any(e.get("split") == "train" for e in v)}
    if not runs:
        return None
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for name, events in runs.items():
        tr = [e for e in events if e.get("split") == "train"]
        line, = ax1.plot([e["step"] for e in tr], [e["loss"] for e in tr], label=name)
        ax2.plot([e["step"] for e in tr], [e["top1"] for e in tr], color=line.get_color(), label=f"{name} train")
        val = [e for e in events if e.get("split") == "val" and "top1" in e]
        if val:
            ax2.plot([e["step"] for e in val], [e["top1"] for e in val], "--", color=line.get_color(),
                     label=f"{name} val")
    ax1.set_ylabel("training loss")
    ax2.set_ylabel("top-1")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# The report

def _fmt(x, spec: str = ",") -> str:
    return "-" if x is None else format(x, spec)


def table_rows(workdir: str, records: Mapping[str, dict]) -> list[dict]:
    """One row per architecture: target, params, FLOPs, test accuracy, throughput (from what exists)."""
    evaluation = (_read_json(os.path.join(workdir, workdirs.EVALUATION)) or {}).get("models", {})
    rows = []
    for name, record in records.items():
        results = _read_json(os.path.join(workdirs.retrain_dir(workdir, name), workdirs.RESULTS)) or {}
        ev = evaluation.get(name) or {}
        test = ev.get("test") or results.get("test") or {}
        flops = ev.get("flops") or results.get("flops") or {}
        rows.append(dict(name=name, target=record.get("target"), params_dense=record["params"]["dense"],
                         params_nonzero=record["params"]["nonzero"], flops_dense=flops.get("dense"),
                         flops_nonzero=flops.get("nonzero"), top1=test.get("top1"), top5=test.get("top5"),
                         images_per_s=(ev.get("throughput") or {}).get("images_per_s"),
                         epochs=results.get("epochs")))
    rows.sort(key=lambda r: -(r["target"] or r["params_nonzero"]))
    return rows


def write_summary(path: str, rows: Sequence[dict], figures: Mapping[str, Any], notes: Iterable[str]) -> str:
    """summary.md: the table and links to the figures (paths relative to the report directory)."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(path))
    lines = ["# MGAS run report", "",
             "Parameters exclude the auxiliary head; non-zero = after the fixed weight masks. FLOPs are "
             "multiply-adds per image (convolutions and the classifier).", "",
             "| architecture | target | params dense | params non-zero | FLOPs dense | FLOPs non-zero | "
             "test top-1 | test top-5 | images/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"
        lines.append(f"| {r['name']} | {_fmt(r['target'])} | {_fmt(r['params_dense'])} | {_fmt(r['params_nonzero'])} "
                     f"| {_fmt(r['flops_dense'])} | {_fmt(r['flops_nonzero'])} | {pct(r['top1'])} | {pct(r['top5'])} "
                     f"| {_fmt(r['images_per_s'], ',.0f')} |")
    if not rows:
        lines.append("| (no architecture found) | | | | | | | | |")
    lines.append("")
    for title, key in (("Accuracy versus parameters", "accuracy_vs_params"), ("Search", "curves_search"),
                       ("Final-phase records", "search_records"), ("Retraining", "curves_retrain")):
        if figures.get(key):
            lines += [f"## {title}", "", f"![{title}]({rel(figures[key])})", ""]
    for name, fig in figures.get("architectures", {}).items():
        lines += [f"## {name}", "", f"![sparsity of {name}]({rel(fig['sparsity'])})", ""]
        lines += [" ".join(f"[cell {i}]({rel(p)})" for i, p in enumerate(fig["cells"])), ""]
        lines += [f"![{name} cell {i}]({rel(p)})" for i, p in enumerate(fig["cells"])] + [""]
    notes = list(notes)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def write_reports(workdir: str, out_dir: Optional[str] = None) -> dict:
    """Writes every figure and summary.md into `out_dir` (default workdir/report); returns their paths.

    Returns:
      {'summary': path, 'accuracy_vs_params', 'curves_search', 'search_records', 'curves_retrain': path or
       None, 'architectures': {name: {'sparsity': path, 'cells': [paths]}}, 'notes': [...]}.
    """
    workdir = os.path.abspath(workdir)
    out_dir = workdirs.report_dir(workdir) if out_dir is None else out_dir
    os.makedirs(out_dir, exist_ok=True)
    notes = []
    figures: dict[str, Any] = {"architectures": {}}

    records = {}
    for name, path in workdirs.architectures(workdir).items():
        record, masks = load_record(path)
        records[name] = record
        cells = genotype_lib.cells_from_json(record["cells"])
        cell_paths = [draw_cell(c, os.path.join(out_dir, "cells", f"{name}_cell{i}.png"),
                                f"{name} cell {i} ({'reduction' if c.reduction else 'normal'}, width {c.width}, "
                                f"{len(c.ops)} ops)") for i, c in enumerate(cells)]
        sparsity = plot_sparsity(cell_sparsity(record, masks), os.path.join(out_dir, f"sparsity_{name}.png"),
                                 f"{name}: {record['params']['nonzero']:,} non-zero / {record['params']['dense']:,} "
                                 f"dense params")
        figures["architectures"][name] = {"sparsity": sparsity, "cells": cell_paths}
    if not records:
        notes.append("no exported or retrained architecture found")

    rows = table_rows(workdir, records)
    points = [dict(params=r["params_nonzero"], top1=r["top1"], label=r["name"]) for r in rows if r["top1"] is not None]
    figures["accuracy_vs_params"] = plot_accuracy_vs_params({"MGAS": points},
                                                            os.path.join(out_dir, "accuracy_vs_params.png")) \
        if points else None
    if not points:
        notes.append("no retrained network yet: no accuracy-versus-parameters curve")

    search_dir = workdirs.search_dir(workdir)
    result = _read_json(os.path.join(search_dir, workdirs.SEARCH_RESULT)) or {}
    figures["search_records"] = plot_search_records(result.get("records", []),
                                                    os.path.join(out_dir, "search_records.png"))
    figures["curves_search"] = plot_search_curves(read_jsonl(os.path.join(search_dir, workdirs.METRICS)),
                                                  os.path.join(out_dir, "curves_search.png"))
    if figures["curves_search"] is None:
        notes.append("no search metrics (search/metrics.jsonl)")
    for target, v in (result.get("summary") or {}).items():
        if "error" in v:
            notes.append(f"target {target}: {v['error']}")
    runs = {os.path.basename(os.path.dirname(p)): read_jsonl(p)
            for p in sorted(glob.glob(os.path.join(workdirs.retrain_dir(workdir), "*", workdirs.METRICS)))}
    figures["curves_retrain"] = plot_retrain_curves(runs, os.path.join(out_dir, "curves_retrain.png"))

    summary = write_summary(os.path.join(out_dir, "summary.md"), rows, figures, notes)
    return dict(figures, summary=summary, notes=notes)
