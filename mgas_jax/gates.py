"""Discretization functions of MGAS: hard steps with a surrogate gradient, one gate per granularity.

Everything here is plain JAX (no Flax), so other code bases can import it:

    from mgas_jax import gates
    g = gates.op_gate(alpha, t_op, committed, node_of_edge)   # (E, O) op gates
    w_masked = w * gates.weight_mask(w, t_w)
    keep = gates.filter_mask(beta, t_k, committed)           # what a commit keeps: the same rule

Method reference: `docs/method.md` section 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def hard_step(x: jax.Array) -> jax.Array:
    """H(x) = 1[x > 0] in the forward pass, a long-tailed surrogate in the backward pass.

    The surrogate (from Dynamic Sparse Training's trainable masked layers) is
    `2 - 4|x|` for `|x| <= 0.4`, `0.4` for `0.4 < |x| <= 1` and `0` beyond, so that masked units
    still receive gradient and can come back while their score is near its threshold.

    Args:
      x: any shape, floating.
    Returns:
      the same shape and dtype, values in {0, 1}.
    """
    return (x > 0).astype(x.dtype)


def _hard_step_fwd(x):
    return hard_step(x), x


def surrogate_grad(x: jax.Array) -> jax.Array:
    """dH/dx as MGAS uses it (see `hard_step`)."""
    a = jnp.abs(x)
    return jnp.where(a <= 0.4, 2.0 - 4.0 * a, jnp.where(a <= 1.0, 0.4, 0.0)).astype(x.dtype)


def _hard_step_bwd(x, g):
    return (g * surrogate_grad(x),)


hard_step.defvjp(_hard_step_fwd, _hard_step_bwd)


def score_gate(score: jax.Array, threshold: jax.Array) -> jax.Array:
    """sigma(s) * H(sigma(s) - t): the gate of the op and filter levels (broadcasting)."""
    p = jax.nn.sigmoid(score)
    return p * hard_step(p - threshold)


def live_mask(score: jax.Array, threshold: jax.Array) -> jax.Array:
    """The 0/1 live mask H(sigma(s) - t), without gradient (used for commits and counts)."""
    return (jax.nn.sigmoid(score) > threshold).astype(jnp.float32)


def filter_mask(beta: jax.Array, threshold: jax.Array, committed: jax.Array | None = None) -> jax.Array:
    """Per-channel live filter mask H(sigma(beta) - t) (surrogate gradient), ANDed with `committed`.

    The filter gate's 0/1 factor: the forward multiplies by `filter_gate`, and a commit keeps the
    filters where this is 1 (`pruning.commit`), so both follow one rule.

    Args:
      beta: (C,) filter scores.
      threshold: scalar threshold shared by the beta vectors of one op (or preprocess layer).
      committed: optional (C,) 0/1 committed mask.
    Returns:
      (C,) 0/1 mask.
    """
    m = hard_step(jax.nn.sigmoid(beta) - threshold)
    return m if committed is None else m * committed


def filter_gate(beta: jax.Array, threshold: jax.Array, committed: jax.Array | None = None) -> jax.Array:
    """Per-channel filter gate sigma(beta) * H(sigma(beta) - t) * committed (see `filter_mask`).

    Returns:
      (C,) channel scales.
    """
    return jax.nn.sigmoid(beta) * filter_mask(beta, threshold, committed)


def weight_mask(w: jax.Array, threshold: jax.Array, committed: jax.Array | None = None) -> jax.Array:
    """Weight-level mask H(|w| - t_w) (surrogate gradient to w and t_w), ANDed with `committed`.

    Args:
      w: a conv kernel, any shape.
      threshold: scalar t_w of the op that owns the kernel.
      committed: optional 0/1 mask of w's shape.
    Returns:
      a 0/1 array of w's shape; the masked kernel is `w * weight_mask(w, t)`.
    """
    m = hard_step(jnp.abs(w) - threshold)
    return m if committed is None else m * committed


def edge_nodes(steps: int = 4) -> np.ndarray:
    """Index of the node (0-based among intermediate nodes) each edge of a DARTS cell feeds.

    With 4 steps there are 14 edges: node 0 gets edges 0-1, node 1 edges 2-4, node 2 edges 5-8,
    node 3 edges 9-13.
    """
    return np.concatenate([np.full(2 + j, j) for j in range(steps)]).astype(np.int32)


def edge_sources(steps: int = 4) -> np.ndarray:
    """Index of the input state (0, 1 = cell inputs, 2.. = nodes) that each edge reads."""
    return np.concatenate([np.arange(2 + j) for j in range(steps)]).astype(np.int32)


def node_onehot(node_of_edge, num_nodes: int | None = None, dtype=jnp.float32) -> jax.Array:
    """(E, N) one-hot of the node each edge feeds: row e is 1 at node_of_edge[e].

    Args:
      node_of_edge: (E,) int node index of each edge (`edge_nodes(steps)`): a numpy or JAX array,
        also a traced one (an argument of a jitted function).
      num_nodes: N, static. None: `E`, an upper bound of the node count (a node is fed by at least
        one edge), so the width never depends on the values and the function jits with
        node_of_edge as an ordinary argument. Columns of nodes that no edge feeds are all zero,
        which leaves every per-node sum and argmax below unchanged.
    Raises:
      ValueError: a concrete node index outside [0, N) (a traced one cannot be checked).
    """
    n = int(np.shape(node_of_edge)[0]) if num_nodes is None else int(num_nodes)
    try:
        concrete = np.asarray(node_of_edge)
    except jax.errors.TracerArrayConversionError:
        concrete = None
    if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() >= n):
        raise ValueError(f"node_of_edge holds node indices {concrete.min()}..{concrete.max()}, outside "
                         f"[0, {n}) (num_nodes = {n}); pass num_nodes = the number of nodes")
    return jax.nn.one_hot(node_of_edge, n, dtype=dtype)


def protect_last_op(live: jax.Array, active: jax.Array, alpha: jax.Array, node_of_edge,
                    num_nodes: int | None = None) -> jax.Array:
    """Protection rule: the last remaining op into a node is never masked.

    For every node whose live mask would switch off all of its still-active ops, the active op with
    the highest alpha stays on.

    Args:
      live: (E, O) 0/1 live mask (already ANDed with `active`).
      active: (E, O) 0/1 committed (still present) ops.
      alpha: (E, O) op scores.
      node_of_edge: (E,) int node index of each edge (`edge_nodes()`); an array, traced or not, so
        `jax.jit(protect_last_op)` needs no static arguments.
      num_nodes: static number of nodes (see `node_onehot`; None: E, always enough).
    Returns:
      (E, O) 0/1 protected mask.
    """
    onehot = node_onehot(node_of_edge, num_nodes, live.dtype)  # (E, N)
    n_nodes = onehot.shape[1]
    live_per_node = jnp.einsum("eo,en->n", live, onehot)
    # Best still-active op of every node: argmax of alpha over the node's (edge, op) pairs.
    masked_alpha = jnp.where(active > 0, alpha, -jnp.inf)
    per_node = jnp.where(onehot.T[:, :, None] > 0, masked_alpha[None], -jnp.inf)  # (N, E, O)
    flat = per_node.reshape(n_nodes, -1)
    best = jax.nn.one_hot(jnp.argmax(flat, axis=1), flat.shape[1], dtype=live.dtype).reshape(per_node.shape)
    has_active = jnp.any(jnp.isfinite(flat), axis=1)
    rescue = (live_per_node == 0) & has_active  # (N,): a node no edge feeds has no active op
    keep = jnp.einsum("n,neo->eo", rescue.astype(live.dtype), best)
    return jnp.maximum(live, keep)


def op_gate(alpha: jax.Array, t_op: jax.Array, active: jax.Array, node_of_edge,
            num_nodes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Op-level discretization: gates sigma(alpha) * m with m = protect(H(sigma(alpha) - t_op) * active).

    The hard step keeps its surrogate gradient; the protection only ever switches a mask on: a
    protected op's forward gate is sigma(alpha), and its step's surrogate gradient still reaches alpha
    and t_op (so a protected op can be pushed back above its threshold).

    Args:
      alpha: (E, O) op scores of one cell.
      t_op: (E, O) op thresholds.
      active: (E, O) 0/1 committed mask (0 = removed op).
      node_of_edge: (E,) int node of each edge (`edge_nodes(steps)`), a numpy or JAX array; under
        `jax.jit(op_gate)` it is an ordinary (traced) argument.
      num_nodes: static number of nodes (see `node_onehot`; None: E, always enough).
    Returns:
      (gates (E, O), live mask (E, O) 0/1 after protection).

    Example (a 4-node DARTS cell: 14 edges x 7 ops):

        gate, live = jax.jit(gates.op_gate)(alpha, t_op, active, gates.edge_nodes(4))
    """
    p = jax.nn.sigmoid(alpha)
    step = hard_step(p - t_op) * active
    live = jax.lax.stop_gradient(step)
    protected = protect_last_op(live, active, jax.lax.stop_gradient(alpha), node_of_edge, num_nodes)
    # where protection switched a mask on, use 1 (no gradient) instead of the step's 0
    mask = step + jax.lax.stop_gradient(protected - live)
    return p * mask, protected
