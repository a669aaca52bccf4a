"""Speed and memory of one MGAS search step: ours (JAX) and the PyTorch reference, on one machine.

Both sides run the same configuration: the full unpruned super-net (every op on every edge, all
masks on), one-level search (weights, alpha, beta and thresholds all updated), `--batch` images of
`--image` x `--image`, `--channels` initial channels, `--layers` cells, `--classes` classes.

    python benchmarks/bench_search_step.py                         # batch 32, C 16, 8 cells, 32x32
    python benchmarks/bench_search_step.py --layers 5 --steps 2    # smaller, when 8 cells is too slow
    python benchmarks/bench_search_step.py --stages                # memory of each stage's sub-net step
    python benchmarks/bench_search_step.py --sweep                 # time and memory vs batch, C, cells
    python benchmarks/bench_search_step.py --cache-dir=/tmp/c      # ours twice: compiling, then from the cache
    python benchmarks/bench_search_step.py --programs cell --remat # the step as per-cell programs, remat
    python benchmarks/bench_search_step.py --programs edge --remat # ... as per-edge programs, remat

Ours is `search_step.make_step` (the jit-compiled step the search runs), measured in a fresh subprocess
per configuration so that each side's peak RSS is its own. It reports the trace (lower) and XLA
compile times, the mean ms per step over `--steps` steps after `--warmup` steps (each waited for
with block_until_ready), images/s, peak RSS, XLA's buffer assignment for the step (arguments,
outputs and temporaries: the step's own memory, without the compiler's) and, on an accelerator, the
device's peak bytes in use; on Linux also `run_rss_mb`, the highest RSS while the timed steps run (the
memory of running the step, without the compiler's peak). `--programs cell` (`edge`) measures the step
as a chain of per-cell (per-edge) programs (`search_step.make_step(..., programs='cell')`); its compile_s
is the first step's time less one step's run (tracing included), and it has no single buffer
assignment (no xla_step_mb). Our side's malloc keeps freed memory, as `mgas_jax.main` sets it up
(`modes.keep_freed_host_memory`; `--system-malloc` leaves glibc's defaults; `--allocator` as
config.host_allocator, whose 'auto' keeps glibc's for a search; `malloc=` in its line).
The reference is ../shared/bench/torch_reference.py (beside the repository), run as a subprocess on
the same device kind; its line is printed as it comes. `ratio` is reference
ms / ours ms: > 1 means ours is faster; the memory ratio is reference peak / ours (> 1: ours smaller).

Timings on a shared CPU are noisy: compare the two sides of one run, not runs of different days.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REFERENCE = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench", "torch_reference.py"))

# The authors' search optimiser settings (configs/default.py holds the same values).
OPTIMIZER = dict(momentum=0.9, grad_clip=5.0, weight_decay=3e-4, lr=0.01, alpha_lr=1.0, beta_lr=1.0,
                 threshold_lr=0.1, weight_threshold_lr=0.001)
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)


# ----------------------------------------------------------------------------------------------
# Our side (runs in its own process)

def stage_spec(args, stage: int | None):
    """The spec of the whole super-net (stage None) or of a stage's sub-net (cells of stages <= s)."""
    from mgas_jax import search, supernet
    cells = supernet.full_cells(args.channels, args.layers)
    head = "classifier"
    if stage is not None:
        cells = cells[:search.built_cells(args.layers, stage)]
        head = "stage" if stage < 3 else "classifier"
    return supernet.SuperNetSpec(tuple(cells), args.classes, 3 * args.channels, head=head, impl=args.impl,
                                 remat=args.remat, dtype=None if args.dtype == "float32" else args.dtype)


