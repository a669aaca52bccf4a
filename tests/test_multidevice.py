"""Data parallelism does not change the search: 8 devices give the numbers of 1 device.

The global batch is the unit of the method (docs/method.md section 4): split over 8 devices, the jitted
step computes the same mean loss, the same gradients (all-reduced by XLA) and the same BatchNorm
statistics (taken over the whole global batch) as on one device, up to the order of float additions.
Two checks, each in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before JAX starts):

- step level: the same super-net state and the same three global batches through `search_step.make_step` on a
  mesh of 1 device and on a mesh of 8 devices, in one process: losses, weights, architecture parameters,
  BatchNorm statistics and optimizer state agree to float tolerance, and every output is replicated (the
  host-side decisions read it with jax.device_get);
- search level: `search.search` on configs/tiny.py (a shortened final phase) in a process with 8 devices
  and in one with 1 device ends with exactly the same decisions (log lines, records, exported cells) and
  per-epoch losses that agree to float tolerance.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

# every test here starts processes that compile and run the tiny search or its steps
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _env(devices: int) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _result(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-4000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


STEPS = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from mgas_jax import config as config_lib, data as data_lib, ops, parallel, search, search_step, supernet

    assert jax.device_count() == 8, jax.devices()
    config = config_lib.load_config(sys.argv[1])
    cfg = config.search
    data_cfg = search.search_data_config(config)
    ds = data_lib.load(data_cfg, process_index=0, process_count=1)
    # stage 1 of the tiny super-net: one cell of 2 nodes with every op, the stage head
    cells = supernet.full_cells(cfg.init_channels, cfg.layers, cfg.steps)[:1]
    spec = search.make_spec(cfg, ds.num_classes, cells, 1)
    tx = search_step.make_optimizer(cfg)
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), ds.image_shape)
    trainable = {"params": v["params"], "arch": v["arch"]}
    start = jax.device_get(search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                                   batch_stats=v["batch_stats"], masks=v["masks"],
                                                   opt_state=tx.init(trainable)))
    batches = list(ds.train.batches(cfg.batch_size, epoch=0, seed=0, shuffle=True, drop_remainder=True))[:3]
    mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
    scales = search_step.GroupScales().asarrays()   # the pruning phase: weights, alpha, beta and thresholds all move

    runs = {}
    for n in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        step = search_step.make_step(spec, tx, data_cfg, mean, std, programs=cfg.programs)
        state = parallel.replicate(start, mesh)
        losses = []
        for i, batch in enumerate(batches):
            batch = parallel.shard_batch(batch, mesh)
            assert len(batch["image"].sharding.device_set) == n
            state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(1), i), jnp.float32(0.05), scales)
            losses.append({k: float(v) for k, v in metrics.items()})
        leaves = jax.tree.leaves((state, metrics))
        replicated = all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == n for x in leaves)
        runs[n] = dict(losses=losses, state=jax.device_get(state), replicated=replicated)

    def worst(a, b):
        # max over the leaves of max|a - b| / max|b|: the error relative to the leaf's scale
        diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                       / (np.max(np.abs(np.asarray(y, np.float64))) + 1e-12))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(x)]
        return max(diffs, default=0.0)

    one, eight = runs[1]["state"], runs[8]["state"]
    print("RESULT" + json.dumps(dict(
        fast_variance=bool(ops.batch_norm(True, True).use_fast_variance),
        losses={n: r["losses"] for n, r in runs.items()},
        replicated={n: r["replicated"] for n, r in runs.items()},
        step={n: int(r["state"].step) for n, r in runs.items()},
        moved=worst(one.arch, start.arch),
        diff={k: worst(getattr(eight, k), getattr(one, k))
              for k in ("params", "arch", "batch_stats", "masks", "opt_state")})))
""")


def test_search_steps_on_8_devices_match_1_device():
    out = subprocess.run([sys.executable, "-c", STEPS, TINY], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=_env(8))
    r = _result(out)
    assert r["replicated"] == {"1": True, "8": True}, "a step output is not replicated over the mesh"
    assert r["step"] == {"1": 3, "8": 3}
    assert r["moved"] > 1e-3, "the architecture parameters did not move: the comparison would be vacuous"
    for one, eight in zip(r["losses"]["1"], r["losses"]["8"]):
        assert set(one) == set(eight)
        for k in one:
            np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Float sums in another order differ in the last bits (about 1e-7); over 3 SGD steps they stay near 1e-5
    # of each tensor's scale when BatchNorm computes its variance in two passes, mean((x - mean)^2). flax's
    # default one-pass E[x^2] - E[x]^2 loses digits to cancellation and turns those bits into ~1e-3
    # after the third step (no gate is within reach of its threshold there; see docs/scaling.md).
    tol = 1e-2 if r["fast_variance"] else 1e-4
    for collection, diff in r["diff"].items():
        assert diff < tol, f"{collection}: 8 devices differ from 1 device by {diff:.3g} of the tensors' scale"


