"""configs/tiny.py as the tests run it.

The tiny search takes minutes on a 2-core CPU, so conftest.py runs it once per session (fixture
`searched`) and mode=all once on a copy of it (fixture `tiny_all`); the configs here are theirs. A
test that needs a run of its own (interrupted, with another setting) starts it from the same config.
"""
import os

from mgas_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def search_config():
    """configs/tiny.py with mode=search: the shared search's config."""
    config = config_lib.load_config(TINY)
    config.mode = "search"
    return config


def short_config(mode=None):
    """configs/tiny.py with the short retraining protocol (1 epoch of 2 steps) and a short throughput
    measurement: the shared mode=all run's config. Its search keys are search_config()'s, so it resumes
    the shared search instead of refusing it."""
    config = config_lib.load_config(TINY)
    if mode is not None:
        config.mode = mode
    config.train.epochs = 1
    config.train.steps_per_epoch = 2
    config.evaluate.throughput_batch_size = 16
    config.evaluate.throughput_warmup = 1
    config.evaluate.throughput_steps = 2
    return config
