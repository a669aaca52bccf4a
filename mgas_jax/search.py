"""The MGAS search loop: stages of growing depth, warm-up, commits, regrowth, the final phase.

Read top to bottom, `search(config, workdir)` is the whole experiment (docs/method.md sections 3-5):

    for stage in 1, 2, 3, final:
        build the sub-net of the stage (earlier cells keep their state), reset thresholds, lambda = 0
        warm-up epochs: weights only
        prune: one-level epochs; every `commit_every` epochs commit live masks, update lambda
        stage end (size < stage_size_ratio x the stage's start size): shrink channels physically;
        after stages 2 and 3: one epoch with frozen masks, then regrow 20 % of the stage's pruned ops
    final phase: commits (with shrinking) until no op can go or the size floor; each commit is recorded
    export: the first recorded architecture at or below each target size

The jit-compiled step is a pure function of (state, batch, key, lambda, flags); every decision between
steps (commits, lambda, regrowth, shrinking) is a host-side function of the replicated state
(pruning.py). A checkpoint at the end of every epoch holds everything that determines the rest of
the run, so an interrupted search resumes and ends with the same architecture.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mgas_jax import checkpoint as ckpt_lib
from mgas_jax import config as config_lib
from mgas_jax import data as data_lib
from mgas_jax import export as export_lib
from mgas_jax import gates, losses, parallel, pruning, supernet
from mgas_jax import programs as programs_lib
from mgas_jax.genotype import cells_from_json, cells_to_json
from mgas_jax.metrics import MetricWriter

FINAL = 4  # the final phase, after the three stages


# ----------------------------------------------------------------------------------------------
# State

@flax.struct.dataclass
class SearchState:
    """Everything the jitted step reads and writes (replicated over the mesh)."""
    step: jax.Array
    params: Any          # network weights
    arch: Any            # alpha, beta, thresholds
    batch_stats: Any
    masks: Any           # committed filter and weight masks
    opt_state: Any


@dataclasses.dataclass
class Progress:
    """Host-side search state, saved as JSON beside every checkpoint."""
    stage: int = 1                 # 1, 2, 3 or FINAL
    phase: str = "start"           # start | warmup | prune | regrow | done
    epoch: int = 0                 # epochs finished in the whole search (data order and keys use it)
    phase_epochs: int = 0          # epochs finished in the current phase
    lam: float = 0.0
    lam_d: float = 0.0
    size_start: int = 0            # size proxy of the stage's cells at the stage start
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


Preempted = ckpt_lib.Preempted  # raised after a SIGTERM once the search has checkpointed where it stood


# ----------------------------------------------------------------------------------------------
# Optimisers: one per parameter group, routed by optax.partition

def param_labels(trainable: dict) -> dict:
    """'weights' for every network weight; arch leaves by name (docs/method.md section 4)."""
    def label(path, _):
        if path[0].key == "params":
            return "weights"
        name = path[-1].key
        if name == "alpha":
            return "alpha"
        if name == "beta":
            return "beta"
        if name == "t_w":
            return "weight_threshold"
        return "threshold"
    return jax.tree_util.tree_map_with_path(label, trainable)


GROUPS = ("weights", "alpha", "beta", "threshold", "weight_threshold")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """SGD with momentum for every group; clip and weight decay in the weights' chain only."""
    sgd = lambda lr: optax.sgd(lr, momentum=cfg.momentum)
    return optax.partition({
        "weights": optax.chain(losses.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
                               optax.add_decayed_weights(cfg.weight_decay), sgd(cfg.lr)),
        "alpha": sgd(cfg.alpha_lr),
        "beta": sgd(cfg.beta_lr),
        "threshold": sgd(cfg.threshold_lr),
        "weight_threshold": sgd(cfg.weight_threshold_lr),
    }, param_labels)


def arch_momentum(opt_state, spec: supernet.SuperNetSpec) -> list:
    """Per cell, the SGD momentum of alpha (used by the regrowth importance)."""
    trace = opt_state.inner_states["alpha"].inner_state[0].trace
    return [np.asarray(trace["arch"][f"cell_{i}"]["alpha"]) for i in range(len(spec.cells))]


# ----------------------------------------------------------------------------------------------
# Loss and step

