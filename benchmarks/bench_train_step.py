"""Speed and memory of one retraining step: ours (JAX) and the PyTorch DARTS network, on one machine.

The step the retraining runs for hundreds of epochs (`train.make_train_step`): forward with the
auxiliary head (weight 0.4) and drop-path, backward, gradient-norm clip 5, SGD (momentum 0.9,
weight decay 3e-4), on `--batch` random images of `--image` x `--image`. Two networks:

- `darts_v2`: the DARTS evaluation network with the DARTS_V2 genotype (C 36, 20 cells: 3,349,342
  parameters without the auxiliary head, the DARTS reference code's count), against
  ../shared/bench/torch_darts_network.py, the same network in PyTorch;
- `mgas`: the same ops shaped like an MGAS export: every op writes a seeded random 3/4 of its node's
  channels, every sep_conv's inner width is 3/4 of the cell's, the preprocess layers keep 3/4 of
  theirs, and every conv kernel carries a fixed weight mask keeping half of its weights (the
  retraining network of an export: BN after pools, masks applied in the forward and the update).
  PyTorch has no such network, so this row is ours alone.

    python benchmarks/bench_train_step.py                        # both nets, train and eval steps
    python benchmarks/bench_train_step.py --layers 8 --channels 16 --batch 32   # smaller
    python benchmarks/bench_train_step.py --nets darts_v2 --dtype bfloat16 --json /tmp/t.json

Each measurement runs in a fresh subprocess, so each side's peak RSS is its own. Our side's process
gets the malloc that `mgas_jax.main` gives a retraining (`--allocator`, as config.host_allocator:
jemalloc where installed, on the CPU; see mgas_jax/host_allocator.py); the reference keeps the C
library's, as its users run it. Ours reports the XLA compile time, ms per step (mean of `--steps` steps after `--warmup`), images/s, peak RSS (the
compiler included), `run_rss_mb` (the highest RSS while the timed steps run) and, on an accelerator,
the device's peak bytes in use. `ratio` is reference ms / ours ms: > 1 means ours is faster; the
memory ratio is reference peak / ours (> 1: ours smaller). The eval step (`--eval` of the reference)
is the inference of a whole batch in eval mode.

Timings on a shared CPU are noisy: compare the two sides of one run, not runs of different days.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_search_step as common  # noqa: E402  (RSS sampling and the reference runner)

REFERENCE = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench", "torch_darts_network.py"))
NETS = ("darts_v2", "mgas")
KEEP_CHANNELS = 0.75   # the mgas net: share of channels each op, sep_conv middle and preprocess keeps
KEEP_WEIGHTS = 0.5     # ... and of each conv kernel's weights


# ----------------------------------------------------------------------------------------------
# Our side (runs in its own process)

def _config(args):
    """configs/cifar10.py's retraining protocol at the benchmark's sizes, augmentation off (the
    reference feeds its random tensor as is)."""
    from mgas_jax import config as config_lib
    config = config_lib.load_config(os.path.join(ROOT, "configs", "cifar10.py"))
    config.model.init_channels, config.model.layers = args.channels, args.layers
    config.model.dtype = args.dtype
    config.data.num_classes = args.classes
    config.data.crop_padding, config.data.flip, config.data.cutout = 0, False, 0
    config.train.batch_size = args.batch
    return config


def _mgas_cells(args):
    """DARTS_V2's cells with MGAS-export-like widths: each op writes a random KEEP_CHANNELS of its
    node's channels (seeded), sep_convs' inner width and the preprocess outputs likewise."""
    import dataclasses

    import numpy as np
    from mgas_jax import genotype
    rng = np.random.default_rng(0)

    def some(width):
        k = max(1, int(round(KEEP_CHANNELS * width)))
        return tuple(sorted(int(i) for i in rng.choice(width, size=k, replace=False)))

    cells = []
    for cell in genotype.genotype_to_cells("DARTS_V2", args.layers, args.channels):
        w = cell.width
        ops = tuple(dataclasses.replace(o, out_index=some(w),
                                        mid=max(1, int(round(KEEP_CHANNELS * w))) if o.op.startswith("sep") else None)
                    for o in cell.ops)
        cells.append(dataclasses.replace(cell, ops=ops, pre0_index=some(w), pre1_index=some(w)))
    return tuple(cells)


def _random_masks(model, x):
    """A 0/1 mask keeping a seeded random KEEP_WEIGHTS of every masked kernel."""
    import jax
    import numpy as np
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))["masks"]
    return jax.tree.map(lambda s: (rng.random(s.shape) < KEEP_WEIGHTS).astype(np.float32), shapes)


def build_step(args) -> tuple:
    """(jitted step, model state, inputs) of the training step, or of the eval step with args.eval."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mgas_jax import network, parallel, train

    config = _config(args)
    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    if args.net == "darts_v2":
        model = network.build_network("DARTS_V2", init_channels=args.channels, layers=args.layers,
                                      num_classes=args.classes, auxiliary=True, dtype=dtype)
    else:
        model = network.build_network(_mgas_cells(args), init_channels=args.channels, num_classes=args.classes,
                                      auxiliary=True, dtype=dtype)
    mesh = parallel.make_mesh()
    shape = (args.image, args.image, 3)
    masks = _random_masks(model, jnp.zeros((1,) + shape)) if model.spec.masked else None
    steps_per_epoch = 1000
    tx = train.make_optimizer(config, steps_per_epoch)
    schedule = train.learning_rate_schedule(config, steps_per_epoch)
    state = train.create_train_state(config, model.spec, jax.random.key(0), shape, tx=tx, masks=masks, mesh=mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (args.batch,) + shape, dtype=np.uint8),
             "label": rng.integers(0, args.classes, (args.batch,), dtype=np.int32)}
    mean, std = np.asarray(common.CIFAR_MEAN), np.asarray(common.CIFAR_STD)
    if args.eval:
        fn = train.make_eval_step(model, mean, std, mesh)
        batch["mask"] = np.ones((args.batch,), np.float32)
        inputs = (parallel.shard_batch(batch, mesh),)
    else:
        fn = train.make_train_step(config, model, tx, schedule, mean, std, mesh)
        inputs = (parallel.shard_batch(batch, mesh), jnp.float32(config.model.drop_path), jnp.float32(1.0))
    return fn, state, inputs


