"""Mesh and shardings: batch split over 'data', state replicated; a tiny run on 8 simulated CPU devices."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mgas_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_over_all_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count()


def test_shard_batch_and_replicate():
    mesh = parallel.make_mesh()
    batch = {"image": np.arange(4 * 2 * 2 * 1, dtype=np.uint8).reshape(4, 2, 2, 1), "label": np.arange(4, dtype=np.int32)}
    sharded = parallel.shard_batch(batch, mesh)
    assert sharded["image"].shape == (4, 2, 2, 1) and sharded["label"].dtype == np.int32
    assert sharded["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(sharded["label"]), batch["label"])
    tree = {"w": np.ones((3,), np.float32), "key": jax.random.key(3)}
    replicated = parallel.replicate(tree, mesh)
    assert replicated["w"].sharding.is_fully_replicated
    assert jax.random.key_data(replicated["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()


def test_pad_batch_marks_real_examples():
    batch = {"image": np.ones((3, 2, 2, 1), np.uint8), "label": np.array([4, 5, 6], np.int32)}
    padded = parallel.pad_batch(batch, 8)
    assert padded["image"].shape == (8, 2, 2, 1)
    np.testing.assert_array_equal(padded["label"], [4, 5, 6, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0, 0, 0, 0])
    assert parallel.pad_batch(batch, 3)["mask"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="does not fit"):
        parallel.pad_batch(batch, 2)


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from mgas_jax import config as config_lib, parallel, train
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh()
    x = parallel.shard_batch({"image": np.zeros((16, 8, 8, 1), np.uint8)}, mesh)["image"]
    shard_shapes = sorted({s.data.shape for s in x.addressable_shards})
    config = config_lib.load_config(sys.argv[1])
    config.train.epochs = 1
    results = train.train_and_evaluate(config, sys.argv[2])
    print("RESULT" + json.dumps({"shards": [list(s) for s in shard_shapes], "n": len(x.addressable_shards),
                                "test": results["test"]}))
""")


@pytest.mark.slow
def test_tiny_run_on_eight_devices(tmp_path):
    """Batch 16 over 8 devices (2 each), eval batch 128 with a padded last batch: the sharded path runs."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, "configs", "tiny.py"), str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    assert result["n"] == 8 and result["shards"] == [[2, 8, 8, 1]]
    assert 0.0 <= result["test"]["top1"] <= 1.0 and np.isfinite(result["test"]["loss"])
