"""MGAS's filter- and weight-level search for any Flax (Linen or NNX) model's params pytree.

The gate rule, the surrogate gradient and R_thr are the ones of the DARTS super-net (`gates`,
`losses`); this module only decides *where* they act in a user's params tree:

- weight level: a gated kernel is used as `w * H(|w| - t_w) * committed` (one t_w per kernel);
- filter level: output channel c of a gated kernel is scaled by `sigma(beta_c) * H(sigma(beta_c) - t_k)
  * committed_c` (one t_k per kernel) where the model reads it: on the input axis of every kernel
  that consumes the channel (the next conv or dense layer). For conv-BN-ReLU that is the super-net's
  "gate after BN" (g * relu(z) = relu(g * z) for g >= 0), the layer's own BatchNorm statistics do not
  see the gate, and a channel gated off still gets gradient through the surrogate (the next layer
  reads it, scaled by 0).

Which parameters belong to a channel, and which layers consume it (the next kernel's input axis, a
BatchNorm's statistics), is read from the model itself: `make_spec` traces the forward pass once
(`jax.make_jaxpr`) and follows each kernel's output-channel axis through elementwise ops, reshapes,
pools and reductions over other axes, up to the next conv or dense layer. Anything it cannot follow
(a concatenation, a residual sum of two gated layers, a normalisation across channels) is an error
naming the op, unless that kernel is left out of the filter gates.

    spec = prune.make_spec(params, forward, x, extra=batch_stats)    # forward(params, extra, x)
    gate_state, masks = prune.init_gates(spec), prune.init_masks(spec)
    logits = forward(prune.apply_gates(spec, params, gate_state, masks), batch_stats, x)  # jit-able
    loss = ce + lam * prune.threshold_penalty(spec, gate_state, masks)
    tx = prune.optimizer()          # over {'params': params, 'gates': gate_state}
    masks = prune.commit(spec, params, gate_state, masks)           # host, every few epochs
    small = prune.remove(spec, params, gate_state, masks, batch_stats)  # smaller trees + widths

Method reference: docs/method.md sections 2 (gates, commits), 3 (R_thr) and 4 (optimizer groups).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mgas_jax import gates, losses

# Every rank >= 2 leaf named 'kernel' (Flax's conv and dense weights) gets weight gates; every
# conv kernel (rank >= 3) gets filter gates, except kernels whose channels are the model's output.
DEFAULT_WEIGHTS = r"(.*/)?kernel"
DEFAULT_FILTERS = r"(.*/)?kernel"


class PruneSpecError(ValueError):
    """A pattern, a leaf or a model structure that the pruning spec cannot handle."""


# ----------------------------------------------------------------------------------------------
# Paths

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(keypath) -> str:
    """'/'-joined names of a key path; NNX's trailing `.value` attribute is dropped."""
    names = [_key_name(k) for k in keypath]
    if names and names[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def _flatten(tree) -> tuple[list[str], list, Any]:
    items, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [_path(p) for p, _ in items], [v for _, v in items], treedef


def leaf_paths(tree) -> list[str]:
    """The '/'-joined path of every leaf of `tree`, in flattening order (what the patterns match)."""
    return _flatten(tree)[0]


# ----------------------------------------------------------------------------------------------
# The spec

@dataclasses.dataclass(frozen=True)
class Slice:
    """One leaf's axis that carries a producer's channels: index i of the axis is channel
    (i // inner) % width (inner > 1 after a flatten whose channel axis is not the fastest)."""
    path: str
    axis: int
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class FilterGroup:
    """The filter gates of one kernel and everything its output channels touch.

    kernel: the kernel's path; out_axis: its output-channel axis; width: its number of channels.
    channel_params: per-channel parameters of the layer (bias, BatchNorm scale/bias): sliced.
    inputs: kernels that read the channels (the next layer's input axis): gated and sliced.
    extra: leaves of the extra state (BatchNorm statistics) on the channel axis: sliced.
    """
    kernel: str
    out_axis: int
    width: int
    channel_params: tuple[Slice, ...]
    inputs: tuple[Slice, ...]
    extra: tuple[Slice, ...]


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """Where the gates act in one model's params tree (hashable: a static argument of jit)."""
    weight_kernels: tuple[str, ...]
    filters: tuple[FilterGroup, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]   # every params leaf's path and shape

    @property
    def filter_kernels(self) -> tuple[str, ...]:
        return tuple(f.kernel for f in self.filters)


def _match(patterns, paths: list[str], what: str) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    hits = []
    for pat in patterns:
        rx = re.compile(pat)
        found = [p for p in paths if rx.fullmatch(p)]
        if not found:
            raise PruneSpecError(
                f"the {what} pattern {pat!r} matches no leaf of the params tree; patterns are regular expressions "
                f"matched against whole '/'-joined paths, such as {paths[:4]}")
        hits += [p for p in found if p not in hits]
    return [p for p in paths if p in hits]


def make_spec(params, forward: Callable, *example_inputs, extra=None,
              weights: Optional[str | Sequence[str]] = DEFAULT_WEIGHTS,
              filters: Optional[str | Sequence[str]] = DEFAULT_FILTERS) -> PruneSpec:
    """Declares the gated kernels by path pattern and reads their channels' consumers from the model.

    Args:
      params: the model's params pytree (Linen `variables['params']`, or an NNX `nnx.State` of params).
      forward: `forward(params, *example_inputs)`, or `forward(params, extra, *example_inputs)` when
        `extra` is given, returning the model's outputs (logits) only. Traced once, never run.
      example_inputs: inputs of the right shapes and dtypes (e.g. one batch).
      extra: optional non-trainable state sliced with the channels (e.g. Linen `batch_stats`).
      weights: regular expression(s) over '/'-joined leaf paths (`re.fullmatch`) of the kernels with
        weight-level gates; None for none. Default: every leaf named 'kernel'.
      filters: pattern(s) of the kernels whose output channels get filter gates; None for none.
        Default: every conv kernel (rank >= 3) whose channels do not reach the model's output.
    Returns:
      a `PruneSpec`.
    Raises:
      PruneSpecError: a pattern that matches nothing, a matched leaf that is not a kernel (rank < 2,
        or for filters not the weight of a conv or dense layer), or a gated kernel whose channels
        reach an op that the trace cannot follow.
    """
    paths, leaves, _ = _flatten(params)
    shapes = {p: tuple(np.shape(v)) for p, v in zip(paths, leaves)}
    extra_paths = _flatten(extra)[0] if extra is not None else []
    trace = _trace(forward, params, extra, example_inputs, len(paths))

    weight_kernels = _match(weights, paths, "weights") if weights is not None else []
    for p in weight_kernels:
        if len(shapes[p]) < 2:
            raise PruneSpecError(f"weight gates need a kernel (rank >= 2), but {p!r} has shape {shapes[p]}; "
                                 f"narrow the weights pattern {weights!r}")
    if filters is None:
        chosen = []
    elif filters == DEFAULT_FILTERS:
        chosen = [p for p in _match(filters, paths, "filters")
                  if len(shapes[p]) >= 3 and paths.index(p) in trace.kernels
                  and not trace.reaches_output(paths.index(p))]
    else:
        chosen = _match(filters, paths, "filters")
    groups = []
    for p in chosen:
        i = paths.index(p)
        if i not in trace.kernels:
            raise PruneSpecError(f"filter gates need the weight of a conv or dense layer, but {p!r} (shape "
                                 f"{shapes[p]}) is not used as one in the forward pass; narrow the filters pattern")
        problems = list(trace.problems.get(i, []))
        if trace.reaches_output(i):
            problems.append("they are the model's outputs (removing one would change what the model returns)")
        if problems:
            raise PruneSpecError(f"cannot follow the output channels of {p!r}: {'; '.join(sorted(set(problems)))}. "
                                 f"Leave it out of the filter gates (filters=...) or change the model")
        coupled = sorted(paths[j] for j in trace.coupled.get(i, ()) if paths[j] in chosen and j != i)
        if coupled:
            raise PruneSpecError(f"the output channels of {p!r} and {coupled} meet in one op (a residual sum?); "
                                 f"give filter gates to only one of them (filters=...)")
        out_axis, _ = trace.kernels[i]
        width = shapes[p][out_axis]
        chan, ins, ext = [], [], []
        for (leaf, axis, inner, op) in sorted(trace.consumers.get(i, ())):
            if leaf == i:
                continue
            if leaf >= len(paths):
                ext.append(Slice(extra_paths[leaf - len(paths)], axis, inner))
            elif op == "input":
                ins.append(Slice(paths[leaf], axis, inner))
            elif len(shapes[paths[leaf]]) == 1 and inner == 1:
                chan.append(Slice(paths[leaf], axis))
            else:
                raise PruneSpecError(f"the channels of {p!r} meet {paths[leaf]!r} (shape {shapes[paths[leaf]]}) "
                                     f"in a {op}; only per-channel vectors and next-layer kernels can be followed")
        if not ins:
            raise PruneSpecError(f"no conv or dense layer reads the output channels of {p!r}, so a filter gate "
                                 f"there would act nowhere; leave it out of the filter gates (filters=...)")
        groups.append(FilterGroup(p, out_axis, width, tuple(dict.fromkeys(chan)), tuple(dict.fromkeys(ins)),
                                  tuple(dict.fromkeys(ext))))
    return PruneSpec(tuple(weight_kernels), tuple(groups), tuple(shapes.items()))


# ----------------------------------------------------------------------------------------------
# Following channels through the forward pass

_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "rsqrt", "sqrt", "cbrt", "square", "integer_pow", "pow", "abs", "sign", "erf",
    "erfc", "erf_inv", "sin", "cos", "convert_element_type", "select_n", "clamp", "copy", "copy_p",
    "eq", "ne", "gt", "ge", "lt", "le", "and", "or", "not", "xor", "is_finite", "floor", "ceil", "round",
    "reduce_precision", "stop_gradient", "optimization_barrier", "sharding_constraint", "nextafter",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
               "argmax", "argmin"}
