"""A paired study: MGAS against three baselines at equal size, over k-fold splits x seeds x budgets.

The question: at equal size, are MGAS's networks more accurate than those of simpler searches? Every
comparison is paired on one unit, (repetition, fold, seed): the same split, the same seed, and for the
pruned baselines the same exported size. Per unit:

- an MGAS search (exports at --budgets) and an operation-level-only search (baselines.op_level_config; its
  exports land where op removal alone takes them, so it is paired on the budget, not on the exact size);
- per MGAS export, the fixed-ratio baseline (the same ops at full width, uniformly magnitude-pruned to
  exactly MGAS's non-zero count) and the random architecture (cells drawn from the same search space,
  pruned to exactly that count; baselines.random_export);
- every export retrained from scratch with the config's train.* protocol and tested on the unit's fold.

With --folds=k (default 3) every one of digits' 1,797 images is tested exactly once per repetition
(data.folds, splits.stratified_folds; the search's validation split is carved from the training folds);
--folds=0 is the fixed 80/20 split of the earlier study. Output in --out:

    rep_<r>/fold_<f>/seed_<s>/<method>/search/     searches (resumable); with --folds=0: seed_<s>/...
    rep_<r>/fold_<f>/seed_<s>/<baseline>/export/   fixed-ratio and random exports
    rep_<r>/fold_<f>/seed_<s>/<method>/retrain/<arch_target>/   each retraining (resumable)
    study.json, study.md    per (method, budget): mean test top-1 with its 95 % t and bootstrap intervals;
                            per budget and baseline: the paired difference MGAS - baseline with both
                            intervals and a verdict (MGAS better / worse / no detectable difference,
                            from whether the t interval excludes 0); every run with its unit
    accuracy_vs_params.png  test top-1 against non-zero parameters, every method and budget, 95 % intervals

--docs=DIR also copies study.json, study.md and the plot there (e.g. docs/digits_kfold; docs/digits_study
holds the earlier fixed-split study). The same command again resumes (searches and retrainings continue
from their checkpoints; a finished one is only re-tested).
A search workdir is tied to the whole config: change search or train settings and use another --out.

    python experiments/digits_study.py --out=/tmp/digits_study --dry_run     # the runs and their cost
    python experiments/digits_study.py --out=/tmp/digits_study --docs=docs/digits_kfold

Defaults: 3 folds x 1 repetition x seed 0 = 3 units (each with its own split), 4 methods; 6 searches and
36 retrainings, about 1.2 hours by --dry_run's estimate. Budgets 10,000, 5,000 and 2,500 non-zero
parameters, in the capacity-limited regime of issue 16 (at 20k-60k every method reaches 98-99 % on
digits, one test image apart), confirmed by a first sweep: the retrained accuracy at 10k is 94-99 %, at
5k 62-95 %, at 2.5k 47-68 % (docs/digits_kfold). The operation-level search cannot go below 6.6k-12.2k
on this super-net (it stops with one op per node), so it has no export at 5k and 2.5k and reached 10k on
one fold of three: its entries there are reported as missing. The cost printed by --dry_run multiplies
the run counts by --search_minutes and --retrain_minutes, measured on this 2-core CPU (with the study's
compilation cache warm after the first unit); shrink --folds, --seeds or --budgets (and say so) to keep
the study near 2 hours, never the protocol silently; more seeds (--seeds=1 as a second job sharing
--out) narrow the intervals at the cost of another full set of runs each.

Runs are independent jobs: several invocations may share one --out with different --seeds, --fold_list
or --methods (fixed_ratio and random need mgas's exports).

Full-scale reproduction (CIFAR-10, configs/cifar10.py, data prepared with TFDS; its test split is fixed):

    python experiments/digits_study.py --config=configs/cifar10.py --folds=0 --seeds=0,1,2 \
        --budgets=700000,500000,300000 --out=/data/c10_study

Expected cost (estimates, one modern GPU; not measured here): each search on the 8-cell C=24 super-net is a
multi-stage run of a few hundred epochs on 45k images, of the order of 1 GPU-day (by the ratios of section 7
of docs/method.md, comparable to 2nd-order DARTS' 1 GPU-day); each retraining is 600 epochs of batch 96 on
50k images, about 0.5-1 GPU-day for a 0.3-0.7 M parameter network. 3 budgets x 4 methods x 3 seeds = 36
retrainings and 6 searches: roughly 25-45 GPU-days in all, as independent jobs on separate machines.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from mgas_jax import baselines, export, stats  # noqa: E402

METHODS = ("mgas", "oplevel", "fixed_ratio", "random")
SEARCHED = ("mgas", "oplevel")          # methods that run a search of their own
MATCHED = ("fixed_ratio", "random")     # methods built from MGAS's export of the same unit and budget
DEFAULT_BUDGETS = ("10000", "5000", "2500")
OUTPUTS = ("study.json", "study.md", "accuracy_vs_params.png")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The study's command-line flags, defined when it runs as a script: importing the module (the tests
    do) must not register flags such as --config, which mgas_jax.main defines too."""
    config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "digits.py"),
                                    "Config file (configs/*.py); its search.* and train.* drive the study.",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "Output directory (resumable).")
    flags.DEFINE_string("docs", None, "Also copy study.json, study.md and the plot into this directory.")
    flags.DEFINE_list("seeds", ["0"], "Seeds; each runs every method on every fold (search and retraining seeds).")
    flags.DEFINE_integer("folds", 3, "k of the stratified k-fold split of digits (0: the fixed 80/20 split).")
    flags.DEFINE_list("fold_list", [], "Run only these folds (default all); for splitting a study into jobs.")
    flags.DEFINE_integer("repeats", 1, "Repetitions of the k-fold split (each a new assignment of images to folds).")
    flags.DEFINE_list("budgets", list(DEFAULT_BUDGETS), "Non-zero parameter budgets (the searches' export.targets).")
    flags.DEFINE_list("methods", list(METHODS), f"Subset of {', '.join(METHODS)} (fixed_ratio and random need mgas).")
    flags.DEFINE_float("search_epochs_scale", 1.0,
                       "Scales search.warmup_epochs, max_stage_epochs and final_max_epochs (at least 1 each).")
    flags.DEFINE_bool("dry_run", False, "List the runs and their estimated cost; run nothing.")
    flags.DEFINE_float("search_minutes", 6.0, "--dry_run: minutes per search on this machine (measured: a digits "
                       "search took 5-7 min in the study of docs/digits_kfold, its compilation cache warm after the first unit).")
    flags.DEFINE_float("retrain_minutes", 1.0, "--dry_run: minutes per retraining on this machine (measured in "
                       "the study of docs/digits_kfold: about 1 min each, two jobs sharing the 2 cores).")
    flags.DEFINE_integer("resamples", 10_000, "Bootstrap resamples of each interval.")
    flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the bootstrap resampling.")
    flags.mark_flags_as_required(["out"])


