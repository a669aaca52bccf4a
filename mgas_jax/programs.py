"""A super-net cell's forward and backward as small compiled programs, for the chained search step.

`search_step.make_cell_step` runs a search step as a chain of programs and asks this module for each
cell's pair `(forward, backward)`:

    forward(variables, params, arch, s0, s1) -> (out, residuals, batch_stats)
    backward(residuals, g_out) -> (g_params, g_arch, g_s0, g_s1)

where `variables` holds the cell's `batch_stats` and `masks` and the other trees are the cell's
subtrees of the super-net's collections (SuperNet's variable names).

Two granularities:

- `cell_programs`: one forward and one backward program per cell (the whole SuperCell).
- `edge_programs`: the cell's parts as programs of their own: the op gates, each preprocess layer,
  and each edge's gated sum of ops; Python runs them in the cell's order and sums the node states.
  An edge program is keyed by what the edge computes (its ops, widths, stride) and its shapes, not by
  where it sits, so every edge of the unpruned super-net with the same width, spatial size and stride
  runs one compiled program: a whole 8-cell super-net compiles five edge programs instead of eight
  cells of fourteen edges each.

With `remat` a forward keeps only its inputs (references to arrays that exist anyway) and the backward
program runs the forward again, with its residuals, then the backward; without, the forward returns
its VJP residuals.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mgas_jax import gates, names, ops, supernet


def pull_back(vjp, g):
    """Apply a VJP function (a pytree of residuals) to a cotangent; jitted, it is a backward program."""
    return vjp(g)


def vjp_programs(apply: Callable, remat: bool, name: str) -> tuple[Callable, Callable]:
    """(forward, backward) programs of `apply(const, *inputs) -> (out, aux)`.

    forward(const, *inputs) -> (out, residuals, aux); backward(residuals, g_out) -> the gradients of
    the inputs (not of `const`). Both are jitted (jit's cache compiles once per input shapes) and
    named `<name>_forward`, `<name>_backward` in JAX's logs and profiles.
    """

    def linearize(const, *inputs):
        return jax.vjp(functools.partial(apply, const), *inputs, has_aux=True)

    def named(fn, suffix):
        fn.__name__ = fn.__qualname__ = f"{name}_{suffix}"
        return fn

    if not remat:
        return jax.jit(named(linearize, "forward")), jax.jit(named(lambda vjp, g: vjp(g), "backward"))

    apply_jit = jax.jit(named(apply, "forward_only"))

    def forward(const, *inputs):
        out, aux = apply_jit(const, *inputs)
        return out, (const,) + inputs, aux   # the inputs are the residuals

    def recompute_and_pull_back(inputs, g):
        _, vjp, _ = linearize(*inputs)
        return vjp(g)

    # The forward again and the backward as one program: its residuals never leave XLA (no arrays
    # handed to Python and back) and XLA frees them as the backward consumes them. Two programs
    # (the forward with residuals, then the pull-back) ran an edge's backward ~30 % faster in
    # section 8 of benchmarks/README.md; since the kernels of section 17 one program is as fast or
    # faster (a stage-1 edge 34.2 against 34.0 ms, a stride-2 edge 29.3 against 31.8 ms).
    backward = jax.jit(named(recompute_and_pull_back, "backward"))
    return forward, backward


def _cell_apply(cell: supernet.SuperCell) -> Callable:
    def apply(variables, params, arch, s0, s1):
        out, updates = cell.apply(dict(variables, params=params, arch=arch), s0, s1, train=True,
                                  mutable=["batch_stats"])
        return out, updates["batch_stats"]
    return apply


@functools.lru_cache(maxsize=256)
def cell_programs(cell: supernet.SuperCell, remat: bool) -> tuple[Callable, Callable]:
    """The (forward, backward) pair of a whole cell; shared by every cell and spec with the same module."""
    return vjp_programs(_cell_apply(cell), remat, "cell")


@functools.lru_cache(maxsize=256)
def _preprocess_programs(module: ops.Preprocess, remat: bool) -> tuple[Callable, Callable]:
    # inputs (params, arch, x, threshold) -> gradients in that order
    def apply(variables, params, arch, x, threshold):
        out, updates = module.apply(dict(variables, params=params, arch=arch), x, True, threshold,
                                    mutable=["batch_stats"])
        return out, updates.get("batch_stats", {})
    return vjp_programs(apply, remat, "preprocess")


@functools.lru_cache(maxsize=1024)
def _edge_programs(module: supernet.SuperEdge, remat: bool) -> tuple[Callable, Callable]:
    # const (variables, edge row); inputs (params, arch, x, g, t_k, t_w) -> gradients in that order
    def apply(const, params, arch, x, g, t_k, t_w):
        variables, e = const
        out, updates = module.apply(dict(variables, params=params, arch=arch), x, g, t_k, t_w, e, train=True,
                                    mutable=["batch_stats"])
        return out, updates.get("batch_stats", {})
    return vjp_programs(apply, remat, "edge")


@functools.lru_cache(maxsize=16)
def _gate_programs(steps: int, remat: bool) -> tuple[Callable, Callable]:
    nodes = gates.edge_nodes(steps)

    def apply(active, alpha, t_op):
        g, _ = gates.op_gate(alpha, t_op, active, nodes)
        return g, {}

    return vjp_programs(apply, remat, "gates")


def _sub(tree: dict, op_names: dict) -> dict:
    """{short: tree[long]} for the long names present in tree (ops without variables have none)."""
    return {short: tree[long] for short, long in op_names.items() if long in tree}


def accumulate(total, term):
    """total + term for pytrees of arrays, where None is an empty total (a gradient not yet seen)."""
    return term if total is None else jax.tree.map(jnp.add, total, term)


def edge_programs(spec: supernet.SuperNetSpec, i: int, remat: bool) -> tuple[Callable, Callable]:
    """Cell i's (forward, backward) pair, run as programs per part (op gates, preprocess, edges).

    Same values as `cell_programs` up to float reassociation (the node sums add edge by edge).
    """
    cell, reduction_prev, impl, dtype, fl, wl = supernet._cell_fields(spec, i)
    steps = cell.steps
    pre_programs = [_preprocess_programs(supernet.preprocess(cell, reduction_prev, k, fl, dtype), remat)
                    for k in (0, 1)]
    gate_forward, gate_backward = _gate_programs(steps, remat)
    active = supernet.active_matrix(cell)
    # per node, its edges: (edge index, source state, variable names {op: SuperCell's name}, programs)
    nodes = []
    for node in range(steps):
        edges = {}
        for o in cell.ops_into(node):
            edges.setdefault(o.src, []).append(o)
        plan = []
        for src, edge_ops in sorted(edges.items()):
            stride = 2 if cell.reduction and src < 2 else 1
            module = supernet.SuperEdge(tuple((o.op, o.mid, o.out_index) for o in edge_ops), cell.width, stride,
                                        impl, dtype, fl, wl)
            op_names = {o.op: names.op_name(o) for o in edge_ops}
            plan.append((edge_ops[0].edge, src, op_names, _edge_programs(module, remat)))
        if not plan:
            raise ValueError(f"node {node} of a cell has no op; the protection rule should prevent this")
        nodes.append(plan)

    def forward(variables, params, arch, s0, s1):
        bs, masks = variables["batch_stats"], variables["masks"]
        g, gate_res, _ = gate_forward(masks[names.OPS_MASK] * active, arch["alpha"], arch["t_op"])
        stats, residuals, states = {}, {"gate": gate_res}, []
        for k, (name, x) in enumerate(zip(names.PRE, (s0, s1))):
            sub = {"batch_stats": bs.get(name, {}), "masks": masks.get(name, {})}
            y, residuals[name], stats[name] = pre_programs[k][0](sub, params[name], arch.get(name, {}),
                                                                 x, arch["t_pre"][k])
            states.append(y)
        for plan in nodes:
            acc = None
            for e, src, op_names, (edge_forward, _) in plan:
                sub = {"batch_stats": _sub(bs, op_names), "masks": _sub(masks, op_names)}
                y, residuals[e], st = edge_forward((sub, e), _sub(params, op_names), _sub(arch, op_names), states[src],
                                                   g, arch["t_k"], arch["t_w"])
                stats.update({long: st[short] for short, long in op_names.items() if short in st})
                acc = y if acc is None else acc + y
            states.append(acc)
        # a state that nothing reads (a cell input whose edges were all pruned) gets a zero cotangent
        residuals["states"] = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in states]
        return jnp.concatenate([states[j] for j in cell.concat], axis=-1), residuals, stats

    def backward(residuals, g_out):
        g_states = [None] * (steps + 2)
        for j, piece in zip(cell.concat, jnp.split(g_out, len(cell.concat), axis=-1)):
            g_states[j] = accumulate(g_states[j], piece)
        shapes = residuals.pop("states")

        def cotangent(j):
            return jnp.zeros(shapes[j].shape, shapes[j].dtype) if g_states[j] is None else g_states[j]
        g_params, g_arch = {}, {}
        g_g = g_tk = g_tw = None
        for node in reversed(range(steps)):
            g_node = cotangent(node + 2)
            for e, src, op_names, (_, edge_backward) in reversed(nodes[node]):
                gp, ga, gx, gg, gtk, gtw = edge_backward(residuals.pop(e), g_node)
                g_params.update({op_names[short]: v for short, v in gp.items()})
                g_arch.update({op_names[short]: v for short, v in ga.items()})
                g_states[src] = accumulate(g_states[src], gx)
                g_g, g_tk, g_tw = accumulate(g_g, gg), accumulate(g_tk, gtk), accumulate(g_tw, gtw)
        g_inputs, g_tpre = [], []
        for k, name in enumerate(names.PRE):
            gp, ga, gx, gt = pre_programs[k][1](residuals.pop(name), cotangent(k))
            g_params[name] = gp
            if ga:
                g_arch[name] = ga
            g_tpre.append(gt)
            g_inputs.append(gx)
        g_alpha, g_t_op = gate_backward(residuals.pop("gate"), g_g)
        g_arch.update(alpha=g_alpha, t_op=g_t_op, t_k=g_tk, t_w=g_tw, t_pre=jnp.stack(g_tpre))
        return (g_params, g_arch, *g_inputs)

    return forward, backward