def measure_ours(args, stage: int | None = None) -> dict:
    """Build, compile and time the search step; returns the figures as a dict."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from mgas_jax import kernels, loop, search_step, supernet

    kept = setup_malloc(args.system_malloc)   # as mgas_jax.main does: the figures are what a search gets
    spec = stage_spec(args, stage)
    data_cfg = ml_collections.ConfigDict(dict(crop_padding=0, flip=False, cutout=0, autoaugment=False))
    tx = search_step.make_optimizer(types.SimpleNamespace(**OPTIMIZER))
    key = jax.random.key(0, impl="rbg")   # rbg: XLA CPU compiles threefry's bit mixing slowly
    t0 = time.perf_counter()
    v = supernet.init_variables(spec, key, (args.image, args.image, 3))
    init_s = time.perf_counter() - t0
    jax.clear_caches()   # the init's op-by-op programs, as Searcher.fresh_state drops them before any step
    trainable = {"params": v["params"], "arch": v["arch"]}
    state = search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                    batch_stats=v["batch_stats"], masks=v["masks"], opt_state=tx.init(trainable))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (args.batch, args.image, args.image, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, args.classes, (args.batch,), dtype=np.int32))}
    lam, scales = jnp.float32(1e-5), search_step.GroupScales().asarrays()
    step = search_step.make_step(spec, tx, data_cfg, jnp.asarray(CIFAR_MEAN), jnp.asarray(CIFAR_STD),
                                 programs=args.programs)

    xla_mb = None
    if args.programs == "step":
        t0 = time.perf_counter()
        lowered = step.lower(state, batch, key, lam, scales)
        trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = step = lowered.compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is not None:
            xla_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes) / 2**20
    else:
        # a chain of programs compiled as the first step meets them: time that step whole (trace,
        # compile and one run; the run is subtracted below, once a step's time is known). It is the
        # first warm-up step, so both forms run the same steps on the same keys.
        t0 = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(key, 0), lam, scales)
        jax.block_until_ready((state, metrics))
        first_s, trace_s = time.perf_counter() - t0, None
    loop.settle_garbage()   # as the search's loop does after a step that compiled

    wait = loop.one_step_at_a_time()   # as the search's loop does

    def run(n, state, first=0):
        metrics = None
        for i in range(first, n):
            if wait:
                jax.block_until_ready(state)
            state, metrics = step(state, batch, jax.random.fold_in(key, i), lam, scales)
        jax.block_until_ready((state, metrics))
        return state, metrics

    state, metrics = run(args.warmup, state, first=0 if args.programs == "step" else 1)
    t0 = time.perf_counter()
    with _RssSampler() as sampler:
        state, metrics = run(args.steps, state)
    dt = (time.perf_counter() - t0) / args.steps
    if args.programs != "step":
        compile_s = first_s - dt
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(device=device.platform, impl=kernels.resolve_impl(args.impl), programs=args.programs, stage=stage,
                cells=len(spec.cells), head=spec.head, params=int(n_params), init_s=init_s, trace_s=trace_s,
                compile_s=compile_s, ms_per_step=dt * 1e3, images_per_s=args.batch / dt,
                peak_rss_mb=_peak_rss_mb(), run_rss_mb=sampler.peak_mb, xla_mb=xla_mb,
                peak_device_mb=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
                loss=float(metrics["loss"]), finite=float(metrics["finite"]), malloc=kept)


class _RssSampler:
    """Highest resident set size seen while timed steps run (every 20 ms): the memory of running the
    step, without the compiler's peak that `_peak_rss_mb` includes."""

    def __enter__(self):
        import threading
        self.peak_mb, self._stop, self._thread = None, threading.Event(), None
        if os.path.exists("/proc/self/status"):   # Linux; elsewhere the figure is left out
            self.peak_mb = 0.0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while True:
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            self.peak_mb = max(self.peak_mb, kb / 1024)
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# Our side's malloc, as mgas_jax.main sets up a run (bench_train_step uses these too)