_WINDOWED = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
_SUBJAXPR = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass
class _Info:
    """What the trace knows of one value: per axis the producer channels it carries, (kernel, inner),
    and the leaves it is made of, each (leaf, per-axis leaf axis or None)."""
    tags: tuple
    origins: tuple = ()


class _Trace:
    def __init__(self, n_params: int):
        self.n_params = n_params
        self.kernels: dict[int, tuple[int, int]] = {}     # leaf -> (out axis, in axis)
        self.consumers: dict[int, set] = {}               # producer -> {(leaf, axis, inner, op)}
        self.problems: dict[int, list[str]] = {}
        self.coupled: dict[int, set] = {}
        self.at_output: set[int] = set()

    def reaches_output(self, i: int) -> bool:
        return i in self.at_output

    def problem(self, info: Optional[_Info], why: str):
        for t in (info.tags if info else ()):
            if t is not None:
                self.problems.setdefault(t[0], []).append(why)

    def consume(self, tag, leaf, axis, inner_from_tag: bool, op: str):
        self.consumers.setdefault(tag[0], set()).add((leaf, axis, tag[1] if inner_from_tag else 1, op))


def _trace(forward, params, extra, inputs, n_params: int) -> _Trace:
    if extra is None:
        closed = jax.make_jaxpr(lambda p, *xs: forward(p, *xs))(params, *inputs)
        n_leaves = n_params
    else:
        closed = jax.make_jaxpr(lambda p, e, *xs: forward(p, e, *xs))(params, extra, *inputs)
        n_leaves = n_params + len(jax.tree.leaves(extra))
    tr = _Trace(n_params)
    jaxpr = closed.jaxpr
    env = {}
    for k, v in enumerate(jaxpr.invars):
        if k < n_leaves:
            env[v] = _Info((None,) * len(v.aval.shape), ((k, tuple(range(len(v.aval.shape)))),))
    outs = _run(tr, jaxpr, env)
    for info in outs:
        for t in (info.tags if info else ()):
            if t is not None:
                tr.at_output.add(t[0])
    return tr


