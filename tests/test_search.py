"""The MGAS search end to end on configs/tiny.py: all stages, regrowth, the final phase, exports,
and exact resume after an interruption.

Most tests read the session's one finished tiny search (conftest.py's `searched`); the interrupted
searches run their own and end compared with it. The rules of the export files are tested on hand-made
records in test_export.py.
"""
import json
import os

import jax
import numpy as np
import pytest

from mgas_jax import search
from tiny_runs import search_config as tiny_search_config


def run(workdir, config=None):
    return search.search(config or tiny_search_config(), str(workdir))


def test_runs_every_stage_regrowth_and_final_phase(searched):
    _, result = searched
    log = "\n".join(result["log"])
    for stage in ("stage 1:", "stage 2:", "stage 3:", "stage final:"):
        assert stage in log, log
    assert "stage 2 regrowth" in log and "stage 3 regrowth" in log, log
    assert "final phase ends" in log, log
    assert result["records"], "the final phase recorded no architecture"


def test_prunes_at_all_three_granularities(searched):
    _, result = searched
    last = result["records"][-1]["counts"]
    full = search.supernet.full_cells(4, 3, 2)
    n_full_ops = sum(len(c.ops) for c in full)
    assert last["ops"] < n_full_ops
    # Filters leave the counts in two ways: committed off (filters < filters_total) or physically removed
    # at a stage end (filters_total below the full-width units of the same ops); either is below this.
    with open(result["records"][-1]["path"]) as f:
        cells = json.load(f)["cells"]
    full_width = sum(2 * c["width"] + sum(2 * c["width"] if o["op"].startswith("sep") else
                                          c["width"] if o["op"].startswith("dil") or
                                          (o["op"] == "skip_connect" and c["reduction"] and o["src"] < 2) else 0
                                          for o in c["ops"]) for c in cells)
    assert last["filters"] <= last["filters_total"] <= full_width
    assert last["filters"] < full_width, (last, full_width)
    assert last["weights"] < last["weights_total"]


def test_records_shrink_and_exports_follow_budgets(searched):
    workdir, result = searched
    sizes = [r["params"]["nonzero"] for r in result["records"]]
    assert sizes == sorted(sizes, reverse=True), sizes
    summary = result["summary"]
    big, small = summary["1000"], summary["10"]
    assert "path" in big and os.path.exists(big["path"])
    assert big["params"]["nonzero"] <= 1000
    # 10 parameters is below anything 3 cells reach (the classifier alone has more): reported, not faked
    assert "error" in small and "<= 10 " in small["error"]


def test_summary_gives_each_target_its_size_and_accuracy_or_the_reason(searched):
    workdir, result = searched
    with open(os.path.join(workdir, "search_result.json")) as f:
        targets = json.load(f)["targets"]
    assert set(targets) == {"1000", "10"} and targets == result["targets"]
    big = targets["1000"]
    assert big["params_nonzero"] == result["summary"]["1000"]["params"]["nonzero"]
    assert 0 <= big["val_accuracy"] <= 1
    # the tiny super-net's record for 1,000 comes from a budget commit (the whole commit went below 1,000)
    rec = result["records"][big["record"]]
    assert any(line.startswith("budget commit for target 1000:") for line in result["log"]), result["log"]
    assert big["params_nonzero"] == rec["params"]["nonzero"] <= 1000
    assert big["ratio"] == round(big["params_nonzero"] / 1000, 4)
    if big["params_nonzero"] < 900:   # a few whole ops hold most of these cells' parameters: it says so
        assert "outside [0.9, 1]" in big["why"] and "budget_window" in big["why"], big
    else:
        assert "why" not in big
    assert targets["10"]["params_nonzero"] is None and targets["10"]["why"]