def regularizers(arch: dict, masks: dict, spec: supernet.SuperNetSpec) -> tuple[jax.Array, jax.Array]:
    """(R_op, R_thr) over the committed ops of the built cells (docs/method.md section 3)."""
    r_op = r_thr = jnp.float32(0.0)
    for i, cell in enumerate(spec.cells):
        a = arch[f"cell_{i}"]
        committed = masks[f"cell_{i}"]["ops"]
        active = supernet.active_matrix(cell) * committed
        conv = supernet.conv_matrix(cell) * committed
        r_op += losses.op_sparsity(a["alpha"], active, gates.edge_nodes(cell.steps))
        r_thr += (losses.threshold_penalty(a["t_op"], active) + losses.threshold_penalty(a["t_pre"])
                  + (losses.threshold_penalty(a["t_k"], conv) if spec.filter_level else 0.0)
                  + (losses.threshold_penalty(a["t_w"], conv) if spec.weight_level else 0.0))
    return r_op, r_thr


def make_loss(spec: supernet.SuperNetSpec):
    """The search loss of one structure, CE + lam (R_op + R_thr), with the super-net in training mode:
    (trainable {'params', 'arch'}, batch_stats, masks, images, labels, lam) -> (loss, (batch_stats, metrics))."""
    model = supernet.SuperNet(spec)

    def loss_fn(trainable, batch_stats, masks, images, labels, lam):
        variables = {"params": trainable["params"], "arch": trainable["arch"],
                     "batch_stats": batch_stats, "masks": masks}
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        ce = losses.cross_entropy(logits, labels)
        r_op, r_thr = regularizers(trainable["arch"], masks, spec)
        metrics = _loss_metrics(ce, r_op, r_thr, lam, jnp.mean(jnp.argmax(logits, -1) == labels))
        return metrics["loss"], (updates["batch_stats"], metrics)

    return loss_fn


def _loss_metrics(ce, r_op, r_thr, lam, accuracy) -> dict:
    """The search loss CE + lam (R_op + R_thr) and the metrics a step reports (both step forms)."""
    return dict(loss=ce + lam * (r_op + r_thr), ce=ce, r_op=r_op, r_thr=r_thr, reg=lam * r_op, accuracy=accuracy)


def _apply_grads(tx, state: SearchState, grads, batch_stats, metrics: dict, flags) -> tuple[SearchState, dict]:
    """The update half of a search step: optimizer update of the flagged groups, non-finite flag."""
    trainable = {"params": state.params, "arch": state.arch}
    finite = losses.all_finite(grads)
    labels = param_labels(trainable)
    flag = {g: flags[i] for i, g in enumerate(GROUPS)}
    updates, new_opt = tx.update(grads, state.opt_state, trainable)
    updates = jax.tree.map(lambda u, l: u * flag[l], updates, labels)
    new_inner = {g: jax.tree.map(lambda n, o, f=flag[g]: jnp.where(f > 0, n, o),
                                 new_opt.inner_states[g], state.opt_state.inner_states[g])
                 for g in GROUPS}
    new_opt = new_opt._replace(inner_states=new_inner)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, finite=(finite & jnp.isfinite(metrics["loss"])).astype(jnp.float32))
    new = state.replace(step=state.step + 1, params=trainable["params"], arch=trainable["arch"],
                        batch_stats=batch_stats, opt_state=new_opt)
    return new, metrics


def make_step(spec: supernet.SuperNetSpec, tx: optax.GradientTransformation, data_cfg, mean, std,
              programs: str = "step"):
    """The pure search step for one structure: (state, batch, key, lam, flags) -> (state, metrics).

    `flags` (5,) float: 1 = update this group (GROUPS order), 0 = keep it (warm-up trains the weights
    only; the bilevel variant alternates). A frozen group keeps its parameters and optimizer state.

    `programs`: 'step' compiles the whole step as one XLA program; 'cell' and 'edge' run it as a
    chain of programs (`make_cell_step`), one forward and one backward per cell ('cell') or per part
    of a cell: op gates, preprocess layers, edges ('edge', `programs.edge_programs`). Same values, up
    to float reassociation; a chain compiles in less time, and a part whose structure and shapes were
    compiled before (in this structure or an earlier one) is never compiled again.
    """
    if programs in CHAIN_PROGRAMS:
        return make_cell_step(spec, tx, data_cfg, mean, std, programs)
    if programs != "step":
        raise ValueError(f"unknown step programs {programs!r}; choose 'step' (one program), 'cell' (per cell) "
                         "or 'edge' (per edge)")
    loss_fn = make_loss(spec)

    def step(state: SearchState, batch, key, lam, flags):
        images = data_lib.augment.augment_batch(key, batch["image"], data_cfg, mean, std, train=True)
        trainable = {"params": state.params, "arch": state.arch}
        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
            trainable, state.batch_stats, state.masks, images, batch["label"], lam)
        return _apply_grads(tx, state, grads, batch_stats, metrics, flags)

    return jax.jit(step, donate_argnums=0)