def _get(env, v) -> Optional[_Info]:
    return env.get(v) if not hasattr(v, "val") else None


def _run(tr: _Trace, jaxpr, env: dict) -> list:
    for eqn in jaxpr.eqns:
        ins = [_get(env, v) for v in eqn.invars]
        outs = _eqn(tr, eqn, ins)
        for v, info in zip(eqn.outvars, outs):
            if info is not None:
                env[v] = info
    return [_get(env, v) for v in jaxpr.outvars]


def _merge_tags(tr: _Trace, tag_lists) -> tuple:
    out = []
    for axis_tags in zip(*tag_lists):
        present = [t for t in axis_tags if t is not None]
        first = present[0] if present else None
        for t in present[1:]:
            if t != first:
                tr.coupled.setdefault(first[0], set()).add(t[0])
                tr.coupled.setdefault(t[0], set()).add(first[0])
        out.append(first)
    return tuple(out)


def _eqn(tr: _Trace, eqn, ins: list) -> list:
    name = eqn.primitive.name
    out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]
    none = lambda shape: _Info((None,) * len(shape))
    sub = next((eqn.params[k] for k in _SUBJAXPR if k in eqn.params), None)
    if sub is not None and name not in ("cond", "while", "scan"):
        inner = getattr(sub, "jaxpr", sub)
        env = {iv: info for iv, info in zip(inner.invars, ins[len(ins) - len(inner.invars):]) if info is not None}
        return _run(tr, inner, env)
    if name == "conv_general_dilated":
        return [_conv(tr, eqn, ins)]
    if name == "dot_general":
        return [_dot(tr, eqn, ins)]
    if name in _ELEMENTWISE:
        return [_elementwise(tr, eqn, ins, out_shapes[0])]
    if name == "broadcast_in_dim":
        info = ins[0]
        if info is None:
            return [None]
        dims, shape_in = eqn.params["broadcast_dimensions"], eqn.invars[0].aval.shape
        tags = [None] * len(out_shapes[0])
        for i, d in enumerate(dims):
            if shape_in[i] == out_shapes[0][d]:
                tags[d] = info.tags[i]
        origins = []
        for leaf, amap in info.origins:
            m = [None] * len(out_shapes[0])
            for i, d in enumerate(dims):
                if shape_in[i] == out_shapes[0][d]:
                    m[d] = amap[i]
            origins.append((leaf, tuple(m)))
        return [_Info(tuple(tags), tuple(origins))]
    if name == "reshape":
        return [_reshape(tr, ins[0], tuple(eqn.invars[0].aval.shape), out_shapes[0])]
    if name == "squeeze":
        info = ins[0]
        if info is None:
            return [None]
        drop = set(d % len(info.tags) for d in eqn.params["dimensions"])
        keep = [i for i in range(len(info.tags)) if i not in drop]
        return [_Info(tuple(info.tags[i] for i in keep),
                      tuple((leaf, tuple(m[i] for i in keep)) for leaf, m in info.origins))]
    if name == "transpose":
        info = ins[0]
        if info is None:
            return [None]
        perm = eqn.params["permutation"]
        return [_Info(tuple(info.tags[p] for p in perm), tuple((leaf, tuple(m[p] for p in perm)) for leaf, m in info.origins))]
    if name in _REDUCTIONS:
        info = ins[0]
        if info is None:
            return [None]
        axes = set(eqn.params["axes"])
        for a in axes:
            if info.tags[a] is not None:
                tr.problem(_Info((info.tags[a],)), f"a {name} over its channel axis (channel removal would change it)")
        return [_Info(tuple(t for a, t in enumerate(info.tags) if a not in axes))]
    if name in _WINDOWED:
        info = ins[0]
        if info is None:
            return [None]
        win, strides = eqn.params["window_dimensions"], eqn.params["window_strides"]
        for a, t in enumerate(info.tags):
            if t is not None and (win[a] != 1 or strides[a] != 1):
                tr.problem(_Info((t,)), f"a {name} whose window spans its channel axis")
        return [_Info(tuple(t if win[a] == 1 and strides[a] == 1 else None for a, t in enumerate(info.tags)))]
    for info in ins:
        tr.problem(info, f"an op the trace cannot follow ({name})")
    return [none(s) for s in out_shapes]


