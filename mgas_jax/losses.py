"""Loss terms of the MGAS search (docs/method.md section 3), as pure functions.

    L = CE(head_s(x), y) + lambda * (R_op + R_thr)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mgas_jax import gates


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross entropy. logits (B, K) float, labels (B,) int."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def op_sparsity(alpha: jax.Array, active: jax.Array, node_of_edge, num_nodes: int | None = None,
                scored: jax.Array | None = None) -> jax.Array:
    """R_op of one cell: sum over nodes j and counted ops (e, o) into j of log(1 + n_j sigma(alpha) / S_j).

    n_j is the number of counted ops into node j (the released code takes n_j of nodes 2 and 3 from
    node 1's edges; we use each node's own count), S_j the sum of sigma(alpha) over the scored ops
    into j (default: the counted ones).

    Args:
      alpha: (E, O) op scores; active: (E, O) 0/1 counted ops (the search passes the live masks).
      node_of_edge: (E,) int node of each edge (`gates.edge_nodes(steps)`), traced or not.
      num_nodes: static number of nodes (`gates.node_onehot`; None: E, always enough).
      scored: (E, O) 0/1 ops whose scores make up S_j (the search passes every committed op, live or
        not, as the released code sums over all ops of the node).
    Returns:
      scalar.
    """
    sig = jax.nn.sigmoid(alpha)
    p = sig * active
    onehot = gates.node_onehot(node_of_edge, num_nodes, p.dtype)  # (E, N)
    s = jnp.einsum("eo,en->n", p if scored is None else sig * scored, onehot)
    n = jnp.einsum("eo,en->n", active, onehot)
    s_e = onehot @ s  # (E,) S of each edge's node
    n_e = onehot @ n
    ratio = p * (n_e / jnp.maximum(s_e, 1e-12))[:, None]
    return jnp.sum(jnp.log1p(ratio) * active)


def threshold_penalty(thresholds: jax.Array, active: jax.Array | float = 1.0) -> jax.Array:
    """R_thr: sum of exp(-t) over the thresholds of active units (pressure that raises thresholds)."""
    return jnp.sum(jnp.exp(-thresholds) * active)


def flat_values(tree) -> jax.Array:
    """Every element of every leaf of `tree`, as one float32 vector.

    Why: a reduction over a whole pytree written leaf by leaf is one XLA reduction per leaf, and a
    super-net has thousands of leaves (2143 trainable ones at 8 cells): XLA's CPU backend took ~45 s to
    compile the update's finiteness check and gradient norm that way, against well under a second for
    one concatenation and one reduction (benchmarks/README.md, section 8).
    """
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    return jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)


def all_finite(tree) -> jax.Array:
    """() bool: every element of every leaf of `tree` (e.g. the gradients) is finite."""
    return jnp.all(jnp.isfinite(flat_values(tree)))


def global_norm(tree) -> jax.Array:
    """() float32: the L2 norm of all elements of `tree` together (as optax.tree.norm)."""
    return jnp.sqrt(jnp.sum(jnp.square(flat_values(tree))))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm with the norm taken in one reduction (`global_norm`).

    The same rule and (empty) state as optax's, whose norm is one reduction per leaf (slow to compile
    for the thousands of leaves of a super-net; see `flat_values`).

    update(updates, state, params, *, group_norm=None): `group_norm`, when given, is the norm to clip
    by instead of that of `updates`: the chained search step updates the network part by part and
    passes the norm of the whole group (search_step.PartwiseOptimizer).
    """
    def update(updates, state, params=None, *, group_norm=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates) if group_norm is None else group_norm
        keep = norm < max_norm
        return jax.tree.map(lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