# -- the step as a chain of per-cell programs ----------------------------------------------------

CHAIN_PROGRAMS = ("cell", "edge")


def _pick(tree: dict, names) -> dict:
    return {k: tree[k] for k in names if k in tree}


def make_cell_step(spec: supernet.SuperNetSpec, tx: optax.GradientTransformation, data_cfg, mean, std,
                   programs: str = "cell"):
    """`make_step` as a chain of small programs: stem, each cell forward (keeping its residuals), head
    and loss, each cell backward, stem backward, then the update. Same arguments, same results (up to
    float reassociation) as the one-program step. `programs`: 'cell' runs each cell as one forward and
    one backward program, 'edge' as programs per part (`programs.edge_programs`).

    Why: the whole super-net step is one huge XLA program, whose compile time grows faster than its
    size and which any change of structure recompiles whole. Chained programs are keyed by their own
    structure and shapes, so after a commit only the cells (edges) that changed compile again, and
    cells (edges) of identical structure and shapes share one program: the unpruned super-net's edges
    are all alike within a stage. Without remat the residuals leaving each program are all
    materialised (no less memory than the one program); with `spec.remat` a program keeps only its
    inputs and its backward program recomputes the forward, so no program holds more than one cell's
    (edge's) activations (benchmarks/README.md, sections 7 and 8).
    """
    n = len(spec.cells)
    names = [f"cell_{i}" for i in range(n)]
    if programs == "edge":
        cells = [programs_lib.edge_programs(spec, i, spec.remat) for i in range(n)]
    else:
        cells = [programs_lib.cell_programs(supernet.cell_module(spec, i), spec.remat) for i in range(n)]
    stem, head = supernet.SuperStem(spec.stem_channels), supernet.SuperHead(spec)
    stem_names, head_names = supernet.STEM_NAMES, (supernet.head_name(spec),)

    @jax.jit
    def stem_forward(params, batch_stats, image, key):
        images = data_lib.augment.augment_batch(key, image, data_cfg, mean, std, train=True)

        def apply(p):
            x, updates = stem.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
            return x, updates["batch_stats"]
        return jax.vjp(apply, params, has_aux=True)

    stem_backward = jax.jit(programs_lib.pull_back)

    @jax.jit
    def head_loss(params, batch_stats, x, labels):
        def ce(p, x):
            logits, updates = head.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                         mutable=["batch_stats"])
            return losses.cross_entropy(logits, labels), (logits, updates.get("batch_stats", {}))
        (value, (logits, stats)), grads = jax.value_and_grad(ce, argnums=(0, 1), has_aux=True)(params, x)
        return value, jnp.mean(jnp.argmax(logits, -1) == labels), stats, grads

    @functools.partial(jax.jit, donate_argnums=0)
    def update(state, grads, batch_stats, ce, accuracy, lam, flags):
        # the penalty's gradient (the cells' backward programs gave the cross-entropy's)
        def penalty(arch):
            r_op, r_thr = regularizers(arch, state.masks, spec)
            return lam * (r_op + r_thr), (r_op, r_thr)
        (_, (r_op, r_thr)), reg_grads = jax.value_and_grad(penalty, has_aux=True)(state.arch)
        grads = dict(grads, arch=jax.tree.map(jnp.add, grads["arch"], reg_grads))
        metrics = _loss_metrics(ce, r_op, r_thr, lam, accuracy)
        return _apply_grads(tx, state, grads, batch_stats, metrics, flags)

    def step(state: SearchState, batch, key, lam, flags):
        params, bs = state.params, state.batch_stats
        x, stem_vjp, stem_stats = stem_forward(_pick(params, stem_names), _pick(bs, stem_names),
                                               batch["image"], key)
        outs, residuals, stats = [x, x], [], dict(stem_stats)
        for i, name in enumerate(names):
            variables = {"batch_stats": bs[name], "masks": state.masks[name]}
            out, res, stats[name] = cells[i][0](variables, params[name], state.arch[name], outs[i], outs[i + 1])
            outs.append(out)
            residuals.append(res)
        ce, accuracy, head_stats, (g_head, g_out) = head_loss(
            _pick(params, head_names), _pick(bs, head_names), outs[-1], batch["label"])
        stats.update(head_stats)
        g_params, g_arch = dict(g_head), {}
        g_outs = [None] * (n + 2)   # gradient w.r.t. outs[j]
        g_outs[-1] = g_out
        del outs
        for i in reversed(range(n)):
            g_params[names[i]], g_arch[names[i]], g0, g1 = cells[i][1](residuals[i], g_outs[i + 2])
            residuals[i] = g_outs[i + 2] = None   # free the cell's residuals as soon as they are used
            g_outs[i] = programs_lib.accumulate(g_outs[i], g0)
            g_outs[i + 1] = programs_lib.accumulate(g_outs[i + 1], g1)
        (g_stem,) = stem_backward(stem_vjp, g_outs[0] + g_outs[1])
        g_params.update(g_stem)
        return update(state, {"params": g_params, "arch": g_arch}, stats, ce, accuracy, lam, flags)

    return step


