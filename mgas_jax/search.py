"""The MGAS search loop: stages of growing depth, warm-up, commits, regrowth, the final phase.

Read top to bottom, `search(config, workdir)` is the whole experiment (docs/method.md sections 3-5):

    for stage in 1, 2, 3, final:
        build the sub-net of the stage (earlier cells keep their state), reset thresholds, lambda = 0
        warm-up epochs: weights only
        prune: one-level epochs; commit live masks after `first_commit_after` epochs, then every
            `commit_every`; update lambda
        stage end (size of cells 0..end < stage_size_ratio x its value at the stage start):
        after stages 2 and 3: one epoch with frozen masks, regrow 20 % of the stage's pruned ops; then
        shrink channels physically
    final phase: commits (with shrinking; search.final_rebuild = False: masks only) until no op can go or
        the size floor; each commit is recorded;
        with search.budget_commits a commit that would cross an export target lands just below it
        (budget.py), and the phase ends once every target has its record
    export: the first recorded architecture at or below each target size

The jit-compiled step (search_step.py) is a pure function of (state, batch, key, lambda, group scales); every decision between
steps (commits, lambda, regrowth, shrinking) is a host-side function of the replicated state
(pruning.py). A checkpoint at the end of every epoch holds everything that determines the rest of
the run, so an interrupted search resumes and ends with the same architecture.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mgas_jax import checkpoint as ckpt_lib
from mgas_jax import config as config_lib
from mgas_jax import data as data_lib
from mgas_jax import export as export_lib
from mgas_jax import budget, loop, names, parallel, pruning, supernet
from mgas_jax import search_step as step_lib
from mgas_jax.search_step import SearchState
from mgas_jax.genotype import cells_from_json, cells_to_json
from mgas_jax.metrics import MetricWriter

FINAL = 4  # the final phase, after the three stages

# Salts folded into the run's PRNG keys, one per stream of draws. They only have to differ from each
# other, but their values are part of every search: a resumed search must draw exactly the keys the
# interrupted one would have drawn, so changing a value changes the results and breaks the exact
# resume of existing workdirs. Never renumber them.
SALT_START = 0                 # the first state of the search (stage 1's cells)
SALT_COMMIT = 0                # + commits: the state after a commit (no op grows, so nothing is drawn)
SALT_STAGE = 7919              # x stage: the init of a stage's new cells and head
SALT_SHRINK = 10_000           # + commits: the state after a physical shrink
SALT_REGROW_INIT = 20_000      # + stage: the state with the regrown ops
SALT_REGROW_DRAW = 50_000      # + stage: which ops regrow, and their fresh masks
STEP_KEY_STRIDE = 1_000_003    # epoch x this + batch: the step's key (a prime above any epoch's batch count)
ARCH_BATCH_SALT = 1            # the bilevel variant's architecture step: fold_in(step key, this)

# Whether this process has built a search step yet (Searcher.step_fn): until then, Searcher.fresh_state
# drops what JAX has compiled, since nothing of the search's is among it.
_steps_built = False


@dataclasses.dataclass
class Progress:
    """Host-side search state, saved as JSON beside every checkpoint."""
    stage: int = 1                 # 1, 2, 3 or FINAL
    phase: str = "start"           # start | warmup | prune | regrow | done
    epoch: int = 0                 # epochs finished in the whole search (data order and keys use it)
    phase_epochs: int = 0          # epochs finished in the current phase
    lam: float = 0.0
    lam_d: float = 0.0
    size_start: int = 0            # size proxy of cells 0..end of the stage at the stage start
    pruned_in_stage: int = 0
    commits: int = 0
    cells: list = dataclasses.field(default_factory=list)   # JSON cells of the current spec
    head: str = "stage"
    records: list = dataclasses.field(default_factory=list) # final-phase commits (summaries)
    log: list = dataclasses.field(default_factory=list)     # one line per decision, for the report
    compiles: int = 0
    compile_seconds: float = 0.0
    batch_in_epoch: int = 0        # > 0 only in a preemption checkpoint taken inside an epoch
    partial: Optional[dict] = None # the metric sums of those batches
    lr_scale: float = 1.0          # every group's learning rate x this (lowered by nan_policy=rollback)
    rollbacks: int = 0
    pruned_alpha: dict = dataclasses.field(default_factory=dict)  # alpha of committed-off ops from before
    targets: dict = dataclasses.field(default_factory=dict)       # budget commits: str(target) -> record
                                                                  # index, or why it has none


Preempted = ckpt_lib.Preempted  # raised after a SIGTERM or Ctrl-C once the search has checkpointed where it stood


# ----------------------------------------------------------------------------------------------
# Stage structure

def stage_cells(layers: int, stage: int) -> range:
    """Cells searched in a stage: {0..L//3-1}, {L//3..2L//3-1}, {2L//3..L-1}; the final phase: all."""
    r1, r2 = supernet.reduction_layers(layers)
    return {1: range(0, r1), 2: range(r1, r2), 3: range(r2, layers), FINAL: range(0, layers)}[stage]


def stage_size(spec: supernet.SuperNetSpec, masks: dict) -> int:
    """The measure a stage ends on: the size proxy of cells 0 .. end of the stage, i.e. every built
    cell, not only the stage's own (train_search.py ~455-457, ~708; docs/method.md section 7)."""
    return pruning.size_proxy(spec, masks, range(len(spec.cells)))


def built_cells(layers: int, stage: int) -> int:
    return stage_cells(layers, min(stage, 3)).stop


def make_spec(cfg, num_classes: int, cells: tuple, stage: int) -> supernet.SuperNetSpec:
    # R_op penalises the current stage's cells only in stages 2 and 3 (docs/method.md section 7)
    penalised = tuple(stage_cells(cfg.layers, stage)) if stage in (2, 3) else None
    return supernet.SuperNetSpec(
        cells=tuple(cells), num_classes=num_classes, stem_channels=cfg.stem_multiplier * cfg.init_channels,
        head="classifier" if stage >= 3 else "stage", impl=cfg.impl, remat=cfg.remat,
        dtype=None if cfg.dtype == "float32" else cfg.dtype,
        filter_level=cfg.filter_level, weight_level=cfg.weight_level, penalised=penalised)


def search_data_config(config):
    """config.data with the search's own validation split, training subset and augmentation."""
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.val_size = config.search.val_size
    data_cfg.train_fraction = config.search.train_fraction
    data_cfg.autoaugment = config.search.autoaugment
    return data_cfg


class Searcher:
    """Holds what a search needs between epochs: data, mesh, writers, compiled steps by structure."""

    def __init__(self, config, workdir: str):
        self.config, self.cfg, self.workdir = config, config.search, workdir
        self.data_cfg = search_data_config(config)
        self.ds = data_lib.load(self.data_cfg, process_index=jax.process_index(), process_count=jax.process_count())
        self.mesh = parallel.make_mesh()
        self.mean = jnp.asarray(self.ds.mean)
        self.std = jnp.asarray(self.ds.std)
        self.tx = step_lib.make_optimizer(self.cfg)
        self.base_key = jax.random.key(config.seed)
        self.init_key = jax.random.key(config.seed, impl="rbg")  # fast to compile on CPU
        self._steps: dict = {}
        self._eval_steps: dict = {}
        self._compiled: set = set()
        self.stop = ckpt_lib.StopSignals()  # SIGTERM or Ctrl-C: checkpoint at the next step, then stop
        self.writer = None  # opened once the workdir is known to hold this run (see `search`)
        self.ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=self.cfg.keep_checkpoints)
        # with budget commits the targets steer the final phase: they are part of what the search is
        targets = dict(export_targets=",".join(str(int(t)) for t in config.export.targets)) \
            if self.cfg.budget_commits else {}
        self.config_hash, self.semantic = config_lib.run_identity(config, config_lib.SEARCH_SECTIONS, **targets)

    # -- structure ------------------------------------------------------------------------------

    def spec_of(self, progress: Progress) -> supernet.SuperNetSpec:
        return make_spec(self.cfg, self.ds.num_classes, cells_from_json(progress.cells), progress.stage)

    def fresh_state(self, spec: supernet.SuperNetSpec, salt: int) -> SearchState:
        """A new state for `spec` (fresh parameters, optimizer state at zero)."""
        key = jax.random.fold_in(self.init_key, salt)
        v = supernet.init_variables(spec, key, self.ds.image_shape)
        if not _steps_built:
            # The init runs op by op, and JAX keeps each op's compiled program, on the CPU ~1.4 MB of
            # malloc each: 490 MB for the 8-cell super-net of benchmarks/bench_search_step.py, a sixth
            # of the search's peak (benchmarks/README.md section 14). Before any step is built nothing
            # the search needs is compiled, so they go; a later init compiles the few it needs again.
            jax.clear_caches()
        trainable = {"params": v["params"], "arch": v["arch"]}
        return SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                           batch_stats=v["batch_stats"], masks=v["masks"], opt_state=self.tx.init(trainable))

    def rebuild(self, spec: supernet.SuperNetSpec, state: SearchState, salt: int, *, new_optimizer: bool,
                grows: bool, overrides: Optional[dict] = None) -> SearchState:
        """State for a new structure: fresh init, then every leaf that still fits carried over.

        `overrides` (collection -> numpy tree) replaces carried-over leaves first (e.g. sliced by a
        shrink or with new commits). `grows`: the new structure has tensors the old one lacks (new
        cells, a new head, regrown ops), which are initialised fresh. With new_optimizer=True (stage starts) the optimizer state starts
        at zero; otherwise the momentum of every unchanged tensor carries over (docs/method.md
        section 5: the optimizer state must follow every structural change).
        """
        old = {"params": state.params, "arch": state.arch, "batch_stats": state.batch_stats, "masks": state.masks}
        old = {k: jax.device_get(v) for k, v in old.items()}
        if overrides:
            old.update(overrides)
        if grows:
            fresh = self.fresh_state(spec, salt)
            carried = {k: pruning.graft(getattr(fresh, k), old[k]) for k in old}
        else:
            # nothing new to initialise (ops removed, channels sliced): skip compiling an init
            carried = {k: pruning.prune_tree(old[k], spec) for k in old}
        trainable = {"params": carried["params"], "arch": carried["arch"]}
        opt_state = self.tx.init(trainable)
        if not new_optimizer:
            opt_state = pruning.graft(opt_state, jax.device_get(state.opt_state))
        new = SearchState(step=state.step, opt_state=opt_state, **carried)
        return parallel.replicate(new, self.mesh)

    def step_fn(self, spec):
        """The step of a structure, cached (chained programs: compiles only the cells or edges that are new)."""
        global _steps_built
        _steps_built = True
        if spec not in self._steps:
            self._steps[spec] = step_lib.make_step(spec, self.tx, self.data_cfg, self.mean, self.std, self.cfg.programs)
        return self._steps[spec]

    # -- one epoch ------------------------------------------------------------------------------

    def run_epoch(self, spec, state: SearchState, progress: Progress,
                  scales: step_lib.GroupScales) -> tuple[SearchState, dict]:
        """One epoch (or the rest of one, after a mid-epoch preemption checkpoint): the mean of each
        metric, and 'finite' False when a step's loss or gradient was not finite (the epoch is cut)."""
        cfg = self.cfg
        step = self.step_fn(spec)
        split = self.ds.train
        n = split.steps_per_epoch(cfg.batch_size, True)
        if cfg.steps_per_epoch:
            n = min(n, cfg.steps_per_epoch)
        if n == 0:
            raise ValueError(f"search.batch_size = {cfg.batch_size} is larger than the training split "
                             f"({split.num_examples} examples); lower search.batch_size")
        start = progress.batch_in_epoch
        lam = jnp.float32(progress.lam)
        bilevel = cfg.bilevel and scales.alpha > 0
        # first-order bilevel (DARTS style): architecture on a held-out batch, then the weights
        arch_scales, weight_scales = scales._replace(weights=0.0), step_lib.GroupScales.weights_only(scales.weights)
        arch_batches = itertools.islice(self._cycle(self.ds.val, progress.epoch), start, None) if bilevel else None

        def one_step(state, i, batch):
            key = jax.random.fold_in(self.base_key, int(progress.epoch) * STEP_KEY_STRIDE + i)
            if not bilevel:
                return step(state, parallel.shard_batch(batch, self.mesh), key, lam, scales.asarrays())
            state, _ = step(state, parallel.shard_batch(next(arch_batches), self.mesh),
                            jax.random.fold_in(key, ARCH_BATCH_SALT), lam, arch_scales.asarrays())
            return step(state, parallel.shard_batch(batch, self.mesh), key, lam, weight_scales.asarrays())

        def save(state, end, metrics):
            progress.batch_in_epoch, progress.partial = end, _sums(progress.partial, metrics)
            self.save(state, progress)
            return self.ckpt.directory

        def compiled(seconds):
            self._compiled.add(spec)
            progress.compiles += 1
            progress.compile_seconds += seconds

        run = loop.run_epoch(
            state, one_step, split.batches(cfg.batch_size, epoch=progress.epoch, seed=self.config.seed, shuffle=True,
                                           drop_remainder=True),
            start=start, total=n, stop=self.stop, save=save, where=f"the search stopped at epoch {progress.epoch}",
            desc=f"stage {_stage_name(progress.stage)} {progress.phase} epoch {progress.epoch}", show=cfg.progress,
            on_compiled=None if spec in self._compiled else compiled)
        if run.bad is not None:
            return run.state, {"finite": False}
        stats = {k: float(v) / n for k, v in _sums(progress.partial, run.metrics).items()}
        stats["finite"] = stats["finite"] == 1.0
        progress.batch_in_epoch, progress.partial = 0, None
        return run.state, stats

    def _cycle(self, split, epoch: int):
        """The held-out split's batches, epoch after epoch (the bilevel variant's architecture data)."""
        while True:
            yield from split.batches(self.cfg.batch_size, epoch=epoch, seed=self.config.seed + 1, shuffle=True,
                                     drop_remainder=True)
            epoch += 1

    def evaluate(self, spec, state: SearchState, split) -> float:
        if split.num_examples == 0:
            return float("nan")
        if spec not in self._eval_steps:
            self._eval_steps[spec] = step_lib.make_eval_step(spec, self.mean, self.std)
        fn = self._eval_steps[spec]
        bs = self.cfg.eval_batch_size
        correct = total = 0.0
        for batch in split.batches(bs, epoch=0, seed=0, shuffle=False, drop_remainder=False):
            batch = parallel.pad_batch(batch, bs)
            c, t = fn(state, parallel.shard_batch(batch, self.mesh))
            correct += float(c)
            total += float(t)
        return correct / max(total, 1.0)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, state: SearchState, progress: Progress) -> None:
        meta = dict(progress=dataclasses.asdict(progress), config_hash=self.config_hash, config=self.semantic,
                    epoch=progress.epoch)
        # numbered by optimizer steps, so that a preemption checkpoint inside an epoch gets its own number
        self.ckpt.save(int(jax.device_get(state.step)), state, meta)
        self.ckpt.wait()

    def restore(self) -> Optional[tuple[SearchState, Progress]]:
        step = self.ckpt.latest_step()
        if step is None:
            return None
        meta = self.ckpt.meta(step)
        if meta.get("progress", {}).get("phase") == "done" and \
                _without_targets(meta.get("config", {})) == _without_targets(self.semantic):
            # a finished search exports again for other targets: they steered its final phase
            # (budget commits), but nothing of it runs again
            meta = dict(meta, config_hash=self.config_hash)
        ckpt_lib.check_same_run(meta, self.config_hash, self.semantic, self.workdir)
        progress = Progress(**meta["progress"])
        spec = self.spec_of(progress)
        like = self.fresh_state(spec, 0)
        state = self.ckpt.restore(step, like)
        logging.info("resumed the search at epoch %d (stage %s, %s)", progress.epoch,
                     _stage_name(progress.stage), progress.phase)
        return parallel.replicate(state, self.mesh), progress


