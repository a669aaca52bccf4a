"""Process setup of the run modes: the host allocator."""
import subprocess
import sys
import textwrap

import pytest

# Allocates, fills and frees a 64 MiB buffer five times; prints the minor page faults that took.
_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from mgas_jax import modes
    kept = modes.keep_freed_host_memory() if sys.argv[1] == "keep" else False
    def use():
        a = np.empty(64 << 20, np.uint8)
        a.fill(1)
    use()   # the first use maps new pages either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        use()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options are Linux-only")
def test_kept_host_memory_is_reused_without_page_faults():
    """With keep_freed_host_memory, a freed 64 MiB block is reused as it is: refilling it maps no
    new pages; with glibc's defaults each refill maps the block afresh."""
    assert _faults("keep")[0] == "True"
    kept, system = _faults("keep")[1], _faults("system")[1]
    assert system >= 20 and kept <= system // 20, (kept, system)


@pytest.mark.slow
def test_the_logged_hash_is_the_checked_and_recorded_one(tmp_path):
    """mode=train: the hash logged when the run starts is the one in results.json and in its checkpoints."""
    import json
    import logging
    import os
    import re

    from mgas_jax import checkpoint, modes
    from mgas_jax import config as config_lib

    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py"))
    config.mode = "train"
    config.train.epochs = 1
    config.train.steps_per_epoch = 1
    messages = []

    class Lines(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    absl_logger, handler = logging.getLogger("absl"), Lines(logging.INFO)
    level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    absl_logger.addHandler(handler)
    try:
        results = modes.run(config, str(tmp_path))
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    [start] = [m for m in messages if m.startswith("mode=train")]
    logged = re.search(r"train hash ([0-9a-f]{16})", start).group(1)
    assert json.loads((tmp_path / "results.json").read_text())["config_hash"] == results["config_hash"] == logged
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1_000_000)
    try:
        assert ckpt.meta(ckpt.latest_step())["config_hash"] == logged
    finally:
        ckpt.close()
    # the one function behind all three: the semantic keys of the sections training reads
    assert logged == config_lib.config_hash(config, config_lib.TRAIN_SECTIONS)
    assert config_lib.config_hash(config) != logged  # the whole config's hash is another one