def _elementwise(tr: _Trace, eqn, ins: list, shape: tuple) -> Optional[_Info]:
    ndim = len(shape)
    full = [(info, tuple(v.aval.shape)) for info, v in zip(ins, eqn.invars) if info is not None]
    tagged = [info for info, s in full if len(s) == ndim and any(t is not None for t in info.tags)]
    if not full:
        return None
    tags = _merge_tags(tr, [info.tags for info in tagged]) if tagged else (None,) * ndim
    if any(t is not None for t in tags):
        for info, s in full:
            for leaf, amap in info.origins:
                for a, la in enumerate(amap):
                    t = tags[a] if len(s) == ndim else None
                    if la is not None and t is not None:
                        tr.consume(t, leaf, la, False, eqn.primitive.name)
        return _Info(tags)
    origins = tuple(o for info, s in full if len(s) == ndim for o in info.origins)
    return _Info(tags, origins)


def _conv(tr: _Trace, eqn, ins: list) -> _Info:
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    out_ndim = len(eqn.outvars[0].aval.shape)
    tags = [None] * out_ndim
    kernel = rhs.origins[0] if rhs is not None and len(rhs.origins) == 1 else None
    if kernel is not None:
        leaf, amap = kernel
        out_axis, in_axis = amap[dn.rhs_spec[0]], amap[dn.rhs_spec[1]]
        tr.kernels[leaf] = (out_axis, in_axis)
        tags[dn.out_spec[1]] = (leaf, 1)
    if lhs is not None:
        for a, t in enumerate(lhs.tags):
            if t is None:
                continue
            if a != dn.lhs_spec[1] or kernel is None or eqn.params["feature_group_count"] != 1:
                tr.problem(_Info((t,)), "a grouped or depthwise conv, or a conv over its channel axis")
            else:
                tr.consume(t, kernel[0], in_axis, True, "input")
    return _Info(tuple(tags))


