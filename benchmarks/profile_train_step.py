"""Where the retraining step's time goes: one profiled step, its XLA kernels summed by kind.

Builds the step of `bench_train_step.py` (its `build_step`: same network, optimizer and batch), runs it once to warm
up, then once under `jax.profiler.trace`, and reads the trace file (`*.trace.json.gz`, no xprof
needed): the XLA kernels' time summed by fusion kind (`copy_bitcast_fusion.46` counts as
`copy_bitcast_fusion`), and for the most expensive single kernels the Flax module and operation
they come from (the `op_name` metadata of the compiled HLO).

    python benchmarks/profile_train_step.py                      # DARTS_V2, C 36, 20 cells, batch 96
    python benchmarks/profile_train_step.py --net mgas --top 20
    python benchmarks/profile_train_step.py --layers 5 --channels 8 --batch 8    # a quick look
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train_step as bench  # noqa: E402  (the step's configuration and networks)


def kernel_times(trace_file: str) -> dict:
    """{kernel name: total microseconds} of the XLA kernels in a profiler trace."""
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    times = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("args", {}).get("hlo_op"):
            times[e["args"]["hlo_op"]] += e["dur"]
    return times


def op_names(hlo_text: str) -> dict:
    """{HLO instruction name: the op_name of its metadata} of a compiled module's text."""
    found = re.finditer(r"^\s*%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", hlo_text, re.M)
    return {m.group(1): m.group(2) for m in found}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="darts_v2", choices=bench.NETS)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--channels", type=int, default=36)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--top", type=int, default=12, help="kinds and single kernels to list")
    args = p.parse_args()
    import jax
    from mgas_jax import modes

    modes.keep_freed_host_memory()
    args.eval = False
    fn, state, inputs = bench.build_step(args)
    compiled = fn.lower(state, *inputs).compile()
    state, _ = compiled(state, *inputs)   # warm-up (the step donates its state)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            state, _ = compiled(state, *inputs)
            jax.block_until_ready(state)
        times = kernel_times(sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))[-1])
    names = op_names(compiled.as_text())
    total = sum(times.values())
    kinds, counts = collections.Counter(), collections.Counter()
    for op, us in times.items():
        kind = re.sub(r"\.\d+$", "", op)
        kinds[kind] += us
        counts[kind] += 1
    print(f"{args.net}: batch {args.batch}, C {args.channels}, {args.layers} cells, {args.image}x{args.image}, "
          f"{args.dtype}; XLA kernels {total / 1e3:.0f} ms in one step")
    print("  ms      %   kernels  kind")
    for kind, us in kinds.most_common(args.top):
        print(f"{us / 1e3:8.0f} {100 * us / total:5.1f} {counts[kind]:8d}  {kind}")
    print("the most expensive single kernels:")
    for op, us in times.most_common(args.top):
        print(f"{us / 1e3:8.1f} ms  {op}  {names.get(op, '?')}")


if __name__ == "__main__":
    main()
