"""Saving and restoring a search state: packed (one array per dtype, what `checkpoint.Checkpointer`
writes) against orbax's own layout (every leaf an array of its own, what it wrote before).

The state is a real one: `search.Searcher.fresh_state` of a super-net (by default configs/digits.py's,
3 cells of 3 nodes at C 8 with every op, the structure stage 3 starts from), with its optimizer state.
Each form is saved `--repeats` times through an orbax CheckpointManager (save, then wait until written,
as the search does after every epoch) and restored once; the restore is checked to give the state back.

    python benchmarks/bench_checkpoint.py
    python benchmarks/bench_checkpoint.py --layers 8 --channels 16 --steps 4   # the 8-cell super-net
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mgas_jax import checkpoint, search, supernet  # noqa: E402
from mgas_jax import config as config_lib  # noqa: E402


def search_state(layers: int, channels: int, steps: int):
    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "configs", "digits.py"))
    config.search.layers, config.search.init_channels, config.search.steps = layers, channels, steps
    workdir = tempfile.mkdtemp(prefix="bench_ckpt_search_")
    s = search.Searcher(config, workdir)
    cells = supernet.full_cells(channels, layers, steps)
    spec = search.make_spec(config.search, s.ds.num_classes, cells, 3)
    state = s.fresh_state(spec, 0)
    s.ckpt.close()
    return state


def timed_saves(directory: str, item, repeats: int) -> list[float]:
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    times = []
    for step in range(repeats):
        start = time.perf_counter()
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(item)))
        manager.wait_until_finished()
        times.append(time.perf_counter() - start)
    manager.close()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkpoint.quiet_orbax_logs()
    state = search_state(args.layers, args.channels, args.steps)
    leaves = jax.tree.leaves(state)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    print(f"search state: {len(leaves)} leaves, {n} numbers (layers {args.layers}, C {args.channels}, "
          f"{args.steps} nodes)")
    root = tempfile.mkdtemp(prefix="bench_ckpt_")
    per_leaf = timed_saves(os.path.join(root, "leaves"), checkpoint.keys_to_data(state), args.repeats)
    packed = timed_saves(os.path.join(root, "packed"), checkpoint.pack(state), args.repeats)

    ckpt = checkpoint.Checkpointer(os.path.join(root, "checkpointer"), max_to_keep=2)
    ckpt.save(0, state, {"epoch": 0})
    ckpt.wait()
    start = time.perf_counter()
    back = ckpt.restore(0, state)
    restore_packed = time.perf_counter() - start
    ckpt.close()
    for a, b in zip(jax.tree.leaves(back), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    manager = ocp.CheckpointManager(os.path.join(root, "leaves"))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        checkpoint.keys_to_data(state))
    start = time.perf_counter()
    manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))
    restore_leaves = time.perf_counter() - start
    manager.close()
    fmt = lambda ts: " / ".join(f"{t:.2f}" for t in ts)
    print(f"save, one array per leaf: {fmt(per_leaf)} s; restore {restore_leaves:.2f} s")
    print(f"save, packed per dtype:   {fmt(packed)} s; restore {restore_packed:.2f} s (checked equal)")
    print(f"ratio (median save): {np.median(per_leaf) / np.median(packed):.1f}x")


if __name__ == "__main__":
    main()