def _without_targets(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if k != "_export_targets"}


def _restore_or_start(s: Searcher, all_cells) -> tuple[SearchState, Progress]:
    """The latest checkpoint's state and progress, or the start of the search (stage 1's cells) when
    there is none."""
    restored = s.restore()
    if restored is not None:
        return restored
    progress = Progress(cells=cells_to_json(all_cells[:built_cells(s.cfg.layers, 1)]))
    return parallel.replicate(s.fresh_state(s.spec_of(progress), SALT_START), s.mesh), progress


def _non_finite(s: Searcher, progress: Progress, all_cells) -> tuple[SearchState, Progress]:
    """A non-finite loss or gradient in this epoch: stop, or roll back (search.nan_policy).

    Nothing of the epoch is saved. Rolling back restores the latest checkpoint (the start of the
    search when there is none) and multiplies every group's learning rate by rollback_lr_factor.
    """
    cfg = s.cfg
    last = s.ckpt.latest_step()
    where = f"search epoch {progress.epoch} (stage {_stage_name(progress.stage)}, {progress.phase})"
    if cfg.nan_policy == "rollback" and progress.rollbacks < cfg.max_rollbacks:
        state, back = _restore_or_start(s, all_cells)
        back.lr_scale = progress.lr_scale * cfg.rollback_lr_factor
        back.rollbacks = progress.rollbacks + 1
        s.writer.truncate_after(back.epoch)
        _log(back, f"rollback {back.rollbacks}: non-finite loss or gradient in {where}; back to epoch "
                   f"{back.epoch}, learning rates x {back.lr_scale:g}")
        return state, back
    last = "no checkpoint yet" if last is None else \
        f"the last good checkpoint is epoch {s.ckpt.meta(last)['epoch']} in {s.ckpt.directory}"
    fix = ("search.max_rollbacks rollbacks did not help; lower search.lr or the architecture learning rates"
           if cfg.nan_policy == "rollback" else
           "lower search.lr or the architecture learning rates (or set search.nan_policy=rollback)")
    raise FloatingPointError(f"non-finite loss or gradient in {where}; {last}; nothing was saved from this "
                             f"epoch. To go on: {fix} and run the same command again to resume from it.")


