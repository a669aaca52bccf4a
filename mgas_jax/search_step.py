"""The pure, jit-compiled search step: its state, the optimizer groups, the loss and both step forms.

`make_step(spec, tx, ...)` returns `(state, batch, key, lam, scales) -> (state, metrics)`, one XLA
program or a chain of per-cell (per-edge) programs with the same values; `make_eval_step` the
evaluation of a structure. Nothing here decides anything between steps: the stages, commits and
regrowth around it are search.py's (docs/method.md sections 3-5).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mgas_jax import data as data_lib
from mgas_jax import gates, losses, names, supernet
from mgas_jax import programs as programs_lib


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


class GroupScales(NamedTuple):
    """The factor of each parameter group's update in one step (docs/method.md section 4).

    0 freezes a group: its parameters and optimizer state stay bit for bit (warm-up trains the weights
    only; the bilevel variant alternates). 1 trains it; a factor below 1 lowers its learning rate
    (SGD's update is linear in it: search.nan_policy=rollback). The step takes the factors as traced
    float32 scalars (`asarrays`), so switching groups between steps never recompiles.
    """
    weights: Any = 1.0
    alpha: Any = 1.0
    beta: Any = 1.0
    threshold: Any = 1.0
    weight_threshold: Any = 1.0

    @classmethod
    def weights_only(cls, scale: float = 1.0) -> "GroupScales":
        return cls(weights=scale, alpha=0.0, beta=0.0, threshold=0.0, weight_threshold=0.0)

    def times(self, factor: float) -> "GroupScales":
        return GroupScales(*(s * factor for s in self))

    def asarrays(self) -> "GroupScales":
        return GroupScales(*(jnp.float32(s) for s in self))


def scaled_by_group(inner: optax.GradientTransformation, group: str) -> optax.GradientTransformationExtraArgs:
    """`inner`, with its updates multiplied by the group's factor, given at update time.

    update(updates, state, params, *, scales, group_norms=None) -> (inner's updates x scales.<group>,
    inner's new state where that factor is > 0, else `state` as it was). `scales` is a GroupScales (any
    object with an attribute per group); the state is inner's own, so the optimizer state keeps its
    structure. `group_norms` ({group: the L2 norm of the group's whole gradient}, given when `updates`
    is only a part of the tree: `update_by_parts`) reaches inner as `group_norm=group_norms[group]`
    (losses.clip_by_global_norm clips by it).

    Why not `optax.masked(optax.set_to_zero(), mask)`: its mask is static, and the search switches
    groups on and off between steps of one compiled program, so the factor is a traced scalar.
    """
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, *, scales, group_norms=None, **extra_args):
        del extra_args
        scale = getattr(scales, group)
        norm = {} if group_norms is None else {"group_norm": group_norms[group]}
        new_updates, new_state = inner.update(updates, state, params, **norm)
        new_updates = jax.tree.map(lambda u: u * scale, new_updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(scale > 0, new, old), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update)


class PartwiseOptimizer(optax.GradientTransformationExtraArgs):
    """An optimizer (param_labels' groups, `scaled_by_group`) that acts leaf by leaf, except for norms
    over a whole group, which it takes from the `group_norms` extra argument when given.

    Such an optimizer gives the same update on any part of the trainable tree (with that part of its
    state) as on the whole, so the chained step may run it as one small program per part
    (`update_by_parts`). Any other optimizer (say optax's own clip_by_global_norm, which would clip a
    part by the part's norm) is run over the whole tree in one program.
    """
    __slots__ = ()


def make_optimizer(cfg) -> PartwiseOptimizer:
    """SGD with momentum for every group; clip and weight decay in the weights' chain only.

    update(grads, state, params, scales=GroupScales(...)): each group's update times its factor.
    """
    sgd = lambda lr: optax.sgd(lr, momentum=cfg.momentum)
    groups = {
        "weights": optax.chain(losses.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
                               optax.add_decayed_weights(cfg.weight_decay), sgd(cfg.lr)),
        "alpha": sgd(cfg.alpha_lr),
        "beta": sgd(cfg.beta_lr),
        "threshold": sgd(cfg.threshold_lr),
        "weight_threshold": sgd(cfg.weight_threshold_lr),
    }
    return PartwiseOptimizer(*optax.partition({g: scaled_by_group(tx, g) for g, tx in groups.items()}, param_labels))


def arch_momentum(opt_state, spec: supernet.SuperNetSpec) -> list:
    """Per cell, the SGD momentum of alpha (used by the regrowth importance): the `trace` of the
    alpha group's optimizer state."""
    in_alpha_group = lambda path, _: any(getattr(k, "key", None) == "alpha" for k in path)
    trace = optax.tree_utils.tree_get(opt_state, "trace", filtering=in_alpha_group)
    return [np.asarray(trace["arch"][names.cell_name(i)]["alpha"]) for i in range(len(spec.cells))]


# ----------------------------------------------------------------------------------------------
# Loss and step

def regularizers(arch: dict, masks: dict, spec: supernet.SuperNetSpec) -> tuple[jax.Array, jax.Array]:
    """(R_op, R_thr) of the built cells (docs/method.md sections 3 and 7).

    R_op, as the released code (model_search.py ~441-463, ~512, ~522): only the cells in
    `spec.penalised` (the current stage's; all in stage 1 and the final phase), an op counting when its
    live (protected) mask is on, S_j over every committed op into the node, live or not. R_thr over
    the committed units of every built cell.
    """
    r_op = r_thr = jnp.float32(0.0)
    penalised = range(len(spec.cells)) if spec.penalised is None else spec.penalised
    for i, cell in enumerate(spec.cells):
        a = arch[names.cell_name(i)]
        committed = masks[names.cell_name(i)][names.OPS_MASK]
        active = supernet.active_matrix(cell) * committed
        conv = supernet.conv_matrix(cell) * committed
        nodes = gates.edge_nodes(cell.steps)
        if i in penalised:
            _, live = gates.op_gate(a["alpha"], a["t_op"], active, nodes)
            r_op += losses.op_sparsity(a["alpha"], live, nodes, cell.steps, scored=active)
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


def _apply_grads(tx, state: SearchState, grads, batch_stats, metrics: dict,
                 scales: GroupScales) -> tuple[SearchState, dict]:
    """The update half of a search step: each group's update times its factor, non-finite flag."""
    trainable = {"params": state.params, "arch": state.arch}
    finite = losses.all_finite(grads)
    updates, new_opt = tx.update(grads, state.opt_state, trainable, scales=scales)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, finite=(finite & jnp.isfinite(metrics["loss"])).astype(jnp.float32))
    new = state.replace(step=state.step + 1, params=trainable["params"], arch=trainable["arch"],
                        batch_stats=batch_stats, opt_state=new_opt)
    return new, metrics


# -- the update part by part (the chained step) --------------------------------------------------

def update_parts(trainable: dict) -> tuple:
    """The parts of a super-net's trainable tree {'params', 'arch'} for `update_by_parts`.

    Per cell: each edge (its ops' variables), each preprocess layer, and the cell's own arch leaves
    (alpha and the thresholds); outside the cells, each top-level module (stem, head). A part is a
    tuple of entries (root, path, key): `trainable[root][path]` is `part[root][key]`, keyed by op kind
    ('sep_conv_3x3'), 'pre' or the leaf's name, not by position, so that every part of the same kind
    and shapes is the same tree and runs one compiled program, in any cell and any structure.
    """
    parts: dict = {}
    for root, tree in trainable.items():
        for top, sub in tree.items():
            if names.cell_index(top) is None or not isinstance(sub, dict):
                parts.setdefault((top,), []).append((root, (top,), top))
                continue
            for k in sub:
                op = names.parse_op_name(k)
                part, key = (((top, op[0], op[1]), op[2]) if op else ((top, k), "pre") if k in names.PRE
                             else ((top, "own"), k))
                parts.setdefault(part, []).append((root, (top, k), key))
    return tuple(tuple(entries) for entries in parts.values())


def take_part(tree: dict, part: tuple) -> dict:
    """The part of a trainable-shaped tree (params, gradients, an optimizer state's trace)."""
    out: dict = {}
    for root, path, key in part:
        out.setdefault(root, {})[key] = names.get_path(tree[root], path)
    return out


def join_parts(like: dict, trees, plan: tuple) -> dict:
    """The trainable-shaped tree of `like`'s structure whose parts (`update_parts`) are `trees`."""
    out = {root: {top: dict(sub) if isinstance(sub, dict) else sub for top, sub in tree.items()}
           for root, tree in like.items()}
    for tree, part in zip(trees, plan):
        for root, path, key in part:
            node = out[root]
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = tree[root][key]
    return out


def _is_trainable(x) -> bool:
    return isinstance(x, dict) and bool(x) and set(x) <= {"params", "arch"}


def _state_part(opt_state, part: tuple):
    """The part of an optimizer state: `take_part` of every trainable-shaped tree in it (the traces)."""
    return jax.tree.map(lambda t: take_part(t, part), opt_state, is_leaf=_is_trainable)


@functools.lru_cache(maxsize=8)
def _part_programs(tx: PartwiseOptimizer) -> tuple:
    """`update_by_parts`' programs: a part's sums of squares, a part's update (each shared by every part,
    cell and structure of the same tree and shapes), and the groups' norms from the parts' sums."""
    groups = GroupScales._fields

    @jax.jit
    def part_norms(grads):
        # () per group: the sum of the squares of the part's gradient in that group; () bool: all finite
        leaves, labels = jax.tree.leaves(grads), jax.tree.leaves(param_labels(grads))
        sums = [jnp.sum(jnp.square(losses.flat_values([g for g, label in zip(leaves, labels) if label == group])))
                for group in groups]
        return jnp.stack(sums), losses.all_finite(grads)

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def part_update(trainable, grads, opt_state, scales, group_norms):
        updates, opt_state = tx.update(grads, opt_state, trainable, scales=scales, group_norms=group_norms)
        return optax.apply_updates(trainable, updates), opt_state

    @jax.jit
    def group_norms(sums, finite, loss):
        norms = jnp.sqrt(jnp.sum(jnp.stack(sums), axis=0))
        return dict(zip(groups, norms)), (jnp.all(jnp.stack(finite)) & jnp.isfinite(loss)).astype(jnp.float32)

    return part_norms, part_update, group_norms


def update_by_parts(tx: PartwiseOptimizer, plan: tuple, trainable: dict, grads: dict, opt_state,
                    scales: GroupScales, loss) -> tuple[dict, Any, jax.Array]:
    """`tx`'s update of `trainable`, run as small programs per part (`update_parts`):
    -> (new trainable, new optimizer state, finite flag: the gradients and the loss are finite).

    First each part's sums of squares per group (and whether it is finite), then each part's update
    with the norms of the whole groups (`PartwiseOptimizer`): the same values as `tx.update` on the
    whole tree, up to float reassociation in the norms.

    Why: XLA's CPU backend keeps about 1.5 GB of host memory for the compiled update of an 8-cell
    super-net's ~3,500 trainable leaves in one program, and compiles it in 40-55 s for every
    structure (benchmarks/README.md sections 17 and 18). Parts of the same kind (an edge's ops at one width)
    share a program, so a super-net compiles a few dozen small ones, once for all its structures.
    """
    part_norms, part_update, group_norms = _part_programs(tx)
    g_parts = [take_part(grads, part) for part in plan]
    sums, finite = zip(*(part_norms(g) for g in g_parts))
    norms, finite = group_norms(list(sums), list(finite), loss)
    new = [part_update(take_part(trainable, part), g, _state_part(opt_state, part), scales, norms)
           for part, g in zip(plan, g_parts)]
    new_trainable = join_parts(trainable, [t for t, _ in new], plan)
    new_opt = jax.tree.map(lambda like, *trees: join_parts(like, trees, plan), opt_state, *(o for _, o in new),
                           is_leaf=_is_trainable)
    return new_trainable, new_opt, finite


def resolve_programs(programs: str, backend: Optional[str] = None) -> str:
    """The step form that `programs` names on `backend` (default: JAX's default backend).

    'auto' is 'edge' on a CPU and 'step' elsewhere. On XLA's CPU backend the per-edge chain was
    measured better on both counts (benchmarks/README.md sections 8-9: the 8-cell super-net's first
    step compiles in ~40 s instead of ~600 s, and its step runs faster with remat than the one
    program). On a GPU or TPU the one program is chosen because a chained step dispatches ~500 small
    programs from Python per step (each paying launch and host overhead, with no fusion across
    their boundaries), while the accelerator runs a whole step's kernels in a few milliseconds;
    compile time there is a smaller share of a long search. That choice is reasoned, not yet
    measured: benchmarks/device_check.sh times all three forms on a GPU.
    """
    if programs != "auto":
        return programs
    backend = jax.default_backend() if backend is None else backend
    return "edge" if backend == "cpu" else "step"


def make_step(spec: supernet.SuperNetSpec, tx: optax.GradientTransformation, data_cfg, mean, std,
              programs: str = "step"):
    """The pure search step for one structure: (state, batch, key, lam, scales) -> (state, metrics).

    `scales`: GroupScales of float32 scalars, each group's update factor (0 freezes the group: its
    parameters and optimizer state are kept).

    `programs`: 'step' compiles the whole step as one XLA program; 'cell' and 'edge' run it as a
    chain of programs (`make_cell_step`), one forward and one backward per cell ('cell') or per part
    of a cell: op gates, preprocess layers, edges ('edge', `programs.edge_programs`). Same values, up
    to float reassociation; a chain compiles in less time, and a part whose structure and shapes were
    compiled before (in this structure or an earlier one) is never compiled again.
    """
    programs = resolve_programs(programs)
    if programs in CHAIN_PROGRAMS:
        return make_cell_step(spec, tx, data_cfg, mean, std, programs)
    if programs != "step":
        raise ValueError(f"unknown step programs {programs!r}; choose 'auto' (by backend), 'step' (one program), "
                         "'cell' (per cell) or 'edge' (per edge)")
    loss_fn = make_loss(spec)

    def step(state: SearchState, batch, key, lam, scales: GroupScales):
        images = data_lib.augment.augment_batch(key, batch["image"], data_cfg, mean, std, train=True)
        trainable = {"params": state.params, "arch": state.arch}
        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
            trainable, state.batch_stats, state.masks, images, batch["label"], lam)
        return _apply_grads(tx, state, grads, batch_stats, metrics, scales)

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
    one backward program, 'edge' as programs per part (`programs.edge_programs`). The update runs as
    programs per part too (`update_by_parts`) when `tx` is a PartwiseOptimizer (make_optimizer's), in
    one program over the whole tree otherwise.

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
    cell_names = [names.cell_name(i) for i in range(n)]
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

    def add_penalty(arch, g_arch, masks, ce, accuracy, lam):
        # the penalty's gradient added to the arch gradient (the cells' backward programs gave the
        # cross-entropy's) -> (the step's metrics, the arch gradient)
        def value(a):
            r_op, r_thr = regularizers(a, masks, spec)
            return lam * (r_op + r_thr), (r_op, r_thr)
        (_, (r_op, r_thr)), reg_grads = jax.value_and_grad(value, has_aux=True)(arch)
        return _loss_metrics(ce, r_op, r_thr, lam, accuracy), jax.tree.map(jnp.add, g_arch, reg_grads)

    @functools.partial(jax.jit, donate_argnums=0)
    def whole_update(state, grads, batch_stats, ce, accuracy, lam, scales):
        metrics, g_arch = add_penalty(state.arch, grads["arch"], state.masks, ce, accuracy, lam)
        return _apply_grads(tx, state, dict(grads, arch=g_arch), batch_stats, metrics, scales)

    # by parts, the penalty is a program of its own over the cells' own arch leaves (alpha,
    # thresholds) and op masks: all that R_op and R_thr read
    penalty = jax.jit(add_penalty)

    plan = None   # update_parts of this structure's trainable tree, made at its first step

    def update_in_parts(state, grads, batch_stats, ce, accuracy, lam, scales):
        nonlocal plan
        own = {c: {k: v for k, v in state.arch[c].items() if not isinstance(v, dict)} for c in cell_names}
        ops_masks = {c: {names.OPS_MASK: state.masks[c][names.OPS_MASK]} for c in cell_names}
        metrics, g_own = penalty(own, {c: _pick(grads["arch"][c], own[c]) for c in cell_names}, ops_masks,
                                 ce, accuracy, lam)
        g_arch = {c: dict(grads["arch"][c], **g_own[c]) for c in cell_names}
        trainable = {"params": state.params, "arch": state.arch}
        if plan is None:
            plan = update_parts(trainable)
        trainable, opt_state, finite = update_by_parts(tx, plan, trainable, dict(grads, arch=g_arch),
                                                       state.opt_state, scales, metrics["loss"])
        new = state.replace(step=state.step + 1, params=trainable["params"], arch=trainable["arch"],
                            batch_stats=batch_stats, opt_state=opt_state)
        return new, dict(metrics, finite=finite)

    update = update_in_parts if isinstance(tx, PartwiseOptimizer) else whole_update

    def step(state: SearchState, batch, key, lam, scales: GroupScales):
        params, bs = state.params, state.batch_stats
        x, stem_vjp, stem_stats = stem_forward(_pick(params, stem_names), _pick(bs, stem_names),
                                               batch["image"], key)
        outs, residuals, stats = [x, x], [], dict(stem_stats)
        for i, name in enumerate(cell_names):
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
            g_params[cell_names[i]], g_arch[cell_names[i]], g0, g1 = cells[i][1](residuals[i], g_outs[i + 2])
            residuals[i] = g_outs[i + 2] = None   # free the cell's residuals as soon as they are used
            g_outs[i] = programs_lib.accumulate(g_outs[i], g0)
            g_outs[i + 1] = programs_lib.accumulate(g_outs[i + 1], g1)
        (g_stem,) = stem_backward(stem_vjp, g_outs[0] + g_outs[1])
        g_params.update(g_stem)
        return update(state, {"params": g_params, "arch": g_arch}, stats, ce, accuracy, lam, scales)

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
