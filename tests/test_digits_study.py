"""The paired study's plan and aggregation (experiments/digits_study.py) on hand-made results: no training."""
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mgas_jax import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "digits_study.py")


@pytest.fixture(scope="module")
def study():
    # mgas_jax.main defines absl's --config in this process (tests/test_main.py imports it too): the
    # study must still import, its own flags being defined only when it runs as a script
    from mgas_jax import main  # noqa: F401
    spec = importlib.util.spec_from_file_location("digits_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_lists_each_fold_seed_budget_method_once(study):
    unit_list = study.units(5, 2, ["0", "3"])
    p = study.plan(unit_list, [10_000, 5_000], study.METHODS)
    keys = [(u["repeat"], u["fold"], u["seed"], b, m) for u, b, m in p["retrainings"]]
    assert len(keys) == len(set(keys)) == 2 * 5 * 2 * 2 * 4
    assert set(keys) == set(itertools.product(range(2), range(5), (0, 3), (10_000, 5_000), study.METHODS))
    assert len(p["searches"]) == 20 * 2 and len(p["exports"]) == 20 * 2 * 2
    text = study.describe_plan(p, search_minutes=3, retrain_minutes=1.5)
    assert len([line for line in text.splitlines() if "budget" in line]) == 160
    assert "40 searches x 3 min + 160 retrainings x 1.5 min" in text and "= 360 min (6.0 h)" in text
    # the matched baselines need MGAS's search even when mgas itself is not retrained
    q = study.plan(study.units(0, 1, ["1"]), [2_500], ["random"])
    assert [m for _, m in q["searches"]] == ["mgas"] and [m for _, _, m in q["retrainings"]] == ["random"]
    assert study.units(3, 1, ["0"], ["2"]) == [dict(repeat=0, fold=2, seed=0)]
    with pytest.raises(ValueError, match="folds are 0..2"):
        study.units(3, 1, ["0"], ["3"])
    assert study.unit_dir("/s", dict(repeat=0, fold=None, seed=2)) == "/s/seed_2"   # the earlier layout
    assert study.unit_dir("/s", dict(repeat=1, fold=4, seed=2)) == "/s/rep_1/fold_4/seed_2"


def test_unit_config_sets_the_split_and_the_seed(study):
    from mgas_jax import config as config_lib
    config = config_lib.load_config(os.path.join(ROOT, "configs", "digits.py"))
    c = study.unit_config(config, dict(repeat=1, fold=3, seed=2), 5)
    assert (c.seed, c.data.folds, c.data.fold, c.data.fold_repeat) == (2, 5, 3, 1)
    assert (config.seed, config.data.folds) == (0, 0)
    config_lib.validate(c, device_count=1)


def _runs():
    """5 folds x 2 seeds at two budgets: fixed_ratio 1-3 pp below MGAS, random equal up to +-0.5 pp,
    oplevel above at 2,500 and missing two units at 5,000."""
    rng = np.random.default_rng(0)
    runs = []
    for fold, seed in itertools.product(range(5), range(2)):
        unit = dict(repeat=0, fold=fold, seed=seed)
        for target, size in ((5_000, 4_800), (2_500, 2_400)):
            base = 0.9 + 0.02 * rng.standard_normal()            # a unit's difficulty, shared by all methods
            tops = dict(mgas=base, fixed_ratio=base - 0.01 - 0.02 * rng.random(),
                        random=base + (0.005 if (fold + seed) % 2 else -0.005),
                        oplevel=base + (0.03 if target == 2_500 else 0.0))
            for method, top1 in tops.items():
                if method == "oplevel" and target == 5_000 and fold == 0:
                    continue
                nonzero = size if method != "oplevel" else 3 * size
                runs.append(dict(unit, method=method, target=target, top1=float(top1), top5=1.0,
                                 params=dict(nonzero=nonzero, dense=nonzero + 100), flops=dict(nonzero=10 * nonzero)))
    return runs


def test_aggregate_on_hand_made_runs(study, tmp_path):
    runs = _runs()
    result = study.aggregate(runs, resamples=2000, seed=1)
    rows = {(r["method"], r["target"]): r for r in result["table"]}
    assert len(rows) == 8
    mgas = [r["top1"] for r in runs if r["method"] == "mgas" and r["target"] == 5_000]
    iv = stats.mean_interval(mgas)
    row = rows[("mgas", 5_000)]
    assert row["n"] == 10 and row["params_nonzero"] == 4_800 and row["flops_nonzero"] == 48_000
    assert (row["top1_mean"], row["t"]["low"], row["t"]["high"]) == pytest.approx((iv.mean, iv.low, iv.high))
    assert row["bootstrap"] == study._interval(stats.bootstrap_interval(mgas, seed=1, resamples=2000))
    assert rows[("oplevel", 5_000)]["n"] == 8

    paired = {(p["target"], p["baseline"]): p for p in result["paired"]}
    assert set(paired) == {(t, b) for t in (5_000, 2_500) for b in ("oplevel", "fixed_ratio", "random")}
    fixed = paired[(5_000, "fixed_ratio")]
    by_unit = lambda m: {(r["fold"], r["seed"]): r["top1"] for r in runs if r["method"] == m and r["target"] == 5_000}
    d = [by_unit("mgas")[k] - by_unit("fixed_ratio")[k] for k in sorted(by_unit("mgas"))]
    assert fixed["pairs"] == 10 and fixed["t"]["mean"] == pytest.approx(np.mean(d))
    assert (fixed["t"]["low"], fixed["t"]["high"]) == pytest.approx(
        (stats.mean_interval(d).low, stats.mean_interval(d).high))
    assert fixed["verdict"] == "MGAS better" and fixed["params_mgas"] == fixed["params_baseline"] == 4_800
    assert paired[(5_000, "random")]["verdict"] == "no detectable difference"
    assert paired[(2_500, "oplevel")]["verdict"] == "MGAS worse"
    op = paired[(5_000, "oplevel")]
    assert op["pairs"] == 8 and op["only_mgas"] == [[0, 0, 0], [0, 0, 1]] and op["params_baseline"] == 14_400
    assert result["verdicts"][0].startswith("budget 5,000: vs oplevel: no detectable difference")
    assert "vs fixed_ratio: MGAS better (+" in result["verdicts"][0] and "10 pairs" in result["verdicts"][0]
    assert result["verdicts"][1].startswith("budget 2,500: vs oplevel: MGAS worse")

    missing = [dict(repeat=0, fold=0, seed=0, method="oplevel", target=5_000, error="no record at 5000")]
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    study.write_outputs(str(out), result, runs, missing, command="python experiments/digits_study.py",
                        meta=dict(folds=5), title="digits", docs=str(docs))
    for name in study.OUTPUTS:
        assert (out / name).stat().st_size > 0 and (docs / name).read_bytes() == (out / name).read_bytes()
    md = (out / "study.md").read_text()
    assert "| fixed_ratio | 5,000 | 10 | 4,800 |" in md and "- budget 2,500: vs oplevel: MGAS worse" in md
    assert "- oplevel rep 0 fold 0 seed 0 target 5000: no record at 5000" in md
    saved = json.loads((out / "study.json").read_text())
    assert saved["folds"] == 5 and saved["verdicts"] == result["verdicts"] and len(saved["runs"]) == len(runs)


@pytest.mark.slow
def test_dry_run_from_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, SCRIPT, f"--out={tmp_path / 's'}", "--dry_run", "--folds=2",
                          "--seeds=0,1", "--budgets=5000,2500", "--methods=mgas,random"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "budget" in line]
    assert len(lines) == len(set(lines)) == 2 * 2 * 2 * 2
    assert "rep 0 fold 1 seed 1  budget 2,500  random" in lines
    assert "4 searches x 6 min + 16 retrainings x 1 min" in out.stdout   # the default estimates
    assert not (tmp_path / "s").exists()       # a dry run writes nothing