def _stage_name(stage: int) -> str:
    return "final" if stage == FINAL else str(stage)


def _sums(partial: Optional[dict], metrics: list) -> Optional[dict]:
    """The sums of an epoch's step metrics so far: `partial` (those of a preemption checkpoint) plus
    `metrics`, added one by one in float32, as the device would (the same sums whether or not the
    epoch was interrupted)."""
    totals = None if partial is None else {k: np.float32(v) for k, v in partial.items()}
    for m in metrics:
        totals = {k: np.float32(v) for k, v in m.items()} if totals is None else \
            {k: np.float32(totals[k] + np.float32(m[k])) for k in totals}
    return None if totals is None else {k: float(v) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------
# The search

@config_lib.validates
def search(config, workdir: str) -> dict:
    """Runs (or resumes) the MGAS search in `workdir` and exports the target architectures.

    Returns the export summary: {target: path of its JSON}, plus the run's records.
    """
    os.makedirs(workdir, exist_ok=True)
    s = Searcher(config, workdir)
    cfg = s.cfg
    layers = cfg.layers
    all_cells = supernet.full_cells(cfg.init_channels, layers, cfg.steps)
    resumed = s.ckpt.latest_step() is not None
    state, progress = _restore_or_start(s, all_cells)
    s.writer = MetricWriter(workdir)
    if resumed:
        s.writer.truncate_after(progress.epoch)  # lines of the interrupted epoch are written again

    with s.stop:
        while progress.phase != "done":
            spec = s.spec_of(progress)
            if progress.phase == "start":
                state, progress = start_stage(s, state, progress, all_cells)
                continue
            scales = step_lib.GroupScales.weights_only() if progress.phase == "warmup" else step_lib.GroupScales()
            state, stats = s.run_epoch(spec, state, progress, scales.times(progress.lr_scale))
            if not stats["finite"]:
                state, progress = _non_finite(s, progress, all_cells)
                continue
            progress.epoch += 1
            progress.phase_epochs += 1
            s.writer.write(progress.epoch, progress.epoch, "search",
                           dict(stats, stage=progress.stage, lam=progress.lam, finite=1.0))
            state, progress = after_epoch(s, state, progress, stats)
            s.save(state, progress)
    s.writer.close()
    summary = export_lib.export_targets(os.path.join(workdir, "records"), progress.records,
                                        list(config.export.targets), os.path.join(workdir, "export"))
    for target, entry in summary.items():
        if "error" in entry:
            entry["error"] = unreachable_target(cfg, progress, int(target))
    targets = target_summary(progress, summary, list(config.export.targets), cfg.budget_window)
    result = dict(summary=summary, targets=targets, epochs=progress.epoch, compiles=progress.compiles,
                  compile_seconds=round(progress.compile_seconds, 1), log=progress.log, records=progress.records)
    export_lib.write_json(os.path.join(workdir, "search_result.json"), result)
    if jax.process_index() == 0:
        print(targets_table(targets, config.seed), flush=True)
    for target, entry in summary.items():  # last on the console: a budget the search missed is no quiet note
        if "error" in entry and jax.process_index() == 0:
            logging.warning("%s", entry["error"])
            print(f"export.targets {target}: {entry['error']}", flush=True)
    return result


def target_summary(progress: Progress, summary: dict, targets: list, window: float) -> dict:
    """Per target: the exported record's non-zero parameters, their ratio to the target and its
    validation accuracy, and `why` when there is no record in [window x target, target]."""
    out = {}
    for t in targets:
        entry, note = summary.get(str(t), {}), progress.targets.get(str(int(t)), {})
        if "index" not in entry:
            out[str(t)] = dict(params_nonzero=None, val_accuracy=None, why=note.get("why") or entry.get("error"))
            continue
        rec = progress.records[entry["index"]]
        n = rec["params"]["nonzero"]
        row = dict(params_nonzero=n, ratio=round(n / t, 4), val_accuracy=rec["val_accuracy"], record=entry["index"])
        if n < window * t:
            row["why"] = note.get("why") or (f"the first record at or below {t} has {n} non-zero parameters "
                                             f"({n / t:.3f} x); search.budget_commits = True aims the final "
                                             f"phase at the targets")
        out[str(t)] = row
    return out


def targets_table(targets: dict, seed: int) -> str:
    """The console's view of `target_summary`: one line per target."""
    lines = [f"search summary (seed {seed}): target, exported non-zero params, / target, val accuracy"]
    for t, row in targets.items():
        if row["params_nonzero"] is None:
            lines.append(f"  {int(t):>9,}  no record: {row['why']}")
            continue
        acc = row["val_accuracy"]
        acc = "-" if acc is None or acc != acc else f"{acc:.4f}"
        lines.append(f"  {int(t):>9,}  {row['params_nonzero']:>9,}  {row['ratio']:.3f}  {acc}"
                     + (f"  ({row['why']})" if row.get("why") else ""))
    return "\n".join(lines)


def unreachable_target(cfg, progress: Progress, target: int) -> str:
    """Why no record fits `target` non-zero parameters, and the change that would let one.

    The hint follows why the final phase ended (its last log line): the epoch cap, the size floor,
    or nothing left to prune, where only a smaller super-net gives smaller records.
    """
    records = progress.records
    if not records:
        return (f"no architecture was recorded, so nothing fits {target:,} parameters; the final phase records "
                f"one per commit: give it epochs (search.final_max_epochs = {cfg.final_max_epochs}, "
                f"search.commit_every = {cfg.commit_every})")
    smallest = min(r["params"]["nonzero"] for r in records)
    ended = next((line.split(": ", 1)[1] for line in reversed(progress.log)
                  if line.startswith("final phase ends: ")), "")
    smaller_net = (f"search a smaller super-net (now search.init_channels = {cfg.init_channels}, "
                   f"search.layers = {cfg.layers})")
    if "final_max_epochs" in ended:
        hint = (f"raise search.final_max_epochs (now {cfg.final_max_epochs}) so the final phase prunes on, "
                f"or {smaller_net}")
    elif "floor" in ended and cfg.final_size_floor > 0:
        hint = f"lower search.final_size_floor (now {cfg.final_size_floor}), or {smaller_net}"
    else:  # every node is down to one op: the last record is as small as this super-net gets
        hint = smaller_net
    return (f"no recorded architecture has <= {target:,} non-zero parameters: the smallest of the "
            f"{len(records)} records has {smallest:,} (final phase ended: {ended or 'unknown'}). To reach it, "
            f"{hint}; or choose a target of at least {smallest:,} (export.targets; a rerun with new targets "
            f"exports without searching again).")


def start_stage(s: Searcher, state: SearchState, progress: Progress, all_cells) -> tuple[SearchState, Progress]:
    """Build the sub-net of the stage, new optimizers, thresholds at 0, lambda at 0 (section 5)."""
    cfg = s.cfg
    cells = list(cells_from_json(progress.cells))
    n = built_cells(cfg.layers, progress.stage)
    cells = cells + list(all_cells[len(cells):n])
    progress.cells = cells_to_json(tuple(cells))
    spec = s.spec_of(progress)
    arch = pruning.reset_thresholds(jax.device_get(state.arch))
    state = s.rebuild(spec, state, salt=progress.stage * SALT_STAGE, new_optimizer=True, grows=True,
                      overrides={"arch": arch})
    lam = pruning.lambda_start(cfg.lambda0)
    progress.lam, progress.lam_d = lam.lam, lam.d
    progress.size_start = stage_size(spec, jax.device_get(state.masks))
    progress.pruned_in_stage = 0
    progress.phase = "warmup" if cfg.warmup_epochs > 0 else "prune"
    progress.phase_epochs = 0
    _log(progress, f"stage {_stage_name(progress.stage)}: {len(cells)} cells, size proxy {progress.size_start}")
    return state, progress


def after_epoch(s: Searcher, state: SearchState, progress: Progress, stats: dict) -> tuple[SearchState, Progress]:
    """What the end of an epoch decides: leave warm-up, commit, end a stage, regrow, finish."""
    cfg = s.cfg
    if progress.phase == "warmup":
        if progress.phase_epochs >= cfg.warmup_epochs:
            progress.phase, progress.phase_epochs = "prune", 0
        return state, progress
    if progress.phase == "regrow":
        # the released order: the regrowth epoch, regrow, then shrink (train_search.py ~783-797)
        state, progress = regrow_stage(s, state, progress)
        state, progress = shrink_now(s, state, progress)
        return next_stage(progress, state)
    # prune phase
    if not pruning.commit_due(progress.phase_epochs, cfg.first_commit_after, cfg.commit_every):
        return state, progress
    spec = s.spec_of(progress)
    final = progress.stage == FINAL
    if final:
        return final_round(s, spec, state, progress, stats)
    state, progress, pruned = commit_round(s, spec, state, progress, stats, final)
    spec = s.spec_of(progress)
    masks = jax.device_get(state.masks)
    size = stage_size(spec, masks)
    target = cfg.stage_size_ratio * progress.size_start
    if size < target or progress.phase_epochs >= cfg.max_stage_epochs:
        why = f"size proxy {size} < {target:.0f}" if size < target else f"search.max_stage_epochs = {cfg.max_stage_epochs}"
        _log(progress, f"stage {progress.stage} ends ({why})")
        if progress.stage in (2, 3) and cfg.regrow_fraction > 0:
            progress.phase, progress.phase_epochs = "regrow", 0
            return state, progress
        state, progress = shrink_now(s, state, progress)
        return next_stage(progress, state)
    return state, progress


def final_round(s: Searcher, spec, state: SearchState, progress: Progress, stats: dict):
    """A final-phase commit (whole, or aimed at the next target: `budget_commit`), the shrink, the
    record, and whether the phase ends."""
    cfg = s.cfg
    result, target = budget_commit(s, spec, state, progress) if cfg.budget_commits else (None, None)
    state, progress, _ = commit_round(s, spec, state, progress, stats, True, result, remove=cfg.final_rebuild)
    if cfg.final_rebuild:
        state, progress = shrink_now(s, state, progress)
    spec = s.spec_of(progress)
    rec = record_commit(s, spec, state, progress)
    if target is not None:
        _settle(progress, target, rec, cfg.budget_window)
    masks = pruning.to_numpy(jax.device_get(state.masks))
    targets = [int(t) for t in s.config.export.targets]
    settled = cfg.budget_commits and all(str(t) in progress.targets for t in targets)
    why = final_phase_end(cfg, spec, masks, settled, progress.phase_epochs)
    if why:
        _log(progress, f"final phase ends: {why}")
        progress.phase = "done"
        if cfg.budget_commits:
            for t in targets:  # the hint follows why the phase ended (more epochs help only when they ran out)
                progress.targets.setdefault(str(t), dict(why=unreachable_target(cfg, progress, t)))
    return state, progress


def final_phase_end(cfg, spec: supernet.SuperNetSpec, masks: dict, settled: bool, phase_epochs: int) -> Optional[str]:
    """Why the final phase ends after this round, or None when it goes on.

    An op-level search is done when every node is down to one op (the last one is protected), and so is
    the released code's final phase; an MGAS search aiming at budgets (search.budget_commits) goes on past
    that point, since filters and weights can still be pruned.
    """
    size = pruning.size_proxy(spec, masks)
    kept, _ = pruning.drop_committed_off(spec, dict(masks=masks))
    ops_left = any(len(c.ops_into(j)) > 1 for c in kept.cells for j in range(c.steps))  # all committed
    if settled:
        return "every export target has its record"
    if not (ops_left or (cfg.budget_commits and (spec.filter_level or spec.weight_level))):
        return "no op left to prune"
    if size < cfg.final_size_floor:
        return f"size proxy {size} < floor {cfg.final_size_floor}"
    if phase_epochs >= cfg.final_max_epochs:
        return f"search.final_max_epochs = {cfg.final_max_epochs} reached"
    return None


def _settle(progress: Progress, target: int, rec: dict, window: float) -> None:
    """Remember the record made for `target`, or why it misses [window x target, target]."""
    n = rec["params"]["nonzero"]
    if window * target <= n <= target:
        progress.targets[str(target)] = dict(record=rec["index"])
        return
    progress.targets[str(target)] = dict(record=rec["index"], why=(
        f"the partial commit for {target} reached {n} non-zero parameters ({n / target:.3f} x the target), "
        f"outside [{window}, 1]: single units (whole ops) remove more than the window; lower "
        f"search.budget_window or commit more often (search.commit_every)"))


def budget_commit(s: Searcher, spec, state: SearchState, progress: Progress):
    """The commit of this final-phase round, aimed at export.targets (budget.py).

    When the whole commit would take the exported non-zero count below a target that has no record
    yet, only the units furthest below their thresholds are committed, as many as land the count in
    [budget_window x target, target]. Targets already above the count before the commit can no longer
    be hit: the current state is recorded for them when it lies in their window, else the reason is
    kept. Returns (the commit to apply, the target it aims at or None).
    """
    cfg = s.cfg
    get = lambda x: pruning.to_numpy(jax.device_get(x))
    params, arch, masks, batch_stats = get(state.params), get(state.arch), get(state.masks), get(state.batch_stats)
    full = pruning.commit(spec, params, arch, masks, remove=False)
    units = budget.off_units(spec, params, arch, masks, full)
    sizes: dict = {}

    def size_of(chosen) -> int:
        chosen = np.sort(np.asarray(chosen, int))
        key = chosen.tobytes()
        if key not in sizes:
            a, m = budget.apply_units(spec, arch, masks, units, chosen)
            dropped, trees = pruning.drop_committed_off(spec, dict(params=params, arch=a, batch_stats=batch_stats,
                                                                   masks=m))
            shrunk, trees = pruning.shrink(dropped, trees)
            sizes[key] = export_lib.record_params(shrunk, trees["masks"], s.ds.image_shape,
                                                  spec.stem_channels)["nonzero"]
        return sizes[key]

    now, after = size_of([]), size_of(np.arange(len(units)))
    targets = sorted((int(t) for t in s.config.export.targets if str(int(t)) not in progress.targets), reverse=True)
    passed = [t for t in targets if now <= t]
    if passed:
        inside = [t for t in passed if now >= cfg.budget_window * t]
        if inside:
            rec = record_commit(s, spec, state, progress)
            for t in inside:
                _settle(progress, t, rec, cfg.budget_window)
        for t in passed:
            progress.targets.setdefault(str(t), dict(why=(
                f"the network entering the final phase already has {now} non-zero parameters, below "
                f"{cfg.budget_window} x {t}: search a larger super-net (search.init_channels) or prune less "
                f"in the stages (a higher search.stage_size_ratio)")))
    crossing = [t for t in targets if after <= t < now]
    if not crossing:
        return full, None
    target = max(crossing)
    chosen = budget.choose_units(units.margin, size_of, target, cfg.budget_window * target)
    a, m = budget.apply_units(spec, arch, masks, units, chosen)
    n_ops = len(units.ops)
    removed = [units.ops[i] for i in chosen if i < n_ops]
    leaf_kind = np.concatenate([np.full(idx.size, path[-1] == "kernel") for path, idx in units.leaves] or [[]])
    picked = leaf_kind[chosen[chosen >= n_ops] - n_ops].astype(bool)
    _log(progress, f"budget commit for target {target}: {len(chosen)} of {len(units)} off units "
                   f"({now} -> {size_of(chosen)} non-zero parameters; the whole commit: {after})")
    return pruning.CommitResult(spec, a, m, removed, int((~picked).sum()), int(picked.sum())), target


def next_stage(progress: Progress, state: SearchState) -> tuple[SearchState, Progress]:
    progress.stage = FINAL if progress.stage >= 3 else progress.stage + 1
    progress.phase, progress.phase_epochs = "start", 0
    return state, progress


def commit_round(s: Searcher, spec, state: SearchState, progress: Progress, stats: dict, final: bool,
                 result: Optional[pruning.CommitResult] = None, remove: Optional[bool] = None):
    """Commit live masks at all granularities (or apply `result`, a commit chosen by the caller),
    drop removed ops, update lambda."""
    cfg = s.cfg
    arch = jax.device_get(state.arch)
    # inside a stage a commit only flips mask values (same compiled step); in the final phase the
    # committed-off ops leave the structure at once (and channels shrink, see final_round), unless
    # search.final_rebuild is off
    remove = final if remove is None else remove
    r = result or pruning.commit(spec, jax.device_get(state.params), arch, jax.device_get(state.masks), remove=remove)
    progress.pruned_alpha.update(pruning.pruned_alphas(arch, r.removed))
    pruned = len(r.removed)
    progress.commits += 1
    progress.pruned_in_stage += pruned
    lam = pruning.lambda_update(pruning.LambdaState(progress.lam, progress.lam_d), pruned, lambda0=cfg.lambda0,
                                c0=cfg.lambda_c0, n=cfg.lambda_n, mean_ce=stats["ce"], mean_reg=stats["reg"],
                                cap_factor=0.5 if final else 1.0, cap=cfg.lambda_cap)
    progress.lam, progress.lam_d = lam.lam, lam.d
    progress.cells = cells_to_json(r.spec.cells)
    new_spec = s.spec_of(progress)
    overrides = {"arch": r.arch, "masks": r.masks}
    state = s.rebuild(new_spec, state, salt=SALT_COMMIT + progress.commits, new_optimizer=False, grows=False, overrides=overrides)
    units = pruning.count_units(new_spec, r.masks)
    _log(progress, f"commit {progress.commits} (epoch {progress.epoch}): -{pruned} ops, -{r.filters_off} filters, "
                   f"-{r.weights_off} weights; now {units['ops']} ops, {units['filters']} filters, "
                   f"{units['weights']} weights; lambda {progress.lam:.3g}")
    s.writer.write(progress.epoch, progress.epoch, "commit",
                   dict(pruned_ops=pruned, filters_off=r.filters_off, weights_off=r.weights_off, lam=progress.lam,
                        ops=units["ops"], filters=units["filters"], weights=units["weights"],
                        size=pruning.size_proxy(new_spec, r.masks)))
    return state, progress, pruned


def shrink_now(s: Searcher, state: SearchState, progress: Progress):
    """Physical filter pruning; optimizer state follows (unchanged tensors keep their momentum)."""
    spec = s.spec_of(progress)
    variables = {k: pruning.to_numpy(jax.device_get(getattr(state, k)))
                 for k in ("params", "arch", "batch_stats", "masks")}
    spec_kept, variables = pruning.drop_committed_off(spec, variables)
    new_spec, trees = pruning.shrink(spec_kept, variables)
    if new_spec == spec:
        return state, progress
    progress.cells = cells_to_json(new_spec.cells)
    state = s.rebuild(s.spec_of(progress), state, salt=SALT_SHRINK + progress.commits, new_optimizer=False,
                      grows=False, overrides=trees)
    return state, progress


def regrow_stage(s: Searcher, state: SearchState, progress: Progress):
    """After one epoch with frozen masks: regrow floor(regrow_fraction x ops pruned in the stage), each
    with its alpha from before it was pruned and its cell's common width (docs/method.md section 7)."""
    cfg = s.cfg
    spec = s.spec_of(progress)
    count = int(math.floor(cfg.regrow_fraction * progress.pruned_in_stage))
    arch = jax.device_get(state.arch)
    alpha = [arch[names.cell_name(i)]["alpha"] for i in range(len(spec.cells))]
    masks = jax.device_get(state.masks)
    active = [supernet.active_matrix(c) * masks[names.cell_name(i)][names.OPS_MASK] for i, c in enumerate(spec.cells)]
    probs = pruning.regrowth_probabilities(alpha, step_lib.arch_momentum(jax.device_get(state.opt_state), spec), active)
    key = jax.random.fold_in(jax.random.key(s.config.seed), SALT_REGROW_DRAW + progress.stage)
    draws = pruning.sample_regrowth(jax.random.fold_in(key, 0), probs, count)
    # the ops committed off in the stage leave the structure first: they are what can regrow
    trees = {k: pruning.to_numpy(jax.device_get(getattr(state, k))) for k in ("params", "arch", "batch_stats", "masks")}
    spec, trees = pruning.drop_committed_off(spec, trees)
    new_spec, grown = pruning.regrow(spec, jax.random.fold_in(key, 1), draws)
    new_spec, grown = pruning.size_regrown(new_spec, grown, trees["masks"], full_width_cells=(cfg.layers - 1,))
    _log(progress, f"stage {progress.stage} regrowth: {len(grown)} of {count} drawn ops regrown")
    progress.cells = cells_to_json(new_spec.cells)
    trees["arch"] = pruning.restore_regrown(trees["arch"], grown, progress.pruned_alpha)
    trees["masks"] = pruning.enable_ops(trees["masks"], grown)
    # regrown ops left every tree when they were pruned, so they start fresh here
    state = s.rebuild(s.spec_of(progress), state, salt=SALT_REGROW_INIT + progress.stage, new_optimizer=False,
                      grows=bool(grown), overrides=trees)
    return state, progress


def record_commit(s: Searcher, spec, state: SearchState, progress: Progress) -> dict:
    """Write the architecture of this final-phase commit (JSON + weight masks) and remember its summary.

    The record is the physically pruned network: ops committed off and channels that are not kept leave
    it here when the state still holds them (search.final_rebuild = False); otherwise it is the state's."""
    trees = {k: pruning.to_numpy(jax.device_get(getattr(state, k))) for k in ("params", "arch", "batch_stats", "masks")}
    kept, trees = pruning.drop_committed_off(spec, trees)
    pruned_spec, trees = pruning.shrink(kept, trees)
    masks = trees["masks"]
    # scored as exported: the committed masks alone (after a budget commit, units that are live-off but
    # not committed stay in the record, and in the network scored here)
    exported = state.replace(arch=parallel.replicate(pruning.thresholds_off(jax.device_get(state.arch)), s.mesh))
    val = s.evaluate(spec, exported, s.ds.val) if s.cfg.eval_records else float("nan")
    rec = export_lib.make_record(pruned_spec, masks, s.ds.image_shape, index=len(progress.records),
                                 epoch=progress.epoch, config=s.semantic, seed=s.config.seed, val_accuracy=val,
                                 stem_channels=spec.stem_channels)
    path = export_lib.write_record(os.path.join(s.workdir, "records"), rec,
                                   export_lib.derived_masks(masks, rec, weight_level=spec.weight_level))
    progress.records.append(dict(index=rec["index"], epoch=rec["epoch"], path=path, params=rec["params"],
                                 val_accuracy=val, counts=rec["counts"]))
    _log(progress, f"record {rec['index']}: {rec['params']['nonzero']} non-zero / {rec['params']['dense']} dense "
                   f"params, val acc {val:.4f}")
    return rec


def _log(progress: Progress, line: str) -> None:
    progress.log.append(line)
    logging.info("%s", line)
    if jax.process_index() == 0:
        print(line, flush=True)