def measure_ours(args) -> dict:
    import jax
    from mgas_jax import loop, network

    kept = common.setup_malloc(args.system_malloc)   # as mgas_jax.main sets up a retraining
    fn, state, inputs = build_step(args)
    t0 = time.perf_counter()
    compiled = fn.lower(state, *inputs).compile()
    compile_s = time.perf_counter() - t0

    wait = loop.one_step_at_a_time()   # as the training's loop does

    def run(n, state):
        out = None
        for _ in range(n):
            if wait:
                jax.block_until_ready((state, out))
            result = compiled(state, *inputs)
            # the eval step returns its sums only; the train step (new state, metrics)
            state, out = (state, result) if args.eval else result
        jax.block_until_ready((state, out))
        return state, out

    counts = network.count_params(state.params, state.masks or None)
    mem = compiled.memory_analysis()
    xla_mb = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    state, _ = run(args.warmup, state)
    t0 = time.perf_counter()
    with common._RssSampler() as sampler:
        state, out = run(args.steps, state)
    dt = (time.perf_counter() - t0) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    finite = float(out["finite"]) if not args.eval else 1.0
    return dict(net=args.net, step="eval" if args.eval else "train", device=jax.devices()[0].platform,
                dtype=args.dtype, compile_s=compile_s, ms_per_step=dt * 1e3, images_per_s=args.batch / dt,
                peak_rss_mb=common._peak_rss_mb(), run_rss_mb=sampler.peak_mb, xla_mb=xla_mb,
                peak_device_mb=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
                params_dense=counts["dense"], params_nonzero=counts["nonzero"], finite=finite,
                malloc=kept)