def allocator_env(allocator: str, mode: str, system_malloc: bool) -> dict:
    """The environment of our side's process: jemalloc preloaded where mgas_jax.main would re-execute
    a run of `mode` with it (host_allocator.preload_for, `allocator` as config.host_allocator)."""
    from mgas_jax import host_allocator, modes
    library = host_allocator.preload_for(allocator, mode=mode, on_cpu=modes.runs_on_the_cpu(),
                                         keep_freed=not system_malloc)
    env = {k: v for k, v in os.environ.items() if k != host_allocator.PRELOADED}
    return host_allocator.preloaded_env(library, env) if library else env


def setup_malloc(system_malloc: bool) -> str:
    """In our side's process, modes.setup_host_memory as a run calls it: under jemalloc (allocator_env
    preloaded it), its freed pages are released after each compilation; else glibc's malloc keeps
    freed memory (`system_malloc`: its defaults). Returns what the output line shows as malloc=."""
    from mgas_jax import host_allocator, modes
    got = modes.setup_host_memory({"keep_freed_host_memory": not system_malloc})
    version = host_allocator.jemalloc_version()
    return f"jemalloc-{version}" if version else got or "system"


# ----------------------------------------------------------------------------------------------
# The driver: one subprocess per measurement

def _flags(args, **override) -> list[str]:
    a = dict(vars(args), **override)
    out = [f"--batch={a['batch']}", f"--channels={a['channels']}", f"--layers={a['layers']}",
           f"--image={a['image']}", f"--classes={a['classes']}", f"--steps={a['steps']}",
           f"--warmup={a['warmup']}", f"--impl={a['impl']}", f"--dtype={a['dtype']}",
           f"--programs={a['programs']}"]
    return out + (["--remat"] if a["remat"] else []) + (["--system-malloc"] if a["system_malloc"] else [])


