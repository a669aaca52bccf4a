"""Multi-host data parallelism, on one machine: 2 JAX processes over loopback give the 1-process numbers.

`jax.distributed.initialize` joins two processes (1 CPU device each; CPU collectives through gloo, JAX's
default on CPU) into one 2-device mesh. Each process reads only its half of every global batch
(`data.load(..., process_index, process_count)`) and `parallel.shard_batch` assembles the global array
from the halves, as on a TPU pod or a multi-node GPU cluster. The state is replicated and built on each
process from identical host values (`parallel.replicate`).

The check: three search steps of the tiny super-net (search_step.make_step) give the same losses and the same
weights and architecture parameters in both processes, and the same as a single process that feeds the
whole global batch to one device.

Loopback only (127.0.0.1, a free port); every child has a bounded timeout and is killed if still running.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

# every test here starts processes that compile and run the tiny search or its steps
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
TIMEOUT = 900  # seconds for all workers together: compiling on a loaded 2-core machine takes minutes

WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import jax
    config_path, process_id, num_processes, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if num_processes > 1:
        # loopback only: the coordinator binds to every interface ([::]) unless told otherwise
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id, coordinator_bind_address=f"127.0.0.1:{port}",
                                   initialization_timeout=300)
    import jax.numpy as jnp, numpy as np
    from mgas_jax import config as config_lib, data as data_lib, ops, parallel, search, search_step, supernet

    assert jax.process_count() == num_processes and jax.process_index() == process_id
    assert jax.local_device_count() == 1 and jax.device_count() == num_processes, jax.devices()
    config = config_lib.load_config(config_path)
    cfg = config.search
    data_cfg = search.search_data_config(config)
    # this process's slice of every global batch
    ds = data_lib.load(data_cfg, process_index=process_id, process_count=num_processes)
    cells = supernet.full_cells(cfg.init_channels, cfg.layers, cfg.steps)[:1]
    spec = search.make_spec(cfg, ds.num_classes, cells, 1)
    tx = search_step.make_optimizer(cfg)
    # identical host values on every process (same key, same init), replicated over the global mesh
    v = supernet.init_variables(spec, jax.random.key(0, impl="rbg"), ds.image_shape)
    trainable = {"params": v["params"], "arch": v["arch"]}
    start = jax.device_get(search_step.SearchState(step=jnp.zeros((), jnp.int32), params=v["params"], arch=v["arch"],
                                                   batch_stats=v["batch_stats"], masks=v["masks"],
                                                   opt_state=tx.init(trainable)))
    mesh = parallel.make_mesh()
    state = parallel.replicate(start, mesh)
    step = search_step.make_step(spec, tx, data_cfg, jnp.asarray(ds.mean), jnp.asarray(ds.std), programs=cfg.programs)
    local_sizes, losses = [], []
    for i, batch in enumerate(ds.train.batches(cfg.batch_size, epoch=0, seed=0, shuffle=True, drop_remainder=True)):
        if i == 3:
            break
        local_sizes.append(int(batch["label"].shape[0]))
        batch = parallel.shard_batch(batch, mesh)
        assert batch["label"].shape == (cfg.batch_size,)
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(1), i), jnp.float32(0.05),
                              search_step.GroupScales().asarrays())
        losses.append({k: float(v) for k, v in metrics.items()})
    # the host-side decisions read the replicated state: every process must be able to
    host = jax.device_get(state)
    flat = {jax.tree_util.keystr(p): np.asarray(x).tolist()
            for p, x in jax.tree_util.tree_leaves_with_path((host.params, host.arch, host.batch_stats))}
    print("RESULT" + json.dumps(dict(process=process_id, fast_variance=bool(ops.batch_norm(True, True).use_fast_variance), local_sizes=local_sizes, losses=losses,
                                    step=int(host.step), leaves=flat)), flush=True)
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    # no proxy may catch the loopback connections of the coordinator and of gloo
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _run_all(commands: list, logdir) -> list:
    """Starts every command at once; waits for all (bounded); kills whatever is left; returns their RESULTs.

    Output goes to files, not pipes: a worker blocked on a full pipe while its peer is being waited on
    would stall the collectives (and the shutdown barrier) of both.
    """
    procs, logs = [], []
    try:
        for i, c in enumerate(commands):
            out, err = open(logdir / f"worker{i}.out", "w+"), open(logdir / f"worker{i}.err", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=out, stderr=err, text=True))
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # killed below; its log says how far it got
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for out, err in logs:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    failed = [f"worker {c[3:]} exited with {p.returncode}:\n{err[-3000:]}"
              for c, p, (_, err) in zip(commands, procs, texts) if p.returncode]
    assert not failed, "\n\n".join(failed)
    return [json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
            for out, _ in texts]


def test_two_processes_match_one_process(tmp_path):
    port = str(_free_port())
    worker = [sys.executable, "-c", WORKER, TINY]
    # two processes of a 2-device mesh, and the single-process reference, side by side
    p0, p1, single = _run_all([worker + ["0", "2", port], worker + ["1", "2", port], worker + ["0", "1", "0"]], tmp_path)

    assert p0["local_sizes"] == p1["local_sizes"] == [8, 8, 8], "each process must feed half the global batch"
    assert single["local_sizes"] == [16, 16, 16]
    assert p0["step"] == p1["step"] == single["step"] == 3
    # the two processes hold the same replicated state, bit for bit
    assert p0["losses"] == p1["losses"]
    assert p0["leaves"] == p1["leaves"]
    # and the numbers of one process with the whole batch, to float tolerance
    for multi, one in zip(p0["losses"], single["losses"]):
        for k in one:
            np.testing.assert_allclose(multi[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert p0["leaves"].keys() == single["leaves"].keys()
    assert any("alpha" in k for k in single["leaves"]), "no architecture parameter compared"
    # relative to each tensor's scale; the tolerance is test_multidevice's (flax's one-pass BatchNorm
    # variance turns reordered float sums into ~1e-3 after three steps, two-pass keeps them near 1e-5)
    tol = 1e-2 if single["fast_variance"] else 1e-4
    for k, one in single["leaves"].items():
        one, multi = np.asarray(one, np.float64), np.asarray(p0["leaves"][k], np.float64)
        diff = np.max(np.abs(multi - one)) / (np.max(np.abs(one)) + 1e-12)
        assert diff < tol, f"{k}: 2 processes differ from 1 by {diff:.3g} of the tensor's scale"