def make_eval_step(spec: supernet.SuperNetSpec, mean, std):
    model = supernet.SuperNet(spec)

    def step(state: SearchState, batch):
        images = data_lib.augment.normalize(batch["image"], mean, std)
        logits = model.apply({"params": state.params, "arch": state.arch, "batch_stats": state.batch_stats,
                              "masks": state.masks}, images, train=False)
        correct = (jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]
        return jnp.sum(correct), jnp.sum(batch["mask"])

    return jax.jit(step)


# ----------------------------------------------------------------------------------------------
# Stage structure

def stage_cells(layers: int, stage: int) -> range:
    """Cells searched in a stage: {0..L//3-1}, {L//3..2L//3-1}, {2L//3..L-1}; the final phase: all."""
    r1, r2 = supernet.reduction_layers(layers)
    return {1: range(0, r1), 2: range(r1, r2), 3: range(r2, layers), FINAL: range(0, layers)}[stage]


def built_cells(layers: int, stage: int) -> int:
    return stage_cells(layers, min(stage, 3)).stop


def make_spec(cfg, num_classes: int, cells: tuple, stage: int) -> supernet.SuperNetSpec:
    return supernet.SuperNetSpec(
        cells=tuple(cells), num_classes=num_classes, stem_channels=cfg.stem_multiplier * cfg.init_channels,
        head="classifier" if stage >= 3 else "stage", impl=cfg.impl, remat=cfg.remat,
        dtype=None if cfg.dtype == "float32" else cfg.dtype,
        filter_level=cfg.filter_level, weight_level=cfg.weight_level)


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
        self.tx = make_optimizer(self.cfg)
        self.base_key = jax.random.key(config.seed)
        self.init_key = jax.random.key(config.seed, impl="rbg")  # fast to compile on CPU
        self._steps: dict = {}
        self._eval_steps: dict = {}
        self._compiled: set = set()
        self.stop_requested = False
        self.writer = None  # opened once the workdir is known to hold this run (see `search`)
        self.ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=self.cfg.keep_checkpoints)
        # What determines a search: seed, data and the search section (not train.* or export.*, so that
        # mode=all can change the retraining or the targets and still resume its search).
        full = config_lib.semantic_dict(config)
        self.semantic = {k: full[k] for k in ("seed", "data", "search") if k in full}
        self.config_hash = hashlib.sha256(json.dumps(self.semantic, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    # -- structure ------------------------------------------------------------------------------

    def spec_of(self, progress: Progress) -> supernet.SuperNetSpec:
        return make_spec(self.cfg, self.ds.num_classes, cells_from_json(progress.cells), progress.stage)

    def fresh_state(self, spec: supernet.SuperNetSpec, salt: int) -> SearchState:
        """A new state for `spec` (fresh parameters, optimizer state at zero)."""
        key = jax.random.fold_in(self.init_key, salt)
        v = supernet.init_variables(spec, key, self.ds.image_shape)
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
        if spec not in self._steps:
            self._steps[spec] = make_step(spec, self.tx, self.data_cfg, self.mean, self.std, self.cfg.programs)
        return self._steps[spec]

    # -- one epoch ------------------------------------------------------------------------------

    def run_epoch(self, spec, state: SearchState, progress: Progress, flags) -> tuple[SearchState, dict]:
        """One epoch (or the rest of one, after a mid-epoch preemption checkpoint)."""
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
        batches = itertools.islice(split.batches(cfg.batch_size, epoch=progress.epoch, seed=self.config.seed,
                                                 shuffle=True, drop_remainder=True), start, n)
        bilevel = cfg.bilevel and flags[1] > 0
        if bilevel:
            arch_batches = itertools.islice(self._cycle(self.ds.val, progress.epoch), start, None)
        lam = jnp.float32(progress.lam)
        totals = None if progress.partial is None else {k: jnp.float32(v) for k, v in progress.partial.items()}
        bar = _progress_bar(n, f"stage {_stage_name(progress.stage)} {progress.phase} epoch {progress.epoch}",
                            self.config.search.progress)
        bar.update(start)
        first = spec not in self._compiled
        t0 = time.time()
        for i, batch in enumerate(batches, start):
            key = jax.random.fold_in(self.base_key, int(progress.epoch) * 1_000_003 + i)
            if bilevel:
                # first-order bilevel (DARTS style): architecture on a held-out batch, then the weights
                a_flags = jnp.asarray([0.0] + list(flags[1:]), jnp.float32)
                state, _ = step(state, parallel.shard_batch(next(arch_batches), self.mesh),
                                jax.random.fold_in(key, 1), lam, a_flags)
                w_flags = jnp.asarray([flags[0], 0, 0, 0, 0], jnp.float32)
                state, m = step(state, parallel.shard_batch(batch, self.mesh), key, lam, w_flags)
            else:
                state, m = step(state, parallel.shard_batch(batch, self.mesh), key, lam,
                                jnp.asarray(flags, jnp.float32))
            if first:
                jax.block_until_ready(m)
                self._compiled.add(spec)
                progress.compiles += 1
                progress.compile_seconds += time.time() - t0
                first = False
            totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
            bar.update(1)
            if self.stop_requested:
                # preemption: checkpoint the exact position inside the epoch, then leave
                progress.batch_in_epoch = i + 1
                progress.partial = {k: float(v) for k, v in jax.device_get(totals).items()}
                if progress.partial["finite"] != i + 1:
                    raise FloatingPointError(f"non-finite loss or gradient in search epoch {progress.epoch}; "
                                             f"SIGTERM received, and nothing was saved from this epoch")
                self.save(state, progress)
                bar.close()
                raise Preempted(f"SIGTERM: the search stopped at epoch {progress.epoch}, batch {i + 1} of {n}, "
                                f"and checkpointed there in {self.ckpt.directory}; run the same command again "
                                f"to resume")
        bar.close()
        stats = {k: float(v) / n for k, v in jax.device_get(totals).items()}
        stats["finite"] = stats["finite"] == 1.0
        progress.batch_in_epoch, progress.partial = 0, None
        return state, stats

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
            self._eval_steps[spec] = make_eval_step(spec, self.mean, self.std)
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
        ckpt_lib.check_same_run(meta, self.config_hash, self.semantic, self.workdir)
        progress = Progress(**meta["progress"])
        spec = self.spec_of(progress)
        like = self.fresh_state(spec, 0)
        state = self.ckpt.restore(step, like)
        logging.info("resumed the search at epoch %d (stage %s, %s)", progress.epoch,
                     _stage_name(progress.stage), progress.phase)
        return parallel.replicate(state, self.mesh), progress


def _restore_or_start(s: Searcher, all_cells) -> tuple[SearchState, Progress]:
    """The latest checkpoint's state and progress, or the start of the search (stage 1's cells) when
    there is none."""
    restored = s.restore()
    if restored is not None:
        return restored
    progress = Progress(cells=cells_to_json(all_cells[:built_cells(s.cfg.layers, 1)]))
    return parallel.replicate(s.fresh_state(s.spec_of(progress), 0), s.mesh), progress


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


def _progress_bar(total: int, desc: str, enabled: bool):
    import tqdm
    return tqdm.tqdm(total=total, desc=desc, leave=False, disable=not enabled or jax.process_index() != 0)


# ----------------------------------------------------------------------------------------------
# The search

def search(config, workdir: str) -> dict:
    """Runs (or resumes) the MGAS search in `workdir` and exports the target architectures.

    Returns the export summary: {target: path of its JSON}, plus the run's records.
    """
    config_lib.validate(config)
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

    with _sigterm_checkpoint(s):
        while progress.phase != "done":
            spec = s.spec_of(progress)
            if progress.phase == "start":
                state, progress = start_stage(s, state, progress, all_cells)
                continue
            # A flag scales its group's update, and SGD's update is linear in the learning rate.
            flags = [1.0, 0.0, 0.0, 0.0, 0.0] if progress.phase == "warmup" else [1.0] * 5
            flags = [f * progress.lr_scale for f in flags]
            state, stats = s.run_epoch(spec, state, progress, flags)
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
    result = dict(summary=summary, epochs=progress.epoch, compiles=progress.compiles,
                  compile_seconds=round(progress.compile_seconds, 1), log=progress.log, records=progress.records)
    export_lib.write_json(os.path.join(workdir, "search_result.json"), result)
    return result


def start_stage(s: Searcher, state: SearchState, progress: Progress, all_cells) -> tuple[SearchState, Progress]:
    """Build the sub-net of the stage, new optimizers, thresholds at 0, lambda at 0 (section 5)."""
    cfg = s.cfg
    cells = list(cells_from_json(progress.cells))
    n = built_cells(cfg.layers, progress.stage)
    cells = cells + list(all_cells[len(cells):n])
    progress.cells = cells_to_json(tuple(cells))
    spec = s.spec_of(progress)
    arch = pruning.reset_thresholds(jax.device_get(state.arch))
    state = s.rebuild(spec, state, salt=progress.stage * 7919, new_optimizer=True, grows=True,
                      overrides={"arch": arch})
    lam = pruning.lambda_start(cfg.lambda0)
    progress.lam, progress.lam_d = lam.lam, lam.d
    progress.size_start = pruning.size_proxy(spec, jax.device_get(state.masks),
                                             stage_cells(cfg.layers, progress.stage))
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
        state, progress = regrow_stage(s, state, progress)
        return next_stage(progress, state)
    # prune phase
    if progress.phase_epochs % cfg.commit_every:
        return state, progress
    spec = s.spec_of(progress)
    final = progress.stage == FINAL
    state, progress, pruned = commit_round(s, spec, state, progress, stats, final)
    spec = s.spec_of(progress)
    masks = jax.device_get(state.masks)
    if final:
        state, progress = shrink_now(s, state, progress)
        spec = s.spec_of(progress)
        record_commit(s, spec, state, progress)
        size = pruning.size_proxy(spec, jax.device_get(state.masks))
        prunable = any(len(c.ops_into(j)) > 1 for c in spec.cells for j in range(c.steps))  # all committed
        if not prunable or size < cfg.final_size_floor or progress.phase_epochs >= cfg.final_max_epochs:
            why = ("no op left to prune" if not prunable else
                   f"size proxy {size} < floor {cfg.final_size_floor}" if size < cfg.final_size_floor else
                   f"search.final_max_epochs = {cfg.final_max_epochs} reached")
            _log(progress, f"final phase ends: {why}")
            progress.phase = "done"
        return state, progress
    size = pruning.size_proxy(spec, masks, stage_cells(cfg.layers, progress.stage))
    target = cfg.stage_size_ratio * progress.size_start
    if size < target or progress.phase_epochs >= cfg.max_stage_epochs:
        why = f"size proxy {size} < {target:.0f}" if size < target else f"search.max_stage_epochs = {cfg.max_stage_epochs}"
        _log(progress, f"stage {progress.stage} ends ({why})")
        state, progress = shrink_now(s, state, progress)
        if progress.stage in (2, 3) and cfg.regrow_fraction > 0:
            progress.phase, progress.phase_epochs = "regrow", 0
            return state, progress
        return next_stage(progress, state)
    return state, progress


def next_stage(progress: Progress, state: SearchState) -> tuple[SearchState, Progress]:
    progress.stage = FINAL if progress.stage >= 3 else progress.stage + 1
    progress.phase, progress.phase_epochs = "start", 0
    return state, progress


def commit_round(s: Searcher, spec, state: SearchState, progress: Progress, stats: dict, final: bool):
    """Commit live masks at all granularities, drop removed ops, update lambda."""
    cfg = s.cfg
    # inside a stage a commit only flips mask values (same compiled step); in the final phase the
    # committed-off ops leave the structure at once (and channels shrink, see after_epoch)
    r = pruning.commit(spec, jax.device_get(state.params), jax.device_get(state.arch), jax.device_get(state.masks),
                       remove=final)
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
    state = s.rebuild(new_spec, state, salt=progress.commits, new_optimizer=False, grows=False, overrides=overrides)
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
    state = s.rebuild(s.spec_of(progress), state, salt=10_000 + progress.commits, new_optimizer=False,
                      grows=False, overrides=trees)
    return state, progress


def regrow_stage(s: Searcher, state: SearchState, progress: Progress):
    """After one epoch with frozen masks: regrow floor(regrow_fraction x ops pruned in the stage)."""
    cfg = s.cfg
    spec = s.spec_of(progress)
    count = int(math.floor(cfg.regrow_fraction * progress.pruned_in_stage))
    arch = jax.device_get(state.arch)
    alpha = [arch[f"cell_{i}"]["alpha"] for i in range(len(spec.cells))]
    masks = jax.device_get(state.masks)
    active = [supernet.active_matrix(c) * masks[f"cell_{i}"]["ops"] for i, c in enumerate(spec.cells)]
    probs = pruning.regrowth_probabilities(alpha, arch_momentum(jax.device_get(state.opt_state), spec), active)
    key = jax.random.fold_in(jax.random.key(s.config.seed), 50_000 + progress.stage)
    draws = pruning.sample_regrowth(jax.random.fold_in(key, 0), probs, count)
    new_spec, grown = pruning.regrow(spec, jax.random.fold_in(key, 1), draws)
    _log(progress, f"stage {progress.stage} regrowth: {len(grown)} of {count} drawn ops regrown")
    if grown:
        progress.cells = cells_to_json(new_spec.cells)
        arch = pruning.reset_regrown(arch, grown)
        masks = pruning.enable_ops(jax.device_get(state.masks), grown)
        # regrown ops left every tree at their stage's end, so they start fresh here
        state = s.rebuild(s.spec_of(progress), state, salt=20_000 + progress.stage, new_optimizer=False,
                          grows=True, overrides={"arch": arch, "masks": masks})
    return state, progress


def record_commit(s: Searcher, spec, state: SearchState, progress: Progress) -> None:
    """Write the architecture of this final-phase commit (JSON + weight masks) and remember its summary."""
    masks = jax.device_get(state.masks)
    val = s.evaluate(spec, state, s.ds.val) if s.cfg.eval_records else float("nan")
    rec = export_lib.make_record(spec, masks, s.ds.image_shape, index=len(progress.records), epoch=progress.epoch,
                                 config=s.semantic, seed=s.config.seed, val_accuracy=val,
                                 stem_channels=spec.stem_channels)
    path = export_lib.write_record(os.path.join(s.workdir, "records"), rec,
                                   export_lib.derived_masks(masks, rec, weight_level=spec.weight_level))
    progress.records.append(dict(index=rec["index"], epoch=rec["epoch"], path=path, params=rec["params"],
                                 val_accuracy=val, counts=rec["counts"]))
    _log(progress, f"record {rec['index']}: {rec['params']['nonzero']} non-zero / {rec['params']['dense']} dense "
                   f"params, val acc {val:.4f}")


def _log(progress: Progress, line: str) -> None:
    progress.log.append(line)
    logging.info("%s", line)
    if jax.process_index() == 0:
        print(line, flush=True)


class _sigterm_checkpoint(ckpt_lib.SigtermFlag):
    """SIGTERM sets `searcher.stop_requested`: the epoch loop checkpoints the exact position (epoch,
    batch, partial metric sums) and raises `Preempted`; the next run resumes at the following batch."""

    def __init__(self, searcher: Searcher):
        super().__init__()
        self.searcher = searcher

    def _handle(self, signum, frame):
        super()._handle(signum, frame)
        self.searcher.stop_requested = True

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.searcher.ckpt.wait()
        return False