def test_interrupted_search_resumes_to_the_same_result(searched, tmp_path, monkeypatch):
    _, expected = searched
    workdir = tmp_path / "resumed"
    saves = {"n": 0}
    original = search.Searcher.save

    def save_then_die(self, state, progress):
        original(self, state, progress)
        saves["n"] += 1
        if saves["n"] == 6:  # mid stage 2
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(search.Searcher, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(workdir)
    monkeypatch.setattr(search.Searcher, "save", original)
    resumed = run(workdir)
    strip = lambda r: [{k: v for k, v in rec.items() if k != "path"} for rec in r["records"]]
    assert strip(resumed) == strip(expected)
    assert resumed["log"] == expected["log"]
    a = json.load(open(resumed["summary"]["1000"]["path"]))
    b = json.load(open(expected["summary"]["1000"]["path"]))
    assert a["cells"] == b["cells"] and a["params"] == b["params"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_checkpoints_inside_an_epoch_and_resumes(searched, tmp_path, monkeypatch, signame):
    """A real SIGTERM (or Ctrl-C): the handler flags, the loop checkpoints at the next step and exits;
    the rerun continues from that batch and ends exactly like the uninterrupted search."""
    import signal

    _, expected = searched
    workdir = tmp_path / f"preempted_{signame}"
    saves = {"n": 0}
    original = search.Searcher.save

    def save_then_signal(self, state, progress):
        original(self, state, progress)
        saves["n"] += 1
        if saves["n"] == 4:
            os.kill(os.getpid(), getattr(signal, signame))

    monkeypatch.setattr(search.Searcher, "save", save_then_signal)
    with pytest.raises(SystemExit, match=f"{signame}: the search stopped at epoch"):
        run(workdir)
    monkeypatch.setattr(search.Searcher, "save", original)
    from mgas_jax import checkpoint as ckpt_lib
    meta = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), max_to_keep=3).meta()
    assert meta["progress"]["batch_in_epoch"] == 1  # stopped inside an epoch, not at its end
    resumed = run(workdir)
    strip = lambda r: [{k: v for k, v in rec.items() if k != "path"} for rec in r["records"]]
    assert strip(resumed) == strip(expected)
    assert resumed["log"] == expected["log"]


def test_a_final_phase_of_masks_records_what_the_rebuilding_one_does(searched, tmp_path):
    """search.final_rebuild = False (commits of the final phase switch masks, one compiled step) takes
    the decisions and writes the records of the rebuilding final phase (configs/tiny.py, the shared
    search): the masked network computes what the physically pruned one does."""
    _, expected = searched
    config = tiny_search_config()
    config.search.final_rebuild = False
    result = run(tmp_path / "masked", config)
    strip = lambda r: [{k: v for k, v in rec.items() if k not in ("path", "val_accuracy")} for rec in r["records"]]
    assert strip(result) == strip(expected) and result["records"]
    for a, b in zip(result["records"], expected["records"]):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6)
        assert json.load(open(a["path"]))["cells"] == json.load(open(b["path"]))["cells"]
    assert result["log"] == expected["log"]
    # the masked final phase compiles its step once; the rebuilding one once per structure it reaches
    assert result["compiles"] <= expected["compiles"]


def test_a_finished_search_exports_again_for_other_targets(searched, tmp_path):
    """export.targets steer the final phase (budget commits), yet a finished search reruns with other
    targets: it exports them from its records without searching again."""
    import shutil

    src, expected = searched
    workdir = tmp_path / "retarget"
    shutil.copytree(src, workdir)
    config = tiny_search_config()
    config.export.targets = (2_000, 1_000)
    result = run(workdir, config)
    assert result["epochs"] == expected["epochs"] and result["log"] == expected["log"]
    assert result["records"] == expected["records"]
    sizes = [r["params"]["nonzero"] for r in expected["records"]]
    best = max(n for n in sizes if n <= 2_000)
    assert result["summary"]["2000"]["params"]["nonzero"] == best
    assert os.path.isfile(workdir / "export" / "arch_2000.json")
    assert result["targets"]["2000"]["params_nonzero"] == best


def test_prng_salts_keep_their_values():
    """Resumed searches must draw the keys the interrupted ones would have drawn."""
    assert (search.SALT_START, search.SALT_COMMIT, search.SALT_STAGE, search.SALT_SHRINK, search.SALT_REGROW_INIT,
            search.SALT_REGROW_DRAW, search.STEP_KEY_STRIDE, search.ARCH_BATCH_SALT) == \
        (0, 0, 7919, 10_000, 20_000, 50_000, 1_000_003, 1)


def _snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_corrupt_checkpoint_stops_with_the_fix_and_touches_nothing(searched, tmp_path):
    import shutil
    from mgas_jax import checkpoint as ckpt_lib

    src, _ = searched
    workdir = tmp_path / "corrupt"
    shutil.copytree(src, workdir)
    latest = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), max_to_keep=3).latest_step()
    step_dir = workdir / "checkpoints" / str(latest)
    victims = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    for p in victims:  # truncate every file of the latest checkpoint
        with open(p, "r+b") as f:
            f.truncate(max(0, p.stat().st_size // 3))
    before = _snapshot(workdir)
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="move .* out of the way"):
        run(workdir)
    assert _snapshot(workdir) == before


def test_workdir_of_another_config_is_refused(searched, tmp_path):
    import shutil
    from mgas_jax import checkpoint as ckpt_lib

    src, _ = searched
    workdir = tmp_path / "other"
    shutil.copytree(src, workdir)
    before = _snapshot(workdir)
    config = tiny_search_config()
    config.search.lr = 0.2
    with pytest.raises(ckpt_lib.ConfigMismatchError, match="search.lr"):
        run(workdir, config)
    assert _snapshot(workdir) == before


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_stage_and_no_checkpoint(tmp_path, monkeypatch):
    from mgas_jax import checkpoint as ckpt_lib
    from mgas_jax import pruning

    # lambda is a run-time input of the compiled step: a NaN there poisons the loss of the first step
    monkeypatch.setattr(pruning, "lambda_start", lambda lambda0: pruning.LambdaState(float("nan"), 0.0))
    workdir = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"epoch 0 \(stage 1, warmup\); no checkpoint yet; nothing was "
                                                 r"saved.*search.nan_policy=rollback"):
        run(workdir)
    assert ckpt_lib.Checkpointer(str(workdir / "checkpoints"), max_to_keep=3).latest_step() is None