def run_ours(args, stage=None, **override) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side=ours", *_flags(args, **override)]
    if stage is not None:
        cmd.append(f"--stage={stage}")
    env = allocator_env(args.allocator, "search", args.system_malloc)
    if args.fast_compile:
        # XLA's HLO passes and buffer assignment (so xla_step_mb) are unchanged; only LLVM's
        # optimisation is off: compiles several times faster, runs slower.
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if args.cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(args.cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("OURS "):
            return json.loads(line[5:])
    raise RuntimeError(f"our step failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def run_torch(script: str, prefix: str, flags: list) -> dict:
    """Runs a PyTorch yardstick in a subprocess; its `prefix... key=value` line as a dict (+ line, wall_s)."""
    if not os.path.exists(script):
        raise FileNotFoundError(f"the PyTorch reference is not at {script}; it lives in shared/bench/ "
                                f"beside the repository")
    cmd = [sys.executable, script, *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((l for l in proc.stdout.splitlines() if l.startswith(prefix)), None)
    if proc.returncode or line is None:
        hint = " (install it with: pip install -e .[bench])" if "No module named 'torch'" in proc.stderr else ""
        raise RuntimeError(f"the PyTorch reference failed{hint}:\n{proc.stderr[-3000:]}")
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    out = {k: (v if k == "device" else float(v)) for k, v in fields.items()}
    out.update(line=line, wall_s=wall)
    return out


def run_reference(args, device: str, **override) -> dict:
    a = dict(vars(args), **override)
    return run_torch(REFERENCE, "torch-reference",
                     [f"--batch={a['batch']}", f"--channels={a['channels']}", f"--layers={a['layers']}",
                      f"--image={a['image']}", f"--classes={a['classes']}", f"--steps={a['steps']}",
                      f"--warmup={a['warmup']}", f"--device={device}"])


def _ours_line(o: dict) -> str:
    dev = f" peak_device_mb={o['peak_device_mb']:.0f}" if o.get("peak_device_mb") is not None else ""
    xla = f" xla_step_mb={o['xla_mb']:.0f}" if o.get("xla_mb") is not None else ""
    trace = f" trace_s={o['trace_s']:.1f}" if o.get("trace_s") is not None else ""
    run = f" run_rss_mb={o['run_rss_mb']:.0f}" if o.get("run_rss_mb") is not None else ""
    return (f"mgas-jax device={o['device']} impl={o['impl']} programs={o['programs']} malloc={o['malloc']} "
            f"ms_per_step={o['ms_per_step']:.0f} images_per_s={o['images_per_s']:.2f}{trace} "
            f"compile_s={o['compile_s']:.1f} "
            f"peak_rss_mb={o['peak_rss_mb']:.0f}{run}{xla}{dev} params={o['params']} loss={o['loss']:.4f}")


def _device_kind() -> str:
    import jax
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def compare(args) -> None:
    print(f"config: batch {args.batch}, C {args.channels}, {args.layers} cells, {args.image}x{args.image}, "
          f"{args.classes} classes, steps {args.steps} after {args.warmup} warm-up", flush=True)
    cached_before = _cache_entries(args.cache_dir)
    if cached_before:
        print(f"note: {args.cache_dir} already holds {cached_before} programs; the first run may load, not compile")
    t0 = time.perf_counter()
    ours = run_ours(args)
    ours_wall = time.perf_counter() - t0
    print(_ours_line(ours) + f" wall_s={ours_wall:.0f}", flush=True)
    warm = None
    if args.cache_dir:
        # A second process with the same program: what a resumed or repeated run pays (the step is
        # loaded from the persistent cache, so neither the compile time nor the compiler's memory).
        t0 = time.perf_counter()
        warm = run_ours(args)
        print("rerun, programs loaded from the cache: " + _ours_line(warm) + f" wall_s={time.perf_counter() - t0:.0f}",
              flush=True)
    device = "cuda" if ours["device"] == "gpu" else "cpu"
    if args.no_reference:
        return
    ref = run_reference(args, device)
    print(ref["line"] + f" wall_s={ref['wall_s']:.0f}", flush=True)
    ratio = ref["ms_per_step"] / ours["ms_per_step"]
    print(f"speed ratio (reference ms / ours ms, > 1: ours faster): {ratio:.2f}")
    if device == "cuda" and ours.get("peak_device_mb") and ref.get("peak_gpu_mb"):
        print(f"device memory ratio (reference / ours, > 1: ours smaller): "
              f"{ref['peak_gpu_mb'] / ours['peak_device_mb']:.2f}")
    print(f"peak RSS ratio (reference / ours, > 1: ours smaller): {ref['peak_rss_mb'] / ours['peak_rss_mb']:.2f}"
          + ("  (our RSS includes XLA's compiler; xla_step_mb is the step's own buffers)" if device == "cpu" else ""))
    if warm is not None:
        print(f"peak RSS ratio, rerun from the cache (reference / ours): {ref['peak_rss_mb'] / warm['peak_rss_mb']:.2f}")


def _cache_entries(directory) -> int:
    return len(os.listdir(directory)) if directory and os.path.isdir(directory) else 0


def _mb(value) -> str:
    # a chained step is many programs, with no single buffer assignment to report
    return f"{'-':>7}" if value is None else f"{value:7.0f}"


def stages(args) -> None:
    """Peak memory of each stage's sub-net step against the whole super-net's."""
    print(f"stage memory: batch {args.batch}, C {args.channels}, {args.layers} cells, {args.image}x{args.image}"
          + (" (fast compile: step times not representative)" if args.fast_compile else ""))
    print(f"{'net':>10} {'cells':>5} {'head':>10} {'params':>9} {'ms/step':>8} {'compile_s':>9} "
          f"{'rss_mb':>7} {'xla_mb':>7} {'device_mb':>9} {'xla/full':>8}")
    rows = [(f"stage {s}", run_ours(args, stage=s)) for s in (1, 2)]
    rows.append(("super-net", run_ours(args)))
    full = rows[-1][1]
    for name, o in rows:
        dev = f"{o['peak_device_mb']:9.0f}" if o.get("peak_device_mb") is not None else f"{'-':>9}"
        rel = o["xla_mb"] / full["xla_mb"] if o.get("xla_mb") and full.get("xla_mb") else float("nan")
        print(f"{name:>10} {o['cells']:>5} {o['head']:>10} {o['params']:>9} {o['ms_per_step']:8.0f} "
              f"{o['compile_s']:9.1f} {o['peak_rss_mb']:7.0f} {_mb(o['xla_mb'])} {dev} {rel:8.2f}", flush=True)


SWEEP_BASE = dict(batch=8, channels=8, layers=1, image=16)
SWEEP = (("batch", (4, 8, 16)), ("channels", (4, 8, 16)), ("layers", (1, 2)))


def sweep(args) -> None:
    """Step time and memory against batch size, channels and cells, around a small base config."""
    print(f"sweep around batch {SWEEP_BASE['batch']}, C {SWEEP_BASE['channels']}, {SWEEP_BASE['layers']} cells, "
          f"{SWEEP_BASE['image']}x{SWEEP_BASE['image']} (one knob at a time)")
    print(f"{'knob':>8} {'value':>5} {'ms/step':>8} {'ref_ms':>8} {'ratio':>6} {'compile_s':>9} {'rss_mb':>7} "
          f"{'ref_rss':>7} {'xla_mb':>7} {'device_mb':>9}")
    done = {}
    for knob, values in SWEEP:
        for value in values:
            cfg = dict(SWEEP_BASE, **{knob: value})
            key = tuple(sorted(cfg.items()))
            if key not in done:
                o = run_ours(args, **cfg)
                r = None if args.no_reference else run_reference(args, "cuda" if o["device"] == "gpu" else "cpu", **cfg)
                done[key] = (o, r)
            o, r = done[key]
            ref_ms = f"{r['ms_per_step']:8.0f}" if r else f"{'-':>8}"
            ratio = f"{r['ms_per_step'] / o['ms_per_step']:6.2f}" if r else f"{'-':>6}"
            ref_rss = f"{r['peak_rss_mb']:7.0f}" if r else f"{'-':>7}"
            dev = f"{o['peak_device_mb']:9.0f}" if o.get("peak_device_mb") is not None else f"{'-':>9}"
            print(f"{knob:>8} {value:>5} {o['ms_per_step']:8.0f} {ref_ms} {ratio} {o['compile_s']:9.1f} "
                  f"{o['peak_rss_mb']:7.0f} {ref_rss} {_mb(o['xla_mb'])} {dev}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impl", default="auto", help="depthwise conv formulation (mgas_jax.kernels.IMPLS)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action="store_true", help="rematerialise each cell in the backward pass")
    p.add_argument("--programs", default="step", choices=("step", "cell", "edge"),
                   help="our step as one XLA program, or as a chain of per-cell or per-edge programs "
                        "(compile_s is then the first step's time less a step's run: tracing included)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc's defaults (ours otherwise keeps freed memory, as mgas_jax.main does)")
    p.add_argument("--allocator", default="auto", help="our side's malloc, as config.host_allocator of a search "
                   "run: 'auto' (the C library's: mgas_jax.main preloads jemalloc only for training), 'system', "
                   "'jemalloc' or a library's path")
    p.add_argument("--stages", action="store_true", help="peak memory of each stage's sub-net step")
    p.add_argument("--sweep", action="store_true", help="time and memory against batch, channels and cells")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--fast-compile", action="store_true",
                   help="compile ours with --xla_backend_optimization_level=0: same memory figures, "
                        "much faster compile, slower (unrepresentative) step times")
    p.add_argument("--cache-dir", help="JAX's persistent compilation cache for our side; with it, ours runs "
                                       "twice (compiling, then loading the program like a resumed run)")
    p.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)   # internal: one measurement
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side == "ours":
        sys.path.insert(0, ROOT)
        print("OURS " + json.dumps(measure_ours(args, args.stage)), flush=True)
        return
    if args.stages:
        stages(args)
    elif args.sweep:
        sweep(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