def _dot(tr: _Trace, eqn, ins: list) -> _Info:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_ndim, rhs_ndim = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    out_ndim = len(eqn.outvars[0].aval.shape)
    tags = [None] * out_ndim
    kernel = rhs.origins[0] if rhs is not None and len(rhs.origins) == 1 else None
    simple = kernel is not None and rhs_ndim == 2 and not lb and len(rc) == 1
    lhs_free = [a for a in range(lhs_ndim) if a not in lc and a not in lb]
    if simple:
        leaf, amap = kernel
        in_axis, out_axis = amap[rc[0]], amap[1 - rc[0]]
        tr.kernels[leaf] = (out_axis, in_axis)
        tags[len(lb) + len(lhs_free)] = (leaf, 1)
    if lhs is not None:
        for a, t in enumerate(lhs.tags):
            if t is None:
                continue
            if a in lhs_free:
                tags[len(lb) + lhs_free.index(a)] = t
            elif simple and a == lc[0]:
                tr.consume(t, kernel[0], in_axis, True, "input")
            else:
                tr.problem(_Info((t,)), "a dot_general that is not a dense layer over its channels")
    if rhs is not None and not simple:
        tr.problem(rhs, "a dot_general that is not a dense layer over its channels")
    return _Info(tuple(tags))


def _strides(shape) -> list[int]:
    out, s = [], 1
    for n in reversed(shape):
        out.append(s)
        s *= n
    return out[::-1]


