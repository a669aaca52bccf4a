"""A small study: MGAS at several target sizes against both baselines, over several seeds.

For each seed: an MGAS search (exports at config.export.targets), an operation-level-only search
(baselines.op_level_config, exports at the same targets), and for every MGAS export a fixed-ratio
baseline (the same ops at full filter width, uniformly magnitude-pruned to the same non-zero parameter
count; magnitudes of a freshly initialised network, see baselines.py). Every exported network is then
retrained from scratch with the config's train.* protocol and tested. Output in --out:

    seed_<s>/<method>/search/     mgas and oplevel searches (resumable)
    seed_<s>/fixed_ratio/export/  the fixed-ratio exports
    seed_<s>/<method>/retrain/<arch_target>/  each retraining (resumable)
    study.json, study.md          per (method, target): seeds, params (dense, non-zero), test top-1 mean and std
    accuracy_vs_params.png        test top-1 against non-zero params, one line per method, std as error bars

Run it again with the same flags and it resumes (searches and retrainings continue from their checkpoints;
a finished one is only re-tested). A search workdir is tied to the whole config: change search or train
settings and use another --out.

On digits (the default; configs/digits.py), full settings, 3 seeds: 2 searches + 3 x 3 retrainings (15
epochs) per seed; tens of minutes per seed on a laptop CPU, dominated by XLA compilation:

    python experiments/digits_study.py --out=/tmp/digits_study

A reduced run that proves the pipeline end to end (1 seed; the tiny super-net of configs/tiny.py, whose
strong penalty prunes within a dozen steps; 4 retraining epochs of 25 steps; ~20-30 minutes on a busy
2-core CPU, nearly all of it XLA compilation):

    python experiments/digits_study.py --config=configs/tiny.py --out=/tmp/study_tiny --seeds=0 \\
        "--config.export.targets=(20000,1000)" --config.train.epochs=4 --config.train.steps_per_epoch=25

(--search_epochs_scale shortens a search, but only a schedule that still prunes yields exports at the
targets: configs/digits.py with a 0.25 scale ends its stages before its gentle penalty removes anything.)

Full-scale reproduction (CIFAR-10, configs/cifar10.py; data prepared with TFDS):

    python experiments/digits_study.py --config=configs/cifar10.py --out=/data/c10_study

Expected cost of the full-scale run (estimates, one modern GPU; not measured here): each search on the
8-cell C=24 super-net at evaluation size is a multi-stage run of a few hundred epochs on 45k images,
of the order of 1 GPU-day (by the ratios of section 7 of docs/method.md, comparable to 2nd-order DARTS'
1 GPU-day and well above PC-DARTS' 0.1); each retraining is 600 epochs of batch 96 on 50k images, about
0.5-1 GPU-day for a 0.3-0.7 M parameter network. With 3 targets x 3 methods x 3 seeds = 27 retrainings and
6 searches: roughly 20-35 GPU-days in all. Searches and retrainings are independent jobs; run them on
separate machines by pointing several invocations at the same --out with different --seeds / --methods.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from mgas_jax import baselines, export, modes, reports, retrain, search, workdirs  # noqa: E402
from mgas_jax import checkpoint as checkpoint_lib  # noqa: E402
from mgas_jax import config as config_lib  # noqa: E402

METHODS = ("mgas", "oplevel", "fixed_ratio")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "digits.py"),
                                "Config file (configs/*.py); its search.*, train.*, export.targets drive the study.",
                                lock_config=True)
flags.DEFINE_string("out", None, "Output directory (resumable).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each runs every method (search and retraining seeds).")
flags.DEFINE_list("methods", list(METHODS), "Subset of mgas, oplevel, fixed_ratio (fixed_ratio needs mgas).")
flags.DEFINE_float("search_epochs_scale", 1.0,
                   "Scales search.warmup_epochs, max_stage_epochs and final_max_epochs (at least 1 each).")
flags.mark_flags_as_required(["out"])


def scale_search_epochs(config, scale: float):
    """A copy of config with the search's epoch budgets multiplied by `scale` (each at least 1)."""
    config = config.copy_and_resolve_references()
    if scale != 1.0:
        for key in ("warmup_epochs", "max_stage_epochs", "final_max_epochs"):
            value = config.search[key]
            if value > 0:
                config.search[key] = max(1, int(round(value * scale)))
    return config


def seed_config(config, seed: int):
    config = config.copy_and_resolve_references()
    config.seed = seed
    return config


def _exports(summary: dict) -> dict:
    """{target: export JSON path} of a search summary, skipping targets it could not reach."""
    return {int(t): v["path"] for t, v in summary.items() if "path" in v}