# --------------------------------------------------------------------------------------------------
# The plan: units x budgets x methods

def units(folds: int, repeats: int, seeds, fold_list=()) -> list[dict]:
    """Every (repeat, fold, seed) unit; fold None (and repeat 0) for the fixed split (folds = 0)."""
    if folds == 0:
        return [dict(repeat=0, fold=None, seed=int(s)) for s in seeds]
    chosen = [int(f) for f in fold_list] if fold_list else list(range(folds))
    bad = [f for f in chosen if not 0 <= f < folds]
    if bad:
        raise ValueError(f"--fold_list {bad}: folds are 0..{folds - 1}")
    return [dict(repeat=r, fold=f, seed=int(s)) for r in range(repeats) for f in chosen for s in seeds]


def unit_key(unit: dict) -> tuple:
    return (unit["repeat"], -1 if unit["fold"] is None else unit["fold"], unit["seed"])


def unit_name(unit: dict) -> str:
    if unit["fold"] is None:
        return f"seed {unit['seed']}"
    return f"rep {unit['repeat']} fold {unit['fold']} seed {unit['seed']}"


def unit_dir(root: str, unit: dict) -> str:
    """The unit's directory; the fixed split keeps the earlier study's seed_<s> layout, so it resumes."""
    if unit["fold"] is None:
        return os.path.join(root, f"seed_{unit['seed']}")
    return os.path.join(root, f"rep_{unit['repeat']}", f"fold_{unit['fold']}", f"seed_{unit['seed']}")