@pytest.mark.slow
def test_rollback_policy_restores_the_last_checkpoint_with_lower_learning_rates(tmp_path, monkeypatch):
    from mgas_jax import checkpoint as ckpt_lib

    original = search.Searcher.run_epoch
    calls = {"n": 0}

    def run_epoch(self, spec, state, progress, flags):
        calls["n"] += 1
        if calls["n"] == 2:   # the 2nd epoch starts from NaN weights: a real non-finite loss
            state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
        if calls["n"] == 4:
            raise KeyboardInterrupt   # enough: epoch 1 redone, and one more
        if calls["n"] >= 3:
            assert flags[0] == pytest.approx(0.5)   # the weights' update (hence lr) halved
        return original(self, spec, state, progress, flags)

    monkeypatch.setattr(search.Searcher, "run_epoch", run_epoch)
    config = tiny_search_config()
    config.search.nan_policy = "rollback"
    workdir = tmp_path / "rollback"
    with pytest.raises(KeyboardInterrupt):
        run(workdir, config)
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), max_to_keep=3)
    progress = ckpt.meta()["progress"]
    ckpt.close()
    assert progress["lr_scale"] == 0.5 and progress["rollbacks"] == 1 and progress["epoch"] == 2
    assert any(line.startswith("rollback 1: non-finite loss or gradient in search epoch 1") for line in progress["log"])


def test_the_final_phase_of_mgas_goes_on_below_one_op_per_node():
    """With every node down to one op an op-level search is done (and the released code's final phase),
    but MGAS aiming at budgets can still prune filters and weights towards one: its final phase ends only
    by the targets, the floor or the epoch cap."""
    import dataclasses
    import types

    from mgas_jax import supernet
    full = supernet.full_cells(4, 3, steps=2)
    one_op = tuple(dataclasses.replace(c, ops=tuple(o for o in c.ops if o.src == 0 and o.op == "sep_conv_3x3"))
                   for c in full)
    cfg = types.SimpleNamespace(final_size_floor=0, final_max_epochs=5, budget_commits=True)
    mgas = supernet.SuperNetSpec(one_op, num_classes=10, stem_channels=12)
    oplevel = dataclasses.replace(mgas, filter_level=False, weight_level=False)
    assert search.final_phase_end(cfg, mgas, {}, False, 1) is None
    assert search.final_phase_end(cfg, oplevel, {}, False, 1) == "no op left to prune"
    released = types.SimpleNamespace(final_size_floor=0, final_max_epochs=5, budget_commits=False)
    assert search.final_phase_end(released, mgas, {}, False, 1) == "no op left to prune"
    assert search.final_phase_end(cfg, dataclasses.replace(oplevel, cells=full), {}, False, 1) is None
    assert search.final_phase_end(cfg, mgas, {}, True, 1) == "every export target has its record"
    assert search.final_phase_end(cfg, mgas, {}, False, 5) == "search.final_max_epochs = 5 reached"
    floor = types.SimpleNamespace(final_size_floor=10**9, final_max_epochs=5, budget_commits=True)
    assert search.final_phase_end(floor, mgas, {}, False, 1).startswith("size proxy ")


def test_fresh_state_drops_compiled_programs_only_before_any_step(tmp_path, monkeypatch):
    """The op-by-op init's compiled programs are dropped (jax.clear_caches) while this process has
    built no search step; once one is built, a later init keeps what is compiled."""
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(True))
    monkeypatch.setattr(search, "_steps_built", False)
    s = search.Searcher(tiny_search_config(), str(tmp_path))
    cells = search.supernet.full_cells(s.cfg.init_channels, s.cfg.layers, s.cfg.steps)
    spec = s.spec_of(search.Progress(cells=search.cells_to_json(cells[:search.built_cells(s.cfg.layers, 1)])))
    s.fresh_state(spec, search.SALT_START)
    assert cleared == [True]
    s.step_fn(spec)
    assert search._steps_built
    s.fresh_state(spec, search.SALT_START)
    assert cleared == [True]