def run_seed(config, seed: int, root: str, methods) -> tuple[list, list]:
    """Searches, baselines and retrainings of one seed; returns (runs, missing)."""
    runs, missing = [], []
    config = seed_config(config, seed)
    base = os.path.join(root, f"seed_{seed}")
    exports: dict = {}
    if "mgas" in methods or "fixed_ratio" in methods:
        exports["mgas"] = search.search(config, os.path.join(base, "mgas", "search"))["summary"]
    if "oplevel" in methods:
        try:
            exports["oplevel"] = search.search(baselines.op_level_config(config),
                                               os.path.join(base, "oplevel", "search"))["summary"]
        except export.ExportError as e:  # a search that cannot record its architectures: say so, go on
            logging.error("the operation-level search of seed %d failed: %s", seed, e)
            exports["oplevel"] = {str(t): dict(error=f"the op-level search failed: {e}") for t in config.export.targets}
    if "fixed_ratio" in methods:
        # the baseline prunes the MGAS export of the same budget; without one there is nothing to match
        fixed = {str(t): dict(error="no MGAS export at this budget to match") for t in config.export.targets}
        for target, path in _exports(exports["mgas"]).items():
            try:
                fixed[str(target)] = dict(path=baselines.fixed_ratio_export(
                    path, os.path.join(base, "fixed_ratio", "export"), seed=seed))
            except export.ExportError as e:
                fixed[str(target)] = dict(error=str(e))
        exports["fixed_ratio"] = fixed
    for method in methods:
        for target in config.export.targets:
            entry = exports[method].get(str(target), {"error": "not exported"})
            if "path" not in entry:
                missing.append(dict(method=method, seed=seed, target=int(target), error=entry["error"]))
                logging.warning("%s seed %d target %d: %s", method, seed, target, entry["error"])
                continue
            name = workdirs.architecture_name(entry["path"])
            r = retrain.retrain_architecture(config, entry["path"], os.path.join(base, method, "retrain", name))
            runs.append(dict(method=method, seed=seed, target=int(target), params=r["params"], flops=r["flops"],
                             top1=r["test"]["top1"], top5=r["test"]["top5"], path=entry["path"]))
    return runs, missing


def aggregate(runs: list) -> list[dict]:
    """Per (method, target): seeds, mean params, test top-1 mean and std (ddof 1; 0 for one seed)."""
    rows = []
    for method in METHODS:
        for target in sorted({r["target"] for r in runs if r["method"] == method}, reverse=True):
            group = [r for r in runs if r["method"] == method and r["target"] == target]
            top1 = np.asarray([r["top1"] for r in group])
            rows.append(dict(method=method, target=target, seeds=len(group),
                             params_nonzero=float(np.mean([r["params"]["nonzero"] for r in group])),
                             params_dense=float(np.mean([r["params"]["dense"] for r in group])),
                             flops_nonzero=float(np.mean([r["flops"]["nonzero"] for r in group])),
                             top1_mean=float(top1.mean()), top1_std=float(top1.std(ddof=1)) if len(group) > 1 else 0.0))
    return rows


def markdown(rows: list, missing: list, command: str) -> str:
    lines = ["# MGAS versus baselines", "", f"`{command}`", "",
             "| method | target | seeds | params non-zero | params dense | FLOPs non-zero | test top-1 (%) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target']:,} | {r['seeds']} | {r['params_nonzero']:,.0f} | "
                     f"{r['params_dense']:,.0f} | {r['flops_nonzero']:,.0f} | "
                     f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} |")
    if missing:
        lines += ["", "Not run (no architecture at that budget, or its baseline could not be built):", ""]
        lines += [f"- {m['method']} seed {m['seed']} target {m['target']}: {m['error']}" for m in missing]
    lines += ["", "![accuracy versus parameters](accuracy_vs_params.png)", ""]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    checkpoint_lib.quiet_orbax_logs()
    methods = [m for m in METHODS if m in FLAGS.methods]
    unknown = set(FLAGS.methods) - set(METHODS)
    if unknown:
        raise app.UsageError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    config = scale_search_epochs(FLAGS.config, FLAGS.search_epochs_scale)
    config_lib.validate(config)
    out = os.path.abspath(FLAGS.out)
    os.makedirs(out, exist_ok=True)
    # One cache for the whole study: a rerun or a resumed study loads its programs instead of compiling,
    # and the searches of every seed start from the same super-net structure.
    modes.setup_compilation_cache(config, out)
    modes.setup_host_memory(config)
    runs, missing = [], []
    for seed in [int(s) for s in FLAGS.seeds]:
        r, m = run_seed(config, seed, out, methods)
        runs += r
        missing += m
    rows = aggregate(runs)
    command = " ".join(["python"] + sys.argv)
    export.write_json(os.path.join(out, "study.json"), dict(command=command, methods=methods, seeds=FLAGS.seeds,
                                                            table=rows, runs=runs, missing=missing))
    with open(os.path.join(out, "study.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, missing, command))
    series = {m: [dict(params=r["params_nonzero"], top1=r["top1_mean"], top1_std=r["top1_std"],
                       label=f"{r['target']:,}") for r in rows if r["method"] == m] for m in methods}
    reports.plot_accuracy_vs_params({k: v for k, v in series.items() if v},
                                    os.path.join(out, "accuracy_vs_params.png"),
                                    f"{config.data.name}: {len(FLAGS.seeds)} seed(s)")
    print(markdown(rows, missing, command))


if __name__ == "__main__":
    app.run(main)