SEARCH = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from mgas_jax import config as config_lib, names, pruning, search

    config = config_lib.load_config(sys.argv[1])
    config.mode = "search"
    # shortened to the fewest compilations that still take every kind of decision but regrowth: a warm-up
    # epoch and one commit per stage (threshold commits, lambda update, stage end, physical shrinking),
    # one final-phase commit with its record and validation pass, the exports
    config.search.max_stage_epochs = 1
    config.search.final_max_epochs = 1
    config.search.regrow_fraction = 0.0

    def scores(spec, params, arch):
        # {unit: (score, threshold)} of every unit a commit decides on: ops, filters, weights
        sig = lambda x: 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
        out = {}
        def add(prefix, score, threshold):
            for j, v in enumerate(np.ravel(score)):
                out[f"{prefix}[{j}]"] = (float(v), float(threshold))
        for i, cell in enumerate(spec.cells):
            a = arch[names.cell_name(i)]
            for k, pre in enumerate(names.pre_path(i, k) for k in range(len(names.PRE))):
                if names.has_path(arch, names.gate(pre)):
                    add("/".join(names.gate(pre)), sig(names.get_path(arch, names.gate(pre))), a["t_pre"][k])
            for o in cell.ops:
                add("/".join(names.op_path(i, o)), sig(a["alpha"][o.edge, o.op_index]), a["t_op"][o.edge, o.op_index])
                for unit in names.conv_units(o.op):
                    u = names.op_path(i, o) + unit
                    if names.has_path(arch, names.gate(u)):
                        add("/".join(names.gate(u)), sig(names.get_path(arch, names.gate(u))), a["t_k"][o.edge, o.op_index])
                    for path in names.unit_kernels(u):
                        add("/".join(path), np.abs(names.get_path(params, path)), a["t_w"][o.edge, o.op_index])
        return out

    def switched_off(before, after, removed):
        # the units this commit switched off: the removed ops, and mask entries that went from 1 to 0
        off = [f"{'/'.join(names.op_path(i, o))}[0]" for i, o in removed]
        for path, old in pruning._walk(before):
            if names.is_kernel(path) or names.is_filter_mask(path):
                if pruning._has(after, path) and np.shape(pruning._get(after, path)) == np.shape(old):
                    new = np.ravel(pruning._get(after, path))
                    off += [f"{'/'.join(path)}[{j}]" for j in np.flatnonzero((np.ravel(old) > 0) & (new == 0))]
        return sorted(off)

    commits, commit = [], pruning.commit
    def traced(spec, params, arch, masks, **kw):
        # each commit's decisions, and the units that were within 1 % of their threshold (near-ties)
        r = commit(spec, params, arch, masks, **kw)
        near = {u: st for u, st in scores(spec, pruning.to_numpy(params), pruning.to_numpy(arch)).items()
                if abs(st[0] - st[1]) <= 1e-2 * max(abs(st[0]), abs(st[1]), 1e-6)}
        commits.append(dict(off=switched_off(pruning.to_numpy(masks), r.masks, r.removed), near=near))
        return r
    pruning.commit = traced   # search.py and budget.py call it through the module

    result = search.search(config, sys.argv[2])
    cells = [json.load(open(r["path"]))["cells"] for r in result["records"]]
    events = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl")]
    print("RESULT" + json.dumps(dict(devices=jax.device_count(), log=result["log"], cells=cells, commits=commits,
                                    records=[{k: v for k, v in r.items() if k != "path"} for r in result["records"]],
                                    summary={t: {k: v for k, v in s.items() if k != "path"}
                                             for t, s in result["summary"].items()},
                                    events=events)))