def _reshape(tr: _Trace, info: Optional[_Info], shape_in: tuple, shape_out: tuple) -> Optional[_Info]:
    """Channel axes through a reshape: a channel's flat period stays the same; find the new axis
    that holds it (a flatten merges the channel axis into a larger one with inner > 1 when the
    channel axis was not the fastest)."""
    if info is None:
        return None
    sin, sout = _strides(shape_in), _strides(shape_out)
    tags = [None] * len(shape_out)
    for a, t in enumerate(info.tags):
        if t is None:
            continue
        width = shape_in[a] // t[1]
        period = sin[a] * t[1]  # flat index e carries channel (e // period) % width
        placed = False
        for b, n in enumerate(shape_out):
            if sout[b] <= period and period % sout[b] == 0 and period * width <= sout[b] * n \
                    and (sout[b] * n) % (period * width) == 0 and n > 1:
                tags[b] = (t[0], period // sout[b])
                placed = True
                break
        if not placed:
            tr.problem(_Info((t,)), "a reshape that splits its channel axis")
    # a leaf survives a reshape that only adds or drops unit axes
    big_in = [i for i, n in enumerate(shape_in) if n != 1]
    big_out = [j for j, n in enumerate(shape_out) if n != 1]
    origins = ()
    if [shape_in[i] for i in big_in] == [shape_out[j] for j in big_out]:
        origins = tuple((leaf, tuple(next((amap[i] for i, j2 in zip(big_in, big_out) if j2 == j), None)
                                     for j in range(len(shape_out)))) for leaf, amap in info.origins)
    return _Info(tuple(tags), origins)


# ----------------------------------------------------------------------------------------------
# State, gates, loss, optimizer

def init_gates(spec: PruneSpec) -> dict:
    """The trainable gate state, all zeros (sigma(beta) = 0.5, thresholds 0; docs/method.md section 2):
    {kernel path: {'beta': (C,), 't_k': ()} for filter-gated kernels, and 't_w': () for weight-gated ones}."""
    out = {}
    for f in spec.filters:
        out.setdefault(f.kernel, {}).update(beta=jnp.zeros((f.width,), jnp.float32), t_k=jnp.zeros((), jnp.float32))
    for k in spec.weight_kernels:
        out.setdefault(k, {})["t_w"] = jnp.zeros((), jnp.float32)
    return out


def init_masks(spec: PruneSpec) -> dict:
    """The committed masks, all ones: {kernel path: {'filters': (C,), 'weights': kernel shape}}."""
    shapes = dict(spec.shapes)
    out = {}
    for f in spec.filters:
        out.setdefault(f.kernel, {})["filters"] = jnp.ones((f.width,), jnp.float32)
    for k in spec.weight_kernels:
        out.setdefault(k, {})["weights"] = jnp.ones(shapes[k], jnp.float32)
    return out


def _along(g, s: Slice, shape: tuple):
    """The (C,) channel vector g laid along axis s.axis of a leaf of `shape` (index i: channel (i // inner) % C)."""
    n = shape[s.axis]
    v = jnp.take(g, (np.arange(n) // s.inner) % g.shape[0]) if (s.inner, n) != (1, g.shape[0]) else g
    bshape = [1] * len(shape)
    bshape[s.axis] = n
    return jnp.reshape(v, bshape)


def _check_tree(spec: PruneSpec, paths: list[str], leaves: list) -> None:
    got = [(p, tuple(np.shape(v))) for p, v in zip(paths, leaves)]
    if got != list(spec.shapes):
        raise PruneSpecError("these params do not match the spec's model (other leaves or shapes); after `remove`, "
                             "make a new spec for the smaller model")


def filter_gates(spec: PruneSpec, gate_state: dict, masks: dict) -> dict:
    """{kernel path: (C,) channel scale sigma(beta) * H(sigma(beta) - t_k) * committed} (gates.filter_gate)."""
    return {f.kernel: gates.filter_gate(gate_state[f.kernel]["beta"], gate_state[f.kernel]["t_k"],
                                        masks[f.kernel]["filters"]) for f in spec.filters}


def apply_gates(spec: PruneSpec, params, gate_state: dict, masks: dict):
    """The params a forward pass uses: weight masks and filter gates applied (pure, jit-able).

    Gradients reach the weights, beta, t_k and t_w, masked units included, through the surrogate
    gradient of `gates.hard_step`. Live masks are ANDed with the committed ones.
    """
    paths, leaves, treedef = _flatten(params)
    _check_tree(spec, paths, leaves)
    new = dict(zip(paths, leaves))
    for k in spec.weight_kernels:
        new[k] = new[k] * gates.weight_mask(new[k], gate_state[k]["t_w"], masks[k]["weights"])
    for f, (_, g) in zip(spec.filters, filter_gates(spec, gate_state, masks).items()):
        for s in f.inputs:
            new[s.path] = new[s.path] * _along(g, s, np.shape(new[s.path])).astype(new[s.path].dtype)
    return jax.tree_util.tree_unflatten(treedef, [new[p] for p in paths])


def _active(m) -> jax.Array:
    return (jnp.sum(m) > 0).astype(jnp.float32)


def threshold_penalty(spec: PruneSpec, gate_state: dict, masks: dict) -> jax.Array:
    """R_thr = sum of exp(-t) over the thresholds (t_k, t_w) of kernels with a committed unit left
    (losses.threshold_penalty; docs/method.md section 3). Add `lam * R_thr` to the loss."""
    r = jnp.float32(0.0)
    for f in spec.filters:
        r += losses.threshold_penalty(gate_state[f.kernel]["t_k"], _active(masks[f.kernel]["filters"]))
    for k in spec.weight_kernels:
        r += losses.threshold_penalty(gate_state[k]["t_w"], _active(masks[k]["weights"]))
    return r


GROUPS = ("weights", "beta", "threshold", "weight_threshold")


def labels(trainable: dict) -> dict:
    """The optimizer group of every leaf of {'params': ..., 'gates': ...}."""
    names = {"beta": "beta", "t_k": "threshold", "t_w": "weight_threshold"}

    def label(path, _):
        if _key_name(path[0]) == "params":
            return "weights"
        return names[_key_name(path[-1])]
    return jax.tree_util.tree_map_with_path(label, trainable)


def optimizer(*, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 3e-4, grad_clip: float = 5.0,
              beta_lr: float = 1.0, threshold_lr: float = 0.1, weight_threshold_lr: float = 0.001
              ) -> optax.GradientTransformation:
    """The authors' optimizers (docs/method.md section 4) over {'params': params, 'gates': gate_state}.

    SGD with momentum for every group; gradient-norm clipping and weight decay in the weights' chain
    only (as the super-net's search.make_optimizer).
    """
    sgd = lambda lr_: optax.sgd(lr_, momentum=momentum)
    weights = optax.chain(losses.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
                          optax.add_decayed_weights(weight_decay), sgd(lr))
    return optax.partition({"weights": weights, "beta": sgd(beta_lr), "threshold": sgd(threshold_lr),
                            "weight_threshold": sgd(weight_threshold_lr)}, labels)


# ----------------------------------------------------------------------------------------------
# Commits and physical removal (host functions)

def _np_tree(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def commit(spec: PruneSpec, params, gate_state: dict, masks: dict) -> dict:
    """Committed masks AND the live ones (docs/method.md section 2): filters by sigma(beta) > t_k,
    weights by |w| > t_w. Host function; returns new numpy masks."""
    flat = dict(zip(*_flatten(params)[:2]))
    g = _np_tree(gate_state)
    out = _np_tree(masks)
    for f in spec.filters:
        out[f.kernel]["filters"] = out[f.kernel]["filters"] * np.asarray(
            gates.live_mask(g[f.kernel]["beta"], g[f.kernel]["t_k"]))
    for k in spec.weight_kernels:
        out[k]["weights"] = np.asarray(gates.weight_mask(flat[k], g[k]["t_w"], out[k]["weights"]))
    return out


def _kept(spec: PruneSpec, gate_state: dict, masks: dict) -> dict:
    """Per filter-gated kernel, the channel indices that stay: the committed ones, or the best scored
    one when none is (`remove` zeroes its parameters: it adds nothing but keeps shapes non-empty)."""
    out = {}
    for f in spec.filters:
        m = np.asarray(masks[f.kernel]["filters"])
        idx = np.flatnonzero(m > 0)
        out[f.kernel] = idx if idx.size else np.array([int(np.argmax(np.asarray(gate_state[f.kernel]["beta"])))])
    return out


def _cuts(spec: PruneSpec, kept: dict) -> dict:
    """{leaf path: [(axis, index array)]}: what physical removal keeps of each params/extra leaf."""
    shapes = dict(spec.shapes)
    cuts: dict[str, list] = {}

    def cut(s: Slice, size: int, width: int, keep: np.ndarray):
        chan = (np.arange(size) // s.inner) % width
        cuts.setdefault(s.path, []).append((s.axis, np.flatnonzero(np.isin(chan, keep))))

    for f in spec.filters:
        keep = kept[f.kernel]
        cut(Slice(f.kernel, f.out_axis), f.width, f.width, keep)
        for s in f.channel_params + f.inputs:
            cut(s, shapes[s.path][s.axis], f.width, keep)
        for s in f.extra:
            cuts.setdefault(s.path, []).append((s.axis, s.inner, f.width, keep))
    return cuts


def _slice(x, ops_: list):
    x = np.asarray(x)
    for op in ops_:
        if len(op) == 4:  # an extra leaf: its axis size is known only here
            axis, inner, width, keep = op
            idx = np.flatnonzero(np.isin((np.arange(x.shape[axis]) // inner) % width, keep))
        else:
            axis, idx = op
        x = np.take(x, idx, axis=axis)
    return x


@dataclasses.dataclass
class Removed:
    """The smaller model: params (and extra) trees with the committed-off channels gone, gates folded in.

    params, extra: same tree structure as the inputs, smaller leaves (numpy); extra None if not given.
    widths: {kernel path: output channels kept} for every filter-gated kernel: rebuild the model with these.
    kept: {kernel path: indices of the kept channels}.
    weight_masks: {kernel path: 0/1 committed weight mask of the smaller kernel}: keep it applied when
      fine-tuning, so that pruned weights stay zero.
    """
    params: Any
    extra: Any
    widths: dict
    kept: dict
    weight_masks: dict


def remove(spec: PruneSpec, params, gate_state: dict, masks: dict, extra=None) -> Removed:
    """Physical removal of committed-off channels (host function).

    The gates are folded into the parameters (kernels * weight masks, the input axis of the kernels
    that read a gated channel * its filter gate), then every committed-off channel leaves its
    kernel's output axis, its per-channel parameters, the input axis of the kernels that read it and
    the extra state (BatchNorm statistics). The smaller model computes what the gated one computes:
    what a removed channel fed the next layers was multiplied by 0 there.
    """
    paths, _, treedef = _flatten(params)
    folded = _folded(spec, params, gate_state, masks)
    kept = _kept(spec, gate_state, masks)
    cuts = _cuts(spec, kept)
    leaves = [folded[p] for p in paths]
    small = jax.tree_util.tree_unflatten(treedef, [_slice(v, cuts.get(p, [])) for p, v in zip(paths, leaves)])
    small_extra = None
    if extra is not None:
        epaths, eleaves, etreedef = _flatten(extra)
        small_extra = jax.tree_util.tree_unflatten(etreedef, [_slice(v, cuts.get(p, [])) for p, v in zip(epaths, eleaves)])
    wm = {k: _slice(masks[k]["weights"], cuts.get(k, [])) for k in spec.weight_kernels}
    return Removed(small, small_extra, {k: int(v.size) for k, v in kept.items()}, kept, wm)


def _folded(spec: PruneSpec, params, gate_state: dict, masks: dict) -> dict:
    """{path: numpy leaf} of the gated params; the one channel kept of a layer with no committed
    channel gets zero parameters (it feeds nothing)."""
    paths, leaves, _ = _flatten(jax.device_get(apply_gates(spec, params, gate_state, masks)))
    flat = {p: np.array(v) for p, v in zip(paths, leaves)}
    for f in spec.filters:
        if not np.any(np.asarray(masks[f.kernel]["filters"]) > 0):
            for s in (Slice(f.kernel, f.out_axis),) + f.channel_params:
                flat[s.path][...] = 0.0
    return flat


def mask_params(params, weight_masks: dict):
    """params with every leaf named in `weight_masks` ({path: 0/1 mask}, e.g. `Removed.weight_masks`)
    multiplied by its mask (pure, jit-able): apply it in the forward pass and after each update when
    fine-tuning, so pruned weights stay exactly zero."""
    paths, leaves, treedef = _flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [v * weight_masks[p] if p in weight_masks else v
                                                  for p, v in zip(paths, leaves)])


def count_nonzero(tree) -> int:
    """Non-zero entries over every leaf of `tree`."""
    return int(sum(np.count_nonzero(np.asarray(x)) for x in jax.tree.leaves(tree)))


def nonzero_params(spec: PruneSpec, params, gate_state: dict, masks: dict) -> int:
    """Non-zero parameters of the smaller model that `remove` would return."""
    return count_nonzero(remove(spec, params, gate_state, masks).params)


def fill_budget(spec: PruneSpec, params, gate_state: dict, masks: dict, budget: int) -> dict:
    """Commits weights off until the smaller model has at most `budget` non-zero parameters.

    The learned thresholds decide what goes first (call `commit` before this); what is still over
    the budget goes weight by weight, in order of |w| - t_w (furthest below or least above its
    threshold first; ties by position), among the weights that physical removal keeps. Each such
    weight is one non-zero parameter, so the budget is met exactly when it is not met already.

    Raises:
      ValueError: the budget is below what the parameters outside the weight-gated kernels need.
    """
    masks = _np_tree(masks)
    n = nonzero_params(spec, params, gate_state, masks)
    excess = n - int(budget)
    if excess <= 0:
        return masks
    flat = dict(zip(*_flatten(params)[:2]))
    folded = _folded(spec, params, gate_state, masks)
    cuts = _cuts(spec, _kept(spec, gate_state, masks))
    cand_margin, cand_where = [], []
    for j, k in enumerate(spec.weight_kernels):
        shape = np.shape(flat[k])
        index = np.arange(math.prod(shape)).reshape(shape)
        survive = _slice(index, cuts.get(k, [])).ravel()
        survive = survive[np.asarray(folded[k]).ravel()[survive] != 0]
        t_w = float(np.asarray(gate_state[k]["t_w"]))
        cand_margin.append(np.abs(np.asarray(flat[k], np.float64).ravel()[survive]) - t_w)
        cand_where.append(np.stack([np.full(survive.size, j), survive], 1))
    margin = np.concatenate(cand_margin) if cand_margin else np.zeros(0)
    where = np.concatenate(cand_where) if cand_where else np.zeros((0, 2), int)
    if margin.size < excess:
        raise ValueError(f"a budget of {budget} non-zero parameters is out of reach: {n - margin.size} of the {n} "
                         f"lie outside the weight-gated kernels; raise the budget or gate more kernels")
    order = np.lexsort((where[:, 1], where[:, 0], margin))[:excess]
    for j, e in where[order]:
        k = spec.weight_kernels[j]
        m = masks[k]["weights"]
        m.reshape(-1)[e] = 0.0
    return masks


def unit_counts(spec: PruneSpec, masks: dict) -> dict:
    """Committed units: {'filters', 'filters_total', 'weights', 'weights_total'}."""
    f = [np.asarray(masks[g.kernel]["filters"]) for g in spec.filters]
    w = [np.asarray(masks[k]["weights"]) for k in spec.weight_kernels]
    return dict(filters=int(sum(x.sum() for x in f)), filters_total=int(sum(x.size for x in f)),
                weights=int(sum(x.sum() for x in w)), weights_total=int(sum(x.size for x in w)))
