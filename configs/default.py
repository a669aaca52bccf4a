"""Default config: retraining a fixed cell on CIFAR-10 with the authors' settings.

docs/method.md section 6: 600 epochs, batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, wd 3e-4,
clip 5, crop (pad 4) + flip + Cutout 16, drop-path 0.2 ramped linearly, auxiliary weight 0.4,
pools followed by BN; the search keys follow docs/method.md sections 1-5. Every other config starts
from this one and overrides what differs.

Each key's default and doc are written once, in mgas_jax/config.py's SCHEMA. To list every key with
its type, default and doc:

    python -m mgas_jax.main --helpconfig

    python -m mgas_jax.main --config=configs/default.py --workdir=/tmp/run --config.train.epochs=3
"""
import ml_collections

from mgas_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    return config_lib.default_config()