""")

# Two units closer to their thresholds than this (relative) are a near-tie: float sums in another order
# (the 8-way split of the batch) may decide them either way. The step-level test above bounds the
# difference after 3 steps near 1e-5 of each tensor's scale; a search of ~20 steps stays well inside 1e-3.
NEAR_TIE = 1e-3


def first_divergence(one: dict, eight: dict):
    """The index of the first commit whose decisions differ between the two searches (None: none does),
    after checking that every unit decided differently there was a near-tie in both searches: within
    NEAR_TIE of its threshold. A unit clear of its threshold decided differently means data parallelism
    changed the search, not the order of float additions."""
    for k, (a, b) in enumerate(zip(one["commits"], eight["commits"])):
        differ = set(a["off"]) ^ set(b["off"])
        if not differ:
            continue
        for unit in sorted(differ):
            for name, run in (("1 device", a), ("8 devices", b)):
                score, threshold = run["near"].get(unit, (None, None))
                assert score is not None and abs(score - threshold) <= NEAR_TIE * max(abs(score), abs(threshold), 1e-6), (
                    f"commit {k + 1}: {unit} decided differently on 8 devices than on 1, yet on {name} it was not "
                    f"within {NEAR_TIE} of its threshold ({score} vs {threshold})")
        return k
    assert len(one["commits"]) == len(eight["commits"])
    return None


def test_first_divergence_accepts_a_near_tie_and_refuses_a_clear_decision():
    """The rule of the search-level test on hand-made commits: the same decisions, a weight at its
    threshold (near-tie) decided differently, and a weight clear of it decided differently."""
    same = dict(off=["w[0]"], near={})
    tie = {"w[1]": (0.0500001, 0.05)}
    one = dict(commits=[same, dict(off=["w[1]"], near=tie), dict(off=["w[2]"], near={})])
    eight = dict(commits=[same, dict(off=[], near=tie), dict(off=[], near={})])
    assert first_divergence(one, one) is None
    assert first_divergence(one, eight) == 1
    clear = dict(commits=[same, dict(off=["w[1]", "w[3]"], near=tie), dict(off=[], near={})])
    with pytest.raises(AssertionError, match=r"commit 2: w\[3\] decided differently"):
        first_divergence(clear, eight)


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    """The same tiny search with 8 devices and with 1 device, run side by side."""
    procs, logs = {}, {}
    deadline = time.monotonic() + 1800
    try:
        for n in (8, 1):
            workdir = tmp_path_factory.mktemp(f"search_{n}dev")
            # files, not pipes: nobody drains a pipe while the other process is waited on
            logs[n] = (workdir / "stdout.txt", workdir / "stderr.txt")
            with open(logs[n][0], "w") as out, open(logs[n][1], "w") as err:
                procs[n] = subprocess.Popen([sys.executable, "-c", SEARCH, TINY, str(workdir / "run")], cwd=ROOT,
                                            env=_env(n), stdout=out, stderr=err)
        for p in procs.values():
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {n: _result(subprocess.CompletedProcess(p.args, p.returncode, logs[n][0].read_text(),
                                                      logs[n][1].read_text())) for n, p in procs.items()}
    assert results[8]["devices"] == 8 and results[1]["devices"] == 1
    return results


def _until(events: list, epoch: int) -> list:
    """The events before `epoch`'s commit: every event of earlier epochs, the training metrics of `epoch`."""
    return [e for e in events if e["epoch"] < epoch or (e["epoch"] == epoch and e["split"] == "search")]


def test_search_on_8_devices_makes_the_decisions_of_1_device(searches):
    """Every decision (commits of ops, filters and weights, stage ends, records, exports) is the same on 8
    devices as on 1. Where a commit meets a near-tie that the two orders of float additions decide
    differently (first_divergence checks that it is one), everything up to that commit is the same and
    the two searches part there, as two machines with different float kernels would."""
    one, eight = searches[1], searches[8]
    assert one["commits"] and len(one["commits"]) == sum(l.startswith("commit ") for l in one["log"])
    k = first_divergence(one, eight)
    if k is None:
        assert eight["log"] == one["log"]
        assert eight["cells"] == one["cells"] and eight["cells"], "the recorded architectures differ"
        assert eight["records"] == one["records"]
        assert eight["summary"] == one["summary"]
        return
    # the log up to the commit that met the near-tie
    cut = [i for i, line in enumerate(one["log"]) if line.startswith(f"commit {k + 1} ")][0]
    assert eight["log"][:cut] == one["log"][:cut]


def test_search_on_8_devices_has_the_losses_of_1_device(searches):
    """Per-epoch losses agree to float tolerance (up to a commit that met a near-tie, see above)."""
    one, eight = searches[1], searches[8]
    k = first_divergence(one, eight)
    last = max(e["epoch"] for e in one["events"]) + 1
    if k is not None:  # the epoch of that commit: its training ran before the decision
        last = int(next(l for l in one["log"] if l.startswith(f"commit {k + 1} ")).split("(epoch ")[1].split(")")[0])
    a, b = _until(eight["events"], last), _until(one["events"], last)
    assert [(e["split"], e["epoch"]) for e in a] == [(e["split"], e["epoch"]) for e in b] and b
    for x, y in zip(a, b):
        for key, v in y.items():
            if isinstance(v, float):
                np.testing.assert_allclose(x[key], v, rtol=1e-4, atol=1e-6, err_msg=f"{y['split']} {y['epoch']} {key}")
            else:
                assert x[key] == v, (y["split"], y["epoch"], key)