# ----------------------------------------------------------------------------------------------
# The driver: one subprocess per measurement

def _size_flags(args) -> list[str]:
    return [f"--batch={args.batch}", f"--channels={args.channels}", f"--layers={args.layers}",
            f"--image={args.image}", f"--classes={args.classes}", f"--steps={args.steps}",
            f"--warmup={args.warmup}"]


def run_ours(args, net: str, eval_step: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side=ours", f"--net={net}", f"--dtype={args.dtype}",
           *_size_flags(args)] + (["--eval"] if eval_step else []) + (["--system-malloc"] if args.system_malloc else [])
    env = common.allocator_env(args.allocator, "retrain", args.system_malloc)   # as mgas_jax.main's retraining
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("OURS "):
            return json.loads(line[5:])
    raise RuntimeError(f"our step failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _ours_line(o: dict) -> str:
    extra = "".join(f" {k}={o[k]:.0f}" for k in ("run_rss_mb", "xla_mb", "peak_device_mb") if o.get(k) is not None)
    return (f"mgas-jax-{o['step']} net={o['net']} device={o['device']} dtype={o['dtype']} malloc={o['malloc']} "
            f"ms_per_step={o['ms_per_step']:.0f} images_per_s={o['images_per_s']:.2f} compile_s={o['compile_s']:.1f} "
            f"peak_rss_mb={o['peak_rss_mb']:.0f}{extra} params={o['params_dense']} nonzero={o['params_nonzero']}")


def compare(args) -> list[dict]:
    print(f"config: batch {args.batch}, C {args.channels}, {args.layers} cells, {args.image}x{args.image}, "
          f"{args.classes} classes, {args.dtype}, steps {args.steps} after {args.warmup} warm-up", flush=True)
    rows = []
    for eval_step in (False, True):
        for net in args.nets:
            ours = run_ours(args, net, eval_step)
            print(_ours_line(ours), flush=True)
            row = dict(ours=ours)
            if net == "darts_v2" and not args.no_reference:
                device = "cuda" if ours["device"] == "gpu" else "cpu"
                flags = _size_flags(args) + [f"--device={device}"] + (["--eval"] if eval_step else [])
                ref = common.run_torch(args.reference, "torch-darts", flags)
                print(ref["line"], flush=True)
                row["reference"] = ref
                row["speed_ratio"] = ref["ms_per_step"] / ours["ms_per_step"]
                row["rss_ratio"] = ref["peak_rss_mb"] / ours["peak_rss_mb"]
                line = (f"{ours['step']} speed ratio (reference ms / ours ms, > 1: ours faster): {row['speed_ratio']:.2f}; "
                        f"peak RSS ratio (reference / ours, > 1: ours smaller): {row['rss_ratio']:.2f}")
                if device == "cuda" and ours.get("peak_device_mb") and ref.get("peak_gpu_mb"):
                    row["device_memory_ratio"] = ref["peak_gpu_mb"] / ours["peak_device_mb"]
                    line += f"; device memory ratio: {row['device_memory_ratio']:.2f}"
                print(line, flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--channels", type=int, default=36)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch network")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc defaults (mgas_jax.main keeps freed memory; see modes.py)")
    p.add_argument("--allocator", default="auto", help="our side's malloc, as config.host_allocator: 'auto' "
                   "(jemalloc where installed, on the CPU, as mgas_jax.main's retraining), 'system', 'jemalloc' "
                   "or a library's path")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--reference", default=REFERENCE, help="path of torch_darts_network.py (default: shared/bench/ "
                                                          "beside the repository)")
    p.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)   # internal: one measurement
    p.add_argument("--net", choices=NETS, help=argparse.SUPPRESS)
    p.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side == "ours":
        print("OURS " + json.dumps(measure_ours(args)), flush=True)
        return
    rows = compare(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config={k: v for k, v in vars(args).items() if k not in ("side", "net", "eval")},
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