def plan(unit_list: list[dict], budgets, methods) -> dict:
    """{'searches': [(unit, method)], 'exports': [(unit, budget, method)], 'retrainings': [(unit, budget, method)]}."""
    searches = [(u, m) for u in unit_list for m in SEARCHED if m in methods or (m == "mgas" and set(MATCHED) & set(methods))]
    exports = [(u, int(b), m) for u in unit_list for b in budgets for m in MATCHED if m in methods]
    retrainings = [(u, int(b), m) for u in unit_list for b in budgets for m in methods]
    return dict(searches=searches, exports=exports, retrainings=retrainings)


def describe_plan(p: dict, *, search_minutes: float, retrain_minutes: float) -> str:
    """One line per retraining (unit, budget, method), then the counts and the estimated wall time."""
    lines = [f"{unit_name(u)}  budget {b:,}  {m}" for u, b, m in p["retrainings"]]
    minutes = len(p["searches"]) * search_minutes + len(p["retrainings"]) * retrain_minutes
    lines += ["", f"{len(p['searches'])} searches x {search_minutes:g} min + {len(p['retrainings'])} retrainings "
                  f"x {retrain_minutes:g} min (+ {len(p['exports'])} baseline exports, seconds each) = "
                  f"{minutes:.0f} min ({minutes / 60:.1f} h) estimated"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running one unit

def scale_search_epochs(config, scale: float):
    """A copy of config with the search's epoch budgets multiplied by `scale` (each at least 1)."""
    config = config.copy_and_resolve_references()
    if scale != 1.0:
        for key in ("warmup_epochs", "max_stage_epochs", "final_max_epochs"):
            value = config.search[key]
            if value > 0:
                config.search[key] = max(1, int(round(value * scale)))
    return config


def unit_config(config, unit: dict, folds: int):
    """The config of one unit: its seed and, with folds, its split of the data."""
    config = config.copy_and_resolve_references()
    config.seed = unit["seed"]
    config.data.folds = folds
    config.data.fold = 0 if unit["fold"] is None else unit["fold"]
    config.data.fold_repeat = unit["repeat"]
    return config


def _exports(summary: dict) -> dict:
    """{target: export JSON path} of a search summary, skipping targets it could not reach."""
    return {int(t): v["path"] for t, v in summary.items() if "path" in v}


def _matched_exports(method: str, mgas_summary: dict, targets, out_dir: str, seed) -> dict:
    """The fixed-ratio or random baseline of every MGAS export: {str(target): {'path'} or {'error'}}."""
    build = dict(fixed_ratio=baselines.fixed_ratio_export, random=baselines.random_export)[method]
    out = {str(t): dict(error="no MGAS export at this budget to match") for t in targets}
    for target, path in _exports(mgas_summary).items():
        try:
            out[str(target)] = dict(path=build(path, out_dir, seed=seed))
        except export.ExportError as e:
            out[str(target)] = dict(error=str(e))
    return out


def run_unit(config, unit: dict, root: str, methods, folds: int) -> tuple[list, list]:
    """Searches, baselines and retrainings of one unit; returns (runs, missing)."""
    from mgas_jax import retrain, search, workdirs  # here, not at the top: --dry_run and the tests need no JAX setup
    runs, missing = [], []
    config = unit_config(config, unit, folds)
    base = unit_dir(root, unit)
    tag = dict(repeat=unit["repeat"], fold=unit["fold"], seed=unit["seed"])
    exports: dict = {}
    if "mgas" in methods or set(MATCHED) & set(methods):
        exports["mgas"] = search.search(config, os.path.join(base, "mgas", "search"))["summary"]
    if "oplevel" in methods:
        try:
            exports["oplevel"] = search.search(baselines.op_level_config(config),
                                               os.path.join(base, "oplevel", "search"))["summary"]
        except export.ExportError as e:  # a search that cannot record its architectures: say so, go on
            logging.error("the operation-level search of %s failed: %s", unit_name(unit), e)
            exports["oplevel"] = {str(t): dict(error=f"the op-level search failed: {e}") for t in config.export.targets}
    for method in MATCHED:
        if method in methods:
            # the random draw belongs to the whole unit, so two folds with one seed draw different cells
            seed = unit["seed"] if method == "fixed_ratio" else [unit["seed"], unit["repeat"], unit["fold"] or 0]
            exports[method] = _matched_exports(method, exports["mgas"], config.export.targets,
                                               os.path.join(base, method, "export"), seed)
    for method in methods:
        for target in config.export.targets:
            entry = exports[method].get(str(target), {"error": "not exported"})
            if "path" not in entry:
                missing.append(dict(tag, method=method, target=int(target), error=entry["error"]))
                logging.warning("%s %s target %d: %s", method, unit_name(unit), target, entry["error"])
                continue
            name = workdirs.architecture_name(entry["path"])
            r = retrain.retrain_architecture(config, entry["path"], os.path.join(base, method, "retrain", name))
            with open(entry["path"]) as f:
                val_accuracy = json.load(f).get("val_accuracy")  # the search's own, None for the pruned baselines
            runs.append(dict(tag, method=method, target=int(target), params=r["params"], flops=r["flops"],
                             top1=r["test"]["top1"], top5=r["test"]["top5"], val_accuracy=val_accuracy,
                             path=entry["path"]))
    return runs, missing


# --------------------------------------------------------------------------------------------------
# Aggregation (pure: tested on hand-made runs)

def _interval(iv: stats.Interval) -> dict:
    return dict(mean=iv.mean, low=None if np.isnan(iv.low) else iv.low, high=None if np.isnan(iv.high) else iv.high)


def aggregate(runs: list, *, methods=METHODS, resamples: int = 10_000, seed: int = 0) -> dict:
    """The study's table, paired differences and verdicts from its runs.

    Args:
      runs: dicts with method, repeat, fold, seed, target, params {'dense', 'nonzero'}, flops {'nonzero'}, top1.
      methods: the order of the table's methods; 'mgas' is the one each baseline is paired with.
    Returns:
      {'table': per (method, target) n, mean params and FLOPs, top1 mean, std, 't' and 'bootstrap' intervals;
       'paired': per (target, baseline) pairs, MGAS's and the baseline's mean non-zero params on them, the mean
       difference MGAS - baseline with 't' and 'bootstrap' intervals, the verdict, units only one side has;
       'verdicts': per target one line over every baseline}
    """
    table = []
    targets = sorted({r["target"] for r in runs}, reverse=True)
    by = {(m, t): [r for r in runs if r["method"] == m and r["target"] == t] for m in methods for t in targets}
    for m in methods:
        for t in targets:
            group = by[(m, t)]
            if not group:
                continue
            top1 = [r["top1"] for r in group]
            table.append(dict(method=m, target=t, n=len(group),
                              params_nonzero=float(np.mean([r["params"]["nonzero"] for r in group])),
                              params_dense=float(np.mean([r["params"]["dense"] for r in group])),
                              flops_nonzero=float(np.mean([r["flops"]["nonzero"] for r in group])),
                              top1_mean=float(np.mean(top1)),
                              top1_std=float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0,
                              t=_interval(stats.mean_interval(top1)),
                              bootstrap=_interval(stats.bootstrap_interval(top1, seed=seed, resamples=resamples))))
    paired, verdicts = [], []
    for t in targets:
        mgas = {unit_key(r): r for r in by.get(("mgas", t), [])}
        parts = []
        for b in methods:
            other = {unit_key(r): r for r in by.get((b, t), [])}
            if b == "mgas" or not mgas or not other or not set(mgas) & set(other):
                continue
            d = stats.paired_difference({k: r["top1"] for k, r in mgas.items()},
                                        {k: r["top1"] for k, r in other.items()}, seed=seed, resamples=resamples)
            v = stats.verdict(d.t, "MGAS")
            paired.append(dict(target=t, baseline=b, pairs=len(d.units),
                               params_mgas=float(np.mean([mgas[k]["params"]["nonzero"] for k in d.units])),
                               params_baseline=float(np.mean([other[k]["params"]["nonzero"] for k in d.units])),
                               t=_interval(d.t), bootstrap=_interval(d.bootstrap), verdict=v,
                               only_mgas=[list(k) for k in d.only_a], only_baseline=[list(k) for k in d.only_b]))
            parts.append(f"vs {b}: {v} ({_pp(d.t)}, {len(d.units)} pairs)")
        if parts:
            verdicts.append(f"budget {t:,}: " + "; ".join(parts))
    return dict(table=table, paired=paired, verdicts=verdicts)


def _pp(iv) -> str:
    """'+1.23 pp [0.40, 2.06]' of an Interval or its dict, in percentage points."""
    mean, low, high = (iv.mean, iv.low, iv.high) if isinstance(iv, stats.Interval) else (iv["mean"], iv["low"], iv["high"])
    if low is None or np.isnan(low):
        return f"{100 * mean:+.2f} pp, no interval"
    return f"{100 * mean:+.2f} pp [{100 * low:+.2f}, {100 * high:+.2f}]"


def search_targets(root: str, unit_list: list[dict]) -> list[dict]:
    """Per unit and target, what the MGAS search itself reports (its search_result.json): the exported
    non-zero parameters and the validation accuracy of the record, or why there is none."""
    rows = []
    for unit in unit_list:
        path = os.path.join(unit_dir(root, unit), "mgas", "search", "search_result.json")
        if os.path.exists(path):
            with open(path) as f:
                targets = json.load(f).get("targets", {})
            rows += [dict(unit=unit_name(unit), target=int(t), params_nonzero=row.get("params_nonzero"),
                          val_accuracy=row.get("val_accuracy"), why=row.get("why"))
                     for t, row in sorted(targets.items(), key=lambda kv: -int(kv[0]))]
    return rows


def search_markdown(rows: list) -> list[str]:
    lines = ["", "The MGAS searches' own records at the budgets (exported non-zero parameters; validation top-1 of "
             "the super-net at the record):", "",
             "| unit | budget | params non-zero | / budget | val top-1 (%) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["params_nonzero"] is None:
            lines.append(f"| {r['unit']} | {r['target']:,} | - | - | - ({r['why']}) |")
            continue
        acc = "-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}"
        lines.append(f"| {r['unit']} | {r['target']:,} | {r['params_nonzero']:,} | "
                     f"{r['params_nonzero'] / r['target']:.3f} | {acc} |")
    return lines


def _ci(iv: dict) -> str:
    if iv["low"] is None:
        return "-"
    return f"[{100 * iv['low']:.2f}, {100 * iv['high']:.2f}]"


def markdown(result: dict, missing: list, command: str) -> str:
    lines = ["# MGAS versus baselines: a paired study", "", f"`{command}`", "",
             "Test top-1 per method and budget: mean over the units (repetition, fold, seed) with 95 % intervals of "
             "the mean (Student t; percentile bootstrap).", "",
             "| method | budget | n | params non-zero | params dense | FLOPs non-zero | top-1 (%) | t 95 % | bootstrap 95 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["table"]:
        lines.append(f"| {r['method']} | {r['target']:,} | {r['n']} | {r['params_nonzero']:,.0f} | "
                     f"{r['params_dense']:,.0f} | {r['flops_nonzero']:,.0f} | {100 * r['top1_mean']:.2f} | "
                     f"{_ci(r['t'])} | {_ci(r['bootstrap'])} |")
    lines += ["", "Paired differences MGAS - baseline on the units both ran (same split, same seed; fixed_ratio and "
                  "random also the same exported size, oplevel its own size at the same budget). The verdict reads "
                  "the t interval: above 0 MGAS better, below 0 worse, else no detectable difference.", "",
              "| budget | baseline | pairs | params MGAS | params baseline | MGAS - baseline (pp) | t 95 % | "
              "bootstrap 95 % | verdict |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in result["paired"]:
        lines.append(f"| {p['target']:,} | {p['baseline']} | {p['pairs']} | {p['params_mgas']:,.0f} | "
                     f"{p['params_baseline']:,.0f} | {100 * p['t']['mean']:+.2f} | {_ci(p['t'])} | "
                     f"{_ci(p['bootstrap'])} | {p['verdict']} |")
    lines += ["", "Verdicts:", ""] + [f"- {v}" for v in result["verdicts"]]
    if result.get("search_targets"):
        lines += search_markdown(result["search_targets"])
    if missing:
        lines += ["", "Not run (no architecture at that budget, or its baseline could not be built):", ""]
        lines += [f"- {m['method']} {unit_name(m)} target {m['target']}: {m['error']}" for m in missing]
    lines += ["", "![accuracy versus parameters](accuracy_vs_params.png)", ""]
    return "\n".join(lines)


def write_outputs(out: str, result: dict, runs: list, missing: list, *, command: str, meta: dict,
                  title: str, docs: str | None = None) -> None:
    """study.json, study.md and accuracy_vs_params.png in `out` (and copies in `docs`)."""
    from mgas_jax import reports
    export.write_json(os.path.join(out, "study.json"), dict(command=command, **meta, **result, runs=runs,
                                                            missing=missing))
    with open(os.path.join(out, "study.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result, missing, command))
    # error bars: the half width of the 95 % t interval (reports draws 'top1_std' as the bar)
    series = {}
    for r in result["table"]:
        half = 0.0 if r["t"]["low"] is None else (r["t"]["high"] - r["t"]["low"]) / 2
        series.setdefault(r["method"], []).append(dict(params=r["params_nonzero"], top1=r["top1_mean"],
                                                       top1_std=half, label=f"{r['target']:,}"))
    reports.plot_accuracy_vs_params(series, os.path.join(out, "accuracy_vs_params.png"),
                                    f"{title}; bars: 95 % t intervals of the mean")
    if docs:
        os.makedirs(docs, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(os.path.join(out, name), os.path.join(docs, name))


# --------------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    unknown = set(FLAGS.methods) - set(METHODS)
    if unknown:
        raise app.UsageError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in FLAGS.methods]
    budgets = sorted({int(b) for b in FLAGS.budgets}, reverse=True)
    if FLAGS.folds == 1 or FLAGS.folds < 0:
        raise app.UsageError(f"--folds={FLAGS.folds}: 0 (the fixed split) or k >= 2")
    try:
        unit_list = units(FLAGS.folds, FLAGS.repeats, FLAGS.seeds, FLAGS.fold_list)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    p = plan(unit_list, budgets, methods)
    if FLAGS.dry_run:
        print(describe_plan(p, search_minutes=FLAGS.search_minutes, retrain_minutes=FLAGS.retrain_minutes))
        return

    from mgas_jax import checkpoint as checkpoint_lib
    from mgas_jax import config as config_lib
    from mgas_jax import modes
    checkpoint_lib.quiet_orbax_logs()
    config = scale_search_epochs(FLAGS.config, FLAGS.search_epochs_scale)
    config.export.targets = tuple(budgets)
    for unit in unit_list:  # every unit's config is checked before the first one runs
        config_lib.validate(unit_config(config, unit, FLAGS.folds))
    out = os.path.abspath(FLAGS.out)
    os.makedirs(out, exist_ok=True)
    # One cache for the whole study: a rerun or a resumed study loads its programs instead of compiling,
    # and the searches of every unit start from the same super-net structure.
    modes.setup_compilation_cache(config, out)
    modes.setup_host_memory(config)
    runs, missing = [], []
    for unit in unit_list:
        r, m = run_unit(config, unit, out, methods, FLAGS.folds)
        runs += r
        missing += m
    result = aggregate(runs, methods=methods, resamples=FLAGS.resamples, seed=FLAGS.bootstrap_seed)
    result["search_targets"] = search_targets(out, unit_list)
    command = " ".join(["python"] + sys.argv)
    meta = dict(methods=methods, budgets=budgets, seeds=[int(s) for s in FLAGS.seeds], folds=FLAGS.folds,
                repeats=FLAGS.repeats, units=len(unit_list), resamples=FLAGS.resamples,
                bootstrap_seed=FLAGS.bootstrap_seed)
    folds = f"{FLAGS.folds}-fold x {FLAGS.repeats}" if FLAGS.folds else "fixed split"
    write_outputs(out, result, runs, missing, command=command, meta=meta, docs=FLAGS.docs,
                  title=f"{config.data.name}: {folds} x {len(FLAGS.seeds)} seed(s)")
    print(markdown(result, missing, command))


if __name__ == "__main__":
    define_flags()
    app.run(main)
